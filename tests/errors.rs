//! Bad input: every malformed call gives an error naming the offending field, and changes nothing
//! (checked with a usage report and the team's balance before and after); malformed policies are
//! refused with the path of the offending field.

mod common;

use common::*;
use tally_engine::{
    Engine, Error, Policy, PolicyError, Unit, UsageReport, UsageRequest, MAX_CREDITS_MICROS,
};

/// 2^40, the largest quantity of one unit in one request.
const MAX_QUANTITY: u64 = 1 << 40;
/// 2100-01-01T00:00:00Z, the first timestamp tally refuses.
const YEAR_2100_MS: u64 = 4_102_444_800_000;

struct World {
    engine: Engine,
    clock: std::sync::Arc<tally_engine::ManualClock>,
    key: String,
}

/// A Plus key with some usage on two windows and credits in its Default Team.
fn world() -> World {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Plus");
    assert_eq!(m27_requests(&engine, &key, 5, T0_MS), 5);
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 2, T0_MS),
        2
    );
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    World { engine, clock, key }
}

impl World {
    fn snapshot(&self) -> (UsageReport, u64, u64) {
        (
            self.engine.usage(&self.key, Some(T0_MS)).expect("report"),
            self.engine.credits_micros("@ada").expect("balance"),
            self.engine.open_reservations() as u64,
        )
    }

    /// Runs `call`, expects an error, and checks that nothing changed.
    fn refuses<T: std::fmt::Debug>(&self, call: impl FnOnce(&Engine) -> Result<T, Error>) -> Error {
        let before = self.snapshot();
        let error = call(&self.engine).expect_err("bad input is an error");
        assert_eq!(self.snapshot(), before, "{error:?} changed something");
        error
    }
}

/// The field an `InvalidArgument` names.
fn field(error: &Error) -> &'static str {
    match error {
        Error::InvalidArgument { field, .. } => field,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// Consume, check and an id-carrying consume of the same bad request all fail on `expected`;
/// the request id stays free for a good request.
fn assert_bad_request(world: &World, request: UsageRequest<'_>, expected: &str) {
    for call in 0..3 {
        let error = world.refuses(|engine| match call {
            0 => engine.consume(&request),
            1 => engine.check(&request),
            _ => engine.consume(&request.id("bad-1")),
        });
        let text = error.to_string();
        assert!(
            text.starts_with(expected),
            "{text:?} should start with {expected:?}"
        );
    }
    let fine = [(Unit::Requests, 1)];
    let good = UsageRequest::new(&world.key, "m2.7", &fine)
        .at(T0_MS)
        .id("bad-1");
    assert!(world
        .engine
        .consume(&good)
        .expect("the id is free")
        .is_admitted());
    assert_eq!(
        world
            .engine
            .refund("bad-1", Some(T0_MS))
            .expect("refund")
            .given_back
            .total(),
        1
    );
}

// ---- Requests ---------------------------------------------------------------------------------

#[test]
fn an_unknown_resource_is_an_error_naming_it_and_changes_nothing() {
    let world = world();
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new(&world.key, "m9", &one).at(T0_MS);
    assert_bad_request(&world, request, "resource:");
    assert_eq!(
        world.engine.consume(&request),
        Err(Error::UnknownResource {
            resource: "m9".into()
        })
    );
}

#[test]
fn a_unit_the_resource_does_not_meter_is_an_error_and_changes_nothing() {
    let world = world();
    let images = [(Unit::Requests, 1), (Unit::Images, 1)];
    let request = UsageRequest::new(&world.key, "m2.7", &images).at(T0_MS);
    assert_bad_request(&world, request, "quantities:");
    let error = world.engine.consume(&request).expect_err("an error");
    assert_eq!(field(&error), "quantities");
    assert!(error.to_string().contains("images"), "{error}");
}

#[test]
fn a_zero_quantity_is_an_error_and_changes_nothing() {
    let world = world();
    let zero = [(Unit::Requests, 1), (Unit::Tokens, 0)];
    let request = UsageRequest::new(&world.key, "m2.7", &zero).at(T0_MS);
    assert_bad_request(&world, request, "quantities:");
    let error = world.engine.consume(&request).expect_err("an error");
    assert!(error.to_string().contains("tokens"), "{error}");
}

#[test]
fn a_quantity_above_2_to_the_40_is_an_error_and_2_to_the_40_is_not() {
    let world = world();
    // Each with the one request an m2.7 call must carry, so only the size can be wrong.
    let huge = [(Unit::Requests, 1), (Unit::Tokens, MAX_QUANTITY + 1)];
    let request = UsageRequest::new(&world.key, "m2.7", &huge).at(T0_MS);
    assert_bad_request(&world, request, "quantities:");
    let error = world.engine.consume(&request).expect_err("an error");
    assert!(
        error.to_string().contains(&MAX_QUANTITY.to_string()),
        "{error}"
    );
    let largest = [(Unit::Requests, 1), (Unit::Tokens, MAX_QUANTITY)];
    let answer = world
        .engine
        .check(&UsageRequest::new(&world.key, "m2.7", &largest).at(T0_MS));
    assert!(answer.is_ok(), "2^40 is a valid quantity: {answer:?}");
}

#[test]
fn a_unit_given_twice_is_an_error_and_changes_nothing() {
    let world = world();
    let twice = [(Unit::Requests, 1), (Unit::Requests, 1)];
    let request = UsageRequest::new(&world.key, "m2.7", &twice).at(T0_MS);
    assert_bad_request(&world, request, "quantities:");
    let error = world.engine.consume(&request).expect_err("an error");
    assert!(error.to_string().contains("twice"), "{error}");
}

/// Resources declare the units every request must carry (token-plan.toml `required`): without
/// them a call would pass its quota for free (a speech call without characters).
#[test]
fn a_request_missing_a_required_unit_is_an_error_naming_quantities_and_changes_nothing() {
    // (resource, what the request carries, the required unit it lacks)
    type Case<'a> = (&'a str, &'a [(Unit, u64)], Unit);
    let cases: [Case; 5] = [
        ("m2.7", &[(Unit::Tokens, 500)], Unit::Requests),
        ("speech-2.8", &[(Unit::Requests, 1)], Unit::Characters),
        ("image-01", &[(Unit::Requests, 1)], Unit::Images),
        ("music-2.6", &[(Unit::Songs, 1)], Unit::Seconds),
        // Not covered by Plus (credits would pay): still refused before anything is tried.
        ("hailuo-2.3-768p-6s", &[(Unit::Requests, 1)], Unit::Videos),
    ];
    for (resource, quantities, missing) in cases {
        let world = world();
        let request = UsageRequest::new(&world.key, resource, quantities).at(T0_MS);
        assert_bad_request(&world, request, "quantities:");
        let error = world.refuses(|engine| engine.consume(&request));
        assert_eq!(field(&error), "quantities", "{resource}");
        assert!(
            error.to_string().contains(missing.name()),
            "{resource}: {error}"
        );
        let error = world.refuses(|engine| engine.reserve(&request, None));
        assert_eq!(field(&error), "quantities", "{resource}");
    }

    // A pay-as-you-go key is held to the same rule, and spends nothing.
    let world = world();
    world
        .engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .expect("payg key");
    let words = [(Unit::Requests, 1)];
    let request = UsageRequest::new("payg-ada", "speech-2.8", &words).at(T0_MS);
    let error = world.refuses(|engine| engine.consume(&request));
    assert_eq!(field(&error), "quantities");
    let report = world.engine.usage("payg-ada", Some(T0_MS)).expect("report");
    assert_eq!(report.payg_micros, 0);
}

#[test]
fn empty_quantities_are_an_error_and_change_nothing() {
    let world = world();
    let request = UsageRequest::new(&world.key, "m2.7", &[]).at(T0_MS);
    assert_bad_request(&world, request, "quantities:");
}

#[test]
fn a_price_that_overflows_64_bits_is_an_error_and_changes_nothing() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.gold]
units = ["requests", "tokens"]
price_micros = { requests = 1099511627776, tokens = 1099511627776 }
[plans.Rich]
limits = [{ resource = "gold", unit = "requests", amount = 10, window = "daily" }]
"#,
    )
    .expect("a valid policy");
    let engine = engine_with(policy);
    let seated_key = seated(&engine, "ada", "Rich");
    let seatless_key = user(&engine, "bob");
    engine
        .top_up("@ada", u64::MAX / 2, Some(T0_MS))
        .expect("top up");
    engine
        .top_up("@bob", u64::MAX / 2, Some(T0_MS))
        .expect("top up");
    // 2^40 micros per token times 2^24 tokens is 2^64: one more than a u64 holds.
    let tokens = [(Unit::Requests, 1), (Unit::Tokens, 1 << 24)];
    for key in [&seated_key, &seatless_key] {
        let team = if *key == seated_key { "@ada" } else { "@bob" };
        let before = engine.credits_micros(team).expect("balance");
        let request = UsageRequest::new(key, "gold", &tokens).at(T0_MS);
        for answer in [
            engine.consume(&request),
            engine.check(&request),
            engine.consume(&request.id("x")),
        ] {
            assert_eq!(
                answer,
                Err(Error::Overflow {
                    field: "quantities"
                }),
                "{key}"
            );
        }
        assert_eq!(engine.credits_micros(team).expect("balance"), before);
    }
    assert_eq!(
        used(&engine, &seated_key, "gold:requests", daily(), T0_MS),
        0
    );
    let one = [(Unit::Requests, 1)];
    assert!(engine
        .consume(
            &UsageRequest::new(&seated_key, "gold", &one)
                .at(T0_MS)
                .id("x")
        )
        .expect("the id is free")
        .is_admitted());
}

#[test]
fn malformed_keys_are_errors_naming_the_key_and_change_nothing() {
    let world = world();
    let one = [(Unit::Requests, 1)];
    let long = "k".repeat(129);
    for key in ["", long.as_str(), "tp-ada\n", "tp\u{0}ada"] {
        let request = UsageRequest::new(key, "m2.7", &one).at(T0_MS);
        let error = world.refuses(|engine| engine.consume(&request));
        assert_eq!(field(&error), "key", "{key:?}");
        let error = world.refuses(|engine| engine.check(&request));
        assert_eq!(field(&error), "key", "{key:?}");
        let error = world.refuses(|engine| engine.usage(key, Some(T0_MS)));
        assert_eq!(field(&error), "key", "{key:?}");
        let error = world.refuses(|engine| engine.reserve(&request, None));
        assert_eq!(field(&error), "key", "{key:?}");
    }
    // 128 bytes is fine: an unknown key is a denial, not an error.
    let longest = "k".repeat(128);
    let decision = world
        .engine
        .consume(&UsageRequest::new(&longest, "m2.7", &one).at(T0_MS))
        .expect("a well-formed key");
    assert_eq!(reason(decision), tally_engine::DenialReason::UnknownKey);
}

#[test]
fn malformed_request_ids_are_errors_naming_the_request_id_and_change_nothing() {
    let world = world();
    let one = [(Unit::Requests, 1)];
    let long = "r".repeat(129);
    for id in ["", long.as_str(), "req\t1", "req\u{7f}"] {
        let request = UsageRequest::new(&world.key, "m2.7", &one).at(T0_MS).id(id);
        let error = world.refuses(|engine| engine.consume(&request));
        assert_eq!(field(&error), "request_id", "{id:?}");
        let error = world.refuses(|engine| engine.check(&request));
        assert_eq!(field(&error), "request_id", "{id:?}");
        let error = world.refuses(|engine| engine.refund(id, Some(T0_MS)));
        assert_eq!(field(&error), "request_id", "{id:?}");
    }
}

#[test]
fn timestamps_at_or_after_2100_are_errors_naming_at_ms_and_change_nothing() {
    let world = world();
    let one = [(Unit::Requests, 1)];
    for at_ms in [YEAR_2100_MS, YEAR_2100_MS + 1, u64::MAX] {
        let request = UsageRequest::new(&world.key, "m2.7", &one).at(at_ms);
        let errors = [
            world.refuses(|engine| engine.consume(&request)),
            world.refuses(|engine| engine.check(&request)),
            world.refuses(|engine| engine.reserve(&request, None)),
            world.refuses(|engine| engine.usage(&world.key, Some(at_ms))),
            world.refuses(|engine| engine.top_up("@ada", 1, Some(at_ms))),
            world.refuses(|engine| engine.withdraw_credits("@ada", 1, Some(at_ms))),
            world.refuses(|engine| engine.assign_seat("@ada", "ada", "Max", Some(at_ms))),
            world.refuses(|engine| engine.unassign_seat("@ada", "ada", Some(at_ms))),
            world.refuses(|engine| engine.create_user("bob", "tp-bob", Some(at_ms))),
            world.refuses(|engine| engine.create_team("acme", Some(at_ms))),
            world.refuses(|engine| engine.reclaim_idle(Some(at_ms))),
            world.refuses(|engine| engine.swap_policy(Policy::token_plan(), Some(at_ms))),
        ];
        for error in errors {
            assert_eq!(field(&error), "at_ms", "{error}");
            assert!(error.to_string().contains("2100"), "{error}");
        }
    }
    // The user and team of the refused calls were not created.
    assert!(world
        .engine
        .create_user("bob", "tp-bob", Some(T0_MS))
        .is_ok());
    assert!(world.engine.create_team("acme", Some(T0_MS)).is_ok());
    // The last millisecond before 2100 is accepted (on a clock there: the default bound on
    // how far ahead of the clock a stamp may be is another check).
    world.clock.set_ms(YEAR_2100_MS - 1);
    let last = UsageRequest::new(&world.key, "m2.7", &one).at(YEAR_2100_MS - 1);
    assert!(world.engine.check(&last).expect("in range").is_admitted());
}

#[test]
fn a_bad_settlement_is_an_error_and_leaves_the_reservation_open() {
    let world = world();
    let estimate = [(Unit::Requests, 10)];
    let outcome = world
        .engine
        .reserve(
            &UsageRequest::new(&world.key, "m2.7", &estimate).at(T0_MS),
            None,
        )
        .expect("reserve");
    let id = outcome.reservation.expect("admitted");
    let bad: [&[(Unit, u64)]; 3] = [
        &[(Unit::Requests, 0)],
        &[(Unit::Requests, MAX_QUANTITY + 1)],
        &[(Unit::Requests, 1), (Unit::Requests, 2)],
    ];
    for actual in bad {
        let error = world.refuses(|engine| engine.settle(id, actual, Some(T0_MS)));
        // Named as settle's argument is, not as consume's field.
        assert_eq!(field(&error), "actual", "{actual:?}");
    }
    let not_metered = [(Unit::Images, 1)];
    let error = world.refuses(|engine| engine.settle(id, &not_metered, Some(T0_MS)));
    assert_eq!(field(&error), "actual", "{error}");
    let error = world.refuses(|engine| engine.settle(id, &estimate, Some(YEAR_2100_MS)));
    assert_eq!(field(&error), "at_ms");
    assert_eq!(world.engine.open_reservations(), 1);
    assert!(world.engine.settle(id, &estimate, Some(T0_MS)).is_ok());
}

#[test]
fn a_bad_usage_correction_is_an_error_and_changes_nothing() {
    let world = world();
    let one = [(Unit::Requests, 1)];
    let add = tally_engine::AdjustmentDirection::Add;
    let error = world.refuses(|e| e.adjust_usage(&world.key, "m9", &one, T0_MS, add, Some(T0_MS)));
    assert!(matches!(error, Error::UnknownResource { .. }), "{error:?}");
    let zero = [(Unit::Requests, 0)];
    let error =
        world.refuses(|e| e.adjust_usage(&world.key, "m2.7", &zero, T0_MS, add, Some(T0_MS)));
    assert_eq!(field(&error), "quantities");
    let error = world.refuses(|e| e.adjust_usage("", "m2.7", &one, T0_MS, add, Some(T0_MS)));
    assert_eq!(field(&error), "key");
    let error =
        world.refuses(|e| e.adjust_usage("tp-nobody", "m2.7", &one, T0_MS, add, Some(T0_MS)));
    assert!(matches!(error, Error::UnknownKey { .. }), "{error:?}");
}

/// An addition past what a rolling window's bucket can count is refused, changing nothing, and
/// its error says that bound: not that the sum would overflow 64 bits, which 4,294,967,295
/// units added to the 5 counted cannot. (A limit above 65,535, so the buckets are 32-bit ones;
/// it ran on Plus's 4,500 requests, whose buckets count 65,535 at most.)
#[test]
fn a_usage_correction_past_what_a_bucket_counts_says_the_bound() {
    let engine = engine_with(
        Policy::from_toml_str(
            r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
price_micros = { requests = 1000 }
[plans.Many]
limits = [{ resource = "chat", unit = "requests", amount = 100000, window = "rolling:5h" }]
"#,
        )
        .expect("a valid policy"),
    );
    let key = seated(&engine, "ada", "Many");
    let add = tally_engine::AdjustmentDirection::Add;
    let five = [(Unit::Requests, 5)];
    engine
        .adjust_usage(&key, "chat", &five, T0_MS, add, Some(T0_MS))
        .expect("five counted");
    let before = engine.usage(&key, Some(T0_MS)).expect("report");
    let most = [(Unit::Requests, u64::from(u32::MAX))];
    let error = engine
        .adjust_usage(&key, "chat", &most, T0_MS, add, Some(T0_MS))
        .expect_err("past what the bucket counts");
    assert!(matches!(error, Error::Overflow { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.starts_with("quantities"), "{message}");
    assert!(message.contains("4,294,967,295"), "{message}");
    assert!(!message.contains("64-bit"), "{message}");
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), before);
}

/// A limit of at most 65,535 (every seed plan's request quota) counts in buckets of 16 bits:
/// an addition past that is refused, changing nothing, and its error says that bound, not the
/// 4,294,967,295 of a larger limit's buckets, which the same addition would fit.
#[test]
fn a_usage_correction_past_what_a_small_limits_bucket_counts_says_its_bound() {
    let world = world(); // Plus: 4,500 m2.7 requests per 5 hours, 5 counted
    let add = tally_engine::AdjustmentDirection::Add;
    let past = [(Unit::Requests, 65_536)];
    let error =
        world.refuses(|e| e.adjust_usage(&world.key, "m2.7", &past, T0_MS, add, Some(T0_MS)));
    assert!(matches!(error, Error::Overflow { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.starts_with("quantities"), "{message}");
    assert!(message.contains("65,535"), "{message}");
    assert!(!message.contains("4,294,967,295"), "{message}");
    // What the bucket still has room for is added; one more is refused with the same bound.
    let room = [(Unit::Requests, 65_535 - 5)];
    world
        .engine
        .adjust_usage(&world.key, "m2.7", &room, T0_MS, add, Some(T0_MS))
        .expect("fits the bucket");
    let one = [(Unit::Requests, 1)];
    let error = world
        .engine
        .adjust_usage(&world.key, "m2.7", &one, T0_MS, add, Some(T0_MS))
        .expect_err("the bucket is full");
    assert!(error.to_string().contains("65,535"), "{error}");
}

/// A correction that no limit of the key's plan counts could move nothing: refused, naming the
/// resource the plan does not limit, or the quantities its limits do not count, and no window
/// memory is set up for it.
#[test]
fn a_usage_correction_no_limit_counts_is_an_error_and_changes_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter"); // limits m2.7 and music-2.6 only
    let add = tally_engine::AdjustmentDirection::Add;
    let images = [(Unit::Images, 5)];
    let before = engine.usage(&key, Some(T0_MS)).expect("report");
    for direction in [add, tally_engine::AdjustmentDirection::Remove] {
        let error = engine
            .adjust_usage(&key, "image-01", &images, T0_MS, direction, Some(T0_MS))
            .expect_err("a correction of a resource the plan does not limit");
        assert_eq!(field(&error), "resource", "{error}");
    }
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), before);
    assert_eq!(
        engine.memory_stats().keys_with_usage,
        0,
        "no window memory set up"
    );
    // A plan that limits chat by tokens only: a correction of requests alone counts nowhere.
    let engine = engine_with(
        Policy::from_toml_str(
            r#"
time_zone = "UTC"
[resources.chat]
units = ["requests", "tokens"]
price_micros = { requests = 1000, tokens = 1 }
[plans.Tokens]
limits = [{ resource = "chat", unit = "tokens", amount = 1000, window = "daily" }]
"#,
        )
        .expect("a valid policy"),
    );
    let key = seated(&engine, "ada", "Tokens");
    let requests = [(Unit::Requests, 5)];
    let error = engine
        .adjust_usage(&key, "chat", &requests, T0_MS, add, Some(T0_MS))
        .expect_err("a correction of units no limit counts");
    assert_eq!(field(&error), "quantities", "{error}");
    let tokens = [(Unit::Tokens, 5)];
    let moved = engine
        .adjust_usage(&key, "chat", &tokens, T0_MS, add, Some(T0_MS))
        .expect("tokens are counted");
    assert_eq!(moved.limits[0].moved, 5);
}

#[test]
fn a_usage_correction_dated_after_2100_names_usage_at_ms() {
    let world = world();
    let one = [(Unit::Requests, 1)];
    let add = tally_engine::AdjustmentDirection::Add;
    let error =
        world.refuses(|e| e.adjust_usage(&world.key, "m2.7", &one, YEAR_2100_MS, add, Some(T0_MS)));
    assert_eq!(field(&error), "usage_at_ms");
}

// ---- Accounts and credits ---------------------------------------------------------------------

#[test]
fn a_zero_top_up_or_withdrawal_is_an_error_naming_micros_and_changes_nothing() {
    let world = world();
    let error = world.refuses(|engine| engine.top_up("@ada", 0, Some(T0_MS)));
    assert_eq!(field(&error), "micros");
    let error = world.refuses(|engine| engine.withdraw_credits("@ada", 0, Some(T0_MS)));
    assert_eq!(field(&error), "micros");
}

#[test]
fn a_top_up_past_the_credits_bound_is_an_error_and_changes_nothing() {
    // The bound is on the balance and everything charged (what refunds could give back):
    // replay reads a balance past i64::MAX as one that went below zero, so such a top-up was
    // logged and then refused every open of the database.
    let world = world();
    // Charged once to credits: past the 5-hour limit of the key's plan.
    let key = &world.key;
    while m27_requests(&world.engine, key, 1, T0_MS) == 1 {
        let report = world.engine.usage(key, Some(T0_MS)).expect("report");
        if report.credits_charged_micros > 0 {
            break;
        }
    }
    let report = world.engine.usage(key, Some(T0_MS)).expect("report");
    let (balance, charged) = (report.credits_balance_micros, report.credits_charged_micros);
    assert!(charged > 0, "credits were charged");
    let room = MAX_CREDITS_MICROS - balance - charged;
    let error = world.refuses(|engine| engine.top_up("@ada", room + 1, Some(T0_MS)));
    assert_eq!(error, Error::Overflow { field: "micros" });
    assert!(error.to_string().starts_with("micros:"));
    let error = world.refuses(|engine| engine.top_up("@ada", u64::MAX, Some(T0_MS)));
    assert_eq!(error, Error::Overflow { field: "micros" });
    assert_eq!(
        world.engine.top_up("@ada", room, Some(T0_MS)),
        Ok(balance + room)
    );
}

#[test]
fn unknown_teams_users_and_plans_are_errors_naming_them_and_change_nothing() {
    let world = world();
    let engine = &world.engine;
    engine.create_team("acme", Some(T0_MS)).expect("team");
    let cases: Vec<(Error, &str)> = vec![
        (world.refuses(|e| e.top_up("nope", 1, Some(T0_MS))), "team:"),
        (
            world.refuses(|e| e.withdraw_credits("nope", 1, Some(T0_MS))),
            "team:",
        ),
        (world.refuses(|e| e.credits_micros("nope")), "team:"),
        (
            world.refuses(|e| e.add_member("nope", "ada", "k-1", Some(T0_MS))),
            "team:",
        ),
        (
            world.refuses(|e| e.add_member("acme", "nobody", "k-2", Some(T0_MS))),
            "user:",
        ),
        (
            world.refuses(|e| e.create_payg_key("nobody", "k-3", Some(T0_MS))),
            "user:",
        ),
        (
            world.refuses(|e| e.assign_seat("@ada", "ada", "Gold", Some(T0_MS))),
            "plan:",
        ),
        (
            world.refuses(|e| e.assign_seat("@ada", "nobody", "Plus", Some(T0_MS))),
            "user:",
        ),
        (
            world.refuses(|e| e.unassign_seat("nope", "ada", Some(T0_MS))),
            "team:",
        ),
        (
            world.refuses(|e| e.assign_seat("acme", "ada", "Plus", Some(T0_MS))),
            "user:",
        ),
    ];
    for (error, prefix) in &cases {
        assert!(
            error.to_string().starts_with(prefix),
            "{error} should start with {prefix}"
        );
    }
    assert_eq!(
        cases[6].0,
        Error::UnknownPlan {
            plan: "Gold".into()
        }
    );
    assert!(matches!(cases[9].0, Error::NotAMember { .. }));
    // None of the keys of the refused calls exist.
    for key in ["k-1", "k-2", "k-3"] {
        assert!(matches!(
            engine.usage(key, Some(T0_MS)),
            Err(Error::UnknownKey { .. })
        ));
    }
    assert_eq!(
        engine
            .usage(&world.key, Some(T0_MS))
            .expect("report")
            .plan
            .as_deref(),
        Some("Plus")
    );
}

#[test]
fn malformed_user_and_team_names_are_errors_naming_the_field() {
    let world = world();
    let long = "u".repeat(129);
    for name in ["", long.as_str(), "bo\nb"] {
        let error = world.refuses(|e| e.create_user(name, "tp-new", Some(T0_MS)));
        assert_eq!(field(&error), "user", "{name:?}");
        let error = world.refuses(|e| e.create_team(name, Some(T0_MS)));
        assert_eq!(field(&error), "team", "{name:?}");
    }
    let error = world.refuses(|e| e.create_team("@bob", Some(T0_MS)));
    assert_eq!(field(&error), "team");
    let error = world.refuses(|e| e.create_user("bob", "", Some(T0_MS)));
    assert_eq!(field(&error), "key");
    // bob was never half-created.
    assert!(world
        .engine
        .create_user("bob", "tp-bob", Some(T0_MS))
        .is_ok());
}

#[test]
fn creating_something_that_exists_is_an_error_and_changes_nothing() {
    let world = world();
    let error = world.refuses(|e| e.create_user("ada", "tp-other", Some(T0_MS)));
    assert_eq!(
        error,
        Error::AlreadyExists {
            what: "user",
            id: "ada".into()
        }
    );
    let error = world.refuses(|e| e.create_user("bob", &world.key, Some(T0_MS)));
    assert!(
        matches!(error, Error::AlreadyExists { what: "key", .. }),
        "{error:?}"
    );
    world.engine.create_team("acme", Some(T0_MS)).expect("team");
    let error = world.refuses(|e| e.create_team("acme", Some(T0_MS)));
    assert!(
        matches!(error, Error::AlreadyExists { what: "team", .. }),
        "{error:?}"
    );
    // The refused calls did not create bob nor his Default Team.
    assert!(matches!(
        world.engine.credits_micros("@bob"),
        Err(Error::UnknownTeam { .. })
    ));
    assert!(world
        .engine
        .create_user("bob", "tp-bob", Some(T0_MS))
        .is_ok());
}

// ---- Malformed policies -----------------------------------------------------------------------

const BASE: &str = r#"
time_zone = "Asia/Shanghai"

[resources.chat]
units = ["requests", "tokens"]
price_micros = { requests = 1000, tokens = 1 }

[plans.Basic]
limits = [
  { resource = "chat", unit = "requests", amount = 100, window = "rolling:5h" },
]
"#;

const LIMIT: &str =
    r#"{ resource = "chat", unit = "requests", amount = 100, window = "rolling:5h" }"#;

fn policy_error(text: &str) -> PolicyError {
    Policy::from_toml_str(text).expect_err("a malformed policy")
}

/// The base policy with its one limit replaced.
fn with_limit(limit: &str) -> String {
    assert_eq!(BASE.matches(LIMIT).count(), 1);
    BASE.replace(LIMIT, limit)
}

#[test]
fn the_base_policy_of_these_tests_is_valid() {
    Policy::from_toml_str(BASE).expect("valid");
    Policy::from_toml_str(&with_limit(
        r#"{ resource = "chat", unit = "requests", amount = 4294967295, window = "rolling:5h", bucket = "2h30m" }"#,
    ))
    .expect("u32::MAX and a bucket of half the window are the largest allowed");
}

#[test]
fn a_toml_syntax_error_is_refused_with_its_line() {
    let error = policy_error(&BASE.replace("time_zone = \"Asia/Shanghai\"", "time_zone = "));
    assert_eq!(error.field, "(toml)");
    assert!(error.problem.contains("line 2"), "{}", error.problem);
}

#[test]
fn an_unknown_field_is_refused_naming_it() {
    let error = policy_error(&BASE.replace("[plans.Basic]", "[plans.Basic]\ncolour = \"red\""));
    assert!(error.problem.contains("colour"), "{error}");
    assert!(error.problem.contains("line 9"), "{error}");
}

#[test]
fn an_unknown_field_is_refused_with_its_path_in_the_field() {
    let error = policy_error(&BASE.replace("[plans.Basic]", "[plans.Basic]\ncolour = \"red\""));
    assert_eq!(error.field, r#"plans."Basic".colour"#);
    let error = policy_error(&BASE.replace("amount = 100, ", "amount = 100, colour = 1, "));
    assert_eq!(error.field, r#"plans."Basic".limits[0].colour"#);
    assert!(error.problem.contains("colour"), "{error}");
    let error = policy_error(&format!("colour = 1\n{BASE}"));
    assert_eq!(error.field, "colour");
}

#[test]
fn a_missing_field_is_refused_with_the_path_of_its_table() {
    let error = policy_error(&BASE.replace("amount = 100, ", ""));
    assert_eq!(error.field, r#"plans."Basic".limits[0]"#);
    assert!(error.problem.contains("amount"), "{error}");
    // A table missing from the document root: the root is ".".
    let without_plans = BASE.split("[plans.Basic]").next().expect("text");
    let error = policy_error(without_plans);
    assert_eq!(error.field, ".");
    assert!(error.problem.contains("plans"), "{error}");
}

#[test]
fn a_policy_without_plans_is_refused() {
    let without_table = BASE.split("[plans.Basic]").next().expect("text");
    let error = policy_error(without_table);
    assert!(error.problem.contains("plans"), "{error}");
    let empty = format!("{without_table}[plans]\n");
    let error = policy_error(&empty);
    assert_eq!(error.field, "plans");
}

#[test]
fn an_unknown_resource_in_a_limit_is_refused_naming_the_limits_resource() {
    let error = policy_error(&with_limit(
        r#"{ resource = "chatt", unit = "requests", amount = 100, window = "rolling:5h" }"#,
    ));
    assert_eq!(error.field, r#"plans."Basic".limits[0].resource"#);
    assert!(error.problem.contains("chatt"), "{error}");
}

#[test]
fn a_unit_the_resource_does_not_meter_is_refused_naming_the_limits_unit() {
    let error = policy_error(&with_limit(
        r#"{ resource = "chat", unit = "images", amount = 100, window = "rolling:5h" }"#,
    ));
    assert_eq!(error.field, r#"plans."Basic".limits[0].unit"#);
}

#[test]
fn a_zero_amount_is_refused_naming_the_limits_amount() {
    let error = policy_error(&with_limit(
        r#"{ resource = "chat", unit = "requests", amount = 0, window = "daily" }"#,
    ));
    assert_eq!(error.field, r#"plans."Basic".limits[0].amount"#);
}

#[test]
fn a_rolling_amount_above_u32_max_is_refused_naming_the_limits_amount() {
    let error = policy_error(&with_limit(
        r#"{ resource = "chat", unit = "requests", amount = 4294967296, window = "rolling:5h" }"#,
    ));
    assert_eq!(error.field, r#"plans."Basic".limits[0].amount"#);
    assert!(error.problem.contains("4294967295"), "{error}");
}

#[test]
fn a_bad_window_is_refused_naming_the_limits_window() {
    for window in [
        "hourly",
        "rolling:5x",
        "rolling:",
        "rolling:1s",
        "rolling:400d",
    ] {
        let error = policy_error(&with_limit(&format!(
            r#"{{ resource = "chat", unit = "requests", amount = 100, window = "{window}" }}"#
        )));
        assert_eq!(error.field, r#"plans."Basic".limits[0].window"#, "{window}");
    }
}

#[test]
fn a_bad_time_zone_is_refused_naming_time_zone() {
    let error = policy_error(&BASE.replace("Asia/Shanghai", "Mars/Olympus_Mons"));
    assert_eq!(error.field, "time_zone");
    assert!(error.problem.contains("Mars/Olympus_Mons"), "{error}");
}

#[test]
fn a_bucket_wider_than_half_the_window_is_refused_naming_the_limits_bucket() {
    // (A zero bucket has its own test below: it panics the engine.)
    for bucket in ["2h30m1s", "3h", "5h", "500ms"] {
        let error = policy_error(&with_limit(&format!(
            r#"{{ resource = "chat", unit = "requests", amount = 100, window = "rolling:5h", bucket = "{bucket}" }}"#
        )));
        assert_eq!(error.field, r#"plans."Basic".limits[0].bucket"#, "{bucket}");
    }
    let error = policy_error(&with_limit(
        r#"{ resource = "chat", unit = "requests", amount = 100, window = "daily", bucket = "1h" }"#,
    ));
    assert_eq!(error.field, r#"plans."Basic".limits[0].bucket"#);
}

#[test]
fn a_zero_bucket_is_refused_naming_the_limits_bucket() {
    let text = with_limit(
        r#"{ resource = "chat", unit = "requests", amount = 100, window = "rolling:5h", bucket = "0s" }"#,
    );
    let outcome = std::panic::catch_unwind(|| Policy::from_toml_str(&text));
    let error = outcome
        .expect("a policy error, not a panic")
        .expect_err("a zero bucket is refused");
    assert_eq!(error.field, r#"plans."Basic".limits[0].bucket"#);
}

/// A bucket that does not divide its window would let a unit come back more than one bucket
/// late (the old default of 85 s on 5 h: 105 s late), so it is refused.
#[test]
fn a_bucket_that_does_not_divide_the_window_is_refused_naming_the_limits_bucket() {
    for (window, bucket) in [
        ("rolling:5h", "85s"),
        ("rolling:5h", "7m"),
        ("rolling:1h", "55s"),
    ] {
        let error = policy_error(&with_limit(&format!(
            r#"{{ resource = "chat", unit = "requests", amount = 100, window = "{window}", bucket = "{bucket}" }}"#
        )));
        assert_eq!(
            error.field, r#"plans."Basic".limits[0].bucket"#,
            "{window} {bucket}"
        );
        assert!(error.problem.contains("divide"), "{error}");
    }
    // Their neighbours that do divide the window are fine.
    for (window, bucket) in [
        ("rolling:5h", "80s"),
        ("rolling:5h", "6m"),
        ("rolling:1h", "50s"),
    ] {
        Policy::from_toml_str(&with_limit(&format!(
            r#"{{ resource = "chat", unit = "requests", amount = 100, window = "{window}", bucket = "{bucket}" }}"#
        )))
        .unwrap_or_else(|error| panic!("{window} {bucket}: {error}"));
    }
}

#[test]
fn an_unknown_meter_in_a_limit_is_refused_naming_the_limits_meter() {
    let error = policy_error(&with_limit(
        r#"{ meter = "bar", amount = 100, window = "daily" }"#,
    ));
    assert_eq!(error.field, r#"plans."Basic".limits[0].meter"#);
}

#[test]
fn a_policy_error_reads_as_its_field_then_the_problem() {
    let error = policy_error(&BASE.replace("Asia/Shanghai", "Nowhere/Land"));
    assert!(error.to_string().starts_with("time_zone: "), "{error}");
    let wrapped = Error::from(error);
    assert!(
        wrapped.to_string().starts_with("policy: time_zone: "),
        "{wrapped}"
    );
}

/// A new user, team or key name holding an invisible character (a zero-width space, a variation
/// selector, a direction override...) is refused naming its field, and creates nothing: a team
/// `acme\u{200b}` beside `acme` took top-ups meant for the other. Visible letters of any
/// script, and marks that combine with a letter, are names like any other.
#[test]
fn a_new_name_with_an_invisible_character_is_refused_naming_it_and_creates_nothing() {
    let world = world();
    let engine = &world.engine;
    let at = Some(T0_MS);
    for invisible in ["bo\u{200b}", "\u{202e}ob", "b\u{fe0f}o"] {
        let error = engine
            .create_user(invisible, "tp-bo-1", at)
            .expect_err("user");
        assert_eq!(field(&error), "user", "{invisible:?}");
        assert!(error.to_string().contains("invisible"), "{error}");
    }
    for invisible in ["tp-bo-1\u{2060}", "tp\u{ad}bo"] {
        let error = engine.create_user("bo", invisible, at).expect_err("key");
        assert_eq!(field(&error), "key", "{invisible:?}");
    }
    for invisible in ["acme\u{200b}", "\u{feff}acme", "ac\u{3164}me"] {
        let error = engine.create_team(invisible, at).expect_err("team");
        assert_eq!(field(&error), "team", "{invisible:?}");
    }
    engine.create_user("bo", "tp-bo-1", at).expect("bo");
    engine.create_team("acme", at).expect("acme");
    for invisible in ["tp-bo-acme\u{200c}", "tp-bo-acme\u{e0001}"] {
        let member = engine
            .add_member("acme", "bo", invisible, at)
            .expect_err("key");
        assert_eq!(field(&member), "key", "{invisible:?}");
        let payg = engine
            .create_payg_key("bo", invisible, at)
            .expect_err("key");
        assert_eq!(field(&payg), "key", "{invisible:?}");
    }
    engine
        .create_user("zoë", "tp-zoe\u{301}", at)
        .expect("visible letters and marks");
    engine.create_team("チーム", at).expect("another script");
}

/// A new user, team or key name that begins or ends with whitespace (any of Unicode's) is
/// refused naming its field, and creates nothing: a gateway reads keys trimmed, so such a key
/// could never be used through one, and names that differ only so are mistaken for each other.
/// Whitespace inside a name is a name like any other.
#[test]
fn a_new_name_padded_with_whitespace_is_refused_naming_it_and_creates_nothing() {
    let world = world();
    let engine = &world.engine;
    let at = Some(T0_MS);
    for (padded, which) in [
        (" bo", "user"),
        ("bo\u{2009}", "user"),
        ("\u{3000}", "user"),
    ] {
        let error = engine.create_user(padded, "tp-bo-1", at).expect_err(which);
        assert_eq!(field(&error), which, "{padded:?}");
        assert!(error.to_string().contains("whitespace"), "{error}");
    }
    for padded in ["tp-bo-1 ", "\u{a0}tp-bo-1", "\u{2003}"] {
        let error = engine.create_user("bo", padded, at).expect_err("key");
        assert_eq!(field(&error), "key", "{padded:?}");
    }
    for padded in [" ", "acme ", "\nacme"] {
        let error = engine.create_team(padded, at).expect_err("team");
        assert_eq!(field(&error), "team", "{padded:?}");
    }
    // Nothing was created: the same names, unpadded, are free; inner spaces are taken.
    engine.create_user("bo", "tp-bo-1", at).expect("bo");
    engine
        .create_team("acme corp", at)
        .expect("a team with a space inside");
    for padded in [" tp-bo-acme", "tp-bo-acme\u{85}"] {
        let member = engine
            .add_member("acme corp", "bo", padded, at)
            .expect_err("key");
        assert_eq!(field(&member), "key", "{padded:?}");
        let payg = engine.create_payg_key("bo", padded, at).expect_err("key");
        assert_eq!(field(&payg), "key", "{padded:?}");
    }
    engine
        .add_member("acme corp", "bo", "tp-bo-acme", at)
        .expect("the unpadded key");
    engine
        .create_payg_key("bo", "pg-bo", at)
        .expect("the unpadded pay-as-you-go key");
}
