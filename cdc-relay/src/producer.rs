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

use crate::checkpoint::{self, Checkpoint, Identity};
use crate::config::Delivery;
use crate::encode::KafkaRecord;
use crate::pgoutput::Lsn;

/// How long a transaction commit or abort may take before the batch counts as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// `transaction.timeout.ms` unless the caller sets it (RELAY_TRANSACTION_TIMEOUT): how long
/// the broker keeps a transaction of a dead relay open before it aborts it.
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
    identity: Identity,
    /// The Postgres timeline the session streams from, written into each checkpoint.
    timeline: u32,
    /// The producers' settings, for fencing the producers of relays before namespacing.
    config: ClientConfig,
    /// The transaction timeout: another source's transaction may hold back the checkpoint
    /// reader this long.
    expiry: Duration,
}

/// What the relay sends the publishing pipeline ([`Sink::start`]), in order.
pub enum Command<M> {
    /// Records for the open Kafka transaction; the first `Append` after a `Commit` opens one.
    /// A Postgres transaction may arrive in several.
    Append(Vec<KafkaRecord>),
    /// Ends the open transaction with the checkpoint `upto` (the commit LSN of the last whole
    /// Postgres transaction in it); `meta` comes back with its `Acked`.
    Commit { upto: Lsn, meta: M },
    /// Drops the open transaction: it holds part of a Postgres transaction the session stops
    /// in the middle of. Nothing of it becomes visible.
    Abort,
}

/// What the publishing pipeline reports, in order.
pub enum Progress<M> {
    /// The pipeline can commit the next transaction at once.
    Ready,
    /// Kafka durably holds this batch and every one before it (exactly once: committed).
    Acked {
        upto: Lsn,
        meta: M,
        elapsed: Duration,
        phases: Phases,
    },
    /// The pipeline stopped; nothing after the last `Acked` may be acknowledged.
    Failed(SinkError),
}

/// Where a batch's time went after the relay closed it, so the latency can be broken down
/// (`kafka_transaction_phase_seconds{phase}`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Phases {
    /// Until the brokers acknowledged every record of the batch (and, exactly once, its
    /// checkpoint): AddPartitionsToTxn and the produce round trips.
    pub deliver: Duration,
    /// Exactly once: waiting for the previous transaction's commit, which must come first.
    pub previous: Option<Duration>,
    /// Exactly once: the EndTxn round trip (`commit_transaction`).
    pub end_txn: Option<Duration>,
}

/// A batch on its way: its completion (delivery, or the commit) runs as its own task.
struct Pending<M> {
    done: tokio::task::JoinHandle<Result<Phases, SinkError>>,
    upto: Lsn,
    meta: M,
    started: Instant,
}

/// Commands waiting for the pipeline. While it waits for a commit, the relay keeps reading
/// into these (chunks of at most `RELAY_BUFFER_BYTES`/16: half the buffer), so reading
/// Postgres overlaps with Kafka's commits.
pub const COMMANDS_QUEUED: usize = 8;

/// Delivery reports awaited once this many are outstanding, so a transaction of any size
/// holds a bounded number of them (librdkafka's queue bounds the records themselves).
const MAX_UNCONFIRMED: usize = 20_000;

/// The Kafka transaction being filled (at-least-once: the records since the last commit).
struct Open {
    producer: FutureProducer,
    deliveries:
        std::collections::VecDeque<(rdkafka::producer::DeliveryFuture, Option<tracing::Span>)>,
    /// Spans of delivered records; they end with the commit that makes them visible.
    delivered: Vec<tracing::Span>,
    started: Instant,
}

impl Open {
    async fn confirm_one(&mut self) -> Result<(), SinkError> {
        let Some((delivery, span)) = self.deliveries.pop_front() else {
            return Ok(());
        };
        match delivery.await {
            Ok(Ok(d)) => {
                if let Some(span) = span {
                    span.record(
                        "messaging.destination.partition.id",
                        d.partition.to_string(),
                    );
                    span.record("messaging.kafka.offset", d.offset);
                    self.delivered.push(span);
                }
                Ok(())
            }
            Ok(Err((e, _))) => Err(SinkError::Delivery(e)),
            Err(_) => Err(SinkError::Task("delivery report dropped".into())),
        }
    }

    /// Waits for every delivery report. Waiting here, rather than letting
    /// `commit_transaction` flush, matters: its flush only sees deliveries when the
    /// producer's polling thread next wakes, which adds up to 100 ms to every transaction.
    async fn confirm_all(&mut self) -> Result<(), SinkError> {
        while !self.deliveries.is_empty() {
            self.confirm_one().await?;
        }
        Ok(())
    }

    /// Enqueues one record, waiting while librdkafka's queue is full.
    async fn enqueue(&mut self, r: &KafkaRecord) -> Result<(), SinkError> {
        loop {
            match self.producer.send_result(future_record(r)) {
                Ok(delivery) => {
                    self.deliveries.push_back((delivery, r.span.clone()));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Deliveries free the queue; confirming them also bounds what we hold.
                    if self.deliveries.is_empty() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        self.confirm_one().await?;
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        while self.deliveries.len() > MAX_UNCONFIRMED {
            self.confirm_one().await?;
        }
        Ok(())
    }
}

impl Sink {
    /// Creates the producers; in exactly-once mode `init_transactions` fences any earlier
    /// producers with the same transactional ids and aborts their open transactions.
    pub async fn create(
        base: ClientConfig,
        delivery: Delivery,
        checkpoint_topic: &str,
        identity: &Identity,
        timeline: u32,
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
            // The broker answers CONCURRENT_TRANSACTIONS while it is still writing the previous
            // transaction's markers; librdkafka's default 100 ms back-off on that retry would add
            // 100 ms to every batch.
            .set("retry.backoff.ms", "5")
            .set("retry.backoff.max.ms", "100")
            // Small control requests (AddPartitionsToTxn, EndTxn) must not wait for Nagle.
            .set("socket.nagle.disable", "true");
        let expiry = config
            .get("transaction.timeout.ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(TXN_EXPIRY);
        let message_timeout = match delivery {
            // librdkafka requires it to be at most the transaction timeout. A record that
            // times out aborts its transaction, so nothing after it becomes visible either.
            Delivery::ExactlyOnce => expiry.min(Duration::from_secs(60)),
            // Without a transaction, a record that timed out leaves a gap that the records
            // behind it, still delivered, jump: the session then re-sends from the last
            // confirmed position, after them, and one key's events are out of order (the
            // chaos suite's broker pause showed it). Records never time out here; the
            // session waits for the broker, and requests are retried in order.
            Delivery::AtLeastOnce => Duration::ZERO,
        };
        config.set(
            "message.timeout.ms",
            message_timeout.as_millis().to_string(),
        );
        if config.get("batch.size").is_none() {
            config.set("batch.size", "1000000");
        }
        let mut producers = Vec::new();
        match delivery {
            Delivery::AtLeastOnce => producers.push(config.create()?),
            Delivery::ExactlyOnce => {
                for id in identity.transactional_ids() {
                    producers.push(transactional(&config, id, expiry).await?);
                }
            }
        }
        Ok(Sink {
            producers,
            delivery,
            checkpoint_topic: checkpoint_topic.to_string(),
            checkpoint_key: identity.key(),
            identity: identity.clone(),
            timeline,
            config,
            expiry,
        })
    }

    /// The last LSN this source committed to Kafka, read from the checkpoint topic to its end
    /// (read_committed). `None` when the source has never committed, or in at-least-once mode.
    ///
    /// A source with no checkpoint of its own but one under its legacy key (the slot name) was
    /// last published by a relay before checkpoints were namespaced: this is the first start
    /// after an upgrade. Those producers are fenced first, so one still running cannot commit
    /// past what is read, and the legacy checkpoint is read again and used.
    pub async fn read_checkpoint(
        &self,
        base: ClientConfig,
    ) -> Result<Option<Checkpoint>, SinkError> {
        if self.delivery != Delivery::ExactlyOnce {
            return Ok(None);
        }
        let read = || {
            checkpoint::read_async(
                base.clone(),
                self.checkpoint_topic.clone(),
                self.identity.clone(),
                checkpoint::read_limit(self.expiry),
            )
        };
        let found = read().await?;
        if found.current.is_some() || found.legacy.is_none() {
            return Ok(found.current);
        }
        for id in self.identity.legacy_transactional_ids() {
            // Its init_transactions did the fencing; the producer has nothing to send.
            drop(transactional(&self.config, id, self.expiry).await?);
        }
        let found = read().await?;
        if found.current.is_none() {
            tracing::info!(
                slot = %self.identity.slot,
                key = %self.identity.key(),
                "using the checkpoint a relay before namespaced checkpoints wrote under the slot name; from the next commit on it is kept under the key"
            );
        }
        Ok(found.current.or(found.legacy))
    }

    /// Starts the publishing pipeline. It reports `Ready` first and after each `Commit`, each
    /// committed transaction as `Acked`, in order, and stops after the channel closes and
    /// everything sent is acknowledged, or at the first failure.
    ///
    /// Exactly-once, transaction N+1 is filled while N commits; N+1 commits only after N did,
    /// so a checkpoint never passes a transaction that could still abort, and N+1's first
    /// record is sent only after all of N's were appended, so per-key order holds in the log.
    /// At-least-once, commits only wait for delivery; the idempotent producer keeps order.
    pub fn start<M: Send + 'static>(
        self,
    ) -> (
        tokio::sync::mpsc::Sender<Command<M>>,
        tokio::sync::mpsc::UnboundedReceiver<Progress<M>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(COMMANDS_QUEUED);
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
        mut commands: tokio::sync::mpsc::Receiver<Command<M>>,
        progress: &tokio::sync::mpsc::UnboundedSender<Progress<M>>,
    ) -> Result<(), SinkError> {
        let mut pending: std::collections::VecDeque<Pending<M>> = Default::default();
        let mut open: Option<Open> = None;
        let mut turn = 0;
        loop {
            tokio::select! {
                biased;
                done = oldest_done(&mut pending) => {
                    report(pending.pop_front().expect("it completed"), done, progress)?;
                }
                command = commands.recv() => match command {
                    None => break,
                    Some(Command::Append(records)) => {
                        let o = match &mut open {
                            Some(o) => o,
                            None => open.insert(self.open(&mut turn)?),
                        };
                        for r in &records {
                            o.enqueue(r).await?;
                        }
                    }
                    Some(Command::Commit { upto, meta }) => {
                        let mut o = match open.take() {
                            Some(o) => o,
                            None => self.open(&mut turn)?,
                        };
                        let started = o.started;
                        let closed = Instant::now();
                        let done = match self.delivery {
                            Delivery::AtLeastOnce => tokio::spawn(async move {
                                o.confirm_all().await?;
                                Ok(Phases {
                                    deliver: closed.elapsed(),
                                    ..Phases::default()
                                })
                            }),
                            Delivery::ExactlyOnce => {
                                o.enqueue(&KafkaRecord {
                                    topic: self.checkpoint_topic.clone(),
                                    key: self.checkpoint_key.clone(),
                                    value: checkpoint::value(&self.identity, self.timeline, upto)
                                        .into_bytes(),
                                    headers: Vec::new(),
                                    span: None,
                                    dead_letter: None,
                                })
                                .await?;
                                confirm_reporting(&mut o, &mut pending, progress).await?;
                                let delivered = Instant::now();
                                finish(&mut pending, progress).await?;
                                let ending = Instant::now();
                                tokio::spawn(async move {
                                    let result = commit(o.producer).await;
                                    // The producer spans end with the commit that made them visible.
                                    drop(o.delivered);
                                    result.map(|()| Phases {
                                        deliver: delivered - closed,
                                        previous: Some(ending - delivered),
                                        end_txn: Some(ending.elapsed()),
                                    })
                                })
                            }
                        };
                        pending.push_back(Pending { done, upto, meta, started });
                        let _ = progress.send(Progress::Ready);
                    }
                    Some(Command::Abort) => {
                        if let Some(o) = open.take() {
                            finish(&mut pending, progress).await?;
                            if self.delivery == Delivery::ExactlyOnce {
                                let p = o.producer;
                                blocking(move || p.abort_transaction(TXN_TIMEOUT)).await??;
                            }
                        }
                    }
                }
            }
        }
        finish(&mut pending, progress).await
    }

    /// The next producer in turn, with a transaction begun (exactly-once).
    fn open(&self, turn: &mut usize) -> Result<Open, SinkError> {
        let producer = self.producers[*turn % self.producers.len()].clone();
        *turn += 1;
        if self.delivery == Delivery::ExactlyOnce {
            // begin_transaction only changes local state; it does not block.
            producer.begin_transaction()?;
        }
        Ok(Open {
            producer,
            deliveries: Default::default(),
            delivered: Vec::new(),
            started: Instant::now(),
        })
    }
}

/// Waits for every delivery of `open` while reporting the pending batches that complete
/// meanwhile, so a commit is acknowledged (and its position confirmed to Postgres) when it
/// happens rather than after the next batch's deliveries.
async fn confirm_reporting<M>(
    open: &mut Open,
    pending: &mut std::collections::VecDeque<Pending<M>>,
    progress: &tokio::sync::mpsc::UnboundedSender<Progress<M>>,
) -> Result<(), SinkError> {
    // Pinned once: a delivery report taken from the queue is never dropped half-awaited.
    let confirm = open.confirm_all();
    tokio::pin!(confirm);
    loop {
        tokio::select! {
            biased;
            done = oldest_done(pending) => {
                report(pending.pop_front().expect("it completed"), done, progress)?;
            }
            confirmed = &mut confirm => return confirmed,
        }
    }
}

/// The outcome of the oldest pending batch, once it has one; never, while none is pending.
async fn oldest_done<M>(
    pending: &mut std::collections::VecDeque<Pending<M>>,
) -> Result<Result<Phases, SinkError>, tokio::task::JoinError> {
    match pending.front_mut() {
        Some(p) => (&mut p.done).await,
        None => std::future::pending().await,
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

/// A transactional producer under `id`; `init_transactions` fences every earlier producer
/// with that id and aborts its open transaction.
async fn transactional(
    config: &ClientConfig,
    id: String,
    expiry: Duration,
) -> Result<FutureProducer, SinkError> {
    let producer: FutureProducer = config
        .clone()
        .set("transactional.id", id)
        .set("transaction.timeout.ms", expiry.as_millis().to_string())
        .create()?;
    let p = producer.clone();
    blocking(move || p.init_transactions(TXN_TIMEOUT)).await??;
    Ok(producer)
}

fn report<M>(
    p: Pending<M>,
    done: Result<Result<Phases, SinkError>, tokio::task::JoinError>,
    progress: &tokio::sync::mpsc::UnboundedSender<Progress<M>>,
) -> Result<(), SinkError> {
    let phases = done.map_err(|e| SinkError::Task(e.to_string()))??;
    let _ = progress.send(Progress::Acked {
        upto: p.upto,
        meta: p.meta,
        elapsed: p.started.elapsed(),
        phases,
    });
    Ok(())
}

/// Commits the producer's transaction; aborts it when that fails.
async fn commit(producer: FutureProducer) -> Result<(), SinkError> {
    let p = producer.clone();
    let result = blocking(move || {
        settle(&p);
        p.commit_transaction(TXN_TIMEOUT)
    })
    .await?
    .map_err(SinkError::from);
    if result.is_err() {
        // Best effort: a fatal error (e.g. fenced) cannot abort; the session restarts with new
        // producers either way, and nothing of this transaction is visible.
        let _ = blocking(move || producer.abort_transaction(TXN_TIMEOUT)).await;
    }
    result
}

/// Waits until librdkafka has freed every message of the transaction, whose deliveries the
/// caller has all confirmed. rust-rdkafka's `commit_transaction` flushes first: while a message
/// still counts (its delivery report was handled but the message not yet freed by the producer's
/// polling thread, a race of microseconds) that flush polls the event queue for up to 100 ms,
/// and since the polling thread takes every event, nothing wakes it: the commit then takes
/// 100 ms. That happened to 1–3% of transactions and made most of the relay's p99.
fn settle(producer: &FutureProducer) {
    let deadline = Instant::now() + Duration::from_millis(100);
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(50));
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
