//! The Kafka record of one outbox event: its topic, key, value, headers and producer span.

use crate::config::Config;
use crate::encode::{encode_payload, headers, KafkaRecord, Origin};
use crate::outbox::OutboxEvent;
use crate::registry::SchemaCache;

/// Where events the relay cannot encode go when their event type is unknown (a known type's
/// go to `<topic>.dlq`).
pub const UNKNOWN_EVENT_TYPE_DLQ: &str = "kafkify.unknown.dlq";

/// The Kafka record of one outbox event: Avro on its topic, or, when it cannot be encoded, the
/// raw payload on the dead-letter topic with the reason in a header. Either way it is published
/// in the same transaction as its neighbours, so nothing is skipped silently.
pub fn build(
    config: &Config,
    schemas: &SchemaCache,
    event: &OutboxEvent,
    origin: Origin,
) -> KafkaRecord {
    let mut h = headers(event, origin);
    let reason = match schemas.get(&event.event_type) {
        Some((id, schema)) => match encode_payload(&event.payload, *id, schema) {
            Ok(value) => {
                let topic = config.topic(&event.event_type);
                let span = publish_span(event, origin, &topic, &mut h);
                return KafkaRecord {
                    topic,
                    key: event.aggregate_id.clone(),
                    value,
                    headers: h,
                    span,
                };
            }
            Err(e) => e.to_string(),
        },
        None => format!("unknown event type `{}`", event.event_type),
    };
    let topic = match schemas.get(&event.event_type) {
        Some(_) => schemas::dlq_topic(&config.topic(&event.event_type)),
        None => config.topic(UNKNOWN_EVENT_TYPE_DLQ),
    };
    tracing::warn!(event_id = %event.id, event_type = %event.event_type, %reason, %topic, "dead-lettering an outbox event");
    h.push(("dlq_reason", reason));
    h.push(("dlq_origin", "cdc-relay".to_string()));
    let span = publish_span(event, origin, &topic, &mut h);
    KafkaRecord {
        topic,
        key: event.aggregate_id.clone(),
        value: event.payload.clone().into_bytes(),
        headers: h,
        span,
    }
}

/// For an event written under a trace: the producer span (semantic conventions for messaging)
/// that continues it, whose context replaces the `traceparent` header so consumers become its
/// children. Untraced events get no span: at tens of thousands of events a second, spans
/// nobody asked for would cost more than the rest of the relay's work per event.
fn publish_span(
    event: &OutboxEvent,
    origin: Origin,
    topic: &str,
    headers: &mut [(&'static str, String)],
) -> Option<tracing::Span> {
    let parent = event.traceparent.as_deref()?;
    let span = tracing::info_span!(
        target: platform::trace::TARGET,
        "publish",
        otel.name = format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = topic,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
        messaging.kafka.message.key = event.aggregate_id.as_str(),
        messaging.message.id = event.id.as_str(),
        kafkify.event_type = event.event_type.as_str(),
        kafkify.source_lsn = origin.lsn.to_string(),
        kafkify.commit_ts_micros = origin.commit_ts_micros,
    );
    platform::trace::continue_from(&span, Some(parent));
    if let Some(tp) = platform::trace::traceparent_of(&span, Some(parent)) {
        for (name, value) in headers.iter_mut() {
            if *name == "traceparent" {
                *value = tp.clone();
            }
        }
    }
    Some(span)
}
