//! `tally crash-child` (hidden): the process `tests/crash.rs` kills with SIGKILL, over and over.
//!
//! It opens the database with `Durability::Sync`, sets up a few users, keys, seats and credits
//! if they are missing (a kill may have stopped an earlier child halfway through), then
//! consumes from several threads — some one request at a time, some in `consume_many` batches —
//! with request ids unique to this run, and tops up teams that run low. Another thread keeps
//! up to `SUBMITTED_IN_FLIGHT` requests in flight with `submit`, printing each once `complete`
//! returned it. Another reserves, and settles (for the estimate or less) or voids what it
//! reserved a little later, while one more closes again the reservation most recently closed, as
//! a client retrying would (so it races the first close's fsync). One more thread sends
//! again the request most recently sent, as a client retrying would, usually while its first
//! call still waits for its fsync. It prints a line for every call only after the call
//! returned, so every `ok` line (and every `retry ok`) is a request the engine acknowledged as
//! durable:
//!
//! ```text
//! ready
//! ok <request id> <key> <resource> <unit=n,...> quota <plan>
//! ok <request id> <key> <resource> <unit=n,...> credits <micros>
//! no <request id> <key> <resource> <unit=n,...> <denial reason>
//! retry ok|no|err ...  (as above, for a request sent again)
//! reserved <reservation id> <key> <resource> <unit=n,...> quota|credits|payg <plan or micros>
//! refused <key> <resource> <denial reason>   (a reserve denied)
//! settled <reservation id> <unit=n,...>   (the actual amounts)
//! voided <reservation id>
//! retry settled|voided ...   (a close sent again)
//! topup <team> <micros>
//! err <what> <error>
//! ```
//!
//! The workload is drawn from whatever policy it runs with: any resource, its required units
//! and sometimes its optional ones, small quantities.
//!
//! With `--durability interval:MS` or `--durability none` it runs the flood instead (see
//! `flood`), for the test of what a kill loses in the modes that do not wait for the disk.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_engine::{
    ChargedTo, Decision, Engine, Error, Policy, ReservationId, SettleOutcome, SystemClock, Unit,
    UsageRequest,
};

use crate::cli::CrashChildOptions;
use crate::outcome::{reason_index, DENIAL_REASONS};
use crate::rng::Rng;
use crate::store;

/// The child stops by itself after this long, in case nobody kills it.
const MAX_RUN_MS: u64 = 120_000;
/// Checkpoints come often, so kills land in the middle of them too.
const CHECKPOINT_EVERY_EVENTS: u64 = 5_000;
const MAX_BATCH_REQUESTS: u64 = 8;
/// Each consuming thread pauses this long between calls: calls waiting for their fsync still
/// overlap (a call takes about as long), and the log grows slowly enough that a debug build
/// reopens it quickly after a hundred kills.
const PAUSE_BETWEEN_CALLS: Duration = Duration::from_millis(2);
/// The submitting thread keeps this many requests in flight, over rounds of
/// `SUBMITTED_PER_ROUND`, from its own stream of the generator.
const SUBMITTED_IN_FLIGHT: usize = 8;
const SUBMITTED_PER_ROUND: usize = 16;
const SUBMIT_STREAM: u64 = 1_000;
/// The reserving thread closes a reservation once this many are open, from its own stream.
const RESERVATIONS_OPEN: usize = 3;
/// One reservation in this many is left to its lease, as a crashed gateway would: the engine
/// expires it (an event) once `ABANDONED_LEASE_MS` has passed.
const ABANDONED_ONE_IN: u64 = 6;
const ABANDONED_LEASE_MS: u64 = 20;
const RESERVE_STREAM: u64 = 2_000;
/// The retrying thread's pause: shorter than a call's fsync, so most retries race their first
/// call.
const PAUSE_BETWEEN_RETRIES: Duration = Duration::from_micros(500);
const MAX_QUANTITY: u64 = 3;
/// A team below this balance is topped up by `TOP_UP_MICROS`, now and then (so credits also
/// run out at times).
const LOW_BALANCE_MICROS: u64 = 50_000;
const TOP_UP_MICROS: u64 = 200_000;
const TOP_UP_CHECK_MS: u64 = 15;
const TOP_UP_PER_MILLION: u64 = 300_000;

/// `(user, key of their Default Team, seat on the policy's plan number or none)`.
const USERS: [(&str, &str, Option<usize>); 4] = [
    ("crash-a", "ck-a", Some(0)),
    ("crash-b", "ck-b", Some(1)),
    ("crash-c", "ck-c", None),
    ("crash-d", "ck-d", Some(2)),
];
const TEAM: &str = "crash-team";
/// `(user, key in TEAM, seat)`.
const MEMBERS: [(&str, &str, Option<usize>); 2] = [
    ("crash-a", "ck-team-a", Some(0)),
    ("crash-c", "ck-team-c", None),
];
/// Teams holding credits: every Default Team but crash-d's (its key has quota only), and TEAM.
const CREDIT_TEAMS: [&str; 4] = ["@crash-a", "@crash-b", "@crash-c", TEAM];

/// Every key that sends traffic.
fn keys() -> Vec<&'static str> {
    USERS
        .iter()
        .map(|(_, key, _)| *key)
        .chain(MEMBERS.iter().map(|(_, key, _)| *key))
        .collect()
}

pub fn run(options: &CrashChildOptions, policy: Policy) -> Result<(), Error> {
    if options.durability != tally_engine::Durability::Sync {
        return flood(options, policy);
    }
    let engine = store::open(
        &options.db,
        policy,
        Arc::new(SystemClock),
        tally_engine::Durability::Sync,
        CHECKPOINT_EVERY_EVENTS,
    )?;
    set_up(&engine)?;
    say("ready");
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_millis(MAX_RUN_MS);
    let latest = Mutex::new(None);
    let latest_close = Mutex::new(None);
    std::thread::scope(|scope| {
        for thread in 0..options.threads {
            let (engine, stop, latest) = (&engine, &stop, &latest);
            scope.spawn(move || consume_loop(engine, options.seed, thread, stop, deadline, latest));
        }
        scope.spawn(|| top_up_loop(&engine, options.seed, &stop, deadline));
        scope.spawn(|| submit_loop(&engine, options.seed, &stop, deadline));
        scope.spawn(|| reserve_loop(&engine, options.seed, &stop, deadline, &latest_close));
        scope.spawn(|| reclose_loop(&engine, &stop, deadline, &latest_close));
        retry_loop(&engine, &stop, deadline, &latest);
    });
    Ok(())
}

fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(format!("{line}\n").as_bytes());
    let _ = stdout.flush();
}

fn ignore_existing(result: Result<(), Error>) -> Result<(), Error> {
    match result {
        Err(Error::AlreadyExists { .. }) => Ok(()),
        other => other,
    }
}

/// Creates what is missing; an earlier child may have been killed halfway through.
fn set_up(engine: &Engine) -> Result<(), Error> {
    let policy = engine.policy();
    let plans = policy.plans().len();
    for (user, key, _) in USERS {
        ignore_existing(engine.create_user(user, key, None))?;
    }
    ignore_existing(engine.create_team(TEAM, None))?;
    for (user, key, _) in MEMBERS {
        ignore_existing(engine.add_member(TEAM, user, key, None))?;
    }
    let seats = USERS
        .iter()
        .map(|(user, key, plan)| (format!("@{user}"), *user, *key, *plan))
        .chain(
            MEMBERS
                .iter()
                .map(|(user, key, plan)| (TEAM.to_string(), *user, *key, *plan)),
        );
    for (team, user, key, plan) in seats {
        let Some(plan) = plan.filter(|_| plans > 0) else {
            continue;
        };
        let name = &policy.plans()[plan % plans].name;
        if engine.usage(key, None)?.plan.as_deref() != Some(&**name) {
            engine.assign_seat(&team, user, name, None)?;
        }
    }
    for team in CREDIT_TEAMS {
        if engine.credits_micros(team)? < LOW_BALANCE_MICROS {
            engine.top_up(team, TOP_UP_MICROS, None)?;
            say(&format!("topup {team} {TOP_UP_MICROS}"));
        }
    }
    Ok(())
}

/// One drawn request: key, resource and quantities.
#[derive(Clone)]
struct Drawn {
    key: &'static str,
    resource: String,
    quantities: Vec<(Unit, u64)>,
}

impl Drawn {
    fn units(&self) -> String {
        let parts: Vec<String> = self
            .quantities
            .iter()
            .map(|(unit, amount)| format!("{unit}={amount}"))
            .collect();
        parts.join(",")
    }
}

fn draw(rng: &mut Rng, keys: &[&'static str], policy: &Policy) -> Drawn {
    let key = keys[rng.below(keys.len() as u64) as usize];
    let resources = policy.resources();
    let resource = &resources[rng.below(resources.len() as u64) as usize];
    let mut quantities = Vec::new();
    for unit in Unit::ALL {
        let index = unit.index();
        if !resource.units[index] || !(resource.required[index] || rng.chance(500_000)) {
            continue;
        }
        let cap = resource.max_per_request[index].clamp(1, MAX_QUANTITY);
        quantities.push((unit, rng.between(1, cap)));
    }
    if quantities.is_empty() {
        // A resource with no required unit: its first unit.
        if let Some(unit) = Unit::ALL
            .into_iter()
            .find(|unit| resource.units[unit.index()])
        {
            quantities.push((unit, 1));
        }
    }
    Drawn {
        key,
        resource: resource.name.to_string(),
        quantities,
    }
}

/// Prints the outcome of a call; `prefix` is `"retry "` for a request sent again.
fn report(
    policy: &Policy,
    prefix: &str,
    id: &str,
    drawn: &Drawn,
    outcome: &Result<Decision, Error>,
) {
    let head = format!("{id} {} {} {}", drawn.key, drawn.resource, drawn.units());
    let line = match outcome {
        Ok(Decision::Admitted(admission)) => match admission.charged_to {
            ChargedTo::PlanQuota { plan } => {
                let name = policy
                    .plans()
                    .get(plan.index())
                    .map_or("?", |plan| &*plan.name);
                format!("ok {head} quota {name}")
            }
            ChargedTo::Credits { micros } => format!("ok {head} credits {micros}"),
            ChargedTo::PayAsYouGo { micros } => format!("ok {head} payg {micros}"),
        },
        Ok(Decision::Denied(denial)) => {
            format!(
                "no {head} {}",
                DENIAL_REASONS[reason_index(&denial.reason)].0
            )
        }
        Err(error) => format!("err {id} {error}"),
    };
    say(&format!("{prefix}{line}"));
}

/// The request most recently sent, for `retry_loop` to send again.
type Latest = Mutex<Option<(String, Drawn)>>;

/// Even threads send one request per call, odd threads batches of 2 to 8.
fn consume_loop(
    engine: &Engine,
    seed: u64,
    thread: u64,
    stop: &AtomicBool,
    deadline: Instant,
    latest: &Latest,
) {
    let policy = engine.policy();
    let keys = keys();
    let mut rng = Rng::stream(seed, thread + 1);
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let size = if thread % 2 == 0 {
            1
        } else {
            rng.between(2, MAX_BATCH_REQUESTS)
        };
        let batch: Vec<(String, Drawn)> = (0..size)
            .map(|_| {
                next += 1;
                (
                    format!("c{seed}-t{thread}-{next}"),
                    draw(&mut rng, &keys, &policy),
                )
            })
            .collect();
        let requests: Vec<UsageRequest<'_>> = batch
            .iter()
            .map(|(id, drawn)| {
                UsageRequest::new(drawn.key, &drawn.resource, &drawn.quantities).id(id)
            })
            .collect();
        if let (Ok(mut latest), Some(last)) = (latest.lock(), batch.last()) {
            *latest = Some(last.clone());
        }
        let outcomes = if size == 1 {
            vec![engine.consume(&requests[0])]
        } else {
            engine.consume_many(&requests)
        };
        for ((id, drawn), outcome) in batch.iter().zip(&outcomes) {
            report(&policy, "", id, drawn, outcome);
        }
        if outcomes
            .iter()
            .any(|outcome| matches!(outcome, Err(Error::Storage { .. })))
        {
            // The log failed: nothing more can be acknowledged until it is reopened.
            stop.store(true, Ordering::Relaxed);
        }
        std::thread::sleep(PAUSE_BETWEEN_CALLS);
    }
}

/// Submits requests keeping up to `SUBMITTED_IN_FLIGHT` in flight, and prints each only once
/// `complete` returned it: then it is acknowledged.
fn submit_loop(engine: &Engine, seed: u64, stop: &AtomicBool, deadline: Instant) {
    let policy = engine.policy();
    let keys = keys();
    let mut rng = Rng::stream(seed, SUBMIT_STREAM);
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // A round's requests live until its last is completed (a `Submitted` borrows them).
        // Each carries an id, which the parent looks for in the log.
        let round: Vec<(String, Drawn)> = (0..SUBMITTED_PER_ROUND)
            .map(|_| {
                next += 1;
                (format!("s{seed}-{next}"), draw(&mut rng, &keys, &policy))
            })
            .collect();
        let requests: Vec<UsageRequest<'_>> = round
            .iter()
            .map(|(id, drawn)| {
                UsageRequest::new(drawn.key, &drawn.resource, &drawn.quantities).id(id)
            })
            .collect();
        let mut in_flight = std::collections::VecDeque::new();
        let mut failed = false;
        let mut finish = |(index, submitted): (usize, tally_engine::Submitted<'_, '_>)| {
            let (id, drawn) = &round[index];
            let outcome = submitted.complete().map(|(decision, _)| decision);
            failed |= matches!(outcome, Err(Error::Storage { .. }));
            report(&policy, "", id, drawn, &outcome);
        };
        for (index, request) in requests.iter().enumerate() {
            match engine.submit(request) {
                Ok(submitted) => in_flight.push_back((index, submitted)),
                Err(error) => {
                    report(&policy, "", &round[index].0, &round[index].1, &Err(error));
                }
            }
            if in_flight.len() > SUBMITTED_IN_FLIGHT {
                finish(in_flight.pop_front().expect("one is in flight"));
            }
        }
        in_flight.into_iter().for_each(&mut finish);
        if failed {
            stop.store(true, Ordering::Relaxed);
        }
        std::thread::sleep(PAUSE_BETWEEN_CALLS);
    }
}

/// A close of a reservation: settled for these actual amounts, or voided (`None`).
type Close = (ReservationId, Option<Vec<(Unit, u64)>>);

/// The close most recently made, for `reclose_loop` to make again.
type LatestClose = Mutex<Option<Close>>;

fn units_text(quantities: &[(Unit, u64)]) -> String {
    let parts: Vec<String> = quantities
        .iter()
        .map(|(unit, amount)| format!("{unit}={amount}"))
        .collect();
    parts.join(",")
}

/// Closes a reservation and prints it once the call returned; `false` if the log failed.
fn close(engine: &Engine, prefix: &str, (id, actual): &Close) -> bool {
    let outcome = match actual {
        Some(actual) => engine
            .settle(*id, actual, None)
            .map(|outcome| match outcome {
                SettleOutcome::Settled(_) => format!("settled {} {}", id.get(), units_text(actual)),
                // Never for an actual amount within the estimate: the parent fails on it.
                SettleOutcome::Denied(denial) => format!("err settle-{} {denial:?}", id.get()),
            }),
        None => engine
            .void(*id, None)
            .map(|()| format!("voided {}", id.get())),
    };
    match outcome {
        Ok(line) => {
            say(&format!("{prefix}{line}"));
            true
        }
        Err(error) => {
            say(&format!("err close-{} {error}", id.get()));
            !matches!(error, Error::Storage { .. })
        }
    }
}

/// Reserves, and once `RESERVATIONS_OPEN` are open settles the oldest for its estimate or less
/// (each unit drawn from 0 to its estimate; nothing at all is a settle too) or voids it, one in
/// four. One reservation in `ABANDONED_ONE_IN` gets a short lease and is never closed: the
/// engine expires it. Prints each reserve and close once it returned.
fn reserve_loop(
    engine: &Engine,
    seed: u64,
    stop: &AtomicBool,
    deadline: Instant,
    latest_close: &LatestClose,
) {
    let policy = engine.policy();
    let keys = keys();
    let mut rng = Rng::stream(seed, RESERVE_STREAM);
    let mut open = std::collections::VecDeque::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let drawn = draw(&mut rng, &keys, &policy);
        let request = UsageRequest::new(drawn.key, &drawn.resource, &drawn.quantities);
        let head = format!("{} {} {}", drawn.key, drawn.resource, drawn.units());
        let abandoned = rng.between(1, ABANDONED_ONE_IN) == 1;
        let lease_ms = abandoned.then_some(ABANDONED_LEASE_MS);
        match engine.reserve(&request, lease_ms) {
            Ok(outcome) => match (outcome.decision, outcome.reservation) {
                (Decision::Admitted(admission), Some(id)) => {
                    let charged = match admission.charged_to {
                        ChargedTo::PlanQuota { plan } => format!(
                            "quota {}",
                            policy
                                .plans()
                                .get(plan.index())
                                .map_or("?", |plan| &*plan.name)
                        ),
                        ChargedTo::Credits { micros } => format!("credits {micros}"),
                        ChargedTo::PayAsYouGo { micros } => format!("payg {micros}"),
                    };
                    say(&format!("reserved {} {head} {charged}", id.get()));
                    if !abandoned {
                        open.push_back((id, drawn.quantities.clone()));
                    }
                }
                (Decision::Denied(denial), _) => say(&format!(
                    "refused {head} {}",
                    DENIAL_REASONS[reason_index(&denial.reason)].0
                )),
                (decision, None) => say(&format!("err reserve {decision:?} without an id")),
            },
            Err(error) => {
                say(&format!("err reserve {error}"));
                if matches!(error, Error::Storage { .. }) {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        }
        if open.len() >= RESERVATIONS_OPEN {
            let (id, estimate) = open.pop_front().expect("reservations are open");
            let actual = (!rng.chance(250_000)).then(|| {
                // A unit not given is settled at 0.
                estimate
                    .iter()
                    .map(|&(unit, amount)| (unit, rng.between(0, amount)))
                    .filter(|&(_, amount)| amount > 0)
                    .collect::<Vec<_>>()
            });
            let made = (id, actual);
            if let Ok(mut latest) = latest_close.lock() {
                *latest = Some(made.clone());
            }
            if !close(engine, "", &made) {
                stop.store(true, Ordering::Relaxed);
            }
        }
        std::thread::sleep(PAUSE_BETWEEN_CALLS);
    }
}

/// Makes the close most recently made again: a settle answers the first settlement, a void is
/// a no-op, each only once the first close is durable.
fn reclose_loop(engine: &Engine, stop: &AtomicBool, deadline: Instant, latest: &LatestClose) {
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(PAUSE_BETWEEN_RETRIES);
        let Some(made) = latest.lock().ok().and_then(|latest| latest.clone()) else {
            continue;
        };
        if !close(engine, "retry ", &made) {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Sends the request most recently sent again, now with `consume`, now with `consume_many`:
/// a client's retry, which the engine answers with the first decision only once that decision
/// is durable (so a kill may leave it unanswered, never answered and lost).
fn retry_loop(engine: &Engine, stop: &AtomicBool, deadline: Instant, latest: &Latest) {
    let policy = engine.policy();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(PAUSE_BETWEEN_RETRIES);
        let Some((id, drawn)) = latest.lock().ok().and_then(|latest| latest.clone()) else {
            continue;
        };
        let request = UsageRequest::new(drawn.key, &drawn.resource, &drawn.quantities).id(&id);
        sent += 1;
        let outcome = if sent % 2 == 0 {
            engine.consume(&request)
        } else {
            let mut outcomes = engine.consume_many(std::slice::from_ref(&request));
            debug_assert_eq!(outcomes.len(), 1, "one result per request");
            outcomes.swap_remove(0)
        };
        report(&policy, "retry ", &id, &drawn, &outcome);
        if matches!(outcome, Err(Error::Storage { .. })) {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

fn top_up_loop(engine: &Engine, seed: u64, stop: &AtomicBool, deadline: Instant) {
    let mut rng = Rng::stream(seed, 0);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(TOP_UP_CHECK_MS));
        for team in CREDIT_TEAMS {
            let low = engine
                .credits_micros(team)
                .is_ok_and(|balance| balance < LOW_BALANCE_MICROS);
            if !low || !rng.chance(TOP_UP_PER_MILLION) {
                continue;
            }
            match engine.top_up(team, TOP_UP_MICROS, None) {
                Ok(_) => say(&format!("topup {team} {TOP_UP_MICROS}")),
                Err(error) => {
                    say(&format!("err topup-{team} {error}"));
                    stop.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The database the child opens must not be a path typed by mistake: it is a test's.
/// The flood's users: `FLOOD_QUOTA_KEY` is seated on `FLOOD_PLAN`, `FLOOD_CREDITS_KEY` has no
/// seat and pays from its Default Team's `FLOOD_CREDITS_MICROS`.
pub const FLOOD_PLAN: &str = "Flood";
pub const FLOOD_RESOURCE: &str = "chat";
const FLOOD_QUOTA_KEY: (&str, &str) = ("flood-q", "fk-q");
const FLOOD_CREDITS_KEY: (&str, &str) = ("flood-c", "fk-c");
const FLOOD_CREDITS_MICROS: u64 = 1 << 50;
/// Requests per `consume_many` of a flood thread: four of its chunks of 64.
const FLOOD_BATCH: u64 = 256;
/// The flood checkpoints this often, so kills land in the middle of them too.
const FLOOD_CHECKPOINT_EVERY_EVENTS: u64 = 40_000;

/// `tally crash-child --durability interval:MS|none` (for `tests/crash.rs`): the modes that
/// acknowledge an event once it is queued, flooded so their queue fills. It opens a new
/// database with that durability on the policy it is given (which must have the plan
/// `FLOOD_PLAN` on the resource `FLOOD_RESOURCE`, with room for everything it sends), makes a
/// key seated on it and a key paying with credits, prints `ready`, then consumes from
/// `threads` threads as fast as `consume_many` goes, in batches of `FLOOD_BATCH` of one request
/// each (alternately the two keys), with request ids `f<thread>-<n>`, `n` counting from 0. After
/// each batch returned, every request of it admitted, it prints `acked <thread> <n>`: the
/// thread's requests below `n` were acknowledged. A request not admitted, or an error, is
/// printed as `err <thread> ...` and ends the thread.
fn flood(options: &CrashChildOptions, policy: Policy) -> Result<(), Error> {
    let engine = store::open(
        &options.db,
        policy,
        Arc::new(SystemClock),
        options.durability,
        FLOOD_CHECKPOINT_EVERY_EVENTS,
    )?;
    let (user, key) = FLOOD_QUOTA_KEY;
    engine.create_user(user, key, None)?;
    engine.assign_seat(&format!("@{user}"), user, FLOOD_PLAN, None)?;
    let (user, key) = FLOOD_CREDITS_KEY;
    engine.create_user(user, key, None)?;
    engine.top_up(&format!("@{user}"), FLOOD_CREDITS_MICROS, None)?;
    // The set-up is on disk before anything is acknowledged that depends on it.
    engine.sync()?;
    say("ready");
    let deadline = Instant::now() + Duration::from_millis(MAX_RUN_MS);
    std::thread::scope(|scope| {
        for thread in 0..options.threads {
            let engine = &engine;
            scope.spawn(move || flood_loop(engine, thread, deadline));
        }
    });
    Ok(())
}

fn flood_loop(engine: &Engine, thread: u64, deadline: Instant) {
    let one = [(Unit::Requests, 1)];
    let mut next = 0u64;
    while Instant::now() < deadline {
        let ids: Vec<String> = (next..next + FLOOD_BATCH)
            .map(|n| format!("f{thread}-{n}"))
            .collect();
        let requests: Vec<UsageRequest<'_>> = ids
            .iter()
            .enumerate()
            .map(|(index, id)| {
                let key = if index % 2 == 0 {
                    FLOOD_QUOTA_KEY.1
                } else {
                    FLOOD_CREDITS_KEY.1
                };
                UsageRequest::new(key, FLOOD_RESOURCE, &one).id(id)
            })
            .collect();
        for (result, id) in engine.consume_many(&requests).iter().zip(&ids) {
            match result {
                Ok(decision) if decision.is_admitted() => {}
                Ok(decision) => {
                    say(&format!("err {thread} {id} not admitted: {decision:?}"));
                    return;
                }
                Err(error) => {
                    say(&format!("err {thread} {id} {error}"));
                    return;
                }
            }
        }
        next += FLOOD_BATCH;
        say(&format!("acked {thread} {next}"));
    }
}

pub fn check_path(path: &Path) -> Result<(), String> {
    store::check_openable(path, true).map(|_| ())
}
