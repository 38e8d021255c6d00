//! worker against the real stack: migrations, ops endpoints, config errors, SIGTERM.

use test_support::service::{check_bad_setting, check_ops_contract, run};
use test_support::{stack, Source, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_worker");

fn env(db: &TestDb) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.owner_dsn()),
        ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
        ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
    ]
}

#[tokio::test]
async fn migrate_then_serve_then_stop_on_sigterm() {
    let db = TestDb::create_empty(Source::Worker).await;
    for _ in 0..2 {
        let (status, out) = run(BIN, &["migrate"], &env(&db));
        assert!(status.success(), "{out}");
    }
    let n: i64 = db
        .owner()
        .await
        .query_one("SELECT count(*) FROM processed_events", &[])
        .await
        .expect("processed_events exists")
        .get(0);
    assert_eq!(n, 0);
    check_ops_contract(BIN, &env(&db), "kafkify_worker").await;
    db.cleanup().await;
}

#[test]
fn a_bad_setting_stops_start_up_naming_it() {
    let url = "postgres://u:p@127.0.0.1/worker".to_string();
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("KAFKA_BROKERS", "localhost".into()),
        ],
        "KAFKA_BROKERS",
    );
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("SCHEMA_REGISTRY_URL", "registry:8081".into()),
        ],
        "SCHEMA_REGISTRY_URL",
    );
    check_bad_setting(
        BIN,
        &[("DATABASE_URL", url), ("SHUTDOWN_TIMEOUT", "soon".into())],
        "SHUTDOWN_TIMEOUT",
    );
}
