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

/// The comment the header puts before `function`'s declaration.
fn comment_before(header: &str, function: &str) -> String {
    let declaration = format!("tally_status {function}(");
    let lines: Vec<&str> = header.lines().collect();
    let at = lines
        .iter()
        .position(|line| line.starts_with(&declaration))
        .unwrap_or_else(|| panic!("{function} is not declared in tally.h"));
    let mut comment: Vec<&str> = lines[..at]
        .iter()
        .rev()
        .take_while(|line| line.starts_with("//"))
        .copied()
        .collect();
    comment.reverse();
    comment.join("\n")
}

/// The usage report's documentation in the header names every field the report writes, so a
/// C caller reading the JSON by the header misses none (it left out `revoked`).
#[test]
fn the_usage_reports_documentation_names_every_field_it_writes() {
    use std::ptr;
    use tally::*;
    let header = include_str!("../include/tally.h");
    let documented = comment_before(header, "tally_engine_usage");
    let mut engine = ptr::null_mut();
    assert_eq!(
        tally_engine_open_in_memory(0, ptr::null(), 0, ptr::null(), &mut engine),
        tally_status::TALLY_OK
    );
    let (user, key) = ("ada", "tp-ada");
    assert_eq!(
        tally_engine_create_user(engine, user.as_ptr().cast(), 3, key.as_ptr().cast(), 6, 0),
        tally_status::TALLY_OK
    );
    let (team, plan) = ("@ada", "Plus");
    assert_eq!(
        tally_engine_assign_seat(
            engine,
            team.as_ptr().cast(),
            4,
            user.as_ptr().cast(),
            3,
            plan.as_ptr().cast(),
            4,
            0
        ),
        tally_status::TALLY_OK
    );
    let mut buf = vec![0u8; 1 << 16];
    let mut needed = 0;
    assert_eq!(
        tally_engine_usage(
            engine,
            key.as_ptr().cast(),
            6,
            0,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut needed
        ),
        tally_status::TALLY_OK
    );
    tally_engine_free(engine);
    let report: serde_json::Value =
        serde_json::from_slice(&buf[..needed - 1]).expect("the report is JSON");
    let fields = report.as_object().expect("an object");
    let limit = fields["limits"][0].as_object().expect("a limit");
    for name in fields.keys().chain(limit.keys()) {
        assert!(
            documented.contains(&format!("\"{name}\"")),
            "the usage report writes {name:?}, which tally.h does not name:\n{documented}"
        );
    }
}
