//! Usage windows: the lock-free sliding-bucket ring behind a rolling limit and the single-word
//! counter behind a daily, weekly or monthly limit.
//!
//! ## Rolling ring
//! Time is cut into buckets of `bucket_ms`; epoch `b` is bucket number `t / bucket_ms`. A window
//! of `N = ceil(window / bucket)` buckets keeps `S = N + 1` slots: bucket `b` is live at epoch `e`
//! iff `e - N <= b <= e`, so a unit used at `t` in bucket `b` is released at `(b + N + 1) * bucket`
//! `>= t + window`: never early, at most one bucket late.
//!
//! Each slot is one `AtomicU64` packing a 32-bit lap tag (`b / S`) and a 32-bit count, so whoever
//! replaces a stale slot (by CAS) is the only one to subtract its count from `total`. `total` is
//! the sum of live counts plus units reserved but not yet recorded: admission is a CAS on `total`
//! (`total + n <= limit`), then the units are recorded in the slot of their bucket. `head` is the
//! newest epoch any caller has reached; it never moves back, so a timestamp that goes backwards is
//! counted at `head` and never releases quota early.
//!
//! Invariant (checked in debug builds): `total >= sum of slot counts`, so `total` never
//! under-counts and concurrent consumers never over-admit.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::calendar::{Calendar, CalendarPeriod};

const COUNT_BITS: u32 = 32;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

fn pack(lap: u32, count: u64) -> u64 {
    debug_assert!(count <= COUNT_MASK);
    (u64::from(lap) << COUNT_BITS) | count
}

fn unpack(word: u64) -> (u32, u64) {
    ((word >> COUNT_BITS) as u32, word & COUNT_MASK)
}

/// Whether lap `tag` comes before lap `current` (serial-number comparison, so the 32-bit tags may
/// wrap; in practice they never do: laps are at least 2 s and timestamps end in 2100).
fn lap_before(tag: u32, current: u32) -> bool {
    (current.wrapping_sub(tag) as i32) > 0
}

/// The geometry of a rolling window, shared by every key on the limit (not stored per key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollingShape {
    pub bucket_ms: u64,
    /// `N`: buckets the window spans.
    pub buckets: u64,
}

impl RollingShape {
    pub fn new(window_ms: u64, bucket_ms: u64) -> RollingShape {
        assert!(
            bucket_ms > 0 && window_ms >= bucket_ms,
            "shape: bucket must fit the window"
        );
        RollingShape {
            bucket_ms,
            buckets: window_ms.div_ceil(bucket_ms),
        }
    }

    pub fn slots(&self) -> u64 {
        self.buckets + 1
    }

    pub fn epoch(&self, at_ms: u64) -> u64 {
        at_ms / self.bucket_ms
    }

    fn lap(&self, epoch: u64) -> u32 {
        (epoch / self.slots()) as u32
    }

    fn slot(&self, epoch: u64) -> usize {
        (epoch % self.slots()) as usize
    }

    /// When the units recorded in bucket `epoch` stop counting.
    pub fn release_ms(&self, epoch: u64) -> u64 {
        epoch
            .saturating_add(self.buckets + 1)
            .saturating_mul(self.bucket_ms)
    }
}

#[derive(Debug)]
pub struct RollingWindow {
    // AcqRel on every read-modify-write: a count is subtracted only by a thread that saw the
    // slot write which followed the matching add, so subtractions never precede their adds.
    total: AtomicU64,
    // AcqRel CAS: publishes the newest epoch; its winner sweeps the slots it passed over.
    head: AtomicU64,
    // AcqRel CAS on each slot; see `total`.
    slots: Box<[AtomicU64]>,
}

impl RollingWindow {
    pub fn new(shape: RollingShape) -> RollingWindow {
        RollingWindow {
            total: AtomicU64::new(0),
            head: AtomicU64::new(0),
            slots: (0..shape.slots()).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Bytes of the slot array (the struct itself lives inline in its key's counter list).
    pub fn heap_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<AtomicU64>()
    }

    /// Moves the window to `epoch` (or keeps it at a newer head) and returns the effective epoch.
    pub fn advance(&self, shape: RollingShape, epoch: u64) -> u64 {
        debug_assert_eq!(self.slots.len() as u64, shape.slots());
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            if epoch <= head {
                return head;
            }
            match self
                .head
                .compare_exchange_weak(head, epoch, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let first = head
                        .saturating_add(1)
                        .max(epoch.saturating_sub(shape.buckets));
                    for passed in first..=epoch {
                        self.expire_stale(shape, passed);
                    }
                    return epoch;
                }
                Err(current) => head = current,
            }
        }
    }

    /// Clears the slot of `epoch` if it still holds an older lap's count.
    fn expire_stale(&self, shape: RollingShape, epoch: u64) {
        let slot = &self.slots[shape.slot(epoch)];
        let lap = shape.lap(epoch);
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (tag, count) = unpack(word);
            if count == 0 || !lap_before(tag, lap) {
                return;
            }
            match slot.compare_exchange_weak(
                word,
                pack(lap, 0),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.subtract_total(count);
                    return;
                }
                Err(current) => word = current,
            }
        }
    }

    fn subtract_total(&self, count: u64) {
        let before = self.total.fetch_sub(count, Ordering::AcqRel);
        debug_assert!(before >= count, "rolling total would go below zero");
    }

    /// Units counted now (after `advance`), including reservations in flight.
    pub fn used(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// Reserves `amount` if `used + amount <= limit`; returns the new `used`, or the current
    /// `used` when it does not fit.
    pub fn try_reserve(&self, amount: u64, limit: u64) -> Result<u64, u64> {
        let mut total = self.total.load(Ordering::Acquire);
        loop {
            let next = match total.checked_add(amount) {
                Some(next) if next <= limit => next,
                _ => return Err(total),
            };
            match self
                .total
                .compare_exchange_weak(total, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(next),
                Err(current) => total = current,
            }
        }
    }

    /// Takes back a reservation that was never recorded (another limit denied the request).
    pub fn unreserve(&self, amount: u64) {
        self.subtract_total(amount);
    }

    /// Records reserved units in the bucket of `epoch`.
    pub fn record(&self, shape: RollingShape, epoch: u64, amount: u64) {
        let slot = &self.slots[shape.slot(epoch)];
        let lap = shape.lap(epoch);
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (tag, count) = unpack(word);
            let (next, stale) = if tag == lap {
                (pack(lap, (count + amount).min(COUNT_MASK)), 0)
            } else if lap_before(tag, lap) {
                (pack(lap, amount), count)
            } else {
                // The slot already belongs to a newer lap: this bucket has aged out entirely.
                self.subtract_total(amount);
                return;
            };
            match slot.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if stale > 0 {
                        self.subtract_total(stale);
                    }
                    return;
                }
                Err(current) => word = current,
            }
        }
    }

    /// Adds units whatever the limit (an adjustment recording usage that really happened).
    /// Fails, changing nothing, if the bucket's 32-bit count would overflow.
    pub fn force(&self, shape: RollingShape, epoch: u64, amount: u64) -> Result<(), ()> {
        let (_, count) = unpack(self.slots[shape.slot(epoch)].load(Ordering::Acquire));
        if count.checked_add(amount).is_none_or(|sum| sum > COUNT_MASK) {
            return Err(());
        }
        self.total.fetch_add(amount, Ordering::AcqRel);
        self.record(shape, epoch, amount);
        Ok(())
    }

    /// Gives back up to `amount` units recorded in bucket `epoch`, if that bucket is still live;
    /// returns how many were given back.
    pub fn refund(&self, shape: RollingShape, epoch: u64, amount: u64) -> u64 {
        let slot = &self.slots[shape.slot(epoch)];
        let lap = shape.lap(epoch);
        let mut word = slot.load(Ordering::Acquire);
        loop {
            let (tag, count) = unpack(word);
            if tag != lap || count == 0 {
                return 0;
            }
            let given = count.min(amount);
            match slot.compare_exchange_weak(
                word,
                pack(lap, count - given),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.subtract_total(given);
                    return given;
                }
                Err(current) => word = current,
            }
        }
    }

    /// The earliest time at which at least `needed` units will have aged out, looking from
    /// `epoch` (the effective epoch of the request). `None` if the recorded buckets do not hold
    /// that many (the rest is in flight): then the caller uses the whole window.
    pub fn release_time(&self, shape: RollingShape, epoch: u64, needed: u64) -> Option<u64> {
        let mut freed = 0u64;
        for bucket in epoch.saturating_sub(shape.buckets)..=epoch {
            let (tag, count) = unpack(self.slots[shape.slot(bucket)].load(Ordering::Acquire));
            if tag == shape.lap(bucket) && count > 0 {
                freed = freed.saturating_add(count);
                if freed >= needed {
                    return Some(shape.release_ms(bucket));
                }
            }
        }
        None
    }

    /// When everything counted now will have aged out: the release of the newest non-empty
    /// bucket, or `None` if the window is empty.
    pub fn drain_time(&self, shape: RollingShape, epoch: u64) -> Option<u64> {
        if self.used() == 0 {
            return None;
        }
        let newest = (epoch.saturating_sub(shape.buckets)..=epoch)
            .rev()
            .find(|bucket| {
                let (tag, count) = unpack(self.slots[shape.slot(*bucket)].load(Ordering::Acquire));
                tag == shape.lap(*bucket) && count > 0
            });
        Some(shape.release_ms(newest.unwrap_or(epoch)))
    }

    /// Per-bucket counts of the live window, oldest first, as `(bucket start ms, count)`.
    pub fn buckets(&self, shape: RollingShape, epoch: u64) -> Vec<(u64, u64)> {
        (epoch.saturating_sub(shape.buckets)..=epoch)
            .filter_map(|bucket| {
                let (tag, count) = unpack(self.slots[shape.slot(bucket)].load(Ordering::Acquire));
                (tag == shape.lap(bucket) && count > 0).then_some((bucket * shape.bucket_ms, count))
            })
            .collect()
    }

    /// Rebuilds this window's live counts in another shape (a policy swap changed the bucket
    /// width). Each bucket's units move to the new bucket holding the old bucket's last instant,
    /// so nothing is released earlier than it would have been.
    pub fn reshaped(&self, from: RollingShape, to: RollingShape) -> RollingWindow {
        let window = RollingWindow::new(to);
        let head = self.head.load(Ordering::Acquire);
        let head_ms = head.saturating_mul(from.bucket_ms);
        let new_head = window.advance(to, to.epoch(head_ms.saturating_add(from.bucket_ms - 1)));
        for (start_ms, count) in self.buckets(from, head) {
            let epoch = to.epoch(start_ms + from.bucket_ms - 1);
            if epoch.saturating_add(to.buckets) < new_head {
                continue; // already out of the (shorter) new window
            }
            window.total.fetch_add(count, Ordering::AcqRel);
            window.record(to, epoch, count);
        }
        window
    }

    /// Whether nothing is counted as of `epoch` (the key's state may then be reclaimed).
    pub fn is_idle(&self, shape: RollingShape, epoch: u64) -> bool {
        self.advance(shape, epoch);
        self.used() == 0
    }

    #[cfg(test)]
    pub(crate) fn slot_sum(&self) -> u64 {
        self.slots
            .iter()
            .map(|slot| unpack(slot.load(Ordering::Acquire)).1)
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------

const PERIOD_BITS: u32 = 16;
const PERIOD_COUNT_BITS: u32 = 64 - PERIOD_BITS;
const PERIOD_COUNT_MASK: u64 = (1 << PERIOD_COUNT_BITS) - 1;

/// A daily, weekly or monthly counter: one `AtomicU64` packing the period index (16 bits: days
/// since 1970 stay below 65,536 until 2149, past tally's last timestamp in 2100) and the count
/// (48 bits). A counter from an older period reads as zero; if a timestamp goes back across a
/// boundary, the newer period stands (quota is never released early).
#[derive(Debug, Default)]
pub struct CalendarCounter {
    // AcqRel CAS: the whole state is this one word, so each update is a single linearizable step.
    word: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodUse {
    /// The period the count belongs to (the request's, or a newer one if time went back).
    pub period: u32,
    pub used: u64,
}

fn pack_period(period: u32, count: u64) -> u64 {
    debug_assert!(period < (1 << PERIOD_BITS) && count <= PERIOD_COUNT_MASK);
    (u64::from(period) << PERIOD_COUNT_BITS) | count
}

fn unpack_period(word: u64) -> (u32, u64) {
    ((word >> PERIOD_COUNT_BITS) as u32, word & PERIOD_COUNT_MASK)
}

impl CalendarCounter {
    pub fn new() -> CalendarCounter {
        CalendarCounter::default()
    }

    /// The effective period and count as seen from `period`.
    pub fn used(&self, period: u32) -> PeriodUse {
        let (stored, count) = unpack_period(self.word.load(Ordering::Acquire));
        effective(stored, count, period)
    }

    pub fn try_add(&self, period: u32, amount: u64, limit: u64) -> Result<PeriodUse, PeriodUse> {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let (stored, count) = unpack_period(word);
            let now = effective(stored, count, period);
            let next = match now.used.checked_add(amount) {
                Some(next) if next <= limit => next,
                _ => return Err(now),
            };
            match self.word.compare_exchange_weak(
                word,
                pack_period(now.period, next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(PeriodUse {
                        period: now.period,
                        used: next,
                    })
                }
                Err(current) => word = current,
            }
        }
    }

    /// Adds whatever the limit, up to the 48-bit bound (an adjustment).
    pub fn force(&self, period: u32, amount: u64) -> Result<PeriodUse, ()> {
        self.try_add(period, amount, PERIOD_COUNT_MASK)
            .map_err(|_| ())
    }

    /// Gives back up to `amount` units counted in `period`, if it is still the current one.
    pub fn refund(&self, period: u32, amount: u64) -> u64 {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let (stored, count) = unpack_period(word);
            if stored != period || count == 0 {
                return 0;
            }
            let given = count.min(amount);
            match self.word.compare_exchange_weak(
                word,
                pack_period(stored, count - given),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return given,
                Err(current) => word = current,
            }
        }
    }

    /// Carries the stored period and count over (a policy swap kept this counter).
    pub fn copied(&self) -> CalendarCounter {
        CalendarCounter {
            word: AtomicU64::new(self.word.load(Ordering::Acquire)),
        }
    }
}

fn effective(stored: u32, count: u64, period: u32) -> PeriodUse {
    if stored >= period {
        PeriodUse {
            period: stored,
            used: count,
        }
    } else {
        PeriodUse { period, used: 0 }
    }
}

/// The end of `period` (when its count resets), through the calendar's cache.
pub fn period_end_ms(calendar: &Calendar, kind: CalendarPeriod, period: u32, at_ms: u64) -> u64 {
    let current = calendar.period_of(kind, at_ms);
    if current.index == period {
        current.end_ms
    } else {
        calendar.period_bounds(kind, period).end_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: RollingShape = RollingShape {
        bucket_ms: 1_000,
        buckets: 10,
    };

    fn consume(window: &RollingWindow, at_ms: u64, amount: u64, limit: u64) -> bool {
        let epoch = window.advance(SHAPE, SHAPE.epoch(at_ms));
        match window.try_reserve(amount, limit) {
            Ok(_) => {
                window.record(SHAPE, epoch, amount);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn units_are_released_one_window_after_their_bucket_ends() {
        let window = RollingWindow::new(SHAPE);
        assert!(consume(&window, 500, 10, 10));
        assert!(!consume(&window, 10_999, 1, 10), "still inside the window");
        // Bucket 0 ends at 1,000; released at 1,000 + 10 * 1,000.
        assert!(consume(&window, 11_000, 10, 10));
        assert_eq!(window.used(), 10);
        assert_eq!(window.slot_sum(), 10);
    }

    #[test]
    fn release_time_is_the_first_bucket_that_frees_enough() {
        let window = RollingWindow::new(SHAPE);
        assert!(consume(&window, 1_000, 3, 10));
        assert!(consume(&window, 4_500, 7, 10));
        let epoch = window.advance(SHAPE, SHAPE.epoch(5_000));
        assert_eq!(window.release_time(SHAPE, epoch, 2), Some(12_000));
        assert_eq!(window.release_time(SHAPE, epoch, 4), Some(15_000));
        assert_eq!(window.drain_time(SHAPE, epoch), Some(15_000));
    }

    #[test]
    fn a_timestamp_going_backwards_is_counted_at_the_newest_epoch() {
        let window = RollingWindow::new(SHAPE);
        assert!(consume(&window, 20_000, 5, 5));
        // An old timestamp must not see the bucket as expired nor write into the past.
        assert!(!consume(&window, 1_000, 1, 5));
        assert!(!consume(&window, 30_999, 1, 5));
        assert!(consume(&window, 31_000, 5, 5));
    }

    #[test]
    fn a_jump_longer_than_the_window_clears_every_slot() {
        let window = RollingWindow::new(SHAPE);
        for at in 0..10 {
            assert!(consume(&window, at * 1_000, 1, 100));
        }
        window.advance(SHAPE, SHAPE.epoch(1_000_000));
        assert_eq!(window.used(), 0);
        assert_eq!(window.slot_sum(), 0);
    }

    #[test]
    fn refunds_only_touch_live_buckets() {
        let window = RollingWindow::new(SHAPE);
        assert!(consume(&window, 2_000, 4, 10));
        assert_eq!(window.refund(SHAPE, 2, 3), 3);
        assert_eq!(window.used(), 1);
        window.advance(SHAPE, 100);
        assert_eq!(window.refund(SHAPE, 2, 1), 0);
        assert_eq!(window.used(), 0);
    }

    #[test]
    fn reshaping_never_releases_earlier() {
        let window = RollingWindow::new(SHAPE);
        assert!(consume(&window, 2_500, 4, 10));
        let wider = RollingShape::new(10_000, 2_000);
        let reshaped = window.reshaped(SHAPE, wider);
        assert_eq!(reshaped.used(), 4);
        // Old release: 13,000; the new bucket [2,000, 4,000) releases at 4,000 + 10,000.
        let epoch = reshaped.advance(wider, wider.epoch(12_999));
        let release = reshaped.release_time(wider, epoch, 4);
        assert_eq!(release, Some(14_000));
        assert!(release >= Some(13_000));
    }

    #[test]
    fn two_threads_never_over_admit_on_one_window() {
        let window = RollingWindow::new(SHAPE);
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for thread in 0..2u64 {
                let window = &window;
                let admitted = &admitted;
                scope.spawn(move || {
                    for step in 0..20_000u64 {
                        // Timestamps race back and forth across buckets.
                        let at = (step / 50) * 100 + thread * 37;
                        if consume(window, at, 1, 1_000) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert!(window.used() <= 1_000);
        assert_eq!(window.used(), window.slot_sum());
        assert!(admitted.load(Ordering::Relaxed) >= 1_000);
    }

    #[test]
    fn a_calendar_counter_resets_with_the_period_and_never_goes_back() {
        let counter = CalendarCounter::new();
        assert_eq!(
            counter.try_add(7, 3, 5),
            Ok(PeriodUse { period: 7, used: 3 })
        );
        assert_eq!(
            counter.try_add(7, 3, 5),
            Err(PeriodUse { period: 7, used: 3 })
        );
        assert_eq!(
            counter.try_add(8, 5, 5),
            Ok(PeriodUse { period: 8, used: 5 })
        );
        // A timestamp from period 7 again: period 8 stands.
        assert_eq!(
            counter.try_add(7, 1, 5),
            Err(PeriodUse { period: 8, used: 5 })
        );
        assert_eq!(counter.refund(7, 1), 0);
        assert_eq!(counter.refund(8, 2), 2);
        assert_eq!(counter.used(8).used, 3);
    }
}
