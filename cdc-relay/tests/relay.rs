//! The relay end to end against the real Postgres, Kafka and schema registry: what committed
//! outbox rows become on Kafka, across concurrency, crashes, take-over and poison input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use test_support::service::Service;
use test_support::{consumer_group, stack, unique, Source, TestDb};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_cdc-relay");

/// A source database, its own topic namespace and checkpoint topic.
struct Fixture {
    db: TestDb,
    prefix: String,
    checkpoint_topic: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let tag = unique("t");
        Fixture {
            db: TestDb::create(Source::Rest).await,
            prefix: format!("{tag}."),
            checkpoint_topic: format!("{tag}.checkpoints"),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        self.env_with(&[])
    }

    fn env_with(&self, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        let mut env = self.env_base();
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        env
    }

    fn env_base(&self) -> Vec<(&'static str, String)> {
        let mut env = test_support::relay_env(&self.db, &self.prefix, &self.checkpoint_topic);
        env.push(("LOG_LEVEL", "info,cdc_relay=debug".into()));
        env
    }

    async fn relay(&self) -> Service {
        let mut relay = Service::spawn(BIN, &self.env());
        relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
        relay
    }

    fn topic(&self, event_type: &str) -> String {
        format!("{}{event_type}", self.prefix)
    }

    /// `resource.created`, its dead-letter topic and the one for unknown event types.
    fn dead_letter_topics(&self) -> [String; 3] {
        [
            self.topic("resource.created"),
            self.topic("resource.created.dlq"),
            self.topic(cdc_relay::record::UNKNOWN_EVENT_TYPE_DLQ),
        ]
    }

    fn slot(&self) -> String {
        format!("kafkify_{}", self.db.name)
    }

    /// The Postgres cluster's system identifier.
    async fn system_id(&self) -> String {
        stack()
            .admin()
            .await
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// What the relay keys this source's checkpoint by.
    async fn checkpoint_key(&self) -> String {
        let system_id = self.system_id().await;
        format!(
            "{system_id}/{}/{}/{}",
            self.db.name,
            self.slot(),
            self.prefix
        )
    }

    /// Writes a checkpoint record for this source, as a relay that published up to `lsn`
    /// would have (an `X/Y` LSN).
    async fn write_checkpoint(&self, lsn: &str) {
        let producer: rdkafka::producer::FutureProducer = stack().kafka_config().create().unwrap();
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&self.checkpoint_topic)
                    .key(&self.checkpoint_key().await)
                    .payload(&format!(r#"{{"lsn":"{lsn}"}}"#))
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    /// Writes one `resource.created` row and asserts it is the only record on that topic
    /// (read for half a second more, to catch anything else).
    async fn one_event_flows(&self, key: &str, limit: Duration) {
        let row = created(Uuid::new_v4(), key, 1);
        insert(&self.db.owner().await, &row).await;
        let got = consume(
            &[self.topic("resource.created")],
            limit,
            Duration::from_millis(500),
            |r| !r.is_empty(),
        )
        .await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].event_id(), row.0.to_string());
    }

    async fn cleanup(self) {
        test_support::delete_topics_with_prefix(&self.prefix).await;
        self.db.cleanup().await;
    }
}

/// One outbox row written by a test.
fn created(id: Uuid, key: &str, version: i64) -> Row {
    let payload = serde_json::to_string(&schemas::ResourceCreated {
        resource_id: Uuid::from_u128(version as u128),
        name: key.to_string(),
        description: "d".repeat(100),
        attributes: BTreeMap::from([("v".to_string(), version.to_string())]),
        version,
        created_at: 1_700_000_000_000_000,
    })
    .unwrap();
    (id, key.to_string(), "resource.created", payload)
}

async fn insert(tx: &impl tokio_postgres::GenericClient, row: &(Uuid, String, &str, String)) {
    tx.execute(
        "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
         VALUES ($1, 'resource', $2, $3, $4::text::jsonb)",
        &[&row.0, &row.1, &row.2, &row.3],
    )
    .await
    .unwrap();
}

type Row = (Uuid, String, &'static str, String);

/// Writes `rows`, a transaction each, then reads `resource.created`, its dead-letter topic and
/// the unknown-type one until as many records arrived (and a second more, for duplicates).
async fn write_and_read_back(
    f: &Fixture,
    rows: &[&Row],
    limit: Duration,
) -> ([String; 3], Vec<Received>) {
    let owner = f.db.owner().await;
    for row in rows {
        insert(&owner, row).await;
    }
    let topics = f.dead_letter_topics();
    let got = consume(&topics, limit, Duration::from_secs(1), |r| {
        r.len() >= rows.len()
    })
    .await;
    (topics, got)
}

/// A record as a plain Confluent-format Avro consumer sees it.
#[derive(Debug, Clone)]
struct Received {
    topic: String,
    partition: i32,
    offset: i64,
    key: String,
    headers: HashMap<String, String>,
    value: Option<Value>,
    raw: Vec<u8>,
}

impl Received {
    fn event_id(&self) -> String {
        self.headers["event_id"].clone()
    }

    fn field(&self, name: &str) -> Value {
        let Some(Value::Record(fields)) = &self.value else {
            panic!("not a record: {self:?}")
        };
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    }
}

/// Reads `topics` with read_committed until `done` says so or `limit` passes; then keeps
/// reading for `settle` to catch anything extra (duplicates).
async fn consume(
    topics: &[String],
    limit: Duration,
    settle: Duration,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let consumer: StreamConsumer = stack()
        .kafka_config()
        .set("group.id", consumer_group("relay"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .unwrap();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).unwrap();
    let decoder = AvroDecoder::new(SrSettings::new(stack().schema_registry_url.clone()));
    let mut out = Vec::new();
    let start = Instant::now();
    let mut settle_until: Option<Instant> = None;
    loop {
        let deadline = settle_until.unwrap_or(start + limit);
        let now = Instant::now();
        if now >= deadline {
            return out;
        }
        match tokio::time::timeout(deadline - now, consumer.recv()).await {
            Err(_) => return out,
            Ok(msg) => {
                let msg = msg.unwrap();
                let raw = msg.payload().unwrap_or_default().to_vec();
                let mut headers = HashMap::new();
                if let Some(h) = msg.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                let value =
                    if msg.topic().ends_with(".dlq") || msg.topic().ends_with(".checkpoints") {
                        None
                    } else {
                        Some(
                            decoder
                                .decode(Some(&raw))
                                .await
                                .expect("a Confluent-framed Avro record")
                                .value,
                        )
                    };
                out.push(Received {
                    topic: msg.topic().to_string(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
                    headers,
                    value,
                    raw,
                });
                if settle_until.is_none() && done(&out) {
                    settle_until = Some(Instant::now() + settle);
                }
            }
        }
    }
}

/// Every id exactly once, nothing else, and per key the versions in the order written.
fn assert_exactly_once_in_order(
    got: &[Received],
    want: &HashMap<String, Vec<i64>>,
    want_ids: &HashSet<String>,
) {
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in got {
        *count.entry(r.event_id()).or_default() += 1;
    }
    let duplicates: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "duplicated events: {duplicates:?}");
    let got_ids: HashSet<String> = count.keys().cloned().collect();
    let missing: Vec<_> = want_ids.difference(&got_ids).collect();
    let extra: Vec<_> = got_ids.difference(want_ids).collect();
    assert!(
        missing.is_empty(),
        "{} events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(extra.is_empty(), "unexpected events: {extra:?}");
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for r in got {
        let Value::Long(v) = r.field("version") else {
            panic!()
        };
        per_key.entry(r.key.clone()).or_default().push(v);
    }
    assert_eq!(&per_key, want, "per-key order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transactions_arrive_exactly_once_in_key_order() {
    let f = Fixture::new().await;
    let relay = f.relay().await;

    // 8 writers, each owning 3 keys, 40 transactions of 1–3 events each; every 7th transaction
    // rolls back. One extra transaction carries 5 events.
    let mut writers = Vec::new();
    for w in 0..8 {
        let url = f.db.owner_url();
        writers.push(tokio::spawn(async move {
            let mut client = platform::db::connect(&url).await.unwrap();
            let mut committed = Vec::new();
            let mut aborted = Vec::new();
            let mut versions: HashMap<String, i64> = HashMap::new();
            for t in 0..40 {
                let tx = client.transaction().await.unwrap();
                let mut rows = Vec::new();
                for e in 0..(1 + t % 3) {
                    let key = format!("w{w}-k{}", (t + e) % 3);
                    let rollback = t % 7 == 6;
                    let v = versions.get(&key).copied().unwrap_or(0) + 1;
                    if !rollback {
                        versions.insert(key.clone(), v);
                    }
                    rows.push((created(Uuid::new_v4(), &key, v), rollback));
                }
                for (row, _) in &rows {
                    insert(&tx, row).await;
                }
                if rows[0].1 {
                    tx.rollback().await.unwrap();
                    aborted.extend(rows.into_iter().map(|(r, _)| r));
                } else {
                    tx.commit().await.unwrap();
                    committed.extend(rows.into_iter().map(|(r, _)| r));
                }
            }
            (committed, aborted)
        }));
    }
    let mut client = f.db.owner().await;
    let tx = client.transaction().await.unwrap();
    let mut big = Vec::new();
    for v in 1..=5 {
        let row = created(Uuid::new_v4(), "big", v);
        insert(&tx, &row).await;
        big.push(row);
    }
    tx.commit().await.unwrap();

    let mut want: HashMap<String, Vec<i64>> = HashMap::new();
    let mut want_ids = HashSet::new();
    let mut aborted_ids = HashSet::new();
    let mut all = big;
    for w in writers {
        let (committed, aborted) = w.await.unwrap();
        all.extend(committed);
        aborted_ids.extend(aborted.into_iter().map(|r| r.0.to_string()));
    }
    for (id, key, _, payload) in &all {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        want.entry(key.clone())
            .or_default()
            .push(v["version"].as_i64().unwrap());
        want_ids.insert(id.to_string());
    }
    assert!(want_ids.len() > 400 && !aborted_ids.is_empty());

    let n = want_ids.len();
    let got = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(60),
        Duration::from_secs(3),
        |r| r.len() >= n,
    )
    .await;
    assert_exactly_once_in_order(&got, &want, &want_ids);
    assert!(
        got.iter().all(|r| !aborted_ids.contains(&r.event_id())),
        "a rolled-back event was published"
    );

    // Headers and key as the outbox contract (docs/ARCHITECTURE.md) fixes them.
    let r = &got[0];
    assert_eq!(r.headers["event_type"], "resource.created");
    assert!(r.headers["source_lsn"].contains('/'), "{:?}", r.headers);
    let commit_ts: i64 = r.headers["commit_ts"].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!(
        (now - commit_ts) < 120_000_000 && commit_ts < now,
        "commit_ts {commit_ts} vs now {now}"
    );
    assert_eq!(r.raw[0], 0, "Confluent magic byte");

    let (_, metrics) = relay.get("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "kafkify_cdc_relay_events_published_total{{topic=\"{}\"}} {n}",
            f.topic("resource.created")
        )),
        "{metrics}"
    );
    drop(relay);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    let f = Fixture::new().await;
    let mut relay = Some(f.relay().await);

    // A writer commits small transactions for the whole test while the relay is killed and
    // restarted at pseudo-random moments.
    let url = f.db.owner_url();
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut client = platform::db::connect(&url).await.unwrap();
            let mut rows = Vec::new();
            let mut v = 0;
            while !stop.is_cancelled() {
                let tx = client.transaction().await.unwrap();
                for _ in 0..3 {
                    v += 1;
                    let row = created(Uuid::new_v4(), &format!("k{}", v % 5), v);
                    insert(&tx, &row).await;
                    rows.push(row);
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            rows
        })
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(300 + seed % 1500)).await;
        let r = relay.take().unwrap();
        let pid = r.pid();
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        drop(r);
        eprintln!("round {round}: killed relay {pid}");
        relay = Some(f.relay().await);
    }
    stop.cancel();
    let rows = writer.await.unwrap();

    let mut want: HashMap<String, Vec<i64>> = HashMap::new();
    let mut want_ids = HashSet::new();
    for (id, key, _, payload) in &rows {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        want.entry(key.clone())
            .or_default()
            .push(v["version"].as_i64().unwrap());
        want_ids.insert(id.to_string());
    }
    let n = want_ids.len();
    eprintln!("{n} events written across 8 kills");
    let got = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(90),
        Duration::from_secs(3),
        |r| r.len() >= n,
    )
    .await;
    assert_exactly_once_in_order(&got, &want, &want_ids);
    let (_, metrics) = relay.as_ref().unwrap().get("/metrics").await;
    eprintln!(
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("transactions_skipped"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(relay);
    f.cleanup().await;
}

async fn confirmed_flush(admin: &tokio_postgres::Client, slot: &str) -> i64 {
    admin
        .query_one(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_slot_advances_while_only_other_tables_write() {
    let f = Fixture::new().await;
    let relay = f.relay().await;
    let admin = stack().admin().await;
    let owner = f.db.owner().await;
    // Let the relay settle on the slot first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = confirmed_flush(&admin, &f.slot()).await;
    for i in 0..200 {
        owner
            .execute(
                "INSERT INTO resources (id, name) VALUES ($1, $2)",
                &[&Uuid::new_v4(), &format!("r{i}")],
            )
            .await
            .unwrap();
    }
    let target: i64 = owner
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(target > before);
    let start = Instant::now();
    loop {
        let now = confirmed_flush(&admin, &f.slot()).await;
        if now >= target {
            eprintln!(
                "slot confirmed {} bytes of other tables' WAL in {:?}",
                now - before,
                start.elapsed()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "slot stuck at {now}, server at {target}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(relay);
    f.cleanup().await;
}

/// The value of the relay's first `name{…}` series in a /metrics text.
fn gauge(metrics: &str, name: &str) -> Option<i64> {
    let series = format!("{name}{{");
    metrics
        .lines()
        .find(|l| l.starts_with(&series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn streaming(relay: &Service) -> Option<i64> {
    gauge(
        &relay.get("/metrics").await.1,
        "kafkify_cdc_relay_source_streaming",
    )
}

async fn slot_lag(relay: &Service) -> Option<i64> {
    gauge(
        &relay.get("/metrics").await.1,
        "kafkify_cdc_relay_slot_lag_bytes",
    )
}

/// Waits until `relay` holds its slot and streams; panics with `what` at `deadline`.
async fn wait_streaming(relay: &Service, deadline: Instant, what: &str) {
    while streaming(relay).await != Some(1) {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_too_long_for_the_kafka_timeout_is_refused_and_its_source_reported_stalled() {
    let f = Fixture::new().await;
    // A one-second transaction timeout: a 300,000-row transaction cannot be streamed within
    // it, so every session fails at its Begin, and nothing of it may become visible.
    let mut relay = Service::spawn(
        BIN,
        &f.env_with(&[
            ("RELAY_TRANSACTION_TIMEOUT", "1s"),
            ("RELAY_BUFFER_BYTES", "1048576"),
            ("RELAY_MAX_RECORD_BYTES", "65536"),
        ]),
    );
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    assert_eq!(
        gauge(
            &relay.get("/metrics").await.1,
            "kafkify_cdc_relay_source_stalled"
        ),
        Some(0)
    );
    f.db.owner()
        .await
        .batch_execute(&test_support::bench::outbox_insert_sql(300_000, 300, 0))
        .await
        .unwrap();
    // Generous: the walsender decodes the whole transaction before each session's first row.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, metrics) = relay.get("/metrics").await;
        if gauge(&metrics, "kafkify_cdc_relay_source_stalled") == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reported stalled: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = relay.get("/ready").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let why = ready["checks"][format!("source {}", f.db.name)]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains(&format!("slot {} stalled at", f.slot())),
        "{body}"
    );
    assert!(
        why.contains("sessions in a row failed without progress"),
        "{body}"
    );
    assert!(why.contains("raise RELAY_TRANSACTION_TIMEOUT"), "{body}");
    let visible = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(3),
        Duration::ZERO,
        |r| !r.is_empty(),
    )
    .await;
    assert!(
        visible.is_empty(),
        "{} records of a refused transaction",
        visible.len()
    );
    drop(relay);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_taking_less_than_the_record_limit_is_refused_until_raised() {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier};
    let f = Fixture::new().await;
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        stack().kafka_config().create().unwrap();
    let topic = f.topic("resource.created");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    admin
        .create_topics(
            &[
                NewTopic::new(&topic, 1, rdkafka::admin::TopicReplication::Fixed(1))
                    .set("max.message.bytes", "500000"),
            ],
            &opts,
        )
        .await
        .unwrap()
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    let mut relay = Service::spawn(BIN, &f.env());
    let deadline = Instant::now() + Duration::from_secs(60);
    let why = loop {
        let (status, body) = relay.get("/ready").await;
        let ready: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let why = ready["checks"]["topics and schemas"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if why.contains("RELAY_MAX_RECORD_BYTES") {
            assert_eq!(status, 503);
            break why;
        }
        assert!(Instant::now() < deadline, "never refused: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(why.contains("RELAY_MAX_RECORD_BYTES is 1048588"), "{why}");
    assert!(why.contains(&format!("{topic} (500000)")), "{why}");
    // Raised by hand, as an operator would: the relay retries, becomes ready and publishes.
    admin
        .alter_configs(
            &[AlterConfig::new(ResourceSpecifier::Topic(&topic))
                .set("max.message.bytes", "1048588")],
            &opts,
        )
        .await
        .unwrap();
    relay.wait_for("/ready", 200, Duration::from_secs(90)).await;
    f.one_event_flows("fixed", Duration::from_secs(90)).await;
    drop(relay);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_slot_with_a_checkpoint_in_kafka_is_refused_until_told_to_start_afresh() {
    let f = Fixture::new().await;
    let topic = f.topic("resource.created");
    let read_all = |n: usize| {
        let topic = topic.clone();
        async move {
            consume(
                &[topic],
                Duration::from_secs(60),
                Duration::from_secs(1),
                |r| r.len() >= n,
            )
            .await
        }
    };
    let relay = f.relay().await;
    let first = created(Uuid::new_v4(), "m1", 1);
    insert(&f.db.owner().await, &first).await;
    assert_eq!(read_all(1).await.len(), 1);
    relay.terminate(Duration::from_secs(30)).await;

    // The slot disappears (a failover without it, a restore, a DROP by hand).
    let admin = stack().admin().await;
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&f.slot()])
        .await
        .unwrap();
    let slots = || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&f.slot()],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    let relay = Service::spawn(BIN, &f.env());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, metrics) = relay.get("/metrics").await;
        let refused = metrics.lines().any(|l| {
            l.starts_with("kafkify_cdc_relay_errors_total{")
                && l.contains("kind=\"slot_missing\"")
                && !l.ends_with(" 0")
        });
        if refused {
            break;
        }
        assert!(Instant::now() < deadline, "never refused: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(slots().await, 0, "no new slot while refusing");
    drop(relay);

    // Told to start afresh: a new slot, and what is written from then on flows.
    let mut relay = Service::spawn(BIN, &f.env_with(&[("RELAY_MISSING_SLOT", "create")]));
    relay
        .wait_for("/ready", 200, Duration::from_secs(120))
        .await;
    assert_eq!(slots().await, 1);
    let second = created(Uuid::new_v4(), "m2", 2);
    insert(&f.db.owner().await, &second).await;
    let got = read_all(2).await;
    // Two keys, so maybe two partitions: no order between them.
    let mut ids: Vec<String> = got.iter().map(|r| r.event_id()).collect();
    ids.sort();
    let mut want = vec![first.0.to_string(), second.0.to_string()];
    want.sort();
    assert_eq!(ids, want);
    drop(relay);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checkpoint_names_its_postgres_cluster_database_slot_and_prefix_and_is_refreshed_while_idle(
) {
    let f = Fixture::new().await;
    let relay = f.relay().await;
    f.one_event_flows("named", Duration::from_secs(60)).await;
    let admin = stack().admin().await;
    let system_id = f.system_id().await;
    let timeline: i32 = admin
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .unwrap()
        .get(0);
    // The event's commit writes one; idle from then on, the source writes it again (every
    // 10 s), so a restart finds it among the newest records of the shared topic.
    let checkpoints = consume(
        std::slice::from_ref(&f.checkpoint_topic),
        Duration::from_secs(60),
        Duration::from_millis(200),
        |r| r.len() >= 2,
    )
    .await;
    assert!(checkpoints.len() >= 2, "never refreshed: {checkpoints:?}");
    assert_eq!(
        checkpoints[0].raw, checkpoints[1].raw,
        "a refresh is the same checkpoint"
    );
    let last = checkpoints.last().expect("a checkpoint record");
    assert_eq!(last.key, f.checkpoint_key().await);
    let value: serde_json::Value = serde_json::from_slice(&last.raw).unwrap();
    assert_eq!(value["system_id"], system_id.as_str());
    assert_eq!(value["database"], f.db.name.as_str());
    assert_eq!(value["slot"], f.slot().as_str());
    assert_eq!(value["topic_prefix"], f.prefix.as_str());
    assert_eq!(value["timeline"], timeline);
    assert!(value["lsn"].as_str().unwrap().contains('/'));
    drop(relay);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_outbox_is_refused_until_published_via_its_root_then_flows() {
    let f = Fixture::new().await;
    let owner = f.db.owner().await;
    owner
        .batch_execute(
            "ALTER PUBLICATION kafkify_outbox DROP TABLE outbox_events;
             DROP TABLE outbox_events;
             CREATE TABLE outbox_events (
                 id uuid NOT NULL, aggregate_type text NOT NULL, aggregate_id text NOT NULL,
                 event_type text NOT NULL, payload jsonb NOT NULL, traceparent text,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (id, created_at)
             ) PARTITION BY RANGE (created_at);
             CREATE TABLE outbox_events_old PARTITION OF outbox_events
                 FOR VALUES FROM (MINVALUE) TO ('2026-01-01');
             CREATE TABLE outbox_events_new PARTITION OF outbox_events
                 FOR VALUES FROM ('2026-01-01') TO (MAXVALUE);
             GRANT SELECT ON outbox_events TO kafkify_relay;
             ALTER PUBLICATION kafkify_outbox ADD TABLE outbox_events;",
        )
        .await
        .unwrap();

    let mut relay = Service::spawn(BIN, &f.env());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = relay.get("/ready").await;
        if status == 503 && body.contains("publish_via_partition_root = true") {
            break;
        }
        assert!(Instant::now() < deadline, "not refused: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admin = stack().admin().await;
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&f.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no slot, so no position is taken while refusing");

    owner
        .batch_execute("ALTER PUBLICATION kafkify_outbox SET (publish_via_partition_root = true)")
        .await
        .unwrap();
    relay.wait_for("/ready", 200, Duration::from_secs(90)).await;
    // One row in each partition.
    let rows = [
        created(Uuid::new_v4(), "p", 1),
        created(Uuid::new_v4(), "p", 2),
    ];
    for (row, at) in rows.iter().zip(["2025-06-01", "2026-06-01"]) {
        owner
            .execute(
                "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, created_at)
                 VALUES ($1, 'resource', $2, $3, $4::text::jsonb, $5::text::timestamptz)",
                &[&row.0, &row.1, &row.2, &row.3, &at],
            )
            .await
            .unwrap();
    }
    let got = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(60),
        Duration::from_secs(1),
        |r| r.len() >= 2,
    )
    .await;
    let ids: Vec<String> = got.iter().map(Received::event_id).collect();
    assert_eq!(ids, vec![rows[0].0.to_string(), rows[1].0.to_string()]);
    drop(relay);
    f.cleanup().await;
}

/// Whether the relay's errors counter for `kind` has counted anything.
async fn counted_error(relay: &Service, kind: &str) -> bool {
    let (_, metrics) = relay.get("/metrics").await;
    metrics.lines().any(|l| {
        l.starts_with("kafkify_cdc_relay_errors_total{")
            && l.contains(&format!("kind=\"{kind}\""))
            && !l.ends_with(" 0")
    })
}

/// The transactions decoded through `slot` since the last call, in commit order: where each
/// one's commit record starts and where it ends, as pgoutput's Begin and Commit say.
async fn commit_records(db: &tokio_postgres::Client, slot: &str) -> Vec<(u64, u64)> {
    let rows = db
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', 'kafkify_outbox')",
            &[&slot],
        )
        .await
        .unwrap();
    let lsn = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
    // Per transaction: Begin carries where its commit record starts, Commit where it ends.
    let mut txs = Vec::new();
    let mut start = None;
    for r in rows {
        let data: Vec<u8> = r.get(0);
        match data[0] {
            b'B' => start = Some(lsn(&data[1..9])),
            b'C' => txs.push((start.take().unwrap(), lsn(&data[10..18]))),
            _ => {}
        }
    }
    txs
}

/// A checkpoint is where the last published commit record ends, and a record ends where the
/// next one starts: a transaction that committed right behind it has its commit record start
/// exactly at the checkpoint. It must be published, not taken for one Kafka has (it was, while
/// the relay compared Begin's LSN with `<=`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_committed_right_behind_the_checkpoint_is_published() {
    let f = Fixture::new().await;
    let relay = f.relay().await;
    f.one_event_flows("before", Duration::from_secs(60)).await;
    relay.terminate(Duration::from_secs(30)).await;

    // Two writers: the second's transaction is open while the first commits, then commits at
    // once, so its commit record is the next WAL record, unless another database of the
    // cluster logged something in between (then try again).
    // Logical slots belong to their database: these calls go to the source's, as the relay.
    let repl = platform::db::connect(&f.db.relay_url()).await.unwrap();
    let helper = format!("adjacent_{}", f.db.name);
    repl.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&helper],
    )
    .await
    .unwrap();
    let (first_db, second_db) = (f.db.owner().await, f.db.owner().await);
    let mut found = None;
    for attempt in 0..50 {
        let first = created(Uuid::new_v4(), &format!("first-{attempt}"), 1);
        let second = created(Uuid::new_v4(), &format!("second-{attempt}"), 2);
        second_db.batch_execute("BEGIN").await.unwrap();
        insert(&second_db, &second).await;
        insert(&first_db, &first).await;
        second_db.batch_execute("COMMIT").await.unwrap();
        let txs = commit_records(&repl, &helper).await;
        assert_eq!(txs.len(), 2, "{txs:?}");
        if txs[1].0 == txs[0].1 {
            found = Some((second, txs[0].1));
            break;
        }
    }
    repl.execute("SELECT pg_drop_replication_slot($1)", &[&helper])
        .await
        .unwrap();
    let (second, first_end) = found.expect("two adjacent commit records in 50 attempts");

    // As if the relay had published everything up to the first transaction and died: the slot
    // confirmed there and Kafka's checkpoint there.
    repl.execute(
        "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
        &[&f.slot(), &cdc_relay::pgoutput::Lsn(first_end).to_string()],
    )
    .await
    .unwrap();
    f.write_checkpoint(&cdc_relay::pgoutput::Lsn(first_end).to_string())
        .await;

    let relay = f.relay().await;
    let got = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(60),
        Duration::from_millis(500),
        |r| r.iter().any(|e| e.event_id() == second.0.to_string()),
    )
    .await;
    assert!(
        got.iter().any(|e| e.event_id() == second.0.to_string()),
        "the transaction behind the checkpoint never reached Kafka: {:?}",
        got.iter().map(|e| e.event_id()).collect::<Vec<_>>()
    );
    drop(relay);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_past_the_servers_wal_is_refused_until_told_to_start_afresh() {
    let f = Fixture::new().await;
    let relay = f.relay().await;
    f.one_event_flows("before", Duration::from_secs(60)).await;
    relay.terminate(Duration::from_secs(30)).await;

    // Kafka holds a checkpoint the server never reached: an asynchronous standby was promoted
    // without the last transactions, which the relay had already published.
    let admin = stack().admin().await;
    f.write_checkpoint("FFFF/0").await;

    let relay = Service::spawn(BIN, &f.env());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !counted_error(&relay, "checkpoint_ahead").await {
        assert!(Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(relay);

    // The way out the error names: drop the slot, start afresh.
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&f.slot()])
        .await
        .unwrap();
    let mut relay = Service::spawn(BIN, &f.env_with(&[("RELAY_MISSING_SLOT", "create")]));
    relay
        .wait_for("/ready", 200, Duration::from_secs(120))
        .await;
    let row = created(Uuid::new_v4(), "after", 2);
    insert(&f.db.owner().await, &row).await;
    let got = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(60),
        Duration::from_secs(1),
        |r| r.len() >= 2,
    )
    .await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter().any(|r| r.event_id() == row.0.to_string()),
        "{got:?}"
    );
    drop(relay);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_ready_while_the_slot_waits_for_an_open_transaction() {
    let f = Fixture::new().await;
    // A transaction with an id, open before the slot: the slot's creation waits for it, and
    // whatever commits meanwhile is never captured, so the relay must not say it is ready.
    let open = f.db.owner().await;
    open.batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let mut relay = Service::spawn(BIN, &f.env());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = relay.get("/ready").await;
        if body.contains("is being created") {
            assert_eq!(status, 503, "{body}");
            break;
        }
        assert_ne!(status, 200, "ready before the slot can capture: {body}");
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    open.batch_execute("COMMIT").await.unwrap();
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    f.one_event_flows("ready", Duration::from_secs(60)).await;
    drop(relay);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_relay_takes_over_when_the_first_dies() {
    let f = Fixture::new().await;
    let first = f.relay().await;
    // The first holds the slot.
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_streaming(&first, deadline, "first relay never streamed").await;
    let second = f.relay().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        streaming(&second).await,
        Some(0),
        "the standby must not stream"
    );

    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-KILL", &first.pid().to_string()])
        .status()
        .unwrap();
    drop(first);
    wait_streaming(
        &second,
        killed + Duration::from_secs(30),
        "no take-over within 30 s",
    )
    .await;
    let takeover = killed.elapsed();
    eprintln!("take-over after {takeover:?}");

    f.one_event_flows("after", Duration::from_secs(30)).await;
    drop(second);
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_events_are_dead_lettered_and_later_events_flow() {
    let f = Fixture::new().await;
    let relay = f.relay().await;
    let bad_payload = (
        Uuid::new_v4(),
        "p1".to_string(),
        "resource.created",
        r#"{"name": 5}"#.to_string(),
    );
    let unknown_type = (
        Uuid::new_v4(),
        "p2".to_string(),
        "resource.exploded",
        "{}".to_string(),
    );
    let good = created(Uuid::new_v4(), "p3", 1);
    let (topics, got) = write_and_read_back(
        &f,
        &[&bad_payload, &unknown_type, &good],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got.len(), 3, "{got:?}");
    let by_id: HashMap<String, &Received> = got.iter().map(|r| (r.event_id(), r)).collect();

    let dead = by_id[&bad_payload.0.to_string()];
    assert_eq!(dead.topic, topics[1]);
    assert_eq!(
        dead.headers["dlq_reason"],
        "$.resource_id: missing, and the schema has no default"
    );
    assert_eq!(
        dead.raw,
        bad_payload.3.as_bytes(),
        "the payload is kept as written"
    );

    let unknown = by_id[&unknown_type.0.to_string()];
    assert_eq!(unknown.topic, topics[2]);
    assert_eq!(
        unknown.headers["dlq_reason"],
        "unknown event type `resource.exploded`"
    );

    assert_eq!(by_id[&good.0.to_string()].topic, topics[0]);
    let (_, metrics) = relay.get("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "kafkify_cdc_relay_events_dead_lettered_total{{topic=\"{}\",reason=\"schema\"}} 1",
            topics[1]
        )),
        "{metrics}"
    );
    drop(relay);
    f.cleanup().await;
}

/// A `resource.created` row whose description is `bytes` long: valid for its schema.
fn created_with_description(key: &str, bytes: usize) -> Row {
    let mut row = created(Uuid::new_v4(), key, 1);
    let mut payload: serde_json::Value = serde_json::from_str(&row.3).unwrap();
    payload["description"] = serde_json::Value::String("d".repeat(bytes));
    row.3 = payload.to_string();
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_events_are_dead_lettered_without_their_payload_and_later_events_flow() {
    // A limit above Kafka's default, so a 1.2 MB event proves the producer and the topics the
    // relay creates take what the setting says.
    const LIMIT: usize = 1_500_000;
    let f = Fixture::new().await;
    let mut relay = Service::spawn(
        BIN,
        &f.env_with(&[("RELAY_MAX_RECORD_BYTES", &LIMIT.to_string())]),
    );
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    let before = created(Uuid::new_v4(), "o1", 1);
    let under = created_with_description("o2", 1_200_000);
    // Fits its schema, but its Avro record does not fit the limit.
    let over = created_with_description("o3", 2 << 20);
    // An unknown type: even its dead letter with the payload would not fit.
    let huge = (
        Uuid::new_v4(),
        "o4".to_string(),
        "resource.exploded",
        serde_json::json!({ "blob": "y".repeat(20 << 20) }).to_string(),
    );
    let after = created(Uuid::new_v4(), "o5", 5);
    let (topics, got) = write_and_read_back(
        &f,
        &[&before, &under, &over, &huge, &after],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        got.len(),
        5,
        "each event once: {:?}",
        got.iter()
            .map(|r| (&r.topic, r.event_id()))
            .collect::<Vec<_>>()
    );
    let by_id: HashMap<String, &Received> = got.iter().map(|r| (r.event_id(), r)).collect();

    for row in [&before, &after] {
        assert_eq!(by_id[&row.0.to_string()].topic, topics[0]);
    }
    let published = by_id[&under.0.to_string()];
    assert_eq!(published.topic, topics[0]);
    assert_eq!(
        published.field("description"),
        Value::String("d".repeat(1_200_000)),
        "a record under the limit arrives whole"
    );

    for (row, topic, least) in [(&over, &topics[1], 2 << 20), (&huge, &topics[2], 20 << 20)] {
        let dead = by_id[&row.0.to_string()];
        assert_eq!(&dead.topic, topic);
        let h = &dead.headers;
        assert_eq!(h["dlq_reason"], "too_large");
        assert_eq!(h["dlq_payload"], "omitted");
        assert!(dead.raw.is_empty(), "the payload is left out");
        let size: usize = h["dlq_size"].parse().unwrap();
        assert!(size > least && size > LIMIT, "dlq_size {size}");
        assert!(
            h["dlq_detail"].contains("RELAY_MAX_RECORD_BYTES is 1500000"),
            "{h:?}"
        );
        assert_eq!(h["event_type"], row.2);
        assert_eq!(h["aggregate_id"], row.1);
        assert_eq!(dead.key, row.1);
        assert_eq!(h["source"], f.db.name);
        assert!(h["source_lsn"].contains('/'), "{h:?}");
        assert!(h["commit_ts"].parse::<i64>().unwrap() > 0);
    }

    let (_, metrics) = relay.get("/metrics").await;
    for topic in &topics[1..] {
        assert!(
            metrics.contains(&format!(
                "kafkify_cdc_relay_events_dead_lettered_total{{topic=\"{topic}\",reason=\"too_large\"}} 1"
            )),
            "{metrics}"
        );
    }

    // The topics it created carry the limit.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        stack().kafka_config().create().unwrap();
    let described = admin
        .describe_configs(
            &[rdkafka::admin::ResourceSpecifier::Topic(&topics[0])],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    let config = described.into_iter().next().unwrap().unwrap();
    assert_eq!(
        config
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref()),
        Some("1500000")
    );
    drop(relay);
    f.cleanup().await;
}

/// A valid `resource.deleted` row.
fn deleted_row() -> Row {
    let id = Uuid::new_v4();
    let payload = serde_json::to_string(&schemas::ResourceDeleted {
        resource_id: id,
        version: 1,
        deleted_at: 1_700_000_000_000_000,
    })
    .unwrap();
    (id, id.to_string(), "resource.deleted", payload)
}

/// Rows in the large transaction below. The relay streams it in chunks; the benchmark
/// (`cargo bench -p cdc-relay --bench relay -- --per-tx …`) measures its memory.
const LARGE_TX_ROWS: usize = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_row_transaction_arrives_once_in_one_kafka_transaction_while_another_source_flows(
) {
    let f = Fixture::new().await;
    let other = TestDb::create(Source::Grpc).await;
    let mut relay = Service::spawn(
        BIN,
        &f.env_with(&[
            ("RELAY_SOURCES", &format!("{},{}", f.db.name, other.name)),
            // Small buffers, so the transaction is streamed in many chunks, and a short
            // read-ahead, so reading Postgres waits on Kafka often.
            ("RELAY_BUFFER_BYTES", "8388608"),
            ("RELAY_READ_AHEAD", "64"),
            // Long enough that the Kafka transaction is due while the large one streams.
            ("RELAY_BATCH_LINGER", "3s"),
            ("RELAY_TRANSACTION_TIMEOUT", "600s"),
        ]),
    );
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    let large_topic = f.topic("resource.created");
    let other_topic = f.topic("resource.deleted");

    // The other source writes one event every few milliseconds throughout.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = tokio::spawn({
        let client = other.owner().await;
        let writing = writing.clone();
        async move {
            let mut ids = Vec::new();
            while writing.load(std::sync::atomic::Ordering::Relaxed) || ids.len() < 10 {
                let row = deleted_row();
                insert(&client, &row).await;
                ids.push(row.0.to_string());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        }
    });
    // A small transaction of the same source commits just before the large one, so it waits
    // in the open Kafka transaction (the linger is long) while the large one streams in: that
    // Kafka transaction must not commit before the large one has ended.
    let owner = f.db.owner().await;
    owner
        .batch_execute(&format!(
            "BEGIN; {}",
            test_support::bench::outbox_insert_sql(LARGE_TX_ROWS, 300, 0)
        ))
        .await
        .unwrap();
    let before = deleted_row();
    insert(&f.db.owner().await, &before).await;
    owner.batch_execute("COMMIT").await.unwrap();

    // Read both topics: every large-transaction event once, and on each partition at
    // consecutive offsets, so no transaction marker (a commit) sits inside it.
    let consumer: StreamConsumer = stack()
        .kafka_config()
        .set("group.id", consumer_group("relay-large"))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    test_support::bench::wait_topic(&other_topic, Duration::from_secs(60)).await;
    consumer.subscribe(&[&large_topic, &other_topic]).unwrap();
    let mut large_ids = HashSet::new();
    let mut other_seen: Vec<String> = Vec::new();
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    let mut gaps = 0;
    let deadline = Instant::now() + Duration::from_secs(900);
    while large_ids.len() < LARGE_TX_ROWS {
        let msg = tokio::time::timeout_at(deadline.into(), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {LARGE_TX_ROWS} arrived", large_ids.len()))
            .unwrap();
        let id = msg
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "event_id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap();
        if msg.topic() == other_topic {
            other_seen.push(id);
            continue;
        }
        if let Some(prev) = last_offset.insert(msg.partition(), msg.offset()) {
            if msg.offset() != prev + 1 {
                gaps += 1;
            }
        }
        assert!(
            large_ids.insert(id),
            "an event of the large transaction twice"
        );
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut other_ids = writer.await.unwrap();
    other_ids.push(before.0.to_string());
    assert_eq!(gaps, 0, "a transaction marker inside the large transaction");

    // The other source's events, each once, including those written during the large one.
    let deadline = Instant::now() + Duration::from_secs(60);
    while other_seen.len() < other_ids.len() {
        let Ok(msg) = tokio::time::timeout_at(deadline.into(), consumer.recv()).await else {
            break;
        };
        let msg = msg.unwrap();
        if msg.topic() == other_topic {
            let id = msg
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "event_id"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap();
            other_seen.push(id);
        }
    }
    let mut seen_sorted = other_seen.clone();
    seen_sorted.sort();
    let mut want = other_ids.clone();
    want.sort();
    assert_eq!(seen_sorted, want, "the other source's events, each once");

    println!(
        "{LARGE_TX_ROWS} rows in one transaction; the other source wrote {} events meanwhile; relay peak RSS {:.0} MiB",
        other_ids.len(),
        test_support::bench::rss_peak_mib(relay.pid())
    );
    drop(relay);
    other.cleanup().await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multi_event_transaction_is_one_kafka_transaction() {
    // Batches are capped far below the transaction's size: a relay that split a Postgres
    // transaction to honour the cap would commit it in several Kafka transactions.
    let f = Fixture::new().await;
    let mut relay = Service::spawn(BIN, &f.env_with(&[("RELAY_BATCH_MAX_EVENTS", "50")]));
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    let mut client = f.db.owner().await;
    // A few small transactions around it, so it shares the partition with other commits.
    insert(&client, &created(Uuid::new_v4(), "same-key", 1)).await;
    let tx = client.transaction().await.unwrap();
    for v in 2..=501 {
        insert(&tx, &created(Uuid::new_v4(), "same-key", v)).await;
    }
    tx.commit().await.unwrap();
    insert(&client, &created(Uuid::new_v4(), "same-key", 502)).await;

    let got = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(60),
        Duration::from_secs(1),
        |r| r.len() >= 502,
    )
    .await;
    assert_eq!(got.len(), 502);
    let versions: Vec<i64> = got
        .iter()
        .map(|r| match r.field("version") {
            Value::Long(v) => v,
            _ => panic!(),
        })
        .collect();
    assert_eq!(versions, (1..=502).collect::<Vec<_>>());
    // One key, one partition. Every Kafka commit leaves a control record behind, which takes an
    // offset that read_committed readers skip: the 500 records of the Postgres transaction sit
    // at consecutive offsets only if no commit fell among them.
    let big = &got[1..501];
    assert!(big.iter().all(|r| r.partition == big[0].partition));
    assert_eq!(
        big[499].offset - big[0].offset,
        499,
        "a Kafka commit fell inside the Postgres transaction"
    );
    // …and the commits around it did leave their markers: the test can see a split.
    assert!(big[0].offset - got[0].offset >= 2 || got[501].offset - big[499].offset >= 2);
    drop(relay);
    f.cleanup().await;
}

/// WAL safety: while the streaming relay is stopped (SIGSTOP: it keeps the slot and confirms
/// nothing), the standby's `slot_lag_bytes` shows the WAL the slot holds (the alert rules fire
/// on it: observability/prometheus/alerts.test.yml); once the relay runs again it catches up,
/// every event reaches Kafka once, and the lag falls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_relay_shows_as_slot_lag_and_catches_up() {
    let f = Fixture::new().await;
    let active = f.relay().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_streaming(&active, deadline, "the relay never streamed").await;
    let standby = f.relay().await;
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &active.pid().to_string()])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");

    let mut client = f.db.owner().await;
    let mut want: HashMap<String, Vec<i64>> = HashMap::new();
    let mut want_ids = HashSet::new();
    for batch in 0..20 {
        let tx = client.transaction().await.unwrap();
        for i in 0..100 {
            let v = batch * 100 + i + 1;
            let row = created(Uuid::new_v4(), &format!("k{}", v % 7), v);
            insert(&tx, &row).await;
            want.entry(row.1.clone()).or_default().push(v);
            want_ids.insert(row.0.to_string());
        }
        tx.commit().await.unwrap();
    }
    // The standby polls the lag every 5 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let lag = slot_lag(&standby).await.unwrap_or(0);
        if lag > 1 << 20 {
            break lag;
        }
        assert!(Instant::now() < deadline, "slot lag never showed: {lag} B");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("slot lag while the relay was stopped: {held} B");

    signal("-CONT");
    let got = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(60),
        Duration::from_secs(2),
        |r| r.len() >= want_ids.len(),
    )
    .await;
    assert_exactly_once_in_order(&got, &want, &want_ids);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag = slot_lag(&standby).await.unwrap_or(i64::MAX);
        if lag < held / 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot lag stayed at {lag} B after the relay caught up"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop((active, standby, client));
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_publishes_exactly_once_over_sasl_and_tls() {
    // The relay reaches Kafka only through the broker's SASL_SSL listener: its producers,
    // transactions, checkpoint reader and topic administration all go over it.
    let f = Fixture::new().await;
    let sasl = test_support::kafka_tls::sasl();
    let extra: Vec<(&'static str, &str)> = sasl.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut relay = Service::spawn(BIN, &f.env_with(&extra));
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    let mut client = f.db.owner().await;
    let mut want: HashMap<String, Vec<i64>> = HashMap::new();
    let mut want_ids = HashSet::new();
    for t in 0..10 {
        let tx = client.transaction().await.unwrap();
        for v in 1..=3 {
            let row = created(Uuid::new_v4(), &format!("tls-{t}"), v);
            insert(&tx, &row).await;
            want.entry(row.1.clone()).or_default().push(v);
            want_ids.insert(row.0.to_string());
        }
        tx.commit().await.unwrap();
    }
    let got = consume(
        &[f.topic("resource.created")],
        Duration::from_secs(60),
        Duration::from_secs(2),
        |r| r.len() >= 30,
    )
    .await;
    assert_exactly_once_in_order(&got, &want, &want_ids);
    drop(relay);
    f.cleanup().await;
}
