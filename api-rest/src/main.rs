//! api-rest: the resources API over HTTP (actix-web), with its ops endpoints on the same port.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::http::header::ContentType;
use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use platform::config::CommonArgs;
use platform::db::{Command, DatabaseArgs};
use platform::ops::Readiness;
use prometheus_client::registry::Registry;

mod migrations {
    refinery::embed_migrations!("../sql/rest");
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "api-rest",
    version,
    about = "Kafkify's resources API over HTTP; writes resources and their outbox events."
)]
struct Config {
    #[command(subcommand)]
    command: Option<Command>,

    /// Address of the HTTP server (API and ops endpoints).
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,

    /// HTTP worker threads; 0 means one per core.
    #[arg(long, env = "HTTP_WORKERS", default_value_t = 0)]
    http_workers: usize,

    #[command(flatten)]
    db: DatabaseArgs,

    #[command(flatten)]
    common: CommonArgs,
}

struct Ops {
    registry: Registry,
    readiness: Readiness,
}

#[actix_web::main]
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

    let pool = platform::db::pool(&config.db)?;
    let ops = web::Data::from(Arc::new(Ops {
        registry: platform::metrics::registry("api-rest"),
        readiness: Readiness::new().check("database", platform::db::probe(&pool)),
    }));

    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(ops.clone())
            .route("/health", web::get().to(health))
            .route("/ready", web::get().to(ready))
            .route("/metrics", web::get().to(metrics))
    })
    // Our own token decides when to stop, so SIGTERM handling is the same in every binary.
    .disable_signals()
    .shutdown_timeout(config.common.shutdown_timeout.as_secs());
    if config.http_workers > 0 {
        server = server.workers(config.http_workers);
    }
    let server = server
        .bind(config.http_addr)
        .with_context(|| format!("HTTP_ADDR {}: cannot listen", config.http_addr))?;
    let addr = server.addrs().first().copied();
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        shutdown.cancelled().await;
        handle.stop(true).await;
    });
    tracing::info!(addr = ?addr, database = %config.db.database_url, "api-rest listening");
    server.await.context("HTTP server failed")?;
    tracing::info!("api-rest stopped");
    Ok(())
}

async fn health() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(r#"{"status":"ok"}"#)
}

async fn ready(ops: web::Data<Ops>) -> HttpResponse {
    let (ok, body) = ops.readiness.run().await;
    let mut resp = if ok {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    resp.content_type(ContentType::json()).body(body)
}

async fn metrics(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(platform::metrics::CONTENT_TYPE)
        .body(platform::metrics::render(&ops.registry))
}
