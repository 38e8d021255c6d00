//! Every event type and its schema agree: a value of the type encodes under the schema and
//! decodes back to the same value, and the schema names exactly the type's fields.

use super::*;
use apache_avro::types::Value;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn round_trip<E: Event + PartialEq + std::fmt::Debug>(event: E) {
    let schema = schema(E::EVENT_TYPE).unwrap();
    let value = apache_avro::to_value(&event)
        .unwrap()
        .resolve(&schema)
        .unwrap_or_else(|e| {
            panic!("{} does not fit its schema: {e}", E::EVENT_TYPE);
        });
    let mut bytes = Vec::new();
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap();
    writer.write_value_ref(&mut bytes, &value).unwrap();
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .unwrap();
    let decoded = reader.read_value(&mut bytes.as_slice()).unwrap();
    assert_eq!(decoded, value);
    let back: E = apache_avro::from_value(&decoded).unwrap();
    assert_eq!(back, event);

    // The JSON payload a writer stores has exactly the schema's field names.
    let json = serde_json::to_value(&event).unwrap();
    let json_fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let Value::Record(fields) = &value else {
        panic!("not a record")
    };
    let mut schema_fields: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
    schema_fields.sort_unstable();
    assert_eq!(json_fields, schema_fields, "{}", E::EVENT_TYPE);
}

#[test]
fn resource_events_fit_their_schemas() {
    let attributes = BTreeMap::from([("colour".to_string(), "blue".to_string())]);
    round_trip(ResourceCreated {
        resource_id: id(1),
        name: "a".into(),
        description: "ü".into(),
        attributes: attributes.clone(),
        version: 1,
        created_at: 1_700_000_000_000_000,
    });
    round_trip(ResourceUpdated {
        resource_id: id(1),
        name: "b".into(),
        description: String::new(),
        attributes,
        version: 2,
        updated_at: 1_700_000_000_000_001,
    });
    round_trip(ResourceDeleted {
        resource_id: id(1),
        version: 2,
        deleted_at: 3,
    });
}

#[test]
fn task_events_fit_their_schemas() {
    round_trip(TaskProcess {
        task_id: id(7),
        task_type: "checksum".into(),
        input: r#"{"n":1}"#.into(),
        created_at: 5,
    });
    for status in [TaskOutcome::Completed, TaskOutcome::Failed] {
        round_trip(TaskCompleted {
            task_id: id(7),
            status,
            result: (status == TaskOutcome::Completed).then(|| "{}".into()),
            error: (status == TaskOutcome::Failed).then(|| "boom".into()),
            completed_at: 6,
        });
    }
}

#[test]
fn every_event_type_has_a_parsable_schema() {
    for event_type in EVENT_TYPES {
        let schema = schema(event_type).unwrap();
        assert!(
            matches!(schema, apache_avro::Schema::Record(_)),
            "{event_type}"
        );
    }
    assert!(matches!(
        schema("resource.exploded"),
        Err(SchemaError::UnknownEventType(_))
    ));
    assert_eq!(value_subject("task.process"), "task.process-value");
    assert_eq!(dlq_topic("task.process"), "task.process.dlq");
}
