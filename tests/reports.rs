//! What the engine tells a caller, checked against figures worked out by hand: the usage report
//! (the console's usage bar: every limit with used, remaining and reset time, and the credits
//! balance) and what an admission or a denial says (where it was charged, the limits, the
//! denial's kind, its retry and reset times, and what could help).

mod common;

use common::*;
use tally_engine::{ChargedTo, DenialReason, Engine, Policy, SettleOutcome, Unit};

/// The report of `key` as of `at_ms`, each limit as `(meter, window, used, remaining, reset)`.
fn report(engine: &Engine, key: &str, at_ms: u64) -> Vec<(String, String, u64, u64, Option<u64>)> {
    engine
        .usage(key, Some(at_ms))
        .expect("a usage report")
        .limits
        .into_iter()
        .map(|limit| {
            assert_eq!(limit.remaining, limit.amount.saturating_sub(limit.used));
            (
                limit.meter,
                limit.window.to_string(),
                limit.used,
                limit.remaining,
                limit.reset_at_ms,
            )
        })
        .collect()
}

fn balance(engine: &Engine, key: &str, at_ms: u64) -> u64 {
    engine
        .usage(key, Some(at_ms))
        .expect("a usage report")
        .credits_balance_micros
}

// ---- Rolling windows -----------------------------------------------------------------------

/// 100 m2.7 requests at T0 + 10 s and 200 at T0 + 1 h on Plus (4,500 per 5 h): at T0 + 2 h the
/// report says 300 used, 4,200 left, and resets when the last of them ages out: truly at
/// T0 + 6 h, reported no earlier and at most one 80 s bucket later. At T0 + 5 h + 10 s the first
/// 100 have aged out (no earlier than that, at most a bucket later).
#[test]
fn a_rolling_limit_reports_used_remaining_and_when_its_last_unit_ages_out() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    let first_ms = T0_MS + 10 * SECOND_MS;
    let second_ms = T0_MS + HOUR_MS;
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 100)],
        first_ms,
    ));
    let admission = admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 200)],
        second_ms,
    ));
    let status = admission.limits.as_slice()[0];
    assert_eq!((status.used, status.remaining()), (300, 4_200));
    let truth_ms = second_ms + FIVE_HOURS_MS;
    let reset_ms = status.reset_at_ms.expect("something is counted");
    assert!(
        (truth_ms..=truth_ms + BUCKET_MS).contains(&reset_ms),
        "{reset_ms}"
    );

    let limit = limit(
        &engine,
        &key,
        "m2.7:requests",
        five_hours(),
        T0_MS + 2 * HOUR_MS,
    );
    assert_eq!(
        (limit.used, limit.remaining, limit.amount),
        (300, 4_200, 4_500)
    );
    assert_eq!(
        limit.reset_at_ms,
        Some(reset_ms),
        "the admission said the same"
    );

    let first_out_ms = first_ms + FIVE_HOURS_MS;
    assert_eq!(m27_used(&engine, &key, first_out_ms - 1), 300);
    assert_eq!(m27_used(&engine, &key, first_out_ms + BUCKET_MS), 200);
    assert_eq!(m27_used(&engine, &key, truth_ms - 1), 200);
    let empty = limit_at(&engine, &key, truth_ms + BUCKET_MS);
    assert_eq!(
        (empty.used, empty.remaining, empty.reset_at_ms),
        (0, 4_500, None)
    );
}

fn limit_at(engine: &Engine, key: &str, at_ms: u64) -> tally_engine::LimitReport {
    limit(engine, key, "m2.7:requests", five_hours(), at_ms)
}

/// Starter's 1,500 requests used at T0 + 30 s (mid-bucket): one more at T0 + 1 h is refused
/// until the 1,500 age out, truly at T0 + 5 h + 30 s. `retry_after` is never earlier than that
/// and at most one bucket later, the request is admitted at `retry_at` and not a millisecond
/// before, and `reset_at` is when the window is empty.
#[test]
fn a_rolling_denials_retry_is_never_early_and_at_most_a_bucket_late() {
    for offset_ms in [0, 30 * SECOND_MS, BUCKET_MS - 1] {
        let engine = engine();
        let key = seated(&engine, "ada", "Starter");
        let used_ms = T0_MS + offset_ms;
        admitted(consume(
            &engine,
            &key,
            "m2.7",
            &[(Unit::Requests, 1_500)],
            used_ms,
        ));
        let asked_ms = T0_MS + HOUR_MS;
        let decision = consume(&engine, &key, "m2.7", &[(Unit::Requests, 1)], asked_ms);
        let (limit, retry_at_ms, retry_after_ms, reset_at_ms) = quota_exhausted(decision);
        assert_eq!(limit, 0);
        let truth_ms = used_ms + FIVE_HOURS_MS;
        assert!(
            (truth_ms..=truth_ms + BUCKET_MS).contains(&retry_at_ms),
            "offset {offset_ms}: retry at {retry_at_ms}, truth {truth_ms}"
        );
        assert_eq!(retry_after_ms, retry_at_ms - asked_ms);
        assert_eq!(reset_at_ms, retry_at_ms, "one bucket holds everything");
        let remedies = denied(decision).remedies;
        assert_eq!(remedies.wait_until_ms, Some(retry_at_ms));
        assert!(!check(
            &engine,
            &key,
            "m2.7",
            &[(Unit::Requests, 1)],
            retry_at_ms - 1
        )
        .is_admitted());
        assert!(check(&engine, &key, "m2.7", &[(Unit::Requests, 1)], retry_at_ms).is_admitted());
    }
}

/// 1,000 requests at T0 and 500 at T0 + 2 h on Starter: 600 more at T0 + 3 h need 600 of the
/// first 1,000 to age out (all of them, as they share a bucket): at T0 + 5 h; `reset_at` is when
/// the last 500 age out, T0 + 7 h (each at most a bucket later).
#[test]
fn a_rolling_denial_waits_for_enough_to_age_out_and_resets_when_the_window_empties() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1_000)],
        T0_MS,
    ));
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 500)],
        T0_MS + 2 * HOUR_MS,
    ));
    let asked_ms = T0_MS + 3 * HOUR_MS;
    let decision = consume(&engine, &key, "m2.7", &[(Unit::Requests, 600)], asked_ms);
    let (_, retry_at_ms, retry_after_ms, reset_at_ms) = quota_exhausted(decision);
    let retry_truth = T0_MS + FIVE_HOURS_MS;
    let reset_truth = T0_MS + 7 * HOUR_MS;
    assert!(
        (retry_truth..=retry_truth + BUCKET_MS).contains(&retry_at_ms),
        "{retry_at_ms}"
    );
    assert_eq!(retry_after_ms, retry_at_ms - asked_ms);
    assert!(
        (reset_truth..=reset_truth + BUCKET_MS).contains(&reset_at_ms),
        "{reset_at_ms}"
    );
    let limits = denied(decision).limits;
    let status = limits.as_slice()[0];
    assert_eq!((status.used, status.remaining()), (1_500, 0));
    assert_eq!(status.reset_at_ms, Some(reset_at_ms));
}

// ---- Calendar windows in a zone with DST ---------------------------------------------------

fn new_york() -> Policy {
    Policy::from_toml_str(
        r#"
time_zone = "America/New_York"
[resources.chat]
units = ["requests"]
price_micros = { requests = 10 }
[plans.P]
limits = [
  { resource = "chat", unit = "requests", amount = 10, window = "daily" },
  { resource = "chat", unit = "requests", amount = 20, window = "weekly" },
  { resource = "chat", unit = "requests", amount = 30, window = "monthly" },
]
"#,
    )
    .expect("a valid policy")
}

/// New York leaves DST at 2026-11-01 02:00 EDT (06:00Z). A request at 2026-10-31 12:00 EDT
/// (16:00Z): the day resets at Nov 1 00:00 EDT (04:00Z), the week (from Monday) at Nov 2
/// 00:00 EST (05:00Z), the month at Nov 1 00:00 EDT (04:00Z). On Nov 1 at 12:00 EST (17:00Z)
/// the day is 25 hours long and resets at Nov 2 05:00Z; the month at Dec 1 05:00Z. New York
/// enters DST on 2026-03-08 (02:00 EST = 07:00Z): that day resets at Mar 9 00:00 EDT (04:00Z).
#[test]
fn calendar_limits_reset_at_local_midnight_week_start_and_month_start_across_dst() {
    let engine = engine_with(new_york());
    let key = seated(&engine, "ada", "P");
    let at_ms = utc_ms(2026, 10, 31, 16, 0, 0);
    let admission = admitted(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 4)],
        at_ms,
    ));
    let resets: Vec<_> = admission
        .limits
        .as_slice()
        .iter()
        .map(|status| (status.used, status.remaining(), status.reset_at_ms))
        .collect();
    let day_end = utc_ms(2026, 11, 1, 4, 0, 0);
    let week_end = utc_ms(2026, 11, 2, 5, 0, 0);
    let month_end = utc_ms(2026, 11, 1, 4, 0, 0);
    assert_eq!(
        resets,
        [
            (4, 6, Some(day_end)),
            (4, 16, Some(week_end)),
            (4, 26, Some(month_end))
        ]
    );
    assert_eq!(
        report(&engine, &key, at_ms + HOUR_MS),
        [
            ("chat:requests".into(), "daily".into(), 4, 6, Some(day_end)),
            (
                "chat:requests".into(),
                "weekly".into(),
                4,
                16,
                Some(week_end)
            ),
            (
                "chat:requests".into(),
                "monthly".into(),
                4,
                26,
                Some(month_end)
            ),
        ]
    );
    // Six more fill the day: the 11th waits for local midnight.
    admitted(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 6)],
        at_ms,
    ));
    let (limit, retry_at_ms, _, reset_at_ms) = quota_exhausted(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 1)],
        at_ms,
    ));
    assert_eq!((limit, retry_at_ms, reset_at_ms), (0, day_end, day_end));
    // The 25-hour day after the change.
    let later_ms = utc_ms(2026, 11, 1, 17, 0, 0);
    admitted(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 2)],
        later_ms,
    ));
    assert_eq!(
        report(&engine, &key, later_ms),
        [
            (
                "chat:requests".into(),
                "daily".into(),
                2,
                8,
                Some(utc_ms(2026, 11, 2, 5, 0, 0))
            ),
            (
                "chat:requests".into(),
                "weekly".into(),
                12,
                8,
                Some(week_end)
            ),
            (
                "chat:requests".into(),
                "monthly".into(),
                2,
                28,
                Some(utc_ms(2026, 12, 1, 5, 0, 0))
            ),
        ]
    );
    // A report for a key that never used anything resets at the same times.
    let fresh = seated(&engine, "bob", "P");
    let spring_ms = utc_ms(2026, 3, 8, 5, 30, 0);
    let resets: Vec<_> = report(&engine, &fresh, spring_ms)
        .into_iter()
        .map(|(_, _, used, remaining, reset)| (used, remaining, reset))
        .collect();
    assert_eq!(
        resets,
        [
            (0, 10, Some(utc_ms(2026, 3, 9, 4, 0, 0))),
            (0, 20, Some(utc_ms(2026, 3, 9, 4, 0, 0))),
            (0, 30, Some(utc_ms(2026, 4, 1, 4, 0, 0))),
        ]
    );
}

// ---- The shared usage bar ------------------------------------------------------------------

/// Bar-Plus counts each endpoint at its price: 4 images (4 x 25,000) and an m2.7 call of one
/// request and 1,000 tokens (2,000 + 1,000) put 103,000 on both bars: 1,897,000 of 2,000,000
/// left on the 5-hour bar, 9,897,000 of 10,000,000 on the weekly one, which resets next Monday
/// at 00:00 in Shanghai (T0 is a Monday's midnight there).
#[test]
fn the_usage_bar_reports_usage_at_prices_on_both_windows() {
    let engine = engine();
    let key = seated(&engine, "ada", "Bar-Plus");
    admitted(consume(
        &engine,
        &key,
        "image-01",
        &[(Unit::Images, 4)],
        T0_MS,
    ));
    let m27 = [(Unit::Requests, 1), (Unit::Tokens, 1_000)];
    let admission = admitted(consume(&engine, &key, "m2.7", &m27, T0_MS + MINUTE_MS));
    assert_eq!(
        admission.charged_to,
        ChargedTo::PlanQuota {
            plan: plan_id(&engine, "Bar-Plus")
        }
    );
    let figures: Vec<_> = admission
        .limits
        .as_slice()
        .iter()
        .map(|status| (status.used, status.remaining()))
        .collect();
    assert_eq!(figures, [(103_000, 1_897_000), (103_000, 9_897_000)]);
    let report = report(&engine, &key, T0_MS + HOUR_MS);
    assert_eq!(report.len(), 2);
    assert_eq!(report[0].2..=report[0].3, 103_000..=1_897_000);
    assert_eq!(
        (report[1].2, report[1].3, report[1].4),
        (103_000, 9_897_000, Some(T0_MS + WEEK_MS))
    );
    let truth_ms = T0_MS + MINUTE_MS + FIVE_HOURS_MS;
    let reset_ms = report[0].4.expect("something is counted");
    assert!(
        (truth_ms..=truth_ms + BUCKET_MS).contains(&reset_ms),
        "{reset_ms}"
    );
}

// ---- Coverage, maximums, keys without resources ----------------------------------------------

/// Starter does not cover image-01: the report lists only Starter's two limits; the denial says
/// which resource, suggests a plan that covers it, and the credits one image costs.
#[test]
fn an_uncovered_resource_is_reported_as_such_with_a_covering_plan() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let denial = denied(consume(
        &engine,
        &key,
        "image-01",
        &[(Unit::Images, 1)],
        T0_MS,
    ));
    assert_eq!(
        denial.reason,
        DenialReason::ResourceNotCovered {
            resource: resource_id(&engine, "image-01")
        }
    );
    assert_eq!(denial.remedies.credits_needed_micros, Some(25_000));
    assert_eq!(
        denial.remedies.wait_until_ms, None,
        "waiting cannot make Starter cover it"
    );
    let upgrade = denial
        .remedies
        .upgrade_to
        .expect("a plan covering image-01");
    assert!(engine.policy().plan(upgrade).covers[resource_id(&engine, "image-01").index()]);
    let meters: Vec<_> = report(&engine, &key, T0_MS)
        .into_iter()
        .map(|limit| limit.0)
        .collect();
    assert_eq!(meters, ["m2.7:requests", "music-2.6:songs"]);
}

/// A song of 301 seconds is over the 300-second maximum for every key: nothing can help, so no
/// remedy is offered; a 300-second song is admitted.
#[test]
fn a_song_over_five_minutes_is_refused_with_no_remedy() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    engine
        .top_up(&team_of("ada"), 10_000_000, Some(T0_MS))
        .expect("top up");
    let denial = denied(consume(
        &engine,
        &key,
        "music-2.6",
        &[(Unit::Songs, 1), (Unit::Seconds, 301)],
        T0_MS,
    ));
    assert_eq!(
        denial.reason,
        DenialReason::OverRequestMaximum {
            unit: Unit::Seconds,
            maximum: 300,
            requested: 301
        }
    );
    assert_eq!(denial.remedies, Default::default());
    let song = [(Unit::Songs, 1), (Unit::Seconds, 300)];
    let admission = admitted(consume(&engine, &key, "music-2.6", &song, T0_MS));
    assert_eq!(
        (
            admission.limits.as_slice()[0].used,
            admission.limits.as_slice()[0].remaining()
        ),
        (1, 99)
    );
}

/// A key with no seat and no credits: "no resources", a plan to get a seat on and the credits
/// the request costs; its report has no plan, no limits and a zero balance. Once the team has
/// credits the same request is charged to them and the report shows the balance after it.
#[test]
fn a_key_without_a_seat_reports_no_resources_then_uses_team_credits() {
    let engine = engine();
    let key = user(&engine, "ada");
    let denial = denied(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 3)],
        T0_MS,
    ));
    assert_eq!(denial.reason, DenialReason::NoResources);
    assert_eq!(denial.remedies.credits_needed_micros, Some(6_000));
    assert_eq!(denial.remedies.wait_until_ms, None);
    assert!(denial.remedies.upgrade_to.is_some());
    let usage = engine.usage(&key, Some(T0_MS)).expect("report");
    assert_eq!(
        (
            usage.plan.as_deref(),
            usage.limits.len(),
            usage.credits_balance_micros
        ),
        (None, 0, 0)
    );

    engine
        .top_up(&team_of("ada"), 10_000, Some(T0_MS))
        .expect("top up");
    let admission = admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 3)],
        T0_MS,
    ));
    assert_eq!(admission.charged_to, ChargedTo::Credits { micros: 6_000 });
    assert_eq!(admission.credits_balance_micros, Some(4_000));
    assert_eq!(
        (admission.plan, admission.limits.as_slice().len()),
        (None, 0)
    );
    let usage = engine.usage(&key, Some(T0_MS)).expect("report");
    assert_eq!(
        (usage.credits_balance_micros, usage.credits_charged_micros),
        (4_000, 6_000)
    );
    // Three more cost 6,000 with 4,000 left: short by 2,000.
    let denial = denied(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 3)],
        T0_MS,
    ));
    assert_eq!(
        denial.reason,
        DenialReason::InsufficientCredits {
            balance_micros: 4_000,
            price_micros: 6_000
        }
    );
    assert_eq!(denial.credits_balance_micros, Some(4_000));
    assert_eq!(denial.remedies.credits_needed_micros, Some(2_000));
}

/// A revoked key is denied with nothing to suggest, and its report says it is revoked while
/// still showing what it used.
#[test]
fn a_revoked_key_is_denied_with_no_remedy_and_reported_revoked() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    engine
        .top_up(&team_of("ada"), 10_000, Some(T0_MS))
        .expect("top up");
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 7)],
        T0_MS,
    ));
    assert!(engine.revoke_key(&key, Some(T0_MS)).expect("revoke"));
    let denial = denied(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1)],
        T0_MS,
    ));
    assert_eq!(denial.reason, DenialReason::KeyRevoked);
    assert_eq!(denial.remedies, Default::default());
    let usage = engine.usage(&key, Some(T0_MS)).expect("report");
    assert!(usage.revoked);
    assert_eq!(usage.limits[0].used, 7);
    assert_eq!(usage.credits_balance_micros, 10_000);
}

/// A pay-as-you-go key is charged at the price and its report totals its spend; no limits, no
/// credits touched.
#[test]
fn a_pay_as_you_go_key_reports_its_spend_and_no_limits() {
    let engine = engine();
    user(&engine, "ada");
    engine
        .top_up(&team_of("ada"), 10_000, Some(T0_MS))
        .expect("top up");
    engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .expect("payg key");
    let admission = admitted(consume(
        &engine,
        "payg-ada",
        "image-01",
        &[(Unit::Images, 2)],
        T0_MS,
    ));
    assert_eq!(
        admission.charged_to,
        ChargedTo::PayAsYouGo { micros: 50_000 }
    );
    assert_eq!(admission.credits_balance_micros, None);
    admitted(consume(
        &engine,
        "payg-ada",
        "m2.7",
        &[(Unit::Requests, 1), (Unit::Tokens, 10)],
        T0_MS,
    ));
    let usage = engine.usage("payg-ada", Some(T0_MS)).expect("report");
    assert_eq!(usage.payg_micros, 52_010);
    assert_eq!((usage.limits.len(), usage.plan), (0, None));
    assert_eq!(usage.credits_balance_micros, 10_000);
}

// ---- Credits after the quota --------------------------------------------------------------

/// Starter's 1,500 requests used, 10,000 micro-credits: the next request is charged 2,000 to
/// credits; the admission reports the plan's limit as it stands (1,500 used, 0 left) and the
/// balance after (8,000), as does the report. A reservation of 3 (6,000) leaves 2,000; settled
/// for 1 it gives 4,000 back (balance 6,000); another of 1 settled for 2 takes 2,000 more
/// (balance 2,000). A refund of the first request gives 2,000 back (4,000).
#[test]
fn credits_balances_are_right_after_a_charge_a_settle_for_less_or_more_and_a_refund() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1_500)],
        T0_MS,
    ));
    engine
        .top_up(&team_of("ada"), 10_000, Some(T0_MS))
        .expect("top up");
    let admission = admitted(
        engine
            .consume(
                &tally_engine::UsageRequest::new(&key, "m2.7", &[(Unit::Requests, 1)])
                    .at(T0_MS)
                    .id("first"),
            )
            .expect("valid"),
    );
    assert_eq!(admission.charged_to, ChargedTo::Credits { micros: 2_000 });
    assert_eq!(admission.credits_balance_micros, Some(8_000));
    assert_eq!(admission.plan, Some(plan_id(&engine, "Starter")));
    let status = admission.limits.as_slice()[0];
    assert_eq!((status.used, status.remaining()), (1_500, 0));
    let limit = limit_at(&engine, &key, T0_MS);
    assert_eq!((limit.used, limit.remaining), (1_500, 0));
    assert_eq!(balance(&engine, &key, T0_MS), 8_000);

    let reserved = engine
        .reserve(
            &tally_engine::UsageRequest::new(&key, "m2.7", &[(Unit::Requests, 3)]).at(T0_MS),
            None,
        )
        .expect("valid");
    let held = admitted(reserved.decision);
    assert_eq!(held.charged_to, ChargedTo::Credits { micros: 6_000 });
    assert_eq!(held.credits_balance_micros, Some(2_000));
    assert_eq!(balance(&engine, &key, T0_MS), 2_000);
    let id = reserved.reservation.expect("an id");
    match engine
        .settle(id, &[(Unit::Requests, 1)], Some(T0_MS))
        .expect("valid")
    {
        SettleOutcome::Settled(settlement) => assert_eq!(settlement.extra, None),
        other => panic!("{other:?}"),
    }
    assert_eq!(balance(&engine, &key, T0_MS), 6_000);

    let reserved = engine
        .reserve(
            &tally_engine::UsageRequest::new(&key, "m2.7", &[(Unit::Requests, 1)]).at(T0_MS),
            None,
        )
        .expect("valid");
    assert_eq!(
        admitted(reserved.decision).credits_balance_micros,
        Some(4_000)
    );
    let id = reserved.reservation.expect("an id");
    match engine
        .settle(id, &[(Unit::Requests, 2)], Some(T0_MS))
        .expect("valid")
    {
        SettleOutcome::Settled(settlement) => {
            assert_eq!(settlement.extra, Some(ChargedTo::Credits { micros: 2_000 }))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(balance(&engine, &key, T0_MS), 2_000);
    engine.refund("first", Some(T0_MS)).expect("refund");
    assert_eq!(balance(&engine, &key, T0_MS), 4_000);
    let usage = engine.usage(&key, Some(T0_MS)).expect("report");
    assert_eq!(
        usage.credits_charged_micros,
        2_000 + 6_000 - 4_000 + 2_000 + 2_000 - 2_000
    );
}

// ---- Seat and policy changes ---------------------------------------------------------------

/// 1,000 of Starter's 1,500 used; an upgrade to Plus leaves 3,500 of 4,500; 2,000 more on Plus
/// and a downgrade back to Starter reports 3,000 used, none left (not a negative figure), and a
/// request waits for 1,501 to age out: the first 1,000 and 501 of the 2,000, at T0 + 1 h + 5 h.
#[test]
fn a_seat_change_mid_window_reports_the_new_limit_minus_what_was_used() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1_000)],
        T0_MS,
    ));
    engine
        .assign_seat(&team_of("ada"), "ada", "Plus", Some(T0_MS + MINUTE_MS))
        .expect("upgrade");
    let limit = limit_at(&engine, &key, T0_MS + MINUTE_MS);
    assert_eq!(
        (limit.amount, limit.used, limit.remaining),
        (4_500, 1_000, 3_500)
    );
    assert_eq!(
        admit_count(&engine, &key, "m2.7", Unit::Requests, 1, T0_MS + HOUR_MS),
        1
    );
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1_999)],
        T0_MS + HOUR_MS,
    ));
    engine
        .assign_seat(&team_of("ada"), "ada", "Starter", Some(T0_MS + 2 * HOUR_MS))
        .expect("downgrade");
    let limit = limit_at(&engine, &key, T0_MS + 2 * HOUR_MS);
    assert_eq!(
        (limit.amount, limit.used, limit.remaining),
        (1_500, 3_000, 0)
    );
    let decision = consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1)],
        T0_MS + 2 * HOUR_MS,
    );
    let (_, retry_at_ms, _, reset_at_ms) = quota_exhausted(decision);
    let truth_ms = T0_MS + HOUR_MS + FIVE_HOURS_MS;
    assert!(
        (truth_ms..=truth_ms + BUCKET_MS).contains(&retry_at_ms),
        "{retry_at_ms}"
    );
    assert!(
        (truth_ms..=truth_ms + BUCKET_MS).contains(&reset_at_ms),
        "{reset_at_ms}"
    );
}

/// A swap that lowers Plus's m2.7 limit from 4,500 to 3,000 with 3,500 used: the report says
/// 3,500 used of 3,000, none left.
#[test]
fn a_policy_swap_that_lowers_a_limit_reports_none_left() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 3_500)],
        T0_MS,
    ));
    let mut document = Policy::token_plan().document().clone();
    document.plans.get_mut("Plus").expect("Plus").limits[0].amount = 3_000;
    engine
        .swap_policy(
            Policy::compile(document).expect("valid"),
            Some(T0_MS + MINUTE_MS),
        )
        .expect("swap");
    let limit = limit_at(&engine, &key, T0_MS + MINUTE_MS);
    assert_eq!(
        (limit.amount, limit.used, limit.remaining),
        (3_000, 3_500, 0)
    );
    let decision = consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1)],
        T0_MS + MINUTE_MS,
    );
    let (_, retry_at_ms, _, _) = quota_exhausted(decision);
    let truth_ms = T0_MS + FIVE_HOURS_MS;
    assert!(
        (truth_ms..=truth_ms + BUCKET_MS).contains(&retry_at_ms),
        "{retry_at_ms}"
    );
}

// ---- What could help -------------------------------------------------------------------------

/// Small allows 10 requests per 5 hours and 100 a day; Big 100 per 5 hours but only 20 a day;
/// Huge 200 and 500. 30 requests at once exceed Small's 5-hour limit: Big's 5-hour limit would
/// take them, but its daily 20 never can, so the plan to suggest is Huge.
#[test]
fn a_suggested_plan_takes_the_request_on_every_limit_it_touches() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.Small]
limits = [
  { resource = "chat", unit = "requests", amount = 10, window = "rolling:5h" },
  { resource = "chat", unit = "requests", amount = 100, window = "daily" },
]
[plans.Big]
limits = [
  { resource = "chat", unit = "requests", amount = 100, window = "rolling:5h" },
  { resource = "chat", unit = "requests", amount = 20, window = "daily" },
]
[plans.Huge]
limits = [
  { resource = "chat", unit = "requests", amount = 200, window = "rolling:5h" },
  { resource = "chat", unit = "requests", amount = 500, window = "daily" },
]
"#,
    )
    .expect("a valid policy");
    let huge = policy.plan_id("Huge");
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "Small");
    let denial = denied(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 30)],
        T0_MS,
    ));
    assert!(
        matches!(denial.reason, DenialReason::ExceedsLimit { limit: 0, .. }),
        "{denial:?}"
    );
    assert_eq!(
        denial.remedies.wait_until_ms, None,
        "waiting never lets 30 into 10"
    );
    assert_eq!(
        denial.remedies.upgrade_to, huge,
        "Big's daily 20 can never take 30"
    );
    // 10 used, 10 more: Big takes them on both limits (20 of 100, 20 of 20).
    admitted(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 10)],
        T0_MS,
    ));
    let denial = denied(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 10)],
        T0_MS,
    ));
    assert!(
        matches!(denial.reason, DenialReason::QuotaExhausted { .. }),
        "{denial:?}"
    );
    assert_eq!(denial.remedies.upgrade_to, engine.policy().plan_id("Big"));
    // 10 used, 15 more: Big's daily 20 cannot take 25 today; Huge can.
    let denial = denied(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 15)],
        T0_MS,
    ));
    assert_eq!(
        denial.remedies.upgrade_to, huge,
        "Big's day would hold 25 of 20"
    );
}

/// Small caps a request at 5, Big ($20) at 10, Huge ($50) at nothing: a request over Small's
/// own maximum is offered the cheapest plan whose maximum and limits take it (Big for 8, Huge
/// for 50), and none for more than any plan takes (2,000 a day over Huge's 1,000). It was
/// offered nothing: a plan's maximum looked like the resource's, which no plan lifts.
#[test]
fn a_request_over_the_plans_own_maximum_is_offered_a_plan_that_allows_it() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.Small]
limits = [{ resource = "chat", unit = "requests", amount = 100, window = "daily" }]
maximums = [{ resource = "chat", unit = "requests", amount = 5 }]
[plans.Big]
price_micros_per_month = 20000000
limits = [{ resource = "chat", unit = "requests", amount = 100, window = "daily" }]
maximums = [{ resource = "chat", unit = "requests", amount = 10 }]
[plans.Huge]
price_micros_per_month = 50000000
limits = [{ resource = "chat", unit = "requests", amount = 1000, window = "daily" }]
"#,
    )
    .expect("a valid policy");
    let (small, big, huge) = (
        policy.plan_id("Small"),
        policy.plan_id("Big"),
        policy.plan_id("Huge"),
    );
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "Small");
    for (requested, offered) in [(8, big), (50, huge), (2_000, None)] {
        let denial = denied(consume(
            &engine,
            &key,
            "chat",
            &[(Unit::Requests, requested)],
            T0_MS,
        ));
        assert_eq!(
            denial.reason,
            DenialReason::OverRequestMaximum {
                unit: Unit::Requests,
                maximum: 5,
                requested
            }
        );
        assert_eq!(denial.plan, small, "the plan whose maximum refused");
        assert_eq!(
            denial.remedies.upgrade_to, offered,
            "{requested}: {denial:?}"
        );
        assert_eq!(denial.remedies.wait_until_ms, None);
    }
    assert_eq!(
        report(&engine, &key, T0_MS)[0].2,
        0,
        "nothing counted for a refused request"
    );
}

/// Big has more room than Small (10 a day) but caps a request at 5: neither 12 at once (over
/// Small's whole day) nor 8 with 6 used (over what is left) is helped by it; Huge takes both.
#[test]
fn a_suggested_plan_allows_the_request_under_its_maximums() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.Small]
limits = [{ resource = "chat", unit = "requests", amount = 10, window = "daily" }]
[plans.Big]
limits = [{ resource = "chat", unit = "requests", amount = 100, window = "daily" }]
maximums = [{ resource = "chat", unit = "requests", amount = 5 }]
[plans.Huge]
limits = [{ resource = "chat", unit = "requests", amount = 200, window = "daily" }]
"#,
    )
    .expect("a valid policy");
    let huge = policy.plan_id("Huge");
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "Small");
    let denial = denied(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 12)],
        T0_MS,
    ));
    assert!(
        matches!(denial.reason, DenialReason::ExceedsLimit { .. }),
        "{denial:?}"
    );
    assert_eq!(
        denial.remedies.upgrade_to, huge,
        "Big refuses more than 5 per request"
    );
    admitted(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 6)],
        T0_MS,
    ));
    let denial = denied(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 8)],
        T0_MS,
    ));
    assert!(
        matches!(denial.reason, DenialReason::QuotaExhausted { .. }),
        "{denial:?}"
    );
    assert_eq!(
        denial.remedies.upgrade_to, huge,
        "Big refuses more than 5 per request"
    );
    // 5 more: Big takes them.
    let denial = denied(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 5)],
        T0_MS,
    ));
    assert_eq!(denial.remedies.upgrade_to, engine.policy().plan_id("Big"));
}

/// No plan of the default policy takes 60 videos of Hailuo 2.3 a day within its limits (5 at
/// most, or the bars' 12,000,000 micro-credits per 5 hours = 42 videos at 280,000): a key without
/// a seat is offered no plan rather than one that can never take them.
#[test]
fn no_plan_is_suggested_when_none_can_take_the_request() {
    let engine = engine();
    let key = user(&engine, "ada");
    let denial = denied(consume(
        &engine,
        &key,
        "hailuo-2.3-768p-6s",
        &[(Unit::Videos, 60)],
        T0_MS,
    ));
    assert_eq!(denial.reason, DenialReason::NoResources);
    assert_eq!(denial.remedies.upgrade_to, None, "{denial:?}");
    assert_eq!(denial.remedies.credits_needed_micros, Some(60 * 280_000));
}

/// Bar-Plus allows 4 open reservations, Bar-Max 5 and Bar-Ultra 7. A fifth reservation of 20
/// Hailuo 2.3 videos (20 x 280,000 = 5,600,000 micro-credits) is refused for the agents; Bar-Max
/// has one agent more but its 5-hour bar of 5,000,000 can never take the videos: the plan to
/// suggest is Bar-Ultra (12,000,000).
#[test]
fn a_plan_suggested_for_more_agents_takes_the_request_too() {
    let engine = engine();
    let key = seated(&engine, "ada", "Bar-Plus");
    let one = [(Unit::Requests, 1)];
    for _ in 0..4 {
        let outcome = engine
            .reserve(
                &tally_engine::UsageRequest::new(&key, "m2.7", &one).at(T0_MS),
                None,
            )
            .expect("valid");
        admitted(outcome.decision);
    }
    let videos = [(Unit::Videos, 20)];
    let outcome = engine
        .reserve(
            &tally_engine::UsageRequest::new(&key, "hailuo-2.3-768p-6s", &videos).at(T0_MS),
            None,
        )
        .expect("valid");
    let denial = denied(outcome.decision);
    assert_eq!(
        denial.reason,
        DenialReason::TooManyReservations {
            open: 4,
            maximum: 4
        }
    );
    assert_eq!(
        denial.remedies.upgrade_to,
        Some(plan_id(&engine, "Bar-Ultra")),
        "Bar-Max's bar of 5,000,000 never takes 5,600,000"
    );
    // Two videos (560,000) fit Bar-Max: it is the plan with the fewest agents above 4.
    let videos = [(Unit::Videos, 2)];
    let outcome = engine
        .reserve(
            &tally_engine::UsageRequest::new(&key, "hailuo-2.3-768p-6s", &videos).at(T0_MS),
            None,
        )
        .expect("valid");
    assert_eq!(
        denied(outcome.decision).remedies.upgrade_to,
        Some(plan_id(&engine, "Bar-Max"))
    );
}

/// Plus has 50 image-01 images a day; Plus-Highspeed 100 (and no m2.7), Max 120 (and m2.7). A
/// Plus key out of images is offered Max: the plan with the smallest step up that still covers
/// every resource Plus covers. Plus-Highspeed, the smaller step, would take the image and
/// refuse the key's every m2.7 request (an earlier build offered it).
#[test]
fn an_upgrade_out_of_a_limit_keeps_every_resource_the_plan_covers() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    admitted(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 1)],
        T0_MS,
    ));
    for _ in 0..50 {
        admitted(consume(
            &engine,
            &key,
            "image-01",
            &[(Unit::Images, 1)],
            T0_MS,
        ));
    }
    let denial = denied(consume(
        &engine,
        &key,
        "image-01",
        &[(Unit::Images, 1)],
        T0_MS,
    ));
    assert!(
        matches!(denial.reason, DenialReason::QuotaExhausted { .. }),
        "{denial:?}"
    );
    let policy = engine.policy();
    let plus = policy.plan(plan_id(&engine, "Plus"));
    let highspeed = policy.plan(plan_id(&engine, "Plus-Highspeed"));
    assert!(
        !highspeed.covers[resource_id(&engine, "m2.7").index()],
        "the trap this test is about: Plus-Highspeed does not cover m2.7"
    );
    let upgrade = denial.remedies.upgrade_to.expect("a bigger plan");
    assert_eq!(upgrade, plan_id(&engine, "Max"), "{denial:?}");
    let offered = policy.plan(upgrade);
    for (index, &covered) in plus.covers.iter().enumerate() {
        assert!(
            !covered || offered.covers[index],
            "the plan offered drops resource {index}"
        );
    }
    // Where no bigger plan keeps the coverage, the bigger one that does not is still offered:
    // 121 images at once only Max-Highspeed (200) and Ultra-Highspeed (800) could ever take
    // (Max's 120 never can), and neither covers m2.7.
    let denial = denied(consume(
        &engine,
        &key,
        "image-01",
        &[(Unit::Images, 121)],
        T0_MS,
    ));
    let upgrade = denial.remedies.upgrade_to.expect("a bigger plan");
    assert!(
        ["Max-Highspeed", "Ultra-Highspeed"].contains(&&*policy.plan(upgrade).name),
        "{denial:?}"
    );
}

/// Words covers chat, Pictures covers images (and is the cheaper), Both covers the two. A
/// Words key asking for an image is offered Both: Pictures would take the image and refuse
/// the key's chat. A key with no seat has no coverage to keep: it is offered the cheapest
/// plan that takes the request, Pictures.
#[test]
fn a_plan_suggested_for_an_uncovered_resource_keeps_what_the_seat_covers() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[resources.images]
units = ["images"]
[plans.Words]
price_micros_per_month = 10000000
limits = [{ resource = "chat", unit = "requests", amount = 100, window = "daily" }]
[plans.Pictures]
price_micros_per_month = 5000000
limits = [{ resource = "images", unit = "images", amount = 10, window = "daily" }]
[plans.Both]
price_micros_per_month = 20000000
limits = [
  { resource = "chat", unit = "requests", amount = 100, window = "daily" },
  { resource = "images", unit = "images", amount = 10, window = "daily" },
]
"#,
    )
    .expect("a valid policy");
    let (pictures, both) = (policy.plan_id("Pictures"), policy.plan_id("Both"));
    let engine = engine_with(policy);
    let image = [(Unit::Images, 1)];
    let key = seated(&engine, "ada", "Words");
    let denial = denied(consume(&engine, &key, "images", &image, T0_MS));
    assert!(
        matches!(denial.reason, DenialReason::ResourceNotCovered { .. }),
        "{denial:?}"
    );
    assert_eq!(denial.remedies.upgrade_to, both, "{denial:?}");
    let unseated = user(&engine, "bea");
    let denial = denied(consume(&engine, &unseated, "images", &image, T0_MS));
    assert_eq!(denial.reason, DenialReason::NoResources);
    assert_eq!(denial.remedies.upgrade_to, pictures, "{denial:?}");
}

/// Solo caps open reservations at 1 and covers chat and images; Crew caps them at 3 and covers
/// chat only; Team caps them at 4 and covers both. A Solo key holding its one reservation is
/// offered Team: Crew has fewer agents above 1 but would refuse the key's images.
#[test]
fn a_plan_suggested_for_more_agents_keeps_what_the_seat_covers() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[resources.images]
units = ["images"]
[plans.Solo]
max_open_reservations = 1
limits = [
  { resource = "chat", unit = "requests", amount = 100, window = "daily" },
  { resource = "images", unit = "images", amount = 10, window = "daily" },
]
[plans.Crew]
max_open_reservations = 3
limits = [{ resource = "chat", unit = "requests", amount = 100, window = "daily" }]
[plans.Team]
max_open_reservations = 4
limits = [
  { resource = "chat", unit = "requests", amount = 100, window = "daily" },
  { resource = "images", unit = "images", amount = 10, window = "daily" },
]
"#,
    )
    .expect("a valid policy");
    let team = policy.plan_id("Team");
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "Solo");
    let one = [(Unit::Requests, 1)];
    let reserve = || {
        engine
            .reserve(
                &tally_engine::UsageRequest::new(&key, "chat", &one).at(T0_MS),
                None,
            )
            .expect("valid")
            .decision
    };
    admitted(reserve());
    let denial = denied(reserve());
    assert_eq!(
        denial.reason,
        DenialReason::TooManyReservations {
            open: 1,
            maximum: 1
        }
    );
    assert_eq!(denial.remedies.upgrade_to, team, "{denial:?}");
}

/// Bar-Plus's weekly bar of 10,000,000 filled by five 5-hour bars of 2,000,000, six hours
/// apart from Monday 00:00 (Shanghai): on Tuesday at 06:01 the 5-hour bar is empty, and the
/// weekly one refuses until next Monday 00:00, which is also when it resets; Bar-Max's
/// 25,000,000 a week would take the request now.
#[test]
fn a_weekly_bar_denial_waits_for_the_next_week_start() {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Bar-Plus");
    let two_million = m27_worth(&engine, 2_000_000);
    for step in 0..5 {
        let at_ms = T0_MS + step * 6 * HOUR_MS;
        admitted(consume(&engine, &key, "m2.7", &two_million, at_ms));
    }
    let asked_ms = T0_MS + 30 * HOUR_MS + MINUTE_MS;
    clock.set_ms(asked_ms);
    let decision = consume(&engine, &key, "m2.7", &[(Unit::Requests, 1)], asked_ms);
    let (limit, retry_at_ms, retry_after_ms, reset_at_ms) = quota_exhausted(decision);
    assert_eq!(
        limit,
        limit_index(&engine, "Bar-Plus", "usage-bar", weekly())
    );
    assert_eq!(
        (retry_at_ms, reset_at_ms),
        (T0_MS + WEEK_MS, T0_MS + WEEK_MS)
    );
    assert_eq!(retry_after_ms, T0_MS + WEEK_MS - asked_ms);
    let denial = denied(decision);
    assert_eq!(denial.remedies.wait_until_ms, Some(T0_MS + WEEK_MS));
    assert_eq!(
        denial.remedies.upgrade_to,
        Some(plan_id(&engine, "Bar-Max"))
    );
    let report = report(&engine, &key, asked_ms);
    assert_eq!(
        (report[0].2, report[0].3, report[0].4),
        (0, 2_000_000, None)
    );
    assert_eq!(
        (report[1].2, report[1].3, report[1].4),
        (10_000_000, 0, Some(T0_MS + WEEK_MS))
    );
}

/// Santiago de Chile skips local midnight when DST begins (2026-09-06 00:00 -04 becomes 01:00
/// -03, 04:00Z): a day limit used on Sept 5 at 12:00 -04 (16:00Z) resets when Sept 6 begins,
/// at 01:00 -03 = 04:00Z; the month's limit at Oct 1 00:00 -03 (03:00Z).
#[test]
fn a_day_whose_midnight_is_skipped_resets_when_the_next_day_begins() {
    let mut document = new_york().document().clone();
    document.time_zone = "America/Santiago".into();
    let engine = engine_with(Policy::compile(document).expect("valid"));
    let key = seated(&engine, "ada", "P");
    let at_ms = utc_ms(2026, 9, 5, 16, 0, 0);
    let admission = admitted(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 1)],
        at_ms,
    ));
    let resets: Vec<_> = admission
        .limits
        .as_slice()
        .iter()
        .map(|status| status.reset_at_ms)
        .collect();
    assert_eq!(
        resets,
        [
            Some(utc_ms(2026, 9, 6, 4, 0, 0)),
            Some(utc_ms(2026, 9, 7, 3, 0, 0)),
            Some(utc_ms(2026, 10, 1, 3, 0, 0)),
        ]
    );
}
