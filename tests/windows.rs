//! Windows: the 5-hour rolling window gives quota back as usage ages out (never before 5 hours,
//! at most one bucket late), daily and weekly windows reset at local midnight of the policy's
//! time zone (also across DST changes), and timestamps that go backwards never release quota
//! early nor corrupt a window.

mod common;

use common::*;
use tally_engine::{Engine, EngineOptions, ManualClock, Policy, Unit, UsageRequest};

/// Offsets of the instant of use inside a bucket of the default `rolling:5h` window (80 s):
/// its first instant, just after it, around its first quarter, the middle, and its last instant.
const ONE_REQUEST: [(Unit, u64); 1] = [(Unit::Requests, 1)];

const OFFSETS_IN_BUCKET_MS: [u64; 6] = [
    0,
    1,
    BUCKET_MS / 4 - 1,
    BUCKET_MS / 4,
    BUCKET_MS / 2,
    BUCKET_MS - 1,
];

/// A fresh engine whose Starter key used its 1,500 m2.7 requests at `used_at_ms`.
fn starter_full_at(used_at_ms: u64) -> (Engine, String) {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1500, used_at_ms), 1500);
    (engine, key)
}

/// The first instant in `[from_ms, to_ms]`, scanning forward in `step_ms`, at which one more m2.7
/// request would be admitted. Scanning only forward keeps every call's timestamp monotonic.
fn first_admitted_instant(
    engine: &Engine,
    key: &str,
    from_ms: u64,
    to_ms: u64,
    step_ms: u64,
) -> Option<u64> {
    (from_ms..=to_ms)
        .step_by(step_ms as usize)
        .find(|at_ms| check(engine, key, "m2.7", &[(Unit::Requests, 1)], *at_ms).is_admitted())
}

// ---- Rolling 5 hours -------------------------------------------------------------------------

#[test]
fn rolling_quota_never_comes_back_before_five_hours_after_use() {
    for offset_ms in OFFSETS_IN_BUCKET_MS {
        let used_at_ms = T0_MS + offset_ms;
        let (engine, key) = starter_full_at(used_at_ms);
        for at_ms in [
            used_at_ms + HOUR_MS,
            used_at_ms + FIVE_HOURS_MS - MINUTE_MS,
            used_at_ms + FIVE_HOURS_MS - 1,
        ] {
            assert!(
                !check(&engine, &key, "m2.7", &[(Unit::Requests, 1)], at_ms).is_admitted(),
                "used at +{offset_ms} ms, asked {} ms after",
                at_ms - used_at_ms
            );
        }
        assert!(!consume(
            &engine,
            &key,
            "m2.7",
            &[(Unit::Requests, 1)],
            used_at_ms + FIVE_HOURS_MS - 1
        )
        .is_admitted());
        assert_eq!(
            m27_used(&engine, &key, used_at_ms + FIVE_HOURS_MS - 1),
            1500
        );
    }
}

#[test]
fn rolling_quota_comes_back_at_most_one_bucket_after_five_hours() {
    // The scan's step divides the bucket, so the grid from `truth` hits `truth + BUCKET_MS`.
    let step_ms = SECOND_MS / 4;
    const _: () = assert!(BUCKET_MS % (SECOND_MS / 4) == 0);
    for offset_ms in OFFSETS_IN_BUCKET_MS {
        let used_at_ms = T0_MS + offset_ms;
        let (engine, key) = starter_full_at(used_at_ms);
        let truth_ms = used_at_ms + FIVE_HOURS_MS;
        assert!(!check(&engine, &key, "m2.7", &ONE_REQUEST, truth_ms - 1).is_admitted());
        let back_ms =
            first_admitted_instant(&engine, &key, truth_ms, truth_ms + 3 * BUCKET_MS, step_ms)
                .expect("the quota comes back within three buckets");
        assert!(
            back_ms <= truth_ms + BUCKET_MS,
            "used at bucket offset {offset_ms} ms: back {} ms after 5 h (a bucket is {BUCKET_MS} ms)",
            back_ms - truth_ms
        );
    }
}

/// The seed's "5-hour rolling reset" for a unit used at the very first instant of a bucket, the
/// worst case for a bucketed window: it may come back late, but never by more than one bucket.
#[test]
fn a_unit_used_at_the_start_of_a_bucket_comes_back_no_later_than_one_bucket_after_five_hours() {
    let used_at_ms = T0_MS; // the first instant of a bucket
    assert_eq!(used_at_ms % BUCKET_MS, 0);
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1, used_at_ms), 1);
    // The rest of the quota a bucket later, so it is still in the window at the deadline.
    assert_eq!(
        m27_requests(&engine, &key, 1499, used_at_ms + BUCKET_MS),
        1499
    );
    let deadline_ms = used_at_ms + FIVE_HOURS_MS + BUCKET_MS;

    // Refused until 5 h have passed, and the retry time it gives is within the bound.
    let asked_ms = used_at_ms + FIVE_HOURS_MS - 1;
    let (_, retry_at_ms, _, _) =
        quota_exhausted(consume(&engine, &key, "m2.7", &ONE_REQUEST, asked_ms));
    assert!(retry_at_ms >= used_at_ms + FIVE_HOURS_MS);
    assert!(
        retry_at_ms <= deadline_ms,
        "retry {} ms after 5 h",
        retry_at_ms - used_at_ms - FIVE_HOURS_MS
    );
    // The unit is back by one bucket after 5 h: in the report and for a request.
    assert_eq!(m27_used(&engine, &key, deadline_ms), 1499);
    assert_eq!(m27_requests(&engine, &key, 2, deadline_ms), 1);
}

/// The default bucket of a 5-hour window is 80 s, 225 to the window: it divides the window, so
/// a unit comes back at most one bucket late. Every 5-hour limit of the shipped policy has it,
/// and so does a policy's own `rolling:5h` limit that names no bucket.
#[test]
fn the_default_bucket_of_a_five_hour_window_is_80_seconds() {
    assert_eq!(BUCKET_MS, 80 * SECOND_MS);
    assert_eq!(FIVE_HOURS_MS % BUCKET_MS, 0);
    assert_eq!(FIVE_HOURS_MS / BUCKET_MS, 225);
    let shipped = Policy::token_plan();
    let is_five_hours = |window: tally_engine::Window| match window {
        tally_engine::Window::Rolling { window_ms, .. } => window_ms == FIVE_HOURS_MS,
        tally_engine::Window::Calendar(_) => false,
    };
    let five_hour_limits: Vec<_> = shipped
        .plans()
        .iter()
        .flat_map(|plan| plan.limits.iter())
        .filter(|limit| is_five_hours(limit.window))
        .collect();
    assert_eq!(
        five_hour_limits.len(),
        shipped.plans().len(),
        "every plan has one 5-hour limit"
    );
    for limit in five_hour_limits {
        assert_eq!(limit.window, five_hours(), "{}", limit.name);
    }
    let own = Policy::from_toml_str(
        r#"
time_zone = "Asia/Shanghai"
[resources.chat]
units = ["requests"]
[plans.Own]
limits = [{ resource = "chat", unit = "requests", amount = 10, window = "rolling:5h" }]
"#,
    )
    .expect("a valid policy");
    assert_eq!(own.plans()[0].limits[0].window, five_hours());
}

/// A one-minute window with no bucket given: 250 ms buckets, 240 to the window (it had 1 s,
/// 60, and a unit came back up to 1.7% of the window late). A request denied at any point of
/// its bucket is told to retry at most one bucket after the truth, never before it, and fits
/// exactly then; the usage report's reset is the same instant.
#[test]
fn a_one_minute_windows_retry_is_at_most_one_250_ms_bucket_late() {
    let policy = || {
        Policy::from_toml_str(
            r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.P]
limits = [{ resource = "chat", unit = "requests", amount = 3, window = "rolling:1m" }]
"#,
        )
        .expect("a valid policy")
    };
    let window = policy().plans()[0].limits[0].window;
    let bucket_ms = 250;
    assert_eq!(
        window,
        tally_engine::Window::Rolling {
            window_ms: MINUTE_MS,
            bucket_ms
        }
    );
    assert!(MINUTE_MS / bucket_ms >= 210, "an error under 0.5%");
    for offset_ms in [0, 1, 124, 125, 249] {
        let engine = engine_with(policy());
        let key = seated(&engine, "ada", "P");
        let used_at_ms = T0_MS + offset_ms;
        assert_eq!(
            admit_count(&engine, &key, "chat", Unit::Requests, 3, used_at_ms),
            3
        );
        let asked_ms = used_at_ms + 30 * SECOND_MS;
        let (_, retry_at_ms, retry_after_ms, _) =
            quota_exhausted(consume(&engine, &key, "chat", &ONE_REQUEST, asked_ms));
        let truth_ms = used_at_ms + MINUTE_MS;
        assert!(retry_at_ms >= truth_ms, "offset {offset_ms}");
        assert!(
            retry_at_ms <= truth_ms + bucket_ms,
            "offset {offset_ms}: {} ms late",
            retry_at_ms - truth_ms
        );
        assert_eq!(retry_after_ms, retry_at_ms - asked_ms);
        let report = engine.usage(&key, Some(asked_ms)).expect("report");
        assert_eq!(report.limits[0].reset_at_ms, Some(retry_at_ms));
        assert!(!consume(&engine, &key, "chat", &ONE_REQUEST, retry_at_ms - 1).is_admitted());
        assert!(consume(&engine, &key, "chat", &ONE_REQUEST, retry_at_ms).is_admitted());
    }
}

#[test]
fn quota_comes_back_as_usage_ages_out_oldest_first() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let first_ms = T0_MS + 10 * SECOND_MS;
    assert_eq!(m27_requests(&engine, &key, 500, first_ms), 500);
    assert_eq!(m27_requests(&engine, &key, 500, first_ms + HOUR_MS), 500);
    assert_eq!(
        m27_requests(&engine, &key, 500, first_ms + 2 * HOUR_MS),
        500
    );
    assert_eq!(m27_requests(&engine, &key, 1, first_ms + 3 * HOUR_MS), 0);

    // Two buckets of slack: how late exactly is another test's business.
    let slack_ms = 2 * BUCKET_MS;
    let at_ms = first_ms + FIVE_HOURS_MS + slack_ms;
    assert_eq!(
        m27_used(&engine, &key, at_ms),
        1000,
        "the first 500 aged out"
    );
    assert_eq!(m27_requests(&engine, &key, 501, at_ms), 500);
    let at_ms = first_ms + HOUR_MS + FIVE_HOURS_MS + slack_ms;
    assert_eq!(
        m27_used(&engine, &key, at_ms),
        1000,
        "the second 500 aged out"
    );
    assert_eq!(m27_requests(&engine, &key, 501, at_ms), 500);
}

#[test]
fn retry_at_is_never_earlier_than_the_truth_and_the_request_fits_at_that_instant() {
    for offset_ms in OFFSETS_IN_BUCKET_MS {
        let used_at_ms = T0_MS + offset_ms;
        let (engine, key) = starter_full_at(used_at_ms);
        let asked_ms = used_at_ms + HOUR_MS + 123;
        let decision = consume(&engine, &key, "m2.7", &[(Unit::Requests, 1)], asked_ms);
        let (_, retry_at_ms, retry_after_ms, reset_at_ms) = quota_exhausted(decision);
        assert_eq!(retry_after_ms, retry_at_ms - asked_ms);
        assert!(
            retry_at_ms >= used_at_ms + FIVE_HOURS_MS,
            "offset {offset_ms}"
        );
        assert!(reset_at_ms >= retry_at_ms);
        assert_eq!(denied(decision).remedies.wait_until_ms, Some(retry_at_ms));
        assert_eq!(m27_requests(&engine, &key, 1, retry_at_ms - 1), 0);
        assert_eq!(m27_requests(&engine, &key, 1, retry_at_ms), 1);
    }
}

#[test]
fn retry_at_is_at_most_one_bucket_later_than_the_truth() {
    for offset_ms in OFFSETS_IN_BUCKET_MS {
        let used_at_ms = T0_MS + offset_ms;
        let (engine, key) = starter_full_at(used_at_ms);
        let decision = consume(
            &engine,
            &key,
            "m2.7",
            &[(Unit::Requests, 1)],
            used_at_ms + HOUR_MS,
        );
        let (_, retry_at_ms, _, _) = quota_exhausted(decision);
        let truth_ms = used_at_ms + FIVE_HOURS_MS;
        assert!(
            retry_at_ms <= truth_ms + BUCKET_MS,
            "used at bucket offset {offset_ms} ms: retry {} ms after the truth",
            retry_at_ms - truth_ms
        );
    }
}

#[test]
fn retry_at_waits_for_just_enough_usage_to_age_out() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let first_ms = T0_MS + 30 * SECOND_MS;
    let second_ms = first_ms + 2 * HOUR_MS;
    assert_eq!(m27_requests(&engine, &key, 1000, first_ms), 1000);
    assert_eq!(m27_requests(&engine, &key, 500, second_ms), 500);

    // One more request needs one unit freed: the oldest 1,000 age out at first + 5 h.
    let asked_ms = first_ms + 3 * HOUR_MS;
    let one = consume(&engine, &key, "m2.7", &[(Unit::Requests, 1)], asked_ms);
    let (_, retry_one_ms, _, _) = quota_exhausted(one);
    assert!(retry_one_ms >= first_ms + FIVE_HOURS_MS);
    assert!(retry_one_ms < second_ms + FIVE_HOURS_MS);
    // 1,001 requests need the 500 from `second` to age out as well.
    let many = consume(&engine, &key, "m2.7", &[(Unit::Requests, 1001)], asked_ms);
    let (_, retry_many_ms, _, _) = quota_exhausted(many);
    assert!(retry_many_ms >= second_ms + FIVE_HOURS_MS);
    assert_eq!(
        m27_used(&engine, &key, asked_ms),
        1500,
        "denials count nothing"
    );

    assert!(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1000)],
        retry_one_ms
    )
    .is_admitted());
    assert_eq!(m27_requests(&engine, &key, 1, retry_one_ms), 0);
}

#[test]
fn a_usage_reports_reset_time_is_the_instant_the_window_empties() {
    let used_at_ms = T0_MS + 50 * SECOND_MS;
    let (engine, key) = starter_full_at(used_at_ms);
    let report = limit(
        &engine,
        &key,
        "m2.7:requests",
        five_hours(),
        used_at_ms + HOUR_MS,
    );
    let reset_ms = report
        .reset_at_ms
        .expect("a non-empty rolling window has a reset time");
    assert!(reset_ms >= used_at_ms + FIVE_HOURS_MS);
    assert_eq!(m27_used(&engine, &key, reset_ms - 1), 1500);
    assert_eq!(m27_used(&engine, &key, reset_ms), 0);
    let empty = limit(&engine, &key, "m2.7:requests", five_hours(), reset_ms);
    assert_eq!((empty.remaining, empty.reset_at_ms), (1500, None));
}

// ---- Daily and weekly windows in the policy's time zone --------------------------------------

#[test]
fn daily_quotas_reset_at_local_midnight_in_asia_shanghai_which_is_1600_utc() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    let late_evening_ms = utc_ms(2026, 11, 23, 15, 0, 0); // 23:00 on Nov 23 in Shanghai
    let midnight_ms = utc_ms(2026, 11, 23, 16, 0, 0);
    assert_eq!(midnight_ms, T0_MS + DAY_MS);
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 51, late_evening_ms),
        50
    );

    let last_instant = consume(
        &engine,
        &key,
        "image-01",
        &[(Unit::Images, 1)],
        midnight_ms - 1,
    );
    let (_, retry_at_ms, retry_after_ms, reset_at_ms) = quota_exhausted(last_instant);
    assert_eq!(
        (retry_at_ms, reset_at_ms, retry_after_ms),
        (midnight_ms, midnight_ms, 1)
    );
    let report = limit(&engine, &key, "image-01:images", daily(), late_evening_ms);
    assert_eq!(report.reset_at_ms, Some(midnight_ms));

    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 51, midnight_ms),
        50
    );
}

#[test]
fn daily_quotas_do_not_reset_at_utc_midnight() {
    let engine = engine();
    let key = seated(&engine, "ada", "Max");
    let used_at_ms = T0_MS + HOUR_MS; // 01:00 local on Nov 23, 17:00 UTC on Nov 22
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "hailuo-2.3-768p-6s",
            Unit::Videos,
            3,
            used_at_ms
        ),
        2
    );
    let utc_midnight_ms = utc_ms(2026, 11, 23, 0, 0, 0);
    for at_ms in [
        utc_midnight_ms - 1,
        utc_midnight_ms,
        utc_midnight_ms + HOUR_MS,
    ] {
        assert_eq!(
            admit_count(&engine, &key, "hailuo-2.3-768p-6s", Unit::Videos, 1, at_ms),
            0
        );
    }
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "hailuo-2.3-768p-6s",
            Unit::Videos,
            3,
            T0_MS + DAY_MS
        ),
        2
    );
}

#[test]
fn weekly_usage_bar_windows_reset_on_monday_at_local_midnight() {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Bar-Plus");
    let bar_rolling = limit(&engine, &key, "usage-bar", five_hours(), T0_MS);
    let bar_weekly = limit(&engine, &key, "usage-bar", weekly(), T0_MS);
    // Fill the weekly bar in 5-hour windows six hours apart, each as full as it may be.
    let mut weekly_used = 0;
    let mut at_ms = T0_MS;
    while weekly_used < bar_weekly.amount {
        let micros = bar_rolling.amount.min(bar_weekly.amount - weekly_used);
        let call = m27_worth(&engine, micros);
        clock.set_ms(at_ms);
        assert!(consume(&engine, &key, "m2.7", &call, at_ms).is_admitted());
        weekly_used += micros;
        at_ms += 6 * HOUR_MS;
    }
    assert_eq!(
        used(&engine, &key, "usage-bar", weekly(), at_ms),
        bar_weekly.amount
    );
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), at_ms), 0);

    let next_monday_ms = T0_MS + WEEK_MS;
    assert_eq!(
        next_monday_ms,
        utc_ms(2026, 11, 29, 16, 0, 0),
        "Sunday 16:00 UTC"
    );
    let weekly_index = limit_index(&engine, "Bar-Plus", "usage-bar", weekly());
    // The smallest m2.7 call: its one required request and a token.
    let small = [(Unit::Requests, 1), (Unit::Tokens, 1)];
    let (denied_limit, retry_at_ms, _, reset_at_ms) =
        quota_exhausted(consume(&engine, &key, "m2.7", &small, at_ms));
    assert_eq!(denied_limit, weekly_index);
    assert_eq!((retry_at_ms, reset_at_ms), (next_monday_ms, next_monday_ms));
    clock.set_ms(next_monday_ms - 1);
    assert!(!consume(&engine, &key, "m2.7", &small, next_monday_ms - 1).is_admitted());
    assert!(consume(&engine, &key, "m2.7", &small, next_monday_ms).is_admitted());
    assert_eq!(
        used(&engine, &key, "usage-bar", weekly(), next_monday_ms),
        price_micros(&engine, "m2.7", &small)
    );
}

// ---- Daylight saving time ----------------------------------------------------------------------

const NEW_YORK_POLICY: &str = r#"
time_zone = "America/New_York"

[resources.widget]
units = ["requests"]
price_micros = { requests = 10 }

[resources.gadget]
units = ["requests"]
price_micros = { requests = 10 }

[plans.Local]
limits = [
  { resource = "widget", unit = "requests", amount = 3, window = "daily" },
  { resource = "gadget", unit = "requests", amount = 2, window = "weekly" },
]
"#;

fn new_york() -> (Engine, String) {
    let engine = engine_with(Policy::from_toml_str(NEW_YORK_POLICY).expect("a valid policy"));
    let key = seated(&engine, "ada", "Local");
    (engine, key)
}

#[test]
fn a_daily_window_on_the_day_clocks_spring_forward_lasts_23_hours() {
    let (engine, key) = new_york();
    // 2026-03-08 00:00 EST = 05:00 UTC; 2026-03-09 00:00 EDT = 04:00 UTC.
    let start_ms = utc_ms(2026, 3, 8, 5, 0, 0);
    let end_ms = utc_ms(2026, 3, 9, 4, 0, 0);
    assert_eq!(end_ms - start_ms, 23 * HOUR_MS);
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 3, start_ms - 1),
        3
    );
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 4, start_ms),
        3
    );
    let (_, retry_at_ms, _, reset_at_ms) = quota_exhausted(consume(
        &engine,
        &key,
        "widget",
        &[(Unit::Requests, 1)],
        utc_ms(2026, 3, 8, 12, 0, 0),
    ));
    assert_eq!((retry_at_ms, reset_at_ms), (end_ms, end_ms));
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 1, end_ms - 1),
        0
    );
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 4, end_ms),
        3
    );
}

#[test]
fn a_daily_window_on_the_day_clocks_fall_back_lasts_25_hours() {
    let (engine, key) = new_york();
    // 2026-11-01 00:00 EDT = 04:00 UTC; 2026-11-02 00:00 EST = 05:00 UTC.
    let start_ms = utc_ms(2026, 11, 1, 4, 0, 0);
    let end_ms = utc_ms(2026, 11, 2, 5, 0, 0);
    assert_eq!(end_ms - start_ms, 25 * HOUR_MS);
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 4, start_ms),
        3
    );
    // 24 hours after the start is still the same local day.
    let one_day_later_ms = start_ms + DAY_MS;
    let (_, retry_at_ms, _, _) = quota_exhausted(consume(
        &engine,
        &key,
        "widget",
        &[(Unit::Requests, 1)],
        one_day_later_ms,
    ));
    assert_eq!(retry_at_ms, end_ms);
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 1, end_ms - 1),
        0
    );
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 4, end_ms),
        3
    );
}

#[test]
fn a_weekly_window_across_the_spring_change_resets_monday_at_local_midnight() {
    let (engine, key) = new_york();
    // The week of Monday 2026-03-02 (EST) ends Monday 2026-03-09 00:00 EDT = 04:00 UTC.
    let monday_ms = utc_ms(2026, 3, 9, 4, 0, 0);
    let sunday_ms = utc_ms(2026, 3, 8, 20, 0, 0);
    assert_eq!(
        admit_count(&engine, &key, "gadget", Unit::Requests, 3, sunday_ms),
        2
    );
    let (_, retry_at_ms, _, _) = quota_exhausted(consume(
        &engine,
        &key,
        "gadget",
        &[(Unit::Requests, 1)],
        monday_ms - 1,
    ));
    assert_eq!(retry_at_ms, monday_ms);
    assert_eq!(
        admit_count(&engine, &key, "gadget", Unit::Requests, 3, monday_ms),
        2
    );
}

/// Request ids are remembered for the longest window, so a retry while its unit still counts
/// is known as a repeat. Antarctica/Troll goes from +02 to +00 on the last Sunday of October:
/// 2026-10-25 lasts 26 h. Before, every day was taken to last at most 25 h and the id was
/// forgotten an hour before the day ended: a retry 25.5 h in was counted a second time.
#[test]
fn a_retry_late_in_a_26_hour_day_of_antarctica_troll_is_a_repeat() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "Antarctica/Troll"
[resources.chat]
units = ["requests"]
[plans.P]
limits = [{ resource = "chat", unit = "requests", amount = 100, window = "daily" }]
"#,
    )
    .expect("a valid policy");
    // Local 2026-10-25 00:00 (+02) is 2026-10-24 22:00 UTC; the day ends 2026-10-26 00:00 UTC.
    let day_start_ms = utc_ms(2026, 10, 24, 22, 0, 0);
    let day_end_ms = utc_ms(2026, 10, 26, 0, 0, 0);
    assert_eq!(day_end_ms - day_start_ms, 26 * HOUR_MS);
    let clock = std::sync::Arc::new(ManualClock::new(day_start_ms));
    let engine =
        Engine::new(policy, clock.clone(), EngineOptions::default()).expect("valid options");
    engine
        .create_user("ada", "k", Some(day_start_ms))
        .expect("user");
    engine
        .assign_seat("@ada", "ada", "P", Some(day_start_ms))
        .expect("seat");
    let one = [(Unit::Requests, 1)];
    let request = |at_ms: u64| UsageRequest::new("k", "chat", &one).at(at_ms).id("r1");
    assert!(engine
        .consume(&request(day_start_ms))
        .expect("consume")
        .is_admitted());

    let retry_ms = day_start_ms + 25 * HOUR_MS + 30 * MINUTE_MS;
    clock.set_ms(retry_ms);
    // Other requests with ids, so the engine has had every chance to forget old ones.
    for index in 0..100 {
        let id = format!("other-{index}");
        let other = UsageRequest::new("k", "chat", &one).at(retry_ms).id(&id);
        engine.check(&other).expect("check");
    }
    let (again, replayed) = engine
        .consume_noting_replay(&request(retry_ms))
        .expect("consume");
    assert!(again.is_admitted());
    assert!(replayed, "the retry was counted as a new request");
    assert_eq!(used(&engine, "k", "chat:requests", daily(), retry_ms), 1);
}

// ---- Timestamps that go backwards --------------------------------------------------------------

#[test]
fn a_rolling_window_never_releases_quota_early_when_timestamps_go_backwards() {
    let used_at_ms = T0_MS + HOUR_MS + 40 * SECOND_MS;
    let (engine, key) = starter_full_at(used_at_ms);
    // An hour earlier than the usage: still full.
    assert_eq!(m27_requests(&engine, &key, 1, used_at_ms - HOUR_MS), 0);
    // Five hours after that earlier timestamp, but not after the usage: still full.
    assert_eq!(
        m27_requests(
            &engine,
            &key,
            1,
            used_at_ms - HOUR_MS + FIVE_HOURS_MS + 2 * BUCKET_MS
        ),
        0
    );
    assert_eq!(
        m27_used(&engine, &key, used_at_ms + FIVE_HOURS_MS - 1),
        1500
    );

    let back_ms = used_at_ms + FIVE_HOURS_MS + 2 * BUCKET_MS;
    assert_eq!(m27_requests(&engine, &key, 1, back_ms), 1);
    // A request stamped before the usage aged out is counted now, not written into the past.
    assert_eq!(m27_requests(&engine, &key, 10, used_at_ms), 10);
    assert_eq!(m27_used(&engine, &key, back_ms), 11);
    assert_eq!(m27_requests(&engine, &key, 1500, back_ms), 1489);
}

#[test]
fn timestamps_jumping_back_and_forth_never_admit_more_than_the_quota_in_any_window() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let mut admitted_total = 0;
    // Requests alternate between "now" and up to three hours earlier, all within one window.
    for step in 0..3000u64 {
        let now_ms = T0_MS + step * SECOND_MS;
        let at_ms = if step % 2 == 0 {
            now_ms
        } else {
            now_ms - 3 * HOUR_MS
        };
        admitted_total += m27_requests(&engine, &key, 1, at_ms);
    }
    assert_eq!(admitted_total, 1500);
    let last_ms = T0_MS + 2999 * SECOND_MS;
    assert_eq!(m27_used(&engine, &key, last_ms), 1500);
    // Everything was counted at or before `last_ms`: it has all aged out a window later.
    let drained_ms = last_ms + FIVE_HOURS_MS + 2 * BUCKET_MS;
    assert_eq!(m27_used(&engine, &key, drained_ms), 0);
    assert_eq!(m27_requests(&engine, &key, 1501, drained_ms), 1500);
}

#[test]
fn a_daily_window_never_releases_quota_when_a_timestamp_goes_back_to_the_previous_day() {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Plus");
    let next_day_ms = T0_MS + DAY_MS + HOUR_MS;
    clock.set_ms(next_day_ms);
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 50, next_day_ms),
        50
    );
    // A timestamp from the day before (when nothing was used) does not get a fresh quota.
    let yesterday_ms = T0_MS + 2 * HOUR_MS;
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 1, yesterday_ms),
        0
    );
    assert_eq!(
        used(&engine, &key, "image-01:images", daily(), next_day_ms),
        50
    );
    clock.set_ms(T0_MS + 2 * DAY_MS);
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "image-01",
            Unit::Images,
            51,
            T0_MS + 2 * DAY_MS
        ),
        50
    );
}

#[test]
fn a_late_timestamp_from_a_previous_day_counts_in_the_newest_day() {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Plus");
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 50, T0_MS + HOUR_MS),
        50
    );
    let next_day_ms = T0_MS + DAY_MS + HOUR_MS;
    clock.set_ms(next_day_ms);
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 1, next_day_ms),
        1
    );
    // Stamped on the full day, but that day is over: it is counted on the newest day.
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "image-01",
            Unit::Images,
            1,
            T0_MS + 2 * HOUR_MS
        ),
        1
    );
    assert_eq!(
        used(&engine, &key, "image-01:images", daily(), next_day_ms),
        2
    );
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 50, next_day_ms),
        48
    );
}

// ---- Several full limits ----------------------------------------------------------------------

#[test]
fn retry_at_waits_for_every_full_limit_not_just_the_first() {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Bar-Plus");
    let rolling_amount = limit(&engine, &key, "usage-bar", five_hours(), T0_MS).amount;
    let weekly_amount = limit(&engine, &key, "usage-bar", weekly(), T0_MS).amount;
    // Both bars end up full at the same time: the last request fills the 5-hour bar and the week.
    let mut left = weekly_amount;
    let mut at_ms = T0_MS;
    while left > 0 {
        let micros = left.min(rolling_amount);
        let call = m27_worth(&engine, micros);
        clock.set_ms(at_ms);
        assert!(consume(&engine, &key, "m2.7", &call, at_ms).is_admitted());
        left -= micros;
        if left > 0 {
            at_ms += 6 * HOUR_MS;
        }
    }
    assert_eq!(
        used(&engine, &key, "usage-bar", five_hours(), at_ms),
        rolling_amount
    );
    assert_eq!(
        used(&engine, &key, "usage-bar", weekly(), at_ms),
        weekly_amount
    );

    let small = [(Unit::Requests, 1), (Unit::Tokens, 1)];
    let (_, retry_at_ms, _, _) =
        quota_exhausted(consume(&engine, &key, "m2.7", &small, at_ms + MINUTE_MS));
    let next_monday_ms = T0_MS + WEEK_MS;
    assert!(
        retry_at_ms >= next_monday_ms,
        "retry at +{} h, but the week is full until +{} h",
        (retry_at_ms - T0_MS) / HOUR_MS,
        (next_monday_ms - T0_MS) / HOUR_MS
    );
}

// ---- Midnight that does not exist, or happens twice ---------------------------------------------

const HAVANA_POLICY: &str = r#"
time_zone = "America/Havana"

[resources.widget]
units = ["requests"]
price_micros = { requests = 10 }

[plans.Local]
limits = [{ resource = "widget", unit = "requests", amount = 3, window = "daily" }]
"#;

fn havana() -> (Engine, String) {
    let engine = engine_with(Policy::from_toml_str(HAVANA_POLICY).expect("a valid policy"));
    let key = seated(&engine, "ada", "Local");
    (engine, key)
}

#[test]
fn a_day_whose_midnight_is_skipped_starts_at_the_first_instant_that_exists() {
    let (engine, key) = havana();
    // Cuba springs forward at 00:00 standard time: 2026-03-08 00:00 CST (05:00 UTC) is 01:00 CDT.
    let first_instant_ms = utc_ms(2026, 3, 8, 5, 0, 0);
    let next_midnight_ms = utc_ms(2026, 3, 9, 4, 0, 0); // 2026-03-09 00:00 CDT
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "widget",
            Unit::Requests,
            4,
            first_instant_ms - 1
        ),
        3
    );
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 4, first_instant_ms),
        3
    );
    let (_, retry_at_ms, _, _) = quota_exhausted(consume(
        &engine,
        &key,
        "widget",
        &[(Unit::Requests, 1)],
        first_instant_ms + HOUR_MS,
    ));
    assert_eq!(retry_at_ms, next_midnight_ms);
}

#[test]
fn a_day_whose_midnight_happens_twice_resets_only_once() {
    let (engine, key) = havana();
    // Cuba falls back at 01:00 CDT (05:00 UTC) to 00:00 CST: 2026-11-01 00:00 happens twice.
    let first_midnight_ms = utc_ms(2026, 11, 1, 4, 0, 0);
    let second_midnight_ms = utc_ms(2026, 11, 1, 5, 0, 0);
    let next_midnight_ms = utc_ms(2026, 11, 2, 5, 0, 0); // 2026-11-02 00:00 CST
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "widget",
            Unit::Requests,
            4,
            first_midnight_ms - 1
        ),
        3
    );
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "widget",
            Unit::Requests,
            4,
            first_midnight_ms + 30 * MINUTE_MS
        ),
        3
    );
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "widget",
            Unit::Requests,
            1,
            second_midnight_ms
        ),
        0
    );
    let (_, retry_at_ms, _, _) = quota_exhausted(consume(
        &engine,
        &key,
        "widget",
        &[(Unit::Requests, 1)],
        second_midnight_ms + HOUR_MS,
    ));
    assert_eq!(retry_at_ms, next_midnight_ms);
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 4, next_midnight_ms),
        3
    );
}

#[test]
fn a_monthly_window_resets_on_the_first_at_local_midnight() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "Asia/Shanghai"
[resources.widget]
units = ["requests"]
price_micros = { requests = 10 }
[plans.Monthly]
limits = [{ resource = "widget", unit = "requests", amount = 5, window = "monthly" }]
"#,
    )
    .expect("a valid policy");
    let (engine, clock) = engine_on_clock_with(policy);
    let key = seated(&engine, "ada", "Monthly");
    let december_ms = utc_ms(2026, 11, 30, 16, 0, 0); // 2026-12-01 00:00 in Shanghai
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 6, T0_MS),
        5
    );
    clock.set_ms(december_ms - 1);
    let (_, retry_at_ms, _, _) = quota_exhausted(consume(
        &engine,
        &key,
        "widget",
        &[(Unit::Requests, 1)],
        december_ms - 1,
    ));
    assert_eq!(retry_at_ms, december_ms);
    assert_eq!(
        admit_count(&engine, &key, "widget", Unit::Requests, 6, december_ms),
        5
    );
}

/// A one-minute window (1 s buckets, a 61-slot ring) used again 2^16 laps after its last use,
/// about 46 days, while another limit kept the key from being reclaimed: its old usage is long
/// gone. Before, the ring had 16-bit lap tags, its stale slots carried the very tags the new
/// lap gave them and counted again: the key was denied with 5 of 5 used. (Rings with laps
/// this short now get 32-bit tags.)
#[test]
fn a_window_used_again_after_a_whole_tag_period_of_laps_starts_empty() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.a]
units = ["requests"]
[resources.b]
units = ["requests"]
[plans.P]
limits = [
  { resource = "a", unit = "requests", amount = 5, window = "rolling:1m", bucket = "1s" },
  { resource = "b", unit = "requests", amount = 1000, window = "monthly" },
]
"#,
    )
    .expect("a valid policy");
    let (engine, clock) = engine_on_clock_with(policy);
    let key = seated(&engine, "u", "P");
    let one = [(Unit::Requests, 1)];
    for _ in 0..5 {
        assert!(consume(&engine, &key, "a", &one, T0_MS).is_admitted());
    }
    assert!(!consume(&engine, &key, "a", &one, T0_MS).is_admitted());
    let later = T0_MS + 65_536 * 61_000;
    clock.set_ms(later - 1_000);
    assert!(consume(&engine, &key, "b", &one, later - 1_000).is_admitted());
    let decision = consume(&engine, &key, "a", &one, later);
    assert!(decision.is_admitted(), "{decision:?}");
    let report = engine.usage(&key, Some(later)).expect("report");
    assert_eq!(report.limits[0].used, 1);
}

/// A key whose idle windows were reclaimed counts later requests no earlier than the reclaim
/// (its time floor). A request stamped before the floor and denied must still say how long to
/// wait from its own timestamp: `retry_at_ms - at_ms`, as a request stamped before a rolling
/// window's head or in a calendar period the counter has passed is told. Before, the wait was
/// measured from the floor, so the request's timestamp plus `retry_after_ms` fell before
/// `retry_at_ms`, by as much as the stamp was behind the floor.
#[test]
fn a_request_stamped_before_a_reclaim_is_told_to_wait_from_its_own_timestamp() {
    for window in ["rolling:1h", "daily"] {
        let (engine, clock) = engine_on_clock_with(two_per(window, "UTC", "monday"));
        let key = seated(&engine, "ada", "P");
        let day_ms = T0_MS - T0_MS % DAY_MS + DAY_MS; // a UTC midnight
        assert!(consume(&engine, &key, "widget", &ONE_REQUEST, day_ms - 3 * HOUR_MS).is_admitted());
        // The windows are empty by the reclaim's time: the key's usage is freed.
        let reclaim_ms = day_ms + 5 * HOUR_MS;
        clock.set_ms(reclaim_ms);
        assert_eq!(engine.reclaim_idle(Some(reclaim_ms)), Ok(1), "{window}");
        let both = [(Unit::Requests, 2)];
        assert!(consume(&engine, &key, "widget", &both, reclaim_ms).is_admitted());
        // A late request, stamped ten minutes before the reclaim (same day, same window).
        let late_ms = reclaim_ms - 10 * MINUTE_MS;
        for decision in [
            consume(&engine, &key, "widget", &ONE_REQUEST, late_ms),
            check(&engine, &key, "widget", &ONE_REQUEST, late_ms),
        ] {
            let (_, retry_at_ms, retry_after_ms, _) = quota_exhausted(decision);
            let expected_retry_at_ms = if window == "daily" {
                day_ms + DAY_MS
            } else {
                // One hour's default bucket is 16 s (225 buckets); the reclaim's time starts
                // one, and what was counted in it comes back a window and a bucket later.
                reclaim_ms + HOUR_MS + 16 * SECOND_MS
            };
            assert_eq!(retry_at_ms, expected_retry_at_ms, "{window}");
            assert_eq!(
                late_ms + retry_after_ms,
                retry_at_ms,
                "{window}: the wait is measured from the request's own timestamp"
            );
        }
    }
}

/// A usage report stamped before a reclaimed key's time floor reports as a request stamped then
/// is decided: at the floor. Its daily window resets at the end of the floor's day, where such
/// a request counts, not at the end of the day of the report's own stamp, which had already
/// ended for the key (the report said the window reset a day early).
#[test]
fn a_usage_report_stamped_before_a_reclaim_resets_where_a_request_then_counts() {
    let (engine, clock) = engine_on_clock_with(two_per("daily", "UTC", "monday"));
    let key = seated(&engine, "ada", "P");
    let day_ms = T0_MS - T0_MS % DAY_MS + DAY_MS; // a UTC midnight
    assert!(consume(&engine, &key, "widget", &ONE_REQUEST, day_ms - 3 * HOUR_MS).is_admitted());
    let reclaim_ms = day_ms + 5 * HOUR_MS;
    clock.set_ms(reclaim_ms);
    assert_eq!(engine.reclaim_idle(Some(reclaim_ms)), Ok(1));
    let early_ms = day_ms - HOUR_MS;
    let report = engine.usage(&key, Some(early_ms)).expect("report");
    assert_eq!(report.limits[0].used, 0);
    assert_eq!(report.limits[0].reset_at_ms, Some(day_ms + DAY_MS));
    // As a request stamped then is counted and told.
    let both = [(Unit::Requests, 2)];
    assert!(consume(&engine, &key, "widget", &both, early_ms).is_admitted());
    let (_, retry_at_ms, _, _) =
        quota_exhausted(consume(&engine, &key, "widget", &ONE_REQUEST, early_ms));
    assert_eq!(retry_at_ms, day_ms + DAY_MS);
    let report = engine.usage(&key, Some(early_ms)).expect("report");
    assert_eq!(report.limits[0].used, 2);
    assert_eq!(report.limits[0].reset_at_ms, Some(day_ms + DAY_MS));
}

/// The week's first day is the policy's `week_start` (Monday when it names none): a weekly
/// window resets at local midnight of that day, across DST changes too. Before, weeks always
/// started on Monday and a policy naming its first day was refused as an unknown field.
#[test]
fn a_weekly_window_resets_at_local_midnight_of_the_configured_first_day() {
    let policy = |week_start: &str| {
        Policy::from_toml_str(&two_per_text("weekly", "America/New_York", week_start))
    };
    let engine = engine_with(policy("sunday").expect("a valid policy"));
    let key = seated(&engine, "ada", "P");
    let both = [(Unit::Requests, 2)];
    // Saturday 2026-03-07, noon EST; the week began Sunday 2026-03-01 00:00 EST (05:00 UTC).
    let saturday_ms = utc_ms(2026, 3, 7, 17, 0, 0);
    assert!(consume(&engine, &key, "widget", &both, saturday_ms).is_admitted());
    // The next week begins Sunday 2026-03-08 00:00 EST (05:00 UTC), two hours before the
    // clocks spring forward; it ends Sunday 2026-03-15 00:00 EDT (04:00 UTC), 167 hours on.
    let sunday_ms = utc_ms(2026, 3, 8, 5, 0, 0);
    let (_, retry_at_ms, _, reset_at_ms) =
        quota_exhausted(consume(&engine, &key, "widget", &ONE_REQUEST, saturday_ms));
    assert_eq!((retry_at_ms, reset_at_ms), (sunday_ms, sunday_ms));
    assert!(!consume(&engine, &key, "widget", &ONE_REQUEST, sunday_ms - 1).is_admitted());
    let admission = admitted(consume(&engine, &key, "widget", &both, sunday_ms));
    let next_sunday_ms = utc_ms(2026, 3, 15, 4, 0, 0);
    assert_eq!(next_sunday_ms - sunday_ms, 7 * DAY_MS - HOUR_MS);
    assert_eq!(
        admission.limits.as_slice()[0].reset_at_ms,
        Some(next_sunday_ms)
    );
    let report = engine.usage(&key, Some(sunday_ms)).expect("report");
    assert_eq!(
        (report.limits[0].used, report.limits[0].reset_at_ms),
        (2, Some(next_sunday_ms))
    );
    // A Monday (the default's first day) resets nothing.
    let monday_ms = utc_ms(2026, 3, 9, 4, 0, 0);
    assert!(!consume(&engine, &key, "widget", &ONE_REQUEST, monday_ms).is_admitted());

    // Monday when the policy names no first day, and a name that is no day is refused.
    let monday = Policy::from_toml_str(
        r#"
time_zone = "America/New_York"
[resources.widget]
units = ["requests"]
[plans.P]
limits = [{ resource = "widget", unit = "requests", amount = 2, window = "weekly" }]
"#,
    )
    .expect("a valid policy");
    let engine = engine_with(monday);
    let key = seated(&engine, "ada", "P");
    assert!(consume(&engine, &key, "widget", &both, saturday_ms).is_admitted());
    let (_, retry_at_ms, _, _) =
        quota_exhausted(consume(&engine, &key, "widget", &ONE_REQUEST, sunday_ms));
    assert_eq!(retry_at_ms, monday_ms);
    let error = policy("funday").expect_err("not a day");
    assert_eq!(error.field, "week_start");
    assert!(error.problem.contains("funday"), "{error}");
}

// ---- A seat change between plans whose rolling windows have other buckets ---------------------

/// Two plans limiting `chat` requests over the same hour, one in 60 s buckets, one in 45 s.
const TWO_BUCKETS: &str = r#"
time_zone = "UTC"

[resources.chat]
units = ["requests"]

[plans.Minutes]
limits = [{ resource = "chat", unit = "requests", amount = 10, window = "rolling:1h", bucket = "60s" }]

[plans.Quarters]
limits = [{ resource = "chat", unit = "requests", amount = 10, window = "rolling:1h", bucket = "45s" }]
"#;

/// A unit used at `t` comes back at most one bucket after `t + window`, and `retry_at` says so.
/// A seat change to a plan whose window over the same span has other buckets carries the count
/// across, re-bucketed to the new bucket holding the old one's last instant: the old bucket
/// does not say where in its minute the unit was, so no carry that never releases early can do
/// better. The bound after such a carry is one old bucket plus one new bucket (ARCHITECTURE.md,
/// "Invariants"): a unit used at the start of a 60 s bucket comes back 90 s after its hour
/// here, within 60 + 45 s, and `retry_at` is exactly when it fits again.
#[test]
fn after_a_seat_change_to_other_buckets_quota_comes_back_within_an_old_and_a_new_bucket() {
    let engine = engine_with(Policy::from_toml_str(TWO_BUCKETS).expect("a valid policy"));
    let key = seated(&engine, "ada", "Minutes");
    let ten = [(Unit::Requests, 10)];
    assert!(consume(&engine, &key, "chat", &ten, T0_MS).is_admitted());
    engine
        .assign_seat(&team_of("ada"), "ada", "Quarters", Some(T0_MS + MINUTE_MS))
        .expect("a seat change");
    let asked_ms = T0_MS + 2 * MINUTE_MS;
    let (_, retry_at_ms, _, _) =
        quota_exhausted(consume(&engine, &key, "chat", &ONE_REQUEST, asked_ms));
    let truth_ms = T0_MS + HOUR_MS;
    assert!(
        retry_at_ms >= truth_ms,
        "retry at {retry_at_ms}, before the truth {truth_ms}"
    );
    assert!(
        retry_at_ms - truth_ms <= 60 * SECOND_MS + 45 * SECOND_MS,
        "retry {} s after the hour",
        (retry_at_ms - truth_ms) / SECOND_MS
    );
    let first_fit_ms = first_admitted_instant_of(&engine, &key, truth_ms, truth_ms + 5 * MINUTE_MS);
    assert!(
        first_fit_ms <= retry_at_ms && retry_at_ms - first_fit_ms < SECOND_MS,
        "admitted again at {first_fit_ms}, retry at {retry_at_ms}"
    );
}

/// Units that have aged out of a window stay out when a seat change or a swap re-buckets it.
/// The ring forgets an aged bucket only once its head moves past it, so a key idle since then
/// still held it, and the carry put it in the new bucket holding the old one's last instant,
/// which ends later: counted again. Here 10 requests at 50 s (Quarters' bucket [45 s, 90 s))
/// age out at 1 h 1 min 30 s, and the key has 10 left then; a seat change to Minutes (or a
/// swap to 60 s buckets) at that instant moved them to [60 s, 120 s), counted to 1 h 2 min:
/// the report went from 0 used to 10 and the next request was denied, though the upgrade
/// should leave "the new limit minus what was already used".
#[test]
fn units_aged_out_stay_out_when_a_seat_change_or_swap_re_buckets_the_window() {
    let policy = || Policy::from_toml_str(TWO_BUCKETS).expect("a valid policy");
    let quarters = policy().plan(policy().plan_id("Quarters").unwrap()).limits[0].window;
    let minutes = policy().plan(policy().plan_id("Minutes").unwrap()).limits[0].window;
    let ten = [(Unit::Requests, 10)];
    let used_at_ms = T0_MS + 50 * SECOND_MS;
    let released_ms = T0_MS + HOUR_MS + 90 * SECOND_MS;
    // A seat change, and a swap that only changes the bucket width.
    for by_swap in [false, true] {
        let engine = engine_with(policy());
        let key = seated(&engine, "ada", "Quarters");
        assert!(consume(&engine, &key, "chat", &ten, used_at_ms).is_admitted());
        assert_eq!(
            used(&engine, &key, "chat:requests", quarters, released_ms - 1),
            10
        );
        assert_eq!(
            used(&engine, &key, "chat:requests", quarters, released_ms),
            0
        );
        if by_swap {
            let wider = TWO_BUCKETS.replace("bucket = \"45s\"", "bucket = \"60s\"");
            let wider = Policy::from_toml_str(&wider).expect("a valid policy");
            engine
                .swap_policy(wider, Some(released_ms))
                .expect("a swap of bucket width");
        } else {
            engine
                .assign_seat(&team_of("ada"), "ada", "Minutes", Some(released_ms))
                .expect("a seat change");
        }
        assert_eq!(
            used(&engine, &key, "chat:requests", minutes, released_ms),
            0,
            "by swap: {by_swap}"
        );
        assert!(
            consume(&engine, &key, "chat", &ten, released_ms).is_admitted(),
            "by swap: {by_swap}"
        );
    }
}

/// A refund of a request whose units aged out before a seat change re-bucketed the window
/// takes nothing: the new bucket they would have been carried to holds only later units.
/// Here 7 requests at 10 s and 5 at 30 s, in 20 s buckets, then a seat change to 60 s buckets
/// at 1 h 30 s: the 7 aged out at 1 h 20 s, the 5 (to 1 h 40 s) go to [0 s, 60 s). Refunding
/// the 7 then must leave the 5 counted.
#[test]
fn a_refund_of_units_aged_out_before_a_re_bucketing_takes_nothing_from_later_units() {
    let text = format!(
        "{TWO_BUCKETS}\n[plans.Thirds]\nlimits = [{{ resource = \"chat\", unit = \"requests\", \
         amount = 100, window = \"rolling:1h\", bucket = \"20s\" }}]\n"
    );
    let policy = Policy::from_toml_str(&text).expect("a valid policy");
    let minutes = policy.plan(policy.plan_id("Minutes").unwrap()).limits[0].window;
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "Thirds");
    let early = UsageRequest::new(&key, "chat", &[(Unit::Requests, 7)])
        .at(T0_MS + 10 * SECOND_MS)
        .id("early");
    assert!(engine.consume(&early).expect("consume").is_admitted());
    assert!(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 5)],
        T0_MS + 30 * SECOND_MS
    )
    .is_admitted());
    let change_ms = T0_MS + HOUR_MS + 30 * SECOND_MS;
    engine
        .assign_seat(&team_of("ada"), "ada", "Minutes", Some(change_ms))
        .expect("a seat change");
    assert_eq!(used(&engine, &key, "chat:requests", minutes, change_ms), 5);
    engine
        .refund("early", Some(change_ms + SECOND_MS))
        .expect("a refund");
    assert_eq!(
        used(
            &engine,
            &key,
            "chat:requests",
            minutes,
            change_ms + SECOND_MS
        ),
        5
    );
}

fn first_admitted_instant_of(engine: &Engine, key: &str, from_ms: u64, to_ms: u64) -> u64 {
    (from_ms..=to_ms)
        .step_by(SECOND_MS as usize)
        .find(|at_ms| check(engine, key, "chat", &ONE_REQUEST, *at_ms).is_admitted())
        .expect("admitted within the range")
}

// ---- Daily windows against an independent reference, in zones with unusual changes -----------

/// The first instant whose local time (by the tz database as jiff reads it) is at or after
/// 00:00 of `day` (days since 1970): the instant a daily window of that day starts. Built from
/// the zone's offset changes alone: for each stretch of constant offset `o` from `from` to `to`,
/// the candidate `max(from, midnight - o)` counts if it is before `to`; the first that does is it.
fn reference_day_start(tz: &jiff::tz::TimeZone, day: i64) -> u64 {
    let midnight_local_ms = day * DAY_MS as i64;
    let from: jiff::Timestamp =
        jiff::Timestamp::from_millisecond(midnight_local_ms - 2 * DAY_MS as i64).unwrap();
    let mut stretch_from = from.as_millisecond();
    let mut offset_ms = i64::from(tz.to_offset(from).seconds()) * 1000;
    for transition in tz.following(from) {
        let to = transition.timestamp().as_millisecond();
        let candidate = stretch_from.max(midnight_local_ms - offset_ms);
        if candidate < to {
            return candidate as u64;
        }
        stretch_from = to;
        offset_ms = i64::from(transition.offset().seconds()) * 1000;
    }
    stretch_from.max(midnight_local_ms - offset_ms) as u64
}

/// A daily limit of 2 admits two requests per local day and tells the third to retry at the
/// next day's start (`reset_at` too), refusing until its last millisecond and admitting at its
/// first, day after day through DST changes at midnight (Havana, Santiago, Asuncion), half-hour
/// changes (Lord Howe), 45-minute offsets (Chatham, Kathmandu), a skipped day (Apia) and the
/// southern hemisphere (Sydney).
#[test]
fn a_daily_limit_of_two_resets_at_each_local_day_start_in_zones_with_unusual_changes() {
    for (zone, from, to) in [
        ("America/Havana", (2026, 11, 20), (2028, 11, 10)),
        ("America/Santiago", (2026, 11, 20), (2028, 11, 10)),
        ("America/Asuncion", (2026, 11, 20), (2028, 11, 10)),
        ("Australia/Lord_Howe", (2026, 11, 20), (2028, 11, 10)),
        ("Pacific/Chatham", (2026, 11, 20), (2028, 11, 10)),
        ("Asia/Kathmandu", (2026, 11, 20), (2027, 2, 10)),
        ("Australia/Sydney", (2026, 11, 20), (2028, 11, 10)),
        ("Pacific/Apia", (2011, 12, 20), (2012, 1, 10)),
        ("America/Havana", (2099, 1, 1), (2099, 12, 30)),
    ] {
        let tz = jiff::tz::TimeZone::get(zone).unwrap();
        let (engine, clock) = engine_on_clock_with(two_per("daily", zone, "monday"));
        let key = seated(&engine, "ada", "P");
        let (first, last) = (
            days_from_civil(from.0, from.1, from.2),
            days_from_civil(to.0, to.1, to.2),
        );
        for day in first..last {
            let (start, end) = (
                reference_day_start(&tz, day),
                reference_day_start(&tz, day + 1),
            );
            if start == end {
                continue; // a day the zone skipped
            }
            two_per_period(
                &engine,
                &clock,
                &key,
                (start, end),
                &format!("{zone} day {day}"),
            );
        }
    }
}

/// Weekly (from the policy's `week_start`) and monthly limits of 2, period after period, against
/// the same reference: a week starts as its first day does, a month as its 1st does.
#[test]
fn weekly_and_monthly_limits_of_two_reset_at_each_reference_period_start() {
    let weekdays = [
        ("monday", jiff::civil::Weekday::Monday),
        ("sunday", jiff::civil::Weekday::Sunday),
        ("saturday", jiff::civil::Weekday::Saturday),
    ];
    for (zone, from, to) in [
        ("America/Havana", (2026, 11, 20), (2029, 11, 10)),
        ("America/Santiago", (2026, 11, 20), (2029, 11, 10)),
        ("America/Asuncion", (2026, 11, 20), (2029, 11, 10)),
        ("Australia/Lord_Howe", (2026, 11, 20), (2029, 11, 10)),
        ("Pacific/Chatham", (2026, 11, 20), (2029, 11, 10)),
        ("Pacific/Apia", (2011, 11, 20), (2012, 3, 10)),
        ("Pacific/Kiritimati", (1994, 11, 20), (1995, 3, 10)),
        ("America/Santiago", (2098, 1, 1), (2099, 12, 1)),
    ] {
        let tz = jiff::tz::TimeZone::get(zone).unwrap();
        for (window, week_start, day) in weekdays
            .iter()
            .map(|(name, day)| ("weekly", *name, Some(*day)))
            .chain([("monthly", "monday", None)])
        {
            let (engine, clock) = engine_on_clock_with(two_per(window, zone, week_start));
            let key = seated(&engine, "ada", "P");
            let (first, last) = (
                days_from_civil(from.0, from.1, from.2),
                days_from_civil(to.0, to.1, to.2),
            );
            // First days of the periods in the range, by jiff's calendar.
            let epoch = jiff::civil::date(1970, 1, 1);
            let firsts: Vec<i64> = (first..last)
                .filter(|d| {
                    let date = epoch.checked_add(jiff::Span::new().days(*d)).unwrap();
                    match day {
                        Some(weekday) => date.weekday() == weekday,
                        None => date.day() == 1,
                    }
                })
                .collect();
            for pair in firsts.windows(2) {
                let (start, end) = (
                    reference_day_start(&tz, pair[0]),
                    reference_day_start(&tz, pair[1]),
                );
                two_per_period(
                    &engine,
                    &clock,
                    &key,
                    (start, end),
                    &format!("{zone} {window} {week_start}"),
                );
            }
        }
    }
}

/// A limit of 2 per period on `widget`, over the period `[start, end)` (the reference's): 2 are
/// admitted at its start, the third is told to wait until `end`, which is also its reset, and
/// a request at its last millisecond is still denied.
fn two_per_period(
    engine: &Engine,
    clock: &ManualClock,
    key: &str,
    (start, end): (u64, u64),
    context: &str,
) {
    clock.set_ms(start);
    assert_eq!(
        admit_count(engine, key, "widget", Unit::Requests, 2, start),
        2,
        "{context} from {start}"
    );
    let (_, retry_at_ms, _, reset_at_ms) =
        quota_exhausted(consume(engine, key, "widget", &ONE_REQUEST, start));
    assert_eq!(
        (retry_at_ms, reset_at_ms),
        (end, end),
        "{context}: [{start}, {end})"
    );
    clock.set_ms(end - 1);
    assert!(
        !consume(engine, key, "widget", &ONE_REQUEST, end - 1).is_admitted(),
        "{context} at {}",
        end - 1
    );
}

/// A plan `P` limiting `widget` requests to 2 per `window`, in `zone`, weeks starting on
/// `week_start`.
fn two_per(window: &str, zone: &str, week_start: &str) -> Policy {
    Policy::from_toml_str(&two_per_text(window, zone, week_start)).expect("a valid policy")
}

/// `two_per`'s document, for a test that wants it refused too.
fn two_per_text(window: &str, zone: &str, week_start: &str) -> String {
    format!(
        r#"
time_zone = "{zone}"
week_start = "{week_start}"
[resources.widget]
units = ["requests"]
[plans.P]
limits = [{{ resource = "widget", unit = "requests", amount = 2, window = "{window}" }}]
"#
    )
}
