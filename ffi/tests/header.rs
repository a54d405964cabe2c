//! The checked-in header agrees with Cargo's version.

use std::ffi::CStr;

fn define(header: &str, name: &str) -> String {
    let prefix = format!("#define {name} ");
    header
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} is not defined in tally.h"))
        .trim()
        .to_string()
}

#[test]
fn the_headers_version_macros_agree_with_cargo_and_the_library() {
    let header = include_str!("../include/tally.h");
    let major = define(header, "TALLY_VERSION_MAJOR");
    let minor = define(header, "TALLY_VERSION_MINOR");
    let patch = define(header, "TALLY_VERSION_PATCH");
    assert_eq!(major, env!("CARGO_PKG_VERSION_MAJOR"));
    assert_eq!(minor, env!("CARGO_PKG_VERSION_MINOR"));
    assert_eq!(patch, env!("CARGO_PKG_VERSION_PATCH"));
    let version = define(header, "TALLY_VERSION");
    assert_eq!(version, format!("\"{}\"", env!("CARGO_PKG_VERSION")));
    // SAFETY: tally_version returns a static NUL-terminated string.
    let library = unsafe { CStr::from_ptr(tally::tally_version()) };
    assert_eq!(library.to_str().ok(), Some(env!("CARGO_PKG_VERSION")));
}

#[test]
fn every_status_in_the_header_has_its_code() {
    let header = include_str!("../include/tally.h");
    for code in 0..=35u32 {
        // SAFETY: as above.
        let name = unsafe { CStr::from_ptr(tally::tally_status_name(code)) };
        let line = format!("  {} = {code},", name.to_str().unwrap_or_default());
        assert!(header.contains(&line), "{line:?} is not in tally.h");
    }
}
