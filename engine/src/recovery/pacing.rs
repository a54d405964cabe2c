//! Checkpoint pacing: keeps periodic checkpoints to a quarter of one core's time, as far as a
//! bounded tail allows.
//!
//! A checkpoint's cost follows the state (every key's counters and its rings' live buckets),
//! while `checkpoint_every_events` counts events. With 100,000 keys whose 5-hour rings are
//! full, one checkpoint cut, copied and encoded about 260 ms of a core, and at 2 million
//! events a second one came due twice a second: a quarter of the machine went to snapshots.
//! So once a checkpoint's work took `cost` (from the cut to the encoded bytes, not the disk
//! writes), the next periodic one waits until `SPACING_IN_COSTS` times `cost` has passed
//! since that one started, or until `MAX_PACED_INTERVALS` intervals of events have passed,
//! whichever comes first: opening replays about twice `checkpoint_every_events` at most (more
//! after a crash while a checkpoint's snapshot was being written). (With full rings, a tail of
//! 3 million events took 650 ms to replay at 100,000 keys, on top of 370 ms for the snapshot.)
//! Where the cap comes first (events faster than `MAX_PACED_INTERVALS` intervals in
//! `SPACING_IN_COSTS` costs: at 260 ms a checkpoint and an interval of 1 million, from
//! about 2 million events a second), checkpoints take more than a quarter of a core.
//! Checkpoints cheaper than `PACED_FROM` are never held back, so small engines checkpoint
//! every `checkpoint_every_events`; the cost is wall-clock time, so on a loaded machine a
//! small one can be paced too. `Engine::checkpoint` and `close` are never paced.
//!
//! Wall-clock time here is the machine's, not the engine's `Clock`: it measures work, and
//! decides nothing about quota.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The next periodic checkpoint starts at least this many of the last one's costs after the
/// last one started (so checkpoints take at most 1 in this many of a core's time), unless the
/// tail reaches `MAX_PACED_INTERVALS` intervals first.
pub(crate) const SPACING_IN_COSTS: u32 = 4;
/// The longest a checkpoint is held back for its predecessor's cost (the tail's cap comes
/// first at any realistic rate; this keeps the arithmetic in range).
pub(crate) const MAX_PACED_WAIT: Duration = Duration::from_secs(3_600);
/// Checkpoints whose work took less than this are not paced.
pub(crate) const PACED_FROM: Duration = Duration::from_millis(10);
/// Pacing holds a checkpoint back until the events since the last one reach this many times
/// `checkpoint_every_events` at most: opening replays about that many at most.
pub(crate) const MAX_PACED_INTERVALS: u64 = 2;
/// A checkpoint held back reads the time again only this many events later at most (a 16th of
/// the interval if that is less), so appends while one waits pay a load and a compare, not a
/// clock read each.
pub(crate) const RECHECK_EVENTS: u64 = 1_024;

const _: () = assert!(MAX_PACED_INTERVALS >= 1 && SPACING_IN_COSTS >= 1);

/// How many events after a held-back look the next one comes, for an interval of `every`.
pub(crate) fn recheck_events(every: u64) -> u64 {
    (every / 16).clamp(1, RECHECK_EVENTS)
}

/// When the next periodic checkpoint may start (see the module's comment).
#[derive(Debug)]
pub(crate) struct CheckpointPacing {
    epoch: Instant,
    // Relaxed: microseconds after `epoch` before which no periodic checkpoint starts (0: any
    // time); written after a checkpoint's encoding, read by the commit path once one is due.
    // A stale value starts or holds back one checkpoint a little early or late, nothing more.
    not_before_us: AtomicU64,
    // Relaxed: the sequence number before which a held-back checkpoint does not look at the
    // time again. A commit that read the wait just before `note` lifted it can arm this after
    // `note` cleared it: the checkpoint then comes one recheck (`recheck_events`) later.
    recheck_at_seq: AtomicU64,
}

impl Default for CheckpointPacing {
    fn default() -> Self {
        CheckpointPacing {
            epoch: Instant::now(),
            not_before_us: AtomicU64::new(0),
            recheck_at_seq: AtomicU64::new(0),
        }
    }
}

impl CheckpointPacing {
    /// Whether a periodic checkpoint that is due at `seq` may start now. Holding it back
    /// arms a recheck `recheck` events later.
    #[inline]
    pub(crate) fn allows(&self, seq: u64, recheck: u64) -> bool {
        if seq < self.recheck_at_seq.load(Ordering::Relaxed) {
            return false;
        }
        let not_before = self.not_before_us.load(Ordering::Relaxed);
        if not_before == 0 || self.micros_since_epoch(Instant::now()) >= not_before {
            return true;
        }
        self.recheck_at_seq
            .store(seq.saturating_add(recheck), Ordering::Relaxed);
        false
    }

    /// A checkpoint that started at `started` took `cost` to cut, copy and encode: the next
    /// periodic one waits for `not_before(started, cost)`.
    pub(crate) fn note(&self, started: Instant, cost: Duration) {
        let not_before = match not_before(started, cost) {
            Some(at) => self.micros_since_epoch(at).max(1),
            None => 0,
        };
        self.not_before_us.store(not_before, Ordering::Relaxed);
        self.recheck_at_seq.store(0, Ordering::Relaxed);
    }

    /// When the next periodic checkpoint may start, if it is held back at all.
    #[cfg(test)]
    pub(crate) fn next_not_before(&self) -> Option<Instant> {
        match self.not_before_us.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(self.epoch + Duration::from_micros(micros)),
        }
    }

    fn micros_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }
}

/// The earliest start of the next periodic checkpoint after one that started at `started`
/// and took `cost`: `SPACING_IN_COSTS` costs after its start (`MAX_PACED_WAIT` at most), or
/// `None` (no wait) for a checkpoint cheaper than `PACED_FROM`.
pub(crate) fn not_before(started: Instant, cost: Duration) -> Option<Instant> {
    if cost < PACED_FROM {
        return None;
    }
    let wait = cost.saturating_mul(SPACING_IN_COSTS).min(MAX_PACED_WAIT);
    // An `Instant` an hour on is in range on every platform Rust supports.
    started.checked_add(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cheap_checkpoint_holds_nothing_back() {
        let pacing = CheckpointPacing::default();
        let started = Instant::now();
        assert_eq!(
            not_before(started, PACED_FROM - Duration::from_micros(1)),
            None
        );
        pacing.note(started, Duration::from_millis(9));
        assert!(pacing.allows(1, RECHECK_EVENTS));
        assert_eq!(pacing.next_not_before(), None);
    }

    #[test]
    fn a_costly_checkpoint_holds_the_next_back_for_its_share() {
        let started = Instant::now();
        let cost = Duration::from_millis(260);
        assert_eq!(
            not_before(started, cost),
            Some(started + cost * SPACING_IN_COSTS)
        );
        // An epoch a second ago, so a wait until 1 us after it is over.
        let pacing = CheckpointPacing {
            epoch: Instant::now() - Duration::from_secs(1),
            ..CheckpointPacing::default()
        };
        // A checkpoint that cost an hour: the next one is far off.
        pacing.note(Instant::now(), Duration::from_secs(3_600));
        assert!(pacing
            .next_not_before()
            .is_some_and(|at| at > Instant::now()));
        assert!(!pacing.allows(5_000, RECHECK_EVENTS));
        // Held back, it does not read the clock again until `RECHECK_EVENTS` later...
        pacing.note_not_before_for_test(1);
        assert!(!pacing.allows(5_000 + RECHECK_EVENTS - 1, RECHECK_EVENTS));
        // ...and then it sees the time has come.
        assert!(pacing.allows(5_000 + RECHECK_EVENTS, RECHECK_EVENTS));
    }

    #[test]
    fn a_recheck_comes_within_a_16th_of_a_small_interval() {
        assert_eq!(recheck_events(1), 1);
        assert_eq!(recheck_events(50), 3);
        assert_eq!(recheck_events(1_000_000), RECHECK_EVENTS);
        assert_eq!(recheck_events(u64::MAX), RECHECK_EVENTS);
    }

    #[test]
    fn a_cost_beyond_any_wait_holds_back_for_the_longest_wait() {
        let started = Instant::now();
        assert_eq!(
            not_before(started, Duration::MAX),
            Some(started + MAX_PACED_WAIT)
        );
    }

    #[test]
    fn a_later_cheap_checkpoint_lifts_the_wait() {
        let pacing = CheckpointPacing::default();
        pacing.note(Instant::now(), Duration::from_secs(3_600));
        assert!(!pacing.allows(10, 1));
        pacing.note(Instant::now(), Duration::from_millis(1));
        assert!(pacing.allows(11, 1));
    }

    impl CheckpointPacing {
        /// Sets the start-no-earlier time without touching the recheck (tests).
        fn note_not_before_for_test(&self, micros: u64) {
            self.not_before_us.store(micros, Ordering::Relaxed);
        }
    }
}
