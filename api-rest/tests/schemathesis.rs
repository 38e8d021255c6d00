//! Schemathesis (property-based tests generated from `/openapi.json`) against the real api-rest
//! and Postgres: examples, coverage, fuzzing and stateful phases, with every check schemathesis
//! has (`--checks all`): no 5xx, no response that breaks the documented schema, status codes or
//! headers, no schema-invalid request accepted, no schema-valid request refused
//! (`positive_data_acceptance`: the document states the syntax of every header and query
//! parameter, the cursor's included), a 405 with `Allow` for undeclared methods, no operation
//! that works without the API key, and the stateful checks on created resources.
//!
//! `schemathesis.toml` beside this file adds 412 to the statuses valid data may get: a random
//! well-formed `If-Match` names a version the resource is not at.
//!
//! Needs the `st` command: `./kafkify test` installs schemathesis (version in
//! stack/versions.env) and sets `KAFKIFY_SCHEMATHESIS`.

use std::time::Duration;

use test_support::service::Service;
use test_support::{Source, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_api-rest");
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let st = std::env::var("KAFKIFY_SCHEMATHESIS").expect(
        "KAFKIFY_SCHEMATHESIS names the schemathesis `st` command; ./kafkify test installs it and sets it",
    );
    let db = TestDb::create(Source::Rest).await;
    let mut api = Service::spawn(BIN, &[("DATABASE_URL", db.owner_dsn())]);
    api.wait_for("/ready", 200, Duration::from_secs(30)).await;
    let reports = std::env::temp_dir().join(test_support::unique("schemathesis"));
    let mut cmd = std::process::Command::new(&st);
    cmd.arg("--config-file")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/schemathesis.toml"
        ))
        .arg("run")
        .arg(format!("{}/openapi.json", api.base()))
        .args(["--checks", "all"])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", test_support::API_KEY),
        ])
        .args([
            "--max-examples",
            "100",
            "--seed",
            "20261126",
            "--workers",
            "1",
        ])
        // Postgres text cannot hold NUL; the API refuses it (tested elsewhere) and the schema
        // does not say so, so generated valid data leaves it out.
        .args(["--generation-allow-x00", "false"])
        .args(["--request-timeout", "10"])
        .arg("--report-dir")
        .arg(&reports)
        .current_dir(std::env::temp_dir());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("schemathesis runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let summary = text
        .lines()
        .find(|l| {
            let mut words = l.split_whitespace();
            words.next().is_some_and(|n| n.parse::<u64>().is_ok())
                && words.next() == Some("generated,")
        })
        .unwrap_or("(no summary)")
        .trim()
        .to_string();
    println!("schemathesis: {summary}");
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    let generated: u64 = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(generated >= 200, "only {generated} cases ran:\n{text}");
    let _ = std::fs::remove_dir_all(reports);
    drop(api);
    db.cleanup().await;
}
