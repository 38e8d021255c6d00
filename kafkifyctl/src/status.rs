//! `kafkifyctl status`: per source, its slot, the relay's checkpoint, how far behind it is and
//! whether it is stalled (and why); then the dead-letter topics and the consumer groups' lag.
//! What is read is gathered first ([`SourceFacts`]); what it means is decided by [`assess`],
//! which is pure.

use std::time::Duration;

use cdc_relay::checkpoint::{self, Checkpoint};
use cdc_relay::config::{Config, Delivery, Identifier};
use cdc_relay::pgoutput::Lsn;
use serde::Serialize;

use crate::kafka;
use crate::table::{self, Table};

/// What Postgres says of a source's slot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SlotFacts {
    pub active: bool,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost` (pg_replication_slots.wal_status).
    pub wal_status: Option<String>,
    /// Bytes of WAL that may still be written before the slot loses what it needs
    /// (`safe_wal_size`); `None` when `max_slot_wal_keep_size` is unlimited.
    pub safe_wal_size: Option<i64>,
}

/// Everything read about one source, before any judgement.
#[derive(Clone, Debug, Default)]
pub struct SourceFacts {
    pub source: String,
    pub slot_name: String,
    /// Why Postgres could not be read, if it could not.
    pub postgres_error: Option<String>,
    /// The server asked: `host:port`, and whether it is in recovery.
    pub server: Option<String>,
    pub current_lsn: Option<Lsn>,
    /// `None`: no such slot.
    pub slot: Option<SlotFacts>,
    pub checkpoint: Option<Checkpoint>,
    pub checkpoint_error: Option<String>,
    /// Seconds the oldest outbox row written after the checkpoint has waited (`None`: no such
    /// row, or no checkpoint to compare with).
    pub oldest_waiting: Option<f64>,
    /// The relay's `/ready` check of this source (`ok`, or why not) and its detail (the
    /// primary it streams from); `None` when the relay did not answer.
    pub relay_check: Option<String>,
    pub relay_detail: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Streaming,
    Stalled,
    Unknown,
}

/// A source as the operator reads it.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub source: String,
    pub slot: String,
    pub state: State,
    /// Why it is stalled or unknown.
    pub reason: Option<String>,
    pub primary: Option<String>,
    pub slot_active: Option<bool>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub wal_status: Option<String>,
    /// WAL the slot keeps on the server (current position − restart_lsn).
    pub retained_wal_bytes: Option<i64>,
    /// WAL that may still be written before the slot is lost; `None`: unlimited.
    pub headroom_bytes: Option<i64>,
    pub checkpoint_lsn: Option<String>,
    pub checkpoint_age_seconds: Option<f64>,
    /// WAL between what Kafka holds (the checkpoint, or the slot's confirmed position when
    /// that is further) and the server's position.
    pub lag_bytes: Option<i64>,
    /// How long the oldest outbox row not covered by the checkpoint has waited: 0 when none.
    pub lag_seconds: Option<f64>,
}

/// Turns facts into a status. Pure.
pub fn assess(f: &SourceFacts, now_ms: i64) -> SourceStatus {
    let lsn = |s: &Option<String>| s.as_deref().and_then(|s| s.parse::<Lsn>().ok());
    let diff = |a: Option<Lsn>, b: Option<Lsn>| match (a, b) {
        (Some(a), Some(b)) => Some(a.0 as i64 - b.0 as i64),
        _ => None,
    };
    let slot = f.slot.as_ref();
    // Postgres is told a position only once Kafka holds everything before it, and keepalives
    // move it over other databases' WAL while the checkpoint of an idle source stays put: the
    // further of the two is what Kafka covers.
    let covered = f
        .checkpoint
        .as_ref()
        .map(|c| c.lsn)
        .max(slot.and_then(|s| lsn(&s.confirmed_flush_lsn)));
    let lag_bytes = diff(f.current_lsn, covered).map(|d| d.max(0));
    let lag_seconds = match (lag_bytes, &f.checkpoint) {
        (Some(0), _) => Some(0.0),
        (_, Some(_)) => Some(f.oldest_waiting.unwrap_or(0.0)),
        _ => None,
    };
    let reason = if let Some(e) = &f.postgres_error {
        Some((State::Unknown, format!("cannot read Postgres: {e}")))
    } else if slot.is_none() {
        let mut r = format!("slot {} is missing", f.slot_name);
        if let Some(c) = &f.checkpoint {
            r.push_str(&format!(
                "; Kafka holds a checkpoint at {}: the relay refuses to create it (README, Failover)",
                c.lsn
            ));
        }
        Some((State::Stalled, r))
    } else if let Some(check) = f.relay_check.as_deref().filter(|c| *c != "ok") {
        Some((State::Stalled, format!("relay: {check}")))
    } else if slot.and_then(|s| s.wal_status.as_deref()) == Some("lost") {
        Some((
            State::Stalled,
            format!(
                "slot {} lost WAL it needed (max_slot_wal_keep_size); events in it cannot be read",
                f.slot_name
            ),
        ))
    } else if slot.is_some_and(|s| !s.active) {
        Some((
            State::Stalled,
            match &f.relay_check {
                None => "no relay streams the slot, and the relay's /ready did not answer".into(),
                Some(_) => "no relay streams the slot".into(),
            },
        ))
    } else {
        None
    };
    let (state, reason) = match reason {
        Some((state, r)) => (state, Some(r)),
        None => (State::Streaming, None),
    };
    SourceStatus {
        source: f.source.clone(),
        slot: f.slot_name.clone(),
        state,
        reason,
        primary: f.relay_detail.clone().or_else(|| f.server.clone()),
        slot_active: slot.map(|s| s.active),
        confirmed_flush_lsn: slot.and_then(|s| s.confirmed_flush_lsn.clone()),
        restart_lsn: slot.and_then(|s| s.restart_lsn.clone()),
        wal_status: slot.and_then(|s| s.wal_status.clone()),
        retained_wal_bytes: diff(f.current_lsn, slot.and_then(|s| lsn(&s.restart_lsn)))
            .map(|d| d.max(0)),
        headroom_bytes: slot.and_then(|s| s.safe_wal_size),
        checkpoint_lsn: f.checkpoint.as_ref().map(|c| c.lsn.to_string()),
        checkpoint_age_seconds: f
            .checkpoint
            .as_ref()
            .and_then(|c| c.written_ms)
            .map(|w| (now_ms - w).max(0) as f64 / 1000.0),
        lag_bytes,
        lag_seconds,
    }
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub sources: Vec<SourceStatus>,
    pub dead_letters: Vec<kafka::TopicCount>,
    pub consumer_groups: Vec<kafka::GroupLag>,
    /// What could not be read (Kafka, the relay), so an empty list is not taken for "none".
    pub errors: Vec<String>,
}

impl Report {
    pub fn healthy(&self) -> bool {
        self.sources.iter().all(|s| s.state == State::Streaming)
    }

    pub fn render(&self) -> String {
        let mut t = Table::new([
            "SOURCE",
            "STATE",
            "SLOT",
            "ACTIVE",
            "CHECKPOINT",
            "AGE",
            "LAG",
            "LAG(S)",
            "RETAINED",
            "HEADROOM",
            "PRIMARY",
        ]);
        for s in &self.sources {
            t.row(vec![
                s.source.clone(),
                format!("{:?}", s.state).to_lowercase(),
                s.slot.clone(),
                table::or_dash(s.slot_active.map(|a| if a { "yes" } else { "no" })),
                table::or_dash(s.checkpoint_lsn.clone()),
                table::or_dash(s.checkpoint_age_seconds.map(table::seconds)),
                table::or_dash(s.lag_bytes.map(table::bytes)),
                table::or_dash(s.lag_seconds.map(table::seconds)),
                table::or_dash(s.retained_wal_bytes.map(table::bytes)),
                s.headroom_bytes
                    .map_or_else(|| "unlimited".to_string(), table::bytes),
                table::or_dash(s.primary.clone()),
            ]);
        }
        let mut out = t.render();
        let reasons: Vec<String> = self
            .sources
            .iter()
            .filter_map(|s| s.reason.as_ref().map(|r| format!("{}: {r}\n", s.source)))
            .collect();
        if !reasons.is_empty() {
            out.push('\n');
            out.push_str(&reasons.concat());
        }
        out.push('\n');
        let mut dlq = Table::new(["DEAD-LETTER TOPIC", "RECORDS"]);
        for d in &self.dead_letters {
            dlq.row(vec![d.topic.clone(), d.records_text()]);
        }
        out.push_str(&dlq.render());
        out.push('\n');
        let mut groups = Table::new(["CONSUMER GROUP", "TOPIC", "PARTITIONS", "LAG"]);
        for g in &self.consumer_groups {
            groups.row(vec![
                g.group.clone(),
                g.topic.clone(),
                g.partitions.to_string(),
                g.lag.to_string(),
            ]);
        }
        if groups.is_empty() {
            out.push_str("CONSUMER GROUP: none with committed offsets\n");
        } else {
            out.push_str(&groups.render());
        }
        for e in &self.errors {
            out.push_str(&format!("\nnot read: {e}\n"));
        }
        out
    }
}

/// Reads everything `status` shows.
pub async fn gather(config: &Config, relay_url: &str) -> Report {
    let mut errors = Vec::new();
    let ready = match relay_ready(relay_url).await {
        Ok(r) => Some(r),
        Err(e) => {
            errors.push(format!("the relay's /ready ({relay_url}/ready): {e}"));
            None
        }
    };
    let mut sources = Vec::new();
    for source in &config.sources {
        let mut facts = read_source(config, source).await;
        if let Some(ready) = &ready {
            let name = format!("source {}", source.0);
            facts.relay_check = ready["checks"][&name].as_str().map(str::to_string);
            facts.relay_detail = ready["details"][&name].as_str().map(str::to_string);
        }
        sources.push(assess(&facts, chrono::Utc::now().timestamp_millis()));
    }
    let dead_letters = match kafka::dead_letter_counts(config).await {
        Ok(d) => d,
        Err(e) => {
            errors.push(format!("dead-letter topics: {e}"));
            Vec::new()
        }
    };
    let consumer_groups = match kafka::group_lags(config).await {
        Ok(g) => g,
        Err(e) => {
            errors.push(format!("consumer groups: {e}"));
            Vec::new()
        }
    };
    Report {
        sources,
        dead_letters,
        consumer_groups,
        errors,
    }
}

/// The relay's `/ready` body: its `checks` and `details`, keyed `source <name>` among others.
pub async fn relay_ready(base: &str) -> Result<serde_json::Value, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    // /ready answers 503 with the same body when a check fails: the body is what we want.
    let resp = http
        .get(format!("{base}/ready"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    resp.json().await.map_err(|e| e.to_string())
}

async fn read_source(config: &Config, source: &Identifier) -> SourceFacts {
    let slot_name = config.slot(source);
    let mut facts = SourceFacts {
        source: source.0.clone(),
        slot_name: slot_name.clone(),
        ..SourceFacts::default()
    };
    let client = match platform::db::connect(&config.source_url(source)).await {
        Ok(c) => c,
        Err(e) => {
            facts.postgres_error = Some(e.to_string());
            return facts;
        }
    };
    let row = client
        .query_one(
            "SELECT pg_current_wal_lsn()::text,
                    (SELECT system_identifier::text FROM pg_control_system()),
                    coalesce(host(inet_server_addr()), 'local') || ':' || coalesce(inet_server_port(), 0)",
            &[],
        )
        .await;
    let system_id: String = match row {
        Ok(row) => {
            facts.current_lsn = row.get::<_, String>(0).parse().ok();
            facts.server = Some(format!("primary {}", row.get::<_, String>(2)));
            row.get(1)
        }
        Err(e) => {
            facts.postgres_error = Some(platform::db::describe(&e));
            return facts;
        }
    };
    match client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, restart_lsn::text, wal_status,
                    safe_wal_size::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot_name],
        )
        .await
    {
        Ok(row) => {
            facts.slot = row.map(|r| SlotFacts {
                active: r.get(0),
                confirmed_flush_lsn: r.get(1),
                restart_lsn: r.get(2),
                wal_status: r.get(3),
                safe_wal_size: r.get(4),
            })
        }
        Err(e) => {
            facts.postgres_error = Some(platform::db::describe(&e));
            return facts;
        }
    }
    if config.delivery == Delivery::ExactlyOnce {
        let identity = config.identity(source, system_id);
        match checkpoint::read_async(
            config.kafka.client_config("kafkifyctl"),
            config.checkpoint_topic.clone(),
            identity,
            Duration::from_secs(30),
        )
        .await
        {
            Ok(found) => facts.checkpoint = found.current.or(found.legacy),
            Err(e) => facts.checkpoint_error = Some(e.to_string()),
        }
    }
    if let Some(written) = facts.checkpoint.as_ref().and_then(|c| c.written_ms) {
        let since = chrono::DateTime::from_timestamp_millis(written).unwrap_or_default();
        // created_at is the writing transaction's start, so this is a lower bound: a row that
        // started before the checkpoint and committed after it is not counted.
        let waiting = client
            .query_one(
                "SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8
                   FROM outbox_events WHERE created_at > $1",
                &[&since],
            )
            .await;
        if let Ok(row) = waiting {
            facts.oldest_waiting = row.get(0);
        }
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streaming() -> SourceFacts {
        SourceFacts {
            source: "rest".into(),
            slot_name: "kafkify_rest".into(),
            server: Some("primary 127.0.0.1:5432".into()),
            current_lsn: Some(Lsn(0x3000)),
            slot: Some(SlotFacts {
                active: true,
                confirmed_flush_lsn: Some("0/2000".into()),
                restart_lsn: Some("0/1000".into()),
                wal_status: Some("reserved".into()),
                safe_wal_size: None,
            }),
            checkpoint: Some(Checkpoint {
                lsn: Lsn(0x2800),
                timeline: Some(1),
                written_ms: Some(10_000),
            }),
            oldest_waiting: Some(0.25),
            relay_check: Some("ok".into()),
            relay_detail: Some("primary 127.0.0.1:5432, streaming".into()),
            ..SourceFacts::default()
        }
    }

    #[test]
    fn lag_is_the_wal_past_the_checkpoint_and_the_wait_of_the_oldest_row_after_it() {
        let s = assess(&streaming(), 12_500);
        assert_eq!(s.state, State::Streaming);
        assert_eq!(s.reason, None);
        assert_eq!(s.lag_bytes, Some(0x800));
        assert_eq!(s.lag_seconds, Some(0.25));
        assert_eq!(s.retained_wal_bytes, Some(0x2000));
        assert_eq!(s.checkpoint_age_seconds, Some(2.5));
        assert_eq!(
            s.primary.as_deref(),
            Some("primary 127.0.0.1:5432, streaming")
        );
    }

    #[test]
    fn a_source_caught_up_has_no_lag_whatever_the_rows_say() {
        let mut f = streaming();
        f.current_lsn = Some(Lsn(0x2800));
        f.oldest_waiting = Some(99.0);
        let s = assess(&f, 12_500);
        assert_eq!((s.lag_bytes, s.lag_seconds), (Some(0), Some(0.0)));
    }

    #[test]
    fn an_idle_sources_old_checkpoint_is_covered_by_the_slots_confirmed_position() {
        let mut f = streaming();
        f.checkpoint.as_mut().unwrap().lsn = Lsn(0);
        f.slot.as_mut().unwrap().confirmed_flush_lsn = Some("0/2F00".into());
        assert_eq!(assess(&f, 12_500).lag_bytes, Some(0x100));
    }

    #[test]
    fn a_missing_slot_with_a_checkpoint_is_stalled_and_says_the_relay_refuses_it() {
        let mut f = streaming();
        f.slot = None;
        let s = assess(&f, 12_500);
        assert_eq!(s.state, State::Stalled);
        let r = s.reason.unwrap();
        assert!(r.contains("slot kafkify_rest is missing"), "{r}");
        assert!(r.contains("checkpoint at 0/2800"), "{r}");
    }

    #[test]
    fn the_relays_own_reason_is_shown_before_the_slots_state() {
        let mut f = streaming();
        f.relay_check = Some("slot kafkify_rest stalled at 0/2900: 3 sessions…".into());
        f.slot.as_mut().unwrap().active = false;
        let s = assess(&f, 12_500);
        assert_eq!(s.state, State::Stalled);
        assert!(s
            .reason
            .unwrap()
            .starts_with("relay: slot kafkify_rest stalled at 0/2900"));
    }

    #[test]
    fn an_inactive_or_lost_slot_is_stalled() {
        let mut f = streaming();
        f.slot.as_mut().unwrap().active = false;
        f.relay_check = None;
        let s = assess(&f, 0);
        assert_eq!(s.state, State::Stalled);
        assert!(s.reason.unwrap().contains("did not answer"));
        let mut f = streaming();
        f.slot.as_mut().unwrap().wal_status = Some("lost".into());
        assert!(assess(&f, 0).reason.unwrap().contains("lost WAL"));
    }

    #[test]
    fn postgres_out_of_reach_is_unknown_not_stalled() {
        let f = SourceFacts {
            source: "rest".into(),
            slot_name: "kafkify_rest".into(),
            postgres_error: Some("connection refused".into()),
            ..SourceFacts::default()
        };
        let s = assess(&f, 0);
        assert_eq!(s.state, State::Unknown);
        assert_eq!(s.lag_bytes, None);
    }
}
