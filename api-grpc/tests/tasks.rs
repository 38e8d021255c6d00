//! The task service against the real Postgres, Kafka and schema registry: every RPC and error
//! code, what each call left in `tasks` and `outbox_events`, completion from `task.completed`
//! (duplicates included) and WatchTask streaming.

use std::time::Duration;

use apache_avro::types::Value;
use api_grpc::pb::task_service_client::TaskServiceClient;
use api_grpc::pb::{self, TaskStatus};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schema_registry_converter::async_impl::avro::AvroEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use test_support::service::Service;
use test_support::{consumer_group, stack, unique, Source, TestDb};
use tonic::transport::Channel;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_api-grpc");

struct Fixture {
    db: TestDb,
    service: Service,
    client: TaskServiceClient<test_support::AuthChannel>,
    channel: Channel,
    topic: String,
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::start_with(&[]).await
    }

    async fn start_with(extra: &[(&'static str, String)]) -> Fixture {
        Fixture::start_full(TestDb::owner_dsn, extra).await
    }

    /// With the `DATABASE_URL` that `dsn` makes of the test database.
    async fn start_full(
        dsn: impl Fn(&TestDb) -> String,
        extra: &[(&'static str, String)],
    ) -> Fixture {
        let db = TestDb::create(Source::Grpc).await;
        let prefix = format!("{}.", unique("t"));
        let topic = format!("{prefix}task.completed");
        let admin = stack().kafka_admin();
        admin
            .create_topics(
                &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        let mut env = vec![
            ("DATABASE_URL", dsn(&db)),
            ("GRPC_ADDR", "127.0.0.1:0".into()),
            ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
            ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
            ("TOPIC_PREFIX", prefix),
            ("COMPLETIONS_GROUP", consumer_group("api-grpc")),
            ("GRPC_MAX_MESSAGE_BYTES", "131072".into()),
        ];
        env.extend_from_slice(extra);
        let mut service = Service::spawn(BIN, &env);
        service
            .wait_for("/ready", 200, Duration::from_secs(30))
            .await;
        let grpc_addr = service.addr("grpc_addr").expect("listening");
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Fixture {
            db,
            service,
            client: TaskServiceClient::new(test_support::with_key(channel.clone())),
            channel,
            topic,
        }
    }

    async fn process(
        &mut self,
        task_type: &str,
        input: &str,
        key: &str,
    ) -> Result<pb::Task, tonic::Status> {
        let req = pb::ProcessTaskRequest {
            r#type: task_type.into(),
            input: input.into(),
            idempotency_key: key.into(),
        };
        self.client.process_task(req).await.map(|r| r.into_inner())
    }

    async fn get(&mut self, id: &str) -> Result<pb::Task, tonic::Status> {
        self.client
            .get_task_status(pb::GetTaskStatusRequest { id: id.into() })
            .await
            .map(|r| r.into_inner())
    }

    /// (tasks, outbox events)
    async fn counts(&self) -> (i64, i64) {
        (
            self.db.count("tasks").await,
            self.db.count("outbox_events").await,
        )
    }

    /// Publishes a task.completed record as the relay would: Confluent Avro, key = task id.
    async fn complete(
        &self,
        task_id: &str,
        status: &str,
        result: Option<&str>,
        error: Option<&str>,
    ) {
        self.complete_many(&[(task_id, status, result, error)])
            .await;
    }

    /// [`Self::complete`] for several, in order, through one producer.
    async fn complete_many(&self, events: &[(&str, &str, Option<&str>, Option<&str>)]) {
        let schema = schemas::schema_text("task.completed").unwrap().to_string();
        let encoder = AvroEncoder::new(SrSettings::new(stack().schema_registry_url.clone()));
        let producer: FutureProducer = stack().kafka_config().create().unwrap();
        let opt = |v: Option<&str>| match v {
            Some(s) => Value::Union(1, Box::new(Value::String(s.into()))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        for (task_id, status, result, error) in events {
            let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
                self.topic.clone(),
                false,
                SuppliedSchema::new(None, SchemaType::Avro, schema.clone()),
            );
            let symbol = if *status == "COMPLETED" { 0 } else { 1 };
            let fields = vec![
                (
                    "task_id",
                    Value::Uuid(uuid::Uuid::parse_str(task_id).unwrap()),
                ),
                ("status", Value::Enum(symbol, status.to_string())),
                ("result", opt(*result)),
                ("error", opt(*error)),
                (
                    "completed_at",
                    Value::TimestampMicros(1_700_000_000_000_000),
                ),
            ];
            let bytes = encoder.encode(fields, strategy).await.unwrap();
            producer
                .send(
                    FutureRecord::to(&self.topic).key(*task_id).payload(&bytes),
                    Duration::from_secs(5),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }

    /// WatchTask on `id`, which must exist.
    async fn watch(&mut self, id: &str) -> tonic::Streaming<pb::Task> {
        self.client
            .watch_task(pb::WatchTaskRequest { id: id.to_string() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn wait_status(&mut self, id: &str, want: TaskStatus) -> pb::Task {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let t = self.get(id).await.unwrap();
            if t.status == want as i32 {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} still {:?}",
                t.status
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        drop(self.service);
        test_support::delete_topics(std::slice::from_ref(&self.topic)).await;
        self.db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_and_error_code() {
    let mut f = Fixture::start().await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut req = tonic::Request::new(pb::ProcessTaskRequest {
        r#type: "checksum".into(),
        input: r#"{"n": 3}"#.into(),
        idempotency_key: String::new(),
    });
    req.metadata_mut()
        .insert("traceparent", tp.parse().unwrap());
    let task = f.client.process_task(req).await.unwrap().into_inner();
    assert_eq!(
        (task.r#type.as_str(), task.status),
        ("checksum", TaskStatus::Pending as i32)
    );
    assert_eq!(task.input, r#"{"n": 3}"#);
    assert!(task.created_at.is_some() && task.completed_at.is_none());

    let c = f.db.owner().await;
    let rows = c
        .query(
            "SELECT event_type, aggregate_id, payload, traceparent FROM outbox_events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let (event_type, key, payload, trace): (String, String, serde_json::Value, Option<String>) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
    );
    assert_eq!(
        (event_type.as_str(), key.as_str()),
        ("task.process", task.id.as_str())
    );
    test_support::assert_child_traceparent(trace.as_deref(), tp);
    let event: schemas::TaskProcess = serde_json::from_value(payload).unwrap();
    assert_eq!(
        (event.task_id.to_string(), event.task_type.as_str()),
        (task.id.clone(), "checksum")
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&event.input).unwrap(),
        serde_json::json!({"n": 3})
    );

    assert_eq!(f.get(&task.id).await.unwrap(), task);
    assert_eq!(
        f.get(&uuid::Uuid::new_v4().to_string())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        f.get("nope").await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Bad input writes nothing.
    for (t, input) in [
        ("", "{}"),
        ("Bad Type", "{}"),
        ("ok", "not json"),
        ("ok", r#"{"a": "\u0000"}"#),
    ] {
        let err = f.process(t, input, "").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{t} {input}: {err:?}");
    }
    let err = f
        .process("ok", &format!("\"{}\"", "x".repeat(70_000)), "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = f
        .process("ok", &format!("\"{}\"", "x".repeat(200_000)), "")
        .await
        .unwrap_err();
    assert_eq!(f.counts().await, (1, 1));

    // tonic says OUT_OF_RANGE; gRPC's status code table says RESOURCE_EXHAUSTED, and so do we.
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Idempotency.
    let a = f.process("resize", r#"{"w": 1}"#, "req-1").await.unwrap();
    let b = f
        .process("resize", r#"{ "w" : 1 }"#, "req-1")
        .await
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(
        f.process("resize", r#"{"w": 2}"#, "req-1")
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(
        f.process("ok", "{}", "has space").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(f.counts().await, (2, 2));

    // Listing.
    for i in 0..5 {
        f.process("bulk", &format!("{{\"i\": {i}}}"), "")
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = f
            .client
            .list_tasks(pb::ListTasksRequest {
                page_size: 3,
                page_token: token.clone(),
                status: TaskStatus::Pending as i32,
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.tasks.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 7);
    let mut sorted = seen.clone();
    sorted.sort(); // v7 ids sort by creation time, as the listing does
    assert_eq!(seen, sorted);
    let first = f
        .client
        .list_tasks(pb::ListTasksRequest {
            page_size: 3,
            page_token: String::new(),
            status: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let err = f
        .client
        .list_tasks(pb::ListTasksRequest {
            page_size: 3,
            page_token: first.next_page_token,
            status: TaskStatus::Failed as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    for (size, tok, status) in [(-1, "", 0), (201, "", 0), (3, "garbage", 0), (3, "", 42)] {
        let err = f
            .client
            .list_tasks(pb::ListTasksRequest {
                page_size: size,
                page_token: tok.into(),
                status,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{size} {tok} {status}");
    }

    let (_, metrics) = f.service.get("/metrics").await;
    assert!(metrics.contains(r#"kafkify_api_grpc_rpc_duration_seconds_count{method="ProcessTask",code="AlreadyExists"} 1"#), "{metrics}");
    drop(c);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_from_kafka_reach_the_task_and_its_watchers() {
    let mut f = Fixture::start().await;
    let task = f.process("checksum", r#"{"n": 1}"#, "").await.unwrap();
    let mut watch = f.watch(&task.id).await;
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, TaskStatus::Pending as i32);

    f.complete(&task.id, "COMPLETED", Some(r#"{"sum": 42}"#), None)
        .await;
    let done = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("watch saw the completion")
        .unwrap()
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed as i32);
    assert_eq!(done.result.as_deref(), Some(r#"{"sum": 42}"#));
    assert!(done.completed_at.is_some());
    assert!(
        watch.message().await.unwrap().is_none(),
        "the stream ends at a final status"
    );

    // A duplicated and a contradicting late event change nothing.
    f.complete(&task.id, "COMPLETED", Some(r#"{"sum": 42}"#), None)
        .await;
    f.complete(&task.id, "FAILED", None, Some("late")).await;
    let failing = f.process("checksum", r#"{"n": 2}"#, "").await.unwrap();
    f.complete(&failing.id, "FAILED", None, Some("input too small"))
        .await;
    let failed = f.wait_status(&failing.id, TaskStatus::Failed).await;
    assert_eq!(failed.error.as_deref(), Some("input too small"));
    // The failing task's event came after the duplicates on the same… or another partition; wait
    // for all four to be counted before comparing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, m) = f.service.get("/metrics").await;
        let applied = m.contains(r#"kafkify_api_grpc_completions_total{outcome="applied"} 2"#);
        let dup = m.contains(r#"kafkify_api_grpc_completions_total{outcome="duplicate"} 2"#);
        if applied && dup {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        f.get(&task.id).await.unwrap(),
        done,
        "duplicates left the task as it was"
    );

    // Watching a finished task yields it once and ends.
    let mut watch = f.watch(&failing.id).await;
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        TaskStatus::Failed as i32
    );
    assert!(watch.message().await.unwrap().is_none());
    let err = f
        .client
        .watch_task(pb::WatchTaskRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    f.stop().await;
}

/// A backlog of completions (written while api-grpc was frozen) is recorded in batches, each
/// one transaction; of two events for one task in a batch the first decides, as one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_completions_is_recorded_in_batches_and_a_tasks_first_event_decides() {
    let mut f = Fixture::start().await;
    let mut ids = Vec::new();
    for n in 0..120 {
        let task = f
            .process("checksum", &format!(r#"{{"n": {n}}}"#), "")
            .await
            .unwrap();
        ids.push(task.id);
    }
    let contested = f.process("checksum", r#"{"n": -1}"#, "").await.unwrap();
    let pid = f.service.pid().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    // Frozen, it fetches nothing: on waking, the backlog is there at once.
    signal("-STOP");
    let mut events: Vec<(&str, &str, Option<&str>, Option<&str>)> = ids
        .iter()
        .map(|id| (id.as_str(), "COMPLETED", Some(r#"{"sum": 1}"#), None))
        .collect();
    events.push((
        contested.id.as_str(),
        "COMPLETED",
        Some(r#"{"sum": 2}"#),
        None,
    ));
    events.push((contested.id.as_str(), "FAILED", None, Some("late")));
    f.complete_many(&events).await;
    signal("-CONT");

    let done = f.wait_status(&contested.id, TaskStatus::Completed).await;
    assert_eq!(done.result.as_deref(), Some(r#"{"sum": 2}"#));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let (_, m) = f.service.get("/metrics").await;
        let count = |outcome: &str| {
            test_support::bench::metric_sum(
                &m,
                "kafkify_api_grpc_completions_total",
                &[&format!("outcome=\"{outcome}\"")],
            )
        };
        if count("applied") == 121.0 && count("duplicate") == 1.0 {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let completed: i64 =
        f.db.owner()
            .await
            .query_one("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'", &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(completed, 121);
    let per_tx =
        test_support::bench::histogram_mean(&metrics, "kafkify_api_grpc_completion_batch_records");
    assert!(
        per_tx > 2.0,
        "122 completions in batches, not one transaction each: {per_tx} per transaction"
    );
    f.stop().await;
}

/// A registry outage while a completion arrives: api-grpc (its schema cache empty, as after a
/// restart) cannot read the record, waits, and applies it once the registry answers. It once
/// counted the record undecodable and committed past it, and the task stayed PENDING for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_read_during_a_registry_outage_is_applied_afterwards() {
    let registry = stack()
        .schema_registry_url
        .trim_start_matches("http://")
        .to_string();
    let proxy = test_support::OutageProxy::start(registry).await;
    let mut f =
        Fixture::start_with(&[("SCHEMA_REGISTRY_URL", format!("http://{}", proxy.addr))]).await;
    let task = f.process("checksum", r#"{"n": 1}"#, "").await.unwrap();

    proxy.take_down();
    f.complete(&task.id, "COMPLETED", Some(r#"{"sum": 7}"#), None)
        .await;
    // The record is consumed and its schema asked for, again and again: it waits, it is not
    // passed over (which would ask once and move on).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while proxy
        .refused()
        .iter()
        .filter(|l| l.contains("/schemas/ids/"))
        .count()
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the schema was not asked for twice during the outage: {:?}",
            proxy.refused()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        f.get(&task.id).await.unwrap().status,
        TaskStatus::Pending as i32
    );
    let (_, m) = f.service.get("/metrics").await;
    assert!(
        !m.contains(r#"outcome="undecodable"} 1"#),
        "an outage is not an undecodable record:\n{m}"
    );

    proxy.bring_up();
    let done = f.wait_status(&task.id, TaskStatus::Completed).await;
    assert_eq!(done.result.as_deref(), Some(r#"{"sum": 7}"#));
    f.stop().await;
}

/// With `sslmode=require`, WatchTask's LISTEN connection is encrypted like the pool's (it once
/// connected without TLS, failed against such a server and fell back to polling), and a
/// completion reaches the watcher.
#[tokio::test]
async fn watch_task_listens_over_tls_when_the_url_asks() {
    let mut f = Fixture::start_full(
        |db| {
            test_support::url_with(
                &db.owner_dsn(),
                &format!("sslmode=require&sslrootcert={}", stack().pg_ca),
            )
        },
        &[],
    )
    .await;
    // The listener is a backend of this database that ran LISTEN, over TLS.
    let admin = stack().admin().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let ssl = loop {
        let row = admin
            .query_opt(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                  WHERE a.datname = $1 AND a.query ILIKE 'LISTEN %'",
                &[&f.db.name],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get::<_, bool>(0);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no LISTEN connection after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(ssl, "the LISTEN connection is encrypted");

    let task = f.process("checksum", r#"{"n": 1}"#, "").await.unwrap();
    let mut watch = f.watch(&task.id).await;
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        TaskStatus::Pending as i32
    );
    f.complete(&task.id, "COMPLETED", Some(r#"{"sum": 1}"#), None)
        .await;
    let done = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("watch saw the completion")
        .unwrap()
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed as i32);
    // A NOTIFY came over that connection (watchers also poll every second, so the watch alone
    // does not show it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = f.service.get("/metrics").await;
        let received: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("kafkify_api_grpc_task_notifications_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no notification counter:\n{m}"));
        if received >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no NOTIFY received:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_is_honoured_and_leaves_nothing_behind() {
    // One connection, and one call first so its statements are prepared and cached there: the
    // timed-out call then gets as far as sending its whole transaction before the lock stops it.
    let mut f = Fixture::start_with(&[("DB_POOL_SIZE", "1".into())]).await;
    f.process("warm", "{}", "").await.unwrap();
    assert_eq!(f.counts().await, (1, 1));
    // Hold the tasks table so ProcessTask cannot finish in time.
    let mut blocker = f.db.owner().await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE tasks IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::ProcessTaskRequest {
        r#type: "slow".into(),
        input: "{}".into(),
        idempotency_key: String::new(),
    });
    req.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = f.client.process_task(req).await.unwrap_err();
    // tonic's client reports its own expiry as CANCELLED; the server's would be DEADLINE_EXCEEDED.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // The server's own bound on the transaction is the same 300 ms, counted from a moment
    // later than the client's; give it that moment before the lock goes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.rollback().await.unwrap();
    // Had the server gone on with the call, its insert would commit now that the lock is gone.
    // It dropped the call with the deadline: its transaction rolled back, no task, no event.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.counts().await, (1, 1));
    // And the service still works.
    f.process("ok", "{}", "").await.unwrap();
    assert_eq!(f.counts().await, (2, 2));
    drop(blocker);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_outbox_insert_leaves_no_task_and_a_clean_connection() {
    // One connection, so the call after the failure reuses the connection the failed,
    // pipelined transaction ran on.
    let mut f = Fixture::start_with(&[("DB_POOL_SIZE", "1".into())]).await;
    f.process("warm", "{}", "").await.unwrap();
    let owner = f.db.owner().await;
    // The task insert succeeds, the outbox insert after it does not.
    owner
        .batch_execute(
            "ALTER TABLE outbox_events ADD CONSTRAINT t_refuse CHECK (event_type <> 'task.process') NOT VALID",
        )
        .await
        .unwrap();
    let err = f.process("doomed", "{}", "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(f.counts().await, (1, 1));
    owner
        .batch_execute("ALTER TABLE outbox_events DROP CONSTRAINT t_refuse")
        .await
        .unwrap();
    // Had the failed transaction stayed open on the connection, this call would run inside it.
    let ok = f.process("after", "{}", "").await.unwrap();
    assert_eq!(f.counts().await, (2, 2));
    assert_eq!(f.get(&ok.id).await.unwrap().r#type, "after");
    f.stop().await;
}

/// Raw bytes as a gRPC message, to send what no generated client would.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_malformed_calls_are_refused_and_change_nothing() {
    let mut f = Fixture::start().await;
    // Without a valid key nothing is even decoded.
    let mut bare = TaskServiceClient::new(f.channel.clone());
    let request = || pb::ProcessTaskRequest {
        r#type: "ok".into(),
        input: "{}".into(),
        idempotency_key: String::new(),
    };
    let err = bare.process_task(request()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut wrong = tonic::Request::new(request());
    wrong.metadata_mut().insert(
        "authorization",
        "Bearer not-the-key-0123456789".parse().unwrap(),
    );
    let err = bare.process_task(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Health stays open for probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(f.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(test_support::with_key(f.channel.clone()));
    for (what, bytes) in [
        ("an unknown wire type", vec![0x0f]),
        ("a truncated varint", vec![0x08, 0xff, 0xff]),
        ("a length past the end", vec![0x0a, 0x40, b'x']),
        ("a string that is not UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("a field number of zero", vec![0x00, 0x01]),
    ] {
        grpc.ready().await.unwrap();
        let err = grpc
            .unary(
                tonic::Request::new(bytes),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/kafkify.task.v1.TaskService/ProcessTask",
                ),
                Raw,
            )
            .await
            .unwrap_err();
        // gRPC's status code table: a request that cannot be parsed is INTERNAL (tonic's
        // answer, unchanged).
        assert_eq!(err.code(), Code::Internal, "{what}: {err:?}");
    }
    assert_eq!(f.counts().await, (0, 0), "nothing was written");
    // The server still serves well-formed calls on the same connection.
    f.process("ok", "{}", "").await.unwrap();
    assert_eq!(f.counts().await, (1, 1));
    f.stop().await;
}
