//! Accounts: a key per user per team that exists before any resource and becomes usable with a
//! seat or with team credits; seats change mid-window; pay-as-you-go keys are a separate world.

mod common;

use common::*;
use tally_engine::{ChargedTo, DenialReason, Error, KeyKind, Unit};

const ONE_REQUEST: [(Unit, u64); 1] = [(Unit::Requests, 1)];

#[test]
fn a_key_exists_before_any_resource_and_is_denied_with_no_resources() {
    let engine = engine();
    let key = user(&engine, "ada");
    assert_eq!(
        reason(consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::NoResources
    );
    let report = engine.usage(&key, Some(T0_MS)).expect("the key exists");
    assert_eq!(report.kind, KeyKind::Plan);
    assert_eq!(
        (report.user.as_str(), report.team.as_str()),
        ("ada", "@ada")
    );
    assert_eq!(report.plan, None);
    assert!(report.limits.is_empty());
    assert_eq!(report.credits_balance_micros, 0);
}

/// The seed: a key with no resources becomes usable "once a Token Plan seat is assigned, or
/// Credits access is available". Its denial names both: the credits the request needs and a
/// plan that covers the resource.
#[test]
fn a_no_resources_denial_says_both_credits_and_a_seat_would_help() {
    let engine = engine();
    let key = user(&engine, "ada");
    for (resource, quantities) in [("m2.7", ONE_REQUEST), ("image-01", [(Unit::Images, 1)])] {
        let denial = denied(consume(&engine, &key, resource, &quantities, T0_MS));
        assert_eq!(denial.reason, DenialReason::NoResources);
        assert_eq!(
            denial.remedies.credits_needed_micros,
            Some(price_micros(&engine, resource, &quantities))
        );
        let plan = denial
            .remedies
            .upgrade_to
            .unwrap_or_else(|| panic!("{resource}: a plan to be seated on"));
        let policy = engine.policy();
        assert!(policy.plan(plan).covers[resource_id(&engine, resource).index()]);
    }
    // Credits too few for the request: still a seat would help.
    engine.top_up("@ada", 1, Some(T0_MS)).expect("top-up");
    let denial = denied(consume(
        &engine,
        &key,
        "image-01",
        &[(Unit::Images, 1)],
        T0_MS,
    ));
    assert!(matches!(
        denial.reason,
        DenialReason::InsufficientCredits { .. }
    ));
    assert!(denial.remedies.upgrade_to.is_some());
}

#[test]
fn a_key_in_a_team_without_seats_or_credits_has_no_resources() {
    let engine = engine();
    user(&engine, "ada");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    engine
        .add_member("acme", "ada", "acme-ada", Some(T0_MS))
        .expect("member");
    assert_eq!(
        reason(consume(&engine, "acme-ada", "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::NoResources
    );
    let report = engine.usage("acme-ada", Some(T0_MS)).expect("report");
    assert_eq!(report.team, "acme");
}

#[test]
fn assigning_a_seat_makes_the_same_key_usable_on_that_plan() {
    let engine = engine();
    let key = user(&engine, "ada");
    assert!(!consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
    engine
        .assign_seat("@ada", "ada", "Starter", Some(T0_MS))
        .expect("seat");
    let admission = admitted(consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS));
    let starter = plan_id(&engine, "Starter");
    assert_eq!(admission.charged_to, ChargedTo::PlanQuota { plan: starter });
    assert_eq!(admission.plan, Some(starter));
    assert_eq!(
        engine
            .usage(&key, Some(T0_MS))
            .expect("report")
            .plan
            .as_deref(),
        Some("Starter")
    );
}

#[test]
fn team_credits_make_a_seatless_key_usable_charged_to_credits() {
    let engine = engine();
    user(&engine, "ada");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    engine
        .add_member("acme", "ada", "acme-ada", Some(T0_MS))
        .expect("member");
    let balance = engine
        .top_up("acme", 1_000_000, Some(T0_MS))
        .expect("top up");
    assert_eq!(balance, 1_000_000);
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    let admission = admitted(consume(&engine, "acme-ada", "m2.7", &ONE_REQUEST, T0_MS));
    assert_eq!(admission.charged_to, ChargedTo::Credits { micros: price });
    assert_eq!(admission.credits_balance_micros, Some(1_000_000 - price));
    assert_eq!(
        engine.credits_micros("acme").expect("balance"),
        1_000_000 - price
    );
    // The user's Default Team paid nothing.
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 0);
}

#[test]
fn a_team_whose_credits_run_out_leaves_a_seatless_key_with_no_resources_again() {
    let engine = engine();
    let key = user(&engine, "ada");
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    engine
        .top_up("@ada", 2 * price, Some(T0_MS))
        .expect("top up");
    assert_eq!(
        admit_count(&engine, &key, "m2.7", Unit::Requests, 2, T0_MS),
        2
    );
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 0);
    let denial = denied(consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS));
    assert_eq!(denial.reason, DenialReason::NoResources);
    assert_eq!(denial.remedies.credits_needed_micros, Some(price));
}

#[test]
fn adding_the_same_member_twice_is_an_error_and_changes_nothing() {
    let engine = engine();
    user(&engine, "ada");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    engine
        .add_member("acme", "ada", "acme-ada", Some(T0_MS))
        .expect("member");
    let again = engine.add_member("acme", "ada", "acme-ada-2", Some(T0_MS));
    assert!(
        matches!(again, Err(Error::AlreadyExists { what: "member", .. })),
        "{again:?}"
    );
    // The second key was not created.
    assert_eq!(
        reason(consume(&engine, "acme-ada-2", "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::UnknownKey
    );
    assert!(matches!(
        engine.usage("acme-ada-2", Some(T0_MS)),
        Err(Error::UnknownKey { .. })
    ));
    assert!(engine.usage("acme-ada", Some(T0_MS)).is_ok());
}

#[test]
fn a_key_name_already_in_use_cannot_be_given_to_another_member() {
    let engine = engine();
    user(&engine, "ada");
    user(&engine, "bob");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    let taken = engine.add_member("acme", "bob", &key_of("ada"), Some(T0_MS));
    assert!(
        matches!(taken, Err(Error::AlreadyExists { what: "key", .. })),
        "{taken:?}"
    );
    // bob is not a member, so he can still join with a fresh key.
    engine
        .add_member("acme", "bob", "acme-bob", Some(T0_MS))
        .expect("bob joins");
    assert_eq!(
        engine
            .usage(&key_of("ada"), Some(T0_MS))
            .expect("report")
            .user,
        "ada"
    );
}

#[test]
fn the_same_user_in_two_teams_has_two_distinct_keys_with_separate_quotas() {
    let engine = engine();
    let own_key = seated(&engine, "ada", "Starter");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    engine
        .add_member("acme", "ada", "acme-ada", Some(T0_MS))
        .expect("member");
    engine
        .assign_seat("acme", "ada", "Starter", Some(T0_MS))
        .expect("seat");
    assert_ne!(own_key, "acme-ada");
    assert_eq!(m27_requests(&engine, &own_key, 1501, T0_MS), 1500);
    assert_eq!(m27_used(&engine, "acme-ada", T0_MS), 0);
    assert_eq!(m27_requests(&engine, "acme-ada", 1501, T0_MS), 1500);
    assert_eq!(m27_used(&engine, &own_key, T0_MS), 1500);
}

#[test]
fn team_credits_are_shared_by_its_members() {
    let engine = engine();
    user(&engine, "ada");
    user(&engine, "bob");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    for (member, key) in [("ada", "acme-ada"), ("bob", "acme-bob")] {
        engine
            .add_member("acme", member, key, Some(T0_MS))
            .expect("member");
    }
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    engine
        .top_up("acme", 5 * price, Some(T0_MS))
        .expect("top up");
    assert_eq!(
        admit_count(&engine, "acme-ada", "m2.7", Unit::Requests, 3, T0_MS),
        3
    );
    let bob_report = engine.usage("acme-bob", Some(T0_MS)).expect("report");
    assert_eq!(bob_report.credits_balance_micros, 2 * price);
    assert_eq!(bob_report.credits_charged_micros, 3 * price);
    assert_eq!(
        admit_count(&engine, "acme-bob", "m2.7", Unit::Requests, 3, T0_MS),
        2
    );
    assert_eq!(
        reason(consume(&engine, "acme-ada", "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::NoResources,
        "the shared balance is empty for everyone"
    );
}

#[test]
fn default_team_credits_are_the_users_own() {
    let engine = engine();
    let ada = user(&engine, "ada");
    let bob = user(&engine, "bob");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    engine
        .add_member("acme", "ada", "acme-ada", Some(T0_MS))
        .expect("member");
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    engine
        .top_up("@ada", 10 * price, Some(T0_MS))
        .expect("top up");

    assert!(consume(&engine, &ada, "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 9 * price);
    // Another user's Default Team, and ada's key in another team, do not see ada's credits.
    assert_eq!(
        reason(consume(&engine, &bob, "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::NoResources
    );
    assert_eq!(
        reason(consume(&engine, "acme-ada", "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::NoResources
    );
    assert_eq!(engine.credits_micros("@bob").expect("balance"), 0);
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 9 * price);
}

#[test]
fn upgrading_from_starter_to_plus_after_1000_requests_leaves_3500() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let used_at_ms = T0_MS + HOUR_MS;
    assert_eq!(m27_requests(&engine, &key, 1000, used_at_ms), 1000);
    engine
        .assign_seat("@ada", "ada", "Plus", Some(used_at_ms + MINUTE_MS))
        .expect("upgrade");
    let at_ms = used_at_ms + 2 * MINUTE_MS;
    let report = limit(&engine, &key, "m2.7:requests", five_hours(), at_ms);
    assert_eq!(
        (report.amount, report.used, report.remaining),
        (4500, 1000, 3500)
    );
    assert_eq!(m27_requests(&engine, &key, 3501, at_ms), 3500);
    let plus = plan_id(&engine, "Plus");
    assert_eq!(
        denied(consume(&engine, &key, "m2.7", &ONE_REQUEST, at_ms)).plan,
        Some(plus)
    );
}

#[test]
fn downgrading_from_plus_to_starter_after_2000_requests_leaves_nothing_and_denies() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    let used_at_ms = T0_MS + HOUR_MS;
    assert_eq!(m27_requests(&engine, &key, 2000, used_at_ms), 2000);
    engine
        .assign_seat("@ada", "ada", "Starter", Some(used_at_ms + MINUTE_MS))
        .expect("downgrade");
    let at_ms = used_at_ms + 2 * MINUTE_MS;
    let report = limit(&engine, &key, "m2.7:requests", five_hours(), at_ms);
    assert_eq!(
        (report.amount, report.used, report.remaining),
        (1500, 2000, 0)
    );
    let (_, retry_at_ms, _, _) =
        quota_exhausted(consume(&engine, &key, "m2.7", &ONE_REQUEST, at_ms));
    // 501 of the 2,000 must age out first: they were all used at `used_at_ms`.
    assert!(retry_at_ms >= used_at_ms + FIVE_HOURS_MS);
    // Plus covered speech and image; Starter does not.
    assert!(matches!(
        reason(consume(
            &engine,
            &key,
            "image-01",
            &[(Unit::Images, 1)],
            at_ms
        )),
        DenialReason::ResourceNotCovered { .. }
    ));
}

#[test]
fn a_seat_change_keeps_daily_usage_of_resources_both_plans_cover() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 30, T0_MS),
        30
    );
    engine
        .assign_seat("@ada", "ada", "Max", Some(T0_MS))
        .expect("upgrade");
    let report = limit(&engine, &key, "image-01:images", daily(), T0_MS);
    assert_eq!(
        (report.amount, report.used, report.remaining),
        (120, 30, 90)
    );
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 91, T0_MS),
        90
    );
}

#[test]
fn unassigning_a_seat_leaves_no_resources_or_falls_to_credits() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 10, T0_MS), 10);
    engine
        .unassign_seat("@ada", "ada", Some(T0_MS))
        .expect("unassign");
    assert_eq!(
        reason(consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::NoResources
    );
    let report = engine.usage(&key, Some(T0_MS)).expect("report");
    assert_eq!(report.plan, None);
    assert!(report.limits.is_empty());

    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    assert_eq!(
        admitted(consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS)).charged_to,
        ChargedTo::Credits { micros: price }
    );
}

#[test]
fn unassigning_and_reassigning_within_the_window_does_not_reset_the_quota() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1500, T0_MS), 1500);
    engine
        .unassign_seat("@ada", "ada", Some(T0_MS))
        .expect("unassign");
    engine
        .assign_seat("@ada", "ada", "Starter", Some(T0_MS + MINUTE_MS))
        .expect("reassign");
    assert_eq!(m27_requests(&engine, &key, 1, T0_MS + MINUTE_MS), 0);
    assert_eq!(m27_used(&engine, &key, T0_MS + MINUTE_MS), 1500);
}

#[test]
fn pay_as_you_go_keys_never_draw_on_plan_quota_or_credits() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .expect("payg key");
    assert_eq!(m27_requests(&engine, &key, 100, T0_MS), 100);

    let quantities = [(Unit::Requests, 1), (Unit::Tokens, 1234)];
    let price = price_micros(&engine, "m2.7", &quantities);
    let admission = admitted(consume(&engine, "payg-ada", "m2.7", &quantities, T0_MS));
    assert_eq!(
        admission.charged_to,
        ChargedTo::PayAsYouGo { micros: price }
    );
    assert_eq!(admission.plan, None);
    // A resource the seat does not cover is also just paid for.
    let image = [(Unit::Images, 2)];
    let image_price = price_micros(&engine, "image-01", &image);
    assert_eq!(
        admitted(consume(&engine, "payg-ada", "image-01", &image, T0_MS)).charged_to,
        ChargedTo::PayAsYouGo {
            micros: image_price
        }
    );

    assert_eq!(engine.credits_micros("@ada").expect("balance"), 1_000_000);
    assert_eq!(m27_used(&engine, &key, T0_MS), 100);
    let plan_report = engine.usage(&key, Some(T0_MS)).expect("report");
    assert_eq!(plan_report.payg_micros, 0);
    assert_eq!(plan_report.credits_charged_micros, 0);
    let payg_report = engine.usage("payg-ada", Some(T0_MS)).expect("report");
    assert_eq!(payg_report.kind, KeyKind::PayAsYouGo);
    assert_eq!(payg_report.plan, None);
    assert!(payg_report.limits.is_empty());
    assert_eq!(payg_report.payg_micros, price + image_price);
}

#[test]
fn a_pay_as_you_go_key_still_works_when_the_plan_quota_is_exhausted() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .expect("payg key");
    assert_eq!(m27_requests(&engine, &key, 1501, T0_MS), 1500);
    assert_eq!(m27_requests(&engine, "payg-ada", 10, T0_MS), 10);
    assert_eq!(m27_used(&engine, &key, T0_MS), 1500);
}

/// A pay-as-you-go key's spend is a total that never resets, bounded by `u64`: a request whose
/// price would take it past is refused by `check` as by `consume` (a check that answered
/// "admitted" promised what the consume then refused), with an error saying it is the key's
/// spend that would overflow; a smaller request that still fits is admitted by both.
#[test]
fn pay_as_you_go_spend_at_its_bound_is_refused_by_check_as_by_consume() {
    let engine = engine();
    user(&engine, "ada");
    engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .expect("payg key");
    let big = [(Unit::Requests, 1 << 40), (Unit::Tokens, 1 << 40)];
    let request = tally_engine::UsageRequest::new("payg-ada", "m2.7-highspeed", &big).at(T0_MS);
    let price = price_micros(&engine, "m2.7-highspeed", &big);
    let fits = u64::MAX / price;
    for _ in 0..fits {
        assert!(engine.consume(&request).expect("fits").is_admitted());
    }
    let spent = fits * price;
    let report = || engine.usage("payg-ada", Some(T0_MS)).expect("report");
    assert_eq!(report().payg_micros, spent);
    let consumed = engine.consume(&request).expect_err("past the bound");
    let checked = engine.check(&request).expect_err("past the bound");
    assert_eq!(checked, consumed);
    assert!(
        matches!(consumed, Error::Overflow { field } if field.contains("pay-as-you-go spend")),
        "{consumed:?}"
    );
    assert!(consumed.to_string().starts_with("key ("), "{consumed}");
    assert_eq!(report().payg_micros, spent, "nothing recorded");
    // What is left below the bound still takes a small request.
    let small = tally_engine::UsageRequest::new("payg-ada", "m2.7", &ONE_REQUEST).at(T0_MS);
    assert!(u64::MAX - spent >= price_micros(&engine, "m2.7", &ONE_REQUEST));
    assert!(engine.check(&small).expect("fits").is_admitted());
    assert!(engine.consume(&small).expect("fits").is_admitted());
}

#[test]
fn a_pay_as_you_go_key_has_no_plan_usage_to_adjust() {
    let engine = engine();
    seated(&engine, "ada", "Starter");
    engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .expect("payg key");
    let adjusted = engine.adjust_usage(
        "payg-ada",
        "m2.7",
        &ONE_REQUEST,
        T0_MS,
        tally_engine::AdjustmentDirection::Add,
        Some(T0_MS),
    );
    assert!(
        matches!(adjusted, Err(Error::InvalidArgument { field: "key", .. })),
        "{adjusted:?}"
    );
}

#[test]
fn seats_are_given_to_members_only() {
    let engine = engine();
    user(&engine, "ada");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    let seat = engine.assign_seat("acme", "ada", "Plus", Some(T0_MS));
    assert!(matches!(seat, Err(Error::NotAMember { .. })), "{seat:?}");
    assert!(matches!(
        engine.assign_seat("nope", "ada", "Plus", Some(T0_MS)),
        Err(Error::UnknownTeam { .. })
    ));
    assert!(matches!(
        engine.assign_seat("@ada", "nobody", "Plus", Some(T0_MS)),
        Err(Error::UnknownUser { .. })
    ));
}

/// A leaked key is revoked: every later request on it is denied `KeyRevoked`, whatever its
/// seat and its team's credits, by every way in (consume, check, reserve, a batch, a
/// submission); a repeat of a request admitted before still returns its first decision; what
/// it used still counts, its open reservation still settles within the hold (not beyond),
/// its requests still refund. Revoking again changes nothing; an unknown key is an error.
#[test]
fn a_revoked_key_is_denied_everything_while_what_it_did_before_still_stands() {
    use tally_engine::{SettleOutcome, UsageRequest};
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    engine
        .top_up("@ada", 5_000_000, Some(T0_MS))
        .expect("top-up");
    let first = UsageRequest::new(&key, "m2.7", &ONE_REQUEST)
        .at(T0_MS)
        .id("before");
    let admitted_first = engine.consume(&first).expect("consume");
    assert!(admitted_first.is_admitted());
    engine
        .consume(
            &UsageRequest::new(&key, "m2.7", &ONE_REQUEST)
                .id("refund-me")
                .at(T0_MS),
        )
        .expect("consume");
    let held = engine
        .reserve(
            &UsageRequest::new(&key, "m2.7", &[(Unit::Requests, 1), (Unit::Tokens, 100)]).at(T0_MS),
            None,
        )
        .expect("reserve");
    let reservation = held.reservation.expect("held");
    let used_before = m27_used(&engine, &key, T0_MS + 1);
    assert_eq!(used_before, 3);

    assert_eq!(engine.revoke_key(&key, Some(T0_MS + 1)), Ok(true));
    assert_eq!(engine.revoke_key(&key, Some(T0_MS + 2)), Ok(false));
    let later = T0_MS + 10;
    let request = UsageRequest::new(&key, "m2.7", &ONE_REQUEST).at(later);
    assert_eq!(
        reason(engine.consume(&request).unwrap()),
        DenialReason::KeyRevoked
    );
    assert_eq!(
        reason(engine.check(&request).unwrap()),
        DenialReason::KeyRevoked
    );
    assert_eq!(
        reason(engine.reserve(&request, None).unwrap().decision),
        DenialReason::KeyRevoked
    );
    let batch = engine.consume_many(&[request.id("in-a-batch")]);
    assert_eq!(reason(batch[0].clone().unwrap()), DenialReason::KeyRevoked);
    let submitted = engine.submit(&request).expect("submit");
    assert_eq!(
        reason(submitted.complete().unwrap().0),
        DenialReason::KeyRevoked
    );
    // A denial offers nothing: no credits or plan would help.
    let denial = denied(engine.consume(&request).unwrap());
    assert_eq!(denial.remedies, Default::default());
    // The first decision of a request id stands, counting nothing again.
    assert_eq!(engine.consume(&first.at(later)), Ok(admitted_first));
    assert_eq!(m27_used(&engine, &key, later), used_before);
    let report = engine.usage(&key, Some(later)).expect("usage");
    assert!(report.revoked);
    assert_eq!(report.plan.as_deref(), Some("Plus"));
    // Within the hold the reservation settles; beyond it, the extra is denied.
    match engine
        .settle(
            reservation,
            &[(Unit::Requests, 1), (Unit::Tokens, 500)],
            Some(later),
        )
        .expect("settle")
    {
        SettleOutcome::Denied(denial) => assert_eq!(denial.reason, DenialReason::KeyRevoked),
        other => panic!("an extra on a revoked key: {other:?}"),
    }
    assert!(matches!(
        engine
            .settle(
                reservation,
                &[(Unit::Requests, 1), (Unit::Tokens, 60)],
                Some(later)
            )
            .expect("settle"),
        SettleOutcome::Settled(_)
    ));
    // A refund gives back as ever.
    engine.refund("refund-me", Some(later)).expect("refund");
    assert_eq!(m27_used(&engine, &key, later), used_before - 1);
    assert!(matches!(
        engine.revoke_key("no-such-key", Some(later)),
        Err(Error::UnknownKey { .. })
    ));
}

/// Revoking a member's key frees the member for a new key in its place (a key rotated after a
/// leak): `add_member` gives it, with no seat, and the old key stays revoked. A member whose
/// key still works is a member already. Pay-as-you-go keys are revoked alike.
#[test]
fn a_member_whose_key_was_revoked_is_given_a_new_one() {
    let engine = engine();
    user(&engine, "ada");
    user(&engine, "bob");
    engine.create_team("acme", Some(T0_MS)).expect("team");
    engine
        .add_member("acme", "bob", "bob-acme-1", Some(T0_MS))
        .expect("member");
    engine
        .assign_seat("acme", "bob", "Max", Some(T0_MS))
        .expect("seat");
    assert!(matches!(
        engine.add_member("acme", "bob", "bob-acme-2", Some(T0_MS)),
        Err(Error::AlreadyExists { what: "member", .. })
    ));
    assert_eq!(engine.revoke_key("bob-acme-1", Some(T0_MS)), Ok(true));
    engine
        .add_member("acme", "bob", "bob-acme-2", Some(T0_MS))
        .expect("a new key in the revoked one's place");
    let new = engine
        .usage("bob-acme-2", Some(T0_MS))
        .expect("the new key");
    assert!(!new.revoked);
    assert_eq!(new.plan, None, "a new key starts with no seat");
    engine
        .assign_seat("acme", "bob", "Plus", Some(T0_MS))
        .expect("the seat goes to the new key");
    assert!(consume(&engine, "bob-acme-2", "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
    assert_eq!(
        reason(consume(&engine, "bob-acme-1", "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::KeyRevoked
    );
    let old = engine.usage("bob-acme-1", Some(T0_MS)).expect("kept");
    assert!(old.revoked);
    assert_eq!(
        old.plan.as_deref(),
        Some("Max"),
        "the old key kept its seat, unused"
    );
    // The old name cannot be issued again.
    assert!(engine
        .add_member("acme", "ada", "bob-acme-1", Some(T0_MS))
        .is_err());
    // A pay-as-you-go key.
    engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .expect("payg key");
    assert!(consume(&engine, "payg-ada", "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
    assert_eq!(engine.revoke_key("payg-ada", Some(T0_MS)), Ok(true));
    assert_eq!(
        reason(consume(&engine, "payg-ada", "m2.7", &ONE_REQUEST, T0_MS)),
        DenialReason::KeyRevoked
    );
}

/// A revoked key's reservation held on credits settles within the hold, but nothing beyond it
/// is charged: trading units (fewer tokens, one more request) used to pay the extra request
/// with what the hold gave back and the team's balance, as if the key still worked.
#[test]
fn a_revoked_keys_credits_hold_charges_no_extra_when_it_trades_units() {
    use tally_engine::UsageRequest;
    let engine = engine();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", 5_000_000, Some(T0_MS))
        .expect("top-up");
    let held = engine
        .reserve(
            &UsageRequest::new(&key, "m2.7", &[(Unit::Requests, 1), (Unit::Tokens, 1_000)])
                .at(T0_MS),
            None,
        )
        .expect("reserve");
    assert!(held.decision.is_admitted());
    let reservation = held.reservation.expect("held on credits");
    revoke_then_settle_charges_nothing(
        &engine,
        &key,
        reservation,
        &[(Unit::Requests, 2), (Unit::Tokens, 500)],
        "an extra request",
    );
}

/// A revoked key whose plan was full when it reserved (so the hold is on credits) cannot
/// settle for more of a unit its plan does not count either: that extra was charged to the
/// team's credits straight away, never asking whether the key was revoked.
#[test]
fn a_revoked_keys_credits_hold_charges_no_extra_in_units_its_plan_does_not_count() {
    use tally_engine::UsageRequest;
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    engine
        .top_up("@ada", 5_000_000, Some(T0_MS))
        .expect("top-up");
    // Plus counts 4,500 m2.7 requests in 5 hours, and no tokens.
    let fill = consume(&engine, &key, "m2.7", &[(Unit::Requests, 4_500)], T0_MS);
    assert!(matches!(
        fill,
        tally_engine::Decision::Admitted(ref admission)
            if matches!(admission.charged_to, ChargedTo::PlanQuota { .. })
    ));
    let held = engine
        .reserve(
            &UsageRequest::new(&key, "m2.7", &[(Unit::Requests, 1), (Unit::Tokens, 100)]).at(T0_MS),
            None,
        )
        .expect("reserve");
    let reservation = held.reservation.expect("held");
    match &held.decision {
        tally_engine::Decision::Admitted(admission) => {
            assert!(matches!(admission.charged_to, ChargedTo::Credits { .. }))
        }
        other => panic!("reserve: {other:?}"),
    }
    revoke_then_settle_charges_nothing(
        &engine,
        &key,
        reservation,
        &[(Unit::Requests, 1), (Unit::Tokens, 500)],
        "extra tokens",
    );
}

/// Revokes `key` (ada's, paying from @ada's credits), then settles `reservation` for
/// `actual`, beyond its hold: denied `KeyRevoked`, and the balance unchanged.
fn revoke_then_settle_charges_nothing(
    engine: &tally_engine::Engine,
    key: &str,
    reservation: tally_engine::ReservationId,
    actual: &[(Unit, u64)],
    what: &str,
) {
    assert_eq!(engine.revoke_key(key, Some(T0_MS + 1)), Ok(true));
    let balance = engine.credits_micros("@ada").expect("balance");
    let outcome = engine
        .settle(reservation, actual, Some(T0_MS + 2))
        .expect("settle");
    match outcome {
        tally_engine::SettleOutcome::Denied(denial) => {
            assert_eq!(denial.reason, DenialReason::KeyRevoked)
        }
        other => panic!("{what} on a revoked key was charged: {other:?}"),
    }
    assert_eq!(engine.credits_micros("@ada").expect("balance"), balance);
}

/// A revoked key's seat, which no command can take away once the member has a new key (a seat
/// change finds the member's key), does not hold a policy swap back: the swap that drops the
/// plan used to be refused for good ("plan has seats assigned"). The revoked key loses the
/// seat with the plan, is still denied, and keeps what it used in the windows the swap keeps.
#[test]
fn a_revoked_keys_seat_does_not_hold_back_a_policy_swap_that_drops_its_plan() {
    use tally_engine::Policy;
    let engine = engine();
    let old = seated(&engine, "ada", "Starter");
    assert!(consume(&engine, &old, "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
    let refunded = tally_engine::UsageRequest::new(&old, "m2.7", &ONE_REQUEST)
        .at(T0_MS)
        .id("refund-after-the-swap");
    assert!(engine.consume(&refunded).expect("consume").is_admitted());
    let held = engine
        .reserve(
            &tally_engine::UsageRequest::new(&old, "m2.7", &[(Unit::Requests, 2)]).at(T0_MS),
            None,
        )
        .expect("reserve");
    let reservation = held.reservation.expect("held on the plan");
    assert_eq!(engine.revoke_key(&old, Some(T0_MS)), Ok(true));
    engine
        .add_member("@ada", "ada", "tp-ada-2", Some(T0_MS))
        .expect("a new key in its place");
    engine
        .unassign_seat("@ada", "ada", Some(T0_MS))
        .expect("nothing to take from the new key");
    let mut document = Policy::token_plan().document().clone();
    assert!(document.plans.remove("Starter").is_some());
    engine
        .swap_policy(
            Policy::compile(document).expect("a valid policy"),
            Some(T0_MS + 1),
        )
        .expect("the revoked key's seat does not hold the swap back");
    let report = engine.usage(&old, Some(T0_MS + 1)).expect("kept");
    assert!(report.revoked);
    assert_eq!(report.plan, None, "its plan is gone");
    assert_eq!(
        reason(consume(&engine, &old, "m2.7", &ONE_REQUEST, T0_MS + 1)),
        DenialReason::KeyRevoked
    );
    // Its request still refunds, and its reservation, held under the plan gone, still
    // settles within the hold.
    engine
        .refund("refund-after-the-swap", Some(T0_MS + 1))
        .expect("refund");
    assert!(matches!(
        engine
            .settle(reservation, &[(Unit::Requests, 1)], Some(T0_MS + 1))
            .expect("settle"),
        tally_engine::SettleOutcome::Settled(_)
    ));
    engine
        .assign_seat("@ada", "ada", "Plus", Some(T0_MS + 1))
        .expect("the new key's seat");
    assert!(consume(&engine, "tp-ada-2", "m2.7", &ONE_REQUEST, T0_MS + 1).is_admitted());
}
