//! Shared helpers for the durable-log tests (`log`, `faults`, `model_reopen`): temporary
//! database directories, opening with explicit options, a populated world of users, teams, keys,
//! seats, credits, request ids and reservations, and the comparable state of an engine.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tally_engine::{
    AdjustmentDirection, Clock, Durability, Engine, EngineOptions, Error, ManualClock, OpenOptions,
    Policy, ReservationId, SettleOutcome, Unit, UsageReport, UsageRequest,
};

pub const SECOND_MS: u64 = 1_000;
pub const MINUTE_MS: u64 = 60 * SECOND_MS;
pub const HOUR_MS: u64 = 60 * MINUTE_MS;
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// 2026-09-21T13:46:40Z: every test runs around here, with explicit timestamps.
pub const T0_MS: u64 = 1_790_000_000_000;

/// A database directory (or file) under the system's temporary directory, unique to this
/// process and call, removed when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tally-test-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sibling path (not created) that is removed with this directory's.
    pub fn sibling(&self, suffix: &str) -> TempDir {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!("-{suffix}"));
        let path = PathBuf::from(name);
        let _ = std::fs::remove_dir_all(&path);
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Some tests put a plain file at the path.
        if self.path.is_dir() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Stores its value in a flag when dropped, however the thread holding it ends. A thread whose
/// end stops the others' loops holds one, so that when it panics they stop too: the test then
/// fails, where it hung in its `thread::scope`, which waits for every thread before it reports
/// a panic (how a failure under load once held CI until its time ran out).
pub struct StoreOnDrop<'a>(pub &'a AtomicBool, pub bool);

impl Drop for StoreOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Relaxed);
    }
}

/// Copies a directory tree (files and subdirectories).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// The latest snapshot file of the database in `dir`: snapshots are named by the event they
/// cover, zero-padded, so the greatest name is the latest.
pub fn latest_snapshot(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir.join("snapshots"))
        .expect("the snapshots directory")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "snap"))
        .max()
        .expect("a snapshot")
}

pub fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(T0_MS))
}

/// `Sync` durability and the defaults otherwise.
pub fn sync_options() -> OpenOptions {
    OpenOptions {
        durability: Durability::Sync,
        ..OpenOptions::default()
    }
}

/// `Sync` durability with `faults` injected (the fault tests' engines).
pub fn sync_options_with(faults: &Arc<tally_engine::Faults>) -> OpenOptions {
    OpenOptions {
        faults: Some(Arc::clone(faults)),
        ..sync_options()
    }
}

/// Waits (10 s at most) until the log writer is held at an fdatasync (`Faults::hold_flushes`).
pub fn wait_until_flush_held(faults: &tally_engine::Faults) {
    let start = std::time::Instant::now();
    while faults.flushes_held() == 0 && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(faults.flushes_held() > 0, "the writer reached its flush");
}

/// Waits (10 s at most) until a refund or a reservation's close is held between its give-back
/// and its append (`Faults::hold_give_backs`).
pub fn wait_until_give_back_held(faults: &tally_engine::Faults) {
    let start = std::time::Instant::now();
    while faults.give_backs_held() == 0 && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        faults.give_backs_held() > 0,
        "the give-back reached its append"
    );
}

pub fn open(dir: &Path, policy: Policy, options: OpenOptions) -> Engine {
    match Engine::open(dir, policy, clock(), options) {
        Ok(engine) => engine,
        Err(error) => panic!("opening {}: {error}", dir.display()),
    }
}

/// Opens with a clock the test moves (request-id and reservation horizons run on the clock).
pub fn open_on_clock(dir: &Path, clock: Arc<dyn Clock>, options: OpenOptions) -> Engine {
    match Engine::open(dir, Policy::token_plan(), clock, options) {
        Ok(engine) => engine,
        Err(error) => panic!("opening {}: {error}", dir.display()),
    }
}

pub fn open_token_plan(dir: &Path, options: OpenOptions) -> Engine {
    open(dir, Policy::token_plan(), options)
}

/// An engine without a log, fed the same operations as a durable one: what "never closed"
/// decides.
pub fn twin(policy: Policy) -> Engine {
    Engine::new(policy, clock(), EngineOptions::default()).expect("valid options")
}

pub fn storage_problem(error: &Error) -> &str {
    match error {
        Error::Storage { problem } => problem,
        other => panic!("expected a Storage error, got {other:?}"),
    }
}

/// Everything a caller can observe of the engine's state for some keys and teams at one time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub reports: Vec<UsageReport>,
    pub credits: Vec<(String, u64)>,
    pub open_reservations: usize,
}

pub fn state(engine: &Engine, keys: &[&str], teams: &[&str], at_ms: u64) -> State {
    State {
        reports: keys
            .iter()
            .map(|key| {
                engine
                    .usage(key, Some(at_ms))
                    .unwrap_or_else(|error| panic!("usage of {key}: {error}"))
            })
            .collect(),
        credits: teams
            .iter()
            .map(|team| {
                let micros = engine
                    .credits_micros(team)
                    .unwrap_or_else(|error| panic!("credits of {team}: {error}"));
                (team.to_string(), micros)
            })
            .collect(),
        open_reservations: engine.open_reservations(),
    }
}

/// Asserts two states are equal; on a difference, names only the fields that differ.
#[track_caller]
pub fn assert_same_state(actual: &State, expected: &State, context: &str) {
    if actual == expected {
        return;
    }
    let mut differences = Vec::new();
    for (left, right) in actual.reports.iter().zip(&expected.reports) {
        if left == right {
            continue;
        }
        let key = &left.key;
        if left.limits != right.limits {
            for (a, b) in left.limits.iter().zip(&right.limits) {
                if a != b {
                    differences.push(format!("{key} {}: {a:?}\n   expected {b:?}", a.name));
                }
            }
            if left.limits.len() != right.limits.len() {
                differences.push(format!(
                    "{key}: {} limits, expected {}",
                    left.limits.len(),
                    right.limits.len()
                ));
            }
        }
        let fields = [
            (
                "credits_balance_micros",
                left.credits_balance_micros,
                right.credits_balance_micros,
            ),
            (
                "credits_charged_micros",
                left.credits_charged_micros,
                right.credits_charged_micros,
            ),
            (
                "open_reservations",
                u64::from(left.open_reservations),
                u64::from(right.open_reservations),
            ),
            ("payg_micros", left.payg_micros, right.payg_micros),
        ];
        for (name, a, b) in fields {
            if a != b {
                differences.push(format!("{key} {name}: {a}, expected {b}"));
            }
        }
        if (&left.plan, &left.team, &left.user, left.kind)
            != (&right.plan, &right.team, &right.user, right.kind)
        {
            differences.push(format!("{key}: {left:?}\n   expected {right:?}"));
        }
    }
    if actual.reports.len() != expected.reports.len() {
        differences.push(format!(
            "{} reports, expected {}",
            actual.reports.len(),
            expected.reports.len()
        ));
    }
    if actual.credits != expected.credits {
        differences.push(format!(
            "credits {:?}, expected {:?}",
            actual.credits, expected.credits
        ));
    }
    if actual.open_reservations != expected.open_reservations {
        differences.push(format!(
            "open reservations {}, expected {}",
            actual.open_reservations, expected.open_reservations
        ));
    }
    panic!(
        "{context}: the states differ:\n - {}",
        differences.join("\n - ")
    );
}

/// The sequence number of the last event in the log.
pub fn last_seq(engine: &Engine) -> u64 {
    let mut after = 0;
    loop {
        let events = engine.events_after(after, 10_000).expect("read the log");
        match events.last() {
            Some(event) => after = event.seq,
            None => return after,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The populated world: the default policy's plans, every kind of key and charge.

pub const KEYS: [&str; 8] = [
    "key-ada",
    "key-bob",
    "key-cy",
    "key-dee",
    "payg-dee",
    "key-ada-acme",
    "key-bob-acme",
    "key-eve",
];
pub const TEAMS: [&str; 6] = ["@ada", "@bob", "@cy", "@dee", "@eve", "acme"];

/// What `populate` left for later calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// Reservations still open: `(id, key)`.
    pub open: Vec<(ReservationId, String)>,
    /// Every outcome, as text, in order: to compare a durable engine with its twin.
    pub outcomes: Vec<String>,
}

/// The time `populate` ends at.
pub const POPULATED_MS: u64 = T0_MS + 5 * HOUR_MS + 30 * MINUTE_MS;

fn consume(
    engine: &Engine,
    key: &str,
    resource: &str,
    quantities: &[(Unit, u64)],
    at_ms: u64,
) -> String {
    let request = UsageRequest::new(key, resource, quantities).at(at_ms);
    format!("{:?}", engine.consume(&request))
}

fn consume_id(
    engine: &Engine,
    key: &str,
    resource: &str,
    quantities: &[(Unit, u64)],
    id: &str,
    at_ms: u64,
) -> String {
    let request = UsageRequest::new(key, resource, quantities)
        .at(at_ms)
        .id(id);
    format!("{:?}", engine.consume(&request))
}

fn reserve(
    engine: &Engine,
    key: &str,
    quantities: &[(Unit, u64)],
    at_ms: u64,
) -> (Option<ReservationId>, String) {
    let request = UsageRequest::new(key, "m2.7", quantities).at(at_ms);
    let outcome = engine.reserve(&request, Some(2 * HOUR_MS));
    let id = outcome
        .as_ref()
        .ok()
        .and_then(|outcome| outcome.reservation);
    (id, format!("{outcome:?}"))
}

/// The admin part of the world: users, a team, seats on four plans, a pay-as-you-go key and
/// top-ups, all at `T0_MS`.
pub fn create_accounts(engine: &Engine) {
    let at = Some(T0_MS);
    for user in ["ada", "bob", "cy", "dee", "eve"] {
        engine
            .create_user(user, &format!("key-{user}"), at)
            .expect("create a user");
    }
    engine.create_team("acme", at).expect("create a team");
    engine
        .add_member("acme", "ada", "key-ada-acme", at)
        .expect("add a member");
    engine
        .add_member("acme", "bob", "key-bob-acme", at)
        .expect("add a member");
    engine
        .create_payg_key("dee", "payg-dee", at)
        .expect("create a pay-as-you-go key");
    for (team, user, plan) in [
        ("@ada", "ada", "Starter"),
        ("@bob", "bob", "Max"),
        ("@cy", "cy", "Bar-Plus"),
        ("@eve", "eve", "Plus"),
        ("acme", "ada", "Plus"),
        ("acme", "bob", "Starter"),
    ] {
        engine.assign_seat(team, user, plan, at).expect("a seat");
    }
    for (team, micros) in [
        ("@ada", 2_000_000),
        ("@dee", 1_000_000),
        ("@cy", 500_000),
        ("acme", 5_000_000),
    ] {
        engine.top_up(team, micros, at).expect("a top-up");
    }
}

/// Builds the world: accounts, then usage on rolling and calendar windows, quota exhausted
/// and falling to credits, a resource not covered, a denial, a usage bar, pay-as-you-go,
/// request ids (one refunded), reservations (open, voided, settled), corrections both ways and
/// a seat change mid-window. Everything between `T0_MS` and `POPULATED_MS`.
pub fn populate(engine: &Engine) -> World {
    create_accounts(engine);
    let mut out = Vec::new();
    let t = T0_MS;
    use Unit::{Characters, Images, Requests, Seconds, Songs, Tokens, Videos};
    out.push(consume(
        engine,
        "key-ada",
        "m2.7",
        &[(Requests, 1_400)],
        t + MINUTE_MS,
    ));
    out.push(consume(
        engine,
        "key-ada",
        "m2.7",
        &[(Requests, 100)],
        t + 2 * HOUR_MS,
    ));
    // Starter's 1,500 requests are used up: this one falls to @ada's credits.
    out.push(consume(
        engine,
        "key-ada",
        "m2.7",
        &[(Requests, 1)],
        t + 2 * HOUR_MS,
    ));
    // Starter does not cover images: credits.
    out.push(consume(
        engine,
        "key-ada",
        "image-01",
        &[(Images, 2)],
        t + 2 * HOUR_MS,
    ));
    out.push(consume(
        engine,
        "key-ada",
        "music-2.6",
        &[(Songs, 1), (Seconds, 200)],
        t + 3 * HOUR_MS,
    ));
    for minutes in [10, 20, 30] {
        // Max allows two videos a day; the third is denied (@bob holds no credits).
        out.push(consume(
            engine,
            "key-bob",
            "hailuo-2.3-768p-6s",
            &[(Videos, 1)],
            t + 4 * HOUR_MS + minutes * MINUTE_MS,
        ));
    }
    out.push(consume(
        engine,
        "key-bob",
        "m2.7",
        &[(Requests, 10), (Tokens, 5_000)],
        t + 4 * HOUR_MS,
    ));
    out.push(consume(
        engine,
        "key-cy",
        "m2.7",
        &[(Requests, 1), (Tokens, 300_000)],
        t + HOUR_MS,
    ));
    out.push(consume(
        engine,
        "key-cy",
        "speech-2.8",
        &[(Characters, 1_000)],
        t + 4 * HOUR_MS,
    ));
    out.push(consume(
        engine,
        "key-dee",
        "m2.7",
        &[(Requests, 2)],
        t + HOUR_MS,
    ));
    out.push(consume(
        engine,
        "payg-dee",
        "m2.7",
        &[(Requests, 1), (Tokens, 1_000)],
        t + HOUR_MS,
    ));
    out.push(consume(
        engine,
        "key-eve",
        "speech-2.8",
        &[(Characters, 3_000)],
        t + 3 * HOUR_MS,
    ));
    out.push(consume(
        engine,
        "key-eve",
        "image-01",
        &[(Images, 7)],
        t + 3 * HOUR_MS,
    ));
    let acme = [
        ("key-ada-acme", "m2.7", Requests, 3, "req-a1"),
        ("key-ada-acme", "image-01", Images, 1, "req-a2"),
        ("key-bob-acme", "m2.7", Requests, 5, "req-b1"),
        ("key-bob-acme", "image-01", Images, 1, "req-b2"),
        // Left unrefunded: from Starter's quota, and from acme's credits (Starter does not
        // cover images).
        ("key-bob-acme", "image-01", Images, 2, "req-b3"),
    ];
    for (key, resource, unit, amount, id) in acme {
        out.push(consume_id(
            engine,
            key,
            resource,
            &[(unit, amount)],
            id,
            t + 4 * HOUR_MS,
        ));
    }
    out.push(format!(
        "{:?}",
        engine.refund("req-a2", Some(t + 4 * HOUR_MS))
    ));
    out.push(format!(
        "{:?}",
        engine.refund("req-b2", Some(t + 4 * HOUR_MS))
    ));
    let mut open = Vec::new();
    let (bob, text) = reserve(engine, "key-bob", &[(Requests, 20)], t + 5 * HOUR_MS);
    out.push(text);
    open.extend(bob.map(|id| (id, "key-bob".to_string())));
    let (cy, text) = reserve(
        engine,
        "key-cy",
        &[(Requests, 1), (Tokens, 50_000)],
        t + 5 * HOUR_MS,
    );
    out.push(text);
    if let Some(cy) = cy {
        out.push(format!("{:?}", engine.void(cy, Some(t + 5 * HOUR_MS))));
    }
    let (acme_id, text) = reserve(engine, "key-ada-acme", &[(Requests, 10)], t + 5 * HOUR_MS);
    out.push(text);
    if let Some(acme_id) = acme_id {
        let settled = engine.settle(acme_id, &[(Requests, 4)], Some(t + 5 * HOUR_MS));
        out.push(format!("{settled:?}"));
    }
    // @dee has no seat: the reservation holds credits.
    let (dee, text) = reserve(engine, "key-dee", &[(Requests, 1)], t + 5 * HOUR_MS);
    out.push(text);
    open.extend(dee.map(|id| (id, "key-dee".to_string())));
    out.push(format!(
        "{:?}",
        engine.adjust_usage(
            "key-bob",
            "m2.7",
            &[(Requests, 7)],
            t + 4 * HOUR_MS,
            AdjustmentDirection::Add,
            Some(t + 5 * HOUR_MS),
        )
    ));
    out.push(format!(
        "{:?}",
        engine.adjust_usage(
            "key-ada",
            "m2.7",
            &[(Requests, 5)],
            t + 2 * HOUR_MS,
            AdjustmentDirection::Remove,
            Some(t + 5 * HOUR_MS),
        )
    ));
    // No `withdraw_credits` here: a withdrawal's effect on `credits_charged_micros` is not
    // replayed the way it is applied (see `log.rs`), which would hide every other difference.
    // An upgrade mid-window: the usage bar's usage carries over.
    out.push(format!(
        "{:?}",
        engine.assign_seat("@cy", "cy", "Bar-Max", Some(t + 5 * HOUR_MS))
    ));
    out.push(consume(
        engine,
        "key-cy",
        "m2.7",
        &[(Requests, 1), (Tokens, 10_000)],
        POPULATED_MS,
    ));
    World {
        open,
        outcomes: out,
    }
}

/// Operations after a reopen, on every part of the world: retried request ids, settling the
/// reservations opened before, more usage on every key, credits moving, a refund. Returns the
/// outcomes as text.
pub fn continue_world(engine: &Engine, world: &World, at_ms: u64) -> Vec<String> {
    use Unit::{Images, Requests, Songs, Tokens};
    let mut out = Vec::new();
    out.push(consume_id(
        engine,
        "key-ada-acme",
        "m2.7",
        &[(Requests, 3)],
        "req-a1",
        at_ms,
    ));
    out.push(consume_id(
        engine,
        "key-bob-acme",
        "m2.7",
        &[(Requests, 5)],
        "req-b1",
        at_ms,
    ));
    for (id, key) in &world.open {
        let actual: &[(Unit, u64)] = if key == "key-dee" {
            &[(Requests, 3)]
        } else {
            &[(Requests, 15)]
        };
        let settled: Result<SettleOutcome, Error> = engine.settle(*id, actual, Some(at_ms));
        out.push(format!("{key}: {settled:?}"));
    }
    for key in KEYS {
        out.push(consume(
            engine,
            key,
            "m2.7",
            &[(Requests, 2), (Tokens, 100)],
            at_ms,
        ));
    }
    out.push(consume(
        engine,
        "key-ada",
        "music-2.6",
        &[(Songs, 1)],
        at_ms,
    ));
    out.push(consume(
        engine,
        "key-eve",
        "image-01",
        &[(Images, 1)],
        at_ms,
    ));
    out.push(format!("{:?}", engine.refund("req-a1", Some(at_ms))));
    out.push(format!("{:?}", engine.top_up("@bob", 300_000, Some(at_ms))));
    out.push(consume(
        engine,
        "key-bob",
        "hailuo-2.3-768p-6s",
        &[(Unit::Videos, 1)],
        at_ms,
    ));
    out
}

/// sled's file lock can outlive a dropped handle for a moment (upstream issue 1234).
pub fn open_sled_retrying(dir: &std::path::Path) -> sled::Db {
    for _ in 0..100 {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    sled::open(dir).expect("sled opens the database")
}

/// The database's segment files, in order.
pub fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir.join("events"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    paths
}

/// Makes a closed database look as if its process had crashed instead: a clean close records
/// that the log was durable through its last event, and a crash records nothing.
pub fn as_if_it_crashed(dir: &Path) {
    let db = open_sled_retrying(dir);
    let meta = db.open_tree("meta").unwrap();
    assert!(
        meta.remove("durable_through").unwrap().is_some(),
        "a clean close"
    );
    db.flush().unwrap();
}

/// Rewrites a database's snapshots as a build of format `version` (2 or 3) wrote them (rolling
/// buckets plain, not packed; integers fixed-width; no list of the keys a correction left
/// short) and its metadata to say `version`; its log's records are left as they are (format
/// 3's are format 4's).
pub fn rewrite_snapshots_in_format(dir: &std::path::Path, version: u16) {
    for entry in std::fs::read_dir(dir.join("snapshots")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let mut body = tally_engine::recovery::snapshot_body_in_format_3(&bytes[32..]).unwrap();
        // The body's own version (its first field); the file header's version, length and crc.
        body[..2].copy_from_slice(&version.to_le_bytes());
        let mut file = bytes[..32].to_vec();
        file[8..10].copy_from_slice(&version.to_le_bytes());
        file[20..28].copy_from_slice(&(body.len() as u64).to_le_bytes());
        file[28..32].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        file.extend(body);
        std::fs::write(&path, file).unwrap();
    }
    let db = open_sled_retrying(dir);
    let meta = db.open_tree("meta").unwrap();
    meta.insert("format_version", &version.to_le_bytes())
        .unwrap();
    db.flush().unwrap();
}
