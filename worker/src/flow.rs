//! Per-partition back-pressure, as decisions only (no I/O): when the reader must pause fetching
//! one partition and when its lane may resume it.
//!
//! A lane that falls behind pauses only its own partition, so every other topic and partition
//! keeps flowing; the reader never waits on a lane. Between `low` and `high` nothing changes
//! (hysteresis), so a lane working at its limit does not flip fetching on and off per record.

/// What to do with the partition's fetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    Pause,
    Resume,
}

/// The records a lane holds (queued or in its current batch) and whether its partition is
/// paused. The caller applies each returned [`Fetch`] under the same lock that guards the
/// gate, so a pause and a resume can never be applied in the opposite order to their decision.
#[derive(Debug)]
pub struct Gate {
    held: usize,
    paused: bool,
    high: usize,
    low: usize,
}

impl Gate {
    /// A gate that pauses at `capacity` records held and resumes at half of it.
    pub fn new(capacity: usize) -> Gate {
        let high = capacity.max(1);
        Gate {
            held: 0,
            paused: false,
            high,
            low: high / 2,
        }
    }

    /// The reader handed the lane one record.
    pub fn handed(&mut self) -> Option<Fetch> {
        self.held += 1;
        // A rebalance can hand the partition back unpaused while the gate still believes it
        // paused; pausing again at every further multiple of `high` bounds what that leaks.
        let due = !self.paused || self.held.is_multiple_of(self.high);
        if self.held >= self.high && due {
            self.paused = true;
            Some(Fetch::Pause)
        } else {
            None
        }
    }

    /// The lane finished `n` records (stored, duplicates or dead-lettered).
    pub fn finished(&mut self, n: usize) -> Option<Fetch> {
        self.held = self.held.saturating_sub(n);
        if self.paused && self.held <= self.low {
            self.paused = false;
            Some(Fetch::Resume)
        } else {
            None
        }
    }

    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_at_capacity_and_resumes_at_half() {
        let mut g = Gate::new(4);
        assert_eq!(g.handed(), None);
        assert_eq!(g.handed(), None);
        assert_eq!(g.handed(), None);
        assert_eq!(g.handed(), Some(Fetch::Pause));
        // Records fetched before the pause took effect still arrive: no second pause.
        assert_eq!(g.handed(), None);
        assert_eq!(g.finished(2), None, "3 held: above half");
        assert_eq!(g.finished(1), Some(Fetch::Resume), "2 held: half");
        assert_eq!(g.finished(2), None, "already resumed");
        assert_eq!(g.held(), 0);
    }

    #[test]
    fn a_lane_that_keeps_up_never_pauses() {
        let mut g = Gate::new(3);
        for _ in 0..1000 {
            assert_eq!(g.handed(), None);
            assert_eq!(g.handed(), None);
            assert_eq!(g.finished(2), None);
        }
    }

    #[test]
    fn pauses_again_if_a_rebalance_undid_the_pause() {
        let mut g = Gate::new(2);
        g.handed();
        assert_eq!(g.handed(), Some(Fetch::Pause));
        assert_eq!(g.handed(), None);
        assert_eq!(
            g.handed(),
            Some(Fetch::Pause),
            "records keep coming: re-pause"
        );
    }

    #[test]
    fn capacity_zero_is_one() {
        let mut g = Gate::new(0);
        assert_eq!(g.handed(), Some(Fetch::Pause));
        assert_eq!(g.finished(1), Some(Fetch::Resume));
    }

    /// Over any interleaving: never a resume without a pause, a second pause only at a multiple
    /// of the capacity, paused whenever full, fetching whenever at most half full.
    #[test]
    fn decisions_alternate_over_random_interleavings() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for capacity in 1..20 {
            let mut g = Gate::new(capacity);
            let mut paused = false;
            for _ in 0..10_000 {
                if next() % 2 == 0 {
                    if g.handed() == Some(Fetch::Pause) {
                        assert!(!paused || g.held().is_multiple_of(capacity));
                        paused = true;
                    }
                } else if g.held() > 0 {
                    let n = 1 + (next() as usize % g.held());
                    if g.finished(n) == Some(Fetch::Resume) {
                        assert!(paused, "resume without a pause");
                        paused = false;
                    }
                }
                if g.held() >= capacity.max(1) {
                    assert!(
                        g.paused,
                        "{} held, capacity {capacity}, not paused",
                        g.held()
                    );
                }
                if g.held() <= capacity.max(1) / 2 {
                    assert!(!g.paused, "{} held, capacity {capacity}, paused", g.held());
                }
            }
            let held = g.held();
            g.finished(held);
            assert!(!g.paused, "a drained lane is resumed");
        }
    }
}
