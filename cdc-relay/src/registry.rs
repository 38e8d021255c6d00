//! Schema ids from the registry, fetched once per topic and cached: the registry is not called
//! per event. Every known schema is registered at start-up, so an incompatible change is refused
//! before the relay reads a single event (and it keeps retrying rather than dropping events).

use std::collections::HashMap;

use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{post_schema, SrSettings};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::encode::SchemaId;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry refused the schema of `{subject}`: {message}")]
    Refused { subject: String, message: String },
    #[error(transparent)]
    Schema(#[from] schemas::SchemaError),
}

/// Each event type's parsed schema and registry id.
pub struct SchemaCache {
    by_event_type: HashMap<&'static str, (SchemaId, Schema)>,
}

impl SchemaCache {
    /// Registers (or finds) every event type's schema under `<prefix><event_type>-value`.
    pub async fn register_all(
        registry_url: &str,
        topic_prefix: &str,
    ) -> Result<SchemaCache, RegistryError> {
        let settings = SrSettings::new(registry_url.to_string());
        let mut by_event_type = HashMap::new();
        for event_type in schemas::EVENT_TYPES {
            let schema = schemas::schema(event_type)?;
            let text = schemas::schema_text(event_type)
                .unwrap_or_default()
                .to_string();
            let subject = schemas::value_subject(&format!("{topic_prefix}{event_type}"));
            let registered = post_schema(
                &settings,
                subject.clone(),
                SuppliedSchema::new(None, SchemaType::Avro, text),
            )
            .await
            .map_err(|e| RegistryError::Refused {
                subject: subject.clone(),
                message: match &e.cause {
                    Some(cause) => format!("{}: {cause}", e.error),
                    None => e.error.clone(),
                },
            })?;
            by_event_type.insert(event_type, (SchemaId(registered.id), schema));
        }
        Ok(SchemaCache { by_event_type })
    }

    /// Every event type's schema with made-up ids, for tests that never reach a registry.
    #[cfg(test)]
    pub(crate) fn unregistered() -> SchemaCache {
        let by_event_type = schemas::EVENT_TYPES
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, (SchemaId(i as u32 + 1), schemas::schema(t).unwrap())))
            .collect();
        SchemaCache { by_event_type }
    }

    /// `None` for an event type Kafkify does not know.
    pub fn get(&self, event_type: &str) -> Option<&(SchemaId, Schema)> {
        self.by_event_type.get(event_type)
    }
}
