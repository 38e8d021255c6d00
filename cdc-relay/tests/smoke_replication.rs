//! The private Postgres streams a committed outbox insert over logical replication with
//! pgoutput, to the relay's role, through the publication the migrations create.

use std::time::Duration;

use pgwire_replication::client::ReplicationEvent;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, TlsConfig};
use test_support::{stack, unique, Source, TestDb};

#[tokio::test]
async fn a_committed_outbox_insert_streams_with_pgoutput() {
    let db = TestDb::create(Source::Rest).await;
    let slot = unique("t_slot");
    let relay = platform::db::connect(&db.relay_url())
        .await
        .expect("relay role connects");
    relay
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("the relay's role may create a slot");

    let owner = db.owner().await;
    // An aborted transaction first: it must not reach the stream.
    owner.batch_execute(
        "BEGIN;
         INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
         VALUES ('00000000-0000-0000-0000-0000000000ab', 'resource', 'r-aborted', 'resource.created', '{}');
         ROLLBACK;",
    )
    .await
    .unwrap();
    let id = uuid::Uuid::new_v4();
    owner
        .execute(
            "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload)
             VALUES ($1, 'resource', 'r-1', 'resource.created', '{\"k\": 1}')",
            &[&id],
        )
        .await
        .unwrap();

    let s = stack();
    let config = ReplicationConfig::new(
        "127.0.0.1",
        "kafkify_relay",
        s.password("relay"),
        db.name.clone(),
        slot.clone(),
        "kafkify_outbox",
    )
    .with_port(s.pg_port)
    .with_tls(TlsConfig::disabled())
    .with_start_lsn(Lsn(0));
    let mut repl = ReplicationClient::connect(config)
        .await
        .expect("replication connection");

    let mut messages: Vec<u8> = Vec::new(); // first byte of every pgoutput message
    let mut data = Vec::new();
    let commit = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match repl.recv().await.expect("stream") {
                Some(ReplicationEvent::XLogData { data: bytes, .. }) => {
                    messages.push(bytes[0]);
                    data.extend_from_slice(&bytes);
                }
                Some(ReplicationEvent::Commit { end_lsn, .. }) => break end_lsn,
                Some(_) => {}
                None => panic!("stream ended before the commit"),
            }
        }
    })
    .await
    .expect("the commit arrives within 20 s");
    repl.update_applied_lsn(commit);
    let _ = repl.shutdown().await;

    // pgoutput v1: a Relation message ('R') describing outbox_events, then one Insert ('I').
    assert_eq!(
        messages,
        vec![b'R', b'I'],
        "one relation and one insert, nothing of the aborted tx"
    );
    let text = String::from_utf8_lossy(&data);
    assert!(text.contains("outbox_events"), "relation names the table");
    assert!(
        text.contains(&id.to_string()),
        "insert carries the committed row's id"
    );
    assert!(
        !text.contains("r-aborted"),
        "the rolled-back row never streams"
    );

    db.cleanup().await;
}

#[tokio::test]
async fn service_roles_cannot_replicate_and_the_relay_cannot_write() {
    // Each service's own tables, which the relay must not read or write.
    for (source, table) in [
        (Source::Rest, "resources"),
        (Source::Grpc, "tasks"),
        (Source::Worker, "processed_events"),
    ] {
        let db = TestDb::create(source).await;
        let owner = db.owner().await;
        let err = owner
            .execute(
                "SELECT pg_create_logical_replication_slot('t_forbidden', 'pgoutput')",
                &[],
            )
            .await
            .expect_err("a service role has no REPLICATION");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{source:?}: {err:?}"
        );

        let relay = platform::db::connect(&db.relay_url()).await.unwrap();
        let n: i64 = relay
            .query_one("SELECT count(*) FROM outbox_events", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "the relay reads the outbox");
        for sql in [
            "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, payload) VALUES (gen_random_uuid(), 'task', 't', 'task.process', '{}')".to_string(),
            "DELETE FROM outbox_events".to_string(),
            format!("SELECT count(*) FROM {table}"),
            format!("DELETE FROM {table}"),
            format!("CREATE TABLE relay_owned_{table} (x int)"),
        ] {
            let err = relay.execute(sql.as_str(), &[]).await.expect_err(&sql);
            assert_eq!(
                err.code(),
                Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
                "{source:?}: {sql}: {err:?}"
            );
        }
        drop((owner, relay));
        db.cleanup().await;
    }
}

/// TLS to Postgres: with `sslmode=require` and the local CA as `sslrootcert`, both the relay's
/// ordinary connections and its replication stream are encrypted and the server verified; a
/// server the client cannot verify is refused.
#[tokio::test]
async fn the_relay_talks_tls_to_postgres_when_the_url_asks() {
    let db = TestDb::create(Source::Rest).await;
    let tls = |dsn: String| {
        test_support::url_with(
            &dsn,
            &format!(
                "sslmode=require&sslrootcert={}",
                test_support::stack().pg_ca
            ),
        )
    };
    let url: platform::db::PgUrl = tls(db.relay_dsn()).parse().unwrap();
    let client = platform::db::connect(&url).await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the connection is encrypted");

    // Without the local CA, the server's certificate does not verify: no connection, and no
    // silent fallback to plaintext.
    let unverified: platform::db::PgUrl =
        test_support::url_with(&db.relay_dsn(), "sslmode=require")
            .parse()
            .unwrap();
    let err = platform::db::connect(&unverified).await.unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");

    // The relay's replication stream over TLS.
    let tag = test_support::unique("t");
    let relay = test_support::service::Service::spawn(
        env!("CARGO_BIN_EXE_cdc-relay"),
        &[
            ("DATABASE_URL", tls(db.relay_dsn())),
            ("RELAY_SOURCES", db.name.clone()),
            ("RELAY_TOPIC_PREFIX", format!("{tag}.")),
            ("RELAY_CHECKPOINT_TOPIC", format!("{tag}.checkpoints")),
            ("KAFKA_BROKERS", test_support::stack().kafka_brokers.clone()),
            (
                "SCHEMA_REGISTRY_URL",
                test_support::stack().schema_registry_url.clone(),
            ),
        ],
    );
    let mut relay = relay;
    relay
        .wait_for("/ready", 200, std::time::Duration::from_secs(60))
        .await;
    let slot = format!("kafkify_{}", db.name);
    let admin = platform::db::connect(&test_support::stack().admin_url)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let walsender_ssl = loop {
        let row = admin
            .query_opt(
                "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid
                 WHERE r.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get::<_, bool>(0);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never streamed its slot"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(walsender_ssl, "the replication stream is encrypted");
    drop((relay, client, admin));
    test_support::delete_topics_with_prefix(&format!("{tag}.")).await;
    db.cleanup().await;
}
