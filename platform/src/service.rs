//! The skeleton every database-owning binary (api-rest, api-grpc, the worker) starts and stops
//! with, so that start-up order and shutdown cannot drift between them:
//!
//! 1. telemetry, first, so everything after it is logged and traced;
//! 2. `migrate`: apply the migrations and exit, before any other setting is needed;
//! 3. the SIGTERM/SIGINT token, the metrics registry, the pool and its metrics, the outbox
//!    pruner, and `/ready`'s database check;
//! 4. on the way out: background tasks finish (each watches the token), one "stopped" line,
//!    and the telemetry flushed last.
//!
//! What is particular to a service (its servers, consumers and other readiness checks) stays in
//! its own crate, between [`Service::start`] and [`Service::finish`].

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::Pool;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::CommonArgs;
use crate::db::{Command, DatabaseArgs, PoolMetrics};
use crate::ops::Readiness;
use crate::outbox::{AgedTable, Pruner};
use crate::telemetry::Telemetry;

pub struct Service {
    name: &'static str,
    /// Cancelled on SIGTERM or SIGINT: every server and background task watches it.
    pub shutdown: CancellationToken,
    /// The service's metrics (prefixed with its name); take it with `std::mem::take` to serve it.
    pub registry: Registry,
    pub pool: Pool,
    /// Until [`Service::housekeeping`] starts them.
    pruner: Option<Pruner>,
    pool_metrics: Option<PoolMetrics>,
    background: Vec<JoinHandle<()>>,
    telemetry: Telemetry,
}

impl Service {
    /// Telemetry, then `migrate` if that is the command (`Ok(None)`: the binary exits), else
    /// the shared parts of a serving process.
    pub async fn start(
        name: &'static str,
        common: &CommonArgs,
        db: &DatabaseArgs,
        command: Option<Command>,
        migrations: refinery::Runner,
    ) -> anyhow::Result<Option<Service>> {
        let telemetry =
            crate::telemetry::init(common, name).unwrap_or_else(|e| crate::config::fail(e));
        if command == Some(Command::Migrate) {
            crate::db::migrate_command(&db.database_url, migrations).await?;
            telemetry.shutdown();
            return Ok(None);
        }
        let shutdown = crate::shutdown::token();
        let mut registry = crate::metrics::registry(name);
        let pool_metrics = PoolMetrics::register(&mut registry);
        let pruner = Pruner::register(&mut registry);
        let pool = crate::db::pool(db)?;
        Ok(Some(Service {
            name,
            shutdown,
            registry,
            pool,
            pruner: Some(pruner),
            pool_metrics: Some(pool_metrics),
            background: Vec::new(),
            telemetry,
        }))
    }

    /// `/ready`'s checks, starting with the database's; a service adds its own.
    pub fn readiness(&self) -> Readiness {
        Readiness::new()
            .check("database", crate::db::probe(&self.pool))
            .detail("postgres", crate::db::server_detail(&self.pool))
    }

    /// Starts what every service runs beside its work: the outbox pruner over `tables` (rows
    /// older than `retention`) and the pool sampler.
    pub fn housekeeping(&mut self, retention: Duration, tables: Vec<AgedTable>) {
        if let Some(pruner) = self.pruner.take() {
            self.spawn(pruner.run(self.pool.clone(), retention, tables, self.shutdown.clone()));
        }
        if let Some(sampler) = self.pool_metrics.take() {
            self.spawn(sampler.sample_every(self.pool.clone(), self.shutdown.clone()));
        }
    }

    /// Runs `task` until it ends; [`Service::finish`] waits for it, so it must end once
    /// [`Service::shutdown`] is cancelled.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.background.push(tokio::spawn(task));
    }

    /// After the servers stopped: waits for the background tasks, says so, flushes telemetry.
    pub async fn finish(self) {
        self.shutdown.cancel();
        for task in self.background {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a background task panicked");
            }
        }
        tracing::info!("{} stopped", self.name);
        self.telemetry.shutdown();
    }
}
