//! From a Kafka record's value to a checked event: the Confluent framing, the Avro datum's
//! event, and the domain rules. Pure: no I/O. What fails is poison, never a panic (the fuzz
//! targets hold it to that).

use crate::{Event, ResourceCreated, ResourceDeleted, ResourceUpdated, TaskProcess};

/// A decoded, checked event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    ResourceCreated(ResourceCreated),
    ResourceUpdated(ResourceUpdated),
    ResourceDeleted(ResourceDeleted),
    TaskProcess(TaskProcess),
}

impl Decoded {
    pub fn event_type(&self) -> &'static str {
        match self {
            Decoded::ResourceCreated(_) => ResourceCreated::EVENT_TYPE,
            Decoded::ResourceUpdated(_) => ResourceUpdated::EVENT_TYPE,
            Decoded::ResourceDeleted(_) => ResourceDeleted::EVENT_TYPE,
            Decoded::TaskProcess(_) => TaskProcess::EVENT_TYPE,
        }
    }

    /// The payload as JSON text, for `processed_events.payload` (straight from the event, no
    /// intermediate JSON tree: this runs once per record).
    pub fn payload(&self) -> String {
        match self {
            Decoded::ResourceCreated(e) => serde_json::to_string(e),
            Decoded::ResourceUpdated(e) => serde_json::to_string(e),
            Decoded::ResourceDeleted(e) => serde_json::to_string(e),
            Decoded::TaskProcess(e) => serde_json::to_string(e),
        }
        // Our own types hold only strings, numbers and maps of strings: this cannot fail.
        .unwrap_or_else(|_| "{}".into())
    }
}

/// Why a record is poison: it goes to the dead-letter topic with this as its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    #[error("not Confluent Avro: {0}")]
    Framing(String),
    #[error("unknown schema id: {0}")]
    UnknownSchema(String),
    #[error("undecodable body: {0}")]
    Body(String),
    #[error("header `{0}` is missing or malformed")]
    Header(&'static str),
    #[error("violates the domain rules: {0}")]
    Domain(String),
    #[error("no event type is read from topic `{0}`")]
    Topic(String),
}

impl Poison {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Poison::Framing(_) => "framing",
            Poison::UnknownSchema(_) => "unknown_schema",
            Poison::Body(_) => "body",
            Poison::Header(_) => "header",
            Poison::Domain(_) => "domain",
            Poison::Topic(_) => "topic",
        }
    }
}

/// Caps what one Avro length prefix may make the decoder allocate. apache-avro's default is
/// 512 MiB, so a hostile record of a few bytes could claim that much; no real event comes
/// near the cap (Kafka's records are about 1 MiB at most). The first call wins.
pub fn limit_avro_allocations() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        apache_avro::util::max_allocation_bytes(16 * 1024 * 1024);
    });
}

/// Checks the Confluent framing (magic byte 0 and a 4-byte schema id) before the registry is
/// asked anything; returns the schema id.
pub fn schema_id(payload: Option<&[u8]>) -> Result<u32, Poison> {
    crate::confluent_schema_id(payload).map_err(Poison::Framing)
}

/// Turns a decoded Avro value into the event of `event_type` and checks its domain rules.
pub fn event(event_type: &str, value: &apache_avro::types::Value) -> Result<Decoded, Poison> {
    let body = |e: apache_avro::Error| Poison::Body(e.to_string());
    let decoded = match event_type {
        ResourceCreated::EVENT_TYPE => {
            Decoded::ResourceCreated(apache_avro::from_value(value).map_err(body)?)
        }
        ResourceUpdated::EVENT_TYPE => {
            Decoded::ResourceUpdated(apache_avro::from_value(value).map_err(body)?)
        }
        ResourceDeleted::EVENT_TYPE => {
            Decoded::ResourceDeleted(apache_avro::from_value(value).map_err(body)?)
        }
        TaskProcess::EVENT_TYPE => {
            Decoded::TaskProcess(apache_avro::from_value(value).map_err(body)?)
        }
        other => return Err(Poison::Topic(other.to_string())),
    };
    let rule = |ok: bool, why: &str| {
        if ok {
            Ok(())
        } else {
            Err(Poison::Domain(why.to_string()))
        }
    };
    match &decoded {
        Decoded::ResourceCreated(e) => {
            rule(!e.name.is_empty(), "a resource needs a name")?;
            rule(e.version == 1, "a created resource is at version 1")?;
        }
        Decoded::ResourceUpdated(e) => {
            rule(!e.name.is_empty(), "a resource needs a name")?;
            rule(e.version > 1, "an updated resource is past version 1")?;
        }
        Decoded::ResourceDeleted(e) => rule(e.version >= 1, "versions start at 1")?,
        Decoded::TaskProcess(e) => {
            rule(!e.task_type.is_empty(), "a task needs a type")?;
            rule(
                serde_json::from_str::<serde_json::Value>(&e.input).is_ok(),
                "a task's input is JSON",
            )?;
        }
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;

    #[test]
    fn framing_is_checked_before_the_registry() {
        assert_eq!(schema_id(Some(&[0, 0, 0, 1, 7, 9])), Ok(263));
        assert!(
            matches!(schema_id(Some(&[1, 0, 0, 0, 1])), Err(Poison::Framing(m)) if m == "magic byte is 1, not 0")
        );
        assert!(matches!(schema_id(Some(&[0, 0])), Err(Poison::Framing(_))));
        assert!(matches!(schema_id(None), Err(Poison::Framing(_))));
    }

    fn task_value(task_type: &str, input: &str) -> Value {
        Value::Record(vec![
            (
                "task_id".into(),
                Value::String("00000000-0000-0000-0000-000000000001".into()),
            ),
            ("task_type".into(), Value::String(task_type.into())),
            ("input".into(), Value::String(input.into())),
            ("created_at".into(), Value::TimestampMicros(1)),
        ])
    }

    #[test]
    fn domain_rules() {
        assert!(matches!(
            event("task.process", &task_value("checksum", "{}")),
            Ok(Decoded::TaskProcess(_))
        ));
        assert_eq!(
            event("task.process", &task_value("", "{}"))
                .unwrap_err()
                .kind(),
            "domain"
        );
        assert_eq!(
            event("task.process", &task_value("x", "not json"))
                .unwrap_err()
                .kind(),
            "domain"
        );
        assert_eq!(
            event("resource.created", &task_value("x", "{}"))
                .unwrap_err()
                .kind(),
            "body"
        );
        assert_eq!(
            event("task.completed", &task_value("x", "{}"))
                .unwrap_err()
                .kind(),
            "topic"
        );
    }
}
