//! Credits: usage beyond the quota is charged to the team's credits at the resource's price,
//! never below zero; denials say what would help; the older seed's shared usage bar counts every
//! endpoint at its price; the bar plans cap the agents (open reservations) a key may run.

mod common;
mod log_support;

use std::sync::Arc;

use common::*;
use tally_engine::{
    ChargedTo, Decision, DenialReason, Engine, Error, ManualClock, OpenOptions, Policy,
    ReservationId, SettleOutcome, Settlement, Unit, UsageRequest,
};

const ONE_REQUEST: [(Unit, u64); 1] = [(Unit::Requests, 1)];

/// A Starter key whose 1,500 m2.7 requests are used at T0.
fn starter_exhausted() -> (Engine, String) {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1500, T0_MS), 1500);
    (engine, key)
}

#[test]
fn once_the_rolling_quota_is_exhausted_requests_are_charged_to_credits_at_the_resource_price() {
    let (engine, key) = starter_exhausted();
    let top_up_micros = 1_000_000;
    engine
        .top_up("@ada", top_up_micros, Some(T0_MS))
        .expect("top up");
    let quantities = [(Unit::Requests, 1), (Unit::Tokens, 500)];
    let policy = engine.policy();
    let prices = policy.resource(resource_id(&engine, "m2.7")).price_micros;
    let price = prices[Unit::Requests.index()].expect("priced")
        + 500 * prices[Unit::Tokens.index()].expect("priced");

    let admission = admitted(consume(
        &engine,
        &key,
        "m2.7",
        &quantities,
        T0_MS + MINUTE_MS,
    ));
    assert_eq!(admission.charged_to, ChargedTo::Credits { micros: price });
    assert_eq!(
        admission.credits_balance_micros,
        Some(top_up_micros - price)
    );
    assert_eq!(admission.plan, Some(plan_id(&engine, "Starter")));
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        top_up_micros - price
    );
    // The plan window is not touched by usage paid with credits.
    assert_eq!(m27_used(&engine, &key, T0_MS + MINUTE_MS), 1500);
    let report = engine.usage(&key, Some(T0_MS + MINUTE_MS)).expect("report");
    assert_eq!(report.credits_charged_micros, price);
    assert_eq!(report.credits_balance_micros, top_up_micros - price);
}

#[test]
fn once_a_daily_quota_is_exhausted_requests_are_charged_to_credits_at_the_resource_price() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 50, T0_MS),
        50
    );
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let images = [(Unit::Images, 3)];
    let price = price_micros(&engine, "image-01", &images);
    let admission = admitted(consume(&engine, &key, "image-01", &images, T0_MS));
    assert_eq!(admission.charged_to, ChargedTo::Credits { micros: price });
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        1_000_000 - price
    );
    assert_eq!(used(&engine, &key, "image-01:images", daily(), T0_MS), 50);
    // After the daily reset the plan pays again.
    let next_day = admitted(consume(&engine, &key, "image-01", &images, T0_MS + DAY_MS));
    assert_eq!(
        next_day.charged_to,
        ChargedTo::PlanQuota {
            plan: plan_id(&engine, "Plus")
        }
    );
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        1_000_000 - price
    );
}

#[test]
fn a_request_that_does_not_fit_the_rest_of_the_quota_is_charged_to_credits_whole() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1499, T0_MS), 1499);
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let two = [(Unit::Requests, 2)];
    let price = price_micros(&engine, "m2.7", &two);
    assert_eq!(
        admitted(consume(&engine, &key, "m2.7", &two, T0_MS)).charged_to,
        ChargedTo::Credits { micros: price }
    );
    assert_eq!(
        m27_used(&engine, &key, T0_MS),
        1499,
        "no half of it on the plan"
    );
    assert_eq!(m27_requests(&engine, &key, 1, T0_MS), 1);
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        1_000_000 - price
    );
}

#[test]
fn credits_never_go_negative_and_the_denial_says_how_much_is_needed() {
    let (engine, key) = starter_exhausted();
    let quantities = [(Unit::Requests, 1), (Unit::Tokens, 300)];
    let price = price_micros(&engine, "m2.7", &quantities);
    engine
        .top_up("@ada", price - 1, Some(T0_MS))
        .expect("top up");

    let denial = denied(consume(&engine, &key, "m2.7", &quantities, T0_MS));
    assert!(matches!(denial.reason, DenialReason::QuotaExhausted { .. }));
    assert_eq!(denial.credits_balance_micros, Some(price - 1));
    assert_eq!(denial.remedies.credits_needed_micros, Some(1));
    assert_eq!(engine.credits_micros("@ada").expect("balance"), price - 1);

    engine.top_up("@ada", 1, Some(T0_MS)).expect("top up");
    let admission = admitted(consume(&engine, &key, "m2.7", &quantities, T0_MS));
    assert_eq!(admission.credits_balance_micros, Some(0));
    let denial = denied(consume(&engine, &key, "m2.7", &quantities, T0_MS));
    assert_eq!(denial.remedies.credits_needed_micros, Some(price));
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 0);
}

#[test]
fn a_seatless_key_whose_credits_fall_short_is_denied_with_insufficient_credits() {
    let engine = engine();
    let key = user(&engine, "ada");
    let video = [(Unit::Videos, 1)];
    let price = price_micros(&engine, "hailuo-2.3-768p-6s", &video);
    let balance = price / 3;
    engine.top_up("@ada", balance, Some(T0_MS)).expect("top up");
    let denial = denied(consume(&engine, &key, "hailuo-2.3-768p-6s", &video, T0_MS));
    assert_eq!(
        denial.reason,
        DenialReason::InsufficientCredits {
            balance_micros: balance,
            price_micros: price
        }
    );
    assert_eq!(denial.remedies.credits_needed_micros, Some(price - balance));
    assert_eq!(engine.credits_micros("@ada").expect("balance"), balance);
}

#[test]
fn withdrawing_more_credits_than_the_team_holds_is_refused_and_changes_nothing() {
    let engine = engine();
    user(&engine, "ada");
    engine.top_up("@ada", 5_000, Some(T0_MS)).expect("top up");
    let withdrawn = engine.withdraw_credits("@ada", 5_001, Some(T0_MS));
    assert!(
        matches!(
            withdrawn,
            Err(Error::InsufficientCredits {
                balance_micros: 5_000,
                needed_micros: 5_001,
                ..
            })
        ),
        "{withdrawn:?}"
    );
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 5_000);
    assert_eq!(engine.withdraw_credits("@ada", 5_000, Some(T0_MS)), Ok(0));
}

#[test]
fn a_rolling_quota_denial_names_a_bigger_plan_and_the_wait() {
    let (engine, key) = starter_exhausted();
    let asked_ms = T0_MS + HOUR_MS;
    let decision = consume(&engine, &key, "m2.7", &ONE_REQUEST, asked_ms);
    let (_, retry_at_ms, _, _) = quota_exhausted(decision);
    let remedies = denied(decision).remedies;
    assert_eq!(
        remedies.upgrade_to,
        Some(plan_id(&engine, "Plus")),
        "4,500 > 1,500"
    );
    assert_eq!(remedies.wait_until_ms, Some(retry_at_ms));
    assert!(retry_at_ms >= T0_MS + FIVE_HOURS_MS);
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    assert_eq!(
        remedies.credits_needed_micros,
        Some(price),
        "no credits yet"
    );
}

#[test]
fn a_quota_denial_suggests_the_next_bigger_plan_on_that_limit() {
    // (plan, resource, unit, the seed's figure): the suggestion must allow more on that limit.
    let cells = [
        ("Starter", "m2.7", Unit::Requests, 1500),
        ("Plus", "m2.7", Unit::Requests, 4500),
        ("Plus", "image-01", Unit::Images, 50),
        ("Plus", "speech-2.8", Unit::Characters, 4000),
        ("Max-Highspeed", "hailuo-2.3-fast-768p-6s", Unit::Videos, 3),
        ("Plus-Highspeed", "m2.7-highspeed", Unit::Requests, 4500),
    ];
    for (plan, resource, unit, figure) in cells {
        let engine = engine();
        let key = seated(&engine, "ada", plan);
        assert!(consume(&engine, &key, resource, &[(unit, figure)], T0_MS).is_admitted());
        let denial = denied(consume(&engine, &key, resource, &[(unit, 1)], T0_MS));
        let upgrade = denial
            .remedies
            .upgrade_to
            .unwrap_or_else(|| panic!("{plan}: an upgrade"));
        let report_meter = format!("{resource}:{unit}");
        let policy = engine.policy();
        let bigger = policy
            .plan(upgrade)
            .limits
            .iter()
            .find(|limit| *policy.meter(limit.meter).name == *report_meter)
            .map(|limit| limit.amount)
            .unwrap_or(0);
        assert!(
            bigger > figure,
            "{plan}: {} allows {bigger}",
            policy.plan(upgrade).name
        );
    }
}

/// The plan a quota denial suggests must be able to take the request: the next bigger figure
/// is not enough when the request needs more than it. Seed figures: speech 4,000 (Plus), 9,000
/// (Plus-Highspeed), 11,000 (Max) characters a day; image-01 100 (Plus-Highspeed), 120 (Max),
/// 200 (Max-Highspeed) a day.
#[test]
fn a_quota_denial_suggests_a_plan_that_can_take_the_request_not_just_a_bigger_one() {
    let engine = engine();
    let plan_name = |plan| engine.policy().plan(plan).name.to_string();
    // 10,000 characters in one request: more than Plus's whole 4,000 and Plus-Highspeed's 9,000.
    let key = seated(&engine, "ada", "Plus");
    let denial = denied(consume(
        &engine,
        &key,
        "speech-2.8",
        &[(Unit::Characters, 10_000)],
        T0_MS,
    ));
    assert!(matches!(denial.reason, DenialReason::ExceedsLimit { .. }));
    assert_eq!(
        denial.remedies.upgrade_to.map(plan_name).as_deref(),
        Some("Max"),
        "11,000 a day takes 10,000; 9,000 does not"
    );
    // 60,000 characters: no plan's daily figure takes it (50,000 at most).
    let denial = denied(consume(
        &engine,
        &key,
        "speech-2.8",
        &[(Unit::Characters, 60_000)],
        T0_MS,
    ));
    assert_eq!(denial.remedies.upgrade_to, None, "no plan can take it");
    // A seat change keeps what is used: with Max's 11,000 characters used today, 12,000 more
    // fit Ultra-Highspeed's 50,000 now, not Max-Highspeed's 19,000.
    let key = seated(&engine, "cy", "Max");
    assert!(consume(
        &engine,
        &key,
        "speech-2.8",
        &[(Unit::Characters, 11_000)],
        T0_MS
    )
    .is_admitted());
    let denial = denied(consume(
        &engine,
        &key,
        "speech-2.8",
        &[(Unit::Characters, 12_000)],
        T0_MS,
    ));
    assert!(matches!(denial.reason, DenialReason::ExceedsLimit { .. }));
    assert_eq!(
        denial.remedies.upgrade_to.map(plan_name).as_deref(),
        Some("Ultra-Highspeed"),
        "11,000 used + 12,000 fits 50,000, not 19,000"
    );
    // 100 images used, 50 more asked: Max's 120 leaves 20, Max-Highspeed's 200 leaves 100.
    let key = seated(&engine, "bob", "Plus-Highspeed");
    assert!(consume(&engine, &key, "image-01", &[(Unit::Images, 100)], T0_MS).is_admitted());
    let denial = denied(consume(
        &engine,
        &key,
        "image-01",
        &[(Unit::Images, 50)],
        T0_MS,
    ));
    assert!(matches!(denial.reason, DenialReason::QuotaExhausted { .. }));
    assert_eq!(
        denial.remedies.upgrade_to.map(plan_name).as_deref(),
        Some("Max-Highspeed"),
        "100 used + 50 fits 200, not 120"
    );
}

#[test]
fn the_biggest_plan_has_no_upgrade_to_suggest_only_the_wait() {
    let engine = engine();
    let key = seated(&engine, "ada", "Ultra-Highspeed");
    let requests = [(Unit::Requests, 30_000)];
    assert!(consume(&engine, &key, "m2.7-highspeed", &requests, T0_MS).is_admitted());
    let decision = consume(&engine, &key, "m2.7-highspeed", &ONE_REQUEST, T0_MS);
    let (_, retry_at_ms, _, _) = quota_exhausted(decision);
    let remedies = denied(decision).remedies;
    assert_eq!(remedies.upgrade_to, None);
    assert_eq!(remedies.wait_until_ms, Some(retry_at_ms));
}

#[test]
fn a_daily_quota_denial_waits_until_local_midnight() {
    let engine = engine();
    let key = seated(&engine, "ada", "Max");
    let video = [(Unit::Videos, 1)];
    let at_ms = T0_MS + 20 * HOUR_MS;
    assert_eq!(
        admit_count(
            &engine,
            &key,
            "hailuo-2.3-fast-768p-6s",
            Unit::Videos,
            2,
            at_ms
        ),
        2
    );
    let denial = denied(consume(
        &engine,
        &key,
        "hailuo-2.3-fast-768p-6s",
        &video,
        at_ms,
    ));
    assert_eq!(denial.remedies.wait_until_ms, Some(T0_MS + DAY_MS));
    let upgrade = denial.remedies.upgrade_to.expect("a plan with more videos");
    assert_eq!(
        upgrade,
        plan_id(&engine, "Max-Highspeed"),
        "3/day is the next bigger figure"
    );
}

#[test]
fn an_uncovered_resource_suggests_a_plan_that_covers_it() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let denial = denied(consume(
        &engine,
        &key,
        "image-01",
        &[(Unit::Images, 1)],
        T0_MS,
    ));
    assert!(matches!(
        denial.reason,
        DenialReason::ResourceNotCovered { .. }
    ));
    let upgrade = denial
        .remedies
        .upgrade_to
        .expect("some plan covers image-01");
    let policy = engine.policy();
    assert!(policy.plan(upgrade).covers[resource_id(&engine, "image-01").index()]);
    let price = price_micros(&engine, "image-01", &[(Unit::Images, 1)]);
    assert_eq!(denial.remedies.credits_needed_micros, Some(price));
}

/// A plan suggested for a resource the key's plan does not cover must be able to take the
/// request: 5,000 m2.7 requests (10,000,000 micro-credits) do not fit Bar-Plus's 5-hour bar of
/// 2,000,000, the cheapest plan that covers m2.7; Bar-Ultra's 12,000,000 is the cheapest that
/// takes them.
#[test]
fn an_uncovered_resource_suggests_a_plan_that_can_take_the_request() {
    let engine = engine();
    let key = seated(&engine, "ada", "Ultra-Highspeed");
    let denial = denied(consume(
        &engine,
        &key,
        "m2.7",
        &[(Unit::Requests, 5_000)],
        T0_MS,
    ));
    assert!(matches!(
        denial.reason,
        DenialReason::ResourceNotCovered { .. }
    ));
    let upgrade = denial.remedies.upgrade_to.expect("a plan that covers m2.7");
    assert_eq!(upgrade, plan_id(&engine, "Bar-Ultra"));
    // One request fits the cheapest plan that covers it.
    let denial = denied(consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS));
    assert_eq!(
        denial.remedies.upgrade_to,
        Some(plan_id(&engine, "Bar-Plus"))
    );
}

// ---- The older seed's shared usage bar ---------------------------------------------------------

#[test]
fn the_usage_bar_counts_each_endpoints_usage_at_its_price_across_resources() {
    let engine = engine();
    let key = seated(&engine, "ada", "Bar-Plus");
    let bar = limit(&engine, &key, "usage-bar", five_hours(), T0_MS).amount;
    let uses: [(&str, &[(Unit, u64)]); 4] = [
        ("image-01", &[(Unit::Images, 4)]),
        (
            "speech-2.8",
            &[(Unit::Characters, 1_000), (Unit::Requests, 1)],
        ),
        ("music-2.6", &[(Unit::Songs, 1), (Unit::Seconds, 180)]),
        ("m2.7", &[(Unit::Requests, 3), (Unit::Tokens, 2_000)]),
    ];
    let mut spent = 0;
    for (resource, quantities) in uses {
        let price = price_micros(&engine, resource, quantities);
        assert!(consume(&engine, &key, resource, quantities, T0_MS).is_admitted());
        spent += price;
        assert_eq!(
            used(&engine, &key, "usage-bar", five_hours(), T0_MS),
            spent,
            "{resource}"
        );
        assert_eq!(
            used(&engine, &key, "usage-bar", weekly(), T0_MS),
            spent,
            "{resource}"
        );
    }
    // A zero-priced part of a request (speech requests) moves nothing: a thousand requests
    // with one character count one character's price. (Every speech call must carry
    // characters, so a call of requests alone is no longer possible.)
    let one_character = price_micros(&engine, "speech-2.8", &[(Unit::Characters, 1)]);
    assert!(one_character > 0);
    let many_requests = [(Unit::Characters, 1), (Unit::Requests, 1_000)];
    assert!(consume(&engine, &key, "speech-2.8", &many_requests, T0_MS).is_admitted());
    spent += one_character;
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), T0_MS), spent);
    // Fill the rest of the bar with one m2.7 request and tokens, then the bar is full for
    // every resource.
    let rest = m27_worth(&engine, bar - spent);
    assert!(consume(&engine, &key, "m2.7", &rest, T0_MS).is_admitted());
    let report = limit(&engine, &key, "usage-bar", five_hours(), T0_MS);
    assert_eq!((report.used, report.remaining), (bar, 0));
    let rolling_index = limit_index(&engine, "Bar-Plus", "usage-bar", five_hours());
    for (resource, quantities) in [
        ("m2.7", &[(Unit::Requests, 1), (Unit::Tokens, 1)][..]),
        ("image-01", &[(Unit::Images, 1)][..]),
        ("m2.7-highspeed", &ONE_REQUEST[..]),
        ("speech-2.8", &[(Unit::Characters, 1)][..]),
    ] {
        let (limit, _, _, _) = quota_exhausted(consume(&engine, &key, resource, quantities, T0_MS));
        assert_eq!(limit, rolling_index, "{resource}");
    }
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), T0_MS), bar);
}

#[test]
fn a_full_usage_bar_falls_to_credits() {
    let engine = engine();
    let key = seated(&engine, "ada", "Bar-Plus");
    let bar = limit(&engine, &key, "usage-bar", five_hours(), T0_MS).amount;
    let all = m27_worth(&engine, bar);
    assert!(consume(&engine, &key, "m2.7", &all, T0_MS).is_admitted());
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), T0_MS), bar);
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let image = [(Unit::Images, 1)];
    let price = price_micros(&engine, "image-01", &image);
    assert_eq!(
        admitted(consume(&engine, &key, "image-01", &image, T0_MS)).charged_to,
        ChargedTo::Credits { micros: price }
    );
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), T0_MS), bar);
}

#[test]
fn the_usage_bar_plans_cap_open_reservations_at_their_agent_count() {
    // The older seed: "3-4 agents", "4-5 agents", "6-7 agents"; the cap is the upper figure.
    // A denial names the key's plan and the next plan with more agents (none past Bar-Ultra).
    for (plan, agents, more) in [
        ("Bar-Plus", 4u32, Some("Bar-Max")),
        ("Bar-Max", 5, Some("Bar-Ultra")),
        ("Bar-Ultra", 7, None),
    ] {
        let engine = engine();
        let key = seated(&engine, "ada", plan);
        let estimate = [(Unit::Requests, 1), (Unit::Tokens, 1_000)];
        let request = UsageRequest::new(&key, "m2.7", &estimate).at(T0_MS);
        let mut reservations = Vec::new();
        for _ in 0..agents {
            let outcome = engine.reserve(&request, None).expect("reserve");
            assert!(outcome.decision.is_admitted(), "{plan}");
            reservations.push(outcome.reservation.expect("an id"));
        }
        let held = used(&engine, &key, "usage-bar", five_hours(), T0_MS);
        assert_eq!(
            held,
            u64::from(agents) * price_micros(&engine, "m2.7", &estimate)
        );

        let over = engine.reserve(&request, None).expect("reserve");
        assert_eq!(over.reservation, None);
        let Decision::Denied(denial) = &over.decision else {
            panic!("{plan}: a reservation past the agents was admitted");
        };
        let policy = engine.policy();
        assert_eq!(denial.plan, policy.plan_id(plan), "{plan}");
        assert_eq!(
            denial.remedies.upgrade_to,
            more.and_then(|more| policy.plan_id(more)),
            "{plan}"
        );
        assert_eq!(
            reason(over.decision),
            DenialReason::TooManyReservations {
                open: agents,
                maximum: agents
            },
            "{plan}"
        );
        assert_eq!(used(&engine, &key, "usage-bar", five_hours(), T0_MS), held);
        let report = engine.usage(&key, Some(T0_MS)).expect("report");
        assert_eq!(report.open_reservations, agents);

        engine.void(reservations[0], Some(T0_MS)).expect("void");
        let again = engine.reserve(&request, None).expect("reserve");
        assert!(
            again.decision.is_admitted(),
            "{plan}: a freed agent slot is usable"
        );
    }
}

#[test]
fn settling_a_reservation_frees_its_agent_slot() {
    let engine = engine();
    let key = seated(&engine, "ada", "Bar-Plus");
    let estimate = [(Unit::Requests, 1)];
    let request = UsageRequest::new(&key, "m2.7", &estimate).at(T0_MS);
    let ids: Vec<_> = (0..4)
        .map(|_| {
            engine
                .reserve(&request, None)
                .expect("reserve")
                .reservation
                .expect("id")
        })
        .collect();
    assert!(engine
        .reserve(&request, None)
        .expect("reserve")
        .reservation
        .is_none());
    engine
        .settle(ids[1], &[(Unit::Requests, 1)], Some(T0_MS))
        .expect("settle");
    assert!(engine
        .reserve(&request, None)
        .expect("reserve")
        .reservation
        .is_some());
}

/// A settle that trades units on the shared usage bar (fewer requests, more tokens) for an
/// amount the bar weighs no more than the hold is the hold's own usage: it fits however full
/// the bar is. Deciding the extra tokens before giving back the unused requests refused it as
/// over the quota (or, with credits, charged the team for what the bar had room for).
#[test]
fn a_usage_bar_settle_that_weighs_no_more_than_its_hold_fits_a_full_bar() {
    let engine = engine();
    let key = seated(&engine, "ada", "Bar-Plus");
    let amount = limit(&engine, &key, "usage-bar", five_hours(), T0_MS).amount;
    let estimate = [(Unit::Requests, 3), (Unit::Tokens, 4_000)];
    let held = price_micros(&engine, "m2.7", &estimate);
    let actual = [(Unit::Requests, 1), (Unit::Tokens, 8_000)];
    assert_eq!(price_micros(&engine, "m2.7", &actual), held);
    let fill = m27_worth(&engine, amount - held);
    assert!(consume(&engine, &key, "m2.7", &fill, T0_MS).is_admitted());
    let id = engine
        .reserve(&UsageRequest::new(&key, "m2.7", &estimate).at(T0_MS), None)
        .expect("reserve")
        .reservation
        .expect("held on the bar");
    assert_eq!(
        used(&engine, &key, "usage-bar", five_hours(), T0_MS),
        amount
    );

    let settled = engine.settle(id, &actual, Some(T0_MS)).expect("settle");
    let SettleOutcome::Settled(settlement) = settled else {
        panic!("a settle weighing what its hold does was refused: {settled:?}");
    };
    assert_eq!(
        settlement.extra,
        Some(ChargedTo::PlanQuota {
            plan: plan_id(&engine, "Bar-Plus")
        })
    );
    assert_eq!(
        used(&engine, &key, "usage-bar", five_hours(), T0_MS),
        amount
    );
    assert_eq!(used(&engine, &key, "usage-bar", weekly(), T0_MS), amount);
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 0);

    // With credits, the team pays nothing for it either.
    let key = seated(&engine, "bo", "Bar-Plus");
    engine
        .top_up("@bo", 1_000_000, Some(T0_MS))
        .expect("top up");
    assert!(consume(&engine, &key, "m2.7", &fill, T0_MS).is_admitted());
    let id = engine
        .reserve(&UsageRequest::new(&key, "m2.7", &estimate).at(T0_MS), None)
        .expect("reserve")
        .reservation
        .expect("held on the bar");
    assert!(matches!(
        engine.settle(id, &actual, Some(T0_MS)).expect("settle"),
        SettleOutcome::Settled(_)
    ));
    assert_eq!(engine.credits_micros("@bo").expect("balance"), 1_000_000);
    assert_eq!(
        used(&engine, &key, "usage-bar", five_hours(), T0_MS),
        amount
    );
}

/// A reservation held on credits (its plan exhausted) that overruns in a unit its plan's limits
/// do not count (tokens, on a plan limiting requests) pays the overrun with credits, as a
/// consume of the whole amount would. The extra was decided alone: taking nothing from any
/// limit, the exhausted plan "fit" it, and the tokens went unpaid.
#[test]
fn a_credits_hold_pays_its_overrun_in_units_the_plan_does_not_count() {
    let (engine, key) = starter_exhausted();
    engine
        .top_up("@ada", 2_000_000, Some(T0_MS))
        .expect("top up");
    let estimate = [(Unit::Requests, 1), (Unit::Tokens, 1)];
    let actual = [(Unit::Requests, 1), (Unit::Tokens, 1_000_000)];
    let id = engine
        .reserve(&UsageRequest::new(&key, "m2.7", &estimate).at(T0_MS), None)
        .expect("reserve")
        .reservation
        .expect("held on credits");
    let settled = engine.settle(id, &actual, Some(T0_MS)).expect("settle");
    let SettleOutcome::Settled(settlement) = settled else {
        panic!("refused: {settled:?}");
    };
    let extra = price_micros(&engine, "m2.7", &[(Unit::Tokens, 999_999)]);
    assert_eq!(settlement.extra, Some(ChargedTo::Credits { micros: extra }));
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        2_000_000 - price_micros(&engine, "m2.7", &actual)
    );
    assert_eq!(m27_used(&engine, &key, T0_MS), 1500);

    // Without the credits for it, the settle is refused and changes nothing.
    let id = engine
        .reserve(&UsageRequest::new(&key, "m2.7", &estimate).at(T0_MS), None)
        .expect("reserve")
        .reservation
        .expect("held on credits");
    let balance = engine.credits_micros("@ada").expect("balance");
    let huge = [(Unit::Requests, 1), (Unit::Tokens, 10_000_000)];
    assert!(matches!(
        engine.settle(id, &huge, Some(T0_MS)).expect("settle"),
        SettleOutcome::Denied(_)
    ));
    assert_eq!(engine.credits_micros("@ada").expect("balance"), balance);
    engine.void(id, Some(T0_MS)).expect("void");
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        balance + price_micros(&engine, "m2.7", &estimate)
    );
}

// Settles of credits holds that trade units (fewer requests, more tokens). m2.7 costs 2,000
// micros a request and 1 a token.

/// 3 requests and 4,000 tokens: 10,000 micros.
const HELD: [(Unit, u64); 2] = [(Unit::Requests, 3), (Unit::Tokens, 4_000)];
const HELD_MICROS: u64 = 10_000;
/// 1 request and 6,000 tokens: 8,000 micros, 2,000 tokens over the hold (2,000 micros) and 2
/// requests under it (4,000 micros).
const CHEAPER: [(Unit, u64); 2] = [(Unit::Requests, 1), (Unit::Tokens, 6_000)];
const CHEAPER_MICROS: u64 = 8_000;
/// 1 request and 8,000 tokens: exactly what was held.
const AS_HELD: [(Unit, u64); 2] = [(Unit::Requests, 1), (Unit::Tokens, 8_000)];
/// 1 request and 8,001 tokens: one micro more than was held.
const OVER: [(Unit, u64); 2] = [(Unit::Requests, 1), (Unit::Tokens, 8_001)];
const OVER_MICROS: u64 = HELD_MICROS + 1;

/// Reserves `HELD` on `key` at T0, which must be paid with credits.
fn hold_on_credits(engine: &Engine, key: &str) -> ReservationId {
    let outcome = engine
        .reserve(&UsageRequest::new(key, "m2.7", &HELD).at(T0_MS), None)
        .expect("reserve");
    assert_eq!(
        admitted(outcome.decision).charged_to,
        ChargedTo::Credits {
            micros: HELD_MICROS
        }
    );
    outcome.reservation.expect("held on credits")
}

fn settled(outcome: SettleOutcome) -> Settlement {
    match outcome {
        SettleOutcome::Settled(settlement) => settlement,
        SettleOutcome::Denied(denial) => panic!("refused: {denial:?}"),
    }
}

/// `(balance, total charged)` of `key`'s team, from its usage report.
fn credits_of(engine: &Engine, key: &str) -> (u64, u64) {
    let report = engine.usage(key, Some(T0_MS)).expect("report");
    (report.credits_balance_micros, report.credits_charged_micros)
}

/// A credits hold that took the whole balance, settled for fewer requests and more tokens at
/// no more than it held, is the hold's own usage: the unused requests pay for the tokens. The
/// extra tokens were priced against the balance before the unused part of the hold was given
/// back (0), and refused.
#[test]
fn a_credits_hold_that_took_every_credit_pays_a_settle_trading_units_within_it() {
    for seat in [None, Some("Starter")] {
        let (engine, key) = match seat {
            None => {
                let engine = engine();
                let key = user(&engine, "ada");
                (engine, key)
            }
            // The plan exhausted (the hold went to credits); its limits count requests only.
            Some(_) => starter_exhausted(),
        };
        engine
            .top_up("@ada", HELD_MICROS, Some(T0_MS))
            .expect("top up");
        let id = hold_on_credits(&engine, &key);
        assert_eq!(credits_of(&engine, &key), (0, HELD_MICROS), "{seat:?}");

        let settlement = settled(engine.settle(id, &CHEAPER, Some(T0_MS)).expect("settle"));
        assert_eq!(
            settlement.held,
            ChargedTo::Credits {
                micros: HELD_MICROS
            }
        );
        assert_eq!(
            settlement.extra,
            Some(ChargedTo::Credits { micros: 2_000 }),
            "{seat:?}"
        );
        assert_eq!(settlement.released.get(Unit::Requests), 2);
        assert_eq!(settlement.released.get(Unit::Tokens), 0);
        let after = (HELD_MICROS - CHEAPER_MICROS, CHEAPER_MICROS);
        assert_eq!(credits_of(&engine, &key), after, "{seat:?}");
        assert_eq!(engine.open_reservations(), 0);

        // Settled again with the same amounts: the first settlement, nothing charged again.
        let again = settled(engine.settle(id, &CHEAPER, Some(T0_MS)).expect("settle"));
        assert_eq!(again, settlement);
        assert_eq!(credits_of(&engine, &key), after, "{seat:?}");
        if seat.is_some() {
            assert_eq!(m27_used(&engine, &key, T0_MS), 1500);
        }
    }
}

/// A settle trading units for exactly what was held, and one micro more when the team holds
/// that micro, with part of the balance left beside the hold.
#[test]
fn a_settle_trading_units_on_a_credits_hold_may_use_the_hold_and_the_balance_beside_it() {
    let engine = engine();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", HELD_MICROS + 1_000, Some(T0_MS))
        .expect("top up");
    let id = hold_on_credits(&engine, &key);
    let settlement = settled(engine.settle(id, &AS_HELD, Some(T0_MS)).expect("settle"));
    assert_eq!(settlement.extra, Some(ChargedTo::Credits { micros: 4_000 }));
    assert_eq!(credits_of(&engine, &key), (1_000, HELD_MICROS));

    engine.top_up("@ada", 9_001, Some(T0_MS)).expect("top up");
    let id = hold_on_credits(&engine, &key);
    assert_eq!(credits_of(&engine, &key), (1, 2 * HELD_MICROS));
    let settlement = settled(engine.settle(id, &OVER, Some(T0_MS)).expect("settle"));
    assert_eq!(settlement.extra, Some(ChargedTo::Credits { micros: 4_001 }));
    assert_eq!(credits_of(&engine, &key), (0, HELD_MICROS + OVER_MICROS));
}

/// A settle trading units that costs more than the hold and the balance together is refused
/// and changes nothing: the balance, the total charged and the hold stay, the reservation
/// stays open; with the missing micro topped up, the same settle goes through.
#[test]
fn a_settle_trading_units_beyond_the_hold_and_the_balance_is_refused_and_changes_nothing() {
    let engine = engine();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", HELD_MICROS, Some(T0_MS))
        .expect("top up");
    let id = hold_on_credits(&engine, &key);
    let before = engine.usage(&key, Some(T0_MS)).expect("report");

    let SettleOutcome::Denied(denial) = engine.settle(id, &OVER, Some(T0_MS)).expect("settle")
    else {
        panic!("a settle beyond the hold and the balance was admitted");
    };
    assert_eq!(
        denial.remedies.credits_needed_micros,
        Some(1),
        "the hold covers all but one micro: {denial:?}"
    );
    // The key has credits (what its hold gives back), just not enough for the extra (priced
    // as the settle below charges it): not "no resources".
    assert_eq!(
        denial.reason,
        DenialReason::InsufficientCredits {
            balance_micros: 4_000,
            price_micros: 4_001,
        },
        "{denial:?}"
    );
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), before);
    assert_eq!(credits_of(&engine, &key), (0, HELD_MICROS));
    assert_eq!(engine.open_reservations(), 1);

    engine.top_up("@ada", 1, Some(T0_MS)).expect("top up");
    let settlement = settled(engine.settle(id, &OVER, Some(T0_MS)).expect("settle"));
    assert_eq!(settlement.extra, Some(ChargedTo::Credits { micros: 4_001 }));
    assert_eq!(credits_of(&engine, &key), (0, OVER_MICROS));
    assert_eq!(engine.open_reservations(), 0);

    // Refused, then voided: the whole hold comes back.
    engine
        .top_up("@ada", HELD_MICROS, Some(T0_MS))
        .expect("top up");
    let id = hold_on_credits(&engine, &key);
    assert!(matches!(
        engine.settle(id, &OVER, Some(T0_MS)).expect("settle"),
        SettleOutcome::Denied(_)
    ));
    engine.void(id, Some(T0_MS)).expect("void");
    assert_eq!(credits_of(&engine, &key), (HELD_MICROS, OVER_MICROS));
}

/// A settle trading units that costs more than the hold and a balance beside it names, in its
/// denial, what it could draw on (the balance and what the hold gives back) and the extra's
/// price, as it does when the balance beside the hold is empty (above): it named the balance
/// alone, as if the hold gave nothing back, though the credits it asks for are only the rest.
#[test]
fn a_settle_trading_units_beyond_the_hold_and_a_balance_beside_it_names_both() {
    /// 1 request and 9,002 tokens: 11,002 micros, 5,002 tokens over the hold and 2 requests
    /// (4,000 micros) under it.
    const DEARER: [(Unit, u64); 2] = [(Unit::Requests, 1), (Unit::Tokens, 9_002)];
    let engine = engine();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", HELD_MICROS + 1_000, Some(T0_MS))
        .expect("top up");
    let id = hold_on_credits(&engine, &key);
    let before = engine.usage(&key, Some(T0_MS)).expect("report");

    let SettleOutcome::Denied(denial) = engine.settle(id, &DEARER, Some(T0_MS)).expect("settle")
    else {
        panic!("a settle beyond the hold and the balance was admitted");
    };
    assert_eq!(
        denial.reason,
        DenialReason::InsufficientCredits {
            balance_micros: 1_000 + 4_000,
            price_micros: 5_002,
        },
        "{denial:?}"
    );
    assert_eq!(denial.remedies.credits_needed_micros, Some(2), "{denial:?}");
    assert_eq!(denial.credits_balance_micros, Some(1_000));
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), before);

    engine.top_up("@ada", 2, Some(T0_MS)).expect("top up");
    let settlement = settled(engine.settle(id, &DEARER, Some(T0_MS)).expect("settle"));
    assert_eq!(settlement.extra, Some(ChargedTo::Credits { micros: 5_002 }));
    assert_eq!(credits_of(&engine, &key), (0, HELD_MICROS + 1_002));
}

/// A settle that goes over a credits hold in every unit (nothing of the hold comes back) when
/// the hold took the whole balance is refused as insufficient credits, as the settle trading
/// units above is: the key pays with credits (its hold is theirs), it is just one micro short.
/// "No resources" (neither a seat nor credits) was wrong, on a key seated on a plan that covers
/// the resource too (Starter, whose limits do not count the extra tokens). Topped up by that
/// micro, the same settle goes through.
#[test]
fn a_settle_over_a_credits_hold_that_took_every_credit_is_refused_as_insufficient_credits() {
    /// One token more than `HELD`: one micro beyond the hold.
    const ONE_TOKEN_OVER: [(Unit, u64); 2] = [(Unit::Requests, 3), (Unit::Tokens, 4_001)];
    for seat in [None, Some("Starter")] {
        let (engine, key) = match seat {
            None => {
                let engine = engine();
                let key = user(&engine, "ada");
                (engine, key)
            }
            Some(_) => starter_exhausted(),
        };
        engine
            .top_up("@ada", HELD_MICROS, Some(T0_MS))
            .expect("top up");
        let id = hold_on_credits(&engine, &key);
        let before = engine.usage(&key, Some(T0_MS)).expect("report");

        let outcome = engine
            .settle(id, &ONE_TOKEN_OVER, Some(T0_MS))
            .expect("settle");
        let SettleOutcome::Denied(denial) = outcome else {
            panic!("{seat:?}: a settle one micro beyond the balance was admitted");
        };
        assert_eq!(
            denial.reason,
            DenialReason::InsufficientCredits {
                balance_micros: 0,
                price_micros: 1,
            },
            "{seat:?}: {denial:?}"
        );
        assert_eq!(denial.remedies.credits_needed_micros, Some(1), "{seat:?}");
        assert_eq!(denial.credits_balance_micros, Some(0), "{seat:?}");
        assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), before);
        assert_eq!(engine.open_reservations(), 1);

        engine.top_up("@ada", 1, Some(T0_MS)).expect("top up");
        let settlement = settled(
            engine
                .settle(id, &ONE_TOKEN_OVER, Some(T0_MS))
                .expect("settle"),
        );
        assert_eq!(settlement.extra, Some(ChargedTo::Credits { micros: 1 }));
        assert_eq!(credits_of(&engine, &key), (0, HELD_MICROS + 1), "{seat:?}");
    }
}

/// The same when the hold gives back only units without a price (an image request's
/// `requests`): nothing of it pays for the extra image, so the balance alone, empty, is short
/// of its price: insufficient credits, not "no resources".
#[test]
fn a_settle_over_a_credits_hold_giving_back_only_free_units_is_refused_as_insufficient_credits() {
    let engine = engine();
    let key = user(&engine, "ada");
    let image = price_micros(&engine, "image-01", &[(Unit::Images, 1)]);
    engine
        .top_up("@ada", 2 * image, Some(T0_MS))
        .expect("top up");
    let held = [(Unit::Images, 2), (Unit::Requests, 1)];
    let outcome = engine
        .reserve(&UsageRequest::new(&key, "image-01", &held).at(T0_MS), None)
        .expect("reserve");
    let id = outcome.reservation.expect("held on credits");
    let SettleOutcome::Denied(denial) = engine
        .settle(id, &[(Unit::Images, 3)], Some(T0_MS))
        .expect("settle")
    else {
        panic!("a third image beyond an empty balance was admitted");
    };
    assert_eq!(
        denial.reason,
        DenialReason::InsufficientCredits {
            balance_micros: 0,
            price_micros: image,
        },
        "{denial:?}"
    );
    assert_eq!(denial.remedies.credits_needed_micros, Some(image));
    assert_eq!(engine.open_reservations(), 1);
}

/// What such a settle did to the team's credits is what a reopened engine replays from its log:
/// the same balance, total charged and usage, and a repeated settle still charges nothing.
#[test]
fn a_settle_trading_units_on_a_credits_hold_replays_to_the_same_credits() {
    let dir = log_support::TempDir::new("credits-settle-trading-units");
    let open = || {
        Engine::open(
            dir.path(),
            Policy::token_plan(),
            Arc::new(ManualClock::new(T0_MS)),
            OpenOptions::default(),
        )
        .expect("open")
    };
    let engine = open();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", HELD_MICROS, Some(T0_MS))
        .expect("top up");
    let id = hold_on_credits(&engine, &key);
    let settlement = settled(engine.settle(id, &CHEAPER, Some(T0_MS)).expect("settle"));
    // And one refused, still open.
    engine
        .top_up("@ada", HELD_MICROS, Some(T0_MS))
        .expect("top up");
    let open_id = hold_on_credits(&engine, &key);
    let denied = engine.settle(
        open_id,
        &[(Unit::Requests, 1), (Unit::Tokens, 20_000)],
        Some(T0_MS),
    );
    assert!(matches!(denied, Ok(SettleOutcome::Denied(_))), "{denied:?}");
    let report = engine.usage(&key, Some(T0_MS)).expect("report");
    assert_eq!(
        (report.credits_balance_micros, report.credits_charged_micros),
        (
            2 * HELD_MICROS - CHEAPER_MICROS - HELD_MICROS,
            CHEAPER_MICROS + HELD_MICROS
        )
    );
    drop(engine);

    let engine = open();
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), report);
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        report.credits_balance_micros
    );
    assert_eq!(engine.open_reservations(), 1);
    let again = settled(engine.settle(id, &CHEAPER, Some(T0_MS)).expect("settle"));
    assert_eq!(again, settlement);
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), report);
    // The open one settles after the reopen as it would have before.
    settled(
        engine
            .settle(open_id, &CHEAPER, Some(T0_MS))
            .expect("settle"),
    );
    let after = engine.usage(&key, Some(T0_MS)).expect("report");
    assert_eq!(
        (after.credits_balance_micros, after.credits_charged_micros),
        (2 * (HELD_MICROS - CHEAPER_MICROS), 2 * CHEAPER_MICROS)
    );
    drop(engine);
    let engine = open();
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), after);
}

/// A settle over a credits hold whose extra costs nothing (a song held for 100 seconds runs
/// 200; `seconds` are priced at 0) fits a balance the hold emptied, as it fits one with a
/// micro to spare: admitted, the extra charged 0 micros. It was refused as insufficient credits,
/// a balance of 0 against a price of 0, asking for a micro the settle would never use. On a
/// seatless key and on one seated on Starter with its daily songs used up (the plan counts no
/// seconds), and the same after a reopen.
#[test]
fn a_free_overrun_of_a_credits_hold_that_took_every_credit_is_admitted() {
    const SONG_HELD: [(Unit, u64); 2] = [(Unit::Songs, 1), (Unit::Seconds, 100)];
    const SONG_ACTUAL: [(Unit, u64); 2] = [(Unit::Songs, 1), (Unit::Seconds, 200)];
    let dir = log_support::TempDir::new("credits-free-overrun");
    let open = || {
        Engine::open(
            dir.path(),
            Policy::token_plan(),
            Arc::new(ManualClock::new(T0_MS)),
            OpenOptions::default(),
        )
        .expect("open")
    };
    let engine = open();
    let song = price_micros(&engine, "music-2.6", &[(Unit::Songs, 1)]);
    assert!(song > 0);
    let seatless = user(&engine, "ada");
    let starter = seated(&engine, "bob", "Starter");
    for _ in 0..100 {
        admitted(consume(&engine, &starter, "music-2.6", &SONG_HELD, T0_MS));
    }
    let mut reports = Vec::new();
    for (key, spare) in [(&seatless, 0), (&seatless, 1), (&starter, 0)] {
        let team = team_of(if *key == seatless { "ada" } else { "bob" });
        let before = engine.credits_micros(&team).expect("balance");
        engine
            .top_up(&team, song + spare, Some(T0_MS))
            .expect("top up");
        let outcome = engine
            .reserve(
                &UsageRequest::new(key, "music-2.6", &SONG_HELD).at(T0_MS),
                None,
            )
            .expect("reserve");
        assert_eq!(
            admitted(outcome.decision).charged_to,
            ChargedTo::Credits { micros: song },
            "{key}: the song is held on credits"
        );
        let id = outcome.reservation.expect("held");
        let outcome = engine
            .settle(id, &SONG_ACTUAL, Some(T0_MS))
            .expect("settle");
        let SettleOutcome::Settled(settlement) = outcome else {
            panic!("{key}, {spare} micro(s) to spare: a free overrun was refused: {outcome:?}");
        };
        assert_eq!(
            settlement.extra,
            Some(ChargedTo::Credits { micros: 0 }),
            "{key}"
        );
        assert_eq!(
            engine.credits_micros(&team).expect("balance"),
            before + spare,
            "{key}: only the song was charged"
        );
        assert_eq!(engine.open_reservations(), 0);
        reports.push((key.clone(), engine.usage(key, Some(T0_MS)).expect("report")));
    }
    drop(engine);

    let engine = open();
    for (key, report) in &reports[1..] {
        assert_eq!(
            &engine.usage(key, Some(T0_MS)).expect("report"),
            report,
            "{key}"
        );
    }
}

/// A key without a seat whose team holds credits, asking for a resource credits cannot pay (it
/// has no price), is told the resource is not covered, and which plan would cover it: it was
/// denied "no resources", which says the key has neither a seat nor credits. Without credits
/// it has no resources.
#[test]
fn a_seatless_key_with_credits_asking_for_an_unpriced_resource_is_told_it_is_not_covered() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
price_micros = { requests = 1000 }
[resources.free-model]
units = ["requests"]
[plans.Covers]
limits = [{ resource = "free-model", unit = "requests", amount = 10, window = "rolling:5h" }]
"#,
    )
    .expect("a valid policy");
    let engine = engine_with(policy);
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.create_user("bob", "key-bob", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 1_000_000, Some(T0_MS)).unwrap();
    let free = resource_id(&engine, "free-model");
    let denial = denied(consume(
        &engine,
        "key-ada",
        "free-model",
        &ONE_REQUEST,
        T0_MS,
    ));
    assert_eq!(
        denial.reason,
        DenialReason::ResourceNotCovered { resource: free }
    );
    assert_eq!(denial.remedies.upgrade_to, Some(plan_id(&engine, "Covers")));
    // What credits pay they still pay.
    assert!(consume(&engine, "key-ada", "chat", &ONE_REQUEST, T0_MS).is_admitted());
    let denial = denied(consume(
        &engine,
        "key-bob",
        "free-model",
        &ONE_REQUEST,
        T0_MS,
    ));
    assert_eq!(denial.reason, DenialReason::NoResources);
    assert_eq!(denial.remedies.upgrade_to, Some(plan_id(&engine, "Covers")));
}
