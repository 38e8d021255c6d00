//! Per-partition back-pressure, as decisions only (no I/O): when the reader must pause fetching
//! one partition and when its lane may resume it.
//!
//! A lane that falls behind pauses only its own partition, so every other topic and partition
//! keeps flowing; the reader never waits on a lane. A lane is full at `records` records or
//! `bytes` bytes held, whichever comes first (records can be up to Kafka's size limit, so a
//! count alone would not bound memory), and resumes when both are at half or less.
//!
//! Why wide limits: librdkafka drops what it prefetched for a partition when the partition is
//! paused and fetches it again on resume, so every pause costs a refetch. A lane that pauses
//! every thousand records spends its time refetching (measured: a backlog drained at 11,700
//! events/s with a 2,000-record limit, at 29,900 with 20,000).

/// What to do with the partition's fetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    Pause,
    Resume,
}

/// What one lane holds, queued or in its current batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub records: usize,
    pub bytes: usize,
}

impl Load {
    pub fn one(bytes: usize) -> Load {
        Load { records: 1, bytes }
    }
}

/// The lane's load and whether its partition is paused. The caller applies each returned
/// [`Fetch`] under the same lock that guards the gate, so a pause and a resume can never reach
/// librdkafka in the opposite order to their decision.
#[derive(Debug)]
pub struct Gate {
    held: Load,
    limit: Load,
    paused: bool,
    /// Paused but still receiving: the load at which to pause again.
    repause: Load,
}

impl Gate {
    /// A gate that pauses at `limit` (either part) and resumes at half of both. A zero limit
    /// counts as one.
    pub fn new(limit: Load) -> Gate {
        let limit = Load {
            records: limit.records.max(1),
            bytes: limit.bytes.max(1),
        };
        Gate {
            held: Load::default(),
            limit,
            paused: false,
            repause: limit,
        }
    }

    fn reached(&self, mark: Load) -> bool {
        self.held.records >= mark.records || self.held.bytes >= mark.bytes
    }

    /// The reader handed the lane one record.
    pub fn handed(&mut self, record: Load) -> Option<Fetch> {
        self.held.records += record.records;
        self.held.bytes += record.bytes;
        // Records fetched before a pause took effect still arrive, and a rebalance can hand the
        // partition back unpaused while the gate believes it paused: pausing again each time
        // another full limit arrives bounds what either lets in.
        let due = if self.paused {
            self.reached(self.repause)
        } else {
            self.reached(self.limit)
        };
        if !due {
            return None;
        }
        self.paused = true;
        self.repause = Load {
            records: self.held.records + self.limit.records,
            bytes: self.held.bytes + self.limit.bytes,
        };
        Some(Fetch::Pause)
    }

    /// The lane finished records (stored, duplicates or dead-lettered) weighing `done`.
    pub fn finished(&mut self, done: Load) -> Option<Fetch> {
        self.held.records = self.held.records.saturating_sub(done.records);
        self.held.bytes = self.held.bytes.saturating_sub(done.bytes);
        let half =
            self.held.records <= self.limit.records / 2 && self.held.bytes <= self.limit.bytes / 2;
        if self.paused && half {
            self.paused = false;
            Some(Fetch::Resume)
        } else {
            None
        }
    }

    pub fn held(&self) -> Load {
        self.held
    }

    pub fn paused(&self) -> bool {
        self.paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(records: usize, bytes: usize) -> Gate {
        Gate::new(Load { records, bytes })
    }

    #[test]
    fn pauses_at_the_record_limit_and_resumes_at_half() {
        let mut g = gate(4, 1_000_000);
        assert_eq!(g.handed(Load::one(10)), None);
        assert_eq!(g.handed(Load::one(10)), None);
        assert_eq!(g.handed(Load::one(10)), None);
        assert_eq!(g.handed(Load::one(10)), Some(Fetch::Pause));
        // Records fetched before the pause took effect still arrive: no second pause.
        assert_eq!(g.handed(Load::one(10)), None);
        assert_eq!(
            g.finished(Load {
                records: 2,
                bytes: 20
            }),
            None,
            "3 held"
        );
        assert_eq!(
            g.finished(Load::one(10)),
            Some(Fetch::Resume),
            "2 held: half"
        );
        assert_eq!(
            g.finished(Load {
                records: 2,
                bytes: 20
            }),
            None,
            "already resumed"
        );
        assert_eq!(g.held(), Load::default());
    }

    #[test]
    fn large_records_pause_by_bytes_and_resume_when_both_are_at_half() {
        let mut g = gate(1000, 100);
        assert_eq!(g.handed(Load::one(60)), None);
        assert_eq!(
            g.handed(Load::one(60)),
            Some(Fetch::Pause),
            "120 bytes held"
        );
        assert_eq!(g.finished(Load::one(60)), None, "60 bytes held: above half");
        assert_eq!(g.finished(Load::one(60)), Some(Fetch::Resume), "none held");
    }

    #[test]
    fn a_lane_that_keeps_up_never_pauses() {
        let mut g = gate(3, 1000);
        for _ in 0..1000 {
            assert_eq!(g.handed(Load::one(100)), None);
            assert_eq!(g.handed(Load::one(100)), None);
            assert_eq!(
                g.finished(Load {
                    records: 2,
                    bytes: 200
                }),
                None
            );
        }
    }

    #[test]
    fn pauses_again_when_another_full_limit_arrives_while_paused() {
        let mut g = gate(2, 1000);
        g.handed(Load::one(1));
        assert_eq!(g.handed(Load::one(1)), Some(Fetch::Pause));
        assert_eq!(g.handed(Load::one(1)), None);
        assert_eq!(
            g.handed(Load::one(1)),
            Some(Fetch::Pause),
            "records keep coming: a rebalance undid the pause"
        );
    }

    #[test]
    fn a_zero_limit_is_one() {
        let mut g = gate(0, 0);
        assert_eq!(g.handed(Load::one(0)), Some(Fetch::Pause));
        assert_eq!(g.finished(Load::one(0)), Some(Fetch::Resume));
    }

    /// Over random interleavings: never a resume without a pause; paused whenever full; fetching
    /// whenever at most half full; a drained lane is fetching.
    #[test]
    fn invariants_hold_over_random_interleavings() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        for limit in 1..20 {
            let mut g = gate(limit, limit * 50);
            let mut paused = false;
            for _ in 0..10_000 {
                if next() % 2 == 0 {
                    if g.handed(Load::one(next() % 100)) == Some(Fetch::Pause) {
                        paused = true;
                    }
                } else if g.held().records > 0 {
                    let n = 1 + next() % g.held().records;
                    let b = g.held().bytes * n / g.held().records;
                    if g.finished(Load {
                        records: n,
                        bytes: b,
                    }) == Some(Fetch::Resume)
                    {
                        assert!(paused, "resume without a pause");
                        paused = false;
                    }
                }
                assert_eq!(paused, g.paused());
                let h = g.held();
                if h.records >= limit || h.bytes >= limit * 50 {
                    assert!(paused, "{h:?} held, limit {limit}, not paused");
                }
                if h.records <= limit / 2 && h.bytes <= limit * 25 {
                    assert!(!paused, "{h:?} held, limit {limit}, paused");
                }
            }
            let h = g.held();
            g.finished(h);
            assert!(!g.paused(), "a drained lane is fetching");
        }
    }
}
