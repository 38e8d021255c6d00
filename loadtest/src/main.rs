//! `kafkify-lag`: a small HTTP service on 127.0.0.1 that `cdc-lag-test.js` asks, at the end of
//! its run, how long its writes took to reach Kafka and the worker. Nothing is estimated: for
//! each resource the run created, the worker's `processed_events` row names the Kafka record
//! (topic, partition, offset) and holds the Postgres commit time and the time the worker
//! stored it; the record itself, fetched from Kafka, carries the time the relay produced it. A
//! read_committed consumer that follows the topic from this service's start notes when each
//! record became visible: for an exactly-once relay that is the Kafka commit, later than the
//! produce time, and it is what a consumer of the pipeline waits for.
//!
//!   GET /lag?prefix=<name prefix>&expect=<n>&timeout_s=<s>
//!   → {"found": n, "commit_to_visible_ms": [...], "commit_to_produced_ms": [...],
//!      "end_to_end_ms": [...]}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// The topic whose records' visibility is watched (the resources the scripts create).
    #[arg(long, env = "LAG_TOPIC", default_value = "resource.created")]
    topic: String,
}

/// When each record of the watched topic, by (partition, offset), was first seen by a
/// read_committed consumer (Unix ms).
type Visible = Arc<Mutex<HashMap<(i32, i64), f64>>>;

#[derive(Clone)]
struct AppState {
    args: Args,
    visible: Visible,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.addr.ip().is_loopback(),
        "LAG_ADDR must be a loopback address"
    );
    let visible = Visible::default();
    let watcher = watch(&args.kafka_brokers, &args.topic)?;
    {
        let visible = visible.clone();
        std::thread::spawn(move || follow(&watcher, &visible));
    }
    let app = Router::new().route("/lag", get(lag)).with_state(AppState {
        args: args.clone(),
        visible,
    });
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

async fn lag(State(st): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    match measure(&st.args, &st.visible, &q).await {
        Ok(v) => Json(v),
        Err(e) => Json(json!({ "error": format!("{e:#}") })),
    }
}

async fn measure(
    args: &Args,
    visible: &Visible,
    q: &HashMap<String, String>,
) -> anyhow::Result<Value> {
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
    let mut produced = Vec::new();
    let mut seen = Vec::new();
    let mut end_to_end = Vec::new();
    {
        let visible = visible.lock().expect("the watcher never panics holding it");
        for r in &rows {
            if let Some(ts) = stamps.get(&(r.topic.clone(), r.partition, r.offset)) {
                produced.push((*ts as f64 - r.commit_ms).max(0.0));
            }
            if r.topic == args.topic {
                if let Some(at) = visible.get(&(r.partition, r.offset)) {
                    seen.push((at - r.commit_ms).max(0.0));
                }
            }
            end_to_end.push((r.processed_ms - r.commit_ms).max(0.0));
        }
    }
    Ok(json!({
        "found": rows.len(),
        "expected": expect,
        "commit_to_visible_ms": seen,
        "commit_to_produced_ms": produced,
        "end_to_end_ms": end_to_end,
    }))
}

/// The settings of both of this tool's consumers: assigned partitions, nothing committed,
/// only what committed Kafka transactions hold.
fn reader(brokers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    c
}

/// A read_committed consumer of every partition of `topic`, from its end: what is committed
/// from now on.
fn watch(brokers: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = reader(brokers, "kafkify-lag-watch")
        // A fetch answers as soon as anything is visible, not after the default 500 ms.
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .create()?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("metadata of {topic}"))?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::End)?;
        }
    }
    anyhow::ensure!(
        tpl.count() > 0,
        "topic {topic} has no partitions (is the stack up?)"
    );
    consumer.assign(&tpl)?;
    Ok(consumer)
}

fn follow(consumer: &BaseConsumer, visible: &Visible) {
    loop {
        let m = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => m,
            // librdkafka retries by itself; say so, or a run would just find fewer records.
            Some(Err(e)) => {
                eprintln!("kafkify-lag: watching: {e}");
                continue;
            }
            None => continue,
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        visible
            .lock()
            .expect("only this thread writes")
            .entry((m.partition(), m.offset()))
            .or_insert(now);
    }
}

/// The timestamp (ms) of each named record, fetched from Kafka by partition and offset.
fn record_times(
    brokers: &str,
    keys: &[(String, i32, i64)],
) -> anyhow::Result<HashMap<(String, i32, i64), i64>> {
    let mut out = HashMap::new();
    let consumer: BaseConsumer = reader(brokers, "kafkify-lag").create()?;
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
