//! Whether a source is stuck: failing again and again without moving. Pure.
//!
//! Every failed session is retried with back-off, which is right for a broker restart and
//! wrong to leave unseen when the same spot fails forever. A source whose sessions fail
//! `STALL_AFTER` times in a row at the same position (the transaction they were in, or before
//! reading anything) is *stalled*: the gauge `kafkify_cdc_relay_source_stalled{source}` reads
//! 1, `/ready` names the source, the position and the last error, and the alert
//! `KafkifySourceStalled` fires. The first acknowledgement past that position clears it.
//!
//! The position is the failing transaction's, not the acknowledged one: keepalives move the
//! acknowledged position over other databases' WAL while the same transaction keeps failing.

use std::collections::HashMap;

use crate::pgoutput::Lsn;

/// Failed sessions in a row, at one position, that make a source stalled.
pub const STALL_AFTER: u32 = 3;

/// Why a session failed, for the operator: what the relay does about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Something outside is unavailable (network, broker, Postgres restarting): retried with
    /// back-off until it returns.
    Retriable,
    /// The session cannot go on as it is (fenced by another relay, refused credentials, a lost
    /// slot, a protocol violation): retried too, but it needs a person unless the cause goes
    /// away by itself.
    Fatal,
    /// Another relay holds the slot: this one is a standby. Not a failure.
    Standby,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retriable => "retriable",
            ErrorClass::Fatal => "fatal",
            ErrorClass::Standby => "standby",
        }
    }
}

/// Where a stalled source is stuck, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    /// The transaction the sessions failed in (`None`: before reading any).
    pub at: Option<Lsn>,
    pub failures: u32,
    pub reason: String,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self
            .at
            .map_or("its slot's confirmed position".to_string(), |l| {
                l.to_string()
            });
        write!(
            f,
            "stalled at {at}: {} sessions in a row failed without progress; last error: {}",
            self.failures, self.reason
        )
    }
}

/// The server a source streams from: the first host of `DATABASE_URL` that is a primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Primary {
    pub host: String,
    pub port: u16,
    /// `server_version_num`, e.g. 170010.
    pub version_num: u32,
    /// `server_version`, e.g. `17.10`.
    pub version: String,
}

impl Primary {
    /// Failover slots exist from PostgreSQL 17 on.
    pub fn has_failover_slots(&self) -> bool {
        self.version_num >= 170_000
    }
}

impl std::fmt::Display for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} (PostgreSQL {})",
            self.host, self.port, self.version
        )
    }
}

#[derive(Debug, Default)]
pub struct SourceHealth {
    failed_at: Option<Option<Lsn>>,
    failures: u32,
    stalled: Option<Stall>,
    /// The primary of the last session, and whether it still streams.
    primary: Option<Primary>,
    streaming: bool,
}

impl SourceHealth {
    /// A session holds the slot on `primary` and streams.
    pub fn streaming_from(&mut self, primary: Primary) {
        self.primary = Some(primary);
        self.streaming = true;
    }

    /// The session ended (the primary is remembered: after a failover, where it was).
    pub fn stopped_streaming(&mut self) {
        self.streaming = false;
    }

    /// The server the source streams (or last streamed) from.
    pub fn primary(&self) -> Option<&Primary> {
        self.primary.as_ref()
    }

    /// For `/ready`: which host is the primary, as far as this source knows.
    pub fn server(&self) -> Option<String> {
        let p = self.primary.as_ref()?;
        Some(if self.streaming {
            format!("primary {p}, streaming")
        } else {
            format!("last primary {p}, not streaming")
        })
    }

    /// Postgres was told it may release WAL before `lsn`. True if that ended a stall.
    pub fn acknowledged(&mut self, lsn: Lsn) -> bool {
        let past = match self.failed_at {
            Some(Some(at)) => lsn > at,
            // Failing before reading anything: any acknowledgement is a way through.
            Some(None) => true,
            None => return false,
        };
        if !past {
            return false;
        }
        self.failures = 0;
        self.failed_at = None;
        self.stalled.take().is_some()
    }

    /// A session failed with `reason`, in the transaction at `here` (`None`: before reading
    /// any). The stall, if this made (or keeps) the source stalled.
    pub fn failed(&mut self, here: Option<Lsn>, class: ErrorClass, reason: &str) -> Option<&Stall> {
        if class == ErrorClass::Standby {
            return None;
        }
        if self.failed_at == Some(here) {
            self.failures += 1;
        } else {
            self.failed_at = Some(here);
            self.failures = 1;
        }
        if self.failures >= STALL_AFTER {
            self.stalled = Some(Stall {
                at: here,
                failures: self.failures,
                reason: reason.to_string(),
            });
        }
        self.stalled.as_ref()
    }

    pub fn stalled(&self) -> Option<&Stall> {
        self.stalled.as_ref()
    }
}

/// Each source's [`SourceHealth`], shared with `/ready`.
#[derive(Default)]
pub struct Health(std::sync::Mutex<HashMap<String, SourceHealth>>);

impl Health {
    pub(crate) fn with<T>(&self, source: &str, f: impl FnOnce(&mut SourceHealth) -> T) -> T {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Called on every acknowledgement: no allocation once the source has an entry.
        if let Some(health) = map.get_mut(source) {
            return f(health);
        }
        f(map.entry(source.to_string()).or_default())
    }

    /// Why `source` is stalled, if it is.
    pub fn stalled(&self, source: &str) -> Option<String> {
        self.with(source, |h| h.stalled().map(|s| s.to_string()))
    }

    /// Which host `source` streams from, for `/ready`'s details.
    pub fn server(&self, source: &str) -> Option<String> {
        self.with(source, |h| h.server())
    }

    /// The primary `source` last streamed from.
    pub fn primary(&self, source: &str) -> Option<Primary> {
        self.with(source, |h| h.primary().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_is_named_while_streaming_and_remembered_after() {
        let mut h = SourceHealth::default();
        assert_eq!(h.server(), None, "nothing before the first session");
        let p = Primary {
            host: "10.0.0.2".into(),
            port: 5432,
            version_num: 170010,
            version: "17.10".into(),
        };
        assert!(p.has_failover_slots());
        h.streaming_from(p.clone());
        assert_eq!(
            h.server().unwrap(),
            "primary 10.0.0.2:5432 (PostgreSQL 17.10), streaming"
        );
        h.stopped_streaming();
        assert_eq!(
            h.server().unwrap(),
            "last primary 10.0.0.2:5432 (PostgreSQL 17.10), not streaming"
        );
        assert_eq!(h.primary(), Some(&p));
        let fifteen = Primary {
            version_num: 150018,
            ..p
        };
        assert!(!fifteen.has_failover_slots());
    }

    const AT: Option<Lsn> = Some(Lsn(100));

    #[test]
    fn a_source_stalls_after_failing_in_one_transaction_and_recovers_past_it() {
        let mut h = SourceHealth::default();
        assert!(h.failed(AT, ErrorClass::Retriable, "broker down").is_none());
        assert!(h.failed(AT, ErrorClass::Retriable, "broker down").is_none());
        let stall = h
            .failed(AT, ErrorClass::Fatal, "too large")
            .cloned()
            .unwrap();
        assert_eq!(
            stall,
            Stall {
                at: AT,
                failures: 3,
                reason: "too large".into()
            }
        );
        assert_eq!(
            stall.to_string(),
            "stalled at 0/64: 3 sessions in a row failed without progress; last error: too large"
        );
        assert_eq!(
            h.failed(AT, ErrorClass::Fatal, "again").unwrap().failures,
            4
        );
        assert!(
            !h.acknowledged(Lsn(90)),
            "keepalives before it are no way through"
        );
        assert!(!h.acknowledged(Lsn(100)));
        assert!(h.stalled().is_some());
        assert!(h.acknowledged(Lsn(101)));
        assert!(h.stalled().is_none());
    }

    #[test]
    fn failing_in_a_new_transaction_each_time_is_not_a_stall() {
        let mut h = SourceHealth::default();
        for at in 1..10 {
            assert!(h
                .failed(Some(Lsn(at)), ErrorClass::Retriable, "flaky")
                .is_none());
        }
    }

    #[test]
    fn a_standby_is_never_stalled() {
        let mut h = SourceHealth::default();
        for _ in 0..10 {
            assert!(h.failed(None, ErrorClass::Standby, "slot busy").is_none());
        }
    }

    #[test]
    fn failing_before_reading_anything_stalls_and_any_acknowledgement_clears_it() {
        let mut h = SourceHealth::default();
        h.failed(None, ErrorClass::Retriable, "x");
        h.failed(None, ErrorClass::Retriable, "x");
        let stall = h.failed(None, ErrorClass::Retriable, "x").unwrap();
        assert_eq!(stall.at, None);
        assert!(stall
            .to_string()
            .starts_with("stalled at its slot's confirmed position"));
        assert!(h.acknowledged(Lsn(1)));
    }
}
