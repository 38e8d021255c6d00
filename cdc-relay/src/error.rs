//! Why a source's session ended, and what the relay does about each kind (README, "Errors").

use std::time::Duration;

use crate::health::ErrorClass;
use crate::machine::Violation;
use crate::outbox::OutboxError;
use crate::pgoutput::{self, Lsn};
use crate::producer::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("replication slot `{0}` is held by another relay; standing by")]
    SlotBusy(String),
    #[error("replication slot `{slot}` was invalidated (wal_status = lost): WAL it needed was removed, so events may be missing. Investigate, then drop the slot to start afresh from the current position")]
    SlotLost { slot: String },
    #[error("replication slot `{slot}` is missing, but Kafka holds a checkpoint for it at {checkpoint}: after a failover without the slot, a restore or a dropped slot, events committed after {checkpoint} may be missing. Check the outbox tables from there, then set RELAY_MISSING_SLOT=create to start from the current position")]
    SlotMissing { slot: String, checkpoint: Lsn },
    #[error("the checkpoint of slot `{slot}` is at {checkpoint}, past this server's WAL at {server_at} (timeline {timeline}): the server lost transactions that are already in Kafka (an asynchronous standby promoted without them, or a restore), and what it writes next would be skipped as published. Reconcile the outbox tables with Kafka, then drop the slot and set RELAY_MISSING_SLOT=create to start from the current position")]
    CheckpointAhead {
        slot: String,
        checkpoint: Lsn,
        server_at: Lsn,
        timeline: u32,
    },
    #[error("the outbox table {table} is partitioned, and publication `{publication}` would send its rows as the partitions', which the relay does not read: run `ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)`")]
    PartitionedOutbox { table: String, publication: String },
    #[error("Postgres: {0}")]
    Postgres(String),
    #[error("no host of DATABASE_URL is a primary (a failover in progress, or none is up): {0}")]
    NoPrimary(String),
    #[error("replication: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("pgoutput: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("outbox: {0}")]
    Outbox(#[from] OutboxError),
    #[error("replication stream ended unexpectedly")]
    StreamEnded,
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("replication protocol: {0}")]
    Protocol(#[from] Violation),
}

impl SessionError {
    /// Every label [`SessionError::kind`] gives.
    pub const KINDS: &'static [&'static str] = &[
        "slot_busy",
        "slot_lost",
        "slot_missing",
        "checkpoint_ahead",
        "postgres",
        "replication",
        "decode",
        "outbox",
        "kafka",
    ];

    /// A label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::SlotBusy(_) => "slot_busy",
            SessionError::SlotLost { .. } => "slot_lost",
            SessionError::SlotMissing { .. } => "slot_missing",
            SessionError::CheckpointAhead { .. } => "checkpoint_ahead",
            SessionError::Postgres(_) | SessionError::NoPrimary(_) => "postgres",
            SessionError::Replication(_) | SessionError::StreamEnded => "replication",
            SessionError::Decode(_) | SessionError::Protocol(_) => "decode",
            SessionError::Outbox(_) | SessionError::PartitionedOutbox { .. } => "outbox",
            SessionError::Sink(_) => "kafka",
        }
    }

    /// What the relay does about it (README, "Errors").
    pub fn class(&self) -> ErrorClass {
        use rdkafka::types::RDKafkaErrorCode as Code;
        match self {
            SessionError::SlotBusy(_) => ErrorClass::Standby,
            SessionError::SlotLost { .. }
            | SessionError::SlotMissing { .. }
            | SessionError::CheckpointAhead { .. }
            | SessionError::PartitionedOutbox { .. }
            | SessionError::Decode(_)
            | SessionError::Outbox(_)
            | SessionError::Protocol(_) => ErrorClass::Fatal,
            SessionError::Postgres(text) => {
                let refused = [
                    "password authentication failed",
                    "pg_hba.conf",
                    "permission denied",
                ];
                if refused.iter().any(|r| text.contains(r)) {
                    ErrorClass::Fatal
                } else {
                    ErrorClass::Retriable
                }
            }
            SessionError::Replication(_)
            | SessionError::StreamEnded
            | SessionError::NoPrimary(_) => ErrorClass::Retriable,
            SessionError::Sink(SinkError::Kafka(e) | SinkError::Delivery(e)) => {
                match e.rdkafka_error_code() {
                    Some(
                        Code::ProducerFenced
                        | Code::InvalidProducerEpoch
                        | Code::TransactionalIdAuthorizationFailed
                        | Code::ClusterAuthorizationFailed
                        | Code::TopicAuthorizationFailed
                        | Code::SaslAuthenticationFailed
                        | Code::Authentication
                        | Code::MessageSizeTooLarge
                        | Code::InvalidTransactionTimeout,
                    ) => ErrorClass::Fatal,
                    _ => ErrorClass::Retriable,
                }
            }
            SessionError::Sink(SinkError::BadCheckpoint { .. }) => ErrorClass::Fatal,
            SessionError::Sink(SinkError::CheckpointTimeout { .. } | SinkError::Task(_)) => {
                ErrorClass::Retriable
            }
        }
    }

    /// How long to wait before the next session, given the current back-off.
    pub fn retry_after(&self, backoff: Duration) -> Duration {
        match self {
            // Polling a busy slot is cheap, and fast polling means fast take-over; so is asking
            // the hosts which one is the primary, and a promotion is found within a second.
            SessionError::SlotBusy(_) | SessionError::NoPrimary(_) => Duration::from_secs(1),
            SessionError::SlotLost { .. } | SessionError::SlotMissing { .. } => {
                Duration::from_secs(30)
            }
            _ => backoff,
        }
    }
}
