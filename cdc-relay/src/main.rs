//! cdc-relay: logical replication from every source database's outbox to Kafka.

mod config;

use std::sync::Arc;

use anyhow::Context;
use platform::ops::Readiness;

use crate::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = platform::config::load();
    if let Err(message) = config.validate() {
        platform::config::fail(message);
    }
    platform::telemetry::init(&config.common)?;
    let shutdown = platform::shutdown::token();

    let registry = Arc::new(platform::metrics::registry("cdc-relay"));
    let mut readiness = Readiness::new();
    for source in &config.sources {
        let url = config.source_url(source);
        let publication = config.publication.0.clone();
        readiness = readiness.check(format!("source {}", source.0), move || {
            let url = url.clone();
            let publication = publication.clone();
            async move { check_source(&url, &publication).await }
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
        .check("schema registry", config.registry.probe());

    let router = platform::ops::router(registry, readiness);
    let (addr, server) = platform::ops::bind(config.http_addr, router, shutdown.clone()).await?;
    tracing::info!(
        %addr,
        sources = ?config.sources.iter().map(|s| &s.0).collect::<Vec<_>>(),
        delivery = ?config.delivery,
        "cdc-relay listening"
    );
    server.await.context("ops server failed")?;
    tracing::info!("cdc-relay stopped");
    Ok(())
}

/// A source is usable when the relay's role can log in to it and its publication exists.
async fn check_source(url: &platform::db::PgUrl, publication: &str) -> Result<(), String> {
    let client = platform::db::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| e.to_string())?;
    match row {
        Some(_) => Ok(()),
        None => Err(format!(
            "publication `{publication}` does not exist (run the migrations)"
        )),
    }
}
