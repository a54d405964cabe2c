//! What the operator commands make of what they are given: a `--db` folder that is not a tally
//! database, a negative amount, the exit statuses their help states. Each test runs the built
//! `tally` binary as an operator would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory under the system's temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "tally-operator-input-{}-{number}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("the scratch directory is created");
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tally_in(directory: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .current_dir(directory)
        .output()
        .expect("the tally binary runs")
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The names in `directory`, sorted.
fn listing(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory)
        .expect("the directory is read")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// `--db` given a project folder that happens to hold a `db` directory (a Rails app, say):
/// `tally events` (a command that never creates a database) took it for a tally database,
/// opened it, wrote sled's `conf` and `blobs/` into the folder, and then failed with
/// "cannot be opened (damaged?)", as if it were a damaged tally database. It must be refused
/// as not a tally database, and the folder left as it was.
#[test]
fn a_folder_with_a_db_directory_is_refused_and_left_as_it_was() {
    let scratch = Scratch::new();
    let folder = scratch.0.join("project");
    std::fs::create_dir_all(folder.join("db")).expect("created");
    std::fs::create_dir_all(folder.join("app")).expect("created");
    std::fs::write(folder.join("Gemfile"), "gem \"rails\"\n").expect("written");
    let before = listing(&folder);
    for command in [
        &["events", "--db", "project"][..],
        &["usage", "k", "--db", "project"],
    ] {
        let output = tally_in(&scratch.0, command);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(stderr.contains("--db"), "{command:?}: {stderr}");
        assert!(
            stderr.contains("not a tally database"),
            "{command:?}: an unclear error: {stderr}"
        );
        assert_eq!(
            listing(&folder),
            before,
            "{command:?} wrote into a folder that is not a tally database: {stderr}"
        );
    }
}

/// A folder of the operator's files that holds one named `conf` (a config file): `tally usage`
/// took it for a database, let sled overwrite that `conf` with its own settings and made a new
/// empty database beside the operator's files (`db`, `events/`, `snapshots/`, `blobs/`), then
/// said only "unknown key". A command that does not create databases must not make one in a
/// folder that is not one, nor overwrite a file in it.
#[test]
fn a_folder_with_a_conf_file_is_not_turned_into_a_database() {
    let scratch = Scratch::new();
    let folder = scratch.0.join("settings");
    std::fs::create_dir_all(&folder).expect("created");
    std::fs::write(folder.join("conf"), "answer = 42\n").expect("written");
    std::fs::write(folder.join("notes.txt"), "keep me\n").expect("written");
    let before = listing(&folder);
    let output = tally_in(&scratch.0, &["usage", "tp-ada", "--db", "settings"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(folder.join("conf")).expect("conf is read"),
        "answer = 42\n",
        "the operator's conf file was overwritten ({stderr})"
    );
    assert_eq!(listing(&folder), before, "{stderr}");
    assert!(stderr.contains("--db"), "{stderr}");
    assert!(stdout_of(&output).is_empty());
}

/// `tally events` exits 2 when it cannot run (a `--after` past the end of the log, a database
/// that is not there, a bad option), as every command does, but its help's exit statuses
/// named only 0 and 1: a script written from the help would take 2 for success.
#[test]
fn the_events_help_names_the_exit_status_2_that_events_gives() {
    let scratch = Scratch::new();
    let created = tally_in(&scratch.0, &["team", "acme"]);
    assert!(created.status.success(), "{}", stderr_of(&created));
    let past_the_end = tally_in(&scratch.0, &["events", "--after", "99"]);
    assert_eq!(
        past_the_end.status.code(),
        Some(2),
        "{}",
        stderr_of(&past_the_end)
    );
    let help = stdout_of(&tally_in(&scratch.0, &["events", "--help"]));
    let status = &help[help
        .find("Exit status")
        .expect("the help states its exit statuses")..];
    assert!(
        status
            .split(|c: char| !c.is_ascii_digit())
            .any(|number| number == "2"),
        "`tally events --help` does not say when it exits 2:\n{status}"
    );
}

/// `tally topup TEAM -5` (an operator trying to take credits away) said only
/// "-5: unknown option": neither that it is MICROS that is wrong nor why. A negative amount
/// is a bad MICROS, named as such, as `consume`'s `requests=-5` and `--at -5` already are.
#[test]
fn a_negative_amount_is_a_bad_micros_not_an_unknown_option() {
    let scratch = Scratch::new();
    let created = tally_in(&scratch.0, &["team", "acme"]);
    assert!(created.status.success(), "{}", stderr_of(&created));
    let output = tally_in(&scratch.0, &["topup", "acme", "-5"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("MICROS"),
        "the error does not name MICROS: {stderr}"
    );
    assert!(!stderr.contains("unknown option"), "{stderr}");
}

/// `--durability interval:+5` was taken as `interval:5` (Rust's integer parser accepts a
/// leading `+`), while every other number on the command line (`--at +5`, `MICROS` `+5`,
/// `--keys +5`) is refused as "not a whole number": a signed interval went through silently.
/// It is refused, naming `--durability`, and no database is made.
#[test]
fn a_signed_durability_interval_is_refused_naming_durability() {
    let scratch = Scratch::new();
    for interval in ["interval:+5", "interval:-5", "interval: 5"] {
        let output = tally_in(&scratch.0, &["team", "acme", "--durability", interval]);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{interval}: {stderr}");
        assert!(stderr.contains("--durability"), "{interval}: {stderr}");
        assert!(
            listing(&scratch.0).is_empty(),
            "{interval} made {:?}",
            listing(&scratch.0)
        );
    }
    let plain = tally_in(&scratch.0, &["team", "acme", "--durability", "interval:5"]);
    assert!(plain.status.success(), "{}", stderr_of(&plain));
}

/// `--db` naming a symbolic link whose target does not exist (yet): `tally user` could not
/// create the database through it ("creating link: File exists") and then, cleaning up what
/// it took for a path it had made, removed the operator's link itself, as it did a dangling
/// link above the path (`--db link/sub`). It is refused, naming `--db`, and the link stays.
#[cfg(unix)]
#[test]
fn a_dangling_symbolic_link_given_as_db_is_refused_and_left_in_place() {
    let scratch = Scratch::new();
    let link = scratch.0.join("link");
    std::os::unix::fs::symlink(scratch.0.join("not-there"), &link).expect("a symbolic link");
    for db in ["link", "link/sub"] {
        let output = tally_in(&scratch.0, &["user", "ada", "tp-ada", "--db", db]);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{db}: {stderr}");
        assert!(stderr.contains("tally: --db: "), "{db}: {stderr}");
        assert!(
            std::fs::symlink_metadata(&link).is_ok_and(|meta| meta.file_type().is_symlink()),
            "--db {db} removed the operator's link: {stderr}"
        );
        assert_eq!(listing(&scratch.0), ["link"], "{db}");
    }
}

/// `--db x/../data` with no `x`: the path is vacant (it cannot even be resolved), so the
/// command took the database as its own to make, and the open made `x` and then `data`
/// through it. When the command then failed (here a time too far ahead), the clean-up
/// removed `x`, the highest directory it knew it made, and left the new database in `data`
/// behind. Such a path is refused before anything is made, naming `--db`.
#[test]
fn a_db_path_going_up_out_of_a_missing_directory_is_refused_and_makes_nothing() {
    let scratch = Scratch::new();
    let output = tally_in(
        &scratch.0,
        &[
            "user",
            "ada",
            "tp-ada",
            "--db",
            "x/../data",
            "--at",
            "4102444799999",
        ],
    );
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("tally: --db: "), "{stderr}");
    assert!(
        listing(&scratch.0).is_empty(),
        "left {:?}: {stderr}",
        listing(&scratch.0)
    );
}

/// `--durability interval:60,000` was refused with "the interval is whole milliseconds, 1 to
/// 60,000": the range it printed, in the grouping every other number on the command line
/// takes (`--limit 1,000`, `MICROS` 5,000,000), was not a value it took. It takes it, and
/// refuses a separator that does not group in threes, as the others do.
#[test]
fn a_durability_interval_takes_grouped_digits_as_every_other_number_does() {
    let scratch = Scratch::new();
    let grouped = tally_in(
        &scratch.0,
        &["team", "acme", "--durability", "interval:1,000"],
    );
    assert!(grouped.status.success(), "{}", stderr_of(&grouped));
    let misgrouped = tally_in(
        &scratch.0,
        &["team", "beta", "--durability", "interval:1,00"],
    );
    let stderr = stderr_of(&misgrouped);
    assert_eq!(misgrouped.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--durability"), "{stderr}");
}
