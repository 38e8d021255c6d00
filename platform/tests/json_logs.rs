//! JSON log lines carry the ids of the trace they belong to. Its own process: the test installs
//! the global subscriber, as the binaries do.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use platform::telemetry::JsonLines;
use serde_json::Value;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn json_lines_carry_the_trace_and_span_ids_of_the_traced_span() {
    let provider = SdkTracerProvider::builder().build();
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .event_format(JsonLines)
                .with_writer(move || writer.clone()),
        )
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("test"))
                .with_filter(
                    Targets::new().with_target(platform::trace::TARGET, tracing::Level::TRACE),
                ),
        );
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let span = tracing::info_span!(target: "otel", "request");
    platform::trace::continue_from(&span, Some(tp));
    let span_id = {
        let _in = span.enter();
        // A library span inside ours: the line names it but takes the ids from ours.
        let inner = tracing::info_span!("library");
        let _inner = inner.enter();
        tracing::info!(n = 3, "inside");
        platform::trace::ids(&span).unwrap().1
    };
    tracing::info!("outside any span");

    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let line = &lines[0];
    assert_eq!(line["message"], "inside");
    assert_eq!(line["n"], 3);
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["span"], "library");
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(line["span_id"], span_id.as_str());
    assert_ne!(
        span_id, "00f067aa0ba902b7",
        "our own span, not the caller's"
    );
    assert_eq!(lines[1]["trace_id"], Value::Null);
    assert!(lines[1]["timestamp"].as_str().unwrap().ends_with('Z'));
}
