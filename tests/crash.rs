//! The crash test: a process consuming on a database is killed with SIGKILL, again and again,
//! and after the kills the database must hold every request the process was told was admitted,
//! exactly once, and nothing else out of place.
//!
//! The child is the `tally` binary itself (`tally crash-child`, hidden): it opens the database
//! with `Durability::Sync`, sets up users, keys, seats and credits if they are missing, then
//! consumes from four threads (two one request at a time, two in `consume_many` batches) with
//! request ids unique to the run, topping up teams that run low, and prints a line for each
//! call only after it returned (see `src/crash_child.rs`). The parent spawns it, waits 20 to
//! 300 ms (a deterministic generator picks; counted from the child's `ready` line in three
//! runs of four, from its start in the fourth, so kills land both while it consumes and while
//! it recovers), kills it (`Child::kill` is SIGKILL on Unix), reads what it printed, and every
//! few kills opens the database itself and checks:
//!
//! - every acknowledged request id is in the log exactly once, charged where the child was told;
//!   no request id is in the log twice; no denied request is in it at all;
//! - sequence numbers have no gaps, and `Engine::verify` finds the database sound;
//! - no key's usage is over any of its limits;
//! - every team's balance is its top-ups minus its credit charges, as the events say, and every
//!   acknowledged top-up is in the log;
//! - every acknowledged reservation is in the log exactly once, for its key and charged where
//!   the child was told, and every acknowledged settle or void closed it exactly once, as told
//!   (the child also closes each again, racing the first close's fsync); no reservation id was
//!   handed out twice; the reopened engine holds open exactly those opened and not closed; some
//!   reservations are left to a 20 ms lease, and the engine expires them (at a later `reserve`
//!   or in its housekeeping; an event each, never for one told closed);
//! - a retry of acknowledged request ids gets the first decision back and logs nothing;
//! - the child's own retries (a thread sending again the request most recently sent, usually
//!   while its first call waits for its fsync) were answered as the first call was, and an
//!   id acknowledged only through a retry is in the log like any other.
//!
//! At the end it prints `kills=N acked=N lost=0 duplicated=0`. `TALLY_CRASH_KILLS` sets the
//! number of kills (default 100), `TALLY_CRASH_SEED` the generator's seed,
//! `TALLY_CRASH_THREADS` the child's consuming threads (default 4, at most 16). On a failure (or
//! with `TALLY_CRASH_KEEP` set) the work directory is kept: each child's output, and a copy of
//! the database as it was just before the last check.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_engine::event::ReservationEnd;
use tally_engine::{
    ChargedTo, Decision, Engine, EngineOptions, EventBody, OpenOptions, Policy, SystemClock, Unit,
    UsageRequest,
};

const DEFAULT_KILLS: u64 = 100;
const DEFAULT_SEED: u64 = 0x7a11_c0de;
const CHECK_EVERY_KILLS: u64 = 5;
/// Every this many checks (and at the end) the log is read from the start and verified.
const THOROUGH_EVERY_CHECKS: u64 = 4;
const MIN_WAIT_MS: u64 = 20;
const MAX_WAIT_MS: u64 = 300;
/// One kill in this many counts its wait from the child's start, so it lands while the child
/// opens the database (recovery, a checkpoint on opening, the set-up); the others count it from
/// the child's `ready`, so they land while it consumes. Counted from the start only, three
/// kills in four landed before `ready` in a debug build.
const KILL_IN_STARTUP_EVERY: u64 = 4;
const MAX_STARTUP_MS: u64 = 60_000;
const READY_POLL_MS: u64 = 2;
const RETRIES_PER_CHECK: usize = 25;
const EVENTS_PER_READ: usize = 65_536;

/// Quotas that last a while under the child's traffic (so the test sees quota, credits and
/// denials all along), a daily limit next to a rolling one, and a resource priced per image.
const POLICY: &str = r#"
time_zone = "UTC"

[resources.chat]
units = ["requests", "tokens"]
required = ["requests"]
price_micros = { requests = 1000, tokens = 10 }

[resources.image]
units = ["images"]
price_micros = { images = 20000 }

[plans.Small]
limits = [
  { resource = "chat", unit = "requests", amount = 3000, window = "rolling:1h" },
  { resource = "image", unit = "images", amount = 300, window = "daily" },
]

[plans.Large]
limits = [
  { resource = "chat", unit = "requests", amount = 12000, window = "rolling:1h" },
  { resource = "chat", unit = "tokens", amount = 9000, window = "daily" },
  { resource = "image", unit = "images", amount = 1500, window = "daily" },
]
"#;

/// splitmix64: the kill delays and the retried ids, the same for the same seed.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Where an acknowledged request was charged, as the child printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Charged {
    Quota(String),
    Credits(u64),
    PayAsYouGo(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    key: String,
    resource: String,
    quantities: Vec<(Unit, u64)>,
    charged: Charged,
}

/// Everything the children were told, over all kills.
#[derive(Debug, Default)]
struct Ledger {
    acked: HashMap<String, Ack>,
    /// Acknowledged ids in the order they came, for picking retries.
    order: Vec<String>,
    denied: HashSet<String>,
    top_ups: HashMap<String, u64>,
    /// `err` lines and anything unreadable.
    errors: Vec<String>,
    /// Runs that got as far as `ready`.
    ready: u64,
    /// `retry ok` and `retry no` lines: the child's requests sent again, answered.
    retries_answered: u64,
    /// Reservations acknowledged: id -> key and where the estimate was held.
    reserved: HashMap<u64, (String, Charged)>,
    /// Closes acknowledged: id -> the actual amounts of a settle (units with 0 left out), or
    /// `None` for a void.
    closed: HashMap<u64, Option<Vec<(Unit, u64)>>>,
    /// Reserves denied.
    refused: u64,
    /// `retry settled` and `retry voided` lines: closes made again, answered.
    closes_answered_again: u64,
}

fn parse_charged(kind: &str, detail: &str) -> Option<Charged> {
    match (kind, detail.parse::<u64>()) {
        ("quota", _) => Some(Charged::Quota(detail.to_string())),
        ("credits", Ok(micros)) => Some(Charged::Credits(micros)),
        ("payg", Ok(micros)) => Some(Charged::PayAsYouGo(micros)),
        _ => None,
    }
}

/// Amounts in unit order without the zeros: how a settlement's actual amounts compare.
fn nonzero(quantities: impl IntoIterator<Item = (Unit, u64)>) -> Vec<(Unit, u64)> {
    let mut kept: Vec<(Unit, u64)> = quantities
        .into_iter()
        .filter(|&(_, amount)| amount > 0)
        .collect();
    kept.sort_by_key(|&(unit, _)| unit.index());
    kept
}

fn parse_quantities(text: &str) -> Option<Vec<(Unit, u64)>> {
    text.split(',')
        .map(|pair| {
            let (unit, amount) = pair.split_once('=')?;
            Some((Unit::parse(unit)?, amount.parse().ok()?))
        })
        .collect()
}

impl Ledger {
    /// Reads one child's output; only complete lines count (a kill can cut the last one).
    fn read(&mut self, output: &str, run: u64) {
        let complete = match output.rfind('\n') {
            Some(end) => &output[..end],
            None => "",
        };
        for line in complete.lines() {
            if !self.read_line(line) {
                self.errors.push(format!("run {run}: {line}"));
            }
        }
    }

    /// An id may be answered more than once (the child sends requests again, as a client
    /// retrying would); every answer must then be the same.
    fn read_line(&mut self, line: &str) -> bool {
        let mut words: Vec<&str> = line.split(' ').collect();
        if let ["retry", "ok" | "no", ..] = words.as_slice() {
            self.retries_answered += 1;
            words.remove(0);
        }
        if let ["retry", "settled" | "voided", ..] = words.as_slice() {
            self.closes_answered_again += 1;
            words.remove(0);
        }
        match words.as_slice() {
            ["ready"] => {
                self.ready += 1;
                true
            }
            ["topup", team, _micros] => {
                *self.top_ups.entry(team.to_string()).or_default() += 1;
                true
            }
            ["no", id, ..] => {
                self.denied.insert(id.to_string());
                !self.acked.contains_key(*id)
            }
            ["refused", ..] => {
                self.refused += 1;
                true
            }
            // A reservation id is never handed out twice, whatever crashed in between.
            ["reserved", id, key, _resource, _units, kind, detail] => {
                let (Ok(id), Some(charged)) = (id.parse::<u64>(), parse_charged(kind, detail))
                else {
                    return false;
                };
                self.reserved
                    .insert(id, (key.to_string(), charged))
                    .is_none()
            }
            ["settled", id, units] => {
                // Settled for nothing: no units at all.
                let actual = match *units {
                    "" => Some(Vec::new()),
                    units => parse_quantities(units),
                };
                let (Ok(id), Some(actual)) = (id.parse::<u64>(), actual) else {
                    return false;
                };
                self.note_close(id, Some(nonzero(actual)))
            }
            ["voided", id] => id.parse().is_ok_and(|id| self.note_close(id, None)),
            ["ok", id, key, resource, units, kind, detail] => {
                let Some(charged) = parse_charged(kind, detail) else {
                    return false;
                };
                let Some(quantities) = parse_quantities(units) else {
                    return false;
                };
                let ack = Ack {
                    key: key.to_string(),
                    resource: resource.to_string(),
                    quantities,
                    charged,
                };
                match self.acked.get(*id) {
                    Some(earlier) => *earlier == ack,
                    None => {
                        self.order.push(id.to_string());
                        self.acked.insert(id.to_string(), ack);
                        !self.denied.contains(*id)
                    }
                }
            }
            _ => false,
        }
    }
}

impl Ledger {
    /// A close told, the same every time it is told (a close made again answers as the first).
    fn note_close(&mut self, id: u64, actual: Option<Vec<(Unit, u64)>>) -> bool {
        match self.closed.get(&id) {
            Some(earlier) => *earlier == actual,
            None => {
                self.closed.insert(id, actual);
                true
            }
        }
    }
}

/// The test's files: the policy, the database, each child's output, evidence.
struct Workspace {
    directory: PathBuf,
}

impl Workspace {
    fn new() -> Workspace {
        let directory = std::env::temp_dir().join(format!("tally-crash-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(directory.join("children")).expect("the workspace is created");
        std::fs::write(directory.join("policy.toml"), POLICY).expect("the policy is written");
        Workspace { directory }
    }

    fn database(&self) -> PathBuf {
        self.directory.join("db")
    }

    fn policy(&self) -> PathBuf {
        self.directory.join("policy.toml")
    }

    fn child_output(&self, run: u64, stream: &str) -> PathBuf {
        self.directory
            .join("children")
            .join(format!("run-{run:04}.{stream}"))
    }

    /// Keeps a copy of the database as it is now (before a check opens it).
    fn snapshot_database(&self) {
        let copy = self.directory.join("db-before-last-check");
        let _ = std::fs::remove_dir_all(&copy);
        copy_directory(&self.database(), &copy);
    }
}

fn copy_directory(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("the copy's directory is created");
    let entries = std::fs::read_dir(from).expect("the database directory is read");
    for entry in entries.map(|entry| entry.expect("a directory entry")) {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_directory(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("a database file is copied");
        }
    }
}

/// Waits until the child printed `ready` (it opened the database and set it up) or exited.
fn wait_until_ready(child: &mut std::process::Child, stdout_path: &Path) {
    wait_until_printed(child, stdout_path, "ready\n");
}

/// Waits until the child has printed `what` (or has ended), for `MAX_STARTUP_MS` at most.
fn wait_until_printed(child: &mut std::process::Child, stdout_path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_millis(MAX_STARTUP_MS);
    while Instant::now() < deadline {
        let printed = std::fs::read_to_string(stdout_path).unwrap_or_default();
        if printed.contains(what) || child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(READY_POLL_MS));
    }
}

/// Spawns a child, lets it run `wait_ms` (after it is ready, or after its start), kills it, and
/// reads what it printed.
fn run_child(
    workspace: &Workspace,
    run: u64,
    seed: u64,
    (wait_ms, from_ready): (u64, bool),
    ledger: &mut Ledger,
) {
    let stdout_path = workspace.child_output(run, "out");
    let stderr_path = workspace.child_output(run, "err");
    let stdout = std::fs::File::create(&stdout_path).expect("the child's stdout file");
    let stderr = std::fs::File::create(&stderr_path).expect("the child's stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["crash-child", "--seed", &seed.to_string()])
        .args([
            "--threads",
            &env_number("TALLY_CRASH_THREADS", 4).to_string(),
        ])
        .arg("--db")
        .arg(workspace.database())
        .arg("--policy")
        .arg(workspace.policy())
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("the child starts");
    if from_ready {
        wait_until_ready(&mut child, &stdout_path);
    }
    std::thread::sleep(Duration::from_millis(wait_ms));
    let exited_early = child.try_wait().expect("the child's status").is_some();
    let _ = child.kill();
    let status = child.wait().expect("the child is reaped");
    let output = std::fs::read_to_string(&stdout_path).expect("the child's output is read");
    ledger.read(&output, run);
    if exited_early {
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        ledger.errors.push(format!(
            "run {run}: the child exited by itself ({status}) before the kill: {}",
            stderr.trim()
        ));
    }
}

/// What one check found.
#[derive(Debug, Default)]
struct Findings {
    lost: Vec<String>,
    duplicated: Vec<String>,
    problems: Vec<String>,
    events: u64,
    retried: usize,
    /// Reservations the log says expired (the children leave some to their lease).
    expired: usize,
}

/// What the log says, summed up.
#[derive(Debug, Default)]
struct LogSummary {
    /// Request id -> times logged, and where the first was charged.
    requests: HashMap<String, (u64, ChargedTo)>,
    key_team: HashMap<String, String>,
    topped_up_micros: HashMap<String, u64>,
    top_up_events: HashMap<String, u64>,
    credits_charged_micros: HashMap<String, u64>,
    /// Credits a reservation's close gave back (its estimate held more than it charged).
    credits_given_back_micros: HashMap<String, u64>,
    withdrawn_micros: HashMap<String, u64>,
    /// Reservation id -> times opened, its key and where its estimate was held.
    opened: HashMap<u64, (u64, String, ChargedTo)>,
    /// Reservation id -> times closed, and how first.
    closed: HashMap<u64, (u64, ReservationEnd)>,
    last_seq: u64,
    events: u64,
}

/// Reads the events after `summary.last_seq` into `summary`. The last event read before must
/// still be there: a log that lost its tail after a later crash would otherwise go unseen
/// until the next full reading.
fn read_log(engine: &Engine, summary: &mut LogSummary, problems: &mut Vec<String>) {
    if summary.last_seq > 0 {
        match engine.events_after(summary.last_seq - 1, 1) {
            Ok(events) if events.first().map(|event| event.seq) == Some(summary.last_seq) => {}
            other => problems.push(format!(
                "event {} was in the log at the last check; now: {other:?}",
                summary.last_seq
            )),
        }
    }
    loop {
        let events = match engine.events_after(summary.last_seq, EVENTS_PER_READ) {
            Ok(events) => events,
            Err(error) => {
                problems.push(format!(
                    "reading the log after {}: {error}",
                    summary.last_seq
                ));
                return;
            }
        };
        if events.is_empty() {
            return;
        }
        for event in events {
            if summary.last_seq != 0 && event.seq != summary.last_seq + 1 {
                problems.push(format!("event {} follows {}", event.seq, summary.last_seq));
            }
            summary.last_seq = event.seq;
            summary.events += 1;
            summarise_event(summary, event.body, problems);
        }
    }
}

fn summarise_event(summary: &mut LogSummary, body: EventBody, problems: &mut Vec<String>) {
    match body {
        EventBody::UserCreated { user, key } => {
            summary.key_team.insert(key, format!("@{user}"));
        }
        EventBody::MemberAdded { team, key, .. } => {
            summary.key_team.insert(key, team);
        }
        EventBody::CreditsToppedUp { team, micros } => {
            *summary.topped_up_micros.entry(team.clone()).or_default() += micros;
            *summary.top_up_events.entry(team).or_default() += 1;
        }
        EventBody::CreditsWithdrawn { team, micros } => {
            *summary.withdrawn_micros.entry(team).or_default() += micros;
        }
        EventBody::UsageAdmitted {
            key,
            request_id,
            receipt,
            ..
        } => {
            if let ChargedTo::Credits { micros } = receipt.charged_to {
                let team = summary.key_team.get(&key).cloned().unwrap_or_default();
                *summary.credits_charged_micros.entry(team).or_default() += micros;
            }
            match request_id {
                Some(id) => {
                    let entry = summary
                        .requests
                        .entry(id)
                        .or_insert((0, receipt.charged_to));
                    entry.0 += 1;
                }
                None => problems.push(format!("a usage of {key} without a request id")),
            }
        }
        EventBody::ReservationOpened {
            reservation,
            key,
            receipt,
            ..
        } => {
            if let ChargedTo::Credits { micros } = receipt.charged_to {
                let team = summary.key_team.get(&key).cloned().unwrap_or_default();
                *summary.credits_charged_micros.entry(team).or_default() += micros;
            }
            let entry = summary
                .opened
                .entry(reservation)
                .or_insert((0, key, receipt.charged_to));
            entry.0 += 1;
        }
        EventBody::ReservationClosed {
            reservation,
            key,
            end,
            given_back,
        } => {
            let team = summary.key_team.get(&key).cloned().unwrap_or_default();
            *summary
                .credits_given_back_micros
                .entry(team.clone())
                .or_default() += given_back.credits_micros;
            if let ReservationEnd::Settled {
                extra: Some(extra), ..
            } = &end
            {
                if let ChargedTo::Credits { micros } = extra.charged_to {
                    *summary.credits_charged_micros.entry(team).or_default() += micros;
                }
            }
            if !summary.opened.contains_key(&reservation) {
                problems.push(format!("reservation {reservation} closed, never opened"));
            }
            summary.closed.entry(reservation).or_insert((0, end)).0 += 1;
        }
        // A denial under a request id is logged so its retry gets the same answer; it moves
        // nothing, so it neither acknowledges nor charges anything here.
        EventBody::TeamCreated { .. }
        | EventBody::SeatChanged { .. }
        | EventBody::PolicySwapped { .. }
        | EventBody::RequestDenied { .. } => {}
        other => problems.push(format!("an event the child never causes: {}", other.kind())),
    }
}

fn same_charge(policy: &Policy, logged: ChargedTo, told: &Charged) -> bool {
    match (logged, told) {
        (ChargedTo::PlanQuota { plan }, Charged::Quota(name)) => policy
            .plans()
            .get(plan.index())
            .is_some_and(|plan| *plan.name == **name),
        (ChargedTo::Credits { micros }, Charged::Credits(told)) => micros == *told,
        (ChargedTo::PayAsYouGo { micros }, Charged::PayAsYouGo(told)) => micros == *told,
        _ => false,
    }
}

fn check_requests(policy: &Policy, ledger: &Ledger, log: &LogSummary, findings: &mut Findings) {
    for (id, ack) in &ledger.acked {
        match log.requests.get(id) {
            None => findings.lost.push(id.clone()),
            Some((_, logged)) if !same_charge(policy, *logged, &ack.charged) => findings
                .problems
                .push(format!("{id}: told {:?}, logged {logged:?}", ack.charged)),
            Some(_) => {}
        }
    }
    for (id, (count, _)) in &log.requests {
        if *count > 1 {
            findings.duplicated.push(format!("{id} x{count}"));
        }
        if ledger.denied.contains(id) {
            findings
                .problems
                .push(format!("{id} was denied but is in the log"));
        }
    }
}

fn check_limits_and_credits(
    engine: &Engine,
    ledger: &Ledger,
    log: &LogSummary,
    findings: &mut Findings,
) {
    for key in log.key_team.keys() {
        match engine.usage(key, None) {
            Ok(report) => {
                for limit in report
                    .limits
                    .iter()
                    .filter(|limit| limit.used > limit.amount)
                {
                    findings.problems.push(format!(
                        "{key}: {} used {} of {}",
                        limit.name, limit.used, limit.amount
                    ));
                }
            }
            Err(error) => findings.problems.push(format!("usage of {key}: {error}")),
        }
    }
    let teams: HashSet<&String> = log.key_team.values().collect();
    for team in teams {
        let get = |map: &HashMap<String, u64>| map.get(team).copied().unwrap_or(0);
        let expected = (get(&log.topped_up_micros) + get(&log.credits_given_back_micros))
            .checked_sub(get(&log.credits_charged_micros) + get(&log.withdrawn_micros));
        match engine.credits_micros(team) {
            Ok(balance) if Some(balance) == expected => {}
            Ok(balance) => findings.problems.push(format!(
                "team {team}: balance {balance}, but the events say {expected:?} \
                 (top-ups {} + given back {} - charges {})",
                get(&log.topped_up_micros),
                get(&log.credits_given_back_micros),
                get(&log.credits_charged_micros)
            )),
            Err(error) => findings
                .problems
                .push(format!("credits of {team}: {error}")),
        }
        let acked = ledger.top_ups.get(team).copied().unwrap_or(0);
        if acked > get(&log.top_up_events) {
            findings.problems.push(format!(
                "team {team}: {acked} top-ups acknowledged, {} logged",
                get(&log.top_up_events)
            ));
        }
    }
}

/// Every acknowledged reservation and close is in the log once, as told; the reopened engine
/// holds open exactly the reservations opened and not closed.
fn check_reservations(
    engine: &Engine,
    policy: &Policy,
    ledger: &Ledger,
    log: &LogSummary,
    findings: &mut Findings,
) {
    for (id, (key, charged)) in &ledger.reserved {
        match log.opened.get(id) {
            None => findings.lost.push(format!("reservation {id}")),
            Some((_, logged_key, logged)) => {
                if logged_key != key || !same_charge(policy, *logged, charged) {
                    findings.problems.push(format!(
                        "reservation {id}: told {key} {charged:?}, logged {logged_key} {logged:?}"
                    ));
                }
            }
        }
    }
    for (id, actual) in &ledger.closed {
        let logged = match log.closed.get(id).map(|(_, end)| end) {
            None => {
                findings.lost.push(format!("close of reservation {id}"));
                continue;
            }
            Some(ReservationEnd::Settled { settlement, .. }) => {
                Some(nonzero(settlement.actual.pairs()))
            }
            Some(ReservationEnd::Voided) => None,
            Some(ReservationEnd::Expired) => {
                findings
                    .problems
                    .push(format!("reservation {id}: told closed, logged expired"));
                continue;
            }
        };
        if logged != *actual {
            findings.problems.push(format!(
                "reservation {id}: told closed with {actual:?}, logged {logged:?}"
            ));
        }
    }
    for (id, (count, ..)) in &log.opened {
        if *count > 1 {
            findings
                .duplicated
                .push(format!("reservation {id} opened x{count}"));
        }
    }
    for (id, (count, _)) in &log.closed {
        if *count > 1 {
            findings
                .duplicated
                .push(format!("reservation {id} closed x{count}"));
        }
    }
    // Each key counts the reservations open on it: a snapshot cut while a close waited for
    // its flush once counted a closed one for good (and the key could open one fewer).
    let mut open_on: HashMap<&str, u32> = HashMap::new();
    for (id, (_, key, _)) in &log.opened {
        open_on.entry(key).or_default();
        if !log.closed.contains_key(id) {
            *open_on.entry(key).or_default() += 1;
        }
    }
    for (key, open) in open_on {
        match engine.usage(key, None) {
            Ok(report) if report.open_reservations == open => {}
            Ok(report) => findings.problems.push(format!(
                "key {key} counts {} open reservations after reopening; the log leaves {open} \
                 open on it",
                report.open_reservations
            )),
            Err(error) => findings
                .problems
                .push(format!("key {key} after reopening: {error}")),
        }
    }
    let open = log.opened.len() - log.closed.len().min(log.opened.len());
    if engine.open_reservations() != open {
        findings.problems.push(format!(
            "{} reservations open after reopening; the log opened {} and closed {}",
            engine.open_reservations(),
            log.opened.len(),
            log.closed.len()
        ));
    }
}

/// Retries acknowledged ids: each must get its first decision back, and nothing is logged.
fn check_retries(
    engine: &Engine,
    policy: &Policy,
    ledger: &Ledger,
    log: &LogSummary,
    generator: &mut Generator,
    findings: &mut Findings,
) {
    if ledger.order.is_empty() {
        return;
    }
    for _ in 0..RETRIES_PER_CHECK {
        let id = &ledger.order[generator.next() as usize % ledger.order.len()];
        let ack = &ledger.acked[id];
        let request = UsageRequest::new(&ack.key, &ack.resource, &ack.quantities).id(id);
        match engine.consume(&request) {
            Ok(Decision::Admitted(admission))
                if same_charge(policy, admission.charged_to, &ack.charged) => {}
            other => findings.problems.push(format!(
                "retry of {id}: {other:?}, first told {:?}",
                ack.charged
            )),
        }
        findings.retried += 1;
    }
    match engine.events_after(log.last_seq, 1) {
        Ok(events) if events.is_empty() => {}
        Ok(events) => findings
            .problems
            .push(format!("retries logged event {:?}", events[0])),
        Err(error) => findings.problems.push(format!("reading the log: {error}")),
    }
}

/// Opens the database as a restarted gateway would, and checks everything above. The log is
/// read from where the last check stopped, or (`thorough`) from the start, followed then by
/// `Engine::verify` (both cost time growing with the whole log).
fn check(
    workspace: &Workspace,
    ledger: &Ledger,
    log: &mut LogSummary,
    generator: &mut Generator,
    thorough: bool,
) -> Findings {
    let mut findings = Findings::default();
    let policy = Policy::from_toml_str(POLICY).expect("the test's policy loads");
    // The checks' own requests (retries) must log nothing: no housekeeping of the engine's own
    // (an abandoned reservation's lease ended while no child ran; the next child expires it).
    let options = OpenOptions {
        engine: EngineOptions {
            expire_leases_on_its_own: false,
            reclaim_idle_every_ms: 0,
            ..EngineOptions::default()
        },
        ..OpenOptions::default()
    };
    let engine = match Engine::open(workspace.database(), policy, Arc::new(SystemClock), options) {
        Ok(engine) => engine,
        Err(error) => {
            let problem = format!("the database does not reopen: {error}");
            findings.problems.push(problem);
            return findings;
        }
    };
    let policy = engine.policy();
    if thorough {
        *log = LogSummary::default();
    }
    read_log(&engine, log, &mut findings.problems);
    findings.events = log.events;
    findings.expired = log
        .closed
        .values()
        .filter(|(_, end)| matches!(end, ReservationEnd::Expired))
        .count();
    check_requests(&policy, ledger, log, &mut findings);
    check_limits_and_credits(&engine, ledger, log, &mut findings);
    check_reservations(&engine, &policy, ledger, log, &mut findings);
    check_retries(&engine, &policy, ledger, log, generator, &mut findings);
    drop(engine);
    if thorough {
        match Engine::verify(workspace.database(), OpenOptions::default()) {
            Ok(report) if report.is_sound() => {}
            Ok(report) => findings
                .problems
                .push(format!("verify: {:?}", report.problems)),
            Err(error) => findings.problems.push(format!("verify: {error}")),
        }
    }
    findings
}

/// For the closing lines.
#[derive(Debug, Default)]
struct Figures {
    checks: u64,
    retried: usize,
    events: u64,
    expired: usize,
    lost: usize,
    duplicated: usize,
    children_s: f64,
    checks_s: f64,
}

/// Checks the database after `kill` and fails the test, keeping the evidence, on any finding.
fn check_after(
    kill: u64,
    thorough: bool,
    workspace: &Workspace,
    state: (&Ledger, &mut LogSummary, &mut Generator),
    figures: &mut Figures,
) {
    let (ledger, log, generator) = state;
    let started = Instant::now();
    workspace.snapshot_database();
    let findings = check(workspace, ledger, log, generator, thorough);
    figures.checks += 1;
    figures.retried += findings.retried;
    figures.events = findings.events;
    figures.expired = findings.expired;
    figures.lost = findings.lost.len();
    figures.duplicated = findings.duplicated.len();
    figures.checks_s += started.elapsed().as_secs_f64();
    let failed = !findings.lost.is_empty()
        || !findings.duplicated.is_empty()
        || !findings.problems.is_empty()
        || !ledger.errors.is_empty();
    assert!(
        !failed,
        "after kill {kill} (evidence kept in {}: the database as it was before this check in \
         db-before-last-check, each child's output in children/):\n  lost {:?}\n  \
         duplicated {:?}\n  problems {:?}\n  child errors {:?}",
        workspace.directory.display(),
        findings.lost,
        findings.duplicated,
        findings.problems,
        ledger.errors
    );
}

#[test]
fn sigkill_never_loses_or_duplicates_an_acknowledged_request() {
    let kills = env_number("TALLY_CRASH_KILLS", DEFAULT_KILLS);
    let seed = env_number("TALLY_CRASH_SEED", DEFAULT_SEED);
    let workspace = Workspace::new();
    let mut generator = Generator(seed);
    let mut ledger = Ledger::default();
    let mut log = LogSummary::default();
    let mut figures = Figures::default();
    let started = Instant::now();
    for kill in 1..=kills {
        let wait_ms = generator.between(MIN_WAIT_MS, MAX_WAIT_MS);
        let from_ready = kill % KILL_IN_STARTUP_EVERY != 0;
        let child_seed = seed.wrapping_mul(1_000_003).wrapping_add(kill);
        let phase = Instant::now();
        let timing = (wait_ms, from_ready);
        run_child(&workspace, kill, child_seed, timing, &mut ledger);
        figures.children_s += phase.elapsed().as_secs_f64();
        if kill % CHECK_EVERY_KILLS == 0 || kill == kills {
            let thorough = (figures.checks + 1) % THOROUGH_EVERY_CHECKS == 0 || kill == kills;
            let state = (&ledger, &mut log, &mut generator);
            check_after(kill, thorough, &workspace, state, &mut figures);
        }
    }
    // Written to the process's stderr directly, not through `println!`, which the test
    // harness captures: CI's log must show these figures.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "kills={kills} acked={} lost={} duplicated={}",
        ledger.acked.len(),
        figures.lost,
        figures.duplicated
    );
    let _ = writeln!(
        std::io::stderr(),
        "crash test: seed {seed}; {} of {kills} kills after the child was ready; {} checks; \
         {} events in the log; {} denied; {} top-ups; {} retries recognised; {} of the \
         children's own retries answered; {} reservations acknowledged ({} reserves refused), \
         {} closes ({} made again and answered), {} left to their lease expired by the engine; \
         {:.1} s (children {:.1} s, checks {:.1} s)",
        ledger.ready,
        figures.checks,
        figures.events,
        ledger.denied.len(),
        ledger.top_ups.values().sum::<u64>(),
        figures.retried,
        ledger.retries_answered,
        ledger.reserved.len(),
        ledger.refused,
        ledger.closed.len(),
        ledger.closes_answered_again,
        figures.expired,
        started.elapsed().as_secs_f64(),
        figures.children_s,
        figures.checks_s
    );
    assert!(
        ledger.acked.len() as u64 >= kills,
        "the children acknowledged too little"
    );
    assert!(
        ledger.reserved.len() as u64 >= kills / 2 && ledger.closed.len() as u64 >= kills / 4,
        "the children made too few reservations ({}) or closes ({})",
        ledger.reserved.len(),
        ledger.closed.len()
    );
    assert!(
        figures.expired > 0,
        "no reservation left to its lease was expired"
    );
    if std::env::var_os("TALLY_CRASH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&workspace.directory);
    }
}

// ---------------------------------------------------------------------------------------------
// The modes that acknowledge an event once it is queued.

/// The flood child's policy (`tally crash-child --durability ...`, `crash_child::flood`): one
/// plan with room for everything a flood sends, and a price for the key paying with credits.
const FLOOD_POLICY: &str = r#"
time_zone = "UTC"

[resources.chat]
units = ["requests"]
price_micros = { requests = 1000 }

[plans.Flood]
limits = [{ resource = "chat", unit = "requests", amount = 4000000000, window = "rolling:1h" }]
"#;
const FLOOD_PRICE_MICROS: u64 = 1_000;
const FLOOD_CREDITS_MICROS: u64 = 1 << 50;
const FLOOD_THREADS: u64 = 2;
const DEFAULT_FLOOD_KILLS: u64 = 4;
/// What the durability docs promise a process crash loses at most in `Interval` and `None`
/// modes: the queued events and the group the writer took and is writing.
const FLOOD_LOSS_BOUND: u64 = 2 * tally_engine::log::MAX_QUEUED_EVENTS as u64;

/// What one flooded child was told and what its database kept.
#[derive(Debug, Default)]
struct FloodRun {
    acked: u64,
    kept: u64,
    lost: u64,
}

/// Kills a flood child (`durability` is `interval:MS` or `none`) on a new database `wait_ms`
/// after it is ready, reopens the database and checks it against what the child printed.
fn flood_and_kill(directory: &Path, kill: u64, durability: &str, wait_ms: u64) -> FloodRun {
    let db = directory.join(format!("db-{kill}"));
    let stdout_path = directory.join(format!("child-{kill}.out"));
    let stderr_path = directory.join(format!("child-{kill}.err"));
    let stdout = std::fs::File::create(&stdout_path).expect("the child's stdout file");
    let stderr = std::fs::File::create(&stderr_path).expect("the child's stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["crash-child", "--durability", durability])
        .args(["--threads", &FLOOD_THREADS.to_string()])
        .arg("--db")
        .arg(&db)
        .arg("--policy")
        .arg(directory.join("policy.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("the child starts");
    wait_until_ready(&mut child, &stdout_path);
    // Killed `wait_ms` into the flood, counted from its first acknowledgement: counted from
    // `ready`, a child slow to get going on a loaded machine was killed before it had
    // acknowledged anything, which proves nothing of the bound.
    wait_until_printed(&mut child, &stdout_path, "\nacked ");
    std::thread::sleep(Duration::from_millis(wait_ms));
    let exited_early = child.try_wait().expect("the child's status").is_some();
    let _ = child.kill();
    child.wait().expect("the child is reaped");
    let context = format!("kill {kill} ({durability}, {wait_ms} ms after ready)");
    let output = std::fs::read_to_string(&stdout_path).expect("the child's output is read");
    assert!(
        !exited_early && output.starts_with("ready\n"),
        "{context}: the child was not flooding when killed: {output:.300} {}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    // The acknowledged requests of each thread: those numbered below its last `acked` line.
    let mut acked = vec![0u64; FLOOD_THREADS as usize];
    for line in output.lines().skip(1) {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["acked", thread, next] => {
                let (thread, next) = (thread.parse::<usize>(), next.parse::<u64>());
                let (Ok(thread), Ok(next)) = (thread, next) else {
                    panic!("{context}: an unreadable line {line:?}");
                };
                acked[thread] = acked[thread].max(next);
            }
            // The kill may cut the last line short.
            _ if !output.ends_with(&format!("{line}\n")) => {}
            _ => panic!("{context}: the child said {line:?}"),
        }
    }

    let report = Engine::verify(&db, OpenOptions::default()).expect("verify runs");
    assert!(report.is_sound(), "{context}: {:?}", report.problems);
    let options = OpenOptions {
        durability: tally_engine::Durability::None,
        ..OpenOptions::default()
    };
    let policy = Policy::from_toml_str(FLOOD_POLICY).expect("the flood policy");
    let engine = Engine::open(&db, policy, Arc::new(SystemClock), options).expect("reopens");
    // What the log kept: each thread's request numbers, each id once.
    let mut kept: Vec<HashSet<u64>> = vec![HashSet::new(); FLOOD_THREADS as usize];
    let (mut charged_micros, mut topped_up_micros) = (0u64, 0u64);
    let mut duplicated = Vec::new();
    let mut after = 0;
    loop {
        let events = engine
            .events_after(after, EVENTS_PER_READ)
            .expect("read the log");
        let Some(last) = events.last() else { break };
        after = last.seq;
        for event in events {
            match event.body {
                EventBody::CreditsToppedUp { micros, .. } => topped_up_micros += micros,
                EventBody::UsageAdmitted {
                    request_id,
                    receipt,
                    ..
                } => {
                    if let ChargedTo::Credits { micros } = receipt.charged_to {
                        charged_micros += micros;
                    }
                    let id = request_id.expect("every flood request has an id");
                    let parsed = id.strip_prefix('f').and_then(|rest| {
                        let (thread, n) = rest.split_once('-')?;
                        Some((thread.parse::<usize>().ok()?, n.parse::<u64>().ok()?))
                    });
                    let (thread, n) = parsed.unwrap_or_else(|| panic!("{context}: id {id}"));
                    if !kept[thread].insert(n) {
                        duplicated.push(id);
                    }
                }
                _ => {}
            }
        }
    }
    assert!(
        duplicated.is_empty(),
        "{context}: logged twice: {duplicated:?}"
    );
    let mut run = FloodRun::default();
    let (mut quota_kept, mut credits_kept) = (0u64, 0u64);
    for (thread, numbers) in kept.iter().enumerate() {
        let count = numbers.len() as u64;
        // A prefix: the log keeps a prefix of its sequence, and each thread's requests were
        // queued in the order of their numbers.
        assert!(
            numbers.iter().all(|n| *n < count),
            "{context}: thread {thread} kept {count} requests, not its first {count}"
        );
        let lost = acked[thread].saturating_sub(count);
        run.acked += acked[thread];
        run.kept += count;
        run.lost += lost;
        // Requests alternate between the keys: even numbers the quota key, odd the credits.
        quota_kept += count.div_ceil(2);
        credits_kept += count / 2;
    }
    assert!(
        run.lost <= FLOOD_LOSS_BOUND,
        "{context}: {} acknowledged requests lost, more than the documented {FLOOD_LOSS_BOUND}: \
         {run:?}",
        run.lost
    );
    // The state the reopened engine holds is the one those events make, each counted once:
    // the quota key's window holds its kept requests (and no more than its limit), and the
    // credits add up, by the events and by the kept requests.
    let usage = engine.usage("fk-q", None).expect("usage");
    assert_eq!(usage.limits[0].used, quota_kept, "{context}: {run:?}");
    assert!(usage.limits[0].used <= usage.limits[0].amount, "{context}");
    let balance = engine.credits_micros("@flood-c").expect("the balance");
    assert_eq!(topped_up_micros, FLOOD_CREDITS_MICROS, "{context}");
    assert_eq!(balance, topped_up_micros - charged_micros, "{context}");
    assert_eq!(
        charged_micros,
        credits_kept * FLOOD_PRICE_MICROS,
        "{context}"
    );
    engine.close().expect("close");
    run
}

/// `Durability::Interval` and `Durability::None` acknowledge an event once it is queued; the
/// docs promise that a process crash loses at most the queued events and the group the writer
/// took and is writing: `2 * MAX_QUEUED_EVENTS` (32,768). A child floods the log (threads
/// sending `consume_many` batches as fast as they go, so the queue fills up to its bound) and
/// is killed with SIGKILL; the reopened database must hold, of what the child was told was
/// admitted, all but at most that many, each request once, every thread's requests a prefix of
/// what it sent, and a state those events make (usage within its limit and equal to the kept
/// requests, credits adding up).
///
/// What it proves: a process crash (the kill) keeps everything the writer handed to the
/// kernel, as the page cache outlives the process, so this measures exactly the events never
/// written, the bound above. What it does not: a power loss, which also loses what was written
/// but not yet fdatasynced (in `Interval` mode up to its interval's worth and the flush's own
/// time; in `None` mode whatever the kernel had not written back) and cannot be had from a
/// process kill.
///
/// `TALLY_CRASH_FLOOD_KILLS` sets the number of kills (default 4, alternately `interval:1`
/// and `none`).
#[test]
fn sigkill_in_the_modes_that_do_not_wait_loses_at_most_twice_the_queue_bound() {
    let kills = env_number("TALLY_CRASH_FLOOD_KILLS", DEFAULT_FLOOD_KILLS);
    let directory = std::env::temp_dir().join(format!("tally-crash-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).expect("the flood's directory is created");
    std::fs::write(directory.join("policy.toml"), FLOOD_POLICY).expect("the policy is written");
    let started = Instant::now();
    let mut runs = Vec::new();
    for kill in 0..kills {
        let durability = if kill % 2 == 0 { "interval:1" } else { "none" };
        let wait_ms = 100 + 50 * (kill % 3);
        let run = flood_and_kill(&directory, kill, durability, wait_ms);
        runs.push((durability, run));
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "flood crash test: {kills} kills in {:.1} s; lost of acknowledged per kill (bound \
         {FLOOD_LOSS_BOUND}): {}",
        started.elapsed().as_secs_f64(),
        runs.iter()
            .map(|(durability, run)| format!(
                "{durability} {} of {} (kept {})",
                run.lost, run.acked, run.kept
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        runs.iter().all(|(_, run)| run.acked > 0),
        "a child acknowledged nothing before its kill: {runs:?}"
    );
    let _ = std::fs::remove_dir_all(&directory);
}
