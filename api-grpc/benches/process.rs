//! `cargo bench -p api-grpc --bench process [-- --clients N --seconds S --rounds R
//! --completions C]`
//!
//! ProcessTask throughput and latency of the real api-grpc (release build) against the local
//! stack, next to pgbench running the same transaction (BEGIN; insert the task; insert its
//! outbox event; COMMIT) on the same database with the same number of clients; then api-grpc
//! at half its peak rate, open loop, for p95. Then its `task.completed` consumer: C completions
//! (default 20,000) of the tasks it created are put on the topic while it is stopped, and it
//! is started and timed recording them (first to last `updated_at` of the completed tasks).
//! Prints numbers; asserts nothing.

use std::time::{Duration, Instant};

use api_grpc::pb::task_service_client::TaskServiceClient;
use api_grpc::pb::ProcessTaskRequest;
use test_support::bench::{
    alternate_with_pgbench, arg, histogram_mean, median_round, metric_sum, report_against_pgbench,
    Run,
};
use test_support::service::Service;
use test_support::{stack, Source, TestDb};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_api-grpc");

fn request(i: usize) -> ProcessTaskRequest {
    ProcessTaskRequest {
        r#type: "checksum".into(),
        input: format!("{{\"n\": {i}, \"data\": \"{}\"}}", "x".repeat(200)),
        idempotency_key: String::new(),
    }
}

async fn channels(port: u16, n: usize) -> Vec<TaskServiceClient<test_support::AuthChannel>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let ch = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        out.push(TaskServiceClient::new(test_support::with_key(ch)));
    }
    out
}

async fn closed_loop(
    clients: &[TaskServiceClient<test_support::AuthChannel>],
    workers: usize,
    seconds: u64,
) -> (f64, Vec<f64>, usize) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut client = clients[w % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut i) = (Vec::new(), 0, w * 10_000_000);
            while Instant::now() < deadline {
                i += 1;
                let t = Instant::now();
                match client.process_task(request(i)).await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (rate, all, errors)
}

async fn open_loop(
    clients: &[TaskServiceClient<test_support::AuthChannel>],
    rate: f64,
    seconds: u64,
) -> (f64, Vec<f64>, usize) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let n = (rate * seconds as f64) as usize;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        let mut client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            client
                .process_task(request(900_000_000 + i))
                .await
                .ok()
                .map(|_| t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Some(l) => lat.push(l),
            None => errors += 1,
        }
    }
    let done = lat.len() as f64 / started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (done, lat, errors)
}

const PGBENCH_SCRIPT: &str = r#"\set n random(1, 1000000000)
BEGIN;
INSERT INTO tasks (id, task_type, input, idempotency_key, created_at, updated_at) VALUES (gen_random_uuid(), 'checksum', jsonb_build_object('n', :n::bigint, 'data', repeat('x', 200)), NULL, now(), now()) RETURNING id, task_type, input::text, status, result::text, error, created_at, updated_at, completed_at;
INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, traceparent) VALUES (gen_random_uuid(), 'task', 'k' || :n::text, 'task.process', jsonb_build_object('task_id', gen_random_uuid()::text, 'task_type', 'checksum', 'input', repeat('x', 220), 'created_at', 0), NULL);
END;
"#;

/// Puts on `topic` a completion for each of `n` pending tasks, as the relay would (Confluent
/// Avro, key = task id).
async fn completions_drain(db: &TestDb, topic: &str, n: i64) -> i64 {
    use apache_avro::types::Value;
    use schema_registry_converter::async_impl::avro::AvroEncoder;
    use schema_registry_converter::async_impl::schema_registry::SrSettings;
    use schema_registry_converter::schema_registry_common::{
        SchemaType, SubjectNameStrategy, SuppliedSchema,
    };
    let ids: Vec<uuid::Uuid> = db
        .owner()
        .await
        .query(
            "SELECT id FROM tasks WHERE status = 'PENDING' LIMIT $1",
            &[&n],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let schema = schemas::schema_text("task.completed").unwrap().to_string();
    let encoder = AvroEncoder::new(SrSettings::new(stack().schema_registry_url.clone()));
    let producer: rdkafka::producer::FutureProducer = stack().kafka_config().create().unwrap();
    let mut sent = Vec::new();
    for id in &ids {
        let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.to_string(),
            false,
            SuppliedSchema::new(None, SchemaType::Avro, schema.clone()),
        );
        let fields = vec![
            ("task_id", Value::Uuid(*id)),
            ("status", Value::Enum(0, "COMPLETED".into())),
            (
                "result",
                Value::Union(1, Box::new(Value::String(r#"{"sum": 1}"#.into()))),
            ),
            ("error", Value::Union(0, Box::new(Value::Null))),
            (
                "completed_at",
                Value::TimestampMicros(1_700_000_000_000_000),
            ),
        ];
        let bytes = encoder.encode(fields, strategy).await.unwrap();
        let key = id.to_string();
        sent.push(
            producer
                .send_result(
                    rdkafka::producer::FutureRecord::to(topic)
                        .key(&key)
                        .payload(&bytes),
                )
                .unwrap(),
        );
    }
    for s in sent {
        s.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    ids.len() as i64
}

/// The completions this api-grpc process applied, from its own counter (polling it costs the
/// database nothing).
async fn applied(api: &Service) -> i64 {
    let (_, text) = api.get("/metrics").await;
    metric_sum(
        &text,
        "kafkify_api_grpc_completions_total",
        &["outcome=\"applied\""],
    ) as i64
}

#[tokio::main]
async fn main() {
    let workers = arg("--clients", 32) as usize;
    let seconds = arg("--seconds", 10);
    let db = TestDb::create(Source::Grpc).await;
    let prefix = format!("{}.", test_support::unique("bench"));
    // The completions topic exists in any real deployment; a consumer subscribed to a missing
    // topic keeps asking the broker for its metadata, which would load the machine under test.
    let admin = stack().kafka_admin();
    let topic = format!("{prefix}task.completed");
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    let env = [
        ("DATABASE_URL", db.owner_dsn()),
        ("GRPC_ADDR", "127.0.0.1:0".into()),
        ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
        ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
        ("TOPIC_PREFIX", prefix.clone()),
        ("LOG_LEVEL", "warn".into()),
    ];
    let mut api = Service::spawn(BIN, &env);
    api.wait_for("/ready", 200, Duration::from_secs(30)).await;
    let port: u16 = api
        .addr("grpc_addr")
        .and_then(|a| a.rsplit(':').next()?.parse().ok())
        .expect("api-grpc says where it listens");
    let clients = channels(port, 4).await;

    closed_loop(&clients, workers, 2).await;
    let rounds = alternate_with_pgbench(&db, PGBENCH_SCRIPT, workers as u64, seconds, || async {
        Run::from(closed_loop(&clients, workers, seconds).await)
    })
    .await;
    let peak = median_round(&rounds).api.rate;
    let half = Run::from(open_loop(&clients, peak / 2.0, seconds).await);
    report_against_pgbench(
        "api-grpc ProcessTask",
        "tasks",
        workers,
        seconds,
        &rounds,
        &half,
    );
    api.terminate(Duration::from_secs(30)).await;

    let n = completions_drain(&db, &topic, arg("--completions", 20_000) as i64).await;
    let mut api = Service::spawn(BIN, &env);
    api.wait_for("/ready", 200, Duration::from_secs(30)).await;
    let limit = Instant::now() + Duration::from_secs(600);
    while applied(&api).await < n {
        assert!(
            Instant::now() < limit,
            "api-grpc did not record {n} completions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs: f64 = db
        .owner()
        .await
        .query_one(
            "SELECT extract(epoch FROM max(updated_at) - min(updated_at))::float8
             FROM tasks WHERE status <> 'PENDING'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let per_tx = histogram_mean(
        &api.get("/metrics").await.1,
        "kafkify_api_grpc_completion_batch_records",
    );
    println!(
        "api-grpc task.completed consumer: {n} completions recorded at {:.0} per second (first to last update), {per_tx:.1} per database transaction",
        (n - 1) as f64 / secs,
    );
    drop(api);
    test_support::delete_topics_with_prefix(&prefix).await;
    db.cleanup().await;
}
