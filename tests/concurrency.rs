//! Concurrency: threads racing on one key, on one team's credits, on timestamps that go back
//! and forth across a bucket boundary and local midnight, and on keys whose seats change under
//! them. The machines have two cores; four threads make the scheduler interleave them.
//!
//! What must hold whatever the interleaving:
//! - a limit never admits more than its amount, and when the demand exceeds it, unit requests
//!   fill it exactly (a refusal of a unit request means some limit really was full);
//! - the usage report counts exactly what was admitted;
//! - credits never go below zero, and the balance is the top-up minus the charges;
//! - a timestamp that goes backwards is counted at the newest time its window has seen, never
//!   in the past, so no quota is released early.

mod log_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use tally_engine::{
    ChargedTo, Decision, Engine, EngineOptions, ManualClock, OpenOptions, Policy, SettleOutcome,
    Unit, UsageReport, UsageRequest,
};

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const THREADS: u64 = 4;

/// Local midnight in New York (EDT) that starts 2026-06-16; a multiple of the 60 s bucket.
const MIDNIGHT_MS: u64 = 1_781_582_400_000;
/// Noon on Wednesday 2026-06-17 in New York: far from any daily or weekly boundary.
const WEDNESDAY_NOON_MS: u64 = 1_781_712_000_000;
const CHAT_PRICE_MICROS: u64 = 1_000;

/// A policy with one plan, "Team", whose limits on chat requests are `limits`, each a
/// `(window, amount)`; rolling windows have 60 s buckets.
fn policy(limits: &[(&str, u64)]) -> Policy {
    let limits: Vec<String> = limits
        .iter()
        .map(|(window, amount)| {
            let bucket = if window.starts_with("rolling:") {
                r#", bucket = "60s""#
            } else {
                ""
            };
            format!(
                r#"{{ resource = "chat", unit = "requests", amount = {amount}, window = "{window}"{bucket} }}"#
            )
        })
        .collect();
    let text = format!(
        r#"
time_zone = "America/New_York"

[resources.chat]
units = ["requests"]
price_micros = {{ requests = {CHAT_PRICE_MICROS} }}

[plans.Team]
limits = [
  {},
]

[plans.Bigger]
limits = [
  {{ resource = "chat", unit = "requests", amount = 40, window = "rolling:1h", bucket = "60s" }},
  {{ resource = "chat", unit = "requests", amount = 60, window = "daily" }},
]
"#,
        limits.join(",\n  ")
    );
    Policy::from_toml_str(&text).unwrap_or_else(|error| panic!("{error}\n{text}"))
}

/// An engine with `users` users `u0`.., each with key `k0`.. in their Default Team.
fn engine_with_users(policy: Policy, users: usize, at_ms: u64) -> Engine {
    engine_with_users_on_clock(policy, users, at_ms).0
}

/// `engine_with_users`, and its clock (at `at_ms`), for tests whose time passes.
fn engine_with_users_on_clock(
    policy: Policy,
    users: usize,
    at_ms: u64,
) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(at_ms));
    let engine =
        Engine::new(policy, clock.clone(), EngineOptions::default()).expect("valid options");
    for user in 0..users {
        engine
            .create_user(&format!("u{user}"), &format!("k{user}"), Some(at_ms))
            .expect("new user");
    }
    (engine, clock)
}

fn chat(engine: &Engine, key: &str, requests: u64, at_ms: Option<u64>) -> Decision {
    let quantities = [(Unit::Requests, requests)];
    let mut request = UsageRequest::new(key, "chat", &quantities);
    request.at_ms = at_ms;
    engine.consume(&request).expect("a valid request")
}

fn quota_admitted(decision: &Decision) -> bool {
    matches!(
        decision,
        Decision::Admitted(admission) if matches!(admission.charged_to, ChargedTo::PlanQuota { .. })
    )
}

fn used(report: &UsageReport) -> Vec<u64> {
    report.limits.iter().map(|limit| limit.used).collect()
}

/// Timestamps spread over 100 s from `base_ms` (a bucket boundary): a thread's requests race
/// back and forth across the boundary 60 s later, all inside one rolling hour and one day.
fn jittered_ms(base_ms: u64, thread: u64, attempt: u64) -> u64 {
    base_ms + ((attempt * 7 + thread * 13) % 100) * SECOND_MS
}

// ---------------------------------------------------------------------------------------------
// (a) Many threads, one key, plan quota.

/// Four threads send `attempts` requests each to key k0 (sizes from `size`); returns the units
/// admitted from plan quota, and whether any request was refused.
fn hammer_one_key(
    engine: &Engine,
    attempts: u64,
    size: impl Fn(u64, u64) -> u64 + Sync,
) -> (u64, bool) {
    let admitted = AtomicU64::new(0);
    let refused = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (admitted, refused, size) = (&admitted, &refused, &size);
            scope.spawn(move || {
                for attempt in 0..attempts {
                    let requests = size(thread, attempt);
                    let at_ms = jittered_ms(WEDNESDAY_NOON_MS, thread, attempt);
                    let decision = chat(engine, "k0", requests, Some(at_ms));
                    match decision {
                        Decision::Admitted(admission) => {
                            assert!(matches!(admission.charged_to, ChargedTo::PlanQuota { .. }));
                            admitted.fetch_add(requests, Ordering::Relaxed);
                        }
                        Decision::Denied(_) => refused.store(true, Ordering::Relaxed),
                    }
                }
            });
        }
    });
    (admitted.into_inner(), refused.into_inner())
}

/// Four threads consume on one key under ids of their own and refund every other admission at
/// once, racing each other's admissions on the same buckets (timestamps jittered across a
/// bucket boundary). Every refund gives back exactly what its request took from each limit;
/// the report counts the admitted units less the refunded ones; what is left of the rolling
/// limit is then admitted to the unit and no more; and once all of it has aged out, the whole
/// limit is free again, no more and no less: no refund lost or invented a unit in any bucket.
#[test]
fn refunds_racing_admissions_on_one_key_give_back_exactly_what_was_taken() {
    const ROLLING: u64 = 100_000;
    for round in 0..5 {
        let limits = [
            ("rolling:1h", ROLLING),
            ("daily", 300_000),
            ("weekly", 600_000),
        ];
        let engine = engine_with_users(policy(&limits), 1, WEDNESDAY_NOON_MS);
        engine
            .assign_seat("@u0", "u0", "Team", Some(WEDNESDAY_NOON_MS))
            .expect("seat");
        let admitted = AtomicU64::new(0);
        let refunded = AtomicU64::new(0);
        let start = Barrier::new(THREADS as usize);
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (engine, admitted, refunded, start) = (&engine, &admitted, &refunded, &start);
                scope.spawn(move || {
                    start.wait();
                    for attempt in 0..3_000 {
                        let requests = 1 + (attempt + thread) % 3;
                        let at_ms = jittered_ms(WEDNESDAY_NOON_MS, thread, attempt);
                        let id = format!("t{thread}-{attempt}");
                        let quantities = [(Unit::Requests, requests)];
                        let request = UsageRequest::new("k0", "chat", &quantities)
                            .at(at_ms)
                            .id(&id);
                        let decision = engine.consume(&request).expect("a valid request");
                        assert!(quota_admitted(&decision), "{id}: {decision:?}");
                        admitted.fetch_add(requests, Ordering::Relaxed);
                        if attempt % 2 == 0 {
                            let refund = engine.refund(&id, Some(at_ms)).expect("refund");
                            let given: Vec<u64> = refund
                                .given_back
                                .counters
                                .iter()
                                .map(|&(_, _, units)| units)
                                .collect();
                            assert_eq!(given, [requests; 3], "{id}: {refund:?}");
                            refunded.fetch_add(requests, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let (admitted, refunded) = (admitted.into_inner(), refunded.into_inner());
        let later_ms = WEDNESDAY_NOON_MS + 100 * SECOND_MS;
        let report = engine.usage("k0", Some(later_ms)).expect("usage");
        let counted = admitted - refunded;
        assert_eq!(
            used(&report),
            [counted; 3],
            "round {round}: {admitted} admitted, {refunded} refunded"
        );
        assert!(quota_admitted(&chat(
            &engine,
            "k0",
            ROLLING - counted,
            Some(later_ms)
        )));
        assert!(
            !quota_admitted(&chat(&engine, "k0", 1, Some(later_ms))),
            "round {round}: the rolling limit is full"
        );
        let aged_ms = later_ms + 2 * HOUR_MS;
        assert!(quota_admitted(&chat(&engine, "k0", ROLLING, Some(aged_ms))));
        assert!(!quota_admitted(&chat(&engine, "k0", 1, Some(aged_ms))));
        let report = engine.usage("k0", Some(aged_ms)).expect("usage");
        assert_eq!(used(&report), [ROLLING, 2 * ROLLING, 2 * ROLLING]);
    }
}

#[test]
fn four_threads_of_unit_requests_fill_the_tightest_of_several_limits_exactly() {
    let shapes: [[(&str, u64); 3]; 3] = [
        [("rolling:1h", 300), ("daily", 500), ("weekly", 700)],
        [("rolling:1h", 700), ("daily", 300), ("weekly", 500)],
        [("rolling:1h", 500), ("daily", 700), ("weekly", 300)],
    ];
    for round in 0..10 {
        for limits in &shapes {
            let engine = engine_with_users(policy(limits), 1, WEDNESDAY_NOON_MS);
            engine
                .assign_seat("@u0", "u0", "Team", Some(WEDNESDAY_NOON_MS))
                .expect("seat");
            let (admitted, refused) = hammer_one_key(&engine, 150, |_, _| 1);
            let tightest = limits.iter().map(|(_, amount)| *amount).min().unwrap_or(0);
            assert!(refused, "600 requests on a limit of {tightest}");
            assert_eq!(admitted, tightest, "round {round}, limits {limits:?}");
            let report = engine
                .usage("k0", Some(WEDNESDAY_NOON_MS + 100 * SECOND_MS))
                .expect("usage");
            assert_eq!(used(&report), [admitted; 3], "round {round}, {limits:?}");
        }
    }
}

#[test]
fn mixed_sizes_never_exceed_a_limit_and_unit_requests_then_top_it_up_exactly() {
    let limits = [("rolling:1h", 500), ("daily", 800), ("weekly", 900)];
    for round in 0..10 {
        let engine = engine_with_users(policy(&limits), 1, WEDNESDAY_NOON_MS);
        engine
            .assign_seat("@u0", "u0", "Team", Some(WEDNESDAY_NOON_MS))
            .expect("seat");
        let (mixed, refused) = hammer_one_key(&engine, 200, |thread, attempt| {
            (attempt * 7 + thread * 3) % 5 + 1
        });
        assert!(refused && mixed <= 500, "round {round}: {mixed} admitted");
        let (units, refused) = hammer_one_key(&engine, 100, |_, _| 1);
        assert!(refused, "room for 400 more after {mixed}");
        assert_eq!(mixed + units, 500, "round {round}");
        let report = engine
            .usage("k0", Some(WEDNESDAY_NOON_MS + 100 * SECOND_MS))
            .expect("usage");
        assert_eq!(used(&report), [500; 3]);
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Credits.

#[test]
fn four_keys_sharing_a_teams_credits_never_overdraw_it() {
    const TOP_UP_MICROS: u64 = 1_000_500;
    let engine = engine_with_users(policy(&[("daily", 1)]), THREADS as usize, WEDNESDAY_NOON_MS);
    let at = Some(WEDNESDAY_NOON_MS);
    engine.create_team("crew", at).expect("team");
    for user in 0..THREADS {
        engine
            .add_member("crew", &format!("u{user}"), &format!("crew-k{user}"), at)
            .expect("member");
    }
    engine.top_up("crew", TOP_UP_MICROS, at).expect("top-up");
    let charged = AtomicU64::new(0);
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (charged, barrier, engine) = (&charged, &barrier, &engine);
            scope.spawn(move || {
                let key = format!("crew-k{thread}");
                // Mixed sizes first, then unit requests to use up what is left.
                let sizes = (0..150).map(|attempt| (attempt * 7 + thread * 3) % 3 + 1);
                let mut unit_refused = false;
                for (phase, requests) in [sizes.collect::<Vec<_>>(), vec![1; 200]]
                    .into_iter()
                    .enumerate()
                {
                    barrier.wait();
                    for requests in requests {
                        match chat(engine, &key, requests, at) {
                            Decision::Admitted(admission) => {
                                let ChargedTo::Credits { micros } = admission.charged_to else {
                                    panic!("a key without a seat paid with {admission:?}");
                                };
                                assert_eq!(micros, requests * CHAT_PRICE_MICROS);
                                charged.fetch_add(micros, Ordering::Relaxed);
                            }
                            Decision::Denied(_) => unit_refused |= phase == 1,
                        }
                    }
                }
                assert!(
                    unit_refused,
                    "200 unit requests per thread exceed the balance"
                );
            });
        }
    });
    let charged = charged.into_inner();
    let balance = engine.credits_micros("crew").expect("team");
    assert!(charged <= TOP_UP_MICROS);
    assert_eq!(balance, TOP_UP_MICROS - charged);
    assert!(
        balance < CHAT_PRICE_MICROS,
        "a refused unit request means less than its price was left"
    );
    let report = engine.usage("crew-k0", at).expect("usage");
    assert_eq!(report.credits_charged_micros, charged);
    assert_eq!(report.credits_balance_micros, balance);
}

/// Settles of credits holds that trade units (fewer requests, more tokens) pay their extra with
/// what the hold gives back and the balance together, in one step: while other keys of the
/// team take its credits and top-ups come in, the team never goes below zero, its balance is
/// the top-ups less every admitted charge (a settle's charge is its actual price), and a
/// reopened engine replays the same. On the token plan: m2.7 costs 2,000 micros a request and
/// 1 a token; the keys have no seat, so everything is paid with credits.
#[test]
fn settles_trading_units_on_credits_holds_racing_other_keys_of_the_team_never_overdraw_it() {
    const HELD: [(Unit, u64); 2] = [(Unit::Requests, 3), (Unit::Tokens, 4_000)];
    const HELD_MICROS: u64 = 10_000;
    // Cheaper, as held, and dearer than the hold, each trading requests for tokens.
    const ACTUALS: [([(Unit, u64); 2], u64); 3] = [
        ([(Unit::Requests, 1), (Unit::Tokens, 6_000)], 8_000),
        ([(Unit::Requests, 1), (Unit::Tokens, 8_000)], 10_000),
        ([(Unit::Requests, 1), (Unit::Tokens, 12_000)], 14_000),
    ];
    const CONSUMED: [(Unit, u64); 2] = [(Unit::Requests, 1), (Unit::Tokens, 500)];
    const CONSUMED_MICROS: u64 = 2_500;
    const FIRST_TOP_UP_MICROS: u64 = 30_000;
    let at_ms = WEDNESDAY_NOON_MS;
    let at = Some(at_ms);
    let dir = log_support::TempDir::new("settles-racing-team-credits");
    let clock = Arc::new(ManualClock::new(at_ms));
    let open = || {
        Engine::open(
            dir.path(),
            Policy::token_plan(),
            clock.clone(),
            OpenOptions::default(),
        )
        .expect("open")
    };
    let engine = open();
    engine.create_team("crew", at).expect("team");
    for user in 0..THREADS {
        engine
            .create_user(&format!("u{user}"), &format!("k{user}"), at)
            .expect("user");
        engine
            .add_member("crew", &format!("u{user}"), &format!("crew-k{user}"), at)
            .expect("member");
    }
    engine
        .top_up("crew", FIRST_TOP_UP_MICROS, at)
        .expect("top-up");
    let charged = AtomicU64::new(0);
    let topped_up = AtomicU64::new(FIRST_TOP_UP_MICROS);
    let barrier = Barrier::new(THREADS as usize);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (engine, barrier) = (&engine, &barrier);
            let (charged, topped_up) = (&charged, &topped_up);
            scope.spawn(move || {
                let key = format!("crew-k{thread}");
                barrier.wait();
                if thread >= 2 {
                    // Other keys of the team, taking its credits as they come.
                    let request = UsageRequest::new(&key, "m2.7", &CONSUMED).at(at_ms);
                    for _ in 0..400 {
                        if let Decision::Admitted(admission) =
                            engine.consume(&request).expect("consume")
                        {
                            assert_eq!(
                                admission.charged_to,
                                ChargedTo::Credits {
                                    micros: CONSUMED_MICROS
                                }
                            );
                            charged.fetch_add(CONSUMED_MICROS, Ordering::Relaxed);
                        }
                    }
                    return;
                }
                for attempt in 0..100u64 {
                    // Each hold is topped up first, and the other keys soon take what is left
                    // beside it: its settle often meets a balance of nothing.
                    engine.top_up("crew", HELD_MICROS, at).expect("top-up");
                    topped_up.fetch_add(HELD_MICROS, Ordering::Relaxed);
                    let request = UsageRequest::new(&key, "m2.7", &HELD).at(at_ms);
                    let reserved = engine.reserve(&request, None).expect("reserve");
                    let Some(id) = reserved.reservation else {
                        continue;
                    };
                    let (actual, actual_micros) = ACTUALS[(attempt % 3) as usize];
                    match engine.settle(id, &actual, at).expect("settle") {
                        SettleOutcome::Settled(settlement) => {
                            charged.fetch_add(actual_micros, Ordering::Relaxed);
                            assert_eq!(
                                settlement.extra,
                                Some(ChargedTo::Credits {
                                    micros: actual[1].1 - HELD[1].1
                                })
                            );
                            // A repeat is the first settlement and charges nothing.
                            let again = engine.settle(id, &actual, at).expect("settle again");
                            assert_eq!(again, SettleOutcome::Settled(settlement));
                        }
                        SettleOutcome::Denied(denial) => {
                            assert!(
                                actual_micros > HELD_MICROS,
                                "a settle its hold covers was refused: {denial:?}"
                            );
                            engine.void(id, at).expect("void");
                        }
                    }
                }
            });
        }
    });
    let charged = charged.into_inner();
    let topped_up = topped_up.into_inner();
    assert!(charged <= topped_up);
    let balance = engine.credits_micros("crew").expect("team");
    assert_eq!(balance, topped_up - charged);
    assert_eq!(engine.open_reservations(), 0);
    let report = engine.usage("crew-k0", at).expect("usage");
    assert_eq!(report.credits_charged_micros, charged);
    assert_eq!(report.credits_balance_micros, balance);
    drop(engine);
    let engine = open();
    assert_eq!(engine.usage("crew-k0", at).expect("usage"), report);
}

#[test]
fn four_threads_on_one_key_take_the_plan_quota_then_exactly_the_credits() {
    const TOP_UP_MICROS: u64 = 50 * CHAT_PRICE_MICROS + 500;
    let engine = engine_with_users(
        policy(&[("rolling:1h", 100), ("daily", 150)]),
        1,
        WEDNESDAY_NOON_MS,
    );
    let at = Some(WEDNESDAY_NOON_MS);
    engine.assign_seat("@u0", "u0", "Team", at).expect("seat");
    engine.top_up("@u0", TOP_UP_MICROS, at).expect("top-up");
    let quota = AtomicU64::new(0);
    let credits = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (quota, credits, engine) = (&quota, &credits, &engine);
            scope.spawn(move || {
                for attempt in 0..200 {
                    let at_ms = jittered_ms(WEDNESDAY_NOON_MS, thread, attempt);
                    if let Decision::Admitted(admission) = chat(engine, "k0", 1, Some(at_ms)) {
                        match admission.charged_to {
                            ChargedTo::PlanQuota { .. } => quota.fetch_add(1, Ordering::Relaxed),
                            ChargedTo::Credits { micros } => {
                                credits.fetch_add(micros, Ordering::Relaxed)
                            }
                            ChargedTo::PayAsYouGo { .. } => panic!("a plan key paid as you go"),
                        };
                    }
                }
            });
        }
    });
    assert_eq!(quota.into_inner(), 100);
    assert_eq!(credits.into_inner(), 50 * CHAT_PRICE_MICROS);
    assert_eq!(engine.credits_micros("@u0").expect("team"), 500);
    let report = engine.usage("k0", at).expect("usage");
    assert_eq!(used(&report), [100, 100]);
}

// ---------------------------------------------------------------------------------------------
// (c) Timestamps racing back and forth across a bucket boundary and local midnight.

/// Offsets from midnight: both sides of the bucket that starts at midnight and of the one
/// after it, and of the day boundary itself.
const AROUND_MIDNIGHT_MS: [i64; 10] = [
    -90_000, -60_001, -60_000, -1, 0, 1, 59_999, 60_000, 90_000, -30_000,
];

fn around_midnight_ms(index: u64) -> u64 {
    (MIDNIGHT_MS as i64 + AROUND_MIDNIGHT_MS[(index % 10) as usize]) as u64
}

/// One admission from the plan: when it was counted (the rolling bucket's time) and when the
/// daily count it went into resets (which day it counted on).
#[derive(Clone, Copy, Debug)]
struct Counted {
    request_ms: Option<u64>,
    counted_ms: u64,
    daily_reset_ms: u64,
}

const ROLLING_AMOUNT: u64 = 300;
const DAILY_AMOUNT: u64 = 200;

/// Four threads send unit requests stamped around midnight (explicitly, or by the engine's
/// clock, which each thread steps back and forth just before its request) while a sampler reads
/// the usage report; returns every admission.
fn race_around_midnight(stepped_clock: bool) -> (Engine, Vec<Counted>) {
    let clock = Arc::new(ManualClock::new(around_midnight_ms(0)));
    let engine = Engine::new(
        policy(&[("rolling:1h", ROLLING_AMOUNT), ("daily", DAILY_AMOUNT)]),
        clock.clone(),
        EngineOptions::default(),
    )
    .expect("valid options");
    let at = Some(around_midnight_ms(0));
    engine.create_user("u0", "k0", at).expect("user");
    engine.assign_seat("@u0", "u0", "Team", at).expect("seat");
    let running = AtomicBool::new(true);
    let mut counted = Vec::new();
    std::thread::scope(|scope| {
        let (engine, running) = (&engine, &running);
        let sampler = scope.spawn(move || {
            let mut samples = 0u64;
            while running.load(Ordering::Relaxed) || samples == 0 {
                let report = engine
                    .usage("k0", Some(around_midnight_ms(samples)))
                    .expect("usage");
                for limit in &report.limits {
                    assert!(limit.used <= limit.amount, "over the limit: {report:?}");
                }
                samples += 1;
            }
            samples
        });
        let workers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let clock = clock.clone();
                scope.spawn(move || {
                    let mut counted = Vec::new();
                    for attempt in 0..200 {
                        let stamp_ms = around_midnight_ms(attempt * 3 + thread);
                        // With the stepped clock the request reads whatever time the threads
                        // last set: each sets it just before, racing the others.
                        let request_ms = if stepped_clock {
                            clock.set_ms(stamp_ms);
                            None
                        } else {
                            Some(stamp_ms)
                        };
                        let decision = chat(engine, "k0", 1, request_ms);
                        if let Decision::Admitted(admission) = decision {
                            assert!(quota_admitted(&decision), "no credits: {admission:?}");
                            let daily = admission.limits.as_slice()[1];
                            counted.push(Counted {
                                request_ms,
                                counted_ms: admission.at_ms,
                                daily_reset_ms: daily.reset_at_ms.expect("a daily reset"),
                            });
                        }
                    }
                    counted
                })
            })
            .collect();
        // The sampler stops however the workers end.
        let stops_the_sampler = log_support::StoreOnDrop(running, false);
        for worker in workers {
            counted.extend(worker.join().expect("worker"));
        }
        drop(stops_the_sampler);
        assert!(sampler.join().expect("sampler") > 0);
    });
    (engine, counted)
}

fn verify_race_around_midnight(engine: &Engine, counted: &[Counted]) {
    let next_midnight_ms = MIDNIGHT_MS + 24 * HOUR_MS;
    let earliest_ms = around_midnight_ms(0);
    let mut per_day = [0u64; 2];
    for admission in counted {
        // Counted at its own time or later, never before; and on its own day or a later one.
        if let Some(request_ms) = admission.request_ms {
            assert!(admission.counted_ms >= request_ms, "{admission:?}");
            let own_day_reset = if request_ms < MIDNIGHT_MS {
                MIDNIGHT_MS
            } else {
                next_midnight_ms
            };
            assert!(admission.daily_reset_ms >= own_day_reset, "{admission:?}");
        }
        assert!(admission.counted_ms >= earliest_ms, "{admission:?}");
        match admission.daily_reset_ms {
            MIDNIGHT_MS => per_day[0] += 1,
            reset if reset == next_midnight_ms => per_day[1] += 1,
            other => panic!("counted on a day ending at {other}: {admission:?}"),
        }
    }
    let total = counted.len() as u64;
    assert!(
        per_day.iter().all(|count| *count <= DAILY_AMOUNT),
        "{per_day:?}"
    );
    assert!(total <= ROLLING_AMOUNT);
    assert!(
        total == ROLLING_AMOUNT || per_day[1] == DAILY_AMOUNT,
        "800 requests leave no room: {total} admitted, {per_day:?} per day"
    );
    // Everything is within the hour, so the rolling window holds every admission; the daily
    // count is what went into the day after midnight.
    let end_ms = around_midnight_ms(8);
    let report = engine.usage("k0", Some(end_ms)).expect("usage");
    assert_eq!(used(&report), [total, per_day[1]]);
    // One window and one bucket later, the rolling window is empty again.
    let later = engine
        .usage("k0", Some(end_ms + HOUR_MS + MINUTE_MS))
        .expect("usage");
    assert_eq!(used(&later), [0, per_day[1]]);
}

#[test]
fn timestamps_racing_across_a_bucket_and_midnight_never_over_admit_nor_count_in_the_past() {
    for _ in 0..10 {
        let (engine, counted) = race_around_midnight(false);
        verify_race_around_midnight(&engine, &counted);
    }
}

#[test]
fn a_clock_stepping_back_and_forth_across_midnight_never_over_admits() {
    for _ in 0..10 {
        let (engine, counted) = race_around_midnight(true);
        verify_race_around_midnight(&engine, &counted);
    }
}

// ---------------------------------------------------------------------------------------------
// (d) Many keys, seats changing under them.

#[test]
fn seats_changing_under_busy_keys_never_lose_usage_nor_over_admit() {
    const KEYS: usize = 16;
    const BIGGER_ROLLING: u64 = 40;
    let engine = engine_with_users(
        policy(&[("rolling:1h", 20), ("daily", 30)]),
        KEYS,
        WEDNESDAY_NOON_MS,
    );
    let at = Some(WEDNESDAY_NOON_MS);
    for key in 0..KEYS {
        engine
            .assign_seat(&format!("@u{key}"), &format!("u{key}"), "Team", at)
            .expect("seat");
    }
    let admitted: Vec<AtomicU64> = (0..KEYS).map(|_| AtomicU64::new(0)).collect();
    let running = AtomicBool::new(true);
    std::thread::scope(|scope| {
        let (engine, admitted, running) = (&engine, &admitted, &running);
        let seats = scope.spawn(move || {
            let plans = [Some("Bigger"), Some("Team"), None];
            let mut change = 0usize;
            while running.load(Ordering::Relaxed) || change < 100 {
                let key = (change * 5) % KEYS;
                let (team, user) = (format!("@u{key}"), format!("u{key}"));
                match plans[change % 3] {
                    Some(plan) => engine.assign_seat(&team, &user, plan, at),
                    None => engine.unassign_seat(&team, &user, at),
                }
                .expect("seat change");
                // Read before the report: every admission counted here is in the report.
                let counted = admitted[key].load(Ordering::Relaxed);
                let report = engine.usage(&format!("k{key}"), at).expect("usage");
                for limit in &report.limits {
                    // Usage counted under Bigger stays counted after a downgrade, so a report
                    // can exceed Team's amounts, never Bigger's.
                    assert!(limit.used <= BIGGER_ROLLING, "{report:?}");
                    assert!(
                        limit.used >= counted,
                        "lost usage: {counted} admitted, {report:?}"
                    );
                }
                change += 1;
                std::thread::yield_now();
            }
        });
        let workers: Vec<_> = (0..3u64)
            .map(|thread| {
                scope.spawn(move || {
                    for attempt in 0..40 {
                        for (key, admitted) in admitted.iter().enumerate() {
                            let at_ms = jittered_ms(WEDNESDAY_NOON_MS, thread, attempt);
                            let decision = chat(engine, &format!("k{key}"), 1, Some(at_ms));
                            if quota_admitted(&decision) {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            } else {
                                assert!(!decision.is_admitted(), "no credits: {decision:?}");
                            }
                        }
                    }
                })
            })
            .collect();
        // The seat changer stops however the workers end.
        let stops_the_seat_changer = log_support::StoreOnDrop(running, false);
        for worker in workers {
            worker.join().expect("worker");
        }
        drop(stops_the_seat_changer);
        seats.join().expect("seat changer");
    });
    let end = Some(WEDNESDAY_NOON_MS + 100 * SECOND_MS);
    for (key, admitted) in admitted.iter().enumerate() {
        let admitted = admitted.load(Ordering::Relaxed);
        let (name, team, user) = (format!("k{key}"), format!("@u{key}"), format!("u{key}"));
        assert!(admitted <= BIGGER_ROLLING, "k{key}: {admitted}");
        engine
            .assign_seat(&team, &user, "Bigger", end)
            .expect("seat");
        assert_eq!(
            used(&engine.usage(&name, end).expect("usage")),
            [admitted; 2],
            "{name}: the counts survived every seat change"
        );
        let mut more = 0;
        while quota_admitted(&chat(&engine, &name, 1, end)) {
            more += 1;
        }
        assert_eq!(admitted + more, BIGGER_ROLLING, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// (e) Stress: the head jumping past a whole window while another thread is mid-request.

/// Rounds of two threads: one consumes at `A`, the other at `B`, more than a window and a bucket
/// later. The unit consumed at `A` must be counted at `A` (and be out of the window at `B`) or at
/// `B`, never be lost and never linger: at `B` the window holds exactly the units counted at `B`.
///
/// On the earlier engine this failed in about 1 to 2.5% of rounds (debug build, 2 cores): `A`'s
/// unit, recorded after `B` moved the head past the whole window, stayed counted a whole window
/// after `B` instead of at most one bucket after `A + window`. On the current engine it passed
/// 10 runs of 2,000 rounds without one lingering unit (that rate would have given 20 to 50 a
/// run); the fix commit does not name this bug, so it stays here as a stress guard.
#[test]
fn a_head_jumping_a_whole_window_mid_request_leaves_exact_counts() {
    let (engine, clock) = engine_with_users_on_clock(
        policy(&[("rolling:1h", 1_000_000), ("daily", 1_000_000)]),
        1,
        WEDNESDAY_NOON_MS,
    );
    engine
        .assign_seat("@u0", "u0", "Team", Some(WEDNESDAY_NOON_MS))
        .expect("seat");
    let barrier = Barrier::new(2);
    let jump_ms = HOUR_MS + 2 * MINUTE_MS;
    let mut lingering = Vec::new();
    for round in 0..2_000u64 {
        let a_ms = MIDNIGHT_MS + 2 * HOUR_MS + round * 2 * jump_ms;
        let b_ms = a_ms + jump_ms;
        // The rounds go on for months of the clock.
        clock.set_ms(a_ms);
        let counted: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = [a_ms, b_ms]
                .into_iter()
                .map(|at_ms| {
                    let (engine, barrier) = (&engine, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        match chat(engine, "k0", 1, Some(at_ms)) {
                            Decision::Admitted(admission) => admission.at_ms,
                            other => panic!("refused: {other:?}"),
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("thread"))
                .collect()
        });
        let at_b = counted.iter().filter(|at| **at >= b_ms).count() as u64;
        let report = engine.usage("k0", Some(b_ms)).expect("usage");
        if report.limits[0].used != at_b {
            // How long past B the unit from A stays counted (B's own unit stays for an hour).
            let lingers_ms = (1..=60)
                .map(|minutes| minutes * MINUTE_MS)
                .find(|&after_ms| {
                    let report = engine.usage("k0", Some(b_ms + after_ms)).expect("usage");
                    report.limits[0].used == at_b
                });
            lingering.push((round, counted, report.limits[0].used, at_b, lingers_ms));
        }
    }
    assert!(
        lingering.is_empty(),
        "{} of 2,000 rounds left the unit counted at A in the window at B; \
         (round, [counted at], used at B, expected, lingers past B for): {:?}",
        lingering.len(),
        &lingering[..lingering.len().min(5)]
    );
}

/// Threads racing to consume under the same new request ids: each id is counted once, exactly
/// one thread per id is told its decision is the first (`replayed == false`), and every other
/// thread gets that same decision marked as a replay, through `consume` and `consume_many`.
#[test]
fn threads_racing_on_one_request_id_count_it_once_and_exactly_one_is_told_it_was_first() {
    const IDS: u64 = 200;
    let engine = engine_with_users(
        policy(&[("rolling:5h", 100_000), ("daily", 100_000)]),
        1,
        WEDNESDAY_NOON_MS,
    );
    engine
        .assign_seat("@u0", "u0", "Team", Some(WEDNESDAY_NOON_MS))
        .expect("seat");
    let firsts: Vec<AtomicU64> = (0..IDS).map(|_| AtomicU64::new(0)).collect();
    let barrier = Barrier::new(THREADS as usize);
    let quantities = [(Unit::Requests, 1)];
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (engine, firsts, barrier, quantities) = (&engine, &firsts, &barrier, &quantities);
            scope.spawn(move || {
                let ids: Vec<String> = (0..IDS).map(|id| format!("req-{id}")).collect();
                let requests: Vec<UsageRequest<'_>> = ids
                    .iter()
                    .map(|id| {
                        UsageRequest::new("k0", "chat", quantities)
                            .at(WEDNESDAY_NOON_MS)
                            .id(id)
                    })
                    .collect();
                barrier.wait();
                // Half the threads one request at a time, half in one batch.
                let answers: Vec<(Decision, bool)> = if thread % 2 == 0 {
                    requests
                        .iter()
                        .map(|request| engine.consume_noting_replay(request).expect("valid"))
                        .collect()
                } else {
                    let (results, replays) = engine.consume_many_noting_replay(&requests);
                    results
                        .into_iter()
                        .map(|result| result.expect("valid"))
                        .zip(replays)
                        .collect()
                };
                for (id, (decision, replayed)) in answers.iter().enumerate() {
                    assert!(decision.is_admitted(), "req-{id}: {decision:?}");
                    if !replayed {
                        firsts[id].fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    for (id, firsts) in firsts.iter().enumerate() {
        assert_eq!(
            firsts.load(Ordering::Relaxed),
            1,
            "req-{id}: threads told first"
        );
    }
    let report = engine.usage("k0", Some(WEDNESDAY_NOON_MS)).expect("usage");
    assert_eq!(used(&report), vec![IDS, IDS], "each id counted once");
    // A check of a remembered id is a replay too; of a new one, not.
    let known = UsageRequest::new("k0", "chat", &quantities)
        .at(WEDNESDAY_NOON_MS)
        .id("req-0");
    assert!(engine.check_noting_replay(&known).expect("valid").1);
    let new = UsageRequest::new("k0", "chat", &quantities)
        .at(WEDNESDAY_NOON_MS)
        .id("req-new");
    assert!(!engine.check_noting_replay(&new).expect("valid").1);
}
