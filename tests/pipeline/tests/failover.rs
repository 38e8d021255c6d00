//! Failover under load. `./kafkify test` runs this file against its second stack: PostgreSQL 17
//! with a standby (failover slots, `synchronized_standby_slots`, synchronous commit) and three
//! Kafka nodes (replication factor 3, `min.insync.replicas` 2), every service given libpq's
//! multi-host `DATABASE_URL` with `target_session_attrs=read-write`.
//!
//! With REST and gRPC load running, in turn: the Postgres primary is SIGKILLed and its standby
//! promoted; the Kafka node leading most of the busiest partitions is SIGKILLed; the node
//! coordinating the relay's transactions is SIGKILLed. Then the chaos suite's proof, read from
//! the new primary and Kafka: every outbox row exactly once on Kafka, no event on Kafka that the
//! new primary lacks, per-key order, every task final. It prints each fault's recovery time.
//!
//! A second test shows PostgreSQL 15, which has no failover slots, after a promotion: the relay
//! finds its slot missing on the new primary and refuses to recreate it silently.

mod pipeline;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline::faults::{
    epoch, kafkify, kafkify_with, kill_postgres_at, prove_exactly_once, recovery, signal,
    stack_pid, start_load, Counters, Phase, DOWN, STEADY,
};
use pipeline::Pipeline;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use test_support::private_pg::PrivatePostgres;
use test_support::service::{workspace_bin, Service};
use test_support::{consumer_group, stack, stack_setting};

/// The node (1 or 2) that is the primary now, and its data directory.
async fn primary_node() -> (usize, String) {
    let admin = &stack().admin_url;
    for (i, (host, port)) in admin.hosts().into_iter().enumerate() {
        let Ok(c) = platform::db::connect(&admin.on_host(&host, port)).await else {
            continue;
        };
        let standby: bool = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        if !standby {
            let node = i + 1;
            return (node, stack_setting(&format!("KAFKIFY_PG_DATA_{node}")));
        }
    }
    panic!("no node of {} is a primary", stack().pg_hosts);
}

/// A gauge of the relay's, per source: `name{source="…"} value`.
fn gauges(metrics: &str, name: &str) -> HashMap<String, i64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix("{source=\""))
        .filter_map(|l| {
            let (source, rest) = l.split_once("\"}")?;
            Some((source.to_string(), rest.trim().parse().ok()?))
        })
        .collect()
}

/// Until every source's slot is on the standby, synced and persisted: a promotion before that
/// would lose it (a standby keeps a new slot temporary until the primary's copy has moved past
/// the standby's catalog horizon).
async fn wait_failover_ready(p: &Pipeline, limit: Duration) {
    let start = Instant::now();
    loop {
        let (_, metrics) = p.relay.get("/metrics").await;
        let ready = gauges(&metrics, "kafkify_cdc_relay_slot_failover_ready");
        let all = [&p.rest_db, &p.grpc_db, &p.worker_db]
            .iter()
            .all(|db| ready.get(&db.name) == Some(&1));
        if all {
            eprintln!(
                "failover: every slot on the standby after {:?}",
                start.elapsed()
            );
            return;
        }
        assert!(
            start.elapsed() < limit,
            "slots not failover-ready after {limit:?}: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn consumer() -> BaseConsumer {
    stack()
        .kafka_config()
        .set("group.id", consumer_group("failover"))
        .create()
        .unwrap()
}

/// The Kafka node leading the partitions that hold the most records of the pipeline's topics.
fn busiest_leader(prefix: &str) -> i32 {
    let c = consumer();
    let md = c.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let mut records: HashMap<i32, i64> = HashMap::new();
    for t in md.topics() {
        if !t.name().starts_with(prefix) || t.name().ends_with("checkpoints") {
            continue;
        }
        for part in t.partitions() {
            let (low, high) = c
                .fetch_watermarks(t.name(), part.id(), Duration::from_secs(10))
                .unwrap();
            *records.entry(part.leader()).or_default() += high - low;
        }
    }
    let (leader, n) = records.into_iter().max_by_key(|(_, n)| *n).unwrap();
    eprintln!("failover: node {leader} leads the busiest partitions ({n} records)");
    leader
}

/// The Kafka node coordinating the transactions of the relay's producer for `database`, as
/// Kafka's own tool reports it (`kafka-transactions.sh list`).
async fn transaction_coordinator(database: &str) -> i32 {
    let home = stack_setting("KAFKIFY_KAFKA_HOME");
    let brokers = stack().kafka_brokers.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("java")
            .args([
                "-Dlog4j2.rootLogger.level=off",
                "-Dlog4j2.level=off",
                "-cp",
                &format!("{home}/libs/*"),
                "org.apache.kafka.tools.TransactionsCommand",
                "--bootstrap-server",
                &brokers,
                "list",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // TransactionalId  Coordinator  ProducerId  TransactionState
    let coordinator = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.len() >= 2 && cols[0].contains(database) && cols[0].ends_with("#0"))
        .and_then(|cols| cols[1].parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no transaction of {database} in kafka-transactions list: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("failover: node {coordinator} coordinates the relay's transactions for {database}");
    coordinator
}

fn kafka_pid(node: i32) -> u32 {
    stack_pid(&if node == 1 {
        "kafka".to_string()
    } else {
        format!("kafka-{node}")
    })
}

/// Starts the Kafka node a fault killed (and nothing else of the stack).
async fn restart_kafka() {
    kafkify_with(&[("KAFKIFY_COMPONENTS", "kafka")], &["up", "--infra"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "kills the second stack's Postgres primary and Kafka nodes; ./kafkify test runs it"]
async fn failovers_under_load_lose_and_duplicate_nothing() {
    assert!(
        stack().pg_hosts.contains(','),
        "needs a Postgres standby (KAFKIFY_PG_HOSTS with two nodes); ./kafkify test gives it one"
    );
    assert_eq!(
        stack_setting("KAFKIFY_KAFKA_NODES"),
        "3",
        "needs three Kafka nodes; ./kafkify test gives it them"
    );
    let p = Pipeline::start().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let load = start_load(&p, stop.clone(), counters.clone());
    wait_failover_ready(&p, Duration::from_secs(180)).await;

    let faults = [
        "Postgres primary SIGKILL, standby promoted",
        "Kafka: leader of the busiest partitions SIGKILL",
        "Kafka: the relay's transaction coordinator SIGKILL",
    ];
    let mut phases = Vec::new();
    let (old_primary, _) = primary_node().await;
    for fault in faults {
        let start = epoch();
        tokio::time::sleep(STEADY).await;
        eprintln!("failover: {fault}");
        let at = Instant::now();
        match fault {
            "Postgres primary SIGKILL, standby promoted" => {
                let (_, data) = primary_node().await;
                kill_postgres_at(Path::new(&data));
                // What an HA manager (Patroni, a managed service) does once it notices.
                tokio::time::sleep(DOWN).await;
                kafkify(&["pg-promote"]).await;
            }
            "Kafka: leader of the busiest partitions SIGKILL" => {
                signal("-KILL", kafka_pid(busiest_leader(&p.prefix)));
                tokio::time::sleep(DOWN).await;
                restart_kafka().await;
            }
            "Kafka: the relay's transaction coordinator SIGKILL" => {
                signal(
                    "-KILL",
                    kafka_pid(transaction_coordinator(&p.rest_db.name).await),
                );
                tokio::time::sleep(DOWN).await;
                restart_kafka().await;
            }
            _ => unreachable!(),
        }
        let recovery = recovery(&p, at, fault).await;
        eprintln!("failover: {fault}: recovered in {recovery:?}");
        phases.push(Phase {
            fault,
            start,
            recovery,
        });
    }
    let (new_primary, _) = primary_node().await;
    assert_ne!(new_primary, old_primary, "the standby was promoted");
    tokio::time::sleep(STEADY).await;
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.await.unwrap();
    }
    // Read from the new primary: its outbox rows are the truth the proof holds Kafka to.
    prove_exactly_once(&p, &phases, &counters, &[]).await;
    p.stop().await;
}

/// PostgreSQL 15 has no failover slots: a promoted standby lacks the relay's slot, and the WAL
/// between the relay's checkpoint and the promotion was never read there. The relay follows the
/// primary through the multi-host URL, finds the slot missing, refuses (`slot_missing`, no slot
/// created, nothing published), and goes on only when told to start afresh
/// (`RELAY_MISSING_SLOT=create`), from the new slot's position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts private PostgreSQL 15 clusters and kills one; ./kafkify test runs it with the failover suite"]
async fn a_promotion_without_failover_slots_is_refused_not_papered_over() {
    let primary = PrivatePostgres::start("max_wal_senders = 10\nmax_replication_slots = 10");
    let su = platform::db::connect(&primary.url("postgres", "postgres").parse().unwrap())
        .await
        .unwrap();
    for sql in [
        "CREATE ROLE kafkify_rest LOGIN",
        "CREATE ROLE kafkify_relay LOGIN REPLICATION",
        "CREATE DATABASE rest OWNER kafkify_rest",
    ] {
        su.batch_execute(sql).await.unwrap();
    }
    drop(su);
    platform::db::migrate(
        &primary.url("kafkify_rest", "rest").parse().unwrap(),
        test_support::Source::Rest.runner(),
    )
    .await
    .unwrap();
    let standby = PrivatePostgres::standby_of(&primary);
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", primary.port, standby.port);
    let url = |user: &str, db: &str| {
        format!("postgres://{user}@{hosts}/{db}?target_session_attrs=read-write")
    };

    let tag = test_support::unique("t");
    let prefix = format!("{tag}.");
    let relay_env = |missing: &str| {
        vec![
            ("DATABASE_URL", url("kafkify_relay", "postgres")),
            ("RELAY_SOURCES", "rest".to_string()),
            ("RELAY_TOPIC_PREFIX", prefix.clone()),
            ("RELAY_CHECKPOINT_TOPIC", format!("{tag}.checkpoints")),
            ("RELAY_MISSING_SLOT", missing.to_string()),
            ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
            ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
        ]
    };
    let mut relay = Service::spawn(&workspace_bin("cdc-relay"), &relay_env("refuse"));
    let t = Instant::now();
    relay.wait_for("/ready", 200, Duration::from_secs(90)).await;
    eprintln!("pg15: relay ready in {:?}", t.elapsed());

    let write = |n: usize, tag: &'static str| {
        let url = url("kafkify_rest", "rest");
        async move {
            let c = platform::db::connect(&url.parse().unwrap()).await.unwrap();
            let mut ids = Vec::new();
            for i in 0..n {
                let id = uuid::Uuid::new_v4();
                let payload = serde_json::json!({
                    "resource_id": uuid::Uuid::new_v4().to_string(),
                    "name": format!("{tag} {i}"),
                    "description": "",
                    "attributes": {},
                    "version": 1,
                    "created_at": 1_700_000_000_000_000i64,
                });
                c.execute(
                    "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
                     VALUES ($1, 'resource', $2, 'resource.created', $3::text::jsonb)",
                    &[&id, &format!("{tag}-{i}"), &payload.to_string()],
                )
                .await
                .unwrap();
                ids.push(id.to_string());
            }
            ids
        }
    };
    let topic = format!("{prefix}resource.created");
    let on_kafka = move || {
        let topic = topic.clone();
        let c: BaseConsumer = stack()
            .kafka_config()
            .set("group.id", consumer_group("pg15"))
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        let mut ids = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                use rdkafka::message::Headers;
                if let Some(h) = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "event_id"))
                {
                    ids.push(String::from_utf8_lossy(h.value.unwrap()).into_owned());
                }
            }
        }
        ids
    };

    let before = write(10, "before").await;
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = tokio::task::spawn_blocking(on_kafka.clone()).await.unwrap();
        if before.iter().all(|id| seen.contains(id)) {
            eprintln!("pg15: first events on Kafka in {:?}", t.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "the first events never arrived");
    }

    let t0 = Instant::now();
    primary.kill();
    standby.promote();
    let after = write(5, "after").await;

    // The relay finds the new primary, and no slot on it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = relay.get("/metrics").await;
        let missing = metrics.lines().any(|l| {
            l.starts_with("kafkify_cdc_relay_errors_total{")
                && l.contains(r#"kind="slot_missing""#)
                && !l.ends_with(" 0")
        });
        if missing {
            eprintln!(
                "pg15: slot_missing reported {:?} after the promotion",
                t0.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slot_missing error after the promotion; relay log {}",
            relay.log.display()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, body) = relay.get("/ready").await;
    assert_eq!(status, 503, "{body}");
    let new_primary = platform::db::connect(&url("postgres", "postgres").parse().unwrap())
        .await
        .unwrap();
    let slots: i64 = new_primary
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no slot was created behind the operator's back");
    let seen = tokio::task::spawn_blocking(on_kafka.clone()).await.unwrap();
    assert!(
        after.iter().all(|id| !seen.contains(id)),
        "nothing is published from a new primary without the slot"
    );

    // The documented recovery: after reconciling from the checkpoint's LSN, start afresh.
    drop(relay);
    let mut relay = Service::spawn(&workspace_bin("cdc-relay"), &relay_env("create"));
    relay.wait_for("/ready", 200, Duration::from_secs(90)).await;
    eprintln!(
        "pg15: started afresh {:?} after the promotion",
        t0.elapsed()
    );
    let later = write(5, "later").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = tokio::task::spawn_blocking(on_kafka.clone()).await.unwrap();
        if later.iter().all(|id| seen.contains(id)) {
            // Written before the new slot existed: never captured, as the refusal warned.
            assert!(after.iter().all(|id| !seen.contains(id)));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events after the fresh start never arrived"
        );
    }
    drop((relay, new_primary, standby, primary));
    test_support::delete_topics_with_prefix(&prefix).await;
}
