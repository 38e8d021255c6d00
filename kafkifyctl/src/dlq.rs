//! `kafkifyctl dlq list|show|redrive`: the dead letters with their reasons, and publishing
//! dead-lettered events again from the outbox table into their real topic, exactly once.
//!
//! Exactly once across runs, kills and repeats: every event a redrive publishes goes in one
//! Kafka transaction with a record keyed by its event id on the redrive log (a compacted topic
//! beside the checkpoints). A run starts with `init_transactions` under one transactional id per
//! deployment, which aborts whatever a killed run left open, then reads the log: an event in it
//! was published, and is never published again.

use std::collections::{BTreeMap, HashSet};

use cdc_relay::config::Config;
use cdc_relay::encode::Origin;
use cdc_relay::outbox::OutboxEvent;
use cdc_relay::pgoutput::Lsn;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::Message;
use serde::Serialize;

use crate::kafka;
use crate::table::{self, Table};

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Every dead letter, with its reason (filters as for redrive).
    List(Filter),
    /// One dead letter, with every header.
    Show {
        /// The event id (the `event_id` header).
        event_id: String,
    },
    /// Publish dead-lettered events again into their real topic, rebuilt from the outbox table
    /// (so the row must still be there: OUTBOX_RETENTION), once the cause is fixed (a schema,
    /// RELAY_MAX_RECORD_BYTES and the topic's max.message.bytes). Exactly once per event, even
    /// when run twice or killed midway.
    Redrive {
        #[command(flatten)]
        filter: Filter,
        /// Show what would be published, publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// Events per Kafka transaction.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Filter {
    /// Only these event ids (repeat the flag for several).
    #[arg(long = "id", value_name = "EVENT_ID")]
    pub ids: Vec<String>,
    /// Only dead letters whose reason contains this text (e.g. too_large, unknown event type).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only dead letters written at or after this time (RFC 3339, or a duration ago: 2h).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only dead letters written before this time (RFC 3339, or a duration ago).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

pub fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let ago = platform::config::parse_duration(s)
        .map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a duration like 2h"))?;
    Ok(chrono::Utc::now() - chrono::Duration::from_std(ago).map_err(|e| e.to_string())?)
}

/// A dead-letter record as read back.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub key: Option<String>,
    /// Why: `dlq_reason`, and `dlq_detail` when there is one.
    pub reason: String,
    /// Who dead-lettered it: `cdc-relay` (never published on its topic) or `worker` (published,
    /// then refused by the worker).
    pub origin: String,
    pub headers: BTreeMap<String, String>,
    pub payload_bytes: usize,
    #[serde(skip)]
    pub millis: Option<i64>,
}

impl Filter {
    fn keeps(&self, d: &DeadLetter) -> bool {
        (self.ids.is_empty() || d.event_id.as_ref().is_some_and(|id| self.ids.contains(id)))
            && self
                .reason
                .as_ref()
                .is_none_or(|r| d.reason.contains(r.as_str()))
            && self
                .since
                .is_none_or(|t| d.millis.is_some_and(|m| m >= t.timestamp_millis()))
            && self
                .until
                .is_none_or(|t| d.millis.is_some_and(|m| m < t.timestamp_millis()))
    }
}

fn dead_letter(msg: &BorrowedMessage<'_>) -> DeadLetter {
    let headers = kafka::headers(msg);
    let get = |k: &str| headers.get(k).cloned();
    let reason = match (get("dlq_reason"), get("dlq_detail")) {
        (Some(r), Some(d)) => format!("{r}: {d}"),
        (Some(r), None) => r,
        (None, _) => "(no dlq_reason header)".into(),
    };
    let millis = msg.timestamp().to_millis();
    DeadLetter {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp: millis
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        event_id: get("event_id"),
        event_type: get("event_type"),
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        reason,
        origin: get("dlq_origin").unwrap_or_else(|| "?".into()),
        payload_bytes: msg.payload().map_or(0, <[u8]>::len),
        headers,
        millis,
    }
}

/// Every committed dead letter the filter keeps, topic by topic, oldest first.
pub async fn read(config: &Config, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
    let mut out = Vec::new();
    for topic in kafka::dead_letter_topics(config) {
        let filter = filter.clone();
        out = kafka::read_all(config, &topic, out, move |out, msg| {
            let d = dead_letter(msg);
            if filter.keeps(&d) {
                out.push(d);
            }
        })
        .await?;
    }
    Ok(out)
}

pub fn render_list(letters: &[DeadLetter]) -> String {
    let mut t = Table::new([
        "TIME",
        "TOPIC",
        "PARTITION",
        "OFFSET",
        "EVENT ID",
        "KEY",
        "ORIGIN",
        "REASON",
    ]);
    for d in letters {
        t.row(vec![
            table::or_dash(d.timestamp.clone()),
            d.topic.clone(),
            d.partition.to_string(),
            d.offset.to_string(),
            table::or_dash(d.event_id.clone()),
            table::or_dash(d.key.clone()),
            d.origin.clone(),
            d.reason.clone(),
        ]);
    }
    format!("{}{} dead letters\n", t.render(), letters.len())
}

pub fn render_one(d: &DeadLetter) -> String {
    let mut out = format!(
        "{} [{}] @{}  {}\n  event id: {}\n  key: {}\n  reason: {}\n  origin: {}\n  payload: {} bytes\n  headers:\n",
        d.topic,
        d.partition,
        d.offset,
        table::or_dash(d.timestamp.clone()),
        table::or_dash(d.event_id.clone()),
        table::or_dash(d.key.clone()),
        d.reason,
        d.origin,
        d.payload_bytes
    );
    for (k, v) in &d.headers {
        out.push_str(&format!("    {k}: {v}\n"));
    }
    out
}

/// What a redrive did with one dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result", content = "detail")]
pub enum Outcome {
    /// Published on its topic (or would be, in a dry run).
    Redriven(String),
    /// An earlier redrive published it.
    AlreadyRedriven,
    /// The worker dead-lettered it after the relay had published it: publishing it again would
    /// put it on its topic twice.
    DeliveredAlready,
    /// Its outbox row is gone (pruned after OUTBOX_RETENTION).
    NotInOutbox,
    /// It would be dead-lettered again, for this reason: fix the cause first.
    StillFails(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct Redriven {
    pub event_id: String,
    pub topic: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What to do with a dead letter before its outbox row is looked at. Pure.
pub fn triage(d: &DeadLetter, done: &HashSet<String>) -> Option<Outcome> {
    let id = d.event_id.as_deref()?;
    if done.contains(id) {
        Some(Outcome::AlreadyRedriven)
    } else if d.origin != "cdc-relay" {
        Some(Outcome::DeliveredAlready)
    } else {
        None
    }
}

/// The redrive log: `<checkpoint topic>.redrives`, compacted, keyed by event id.
pub fn log_topic(config: &Config) -> String {
    format!("{}.redrives", config.checkpoint_topic)
}

/// The transactional id every redrive of this deployment shares, so that each run fences the
/// one before it.
pub fn transactional_id(config: &Config) -> String {
    format!(
        "kafkifyctl-redrive/{}/{}",
        config.checkpoint_topic, config.topic_prefix
    )
}

pub async fn redrive(
    config: &Config,
    filter: &Filter,
    dry_run: bool,
    batch: u32,
) -> anyhow::Result<Vec<Redriven>> {
    let letters = read(config, filter).await?;
    let log = log_topic(config);
    let producer = if dry_run {
        None
    } else {
        kafka::ensure_compacted(config, &log).await?;
        // Fences an earlier run and aborts what it left open: only then is the log complete.
        Some(kafka::transactional(config, "kafkifyctl-redrive", &transactional_id(config)).await?)
    };
    let done = read_log(config, &log).await?;
    let schemas = cdc_relay::registry::SchemaCache::register_all(
        &config.registry.schema_registry_url.0,
        &config.topic_prefix,
    )
    .await?;
    let mut clients = BTreeMap::new();
    let run = uuid::Uuid::now_v7().to_string();
    let mut results = Vec::new();
    let (mut open, mut published) = (0u32, 0usize);
    let mut seen = HashSet::new();
    for d in &letters {
        let Some(id) = d.event_id.clone() else {
            continue;
        };
        // A dead letter listed twice (read from two topics, or written twice by a relay whose
        // first transaction was aborted and is not read): once.
        if !seen.insert(id.clone()) {
            continue;
        }
        let outcome = match triage(d, &done) {
            Some(o) => o,
            None => match find_row(config, &mut clients, d, &id).await? {
                None => Outcome::NotInOutbox,
                Some((source, event)) => {
                    let record =
                        cdc_relay::record::build(config, &schemas, &source, &event, origin(d));
                    if let Some(reason) = record.dead_letter {
                        Outcome::StillFails(still_fails(reason, &record))
                    } else {
                        if let Some(producer) = &producer {
                            if open == 0 {
                                producer.begin_transaction()?;
                            }
                            kafka::send(producer, &record, &[], &[("redrive_run", &run)])?;
                            let entry = serde_json::json!({
                                "run": run,
                                "topic": record.topic,
                                "dead_letter": format!("{}/{}@{}", d.topic, d.partition, d.offset),
                                "at": chrono::Utc::now().to_rfc3339(),
                            })
                            .to_string();
                            producer
                                .send_result(
                                    FutureRecord::to(&log)
                                        .key(id.as_bytes())
                                        .payload(entry.as_bytes()),
                                )
                                .map_err(|(e, _)| e)?;
                            open += 1;
                            if open >= batch {
                                kafka::commit(producer).await?;
                                published += open as usize;
                                open = 0;
                                eprintln!("kafkifyctl: redriven {published} so far");
                            }
                        }
                        Outcome::Redriven(record.topic.clone())
                    }
                }
            },
        };
        results.push(Redriven {
            event_id: id,
            topic: d.topic.clone(),
            outcome,
        });
    }
    if let (Some(producer), true) = (&producer, open > 0) {
        kafka::commit(producer).await?;
    }
    Ok(results)
}

/// Where and when the event was first seen, from its dead letter's headers: the redriven
/// record carries the same `source_lsn` and `commit_ts` as the relay would have sent.
fn origin(d: &DeadLetter) -> Origin {
    Origin {
        lsn: d
            .headers
            .get("source_lsn")
            .and_then(|l| l.parse::<Lsn>().ok())
            .unwrap_or(Lsn(0)),
        commit_ts_micros: d
            .headers
            .get("commit_ts")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
    }
}

fn still_fails(reason: &str, record: &cdc_relay::encode::KafkaRecord) -> String {
    record
        .headers
        .iter()
        .find(|(k, _)| *k == "dlq_detail" || *k == "dlq_reason")
        .map_or(reason.to_string(), |(_, v)| format!("{reason}: {v}"))
}

/// The event ids on the redrive log.
async fn read_log(config: &Config, log: &str) -> anyhow::Result<HashSet<String>> {
    kafka::read_all(config, log, HashSet::new(), |done, msg| {
        if let Some(k) = msg.key() {
            done.insert(String::from_utf8_lossy(k).into_owned());
        }
    })
    .await
}

/// The outbox row of a dead letter: in the database its `source` header names, else in each
/// source's (event ids are UUIDs, unique across them).
async fn find_row(
    config: &Config,
    clients: &mut BTreeMap<String, tokio_postgres::Client>,
    d: &DeadLetter,
    id: &str,
) -> anyhow::Result<Option<(String, OutboxEvent)>> {
    let Ok(uuid) = id.parse::<uuid::Uuid>() else {
        return Ok(None);
    };
    let mut order: Vec<String> = config.sources.iter().map(|s| s.0.clone()).collect();
    if let Some(first) = d.headers.get("source") {
        order.retain(|s| s != first);
        order.insert(0, first.clone());
    }
    for source in order {
        let Some(ident) = config.sources.iter().find(|s| s.0 == source) else {
            continue;
        };
        if !clients.contains_key(&source) {
            let client = platform::db::connect(&config.source_url(ident)).await?;
            clients.insert(source.clone(), client);
        }
        let client = &clients[&source];
        let row = client
            .query_opt(
                "SELECT aggregate_type, aggregate_id, event_type, payload::text, traceparent
                   FROM outbox_events WHERE id = $1",
                &[&uuid],
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "reading the outbox of {source}: {}",
                    platform::db::describe(&e)
                )
            })?;
        if let Some(r) = row {
            return Ok(Some((
                source,
                OutboxEvent {
                    id: id.to_string(),
                    aggregate_type: r.get(0),
                    aggregate_id: r.get(1),
                    event_type: r.get(2),
                    payload: r.get(3),
                    traceparent: r.get(4),
                },
            )));
        }
    }
    Ok(None)
}

pub fn render_redrive(results: &[Redriven], dry_run: bool) -> String {
    let mut t = Table::new(["EVENT ID", "DEAD-LETTER TOPIC", "RESULT"]);
    for r in results {
        let result = match &r.outcome {
            Outcome::Redriven(topic) if dry_run => format!("would publish to {topic}"),
            Outcome::Redriven(topic) => format!("published to {topic}"),
            Outcome::AlreadyRedriven => "already redriven".into(),
            Outcome::DeliveredAlready => {
                "not redriven: the worker dead-lettered it after it was published".into()
            }
            Outcome::NotInOutbox => {
                "not redriven: its outbox row is gone (OUTBOX_RETENTION)".into()
            }
            Outcome::StillFails(why) => format!("not redriven: it still fails ({why})"),
        };
        t.row(vec![r.event_id.clone(), r.topic.clone(), result]);
    }
    let n = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Redriven(_)))
        .count();
    format!(
        "{}{n} of {} {}\n",
        t.render(),
        results.len(),
        if dry_run {
            "would be published"
        } else {
            "published"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(id: &str, origin: &str, reason: &str, millis: i64) -> DeadLetter {
        DeadLetter {
            topic: "resource.created.dlq".into(),
            partition: 0,
            offset: 7,
            timestamp: None,
            event_id: Some(id.into()),
            event_type: Some("resource.created".into()),
            key: Some("k".into()),
            reason: reason.into(),
            origin: origin.into(),
            headers: BTreeMap::new(),
            payload_bytes: 0,
            millis: Some(millis),
        }
    }

    #[test]
    fn filters_by_id_reason_and_time() {
        let d = letter("a", "cdc-relay", "too_large: the record would take…", 1_000);
        let all = Filter {
            ids: vec![],
            reason: None,
            since: None,
            until: None,
        };
        assert!(all.keeps(&d));
        assert!(Filter {
            ids: vec!["a".into()],
            ..all.clone()
        }
        .keeps(&d));
        assert!(!Filter {
            ids: vec!["b".into()],
            ..all.clone()
        }
        .keeps(&d));
        assert!(Filter {
            reason: Some("too_large".into()),
            ..all.clone()
        }
        .keeps(&d));
        assert!(!Filter {
            reason: Some("schema".into()),
            ..all.clone()
        }
        .keeps(&d));
        let at = |ms| chrono::DateTime::from_timestamp_millis(ms);
        assert!(Filter {
            since: at(1_000),
            until: at(1_001),
            ..all.clone()
        }
        .keeps(&d));
        assert!(!Filter {
            since: at(1_001),
            ..all.clone()
        }
        .keeps(&d));
        assert!(!Filter {
            until: at(1_000),
            ..all
        }
        .keeps(&d));
    }

    #[test]
    fn an_event_on_the_log_or_dead_lettered_by_the_worker_is_never_published_again() {
        let done: HashSet<String> = ["a".to_string()].into();
        assert_eq!(
            triage(&letter("a", "cdc-relay", "x", 0), &done),
            Some(Outcome::AlreadyRedriven)
        );
        assert_eq!(
            triage(&letter("b", "worker", "x", 0), &done),
            Some(Outcome::DeliveredAlready)
        );
        assert_eq!(triage(&letter("b", "cdc-relay", "x", 0), &done), None);
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        assert_eq!(
            parse_time("2026-12-05T10:00:00Z").unwrap().timestamp(),
            1_796_464_800
        );
        let two_hours_ago = parse_time("2h").unwrap();
        let diff = chrono::Utc::now() - two_hours_ago;
        assert!((7199..=7201).contains(&diff.num_seconds()));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
