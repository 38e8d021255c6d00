//! The schema registry setting and its readiness check.

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
