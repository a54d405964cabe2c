//! An open that refuses a database leaves its files as they were: what it would have repaired on
//! the way (a torn tail cut off, a snapshot's leftover temporary file removed) stays, so the
//! operator finds the database as the crash or the damage left it.

mod log_support;

use std::path::{Path, PathBuf};

use log_support::*;
use tally_engine::{Engine, EngineOptions, OpenOptions, Policy};

/// Every file under `dir`'s `events/` and `snapshots/`, with its bytes, in path order.
fn log_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    for sub in ["events", "snapshots"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            found.push((path, bytes));
        }
    }
    found.sort();
    found
}

/// Every record of sled's `meta` tree (format, recorded options, durable points, the last
/// segment created, when events were logged).
fn meta(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = open_sled_retrying(dir);
    let tree = db.open_tree("meta").unwrap();
    tree.iter()
        .map(|entry| {
            let (key, value) = entry.unwrap();
            (key.to_vec(), value.to_vec())
        })
        .collect()
}

/// A populated database with two checkpoints and events after them, as a crash left it, with
/// a torn write at the end of its last segment.
fn torn_database(label: &str) -> TempDir {
    let dir = TempDir::new(label);
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.checkpoint().unwrap();
    engine.top_up("acme", 8, Some(POPULATED_MS)).unwrap();
    engine.checkpoint().unwrap();
    engine.top_up("acme", 9, Some(POPULATED_MS)).unwrap();
    drop(engine);
    as_if_it_crashed(dir.path());
    tear_last_segment(dir.path());
    dir
}

/// Puts a torn write at the end of the last segment's records, as a crash leaves one; returns
/// the segment and where its records end.
fn tear_last_segment(dir: &Path) -> (PathBuf, usize) {
    let last = segment_paths(dir).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    // Trailing zeros written ahead: the records end before them.
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    let records_end = bytes.len();
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]);
    std::fs::write(&last, bytes).unwrap();
    (last, records_end)
}

fn expect_refused_untouched(dir: &Path, policy: Policy, what: &str) -> String {
    expect_refused_untouched_with(dir, policy, sync_options(), what)
}

fn expect_refused_untouched_with(
    dir: &Path,
    policy: Policy,
    options: OpenOptions,
    what: &str,
) -> String {
    let (before, meta_before) = (log_files(dir), meta(dir));
    let opened = Engine::open(dir, policy, clock(), options);
    let error = match opened {
        Ok(_) => panic!("{what}: opened"),
        Err(error) => error.to_string(),
    };
    let (after, meta_after) = (log_files(dir), meta(dir));
    assert_eq!(
        meta_after, meta_before,
        "{what}: refused ({error}) but changed meta"
    );
    let changed: Vec<_> = before
        .iter()
        .filter(|file| !after.contains(file))
        .map(|(path, _)| path.display().to_string())
        .chain(
            after
                .iter()
                .filter(|file| !before.contains(file))
                .map(|(path, _)| format!("{} (new)", path.display())),
        )
        .collect();
    assert!(
        changed.is_empty(),
        "{what}: refused ({error}) but changed {changed:?}"
    );
    error
}

#[test]
fn a_torn_database_with_a_damaged_snapshot_is_refused_as_it_was() {
    let dir = torn_database("refused-damaged-snapshot");
    let snapshot = latest_snapshot(dir.path());
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&snapshot, bytes).unwrap();
    expect_refused_untouched(dir.path(), Policy::token_plan(), "damaged snapshot");
}

#[test]
fn a_torn_database_with_a_snapshot_leftover_and_a_damaged_snapshot_is_refused_as_it_was() {
    let dir = torn_database("refused-leftover");
    let snapshot = latest_snapshot(dir.path());
    let mut leftover = snapshot.as_os_str().to_owned();
    leftover.push(".tmp");
    std::fs::write(&leftover, b"half a snapshot").unwrap();
    std::fs::write(&snapshot, b"TALLYSNP garbage").unwrap();
    // And a segment whose creation the crash cut short (never recorded, its header partial).
    std::fs::write(
        dir.path()
            .join("events")
            .join(format!("{:020}.seg", u64::MAX / 2)),
        b"TALLYLO",
    )
    .unwrap();
    expect_refused_untouched(dir.path(), Policy::token_plan(), "leftover");
}

#[test]
fn a_torn_database_missing_events_after_its_snapshot_is_refused_as_it_was() {
    let dir = torn_database("refused-missing-start");
    // The latest snapshot gone, and the segments before the last: the log starts after the
    // event following the earlier snapshot.
    std::fs::remove_file(latest_snapshot(dir.path())).unwrap();
    let all = segment_paths(dir.path());
    for path in &all[..all.len() - 1] {
        std::fs::remove_file(path).unwrap();
    }
    let error = expect_refused_untouched(dir.path(), Policy::token_plan(), "missing start");
    assert!(error.contains("missing"), "{error}");
}

#[test]
fn a_torn_database_whose_policy_swap_is_refused_is_left_as_it_was() {
    let dir = torn_database("refused-swap");
    // A policy without the plans the world is seated on.
    let mut document: serde_json::Value =
        serde_json::to_value(Policy::token_plan().document()).unwrap();
    let plans = document["plans"].as_object_mut().unwrap();
    let names: Vec<String> = plans.keys().cloned().collect();
    for name in names.iter().skip(1) {
        plans.remove(name);
    }
    let policy = Policy::from_json_str(&document.to_string()).unwrap();
    expect_refused_untouched(dir.path(), policy, "refused swap");
}

/// The same crash's leftovers, with nothing else wrong: the open goes ahead and repairs them
/// (the torn tail cut off, the temporary snapshot and the cut-short segment removed), and
/// the state is the one before the crash.
#[test]
fn a_torn_database_with_leftovers_opens_and_is_repaired() {
    let dir = TempDir::new("repaired-leftovers");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.checkpoint().unwrap();
    engine.top_up("acme", 8, Some(POPULATED_MS)).unwrap();
    let before = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
    drop(engine);
    as_if_it_crashed(dir.path());
    let (last, records_end) = tear_last_segment(dir.path());
    let mut leftover = latest_snapshot(dir.path()).into_os_string();
    leftover.push(".tmp");
    std::fs::write(&leftover, b"half a snapshot").unwrap();
    let cut_short = dir
        .path()
        .join("events")
        .join(format!("{:020}.seg", u64::MAX / 2));
    std::fs::write(&cut_short, b"TALLYLO").unwrap();
    let engine = open_token_plan(dir.path(), sync_options());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "reopened",
    );
    let kept = std::fs::read(&last).unwrap();
    assert!(
        kept.len() >= records_end && kept[records_end..].iter().all(|&byte| byte == 0),
        "the torn write was not cut off"
    );
    assert!(
        !Path::new(&leftover).exists(),
        "the temporary snapshot stayed"
    );
    assert!(!cut_short.exists(), "the cut-short segment stayed");
    engine.top_up("acme", 1, Some(POPULATED_MS)).unwrap();
    drop(engine);
    let report = Engine::verify(
        dir.path(),
        tally_engine::OpenOptions {
            use_recorded: true,
            ..tally_engine::OpenOptions::default()
        },
    )
    .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// sled's `db` file of a database damaged or replaced (sled opens an emptied one as a new,
/// empty store): the log's segments are tally's own, so the open and `verify` refuse it naming
/// the metadata that was lost, not as a folder that holds no tally database.
#[test]
fn a_database_whose_metadata_was_lost_is_refused_naming_the_metadata() {
    let dir = TempDir::new("refused-lost-metadata");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.close().unwrap();
    std::fs::write(dir.path().join("db"), b"").unwrap();
    let before = log_files(dir.path());
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("refused")
        .to_string();
    let verified = Engine::verify(dir.path(), tally_engine::OpenOptions::default())
        .expect_err("refused")
        .to_string();
    assert_eq!(log_files(dir.path()), before, "the log was changed");
    for problem in [&error, &verified] {
        assert!(
            problem.contains("metadata") && !problem.contains("not a tally database"),
            "{problem}"
        );
    }
}

/// `sync_options` with `change` made to the engine's options.
fn engine_options(change: impl FnOnce(&mut EngineOptions)) -> OpenOptions {
    let mut options = sync_options();
    change(&mut options.engine);
    options
}

/// A table's bound given at reopen below what the database holds: the open is refused, naming
/// the option, the bound given and how many the database holds, and changes nothing (replayed
/// whole, the table ran above its own bound, and the smaller bound was recorded). At exactly
/// what it holds, the open goes ahead, and the next entry is refused as at any full table.
#[test]
fn a_bound_below_what_the_database_holds_is_refused_as_it_was() {
    let dir = TempDir::new("refused-bounds");
    let engine = open_token_plan(dir.path(), sync_options());
    let world = populate(&engine);
    engine.close().unwrap();
    // What `populate` leaves: 8 keys; 5 users; their 5 Default Teams and acme; 5 request ids
    // (req-a1 to req-b3; the clock, at T0_MS, has aged none out); the reservations left open
    // (their leases end after the clock's now).
    let open = world.open.len();
    assert!(open >= 2, "populate leaves reservations open: {world:?}");
    type Set = fn(&mut EngineOptions, u64);
    let bounds: [(&str, u64, &str, Set); 5] = [
        ("max_keys", 8, "keys", |options, bound| {
            options.max_keys = bound
        }),
        ("max_users", 5, "users", |options, bound| {
            options.max_users = bound
        }),
        ("max_teams", 6, "teams", |options, bound| {
            options.max_teams = bound
        }),
        (
            "max_open_reservations",
            open as u64,
            "reservations open",
            |options, bound| options.max_open_reservations = bound as usize,
        ),
        (
            "idempotency_capacity",
            5,
            "request ids",
            |options, bound| options.idempotency_capacity = bound as usize,
        ),
    ];
    for (option, held, what, set) in bounds {
        let below = held - 1;
        let error = expect_refused_untouched_with(
            dir.path(),
            Policy::token_plan(),
            engine_options(|options| set(options, below)),
            option,
        );
        assert!(
            error.starts_with(&format!("{option}: {below} is below the {held} {what} ")),
            "{error}"
        );
        let engine = Engine::open(
            dir.path(),
            Policy::token_plan(),
            clock(),
            engine_options(|options| set(options, held)),
        )
        .unwrap_or_else(|error| panic!("{option} at what is held: {error}"));
        drop(engine);
    }
    // The last open recorded the options it ran with: back to the defaults.
    open_token_plan(dir.path(), sync_options()).close().unwrap();
    // At its bound, a full table refuses the next entry.
    let engine = Engine::open(
        dir.path(),
        Policy::token_plan(),
        clock(),
        engine_options(|options| options.max_keys = 8),
    )
    .unwrap();
    let refused = engine.create_user("fay", "key-fay", Some(POPULATED_MS));
    assert!(
        matches!(refused, Err(tally_engine::Error::CapacityExceeded { .. })),
        "{refused:?}"
    );
}

/// What the live tables would drop before refusing does not count against a bound given at
/// reopen: reservations whose lease the clock's now has ended (a reserve expires them first),
/// and request ids stamped longer ago than the horizon (a full table drops them first).
#[test]
fn a_bound_below_what_the_database_holds_counts_only_what_the_tables_keep() {
    let dir = TempDir::new("bounds-aged-out");
    let engine = open_token_plan(dir.path(), sync_options());
    let world = populate(&engine);
    engine.close().unwrap();
    assert!(world.open.len() >= 2, "{world:?}");
    // Every lease (2 h from T0_MS + 5 h) has ended; every request id (T0_MS + 4 h) is older
    // than the horizon (the token plan's longest window) by a day.
    let horizon_ms = Policy::token_plan().longest_window_ms();
    let later = std::sync::Arc::new(tally_engine::ManualClock::new(
        T0_MS + 4 * HOUR_MS + horizon_ms + DAY_MS,
    ));
    let engine = Engine::open(
        dir.path(),
        Policy::token_plan(),
        later,
        engine_options(|options| {
            options.max_open_reservations = 1;
            options.idempotency_capacity = 1;
        }),
    )
    .unwrap_or_else(|error| panic!("refused: {error}"));
    drop(engine);
}

/// Writes `value` as the record of the last reservation id handed out (sled's `meta`), as
/// damage or a bad copy leaves it.
fn write_reservation_ids_through(dir: &Path, value: &[u8]) {
    let db = open_sled_retrying(dir);
    let meta = db.open_tree("meta").unwrap();
    assert!(
        meta.get(b"reservation_ids_through").unwrap().is_some(),
        "a reserve records the ids it may hand out"
    );
    meta.insert(b"reservation_ids_through", value).unwrap();
    db.flush().unwrap();
}

/// Writes `value` as that record into a populated database, then checks that the open is
/// refused, changing nothing, and that `verify` reports it, both in words holding each of
/// `named`.
fn reservation_ids_record_refused_and_reported(label: &str, value: &[u8], named: &[&str]) {
    let dir = TempDir::new(&format!("refused-reservation-ids-{label}"));
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.close().unwrap();
    write_reservation_ids_through(dir.path(), value);
    let error = expect_refused_untouched(dir.path(), Policy::token_plan(), label);
    assert!(named.iter().all(|word| error.contains(word)), "{error}");
    let verified = Engine::verify(dir.path(), sync_options()).expect("verify reads on");
    assert!(
        verified
            .problems
            .iter()
            .any(|problem| named.iter().all(|word| problem.contains(word))),
        "{verified:?}"
    );
}

/// The record of the last reservation id an engine may hand out (`reservation_ids_through`)
/// that does not read back (not 8 bytes): an open that went on without it could hand out an
/// id an earlier run answered, so it is refused naming the record and changes nothing, and
/// `verify` reports it (before, `verify` did not read the record: it found nothing wrong with
/// a database every open refuses).
#[test]
fn a_damaged_record_of_reservation_ids_is_refused_by_the_open_and_reported_by_verify() {
    reservation_ids_record_refused_and_reported(
        "damaged",
        &[1, 2, 3],
        &["reservation_ids_through", "3 bytes"],
    );
}

/// A record of 2^64 - 1 leaves no id to hand out: the open refuses it naming it (going on, the
/// next id wrapped to 1, handed out again), and `verify` reports it. One below it opens, and a
/// reserve is refused for want of ids rather than handing out 2^64 - 1, which every later
/// replay refuses.
#[test]
fn a_record_of_reservation_ids_at_the_last_id_is_refused_and_no_reserve_wraps() {
    reservation_ids_record_refused_and_reported(
        "last-id",
        &u64::MAX.to_le_bytes(),
        &["reservation_ids_through", "2^64 - 1"],
    );
    let dir = TempDir::new("refused-last-reservation-id");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.close().unwrap();
    write_reservation_ids_through(dir.path(), &(u64::MAX - 1).to_le_bytes());
    let engine = open_token_plan(dir.path(), sync_options());
    let held = [(tally_engine::Unit::Requests, 1)];
    let request = tally_engine::UsageRequest::new("key-bob", "m2.7", &held).at(POPULATED_MS);
    let open_before = engine.open_reservations();
    let refused = engine.reserve(&request, None);
    assert!(
        matches!(
            refused,
            Err(tally_engine::Error::CapacityExceeded {
                what: "reservation ids",
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(
        engine.open_reservations(),
        open_before,
        "nothing was reserved"
    );
    engine.close().unwrap();
    let verified = Engine::verify(dir.path(), sync_options()).expect("verify");
    assert!(verified.problems.is_empty(), "{verified:?}");
}
