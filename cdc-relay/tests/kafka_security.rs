//! The Kafka TLS and SASL settings every binary shares (`platform::kafka::KafkaArgs`) against
//! the local broker's TLS listeners: mutual TLS and SASL PLAIN over TLS carry records both
//! ways, and a missing client certificate, a wrong password, an unknown CA or plaintext on a
//! TLS port is refused.

use std::time::Duration;

use clap::Parser;
use platform::kafka::KafkaArgs;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use test_support::{consumer_group, create_topics, delete_topics, kafka_tls, unique};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
}

/// The settings as a binary would read them (each `KAFKA_X` as `--kafka-x`, which also
/// overrides whatever the test's own environment holds).
fn args(settings: &[(&'static str, String)]) -> KafkaArgs {
    let mut argv = vec!["kafka-security".to_string()];
    for (name, value) in settings {
        argv.push(format!("--{}", name.to_lowercase().replace('_', "-")));
        argv.push(value.clone());
    }
    Cli::try_parse_from(argv).expect("settings parse").kafka
}

/// `settings` with `name` set to `value`.
fn with(
    mut settings: Vec<(&'static str, String)>,
    name: &'static str,
    value: &str,
) -> Vec<(&'static str, String)> {
    settings.retain(|(n, _)| *n != name);
    settings.push((name, value.to_string()));
    settings
}

/// `settings` without those named in `names`.
fn without(
    mut settings: Vec<(&'static str, String)>,
    names: &[&str],
) -> Vec<(&'static str, String)> {
    settings.retain(|(n, _)| !names.contains(n));
    settings
}

/// Produces a record through `kafka` and reads it back through `kafka`.
async fn round_trip(kafka: &KafkaArgs) {
    kafka.validate().expect("the settings are valid");
    let topics = create_topics(&["kafka-security"], 1).await;
    let value = unique("over-tls");
    let producer: FutureProducer = kafka.client_config("kafka-security").create().unwrap();
    producer
        .send(
            FutureRecord::to(&topics[0]).key("k").payload(&value),
            Duration::from_secs(20),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("delivered over the secured listener");
    let consumer: StreamConsumer = kafka
        .client_config("kafka-security")
        .set("group.id", consumer_group("kafka-security"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topics[0].as_str()]).unwrap();
    // Owned, so no message outlives the consumer: librdkafka's destroy waits for them.
    let got = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a record within 30 s")
        .expect("consumed over the secured listener")
        .detach();
    assert_eq!(got.payload(), Some(value.as_bytes()));
    drop(consumer);
    delete_topics(&topics).await;
}

/// What the binaries' readiness check says of the broker through `kafka`.
async fn probe(kafka: &KafkaArgs) -> Result<(), String> {
    let check = kafka.probe("kafka-security").unwrap();
    check().await
}

#[tokio::test]
async fn mutual_tls_carries_records_and_refuses_a_client_without_a_certificate() {
    let settings = kafka_tls::mutual();
    let kafka = args(&settings);
    probe(&kafka).await.expect("mutual TLS is accepted");
    round_trip(&kafka).await;

    let anonymous = without(
        settings.clone(),
        &["KAFKA_SSL_CERTIFICATE_LOCATION", "KAFKA_SSL_KEY_LOCATION"],
    );
    probe(&args(&anonymous))
        .await
        .expect_err("no client certificate");

    // The broker's certificate is signed by the local CA, which the system does not trust.
    let system_roots = without(settings.clone(), &["KAFKA_SSL_CA_LOCATION"]);
    probe(&args(&system_roots))
        .await
        .expect_err("a server certificate from an unknown CA");

    let plaintext = with(settings, "KAFKA_SECURITY_PROTOCOL", "plaintext");
    probe(&args(&plaintext))
        .await
        .expect_err("plaintext on a TLS port");
}

#[tokio::test]
async fn sasl_over_tls_carries_records_and_refuses_a_wrong_password() {
    let settings = kafka_tls::sasl();
    let kafka = args(&settings);
    probe(&kafka)
        .await
        .expect("SASL PLAIN over TLS is accepted");
    round_trip(&kafka).await;

    let wrong = with(settings, "KAFKA_SASL_PASSWORD", "not-the-password");
    let err = probe(&args(&wrong))
        .await
        .expect_err("a wrong SASL password");
    // /ready names the cause, not only the time-out it leads to.
    assert!(err.contains("SASL authentication error"), "{err}");
}
