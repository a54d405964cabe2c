//! The durable event log through the engine's public API: recovery after close and after drop
//! (with and without checkpoints), idempotency across restarts, a persisted policy swap, export
//! with cursors, retention and compaction, `verify`, the errors of opening, and the sled hazards
//! handled at open.
//!
//! Recovery is judged against a twin: an in-memory engine fed the same operations that never
//! closes. Before a restart the durable engine and its twin must agree; after it, the reopened
//! engine must report exactly the state it had, and decide every later operation exactly as the
//! twin does.

mod log_support;

use log_support::*;
use tally_engine::event::{
    decode_body, encode_body, encode_record_into, RecordView, FORMAT_VERSION,
};
use tally_engine::policy::TOKEN_PLAN_TOML;
use tally_engine::{
    Decision, DenialReason, Durability, Engine, Error, EventBody, OpenOptions, Policy, Unit,
    UsageRequest, MAX_CREDITS_MICROS,
};

// ---------------------------------------------------------------------------------------------
// Recovery.

#[derive(Clone, Copy, Debug)]
enum Shutdown {
    /// `close()`: checkpoint, flush, close.
    Close,
    /// Plain drop: flush and close, no checkpoint.
    Drop,
}

fn shut(engine: Engine, how: Shutdown) {
    match how {
        Shutdown::Close => engine.close().expect("close"),
        Shutdown::Drop => drop(engine),
    }
}

/// Populates a durable engine and its twin, optionally checkpoints, adds `bulk` more usage
/// events (with request ids), shuts down, reopens, and checks the state and every later
/// decision against the twin.
fn recovery_case(label: &str, options: OpenOptions, how: Shutdown, checkpoint: bool, bulk: u64) {
    let dir = TempDir::new(label);
    let engine = open_token_plan(dir.path(), options.clone());
    let twin_clock = log_support::clock();
    let twin = Engine::new(
        Policy::token_plan(),
        twin_clock.clone(),
        tally_engine::EngineOptions::default(),
    )
    .expect("valid options");
    let world = populate(&engine);
    assert_eq!(
        world,
        populate(&twin),
        "the durable engine and its twin disagree"
    );
    assert!(
        world
            .outcomes
            .iter()
            .any(|outcome| outcome.contains("Denied")),
        "the world should hold a denial"
    );
    assert_eq!(world.open.len(), 2, "two reservations stay open");
    if checkpoint {
        engine.checkpoint().expect("checkpoint");
    }
    // Odd ones carry a request id and go through `consume_many`, the even ones through `consume`
    // (a `consume` with a request id that crossed the checkpoint threshold once deadlocked; its
    // regression test is `a_consume_with_a_request_id_that_triggers_the_automatic_checkpoint_returns`).
    for index in 0..bulk {
        let id = format!("bulk-{index}");
        let key = KEYS[(index as usize) % KEYS.len()];
        let request = UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)])
            .at(POPULATED_MS + index * SECOND_MS);
        if index % 2 == 0 {
            assert_eq!(engine.consume(&request), twin.consume(&request), "{id}");
        } else {
            let batch = [request.id(&id)];
            assert_eq!(
                engine.consume_many(&batch),
                twin.consume_many(&batch),
                "{id}"
            );
        }
    }
    let at_ms = POPULATED_MS + bulk * SECOND_MS + MINUTE_MS;
    let before = state(&engine, &KEYS, &TEAMS, at_ms);
    assert_same_state(
        &before,
        &state(&twin, &KEYS, &TEAMS, at_ms),
        "before the restart",
    );
    assert!(before
        .reports
        .iter()
        .any(|report| report.limits.iter().any(|limit| limit.used > 0)));
    assert_eq!(before.open_reservations, 2);
    // Without `Sync`, an acknowledged event may still be on its way to sled: export reads sled.
    engine.sync().expect("sync");
    let events = last_seq(&engine);
    shut(engine, how);

    let engine = open_token_plan(dir.path(), options.clone());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, at_ms),
        &before,
        "after reopening",
    );
    assert_eq!(
        last_seq(&engine),
        events,
        "reopening with the same policy logs nothing"
    );
    // Retried request ids (also some of the bulk), then everything else.
    for index in (1..bulk).step_by(36) {
        let id = format!("bulk-{index}");
        let key = KEYS[(index as usize) % KEYS.len()];
        let request = UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)])
            .at(at_ms)
            .id(&id);
        let decision = engine.consume(&request).expect("a retry");
        assert!(decision.is_admitted());
        assert_eq!(Ok(decision), twin.consume(&request), "{id}");
    }
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, at_ms),
        &before,
        "after the retries",
    );
    let continued = continue_world(&engine, &world, at_ms);
    assert_eq!(continued, continue_world(&twin, &world, at_ms));
    assert!(continued.iter().any(|outcome| outcome.contains("Settled")));
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, at_ms),
        &state(&twin, &KEYS, &TEAMS, at_ms),
        "after the later operations",
    );
    assert_eq!(engine.open_reservations(), 0);
    shut(engine, how);

    // And once more: the state after the later operations survives too, and ages out exactly
    // as the twin's (reports at later times last: a report moves a rolling window's head).
    let clock = log_support::clock();
    let engine = open_on_clock(dir.path(), clock.clone(), options);
    for at_ms in [at_ms, at_ms + HOUR_MS, at_ms + DAY_MS] {
        // The day goes by on both clocks.
        clock.set_ms(at_ms);
        twin_clock.set_ms(at_ms);
        assert_same_state(
            &state(&engine, &KEYS, &TEAMS, at_ms),
            &state(&twin, &KEYS, &TEAMS, at_ms),
            &format!("after the second reopening, at {at_ms}"),
        );
    }
}

#[test]
fn after_close_and_reopen_every_window_balance_key_request_id_and_reservation_is_as_before() {
    recovery_case("close", sync_options(), Shutdown::Close, false, 0);
}

#[test]
fn after_drop_and_reopen_every_window_balance_key_request_id_and_reservation_is_as_before() {
    recovery_case("drop", sync_options(), Shutdown::Drop, false, 0);
}

#[test]
fn recovery_from_a_checkpoint_in_the_middle_plus_the_events_after_it_is_exact() {
    recovery_case("middle-drop", sync_options(), Shutdown::Drop, true, 40);
    recovery_case("middle-close", sync_options(), Shutdown::Close, true, 40);
}

#[test]
fn recovery_with_many_events_after_the_last_automatic_checkpoint_is_exact() {
    let options = OpenOptions {
        checkpoint_every_events: 100,
        ..sync_options()
    };
    recovery_case(
        "auto-checkpoint",
        options.clone(),
        Shutdown::Drop,
        false,
        260,
    );

    // The automatic checkpoint did run: a database dropped without `close` has a snapshot.
    let dir = TempDir::new("auto-checkpoint-proof");
    let engine = open_token_plan(dir.path(), options.clone());
    populate(&engine);
    for index in 0..170 {
        let request = UsageRequest::new("key-bob", "m2.7", &[(Unit::Requests, 1)])
            .at(POPULATED_MS + index * SECOND_MS);
        assert!(engine.consume(&request).expect("consume").is_admitted());
    }
    let events = last_seq(&engine);
    drop(engine);
    let report = Engine::verify(dir.path(), options).expect("verify");
    assert!(report.is_sound(), "{:?}", report.problems);
    let snapshot = report
        .snapshot_seq
        .expect("an automatic checkpoint was taken");
    assert!(
        snapshot >= 100 && snapshot <= events,
        "snapshot {snapshot} of {events}"
    );
    assert_eq!(report.snapshot_matches_replay, Some(true));
}

/// Checkpoints cut while admission (plan quota, credits and pay-as-you-go), top-ups, new users,
/// request ids and reservations run on other threads: each snapshot must hold exactly the
/// events up to its sequence number. The cut copies the registry before it write-locks the key
/// shards and team balances after, so a charge or top-up landing in between is the case to
/// catch: `verify` replays from the previous snapshot to the latest and compares, and a reopen
/// from the latest snapshot plus the tail must give the state the engine had.
#[test]
fn checkpoints_cut_under_concurrent_load_hold_exactly_the_events_up_to_them() {
    let dir = TempDir::new("checkpoint-under-load");
    let options = OpenOptions {
        durability: Durability::None,
        checkpoint_every_events: 150,
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    // Even users have a seat; odd ones pay everything with their credits.
    let (_, keys, teams) = racing_world(&engine, 16, |index| (index % 2 == 0).then_some("Starter"));
    let running = std::sync::atomic::AtomicBool::new(true);
    let at = |step: u64| T0_MS + HOUR_MS + step * 50;
    std::thread::scope(|scope| {
        let (engine, keys, teams, running) = (&engine, &keys, &teams, &running);
        // The checkpoints stop with the first worker to finish, so the last one is cut while
        // the others still run.
        scope.spawn(move || {
            let _stops_the_others = StoreOnDrop(running, false);
            for step in 0..1_500u64 {
                let key = &keys[(step as usize * 7) % keys.len()];
                let resource = if step % 3 == 0 { "image-01" } else { "m2.7" };
                let unit = if step % 3 == 0 {
                    Unit::Images
                } else {
                    Unit::Requests
                };
                let quantities = [(unit, 1 + step % 2)];
                let request = UsageRequest::new(key, resource, &quantities).at(at(step));
                if step % 5 == 0 {
                    let batch = [request, request];
                    for result in engine.consume_many(&batch) {
                        result.expect("consume_many");
                    }
                } else {
                    engine.consume(&request).expect("consume");
                }
            }
        });
        scope.spawn(move || {
            let _stops_the_others = StoreOnDrop(running, false);
            for step in 0..600u64 {
                let key = &keys[(step as usize * 5) % (keys.len() - 1)];
                let id = format!("id-{step}");
                let quantities = [(Unit::Requests, 1)];
                let request = UsageRequest::new(key, "m2.7", &quantities)
                    .at(at(step * 2))
                    .id(&id);
                engine.consume(&request).expect("consume with an id");
                if step % 4 == 0 {
                    let estimate = [(Unit::Requests, 2)];
                    let reserve = UsageRequest::new(key, "m2.7", &estimate).at(at(step * 2));
                    let outcome = engine.reserve(&reserve, Some(HOUR_MS)).expect("reserve");
                    if let Some(reservation) = outcome.reservation {
                        if step % 8 == 0 {
                            engine
                                .settle(reservation, &[(Unit::Requests, 1)], Some(at(step * 2)))
                                .expect("settle");
                        } else if step % 12 == 0 {
                            engine.void(reservation, Some(at(step * 2))).expect("void");
                        }
                    }
                }
            }
        });
        scope.spawn(move || {
            let _stops_the_others = StoreOnDrop(running, false);
            for step in 0..400u64 {
                let team = &teams[step as usize % teams.len()];
                engine
                    .top_up(team, 1_000 + step, Some(at(step)))
                    .expect("top-up");
                if step % 10 == 0 {
                    let user = format!("late-{step}");
                    engine
                        .create_user(&user, &format!("key-{user}"), Some(at(step)))
                        .expect("user");
                }
            }
        });
        // Batches of several `consume_many` chunks: each chunk's effects are applied before its
        // events are appended, and a cut must never fall in between.
        scope.spawn(move || {
            let _stops_the_others = StoreOnDrop(running, false);
            for round in 0..12u64 {
                let ids: Vec<String> = (0..150)
                    .map(|index| format!("many-{round}-{index}"))
                    .collect();
                let one = [(Unit::Requests, 1)];
                let batch: Vec<UsageRequest<'_>> = ids
                    .iter()
                    .enumerate()
                    .map(|(index, id)| {
                        let key = &keys[(index * 3 + round as usize) % keys.len()];
                        let request = UsageRequest::new(key, "m2.7", &one).at(at(round * 100));
                        if index % 7 == 0 {
                            request.id(id)
                        } else {
                            request
                        }
                    })
                    .collect();
                for result in engine.consume_many(&batch) {
                    result.expect("consume_many of several chunks");
                }
            }
        });
        scope.spawn(move || {
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                engine.checkpoint().expect("checkpoint");
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
        });
    });
    // A tail after the last snapshot, for the reopen to replay.
    for step in 0..20u64 {
        let quantities = [(Unit::Requests, 1)];
        let request = UsageRequest::new(&keys[0], "m2.7", &quantities).at(at(2_000 + step));
        engine.consume(&request).expect("consume");
    }
    let key_names: Vec<&str> = keys.iter().map(String::as_str).collect();
    let team_names: Vec<&str> = teams.iter().map(String::as_str).collect();
    let end_ms = at(3_000);
    let before = state(&engine, &key_names, &team_names, end_ms);
    // Dropped without `close`: the latest snapshot, or the one `verify` replays from to it,
    // was cut under load.
    drop(engine);
    let report = Engine::verify(dir.path(), options.clone()).expect("verify");
    assert!(report.is_sound(), "{:?}", report.problems);
    assert_eq!(report.snapshot_matches_replay, Some(true));
    assert!(report.snapshot_seq.is_some());
    let reopened = open_token_plan(dir.path(), options);
    let after = state(&reopened, &key_names, &team_names, end_ms);
    assert_same_state(&after, &before, "reopened from a snapshot cut under load");
}

/// Every kind of logged change (consumes, `consume_many` batches, request ids admitted and
/// denied, submissions, refunds, reservations opened, settled within their estimate and past
/// it, voided and expired, top-ups, withdrawals, new users, teams, members and pay-as-you-go
/// keys, seat changes, corrections both ways, policy swaps) made on four threads while a fifth
/// takes checkpoints back to back. The class of bug to catch: an effect applied in a different
/// critical section from the one that appends its event, so a cut can fall between the two and
/// hold the event without the effect or the effect without the event. (A settle or void
/// appended its close under the reservation table's lock but freed its key's slot only once the
/// event was durable, after letting the lock go: reopened from a snapshot cut in between, the
/// key counted the closed reservation open for good, 3bd9c8a.) `verify` replays from the
/// snapshot before the latest to the latest and compares, and a reopen from the latest plus a
/// tail must give the state the engine had.
///
/// The runs vary in turn: every other one moves the clock (leases end, idle windows are
/// reclaimed on their own); two in four wait for the disk at every change (`Durability::Sync`,
/// which makes such gaps wide); the latest snapshot is cut quietly after the load in some (the
/// one before it was cut under load) and under load in the others. Four runs by default, a
/// second or two; `TALLY_STRESS_RUNS=n` makes n of them (`scripts/stress.sh` repeats the
/// default under load instead).
#[test]
fn every_kind_of_change_racing_checkpoints_leaves_snapshots_a_replay_agrees_with() {
    let runs = match std::env::var("TALLY_STRESS_RUNS") {
        Ok(runs) => runs.parse().expect("TALLY_STRESS_RUNS: a number of runs"),
        Err(_) => 4,
    };
    for run in 0..runs {
        changes_of_every_kind_racing_checkpoints(run);
    }
}

fn changes_of_every_kind_racing_checkpoints(run: u64) {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use tally_engine::AdjustmentDirection::{Add, Remove};
    // Every eight runs, each of the eight kinds once; every four, each clock with and without
    // waits for the disk (which widened the gap 3bd9c8a closed), the latest snapshot cut
    // quietly in two of them and under load in the other two.
    let moving_clock = run % 2 == 1;
    let sync = run / 2 % 2 == 0;
    let last_checkpoint_quiet = (run + run / 2 + run / 4) % 2 == 0;
    // Without a wait for the disk the work is done many times faster: more of it, so that
    // checkpoints are cut all through it.
    let rounds = if sync { 1 } else { 8 };
    let context = format!(
        "run {run} ({}, {} clock, the latest snapshot cut {})",
        if sync { "sync" } else { "no sync" },
        if moving_clock { "moving" } else { "still" },
        if last_checkpoint_quiet {
            "quietly"
        } else {
            "under load"
        }
    );
    let dir = TempDir::new("every-change-racing-checkpoints");
    let mut options = OpenOptions {
        durability: if sync {
            Durability::Sync
        } else {
            Durability::None
        },
        checkpoint_every_events: 97,
        ..OpenOptions::default()
    };
    // The changes' stamps race the moving clock's thread, which a loaded machine can leave a
    // day and more behind them (a stress run did): no bound ahead of the clock here.
    options.engine.max_ahead_of_clock_ms = 0;
    if moving_clock {
        options.engine.reclaim_idle_every_ms = MINUTE_MS;
    }
    let clock = log_support::clock();
    let engine = open_on_clock(dir.path(), clock.clone(), options.clone());
    // Two users in three have a seat; the third pays everything with credits.
    let (users, keys, teams) =
        racing_world(&engine, 12, |index| (index % 3 != 2).then_some("Plus"));
    // No seat and no credits: every request under an id is a logged denial.
    engine
        .create_user("broke", "key-broke", Some(T0_MS))
        .expect("user");
    // Keys with usage from before the load, idle through it: what the moving clock reclaims.
    let mut idle_keys: Vec<String> = Vec::new();
    for index in 0..20 {
        let (user, key) = (format!("early-{index}"), format!("key-early-{index}"));
        engine.create_user(&user, &key, Some(T0_MS)).expect("user");
        engine
            .assign_seat(&format!("@{user}"), &user, "Plus", Some(T0_MS))
            .expect("seat");
        let request = UsageRequest::new(&key, "m2.7", &[(Unit::Requests, 1)]).at(T0_MS + index);
        assert!(
            engine.consume(&request).expect("consume").is_admitted(),
            "{context}: {key}"
        );
        idle_keys.push(key);
    }
    // With the clock moving, far enough apart that leases end and windows go idle.
    let spacing = if moving_clock { 30 * SECOND_MS } else { 50 };
    let at = move |step: u64| T0_MS + HOUR_MS + step * spacing;
    let running = AtomicBool::new(true);
    let mut later_keys: Vec<String> = Vec::new();
    let mut later_teams: Vec<String> = Vec::new();
    let cuts_before = engine.cut_lock_times().len();
    std::thread::scope(|scope| {
        let (engine, keys, teams, users) = (&engine, &keys, &teams, &users);
        let (running, clock) = (&running, &clock);
        // Admission and its undoing: consumes, batches, ids, submissions, refunds, denials.
        scope.spawn(move || {
            let _stops_the_others = StoreOnDrop(running, false);
            for step in 0..300 * rounds {
                let key = &keys[(step as usize * 7) % keys.len()];
                let (resource, unit) = if step % 3 == 0 {
                    ("image-01", Unit::Images)
                } else {
                    ("m2.7", Unit::Requests)
                };
                let quantities = [(unit, 1 + step % 2)];
                let request = UsageRequest::new(key, resource, &quantities).at(at(step));
                let id = format!("id-{step}");
                if step % 5 == 0 {
                    for result in engine.consume_many(&[request, request.id(&id)]) {
                        result.expect("consume_many");
                    }
                } else if step % 2 == 0 {
                    let decision = engine
                        .consume(&request.id(&id))
                        .expect("consume with an id");
                    if decision.is_admitted() && step % 4 == 0 {
                        engine.refund(&id, Some(at(step + 1))).expect("refund");
                    }
                } else {
                    engine
                        .submit(&request)
                        .expect("submit")
                        .complete()
                        .expect("complete");
                }
                if step % 11 == 0 {
                    let id = format!("broke-{step}");
                    let denied = UsageRequest::new("key-broke", "m2.7", &[(Unit::Requests, 1)])
                        .at(at(step))
                        .id(&id);
                    let decision = engine.consume(&denied).expect("consume with an id");
                    assert!(!decision.is_admitted(), "{id}: {decision:?}");
                }
            }
        });
        // Reservations on two threads, so a close is often waiting for its event to be
        // durable: settled within the estimate and past it, voided, left to expire.
        for thread in 0..2 {
            scope.spawn(move || {
                let _stops_the_others = StoreOnDrop(running, false);
                let closed = |result: Result<(), Error>| match result {
                    // Its lease ended first.
                    Ok(()) | Err(Error::ReservationClosed { .. }) => {}
                    Err(error) => panic!("closing a reservation: {error}"),
                };
                for step in 0..200 * rounds {
                    let key = &keys[(step as usize * 5 + thread * 6) % keys.len()];
                    let estimate = [(Unit::Requests, 2)];
                    let request = UsageRequest::new(key, "m2.7", &estimate).at(at(step * 2));
                    let lease = if step % 5 == 0 { 60 } else { HOUR_MS };
                    let outcome = engine.reserve(&request, Some(lease)).expect("reserve");
                    if let Some(reservation) = outcome.reservation {
                        let now = Some(at(step * 2));
                        match step % 5 {
                            1 => closed(
                                engine
                                    .settle(reservation, &[(Unit::Requests, 1)], now)
                                    .map(drop),
                            ),
                            2 => closed(
                                engine
                                    .settle(reservation, &[(Unit::Requests, 3)], now)
                                    .map(drop),
                            ),
                            3 => closed(engine.void(reservation, now)),
                            _ => {}
                        }
                    }
                    if step % 7 == 0 {
                        engine
                            .expire_reservations(Some(at(step * 2 + 2)))
                            .expect("expire");
                    }
                }
            });
        }
        // Accounts and credits: top-ups, withdrawals, seats, corrections, new users, teams,
        // members and pay-as-you-go keys, policy swaps.
        let accounts = scope.spawn(move || {
            let _stops_the_others = StoreOnDrop(running, false);
            let (mut later_keys, mut later_teams) = (Vec::new(), Vec::new());
            for step in 0..150 * rounds {
                let index = step as usize % teams.len();
                let (team, now) = (&teams[index], Some(at(step)));
                engine.top_up(team, 1_000 + step, now).expect("top-up");
                if step % 3 == 0 {
                    engine.withdraw_credits(team, 500, now).expect("withdraw");
                }
                if index % 3 != 2 && step % 4 == 0 {
                    let plan = if step % 8 == 0 { "Max" } else { "Plus" };
                    engine
                        .assign_seat(team, &users[index], plan, now)
                        .expect("seat");
                }
                if index % 3 != 2 && step % 5 == 0 {
                    let direction = if step % 10 == 0 { Add } else { Remove };
                    let quantities = [(Unit::Requests, 1)];
                    engine
                        .adjust_usage(&keys[index], "m2.7", &quantities, at(step), direction, now)
                        .expect("adjust usage");
                }
                if step % 25 == 0 {
                    let (user, team) = (format!("late-{step}"), format!("team-{step}"));
                    let (own, member, payg) = (
                        format!("key-{user}"),
                        format!("key-{team}"),
                        format!("payg-{user}"),
                    );
                    engine.create_user(&user, &own, now).expect("user");
                    engine.create_team(&team, now).expect("team");
                    engine
                        .add_member(&team, &user, &member, now)
                        .expect("member");
                    engine.top_up(&team, 1_000_000, now).expect("top-up");
                    engine.create_payg_key(&user, &payg, now).expect("payg key");
                    later_keys.extend([own, member, payg]);
                    later_teams.extend([format!("@{user}"), team]);
                }
                if step % 60 == 30 {
                    engine.swap_policy(Policy::token_plan(), now).expect("swap");
                }
            }
            (later_keys, later_teams)
        });
        // Back to back, until the first of the others is done: the last is cut under load.
        scope.spawn(move || {
            while running.load(Relaxed) {
                engine.checkpoint().expect("checkpoint");
            }
        });
        // The moving clock, soon ahead of the changes' own times: leases end by it and idle
        // windows are reclaimed as of it.
        scope.spawn(move || {
            let mut step = 0;
            while moving_clock && running.load(Relaxed) {
                clock.set_ms(at((step * 8).min(600 * rounds)));
                step += 1;
                if step % 4 == 0 {
                    engine.reclaim_idle(None).expect("reclaim");
                }
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        });
        (later_keys, later_teams) = accounts.join().expect("no panic");
    });
    // Explicit and automatic ones (`checkpoint_every_events`): without waits for the disk, the
    // latter are most of them. One is enough for `verify` to judge a snapshot cut under load.
    let cuts = engine.cut_lock_times().len() - cuts_before;
    assert!(cuts >= 1, "{context}: no checkpoint was cut under load");
    if last_checkpoint_quiet {
        engine.checkpoint().expect("a last checkpoint");
    }
    // A tail after the last snapshot, for the reopen to replay.
    let (tail, end_ms) = (at(1_000 * rounds), at(1_500 * rounds));
    if moving_clock {
        // The clock reaches the tail's times (a day and more after the load, 30 s a step).
        clock.set_ms(end_ms);
    }
    for step in 0..10u64 {
        let request = UsageRequest::new(&keys[0], "m2.7", &[(Unit::Requests, 1)]).at(tail + step);
        engine.consume(&request).expect("consume");
    }
    engine.expire_reservations(Some(end_ms)).expect("expire");
    // Every kind of change was made under load (the setup before it and the tail after it
    // stamped outside these times).
    let mut kinds = std::collections::BTreeSet::new();
    let mut after = 0;
    loop {
        let events = engine.events_after(after, 10_000).expect("read the log");
        let Some(last) = events.last() else { break };
        after = last.seq;
        kinds.extend(
            events
                .iter()
                .filter(|event| (at(0)..tail).contains(&event.at_ms))
                .map(|event| event.body.kind()),
        );
    }
    let every_kind = [
        "credits_topped_up",
        "credits_withdrawn",
        "member_added",
        "payg_key_created",
        "policy_swapped",
        "refunded",
        "request_denied",
        "reservation_closed",
        "reservation_opened",
        "seat_changed",
        "team_created",
        "usage_adjusted",
        "usage_admitted",
        "user_created",
    ];
    assert_eq!(
        kinds,
        every_kind.into(),
        "{context}: the kinds of change made under load"
    );
    let key_names: Vec<&str> = (keys.iter().chain(&idle_keys).chain(&later_keys))
        .map(String::as_str)
        .chain(["key-broke"])
        .collect();
    let team_names: Vec<&str> = (teams.iter().chain(&later_teams))
        .map(String::as_str)
        .chain(["@broke"])
        .collect();
    let before = state(&engine, &key_names, &team_names, end_ms);
    // Dropped without `close`, so no checkpoint is cut on the way out.
    drop(engine);
    let report = Engine::verify(dir.path(), options.clone()).expect("verify");
    assert!(report.is_sound(), "{context}: {:?}", report.problems);
    assert_eq!(report.snapshot_matches_replay, Some(true), "{context}");
    let reopened = open_on_clock(dir.path(), clock, options);
    let after = state(&reopened, &key_names, &team_names, end_ms);
    assert_same_state(&after, &before, &format!("{context}: reopened"));
}

/// The racing tests' world: users `user-0..count` with keys `key-i` in their Default Teams
/// `@user-i`, seated on `seat(i)`'s plan if any, each team topped up with 50 credits; and a
/// pay-as-you-go key `payg-1` of user-1, last in the keys. Returns the users, keys and teams.
fn racing_world(
    engine: &Engine,
    count: usize,
    seat: impl Fn(usize) -> Option<&'static str>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut users, mut keys, mut teams) = (Vec::new(), Vec::new(), Vec::new());
    for index in 0..count {
        let (user, key, team) = (
            format!("user-{index}"),
            format!("key-{index}"),
            format!("@user-{index}"),
        );
        engine.create_user(&user, &key, Some(T0_MS)).expect("user");
        if let Some(plan) = seat(index) {
            engine
                .assign_seat(&team, &user, plan, Some(T0_MS))
                .expect("seat");
        }
        engine
            .top_up(&team, 50_000_000, Some(T0_MS))
            .expect("top-up");
        users.push(user);
        keys.push(key);
        teams.push(team);
    }
    engine
        .create_payg_key("user-1", "payg-1", Some(T0_MS))
        .expect("payg key");
    keys.push("payg-1".into());
    (users, keys, teams)
}

/// Runs `work` on its own thread and fails if it has not finished within `seconds` (the thread
/// is left behind: a deadlocked call cannot be cancelled).
fn finishes_within<T: Send + 'static>(
    seconds: u64,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    receiver
        .recv_timeout(std::time::Duration::from_secs(seconds))
        .unwrap_or_else(|_| panic!("still running after {seconds} s: deadlocked"))
}

/// `consume` with a request id holds the id's idempotency shard lock while it waits for its
/// event and then runs `maybe_checkpoint`; the checkpoint's cut locks every idempotency shard,
/// including the one this thread already holds (parking_lot mutexes are not reentrant).
#[test]
fn a_consume_with_a_request_id_that_triggers_the_automatic_checkpoint_returns() {
    let dir = TempDir::new("checkpoint-deadlock");
    let options = OpenOptions {
        checkpoint_every_events: 5,
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options);
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ada", "ada", "Max", Some(T0_MS))
        .unwrap();
    let engine = std::sync::Arc::new(engine);
    let worker = std::sync::Arc::clone(&engine);
    let admitted = finishes_within(20, move || {
        (0..10)
            .map(|index| {
                let id = format!("id-{index}");
                let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 1)])
                    .at(T0_MS)
                    .id(&id);
                worker
                    .consume(&request)
                    .map(|decision| decision.is_admitted())
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(admitted, vec![Ok(true); 10]);
}

/// In the modes that do not wait for durability, a background checkpoint fdatasyncs the log
/// itself before storing its snapshot. When that fails, the log fails as after any failed
/// flush (the kernel may have dropped the pages it could not write, and a later fdatasync
/// could succeed without them): later calls are refused and no snapshot claims those events.
/// Before, the error only stopped the snapshot, and the engine went on acknowledging.
#[test]
fn a_failed_fdatasync_before_a_background_snapshot_fails_the_log() {
    let dir = TempDir::new("snapshot-sync-fails");
    let faults = tally_engine::Faults::new();
    let options = OpenOptions {
        durability: Durability::None,
        checkpoint_every_events: 20,
        faults: Some(std::sync::Arc::clone(&faults)),
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options);
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .unwrap();
    // Nothing else in this mode fdatasyncs through the fault hook until a segment is sealed.
    faults.fail_next_flushes(1);
    let one = [(Unit::Requests, 1)];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut admitted = 0u64;
    let refused = loop {
        let request = UsageRequest::new("payg-ada", "m2.7", &one).at(T0_MS + admitted);
        match engine.consume(&request) {
            Ok(_) => admitted += 1,
            Err(error) => break error,
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still acknowledging after {admitted} requests and a failed fdatasync"
        );
        if admitted % 20 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };
    // The log's first three events (the policy, the user, the key) and 17 requests make the
    // 20 after which a checkpoint is due; the refusal comes after it, never before.
    assert!(admitted >= 17, "a checkpoint was due first: {admitted}");
    assert!(refused.to_string().contains("injected fault"), "{refused}");
    assert!(
        engine.checkpoint().is_err(),
        "the failed log takes no checkpoint"
    );
}

#[test]
fn recovery_is_exact_with_interval_and_no_explicit_durability_too() {
    for (label, durability) in [
        ("interval", Durability::Interval { ms: 5 }),
        ("none", Durability::None),
    ] {
        let options = OpenOptions {
            durability,
            ..OpenOptions::default()
        };
        recovery_case(label, options, Shutdown::Drop, false, 20);
    }
}

// ---------------------------------------------------------------------------------------------
// Idempotency across restarts.

fn idempotency_case(label: &str, how: Shutdown) {
    let dir = TempDir::new(label);
    let engine = open_token_plan(dir.path(), sync_options());
    create_accounts(&engine);
    let quantities = [(Unit::Requests, 7)];
    let request = UsageRequest::new("key-ada", "m2.7", &quantities)
        .at(T0_MS + MINUTE_MS)
        .id("retry-me");
    let first = engine.consume(&request).expect("consume");
    assert!(first.is_admitted());
    let before = state(&engine, &KEYS, &TEAMS, T0_MS + HOUR_MS);
    assert_eq!(before.reports[0].limits[0].used, 7);
    shut(engine, how);

    let engine = open_token_plan(dir.path(), sync_options());
    let retried = engine
        .consume(&request.at(T0_MS + 2 * MINUTE_MS))
        .expect("the retry");
    assert_eq!(retried, first, "the retry returns the first decision");
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, T0_MS + HOUR_MS),
        &before,
        "counted once",
    );
    let other = [(Unit::Requests, 8)];
    let conflict = engine.consume(
        &UsageRequest::new("key-ada", "m2.7", &other)
            .at(T0_MS + 2 * MINUTE_MS)
            .id("retry-me"),
    );
    assert!(
        matches!(conflict, Err(Error::RequestIdConflict { .. })),
        "{conflict:?}"
    );
    // Once more across a second restart, after the retry.
    shut(engine, how);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.consume(&request), Ok(first));
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, T0_MS + HOUR_MS),
        &before,
        "state",
    );
}

#[test]
fn a_request_id_admitted_before_a_close_and_retried_after_it_is_counted_once() {
    idempotency_case("idempotent-close", Shutdown::Close);
}

#[test]
fn a_request_id_admitted_before_a_drop_and_retried_after_it_is_counted_once() {
    idempotency_case("idempotent-drop", Shutdown::Drop);
}

#[test]
fn a_request_id_admitted_in_a_consume_many_batch_is_recognised_after_a_reopen() {
    let dir = TempDir::new("idempotent-batch");
    let engine = open_token_plan(dir.path(), sync_options());
    create_accounts(&engine);
    let one = [(Unit::Requests, 1)];
    let requests: Vec<UsageRequest<'_>> = ["b1", "b2", "b3"]
        .iter()
        .map(|id| UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS).id(id))
        .collect();
    let first: Vec<_> = engine.consume_many(&requests);
    assert!(first
        .iter()
        .all(|result| matches!(result, Ok(d) if d.is_admitted())));
    let before = state(&engine, &KEYS, &TEAMS, T0_MS);
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.consume_many(&requests), first);
    assert_same_state(&state(&engine, &KEYS, &TEAMS, T0_MS), &before, "state");
}

/// `consume_many` queues its chunks without waking the log's writer and wakes it once at the
/// end: its events are written without any later call, in every mode (here `None`, whose
/// writer sleeps until woken).
#[test]
fn a_consume_many_batch_is_written_without_any_later_call() {
    let dir = TempDir::new("batch-written");
    let options = OpenOptions {
        durability: Durability::None,
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options);
    create_accounts(&engine);
    engine.sync().expect("sync");
    let before = engine.events_after(0, 100_000).expect("read").len();
    // Let the writer fall asleep on an empty queue.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let one = [(Unit::Requests, 1)];
    // Three chunks of the staged batch, fewer events than wake the writer on their own.
    let requests: Vec<UsageRequest<'_>> = (0..150)
        .map(|offset| UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS + offset))
        .collect();
    let admitted = engine
        .consume_many(&requests)
        .iter()
        .filter(|result| matches!(result, Ok(decision) if decision.is_admitted()))
        .count();
    assert!(
        admitted > 64,
        "the batch should fill more than one chunk: {admitted}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let written = engine.events_after(0, 100_000).expect("read").len() - before;
        if written == admitted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{written} of {admitted} events written after 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// When the flush a `consume_many` waits for fails, the events made durable before it (a
/// segment is fdatasynced as it is sealed) stay in the log: their requests are admitted, and
/// only the rest are given back and answer the error. Before, every request of the batch was
/// given back and answered the error, and the reopen counted the durable ones anyway (0 of
/// 4,000 acknowledged, 3,584 in the log).
#[test]
fn a_failed_flush_at_the_end_of_a_batch_gives_back_only_what_is_not_durable() {
    let one = [(Unit::Requests, 1)];
    let ids: Vec<String> = (0..10_000).map(|index| format!("many-{index}")).collect();
    let requests: Vec<UsageRequest<'_>> = (0..10_000u64)
        .map(|offset| {
            let request = UsageRequest::new("payg-ann", "m2.7", &one).at(T0_MS + offset);
            // Every other one with a request id: an id given back is forgotten, a kept one not.
            match offset % 2 {
                0 => request.id(&ids[offset as usize]),
                _ => request,
            }
        })
        .collect();
    let mut partial = 0;
    for attempt in 0..50 {
        let dir = TempDir::new(&format!("many-partial-{attempt}"));
        let faults = tally_engine::Faults::new();
        let options = OpenOptions {
            segment_bytes: 300_000,
            faults: Some(std::sync::Arc::clone(&faults)),
            ..sync_options()
        };
        let engine = open_token_plan(dir.path(), options.clone());
        engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
        engine
            .create_payg_key("ann", "payg-ann", Some(T0_MS))
            .unwrap();
        let before = last_seq(&engine);
        // Sealing a segment fdatasyncs it without this hook; the flush the batch waits for
        // fails. About 46 bytes an event: the first segment is sealed partway through the
        // batch, and the second is not full at its end (unless the writer took the whole batch
        // in one group, which a loaded machine can make it do: then the attempt is repeated).
        faults.fail_next_flushes(1);
        let results = engine.consume_many(&requests);
        let acknowledged: Vec<usize> = (0..requests.len())
            .filter(|&index| results[index].is_ok())
            .collect();
        let spent = engine.usage("payg-ann", Some(T0_MS)).unwrap().payg_micros;
        drop(engine);
        let engine = open_token_plan(
            dir.path(),
            OpenOptions {
                faults: None,
                ..options
            },
        );
        let on_disk = engine
            .events_after(before, 100_000)
            .unwrap()
            .iter()
            .filter(|event| event.body.kind() == "usage_admitted")
            .count();
        assert_eq!(
            on_disk,
            acknowledged.len(),
            "attempt {attempt}: acknowledged and logged differ"
        );
        assert_eq!(
            engine.usage("payg-ann", Some(T0_MS)).unwrap().payg_micros,
            spent,
            "attempt {attempt}: spend before the reopen and after"
        );
        // The acknowledged ones come first (a prefix of the log), and each id among them is
        // remembered: a retry is a replay, counted once.
        assert!(acknowledged
            .iter()
            .enumerate()
            .all(|(at, &index)| at == index));
        if let Some(&index) = acknowledged.iter().find(|&&index| index % 2 == 0) {
            let (retry, replays) = engine.consume_many_noting_replay(&requests[index..=index]);
            assert!(
                retry[0].is_ok() && replays[0],
                "attempt {attempt}: id {index}"
            );
            assert_eq!(
                engine.usage("payg-ann", Some(T0_MS)).unwrap().payg_micros,
                spent
            );
        }
        if !acknowledged.is_empty() && acknowledged.len() < requests.len() {
            partial += 1;
            break;
        }
    }
    assert!(partial > 0, "no attempt failed part of a batch");
}

/// A request id is remembered for the idempotency horizon (at least the longest window: a
/// week and an hour with the default policy), measured on the engine's clock. Used again after
/// that, it is admitted anew and remembered from then on; after a reopen, a retry returns the
/// second admission (replay lets the later record of an id replace the earlier one).
#[test]
fn a_request_id_admitted_again_after_its_horizon_is_recognised_after_a_reopen() {
    let dir = TempDir::new("id-readmitted");
    let clock = clock();
    let engine = ada_on_max(dir.path(), &clock);
    let quantities = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ada", "m2.7", &quantities).id("reused");
    let first = engine.consume(&request.at(T0_MS)).unwrap();
    let later_ms = T0_MS + 8 * DAY_MS;
    clock.set_ms(later_ms);
    let second = engine.consume(&request.at(later_ms)).unwrap();
    assert!(second.is_admitted());
    assert_ne!(second, first, "past the horizon the id is admitted anew");
    let before = engine.usage("key-ada", Some(later_ms)).unwrap();
    assert_eq!(before.limits[0].used, 1);
    drop(engine);
    let engine = open_on_clock(dir.path(), clock, sync_options());
    let retry = engine.consume(&request.at(later_ms + SECOND_MS)).unwrap();
    assert_eq!(retry, second, "a retry returns the second admission");
    assert_eq!(
        engine.usage("key-ada", Some(later_ms)).unwrap(),
        before,
        "counted once"
    );
}

/// A `Sync` engine on `dir` and `clock` with user ada (key `key-ada`) seated on Max at `T0_MS`.
fn ada_on_max(dir: &std::path::Path, clock: &std::sync::Arc<tally_engine::ManualClock>) -> Engine {
    seat_ada(open_on_clock(dir, clock.clone(), sync_options()), "Max")
}

/// A `Sync` engine on `dir` with the token plan and user ada (key `key-ada`) seated on `plan`
/// at `T0_MS`.
fn ada_on(dir: &std::path::Path, plan: &str) -> Engine {
    seat_ada(open_token_plan(dir, sync_options()), plan)
}

/// `engine` with user ada (key `key-ada`) created and seated on `plan` at `T0_MS`.
fn seat_ada(engine: Engine, plan: &str) -> Engine {
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ada", "ada", plan, Some(T0_MS))
        .unwrap();
    engine
}

/// A request id forgotten before a restart (its horizon passed on a clock that went on logging
/// events), retried after a reopen whose clock reads earlier (stepped back across the restart):
/// refused as too old, as the engine refuses it without a restart, not decided and counted
/// again. The newest logged event says how far the clock ran.
#[test]
fn a_request_id_forgotten_before_a_restart_is_not_counted_again_when_the_clock_steps_back() {
    let dir = TempDir::new("id-forgotten-clock-back");
    let clock = clock();
    let engine = ada_on_max(dir.path(), &clock);
    let quantities = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ada", "m2.7", &quantities).id("once");
    assert!(engine.consume(&request.at(T0_MS)).unwrap().is_admitted());
    let later_ms = T0_MS + 8 * DAY_MS;
    clock.set_ms(later_ms);
    // Past its horizon the id is forgotten (a check finds no first decision for it), and the
    // clock's time is logged by another request.
    let (_, replayed) = engine.check_noting_replay(&request.at(later_ms)).unwrap();
    assert!(!replayed);
    let other = UsageRequest::new("key-ada", "m2.7", &quantities).at(later_ms);
    assert!(engine.consume(&other).unwrap().is_admitted());
    engine.checkpoint().unwrap();
    drop(engine);
    let stepped_back_ms = T0_MS + 4 * DAY_MS;
    clock.set_ms(stepped_back_ms);
    let engine = open_on_clock(dir.path(), clock, sync_options());
    let retry = engine.consume(&request.at(T0_MS));
    assert!(
        matches!(retry, Err(Error::InvalidArgument { field: "at_ms", .. })),
        "{retry:?}"
    );
}

/// As above, when the event that logged the clock's time is a denial kept for its request id:
/// a logged event like any other, its time says how far the clock ran. Before, a denial logged
/// by `consume` did not count as the newest event for the checkpoint's snapshot, so the open
/// from it bounded nothing, and the forgotten id's retry was decided and counted again.
#[test]
fn a_request_id_forgotten_before_a_restart_is_not_counted_again_when_a_logged_denial_was_last() {
    let dir = TempDir::new("id-forgotten-denial-last");
    let clock = clock();
    let engine = ada_on_max(dir.path(), &clock);
    let quantities = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ada", "m2.7", &quantities).id("once");
    assert!(engine.consume(&request.at(T0_MS)).unwrap().is_admitted());
    let later_ms = T0_MS + 8 * DAY_MS;
    clock.set_ms(later_ms);
    let (_, replayed) = engine.check_noting_replay(&request.at(later_ms)).unwrap();
    assert!(!replayed, "past its horizon the id is forgotten");
    // The clock's time is logged by a denial kept for its request id (more than Max's
    // 15,000 requests, and @ada has no credits).
    let too_many = [(Unit::Requests, 20_000)];
    let denied = UsageRequest::new("key-ada", "m2.7", &too_many)
        .at(later_ms)
        .id("denied");
    assert!(!engine.consume(&denied).unwrap().is_admitted());
    engine.checkpoint().unwrap();
    drop(engine);
    clock.set_ms(T0_MS + 4 * DAY_MS);
    let engine = open_on_clock(dir.path(), clock, sync_options());
    let retry = engine.consume(&request.at(T0_MS));
    assert!(
        matches!(retry, Err(Error::InvalidArgument { field: "at_ms", .. })),
        "{retry:?}"
    );
}

/// A request id forgotten before a restart (its horizon passed on the clock, with no event
/// logged since its own), retried with its first stamp after a reopen that grows the horizon
/// (a larger `idempotency_horizon_ms`, or a policy with a longer window): refused, as the
/// engine refuses it without a restart, not decided and charged again. Before, the open
/// bounded what may have been forgotten by the newest logged event and the new horizon only,
/// so the retry, now inside the grown horizon, was charged a second time.
#[test]
fn a_request_id_forgotten_before_a_restart_is_not_counted_again_when_the_reopen_grows_the_horizon()
{
    let horizon = |ms| OpenOptions {
        engine: tally_engine::EngineOptions {
            idempotency_horizon_ms: ms,
            ..tally_engine::EngineOptions::default()
        },
        ..sync_options()
    };
    // Ids are kept for an hour, then for a day; or for the ten-second policy's longest window
    // (twenty seconds), then for five hours.
    let grown = [
        (
            ten_seconds(),
            horizon(HOUR_MS),
            ten_seconds(),
            horizon(DAY_MS),
        ),
        (ten_seconds(), horizon(0), bigger_ten_seconds(), horizon(0)),
    ];
    for (index, (policy, options, reopened_policy, reopened_options)) in
        grown.into_iter().enumerate()
    {
        let dir = TempDir::new("id-forgotten-horizon-grown");
        let clock = clock();
        let engine = Engine::open(dir.path(), policy, clock.clone(), options).unwrap();
        engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
        engine.top_up("@ann", 100_000, Some(T0_MS)).unwrap();
        let one = [(Unit::Requests, 1)];
        let request = UsageRequest::new("key-ann", "chat", &one)
            .at(T0_MS)
            .id("once");
        assert!(engine.consume(&request).unwrap().is_admitted());
        let charged = engine.credits_micros("@ann").unwrap();
        // Two hours on, past the horizon: the id is forgotten, and its retry refused.
        clock.set_ms(T0_MS + 2 * HOUR_MS);
        let live = engine.consume(&request);
        assert!(
            matches!(live, Err(Error::InvalidArgument { field: "at_ms", .. })),
            "case {index}: {live:?}"
        );
        engine.close().unwrap();
        let engine =
            Engine::open(dir.path(), reopened_policy, clock.clone(), reopened_options).unwrap();
        let retry = engine.consume(&request);
        assert!(
            matches!(retry, Err(Error::InvalidArgument { field: "at_ms", .. })),
            "case {index}: {retry:?}"
        );
        assert_eq!(
            engine.credits_micros("@ann").unwrap(),
            charged,
            "case {index}: charged once"
        );
    }
}

/// The ten-second policy with one more plan, on a window of five hours.
fn bigger_ten_seconds() -> Policy {
    let document = format!(
        "{TEN_SECONDS_POLICY}\n[plans.Hourly]\nlimits = [{{ resource = \"chat\", unit = \
         \"requests\", amount = 100, window = \"rolling:5h\" }}]\n"
    );
    Policy::from_toml_str(&document).expect("a valid policy")
}

/// The balance a withdrawal leaves survives every kind of restart.
#[test]
fn a_withdrawal_survives_a_reopen_in_the_balance() {
    for how in [Shutdown::Close, Shutdown::Drop] {
        let dir = TempDir::new("withdraw-balance");
        let engine = open_token_plan(dir.path(), sync_options());
        engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
        engine.top_up("@ada", 1_000, Some(T0_MS)).unwrap();
        assert_eq!(engine.withdraw_credits("@ada", 100, Some(T0_MS)), Ok(900));
        shut(engine, how);
        let engine = open_token_plan(dir.path(), sync_options());
        assert_eq!(engine.credits_micros("@ada"), Ok(900), "{how:?}");
    }
}

/// Many keys of one team paying with its credits. A reopen replays a long run of usage events
/// on two threads, each taking the keys of its own shards, so both change the one team's
/// balance: every charge must land. (The replay read the balance and wrote it back, which
/// lost charges when the two threads met: a reopened team held more credits than it had left,
/// and `verify` now and then called a sound database unsound.)
#[test]
fn a_reopen_that_replays_many_credit_charges_of_one_team_keeps_every_charge() {
    const MEMBERS: usize = 64;
    const BATCHES: u64 = 100;
    const PER_BATCH: u64 = 1_000;
    let dir = TempDir::new("replay-shared-credits");
    let options = OpenOptions {
        durability: Durability::None,
        // Nothing checkpointed: the reopen replays every charge.
        checkpoint_every_events: u64::MAX,
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    engine.create_team("shared", Some(T0_MS)).unwrap();
    engine.top_up("shared", 1 << 50, Some(T0_MS)).unwrap();
    let keys: Vec<String> = (0..MEMBERS).map(|member| format!("key-{member}")).collect();
    for (member, key) in keys.iter().enumerate() {
        let user = format!("user-{member}");
        engine
            .create_user(&user, &format!("own-{member}"), Some(T0_MS))
            .unwrap();
        // No seat: the team's credits pay for everything.
        engine
            .add_member("shared", &user, key, Some(T0_MS))
            .unwrap();
    }
    let one = [(Unit::Requests, 1)];
    for batch in 0..BATCHES {
        let requests: Vec<UsageRequest<'_>> = (0..PER_BATCH)
            .map(|index| {
                let step = batch * PER_BATCH + index;
                UsageRequest::new(&keys[step as usize % MEMBERS], "m2.7", &one).at(T0_MS + step)
            })
            .collect();
        for decision in engine.consume_many(&requests) {
            assert!(
                matches!(&decision, Ok(Decision::Admitted(admission))
                    if matches!(admission.charged_to, tally_engine::ChargedTo::Credits { .. })),
                "{decision:?}"
            );
        }
    }
    let at = T0_MS + BATCHES * PER_BATCH;
    let balance = engine.credits_micros("shared").unwrap();
    let charged = engine
        .usage(&keys[0], Some(at))
        .unwrap()
        .credits_charged_micros;
    assert!(balance < 1 << 50 && charged > 0);
    engine.sync().unwrap();
    drop(engine);
    // Several reopens: the two threads meet at random.
    for reopen in 0..4 {
        let engine = open_token_plan(dir.path(), options.clone());
        let report = engine.open_report().expect("a durable engine");
        assert!(
            report.events_replayed >= BATCHES * PER_BATCH,
            "reopen {reopen}: {report:?}"
        );
        assert_eq!(
            engine.credits_micros("shared").unwrap(),
            balance,
            "reopen {reopen}: the balance"
        );
        assert_eq!(
            engine
                .usage(&keys[0], Some(at))
                .unwrap()
                .credits_charged_micros,
            charged,
            "reopen {reopen}: the total charged"
        );
        drop(engine);
    }
}

/// A withdrawal is a correction of the balance, not a charge for usage: the team's total
/// charged stays as it was, live and after a reopen that replays it.
#[test]
fn a_withdrawal_reports_the_same_credits_charged_after_a_reopen() {
    let dir = TempDir::new("withdraw-charged");
    let engine = open_token_plan(dir.path(), sync_options());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 1_000, Some(T0_MS)).unwrap();
    engine.withdraw_credits("@ada", 100, Some(T0_MS)).unwrap();
    let before = engine.usage("key-ada", Some(T0_MS)).unwrap();
    assert_eq!(
        before.credits_charged_micros, 0,
        "a correction is not a charge"
    );
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options());
    let after = engine.usage("key-ada", Some(T0_MS)).unwrap();
    assert_eq!(after.credits_balance_micros, 900);
    assert_eq!(after.credits_charged_micros, before.credits_charged_micros);
}

/// In memory, a request id whose first decision was a denial returns that denial when
/// retried. Only admitted requests are logged (and only admitted ids go into snapshots), so
/// after a reopen the retry is decided afresh and can be admitted: the reopened engine decides
/// differently from one that never closed.
#[test]
fn a_request_id_denied_before_a_reopen_returns_the_same_denial_after_it() {
    let dir = TempDir::new("denied-id");
    let engine = open_token_plan(dir.path(), sync_options());
    let twin = twin(Policy::token_plan());
    for engine in [&engine, &twin] {
        engine.create_user("zed", "key-zed", Some(T0_MS)).unwrap();
    }
    let quantities = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-zed", "m2.7", &quantities)
        .at(T0_MS)
        .id("denied-once");
    let first = engine.consume(&request).expect("consume");
    assert!(!first.is_admitted(), "no seat and no credits: {first:?}");
    assert_eq!(twin.consume(&request), Ok(first));
    for engine in [&engine, &twin] {
        engine.top_up("@zed", 1_000_000, Some(T0_MS)).unwrap();
    }
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options());
    let retry = request.at(T0_MS + SECOND_MS);
    assert_eq!(
        twin.consume(&retry),
        Ok(first),
        "the twin returns the first denial"
    );
    assert_eq!(
        engine.consume(&retry),
        Ok(first),
        "the reopened engine should too"
    );
}

/// A key's window counters are created lazily, on its first request, even a denied one; a
/// calendar limit with counters reports its period's end as `reset_at_ms`, one without reports
/// `None`. A denied request logs nothing, so a reopen (without a checkpoint after it) forgets
/// the counters and the report changes, with no usage anywhere.
#[test]
fn a_usage_report_after_a_denied_request_is_the_same_after_a_reopen() {
    let dir = TempDir::new("denied-report");
    let engine = ada_on(dir.path(), "Max");
    let videos = [(Unit::Videos, 3)];
    let request = UsageRequest::new("key-ada", "hailuo-2.3-768p-6s", &videos).at(T0_MS);
    let denied = engine.consume(&request).unwrap();
    assert!(
        !denied.is_admitted(),
        "3 videos exceed Max's 2 a day: {denied:?}"
    );
    let before = engine.usage("key-ada", Some(T0_MS)).unwrap();
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.usage("key-ada", Some(T0_MS)).unwrap(), before);
}

/// A report reads a rolling window "as of" its timestamp and moves the window's head there;
/// a later request with an earlier timestamp is then counted at that head, where the units
/// used before have already aged out. So a report at a future time (a dashboard previewing
/// tomorrow) frees quota for requests now. Heads moved by reads are not logged either, so a
/// reopen moves them back and the reopened engine decides differently from one that never
/// closed.
#[test]
fn a_usage_report_at_a_future_time_frees_no_quota_now() {
    let engine = twin(Policy::token_plan());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ada", "ada", "Starter", Some(T0_MS))
        .unwrap();
    let all = [(Unit::Requests, 1_500)];
    let request = UsageRequest::new("key-ada", "m2.7", &all).at(T0_MS);
    assert!(engine.consume(&request).unwrap().is_admitted());
    let one = [(Unit::Requests, 1)];
    let now = UsageRequest::new("key-ada", "m2.7", &one).at(T0_MS + MINUTE_MS);
    let denied = engine.check(&now).unwrap();
    assert!(
        !denied.is_admitted(),
        "Starter's 1,500 are used: {denied:?}"
    );
    engine.usage("key-ada", Some(T0_MS + 6 * HOUR_MS)).unwrap();
    assert_eq!(
        engine.consume(&now),
        Ok(denied),
        "a report changed the decision"
    );
}

// ---------------------------------------------------------------------------------------------
// Policy swaps.

fn bigger_starter() -> Policy {
    let text = TOKEN_PLAN_TOML.replace("amount = 1500,", "amount = 2000,");
    assert_ne!(text, TOKEN_PLAN_TOML);
    Policy::from_toml_str(&text).expect("a valid policy")
}

/// A crash right after a policy swap was acknowledged (no close, no checkpoint after it), and
/// one after a checkpoint between two swaps: the copy reopens with the swapped policy and the
/// state the swaps left, usage carried over and all.
#[test]
fn a_crash_right_after_a_policy_swap_reopens_with_the_swapped_policy_and_state() {
    for checkpoint_between in [false, true] {
        let dir = TempDir::new("swap-crash");
        let crashed = dir.sibling("crashed");
        let engine = open_token_plan(dir.path(), sync_options());
        populate(&engine);
        engine
            .swap_policy(bigger_starter(), Some(POPULATED_MS))
            .expect("swap");
        if checkpoint_between {
            engine.checkpoint().unwrap();
            engine
                .swap_policy(Policy::token_plan(), Some(POPULATED_MS))
                .expect("swap back");
            engine
                .swap_policy(bigger_starter(), Some(POPULATED_MS))
                .expect("swap again");
        }
        let at_ms = POPULATED_MS + MINUTE_MS;
        let before = state(&engine, &KEYS, &TEAMS, at_ms);
        assert_eq!(before.reports[0].limits[0].amount, 2000, "swapped in");
        copy_dir(dir.path(), crashed.path());
        drop(engine);
        let engine = Engine::open_with_stored_policy(
            crashed.path(),
            Policy::token_plan(),
            clock(),
            sync_options(),
        )
        .unwrap();
        assert_same_state(
            &state(&engine, &KEYS, &TEAMS, at_ms),
            &before,
            "after the crash",
        );
    }
}

fn without_starter() -> Policy {
    let mut document = Policy::token_plan().document().clone();
    assert!(document.plans.remove("Starter").is_some());
    Policy::compile(document).expect("a valid policy")
}

#[test]
fn a_request_ids_first_decision_keeps_its_names_across_a_swap_a_checkpoint_and_a_reopen() {
    let dir = TempDir::new("swap-renames");
    let engine = open_token_plan(dir.path(), sync_options());
    engine
        .create_user("ada", "key-ada", Some(POPULATED_MS))
        .expect("user");
    engine
        .assign_seat("@ada", "ada", "Starter", Some(POPULATED_MS))
        .expect("seat");
    let one = [(Unit::Requests, 1)];
    let before_swap = UsageRequest::new("key-ada", "m2.7", &one)
        .at(POPULATED_MS)
        .id("before-swap");
    assert!(engine.consume(&before_swap).expect("consume").is_admitted());
    // Every plan renumbered: one named before all the others.
    let renumbered = || {
        let mut document = Policy::token_plan().document().clone();
        let starter = document.plans["Starter"].clone();
        document.plans.insert("Aardvark".into(), starter);
        Policy::compile(document).expect("a valid policy")
    };
    let starter = renumbered().plan_id("Starter").expect("kept");
    assert_ne!(Some(starter), Policy::token_plan().plan_id("Starter"));
    engine
        .swap_policy(renumbered(), Some(POPULATED_MS))
        .expect("swap");
    let repeated = engine.consume(&before_swap).expect("repeat");
    assert!(matches!(repeated, Decision::Admitted(admission) if admission.plan == Some(starter)));
    // Dropped without the closing checkpoint: the reopen replays the swap from the log over
    // the id it remembered before it.
    drop(engine);
    for checkpoint in [false, true] {
        let engine = open(dir.path(), renumbered(), sync_options());
        assert_eq!(engine.consume(&before_swap).expect("repeat"), repeated);
        if checkpoint {
            // Then once from a snapshot taken after the swap.
            engine.close().expect("close");
        }
    }
    let engine = open(dir.path(), renumbered(), sync_options());
    assert_eq!(engine.consume(&before_swap).expect("repeat"), repeated);
}

#[test]
fn the_largest_top_up_allowed_reopens_and_a_larger_one_is_never_logged() {
    let dir = TempDir::new("largest-top-up");
    let engine = open_token_plan(dir.path(), sync_options());
    engine
        .create_team("acme", Some(POPULATED_MS))
        .expect("team");
    let events = last_seq(&engine);
    // Before the bound, a top-up past i64::MAX was logged, then refused every open.
    assert_eq!(
        engine.top_up("acme", MAX_CREDITS_MICROS + 1, Some(POPULATED_MS)),
        Err(Error::Overflow { field: "micros" })
    );
    assert_eq!(last_seq(&engine), events, "nothing logged");
    assert_eq!(
        engine.top_up("acme", MAX_CREDITS_MICROS, Some(POPULATED_MS)),
        Ok(MAX_CREDITS_MICROS)
    );
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.credits_micros("acme"), Ok(MAX_CREDITS_MICROS));
}

#[test]
fn a_swapped_policy_is_persisted_and_reopening_with_it_keeps_the_state() {
    let dir = TempDir::new("swap");
    let engine = open_token_plan(dir.path(), sync_options());
    let twin = twin(Policy::token_plan());
    assert_eq!(populate(&engine), populate(&twin));
    for engine in [&engine, &twin] {
        engine
            .swap_policy(bigger_starter(), Some(POPULATED_MS))
            .expect("swap");
    }
    let at_ms = POPULATED_MS + MINUTE_MS;
    let before = state(&engine, &KEYS, &TEAMS, at_ms);
    assert_same_state(&before, &state(&twin, &KEYS, &TEAMS, at_ms), "state");
    let starter = &before.reports[0].limits[0];
    assert_eq!(before.reports[0].plan.as_deref(), Some("Starter"));
    assert_eq!(starter.amount, 2000, "the swapped-in amount");
    assert!(starter.used > 0, "usage carried over the swap");
    let events = last_seq(&engine);
    engine.close().expect("close");

    let engine = open(dir.path(), bigger_starter(), sync_options());
    assert_same_state(&state(&engine, &KEYS, &TEAMS, at_ms), &before, "state");
    assert_eq!(last_seq(&engine), events, "the same policy: no new event");
    let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 300)]).at(at_ms);
    assert_eq!(engine.consume(&request), twin.consume(&request));
    let after = state(&engine, &KEYS, &TEAMS, at_ms);
    drop(engine);

    let refused = Engine::open(dir.path(), without_starter(), clock(), sync_options())
        .expect_err("Starter has seats");
    let text = refused.to_string();
    assert!(
        text.contains("Starter") && text.contains("missing"),
        "{text}"
    );

    let engine = open(dir.path(), bigger_starter(), sync_options());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, at_ms),
        &after,
        "the refusal changed nothing",
    );
    assert_eq!(
        last_seq(&engine),
        events + 1,
        "only the consume was logged since"
    );
}

/// The token plan with Starter's 5-hour window stretched to 20 days: the longest window, and
/// so the request-id horizon, is longer than the shipped policy's.
fn twenty_day_starter() -> Policy {
    let text = TOKEN_PLAN_TOML.replacen("window = \"rolling:5h\"", "window = \"rolling:20d\"", 1);
    assert_ne!(text, TOKEN_PLAN_TOML);
    Policy::from_toml_str(&text).expect("a valid policy")
}

#[test]
fn opening_with_the_stored_policy_keeps_it_its_horizon_and_logs_nothing() {
    let dir = TempDir::new("stored-policy");
    let clock = clock();
    let engine = Engine::open(
        dir.path(),
        twenty_day_starter(),
        clock.clone(),
        sync_options(),
    )
    .expect("open");
    create_accounts(&engine);
    let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 1)])
        .at(T0_MS)
        .id("twenty-day-retry");
    let (first, replayed) = engine.consume_noting_replay(&request).expect("consume");
    assert!(first.is_admitted() && !replayed);
    let events = last_seq(&engine);
    let used = engine.usage("key-ada", Some(T0_MS)).expect("usage").limits[0].used;
    engine.close().expect("close");

    // Ten days on: past the shipped policy's longest window, within the stored one's.
    clock.set_ms(T0_MS + 10 * DAY_MS);
    let engine = Engine::open_with_stored_policy(
        dir.path(),
        Policy::token_plan(),
        clock.clone(),
        sync_options(),
    )
    .expect("open with the stored policy");
    assert_eq!(
        engine.policy().document(),
        twenty_day_starter().document(),
        "the stored policy, not the one for a new database"
    );
    assert_eq!(last_seq(&engine), events, "nothing swapped, nothing logged");
    let retried = request.at(T0_MS + 10 * DAY_MS);
    let (again, replayed) = engine.consume_noting_replay(&retried).expect("retry");
    assert!(
        replayed,
        "the id is within the stored policy's 20-day horizon"
    );
    assert_eq!(again, first);
    let report = engine
        .usage("key-ada", Some(T0_MS + 10 * DAY_MS))
        .expect("usage");
    assert_eq!(report.limits[0].used, used, "the retry counted nothing");
    engine.close().expect("close");

    // A new database starts with the policy given for one.
    let fresh = TempDir::new("stored-policy-new");
    let engine =
        Engine::open_with_stored_policy(fresh.path(), bigger_starter(), clock, sync_options())
            .expect("open a new database");
    assert_eq!(engine.policy().document(), bigger_starter().document());
}

// ---------------------------------------------------------------------------------------------
// Sub-second buckets, and the databases written before them.

/// A one-minute window and a 5-hour one, neither naming a bucket.
const ONE_MINUTE_POLICY: &str = r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.P]
limits = [
  { resource = "chat", unit = "requests", amount = 5, window = "rolling:1m" },
  { resource = "chat", unit = "requests", amount = 50, window = "rolling:5h" },
]
"#;

/// `ONE_MINUTE_POLICY` as builds before sub-second buckets logged it: no bucket, which they
/// compiled as 1 s for the one-minute window (80 s for the 5-hour one, as now).
const ONE_MINUTE_LOGGED_BEFORE: &str = r#"{"time_zone":"UTC","resources":{"chat":{"units":["requests"]}},"meters":{},"plans":{"P":{"limits":[{"resource":"chat","unit":"requests","amount":5,"window":"rolling:1m"},{"resource":"chat","unit":"requests","amount":50,"window":"rolling:5h"}]}}}"#;

fn one_minute() -> Policy {
    Policy::from_toml_str(ONE_MINUTE_POLICY).expect("a valid policy")
}

fn one_minute_bucket_ms(engine: &Engine) -> u64 {
    match engine.policy().plans()[0].limits[0].window {
        tally_engine::Window::Rolling { bucket_ms, .. } => bucket_ms,
        tally_engine::Window::Calendar(_) => unreachable!("a rolling window"),
    }
}

/// The generation-0 document the log holds.
fn first_logged_document(engine: &Engine) -> String {
    match &engine.events_after(0, 1).expect("events")[0].body {
        EventBody::PolicySwapped {
            generation: 0,
            document,
        } => document.clone(),
        other => panic!("the first event is {other:?}"),
    }
}

/// Ann on plan P uses the one-minute window's 5 requests at T0 + 100 ms (3) and T0 + 700 ms
/// (2): one 1 s bucket, two 250 ms ones. A checkpoint between them and one after, so `verify`
/// replays the second half from the first and compares.
fn fill_one_minute(engine: &Engine) {
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine.assign_seat("@ann", "ann", "P", Some(T0_MS)).unwrap();
    for (at_ms, count) in [(T0_MS + 100, 3), (T0_MS + 700, 2)] {
        let quantities = [(Unit::Requests, count)];
        let request = UsageRequest::new("key-ann", "chat", &quantities).at(at_ms);
        assert!(engine.consume(&request).unwrap().is_admitted());
        engine.checkpoint().expect("checkpoint");
    }
}

/// When one more request would fit again, asked 30 s in (no event: a check).
fn one_minute_retry_at(engine: &Engine) -> u64 {
    let request =
        UsageRequest::new("key-ann", "chat", &[(Unit::Requests, 1)]).at(T0_MS + 30 * SECOND_MS);
    match engine.check(&request).expect("a check") {
        Decision::Denied(denial) => match denial.reason {
            tally_engine::DenialReason::QuotaExhausted { retry_at_ms, .. } => retry_at_ms,
            other => panic!("expected QuotaExhausted, got {other:?}"),
        },
        Decision::Admitted(admission) => panic!("admitted: {admission:?}"),
    }
}

fn assert_verified(dir: &std::path::Path) {
    let verified = Engine::verify(dir, sync_options()).expect("verify");
    assert!(verified.is_sound(), "{:?}", verified.problems);
    assert_eq!(verified.snapshot_matches_replay, Some(true));
}

/// A database a build before sub-second buckets wrote: its logged policy has a one-minute
/// window without a bucket, compiled with 1 s. It still opens, replays and verifies with 1 s
/// buckets (its rings' shapes and snapshots depend on them), with its stored policy as with
/// the same document given; the same file loaded now means 250 ms buckets, so opening with it
/// swaps that in like any other change of buckets: the usage is carried to the bucket holding
/// the old one's last instant, never released earlier.
#[test]
fn a_database_logged_with_one_second_default_buckets_reopens_with_them() {
    let dir = TempDir::new("one-second-buckets");
    let before = Policy::from_logged_json(ONE_MINUTE_LOGGED_BEFORE).expect("a logged policy");
    let engine = open(dir.path(), before, sync_options());
    assert_eq!(first_logged_document(&engine), ONE_MINUTE_LOGGED_BEFORE);
    assert_eq!(one_minute_bucket_ms(&engine), SECOND_MS);
    fill_one_minute(&engine);
    // All 5 in the 1 s bucket of T0: back at T0 + 61 s.
    assert_eq!(one_minute_retry_at(&engine), T0_MS + 61 * SECOND_MS);
    let events = last_seq(&engine);
    engine.close().expect("close");
    assert_verified(dir.path());

    for stored in [true, false] {
        let reopened = if stored {
            Engine::open_with_stored_policy(dir.path(), one_minute(), clock(), sync_options())
                .expect("open with the stored policy")
        } else {
            let logged = Policy::from_logged_json(ONE_MINUTE_LOGGED_BEFORE).unwrap();
            open(dir.path(), logged, sync_options())
        };
        assert_eq!(
            one_minute_bucket_ms(&reopened),
            SECOND_MS,
            "stored {stored}"
        );
        assert_eq!(
            last_seq(&reopened),
            events,
            "nothing swapped, nothing logged"
        );
        assert_eq!(one_minute_retry_at(&reopened), T0_MS + 61 * SECOND_MS);
        reopened.close().expect("close");
        assert_verified(dir.path());
    }

    // The policy file, loaded now: 250 ms buckets, swapped in.
    let engine = open(dir.path(), one_minute(), sync_options());
    assert_eq!(last_seq(&engine), events + 1, "the swap");
    assert_eq!(engine.policy().generation(), 1);
    assert_eq!(one_minute_bucket_ms(&engine), 250);
    let report = engine
        .usage("key-ann", Some(T0_MS + 30 * SECOND_MS))
        .unwrap();
    assert_eq!(report.limits[0].used, 5, "carried over");
    assert_eq!(one_minute_retry_at(&engine), T0_MS + 61 * SECOND_MS);
    engine.checkpoint().expect("checkpoint");
    engine.close().expect("close");
    assert_verified(dir.path());
    let engine = open(dir.path(), one_minute(), sync_options());
    assert_eq!(
        last_seq(&engine),
        events + 1,
        "the same policy: no new event"
    );
    assert_eq!(one_minute_bucket_ms(&engine), 250);
    assert_eq!(one_minute_retry_at(&engine), T0_MS + 61 * SECOND_MS);
}

/// A new database with a one-minute window: its log states the 250 ms bucket, so it reopens
/// (with the same file, or with its stored policy) and verifies with 250 ms buckets, and
/// opening it with the same file logs nothing.
#[test]
fn a_new_database_with_a_short_window_reopens_and_verifies_with_its_sub_second_buckets() {
    let dir = TempDir::new("sub-second-buckets");
    let engine = open(dir.path(), one_minute(), sync_options());
    let logged = first_logged_document(&engine);
    assert!(
        logged.contains(r#""window":"rolling:1m","bucket":"250ms""#),
        "{logged}"
    );
    assert!(
        !logged.contains(r#""window":"rolling:5h","bucket""#),
        "{logged}"
    );
    assert_eq!(one_minute_bucket_ms(&engine), 250);
    fill_one_minute(&engine);
    // The 3 used at T0 + 100 ms are back at T0 + 60.25 s.
    assert_eq!(one_minute_retry_at(&engine), T0_MS + 60_250);
    let events = last_seq(&engine);
    engine.close().expect("close");
    assert_verified(dir.path());

    for stored in [false, true] {
        let engine = if stored {
            Engine::open_with_stored_policy(
                dir.path(),
                Policy::token_plan(),
                clock(),
                sync_options(),
            )
            .expect("open with the stored policy")
        } else {
            open(dir.path(), one_minute(), sync_options())
        };
        assert_eq!(last_seq(&engine), events, "nothing swapped, nothing logged");
        assert_eq!(one_minute_bucket_ms(&engine), 250, "stored {stored}");
        assert_eq!(one_minute_retry_at(&engine), T0_MS + 60_250);
        let report = engine
            .usage("key-ann", Some(T0_MS + 30 * SECOND_MS))
            .unwrap();
        assert_eq!(report.limits[0].used, 5);
        // On into the next minute, through another checkpoint.
        let at_ms = T0_MS + 60_250;
        let request = UsageRequest::new("key-ann", "chat", &[(Unit::Requests, 3)]).at(at_ms);
        assert_eq!(engine.check(&request).map(|d| d.is_admitted()), Ok(true));
        engine.close().expect("close");
        assert_verified(dir.path());
    }
}

// ---------------------------------------------------------------------------------------------
// Export.

#[test]
fn events_after_returns_every_event_in_order_gap_free_with_its_kind_and_a_saved_cursor_survives_a_reopen(
) {
    let dir = TempDir::new("export");
    let engine = open_token_plan(dir.path(), sync_options());
    let mut expected = vec!["policy_swapped"];
    let t = T0_MS;
    let at = |minutes: u64| Some(t + minutes * MINUTE_MS);
    engine.create_user("ada", "key-ada", at(1)).unwrap();
    expected.push("user_created");
    engine.assign_seat("@ada", "ada", "Starter", at(2)).unwrap();
    expected.push("seat_changed");
    engine.top_up("@ada", 1_000_000, at(3)).unwrap();
    expected.push("credits_topped_up");
    let quantities = [(Unit::Requests, 2)];
    let admitted = engine
        .consume(&UsageRequest::new("key-ada", "m2.7", &quantities).at(t + 4 * MINUTE_MS))
        .unwrap();
    assert!(admitted.is_admitted());
    expected.push("usage_admitted");
    // A denial changes nothing and logs nothing; neither does a check.
    let videos = [(Unit::Videos, 1)];
    let denied = engine
        .consume(&UsageRequest::new("nobody", "m2.7", &quantities).at(t + 5 * MINUTE_MS))
        .unwrap();
    assert!(!denied.is_admitted());
    engine
        .check(&UsageRequest::new("key-ada", "hailuo-2.3-768p-6s", &videos).at(t))
        .unwrap();
    engine.create_team("acme", at(6)).unwrap();
    expected.push("team_created");
    engine.add_member("acme", "ada", "key-acme", at(7)).unwrap();
    expected.push("member_added");
    engine.create_payg_key("ada", "payg-ada", at(8)).unwrap();
    expected.push("payg_key_created");
    engine
        .consume(
            &UsageRequest::new("key-ada", "m2.7", &quantities)
                .at(t + 9 * MINUTE_MS)
                .id("export-1"),
        )
        .unwrap();
    expected.push("usage_admitted");
    engine.refund("export-1", at(10)).unwrap();
    expected.push("refunded");
    let reserved = engine
        .reserve(
            &UsageRequest::new("key-ada", "m2.7", &quantities).at(t + 11 * MINUTE_MS),
            None,
        )
        .unwrap();
    expected.push("reservation_opened");
    engine
        .settle(
            reserved.reservation.unwrap(),
            &[(Unit::Requests, 1)],
            at(12),
        )
        .unwrap();
    expected.push("reservation_closed");
    engine
        .adjust_usage(
            "key-ada",
            "m2.7",
            &[(Unit::Requests, 1)],
            t + 4 * MINUTE_MS,
            tally_engine::AdjustmentDirection::Remove,
            at(13),
        )
        .unwrap();
    expected.push("usage_adjusted");
    engine.withdraw_credits("@ada", 10, at(14)).unwrap();
    expected.push("credits_withdrawn");
    engine.swap_policy(bigger_starter(), at(15)).unwrap();
    expected.push("policy_swapped");

    let all = engine.events_after(0, 1_000).expect("export");
    let kinds: Vec<&str> = all.iter().map(|event| event.body.kind()).collect();
    assert_eq!(kinds, expected);
    let seqs: Vec<u64> = all.iter().map(|event| event.seq).collect();
    assert_eq!(
        seqs,
        (1..=expected.len() as u64).collect::<Vec<_>>(),
        "gap-free from 1"
    );
    assert!(all.windows(2).all(|pair| pair[0].at_ms <= pair[1].at_ms));
    assert_eq!(all[4].at_ms, t + 4 * MINUTE_MS, "the usage's own time");
    match &all[8].body {
        EventBody::UsageAdmitted {
            key, request_id, ..
        } => {
            assert_eq!(key, "key-ada");
            assert_eq!(request_id.as_deref(), Some("export-1"));
        }
        other => panic!("expected a usage event, got {other:?}"),
    }
    // Paging with a cursor gives the same events.
    let mut paged = Vec::new();
    let mut cursor = 0;
    loop {
        let page = engine.events_after(cursor, 3).expect("a page");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        cursor = last.seq;
        paged.extend(page);
    }
    assert_eq!(paged, all);
    assert!(engine
        .events_after(all.len() as u64, 10)
        .unwrap()
        .is_empty());

    assert_eq!(engine.cursor("billing").unwrap(), 0, "never saved");
    engine.save_cursor("billing", 6).expect("save a cursor");
    assert_eq!(engine.cursor("billing").unwrap(), 6);
    let beyond = engine.save_cursor("billing", all.len() as u64 + 1);
    assert!(
        matches!(beyond, Err(Error::InvalidArgument { .. })),
        "{beyond:?}"
    );
    assert_eq!(
        engine.cursor("billing").unwrap(),
        6,
        "a refused save changes nothing"
    );
    drop(engine);

    let engine = open(dir.path(), bigger_starter(), sync_options());
    let cursor = engine.cursor("billing").expect("the cursor survives");
    assert_eq!(cursor, 6);
    assert_eq!(
        engine.events_after(cursor, 1_000).unwrap(),
        all[6..].to_vec()
    );
    engine.top_up("@ada", 5, at(16)).unwrap();
    let next = engine.events_after(all.len() as u64, 10).unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].seq,
        all.len() as u64 + 1,
        "numbering continues without a gap"
    );
    assert_eq!(next[0].body.kind(), "credits_topped_up");
    engine.save_cursor("billing", next[0].seq).unwrap();
    engine.close().unwrap();
    let engine = open(dir.path(), bigger_starter(), sync_options());
    assert_eq!(engine.cursor("billing").unwrap(), all.len() as u64 + 1);
}

/// An addition dated where every window of its limits has moved on (the 5-hour window aged out,
/// the day reset) counts nothing, and is answered so (each limit moved 0) without an event:
/// it changes no state, and an event of it would only grow the log (and read, in an export,
/// like a correction that was made). One that moves something is logged.
#[test]
fn a_usage_addition_that_counts_nothing_appends_no_event() {
    let dir = TempDir::new("adjust-counts-nothing");
    let clock = log_support::clock();
    let engine = seat_ada(
        open_on_clock(dir.path(), clock.clone(), sync_options()),
        "Plus",
    );
    let now_ms = T0_MS + DAY_MS + HOUR_MS;
    clock.set_ms(now_ms);
    let events = last_seq(&engine);
    let add = |resource: &str, quantities: &[(Unit, u64)], usage_at_ms: u64| {
        engine
            .adjust_usage(
                "key-ada",
                resource,
                quantities,
                usage_at_ms,
                tally_engine::AdjustmentDirection::Add,
                Some(now_ms),
            )
            .expect("add")
    };
    let aged = add("m2.7", &[(Unit::Requests, 1)], now_ms - 6 * HOUR_MS);
    assert_eq!(aged.limits[0].moved, 0);
    let reset = add("image-01", &[(Unit::Images, 5)], T0_MS + HOUR_MS);
    assert_eq!(reset.limits[0].moved, 0);
    assert_eq!(last_seq(&engine), events, "nothing appended");
    // A snapshot of the key as it is now (it counts nothing) is what a replay of the log
    // gives.
    engine.checkpoint().expect("checkpoint");
    let counted = add("image-01", &[(Unit::Images, 5)], now_ms - MINUTE_MS);
    assert_eq!(counted.limits[0].moved, 5);
    assert_eq!(last_seq(&engine), events + 1);
    drop(engine);
    assert_verified(dir.path());
}

/// A usage correction no limit of the key's plan counts is refused before it is logged: the
/// log would otherwise keep (and every open replay) an event that moved nothing.
#[test]
fn a_usage_correction_no_limit_counts_appends_no_event() {
    let dir = TempDir::new("adjust-uncounted");
    let engine = ada_on(dir.path(), "Starter");
    let events = last_seq(&engine);
    let images = [(Unit::Images, 5)];
    let refused = engine.adjust_usage(
        "key-ada",
        "image-01",
        &images,
        T0_MS,
        tally_engine::AdjustmentDirection::Add,
        Some(T0_MS),
    );
    assert!(
        matches!(
            refused,
            Err(Error::InvalidArgument {
                field: "resource",
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(last_seq(&engine), events, "nothing appended");
}

/// Export cursors are bounded by count as well as by name length: a new name past
/// `MAX_CURSORS` is refused and saves nothing, while a name already saved still moves, also
/// after a reopen.
#[test]
fn a_new_cursor_past_the_bound_is_refused_and_a_saved_one_still_moves() {
    let dir = TempDir::new("cursor-bound");
    let options = OpenOptions {
        durability: Durability::None,
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    let bound = tally_engine::log::MAX_CURSORS;
    let name = |n: u64| format!("reader-{n}");
    for n in 0..bound {
        engine.save_cursor(&name(n), 1).expect("room for it");
    }
    let refused = engine.save_cursor(&name(bound), 1);
    assert_eq!(
        refused,
        Err(Error::CapacityExceeded {
            what: "cursors",
            capacity: bound
        })
    );
    assert_eq!(engine.cursor(&name(bound)).unwrap(), 0, "nothing saved");
    engine
        .save_cursor(&name(0), 2)
        .expect("a saved cursor moves");
    drop(engine);
    let engine = open_token_plan(dir.path(), options);
    assert_eq!(engine.cursor(&name(0)).unwrap(), 2);
    engine
        .save_cursor(&name(bound - 1), 2)
        .expect("still moves");
    assert!(matches!(
        engine.save_cursor(&name(bound + 1), 1),
        Err(Error::CapacityExceeded { .. })
    ));
    // A reader gone for good gives its place back, durably.
    assert_eq!(engine.delete_cursor(&name(0)), Ok(true));
    assert_eq!(engine.delete_cursor(&name(0)), Ok(false), "deleted already");
    assert_eq!(engine.delete_cursor("never-saved"), Ok(false));
    assert_eq!(engine.cursor(&name(0)).unwrap(), 0, "as if never saved");
    engine
        .save_cursor(&name(bound + 1), 1)
        .expect("the place given back");
    assert!(matches!(
        engine.save_cursor(&name(bound + 2), 1),
        Err(Error::CapacityExceeded { .. })
    ));
    assert!(matches!(
        engine.delete_cursor(""),
        Err(Error::InvalidArgument {
            field: "cursor",
            ..
        })
    ));
    drop(engine);
    let engine = open_token_plan(
        dir.path(),
        OpenOptions {
            durability: Durability::None,
            ..OpenOptions::default()
        },
    );
    assert_eq!(engine.cursor(&name(0)).unwrap(), 0, "still deleted");
    assert_eq!(engine.cursor(&name(bound + 1)).unwrap(), 1);
    // The operator sees which readers hold the places, and how far each read.
    let listed = engine.cursors().unwrap();
    assert_eq!(listed.len(), bound as usize);
    let mut expected: Vec<(String, u64)> = (1..bound - 1)
        .map(|n| (name(n), 1))
        .chain([(name(bound - 1), 2), (name(bound + 1), 1)])
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    for (cursor, seq) in &listed {
        assert_eq!(engine.cursor(cursor).unwrap(), *seq, "{cursor}");
    }
}

/// The segment file being written: the one with the greatest first event.
fn active_segment(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(dir.join("events"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .max()
        .expect("a segment")
}

/// A cursor is durable only once the events it has passed are: in `Interval` (and `None`)
/// mode `events_after` hands out events written but not yet flushed, and a cursor saved past
/// them, then a power loss, left the cursor past the end of the log. The events appended
/// after the reopen took those sequence numbers again, and a reader going on from its
/// cursor skipped them without a word. Saving the cursor now makes the log durable through
/// it first (here the flush fails, so the cursor is not saved).
#[test]
fn a_cursor_is_never_saved_past_events_that_are_not_durable() {
    let dir = TempDir::new("cursor-durable");
    let faults = tally_engine::Faults::new();
    let options = OpenOptions {
        durability: Durability::Interval { ms: 60_000 },
        faults: Some(std::sync::Arc::clone(&faults)),
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options);
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.sync().unwrap();
    let durable_seq = last_seq(&engine);
    let segment = active_segment(dir.path());
    let durable_bytes = std::fs::metadata(&segment).unwrap().len();
    for minute in 1..=3 {
        engine
            .top_up("@ada", 1_000, Some(T0_MS + minute * MINUTE_MS))
            .unwrap();
    }
    let read = engine.events_after(durable_seq, 100).unwrap();
    assert_eq!(read.len(), 3, "written, not yet flushed, already readable");
    let passed = read.last().unwrap().seq;
    // The flush that would make them durable fails.
    faults.fail_next_flushes(1);
    let saved = engine.save_cursor("billing", passed);
    assert!(saved.is_err(), "saved past events not durable: {saved:?}");
    assert_eq!(engine.cursor("billing").unwrap(), 0, "the cursor stays");

    // A power loss now keeps what was fdatasynced, and the cursor as sled holds it.
    let copy = dir.sibling("power-loss");
    copy_dir(dir.path(), copy.path());
    let copied_segment = copy
        .path()
        .join("events")
        .join(segment.file_name().unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&copied_segment)
        .unwrap()
        .set_len(durable_bytes)
        .unwrap();
    drop(engine);
    let engine = open_token_plan(copy.path(), sync_options());
    assert_eq!(last_seq(&engine), durable_seq);
    let cursor = engine.cursor("billing").unwrap();
    assert!(
        cursor <= durable_seq,
        "the cursor {cursor} is past the end of the log, event {durable_seq}"
    );
    // New events after the loss are all read from the cursor.
    for minute in 4..=6 {
        engine
            .top_up("@ada", 1_000, Some(T0_MS + minute * MINUTE_MS))
            .unwrap();
    }
    let unread = engine.events_after(cursor, 100).unwrap();
    assert_eq!(
        unread
            .iter()
            .filter(|event| event.body.kind() == "credits_topped_up")
            .count(),
        3
    );
}

// ---------------------------------------------------------------------------------------------
// Retention and compaction.

const TEN_SECONDS_POLICY: &str = r#"
time_zone = "UTC"

[resources.chat]
units = ["requests"]
price_micros = { requests = 1000 }

[plans.Tiny]
limits = [{ resource = "chat", unit = "requests", amount = 5, window = "rolling:10s" }]

[plans.Small]
limits = [
  { resource = "chat", unit = "requests", amount = 20, window = "rolling:10s" },
  { resource = "chat", unit = "requests", amount = 30, window = "rolling:20s" },
]
"#;

fn ten_seconds() -> Policy {
    Policy::from_toml_str(TEN_SECONDS_POLICY).expect("a valid policy")
}

fn small_retention() -> OpenOptions {
    OpenOptions {
        retention_ms: SECOND_MS,
        ..sync_options()
    }
}

/// A request id kept for longer than the window plus the retention survives the compaction
/// that removes the segment holding its event, and a reopen: its retry is the first decision
/// and counts nothing again.
#[test]
fn a_request_id_whose_event_compaction_removed_is_still_counted_once_after_a_reopen() {
    let dir = TempDir::new("id-compacted");
    let options = OpenOptions {
        engine: tally_engine::EngineOptions {
            idempotency_horizon_ms: HOUR_MS,
            ..tally_engine::EngineOptions::default()
        },
        ..small_retention()
    };
    let engine = open(dir.path(), ten_seconds(), options.clone());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine.top_up("@ann", 100_000, Some(T0_MS)).unwrap();
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ann", "chat", &one)
        .at(T0_MS)
        .id("once");
    let first = engine.consume(&request).unwrap();
    let charged = engine.credits_micros("@ann").unwrap();
    assert!(charged < 100_000, "charged to credits");
    engine.checkpoint().unwrap();
    engine
        .top_up("@ann", 1, Some(T0_MS + 2 * MINUTE_MS))
        .unwrap();
    let report = engine.compact(Some(T0_MS + 2 * MINUTE_MS)).unwrap();
    assert!(
        report.first_seq_kept > 1,
        "the id's event compacted away: {report:?}"
    );
    drop(engine);
    let engine = open(dir.path(), ten_seconds(), options);
    let retry = request.at(T0_MS + 3 * MINUTE_MS);
    assert_eq!(engine.consume(&retry).unwrap(), first);
    assert_eq!(engine.credits_micros("@ann").unwrap(), charged + 1);
}

/// A saved cursor that fell behind the retention is told which events were compacted away
/// before it read them. Before, reading after it jumped over the gap silently: a billing reader
/// at event 2 got event 7 next, and events 3 to 6 were never billed.
#[test]
fn reading_after_a_cursor_that_compaction_passed_names_the_events_lost() {
    let dir = TempDir::new("cursor-compacted");
    let engine = open(dir.path(), ten_seconds(), small_retention());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ann", "ann", "Tiny", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    for offset in 0..3 {
        let request = UsageRequest::new("key-ann", "chat", &one).at(T0_MS + offset);
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    engine.save_cursor("billing", 2).unwrap();
    let snapshot = engine.checkpoint().unwrap();
    let later = T0_MS + 10 * MINUTE_MS;
    let request = UsageRequest::new("key-ann", "chat", &one).at(later);
    assert!(engine.consume(&request).unwrap().is_admitted());
    let report = engine.compact(Some(later)).unwrap();
    assert_eq!(report.first_seq_kept, snapshot + 1);
    assert!(report.first_seq_kept > 3, "{report:?}");
    let cursor = engine.cursor("billing").unwrap();
    let lost = format!("events 3 to {snapshot} were compacted away");
    match engine.events_after(cursor, 100) {
        Err(Error::InvalidArgument { field, problem }) => {
            assert_eq!(field, "after");
            assert!(problem.contains(&lost), "{problem}");
            assert!(
                problem.contains(&format!("starts at event {}", snapshot + 1)),
                "{problem}"
            );
        }
        other => panic!("reading after cursor {cursor}: {other:?}"),
    }
    // Reading on from where the log starts, or from its oldest event (0), is the reader's
    // choice to make, and both work.
    let from_start = engine.events_after(snapshot, 100).unwrap();
    assert_eq!(
        from_start.first().map(|event| event.seq),
        Some(snapshot + 1)
    );
    assert_eq!(engine.events_after(0, 100).unwrap(), from_start);
    // The same after a reopen.
    engine.close().unwrap();
    let engine = open(dir.path(), ten_seconds(), small_retention());
    assert!(matches!(
        engine.events_after(2, 100),
        Err(Error::InvalidArgument { problem, .. }) if problem.contains(&lost)
    ));
}

/// Requests a gateway delivers late: stamped 30 days back, logged now. Their timestamps are
/// past the longest window plus the retention, but a billing reader has the retention from
/// the time they were logged (on the engine's clock) to read them. Before, the next
/// checkpoint and `compact` removed them at once: a reader that came a minute later was told
/// they were compacted away, and they were never billed.
#[test]
fn late_events_stay_for_the_retention_after_they_were_logged_then_go() {
    let dir = TempDir::new("late-events");
    let retention_ms = 7 * DAY_MS;
    let options = OpenOptions {
        retention_ms,
        ..sync_options()
    };
    let now_ms = T0_MS + 40 * DAY_MS;
    let late_ms = now_ms - 30 * DAY_MS;
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(now_ms));
    // The database has run since T0.
    let engine = open(dir.path(), ten_seconds(), options.clone());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine.top_up("@ann", 100_000, Some(T0_MS)).unwrap();
    engine.close().unwrap();
    let engine = Engine::open(dir.path(), ten_seconds(), clock.clone(), options.clone()).unwrap();
    let first_late = engine.events_after(0, 100).unwrap().last().unwrap().seq + 1;
    let one = [(Unit::Requests, 1)];
    for offset in 0..3 {
        let request = UsageRequest::new("key-ann", "chat", &one).at(late_ms + offset);
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    let late = engine.events_after(first_late - 1, 100).unwrap();
    let last_late = late.last().unwrap().seq;
    engine.checkpoint().unwrap();
    // Each compaction below follows events of its day, so its checkpoint is a new snapshot.
    let top_up = |engine: &Engine, at_ms: u64| engine.top_up("@ann", 1, Some(at_ms)).unwrap();
    // A minute on, a checkpoint and a compaction: every late event stays for the reader.
    clock.set_ms(now_ms + MINUTE_MS);
    top_up(&engine, now_ms + MINUTE_MS);
    let report = engine.compact(None).unwrap();
    assert!(report.first_seq_kept <= first_late, "{report:?}");
    assert_eq!(
        engine.events_after(first_late - 1, 100).unwrap()[..late.len()],
        late[..]
    );
    // The same after a reopen (a day later: still within the retention).
    engine.close().unwrap();
    clock.set_ms(now_ms + DAY_MS);
    let engine = Engine::open(dir.path(), ten_seconds(), clock.clone(), options.clone()).unwrap();
    top_up(&engine, now_ms + DAY_MS);
    let report = engine.compact(None).unwrap();
    assert!(report.first_seq_kept <= first_late, "{report:?}");
    assert_eq!(
        engine.events_after(first_late - 1, 100).unwrap()[..late.len()],
        late[..]
    );
    // Once the retention has passed since they were logged, they go.
    engine.close().unwrap();
    clock.set_ms(now_ms + retention_ms + 2 * MINUTE_MS);
    let engine = Engine::open(dir.path(), ten_seconds(), clock.clone(), options).unwrap();
    top_up(&engine, now_ms + retention_ms + 2 * MINUTE_MS);
    let report = engine.compact(None).unwrap();
    assert!(report.first_seq_kept > last_late, "{report:?}");
    assert!(report.events_removed >= late.len() as u64, "{report:?}");
    match engine.events_after(first_late, 100) {
        Err(Error::InvalidArgument { field, problem }) => {
            assert_eq!(field, "after");
            assert!(problem.contains("compacted away"), "{problem}");
        }
        other => panic!("reading after event {first_late}: {other:?}"),
    }
    engine.close().unwrap();
    let verified = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(verified.problems.is_empty(), "{verified:?}");
}

/// A clock stepped back between two checkpoints dates the second's record before the first's,
/// yet its events do not go early: compaction removes segments oldest first and stops at the
/// first that must stay, so they stay until the first checkpoint's are past the retention.
#[test]
fn a_clock_stepped_back_does_not_date_events_logged_earlier_than_those_before_them() {
    let dir = TempDir::new("logged-by-stepped-back");
    let retention_ms = 7 * DAY_MS;
    let options = OpenOptions {
        retention_ms,
        ..sync_options()
    };
    let now_ms = T0_MS + 40 * DAY_MS;
    let late_ms = now_ms - 30 * DAY_MS;
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(now_ms));
    let engine = Engine::open(dir.path(), ten_seconds(), clock.clone(), options.clone()).unwrap();
    engine.create_user("ann", "key-ann", Some(late_ms)).unwrap();
    engine.top_up("@ann", 100_000, Some(late_ms)).unwrap();
    let one = [(Unit::Requests, 1)];
    let consume = |at_ms: u64| {
        let request = UsageRequest::new("key-ann", "chat", &one).at(at_ms);
        assert!(engine.consume(&request).unwrap().is_admitted());
    };
    consume(late_ms);
    engine.checkpoint().unwrap();
    // The clock is stepped back six days; more late requests, and a checkpoint.
    clock.set_ms(now_ms - 6 * DAY_MS);
    consume(late_ms + 1);
    let second = engine.events_after(0, 100).unwrap().last().unwrap().seq;
    engine.checkpoint().unwrap();
    // Six days and a bit after they were really logged (the clock set right again): within
    // the retention, so they stay.
    let later_ms = now_ms + 6 * DAY_MS + 2 * MINUTE_MS;
    clock.set_ms(later_ms);
    engine.top_up("@ann", 1, Some(later_ms)).unwrap();
    let report = engine.compact(None).unwrap();
    assert!(report.first_seq_kept <= second, "{report:?}");
    // A day later the retention has passed: they go.
    let after_ms = now_ms + retention_ms + 2 * MINUTE_MS;
    clock.set_ms(after_ms);
    engine.top_up("@ann", 1, Some(after_ms)).unwrap();
    let report = engine.compact(None).unwrap();
    assert!(report.first_seq_kept > second, "{report:?}");
    engine.close().unwrap();
}

/// A periodic checkpoint records when the events before it were logged too, so the
/// segments it sealed go once the retention has passed since then, not only since the next
/// `compact` or `close`.
#[test]
fn segments_sealed_by_periodic_checkpoints_go_the_retention_after_they_were_logged() {
    let dir = TempDir::new("logged-by-periodic");
    let retention_ms = HOUR_MS;
    let options = OpenOptions {
        retention_ms,
        checkpoint_every_events: 4,
        ..sync_options()
    };
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine = Engine::open(dir.path(), ten_seconds(), clock.clone(), options).unwrap();
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine.top_up("@ann", 100_000, Some(T0_MS)).unwrap();
    let one = [(Unit::Requests, 1)];
    for offset in 0..20 {
        let request = UsageRequest::new("key-ann", "chat", &one).at(T0_MS + offset);
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    let periodic = engine.events_after(0, 100).unwrap().last().unwrap().seq;
    let later_ms = T0_MS + retention_ms + MINUTE_MS;
    clock.set_ms(later_ms);
    engine.top_up("@ann", 1, Some(later_ms)).unwrap();
    let report = engine.compact(None).unwrap();
    assert!(report.first_seq_kept > 4, "{report:?}");
    assert!(report.first_seq_kept <= periodic + 1, "{report:?}");
    engine.close().unwrap();
}

/// A checkpoint with nothing logged since the one before (an idle gateway's `close`, an
/// explicit `checkpoint`) does not make the events before it any younger: they go the
/// retention after they were logged, not after the last idle checkpoint.
#[test]
fn an_idle_checkpoint_does_not_hold_back_the_compaction_of_what_came_before() {
    let dir = TempDir::new("logged-by-idle");
    let retention_ms = HOUR_MS;
    let options = OpenOptions {
        retention_ms,
        ..sync_options()
    };
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine = Engine::open(dir.path(), ten_seconds(), clock.clone(), options).unwrap();
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine.top_up("@ann", 100_000, Some(T0_MS)).unwrap();
    let logged = engine.checkpoint().unwrap();
    // Idle checkpoints, the last a minute before the compaction below.
    for minutes in [10, 30, 60] {
        clock.set_ms(T0_MS + minutes * MINUTE_MS);
        assert_eq!(engine.checkpoint().unwrap(), logged);
    }
    let later_ms = T0_MS + retention_ms + MINUTE_MS;
    clock.set_ms(later_ms);
    engine.top_up("@ann", 1, Some(later_ms)).unwrap();
    engine.checkpoint().unwrap();
    engine.top_up("@ann", 1, Some(later_ms)).unwrap();
    let report = engine.compact(None).unwrap();
    assert_eq!(report.first_seq_kept, logged + 1, "{report:?}");
    engine.close().unwrap();
}

/// A database an earlier build wrote has no record of when its events were logged: its
/// segments count as logged at the first checkpoint this build takes, so they stay for the
/// retention after the upgrade (a reader has that long), then go; it opens and verifies.
#[test]
fn segments_an_earlier_build_logged_stay_for_the_retention_after_the_upgrade() {
    let dir = TempDir::new("logged-by-earlier-build");
    let retention_ms = 7 * DAY_MS;
    let options = OpenOptions {
        retention_ms,
        ..sync_options()
    };
    let engine = open(dir.path(), ten_seconds(), options.clone());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine.top_up("@ann", 100_000, Some(T0_MS)).unwrap();
    engine.checkpoint().unwrap();
    engine.top_up("@ann", 1, Some(T0_MS)).unwrap();
    engine.close().unwrap();
    // As an earlier build left it: none of the records.
    {
        let db = sled::open(dir.path()).unwrap();
        let meta = db.open_tree("meta").unwrap();
        let records: Vec<_> = meta.scan_prefix(b"logged_by/").keys().collect();
        assert!(
            !records.is_empty(),
            "this build records when events were logged"
        );
        for key in records {
            meta.remove(key.unwrap()).unwrap();
        }
        db.flush().unwrap();
    }
    // Opened 30 days on: its events are past the longest window plus the retention, but the
    // build cannot tell when they were logged.
    let upgraded_ms = T0_MS + 30 * DAY_MS;
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(upgraded_ms));
    let engine = Engine::open(dir.path(), ten_seconds(), clock.clone(), options.clone()).unwrap();
    engine.top_up("@ann", 1, Some(upgraded_ms)).unwrap();
    let report = engine.compact(None).unwrap();
    assert_eq!(report.events_removed, 0, "{report:?}");
    assert_eq!(report.first_seq_kept, 1, "{report:?}");
    engine.close().unwrap();
    let later_ms = upgraded_ms + retention_ms + MINUTE_MS;
    clock.set_ms(later_ms);
    let engine = Engine::open(dir.path(), ten_seconds(), clock, options).unwrap();
    engine.top_up("@ann", 1, Some(later_ms)).unwrap();
    let report = engine.compact(None).unwrap();
    assert!(report.first_seq_kept > 1, "{report:?}");
    engine.close().unwrap();
    let verified = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(verified.problems.is_empty(), "{verified:?}");
}

/// An export reading while compaction removes log files: the files it listed stay until it
/// is done (compaction waits for it), so it reads on exactly after its cursor. Before, a file
/// of its list could be removed under it: "No such file" for the billing reader.
#[test]
fn reading_events_while_compaction_removes_files_reads_them_all() {
    let dir = TempDir::new("compact-while-reading");
    let faults = tally_engine::Faults::new();
    let options = OpenOptions {
        segment_bytes: 256,
        faults: Some(std::sync::Arc::clone(&faults)),
        ..small_retention()
    };
    let engine = open(dir.path(), ten_seconds(), options);
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ann", "payg-ann", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    for offset in 0..30 {
        let request = UsageRequest::new("payg-ann", "chat", &one).at(T0_MS + offset);
        engine.consume(&request).unwrap();
    }
    let snapshot = engine.checkpoint().unwrap();
    let later = T0_MS + 10 * MINUTE_MS;
    let request = UsageRequest::new("payg-ann", "chat", &one).at(later);
    engine.consume(&request).unwrap();
    let last = last_seq(&engine);
    faults.hold_scans();
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| engine.events_after(0, 1_000));
        while faults.scans_held() == 0 {
            assert!(!reader.is_finished(), "the reader ended before the hold");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The reader has listed the files; compaction runs now, and removes what it can.
        let compactor = scope.spawn(|| engine.compact(Some(later)));
        std::thread::sleep(std::time::Duration::from_millis(100));
        faults.release_scans();
        let events = reader.join().unwrap().expect("read while compacting");
        let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
        let report = compactor.join().unwrap().expect("compact");
        assert_eq!(report.first_seq_kept, snapshot + 1, "{report:?}");
    });
    // Afterwards the log starts past the snapshot, and reading from 0 starts there.
    let kept = engine.events_after(0, 1_000).unwrap();
    assert_eq!(kept.first().map(|event| event.seq), Some(snapshot + 1));
}

/// Two compactions at once (a gateway's scheduled one and an operator's through the C ABI):
/// each removes what it can and neither fails. Before, both listed the same old segments and
/// the second to reach one found it gone: "No such file" for a compaction that lost nothing.
#[test]
fn two_compactions_at_once_both_succeed_and_remove_each_old_segment_once() {
    let dir = TempDir::new("compact-twice-at-once");
    let options = OpenOptions {
        segment_bytes: 256,
        ..small_retention()
    };
    let engine = open(dir.path(), ten_seconds(), options);
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ann", "payg-ann", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    let mut at_ms = T0_MS;
    for round in 0..20 {
        for _ in 0..60 {
            at_ms += 1;
            let request = UsageRequest::new("payg-ann", "chat", &one).at(at_ms);
            engine.consume(&request).unwrap();
        }
        engine.checkpoint().unwrap();
        let later = at_ms + 10 * MINUTE_MS;
        let reports = std::thread::scope(|scope| {
            let first = scope.spawn(|| engine.compact(Some(later)));
            let second = scope.spawn(|| engine.compact(Some(later)));
            [first.join().unwrap(), second.join().unwrap()]
        });
        let mut removed = 0;
        for report in reports {
            let report = report.unwrap_or_else(|error| panic!("round {round}: {error}"));
            removed += report.events_removed;
        }
        let start = engine.events_after(0, 1).unwrap()[0].seq;
        assert!(
            removed < start,
            "round {round}: {removed} removed, log starts at {start}"
        );
    }
    let before = state(&engine, &["payg-ann"], &["@ann"], at_ms);
    engine.close().unwrap();
    let engine = open(dir.path(), ten_seconds(), small_retention());
    let after = state(&engine, &["payg-ann"], &["@ann"], at_ms);
    assert_same_state(
        &after,
        &before,
        "after two compactions at once and a reopen",
    );
}

/// A segment file compaction fails to remove (an I/O error) stays in the log, for the next
/// compaction to remove, as the file stays on disk. Before, it was dropped from the log's list
/// first: the log said it started after events still on disk, the next compaction removed the
/// segments after it and left it in front of a gap, and after a reopen reading from 0 failed
/// ("events are missing") and `verify` reported the gap.
#[test]
fn a_segment_compaction_fails_to_remove_stays_for_the_next_compaction() {
    let dir = TempDir::new("compact-removal-fails");
    let faults = tally_engine::Faults::new();
    let options = OpenOptions {
        segment_bytes: 256,
        faults: Some(std::sync::Arc::clone(&faults)),
        ..small_retention()
    };
    let engine = open(dir.path(), ten_seconds(), options.clone());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ann", "payg-ann", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    for offset in 0..30 {
        let request = UsageRequest::new("payg-ann", "chat", &one).at(T0_MS + offset);
        engine.consume(&request).unwrap();
    }
    let snapshot = engine.checkpoint().unwrap();
    let later = T0_MS + 10 * MINUTE_MS;
    let request = UsageRequest::new("payg-ann", "chat", &one).at(later);
    engine.consume(&request).unwrap();
    assert!(segment_paths(dir.path()).len() > 3);
    faults.fail_next_removals(1);
    let failed = engine.compact(Some(later)).expect_err("the removal fails");
    assert!(storage_problem(&failed).contains("removing"), "{failed:?}");
    // Nothing was removed: the log still starts at event 1, whose file is still there.
    assert!(dir.path().join(format!("events/{:020}.seg", 1)).exists());
    let kept = engine.events_after(0, 1).unwrap();
    assert_eq!(kept.first().map(|event| event.seq), Some(1));
    // The next compaction removes it, and every other old segment.
    let report = engine.compact(Some(later)).expect("compact");
    assert_eq!(report.first_seq_kept, snapshot + 1, "{report:?}");
    let first_file = segment_paths(dir.path()).into_iter().next();
    assert_eq!(
        first_file.and_then(|path| path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())),
        Some(format!("{:020}", snapshot + 1))
    );
    let before = state(&engine, &["payg-ann"], &["@ann"], later);
    drop(engine);
    let verified = Engine::verify(dir.path(), options.clone()).expect("verify");
    assert!(verified.is_sound(), "{:?}", verified.problems);
    let engine = open(dir.path(), ten_seconds(), options);
    let kept = engine
        .events_after(0, 1_000)
        .expect("read from the oldest event kept");
    assert_eq!(kept.first().map(|event| event.seq), Some(snapshot + 1));
    assert_same_state(
        &state(&engine, &["payg-ann"], &["@ann"], later),
        &before,
        "reopened",
    );
}

#[test]
fn compaction_removes_old_events_keeps_the_state_exactly_and_verify_stays_sound() {
    let dir = TempDir::new("compact");
    let engine = open(dir.path(), ten_seconds(), small_retention());
    let twin = twin(ten_seconds());
    let keys = ["key-ann", "key-ben"];
    let teams = ["@ann", "@ben"];
    let one = [(Unit::Requests, 1)];
    let run = |engine: &Engine| -> Vec<String> {
        let mut out = Vec::new();
        engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
        engine.create_user("ben", "key-ben", Some(T0_MS)).unwrap();
        engine
            .assign_seat("@ann", "ann", "Tiny", Some(T0_MS))
            .unwrap();
        engine
            .assign_seat("@ben", "ben", "Small", Some(T0_MS))
            .unwrap();
        engine.top_up("@ann", 100_000, Some(T0_MS)).unwrap();
        for index in 0..8 {
            // Tiny's 5 fill up, the rest go to credits.
            let request = UsageRequest::new("key-ann", "chat", &one).at(T0_MS + index);
            out.push(format!("{:?}", engine.consume(&request)));
        }
        for index in 0..25 {
            let request = UsageRequest::new("key-ben", "chat", &one).at(T0_MS + index * 100);
            out.push(format!("{:?}", engine.consume(&request)));
        }
        out
    };
    let outcomes = run(&engine);
    assert_eq!(outcomes, run(&twin));
    assert!(outcomes.iter().any(|outcome| outcome.contains("Credits")));
    let first_snapshot = engine.checkpoint().expect("checkpoint");
    // Usage one minute later, and some still live (5 s old) when compacting.
    let compact_at = T0_MS + 2 * MINUTE_MS;
    for at_ms in [T0_MS + MINUTE_MS, compact_at - 5 * SECOND_MS] {
        for key in keys {
            let request = UsageRequest::new(key, "chat", &one).at(at_ms);
            assert_eq!(engine.consume(&request), twin.consume(&request));
        }
    }
    let before = state(&engine, &keys, &teams, compact_at);
    assert_same_state(&before, &state(&twin, &keys, &teams, compact_at), "state");
    assert!(before
        .reports
        .iter()
        .all(|report| report.limits[0].used == 1));
    let events = last_seq(&engine);

    let report = engine.compact(Some(compact_at)).expect("compact");
    assert_eq!(
        report.events_removed, first_snapshot,
        "every event up to the checkpoint"
    );
    assert_eq!(report.first_seq_kept, first_snapshot + 1);
    assert_eq!(report.snapshot_seq, events);
    let kept = engine.events_after(0, 1_000).unwrap();
    assert_eq!(
        kept.first().map(|event| event.seq),
        Some(first_snapshot + 1)
    );
    assert_eq!(kept.last().map(|event| event.seq), Some(events));
    assert_same_state(
        &state(&engine, &keys, &teams, compact_at),
        &before,
        "in memory",
    );
    engine.close().expect("close");

    let verified = Engine::verify(dir.path(), small_retention()).expect("verify");
    assert!(verified.is_sound(), "{:?}", verified.problems);
    assert_eq!(verified.first_seq, first_snapshot + 1);
    assert_eq!(verified.snapshot_matches_replay, Some(true));

    let engine = open(dir.path(), ten_seconds(), small_retention());
    assert_same_state(
        &state(&engine, &keys, &teams, compact_at),
        &before,
        "after reopening",
    );
    for at_ms in [
        compact_at,
        compact_at + 3 * SECOND_MS,
        compact_at + MINUTE_MS,
    ] {
        for key in keys {
            let request = UsageRequest::new(key, "chat", &[(Unit::Requests, 4)]).at(at_ms);
            assert_eq!(
                engine.consume(&request),
                twin.consume(&request),
                "{key} {at_ms}"
            );
        }
    }
    // A second compaction later drops what the first kept.
    let later = compact_at + 10 * MINUTE_MS;
    let second = engine.compact(Some(later)).expect("compact again");
    assert!(second.events_removed > 0);
    assert!(second.first_seq_kept > first_snapshot + 1);
    let after = state(&engine, &keys, &teams, later);
    assert_same_state(&after, &state(&twin, &keys, &teams, later), "state");
    drop(engine);
    let verified = Engine::verify(dir.path(), small_retention()).expect("verify");
    assert!(verified.is_sound(), "{:?}", verified.problems);
    let engine = open(dir.path(), ten_seconds(), small_retention());
    assert_same_state(&state(&engine, &keys, &teams, later), &after, "state");
}

/// Retention applies on its own: each periodic checkpoint compacts once its snapshot is
/// stored, with the engine's clock at the cut as "now". Before, segments were removed only by
/// `compact`, which neither gateway calls (and `tally compact` cannot run beside a gateway
/// holding the database), so a gateway's disk use grew for as long as it ran. What the
/// retention keeps stays: with an hour's retention, nothing goes.
#[test]
fn periodic_checkpoints_compact_what_the_retention_lets_go() {
    for (retention_ms, removes) in [(SECOND_MS, true), (HOUR_MS, false)] {
        let dir = TempDir::new("auto-compact");
        let clock = clock();
        let options = OpenOptions {
            retention_ms,
            checkpoint_every_events: 8,
            ..sync_options()
        };
        let engine = Engine::open(
            dir.path(),
            ten_seconds(),
            std::sync::Arc::clone(&clock) as std::sync::Arc<dyn tally_engine::Clock>,
            options.clone(),
        )
        .expect("open");
        let twin = twin(ten_seconds());
        let one = [(Unit::Requests, 1)];
        let run = |engine: &Engine, at_ms: u64| -> Vec<String> {
            (0..40)
                .map(|index| {
                    let request = UsageRequest::new("key-ben", "chat", &one).at(at_ms + index);
                    format!("{:?}", engine.consume(&request))
                })
                .collect()
        };
        for engine in [&engine, &twin] {
            engine.create_user("ben", "key-ben", Some(T0_MS)).unwrap();
            engine
                .assign_seat("@ben", "ben", "Small", Some(T0_MS))
                .unwrap();
            engine.top_up("@ben", 1_000_000, Some(T0_MS)).unwrap();
        }
        assert_eq!(run(&engine, T0_MS), run(&twin, T0_MS));
        // Two minutes on, past the 20 s window plus a second's retention.
        let later = T0_MS + 2 * MINUTE_MS;
        clock.set_ms(later);
        assert_eq!(run(&engine, later), run(&twin, later));
        // The last periodic checkpoint's thread (and its compaction) is done once this one runs.
        engine.checkpoint().expect("checkpoint");
        let first_kept = engine.events_after(0, 1).unwrap()[0].seq;
        assert_eq!(
            first_kept > 1,
            removes,
            "retention {retention_ms} ms: log starts at {first_kept}"
        );
        let kept = engine.events_after(0, 1_000).unwrap();
        assert!(
            kept.iter().filter(|event| event.at_ms >= later).count() >= 40,
            "every event the retention keeps is there"
        );
        let before = state(&engine, &["key-ben"], &["@ben"], later);
        assert_same_state(
            &before,
            &state(&twin, &["key-ben"], &["@ben"], later),
            "state",
        );
        drop(engine);
        let verified = Engine::verify(dir.path(), options.clone()).expect("verify");
        assert!(verified.is_sound(), "{:?}", verified.problems);
        assert_eq!(verified.first_seq, first_kept);
        let engine = Engine::open(
            dir.path(),
            ten_seconds(),
            std::sync::Arc::clone(&clock) as std::sync::Arc<dyn tally_engine::Clock>,
            options,
        )
        .expect("reopen");
        assert_same_state(
            &state(&engine, &["key-ben"], &["@ben"], later),
            &before,
            "reopened",
        );
    }
}

/// The compaction after a periodic checkpoint waits for an export reader 100 ms at most: the
/// next periodic checkpoint's cut waits for the one before it, and is taken by the request
/// that crosses the interval, so a compaction waiting for a reader to let go of the files made
/// that request wait for the reader too (1.5 s behind a reader held 1.5 s; 8 ms before
/// e0edd29). What it leaves goes at the next checkpoint after the reader is done.
#[test]
fn a_request_crossing_a_periodic_checkpoint_does_not_wait_for_an_export_reader() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TempDir::new("auto-compact-reader");
    let clock = clock();
    let faults = tally_engine::Faults::new();
    let options = OpenOptions {
        segment_bytes: 256,
        checkpoint_every_events: 10,
        faults: Some(std::sync::Arc::clone(&faults)),
        ..small_retention()
    };
    let engine = Engine::open(
        dir.path(),
        ten_seconds(),
        std::sync::Arc::clone(&clock) as std::sync::Arc<dyn tally_engine::Clock>,
        options,
    )
    .expect("open");
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ann", "payg-ann", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    let mut at_ms = T0_MS;
    let mut consume = |engine: &Engine, count: usize| {
        for _ in 0..count {
            at_ms += 1;
            let request = UsageRequest::new("payg-ann", "chat", &one).at(at_ms);
            assert!(engine.consume(&request).unwrap().is_admitted());
        }
    };
    consume(&engine, 40);
    // A segment starts after the 40th event (as in the test below).
    let report = engine.compact(Some(T0_MS)).expect("a checkpoint");
    assert_eq!(report.events_removed, 0, "all are young at T0");
    // Past the 20 s window plus a second's retention: each periodic checkpoint from here on
    // has segments to remove.
    clock.set_ms(T0_MS + 10 * MINUTE_MS);
    faults.hold_scans();
    let done = AtomicBool::new(false);
    let released_by_watchdog = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| engine.events_after(0, 10));
        while faults.scans_held() == 0 {
            assert!(!reader.is_finished(), "the reader ended before the hold");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let watchdog = scope.spawn(|| {
            for _ in 0..500 {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            released_by_watchdog.store(true, Ordering::Relaxed);
            faults.release_scans();
        });
        // Across four periodic checkpoints while the reader holds the files it listed.
        consume(&engine, 40);
        done.store(true, Ordering::Relaxed);
        watchdog.join().unwrap();
        assert!(
            !released_by_watchdog.load(Ordering::Relaxed),
            "the requests waited for the reader (released after 5 s)"
        );
        faults.release_scans();
        let read: Vec<u64> = reader
            .join()
            .unwrap()
            .expect("the reader reads what it listed")
            .iter()
            .map(|event| event.seq)
            .collect();
        assert_eq!(read, (1..=10).collect::<Vec<_>>());
    });
    // The reader done, the next periodic checkpoints remove what the retention lets go: at
    // least a segment each, as many as the budget allows (on a loaded machine, few), so the
    // bound is the count of segments, not a time.
    let mut first_kept = 1;
    let mut rounds = 0;
    while first_kept <= 40 && rounds < 40 {
        consume(&engine, 10);
        engine.checkpoint().expect("checkpoint");
        first_kept = engine.events_after(0, 1).unwrap()[0].seq;
        rounds += 1;
    }
    assert!(
        first_kept > 40,
        "the log starts at {first_kept} after {rounds} periodic checkpoints"
    );
}

/// Export readers polling back to back do not keep the compaction after each periodic
/// checkpoint from removing what the retention lets go: it waits for them a little (a
/// waiting compaction holds new readers back, so it gets in), not at all while they read.
/// Taking the files only when no reader held them, it never did, and the disk grew.
#[test]
fn export_readers_polling_back_to_back_do_not_hold_back_periodic_compaction() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TempDir::new("auto-compact-busy-readers");
    let clock = clock();
    let options = OpenOptions {
        segment_bytes: 256,
        checkpoint_every_events: 10,
        ..small_retention()
    };
    let engine = Engine::open(
        dir.path(),
        ten_seconds(),
        std::sync::Arc::clone(&clock) as std::sync::Arc<dyn tally_engine::Clock>,
        options,
    )
    .expect("open");
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ann", "payg-ann", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    let mut at_ms = T0_MS;
    let mut consume = |count: usize| {
        for _ in 0..count {
            at_ms += 1;
            let request = UsageRequest::new("payg-ann", "chat", &one).at(at_ms);
            assert!(engine.consume(&request).unwrap().is_admitted());
        }
    };
    consume(400);
    // A segment starts after the 400th event (a compaction takes a checkpoint and waits for
    // the new segment it asks for): one holding it and an event logged after the clock moved
    // could never go, and where the periodic checkpoints' cuts put the segments' starts
    // depends on the machine's timing.
    let report = engine.compact(Some(T0_MS)).expect("a checkpoint");
    assert_eq!(report.events_removed, 0, "all are young at T0");
    // Past the 20 s window plus a second's retention.
    clock.set_ms(T0_MS + 10 * MINUTE_MS);
    let running = AtomicBool::new(true);
    let (first_kept, rounds) = std::thread::scope(|scope| {
        // The readers stop however the checkpoints end.
        let _stops_the_readers = StoreOnDrop(&running, false);
        for _ in 0..2 {
            let (engine, running) = (&engine, &running);
            scope.spawn(move || {
                while running.load(Ordering::Relaxed) {
                    let _ = engine.events_after(0, 1_000);
                }
            });
        }
        // Periodic checkpoints while the readers poll, until the old events are gone. Each
        // removes at least one segment (it gets in within its budget), more as the machine
        // allows: on a loaded one ten were not enough (the log started at 391), so the bound
        // is the count of segments, not a time. Held back, it never gets past the first.
        let mut first_kept = 1;
        let mut rounds = 0;
        while first_kept <= 400 && rounds < 400 {
            consume(10);
            // The last one's compaction is done once this one runs (a checkpoint does not
            // compact).
            engine.checkpoint().expect("checkpoint");
            first_kept = engine.events_after(0, 1).unwrap()[0].seq;
            rounds += 1;
        }
        (first_kept, rounds)
    });
    assert!(
        first_kept > 400,
        "the log starts at {first_kept} after {rounds} periodic checkpoints"
    );
}

/// What a paging billing reader made of the log: the events it was handed, in the order it
/// was handed them, and the ranges it was told were compacted away before it read them.
#[derive(Default)]
struct ReaderLedger {
    seen: Vec<u64>,
    lost: Vec<(u64, u64)>,
}

impl ReaderLedger {
    /// One page after `cursor` (saved under `name` once read), `limit` events at most:
    /// checks that it goes on exactly after the cursor, or that the error names exactly the
    /// events from the cursor on that compaction removed. Returns the new cursor.
    fn page(&mut self, engine: &Engine, name: &str, limit: usize) -> u64 {
        let cursor = engine.cursor(name).expect("the cursor reads back");
        match engine.events_after(cursor, limit) {
            Ok(events) => {
                assert!(events.len() <= limit, "{} events for {limit}", events.len());
                let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
                let expected: Vec<u64> = (cursor + 1..=cursor + seqs.len() as u64).collect();
                assert_eq!(seqs, expected, "the page after {cursor} skips or repeats");
                self.seen.extend_from_slice(&seqs);
                let last = seqs.last().copied().unwrap_or(cursor);
                engine.save_cursor(name, last).expect("save the cursor");
                last
            }
            Err(Error::InvalidArgument { field, problem }) => {
                assert_eq!(field, "after", "{problem}");
                // Where the log started when the read was refused (a compaction running on
                // may have moved it on since).
                let start: u64 = problem
                    .split("the log now starts at event ")
                    .nth(1)
                    .and_then(|rest| rest.split(';').next())
                    .and_then(|start| start.parse().ok())
                    .unwrap_or_else(|| panic!("no start named: {problem}"));
                assert!(start > cursor + 1, "{problem}");
                let lost = format!("events {} to {} were compacted away", cursor + 1, start - 1);
                assert!(problem.contains(&lost), "{problem} (wanted {lost:?})");
                self.lost.push((cursor + 1, start - 1));
                engine
                    .save_cursor(name, start - 1)
                    .expect("save the cursor");
                start - 1
            }
            Err(other) => panic!("reading after {cursor}: {other:?}"),
        }
    }

    /// Every event from 1 to `last` was handed over once, in order, or reported lost.
    fn assert_accounts_for(&self, last: u64) {
        let mut all: Vec<u64> = self.seen.clone();
        for &(from, to) in &self.lost {
            all.extend(from..=to);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=last).collect::<Vec<_>>(), "lost {:?}", self.lost);
        assert!(self.seen.windows(2).all(|pair| pair[0] < pair[1]));
    }
}

/// A billing reader paging with a saved cursor (pages of 1 to 7 events) while requests cross
/// periodic checkpoints, each sealing a segment and compacting what the retention lets go,
/// and segments roll over every few events: in every durability mode, every event is handed
/// over exactly once, in order, or, where compaction removed events before the reader got to
/// them, reading fails naming exactly those; then the same across a reopen, from the saved
/// cursor.
#[test]
fn a_reader_paging_while_checkpoints_compact_sees_each_event_once_or_hears_of_its_loss() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let modes = [
        Durability::Sync,
        Durability::Interval { ms: 2 },
        Durability::None,
    ];
    for durability in modes {
        let dir = TempDir::new("reader-paging-compaction");
        let clock = clock();
        let options = OpenOptions {
            durability,
            segment_bytes: 256,
            checkpoint_every_events: 10,
            ..small_retention()
        };
        let open = |options: OpenOptions| {
            Engine::open(
                dir.path(),
                ten_seconds(),
                std::sync::Arc::clone(&clock) as std::sync::Arc<dyn tally_engine::Clock>,
                options,
            )
            .expect("open")
        };
        let engine = open(options.clone());
        engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
        engine
            .create_payg_key("ann", "payg-ann", Some(T0_MS))
            .unwrap();
        let one = [(Unit::Requests, 1)];
        let writing = AtomicBool::new(true);
        let mut ledger = ReaderLedger::default();
        std::thread::scope(|scope| {
            let (engine, clock, writing) = (&engine, &clock, &writing);
            scope.spawn(move || {
                let _stops_the_reader = StoreOnDrop(writing, false);
                for step in 1..=600u64 {
                    // A second a request: what is 21 s old may go at the next checkpoint.
                    let at_ms = T0_MS + step * SECOND_MS;
                    clock.set_ms(at_ms);
                    let request = UsageRequest::new("payg-ann", "chat", &one).at(at_ms);
                    assert!(engine.consume(&request).unwrap().is_admitted());
                    if step % 97 == 0 {
                        engine.compact(None).expect("compact");
                    }
                }
            });
            let mut round = 0usize;
            while writing.load(Ordering::Relaxed) {
                ledger.page(engine, "billing", 1 + round % 7);
                round += 1;
                if round % 50 == 0 {
                    // Fall behind now and then.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        });
        // The rest, then across a reopen from the saved cursor.
        engine.sync().unwrap();
        let last = last_seq(&engine);
        while ledger.page(&engine, "billing", 5) < last {}
        drop(engine);
        let engine = open(options.clone());
        let request = UsageRequest::new("payg-ann", "chat", &one).at(T0_MS + 601 * SECOND_MS);
        assert!(engine.consume(&request).unwrap().is_admitted());
        engine.sync().unwrap();
        let last = last_seq(&engine);
        while ledger.page(&engine, "billing", 3) < last {}
        assert!(matches!(
            engine.events_after(last + 1, 1),
            Err(Error::InvalidArgument { field: "after", .. })
        ));
        ledger.assert_accounts_for(last);
        assert!(
            engine.events_after(0, 1).unwrap()[0].seq > 1,
            "{durability:?}: compaction removed something"
        );
    }
}

/// Checkpoints with nothing logged since the one before, each after a page read: the segments
/// a checkpoint seals (some holding one event, some none) are read through one event a page,
/// and again from the start after a reopen, each event once.
#[test]
fn paging_one_event_at_a_time_across_idle_checkpoints_and_a_reopen_skips_and_repeats_nothing() {
    let dir = TempDir::new("paging-idle-checkpoints");
    let options = OpenOptions {
        segment_bytes: 256,
        ..sync_options()
    };
    let engine = open(dir.path(), ten_seconds(), options.clone());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ann", "payg-ann", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    let mut ledger = ReaderLedger::default();
    for step in 0..40u64 {
        if step % 3 != 2 {
            let request = UsageRequest::new("payg-ann", "chat", &one).at(T0_MS + step);
            assert!(engine.consume(&request).unwrap().is_admitted());
        }
        ledger.page(&engine, "billing", 1);
        engine.checkpoint().unwrap();
        if step % 5 == 0 {
            engine.checkpoint().unwrap();
        }
        ledger.page(&engine, "again", 2);
    }
    let last = last_seq(&engine);
    while ledger.page(&engine, "billing", 1) < last {}
    drop(engine);
    let engine = open(dir.path(), ten_seconds(), options);
    assert_eq!(last_seq(&engine), last);
    let mut again = ReaderLedger::default();
    while again.page(&engine, "after-reopen", 1) < last {}
    again.assert_accounts_for(last);
    assert!(again.lost.is_empty());
}

/// A limit of 0 reads nothing but still judges `after`: a cursor behind the retention hears of
/// the events lost, one past the end is refused, and one within the log gets an empty page;
/// a limit of `usize::MAX` reads every event after the cursor, across every segment, once.
#[test]
fn limits_of_zero_and_usize_max_judge_the_cursor_as_any_other_limit_does() {
    let dir = TempDir::new("reader-limits");
    let options = OpenOptions {
        segment_bytes: 256,
        ..small_retention()
    };
    let engine = open(dir.path(), ten_seconds(), options);
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ann", "payg-ann", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    for offset in 0..30 {
        let request = UsageRequest::new("payg-ann", "chat", &one).at(T0_MS + offset);
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    engine.checkpoint().unwrap();
    let later = T0_MS + 10 * MINUTE_MS;
    let request = UsageRequest::new("payg-ann", "chat", &one).at(later);
    assert!(engine.consume(&request).unwrap().is_admitted());
    let report = engine.compact(Some(later)).unwrap();
    let start = report.first_seq_kept;
    assert!(start > 2, "{report:?}");
    let last = last_seq(&engine);
    for limit in [0, usize::MAX] {
        assert!(
            matches!(
                engine.events_after(1, limit),
                Err(Error::InvalidArgument { field: "after", ref problem })
                    if problem.contains(&format!("events 2 to {} were compacted away", start - 1))
            ),
            "limit {limit}"
        );
        assert!(
            matches!(
                engine.events_after(last + 1, limit),
                Err(Error::InvalidArgument { field: "after", .. })
            ),
            "limit {limit}"
        );
    }
    assert_eq!(engine.events_after(start - 1, 0).unwrap(), vec![]);
    assert_eq!(engine.events_after(last, 0).unwrap(), vec![]);
    assert_eq!(engine.events_after(last, usize::MAX).unwrap(), vec![]);
    let all: Vec<u64> = engine
        .events_after(start - 1, usize::MAX)
        .unwrap()
        .iter()
        .map(|event| event.seq)
        .collect();
    assert_eq!(all, (start..=last).collect::<Vec<_>>());
}

#[test]
fn compaction_keeps_events_younger_than_the_longest_window_plus_the_retention() {
    let dir = TempDir::new("compact-young");
    let engine = open(dir.path(), ten_seconds(), small_retention());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ann", "ann", "Tiny", Some(T0_MS))
        .unwrap();
    engine.checkpoint().unwrap();
    let request = UsageRequest::new("key-ann", "chat", &[(Unit::Requests, 1)]).at(T0_MS);
    engine.consume(&request).unwrap();
    let events = last_seq(&engine);
    // Everything is younger than the window and a bucket (10 s + 40 ms): nothing may go.
    let report = engine.compact(Some(T0_MS + 5 * SECOND_MS)).unwrap();
    assert_eq!(report.events_removed, 0);
    assert_eq!(engine.events_after(0, 100).unwrap().len() as u64, events);
}

// ---------------------------------------------------------------------------------------------
// verify.

/// A database with some history, closed without a final checkpoint (so opening replays every
/// record), and where its log records are.
fn closed_database(label: &str) -> (TempDir, State, Vec<Frame>) {
    let dir = TempDir::new(label);
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    let before = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
    drop(engine);
    let frames = frames_of(dir.path());
    (dir, before, frames)
}

/// One log record on disk: its segment file, the frame's offset and payload length, and its
/// events.
#[derive(Debug, Clone)]
struct Frame {
    path: std::path::PathBuf,
    offset: usize,
    len: usize,
    first: u64,
    count: u64,
    /// The writer's durable point as the record was written (`None`: a format-2 record).
    durable_before: Option<u64>,
}

const SEGMENT_HEADER: usize = 32;

/// Every record of every segment, read with the documented framing (the last segment may end
/// in zeros written ahead of the records to come).
fn frames_of(dir: &std::path::Path) -> Vec<Frame> {
    let mut frames = Vec::new();
    for path in segment_paths(dir) {
        let bytes = std::fs::read(&path).unwrap();
        let mut at = SEGMENT_HEADER;
        while at < bytes.len() && bytes[at..].iter().any(|&byte| byte != 0) {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let view = RecordView::parse(&bytes[at + 8..at + 8 + len]).unwrap();
            frames.push(Frame {
                path: path.clone(),
                offset: at,
                len,
                first: view.first_seq,
                count: u64::from(view.count),
                durable_before: view.durable_before,
            });
            at += 8 + len;
        }
    }
    frames
}

/// Appends `payload` to `out` framed as the log frames a record (length, crc, payload).
fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_crc(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn frame_crc(payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&(payload.len() as u32).to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Flips a byte of `frame`'s record and checks that opening refuses the database as damage,
/// naming where and saying `proof` of why it is not a torn write, and cuts nothing off.
fn damage_and_expect_refusal(dir: &std::path::Path, frame: &Frame, proof: &str) {
    flip_a_byte(frame);
    let damaged = std::fs::read(&frame.path).unwrap();
    let error = Engine::open(dir, Policy::token_plan(), clock(), sync_options())
        .expect_err("damage, not a torn write");
    let problem = storage_problem(&error);
    assert_names_where(problem, frame);
    assert!(problem.contains(proof), "{problem}");
    assert_eq!(
        std::fs::read(&frame.path).unwrap(),
        damaged,
        "nothing cut off"
    );
}

/// Flips one byte of a record's payload: its crc no longer matches.
fn flip_a_byte(frame: &Frame) {
    let mut bytes = std::fs::read(&frame.path).unwrap();
    bytes[frame.offset + 8 + frame.len / 2] ^= 0x55;
    std::fs::write(&frame.path, bytes).unwrap();
}

/// Replaces the last record of its segment with `events` (re-framed, with a correct crc).
fn rewrite_last_record(frame: &Frame, events: &[(u64, Vec<u8>)]) {
    let len = std::fs::metadata(&frame.path).unwrap().len() as usize;
    assert_eq!(len, frame.offset + 8 + frame.len, "the last record");
    rewrite_record(frame, events);
}

/// Replaces a record, anywhere in its segment, with `events` (re-framed, with a correct crc;
/// the records after it move).
fn rewrite_record(frame: &Frame, events: &[(u64, Vec<u8>)]) {
    let bytes = std::fs::read(&frame.path).unwrap();
    let mut payload = Vec::new();
    encode_record_into(
        &mut payload,
        frame.first,
        frame
            .durable_before
            .map_or(frame.first, |mark| mark.min(frame.first)),
        events.iter().map(|(at, body)| (*at, body.as_slice())),
    );
    let mut out = bytes[..frame.offset].to_vec();
    push_frame(&mut out, &payload);
    out.extend_from_slice(&bytes[frame.offset + 8 + frame.len..]);
    std::fs::write(&frame.path, out).unwrap();
}

/// The events of a record, as `(at_ms, body)`.
fn record_events(frame: &Frame) -> Vec<(u64, Vec<u8>)> {
    let bytes = std::fs::read(&frame.path).unwrap();
    let view = RecordView::parse(&bytes[frame.offset + 8..frame.offset + 8 + frame.len]).unwrap();
    view.to_record()
        .unwrap()
        .events
        .into_iter()
        .map(|(_, at, body)| (at, body))
        .collect()
}

fn segment_name(frame: &Frame) -> String {
    frame
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn verify_reports_a_sound_database_as_sound_with_a_matching_snapshot() {
    let dir = TempDir::new("verify-sound");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    let events = last_seq(&engine);
    engine.checkpoint().unwrap();
    let request = UsageRequest::new("key-bob", "m2.7", &[(Unit::Requests, 1)]).at(POPULATED_MS);
    engine.consume(&request).unwrap();
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), sync_options()).expect("verify");
    assert!(report.is_sound(), "{:?}", report.problems);
    assert_eq!(report.first_seq, 1);
    assert_eq!(report.last_seq, events + 1);
    assert_eq!(report.events, events + 1);
    assert!(report.records >= 1 && report.records <= report.events);
    assert_eq!(report.snapshot_seq, Some(events + 1));
    assert_eq!(report.snapshot_matches_replay, Some(true));
    // verify closes what it opened: the database opens again at once.
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(last_seq(&engine), events + 1);
}

/// A closed reservation is remembered for the idempotency horizon (a week and an hour with
/// the default policy), then forgotten by the next reservation call, which logs nothing. The
/// live engine's snapshot no longer holds it; `verify` replays the log onto the snapshot
/// before, where nothing forgets it, and reports a mismatch on a sound database.
#[test]
fn verify_stays_sound_after_a_closed_reservation_ages_out() {
    let dir = TempDir::new("verify-aged-reservation");
    let clock = clock();
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ada", "ada", "Max", Some(T0_MS))
        .unwrap();
    let quantities = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ada", "m2.7", &quantities).at(T0_MS);
    let id = engine.reserve(&request, None).unwrap().reservation.unwrap();
    engine.settle(id, &[], Some(T0_MS)).unwrap();
    engine.checkpoint().unwrap();
    let later_ms = T0_MS + 8 * DAY_MS;
    clock.set_ms(later_ms);
    assert_eq!(engine.expire_reservations(Some(later_ms)), Ok(0));
    assert!(matches!(
        engine.void(id, Some(later_ms)),
        Err(Error::UnknownReservation { .. })
    ));
    engine.top_up("@ada", 1, Some(later_ms)).unwrap();
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
}

/// Closed reservations are bounded by `max_open_reservations`, the oldest forgotten first, and
/// which ones are kept does not depend on how the engine came back: replaying the log, or a
/// snapshot (which lists them by id) and the log after it, keeps the same ones as the engine
/// that never closed, also when several closed at the same time in another order than their
/// ids.
#[test]
fn the_closed_reservations_kept_are_the_same_after_a_reopen_with_or_without_a_checkpoint() {
    for checkpoint in [false, true] {
        let dir = TempDir::new("closed-reservation-bound");
        let options = OpenOptions {
            engine: tally_engine::EngineOptions {
                max_open_reservations: 2,
                ..tally_engine::EngineOptions::default()
            },
            ..sync_options()
        };
        let engine = open_token_plan(dir.path(), options.clone());
        engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
        engine
            .assign_seat("@ada", "ada", "Max", Some(T0_MS))
            .unwrap();
        let quantities = [(Unit::Requests, 1)];
        let request = UsageRequest::new("key-ada", "m2.7", &quantities).at(T0_MS);
        let reserve = || engine.reserve(&request, None).unwrap().reservation.unwrap();
        let (first, second) = (reserve(), reserve());
        // Closed at the same time, the later id first.
        engine.void(second, Some(T0_MS)).unwrap();
        engine.void(first, Some(T0_MS)).unwrap();
        if checkpoint {
            engine.checkpoint().unwrap();
        }
        let third = reserve();
        engine.void(third, Some(T0_MS)).unwrap();
        let answers =
            |engine: &Engine| [first, second, third].map(|id| engine.void(id, Some(T0_MS)));
        let live = answers(&engine);
        assert_eq!(
            live,
            [
                Err(Error::UnknownReservation {
                    reservation: first.get()
                }),
                Ok(()),
                Ok(())
            ],
            "the oldest by (closing time, id) is forgotten"
        );
        drop(engine);
        let reopened = open_token_plan(dir.path(), options.clone());
        assert_eq!(answers(&reopened), live, "checkpoint {checkpoint}");
        reopened.close().unwrap();
        let report = Engine::verify(dir.path(), options).unwrap();
        assert!(report.is_sound(), "{:?}", report.problems);
    }
}

/// Reclaiming idle windows is not an event, so a replay still holds windows the live engine had
/// freed. What they hold had aged out by the reclaim (the key's time floor in the snapshot):
/// `verify` must count them as of then, and find the snapshot equal to the replay.
#[test]
fn verify_stays_sound_after_idle_windows_are_reclaimed() {
    let dir = TempDir::new("verify-reclaimed");
    let clock = clock();
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    for (user, key) in [("ada", "key-ada"), ("bob", "key-bob")] {
        engine.create_user(user, key, Some(T0_MS)).unwrap();
        engine
            .assign_seat(&format!("@{user}"), user, "Max", Some(T0_MS))
            .unwrap();
    }
    let quantities = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ada", "m2.7", &quantities);
    assert!(engine.consume(&request.at(T0_MS)).unwrap().is_admitted());
    engine.checkpoint().unwrap();
    // A week and a day on, every window of ada's is empty (the weekly one too).
    let later_ms = T0_MS + 8 * DAY_MS;
    clock.set_ms(later_ms);
    assert_eq!(engine.reclaim_idle(Some(later_ms)), Ok(1));
    let bob = UsageRequest::new("key-bob", "m2.7", &quantities);
    assert!(engine.consume(&bob.at(later_ms)).unwrap().is_admitted());
    engine.checkpoint().unwrap();
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    assert_eq!(report.snapshot_matches_replay, Some(true));
}

/// The engine's own housekeeping on a durable engine: an ended lease expires (an event in the
/// log) and idle keys' windows are freed from the admission path; a checkpoint after it
/// verifies, and a reopen finds the reservation expired and what it held given back.
#[test]
fn a_denial_left_for_an_ended_lease_is_not_logged_and_the_retry_survives_a_reopen() {
    // A gateway holds ada's whole 5-hour quota (Starter: 1,500 requests) for a minute and
    // crashes. Her next request, under an id, would have been denied by the hold: the engine
    // expires the lease, decides again and logs only the expiry and the admission.
    let dir = TempDir::new("lease-retry");
    let clock = clock();
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ada", "ada", "Starter", Some(T0_MS))
        .unwrap();
    let estimate = [(Unit::Requests, 1500)];
    let held = UsageRequest::new("key-ada", "m2.7", &estimate).at(T0_MS);
    let outcome = engine.reserve(&held, Some(60_000)).unwrap();
    assert!(outcome.decision.is_admitted());
    let after_ms = T0_MS + 120_000;
    clock.set_ms(after_ms);
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ada", "m2.7", &one)
        .at(after_ms)
        .id("after-the-crash");
    let (decision, replayed) = engine.consume_noting_replay(&request).unwrap();
    assert!(decision.is_admitted() && !replayed, "{decision:?}");
    let kinds: Vec<&'static str> = engine
        .events_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter_map(|event| match event.body {
            EventBody::ReservationClosed { .. } => Some("closed"),
            EventBody::UsageAdmitted { .. } => Some("admitted"),
            EventBody::RequestDenied { .. } => Some("denied"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["closed", "admitted"]);
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    assert_eq!(engine.open_reservations(), 0);
    let (again, replayed) = engine.consume_noting_replay(&request).unwrap();
    assert_eq!((again, replayed), (decision, true));
    let used = engine.usage("key-ada", Some(after_ms)).unwrap().limits[0].used;
    assert_eq!(used, 1);
}

#[test]
fn housekeeping_on_its_own_is_logged_and_survives_a_reopen() {
    let dir = TempDir::new("housekeeping");
    let clock = clock();
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    let users = ["ada", "bob", "cy", "dee"];
    for user in users {
        engine
            .create_user(user, &format!("key-{user}"), Some(T0_MS))
            .unwrap();
        engine
            .assign_seat(&format!("@{user}"), user, "Max", Some(T0_MS))
            .unwrap();
    }
    let one = [(Unit::Requests, 1)];
    for user in &users[1..] {
        let key = format!("key-{user}");
        let request = UsageRequest::new(&key, "m2.7", &one).at(T0_MS);
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    let estimate = [(Unit::Requests, 100)];
    let held = UsageRequest::new("key-ada", "m2.7", &estimate).at(T0_MS);
    let outcome = engine.reserve(&held, Some(HOUR_MS)).unwrap();
    assert!(outcome.decision.is_admitted());
    // Two hours on, dee's batch expires ada's reservation before it starts: its lease ended an
    // hour ago, and what it held still counts, so the expiry gives it back.
    let dee = UsageRequest::new("key-dee", "m2.7", &one);
    clock.set_ms(T0_MS + 2 * HOUR_MS);
    let batch = vec![dee.at(T0_MS + 2 * HOUR_MS); 256];
    for result in engine.consume_many(&batch) {
        result.unwrap();
    }
    assert_eq!(engine.open_reservations(), 0, "the lease ended an hour ago");
    // A week and a day on, only dee keeps calling: a look every 256 requests, the clock
    // moving ten seconds between them, so the reclaim's steps (64 of them) come due.
    let mut now_ms = T0_MS + 8 * DAY_MS;
    for _ in 0..70 {
        now_ms += 10_000;
        clock.set_ms(now_ms);
        let batch = vec![dee.at(now_ms); 256];
        for result in engine.consume_many(&batch) {
            result.unwrap();
        }
    }
    let stats = engine.memory_stats();
    assert_eq!(
        stats.keys_with_usage, 1,
        "only dee's windows are live: {stats:?}"
    );
    let (reclaimed, rounds) = engine.automatic_reclaims();
    assert!(
        reclaimed >= 3 && rounds >= 1,
        "{reclaimed} keys in {rounds} rounds"
    );
    engine.checkpoint().unwrap();
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    assert_eq!(report.snapshot_matches_replay, Some(true));
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    assert_eq!(engine.open_reservations(), 0);
    // The expiry is an event of its own, giving back the 100 requests held on each window.
    let reservation = outcome.reservation.expect("a reservation").get();
    let expiries: Vec<Vec<u64>> = engine
        .events_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter_map(|event| match event.body {
            EventBody::ReservationClosed {
                reservation: closed,
                end: tally_engine::event::ReservationEnd::Expired,
                given_back,
                ..
            } if closed == reservation => Some(
                given_back
                    .counters
                    .iter()
                    .map(|&(_, _, units)| units)
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(expiries.len(), 1, "{expiries:?}");
    assert!(
        !expiries[0].is_empty() && expiries[0].iter().all(|units| *units == 100),
        "{expiries:?}"
    );
    engine.close().unwrap();
}

/// The same for request ids: an id older than the horizon is dropped from the live table
/// when a later request lands in its shard; replay onto the snapshot before keeps it.
#[test]
fn verify_stays_sound_after_a_request_id_ages_out() {
    let dir = TempDir::new("verify-aged-id");
    let clock = log_support::clock();
    let engine = ada_on_max(dir.path(), &clock);
    let quantities = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ada", "m2.7", &quantities);
    engine.consume(&request.at(T0_MS).id("old")).unwrap();
    engine.checkpoint().unwrap();
    // Enough new ids to land in every one of the 64 idempotency shards.
    let later_ms = T0_MS + 8 * DAY_MS;
    clock.set_ms(later_ms);
    let ids: Vec<String> = (0..400).map(|index| format!("new-{index}")).collect();
    let batch: Vec<_> = ids.iter().map(|id| request.at(later_ms).id(id)).collect();
    assert!(engine.consume_many(&batch).iter().all(Result::is_ok));
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
}

#[track_caller]
fn assert_names_where(problem: &str, frame: &Frame) {
    assert!(problem.contains(&segment_name(frame)), "{problem}");
    assert!(
        problem.contains(&format!("offset {}", frame.offset)),
        "{problem}"
    );
}

#[test]
fn a_damaged_record_in_the_middle_is_an_error_naming_its_segment_offset_and_event() {
    let (dir, _, frames) = closed_database("verify-garbage");
    assert!(frames.len() > 4, "{frames:?}");
    let frame = frames[frames.len() / 2].clone();
    flip_a_byte(&frame);
    let report = Engine::verify(dir.path(), sync_options()).expect("verify runs");
    assert!(!report.is_sound());
    let problem = report
        .problems
        .iter()
        .find(|problem| problem.contains("crc mismatch"))
        .unwrap_or_else(|| panic!("{:?}", report.problems));
    assert_names_where(problem, &frame);
    assert!(
        problem.contains(&format!("event {}", frame.first)),
        "{problem}"
    );
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("a damaged record");
    let problem = storage_problem(&error);
    assert_names_where(problem, &frame);
    assert!(problem.contains("crc mismatch"), "{problem}");
    // Refusing changed nothing: the damaged bytes and everything after them are still there.
    assert_eq!(
        std::fs::metadata(&frame.path).unwrap().len() as usize,
        frames
            .last()
            .map(|last| last.offset + 8 + last.len)
            .unwrap()
    );
}

#[test]
fn a_record_whose_length_is_impossible_before_the_tail_is_damage_not_a_torn_tail() {
    let (dir, _, frames) = closed_database("bad-length");
    let frame = frames[1].clone();
    let mut bytes = std::fs::read(&frame.path).unwrap();
    bytes[frame.offset..frame.offset + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&frame.path, bytes).unwrap();
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("damage");
    let problem = storage_problem(&error);
    assert_names_where(problem, &frame);
    assert!(problem.contains("impossible"), "{problem}");
}

#[test]
fn a_segment_of_a_newer_format_version_is_refused_by_name() {
    let (dir, _, frames) = closed_database("segment-version");
    let path = &frames[0].path;
    let mut bytes = std::fs::read(path).unwrap();
    bytes[8..10].copy_from_slice(&99u16.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..20]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("a newer segment");
    let problem = storage_problem(&error);
    assert!(problem.contains("format version 99"), "{problem}");
    assert!(problem.contains(&segment_name(&frames[0])), "{problem}");
    assert!(problem.contains("upgrade"), "{problem}");
    let error = Engine::verify(dir.path(), sync_options()).expect_err("a newer segment");
    assert!(
        storage_problem(&error).contains("format version 99"),
        "{error}"
    );
}

/// A sound record (its crc matches) numbering its events past 2^64, or from 0: damage named
/// by segment and offset. Before, working out its last event's number overflowed, a panic in
/// `open` and `verify` (debug builds) and a garbled message (release).
#[test]
fn a_record_numbering_its_events_past_the_last_sequence_number_is_damage_not_a_panic() {
    for (label, first) in [
        ("seq-max", u64::MAX),
        ("seq-near-max", u64::MAX - 1),
        ("seq-0", 0),
    ] {
        let (dir, _, frames) = closed_database(label);
        let last = frames.last().unwrap().clone();
        let events = record_events(&last);
        rewrite_last_record(
            &Frame {
                first,
                ..last.clone()
            },
            &events,
        );
        let path = dir.path().to_path_buf();
        let verified = std::panic::catch_unwind(move || Engine::verify(&path, sync_options()))
            .unwrap_or_else(|_| panic!("{label}: verify panicked"));
        match verified {
            Ok(report) => assert!(!report.is_sound(), "{label}: {report:?}"),
            Err(error) => assert_names_where(storage_problem(&error), &last),
        }
        let path = dir.path().to_path_buf();
        let opened = std::panic::catch_unwind(move || {
            Engine::open(&path, Policy::token_plan(), clock(), sync_options()).map(drop)
        })
        .unwrap_or_else(|_| panic!("{label}: open panicked"));
        let error = opened.expect_err("a damaged record");
        let problem = storage_problem(&error);
        assert_names_where(problem, &last);
        assert!(problem.contains("damaged"), "{label}: {problem}");
    }
}

/// Damage in the last segment that `open` refuses is reported by `verify`, as the same damage
/// in an earlier segment is: a record numbering its events past a gap, and a damaged segment
/// header. Before, `verify` itself failed there ("cannot be opened", `tally verify` exit 2)
/// with no report, while it reported both in any sealed segment.
#[test]
fn verify_reports_a_gap_or_a_damaged_header_in_the_last_segment_instead_of_failing() {
    let (dir, _, frames) = closed_database("verify-last-gap");
    let last = frames.last().unwrap().clone();
    let events = record_events(&last);
    rewrite_last_record(
        &Frame {
            first: last.first + 1,
            ..last.clone()
        },
        &events,
    );
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports, not fails");
    assert!(!report.is_sound());
    assert!(
        report.problems.iter().any(|problem| {
            problem.contains(&segment_name(&last))
                && problem.contains(&format!("offset {}", last.offset))
        }),
        "{:?}",
        report.problems
    );
    assert_eq!(report.last_seq, last.first - 1, "read up to the damage");

    let (dir, _, frames) = closed_database("verify-last-header");
    let last = frames.last().unwrap().clone();
    let mut bytes = std::fs::read(&last.path).unwrap();
    bytes[14] ^= 1;
    std::fs::write(&last.path, &bytes).unwrap();
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports, not fails");
    assert!(!report.is_sound());
    assert!(
        report.problems.iter().any(|problem| {
            problem.contains(&segment_name(&last)) && problem.contains("header is damaged")
        }),
        "{:?}",
        report.problems
    );
    assert_eq!(std::fs::read(&last.path).unwrap(), bytes, "nothing changed");
}

/// Events missing at the log's end, which a clean close or the snapshot found durable, are a
/// problem `verify` reports (as `open` refuses the database for them), not a failure of
/// `verify` itself ("cannot be opened", `tally verify` exit 2, no report).
#[test]
fn verify_reports_events_missing_at_the_end_of_the_log_as_open_refuses_them() {
    let (dir, _, frames) = closed_database("verify-end-missing");
    let last = frames.last().unwrap().clone();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&last.path)
        .unwrap();
    file.set_len(last.offset as u64).unwrap();
    drop(file);
    let error = open_result(dir.path(), sync_options()).expect_err("events are missing");
    assert!(
        storage_problem(&error).contains("events are missing"),
        "{error}"
    );
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports, not fails");
    assert!(!report.is_sound());
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains("events are missing")),
        "{:?}",
        report.problems
    );
    assert_eq!(report.last_seq, last.first - 1);

    // A snapshot past the log's end, and a snapshot with no log at all.
    let dir = TempDir::new("verify-snapshot-past-end");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.close().unwrap();
    for segment in segment_paths(dir.path()) {
        std::fs::remove_file(segment).unwrap();
    }
    assert!(open_result(dir.path(), sync_options()).is_err());
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports, not fails");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains("no log segments")),
        "{:?}",
        report.problems
    );
}

/// A database opened before (its options recorded in sled) whose segments and snapshots are
/// all gone after a crash (no clean close to say how far the log went) is refused, not opened
/// as a new, empty database: every acknowledged event would be lost without a word. `verify`
/// reports it too. Before, both treated it as a database never written.
#[test]
fn a_database_whose_log_and_snapshots_are_all_gone_is_refused_not_opened_empty() {
    let (dir, _, _) = closed_database("log-all-gone");
    as_if_it_crashed(dir.path());
    for sub in ["events", "snapshots"] {
        for entry in std::fs::read_dir(dir.path().join(sub)).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
    }
    let error = open_result(dir.path(), sync_options()).expect_err("its events are gone");
    assert!(
        storage_problem(&error).contains("no log segments and no snapshot"),
        "{error}"
    );
    assert!(
        segment_paths(dir.path()).is_empty(),
        "the refused open started no new log"
    );
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports, not fails");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains("no log segments and no snapshot")),
        "{:?}",
        report.problems
    );
}

/// The log's last segment removed after a crash (no clean close to say how far the log went),
/// with acknowledged events in it and a sound segment before it, is refused by an open and
/// reported by `verify`, naming the segment: the log had reached it. Before, the open went on
/// from the segment before it, every event of the removed one lost without a word.
#[test]
fn a_last_segment_removed_after_a_crash_is_refused_naming_it() {
    let dir = TempDir::new("last-segment-gone");
    let crashed = dir.sibling("crashed");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.checkpoint().unwrap();
    for micros in [1, 2, 4] {
        engine.top_up("acme", micros, Some(POPULATED_MS)).unwrap();
    }
    // Every top-up acknowledged (Sync): a copy now is what a crash leaves.
    copy_dir(dir.path(), crashed.path());
    drop(engine);
    let last = segment_paths(crashed.path()).pop().unwrap();
    let name = last.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        !frames_of(crashed.path())
            .iter()
            .filter(|frame| frame.path == last)
            .collect::<Vec<_>>()
            .is_empty(),
        "the top-ups are in the last segment"
    );
    refused_without(crashed.path(), &last);
    let report = Engine::verify(crashed.path(), sync_options()).expect("verify reports");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains(&name) && problem.contains("missing")),
        "{:?}",
        report.problems
    );
}

/// Removes `segment` (the last one, with acknowledged events in it) from the database at
/// `dir`, then asserts that an open is refused with an error naming it as missing.
fn refused_without(dir: &std::path::Path, segment: &std::path::Path) {
    let name = segment.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::remove_file(segment).unwrap();
    let error = open_result(dir, sync_options()).expect_err("its events are gone");
    let problem = storage_problem(&error);
    assert!(
        problem.contains(&name) && problem.contains("missing"),
        "{problem}"
    );
}

/// A crash between creating a segment and recording it leaves the record one segment behind;
/// the open that goes on writing into that segment records it, so a second crash that then
/// loses it (with acknowledged events in it) is refused like any removed last segment. Before,
/// the record stayed behind until the next rotation, and such a loss opened without a word.
#[test]
fn a_segment_an_open_goes_on_in_is_recorded_before_its_events_are_written() {
    let dir = TempDir::new("record-behind");
    let crashed = dir.sibling("crashed");
    let again = dir.sibling("crashed-again");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.checkpoint().unwrap();
    // The checkpoint asks the writer for the new segment, made a moment later: copied before
    // its header was written, the crash would be another one than this test's.
    let asked = std::time::Instant::now();
    let started = || {
        let segments = segment_paths(dir.path());
        segments.len() >= 2
            && std::fs::metadata(segments.last().unwrap())
                .is_ok_and(|file| file.len() >= SEGMENT_HEADER as u64)
    };
    while !started() && asked.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    copy_dir(dir.path(), crashed.path());
    drop(engine);
    let segments = segment_paths(crashed.path());
    assert!(segments.len() >= 2, "the checkpoint started a segment");
    // The crash came after the newest segment's header was durable, before its record.
    record_last_segment(crashed.path(), &segments[segments.len() - 2]);
    let engine = open_token_plan(crashed.path(), sync_options());
    for micros in [1, 2, 4] {
        engine.top_up("acme", micros, Some(POPULATED_MS)).unwrap();
    }
    // Every top-up acknowledged (Sync), in the newest segment: a copy now is a second crash.
    copy_dir(crashed.path(), again.path());
    drop(engine);
    let last = segment_paths(again.path()).pop().unwrap();
    assert_eq!(last.file_name(), segments.last().unwrap().file_name());
    refused_without(again.path(), &last);
}

/// A damaged value in sled's `meta` where the log keeps a sequence number (`last_segment`,
/// `durable_through`: 8 bytes each) is refused at open, naming the key, as `verify` reports it.
/// Before, a value of another length read as 0, which silently turned off the check it feeds
/// (a removed last segment, a torn tail told from damage).
#[test]
fn a_damaged_sequence_number_in_the_metadata_is_refused_naming_it() {
    for key in ["last_segment", "durable_through"] {
        let dir = TempDir::new("meta-damaged");
        let engine = open_token_plan(dir.path(), sync_options());
        populate(&engine);
        engine.close().unwrap();
        {
            let db = open_sled_retrying(dir.path());
            let meta = db.open_tree("meta").unwrap();
            assert!(meta.get(key).unwrap().is_some(), "{key} is recorded");
            meta.insert(key, &[7u8, 0, 0][..]).unwrap();
            db.flush().unwrap();
        }
        let error = open_result(dir.path(), sync_options()).expect_err("a damaged value");
        let problem = storage_problem(&error);
        assert!(
            problem.contains(key) && problem.contains("3 bytes"),
            "{key}: {problem}"
        );
        let report = Engine::verify(dir.path(), sync_options()).expect("verify reports");
        assert!(
            report.problems.iter().any(|problem| problem.contains(key)),
            "{key}: {:?}",
            report.problems
        );
    }
}

/// `verify` changes nothing of tally's in the database it checks: a crash's leftover temporary
/// snapshot stays (evidence), a missing `events/` directory is reported, not created, and a
/// database without a format version gets none recorded. (sled may still write its own files
/// when it opens.)
#[test]
fn verify_leaves_the_database_as_it_found_it() {
    let dir = TempDir::new("verify-read-only");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.checkpoint().unwrap();
    engine.close().unwrap();
    let leftover = dir
        .path()
        .join("snapshots")
        .join(format!("{:020}.snap.tmp", 99));
    std::fs::write(&leftover, b"half a snapshot").unwrap();
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(leftover.exists(), "verify removed the leftover snapshot");

    std::fs::remove_dir_all(dir.path().join("events")).unwrap();
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains("no log segments in events/")),
        "{:?}",
        report.problems
    );
    assert!(
        !dir.path().join("events").exists(),
        "verify created the events directory"
    );

    // A database whose only trace is sled's files (no format version recorded yet).
    let bare = dir.sibling("bare");
    std::fs::create_dir_all(bare.path()).unwrap();
    drop(open_sled_retrying(bare.path()));
    let _ = Engine::verify(bare.path(), sync_options());
    let db = open_sled_retrying(bare.path());
    let meta = db.open_tree("meta").unwrap();
    assert!(
        meta.get("format_version").unwrap().is_none(),
        "verify recorded a format"
    );
    assert!(!bare.path().join("events").exists());
    assert!(!bare.path().join("snapshots").exists());
}

/// A log that starts after the event following the latest snapshot (every segment between
/// removed, the newest, empty one left) is refused by an open naming the events missing, as
/// `verify` reports it. Before, the open replayed nothing and came up at the snapshot: every
/// event after it lost without a word (found by the `log_damage` fuzz target).
#[test]
fn a_log_starting_past_the_latest_snapshot_is_refused_naming_the_events_missing() {
    let dir = TempDir::new("log-starts-past-snapshot");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    let snapshot = engine.checkpoint().unwrap();
    for micros in [1, 2, 4] {
        engine.top_up("acme", micros, Some(POPULATED_MS)).unwrap();
    }
    engine.close().unwrap();
    // The close's snapshot and every segment but the newest (empty, after it) removed.
    let latest = latest_snapshot(dir.path());
    std::fs::remove_file(&latest).unwrap();
    let mut segments = segment_paths(dir.path());
    let newest = segments.pop().unwrap();
    assert_eq!(
        std::fs::metadata(&newest).unwrap().len(),
        SEGMENT_HEADER as u64
    );
    for segment in segments {
        std::fs::remove_file(segment).unwrap();
    }
    let error = open_result(dir.path(), sync_options()).expect_err("events are missing");
    let problem = storage_problem(&error);
    assert!(
        problem.contains(&format!("events {} to", snapshot + 1)) && problem.contains("missing"),
        "{problem} (snapshot {snapshot})"
    );
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports");
    assert!(!report.is_sound());
}

/// A snapshot file whose body covers another event than its name and header say (an older
/// snapshot under a newer one's name, its header's seq, outside the checksum, made to match)
/// is refused naming both, not restored and replayed from the name's event on: the events
/// between the two were skipped without a word.
#[test]
fn a_snapshot_whose_body_covers_another_event_than_its_name_is_refused() {
    let dir = TempDir::new("snapshot-renamed");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    let older = engine.checkpoint().unwrap();
    for micros in [1, 2, 4] {
        engine.top_up("acme", micros, Some(POPULATED_MS)).unwrap();
    }
    engine.close().unwrap();
    let latest = latest_snapshot(dir.path());
    let newer: u64 = latest
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    assert!(newer > older);
    let older_path = latest.with_file_name(format!("{older:020}.snap"));
    let mut bytes = std::fs::read(&older_path).unwrap();
    bytes[12..20].copy_from_slice(&newer.to_le_bytes());
    std::fs::write(&latest, &bytes).unwrap();
    std::fs::remove_file(&older_path).unwrap();
    let error = open_result(dir.path(), sync_options()).expect_err("not the snapshot it says");
    let problem = storage_problem(&error);
    assert!(
        problem.contains(&format!("event {older}")) && problem.contains(&format!("{newer}")),
        "{problem}"
    );
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains(&format!("the snapshot of event {older}"))),
        "{:?}",
        report.problems
    );
}

/// A crash after a checkpoint's new segment was created (and recorded) but before its
/// snapshot was stored, with events already in that segment: the open goes on from the
/// snapshot before (or the log's start) and keeps every event, the new segment's too.
#[test]
fn a_crash_between_a_checkpoints_rotation_and_its_snapshot_loses_nothing() {
    for earlier_checkpoint in [false, true] {
        let dir = TempDir::new("crash-mid-checkpoint");
        let crashed = dir.sibling("crashed");
        let engine = open_token_plan(dir.path(), sync_options());
        populate(&engine);
        if earlier_checkpoint {
            engine.checkpoint().unwrap();
            engine.top_up("acme", 8, Some(POPULATED_MS)).unwrap();
        }
        let checkpoint = engine.checkpoint().unwrap();
        for micros in [1, 2, 4] {
            engine.top_up("acme", micros, Some(POPULATED_MS)).unwrap();
        }
        let before = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
        copy_dir(dir.path(), crashed.path());
        drop(engine);
        // Its snapshot never stored: the crash came first.
        std::fs::remove_file(
            crashed
                .path()
                .join("snapshots")
                .join(format!("{checkpoint:020}.snap")),
        )
        .unwrap();
        let engine = open_token_plan(crashed.path(), sync_options());
        let after = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
        assert_same_state(&after, &before, "reopened after the crash");
    }
}

/// The first segment of a log, recorded as created like every later one: after a crash, its
/// header found damaged (the file cut to a few bytes) is refused, not removed as the leftover
/// of a crash mid-create and the database started again empty.
#[test]
fn a_damaged_first_segment_is_refused_not_replaced_by_an_empty_log() {
    let dir = TempDir::new("first-segment-damaged");
    let crashed = dir.sibling("crashed");
    let engine = open_token_plan(dir.path(), sync_options());
    engine.create_team("acme", Some(T0_MS)).unwrap();
    engine.top_up("acme", 5, Some(T0_MS)).unwrap();
    copy_dir(dir.path(), crashed.path());
    drop(engine);
    let segments = segment_paths(crashed.path());
    assert_eq!(segments.len(), 1, "one segment, no snapshot: {segments:?}");
    let bytes = std::fs::read(&segments[0]).unwrap();
    std::fs::write(&segments[0], &bytes[..10]).unwrap();
    let error = open_result(crashed.path(), sync_options()).expect_err("damage");
    assert!(storage_problem(&error).contains("bad header"), "{error}");
    assert_eq!(
        std::fs::read(&segments[0]).unwrap(),
        &bytes[..10],
        "left as it was"
    );
}

/// Events missing at the log's start (its first file removed) are a problem `verify` reports,
/// as `open` refuses the database for them: with no snapshot, and with one whose next event
/// is gone. Before, `verify` called both databases sound.
#[test]
fn verify_reports_events_missing_before_the_log_starts_as_open_refuses_them() {
    let options = OpenOptions {
        segment_bytes: 256,
        ..sync_options()
    };
    let no_snapshot = TempDir::new("verify-start-none");
    let engine = open_token_plan(no_snapshot.path(), options.clone());
    populate(&engine);
    drop(engine);
    let after_snapshot = TempDir::new("verify-start-after");
    let engine = open_token_plan(after_snapshot.path(), options.clone());
    create_accounts(&engine);
    let snapshot = engine.checkpoint().expect("checkpoint");
    let one = [(Unit::Requests, 1)];
    for offset in 0..20 {
        let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS + offset);
        engine.consume(&request).expect("consume");
    }
    drop(engine);
    // The files up to event 1's, and up to the one the checkpoint started at the event after
    // its snapshot: the log then starts later.
    for (dir, first, missing) in [
        (&no_snapshot, 1, "events 1 to".to_string()),
        (
            &after_snapshot,
            snapshot + 1,
            format!("events {} to", snapshot + 1),
        ),
    ] {
        let segments = segment_paths(dir.path());
        let first_of = |path: &std::path::PathBuf| {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            stem.parse::<u64>().unwrap()
        };
        assert!(
            segments.iter().any(|path| first_of(path) == first),
            "{segments:?}"
        );
        let removed: Vec<_> = segments
            .iter()
            .filter(|path| first_of(path) <= first)
            .collect();
        assert!(segments.len() > removed.len(), "a later file: {segments:?}");
        for path in removed {
            std::fs::remove_file(path).unwrap();
        }
        assert!(
            Engine::open(dir.path(), Policy::token_plan(), clock(), options.clone()).is_err(),
            "open refuses {missing}"
        );
        let report = Engine::verify(dir.path(), options.clone()).expect("verify runs");
        assert!(!report.is_sound(), "{missing}: {report:?}");
        assert!(
            report
                .problems
                .iter()
                .any(|problem| problem.contains(&missing) && problem.contains("missing")),
            "{missing}: {report:?}"
        );
    }
}

fn damage_last_event_body(label: &str) -> (TempDir, Frame) {
    let (dir, _, frames) = closed_database(label);
    let frame = frames.last().unwrap().clone();
    let mut events = record_events(&frame);
    events[0].1 = vec![0xfa; 3];
    rewrite_last_record(&frame, &events);
    (dir, frame)
}

#[test]
fn opening_names_the_event_whose_body_is_damaged() {
    let (dir, frame) = damage_last_event_body("open-body");
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("a damaged event");
    let problem = storage_problem(&error);
    assert_names_where(problem, &frame);
    assert!(
        problem.contains(&format!("event {} is damaged", frame.first)),
        "{problem}"
    );
}

/// A record whose crc is sound but whose usage event holds units on a counter its policy
/// generation does not have (a record written wrong): opening refuses it, naming the event,
/// where the replay indexed past the policy's counters and panicked.
#[test]
fn opening_refuses_a_usage_event_on_a_counter_its_policy_lacks() {
    let (dir, seq) = database_with_event_rewritten("open-bad-counter", false, hold_on_counter_200);
    assert_replay_refuses(&dir, seq, "usage_admitted", "counter 200");
}

/// A reservation opened on a key that does not exist yet, or under an id that is open, is a
/// record written wrong (a live reserve needs its key and takes a new id): refused, naming the
/// event, where the replay let both in (the first underflowed the key's open count when it
/// closed, the second left a stale lease behind).
#[test]
fn opening_refuses_a_reservation_on_no_key_or_under_an_open_id() {
    let (dir, seq) = database_with_event_rewritten("open-reservation-no-key", false, |body| {
        let EventBody::ReservationOpened { key, .. } = body else {
            return false;
        };
        *key = "no-such-key".into();
        true
    });
    assert_replay_refuses(&dir, seq, "reservation_opened", "does not exist");
    let mut first = None;
    let (dir, seq) = database_with_event_rewritten("open-reservation-twice", false, |body| {
        let EventBody::ReservationOpened { reservation, .. } = body else {
            return false;
        };
        match first {
            None => {
                first = Some(*reservation);
                false
            }
            Some(first) => {
                *reservation = first;
                true
            }
        }
    });
    assert_replay_refuses(
        &dir,
        seq,
        "reservation_opened",
        "opened again while it is open",
    );
}

/// `verify` replays the events after the latest snapshot even when something else is wrong
/// (here the snapshot does not match a replay: a top-up before it was rewritten): a tail that
/// an open refuses is reported beside that, not hidden behind it.
#[test]
fn verify_reports_a_tail_an_open_refuses_beside_a_snapshot_mismatch() {
    let dir = TempDir::new("verify-tail-and-mismatch");
    let engine = open(dir.path(), Policy::token_plan(), sync_options());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 1_000, Some(T0_MS)).unwrap();
    let checkpointed = engine.checkpoint().expect("checkpoint");
    // The tail: a seated user's admission, its receipt then rewritten to a counter its plan
    // does not have.
    engine
        .assign_seat("@ada", "ada", "Max", Some(T0_MS))
        .unwrap();
    let quantities = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-ada", "m2.7", &quantities).at(T0_MS + 10);
    assert!(engine.consume(&request).unwrap().is_admitted());
    drop(engine);
    let topped_up = rewrite_event(dir.path(), false, |body| match body {
        EventBody::CreditsToppedUp { micros, .. } => {
            *micros = 999;
            true
        }
        _ => false,
    });
    assert!(topped_up <= checkpointed, "before the snapshot");
    let seq = rewrite_event(dir.path(), false, hold_on_counter_200);
    assert!(seq > checkpointed, "in the tail");

    // The snapshot (1,000 micros) does not match a replay (999), and the tail's event is
    // refused: both are reported.
    let report = Engine::verify(dir.path(), sync_options()).expect("verify runs");
    assert_eq!(report.snapshot_matches_replay, Some(false), "{report:?}");
    assert!(
        report.problems.iter().any(|problem| {
            problem.contains("do not replay as an open replays them")
                && problem.contains(&format!("event {seq}"))
                && problem.contains("counter 200")
        }),
        "{report:?}"
    );
}

/// `closed_database` with one event rewritten in place (its record's crc sound): of the events
/// `change` rewrites (returns true for), the first, or the last if `last`. Returns the
/// directory and the event's sequence number.
fn database_with_event_rewritten(
    label: &str,
    last: bool,
    change: impl FnMut(&mut EventBody) -> bool,
) -> (TempDir, u64) {
    let (dir, _, _) = closed_database(label);
    let seq = rewrite_event(dir.path(), last, change);
    (dir, seq)
}

/// Rewrites one event of the database in `dir` in place (its record's crc sound): of the
/// events `change` rewrites (returns true for), the first, or the last if `last`. Returns its
/// sequence number.
fn rewrite_event(
    dir: &std::path::Path,
    last: bool,
    mut change: impl FnMut(&mut EventBody) -> bool,
) -> u64 {
    let frames = frames_of(dir);
    let mut found = None;
    for frame in &frames {
        for (index, (_, bytes)) in record_events(frame).into_iter().enumerate() {
            let seq = frame.first + index as u64;
            let Ok(mut body) = decode_body(seq, &bytes) else {
                continue;
            };
            if change(&mut body) {
                found = Some((frame.clone(), index, body));
                if !last {
                    break;
                }
            }
        }
        if found.is_some() && !last {
            break;
        }
    }
    let (frame, index, body) = found.expect("an event to rewrite");
    let mut events = record_events(&frame);
    events[index].1 = encode_body(&body);
    rewrite_record(&frame, &events);
    frame.first + index as u64
}

/// A `change` for `rewrite_event`: a usage event's first hold moved to counter 200, which no
/// plan of the token plan has.
fn hold_on_counter_200(body: &mut EventBody) -> bool {
    let EventBody::UsageAdmitted { receipt, .. } = body else {
        return false;
    };
    let mut holds = receipt.holds.as_slice().to_vec();
    let Some(first) = holds.first_mut() else {
        return false;
    };
    first.0 = tally_engine::policy::CounterId(200);
    receipt.holds = tally_engine::admission::Holds::from_slice(&holds).unwrap();
    true
}

/// Opening `dir` is refused naming event `seq` of `kind` and `what`, and `verify` reports it.
fn assert_replay_refuses(dir: &TempDir, seq: u64, kind: &str, what: &str) {
    let opened = std::panic::catch_unwind(|| {
        Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
            .map(|engine| {
                // What the open let in is stored by the next checkpoint; the open after it
                // must still read it.
                engine.close().expect("close");
                Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
                    .map(drop)
                    .map_err(|error| format!("{error}"))
            })
            .map_err(|error| storage_problem(&error).to_string())
    });
    let problem = match opened {
        Ok(Err(problem)) => problem,
        Ok(Ok(reopened)) => panic!("the open let event {seq} in; then the reopen: {reopened:?}"),
        Err(_) => panic!("the open panicked on event {seq}"),
    };
    assert!(
        problem.contains(&format!("replaying event {seq} ({kind})")) && problem.contains(what),
        "{problem}"
    );
    let report = Engine::verify(dir.path(), sync_options()).expect("verify runs");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains(&format!("event {seq}")) && problem.contains(what)),
        "{report:?}"
    );
}

/// A receipt the replay keeps (a request id's, an open reservation's) naming a policy
/// generation after the current one, or a counter its generation lacks on a key that does not
/// exist (so nothing is moved): only a record written wrong has one. The replay let it in
/// without a look, the next checkpoint stored it and the open after that refused the snapshot
/// (`restore` checks every kept receipt); a refund of such a request id indexed past the
/// policy's counters. The replay refuses it, naming the event.
#[test]
fn opening_refuses_a_kept_receipt_its_policies_cannot_read() {
    use tally_engine::admission::Holds;
    use tally_engine::policy::CounterId;
    let on_plan = |receipt: &tally_engine::admission::Receipt| {
        matches!(
            receipt.charged_to,
            tally_engine::ChargedTo::PlanQuota { .. }
        )
    };
    // A request id's receipt of generation 7 (the log has generation 0 only).
    let (dir, seq) = database_with_event_rewritten("kept-receipt-id", false, |body| match body {
        EventBody::UsageAdmitted {
            request_id: Some(_),
            decision: Some(_),
            receipt,
            ..
        } if on_plan(receipt) => {
            receipt.generation = 7;
            true
        }
        _ => false,
    });
    assert_replay_refuses(&dir, seq, "usage_admitted", "generation 7");
    // An open reservation's, likewise.
    let (dir, seq) = database_with_event_rewritten("kept-receipt-rsv", false, |body| match body {
        EventBody::ReservationOpened { receipt, .. } if on_plan(receipt) => {
            receipt.generation = 7;
            true
        }
        _ => false,
    });
    assert_replay_refuses(&dir, seq, "reservation_opened", "generation 7");
    // A request id's receipt on counter 200, of a key that does not exist.
    let (dir, seq) = database_with_event_rewritten("kept-receipt-key", false, |body| match body {
        EventBody::UsageAdmitted {
            key,
            request_id: Some(_),
            decision: Some(_),
            receipt,
            ..
        } if on_plan(receipt) => {
            *key = "no-such-key".into();
            receipt.holds = Holds::from_slice(&[(CounterId(200), 1, 0)]).unwrap();
            true
        }
        _ => false,
    });
    assert_replay_refuses(&dir, seq, "usage_admitted", "counter 200");
}

/// A reservation opened under the largest id there is: only a record written wrong has one
/// (ids count up from 1). Replayed, it set the next id to hand out past the largest, and the
/// next reservation overflowed (a panic in a debug build; in a release build the id wrapped to
/// 1, taking the id of a reservation that may still be open). The replay refuses it, naming
/// the event.
#[test]
fn opening_refuses_a_reservation_id_no_later_one_can_follow() {
    let (dir, seq) = database_with_event_rewritten("reservation-max-id", true, |body| match body {
        EventBody::ReservationOpened { reservation, .. } => {
            *reservation = u64::MAX;
            true
        }
        _ => false,
    });
    let opened = std::panic::catch_unwind(|| {
        Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options()).map(|engine| {
            let request =
                UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 1)]).at(POPULATED_MS);
            let outcome = engine.reserve(&request, Some(HOUR_MS));
            format!("{outcome:?}")
        })
    });
    let problem = match opened {
        Ok(Err(error)) => storage_problem(&error).to_string(),
        Ok(Ok(outcome)) => panic!("the open let event {seq} in; then a reserve: {outcome}"),
        Err(_) => panic!("the open, or the reserve after it, panicked on event {seq}"),
    };
    assert!(
        problem.contains(&format!("replaying event {seq} (reservation_opened)"))
            && problem.contains(&u64::MAX.to_string()),
        "{problem}"
    );
    let report = Engine::verify(dir.path(), sync_options()).expect("verify runs");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains(&format!("event {seq}"))),
        "{report:?}"
    );
}

/// A usage event holding units in a calendar period a counter cannot tell apart (its 16
/// bits) or in a rolling bucket past the range of timestamps: only a record written wrong has
/// one (timestamps end in 2100). Replayed, the period tripped a debug assertion packing the
/// counter's word (window.rs:1070; in a release build its high bits were lost) and the bucket
/// moved the ring's head so far that the key's next admission overflowed computing its
/// bucket's start (admission.rs:794). The replay refuses it, naming the event.
#[test]
fn opening_refuses_a_hold_past_the_range_of_timestamps() {
    let policy = Policy::token_plan();
    for (label, rolling, time, what) in [
        ("hold-period-16", false, 1u64 << 16, "period 65536"),
        (
            "hold-period-max",
            false,
            u64::from(u32::MAX),
            "period 4294967295",
        ),
        (
            "hold-bucket-far",
            true,
            1u64 << 50,
            "bucket 1125899906842624",
        ),
        (
            "hold-bucket-max",
            true,
            u64::MAX,
            "bucket 18446744073709551615",
        ),
    ] {
        let (dir, seq) = database_with_event_rewritten(label, true, |body| match body {
            EventBody::UsageAdmitted { receipt, .. } => {
                let mut holds = receipt.holds.as_slice().to_vec();
                let Some(hold) = holds.iter_mut().find(|hold| {
                    let window = policy.counters()[hold.0.index()].window;
                    matches!(window, tally_engine::Window::Rolling { .. }) == rolling
                }) else {
                    return false;
                };
                hold.2 = time;
                receipt.holds = tally_engine::admission::Holds::from_slice(&holds).unwrap();
                true
            }
            _ => false,
        });
        assert_replay_refuses(&dir, seq, "usage_admitted", what);
    }
}

/// A policy of generation 0 after the first event: only the first event of a new database is
/// one (`open` logs it when there is nothing to replay). Replayed later, it replaced the whole
/// policy list under keys seated and counted under the old one, and the policy swap the open
/// then made indexed past the new policy's counters and plans. The replay refuses it, naming
/// the event.
#[test]
fn opening_refuses_a_generation_0_policy_after_the_first_event() {
    let small = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.speech]
units = ["characters"]
[plans.Daily]
limits = [{ resource = "speech", unit = "characters", amount = 4000, window = "daily" }]
"#,
    )
    .expect("a valid policy");
    let document = serde_json::to_string(small.document()).unwrap();
    // The last event, so no later one trips over the keys' usage first.
    let (dir, seq) = database_with_event_rewritten("gen-0-later", true, |body| {
        *body = EventBody::PolicySwapped {
            generation: 0,
            document: document.clone(),
        };
        true
    });
    assert!(seq > 1);
    assert_replay_refuses(&dir, seq, "policy_swapped", "generation 0");
}

/// The record is sound (its crc matches) but an event body in it does not decode: `verify`
/// decodes every body and names the event.
#[test]
fn verify_reports_a_record_whose_event_body_is_damaged() {
    let (dir, frame) = damage_last_event_body("verify-body");
    let report = Engine::verify(dir.path(), sync_options()).expect("verify runs");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains(&format!("event {} is damaged", frame.first))),
        "sound: {report:?}"
    );
}

#[test]
fn a_damaged_copy_fails_to_open_while_the_original_still_opens_with_its_state() {
    // The damage is in a copy; the original is untouched and still opens with its state.
    let (dir, before, frames) = closed_database("verify-copy");
    let copy = dir.sibling("copy");
    copy_dir(dir.path(), copy.path());
    let mut first = frames[0].clone();
    first.path = copy
        .path()
        .join("events")
        .join(first.path.file_name().unwrap());
    flip_a_byte(&first);
    assert!(Engine::open(copy.path(), Policy::token_plan(), clock(), sync_options()).is_err());
    let engine = open_token_plan(dir.path(), sync_options());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "state",
    );
}

// ---------------------------------------------------------------------------------------------
// Torn tails, segments and compaction of whole segments.

/// A crash in the middle of a write leaves part of a record at the end of the last segment.
/// It was never acknowledged (acknowledgement follows the fdatasync), so opening cuts it off
/// and goes on as if it had never been written.
#[test]
fn a_torn_record_at_the_tail_is_cut_off_and_the_database_reopens_and_goes_on() {
    for cut in [
        "half a record",
        "a frame header only",
        "garbage appended",
        "zeros appended",
        "a flipped byte",
    ] {
        let (dir, before, frames) = closed_database(&format!("torn-{}", cut.replace(' ', "-")));
        let last = frames.last().unwrap().clone();
        let sound_len = (last.offset + 8 + last.len) as u64;
        let mut bytes = std::fs::read(&last.path).unwrap();
        // What survives: everything, or everything before the last record.
        let (kept_len, kept_events) = match cut {
            "half a record" => {
                bytes.truncate(last.offset + 8 + last.len / 2);
                (last.offset as u64, last.first - 1)
            }
            "a frame header only" => {
                bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2]);
                (sound_len, last.first + last.count - 1)
            }
            "garbage appended" => {
                bytes.extend_from_slice(&[0x5a; 4096]);
                (sound_len, last.first + last.count - 1)
            }
            // As the zeros a `Sync` writer writes ahead of its records (or a file that grew
            // before its data landed): the end of the log, left for the writer to go on over.
            "zeros appended" => {
                bytes.extend_from_slice(&[0u8; 4096]);
                (sound_len + 4096, last.first + last.count - 1)
            }
            _ => {
                bytes[last.offset + 8 + last.len / 2] ^= 1;
                (last.offset as u64, last.first - 1)
            }
        };
        std::fs::write(&last.path, bytes).unwrap();
        as_if_it_crashed(dir.path());
        let report = Engine::verify(dir.path(), sync_options()).unwrap();
        assert!(report.is_sound(), "{cut}: {:?}", report.problems);
        // Verify says where the open will cut (zeros are no torn write: nothing to cut).
        match (cut, &report.torn_tail) {
            ("zeros appended", None) => {}
            ("zeros appended", Some(note)) => panic!("{cut}: {note}"),
            (_, None) => panic!("{cut}: verify said nothing of the torn tail"),
            (_, Some(note)) => {
                let at = format!("at offset {kept_len} ");
                assert!(note.contains(&at), "{cut}: {note}");
                assert!(note.contains(&last.path.display().to_string()), "{note}");
                assert!(note.contains("the next open cuts them off"), "{note}");
                let bytes = match cut {
                    "a frame header only" => Some(6),
                    "garbage appended" => Some(4096),
                    _ => None,
                };
                if let Some(bytes) = bytes {
                    assert!(note.contains(&format!(" ends in {bytes} bytes ")), "{note}");
                }
            }
        }
        let engine = open_token_plan(dir.path(), sync_options());
        assert_eq!(
            std::fs::metadata(&last.path).unwrap().len(),
            kept_len,
            "{cut}: the tail is cut off (zeros are left)"
        );
        assert_eq!(last_seq(&engine), kept_events, "{cut}");
        if kept_events == last.first + last.count - 1 {
            assert_same_state(&state(&engine, &KEYS, &TEAMS, POPULATED_MS), &before, cut);
        }
        // It goes on: new events after the cut, and they survive a reopen.
        engine.top_up("@ada", 7, Some(POPULATED_MS)).unwrap();
        let credits = engine.credits_micros("@ada").unwrap();
        drop(engine);
        let engine = open_token_plan(dir.path(), sync_options());
        assert_eq!(engine.credits_micros("@ada").unwrap(), credits, "{cut}");
        assert_eq!(last_seq(&engine), kept_events + 1, "{cut}");
        drop(engine);
        let report = Engine::verify(dir.path(), sync_options()).unwrap();
        assert!(report.is_sound(), "{cut}: {:?}", report.problems);
        assert_eq!(report.torn_tail, None, "{cut}: cut off by the open");
    }
}

/// A seat change that changes nothing (the plan the key already has, or no seat to take
/// away) succeeds and logs nothing. Before, each logged an event.
#[test]
fn a_seat_change_that_changes_nothing_logs_nothing() {
    let (dir, before, _) = closed_database("seat-no-op");
    let engine = open_token_plan(dir.path(), sync_options());
    let events = last_seq(&engine);
    let usage = engine.usage("key-ada", Some(POPULATED_MS)).unwrap();
    let plan = usage.plan.clone().expect("ada has a seat");
    engine
        .assign_seat("@ada", "ada", &plan, Some(POPULATED_MS))
        .expect("the same plan again");
    engine
        .create_user("fay", "key-fay", Some(POPULATED_MS))
        .unwrap();
    let events = events + 1;
    engine
        .unassign_seat("@fay", "fay", Some(POPULATED_MS))
        .expect("no seat to take away");
    assert_eq!(last_seq(&engine), events, "nothing logged");
    assert_eq!(engine.usage("key-ada", Some(POPULATED_MS)).unwrap(), usage);
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "state",
    );
}

/// Adds batches of pay-as-you-go usage, each more than a record holds (1 MiB), all admitted,
/// until the log's last write spans two records or more; returns that write's records in
/// order. A loaded machine can split a batch over several writes (each fdatasynced before the
/// next): up to 20 batches are tried.
fn add_until_the_last_write_has_several_records(
    dir: &std::path::Path,
    engine: &Engine,
) -> Vec<Frame> {
    let requests: Vec<_> = (0..30_000)
        .map(|index| {
            UsageRequest::new(
                "payg-dee",
                "m2.7",
                &[(Unit::Requests, 1), (Unit::Tokens, 1_000)],
            )
            .at(POPULATED_MS + index)
        })
        .collect();
    for _ in 0..20 {
        for result in engine.consume_many(&requests) {
            assert!(result.unwrap().is_admitted(), "acknowledged");
        }
        let frames = frames_of(dir);
        let last = frames.last().unwrap().clone();
        assert!(last.durable_before.is_some(), "format 3");
        let last_write: Vec<_> = frames
            .into_iter()
            .filter(|frame| frame.path == last.path && frame.durable_before == last.durable_before)
            .collect();
        if last_write.len() > 1 {
            return last_write;
        }
    }
    panic!("no write of several records in 20 batches");
}

/// A power loss can keep the end of the last write and tear an earlier part of it: the drive
/// need not write the pages of an unsynced stretch in order. Every record of that stretch says
/// (by its durable point) that the bad record's events were not yet durable, so it is a torn
/// write: cut off with everything after it, never acknowledged. Before records carried their
/// durable point, a sound record after a bad one was always damage, and the database refused
/// to open after such a power loss.
#[test]
fn a_torn_record_with_sound_ones_of_the_same_unsynced_write_after_it_is_cut_off() {
    let (dir, before, _) = closed_database("torn-mid-write");
    let engine = open_token_plan(dir.path(), sync_options());
    let populated = last_seq(&engine);
    let last_write = add_until_the_last_write_has_several_records(dir.path(), &engine);
    drop(engine);
    // The first record of the last write: sound records of the same write follow it, written
    // before its events were durable, and nothing was written after the write's fdatasync.
    let torn = last_write[0].clone();
    flip_a_byte(&torn);
    // A clean close would show the whole write durable (next test): a crash before its
    // fdatasync shows nothing.
    as_if_it_crashed(dir.path());
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "a torn tail: {:?}", report.problems);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(
        last_seq(&engine),
        torn.first - 1,
        "cut off from the torn record"
    );
    assert_eq!(
        std::fs::metadata(&torn.path).unwrap().len(),
        torn.offset as u64
    );
    if torn.first == populated + 1 {
        assert_same_state(
            &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
            &before,
            "state",
        );
    }
    // It goes on, and what it writes next survives a reopen.
    engine.top_up("@ada", 7, Some(POPULATED_MS)).unwrap();
    let credits = engine.credits_micros("@ada").unwrap();
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.credits_micros("@ada").unwrap(), credits);
    assert_eq!(last_seq(&engine), torn.first);
}

/// The records of the last write before a clean close do not show each other durable (none
/// was written after its fdatasync), but the close does: it records the log durable through
/// its last event, and a bad record up to there is damage, refused with nothing cut off.
/// Before, the open cut off 30,000 acknowledged events as a torn write (the diff review).
#[test]
fn a_bad_record_of_the_last_write_before_a_clean_close_is_damage() {
    let (dir, _, _) = closed_database("clean-close");
    let engine = open_token_plan(dir.path(), sync_options());
    let populated = last_seq(&engine);
    let last_write = add_until_the_last_write_has_several_records(dir.path(), &engine);
    let acknowledged = last_seq(&engine);
    drop(engine);
    assert!(last_write[0].first > populated);
    damage_and_expect_refusal(
        dir.path(),
        &last_write[0],
        &format!("a clean close found the log durable through event {acknowledged}"),
    );
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(!report.is_sound(), "verify reports it");
}

/// Events a snapshot covers were durable before it was stored. A bad record among them is
/// damage even at the very end of the log, where it would otherwise pass for a torn write, and
/// opening refuses without cutting anything off. (Before, the open cut the record off and
/// only then found the log ending before the snapshot.) The end of the log is there when a
/// crash comes while the segment after a checkpoint is being created.
#[test]
fn a_bad_record_a_snapshot_covers_is_damage_even_at_the_end_of_the_log() {
    let dir = TempDir::new("snapshot-covers");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    let snapshot = engine.checkpoint().unwrap();
    drop(engine);
    let frames = frames_of(dir.path());
    assert!(
        frames
            .iter()
            .all(|frame| frame.durable_before == Some(frame.first)),
        "each call was durable before the next was written, and its record says so"
    );
    let last = frames.last().unwrap().clone();
    assert_eq!(
        last.first + last.count - 1,
        snapshot,
        "the snapshot covers the last record"
    );
    let newest = segment_paths(dir.path()).pop().unwrap();
    assert_ne!(newest, last.path, "a segment after the snapshot");
    // A crash while creating it: its header is not whole, and it was never recorded as
    // created (that follows its header's fsync). Opening removes it.
    let header = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &header[..10]).unwrap();
    record_last_segment(dir.path(), last.path.as_path());
    damage_and_expect_refusal(
        dir.path(),
        &last,
        &format!(
            "it was durable: a snapshot or a clean close found the log durable through event {snapshot}"
        ),
    );
    // `verify` reports it (it failed outright before, as the open does).
    let report = Engine::verify(dir.path(), sync_options()).expect("verify reports, not fails");
    assert!(
        report.problems.iter().any(|problem| {
            problem.contains("it was durable") && problem.contains("events are missing")
        }),
        "{:?}",
        report.problems
    );
}

/// Records `segment` as the newest one the log created (`last_segment` in sled's `meta`), as a
/// crash before the next one's record leaves it.
fn record_last_segment(dir: &std::path::Path, segment: &std::path::Path) {
    let first: u64 = segment
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    let db = open_sled_retrying(dir);
    let meta = db.open_tree("meta").unwrap();
    meta.insert("last_segment", &first.to_le_bytes()).unwrap();
    db.flush().unwrap();
}

/// A segment recorded as created (its header was durable before the record) whose header is
/// then found damaged is refused, naming it, not removed as a crash leftover would be: the
/// log had reached it.
#[test]
fn a_recorded_segment_with_a_damaged_header_is_refused_not_removed() {
    let dir = TempDir::new("recorded-header");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.checkpoint().unwrap();
    drop(engine);
    let newest = segment_paths(dir.path()).pop().unwrap();
    let header = std::fs::read(&newest).unwrap();
    assert_eq!(
        header.len(),
        SEGMENT_HEADER,
        "a new segment after the snapshot"
    );
    std::fs::write(&newest, &header[..10]).unwrap();
    let error = open_result(dir.path(), sync_options()).expect_err("damage");
    let problem = storage_problem(&error);
    assert!(
        problem.contains(&*newest.to_string_lossy()) && problem.contains("bad header"),
        "{problem}"
    );
    assert_eq!(
        std::fs::read(&newest).unwrap(),
        &header[..10],
        "left as it was"
    );
}

/// Rewrites a database's log in format 2 (records without a durable point, segments, snapshots
/// and the database's metadata saying version 2), as the builds before format 3 wrote it.
fn rewrite_in_format_2(dir: &std::path::Path) {
    rewrite_snapshots_in_format(dir, 2);
    for path in segment_paths(dir) {
        let bytes = std::fs::read(&path).unwrap();
        let mut out = bytes[..SEGMENT_HEADER].to_vec();
        out[8..10].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32fast::hash(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        let mut at = SEGMENT_HEADER;
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let payload = &bytes[at + 8..at + 8 + len];
            let count = u32::from_le_bytes(payload[8..12].try_into().unwrap());
            assert!(count & (1 << 31) != 0, "a format-3 record");
            let mut old = payload[..28].to_vec();
            old[8..12].copy_from_slice(&(count & !(1 << 31)).to_le_bytes());
            old.extend_from_slice(&payload[36..]);
            out.extend_from_slice(&(old.len() as u32).to_le_bytes());
            out.extend_from_slice(&frame_crc(&old).to_le_bytes());
            out.extend_from_slice(&old);
            at += 8 + len;
        }
        std::fs::write(&path, out).unwrap();
    }
}

fn format_version(dir: &std::path::Path) -> u16 {
    let db = open_sled_retrying(dir);
    let value = db
        .open_tree("meta")
        .unwrap()
        .get("format_version")
        .unwrap()
        .unwrap();
    u16::from_le_bytes([value[0], value[1]])
}

/// A database written by a build of format 2 opens to the same state. From then on it is
/// written in format 3 (its metadata says so first, so a format-2 build refuses it by its
/// version), and its format-2 records are still read: on a reopen, by `events_after` and by
/// `verify`. A format-2 record does not say what was durable, so a bad one with a sound one
/// after it stays damage.
#[test]
fn a_format_2_database_opens_as_it_was_and_goes_on_in_the_current_format() {
    let (dir, before, frames) = closed_database("format-2");
    assert!(
        std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .next()
            .is_none(),
        "no snapshot (its format did not change)"
    );
    let damaged = dir.sibling("format-2-damaged");
    rewrite_in_format_2(dir.path());
    copy_dir(dir.path(), damaged.path());
    assert!(frames_of(dir.path())
        .iter()
        .all(|frame| frame.durable_before.is_none()));
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    // An open that reads it and fails, or writes nothing, leaves it in format 2: a build of
    // format 2 still opens it.
    let mut without_starter = Policy::token_plan().document().clone();
    without_starter.plans.remove("Starter");
    let refused = Engine::open(
        dir.path(),
        Policy::compile(without_starter).unwrap(),
        clock(),
        sync_options(),
    );
    assert!(refused.is_err(), "a seated plan dropped");
    drop(refused);
    let segments = segment_paths(dir.path());
    drop(open_token_plan(dir.path(), sync_options()));
    // Not even a new segment for a full one: it is rotated before the first write.
    let small_segments = OpenOptions {
        segment_bytes: 256,
        ..sync_options()
    };
    drop(open_token_plan(dir.path(), small_segments));
    assert_eq!(format_version(dir.path()), 2, "nothing written");
    assert_eq!(
        segment_paths(dir.path()),
        segments,
        "no segment in format 3"
    );
    let engine = open_token_plan(dir.path(), sync_options());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "state",
    );
    let events = engine.events_after(0, 10_000).unwrap();
    assert_eq!(events.len() as u64, last_seq(&engine));
    engine.top_up("@ada", 7, Some(POPULATED_MS)).unwrap();
    let credits = engine.credits_micros("@ada").unwrap();
    drop(engine);
    assert_eq!(format_version(dir.path()), FORMAT_VERSION);
    let after = frames_of(dir.path());
    let newest = after.last().unwrap();
    assert_eq!(
        newest.first,
        frames.last().unwrap().first + frames.last().unwrap().count
    );
    assert!(newest.durable_before.is_some(), "written in format 3");
    assert!(after[..after.len() - 1]
        .iter()
        .all(|frame| frame.durable_before.is_none()));
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.credits_micros("@ada").unwrap(), credits);
    drop(engine);
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);

    let frames = frames_of(damaged.path());
    flip_a_byte(&frames[1]);
    let error = Engine::open(
        damaged.path(),
        Policy::token_plan(),
        clock(),
        sync_options(),
    )
    .expect_err("damage");
    assert_names_where(storage_problem(&error), &frames[1]);
}

/// A checkpointed format-2 database opens from its snapshot (whose format did not change but
/// for its version) and the format-2 events after it, to the same state.
#[test]
fn a_checkpointed_format_2_database_opens_from_its_snapshot() {
    let dir = TempDir::new("format-2-snapshot");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.checkpoint().unwrap();
    engine.top_up("@ada", 11, Some(POPULATED_MS)).unwrap();
    let before = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
    drop(engine);
    let snapshot = latest_snapshot(dir.path());
    assert_eq!(
        std::fs::read(&snapshot).unwrap()[8..10],
        FORMAT_VERSION.to_le_bytes()
    );
    rewrite_in_format_2(dir.path());
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    let engine = open_token_plan(dir.path(), sync_options());
    assert!(
        engine.open_report().unwrap().events_replayed >= 1,
        "the snapshot, then the events after it"
    );
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "state",
    );
}

/// A format-2 record has 28 bytes of header, not 36: one holding a single short event (a team
/// with a one-letter name, created alone, so in a record of its own) is shorter than any
/// format-3 record, and is read all the same: by `verify`, by an open's replay and by
/// `events_after`.
#[test]
fn a_format_2_record_shorter_than_a_format_3_header_is_read() {
    let dir = TempDir::new("format-2-short-record");
    let engine = open_token_plan(dir.path(), sync_options());
    engine.create_team("t", Some(POPULATED_MS)).unwrap();
    engine.top_up("t", 5, Some(POPULATED_MS)).unwrap();
    drop(engine);
    rewrite_in_format_2(dir.path());
    let frames = frames_of(dir.path());
    assert!(
        frames.iter().any(|frame| frame.len < 36),
        "a record shorter than a format-3 header: {frames:?}"
    );
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.credits_micros("t").unwrap(), 5);
    let events = engine.events_after(0, 100).unwrap();
    assert_eq!(events.len() as u64, last_seq(&engine));
}

/// A checkpointed format-3 database (its snapshot's rolling buckets plain, two fixed integers
/// each) opens from its snapshot to the same state, and its next snapshot packs them.
#[test]
fn a_checkpointed_format_3_database_opens_from_its_plain_snapshot_and_packs_the_next() {
    let dir = TempDir::new("format-3-snapshot");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.checkpoint().unwrap();
    engine.top_up("@ada", 13, Some(POPULATED_MS)).unwrap();
    let before = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
    drop(engine);
    let packed = std::fs::read(latest_snapshot(dir.path())).unwrap().len();
    rewrite_snapshots_in_format(dir.path(), 3);
    let plain = std::fs::read(latest_snapshot(dir.path())).unwrap();
    assert_eq!(plain[8..10], 3u16.to_le_bytes());
    assert!(
        plain.len() > packed,
        "rolling buckets to write plain: {} bytes against {packed} packed",
        plain.len()
    );
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    let engine = open_token_plan(dir.path(), sync_options());
    let opened = engine.open_report().unwrap();
    assert!(
        opened.events_replayed >= 1 && opened.events_replayed < last_seq(&engine),
        "the snapshot, then the events after it: {opened:?}"
    );
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "state",
    );
    engine.checkpoint().unwrap();
    drop(engine);
    assert_eq!(format_version(dir.path()), FORMAT_VERSION);
    let next = std::fs::read(latest_snapshot(dir.path())).unwrap();
    assert_eq!(next[8..10], FORMAT_VERSION.to_le_bytes());
    assert!(
        next.len() < plain.len(),
        "{} against {}",
        next.len(),
        plain.len()
    );
    let engine = open_token_plan(dir.path(), sync_options());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "state after the packed snapshot",
    );
}

/// A policy an earlier build logged was valid under its rules, and the database depends on it:
/// the rules added since for policies being loaded (an empty plan, a duration repeating a
/// unit, a maximum on what a plan does not cover...) do not refuse it when the log is
/// replayed or a snapshot restored. Before, such a database no longer opened, in either build
/// (the newer one had marked it format 3 first).
#[test]
fn a_logged_policy_an_earlier_build_accepted_still_opens() {
    let (dir, before, frames) = closed_database("logged-policy");
    let first = frames[0].clone();
    let events = record_events(&first);
    let body = decode_body(1, &events[0].1).unwrap();
    let EventBody::PolicySwapped {
        generation: 0,
        document,
    } = body
    else {
        panic!("the first event is the policy: {body:?}");
    };
    let mut document: serde_json::Value = serde_json::from_str(&document).unwrap();
    document["plans"]["Suspended"] = serde_json::json!({ "covers": [] });
    let starter = &mut document["plans"]["Starter"];
    starter["limits"][0]["window"] = "rolling:4h30m30m".into();
    starter["maximums"] = serde_json::json!([
        { "resource": "image-01", "unit": "images", "amount": 1 }
    ]);
    let old = document.to_string();
    assert!(
        Policy::from_json_str(&old).is_err(),
        "refused as a new policy"
    );
    let mut rewritten = events.clone();
    rewritten[0].1 = encode_body(&EventBody::PolicySwapped {
        generation: 0,
        document: old,
    });
    rewrite_record(&first, &rewritten);
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    let engine =
        Engine::open_with_stored_policy(dir.path(), Policy::token_plan(), clock(), sync_options())
            .expect("opens with the policy it logged");
    assert!(engine.policy().plan_id("Suspended").is_some());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "state",
    );
    drop(engine);
    // With the shipped policy given, it is swapped in over the logged one.
    let engine = open_token_plan(dir.path(), sync_options());
    assert!(engine.policy().plan_id("Suspended").is_none());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "state",
    );
}

/// Only the end of the last segment can be torn: a sealed segment was fdatasynced before the
/// next one was created, so a short or bad record at its end is damage.
#[test]
fn a_bad_record_at_the_end_of_an_earlier_segment_is_damage_naming_it() {
    let dir = TempDir::new("sealed-damage");
    let options = OpenOptions {
        segment_bytes: 512,
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    populate(&engine);
    drop(engine);
    let frames = frames_of(dir.path());
    let paths = segment_paths(dir.path());
    assert!(paths.len() >= 3, "{paths:?}");
    let last_of_first: Frame = frames
        .iter()
        .rfind(|frame| frame.path == paths[0])
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&paths[0]).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&paths[0], bytes).unwrap();
    let error = open_result(dir.path(), options.clone()).expect_err("damage");
    let problem = storage_problem(&error);
    assert_names_where(problem, &last_of_first);
    let report = Engine::verify(dir.path(), options).expect("verify runs");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains(&segment_name(&last_of_first))),
        "{:?}",
        report.problems
    );
}

/// Damage that leaves the rest of a sealed segment unreadable is one problem, not also a gap:
/// the next segment starts where the damaged one's events end, and `verify` cannot tell where
/// that is from the records it could read.
#[test]
fn verify_reports_damage_in_a_sealed_segment_without_inventing_a_gap_after_it() {
    let dir = TempDir::new("sealed-damage-no-gap");
    let options = OpenOptions {
        segment_bytes: 512,
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    populate(&engine);
    drop(engine);
    let paths = segment_paths(dir.path());
    assert!(paths.len() >= 3, "{paths:?}");
    let frames = frames_of(dir.path());
    let first_of_first = frames
        .iter()
        .find(|frame| frame.path == paths[0])
        .unwrap()
        .clone();
    flip_a_byte(&first_of_first);
    let report = Engine::verify(dir.path(), options).expect("verify runs");
    assert!(!report.is_sound());
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains(&segment_name(&first_of_first))
                && problem.contains(&format!("offset {}", first_of_first.offset))),
        "{:?}",
        report.problems
    );
    assert!(
        !report
            .problems
            .iter()
            .any(|problem| problem.contains("a gap")),
        "no event is missing between the segments: {:?}",
        report.problems
    );
}

/// A record that holds no events (its frame and crc sound: only crafted bytes make one) is
/// damage to `verify` as it is to an open and a replay, which refuse it: the writer never
/// writes one. It is named as such ("events 1 to 0" before), and listed once: the walk over
/// every segment and the replay up to the snapshot both meet it, in the same words.
#[test]
fn verify_reports_a_record_that_holds_no_events() {
    let dir = TempDir::new("verify-empty-record");
    let options = OpenOptions {
        segment_bytes: 512,
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    populate(&engine);
    // A snapshot after the damage: verify compares it with a replay of the log up to it.
    engine.checkpoint().expect("checkpoint");
    drop(engine);
    let paths = segment_paths(dir.path());
    assert!(paths.len() >= 3, "{paths:?}");
    let frame = frames_of(dir.path())
        .into_iter()
        .find(|frame| frame.path == paths[0])
        .unwrap();
    // An empty record, numbered as the first record of the first segment, put before it.
    let mut payload = Vec::new();
    encode_record_into(
        &mut payload,
        frame.first,
        frame
            .durable_before
            .map_or(frame.first, |mark| mark.min(frame.first)),
        std::iter::empty::<(u64, &[u8])>(),
    );
    assert_eq!(RecordView::parse(&payload).map(|view| view.count), Some(0));
    let bytes = std::fs::read(&frame.path).unwrap();
    let mut out = bytes[..frame.offset].to_vec();
    push_frame(&mut out, &payload);
    out.extend_from_slice(&bytes[frame.offset..]);
    std::fs::write(&frame.path, out).unwrap();
    let report = Engine::verify(dir.path(), options).expect("verify runs");
    assert_eq!(
        report
            .problems
            .iter()
            .filter(|problem| problem.contains(&segment_name(&frame))
                && problem.contains(&format!("offset {}", frame.offset))
                && problem.contains("it holds no events"))
            .count(),
        1,
        "{:?}",
        report.problems
    );
}

/// One damaged record is one problem in `verify`'s report: the walk that meets it and the
/// replay up to the snapshot after it, which meets it again, do not both list it (an operator
/// read "problems: 2" for one flipped byte).
#[test]
fn verify_lists_a_damaged_record_once() {
    for (label, middle) in [("damage-once-sealed", false), ("damage-once-middle", true)] {
        let dir = TempDir::new(label);
        let options = OpenOptions {
            segment_bytes: 512,
            ..sync_options()
        };
        let engine = open_token_plan(dir.path(), options.clone());
        populate(&engine);
        // A snapshot after the damage: verify compares it with a replay of the log up to it.
        engine.checkpoint().expect("checkpoint");
        drop(engine);
        let paths = segment_paths(dir.path());
        assert!(paths.len() >= 3, "{paths:?}");
        let frames = frames_of(dir.path());
        let frame = if middle {
            frames[frames.len() / 2].clone()
        } else {
            frames
                .iter()
                .find(|frame| frame.path == paths[0])
                .unwrap()
                .clone()
        };
        flip_a_byte(&frame);
        let report = Engine::verify(dir.path(), options).expect("verify runs");
        assert!(!report.is_sound());
        let mut seen = std::collections::HashSet::new();
        for problem in &report.problems {
            assert!(
                seen.insert(problem),
                "{label}: listed twice: {:?}",
                report.problems
            );
        }
        assert!(
            report
                .problems
                .iter()
                .any(|problem| problem.contains(&format!("offset {}", frame.offset))),
            "{label}: {:?}",
            report.problems
        );
    }
}

/// An empty path names no directory: opening, verifying or reading the options of a database
/// there is refused naming it, and nothing is written (sled's `conf` and `db` were created in
/// the working directory before the open failed on reading "").
#[test]
fn an_empty_database_path_is_refused_and_writes_nothing_in_the_working_directory() {
    let here = std::env::current_dir().expect("a working directory");
    let names = || -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(&here)
            .expect("the working directory is read")
            .map(|entry| entry.expect("an entry").file_name())
            .collect()
    };
    let before = names();
    let opened = Engine::open("", Policy::token_plan(), clock(), sync_options());
    let verified = Engine::verify("", sync_options());
    let recorded = Engine::recorded_options("");
    let made: Vec<_> = names().difference(&before).cloned().collect();
    for name in &made {
        // Sled's files (`conf`, `db`, `snap.*`), should a failure leave them.
        let _ = std::fs::remove_file(here.join(name));
    }
    assert!(made.is_empty(), "written in {}: {made:?}", here.display());
    for error in [opened.err(), verified.err(), recorded.err()] {
        match error {
            Some(Error::InvalidArgument { field: "dir", .. }) => {}
            other => panic!("expected an error naming dir, got {other:?}"),
        }
    }
}

fn open_result(dir: &std::path::Path, options: OpenOptions) -> Result<Engine, Error> {
    Engine::open(dir, Policy::token_plan(), clock(), options)
}

#[test]
fn segments_rotate_by_size_and_at_checkpoints_and_reopen_with_the_same_state() {
    let dir = TempDir::new("rotation");
    let options = OpenOptions {
        segment_bytes: 512,
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    populate(&engine);
    let before = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
    let by_size = segment_paths(dir.path()).len();
    assert!(by_size >= 3, "{by_size} segments");
    // Every segment but the last one is full (at least the size bound), and each starts right
    // after the one before ends.
    let frames = frames_of(dir.path());
    for pair in frames.windows(2) {
        assert_eq!(pair[1].first, pair[0].first + pair[0].count, "{pair:?}");
    }
    for path in &segment_paths(dir.path())[..by_size - 1] {
        assert!(std::fs::metadata(path).unwrap().len() >= 512, "{path:?}");
    }
    // A checkpoint starts a new segment at the first event after it.
    let snapshot = engine.checkpoint().unwrap();
    engine.top_up("@ada", 1, Some(POPULATED_MS)).unwrap();
    let names: Vec<String> = segment_paths(dir.path())
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.last().unwrap(),
        &format!("{:020}.seg", snapshot + 1),
        "{names:?}"
    );
    let after_top_up = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
    assert_ne!(after_top_up, before);
    drop(engine);
    let engine = open_token_plan(dir.path(), options.clone());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &after_top_up,
        "after reopening",
    );
    assert_eq!(last_seq(&engine), snapshot + 1);
    drop(engine);
    let report = Engine::verify(dir.path(), options).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    assert_eq!(report.first_seq, 1);
    assert_eq!(report.last_seq, snapshot + 1);
}

#[test]
fn compaction_deletes_whole_segment_files_and_never_the_one_being_written() {
    let dir = TempDir::new("compact-files");
    let options = OpenOptions {
        segment_bytes: 512,
        retention_ms: SECOND_MS,
        ..sync_options()
    };
    let engine = open(dir.path(), ten_seconds(), options.clone());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ann", "ann", "Small", Some(T0_MS))
        .unwrap();
    engine.top_up("@ann", 1_000_000_000, Some(T0_MS)).unwrap();
    let one = [(Unit::Requests, 1)];
    for index in 0..300 {
        let request = UsageRequest::new("key-ann", "chat", &one).at(T0_MS + index * 10);
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    let first_snapshot = engine.checkpoint().unwrap();
    let segments_before = segment_paths(dir.path()).len();
    assert!(segments_before >= 3, "{segments_before}");
    let later = T0_MS + 10 * MINUTE_MS;
    engine
        .consume(&UsageRequest::new("key-ann", "chat", &one).at(later))
        .unwrap();
    let balance = engine.credits_micros("@ann").unwrap();
    let report = engine.compact(Some(later)).unwrap();
    assert_eq!(report.events_removed, first_snapshot);
    assert_eq!(report.first_seq_kept, first_snapshot + 1);
    let names: Vec<String> = segment_paths(dir.path())
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.first().unwrap(),
        &format!("{:020}.seg", first_snapshot + 1),
        "{names:?}"
    );
    // Compacting again at once: what is left is younger than the snapshot before the latest.
    let again = engine.compact(Some(later)).unwrap();
    assert!(!segment_paths(dir.path()).is_empty());
    assert_eq!(engine.credits_micros("@ann").unwrap(), balance);
    drop(engine);
    let verified = Engine::verify(dir.path(), options.clone()).unwrap();
    assert!(verified.is_sound(), "{:?}", verified.problems);
    assert_eq!(verified.first_seq, again.first_seq_kept);
    let engine = open(dir.path(), ten_seconds(), options);
    assert_eq!(engine.credits_micros("@ann").unwrap(), balance);
}

// ---------------------------------------------------------------------------------------------
// Errors of opening.

#[test]
fn opening_a_directory_another_engine_holds_is_a_storage_error_saying_it_is_locked() {
    let dir = TempDir::new("locked");
    let first = open_token_plan(dir.path(), sync_options());
    first.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("locked");
    let problem = storage_problem(&error);
    assert!(problem.contains("locked"), "{problem}");
    // The first engine is unharmed.
    first.top_up("@ada", 10, Some(T0_MS)).unwrap();
    assert_eq!(first.credits_micros("@ada").unwrap(), 10);
}

#[test]
fn opening_a_directory_of_unrelated_files_is_a_clear_error_and_touches_nothing() {
    let dir = TempDir::new("foreign");
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"my notes").unwrap();
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("foreign");
    let problem = storage_problem(&error);
    assert!(problem.contains("not a tally database"), "{problem}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("notes.txt")]);

    let file = dir.sibling("file");
    std::fs::write(file.path(), b"a file").unwrap();
    let error = Engine::open(file.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("a file");
    assert!(
        storage_problem(&error).contains("not a directory"),
        "{error}"
    );
}

#[test]
fn opening_a_database_of_a_newer_format_is_a_clear_error_naming_the_version() {
    let dir = TempDir::new("newer");
    let engine = open_token_plan(dir.path(), sync_options());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    drop(engine);
    {
        let db = open_sled_retrying(dir.path());
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &99u16.to_le_bytes()).unwrap();
        db.flush().unwrap();
    }
    let error =
        Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options()).expect_err("newer");
    let problem = storage_problem(&error);
    assert!(problem.contains("format version 99"), "{problem}");
    let error = Engine::verify(dir.path(), sync_options()).expect_err("newer");
    assert!(
        storage_problem(&error).contains("format version 99"),
        "{error}"
    );
}

/// A recorded format version that is not the 2 bytes of one is damage, refused at open and by
/// `verify` naming the record, and changes nothing: read as its first byte(s), `[2, 0, 9]` ran
/// a format-4 database as one of format 2 (and recorded format 4 over it at the first write),
/// and an empty one was refused as format 0, the development build's log inside sled.
#[test]
fn a_recorded_format_version_of_another_length_is_refused_as_damage() {
    let dir = TempDir::new("format-length");
    let engine = open_token_plan(dir.path(), sync_options());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    drop(engine);
    for value in [&[4u8][..], &[2, 0, 9], &[]] {
        {
            let db = open_sled_retrying(dir.path());
            let meta = db.open_tree("meta").unwrap();
            meta.insert("format_version", value).unwrap();
            db.flush().unwrap();
        }
        let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
            .expect_err("damaged");
        let problem = storage_problem(&error);
        assert!(
            problem.contains("format_version") && problem.contains("damaged"),
            "{value:?}: {problem}"
        );
        let error = Engine::verify(dir.path(), sync_options()).expect_err("damaged");
        assert!(
            storage_problem(&error).contains("format_version"),
            "{value:?}: {error}"
        );
        let db = open_sled_retrying(dir.path());
        let meta = db.open_tree("meta").unwrap();
        assert_eq!(
            meta.get("format_version").unwrap().as_deref(),
            Some(value),
            "left as it was"
        );
    }
}

#[test]
fn reopening_right_after_dropping_works_every_time() {
    let dir = TempDir::new("reopen-fast");
    for round in 0..8u64 {
        let engine = open_token_plan(dir.path(), sync_options());
        if round == 0 {
            engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
            engine
                .assign_seat("@ada", "ada", "Max", Some(T0_MS))
                .unwrap();
        }
        let report = engine.usage("key-ada", Some(T0_MS + HOUR_MS)).unwrap();
        assert_eq!(report.limits[0].used, round, "every earlier round counted");
        let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 1)])
            .at(T0_MS + round * SECOND_MS);
        assert!(engine.consume(&request).unwrap().is_admitted());
        if round % 2 == 0 {
            drop(engine);
        } else {
            engine.close().unwrap();
        }
    }
}

/// Reopened right after a drop or close while periodic checkpoints are written in the
/// background and segments rotate every few events (each recorded in sled by the writer):
/// every round's top-ups are there once, in every durability mode.
#[test]
fn reopening_amid_background_checkpoints_and_rotations_keeps_every_event_once() {
    for durability in [
        Durability::Sync,
        Durability::Interval { ms: 5 },
        Durability::None,
    ] {
        let dir = TempDir::new("reopen-rotating");
        let options = OpenOptions {
            durability,
            checkpoint_every_events: 3,
            segment_bytes: 256,
            ..OpenOptions::default()
        };
        let mut expected = 0u64;
        for round in 0..6u64 {
            let engine = open_token_plan(dir.path(), options.clone());
            if round == 0 {
                engine.create_team("acme", Some(T0_MS)).unwrap();
            }
            assert_eq!(
                engine.credits_micros("acme").unwrap(),
                expected,
                "{durability:?}, round {round}"
            );
            for step in 0..7u64 {
                engine
                    .top_up("acme", 1, Some(T0_MS + round * 10 + step))
                    .unwrap();
                expected += 1;
            }
            if round % 2 == 0 {
                drop(engine);
            } else {
                engine.close().unwrap();
            }
        }
        let report = Engine::verify(dir.path(), options).unwrap();
        assert!(report.is_sound(), "{durability:?}: {:?}", report.problems);
    }
}

// ---------------------------------------------------------------------------------------------
// sled hazards handled at open.

fn generating_case(label: &str, contents: impl Fn(&std::path::Path) -> Vec<u8>) {
    let dir = TempDir::new(label);
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    let before = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
    engine.close().unwrap();
    // sled writes its own snapshot (`snap.<lsn>`) when it opens a database with new data.
    open_token_plan(dir.path(), sync_options()).close().unwrap();
    let leftover = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&leftover, contents(dir.path())).unwrap();

    let engine = open_token_plan(dir.path(), sync_options());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "the data is intact",
    );
    assert!(!leftover.exists(), "the leftover was moved aside");
    let request = UsageRequest::new("key-bob", "m2.7", &[(Unit::Requests, 1)]).at(POPULATED_MS);
    assert!(engine.consume(&request).unwrap().is_admitted());
    drop(engine);
    // And the database keeps opening.
    let engine = open_token_plan(dir.path(), sync_options());
    assert!(engine.consume(&request).unwrap().is_admitted());
}

/// A `snap.*.generating` file in a database another engine holds is that engine's sled
/// writing its snapshot as it opens (sled writes one at every open, holding the lock): an open
/// refused as locked leaves it where it is. Before, every open moved such files aside before
/// it even tried the lock, so an operator command run while a gateway was starting failed the
/// gateway's open (sled's rename of its snapshot found the file gone).
#[test]
fn an_open_refused_as_locked_leaves_the_holders_generating_snapshot_alone() {
    let dir = TempDir::new("generating-locked");
    let engine = open_token_plan(dir.path(), sync_options());
    let generating = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&generating, b"being written by the holder's sled").unwrap();
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("locked");
    assert!(storage_problem(&error).contains("is locked"), "{error}");
    assert!(generating.exists(), "{:?}", names_in(dir.path()));
    std::fs::remove_file(&generating).unwrap();
    drop(engine);
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The engine renames the leftover to `snap.<lsn>.generating.moved-aside`, but sled takes
/// every file whose name starts with `snap.` as a snapshot candidate and reads the last in
/// sorted order: the renamed garbage, so sled refuses with "Read corrupted data" on every open.
#[test]
fn a_leftover_generating_snapshot_file_of_garbage_is_moved_aside_and_the_data_opens_intact() {
    generating_case("generating-garbage", |_| b"half a snapshot".to_vec());
}

#[test]
fn a_leftover_generating_copy_of_a_real_snapshot_is_moved_aside_and_the_data_opens_intact() {
    generating_case("generating-copy", |dir| {
        let names = names_in(dir);
        let snapshot = names
            .iter()
            .find(|name| name.starts_with("snap.") && !name.contains("generating"))
            .unwrap_or_else(|| panic!("sled wrote no snapshot: {names:?}"));
        std::fs::read(dir.join(snapshot)).unwrap()
    });
}

#[test]
fn with_sync_durability_an_acknowledged_event_is_already_in_the_files_when_consume_returns() {
    let dir = TempDir::new("sync-copy");
    let engine = open_token_plan(dir.path(), sync_options());
    create_accounts(&engine);
    for round in 1..=3u64 {
        let quantities = [(Unit::Requests, round)];
        let id = format!("sync-{round}");
        let request = UsageRequest::new("key-bob", "m2.7", &quantities)
            .at(T0_MS + round * SECOND_MS)
            .id(&id);
        let decision = engine.consume(&request).unwrap();
        assert!(decision.is_admitted());
        // Copy the files while the engine is still open, then open the copy.
        let copy = dir.sibling(&format!("copy-{round}"));
        copy_dir(dir.path(), copy.path());
        let copied = open_token_plan(copy.path(), sync_options());
        let used = copied
            .usage("key-bob", Some(T0_MS + HOUR_MS))
            .unwrap()
            .limits[0]
            .used;
        assert_eq!(used, round * (round + 1) / 2, "round {round}");
        assert_eq!(
            copied.consume(&request),
            Ok(decision),
            "the copy knows the request id"
        );
        let events = copied.events_after(0, 1_000).unwrap();
        assert_eq!(
            events.last().map(|event| event.body.kind()),
            Some("usage_admitted")
        );
        drop(copied);
    }
    assert!(matches!(
        engine.consume(&UsageRequest::new("key-bob", "m2.7", &[(Unit::Requests, 1)]).at(T0_MS)),
        Ok(Decision::Admitted(_))
    ));
}

/// Opening scans the last segment through a window of a few MiB rather than reading it whole:
/// a segment longer than the window is judged exactly as a short one. A torn record at its
/// end is cut off; a damaged record past the first window, with sound ones after it, is damage
/// naming its offset.
#[test]
fn the_end_of_a_segment_longer_than_the_read_window_is_judged_as_a_short_ones() {
    let dir = TempDir::new("long-segment");
    let engine = open_token_plan(dir.path(), sync_options());
    create_accounts(&engine);
    let quantities = [(Unit::Requests, 1), (Unit::Tokens, 1_000)];
    let mut at_ms = T0_MS;
    // Pay-as-you-go usage is always admitted: batches of it until the last segment holds
    // more than twice the window (4 MiB).
    while segment_paths(dir.path())
        .last()
        .map_or(0, |path| std::fs::metadata(path).unwrap().len())
        < 9 << 20
    {
        let requests: Vec<_> = (0..2_000)
            .map(|_| {
                at_ms += 7;
                UsageRequest::new("payg-dee", "m2.7", &quantities).at(at_ms)
            })
            .collect();
        for result in engine.consume_many(&requests) {
            assert!(result.unwrap().is_admitted());
        }
    }
    drop(engine);
    let frames = frames_of(dir.path());
    let last_path = segment_paths(dir.path()).pop().unwrap();
    assert_eq!(segment_paths(dir.path()).len(), 1, "one long segment");
    let last = frames.last().unwrap().clone();
    let pristine = std::fs::read(&last_path).unwrap();

    // Torn: half of the last record, 9 MiB in, by a crash.
    let mut torn = pristine.clone();
    torn.truncate(last.offset + 8 + last.len / 2);
    std::fs::write(&last_path, &torn).unwrap();
    as_if_it_crashed(dir.path());
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(
        last_seq(&engine),
        last.first - 1,
        "the torn record is cut off"
    );
    drop(engine);
    assert_eq!(
        std::fs::metadata(&last_path).unwrap().len(),
        last.offset as u64
    );

    // Damaged: a flipped byte in a record past the first window, sound records after it.
    let damaged_frame = frames
        .iter()
        .find(|frame| frame.offset > 6 << 20)
        .unwrap()
        .clone();
    let mut damaged = pristine;
    damaged[damaged_frame.offset + 8 + damaged_frame.len / 2] ^= 1;
    std::fs::write(&last_path, &damaged).unwrap();
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("damage is not a torn tail");
    let problem = storage_problem(&error);
    assert!(
        problem.contains(&format!("damaged at offset {}", damaged_frame.offset)),
        "{problem}"
    );
    assert_eq!(
        std::fs::read(&last_path).unwrap(),
        damaged,
        "nothing cut off"
    );
}

/// A snapshot's header says how much memory its keys' usage took (in 2 MiB units, rounded
/// up), so that an open can make that memory ready on the other core while it reads and
/// decodes the snapshot. An open warms no more than the hint says; a snapshot without the
/// hint (as builds before it wrote) opens to the same state, warming nothing.
#[test]
fn a_snapshot_carries_its_keys_usage_memory_and_an_open_warms_at_most_that() {
    const USERS: usize = 1_500;
    const UNIT: u64 = 2 << 20;
    let dir = TempDir::new("usage-hint");
    let engine = open_token_plan(dir.path(), sync_options());
    let at = Some(T0_MS);
    let mut keys = Vec::new();
    for index in 0..USERS {
        let user = format!("user-{index}");
        let key = format!("key-{index}");
        engine.create_user(&user, &key, at).expect("a user");
        let plan = if index % 2 == 0 { "Plus" } else { "Max" };
        engine
            .assign_seat(&format!("@{user}"), &user, plan, at)
            .expect("a seat");
        keys.push(key);
    }
    let one = [(Unit::Requests, 1)];
    for (index, key) in keys.iter().enumerate() {
        let request = UsageRequest::new(key, "m2.7", &one).at(T0_MS + index as u64);
        assert!(engine.consume(&request).expect("decided").is_admitted());
    }
    let memory = engine.memory_stats();
    assert_eq!(memory.keys_with_usage, USERS as u64);
    let key_names: Vec<&str> = keys.iter().map(String::as_str).collect();
    let at_ms = T0_MS + HOUR_MS;
    let before = state(&engine, &key_names, &[], at_ms);
    engine.close().expect("close, with its checkpoint");

    let latest_snapshot = || latest_snapshot(dir.path());
    // What an open reads as the hint (the engine closed, so the log opens by itself).
    let hint_read = || {
        let log = tally_engine::log::EventLog::open_with(
            dir.path(),
            Durability::Sync,
            None,
            tally_engine::log::SEGMENT_BYTES,
        )
        .expect("the log");
        let pointer = log.snapshot_pointer().expect("listed").expect("a snapshot");
        let bytes = log.read_snapshot(&pointer).expect("a sound snapshot");
        bytes.usage_hint() as u64
    };
    let mut bytes = std::fs::read(latest_snapshot()).expect("the snapshot");
    let hint = u64::from(u16::from_le_bytes([bytes[10], bytes[11]])) * UNIT;
    assert_eq!(hint_read(), hint);
    // At least what the usage holds; over it by less than a unit plus a line per block
    // (a box, a counter list and at most one ring per counter: under 8 blocks a key here).
    assert!(
        hint >= memory.usage_bytes,
        "hint {hint} < {}",
        memory.usage_bytes
    );
    assert!(
        hint < memory.usage_bytes + UNIT + USERS as u64 * 8 * 64,
        "hint {hint} for {} bytes",
        memory.usage_bytes
    );

    let engine = open_token_plan(dir.path(), sync_options());
    let report = engine.open_report().expect("an open's report");
    assert!(report.usage_warmed_bytes <= hint, "{report}");
    assert_same_state(
        &state(&engine, &key_names, &[], at_ms),
        &before,
        "with the hint",
    );
    engine.close().expect("close");

    // As an older build wrote it: no hint. Its checksum covers only the body, so it still opens.
    let snapshot = latest_snapshot();
    bytes = std::fs::read(&snapshot).expect("the snapshot");
    assert_ne!(
        &bytes[10..12],
        &[0, 0],
        "the close's snapshot has a hint too"
    );

    // A damaged hint (the largest there is: 128 GiB) warms no more than 64 bytes per byte of
    // the file, and changes nothing else.
    let sound = bytes.clone();
    bytes[10..12].copy_from_slice(&[0xFF, 0xFF]);
    std::fs::write(&snapshot, &bytes).expect("write the snapshot back");
    assert_eq!(hint_read(), 64 * bytes.len() as u64);
    let engine = open_token_plan(dir.path(), sync_options());
    let report = engine.open_report().expect("an open's report");
    assert!(
        report.usage_warmed_bytes <= 64 * bytes.len() as u64 + UNIT,
        "{report}"
    );
    assert_same_state(
        &state(&engine, &key_names, &[], at_ms),
        &before,
        "a damaged hint",
    );
    drop(engine);

    // As an older build wrote it: no hint.
    bytes = sound;
    bytes[10..12].copy_from_slice(&[0, 0]);
    std::fs::write(&snapshot, &bytes).expect("write the snapshot back");
    assert_eq!(latest_snapshot(), snapshot, "no snapshot since");
    assert_eq!(hint_read(), 0);
    let engine = open_token_plan(dir.path(), sync_options());
    let report = engine.open_report().expect("an open's report");
    assert_eq!(report.usage_warmed_bytes, 0, "{report}");
    assert_same_state(
        &state(&engine, &key_names, &[], at_ms),
        &before,
        "without the hint",
    );
}

/// A snapshot file is checked whole before anything is decoded from it, however it is read
/// (mapped on Linux): a flipped byte in its body, a body cut short, a header cut short, an
/// empty file and a newer format are each refused at open with an error naming the file,
/// and the refusal changes nothing on disk.
#[test]
fn a_damaged_snapshot_is_refused_at_open_naming_it_and_left_as_it_was() {
    let dir = TempDir::new("snapshot-damage");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.close().expect("close, with its checkpoint");
    let sound = std::fs::read(latest_snapshot(dir.path())).expect("the snapshot");
    assert!(sound.len() > 64, "{} bytes", sound.len());
    type Damage<'a> = (&'a str, &'a dyn Fn(&mut Vec<u8>), &'a str);
    let damages: [Damage; 5] = [
        (
            "body",
            &|bytes| *bytes.last_mut().unwrap() ^= 0x10,
            "damaged (crc mismatch)",
        ),
        (
            "short",
            &|bytes| bytes.truncate(bytes.len() - 7),
            "the file holds",
        ),
        ("header", &|bytes| bytes.truncate(20), "bad header"),
        ("empty", &|bytes| bytes.clear(), "bad header"),
        (
            "version",
            &|bytes| bytes[8] = bytes[8].wrapping_add(1),
            "format version",
        ),
    ];
    for (label, damage, expected) in damages {
        let copy = dir.sibling(label);
        copy_dir(dir.path(), copy.path());
        let path = latest_snapshot(copy.path());
        let mut bytes = sound.clone();
        damage(&mut bytes);
        std::fs::write(&path, &bytes).expect("write the damage");
        let error = Engine::open(copy.path(), Policy::token_plan(), clock(), sync_options())
            .expect_err(label);
        let problem = storage_problem(&error);
        assert!(problem.contains(expected), "{label}: {problem}");
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(problem.contains(name.as_ref()), "{label}: {problem}");
        assert_eq!(
            std::fs::read(&path).expect("the snapshot"),
            bytes,
            "{label}"
        );
    }
}

/// Rings a snapshot must restore as they were: a narrow bucket at its slot's maximum and at
/// the ring's head, then (after a swap to wider buckets merged two past what a narrow slot
/// holds) a wide ring. Each round trip through a checkpoint and a reopen reports the usage
/// it had, and `verify` finds the database sound, snapshot and tail (a policy other than the
/// token plan, swapped).
#[test]
fn rings_at_their_slot_maximum_and_reshaped_wide_survive_a_checkpoint_and_reopen() {
    let policy = |bucket: &str| {
        Policy::from_toml_str(&format!(
            r#"
time_zone = "UTC"
[resources.speech]
units = ["characters"]
[plans.P]
limits = [{{ resource = "speech", unit = "characters", amount = 60000, window = "rolling:5h", bucket = "{bucket}" }}]
"#
        ))
        .expect("a valid policy")
    };
    let dir = TempDir::new("rings-round-trip");
    let base = (T0_MS / 240_000 + 1) * 240_000;
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(base));
    let open = |bucket: &str| {
        Engine::open(dir.path(), policy(bucket), clock.clone(), sync_options()).expect("open")
    };
    let used = |engine: &Engine, at_ms: u64| {
        engine.usage("key-ada", Some(at_ms)).expect("usage").limits[0].used
    };
    let engine = open("80s");
    engine.create_user("ada", "key-ada", Some(base)).unwrap();
    engine.assign_seat("@ada", "ada", "P", Some(base)).unwrap();
    let request =
        UsageRequest::new("key-ada", "speech", &[(Unit::Characters, 60_000)]).at(base + 1);
    assert!(engine.consume(&request).unwrap().is_admitted());
    let add = |engine: &Engine, amount: u64, usage_at_ms: u64| {
        engine
            .adjust_usage(
                "key-ada",
                "speech",
                &[(Unit::Characters, amount)],
                usage_at_ms,
                tally_engine::AdjustmentDirection::Add,
                Some(usage_at_ms),
            )
            .expect("an addition");
    };
    // The head's bucket at a narrow slot's maximum.
    add(&engine, 5_535, base + 2);
    assert_eq!(used(&engine, base + 3), 65_535);
    engine.close().expect("close");
    let engine = open("80s");
    assert_eq!(used(&engine, base + 3), 65_535);
    // The next bucket, then wider buckets merging both: 95,535 in one bucket, wide.
    add(&engine, 30_000, base + 81_000);
    assert_eq!(used(&engine, base + 81_001), 95_535);
    engine.close().expect("close");
    let engine = open("240s");
    assert_eq!(used(&engine, base + 81_001), 95_535);
    engine.close().expect("close");
    let engine = open("240s");
    assert_eq!(used(&engine, base + 81_001), 95_535);
    drop(engine);
    let report = Engine::verify(dir.path(), sync_options()).expect("verify runs");
    assert!(report.problems.is_empty(), "{report:?}");
}

/// `verify` replays the events after the latest snapshot as an open does: on a database run
/// with options other than the defaults (two policy generations kept, four request ids, two
/// reservations), swapped between policies other than the token plan, checkpointed and
/// compacted, with events after the last snapshot, it finds nothing wrong, with the recorded
/// options as with the same options given.
#[test]
fn verify_finds_a_database_with_other_options_swapped_and_compacted_sound() {
    let policy = |amount: u64| {
        Policy::from_toml_str(&format!(
            r#"
time_zone = "UTC"
[resources.speech]
units = ["characters"]
[plans.P]
limits = [{{ resource = "speech", unit = "characters", amount = {amount}, window = "rolling:5h" }}]
"#
        ))
        .expect("a valid policy")
    };
    let mut options = sync_options();
    options.engine.max_policy_generations = 2;
    options.engine.idempotency_capacity = 4;
    options.engine.max_open_reservations = 2;
    options.checkpoint_every_events = 5;
    options.retention_ms = 1;
    options.segment_bytes = 256;
    // Its compaction mid-way is stamped a month ahead of the clock, to drop the segments
    // before it, and the rounds after it go on at their own times: no bound (opted out).
    options.engine.max_ahead_of_clock_ms = 0;
    let dir = TempDir::new("verify-other-options");
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine =
        Engine::open(dir.path(), policy(1_000), clock.clone(), options.clone()).expect("open");
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.assign_seat("@ada", "ada", "P", Some(T0_MS)).unwrap();
    for round in 0..6u64 {
        let at = T0_MS + round * HOUR_MS;
        engine
            .swap_policy(policy(1_000 + round), Some(at))
            .expect("a swap");
        for request in 0..3u64 {
            let id = format!("r{round}-{request}");
            let usage = UsageRequest::new("key-ada", "speech", &[(Unit::Characters, 7)])
                .at(at + request)
                .id(&id);
            let _ = engine.consume(&usage);
        }
        let reserve = UsageRequest::new("key-ada", "speech", &[(Unit::Characters, 5)]).at(at + 9);
        if let Ok(outcome) = engine.reserve(&reserve, Some(HOUR_MS)) {
            if let (Some(id), true) = (outcome.reservation, round % 2 == 0) {
                let _ = engine.void(id, Some(at + 10));
            }
        }
        if round == 3 {
            let report = engine.compact(Some(T0_MS + 30 * DAY_MS)).expect("compact");
            assert!(report.first_seq_kept > 1, "{report:?}");
        }
    }
    drop(engine);
    for use_recorded in [true, false] {
        let given = OpenOptions {
            use_recorded,
            ..options.clone()
        };
        let report = Engine::verify(dir.path(), given).expect("verify runs");
        assert!(report.problems.is_empty(), "{use_recorded}: {report:?}");
        assert!(report.snapshot_seq.is_some_and(|seq| seq < report.last_seq));
    }
}

/// A torn write at the log's tail (a crash before its flush) is what an open cuts off: `verify`,
/// which repairs nothing, reads up to it and replays the events before it, and finds the
/// database sound, as the open after it does.
#[test]
fn verify_finds_a_database_with_a_torn_tail_sound_as_an_open_does() {
    let (dir, _, frames) = closed_database("verify-torn-tail");
    let last = frames.last().expect("a record");
    let mut bytes = std::fs::read(&last.path).unwrap();
    // A frame header whose payload never made it to the disk.
    bytes.extend_from_slice(&64u32.to_le_bytes());
    bytes.extend_from_slice(&[0xAB, 0xCD]);
    std::fs::write(&last.path, bytes).unwrap();
    let report = Engine::verify(dir.path(), sync_options()).expect("verify runs");
    assert!(report.problems.is_empty(), "{report:?}");
    let engine = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect("an open cuts the torn write off");
    drop(engine);
}

/// A saved cursor that does not read back (not the 8 bytes of a sequence number) or points past
/// the log's last event (a cursor is saved only once the log is durable through it) is one of
/// `verify`'s problems, naming the cursor: reading after it fails, so a database holding it is
/// not sound. One a sound database holds is no problem, nor is one behind the log's start (a
/// reader that fell behind the retention: reading after it says so).
#[test]
fn verify_reports_a_cursor_that_cannot_be_read_after() {
    let (dir, _, _) = closed_database("verify-cursors");
    let engine = open_token_plan(dir.path(), sync_options());
    let last = last_seq(&engine);
    engine.save_cursor("billing", last).unwrap();
    engine.save_cursor("audit", 1).unwrap();
    drop(engine);
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    {
        let db = open_sled_retrying(dir.path());
        let cursors = db.open_tree("cursors").unwrap();
        cursors.insert("billing", &[0u8; 7]).unwrap();
        cursors.insert("audit", &(last + 1).to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    let problem = |name: &str| {
        report
            .problems
            .iter()
            .find(|problem| problem.contains(&format!("{name:?}")))
            .unwrap_or_else(|| panic!("{name} reported: {:?}", report.problems))
    };
    assert!(problem("billing").contains("holds 7 bytes"), "{report:?}");
    assert!(
        problem("audit").contains(&format!("past the log's last event, {last}")),
        "{report:?}"
    );
    // As the reads after them find.
    let engine = open_token_plan(dir.path(), sync_options());
    assert!(engine.cursor("billing").is_err());
    let after = engine.cursor("audit").unwrap();
    assert!(engine.events_after(after, 10).is_err());
}

/// A file in `snapshots/` whose name is a number but not a snapshot's (20 digits), such as an
/// operator's copy `7.snap` of the latest one, is no snapshot: it was read as one more at the
/// same event. Then the snapshot "before the latest" was the latest itself (compaction kept
/// nothing for `verify` to replay from it), and once checkpoints had moved on and removed the
/// real file of that event, every open and checkpoint failed reading a file that was gone.
#[test]
fn a_file_named_like_a_snapshot_but_not_one_is_left_alone() {
    let dir = TempDir::new("snapshot-stray-name");
    let engine = open_token_plan(dir.path(), sync_options());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    let mut micros = 0;
    let mut checkpoint = |engine: &Engine| {
        micros += 1;
        engine.top_up("@ann", micros, Some(T0_MS)).unwrap();
        engine.checkpoint().unwrap()
    };
    let latest = checkpoint(&engine);
    let copy = dir.path().join("snapshots").join(format!("{latest}.snap"));
    std::fs::copy(latest_snapshot(dir.path()), &copy).unwrap();
    for _ in 0..3 {
        checkpoint(&engine);
    }
    let balance = engine.credits_micros("@ann").unwrap();
    engine.close().unwrap();
    let verified = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(verified.problems.is_empty(), "{verified:?}");
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.credits_micros("@ann").unwrap(), balance);
    checkpoint(&engine);
    engine.close().unwrap();
    assert!(copy.exists(), "the operator's file is left as it was");
}

/// A record of when events were logged (`logged_by/<seq>` in `meta`) that does not read back
/// (not a time's 8 bytes) or names an event past the log's last (one is written only once the
/// log is durable through it) is one of `verify`'s problems, naming its event: the first made
/// every `compact` fail while `verify` called the database sound; the second would date the
/// events that take its number later as logged long before, and compaction would drop them
/// before a reader had the retention to read them.
#[test]
fn verify_reports_a_record_of_when_events_were_logged_that_is_damaged_or_past_the_end() {
    let (dir, _, _) = closed_database("verify-logged-by");
    let engine = open_token_plan(dir.path(), sync_options());
    let last = last_seq(&engine);
    // A close checkpoints, and records when the events up to its cut were logged.
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    let key = |seq: u64| {
        let mut key = b"logged_by/".to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        key
    };
    {
        let db = open_sled_retrying(dir.path());
        let meta = db.open_tree("meta").unwrap();
        let recorded: Vec<Vec<u8>> = meta
            .scan_prefix(b"logged_by/")
            .keys()
            .map(|key| key.unwrap().to_vec())
            .collect();
        assert!(recorded.contains(&key(last)), "the close recorded its cut");
        meta.insert(key(last), &[0u8; 3]).unwrap();
        meta.insert(key(last + 5), &0u64.to_le_bytes()).unwrap();
        db.flush().unwrap();
    }
    let report = Engine::verify(dir.path(), sync_options()).unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    let problem = |seq: u64| {
        report
            .problems
            .iter()
            .find(|problem| problem.contains(&format!("events up to {seq} were logged")))
            .unwrap_or_else(|| panic!("{seq} reported: {:?}", report.problems))
    };
    assert!(problem(last).contains("holds 3 bytes"), "{report:?}");
    assert!(
        problem(last + 5).contains(&format!("past the log's last event, {last}")),
        "{report:?}"
    );
    // As a compaction that comes to the damaged one finds, naming it too.
    let later_ms = POPULATED_MS + 400 * DAY_MS;
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(later_ms));
    let engine = Engine::open(dir.path(), Policy::token_plan(), clock, sync_options()).unwrap();
    // An event after the close's cut: the compaction's checkpoint is a new snapshot, and the
    // segments up to the close's cut are its to judge.
    engine.top_up(TEAMS[0], 1, Some(later_ms)).unwrap();
    let error = engine.compact(None).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&format!("events up to {last} were logged")),
        "{error}"
    );
}

/// Where `path`'s records end (read with the documented framing, up to zeros or the end).
fn records_end(frames: &[Frame], path: &std::path::Path) -> usize {
    frames
        .iter()
        .rfind(|frame| frame.path == path)
        .map_or(SEGMENT_HEADER, |frame| frame.offset + 8 + frame.len)
}

/// `Sync` writes its groups over zeros written ahead of them, so that most fdatasyncs have
/// only data to flush, not the file's new length (a journal commit). While the engine runs,
/// its last segment goes on in zeros past its last record; a crash image of it (the directory
/// copied as it is) opens with every acknowledged event, writes the next ones over the zeros
/// and keeps them through a reopen. A sealed segment, and the last one once the engine is
/// closed, end at their last record.
#[test]
fn sync_writes_over_zeros_written_ahead_and_only_a_running_last_segment_ends_in_them() {
    let dir = TempDir::new("zeros-ahead");
    let options = OpenOptions {
        segment_bytes: 16 << 10,
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    populate(&engine);
    let one = [(Unit::Requests, 1)];
    for step in 0..400u64 {
        let request = UsageRequest::new("key-bob", "m2.7", &one).at(POPULATED_MS + step);
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    let acknowledged = last_seq(&engine);
    let before = state(&engine, &KEYS, &TEAMS, POPULATED_MS + 1_000);
    let paths = segment_paths(dir.path());
    assert!(paths.len() >= 3, "{} segments", paths.len());
    let (active, sealed) = paths.split_last().unwrap();
    let frames = frames_of(dir.path());
    for path in sealed {
        let len = std::fs::metadata(path).unwrap().len() as usize;
        assert_eq!(
            len,
            records_end(&frames, path),
            "{}: sealed",
            path.display()
        );
    }
    let bytes = std::fs::read(active).unwrap();
    let end = records_end(&frames, active);
    assert!(
        bytes.len() > end,
        "no zeros past the records of the running segment"
    );
    assert!(bytes[end..].iter().all(|&byte| byte == 0));
    // A crash now: the files as they are.
    let crashed = dir.sibling("zeros-ahead-crashed");
    copy_dir(dir.path(), crashed.path());
    let reopened = open_token_plan(crashed.path(), options.clone());
    assert_eq!(last_seq(&reopened), acknowledged);
    assert_same_state(
        &state(&reopened, &KEYS, &TEAMS, POPULATED_MS + 1_000),
        &before,
        "the crash image",
    );
    reopened.top_up("@ada", 7, Some(POPULATED_MS)).unwrap();
    let credits = reopened.credits_micros("@ada").unwrap();
    drop(reopened);
    let reopened = open_token_plan(crashed.path(), options.clone());
    assert_eq!(last_seq(&reopened), acknowledged + 1);
    assert_eq!(reopened.credits_micros("@ada").unwrap(), credits);
    drop(reopened);
    let report = Engine::verify(crashed.path(), options.clone()).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    // Closed: the last segment ends at its last record.
    engine.close().unwrap();
    let frames = frames_of(dir.path());
    for path in segment_paths(dir.path()) {
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        assert_eq!(
            len,
            records_end(&frames, &path),
            "{}: closed",
            path.display()
        );
    }
}

/// Zeros from a record's start to the end of the file are the end of the log only where
/// nothing shows its events were durable. Where a clean close (or a snapshot) found the log
/// durable through them, the records there were acknowledged: zeros in their place are damage,
/// refused naming the segment, offset and event, with nothing cut off, and `verify` reports
/// them, as for any other bad record. (Written ahead by the `Sync` writer, zeros read as the
/// end of the log whatever `durable_through` said, so this refusal came only later, as "the log
/// ends at event N before event M, which a clean close found durable", naming no offset, and
/// `verify` failed to run instead of reporting it.)
#[test]
fn zeros_where_a_clean_close_found_the_log_durable_are_damage() {
    let (dir, _, frames) = closed_database("zeros-over-durable");
    let last = frames.last().unwrap().clone();
    let acknowledged = last.first + last.count - 1;
    let mut bytes = std::fs::read(&last.path).unwrap();
    assert_eq!(bytes.len(), last.offset + 8 + last.len, "the last record");
    bytes.truncate(last.offset);
    bytes.resize(last.offset + 8 + last.len + 4096, 0);
    std::fs::write(&last.path, &bytes).unwrap();
    let error = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options())
        .expect_err("damage, not the end of the log");
    let problem = storage_problem(&error);
    assert_names_where(problem, &last);
    assert!(
        problem.contains(&format!(
            "a clean close found the log durable through event {acknowledged}"
        )),
        "{problem}"
    );
    assert_eq!(std::fs::read(&last.path).unwrap(), bytes, "nothing cut off");
    let report = Engine::verify(dir.path(), sync_options()).expect("verify runs");
    assert!(!report.is_sound(), "verify reports it");
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.contains(&format!("offset {}", last.offset))),
        "{:?}",
        report.problems
    );
}

/// What a reopen from a snapshot cut under load must still remember, beyond the counters and
/// balances `state` compares: every request id the threads were told was admitted or denied
/// (first through `consume`, `submit` + `complete` or a `consume_many` of several chunks) is a
/// replay after the reopen, answering the decision the engine remembered before it (renamed by
/// the policy swaps racing the cuts, which renumber the plans), every reservation they were
/// told is open can still be voided, and the exporter's cursor is where it was last saved.
/// Snapshots are cut back to back (explicit) and every 50 events (automatic) while the threads
/// run; the engine is dropped without `close`. (`verify` compares a snapshot with a replay of
/// the log, both made from the cut; this compares the live engine with the reopened one.)
#[test]
fn ids_and_open_reservations_acknowledged_under_checkpoints_are_remembered_after_a_reopen() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    for run in 0..6u64 {
        let sync = run % 2 == 0;
        let context = format!("run {run} ({})", if sync { "sync" } else { "no sync" });
        let dir = TempDir::new("ids-racing-checkpoints");
        let options = OpenOptions {
            durability: if sync {
                Durability::Sync
            } else {
                Durability::None
            },
            checkpoint_every_events: 50,
            ..OpenOptions::default()
        };
        let engine = open_token_plan(dir.path(), options.clone());
        let (_, keys, teams) = racing_world(&engine, 8, |index| (index % 2 == 0).then_some("Plus"));
        let at = |step: u64| T0_MS + HOUR_MS + step * 20;
        let rounds: u64 = if sync { 1 } else { 4 };
        let running = AtomicBool::new(true);
        let (ids, open, cursor) = std::thread::scope(|scope| {
            let (engine, keys, running, context) = (&engine, &keys, &running, &context);
            let singles = scope.spawn(move || {
                let _stops_the_others = StoreOnDrop(running, false);
                let mut acknowledged = Vec::new();
                for step in 0..200 * rounds {
                    let key = &keys[(step as usize * 3) % keys.len()];
                    let id = format!("single-{run}-{step}");
                    let request = UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)])
                        .at(at(step))
                        .id(&id);
                    let (decision, replayed) = if step % 2 == 0 {
                        engine.consume_noting_replay(&request).expect("consume")
                    } else {
                        engine
                            .submit(&request)
                            .expect("submit")
                            .complete()
                            .expect("complete")
                    };
                    assert!(!replayed, "{context}: {id} is new");
                    acknowledged.push((key.clone(), id, at(step), decision));
                }
                acknowledged
            });
            let batches = scope.spawn(move || {
                let _stops_the_others = StoreOnDrop(running, false);
                let mut acknowledged = Vec::new();
                for round in 0..6 * rounds {
                    let ids: Vec<String> = (0..150)
                        .map(|index| format!("many-{run}-{round}-{index}"))
                        .collect();
                    let requests: Vec<UsageRequest<'_>> = ids
                        .iter()
                        .enumerate()
                        .map(|(index, id)| {
                            let key = &keys[(index + round as usize) % keys.len()];
                            UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)])
                                .at(at(round * 30))
                                .id(id)
                        })
                        .collect();
                    let (results, replays) = engine.consume_many_noting_replay(&requests);
                    for ((request, result), replayed) in requests.iter().zip(results).zip(replays) {
                        let decision = result.expect("consume_many");
                        assert!(!replayed, "{context}: {:?} is new", request.request_id);
                        acknowledged.push((
                            request.key.to_string(),
                            request.request_id.unwrap_or_default().to_string(),
                            at(round * 30),
                            decision,
                        ));
                    }
                }
                acknowledged
            });
            let reservations = scope.spawn(move || {
                let _stops_the_others = StoreOnDrop(running, false);
                let mut open = Vec::new();
                for step in 0..120 * rounds {
                    let key = &keys[(step as usize * 5) % keys.len()];
                    let request =
                        UsageRequest::new(key, "m2.7", &[(Unit::Requests, 2)]).at(at(step));
                    let outcome = engine.reserve(&request, Some(DAY_MS)).expect("reserve");
                    let Some(reservation) = outcome.reservation else {
                        continue;
                    };
                    match step % 3 {
                        0 => {
                            engine
                                .settle(reservation, &[(Unit::Requests, 1)], Some(at(step)))
                                .expect("settle");
                        }
                        1 => engine.void(reservation, Some(at(step))).expect("void"),
                        _ => open.push(reservation),
                    }
                }
                open
            });
            scope.spawn(move || {
                while running.load(Relaxed) {
                    engine.checkpoint().expect("checkpoint");
                }
            });
            // Policy swaps renumber the plans (one named before every other comes and goes)
            // and so rename every remembered decision.
            scope.spawn(move || {
                let mut renumbered = Policy::token_plan().document().clone();
                let starter = renumbered.plans["Starter"].clone();
                renumbered.plans.insert("Aardvark".into(), starter);
                let mut step = 0;
                while running.load(Relaxed) {
                    let policy = if step % 20 == 0 {
                        Policy::compile(renumbered.clone()).expect("a valid policy")
                    } else {
                        Policy::token_plan()
                    };
                    engine.swap_policy(policy, Some(at(step))).expect("swap");
                    step += 10;
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            });
            // An exporter reading the log and saving its cursor as it goes.
            let exporter = scope.spawn(move || {
                let mut cursor = 0;
                while running.load(Relaxed) {
                    let events = engine.events_after(cursor, 100).expect("read the log");
                    if let Some(last) = events.last() {
                        engine.save_cursor("exporter", last.seq).expect("save");
                        cursor = last.seq;
                    }
                }
                cursor
            });
            let mut ids = singles.join().expect("no panic");
            ids.extend(batches.join().expect("no panic"));
            let open = reservations.join().expect("no panic");
            (ids, open, exporter.join().expect("no panic"))
        });
        let key_names: Vec<&str> = keys.iter().map(String::as_str).collect();
        let team_names: Vec<&str> = teams.iter().map(String::as_str).collect();
        let end_ms = at(10_000);
        let before = state(&engine, &key_names, &team_names, end_ms);
        let repeat = |engine: &Engine, (key, id, at_ms, _): &(String, String, u64, Decision)| {
            let request = UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)])
                .at(*at_ms)
                .id(id);
            let (decision, replayed) = engine.check_noting_replay(&request).expect("check");
            assert!(replayed, "{context}: {id} forgotten");
            decision
        };
        let remembered: Vec<Decision> = ids.iter().map(|id| repeat(&engine, id)).collect();
        drop(engine);
        let report = Engine::verify(dir.path(), options.clone()).expect("verify");
        assert!(report.is_sound(), "{context}: {:?}", report.problems);
        let reopened =
            Engine::open_with_stored_policy(dir.path(), Policy::token_plan(), clock(), options)
                .expect("reopen with the policy last swapped in");
        let after = state(&reopened, &key_names, &team_names, end_ms);
        assert_same_state(&after, &before, &format!("{context}: reopened"));
        for (acknowledged, remembered) in ids.iter().zip(&remembered) {
            let (_, id, _, decision) = acknowledged;
            let again = repeat(&reopened, acknowledged);
            assert_eq!(&again, remembered, "{context}: {id} after the reopen");
            assert_eq!(
                again.is_admitted(),
                decision.is_admitted(),
                "{context}: {id}"
            );
        }
        assert_eq!(
            reopened.cursor("exporter").expect("cursor"),
            cursor,
            "{context}: the cursor last saved"
        );
        assert_eq!(reopened.open_reservations(), open.len(), "{context}");
        for reservation in open {
            reopened
                .void(reservation, Some(end_ms))
                .unwrap_or_else(|error| panic!("{context}: {reservation:?}: {error}"));
        }
    }
}

/// A revoked key stays revoked across a reopen that replays its event and one that restores a
/// snapshot, and so does the new key a member was given in its place; `verify` finds the
/// snapshot equal to a replay.
#[test]
fn a_revoked_key_and_its_replacement_survive_replay_and_snapshot() {
    let dir = TempDir::new("revoked-key");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    let at = Some(POPULATED_MS);
    assert_eq!(engine.revoke_key("key-bob-acme", at), Ok(true));
    engine
        .add_member("acme", "bob", "key-bob-acme-2", at)
        .expect("a new key in its place");
    engine
        .assign_seat("acme", "bob", "Plus", at)
        .expect("a seat on the new key");
    assert_eq!(engine.revoke_key("payg-dee", at), Ok(true));
    let keys: Vec<&str> = KEYS.iter().copied().chain(["key-bob-acme-2"]).collect();
    let before = state(&engine, &keys, &TEAMS, POPULATED_MS);
    let revoked = |engine: &Engine| -> Vec<bool> {
        ["key-bob-acme", "key-bob-acme-2", "payg-dee", "key-ada"]
            .iter()
            .map(|key| engine.usage(key, at).expect(key).revoked)
            .collect()
    };
    assert_eq!(revoked(&engine), [true, false, true, false]);
    let denied_on = |engine: &Engine, key: &str| {
        let request = UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)]).at(POPULATED_MS);
        match engine.check(&request).expect("check") {
            Decision::Denied(denial) => denial.reason == DenialReason::KeyRevoked,
            Decision::Admitted(_) => false,
        }
    };
    drop(engine);
    // Replayed from the log (no checkpoint since the revocations).
    let engine = open_token_plan(dir.path(), sync_options());
    assert!(engine.open_report().unwrap().events_replayed > 0);
    assert_same_state(
        &state(&engine, &keys, &TEAMS, POPULATED_MS),
        &before,
        "replayed",
    );
    assert_eq!(revoked(&engine), [true, false, true, false]);
    assert!(denied_on(&engine, "key-bob-acme") && !denied_on(&engine, "key-bob-acme-2"));
    engine.close().expect("close: a checkpoint");
    let report = Engine::verify(dir.path(), sync_options()).expect("verify");
    assert!(report.is_sound(), "{:?}", report.problems);
    // Restored from the snapshot.
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(engine.open_report().unwrap().events_replayed, 0);
    assert_same_state(
        &state(&engine, &keys, &TEAMS, POPULATED_MS),
        &before,
        "restored",
    );
    assert_eq!(revoked(&engine), [true, false, true, false]);
    assert!(denied_on(&engine, "payg-dee") && !denied_on(&engine, "key-ada"));
}

/// A database of format 4 (before keys could be revoked) opens to the same state, and is
/// written in format 5 from then on.
#[test]
fn a_database_of_format_4_opens_and_is_written_in_format_5() {
    let dir = TempDir::new("format-4");
    let engine = open_token_plan(dir.path(), sync_options());
    populate(&engine);
    engine.close().expect("close");
    let before = {
        let engine = open_token_plan(dir.path(), sync_options());
        let state = state(&engine, &KEYS, &TEAMS, POPULATED_MS);
        drop(engine);
        state
    };
    // Format 4's snapshot body is format 5's without its last field, the list of revoked
    // keys (empty here: one varint byte, 0), and says version 4 (its first varint byte).
    let snapshots = std::fs::read_dir(dir.path().join("snapshots")).unwrap();
    for entry in snapshots {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let mut body = bytes[32..].to_vec();
        assert_eq!((body[0], body.last()), (5, Some(&0)));
        body.pop();
        body[0] = 4;
        let mut file = bytes[..32].to_vec();
        file[8..10].copy_from_slice(&4u16.to_le_bytes());
        file[20..28].copy_from_slice(&(body.len() as u64).to_le_bytes());
        file[28..32].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        file.extend(body);
        std::fs::write(&path, file).unwrap();
    }
    {
        let db = open_sled_retrying(dir.path());
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &4u16.to_le_bytes()).unwrap();
        db.flush().unwrap();
    }
    let report = Engine::verify(dir.path(), sync_options()).expect("verify");
    assert!(report.is_sound(), "{:?}", report.problems);
    let engine = open_token_plan(dir.path(), sync_options());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, POPULATED_MS),
        &before,
        "format 4",
    );
    assert_eq!(engine.revoke_key("key-cy", Some(POPULATED_MS)), Ok(true));
    engine.close().expect("close");
    assert_eq!(format_version(dir.path()), 5);
    let engine = open_token_plan(dir.path(), sync_options());
    assert!(engine.usage("key-cy", Some(POPULATED_MS)).unwrap().revoked);
}

/// A `consume_many` racing a revocation of its key: every usage the log holds for the key
/// comes before the revocation's event. A chunk decided before the revocation (the key not yet
/// revoked) and appended after it left admitted usage after `key_revoked` in the log, which an
/// export reader took for usage the revoked key was let through.
#[test]
fn a_batch_racing_a_revocation_logs_its_usage_before_the_revocation() {
    let dir = TempDir::new("batch-revoked");
    let options = OpenOptions {
        durability: Durability::None,
        ..OpenOptions::default()
    };
    let engine = std::sync::Arc::new(open_token_plan(dir.path(), options));
    let one = [(Unit::Requests, 1)];
    let mut after_revocation = Vec::new();
    for round in 0..40u64 {
        let (user, key) = (format!("racer-{round}"), format!("payg-racer-{round}"));
        engine
            .create_user(&user, &format!("key-{user}"), Some(T0_MS))
            .expect("user");
        engine
            .create_payg_key(&user, &key, Some(T0_MS))
            .expect("payg key");
        let batcher = {
            let (engine, key) = (std::sync::Arc::clone(&engine), key.clone());
            std::thread::spawn(move || loop {
                let requests: Vec<UsageRequest<'_>> = (0..512)
                    .map(|_| UsageRequest::new(&key, "m2.7", &one).at(T0_MS))
                    .collect();
                // Until the revocation denies (anything else ends it too, and fails below).
                let results = engine.consume_many(&requests);
                if let Some(other) = results
                    .into_iter()
                    .find(|result| !matches!(result, Ok(decision) if decision.is_admitted()))
                {
                    return other;
                }
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(engine.revoke_key(&key, Some(T0_MS)), Ok(true));
        match batcher.join().expect("the batcher") {
            Ok(Decision::Denied(denial)) if denial.reason == DenialReason::KeyRevoked => {}
            other => panic!("the batch ended with {other:?}"),
        }
        engine.sync().expect("sync");
        let events = engine.events_after(0, usize::MAX).expect("read");
        let revoked_at = events
            .iter()
            .position(|event| matches!(&event.body, EventBody::KeyRevoked { key: k } if *k == key))
            .expect("the revocation is logged");
        let late = events[revoked_at..]
            .iter()
            .filter(
                |event| matches!(&event.body, EventBody::UsageAdmitted { key: k, .. } if *k == key),
            )
            .count();
        if late > 0 {
            after_revocation.push((round, late));
        }
    }
    assert!(
        after_revocation.is_empty(),
        "(round, usage events after the revocation): {after_revocation:?}"
    );
}

/// Two log segments whose events overlap (the first holds the second's events too, as a
/// segment copied from another log or put back from a backup would): the open refuses the
/// database and `verify` reports it, each saying the segments overlap, naming both and their
/// events, not that events are missing (none is: some are there twice). Both said events were
/// missing, or that there was a gap.
#[test]
fn an_open_and_verify_say_that_overlapping_segments_overlap_not_that_events_are_missing() {
    let dir = TempDir::new("overlapping-segments");
    let options = OpenOptions {
        segment_bytes: 512,
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    populate(&engine);
    drop(engine);
    let paths = segment_paths(dir.path());
    assert!(paths.len() >= 3, "the second segment is sealed: {paths:?}");
    let frames = frames_of(dir.path());
    let of_second: Vec<&Frame> = frames.iter().filter(|f| f.path == paths[1]).collect();
    let first_of_second = of_second.first().expect("a record").first;
    let last_of_second = of_second
        .last()
        .map(|frame| frame.first + frame.count - 1)
        .expect("a record");
    // The first segment goes on with the second's records (sealed: no zeros after its own).
    let mut grown = std::fs::read(&paths[0]).unwrap();
    grown.extend_from_slice(&std::fs::read(&paths[1]).unwrap()[SEGMENT_HEADER..]);
    std::fs::write(&paths[0], &grown).unwrap();
    let name = |path: &std::path::PathBuf| path.file_name().unwrap().to_string_lossy().into_owned();
    let says_they_overlap = |problem: &str| {
        problem.contains("overlap")
            && problem.contains(&format!(
                "{} (events 1 to {last_of_second})",
                name(&paths[0])
            ))
            && problem.contains(&format!(
                "{} (from event {first_of_second})",
                name(&paths[1])
            ))
            && problem.contains(&format!(
                "events {first_of_second} to {last_of_second} are in both"
            ))
            && !problem.contains("missing")
    };
    let error = open_result(dir.path(), options.clone()).expect_err("overlapping segments");
    assert!(says_they_overlap(storage_problem(&error)), "{error}");
    let report = Engine::verify(dir.path(), options).expect("verify reports");
    assert!(!report.is_sound());
    assert!(
        report
            .problems
            .iter()
            .any(|problem| says_they_overlap(problem)),
        "{:?}",
        report.problems
    );
    assert!(
        !report
            .problems
            .iter()
            .any(|problem| problem.contains("missing") || problem.contains("a gap")),
        "no event is missing: {:?}",
        report.problems
    );
    assert_eq!(std::fs::read(&paths[0]).unwrap(), grown, "nothing changed");
}
