//! One source's replication session, the I/O half: the slot, TLS, the replication stream,
//! retry, and the slot-lag watcher. What to publish and what to acknowledge is decided by
//! `machine.rs`; records are built by `record.rs`; Kafka is `producer.rs`.
//!
//! The slot is the lock: a second relay waits on an active slot and takes over when it frees.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::client::{IdentifySystem, ReplicationEvent};
use pgwire_replication::{ReplicationClient, ReplicationConfig, TlsConfig};
use platform::retry::Backoff;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, Checkpoint, Identity};
use crate::config::{Config, Delivery, Identifier, MissingSlot};
use crate::encode::{KafkaRecord, Origin};
use crate::error::SessionError;
use crate::health::{Health, Primary};
use crate::machine::{Action, Input, Limits, Machine, Violation};
use crate::metrics::{DeadLetterLabel, Metrics, PhaseLabel, SourceLabel, TopicLabel};
use crate::outbox::{OutboxColumns, OutboxError};
use crate::pgoutput::{self, Lsn, Message, PG_EPOCH_OFFSET_MICROS};
use crate::producer::{Command, Phases, Progress, Sink, SinkError};
use crate::record;
use crate::registry::SchemaCache;

pub struct RelayContext {
    pub config: Config,
    pub schemas: SchemaCache,
    pub metrics: Metrics,
    pub health: Arc<Health>,
}

/// Streams `source` until `shutdown`, starting a new session after every failure with
/// exponential back-off (0.5 s doubling to 30 s; reset after a session that streamed a while).
pub async fn run_source(ctx: Arc<RelayContext>, source: Identifier, shutdown: CancellationToken) {
    let label = SourceLabel {
        source: source.0.clone(),
    };
    let mut backoff = Backoff::session();
    let mut last_busy_log: Option<Instant> = None;
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        // Where in the stream the session got to: the transaction a failure happened in.
        let mut position = None;
        let result = session(&ctx, &source, &shutdown, &mut position).await;
        ctx.metrics.streaming.get_or_create(&label).set(0);
        ctx.health.with(&source.0, |h| h.stopped_streaming());
        let err = match result {
            Ok(()) => break,
            Err(e) => e,
        };
        ctx.metrics.error(&source.0, err.kind());
        let class = err.class();
        let stall = ctx.health.with(&source.0, |h| {
            h.failed(position, class, &err.to_string()).cloned()
        });
        ctx.metrics
            .stalled
            .get_or_create(&label)
            .set(i64::from(stall.is_some()));
        match (&err, stall) {
            (SessionError::SlotBusy(_), _) => {
                if last_busy_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::info!(source = %source.0, "{err}");
                    last_busy_log = Some(Instant::now());
                }
            }
            (_, None) => {
                tracing::error!(source = %source.0, error = %err, class = class.as_str(), retry_in = ?err.retry_after(backoff.peek()), "session failed")
            }
            (_, Some(stall)) => {
                tracing::error!(source = %source.0, error = %err, class = class.as_str(), retry_in = ?err.retry_after(backoff.peek()), "session failed; source {stall}")
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let wait = err.retry_after(backoff.next_delay());
        if !platform::retry::sleep(wait, &shutdown).await {
            break;
        }
    }
    tracing::info!(source = %source.0, "source stopped");
}

/// What the server says of an existing slot.
struct SlotState {
    /// PostgreSQL 17+: whether it is a failover slot (kept on the standbys).
    failover: Option<bool>,
}

/// The slot, if it exists; refuses a slot whose WAL is gone.
async fn slot_state(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotState>, SessionError> {
    // `failover` is a column from PostgreSQL 17 on; through jsonb the query fits every version.
    let row = client
        .query_opt(
            "SELECT wal_status, (to_jsonb(s) ->> 'failover')::bool
               FROM pg_replication_slots s WHERE slot_name = $1",
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
            Ok(Some(SlotState {
                failover: row.get(1),
            }))
        }
        None => Ok(None),
    }
}

/// Creates the slot, logging its consistent point (where streaming will start). On
/// PostgreSQL 17+ it is a failover slot: a standby with `sync_replication_slots` keeps a copy,
/// so a promoted standby has it, at a position no later than what Kafka has.
async fn create_slot(
    client: &tokio_postgres::Client,
    slot: &str,
    failover: bool,
) -> Result<(), SessionError> {
    let sql = if failover {
        // (slot, plugin, temporary, two-phase, failover)
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    // Two relays starting at once may both try; the loser's error is harmless.
    match client.query_one(sql, &[&slot]).await {
        Ok(row) => {
            let at: String = row.get(0);
            tracing::info!(slot, at, failover, "created replication slot");
            Ok(())
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) => Err(pg(e)),
    }
}

/// Refuses a partitioned outbox table that the publication sends as its partitions: the
/// relay knows the outbox by its name, so the partitions' rows would be ignored. With
/// `publish_via_partition_root` they arrive as the table's own.
pub async fn check_publication(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<(), SessionError> {
    let row = client
        .query_opt(
            "SELECT format('%I.%I', n.nspname, c.relname)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relname = $2 AND c.relkind = 'p'
                AND NOT (SELECT pubviaroot FROM pg_publication WHERE pubname = $1)
              LIMIT 1",
            &[&publication, &crate::outbox::OUTBOX_TABLE],
        )
        .await
        .map_err(pg)?;
    match row {
        Some(row) => Err(SessionError::PartitionedOutbox {
            table: row.get(0),
            publication: publication.to_string(),
        }),
        None => Ok(()),
    }
}

fn pg(e: tokio_postgres::Error) -> SessionError {
    SessionError::Postgres(platform::db::describe(&e))
}

/// A missing slot while Kafka holds a checkpoint for it means the WAL between the two was
/// never read here: refuse, or with RELAY_MISSING_SLOT=create, say so and go on. True when the
/// session must not skip by the old checkpoint (its LSNs belong to the slot that is gone).
async fn check_missing_slot(
    config: &Config,
    kafka: rdkafka::ClientConfig,
    source: &Identifier,
    identity: &Identity,
) -> Result<bool, SessionError> {
    if config.delivery != Delivery::ExactlyOnce {
        return Ok(false);
    }
    let slot = identity.slot.as_str();
    let found = checkpoint::read_async(
        kafka,
        config.checkpoint_topic.clone(),
        identity.clone(),
        checkpoint::read_limit(config.transaction_timeout),
    )
    .await?;
    let Some(at) = found.current.or(found.legacy).map(|c| c.lsn) else {
        return Ok(false);
    };
    match config.missing_slot {
        MissingSlot::Refuse => Err(SessionError::SlotMissing {
            slot: slot.to_string(),
            checkpoint: at,
        }),
        MissingSlot::Create => {
            tracing::warn!(
                source = %source.0,
                slot,
                checkpoint = %at,
                "RELAY_MISSING_SLOT=create: creating a new slot although Kafka holds a checkpoint; events committed after the checkpoint and before the new slot's position (logged next) may be missing"
            );
            Ok(true)
        }
    }
}

/// A checkpoint past the server's WAL means the server lost transactions that are already in
/// Kafka (an asynchronous standby promoted without them, a restore): the transactions it
/// writes next would get LSNs at or below the checkpoint and be skipped as published.
fn check_against_server(
    checkpoint: &Checkpoint,
    server: &IdentifySystem,
    slot: &str,
) -> Result<(), SessionError> {
    let server_at = Lsn(server.xlogpos.0);
    if checkpoint.lsn > server_at {
        return Err(SessionError::CheckpointAhead {
            slot: slot.to_string(),
            checkpoint: checkpoint.lsn,
            server_at,
            timeline: server.timeline,
        });
    }
    if let Some(written) = checkpoint.timeline.filter(|t| *t != server.timeline) {
        tracing::warn!(
            slot,
            checkpoint = %checkpoint.lsn,
            checkpoint_timeline = written,
            server_timeline = server.timeline,
            "the checkpoint was written on another Postgres timeline (the server was promoted or restored since); it is not past the server's WAL, so streaming goes on from it"
        );
    }
    Ok(())
}

fn replication_config(
    config: &Config,
    source: &Identifier,
    slot: &str,
    host: &str,
    port: u16,
) -> ReplicationConfig {
    let pg = config.source_url(source);
    let url = &pg.config;
    let password = url
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let by_ip = host.parse::<std::net::IpAddr>().is_ok();
    ReplicationConfig::new(
        host,
        url.get_user().unwrap_or_default(),
        password,
        source.0.clone(),
        slot.to_string(),
        config.publication.0.clone(),
    )
    .with_port(port)
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
    .with_buffer_size(config.read_ahead as usize)
    .with_application_name("kafkify-cdc-relay")
}

/// How long one host may take to answer before the next is tried.
const HOST_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the replication session on the primary: each host of `DATABASE_URL` in turn, asked on
/// the session itself (so the answer holds for the stream that follows) whether it is in
/// recovery. A standby, which PostgreSQL 16+ would also stream from, is passed over: the slot
/// and its checkpoint belong to the primary.
async fn connect_primary(
    config: &Config,
    source: &Identifier,
    slot: &str,
) -> Result<(ReplicationClient, IdentifySystem, Primary), SessionError> {
    let mut passed = Vec::new();
    for (host, port) in config.source_url(source).hosts() {
        let attempt = tokio::time::timeout(HOST_TIMEOUT, async {
            let mut repl = ReplicationClient::connect_gated(replication_config(
                config, source, slot, &host, port,
            ))
            .await?;
            let server = repl.identify_system().await?;
            let rows = repl
                .simple_query(
                    "SELECT pg_is_in_recovery()::text, current_setting('server_version_num'),
                            split_part(current_setting('server_version'), ' ', 1)",
                )
                .await?;
            let text = |i: usize| {
                rows.first()
                    .and_then(|r| r.get(i).cloned().flatten())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            };
            Ok::<_, SessionError>((repl, server, text(0) == "true", text(1), text(2)))
        })
        .await;
        match attempt {
            Ok(Ok((repl, server, false, num, version))) => {
                let primary = Primary {
                    host,
                    port,
                    version_num: num.parse().unwrap_or(0),
                    version,
                };
                return Ok((repl, server, primary));
            }
            Ok(Ok(_)) => passed.push(format!("{host}:{port} is a standby")),
            Ok(Err(e)) => passed.push(format!("{host}:{port}: {e}")),
            Err(_) => passed.push(format!("{host}:{port}: no answer within {HOST_TIMEOUT:?}")),
        }
    }
    Err(SessionError::NoPrimary(passed.join("; ")))
}

async fn session(
    ctx: &RelayContext,
    source: &Identifier,
    shutdown: &CancellationToken,
    position: &mut Option<Lsn>,
) -> Result<(), SessionError> {
    let config = &ctx.config;
    let slot = config.slot(source);
    let kafka = || {
        config
            .kafka
            .client_config(&format!("cdc-relay-{}", source.0))
    };
    // The replication session first answers IDENTIFY_SYSTEM: the checkpoint belongs to this
    // Postgres cluster, and must not be ahead of its WAL.
    let (mut repl, server, primary) = connect_primary(config, source, &slot).await?;
    let identity = config.identity(source, server.system_id.clone());
    // The same server as the replication session, whatever the other hosts are now.
    let sql = platform::db::connect(
        &config
            .source_url(source)
            .on_host(&primary.host, primary.port),
    )
    .await
    .map_err(|e| SessionError::Postgres(e.to_string()))?;
    check_publication(&sql, &config.publication.0).await?;
    let mut fresh = false;
    match slot_state(&sql, &slot).await? {
        None => {
            fresh = check_missing_slot(config, kafka(), source, &identity).await?;
            create_slot(&sql, &slot, primary.has_failover_slots()).await?;
        }
        // A slot made before PostgreSQL 17, or by hand: made a failover slot, so a standby
        // keeps it from now on. Only possible while no session holds it.
        Some(SlotState {
            failover: Some(false),
        }) if primary.has_failover_slots() => {
            match repl
                .simple_query(&format!("ALTER_REPLICATION_SLOT {slot} (FAILOVER true)"))
                .await
            {
                Ok(_) => tracing::info!(slot, "made the slot a failover slot"),
                Err(e) if e.to_string().contains("is active for PID") => {
                    return Err(SessionError::SlotBusy(slot))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Some(_) => {}
    }
    drop(sql);

    repl.start().await?;
    if let Err(e) = repl.wait_started().await {
        let text = e.to_string();
        if text.contains("is active for PID") || text.contains("55006") {
            return Err(SessionError::SlotBusy(slot));
        }
        return Err(e.into());
    }

    // Only now, holding the slot, may this process fence the previous producer.
    let producer = {
        let mut c = kafka();
        // librdkafka refuses a record above message.max.bytes (1,000,000 by default, below
        // Kafka's own limit); record.rs keeps every record within ours. A batch of small
        // records must fit the topic's limit too.
        let limit = config.max_record_bytes;
        c.set("message.max.bytes", limit.to_string())
            .set(
                "batch.size",
                limit.saturating_sub(1024).min(1_000_000).to_string(),
            )
            // What librdkafka holds until delivered: a quarter of the buffer for each of the
            // source's two producers; the other half is chunks queued for them
            // (producer::COMMANDS_QUEUED × chunk_bytes below).
            .set(
                "queue.buffering.max.kbytes",
                (config.buffer_bytes / 4 / 1024).to_string(),
            )
            .set(
                "transaction.timeout.ms",
                config.transaction_timeout.as_millis().to_string(),
            )
            // librdkafka refuses a transaction timeout shorter than its socket time-out.
            .set(
                "socket.timeout.ms",
                config
                    .transaction_timeout
                    .as_millis()
                    .min(60_000)
                    .to_string(),
            );
        c
    };
    let sink = Sink::create(
        producer,
        config.delivery,
        &config.checkpoint_topic,
        &identity,
        server.timeline,
    )
    .await?;
    let checkpoint = sink.read_checkpoint(kafka()).await?;
    if let Some(c) = checkpoint.as_ref().filter(|_| !fresh) {
        check_against_server(c, &server, &slot)?;
    }
    let checkpoint = checkpoint.map(|c| c.lsn);
    // Read every session: a stalled source is retried, and the retry after `kafkifyctl skip`
    // finds the skip.
    let skips = crate::operator::read_async(
        kafka(),
        crate::operator::topic(&config.checkpoint_topic),
        identity.clone(),
        checkpoint::read_limit(config.transaction_timeout),
    )
    .await?;
    let label = SourceLabel {
        source: source.0.clone(),
    };
    ctx.metrics.streaming.get_or_create(&label).set(1);
    let from = format!("{primary}, timeline {}", server.timeline);
    tracing::info!(source = %source.0, slot, checkpoint = ?checkpoint.map(|l| l.to_string()), from, "streaming");
    ctx.health.with(&source.0, |h| h.streaming_from(primary));

    let limits = Limits {
        max_events: config.batch_max_events as usize,
        linger: config.batch_linger,
        chunk_events: CHUNK_EVENTS,
        chunk_bytes: (config.buffer_bytes as usize / 2 / crate::producer::COMMANDS_QUEUED)
            .min(1 << 20),
        // Leave the commit time to spare before the broker's own deadline.
        transaction_timeout: config.transaction_timeout * 9 / 10,
        checkpoint_refresh: (config.delivery == Delivery::ExactlyOnce)
            .then_some(CHECKPOINT_REFRESH),
    };
    let mut stream = Stream {
        ctx,
        source,
        label,
        machine: Machine::new(
            if fresh {
                Lsn::default()
            } else {
                checkpoint.unwrap_or_default()
            },
            limits,
        ),
        relations: HashMap::new(),
        per_topic: HashMap::new(),
        position: None,
        skips,
        operator_skip: None,
        read_rows: false,
    };
    let result = stream.run(&mut repl, sink, shutdown).await;
    *position = stream.position;
    repl.stop();
    let _ = tokio::time::timeout(Duration::from_secs(5), repl.shutdown()).await;
    result
}

struct Stream<'a> {
    ctx: &'a RelayContext,
    source: &'a Identifier,
    label: SourceLabel,
    machine: Machine<KafkaRecord>,
    relations: HashMap<u32, Option<Result<OutboxColumns, OutboxError>>>,
    /// Events per (topic, dead-letter reason) in the open Kafka transaction.
    per_topic: HashMap<(String, Option<&'static str>), u64>,
    /// The last transaction begun or committed: where a failure happened.
    position: Option<Lsn>,
    /// Transactions an operator skipped (by commit LSN), with the reason.
    skips: HashMap<Lsn, String>,
    /// The open transaction is one of them: why.
    operator_skip: Option<String>,
    /// The open transaction has outbox rows for Kafka (its commit is then timed).
    read_rows: bool,
}

/// Rows are handed to Kafka in chunks of at most this many (see `machine::Limits`).
const CHUNK_EVENTS: usize = 1000;

/// An idle source re-writes its checkpoint this often (see `machine::Limits`): one small
/// Kafka transaction per idle source every 10 s, against a restart that would otherwise read
/// the whole checkpoint topic back to the source's last event.
const CHECKPOINT_REFRESH: Duration = Duration::from_secs(10);

/// What the stream needs back when Kafka acknowledges a batch.
struct Receipt {
    /// (commit time, events) of each transaction in the batch, for the latency histogram.
    commits: Vec<(i64, usize)>,
    /// Events per (topic, dead-letter reason; `None` when published on their own topic).
    per_topic: HashMap<(String, Option<&'static str>), u64>,
    events: usize,
}

type Batches = tokio::sync::mpsc::Sender<Command<Receipt>>;

impl Stream<'_> {
    /// Reads the stream into the machine and carries out what it answers, until `shutdown`;
    /// then publishes what is complete and waits until Kafka has acknowledged all of it.
    async fn run(
        &mut self,
        repl: &mut ReplicationClient,
        sink: Sink,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let (batches, mut progress) = sink.start::<Receipt>();
        let mut draining = false;
        loop {
            if draining && self.machine.drained() {
                return Ok(());
            }
            let deadline = self.machine.deadline().map(tokio::time::Instant::from_std);
            let input = tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    Input::Drain
                }
                p = progress.recv() => self.progress(p)?,
                _ = sleep_until(deadline), if deadline.is_some() => Input::Tick,
                event = repl.recv(), if self.machine.wants_input() => match event? {
                    Some(event) => match self.input(event)? {
                        Some(input) => input,
                        None => continue,
                    },
                    None => return Err(SessionError::StreamEnded),
                },
            };
            let actions = self.machine.on(input, Instant::now())?;
            for action in actions {
                self.act(action, repl, &batches).await?;
            }
        }
    }

    /// One report of the sink, as the machine's input; a failure ends the session.
    fn progress(
        &mut self,
        report: Option<Progress<Receipt>>,
    ) -> Result<Input<KafkaRecord>, SessionError> {
        match report {
            Some(Progress::Ready) => Ok(Input::SinkReady),
            Some(Progress::Acked {
                upto,
                meta,
                elapsed,
                phases,
            }) => {
                self.observe(meta, elapsed, phases);
                Ok(Input::Acked { upto })
            }
            Some(Progress::Failed(e)) => Err(e.into()),
            None => Err(SinkError::Task("the Kafka pipeline stopped".into()).into()),
        }
    }

    /// One replication message as the machine's input: `None` for what carries nothing for
    /// Kafka (relations are kept here; updates, deletes, types, origins, truncates and logical
    /// messages are not published).
    fn input(
        &mut self,
        event: ReplicationEvent,
    ) -> Result<Option<Input<KafkaRecord>>, SessionError> {
        Ok(Some(match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                self.position = Some(Lsn(final_lsn.as_u64()));
                self.operator_skip = self.skips.get(&Lsn(final_lsn.as_u64())).cloned();
                Input::Begin {
                    final_lsn: Lsn(final_lsn.as_u64()),
                    commit_ts_micros: commit_time_micros + PG_EPOCH_OFFSET_MICROS,
                }
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
                    return Ok(None);
                }
                Message::Insert { relation, new } => {
                    let cols = match self.relations.get(&relation) {
                        Some(Some(Ok(cols))) => cols,
                        // Not an outbox row the relay can read: in a skipped transaction it is
                        // passed over (it stays in its table), else it stops the source.
                        Some(Some(Err(e))) if self.operator_skip.is_some() => {
                            tracing::warn!(source = %self.source.0, error = %e, "kafkifyctl skip: passing over a row of a table the relay cannot read");
                            return Ok(None);
                        }
                        Some(Some(Err(e))) => return Err(e.clone().into()),
                        Some(None) => return Ok(None),
                        None => {
                            return Err(pgoutput::DecodeError::Malformed(format!(
                                "insert into relation {relation} before its Relation message"
                            ))
                            .into())
                        }
                    };
                    let Some(commit_ts_micros) = self.machine.open_commit_ts() else {
                        return Err(Violation::RowOutsideTransaction.into());
                    };
                    if self.machine.skipping() {
                        // Kafka has this transaction: no need to build what would be dropped.
                        return Ok(None);
                    }
                    let event = match (cols.event(&new), &self.operator_skip) {
                        (Ok(event), _) => event,
                        (Err(e), Some(_)) => {
                            tracing::warn!(source = %self.source.0, error = %e, "kafkifyctl skip: passing over an outbox row the relay cannot read");
                            return Ok(None);
                        }
                        (Err(e), None) => return Err(e.into()),
                    };
                    let origin = Origin {
                        lsn: Lsn(wal_start.as_u64()),
                        commit_ts_micros,
                    };
                    let record = match &self.operator_skip {
                        Some(why) => record::operator_skipped(
                            &self.ctx.config,
                            &self.ctx.schemas,
                            &self.source.0,
                            &event,
                            origin,
                            why,
                        ),
                        None => record::build(
                            &self.ctx.config,
                            &self.ctx.schemas,
                            &self.source.0,
                            &event,
                            origin,
                        ),
                    };
                    let bytes = record::wire_size(&record);
                    self.read_rows = true;
                    Input::Row { record, bytes }
                }
                _ => return Ok(None),
            },
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(why) = self.operator_skip.take() {
                    // Once per transaction the relay publishes, not per re-send of one Kafka has.
                    if !self.machine.skipping() {
                        tracing::warn!(source = %self.source.0, lsn = %self.position.unwrap_or_default(), reason = %why, "kafkifyctl skip: the transaction's events are dead-lettered without their payload");
                        self.ctx
                            .metrics
                            .operator_skips
                            .get_or_create(&self.label)
                            .inc();
                    }
                }
                if std::mem::take(&mut self.read_rows) {
                    if let Some(commit_ts) = self.machine.open_commit_ts() {
                        let read = (now_micros() - commit_ts).max(0) as f64 / 1e6;
                        self.ctx.metrics.commit_to_read.observe(read);
                    }
                }
                self.position = Some(Lsn(end_lsn.as_u64()));
                Input::Commit {
                    end: Lsn(end_lsn.as_u64()),
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => Input::KeepAlive {
                wal_end: Lsn(wal_end.as_u64()),
            },
            ReplicationEvent::Message { .. } => return Ok(None),
            ReplicationEvent::StoppedAt { .. } => return Err(SessionError::StreamEnded),
        }))
    }

    async fn act(
        &mut self,
        action: Action<KafkaRecord>,
        repl: &ReplicationClient,
        batches: &Batches,
    ) -> Result<(), SessionError> {
        match action {
            Action::Append(records) => {
                for r in &records {
                    *self
                        .per_topic
                        .entry((r.topic.clone(), r.dead_letter))
                        .or_default() += 1;
                }
                send(batches, Command::Append(records)).await?;
            }
            Action::Commit(closing) => {
                let meta = Receipt {
                    commits: closing.commits,
                    per_topic: std::mem::take(&mut self.per_topic),
                    events: closing.events,
                };
                send(
                    batches,
                    Command::Commit {
                        upto: closing.upto,
                        meta,
                    },
                )
                .await?;
            }
            Action::Abort => {
                self.per_topic.clear();
                send(batches, Command::Abort).await?;
            }
            Action::Acknowledge(lsn) => {
                repl.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
                if self
                    .ctx
                    .health
                    .with(&self.source.0, |h| h.acknowledged(lsn))
                {
                    self.ctx.metrics.stalled.get_or_create(&self.label).set(0);
                    tracing::info!(source = %self.source.0, at = %lsn, "source moves again: no longer stalled");
                }
                self.ctx
                    .metrics
                    .confirmed_lsn
                    .get_or_create(&self.label)
                    .set(lsn.0 as i64);
            }
            Action::Skipped { .. } => {
                self.ctx
                    .metrics
                    .transactions_skipped
                    .get_or_create(&self.label)
                    .inc();
            }
        }
        Ok(())
    }

    /// Metrics of a batch Kafka acknowledged.
    fn observe(&self, receipt: Receipt, elapsed: Duration, phases: Phases) {
        let metrics = &self.ctx.metrics;
        metrics.kafka_transaction.observe(elapsed.as_secs_f64());
        for (phase, took) in [
            ("deliver", Some(phases.deliver)),
            ("previous", phases.previous),
            ("end_txn", phases.end_txn),
        ] {
            if let Some(took) = took {
                metrics
                    .kafka_transaction_phase
                    .get_or_create(&PhaseLabel { phase })
                    .observe(took.as_secs_f64());
            }
        }
        metrics.batch_events.observe(receipt.events as f64);
        let now = now_micros();
        for (commit_ts, count) in receipt.commits {
            let latency = (now - commit_ts).max(0) as f64 / 1e6;
            for _ in 0..count {
                metrics.commit_to_ack.observe(latency);
            }
        }
        for ((topic, dead_letter), count) in receipt.per_topic {
            match dead_letter {
                Some(reason) => metrics
                    .events_dead_lettered
                    .get_or_create(&DeadLetterLabel { topic, reason })
                    .inc_by(count),
                None => metrics
                    .events_published
                    .get_or_create(&TopicLabel { topic })
                    .inc_by(count),
            };
        }
        tracing::debug!(source = %self.source.0, events = receipt.events, "batch acknowledged");
    }
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

/// Hands a command to the Kafka pipeline; waits while it is busy, which stops reading the
/// replication stream (pgwire-replication keeps answering the server meanwhile).
async fn send(batches: &Batches, command: Command<Receipt>) -> Result<(), SessionError> {
    batches
        .send(command)
        .await
        .map_err(|_| SinkError::Task("the Kafka pipeline stopped".into()).into())
}

/// Every few seconds, per source: the WAL its slot holds on the primary (`slot_lag_bytes`)
/// and, on PostgreSQL 17+, whether a standby among `DATABASE_URL`'s other hosts holds the slot
/// synced and persisted (`slot_failover_ready`): only such a copy survives a promotion. A
/// standby keeps its copy temporary until the primary's slot has moved past the standby's
/// catalog horizon, which takes a few acknowledgements after the slot is made.
pub async fn watch_slot_lag(ctx: Arc<RelayContext>, shutdown: CancellationToken) {
    let mut clients: HashMap<String, tokio_postgres::Client> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for source in &ctx.config.sources {
            let url = ctx.config.source_url(source);
            let label = SourceLabel {
                source: source.0.clone(),
            };
            let slot = ctx.config.slot(source);
            // The primary, through the URL's read-write hosts.
            if let Some(client) = cached(&mut clients, source.0.clone(), &url).await {
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
                        .get_or_create(&label)
                        .set(lag.unwrap_or(0));
                }
            }
            let Some(primary) = ctx
                .health
                .primary(&source.0)
                .filter(Primary::has_failover_slots)
            else {
                continue;
            };
            let mut ready = false;
            for (host, port) in url.hosts() {
                if host == primary.host && port == primary.port {
                    continue;
                }
                let key = format!("{}@{host}:{port}", source.0);
                let Some(client) = cached(&mut clients, key, &url.on_host(&host, port)).await
                else {
                    continue;
                };
                let row = client
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots s
                          WHERE slot_name = $1 AND pg_is_in_recovery() AND NOT temporary
                            AND coalesce((to_jsonb(s) ->> 'synced')::bool, false)",
                        &[&slot],
                    )
                    .await;
                ready |= row.is_ok_and(|r| r.get::<_, i64>(0) > 0);
            }
            ctx.metrics
                .failover_ready
                .get_or_create(&label)
                .set(i64::from(ready));
        }
    }
}

/// A connection kept across ticks, opened again once closed.
async fn cached<'a>(
    clients: &'a mut HashMap<String, tokio_postgres::Client>,
    key: String,
    url: &platform::db::PgUrl,
) -> Option<&'a tokio_postgres::Client> {
    if clients.get(&key).is_none_or(|c| c.is_closed()) {
        let client = platform::db::connect(url).await.ok()?;
        clients.insert(key.clone(), client);
    }
    clients.get(&key)
}
