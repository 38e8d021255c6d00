//! Any bytes as a Kafka record value of each event type, decoded the way the worker does:
//! Confluent framing, the Avro datum against the event's schema, then the domain checks. Each
//! step returns a value or poison (which the worker dead-letters), never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schemas::decode::{event, schema_id};

const TYPES: [&str; 4] = [
    "resource.created",
    "resource.updated",
    "resource.deleted",
    "task.process",
];

fuzz_target!(|data: &[u8]| {
    schemas::decode::limit_avro_allocations();
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let event_type = TYPES[pick as usize % TYPES.len()];
    if schema_id(Some(payload)).is_err() {
        return;
    }
    let schema = schemas::schema(event_type).expect("every event type has a schema");
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .expect("the schema resolves");
    let mut datum = &payload[5..];
    if let Ok(value) = reader.read_value(&mut datum) {
        let _ = event(event_type, &value);
    }
});
