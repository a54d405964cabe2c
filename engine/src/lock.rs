//! The read-mostly lock around each key shard: read on every admission, written only by admin
//! calls (keys created, seats changed, a policy swapped, a checkpoint cut).
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
//! As with `parking_lot::RwLock`, a thread must not take a read lock it already holds while a
//! writer may be waiting: the writer waits for the first read, the second waits for the writer.

use std::cell::{Cell, UnsafeCell};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};

/// Reader counters per lock: threads beyond this share slots (correct, only slower).
pub const READER_SLOTS: usize = 8;
/// Spins a writer makes waiting for readers before it starts yielding its core.
const WRITER_SPINS: u32 = 64;

const _: () = assert!(READER_SLOTS.is_power_of_two());

/// Work a writer left on the value (`WriteGuard::leave`), run by the next thread to take the
/// writer mutex, with the value as the writer left it.
pub type Pending<T> = Box<dyn FnOnce(&T) + Send + Sync>;

pub struct ShardLock<T> {
    // SeqCst, paired with the readers' SeqCst increment: a Dekker handshake, so either the
    // reader sees `writing` and backs off, or the writer sees the reader's count and waits.
    // Cleared with Release so a reader that sees it clear also sees the writer's changes (and
    // the end of the work a writer left). Stays raised while left work waits.
    writing: AtomicBool,
    /// Held by the writer; holds the work a writer left, if any.
    writer: Mutex<Option<Pending<T>>>,
    // SeqCst increment (see `writing`); Release decrement, so a writer that sees the count
    // drop to zero (SeqCst load) also sees the reader finished reading.
    readers: [CachePadded<AtomicUsize>; READER_SLOTS],
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out `&T` to many threads only while no `&mut T` exists (readers and a
// writer exclude each other through the handshake above), as `RwLock` does.
unsafe impl<T: Send + Sync> Sync for ShardLock<T> {}
// SAFETY: moving the lock moves the `T` it owns.
unsafe impl<T: Send> Send for ShardLock<T> {}

impl<T> ShardLock<T> {
    pub fn new(value: T) -> ShardLock<T> {
        ShardLock {
            writing: AtomicBool::new(false),
            writer: Mutex::new(None),
            readers: std::array::from_fn(|_| CachePadded::new(AtomicUsize::new(0))),
            value: UnsafeCell::new(value),
        }
    }

    #[inline]
    pub fn read(&self) -> ReadGuard<'_, T> {
        let slot = &self.readers[reader_slot()];
        loop {
            slot.fetch_add(1, Ordering::SeqCst);
            if !self.writing.load(Ordering::SeqCst) {
                return ReadGuard { lock: self, slot };
            }
            slot.fetch_sub(1, Ordering::Release);
            // A writer is in (or about to be): wait until it lets go of the writer mutex. If
            // readers are still kept out, it may have left work: do it if no one did yet.
            drop(self.writer.lock());
            // Relaxed: only a hint; `settle` looks for left work under the writer mutex.
            if self.writing.load(Ordering::Relaxed) {
                self.settle();
            }
        }
    }

    pub fn write(&self) -> WriteGuard<'_, T> {
        let mut mutex = self.writer.lock();
        self.run_pending(&mut mutex);
        self.writing.store(true, Ordering::SeqCst);
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
        WriteGuard {
            lock: self,
            leaving: false,
            _mutex: mutex,
        }
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

/// This thread's reader slot, assigned round-robin on first use.
#[inline]
fn reader_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SLOT.with(|slot| {
        let mut index = slot.get();
        if index == usize::MAX {
            // Relaxed: only spreads threads over slots; any value is correct.
            index = NEXT.fetch_add(1, Ordering::Relaxed) & (READER_SLOTS - 1);
            slot.set(index);
        }
        index
    })
}

pub struct ReadGuard<'a, T> {
    lock: &'a ShardLock<T>,
    slot: &'a AtomicUsize,
}

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
        self.slot.fetch_sub(1, Ordering::Release);
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

    #[test]
    fn readers_and_writers_never_overlap() {
        // The writer keeps two fields equal only while it holds the lock; a reader that ever
        // sees them differ saw a write in progress.
        let lock = Arc::new(ShardLock::new((0u64, 0u64)));
        let torn = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for _ in 0..20_000 {
                        let pair = lock.read();
                        if pair.0 != pair.1 {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            scope.spawn(|| {
                for step in 1..=2_000u64 {
                    let mut pair = lock.write();
                    pair.0 = step;
                    std::hint::spin_loop();
                    pair.1 = step;
                }
            });
        });
        assert_eq!(torn.load(Ordering::Relaxed), 0);
        assert_eq!(*lock.read(), (2_000, 2_000));
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
