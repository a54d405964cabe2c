//! tally's C ABI. This crate builds `libtally` (shared and static) for gateways written in C and
//! for the Python and Go packages. It starts with the version call; the engine handle, admission
//! and admin calls, statuses and the generated header follow (see ARCHITECTURE.md).

use std::ffi::c_char;

/// The library's version, `MAJOR.MINOR.PATCH`, NUL-terminated, from Cargo's package version.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// Returns the library's version as a NUL-terminated string. The pointer is static: the caller
/// must not free it. Never fails.
#[no_mangle]
pub extern "C" fn tally_version() -> *const c_char {
    VERSION.as_ptr().cast()
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
        assert_eq!(version.to_str().map(|text| text.split('.').count()), Ok(3));
    }
}
