//! The read-mostly lock around each key shard: read on every admission, written only by admin
//! calls (keys created, seats changed, usage corrected, a policy swapped), a checkpoint's cut, a
//! step of the idle keys' reclaim and a give-back into a calendar period a usage correction
//! removed units from (`KeyState::short_until_ms`).
//!
//! A writer may also leave work behind (`WriteGuard::leave`) that must run before anyone uses
//! the value again: a checkpoint's cut write-locks every shard at one instant, then leaves each
//! shard's copy to whoever takes that shard next (the cut's own thread, or the first reader or
//! writer to come), so admission waits for one shard's copy, not all of them.
//!
//! A `RwLock` keeps one reader count, so every read lock writes the same cache line: two threads
//! admitting on different keys of one shard bounce that line between their cores on every call
//! (measured on these machines: a shared `RwLock<HashMap>` read path costs 8x an unshared one).
//! Here each thread announces its read on one of `READER_SLOTS` cache-padded counters, so readers
//! on different slots never write a common line. A writer takes the writer mutex, raises
//! `writing`, and waits until every slot is empty; a reader that finds `writing` raised steps
//! back and waits on the writer mutex (parked, not spinning) before trying again.
//!
//! The reader's announcement and the writer's flag form a Dekker handshake, which needs a full
//! barrier on both sides. On Linux the barrier is asymmetric (as liburcu's `urcu-memb` and
//! folly's `asymmetricHeavyBarrier` do): the writer, which is rare, calls
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which runs a full barrier on every core
//! running one of the process's threads; a reader that holds one of the `EXCLUSIVE_SLOTS` (one
//! thread each at a time) then announces itself with plain stores and a compiler fence, with no
//! locked instruction (it saved 3-7 ns of a 55-59 ns hot-key admission on the AMD machine; both
//! of the lock's locked instructions made plain, unsound, had saved 10 ns). Other readers (more
//! threads than exclusive slots, or a kernel without `membarrier`) use a locked increment, as
//! all did before; the two kinds mix on one lock.
//!
//! As with `parking_lot::RwLock`, a thread must not take a read lock it already holds while a
//! writer may be waiting: the writer waits for the first read, the second waits for the writer.

use std::cell::{Cell, UnsafeCell};
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};

/// Reader counters per lock: the first `EXCLUSIVE_SLOTS` are each held by one thread at a time
/// (claimed on its first read, given back when it ends); threads beyond share the others.
pub const READER_SLOTS: usize = 16;
/// Slots one thread holds alone, announcing its reads without a locked instruction.
const EXCLUSIVE_SLOTS: usize = 12;
/// Spins a writer makes waiting for readers before it starts yielding its core.
const WRITER_SPINS: u32 = 64;

const _: () = assert!(EXCLUSIVE_SLOTS < READER_SLOTS);

/// Work a writer left on the value (`WriteGuard::leave`), run by the next thread to take the
/// writer mutex, with the value as the writer left it.
pub type Pending<T> = Box<dyn FnOnce(&T) + Send + Sync>;

pub struct ShardLock<T> {
    // SeqCst store, then (`asymmetric`) the heavy barrier, then the slots read: one side of a
    // Dekker handshake with a reader's announcement (see `read`), so either the reader sees
    // `writing` and backs off, or the writer sees the reader's count and waits. Cleared with
    // Release so a reader that sees it clear (Acquire or SeqCst load) also sees the writer's
    // changes (and the end of the work a writer left). Stays raised while left work waits.
    writing: AtomicBool,
    /// Held by the writer; holds the work a writer left, if any.
    writer: Mutex<Option<Pending<T>>>,
    // Raised by a reader before it looks at `writing`: a SeqCst increment, or, on a slot this
    // thread holds alone with `asymmetric` set, a Relaxed store made visible by the writer's
    // heavy barrier. Lowered with Release, so a writer that sees the count drop to zero
    // (SeqCst load) also sees the reader finished reading.
    readers: [CachePadded<AtomicUsize>; READER_SLOTS],
    // Bit `i`: a reader on exclusive slot `i` has announced itself here with a plain store at
    // least once. Set (SeqCst `fetch_or`, a full barrier) before the first such announcement;
    // read by the writer (SeqCst) after raising `writing`: a writer that finds no bit but its
    // own skips the heavy barrier, as a reader whose bit it did not see sets it later in the
    // SeqCst order and then sees `writing` raised. Never cleared: a slot's next holder
    // inherits its bit (an extra barrier, never a missing one). So a lock read and written
    // by one thread (an open's replay, a setup loop) never pays for the barrier.
    light_readers: AtomicUsize,
    /// Whether writers run `membarrier` (fixed at construction, the same for every lock of the
    /// process unless a test says otherwise), so readers on exclusive slots may skip the locked
    /// increment.
    asymmetric: bool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out `&T` to many threads only while no `&mut T` exists (readers and a
// writer exclude each other through the handshake above), as `RwLock` does.
unsafe impl<T: Send + Sync> Sync for ShardLock<T> {}
// SAFETY: moving the lock moves the `T` it owns.
unsafe impl<T: Send> Send for ShardLock<T> {}

impl<T> ShardLock<T> {
    pub fn new(value: T) -> ShardLock<T> {
        ShardLock::with_barrier(value, heavy_barrier::available())
    }

    /// A lock whose writers run the heavy barrier (`asymmetric`, which needs
    /// `heavy_barrier::available()`) or not; tests build both kinds.
    fn with_barrier(value: T, asymmetric: bool) -> ShardLock<T> {
        debug_assert!(!asymmetric || heavy_barrier::available());
        ShardLock {
            writing: AtomicBool::new(false),
            writer: Mutex::new(None),
            readers: std::array::from_fn(|_| CachePadded::new(AtomicUsize::new(0))),
            light_readers: AtomicUsize::new(0),
            asymmetric,
            value: UnsafeCell::new(value),
        }
    }

    /// Always inlined, with the wait for a writer out of line: called (as the compiler chose
    /// for `#[inline]`), the hot-key admission path paid the call and its register saves, 19
    /// instructions of a `consume_into` (callgrind: 1,043 -> 1,024).
    #[inline(always)]
    pub fn read(&self) -> ReadGuard<'_, T> {
        let (index, exclusive) = reader_slot();
        let light = exclusive && self.asymmetric;
        if self.try_enter(index, light) {
            return self.guard(index, light);
        }
        self.read_after_writer(index, light)
    }

    /// `read` when a writer was in (or about to be): waits until it lets go of the writer
    /// mutex and tries again, as often as it takes.
    #[cold]
    #[inline(never)]
    fn read_after_writer(&self, index: usize, light: bool) -> ReadGuard<'_, T> {
        loop {
            // Wait until the writer lets go of the writer mutex. If readers are still kept
            // out, it may have left work: do it if no one did yet.
            drop(self.writer.lock());
            // Relaxed: only a hint; `settle` looks for left work under the writer mutex.
            if self.writing.load(Ordering::Relaxed) {
                self.settle();
            }
            if self.try_enter(index, light) {
                return self.guard(index, light);
            }
        }
    }

    /// The guard of a read `try_enter` let in on slot `index`.
    #[inline(always)]
    fn guard(&self, index: usize, light: bool) -> ReadGuard<'_, T> {
        ReadGuard {
            lock: self,
            slot: &self.readers[index],
            light,
            _this_thread: PhantomData,
        }
    }

    /// Announces a read on slot `index` and enters if no writer is in; otherwise takes the
    /// announcement back. `light`: the slot is this thread's alone and writers run the heavy
    /// barrier.
    #[inline]
    fn try_enter(&self, index: usize, light: bool) -> bool {
        let slot = &self.readers[index];
        if light {
            let bit = 1 << index;
            // Relaxed: only this slot's holders set its bit, and a holder sees its own
            // `fetch_or` and (through the claim's Acquire) its predecessors'.
            if self.light_readers.load(Ordering::Relaxed) & bit == 0 {
                self.light_readers.fetch_or(bit, Ordering::SeqCst);
                // A writer whose SeqCst load of `light_readers` missed the bit precedes the
                // `fetch_or`, so its SeqCst store of `writing` precedes this fence in the
                // SeqCst order, and the load of `writing` below sees it (the fence is what
                // makes that so in the language's model, not only on x86).
                fence(Ordering::SeqCst);
            }
            // Only this thread writes this slot (it holds it alone), so a load and a store
            // raise the count: a `mov`, not a locked instruction.
            let count = slot.load(Ordering::Relaxed);
            slot.store(count + 1, Ordering::Relaxed);
            // The light side of the asymmetric barrier: the compiler keeps the store before
            // the load below, and the writer's `membarrier` orders the two on the CPU (a core
            // running this thread runs a full barrier between the writer raising `writing`
            // and reading the slots).
            compiler_fence(Ordering::SeqCst);
            if !self.writing.load(Ordering::Acquire) {
                LIGHT_GUARDS.with(|guards| guards.set(guards.get() + 1));
                return true;
            }
            slot.store(count, Ordering::Release);
        } else {
            slot.fetch_add(1, Ordering::SeqCst);
            if !self.writing.load(Ordering::SeqCst) {
                return true;
            }
            slot.fetch_sub(1, Ordering::Release);
        }
        false
    }

    pub fn write(&self) -> WriteGuard<'_, T> {
        let raised = self.raise();
        self.barrier_after_raise();
        self.wait_for_readers(raised)
    }

    /// Write-locks every lock of `locks` in order, with one heavy barrier for all of them
    /// (a policy swap's and a checkpoint cut's lock of every shard).
    pub fn write_all<'a>(
        locks: impl IntoIterator<Item = &'a ShardLock<T>>,
    ) -> Vec<WriteGuard<'a, T>>
    where
        T: 'a,
    {
        let raised: Vec<Raised<'a, T>> = locks.into_iter().map(ShardLock::raise).collect();
        if raised
            .iter()
            .any(|raised| raised.guard.lock.asymmetric && raised.guard.lock.others_read_light())
        {
            heavy_barrier::run();
        }
        raised
            .into_iter()
            .map(|raised| raised.guard.lock.wait_for_readers(raised))
            .collect()
    }

    /// The first half of a write lock: the writer mutex taken, left work run, `writing`
    /// raised. Readers that come now back off; those already in are waited for by
    /// `wait_for_readers`, after the heavy barrier if the lock is asymmetric.
    fn raise(&self) -> Raised<'_, T> {
        let mut mutex = self.writer.lock();
        self.run_pending(&mut mutex);
        self.writing.store(true, Ordering::SeqCst);
        Raised {
            guard: WriteGuard {
                lock: self,
                leaving: false,
                _mutex: mutex,
            },
        }
    }

    /// Between raising `writing` and looking at the slots: the heavy barrier, if readers on
    /// exclusive slots rely on it.
    fn barrier_after_raise(&self) {
        if self.asymmetric && self.others_read_light() {
            heavy_barrier::run();
        }
    }

    /// Whether a thread other than this one may be reading with a plain-store announcement
    /// (see `light_readers`). Called with `writing` raised.
    fn others_read_light(&self) -> bool {
        // A thread that has not read yet holds no slot, and is not given one for writing: a
        // thread that only writes (an admin thread) leaves the fast slots to readers.
        let slot = SLOT.with(Cell::get);
        let mine = if slot != NO_SLOT && slot & EXCLUSIVE_FLAG != 0 {
            1 << (slot & !EXCLUSIVE_FLAG)
        } else {
            0
        };
        self.light_readers.load(Ordering::SeqCst) & !mine != 0
    }

    fn wait_for_readers<'a>(&'a self, raised: Raised<'a, T>) -> WriteGuard<'a, T> {
        debug_assert!(std::ptr::eq(raised.guard.lock, self));
        for slot in &self.readers {
            let mut spins = 0u32;
            while slot.load(Ordering::SeqCst) != 0 {
                if spins < WRITER_SPINS {
                    std::hint::spin_loop();
                    spins += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        }
        raised.guard
    }

    /// Runs the work a writer left, if it is still there; returns at once otherwise. After
    /// this, nothing left on the lock before the call is still waiting.
    #[cold]
    #[inline(never)]
    pub fn settle(&self) {
        self.run_pending(&mut self.writer.lock());
    }

    /// Whether a writer left work that has not run yet.
    #[cfg(test)]
    pub fn is_pending(&self) -> bool {
        self.writer.lock().is_some()
    }

    /// Runs the left work, if any (the writer mutex is held: `mutex` is its guard), then lets
    /// readers in.
    fn run_pending(&self, mutex: &mut MutexGuard<'_, Option<Pending<T>>>) {
        let Some(work) = mutex.take() else {
            return;
        };
        // Readers are let in however the work ends: a panic in it must not leave every later
        // reader spinning on `writing`.
        struct LetReadersIn<'a>(&'a AtomicBool);
        impl Drop for LetReadersIn<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _let_in = LetReadersIn(&self.writing);
        // SAFETY: `writing` stayed raised from the moment the writer that left the work had
        // waited out every reader, and the writer mutex is held: no reader is in and no
        // `&mut T` exists until `writing` drops.
        work(unsafe { &*self.value.get() });
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for ShardLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLock").finish_non_exhaustive()
    }
}

/// A write lock half taken (`ShardLock::raise`): `writing` raised, readers not yet waited for.
/// Dropped as it is (a panic in `write_all` before every lock was raised), its guard lowers
/// `writing` again, so readers are not kept out by a writer that is gone.
struct Raised<'a, T> {
    guard: WriteGuard<'a, T>,
}

/// Which exclusive slots a thread holds: bit `i` for slot `i`. Claimed with AcqRel, given back
/// with Release, so the next holder sees the last one's final (zero) counts.
static CLAIMED_SLOTS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's reader slot, `NO_SLOT` until its first read; `EXCLUSIVE_FLAG` marks a slot
    /// it holds alone. A const initializer and no destructor: readable to the thread's end,
    /// other thread-locals' destructors included.
    static SLOT: Cell<usize> = const { Cell::new(NO_SLOT) };
    /// Gives the exclusive slot back when the thread ends.
    static HELD: HeldSlot = const { HeldSlot(Cell::new(NO_SLOT)) };
    /// This thread's read guards on its exclusive slot not yet dropped. A guard kept in a
    /// thread-local can outlive `HELD` (destructors run in no order we choose): while one is
    /// out, the slot is not given back, since its drop lowers the count with a plain store.
    static LIGHT_GUARDS: Cell<usize> = const { Cell::new(0) };
}

const NO_SLOT: usize = usize::MAX;
const EXCLUSIVE_FLAG: usize = 1 << (usize::BITS - 2);

struct HeldSlot(Cell<usize>);

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let index = self.0.get();
        if index == NO_SLOT {
            return;
        }
        // Anything this thread reads from now on (another thread-local's destructor) goes
        // through a shared slot: the exclusive one may have a new holder.
        SLOT.with(|slot| slot.set(shared_slot(index)));
        if LIGHT_GUARDS.with(Cell::get) > 0 {
            // A guard still to be dropped (kept in another thread-local) lowers the slot with
            // a plain store: it stays this thread's for good, never shared with a new holder.
            return;
        }
        // Release: the next holder sees this thread's last store to the slot (zero: no read
        // guard on it is left).
        CLAIMED_SLOTS.fetch_and(!(1 << index), Ordering::Release);
    }
}

/// The shared slot for a thread numbered `n`.
fn shared_slot(n: usize) -> usize {
    EXCLUSIVE_SLOTS + n % (READER_SLOTS - EXCLUSIVE_SLOTS)
}

/// This thread's reader slot and whether it holds it alone.
#[inline]
fn reader_slot() -> (usize, bool) {
    let slot = SLOT.with(Cell::get);
    if slot != NO_SLOT {
        return (slot & !EXCLUSIVE_FLAG, slot & EXCLUSIVE_FLAG != 0);
    }
    first_reader_slot()
}

/// Claims a free exclusive slot for this thread, or assigns it a shared one (round-robin) if
/// none is free or the thread is ending.
#[cold]
#[inline(never)]
fn first_reader_slot() -> (usize, bool) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let mut claimed = CLAIMED_SLOTS.load(Ordering::Relaxed);
    let exclusive = loop {
        let free = !claimed & ((1 << EXCLUSIVE_SLOTS) - 1);
        if free == 0 {
            break None;
        }
        let index = free.trailing_zeros() as usize;
        // AcqRel: Acquire pairs with the previous holder's Release (its last store to the
        // slot); a thread's claim is its own business otherwise.
        match CLAIMED_SLOTS.compare_exchange_weak(
            claimed,
            claimed | (1 << index),
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => break Some(index),
            Err(now) => claimed = now,
        }
    };
    if let Some(index) = exclusive {
        // Held until the thread ends; if its thread-locals are already being torn down there
        // is no end to wait for: give the slot back at once and share.
        if HELD.try_with(|held| held.0.set(index)).is_ok() {
            // The slot's bit in a lock's `light_readers` may have been set by an earlier
            // holder: that `fetch_or` happens before this claim, so it precedes this fence in
            // the SeqCst order, and so does a writer's store of `writing` whose load missed the
            // bit; this thread's loads of `writing` come after the fence and see it.
            fence(Ordering::SeqCst);
            SLOT.with(|slot| slot.set(index | EXCLUSIVE_FLAG));
            return (index, true);
        }
        CLAIMED_SLOTS.fetch_and(!(1 << index), Ordering::Release);
    }
    // Relaxed: only spreads threads over slots; any value is correct.
    let index = shared_slot(NEXT.fetch_add(1, Ordering::Relaxed));
    SLOT.with(|slot| slot.set(index));
    (index, false)
}

/// The writer's side of the asymmetric barrier: `membarrier(2)` on Linux.
mod heavy_barrier {
    use std::sync::OnceLock;

    #[cfg(target_os = "linux")]
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    #[cfg(target_os = "linux")]
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    #[cfg(target_os = "linux")]
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    /// Whether the heavy barrier works in this process: registered once, on first ask. A
    /// kernel older than 4.14 or a sandbox that forbids the call says no; every lock then
    /// takes the locked increment.
    pub fn available() -> bool {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(register)
    }

    #[cfg(target_os = "linux")]
    fn register() -> bool {
        membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
    }

    #[cfg(not(target_os = "linux"))]
    fn register() -> bool {
        false
    }

    /// Runs a full memory barrier on every core that runs a thread of this process. Only
    /// called on locks built after `available()` said yes.
    #[cfg(target_os = "linux")]
    pub fn run() {
        if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
            return;
        }
        // A child forked after the registration may not inherit it: register again. Failing
        // that, the global command (no registration; slower, as it waits for every CPU).
        if (register() && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED))
            || membarrier(MEMBARRIER_CMD_GLOBAL)
        {
            return;
        }
        // Readers on exclusive slots could be missed: carrying on would let a writer change
        // what they read. The message is best effort (`eprintln!` panics when stderr cannot be
        // written, and a panic here would unwind instead of stopping).
        let error = std::io::Error::last_os_error();
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!(
                "tally: membarrier failed ({error}); aborting rather than racing readers\n"
            ),
        );
        std::process::abort();
    }

    #[cfg(target_os = "linux")]
    fn membarrier(command: libc::c_int) -> bool {
        // SAFETY: membarrier takes integers and touches no memory of ours.
        unsafe { libc::syscall(libc::SYS_membarrier, command, 0, 0) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn run() {
        unreachable!("no lock is asymmetric without membarrier");
    }
}

pub struct ReadGuard<'a, T> {
    lock: &'a ShardLock<T>,
    slot: &'a AtomicUsize,
    /// Raised with a plain store on a slot this thread holds alone; lowered the same way.
    light: bool,
    /// Not `Send`: a light guard's drop is a plain load and store on a slot only this thread
    /// writes, so it must run on this thread.
    _this_thread: PhantomData<*const ()>,
}

// SAFETY: a shared guard only hands out `&T` (`Deref`), which `T: Sync` lets other threads
// hold; the count is lowered only by the guard's drop, on the thread that raised it.
unsafe impl<T: Send + Sync> Sync for ReadGuard<'_, T> {}

impl<T> Deref for ReadGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: a read guard exists only while `writing` was clear after this thread's count
        // was raised, so no writer holds `&mut T` until the count drops in `drop`.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> Drop for ReadGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        if self.light {
            // Only this thread writes the slot (see `ShardLock::read`).
            let count = self.slot.load(Ordering::Relaxed);
            debug_assert!(count > 0);
            self.slot.store(count - 1, Ordering::Release);
            LIGHT_GUARDS.with(|guards| guards.set(guards.get() - 1));
        } else {
            self.slot.fetch_sub(1, Ordering::Release);
        }
    }
}

pub struct WriteGuard<'a, T> {
    lock: &'a ShardLock<T>,
    /// Set by `leave`: readers stay out until the left work has run.
    leaving: bool,
    _mutex: MutexGuard<'a, Option<Pending<T>>>,
}

impl<T> WriteGuard<'_, T> {
    /// Lets go of the lock, leaving `work` to run on the value as it is now before anyone
    /// reads or writes it again: the next reader or writer runs it (waiting readers included),
    /// or `ShardLock::settle` does. The value cannot change until it has run.
    pub fn leave(mut self, work: Pending<T>) {
        debug_assert!(self._mutex.is_none(), "work was already left");
        *self._mutex = Some(work);
        self.leaving = true;
    }
}

impl<T> Deref for WriteGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the writer excludes every reader and every other writer (see `write`).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for WriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for WriteGuard<'_, T> {
    fn drop(&mut self) {
        // Before the mutex (a field, dropped after this) lets the next writer or the waiting
        // readers in. Left work keeps readers out until it has run.
        if !self.leaving {
            self.lock.writing.store(false, Ordering::Release);
        }
    }
}

/// A mutex a holder can leave work on (`LeavableGuard::leave`), run on the value by the next
/// thread to lock it (or by `settle`) before that thread sees it: the request-id shards and the
/// registry, which a checkpoint's cut locks at one instant and copies afterwards, as it does
/// the key shards.
pub struct LeavableMutex<T> {
    inner: Mutex<Leavable<T>>,
}

struct Leavable<T> {
    value: T,
    left: Option<Pending<T>>,
}

impl<T> LeavableMutex<T> {
    pub fn new(value: T) -> LeavableMutex<T> {
        LeavableMutex {
            inner: Mutex::new(Leavable { value, left: None }),
        }
    }

    /// Locks, running the work left on the value first if there is any.
    #[inline]
    pub fn lock(&self) -> LeavableGuard<'_, T> {
        let mut inner = self.inner.lock();
        if inner.left.is_some() {
            run_left(&mut inner);
        }
        LeavableGuard(inner)
    }

    /// Runs the work left on the value, if it is still there.
    pub fn settle(&self) {
        drop(self.lock());
    }
}

/// The work left on a `LeavableMutex`'s value, run by whoever locked it first.
#[cold]
#[inline(never)]
fn run_left<T>(inner: &mut Leavable<T>) {
    if let Some(work) = inner.left.take() {
        work(&inner.value);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for LeavableMutex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeavableMutex").finish_non_exhaustive()
    }
}

pub struct LeavableGuard<'a, T>(MutexGuard<'a, Leavable<T>>);

impl<T> LeavableGuard<'_, T> {
    /// Unlocks, leaving `work` to run on the value as it is now before anyone sees it again.
    pub fn leave(mut self, work: Pending<T>) {
        debug_assert!(self.0.left.is_none(), "work was already left");
        self.0.left = Some(work);
    }
}

impl<T> Deref for LeavableGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0.value
    }
}

impl<T> DerefMut for LeavableGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Held by the tests here that start many reader threads, so one does not take every
    /// exclusive slot while another counts them.
    static MANY_THREADS: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

    /// Readers on `readers` threads (the first `EXCLUSIVE_SLOTS` of a fresh process can hold
    /// slots alone; more share) against one writer, on locks of both kinds; returns how many
    /// reads saw a write in progress.
    fn torn_reads(asymmetric: bool, readers: usize, reads: usize, writes: u64) -> usize {
        let _alone = MANY_THREADS.lock();
        // The writer keeps two fields equal only while it holds the lock; a reader that ever
        // sees them differ saw a write in progress.
        let lock = ShardLock::with_barrier((0u64, 0u64), asymmetric);
        let torn = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..readers {
                scope.spawn(|| {
                    for _ in 0..reads {
                        let pair = lock.read();
                        if pair.0 != pair.1 {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            scope.spawn(|| {
                for step in 1..=writes {
                    let mut pair = lock.write();
                    pair.0 = step;
                    std::hint::spin_loop();
                    pair.1 = step;
                }
            });
        });
        assert_eq!(*lock.read(), (writes, writes));
        torn.load(Ordering::Relaxed)
    }

    #[test]
    fn readers_and_writers_never_overlap() {
        assert_eq!(torn_reads(false, 3, 20_000, 2_000), 0);
        if heavy_barrier::available() {
            assert_eq!(torn_reads(true, 3, 20_000, 2_000), 0);
        }
    }

    /// The store-buffering litmus test on the handshake itself: a reader announcing and a
    /// writer raising `writing` at the same instant, `rounds` times in lockstep. Returns the
    /// rounds in which both got in (the reader saw no writer, the writer saw no reader).
    fn handshakes_both_won(asymmetric: bool, rounds: usize) -> usize {
        let _alone = MANY_THREADS.lock();
        let lock = ShardLock::with_barrier((), asymmetric);
        // Round `r` starts once both threads raised their arrival to `r`; the reader's
        // verdict (1 in, 2 out) is reset by the writer before it arrives at the next round;
        // `released` lets an entered reader leave, `left` says it did.
        let (reader_at, writer_at) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (verdict, released, left) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let spin_until = |value: &AtomicUsize, at_least: usize| {
            while value.load(Ordering::SeqCst) < at_least {
                std::hint::spin_loop();
            }
        };
        let mut both = 0;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let (index, exclusive) = reader_slot();
                let slot = &lock.readers[index];
                let light = exclusive && lock.asymmetric;
                for round in 1..=rounds {
                    reader_at.store(round, Ordering::SeqCst);
                    spin_until(&writer_at, round);
                    // The writer has more to do before it raises `writing` (the writer mutex):
                    // start a little later each round, over a spread of delays.
                    for step in 0..round % 251 {
                        std::hint::black_box(step);
                    }
                    let entered = lock.try_enter(index, light);
                    verdict.store(if entered { 1 } else { 2 }, Ordering::SeqCst);
                    spin_until(&released, round);
                    if entered {
                        drop(ReadGuard {
                            lock: &lock,
                            slot,
                            light,
                            _this_thread: PhantomData,
                        });
                    }
                    left.store(round, Ordering::SeqCst);
                }
            });
            for round in 1..=rounds {
                verdict.store(0, Ordering::SeqCst);
                writer_at.store(round, Ordering::SeqCst);
                spin_until(&reader_at, round);
                let raised = lock.raise();
                lock.barrier_after_raise();
                let readers_in = lock
                    .readers
                    .iter()
                    .any(|slot| slot.load(Ordering::SeqCst) != 0);
                spin_until(&verdict, 1);
                if !readers_in && verdict.load(Ordering::SeqCst) == 1 {
                    both += 1;
                }
                released.store(round, Ordering::SeqCst);
                spin_until(&left, round);
                lock.writing.store(false, Ordering::Release);
                drop(raised);
            }
        });
        both
    }

    /// A smoke test of the handshake's bookkeeping more than a proof of its ordering: with the
    /// writer's `membarrier` removed on purpose, 20,000 rounds caught the missing barrier in
    /// 1 run of 3 on this machine (x86 reorders a store after a later load only in a window of
    /// a few cycles), and these 2,000 rounds would rarely. The ordering rests on the argument
    /// in `try_enter` and `others_read_light`.
    #[test]
    fn a_reader_and_a_writer_meeting_never_both_get_in() {
        assert_eq!(handshakes_both_won(false, 2_000), 0);
        if heavy_barrier::available() {
            assert_eq!(handshakes_both_won(true, 2_000), 0);
        }
    }

    #[test]
    fn readers_on_exclusive_and_shared_slots_mix_on_one_lock() {
        // More reader threads than exclusive slots: some announce with a plain store, the
        // rest with a locked increment, several per shared slot.
        if heavy_barrier::available() {
            assert_eq!(torn_reads(true, EXCLUSIVE_SLOTS + 6, 3_000, 1_000), 0);
        }
        assert_eq!(torn_reads(false, EXCLUSIVE_SLOTS + 6, 3_000, 1_000), 0);
    }

    #[test]
    fn a_thread_gives_its_exclusive_slot_back_when_it_ends() {
        // Threads that read once and end, far more than there are exclusive slots. Were slots
        // never given back, at most `EXCLUSIVE_SLOTS` claims could succeed in this process
        // (other tests' threads included).
        let _alone = MANY_THREADS.lock();
        let lock = ShardLock::new(0u32);
        let mut exclusive = 0;
        for _ in 0..4 * EXCLUSIVE_SLOTS {
            let (slot, alone) = std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        drop(lock.read());
                        reader_slot()
                    })
                    .join()
                    .expect("the reader ends")
            });
            if alone {
                assert!(slot < EXCLUSIVE_SLOTS);
                exclusive += 1;
            } else {
                assert!((EXCLUSIVE_SLOTS..READER_SLOTS).contains(&slot));
            }
        }
        assert!(
            exclusive > EXCLUSIVE_SLOTS,
            "slots given back at thread end are claimed again: {exclusive} of {}",
            4 * EXCLUSIVE_SLOTS
        );
        for slot in &lock.readers {
            assert_eq!(slot.load(Ordering::SeqCst), 0, "no count left behind");
        }
    }

    /// Whether `T` is `Send`, on stable Rust: the inherent constant applies only when the
    /// bound holds; otherwise the blanket trait's default answers.
    struct SendProbe<T: ?Sized>(std::marker::PhantomData<T>);
    #[allow(dead_code)] // one of the two constants answers, whichever it is
    trait NotSend {
        const SEND: bool = false;
    }
    impl<T: ?Sized> NotSend for SendProbe<T> {}
    #[allow(dead_code)]
    impl<T: ?Sized + Send> SendProbe<T> {
        const SEND: bool = true;
    }

    /// A read guard on an exclusive slot lowers the count with a plain load and store, which
    /// is right only on the thread that holds the slot. Were the guard `Send`, safe code (this
    /// module is public) could drop it on another thread while the holder raises the same
    /// slot: an update lost, and the count either stuck above zero (every writer waits for
    /// ever) or at zero with a reader inside (a writer changes what it reads). A shared
    /// reference to a guard only reads the value, so `Sync` stays.
    #[test]
    fn a_read_guard_cannot_leave_its_thread_but_can_be_shared() {
        let send = std::hint::black_box(SendProbe::<ReadGuard<'static, u64>>::SEND);
        assert!(
            !send,
            "a read guard can be sent to another thread and dropped there"
        );
        let lock = ShardLock::new(1u64);
        let guard = lock.read();
        std::thread::scope(|scope| {
            scope.spawn(|| assert_eq!(*guard, 1));
        });
    }

    /// A read guard kept in a thread-local (safe code, on a lock that lives for ever) is
    /// dropped by that thread-local's destructor, which may run after the one that gives the
    /// thread's exclusive slot back: the guard then lowered, with a plain store, a slot another
    /// thread may already hold and raise with plain stores of its own.
    #[test]
    fn a_slot_is_not_given_back_while_a_guard_on_it_is_still_to_be_dropped() {
        static LOCK: std::sync::LazyLock<ShardLock<u64>> =
            std::sync::LazyLock::new(|| ShardLock::new(0));
        /// Whether the guard's slot was still this thread's when the guard was dropped.
        static HELD_AT_DROP: parking_lot::Mutex<Vec<bool>> = parking_lot::Mutex::new(Vec::new());
        struct Keeper(Option<ReadGuard<'static, u64>>);
        impl Drop for Keeper {
            fn drop(&mut self) {
                if let Some(guard) = self.0.take() {
                    let index = (0..READER_SLOTS)
                        .find(|&slot| std::ptr::eq(&*LOCK.readers[slot], guard.slot))
                        .expect("a slot of the lock");
                    let held = CLAIMED_SLOTS.load(Ordering::SeqCst) & (1 << index) != 0;
                    HELD_AT_DROP.lock().push(!guard.light || held);
                }
            }
        }
        thread_local! {
            static KEPT: std::cell::RefCell<Keeper> = const { std::cell::RefCell::new(Keeper(None)) };
        }
        let _alone = MANY_THREADS.lock();
        // Two threads: each leaves its slot claimed for good once this is fixed.
        for _ in 0..2 {
            std::thread::spawn(|| {
                // The keeper's destructor is registered first, the slot's on the first read.
                KEPT.with(|kept| kept.borrow().0.is_none());
                let guard = LOCK.read();
                KEPT.with(|kept| kept.borrow_mut().0 = Some(guard));
            })
            .join()
            .expect("the thread ends");
        }
        let held = HELD_AT_DROP.lock().clone();
        assert_eq!(held.len(), 2);
        assert!(
            held.iter().all(|&held| held),
            "a guard was dropped after its exclusive slot was given back: {held:?}"
        );
        assert_eq!(*LOCK.write(), 0, "every count came back down");
    }

    #[test]
    fn a_thread_that_only_writes_claims_no_reader_slot() {
        let lock = ShardLock::new(0u32);
        let slot = std::thread::spawn(move || {
            *lock.write() += 1;
            SLOT.with(Cell::get)
        })
        .join()
        .expect("the writer ends");
        assert_eq!(slot, NO_SLOT);
    }

    #[test]
    fn nested_reads_on_an_exclusive_slot_count_up_and_down() {
        let lock = ShardLock::new(5u32);
        let (outer, inner) = (lock.read(), lock.read());
        let (slot, _) = reader_slot();
        assert_eq!(lock.readers[slot].load(Ordering::SeqCst), 2);
        drop(inner);
        assert_eq!(lock.readers[slot].load(Ordering::SeqCst), 1);
        assert_eq!(*outer, 5);
        drop(outer);
        assert_eq!(lock.readers[slot].load(Ordering::SeqCst), 0);
        *lock.write() += 1;
        assert_eq!(*lock.read(), 6);
    }

    #[test]
    fn write_all_waits_for_a_reader_of_any_lock_and_locks_them_all() {
        let locks: Vec<ShardLock<Vec<u32>>> = (0..4).map(|_| ShardLock::new(Vec::new())).collect();
        let reading = locks[2].read();
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                for mut guard in ShardLock::write_all(&locks) {
                    guard.push(1);
                }
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(reading.is_empty(), "the writer must wait for the reader");
            drop(reading);
            writer.join().expect("the writer finishes");
        });
        for lock in &locks {
            assert_eq!(*lock.read(), vec![1]);
        }
    }

    /// `write_all` raises every lock before it waits for any reader; work a cut left on a
    /// later lock runs while the earlier ones are raised. Were that work to panic, the locks
    /// already raised kept `writing` up with no writer and no left work: every reader of them
    /// waited on the free writer mutex, found nothing to run and tried again, for ever.
    #[test]
    fn write_all_lets_readers_of_every_lock_back_in_when_left_work_on_one_panics() {
        let locks: Vec<ShardLock<u32>> = (0..3).map(|_| ShardLock::new(7)).collect();
        locks[1]
            .write()
            .leave(Box::new(|_: &u32| panic!("a copy that fails")));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(ShardLock::write_all(&locks));
        }));
        assert!(unwound.is_err());
        for (index, lock) in locks.iter().enumerate() {
            assert!(
                !lock.writing.load(Ordering::SeqCst),
                "lock {index} keeps readers out with no writer in"
            );
            assert_eq!(*lock.read(), 7);
        }
        // And they can all be written again.
        for mut guard in ShardLock::write_all(&locks) {
            *guard += 1;
        }
        assert!(locks.iter().all(|lock| *lock.read() == 8));
    }

    #[test]
    fn left_work_runs_once_on_the_value_as_the_writer_left_it_before_anyone_changes_it() {
        let lock = Arc::new(ShardLock::new(vec![1u32]));
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut guard = lock.write();
        guard.push(2);
        let record = Arc::clone(&seen);
        guard.leave(Box::new(move |value: &Vec<u32>| {
            record.lock().push(value.clone());
        }));
        assert!(lock.is_pending());
        // Readers and a writer race to be first; whoever is, runs the work first.
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| assert!(lock.read().len() >= 2));
            }
            scope.spawn(|| lock.write().push(3));
        });
        assert!(!lock.is_pending());
        lock.settle();
        assert_eq!(
            *seen.lock(),
            vec![vec![1, 2]],
            "run once, before the push of 3"
        );
        assert_eq!(*lock.read(), vec![1, 2, 3]);
    }

    #[test]
    fn settle_runs_left_work_nobody_came_for_and_lets_readers_in_after_a_panic_in_it() {
        let lock = ShardLock::new(7u32);
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&ran);
        lock.write().leave(Box::new(move |value: &u32| {
            counted.fetch_add(*value as usize, Ordering::Relaxed);
        }));
        lock.settle();
        lock.settle();
        assert_eq!(ran.load(Ordering::Relaxed), 7, "run once, on the value");
        let guard = lock.write();
        guard.leave(Box::new(|_: &u32| panic!("a copy that fails")));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lock.settle()));
        assert!(unwound.is_err());
        assert!(!lock.is_pending());
        assert_eq!(*lock.read(), 7, "readers get in after the failed work");
    }

    #[test]
    fn a_leavable_mutex_runs_left_work_once_on_the_value_as_left_before_the_next_holder() {
        let mutex = LeavableMutex::new(vec![1u32]);
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let mut guard = mutex.lock();
        guard.push(2);
        guard.leave(Box::new(move |value: &Vec<u32>| {
            record.lock().push(value.clone())
        }));
        std::thread::scope(|scope| {
            for extra in 3..6u32 {
                let mutex = &mutex;
                scope.spawn(move || mutex.lock().push(extra));
            }
        });
        mutex.settle();
        assert_eq!(*seen.lock(), vec![vec![1, 2]]);
        assert_eq!(mutex.lock().len(), 5);
    }

    #[test]
    fn a_leavable_mutex_whose_left_work_panics_is_still_usable_and_the_work_gone() {
        let mutex = LeavableMutex::new(7u32);
        mutex
            .lock()
            .leave(Box::new(|_: &u32| panic!("a copy that fails")));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mutex.settle()));
        assert!(unwound.is_err());
        // Not run again, not poisoned, the value as it was.
        *mutex.lock() += 1;
        mutex.settle();
        assert_eq!(*mutex.lock(), 8);
    }

    #[test]
    fn a_writer_waits_for_a_reader_and_sees_the_world_after_it() {
        let lock = ShardLock::new(Vec::<u32>::new());
        let reading = lock.read();
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                lock.write().push(1);
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(reading.is_empty(), "the writer must wait for the reader");
            drop(reading);
            writer.join().expect("the writer finishes");
        });
        assert_eq!(*lock.read(), vec![1]);
    }
}
