//! Connects integration tests to the running local stack (`./kafkify up --infra`) and gives each
//! test its own databases, topics and consumer groups, so tests run in parallel without
//! interfering and leave nothing behind that the next run could trip over.
//!
//! Endpoints come from the environment (`./kafkify test` exports them) or, when a test is run
//! straight from `cargo test`, from `.kafkify/stack.env` in the workspace.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use platform::db::PgUrl;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use uuid::Uuid;

pub mod bench;
pub mod private_pg;
pub mod rng;
pub mod service;

mod migrations {
    pub mod rest {
        refinery::embed_migrations!("../sql/rest");
    }
    pub mod grpc {
        refinery::embed_migrations!("../sql/grpc");
    }
    pub mod worker {
        refinery::embed_migrations!("../sql/worker");
    }
}

/// Where the stack is.
#[derive(Clone, Debug)]
pub struct Stack {
    /// Superuser connection to the `postgres` database.
    pub admin_url: PgUrl,
    pub pg_port: u16,
    /// Every Postgres node (`KAFKIFY_PG_HOSTS`, host:port, comma-separated): one, or a primary
    /// and its standby, in which case services get libpq's multi-host URL.
    pub pg_hosts: String,
    pub kafka_brokers: String,
    pub schema_registry_url: String,
    /// OTLP/HTTP endpoint of the local Jaeger.
    pub otlp_endpoint: String,
    /// The CA of the local Postgres's TLS certificate.
    pub pg_ca: String,
    /// Jaeger's query API.
    pub jaeger_url: String,
    passwords: HashMap<String, String>,
}

fn stack_env_file() -> HashMap<String, String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../.kafkify/stack.env");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A setting of the local stack: the environment first, then `.kafkify/stack.env`.
pub fn stack_setting(key: &str) -> String {
    static FILE: OnceLock<HashMap<String, String>> = OnceLock::new();
    std::env::var(key)
        .ok()
        .or_else(|| FILE.get_or_init(stack_env_file).get(key).cloned())
        .unwrap_or_else(|| {
            panic!("{key} is not set and .kafkify/stack.env has no value: start the stack with `./kafkify up --infra`")
        })
}

/// The stack every test of this process shares.
pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let get = stack_setting;
        let admin_url: PgUrl = get("KAFKIFY_PG_ADMIN_URL")
            .parse()
            .expect("KAFKIFY_PG_ADMIN_URL");
        let passwords = get("KAFKIFY_PG_PASSWORDS")
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let pg_port: u16 = get("KAFKIFY_PG_PORT").parse().expect("KAFKIFY_PG_PORT");
        Stack {
            pg_port,
            // The hosts go with the port: a port set in the environment without hosts means
            // that one node, not the hosts of the stack file.
            pg_hosts: match (
                std::env::var("KAFKIFY_PG_HOSTS"),
                std::env::var("KAFKIFY_PG_PORT"),
            ) {
                (Ok(hosts), _) => hosts,
                (Err(_), Ok(_)) => format!("127.0.0.1:{pg_port}"),
                (Err(_), Err(_)) => stack_env_file()
                    .get("KAFKIFY_PG_HOSTS")
                    .cloned()
                    .unwrap_or_else(|| format!("127.0.0.1:{pg_port}")),
            },
            admin_url,
            kafka_brokers: get("KAFKA_BROKERS"),
            schema_registry_url: get("SCHEMA_REGISTRY_URL"),
            otlp_endpoint: get("KAFKIFY_OTLP_ENDPOINT"),
            pg_ca: get("KAFKIFY_PG_CA"),
            jaeger_url: get("KAFKIFY_JAEGER_URL"),
            passwords,
        }
    })
}

/// The local broker's TLS listeners, as a service's Kafka settings (`KAFKA_BROKERS`,
/// `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SSL_*`, `KAFKA_SASL_*`).
pub mod kafka_tls {
    use super::stack_setting;

    /// Mutual TLS: the broker verifies the client's certificate.
    pub fn mutual() -> Vec<(&'static str, String)> {
        vec![
            ("KAFKA_BROKERS", stack_setting("KAFKIFY_KAFKA_SSL_BROKERS")),
            ("KAFKA_SECURITY_PROTOCOL", "ssl".into()),
            ("KAFKA_SSL_CA_LOCATION", stack_setting("KAFKIFY_KAFKA_CA")),
            (
                "KAFKA_SSL_CERTIFICATE_LOCATION",
                stack_setting("KAFKIFY_KAFKA_CLIENT_CERT"),
            ),
            (
                "KAFKA_SSL_KEY_LOCATION",
                stack_setting("KAFKIFY_KAFKA_CLIENT_KEY"),
            ),
        ]
    }

    /// SASL PLAIN over TLS.
    pub fn sasl() -> Vec<(&'static str, String)> {
        vec![
            ("KAFKA_BROKERS", stack_setting("KAFKIFY_KAFKA_SASL_BROKERS")),
            ("KAFKA_SECURITY_PROTOCOL", "sasl-ssl".into()),
            ("KAFKA_SSL_CA_LOCATION", stack_setting("KAFKIFY_KAFKA_CA")),
            ("KAFKA_SASL_MECHANISM", "PLAIN".into()),
            (
                "KAFKA_SASL_USERNAME",
                stack_setting("KAFKIFY_KAFKA_SASL_USER"),
            ),
            (
                "KAFKA_SASL_PASSWORD",
                stack_setting("KAFKIFY_KAFKA_SASL_PASSWORD"),
            ),
        ]
    }
}

impl Stack {
    /// The local password of a service role (`rest`, `grpc`, `worker`, `relay`).
    pub fn password(&self, role: &str) -> &str {
        self.passwords
            .get(role)
            .map(String::as_str)
            .unwrap_or_else(|| {
                panic!("no password for role kafkify_{role} in KAFKIFY_PG_PASSWORDS")
            })
    }

    /// A URL for `kafkify_<role>` on `database`, as a service's `DATABASE_URL` would be: with
    /// a standby, every node and `target_session_attrs=read-write`, so it follows the primary.
    pub fn dsn(&self, role: &str, database: &str) -> String {
        let url = format!(
            "postgres://kafkify_{role}:{}@{}/{database}",
            self.password(role),
            self.pg_hosts
        );
        if self.pg_hosts.contains(',') {
            url_with(&url, "target_session_attrs=read-write")
        } else {
            url
        }
    }

    /// [`Stack::dsn`], parsed.
    pub fn url(&self, role: &str, database: &str) -> PgUrl {
        self.dsn(role, database).parse().expect("a valid URL")
    }

    /// A superuser connection to `postgres`, with a message that says what to do when the stack
    /// is down.
    pub async fn admin(&self) -> tokio_postgres::Client {
        platform::db::connect(&self.admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("Postgres of the local stack: {e}; start it with `./kafkify up --infra`")
            })
    }

    /// Client settings for the stack's Kafka.
    pub fn kafka_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.kafka_brokers);
        c
    }

    pub fn kafka_admin(&self) -> AdminClient<DefaultClientContext> {
        self.kafka_config().create().expect("Kafka admin client")
    }
}

/// `url` with more query parameters (`a=1&b=2`), whether or not it has some already.
pub fn url_with(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

/// A short random suffix for names that must not collide between tests or runs.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Which service's schema a test database gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Rest,
    Grpc,
    Worker,
}

impl Source {
    /// The role suffix (`kafkify_<role>` owns the database).
    pub fn role(self) -> &'static str {
        match self {
            Source::Rest => "rest",
            Source::Grpc => "grpc",
            Source::Worker => "worker",
        }
    }

    /// The embedded migrations of this source's database.
    pub fn runner(self) -> refinery::Runner {
        match self {
            Source::Rest => migrations::rest::migrations::runner(),
            Source::Grpc => migrations::grpc::migrations::runner(),
            Source::Worker => migrations::worker::migrations::runner(),
        }
    }
}

/// A fresh database of one source, migrated as its owner, exactly as `./kafkify up` sets up the
/// real one. Test databases are named `t_…`; `./kafkify test` sweeps any that a killed run left.
pub struct TestDb {
    pub name: String,
    pub source: Source,
}

impl TestDb {
    pub async fn create(source: Source) -> TestDb {
        let db = TestDb::create_empty(source).await;
        platform::db::migrate(&db.owner_url(), source.runner())
            .await
            .unwrap_or_else(|e| panic!("migrating test database {}: {e}", db.name));
        db
    }

    /// A database with its owner and grants but no migrations applied.
    pub async fn create_empty(source: Source) -> TestDb {
        let stack = stack();
        let name = unique(&format!("t_{}", source.role()));
        let owner = format!("kafkify_{}", source.role());
        let admin = stack.admin().await;
        // One statement per call: CREATE DATABASE refuses to run inside the implicit
        // transaction of a multi-statement query.
        for sql in [
            format!("CREATE DATABASE {name} OWNER {owner}"),
            format!("REVOKE ALL ON DATABASE {name} FROM PUBLIC"),
            format!("GRANT CONNECT ON DATABASE {name} TO {owner}, kafkify_relay"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {}", platform::db::describe(&e)));
        }
        TestDb { name, source }
    }

    /// The owning service's connection.
    pub fn owner_url(&self) -> PgUrl {
        stack().url(self.source.role(), &self.name)
    }

    /// The owning service's `DATABASE_URL`.
    pub fn owner_dsn(&self) -> String {
        stack().dsn(self.source.role(), &self.name)
    }

    /// The relay's connection.
    pub fn relay_url(&self) -> PgUrl {
        stack().url("relay", &self.name)
    }

    /// The relay's `DATABASE_URL` for this database.
    pub fn relay_dsn(&self) -> String {
        stack().dsn("relay", &self.name)
    }

    pub async fn owner(&self) -> tokio_postgres::Client {
        platform::db::connect(&self.owner_url())
            .await
            .expect("owner connection")
    }

    /// Rows in `table` (a name the test controls).
    pub async fn count(&self, table: &str) -> i64 {
        self.owner()
            .await
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("counting {table}: {}", platform::db::describe(&e)))
            .get(0)
    }

    /// Drops the database and any replication slot on it. Call it at the end of the test; a
    /// slot left behind would pin WAL.
    pub async fn cleanup(self) {
        let admin = stack().admin().await;
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                 WHERE database = $1 AND active_pid IS NOT NULL",
                &[&self.name],
            )
            .await;
        // A terminated walsender releases its slot a moment later.
        for _ in 0..50 {
            let r = admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                     WHERE database = $1",
                    &[&self.name],
                )
                .await;
            if r.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_for_standbys_to_drop_slots(&self.name).await;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "dropping test database {}: {}",
                    self.name,
                    platform::db::describe(&e)
                )
            });
    }
}

/// With a standby (PostgreSQL 17, `sync_replication_slots`), waits until it has dropped its
/// copies of the slots on `database`, which the primary no longer has. A standby of
/// PostgreSQL 17.10 that replays `DROP DATABASE` while its slot sync worker holds a slot of that
/// database stops ("replication slot … is active for PID"), and with it every synchronous
/// commit of the primary: seen here when a test dropped its database right after its slot.
async fn wait_for_standbys_to_drop_slots(database: &str) {
    let stack = stack();
    if !stack.pg_hosts.contains(',') {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for (host, port) in stack.admin_url.hosts() {
        let Ok(client) = platform::db::connect(&stack.admin_url.on_host(&host, port)).await else {
            continue;
        };
        // Twice in a row with none: a sync cycle that read the primary's slots just before the
        // drop could otherwise still make one.
        let mut clear = 0;
        while clear < 2 && std::time::Instant::now() < deadline {
            let left: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots
                      WHERE database = $1 AND pg_is_in_recovery()",
                    &[&database],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            clear = if left == 0 { clear + 1 } else { 0 };
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Creates topics with unique names (`<prefix>.<random>`), `partitions` each; returns the names.
pub async fn create_topics(prefixes: &[&str], partitions: i32) -> Vec<String> {
    let names: Vec<String> = prefixes
        .iter()
        .map(|p| format!("{p}.{}", &Uuid::new_v4().simple().to_string()[..12]))
        .collect();
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = stack()
        .kafka_admin()
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap_or_else(|e| {
            panic!("Kafka of the local stack: {e}; start it with `./kafkify up --infra`")
        });
    for r in results {
        r.unwrap_or_else(|(topic, e)| panic!("creating topic {topic}: {e}"));
    }
    names
}

/// Deletes topics a test created.
pub async fn delete_topics(names: &[String]) {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = stack()
        .kafka_admin()
        .delete_topics(&names, &AdminOptions::new())
        .await;
}

/// Deletes every topic whose name starts with `prefix` (a test's or benchmark's namespace).
pub async fn delete_topics_with_prefix(prefix: &str) {
    let admin = stack().kafka_admin();
    let Ok(md) = admin.inner().fetch_metadata(None, Duration::from_secs(5)) else {
        return;
    };
    let ours: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|t| t.starts_with(prefix))
        .collect();
    delete_topics(&ours).await;
}

/// The settings of a relay (or of kafkifyctl, which reads the same) streaming `db` alone into
/// its own topic namespace `prefix` and checkpoint topic, with 3 partitions per event topic.
pub fn relay_env(db: &TestDb, prefix: &str, checkpoint_topic: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.relay_dsn()),
        ("RELAY_SOURCES", db.name.clone()),
        ("RELAY_TOPIC_PREFIX", prefix.to_string()),
        ("RELAY_CHECKPOINT_TOPIC", checkpoint_topic.to_string()),
        ("RELAY_TOPIC_PARTITIONS", "3".into()),
        ("KAFKA_BROKERS", stack().kafka_brokers.clone()),
        ("SCHEMA_REGISTRY_URL", stack().schema_registry_url.clone()),
    ]
}

/// A consumer group id no other test uses.
pub fn consumer_group(prefix: &str) -> String {
    unique(&format!("test-{prefix}"))
}

/// Asserts that `stored` (an outbox row's `traceparent`) continues the caller's `parent`: the
/// same trace, a span of the service's own (the child it created), sampled like the parent.
pub fn assert_child_traceparent(stored: Option<&str>, parent: &str) {
    let stored = stored.unwrap_or_else(|| panic!("no traceparent stored; caller sent {parent}"));
    let s: Vec<&str> = stored.split('-').collect();
    let p: Vec<&str> = parent.split('-').collect();
    assert_eq!(s.len(), 4, "{stored}");
    assert_eq!(
        (s[0], s[1], s[3]),
        (p[0], p[1], p[3]),
        "{stored} vs {parent}"
    );
    assert_eq!(s[2].len(), 16, "{stored}");
    assert_ne!(
        s[2], p[2],
        "the service's own span, not the caller's: {stored}"
    );
}

/// The API key of every api-rest and api-grpc a test starts ([`service::Service::spawn`] sets
/// `API_KEYS` to it unless the test gives its own).
pub const API_KEY: &str = "kafkify-test-key-7f3a9c1e5b20";

/// An HTTP client that sends [`API_KEY`] as its bearer token.
pub fn api_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {API_KEY}")).unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A gRPC channel whose calls carry [`API_KEY`].
pub type AuthChannel = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
>;

/// Adds [`API_KEY`] to a gRPC call (an interceptor).
pub fn grpc_auth(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {API_KEY}").parse().unwrap(),
    );
    Ok(req)
}

/// `channel` with [`grpc_auth`] on every call.
pub fn with_key(channel: tonic::transport::Channel) -> AuthChannel {
    tonic::service::interceptor::InterceptedService::new(channel, grpc_auth as fn(_) -> _)
}

/// A TCP proxy in front of a real server that a test can take down and bring back: an outage
/// of that server as its clients see it, without stopping the server other tests share. While
/// down, every connection, open or new, is closed at once.
pub struct OutageProxy {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bumped on every take-down, so open connections notice and close.
    epoch: tokio::sync::watch::Sender<u64>,
    refused: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl OutageProxy {
    /// Starts up, forwarding to `target` (host:port).
    pub async fn start(target: String) -> OutageProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (epoch, _) = tokio::sync::watch::channel(0u64);
        let refused = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = {
            let (up, epoch, refused) = (up.clone(), epoch.clone(), refused.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        // Closed without an answer; its first line (an HTTP request line, for
                        // an HTTP client) is kept, so a test can see who tried what.
                        let refused = refused.clone();
                        tokio::spawn(async move {
                            use tokio::io::AsyncReadExt;
                            let mut buf = [0u8; 512];
                            let read = tokio::time::timeout(
                                std::time::Duration::from_secs(1),
                                inbound.read(&mut buf),
                            );
                            if let Ok(Ok(n)) = read.await {
                                let text = String::from_utf8_lossy(&buf[..n]);
                                let line = text.lines().next().unwrap_or_default().to_string();
                                refused.lock().unwrap().push(line);
                            }
                        });
                        continue;
                    }
                    let target = target.clone();
                    let mut down = epoch.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = down.changed() => {}
                        }
                    });
                }
            })
        };
        OutageProxy {
            addr,
            up,
            epoch,
            refused,
            accept,
        }
    }

    /// The first line of every connection refused while down, oldest first.
    pub fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap().clone()
    }

    /// Closes every open connection and refuses new ones until [`OutageProxy::bring_up`].
    pub fn take_down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn bring_up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for OutageProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
