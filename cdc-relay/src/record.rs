//! The Kafka record of one outbox event: its topic, key, value, headers and producer span.

use crate::config::Config;
use crate::encode::{encode_payload, headers, longest_string, KafkaRecord, Origin};
use crate::outbox::OutboxEvent;
use crate::registry::SchemaCache;

/// Where events the relay cannot encode go when their event type is unknown (a known type's
/// go to `<topic>.dlq`).
pub const UNKNOWN_EVENT_TYPE_DLQ: &str = "kafkify.unknown.dlq";

/// Why an event went to a dead-letter topic: the `reason` label of the dead-letter counter.
pub mod reason {
    /// The payload does not fit its event type's schema (or is not JSON).
    pub const SCHEMA: &str = "schema";
    /// No schema is registered for the event type.
    pub const UNKNOWN_EVENT_TYPE: &str = "unknown_event_type";
    /// The record would exceed `RELAY_MAX_RECORD_BYTES`.
    pub const TOO_LARGE: &str = "too_large";
    /// An operator skipped its transaction (`kafkifyctl skip`).
    pub const OPERATOR_SKIP: &str = "operator_skip";
}

/// What a one-record batch adds to key, value and headers on the wire (record batch v2): the
/// 61-byte batch header, the record's own fields with their varints at full width (36), and
/// two length varints per header (10). An upper bound, so a record we accept always fits a
/// topic whose `max.message.bytes` is our limit.
const BATCH_OVERHEAD: usize = 61 + 36;
const HEADER_OVERHEAD: usize = 10;

/// A too-large event's dead letter keeps only identifying fields, each cut to this, so the
/// dead letter itself always fits (the limit is at least 16 KiB).
const DEAD_LETTER_FIELD_MAX: usize = 1024;

/// The most bytes `record` can take in a record batch.
pub fn wire_size(record: &KafkaRecord) -> usize {
    BATCH_OVERHEAD
        + record.key.len()
        + record.value.len()
        + record
            .headers
            .iter()
            .map(|(k, v)| HEADER_OVERHEAD + k.len() + v.len())
            .sum::<usize>()
}

/// The Kafka record of one outbox event: Avro on its topic, or, when it cannot be encoded, the
/// raw payload on the dead-letter topic with the reason in a header; when either would exceed
/// the record limit, a dead letter without the payload (see [`too_large`]). Every way, it is
/// published in the same transaction as its neighbours, so nothing is skipped silently and
/// nothing stops the source.
pub fn build(
    config: &Config,
    schemas: &SchemaCache,
    source: &str,
    event: &OutboxEvent,
    origin: Origin,
) -> KafkaRecord {
    let limit = config.max_record_bytes as usize;
    // A string that alone passes the limit makes the record too large however it ends up
    // (encoded, or dead-lettered with its payload): decided before the payload is parsed,
    // copied or encoded, each of which would take the row's size again.
    let floor = BATCH_OVERHEAD + event.aggregate_id.len() + longest_string(&event.payload);
    let mut record = if floor > limit {
        let topic = dead_letter_topic(config, schemas, event);
        too_large(config, source, event, origin, topic, floor)
    } else {
        encoded(config, schemas, event, origin)
    };
    let size = wire_size(&record);
    if size > limit {
        let topic = match record.dead_letter {
            Some(_) => record.topic,
            None => schemas::dlq_topic(&record.topic),
        };
        record = too_large(config, source, event, origin, topic, size);
    }
    if let Some(reason) = record.dead_letter {
        let detail = record
            .headers
            .iter()
            .find(|(k, _)| *k == "dlq_reason")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        tracing::warn!(
            source,
            event_id = %event.id,
            event_type = %event.event_type,
            lsn = %origin.lsn,
            size = size.max(floor),
            reason,
            detail,
            topic = %record.topic,
            "dead-lettering an outbox event"
        );
    }
    record.span = publish_span(event, origin, &record.topic, &mut record.headers);
    record
}

/// Where an event that cannot be published goes: its type's dead-letter topic, or the one for
/// unknown event types.
fn dead_letter_topic(config: &Config, schemas: &SchemaCache, event: &OutboxEvent) -> String {
    match schemas.get(&event.event_type) {
        Some(_) => schemas::dlq_topic(&config.topic(&event.event_type)),
        None => config.topic(UNKNOWN_EVENT_TYPE_DLQ),
    }
}

/// The dead letter of an event whose transaction an operator skipped (`kafkifyctl skip`):
/// like a too-large one, without the payload (the row stays in the outbox table, where
/// `kafkifyctl dlq redrive` finds it once the cause is fixed), so it never fails the way the
/// transaction did. The payload is neither parsed nor encoded.
pub fn operator_skipped(
    config: &Config,
    schemas: &SchemaCache,
    source: &str,
    event: &OutboxEvent,
    origin: Origin,
    why: &str,
) -> KafkaRecord {
    let topic = dead_letter_topic(config, schemas, event);
    payloadless(
        source,
        event,
        origin,
        topic,
        reason::OPERATOR_SKIP,
        format!("kafkifyctl skip: {}", cut_to(why, DEAD_LETTER_FIELD_MAX)),
        Vec::new(),
    )
}

/// The event's record: Avro on its topic, or the raw payload on a dead-letter topic when it
/// cannot be encoded.
fn encoded(
    config: &Config,
    schemas: &SchemaCache,
    event: &OutboxEvent,
    origin: Origin,
) -> KafkaRecord {
    let mut h = headers(event, origin);
    let (topic, value, dead_letter) = match schemas.get(&event.event_type) {
        Some((id, schema)) => match encode_payload(&event.payload, *id, schema) {
            Ok(value) => (config.topic(&event.event_type), value, None),
            Err(e) => {
                h.push(("dlq_reason", e.to_string()));
                let topic = schemas::dlq_topic(&config.topic(&event.event_type));
                (
                    topic,
                    event.payload.clone().into_bytes(),
                    Some(reason::SCHEMA),
                )
            }
        },
        None => {
            h.push((
                "dlq_reason",
                format!("unknown event type `{}`", event.event_type),
            ));
            let topic = config.topic(UNKNOWN_EVENT_TYPE_DLQ);
            let value = event.payload.clone().into_bytes();
            (topic, value, Some(reason::UNKNOWN_EVENT_TYPE))
        }
    };
    if dead_letter.is_some() {
        h.push(("dlq_origin", "cdc-relay".to_string()));
    }
    KafkaRecord {
        topic,
        key: event.aggregate_id.clone(),
        value,
        headers: h,
        span: None,
        dead_letter,
    }
}

/// The dead letter of an event whose record would exceed `RELAY_MAX_RECORD_BYTES`: on its
/// type's dead-letter topic (or the unknown-type one), with what an operator needs to find
/// the row (it stays in the outbox table for `OUTBOX_RETENTION`) and no payload.
fn too_large(
    config: &Config,
    source: &str,
    event: &OutboxEvent,
    origin: Origin,
    topic: String,
    size: usize,
) -> KafkaRecord {
    payloadless(
        source,
        event,
        origin,
        topic,
        reason::TOO_LARGE,
        format!(
            "the record would take at least {size} bytes; RELAY_MAX_RECORD_BYTES is {}",
            config.max_record_bytes
        ),
        vec![("dlq_size", size.to_string())],
    )
}

/// A dead letter without the payload: what an operator needs to find the row (it stays in the
/// outbox table for `OUTBOX_RETENTION`), each field cut so that it always fits.
fn payloadless(
    source: &str,
    event: &OutboxEvent,
    origin: Origin,
    topic: String,
    why: &'static str,
    detail: String,
    extra: Vec<(&'static str, String)>,
) -> KafkaRecord {
    let cut = |s: &str| cut_to(s, DEAD_LETTER_FIELD_MAX).to_string();
    let mut headers = vec![
        ("event_id", cut(&event.id)),
        ("event_type", cut(&event.event_type)),
        ("aggregate_type", cut(&event.aggregate_type)),
        ("aggregate_id", cut(&event.aggregate_id)),
        ("source", source.to_string()),
        ("source_lsn", origin.lsn.to_string()),
        ("commit_ts", origin.commit_ts_micros.to_string()),
        ("dlq_reason", why.to_string()),
        ("dlq_detail", detail),
    ];
    headers.extend(extra);
    headers.push(("dlq_payload", "omitted".to_string()));
    headers.push(("dlq_origin", "cdc-relay".to_string()));
    if let Some(tp) = &event.traceparent {
        headers.push(("traceparent", cut(tp)));
    }
    KafkaRecord {
        topic,
        key: cut(&event.aggregate_id),
        value: Vec::new(),
        headers,
        span: None,
        dead_letter: Some(why),
    }
}

/// The longest prefix of `s` within `max` bytes that ends on a character boundary.
fn cut_to(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::Lsn;
    use clap::Parser;

    const LIMIT: usize = 16_384;

    fn config() -> Config {
        Config::try_parse_from([
            "cdc-relay",
            "--database-url",
            "postgres://relay@localhost/x",
            "--topic-prefix",
            "p.",
            "--max-record-bytes",
            &LIMIT.to_string(),
        ])
        .unwrap()
    }

    fn event(event_type: &str, aggregate_id: &str, payload: String) -> OutboxEvent {
        OutboxEvent {
            id: "0191e0d6-0000-7000-8000-000000000001".into(),
            aggregate_type: "resource".into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload,
            traceparent: None,
        }
    }

    /// A valid `resource.created` payload whose description is `n` bytes.
    fn created(n: usize) -> String {
        serde_json::json!({
            "resource_id": "0191e0d6-0000-7000-8000-000000000002",
            "name": "n",
            "description": "d".repeat(n),
            "attributes": {},
            "version": 1,
            "created_at": 1_700_000_000_000_000i64,
        })
        .to_string()
    }

    const ORIGIN: Origin = Origin {
        lsn: Lsn(0x1_0000_0010),
        commit_ts_micros: 1_700_000_000_000_000,
    };

    fn build_one(e: &OutboxEvent) -> KafkaRecord {
        build(&config(), &SchemaCache::unregistered(), "rest", e, ORIGIN)
    }

    #[test]
    fn a_record_exactly_at_the_limit_is_published_one_byte_more_is_dead_lettered() {
        // Find the description length whose record takes exactly the limit.
        let probe = build_one(&event("resource.created", "k", created(0)));
        assert_eq!(probe.dead_letter, None);
        let base = wire_size(&probe);
        // The description's Avro length (a zigzag varint) takes 3 bytes at this size, not 1.
        let n = LIMIT - base - 2;
        let at = build_one(&event("resource.created", "k", created(n)));
        assert_eq!(wire_size(&at), LIMIT);
        assert_eq!(
            (at.topic.as_str(), at.dead_letter),
            ("p.resource.created", None)
        );

        let over = build_one(&event("resource.created", "k", created(n + 1)));
        assert_eq!(over.topic, "p.resource.created.dlq");
        assert_eq!(over.dead_letter, Some(reason::TOO_LARGE));
        assert!(over.value.is_empty());
        let h: std::collections::HashMap<_, _> = over.headers.iter().cloned().collect();
        assert_eq!(h["dlq_reason"], "too_large");
        assert_eq!(h["dlq_size"], (LIMIT + 1).to_string());
        assert_eq!(h["source"], "rest");
        assert_eq!(h["source_lsn"], "1/10");
        assert_eq!(h["dlq_payload"], "omitted");
    }

    #[test]
    fn a_dead_letter_that_would_be_too_large_keeps_its_topic_and_loses_its_payload() {
        let bad = event(
            "resource.created",
            "k",
            format!("[\"{}\"]", "x".repeat(LIMIT)),
        );
        let r = build_one(&bad);
        assert_eq!(r.topic, "p.resource.created.dlq");
        assert_eq!(r.dead_letter, Some(reason::TOO_LARGE));

        let unknown = event(
            "resource.exploded",
            "k",
            format!("\"{}\"", "x".repeat(LIMIT)),
        );
        let r = build_one(&unknown);
        assert_eq!(r.topic, format!("p.{UNKNOWN_EVENT_TYPE_DLQ}"));
        assert_eq!(r.dead_letter, Some(reason::TOO_LARGE));

        let small = build_one(&event("resource.exploded", "k", "{}".into()));
        assert_eq!(small.dead_letter, Some(reason::UNKNOWN_EVENT_TYPE));
        assert_eq!(small.value, b"{}");
    }

    #[test]
    fn the_dead_letter_of_huge_identifiers_still_fits() {
        // A 3-byte character straddles the cut: it must not be split.
        let key = "€".repeat(LIMIT);
        let r = build_one(&event("resource.created", &key, created(0)));
        assert_eq!(r.dead_letter, Some(reason::TOO_LARGE));
        assert!(wire_size(&r) <= LIMIT, "{}", wire_size(&r));
        assert_eq!(r.key, "€".repeat(DEAD_LETTER_FIELD_MAX / 3));
    }
}
