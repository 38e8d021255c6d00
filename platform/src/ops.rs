//! `/health`, `/ready` and `/metrics`: the endpoints Kubernetes probes and Prometheus scrape.
//!
//! `/health` says only that the process answers (restarting it would not help a dependency
//! outage); `/ready` runs the service's dependency checks so traffic is withheld while they fail.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// What a readiness check returns: `Ok` or why the dependency is not usable.
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;
/// What a detail returns: a fact worth showing beside the checks (which Postgres host is the
/// primary), or `None` when there is nothing to say.
pub type DetailFuture = Pin<Box<dyn Future<Output = Option<String>> + Send>>;
type DetailFn = Arc<dyn Fn() -> DetailFuture + Send + Sync>;

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The named dependency checks behind `/ready`.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(String, CheckFn)>,
    details: Vec<(String, DetailFn)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check; it passes when the future yields `Ok(())` within two seconds.
    pub fn check<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name.into(), Arc::new(move || Box::pin(f()))));
        self
    }

    /// Adds a detail: shown under `details` when it has something to say, never a reason to be
    /// unready (a check says that).
    pub fn detail<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<String>> + Send + 'static,
    {
        self.details
            .push((name.into(), Arc::new(move || Box::pin(f()))));
        self
    }

    /// Runs every check at once. Returns whether all passed and a JSON body naming each result
    /// (and the details that had something to say).
    pub async fn run(&self) -> (bool, String) {
        let details = futures_join_all(self.details.iter().map(|(name, f)| {
            let (name, fut) = (name.clone(), f());
            async move {
                (
                    name,
                    tokio::time::timeout(CHECK_TIMEOUT, fut)
                        .await
                        .ok()
                        .flatten(),
                )
            }
        }));
        let checks = futures_join_all(self.checks.iter().map(|(name, f)| {
            let (name, fut) = (name.clone(), f());
            async move {
                let outcome = match tokio::time::timeout(CHECK_TIMEOUT, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                };
                (name, outcome)
            }
        }));
        let (results, details) = tokio::join!(checks, details);
        let ok = results.iter().all(|(_, r)| r.is_ok());
        let checks: serde_json::Map<String, serde_json::Value> = results
            .into_iter()
            .map(|(name, r)| (name, r.err().unwrap_or_else(|| "ok".into()).into()))
            .collect();
        let status = if ok { "ready" } else { "not ready" };
        let mut body = serde_json::json!({ "status": status, "checks": checks });
        let details: serde_json::Map<String, serde_json::Value> = details
            .into_iter()
            .filter_map(|(name, d)| d.map(|d| (name, d.into())))
            .collect();
        if !details.is_empty() {
            body["details"] = details.into();
        }
        (ok, body.to_string())
    }
}

// A tiny join_all keeps `futures` out of the dependency list of every binary.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

#[derive(Clone)]
struct OpsState {
    registry: Arc<Registry>,
    readiness: Readiness,
}

/// The target of the one line each binary logs once it listens (its addresses): tools and
/// tests read the addresses from it, so a quieter `LOG_LEVEL` can keep it with
/// `warn,kafkify::listening=info`.
pub const LISTENING: &str = "kafkify::listening";

/// The ops routes, for services that serve nothing else on their HTTP port.
pub fn router(registry: Arc<Registry>, readiness: Readiness) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(OpsState {
            registry,
            readiness,
        })
}

async fn health() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}",
    )
}

async fn ready(State(state): State<OpsState>) -> Response {
    let (ok, body) = state.readiness.run().await;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&state.registry),
    )
}

/// Binds the ops port now (so a taken port fails start-up with its address) and returns the
/// server future, which stops when `shutdown` is cancelled.
pub async fn bind(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("HTTP_ADDR {addr}: cannot listen: {e}"))?;
    let local = listener.local_addr()?;
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .into_future();
    Ok((local, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_reports_each_check() {
        let r = Readiness::new()
            .check("database", || async { Ok(()) })
            .check("kafka", || async { Err("broker \"down\"".to_string()) });
        let (ok, body) = r.run().await;
        assert!(!ok);
        assert_eq!(
            body,
            r#"{"checks":{"database":"ok","kafka":"broker \"down\""},"status":"not ready"}"#
        );
    }

    #[tokio::test]
    async fn details_are_shown_and_never_decide() {
        let r = Readiness::new()
            .check("database", || async { Ok(()) })
            .detail("postgres", || async {
                Some("primary 10.0.0.2:5432".to_string())
            })
            .detail("nothing", || async { None });
        let (ok, body) = r.run().await;
        assert!(ok);
        assert_eq!(
            body,
            r#"{"checks":{"database":"ok"},"details":{"postgres":"primary 10.0.0.2:5432"},"status":"ready"}"#
        );
    }

    #[tokio::test]
    async fn no_checks_means_ready() {
        let (ok, body) = Readiness::new().run().await;
        assert!(ok);
        assert_eq!(body, r#"{"checks":{},"status":"ready"}"#);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_check_fails_after_the_timeout() {
        let r = Readiness::new().check("slow", || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        });
        let (ok, body) = r.run().await;
        assert!(!ok);
        assert!(body.contains("no answer within 2s"), "{body}");
    }
}
