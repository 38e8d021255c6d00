//! The relay's metrics (prefix `kafkify_cdc_relay_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabel {
    pub topic: String,
    /// One of `record::reason`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub source: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `deliver`, `previous` or `end_txn` (see `producer::Phases`).
    pub phase: &'static str,
}

fn latency_buckets() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[derive(Clone)]
pub struct Metrics {
    pub events_published: Family<TopicLabel, Counter>,
    pub events_dead_lettered: Family<DeadLetterLabel, Counter>,
    pub commit_to_ack: Histogram,
    pub kafka_transaction: Histogram,
    pub kafka_transaction_phase: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    pub commit_to_read: Histogram,
    pub batch_events: Histogram,
    pub slot_lag: Family<SourceLabel, Gauge>,
    pub failover_ready: Family<SourceLabel, Gauge>,
    pub streaming: Family<SourceLabel, Gauge>,
    pub stalled: Family<SourceLabel, Gauge>,
    pub confirmed_lsn: Family<SourceLabel, Gauge>,
    pub transactions_skipped: Family<SourceLabel, Counter>,
    pub operator_skips: Family<SourceLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            events_published: Family::default(),
            events_dead_lettered: Family::default(),
            commit_to_ack: latency_buckets(),
            kafka_transaction: latency_buckets(),
            kafka_transaction_phase: Family::new_with_constructor(latency_buckets),
            commit_to_read: latency_buckets(),
            // 1 … 65536 events
            batch_events: Histogram::new(exponential_buckets(1.0, 2.0, 17)),
            slot_lag: Family::default(),
            failover_ready: Family::default(),
            streaming: Family::default(),
            stalled: Family::default(),
            confirmed_lsn: Family::default(),
            transactions_skipped: Family::default(),
            operator_skips: Family::default(),
            errors: Family::default(),
        };
        registry.register(
            "events_published",
            "Outbox events committed to Kafka",
            m.events_published.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Outbox events committed to a dead-letter topic, by reason: schema, unknown_event_type, too_large",
            m.events_dead_lettered.clone(),
        );
        registry.register(
            "commit_to_ack_seconds",
            "Time from the Postgres commit of an outbox event to Kafka acknowledging it",
            m.commit_to_ack.clone(),
        );
        registry.register(
            "kafka_transaction_seconds",
            "Duration of one Kafka transaction, begin to commit",
            m.kafka_transaction.clone(),
        );
        registry.register(
            "kafka_transaction_phase_seconds",
            "Where a Kafka transaction's time went after the relay closed it: deliver (until the brokers acknowledged its records and checkpoint), previous (waiting for the previous transaction's commit), end_txn (the commit round trip)",
            m.kafka_transaction_phase.clone(),
        );
        registry.register(
            "commit_to_read_seconds",
            "Time from a Postgres transaction's commit to the relay reading its end from the WAL stream (decoding and sending by the walsender), per transaction with events",
            m.commit_to_read.clone(),
        );
        registry.register(
            "batch_events",
            "Events per Kafka transaction (or flush)",
            m.batch_events.clone(),
        );
        registry.register(
            "slot_lag_bytes",
            "WAL bytes between the server's current position and the slot's confirmed position",
            m.slot_lag.clone(),
        );
        registry.register(
            "slot_failover_ready",
            "PostgreSQL 17+: 1 while a standby among DATABASE_URL's hosts holds the source's slot synced and persisted (a promotion keeps it), else 0",
            m.failover_ready.clone(),
        );
        registry.register(
            "source_streaming",
            "1 while this process holds the source's slot and streams it, 0 on standby or error",
            m.streaming.clone(),
        );
        registry.register(
            "source_stalled",
            "1 while the source's sessions keep failing without acknowledging anything new (see /ready for where and why)",
            m.stalled.clone(),
        );
        registry.register(
            "confirmed_lsn",
            "Last WAL position confirmed to Postgres (as a number)",
            m.confirmed_lsn.clone(),
        );
        registry.register(
            "transactions_skipped",
            "Postgres transactions re-sent after a restart and skipped because Kafka already has them",
            m.transactions_skipped.clone(),
        );
        registry.register(
            "operator_skips",
            "Postgres transactions an operator skipped (kafkifyctl skip); their events are dead-lettered",
            m.operator_skips.clone(),
        );
        registry.register(
            "errors",
            "Errors by kind; each restarts the source's session",
            m.errors.clone(),
        );
        m
    }

    /// Creates a source's error series at 0, so that `increase()` sees its first error (a
    /// counter that appears at 1 looks like no increase) and alerts can name it.
    pub fn init_source(&self, source: &str, kinds: &[&'static str]) {
        self.stalled
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .set(0);
        for kind in kinds {
            let _ = self.errors.get_or_create(&ErrorLabel {
                source: source.to_string(),
                kind,
            });
        }
    }

    pub fn error(&self, source: &str, kind: &'static str) {
        self.errors
            .get_or_create(&ErrorLabel {
                source: source.to_string(),
                kind,
            })
            .inc();
    }
}
