//! The exactly-once checkpoint against the local Kafka: what a restarted relay reads back is
//! the last batch it committed, even while another producer's transaction is open on the
//! checkpoint topic. Every source of every relay shares that topic, so after a crash the
//! other sources' orphaned transactions stay open until their own sessions fence them.

use std::time::Duration;

use cdc_relay::checkpoint::Identity;
use cdc_relay::config::Delivery;
use cdc_relay::pgoutput::Lsn;
use cdc_relay::producer::{Command, Progress, Sink};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use test_support::{create_topics, delete_topics, stack, unique};

/// A source of a Postgres cluster with system identifier `system_id`.
fn source(system_id: &str, slot: &str) -> Identity {
    Identity {
        system_id: system_id.to_string(),
        database: "db".to_string(),
        slot: slot.to_string(),
        topic_prefix: String::new(),
    }
}

async fn sink(topic: &str, source: &Identity) -> Sink {
    Sink::create(
        stack().kafka_config(),
        Delivery::ExactlyOnce,
        topic,
        source,
        1,
    )
    .await
    .expect("sink")
}

/// Publishes one empty batch (just the checkpoint) up to `upto` and waits until it committed.
async fn commit_checkpoint(topic: &str, key: &Identity, upto: u64) {
    commit_through(sink(topic, key).await, upto).await;
}

async fn commit_through(sink: Sink, upto: u64) {
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
async fn restart_and_read(topic: &str, key: &Identity) -> Option<Lsn> {
    sink(topic, key)
        .await
        .read_checkpoint(stack().kafka_config())
        .await
        .expect("checkpoint read")
        .map(|c| c.lsn)
}

#[tokio::test]
async fn a_restart_reads_its_last_checkpoint_past_another_open_transaction() {
    let topics = create_topics(&["checkpoint"], 1).await;
    let topic = topics[0].clone();
    let key = source("1", &unique("slot"));

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
    commit_checkpoint(&topic, &source("1", &unique("slot")), 100).await;

    assert_eq!(
        restart_and_read(&topic, &source("1", &unique("slot"))).await,
        None
    );

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
    let key = source("1", &unique("slot"));
    commit_checkpoint(&topic, &key, 100).await;
    commit_checkpoint(&topic, &key, 300).await;
    other_sources_checkpoints(&topic, 100_000).await;

    // A source that was not running meanwhile: its checkpoint is in the oldest window.
    let started = std::time::Instant::now();
    assert_eq!(restart_and_read(&topic, &key).await, Some(Lsn(300)));
    let buried = started.elapsed();

    // A running source, busy or idle (an idle one writes its checkpoint again every 10 s):
    // its newest checkpoint is in the newest window, and wins.
    commit_checkpoint(&topic, &key, 400).await;
    let started = std::time::Instant::now();
    assert_eq!(restart_and_read(&topic, &key).await, Some(Lsn(400)));
    println!(
        "checkpoint read behind 100,000 other records: {:.2} s for a source that was stopped meanwhile, {:.2} s for a running one",
        buried.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    delete_topics(&topics).await;
}

#[tokio::test]
async fn deployments_with_the_same_slot_names_keep_their_own_checkpoints_and_producers() {
    let topics = create_topics(&["checkpoint"], 1).await;
    let topic = topics[0].clone();
    let slot = unique("slot");
    // Two Postgres clusters (staging and production, say) with the same databases and slot
    // names, and a third deployment on the first cluster publishing under another prefix.
    let production = source("7311", &slot);
    let staging = source("9999", &slot);
    let prefixed = Identity {
        topic_prefix: "other.".into(),
        ..production.clone()
    };
    commit_checkpoint(&topic, &production, 100).await;
    commit_checkpoint(&topic, &staging, 200).await;
    commit_checkpoint(&topic, &prefixed, 300).await;
    assert_eq!(restart_and_read(&topic, &production).await, Some(Lsn(100)));
    assert_eq!(restart_and_read(&topic, &staging).await, Some(Lsn(200)));
    assert_eq!(restart_and_read(&topic, &prefixed).await, Some(Lsn(300)));

    // Starting one does not fence the other: both commit afterwards.
    let a = sink(&topic, &production).await;
    let b = sink(&topic, &staging).await;
    commit_through(a, 101).await;
    commit_through(b, 201).await;
    assert_eq!(restart_and_read(&topic, &production).await, Some(Lsn(101)));
    assert_eq!(restart_and_read(&topic, &staging).await, Some(Lsn(201)));
    delete_topics(&topics).await;
}

#[tokio::test]
async fn the_first_start_after_an_upgrade_uses_the_slot_keyed_checkpoint_and_fences_the_old_relay()
{
    let topics = create_topics(&["checkpoint"], 1).await;
    let topic = topics[0].clone();
    let ours = source("7311", &unique("slot"));

    // A relay before namespacing: its checkpoint under the slot name, and a transaction still
    // open (a relay of the old version, still running during the roll-out).
    let old: FutureProducer = stack()
        .kafka_config()
        .set(
            "transactional.id",
            ours.legacy_transactional_ids()[0].clone(),
        )
        .create()
        .unwrap();
    let p = old.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("old relay starts");
    let old_commit = |lsn: &'static str| {
        let old = old.clone();
        let topic = topic.clone();
        let slot = ours.slot.clone();
        async move {
            let p = old.clone();
            tokio::task::spawn_blocking(move || p.begin_transaction())
                .await
                .unwrap()?;
            old.send(
                FutureRecord::to(&topic)
                    .key(&slot)
                    .payload(&format!(r#"{{"lsn":"{lsn}"}}"#))
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
            tokio::task::spawn_blocking(move || old.commit_transaction(Duration::from_secs(30)))
                .await
                .unwrap()
        }
    };
    old_commit("0/64").await.expect("old relay commits");

    assert_eq!(restart_and_read(&topic, &ours).await, Some(Lsn(0x64)));
    // The old relay was fenced: it cannot commit past what the new one read.
    assert!(
        old_commit("0/C8").await.is_err(),
        "the old relay still commits"
    );
    assert_eq!(restart_and_read(&topic, &ours).await, Some(Lsn(0x64)));

    // From the first commit on, the source's own key wins.
    commit_checkpoint(&topic, &ours, 0x70).await;
    assert_eq!(restart_and_read(&topic, &ours).await, Some(Lsn(0x70)));
    delete_topics(&topics).await;
}
