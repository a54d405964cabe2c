//! Usage windows: the lock-free sliding-bucket ring behind a rolling limit and the single-word
//! counter behind a daily, weekly or monthly limit.
//!
//! ## Rolling ring
//! Time is cut into buckets of `bucket_ms`; epoch `b` is bucket number `t / bucket_ms`. A window
//! of `N = ceil(window / bucket)` buckets keeps `S = N + 1` slots: bucket `b` is live at epoch `e`
//! iff `e - N <= b <= e`, so a unit used at `t` in bucket `b` is released at `(b + N + 1) * bucket`
//! `>= t + window`: never early, at most one bucket late.
//!
//! Each slot is one atomic word packing a lap tag (`b / S`) and a count: 32 + 32 bits, or 16 + 16
//! for limits up to `NARROW_MAX_AMOUNT` on rings whose tags take `NARROW_TAG_PERIOD_MIN_MS` or
//! more to repeat (see `Slots`). Whoever replaces a stale slot (by CAS) is the only one to
//! subtract its count from `total`. `total` is
//! the sum of live counts plus units reserved but not yet recorded: admission is a CAS on `total`
//! (`total + n <= limit`), then the units are recorded in the slot of their bucket. `head` is the
//! newest epoch any caller has reached; it never moves back, so a timestamp that goes backwards is
//! counted at `head` and never releases quota early.
//!
//! Invariant (checked in debug builds): `total >= sum of slot counts`, so `total` never
//! under-counts and concurrent consumers never over-admit.

use std::ptr::NonNull;
use std::sync::atomic::Ordering;

// loom's atomics in a model-checking build (`--cfg tally_loom`, `loom_models` below): every
// interleaving of the models' threads is run against the same code the engine runs.
#[cfg(tally_loom)]
use loom::sync::atomic::{AtomicU32, AtomicU64};
#[cfg(not(tally_loom))]
use std::sync::atomic::{AtomicU32, AtomicU64};

use allocator_api2::boxed::Box;

use crate::calendar::{Calendar, CalendarPeriod};
use crate::pages::{boxed_slice_in, UsagePages};

/// The largest limit a narrow ring (16-bit counts) can hold; larger limits get wide slots.
pub const NARROW_MAX_AMOUNT: u64 = u16::MAX as u64;

/// The shortest time after which a narrow ring's 16-bit lap tags may repeat (2^16 laps): 30
/// years. A ring whose laps are shorter (under about 4 hours: a one-minute window repeats
/// after 46 days) gets wide slots, whose 32-bit tags repeat only after 270 years even at the
/// smallest lap (`MIN_LAP_MS`), longer than tally's whole range of timestamps. The seed plans'
/// 5-hour rings (37.6 years) stay narrow. See `move_head` for why a repeat matters.
pub const NARROW_TAG_PERIOD_MIN_MS: u64 = 30 * 365 * 24 * 3_600 * 1_000;

/// A lower bound on any ring's lap (`N + 1` buckets, each `bucket_ms`): `N * bucket_ms` is at
/// least the window, and a policy's rolling window lasts at least
/// `policy::MIN_ROLLING_WINDOW_MS` (2 s) whatever its bucket, down to 1 ms
/// (`policy::MIN_BUCKET_MS`). Laps are counted from epoch 0, so the laps of every timestamp
/// tally accepts (1970 to 2100) number fewer than 2^31: a wide slot's 32-bit tag never comes
/// round to a value it held earlier in that range (so `move_head`'s two-step sweep never runs on
/// a wide ring), even for a head carried a bucket past the range through policy swaps.
pub const MIN_LAP_MS: u64 = crate::policy::MIN_ROLLING_WINDOW_MS;
const _: () = assert!(crate::calendar::MAX_TIMESTAMP_MS / MIN_LAP_MS < 1 << 31);

/// A slot's content: the lap tag (truncated to the slot's tag bits) and the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    tag: u32,
    count: u64,
}

impl Slot {
    /// A wide slot's value: the tag in the high 32 bits, the count in the low.
    #[inline(always)]
    fn of_wide(raw: u64) -> Slot {
        Slot {
            tag: (raw >> 32) as u32,
            count: raw & 0xFFFF_FFFF,
        }
    }

    /// A narrow slot's value: the tag in the high 16 bits, the count in the low.
    #[inline(always)]
    fn of_narrow(raw: u32) -> Slot {
        Slot {
            tag: raw >> 16,
            count: u64::from(raw & 0xFFFF),
        }
    }

    /// The tag of lap `lap` in a wide slot.
    #[inline(always)]
    fn wide_tag(lap: u64) -> u32 {
        lap as u32
    }

    /// The tag of lap `lap` in a narrow slot.
    #[inline(always)]
    fn narrow_tag(lap: u64) -> u32 {
        (lap as u32) & 0xFFFF
    }
}

/// The ring's slots: wide ones pack a 32-bit lap tag with a 32-bit count in an `AtomicU64`;
/// narrow ones (limits up to 65,535, e.g. every seed plan's request quota) pack 16 + 16 bits in
/// an `AtomicU32`, halving a key's memory. A tag is the lap number modulo its width, only ever
/// compared for equality; which of two laps is older is decided by the ring's `head`. The
/// head-driven sweep visits every slot the head passes, so an old tag never survives to look
/// current; a jump long enough for tags to repeat is swept twice (`RollingWindow::move_head`).
/// The slots live on the usage pages (see `pages::UsagePages`).
///
/// Held as one thin pointer, a length and the width (16 bytes, where two boxed slices behind an
/// enum took 24), so a ring's fixed part is 32 bytes and a key's counter 40: three counters and
/// their block's count fill two cache lines, not three.
struct Slots {
    /// The first of `len` slots: `AtomicU64`s if `wide`, else `AtomicU32`s. Owned: allocated
    /// by `Slots::new` on the usage pages, freed by `Drop`.
    start: NonNull<u8>,
    /// At most `MAX_BUCKETS_PER_WINDOW + 1` (a policy's bound on a window's buckets).
    len: u32,
    wide: bool,
}

// SAFETY: `Slots` owns its array of atomics outright (like a `Box<[AtomicU64]>`, which is Send
// and Sync); shared access only goes through the atomics.
unsafe impl Send for Slots {}
// SAFETY: as above.
unsafe impl Sync for Slots {}

/// The slots as the slice of their width.
enum SlotsRef<'s> {
    Wide(&'s [AtomicU64]),
    Narrow(&'s [AtomicU32]),
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.view() {
            SlotsRef::Wide(slots) => formatter.debug_tuple("Wide").field(&slots).finish(),
            SlotsRef::Narrow(slots) => formatter.debug_tuple("Narrow").field(&slots).finish(),
        }
    }
}

/// `count` fresh items on the usage pages, as a thin pointer and their number.
fn usage_slice<T>(count: u64, fresh: impl FnMut() -> T) -> (NonNull<u8>, u32) {
    let len = u32::try_from(count).expect("a ring's slot count fits 32 bits (policy bound)");
    let slice = boxed_slice_in(len as usize, UsagePages, fresh);
    let (pointer, _) = Box::into_raw_with_allocator(slice);
    // SAFETY: `Box::into_raw` never gives a null pointer (a dangling one for no items).
    (unsafe { NonNull::new_unchecked(pointer.cast::<u8>()) }, len)
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: `start` and `len` came from `usage_slice` of this width, and the array is
        // freed only here, once.
        unsafe {
            if self.wide {
                drop(Box::from_raw_in(self.raw::<AtomicU64>(), UsagePages));
            } else {
                drop(Box::from_raw_in(self.raw::<AtomicU32>(), UsagePages));
            }
        }
    }
}

impl Slots {
    fn new(count: u64, wide: bool) -> Slots {
        let (start, len) = if wide {
            usage_slice(count, || AtomicU64::new(0))
        } else {
            usage_slice(count, || AtomicU32::new(0))
        };
        Slots { start, len, wide }
    }

    /// The slots as a raw slice of `T` (the caller picks the type of this width).
    #[inline]
    fn raw<T>(&self) -> *mut [T] {
        std::ptr::slice_from_raw_parts_mut(self.start.as_ptr().cast::<T>(), self.len as usize)
    }

    #[inline]
    fn view(&self) -> SlotsRef<'_> {
        self.view_as(self.wide)
    }

    /// `view`, with the width (`self.wide`) as read once by the caller: a caller that reads it
    /// once and passes it down lets the compiler test it once, where it read the field again
    /// after every compare-and-swap.
    #[inline(always)]
    fn view_as(&self, wide: bool) -> SlotsRef<'_> {
        debug_assert_eq!(wide, self.wide);
        // SAFETY: `start` holds `len` initialized slots of this width for as long as `self`.
        unsafe {
            if wide {
                SlotsRef::Wide(&*self.raw::<AtomicU64>())
            } else {
                SlotsRef::Narrow(&*self.raw::<AtomicU32>())
            }
        }
    }

    /// Bytes per slot.
    fn width(&self) -> usize {
        if self.wide {
            8
        } else {
            4
        }
    }

    fn len(&self) -> usize {
        self.len as usize
    }

    fn is_wide(&self) -> bool {
        self.wide
    }

    /// Where slot `index` lives (only ever prefetched).
    fn address(&self, index: usize) -> *const u8 {
        self.address_as(self.wide, index)
    }

    /// `address` with the width read by the caller (see `view_as`).
    #[inline(always)]
    fn address_as(&self, wide: bool, index: usize) -> *const u8 {
        let width = if wide { 8 } else { 4 };
        self.start.as_ptr().wrapping_add(index * width)
    }

    fn heap_bytes(&self) -> usize {
        self.len() * self.width()
    }

    fn max_count(&self) -> u64 {
        Slots::max_count_as(self.wide)
    }

    /// `max_count` of slots of this width.
    #[inline(always)]
    fn max_count_as(wide: bool) -> u64 {
        if wide {
            u64::from(u32::MAX)
        } else {
            NARROW_MAX_AMOUNT
        }
    }

    /// Laps after which a tag repeats: 2^16 narrow, 2^32 wide.
    fn tag_period(&self) -> u64 {
        if self.wide {
            1 << 32
        } else {
            1 << 16
        }
    }

    /// The tag of lap `lap` in this slot width.
    fn tag(&self, lap: u64) -> u32 {
        Slots::tag_as(self.wide, lap)
    }

    /// `tag` in slots of this width.
    #[inline(always)]
    fn tag_as(wide: bool, lap: u64) -> u32 {
        if wide {
            Slot::wide_tag(lap)
        } else {
            Slot::narrow_tag(lap)
        }
    }

    // SeqCst, here and in `replace`: a sweep moves `head` then reads a slot, a record writes a
    // slot then reads `head` (`RollingWindow::record_at`); with SeqCst at least one of the two
    // sees the other's write. On x86 a SeqCst load is a plain load and every read-modify-write
    // is locked whatever its ordering, so this costs nothing there.
    fn load(&self, index: usize) -> (u64, Slot) {
        self.view().load(index)
    }

    /// Replaces the slot's raw value `current` by `next`; on failure returns the value found.
    fn replace(&self, index: usize, current: u64, next: Slot) -> Result<(), (u64, Slot)> {
        self.view().replace(index, current, next)
    }
}

impl SlotsRef<'_> {
    /// Slot `index`'s raw value and content (SeqCst: see `Slots::load`).
    #[inline(always)]
    fn load(&self, index: usize) -> (u64, Slot) {
        match self {
            SlotsRef::Wide(slots) => {
                let raw = slots[index].load(Ordering::SeqCst);
                (raw, Slot::of_wide(raw))
            }
            SlotsRef::Narrow(slots) => {
                let raw = slots[index].load(Ordering::SeqCst);
                (u64::from(raw), Slot::of_narrow(raw))
            }
        }
    }

    /// `Slots::replace` on this view.
    #[inline(always)]
    fn replace(&self, index: usize, current: u64, next: Slot) -> Result<(), (u64, Slot)> {
        let outcome = match self {
            SlotsRef::Wide(slots) => {
                debug_assert!(next.count <= Slots::max_count_as(true));
                slots[index]
                    .compare_exchange_weak(
                        current,
                        (u64::from(next.tag) << 32) | next.count,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .map(|_| ())
                    .map_err(|_| ())
            }
            SlotsRef::Narrow(slots) => {
                debug_assert!(next.count <= Slots::max_count_as(false));
                slots[index]
                    .compare_exchange_weak(
                        current as u32,
                        (next.tag << 16) | next.count as u32,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .map(|_| ())
                    .map_err(|_| ())
            }
        };
        outcome.map_err(|_| self.load(index))
    }
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

    fn lap(&self, epoch: u64) -> u64 {
        epoch / self.slots()
    }

    fn slot(&self, epoch: u64) -> usize {
        (epoch % self.slots()) as usize
    }

    /// `(lap(epoch), slot(epoch))` from one division.
    #[inline]
    fn lap_and_slot(&self, epoch: u64) -> (u64, usize) {
        let slots = self.slots();
        let lap = epoch / slots;
        (lap, (epoch - lap * slots) as usize)
    }

    /// The bucket of shape `to` that units in this shape's bucket `epoch` move to when a
    /// window changes width: the one holding the old bucket's last instant, so nothing is
    /// released earlier than it would have been.
    pub fn carried_epoch(&self, to: RollingShape, epoch: u64) -> u64 {
        to.epoch(
            epoch
                .saturating_mul(self.bucket_ms)
                .saturating_add(self.bucket_ms - 1),
        )
    }

    /// Whether a narrow ring of this shape may be used: its tags repeat only after
    /// `NARROW_TAG_PERIOD_MIN_MS`.
    pub fn narrow_tags_last(&self) -> bool {
        self.slots()
            .saturating_mul(self.bucket_ms)
            .saturating_mul(1 << 16)
            >= NARROW_TAG_PERIOD_MIN_MS
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
    // SeqCst CAS and `aged_out` load, pairing with the slots' SeqCst (`Slots::load`); Acquire
    // elsewhere. The CAS publishes the newest epoch; its winner sweeps the slots it passed.
    head: AtomicU64,
    // SeqCst CAS and loads (Acquire in read-only scans), pairing with `head`'s; see `total`.
    slots: Slots,
}

impl RollingWindow {
    /// A ring for a limit of `amount`: narrow slots when it fits 16 bits and the shape's laps
    /// are long enough for 16-bit tags (`RollingShape::narrow_tags_last`).
    pub fn new(shape: RollingShape, amount: u64) -> RollingWindow {
        RollingWindow {
            total: AtomicU64::new(0),
            head: AtomicU64::new(0),
            slots: Slots::new(
                shape.slots(),
                amount > NARROW_MAX_AMOUNT || !shape.narrow_tags_last(),
            ),
        }
    }

    /// A ring of the given slot width whatever the shape (tests of narrow tags on short laps).
    #[cfg(test)]
    fn with_width(shape: RollingShape, wide: bool) -> RollingWindow {
        RollingWindow {
            total: AtomicU64::new(0),
            head: AtomicU64::new(0),
            slots: Slots::new(shape.slots(), wide),
        }
    }

    /// Bytes of the slot array (the struct itself lives inline in its key's counter list).
    pub fn heap_bytes(&self) -> usize {
        self.slots.heap_bytes()
    }

    /// Whether this ring can count up to `amount` in one bucket.
    pub fn holds(&self, amount: u64) -> bool {
        amount <= self.slots.max_count()
    }

    /// Moves the window to `epoch` (or keeps it at a newer head) and returns the effective epoch.
    /// Inline up to the usual case, a head already there; moving it is a call.
    #[inline]
    pub fn advance(&self, shape: RollingShape, epoch: u64) -> u64 {
        debug_assert_eq!(self.slots.len() as u64, shape.slots());
        let head = self.head.load(Ordering::Acquire);
        if epoch <= head {
            return head;
        }
        self.move_head(shape, epoch, head)
    }

    /// `advance` past `head`, as last read.
    ///
    /// A jump of nearly a whole tag period of laps or more (a key idle for 2^16 laps of a
    /// narrow ring: 46 days of a one-minute window) would let a stale slot carry the very tag
    /// the new lap gives its index and look live: the sweep skips a slot whose tag matches.
    /// Such a jump first moves one lap short of `epoch`, then to it: each index then gets two
    /// different tags from the two sweeps, so every stale slot is cleared by one of them.
    ///
    /// Left: another thread's move between the two steps can pass the first sweep before it
    /// is done, and a stale slot whose tag the second step repeats then stays (counted for
    /// one more window: a denial, never an admission). Narrow rings are only used where tags
    /// repeat after 30 years or more (`NARROW_TAG_PERIOD_MIN_MS`), and wide tags repeat after
    /// more than tally's whole range of timestamps, as every lap lasts over 2 s (`MIN_LAP_MS`),
    /// so that takes a key idle for 30 years and revived by two requests at once.
    #[inline(never)]
    fn move_head(&self, shape: RollingShape, epoch: u64, head: u64) -> u64 {
        // `laps(head, epoch) >= tag_period - 2` without a division on every move: implied by
        // this distance, and implying it within a lap (a second step taken needlessly is only
        // a sweep more).
        let far = (self.slots.tag_period() - 3).saturating_mul(shape.slots());
        let head = if epoch - head >= far {
            self.move_head_once(shape, epoch - shape.slots(), head)
        } else {
            head
        };
        self.move_head_once(shape, epoch, head)
    }

    /// Moves `head` to `epoch` (unless it is already there or past it) and sweeps the slots
    /// the move passes.
    fn move_head_once(&self, shape: RollingShape, epoch: u64, mut head: u64) -> u64 {
        loop {
            if epoch <= head {
                return head;
            }
            match self
                .head
                // SeqCst: see `Slots::load`.
                .compare_exchange_weak(head, epoch, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => {
                    seq_cst_between_write_and_read();
                    let first = head
                        .saturating_add(1)
                        .max(epoch.saturating_sub(shape.buckets));
                    self.expire_passed(shape, first, epoch);
                    return epoch;
                }
                Err(current) => head = current,
            }
        }
    }

    /// Clears the slots of epochs `first..=last` (at most one lap of them) that still hold an
    /// older lap's count. A key's first admission (a fresh ring at epoch 0) passes every slot,
    /// a key used every few minutes a few: the slots are walked with a running lap and index,
    /// not two divisions each.
    #[inline]
    fn expire_passed(&self, shape: RollingShape, first: u64, last: u64) {
        debug_assert!(last - first < shape.slots());
        let slots = self.slots.len();
        let (mut lap, mut index) = shape.lap_and_slot(first);
        for epoch in first..=last {
            self.expire_stale(shape, epoch, lap, index);
            index += 1;
            if index == slots {
                index = 0;
                lap += 1;
            }
        }
    }

    /// Clears the slot of `epoch` (lap `lap`, at `index`) if it still holds an older lap's
    /// count.
    ///
    /// Whether a slot's lap is older or newer than ours is decided by `head`, never by comparing
    /// truncated tags: the slot is read first, then `head` (Acquire): a sweep that wrote a newer
    /// lap into the slot moved `head` before, so we see that our epoch has aged out.
    #[inline]
    fn expire_stale(&self, shape: RollingShape, epoch: u64, lap: u64, index: usize) {
        debug_assert_eq!((lap, index), shape.lap_and_slot(epoch));
        let tag = self.slots.tag(lap);
        let (mut raw, mut slot) = self.slots.load(index);
        loop {
            if slot.count == 0 || slot.tag == tag || self.aged_out(shape, epoch) {
                return;
            }
            match self.slots.replace(index, raw, Slot { tag, count: 0 }) {
                Ok(()) => {
                    self.subtract_total(slot.count);
                    return;
                }
                Err(found) => (raw, slot) = found,
            }
        }
    }

    /// Moves the window to `at_epoch`, as a request then would, and says whether bucket `epoch`
    /// still counts (a correction or a give-back at that time touches only such buckets).
    pub fn still_counts_at(&self, shape: RollingShape, epoch: u64, at_epoch: u64) -> bool {
        self.advance(shape, at_epoch);
        !self.aged_out(shape, epoch)
    }

    /// Whether bucket `epoch` is out of the window as of the newest epoch seen.
    fn aged_out(&self, shape: RollingShape, epoch: u64) -> bool {
        // SeqCst: see `Slots::load`.
        epoch.saturating_add(shape.buckets) < self.head.load(Ordering::SeqCst)
    }

    fn subtract_total(&self, count: u64) {
        let before = self.total.fetch_sub(count, Ordering::AcqRel);
        debug_assert!(before >= count, "rolling total would go below zero");
    }

    /// What the window would count at `epoch`, without moving it: `(effective epoch, used)`.
    /// A later epoch leaves out the buckets that will have aged out by then; an earlier one
    /// sees the window at its head (time never goes back).
    pub fn used_at(&self, shape: RollingShape, epoch: u64) -> (u64, u64) {
        let head = self.head.load(Ordering::Acquire);
        let total = self.used();
        if epoch <= head {
            return (head, total);
        }
        let first_live_then = epoch.saturating_sub(shape.buckets);
        let first_live_now = head.saturating_sub(shape.buckets);
        let aging: u64 = (first_live_now..first_live_then.min(head.saturating_add(1)))
            .map(|bucket| self.live_count(shape, bucket))
            .sum();
        (epoch, total.saturating_sub(aging))
    }

    /// Units counted now (after `advance`), including reservations in flight.
    pub fn used(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// Reserves `amount` if `used + amount <= limit`; returns the new `used`, or the current
    /// `used` when it does not fit.
    pub fn try_reserve(&self, amount: u64, limit: u64) -> Result<u64, u64> {
        debug_assert!(
            self.holds(limit),
            "a ring is widened before its limit outgrows it"
        );
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

    /// Records reserved units in the bucket of `epoch`. If the slot holds another lap and our
    /// bucket is still live, that lap is older: its count is replaced and subtracted. If our
    /// bucket has aged out meanwhile, the units are released at once (they no longer count).
    pub fn record(&self, shape: RollingShape, epoch: u64, amount: u64) {
        self.record_at(shape.lap_and_slot(epoch), epoch, shape, amount);
    }

    /// `record`, returning where the bucket's slot lives (a prefetch hint for the key's next
    /// request): one division for both.
    #[inline]
    pub fn record_noting_slot(&self, shape: RollingShape, epoch: u64, amount: u64) -> *const u8 {
        let (lap, index) = shape.lap_and_slot(epoch);
        // The width read once, and each width's code apart (see `Slots::view_as`).
        if self.slots.wide {
            self.record_at_as(true, (lap, index), epoch, shape, amount);
            self.slots.address_as(true, index)
        } else {
            self.record_at_as(false, (lap, index), epoch, shape, amount);
            self.slots.address_as(false, index)
        }
    }

    // Always inlined: with the aged-out check after the write, the compiler outlined it, and
    // the call cost a hot-key admission 42 instructions.
    #[inline(always)]
    fn record_at(&self, at: (u64, usize), epoch: u64, shape: RollingShape, amount: u64) {
        self.record_at_as(self.slots.wide, at, epoch, shape, amount);
    }

    /// `record_at` with the width read by the caller (see `Slots::view_as`).
    #[inline(always)]
    fn record_at_as(
        &self,
        wide: bool,
        at: (u64, usize),
        epoch: u64,
        shape: RollingShape,
        amount: u64,
    ) {
        let recorded = self.record_at_within_as::<false>(wide, at, epoch, shape, amount);
        debug_assert!(recorded);
    }

    /// `record_at`; with `BOUNDED`, records nothing and returns false if the bucket has no room
    /// for `amount` (admission never needs the check: a limit fits its buckets).
    #[inline(always)]
    fn record_at_within<const BOUNDED: bool>(
        &self,
        at: (u64, usize),
        epoch: u64,
        shape: RollingShape,
        amount: u64,
    ) -> bool {
        self.record_at_within_as::<BOUNDED>(self.slots.wide, at, epoch, shape, amount)
    }

    /// `record_at_within` with the width read by the caller (see `Slots::view_as`).
    #[inline(always)]
    fn record_at_within_as<const BOUNDED: bool>(
        &self,
        wide: bool,
        (lap, index): (u64, usize),
        epoch: u64,
        shape: RollingShape,
        amount: u64,
    ) -> bool {
        let max_count = Slots::max_count_as(wide);
        let tag = Slots::tag_as(wide, lap);
        // The slots' pointer and length in registers for the whole loop, not read again after
        // each compare-and-swap.
        let view = self.slots.view_as(wide);
        let (mut raw, mut slot) = view.load(index);
        loop {
            let (next, stale) = if slot.tag == tag {
                let count = slot.count + amount;
                if BOUNDED && count > max_count {
                    return false;
                }
                debug_assert!(count <= max_count, "bucket count overflow");
                (
                    Slot {
                        tag,
                        count: count.min(max_count),
                    },
                    0,
                )
            } else if self.aged_out(shape, epoch) {
                self.subtract_total(amount);
                return true;
            } else {
                (Slot { tag, count: amount }, slot.count)
            };
            match view.replace(index, raw, next) {
                Ok(()) => {
                    if stale > 0 {
                        self.subtract_total(stale);
                    }
                    seq_cst_between_write_and_read();
                    // A request that moved the head past `epoch` meanwhile may have swept this
                    // slot before the write landed, found nothing to clear and gone on: then
                    // nothing would take these units out of the total until the slot's next
                    // lap, a whole window late. Take them out now (unless a sweep did).
                    if self.aged_out(shape, epoch) {
                        self.unrecord(index, tag, amount);
                    }
                    return true;
                }
                Err(found) => (raw, slot) = found,
            }
        }
    }

    /// Takes back `amount` units this thread recorded in the slot at `index` under `tag`, whose
    /// epoch has aged out, and out of the total; nothing if a sweep cleared the slot first (it
    /// took them out of the total itself). Cold: only a record racing a head that jumps a whole
    /// window gets here.
    #[cold]
    #[inline(never)]
    fn unrecord(&self, index: usize, tag: u32, amount: u64) {
        let (mut raw, mut slot) = self.slots.load(index);
        loop {
            if slot.tag != tag || slot.count == 0 {
                return;
            }
            let taken = slot.count.min(amount);
            match self.slots.replace(
                index,
                raw,
                Slot {
                    tag,
                    count: slot.count - taken,
                },
            ) {
                Ok(()) => {
                    self.subtract_total(taken);
                    return;
                }
                Err(found) => (raw, slot) = found,
            }
        }
    }

    /// The most one bucket counts: 65,535 in a narrow ring, 4,294,967,295 in a wide one.
    pub fn bucket_capacity(&self) -> u64 {
        self.slots.max_count()
    }

    /// Adds units whatever the limit (an adjustment recording usage that really happened).
    /// Returns where the bucket's slot lives (a prefetch hint, as `record_noting_slot`), or
    /// `None`, changing nothing, if the bucket's count would pass `bucket_capacity`.
    pub fn force(&self, shape: RollingShape, epoch: u64, amount: u64) -> Option<*const u8> {
        let (lap, index) = shape.lap_and_slot(epoch);
        if amount > self.slots.max_count() {
            return None;
        }
        // Counted in the total first, as `record_at` expects (an aged-out bucket takes it back
        // out); taken back out if the bucket has no room. The room is checked in the same
        // compare-and-swap that writes the bucket: two adjustments racing on one bucket
        // cannot both pass a check made before either wrote.
        self.total.fetch_add(amount, Ordering::AcqRel);
        if !self.record_at_within::<true>((lap, index), epoch, shape, amount) {
            self.subtract_total(amount);
            return None;
        }
        Some(self.slots.address(index))
    }

    /// Gives back up to `amount` units recorded in bucket `epoch`, if that bucket is still live;
    /// returns how many were given back.
    pub fn refund(&self, shape: RollingShape, epoch: u64, amount: u64) -> u64 {
        let index = shape.slot(epoch);
        let tag = self.slots.tag(shape.lap(epoch));
        let (mut raw, mut slot) = self.slots.load(index);
        loop {
            if slot.tag != tag || slot.count == 0 {
                return 0;
            }
            let given = slot.count.min(amount);
            match self.slots.replace(
                index,
                raw,
                Slot {
                    tag,
                    count: slot.count - given,
                },
            ) {
                Ok(()) => {
                    self.subtract_total(given);
                    return given;
                }
                Err(found) => (raw, slot) = found,
            }
        }
    }

    /// How many more units bucket `bucket` can count (`bucket_capacity` less its live count).
    pub fn room(&self, shape: RollingShape, bucket: u64) -> u64 {
        self.slots
            .max_count()
            .saturating_sub(self.live_count(shape, bucket))
    }

    /// The live count of bucket `bucket`, or 0 if its slot holds another lap.
    fn live_count(&self, shape: RollingShape, bucket: u64) -> u64 {
        let (_, slot) = self.slots.load(shape.slot(bucket));
        if slot.tag == self.slots.tag(shape.lap(bucket)) {
            slot.count
        } else {
            0
        }
    }

    /// The earliest time at which at least `needed` units will have aged out, looking from
    /// `epoch` (the effective epoch of the request). `None` if the recorded buckets do not hold
    /// that many (the rest is in flight): then the caller uses the whole window.
    pub fn release_time(&self, shape: RollingShape, epoch: u64, needed: u64) -> Option<u64> {
        let first = epoch.saturating_sub(shape.buckets);
        let mut freed = 0u64;
        let offset = self.scan_live(shape, first, epoch - first + 1, |count| {
            freed = freed.saturating_add(count);
            freed >= needed && freed > 0
        })?;
        Some(shape.release_ms(first + offset))
    }

    /// Passes the live counts of the `count` buckets from `first` on, oldest first, to `visit`
    /// until it answers true, and returns that bucket's offset from `first`. One division for
    /// the first bucket's slot, then a step along the ring (a window's quota exhausted in its
    /// newest bucket makes a refusal look at every bucket: with a division each, that scan was
    /// most of a refusal's time).
    fn scan_live(
        &self,
        shape: RollingShape,
        first: u64,
        count: u64,
        visit: impl FnMut(u64) -> bool,
    ) -> Option<u64> {
        debug_assert_eq!(
            self.slots.len() as u64,
            shape.slots(),
            "a ring has its shape's slots"
        );
        let (lap, slot) = shape.lap_and_slot(first);
        match self.slots.view() {
            SlotsRef::Wide(slots) => {
                scan_ring(slots, lap, slot, count, visit, Slot::wide_tag, |raw| {
                    Slot::of_wide(raw.load(Ordering::Acquire))
                })
            }
            SlotsRef::Narrow(slots) => {
                scan_ring(slots, lap, slot, count, visit, Slot::narrow_tag, |raw| {
                    Slot::of_narrow(raw.load(Ordering::Acquire))
                })
            }
        }
    }

    /// When everything counted now will have aged out: the release of the newest non-empty
    /// bucket, or `None` if the window is empty.
    pub fn drain_time(&self, shape: RollingShape, epoch: u64) -> Option<u64> {
        if self.used() == 0 {
            return None;
        }
        let newest = (epoch.saturating_sub(shape.buckets)..=epoch)
            .rev()
            .find(|bucket| self.live_count(shape, *bucket) > 0);
        Some(shape.release_ms(newest.unwrap_or(epoch)))
    }

    /// Per-bucket counts of the live window, oldest first, as `(bucket start ms, count)`.
    pub fn buckets(&self, shape: RollingShape, epoch: u64) -> Vec<(u64, u64)> {
        (epoch.saturating_sub(shape.buckets)..=epoch)
            .filter_map(|bucket| {
                let count = self.live_count(shape, bucket);
                (count > 0).then_some((bucket * shape.bucket_ms, count))
            })
            .collect()
    }

    /// Rebuilds this window's live counts in another shape or slot width (a policy swap changed
    /// the bucket width, or a bigger limit needs wide slots). Each bucket's units move to the new
    /// bucket holding the old bucket's last instant, so nothing is released earlier than it
    /// would have been.
    pub fn reshaped(&self, from: RollingShape, to: RollingShape, amount: u64) -> RollingWindow {
        let head = self.head.load(Ordering::Acquire);
        let buckets = self.buckets(from, head);
        // Wide slots if the limit needs them, or if old buckets merged into one new bucket hold
        // more than a narrow slot can (usage added past the limit, then wider buckets).
        let mut merged = (0u64, 0u64);
        let mut widest = 0u64;
        for &(start_ms, count) in &buckets {
            let epoch = from.carried_epoch(to, start_ms / from.bucket_ms);
            merged = match merged {
                (at, sum) if at == epoch => (at, sum.saturating_add(count)),
                _ => (epoch, count),
            };
            widest = widest.max(merged.1);
        }
        let wide = self.slots.is_wide() || widest > NARROW_MAX_AMOUNT;
        let window =
            RollingWindow::new(to, amount.max(if wide { NARROW_MAX_AMOUNT + 1 } else { 0 }));
        let new_head = window.advance(to, from.carried_epoch(to, head));
        for (start_ms, count) in buckets {
            let epoch = from.carried_epoch(to, start_ms / from.bucket_ms);
            if epoch.saturating_add(to.buckets) < new_head {
                continue; // already out of the (shorter) new window
            }
            // Buckets merged past what a slot counts (usage added past the limit, then wider
            // buckets) stop at it, and so does the total: a total above its slots would keep
            // the excess once the bucket ages out. A slot's most is at least any limit the
            // ring serves, so the window stays full until then, as it would have.
            let room = window.slots.max_count() - window.live_count(to, epoch);
            let count = count.min(room);
            if count == 0 {
                continue;
            }
            window.total.fetch_add(count, Ordering::AcqRel);
            window.record(to, epoch, count);
        }
        window
    }

    /// The newest epoch seen and whether the slots are wide: with `buckets`, what a snapshot keeps.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    pub fn is_wide(&self) -> bool {
        self.slots.is_wide()
    }

    /// Rebuilds a ring from a snapshot: its head, width and live `(epoch, count)` buckets.
    ///
    /// A bucket past the head, or one whose count its slot cannot hold (more than 16 bits in a
    /// narrow ring, 32 in a wide one, alone or added to a bucket listed before in the same
    /// slot), is refused with what is wrong: only damaged or hostile bytes have them, and
    /// recorded they tripped a debug assertion or, in a release build, spilled the count's
    /// high bits into the slot's lap tag.
    pub fn restored(
        shape: RollingShape,
        wide: bool,
        head: u64,
        buckets: &[(u64, u64)],
    ) -> Result<RollingWindow, String> {
        let window = RollingWindow::new(shape, if wide { NARROW_MAX_AMOUNT + 1 } else { 0 });
        // Not shared yet and every slot empty: nothing for `advance`'s sweep to clear (it
        // walked the whole ring for every key restored).
        window.head.store(head, Ordering::Relaxed);
        let max_count = window.slots.max_count();
        for &(epoch, count) in buckets {
            if epoch > head {
                return Err(format!(
                    "rolling bucket {epoch} is past its ring's head {head}"
                ));
            }
            window.total.fetch_add(count, Ordering::AcqRel);
            if count > max_count
                || !window.record_at_within::<true>(shape.lap_and_slot(epoch), epoch, shape, count)
            {
                return Err(format!(
                    "rolling bucket {epoch} counts {count}, more than its slot holds \
                     ({max_count} in all, {} slots)",
                    if window.slots.is_wide() {
                        "wide"
                    } else {
                        "narrow"
                    }
                ));
            }
        }
        Ok(window)
    }

    /// Starts loading the whole slot array into the outer caches (a checkpoint's cut reads it
    /// soon after, and its keys' rings are far apart in memory): into L2, not L1, whose few
    /// line-fill buffers a ring of 27 lines would take up (measured: a little faster than
    /// prefetching into L1, or only the first line). A no-op off x86-64.
    pub fn prefetch_slots(&self) {
        let (start, bytes) = (
            self.slots.start.as_ptr().cast_const(),
            self.slots.heap_bytes(),
        );
        for offset in (0..bytes).step_by(64) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch has no effect on memory and never faults, whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T2 }>(
                    start.wrapping_add(offset).cast::<i8>(),
                );
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (start, offset);
        }
    }

    /// Copies what a snapshot needs of this ring, raw, for a checkpoint's cut (every lock held,
    /// so nothing may be spent here): the head, the slot width, and every slot holding a count
    /// appended to `slots` as `(slot index, raw word)`. One pass over the slot array, with no
    /// division, no lap check and no allocation of its own (`slots` is shared by every ring of
    /// the cut). `RawRing::live_buckets` turns it into `buckets`' answer later, off the locks.
    /// The ring must not change meanwhile (the cut holds its key's shard write-locked).
    pub fn copy_raw(&self, slots: &mut Vec<(u32, u64)>) -> RawRing {
        let head = self.head.load(Ordering::Acquire);
        match self.slots.view() {
            SlotsRef::Wide(words) => {
                for (index, word) in words.iter().enumerate() {
                    let raw = word.load(Ordering::Acquire);
                    if raw & 0xFFFF_FFFF != 0 {
                        slots.push((index as u32, raw));
                    }
                }
            }
            SlotsRef::Narrow(words) => {
                for (index, word) in words.iter().enumerate() {
                    let raw = word.load(Ordering::Acquire);
                    if raw & 0xFFFF != 0 {
                        slots.push((index as u32, u64::from(raw)));
                    }
                }
            }
        }
        RawRing {
            head,
            wide: self.slots.is_wide(),
        }
    }

    /// Whether nothing is counted as of `epoch` (the key's state may then be reclaimed),
    /// without moving the ring: a reclaim that keeps the key must leave it as it was (moved to
    /// `epoch`, it aged out units a request stamped before `epoch` still counts, and nothing
    /// logs the move, so a replay would count them again).
    pub fn is_idle(&self, shape: RollingShape, epoch: u64) -> bool {
        // Every count sits at `head` or before: once a whole lap has passed since, advancing
        // would clear every slot, so there is no need to walk them (most keys a reclaim finds
        // idle have been idle for hours).
        if self
            .head
            .load(Ordering::Acquire)
            .saturating_add(shape.slots())
            <= epoch
        {
            return true;
        }
        self.used_at(shape, epoch).1 == 0
    }

    #[cfg(test)]
    pub(crate) fn slot_sum(&self) -> u64 {
        (0..self.slots.len())
            .map(|index| self.slots.load(index).1.count)
            .sum()
    }
}

/// Orders a write before a later read of another word, as the SeqCst accesses on both sides
/// already do: a head move before its sweep reads the slots, a slot write before `aged_out`
/// reads the head (see `Slots::load`: at least one side sees the other's write). Nothing in the
/// engine's build. In the loom build (`loom_models`) a `fence(SeqCst)`: loom models SeqCst
/// accesses as AcqRel (it does model SeqCst fences), which would let both sides miss each
/// other's write, an execution the C11 model rules out for SeqCst accesses and a model check
/// must not report.
#[inline(always)]
fn seq_cst_between_write_and_read() {
    #[cfg(tally_loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// Hints the CPU to start loading the cache line at `pointer` now; a no-op off x86-64. The
/// pointer is not dereferenced (a prefetch never faults), so any address will do.
#[inline]
pub(crate) fn prefetch<T>(pointer: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch has no effect on memory and never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(pointer.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pointer;
}

/// A ring's head and slot width as `RollingWindow::copy_raw` copied them; its occupied slots
/// are in the buffer that call appended to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRing {
    pub head: u64,
    pub wide: bool,
}

impl RawRing {
    /// The live buckets of the copied ring as `(epoch, count)`, oldest first: exactly what
    /// `buckets(shape, head)` returned (with bucket numbers instead of start times) when the
    /// ring was copied. `slots` is what `copy_raw` appended for this ring.
    pub fn live_buckets(self, shape: RollingShape, slots: &[(u32, u64)]) -> Vec<(u64, u64)> {
        let mut live = Vec::new();
        self.append_live_buckets(shape, slots, &mut live);
        live
    }

    /// `live_buckets`, appended to `out`.
    pub fn append_live_buckets(
        self,
        shape: RollingShape,
        slots: &[(u32, u64)],
        out: &mut Vec<(u64, u64)>,
    ) {
        self.for_each_live_bucket(shape, slots, |epoch, count| out.push((epoch, count)));
    }

    /// Calls `each(epoch, count)` for every live bucket of the copied ring, oldest first.
    /// `slots` is in slot order (as `copy_raw` appends them), so no sort is needed: the slots
    /// after the head's hold the older lap's buckets, in order, then the slots up to the head's
    /// hold the current lap's.
    pub fn for_each_live_bucket(
        self,
        shape: RollingShape,
        slots: &[(u32, u64)],
        mut each: impl FnMut(u64, u64),
    ) {
        let laps = shape.slots();
        let head_slot = self.head % laps;
        let newer = slots.partition_point(|&(index, _)| u64::from(index) <= head_slot);
        let mut last = None;
        for &(index, raw) in slots[newer..].iter().chain(&slots[..newer]) {
            let (tag, count) = if self.wide {
                ((raw >> 32) as u32, raw & 0xFFFF_FFFF)
            } else {
                ((raw as u32) >> 16, raw & 0xFFFF)
            };
            // The one bucket of the live range `head - N ..= head` this slot can hold (none
            // below epoch 0 while the head is younger than a window).
            let behind = (head_slot + laps - u64::from(index)) % laps;
            let Some(bucket) = self.head.checked_sub(behind) else {
                continue;
            };
            let lap = shape.lap(bucket) as u32;
            let current = if self.wide { lap } else { lap & 0xFFFF };
            if count > 0 && tag == current {
                debug_assert!(
                    last < Some(bucket),
                    "slots in slot order give buckets in order"
                );
                last = Some(bucket);
                each(bucket, count);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

const PERIOD_BITS: u32 = 16;
/// How many periods a calendar counter tells apart: a period index is below it.
pub const CALENDAR_PERIODS: u64 = 1 << PERIOD_BITS;
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

    /// The newest period the counter has counted in (0: none yet), whatever its count now.
    pub fn period(&self) -> u32 {
        unpack_period(self.word.load(Ordering::Acquire)).0
    }

    /// Whether what was counted in `period` still counts as seen from `current` (the period
    /// has not reset since).
    pub fn still_counts_at(&self, period: u32, current: u32) -> bool {
        self.used(current).period == period
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

    /// Adds whatever the limit, up to the 48-bit bound (an adjustment); `None` on overflow.
    pub fn force(&self, period: u32, amount: u64) -> Option<PeriodUse> {
        self.try_add(period, amount, PERIOD_COUNT_MASK).ok()
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

    /// The stored period and count, for a snapshot.
    pub fn raw(&self) -> (u32, u64) {
        unpack_period(self.word.load(Ordering::Acquire))
    }

    pub fn restored(period: u32, count: u64) -> CalendarCounter {
        CalendarCounter {
            word: AtomicU64::new(pack_period(period, count.min(PERIOD_COUNT_MASK))),
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

/// `RollingWindow::scan_live` over one width of slots: `tag_of` is a lap's tag in this width,
/// `load` a slot's value.
fn scan_ring<A>(
    slots: &[A],
    mut lap: u64,
    mut slot: usize,
    count: u64,
    mut visit: impl FnMut(u64) -> bool,
    tag_of: impl Fn(u64) -> u32,
    load: impl Fn(&A) -> Slot,
) -> Option<u64> {
    let mut tag = tag_of(lap);
    for offset in 0..count {
        let found = load(slots.get(slot)?);
        if visit(if found.tag == tag { found.count } else { 0 }) {
            return Some(offset);
        }
        slot += 1;
        if slot == slots.len() {
            slot = 0;
            lap += 1;
            tag = tag_of(lap);
        }
    }
    None
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

    /// Two adjustments forcing units into one bucket at once, each fitting alone and not
    /// together: one is refused, and the bucket and the total hold exactly what was forced.
    /// Before, each checked the room with a load before either wrote, so both could pass and
    /// the bucket clamp (a debug assertion here), losing units.
    #[test]
    fn forces_racing_on_one_bucket_never_overfill_it() {
        let max = RollingWindow::with_width(SHAPE, false).slots.max_count();
        let amount = max / 2 + 1;
        for _ in 0..2_000 {
            let window = RollingWindow::with_width(SHAPE, false);
            window.advance(SHAPE, 5);
            let start = std::sync::Barrier::new(2);
            let forced: u64 = std::thread::scope(|scope| {
                let racers: Vec<_> = (0..2)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            window.force(SHAPE, 5, amount).map_or(0, |_| amount)
                        })
                    })
                    .collect();
                racers.into_iter().map(|racer| racer.join().unwrap()).sum()
            });
            assert_eq!(forced, amount, "exactly one fits");
            assert_eq!(window.used(), amount);
            assert_eq!(window.slots.load(SHAPE.slot(5)).1.count, amount);
        }
    }

    #[test]
    fn is_idle_without_walking_the_slots_agrees_with_advancing_them() {
        // Usage at a few times (late ones counted at the newest epoch), then the question asked
        // at every epoch from before the newest usage to well past a lap: the shortcut for a
        // ring a whole lap behind must say what advancing and reading the total says.
        let histories: [&[u64]; 4] = [&[500], &[500, 3_000, 9_999], &[20_000, 1_000], &[]];
        for history in histories {
            for query_epoch in 0..40 {
                let (quick, walked) = (
                    RollingWindow::new(SHAPE, 1_000),
                    RollingWindow::new(SHAPE, 1_000),
                );
                for &at_ms in history {
                    assert!(consume(&quick, at_ms, 1, 1_000));
                    assert!(consume(&walked, at_ms, 1, 1_000));
                }
                walked.advance(SHAPE, query_epoch);
                let head = quick.head();
                assert_eq!(
                    quick.is_idle(SHAPE, query_epoch),
                    walked.used() == 0,
                    "usage at {history:?}, asked at epoch {query_epoch}"
                );
                assert_eq!(quick.head(), head, "asking does not move the ring");
            }
        }
    }

    #[test]
    fn units_are_released_one_window_after_their_bucket_ends() {
        let window = RollingWindow::new(SHAPE, 1_000);
        assert!(consume(&window, 500, 10, 10));
        assert!(!consume(&window, 10_999, 1, 10), "still inside the window");
        // Bucket 0 ends at 1,000; released at 1,000 + 10 * 1,000.
        assert!(consume(&window, 11_000, 10, 10));
        assert_eq!(window.used(), 10);
        assert_eq!(window.slot_sum(), 10);
    }

    #[test]
    fn release_time_is_the_first_bucket_that_frees_enough() {
        let window = RollingWindow::new(SHAPE, 1_000);
        assert!(consume(&window, 1_000, 3, 10));
        assert!(consume(&window, 4_500, 7, 10));
        let epoch = window.advance(SHAPE, SHAPE.epoch(5_000));
        assert_eq!(window.release_time(SHAPE, epoch, 2), Some(12_000));
        assert_eq!(window.release_time(SHAPE, epoch, 4), Some(15_000));
        assert_eq!(window.drain_time(SHAPE, epoch), Some(15_000));
    }

    #[test]
    fn a_timestamp_going_backwards_is_counted_at_the_newest_epoch() {
        let window = RollingWindow::new(SHAPE, 1_000);
        assert!(consume(&window, 20_000, 5, 5));
        // An old timestamp must not see the bucket as expired nor write into the past.
        assert!(!consume(&window, 1_000, 1, 5));
        assert!(!consume(&window, 30_999, 1, 5));
        assert!(consume(&window, 31_000, 5, 5));
    }

    #[test]
    fn a_jump_longer_than_the_window_clears_every_slot() {
        let window = RollingWindow::new(SHAPE, 1_000);
        for at in 0..10 {
            assert!(consume(&window, at * 1_000, 1, 100));
        }
        window.advance(SHAPE, SHAPE.epoch(1_000_000));
        assert_eq!(window.used(), 0);
        assert_eq!(window.slot_sum(), 0);
    }

    #[test]
    fn refunds_only_touch_live_buckets() {
        let window = RollingWindow::new(SHAPE, 1_000);
        assert!(consume(&window, 2_000, 4, 10));
        assert_eq!(window.refund(SHAPE, 2, 3), 3);
        assert_eq!(window.used(), 1);
        window.advance(SHAPE, 100);
        assert_eq!(window.refund(SHAPE, 2, 1), 0);
        assert_eq!(window.used(), 0);
    }

    #[test]
    fn reshaping_never_releases_earlier() {
        let window = RollingWindow::new(SHAPE, 1_000);
        assert!(consume(&window, 2_500, 4, 10));
        let wider = RollingShape::new(10_000, 2_000);
        let reshaped = window.reshaped(SHAPE, wider, 10);
        assert_eq!(reshaped.used(), 4);
        // Old release: 13,000; the new bucket [2,000, 4,000) releases at 4,000 + 10,000.
        let epoch = reshaped.advance(wider, wider.epoch(12_999));
        let release = reshaped.release_time(wider, epoch, 4);
        assert_eq!(release, Some(14_000));
        assert!(release >= Some(13_000));
    }

    #[test]
    fn two_threads_never_over_admit_on_one_window() {
        let window = RollingWindow::new(SHAPE, 1_000);
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
    fn a_narrow_ring_counts_exactly_like_a_wide_one() {
        // Narrow on a lap this short only here: its tags repeat within minutes of test time.
        let narrow = RollingWindow::with_width(SHAPE, false);
        let wide = RollingWindow::new(SHAPE, 100_000);
        assert!(!narrow.slots.is_wide() && wide.slots.is_wide());
        let mut at = 0u64;
        // Many laps, so narrow tags (16 bits) are exercised well past one lap, with jumps.
        for step in 0..200_000u64 {
            at += (step * 7_919) % 1_700;
            if step % 997 == 0 {
                at += 3_000_000; // ~270 laps at once; 200 of these pass 2^16 laps
            }
            let amount = 1 + step % 5;
            assert_eq!(
                consume(&narrow, at, amount, 1_000),
                consume(&wide, at, amount, 1_000)
            );
            assert_eq!(narrow.used(), wide.used());
        }
        assert_eq!(narrow.used(), narrow.slot_sum());
        assert!(
            SHAPE.lap(SHAPE.epoch(at)) > 1 << 16,
            "the narrow tags wrapped"
        );
    }

    /// A ring left idle for exactly a tag period of laps (2^16 narrow, 2^32 wide), or a lap or
    /// a few buckets either side of it: its old counts are gone when it next moves. Before, a
    /// narrow ring 2^16 laps on kept every stale slot whose tag the new lap repeated, counted
    /// as live for another window (a one-minute window denied 46 days after its last use).
    #[test]
    fn a_ring_idle_for_a_whole_tag_period_of_laps_forgets_its_old_counts() {
        let slots = SHAPE.slots();
        for (wide, amount, period) in [(false, 1_000u64, 1u64 << 16), (true, 100_000, 1 << 32)] {
            for offset in [
                -(slots as i64) - 1,
                -(slots as i64),
                -3,
                -1,
                0,
                1,
                3,
                slots as i64,
                slots as i64 + 1,
            ] {
                let ring = RollingWindow::with_width(SHAPE, wide);
                assert_eq!(ring.slots.tag_period(), period);
                // Counts in every slot of the live window, over two laps' tags.
                let start = 5 * slots + 4;
                for epoch in start..=start + SHAPE.buckets {
                    assert!(consume(&ring, epoch * SHAPE.bucket_ms, 2, amount));
                }
                assert_eq!(ring.used(), 2 * slots);
                let later = (start + SHAPE.buckets + period * slots).saturating_add_signed(offset);
                let (epoch, used) = ring.used_at(SHAPE, later);
                assert_eq!(
                    (epoch, used),
                    (later, 0),
                    "looking ahead, {period} {offset}"
                );
                assert_eq!(ring.advance(SHAPE, later), later);
                assert_eq!(ring.used(), 0, "tag period {period}, offset {offset}");
                assert_eq!(ring.slot_sum(), 0, "tag period {period}, offset {offset}");
                assert!(consume(&ring, later * SHAPE.bucket_ms, amount, amount));
                assert_eq!(ring.slot_sum(), amount);
            }
        }
    }

    /// Narrow slots only where their 16-bit lap tags cannot repeat within 30 years: a
    /// one-minute window (61-second laps, tags repeating after 46 days) gets wide ones, the
    /// seed plans' 5-hour window (80 s buckets) keeps narrow ones.
    #[test]
    fn short_laps_get_wide_slots_and_the_five_hour_window_stays_narrow() {
        let minute = RollingShape::new(60_000, 1_000);
        assert!(!minute.narrow_tags_last());
        assert!(RollingWindow::new(minute, 5).slots.is_wide());
        let five_hours = RollingShape::new(5 * 3_600_000, 80_000);
        assert!(five_hours.narrow_tags_last());
        assert!(!RollingWindow::new(five_hours, 4_500).slots.is_wide());
        assert_eq!(RollingWindow::new(five_hours, 4_500).heap_bytes(), 226 * 4);
        // The boundary: laps of at least 30 years / 2^16.
        let lap_ms = NARROW_TAG_PERIOD_MIN_MS.div_ceil(1 << 16);
        for (bucket_ms, narrow) in [(lap_ms.div_ceil(3), true), (lap_ms / 3 - 1_000, false)] {
            let shape = RollingShape {
                bucket_ms,
                buckets: 2,
            };
            assert_eq!(shape.narrow_tags_last(), narrow, "bucket {bucket_ms} ms");
        }
    }

    /// A sub-second bucket shortens a lap by less than a bucket: a one-minute window's default
    /// (250 ms) is wide, as 1 s buckets were. Even the shortest lap a policy allows (a 2 s
    /// window of 1 ms buckets, 2,001 ms) gives the last timestamp tally accepts a lap below
    /// 2^31, so wide tags never repeat in tally's range and a wide ring's move is never split.
    #[test]
    fn the_shortest_lap_keeps_wide_tags_apart_over_tallys_whole_range() {
        let minute = RollingShape::new(60_000, 250);
        assert_eq!(minute.slots(), 241);
        assert!(!minute.narrow_tags_last());
        assert!(RollingWindow::new(minute, 5).slots.is_wide());
        let shortest = RollingShape::new(crate::policy::MIN_ROLLING_WINDOW_MS, 1);
        assert!(shortest.slots() * shortest.bucket_ms >= MIN_LAP_MS);
        let last = shortest.epoch(crate::calendar::MAX_TIMESTAMP_MS - 1);
        assert!(shortest.lap(last) < 1 << 31);
        let far = ((1u64 << 32) - 3) * shortest.slots();
        assert!(
            last < far,
            "a wide move from epoch 0 to the end is swept once"
        );
        // A ring of that shape used in 1970 and again in 2099 starts empty.
        let ring = RollingWindow::new(shortest, 1 << 20);
        assert!(ring.slots.is_wide());
        for (epoch, amount) in [(0, 3), (last, 1)] {
            let epoch = ring.advance(shortest, epoch);
            assert_eq!(ring.try_reserve(amount, 1 << 20), Ok(amount));
            ring.record(shortest, epoch, amount);
        }
        assert_eq!(ring.used(), 1);
        assert_eq!(ring.slot_sum(), 1);
    }

    #[test]
    fn a_fresh_narrow_ring_counts_at_a_real_timestamp() {
        // 2026: the 5-hour ring's lap tag is past 2^15, where a serial-number comparison with a
        // fresh slot's tag 0 once read "newer" and dropped the usage.
        let shape = RollingShape::new(5 * 3_600_000, 85_000);
        let at = 1_790_000_000_000u64;
        assert!(shape.lap(shape.epoch(at)) & 0xFFFF >= 0x8000);
        let ring = RollingWindow::new(shape, 1_500);
        for step in 0..3u64 {
            let epoch = ring.advance(shape, shape.epoch(at + step));
            assert_eq!(ring.try_reserve(1, 1_500), Ok(step + 1));
            ring.record(shape, epoch, 1);
        }
        assert_eq!(ring.used(), 3);
        assert_eq!(ring.slot_sum(), 3);
    }

    /// Two wide buckets each holding a slot's most (usage added past the limit by
    /// adjustments), merged into one bucket by wider buckets: the new slot cannot count past
    /// `u32::MAX`, so the total must not either, or it keeps the excess once the bucket has
    /// aged out and the key is refused for good. Before, the merged count was clamped in its
    /// slot (a debug assertion) while the total kept all of it.
    #[test]
    fn reshaping_merged_full_wide_buckets_keeps_the_total_to_the_slots() {
        let window = RollingWindow::new(SHAPE, 100_000);
        let max = window.slots.max_count();
        assert!(window.slots.is_wide());
        window.advance(SHAPE, 3);
        assert!(window.force(SHAPE, 2, max).is_some());
        assert!(window.force(SHAPE, 3, max).is_some());
        let wider = RollingShape::new(10_000, 2_000);
        assert_eq!(SHAPE.carried_epoch(wider, 2), SHAPE.carried_epoch(wider, 3));
        let reshaped = window.reshaped(SHAPE, wider, 100_000);
        assert_eq!(reshaped.used(), reshaped.slot_sum());
        // Full until the merged bucket ages out, never earlier; empty after it.
        let epoch = reshaped.advance(wider, wider.epoch(13_999));
        assert!(reshaped.try_reserve(1, 100_000).is_err());
        assert_eq!(reshaped.release_time(wider, epoch, 1), Some(14_000));
        reshaped.advance(wider, wider.epoch(14_000));
        assert_eq!(
            reshaped.used(),
            0,
            "nothing counted once the bucket aged out"
        );
        assert_eq!(reshaped.try_reserve(1, 100_000), Ok(1));
    }

    #[test]
    fn widening_a_narrow_ring_keeps_every_count() {
        let narrow = RollingWindow::new(SHAPE, 60_000);
        for at in [1_000, 2_500, 7_000] {
            assert!(consume(&narrow, at, 60_000 / 3, 60_000));
        }
        let wide = narrow.reshaped(SHAPE, SHAPE, 200_000);
        assert!(wide.slots.is_wide());
        assert_eq!(wide.used(), 60_000);
        let epoch = wide.advance(SHAPE, 7);
        assert_eq!(wide.buckets(SHAPE, epoch), narrow.buckets(SHAPE, epoch));
        assert!(consume(&wide, 7_500, 100_000, 200_000));
    }

    /// `copy_raw` + `live_buckets` against `buckets` at the head, over many laps, jumps, a
    /// young head (below one window), refunds (slots left with a tag and no count) and narrow
    /// tags wrapping past 2^16 laps.
    #[test]
    fn a_raw_copy_gives_the_live_buckets_exactly() {
        let check = |ring: &RollingWindow, slots: &mut Vec<(u32, u64)>| {
            slots.clear();
            let raw = ring.copy_raw(slots);
            assert_eq!(raw.head, ring.head());
            assert_eq!(raw.wide, ring.is_wide());
            let expected: Vec<(u64, u64)> = ring
                .buckets(SHAPE, raw.head)
                .into_iter()
                .map(|(start_ms, count)| (start_ms / SHAPE.bucket_ms, count))
                .collect();
            assert_eq!(raw.live_buckets(SHAPE, slots), expected);
            expected.len()
        };
        let mut slots = Vec::new();
        let mut buckets_seen = 0;
        for limit in [1_000, 100_000] {
            let ring = RollingWindow::new(SHAPE, limit);
            check(&ring, &mut slots);
            let mut at = 0u64;
            for step in 0..60_000u64 {
                at += (step * 7_919) % 1_700;
                if step % 997 == 0 {
                    at += 3_000_000;
                }
                consume(&ring, at, 1 + step % 5, limit);
                if step % 13 == 0 {
                    let epoch = ring.head();
                    ring.refund(SHAPE, epoch.saturating_sub(step % 4), 1 + step % 3);
                }
                if step < 50 || step % 101 == 0 {
                    buckets_seen += check(&ring, &mut slots);
                }
            }
            check(&ring, &mut slots);
        }
        assert!(
            buckets_seen > 1_000,
            "{buckets_seen}: the rings were mostly empty"
        );
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

/// Model checks of the ring's and the calendar counter's lock-free protocols: loom runs each
/// model under every interleaving of its threads' atomic operations (and the weaker orderings'
/// possible reads), with the ring's debug assertions on (`total` never below zero, a bucket
/// never past its slot). Small rings (two buckets, three slots) make every move a lap and every
/// jump a sweep of each slot. Run by `scripts/test-loom.sh`; the stress tests in `tests` and
/// `tests/concurrency.rs` cover what a model cannot (many threads, real rings).
#[cfg(all(test, tally_loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Two buckets of 1 ms, three slots: epochs 0 and 3 share a slot, a lap apart.
    const SHAPE: RollingShape = RollingShape {
        bucket_ms: 1,
        buckets: 2,
    };

    /// As the admission path does one limit: move to the request's epoch (or the newer head),
    /// reserve in the total, record in the bucket.
    fn admit(window: &RollingWindow, epoch: u64, amount: u64, limit: u64) -> bool {
        let epoch = window.advance(SHAPE, epoch);
        match window.try_reserve(amount, limit) {
            Ok(_) => {
                window.record(SHAPE, epoch, amount);
                true
            }
            Err(_) => false,
        }
    }

    /// What the live buckets hold as of the head, which the total must equal once nothing is
    /// in flight.
    fn live_sum(window: &RollingWindow) -> u64 {
        let head = window.head();
        (head.saturating_sub(SHAPE.buckets)..=head)
            .map(|bucket| window.live_count(SHAPE, bucket))
            .sum()
    }

    fn ring(amount: u64) -> Arc<RollingWindow> {
        Arc::new(RollingWindow::new(SHAPE, amount))
    }

    /// Two requests for the last unit under the limit: exactly one is admitted.
    #[test]
    fn two_admissions_for_the_last_unit_admit_exactly_one() {
        loom::model(|| {
            let window = ring(2);
            assert!(admit(&window, 0, 1, 2));
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let window = Arc::clone(&window);
                    thread::spawn(move || admit(&window, 1, 1, 2))
                })
                .collect();
            let admitted = racers
                .into_iter()
                .map(|racer| racer.join().unwrap())
                .filter(|admitted| *admitted)
                .count();
            assert_eq!(admitted, 1);
            assert_eq!(window.used(), 2);
            assert_eq!(window.used(), live_sum(&window));
        });
    }

    /// A request recording in bucket 0 while another jumps to epoch 3, whose slot is bucket
    /// 0's, a lap on: whatever the order, at most one unit counts afterwards, the total is
    /// exactly what the live buckets hold (nothing left behind in it, nothing lost from it), and
    /// at least one of the two was admitted.
    #[test]
    fn an_admission_racing_a_jump_past_its_bucket_leaves_the_total_exact() {
        loom::model(|| {
            let window = ring(1);
            let early = {
                let window = Arc::clone(&window);
                thread::spawn(move || admit(&window, 0, 1, 1))
            };
            let late = admit(&window, 3, 1, 1);
            let early = early.join().unwrap();
            assert!(early || late);
            window.advance(SHAPE, 3);
            assert!(window.used() <= 1);
            assert_eq!(window.used(), live_sum(&window));
            // Admitted at 3, the late unit counts until bucket 3 ages out.
            if late {
                assert_eq!(window.used(), 1);
            }
        });
    }

    /// A request stamped before the head (a racing thread's older clock) is counted at the
    /// head, never in a bucket that ages out sooner: with a limit of 1, one of the two is
    /// admitted, and its unit still counts two buckets after the newer epoch.
    #[test]
    fn a_stale_timestamp_is_never_released_before_the_head_it_raced() {
        loom::model(|| {
            let window = ring(1);
            let newer = {
                let window = Arc::clone(&window);
                thread::spawn(move || admit(&window, 2, 1, 1))
            };
            let older = admit(&window, 0, 1, 1);
            let newer = newer.join().unwrap();
            assert!(newer ^ older, "exactly one: bucket 0 is live at epoch 2");
            window.advance(SHAPE, 2);
            assert_eq!(window.used(), 1);
            assert_eq!(window.used(), live_sum(&window));
            // Released by epoch 5 (bucket 2's end) at the latest; by epoch 3 only if it was
            // recorded in bucket 0 before the head moved past it.
            window.advance(SHAPE, 5);
            assert_eq!(window.used(), 0);
            assert_eq!(live_sum(&window), 0);
        });
    }

    /// A request over two limits reserves on the first, then the second, and gives the first
    /// back if the second refuses (as `admission` does): both racers fit the first limit, only
    /// one the second, so exactly one is admitted and neither ring keeps the other's units.
    #[test]
    fn an_admission_over_two_limits_takes_both_or_neither() {
        loom::model(|| {
            let first = ring(5);
            let second = ring(2);
            assert!(admit(&second, 0, 1, 2));
            let take_both = |first: &RollingWindow, second: &RollingWindow| {
                let epoch = first.advance(SHAPE, 1);
                if first.try_reserve(1, 5).is_err() {
                    return false;
                }
                let other = second.advance(SHAPE, 1);
                if second.try_reserve(1, 2).is_err() {
                    first.unreserve(1);
                    return false;
                }
                first.record(SHAPE, epoch, 1);
                second.record(SHAPE, other, 1);
                true
            };
            let racer = {
                let (first, second) = (Arc::clone(&first), Arc::clone(&second));
                thread::spawn(move || take_both(&first, &second))
            };
            let mine = take_both(&first, &second);
            let theirs = racer.join().unwrap();
            assert!(mine ^ theirs);
            assert_eq!(first.used(), 1);
            assert_eq!(second.used(), 2);
            assert_eq!(first.used(), live_sum(&first));
            assert_eq!(second.used(), live_sum(&second));
        });
    }

    /// A refund of bucket 0 racing the sweep that clears it a lap on: the units leave the total
    /// once, by the refund or by the sweep, never twice (the total's debug assertion) and never
    /// not at all.
    #[test]
    fn a_refund_racing_the_sweep_of_its_bucket_takes_the_units_out_once() {
        loom::model(|| {
            let window = ring(5);
            assert!(admit(&window, 0, 2, 5));
            let refund = {
                let window = Arc::clone(&window);
                thread::spawn(move || window.refund(SHAPE, 0, 2))
            };
            window.advance(SHAPE, 3);
            let given = refund.join().unwrap();
            assert!(given == 0 || given == 2);
            assert_eq!(window.used(), 0);
            assert_eq!(live_sum(&window), 0);
        });
    }

    /// Two threads moving the head to different epochs at once (one a whole lap on) while a
    /// third records: every slot a move passes is swept by exactly one of them, so the total
    /// ends equal to the live buckets.
    #[test]
    fn racing_moves_of_the_head_sweep_each_passed_slot_once() {
        loom::model(|| {
            let window = ring(10);
            assert!(admit(&window, 0, 3, 10));
            assert!(admit(&window, 1, 2, 10));
            let movers: Vec<_> = [2u64, 4]
                .into_iter()
                .map(|epoch| {
                    let window = Arc::clone(&window);
                    thread::spawn(move || window.advance(SHAPE, epoch))
                })
                .collect();
            let admitted = admit(&window, 1, 1, 10);
            for mover in movers {
                mover.join().unwrap();
            }
            assert!(admitted, "the limit has room for it in every order");
            window.advance(SHAPE, 4);
            assert_eq!(window.used(), live_sum(&window));
            // Buckets 0 and 1 have aged out at 4; the new unit counts only if it was recorded
            // at the head (4) after the jump.
            assert!(window.used() <= 1);
        });
    }

    /// Two adds on a calendar counter across a period change, a limit of 1 each period: the
    /// older period's add counts in its own period (before the change) or, once the newer
    /// period stands, against the newer count, where it is refused; never in a reset count.
    /// The newer period's add is admitted either way, and the word ends holding its one unit.
    #[test]
    fn calendar_adds_across_a_period_change_never_exceed_the_limit() {
        loom::model(|| {
            let counter = Arc::new(CalendarCounter::restored(1, 0));
            let older = {
                let counter = Arc::clone(&counter);
                thread::spawn(move || counter.try_add(1, 1, 1))
            };
            let newer = counter.try_add(2, 1, 1);
            let older = older.join().unwrap();
            assert_eq!(newer, Ok(PeriodUse { period: 2, used: 1 }));
            match older {
                Ok(counted) => assert_eq!(counted, PeriodUse { period: 1, used: 1 }),
                Err(seen) => assert_eq!(seen, PeriodUse { period: 2, used: 1 }),
            }
            assert_eq!(counter.raw(), (2, 1));
        });
    }
}
