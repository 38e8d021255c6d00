//! Consumes `task.completed` (Avro through the registry, read_committed) and records each
//! outcome. Offsets are committed only after the database commit, so a crash repeats at most
//! an already-applied (idempotent) update. A registry or database outage is waited out, never
//! skipped. A record that can never be decoded is logged, counted and passed over: the APIs
//! never produce to Kafka, and blocking the partition on it would stop every later completion.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use platform::retry::{retry, Backoff};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::Message;
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
    lag: platform::kafka::LagGauge,
}

impl ConsumerMetrics {
    pub fn register(registry: &mut Registry) -> ConsumerMetrics {
        let m = ConsumerMetrics {
            events: Family::default(),
            lag: Family::default(),
        };
        registry.register(
            "completions",
            "task.completed events by outcome: applied, duplicate (already final), unknown_task, undecodable",
            m.events.clone(),
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
                    let msg = msg?;
                    let span = platform::kafka::consume_span(&msg);
                    if !self.apply(&decoder, msg.payload(), shutdown).instrument(span).await {
                        // Stopped while waiting out an outage: the record is not done, so its
                        // offset stays where it is and the next owner reads it again.
                        return Ok(());
                    }
                    // Committed only now: the database already has the outcome.
                    consumer.commit_message(&msg, CommitMode::Async)?;
                }
            }
        }
    }

    /// Decodes and records one event. A registry or database outage is waited out with
    /// back-off, never skipped; only a record that can never be read is passed over. Returns
    /// false if `shutdown` came first, when the record is not done and must not be committed.
    async fn apply(
        &self,
        decoder: &AvroDecoder,
        payload: Option<&[u8]>,
        shutdown: &CancellationToken,
    ) -> bool {
        let read = retry(
            &mut Backoff::record(),
            shutdown,
            |e| matches!(e, platform::registry::ReadError::Outage(_)),
            |e, retry_in| tracing::warn!(error = %e, ?retry_in, "cannot read a task.completed record; retrying"),
            || platform::registry::read_avro(decoder, payload),
        )
        .await;
        let value = match read {
            None => return false,
            Some(Ok(value)) => value,
            Some(Err(e)) => {
                self.metrics.count("undecodable");
                tracing::error!(error = %e, "task.completed record cannot be read; passed over");
                return true;
            }
        };
        let event: schemas::TaskCompleted = match apache_avro::from_value(&value) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.count("undecodable");
                tracing::error!(error = %e, "task.completed record does not match TaskCompleted; passed over");
                return true;
            }
        };
        // Every database error is waited out: the event is valid, so only an outage can
        // keep it from being recorded.
        let recorded = retry(
            &mut Backoff::record(),
            shutdown,
            |_| true,
            |e, retry_in| tracing::warn!(error = %e, task_id = %event.task_id, ?retry_in, "cannot record a completion; retrying"),
            || self.db.time("complete_task", store::complete(&self.pool, &event)),
        )
        .await;
        match recorded {
            None => false,
            Some(Ok(true)) => {
                self.metrics.count("applied");
                true
            }
            // (No error comes back: every one is retried.)
            Some(Ok(false)) | Some(Err(_)) => {
                // Either a duplicate or a task this database never had.
                let known = matches!(store::get(&self.pool, event.task_id).await, Ok(Some(_)));
                self.metrics
                    .count(if known { "duplicate" } else { "unknown_task" });
                true
            }
        }
    }
}
