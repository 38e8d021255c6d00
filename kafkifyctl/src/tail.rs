//! `kafkifyctl tail TOPIC`: records as JSON, their Confluent-framed Avro decoded through the
//! schema registry, with partition, offset, key and headers. `read_committed` unless asked
//! otherwise, so what it shows is what an exactly-once consumer sees.

use std::collections::BTreeMap;
use std::time::Duration;

use cdc_relay::config::Config;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use serde::Serialize;

use crate::kafka;

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The topic to read.
    pub topic: String,
    /// Start at each partition's beginning instead of its end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Only records with this key (the aggregate id).
    #[arg(long)]
    pub key: Option<String>,
    /// Stop after this many records (those the key filter keeps).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop once every partition's end, as it was when tail started, is reached
    /// (like kcat -e); without it, tail follows new records until interrupted.
    #[arg(long)]
    pub exit_at_end: bool,
    /// Show records of open and aborted transactions too.
    #[arg(long)]
    pub read_uncommitted: bool,
}

/// One record as printed.
#[derive(Debug, Serialize)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp, RFC 3339.
    pub timestamp: Option<String>,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// The registry's id of the value's schema, when the value is Confluent-framed.
    pub schema_id: Option<u32>,
    pub value: serde_json::Value,
    /// Why the value is shown raw: not Confluent-framed, or not decodable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undecoded: Option<String>,
}

impl Record {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} [{}] @{}  key={}  {}\n",
            self.topic,
            self.partition,
            self.offset,
            self.key.as_deref().unwrap_or("-"),
            self.timestamp.as_deref().unwrap_or("-"),
        );
        if !self.headers.is_empty() {
            let headers: Vec<String> = self
                .headers
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            out.push_str(&format!("  headers: {}\n", headers.join("  ")));
        }
        if let Some(why) = &self.undecoded {
            out.push_str(&format!("  (not decoded: {why})\n"));
        }
        out.push_str(&format!("  value: {}\n", self.value));
        out
    }
}

/// Reads and prints until the count, the end, or SIGINT/SIGTERM. Returns how many it printed.
pub async fn run(config: &Config, args: &TailArgs, json: bool) -> anyhow::Result<u64> {
    let consumer: StreamConsumer = {
        let mut c = config.kafka.client_config("kafkifyctl-tail");
        c.set("group.id", "kafkifyctl-tail")
            .set("enable.auto.commit", "false")
            .set(
                "isolation.level",
                if args.read_uncommitted {
                    "read_uncommitted"
                } else {
                    "read_committed"
                },
            );
        c.create()?
    };
    let (topic, from_beginning) = (args.topic.clone(), args.from_beginning);
    let (consumer, ends) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let Some(ends) = kafka::watermarks(&consumer, &topic).map_err(anyhow::Error::msg)? else {
            return Err(crate::Exit::usage(format!("topic {topic} does not exist")).into());
        };
        let mut tpl = TopicPartitionList::new();
        for (p, (low, high)) in &ends {
            let start = if from_beginning { *low } else { *high };
            tpl.add_partition_offset(&topic, *p, Offset::Offset(start))?;
        }
        consumer.assign(&tpl)?;
        Ok((consumer, ends))
    })
    .await??;
    let decoder = AvroDecoder::new(SrSettings::new(
        config.registry.schema_registry_url.0.clone(),
    ));
    // Where each partition must get to for --exit-at-end: its end when tail started, or
    // nothing to wait for when it starts there.
    let mut pending: BTreeMap<i32, i64> = ends
        .iter()
        .filter(|(_, (low, high))| args.from_beginning && high > low)
        .map(|(p, (_, high))| (*p, *high))
        .collect();
    let mut printed = 0u64;
    let shutdown = platform::shutdown::signal();
    tokio::pin!(shutdown);
    loop {
        if args.count.is_some_and(|n| printed >= n) || (args.exit_at_end && pending.is_empty()) {
            return Ok(printed);
        }
        let msg = tokio::select! {
            _ = &mut shutdown => return Ok(printed),
            m = consumer.recv() => m?,
            // With read_committed the position passes markers without a record to show: look
            // at it now and then, so --exit-at-end ends after a trailing commit marker too.
            _ = tokio::time::sleep(Duration::from_millis(500)), if args.exit_at_end => {
                let positions = consumer.position()?;
                pending.retain(|p, end| !kafka::reached(&positions, &args.topic, *p, *end));
                continue;
            }
        };
        if let Some(end) = pending.get(&msg.partition()) {
            if msg.offset() + 1 >= *end {
                pending.remove(&msg.partition());
            }
        }
        let record = decode(&decoder, &msg).await;
        if args
            .key
            .as_ref()
            .is_some_and(|k| record.key.as_ref() != Some(k))
        {
            continue;
        }
        if json {
            println!("{}", serde_json::to_string(&record)?);
        } else {
            print!("{}", record.render());
        }
        printed += 1;
    }
}

async fn decode(decoder: &AvroDecoder, msg: &BorrowedMessage<'_>) -> Record {
    let headers = kafka::headers(msg);
    let payload = msg.payload();
    let schema_id = schemas::confluent_schema_id(payload).ok();
    let (value, undecoded) = match schema_id {
        Some(_) => match platform::registry::read_avro(decoder, payload).await {
            Ok(v) => match serde_json::Value::try_from(v) {
                Ok(j) => (j, None),
                Err(e) => (raw(payload), Some(e.to_string())),
            },
            Err(e) => (raw(payload), Some(e.to_string())),
        },
        None => (raw(payload), None),
    };
    Record {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp: msg
            .timestamp()
            .to_millis()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        headers,
        schema_id,
        value,
        undecoded,
    }
}

/// A value that is not Confluent Avro: as JSON when it is JSON (the dead-letter records of
/// oversized events), as text when it is UTF-8, else as base64.
fn raw(payload: Option<&[u8]>) -> serde_json::Value {
    let Some(bytes) = payload else {
        return serde_json::Value::Null;
    };
    if let Ok(v) = serde_json::from_slice(bytes) {
        return v;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => serde_json::Value::String(s.to_string()),
        Err(_) => {
            use base64::Engine;
            serde_json::json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(bytes)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_are_not_avro_are_shown_as_json_text_or_base64() {
        assert_eq!(raw(None), serde_json::Value::Null);
        assert_eq!(raw(Some(br#"{"a":1}"#)), serde_json::json!({"a": 1}));
        assert_eq!(raw(Some(b"plain")), serde_json::json!("plain"));
        assert_eq!(
            raw(Some(&[0xff, 0x00])),
            serde_json::json!({"base64": "/wA="})
        );
    }
}
