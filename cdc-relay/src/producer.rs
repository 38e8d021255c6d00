//! The Kafka side of one source: two transactional producers taking turns (exactly-once) or an
//! idempotent one (at-least-once), and the checkpoint committed with every batch.
//!
//! Exactly-once: every batch is one Kafka transaction holding the events of one or more whole
//! Postgres transactions plus a checkpoint record (slot name → commit LSN of the last of them)
//! on a compacted topic. After a restart the relay reads its checkpoint and skips what Postgres
//! re-sends up to it, so a crash between the Kafka commit and the Postgres acknowledgement
//! duplicates nothing.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::checkpoint;
use crate::config::Delivery;
use crate::encode::KafkaRecord;
use crate::pgoutput::Lsn;

/// How long a transaction commit or abort may take before the batch counts as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// `transaction.timeout.ms`: how long the broker keeps a transaction of a dead relay open
/// before it aborts it.
const TXN_EXPIRY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("Kafka: delivery of a record failed: {0}")]
    Delivery(KafkaError),
    #[error("checkpoint record for `{key}` is unreadable: {value:?}")]
    BadCheckpoint { key: String, value: String },
    #[error(
        "checkpoint topic `{topic}` was not read to its end within {secs} s: a transaction \
         left open on it (another relay's or source's) holds back read_committed readers"
    )]
    CheckpointTimeout { topic: String, secs: u64 },
    #[error("Kafka worker task failed: {0}")]
    Task(String),
}

pub struct Sink {
    /// Exactly-once: two transactional producers that take turns, so one batch is sent while
    /// the one before it commits (a producer holds one transaction at a time). At-least-once:
    /// one idempotent producer.
    producers: Vec<FutureProducer>,
    delivery: Delivery,
    checkpoint_topic: String,
    checkpoint_key: String,
}

/// One batch for [`Sink::start`]: records of whole Postgres transactions, the commit LSN of
/// the last of them, and what the caller wants back when the batch is acknowledged.
pub struct Outgoing<M> {
    pub records: Vec<KafkaRecord>,
    pub upto: Lsn,
    pub meta: M,
}

/// What the publishing pipeline reports, in order.
pub enum Progress<M> {
    /// The pipeline takes the next batch.
    Ready,
    /// Kafka durably holds this batch and every one before it (exactly once: committed).
    Acked {
        upto: Lsn,
        meta: M,
        elapsed: Duration,
    },
    /// The pipeline stopped; nothing after the last `Acked` may be acknowledged.
    Failed(SinkError),
}

/// A batch on its way: its completion (delivery, or the commit) runs as its own task.
struct Pending<M> {
    done: tokio::task::JoinHandle<Result<(), SinkError>>,
    upto: Lsn,
    meta: M,
    started: Instant,
}

impl Sink {
    /// Creates the producers; in exactly-once mode `init_transactions` fences any earlier
    /// producers with the same transactional ids and aborts their open transactions.
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
            // The relay hands over whole batches at once: waiting for more would only delay.
            .set("linger.ms", "1")
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
        if config.get("batch.size").is_none() {
            config.set("batch.size", "1000000");
        }
        let mut producers = Vec::new();
        match delivery {
            Delivery::AtLeastOnce => producers.push(config.create()?),
            Delivery::ExactlyOnce => {
                for id in transactional_ids(checkpoint_key) {
                    let producer: FutureProducer = config
                        .clone()
                        .set("transactional.id", id)
                        .set("transaction.timeout.ms", TXN_EXPIRY.as_millis().to_string())
                        .create()?;
                    let p = producer.clone();
                    blocking(move || p.init_transactions(TXN_TIMEOUT)).await??;
                    producers.push(producer);
                }
            }
        }
        Ok(Sink {
            producers,
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
        blocking(move || checkpoint::read(base, &topic, &key)).await?
    }

    /// Starts the publishing pipeline. Send it a batch after each `Ready` (one is sent first);
    /// it reports each batch as `Acked`, in order, and stops after the channel closes and
    /// everything sent is acknowledged, or at the first failure.
    ///
    /// Exactly-once, batch N+1 is sent while batch N commits; N+1 commits only after N did,
    /// so a checkpoint never passes a transaction that could still abort, and it starts only
    /// after all of N's records were appended, so per-key order holds in the log.
    /// At-least-once, batches follow each other without waiting; the idempotent producer
    /// keeps them in order.
    pub fn start<M: Send + 'static>(
        self,
    ) -> (
        tokio::sync::mpsc::Sender<Outgoing<M>>,
        tokio::sync::mpsc::UnboundedReceiver<Progress<M>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let (progress_tx, progress_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _ = progress_tx.send(Progress::Ready);
            if let Err(e) = self.pipeline(rx, &progress_tx).await {
                let _ = progress_tx.send(Progress::Failed(e));
            }
        });
        (tx, progress_rx)
    }

    async fn pipeline<M: Send + 'static>(
        &self,
        mut batches: tokio::sync::mpsc::Receiver<Outgoing<M>>,
        progress: &tokio::sync::mpsc::UnboundedSender<Progress<M>>,
    ) -> Result<(), SinkError> {
        let mut pending: std::collections::VecDeque<Pending<M>> = Default::default();
        let mut turn = 0;
        loop {
            tokio::select! {
                biased;
                done = async { (&mut pending.front_mut().expect("guarded").done).await }, if !pending.is_empty() => {
                    let p = pending.pop_front().expect("guarded");
                    report(p, done, progress)?;
                }
                batch = batches.recv() => {
                    let Some(batch) = batch else { break };
                    let producer = self.producers[turn % self.producers.len()].clone();
                    turn += 1;
                    let started = Instant::now();
                    let done = match self.delivery {
                        Delivery::AtLeastOnce => {
                            let deliveries = enqueue(&producer, batch.records.iter()).await?;
                            let spans = spans(&batch.records);
                            drop(batch.records);
                            tokio::spawn(async move { confirm(deliveries, &spans).await })
                        }
                        Delivery::ExactlyOnce => {
                            let checkpoint = KafkaRecord {
                                topic: self.checkpoint_topic.clone(),
                                key: self.checkpoint_key.clone(),
                                value: checkpoint::value(batch.upto).into_bytes(),
                                headers: Vec::new(),
                                span: None,
                                dead_letter: None,
                            };
                            // begin_transaction only changes local state; it does not block.
                            producer.begin_transaction()?;
                            let deliveries = enqueue(
                                &producer,
                                batch.records.iter().chain(std::iter::once(&checkpoint)),
                            )
                            .await?;
                            let spans = spans(&batch.records);
                            drop(batch.records);
                            confirm(deliveries, &spans).await?;
                            finish(&mut pending, progress).await?;
                            tokio::spawn(async move {
                                let result = commit(producer).await;
                                // The producer spans end with the commit that made them visible.
                                drop(spans);
                                result
                            })
                        }
                    };
                    pending.push_back(Pending { done, upto: batch.upto, meta: batch.meta, started });
                    let _ = progress.send(Progress::Ready);
                }
            }
        }
        finish(&mut pending, progress).await
    }
}

/// Waits for every pending batch, reporting each.
async fn finish<M>(
    pending: &mut std::collections::VecDeque<Pending<M>>,
    progress: &tokio::sync::mpsc::UnboundedSender<Progress<M>>,
) -> Result<(), SinkError> {
    while let Some(mut p) = pending.pop_front() {
        let done = (&mut p.done).await;
        report(p, done, progress)?;
    }
    Ok(())
}

/// The transactional ids of a source's two producers. The first is the one relays before the
/// pipeline used, so an upgrade fences the old relay too.
fn transactional_ids(checkpoint_key: &str) -> [String; 2] {
    [
        format!("kafkify-relay-{checkpoint_key}"),
        format!("kafkify-relay-{checkpoint_key}.1"),
    ]
}

fn report<M>(
    p: Pending<M>,
    done: Result<Result<(), SinkError>, tokio::task::JoinError>,
    progress: &tokio::sync::mpsc::UnboundedSender<Progress<M>>,
) -> Result<(), SinkError> {
    done.map_err(|e| SinkError::Task(e.to_string()))??;
    let _ = progress.send(Progress::Acked {
        upto: p.upto,
        meta: p.meta,
        elapsed: p.started.elapsed(),
    });
    Ok(())
}

/// Commits the producer's transaction; aborts it when that fails.
async fn commit(producer: FutureProducer) -> Result<(), SinkError> {
    let p = producer.clone();
    let result = blocking(move || p.commit_transaction(TXN_TIMEOUT))
        .await?
        .map_err(SinkError::from);
    if result.is_err() {
        // Best effort: a fatal error (e.g. fenced) cannot abort; the session restarts with new
        // producers either way, and nothing of this transaction is visible.
        let _ = blocking(move || producer.abort_transaction(TXN_TIMEOUT)).await;
    }
    result
}

fn spans(records: &[KafkaRecord]) -> Vec<Option<tracing::Span>> {
    records.iter().map(|r| r.span.clone()).collect()
}

/// Enqueues every record, waiting while librdkafka's queue is full.
async fn enqueue<'a>(
    producer: &FutureProducer,
    records: impl Iterator<Item = &'a KafkaRecord>,
) -> Result<Vec<rdkafka::producer::DeliveryFuture>, SinkError> {
    let mut pending = Vec::new();
    for r in records {
        loop {
            match producer.send_result(future_record(r)) {
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
    Ok(pending)
}

/// Waits for every delivery report and records partition and offset on the producer spans.
/// Waiting here, rather than letting `commit_transaction` flush, matters: its flush only sees
/// deliveries when the producer's polling thread next wakes, which adds up to 100 ms to every
/// transaction.
async fn confirm(
    deliveries: Vec<rdkafka::producer::DeliveryFuture>,
    spans: &[Option<tracing::Span>],
) -> Result<(), SinkError> {
    for (i, delivery) in deliveries.into_iter().enumerate() {
        match delivery.await {
            Ok(Ok(d)) => {
                if let Some(Some(span)) = spans.get(i) {
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
