//! What `status` reads of Kafka: records in the dead-letter topics, and each consumer group's
//! lag (high watermark − committed offset, as `kafka-consumer-groups --describe` counts it).
//! librdkafka's metadata and offset calls block, so they run off the async threads.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use cdc_relay::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;

const CALL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Serialize)]
pub struct TopicCount {
    pub topic: String,
    /// Committed records (transaction markers and aborted records not counted); `None` when
    /// the topic does not exist.
    pub records: Option<u64>,
    /// False when counting stopped at its time limit: `records` is then a lower bound.
    pub complete: bool,
}

impl TopicCount {
    pub fn records_text(&self) -> String {
        match (self.records, self.complete) {
            (None, _) => "no such topic".into(),
            (Some(n), true) => n.to_string(),
            (Some(n), false) => format!("at least {n} (still counting after the time limit)"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupLag {
    pub group: String,
    pub topic: String,
    /// Partitions the group has committed offsets for.
    pub partitions: usize,
    pub lag: i64,
}

/// Every dead-letter topic the relay and the worker write: `<topic>.dlq` of each event topic,
/// and the relay's topic for unknown event types.
pub fn dead_letter_topics(config: &Config) -> Vec<String> {
    cdc_relay::topics::wanted(config)
        .into_iter()
        .map(|(name, _, _)| name)
        .filter(|name| name.ends_with(".dlq"))
        .collect()
}

pub async fn dead_letter_counts(config: &Config) -> Result<Vec<TopicCount>, String> {
    let base = config.kafka.client_config("kafkifyctl");
    let topics = dead_letter_topics(config);
    blocking(move || {
        topics
            .into_iter()
            .map(|t| count_committed(&base, &t, Duration::from_secs(10)))
            .collect()
    })
    .await
}

/// Counts what a `read_committed` consumer reads from the beginning to the current end.
fn count_committed(
    base: &ClientConfig,
    topic: &str,
    limit: Duration,
) -> Result<TopicCount, String> {
    let mut records = 0u64;
    let scanned = scan(base, topic, limit, |_| records += 1)?;
    Ok(TopicCount {
        topic: topic.to_string(),
        records: scanned.map(|_| records),
        complete: scanned.unwrap_or(true),
    })
}

/// Hands every committed record of `topic`, from each partition's beginning to its end as it
/// is now, to `each`. `None` when the topic does not exist, else whether the scan got to the
/// end within `limit`.
pub fn scan(
    base: &ClientConfig,
    topic: &str,
    limit: Duration,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<Option<bool>, String> {
    let consumer: BaseConsumer = reader(base, "kafkifyctl-scan")?;
    let Some(marks) = watermarks(&consumer, topic)? else {
        return Ok(None);
    };
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for (p, (low, high)) in marks {
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))
                .map_err(|e| e.to_string())?;
            ends.insert(p, high);
        }
    }
    if ends.is_empty() {
        return Ok(Some(true));
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        let positions = consumer.position().map_err(|e| e.to_string())?;
        let done = ends
            .iter()
            .all(|(p, end)| reached(&positions, topic, *p, *end));
        if done || start.elapsed() > limit {
            return Ok(Some(done));
        }
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg.map_err(|e| format!("reading {topic}: {e}"))?;
            if ends
                .get(&msg.partition())
                .is_some_and(|end| msg.offset() < *end)
            {
                each(&msg);
            }
        }
    }
}

pub async fn group_lags(config: &Config) -> Result<Vec<GroupLag>, String> {
    let base = config.kafka.client_config("kafkifyctl");
    blocking(move || {
        let consumer: BaseConsumer = reader(&base, "kafkifyctl-groups")?;
        let groups = consumer
            .fetch_group_list(None, CALL)
            .map_err(|e| format!("listing consumer groups: {e}"))?;
        let metadata = consumer
            .fetch_metadata(None, CALL)
            .map_err(|e| format!("reading the cluster's metadata: {e}"))?;
        let mut all = TopicPartitionList::new();
        for t in metadata.topics() {
            if t.name().starts_with("__") {
                continue;
            }
            for p in t.partitions() {
                all.add_partition(t.name(), p.id());
            }
        }
        let mut highs: HashMap<(String, i32), i64> = HashMap::new();
        let mut out = Vec::new();
        let mut names: Vec<String> = groups
            .groups()
            .iter()
            .filter(|g| matches!(g.protocol_type(), "consumer" | ""))
            .map(|g| g.name().to_string())
            .collect();
        names.sort();
        for group in names {
            let member: BaseConsumer = base
                .clone()
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create()
                .map_err(|e| e.to_string())?;
            let committed = member
                .committed_offsets(all.clone(), CALL)
                .map_err(|e| format!("committed offsets of group {group}: {e}"))?;
            let mut by_topic: BTreeMap<String, (usize, i64)> = BTreeMap::new();
            for e in committed.elements() {
                let Offset::Offset(at) = e.offset() else {
                    continue;
                };
                let key = (e.topic().to_string(), e.partition());
                let high = match highs.get(&key) {
                    Some(h) => *h,
                    None => {
                        let (_, h) = consumer
                            .fetch_watermarks(e.topic(), e.partition(), CALL)
                            .map_err(|err| {
                                format!("offsets of {}/{}: {err}", e.topic(), e.partition())
                            })?;
                        highs.insert(key, h);
                        h
                    }
                };
                let entry = by_topic.entry(e.topic().to_string()).or_default();
                entry.0 += 1;
                entry.1 += (high - at).max(0);
            }
            for (topic, (partitions, lag)) in by_topic {
                out.push(GroupLag {
                    group: group.clone(),
                    topic,
                    partitions,
                    lag,
                });
            }
        }
        Ok(out)
    })
    .await
}

/// A consumer that never commits and reads only committed records.
pub fn reader<T: rdkafka::config::FromClientConfig>(
    base: &ClientConfig,
    group: &str,
) -> Result<T, String> {
    base.clone()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| format!("Kafka client: {e}"))
}

/// Each partition's (low, high) watermarks.
pub type Watermarks = BTreeMap<i32, (i64, i64)>;

/// A topic's [`Watermarks`], `None` when the topic does not exist.
pub fn watermarks(consumer: &impl Consumer, topic: &str) -> Result<Option<Watermarks>, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), CALL)
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let Some(t) = metadata.topics().first() else {
        return Ok(None);
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Ok(None);
    }
    let mut out = BTreeMap::new();
    for p in t.partitions() {
        let marks = consumer
            .fetch_watermarks(topic, p.id(), CALL)
            .map_err(|e| format!("offsets of {topic}/{}: {e}", p.id()))?;
        out.insert(p.id(), marks);
    }
    Ok(Some(out))
}

/// Whether the consumer's position in `topic`/`partition` is at `end` or past it. With
/// read_committed the position also passes markers and aborted records, so it gets there once
/// every transaction open below `end` has ended, whether or not a record was left to read.
pub fn reached(positions: &TopicPartitionList, topic: &str, partition: i32, end: i64) -> bool {
    positions
        .find_partition(topic, partition)
        .and_then(|e| e.offset().to_raw())
        .is_some_and(|at| at >= end)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

/// A record's headers, values as text.
pub fn headers(msg: &BorrowedMessage<'_>) -> BTreeMap<String, String> {
    use rdkafka::message::Headers;
    let mut out = BTreeMap::new();
    if let Some(h) = msg.headers() {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.insert(header.key.to_string(), value);
        }
    }
    out
}

/// Creates a one-partition compacted topic (a log keyed by what it records) unless it exists.
pub async fn ensure_compacted(config: &Config, name: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    use rdkafka::types::RDKafkaErrorCode;
    let admin = config
        .kafka
        .admin("kafkifyctl")
        .map_err(anyhow::Error::msg)?;
    let topic =
        NewTopic::new(name, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    let results = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("creating topic {t}: {e}"),
        }
    }
    Ok(())
}

/// A transactional producer with the relay's delivery settings, its `init_transactions` done:
/// every earlier producer with `id` is fenced and its open transaction aborted.
pub async fn transactional(
    config: &Config,
    client_id: &str,
    id: &str,
) -> anyhow::Result<rdkafka::producer::FutureProducer> {
    use rdkafka::producer::Producer;
    let producer: rdkafka::producer::FutureProducer = config
        .kafka
        .client_config(client_id)
        .set("transactional.id", id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("message.max.bytes", config.max_record_bytes.to_string())
        .create()?;
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(60))).await??;
    Ok(producer)
}

/// Commits the producer's open transaction.
pub async fn commit(producer: &rdkafka::producer::FutureProducer) -> anyhow::Result<()> {
    use rdkafka::producer::Producer;
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.commit_transaction(Duration::from_secs(60))).await??;
    Ok(())
}

/// [`scan`] off the async threads, for the whole topic: `acc` gets every committed record, and
/// is returned once the end is reached (an error when it is not within a minute; a topic that
/// does not exist is empty).
pub async fn read_all<T: Send + 'static>(
    config: &Config,
    topic: &str,
    mut acc: T,
    mut each: impl FnMut(&mut T, &BorrowedMessage<'_>) + Send + 'static,
) -> anyhow::Result<T> {
    let base = config.kafka.client_config("kafkifyctl-read");
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<T> {
        let complete = scan(&base, &topic, Duration::from_secs(60), |msg| {
            each(&mut acc, msg)
        })
        .map_err(anyhow::Error::msg)?;
        if complete == Some(false) {
            anyhow::bail!("{topic} could not be read to its end within 60 s");
        }
        Ok(acc)
    })
    .await?
}

/// Sends one of the relay's records inside the producer's open transaction: its headers but
/// those named in `drop`, then `extra`.
pub fn send(
    producer: &rdkafka::producer::FutureProducer,
    record: &cdc_relay::encode::KafkaRecord,
    drop: &[&str],
    extra: &[(&str, &str)],
) -> anyhow::Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut headers = OwnedHeaders::new();
    for (k, v) in &record.headers {
        if !drop.contains(k) {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_str()),
            });
        }
    }
    for (k, v) in extra {
        headers = headers.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    producer
        .send_result(
            rdkafka::producer::FutureRecord::to(&record.topic)
                .key(record.key.as_bytes())
                .payload(&record.value)
                .headers(headers),
        )
        .map_err(|(e, _)| e)?;
    Ok(())
}
