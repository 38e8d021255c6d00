//! The topics the relay writes, created at start-up when missing: brokers run with topic
//! auto-creation off, and a typo must not create a topic.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;
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
    let topics: Vec<NewTopic> = wanted
        .iter()
        .map(|(name, partitions, compacted)| {
            let t = NewTopic::new(name, *partitions, TopicReplication::Fixed(-1));
            if *compacted {
                t.set("cleanup.policy", "compact")
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
    Ok(())
}
