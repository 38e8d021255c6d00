//! worker: consumes the event topics and persists each event once.

use std::net::SocketAddr;
use std::sync::Arc;

use worker::consume::{Metrics, Worker};

use anyhow::Context;
use platform::config::CommonArgs;
use platform::db::{Command, DatabaseArgs};
use platform::kafka::KafkaArgs;
use platform::registry::RegistryArgs;
use platform::service::Service;

/// The worker allocates and frees per record from many threads (its lanes, librdkafka's, the
/// spans of every record's trace); glibc's malloc spent a third of its CPU there, much of it
/// waiting on arena locks, during a backlog drain.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

    /// Prefix of the topic names (e.g. `<prefix>task.process`).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,

    /// Consumer group; replicas share it, up to one per partition.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "kafkify-worker")]
    consumer_group: String,

    /// Cost of a `checksum` task: SHA-256 rounds over its input (load tests dial this).
    #[arg(long, env = "TASK_ITERATIONS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    task_iterations: u32,

    /// How long the group waits for a silent member before giving its partitions to another
    /// (Kafka's default is 45 s: that long without processing after a crash).
    #[arg(long, env = "CONSUMER_SESSION_TIMEOUT", default_value = "10s", value_parser = platform::config::parse_duration)]
    consumer_session_timeout: std::time::Duration,

    /// Records one partition's lane may hold before fetching that partition pauses (it resumes
    /// at half); other partitions keep flowing.
    #[arg(long, env = "LANE_CAPACITY", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    lane_capacity: u64,

    /// Payload and key bytes one partition's lane may hold before fetching that partition
    /// pauses, whichever of this and LANE_CAPACITY comes first.
    #[arg(long, env = "LANE_MAX_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1024..=(1 << 32)))]
    lane_max_bytes: u64,

    /// The most records written in one database transaction; a lane writes whatever it holds up
    /// to this, so a lone record is never held back. 1,000 drained a backlog about a tenth
    /// faster than 500; more gained nothing (docs/ARCHITECTURE.md, "The worker").
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch_size: u64,

    #[command(flatten)]
    db: DatabaseArgs,

    #[command(flatten)]
    retention: platform::outbox::RetentionArgs,

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
    worker::decode::limit_avro_allocations();
    let Some(mut svc) = Service::start(
        "worker",
        &config.common,
        &config.db,
        config.command,
        migrations::migrations::runner(),
    )
    .await?
    else {
        return Ok(());
    };
    config
        .kafka
        .validate()
        .unwrap_or_else(|e| platform::config::fail(e));
    let metrics = Metrics::register(&mut svc.registry);
    let registry = Arc::new(std::mem::take(&mut svc.registry));
    let pool = svc.pool.clone();
    let readiness = svc
        .readiness()
        .check(
            "kafka",
            config.kafka.probe("worker").map_err(anyhow::Error::msg)?,
        )
        .check("schema registry", config.registry.probe());

    let worker = Arc::new(Worker {
        pool: pool.clone(),
        kafka: config.kafka.client_config("worker"),
        session_timeout: config.consumer_session_timeout,
        group: config.consumer_group.clone(),
        topic_prefix: config.topic_prefix.clone(),
        registry_url: config.registry.schema_registry_url.0.clone(),
        task_iterations: config.task_iterations,
        lane_limit: worker::flow::Load {
            records: config.lane_capacity as usize,
            bytes: config.lane_max_bytes as usize,
        },
        batch_size: config.batch_size as usize,
        metrics,
    });
    let router = platform::ops::router(registry, readiness);
    let (addr, server) =
        platform::ops::bind(config.http_addr, router, svc.shutdown.clone()).await?;
    tracing::info!(target: platform::ops::LISTENING, http_addr = %addr, database = %config.db.database_url, group = %config.consumer_group, "worker listening");
    let consumer = tokio::spawn(worker.run(svc.shutdown.clone()));
    svc.housekeeping(
        config.retention.outbox_retention,
        vec![platform::outbox::OUTBOX],
    );
    server.await.context("ops server failed")?;
    consumer.await.context("the consumer panicked")?;
    svc.finish().await;
    Ok(())
}
