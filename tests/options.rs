//! The engine's and the database's options: each is checked against its range before anything
//! is created, and a value out of range is an error naming the option, the value and what is
//! allowed. Both ends of every range are accepted and make an engine that works; one past either
//! end is refused. `Engine::open` with bad options creates no directory and changes no database.

mod log_support;

use std::path::Path;

use log_support::*;
use tally_engine::options::{
    MAX_IDEMPOTENCY_HORIZON_MS, MAX_PERIOD_MS, MAX_POLICY_GENERATIONS, MAX_TABLE_ENTRIES,
    MIN_POLICY_GENERATIONS, MIN_SEGMENT_BYTES,
};
use tally_engine::reservation::MAX_LEASE_MS;
use tally_engine::{
    Durability, Engine, EngineOptions, Error, OpenOptions, Policy, RecordedOptions, Unit,
    UsageRequest,
};

const ONE_REQUEST: [(Unit, u64); 1] = [(Unit::Requests, 1)];

fn new_engine(options: EngineOptions) -> Result<Engine, Error> {
    Engine::new(Policy::token_plan(), clock(), options)
}

/// The option an error names and what it says, or a panic if it is not an invalid option.
fn refusal(result: Result<Engine, Error>) -> (&'static str, String) {
    match result {
        Err(Error::InvalidArgument { field, problem }) => (field, problem),
        Err(other) => panic!("expected an invalid option, got {other:?}"),
        Ok(_) => panic!("expected an invalid option, the engine was created"),
    }
}

fn assert_refused(result: Result<Engine, Error>, option: &str, value: impl std::fmt::Display) {
    let (field, problem) = refusal(result);
    assert_eq!(field, option, "{problem}");
    assert!(
        problem.starts_with(&format!("{value} is out of range: allowed are ")),
        "{option}: {problem}"
    );
}

/// A user with a seat and one admitted request: the engine works.
fn admits(engine: &Engine) {
    engine
        .create_user("ada", "tp-ada", Some(T0_MS))
        .expect("user");
    engine
        .assign_seat("@ada", "ada", "Plus", Some(T0_MS))
        .expect("seat");
    let decision = engine
        .consume(&UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(T0_MS))
        .expect("consume");
    assert!(decision.is_admitted(), "{decision:?}");
}

/// The options of every bounded table, set to `value`.
fn with_table_bound(option: &str, value: u64) -> EngineOptions {
    let mut options = EngineOptions::default();
    let as_usize = usize::try_from(value).expect("a 64-bit target");
    match option {
        "max_keys" => options.max_keys = value,
        "max_teams" => options.max_teams = value,
        "max_users" => options.max_users = value,
        "idempotency_capacity" => options.idempotency_capacity = as_usize,
        "max_open_reservations" => options.max_open_reservations = as_usize,
        other => panic!("not a table: {other}"),
    }
    options
}

const TABLES: [&str; 5] = [
    "max_keys",
    "max_teams",
    "max_users",
    "idempotency_capacity",
    "max_open_reservations",
];

#[test]
fn the_default_options_make_an_engine_that_admits() {
    admits(&new_engine(EngineOptions::default()).expect("valid"));
}

#[test]
fn every_table_must_hold_at_least_one_entry() {
    for option in TABLES {
        assert_refused(new_engine(with_table_bound(option, 0)), option, 0);
        admits(&new_engine(with_table_bound(option, 1)).expect(option));
    }
}

#[test]
fn a_table_of_one_key_team_and_user_still_admits_its_one_user() {
    let options = EngineOptions {
        max_keys: 1,
        max_teams: 1,
        max_users: 1,
        ..EngineOptions::default()
    };
    let engine = new_engine(options).expect("valid");
    admits(&engine);
    assert!(matches!(
        engine.create_user("bob", "tp-bob", Some(T0_MS)),
        Err(Error::CapacityExceeded { .. })
    ));
}

#[test]
fn every_table_holds_at_most_two_to_the_thirty_two_entries() {
    for option in TABLES {
        new_engine(with_table_bound(option, MAX_TABLE_ENTRIES)).expect(option);
        assert_refused(
            new_engine(with_table_bound(option, MAX_TABLE_ENTRIES + 1)),
            option,
            MAX_TABLE_ENTRIES + 1,
        );
        assert_refused(
            new_engine(with_table_bound(option, u64::MAX)),
            option,
            u64::MAX,
        );
    }
}

#[test]
fn a_default_lease_must_be_positive_and_at_most_a_day() {
    for bad in [0, MAX_LEASE_MS + 1, u64::MAX] {
        let options = EngineOptions {
            default_lease_ms: bad,
            ..EngineOptions::default()
        };
        assert_refused(new_engine(options), "default_lease_ms", bad);
    }
    for good in [1, MAX_LEASE_MS] {
        let options = EngineOptions {
            default_lease_ms: good,
            ..EngineOptions::default()
        };
        let engine = new_engine(options).expect("valid");
        admits(&engine);
        let reserved = engine
            .reserve(
                &UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(T0_MS),
                None,
            )
            .expect("a reservation with the default lease");
        assert!(reserved.reservation.is_some(), "{reserved:?}");
    }
}

#[test]
fn an_idempotency_horizon_is_zero_or_at_most_the_longest_window_a_policy_may_have() {
    for good in [0, 1, MAX_IDEMPOTENCY_HORIZON_MS] {
        let options = EngineOptions {
            idempotency_horizon_ms: good,
            ..EngineOptions::default()
        };
        admits(&new_engine(options).expect("valid"));
    }
    for bad in [MAX_IDEMPOTENCY_HORIZON_MS + 1, u64::MAX] {
        let options = EngineOptions {
            idempotency_horizon_ms: bad,
            ..EngineOptions::default()
        };
        assert_refused(new_engine(options), "idempotency_horizon_ms", bad);
    }
}

#[test]
fn a_reclaim_interval_is_zero_for_never_or_at_most_the_span_of_timestamps() {
    for good in [0, 1, MAX_PERIOD_MS] {
        let options = EngineOptions {
            reclaim_idle_every_ms: good,
            ..EngineOptions::default()
        };
        admits(&new_engine(options).expect("valid"));
    }
    for bad in [MAX_PERIOD_MS + 1, u64::MAX] {
        let options = EngineOptions {
            reclaim_idle_every_ms: bad,
            ..EngineOptions::default()
        };
        assert_refused(new_engine(options), "reclaim_idle_every_ms", bad);
    }
}

#[test]
fn a_bound_on_timestamps_ahead_of_the_clock_is_zero_for_none_or_at_most_the_span_of_timestamps() {
    for good in [0, 1, MAX_PERIOD_MS] {
        let options = EngineOptions {
            max_ahead_of_clock_ms: good,
            ..EngineOptions::default()
        };
        admits(&new_engine(options).expect("valid"));
    }
    for bad in [MAX_PERIOD_MS + 1, u64::MAX] {
        let options = EngineOptions {
            max_ahead_of_clock_ms: bad,
            ..EngineOptions::default()
        };
        assert_refused(new_engine(options), "max_ahead_of_clock_ms", bad);
    }
}

/// One request stamped years ahead of the clock moved its key's windows there: for requests
/// stamped now its usage never aged out (a review saw a Starter key admit 1,499 of 1,500, then
/// nothing a day and a month later), and a reservation's lease never ended. With
/// `max_ahead_of_clock_ms` such a timestamp is refused naming `at_ms`, and changes nothing;
/// one within the bound is taken, and the bound follows the clock.
#[test]
fn a_timestamp_too_far_ahead_of_the_clock_is_refused_and_changes_nothing() {
    let clock = clock();
    let options = EngineOptions {
        max_ahead_of_clock_ms: DAY_MS,
        ..EngineOptions::default()
    };
    let engine = Engine::new(Policy::token_plan(), clock.clone(), options).expect("valid");
    admits(&engine);
    let years_ahead = T0_MS + 50 * 365 * DAY_MS;
    let ahead =
        |at_ms: u64| engine.consume(&UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(at_ms));
    for refused in [
        ahead(years_ahead),
        ahead(T0_MS + DAY_MS + 1),
        engine
            .reserve(
                &UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(years_ahead),
                Some(60_000),
            )
            .map(|outcome| outcome.decision),
    ] {
        match refused {
            Err(Error::InvalidArgument { field, problem }) => {
                assert_eq!(field, "at_ms");
                assert!(problem.contains("ahead of the engine's clock"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
    }
    let usage = engine.usage("tp-ada", Some(T0_MS)).expect("report");
    assert_eq!(usage.limits[0].used, 1, "only the request of `admits`");
    assert!(ahead(T0_MS + DAY_MS)
        .expect("within the bound")
        .is_admitted());
    // The window is a day on, not 50 years: the request of `admits` has aged out of the
    // 5-hour window, and 4,499 more fit beside the one just taken (Plus: 4,500).
    clock.set_ms(T0_MS + DAY_MS);
    let admitted = (0..4_500)
        .filter(|_| ahead(T0_MS + DAY_MS).expect("decided").is_admitted())
        .count();
    assert_eq!(admitted, 4_499);
    // The clock moved on a day: so did the bound.
    assert!(ahead(T0_MS + 2 * DAY_MS)
        .expect("within the bound")
        .is_admitted());
    assert!(ahead(T0_MS + 2 * DAY_MS + 1).is_err());
}

/// Safe by default: without a bound, one request stamped a month ahead (a client's bad clock)
/// moved its key's windows there for good and made its log segment too young to compact. The
/// default bound is a day: a stamp further ahead is refused naming `at_ms` and changes nothing
/// (no usage, no user, no credits, no reservation, no event logged); one within a day is taken.
#[test]
fn by_default_a_stamp_more_than_a_day_ahead_of_the_clock_is_refused_and_changes_nothing() {
    assert_eq!(EngineOptions::default().max_ahead_of_clock_ms, DAY_MS);
    assert_eq!(OpenOptions::default().engine.max_ahead_of_clock_ms, DAY_MS);
    assert_eq!(RecordedOptions::default().max_ahead_of_clock_ms, DAY_MS);
    let dir = TempDir::new("ahead-default");
    let engine =
        Engine::open(dir.path(), Policy::token_plan(), clock(), none_durability()).expect("open");
    admits(&engine);
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top-up");
    let events = |engine: &Engine| engine.events_after(0, usize::MAX).expect("events").len();
    let logged = events(&engine);
    let state = |engine: &Engine| {
        (
            engine.usage("tp-ada", Some(T0_MS)).expect("report").limits,
            engine.credits_micros("@ada").expect("balance"),
            engine.open_reservations(),
        )
    };
    let before = state(&engine);
    let request = |at_ms: u64| UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(at_ms);
    for at_ms in [T0_MS + DAY_MS + 1, T0_MS + 30 * DAY_MS] {
        let refusals = [
            engine.consume(&request(at_ms)).map(|_| ()),
            engine.check(&request(at_ms)).map(|_| ()),
            engine.reserve(&request(at_ms), None).map(|_| ()),
            engine.top_up("@ada", 1, Some(at_ms)).map(|_| ()),
            engine.create_user("bob", "tp-bob", Some(at_ms)),
            engine.assign_seat("@ada", "ada", "Max", Some(at_ms)),
        ];
        for refused in refusals {
            match refused {
                Err(Error::InvalidArgument { field, problem }) => {
                    assert_eq!(field, "at_ms");
                    assert!(problem.contains("max_ahead_of_clock_ms"), "{problem}");
                }
                other => panic!("{at_ms}: {other:?}"),
            }
        }
    }
    assert_eq!(state(&engine), before, "nothing changed");
    assert_eq!(events(&engine), logged, "nothing logged");
    assert!(engine.create_user("bob", "tp-bob", Some(T0_MS)).is_ok());
    // Within a day of the clock: taken.
    for at_ms in [T0_MS + DAY_MS - 1, T0_MS + DAY_MS] {
        assert!(engine
            .consume(&request(at_ms))
            .expect("taken")
            .is_admitted());
    }
    assert_eq!(
        engine
            .usage("tp-ada", Some(T0_MS + DAY_MS))
            .expect("report")
            .limits[0]
            .used,
        2
    );
}

/// The bound is read from the clock when a timestamp passes it, and at every housekeeping
/// look (every 256 requests of a thread): a clock stepped back lowers it there. Before, the
/// bound only ever rose, and a step back let timestamps through by as much as the step.
#[test]
fn a_clock_stepped_back_lowers_the_bound_ahead_of_it() {
    let clock = clock();
    clock.set_ms(T0_MS + 10 * DAY_MS);
    let options = EngineOptions {
        max_ahead_of_clock_ms: DAY_MS,
        ..EngineOptions::default()
    };
    let engine = Engine::new(Policy::token_plan(), clock.clone(), options).expect("valid");
    engine
        .create_user("ada", "tp-ada", Some(T0_MS + 11 * DAY_MS))
        .expect("a day ahead");
    engine
        .assign_seat("@ada", "ada", "Plus", Some(T0_MS + 10 * DAY_MS))
        .expect("seat");
    clock.set_ms(T0_MS);
    for _ in 0..300 {
        let _ = engine.consume(&UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(T0_MS));
    }
    let stepped_over = UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(T0_MS + 11 * DAY_MS);
    assert!(matches!(
        engine.consume(&stepped_over),
        Err(Error::InvalidArgument { field: "at_ms", .. })
    ));
}

/// The log's own timestamps are taken as they were logged when it is replayed, however far
/// ahead of the clock they are now (a clock set back, an engine that ran without a bound):
/// an acknowledged event is never refused at open. Later calls are held to the bound.
#[test]
fn events_logged_ahead_of_the_clock_replay_at_an_open_with_a_bound() {
    let dir = TempDir::new("ahead-replay");
    let options = none_durability();
    // An engine that ran without a bound (opted out), its stamps a month ahead of its clock.
    let unbounded = OpenOptions {
        engine: EngineOptions {
            max_ahead_of_clock_ms: 0,
            ..EngineOptions::default()
        },
        ..options.clone()
    };
    let engine = Engine::open(dir.path(), Policy::token_plan(), clock(), unbounded).expect("open");
    let later = T0_MS + 30 * DAY_MS;
    engine
        .create_user("ada", "tp-ada", Some(later))
        .expect("user");
    engine
        .assign_seat("@ada", "ada", "Plus", Some(later))
        .expect("seat");
    let request = UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(later);
    assert!(engine.consume(&request).expect("decided").is_admitted());
    drop(engine);
    // Opened again with the default bound, a day.
    let engine = Engine::open(dir.path(), Policy::token_plan(), clock(), options).expect("open");
    let usage = engine.usage("tp-ada", Some(T0_MS)).expect("report");
    assert_eq!(usage.limits[0].used, 1);
    assert!(matches!(
        engine.consume(&request),
        Err(Error::InvalidArgument { field: "at_ms", .. })
    ));
}

/// What was logged was acknowledged: an open with table bounds lower than what the database
/// holds is refused, with or without a checkpoint, naming the option, the bound and how many
/// are held (replayed whole, the engine ran above its own bounds). Before, the same database
/// opened or was refused depending on whether a checkpoint had been taken ("replaying event 3
/// (user_created): users: the bound of 1 is reached"), and then opened above its bounds
/// either way. An open with bounds at what it holds keeps it all and refuses the next.
#[test]
fn an_open_with_table_bounds_below_what_was_logged_is_refused_with_or_without_a_checkpoint() {
    let bounds = |keys, users, teams| OpenOptions {
        engine: EngineOptions {
            max_keys: keys,
            max_users: users,
            max_teams: teams,
            ..EngineOptions::default()
        },
        ..none_durability()
    };
    for checkpoint in [false, true] {
        let dir = TempDir::new(&format!("lower-bounds-{checkpoint}"));
        let engine = Engine::open(dir.path(), Policy::token_plan(), clock(), none_durability())
            .expect("open");
        for name in ["ada", "bob", "cy"] {
            engine
                .create_user(name, &format!("tp-{name}"), Some(T0_MS))
                .expect("user");
        }
        engine.create_team("lab", Some(T0_MS)).expect("team");
        engine
            .add_member("lab", "bob", "tp-bob-lab", Some(T0_MS))
            .expect("member");
        if checkpoint {
            engine.close().expect("close");
        } else {
            drop(engine);
        }
        // 4 keys, 3 users, 4 teams (3 Default Teams and lab).
        for (options, option, message) in [
            (bounds(1, 1, 1), "max_keys", "1 is below the 4 keys"),
            (bounds(4, 2, 4), "max_users", "2 is below the 3 users"),
            (bounds(4, 3, 3), "max_teams", "3 is below the 4 teams"),
        ] {
            match Engine::open(dir.path(), Policy::token_plan(), clock(), options) {
                Err(Error::InvalidArgument { field, problem }) => {
                    assert_eq!(field, option, "checkpoint {checkpoint}: {problem}");
                    assert!(problem.starts_with(message), "{problem}");
                }
                other => panic!("checkpoint {checkpoint}: {option}: {:?}", other.err()),
            }
        }
        let engine = Engine::open(dir.path(), Policy::token_plan(), clock(), bounds(4, 3, 4))
            .unwrap_or_else(|error| panic!("checkpoint {checkpoint}: {error}"));
        assert_eq!(engine.memory_stats().keys, 4, "checkpoint {checkpoint}");
        assert!(matches!(
            engine.create_user("dee", "tp-dee", Some(T0_MS)),
            Err(Error::CapacityExceeded { what: "users", .. })
        ));
        assert!(matches!(
            engine.create_team("lab-2", Some(T0_MS)),
            Err(Error::CapacityExceeded { what: "teams", .. })
        ));
        assert!(matches!(
            engine.add_member("lab", "cy", "tp-cy-lab", Some(T0_MS)),
            Err(Error::CapacityExceeded { what: "keys", .. })
        ));
    }
}

/// The same for what ages out: an open with a lower `idempotency_capacity` or
/// `max_open_reservations` than the request ids (within the horizon) or the open reservations
/// (their leases not ended) the database holds is refused, naming the option; one at what it
/// holds keeps every request id and reservation (each was acknowledged), answers a repeat and
/// settles a reservation as before, and refuses a new id or reservation until one ages out or
/// closes. Policy generations are kept past a lower `max_policy_generations` instead (a
/// generation is only ever added by a swap, and the next swap lets go of those past the
/// bound).
#[test]
fn an_open_with_lower_bounds_on_ids_reservations_and_generations_refuses_or_keeps_them() {
    let bounds = |ids, reservations| OpenOptions {
        engine: EngineOptions {
            idempotency_capacity: ids,
            max_open_reservations: reservations,
            max_policy_generations: 2,
            ..EngineOptions::default()
        },
        ..none_durability()
    };
    let request = |id| {
        UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST)
            .at(T0_MS)
            .id(id)
    };
    let held = UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(T0_MS);
    let kept = |engine: &Engine| {
        (0..6)
            .filter(|&generation| engine.policy_of_generation(generation).is_some())
            .count()
    };
    for checkpoint in [false, true] {
        let dir = TempDir::new(&format!("lower-bounds-ids-{checkpoint}"));
        let engine = ada_on_max(&dir);
        for id in ["id-0", "id-1", "id-2", "id-3"] {
            assert!(engine.consume(&request(id)).expect("consume").is_admitted());
        }
        let reservations: Vec<_> = (0..3)
            .map(|_| {
                engine
                    .reserve(&held, Some(HOUR_MS))
                    .expect("reserve")
                    .reservation
                    .expect("admitted")
            })
            .collect();
        for _ in 0..4 {
            engine
                .swap_policy(Policy::token_plan(), Some(T0_MS))
                .expect("swap");
        }
        assert_eq!(kept(&engine), 5, "the reservations hold every generation");
        if checkpoint {
            engine.close().expect("close");
        } else {
            drop(engine);
        }
        for (options, option, message) in [
            (
                bounds(3, 3),
                "idempotency_capacity",
                "3 is below the 4 request ids",
            ),
            (
                bounds(4, 2),
                "max_open_reservations",
                "2 is below the 3 reservations open",
            ),
        ] {
            match Engine::open(dir.path(), Policy::token_plan(), clock(), options) {
                Err(Error::InvalidArgument { field, problem }) => {
                    assert_eq!(field, option, "checkpoint {checkpoint}: {problem}");
                    assert!(problem.starts_with(message), "{problem}");
                }
                other => panic!("checkpoint {checkpoint}: {option}: {:?}", other.err()),
            }
        }
        let engine = Engine::open(dir.path(), Policy::token_plan(), clock(), bounds(4, 3))
            .unwrap_or_else(|error| panic!("checkpoint {checkpoint}: {error}"));
        let (_, replayed) = engine
            .consume_noting_replay(&request("id-3"))
            .expect("a repeat");
        assert!(replayed, "checkpoint {checkpoint}: id-3 is remembered");
        assert_eq!(
            engine.consume(&request("id-4")),
            Err(Error::CapacityExceeded {
                what: "request_id (idempotency table)",
                capacity: 4,
            })
        );
        assert_eq!(engine.open_reservations(), 3, "checkpoint {checkpoint}");
        assert_eq!(
            engine
                .reserve(&held, None)
                .map(|outcome| outcome.reservation),
            Err(Error::CapacityExceeded {
                what: "reservations",
                capacity: 3,
            })
        );
        for reservation in reservations {
            engine.void(reservation, Some(T0_MS)).expect("void");
        }
        assert_eq!(
            kept(&engine),
            5,
            "checkpoint {checkpoint}: until the next swap"
        );
        engine
            .swap_policy(Policy::token_plan(), Some(T0_MS))
            .expect("swap");
        assert_eq!(kept(&engine), 2, "checkpoint {checkpoint}");
        assert!(engine
            .reserve(&held, None)
            .expect("reserve")
            .reservation
            .is_some());
    }
}

/// `engine`'s database in `dir` opened again with `options`, after a `close()` (a checkpoint:
/// the open restores a snapshot) or a drop (it replays the log).
fn reopened(engine: Engine, dir: &TempDir, checkpoint: bool, options: &OpenOptions) -> Engine {
    if checkpoint {
        engine.close().expect("close");
    } else {
        drop(engine);
    }
    Engine::open(dir.path(), Policy::token_plan(), clock(), options.clone())
        .unwrap_or_else(|error| panic!("checkpoint {checkpoint}: {error}"))
}

/// A database opened in `dir` with the default bounds, holding user ada (key `tp-ada`) seated
/// on Max in her Default Team.
fn ada_on_max(dir: &TempDir) -> Engine {
    let engine =
        Engine::open(dir.path(), Policy::token_plan(), clock(), none_durability()).expect("open");
    engine
        .create_user("ada", "tp-ada", Some(T0_MS))
        .expect("user");
    engine
        .assign_seat("@ada", "ada", "Max", Some(T0_MS))
        .expect("seat");
    engine
}

/// The same for the closed reservations a repeated settle answers from: an open with a lower
/// `max_open_reservations` than the database ran with forgot, as it restored or replayed them,
/// the oldest of the settlements it had acknowledged, so settling one again was
/// `UnknownReservation` instead of its settlement. They are kept until enough age out or
/// close: the next close forgets the oldest past the bound.
#[test]
fn an_open_with_a_lower_bound_on_reservations_keeps_the_closed_ones_it_restores() {
    let small = OpenOptions {
        engine: EngineOptions {
            max_open_reservations: 2,
            ..EngineOptions::default()
        },
        ..none_durability()
    };
    let held = UsageRequest::new("tp-ada", "m2.7", &ONE_REQUEST).at(T0_MS);
    for checkpoint in [false, true] {
        let dir = TempDir::new(&format!("lower-bounds-closed-{checkpoint}"));
        let engine = ada_on_max(&dir);
        let settled: Vec<_> = (0..3)
            .map(|_| {
                let id = engine
                    .reserve(&held, Some(HOUR_MS))
                    .expect("reserve")
                    .reservation
                    .expect("admitted");
                let settlement = engine
                    .settle(id, &ONE_REQUEST, Some(T0_MS))
                    .expect("settle");
                (id, settlement)
            })
            .collect();
        let engine = reopened(engine, &dir, checkpoint, &small);
        for (id, settlement) in &settled {
            assert_eq!(
                engine.settle(*id, &ONE_REQUEST, Some(T0_MS)).as_ref(),
                Ok(settlement),
                "checkpoint {checkpoint}: reservation {}",
                id.get()
            );
        }
        // Cut under the lower bound, the snapshot keeps them too, and `verify` finds it
        // matches a replay of the log.
        engine.checkpoint().expect("checkpoint");
        drop(engine);
        let verified = Engine::verify(dir.path(), small.clone()).expect("verify");
        assert_eq!(
            verified.problems,
            Vec::<String>::new(),
            "checkpoint {checkpoint}"
        );
        let engine = Engine::open(dir.path(), Policy::token_plan(), clock(), small.clone())
            .unwrap_or_else(|error| panic!("checkpoint {checkpoint}: {error}"));
        // A new close: the bound holds again, the oldest forgotten first.
        let id = engine
            .reserve(&held, Some(HOUR_MS))
            .expect("reserve")
            .reservation
            .expect("admitted");
        engine.void(id, Some(T0_MS)).expect("void");
        let (oldest, _) = settled[0];
        assert_eq!(
            engine.settle(oldest, &ONE_REQUEST, Some(T0_MS)),
            Err(Error::UnknownReservation {
                reservation: oldest.get()
            }),
            "checkpoint {checkpoint}"
        );
        let (newest, settlement) = &settled[2];
        assert_eq!(
            engine.settle(*newest, &ONE_REQUEST, Some(T0_MS)).as_ref(),
            Ok(settlement),
            "checkpoint {checkpoint}"
        );
    }
}

#[test]
fn at_least_two_and_at_most_65536_policy_generations_are_kept() {
    for bad in [0, 1, MAX_POLICY_GENERATIONS + 1, usize::MAX] {
        let options = EngineOptions {
            max_policy_generations: bad,
            ..EngineOptions::default()
        };
        assert_refused(new_engine(options), "max_policy_generations", bad);
    }
    for good in [MIN_POLICY_GENERATIONS, MAX_POLICY_GENERATIONS] {
        let options = EngineOptions {
            max_policy_generations: good,
            ..EngineOptions::default()
        };
        let engine = new_engine(options).expect("valid");
        admits(&engine);
        engine
            .swap_policy(Policy::token_plan(), Some(T0_MS))
            .expect("swap");
    }
}

#[test]
fn the_error_names_the_option_its_value_and_the_range_allowed() {
    let options = EngineOptions {
        reclaim_idle_every_ms: u64::MAX,
        ..EngineOptions::default()
    };
    let error = new_engine(options).expect_err("refused");
    assert_eq!(
        error.to_string(),
        format!(
            "reclaim_idle_every_ms: {} is out of range: allowed are 0 (never) or 1 to {MAX_PERIOD_MS} ms",
            u64::MAX
        )
    );
}

// ---- Opening a database --------------------------------------------------------------------------

fn open_with(dir: &Path, options: OpenOptions) -> Result<Engine, Error> {
    Engine::open(dir, Policy::token_plan(), clock(), options)
}

fn none_durability() -> OpenOptions {
    OpenOptions {
        durability: Durability::None,
        ..OpenOptions::default()
    }
}

/// Every file under `dir` with its contents, in path order.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                found.push((path, bytes));
            }
        }
    }
    found.sort();
    found
}

/// One bad value of each option `OpenOptions` holds beyond the engine's, and one of the engine's.
fn bad_open_options() -> Vec<(&'static str, OpenOptions)> {
    vec![
        (
            "checkpoint_every_events",
            OpenOptions {
                checkpoint_every_events: 0,
                ..none_durability()
            },
        ),
        (
            "retention_ms",
            OpenOptions {
                retention_ms: MAX_PERIOD_MS + 1,
                ..none_durability()
            },
        ),
        (
            "segment_bytes",
            OpenOptions {
                segment_bytes: MIN_SEGMENT_BYTES - 1,
                ..none_durability()
            },
        ),
        (
            "durability",
            OpenOptions {
                durability: Durability::Interval { ms: 0 },
                ..none_durability()
            },
        ),
        (
            "max_keys",
            OpenOptions {
                engine: EngineOptions {
                    max_keys: 0,
                    ..EngineOptions::default()
                },
                ..none_durability()
            },
        ),
    ]
}

#[test]
fn bad_options_on_open_create_no_database_directory() {
    for (option, options) in bad_open_options() {
        let dir = TempDir::new("options-none");
        assert_eq!(refusal(open_with(dir.path(), options)).0, option);
        assert!(!dir.path().exists(), "{option}: the directory was created");
    }
}

#[test]
fn bad_options_on_open_leave_an_existing_database_as_it_was() {
    let dir = TempDir::new("options-existing");
    let engine = open_with(dir.path(), none_durability()).expect("open");
    admits(&engine);
    let usage = engine.usage("tp-ada", Some(T0_MS)).expect("usage");
    engine.close().expect("close");
    let before = files(dir.path());
    for (option, options) in bad_open_options() {
        assert_eq!(refusal(open_with(dir.path(), options)).0, option);
        assert_eq!(files(dir.path()), before, "{option} changed the database");
    }
    let reopened = open_with(dir.path(), none_durability()).expect("reopen");
    assert_eq!(reopened.usage("tp-ada", Some(T0_MS)).expect("usage"), usage);
}

#[test]
fn a_checkpoint_interval_must_be_at_least_one_event() {
    let dir = TempDir::new("options-checkpoint");
    assert_refused(
        open_with(
            dir.path(),
            OpenOptions {
                checkpoint_every_events: 0,
                ..none_durability()
            },
        ),
        "checkpoint_every_events",
        0,
    );
    for good in [1, u64::MAX] {
        let engine = open_with(
            dir.path(),
            OpenOptions {
                checkpoint_every_events: good,
                ..none_durability()
            },
        )
        .expect("valid");
        engine.close().expect("close");
    }
}

#[test]
fn a_retention_is_at_most_the_span_of_timestamps() {
    let dir = TempDir::new("options-retention");
    for bad in [MAX_PERIOD_MS + 1, u64::MAX] {
        let options = OpenOptions {
            retention_ms: bad,
            ..none_durability()
        };
        assert_refused(open_with(dir.path(), options), "retention_ms", bad);
    }
    for good in [0, MAX_PERIOD_MS] {
        let options = OpenOptions {
            retention_ms: good,
            ..none_durability()
        };
        let engine = open_with(dir.path(), options).expect("valid");
        engine.compact(Some(T0_MS)).expect("compact");
        engine.close().expect("close");
    }
}

#[test]
fn a_log_segment_is_at_least_256_bytes() {
    let dir = TempDir::new("options-segment");
    for bad in [0, 1, MIN_SEGMENT_BYTES - 1] {
        let options = OpenOptions {
            segment_bytes: bad,
            ..none_durability()
        };
        assert_refused(open_with(dir.path(), options), "segment_bytes", bad);
    }
    for good in [MIN_SEGMENT_BYTES, u64::MAX] {
        let options = OpenOptions {
            segment_bytes: good,
            ..none_durability()
        };
        let engine = open_with(dir.path(), options).expect("valid");
        engine.close().expect("close");
    }
}

#[test]
fn a_flush_interval_is_one_millisecond_to_a_minute() {
    let dir = TempDir::new("options-interval");
    for bad in [0, 60_001, u64::MAX] {
        let options = OpenOptions {
            durability: Durability::Interval { ms: bad },
            ..OpenOptions::default()
        };
        assert_refused(open_with(dir.path(), options), "durability", bad);
    }
    for good in [1, 60_000] {
        let options = OpenOptions {
            durability: Durability::Interval { ms: good },
            ..OpenOptions::default()
        };
        let engine = open_with(dir.path(), options).expect("valid");
        engine.close().expect("close");
    }
}

#[test]
fn verify_refuses_bad_options_before_reading_the_database() {
    let dir = TempDir::new("options-verify");
    let engine = open_with(dir.path(), none_durability()).expect("open");
    engine.close().expect("close");
    let options = OpenOptions {
        engine: EngineOptions {
            default_lease_ms: 0,
            ..EngineOptions::default()
        },
        ..none_durability()
    };
    let error = Engine::verify(dir.path(), options).expect_err("refused");
    assert!(
        matches!(
            error,
            Error::InvalidArgument {
                field: "default_lease_ms",
                ..
            }
        ),
        "{error:?}"
    );
    let report = Engine::verify(dir.path(), none_durability()).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

// ---------------------------------------------------------------------------------------------
// Options recorded in the database.

/// Options unlike the defaults in every recorded field.
fn gateway_options() -> OpenOptions {
    OpenOptions {
        durability: Durability::None,
        engine: EngineOptions {
            max_keys: 3,
            max_teams: 11,
            max_users: 12,
            idempotency_capacity: 13,
            idempotency_horizon_ms: 20 * DAY_MS,
            max_open_reservations: 14,
            default_lease_ms: 15 * MINUTE_MS,
            max_policy_generations: 2,
            reclaim_idle_every_ms: 0,
            expire_leases_on_its_own: false,
            max_ahead_of_clock_ms: 400 * DAY_MS,
        },
        checkpoint_every_events: 77,
        retention_ms: 30 * DAY_MS,
        ..OpenOptions::default()
    }
}

fn recorded(dir: &Path) -> Option<RecordedOptions> {
    Engine::recorded_options(dir).expect("read the recorded options")
}

/// The engine options an open with `options` runs with (the database is closed again).
fn runs_with(dir: &Path, options: OpenOptions) -> EngineOptions {
    let engine = open_with(dir, options).expect("open");
    let runs = *engine.options();
    engine.close().expect("close");
    runs
}

fn use_recorded() -> OpenOptions {
    OpenOptions {
        use_recorded: true,
        ..none_durability()
    }
}

#[test]
fn a_database_records_its_options_and_a_tool_runs_it_with_them() {
    let dir = TempDir::new("options-recorded");
    let gateway = gateway_options();
    open_with(dir.path(), gateway.clone())
        .expect("open")
        .close()
        .expect("close");
    assert_eq!(recorded(dir.path()), Some(RecordedOptions::of(&gateway)));
    assert_ne!(RecordedOptions::of(&gateway), RecordedOptions::default());

    // A tool asking for the recorded options gets the gateway's, not its own defaults...
    let engine = open_with(dir.path(), use_recorded()).expect("open as recorded");
    assert_eq!(*engine.options(), gateway.engine);
    // ... and they hold: a fourth key is refused by the gateway's bound of 3.
    for user in ["u1", "u2", "u3"] {
        engine
            .create_user(user, &format!("key-{user}"), Some(T0_MS))
            .expect("within the bound");
    }
    let refused = engine.create_user("u4", "key-u4", Some(T0_MS));
    assert!(
        matches!(refused, Err(Error::CapacityExceeded { .. })),
        "{refused:?}"
    );
    engine.close().expect("close");
    assert_eq!(
        recorded(dir.path()),
        Some(RecordedOptions::of(&gateway)),
        "the gateway's record stays"
    );

    // A gateway opening with options of its own (not as recorded) runs and records them.
    let changed = OpenOptions {
        retention_ms: DAY_MS,
        ..gateway_options()
    };
    assert_eq!(runs_with(dir.path(), changed.clone()), changed.engine);
    assert_eq!(recorded(dir.path()), Some(RecordedOptions::of(&changed)));
}

#[test]
fn a_tool_opening_as_recorded_records_nothing() {
    // A database with no record (new, or from a build before records): the tool runs with the
    // options it gave, and leaves the record to the database's owner.
    let dir = TempDir::new("options-recorded-new");
    let options = OpenOptions {
        use_recorded: true,
        ..gateway_options()
    };
    assert_eq!(runs_with(dir.path(), options.clone()), options.engine);
    assert_eq!(recorded(dir.path()), None);

    // A record from a newer build, with an option this one does not know: a tool runs with what
    // it knows of it and leaves the record byte for byte as it was.
    let newer = br#"{"max_keys": 3, "an_option_from_a_newer_build": 42}"#;
    let log = tally_engine::log::EventLog::open_with(
        dir.path(),
        Durability::None,
        None,
        tally_engine::log::SEGMENT_BYTES,
    )
    .expect("the log opens");
    log.record_options(newer).expect("recorded");
    log.close().expect("close");
    drop(log);
    assert_eq!(runs_with(dir.path(), use_recorded()).max_keys, 3);
    let log = tally_engine::log::EventLog::open_read_only(dir.path()).expect("read");
    assert_eq!(
        log.recorded_options().expect("read").as_deref(),
        Some(&newer[..])
    );
}

#[test]
fn reading_options_or_verifying_where_there_is_no_database_creates_none() {
    let dir = TempDir::new("options-recorded-nothing");
    let missing = dir.path().join("missing");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).expect("an empty directory");
    for path in [&missing, &empty] {
        let read = Engine::recorded_options(path);
        assert!(
            matches!(&read, Err(Error::Storage { problem }) if problem.contains("holds no tally database")),
            "{read:?}"
        );
        let verified = Engine::verify(path, use_recorded());
        assert!(verified.is_err(), "{path:?}: {verified:?}");
    }
    assert!(!missing.exists(), "nothing was created");
    assert_eq!(
        std::fs::read_dir(&empty).expect("listed").count(),
        0,
        "the empty directory stays empty"
    );
    // A directory of other files is said to be one, and left as it was.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("a directory");
    std::fs::write(other.join("notes.txt"), "keep me").expect("a file");
    let read = Engine::recorded_options(&other);
    assert!(
        matches!(&read, Err(Error::Storage { problem })
            if problem.contains("holds files that are not a tally database")),
        "{read:?}"
    );
    assert!(Engine::verify(&other, use_recorded()).is_err());
    assert_eq!(std::fs::read_dir(&other).expect("listed").count(), 1);
}

/// A folder that only looks like a database is refused and left as it was: a project with a
/// `db` directory (a Rails app), or the operator's files with a `conf` among them. Either name
/// was taken for sled's, and the open wrote its files into the folder (overwriting that
/// `conf`). A database whose creation was cut short (sled's `conf` and `blobs` only) still opens.
#[test]
fn a_folder_that_only_looks_like_a_database_is_refused_and_left_alone() {
    let dir = TempDir::new("options-looks-like-a-database");
    let project = dir.path().join("project");
    std::fs::create_dir_all(project.join("db")).expect("a db directory");
    std::fs::write(project.join("Gemfile"), "gem \"rails\"\n").expect("a file");
    let settings = dir.path().join("settings");
    std::fs::create_dir_all(&settings).expect("a directory");
    std::fs::write(settings.join("conf"), "answer = 42\n").expect("a conf file");
    std::fs::write(settings.join("notes.txt"), "keep me\n").expect("a file");
    for folder in [&project, &settings] {
        let before = files(folder);
        let opened = open_with(folder, none_durability());
        assert!(
            matches!(&opened, Err(Error::Storage { problem })
                if problem.contains("holds files that are not a tally database")),
            "{folder:?}: {:?}",
            opened.err()
        );
        assert_eq!(files(folder), before, "{folder:?} was written into");
        assert_eq!(
            std::fs::read_dir(folder).expect("listed").count(),
            2,
            "{folder:?}: nothing was added"
        );
    }

    // Cut short: what sled wrote first, and nothing else.
    let cut_short = dir.path().join("cut-short");
    let whole = dir.path().join("whole");
    drop(open_with(&whole, none_durability()).expect("a new database"));
    std::fs::create_dir_all(cut_short.join("blobs")).expect("blobs");
    std::fs::copy(whole.join("conf"), cut_short.join("conf")).expect("sled's conf");
    let engine = open_with(&cut_short, none_durability()).expect("a database cut short opens");
    drop(engine);
    drop(open_with(&cut_short, none_durability()).expect("and opens again"));
}

#[test]
fn a_refused_open_records_nothing() {
    let dir = TempDir::new("options-recorded-refused");
    let engine = open_with(dir.path(), none_durability()).expect("open");
    engine
        .create_user("ada", "tp-ada", Some(T0_MS))
        .expect("user");
    engine
        .assign_seat("@ada", "ada", "Starter", Some(T0_MS))
        .expect("seat");
    engine.close().expect("close");
    let before = recorded(dir.path());
    assert_eq!(before, Some(RecordedOptions::of(&none_durability())));

    // A policy without Starter, where a seat is on Starter: the open is refused.
    let mut document = Policy::token_plan().document().clone();
    assert!(document.plans.remove("Starter").is_some());
    let without_starter = Policy::compile(document).expect("a valid policy");
    let refused = Engine::open(dir.path(), without_starter, clock(), gateway_options());
    assert!(refused.is_err(), "the swap drops a seated plan");
    assert_eq!(
        recorded(dir.path()),
        before,
        "the refused open recorded nothing"
    );
}

#[test]
fn verify_as_recorded_replays_with_the_options_the_database_ran_with() {
    let dir = TempDir::new("options-recorded-verify");
    let options = OpenOptions {
        engine: EngineOptions {
            max_policy_generations: 2,
            ..EngineOptions::default()
        },
        ..none_durability()
    };
    let engine = open_with(dir.path(), options).expect("open");
    for swap in 0..4 {
        engine
            .swap_policy(Policy::token_plan(), Some(T0_MS + swap))
            .expect("swap");
    }
    engine.checkpoint().expect("checkpoint");
    engine.close().expect("close");

    // The defaults keep 1,024 generations, the database ran with 2: the replay keeps every
    // generation it passes through and is compared on those the snapshot kept, so either
    // matches (a snapshot taken under another bound is no mismatch).
    let defaults = Engine::verify(dir.path(), none_durability()).expect("verify");
    assert_eq!(defaults.snapshot_matches_replay, Some(true));
    assert!(!defaults.replayed_with_recorded_options);
    let as_recorded = Engine::verify(dir.path(), use_recorded()).expect("verify");
    assert_eq!(as_recorded.snapshot_matches_replay, Some(true));
    assert!(as_recorded.replayed_with_recorded_options);
    assert!(as_recorded.is_sound(), "{:?}", as_recorded.problems);
}

#[test]
fn recorded_options_that_do_not_decode_or_are_out_of_range_are_a_damaged_database() {
    for (label, bytes) in [
        ("garbage", b"{not json".to_vec()),
        ("out-of-range", {
            let mut out_of_range = RecordedOptions::default();
            out_of_range.max_keys = 0;
            out_of_range.encode()
        }),
    ] {
        let dir = TempDir::new(&format!("options-recorded-{label}"));
        open_with(dir.path(), none_durability())
            .expect("open")
            .close()
            .expect("close");
        let log = tally_engine::log::EventLog::open_with(
            dir.path(),
            Durability::None,
            None,
            tally_engine::log::SEGMENT_BYTES,
        )
        .expect("the log opens");
        log.record_options(&bytes).expect("recorded");
        log.close().expect("close");
        drop(log);

        for result in [
            open_with(dir.path(), use_recorded()).map(|_| ()),
            Engine::recorded_options(dir.path()).map(|_| ()),
        ] {
            match result {
                Err(Error::Storage { problem }) => {
                    assert!(problem.contains("recorded options"), "{label}: {problem}")
                }
                other => panic!("{label}: expected a storage error, got {other:?}"),
            }
        }
        // verify reports it among the problems (and replays with the options given).
        let report = Engine::verify(dir.path(), use_recorded()).expect("verify runs");
        assert!(!report.is_sound(), "{label}");
        assert!(
            report
                .problems
                .iter()
                .any(|problem| problem.contains("recorded options")),
            "{label}: {:?}",
            report.problems
        );
        assert_eq!(report.snapshot_matches_replay, Some(true), "{label}");
        assert!(!report.replayed_with_recorded_options, "{label}");
        // Options given explicitly still open it (and record themselves over the damage).
        open_with(dir.path(), none_durability())
            .expect("open with options given")
            .close()
            .expect("close");
        assert_eq!(
            recorded(dir.path()),
            Some(RecordedOptions::of(&none_durability()))
        );
    }
}
