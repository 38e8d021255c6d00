//! Faults under load, and the proof afterwards, shared by the chaos suite (one broker,
//! PostgreSQL 15) and the failover suite (a standby, three brokers): the steady write load through
//! both APIs, the recovery probe, and the exactly-once proof read back from the databases and
//! Kafka.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api_grpc::pb;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use test_support::{consumer_group, stack, stack_setting};

use super::Pipeline;

/// Load before each fault, so the fault hits a pipeline in steady state.
pub const STEADY: Duration = Duration::from_secs(6);
/// How long a killed component stays down.
pub const DOWN: Duration = Duration::from_secs(3);

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

pub fn pid_file(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{} holds no pid", path.display()))
}

pub fn signal(sig: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Postgres as a power cut would leave it: the postmaster stopped first so it cannot react,
/// then every backend and the postmaster itself killed. The restart runs crash recovery.
pub fn kill_postgres() {
    kill_postgres_at(Path::new(&stack_setting("KAFKIFY_PGDATA")));
}

/// [`kill_postgres`] for the cluster whose data directory is `data`.
pub fn kill_postgres_at(data: &Path) {
    let pid = pid_file(&data.join("postmaster.pid"));
    signal("-STOP", pid);
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-P", &pid.to_string()])
        .status();
    signal("-KILL", pid);
}

pub fn stack_pid(name: &str) -> u32 {
    pid_file(&Path::new(&stack_setting("KAFKIFY_RUN_DIR")).join(format!("{name}.pid")))
}

/// Runs `./kafkify ARGS` (with this process's environment, so the stack it acts on is the one
/// the test was given) and fails the test if it fails.
pub async fn kafkify(args: &'static [&'static str]) {
    kafkify_with(&[], args).await
}

/// [`kafkify`] with `env` added to the environment.
pub async fn kafkify_with(
    env: &'static [(&'static str, &'static str)],
    args: &'static [&'static str],
) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(root().join("kafkify"))
            .args(args)
            .envs(env.iter().copied())
            .current_dir(root())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "./kafkify {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `./kafkify up --infra` starts whatever of the infrastructure is not running.
pub async fn restart_infra() {
    kafkify(&["up", "--infra"]).await;
}

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub failed: AtomicU64,
}

/// The steady write load: a resource created and replaced twice (three events of one key, in
/// order) and a task submitted, every 50 ms each. Failures are counted and otherwise ignored:
/// what counts is what committed.
pub fn start_load(
    p: &Pipeline,
    stop: Arc<std::sync::atomic::AtomicBool>,
    counters: Arc<Counters>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let rest_base = p.rest.base();
    let http = test_support::api_client();
    let rest = {
        let counters = counters.clone();
        steady(stop.clone(), move |n| {
            let (http, rest_base, counters) = (http.clone(), rest_base.clone(), counters.clone());
            async move {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                let created = http
                    .post(format!("{rest_base}/api/v1/resources"))
                    .json(&serde_json::json!({ "name": format!("chaos {n}") }))
                    .send()
                    .await;
                let id = match created {
                    Ok(r) if r.status() == 201 => r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["id"].as_str().map(String::from)),
                    _ => None,
                };
                let Some(id) = id else {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                for v in 2..=3 {
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    let ok = http
                        .put(format!("{rest_base}/api/v1/resources/{id}"))
                        .json(&serde_json::json!({ "name": format!("chaos {n} v{v}") }))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    if !ok {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        })
    };
    let client = p.tasks.clone();
    let grpc = steady(stop, move |n| {
        let (mut client, counters) = (client.clone(), counters.clone());
        async move {
            counters.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = tonic::Request::new(pb::ProcessTaskRequest {
                r#type: "checksum".into(),
                input: format!(r#"{{"n": {n}}}"#),
                idempotency_key: String::new(),
            });
            req.set_timeout(Duration::from_secs(5));
            let ok = tokio::time::timeout(Duration::from_secs(6), client.process_task(req))
                .await
                .is_ok_and(|r| r.is_ok());
            if !ok {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    vec![rest, grpc]
}

/// Runs `step(1)`, `step(2)`, … one every 50 ms until `stop`.
pub fn steady<F, Fut>(
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut step: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            n += 1;
            step(n).await;
        }
    })
}

/// Time from `fault_at` until a resource created after the fault was processed by the worker:
/// the whole path works again.
pub async fn recovery(p: &Pipeline, fault_at: Instant, label: &str) -> Duration {
    let http = test_support::api_client();
    let limit = Duration::from_secs(240);
    let id = loop {
        assert!(
            fault_at.elapsed() < limit,
            "{label}: no write succeeded within {limit:?}"
        );
        let r = http
            .post(format!("{}/api/v1/resources", p.rest.base()))
            .json(&serde_json::json!({ "name": format!("probe after {label}") }))
            .send()
            .await;
        if let Ok(r) = r {
            if r.status() == 201 {
                break r.json::<serde_json::Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    loop {
        if let Ok(c) = platform::db::connect(&p.worker_db.owner_url()).await {
            if let Ok(row) = c
                .query_one(
                    "SELECT count(*) FROM processed_events WHERE event_key = $1",
                    &[&id],
                )
                .await
            {
                if row.get::<_, i64>(0) == 1 {
                    return fault_at.elapsed();
                }
            }
        }
        assert!(
            fault_at.elapsed() < limit,
            "{label}: the probe event was not processed within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every outbox row of the three databases: (event id, event type, created_at as epoch s).
pub async fn outbox(p: &Pipeline) -> Vec<(String, String, f64)> {
    let mut rows = Vec::new();
    for db in [&p.rest_db, &p.grpc_db, &p.worker_db] {
        let c = db.owner().await;
        for r in c
            .query(
                "SELECT id::text, event_type, extract(epoch FROM created_at)::float8 FROM outbox_events",
                &[],
            )
            .await
            .unwrap()
        {
            rows.push((r.get(0), r.get(1), r.get(2)));
        }
    }
    rows
}

/// What the pipeline's topics hold, read with read_committed from the start to the end of
/// every partition.
pub struct OnKafka {
    /// How often each `event_id` is there.
    pub ids: HashMap<String, u32>,
    /// The `dlq_reason` of each event on a dead-letter topic.
    pub dead_lettered: HashMap<String, String>,
}

pub fn kafka_event_ids(prefix: &str) -> OnKafka {
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut dead_lettered = HashMap::new();
    read_topics(prefix, |msg| {
        let header = |name: &str| {
            msg.headers()
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let id = header("event_id")
            .unwrap_or_else(|| format!("<no event_id at {}/{}>", msg.partition(), msg.offset()));
        if msg.topic().ends_with(".dlq") {
            dead_lettered.insert(id.clone(), header("dlq_reason").unwrap_or_default());
        }
        *ids.entry(id).or_default() += 1;
    });
    OnKafka { ids, dead_lettered }
}

/// What Kafka holds once every outbox row is there, or after a minute of waiting for it.
/// At quiescence every event the worker consumes is recorded and every task is final, but a
/// dead letter, or a completion written after its task was last read, may still be in a Kafka
/// transaction the relay has not committed yet: a read a moment early would count it lost.
pub async fn settled_kafka(prefix: &str, rows: &[(String, String, f64)]) -> OnKafka {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let prefix = prefix.to_string();
        let kafka = tokio::task::spawn_blocking(move || kafka_event_ids(&prefix))
            .await
            .unwrap();
        let missing = rows
            .iter()
            .filter(|(id, _, _)| !kafka.ids.contains_key(id))
            .count();
        if missing == 0 || Instant::now() >= deadline {
            return kafka;
        }
        eprintln!("chaos: {missing} outbox events not on Kafka yet; reading again");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The outbox rows missing from Kafka, with what an investigation needs: the event, its
/// source database and commit time, and the logs of the relay that should have sent it.
pub async fn describe_missing(
    p: &Pipeline,
    rows: &[(String, String, f64)],
    on_kafka: &HashMap<String, u32>,
) -> String {
    let mut out = String::new();
    for db in [&p.rest_db, &p.grpc_db, &p.worker_db] {
        let c = db.owner().await;
        for (id, event_type, at) in rows.iter().filter(|(id, _, _)| !on_kafka.contains_key(id)) {
            let found = c
                .query_opt(
                    "SELECT aggregate_id, length(payload::text), xmin::text FROM outbox_events WHERE id::text = $1",
                    &[id],
                )
                .await
                .unwrap();
            if let Some(r) = found {
                out.push_str(&format!(
                    "missing from Kafka: {id} {event_type} in {} (aggregate {}, {} payload bytes, xmin {}) created at {at:.3}\n",
                    db.name,
                    r.get::<_, String>(0),
                    r.get::<_, i32>(1),
                    r.get::<_, String>(2),
                ));
            }
        }
    }
    out.push_str(&format!(
        "relay log (the current process; earlier ones beside it): {}\n",
        p.relay.log.display()
    ));
    out
}

/// Reads every topic starting with `prefix` (but the checkpoints) with read_committed from the
/// start to the end of every partition, each partition in offset order.
pub fn read_topics(prefix: &str, mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>)) {
    let consumer: BaseConsumer = stack()
        .kafka_config()
        .set("group.id", consumer_group("chaos-check"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = HashMap::new();
    for t in md.topics() {
        if !t.name().starts_with(prefix) || t.name().ends_with("checkpoints") {
            continue;
        }
        for part in t.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(t.name(), part.id(), Duration::from_secs(10))
                .unwrap();
            if high > 0 {
                tpl.add_partition_offset(t.name(), part.id(), rdkafka::Offset::Beginning)
                    .unwrap();
                ends.insert((t.name().to_string(), part.id()), high);
            }
        }
    }
    consumer.assign(&tpl).unwrap();
    let start = Instant::now();
    loop {
        let positions = consumer.position().unwrap();
        let done = ends.iter().all(|((t, part), high)| {
            positions
                .find_partition(t, *part)
                .and_then(|e| e.offset().to_raw())
                .is_some_and(|o| o >= *high)
        });
        if done {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the topics were not read to their end"
        );
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            each(&msg.unwrap());
        }
    }
}

pub struct Phase {
    pub fault: &'static str,
    /// When the steady load before the fault began (epoch seconds): events from here to the
    /// next phase's start count as this phase's.
    pub start: f64,
    pub recovery: Duration,
}

/// The proof after the load stopped: at quiescence (every event the worker consumes recorded,
/// every task final), each outbox row of the three databases is on Kafka exactly once (the
/// `oversized` ones dead-lettered as `too_large`, nothing else dead-lettered), Kafka holds no
/// event the databases lack, and each resource's updates are in version order. Prints the
/// table of faults: events written, delivered, duplicated, lost, recovery.
pub async fn prove_exactly_once(
    p: &Pipeline,
    phases: &[Phase],
    counters: &Counters,
    oversized: &[String],
) {
    // Quiescence: every event the worker consumes processed, every task final.
    let rows = outbox(p).await;
    // Dead-lettered events never reach the worker.
    let consumed = rows
        .iter()
        .filter(|(id, t, _)| t != "task.completed" && !oversized.contains(id))
        .count() as i64;
    p.wait_count(
        "SELECT count(*) FROM processed_events",
        consumed,
        Duration::from_secs(180),
    )
    .await;
    let grpc = p.grpc_db.owner().await;
    let start = Instant::now();
    loop {
        let pending: i64 = grpc
            .query_one(
                "SELECT count(*) FROM tasks WHERE status NOT IN ('COMPLETED', 'FAILED')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if pending == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{pending} tasks never reached a final state"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The worker wrote its completions before marking them consumed; they are in its outbox
    // now, so the outbox is read again.
    let rows = outbox(p).await;
    let kafka = settled_kafka(&p.prefix, &rows).await;
    let on_kafka = &kafka.ids;

    // The table.
    let mut table = String::from(
        "| fault | events written | delivered | duplicates | lost | recovery |\n|---|---|---|---|---|---|\n",
    );
    let (mut total_written, mut total_dup, mut total_lost) = (0, 0, 0);
    for (i, ph) in phases.iter().enumerate() {
        let end = phases.get(i + 1).map_or(f64::MAX, |n| n.start);
        let mine: Vec<_> = rows
            .iter()
            .filter(|(_, _, at)| *at >= ph.start && *at < end)
            .collect();
        let delivered = mine
            .iter()
            .filter(|(id, _, _)| on_kafka.contains_key(id))
            .count();
        let dup: u32 = mine
            .iter()
            .map(|(id, _, _)| on_kafka.get(id).copied().unwrap_or(0).saturating_sub(1))
            .sum();
        let lost = mine.len() - delivered;
        total_written += mine.len();
        total_dup += dup;
        total_lost += lost;
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} s |\n",
            ph.fault,
            mine.len(),
            delivered,
            dup,
            lost,
            ph.recovery.as_secs_f64()
        ));
    }
    println!(
        "\n{table}\nLoad: {} requests, {} refused or failed while components were down.\n",
        counters.requests.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed)
    );
    let known: std::collections::HashSet<&String> = rows.iter().map(|(id, _, _)| id).collect();
    let strangers: Vec<_> = on_kafka.keys().filter(|id| !known.contains(id)).collect();
    assert_eq!(rows.len(), known.len());
    assert!(
        total_written > 1000,
        "the load wrote only {total_written} events"
    );
    assert_eq!(
        (total_lost, total_dup),
        (0, 0),
        "lost and duplicated events:\n{table}\n{}",
        describe_missing(p, &rows, on_kafka).await
    );
    assert!(
        strangers.is_empty(),
        "records on Kafka with no outbox row: {strangers:?}"
    );
    for id in oversized {
        assert_eq!(
            kafka.dead_lettered.get(id).map(String::as_str),
            Some("too_large"),
            "oversized event {id} is not dead-lettered as too_large"
        );
    }
    assert_eq!(
        kafka.dead_lettered.len(),
        oversized.len(),
        "dead letters beyond the oversized rows: {:?}",
        kafka.dead_lettered
    );

    // Per-key order: each resource's updates (versions 2, 3) in offset order on one partition.
    let worker = p.worker_db.owner().await;
    let disorder: i64 = worker
        .query_one(
            "SELECT count(*) FROM (
               SELECT event_key, (payload->>'version')::bigint AS v,
                      lag((payload->>'version')::bigint) OVER w AS before
               FROM processed_events WHERE event_type = 'resource.updated'
               WINDOW w AS (PARTITION BY event_key ORDER BY \"offset\")
             ) x WHERE v <= before",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let updates: i64 = worker
        .query_one(
            "SELECT count(*) FROM processed_events WHERE event_type = 'resource.updated'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(updates > 100, "only {updates} updates to check order on");
    assert_eq!(disorder, 0, "updates out of version order within a key");
    drop((grpc, worker));
}
