//! worker: consumes the event topics and persists each event once.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use platform::config::CommonArgs;
use platform::db::{Command, DatabaseArgs};
use platform::kafka::KafkaArgs;
use platform::ops::Readiness;
use platform::registry::RegistryArgs;

mod migrations {
    refinery::embed_migrations!("../sql/worker");
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "worker",
    version,
    about = "Consumes Kafkify's event topics, persists every event once and completes tasks."
)]
struct Config {
    #[command(subcommand)]
    command: Option<Command>,

    /// Address of the /health, /ready and /metrics endpoints.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8092")]
    http_addr: SocketAddr,

    #[command(flatten)]
    db: DatabaseArgs,

    #[command(flatten)]
    kafka: KafkaArgs,

    #[command(flatten)]
    registry: RegistryArgs,

    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = platform::config::load();
    platform::telemetry::init(&config.common)?;
    if config.command == Some(Command::Migrate) {
        return platform::db::migrate_command(
            &config.db.database_url,
            migrations::migrations::runner(),
        )
        .await;
    }
    let shutdown = platform::shutdown::token();

    let registry = Arc::new(platform::metrics::registry("worker"));
    let pool = platform::db::pool(&config.db)?;
    let readiness = Readiness::new()
        .check("database", platform::db::probe(&pool))
        .check(
            "kafka",
            config.kafka.probe("worker").map_err(anyhow::Error::msg)?,
        )
        .check("schema registry", config.registry.probe());

    let router = platform::ops::router(registry, readiness);
    let (addr, server) = platform::ops::bind(config.http_addr, router, shutdown).await?;
    tracing::info!(%addr, database = %config.db.database_url, "worker listening");
    server.await.context("ops server failed")?;
    tracing::info!("worker stopped");
    Ok(())
}
