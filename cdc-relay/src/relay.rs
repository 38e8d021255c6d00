//! One source's replication session: slot → decode → encode → Kafka → acknowledge.
//!
//! The contract (docs/ARCHITECTURE.md, "Exactly-once into Kafka"):
//! - a WAL position is acknowledged to Postgres only after Kafka has committed every event
//!   before it, so nothing committed is ever lost;
//! - exactly-once: each batch of whole Postgres transactions is one Kafka transaction with the
//!   checkpoint; after a restart, transactions at or below the checkpoint are skipped;
//! - order per aggregate: events are produced in commit order, keyed by aggregate id; a batch
//!   is sent only after the one before it was appended (see `producer::Sink::start`);
//! - when the outbox is idle, keepalives move the acknowledged position so the slot does not
//!   pin WAL;
//! - the slot is the lock: a second relay waits on an active slot and takes over when it frees.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::client::ReplicationEvent;
use pgwire_replication::{ReplicationClient, ReplicationConfig, TlsConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Identifier};
use crate::encode::{encode_payload, headers, KafkaRecord, Origin};
use crate::metrics::{Metrics, SourceLabel, TopicLabel};
use crate::outbox::{OutboxColumns, OutboxError, OutboxEvent};
use crate::pgoutput::{self, Lsn, Message, PG_EPOCH_OFFSET_MICROS};
use crate::producer::{Outgoing, Progress, Sink, SinkError};
use crate::registry::SchemaCache;

/// Where events the relay cannot encode go when their event type is unknown (a known type's
/// go to `<topic>.dlq`).
pub const UNKNOWN_EVENT_TYPE_DLQ: &str = "kafkify.unknown.dlq";

pub struct RelayContext {
    pub config: Config,
    pub schemas: SchemaCache,
    pub metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("replication slot `{0}` is held by another relay; standing by")]
    SlotBusy(String),
    #[error("replication slot `{slot}` was invalidated (wal_status = lost): WAL it needed was removed, so events may be missing. Investigate, then drop the slot to start afresh from the current position")]
    SlotLost { slot: String },
    #[error("Postgres: {0}")]
    Postgres(String),
    #[error("replication: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("pgoutput: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("outbox: {0}")]
    Outbox(#[from] OutboxError),
    #[error("replication stream ended unexpectedly")]
    StreamEnded,
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl SessionError {
    /// Every label [`SessionError::kind`] gives.
    pub const KINDS: &'static [&'static str] = &[
        "slot_busy",
        "slot_lost",
        "postgres",
        "replication",
        "decode",
        "outbox",
        "kafka",
    ];

    /// A label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::SlotBusy(_) => "slot_busy",
            SessionError::SlotLost { .. } => "slot_lost",
            SessionError::Postgres(_) => "postgres",
            SessionError::Replication(_) | SessionError::StreamEnded => "replication",
            SessionError::Decode(_) => "decode",
            SessionError::Outbox(_) => "outbox",
            SessionError::Sink(_) => "kafka",
        }
    }

    /// How long to wait before the next session, given the current back-off.
    fn retry_after(&self, backoff: Duration) -> Duration {
        match self {
            // Polling a busy slot is cheap, and fast polling means fast take-over.
            SessionError::SlotBusy(_) => Duration::from_secs(1),
            SessionError::SlotLost { .. } => Duration::from_secs(30),
            _ => backoff,
        }
    }
}

/// Streams `source` until `shutdown`, starting a new session after every failure with
/// exponential back-off (0.5 s doubling to 30 s; reset after a session that streamed a while).
pub async fn run_source(ctx: Arc<RelayContext>, source: Identifier, shutdown: CancellationToken) {
    let label = SourceLabel {
        source: source.0.clone(),
    };
    let mut backoff = Duration::from_millis(500);
    let mut last_busy_log: Option<Instant> = None;
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let result = session(&ctx, &source, &shutdown).await;
        ctx.metrics.streaming.get_or_create(&label).set(0);
        let err = match result {
            Ok(()) => break,
            Err(e) => e,
        };
        ctx.metrics.error(&source.0, err.kind());
        match &err {
            SessionError::SlotBusy(_) => {
                if last_busy_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::info!(source = %source.0, "{err}");
                    last_busy_log = Some(Instant::now());
                }
            }
            _ => {
                tracing::error!(source = %source.0, error = %err, retry_in = ?err.retry_after(backoff), "session failed")
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        let wait = err.retry_after(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!(source = %source.0, "source stopped");
}

/// Creates the slot if it is missing; refuses a slot whose WAL is gone.
async fn ensure_slot(client: &tokio_postgres::Client, slot: &str) -> Result<(), SessionError> {
    let pg = |e: tokio_postgres::Error| SessionError::Postgres(platform::db::describe(&e));
    let row = client
        .query_opt(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg)?;
    match row {
        Some(row) => {
            let status: Option<String> = row.get(0);
            if status.as_deref() == Some("lost") {
                return Err(SessionError::SlotLost {
                    slot: slot.to_string(),
                });
            }
        }
        None => {
            // Two relays starting at once may both try; the loser's error is harmless.
            match client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
            {
                Ok(_) => tracing::info!(slot, "created replication slot"),
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
                Err(e) => return Err(pg(e)),
            }
        }
    }
    Ok(())
}

fn replication_config(
    config: &Config,
    source: &Identifier,
    slot: &str,
) -> Result<ReplicationConfig, SessionError> {
    let pg = config.source_url(source);
    let url = &pg.config;
    let host = match url.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let password = url
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let by_ip = host.parse::<std::net::IpAddr>().is_ok();
    Ok(ReplicationConfig::new(
        host,
        url.get_user().unwrap_or_default(),
        password,
        source.0.clone(),
        slot.to_string(),
        config.publication.0.clone(),
    )
    .with_port(url.get_ports().first().copied().unwrap_or(5432))
    // As for every other connection (platform::db::PgUrl): TLS, with the server verified,
    // exactly when the URL says sslmode=require. pgwire-replication checks host names only, so
    // for a server addressed by IP it verifies the certificate chain (the pool's connections
    // to the same server check the IP too).
    .with_tls(match (pg.requires_tls(), by_ip) {
        (false, _) => TlsConfig::disabled(),
        (true, true) => TlsConfig::verify_ca(pg.root_cert.clone()),
        (true, false) => TlsConfig::verify_full(pg.root_cert.clone()),
    })
    // 0: resume at the slot's confirmed position.
    .with_start_lsn(pgwire_replication::Lsn(0))
    // Acknowledgements reach the server within a second, so slot lag reflects reality.
    .with_status_interval(Duration::from_secs(1))
    .with_wakeup_interval(Duration::from_secs(10))
    .with_application_name("kafkify-cdc-relay"))
}

/// A Postgres transaction being received.
struct OpenTx {
    commit_ts_micros: i64,
    records: Vec<KafkaRecord>,
}

/// Whole Postgres transactions waiting for their Kafka transaction.
#[derive(Default)]
struct Batch {
    records: Vec<KafkaRecord>,
    /// (commit time, events) of each transaction in the batch, for the latency histogram.
    commits: Vec<(i64, usize)>,
    last_lsn: Option<Lsn>,
    first_at: Option<Instant>,
}

async fn session(
    ctx: &RelayContext,
    source: &Identifier,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let config = &ctx.config;
    let slot = config.slot(source);
    let sql = platform::db::connect(&config.source_url(source))
        .await
        .map_err(|e| SessionError::Postgres(e.to_string()))?;
    ensure_slot(&sql, &slot).await?;
    drop(sql);

    let mut repl = ReplicationClient::connect(replication_config(config, source, &slot)?).await?;
    if let Err(e) = repl.wait_started().await {
        let text = e.to_string();
        if text.contains("is active for PID") || text.contains("55006") {
            return Err(SessionError::SlotBusy(slot));
        }
        return Err(e.into());
    }

    // Only now, holding the slot, may this process fence the previous producer.
    let kafka = || {
        config
            .kafka
            .client_config(&format!("cdc-relay-{}", source.0))
    };
    let sink = Sink::create(kafka(), config.delivery, &config.checkpoint_topic, &slot).await?;
    let checkpoint = sink.read_checkpoint(kafka()).await?;
    let label = SourceLabel {
        source: source.0.clone(),
    };
    ctx.metrics.streaming.get_or_create(&label).set(1);
    tracing::info!(source = %source.0, slot, checkpoint = ?checkpoint.map(|l| l.to_string()), "streaming");

    let mut stream = Stream {
        ctx,
        source,
        label,
        checkpoint: checkpoint.unwrap_or_default(),
        relations: HashMap::new(),
        open: None,
        batch: Batch::default(),
        in_flight: 0,
    };
    let result = stream.run(&mut repl, sink, shutdown).await;
    repl.stop();
    let _ = tokio::time::timeout(Duration::from_secs(5), repl.shutdown()).await;
    result
}

struct Stream<'a> {
    ctx: &'a RelayContext,
    source: &'a Identifier,
    label: SourceLabel,
    /// Everything at or below this commit LSN is in Kafka already.
    checkpoint: Lsn,
    relations: HashMap<u32, Option<Result<OutboxColumns, OutboxError>>>,
    open: Option<OpenTx>,
    batch: Batch,
    /// Batches handed to the sink and not yet acknowledged by Kafka.
    in_flight: usize,
}

/// What the stream needs back when Kafka acknowledges a batch.
struct Receipt {
    /// (commit time, events) of each transaction in the batch, for the latency histogram.
    commits: Vec<(i64, usize)>,
    per_topic: HashMap<String, u64>,
    events: usize,
}

impl Stream<'_> {
    async fn run(
        &mut self,
        repl: &mut ReplicationClient,
        sink: Sink,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let linger = self.ctx.config.batch_linger;
        let max_events = self.ctx.config.batch_max_events as usize;
        let (batches, mut progress) = sink.start::<Receipt>();
        // The sink takes a batch only when it can send it at once; until then the next batch
        // keeps growing, so a slow Kafka means bigger transactions, not a queue of small ones.
        let mut sink_ready = false;
        loop {
            let full = self.batch.records.len() >= max_events;
            let flush_at = match self.batch.first_at {
                Some(t) if sink_ready && !full => Some(tokio::time::Instant::from_std(t + linger)),
                Some(_) if sink_ready => Some(tokio::time::Instant::now()),
                _ => None,
            };
            tokio::select! {
                biased;
                // Stop first: what is complete is published, a half-received transaction is
                // left for the next run (Postgres re-sends it).
                _ = shutdown.cancelled() => break,
                p = progress.recv() => sink_ready |= self.progress(p, repl)?,
                _ = sleep_until(flush_at), if flush_at.is_some() => {
                    self.hand_over(&batches).await?;
                    sink_ready = false;
                }
                // A full batch waits for the sink: Postgres holds the rest meanwhile.
                event = repl.recv(), if !full => match event? {
                    Some(event) => self.handle(event, repl)?,
                    None => return Err(SessionError::StreamEnded),
                },
            }
        }
        // Publish what is complete, then wait until Kafka has acknowledged all of it.
        while !self.batch.records.is_empty() || self.in_flight > 0 {
            if sink_ready && !self.batch.records.is_empty() {
                self.hand_over(&batches).await?;
                sink_ready = false;
            }
            sink_ready |= self.progress(progress.recv().await, repl)?;
        }
        Ok(())
    }

    /// Applies one report of the sink; true when it takes the next batch.
    fn progress(
        &mut self,
        report: Option<Progress<Receipt>>,
        repl: &ReplicationClient,
    ) -> Result<bool, SessionError> {
        match report {
            Some(Progress::Ready) => Ok(true),
            Some(Progress::Acked {
                upto,
                meta,
                elapsed,
            }) => {
                self.acked(repl, upto, meta, elapsed);
                Ok(false)
            }
            Some(Progress::Failed(e)) => Err(e.into()),
            None => Err(SinkError::Task("the Kafka pipeline stopped".into()).into()),
        }
    }

    fn handle(
        &mut self,
        event: ReplicationEvent,
        repl: &ReplicationClient,
    ) -> Result<(), SessionError> {
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                self.open = Some(OpenTx {
                    commit_ts_micros: commit_time_micros + PG_EPOCH_OFFSET_MICROS,
                    records: Vec::new(),
                });
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => match pgoutput::decode(&data)? {
                Message::Relation(rel) => {
                    let cols = OutboxColumns::of(&rel);
                    if cols.is_none() {
                        tracing::warn!(table = %format!("{}.{}", rel.namespace, rel.name), "publication carries a table that is not an outbox; its changes are ignored");
                    }
                    self.relations.insert(rel.oid, cols);
                }
                Message::Insert { relation, new } => {
                    let cols = match self.relations.get(&relation) {
                        Some(Some(Ok(cols))) => cols,
                        Some(Some(Err(e))) => return Err(e.clone().into()),
                        Some(None) => return Ok(()),
                        None => {
                            return Err(pgoutput::DecodeError::Malformed(format!(
                                "insert into relation {relation} before its Relation message"
                            ))
                            .into())
                        }
                    };
                    let event = cols.event(&new)?;
                    let Some(open) = self.open.as_mut() else {
                        return Err(pgoutput::DecodeError::Malformed(
                            "insert outside a transaction".into(),
                        )
                        .into());
                    };
                    let origin = Origin {
                        lsn: Lsn(wal_start.as_u64()),
                        commit_ts_micros: open.commit_ts_micros,
                    };
                    open.records.push(record(self.ctx, &event, origin));
                }
                // Updates and deletes are not published; types, origins, truncates and
                // messages carry nothing for Kafka.
                _ => {}
            },
            ReplicationEvent::Commit { end_lsn, .. } => {
                let end = Lsn(end_lsn.as_u64());
                let open = self.open.take().unwrap_or(OpenTx {
                    commit_ts_micros: 0,
                    records: Vec::new(),
                });
                if end <= self.checkpoint {
                    // Re-sent after a restart; Kafka has it.
                    self.ctx
                        .metrics
                        .transactions_skipped
                        .get_or_create(&self.label)
                        .inc();
                    if self.batch.records.is_empty() && self.in_flight == 0 {
                        repl.update_applied_lsn(end_lsn);
                    }
                } else if open.records.is_empty()
                    && self.batch.records.is_empty()
                    && self.in_flight == 0
                {
                    repl.update_applied_lsn(end_lsn);
                } else {
                    if !open.records.is_empty() {
                        self.batch
                            .commits
                            .push((open.commit_ts_micros, open.records.len()));
                        self.batch.records.extend(open.records);
                        self.batch.first_at.get_or_insert_with(Instant::now);
                    }
                    self.batch.last_lsn = Some(end);
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Nothing received is waiting for Kafka: the slot may move to where the server
                // is, even if only other tables wrote WAL.
                if self.open.is_none()
                    && self.batch.records.is_empty()
                    && self.batch.last_lsn.is_none()
                    && self.in_flight == 0
                {
                    repl.update_applied_lsn(wal_end);
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => return Err(SessionError::StreamEnded),
        }
        Ok(())
    }

    /// Hands the batch of complete transactions to the sink.
    async fn hand_over(
        &mut self,
        batches: &tokio::sync::mpsc::Sender<Outgoing<Receipt>>,
    ) -> Result<(), SessionError> {
        let Some(upto) = self.batch.last_lsn else {
            return Ok(());
        };
        let batch = std::mem::take(&mut self.batch);
        let mut per_topic: HashMap<String, u64> = HashMap::new();
        for r in &batch.records {
            *per_topic.entry(r.topic.clone()).or_default() += 1;
        }
        let meta = Receipt {
            commits: batch.commits,
            per_topic,
            events: batch.records.len(),
        };
        batches
            .send(Outgoing {
                records: batch.records,
                upto,
                meta,
            })
            .await
            .map_err(|_| SinkError::Task("the Kafka pipeline stopped".into()))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Kafka holds everything up to `upto`: Postgres may release it.
    fn acked(&mut self, repl: &ReplicationClient, upto: Lsn, receipt: Receipt, elapsed: Duration) {
        self.in_flight -= 1;
        let metrics = &self.ctx.metrics;
        metrics.kafka_transaction.observe(elapsed.as_secs_f64());
        metrics.batch_events.observe(receipt.events as f64);
        let mut upto = upto;
        // Transactions without outbox events that arrived while batches were in flight.
        if self.in_flight == 0 && self.batch.records.is_empty() {
            if let Some(lsn) = self.batch.last_lsn.take() {
                upto = upto.max(lsn);
            }
        }
        repl.update_applied_lsn(pgwire_replication::Lsn(upto.0));
        self.checkpoint = self.checkpoint.max(upto);
        metrics
            .confirmed_lsn
            .get_or_create(&self.label)
            .set(upto.0 as i64);
        let now = now_micros();
        for (commit_ts, count) in receipt.commits {
            let latency = (now - commit_ts).max(0) as f64 / 1e6;
            for _ in 0..count {
                metrics.commit_to_ack.observe(latency);
            }
        }
        for (topic, count) in receipt.per_topic {
            if topic.ends_with(".dlq") {
                metrics
                    .events_dead_lettered
                    .get_or_create(&TopicLabel { topic })
                    .inc_by(count);
            } else {
                metrics
                    .events_published
                    .get_or_create(&TopicLabel { topic })
                    .inc_by(count);
            }
        }
        tracing::debug!(source = %self.source.0, events = receipt.events, upto = %upto, "batch acknowledged");
    }
}

/// The Kafka record of one outbox event: Avro on its topic, or, when it cannot be encoded, the
/// raw payload on the dead-letter topic with the reason in a header. Either way it is published
/// in the same transaction as its neighbours, so nothing is skipped silently.
fn record(ctx: &RelayContext, event: &OutboxEvent, origin: Origin) -> KafkaRecord {
    let mut h = headers(event, origin);
    let reason = match ctx.schemas.get(&event.event_type) {
        Some((id, schema)) => match encode_payload(&event.payload, *id, schema) {
            Ok(value) => {
                let topic = ctx.config.topic(&event.event_type);
                let span = publish_span(event, origin, &topic, &mut h);
                return KafkaRecord {
                    topic,
                    key: event.aggregate_id.clone(),
                    value,
                    headers: h,
                    span,
                };
            }
            Err(e) => e.to_string(),
        },
        None => format!("unknown event type `{}`", event.event_type),
    };
    let topic = match ctx.schemas.get(&event.event_type) {
        Some(_) => schemas::dlq_topic(&ctx.config.topic(&event.event_type)),
        None => ctx.config.topic(UNKNOWN_EVENT_TYPE_DLQ),
    };
    tracing::warn!(event_id = %event.id, event_type = %event.event_type, %reason, %topic, "dead-lettering an outbox event");
    h.push(("dlq_reason", reason));
    h.push(("dlq_origin", "cdc-relay".to_string()));
    let span = publish_span(event, origin, &topic, &mut h);
    KafkaRecord {
        topic,
        key: event.aggregate_id.clone(),
        value: event.payload.clone().into_bytes(),
        headers: h,
        span,
    }
}

/// For an event written under a trace: the producer span (semantic conventions for messaging)
/// that continues it, whose context replaces the `traceparent` header so consumers become its
/// children. Untraced events get no span: at tens of thousands of events a second, spans
/// nobody asked for would cost more than the rest of the relay's work per event.
fn publish_span(
    event: &OutboxEvent,
    origin: Origin,
    topic: &str,
    headers: &mut [(&'static str, String)],
) -> Option<tracing::Span> {
    let parent = event.traceparent.as_deref()?;
    let span = tracing::info_span!(
        target: platform::trace::TARGET,
        "publish",
        otel.name = format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = topic,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
        messaging.kafka.message.key = event.aggregate_id.as_str(),
        messaging.message.id = event.id.as_str(),
        kafkify.event_type = event.event_type.as_str(),
        kafkify.source_lsn = origin.lsn.to_string(),
        kafkify.commit_ts_micros = origin.commit_ts_micros,
    );
    platform::trace::continue_from(&span, Some(parent));
    if let Some(tp) = platform::trace::traceparent_of(&span, Some(parent)) {
        for (name, value) in headers.iter_mut() {
            if *name == "traceparent" {
                *value = tp.clone();
            }
        }
    }
    Some(span)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// Polls each source's slot lag every few seconds for the `slot_lag_bytes` gauge.
pub async fn watch_slot_lag(ctx: Arc<RelayContext>, shutdown: CancellationToken) {
    let mut clients: HashMap<String, tokio_postgres::Client> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for source in &ctx.config.sources {
            if clients.get(&source.0).is_none_or(|c| c.is_closed()) {
                match platform::db::connect(&ctx.config.source_url(source)).await {
                    Ok(c) => {
                        clients.insert(source.0.clone(), c);
                    }
                    Err(_) => continue,
                }
            }
            let Some(client) = clients.get(&source.0) else {
                continue;
            };
            let slot = ctx.config.slot(source);
            let row = client
                .query_opt(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await;
            if let Ok(Some(row)) = row {
                let lag: Option<i64> = row.get(0);
                ctx.metrics
                    .slot_lag
                    .get_or_create(&SourceLabel {
                        source: source.0.clone(),
                    })
                    .set(lag.unwrap_or(0));
            }
        }
    }
}
