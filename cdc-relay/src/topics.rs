//! The topics the relay writes, created at start-up when missing: brokers run with topic
//! auto-creation off, and a typo must not create a topic.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{Config, Delivery};
use crate::record::UNKNOWN_EVENT_TYPE_DLQ;

/// Every topic the relay may write: one per event type, its dead-letter topic, the topic for
/// unknown event types, and the compacted checkpoint topic.
pub fn wanted(config: &Config) -> Vec<(String, i32, bool)> {
    let mut out = Vec::new();
    for event_type in schemas::EVENT_TYPES {
        let topic = config.topic(event_type);
        out.push((schemas::dlq_topic(&topic), 1, false));
        out.push((topic, config.topic_partitions, false));
    }
    out.push((config.topic(UNKNOWN_EVENT_TYPE_DLQ), 1, false));
    // One partition: a source's checkpoints must stay in order, and reading them back is one scan.
    out.push((config.checkpoint_topic.clone(), 1, true));
    out
}

/// Creates what is missing; existing topics are left as they are.
pub async fn ensure(
    admin: &AdminClient<DefaultClientContext>,
    config: &Config,
) -> Result<(), String> {
    let wanted = wanted(config);
    let limit = config.max_record_bytes.to_string();
    let topics: Vec<NewTopic> = wanted
        .iter()
        .map(|(name, partitions, compacted)| {
            let t = NewTopic::new(name, *partitions, TopicReplication::Fixed(-1))
                .set("max.message.bytes", &limit);
            if *compacted {
                // Segments roll hourly, so the cleaner can compact all but the last hour: the
                // active segment is never compacted, and a restart reads back through it.
                t.set("cleanup.policy", "compact")
                    .set("segment.ms", "3600000")
            } else {
                t
            }
        })
        .collect();
    let results = admin
        .create_topics(
            &topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(|e| format!("creating topics: {e}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => return Err(format!("creating topic {topic}: {e}")),
        }
    }
    // Topics that existed before (made by hand, or by an earlier version) must take what the
    // relay will send, or one large event would fail its whole Kafka transaction.
    let names: Vec<&str> = wanted.iter().map(|(n, _, _)| n.as_str()).collect();
    let specifiers: Vec<ResourceSpecifier> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let described = admin
        .describe_configs(
            &specifiers,
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(|e| format!("reading topic configurations: {e}"))?;
    let mut limits = Vec::new();
    for (name, r) in names.iter().zip(described) {
        let resource = r.map_err(|e| format!("reading the configuration of topic {name}: {e}"))?;
        let value = resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<u64>().ok());
        limits.push((name.to_string(), value));
    }
    let checkpoint = &config.checkpoint_topic;
    let metadata = tokio::task::block_in_place(|| {
        admin
            .inner()
            .fetch_metadata(Some(checkpoint), Duration::from_secs(30))
    })
    .map_err(|e| format!("reading the metadata of topic {checkpoint}: {e}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    check(config, &limits, partitions)?;
    if config.delivery == Delivery::ExactlyOnce {
        let broker = metadata.brokers().first().map(|b| b.id()).unwrap_or(0);
        let described = admin
            .describe_configs(
                &[ResourceSpecifier::Broker(broker)],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .map_err(|e| format!("reading the configuration of broker {broker}: {e}"))?;
        let max = described
            .into_iter()
            .next()
            .and_then(|r| r.ok())
            .and_then(|r| {
                r.get("transaction.max.timeout.ms")
                    .and_then(|e| e.value.as_deref())
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(Duration::from_millis);
        check_transaction_timeout(config.transaction_timeout, max)?;
        tracing::info!(
            transaction_timeout = ?config.transaction_timeout,
            brokers_allow = ?max,
            "Kafka transactions: a Postgres transaction must stream within the transaction timeout"
        );
    }
    Ok(())
}

/// The broker refuses a producer whose transaction timeout exceeds its
/// `transaction.max.timeout.ms`; say so before, naming the setting.
pub fn check_transaction_timeout(ours: Duration, brokers: Option<Duration>) -> Result<(), String> {
    match brokers {
        Some(max) if ours > max => Err(format!(
            "RELAY_TRANSACTION_TIMEOUT is {ours:?}, above the brokers' \
             transaction.max.timeout.ms ({max:?}): lower it, or raise the brokers' limit"
        )),
        _ => Ok(()),
    }
}

/// Refuses topics that would break the relay: a `max.message.bytes` below
/// `RELAY_MAX_RECORD_BYTES`, or a checkpoint topic with other than one partition (checkpoints
/// of a source would be spread, and the one read back after a restart could be an old one).
pub fn check(
    config: &Config,
    limits: &[(String, Option<u64>)],
    checkpoint_partitions: usize,
) -> Result<(), String> {
    let ours = u64::from(config.max_record_bytes);
    let low: Vec<String> = limits
        .iter()
        .filter_map(|(topic, limit)| match limit {
            Some(l) if *l < ours => Some(format!("{topic} ({l})")),
            _ => None,
        })
        .collect();
    if !low.is_empty() {
        return Err(format!(
            "RELAY_MAX_RECORD_BYTES is {ours}, but these topics take less (max.message.bytes): {}. \
             Raise their max.message.bytes to at least {ours} (kafka-configs --alter \
             --add-config max.message.bytes={ours}), or lower RELAY_MAX_RECORD_BYTES",
            low.join(", ")
        ));
    }
    if checkpoint_partitions != 1 {
        return Err(format!(
            "checkpoint topic {} has {checkpoint_partitions} partitions; it must have exactly \
             one (RELAY_CHECKPOINT_TOPIC names a topic the relay creates, or that was created \
             with --partitions 1 and cleanup.policy=compact)",
            config.checkpoint_topic
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(limit: &str) -> Config {
        Config::try_parse_from([
            "cdc-relay",
            "--database-url",
            "postgres://relay@localhost/x",
            "--max-record-bytes",
            limit,
        ])
        .unwrap()
    }

    #[test]
    fn topics_below_the_record_limit_are_refused_naming_them_and_the_setting() {
        let c = config("2000000");
        let limits = vec![
            ("a".to_string(), Some(2_000_000)),
            ("b".to_string(), Some(1_048_588)),
            ("c".to_string(), None),
        ];
        let e = check(&c, &limits, 1).unwrap_err();
        assert!(e.contains("RELAY_MAX_RECORD_BYTES is 2000000"), "{e}");
        assert!(e.contains("b (1048588)"), "{e}");
        assert!(!e.contains("a ("), "{e}");
        assert!(check(&config("1048588"), &limits, 1).is_ok());
    }

    #[test]
    fn a_transaction_timeout_above_the_brokers_limit_is_refused_naming_both() {
        let s = Duration::from_secs;
        let e = check_transaction_timeout(s(901), Some(s(900))).unwrap_err();
        assert!(e.contains("RELAY_TRANSACTION_TIMEOUT is 901s"), "{e}");
        assert!(e.contains("transaction.max.timeout.ms (900s)"), "{e}");
        assert!(check_transaction_timeout(s(900), Some(s(900))).is_ok());
        assert!(
            check_transaction_timeout(s(60), None).is_ok(),
            "unknown: the broker decides"
        );
    }

    #[test]
    fn a_checkpoint_topic_must_have_one_partition() {
        let c = config("1048588");
        let e = check(&c, &[], 3).unwrap_err();
        assert!(e.contains("has 3 partitions"), "{e}");
        assert!(
            check(&c, &[], 0).is_err(),
            "a missing topic is not one partition"
        );
        assert!(check(&c, &[], 1).is_ok());
    }
}
