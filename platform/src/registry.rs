//! The schema registry setting, its readiness check, and reading Confluent-framed Avro.

use std::time::Duration;

use crate::config::HttpUrl;

/// `SCHEMA_REGISTRY_URL`: a Confluent-compatible schema registry.
#[derive(Clone, Debug, clap::Args)]
pub struct RegistryArgs {
    /// Confluent-compatible schema registry base URL.
    #[arg(
        long,
        env = "SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: HttpUrl,
}

impl RegistryArgs {
    /// An HTTP client with the timeouts every registry call of ours uses.
    pub fn http_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .build()
            // Building with only timeouts set fails only if the TLS backend cannot start.
            .expect("the HTTP client builds")
    }
}

impl RegistryArgs {
    /// A readiness check for [`crate::ops::Readiness::check`].
    pub fn probe(&self) -> impl Fn() -> crate::ops::CheckFuture + Send + Sync + 'static {
        let (http, base) = (self.http_client(), self.schema_registry_url.clone());
        move || {
            let (http, base) = (http.clone(), base.clone());
            Box::pin(async move { ping(&http, &base).await })
        }
    }
}

/// Readiness: `GET /subjects` answers 200, as every Confluent-compatible registry does.
pub async fn ping(client: &reqwest::Client, base: &HttpUrl) -> Result<(), String> {
    let url = format!("{}/subjects", base.0);
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("GET {url}: HTTP {}", resp.status()))
    }
}

/// Why a Confluent-framed Avro record was not read. Only [`ReadError::Outage`] is worth
/// waiting for; the others are the record's own fault and never get better.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The registry did not answer, or answered with a server error: retry the same record,
    /// never pass over it (a consumer that did once lost completions during an outage).
    #[error("schema registry: {0}")]
    Outage(String),
    #[error("not Confluent Avro: {0}")]
    Framing(String),
    #[error("unknown schema id: {0}")]
    UnknownSchema(String),
    #[error("undecodable body: {0}")]
    Body(String),
}

/// Reads one Confluent-framed Avro record through the registry (its schemas are cached after
/// the first use). The schema is fetched on its own first, so that an unknown id (poison) and
/// a registry that does not answer (an outage) are told apart.
pub async fn read_avro(
    decoder: &schema_registry_converter::async_impl::avro::AvroDecoder,
    payload: Option<&[u8]>,
) -> Result<apache_avro::types::Value, ReadError> {
    let detail = |e: &schema_registry_converter::error::SRCError| match &e.cause {
        Some(c) => format!("{}: {c}", e.error),
        None => e.error.clone(),
    };
    let id = schemas::confluent_schema_id(payload).map_err(ReadError::Framing)?;
    if let Err(e) = decoder.get_schema(id).await {
        return Err(if e.retriable {
            ReadError::Outage(detail(&e))
        } else {
            ReadError::UnknownSchema(format!("{id}: {}", detail(&e)))
        });
    }
    match decoder.decode(payload).await {
        Ok(d) => Ok(d.value),
        Err(e) if e.retriable => Err(ReadError::Outage(detail(&e))),
        Err(e) => Err(ReadError::Body(detail(&e))),
    }
}
