//! Reservations raced and reopened: a settle, a void and an expiry of one reservation racing each
//! other and a consume on the same key (a plan-quota hold) or on another key of the same team
//! (a credits hold); the per-key cap on open reservations under concurrent reserves and after
//! each way of closing; and a database reopened with reservations open.
//!
//! What must hold whatever the interleaving:
//! - a reservation is closed once: exactly one of the settle, the void and the expiry wins, and
//!   the others answer that it is closed (a void after an expiry or a void is a no-op);
//! - the key's counters and the team's credits hold exactly what was admitted: a settled
//!   reservation's actual amount, a consume's; nothing of a voided or expired hold;
//! - once every reservation is closed, the key has no reservation slot taken;
//! - a reopened database holds the same, its open reservations' holds restored exactly; they
//!   still expire, and a settle before the reopen answers the same after it.

mod log_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use log_support::{TempDir, DAY_MS, T0_MS};
use tally_engine::{
    ChargedTo, Decision, DenialReason, Durability, Engine, Error, ManualClock, OpenOptions, Policy,
    ReservationId, SettleOutcome, Unit, UsageRequest,
};

/// m2.7's price per request in micro-credits (the token plan's).
const REQUEST_MICROS: u64 = 2_000;

fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Engine {
    let options = OpenOptions {
        durability: Durability::Sync,
        ..OpenOptions::default()
    };
    Engine::open(dir, Policy::token_plan(), clock.clone(), options).expect("open")
}

/// What one racer's call answered, in a form the round can compare.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Settled,
    Voided,
    Expired,
    Closed(&'static str),
    NoOp,
}

fn closed_state(error: Error) -> &'static str {
    match error {
        Error::ReservationClosed { state, .. } => state,
        other => panic!("expected the reservation closed, got {other:?}"),
    }
}

/// The `usage-bar` counts of a Bar-Plus key: (5-hour window, weekly).
fn bar_used(engine: &Engine, key: &str, at_ms: u64) -> (u64, u64) {
    let report = engine.usage(key, Some(at_ms)).expect("usage");
    assert_eq!(report.limits.len(), 2, "{report:?}");
    (report.limits[0].used, report.limits[1].used)
}

/// Runs each of `steps` on a thread of its own, all let go together at a barrier, and returns
/// once every one has finished.
fn race(steps: &[&(dyn Fn() + Sync)]) {
    let barrier = Barrier::new(steps.len());
    std::thread::scope(|scope| {
        for step in steps {
            let barrier = &barrier;
            scope.spawn(move || {
                barrier.wait();
                step();
            });
        }
    });
}

/// A settle, a void and an expiry of one plan-quota reservation race each other and a consume
/// on the same key, 120 rounds (logged, `Sync`): one of them closes it, the key's usage bar
/// holds exactly the settled amounts and the consumes, no reservation slot stays taken, a
/// repeated settle answers the first settlement, and the reopened database holds the same.
#[test]
fn a_settle_a_void_and_an_expiry_racing_close_a_plan_hold_once_and_count_only_what_was_settled() {
    const ROUNDS: u64 = 120;
    const HELD: [(Unit, u64); 1] = [(Unit::Requests, 5)];
    const ACTUAL: [(Unit, u64); 1] = [(Unit::Requests, 2)];
    const CONSUMED: [(Unit, u64); 1] = [(Unit::Requests, 1)];
    const LEASE_MS: u64 = 5;
    let dir = TempDir::new("resv-race-plan");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = open(dir.path(), &clock);
    engine.create_user("u", "tp-u", Some(T0_MS)).expect("user");
    engine
        .assign_seat("@u", "u", "Bar-Plus", Some(T0_MS))
        .expect("seat");
    let mut expected_micros = 0;
    let mut wins = [0u32; 3];
    for round in 0..ROUNDS {
        let at_ms = T0_MS + round * 10;
        let request = UsageRequest::new("tp-u", "m2.7", &HELD).at(at_ms);
        let reserved = engine.reserve(&request, Some(LEASE_MS)).expect("reserve");
        let id = reserved.reservation.expect("the bar has room");
        let answers: Mutex<Vec<Answer>> = Mutex::default();
        let consumed = AtomicU64::new(0);
        let settle = || {
            let answer = match engine.settle(id, &ACTUAL, Some(at_ms)) {
                Ok(SettleOutcome::Settled(settlement)) => {
                    assert_eq!(settlement.released.get(Unit::Requests), 3);
                    assert_eq!(settlement.extra, None);
                    Answer::Settled
                }
                Ok(SettleOutcome::Denied(denial)) => panic!("a settle for less: {denial:?}"),
                Err(error) => Answer::Closed(closed_state(error)),
            };
            answers.lock().unwrap().push(answer);
        };
        let void = || {
            let answer = match engine.void(id, Some(at_ms)) {
                Ok(()) => Answer::Voided,
                Err(error) => Answer::Closed(closed_state(error)),
            };
            answers.lock().unwrap().push(answer);
        };
        let expire = || {
            let expired = engine
                .expire_reservations(Some(at_ms + LEASE_MS))
                .expect("expire");
            answers.lock().unwrap().push(match expired {
                1 => Answer::Expired,
                0 => Answer::NoOp,
                n => panic!("{n} expired with one open"),
            });
        };
        let consume = || {
            let request = UsageRequest::new("tp-u", "m2.7", &CONSUMED).at(at_ms);
            match engine.consume(&request).expect("consume") {
                Decision::Admitted(admission) => {
                    assert!(matches!(admission.charged_to, ChargedTo::PlanQuota { .. }));
                    consumed.fetch_add(REQUEST_MICROS, Ordering::Relaxed);
                }
                Decision::Denied(denial) => panic!("the bar has room: {denial:?}"),
            }
        };
        let checkpoint = || {
            engine.checkpoint().expect("checkpoint");
        };
        // Every fourth round a checkpoint's cut races them too.
        match round % 4 == 3 {
            true => race(&[&settle, &void, &expire, &consume, &checkpoint]),
            false => race(&[&settle, &void, &expire, &consume]),
        }
        let answers = answers.into_inner().unwrap();
        let settled = answers.contains(&Answer::Settled);
        let voided = answers.contains(&Answer::Voided);
        let expired = answers.contains(&Answer::Expired);
        // A void after a void or an expiry is a no-op (`Voided` here) and an expiry that
        // found nothing open is `NoOp`: exactly one real close, told by the settle's answer
        // and the expiry's count.
        let closes = [settled, expired, voided && !expired].map(u32::from);
        assert_eq!(closes.iter().sum::<u32>(), 1, "round {round}: {answers:?}");
        for (win, close) in wins.iter_mut().zip(closes) {
            *win += close;
        }
        if settled {
            assert!(answers.contains(&Answer::Closed("settled")), "{answers:?}");
            expected_micros += 2 * REQUEST_MICROS;
            let again = engine.settle(id, &ACTUAL, Some(at_ms)).expect("again");
            assert!(matches!(again, SettleOutcome::Settled(_)), "{again:?}");
        } else {
            let state = closed_state(engine.settle(id, &ACTUAL, Some(at_ms)).unwrap_err());
            assert!(state == "voided" || state == "expired", "{state}");
        }
        expected_micros += consumed.into_inner();
        assert_eq!(
            bar_used(&engine, "tp-u", at_ms),
            (expected_micros, expected_micros),
            "round {round}: {answers:?}"
        );
        assert_eq!(engine.open_reservations(), 0);
        let report = engine.usage("tp-u", Some(at_ms)).expect("usage");
        assert_eq!(report.open_reservations, 0, "round {round}: {answers:?}");
    }
    eprintln!("settled / expired / voided first: {wins:?}");
    let at_ms = T0_MS + ROUNDS * 10;
    let before = engine.usage("tp-u", Some(at_ms)).expect("usage");
    // A crash now (a copy of the files while the engine runs: every event is durable) and a
    // clean close replay to the same.
    let crashed = dir.sibling("crashed");
    log_support::copy_dir(dir.path(), crashed.path());
    drop(engine);
    for path in [crashed.path(), dir.path()] {
        let engine = open(path, &clock);
        assert_eq!(engine.usage("tp-u", Some(at_ms)).expect("usage"), before);
        assert_eq!(engine.open_reservations(), 0);
    }
}

/// A settle for more than a credits hold (the extra paid with credits), a void and an expiry
/// race each other while another key of the team takes its credits, 120 rounds (logged): the
/// balance is always the top-ups less exactly what was admitted (a settle's actual price, a
/// consume's), never below zero, and the reopened database agrees.
#[test]
fn a_settle_for_more_a_void_and_an_expiry_racing_a_teammate_charge_the_team_exactly() {
    const ROUNDS: u64 = 120;
    const HELD: [(Unit, u64); 1] = [(Unit::Requests, 3)];
    const ACTUAL: [(Unit, u64); 1] = [(Unit::Requests, 5)];
    const CONSUMED: [(Unit, u64); 1] = [(Unit::Requests, 1)];
    const LEASE_MS: u64 = 5;
    let dir = TempDir::new("resv-race-credits");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = open(dir.path(), &clock);
    engine.create_team("crew", Some(T0_MS)).expect("team");
    for user in ["a", "b"] {
        engine
            .create_user(user, &format!("own-{user}"), Some(T0_MS))
            .expect("user");
        engine
            .add_member("crew", user, &format!("crew-{user}"), Some(T0_MS))
            .expect("member");
    }
    let mut topped_up = 0;
    let mut charged = 0;
    for round in 0..ROUNDS {
        let at_ms = T0_MS + round * 10;
        // Enough for the hold and, some rounds, the settle's extra or the teammate's request.
        let top_up = (3 + round % 4) * REQUEST_MICROS;
        engine.top_up("crew", top_up, Some(at_ms)).expect("top-up");
        topped_up += top_up;
        let request = UsageRequest::new("crew-a", "m2.7", &HELD).at(at_ms);
        let reserved = engine.reserve(&request, Some(LEASE_MS)).expect("reserve");
        let Some(id) = reserved.reservation else {
            continue;
        };
        let settled = AtomicU64::new(0);
        let consumed = AtomicU64::new(0);
        let closes = AtomicU64::new(0);
        race(&[
            &|| match engine.settle(id, &ACTUAL, Some(at_ms)) {
                Ok(SettleOutcome::Settled(settlement)) => {
                    assert_eq!(
                        settlement.extra,
                        Some(ChargedTo::Credits {
                            micros: 2 * REQUEST_MICROS
                        })
                    );
                    settled.store(5 * REQUEST_MICROS, Ordering::Relaxed);
                    closes.fetch_add(1, Ordering::Relaxed);
                }
                // The extra did not fit: still open, for the void or the expiry.
                Ok(SettleOutcome::Denied(_)) => {}
                Err(error) => {
                    closed_state(error);
                }
            },
            &|| {
                if let Err(error) = engine.void(id, Some(at_ms)) {
                    assert_eq!(closed_state(error), "settled");
                }
            },
            &|| {
                let expired = engine
                    .expire_reservations(Some(at_ms + LEASE_MS))
                    .expect("expire");
                closes.fetch_add(expired as u64, Ordering::Relaxed);
            },
            &|| {
                let request = UsageRequest::new("crew-b", "m2.7", &CONSUMED).at(at_ms);
                if let Decision::Admitted(admission) = engine.consume(&request).expect("consume") {
                    assert_eq!(
                        admission.charged_to,
                        ChargedTo::Credits {
                            micros: REQUEST_MICROS
                        }
                    );
                    consumed.fetch_add(REQUEST_MICROS, Ordering::Relaxed);
                }
            },
        ]);
        // The void may have closed it too (not counted in `closes`); whatever is left open
        // (a settle denied, the void and the expiry after it... never: the expiry ends it).
        assert_eq!(engine.open_reservations(), 0, "round {round}");
        assert!(closes.into_inner() <= 1, "round {round}: closed twice");
        charged += settled.into_inner() + consumed.into_inner();
        assert_eq!(
            engine.credits_micros("crew").expect("credits"),
            topped_up - charged,
            "round {round}"
        );
    }
    let at_ms = T0_MS + ROUNDS * 10;
    let reports = ["crew-a", "crew-b"].map(|key| engine.usage(key, Some(at_ms)).expect("usage"));
    assert_eq!(reports[0].credits_charged_micros, charged);
    drop(engine);
    let engine = open(dir.path(), &clock);
    assert_eq!(
        ["crew-a", "crew-b"].map(|key| engine.usage(key, Some(at_ms)).expect("usage")),
        reports
    );
    assert_eq!(
        engine.credits_micros("crew").expect("credits"),
        topped_up - charged
    );
}

/// Eight threads reserve at once on a Bar-Plus key (4 agents), 60 rounds: exactly four are
/// admitted and the others refused as too many; then each closes its own, one round by a
/// settle, the next by a void, the next by its lease's end, and the next round has all four
/// slots again.
#[test]
fn concurrent_reserves_fill_the_open_reservation_cap_exactly_and_every_close_frees_its_slot() {
    const THREADS: usize = 8;
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::new(Policy::token_plan(), clock.clone(), Default::default()).unwrap();
    engine.create_user("u", "tp-u", Some(T0_MS)).expect("user");
    engine
        .assign_seat("@u", "u", "Bar-Plus", Some(T0_MS))
        .expect("seat");
    let one = [(Unit::Requests, 1)];
    for round in 0..60u64 {
        let at_ms = T0_MS + round * 1_000;
        clock.set_ms(at_ms);
        let barrier = Barrier::new(THREADS);
        let ids: Mutex<Vec<ReservationId>> = Mutex::default();
        let refused = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                let (engine, barrier, ids, refused) = (&engine, &barrier, &ids, &refused);
                scope.spawn(move || {
                    let request = UsageRequest::new("tp-u", "m2.7", &one).at(at_ms);
                    barrier.wait();
                    let reserved = engine.reserve(&request, Some(500)).expect("reserve");
                    match (reserved.reservation, reserved.decision) {
                        (Some(id), _) => ids.lock().unwrap().push(id),
                        (None, Decision::Denied(denial)) => {
                            assert_eq!(
                                denial.reason,
                                DenialReason::TooManyReservations {
                                    open: 4,
                                    maximum: 4
                                }
                            );
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("{other:?}"),
                    }
                });
            }
        });
        let ids = ids.into_inner().unwrap();
        assert_eq!((ids.len(), refused.into_inner()), (4, 4), "round {round}");
        let report = engine.usage("tp-u", Some(at_ms)).expect("usage");
        assert_eq!(report.open_reservations, 4);
        std::thread::scope(|scope| {
            for id in ids {
                let engine = &engine;
                scope.spawn(move || match round % 3 {
                    0 => {
                        let settled = engine.settle(id, &one, Some(at_ms)).expect("settle");
                        assert!(matches!(settled, SettleOutcome::Settled(_)));
                    }
                    1 => engine.void(id, Some(at_ms)).expect("void"),
                    _ => {}
                });
            }
        });
        if round % 3 == 2 {
            assert_eq!(engine.expire_reservations(Some(at_ms + 500)), Ok(4));
        }
        let report = engine.usage("tp-u", Some(at_ms)).expect("usage");
        assert_eq!(report.open_reservations, 0, "round {round}");
        assert_eq!(engine.open_reservations(), 0);
    }
}

/// Four requests of m2.7: what the holds below take.
const HELD: [(Unit, u64); 1] = [(Unit::Requests, 4)];

/// `tp-u` seated on Bar-Plus (the older seed's usage bar) and `tp-c`, with no seat and 50,000
/// micro-credits, both at T0.
fn bar_and_credits_keys(engine: &Engine) {
    let at = Some(T0_MS);
    engine.create_user("u", "tp-u", at).expect("user");
    engine.assign_seat("@u", "u", "Bar-Plus", at).expect("seat");
    engine.create_user("c", "tp-c", at).expect("user");
    engine.top_up("@c", 50_000, at).expect("top-up");
}

/// Reserves `HELD` on `key` at T0 for `lease_ms`: the reservation, which must be admitted.
fn reserve_held(engine: &Engine, key: &str, lease_ms: u64) -> ReservationId {
    let request = UsageRequest::new(key, "m2.7", &HELD).at(T0_MS);
    let reserved = engine.reserve(&request, Some(lease_ms)).expect("reserve");
    reserved.reservation.expect("admitted")
}

/// A database reopened with reservations open (one on plan quota, one on credits, one settled
/// before the close): the holds are restored exactly (the usage and the balance as before),
/// the cap counts the open ones, a settle before the reopen answers the same after it (twice
/// reopened) and charges nothing more, a settle after it is idempotent across the next
/// reopen, and the leases still end: expired, the holds come back in full.
#[test]
fn reservations_open_at_a_reopen_keep_their_holds_settle_once_and_still_expire() {
    let dir = TempDir::new("resv-reopen");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let engine = open(dir.path(), &clock);
    bar_and_credits_keys(&engine);
    let held = HELD;
    let reserve = reserve_held;
    let plan_hold = reserve(&engine, "tp-u", 60_000);
    let settled_first = reserve(&engine, "tp-u", 60_000);
    let long_hold = reserve(&engine, "tp-u", DAY_MS);
    let credits_hold = reserve(&engine, "tp-c", 60_000);
    let two = [(Unit::Requests, 2)];
    let first = engine.settle(settled_first, &two, at).expect("settle");
    let state = |engine: &Engine, at_ms: u64| {
        log_support::state(engine, &["tp-u", "tp-c"], &["@u", "@c"], at_ms)
    };
    let before = state(&engine, T0_MS);
    assert_eq!(before.open_reservations, 3);
    assert_eq!(
        bar_used(&engine, "tp-u", T0_MS).0,
        (4 + 2 + 4) * REQUEST_MICROS
    );
    assert_eq!(
        engine.credits_micros("@c").expect("credits"),
        50_000 - 4 * REQUEST_MICROS
    );
    drop(engine);

    let engine = open(dir.path(), &clock);
    log_support::assert_same_state(&state(&engine, T0_MS), &before, "after the reopen");
    assert_eq!(engine.settle(settled_first, &two, at), Ok(first.clone()));
    // Bar-Plus caps 4: two open on the key, so two more fit and a third does not.
    let extra_one = reserve(&engine, "tp-u", 60_000);
    let extra_two = reserve(&engine, "tp-u", 60_000);
    let request = UsageRequest::new("tp-u", "m2.7", &held).at(T0_MS);
    let refused = engine.reserve(&request, Some(60_000)).expect("reserve");
    assert_eq!(refused.reservation, None, "{:?}", refused.decision);
    engine.void(extra_one, at).expect("void");
    engine.void(extra_two, at).expect("void");
    let one = [(Unit::Requests, 1)];
    let settled_after = engine.settle(plan_hold, &one, at).expect("settle");
    assert_eq!(
        bar_used(&engine, "tp-u", T0_MS).0,
        (1 + 2 + 4) * REQUEST_MICROS
    );
    drop(engine);

    let engine = open(dir.path(), &clock);
    assert_eq!(engine.settle(settled_first, &two, at), Ok(first));
    assert_eq!(engine.settle(plan_hold, &one, at), Ok(settled_after));
    assert_eq!(
        engine.void(plan_hold, at).map_err(closed_state),
        Err("settled")
    );
    assert_eq!(
        bar_used(&engine, "tp-u", T0_MS).0,
        (1 + 2 + 4) * REQUEST_MICROS
    );
    assert_eq!(engine.open_reservations(), 2);
    // The credits hold's lease ends a minute in; the long one's a day in.
    clock.set_ms(T0_MS + 60_000);
    assert_eq!(engine.expire_reservations(None), Ok(1));
    assert_eq!(engine.credits_micros("@c").expect("credits"), 50_000);
    assert_eq!(
        engine
            .settle(credits_hold, &one, None)
            .map_err(closed_state),
        Err("expired")
    );
    drop(engine);

    let engine = open(dir.path(), &clock);
    assert_eq!(engine.credits_micros("@c").expect("credits"), 50_000);
    assert_eq!(engine.open_reservations(), 1);
    clock.set_ms(T0_MS + DAY_MS);
    assert_eq!(engine.expire_reservations(None), Ok(1));
    // The weekly bar (the 5-hour one has aged out by now).
    let report = engine.usage("tp-u", Some(T0_MS + DAY_MS)).expect("usage");
    assert_eq!(report.limits[1].used, (1 + 2) * REQUEST_MICROS);
    assert_eq!(report.open_reservations, 0);
    assert_eq!(engine.void(long_hold, None).map_err(closed_state), Ok(()));
}

/// The token plan with m2.7's request priced at `request_micros` (the usage bar may change its
/// prices in a swap).
fn priced(request_micros: u64) -> Policy {
    let text = tally_engine::policy::TOKEN_PLAN_TOML.replace(
        "price_micros = { requests = 2000, tokens = 1 }",
        &format!("price_micros = {{ requests = {request_micros}, tokens = 1 }}"),
    );
    Policy::from_toml_str(&text).expect("policy")
}

/// Reservations open across a swap that reprices m2.7 (the usage bar's weights and the credits'
/// price): a void gives back exactly what the hold took, on the bar and in credits, a settle
/// for less leaves exactly the hold less what it gives back, and a reopen replays the same.
#[test]
fn a_price_swap_while_reservations_are_open_gives_back_exactly_what_each_hold_took() {
    let dir = TempDir::new("resv-swap");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let engine = open(dir.path(), &clock);
    bar_and_credits_keys(&engine);
    let reserve = |engine: &Engine, key: &str| reserve_held(engine, key, 60_000);
    let bar_void = reserve(&engine, "tp-u");
    let bar_settle = reserve(&engine, "tp-u");
    let credits_void = reserve(&engine, "tp-c");
    let credits_settle = reserve(&engine, "tp-c");
    assert_eq!(bar_used(&engine, "tp-u", T0_MS), (16_000, 16_000));
    assert_eq!(engine.credits_micros("@c"), Ok(50_000 - 16_000));
    engine.swap_policy(priced(3_000), at).expect("swap");
    assert_eq!(bar_used(&engine, "tp-u", T0_MS), (16_000, 16_000));

    engine.void(bar_void, at).expect("void");
    assert_eq!(bar_used(&engine, "tp-u", T0_MS), (8_000, 8_000));
    engine.void(credits_void, at).expect("void");
    assert_eq!(engine.credits_micros("@c"), Ok(50_000 - 8_000));

    let one = [(Unit::Requests, 1)];
    let settled = engine.settle(bar_settle, &one, at).expect("settle");
    assert!(matches!(settled, SettleOutcome::Settled(_)), "{settled:?}");
    let bar_after = bar_used(&engine, "tp-u", T0_MS);
    // Of the 8,000 the hold took for four requests, one request's share stays counted.
    assert_eq!(bar_after, (2_000, 2_000), "{settled:?}");
    let settled = engine.settle(credits_settle, &one, at).expect("settle");
    assert!(matches!(settled, SettleOutcome::Settled(_)), "{settled:?}");
    let credits_after = engine.credits_micros("@c").expect("credits");
    assert_eq!(credits_after, 50_000 - 2_000, "{settled:?}");
    let reports = ["tp-u", "tp-c"].map(|key| engine.usage(key, at).expect("usage"));
    drop(engine);

    let engine = Engine::open(
        dir.path(),
        priced(3_000),
        clock.clone(),
        OpenOptions::default(),
    )
    .expect("reopen");
    assert_eq!(
        ["tp-u", "tp-c"].map(|key| engine.usage(key, at).expect("usage")),
        reports
    );
    assert_eq!(engine.credits_micros("@c"), Ok(credits_after));
}

/// A seat change while a plan-quota hold is open, to a plan without m2.7 (Plus to
/// Plus-Highspeed) and back: the hold's void gives back what it held wherever the count went,
/// and never leaves the key charged for it; a seat change to a plan with the same limit (Plus to
/// Max) carries the hold, which the void then takes off the new plan's count.
#[test]
fn a_seat_change_while_a_hold_is_open_leaves_nothing_of_it_after_a_void() {
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let engine = Engine::new(Policy::token_plan(), clock.clone(), Default::default()).unwrap();
    engine.create_user("u", "tp-u", at).expect("user");
    engine.assign_seat("@u", "u", "Plus", at).expect("seat");
    let m27_used = |engine: &Engine| {
        let report = engine.usage("tp-u", at).expect("usage");
        report
            .limits
            .iter()
            .find(|limit| limit.name.starts_with("m2.7") && !limit.name.contains("highspeed"))
            .map(|limit| limit.used)
    };
    let consumed = [(Unit::Requests, 5)];
    let request = UsageRequest::new("tp-u", "m2.7", &consumed).at(T0_MS);
    assert!(matches!(
        engine.consume(&request),
        Ok(Decision::Admitted(_))
    ));
    let held = [(Unit::Requests, 10)];
    let request = UsageRequest::new("tp-u", "m2.7", &held).at(T0_MS);
    let id = engine
        .reserve(&request, None)
        .expect("reserve")
        .reservation
        .unwrap();
    assert_eq!(m27_used(&engine), Some(15));

    engine.assign_seat("@u", "u", "Max", at).expect("upgrade");
    assert_eq!(m27_used(&engine), Some(15));
    engine.void(id, at).expect("void");
    assert_eq!(m27_used(&engine), Some(5));

    let id = engine
        .reserve(&request, None)
        .expect("reserve")
        .reservation
        .unwrap();
    assert_eq!(m27_used(&engine), Some(15));
    engine
        .assign_seat("@u", "u", "Plus-Highspeed", at)
        .expect("to highspeed");
    assert_eq!(m27_used(&engine), None);
    engine.void(id, at).expect("void");
    engine.assign_seat("@u", "u", "Plus", at).expect("back");
    let used = m27_used(&engine).expect("Plus counts m2.7");
    assert!(used <= 5, "the voided hold is still counted: {used}");
}

/// A crash with reservations open, one opened before the last checkpoint and one after (the
/// snapshot's and the replay's), one settled after it: the reopened copy holds what the live
/// engine held, counts both against the key's cap, answers the settle as it was, and expires
/// the leases that ended while it was down as soon as it is asked, giving the holds back in
/// full.
#[test]
fn reservations_open_at_a_crash_are_restored_from_the_snapshot_and_the_log_and_still_expire() {
    let dir = TempDir::new("resv-crash");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let engine = open(dir.path(), &clock);
    bar_and_credits_keys(&engine);
    let held = HELD;
    let reserve = |engine: &Engine, key: &str| reserve_held(engine, key, 60_000);
    let snapshotted = reserve(&engine, "tp-u");
    let credits_snapshotted = reserve(&engine, "tp-c");
    let settled_later = reserve(&engine, "tp-u");
    engine.checkpoint().expect("checkpoint");
    let replayed = reserve(&engine, "tp-u");
    let credits_replayed = reserve(&engine, "tp-c");
    let one = [(Unit::Requests, 1)];
    let settlement = engine.settle(settled_later, &one, at).expect("settle");
    let state = |engine: &Engine, at_ms: u64| {
        log_support::state(engine, &["tp-u", "tp-c"], &["@u", "@c"], at_ms)
    };
    let live = state(&engine, T0_MS);
    assert_eq!(live.open_reservations, 4);
    assert_eq!(bar_used(&engine, "tp-u", T0_MS).0, 9 * REQUEST_MICROS);
    let crashed = dir.sibling("crashed");
    log_support::copy_dir(dir.path(), crashed.path());
    drop(engine);

    let engine = open(crashed.path(), &clock);
    log_support::assert_same_state(&state(&engine, T0_MS), &live, "after the crash");
    assert_eq!(engine.settle(settled_later, &one, at), Ok(settlement));
    // Two of Bar-Plus's four open on the key: two more fit, a third does not.
    let more = [reserve(&engine, "tp-u"), reserve(&engine, "tp-u")];
    let request = UsageRequest::new("tp-u", "m2.7", &held).at(T0_MS);
    let refused = engine.reserve(&request, Some(60_000)).expect("reserve");
    assert_eq!(refused.reservation, None, "{:?}", refused.decision);
    for id in more {
        engine.void(id, at).expect("void");
    }
    log_support::assert_same_state(&state(&engine, T0_MS), &live, "after the voids");
    drop(engine);

    // Down while the leases ended.
    clock.set_ms(T0_MS + 60_000);
    let engine = open(crashed.path(), &clock);
    assert_eq!(engine.expire_reservations(None), Ok(4));
    assert_eq!(bar_used(&engine, "tp-u", T0_MS + 60_000).0, REQUEST_MICROS);
    assert_eq!(engine.credits_micros("@c"), Ok(50_000));
    for id in [snapshotted, replayed, credits_snapshotted, credits_replayed] {
        assert_eq!(
            engine.settle(id, &one, None).map_err(closed_state),
            Err("expired")
        );
    }
    let report = engine.usage("tp-u", None).expect("usage");
    assert_eq!(report.open_reservations, 0);
}

/// A reservation held on one side and settled partly on the other (Plus's 4,000 speech
/// characters a day; 100 micros a character): a plan hold whose extra no longer fits the plan
/// pays it with credits, whole; a credits hold (the plan full) whose extra fits what the plan
/// has left takes it from the plan; a credits hold settled for less gives the rest back to the
/// team. Each side holds exactly its share, and a crash replays the same.
#[test]
fn a_hold_on_one_side_settled_partly_on_the_other_charges_each_side_exactly_its_share() {
    let dir = TempDir::new("resv-sides");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let engine = open(dir.path(), &clock);
    engine.create_user("u", "tp-u", at).expect("user");
    engine.assign_seat("@u", "u", "Plus", at).expect("seat");
    engine.top_up("@u", 100_000, at).expect("top-up");
    let characters = |n| [(Unit::Characters, n)];
    let speech_used = |engine: &Engine| {
        let report = engine.usage("tp-u", at).expect("usage");
        let limit = report
            .limits
            .iter()
            .find(|limit| limit.name.starts_with("speech"));
        (limit.expect("speech").used, report.credits_balance_micros)
    };
    let reserve = |engine: &Engine, n| {
        let quantities = characters(n);
        let request = UsageRequest::new("tp-u", "speech-2.8", &quantities).at(T0_MS);
        let reserved = engine.reserve(&request, None).expect("reserve");
        let Decision::Admitted(admission) = reserved.decision else {
            panic!("{:?}", reserved.decision);
        };
        (
            reserved.reservation.expect("admitted"),
            admission.charged_to,
        )
    };
    let settle = |engine: &Engine, id, n| match engine.settle(id, &characters(n), at) {
        Ok(SettleOutcome::Settled(settlement)) => settlement,
        other => panic!("{other:?}"),
    };
    let consumed = characters(3_990);
    let request = UsageRequest::new("tp-u", "speech-2.8", &consumed).at(T0_MS);
    assert!(matches!(
        engine.consume(&request),
        Ok(Decision::Admitted(_))
    ));

    let (plan_hold, charged_to) = reserve(&engine, 8);
    assert!(
        matches!(charged_to, ChargedTo::PlanQuota { .. }),
        "{charged_to:?}"
    );
    assert_eq!(speech_used(&engine), (3_998, 100_000));
    let settlement = settle(&engine, plan_hold, 20);
    assert_eq!(settlement.extra, Some(ChargedTo::Credits { micros: 1_200 }));
    assert_eq!(speech_used(&engine), (3_998, 98_800));

    let (credits_hold, charged_to) = reserve(&engine, 10);
    assert_eq!(charged_to, ChargedTo::Credits { micros: 1_000 });
    assert_eq!(speech_used(&engine), (3_998, 97_800));
    let settlement = settle(&engine, credits_hold, 12);
    assert!(
        matches!(settlement.extra, Some(ChargedTo::PlanQuota { .. })),
        "{settlement:?}"
    );
    assert_eq!(speech_used(&engine), (4_000, 97_800));

    let (credits_hold, _) = reserve(&engine, 10);
    assert_eq!(speech_used(&engine), (4_000, 96_800));
    let settlement = settle(&engine, credits_hold, 4);
    assert_eq!(settlement.released.get(Unit::Characters), 6);
    assert_eq!(speech_used(&engine), (4_000, 97_400));

    let live = speech_used(&engine);
    let crashed = dir.sibling("crashed");
    log_support::copy_dir(dir.path(), crashed.path());
    drop(engine);
    let engine = open(crashed.path(), &clock);
    assert_eq!(speech_used(&engine), live);
}

/// Seat changes between Plus and Max (the same m2.7 limit, so its count carries) racing the
/// settles, voids and expiries of holds on the key and consumes on it, 80 rounds: the count is
/// exactly what was settled and consumed, whichever seat each give-back met.
#[test]
fn seat_changes_racing_closes_on_the_key_lose_no_give_back() {
    const ROUNDS: u64 = 80;
    let dir = TempDir::new("resv-seat-race");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = open(dir.path(), &clock);
    engine.create_user("u", "tp-u", Some(T0_MS)).expect("user");
    engine
        .assign_seat("@u", "u", "Plus", Some(T0_MS))
        .expect("seat");
    let m27_used = |engine: &Engine, at_ms: u64| {
        let report = engine.usage("tp-u", Some(at_ms)).expect("usage");
        let limit = report
            .limits
            .iter()
            .find(|limit| limit.name.starts_with("m2.7"));
        limit.expect("m2.7").used
    };
    let held = [(Unit::Requests, 6)];
    let two = [(Unit::Requests, 2)];
    let one = [(Unit::Requests, 1)];
    let mut expected = 0;
    for round in 0..ROUNDS {
        let at_ms = T0_MS + round * 10;
        let request = UsageRequest::new("tp-u", "m2.7", &held).at(at_ms);
        let ids = [(); 3].map(|_| {
            let reserved = engine.reserve(&request, Some(5)).expect("reserve");
            reserved.reservation.expect("admitted")
        });
        let counted = AtomicU64::new(0);
        race(&[
            &|| {
                let plan = if round % 2 == 0 { "Max" } else { "Plus" };
                engine
                    .assign_seat("@u", "u", plan, Some(at_ms))
                    .expect("seat change");
            },
            &|| {
                if let Ok(SettleOutcome::Settled(_)) = engine.settle(ids[0], &two, Some(at_ms)) {
                    counted.fetch_add(2, Ordering::Relaxed);
                }
            },
            &|| {
                let _ = engine.void(ids[1], Some(at_ms));
            },
            &|| {
                engine.expire_reservations(Some(at_ms + 5)).expect("expire");
            },
            &|| {
                let request = UsageRequest::new("tp-u", "m2.7", &one).at(at_ms);
                if let Ok(Decision::Admitted(_)) = engine.consume(&request) {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            },
        ]);
        assert_eq!(engine.open_reservations(), 0, "round {round}");
        expected += counted.into_inner();
        assert_eq!(m27_used(&engine, at_ms), expected, "round {round}");
    }
    let at_ms = T0_MS + ROUNDS * 10;
    let before = engine.usage("tp-u", Some(at_ms)).expect("usage");
    drop(engine);
    let engine = open(dir.path(), &clock);
    assert_eq!(engine.usage("tp-u", Some(at_ms)).expect("usage"), before);
}

/// A pay-as-you-go key's reservations: the hold counts in its spend at the price, a void takes
/// it all off, a settle for less leaves the actual amount's price and a settle for more adds
/// the extra's, and a crash replays the same spend.
#[test]
fn a_pay_as_you_go_keys_spend_holds_exactly_what_its_reservations_settled() {
    let dir = TempDir::new("resv-payg");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let engine = open(dir.path(), &clock);
    engine.create_user("d", "tp-d", at).expect("user");
    engine.create_payg_key("d", "payg-d", at).expect("payg key");
    let spend = |engine: &Engine| engine.usage("payg-d", at).expect("usage").payg_micros;
    let reserve = |engine: &Engine, n| {
        let held = [(Unit::Requests, n)];
        let request = UsageRequest::new("payg-d", "m2.7", &held).at(T0_MS);
        let reserved = engine.reserve(&request, None).expect("reserve");
        reserved.reservation.expect("admitted")
    };
    let voided = reserve(&engine, 4);
    assert_eq!(spend(&engine), 4 * REQUEST_MICROS);
    engine.void(voided, at).expect("void");
    assert_eq!(spend(&engine), 0);
    let less = reserve(&engine, 4);
    let more = reserve(&engine, 4);
    let settled = |id, n| match engine.settle(id, &[(Unit::Requests, n)], at) {
        Ok(SettleOutcome::Settled(settlement)) => settlement,
        other => panic!("{other:?}"),
    };
    settled(less, 1);
    assert_eq!(spend(&engine), 5 * REQUEST_MICROS);
    settled(more, 6);
    assert_eq!(spend(&engine), 7 * REQUEST_MICROS);
    let crashed = dir.sibling("crashed");
    log_support::copy_dir(dir.path(), crashed.path());
    drop(engine);
    let engine = open(crashed.path(), &clock);
    assert_eq!(spend(&engine), 7 * REQUEST_MICROS);
}

/// A plan hold on a nearly full usage bar settled trading units (fewer requests, many more
/// tokens) beyond what the bar has left: the unused requests go back to the bar, the extra
/// tokens are paid with credits, whole, and a crash replays the same bar and balance.
#[test]
fn a_plan_hold_trading_units_beyond_a_full_bar_pays_the_extra_with_credits_and_frees_the_rest() {
    let dir = TempDir::new("resv-bar-extra");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let engine = open(dir.path(), &clock);
    engine.create_user("u", "tp-u", at).expect("user");
    engine.assign_seat("@u", "u", "Bar-Plus", at).expect("seat");
    engine.top_up("@u", 1_000_000, at).expect("top-up");
    let filler = [(Unit::Requests, 1), (Unit::Tokens, 1_990_000)];
    let request = UsageRequest::new("tp-u", "m2.7", &filler).at(T0_MS);
    assert!(matches!(
        engine.consume(&request),
        Ok(Decision::Admitted(_))
    ));
    let held = [(Unit::Requests, 3)];
    let request = UsageRequest::new("tp-u", "m2.7", &held).at(T0_MS);
    let id = engine.reserve(&request, None).expect("reserve").reservation;
    let id = id.expect("the bar has room for the hold");
    assert_eq!(bar_used(&engine, "tp-u", T0_MS).0, 1_998_000);
    let actual = [(Unit::Requests, 1), (Unit::Tokens, 10_000)];
    let settlement = match engine.settle(id, &actual, at) {
        Ok(SettleOutcome::Settled(settlement)) => settlement,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        settlement.extra,
        Some(ChargedTo::Credits { micros: 10_000 })
    );
    assert_eq!(settlement.released.get(Unit::Requests), 2);
    let live = (
        bar_used(&engine, "tp-u", T0_MS),
        engine.credits_micros("@u").expect("credits"),
    );
    assert_eq!(live, ((1_994_000, 1_994_000), 990_000));
    let crashed = dir.sibling("crashed");
    log_support::copy_dir(dir.path(), crashed.path());
    drop(engine);
    let engine = open(crashed.path(), &clock);
    assert_eq!(
        (
            bar_used(&engine, "tp-u", T0_MS),
            engine.credits_micros("@u").expect("credits")
        ),
        live
    );
    assert_eq!(
        engine.settle(id, &actual, at),
        Ok(SettleOutcome::Settled(settlement))
    );
}

/// In `Interval` mode a reservation is acknowledged once its event is queued; a write that then
/// fails loses it (the loss the mode accepts). Its id must not be handed out again after the
/// reopen: the caller still holds it, and its settle or void would close another key's
/// reservation.
///
/// It was: an open set the next id from what the snapshot and the log held, so the lost id was
/// the next one handed out. Now an id is recorded as handed out before it is answered
/// (`reservation_ids_through`), and an open hands out ids after it.
#[test]
fn a_reservation_id_lost_with_an_unwritten_event_is_not_handed_out_again_after_a_reopen() {
    // The writer may fail the reserve's write before the reserve answers (it then refuses, and
    // nothing was acknowledged: not the case pinned here); a new database is tried then. Once
    // in about fifteen runs it did, and the test failed on its `expect`.
    for attempt in 0..20 {
        if let Some(()) = lost_reservation_id_is_not_handed_out_again(attempt) {
            return;
        }
    }
    panic!("every reserve's write failed before it was answered");
}

/// One try of the test above: `None` when the reserve was refused, its write failed first.
fn lost_reservation_id_is_not_handed_out_again(attempt: u32) -> Option<()> {
    let dir = TempDir::new(&format!("resv-id-reuse-{attempt}"));
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let faults = tally_engine::Faults::new();
    let options = OpenOptions {
        durability: Durability::Interval { ms: 50 },
        faults: Some(Arc::clone(&faults)),
        ..OpenOptions::default()
    };
    let engine = Engine::open(dir.path(), Policy::token_plan(), clock.clone(), options).unwrap();
    for (user, key) in [("a", "tp-a"), ("b", "tp-b")] {
        engine.create_user(user, key, at).expect("user");
        engine
            .assign_seat(&format!("@{user}"), user, "Plus", at)
            .expect("seat");
    }
    engine.sync().expect("sync");
    faults.fail_next_inserts(1);
    let held = [(Unit::Requests, 4)];
    let request = UsageRequest::new("tp-a", "m2.7", &held).at(T0_MS);
    let lost = match engine.reserve(&request, None) {
        Ok(outcome) => outcome.reservation.expect("admitted"),
        Err(Error::Storage { .. }) => return None,
        Err(error) => panic!("{error:?}"),
    };
    let start = std::time::Instant::now();
    while engine.health().log_failure.is_none() && start.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(engine.health().log_failure.is_some(), "the write failed");
    drop(engine);
    let engine = open(dir.path(), &clock);
    assert_eq!(
        engine.open_reservations(),
        0,
        "the reservation was lost with its event"
    );
    let request = UsageRequest::new("tp-b", "m2.7", &held).at(T0_MS);
    let other = engine
        .reserve(&request, None)
        .expect("reserve")
        .reservation
        .unwrap();
    // What goes wrong otherwise: tp-a's caller voids what it was told it holds, and tp-b's
    // reservation is closed under tp-b.
    let voided = engine.void(lost, at);
    let open = engine.usage("tp-b", at).expect("usage").open_reservations;
    assert_ne!(
        other, lost,
        "tp-a's lost reservation id now names tp-b's (its void: {voided:?}; tp-b open: {open})"
    );
    assert!(
        matches!(voided, Err(Error::UnknownReservation { .. })),
        "the lost reservation is unknown after the reopen: {voided:?}"
    );
    assert_eq!(open, 1, "tp-b's reservation stays open");
    Some(())
}

/// A reserve records a block of reservation ids durably (a flush of sled's file) with the
/// table let go: a void (and a settle, an expiry, a checkpoint's cut) goes on meanwhile, and so
/// do reserves while ids are left. Before, the flush ran under the table's lock, so every close
/// on every key waited for it once every 4,096 reserves.
#[test]
fn a_void_does_not_wait_for_a_reserve_recording_a_block_of_ids() {
    let dir = TempDir::new("resv-id-record-unlocked");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let faults = tally_engine::Faults::new();
    let options = OpenOptions {
        durability: Durability::None,
        faults: Some(Arc::clone(&faults)),
        ..OpenOptions::default()
    };
    let engine = Engine::open(dir.path(), Policy::token_plan(), clock, options).unwrap();
    for (user, key) in [("a", "tp-a"), ("b", "tp-b")] {
        engine.create_user(user, key, at).expect("user");
        engine
            .assign_seat(&format!("@{user}"), user, "Plus", at)
            .expect("seat");
    }
    let held = [(Unit::Requests, 1)];
    let reserve = |key: &str| {
        let request = UsageRequest::new(key, "m2.7", &held).at(T0_MS);
        engine
            .reserve(&request, None)
            .expect("reserve")
            .reservation
            .expect("admitted")
    };
    let kept = reserve("tp-b");
    faults.hold_id_records();
    std::thread::scope(|scope| {
        let cycles = scope.spawn(|| {
            for _ in 0..5_000 {
                let id = reserve("tp-a");
                engine.void(id, at).expect("void");
            }
        });
        let start = std::time::Instant::now();
        while faults.id_records_held() == 0 && start.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            faults.id_records_held(),
            1,
            "a reserve records the next block"
        );
        let void = scope.spawn(|| engine.void(kept, at));
        let start = std::time::Instant::now();
        while !void.is_finished() && start.elapsed().as_secs() < 3 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let finished = void.is_finished();
        faults.release_id_records();
        assert!(finished, "the void waited for the record's flush");
        void.join().unwrap().expect("void");
        cycles.join().unwrap();
    });
    assert_eq!(engine.open_reservations(), 0);
}

/// A reserve whose record of the ids it may hand out fails (`reservation_ids_through`) is
/// refused with the storage error and changes nothing: no reservation, the key's count of open
/// ones as it was, no id used. The next reserve records and goes on, and after a reopen ids
/// come after the recorded block.
#[test]
fn a_reserve_whose_record_of_ids_fails_changes_nothing() {
    let dir = TempDir::new("resv-id-record-fails");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let at = Some(T0_MS);
    let faults = tally_engine::Faults::new();
    let options = OpenOptions {
        durability: Durability::Interval { ms: 50 },
        faults: Some(Arc::clone(&faults)),
        ..OpenOptions::default()
    };
    let engine = Engine::open(dir.path(), Policy::token_plan(), clock.clone(), options).unwrap();
    engine.create_user("a", "tp-a", at).expect("user");
    engine.assign_seat("@a", "a", "Plus", at).expect("seat");
    let held = [(Unit::Requests, 1)];
    let request = UsageRequest::new("tp-a", "m2.7", &held).at(T0_MS);
    let usage_before = engine.usage("tp-a", at).expect("usage");
    faults.fail_next_id_records(1);
    let refused = engine.reserve(&request, None);
    assert!(
        matches!(&refused, Err(Error::Storage { problem }) if problem.contains("reservation id")),
        "{refused:?}"
    );
    assert_eq!(engine.open_reservations(), 0);
    assert_eq!(engine.usage("tp-a", at).expect("usage"), usage_before);
    let first = engine.reserve(&request, None).expect("reserve").reservation;
    assert_eq!(
        first.map(|id| id.get()),
        Some(1),
        "the refused reserve used no id"
    );
    engine.close().expect("close");
    let engine = open(dir.path(), &clock);
    let after = engine.reserve(&request, None).expect("reserve").reservation;
    assert!(
        after.is_some_and(|id| id.get() > 4_096),
        "an open hands out ids after the recorded block: {after:?}"
    );
}
