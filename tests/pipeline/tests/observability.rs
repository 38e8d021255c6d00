//! Observability of the whole pipeline, every process real: one trace per request across all
//! services (read back from the local Jaeger), and the real Prometheus scraping the running
//! services for every metric the dashboards and alert rules use.

mod pipeline;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api_grpc::pb::{self, TaskStatus};
use pipeline::{wait_task, Pipeline};
use serde_json::Value;
use test_support::service::free_port;
use test_support::stack;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Services send spans every 100 ms instead of every 5 s, so the test does not wait long.
fn traced() -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", stack().otlp_endpoint.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ]
}

fn random_hex(bytes: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..bytes * 2].to_string()
}

/// One span as Jaeger's query API returns it.
#[derive(Debug, Clone)]
struct Span {
    id: String,
    parent: Option<String>,
    service: String,
    name: String,
    kind: String,
    tags: HashMap<String, Value>,
}

async fn trace(trace_id: &str) -> Vec<Span> {
    let url = format!("{}/api/traces/{trace_id}", stack().jaeger_url);
    let Ok(resp) = reqwest::get(&url).await else {
        return Vec::new();
    };
    let body: Value = resp.json().await.unwrap_or_default();
    let mut out = Vec::new();
    for t in body["data"].as_array().into_iter().flatten() {
        for s in t["spans"].as_array().into_iter().flatten() {
            let pid = s["processID"].as_str().unwrap_or_default();
            let tags: HashMap<String, Value> = s["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        t["key"].as_str().unwrap_or_default().to_string(),
                        t["value"].clone(),
                    )
                })
                .collect();
            out.push(Span {
                id: s["spanID"].as_str().unwrap_or_default().to_string(),
                parent: s["references"]
                    .as_array()
                    .and_then(|r| r.first())
                    .and_then(|r| r["spanID"].as_str())
                    .map(str::to_string),
                service: t["processes"][pid]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                name: s["operationName"].as_str().unwrap_or_default().to_string(),
                kind: tags
                    .get("span.kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                tags,
            });
        }
    }
    out
}

/// Follows `hops` (service, span kind) from the caller's span `root_parent`, each hop a child of
/// the one before; returns the spans of the chain, or what is missing.
fn chain(spans: &[Span], root_parent: &str, hops: &[(&str, &str)]) -> Result<Vec<Span>, String> {
    let mut parent = root_parent.to_string();
    let mut found = Vec::new();
    for (service, kind) in hops {
        let next = spans
            .iter()
            .find(|s| {
                s.parent.as_deref() == Some(parent.as_str())
                    && s.service == *service
                    && s.kind == *kind
            })
            .ok_or_else(|| {
                format!(
                    "no {kind} span of {service} under span {parent}; have: {:?}",
                    spans
                        .iter()
                        .map(|s| (&s.service, &s.name, &s.kind, &s.id, &s.parent))
                        .collect::<Vec<_>>()
                )
            })?;
        parent = next.id.clone();
        found.push(next.clone());
    }
    Ok(found)
}

async fn wait_for_chain(trace_id: &str, root_parent: &str, hops: &[(&str, &str)]) -> Vec<Span> {
    let start = Instant::now();
    loop {
        let spans = trace(trace_id).await;
        match chain(&spans, root_parent, hops) {
            Ok(c) => return c,
            Err(e) if start.elapsed() > Duration::from_secs(60) => {
                panic!("trace {trace_id} incomplete after 60 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn tag<'a>(span: &'a Span, key: &str) -> &'a Value {
    span.tags
        .get(key)
        .unwrap_or_else(|| panic!("span {} has no tag {key}: {:?}", span.name, span.tags))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_per_request_across_every_service() {
    let mut p = Pipeline::start_with(traced()).await;

    // REST: api-rest → cdc-relay → worker.
    let (rest_trace, rest_parent) = (random_hex(16), random_hex(8));
    let resp = test_support::api_client()
        .post(format!("{}/api/v1/resources", p.rest.base()))
        .header("traceparent", format!("00-{rest_trace}-{rest_parent}-01"))
        .json(&serde_json::json!({ "name": "traced" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // gRPC: api-grpc → cdc-relay → worker → cdc-relay → api-grpc.
    let (grpc_trace, grpc_parent) = (random_hex(16), random_hex(8));
    let mut req = tonic::Request::new(pb::ProcessTaskRequest {
        r#type: "checksum".into(),
        input: r#"{"n": 3}"#.into(),
        idempotency_key: String::new(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{grpc_trace}-{grpc_parent}-01").parse().unwrap(),
    );
    let task = p.tasks.process_task(req).await.unwrap().into_inner();
    let done = wait_task(&mut p.tasks, &task.id, Duration::from_secs(60)).await;
    assert_eq!(done.status, TaskStatus::Completed as i32);

    let rest = wait_for_chain(
        &rest_trace,
        &rest_parent,
        &[
            ("api-rest", "server"),
            ("api-rest", "client"),
            ("cdc-relay", "producer"),
            ("worker", "consumer"),
            ("worker", "client"),
        ],
    )
    .await;
    assert_eq!(rest[0].name, "POST /api/v1/resources");
    assert_eq!(tag(&rest[0], "http.response.status_code"), 201);
    assert_eq!(tag(&rest[1], "db.operation.name"), "INSERT");
    let topic = format!("{}resource.created", p.prefix);
    assert_eq!(rest[2].name, format!("send {topic}"));
    assert_eq!(tag(&rest[2], "messaging.destination.name"), topic.as_str());
    assert_eq!(tag(&rest[2], "messaging.kafka.message.key"), id.as_str());
    assert!(tag(&rest[2], "kafkify.source_lsn")
        .as_str()
        .unwrap()
        .contains('/'));
    // The consumer read the record the producer wrote: same partition and offset.
    for key in [
        "messaging.destination.partition.id",
        "messaging.kafka.offset",
    ] {
        assert_eq!(tag(&rest[2], key), tag(&rest[3], key), "{key}");
    }
    assert_eq!(
        tag(&rest[2], "messaging.message.id"),
        tag(&rest[3], "messaging.message.id")
    );

    let grpc = wait_for_chain(
        &grpc_trace,
        &grpc_parent,
        &[
            ("api-grpc", "server"),
            ("api-grpc", "client"),
            ("cdc-relay", "producer"),
            ("worker", "consumer"),
            ("worker", "client"),
            ("cdc-relay", "producer"),
            ("api-grpc", "consumer"),
        ],
    )
    .await;
    assert_eq!(grpc[0].name, "kafkify.task.v1.TaskService/ProcessTask");
    assert_eq!(tag(&grpc[0], "rpc.system"), "grpc");
    assert_eq!(grpc[2].name, format!("send {}task.process", p.prefix));
    assert_eq!(grpc[5].name, format!("send {}task.completed", p.prefix));
    assert_eq!(
        tag(&grpc[6], "messaging.kafka.message.key"),
        task.id.as_str()
    );
    // The two requests stayed two traces.
    assert!(trace(&rest_trace)
        .await
        .iter()
        .all(|s| s.service != "api-grpc"));
    p.stop().await;
}

/// Every `kafkify_…` metric name an expression in `text` uses.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("kafkify_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        // Preceded by a name character means it is inside another word (e.g. a job label).
        let inside =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !inside {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

fn expressions() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let rules =
        std::fs::read_to_string(repo().join("observability/prometheus/alerts.yml")).unwrap();
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        // Only expressions: annotations mention metrics in prose too.
        if !line.contains("summary:") && !line.contains("description:") {
            names.extend(metric_names(line));
        }
    }
    let dir = repo().join("observability/grafana/dashboards");
    for entry in std::fs::read_dir(dir).unwrap() {
        let dash: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        for panel in dash["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().into_iter().flatten() {
                names.extend(metric_names(t["expr"].as_str().unwrap()));
            }
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        metric_names(r#"sum(rate(kafkify_a_b_total{x="kafkify_not"}[5m])) / kafkify_c"#),
        ["kafkify_a_b_total", "kafkify_c", "kafkify_not"]
            .map(String::from)
            .into()
    );
    let names = expressions();
    assert!(names.contains("kafkify_cdc_relay_commit_to_ack_seconds_bucket"));
    assert!(names.contains("kafkify_worker_consumer_lag"));
    assert!(names.len() > 20, "{names:?}");
}

fn promtool(args: &[&str]) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(repo().join("observability/prometheus"))
        .output()
        .expect("promtool runs (Debian package prometheus; ./kafkify up installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_configuration_and_the_rules() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "alerts.yml"]);
    // Unit tests of the WAL-safety alerts: they fire on a stopped relay's growing slot lag and
    // on an invalidated slot.
    promtool(&["test", "rules", "alerts.test.yml"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_finds_every_metric_the_dashboards_and_alerts_use() {
    let mut p = Pipeline::start().await;
    // Traffic that makes every family have series: writes, reads, a miss, a task with its
    // completion, and an outbox row of an unknown type that the relay dead-letters.
    let id = p.create_resource("metrics").await;
    let client = test_support::api_client();
    let get = client
        .get(format!("{}/api/v1/resources/{id}", p.rest.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    let task = p.process_task(r#"{"n": 5}"#).await;
    wait_task(&mut p.tasks, &task.id, Duration::from_secs(60)).await;
    p.rest_db
        .owner()
        .await
        .execute(
            "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'x', 'x', 'no.such.type', '{}')",
            &[],
        )
        .await
        .unwrap();

    // The real Prometheus, on its own port, scraping this test's services every second.
    let dir = tempdir();
    // Prometheus cannot say which port it took: the one chosen port here.
    let port = free_port();
    let target = |base: &str| base.trim_start_matches("http://").to_string();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n{}",
        repo().join("observability/prometheus/alerts.yml").display(),
        [
            ("api-rest", target(&p.rest.base())),
            ("api-grpc", target(&p.grpc.base())),
            ("cdc-relay", target(&p.relay.base())),
            ("worker", target(&p.worker.as_ref().unwrap().base())),
        ]
        .iter()
        .map(|(job, t)| format!("  - job_name: {job}\n    static_configs:\n      - targets: [\"{t}\"]\n"))
        .collect::<String>()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus runs (Debian package prometheus)");

    let names = expressions();
    let query = |name: String| {
        let client = client.clone();
        async move {
            let v: Value = client
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", format!("count({{__name__=\"{name}\"}})"))])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|n| n.parse::<u64>().ok())
        }
    };
    let start = Instant::now();
    let missing = loop {
        let mut missing = Vec::new();
        for name in &names {
            if query(name.clone()).await.unwrap_or(0) == 0 {
                missing.push(name.clone());
            }
        }
        if missing.is_empty() || start.elapsed() > Duration::from_secs(45) {
            break missing;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // All four targets up, and the rules loaded without errors.
    let up = query("up".into()).await;
    let rules: Value = client
        .get(format!("http://127.0.0.1:{port}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        missing.is_empty(),
        "no series for {missing:?} (of {} names); Prometheus log: {}",
        names.len(),
        dir.join("prometheus.log").display()
    );
    assert_eq!(up, Some(4));
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert!(loaded.len() >= 10, "{rules}");
    for r in loaded {
        assert_eq!(r["health"], "ok", "{r}");
    }
    std::fs::remove_dir_all(&dir).ok();
    p.stop().await;
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(test_support::unique("kafkify-prom"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
