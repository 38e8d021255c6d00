//! kafkifyctl against the real Postgres, Kafka, registry and relay: what each command reports
//! is checked against what the test wrote and what reached Kafka.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::service::{free_port, workspace_bin, Service};
use test_support::{stack, unique, Source, TestDb};
use uuid::Uuid;

const CTL: &str = env!("CARGO_BIN_EXE_kafkifyctl");

/// A source database, its topic namespace and checkpoint topic, and the settings that the
/// relay and kafkifyctl share.
struct Fixture {
    db: TestDb,
    prefix: String,
    checkpoint_topic: String,
    /// RELAY_MAX_RECORD_BYTES for kafkifyctl, when not the default.
    max_record_bytes: Option<&'static str>,
}

impl Fixture {
    async fn new() -> Fixture {
        let tag = unique("t");
        Fixture {
            db: TestDb::create(Source::Rest).await,
            prefix: format!("{tag}."),
            checkpoint_topic: format!("{tag}.checkpoints"),
            max_record_bytes: None,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        test_support::relay_env(&self.db, &self.prefix, &self.checkpoint_topic)
    }

    async fn relay(&self) -> Service {
        let mut relay = Service::spawn(&workspace_bin("cdc-relay"), &self.env());
        relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
        relay
    }

    fn topic(&self, event_type: &str) -> String {
        format!("{}{event_type}", self.prefix)
    }

    /// kafkifyctl with the fixture's settings, and `relay_url` as the relay's.
    fn ctl_command_with(&self, relay_url: String, args: &[&str]) -> Command {
        let mut env = self.env();
        env.push(("KAFKIFY_RELAY_URL", relay_url));
        if let Some(max) = self.max_record_bytes {
            env.push(("RELAY_MAX_RECORD_BYTES", max.to_string()));
        }
        let mut c = Command::new(CTL);
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stdin(Stdio::null());
        c
    }

    /// kafkifyctl with no relay running (its URL a port nothing listens on).
    fn ctl_command(&self, args: &[&str]) -> Command {
        self.ctl_command_with(format!("http://127.0.0.1:{}", free_port()), args)
    }

    /// Runs kafkifyctl with the fixture's settings; its exit code and stdout.
    fn ctl(&self, relay: Option<&Service>, args: &[&str]) -> (i32, String) {
        let mut command = match relay {
            Some(r) => self.ctl_command_with(r.base(), args),
            None => self.ctl_command(args),
        };
        let out = command.output().expect("running kafkifyctl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("kafkifyctl {args:?}: {:?}\n{stdout}{stderr}", out.status);
        (out.status.code().unwrap_or(-1), stdout)
    }

    /// Writes one outbox row of `event_type` with key `key`; returns its id.
    async fn write(&self, event_type: &str, key: &str, version: i64) -> Uuid {
        let id = Uuid::new_v4();
        let payload = serde_json::to_string(&schemas::ResourceCreated {
            resource_id: Uuid::from_u128(version as u128),
            name: key.to_string(),
            description: "d".repeat(10),
            attributes: [("v".to_string(), version.to_string())].into(),
            version,
            created_at: 1_700_000_000_000_000,
        })
        .unwrap();
        self.db
            .owner()
            .await
            .execute(
                "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
                 VALUES ($1, 'resource', $2, $3, $4::text::jsonb)",
                &[&id, &key, &event_type, &payload],
            )
            .await
            .unwrap();
        id
    }

    /// `tail --from-beginning --exit-at-end --json` of a topic, once it holds `n` records.
    fn tail_all(&self, event_type: &str, n: usize, extra: &[&str]) -> Vec<Value> {
        let topic = self.topic(event_type);
        let start = Instant::now();
        loop {
            let mut args = vec![
                "tail",
                topic.as_str(),
                "--from-beginning",
                "--exit-at-end",
                "--json",
            ];
            args.extend_from_slice(extra);
            let (code, out) = self.ctl(None, &args);
            assert_eq!(code, 0, "tail failed: {out}");
            let records: Vec<Value> = out
                .lines()
                .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
                .collect();
            if records.len() >= n || start.elapsed() > Duration::from_secs(30) {
                return records;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    async fn cleanup(self) {
        test_support::delete_topics_with_prefix(&self.prefix).await;
        self.db.cleanup().await;
    }
}

fn source<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == name)
        .unwrap_or_else(|| panic!("no source {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_decodes_the_records_on_kafka_as_confluents_own_client_does() {
    let f = Fixture::new().await;
    let relay = f.relay().await;
    let mut ids = Vec::new();
    for v in 1..=3 {
        ids.push(
            f.write(
                "resource.created",
                if v == 2 { "other" } else { "key-a" },
                v,
            )
            .await,
        );
    }
    let records = f.tail_all("resource.created", 3, &[]);
    assert_eq!(records.len(), 3, "{records:?}");
    for r in &records {
        let id = r["headers"]["event_id"].as_str().unwrap();
        let v = ids
            .iter()
            .position(|i| i.to_string() == id)
            .expect("an id the test wrote") as i64
            + 1;
        assert_eq!(r["value"]["version"], v, "{r}");
        assert_eq!(r["value"]["attributes"]["v"], v.to_string(), "{r}");
        assert_eq!(r["key"], if v == 2 { "other" } else { "key-a" });
        assert!(r["schema_id"].as_u64().is_some(), "{r}");
        assert!(
            r["headers"]["source_lsn"]
                .as_str()
                .is_some_and(|l| l.contains('/')),
            "{r}"
        );
        assert!(r["offset"].as_i64().is_some() && r["partition"].as_i64().is_some());
    }
    // Confluent's own client (confluent-kafka's AvroDeserializer) reads the same values.
    let python = std::env::var("KAFKIFY_CONFLUENT_PYTHON").expect(
        "KAFKIFY_CONFLUENT_PYTHON names the Python of tests/confluent-python; ./kafkify test installs it and sets it",
    );
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/confluent-python/read.py");
    let topic = f.topic("resource.created");
    let out = Command::new(python)
        .arg(script)
        .args([
            "--brokers",
            &stack().kafka_brokers,
            "--registry",
            &stack().schema_registry_url,
        ])
        .args(["--topic", &topic, "--count", "3"])
        .output()
        .expect("running tests/confluent-python/read.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(theirs.len(), 3);
    for t in &theirs {
        let ours = records
            .iter()
            .find(|r| r["partition"] == t["partition"] && r["offset"] == t["offset"])
            .unwrap_or_else(|| panic!("kafkifyctl tail lacks {t}"));
        assert_eq!(
            ours["value"], t["value"],
            "kafkifyctl and Confluent's client disagree"
        );
        assert_eq!(ours["key"], t["key"]);
    }

    let keyed = f.tail_all("resource.created", 2, &["--key", "key-a"]);
    assert_eq!(keyed.len(), 2, "{keyed:?}");
    assert!(keyed.iter().all(|r| r["key"] == "key-a"));
    let counted = f.tail_all("resource.created", 1, &["--count", "1"]);
    assert_eq!(counted.len(), 1);
    let (code, _) = f.ctl(None, &["tail", &f.topic("no.such.topic"), "--exit-at-end"]);
    assert_eq!(code, 2, "a missing topic is a usage error");
    relay.terminate(Duration::from_secs(30)).await;
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_checkpoint_lag_and_dead_letters_and_why_a_source_is_stalled() {
    let f = Fixture::new().await;
    let relay = f.relay().await;
    f.write("resource.created", "k", 1).await;
    // An event type with no topic: the relay dead-letters it.
    f.write("resource.unheard_of", "k", 2).await;
    let dlq = f.topic(cdc_relay::record::UNKNOWN_EVENT_TYPE_DLQ);
    assert_eq!(
        f.tail_all(cdc_relay::record::UNKNOWN_EVENT_TYPE_DLQ, 1, &[])
            .len(),
        1
    );

    let (code, out) = f.ctl(Some(&relay), &["status", "--json"]);
    let status: Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(code, 0, "{status}");
    let s = source(&status, &f.db.name);
    assert_eq!(s["state"], "streaming", "{s}");
    assert_eq!(s["slot"], format!("kafkify_{}", f.db.name));
    assert_eq!(s["slot_active"], true);
    assert!(s["checkpoint_lsn"].as_str().is_some(), "{s}");
    assert!(s["checkpoint_age_seconds"].as_f64().is_some(), "{s}");
    assert!(s["retained_wal_bytes"].as_i64().is_some(), "{s}");
    assert!(
        s["primary"]
            .as_str()
            .is_some_and(|p| p.contains("streaming")),
        "{s}"
    );
    let counts = status["dead_letters"].as_array().unwrap();
    let unknown = counts
        .iter()
        .find(|d| d["topic"] == dlq.as_str())
        .expect("the unknown-type topic counted");
    assert_eq!(unknown["records"], 1, "{unknown}");
    assert_eq!(unknown["complete"], true);

    // The relay stops; a row written now waits, and status says so.
    relay.terminate(Duration::from_secs(30)).await;
    f.write("resource.created", "k", 3).await;
    let (code, out) = f.ctl(None, &["status", "--json"]);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 1, "a stalled source needs a person: {status}");
    let s = source(&status, &f.db.name);
    assert_eq!(s["state"], "stalled", "{s}");
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("no relay streams the slot"),
        "{s}"
    );
    assert!(s["lag_bytes"].as_i64().unwrap() > 0, "{s}");
    assert!(s["lag_seconds"].as_f64().unwrap() > 0.0, "{s}");

    // The table names the same.
    let (_, table) = f.ctl(None, &["status"]);
    assert!(
        table.contains(&format!("{}: no relay streams the slot", f.db.name)),
        "{table}"
    );
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_fails_a_publication_of_updates_and_a_checkpoint_topic_of_three_partitions() {
    let mut f = Fixture::new().await;
    // Healthy first: as migrated, with the relay's topics made.
    let relay = f.relay().await;
    relay.terminate(Duration::from_secs(30)).await;
    let (code, out) = f.ctl(None, &["doctor", "--json"]);
    let findings: Vec<Value> = serde_json::from_str(&out).unwrap();
    let fails: Vec<&Value> = findings.iter().filter(|x| x["level"] == "fail").collect();
    assert!(fails.is_empty(), "{fails:?}");
    assert_eq!(code, 0);

    f.db.owner()
        .await
        .batch_execute("ALTER PUBLICATION kafkify_outbox SET (publish = 'insert, update')")
        .await
        .unwrap();
    let three = test_support::create_topics(&[&format!("{}cp", f.prefix)], 3).await;
    f.checkpoint_topic = three[0].clone();
    let (code, out) = f.ctl(None, &["doctor", "--json"]);
    assert_eq!(code, 1, "{out}");
    let findings: Vec<Value> = serde_json::from_str(&out).unwrap();
    let fail = |check: &str| {
        findings
            .iter()
            .find(|x| x["check"] == check)
            .unwrap_or_else(|| panic!("no check {check} in {findings:?}"))
    };
    let publication = fail(&format!("publication operations ({})", f.db.name));
    assert_eq!(publication["level"], "fail");
    assert!(publication["fix"]
        .as_str()
        .unwrap()
        .contains("SET (publish = 'insert')"));
    let partitions = fail(&format!("topic {} partitions", f.checkpoint_topic));
    assert_eq!(partitions["level"], "fail");
    assert_eq!(
        fail(&format!("topic {} cleanup.policy", f.checkpoint_topic))["level"],
        "fail"
    );
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_schemas_refuses_an_incompatible_local_schema() {
    let f = Fixture::new().await;
    // The relay registers the subjects under the fixture's prefix.
    f.relay().await.terminate(Duration::from_secs(30)).await;
    let dir = std::env::temp_dir().join(unique("schemas"));
    std::fs::create_dir_all(&dir).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    for event_type in schemas::EVENT_TYPES {
        let file = format!("{event_type}.avsc");
        std::fs::copy(root.join(&file), dir.join(&file)).unwrap();
    }
    let dir_arg = dir.display().to_string();
    let (code, _) = f.ctl(None, &["doctor", "--schemas", "--schemas-dir", &dir_arg]);
    assert_eq!(code, 0, "the schemas as they are");

    // A new field without a default: readers of the new schema cannot read old records.
    let path = dir.join("resource.created.avsc");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    schema["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "owner", "type": "string"}));
    std::fs::write(&path, schema.to_string()).unwrap();
    let (code, out) = f.ctl(
        None,
        &["doctor", "--schemas", "--schemas-dir", &dir_arg, "--json"],
    );
    assert_eq!(code, 1, "{out}");
    let findings: Vec<Value> = serde_json::from_str(&out).unwrap();
    let subject = format!("subject {}resource.created-value local schema", f.prefix);
    let bad = findings
        .iter()
        .find(|x| x["check"] == subject.as_str())
        .expect("the subject checked");
    assert_eq!(bad["level"], "fail", "{bad}");
    assert!(
        findings.iter().filter(|x| x["level"] == "fail").count() == 1,
        "{findings:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
    f.cleanup().await;
}

/// Dead letters of oversized rows, redriven once the limit is raised: a redrive before the fix
/// publishes nothing; one killed midway and run again, then run a third time, leaves every
/// event exactly once on its topic.
#[tokio::test(flavor = "multi_thread")]
async fn redrive_killed_midway_and_run_again_publishes_each_dead_letter_exactly_once() {
    const EVENTS: usize = 200;
    let mut f = Fixture::new().await;
    // The relay and kafkifyctl share their settings, this low limit included.
    f.max_record_bytes = Some("16384");
    let mut env = f.env();
    env.push(("RELAY_MAX_RECORD_BYTES", "16384".into()));
    let mut relay = Service::spawn(&workspace_bin("cdc-relay"), &env);
    relay.wait_for("/ready", 200, Duration::from_secs(60)).await;
    let mut ids = HashSet::new();
    {
        let owner = f.db.owner().await;
        for v in 0..EVENTS {
            let id = Uuid::new_v4();
            let payload = serde_json::to_string(&schemas::ResourceCreated {
                resource_id: Uuid::new_v4(),
                name: format!("big-{v}"),
                description: "d".repeat(20_000),
                attributes: Default::default(),
                version: 1,
                created_at: 1_700_000_000_000_000,
            })
            .unwrap();
            owner
                .execute(
                    "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
                     VALUES ($1, 'resource', $2, 'resource.created', $3::text::jsonb)",
                    &[&id, &format!("big-{v}"), &payload],
                )
                .await
                .unwrap();
            ids.insert(id.to_string());
        }
    }
    let letters = f.tail_all("resource.created.dlq", EVENTS, &[]);
    assert_eq!(letters.len(), EVENTS);
    relay.terminate(Duration::from_secs(30)).await;

    let (code, out) = f.ctl(None, &["dlq", "list", "--reason", "too_large", "--json"]);
    assert_eq!(code, 0);
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), EVENTS);
    assert!(listed.iter().all(|d| d["origin"] == "cdc-relay"));
    let one = listed[0]["event_id"].as_str().unwrap().to_string();
    let (code, out) = f.ctl(None, &["dlq", "show", &one]);
    assert_eq!(code, 0);
    assert!(out.contains("RELAY_MAX_RECORD_BYTES is 16384"), "{out}");

    // Before the fix: every one would fail again, and nothing is published.
    let (code, out) = f.ctl(None, &["dlq", "redrive", "--json"]);
    assert_eq!(code, 1, "{out}");
    let results: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(
        results.iter().all(|r| r["result"] == "still_fails"),
        "{results:?}"
    );
    assert!(f.tail_all("resource.created", 0, &[]).is_empty());

    // The fix: the topic takes 1 MiB records, and so does the relay's (and kafkifyctl's) limit.
    let topic = f.topic("resource.created");
    let mut new =
        rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&topic));
    new = new.set("max.message.bytes", "1048588");
    for r in stack()
        .kafka_admin()
        .alter_configs(&[new], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    f.max_record_bytes = Some("1048588");

    // Killed right after its first transaction committed.
    let mut child = f
        .ctl_command(&["dlq", "redrive", "--batch", "5"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    use std::io::BufRead;
    for line in stderr.lines() {
        if line.unwrap().contains("redriven 5 so far") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let midway = f.tail_all("resource.created", 5, &[]);
    assert!(
        midway.len() >= 5 && midway.len() < EVENTS,
        "killed midway: {} published",
        midway.len()
    );

    for run in ["again", "a third time"] {
        let (code, out) = f.ctl(None, &["dlq", "redrive", "--batch", "5", "--json"]);
        assert_eq!(code, 0, "redrive {run}: {out}");
        let published = f.tail_all("resource.created", EVENTS, &[]);
        let mut seen = HashSet::new();
        for r in &published {
            let id = r["headers"]["event_id"].as_str().unwrap().to_string();
            assert!(ids.contains(&id), "an event the test wrote: {id}");
            assert!(
                seen.insert(id.clone()),
                "redrive {run}: {id} published twice"
            );
            assert!(r["headers"]["redrive_run"].as_str().is_some());
            assert_eq!(r["value"]["description"].as_str().unwrap().len(), 20_000);
        }
        assert_eq!(seen.len(), EVENTS, "redrive {run}");
    }
    let (_, out) = f.ctl(None, &["dlq", "redrive", "--json"]);
    let results: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(
        results.iter().all(|r| r["result"] == "already_redriven"),
        "{results:?}"
    );
    f.cleanup().await;
}

/// A replay publishes each row of the time range again, marked with its run; resuming a
/// finished run publishes nothing more; a topic filter keeps to its topic.
#[tokio::test(flavor = "multi_thread")]
async fn replay_publishes_the_rows_again_marked_and_a_finished_run_does_nothing_more() {
    const ROWS: usize = 30;
    let f = Fixture::new().await;
    let relay = f.relay().await;
    let mut ids = HashSet::new();
    for v in 0..ROWS {
        ids.insert(
            f.write("resource.created", &format!("k{}", v % 4), v as i64)
                .await
                .to_string(),
        );
    }
    assert_eq!(f.tail_all("resource.created", ROWS, &[]).len(), ROWS);
    relay.terminate(Duration::from_secs(30)).await;

    let (code, out) = f.ctl(
        None,
        &[
            "replay", "--source", &f.db.name, "--since", "1h", "--batch", "7", "--json",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["published"], ROWS);
    assert_eq!(summary["done"], true);
    let run = summary["run"].as_str().unwrap().to_string();
    let all = f.tail_all("resource.created", 2 * ROWS, &[]);
    assert_eq!(all.len(), 2 * ROWS);
    let replayed: Vec<&Value> = all
        .iter()
        .filter(|r| r["headers"]["replay_run"] == run.as_str())
        .collect();
    assert_eq!(replayed.len(), ROWS);
    let replayed_ids: HashSet<String> = replayed
        .iter()
        .map(|r| r["headers"]["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(replayed_ids, ids, "each row once in the run");
    // Per key, the replay keeps the rows' order.
    for key in ["k0", "k1", "k2", "k3"] {
        let versions: Vec<i64> = replayed
            .iter()
            .filter(|r| r["key"] == key)
            .map(|r| r["value"]["version"].as_i64().unwrap())
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{key}: {versions:?}"
        );
    }

    let (code, out) = f.ctl(None, &["replay", "--resume", &run, "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        f.tail_all("resource.created", 2 * ROWS, &[]).len(),
        2 * ROWS,
        "nothing more"
    );

    let (code, out) = f.ctl(
        None,
        &[
            "replay",
            "--source",
            &f.db.name,
            "--since",
            "1h",
            "--topic",
            &f.topic("resource.deleted"),
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["published"], 0, "no resource.deleted rows");
    let (code, _) = f.ctl(None, &["replay", "--source", "nope", "--since", "1h"]);
    assert_eq!(code, 2, "an unknown source is a usage error");
    f.cleanup().await;
}

/// A transaction the relay cannot publish (it writes to a second table named outbox_events
/// that lacks the outbox's columns) stalls its source, and the rows after it wait. A skip at
/// another LSN is refused; at the stalled one, the transaction's outbox event is
/// dead-lettered, the rows after it flow once each, and the skip is listed and counted.
#[tokio::test(flavor = "multi_thread")]
async fn skip_of_a_poison_transaction_lets_the_next_ones_flow() {
    let f = Fixture::new().await;
    let owner = f.db.owner().await;
    owner
        .batch_execute(
            "CREATE SCHEMA bad;
             CREATE TABLE bad.outbox_events (id uuid PRIMARY KEY, junk text);
             ALTER PUBLICATION kafkify_outbox ADD TABLE bad.outbox_events;",
        )
        .await
        .unwrap();
    let relay = f.relay().await;
    let before = f.write("resource.created", "k", 1).await;
    assert_eq!(f.tail_all("resource.created", 1, &[]).len(), 1);

    let poisoned = Uuid::new_v4();
    owner
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
               VALUES ('{poisoned}', 'resource', 'k', 'resource.created', '{{}}');
             INSERT INTO bad.outbox_events VALUES (gen_random_uuid(), 'x');
             COMMIT;"
        ))
        .await
        .unwrap();
    let after = [
        f.write("resource.created", "k", 2).await,
        f.write("resource.created", "k", 3).await,
    ];

    // Stalled: the relay names the transaction.
    let start = Instant::now();
    let lsn = loop {
        let (_, out) = f.ctl(Some(&relay), &["status", "--json"]);
        let status: Value = serde_json::from_str(&out).unwrap();
        let reason = source(&status, &f.db.name)["reason"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if let Some(at) = reason.split("stalled at ").nth(1) {
            break at.split(':').next().unwrap().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never stalled: {status}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        f.tail_all("resource.created", 1, &[]).len(),
        1,
        "nothing passes the poison"
    );

    let (code, out) = f.ctl(
        Some(&relay),
        &[
            "skip", "--source", &f.db.name, "--lsn", "0/1", "--reason", "wrong",
        ],
    );
    assert_eq!(
        code, 1,
        "a skip where the source is not stalled is refused: {out}"
    );
    let (_, out) = f.ctl(None, &["skip", "--list", "--json"]);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&out).unwrap().len(),
        0,
        "nothing recorded"
    );

    let (code, out) = f.ctl(
        Some(&relay),
        &[
            "skip",
            "--source",
            &f.db.name,
            "--lsn",
            &lsn,
            "--reason",
            "bad.outbox_events row; ticket 42",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let recorded: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(recorded["passed"], true);

    let published = f.tail_all("resource.created", 3, &[]);
    let ids: Vec<String> = published
        .iter()
        .map(|r| r["headers"]["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids,
        [before, after[0], after[1]].map(|u| u.to_string()),
        "in order, once each"
    );
    let letters = f.tail_all("resource.created.dlq", 1, &[]);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["headers"]["event_id"], poisoned.to_string());
    assert_eq!(letters[0]["headers"]["dlq_reason"], "operator_skip");
    assert!(letters[0]["headers"]["dlq_detail"]
        .as_str()
        .unwrap()
        .contains("ticket 42"));

    let (_, out) = f.ctl(None, &["skip", "--list", "--json"]);
    let skips: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(skips.len(), 1);
    assert_eq!(skips[0]["lsn"], lsn.as_str());
    assert_eq!(skips[0]["reason"], "bad.outbox_events row; ticket 42");
    let (_, metrics) = relay.get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kafkify_cdc_relay_operator_skips_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
    relay.terminate(Duration::from_secs(30)).await;
    f.cleanup().await;
}

/// A replay SIGKILLed midway and resumed publishes every row of the range exactly once in the
/// run, in each key's order.
#[tokio::test(flavor = "multi_thread")]
async fn replay_killed_midway_and_resumed_publishes_each_row_once() {
    const ROWS: usize = 3000;
    let f = Fixture::new().await;
    // The relay makes the topics; the rows are written afterwards, for the replay alone.
    f.relay().await.terminate(Duration::from_secs(30)).await;
    f.db.owner()
        .await
        .batch_execute(&format!(
            "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, created_at)
             SELECT gen_random_uuid(), 'resource', 'k' || (i % 8), 'resource.created',
                    jsonb_build_object('resource_id', gen_random_uuid(), 'name', 'n', 'description', 'd',
                                       'attributes', '{{}}'::jsonb, 'version', i,
                                       'created_at', 1700000000000000),
                    now() + i * interval '1 microsecond'
               FROM generate_series(1, {ROWS}) i"
        ))
        .await
        .unwrap();
    let mut child = f
        .ctl_command(&[
            "replay", "--source", &f.db.name, "--since", "1h", "--batch", "5",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    use std::io::BufRead;
    stderr.read_line(&mut first).unwrap();
    let run = first
        .split("--resume ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("the run id in {first:?}"))
        .to_string();
    // Killed once some batches are on Kafka.
    let start = Instant::now();
    loop {
        let (_, out) = f.ctl(
            None,
            &[
                "tail",
                &f.topic("resource.created"),
                "--from-beginning",
                "--exit-at-end",
                "--count",
                "20",
                "--json",
            ],
        );
        if out.lines().count() >= 20 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing replayed"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let midway = f.tail_all("resource.created", 0, &[]).len();
    assert!(midway < ROWS, "killed midway: {midway} of {ROWS} published");

    let (code, out) = f.ctl(None, &["replay", "--resume", &run, "--json"]);
    assert_eq!(code, 0, "{out}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["published"], ROWS, "{summary}");
    let all = f.tail_all("resource.created", ROWS, &[]);
    let mut seen = HashSet::new();
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for r in &all {
        assert_eq!(r["headers"]["replay_run"], run.as_str());
        let id = r["headers"]["event_id"].as_str().unwrap().to_string();
        assert!(seen.insert(id.clone()), "{id} twice");
        let key = r["key"].as_str().unwrap().to_string();
        let version = r["value"]["version"].as_i64().unwrap();
        if let Some(before) = last.insert(key.clone(), version) {
            assert!(before < version, "{key}: {version} after {before}");
        }
    }
    assert_eq!(seen.len(), ROWS);
    f.cleanup().await;
}
