//! The consumer: one reader, one ordered lane per partition.
//!
//! - Order: a partition's records go, in order, to its own lane (a task), so partitions run in
//!   parallel and each stays in order.
//! - Batches: a lane writes whatever it holds, up to `batch_size` records, in one database
//!   transaction; a lone record is written at once, never held back for a batch to fill.
//! - Back-pressure per partition: a lane holding `lane_limit` (records or bytes) pauses
//!   fetching its own partition and resumes it at half; the reader never waits, so a backlog on one topic
//!   does not delay another's records. librdkafka's own prefetch is capped, so memory stays
//!   bounded.
//! - Exactly one effect: a batch's offset is stored for commit only after its database commit
//!   and its dead-letter acks; a redelivery after a crash or a rebalance finds the event ids
//!   already recorded and changes nothing.
//! - Poison (bad framing, unknown schema id, undecodable body, broken domain rules) goes to
//!   `<topic>.dlq` with the reason and origin in headers, and the lane moves on. A database or
//!   registry outage is transient: the lane retries with back-off and never dead-letters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use platform::retry::{retry, Backoff};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, TopicPartitionList};
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schemas::{Event, ResourceCreated, ResourceDeleted, ResourceUpdated, TaskProcess};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::decode::{self, Decoded, Poison};
use crate::flow::{Fetch, Gate, Load};
use crate::store;

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
    batch_records: Histogram,
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
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
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
            "batch_records",
            "Records handled per batch (one database transaction per partition and batch)",
            m.batch_records.clone(),
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
    /// What every Kafka client of the worker shares (the consumer, the dead-letter producer).
    pub kafka: rdkafka::ClientConfig,
    /// The consumer's `session.timeout.ms`: set on the consumer only, since librdkafka warns
    /// about a consumer property on a producer.
    pub session_timeout: Duration,
    pub group: String,
    pub topic_prefix: String,
    pub registry_url: String,
    pub task_iterations: u32,
    /// What a partition's lane may hold (records, bytes) before its partition is paused.
    pub lane_limit: Load,
    /// The most records one database transaction holds.
    pub batch_size: usize,
    pub metrics: Metrics,
}

/// The topics the worker reads (without prefix).
pub const TOPICS: [&str; 4] = [
    ResourceCreated::EVENT_TYPE,
    ResourceUpdated::EVENT_TYPE,
    ResourceDeleted::EVENT_TYPE,
    TaskProcess::EVENT_TYPE,
];

impl Worker {
    /// Runs until `shutdown`: in-flight records finish, their offsets are committed, then it
    /// returns. A broken consumer is rebuilt with back-off.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::session();
        while !shutdown.is_cancelled() {
            match self.clone().session(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?backoff.peek(), "consumer failed")
                }
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    async fn session(self: Arc<Self>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let consumer: Arc<StreamConsumer> = Arc::new(
            self.kafka
                .clone()
                .set("group.id", &self.group)
                .set(
                    "session.timeout.ms",
                    self.session_timeout.as_millis().to_string(),
                )
                .set("isolation.level", "read_committed")
                .set("auto.offset.reset", "earliest")
                // Offsets are stored by the lanes after the database commit; only those are
                // committed (every second, and at shutdown).
                .set("enable.auto.commit", "true")
                .set("enable.auto.offset.store", "false")
                .set("auto.commit.interval.ms", "1000")
                // librdkafka's prefetch per partition. A pause drops it and a resume fetches
                // it again, so it is kept well under a lane's byte limit; its fetch back-off
                // (1 s by default, for a full prefetch queue) is short, or a lane that resumed
                // would wait for it.
                .set("queued.max.messages.kbytes", "4096")
                .set("queued.min.messages", "5000")
                .set("fetch.queue.backoff.ms", "10")
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

        let mut lanes: HashMap<(String, i32), LaneHandle> = HashMap::new();
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
                        let (tx, rx) = mpsc::unbounded_channel();
                        let gate = Arc::new(Mutex::new(Gate::new(self.lane_limit)));
                        let lane = Lane {
                            worker: self.clone(),
                            consumer: consumer.clone(),
                            producer: producer.clone(),
                            decoder: decoder.clone(),
                            gate: gate.clone(),
                            topic: msg.topic().to_string(),
                            partition: msg.partition(),
                            stop: lanes_done.clone(),
                        };
                        handles.push(tokio::spawn(lane.run(rx)));
                        LaneHandle { tx, gate }
                    });
                    // The reader never waits on a lane: a full lane pauses its own partition
                    // (docs/ARCHITECTURE.md, "worker"), and the others keep flowing.
                    let mut gate = lane.gate.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(f) = gate.handed(Load::one(weight(&msg))) {
                        apply(&consumer, msg.topic(), msg.partition(), f);
                    }
                    drop(gate);
                    if lane.tx.send(msg).is_err() {
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

/// The reader's side of a lane.
struct LaneHandle {
    tx: mpsc::UnboundedSender<OwnedMessage>,
    gate: Arc<Mutex<Gate>>,
}

/// Pauses or resumes fetching one partition. Called with the lane's gate locked, so decisions
/// reach librdkafka in the order they were taken. A partition revoked meanwhile refuses; its
/// next owner starts unpaused.
fn apply(consumer: &StreamConsumer, topic: &str, partition: i32, fetch: Fetch) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let done = match fetch {
        Fetch::Pause => consumer.pause(&tpl),
        Fetch::Resume => consumer.resume(&tpl),
    };
    match done {
        Ok(()) => tracing::debug!(topic, partition, ?fetch, "partition fetching"),
        Err(e) => tracing::debug!(error = %e, topic, partition, ?fetch, "partition not assigned"),
    }
}

/// One partition's records, in order, in batches.
struct Lane {
    worker: Arc<Worker>,
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    decoder: Arc<AvroDecoder>,
    gate: Arc<Mutex<Gate>>,
    topic: String,
    partition: i32,
    /// Cancelled when the session failed: retries stop, nothing more is stored.
    stop: CancellationToken,
}

/// A record ready to store, or poison to dead-letter.
// Nearly every record is `Store`: boxing it would allocate per record to shrink the rare poison.
#[allow(clippy::large_enum_variant)]
enum Prepared<'a> {
    Store(store::Row<'a>),
    Poison(Poison),
}

impl Lane {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<OwnedMessage>) {
        let mut batch = Vec::with_capacity(self.worker.batch_size);
        // A batch is whatever is queued, up to the limit: a lone record goes at once, and under
        // load the records that arrive during one commit form the next batch.
        while rx.recv_many(&mut batch, self.worker.batch_size).await > 0 {
            if !self.handle(&batch).await {
                return;
            }
            let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            let done = Load {
                records: batch.len(),
                bytes: batch.iter().map(weight).sum(),
            };
            if let Some(f) = gate.finished(done) {
                apply(&self.consumer, &self.topic, self.partition, f);
            }
            drop(gate);
            batch.clear();
        }
    }

    /// Handles a batch until each record is recorded, found a duplicate or dead-lettered, then
    /// stores the batch's offset; false if the lane must stop first (nothing is stored then).
    async fn handle(&self, batch: &[OwnedMessage]) -> bool {
        let started = Instant::now();
        let spans: Vec<tracing::Span> = batch.iter().map(platform::kafka::consume_span).collect();
        let mut prepared = Vec::with_capacity(batch.len());
        for (msg, span) in batch.iter().zip(&spans) {
            let Some(p) = self
                .retrying(msg, || self.prepare(msg).instrument(span.clone()))
                .await
            else {
                return false;
            };
            prepared.push(p);
        }
        let mut outcomes = vec!["dead_lettered"; batch.len()];
        for ((msg, span), p) in batch.iter().zip(&spans).zip(&prepared) {
            if let Prepared::Poison(poison) = p {
                let sent = self.retrying(msg, || {
                    self.dead_letter(msg, poison).instrument(span.clone())
                });
                if sent.await.is_none() {
                    return false;
                }
            }
        }
        let (at, mut rows): (Vec<usize>, Vec<store::Row>) = prepared
            .into_iter()
            .enumerate()
            .filter_map(|(i, p)| match p {
                Prepared::Store(row) => Some((i, row)),
                Prepared::Poison(_) => None,
            })
            .unzip();
        if !rows.is_empty() {
            // One client span per record, each a child of its record's consumer span, all
            // covering the one transaction that writes them (with the batch size on each).
            let db_spans: Vec<tracing::Span> = at
                .iter()
                .map(|&i| {
                    let s = spans[i]
                        .in_scope(|| platform::trace::db_span("INSERT", "processed_events"));
                    s.record("db.operation.batch.size", rows.len());
                    s
                })
                .collect();
            // A task's completion continues the trace from its record's write.
            for (row, span) in rows.iter_mut().zip(&db_spans) {
                if let Some((_, tp)) = &mut row.completion {
                    *tp = platform::trace::traceparent_of(span, tp.as_deref());
                }
            }
            let write = || async {
                let record =
                    store::record_batch(&self.worker.pool, &self.topic, self.partition, &rows);
                self.worker
                    .metrics
                    .db
                    .time("record_batch", record)
                    .await
                    .map_err(|e| Retry(e.to_string()))
            };
            let Some(fresh) = self.retrying(&batch[at[0]], write).await else {
                return false;
            };
            drop(db_spans);
            for (i, new) in at.into_iter().zip(fresh) {
                outcomes[i] = if new { "recorded" } else { "duplicate" };
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let m = &self.worker.metrics;
        m.batch_records.observe(batch.len() as f64);
        for outcome in outcomes {
            m.processed
                .get_or_create(&OutcomeLabels {
                    topic: self.topic.clone(),
                    outcome,
                })
                .inc();
            m.duration
                .get_or_create(&TopicLabel {
                    topic: self.topic.clone(),
                })
                .observe(elapsed);
        }
        // After the database commit and the dead-letter acks: now the offset may be committed.
        // A partition revoked meanwhile refuses it; its new owner redelivers, harmlessly.
        let last = &batch[batch.len() - 1];
        if let Err(e) = self
            .consumer
            .store_offset(&self.topic, self.partition, last.offset())
        {
            tracing::debug!(error = %e, topic = %self.topic, partition = self.partition, "offset not stored");
        }
        true
    }

    /// Runs `attempt` until it succeeds, with back-off between transient failures; `None` if
    /// the lane must stop first.
    async fn retrying<T, F, Fut>(&self, msg: &OwnedMessage, attempt: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Retry>>,
    {
        retry(
            &mut Backoff::record(),
            &self.stop,
            |_| true,
            |Retry(why), retry_in| tracing::warn!(%why, topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), ?retry_in, "transient failure; retrying"),
            attempt,
        )
        .await?
        .ok()
    }

    /// Decodes and checks one record and, for a task, runs it.
    async fn prepare<'m>(&self, msg: &'m OwnedMessage) -> Result<Prepared<'m>, Retry> {
        let decoded = match self.decode(msg).await? {
            Err(poison) => return Ok(Prepared::Poison(poison)),
            Ok(d) => d,
        };
        let Some(event_id) = header(msg, "event_id").and_then(|v| uuid::Uuid::parse_str(v).ok())
        else {
            return Ok(Prepared::Poison(Poison::Header("event_id")));
        };
        let completion = match &decoded {
            Decoded::TaskProcess(t) => {
                let (status, result, error) =
                    match decode::run_task(&t.task_type, &t.input, self.worker.task_iterations) {
                        Ok(r) => (schemas::TaskOutcome::Completed, Some(r), None),
                        Err(e) => (schemas::TaskOutcome::Failed, None, Some(e)),
                    };
                let done = schemas::TaskCompleted {
                    task_id: t.task_id,
                    status,
                    result,
                    error,
                    completed_at: chrono::Utc::now().timestamp_micros(),
                };
                Some((done, header(msg, "traceparent").map(str::to_string)))
            }
            _ => None,
        };
        Ok(Prepared::Store(store::Row {
            event_id,
            offset: msg.offset(),
            key: msg.key().and_then(|k| std::str::from_utf8(k).ok()),
            event: decoded,
            commit_ts: header(msg, "commit_ts")
                .and_then(|v| v.parse::<i64>().ok())
                .and_then(chrono::DateTime::from_timestamp_micros),
            completion,
        }))
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

/// What a record weighs in a lane: its payload and key (headers are small and bounded).
fn weight(msg: &OwnedMessage) -> usize {
    msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len)
}

/// A header's value, if it is present and UTF-8.
fn header<'m>(msg: &'m OwnedMessage, name: &str) -> Option<&'m str> {
    msg.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
