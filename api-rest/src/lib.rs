//! api-rest: the resources API over HTTP (actix-web), with its ops endpoints on the same port.
//! The binary is [`run`]; [`bind`] builds and binds the server alone (`HTTP_ADDR` with port 0
//! takes any free port and reports it), for tests and embedding.

mod error;
mod metrics;
mod model;
mod openapi;
mod routes;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use actix_web::dev::Service as _;
use actix_web::http::header::ContentType;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use anyhow::Context;
use platform::config::CommonArgs;
use platform::db::{Command, DatabaseArgs};
use platform::ops::Readiness;
use prometheus_client::registry::Registry;
use tracing::Instrument;

use crate::metrics::{Metrics, RequestLabels};
use crate::routes::AppState;

pub mod migrations {
    refinery::embed_migrations!("../sql/rest");
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "api-rest",
    version,
    about = "Kafkify's resources API over HTTP; writes resources and their outbox events."
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address of the HTTP server (API and ops endpoints).
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// HTTP worker threads; 0 means one per core.
    #[arg(long, env = "HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 65536, value_parser = clap::value_parser!(u64).range(64..=16_777_216))]
    pub max_body_bytes: u64,

    #[command(flatten)]
    pub auth: platform::auth::AuthArgs,

    #[command(flatten)]
    pub retention: platform::outbox::RetentionArgs,

    #[command(flatten)]
    pub db: DatabaseArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

struct Ops {
    registry: Registry,
    readiness: Readiness,
    metrics: Metrics,
    pool: deadpool_postgres::Pool,
}

/// The binary: [`platform::service::Service`]'s start (telemetry, then `migrate`), or the
/// server until SIGTERM (in-flight requests finish) with the outbox pruner beside it.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let Some(mut svc) = platform::service::Service::start(
        "api-rest",
        &config.common,
        &config.db,
        config.command,
        migrations::migrations::runner(),
    )
    .await?
    else {
        return Ok(());
    };
    // Migrations need no key; serving does.
    let keys = config.auth.keys_or_exit("the API");
    let registry = std::mem::take(&mut svc.registry);
    let (http_addr, server) = bind(&config, svc.pool.clone(), keys, registry)?;
    let handle = server.handle();
    actix_web::rt::spawn({
        let shutdown = svc.shutdown.clone();
        async move {
            shutdown.cancelled().await;
            // Graceful: stop accepting, let in-flight requests finish (up to SHUTDOWN_TIMEOUT).
            handle.stop(true).await;
        }
    });
    // Idempotency keys expire with the outbox rows of the requests they answered.
    svc.housekeeping(
        config.retention.outbox_retention,
        vec![
            platform::outbox::OUTBOX,
            platform::outbox::AgedTable {
                table: "idempotency_keys",
                key: "key",
            },
        ],
    );
    tracing::info!(target: platform::ops::LISTENING, %http_addr, database = %config.db.database_url, "api-rest listening");
    server.await.context("HTTP server failed")?;
    svc.finish().await;
    Ok(())
}

/// The API and ops server on `config.http_addr`, bound (port 0 takes any free port), with the
/// address it listens on. It runs when awaited, until its handle stops it.
pub fn bind(
    config: &Config,
    pool: deadpool_postgres::Pool,
    keys: platform::auth::ApiKeys,
    mut registry: Registry,
) -> anyhow::Result<(SocketAddr, actix_web::dev::Server)> {
    let metrics = Metrics::register(&mut registry);
    let ops = web::Data::from(Arc::new(Ops {
        registry,
        readiness: Readiness::new()
            .check("database", platform::db::probe(&pool))
            .detail("postgres", platform::db::server_detail(&pool)),
        metrics: metrics.clone(),
        pool: pool.clone(),
    }));
    let state = web::Data::new(AppState {
        pool: pool.clone(),
        metrics: metrics.clone(),
        max_body: config.max_body_bytes as usize,
    });
    let openapi = web::Data::new(openapi::json());

    let mut server = HttpServer::new(move || {
        let metrics = metrics.clone();
        let keys = keys.clone();
        App::new()
            .app_data(ops.clone())
            .app_data(state.clone())
            .app_data(openapi.clone())
            // Inside the metrics and tracing wrapper below, so refusals are counted and traced.
            // Only the API needs a key: probes, scrapes and the OpenAPI document stay open.
            .wrap_fn(move |req, srv| {
                let denied = if req.path().starts_with("/api/") {
                    keys.check(
                        req.headers()
                            .get(actix_web::http::header::AUTHORIZATION)
                            .map(|v| v.as_bytes()),
                    )
                    .err()
                } else {
                    None
                };
                let call = match denied {
                    None => Ok(srv.call(req)),
                    Some(why) => Err((req, why)),
                };
                async move {
                    match call {
                        Ok(fut) => fut.await.map(|res| res.map_into_left_body()),
                        Err((req, why)) => {
                            let resp = actix_web::ResponseError::error_response(
                                &error::ApiError::Unauthorized(why.to_string()),
                            );
                            Ok(req.into_response(resp).map_into_right_body())
                        }
                    }
                }
            })
            .wrap_fn(move |req, srv| {
                let started = Instant::now();
                let metrics = metrics.clone();
                let method = req.method().to_string();
                // The resource map knows the route pattern before routing has run.
                let route = req.match_pattern();
                // The server span (semantic conventions for HTTP): a child of the caller's
                // `traceparent`, named after the route.
                let span = tracing::info_span!(
                    target: platform::trace::TARGET,
                    "http",
                    otel.name = match &route {
                        Some(r) => format!("{method} {r}"),
                        None => method.clone(),
                    },
                    otel.kind = "server",
                    http.request.method = %method,
                    url.path = req.path(),
                    http.route = route.as_deref(),
                    http.response.status_code = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                );
                platform::trace::continue_from(
                    &span,
                    req.headers()
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok()),
                );
                metrics.in_flight.inc();
                let fut = span.in_scope(|| srv.call(req));
                async move {
                    let res = fut.instrument(span.clone()).await;
                    metrics.in_flight.dec();
                    if let Ok(res) = &res {
                        let route = res
                            .request()
                            .match_pattern()
                            .unwrap_or_else(|| "unmatched".into());
                        span.record(
                            "http.response.status_code",
                            i64::from(res.status().as_u16()),
                        );
                        if res.status().is_server_error() {
                            span.record("otel.status_code", "ERROR");
                        }
                        let labels = RequestLabels {
                            method,
                            route,
                            status: res.status().as_u16(),
                        };
                        metrics
                            .requests
                            .get_or_create(&labels)
                            .observe(started.elapsed().as_secs_f64());
                    }
                    res
                }
            })
            .service(
                web::resource("/api/v1/resources")
                    .route(web::post().to(routes::create))
                    .route(web::get().to(routes::list))
                    .route(web::head().to(routes::head_list))
                    .default_service(web::to(|req: HttpRequest| async move {
                        routes::method_not_allowed(&req, "GET, HEAD, POST")
                    })),
            )
            .service(
                web::resource("/api/v1/resources/{id}")
                    .route(web::get().to(routes::get))
                    .route(web::head().to(routes::head))
                    .route(web::put().to(routes::replace))
                    .route(web::delete().to(routes::delete))
                    .default_service(web::to(|req: HttpRequest| async move {
                        routes::method_not_allowed(&req, "GET, HEAD, PUT, DELETE")
                    })),
            )
            .route("/openapi.json", web::get().to(openapi_json))
            .route("/health", web::get().to(health))
            .route("/ready", web::get().to(ready))
            .route("/metrics", web::get().to(metrics_text))
            .default_service(web::to(routes::not_found))
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
    let http_addr = server
        .addrs()
        .first()
        .copied()
        .with_context(|| format!("HTTP_ADDR {}: bound to no address", config.http_addr))?;
    Ok((http_addr, server.run()))
}

async fn openapi_json(doc: web::Data<String>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(doc.get_ref().clone())
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

async fn metrics_text(ops: web::Data<Ops>) -> HttpResponse {
    ops.metrics.pool.sample(ops.pool.status());
    HttpResponse::Ok()
        .content_type(platform::metrics::CONTENT_TYPE)
        .body(platform::metrics::render(&ops.registry))
}
