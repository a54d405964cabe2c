//! Shared helpers for the scenario tests: an engine on a manual clock at a fixed instant, users
//! with seats, and short ways to consume, count admissions and read a denial.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::sync::Arc;

use tally_engine::calendar::CalendarPeriod;
use tally_engine::{
    Admission, Decision, Denial, DenialReason, Engine, EngineOptions, LimitReport, ManualClock,
    Policy, ResourceId, Unit, UsageRequest, Window,
};

pub const SECOND_MS: u64 = 1_000;
pub const MINUTE_MS: u64 = 60 * SECOND_MS;
pub const HOUR_MS: u64 = 60 * MINUTE_MS;
pub const DAY_MS: u64 = 24 * HOUR_MS;
pub const WEEK_MS: u64 = 7 * DAY_MS;
pub const FIVE_HOURS_MS: u64 = 5 * HOUR_MS;

/// The bucket of the default policy's `rolling:5h` windows: the widest whole-second bucket that
/// divides 5 h into at least 210 (policy.rs, DEFAULT_BUCKETS_PER_WINDOW): 80 s, 225 buckets.
pub const BUCKET_MS: u64 = 80 * SECOND_MS;

/// 2026-11-23T00:00:00+08:00 (a Monday; 2026-11-22T16:00:00Z): the start of a local day and a
/// local week in Asia/Shanghai, the default policy's zone. It is also a multiple of 80 s, so it
/// is the first instant of a rolling bucket.
pub const T0_MS: u64 = 1_795_363_200_000;

const _: () = assert!(T0_MS % BUCKET_MS == 0);
const _: () = assert!(T0_MS % DAY_MS == 16 * HOUR_MS);

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Milliseconds since the epoch of a UTC date and time.
pub fn utc_ms(year: i64, month: i64, day: i64, hour: u64, minute: u64, second: u64) -> u64 {
    let days = u64::try_from(days_from_civil(year, month, day)).expect("after 1970");
    days * DAY_MS + hour * HOUR_MS + minute * MINUTE_MS + second * SECOND_MS
}

pub fn engine() -> Engine {
    engine_with(Policy::token_plan())
}

pub fn engine_with(policy: Policy) -> Engine {
    engine_on_clock_with(policy).0
}

/// The default engine and its clock, for what the engine measures on its own clock rather than
/// on request timestamps (how long request ids are remembered, lease expiry on `reserve`).
pub fn engine_on_clock() -> (Engine, Arc<ManualClock>) {
    engine_on_clock_with(Policy::token_plan())
}

pub fn engine_on_clock_with(policy: Policy) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine =
        Engine::new(policy, clock.clone(), EngineOptions::default()).expect("valid options");
    (engine, clock)
}

/// The plan key of `user` in their Default Team.
pub fn key_of(user: &str) -> String {
    format!("tp-{user}")
}

/// The Default Team of `user`.
pub fn team_of(user: &str) -> String {
    format!("@{user}")
}

/// Creates `user` (with their Default Team and key) and returns the key.
pub fn user(engine: &Engine, user: &str) -> String {
    let key = key_of(user);
    engine
        .create_user(user, &key, Some(T0_MS))
        .expect("create user");
    key
}

/// Creates `user` with a seat on `plan` in their Default Team and returns the key.
pub fn seated(engine: &Engine, name: &str, plan: &str) -> String {
    let key = user(engine, name);
    engine
        .assign_seat(&team_of(name), name, plan, Some(T0_MS))
        .expect("assign seat");
    key
}

pub fn consume(
    engine: &Engine,
    key: &str,
    resource: &str,
    quantities: &[(Unit, u64)],
    at_ms: u64,
) -> Decision {
    engine
        .consume(&UsageRequest::new(key, resource, quantities).at(at_ms))
        .expect("a well-formed request")
}

pub fn check(
    engine: &Engine,
    key: &str,
    resource: &str,
    quantities: &[(Unit, u64)],
    at_ms: u64,
) -> Decision {
    engine
        .check(&UsageRequest::new(key, resource, quantities).at(at_ms))
        .expect("a well-formed request")
}

/// Consumes `count` requests of one `unit` each at `at_ms`; returns how many were admitted.
pub fn admit_count(
    engine: &Engine,
    key: &str,
    resource: &str,
    unit: Unit,
    count: u64,
    at_ms: u64,
) -> u64 {
    (0..count)
        .filter(|_| consume(engine, key, resource, &[(unit, 1)], at_ms).is_admitted())
        .count() as u64
}

/// m2.7 quantities whose price is exactly `micros`: the one request every m2.7 call must carry
/// (the resource's required unit), the rest in tokens. For filling the shared usage bar.
pub fn m27_worth(engine: &Engine, micros: u64) -> Vec<(Unit, u64)> {
    let request_micros = price_micros(engine, "m2.7", &[(Unit::Requests, 1)]);
    let token_micros = price_micros(engine, "m2.7", &[(Unit::Tokens, 1)]);
    assert!(
        micros >= request_micros,
        "{micros} is less than one m2.7 request"
    );
    let rest = micros - request_micros;
    assert_eq!(
        rest % token_micros,
        0,
        "{micros} is not a whole number of tokens"
    );
    let mut quantities = vec![(Unit::Requests, 1)];
    if rest > 0 {
        quantities.push((Unit::Tokens, rest / token_micros));
    }
    quantities
}

/// Consumes single m2.7 requests at `at_ms`; returns how many were admitted.
pub fn m27_requests(engine: &Engine, key: &str, count: u64, at_ms: u64) -> u64 {
    admit_count(engine, key, "m2.7", Unit::Requests, count, at_ms)
}

pub fn admitted(decision: Decision) -> Admission {
    match decision {
        Decision::Admitted(admission) => admission,
        Decision::Denied(denial) => panic!("expected an admission, got {denial:?}"),
    }
}

pub fn denied(decision: Decision) -> Denial {
    match decision {
        Decision::Denied(denial) => denial,
        Decision::Admitted(admission) => panic!("expected a denial, got {admission:?}"),
    }
}

pub fn reason(decision: Decision) -> DenialReason {
    denied(decision).reason
}

/// A quota denial's `(limit, retry_at_ms, retry_after_ms, reset_at_ms)`.
pub fn quota_exhausted(decision: Decision) -> (u8, u64, u64, u64) {
    match reason(decision) {
        DenialReason::QuotaExhausted {
            limit,
            retry_at_ms,
            retry_after_ms,
            reset_at_ms,
        } => (limit, retry_at_ms, retry_after_ms, reset_at_ms),
        other => panic!("expected QuotaExhausted, got {other:?}"),
    }
}

pub fn resource_id(engine: &Engine, resource: &str) -> ResourceId {
    engine
        .policy()
        .resource_id(resource)
        .unwrap_or_else(|| panic!("the policy has resource {resource}"))
}

pub fn plan_id(engine: &Engine, plan: &str) -> tally_engine::PlanId {
    engine
        .policy()
        .plan_id(plan)
        .unwrap_or_else(|| panic!("the policy has plan {plan}"))
}

/// The price of a request in micro-credits, from the policy's price table.
pub fn price_micros(engine: &Engine, resource: &str, quantities: &[(Unit, u64)]) -> u64 {
    let policy = engine.policy();
    let prices = policy.resource(resource_id(engine, resource)).price_micros;
    quantities
        .iter()
        .map(|(unit, quantity)| prices[unit.index()].expect("a priced unit") * quantity)
        .sum()
}

/// The report of the limit of `key`'s plan on `meter` and `window`.
pub fn limit(engine: &Engine, key: &str, meter: &str, window: Window, at_ms: u64) -> LimitReport {
    engine
        .usage(key, Some(at_ms))
        .expect("usage report")
        .limits
        .into_iter()
        .find(|limit| limit.meter == meter && limit.window == window)
        .unwrap_or_else(|| panic!("{key} has a limit on {meter} per {window}"))
}

/// The `rolling:5h` window of the default policy.
pub fn five_hours() -> Window {
    Window::Rolling {
        window_ms: FIVE_HOURS_MS,
        bucket_ms: BUCKET_MS,
    }
}

pub fn daily() -> Window {
    Window::Calendar(CalendarPeriod::Daily)
}

pub fn weekly() -> Window {
    Window::Calendar(CalendarPeriod::Weekly)
}

/// Units of `meter` used by `key` in `window` as of `at_ms`.
pub fn used(engine: &Engine, key: &str, meter: &str, window: Window, at_ms: u64) -> u64 {
    limit(engine, key, meter, window, at_ms).used
}

/// Used m2.7 requests in the 5-hour window.
pub fn m27_used(engine: &Engine, key: &str, at_ms: u64) -> u64 {
    used(engine, key, "m2.7:requests", five_hours(), at_ms)
}

/// The index, in `plan`'s limits, of its limit on `meter` per `window`.
pub fn limit_index(engine: &Engine, plan: &str, meter: &str, window: Window) -> u8 {
    let policy = engine.policy();
    let plan = policy.plan(plan_id(engine, plan));
    let index = plan
        .limits
        .iter()
        .position(|limit| &*policy.meter(limit.meter).name == meter && limit.window == window)
        .unwrap_or_else(|| panic!("{} has a limit on {meter} per {window}", plan.name));
    u8::try_from(index).expect("a small index")
}
