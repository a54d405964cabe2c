//! The clock: where "now" comes from when a caller does not pass a timestamp.
//!
//! Engine logic never reads the system time directly. Every public operation takes an explicit
//! timestamp (milliseconds since the Unix epoch, UTC) or asks the engine's `Clock`, so tests and
//! replays control time exactly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> u64;
}

/// The wall clock. Quota windows are calendar- and wall-time based (a daily quota resets at local
/// midnight), so a monotonic clock would be wrong here; the engine tolerates steps backwards.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(elapsed) => u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            // A system clock before 1970 is a misconfigured machine; the epoch is the safe floor.
            Err(_) => 0,
        }
    }
}

/// A clock that only moves when told to: for tests, simulations and replays.
#[derive(Debug, Default)]
pub struct ManualClock {
    // Relaxed: the value is a plain number with no other memory published through it.
    now_ms: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ms: u64) -> ManualClock {
        ManualClock {
            now_ms: AtomicU64::new(start_ms),
        }
    }

    pub fn set_ms(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Moves the clock forward, saturating at `u64::MAX`, and returns the new time. Advances
    /// from several threads at once each count (one read-modify-write).
    pub fn advance_ms(&self, delta_ms: u64) -> u64 {
        let advance = |now_ms: u64| Some(now_ms.saturating_add(delta_ms));
        // The closure always answers `Some`, so the update always succeeds.
        let before = self
            .now_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, advance)
            .unwrap_or_else(|now_ms| now_ms);
        before.saturating_add(delta_ms)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        assert_eq!(clock.advance_ms(500), 1_500);
        clock.set_ms(10);
        assert_eq!(clock.now_ms(), 10);
        assert_eq!(clock.advance_ms(u64::MAX), u64::MAX);
    }

    /// Threads advancing one clock at once (a test's workers, each moving time on) each move
    /// it by their own delta: the clock ends at the sum of them all and never goes back.
    /// (A load and a store apart lost advances, and one stored after a larger one moved the
    /// clock backwards.)
    #[test]
    fn advances_from_several_threads_all_count() {
        const THREADS: u64 = 4;
        const ADVANCES: u64 = 1_000_000;
        let clock = ManualClock::new(1_000);
        let start = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    start.wait();
                    for _ in 0..ADVANCES {
                        clock.advance_ms(1);
                    }
                });
            }
        });
        assert_eq!(clock.now_ms(), 1_000 + THREADS * ADVANCES);
    }

    #[test]
    fn the_system_clock_is_after_2020() {
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
