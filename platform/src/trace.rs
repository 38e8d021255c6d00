//! Trace context across process boundaries: the W3C `traceparent` that arrives on a request,
//! is stored in the outbox row, travels in the Kafka headers and comes back on `task.completed`.
//!
//! Spans that belong in the exported trace use the target [`TARGET`]; only those reach
//! OpenTelemetry, so library spans (h2, tonic, rdkafka) never clutter a user's traces.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span exported over OTLP.
pub const TARGET: &str = "otel";

/// The trace and span ids of a well-formed version-00 `traceparent`, or `None`: a malformed
/// header is dropped (the request starts a new trace), never an error for the caller.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let [version, trace, span, flags] = parts[..] else {
        return None;
    };
    let lower_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if version != "00" || !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let cx = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// Formats a span context as a version-00 `traceparent`.
pub fn format(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    )
}

/// Makes `span` a child of the remote span `traceparent` names, if it names one.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(parse) {
        // Fails only for a span that has already started; ours are fresh.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// The `traceparent` to hand on from inside `span`: the span's own context, so the next hop
/// becomes its child. `fallback` (the context `span` continued) is handed on instead when the
/// span has no context of its own: logging disabled it, or no subscriber is installed.
pub fn traceparent_of(span: &tracing::Span, fallback: Option<&str>) -> Option<String> {
    let cx = span.context();
    let own = cx.span().span_context().clone();
    if own.is_valid() {
        Some(format(&own))
    } else {
        fallback.and_then(parse).map(|p| format(&p))
    }
}

/// The trace and span id of `span` (tests use it to match log lines to spans).
pub fn ids(span: &tracing::Span) -> Option<(String, String)> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// A database client span (semantic conventions for database spans): one per transaction that
/// writes `table`, named `"{operation} {table}"`. The outbox row written inside it carries its
/// context, so the relay's span becomes its child.
pub fn db_span(operation: &'static str, table: &'static str) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        "db",
        otel.name = format!("{operation} {table}"),
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = operation,
        db.collection.name = table,
        db.operation.batch.size = tracing::field::Empty,
    )
}

/// A Kafka consumer span (semantic conventions for messaging spans) continuing the trace in
/// the record's `traceparent` header.
pub fn consume_span(
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&str>,
    traceparent: Option<&str>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        "consume",
        otel.name = format!("process {topic}"),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = topic,
        messaging.destination.partition.id = partition.to_string(),
        messaging.kafka.offset = offset,
        messaging.kafka.message.key = key.unwrap_or_default(),
        messaging.message.id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    continue_from(&span, traceparent);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn well_formed_traceparents_round_trip() {
        let cx = parse(TP).unwrap();
        assert!(cx.is_remote() && cx.is_sampled());
        assert_eq!(format(&cx), TP);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(format(&parse(unsampled).unwrap()), unsampled);
    }

    #[test]
    fn malformed_traceparents_are_dropped() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn without_a_subscriber_the_continued_context_is_handed_on() {
        let span = tracing::info_span!(target: "otel", "x");
        continue_from(&span, Some(TP));
        assert_eq!(traceparent_of(&span, Some(TP)).as_deref(), Some(TP));
        assert_eq!(traceparent_of(&span, Some("junk")), None);
        assert_eq!(traceparent_of(&span, None), None);
    }
}
