//! The read-mostly lock around each key shard: read on every admission, written only by admin
//! calls (keys created, seats changed, a policy swapped, a checkpoint cut).
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

pub struct ShardLock<T> {
    // SeqCst, paired with the readers' SeqCst increment: a Dekker handshake, so either the
    // reader sees `writing` and backs off, or the writer sees the reader's count and waits.
    // Cleared with Release so a reader that sees it clear also sees the writer's changes.
    writing: AtomicBool,
    writer: Mutex<()>,
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
            writer: Mutex::new(()),
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
            // A writer is in (or about to be): wait until it lets go of the writer mutex.
            drop(self.writer.lock());
        }
    }

    pub fn write(&self) -> WriteGuard<'_, T> {
        let mutex = self.writer.lock();
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
            _mutex: mutex,
        }
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
    _mutex: MutexGuard<'a, ()>,
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
        // readers in.
        self.lock.writing.store(false, Ordering::Release);
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
