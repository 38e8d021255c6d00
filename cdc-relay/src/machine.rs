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

use std::time::{Duration, Instant};

use crate::checkpoint;
use crate::pgoutput::Lsn;

/// When a batch of whole transactions is handed to the sink.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A batch this large goes at once, and reading stops until the sink takes it.
    pub max_events: usize,
    /// Otherwise a batch goes this long after its first event arrived.
    pub linger: Duration,
}

/// What the relay reads from Postgres or hears from the sink.
#[derive(Debug)]
pub enum Input<R> {
    /// A transaction starts; Postgres sends it whole, after it committed.
    Begin { commit_ts_micros: i64 },
    /// One outbox row of the open transaction, already turned into its record.
    Row(R),
    /// The open transaction ends at `end`.
    Commit { end: Lsn },
    /// The server has sent everything before `wal_end`.
    KeepAlive { wal_end: Lsn },
    /// The sink takes the next batch.
    SinkReady,
    /// Kafka committed the oldest batch in flight, which ended at `upto`.
    Acked { upto: Lsn },
    /// Time passed (a linger may have ended).
    Tick,
    /// Stop reading: publish what is complete, regardless of the linger.
    Drain,
}

/// What the relay must do, in order.
#[derive(Debug, PartialEq)]
pub enum Action<R> {
    /// Send these whole transactions as one Kafka transaction, with the checkpoint `upto`.
    Publish(Batch<R>),
    /// Postgres may release WAL before this position.
    Acknowledge(Lsn),
    /// A transaction Kafka already has (at or below the checkpoint) was dropped.
    Skipped { end: Lsn },
}

/// Whole Postgres transactions for one Kafka transaction.
#[derive(Debug, PartialEq)]
pub struct Batch<R> {
    pub records: Vec<R>,
    /// The commit LSN of the last transaction: the checkpoint written with the batch.
    pub upto: Lsn,
    /// (commit time, events) of each transaction, for the latency histogram.
    pub commits: Vec<(i64, usize)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("an insert arrived outside a transaction")]
    RowOutsideTransaction,
    #[error("an acknowledgement from Kafka arrived with no batch in flight")]
    AckWithoutBatch,
}

struct Open<R> {
    commit_ts_micros: i64,
    records: Vec<R>,
}

struct Pending<R> {
    records: Vec<R>,
    commits: Vec<(i64, usize)>,
    /// The commit LSN of the last complete transaction, with or without events.
    last_lsn: Option<Lsn>,
    first_at: Option<Instant>,
}

impl<R> Default for Pending<R> {
    fn default() -> Self {
        Pending {
            records: Vec::new(),
            commits: Vec::new(),
            last_lsn: None,
            first_at: None,
        }
    }
}

pub struct Machine<R> {
    limits: Limits,
    /// Kafka holds every transaction committed at or below this LSN.
    checkpoint: Lsn,
    open: Option<Open<R>>,
    pending: Pending<R>,
    /// Batches published and not yet acknowledged by Kafka.
    in_flight: usize,
    sink_ready: bool,
    draining: bool,
}

impl<R> Machine<R> {
    /// A session's machine, starting from the checkpoint read from Kafka.
    pub fn new(checkpoint: Lsn, limits: Limits) -> Self {
        Machine {
            limits,
            checkpoint,
            open: None,
            pending: Pending::default(),
            in_flight: 0,
            sink_ready: false,
            draining: false,
        }
    }

    /// False while a full batch waits for the sink: Postgres holds the rest meanwhile.
    pub fn wants_input(&self) -> bool {
        !self.draining && self.pending.records.len() < self.limits.max_events
    }

    /// When a [`Input::Tick`] may publish the waiting batch; `None` when only another input
    /// can change anything.
    pub fn deadline(&self) -> Option<Instant> {
        let first = self.pending.first_at?;
        if !self.sink_ready {
            None
        } else if self.draining || self.pending.records.len() >= self.limits.max_events {
            Some(first)
        } else {
            Some(first + self.limits.linger)
        }
    }

    /// After [`Input::Drain`]: true once everything complete is acknowledged by Kafka.
    pub fn drained(&self) -> bool {
        self.pending.records.is_empty() && self.in_flight == 0
    }

    /// The commit time of the transaction being received, if one is.
    pub fn open_commit_ts(&self) -> Option<i64> {
        self.open.as_ref().map(|o| o.commit_ts_micros)
    }

    pub fn on(&mut self, input: Input<R>, now: Instant) -> Result<Vec<Action<R>>, Violation> {
        let mut out = Vec::new();
        match input {
            Input::Begin { commit_ts_micros } => {
                self.open = Some(Open {
                    commit_ts_micros,
                    records: Vec::new(),
                });
            }
            Input::Row(record) => match self.open.as_mut() {
                Some(open) => open.records.push(record),
                None => return Err(Violation::RowOutsideTransaction),
            },
            Input::Commit { end } => self.commit(end, now, &mut out),
            Input::KeepAlive { wal_end } => {
                // Nothing received waits for Kafka: the slot may move to where the server is,
                // even if only other tables wrote WAL. Inside a transaction the server's
                // position may already be past its commit, so not then.
                if self.open.is_none()
                    && self.pending.records.is_empty()
                    && self.pending.last_lsn.is_none()
                    && self.in_flight == 0
                {
                    out.push(Action::Acknowledge(wal_end));
                }
            }
            Input::SinkReady => self.sink_ready = true,
            Input::Acked { upto } => self.acked(upto, &mut out)?,
            Input::Tick => {}
            Input::Drain => {
                // A half-received transaction is left for the next session: Postgres re-sends
                // it from the acknowledged position.
                self.draining = true;
                self.open = None;
            }
        }
        self.publish_if_due(now, &mut out);
        Ok(out)
    }

    fn commit(&mut self, end: Lsn, now: Instant, out: &mut Vec<Action<R>>) {
        let open = self.open.take().unwrap_or(Open {
            commit_ts_micros: 0,
            records: Vec::new(),
        });
        let idle = self.pending.records.is_empty() && self.in_flight == 0;
        if checkpoint::already_published(end, self.checkpoint) {
            // Re-sent after a restart; Kafka has it.
            out.push(Action::Skipped { end });
            if idle {
                out.push(Action::Acknowledge(end));
            }
        } else if open.records.is_empty() && idle {
            out.push(Action::Acknowledge(end));
        } else {
            if !open.records.is_empty() {
                self.pending
                    .commits
                    .push((open.commit_ts_micros, open.records.len()));
                self.pending.records.extend(open.records);
                self.pending.first_at.get_or_insert(now);
            }
            // An event-less transaction behind a batch is acknowledged with that batch.
            self.pending.last_lsn = Some(end);
        }
    }

    fn acked(&mut self, upto: Lsn, out: &mut Vec<Action<R>>) -> Result<(), Violation> {
        self.in_flight = self
            .in_flight
            .checked_sub(1)
            .ok_or(Violation::AckWithoutBatch)?;
        let mut upto = upto;
        // Transactions without outbox events that arrived while batches were in flight.
        if self.in_flight == 0 && self.pending.records.is_empty() {
            if let Some(lsn) = self.pending.last_lsn.take() {
                upto = upto.max(lsn);
            }
        }
        self.checkpoint = self.checkpoint.max(upto);
        out.push(Action::Acknowledge(upto));
        Ok(())
    }

    fn publish_if_due(&mut self, now: Instant, out: &mut Vec<Action<R>>) {
        if self.deadline().is_none_or(|at| now < at) {
            return;
        }
        let Some(upto) = self.pending.last_lsn else {
            return;
        };
        let pending = std::mem::take(&mut self.pending);
        self.in_flight += 1;
        self.sink_ready = false;
        out.push(Action::Publish(Batch {
            records: pending.records,
            upto,
            commits: pending.commits,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, VecDeque};

    const LIMITS: Limits = Limits {
        max_events: 3,
        linger: Duration::from_millis(5),
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

    fn tx(end: u64, rows: &[u32]) -> Vec<Input<u32>> {
        let mut v = vec![Input::Begin {
            commit_ts_micros: end as i64,
        }];
        v.extend(rows.iter().map(|r| Input::Row(*r)));
        v.push(Input::Commit { end: lsn(end) });
        v
    }

    #[test]
    fn a_batch_waits_for_its_linger_then_goes_whole() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        assert!(feed(&mut m, t0, vec![Input::SinkReady]).is_empty());
        assert!(feed(&mut m, t0, tx(10, &[1])).is_empty());
        assert!(feed(&mut m, t0, tx(20, &[2])).is_empty());
        assert_eq!(m.deadline(), Some(t0 + LIMITS.linger));
        let out = feed(&mut m, t0 + LIMITS.linger, vec![Input::Tick]);
        assert_eq!(
            out,
            vec![Action::Publish(Batch {
                records: vec![1, 2],
                upto: lsn(20),
                commits: vec![(10, 1), (20, 1)],
            })]
        );
        assert_eq!(m.deadline(), None, "the sink has not asked for more");
    }

    #[test]
    fn a_full_batch_goes_at_once_and_stops_reading_until_the_sink_takes_it() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        assert!(feed(&mut m, t0, tx(10, &[1, 2, 3])).is_empty(), "sink busy");
        assert!(!m.wants_input());
        let out = feed(&mut m, t0, vec![Input::SinkReady]);
        assert!(matches!(&out[..], [Action::Publish(b)] if b.records == vec![1, 2, 3]));
        assert!(m.wants_input());
    }

    #[test]
    fn a_transaction_is_never_split_across_batches() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        feed(&mut m, t0, vec![Input::SinkReady]);
        let out = feed(&mut m, t0, tx(10, &[1, 2, 3, 4, 5]));
        assert!(matches!(&out[..], [Action::Publish(b)] if b.records.len() == 5));
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
        let out = feed(&mut m, t0, tx(20, &[2]));
        assert_eq!(
            out,
            vec![
                Action::Skipped { end: lsn(20) },
                Action::Acknowledge(lsn(20))
            ]
        );
        assert!(feed(&mut m, t0, tx(30, &[3])).is_empty());
    }

    #[test]
    fn nothing_is_acknowledged_past_a_batch_kafka_has_not_committed() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        feed(&mut m, t0, vec![Input::SinkReady]);
        feed(&mut m, t0, tx(10, &[1, 2, 3]));
        // An event-less transaction and a keepalive behind the batch in flight.
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
        feed(
            &mut m,
            t0,
            vec![Input::Begin {
                commit_ts_micros: 0,
            }],
        );
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
    fn drain_publishes_what_is_complete_without_waiting_and_drops_the_open_transaction() {
        let t0 = Instant::now();
        let mut m = Machine::new(Lsn(0), LIMITS);
        feed(&mut m, t0, vec![Input::SinkReady]);
        feed(&mut m, t0, tx(10, &[1]));
        feed(
            &mut m,
            t0,
            vec![
                Input::Begin {
                    commit_ts_micros: 0,
                },
                Input::Row(2),
            ],
        );
        let out = feed(&mut m, t0, vec![Input::Drain]);
        assert!(matches!(&out[..], [Action::Publish(b)] if b.records == vec![1]));
        assert!(!m.drained());
        feed(&mut m, t0, vec![Input::Acked { upto: lsn(10) }]);
        assert!(m.drained());
    }

    #[test]
    fn protocol_violations_are_errors() {
        let t0 = Instant::now();
        let mut m: Machine<u32> = Machine::new(Lsn(0), LIMITS);
        assert_eq!(
            m.on(Input::Row(1), t0).unwrap_err(),
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

    /// xorshift64*: enough randomness for a model test, and every failure replays from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A committed Postgres transaction: its commit LSN and its events (ids).
    struct Tx {
        end: u64,
        events: Vec<u32>,
    }

    fn workload(rng: &mut Rng) -> Vec<Tx> {
        let mut next_id = 0;
        let mut end = 0;
        (0..rng.below(60) + 1)
            .map(|_| {
                end += 1 + rng.below(50);
                let events = (0..rng.below(6))
                    .map(|_| {
                        next_id += 1;
                        next_id
                    })
                    .collect();
                Tx { end, events }
            })
            .collect()
    }

    /// The replication stream of one session: every transaction after `confirmed`, with
    /// keepalives where a walsender may send them.
    fn stream(rng: &mut Rng, wal: &[Tx], confirmed: u64) -> VecDeque<Input<u32>> {
        let mut s = VecDeque::new();
        for tx in wal.iter().filter(|t| t.end > confirmed) {
            s.push_back(Input::Begin {
                commit_ts_micros: tx.end as i64,
            });
            for e in &tx.events {
                if rng.chance(10) {
                    // Mid-transaction the server's position may already be past the commit.
                    s.push_back(Input::KeepAlive {
                        wal_end: lsn(tx.end + rng.below(3)),
                    });
                }
                s.push_back(Input::Row(*e));
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
        /// Published batches in order: (events, upto).
        in_flight: VecDeque<(Vec<u32>, u64)>,
    }

    impl Kafka {
        fn commit_front(&mut self) -> u64 {
            let (events, upto) = self.in_flight.pop_front().expect("a batch in flight");
            self.log.extend(events);
            self.checkpoint = self.checkpoint.max(upto);
            upto
        }
    }

    /// Runs one random history; panics with the seed on any broken rule.
    fn history(seed: u64) {
        let rng = &mut Rng(seed | 1);
        let wal = workload(rng);
        let tx_of: BTreeMap<u32, u64> = wal
            .iter()
            .flat_map(|t| t.events.iter().map(move |e| (*e, t.end)))
            .collect();
        let limits = Limits {
            max_events: 1 + rng.below(8) as usize,
            linger: Duration::from_millis(rng.below(3)),
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
            // The sink offers itself once at start and again after taking each batch.
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
                        Action::Publish(batch) => {
                            assert!(
                                batch.records.iter().all(|e| tx_of[e] <= batch.upto.0),
                                "seed {seed}: a batch holds an event past its checkpoint"
                            );
                            for tx in wal
                                .iter()
                                .filter(|t| t.events.iter().any(|e| batch.records.contains(e)))
                            {
                                assert!(
                                    tx.events.iter().all(|e| batch.records.contains(e)),
                                    "seed {seed}: transaction {} split between batches",
                                    tx.end
                                );
                            }
                            kafka.in_flight.push_back((batch.records, batch.upto.0));
                            sink_offers += 1;
                        }
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
                        }
                        Action::Skipped { end } => assert!(
                            end.0 <= kafka.checkpoint,
                            "seed {seed}: skipped {} above the checkpoint",
                            end.0
                        ),
                    }
                }
            }
            // Status updates are sent every second: the server got some of them.
            confirmed = if rng.chance(50) {
                acked_sent
            } else {
                confirmed + rng.below(acked_sent - confirmed + 1)
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
