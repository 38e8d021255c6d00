//! The whole pipeline, every process real: api-rest and api-grpc write, cdc-relay publishes,
//! the worker records and completes, api-grpc records completions. Each test has its own
//! databases, topics and consumer groups.

mod pipeline;

use pipeline::{wait_task, Pipeline};

use std::time::Duration;

use api_grpc::pb::TaskStatus;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use test_support::{consumer_group, stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resource_reaches_the_worker_and_a_task_comes_back_completed() {
    let mut p = Pipeline::start().await;
    let id = p.create_resource("end to end").await;
    p.wait_count(
        &format!("SELECT count(*) FROM processed_events WHERE event_key = '{id}'"),
        1,
        Duration::from_secs(60),
    )
    .await;
    let c = p.worker_db.owner().await;
    let row = c
        .query_one(
            "SELECT event_type, payload->>'name', topic FROM processed_events WHERE event_key = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (event_type, name, topic): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (event_type.as_str(), name.as_str()),
        ("resource.created", "end to end")
    );
    assert_eq!(topic, format!("{}resource.created", p.prefix));

    let task = p.process_task(r#"{"n": 7}"#).await;
    let done = wait_task(&mut p.tasks, &task.id, Duration::from_secs(60)).await;
    assert_eq!(done.status, TaskStatus::Completed as i32, "{done:?}");
    let result: serde_json::Value = serde_json::from_str(done.result.as_deref().unwrap()).unwrap();
    // api-grpc hands the worker the input in serde_json's compact form.
    let want: serde_json::Value =
        serde_json::from_str(&worker::decode::run_task("checksum", r#"{"n":7}"#, 10).unwrap())
            .unwrap();
    assert_eq!(result, want, "the worker's own computation");
    drop(c);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_worker_neither_loses_nor_doubles_an_effect() {
    let mut p = Pipeline::start().await;
    let mut resources = 0;
    let mut tasks = Vec::new();
    for round in 0..5 {
        for i in 0..24 {
            p.create_resource(&format!("r{round}-{i}")).await;
            resources += 1;
            if i % 4 == 0 {
                tasks.push(
                    p.process_task(&format!("{{\"round\": {round}, \"i\": {i}}}"))
                        .await
                        .id,
                );
            }
        }
        // Kill it while it is busy with what was just written, then bring it back.
        tokio::time::sleep(Duration::from_millis(100 + 150 * round)).await;
        p.kill_worker();
        p.start_worker().await;
    }
    let events = resources + tasks.len() as i64;
    p.wait_count(
        "SELECT count(*) FROM processed_events",
        events,
        Duration::from_secs(120),
    )
    .await;
    for id in &tasks {
        let t = wait_task(&mut p.tasks, id, Duration::from_secs(60)).await;
        assert_eq!(t.status, TaskStatus::Completed as i32);
    }
    // One completion per task in the worker's outbox: a redelivered task.process was not run
    // twice.
    assert_eq!(
        p.worker_count("SELECT count(*) FROM outbox_events WHERE event_type = 'task.completed'")
            .await,
        tasks.len() as i64
    );
    assert_eq!(
        p.worker_count("SELECT count(DISTINCT aggregate_id) FROM outbox_events")
            .await,
        tasks.len() as i64
    );
    eprintln!(
        "{events} events and {} tasks across 5 SIGKILLs of the worker",
        tasks.len()
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_goes_to_the_dlq_with_its_reason_and_later_events_flow() {
    let mut p = Pipeline::start().await;
    let topic = format!("{}task.process", p.prefix);
    let producer: FutureProducer = stack().kafka_config().create().unwrap();
    // A task.process record that decodes but breaks the domain rules: empty task type.
    let schema_id = latest_schema_id(&topic).await;
    let mut domain = vec![0];
    domain.extend_from_slice(&schema_id.to_be_bytes());
    let fields = [
        (
            "task_id",
            apache_avro::types::Value::String("00000000-0000-0000-0000-000000000009".into()),
        ),
        (
            "task_type",
            apache_avro::types::Value::String(String::new()),
        ),
        ("input", apache_avro::types::Value::String("{}".into())),
        ("created_at", apache_avro::types::Value::TimestampMicros(1)),
    ];
    let schema = schemas::schema("task.process").unwrap();
    let value = apache_avro::types::Value::Record(
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    );
    apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap()
        .write_value_ref(&mut domain, &value)
        .unwrap();
    let mut garbage = vec![0];
    garbage.extend_from_slice(&schema_id.to_be_bytes());
    garbage.extend_from_slice(&[0xff; 3]);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "bad magic",
            vec![7, 0, 0, 0, 1, 2],
            "not Confluent Avro: magic byte is 7, not 0",
        ),
        (
            "unknown id",
            vec![0, 0x7f, 0xff, 0xff, 0xf0, 2],
            "unknown schema id",
        ),
        ("garbage", garbage, "undecodable body"),
        (
            "domain",
            domain,
            "violates the domain rules: a task needs a type",
        ),
    ];
    for (key, payload, _) in &cases {
        let headers = OwnedHeaders::new().insert(Header {
            key: "event_id",
            value: Some(uuid::Uuid::new_v4().to_string().as_bytes()),
        });
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(*key)
                    .payload(payload)
                    .headers(headers),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    // A good task after them still completes.
    let task = p.process_task(r#"{"after": "poison"}"#).await;
    assert_eq!(
        wait_task(&mut p.tasks, &task.id, Duration::from_secs(60))
            .await
            .status,
        TaskStatus::Completed as i32
    );

    let dlq = dlq_reader(&topic);
    let mut reasons = std::collections::HashMap::new();
    while reasons.len() < cases.len() {
        let msg = next_dead_letter(&dlq).await;
        let get = |k: &str| header(&msg, k);
        assert_eq!(get("dlq_origin").as_deref(), Some("worker"));
        assert_eq!(get("dlq_source_topic").as_deref(), Some(topic.as_str()));
        reasons.insert(
            String::from_utf8_lossy(msg.key().unwrap()).into_owned(),
            get("dlq_reason").unwrap(),
        );
    }
    for (key, _, reason) in &cases {
        assert!(
            reasons[*key].starts_with(reason),
            "{key}: {}",
            reasons[*key]
        );
    }
    assert_eq!(
        p.worker_count("SELECT count(*) FROM processed_events WHERE event_type = 'task.process'")
            .await,
        1,
        "poison was not recorded"
    );
    p.stop().await;
}

/// A backlog on one topic does not hold back another topic's records: each partition pauses
/// on its own. The worker is slowed to one record per transaction so that a backlog lasts
/// seconds; a task sent behind it must complete while most of the backlog is still waiting (a
/// reader that waits on a full lane delivers it only after all but the last lanes' worth of
/// the prefetched backlog: the previous worker failed this with 19,180 of 20,000 recorded). Then the whole
/// backlog arrives, once, through many pauses and resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_on_one_topic_does_not_hold_back_a_task() {
    let backlog: i64 = 20_000;
    let mut p = Pipeline::start_with(vec![
        ("BATCH_SIZE", "1".into()),
        ("LANE_CAPACITY", "1000".into()),
    ])
    .await;
    p.kill_worker();
    p.rest_db
        .owner()
        .await
        .batch_execute(&test_support::bench::outbox_insert_sql(
            backlog as usize,
            300,
            0,
        ))
        .await
        .unwrap();
    let topic = format!("{}resource.created", p.prefix);
    let on_kafka =
        test_support::bench::drain(&topic, backlog as usize, Duration::from_secs(120), false).await;
    assert_eq!(
        on_kafka.arrivals.len(),
        backlog as usize,
        "the backlog is on Kafka"
    );
    p.start_worker().await;
    let created = "SELECT count(*) FROM processed_events WHERE event_type = 'resource.created'";
    // Once the worker is recording the backlog, librdkafka has fetched well ahead of it, so
    // the task's record reaches the worker behind much of the backlog.
    let started = std::time::Instant::now();
    while p.worker_count(created).await < 1000 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the backlog is not being recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let task = p.process_task(r#"{"behind": "a backlog"}"#).await;
    let done = wait_task(&mut p.tasks, &task.id, Duration::from_secs(120)).await;
    assert_eq!(done.status, TaskStatus::Completed as i32, "{done:?}");
    let recorded = p.worker_count(created).await;
    eprintln!("the task completed with {recorded} of {backlog} backlog events recorded");
    assert!(
        recorded < backlog / 2,
        "the task waited behind the backlog: {recorded} of {backlog} recorded before it"
    );
    p.wait_count(created, backlog, Duration::from_secs(300))
        .await;
    let distinct = p
        .worker_count(
            "SELECT count(DISTINCT (topic, partition, \"offset\")) FROM processed_events
             WHERE event_type = 'resource.created'",
        )
        .await;
    assert_eq!(distinct, backlog, "one row per record");
    p.stop().await;
}

/// Poison in the middle of a batch: with the worker stopped, one partition gets 150 good
/// records with two undecodable ones among them. The worker, started, writes them in batches
/// (fewer transactions than records); the two are dead-lettered with their own offsets, and
/// every good record is recorded once, at its own offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_inside_a_batch_is_dead_lettered_and_its_neighbours_recorded() {
    use apache_avro::types::Value;
    let mut p = Pipeline::start().await;
    p.kill_worker();
    let topic = format!("{}resource.created", p.prefix);
    let schema_id = latest_schema_id(&topic).await;
    let schema = schemas::schema("resource.created").unwrap();
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap();
    let producer: FutureProducer = stack().kafka_config().create().unwrap();
    let (mut good, mut poison) = (Vec::new(), Vec::new());
    for i in 0..150 {
        let mut payload = vec![0];
        payload.extend_from_slice(&schema_id.to_be_bytes());
        let bad = i == 49 || i == 100;
        if bad {
            payload.extend_from_slice(&[0xff; 3]);
        } else {
            let value = Value::Record(vec![
                (
                    "resource_id".into(),
                    Value::String(uuid::Uuid::new_v4().to_string()),
                ),
                ("name".into(), Value::String(format!("r{i}"))),
                ("description".into(), Value::String(String::new())),
                ("attributes".into(), Value::Map(Default::default())),
                ("version".into(), Value::Long(1)),
                ("created_at".into(), Value::TimestampMicros(1)),
            ]);
            writer.write_value_ref(&mut payload, &value).unwrap();
        }
        let id = uuid::Uuid::new_v4().to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: "event_id",
            value: Some(id.as_bytes()),
        });
        let offset = producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("one key")
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap()
            .offset;
        if bad {
            poison.push(offset)
        } else {
            good.push(offset)
        }
    }
    p.start_worker().await;
    let created = "SELECT count(*) FROM processed_events WHERE event_type = 'resource.created'";
    p.wait_count(created, good.len() as i64, Duration::from_secs(60))
        .await;
    let recorded: Vec<i64> = p
        .worker_db
        .owner()
        .await
        .query(
            "SELECT \"offset\" FROM processed_events WHERE partition = 0 ORDER BY \"offset\"",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(recorded, good, "every good record, at its own offset");

    let dlq = dlq_reader(&topic);
    let mut dead = Vec::new();
    while dead.len() < poison.len() {
        let msg = next_dead_letter(&dlq).await;
        dead.push(
            header(&msg, "dlq_source_offset")
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
    }
    dead.sort();
    assert_eq!(
        dead, poison,
        "each poison record, dead-lettered with its own offset"
    );

    let (_, metrics) = p.worker.as_ref().unwrap().get("/metrics").await;
    let batches: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kafkify_worker_batch_records_count "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the batch histogram is exported");
    eprintln!("150 records in {batches} batches");
    assert!(
        batches < 150.0,
        "written in batches: {batches} transactions for 150 records"
    );
    p.stop().await;
}

/// A consumer of `<topic>.dlq`, from its start.
fn dlq_reader(topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = stack()
        .kafka_config()
        .set("group.id", consumer_group("dlq"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{topic}.dlq")]).unwrap();
    consumer
}

async fn next_dead_letter(dlq: &StreamConsumer) -> rdkafka::message::OwnedMessage {
    tokio::time::timeout(Duration::from_secs(30), dlq.recv())
        .await
        .expect("dead letters arrive")
        .unwrap()
        .detach()
}

fn header(msg: &rdkafka::message::OwnedMessage, key: &str) -> Option<String> {
    msg.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The id of the schema the relay registered for `topic`'s values.
async fn latest_schema_id(topic: &str) -> u32 {
    let url = format!(
        "{}/subjects/{topic}-value/versions/latest",
        stack().schema_registry_url
    );
    reqwest::get(url)
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["id"]
        .as_u64()
        .unwrap() as u32
}
