//! One source's relay rules, with no I/O: what to publish, when, and which WAL position
//! Postgres may release. `relay.rs` feeds it replication messages and the sink's reports and
//! carries out what it answers; everything here is decided on values, so every rule is tested
//! without a stack (the model test at the bottom replays random crashes).
//!
//! The contract (docs/ARCHITECTURE.md, "Exactly-once into Kafka"):
//! - a position is acknowledged only after Kafka has committed every event before it;
//! - a Kafka transaction carries whole Postgres transactions and the checkpoint (the commit
//!   LSN of the last of them); after a restart, transactions at or below it are skipped;
//! - transactions are published in commit order, one batch after the other;
//! - when nothing is waiting for Kafka, keepalives and event-less transactions move the
//!   acknowledged position, so an idle outbox does not pin WAL.
//!
//! The machine is generic over the record type `R`: building records (topic, key, Avro,
//! dead letters) is `record.rs`'s job, and the tests use plain numbers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::checkpoint;
use crate::pgoutput::Lsn;

/// How Kafka transactions are cut and how much is held before it is sent.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A Kafka transaction holding this many events is committed at the next boundary between
    /// Postgres transactions; until then, reading stops there.
    pub max_events: usize,
    /// Otherwise it is committed this long after its first whole Postgres transaction.
    pub linger: Duration,
    /// Rows are sent to Kafka in chunks of at most this many…
    pub chunk_events: usize,
    /// …or this many bytes, so a Postgres transaction of any size is never held whole.
    pub chunk_bytes: usize,
    /// A Kafka transaction open this long is refused: the broker would abort it.
    pub transaction_timeout: Duration,
    /// An idle source writes its checkpoint again this long after its last Kafka commit
    /// (exactly-once only): every source shares the checkpoint topic, whose newest records
    /// are read first, so a restart then finds an idle source's checkpoint as fast as a busy
    /// one's, however long it idled.
    pub checkpoint_refresh: Option<Duration>,
}

/// What the relay reads from Postgres or hears from the sink.
#[derive(Debug)]
pub enum Input<R> {
    /// A transaction starts; Postgres sends it after it committed. `final_lsn` is where its
    /// commit record starts.
    Begin {
        final_lsn: Lsn,
        commit_ts_micros: i64,
    },
    /// One outbox row of the open transaction, already turned into its record of `bytes`.
    Row { record: R, bytes: usize },
    /// The open transaction ends at `end`.
    Commit { end: Lsn },
    /// The server has sent everything before `wal_end`.
    KeepAlive { wal_end: Lsn },
    /// The sink can commit the next Kafka transaction at once.
    SinkReady,
    /// Kafka committed the oldest transaction in flight, which ended at `upto`.
    Acked { upto: Lsn },
    /// Time passed (a linger may have ended).
    Tick,
    /// Stop reading: commit what is whole, regardless of the linger.
    Drain,
}

/// What the relay must do, in order.
#[derive(Debug, PartialEq)]
pub enum Action<R> {
    /// Send these records into the open Kafka transaction (the first opens one).
    Append(Vec<R>),
    /// Commit the open Kafka transaction with the checkpoint `upto`.
    Commit(Closing),
    /// Drop the open Kafka transaction: the session stops inside a Postgres transaction whose
    /// first rows are in it.
    Abort,
    /// Postgres may release WAL before this position.
    Acknowledge(Lsn),
    /// A transaction Kafka already has (at or below the checkpoint) was dropped.
    Skipped { end: Lsn },
}

/// A Kafka transaction being committed.
#[derive(Debug, PartialEq)]
pub struct Closing {
    /// The commit LSN of its last Postgres transaction: the checkpoint written with it.
    pub upto: Lsn,
    /// (commit time, events) of each Postgres transaction in it, for the latency histogram.
    pub commits: Vec<(i64, usize)>,
    pub events: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("an insert arrived outside a transaction")]
    RowOutsideTransaction,
    #[error("an acknowledgement from Kafka arrived with no transaction in flight")]
    AckWithoutBatch,
    #[error(
        "a Kafka transaction has been open for {secs} s, the transaction timeout, inside the \
         Postgres transaction that commits at {final_lsn} ({events} events so far): raise \
         RELAY_TRANSACTION_TIMEOUT (at most the brokers' transaction.max.timeout.ms)"
    )]
    TransactionTimeout {
        secs: u64,
        final_lsn: Lsn,
        events: usize,
    },
}

/// The Postgres transaction being received.
struct OpenTx {
    final_lsn: Lsn,
    commit_ts_micros: i64,
    /// Kafka has it already (a restart re-sends it): its rows are dropped.
    skip: bool,
    events: usize,
    /// Some of its rows are in the open Kafka transaction, which therefore cannot commit
    /// before this transaction's Commit.
    appended: bool,
}

/// The Kafka transaction being filled.
#[derive(Default)]
struct Filling {
    /// Events of whole Postgres transactions in it.
    events: usize,
    commits: Vec<(i64, usize)>,
    /// The commit LSN of the last whole Postgres transaction since the last Kafka commit,
    /// with or without events.
    upto: Option<Lsn>,
    /// When its first whole Postgres transaction with events arrived: the linger's start.
    first_at: Option<Instant>,
    /// When its first record was sent: the broker's transaction timeout runs from there.
    opened_at: Option<Instant>,
}

pub struct Machine<R> {
    limits: Limits,
    /// Kafka holds every transaction committed at or below this LSN.
    checkpoint: Lsn,
    open: Option<OpenTx>,
    /// Rows not yet sent: those of whole transactions first, then from `open_from` on, the
    /// open transaction's.
    chunk: Vec<R>,
    chunk_bytes: usize,
    open_from: usize,
    /// Of `chunk_bytes`, the open transaction's.
    open_bytes: usize,
    filling: Filling,
    /// Kafka transactions committing, not yet acknowledged, oldest first; true for a
    /// checkpoint refresh.
    in_flight: VecDeque<bool>,
    sink_ready: bool,
    draining: bool,
    /// When the last Kafka transaction was committed (or the machine started).
    last_commit: Option<Instant>,
}

impl<R> Machine<R> {
    /// A session's machine, starting from the checkpoint read from Kafka.
    pub fn new(checkpoint: Lsn, limits: Limits) -> Self {
        Machine {
            limits,
            checkpoint,
            open: None,
            chunk: Vec::new(),
            chunk_bytes: 0,
            open_from: 0,
            open_bytes: 0,
            filling: Filling::default(),
            in_flight: VecDeque::new(),
            sink_ready: false,
            draining: false,
            last_commit: None,
        }
    }

    /// False while a full Kafka transaction waits at a boundary for the sink, and once
    /// draining: Postgres holds the rest meanwhile.
    pub fn wants_input(&self) -> bool {
        let mid_transaction = self.open.as_ref().is_some_and(|o| o.appended);
        !self.draining && (mid_transaction || self.filling.events < self.limits.max_events)
    }

    /// When a [`Input::Tick`] may change something: a linger ends, or the transaction timeout.
    pub fn deadline(&self) -> Option<Instant> {
        let commit = if self.can_commit() {
            let first = self.filling.first_at.expect("events imply a first");
            if self.draining || self.filling.events >= self.limits.max_events {
                Some(first)
            } else {
                Some(first + self.limits.linger)
            }
        } else {
            None
        };
        let timeout = self
            .filling
            .opened_at
            .map(|t| t + self.limits.transaction_timeout);
        [commit, timeout, self.refresh_due()]
            .into_iter()
            .flatten()
            .min()
    }

    /// When an idle source's checkpoint is to be written again.
    fn refresh_due(&self) -> Option<Instant> {
        let every = self.limits.checkpoint_refresh?;
        let idle = self.sink_ready
            && !self.draining
            && self.open.is_none()
            && self.filling.events == 0
            && self.filling.upto.is_none()
            && self.in_flight.is_empty();
        idle.then(|| self.last_commit.map(|t| t + every))?
    }

    /// After [`Input::Drain`]: true once everything whole is acknowledged by Kafka.
    pub fn drained(&self) -> bool {
        self.filling.events == 0 && self.in_flight.is_empty()
    }

    /// The commit time of the transaction being received, if one is (see [`Self::skipping`]
    /// for whether its rows are wanted).
    pub fn open_commit_ts(&self) -> Option<i64> {
        self.open.as_ref().map(|o| o.commit_ts_micros)
    }

    /// True while the open transaction is one Kafka has: its rows need not be built.
    pub fn skipping(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.skip)
    }

    pub fn on(&mut self, input: Input<R>, now: Instant) -> Result<Vec<Action<R>>, Violation> {
        let mut out = Vec::new();
        self.last_commit.get_or_insert(now);
        match input {
            Input::Begin {
                final_lsn,
                commit_ts_micros,
            } => {
                self.open = Some(OpenTx {
                    final_lsn,
                    commit_ts_micros,
                    skip: checkpoint::published_before_begin(final_lsn, self.checkpoint),
                    events: 0,
                    appended: false,
                });
            }
            Input::Row { record, bytes } => {
                let open = self.open.as_mut().ok_or(Violation::RowOutsideTransaction)?;
                if !open.skip {
                    open.events += 1;
                    self.chunk.push(record);
                    self.chunk_bytes += bytes;
                    self.open_bytes += bytes;
                    if self.chunk.len() >= self.limits.chunk_events
                        || self.chunk_bytes >= self.limits.chunk_bytes
                    {
                        // The open transaction's first rows go into the Kafka transaction,
                        // which now cannot commit before this transaction's end.
                        open.appended = true;
                        self.send(self.chunk.len(), now, &mut out);
                    }
                }
            }
            Input::Commit { end } => self.commit(end, now, &mut out),
            Input::KeepAlive { wal_end } => {
                // Nothing received waits for Kafka: the slot may move to where the server is,
                // even if only other tables wrote WAL. Inside a transaction the server's
                // position may already be past its commit, so not then.
                if self.open.is_none()
                    && self.filling.events == 0
                    && self.filling.upto.is_none()
                    && self.in_flight.is_empty()
                {
                    out.push(Action::Acknowledge(wal_end));
                }
            }
            Input::SinkReady => self.sink_ready = true,
            Input::Acked { upto } => self.acked(upto, &mut out)?,
            Input::Tick => {}
            Input::Drain => {
                // A half-received transaction is left for the next session: Postgres re-sends
                // it from the acknowledged position. If its first rows are in the open Kafka
                // transaction, that transaction is dropped with them; the whole transactions
                // in it are sent again too, as nothing of them was acknowledged.
                self.draining = true;
                self.chunk.truncate(self.open_from);
                self.chunk_bytes -= self.open_bytes;
                self.open_bytes = 0;
                if self.open.take().is_some_and(|o| o.appended) {
                    out.push(Action::Abort);
                    self.filling = Filling::default();
                    self.chunk.clear();
                    self.chunk_bytes = 0;
                    self.open_from = 0;
                }
            }
        }
        if let Some(opened) = self.filling.opened_at {
            if now >= opened + self.limits.transaction_timeout {
                return Err(Violation::TransactionTimeout {
                    secs: self.limits.transaction_timeout.as_secs(),
                    final_lsn: self.open.as_ref().map(|o| o.final_lsn).unwrap_or_default(),
                    events: self.filling.events
                        + self.open.as_ref().map(|o| o.events).unwrap_or_default(),
                });
            }
        }
        self.commit_if_due(now, &mut out);
        Ok(out)
    }

    /// Sends the first `n` rows of the chunk into the Kafka transaction.
    fn send(&mut self, n: usize, now: Instant, out: &mut Vec<Action<R>>) {
        if n == 0 {
            return;
        }
        self.filling.opened_at.get_or_insert(now);
        let rest = self.chunk.split_off(n);
        let rows = std::mem::replace(&mut self.chunk, rest);
        if self.chunk.is_empty() {
            self.chunk_bytes = 0;
            self.open_bytes = 0;
        } else {
            // What stays is the open transaction's rows.
            self.chunk_bytes = self.open_bytes;
        }
        self.open_from -= self.open_from.min(n);
        out.push(Action::Append(rows));
    }

    fn commit(&mut self, end: Lsn, now: Instant, out: &mut Vec<Action<R>>) {
        let open = self.open.take().unwrap_or(OpenTx {
            final_lsn: end,
            commit_ts_micros: 0,
            skip: checkpoint::already_published(end, self.checkpoint),
            events: 0,
            appended: false,
        });
        let idle = self.filling.events == 0 && self.in_flight.is_empty();
        if open.skip {
            // Re-sent after a restart; Kafka has it.
            out.push(Action::Skipped { end });
            if idle && self.filling.upto.is_none() {
                out.push(Action::Acknowledge(end));
            }
        } else if open.events == 0 && idle {
            out.push(Action::Acknowledge(end));
        } else {
            // Its rows are whole now: they go with the next commit, or with a full chunk.
            self.open_from = self.chunk.len();
            self.open_bytes = 0;
            if open.events > 0 {
                self.filling
                    .commits
                    .push((open.commit_ts_micros, open.events));
                self.filling.events += open.events;
                self.filling.first_at.get_or_insert(now);
            }
            // An event-less transaction behind events is acknowledged with them.
            self.filling.upto = Some(end);
        }
    }

    fn acked(&mut self, upto: Lsn, out: &mut Vec<Action<R>>) -> Result<(), Violation> {
        let refresh = self
            .in_flight
            .pop_front()
            .ok_or(Violation::AckWithoutBatch)?;
        // A refresh re-wrote the checkpoint: nothing new for Postgres.
        let mut ack = (!refresh).then_some(upto);
        // Event-less transactions that arrived while transactions were in flight.
        if self.in_flight.is_empty() && self.filling.events == 0 {
            if let Some(lsn) = self.filling.upto.take() {
                ack = Some(ack.map_or(lsn, |a| a.max(lsn)));
            }
        }
        if let Some(ack) = ack {
            self.checkpoint = self.checkpoint.max(ack);
            out.push(Action::Acknowledge(ack));
        }
        Ok(())
    }

    /// A Kafka transaction may commit when it holds whole Postgres transactions with events,
    /// none of the open one's rows, and the sink is free.
    fn can_commit(&self) -> bool {
        self.sink_ready
            && self.filling.events > 0
            && !self.open.as_ref().is_some_and(|o| o.appended)
    }

    fn commit_if_due(&mut self, now: Instant, out: &mut Vec<Action<R>>) {
        if self.refresh_due().is_some_and(|due| now >= due) {
            self.in_flight.push_back(true);
            self.sink_ready = false;
            self.last_commit = Some(now);
            out.push(Action::Commit(Closing {
                upto: self.checkpoint,
                commits: Vec::new(),
                events: 0,
            }));
            return;
        }
        if !self.can_commit() {
            return;
        }
        let first = self.filling.first_at.expect("events imply a first");
        let due = self.draining
            || self.filling.events >= self.limits.max_events
            || now >= first + self.limits.linger;
        if !due {
            return;
        }
        self.send(self.open_from, now, out);
        let filling = std::mem::take(&mut self.filling);
        self.in_flight.push_back(false);
        self.sink_ready = false;
        self.last_commit = Some(now);
        out.push(Action::Commit(Closing {
            upto: filling.upto.expect("events imply a whole transaction"),
            commits: filling.commits,
            events: filling.events,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, VecDeque};
    use test_support::rng::Rng;

    const LIMITS: Limits = Limits {
        max_events: 3,
        linger: Duration::from_millis(5),
        chunk_events: 2,
        chunk_bytes: 1 << 20,
        transaction_timeout: Duration::from_secs(60),
        checkpoint_refresh: None,
    };

    fn lsn(n: u64) -> Lsn {
        Lsn(n)
    }

    /// Feeds inputs at `now`, returning every action.
    fn feed(m: &mut Machine<u32>, now: Instant, inputs: Vec<Input<u32>>) -> Vec<Action<u32>> {
        inputs
            .into_iter()
            .flat_map(|i| m.on(i, now).expect("valid input"))
            .collect()
    }

    fn begin(end: u64) -> Input<u32> {
        Input::Begin {
            final_lsn: lsn(end - 1),
            commit_ts_micros: end as i64,
        }
    }

    fn row(r: u32) -> Input<u32> {
        Input::Row {
            record: r,
            bytes: 100,
        }
    }

    fn tx(end: u64, rows: &[u32]) -> Vec<Input<u32>> {
        let mut v = vec![begin(end)];
        v.extend(rows.iter().map(|r| row(*r)));
        v.push(Input::Commit { end: lsn(end) });
        v
    }

    fn commit(upto: u64, commits: Vec<(i64, usize)>) -> Action<u32> {
        let events = commits.iter().map(|c| c.1).sum();
        Action::Commit(Closing {
            upto: lsn(upto),
            commits,
            events,
        })
    }

    #[test]
    fn whole_transactions_go_out_with_the_commit_after_the_linger() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        assert!(feed(&mut m, t0, vec![Input::SinkReady]).is_empty());
        assert!(feed(&mut m, t0, tx(10, &[1])).is_empty());
        assert!(feed(&mut m, t0, tx(20, &[])).is_empty());
        assert_eq!(m.deadline(), Some(t0 + LIMITS.linger));
        let out = feed(&mut m, t0 + LIMITS.linger, vec![Input::Tick]);
        assert_eq!(
            out,
            vec![Action::Append(vec![1]), commit(20, vec![(10, 1)])]
        );
        assert_eq!(m.deadline(), None, "the sink has not asked for more");
    }

    #[test]
    fn a_full_kafka_transaction_commits_at_once_and_reading_stops_until_the_sink_takes_it() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        let out = feed(&mut m, t0, tx(10, &[1, 2, 3]));
        assert_eq!(
            out,
            vec![Action::Append(vec![1, 2])],
            "a full chunk goes at once"
        );
        assert!(!m.wants_input(), "sink busy");
        let out = feed(&mut m, t0, vec![Input::SinkReady]);
        assert_eq!(
            out,
            vec![Action::Append(vec![3]), commit(10, vec![(10, 3)])]
        );
        assert!(m.wants_input());
    }

    #[test]
    fn a_large_transaction_streams_in_chunks_and_commits_only_after_its_end() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        feed(&mut m, t0, vec![Input::SinkReady, begin(10)]);
        let mut appended = Vec::new();
        for r in 1..=7 {
            for a in feed(&mut m, t0, vec![row(r)]) {
                match a {
                    Action::Append(rs) => appended.extend(rs),
                    other => panic!("{other:?} inside a transaction"),
                }
            }
            assert!(m.wants_input(), "a started transaction is read to its end");
        }
        assert_eq!(
            appended,
            vec![1, 2, 3, 4, 5, 6],
            "never more than a chunk held"
        );
        let out = feed(&mut m, t0, vec![Input::Commit { end: lsn(10) }]);
        assert_eq!(
            out,
            vec![Action::Append(vec![7]), commit(10, vec![(10, 7)])]
        );
    }

    #[test]
    fn a_kafka_transaction_that_outlives_the_timeout_is_refused_naming_the_setting() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        feed(
            &mut m,
            t0,
            vec![Input::SinkReady, begin(10), row(1), row(2)],
        );
        assert_eq!(m.deadline(), Some(t0 + LIMITS.transaction_timeout));
        let e = m
            .on(Input::Tick, t0 + LIMITS.transaction_timeout)
            .unwrap_err();
        assert_eq!(
            e,
            Violation::TransactionTimeout {
                secs: 60,
                final_lsn: lsn(9),
                events: 2
            }
        );
        assert!(e.to_string().contains("RELAY_TRANSACTION_TIMEOUT"));
    }

    #[test]
    fn re_sent_transactions_at_or_below_the_checkpoint_are_skipped_and_acknowledged() {
        let t0 = Instant::now();
        let mut m = Machine::new(lsn(20), LIMITS);
        feed(&mut m, t0, vec![Input::SinkReady]);
        let out = feed(&mut m, t0, tx(10, &[1]));
        assert_eq!(
            out,
            vec![
                Action::Skipped { end: lsn(10) },
                Action::Acknowledge(lsn(10))
            ]
        );
        feed(&mut m, t0, vec![begin(20)]);
        assert!(
            m.skipping(),
            "known at Begin, so its rows are not even built"
        );
        let out = feed(&mut m, t0, vec![row(2), Input::Commit { end: lsn(20) }]);
        assert_eq!(
            out,
            vec![
                Action::Skipped { end: lsn(20) },
                Action::Acknowledge(lsn(20))
            ]
        );
        assert_eq!(feed(&mut m, t0, tx(30, &[3])), vec![]);
        let out = feed(&mut m, t0 + LIMITS.linger, vec![Input::Tick]);
        assert_eq!(
            out,
            vec![Action::Append(vec![3]), commit(30, vec![(30, 1)])]
        );
    }

    #[test]
    fn a_transaction_whose_commit_record_starts_at_the_checkpoint_is_published() {
        let t0 = Instant::now();
        // After a restart: Kafka's checkpoint is the end of the last published commit record,
        // and the next commit record was logged right behind it.
        let mut m = Machine::new(lsn(20), LIMITS);
        feed(&mut m, t0, vec![Input::SinkReady]);
        feed(
            &mut m,
            t0,
            vec![Input::Begin {
                final_lsn: lsn(20),
                commit_ts_micros: 1,
            }],
        );
        assert!(!m.skipping(), "Kafka does not have it");
        feed(&mut m, t0, vec![row(1), Input::Commit { end: lsn(24) }]);
        let out = feed(&mut m, t0 + LIMITS.linger, vec![Input::Tick]);
        assert_eq!(out, vec![Action::Append(vec![1]), commit(24, vec![(1, 1)])]);

        // In a session: the checkpoint moves when Kafka acknowledges, here before the Begin
        // of the next transaction arrives (a wide row takes the server a while to decode).
        let out = feed(&mut m, t0, vec![Input::Acked { upto: lsn(24) }]);
        assert_eq!(out, vec![Action::Acknowledge(lsn(24))]);
        feed(
            &mut m,
            t0,
            vec![
                Input::SinkReady,
                Input::Begin {
                    final_lsn: lsn(24),
                    commit_ts_micros: 2,
                },
            ],
        );
        assert!(!m.skipping(), "Kafka does not have it");
        feed(&mut m, t0, vec![row(2), Input::Commit { end: lsn(30) }]);
        let out = feed(&mut m, t0 + LIMITS.linger, vec![Input::Tick]);
        assert_eq!(out, vec![Action::Append(vec![2]), commit(30, vec![(2, 1)])]);
    }

    #[test]
    fn nothing_is_acknowledged_past_a_transaction_kafka_has_not_committed() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        feed(&mut m, t0, vec![Input::SinkReady]);
        feed(&mut m, t0, tx(10, &[1, 2, 3]));
        // An event-less transaction and a keepalive behind the transaction in flight.
        assert!(feed(&mut m, t0, tx(20, &[])).is_empty());
        assert!(feed(&mut m, t0, vec![Input::KeepAlive { wal_end: lsn(30) }]).is_empty());
        // Its acknowledgement carries the event-less transaction along.
        let out = feed(&mut m, t0, vec![Input::Acked { upto: lsn(10) }]);
        assert_eq!(out, vec![Action::Acknowledge(lsn(20))]);
        // Idle now: keepalives move the slot.
        let out = feed(&mut m, t0, vec![Input::KeepAlive { wal_end: lsn(40) }]);
        assert_eq!(out, vec![Action::Acknowledge(lsn(40))]);
    }

    #[test]
    fn a_keepalive_inside_a_transaction_acknowledges_nothing() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        feed(&mut m, t0, vec![begin(10)]);
        assert!(feed(&mut m, t0, vec![Input::KeepAlive { wal_end: lsn(50) }]).is_empty());
    }

    #[test]
    fn an_event_less_transaction_acknowledges_at_once_when_idle() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        let out = feed(&mut m, t0, tx(10, &[]));
        assert_eq!(out, vec![Action::Acknowledge(lsn(10))]);
    }

    #[test]
    fn an_idle_source_rewrites_its_checkpoint_and_acknowledges_nothing_for_it() {
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        let limits = Limits {
            checkpoint_refresh: Some(every),
            ..LIMITS
        };
        let mut m = Machine::new(Lsn(7), limits);
        feed(&mut m, t0, vec![Input::SinkReady]);
        assert_eq!(m.deadline(), Some(t0 + every));
        assert!(feed(&mut m, t0 + every / 2, vec![Input::Tick]).is_empty());
        // Only other tables wrote meanwhile: still no Kafka commit, so it is due all the same.
        feed(&mut m, t0 + every / 2, tx(20, &[]));
        let out = feed(&mut m, t0 + every, vec![Input::Tick]);
        assert_eq!(out, vec![commit(7, vec![])]);
        assert_eq!(m.deadline(), None, "not again while it commits");
        // Its acknowledgement says nothing new to Postgres, but an event-less transaction
        // that came meanwhile is acknowledged with it.
        assert!(feed(&mut m, t0 + every, tx(30, &[])).is_empty());
        let out = feed(&mut m, t0 + every, vec![Input::Acked { upto: lsn(7) }]);
        assert_eq!(out, vec![Action::Acknowledge(lsn(30))]);
        feed(&mut m, t0 + every, vec![Input::SinkReady]);
        assert_eq!(m.deadline(), Some(t0 + 2 * every));

        // A source that publishes is not refreshed: its commits are its checkpoints.
        feed(&mut m, t0 + 2 * every - LIMITS.linger, tx(40, &[1]));
        let out = feed(&mut m, t0 + 2 * every, vec![Input::Tick]);
        assert_eq!(
            out,
            vec![Action::Append(vec![1]), commit(40, vec![(40, 1)])]
        );
        let out = feed(&mut m, t0 + 2 * every, vec![Input::Acked { upto: lsn(40) }]);
        assert_eq!(out, vec![Action::Acknowledge(lsn(40))]);
        feed(&mut m, t0 + 2 * every, vec![Input::SinkReady]);
        assert_eq!(m.deadline(), Some(t0 + 3 * every));
        let out = feed(&mut m, t0 + 3 * every, vec![Input::Tick]);
        assert_eq!(out, vec![commit(40, vec![])]);
    }

    #[test]
    fn a_refresh_in_flight_holds_back_keepalive_acknowledgements_until_it_is_acked() {
        let t0 = Instant::now();
        let every = Duration::from_secs(1);
        let limits = Limits {
            checkpoint_refresh: Some(every),
            ..LIMITS
        };
        let mut m = Machine::new(Lsn(7), limits);
        feed(&mut m, t0, vec![Input::SinkReady]);
        assert_eq!(feed(&mut m, t0 + every, vec![Input::Tick]).len(), 1);
        let out = feed(
            &mut m,
            t0 + every,
            vec![Input::KeepAlive { wal_end: lsn(50) }],
        );
        assert!(out.is_empty(), "{out:?}");
        let out = feed(&mut m, t0 + every, vec![Input::Acked { upto: lsn(7) }]);
        assert!(out.is_empty());
        let out = feed(
            &mut m,
            t0 + every,
            vec![Input::KeepAlive { wal_end: lsn(50) }],
        );
        assert_eq!(out, vec![Action::Acknowledge(lsn(50))]);
    }

    #[test]
    fn drain_commits_what_is_whole_at_once_and_leaves_an_unsent_transaction() {
        let t0 = Instant::now();
        let limits = Limits {
            chunk_events: 10,
            ..LIMITS
        };
        let mut m = Machine::new(Lsn(0), limits);
        feed(&mut m, t0, vec![Input::SinkReady]);
        feed(&mut m, t0, tx(10, &[1]));
        feed(&mut m, t0, vec![begin(20), row(2)]);
        let out = feed(&mut m, t0, vec![Input::Drain]);
        assert_eq!(
            out,
            vec![Action::Append(vec![1]), commit(10, vec![(10, 1)])],
            "row 2, of the unfinished transaction, is left for the next session"
        );
        assert!(!m.drained());
        feed(&mut m, t0, vec![Input::Acked { upto: lsn(10) }]);
        assert!(m.drained());
    }

    #[test]
    fn drain_inside_a_transaction_already_in_kafka_aborts_the_kafka_transaction() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        feed(&mut m, t0, tx(10, &[1]));
        feed(&mut m, t0, vec![begin(20), row(2), row(3)]);
        let out = feed(&mut m, t0, vec![Input::Drain]);
        assert_eq!(out, vec![Action::Abort]);
        assert!(
            m.drained(),
            "nothing in flight, nothing acknowledged past 0"
        );
    }

    #[test]
    fn protocol_violations_are_errors() {
        let t0 = Instant::now();
        let mut m: Machine<u32> = Machine::new(Lsn(0), LIMITS);
        assert_eq!(
            m.on(row(1), t0).unwrap_err(),
            Violation::RowOutsideTransaction
        );
        assert_eq!(
            m.on(Input::Acked { upto: lsn(1) }, t0).unwrap_err(),
            Violation::AckWithoutBatch
        );
    }

    // ---- The model test -------------------------------------------------------------------
    //
    // A simulated Postgres (committed transactions, a slot whose confirmed position lags the
    // acknowledgements sent), a simulated Kafka (a log, a checkpoint, and batches that commit
    // in order, or abort, or commit although the relay was told they failed) and random
    // crashes, restarts and graceful stops. Whatever happens, the log ends holding each event
    // exactly once, in commit order; no acknowledgement passes an event Kafka lacks; no
    // Postgres transaction is split between Kafka transactions.

    /// A committed Postgres transaction: where its commit record starts and ends, and its
    /// events (ids).
    struct Tx {
        start: u64,
        end: u64,
        events: Vec<u32>,
    }

    fn workload(rng: &mut Rng) -> Vec<Tx> {
        let mut next_id = 0;
        // No WAL starts at 0, where a fresh machine's checkpoint is.
        let mut end = 1;
        (0..rng.below(60) + 1)
            .map(|_| {
                // A commit record may start exactly where the previous one ended, as two
                // writers' commits do when nothing was logged between them.
                let start = if rng.chance(30) {
                    end
                } else {
                    end + 1 + rng.below(50)
                };
                end = start + 1 + rng.below(3);
                let events = (0..rng.below(6))
                    .map(|_| {
                        next_id += 1;
                        next_id
                    })
                    .collect();
                Tx { start, end, events }
            })
            .collect()
    }

    /// The replication stream of one session: every transaction whose commit record starts at
    /// or after `confirmed` (Postgres's rule for a slot's restart), with keepalives where a
    /// walsender may send them.
    fn stream(rng: &mut Rng, wal: &[Tx], confirmed: u64) -> VecDeque<Input<u32>> {
        let mut s = VecDeque::new();
        for tx in wal.iter().filter(|t| t.start >= confirmed) {
            s.push_back(Input::Begin {
                final_lsn: lsn(tx.start),
                commit_ts_micros: tx.end as i64,
            });
            for e in &tx.events {
                if rng.chance(10) {
                    // Mid-transaction the server's position may already be past the commit.
                    s.push_back(Input::KeepAlive {
                        wal_end: lsn(tx.end + rng.below(3)),
                    });
                }
                s.push_back(Input::Row {
                    record: *e,
                    bytes: 1 + rng.below(3) as usize,
                });
            }
            s.push_back(Input::Commit { end: lsn(tx.end) });
            if rng.chance(20) {
                s.push_back(Input::KeepAlive {
                    wal_end: lsn(tx.end),
                });
            }
        }
        s
    }

    #[derive(Default)]
    struct Kafka {
        log: Vec<u32>,
        checkpoint: u64,
        /// Records appended to the open transaction.
        open: Vec<u32>,
        /// Transactions committing, in order: (events, upto).
        in_flight: VecDeque<(Vec<u32>, u64)>,
    }

    impl Kafka {
        fn commit_front(&mut self) -> u64 {
            let (events, upto) = self.in_flight.pop_front().expect("a batch in flight");
            self.log.extend(events);
            // The reader takes the newest record, not the largest.
            self.checkpoint = upto;
            upto
        }
    }

    /// Runs one random history; panics with the seed on any broken rule.
    fn history(seed: u64) {
        let rng = &mut Rng::new(seed);
        let wal = workload(rng);
        let tx_of: BTreeMap<u32, u64> = wal
            .iter()
            .flat_map(|t| t.events.iter().map(move |e| (*e, t.end)))
            .collect();
        let limits = Limits {
            max_events: 1 + rng.below(8) as usize,
            linger: Duration::from_millis(rng.below(3)),
            chunk_events: 1 + rng.below(4) as usize,
            chunk_bytes: 1 + rng.below(8) as usize,
            transaction_timeout: Duration::from_secs(3600),
            checkpoint_refresh: rng
                .chance(50)
                .then(|| Duration::from_millis(1 + rng.below(5))),
        };
        let mut kafka = Kafka::default();
        // The slot's confirmed position, and the acknowledgements sent but maybe not received.
        let mut confirmed = 0u64;
        let mut now = Instant::now();
        let last = wal.last().map(|t| t.end).unwrap_or(0);
        let mut sessions = 0;
        while confirmed < last {
            sessions += 1;
            assert!(sessions < 1000, "seed {seed}: no progress");
            let mut m: Machine<u32> = Machine::new(lsn(kafka.checkpoint), limits);
            let mut input = stream(rng, &wal, confirmed);
            let mut acked_sent = confirmed;
            let mut sent = Vec::new();
            // The sink offers itself once at start and again after each commit.
            let mut sink_offers = 1;
            let mut stop = None;
            loop {
                let step = rng.below(100);
                let next = if stop.is_none() && step < 3 {
                    // A crash: the batch being committed may or may not have made it, nothing
                    // later did, and some acknowledgements never reached the server.
                    if !kafka.in_flight.is_empty() && rng.chance(50) {
                        kafka.commit_front();
                    }
                    kafka.in_flight.clear();
                    kafka.open.clear();
                    break;
                } else if stop.is_none() && step < 5 {
                    stop = Some(());
                    Input::Drain
                } else if step < 25 && sink_offers > 0 {
                    sink_offers -= 1;
                    Input::SinkReady
                } else if step < 45 && !kafka.in_flight.is_empty() {
                    Input::Acked {
                        upto: lsn(kafka.commit_front()),
                    }
                } else if step < 55 {
                    now += Duration::from_millis(1);
                    Input::Tick
                } else if m.wants_input() && !input.is_empty() {
                    input.pop_front().expect("not empty")
                } else if stop.is_some() && m.drained() {
                    assert!(
                        kafka.open.is_empty(),
                        "seed {seed}: a stop left a transaction open"
                    );
                    break;
                } else if input.is_empty() && m.drained() && stop.is_none() {
                    // Caught up: stop this session gracefully.
                    stop = Some(());
                    Input::Drain
                } else {
                    now += Duration::from_millis(1);
                    Input::Tick
                };
                for action in m
                    .on(next, now)
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"))
                {
                    match action {
                        Action::Append(records) => {
                            assert!(
                                records.iter().all(|e| tx_of[e] > kafka.checkpoint),
                                "seed {seed}: appended an event Kafka has"
                            );
                            kafka.open.extend(records);
                        }
                        Action::Commit(closing) => {
                            let records = std::mem::take(&mut kafka.open);
                            assert_eq!(closing.events, records.len(), "seed {seed}");
                            assert!(
                                records.iter().all(|e| tx_of[e] <= closing.upto.0),
                                "seed {seed}: a transaction holds an event past its checkpoint"
                            );
                            for tx in wal
                                .iter()
                                .filter(|t| t.events.iter().any(|e| records.contains(e)))
                            {
                                assert!(
                                    tx.events.iter().all(|e| records.contains(e)),
                                    "seed {seed}: Postgres transaction {} split between Kafka transactions",
                                    tx.end
                                );
                            }
                            kafka.in_flight.push_back((records, closing.upto.0));
                            sink_offers += 1;
                        }
                        Action::Abort => kafka.open.clear(),
                        Action::Acknowledge(at) => {
                            for tx in wal.iter().filter(|t| t.end <= at.0) {
                                for e in &tx.events {
                                    assert!(
                                        kafka.log.contains(e),
                                        "seed {seed}: acknowledged {} before event {e} was in Kafka",
                                        at.0
                                    );
                                }
                            }
                            acked_sent = acked_sent.max(at.0);
                            sent.push(at.0);
                        }
                        Action::Skipped { end } => assert!(
                            end.0 <= kafka.checkpoint,
                            "seed {seed}: skipped {} above the checkpoint",
                            end.0
                        ),
                    }
                }
            }
            // Status updates are sent every second: the server got the first few of them.
            confirmed = if rng.chance(50) || sent.is_empty() {
                acked_sent
            } else {
                confirmed.max(sent[rng.below(sent.len() as u64) as usize])
            };
        }
        let expected: Vec<u32> = wal.iter().flat_map(|t| t.events.clone()).collect();
        assert_eq!(
            kafka.log, expected,
            "seed {seed}: Kafka must hold each event once, in commit order"
        );
    }

    #[test]
    fn model_every_committed_event_reaches_kafka_once_in_order_through_any_crash() {
        for seed in 0..3000 {
            history(seed);
        }
    }
}
