//! cdc-relay's settings: environment variables, overridable by flags.

use std::net::SocketAddr;
use std::str::FromStr;

use platform::config::CommonArgs;
use platform::db::PgUrl;
use platform::kafka::KafkaArgs;
use platform::registry::RegistryArgs;

#[derive(Debug, clap::Parser)]
#[command(
    name = "cdc-relay",
    version,
    about = "Tails the outbox tables through logical replication and publishes every committed event to Kafka as Avro."
)]
pub struct Config {
    /// Address of the /health, /ready and /metrics endpoints.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8091")]
    pub http_addr: SocketAddr,

    /// Connection for the relay's role (which has REPLICATION); the database part is replaced by
    /// each source's database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: PgUrl,

    /// Source databases to stream, comma-separated; each gets its own slot.
    #[arg(
        long,
        env = "RELAY_SOURCES",
        default_value = "rest,grpc,worker",
        value_delimiter = ','
    )]
    pub sources: Vec<Identifier>,

    /// Publication of the outbox inserts, present in every source database.
    #[arg(long, env = "RELAY_PUBLICATION", default_value = "kafkify_outbox")]
    pub publication: Identifier,

    /// Slot name prefix; the slot of source `rest` is `<prefix>rest`.
    #[arg(long, env = "RELAY_SLOT_PREFIX", default_value = "kafkify_")]
    pub slot_prefix: Identifier,

    /// Delivery guarantee into Kafka.
    #[arg(
        long,
        env = "RELAY_DELIVERY",
        value_enum,
        default_value = "exactly-once"
    )]
    pub delivery: Delivery,

    /// Prefix of every topic name (the topic of an event is `<prefix><event_type>`).
    #[arg(long, env = "RELAY_TOPIC_PREFIX", default_value = "", value_parser = parse_topic_prefix)]
    pub topic_prefix: String,

    /// Partitions of the event topics the relay creates when they are missing.
    #[arg(long, env = "RELAY_TOPIC_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10000))]
    pub topic_partitions: i32,

    /// Compacted topic holding each source's last committed LSN (exactly-once mode).
    #[arg(long, env = "RELAY_CHECKPOINT_TOPIC", default_value = "kafkify.relay.checkpoints", value_parser = parse_topic)]
    pub checkpoint_topic: String,

    /// A Kafka transaction is committed once it holds this many events…
    #[arg(long, env = "RELAY_BATCH_MAX_EVENTS", default_value_t = 10000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_max_events: u32,

    /// …or once its first event has waited this long.
    #[arg(long, env = "RELAY_BATCH_LINGER", default_value = "5ms", value_parser = platform::config::parse_duration)]
    pub batch_linger: std::time::Duration,

    /// The largest record the relay publishes, framing included; larger events are
    /// dead-lettered without their payload. Topics the relay creates get it as
    /// `max.message.bytes`, and existing topics with a lower limit are refused at start-up.
    /// Default: Kafka's own default `max.message.bytes`.
    #[arg(long, env = "RELAY_MAX_RECORD_BYTES", default_value_t = DEFAULT_MAX_RECORD_BYTES, value_parser = clap::value_parser!(u32).range(16_384..=1_000_000_000))]
    pub max_record_bytes: u32,

    /// Bytes of records a source holds on their way to Kafka (librdkafka's queues and the
    /// relay's chunks): what bounds the relay's memory for a Postgres transaction of any size.
    /// At least four times RELAY_MAX_RECORD_BYTES.
    #[arg(long, env = "RELAY_BUFFER_BYTES", default_value_t = 32 << 20, value_parser = clap::value_parser!(u64).range(1 << 20..=1 << 40))]
    pub buffer_bytes: u64,

    /// Replication messages (row changes, begins, commits) the replication client reads ahead
    /// of the relay, per source. They sit outside RELAY_BUFFER_BYTES: with rows up to N bytes
    /// the read-ahead holds at most this many times N, so lower it where rows are wide (1,024
    /// with rows near 1 MiB keeps it to about 1 GiB; the default suits rows of a few KiB).
    #[arg(long, env = "RELAY_READ_AHEAD", default_value_t = 8192, value_parser = clap::value_parser!(u64).range(16..=65_536))]
    pub read_ahead: u64,

    /// The Kafka transaction timeout (`transaction.timeout.ms`). A Postgres transaction is
    /// published in one Kafka transaction, so one that takes longer to stream is refused,
    /// with a message naming this setting. At most the brokers' transaction.max.timeout.ms.
    #[arg(long, env = "RELAY_TRANSACTION_TIMEOUT", default_value = "60s", value_parser = platform::config::parse_duration)]
    pub transaction_timeout: std::time::Duration,

    /// What to do when a source's slot is missing although Kafka holds a checkpoint for it
    /// (after a failover without the slot, a restore, or a dropped slot): `refuse` (the source
    /// stays stalled, naming the checkpoint), or `create` a new slot at the current position,
    /// accepting that events between the checkpoint and it may be missing (logged).
    #[arg(long, env = "RELAY_MISSING_SLOT", value_enum, default_value = "refuse")]
    pub missing_slot: MissingSlot,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingSlot {
    Refuse,
    Create,
}

/// Kafka's default `max.message.bytes` (1 MiB and 12 bytes).
pub const DEFAULT_MAX_RECORD_BYTES: u32 = 1_048_588;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Delivery {
    /// Transactional producer per source, checkpoint in the same Kafka transaction.
    ExactlyOnce,
    /// Idempotent producer, no transactions: a crash may repeat events.
    AtLeastOnce,
}

/// A Postgres name we splice into replication commands, so it is held to `[a-z0-9_]{1,63}`:
/// `START_REPLICATION` takes the slot name unquoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identifier(pub String);

impl FromStr for Identifier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Identifier(s.to_string()))
        } else {
            Err(format!("`{s}` must be 1–63 characters of a-z, 0-9 and _"))
        }
    }
}

/// Kafka topic names: 1–249 of `[a-zA-Z0-9._-]`.
fn parse_topic(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 249
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "`{s}` is not a valid Kafka topic name (1–249 of a-z A-Z 0-9 . _ -)"
        ));
    }
    Ok(s.to_string())
}

fn parse_topic_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    parse_topic(s)
}

impl Config {
    /// The slot (and checkpoint key, and transactional id suffix) of a source.
    pub fn slot(&self, source: &Identifier) -> String {
        format!("{}{}", self.slot_prefix.0, source.0)
    }

    /// Whose checkpoint a source's is, on the Postgres cluster `system_id` names: what the relay
    /// keys its checkpoints and transactional ids by, and what kafkifyctl reads them back by.
    pub fn identity(&self, source: &Identifier, system_id: String) -> crate::checkpoint::Identity {
        crate::checkpoint::Identity {
            system_id,
            database: source.0.clone(),
            slot: self.slot(source),
            topic_prefix: self.topic_prefix.clone(),
        }
    }

    /// The topic of an event type.
    pub fn topic(&self, event_type: &str) -> String {
        format!("{}{event_type}", self.topic_prefix)
    }

    /// Slot names must fit the same rule once prefixed.
    pub fn validate(&self) -> Result<(), String> {
        self.kafka.validate()?;
        if self.sources.is_empty() {
            return Err("RELAY_SOURCES: name at least one source database".into());
        }
        for source in &self.sources {
            let slot = self.slot(source);
            if slot.len() > 63 {
                return Err(format!(
                    "RELAY_SLOT_PREFIX: slot name `{slot}` for source `{}` is longer than 63 characters",
                    source.0
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.sources.iter().find(|s| !seen.insert(&s.0)) {
            return Err(format!("RELAY_SOURCES: `{}` is listed twice", dup.0));
        }
        if self.buffer_bytes < 4 * u64::from(self.max_record_bytes) + (4 << 10) {
            return Err(format!(
                "RELAY_BUFFER_BYTES ({}) must be at least four times RELAY_MAX_RECORD_BYTES ({}) \
                 and 4 KiB more: each of a source's two producers gets a quarter, and must hold \
                 the largest record",
                self.buffer_bytes, self.max_record_bytes
            ));
        }
        let timeout = self.transaction_timeout;
        if timeout < std::time::Duration::from_secs(1)
            || timeout > std::time::Duration::from_secs(3600)
        {
            return Err(format!(
                "RELAY_TRANSACTION_TIMEOUT: {timeout:?} is outside 1 s … 1 h"
            ));
        }
        Ok(())
    }

    /// The relay role's connection to one source database.
    pub fn source_url(&self, source: &Identifier) -> PgUrl {
        self.database_url.with_dbname(&source.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let mut full = vec![
            "cdc-relay",
            "--database-url",
            "postgres://relay:pw@127.0.0.1/postgres",
        ];
        full.extend_from_slice(args);
        Config::try_parse_from(full)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.sources.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            ["rest", "grpc", "worker"]
        );
        assert_eq!(c.delivery, Delivery::ExactlyOnce);
        assert_eq!(c.http_addr.port(), 8091);
        assert!(c.validate().is_ok());
        assert_eq!(
            c.source_url(&c.sources[1]).to_string(),
            "postgres://relay@127.0.0.1:5432/grpc"
        );
    }

    #[test]
    fn slot_names_are_held_to_safe_identifiers() {
        let err = parse(&["--sources", "rest,Grpc"]).unwrap_err();
        assert!(platform::config::describe::<Config>(&err)
            .contains("(environment variable RELAY_SOURCES)"));
        assert!(parse(&["--slot-prefix", "x; DROP"]).is_err());
        assert!(parse(&["--sources", "rest,rest"])
            .unwrap()
            .validate()
            .unwrap_err()
            .contains("twice"));
        let long = "p".repeat(60);
        assert!(parse(&["--slot-prefix", &long])
            .unwrap()
            .validate()
            .unwrap_err()
            .starts_with("RELAY_SLOT_PREFIX"));
    }

    #[test]
    fn topics() {
        let c = parse(&["--topic-prefix", "t1."]).unwrap();
        assert_eq!(c.topic("task.process"), "t1.task.process");
        assert!(parse(&["--topic-prefix", "a b"]).is_err());
        assert!(parse(&["--checkpoint-topic", ""]).is_err());
        assert!(parse(&["--topic-partitions", "0"]).is_err());
        assert_eq!(parse(&[]).unwrap().read_ahead, 8192);
        assert_eq!(parse(&["--read-ahead", "64"]).unwrap().read_ahead, 64);
        let refused = parse(&["--read-ahead", "8"]).unwrap_err().to_string();
        assert!(refused.contains("--read-ahead"), "{refused}");
        assert_eq!(
            parse(&[]).unwrap().batch_linger,
            std::time::Duration::from_millis(5)
        );
    }

    #[test]
    fn delivery_switch() {
        assert_eq!(
            parse(&["--delivery", "at-least-once"]).unwrap().delivery,
            Delivery::AtLeastOnce
        );
        assert!(parse(&["--delivery", "maybe"]).is_err());
    }
}
