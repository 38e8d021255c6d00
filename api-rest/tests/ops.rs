//! api-rest against the real Postgres: migrations, ops endpoints, config errors, SIGTERM.

use std::time::Duration;

use test_support::service::{check_bad_setting, check_ops_contract, free_port, run, Service};
use test_support::{Source, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_api-rest");

#[tokio::test]
async fn migrate_is_idempotent_and_creates_the_schema() {
    let db = TestDb::create_empty(Source::Rest).await;
    let env = [("DATABASE_URL", db.owner_dsn())];
    for _ in 0..2 {
        let (status, out) = run(BIN, &["migrate"], &env);
        assert!(status.success(), "{out}");
    }
    let client = db.owner().await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM refinery_schema_history ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3], "each migration applied once");
    let tables: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "idempotency_keys",
            "outbox_events",
            "refinery_schema_history",
            "resources"
        ]
    );
    let published: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_publication_tables
             WHERE pubname = 'kafkify_outbox' AND tablename = 'outbox_events'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1);
    drop(client);
    db.cleanup().await;
}

#[tokio::test]
async fn serves_ops_endpoints_and_stops_on_sigterm() {
    let db = TestDb::create(Source::Rest).await;
    check_ops_contract(BIN, &[("DATABASE_URL", db.owner_dsn())], "kafkify_api_rest").await;
    db.cleanup().await;
}

#[tokio::test]
async fn not_ready_while_the_database_is_unreachable() {
    let url = format!("postgres://kafkify_rest:x@127.0.0.1:{}/rest", free_port());
    let mut service = Service::spawn(BIN, &[("DATABASE_URL", url)]);
    service
        .wait_for("/health", 200, Duration::from_secs(10))
        .await;
    let body = service
        .wait_for("/ready", 503, Duration::from_secs(10))
        .await;
    assert!(
        body.contains(r#""database":"#) && body.contains(r#""status":"not ready""#),
        "{body}"
    );
}

#[test]
fn a_bad_setting_stops_start_up_naming_it() {
    check_bad_setting(BIN, &[], "DATABASE_URL");
    let db = || ("DATABASE_URL", "postgres://u:p@127.0.0.1/rest".to_string());
    // No key at all, a short key, an unreadable key file.
    check_bad_setting(BIN, &[db()], "API_KEYS");
    check_bad_setting(BIN, &[db(), ("API_KEYS", "short".into())], "API_KEYS");
    check_bad_setting(
        BIN,
        &[db(), ("API_KEYS_FILE", "/nonexistent/keys".into())],
        "API_KEYS_FILE",
    );
    check_bad_setting(BIN, &[("DATABASE_URL", "mysql://x".into())], "DATABASE_URL");
    let url = "postgres://u:p@127.0.0.1/rest".to_string();
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("HTTP_ADDR", "nowhere".into()),
        ],
        "HTTP_ADDR",
    );
    check_bad_setting(
        BIN,
        &[("DATABASE_URL", url.clone()), ("DB_POOL_SIZE", "0".into())],
        "DB_POOL_SIZE",
    );
    check_bad_setting(
        BIN,
        &[("DATABASE_URL", url.clone()), ("LOG_FORMAT", "xml".into())],
        "LOG_FORMAT",
    );
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318".into()),
        ],
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    );
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://127.0.0.1:4318".into(),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ],
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    );
}
