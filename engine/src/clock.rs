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

    /// Moves the clock forward, saturating at `u64::MAX`, and returns the new time.
    pub fn advance_ms(&self, delta_ms: u64) -> u64 {
        let before = self.now_ms.load(Ordering::Relaxed);
        let after = before.saturating_add(delta_ms);
        self.now_ms.store(after, Ordering::Relaxed);
        after
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

    #[test]
    fn the_system_clock_is_after_2020() {
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
