//! `loadtest/bench [--runs R] [--events N] [--seconds S] [--size B] [--rates 1000,5000,10000]
//! [--out DIR]` (cargo bench -p loadtest --bench compare)
//!
//! Four contenders on one machine, against the same Postgres and Kafka, on the same outbox
//! workload: cdc-relay exactly-once and at-least-once, and Debezium 3.6.1.Final (PostgreSQL
//! connector + outbox event router on Kafka Connect 4.1.1 in distributed mode with one worker,
//! all from Maven Central) at-least-once and exactly-once (KIP-618:
//! `exactly.once.source.support=enabled`, the connector's `exactly.once.support=required`).
//! Plus the raw ceilings of that machine: `pg_recvlogical` decoding the same backlog (at least
//! 10 s of streaming, start-up excluded) and Kafka's own producer perf test with the relay's
//! producer settings, plain and transactional.
//!
//! Each run:
//! 1. One backlog of N outbox rows is written once, after a slot per contender exists, so each
//!    drains exactly the same WAL: sustained events/s = records visible to a read_committed
//!    consumer divided by the time from the first to the last.
//! 2. Each contender, after its drain, runs at fixed offered rates (one row per transaction,
//!    eight writers) for S seconds each; the latency from the row's commit to the record
//!    reaching a read_committed consumer is recorded. The commit time is the `commit_ts`
//!    header for the relay and the payload's `created_at` (clock_timestamp() in the inserting
//!    transaction) for Debezium, which has no such header.
//! 3. CPU-seconds per million events of each contender's process (utime + stime from
//!    /proc/PID/stat, over the drain and over each rate), and its peak RSS (VmHWM).
//! 4. For the exactly-once relay, where each millisecond went, from its own metrics.
//!
//! Three runs by default; the report gives the median and the min–max of every figure.
//! Writes DIR/compare.md (the table), compare.json (every run) and, through loadtest/plot.py,
//! compare.png. Prints numbers; asserts nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use test_support::bench::{
    arg, drain, drain_positioned, outbox_insert_sql, percentile, proc_kib, rss_peak_mib, wait_topic,
};
use test_support::service::{workspace_bin, Service};
use test_support::{stack, unique, Source, TestDb};

const DEBEZIUM_VERSION: &str = "3.6.1.Final";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What one offered rate gave.
struct Offered {
    latencies_ms: Vec<f64>,
    /// Rows written per second, as the writers managed (below the rate asked when the machine
    /// cannot keep up with the writers themselves).
    achieved: f64,
}

/// Writes at `rate` rows/s (one row per transaction, eight writers) for `seconds` while reading
/// `topic` from its end; returns sorted latencies.
async fn at_rate(
    db: &TestDb,
    topic: &str,
    rate: f64,
    seconds: u64,
    size: usize,
    offset: usize,
) -> Offered {
    let n = (rate * seconds as f64).round() as usize;
    let (positioned, ready) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn({
        let topic = topic.to_string();
        async move {
            drain_positioned(
                &topic,
                n,
                Duration::from_secs(seconds + 120),
                true,
                positioned,
            )
            .await
            .latencies_ms
        }
    });
    ready.await.expect("the reader is positioned");
    // Several writers, so one slow commit does not hold back the rows after it; writer `w`
    // writes every `writers`-th of the n rows at its due time.
    let writers = 8;
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut handles = Vec::new();
    for w in 0..writers {
        let owner = db.owner().await;
        handles.push(tokio::spawn(async move {
            for k in (w..n).step_by(writers) {
                tokio::time::sleep_until(start + interval * k as u32).await;
                owner
                    .batch_execute(&outbox_insert_sql(1, size, offset + k))
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    let mut latencies_ms = reader.await.unwrap();
    latencies_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Offered {
        latencies_ms,
        achieved,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Contender {
    ExactlyOnceRelay,
    AtLeastOnceRelay,
    AtLeastOnceDebezium,
    ExactlyOnceDebezium,
}

impl Contender {
    const ALL: [Contender; 4] = [
        Contender::ExactlyOnceRelay,
        Contender::AtLeastOnceRelay,
        Contender::AtLeastOnceDebezium,
        Contender::ExactlyOnceDebezium,
    ];

    /// Its slot's and topics' infix, and its key in the JSON.
    fn key(self) -> &'static str {
        match self {
            Contender::ExactlyOnceRelay => "relay_eo",
            Contender::AtLeastOnceRelay => "relay_alo",
            Contender::AtLeastOnceDebezium => "dbz_alo",
            Contender::ExactlyOnceDebezium => "dbz_eo",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Contender::ExactlyOnceRelay => "cdc-relay exactly-once",
            Contender::AtLeastOnceRelay => "cdc-relay at-least-once",
            Contender::AtLeastOnceDebezium => "Debezium at-least-once",
            Contender::ExactlyOnceDebezium => "Debezium exactly-once",
        }
    }

    fn relay_delivery(self) -> Option<&'static str> {
        match self {
            Contender::ExactlyOnceRelay => Some("exactly-once"),
            Contender::AtLeastOnceRelay => Some("at-least-once"),
            _ => None,
        }
    }

    fn exactly_once(self) -> bool {
        matches!(
            self,
            Contender::ExactlyOnceRelay | Contender::ExactlyOnceDebezium
        )
    }

    fn topic(self, prefix: &str) -> String {
        format!("{prefix}{}.resource.created", self.key())
    }

    fn slot(self, db: &TestDb) -> String {
        format!("{}_{}", self.key(), db.name)
    }
}

struct Debezium {
    child: Child,
    dir: PathBuf,
}

impl Drop for Debezium {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kafka Connect in distributed mode with one worker, running Debezium's PostgreSQL connector
/// on `slot` with the outbox event router; exactly once through KIP-618 when the contender is.
async fn start_debezium(db: &TestDb, contender: Contender, prefix: &str) -> Debezium {
    let libs = root().join(format!(".cache/debezium-{DEBEZIUM_VERSION}/libs"));
    assert!(
        libs.exists(),
        "{} is missing: run loadtest/bench (it fetches Debezium)",
        libs.display()
    );
    let dir = std::env::temp_dir().join(unique("debezium"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let key = contender.key();
    // A Connect cluster of its own per start: a connector left in a shared config topic would
    // start again on the same slot.
    let cluster = unique(key);
    let worker = format!(
        "bootstrap.servers={brokers}
group.id={prefix}{cluster}.connect
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
config.storage.topic={prefix}{cluster}.connect-configs
offset.storage.topic={prefix}{cluster}.connect-offsets
status.storage.topic={prefix}{cluster}.connect-status
config.storage.replication.factor=1
offset.storage.replication.factor=1
status.storage.replication.factor=1
offset.storage.partitions=1
status.storage.partitions=1
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:{port}
rest.advertised.host.name=127.0.0.1
rest.advertised.port={port}
exactly.once.source.support={eos}
producer.linger.ms=5
producer.acks=all
producer.enable.idempotence=true
",
        brokers = stack().kafka_brokers,
        eos = if contender.exactly_once() {
            "enabled"
        } else {
            "disabled"
        },
    );
    let mut connector = json!({
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "slot.name": contender.slot(db),
        "publication.name": "kafkify_outbox",
        "publication.autocreate.mode": "disabled",
        "database.hostname": "127.0.0.1",
        "database.port": stack().pg_port.to_string(),
        "database.user": "kafkify_relay",
        "database.password": stack().password("relay"),
        "database.dbname": db.name,
        "topic.prefix": format!("{prefix}{key}"),
        "table.include.list": "public.outbox_events",
        "snapshot.mode": "no_data",
        "poll.interval.ms": "10",
        "max.batch.size": "8192",
        "max.queue.size": "32768",
        "transforms": "outbox",
        "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
        "transforms.outbox.table.field.event.id": "id",
        "transforms.outbox.table.field.event.key": "aggregate_id",
        "transforms.outbox.table.field.event.payload": "payload",
        "transforms.outbox.route.by.field": "event_type",
        "transforms.outbox.route.topic.replacement": format!("{prefix}{key}.${{routedByValue}}"),
    });
    if contender.exactly_once() {
        // One Kafka transaction per poll, with the source offsets in it.
        connector["exactly.once.support"] = json!("required");
        connector["transaction.boundary"] = json!("poll");
    }
    std::fs::write(dir.join("worker.properties"), worker).unwrap();
    let log = std::fs::File::create(dir.join("connect.log")).unwrap();
    let child = Command::new("java")
        .args([
            "-Xms256m",
            "-Xmx1g",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
        ])
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            root().join("stack/kafka/log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg("org.apache.kafka.connect.cli.ConnectDistributed")
        .arg(dir.join("worker.properties"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("java runs");
    eprintln!(
        "  {} (Kafka Connect distributed, one worker) log: {}/connect.log",
        contender.label(),
        dir.display()
    );
    let dbz = Debezium { child, dir };
    // The REST API answers once the worker has joined its group.
    let url = format!(
        "http://127.0.0.1:{port}/connectors/{}/config",
        unique("dbz")
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let sent = client.put(&url).json(&connector).send().await;
        match sent {
            Ok(r) if r.status().is_success() => break,
            Ok(r) if Instant::now() > deadline => panic!(
                "Kafka Connect refused the connector: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) if Instant::now() > deadline => panic!("Kafka Connect's REST API: {e}"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    dbz
}

/// Slots made for the pg_recvlogical ceiling before the backlog is written, each able to decode
/// all of it once.
const CEILING_SLOTS: usize = 40;

/// A ceiling's rate and the seconds of work it was timed over.
struct Ceiling {
    rate: f64,
    seconds: f64,
    runs: usize,
}

/// pg_recvlogical decoding the backlog (pgoutput, to a pipe read and dropped), from one slot
/// after another until at least 10 s of streaming were timed. Each run's clock starts at its
/// first byte of output, so process start-up, the connection and the slot's start are not
/// counted; a short backlog is decoded again from the next slot rather than timed too briefly.
fn pg_recvlogical_ceiling(db: &TestDb, slots: &[String], endpos: &str, n: usize) -> Ceiling {
    use std::io::Read;
    let (mut seconds, mut runs) = (0.0, 0);
    for slot in slots {
        let mut child = Command::new("/usr/lib/postgresql/15/bin/pg_recvlogical")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &stack().pg_port.to_string(),
                "-U",
                "kafkify_relay",
            ])
            .args([
                "-d", &db.name, "--slot", slot, "--start", "--endpos", endpos,
            ])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=kafkify_outbox",
                "-f",
                "-",
            ])
            .env("PGPASSWORD", stack().password("relay"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("pg_recvlogical runs (package postgresql)");
        let mut out = child.stdout.take().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut first = None;
        while out.read(&mut buf).expect("reading pg_recvlogical") > 0 {
            first.get_or_insert_with(Instant::now);
        }
        let status = child.wait().unwrap();
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).ok();
        assert!(status.success(), "pg_recvlogical: {err}");
        seconds += first
            .expect("pg_recvlogical wrote the backlog")
            .elapsed()
            .as_secs_f64();
        runs += 1;
        if seconds >= 10.0 {
            break;
        }
    }
    Ceiling {
        rate: (n * runs) as f64 / seconds,
        seconds,
        runs,
    }
}

/// Records ProducerPerformance sends for a ceiling: enough for well over 10 s at the rates
/// this machine reaches.
const PERF_RECORDS: usize = 4_500_000;

/// Kafka's own producer perf test with the relay's producer settings (cdc-relay/src/producer.rs
/// and relay.rs: acks=all, idempotent, lz4, linger 1 ms, 1,000,000-byte batches), and, for
/// exactly-once, in transactions of 100 ms (about the relay's 10,000-event transactions at
/// 100k events/s).
fn producer_perf_ceiling(topic: &str, size: usize, transactional: bool) -> Ceiling {
    let kafka = std::fs::read_dir(root().join(".cache"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("kafka-"))
        })
        .expect("Kafka in .cache (./kafkify up)");
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}/libs/*", kafka.display()))
        .arg("org.apache.kafka.tools.ProducerPerformance")
        .args(["--topic", topic])
        .args(["--num-records", &PERF_RECORDS.to_string()])
        .args(["--record-size", &size.to_string()])
        .args(["--throughput", "-1"]);
    if transactional {
        cmd.args(["--transactional-id", &format!("{topic}-perf")])
            .args(["--transaction-duration-ms", "100"]);
    }
    let out = cmd
        .arg("--producer-props")
        .arg(format!("bootstrap.servers={}", stack().kafka_brokers))
        .args([
            "acks=all",
            "enable.idempotence=true",
            "linger.ms=1",
            "compression.type=lz4",
            "batch.size=1000000",
        ])
        .output()
        .expect("java runs");
    let text = String::from_utf8_lossy(&out.stdout);
    // "1500000 records sent, 123456.7 records/sec (…" on the last line.
    let last = text.lines().last().unwrap_or_default();
    let rate: f64 = last
        .split(" records/sec")
        .next()
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    Ceiling {
        rate,
        seconds: PERF_RECORDS as f64 / rate,
        runs: 1,
    }
}

fn quantiles(l: &[f64]) -> (f64, f64, f64) {
    (percentile(l, 0.5), percentile(l, 0.95), percentile(l, 0.99))
}

/// utime + stime of a process, in seconds (every thread of it: the JVM's too).
fn cpu_seconds(pid: u32) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (field(11), field(12)) {
        (Some(u), Some(s)) => (u + s) / ticks,
        _ => f64::NAN,
    }
}

/// The relay's `_sum` and `_count` series, by name with labels.
async fn relay_sums(relay: &Service) -> HashMap<String, f64> {
    let (_, text) = relay.get("/metrics").await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(k, _)| k.contains("_sum") || k.contains("_count"))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// Where the exactly-once relay's time went at one rate, in mean milliseconds, from its own
/// metrics over that rate's window and the consumer's view.
#[derive(Clone, Copy, Default)]
struct Breakdown {
    /// Postgres commit → the relay reads the transaction's end (walsender decoding and sending).
    read: f64,
    /// → its Kafka transaction is closed: the linger, or waiting for the transaction before.
    batching: f64,
    /// → the brokers acknowledged its records and checkpoint (AddPartitionsToTxn, produce).
    deliver: f64,
    /// → the previous Kafka transaction's commit returned.
    previous: f64,
    /// → EndTxn returned.
    end_txn: f64,
    /// → a read_committed consumer has it: transaction markers, the last stable offset, fetch.
    visible: f64,
    /// The mean commit → visible.
    total: f64,
    /// Kafka transactions per second.
    transactions: f64,
}

fn breakdown(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    visible_mean_ms: f64,
    seconds: f64,
) -> Breakdown {
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    // `name_sum{labels}`: Prometheus puts the suffix before the labels.
    let mean_ms = |name: &str, labels: &str| {
        let n = delta(&format!("{name}_count{labels}"));
        if n > 0.0 {
            1000.0 * delta(&format!("{name}_sum{labels}")) / n
        } else {
            f64::NAN
        }
    };
    let m = "kafkify_cdc_relay_";
    let phase = |p: &str| {
        mean_ms(
            &format!("{m}kafka_transaction_phase_seconds"),
            &format!("{{phase=\"{p}\"}}"),
        )
    };
    let read = mean_ms(&format!("{m}commit_to_read_seconds"), "");
    let ack = mean_ms(&format!("{m}commit_to_ack_seconds"), "");
    let (deliver, previous, end_txn) = (phase("deliver"), phase("previous"), phase("end_txn"));
    Breakdown {
        read,
        // Means per event and per transaction mixed: an estimate, which the total checks.
        batching: (ack - read - deliver - previous - end_txn).max(0.0),
        deliver,
        previous,
        end_txn,
        // Negative when the relay heard of its commits later than the consumer saw them.
        visible: visible_mean_ms - ack,
        total: visible_mean_ms,
        transactions: delta(&format!("{m}kafka_transaction_seconds_count")) / seconds,
    }
}

/// `--relay-only R`: only the relay, at R events/s, for tuning its latency quickly.
fn relay_only() -> Option<f64> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--relay-only")?;
    Some(
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--relay-only takes a rate in events/s"),
    )
}

fn text_arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn relay_bin() -> String {
    // The release build: a benchmark of a debug build would say nothing.
    let release = root().join("target/release/cdc-relay");
    if release.exists() {
        release.display().to_string()
    } else {
        workspace_bin("cdc-relay")
    }
}

fn relay_env(db: &TestDb, contender: Contender, prefix: &str) -> Vec<(&'static str, String)> {
    let key = contender.key();
    let mut env = vec![
        ("DATABASE_URL", db.relay_dsn()),
        ("RELAY_SOURCES", db.name.clone()),
        ("RELAY_SLOT_PREFIX", format!("{key}_")),
        ("RELAY_TOPIC_PREFIX", format!("{prefix}{key}.")),
        (
            "RELAY_CHECKPOINT_TOPIC",
            format!("{prefix}{key}.checkpoints"),
        ),
        ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
        ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
        ("LOG_LEVEL", "warn".to_string()),
        (
            "RELAY_DELIVERY",
            contender.relay_delivery().expect("a relay").to_string(),
        ),
    ];
    // The bench's own `RELAY_*` settings reach the relay, to try its knobs.
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("RELAY_") || k == "LOG_LEVEL") {
        env.retain(|(name, _)| *name != k);
        env.push((Box::leak(k.into_boxed_str()), v));
    }
    env
}

/// A contender's process.
enum Running {
    Relay(Service),
    Debezium(Debezium),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Relay(s) => s.pid(),
            Running::Debezium(d) => d.child.id(),
        }
    }
}

async fn start(db: &TestDb, contender: Contender, prefix: &str) -> Running {
    match contender.relay_delivery() {
        Some(_) => {
            let relay = Service::spawn(&relay_bin(), &relay_env(db, contender, prefix));
            eprintln!("  {} log: {}", contender.label(), relay.log.display());
            Running::Relay(relay)
        }
        None => Running::Debezium(start_debezium(db, contender, prefix).await),
    }
}

/// One offered rate's figures.
#[derive(Clone, Copy)]
struct Point {
    rate: f64,
    achieved: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    n: usize,
    cpu_per_million: f64,
    breakdown: Option<Breakdown>,
}

/// One contender's figures in one run.
struct Outcome {
    drain: f64,
    drain_cpu_per_million: f64,
    rss_mib: f64,
    points: Vec<Point>,
}

struct Settings {
    events: usize,
    seconds: u64,
    size: usize,
    rates: Vec<f64>,
}

/// Drains the backlog from the contender's slot, made before the backlog was written; returns
/// events/s, CPU-seconds per million events and the peak RSS.
async fn drain_backlog(
    db: &TestDb,
    contender: Contender,
    prefix: &str,
    events: usize,
) -> (f64, f64, f64) {
    let topic = contender.topic(prefix);
    eprintln!("{}: draining the backlog", contender.label());
    let running = start(db, contender, prefix).await;
    let pid = running.pid();
    wait_topic(&topic, Duration::from_secs(180)).await;
    // From the first record on the topic: start-up is not the drain's.
    let cpu = cpu_seconds(pid);
    let drained = drain(&topic, events, Duration::from_secs(1800), false).await;
    let cpu_per_million = (cpu_seconds(pid) - cpu) / drained.arrivals.len() as f64 * 1e6;
    (drained.rate(), cpu_per_million, rss_peak_mib(pid))
}

/// Writes one row and waits until it is on `topic`: the contender streams.
async fn probe(db: &TestDb, topic: &str, size: usize) {
    let (positioned, ready) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn({
        let topic = topic.to_string();
        async move { drain_positioned(&topic, 1, Duration::from_secs(180), true, positioned).await }
    });
    ready.await.expect("the reader is positioned");
    db.owner()
        .await
        .batch_execute(&outbox_insert_sql(1, size, 0))
        .await
        .unwrap();
    assert_eq!(
        reader.await.unwrap().arrivals.len(),
        1,
        "the contender did not publish a new row within 180 s"
    );
}

/// Runs the fixed rates, the contender's slot moved past everything written before (the
/// backlog it drained and the other contenders' rates), so only its own rows are measured.
async fn offer_rates(
    db: &TestDb,
    contender: Contender,
    prefix: &str,
    s: &Settings,
    run: usize,
) -> (Vec<Point>, f64) {
    let topic = contender.topic(prefix);
    let running = start(db, contender, prefix).await;
    let pid = running.pid();
    probe(db, &topic, s.size).await;
    // Past the first transactions (connections, metadata), which are not what is measured.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut points = Vec::new();
    for (i, &rate) in s.rates.iter().enumerate() {
        eprintln!("{} at {rate:.0} events/s", contender.label());
        let before = match &running {
            Running::Relay(r) if contender.exactly_once() => Some(relay_sums(r).await),
            _ => None,
        };
        let cpu = cpu_seconds(pid);
        let started = Instant::now();
        // Row numbers distinct across runs and rates.
        let offset = 1_000_000_000 * (run + 1) + 100_000_000 * i;
        let offered = at_rate(db, &topic, rate, s.seconds, s.size, offset).await;
        let cpu = cpu_seconds(pid) - cpu;
        let lat = &offered.latencies_ms;
        let (p50, p95, p99) = quantiles(lat);
        let breakdown = match (&running, before) {
            (Running::Relay(r), Some(before)) => {
                let after = relay_sums(r).await;
                let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
                Some(breakdown(
                    &before,
                    &after,
                    mean,
                    started.elapsed().as_secs_f64(),
                ))
            }
            _ => None,
        };
        points.push(Point {
            rate,
            achieved: offered.achieved,
            p50,
            p95,
            p99,
            n: lat.len(),
            cpu_per_million: cpu / lat.len().max(1) as f64 * 1e6,
            breakdown,
        });
    }
    (points, rss_peak_mib(pid))
}

/// One run's ceilings and outcomes.
struct Run {
    pg: Ceiling,
    perf: Ceiling,
    perf_txn: Ceiling,
    outcomes: Vec<(Contender, Outcome)>,
}

async fn one_run(s: &Settings, run: usize) -> Run {
    let db = TestDb::create(Source::Rest).await;
    let prefix = format!("{}.", unique("cmp"));
    let owner = db.owner().await;
    let relay_sql = platform::db::connect(&db.relay_url()).await.unwrap();
    let ceiling_slots: Vec<String> = (0..CEILING_SLOTS)
        .map(|i| format!("ceil{i}_{}", db.name))
        .collect();
    let contender_slots: Vec<String> = Contender::ALL.iter().map(|c| c.slot(&db)).collect();
    for slot in ceiling_slots.iter().chain(&contender_slots) {
        relay_sql
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await
            .unwrap();
    }
    eprintln!(
        "run {}: writing the backlog: {} events of ~{} B",
        run + 1,
        s.events,
        s.size
    );
    for i in (0..s.events).step_by(100) {
        owner
            .batch_execute(&outbox_insert_sql(100.min(s.events - i), s.size, i))
            .await
            .unwrap();
    }
    let endpos: String = relay_sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);

    eprintln!("raw ceilings");
    let pg = pg_recvlogical_ceiling(&db, &ceiling_slots, &endpos, s.events);
    for slot in &ceiling_slots {
        relay_sql
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .unwrap();
    }
    // The broker does not create topics on demand: the perf test's and Debezium's are made
    // here, with the relay's partition count (6).
    let perf_topic = format!("{prefix}perf");
    let dbz_topics: Vec<String> = Contender::ALL
        .iter()
        .filter(|c| c.relay_delivery().is_none())
        .map(|c| c.topic(&prefix))
        .collect();
    let new_topics: Vec<rdkafka::admin::NewTopic> = std::iter::once(&perf_topic)
        .chain(&dbz_topics)
        .map(|t| rdkafka::admin::NewTopic::new(t, 6, rdkafka::admin::TopicReplication::Fixed(1)))
        .collect();
    stack()
        .kafka_admin()
        .create_topics(&new_topics, &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    let perf = producer_perf_ceiling(&perf_topic, s.size, false);
    let perf_txn = producer_perf_ceiling(&perf_topic, s.size, true);

    // Every contender drains the same backlog first, one after the other, and stops; no row
    // is written meanwhile.
    let mut drains = Vec::new();
    for contender in Contender::ALL {
        drains.push(drain_backlog(&db, contender, &prefix, s.events).await);
    }
    let mut outcomes = Vec::new();
    for ((contender, slot), (drain, drain_cpu_per_million, rss)) in
        Contender::ALL.into_iter().zip(&contender_slots).zip(drains)
    {
        relay_sql
            .execute(
                "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
                &[slot],
            )
            .await
            .unwrap();
        let (points, rates_rss) = offer_rates(&db, contender, &prefix, s, run).await;
        // Its slot would pin the WAL the next contenders' rates write.
        relay_sql
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .unwrap();
        outcomes.push((
            contender,
            Outcome {
                drain,
                drain_cpu_per_million,
                rss_mib: rss.max(rates_rss),
                points,
            },
        ));
    }
    test_support::delete_topics_with_prefix(&prefix).await;
    drop(owner);
    drop(relay_sql);
    db.cleanup().await;
    Run {
        pg,
        perf,
        perf_txn,
        outcomes,
    }
}

/// Median and range of one figure across runs.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut xs: Vec<f64>) -> Spread {
    xs.retain(|x| x.is_finite());
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if xs.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    let median = if xs.len() % 2 == 1 {
        xs[xs.len() / 2]
    } else {
        (xs[xs.len() / 2 - 1] + xs[xs.len() / 2]) / 2.0
    };
    Spread {
        median,
        min: xs[0],
        max: xs[xs.len() - 1],
    }
}

impl Spread {
    /// "median (min–max)" with `decimals`; the range only when there are several runs.
    fn show(&self, decimals: usize) -> String {
        let [median, min, max] =
            [self.median, self.min, self.max].map(|x| format!("{x:.decimals$}"));
        if min == max {
            median
        } else {
            format!("{median} ({min}–{max})")
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib =
        proc_kib("/proc/meminfo", "MemTotal").map_or(f64::NAN, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} cores ({cpu}), {mem_gib:.0} GiB, Linux {}; PostgreSQL 15, Kafka 4.1.1 (one node), the schema registry, the contender and the writers all on this machine",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

fn report(s: &Settings, runs: &[Run]) -> (String, serde_json::Value) {
    let per = |c: Contender, f: &dyn Fn(&Outcome) -> f64| {
        spread(
            runs.iter()
                .flat_map(|r| {
                    r.outcomes
                        .iter()
                        .filter(|(k, _)| *k == c)
                        .map(|(_, o)| f(o))
                })
                .collect(),
        )
    };
    let ceiling = |f: &dyn Fn(&Run) -> f64| spread(runs.iter().map(f).collect());
    let mut md = format!(
        "# cdc-relay and Debezium {DEBEZIUM_VERSION}, exactly-once and at-least-once\n\n\
         Machine: {}.\n\n\
         {} runs; each figure is the median, with the min–max of the runs in brackets. \
         Outbox rows of ~{} B JSON; a backlog of {} events drained by each contender; then {} s \
         at each fixed offered rate (one row per transaction, eight writers), latency from the \
         row's commit to a read_committed consumer.\n\n",
        machine(),
        runs.len(),
        s.size,
        s.events,
        s.seconds
    );
    md.push_str("| |");
    for c in Contender::ALL {
        md.push_str(&format!(" {} |", c.label()));
    }
    md.push_str("\n|---|---|---|---|---|\n");
    let mut row = |title: String, f: &dyn Fn(Contender) -> String| {
        md.push_str(&format!("| {title} |"));
        for c in Contender::ALL {
            md.push_str(&format!(" {} |", f(c)));
        }
        md.push('\n');
    };
    row("sustained events/s (backlog drain)".into(), &|c| {
        per(c, &|o| o.drain).show(0)
    });
    for (i, rate) in s.rates.iter().enumerate() {
        row(format!("p50 ms at {rate:.0}/s"), &|c| {
            per(c, &|o| o.points[i].p50).show(1)
        });
        row(format!("p99 ms at {rate:.0}/s"), &|c| {
            per(c, &|o| o.points[i].p99).show(1)
        });
    }
    row("CPU-s per million events, drain".into(), &|c| {
        per(c, &|o| o.drain_cpu_per_million).show(1)
    });
    for (i, rate) in s.rates.iter().enumerate() {
        row(format!("CPU-s per million events at {rate:.0}/s"), &|c| {
            per(c, &|o| o.points[i].cpu_per_million).show(1)
        });
    }
    row("peak RSS MiB".into(), &|c| per(c, &|o| o.rss_mib).show(0));
    md.push_str(
        "\nOffered rates as the writers managed them (median of all contenders and runs): ",
    );
    let achieved: Vec<String> = (0..s.rates.len())
        .map(|i| {
            let a = spread(
                runs.iter()
                    .flat_map(|r| r.outcomes.iter().map(move |(_, o)| o.points[i].achieved))
                    .collect(),
            );
            format!("{:.0}/s asked, {} written", s.rates[i], a.show(0))
        })
        .collect();
    md.push_str(&achieved.join("; "));
    md.push_str(".\n");

    let pg = ceiling(&|r| r.pg.rate);
    let perf = ceiling(&|r| r.perf.rate);
    let perf_txn = ceiling(&|r| r.perf_txn.rate);
    md.push_str(&format!(
        "\nRaw ceilings: pg_recvlogical decoding the same backlog (pgoutput, read from a pipe; at least 10 s of streaming timed from each run's first byte) {} events/s; Kafka's ProducerPerformance with the relay's producer settings ({} B records, acks=all, idempotent, lz4, linger 1 ms, 1,000,000 B batches; {PERF_RECORDS} records) {} records/s, in 100 ms transactions {} records/s.\n\n",
        pg.show(0),
        s.size,
        perf.show(0),
        perf_txn.show(0)
    ));
    let mut wrong = Vec::new();
    for c in [Contender::ExactlyOnceRelay, Contender::AtLeastOnceRelay] {
        let shares: Vec<f64> = runs
            .iter()
            .map(|r| {
                let kafka = if c.exactly_once() {
                    r.perf_txn.rate
                } else {
                    r.perf.rate
                };
                let o = &r.outcomes.iter().find(|(k, _)| *k == c).unwrap().1;
                100.0 * o.drain / r.pg.rate.min(kafka)
            })
            .collect();
        if shares.iter().any(|x| *x > 100.0) {
            wrong.push(c.label());
        }
        md.push_str(&format!(
            "{}: {}% of the lower of pg_recvlogical and the {} producer.\n",
            c.label(),
            spread(shares).show(0),
            if c.exactly_once() {
                "transactional"
            } else {
                "plain"
            }
        ));
    }
    for c in wrong {
        md.push_str(&format!(
            "\n{c} beat its ceiling in a run: the ceiling is wrong, not a result.\n"
        ));
    }

    md.push_str("\n## Where the exactly-once relay's milliseconds go\n\nMeans per event, from the relay's own metrics over each rate's window (`commit_to_read_seconds`, `kafka_transaction_phase_seconds`, `commit_to_ack_seconds`) and the consumer's commit → visible; median of the runs.\n\n| offered | Postgres commit → relay reads it | batching (linger, the transaction before) | deliver (AddPartitionsToTxn, produce) | previous commit | EndTxn | markers, last stable offset, fetch | commit → visible (mean) | Kafka transactions/s |\n|---|---|---|---|---|---|---|---|---|\n");
    for (i, rate) in s.rates.iter().enumerate() {
        let b = |f: &dyn Fn(&Breakdown) -> f64| {
            spread(
                runs.iter()
                    .filter_map(|r| {
                        let o = &r
                            .outcomes
                            .iter()
                            .find(|(k, _)| *k == Contender::ExactlyOnceRelay)?
                            .1;
                        o.points[i].breakdown.as_ref().map(f)
                    })
                    .collect(),
            )
            .median
        };
        md.push_str(&format!(
            "| {rate:.0}/s | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
            b(&|x| x.read),
            b(&|x| x.batching),
            b(&|x| x.deliver),
            b(&|x| x.previous),
            b(&|x| x.end_txn),
            b(&|x| x.visible),
            b(&|x| x.total),
            b(&|x| x.transactions),
        ));
    }
    md.push_str(
        "\nSettings. Debezium: Kafka Connect 4.1.1 distributed, one worker, pgoutput, snapshot.mode=no_data, poll.interval.ms=10, max.batch.size=8192, max.queue.size=32768, StringConverter, EventRouter keyed by aggregate_id; producer linger.ms=5, acks=all, idempotent; exactly-once: exactly.once.source.support=enabled, exactly.once.support=required, transaction.boundary=poll. cdc-relay: defaults (Avro through the schema registry, linger 5 ms), RELAY_DELIVERY exactly-once or at-least-once.\n"
    );

    let point_json = |p: &Point| {
        json!({
            "rate": p.rate, "achieved": p.achieved, "p50": p.p50, "p95": p.p95, "p99": p.p99,
            "n": p.n, "cpu_s_per_million": p.cpu_per_million,
            "breakdown_ms": p.breakdown.map(|b| json!({
                "read": b.read, "batching": b.batching, "deliver": b.deliver,
                "previous": b.previous, "end_txn": b.end_txn, "visible": b.visible,
                "total": b.total, "transactions_per_s": b.transactions,
            })),
        })
    };
    let summary: serde_json::Map<String, serde_json::Value> = Contender::ALL
        .iter()
        .map(|&c| {
            let points: Vec<_> = s
                .rates
                .iter()
                .enumerate()
                .map(|(i, rate)| {
                    json!({
                        "rate": rate,
                        "p50": per(c, &|o| o.points[i].p50).json(),
                        "p99": per(c, &|o| o.points[i].p99).json(),
                        "cpu_s_per_million": per(c, &|o| o.points[i].cpu_per_million).json(),
                    })
                })
                .collect();
            (
                c.key().to_string(),
                json!({
                    "label": c.label(),
                    "sustained": per(c, &|o| o.drain).json(),
                    "drain_cpu_s_per_million": per(c, &|o| o.drain_cpu_per_million).json(),
                    "rss_mib": per(c, &|o| o.rss_mib).json(),
                    "points": points,
                }),
            )
        })
        .collect();
    let runs_json: Vec<_> = runs
        .iter()
        .map(|r| {
            let outcomes: serde_json::Map<String, serde_json::Value> = r
                .outcomes
                .iter()
                .map(|(c, o)| {
                    (
                        c.key().to_string(),
                        json!({
                            "sustained": o.drain,
                            "drain_cpu_s_per_million": o.drain_cpu_per_million,
                            "rss_mib": o.rss_mib,
                            "points": o.points.iter().map(point_json).collect::<Vec<_>>(),
                        }),
                    )
                })
                .collect();
            json!({
                "ceilings": {
                    "pg_recvlogical": {"rate": r.pg.rate, "seconds": r.pg.seconds, "runs": r.pg.runs},
                    "kafka_producer": {"rate": r.perf.rate, "seconds": r.perf.seconds},
                    "kafka_producer_transactional": {"rate": r.perf_txn.rate, "seconds": r.perf_txn.seconds},
                },
                "contenders": outcomes,
            })
        })
        .collect();
    let json = json!({
        "machine": machine(),
        "settings": {"events": s.events, "seconds": s.seconds, "size": s.size, "rates": s.rates},
        "summary": summary,
        "runs": runs_json,
    });
    (md, json)
}

/// `--relay-only R`: the exactly-once relay alone at one rate, with its breakdown.
async fn relay_at(rate: f64, seconds: u64, size: usize) {
    let db = TestDb::create(Source::Rest).await;
    let prefix = format!("{}.", unique("cmp"));
    let contender = match text_arg("--delivery").as_deref() {
        Some("at-least-once") => Contender::AtLeastOnceRelay,
        _ => Contender::ExactlyOnceRelay,
    };
    let topic = contender.topic(&prefix);
    let mut env = relay_env(&db, contender, &prefix);
    // No slot was made before: the relay makes its own.
    env.push(("RELAY_MISSING_SLOT", "create".to_string()));
    let mut relay = Service::spawn(&relay_bin(), &env);
    eprintln!("  relay log: {}", relay.log.display());
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    let owner = db.owner().await;
    owner
        .batch_execute(&outbox_insert_sql(1, size, 0))
        .await
        .unwrap();
    wait_topic(&topic, Duration::from_secs(60)).await;
    // Past the first transactions (metadata, connections), which are not what is measured.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = relay_sums(&relay).await;
    let started = Instant::now();
    let offered = at_rate(&db, &topic, rate, seconds, size, 1_000).await;
    let lat = &offered.latencies_ms;
    let (p50, p95, p99) = quantiles(lat);
    println!(
        "{} at {rate:.0} events/s ({:.0} written): commit→visible p50 {p50:.1} / p95 {p95:.1} / p99 {p99:.1} ms ({} events)",
        contender.label(),
        offered.achieved,
        lat.len()
    );
    if contender.exactly_once() {
        let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
        let b = breakdown(
            &before,
            &relay_sums(&relay).await,
            mean,
            started.elapsed().as_secs_f64(),
        );
        println!(
            "  mean ms: read {:.1}, batching {:.1}, deliver {:.1}, previous {:.1}, EndTxn {:.1}, markers and fetch {:.1}; commit → visible {:.1}; {:.0} Kafka transactions/s",
            b.read, b.batching, b.deliver, b.previous, b.end_txn, b.visible, b.total, b.transactions
        );
    }
    drop(relay);
    drop(owner);
    test_support::delete_topics_with_prefix(&prefix).await;
    db.cleanup().await;
}

#[tokio::main]
async fn main() {
    let settings = Settings {
        events: arg("--events", 50_000) as usize,
        seconds: arg("--seconds", 10),
        size: arg("--size", 500) as usize,
        rates: text_arg("--rates")
            .unwrap_or_else(|| "1000,5000,10000".into())
            .split(',')
            .map(|r| {
                r.trim()
                    .parse()
                    .expect("--rates takes events/s, comma-separated")
            })
            .collect(),
    };
    if let Some(rate) = relay_only() {
        relay_at(rate, settings.seconds, settings.size).await;
        return;
    }
    let runs = arg("--runs", 3) as usize;
    // Relative to the repository's root, where loadtest/bench runs.
    let out = root().join(text_arg("--out").unwrap_or_else(|| "loadtest/results".into()));
    let mut done = Vec::new();
    for run in 0..runs {
        done.push(one_run(&settings, run).await);
    }
    let (md, json) = report(&settings, &done);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("compare.md"), &md).unwrap();
    std::fs::write(
        out.join("compare.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("{md}");
}
