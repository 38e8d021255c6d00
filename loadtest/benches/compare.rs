//! `loadtest/bench [--events N] [--seconds S] [--size B]` (cargo bench -p loadtest --bench compare)
//!
//! cdc-relay and Debezium 3.6.1.Final (PostgreSQL connector + outbox event router on Kafka
//! Connect 4.1.1, standalone, all from Maven Central) on one machine, against the same Postgres
//! and Kafka, on the same outbox workload; plus the raw ceilings of that machine:
//! `pg_recvlogical` decoding the same backlog (at least 10 s of streaming, start-up excluded)
//! and Kafka's own producer perf test with the relay's producer settings, plain and
//! transactional.
//!
//! 1. One backlog of N outbox rows is written once, after a slot per contender exists, so each
//!    drains exactly the same WAL: sustained events/s = records visible to a read_committed
//!    consumer divided by the time from the first to the last.
//! 2. Debezium's drain rate is its peak; both then run at a quarter, a half and three quarters
//!    of it for S seconds each (one transaction of one row per write), and the latency from the
//!    row's commit to the record reaching a read_committed consumer is recorded. The commit time
//!    is the `commit_ts` header for the relay and the payload's `created_at`
//!    (clock_timestamp() in the inserting transaction) for Debezium, which has no such header.
//! 3. Peak RSS (VmHWM) of the relay process and of the Connect JVM.
//!
//! Writes loadtest/results/compare.md (the table) and compare.json (the points the plot script,
//! loadtest/plot.py, draws into compare.png). Prints numbers; asserts nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_support::bench::{arg, drain, outbox_insert_sql, percentile, rss_peak_mib, wait_topic};
use test_support::service::{workspace_bin, Service};
use test_support::{stack, unique, Source, TestDb};

const DEBEZIUM_VERSION: &str = "3.6.1.Final";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes at `rate` rows/s (one row per transaction, 10 ms ticks) for `seconds` while reading
/// `topic` from its end; returns sorted latencies.
async fn at_rate(
    db: &TestDb,
    topic: &str,
    rate: f64,
    seconds: u64,
    size: usize,
    offset: usize,
) -> Vec<f64> {
    let n = (rate * seconds as f64).round() as usize;
    let reader = tokio::spawn({
        let topic = topic.to_string();
        async move {
            drain(&topic, n, Duration::from_secs(seconds + 120), true)
                .await
                .latencies_ms
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
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
    let mut lat = reader.await.unwrap();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat
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
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_debezium(db: &TestDb, slot: &str, prefix: &str) -> Debezium {
    let libs = root().join(format!(".cache/debezium-{DEBEZIUM_VERSION}/libs"));
    assert!(
        libs.exists(),
        "{} is missing: run loadtest/bench (it fetches Debezium)",
        libs.display()
    );
    let dir = std::env::temp_dir().join(unique("debezium"));
    std::fs::create_dir_all(&dir).unwrap();
    let worker = format!(
        "bootstrap.servers={brokers}
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
offset.storage.file.filename={dir}/offsets
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:0
producer.linger.ms=5
producer.acks=all
producer.enable.idempotence=true
",
        brokers = stack().kafka_brokers,
        dir = dir.display()
    );
    let connector = format!(
        "name={name}
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
slot.name={slot}
publication.name=kafkify_outbox
publication.autocreate.mode=disabled
database.hostname=127.0.0.1
database.port={port}
database.user=kafkify_relay
database.password={password}
database.dbname={dbname}
topic.prefix={prefix}dbz
table.include.list=public.outbox_events
snapshot.mode=no_data
poll.interval.ms=10
max.batch.size=8192
max.queue.size=32768
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
transforms.outbox.table.field.event.id=id
transforms.outbox.table.field.event.key=aggregate_id
transforms.outbox.table.field.event.payload=payload
transforms.outbox.route.by.field=event_type
transforms.outbox.route.topic.replacement={prefix}dbz.${{routedByValue}}
",
        name = unique("dbz"),
        port = stack().pg_port,
        password = stack().password("relay"),
        dbname = db.name,
    );
    std::fs::write(dir.join("worker.properties"), worker).unwrap();
    std::fs::write(dir.join("connector.properties"), connector).unwrap();
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
        .arg("org.apache.kafka.connect.cli.ConnectStandalone")
        .arg(dir.join("worker.properties"))
        .arg(dir.join("connector.properties"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("java runs");
    eprintln!(
        "  Debezium (Kafka Connect standalone) log: {}/connect.log",
        dir.display()
    );
    Debezium { child, dir }
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

fn relay_bin() -> String {
    // The release build: a benchmark of a debug build would say nothing.
    let release = root().join("target/release/cdc-relay");
    if release.exists() {
        release.display().to_string()
    } else {
        workspace_bin("cdc-relay")
    }
}

fn relay_env(db: &TestDb, prefix: &str, delivery: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.relay_dsn()),
        ("RELAY_SOURCES", db.name.clone()),
        ("RELAY_TOPIC_PREFIX", prefix.to_string()),
        ("RELAY_CHECKPOINT_TOPIC", format!("{prefix}checkpoints")),
        ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
        ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
        ("LOG_LEVEL", "warn".to_string()),
        ("RELAY_DELIVERY", delivery.to_string()),
        // The bench drops the relay's slot between its runs on purpose: starting afresh after
        // that is what it wants, not a lost slot.
        ("RELAY_MISSING_SLOT", "create".to_string()),
    ]
}

/// [`relay_env`] plus the bench's own `RELAY_*` settings, to try the relay's knobs.
fn relay_env_tuned(db: &TestDb, prefix: &str, delivery: &str) -> Vec<(&'static str, String)> {
    let mut env = relay_env(db, prefix, delivery);
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("RELAY_") || k == "LOG_LEVEL") {
        env.retain(|(name, _)| *name != k);
        env.push((Box::leak(k.into_boxed_str()), v));
    }
    env
}

/// Latency of the relay alone at one rate, with its own view of where the time went (the
/// environment reaches the relay, so `RELAY_BATCH_LINGER=…` and the like can be tried).
async fn relay_at(db: &TestDb, prefix: &str, delivery: &str, rate: f64, seconds: u64, size: usize) {
    let topic = format!("{prefix}resource.created");
    let mut relay = Service::spawn(&relay_bin(), &relay_env_tuned(db, prefix, delivery));
    eprintln!("  relay log: {}", relay.log.display());
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    let owner = db.owner().await;
    owner
        .batch_execute(&outbox_insert_sql(1, size, 0))
        .await
        .unwrap();
    wait_topic(&topic, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lat = at_rate(db, &topic, rate, seconds, size, 1_000).await;
    let (p50, p95, p99) = quantiles(&lat);
    println!(
        "cdc-relay ({delivery}) at {rate:.0} events/s: commit→visible p50 {p50:.1} / p95 {p95:.1} / p99 {p99:.1} ms ({} events)",
        lat.len()
    );
    let (_, metrics) = relay.get("/metrics").await;
    for line in metrics.lines() {
        if line.starts_with("kafkify_cdc_relay_kafka_transaction_seconds_")
            || line.starts_with("kafkify_cdc_relay_batch_events_")
            || line.starts_with("kafkify_cdc_relay_commit_to_ack_seconds_")
        {
            println!("  {line}");
        }
    }
}

#[tokio::main]
async fn main() {
    let events = arg("--events", 50_000) as usize;
    let seconds = arg("--seconds", 10);
    let size = arg("--size", 500) as usize;
    let delivery = std::env::args()
        .skip_while(|a| a != "--delivery")
        .nth(1)
        .unwrap_or_else(|| "exactly-once".into());
    let db = TestDb::create(Source::Rest).await;
    let prefix = format!("{}.", unique("cmp"));
    if let Some(rate) = relay_only() {
        relay_at(&db, &prefix, &delivery, rate, seconds, size).await;
        test_support::delete_topics_with_prefix(&prefix).await;
        db.cleanup().await;
        return;
    }
    let relay_topic = format!("{prefix}resource.created");
    let dbz_topic = format!("{prefix}dbz.resource.created");
    let owner = db.owner().await;
    let relay_sql = platform::db::connect(&db.relay_url()).await.unwrap();
    let ceiling_slots: Vec<String> = (0..CEILING_SLOTS)
        .map(|i| format!("ceil{i}_{}", db.name))
        .collect();
    let (relay_slot, dbz_slot) = (format!("kafkify_{}", db.name), format!("dbz_{}", db.name));
    for slot in ceiling_slots.iter().chain([&relay_slot, &dbz_slot]) {
        relay_sql
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await
            .unwrap();
    }
    eprintln!("writing the backlog: {events} events of ~{size} B");
    for i in (0..events).step_by(100) {
        owner
            .batch_execute(&outbox_insert_sql(100.min(events - i), size, i))
            .await
            .unwrap();
    }
    let endpos: String = relay_sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);

    eprintln!("raw ceilings");
    let pg = pg_recvlogical_ceiling(&db, &ceiling_slots, &endpos, events);
    for slot in &ceiling_slots {
        relay_sql
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .unwrap();
    }
    // The broker does not create topics on demand: the perf test's and Debezium's are made
    // here, with the relay's partition count (6).
    let perf_topic = format!("{prefix}perf");
    fn new(t: &str) -> rdkafka::admin::NewTopic<'_> {
        rdkafka::admin::NewTopic::new(t, 6, rdkafka::admin::TopicReplication::Fixed(1))
    }
    stack()
        .kafka_admin()
        .create_topics(
            &[new(&perf_topic), new(&dbz_topic)],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    let perf = producer_perf_ceiling(&perf_topic, size, false);
    let perf_txn = producer_perf_ceiling(&perf_topic, size, true);
    let pg_ceiling = pg.rate;
    // Like for like: the transactional producer's ceiling for the exactly-once relay.
    let kafka_ceiling = if delivery == "exactly-once" {
        perf_txn.rate
    } else {
        perf.rate
    };

    eprintln!("cdc-relay: draining the backlog");
    let relay = Service::spawn(&relay_bin(), &relay_env(&db, &prefix, &delivery));
    wait_topic(&relay_topic, Duration::from_secs(60)).await;
    let relay_rate = drain(&relay_topic, events, Duration::from_secs(900), false)
        .await
        .rate();
    let mut relay_rss = rss_peak_mib(relay.pid());
    drop(relay);
    // The relay's slot would pin the WAL Debezium's runs write; the relay makes a new one later.
    relay_sql
        .execute("SELECT pg_drop_replication_slot($1)", &[&relay_slot])
        .await
        .unwrap();

    eprintln!("Debezium {DEBEZIUM_VERSION}: draining the backlog");
    let dbz = start_debezium(&db, &dbz_slot, &prefix);
    wait_topic(&dbz_topic, Duration::from_secs(180)).await;
    let dbz_rate = drain(&dbz_topic, events, Duration::from_secs(1800), false)
        .await
        .rate();
    let fractions = [0.25, 0.5, 0.75];
    let rates: Vec<f64> = fractions
        .iter()
        .map(|f| (f * dbz_rate).round().max(10.0))
        .collect();
    let mut dbz_points = Vec::new();
    for (i, r) in rates.iter().enumerate() {
        eprintln!("Debezium at {r:.0} events/s");
        let lat = at_rate(&db, &dbz_topic, *r, seconds, size, 100_000_000 * (i + 1)).await;
        dbz_points.push((*r, quantiles(&lat), lat.len()));
    }
    let dbz_rss = rss_peak_mib(dbz.child.id());
    let dbz_dir = dbz.dir.clone();
    drop(dbz);
    relay_sql
        .execute("SELECT pg_drop_replication_slot($1)", &[&dbz_slot])
        .await
        .unwrap();

    let mut relay = Service::spawn(&relay_bin(), &relay_env(&db, &prefix, &delivery));
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut relay_points = Vec::new();
    for (i, r) in rates.iter().enumerate() {
        eprintln!("cdc-relay at {r:.0} events/s");
        let lat = at_rate(
            &db,
            &relay_topic,
            *r,
            seconds,
            size,
            900_000_000 + 100_000_000 * i,
        )
        .await;
        relay_points.push((*r, quantiles(&lat), lat.len()));
    }
    relay_rss = relay_rss.max(rss_peak_mib(relay.pid()));
    drop(relay);

    // The report.
    let lower_ceiling = pg_ceiling.min(kafka_ceiling);
    let half = |pts: &[(f64, (f64, f64, f64), usize)]| pts[1].1 .2;
    let mut md = String::new();
    md.push_str(&format!(
        "# cdc-relay vs Debezium {DEBEZIUM_VERSION}\n\nOne machine ({} cores), same Postgres 15 and Kafka 4.1.1, outbox rows of ~{size} B JSON, backlog {events} events, {seconds} s per rate.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    md.push_str("| | cdc-relay | Debezium | relay / Debezium |\n|---|---|---|---|\n");
    md.push_str(&format!(
        "| sustained events/s (backlog drain) | {relay_rate:.0} | {dbz_rate:.0} | {:.1}× |\n",
        relay_rate / dbz_rate
    ));
    for (k, f) in fractions.iter().enumerate() {
        let (r, (rp50, rp95, rp99), rn) = relay_points[k];
        let (_, (dp50, dp95, dp99), dn) = dbz_points[k];
        md.push_str(&format!(
            "| commit→visible at {r:.0}/s ({:.0}% of Debezium's peak): p50 / p95 / p99 ms | {rp50:.1} / {rp95:.1} / {rp99:.1} ({rn} events) | {dp50:.1} / {dp95:.1} / {dp99:.1} ({dn} events) | p99 {:.2}× |\n",
            f * 100.0,
            rp99 / dp99
        ));
    }
    md.push_str(&format!(
        "| peak RSS MiB | {relay_rss:.1} | {dbz_rss:.1} (JVM, -Xmx1g) | {:.3}× |\n",
        relay_rss / dbz_rss
    ));
    md.push_str(&format!(
        "\nRaw ceilings on the same machine: pg_recvlogical decoding the same backlog (pgoutput, read from a pipe; {} runs, {:.1} s of streaming timed from each run's first byte) {pg_ceiling:.0} events/s; Kafka's ProducerPerformance with the relay's producer settings ({size} B records, acks=all, idempotent, lz4, linger 1 ms, 1,000,000 B batches; {PERF_RECORDS} records) {:.0} records/s ({:.1} s), in 100 ms transactions {:.0} records/s ({:.1} s). Against the relay ({delivery}): the lower of pg_recvlogical and the {} producer, {:.0}% reached.\n",
        pg.runs,
        pg.seconds,
        perf.rate,
        perf.seconds,
        perf_txn.rate,
        perf_txn.seconds,
        if delivery == "exactly-once" { "transactional" } else { "plain" },
        100.0 * relay_rate / lower_ceiling
    ));
    if relay_rate > lower_ceiling {
        md.push_str("\nThe relay beat its ceiling: the ceiling is wrong, not a result.\n");
    }
    md.push_str(&format!(
        "\nTargets: relay ≥ 3× Debezium's sustained rate: {:.1}×; ≥ 70% of the lower raw ceiling: {:.0}%; p99 at half Debezium's peak ≤ a fifth of Debezium's: {:.2}×; RSS ≤ a tenth: {:.3}×.\n",
        relay_rate / dbz_rate,
        100.0 * relay_rate / lower_ceiling,
        half(&relay_points) / half(&dbz_points),
        relay_rss / dbz_rss
    ));
    md.push_str(&format!("\nDebezium settings: pgoutput, snapshot.mode=no_data, poll.interval.ms=10, max.batch.size=8192, max.queue.size=32768, StringConverter, EventRouter keyed by aggregate_id; producer linger.ms=5, acks=all, idempotent. cdc-relay: defaults (Avro through the schema registry, linger 5 ms), delivery {delivery}.\n"));
    let results = root().join("loadtest/results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join(format!("compare-{delivery}.md")), &md).unwrap();
    let points = |pts: &[(f64, (f64, f64, f64), usize)]| {
        pts.iter()
            .map(|(r, (a, b, c), n)| serde_json::json!({"rate": r, "p50": a, "p95": b, "p99": c, "n": n}))
            .collect::<Vec<_>>()
    };
    let json = serde_json::json!({
        "relay": {"sustained": relay_rate, "rss_mib": relay_rss, "points": points(&relay_points)},
        "debezium": {"sustained": dbz_rate, "rss_mib": dbz_rss, "points": points(&dbz_points)},
        "ceilings": {
            "pg_recvlogical": {"rate": pg.rate, "seconds": pg.seconds, "runs": pg.runs},
            "kafka_producer": {"rate": perf.rate, "seconds": perf.seconds},
            "kafka_producer_transactional": {"rate": perf_txn.rate, "seconds": perf_txn.seconds},
        },
    });
    std::fs::write(
        results.join(format!("compare-{delivery}.json")),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("{md}");
    let _ = std::fs::remove_dir_all(dbz_dir);
    test_support::delete_topics_with_prefix(&prefix).await;
    drop(owner);
    drop(relay_sql);
    db.cleanup().await;
}
