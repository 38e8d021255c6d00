//! The local Kafka runs transactions: a transactional producer's committed records are visible
//! to a read_committed consumer and an aborted transaction's are not.

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::Message;
use test_support::{consumer_group, create_topics, delete_topics, stack, unique};

async fn send(producer: &FutureProducer, topic: &str, value: &str) {
    producer
        .send(
            FutureRecord::to(topic).key("k").payload(value).partition(0),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("send");
}

/// Reads partition 0 from the start until `until` arrives; returns every value seen.
async fn read_all(topic: &str, isolation: &str, until: &str) -> Vec<String> {
    let consumer: StreamConsumer = stack()
        .kafka_config()
        .set("group.id", consumer_group("smoke"))
        .set("isolation.level", isolation)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let msg = consumer.recv().await.expect("consume");
            let value = String::from_utf8(msg.payload().unwrap().to_vec()).unwrap();
            let done = value == until;
            seen.push(value);
            if done {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("`{until}` did not arrive within 30 s; saw {seen:?}"));
    seen
}

#[tokio::test]
async fn read_committed_sees_commits_and_never_aborts() {
    let topics = create_topics(&["smoke.tx"], 1).await;
    let topic = &topics[0];
    let producer: FutureProducer = stack()
        .kafka_config()
        .set("transactional.id", unique("smoke-tx"))
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init_transactions");

    producer.begin_transaction().unwrap();
    send(&producer, topic, "committed-1").await;
    send(&producer, topic, "committed-2").await;
    producer
        .commit_transaction(Duration::from_secs(10))
        .unwrap();

    producer.begin_transaction().unwrap();
    send(&producer, topic, "aborted").await;
    producer.abort_transaction(Duration::from_secs(10)).unwrap();

    producer.begin_transaction().unwrap();
    send(&producer, topic, "committed-3").await;
    producer
        .commit_transaction(Duration::from_secs(10))
        .unwrap();

    assert_eq!(
        read_all(topic, "read_committed", "committed-3").await,
        ["committed-1", "committed-2", "committed-3"]
    );
    // The aborted record is in the log: a reader that ignores transactions sees it, which is
    // what makes the assertion above mean something.
    assert_eq!(
        read_all(topic, "read_uncommitted", "committed-3").await,
        ["committed-1", "committed-2", "aborted", "committed-3"]
    );
    delete_topics(&topics).await;
}
