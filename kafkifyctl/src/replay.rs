//! `kafkifyctl replay`: a backfill for a new consumer. The outbox rows of a source still in its
//! table (OUTBOX_RETENTION), from a time on, are published again on their topics, each record
//! marked with `replay_run` (the run's id) and `replay_of` (`outbox`), through the same encoder
//! as the relay's.
//!
//! Resumable, and once per row within a run: the run's position (the last row's `created_at`
//! and id, rows being read in that order) is written on the replay log in the same Kafka
//! transaction as the rows up to it, under a transactional id of the run's own. `--resume RUN`
//! fences whatever a killed process of that run left open and goes on after the position.

use std::time::{Duration, Instant};

use cdc_relay::config::Config;
use cdc_relay::encode::Origin;
use cdc_relay::outbox::OutboxEvent;
use cdc_relay::pgoutput::Lsn;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::Message;
use serde::{Deserialize, Serialize};

use crate::kafka;
use crate::Exit;

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The source database whose outbox rows are replayed (one of RELAY_SOURCES).
    #[arg(long, required_unless_present = "resume")]
    pub source: Option<String>,
    /// Rows created at or after this time (RFC 3339, or a duration ago: 2h). An LSN cannot be
    /// used: rows do not keep the LSN of their insert.
    #[arg(long, value_parser = crate::dlq::parse_time, required_unless_present = "resume")]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Rows created before this time.
    #[arg(long, value_parser = crate::dlq::parse_time)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only rows whose event type publishes to this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Go on with a run that was interrupted (its id, printed when it started).
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["source", "since", "until", "topic"])]
    pub resume: Option<String>,
    /// Rows per Kafka transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
}

/// A run as the replay log keeps it: what it replays, and how far it got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub run: String,
    pub source: String,
    pub since: chrono::DateTime<chrono::Utc>,
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    pub topic: Option<String>,
    /// The last row published: its `created_at` (microseconds) and id.
    pub after: Option<(i64, String)>,
    pub published: u64,
    pub skipped: u64,
    pub done: bool,
}

/// What a run did.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub run: String,
    pub published: u64,
    /// Rows that would be dead-lettered (they were when first published): not replayed.
    pub skipped: u64,
    pub done: bool,
}

/// The replay log: `<checkpoint topic>.replays`, compacted, keyed by run id.
pub fn log_topic(config: &Config) -> String {
    format!("{}.replays", config.checkpoint_topic)
}

pub async fn run(config: &Config, args: &ReplayArgs) -> anyhow::Result<Summary> {
    let log = log_topic(config);
    kafka::ensure_compacted(config, &log).await?;
    let run = args
        .resume
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    // The run's own transactional id: creating the producer fences a killed process of the run
    // and aborts what it left open, so the state read next is the last committed one.
    let producer = kafka::transactional(
        config,
        "kafkifyctl-replay",
        &format!("kafkifyctl-replay/{run}"),
    )
    .await?;
    let mut state = match &args.resume {
        Some(_) => {
            let state = read_state(config, &log, &run).await?.ok_or_else(|| {
                Exit::usage(format!(
                    "no replay run {run} on {log}; start one with --since"
                ))
            })?;
            if state.done {
                eprintln!("kafkifyctl: replay {run} had finished; nothing to do");
                return Ok(summary(&state));
            }
            state
        }
        None => RunState {
            run,
            source: args
                .source
                .clone()
                .expect("clap requires --source without --resume"),
            since: args.since.expect("clap requires --since without --resume"),
            until: args.until,
            topic: args.topic.clone(),
            after: None,
            published: 0,
            skipped: 0,
            done: false,
        },
    };
    let source = crate::source(config, &state.source)?;
    let event_types: Option<Vec<String>> = state.topic.as_ref().map(|t| {
        schemas::EVENT_TYPES
            .iter()
            .filter(|e| config.topic(e) == *t)
            .map(|e| e.to_string())
            .collect()
    });
    if event_types.as_ref().is_some_and(Vec::is_empty) {
        return Err(Exit::usage(format!(
            "--topic {}: no event type publishes to it",
            state.topic.as_deref().unwrap_or("")
        ))
        .into());
    }
    eprintln!(
        "kafkifyctl: replay run {} (resume it with --resume {})",
        state.run, state.run
    );
    let schemas = cdc_relay::registry::SchemaCache::register_all(
        &config.registry.schema_registry_url.0,
        &config.topic_prefix,
    )
    .await?;
    let client = platform::db::connect(&config.source_url(&source)).await?;
    let total: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox_events
              WHERE created_at >= $1 AND ($2::timestamptz IS NULL OR created_at < $2)
                AND ($3::text[] IS NULL OR event_type = ANY($3))",
            &[&state.since, &state.until, &event_types],
        )
        .await
        .map_err(|e| anyhow::anyhow!(platform::db::describe(&e)))?
        .get(0);
    let progress = Progress::new(total as u64);
    loop {
        let (after_ts, after_id) = match &state.after {
            Some((ts, id)) => (Some(*ts), Some(id.parse::<uuid::Uuid>()?)),
            None => (None, None),
        };
        // Keyset order (created_at, id): stable while rows are added, resumable from a row.
        let rows = client
            .query(
                "SELECT id, aggregate_type, aggregate_id, event_type, payload::text, traceparent,
                        ((extract(epoch FROM created_at) * 1000000)::numeric)::bigint
                   FROM outbox_events
                  WHERE created_at >= $1 AND ($2::timestamptz IS NULL OR created_at < $2)
                    AND ($3::text[] IS NULL OR event_type = ANY($3))
                    AND ($4::bigint IS NULL
                         OR (created_at, id) > ('epoch'::timestamptz + $4 * interval '1 microsecond', $5))
                  ORDER BY created_at, id LIMIT $6",
                &[&state.since, &state.until, &event_types, &after_ts, &after_id, &i64::from(args.batch)],
            )
            .await
            .map_err(|e| anyhow::anyhow!(platform::db::describe(&e)))?;
        if rows.is_empty() {
            break;
        }
        producer.begin_transaction()?;
        for r in &rows {
            let id: uuid::Uuid = r.get(0);
            let created: i64 = r.get(6);
            let event = OutboxEvent {
                id: id.to_string(),
                aggregate_type: r.get(1),
                aggregate_id: r.get(2),
                event_type: r.get(3),
                payload: r.get(4),
                traceparent: r.get(5),
            };
            // Rows carry no LSN; the write time stands for the commit time.
            let origin = Origin {
                lsn: Lsn(0),
                commit_ts_micros: created,
            };
            let record = cdc_relay::record::build(config, &schemas, &source.0, &event, origin);
            state.after = Some((created, event.id.clone()));
            if record.dead_letter.is_some() {
                state.skipped += 1;
                continue;
            }
            // Rows carry no LSN: the replayed record has none.
            kafka::send(
                &producer,
                &record,
                &["source_lsn"],
                &[("replay_run", &state.run), ("replay_of", "outbox")],
            )?;
            state.published += 1;
        }
        write_state(&producer, &log, &state)?;
        kafka::commit(&producer).await?;
        progress.show(state.published + state.skipped);
    }
    state.done = true;
    producer.begin_transaction()?;
    write_state(&producer, &log, &state)?;
    kafka::commit(&producer).await?;
    progress.finish();
    Ok(summary(&state))
}

fn summary(state: &RunState) -> Summary {
    Summary {
        run: state.run.clone(),
        published: state.published,
        skipped: state.skipped,
        done: state.done,
    }
}

fn write_state(producer: &FutureProducer, log: &str, state: &RunState) -> anyhow::Result<()> {
    let value = serde_json::to_vec(state)?;
    producer
        .send_result(
            FutureRecord::to(log)
                .key(state.run.as_bytes())
                .payload(&value),
        )
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// The run's last committed state on the log. Read only once the run's producer exists: its
/// `init_transactions` aborted what a killed process of the run left open, whose state record
/// would otherwise be seen once aborted.
async fn read_state(config: &Config, log: &str, run: &str) -> anyhow::Result<Option<RunState>> {
    let run = run.to_string();
    kafka::read_all(config, log, None, move |found, msg| {
        if msg.key() == Some(run.as_bytes()) {
            if let Some(state) = msg.payload().and_then(|p| serde_json::from_slice(p).ok()) {
                *found = Some(state);
            }
        }
    })
    .await
}

/// Progress on stderr: a bar redrawn in place on a terminal, a line every few seconds when
/// stderr is a file or a pipe.
struct Progress {
    total: u64,
    tty: bool,
    started: Instant,
    last: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        use std::io::IsTerminal;
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: std::cell::Cell::new(Instant::now()),
        }
    }

    fn show(&self, done: u64) {
        let line = bar(done, self.total, self.started.elapsed());
        if self.tty {
            eprint!("\r{line}");
        } else if self.last.get().elapsed() >= Duration::from_secs(2) {
            eprintln!("{line}");
            self.last.set(Instant::now());
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// `[#########...........]  450/1000  45%  1,234/s`. Pure.
pub fn bar(done: u64, total: u64, elapsed: Duration) -> String {
    let total = total.max(done).max(1);
    let filled = (done * 30 / total) as usize;
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    format!(
        "[{}{}] {done}/{total} {:>3}% {rate:.0}/s",
        "#".repeat(filled),
        ".".repeat(30 - filled),
        done * 100 / total
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_share_done() {
        assert_eq!(
            bar(15, 30, Duration::from_secs(1)),
            format!("[{}{}] 15/30  50% 15/s", "#".repeat(15), ".".repeat(15))
        );
        // More rows than counted (written since): the bar stays full, never overflows.
        assert!(bar(40, 30, Duration::from_secs(1)).starts_with(&format!("[{}]", "#".repeat(30))));
    }

    #[test]
    fn a_run_state_reads_back_as_written() {
        let s = RunState {
            run: "r".into(),
            source: "rest".into(),
            since: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            until: None,
            topic: Some("resource.created".into()),
            after: Some((1_700_000_000_000_001, "id".into())),
            published: 3,
            skipped: 1,
            done: false,
        };
        let back: RunState = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
