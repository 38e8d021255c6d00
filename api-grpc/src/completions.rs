//! Consumes `task.completed` (Avro through the registry, read_committed) and records each
//! outcome. Offsets are committed only after the database commit, so a crash repeats at most
//! an already-applied (idempotent) update. A registry or database outage is waited out, never
//! skipped. A record that can never be decoded is logged, counted and passed over: the APIs
//! never produce to Kafka, and blocking the partition on it would stop every later completion.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::FutureExt;
use platform::retry::{retry, Backoff};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone)]
pub struct ConsumerMetrics {
    events: Family<OutcomeLabel, Counter>,
    batch_records: Histogram,
    lag: platform::kafka::LagGauge,
}

impl ConsumerMetrics {
    pub fn register(registry: &mut Registry) -> ConsumerMetrics {
        let m = ConsumerMetrics {
            events: Family::default(),
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            lag: Family::default(),
        };
        registry.register(
            "completions",
            "task.completed events by outcome: applied, duplicate (already final), unknown_task, undecodable",
            m.events.clone(),
        );
        registry.register(
            "completion_batch_records",
            "task.completed events recorded per database transaction",
            m.batch_records.clone(),
        );
        registry.register(
            "consumer_lag",
            "Records behind the end of each partition of task.completed",
            m.lag.clone(),
        );
        m
    }

    fn count(&self, outcome: &'static str) {
        self.events.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

pub struct Completions {
    pub pool: Pool,
    pub kafka: rdkafka::ClientConfig,
    pub topic: String,
    pub group: String,
    pub registry_url: String,
    pub metrics: ConsumerMetrics,
    pub db: platform::db::QueryMetrics,
}

impl Completions {
    /// Runs until `shutdown`; a broken consumer is rebuilt with back-off.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::session();
        while !shutdown.is_cancelled() {
            match self.session(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?backoff.peek(), "task.completed consumer failed")
                }
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    async fn session(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let consumer: Arc<StreamConsumer> = Arc::new(
            self.kafka
                .clone()
                .set("group.id", &self.group)
                .set("isolation.level", "read_committed")
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .create()?,
        );
        consumer.subscribe(&[&self.topic])?;
        let decoder = AvroDecoder::new(SrSettings::new(self.registry_url.clone()));
        let lag = platform::kafka::LagSampler::new(&self.kafka, self.metrics.lag.clone())?;
        let mut lag_tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                _ = lag_tick.tick() => lag.spawn(consumer.clone()),
                msg = consumer.recv() => {
                    let mut batch = vec![msg?.detach()];
                    // With it, whatever librdkafka has fetched already, without waiting: a
                    // lone completion is applied at once, a backlog in batches.
                    while batch.len() < BATCH {
                        match consumer.recv().now_or_never() {
                            Some(msg) => batch.push(msg?.detach()),
                            None => break,
                        }
                    }
                    if !self.apply(&decoder, &batch, shutdown).await {
                        // Stopped while waiting out an outage: the batch is not done, so its
                        // offsets stay where they are and the next owner reads it again.
                        return Ok(());
                    }
                    // Committed only now: the database already has the outcomes.
                    let mut next = TopicPartitionList::new();
                    for ((topic, partition), offset) in next_offsets(&batch) {
                        next.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
                    }
                    consumer.commit(&next, CommitMode::Async)?;
                }
            }
        }
    }

    /// Decodes and records a batch in one transaction. A registry or database outage is
    /// waited out with back-off, never skipped; only a record that can never be read is passed
    /// over. Returns false if `shutdown` came first, when the batch is not done and must not be
    /// committed.
    async fn apply(
        &self,
        decoder: &AvroDecoder,
        batch: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> bool {
        let mut events = Vec::with_capacity(batch.len());
        for msg in batch {
            let span = platform::kafka::consume_span(msg);
            match self
                .read(decoder, msg.payload(), shutdown)
                .instrument(span)
                .await
            {
                None => return false,
                Some(Some(event)) => events.push(event),
                Some(None) => {}
            }
        }
        if events.is_empty() {
            return true;
        }
        // Every database error is waited out: the events are valid, so only an outage can
        // keep them from being recorded.
        let recorded = retry(
            &mut Backoff::record(),
            shutdown,
            |_| true,
            |e, retry_in| tracing::warn!(error = %e, completions = events.len(), ?retry_in, "cannot record completions; retrying"),
            || self.db.time("complete_tasks", store::complete(&self.pool, &events)),
        )
        .await;
        match recorded {
            Some(Ok(outcomes)) => {
                self.metrics.batch_records.observe(events.len() as f64);
                for outcome in outcomes {
                    self.metrics.count(outcome.as_str());
                }
                true
            }
            // (No error comes back: every one is retried.)
            None | Some(Err(_)) => false,
        }
    }

    /// One record's event; `None` if `shutdown` came first, `Some(None)` if it can never be
    /// read (counted and logged).
    async fn read(
        &self,
        decoder: &AvroDecoder,
        payload: Option<&[u8]>,
        shutdown: &CancellationToken,
    ) -> Option<Option<schemas::TaskCompleted>> {
        let read = retry(
            &mut Backoff::record(),
            shutdown,
            |e| matches!(e, platform::registry::ReadError::Outage(_)),
            |e, retry_in| tracing::warn!(error = %e, ?retry_in, "cannot read a task.completed record; retrying"),
            || platform::registry::read_avro(decoder, payload),
        )
        .await?;
        let value = match read {
            Ok(value) => value,
            Err(e) => {
                self.metrics.count("undecodable");
                tracing::error!(error = %e, "task.completed record cannot be read; passed over");
                return Some(None);
            }
        };
        match apache_avro::from_value(&value) {
            Ok(event) => Some(Some(event)),
            Err(e) => {
                self.metrics.count("undecodable");
                tracing::error!(error = %e, "task.completed record does not match TaskCompleted; passed over");
                Some(None)
            }
        }
    }
}

/// The most completions one database transaction records.
const BATCH: usize = 500;

/// Per partition of `batch`, the offset to commit: the one after its last record.
fn next_offsets(batch: &[OwnedMessage]) -> std::collections::BTreeMap<(String, i32), i64> {
    let mut next = std::collections::BTreeMap::new();
    for msg in batch {
        let at = next
            .entry((msg.topic().to_string(), msg.partition()))
            .or_insert(0);
        *at = (*at).max(msg.offset() + 1);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn record(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "task.completed".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn each_partition_commits_past_its_last_record() {
        let batch = [
            record(0, 7),
            record(2, 3),
            record(0, 8),
            record(2, 4),
            record(1, 0),
        ];
        let next: Vec<_> = next_offsets(&batch).into_iter().collect();
        assert_eq!(
            next,
            [
                (("task.completed".to_string(), 0), 9),
                (("task.completed".to_string(), 1), 1),
                (("task.completed".to_string(), 2), 5),
            ]
        );
    }
}
