//! api-rest's metrics (prefix `kafkify_api_rest_`).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Histogram>,
    pub in_flight: Gauge,
    pub db: platform::db::QueryMetrics,
    pub pool: platform::db::PoolMetrics,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 0.25 ms … ~8 s
    exponential_buckets(0.00025, 2.0, 16)
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let mut m = Metrics {
            requests: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            in_flight: Gauge::default(),
            db: platform::db::QueryMetrics::register(registry),
            pool: platform::db::PoolMetrics::default(),
        };
        registry.register(
            "http_request_duration_seconds",
            "HTTP request duration by method, route pattern and status",
            m.requests.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being served",
            m.in_flight.clone(),
        );
        m.pool = platform::db::PoolMetrics::register(registry);
        m
    }

    pub fn observe_db(&self, operation: &'static str, took: Duration) {
        self.db.observe(operation, took);
    }
}
