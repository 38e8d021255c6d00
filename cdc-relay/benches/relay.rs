//! `cargo bench -p cdc-relay --bench relay [-- --events N --size BYTES --per-tx ROWS --rate EVENTS_PER_S --seconds S --delivery exactly-once|at-least-once --linger 5ms --transaction-timeout 60s]`
//!
//! Runs the real relay (release build) against the local stack (`./kafkify up --infra`) and
//! prints what it measured:
//! - sustained throughput: a backlog of N outbox events of the given size, in transactions of
//!   `--per-tx` rows (100; `--per-tx N` makes it one transaction), is written while the relay
//!   is stopped, then the relay drains it; events/s between the first and the last record a
//!   read_committed consumer receives;
//! - latency at a fixed rate: events written at RATE/s for S seconds with the relay running;
//!   percentiles of (time the consumer receives it − Postgres commit time from `commit_ts`);
//! - an oversized row: a row of `--oversized-mib` MiB (20) is committed, then a normal row;
//!   the normal row's commit→visible time, over five rounds (the oversized one is
//!   dead-lettered without its payload);
//! - the relay's peak RSS (VmHWM).
//!
//! Numbers, not assertions: targets live in the issue notes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use test_support::bench::{
    drain, drain_positioned, outbox_insert_sql, percentile, rss_peak_mib, wait_topic,
};
use test_support::service::Service;
use test_support::{stack, unique, Source, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_cdc-relay");

struct Args {
    events: usize,
    size: usize,
    rate: usize,
    seconds: u64,
    delivery: String,
    linger: String,
    per_tx: usize,
    transaction_timeout: String,
    oversized_mib: usize,
}

fn args() -> Args {
    let mut a = Args {
        events: 100_000,
        size: 500,
        rate: 10_000,
        seconds: 10,
        delivery: "exactly-once".into(),
        linger: "5ms".into(),
        per_tx: 100,
        transaction_timeout: "60s".into(),
        oversized_mib: 20,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match flag.as_str() {
            "--events" => a.events = value().parse().expect("--events N"),
            "--size" => a.size = value().parse().expect("--size BYTES"),
            "--rate" => a.rate = value().parse().expect("--rate EVENTS_PER_S"),
            "--seconds" => a.seconds = value().parse().expect("--seconds S"),
            "--delivery" => a.delivery = value(),
            "--linger" => a.linger = value(),
            "--per-tx" => a.per_tx = value().parse().expect("--per-tx ROWS"),
            "--transaction-timeout" => a.transaction_timeout = value(),
            "--oversized-mib" => a.oversized_mib = value().parse().expect("--oversized-mib MIB"),
            // cargo bench passes --bench; anything else is a typo worth saying.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn relay_env(db: &TestDb, prefix: &str, a: &Args) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.relay_dsn()),
        ("RELAY_SOURCES", db.name.clone()),
        ("RELAY_TOPIC_PREFIX", prefix.to_string()),
        ("RELAY_CHECKPOINT_TOPIC", format!("{prefix}checkpoints")),
        ("RELAY_DELIVERY", a.delivery.clone()),
        ("RELAY_BATCH_LINGER", a.linger.clone()),
        ("RELAY_TRANSACTION_TIMEOUT", a.transaction_timeout.clone()),
        ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
        ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
        ("LOG_LEVEL", "warn".into()),
    ]
}

#[tokio::main]
async fn main() {
    let a = args();
    let db = TestDb::create(Source::Rest).await;
    let prefix = format!("{}.", unique("bench"));
    let topic = format!("{prefix}resource.created");
    let owner = db.owner().await;

    // The slot must exist before the backlog is written, or the relay would start after it.
    let relay_sql = platform::db::connect(&db.relay_url()).await.unwrap();
    relay_sql
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&format!("kafkify_{}", db.name)],
        )
        .await
        .unwrap();

    // 1. Backlog drain.
    let t = Instant::now();
    let per_tx = a.per_tx.max(1);
    for i in (0..a.events).step_by(per_tx) {
        owner
            .batch_execute(&outbox_insert_sql(per_tx.min(a.events - i), a.size, i))
            .await
            .unwrap();
    }
    let wrote = t.elapsed();
    let spawned = Instant::now();
    let relay = Service::spawn(BIN, &relay_env(&db, &prefix, &a));
    // The relay creates the topic; wait for it before assigning.
    wait_topic(&topic, Duration::from_secs(60)).await;
    let drained = drain(&topic, a.events, Duration::from_secs(600), false).await;
    let arrivals = &drained.arrivals;
    let drain_rate = drained.rate();
    let drain_secs = (arrivals.len().max(2) - 1) as f64 / drain_rate;
    let record_bytes = drained.bytes / arrivals.len().max(1);
    let rss_after_drain = rss_peak_mib(relay.pid());
    // A large transaction becomes visible all at once, at its commit: then only the time from
    // the relay's start to the last record says how fast the relay moved it.
    let from_start = arrivals
        .last()
        .map_or(f64::NAN, |l| (*l - spawned).as_secs_f64());

    // 2. Latency at a fixed rate, relay running. One transaction every 10 ms.
    let ticks = a.seconds * 100;
    let per_tick = (a.rate / 100).max(1);
    let n = ticks as usize * per_tick;
    let (positioned, ready) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn({
        let topic = topic.clone();
        async move {
            drain_positioned(
                &topic,
                n,
                Duration::from_secs(a.seconds + 120),
                true,
                positioned,
            )
            .await
            .latencies_ms
        }
    });
    // The reader is placed at the end before the first write, not after a guessed sleep.
    ready.await.expect("the reader is positioned");
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for k in 0..ticks as usize {
        tick.tick().await;
        owner
            .batch_execute(&outbox_insert_sql(
                per_tick,
                a.size,
                a.events + k * per_tick,
            ))
            .await
            .unwrap();
    }
    let offered = n as f64 / started.elapsed().as_secs_f64();
    let mut lat = reader.await.unwrap();
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());

    // 3. A normal row right behind an oversized one.
    let mut behind = Vec::new();
    let mut inserts = Vec::new();
    for round in 0..5 {
        let (positioned, ready) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn({
            let topic = topic.clone();
            async move {
                drain_positioned(&topic, 1, Duration::from_secs(120), true, positioned)
                    .await
                    .latencies_ms
            }
        });
        ready.await.expect("the reader is positioned");
        let base = a.events + n + 2 * round;
        let t = Instant::now();
        owner
            .batch_execute(&outbox_insert_sql(1, a.oversized_mib << 20, base))
            .await
            .unwrap();
        inserts.push(t.elapsed().as_secs_f64());
        owner
            .batch_execute(&outbox_insert_sql(1, a.size, base + 1))
            .await
            .unwrap();
        behind.extend(reader.await.unwrap());
    }
    behind.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let rss = rss_peak_mib(relay.pid());
    let (_, metrics) = relay.get("/metrics").await;
    drop(relay);

    let summary: HashMap<&str, String> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("kafkify_cdc_relay_") && (l.contains("_sum ") || l.contains("_count "))
        })
        .filter_map(|l| l.split_once(' ').map(|(k, v)| (k, v.to_string())))
        .collect();
    let batches: f64 = summary
        .get("kafkify_cdc_relay_batch_events_count")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);

    println!(
        "cdc-relay bench ({}, linger {}, payload ~{} B JSON, {} B on the wire)",
        a.delivery, a.linger, a.size, record_bytes
    );
    println!(
        "  backlog written: {} events in transactions of {} rows, in {:.2} s ({:.0} events/s into Postgres)",
        a.events,
        per_tx,
        wrote.as_secs_f64(),
        a.events as f64 / wrote.as_secs_f64()
    );
    println!(
        "  backlog drained: {} events in {:.2} s = {:.0} events/s ({:.1} MB/s); relay start → last event visible {:.2} s = {:.0} events/s; relay peak RSS by then {:.0} MiB",
        arrivals.len(),
        drain_secs,
        drain_rate,
        drain_rate * record_bytes as f64 / 1e6,
        from_start,
        arrivals.len() as f64 / from_start,
        rss_after_drain
    );
    println!(
        "  at {:.0} events/s offered for {} s ({} events): commit→visible p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        offered,
        a.seconds,
        lat.len(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.95),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    let avg = |name: &str| {
        let sum: f64 = summary
            .get(format!("kafkify_cdc_relay_{name}_sum").as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        let count: f64 = summary
            .get(format!("kafkify_cdc_relay_{name}_count").as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        sum / count
    };
    println!(
        "  Kafka transactions: {batches}, {:.0} events each, {:.1} ms each on average; relay's own commit→ack average {:.1} ms",
        avg("batch_events"),
        avg("kafka_transaction_seconds") * 1000.0,
        avg("commit_to_ack_seconds") * 1000.0
    );
    println!(
        "  a row behind a {} MiB one: commit→visible min {:.0} ms, median {:.0} ms, max {:.0} ms over {} rounds (the big row's INSERT took {:.2}–{:.2} s)",
        a.oversized_mib,
        behind.first().copied().unwrap_or(f64::NAN),
        percentile(&behind, 0.5),
        behind.last().copied().unwrap_or(f64::NAN),
        behind.len(),
        inserts.iter().copied().fold(f64::INFINITY, f64::min),
        inserts.iter().copied().fold(0.0, f64::max),
    );
    println!("  relay peak RSS {rss:.1} MiB");

    test_support::delete_topics_with_prefix(&prefix).await;
    drop(owner);
    drop(relay_sql);
    db.cleanup().await;
}
