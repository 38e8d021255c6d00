//! The local schema registry speaks the Confluent REST API that schema_registry_converter uses:
//! a schema is registered under `<topic>-value`, and a record framed with its id decodes by
//! fetching the schema back by id.

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use test_support::{stack, unique};

#[tokio::test]
async fn a_schema_registers_and_is_fetched_back_by_id() {
    let url = stack().schema_registry_url.clone();
    let topic = unique("smoke.registry");
    let schema = schemas::schema_text("task.process").unwrap().to_string();
    let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
        topic.clone(),
        false,
        SuppliedSchema::new(None, SchemaType::Avro, schema),
    );
    let encoder = AvroEncoder::new(SrSettings::new(url.clone()));
    let fields = vec![
        ("task_id", Value::Uuid(uuid::Uuid::from_u128(42))),
        ("task_type", Value::String("checksum".into())),
        ("input", Value::String("{}".into())),
        ("created_at", Value::TimestampMicros(1_700_000_000_000_000)),
    ];
    let bytes = encoder
        .encode(fields.clone(), strategy)
        .await
        .expect("register and encode");

    // Confluent framing: magic byte 0, then the id the registry gave the subject's schema.
    assert_eq!(bytes[0], 0);
    let id = u32::from_be_bytes(bytes[1..5].try_into().unwrap());
    let subject: serde_json::Value =
        reqwest::get(format!("{url}/subjects/{topic}-value/versions/latest"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(subject["id"].as_u64(), Some(u64::from(id)), "{subject}");

    // A fresh decoder has no cache: it must fetch the schema by id.
    let decoded = AvroDecoder::new(SrSettings::new(url))
        .decode(Some(&bytes))
        .await
        .expect("decode by id");
    let Value::Record(got) = decoded.value else {
        panic!("not a record: {:?}", decoded.value)
    };
    let want: Vec<(String, Value)> = fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(got, want);
}
