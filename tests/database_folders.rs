//! What a folder must hold to be opened as a database (`Engine::open`'s
//! `prepare_directory`, the CLI's `store::is_database`, `verify`'s read-only open).

mod log_support;

use std::path::Path;
use std::process::Command;

use log_support::*;
use tally_engine::{Durability, Engine, Error, OpenOptions, Policy};

fn open_none(dir: &Path) -> Result<Engine, Error> {
    Engine::open(
        dir,
        Policy::token_plan(),
        clock(),
        OpenOptions {
            durability: Durability::None,
            ..OpenOptions::default()
        },
    )
}

/// Every entry under `dir` (directories too) with a file's contents, in path order.
fn entries(dir: &Path) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path.clone());
                found.push((path, None));
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                found.push((path, Some(bytes)));
            }
        }
    }
    found.sort();
    found
}

/// A folder holding nothing but a `db` *directory* (a project's database scripts, say) is not
/// a database cut short: sled's `db` is a file. The open must refuse it and leave it as it
/// was, as it refuses a `db` directory beside other files; the names alone (`of_a_database`)
/// took it for one, and sled wrote its files into it.
#[test]
fn a_folder_with_only_a_db_directory_is_refused_and_left_alone() {
    let dir = TempDir::new("database-folders-db-directory");
    let folder = dir.path().join("scripts");
    std::fs::create_dir_all(folder.join("db")).expect("a db directory");
    std::fs::write(folder.join("db").join("schema.sql"), "create table t;\n").expect("a file");
    let before = entries(&folder);
    let opened = open_none(&folder);
    let after = entries(&folder);
    assert_eq!(
        after,
        before,
        "the folder was written into ({:?})",
        opened.as_ref().err()
    );
    assert!(
        matches!(&opened, Err(Error::Storage { problem })
            if problem.contains("holds files that are not a tally database")),
        "{:?}",
        opened.as_ref().err()
    );
}

/// A database whose creation was cut short (sled's `conf` and `blobs` only), which
/// `Engine::open` opens (`options::a_folder_that_only_looks_like_a_database_is_refused_and_
/// left_alone`), is one the CLI's operator commands open too: they must not call it "not a
/// tally database", leaving the operator a folder only deleting by hand gets past.
#[test]
fn the_cli_opens_a_database_cut_short_as_the_engine_does() {
    let dir = TempDir::new("database-folders-cli-cut-short");
    let whole = dir.path().join("whole");
    drop(open_none(&whole).expect("a new database"));
    let cut_short = dir.path().join("cut-short");
    std::fs::create_dir_all(cut_short.join("blobs")).expect("blobs");
    std::fs::copy(whole.join("conf"), cut_short.join("conf")).expect("sled's conf");
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["user", "ada", "tp-ada", "--db"])
        .arg(&cut_short)
        .output()
        .expect("the tally binary runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `verify` and `recorded_options` read a database and never make one: a folder holding only a
/// `conf` file (the operator's, or sled's from a creation cut short) is none, and is left as it
/// was. One name alone let it through to sled, which may rewrite that file.
#[test]
fn reading_a_folder_with_a_conf_file_alone_finds_no_database_and_leaves_it() {
    let dir = TempDir::new("database-folders-conf-alone");
    let folder = dir.path().join("settings");
    std::fs::create_dir_all(&folder).expect("a directory");
    std::fs::write(folder.join("conf"), "answer = 42\n").expect("a conf file");
    let before = entries(&folder);
    let verified = Engine::verify(&folder, OpenOptions::default());
    assert!(
        matches!(&verified, Err(Error::Storage { problem }) if problem.contains("holds no tally database")),
        "{verified:?}"
    );
    let recorded = Engine::recorded_options(&folder);
    assert!(recorded.is_err(), "{recorded:?}");
    assert_eq!(entries(&folder), before, "the folder was written into");
}

/// A database that lost sled's `db` file (and its `snap.*`) still holds its log and
/// snapshots: it is damaged, not a creation cut short (the open makes sled's files before
/// `events/`), so every command refuses it naming the missing file and leaves it as it was.
/// Before, a command that may create a database took it for one cut short: a `tally user`
/// refused (the user existed) then removed what it believed it had made, every entry of the
/// folder, the whole event log and both snapshots with them; and the other commands called
/// it "no database", pointing the operator at `tally user` to create one there.
#[test]
fn a_database_missing_sleds_db_file_is_refused_and_its_log_left_alone() {
    let dir = TempDir::new("database-folders-db-file-lost");
    let database = dir.path().join("tally-data");
    {
        let engine = open_none(&database).expect("a new database");
        engine.create_user("ada", "tp-ada", None).expect("a user");
        engine.checkpoint().expect("a checkpoint");
        engine.top_up("@ada", 5, None).expect("a top-up");
        engine.close().expect("close");
    }
    for entry in std::fs::read_dir(&database).expect("the database") {
        let path = entry.expect("an entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "db" || name.starts_with("snap.") {
            std::fs::remove_file(&path).expect("removed");
        }
    }
    let kept = |database: &Path| {
        let mut kept = entries(&database.join("events"));
        kept.extend(entries(&database.join("snapshots")));
        kept
    };
    let before = kept(&database);
    assert!(
        before
            .iter()
            .any(|(path, _)| path.extension().is_some_and(|ext| ext == "seg")),
        "{before:?}"
    );
    // The engine refuses it too, as it does `verify`.
    let opened = open_none(&database);
    assert!(
        matches!(&opened, Err(Error::Storage { problem }) if problem.contains("db file is missing")),
        "{:?}",
        opened.as_ref().err()
    );
    let verified = Engine::verify(&database, OpenOptions::default());
    assert!(
        matches!(&verified, Err(Error::Storage { problem }) if problem.contains("db file is missing")),
        "{verified:?}"
    );
    assert_eq!(
        kept(&database),
        before,
        "the engine changed the log or the snapshots"
    );
    for args in [
        &["user", "ada", "tp-other"][..],
        &["team", "acme"],
        &["events"],
        &["verify"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .arg("--db")
            .arg(&database)
            .output()
            .expect("the tally binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("db") && stderr.contains("missing") && !stderr.contains("create one"),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            kept(&database),
            before,
            "{args:?} changed the log or the snapshots"
        );
    }
}

/// A database whose `events/` directory is gone is refused naming it, and left as it was:
/// the open made the directory afresh (and `snapshots/`, were it gone too) before it found
/// the log missing, so a refused command, `tally events` here, changed the database.
#[test]
fn a_database_whose_log_directory_is_gone_is_refused_and_left_as_it_was() {
    let dir = TempDir::new("database-folders-events-gone");
    let database = dir.path().join("tally-data");
    {
        let engine = open_none(&database).expect("a new database");
        engine.create_user("ada", "tp-ada", None).expect("a user");
        engine.close().expect("close");
    }
    std::fs::remove_dir_all(database.join("events")).expect("the log is gone");
    let opened = open_none(&database);
    assert!(
        matches!(&opened, Err(Error::Storage { problem }) if problem.contains("no log segments")),
        "{:?}",
        opened.as_ref().err()
    );
    assert!(!database.join("events").exists(), "the open made events/");
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["events", "--db"])
        .arg(&database)
        .output()
        .expect("the tally binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("events/"), "{stderr}");
    assert!(
        !database.join("events").exists(),
        "`tally events` made events/"
    );
}
