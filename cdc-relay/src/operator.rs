//! Transactions an operator told the relay to get past (`kafkifyctl skip`). Each is a record on
//! `<RELAY_CHECKPOINT_TOPIC>.skips` (compacted), keyed `<checkpoint key>@<LSN>`, where the LSN
//! is the one a stalled source names (its transaction's commit LSN). Every session reads the
//! source's skips before it streams; the events of a skipped transaction are dead-lettered
//! without their payload (`record::operator_skipped`) in the same Kafka transaction as the
//! checkpoint past it, so nothing vanishes and the skip happens once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::checkpoint::Identity;
use crate::pgoutput::Lsn;
use crate::producer::SinkError;

/// The topic of the skips of every source that checkpoints on `checkpoint_topic`.
pub fn topic(checkpoint_topic: &str) -> String {
    format!("{checkpoint_topic}.skips")
}

/// The key of a skip: the source's checkpoint key, `@`, the transaction's LSN.
pub fn key(identity: &Identity, lsn: Lsn) -> String {
    format!("{}@{lsn}", identity.key())
}

/// The record an operator writes: what, why, when and who, for whoever lists skips later.
pub fn value(identity: &Identity, source: &str, lsn: Lsn, reason: &str, by: &str) -> String {
    serde_json::json!({
        "source": source,
        "database": identity.database,
        "slot": identity.slot,
        "system_id": identity.system_id,
        "lsn": lsn.to_string(),
        "reason": reason,
        "by": by,
        "at": chrono::Utc::now().to_rfc3339(),
    })
    .to_string()
}

/// The skip a record holds for `identity`: the LSN and the reason. Pure.
pub fn parse(key: &[u8], value: &[u8], identity: &Identity) -> Option<(Lsn, String)> {
    let key = std::str::from_utf8(key).ok()?;
    let lsn = key
        .strip_prefix(&format!("{}@", identity.key()))?
        .parse()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let reason = v.get("reason")?.as_str()?.to_string();
    Some((lsn, reason))
}

/// Every skip of the source, read to the end of the topic (none when it does not exist).
pub async fn read_async(
    base: ClientConfig,
    topic: String,
    identity: Identity,
    limit: Duration,
) -> Result<HashMap<Lsn, String>, SinkError> {
    tokio::task::spawn_blocking(move || read(base, &topic, &identity, limit))
        .await
        .map_err(|e| SinkError::Task(e.to_string()))?
}

fn read(
    mut base: ClientConfig,
    topic: &str,
    identity: &Identity,
    limit: Duration,
) -> Result<HashMap<Lsn, String>, SinkError> {
    base.set(
        "group.id",
        format!("kafkify-relay-skips-{}", identity.key()),
    )
    .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = base.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let exists = metadata
        .topics()
        .first()
        .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
    let mut skips = HashMap::new();
    if !exists {
        return Ok(skips);
    }
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    if high <= low {
        return Ok(skips);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let start = Instant::now();
    loop {
        if start.elapsed() > limit {
            return Err(SinkError::CheckpointTimeout {
                topic: topic.to_string(),
                secs: limit.as_secs(),
            });
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        if let (Some(k), Some(v)) = (msg.key(), msg.payload()) {
            if let Some((lsn, reason)) = parse(k, v, identity) {
                skips.insert(lsn, reason);
            }
        }
        if msg.offset() + 1 >= high {
            return Ok(skips);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(slot: &str) -> Identity {
        Identity {
            system_id: "7".into(),
            database: "rest".into(),
            slot: slot.into(),
            topic_prefix: String::new(),
        }
    }

    #[test]
    fn a_skip_is_read_back_by_its_own_source_only() {
        let ours = identity("kafkify_rest");
        let lsn = Lsn(0x1_0000_00A0);
        let k = key(&ours, lsn);
        assert_eq!(k, "7/rest/kafkify_rest@1/A0");
        let v = value(&ours, "rest", lsn, "poison at 3 a.m.", "ops");
        assert_eq!(
            parse(k.as_bytes(), v.as_bytes(), &ours),
            Some((lsn, "poison at 3 a.m.".to_string()))
        );
        // The slot kafkify_rest2 shares the prefix but not the key up to the `@`.
        assert_eq!(
            parse(k.as_bytes(), v.as_bytes(), &identity("kafkify_rest2")),
            None
        );
        assert_eq!(
            parse(b"7/rest/kafkify_rest@nope", v.as_bytes(), &ours),
            None
        );
    }
}
