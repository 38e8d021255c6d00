//! cdc-relay: logical replication from every source database's outbox to Kafka.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use cdc_relay::config::Config;
use cdc_relay::metrics::Metrics;
use cdc_relay::registry::SchemaCache;
use cdc_relay::relay::{self, RelayContext};
use platform::ops::Readiness;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = platform::config::load();
    if let Err(message) = config.validate() {
        platform::config::fail(message);
    }
    let telemetry = platform::telemetry::init(&config.common, "cdc-relay")
        .unwrap_or_else(|e| platform::config::fail(e));
    let shutdown = platform::shutdown::token();

    let mut registry = platform::metrics::registry("cdc-relay");
    let metrics = Metrics::register(&mut registry);
    let registry = Arc::new(registry);

    let prepared = Arc::new(AtomicBool::new(false));
    let prepare_error: Arc<Mutex<Option<String>>> = Arc::default();
    let health = Arc::new(cdc_relay::health::Health::default());
    let mut readiness = Readiness::new();
    for source in &config.sources {
        let url = config.source_url(source);
        let publication = config.publication.0.clone();
        let slot = config.slot(source);
        let health = health.clone();
        let name = source.0.clone();
        readiness = readiness.detail(format!("source {}", source.0), {
            let (health, name) = (health.clone(), source.0.clone());
            move || {
                let server = health.server(&name);
                async move { server }
            }
        });
        readiness = readiness.check(format!("source {}", source.0), move || {
            let url = url.clone();
            let publication = publication.clone();
            let slot = slot.clone();
            let stalled = health.stalled(&name);
            async move {
                match stalled {
                    Some(stall) => Err(format!("slot {slot} {stall}")),
                    None => check_source(&url, &publication, &slot).await,
                }
            }
        });
    }
    let readiness = readiness
        .check(
            "kafka",
            config
                .kafka
                .probe("cdc-relay")
                .map_err(anyhow::Error::msg)?,
        )
        .check("schema registry", config.registry.probe())
        .check("topics and schemas", {
            let prepared = prepared.clone();
            let prepare_error = prepare_error.clone();
            move || {
                let ok = prepared.load(Ordering::Relaxed);
                let error = prepare_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                async move {
                    match (ok, error) {
                        (true, _) => Ok(()),
                        (false, Some(e)) => Err(e),
                        (false, None) => Err("not yet created/registered".to_string()),
                    }
                }
            }
        });

    let router = platform::ops::router(registry, readiness);
    let (addr, server) = platform::ops::bind(config.http_addr, router, shutdown.clone()).await?;
    let server = tokio::spawn(server);
    tracing::info!(
        target: platform::ops::LISTENING,
        http_addr = %addr,
        sources = ?config.sources.iter().map(|s| &s.0).collect::<Vec<_>>(),
        delivery = ?config.delivery,
        "cdc-relay listening"
    );

    let Some(schemas) = prepare(&config, &prepare_error, &shutdown).await else {
        server.await??;
        return Ok(());
    };
    prepared.store(true, Ordering::Relaxed);
    let ctx = Arc::new(RelayContext {
        config,
        schemas,
        metrics,
        health,
    });

    let mut tasks = Vec::new();
    for source in ctx.config.sources.clone() {
        ctx.metrics
            .init_source(&source.0, cdc_relay::error::SessionError::KINDS);
        tasks.push(tokio::spawn(relay::run_source(
            ctx.clone(),
            source,
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(relay::watch_slot_lag(
        ctx.clone(),
        shutdown.clone(),
    )));
    for t in tasks {
        t.await.context("a relay task panicked")?;
    }
    server.await?.context("ops server failed")?;
    tracing::info!("cdc-relay stopped");
    telemetry.shutdown();
    Ok(())
}

/// Creates the topics and registers the schemas, retrying until both succeed: until then the
/// relay reads nothing, so a refused (incompatible) schema holds events back instead of losing
/// them. `None` if asked to stop first.
async fn prepare(
    config: &Config,
    last_error: &Mutex<Option<String>>,
    shutdown: &CancellationToken,
) -> Option<SchemaCache> {
    let mut backoff = platform::retry::Backoff::session();
    loop {
        let attempt = async {
            let admin = config.kafka.admin("cdc-relay-admin")?;
            cdc_relay::topics::ensure(&admin, config).await?;
            SchemaCache::register_all(&config.registry.schema_registry_url.0, &config.topic_prefix)
                .await
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(schemas) => return Some(schemas),
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff.peek(), "cannot prepare topics and schemas");
                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
        if !backoff.wait(shutdown).await {
            return None;
        }
    }
}

/// A source is usable when the relay's role can log in to it and its publication exists.
async fn check_source(
    url: &platform::db::PgUrl,
    publication: &str,
    slot: &str,
) -> Result<(), String> {
    let client = platform::db::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1),
                    (SELECT confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots
                      WHERE slot_name = $2)",
            &[&publication, &slot],
        )
        .await
        .map_err(|e| platform::db::describe(&e))?;
    if !row.get::<_, bool>(0) {
        return Err(format!(
            "publication `{publication}` does not exist (run the migrations)"
        ));
    }
    cdc_relay::relay::check_publication(&client, publication)
        .await
        .map_err(|e| e.to_string())?;
    // Only what commits after the slot's consistent point is captured: until then, writes
    // would be missed. A slot being created is listed before it has one (confirmed_flush_lsn
    // is NULL while it waits for the transactions open at its creation to end).
    match row.get::<_, Option<bool>>(1) {
        None => Err(format!("replication slot `{slot}` does not exist yet")),
        Some(false) => Err(format!(
            "replication slot `{slot}` is being created: it waits for every transaction open \
             since before it to end (see pg_stat_activity); writes committed until then are \
             not captured"
        )),
        Some(true) => Ok(()),
    }
}
