//! `kafkify-lag`: a small HTTP service on 127.0.0.1 that `cdc-lag-test.js` asks, at the end of
//! its run, how long its writes took to reach Kafka and the worker. Nothing is estimated: for
//! each resource the run created, the worker's `processed_events` row names the Kafka record
//! (topic, partition, offset) and holds the Postgres commit time and the time the worker
//! stored it; the record itself, fetched from Kafka, carries the time the relay produced it.
//!
//!   GET /lag?prefix=<name prefix>&expect=<n>&timeout_s=<s>
//!   → {"found": n, "wal_to_kafka_ms": [...], "end_to_end_ms": [...]}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{json, Value};

#[derive(Parser, Clone)]
#[command(
    about = "Serves WAL-to-Kafka and end-to-end lag of a load test run, read from Kafka and the worker database"
)]
struct Args {
    /// Listen address (loopback only).
    #[arg(long, env = "LAG_ADDR", default_value = "127.0.0.1:7878")]
    addr: SocketAddr,
    /// The worker's database.
    #[arg(
        long,
        env = "WORKER_DATABASE_URL",
        default_value = "postgres://kafkify_worker:worker-local@127.0.0.1:5432/worker"
    )]
    worker_database_url: String,
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.addr.ip().is_loopback(),
        "LAG_ADDR must be a loopback address"
    );
    let app = Router::new()
        .route("/lag", get(lag))
        .with_state(args.clone());
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    eprintln!("kafkify-lag listening on {}", args.addr);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

struct Row {
    topic: String,
    partition: i32,
    offset: i64,
    commit_ms: f64,
    processed_ms: f64,
}

async fn lag(State(args): State<Args>, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    match measure(&args, &q).await {
        Ok(v) => Json(v),
        Err(e) => Json(json!({ "error": format!("{e:#}") })),
    }
}

async fn measure(args: &Args, q: &HashMap<String, String>) -> anyhow::Result<Value> {
    let prefix = q.get("prefix").context("prefix is required")?.clone();
    let expect: i64 = q.get("expect").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = Duration::from_secs(
        q.get("timeout_s")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let (client, conn) = tokio_postgres::connect(&args.worker_database_url, tokio_postgres::NoTls)
        .await
        .context("worker database")?;
    tokio::spawn(conn);
    let deadline = tokio::time::Instant::now() + timeout;
    let sql = "SELECT topic, partition, \"offset\",
                      (extract(epoch FROM commit_ts) * 1000)::float8,
                      (extract(epoch FROM processed_at) * 1000)::float8
                 FROM processed_events
                WHERE event_type = 'resource.created' AND payload->>'name' LIKE $1 || '%'
                  AND commit_ts IS NOT NULL";
    let rows = loop {
        let rows = client.query(sql, &[&prefix]).await?;
        if rows.len() as i64 >= expect || tokio::time::Instant::now() >= deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let rows: Vec<Row> = rows
        .iter()
        .map(|r| Row {
            topic: r.get(0),
            partition: r.get(1),
            offset: r.get(2),
            commit_ms: r.get(3),
            processed_ms: r.get(4),
        })
        .collect();
    let brokers = args.kafka_brokers.clone();
    let stamps = {
        let keys: Vec<(String, i32, i64)> = rows
            .iter()
            .map(|r| (r.topic.clone(), r.partition, r.offset))
            .collect();
        tokio::task::spawn_blocking(move || record_times(&brokers, &keys)).await??
    };
    let mut wal_to_kafka = Vec::new();
    let mut end_to_end = Vec::new();
    for r in &rows {
        if let Some(ts) = stamps.get(&(r.topic.clone(), r.partition, r.offset)) {
            wal_to_kafka.push((*ts as f64 - r.commit_ms).max(0.0));
        }
        end_to_end.push((r.processed_ms - r.commit_ms).max(0.0));
    }
    Ok(json!({
        "found": rows.len(),
        "expected": expect,
        "wal_to_kafka_ms": wal_to_kafka,
        "end_to_end_ms": end_to_end,
    }))
}

/// The timestamp (ms) of each named record, fetched from Kafka by partition and offset.
fn record_times(
    brokers: &str,
    keys: &[(String, i32, i64)],
) -> anyhow::Result<HashMap<(String, i32, i64), i64>> {
    let mut out = HashMap::new();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "kafkify-lag")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut by_partition: HashMap<(String, i32), Vec<i64>> = HashMap::new();
    for (t, p, o) in keys {
        by_partition.entry((t.clone(), *p)).or_default().push(*o);
    }
    for ((topic, partition), mut offsets) in by_partition {
        offsets.sort_unstable();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offsets[0]))?;
        consumer.assign(&tpl)?;
        let last = *offsets.last().unwrap_or(&0);
        let wanted: std::collections::HashSet<i64> = offsets.into_iter().collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    if wanted.contains(&m.offset()) {
                        if let Some(ts) = m.timestamp().to_millis() {
                            out.insert((topic.clone(), partition, m.offset()), ts);
                        }
                    }
                    if m.offset() >= last {
                        break;
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
        }
    }
    Ok(out)
}
