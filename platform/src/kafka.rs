//! Kafka settings shared by every client of the broker, and the broker readiness check.

use std::time::Duration;

use std::collections::HashMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{ClientConfig, ClientContext};

use crate::config::Brokers;

/// How the clients reach the brokers (librdkafka's `security.protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    fn librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

/// `KAFKA_BROKERS`, TLS and SASL, and the knobs every Kafka client of ours has.
#[derive(Clone, Debug, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, host:port[,host:port…].
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: Brokers,

    /// `plaintext`, `ssl` (TLS), `sasl-plaintext` or `sasl-ssl`.
    #[arg(
        long,
        env = "KAFKA_SECURITY_PROTOCOL",
        value_enum,
        default_value = "plaintext"
    )]
    pub kafka_security_protocol: SecurityProtocol,

    /// PEM file of the CA that signed the brokers' certificates (TLS); the system's CAs
    /// otherwise.
    #[arg(long, env = "KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<std::path::PathBuf>,

    /// PEM client certificate, for brokers that require mutual TLS.
    #[arg(
        long,
        env = "KAFKA_SSL_CERTIFICATE_LOCATION",
        requires = "kafka_ssl_key_location"
    )]
    pub kafka_ssl_certificate_location: Option<std::path::PathBuf>,

    /// PEM private key of the client certificate.
    #[arg(
        long,
        env = "KAFKA_SSL_KEY_LOCATION",
        requires = "kafka_ssl_certificate_location"
    )]
    pub kafka_ssl_key_location: Option<std::path::PathBuf>,

    /// SASL mechanism with `sasl-*`: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, env = "KAFKA_SASL_MECHANISM", value_parser = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])]
    pub kafka_sasl_mechanism: Option<String>,

    /// SASL user name.
    #[arg(long, env = "KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// SASL password.
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
}

impl KafkaArgs {
    /// A librdkafka config with the bootstrap servers, TLS and SASL settings, and a client id
    /// naming the service.
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.kafka_brokers.0)
            .set("client.id", client_id)
            // Fail fast on a dead cluster instead of librdkafka's default of retrying forever
            // inside calls that have their own timeouts.
            .set("socket.timeout.ms", "10000")
            .set(
                "security.protocol",
                self.kafka_security_protocol.librdkafka(),
            );
        let path = |p: &std::path::PathBuf| p.display().to_string();
        if let Some(ca) = &self.kafka_ssl_ca_location {
            c.set("ssl.ca.location", path(ca));
        }
        if let Some(cert) = &self.kafka_ssl_certificate_location {
            c.set("ssl.certificate.location", path(cert));
        }
        if let Some(key) = &self.kafka_ssl_key_location {
            c.set("ssl.key.location", path(key));
        }
        if let Some(m) = &self.kafka_sasl_mechanism {
            c.set("sasl.mechanism", m);
        }
        if let Some(u) = &self.kafka_sasl_username {
            c.set("sasl.username", u);
        }
        if let Some(p) = &self.kafka_sasl_password {
            c.set("sasl.password", p);
        }
        c
    }

    /// Checks the TLS and SASL settings together, naming the setting at fault.
    pub fn validate(&self) -> Result<(), String> {
        let sasl = matches!(
            self.kafka_security_protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        );
        if sasl
            && (self.kafka_sasl_mechanism.is_none()
                || self.kafka_sasl_username.is_none()
                || self.kafka_sasl_password.is_none())
        {
            return Err("KAFKA_SECURITY_PROTOCOL=sasl-*: KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are required".into());
        }
        for (name, file) in [
            ("KAFKA_SSL_CA_LOCATION", &self.kafka_ssl_ca_location),
            (
                "KAFKA_SSL_CERTIFICATE_LOCATION",
                &self.kafka_ssl_certificate_location,
            ),
            ("KAFKA_SSL_KEY_LOCATION", &self.kafka_ssl_key_location),
        ] {
            if let Some(f) = file {
                std::fs::metadata(f).map_err(|e| format!("{name} {}: {e}", f.display()))?;
            }
        }
        // Plaintext leaves nothing for librdkafka to check, and a client costs threads and
        // broker connections at start-up.
        if self.kafka_security_protocol == SecurityProtocol::Plaintext {
            return Ok(());
        }
        // Creating a client is where librdkafka checks the rest (e.g. an unreadable PEM).
        self.client_config("kafkify-config-check")
            .create::<rdkafka::producer::BaseProducer>()
            .map(drop)
            .map_err(|e| format!("KAFKA_SECURITY_PROTOCOL / KAFKA_SSL_* / KAFKA_SASL_*: {e}"))
    }

    /// An admin client, for topic administration (readiness has its own client: [`Self::probe`]).
    pub fn admin(&self, client_id: &str) -> Result<AdminClient<DefaultClientContext>, String> {
        self.client_config(client_id)
            .create()
            .map_err(|e| format!("cannot create Kafka client: {e}"))
    }
}

impl KafkaArgs {
    /// A readiness check for [`crate::ops::Readiness::check`], with its own client.
    pub fn probe(
        &self,
        client_id: &str,
    ) -> Result<impl Fn() -> crate::ops::CheckFuture + Send + Sync + 'static, String> {
        let client: BaseProducer<ClientErrors> = self
            .client_config(client_id)
            .create_with_context(ClientErrors::default())
            .map_err(|e| format!("cannot create Kafka client: {e}"))?;
        let client = std::sync::Arc::new(client);
        Ok(move || Box::pin(ping(client.clone())) as crate::ops::CheckFuture)
    }
}

/// Remembers the client's errors since the last probe. A refused TLS handshake or SASL
/// authentication only shows as a metadata time-out; librdkafka names the cause in an error
/// event (followed by a generic "brokers are down"), delivered when the client is polled.
#[derive(Default)]
pub struct ClientErrors(std::sync::Mutex<Vec<String>>);

impl ClientContext for ClientErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error");
        // The same failure repeats with another "(after N ms in state …)" tail.
        let reason = reason.split(" (after ").next().unwrap_or(reason);
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() < 3 && !seen.iter().any(|s| s == reason) {
            seen.push(reason.to_string());
        }
    }
}

/// Only so the probe can be a producer, whose poll serves the error events; it sends nothing.
impl rdkafka::producer::ProducerContext for ClientErrors {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Readiness: the cluster answers a metadata request and has at least one broker. When it
/// does not, the answer carries the client's errors (e.g. "SASL authentication error").
pub async fn ping(client: std::sync::Arc<BaseProducer<ClientErrors>>) -> Result<(), String> {
    // librdkafka's metadata call blocks its thread.
    tokio::task::spawn_blocking(move || {
        let result = client
            .client()
            .fetch_metadata(None, Duration::from_millis(1500));
        // Serves the error events (and log lines) that arrived meanwhile; a poll serves one
        // event at a time until its deadline, so it gets a moment rather than zero.
        if result.is_err() {
            client.poll(Duration::from_millis(100));
        }
        let errors =
            std::mem::take(&mut *client.context().0.lock().unwrap_or_else(|e| e.into_inner()));
        let md = result.map_err(|e| match errors.is_empty() {
            true => format!("no metadata from Kafka: {e}"),
            false => format!(
                "no metadata from Kafka: {e}; client errors: {}",
                errors.join("; ")
            ),
        })?;
        if md.brokers().is_empty() {
            return Err("Kafka answered with no brokers".to_string());
        }
        Ok(())
    })
    .await
    .map_err(|e| format!("metadata task failed: {e}"))?
}

/// Labels of the per-partition consumer lag gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub topic: String,
    pub partition: i32,
}

/// Consumer lag per assigned partition: records between the consumer's position and the end.
pub type LagGauge = Family<PartitionLabel, Gauge>;

/// Samples consumer lag into a [`LagGauge`]. The end offsets come from a client of its own
/// (no group, no subscriptions): asked through the reading consumer, they queue on its broker
/// connection behind fetches the broker parks for new data, time out, and the time-outs
/// stalled fetching for seconds (end-to-end p99 went from 0.2 s to 4-7 s).
#[derive(Clone)]
pub struct LagSampler {
    watermarks: std::sync::Arc<rdkafka::consumer::BaseConsumer>,
    lag: LagGauge,
}

impl LagSampler {
    pub fn new(config: &ClientConfig, lag: LagGauge) -> rdkafka::error::KafkaResult<LagSampler> {
        let watermarks = config.clone().set("enable.auto.commit", "false").create()?;
        Ok(LagSampler {
            watermarks: std::sync::Arc::new(watermarks),
            lag,
        })
    }

    /// Samples on a blocking thread: watermark requests block, and the task reading records
    /// must not wait for them.
    pub fn spawn<C, X>(&self, consumer: std::sync::Arc<C>)
    where
        C: Consumer<X> + Send + Sync + 'static,
        X: rdkafka::consumer::ConsumerContext + 'static,
    {
        let sampler = self.clone();
        tokio::task::spawn_blocking(move || sampler.sample(&*consumer));
    }

    /// Sets the lag of every partition assigned to `consumer`.
    fn sample<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(&self, consumer: &C) {
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let Ok(positions) = consumer.position() else {
            return;
        };
        let positions: HashMap<(String, i32), i64> = positions
            .elements()
            .iter()
            .filter_map(|e| Some(((e.topic().to_string(), e.partition()), e.offset().to_raw()?)))
            .collect();
        for e in assignment.elements() {
            let Ok((_, high)) =
                self.watermarks
                    .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5))
            else {
                continue;
            };
            let position = positions
                .get(&(e.topic().to_string(), e.partition()))
                .copied()
                .unwrap_or(0)
                .max(0);
            let label = PartitionLabel {
                topic: e.topic().to_string(),
                partition: e.partition(),
            };
            self.lag.get_or_create(&label).set((high - position).max(0));
        }
    }
}

/// The consumer span for one record: see [`crate::trace::consume_span`]. The `traceparent` and
/// `event_id` headers the relay writes link it to the writer's trace and to the outbox row.
pub fn consume_span(msg: &impl rdkafka::Message) -> tracing::Span {
    use rdkafka::message::Headers;
    let header = |name: &str| {
        msg.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == name)
                .and_then(|x| x.value)
                .and_then(|v| std::str::from_utf8(v).ok())
        })
    };
    let key = msg.key().and_then(|k| std::str::from_utf8(k).ok());
    let span = crate::trace::consume_span(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        key,
        header("traceparent"),
    );
    if let Some(id) = header("event_id") {
        span.record("messaging.message.id", id);
    }
    span
}
