//! From an outbox event's JSON payload to a Kafka record: the payload is checked against the
//! topic's Avro schema field by field, encoded as Avro binary and framed in the Confluent wire
//! format (magic byte 0, 4-byte big-endian schema id, Avro datum). Pure.

use apache_avro::schema::{Schema, UnionSchema};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use serde_json::Value as Json;

use crate::outbox::OutboxEvent;

/// The first byte of every Confluent-framed record.
pub const MAGIC_BYTE: u8 = 0;

/// A schema id as the registry assigned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SchemaId(pub u32);

/// Why a payload cannot be encoded. The path names the offending field, e.g. `$.attributes.x`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("{path}: {message}")]
    Mismatch { path: String, message: String },
    #[error("Avro encoding failed: {0}")]
    Avro(String),
}

fn mismatch(path: &str, message: impl Into<String>) -> EncodeError {
    EncodeError::Mismatch {
        path: path.to_string(),
        message: message.into(),
    }
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Converts a JSON value to the Avro value `schema` describes. Strict: a missing field without
/// a default, an unknown field, a wrong type or an out-of-range number is an error.
pub fn json_to_avro(json: &Json, schema: &Schema) -> Result<Value, EncodeError> {
    convert(json, schema, "$")
}

fn convert(json: &Json, schema: &Schema, path: &str) -> Result<Value, EncodeError> {
    let expected = |what: &str| mismatch(path, format!("expected {what}, got {}", kind(json)));
    Ok(match schema {
        Schema::Null => match json {
            Json::Null => Value::Null,
            _ => return Err(expected("null")),
        },
        Schema::Boolean => Value::Boolean(json.as_bool().ok_or_else(|| expected("a boolean"))?),
        Schema::Int | Schema::Date | Schema::TimeMillis => {
            let n = json.as_i64().ok_or_else(|| expected("an integer"))?;
            let n =
                i32::try_from(n).map_err(|_| mismatch(path, format!("{n} does not fit an int")))?;
            match schema {
                Schema::Date => Value::Date(n),
                Schema::TimeMillis => Value::TimeMillis(n),
                _ => Value::Int(n),
            }
        }
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => {
            let n = json.as_i64().ok_or_else(|| match json {
                Json::Number(_) => mismatch(path, format!("{json} does not fit a long")),
                _ => expected("an integer"),
            })?;
            match schema {
                Schema::TimeMicros => Value::TimeMicros(n),
                Schema::TimestampMillis => Value::TimestampMillis(n),
                Schema::TimestampMicros => Value::TimestampMicros(n),
                Schema::TimestampNanos => Value::TimestampNanos(n),
                Schema::LocalTimestampMillis => Value::LocalTimestampMillis(n),
                Schema::LocalTimestampMicros => Value::LocalTimestampMicros(n),
                Schema::LocalTimestampNanos => Value::LocalTimestampNanos(n),
                _ => Value::Long(n),
            }
        }
        Schema::Float => Value::Float(json.as_f64().ok_or_else(|| expected("a number"))? as f32),
        Schema::Double => Value::Double(json.as_f64().ok_or_else(|| expected("a number"))?),
        Schema::String => Value::String(
            json.as_str()
                .ok_or_else(|| expected("a string"))?
                .to_string(),
        ),
        Schema::Uuid(_) => {
            let s = json.as_str().ok_or_else(|| expected("a UUID string"))?;
            Value::Uuid(
                uuid::Uuid::parse_str(s)
                    .map_err(|_| mismatch(path, format!("`{s}` is not a UUID")))?,
            )
        }
        Schema::Enum(e) => {
            let s = json.as_str().ok_or_else(|| expected("an enum symbol"))?;
            let i =
                e.symbols.iter().position(|sym| sym == s).ok_or_else(|| {
                    mismatch(path, format!("`{s}` is not one of {:?}", e.symbols))
                })?;
            Value::Enum(i as u32, s.to_string())
        }
        Schema::Array(a) => {
            let items = json.as_array().ok_or_else(|| expected("an array"))?;
            Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| convert(item, &a.items, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            )
        }
        Schema::Map(m) => {
            let obj = json.as_object().ok_or_else(|| expected("an object"))?;
            Value::Map(
                obj.iter()
                    .map(|(k, v)| Ok((k.clone(), convert(v, &m.types, &format!("{path}.{k}"))?)))
                    .collect::<Result<_, EncodeError>>()?,
            )
        }
        Schema::Union(u) => union(json, u, path)?,
        Schema::Record(r) => {
            let obj = json.as_object().ok_or_else(|| expected("an object"))?;
            if let Some(unknown) = obj.keys().find(|k| !r.lookup.contains_key(k.as_str())) {
                return Err(mismatch(path, format!("unknown field `{unknown}`")));
            }
            let mut fields = Vec::with_capacity(r.fields.len());
            for f in &r.fields {
                let field_path = format!("{path}.{}", f.name);
                let value = match (obj.get(&f.name), &f.default) {
                    (Some(v), _) => convert(v, &f.schema, &field_path)?,
                    (None, Some(default)) => convert(default, &f.schema, &field_path)?,
                    (None, None) => {
                        return Err(mismatch(
                            &field_path,
                            "missing, and the schema has no default",
                        ))
                    }
                };
                fields.push((f.name.clone(), value));
            }
            Value::Record(fields)
        }
        Schema::Bytes
        | Schema::Fixed(_)
        | Schema::Decimal(_)
        | Schema::BigDecimal
        | Schema::Duration(_)
        | Schema::Ref { .. } => {
            return Err(mismatch(
                path,
                format!("schema type {schema:?} is not supported in outbox payloads"),
            ))
        }
    })
}

fn union(json: &Json, u: &UnionSchema, path: &str) -> Result<Value, EncodeError> {
    // JSON null picks the null branch; anything else the first branch it fits.
    let variants = u.variants();
    if json.is_null() {
        if let Some(i) = variants.iter().position(|s| matches!(s, Schema::Null)) {
            return Ok(Value::Union(i as u32, Box::new(Value::Null)));
        }
    }
    let mut errors = Vec::new();
    for (i, s) in variants.iter().enumerate() {
        if matches!(s, Schema::Null) {
            continue;
        }
        match convert(json, s, path) {
            Ok(v) => return Ok(Value::Union(i as u32, Box::new(v))),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(mismatch(
        path,
        format!("fits no branch of the union ({})", errors.join("; ")),
    ))
}

/// Avro binary of `value` under `schema`, prefixed with the Confluent header.
pub fn frame(schema_id: SchemaId, schema: &Schema, value: &Value) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(256);
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&schema_id.0.to_be_bytes());
    let writer = GenericDatumWriter::builder(schema)
        .build()
        .map_err(|e| EncodeError::Avro(e.to_string()))?;
    writer
        .write_value_ref(&mut out, value)
        .map_err(|e| EncodeError::Avro(e.to_string()))?;
    Ok(out)
}

/// A record ready for the producer.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaRecord {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    /// The producer span of a traced event; it ends when the record is dropped, after Kafka
    /// acknowledged (and, exactly once, committed) it.
    pub span: Option<tracing::Span>,
    /// For a dead letter, why (a `record::reason`), for the dead-letter counter.
    pub dead_letter: Option<&'static str>,
}

/// What the transaction around an event tells us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the insert in the WAL.
    pub lsn: crate::pgoutput::Lsn,
    /// Commit time in microseconds since the Unix epoch.
    pub commit_ts_micros: i64,
}

/// The headers of the outbox contract (docs/ARCHITECTURE.md): `event_id`, `event_type`, `traceparent` (when the writer had
/// one), `source_lsn`, `commit_ts`.
pub fn headers(event: &OutboxEvent, origin: Origin) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("event_id", event.id.clone()),
        ("event_type", event.event_type.clone()),
        ("source_lsn", origin.lsn.to_string()),
        ("commit_ts", origin.commit_ts_micros.to_string()),
    ];
    if let Some(tp) = &event.traceparent {
        h.push(("traceparent", tp.clone()));
    }
    h
}

/// Encodes one event's payload for its topic: parse, check against the schema, frame.
pub fn encode_payload(
    payload: &str,
    schema_id: SchemaId,
    schema: &Schema,
) -> Result<Vec<u8>, EncodeError> {
    let json: Json =
        serde_json::from_str(payload).map_err(|e| EncodeError::NotJson(e.to_string()))?;
    let value = json_to_avro(&json, schema)?;
    frame(schema_id, schema, &value)
}

/// The decoded length, in bytes, of the longest string literal in a JSON text (keys
/// included), counting each `\uXXXX` escape as one byte: at most what the longest string in its
/// Avro encoding takes, whatever the schema (every string field, map key and map value is
/// written whole). One pass, no allocation, so a payload of hundreds of MiB can be judged too
/// large before it is parsed or copied. Text that is not JSON gives some number; such a payload
/// is dead-lettered with its raw text, which is at least that long, so the verdict holds.
pub fn longest_string(json: &str) -> usize {
    let bytes = json.as_bytes();
    let (mut longest, mut i) = (0, 0);
    while i < bytes.len() {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        i += 1;
        let mut len = 0;
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] == b'\\' {
                // `\uXXXX` stands for one to three bytes, any other escape for one.
                i += if bytes.get(i + 1) == Some(&b'u') {
                    6
                } else {
                    2
                };
            } else {
                i += 1;
            }
            len += 1;
        }
        // UTF-8 characters were counted per byte: exact.
        longest = longest.max(len);
        i += 1;
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::reader::datum::GenericDatumReader;
    use schemas::{ResourceCreated, TaskCompleted, TaskOutcome};
    use std::collections::BTreeMap;

    fn schema(t: &str) -> Schema {
        schemas::schema(t).unwrap()
    }

    /// The payload of the outbox row PostgreSQL 15.18 sent in pgoutput's captured Insert (see
    /// `pgoutput::outbox`'s tests), in jsonb's own text form: keys reordered, spaces added.
    #[test]
    fn the_captured_outbox_payload_encodes() {
        let payload = r#"{"version": 3, "deleted_at": 1764097200000000, "resource_id": "0b6e1f55-7d1c-4a8e-9c3f-5e2b8f0d4a11"}"#;
        let bytes = encode_payload(payload, SchemaId(3), &schema("resource.deleted")).unwrap();
        let mut want = vec![0, 0, 0, 0, 3, 72];
        want.extend_from_slice(b"0b6e1f55-7d1c-4a8e-9c3f-5e2b8f0d4a11");
        want.push(6); // version 3
        want.extend_from_slice(&[0x80, 0xb0, 0xa4, 0xaf, 0xfc, 0x9b, 0xa2, 0x06]); // deleted_at, zig-zag varint
        assert_eq!(bytes, want);
    }

    #[test]
    fn a_typed_event_encodes_to_exact_bytes() {
        let event = TaskCompleted {
            task_id: uuid::Uuid::from_u128(1),
            status: TaskOutcome::Failed,
            result: None,
            error: Some("x".into()),
            completed_at: 1,
        };
        let payload = serde_json::to_string(&event).unwrap();
        let bytes = encode_payload(&payload, SchemaId(7), &schema("task.completed")).unwrap();
        let mut want = vec![0, 0, 0, 0, 7];
        want.push(72); // string length 36, zig-zag
        want.extend_from_slice(b"00000000-0000-0000-0000-000000000001");
        want.extend_from_slice(&[
            2, // enum index 1 (FAILED)
            0, // result: union branch 0 (null)
            2, 2, b'x', // error: union branch 1, string of length 1
            2,    // completed_at = 1
        ]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn what_the_writers_store_round_trips_through_avro() {
        let event = ResourceCreated {
            resource_id: uuid::Uuid::from_u128(9),
            name: "n".into(),
            description: "d".into(),
            attributes: BTreeMap::from([("k".into(), "v".into())]),
            version: 3,
            created_at: 1_700_000_000_000_000,
        };
        let s = schema("resource.created");
        let bytes =
            encode_payload(&serde_json::to_string(&event).unwrap(), SchemaId(1), &s).unwrap();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);
        let reader = GenericDatumReader::builder(&s).build().unwrap();
        let value = reader.read_value(&mut &bytes[5..]).unwrap();
        let back: ResourceCreated = apache_avro::from_value(&value).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn mismatches_name_the_field() {
        let s = schema("resource.deleted");
        let err = |payload: &str| {
            encode_payload(payload, SchemaId(1), &s)
                .unwrap_err()
                .to_string()
        };
        let id = r#""resource_id":"00000000-0000-0000-0000-000000000001""#;
        assert_eq!(
            err("{"),
            "payload is not JSON: EOF while parsing an object at line 1 column 1"
        );
        assert_eq!(
            err(&format!("{{{id},\"deleted_at\":1}}")),
            "$.version: missing, and the schema has no default"
        );
        assert_eq!(
            err(&format!("{{{id},\"version\":\"2\",\"deleted_at\":1}}")),
            "$.version: expected an integer, got a string"
        );
        assert_eq!(
            err(&format!("{{{id},\"version\":1e300,\"deleted_at\":1}}")),
            "$.version: 1e+300 does not fit a long"
        );
        assert_eq!(
            err(&format!(
                "{{{id},\"version\":1,\"deleted_at\":1,\"extra\":0}}"
            )),
            "$: unknown field `extra`"
        );
        assert_eq!(
            err(r#"{"resource_id":"nope","version":1,"deleted_at":1}"#),
            "$.resource_id: `nope` is not a UUID"
        );
        let c = schema("task.completed");
        let e = encode_payload(
            r#"{"task_id":"00000000-0000-0000-0000-000000000001","status":"DONE","completed_at":1}"#,
            SchemaId(1),
            &c,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"$.status: `DONE` is not one of ["COMPLETED", "FAILED"]"#
        );
        let e = encode_payload(
            r#"{"task_id":"00000000-0000-0000-0000-000000000001","status":"FAILED","error":5,"completed_at":1}"#,
            SchemaId(1),
            &c,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("$.error: fits no branch of the union"),
            "{e}"
        );
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let c = schema("task.completed");
        let bytes = encode_payload(
            r#"{"task_id":"00000000-0000-0000-0000-000000000001","status":"COMPLETED","completed_at":1}"#,
            SchemaId(1),
            &c,
        )
        .unwrap();
        let value = GenericDatumReader::builder(&c)
            .build()
            .unwrap()
            .read_value(&mut &bytes[5..])
            .unwrap();
        let back: TaskCompleted = apache_avro::from_value(&value).unwrap();
        assert_eq!((back.result, back.error), (None, None));
    }

    #[test]
    fn headers_carry_the_origin() {
        let e = OutboxEvent {
            id: "i".into(),
            aggregate_type: "task".into(),
            aggregate_id: "k".into(),
            event_type: "task.process".into(),
            payload: "{}".into(),
            traceparent: Some("00-t-s-01".into()),
        };
        let h = headers(
            &e,
            Origin {
                lsn: crate::pgoutput::Lsn(0x1_0000_0010),
                commit_ts_micros: 5,
            },
        );
        assert_eq!(
            h,
            vec![
                ("event_id", "i".to_string()),
                ("event_type", "task.process".to_string()),
                ("source_lsn", "1/10".to_string()),
                ("commit_ts", "5".to_string()),
                ("traceparent", "00-t-s-01".to_string()),
            ]
        );
    }

    #[test]
    fn the_longest_string_is_never_longer_than_its_avro_encoding() {
        assert_eq!(longest_string(r#"{"a": "xyz", "bb": 12345678}"#), 3);
        assert_eq!(longest_string(r#"{"key_is_longest": 1}"#), 14);
        // Escapes count as what they stand for, at least: \n is one byte, \u00e9 two (one counted).
        assert_eq!(longest_string(r#"["a\nb", "\u00e9\u00e9"]"#), 3);
        assert_eq!(longest_string(r#"["\"quoted\""]"#), 8);
        assert_eq!(longest_string("é"), 0);
        assert_eq!(longest_string(r#"["ééé"]"#), 6, "UTF-8 bytes");
        assert_eq!(longest_string("not json \"abc"), 3);
        assert_eq!(longest_string(""), 0);

        // Against the real encoder: the longest string of a payload that encodes is within its
        // record.
        let s = schema("resource.created");
        for description in ["", "d", &"é\\n".repeat(1000), &"x".repeat(100_000)] {
            let payload = serde_json::to_string(&ResourceCreated {
                resource_id: uuid::Uuid::from_u128(1),
                name: "n".into(),
                description: description.into(),
                attributes: BTreeMap::from([("k".repeat(300), "v".into())]),
                version: 1,
                created_at: 1,
            })
            .unwrap();
            let framed = encode_payload(&payload, SchemaId(1), &s).unwrap();
            assert!(
                longest_string(&payload) <= framed.len(),
                "{description:.20}"
            );
            assert!(longest_string(&payload) >= description.len().min(300));
        }
    }
}
