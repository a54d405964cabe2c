//! The ledger: what each key has used (its window counters, one per distinct meter and window)
//! and what each team holds (its credits balance in integer micro-credits).

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;

use allocator_api2::alloc::Allocator;
use allocator_api2::boxed::Box;

use crate::pages::UsagePages;
use crate::policy::{carry_through, CounterId, PlanId, Policy, Window};
use crate::window::{prefetch, CalendarCounter, RollingWindow};

/// A team's prepaid credits. A Default Team's credits are its user's own.
#[derive(Debug)]
pub struct Team {
    pub name: Box<str>,
    // CAS (SeqCst where it adds credits: see `in_debt`): the balance is one word; a charge
    // succeeds only against the value it replaced, so concurrent charges can never take it
    // below zero.
    credits_micros: AtomicU64,
    // Relaxed: a statistic (total charged so far), read only for reports.
    charged_micros: AtomicU64,
    /// Micro-credits a reversal (`force_charge`) took back that the balance no longer held,
    /// taken from the next credits added. Only after the log failed: its calls' effects are
    /// undone one by one, in whatever order their callers see the failure, and a refund's
    /// credits may have been charged to a later request meanwhile, whose own undo gives them
    /// back after the refund's was taken. Stopping at zero there left the team with credits
    /// no logged event gave it.
    debt_micros: parking_lot::Mutex<u64>,
    // SeqCst, set under `debt_micros`' lock, paired with the SeqCst balance additions in
    // `credit` and `refund_and_charge`: whichever of a debt and a credit comes second sees
    // the other and settles (`settle_debt`). Clear but for a debt.
    in_debt: AtomicBool,
}

impl Team {
    pub fn new(name: &str) -> Team {
        Team {
            name: name.into(),
            credits_micros: AtomicU64::new(0),
            charged_micros: AtomicU64::new(0),
            debt_micros: parking_lot::Mutex::new(0),
            in_debt: AtomicBool::new(false),
        }
    }

    /// Takes what the balance holds of the debt, if the team is in debt (`force_charge`).
    #[cold]
    fn settle_debt(&self) {
        let mut debt = self.debt_micros.lock();
        if *debt > 0 {
            // SeqCst, as the additions it pairs with (`in_debt`).
            if let Ok(before) =
                self.credits_micros
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |balance| {
                        (balance > 0).then(|| balance - balance.min(*debt))
                    })
            {
                *debt -= before.min(*debt);
            }
        }
        if *debt == 0 {
            self.in_debt.store(false, Ordering::SeqCst);
        }
    }

    /// After credits were added: settles a debt, if any; the balance then.
    #[inline]
    fn after_credit(&self, after: u64) -> u64 {
        // SeqCst: see `in_debt`.
        if self.in_debt.load(Ordering::SeqCst) {
            self.settle_debt();
            return self.balance_micros();
        }
        after
    }

    /// Micro-credits taken back that the balance did not hold (see `debt_micros`), still to
    /// be taken from credits added later.
    pub fn debt_micros(&self) -> u64 {
        *self.debt_micros.lock()
    }

    pub fn balance_micros(&self) -> u64 {
        self.credits_micros.load(Ordering::Acquire)
    }

    pub fn charged_micros(&self) -> u64 {
        self.charged_micros.load(Ordering::Relaxed)
    }

    /// Takes `micros` if the balance covers it: `Ok(balance after)`, or `Err(balance)`.
    pub fn charge(&self, micros: u64) -> Result<u64, u64> {
        let after = self.move_balance(|balance| balance.checked_sub(micros))?;
        // Relaxed: a statistic.
        self.charged_micros.fetch_add(micros, Ordering::Relaxed);
        Ok(after)
    }

    /// Sets the balance to what `to` makes of it, if anything (`None`: refused): `Ok(balance
    /// after)`, or `Err(balance)` with nothing changed. Credits never go negative because every
    /// charge moves the balance through here or `credit`, each checked against the balance it
    /// replaces.
    #[inline]
    fn move_balance(&self, to: impl Fn(u64) -> Option<u64>) -> Result<u64, u64> {
        // A CAS: the new balance is checked against the one it replaces. SeqCst, not AcqRel:
        // `refund_and_charge` adds credits through here, and an addition must be SeqCst to
        // pair with `in_debt` (an AcqRel one and the debt's SeqCst store and load of the
        // balance may each miss the other: store buffering). The same instructions on x86 and
        // ARMv8 for a read-modify-write.
        self.credits_micros
            .fetch_update(Ordering::SeqCst, Ordering::Acquire, &to)
            .map(|before| to(before).unwrap_or_else(|| unreachable!("just accepted")))
    }

    /// Gives back `given` of an earlier charge and takes `price` in one step: the balance
    /// becomes `balance + given - price`, so what is given back pays for the charge before any
    /// other charge can take it. `Ok(balance after)`, or `Err(balance)` with nothing changed if
    /// that would be below zero or past `u64::MAX`. The total charged moves by `price - given`,
    /// as a `refund` of `given` then a `charge` of `price` would move it (and as a replay of
    /// both, `replay_add` then `replay_take`, does).
    pub fn refund_and_charge(&self, given: u64, price: u64) -> Result<u64, u64> {
        let after = self.move_balance(|balance| match given.checked_sub(price) {
            Some(net_credit) => balance.checked_add(net_credit),
            None => balance.checked_sub(price - given),
        })?;
        let after = if given > price {
            self.after_credit(after)
        } else {
            after
        };
        // Relaxed: a statistic, as in `charge` and `refund`.
        match price.checked_sub(given) {
            Some(net_charge) => {
                self.charged_micros.fetch_add(net_charge, Ordering::Relaxed);
            }
            None => {
                let _ = self.charged_micros.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |charged| Some(charged.saturating_sub(given - price)),
                );
            }
        }
        Ok(after)
    }

    /// Adds `micros` (a top-up or a refund): the balance after, or `None` (nothing added) on
    /// overflow.
    pub fn credit(&self, micros: u64) -> Option<u64> {
        let mut balance = self.balance_micros();
        loop {
            let after = balance.checked_add(micros)?;
            // SeqCst (AcqRel would do but for `in_debt`, which it pairs with).
            match self.credits_micros.compare_exchange_weak(
                balance,
                after,
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(self.after_credit(after)),
                Err(current) => balance = current,
            }
        }
    }

    /// Takes `micros` if the balance covers it, as a correction (not counted as charged):
    /// `Ok(balance after)`, or `Err(balance)`.
    pub fn withdraw(&self, micros: u64) -> Result<u64, u64> {
        self.credits_micros
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |balance| {
                balance.checked_sub(micros)
            })
            .map(|before| before - micros)
    }

    /// Takes `micros` back whatever the balance: only to reverse a refund (a give-back) whose
    /// event could not be logged. What the balance does not hold is a debt, taken from the
    /// credits added next (the give-back of a charge the refund's credits paid for, undone in
    /// turn): the balance never goes below zero, and ends where the log says it is.
    #[cold]
    pub fn force_charge(&self, micros: u64) {
        {
            let mut debt = self.debt_micros.lock();
            *debt = debt.saturating_add(micros);
            // SeqCst: see `in_debt`.
            self.in_debt.store(true, Ordering::SeqCst);
        }
        self.settle_debt();
        self.charged_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Applies a logged credit during replay (a top-up, or a refund when `refund`). Replay
    /// follows log order, which may differ from the order charges and top-ups met in memory, so
    /// the balance may pass below zero on the way: wrapping arithmetic keeps the final sum exact.
    ///
    /// Read-modify-writes, not a load and a store: a replay's two appliers charge the same
    /// team at once when its keys sit in both one's and the other's shards, and a load and a
    /// store lost charges then (a reopened team held more credits than it had left). AcqRel
    /// like `charge`; the atomics' `fetch_add` and `fetch_sub` wrap.
    pub fn replay_add(&self, micros: u64, refund: bool) {
        self.credits_micros.fetch_add(micros, Ordering::AcqRel);
        if refund {
            // Relaxed: a statistic, read on its own.
            self.charged_micros.fetch_sub(micros, Ordering::Relaxed);
        }
    }

    /// Applies a logged charge (`charge`) or withdrawal during replay; see `replay_add`.
    pub fn replay_take(&self, micros: u64, charge: bool) {
        self.credits_micros.fetch_sub(micros, Ordering::AcqRel);
        if charge {
            // Relaxed: a statistic, read on its own.
            self.charged_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }

    /// Sets the balance and total charged (restoring a snapshot).
    pub fn restore(&self, balance_micros: u64, charged_micros: u64) {
        self.credits_micros.store(balance_micros, Ordering::Release);
        self.charged_micros.store(charged_micros, Ordering::Relaxed);
    }

    /// Gives back part of an earlier charge.
    pub fn refund(&self, micros: u64) -> Option<u64> {
        let after = self.credit(micros)?;
        let _ = self
            .charged_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |charged| {
                Some(charged.saturating_sub(micros))
            });
        Some(after)
    }
}

/// The state of one counter for one key.
#[derive(Debug)]
pub enum WindowState {
    Rolling(RollingWindow),
    Calendar(CalendarCounter),
}

impl WindowState {
    /// The state for a limit of `amount` on `window`.
    pub fn new(window: Window, amount: u64) -> WindowState {
        match window.shape() {
            Some(shape) => WindowState::Rolling(RollingWindow::new(shape, amount)),
            None => WindowState::Calendar(CalendarCounter::new()),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            WindowState::Rolling(window) => window.heap_bytes(),
            WindowState::Calendar(_) => 0,
        }
    }
}

#[derive(Debug)]
pub struct Counter {
    pub id: CounterId,
    pub state: WindowState,
}

/// Everything one key has used. The first `plan.limits.len()` counters are the key's plan's
/// limits in order (so admission indexes them directly); any after those are dormant counters
/// from an earlier plan, kept so a change back within the window still sees that usage.
///
/// One block on the usage pages (see `pages::UsagePages`): the number of counters, then the
/// counters themselves (a ring's slots are blocks of their own). A key's cell holds a thin
/// pointer to the block. With the count in a box and the counters in a list of their own, a
/// request waited on four lines for three counters (the box's and three of 48-byte counters);
/// now it reads two (`tests::three_counters_and_their_count_fill_two_cache_lines`).
#[derive(Debug)]
#[repr(C)]
pub struct KeyUsage {
    /// `counters.len()`, kept in the block so that a thin pointer finds it.
    len: usize,
    pub counters: [Counter],
}

/// A key's usage, owned.
pub type UsageBox = Box<KeyUsage, UsagePages>;

impl KeyUsage {
    /// The block of `len` counters, and where in it the counters start.
    fn layout(len: usize) -> (Layout, usize) {
        let counters =
            Layout::array::<Counter>(len).expect("a key's counters are bounded by the policy");
        let (block, offset) = Layout::new::<usize>()
            .extend(counters)
            .expect("a key's counters are bounded by the policy");
        (block.pad_to_align(), offset)
    }

    /// `counters` moved into a block of their own.
    pub fn from_counters(mut counters: Vec<Counter>) -> UsageBox {
        let len = counters.len();
        let (layout, offset) = KeyUsage::layout(len);
        let block = UsagePages
            .allocate(layout)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(layout))
            .cast::<u8>()
            .as_ptr();
        // SAFETY: the block is `layout`, which holds a `usize` at 0 and `len` counters at
        // `offset`; the counters are moved (the list forgets them, keeping only its buffer to
        // free), and the fat pointer made from the block says `len` counters, as written, in
        // the layout `Box` will free it with (`size_of_val` is `layout.size()` for repr(C)).
        unsafe {
            block.cast::<usize>().write(len);
            std::ptr::copy_nonoverlapping(
                counters.as_ptr(),
                block.add(offset).cast::<Counter>(),
                len,
            );
            counters.set_len(0);
            Box::from_raw_in(KeyUsage::in_block(block), UsagePages)
        }
    }

    /// The usage in the block at `block` (from `KeyUsage::from_counters`).
    ///
    /// # Safety
    /// `block` is a live block from `from_counters` (its first word is the count).
    #[inline]
    unsafe fn in_block(block: *mut u8) -> *mut KeyUsage {
        // SAFETY: per the contract, the first word is initialized and holds the count.
        let len = unsafe { block.cast::<usize>().read() };
        std::ptr::slice_from_raw_parts_mut(block, len) as *mut KeyUsage
    }

    /// The counters, moved out of the block (which is freed).
    pub fn into_counters(usage: UsageBox) -> Vec<Counter> {
        let len = usage.counters.len();
        let (raw, _) = Box::into_raw_with_allocator(usage);
        let mut counters = Vec::with_capacity(len);
        // SAFETY: `raw` is the live block of `len` counters, which are moved out once (the
        // block is then freed without dropping them) into room for `len`.
        unsafe {
            std::ptr::copy_nonoverlapping((*raw).counters.as_ptr(), counters.as_mut_ptr(), len);
            counters.set_len(len);
            UsagePages.deallocate(
                std::ptr::NonNull::new_unchecked(raw.cast::<u8>()),
                KeyUsage::layout(len).0,
            );
        }
        counters
    }

    pub fn for_plan(policy: &Policy, plan: Option<PlanId>) -> UsageBox {
        let limits = plan.map_or(&[][..], |plan| &policy.plan(plan).limits[..]);
        KeyUsage::from_counters(
            limits
                .iter()
                .map(|limit| Counter {
                    id: limit.counter,
                    state: WindowState::new(limit.window, limit.amount),
                })
                .collect(),
        )
    }

    pub fn counter(&self, id: CounterId) -> Option<&WindowState> {
        self.counters
            .iter()
            .find(|counter| counter.id == id)
            .map(|counter| &counter.state)
    }

    /// Where units of `policy`'s `counter` at `time` (an epoch or a period) are in this usage:
    /// that counter, or, when a seat change or a swap moved the plan's usage to the counter of
    /// the same meter over the same span with other buckets (`rearranged`), that one, with the
    /// time mapped to its buckets as the move did, and its state. `None` if neither is here.
    pub fn locate(
        &self,
        policy: &Policy,
        counter: CounterId,
        time: u64,
    ) -> Option<(CounterId, u64, &WindowState)> {
        if let Some(state) = self.counter(counter) {
            return Some((counter, time, state));
        }
        let spec = policy.counter(counter);
        let found = self.counters.iter().map(|counter| counter.id).find(|&id| {
            let other = policy.counter(id);
            other.meter == spec.meter && other.window.span_equals(spec.window)
        })?;
        let state = self.counter(found)?;
        match (spec.window.shape(), policy.counter(found).window.shape()) {
            (Some(from), Some(to)) if from != to => {
                Some((found, from.carried_epoch(to, time), state))
            }
            _ => Some((found, time, state)),
        }
    }

    /// Where units that `then`'s `counter` held at `time` are in this usage under `now`: carried
    /// through every swap since (`policy::carry_through`; `later` lists the kept generations
    /// after `then`), then `locate`d. What give-backs, their undo and replay all ask.
    pub fn find_carried(
        &self,
        (then, later): (&Policy, &[Arc<Policy>]),
        now: &Policy,
        counter: CounterId,
        time: u64,
    ) -> Option<(CounterId, u64, &WindowState)> {
        let (counter, time) = carry_through(then, later, now, counter, time)?;
        self.locate(now, counter, time)
    }

    /// The same usage laid out for `plan` under `policy`, taking counters from `self` (laid
    /// out under `old_policy`), at `at_ms` (the seat change's or swap's time). Counters with the
    /// same meter and window carry over, even if the bucket width changed; the rest stay
    /// dormant. A ring re-bucketed is first moved to `at_ms`: a bucket aged out by then stays
    /// out (the ring forgets one only once its head passes it, and carried to the new bucket
    /// holding its last instant, which ends later, it was counted again).
    pub fn rearranged(
        usage: UsageBox,
        old_policy: &Policy,
        policy: &Policy,
        plan: Option<PlanId>,
        at_ms: u64,
    ) -> UsageBox {
        let old = KeyUsage::into_counters(usage);
        let mut carried: Vec<Counter> = Vec::with_capacity(old.len());
        for counter in old {
            let Some(id) = old_policy.same_counter_in(counter.id, policy) else {
                continue; // the meter or window is gone from the new policy: nothing can read it
            };
            let old_window = old_policy.counter(counter.id).window;
            let new_window = policy.counter(id).window;
            let state = match (counter.state, old_window.shape(), new_window.shape()) {
                (WindowState::Rolling(window), Some(from), Some(to)) if from != to => {
                    window.advance(from, from.epoch(at_ms));
                    WindowState::Rolling(window.reshaped(from, to, 0))
                }
                (state, _, _) => state,
            };
            carried.push(Counter { id, state });
        }
        let limits = plan.map_or(0, |plan| policy.plan(plan).limits.len());
        let mut counters = Vec::with_capacity(limits + carried.len());
        if let Some(plan) = plan {
            for limit in &policy.plan(plan).limits {
                // The same counter, or else the same meter over the same span with other
                // buckets (a swap that changed this plan's bucket width only): reshaped.
                let same_span = |counter: &Counter| {
                    let spec = policy.counter(counter.id);
                    spec.meter == limit.meter && spec.window.span_equals(limit.window)
                };
                let found = carried
                    .iter()
                    .position(|counter| counter.id == limit.counter)
                    .or_else(|| carried.iter().position(same_span));
                let state = match found {
                    Some(position) => {
                        let counter = carried.swap_remove(position);
                        let from = policy.counter(counter.id).window;
                        let state = match (counter.state, from.shape(), limit.window.shape()) {
                            (WindowState::Rolling(window), Some(from), Some(to)) if from != to => {
                                window.advance(from, from.epoch(at_ms));
                                WindowState::Rolling(window.reshaped(from, to, limit.amount))
                            }
                            (state, _, _) => state,
                        };
                        widened(state, limit.window, limit.amount)
                    }
                    None => WindowState::new(limit.window, limit.amount),
                };
                counters.push(Counter {
                    id: limit.counter,
                    state,
                });
            }
        }
        counters.extend(carried);
        KeyUsage::from_counters(counters)
    }

    /// Bytes this key's usage holds on the heap: its block and the rings.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(self)
            + self
                .counters
                .iter()
                .map(|counter| counter.state.heap_bytes())
                .sum::<usize>()
    }
}

/// A carried ring whose slots are too narrow for a bigger limit, copied into wide slots.
fn widened(state: WindowState, window: Window, amount: u64) -> WindowState {
    match (state, window.shape()) {
        (WindowState::Rolling(ring), Some(shape)) if !ring.holds(amount) => {
            WindowState::Rolling(ring.reshaped(shape, shape, amount))
        }
        (state, _) => state,
    }
}

/// A lazily allocated `KeyUsage`: a key with no usage holds only null pointers. Readers share
/// the key through its shard's read lock; the first consumer installs the block by CAS (a loser
/// frees its own). Replacing or freeing needs `&mut`, i.e. the shard's write lock, so no reader
/// can hold a reference then.
///
/// Over many keys, each hop from the key's table entry to its counters is a cache miss: the
/// usage's block, then the slot of a rolling ring. The cell keeps where the last slot written
/// is, so both loads start together as soon as the entry is read (`prefetch`) instead of one
/// after the other. The hint is only ever prefetched, never dereferenced: a stale one costs a
/// wasted prefetch, nothing else.
#[derive(Debug, Default)]
pub struct UsageCell {
    // Release on install / Acquire on load: the block's contents are visible to whoever sees
    // it. A thin pointer to a `KeyUsage` block (its first word is the counters' count).
    pointer: AtomicPtr<u8>,
    // Relaxed: a prefetch hint (the rolling slot written last), rewritten only when it moves.
    slot_hint: AtomicPtr<u8>,
}

/// Lines of a key's usage block prefetched: its count and three counters, a typical plan's
/// limits on a meter.
const USAGE_LINES_PREFETCHED: usize = 2;

/// Starts loading a key's usage block and a rolling slot, as `UsageCell::prefetch_addresses`
/// gives them; a no-op for a key without usage (null).
#[inline]
pub(crate) fn prefetch_usage([usage, slot]: [usize; 2]) {
    if usage != 0 {
        for line in 0..USAGE_LINES_PREFETCHED {
            prefetch((usage as *const u8).wrapping_add(line * 64));
        }
        // The slot and the line after it: a sweep to a later epoch reads on from the slot (in
        // an open's replay, 80% of `RollingWindow::advance` waited there).
        prefetch(slot as *const u8);
        prefetch((slot as *const u8).wrapping_add(64));
    }
}

impl UsageCell {
    #[inline]
    pub fn get(&self) -> Option<&KeyUsage> {
        let block = self.pointer.load(Ordering::Acquire);
        if block.is_null() {
            return None;
        }
        // SAFETY: a non-null pointer is a block from `Box::into_raw` of a `UsageBox`, only
        // freed through `&mut self` (`take`, `Drop`), which cannot overlap with this borrow.
        Some(unsafe { &*KeyUsage::in_block(block) })
    }

    /// Hints the CPU to start loading the usage and the rolling slot written last, both at
    /// once; a no-op without usage or off x86-64.
    #[inline]
    pub fn prefetch(&self) {
        prefetch_usage(self.prefetch_addresses());
    }

    /// What `prefetch` starts loading: the usage's block and the slot written last (null
    /// without usage), for a hint kept where it can be read before the entry.
    #[inline]
    pub fn prefetch_addresses(&self) -> [usize; 2] {
        [
            self.pointer.load(Ordering::Relaxed) as usize,
            self.slot_hint.load(Ordering::Relaxed) as usize,
        ]
    }

    /// Remembers the address of the rolling slot just written, for the next `prefetch`.
    #[inline]
    pub fn note_slot(&self, slot: *const u8) {
        // Written only when it moves (once a bucket), so the entry's line stays read-mostly.
        if self.slot_hint.load(Ordering::Relaxed) != slot.cast_mut() {
            self.slot_hint.store(slot.cast_mut(), Ordering::Relaxed);
        }
    }

    pub fn get_or_init(&self, init: impl FnOnce() -> UsageBox) -> &KeyUsage {
        if let Some(usage) = self.get() {
            return usage;
        }
        let fresh = Box::into_raw(init());
        match self.pointer.compare_exchange(
            std::ptr::null_mut(),
            fresh.cast::<u8>(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: we just installed `fresh`; it lives until `&mut self` frees it.
            Ok(_) => unsafe { &*fresh },
            Err(installed) => {
                // SAFETY: `fresh` was never shared; `installed` is live as in `get`.
                unsafe {
                    drop(Box::from_raw_in(fresh, UsagePages));
                    &*KeyUsage::in_block(installed)
                }
            }
        }
    }

    pub fn take(&mut self) -> Option<UsageBox> {
        let block = std::mem::replace(self.pointer.get_mut(), std::ptr::null_mut());
        *self.slot_hint.get_mut() = std::ptr::null_mut();
        // SAFETY: exclusive access; a non-null block came from `Box::into_raw` of a `UsageBox`.
        (!block.is_null())
            .then(|| unsafe { Box::from_raw_in(KeyUsage::in_block(block), UsagePages) })
    }

    pub fn set(&mut self, usage: Option<UsageBox>) {
        drop(self.take());
        if let Some(usage) = usage {
            *self.pointer.get_mut() = Box::into_raw(usage).cast::<u8>();
        }
    }
}

impl Drop for UsageCell {
    fn drop(&mut self) {
        drop(self.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_never_go_below_zero_under_concurrent_charges() {
        let team = Team::new("t");
        team.credit(1_000).expect("room for a top-up");
        let charged = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        if team.charge(3).is_ok() {
                            charged.fetch_add(3, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(team.balance_micros(), 1);
        assert_eq!(charged.load(Ordering::Relaxed), 999);
        assert_eq!(team.charged_micros(), 999);
    }

    /// A give-back taken back after its credits were spent (`force_charge`) leaves a debt,
    /// never a negative balance, and the credits added next pay it first: the balance ends at
    /// the sum of what was added and taken, as the log sums it.
    #[test]
    fn credits_taken_back_that_were_spent_are_a_debt_the_next_credits_pay() {
        let team = Team::new("t");
        team.credit(100).expect("room");
        team.force_charge(30);
        assert_eq!((team.balance_micros(), team.debt_micros()), (70, 0));
        team.force_charge(100);
        assert_eq!((team.balance_micros(), team.debt_micros()), (0, 30));
        assert!(team.charge(1).is_err(), "nothing to charge while in debt");
        assert_eq!(team.credit(20), Some(0), "paid into the debt");
        assert_eq!((team.balance_micros(), team.debt_micros()), (0, 10));
        assert_eq!(team.refund_and_charge(25, 5), Ok(10));
        assert_eq!((team.balance_micros(), team.debt_micros()), (10, 0));
        assert_eq!(team.credit(5), Some(15), "no debt left");
    }

    /// Debts and credits racing from two threads: however they interleave, the balance ends at
    /// the sum, none of it lost to a debt that missed the credit that could pay it.
    #[test]
    fn debts_and_credits_racing_end_at_their_sum() {
        for round in 0..200u64 {
            let team = Team::new("t");
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    for _ in 0..50 {
                        team.force_charge(3);
                    }
                });
                scope.spawn(|| {
                    for step in 0..50 {
                        team.credit(3 + (round + step) % 2).expect("room");
                    }
                });
            });
            let added: u64 = (0..50).map(|step| 3 + (round + step) % 2).sum();
            assert_eq!(team.balance_micros(), added - 150, "round {round}");
            assert_eq!(team.debt_micros(), 0, "round {round}");
        }
    }

    /// A refund and a charge in one step move the balance and the total charged as the two
    /// one after the other would, and as their replay does; one the balance and the refund
    /// together cannot pay, or that would overflow, changes nothing.
    #[test]
    fn a_refund_and_charge_is_one_step_that_pays_with_what_it_gives_back() {
        let team = Team::new("t");
        team.credit(10_000).expect("room for a top-up");
        team.charge(10_000).expect("a hold of everything");
        // Gives back 4,000 and takes 2,000: 2,000 left, 8,000 charged in all.
        assert_eq!(team.refund_and_charge(4_000, 2_000), Ok(2_000));
        assert_eq!(
            (team.balance_micros(), team.charged_micros()),
            (2_000, 8_000)
        );
        // Gives back 1,000 and takes 3,000: nothing left, 10,000 charged.
        assert_eq!(team.refund_and_charge(1_000, 3_000), Ok(0));
        assert_eq!((team.balance_micros(), team.charged_micros()), (0, 10_000));
        // One micro short: refused, nothing changed.
        assert_eq!(team.refund_and_charge(1_000, 1_001), Err(0));
        assert_eq!((team.balance_micros(), team.charged_micros()), (0, 10_000));

        let replayed = Team::new("r");
        replayed.replay_add(10_000, false);
        replayed.replay_take(10_000, true);
        for (given, price) in [(4_000, 2_000), (1_000, 3_000)] {
            replayed.replay_add(given, true);
            replayed.replay_take(price, true);
        }
        assert_eq!(
            (replayed.balance_micros(), replayed.charged_micros()),
            (team.balance_micros(), team.charged_micros())
        );

        let full = Team::new("f");
        full.credit(u64::MAX - 1).expect("room for a top-up");
        assert_eq!(full.refund_and_charge(3, 1), Err(u64::MAX - 1));
        assert_eq!(
            (full.balance_micros(), full.charged_micros()),
            (u64::MAX - 1, 0)
        );
        assert_eq!(full.refund_and_charge(2, 1), Ok(u64::MAX));
    }

    /// Racing plain charges, refunds-and-charges never take the balance below zero: what one
    /// gives back pays for its own charge before any other charge sees it.
    #[test]
    fn refunds_and_charges_racing_charges_never_take_credits_below_zero() {
        let team = Team::new("t");
        team.credit(1_000).expect("room for a top-up");
        let charged = AtomicU64::new(0);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..1_000 {
                    if team.charge(3).is_ok() {
                        charged.fetch_add(3, Ordering::Relaxed);
                    }
                }
            });
            scope.spawn(|| {
                for round in 0..1_000 {
                    // A hold of 5, settled trading units: 2 given back and 2 charged (what it
                    // held), or 3 charged (one more, which the balance may lack: then voided).
                    if team.charge(5).is_err() {
                        continue;
                    }
                    let price = 2 + round % 2;
                    match team.refund_and_charge(2, price) {
                        Ok(_) => {
                            charged.fetch_add(3 + price, Ordering::Relaxed);
                        }
                        Err(_) => {
                            assert_eq!(price, 3, "the hold pays for what it held");
                            team.refund(5).expect("room for a refund");
                        }
                    }
                }
            });
        });
        let charged = charged.into_inner();
        assert_eq!(team.balance_micros(), 1_000 - charged);
        assert_eq!(team.charged_micros(), charged);
    }

    #[test]
    fn a_credit_that_would_overflow_changes_nothing() {
        let team = Team::new("t");
        team.credit(u64::MAX - 1).expect("room for a top-up");
        assert_eq!(team.credit(2), None);
        assert_eq!(team.balance_micros(), u64::MAX - 1);
    }

    #[test]
    fn three_counters_and_their_count_fill_two_cache_lines() {
        assert_eq!(std::mem::size_of::<Counter>(), 40);
        let rolling = Window::Rolling {
            window_ms: 5 * 3_600_000,
            bucket_ms: 60_000,
        };
        let counters = vec![
            Counter {
                id: CounterId(0),
                state: WindowState::new(rolling, 1_500),
            },
            Counter {
                id: CounterId(1),
                state: WindowState::new(
                    Window::Calendar(crate::calendar::CalendarPeriod::Daily),
                    10_000,
                ),
            },
            Counter {
                id: CounterId(2),
                state: WindowState::new(rolling, 1 << 40),
            },
        ];
        let usage = KeyUsage::from_counters(counters);
        let block = &*usage as *const KeyUsage as *const u8 as usize;
        assert_eq!(std::mem::size_of_val(&*usage), 128);
        assert_eq!(block % 64, 0, "a usage block starts a cache line");
        assert_eq!(usage.counters.len(), 3);
        let ids: Vec<u16> = usage.counters.iter().map(|counter| counter.id.0).collect();
        assert_eq!(ids, [0, 1, 2]);
        // Rings keep their width through the move into the block and back out of it.
        let widths = |counters: &[Counter]| -> Vec<Option<bool>> {
            counters
                .iter()
                .map(|counter| match &counter.state {
                    WindowState::Rolling(ring) => Some(ring.holds(1 << 20)),
                    WindowState::Calendar(_) => None,
                })
                .collect()
        };
        assert_eq!(widths(&usage.counters), [Some(false), None, Some(true)]);
        let mut cell = UsageCell::default();
        let installed = cell.get_or_init(|| usage);
        assert_eq!(installed as *const KeyUsage as *const u8 as usize, block);
        let back = KeyUsage::into_counters(cell.take().expect("installed"));
        assert_eq!(widths(&back), [Some(false), None, Some(true)]);
    }

    #[test]
    fn a_usage_cell_installs_once() {
        let policy = Policy::token_plan();
        let plus = policy.plan_id("Plus");
        let mut cell = UsageCell::default();
        assert!(cell.get().is_none());
        let first = cell.get_or_init(|| KeyUsage::for_plan(&policy, plus)) as *const KeyUsage;
        let second = cell.get_or_init(|| panic!("must not build twice")) as *const KeyUsage;
        assert_eq!(first, second);
        assert_eq!(cell.take().map(|usage| usage.counters.len()), Some(4));
        assert!(cell.get().is_none());
    }
}
