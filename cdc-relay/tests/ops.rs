//! cdc-relay against the real stack: readiness follows its sources, Kafka and the registry;
//! config errors name the setting; SIGTERM stops it.

use std::time::Duration;

use test_support::service::{check_bad_setting, check_ops_contract, free_port, Service};
use test_support::{stack, Source, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_cdc-relay");

fn env(db: &TestDb) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.relay_dsn()),
        ("RELAY_SOURCES", db.name.clone()),
        ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
        ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
    ]
}

#[tokio::test]
async fn serves_ops_endpoints_and_stops_on_sigterm() {
    let db = TestDb::create(Source::Rest).await;
    check_ops_contract(BIN, &env(&db), "kafkify_cdc_relay").await;
    db.cleanup().await;
}

#[tokio::test]
async fn not_ready_without_the_publication_or_the_registry() {
    // A database without migrations has no publication: the relay must say so.
    let db = TestDb::create_empty(Source::Rest).await;
    let mut env = env(&db);
    env.push((
        "SCHEMA_REGISTRY_URL",
        format!("http://127.0.0.1:{}", free_port()),
    ));
    let mut service = Service::spawn(BIN, &env);
    let body = service
        .wait_for("/ready", 503, Duration::from_secs(15))
        .await;
    assert!(
        body.contains("publication `kafkify_outbox` does not exist"),
        "{body}"
    );
    assert!(body.contains(r#""schema registry":"GET http"#), "{body}");
    assert!(body.contains(r#""kafka":"ok""#), "{body}");
    drop(service);
    db.cleanup().await;
}

#[test]
fn a_bad_setting_stops_start_up_naming_it() {
    let url = "postgres://kafkify_relay:p@127.0.0.1/postgres".to_string();
    check_bad_setting(BIN, &[], "DATABASE_URL");
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("RELAY_SOURCES", "rest,Bad-Name".into()),
        ],
        "RELAY_SOURCES",
    );
    check_bad_setting(
        BIN,
        &[
            ("DATABASE_URL", url.clone()),
            ("RELAY_SOURCES", "rest,rest".into()),
        ],
        "RELAY_SOURCES",
    );
    check_bad_setting(
        BIN,
        &[("DATABASE_URL", url), ("RELAY_DELIVERY", "twice".into())],
        "RELAY_DELIVERY",
    );
}
