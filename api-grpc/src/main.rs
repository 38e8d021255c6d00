//! api-grpc: the task service over gRPC, with health and reflection, plus ops over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use api_grpc::completions::{Completions, ConsumerMetrics};
use api_grpc::pb;
use api_grpc::service::{RpcMetrics, TaskService};
use platform::config::CommonArgs;
use platform::db::{Command, DatabaseArgs};
use platform::kafka::KafkaArgs;
use platform::registry::RegistryArgs;
use platform::service::Service;
use tonic_health::ServingStatus;

mod migrations {
    refinery::embed_migrations!("../sql/grpc");
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "api-grpc",
    version,
    about = "Kafkify's task service over gRPC; writes tasks and their outbox events."
)]
struct Config {
    #[command(subcommand)]
    command: Option<Command>,

    /// Address of the gRPC server.
    #[arg(long, env = "GRPC_ADDR", default_value = "0.0.0.0:9090")]
    grpc_addr: SocketAddr,

    /// Address of the /health, /ready and /metrics endpoints.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8090")]
    http_addr: SocketAddr,

    #[command(flatten)]
    db: DatabaseArgs,

    #[command(flatten)]
    auth: platform::auth::AuthArgs,

    #[command(flatten)]
    retention: platform::outbox::RetentionArgs,

    /// Largest gRPC request accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "GRPC_MAX_MESSAGE_BYTES", default_value_t = 1_048_576, value_parser = clap::value_parser!(u64).range(1024..=67_108_864))]
    grpc_max_message_bytes: u64,

    /// Prefix of the topic names (the completions topic is `<prefix>task.completed`).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,

    /// Consumer group of the task.completed consumer.
    #[arg(long, env = "COMPLETIONS_GROUP", default_value = "kafkify-api-grpc")]
    completions_group: String,

    #[command(flatten)]
    kafka: KafkaArgs,

    #[command(flatten)]
    registry: RegistryArgs,

    #[command(flatten)]
    common: CommonArgs,
}

/// The gRPC health service name of the task service.
const TASK_SERVICE: &str = api_grpc::service::SERVICE;

/// How often gRPC health follows the readiness checks.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = platform::config::load();
    let Some(mut svc) = Service::start(
        "api-grpc",
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
    // Migrations need no key; serving does.
    let keys = config.auth.keys_or_exit("the task service");
    let shutdown = svc.shutdown.clone();

    let registry = &mut svc.registry;
    let rpc_metrics = RpcMetrics::register(registry);
    let query_metrics = rpc_metrics.db.clone();
    let consumer_metrics = ConsumerMetrics::register(registry);
    let notifications = prometheus_client::metrics::counter::Counter::default();
    registry.register(
        "task_notifications",
        "Task-change NOTIFYs received by this replica's listener (WatchTask)",
        notifications.clone(),
    );
    let registry = Arc::new(std::mem::take(&mut svc.registry));
    let pool = svc.pool.clone();
    let readiness = svc
        .readiness()
        .check(
            "kafka",
            config.kafka.probe("api-grpc").map_err(anyhow::Error::msg)?,
        )
        .check("schema registry", config.registry.probe());

    let (changes, _) = tokio::sync::broadcast::channel(1024);
    let service = TaskService {
        pool: pool.clone(),
        metrics: rpc_metrics,
        changes: changes.clone(),
    };
    let completions = Arc::new(Completions {
        pool: pool.clone(),
        kafka: config.kafka.client_config("api-grpc"),
        topic: format!("{}task.completed", config.topic_prefix),
        group: config.completions_group.clone(),
        registry_url: config.registry.schema_registry_url.0.clone(),
        metrics: consumer_metrics,
        db: query_metrics,
    });
    svc.spawn(completions.run(shutdown.clone()));
    svc.spawn(api_grpc::service::listen(
        config.db.database_url.clone(),
        changes,
        notifications,
        shutdown.clone(),
    ));
    svc.housekeeping(
        config.retention.outbox_retention,
        vec![platform::outbox::OUTBOX],
    );

    let (reporter, health_service) = tonic_health::server::health_reporter();
    // v1 and v1alpha: grpcurl speaks v1, while Python's grpcio-reflection, older grpcurl, Postman
    // and Evans still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("cannot build the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("cannot build the reflection service (v1alpha)")?;

    // gRPC clients and load balancers see the same verdict as /ready.
    let health_loop = {
        let readiness = readiness.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_INTERVAL);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let (ok, _) = readiness.run().await;
                        let status = if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
                        reporter.set_service_status("", status).await;
                        reporter.set_service_status(TASK_SERVICE, status).await;
                    }
                }
            }
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
        })
    };

    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("GRPC_ADDR {}: cannot listen", config.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let grpc = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            api_grpc::service::oversized_is_resource_exhausted,
        ))
        .add_service(health_service)
        // Health and reflection stay open, as probes and tools need them; the task service
        // asks for a key before it reads a request.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            pb::task_service_server::TaskServiceServer::new(service)
                .max_decoding_message_size(config.grpc_max_message_bytes as usize)
                .max_encoding_message_size(config.grpc_max_message_bytes as usize),
            api_grpc::service::authenticate(keys),
        ))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small responses wait for delayed ACKs: ~40 ms per call.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );

    let router = platform::ops::router(registry, readiness);
    let (http_addr, ops) = platform::ops::bind(config.http_addr, router, shutdown).await?;
    tracing::info!(target: platform::ops::LISTENING, %grpc_addr, %http_addr, database = %config.db.database_url, "api-grpc listening");

    let (grpc, ops) = tokio::join!(grpc, ops);
    grpc.context("gRPC server failed")?;
    ops.context("ops server failed")?;
    let _ = health_loop.await;
    svc.finish().await;
    Ok(())
}
