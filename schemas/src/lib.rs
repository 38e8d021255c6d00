//! The event contract of Kafkify: one Avro schema per topic (the `.avsc` files beside this
//! crate, registered as `<topic>-value`) and the Rust type of each event.
//!
//! Writers build an event value and store `serde_json::to_value(&event)` as the outbox payload;
//! cdc-relay encodes that JSON with the topic's schema; readers decode the Avro record back into
//! the same type. The tests prove every type and its schema agree.

pub mod decode;

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

/// The topic poison messages of `topic` are dead-lettered to.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// The schema id of a Confluent-framed record (magic byte 0, then the id in 4 big-endian
/// bytes), checked before a registry is asked anything; the error says what is wrong.
pub fn confluent_schema_id(payload: Option<&[u8]>) -> Result<u32, String> {
    match payload {
        None => Err("empty record".into()),
        Some(b) if b.len() < 5 => Err(format!(
            "{} bytes is shorter than the 5-byte header",
            b.len()
        )),
        Some(b) if b[0] != 0 => Err(format!("magic byte is {}, not 0", b[0])),
        Some(b) => Ok(u32::from_be_bytes([b[1], b[2], b[3], b[4]])),
    }
}

/// The schema registry subject of a topic's values (TopicNameStrategy).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("unknown event type `{0}`")]
    UnknownEventType(String),
    #[error("schema of `{event_type}` does not parse: {source}")]
    Parse {
        event_type: String,
        #[source]
        source: Box<apache_avro::Error>,
    },
}

/// The parsed Avro schema of an event type.
pub fn schema(event_type: &str) -> Result<apache_avro::Schema, SchemaError> {
    let text =
        schema_text(event_type).ok_or_else(|| SchemaError::UnknownEventType(event_type.into()))?;
    apache_avro::Schema::parse_str(text).map_err(|source| SchemaError::Parse {
        event_type: event_type.into(),
        source: Box::new(source),
    })
}

/// An event: its topic, the aggregate it belongs to (the Kafka key) and its payload shape.
pub trait Event: Serialize + DeserializeOwned {
    /// The topic, and the `event_type` column of its outbox row.
    const EVENT_TYPE: &'static str;
    /// The `aggregate_type` column of its outbox row.
    const AGGREGATE_TYPE: &'static str;
    /// The Kafka message key: events of one aggregate keep their order.
    fn aggregate_id(&self) -> String;
}

/// Times are microseconds since the Unix epoch (Avro `timestamp-micros`).
pub type Micros = i64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceCreated {
    #[serde(with = "uuid_text")]
    pub resource_id: Uuid,
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    pub version: i64,
    pub created_at: Micros,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUpdated {
    #[serde(with = "uuid_text")]
    pub resource_id: Uuid,
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    pub version: i64,
    pub updated_at: Micros,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceDeleted {
    #[serde(with = "uuid_text")]
    pub resource_id: Uuid,
    pub version: i64,
    pub deleted_at: Micros,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProcess {
    #[serde(with = "uuid_text")]
    pub task_id: Uuid,
    pub task_type: String,
    /// The task's input as JSON text.
    pub input: String,
    pub created_at: Micros,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskOutcome {
    Completed,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCompleted {
    #[serde(with = "uuid_text")]
    pub task_id: Uuid,
    pub status: TaskOutcome,
    /// JSON text, when completed.
    pub result: Option<String>,
    /// Why, when failed.
    pub error: Option<String>,
    pub completed_at: Micros,
}

/// Uuids travel as their text form (Avro `string` with logical type `uuid`) whatever the
/// serializer prefers: the Avro serializer would otherwise pick 16 raw bytes.
mod uuid_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.as_hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Uuid::parse_str(&text).map_err(serde::de::Error::custom)
    }
}

/// The one table of event types: each type's `event_type` (its topic, and its schema file's
/// name), aggregate type and aggregate id field. Everything else that lists event types is
/// derived from it.
macro_rules! events {
    ($($ty:ty, $event_type:literal, $aggregate_type:literal, $id:ident;)*) => {
        $(
            impl Event for $ty {
                const EVENT_TYPE: &'static str = $event_type;
                const AGGREGATE_TYPE: &'static str = $aggregate_type;
                fn aggregate_id(&self) -> String {
                    self.$id.to_string()
                }
            }
        )*

        /// Every topic Kafkify publishes to, which is also every `event_type` an outbox row
        /// may carry.
        pub const EVENT_TYPES: [&str; [$($event_type),*].len()] = [$($event_type),*];

        /// The `.avsc` text of an event type, or `None` for a type Kafkify does not know.
        pub fn schema_text(event_type: &str) -> Option<&'static str> {
            Some(match event_type {
                $($event_type => include_str!(concat!("../", $event_type, ".avsc")),)*
                _ => return None,
            })
        }
    };
}

events! {
    ResourceCreated, "resource.created", "resource", resource_id;
    ResourceUpdated, "resource.updated", "resource", resource_id;
    ResourceDeleted, "resource.deleted", "resource", resource_id;
    TaskProcess, "task.process", "task", task_id;
    TaskCompleted, "task.completed", "task", task_id;
}

#[cfg(test)]
mod tests;
