//! The checkpoint: each source's last commit LSN in Kafka, written in the same Kafka
//! transaction as the events up to it (`producer.rs` appends it), read back when a session
//! starts, and the rule that skips what Postgres re-sends at or below it (`machine.rs` applies
//! it). See docs/ARCHITECTURE.md, "Exactly-once into Kafka".

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::pgoutput::Lsn;
use crate::producer::SinkError;

/// Reading the checkpoint may have to wait for another producer's transaction on the topic to
/// end, which the broker guarantees within that producer's transaction timeout plus its
/// expiry check (`transaction.abort.timed.out.transaction.cleanup.interval.ms`, 10 s).
pub fn read_limit(transaction_timeout: Duration) -> Duration {
    transaction_timeout + Duration::from_secs(30)
}

/// A transaction whose commit LSN is at or below the checkpoint is in Kafka already: a
/// restarted session drops it when Postgres sends it again.
pub fn already_published(commit_end: Lsn, checkpoint: Lsn) -> bool {
    commit_end <= checkpoint
}

pub fn value(lsn: Lsn) -> String {
    format!("{{\"lsn\":\"{lsn}\"}}")
}

/// Parses what [`value`] wrote.
pub fn parse(value: &str) -> Option<Lsn> {
    let v: serde_json::Value = serde_json::from_str(value).ok()?;
    v.get("lsn")?.as_str()?.parse().ok()
}

/// The ranges of offsets read to find a source's last checkpoint: the newest first, each ten
/// times the one before, down to offset 0. Every source shares the topic and its active
/// segment is never compacted, so reading from offset 0 made a restart slower the longer the
/// relay had run; the newest records hold a busy source's checkpoint.
pub fn windows(high: i64) -> impl Iterator<Item = (i64, i64)> {
    let mut to = high;
    let mut size = 1_000i64;
    std::iter::from_fn(move || {
        if to <= 0 {
            return None;
        }
        let from = (to - size).max(0);
        let window = (from, to);
        to = from;
        size = size.saturating_mul(10);
        Some(window)
    })
}

/// [`read`] off the async threads: it polls a blocking consumer.
pub async fn read_async(
    base: ClientConfig,
    topic: String,
    key: String,
    limit: Duration,
) -> Result<Option<Lsn>, SinkError> {
    tokio::task::spawn_blocking(move || read(base, &topic, &key, limit))
        .await
        .map_err(|e| SinkError::Task(e.to_string()))?
}

fn read(
    mut base: ClientConfig,
    topic: &str,
    key: &str,
    limit: Duration,
) -> Result<Option<Lsn>, SinkError> {
    let group = format!("kafkify-relay-checkpoint-{key}");
    base.set("group.id", group)
        .set("enable.auto.commit", "false");
    // The true end of the log, not the last stable offset a read_committed client is told:
    // every source shares this partition, and another source's open transaction (one a crash
    // left behind, until that source fences it) keeps the LSO below batches we committed later.
    // Stopping there would return an older checkpoint and re-publish what came after it.
    let end: BaseConsumer = base
        .clone()
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let (_, high) = end.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    drop(end);
    let consumer: BaseConsumer = base.set("isolation.level", "read_committed").create()?;
    let start = Instant::now();
    for (from, to) in windows(high) {
        if let Some(lsn) = read_window(&consumer, topic, key, from, to, start, limit)? {
            return Ok(Some(lsn));
        }
    }
    Ok(None)
}

/// The last checkpoint of `key` between offsets `from` and `to`.
fn read_window(
    consumer: &BaseConsumer,
    topic: &str,
    key: &str,
    from: i64,
    to: i64,
    start: Instant,
    limit: Duration,
) -> Result<Option<Lsn>, SinkError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from))?;
    consumer.assign(&tpl)?;
    let mut last = None;
    loop {
        // Read until our position passes `to`: with read_committed the position also moves
        // past aborted records and markers, and it gets there once every transaction open at
        // the start has ended.
        let position = consumer
            .position()?
            .find_partition(topic, 0)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(from);
        if position >= to {
            return Ok(last);
        }
        if start.elapsed() > limit {
            return Err(SinkError::CheckpointTimeout {
                topic: topic.to_string(),
                secs: limit.as_secs(),
            });
        }
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg?;
            if msg.offset() >= to {
                return Ok(last);
            }
            if msg.key() == Some(key.as_bytes()) {
                let value = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                last = Some(parse(&value).ok_or_else(|| SinkError::BadCheckpoint {
                    key: key.to_string(),
                    value,
                })?);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_go_back_from_the_end_growing_tenfold_and_cover_every_offset_once() {
        let w: Vec<_> = windows(123_456).collect();
        assert_eq!(
            w,
            vec![
                (122_456, 123_456),
                (112_456, 122_456),
                (12_456, 112_456),
                (0, 12_456)
            ]
        );
        assert_eq!(windows(0).count(), 0);
        assert_eq!(windows(5).collect::<Vec<_>>(), vec![(0, 5)]);
    }

    #[test]
    fn checkpoint_values_round_trip() {
        let v = value(Lsn(0x2_0000_00ff));
        assert_eq!(v, r#"{"lsn":"2/FF"}"#);
        assert_eq!(parse(&v), Some(Lsn(0x2_0000_00ff)));
        assert_eq!(parse("garbage"), None);
        assert_eq!(parse(r#"{"lsn":"nope"}"#), None);
    }
}
