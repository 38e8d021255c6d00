//! The consumer: one reader, one ordered lane per partition.
//!
//! - Order: a partition's records go, in order, to its own lane (a task), so partitions run in
//!   parallel and each stays in order.
//! - Back-pressure: lanes have bounded queues; a full lane stops the reader, and librdkafka's
//!   own prefetch is capped, so memory stays bounded.
//! - Exactly one effect: an offset is stored for commit only after the database commit (or the
//!   dead-letter write) of its record; a redelivery after a crash or a rebalance finds the
//!   event id already recorded and changes nothing.
//! - Poison (bad framing, unknown schema id, undecodable body, broken domain rules) goes to
//!   `<topic>.dlq` with the reason and origin in headers, and the lane moves on. A database or
//!   registry outage is transient: the lane retries with back-off and never dead-letters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::decode::{self, Decoded, Poison};
use crate::store::{self, Origin};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    topic: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabel {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DlqLabels {
    topic: String,
    reason: &'static str,
}

/// The worker's metrics (prefix `kafkify_worker_`).
#[derive(Clone)]
pub struct Metrics {
    processed: Family<OutcomeLabels, Counter>,
    duration: Family<TopicLabel, Histogram>,
    dead_lettered: Family<DlqLabels, Counter>,
    lag: platform::kafka::LagGauge,
    db: platform::db::QueryMetrics,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            processed: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00025, 2.0, 16))
            }),
            dead_lettered: Family::default(),
            db: platform::db::QueryMetrics::register(registry),
            lag: Family::default(),
        };
        registry.register(
            "events_processed",
            "Events by topic and outcome: recorded, duplicate, dead_lettered",
            m.processed.clone(),
        );
        registry.register(
            "processing_duration_seconds",
            "Time to process one event, retries included",
            m.duration.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events sent to the dead-letter topic, by reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "consumer_lag",
            "Records behind the end of each assigned partition",
            m.lag.clone(),
        );
        m
    }
}

pub struct Worker {
    pub pool: Pool,
    pub kafka: rdkafka::ClientConfig,
    pub group: String,
    pub topic_prefix: String,
    pub registry_url: String,
    pub task_iterations: u32,
    pub lane_capacity: usize,
    pub metrics: Metrics,
}

/// The topics the worker reads (without prefix).
pub const TOPICS: [&str; 4] = [
    "resource.created",
    "resource.updated",
    "resource.deleted",
    "task.process",
];

impl Worker {
    /// Runs until `shutdown`: in-flight records finish, their offsets are committed, then it
    /// returns. A broken consumer is rebuilt with back-off.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        while !shutdown.is_cancelled() {
            match self.clone().session(&shutdown).await {
                Ok(()) => return,
                Err(e) => tracing::error!(error = %e, retry_in = ?backoff, "consumer failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn session(self: Arc<Self>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let consumer: Arc<StreamConsumer> = Arc::new(
            self.kafka
                .clone()
                .set("group.id", &self.group)
                .set("isolation.level", "read_committed")
                .set("auto.offset.reset", "earliest")
                // Offsets are stored by the lanes after the database commit; only those are
                // committed (every second, and at shutdown).
                .set("enable.auto.commit", "true")
                .set("enable.auto.offset.store", "false")
                .set("auto.commit.interval.ms", "1000")
                .set("queued.max.messages.kbytes", "16384")
                .set("topic.metadata.refresh.interval.ms", "5000")
                .create()?,
        );
        let topics: Vec<String> = TOPICS
            .iter()
            .map(|t| format!("{}{t}", self.topic_prefix))
            .collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
        let producer: FutureProducer = self
            .kafka
            .clone()
            .set("enable.idempotence", "true")
            .create()?;
        let decoder = Arc::new(AvroDecoder::new(SrSettings::new(self.registry_url.clone())));

        let mut lanes: HashMap<(String, i32), mpsc::Sender<OwnedMessage>> = HashMap::new();
        let mut handles = Vec::new();
        let lanes_done = CancellationToken::new();
        let lag = platform::kafka::LagSampler::new(&self.kafka, self.metrics.lag.clone())?;
        let mut lag_tick = tokio::time::interval(Duration::from_secs(5));
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = lag_tick.tick() => lag.spawn(consumer.clone()),
                msg = consumer.recv() => {
                    let msg = match msg {
                        Ok(m) => m.detach(),
                        Err(e) => break Err(e.into()),
                    };
                    let key = (msg.topic().to_string(), msg.partition());
                    let lane = lanes.entry(key).or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(self.lane_capacity);
                        let lane = Lane {
                            worker: self.clone(),
                            consumer: consumer.clone(),
                            producer: producer.clone(),
                            decoder: decoder.clone(),
                            stop: lanes_done.clone(),
                        };
                        handles.push(tokio::spawn(lane.run(rx)));
                        tx
                    });
                    // A full lane holds the reader here: back-pressure instead of buffering.
                    if lane.send(msg).await.is_err() {
                        break Err(anyhow::anyhow!("a partition lane ended"));
                    }
                }
            }
        };
        // Let every lane finish what it holds, then commit what they stored.
        drop(lanes);
        if result.is_err() {
            lanes_done.cancel();
        }
        for h in handles {
            let _ = h.await;
        }
        let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
        result
    }
}

/// One partition's records, in order.
struct Lane {
    worker: Arc<Worker>,
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    decoder: Arc<AvroDecoder>,
    /// Cancelled when the session failed: retries stop, nothing more is stored.
    stop: CancellationToken,
}

impl Lane {
    async fn run(self, mut rx: mpsc::Receiver<OwnedMessage>) {
        while let Some(msg) = rx.recv().await {
            let started = Instant::now();
            let Some(outcome) = self.process(&msg).await else {
                return;
            };
            let topic = msg.topic().to_string();
            self.worker
                .metrics
                .processed
                .get_or_create(&OutcomeLabels {
                    topic: topic.clone(),
                    outcome,
                })
                .inc();
            self.worker
                .metrics
                .duration
                .get_or_create(&TopicLabel { topic })
                .observe(started.elapsed().as_secs_f64());
            // After the database commit (or the dead-letter ack): now the offset may be committed.
            // A partition revoked meanwhile refuses it; its new owner redelivers, harmlessly.
            if let Err(e) = self
                .consumer
                .store_offset(msg.topic(), msg.partition(), msg.offset())
            {
                tracing::debug!(error = %e, topic = msg.topic(), partition = msg.partition(), "offset not stored");
            }
        }
    }

    /// Handles one record until it is recorded, found a duplicate or dead-lettered; `None` if
    /// the lane must stop first.
    async fn process(&self, msg: &OwnedMessage) -> Option<&'static str> {
        let span = platform::kafka::consume_span(msg);
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.try_process(msg).instrument(span.clone()).await {
                Ok(outcome) => return Some(outcome),
                Err(Retry(why)) => {
                    tracing::warn!(%why, topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), retry_in = ?backoff, "transient failure; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn try_process(&self, msg: &OwnedMessage) -> Result<&'static str, Retry> {
        match self.decode(msg).await? {
            Err(poison) => {
                self.dead_letter(msg, &poison).await?;
                Ok("dead_lettered")
            }
            Ok(decoded) => {
                let headers = header_map(msg);
                let event_id = match headers
                    .get("event_id")
                    .and_then(|v| uuid::Uuid::parse_str(v).ok())
                {
                    Some(id) => id,
                    None => {
                        self.dead_letter(msg, &Poison::Header("event_id")).await?;
                        return Ok("dead_lettered");
                    }
                };
                let completion = match &decoded {
                    Decoded::TaskProcess(t) => {
                        let (status, result, error) = match decode::run_task(
                            &t.task_type,
                            &t.input,
                            self.worker.task_iterations,
                        ) {
                            Ok(r) => (schemas::TaskOutcome::Completed, Some(r), None),
                            Err(e) => (schemas::TaskOutcome::Failed, None, Some(e)),
                        };
                        Some(schemas::TaskCompleted {
                            task_id: t.task_id,
                            status,
                            result,
                            error,
                            completed_at: chrono::Utc::now().timestamp_micros(),
                        })
                    }
                    _ => None,
                };
                // The task.completed row continues the trace from this write's span.
                let span = platform::trace::db_span("INSERT", "processed_events");
                let tp = platform::trace::traceparent_of(
                    &span,
                    headers.get("traceparent").map(String::as_str),
                );
                let origin = Origin {
                    event_id,
                    topic: msg.topic(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: msg.key().and_then(|k| std::str::from_utf8(k).ok()),
                    commit_ts: headers
                        .get("commit_ts")
                        .and_then(|v| v.parse::<i64>().ok())
                        .and_then(chrono::DateTime::from_timestamp_micros),
                    traceparent: tp.as_deref(),
                };
                let record =
                    store::record(&self.worker.pool, &origin, &decoded, completion.as_ref())
                        .instrument(span);
                match self.worker.metrics.db.time("record_event", record).await {
                    Ok(true) => Ok("recorded"),
                    Ok(false) => Ok("duplicate"),
                    Err(e) => Err(Retry(e.to_string())),
                }
            }
        }
    }

    /// `Ok(Err(poison))` for a record to dead-letter, `Err` for a transient failure.
    async fn decode(&self, msg: &OwnedMessage) -> Result<Result<Decoded, Poison>, Retry> {
        use platform::registry::ReadError;
        let event_type = msg
            .topic()
            .strip_prefix(self.worker.topic_prefix.as_str())
            .unwrap_or(msg.topic());
        match platform::registry::read_avro(&self.decoder, msg.payload()).await {
            Ok(value) => Ok(decode::event(event_type, &value)),
            Err(e @ ReadError::Outage(_)) => Err(Retry(e.to_string())),
            Err(ReadError::Framing(m)) => Ok(Err(Poison::Framing(m))),
            Err(ReadError::UnknownSchema(m)) => Ok(Err(Poison::UnknownSchema(m))),
            Err(ReadError::Body(m)) => Ok(Err(Poison::Body(m))),
        }
    }

    async fn dead_letter(&self, msg: &OwnedMessage, poison: &Poison) -> Result<(), Retry> {
        let dlq = schemas::dlq_topic(msg.topic());
        let mut headers = OwnedHeaders::new();
        if let Some(h) = msg.headers() {
            for hd in h.iter() {
                headers = headers.insert(Header {
                    key: hd.key,
                    value: hd.value,
                });
            }
        }
        let reason = poison.to_string();
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        for (k, v) in [
            ("dlq_reason", reason.as_str()),
            ("dlq_origin", "worker"),
            ("dlq_source_topic", msg.topic()),
            ("dlq_source_partition", partition.as_str()),
            ("dlq_source_offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&dlq).headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| Retry(format!("dead-letter topic {dlq}: {e}")))?;
        tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), %reason, %dlq, "dead-lettered");
        self.worker
            .metrics
            .dead_lettered
            .get_or_create(&DlqLabels {
                topic: msg.topic().to_string(),
                reason: poison.kind(),
            })
            .inc();
        Ok(())
    }
}

/// A transient failure, retried.
struct Retry(String);

fn header_map(msg: &OwnedMessage) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(h) = msg.headers() {
        for hd in h.iter() {
            if let Some(v) = hd.value.and_then(|v| std::str::from_utf8(v).ok()) {
                out.insert(hd.key.to_string(), v.to_string());
            }
        }
    }
    out
}
