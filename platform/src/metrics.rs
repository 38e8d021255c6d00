//! The Prometheus registry every binary exposes on `/metrics`.
//!
//! Names follow `kafkify_<service>_…` with the unit in the name; the registry prefix gives the
//! first part so call sites name only what they measure.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// A registry prefixed `kafkify_<service>`, with `build_info` and `start_time_seconds` already in.
pub fn registry(service: &str) -> Registry {
    let mut registry = Registry::with_prefix(format!("kafkify_{}", service.replace('-', "_")));

    let build: Family<BuildLabels, Gauge> = Family::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
    registry.register(
        "build_info",
        "Build version of this binary (always 1)",
        build,
    );

    let started: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    started.set(now);
    registry.register(
        "start_time_seconds",
        "Process start time since the epoch",
        started,
    );
    registry
}

/// Renders the registry in the Prometheus text format (OpenMetrics flavour).
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// The content type matching [`render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_service_prefix() {
        let text = render(&registry("cdc-relay"));
        assert!(
            text.contains("kafkify_cdc_relay_build_info{version=\""),
            "{text}"
        );
        assert!(
            text.contains("kafkify_cdc_relay_start_time_seconds "),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
