//! `cargo bench -p cdc-relay --bench relay [-- --events N --size BYTES --rate EVENTS_PER_S --seconds S --delivery exactly-once|at-least-once --linger 5ms]`
//!
//! Runs the real relay (release build) against the local stack (`./kafkify up --infra`) and
//! prints what it measured:
//! - sustained throughput: a backlog of N outbox events of the given size is written while the
//!   relay is stopped, then the relay drains it; events/s between the first and the last record
//!   a read_committed consumer receives;
//! - latency at a fixed rate: events written at RATE/s for S seconds with the relay running;
//!   percentiles of (time the consumer receives it − Postgres commit time from `commit_ts`);
//! - the relay's peak RSS (VmHWM).
//!
//! Numbers, not assertions: targets live in the issue notes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use test_support::bench::percentile;
use test_support::service::Service;
use test_support::{consumer_group, stack, unique, Source, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_cdc-relay");

struct Args {
    events: usize,
    size: usize,
    rate: usize,
    seconds: u64,
    delivery: String,
    linger: String,
}

fn args() -> Args {
    let mut a = Args {
        events: 100_000,
        size: 500,
        rate: 10_000,
        seconds: 10,
        delivery: "exactly-once".into(),
        linger: "5ms".into(),
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
            // cargo bench passes --bench; anything else is a typo worth saying.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// SQL that inserts `n` outbox rows whose JSON payload is about `size` bytes, all in one
/// statement (and so one transaction); keys cycle through 100 aggregates.
fn insert_sql(n: usize, size: usize, offset: usize) -> String {
    // The fixed part of the payload is ~230 bytes; the description pads it to `size`.
    let pad = size.saturating_sub(230).max(1);
    format!(
        "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
         SELECT gen_random_uuid(), 'resource', 'k' || (i % 100), 'resource.created',
                jsonb_build_object('resource_id', gen_random_uuid()::text, 'name', 'bench-' || i,
                  'description', repeat('x', {pad}), 'attributes', jsonb_build_object('n', i::text),
                  'version', i, 'created_at', (extract(epoch from clock_timestamp()) * 1000000)::bigint)
         FROM generate_series({}, {}) AS i",
        offset + 1,
        offset + n
    )
}

fn topic_exists(topic: &str) -> bool {
    stack()
        .kafka_admin()
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map(|md| {
            md.topics()
                .first()
                .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty())
        })
        .unwrap_or(false)
}

fn rss_peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Reads `topic` (from its start, or from its current end) until `n` records arrived; returns
/// (arrival instants, latencies in ms, bytes).
async fn drain(
    topic: &str,
    n: usize,
    limit: Duration,
    from_end: bool,
) -> (Vec<Instant>, Vec<f64>, usize) {
    let consumer: StreamConsumer = stack()
        .kafka_config()
        .set("group.id", consumer_group("bench"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    // Assigned, not subscribed: no group join delays the first record.
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        let offset = if from_end {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            rdkafka::Offset::Offset(high)
        } else {
            rdkafka::Offset::Beginning
        };
        tpl.add_partition_offset(topic, p.id(), offset).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut arrivals = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut bytes = 0;
    let deadline = Instant::now() + limit;
    while arrivals.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(msg) = tokio::time::timeout(left, consumer.recv()).await else {
            eprintln!("time limit: {} of {n} records arrived", arrivals.len());
            break;
        };
        let msg = msg.unwrap();
        let now = now_micros();
        arrivals.push(Instant::now());
        bytes += msg.payload_len();
        let commit_ts = msg
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "commit_ts"))
            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<i64>().ok());
        if let Some(ts) = commit_ts {
            latencies.push((now - ts) as f64 / 1000.0);
        }
    }
    (arrivals, latencies, bytes)
}

fn relay_env(
    db: &TestDb,
    prefix: &str,
    delivery: &str,
    linger: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.relay_dsn()),
        ("RELAY_SOURCES", db.name.clone()),
        ("RELAY_TOPIC_PREFIX", prefix.to_string()),
        ("RELAY_CHECKPOINT_TOPIC", format!("{prefix}checkpoints")),
        ("RELAY_DELIVERY", delivery.to_string()),
        ("RELAY_BATCH_LINGER", linger.to_string()),
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
    let per_tx = 100;
    for i in (0..a.events).step_by(per_tx) {
        owner
            .batch_execute(&insert_sql(per_tx.min(a.events - i), a.size, i))
            .await
            .unwrap();
    }
    let wrote = t.elapsed();
    let relay = Service::spawn(BIN, &relay_env(&db, &prefix, &a.delivery, &a.linger));
    // The relay creates the topic; wait for it before assigning.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !topic_exists(&topic) {
        assert!(
            Instant::now() < deadline,
            "the relay did not create {topic}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (arrivals, _, bytes) = drain(&topic, a.events, Duration::from_secs(600), false).await;
    let drain_secs = match (arrivals.first(), arrivals.last()) {
        (Some(f), Some(l)) if arrivals.len() > 1 => (*l - *f).as_secs_f64(),
        _ => f64::NAN,
    };
    let drain_rate = (arrivals.len() - 1) as f64 / drain_secs;
    let record_bytes = bytes / arrivals.len().max(1);

    // 2. Latency at a fixed rate, relay running. One transaction every 10 ms.
    let ticks = a.seconds * 100;
    let per_tick = (a.rate / 100).max(1);
    let n = ticks as usize * per_tick;
    let reader = tokio::spawn({
        let topic = topic.clone();
        async move {
            drain(&topic, n, Duration::from_secs(a.seconds + 120), true)
                .await
                .1
        }
    });
    // Let the reader take its position at the end first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for k in 0..ticks as usize {
        tick.tick().await;
        owner
            .batch_execute(&insert_sql(per_tick, a.size, a.events + k * per_tick))
            .await
            .unwrap();
    }
    let offered = n as f64 / started.elapsed().as_secs_f64();
    let mut lat = reader.await.unwrap();
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let rss = rss_peak_kib(relay.pid())
        .map(|k| k as f64 / 1024.0)
        .unwrap_or(f64::NAN);
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
        "  backlog written: {} events in {:.2} s ({:.0} events/s into Postgres)",
        a.events,
        wrote.as_secs_f64(),
        a.events as f64 / wrote.as_secs_f64()
    );
    println!(
        "  backlog drained: {} events in {:.2} s = {:.0} events/s ({:.1} MB/s)",
        arrivals.len(),
        drain_secs,
        drain_rate,
        drain_rate * record_bytes as f64 / 1e6
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
    println!("  relay peak RSS {rss:.1} MiB");

    test_support::delete_topics_with_prefix(&prefix).await;
    drop(owner);
    drop(relay_sql);
    db.cleanup().await;
}
