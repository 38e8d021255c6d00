//! `cargo bench -p api-rest --bench create [-- --clients N --seconds S]`
//!
//! Create throughput and latency of the real api-rest (release build) against the local stack's
//! Postgres, next to pgbench running the same transaction (BEGIN; insert the resource; insert
//! its outbox event; COMMIT) on the same database with the same number of clients. Then the
//! API at half of its peak rate, open loop, for p95 latency. Prints numbers; asserts nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use test_support::bench::{alternate_with_pgbench, arg, median_round, report_against_pgbench, Run};
use test_support::service::Service;
use test_support::{Source, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_api-rest");

fn body(i: usize) -> String {
    serde_json::json!({
        "name": format!("bench-{i}"),
        "description": "x".repeat(200),
        "attributes": {"source": "bench", "n": i.to_string()}
    })
    .to_string()
}

/// Closed loop: `clients` workers each sending creates back to back for `seconds`.
async fn closed_loop(base: &str, clients: usize, seconds: u64) -> (f64, Vec<f64>, usize) {
    let http = test_support::api_client();
    let counter = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, counter, errors) = (
            http.clone(),
            format!("{base}/api/v1/resources"),
            counter.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let ok = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body(i))
                    .send()
                    .await
                    .map(|r| r.status() == 201)
                    .unwrap_or(false);
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        all.len() as f64 / elapsed,
        all,
        errors.load(Ordering::Relaxed),
    )
}

/// Open loop: one create every 1/rate seconds, whatever the server's pace.
async fn open_loop(base: &str, rate: f64, seconds: u64) -> (f64, Vec<f64>, usize) {
    let http = test_support::api_client();
    let url = format!("{base}/api/v1/resources");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let n = (rate * seconds as f64) as usize;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body(1_000_000 + i))
                .send()
                .await
                .map(|r| r.status() == 201)
                .unwrap_or(false);
            ok.then(|| t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some(l) => lat.push(l),
            None => errors += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (lat.len() as f64 / elapsed, lat, errors)
}

const PGBENCH_SCRIPT: &str = r#"\set n random(1, 1000000000)
BEGIN;
INSERT INTO resources (id, name, description, attributes) VALUES (gen_random_uuid(), 'bench-' || :n, repeat('x', 200), jsonb_build_object('source', 'bench', 'n', :n::text)) RETURNING id, name, description, attributes, version, created_at, updated_at;
INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload, traceparent) VALUES (gen_random_uuid(), 'resource', 'k' || :n, 'resource.created', jsonb_build_object('resource_id', gen_random_uuid()::text, 'name', 'bench-' || :n, 'description', repeat('x', 200), 'attributes', jsonb_build_object('source', 'bench'), 'version', 1, 'created_at', 0), NULL);
END;
"#;

#[tokio::main]
async fn main() {
    let clients = arg("--clients", 32) as usize;
    let seconds = arg("--seconds", 10);
    let db = TestDb::create(Source::Rest).await;
    let mut api = Service::spawn(
        BIN,
        &[
            ("DATABASE_URL", db.owner_dsn()),
            ("LOG_LEVEL", "warn".into()),
        ],
    );
    api.wait_for("/ready", 200, Duration::from_secs(30)).await;

    // Warm-up: connections, prepared statements.
    closed_loop(&api.base(), clients, 2).await;
    let rounds = alternate_with_pgbench(&db, PGBENCH_SCRIPT, clients as u64, seconds, || async {
        Run::from(closed_loop(&api.base(), clients, seconds).await)
    })
    .await;
    let peak = median_round(&rounds).api.rate;
    let half = Run::from(open_loop(&api.base(), peak / 2.0, seconds).await);
    report_against_pgbench(
        "api-rest create",
        "creates",
        clients,
        seconds,
        &rounds,
        &half,
    );
    drop(api);
    db.cleanup().await;
}
