//! Handles: the opaque C types and the Rust values behind them. One trait ties each C type to
//! its Rust type, so no function casts a bare pointer itself.
//!
//! The engine handle is a heap object that `tally_engine_close` never frees: close marks it
//! closed (waiting for calls already inside it) and closes the engine; `tally_engine_free`
//! frees the memory. So a call racing a close, a second close, and any call after close are
//! all safe and answer `TALLY_CLOSED`; only a call after free (or a double free) is undefined,
//! as with any C API.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use ::tally_engine::{Engine, ManualClock, Policy};
use crossbeam_utils::sync::ShardedLock;

use crate::status::{tally_status, Failure};

/// A C type that stands for a Rust value owned as a `Box`.
pub(crate) trait Castable {
    type RustType;
    /// The handle's name in error messages ("engine", "submission").
    const NAME: &'static str;
}

/// Moves `value` to the heap and hands its address to C as `*mut C`.
pub(crate) fn to_boxed_ptr<C: Castable>(value: C::RustType) -> *mut C {
    Box::into_raw(Box::new(value)).cast()
}

/// Borrows the Rust value behind a handle; NULL is `TALLY_NULL_POINTER`.
pub(crate) fn try_ref<'a, C: Castable>(ptr: *const C) -> Result<&'a C::RustType, Failure> {
    if ptr.is_null() {
        return Err(Failure::new(
            tally_status::TALLY_NULL_POINTER,
            format!("{}: the handle is NULL", C::NAME),
        ));
    }
    // SAFETY: non-NULL handles come from `to_boxed_ptr` of the same `C` and stay valid until
    // `free_boxed` (the header makes using a handle after `_free` the caller's error).
    Ok(unsafe { &*ptr.cast::<C::RustType>() })
}

/// Borrows the Rust value behind a handle to change it; NULL is `TALLY_NULL_POINTER`.
pub(crate) fn try_mut<'a, C: Castable>(ptr: *mut C) -> Result<&'a mut C::RustType, Failure> {
    if ptr.is_null() {
        return Err(Failure::new(
            tally_status::TALLY_NULL_POINTER,
            format!("{}: the handle is NULL", C::NAME),
        ));
    }
    // SAFETY: as for `try_ref`; in addition, the header forbids using a handle that is changed
    // (a `tally_options` being set) from another thread at the same time, so this borrow is
    // the only one for the duration of the call.
    Ok(unsafe { &mut *ptr.cast::<C::RustType>() })
}

/// Takes back ownership of a value from `to_boxed_ptr`; `None` for NULL.
pub(crate) fn take_boxed<C: Castable>(ptr: *mut C) -> Option<Box<C::RustType>> {
    // SAFETY: `ptr` came from `to_boxed_ptr` and, as the header says, is given up once and not
    // used by any other thread from now on.
    (!ptr.is_null()).then(|| unsafe { Box::from_raw(ptr.cast::<C::RustType>()) })
}

/// Takes back and drops a value from `to_boxed_ptr`; NULL is a no-op.
pub(crate) fn free_boxed<C: Castable>(ptr: *mut C) {
    drop(take_boxed(ptr));
}

/// An engine. Opaque: created by `tally_engine_open` or `tally_engine_open_in_memory`, closed
/// by `tally_engine_close`, freed by `tally_engine_free`. Safe to use from many threads at
/// once, including a close racing other calls.
#[allow(non_camel_case_types)]
pub struct tally_engine {
    _private: [u8; 0],
}

impl Castable for tally_engine {
    type RustType = EngineHandle;
    const NAME: &'static str = "engine";
}

/// What an open handle holds.
pub(crate) struct Open {
    pub engine: Engine,
    /// The engine's current policy, for naming the plans and limits of decisions without the
    /// engine's policy lock on the hot path. Every swap goes through this handle and holds it
    /// exclusively, so it is always the policy the engine decides with.
    pub policy: Arc<Policy>,
    /// The engine's clock when it is its own (`tally_options_set_manual_clock`), for
    /// `tally_engine_set_clock` to move; `None`: the system clock.
    pub manual_clock: Option<Arc<ManualClock>>,
}

pub(crate) struct EngineHandle {
    /// `None` once closed. A sharded lock: a call read-locks only its thread's shard, so
    /// threads deciding at once do not contend on one cache line; close and policy swaps
    /// take it for writing (all shards) and so wait for the calls inside.
    state: ShardedLock<Option<Open>>,
    /// Set when a call panicked inside the engine: its state may be half-changed.
    poisoned: AtomicBool,
    // Release by a close that succeeded, before the calls waiting on the state see it closed /
    // Acquire by `complete` after: the engine's `instance_id` (0: no such close). That close
    // flushed every event the engine had queued, so its submissions' decisions stand.
    closed_cleanly: AtomicU64,
}

// Many threads share one handle: it must be `Send + Sync`.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<EngineHandle>();
};

/// Sets the poisoned flag if dropped while its thread is panicking.
struct PoisonOnPanic<'a>(&'a AtomicBool);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

fn closed() -> Failure {
    Failure::new(
        tally_status::TALLY_CLOSED,
        "engine: the handle was closed; open a new engine",
    )
}

impl EngineHandle {
    pub fn new(engine: Engine, manual_clock: Option<Arc<ManualClock>>) -> EngineHandle {
        let policy = engine.policy();
        EngineHandle {
            state: ShardedLock::new(Some(Open {
                engine,
                policy,
                manual_clock,
            })),
            poisoned: AtomicBool::new(false),
            closed_cleanly: AtomicU64::new(0),
        }
    }

    fn check_poisoned(&self) -> Result<(), Failure> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Failure::new(
                tally_status::TALLY_POISONED,
                "engine: an earlier call panicked; close the handle and open the database again",
            ));
        }
        Ok(())
    }

    /// Runs `f` on the open engine (many threads at once); `TALLY_CLOSED` once closed.
    pub fn with<R>(&self, f: impl FnOnce(&Open) -> Result<R, Failure>) -> Result<R, Failure> {
        self.check_poisoned()?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let open = state.as_ref().ok_or_else(closed)?;
        let _poison = PoisonOnPanic(&self.poisoned);
        f(open)
    }

    /// Runs `f` with no other call inside the handle (a policy swap).
    pub fn with_exclusive<R>(
        &self,
        f: impl FnOnce(&mut Open) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        self.check_poisoned()?;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let open = state.as_mut().ok_or_else(closed)?;
        let _poison = PoisonOnPanic(&self.poisoned);
        f(open)
    }

    /// Waits for the calls inside, marks the handle closed and closes the engine (checkpoint,
    /// flush). The handle is closed even when closing the engine fails. Calls arriving
    /// meanwhile wait for the close to end (the state stays locked), so a `complete` that
    /// finds the handle closed knows whether the close succeeded (`closed_cleanly`).
    pub fn close(&self) -> Result<(), Failure> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let open = state.take().ok_or_else(closed)?;
        if self.poisoned.load(Ordering::Acquire) {
            // The state may be inconsistent: drop the engine without a checkpoint.
            drop(open);
            return Ok(());
        }
        let instance = open.engine.instance_id();
        let closing = open.engine.close().map_err(Failure::from);
        if closing.is_ok() {
            self.closed_cleanly.store(instance, Ordering::Release);
        }
        drop(state);
        closing
    }

    /// The `instance_id` of the engine a close that succeeded closed; 0 if the handle is open,
    /// was poisoned, or its close failed.
    pub fn closed_cleanly(&self) -> u64 {
        self.closed_cleanly.load(Ordering::Acquire)
    }

    pub fn is_open(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}
