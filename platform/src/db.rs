//! The Postgres side every database-owning service shares: the `DATABASE_URL` setting, a pool,
//! and versioned migrations run by refinery under an advisory lock.

use std::fmt;
use std::str::FromStr;

use std::path::PathBuf;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A parsed `postgres://` URL (or key=value string). `Display` hides the password so the
/// setting can be logged.
///
/// TLS: with `sslmode=require` the connection is encrypted and the server's certificate is
/// verified (chain and host name) against the public roots, plus the CA in `sslrootcert` if
/// the URL names one (libpq's parameter). Any other `sslmode` connects without TLS, so what a
/// connection does never depends on what the server happens to offer.
///
/// Several hosts (libpq's `postgres://u@h1:5432,h2:5432/db`) must come with
/// `target_session_attrs=read-write`: connections then go to whichever host is the primary,
/// before and after a failover, and never to a standby, which refuses writes. Each host gets
/// [`DEFAULT_CONNECT_TIMEOUT`] unless the URL sets `connect_timeout`, so a primary that is gone
/// without a trace (no refusal, just silence) delays a connection by that much, not by the
/// operating system's minutes, before the next host is tried.
#[derive(Clone)]
pub struct PgUrl {
    pub config: tokio_postgres::Config,
    /// The CA file of `sslrootcert`, for connections that verify the server (the relay's
    /// replication stream reads it too).
    pub root_cert: Option<PathBuf>,
    tls: Arc<rustls::ClientConfig>,
}

/// How long one connection attempt to one host may take, unless the URL says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl PgUrl {
    /// Every host of the URL with its port, in the URL's order (a Unix socket directory is
    /// given as its path).
    pub fn hosts(&self) -> Vec<(String, u16)> {
        let ports = self.config.get_ports();
        self.config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = match ports.len() {
                    0 => 5432,
                    1 => ports[0],
                    _ => ports.get(i).copied().unwrap_or(5432),
                };
                (host_name(h), port)
            })
            .collect()
    }

    /// The same user, database, password and TLS settings on one host: to reach a host whatever
    /// its role (the relay asks standbys whether its slots reached them).
    pub fn on_host(&self, host: &str, port: u16) -> PgUrl {
        let c = &self.config;
        let mut one = tokio_postgres::Config::new();
        one.host(host).port(port);
        if let Some(v) = c.get_user() {
            one.user(v);
        }
        if let Some(v) = c.get_password() {
            one.password(v);
        }
        if let Some(v) = c.get_dbname() {
            one.dbname(v);
        }
        if let Some(v) = c.get_options() {
            one.options(v);
        }
        if let Some(v) = c.get_application_name() {
            one.application_name(v);
        }
        if let Some(v) = c.get_connect_timeout() {
            one.connect_timeout(*v);
        }
        if let Some(v) = c.get_tcp_user_timeout() {
            one.tcp_user_timeout(*v);
        }
        one.ssl_mode(c.get_ssl_mode())
            .keepalives(c.get_keepalives())
            .keepalives_idle(c.get_keepalives_idle())
            .channel_binding(c.get_channel_binding());
        PgUrl {
            config: one,
            root_cert: self.root_cert.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Whether connections use TLS (`sslmode=require`).
    pub fn requires_tls(&self) -> bool {
        self.config.get_ssl_mode() == SslMode::Require
    }

    /// The same server, user and TLS settings, another database.
    pub fn with_dbname(&self, dbname: &str) -> PgUrl {
        let mut other = self.clone();
        other.config.dbname(dbname);
        other
    }

    /// The connector for this URL's connections.
    pub fn tls(&self) -> MakeRustlsConnect {
        MakeRustlsConnect::new((*self.tls).clone())
    }
}

/// Takes `sslrootcert` out of a URL or key=value string: tokio-postgres does not know it.
fn split_root_cert(s: &str) -> (String, Option<PathBuf>) {
    // The parameters without `sslrootcert`, and its value.
    fn take<'a>(params: impl Iterator<Item = &'a str>) -> (Vec<&'a str>, Option<PathBuf>) {
        let mut root = None;
        let kept = params
            .filter(|p| match p.strip_prefix("sslrootcert=") {
                Some(v) => {
                    root = Some(PathBuf::from(v));
                    false
                }
                None => true,
            })
            .collect();
        (kept, root)
    }
    if let Some((base, query)) = s.split_once('?') {
        let (kept, root) = take(query.split('&'));
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, root);
    }
    if s.contains("://") {
        return (s.to_string(), None);
    }
    let (kept, root) = take(s.split_whitespace());
    (kept.join(" "), root)
}

/// rustls with the public roots and, when given, the CA of `sslrootcert`.
fn client_tls(root_cert: Option<&PathBuf>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = root_cert {
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "sslrootcert {}: no certificate in it",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
        }
    }
    // ring, explicitly: more than one provider is compiled in, so there is no process default.
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

impl FromStr for PgUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (s, root_cert) = split_root_cert(s);
        let s = s.as_str();
        let mut config = tokio_postgres::Config::from_str(s).map_err(|e| {
            // tokio-postgres may echo the input, password included; say only what was wrong.
            let msg = e.to_string();
            if msg.contains(s) {
                "not a valid postgres:// URL".to_string()
            } else {
                format!("not a valid postgres:// URL: {msg}")
            }
        })?;
        if config.get_dbname().is_none() {
            return Err("the URL names no database".into());
        }
        if config.get_user().is_none() {
            return Err("the URL names no user".into());
        }
        let hosts = config.get_hosts().len();
        if hosts > 1 && config.get_target_session_attrs() != TargetSessionAttrs::ReadWrite {
            return Err(format!(
                "the URL names {hosts} hosts without target_session_attrs=read-write: a \
                 connection could land on a standby, which refuses writes (add \
                 ?target_session_attrs=read-write)"
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_ssl_mode() != SslMode::Require {
            if root_cert.is_some() {
                return Err("sslrootcert is given but sslmode is not require".into());
            }
            config.ssl_mode(SslMode::Disable);
        }
        let tls = Arc::new(client_tls(root_cert.as_ref())?);
        Ok(PgUrl {
            config,
            root_cert,
            tls,
        })
    }
}

fn host_name(h: &Host) -> String {
    match h {
        Host::Tcp(h) => h.clone(),
        #[cfg(unix)]
        Host::Unix(p) => p.display().to_string(),
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let hosts: Vec<String> = self
            .hosts()
            .into_iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        write!(
            f,
            "postgres://{}@{}/{}",
            c.get_user().unwrap_or_default(),
            hosts.join(","),
            c.get_dbname().unwrap_or_default()
        )
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The database settings of a service that owns one database.
#[derive(Clone, Debug, clap::Args)]
pub struct DatabaseArgs {
    /// The service's own database, e.g. postgres://kafkify_rest:…@127.0.0.1:5432/rest
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: PgUrl,

    /// Maximum connections in the pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub db_pool_size: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("cannot connect to {url}: {}", describe(source))]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("migration of {url} failed: {source}")]
    Migrate {
        url: String,
        #[source]
        source: refinery::Error,
    },
    #[error("database error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// tokio-postgres displays a server error as just "db error"; this adds the server's message,
/// SQLSTATE and detail, which is what an operator needs.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut out = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                out.push_str(": ");
                out.push_str(detail);
            }
            out
        }
        None => err.to_string(),
    }
}

/// A pool that checks connections cheaply on reuse. Connections open lazily, so building it
/// never blocks start-up; `/ready` tells whether the database answers.
pub fn pool(args: &DatabaseArgs) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        args.database_url.config.clone(),
        args.database_url.tls(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(args.db_pool_size as usize)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// A readiness check: a pooled connection answers `SELECT 1`.
pub async fn ping(pool: &Pool) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| describe(&e))?;
    Ok(())
}

/// Where a pooled connection landed: `primary 127.0.0.1:5433 (PostgreSQL 17.10)`, for
/// `/ready`'s details: with several hosts in `DATABASE_URL`, which one is the primary.
pub async fn server(pool: &Pool) -> Option<String> {
    let client = pool.get().await.ok()?;
    let row = client
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END,
                    coalesce(host(inet_server_addr()) || ':' || inet_server_port(), 'local socket'),
                    split_part(current_setting('server_version'), ' ', 1)",
            &[],
        )
        .await
        .ok()?;
    Some(format!(
        "{} {} (PostgreSQL {})",
        row.get::<_, String>(0),
        row.get::<_, String>(1),
        row.get::<_, String>(2)
    ))
}

/// [`server`] as a readiness detail for [`crate::ops::Readiness::detail`].
pub fn server_detail(pool: &Pool) -> impl Fn() -> crate::ops::DetailFuture + Send + Sync + 'static {
    let pool = pool.clone();
    move || {
        let pool = pool.clone();
        Box::pin(async move { server(&pool).await })
    }
}

/// [`ping`] as a readiness check for [`crate::ops::Readiness::check`].
pub fn probe(pool: &Pool) -> impl Fn() -> crate::ops::CheckFuture + Send + Sync + 'static {
    let pool = pool.clone();
    move || {
        let pool = pool.clone();
        Box::pin(async move { ping(&pool).await })
    }
}

/// Pool gauges: `db_pool_connections{state="in_use|idle|max"}` and `db_pool_waiting`.
#[derive(Clone, Default)]
pub struct PoolMetrics {
    connections: prometheus_client::metrics::family::Family<
        PoolState,
        prometheus_client::metrics::gauge::Gauge,
    >,
    waiting: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PoolState {
    state: &'static str,
}

impl PoolMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> PoolMetrics {
        let m = PoolMetrics::default();
        registry.register(
            "db_pool_connections",
            "Database pool connections by state",
            m.connections.clone(),
        );
        registry.register(
            "db_pool_waiting",
            "Requests waiting for a pooled connection",
            m.waiting.clone(),
        );
        m
    }

    pub fn sample(&self, status: deadpool_postgres::Status) {
        let in_use = status.size.saturating_sub(status.available);
        self.connections
            .get_or_create(&PoolState { state: "in_use" })
            .set(in_use as i64);
        self.connections
            .get_or_create(&PoolState { state: "idle" })
            .set(status.available as i64);
        self.connections
            .get_or_create(&PoolState { state: "max" })
            .set(status.max_size as i64);
        self.waiting.set(status.waiting as i64);
    }

    /// Samples `pool` every two seconds until `shutdown`, for services whose `/metrics` is served
    /// by [`crate::ops::router`].
    pub async fn sample_every(self, pool: Pool, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.sample(pool.status()),
            }
        }
    }
}

/// One direct connection, driven on a background task.
pub async fn connect(url: &PgUrl) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) =
        url.config
            .connect(url.tls())
            .await
            .map_err(|source| DbError::Connect {
                url: url.to_string(),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(%err, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Applies the embedded migrations. Replicas starting together take turns through an advisory
/// lock; versions already applied are skipped, so running it again changes nothing.
pub async fn migrate(url: &PgUrl, runner: refinery::Runner) -> Result<refinery::Report, DbError> {
    // Any constant works; it only has to be the same for every replica of every service.
    const LOCK: i64 = 0x006b_6166_6b69_6679;
    let mut client = connect(url).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await?;
    let result = runner.run_async(&mut client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await?;
    result.map_err(|source| DbError::Migrate {
        url: url.to_string(),
        source,
    })
}

/// The `migrate` subcommand of a database-owning service: applies its migrations, logs what
/// was applied, and returns.
pub async fn migrate_command(url: &PgUrl, runner: refinery::Runner) -> anyhow::Result<()> {
    let report = migrate(url, runner).await?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    if applied.is_empty() {
        tracing::info!(database = %url, "schema up to date, nothing to apply");
    } else {
        tracing::info!(database = %url, ?applied, "migrations applied");
    }
    Ok(())
}

/// Subcommands of the database-owning services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Apply the database migrations, then exit (idempotent).
    Migrate,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let url: PgUrl = "postgres://svc:s3cret@db.example:6543/rest"
            .parse()
            .unwrap();
        assert_eq!(url.to_string(), "postgres://svc@db.example:6543/rest");
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn several_hosts_need_read_write_and_are_all_named() {
        let err = "postgres://u:p@h1:5432,h2:5433/d"
            .parse::<PgUrl>()
            .unwrap_err();
        assert!(err.contains("target_session_attrs=read-write"), "{err}");
        let url: PgUrl = "postgres://u:p@h1:5432,h2:5433/d?target_session_attrs=read-write"
            .parse()
            .unwrap();
        assert_eq!(
            url.hosts(),
            vec![("h1".to_string(), 5432), ("h2".to_string(), 5433)]
        );
        assert_eq!(url.to_string(), "postgres://u@h1:5432,h2:5433/d");
        let one = url.on_host("h2", 5433);
        assert_eq!(one.to_string(), "postgres://u@h2:5433/d");
        assert_eq!(one.config.get_password(), Some(&b"p"[..]));
        assert_eq!(
            one.config.get_target_session_attrs(),
            TargetSessionAttrs::Any,
            "a single host, whatever its role"
        );
        // One port for every host, as libpq allows.
        let shared: PgUrl = "host=a,b port=6000 user=u dbname=d target_session_attrs=read-write"
            .parse()
            .unwrap();
        assert_eq!(
            shared.hosts(),
            vec![("a".to_string(), 6000), ("b".to_string(), 6000)]
        );
    }

    #[test]
    fn a_connection_attempt_is_bounded_unless_the_url_says_otherwise() {
        let url: PgUrl = "postgres://u@h/d".parse().unwrap();
        assert_eq!(
            url.config.get_connect_timeout(),
            Some(&DEFAULT_CONNECT_TIMEOUT)
        );
        let url: PgUrl = "postgres://u@h/d?connect_timeout=30".parse().unwrap();
        assert_eq!(
            url.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(30))
        );
    }

    #[test]
    fn incomplete_urls_are_refused() {
        assert!("postgres://svc@localhost"
            .parse::<PgUrl>()
            .unwrap_err()
            .contains("no database"));
        assert!("postgres://localhost/rest"
            .parse::<PgUrl>()
            .unwrap_err()
            .contains("no user"));
        let err = "postgres://u:topsecret@h:notaport/d"
            .parse::<PgUrl>()
            .unwrap_err();
        assert!(!err.contains("topsecret"), "{err}");
    }

    #[test]
    fn tls_exactly_when_sslmode_is_require() {
        let plain: PgUrl = "postgres://u:p@h/d".parse().unwrap();
        assert!(!plain.requires_tls());
        assert_eq!(
            plain.config.get_ssl_mode(),
            SslMode::Disable,
            "prefer means no TLS"
        );
        let tls: PgUrl = "postgres://u:p@h/d?sslmode=require".parse().unwrap();
        assert!(tls.requires_tls());
        assert_eq!(tls.root_cert, None);

        let dir = std::env::temp_dir().join(format!("kafkify-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let url = format!(
            "postgres://u:p@h/d?sslmode=require&sslrootcert={}",
            empty.display()
        );
        assert!(url.parse::<PgUrl>().unwrap_err().contains("sslrootcert"));
        let missing = "postgres://u:p@h/d?sslmode=require&sslrootcert=/nonexistent/ca.pem";
        assert!(missing
            .parse::<PgUrl>()
            .unwrap_err()
            .contains("/nonexistent/ca.pem"));
        let not_required = "postgres://u:p@h/d?sslrootcert=/x.pem";
        assert!(not_required
            .parse::<PgUrl>()
            .unwrap_err()
            .contains("sslmode"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn sslrootcert_is_taken_out_of_urls_and_key_value_strings() {
        assert_eq!(
            split_root_cert(
                "postgres://u@h/d?sslmode=require&sslrootcert=/ca.pem&connect_timeout=5"
            ),
            (
                "postgres://u@h/d?sslmode=require&connect_timeout=5".to_string(),
                Some(PathBuf::from("/ca.pem"))
            )
        );
        assert_eq!(
            split_root_cert("postgres://u@h/d?sslrootcert=/ca.pem"),
            (
                "postgres://u@h/d".to_string(),
                Some(PathBuf::from("/ca.pem"))
            )
        );
        assert_eq!(
            split_root_cert("host=h user=u dbname=d sslmode=require sslrootcert=/ca.pem"),
            (
                "host=h user=u dbname=d sslmode=require".to_string(),
                Some(PathBuf::from("/ca.pem"))
            )
        );
        assert_eq!(
            split_root_cert("postgres://u@h/d"),
            ("postgres://u@h/d".to_string(), None)
        );
    }
}

/// `db_transaction_duration_seconds{operation}`: the database work of one operation (a
/// transaction, or one query), pool wait included, so slow queries and a starved pool both
/// show.
#[derive(Clone)]
pub struct QueryMetrics {
    duration: prometheus_client::metrics::family::Family<
        QueryOperation,
        prometheus_client::metrics::histogram::Histogram,
    >,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct QueryOperation {
    operation: &'static str,
}

impl QueryMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> QueryMetrics {
        let m = QueryMetrics {
            duration: prometheus_client::metrics::family::Family::new_with_constructor(|| {
                prometheus_client::metrics::histogram::Histogram::new(
                    prometheus_client::metrics::histogram::exponential_buckets(0.00025, 2.0, 16),
                )
            }),
        };
        registry.register(
            "db_transaction_duration_seconds",
            "Database work per operation, pool wait included",
            m.duration.clone(),
        );
        m
    }

    pub fn observe(&self, operation: &'static str, took: std::time::Duration) {
        self.duration
            .get_or_create(&QueryOperation { operation })
            .observe(took.as_secs_f64());
    }

    /// Runs `work`, recording how long it took under `operation`.
    pub async fn time<T>(
        &self,
        operation: &'static str,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let started = std::time::Instant::now();
        let out = work.await;
        self.observe(operation, started.elapsed());
        out
    }
}
