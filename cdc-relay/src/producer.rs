//! The Kafka side of one source: a transactional producer (exactly-once) or an idempotent one
//! (at-least-once), and the checkpoint it commits with every batch.
//!
//! Exactly-once: every batch is one Kafka transaction holding the events of one or more whole
//! Postgres transactions plus a checkpoint record (slot name → commit LSN of the last of them)
//! on a compacted topic. After a restart the relay reads its checkpoint and skips what Postgres
//! re-sends up to it, so a crash between the Kafka commit and the Postgres acknowledgement
//! duplicates nothing.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::config::Delivery;
use crate::encode::KafkaRecord;
use crate::pgoutput::Lsn;

/// How long a transaction commit or abort may take before the batch counts as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("Kafka: delivery of a record failed: {0}")]
    Delivery(KafkaError),
    #[error("checkpoint record for `{key}` is unreadable: {value:?}")]
    BadCheckpoint { key: String, value: String },
    #[error("checkpoint topic `{topic}` was not read to its end within {secs} s")]
    CheckpointTimeout { topic: String, secs: u64 },
    #[error("Kafka worker task failed: {0}")]
    Task(String),
}

pub struct Sink {
    producer: FutureProducer,
    delivery: Delivery,
    checkpoint_topic: String,
    checkpoint_key: String,
}

impl Sink {
    /// Creates the producer; in exactly-once mode `init_transactions` fences any earlier
    /// producer with the same transactional id and aborts its open transaction.
    pub async fn create(
        base: ClientConfig,
        delivery: Delivery,
        checkpoint_topic: &str,
        checkpoint_key: &str,
    ) -> Result<Sink, SinkError> {
        let mut config = base;
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
            .set("compression.type", "lz4")
            // Java clients' partitioner, so keys land where any other producer would put them.
            .set("partitioner", "murmur2_random")
            .set("queue.buffering.max.messages", "500000")
            .set("message.timeout.ms", "60000")
            // The broker answers CONCURRENT_TRANSACTIONS while it is still writing the previous
            // transaction's markers; librdkafka's default 100 ms back-off on that retry would add
            // 100 ms to every batch.
            .set("retry.backoff.ms", "5")
            .set("retry.backoff.max.ms", "100")
            // Small control requests (AddPartitionsToTxn, EndTxn) must not wait for Nagle.
            .set("socket.nagle.disable", "true");
        if delivery == Delivery::ExactlyOnce {
            config
                .set(
                    "transactional.id",
                    format!("kafkify-relay-{checkpoint_key}"),
                )
                .set("transaction.timeout.ms", "60000");
        }
        let producer: FutureProducer = config.create()?;
        if delivery == Delivery::ExactlyOnce {
            let p = producer.clone();
            blocking(move || p.init_transactions(TXN_TIMEOUT)).await??;
        }
        Ok(Sink {
            producer,
            delivery,
            checkpoint_topic: checkpoint_topic.to_string(),
            checkpoint_key: checkpoint_key.to_string(),
        })
    }

    /// The last LSN this source committed to Kafka, read from the checkpoint topic to its end
    /// (read_committed). `None` when the source has never committed, or in at-least-once mode.
    pub async fn read_checkpoint(&self, base: ClientConfig) -> Result<Option<Lsn>, SinkError> {
        if self.delivery != Delivery::ExactlyOnce {
            return Ok(None);
        }
        let topic = self.checkpoint_topic.clone();
        let key = self.checkpoint_key.clone();
        blocking(move || read_checkpoint(base, &topic, &key)).await?
    }

    /// Publishes one batch; returns once Kafka has durably accepted all of it (and, exactly
    /// once, committed it together with the checkpoint `upto`).
    pub async fn publish(&self, records: Vec<KafkaRecord>, upto: Lsn) -> Result<(), SinkError> {
        match self.delivery {
            Delivery::AtLeastOnce => self.send_all(records.iter()).await,
            Delivery::ExactlyOnce => {
                let checkpoint = KafkaRecord {
                    topic: self.checkpoint_topic.clone(),
                    key: self.checkpoint_key.clone(),
                    value: checkpoint_value(upto).into_bytes(),
                    headers: Vec::new(),
                    span: None,
                };
                // begin_transaction only changes local state; it does not block.
                self.producer.begin_transaction()?;
                let sent = self
                    .send_all(records.iter().chain(std::iter::once(&checkpoint)))
                    .await;
                let p = self.producer.clone();
                let result = match sent {
                    Ok(()) => blocking(move || p.commit_transaction(TXN_TIMEOUT))
                        .await?
                        .map_err(SinkError::from),
                    Err(e) => Err(e),
                };
                if result.is_err() {
                    // Best effort: a fatal error (e.g. fenced) cannot abort; the session restarts
                    // with a new producer either way, and nothing of this transaction is visible.
                    let p = self.producer.clone();
                    let _ = blocking(move || p.abort_transaction(TXN_TIMEOUT)).await;
                }
                result
            }
        }
    }

    /// Enqueues every record, then waits for every delivery report. Waiting here, rather than
    /// letting `commit_transaction` flush, matters: its flush only sees deliveries when the
    /// producer's polling thread next wakes, which adds up to 100 ms to every transaction.
    async fn send_all(&self, records: impl Iterator<Item = &KafkaRecord>) -> Result<(), SinkError> {
        let mut pending = Vec::new();
        let mut spans = Vec::new();
        for r in records {
            spans.push(r.span.as_ref());
            loop {
                match self.producer.send_result(future_record(r)) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
        }
        for (delivery, span) in pending.into_iter().zip(spans) {
            match delivery.await {
                Ok(Ok(d)) => {
                    if let Some(span) = span {
                        span.record(
                            "messaging.destination.partition.id",
                            d.partition.to_string(),
                        );
                        span.record("messaging.kafka.offset", d.offset);
                    }
                }
                Ok(Err((e, _))) => return Err(SinkError::Delivery(e)),
                Err(_) => return Err(SinkError::Task("delivery report dropped".into())),
            }
        }
        Ok(())
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SinkError::Task(e.to_string()))
}

fn future_record(r: &KafkaRecord) -> FutureRecord<'_, str, [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    FutureRecord::to(&r.topic)
        .key(r.key.as_str())
        .payload(r.value.as_slice())
        .headers(headers)
}

fn checkpoint_value(lsn: Lsn) -> String {
    format!("{{\"lsn\":\"{lsn}\"}}")
}

/// Parses what [`checkpoint_value`] wrote.
pub fn parse_checkpoint(value: &str) -> Option<Lsn> {
    let v: serde_json::Value = serde_json::from_str(value).ok()?;
    v.get("lsn")?.as_str()?.parse().ok()
}

fn read_checkpoint(
    mut base: ClientConfig,
    topic: &str,
    key: &str,
) -> Result<Option<Lsn>, SinkError> {
    const LIMIT: Duration = Duration::from_secs(30);
    let consumer: BaseConsumer = base
        .set("group.id", format!("kafkify-relay-checkpoint-{key}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let (_, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    if high == 0 {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let start = Instant::now();
    let mut last = None;
    loop {
        // Read until our position passes the high watermark seen at the start: with
        // read_committed the position also moves past aborted records and markers.
        let position = consumer
            .position()?
            .find_partition(topic, 0)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(0);
        if position >= high {
            return Ok(last);
        }
        if start.elapsed() > LIMIT {
            return Err(SinkError::CheckpointTimeout {
                topic: topic.to_string(),
                secs: LIMIT.as_secs(),
            });
        }
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg?;
            if msg.key() == Some(key.as_bytes()) {
                let value = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                last = Some(
                    parse_checkpoint(&value).ok_or_else(|| SinkError::BadCheckpoint {
                        key: key.to_string(),
                        value,
                    })?,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_values_round_trip() {
        let v = checkpoint_value(Lsn(0x2_0000_00ff));
        assert_eq!(v, r#"{"lsn":"2/FF"}"#);
        assert_eq!(parse_checkpoint(&v), Some(Lsn(0x2_0000_00ff)));
        assert_eq!(parse_checkpoint("garbage"), None);
        assert_eq!(parse_checkpoint(r#"{"lsn":"nope"}"#), None);
    }
}
