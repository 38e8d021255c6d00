//! The exactly-once checkpoint against the local Kafka: what a restarted relay reads back is
//! the last batch it committed, even while another producer's transaction is open on the
//! checkpoint topic. Every source of every relay shares that topic, so after a crash the
//! other sources' orphaned transactions stay open until their own sessions fence them.

use std::time::Duration;

use cdc_relay::config::Delivery;
use cdc_relay::pgoutput::Lsn;
use cdc_relay::producer::{Command, Progress, Sink};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use test_support::{create_topics, delete_topics, stack, unique};

/// Publishes one empty batch (just the checkpoint) up to `upto` and waits until it committed.
async fn commit_checkpoint(topic: &str, key: &str, upto: u64) {
    let sink = Sink::create(stack().kafka_config(), Delivery::ExactlyOnce, topic, key)
        .await
        .expect("sink");
    let (batches, mut progress) = sink.start::<()>();
    assert!(matches!(progress.recv().await, Some(Progress::Ready)));
    batches
        .send(Command::Commit {
            upto: Lsn(upto),
            meta: (),
        })
        .await
        .expect("pipeline takes the batch");
    loop {
        match progress.recv().await {
            Some(Progress::Ready) => {}
            Some(Progress::Acked { upto: acked, .. }) => {
                assert_eq!(acked, Lsn(upto));
                return;
            }
            Some(Progress::Failed(e)) => panic!("batch up to {upto} failed: {e}"),
            None => panic!("pipeline ended before acknowledging {upto}"),
        }
    }
}

/// What a relay restarting for `key` reads back, after fencing its earlier producers.
async fn restart_and_read(topic: &str, key: &str) -> Option<Lsn> {
    let sink = Sink::create(stack().kafka_config(), Delivery::ExactlyOnce, topic, key)
        .await
        .expect("sink");
    sink.read_checkpoint(stack().kafka_config())
        .await
        .expect("checkpoint read")
}

#[tokio::test]
async fn a_restart_reads_its_last_checkpoint_past_another_open_transaction() {
    let topics = create_topics(&["checkpoint"], 1).await;
    let topic = topics[0].clone();
    let key = unique("slot");

    commit_checkpoint(&topic, &key, 100).await;

    // Another source's batch, begun and never committed, as a SIGKILLed relay leaves it.
    let orphan: FutureProducer = stack()
        .kafka_config()
        .set("transactional.id", unique("orphan"))
        .create()
        .unwrap();
    let p = orphan.clone();
    tokio::task::spawn_blocking(move || {
        p.init_transactions(Duration::from_secs(30))?;
        p.begin_transaction()
    })
    .await
    .unwrap()
    .expect("orphan transaction begins");
    orphan
        .send(
            FutureRecord::to(&topic)
                .key("other-source")
                .payload(r#"{"lsn":"0/1"}"#)
                .partition(0),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("orphan record appended");

    // Committed after the orphan's record: above the partition's last stable offset.
    commit_checkpoint(&topic, &key, 200).await;

    // The orphan ends only while the restarted relay is reading, as when a slower source's
    // session fences its own producers.
    let aborter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::spawn_blocking(move || orphan.abort_transaction(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("orphan aborts");
    });

    let checkpoint = restart_and_read(&topic, &key).await;
    aborter.await.unwrap();
    // 100 here would re-publish everything between the two checkpoints.
    assert_eq!(checkpoint, Some(Lsn(200)));

    delete_topics(&topics).await;
}

#[tokio::test]
async fn a_source_that_never_committed_has_no_checkpoint() {
    let topics = create_topics(&["checkpoint"], 1).await;
    let topic = topics[0].clone();
    commit_checkpoint(&topic, &unique("slot"), 100).await;

    assert_eq!(restart_and_read(&topic, &unique("slot")).await, None);

    delete_topics(&topics).await;
}

/// Appends `n` checkpoint records of other sources, as a long-running relay leaves them in the
/// never-compacted active segment.
async fn other_sources_checkpoints(topic: &str, n: usize) {
    let others: FutureProducer = stack().kafka_config().create().unwrap();
    let keys: Vec<String> = (0..7).map(|i| format!("other-{i}")).collect();
    let mut sends = Vec::with_capacity(n);
    for i in 0..n {
        let record = FutureRecord::to(topic)
            .key(keys[i % 7].as_str())
            .payload(r#"{"lsn":"0/1"}"#)
            .partition(0);
        sends.push(
            others
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queued"),
        );
    }
    for s in sends {
        s.await.unwrap().map_err(|(e, _)| e).expect("appended");
    }
}

#[tokio::test]
async fn among_a_hundred_thousand_checkpoints_the_newest_of_a_source_is_read() {
    let topics = create_topics(&["checkpoint"], 1).await;
    let topic = topics[0].clone();
    let key = unique("slot");
    commit_checkpoint(&topic, &key, 100).await;
    commit_checkpoint(&topic, &key, 300).await;
    other_sources_checkpoints(&topic, 100_000).await;

    // A source idle since: its checkpoint is in the oldest window.
    let started = std::time::Instant::now();
    assert_eq!(restart_and_read(&topic, &key).await, Some(Lsn(300)));
    let idle = started.elapsed();

    // A busy source: its newest checkpoint is in the newest window, and wins.
    commit_checkpoint(&topic, &key, 400).await;
    let started = std::time::Instant::now();
    assert_eq!(restart_and_read(&topic, &key).await, Some(Lsn(400)));
    println!(
        "checkpoint read behind 100,000 other records: {:.2} s for an idle source, {:.2} s for a busy one",
        idle.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    delete_topics(&topics).await;
}
