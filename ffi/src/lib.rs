//! tally's C ABI: `libtally` (shared and static) for gateways written in C and for the Python
//! and Go packages. The header `include/tally.h` is generated from this crate by cbindgen
//! (`scripts/check-header.sh`).
//!
//! Modules, one per C type family: `status` (`tally_status` and the status names),
//! `last_error` (the per-thread message), `options` (the options of an open, set one at a
//! time), `engine` (the handle's life and the admin calls),
//! `decision` (requests, decisions and their enums), `admission` (consume, check,
//! reservations, refunds), `submission` (consumes submitted now and completed once durable),
//! `report` (usage, policy, events and cursors, checkpoints, verify).
//! Private plumbing: `handle` (opaque handles and the one trait that casts them), `panic`
//! (the catch_unwind boundary), `checks` (pointers, strings and output buffers).
//!
//! Conventions, for every function:
//! - Fallible functions return `tally_status`; `TALLY_OK` is 0. Outputs go through
//!   out-pointers and are written only on success.
//! - Strings are (pointer, length) pairs of UTF-8 bytes without NUL, read during the call only.
//! - Timestamps are `uint64_t` milliseconds since the Unix epoch; `TALLY_NOW` (0) means the
//!   engine's clock.
//! - Enums travel as `uint32_t` and are checked (`TALLY_BAD_ENUM`), never transmuted.
//! - Text answers go into caller-owned buffers with a size query: `*needed` always receives
//!   the size including the NUL; a NULL or short buffer answers `TALLY_BUFFER_TOO_SMALL`.
//! - No panic crosses the boundary (`TALLY_PANIC`, and the handle is then poisoned).

mod admission;
mod checks;
mod decision;
mod engine;
mod handle;
mod last_error;
mod options;
mod panic;
mod report;
mod status;
mod submission;

use std::ffi::c_char;

pub use admission::*;
pub use checks::{TALLY_MAX_DOCUMENT_BYTES, TALLY_MAX_ID_BYTES, TALLY_MAX_NAME_BYTES};
pub use decision::{
    tally_charged_to, tally_decision, tally_denial, tally_limit_status, tally_quantity,
    tally_request, tally_unit, TALLY_MAX_DECISION_LIMITS, TALLY_MAX_QUANTITIES, TALLY_MAX_QUANTITY,
    TALLY_NAME_CAPACITY, TALLY_NOW, TALLY_NO_INDEX,
};
pub use engine::*;
pub use handle::tally_engine;
pub use last_error::tally_last_error;
pub use options::*;
pub use report::*;
pub use status::{tally_status, tally_status_name};
pub use submission::*;

/// For Rust tests of the boundary only (not part of the C ABI): wraps an engine the test opened
/// itself (with injected storage faults, a manual clock, ...) in a C handle.
#[doc(hidden)]
pub fn handle_from_engine(engine: ::tally_engine::Engine) -> *mut tally_engine {
    handle::to_boxed_ptr::<tally_engine>(handle::EngineHandle::new(engine, None))
}

/// The library's major version; agrees with Cargo's (checked at compile time).
pub const TALLY_VERSION_MAJOR: u32 = 0;
/// The library's minor version.
pub const TALLY_VERSION_MINOR: u32 = 1;
/// The library's patch version.
pub const TALLY_VERSION_PATCH: u32 = 0;

/// Parses a decimal number at compile time (for the version checks below).
const fn parse_decimal(text: &str) -> u32 {
    let bytes = text.as_bytes();
    let mut value = 0u32;
    let mut index = 0;
    while index < bytes.len() {
        assert!(bytes[index].is_ascii_digit(), "not a decimal number");
        value = value * 10 + (bytes[index] - b'0') as u32;
        index += 1;
    }
    value
}

// A version bump in Cargo.toml must update these constants, and `TALLY_VERSION` in
// cbindgen.toml (tests/header.rs checks the header against Cargo).
const _: () = assert!(TALLY_VERSION_MAJOR == parse_decimal(env!("CARGO_PKG_VERSION_MAJOR")));
const _: () = assert!(TALLY_VERSION_MINOR == parse_decimal(env!("CARGO_PKG_VERSION_MINOR")));
const _: () = assert!(TALLY_VERSION_PATCH == parse_decimal(env!("CARGO_PKG_VERSION_PATCH")));

/// The library's version, `MAJOR.MINOR.PATCH`, NUL-terminated, from Cargo's package version.
const VERSION_WITH_NUL: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// Returns the library's version (`"0.1.0"`) as a static NUL-terminated string: do not free
/// it. Compare with `TALLY_VERSION` to check that the header matches the library. Never fails.
#[no_mangle]
pub extern "C" fn tally_version() -> *const c_char {
    VERSION_WITH_NUL.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn the_version_matches_cargo_and_is_nul_terminated() {
        // SAFETY: tally_version returns a pointer to a static NUL-terminated string.
        let version = unsafe { CStr::from_ptr(tally_version()) };
        assert_eq!(version.to_str(), Ok(env!("CARGO_PKG_VERSION")));
    }
}
