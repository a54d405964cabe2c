//! Races between cold admin operations (seat changes, policy swaps, revocations with a new key
//! in the old one's place, top-ups and withdrawals, refunds, checkpoints, compaction, reclaim of
//! idle keys) and hot admission (consume with and without ids, batches, submissions,
//! reservations) on a durable engine. Whatever the interleaving, the state the engine reports
//! before `close` is the state a reopen (snapshot and replay) reports, and `verify` finds the
//! database sound.

mod log_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use log_support::{assert_same_state, state, sync_options, TempDir, T0_MS};
use tally_engine::{
    Clock, Engine, EngineOptions, ManualClock, OpenOptions, Policy, ReserveOutcome, Unit,
    UsageRequest,
};

/// Two variants of one policy: `with_extra` has a third plan, `Extra`, which the other drops.
/// Short rolling windows only, so keys go idle (and are reclaimed) within a test's run.
fn policy(with_extra: bool, team_amount: u64) -> Policy {
    let extra = if with_extra {
        r#"
[plans.Extra]
limits = [
  { resource = "chat", unit = "requests", amount = 50, window = "rolling:10s", bucket = "1s" },
]
"#
    } else {
        ""
    };
    let text = format!(
        r#"
time_zone = "UTC"

[resources.chat]
units = ["requests"]
price_micros = {{ requests = 1000 }}

[plans.Team]
limits = [
  {{ resource = "chat", unit = "requests", amount = {team_amount}, window = "rolling:10s", bucket = "1s" }},
  {{ resource = "chat", unit = "requests", amount = 30, window = "rolling:20s", bucket = "1s" }},
]

[plans.Bigger]
limits = [
  {{ resource = "chat", unit = "requests", amount = 40, window = "rolling:10s", bucket = "1s" }},
]
{extra}
"#
    );
    Policy::from_toml_str(&text).unwrap_or_else(|error| panic!("{error}\n{text}"))
}

const USERS: usize = 6;
const TEAM: &str = "acme";

fn options() -> OpenOptions {
    OpenOptions {
        checkpoint_every_events: 500,
        // Small segments and a short retention: compaction removes segments while it races.
        segment_bytes: 16_384,
        retention_ms: 1_000,
        engine: EngineOptions {
            reclaim_idle_every_ms: 50,
            max_ahead_of_clock_ms: 0,
            ..EngineOptions::default()
        },
        ..sync_options()
    }
}

fn chat_request<'a>(key: &'a str, quantities: &'a [(Unit, u64)]) -> UsageRequest<'a> {
    UsageRequest::new(key, "chat", quantities)
}

/// Stops the hot threads when the last admin thread ends, however it ends.
struct LastOut<'a>(&'a std::sync::atomic::AtomicUsize, &'a AtomicBool);

impl Drop for LastOut<'_> {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::SeqCst) == 1 || std::thread::panicking() {
            self.1.store(false, Ordering::SeqCst);
        }
    }
}

/// Keys of the members (their current ones, and every one revoked) under one lock.
struct Keys {
    current: Vec<String>,
    all: Vec<String>,
}

/// Four hot threads (consume, batches, submissions, reservations; some with request ids,
/// some stamped late) on the members of one team, against `ADMINS` admin threads (default
/// 2) changing seats, swapping policies (dropping a plan and bringing it back), topping up
/// and withdrawing, refunding, revoking and rotating keys, correcting usage, checkpointing,
/// compacting (small segments, short retention), reclaiming idle keys and moving the clock.
/// `ROUNDS` (default 2) alternates `Sync` and `None` durability. A stress guard: it found
/// nothing on the code it was written against (30 rounds of 3 admins).
#[test]
fn admin_operations_racing_admission_leave_a_reopen_equal_and_verify_sound() {
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    for round in 0..rounds {
        run_round(round);
    }
}

fn run_round(round: u64) {
    let options = || {
        let mut options = options();
        if round % 2 == 1 {
            options.durability = tally_engine::Durability::None;
        }
        options
    };
    let dir = TempDir::new(&format!("admin-races-{round}"));
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::open(dir.path(), policy(true, 20), clock.clone(), options())
        .expect("open a new database");
    engine.create_team(TEAM, None).expect("team");
    engine.top_up(TEAM, 200_000, None).expect("top-up");
    let mut keys = Keys {
        current: Vec::new(),
        all: Vec::new(),
    };
    for user in 0..USERS {
        let (name, key) = (format!("u{user}"), format!("k{user}"));
        engine
            .create_user(&name, &format!("d{user}"), None)
            .expect("user");
        engine.add_member(TEAM, &name, &key, None).expect("member");
        engine.assign_seat(TEAM, &name, "Team", None).expect("seat");
        keys.current.push(key.clone());
        keys.all.push(key);
    }
    let keys = Mutex::new(keys);
    let running = AtomicBool::new(true);
    let ids = AtomicU64::new(0);
    let refundable = Mutex::new(Vec::<String>::new());
    let admins: u64 = std::env::var("ADMINS")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let start = Barrier::new(4 + admins as usize);
    let admins_left = std::sync::atomic::AtomicUsize::new(admins as usize);
    let rotations = AtomicU64::new(0);
    let rotating = Mutex::new(());
    std::thread::scope(|scope| {
        let (engine, keys, running, ids, refundable, start, clock) =
            (&engine, &keys, &running, &ids, &refundable, &start, &clock);
        // Hot paths: one thread each for consume (some with ids), batches, submissions and
        // reservations.
        for worker in 0..4u64 {
            scope.spawn(move || {
                start.wait();
                let mut n = 0u64;
                while running.load(Ordering::Relaxed) {
                    n += 1;
                    if round % 2 == 1 {
                        // Without fsyncs the hot threads would swamp the admin thread.
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    let key = {
                        let keys = keys.lock().unwrap();
                        keys.current[((n + worker) as usize) % keys.current.len()].clone()
                    };
                    let quantities = [(Unit::Requests, 1 + n % 2)];
                    match worker {
                        0 => {
                            let id = format!("r{}", ids.fetch_add(1, Ordering::Relaxed));
                            let mut request = chat_request(&key, &quantities);
                            if n % 2 == 0 {
                                request.request_id = Some(&id);
                            }
                            let decision = engine.consume(&request).expect("consume");
                            if decision.is_admitted() && request.request_id.is_some() {
                                refundable.lock().unwrap().push(id);
                            }
                        }
                        1 => {
                            let names: Vec<String> = (0..8)
                                .map(|i| {
                                    let keys = keys.lock().unwrap();
                                    keys.current[(n as usize + i) % keys.current.len()].clone()
                                })
                                .collect();
                            let batch_ids: Vec<String> = (0..names.len())
                                .map(|_| format!("r{}", ids.fetch_add(1, Ordering::Relaxed)))
                                .collect();
                            let requests: Vec<UsageRequest<'_>> = names
                                .iter()
                                .zip(&batch_ids)
                                .enumerate()
                                .map(|(i, (name, id))| {
                                    let mut request = chat_request(name, &quantities);
                                    if i % 2 == 0 {
                                        request.request_id = Some(id);
                                    }
                                    request
                                })
                                .collect();
                            for (request, result) in
                                requests.iter().zip(engine.consume_many(&requests))
                            {
                                let decision = result.expect("batch");
                                if let (true, Some(id)) =
                                    (decision.is_admitted(), request.request_id)
                                {
                                    refundable.lock().unwrap().push(id.to_string());
                                }
                            }
                        }
                        2 => {
                            // A late gateway: stamped up to 15 s before the clock, across the
                            // key's windows and the reclaims' time floors.
                            let mut request = chat_request(&key, &quantities);
                            let now = clock.now_ms();
                            request.at_ms = Some(now - (n % 16) * 1_000);
                            let submitted = engine.submit(&request).expect("submit");
                            submitted.complete().expect("complete");
                        }
                        _ => {
                            let request = chat_request(&key, &quantities);
                            let ReserveOutcome { reservation, .. } =
                                engine.reserve(&request, Some(5_000)).expect("reserve");
                            if let Some(id) = reservation {
                                let result = if n % 3 == 0 {
                                    engine.void(id, None).map(|_| ())
                                } else {
                                    let actual = [(Unit::Requests, n % 4)];
                                    let actual = if n % 4 == 0 { &[][..] } else { &actual[..] };
                                    engine.settle(id, actual, None).map(|_| ())
                                };
                                if let Err(error) = result {
                                    // A lease the clock passed meanwhile.
                                    assert!(
                                        matches!(
                                            error,
                                            tally_engine::Error::ReservationClosed { .. }
                                        ),
                                        "{error}"
                                    );
                                }
                            }
                        }
                    }
                }
            });
        }
        // The admin threads: the last one to finish stops the hot ones.
        for admin in 0..admins {
            let (admins_left, rotations, rotating) = (&admins_left, &rotations, &rotating);
            scope.spawn(move || {
                start.wait();
                let _last = LastOut(admins_left, running);
                for step in (admin * 1_000)..(admin * 1_000 + 250u64) {
                    let user = (step as usize * 7) % USERS;
                    let name = format!("u{user}");
                    match step % 10 {
                        0 => {
                            let _ = engine.assign_seat(TEAM, &name, "Bigger", None);
                        }
                        1 => {
                            let _ = engine.unassign_seat(TEAM, &name, None);
                        }
                        2 => {
                            let _ = engine.assign_seat(TEAM, &name, "Extra", None);
                        }
                        3 => {
                            // Drops `Extra` (refused while a working key is seated on it) or
                            // brings it back, with another amount for Team.
                            let with_extra = step % 20 == 13;
                            if !with_extra {
                                for other in 0..USERS {
                                    let other = format!("u{other}");
                                    let _ = engine.assign_seat(TEAM, &other, "Team", None);
                                }
                            }
                            let _ = engine.swap_policy(policy(with_extra, 10 + step % 15), None);
                        }
                        4 => {
                            engine.top_up(TEAM, 30_000, None).expect("top-up");
                            let _ = engine.withdraw_credits(TEAM, 2_000, None);
                        }
                        5 => {
                            let id = refundable.lock().unwrap().pop();
                            if let Some(id) = id {
                                engine.refund(&id, None).expect("refund");
                            }
                        }
                        6 if step % 40 == 6 => {
                            // A leaked key: revoked, and the member given a new one with a seat.
                            let _rotating = rotating.lock().unwrap();
                            let key = keys.lock().unwrap().current[user].clone();
                            assert!(engine.revoke_key(&key, None).expect("revoke"));
                            let rotation = rotations.fetch_add(1, Ordering::Relaxed);
                            let new_key = format!("k{user}-{rotation}");
                            engine
                                .add_member(TEAM, &name, &new_key, None)
                                .expect("rotate");
                            let _ = engine.assign_seat(TEAM, &name, "Team", None);
                            let mut keys = keys.lock().unwrap();
                            keys.current[user] = new_key.clone();
                            keys.all.push(new_key);
                        }
                        7 => {
                            if step % 20 == 7 {
                                engine.checkpoint().expect("checkpoint");
                            } else {
                                let key = keys.lock().unwrap().current[user].clone();
                                let direction = if step % 40 == 17 {
                                    tally_engine::AdjustmentDirection::Add
                                } else {
                                    tally_engine::AdjustmentDirection::Remove
                                };
                                let now = clock.now_ms();
                                let _ = engine.adjust_usage(
                                    &key,
                                    "chat",
                                    &[(Unit::Requests, 3)],
                                    now,
                                    direction,
                                    None,
                                );
                            }
                        }
                        8 => {
                            engine.reclaim_idle(None).expect("reclaim");
                        }
                        _ => {
                            clock.advance_ms(700);
                            if step % 50 == 9 {
                                engine.compact(None).expect("compact");
                            }
                        }
                    }
                    std::thread::yield_now();
                }
            });
        }
    });
    let now_ms = clock.now_ms();
    let all: Vec<String> = keys.lock().unwrap().all.clone();
    let names: Vec<&str> = all.iter().map(String::as_str).collect();
    let before = state(&engine, &names, &[TEAM], now_ms);
    for report in &before.reports {
        for limit in &report.limits {
            assert!(limit.used <= 50, "{report:?}");
        }
    }

    engine.close().expect("close");
    let verified = Engine::verify(dir.path(), options()).expect("verify runs");
    assert!(verified.is_sound(), "round {round}: {verified:?}");
    let clock = Arc::new(ManualClock::new(now_ms));
    let engine = Engine::open_with_stored_policy(dir.path(), policy(true, 20), clock, options())
        .expect("reopen");
    let after = state(&engine, &names, &[TEAM], now_ms);
    assert_same_state(&after, &before, &format!("round {round}: reopened"));
}

/// `Team` and `Bigger` count the same meter over the same windows; `variant` changes the
/// rolling window's bucket width (a swap then re-buckets every ring) and the amounts.
fn exact_policy(variant: u64) -> Policy {
    let bucket = if variant % 2 == 0 { "60s" } else { "120s" };
    // Bigger counts the same meter over the same span with other buckets: a seat change
    // between the plans re-buckets the key's ring.
    let bigger_bucket = if variant % 4 < 2 { "240s" } else { bucket };
    let amount = 100_000 + variant % 3;
    let text = format!(
        r#"
time_zone = "UTC"

[resources.chat]
units = ["requests"]

[plans.Team]
limits = [
  {{ resource = "chat", unit = "requests", amount = {amount}, window = "rolling:1h", bucket = "{bucket}" }},
  {{ resource = "chat", unit = "requests", amount = {amount}, window = "daily" }},
]

[plans.Bigger]
limits = [
  {{ resource = "chat", unit = "requests", amount = 200000, window = "rolling:1h", bucket = "{bigger_bucket}" }},
  {{ resource = "chat", unit = "requests", amount = 200000, window = "daily" }},
]
"#
    );
    Policy::from_toml_str(&text).unwrap_or_else(|error| panic!("{error}\n{text}"))
}

/// Reservations and consumes on keys whose seats change and whose policy is swapped (with
/// other bucket widths) under them, nothing ever denied: every limit counts exactly what was
/// consumed and settled, in memory and after a reopen. A hold taken under one generation and
/// settled (for less, or more) under another gives back and charges exactly.
#[test]
fn swaps_and_seat_changes_racing_reservations_count_exactly_what_was_settled() {
    const KEYS: usize = 4;
    let dir = TempDir::new("admin-races-exact");
    // Noon, far from midnight: every unit stays in both windows.
    let noon_ms = T0_MS - T0_MS % (24 * 3_600_000) + 12 * 3_600_000;
    let clock = Arc::new(ManualClock::new(noon_ms));
    let options = OpenOptions {
        checkpoint_every_events: 300,
        ..options()
    };
    let engine = Engine::open(dir.path(), exact_policy(0), clock.clone(), options.clone())
        .expect("open a new database");
    for user in 0..KEYS {
        let name = format!("u{user}");
        engine
            .create_user(&name, &format!("k{user}"), None)
            .expect("user");
        engine
            .assign_seat(&format!("@{name}"), &name, "Team", None)
            .expect("seat");
    }
    let counted: Vec<AtomicU64> = (0..KEYS).map(|_| AtomicU64::new(0)).collect();
    let running = AtomicBool::new(true);
    std::thread::scope(|scope| {
        let (engine, counted, running, clock) = (&engine, &counted, &running, &clock);
        for worker in 0..3u64 {
            scope.spawn(move || {
                let mut n = worker;
                while running.load(Ordering::Relaxed) {
                    n += 3;
                    let index = (n as usize / 3) % KEYS;
                    let key = format!("k{index}");
                    if worker == 0 {
                        let quantities = [(Unit::Requests, 2)];
                        let id = format!("x{n}");
                        let mut request = chat_request(&key, &quantities);
                        request.request_id = Some(&id);
                        let decision = engine.consume(&request).expect("consume");
                        assert!(decision.is_admitted(), "{decision:?}");
                        counted[index].fetch_add(2, Ordering::Relaxed);
                        if n % 2 == 0 {
                            std::thread::yield_now();
                            engine.refund(&id, None).expect("refund");
                            counted[index].fetch_sub(2, Ordering::Relaxed);
                        }
                        continue;
                    }
                    let estimate = [(Unit::Requests, 3)];
                    let outcome = engine
                        .reserve(&chat_request(&key, &estimate), None)
                        .expect("reserve");
                    let id = outcome.reservation.expect("admitted");
                    std::thread::yield_now();
                    if n % 5 == 0 {
                        engine.void(id, None).expect("void");
                        continue;
                    }
                    let actual = 1 + n % 6; // 1..=6 against an estimate of 3
                    match engine
                        .settle(id, &[(Unit::Requests, actual)], None)
                        .expect("settle")
                    {
                        tally_engine::SettleOutcome::Settled(_) => {
                            counted[index].fetch_add(actual, Ordering::Relaxed);
                        }
                        denied => panic!("{denied:?}"),
                    }
                }
            });
        }
        scope.spawn(move || {
            let _stop = log_support::StoreOnDrop(running, false);
            for step in 0..1_500u64 {
                let user = format!("u{}", step as usize % KEYS);
                let team = format!("@{user}");
                match step % 3 {
                    0 => engine
                        .swap_policy(exact_policy(step / 3), None)
                        .expect("swap"),
                    1 => engine
                        .assign_seat(&team, &user, "Bigger", None)
                        .expect("seat"),
                    _ => engine
                        .assign_seat(&team, &user, "Team", None)
                        .expect("seat"),
                }
                // Spread the units over many buckets of the rolling hour (50 minutes in all).
                clock.advance_ms(2_000);
                std::thread::yield_now();
            }
        });
    });
    let keys: Vec<String> = (0..KEYS).map(|key| format!("k{key}")).collect();
    let names: Vec<&str> = keys.iter().map(String::as_str).collect();
    let now_ms = clock.now_ms();
    let check = |engine: &Engine, context: &str| {
        for (index, key) in keys.iter().enumerate() {
            let report = engine.usage(key, Some(now_ms)).expect("usage");
            let counted = counted[index].load(Ordering::Relaxed);
            for limit in &report.limits {
                assert_eq!(limit.used, counted, "{context}: {key}: {report:?}");
            }
        }
    };
    check(&engine, "in memory");
    let before = state(&engine, &names, &[], now_ms);
    engine.close().expect("close");
    let verified = Engine::verify(dir.path(), options.clone()).expect("verify runs");
    assert!(verified.is_sound(), "{verified:?}");
    let clock = Arc::new(ManualClock::new(now_ms));
    let engine = Engine::open_with_stored_policy(dir.path(), exact_policy(0), clock, options)
        .expect("reopen");
    check(&engine, "reopened");
    assert_same_state(&state(&engine, &names, &[], now_ms), &before, "reopened");
}
