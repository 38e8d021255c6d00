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

/// A transaction whose commit record ends at or below the checkpoint (the end of the last
/// published commit record) is in Kafka already: a restarted session drops it when Postgres
/// sends it again.
pub fn already_published(commit_end: Lsn, checkpoint: Lsn) -> bool {
    commit_end <= checkpoint
}

/// The same, known at the transaction's Begin, which carries where its commit record starts:
/// published if that is before the checkpoint. Not at it: a record ends where the next one
/// starts, so a commit record logged right after the last published one starts exactly at the
/// checkpoint (65 of 14,588 transactions of eight concurrent writers did), and that
/// transaction is not in Kafka. Postgres re-sends by the same rule. Comparing with `<=` here
/// dropped such a transaction whenever its Begin came after the checkpoint had moved: after a
/// restart, or in a session when Kafka acknowledged the previous commit before the Begin came.
pub fn published_before_begin(commit_start: Lsn, checkpoint: Lsn) -> bool {
    commit_start < checkpoint
}

/// Whose checkpoint a record is: the Postgres cluster (its system identifier, which a physical
/// standby shares, so a promoted standby finds its primary's checkpoints), the database, the
/// slot, and the topic namespace the events went to. Every relay of every deployment may share
/// one Kafka cluster and one checkpoint topic; the key and the transactional ids carry all of
/// it, so two deployments with the same slot names never read each other's checkpoint or fence
/// each other's producers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub system_id: String,
    pub database: String,
    pub slot: String,
    pub topic_prefix: String,
}

impl Identity {
    /// The checkpoint record's key: `system_id/database/slot`, then `/topic_prefix` when there
    /// is one. Unambiguous: no part but the last may hold a `/`, and topic names cannot.
    pub fn key(&self) -> String {
        let mut key = format!("{}/{}/{}", self.system_id, self.database, self.slot);
        if !self.topic_prefix.is_empty() {
            key.push('/');
            key.push_str(&self.topic_prefix);
        }
        key
    }

    /// The transactional ids of the source's two producers.
    pub fn transactional_ids(&self) -> [String; 2] {
        let key = self.key();
        [
            format!("kafkify-relay/{key}#0"),
            format!("kafkify-relay/{key}#1"),
        ]
    }

    /// Relays before checkpoints were namespaced keyed them by the slot name alone.
    pub fn legacy_key(&self) -> &str {
        &self.slot
    }

    /// …and named their producers after it.
    pub fn legacy_transactional_ids(&self) -> [String; 2] {
        [
            format!("kafkify-relay-{}", self.slot),
            format!("kafkify-relay-{}.1", self.slot),
        ]
    }
}

/// A source's checkpoint as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub lsn: Lsn,
    /// The Postgres timeline the relay streamed from when it wrote the record (not in legacy
    /// records).
    pub timeline: Option<u32>,
    /// When it was written (the record's Kafka timestamp, ms since the epoch): operators read
    /// a checkpoint's age from it. Not part of what the record says.
    pub written_ms: Option<i64>,
}

/// The record a commit writes: the LSN, and whose it is (for operators, and so that a reader
/// can check that the key meant what it says).
pub fn value(identity: &Identity, timeline: u32, lsn: Lsn) -> String {
    serde_json::json!({
        "lsn": lsn.to_string(),
        "system_id": identity.system_id,
        "timeline": timeline,
        "database": identity.database,
        "slot": identity.slot,
        "topic_prefix": identity.topic_prefix,
    })
    .to_string()
}

/// What a record says, and whether it belongs to `identity`: `None` when it is unreadable or
/// names another source (a legacy record names none).
pub fn parse(value: &str, identity: &Identity) -> Option<Checkpoint> {
    let v: serde_json::Value = serde_json::from_str(value).ok()?;
    let lsn = v.get("lsn")?.as_str()?.parse().ok()?;
    let field = |name: &str| v.get(name).map(|f| f.as_str());
    let fields = [
        ("system_id", identity.system_id.as_str()),
        ("database", identity.database.as_str()),
        ("slot", identity.slot.as_str()),
        ("topic_prefix", identity.topic_prefix.as_str()),
    ];
    for (name, ours) in fields {
        match field(name) {
            None => {}
            Some(Some(theirs)) if theirs == ours => {}
            Some(_) => return None,
        }
    }
    let timeline = match v.get("timeline") {
        None => None,
        Some(t) => Some(u32::try_from(t.as_u64()?).ok()?),
    };
    Some(Checkpoint {
        lsn,
        timeline,
        written_ms: None,
    })
}

/// What the checkpoint topic holds for a source: its own latest record, and the latest one
/// under its legacy key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub current: Option<Checkpoint>,
    pub legacy: Option<Checkpoint>,
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
    identity: Identity,
    limit: Duration,
) -> Result<Found, SinkError> {
    tokio::task::spawn_blocking(move || read(base, &topic, &identity, limit))
        .await
        .map_err(|e| SinkError::Task(e.to_string()))?
}

/// The source's latest checkpoint and, while it has none, the latest legacy one: windows are
/// read from the end until one holds the source's own key.
fn read(
    mut base: ClientConfig,
    topic: &str,
    identity: &Identity,
    limit: Duration,
) -> Result<Found, SinkError> {
    let key = identity.key();
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
    let mut found = Found::default();
    for (from, to) in windows(high) {
        let window = read_window(&consumer, topic, identity, from, to, start, limit)?;
        // The newest window holding a key wins: windows go back in time.
        found.legacy = found.legacy.or(window.legacy);
        if window.current.is_some() {
            found.current = window.current;
            return Ok(found);
        }
    }
    Ok(found)
}

/// The last checkpoints of the source between offsets `from` and `to`.
fn read_window(
    consumer: &BaseConsumer,
    topic: &str,
    identity: &Identity,
    from: i64,
    to: i64,
    start: Instant,
    limit: Duration,
) -> Result<Found, SinkError> {
    let key = identity.key();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from))?;
    consumer.assign(&tpl)?;
    let mut found = Found::default();
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
            return Ok(found);
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
                return Ok(found);
            }
            let slot = if msg.key() == Some(key.as_bytes()) {
                &mut found.current
            } else if msg.key() == Some(identity.legacy_key().as_bytes()) {
                &mut found.legacy
            } else {
                continue;
            };
            let value = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
            let mut checkpoint =
                parse(&value, identity).ok_or_else(|| SinkError::BadCheckpoint {
                    key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
                    value,
                })?;
            checkpoint.written_ms = msg.timestamp().to_millis();
            *slot = Some(checkpoint);
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

    fn identity(prefix: &str) -> Identity {
        Identity {
            system_id: "7311".into(),
            database: "rest".into(),
            slot: "kafkify_rest".into(),
            topic_prefix: prefix.into(),
        }
    }

    #[test]
    fn checkpoint_values_round_trip_and_name_their_source() {
        let ours = identity("");
        let v = value(&ours, 3, Lsn(0x2_0000_00ff));
        let back = parse(&v, &ours).unwrap();
        assert_eq!(back.lsn, Lsn(0x2_0000_00ff));
        assert_eq!(back.timeline, Some(3));
        let j: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(j["lsn"], "2/FF");
        assert_eq!(j["system_id"], "7311");
        assert_eq!(j["database"], "rest");
        assert_eq!(j["slot"], "kafkify_rest");
        // Another deployment's record is not ours, whatever key it came under.
        assert_eq!(parse(&v, &identity("staging.")), None);
        let other_cluster = Identity {
            system_id: "9999".into(),
            ..ours.clone()
        };
        assert_eq!(parse(&v, &other_cluster), None);
        assert_eq!(parse("garbage", &ours), None);
        assert_eq!(parse(r#"{"lsn":"nope"}"#, &ours), None);
    }

    #[test]
    fn legacy_records_carry_only_the_lsn() {
        let back = parse(r#"{"lsn":"2/FF"}"#, &identity("")).unwrap();
        assert_eq!(back.lsn, Lsn(0x2_0000_00ff));
        assert_eq!(back.timeline, None);
    }

    #[test]
    fn keys_and_transactional_ids_differ_for_every_part_of_the_identity() {
        let base = identity("");
        let variants = [
            base.clone(),
            identity("staging."),
            Identity {
                system_id: "9999".into(),
                ..base.clone()
            },
            Identity {
                database: "grpc".into(),
                ..base.clone()
            },
            Identity {
                slot: "kafkify_rest2".into(),
                ..base.clone()
            },
        ];
        let keys: std::collections::HashSet<_> = variants.iter().map(Identity::key).collect();
        assert_eq!(keys.len(), variants.len());
        let ids: std::collections::HashSet<_> = variants
            .iter()
            .flat_map(Identity::transactional_ids)
            .collect();
        assert_eq!(ids.len(), 2 * variants.len());
        assert_eq!(base.key(), "7311/rest/kafkify_rest");
        assert_eq!(
            identity("staging.").key(),
            "7311/rest/kafkify_rest/staging."
        );
        // Nothing new may collide with what the relays before namespacing used.
        for id in base.transactional_ids() {
            assert!(!base.legacy_transactional_ids().contains(&id));
        }
        assert_ne!(base.key(), base.legacy_key());
    }
}
