//! The panic boundary: every exported function runs its body through `boundary`, so no panic
//! unwinds into C (that would be undefined behaviour). A panic becomes `TALLY_PANIC` with the
//! panic's message as the thread's last error. This needs `panic = "unwind"` in every profile
//! the library is built with (the workspace's `Cargo.toml` sets it for release; unwind is the
//! default for dev and test).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::last_error;
use crate::status::{tally_status, Failure};

/// Runs `body`; an error becomes its status (and the thread's last error message), a panic
/// becomes `TALLY_PANIC`.
pub(crate) fn boundary(body: impl FnOnce() -> Result<(), Failure>) -> tally_status {
    // AssertUnwindSafe: after a panic nothing the closure touched is used again except the
    // engine handle, which `EngineHandle::with` marks poisoned on the way out.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => tally_status::TALLY_OK,
        Ok(Err(failure)) => {
            last_error::set(failure.message);
            failure.status
        }
        Err(payload) => {
            last_error::set(format!("panic: {}", panic_text(payload.as_ref())));
            tally_status::TALLY_PANIC
        }
    }
}

/// Like `boundary` for functions that return a value rather than a status: a panic returns
/// `default`.
pub(crate) fn boundary_or<T>(default: T, body: impl FnOnce() -> T) -> T {
    // AssertUnwindSafe: as above; the value-returning functions touch no shared state.
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        last_error::set(format!("panic: {}", panic_text(payload.as_ref())));
        default
    })
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "a panic without a message"
    }
}
