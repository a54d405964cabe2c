//! Admission: all-or-nothing across limits, `check` without effects, request ids, the usage
//! report, reservations (reserve, settle, void, lease expiry), refunds, usage corrections, policy
//! swaps and idle-memory reclaim.

mod common;
mod log_support;

use std::num::NonZeroU64;

use common::*;
use tally_engine::policy::TOKEN_PLAN_TOML;
use tally_engine::{
    AdjustedLimit, AdjustmentDirection, ChargedTo, Decision, DenialReason, Engine, Error, Policy,
    ReservationId, SettleOutcome, Unit, UsageRequest,
};

const ONE_REQUEST: [(Unit, u64); 1] = [(Unit::Requests, 1)];

fn request<'a>(key: &'a str, quantities: &'a [(Unit, u64)], at_ms: u64) -> UsageRequest<'a> {
    UsageRequest::new(key, "m2.7", quantities).at(at_ms)
}

// ---- All or nothing ----------------------------------------------------------------------------

/// A plan with two limits on one resource, in the given order: requests per 5 hours and tokens
/// per day.
fn two_limit_policy(requests_first: bool) -> Policy {
    two_limit_policy_with(requests_first, 100)
}

/// `two_limit_policy` with `daily_tokens` tokens a day.
fn two_limit_policy_with(requests_first: bool, daily_tokens: u64) -> Policy {
    let requests =
        r#"{ resource = "chat", unit = "requests", amount = 10, window = "rolling:5h" }"#;
    let tokens = format!(
        r#"{{ resource = "chat", unit = "tokens", amount = {daily_tokens}, window = "daily" }}"#
    );
    let (first, second) = if requests_first {
        (requests, tokens.as_str())
    } else {
        (tokens.as_str(), requests)
    };
    let text = format!(
        r#"
time_zone = "Asia/Shanghai"
[resources.chat]
units = ["requests", "tokens"]
price_micros = {{ requests = 1000, tokens = 10 }}
[plans.Two]
limits = [
  {first},
  {second},
]
"#
    );
    Policy::from_toml_str(&text).expect("a valid policy")
}

/// A daily limit taken first, then a 5-hour one that refuses: the request's tokens are held
/// on the daily counter for a moment and given back. Meanwhile a correction removing tokens
/// must find nothing to remove (none were ever recorded) and leave the request's give-back
/// whole. Before, the correction ran under the key's read lock and took the held tokens as
/// recorded usage: it reported and logged a removal of tokens never used, and the admission
/// gave back fewer than it took (a debug build panicked in the consume).
#[test]
fn a_correction_never_removes_units_a_refused_request_holds_for_a_moment() {
    let engine = engine_with(two_limit_policy(false));
    let key = seated(&engine, "ada", "Two");
    for _ in 0..10 {
        assert!(consume(&engine, &key, "chat", &[(Unit::Requests, 1)], T0_MS).is_admitted());
    }
    let refused = std::sync::atomic::AtomicBool::new(false);
    let removed = std::thread::scope(|scope| {
        scope.spawn(|| {
            // Stops the correcting thread however this one ends.
            let _done = log_support::StoreOnDrop(&refused, true);
            let quantities = [(Unit::Requests, 1), (Unit::Tokens, 2)];
            for _ in 0..20_000 {
                assert!(!consume(&engine, &key, "chat", &quantities, T0_MS).is_admitted());
            }
        });
        let correcting = scope.spawn(|| {
            let mut removed = 0;
            while !refused.load(std::sync::atomic::Ordering::Relaxed) {
                let outcome = engine
                    .adjust_usage(
                        &key,
                        "chat",
                        &[(Unit::Tokens, 1)],
                        T0_MS,
                        AdjustmentDirection::Remove,
                        Some(T0_MS),
                    )
                    .expect("a correction");
                removed += outcome.limits.iter().map(|limit| limit.moved).sum::<u64>();
            }
            removed
        });
        correcting.join().expect("the correcting thread")
    });
    assert_eq!(removed, 0, "no token was ever recorded");
    assert_eq!(
        engine.usage(&key, Some(T0_MS)).expect("report").limits[0].used,
        0
    );
}

/// The same for a refund: tokens a correction removed after the request was counted are no
/// longer recorded, so its refund has none of them to give back. Meanwhile a refused request
/// holds tokens on the daily counter for a moment, and the refund, under the key's read lock,
/// took those as its own: it reported and logged tokens given back that were never recorded,
/// and the refused request gave back fewer than it took (a debug build panicked in the
/// consume).
#[test]
fn a_refund_never_gives_back_units_a_refused_request_holds_for_a_moment() {
    let policy = two_limit_policy_with(false, 1_000_000);
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "Two");
    const REFUNDS: usize = 4_000;
    let ids: Vec<String> = (0..REFUNDS).map(|index| format!("r{index}")).collect();
    for id in &ids {
        let request = UsageRequest::new(&key, "chat", &[(Unit::Tokens, 1)])
            .at(T0_MS)
            .id(id);
        assert!(engine.consume(&request).expect("consume").is_admitted());
    }
    for _ in 0..10 {
        assert!(consume(&engine, &key, "chat", &[(Unit::Requests, 1)], T0_MS).is_admitted());
    }
    // Every token counted is corrected away: none is recorded any more.
    engine
        .adjust_usage(
            &key,
            "chat",
            &[(Unit::Tokens, REFUNDS as u64)],
            T0_MS,
            AdjustmentDirection::Remove,
            Some(T0_MS),
        )
        .expect("a correction");
    let refunded = std::sync::atomic::AtomicBool::new(false);
    let given_back = std::thread::scope(|scope| {
        scope.spawn(|| {
            let quantities = [(Unit::Requests, 1), (Unit::Tokens, 2)];
            while !refunded.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(!consume(&engine, &key, "chat", &quantities, T0_MS).is_admitted());
            }
        });
        let refunding = scope.spawn(|| {
            // Stops the refused thread however this one ends.
            let _done = log_support::StoreOnDrop(&refunded, true);
            ids.iter()
                .map(|id| {
                    let refund = engine.refund(id, Some(T0_MS)).expect("a refund");
                    refund.given_back.counters.iter().map(|c| c.2).sum::<u64>()
                })
                .sum::<u64>()
        });
        refunding.join().expect("the refunding thread")
    });
    assert_eq!(given_back, 0, "no token was recorded any more");
    assert_eq!(
        engine.usage(&key, Some(T0_MS)).expect("report").limits[0].used,
        0
    );
}

/// How a reservation is closed while refused requests hold tokens for a moment
/// (`close_racing_refused_requests`).
#[derive(Clone, Copy, Debug)]
enum Close {
    /// Voided: its whole estimate of one token is given back.
    Void,
    /// Settled at one token of its estimate of two: one token is given back.
    Settle,
    /// Its lease (`CLOSE_LEASE_MS`) ends: its whole estimate of one token is given back.
    Expire,
}

const CLOSE_LEASE_MS: u64 = MINUTE_MS;

impl Close {
    /// What each reservation holds.
    fn estimate(self) -> [(Unit, u64); 1] {
        match self {
            Close::Settle => [(Unit::Tokens, 2)],
            Close::Void | Close::Expire => [(Unit::Tokens, 1)],
        }
    }
}

/// A logged engine (what each close gave back is read from its log) on a plan that takes a
/// daily token limit first, then a 5-hour request limit, and ada's key on it with those ten
/// requests used: a request for one more and two tokens holds the tokens on the daily counter
/// for a moment and is refused.
fn engine_for_closes(dir: &log_support::TempDir) -> (Engine, String) {
    let engine = open_for_closes(dir);
    let key = seated(&engine, "ada", "Two");
    for _ in 0..10 {
        assert!(consume(&engine, &key, "chat", &[(Unit::Requests, 1)], T0_MS).is_admitted());
    }
    (engine, key)
}

/// Opens the database of `engine_for_closes` (new or not) with its policy.
fn open_for_closes(dir: &log_support::TempDir) -> Engine {
    let policy = two_limit_policy_with(false, 1_000_000);
    let options = tally_engine::OpenOptions {
        durability: tally_engine::Durability::None,
        ..tally_engine::OpenOptions::default()
    };
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    Engine::open(dir.path(), policy, clock, options).expect("open")
}

/// `count` reservations of `close`'s estimate on `key` at `T0_MS`.
fn reserve_tokens(engine: &Engine, key: &str, close: Close, count: usize) -> Vec<ReservationId> {
    let estimate = close.estimate();
    (0..count)
        .map(|_| {
            let held = UsageRequest::new(key, "chat", &estimate).at(T0_MS);
            let outcome = engine
                .reserve(&held, Some(CLOSE_LEASE_MS))
                .expect("reserve");
            assert!(outcome.decision.is_admitted(), "{:?}", outcome.decision);
            outcome.reservation.expect("a reservation")
        })
        .collect()
}

/// With no token of the key recorded before and after, closes `ids` racing refused requests
/// (`close_racing_refused_requests`) and checks that the closes gave back nothing.
fn assert_closes_give_back_nothing(
    engine: &Engine,
    key: &str,
    ids: &[ReservationId],
    close: Close,
    case: &str,
) {
    let used = |engine: &Engine| engine.usage(key, Some(T0_MS)).expect("report").limits[0].used;
    assert_eq!(used(engine), 0, "{case}: before");
    let given_back = close_racing_refused_requests(engine, key, ids, close);
    assert_eq!(given_back, 0, "{case}: no token was recorded any more");
    assert_eq!(used(engine), 0, "{case}: after");
}

/// Closes `ids` (all of the key's open reservations) one thread while another sends requests
/// the 5-hour limit refuses, each holding two tokens on the daily counter for a moment; returns
/// the units the closes logged as given back.
fn close_racing_refused_requests(
    engine: &Engine,
    key: &str,
    ids: &[ReservationId],
    close: Close,
) -> u64 {
    let before = engine.events_after(0, usize::MAX).expect("the log").len() as u64;
    let closed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let quantities = [(Unit::Requests, 1), (Unit::Tokens, 2)];
            while !closed.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(!consume(engine, key, "chat", &quantities, T0_MS).is_admitted());
            }
        });
        let closing = scope.spawn(|| {
            // Stops the refused thread however this one ends.
            let _done = log_support::StoreOnDrop(&closed, true);
            match close {
                Close::Void => {
                    for &id in ids {
                        engine.void(id, Some(T0_MS)).expect("a void");
                    }
                }
                Close::Settle => {
                    for &id in ids {
                        let settled = engine
                            .settle(id, &[(Unit::Tokens, 1)], Some(T0_MS))
                            .expect("a settle");
                        assert!(matches!(settled, SettleOutcome::Settled(_)), "{settled:?}");
                    }
                }
                Close::Expire => {
                    let expired = engine
                        .expire_reservations(Some(T0_MS + CLOSE_LEASE_MS))
                        .expect("an expiry");
                    assert_eq!(expired, ids.len());
                }
            }
        });
        closing.join().expect("the closing thread");
    });
    let logged = engine.events_after(before, usize::MAX).expect("the log");
    let (closes, given_back) = logged
        .iter()
        .filter_map(|event| match &event.body {
            tally_engine::EventBody::ReservationClosed { given_back, .. } => {
                Some(given_back.total())
            }
            _ => None,
        })
        .fold((0, 0), |(closes, total), given| (closes + 1, total + given));
    assert_eq!(closes, ids.len(), "{close:?}: every close is logged");
    given_back
}

/// The same for a reservation's close (settle, void, lease expiry): tokens a correction removed
/// after the reservation was made are no longer recorded, so its close has none of them to give
/// back. Meanwhile a refused request holds two tokens on the daily counter for a moment, and a
/// close under the key's read lock took one of them as its own: it logged a token given back
/// that was never recorded, and the refused request gave back one of its two (a debug build
/// panicked in the consume: 'a calendar hold is given back whole, or its period has reset').
#[test]
fn a_reservation_close_never_gives_back_units_a_refused_request_holds_for_a_moment() {
    const RESERVATIONS: usize = 4_000;
    for close in [Close::Void, Close::Settle, Close::Expire] {
        let dir = log_support::TempDir::new("close-after-correction");
        let (engine, key) = engine_for_closes(&dir);
        let ids = reserve_tokens(&engine, &key, close, RESERVATIONS);
        // Every token the reservations hold is corrected away: none is recorded any more.
        engine
            .adjust_usage(
                &key,
                "chat",
                &[(Unit::Tokens, RESERVATIONS as u64 * close.estimate()[0].1)],
                T0_MS,
                AdjustmentDirection::Remove,
                Some(T0_MS),
            )
            .expect("a correction");
        let case = format!("{close:?}");
        assert_closes_give_back_nothing(&engine, &key, &ids, close, &case);
    }
}

/// A correction's shortfall is the period's, not the receipts' it took from: requests counted
/// before a correction removed their tokens, then reservations made after it, then the
/// requests refunded (which gives back min(receipt, counter): the reservations' tokens). The
/// reservations' tokens are no longer recorded although no correction came after them, and
/// their closes must still not take a refused request's held tokens (a close that went to the
/// write lock only for reservations older than the correction would).
#[test]
fn a_close_of_a_reservation_made_after_a_correction_never_gives_back_units_a_refused_request_holds()
{
    const RESERVATIONS: usize = 4_000;
    for close in [Close::Void, Close::Expire] {
        let dir = log_support::TempDir::new("close-after-refunds");
        let (engine, key) = engine_for_closes(&dir);
        let ids: Vec<String> = (0..RESERVATIONS).map(|index| format!("r{index}")).collect();
        for id in &ids {
            let request = UsageRequest::new(&key, "chat", &[(Unit::Tokens, 1)])
                .at(T0_MS)
                .id(id);
            assert!(engine.consume(&request).expect("consume").is_admitted());
        }
        engine
            .adjust_usage(
                &key,
                "chat",
                &[(Unit::Tokens, RESERVATIONS as u64)],
                T0_MS,
                AdjustmentDirection::Remove,
                Some(T0_MS),
            )
            .expect("a correction");
        let reservations = reserve_tokens(&engine, &key, close, RESERVATIONS);
        let refunded: u64 = ids
            .iter()
            .map(|id| {
                let refund = engine.refund(id, Some(T0_MS)).expect("a refund");
                refund.given_back.total()
            })
            .sum();
        assert_eq!(
            refunded, RESERVATIONS as u64,
            "the refunds took the reservations' tokens"
        );
        let case = format!("{close:?}");
        assert_closes_give_back_nothing(&engine, &key, &reservations, close, &case);
    }
}

/// The same after a reopen: the reopened engine must still not let a close take a refused
/// request's held tokens, whether the correction is in the snapshot (closed, so checkpointed:
/// the snapshot lists the key as short), replayed from the log (dropped without a checkpoint:
/// the replay marks it as the live correction did), or in a snapshot of format 3, which does
/// not say (the open works it out from the counters and the receipts).
#[test]
fn a_close_after_a_reopen_never_gives_back_units_a_refused_request_holds_for_a_moment() {
    const RESERVATIONS: usize = 4_000;
    for (checkpointed, format_3) in [(true, false), (false, false), (true, true)] {
        let close = Close::Void;
        let dir = log_support::TempDir::new("close-after-reopen");
        let (engine, key) = engine_for_closes(&dir);
        let ids = reserve_tokens(&engine, &key, close, RESERVATIONS);
        engine
            .adjust_usage(
                &key,
                "chat",
                &[(Unit::Tokens, RESERVATIONS as u64)],
                T0_MS,
                AdjustmentDirection::Remove,
                Some(T0_MS),
            )
            .expect("a correction");
        if checkpointed {
            engine.close().expect("close");
        } else {
            drop(engine);
        }
        if format_3 {
            log_support::rewrite_snapshots_in_format(dir.path(), 3);
        }
        let engine = open_for_closes(&dir);
        assert_eq!(engine.open_reservations(), RESERVATIONS);
        let case = format!("checkpointed {checkpointed}, format 3 {format_3}");
        assert_closes_give_back_nothing(&engine, &key, &ids, close, &case);
    }
}

#[test]
fn a_request_that_fits_one_limit_but_not_another_changes_neither() {
    for requests_first in [true, false] {
        let engine = engine_with(two_limit_policy(requests_first));
        let key = seated(&engine, "ada", "Two");
        let chat = |quantities: &[(Unit, u64)]| consume(&engine, &key, "chat", quantities, T0_MS);
        assert!(chat(&[(Unit::Requests, 1), (Unit::Tokens, 95)]).is_admitted());
        // Requests have room (1 of 10), tokens do not (95 + 6 > 100).
        let denial = denied(chat(&[(Unit::Requests, 1), (Unit::Tokens, 6)]));
        assert!(matches!(denial.reason, DenialReason::QuotaExhausted { .. }));
        assert_eq!(used(&engine, &key, "chat:requests", five_hours(), T0_MS), 1);
        assert_eq!(used(&engine, &key, "chat:tokens", daily(), T0_MS), 95);
        // Requests alone still fit, nine times, as if the denied request never happened.
        assert_eq!(
            admit_count(&engine, &key, "chat", Unit::Requests, 10, T0_MS),
            9
        );
        assert!(chat(&[(Unit::Tokens, 5)]).is_admitted());
        assert_eq!(used(&engine, &key, "chat:tokens", daily(), T0_MS), 100);
    }
}

#[test]
fn a_request_over_the_weekly_bar_leaves_the_five_hour_bar_untouched() {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Bar-Plus");
    let rolling_amount = limit(&engine, &key, "usage-bar", five_hours(), T0_MS).amount;
    let weekly_amount = limit(&engine, &key, "usage-bar", weekly(), T0_MS).amount;
    // The request that will not fit: one m2.7 request (its required unit) and two tokens.
    let asked = [(Unit::Requests, 1), (Unit::Tokens, 2)];
    let asked_micros = price_micros(&engine, "m2.7", &asked);
    // Leave the week one micro-credit short of it, in windows six hours apart.
    let mut left = weekly_amount - (asked_micros - 1);
    let mut at_ms = T0_MS;
    while left > 0 {
        let micros = left.min(rolling_amount);
        clock.set_ms(at_ms);
        assert!(consume(&engine, &key, "m2.7", &m27_worth(&engine, micros), at_ms).is_admitted());
        left -= micros;
        at_ms += 6 * HOUR_MS;
    }
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), at_ms), 0);
    let (denied_limit, _, _, _) = quota_exhausted(consume(&engine, &key, "m2.7", &asked, at_ms));
    assert_eq!(
        denied_limit,
        limit_index(&engine, "Bar-Plus", "usage-bar", weekly())
    );
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), at_ms), 0);
    assert_eq!(
        used(&engine, &key, "usage-bar", weekly(), at_ms),
        weekly_amount - (asked_micros - 1)
    );

    // Paid with credits instead, it still leaves both bars alone.
    engine
        .top_up("@ada", 1_000_000, Some(at_ms))
        .expect("top up");
    assert_eq!(
        admitted(consume(&engine, &key, "m2.7", &asked, at_ms)).charged_to,
        ChargedTo::Credits {
            micros: asked_micros
        }
    );
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), at_ms), 0);
    assert_eq!(
        used(&engine, &key, "usage-bar", weekly(), at_ms),
        weekly_amount - (asked_micros - 1)
    );
}

// ---- check ------------------------------------------------------------------------------------

#[test]
fn check_gives_the_decision_consume_would_give_and_changes_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    for _ in 0..3000 {
        assert!(check(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
    }
    assert_eq!(m27_used(&engine, &key, T0_MS), 0);
    assert_eq!(m27_requests(&engine, &key, 1499, T0_MS), 1499);
    let checked = check(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS);
    let consumed = consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS);
    assert_eq!(admitted(checked).charged_to, admitted(consumed).charged_to);
    assert_eq!(admitted(checked).limits, admitted(consumed).limits);
    let checked = check(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS);
    assert_eq!(checked, consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS));
}

#[test]
fn check_does_not_spend_credits() {
    let engine = engine();
    let key = user(&engine, "ada");
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    engine.top_up("@ada", price, Some(T0_MS)).expect("top up");
    for _ in 0..10 {
        let admission = admitted(check(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS));
        assert_eq!(admission.charged_to, ChargedTo::Credits { micros: price });
        assert_eq!(admission.credits_balance_micros, Some(0));
    }
    assert_eq!(engine.credits_micros("@ada").expect("balance"), price);
    let report = engine.usage(&key, Some(T0_MS)).expect("report");
    assert_eq!(report.credits_charged_micros, 0);
}

#[test]
fn a_check_at_a_later_time_does_not_change_when_later_usage_is_released() {
    // Without the check: 1,500 used at T0 come back at T0 + 5 h + (at most) a bucket or two.
    let used_at_ms = T0_MS + 30 * SECOND_MS;
    let probe_ms = used_at_ms + FIVE_HOURS_MS + 2 * BUCKET_MS;
    let plain = engine();
    let plain_key = seated(&plain, "ada", "Starter");
    assert_eq!(m27_requests(&plain, &plain_key, 1500, used_at_ms), 1500);
    assert_eq!(m27_requests(&plain, &plain_key, 1, probe_ms), 1);

    // The same, with a check stamped four hours later before the consumes.
    let checked = engine();
    let key = seated(&checked, "ada", "Starter");
    assert!(check(
        &checked,
        &key,
        "m2.7",
        &ONE_REQUEST,
        used_at_ms + 4 * HOUR_MS
    )
    .is_admitted());
    assert_eq!(m27_requests(&checked, &key, 1500, used_at_ms), 1500);
    assert_eq!(
        m27_requests(&checked, &key, 1, probe_ms),
        1,
        "the check changed when the usage ages out"
    );
}

#[test]
fn a_check_allocates_nothing_for_a_never_used_key() {
    let engine = engine();
    let key = seated(&engine, "ada", "Max");
    assert!(check(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
    let stats = engine.memory_stats();
    assert_eq!((stats.keys_with_usage, stats.usage_bytes), (0, 0));
}

// ---- Request ids -------------------------------------------------------------------------------

#[test]
fn consume_into_and_check_into_write_what_consume_and_check_return() {
    // Twin engines take the same requests, one through the returning calls and one through
    // the writing calls with a single reused decision: quota, then credits, then a denial,
    // with and without request ids.
    let twins = [
        engine_with(two_limit_policy(true)),
        engine_with(two_limit_policy(true)),
    ];
    let keys = twins.each_ref().map(|engine| seated(engine, "ada", "Two"));
    for engine in &twins {
        engine.top_up("@ada", 1_500, Some(T0_MS)).expect("top up");
    }
    let [returning, writing] = &twins;
    // Starts as an admission, so a denial written over it must replace all of it.
    let mut decision = returning
        .check(&UsageRequest::new(&keys[0], "chat", &ONE_REQUEST).at(T0_MS))
        .expect("check");
    assert!(decision.is_admitted());
    let quantities = [(Unit::Requests, 1), (Unit::Tokens, 5)];
    let mut kinds = Vec::new();
    for step in 0..16u64 {
        let id = format!("r{}", step % 2);
        let id = (step % 3 == 0).then_some(id.as_str());
        let at_ms = T0_MS + step * MINUTE_MS;
        let asks = keys.each_ref().map(|key| {
            let request = UsageRequest::new(key, "chat", &quantities).at(at_ms);
            match id {
                Some(id) => request.id(id),
                None => request,
            }
        });
        let ask = |twin: usize| &asks[twin];
        // Ids r0 and r1 are first used at steps 0 and 3, then come back every 6 steps.
        let is_replay = id.is_some() && step >= 6;
        let checked = returning.check(ask(0)).expect("check");
        let replayed = writing
            .check_into(ask(1), &mut decision)
            .expect("check_into");
        assert_eq!(
            (decision, replayed),
            (checked, is_replay),
            "check at step {step}"
        );
        let expected = returning.consume(ask(0)).expect("consume");
        let replayed = writing
            .consume_into(ask(1), &mut decision)
            .expect("consume_into");
        assert_eq!(
            (decision, replayed),
            (expected, is_replay),
            "consume at step {step}"
        );
        kinds.push(match decision {
            tally_engine::Decision::Admitted(admission) => match admission.charged_to {
                ChargedTo::PlanQuota { .. } => "quota",
                ChargedTo::Credits { .. } => "credits",
                ChargedTo::PayAsYouGo { .. } => "payg",
            },
            tally_engine::Decision::Denied(_) => "denied",
        });
    }
    // The sequence went through every path it was meant to (steps 6, 9, 12 and 15 reuse ids).
    for kind in ["quota", "credits", "denied"] {
        assert!(kinds.contains(&kind), "no {kind} decision in {kinds:?}");
    }
    assert_eq!(
        writing.credits_micros("@ada").expect("balance"),
        returning.credits_micros("@ada").expect("balance")
    );
    assert_eq!(
        used_per_limit(returning, &keys[0]),
        used_per_limit(writing, &keys[1])
    );
    // Bad input is an error through either call and counts nothing.
    let bad = UsageRequest::new(&keys[1], "no-such-model", &ONE_REQUEST).at(T0_MS + HOUR_MS);
    let before = used_per_limit(writing, &keys[1]);
    assert!(matches!(
        writing.consume_into(&bad, &mut decision),
        Err(Error::UnknownResource { .. })
    ));
    assert_eq!(used_per_limit(writing, &keys[1]), before);
}

/// What a key of the two-limit plan has used, as the usage report says (every limit).
fn used_per_limit(engine: &Engine, key: &str) -> Vec<u64> {
    engine
        .usage(key, Some(T0_MS + HOUR_MS))
        .expect("usage")
        .limits
        .iter()
        .map(|limit| limit.used)
        .collect()
}

#[test]
fn a_repeated_request_id_returns_the_first_decision_and_counts_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let first = engine
        .consume(&request(&key, &ONE_REQUEST, T0_MS).id("req-1"))
        .expect("consume");
    assert!(first.is_admitted());
    for later_ms in [T0_MS, T0_MS + MINUTE_MS, T0_MS + HOUR_MS] {
        let again = engine
            .consume(&request(&key, &ONE_REQUEST, later_ms).id("req-1"))
            .expect("consume");
        assert_eq!(again, first);
    }
    assert_eq!(m27_used(&engine, &key, T0_MS + HOUR_MS), 1);
    // A check with the id answers from memory too.
    let checked = engine
        .check(&request(&key, &ONE_REQUEST, T0_MS + HOUR_MS).id("req-1"))
        .expect("check");
    assert_eq!(checked, first);
}

#[test]
fn a_repeated_denied_request_id_returns_the_first_denial_and_charges_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1500, T0_MS), 1500);
    let first = engine
        .consume(&request(&key, &ONE_REQUEST, T0_MS).id("late"))
        .expect("consume");
    assert!(!first.is_admitted());
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let again = engine
        .consume(&request(&key, &ONE_REQUEST, T0_MS).id("late"))
        .expect("consume");
    assert_eq!(again, first);
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 1_000_000);
}

#[test]
fn the_same_request_id_for_a_different_request_is_a_conflict_and_counts_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Max");
    let other = seated(&engine, "bob", "Max");
    engine
        .consume(&request(&key, &ONE_REQUEST, T0_MS).id("req-1"))
        .expect("consume");
    let two = [(Unit::Requests, 2)];
    let image = [(Unit::Images, 1)];
    let conflicts = [
        UsageRequest::new(&other, "m2.7", &ONE_REQUEST),
        UsageRequest::new(&key, "m2.7", &two),
        UsageRequest::new(&key, "image-01", &image),
    ];
    for conflicting in conflicts {
        let answer = engine.consume(&conflicting.at(T0_MS).id("req-1"));
        assert_eq!(
            answer,
            Err(Error::RequestIdConflict {
                request_id: "req-1".into()
            })
        );
        let checked = engine.check(&conflicting.at(T0_MS).id("req-1"));
        assert!(matches!(checked, Err(Error::RequestIdConflict { .. })));
    }
    assert_eq!(m27_used(&engine, &key, T0_MS), 1);
    assert_eq!(m27_used(&engine, &other, T0_MS), 0);
    assert_eq!(used(&engine, &key, "image-01:images", daily(), T0_MS), 0);
}

#[test]
fn a_request_id_whose_call_failed_or_was_only_checked_is_not_taken() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let bad = engine.consume(
        &UsageRequest::new(&key, "m9", &ONE_REQUEST)
            .at(T0_MS)
            .id("req-1"),
    );
    assert!(matches!(bad, Err(Error::UnknownResource { .. })));
    let checked = engine
        .check(&request(&key, &[(Unit::Requests, 7)], T0_MS).id("req-1"))
        .expect("check");
    assert!(checked.is_admitted());
    let good = engine
        .consume(&request(&key, &ONE_REQUEST, T0_MS).id("req-1"))
        .expect("the id is free");
    assert!(good.is_admitted());
    assert_eq!(m27_used(&engine, &key, T0_MS), 1);
}

// ---- The usage report --------------------------------------------------------------------------

#[test]
fn the_usage_report_shows_used_remaining_and_reset_for_every_limit_plus_credits() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    let used_at_ms = T0_MS + 2 * HOUR_MS + 10 * SECOND_MS;
    assert_eq!(m27_requests(&engine, &key, 10, used_at_ms), 10);
    assert_eq!(
        admit_count(&engine, &key, "image-01", Unit::Images, 3, used_at_ms),
        3
    );
    engine
        .top_up("@ada", 123_456, Some(used_at_ms))
        .expect("top up");

    let report = engine
        .usage(&key, Some(used_at_ms + MINUTE_MS))
        .expect("report");
    assert_eq!(report.plan.as_deref(), Some("Plus"));
    assert_eq!(report.credits_balance_micros, 123_456);
    let summary: Vec<(&str, u64, u64, u64)> = report
        .limits
        .iter()
        .map(|limit| {
            (
                limit.meter.as_str(),
                limit.amount,
                limit.used,
                limit.remaining,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("m2.7:requests", 4500, 10, 4490),
            ("speech-2.8:characters", 4000, 0, 4000),
            ("image-01:images", 50, 3, 47),
            ("music-2.6:songs", 100, 0, 100),
        ]
    );
    for limit in &report.limits {
        match limit.window {
            tally_engine::Window::Rolling { .. } => {
                let reset_ms = limit.reset_at_ms.expect("used, so it resets");
                assert!(reset_ms >= used_at_ms + FIVE_HOURS_MS);
                assert!(reset_ms <= used_at_ms + FIVE_HOURS_MS + 2 * BUCKET_MS);
            }
            _ => assert_eq!(limit.reset_at_ms, Some(T0_MS + DAY_MS), "{}", limit.name),
        }
    }
}

#[test]
fn the_usage_report_of_an_unknown_key_is_an_error() {
    let engine = engine();
    assert_eq!(
        engine.usage("nobody", Some(T0_MS)),
        Err(Error::UnknownKey {
            key: "nobody".into()
        })
    );
}

// ---- Reservations -----------------------------------------------------------------------------

fn reserve(
    engine: &Engine,
    key: &str,
    quantities: &[(Unit, u64)],
    at_ms: u64,
    lease_ms: Option<u64>,
) -> ReservationId {
    let outcome = engine
        .reserve(&request(key, quantities, at_ms), lease_ms)
        .expect("reserve");
    assert!(outcome.decision.is_admitted(), "{:?}", outcome.decision);
    outcome
        .reservation
        .expect("an admitted reservation has an id")
}

#[test]
fn a_reservation_holds_its_estimate_against_the_limits() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    reserve(&engine, &key, &[(Unit::Requests, 1000)], T0_MS, None);
    assert_eq!(m27_used(&engine, &key, T0_MS), 1000);
    assert_eq!(m27_requests(&engine, &key, 501, T0_MS), 500);
    assert_eq!(engine.open_reservations(), 1);
}

#[test]
fn settling_for_less_frees_the_rest() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let id = reserve(&engine, &key, &[(Unit::Requests, 1000)], T0_MS, None);
    let outcome = engine
        .settle(id, &[(Unit::Requests, 600)], Some(T0_MS + MINUTE_MS))
        .expect("settle");
    let SettleOutcome::Settled(settlement) = outcome else {
        panic!("expected a settlement, got {outcome:?}");
    };
    assert_eq!(settlement.released.get(Unit::Requests), 400);
    assert_eq!(settlement.extra, None);
    assert_eq!(m27_used(&engine, &key, T0_MS + MINUTE_MS), 600);
    assert_eq!(engine.open_reservations(), 0);
}

#[test]
fn settling_for_more_is_charged_only_if_the_rest_fits() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let id = reserve(&engine, &key, &[(Unit::Requests, 100)], T0_MS, None);
    let outcome = engine
        .settle(id, &[(Unit::Requests, 150)], Some(T0_MS))
        .expect("settle");
    let SettleOutcome::Settled(settlement) = outcome else {
        panic!("expected a settlement, got {outcome:?}");
    };
    let starter = plan_id(&engine, "Starter");
    assert_eq!(
        settlement.extra,
        Some(ChargedTo::PlanQuota { plan: starter })
    );
    assert_eq!(m27_used(&engine, &key, T0_MS), 150);

    // 1,250 more in use; a reservation of 100 fills the window; settling for 101 does not fit.
    assert_eq!(m27_requests(&engine, &key, 1250, T0_MS), 1250);
    let id = reserve(&engine, &key, &[(Unit::Requests, 100)], T0_MS, None);
    let outcome = engine
        .settle(id, &[(Unit::Requests, 101)], Some(T0_MS))
        .expect("settle");
    let SettleOutcome::Denied(denial) = outcome else {
        panic!("expected a denial, got {outcome:?}");
    };
    assert!(matches!(denial.reason, DenialReason::QuotaExhausted { .. }));
    assert_eq!(m27_used(&engine, &key, T0_MS), 1500, "nothing changed");
    assert_eq!(engine.open_reservations(), 1, "the reservation stays open");
    // Settling with what fits still works.
    assert!(matches!(
        engine.settle(id, &[(Unit::Requests, 100)], Some(T0_MS)),
        Ok(SettleOutcome::Settled(_))
    ));
    assert_eq!(m27_used(&engine, &key, T0_MS), 1500);
}

#[test]
fn voiding_frees_everything_and_voiding_again_is_a_no_op() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let id = reserve(&engine, &key, &[(Unit::Requests, 700)], T0_MS, None);
    engine.void(id, Some(T0_MS)).expect("void");
    assert_eq!(m27_used(&engine, &key, T0_MS), 0);
    engine.void(id, Some(T0_MS)).expect("void again");
    assert_eq!(m27_used(&engine, &key, T0_MS), 0);
    assert_eq!(
        engine.settle(id, &[(Unit::Requests, 1)], Some(T0_MS)),
        Err(Error::ReservationClosed {
            reservation: id.get(),
            state: "voided"
        })
    );
    assert_eq!(m27_requests(&engine, &key, 1501, T0_MS), 1500);
}

#[test]
fn settling_twice_with_the_same_amount_returns_the_first_settlement() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let id = reserve(&engine, &key, &[(Unit::Requests, 300)], T0_MS, None);
    let first = engine
        .settle(id, &[(Unit::Requests, 200)], Some(T0_MS))
        .expect("settle");
    let second = engine
        .settle(id, &[(Unit::Requests, 200)], Some(T0_MS))
        .expect("settle");
    assert_eq!(first, second);
    assert_eq!(m27_used(&engine, &key, T0_MS), 200);
    assert_eq!(
        engine.settle(id, &[(Unit::Requests, 250)], Some(T0_MS)),
        Err(Error::ReservationClosed {
            reservation: id.get(),
            state: "settled"
        })
    );
    assert!(matches!(
        engine.void(id, Some(T0_MS)),
        Err(Error::ReservationClosed { .. })
    ));
    assert_eq!(m27_used(&engine, &key, T0_MS), 200);
}

#[test]
fn a_settle_stamped_past_its_lease_expires_its_own_reservation_and_no_one_elses() {
    // The engine's clock stays at T0; one settle is stamped a day on.
    let engine = engine();
    let ann = seated(&engine, "ann", "Starter");
    let ben = seated(&engine, "ben", "Starter");
    let hundred = [(Unit::Requests, 100)];
    let anns = reserve(&engine, &ann, &hundred, T0_MS, None);
    let bens = reserve(&engine, &ben, &hundred, T0_MS, None);
    assert_eq!(
        engine.settle(anns, &hundred, Some(T0_MS + DAY_MS)),
        Err(Error::ReservationClosed {
            reservation: anns.get(),
            state: "expired"
        })
    );
    assert_eq!(m27_used(&engine, &ann, T0_MS), 0, "ann's hold was freed");
    // Before, the late stamp expired every lease by it: ben's too, and his work went uncharged.
    assert!(matches!(
        engine.settle(bens, &hundred, Some(T0_MS + MINUTE_MS)),
        Ok(SettleOutcome::Settled(_))
    ));
    assert_eq!(m27_used(&engine, &ben, T0_MS + MINUTE_MS), 100);
    assert_eq!(engine.open_reservations(), 0);
}

#[test]
fn a_settle_for_more_tokens_alone_charges_the_overrun_and_a_maximum_bounds_the_total() {
    let engine = engine();
    let key = seated(&engine, "ada", "Max");
    // A chat call billed by tokens: the overrun has tokens and no request of its own.
    let estimate = [(Unit::Requests, 1), (Unit::Tokens, 1_000)];
    let actual = [(Unit::Requests, 1), (Unit::Tokens, 2_000)];
    let id = reserve(&engine, &key, &estimate, T0_MS, None);
    let Ok(SettleOutcome::Settled(settlement)) = engine.settle(id, &actual, Some(T0_MS)) else {
        panic!("a settle for more tokens is charged, not refused");
    };
    assert!(settlement.extra.is_some(), "the overrun was charged");
    assert_eq!(settlement.actual.get(Unit::Tokens), 2_000);
    // A song's seconds are bounded in total (at most 300), not overrun by overrun.
    let song = [(Unit::Songs, 1), (Unit::Seconds, 200)];
    let id = reserve_music(&engine, &key, &song);
    let longer = [(Unit::Songs, 1), (Unit::Seconds, 400)];
    match engine.settle(id, &longer, Some(T0_MS)) {
        Ok(SettleOutcome::Denied(denial)) => assert!(
            matches!(
                denial.reason,
                DenialReason::OverRequestMaximum {
                    unit: Unit::Seconds,
                    maximum: 300,
                    requested: 400
                }
            ),
            "{denial:?}"
        ),
        other => panic!("{other:?}"),
    }
    // Nothing changed: it still settles within the maximum.
    assert!(matches!(
        engine.settle(id, &[(Unit::Songs, 1), (Unit::Seconds, 300)], Some(T0_MS)),
        Ok(SettleOutcome::Settled(_))
    ));
}

fn reserve_music(engine: &Engine, key: &str, quantities: &[(Unit, u64)]) -> ReservationId {
    let outcome = engine
        .reserve(
            &UsageRequest::new(key, "music-2.6", quantities).at(T0_MS),
            None,
        )
        .expect("reserve");
    assert!(outcome.decision.is_admitted(), "{:?}", outcome.decision);
    outcome.reservation.expect("an id")
}

/// Spends 60 `chat` requests under request id "r1" and holds 30 more in a reservation, at
/// `at_ms`: what the give-back tests below refund and void.
fn spend_sixty_and_hold_thirty(engine: &Engine, key: &str, at_ms: u64) -> ReservationId {
    let sixty = [(Unit::Requests, 60)];
    let first = engine
        .consume(&UsageRequest::new(key, "chat", &sixty).at(at_ms).id("r1"))
        .expect("consume");
    assert!(first.is_admitted());
    engine
        .reserve(
            &UsageRequest::new(key, "chat", &[(Unit::Requests, 30)]).at(at_ms),
            None,
        )
        .expect("reserve")
        .reservation
        .expect("admitted")
}

#[test]
fn a_refund_and_a_void_after_a_seat_change_to_other_buckets_give_back_where_the_usage_went() {
    // Two plans whose 5-hour limits differ in bucket width: the seat change moves the usage to
    // the other plan's counter, re-bucketed. Before, a refund or void looked for the receipt's
    // counter, found none, and gave back nothing (the refund marked done, the hold kept).
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.A]
limits = [{ resource = "chat", unit = "requests", amount = 100, window = "rolling:5h", bucket = "10m" }]
[plans.B]
limits = [{ resource = "chat", unit = "requests", amount = 200, window = "rolling:5h", bucket = "12m" }]
"#,
    )
    .expect("a valid policy");
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "A");
    let at_ms = T0_MS + 37 * MINUTE_MS;
    let held = spend_sixty_and_hold_thirty(&engine, &key, at_ms);
    engine
        .assign_seat(&team_of("ada"), "ada", "B", Some(at_ms))
        .expect("seat");
    let used = |at_ms| engine.usage(&key, Some(at_ms)).expect("report").limits[0].used;
    assert_eq!(used(at_ms), 90, "usage carried to B");
    let refund = engine.refund("r1", Some(at_ms)).expect("refund");
    assert_eq!(refund.given_back.total(), 60);
    engine.void(held, Some(at_ms)).expect("void");
    assert_eq!(used(at_ms), 0);
}

/// A policy of one resource and one plan, A, with one 5-hour limit of `amount` requests in
/// buckets of `bucket`.
fn five_hour_chat_plan(amount: u64, bucket: &str) -> Policy {
    Policy::from_toml_str(&format!(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.A]
limits = [{{ resource = "chat", unit = "requests", amount = {amount}, window = "rolling:5h", bucket = "{bucket}" }}]
"#
    ))
    .expect("a valid policy")
}

#[test]
fn a_refund_and_a_void_after_two_swaps_of_the_bucket_width_give_back_where_the_usage_went() {
    // Each swap re-buckets the usage to the bucket holding its old bucket's last instant: a
    // 10-minute bucket [40, 50) goes to the 12-minute [48, 60), then to the 10-minute [50, 60).
    // Before, a give-back mapped the receipt's bucket straight to the current width ([40, 50)),
    // found nothing there and gave back nothing.
    let policy_with = |bucket: &str| five_hour_chat_plan(100, bucket);
    let engine = engine_with(policy_with("10m"));
    let key = seated(&engine, "ada", "A");
    assert_eq!(T0_MS % HOUR_MS, 0, "the buckets below start on the hour");
    let at_ms = T0_MS + 40 * MINUTE_MS;
    let held = spend_sixty_and_hold_thirty(&engine, &key, at_ms);
    for (bucket, minutes) in [("12m", 41), ("10m", 42)] {
        engine
            .swap_policy(policy_with(bucket), Some(T0_MS + minutes * MINUTE_MS))
            .expect("swap");
    }
    let now_ms = T0_MS + 43 * MINUTE_MS;
    let used = |at_ms| engine.usage(&key, Some(at_ms)).expect("report").limits[0].used;
    assert_eq!(used(now_ms), 90, "usage carried through both swaps");
    let refund = engine.refund("r1", Some(now_ms)).expect("refund");
    assert_eq!(refund.given_back.total(), 60);
    engine.void(held, Some(now_ms)).expect("void");
    assert_eq!(used(now_ms), 0);
    assert_eq!(
        used(at_ms + FIVE_HOURS_MS + 20 * MINUTE_MS),
        0,
        "nothing taken back later either"
    );
}

#[test]
fn an_unknown_reservation_is_an_error() {
    let engine = engine();
    let id = ReservationId(NonZeroU64::new(42).expect("non-zero"));
    assert_eq!(
        engine.void(id, Some(T0_MS)),
        Err(Error::UnknownReservation { reservation: 42 })
    );
    assert_eq!(
        engine.settle(id, &ONE_REQUEST, Some(T0_MS)),
        Err(Error::UnknownReservation { reservation: 42 })
    );
}

#[test]
fn a_reservation_left_open_by_a_crashed_gateway_expires_and_leaks_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let lease_ms = 90 * SECOND_MS;
    reserve(
        &engine,
        &key,
        &[(Unit::Requests, 1500)],
        T0_MS,
        Some(lease_ms),
    );
    // Beyond the quota, a second reservation is held in credits.
    let estimate = [(Unit::Requests, 10)];
    reserve(&engine, &key, &estimate, T0_MS, Some(lease_ms));
    let price = price_micros(&engine, "m2.7", &estimate);
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        1_000_000 - price
    );

    assert_eq!(
        engine.expire_reservations(Some(T0_MS + lease_ms - 1)),
        Ok(0)
    );
    assert_eq!(engine.expire_reservations(Some(T0_MS + lease_ms)), Ok(2));
    assert_eq!(m27_used(&engine, &key, T0_MS + lease_ms), 0);
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 1_000_000);
    assert_eq!(engine.open_reservations(), 0);
    assert_eq!(
        engine
            .usage(&key, Some(T0_MS + lease_ms))
            .expect("report")
            .open_reservations,
        0
    );
}

#[test]
fn a_new_reservation_expires_the_overdue_ones_first() {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Starter");
    reserve(
        &engine,
        &key,
        &[(Unit::Requests, 1500)],
        T0_MS,
        Some(MINUTE_MS),
    );
    // `reserve` expires the leases that ended by the engine's clock (a request stamped ahead of
    // it must not expire anyone's reservation), so the clock moves with the stamps here.
    let later_ms = clock.advance_ms(MINUTE_MS);
    reserve(&engine, &key, &[(Unit::Requests, 1500)], later_ms, None);
    assert_eq!(m27_used(&engine, &key, later_ms), 1500);
    assert_eq!(engine.open_reservations(), 1);
}

#[test]
fn settling_after_the_lease_ended_leaks_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let lease_ms = MINUTE_MS;
    let held = reserve(
        &engine,
        &key,
        &[(Unit::Requests, 1000)],
        T0_MS,
        Some(lease_ms),
    );
    assert_eq!(m27_requests(&engine, &key, 500, T0_MS), 500);
    let estimate = [(Unit::Requests, 10)];
    let in_credits = reserve(&engine, &key, &estimate, T0_MS, Some(lease_ms));

    let late_ms = T0_MS + lease_ms + SECOND_MS;
    for id in [held, in_credits] {
        assert_eq!(
            engine.settle(id, &ONE_REQUEST, Some(late_ms)),
            Err(Error::ReservationClosed {
                reservation: id.get(),
                state: "expired"
            })
        );
    }
    assert_eq!(engine.open_reservations(), 0);
    assert_eq!(
        m27_used(&engine, &key, late_ms),
        500,
        "the 1,000 held must come back"
    );
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 1_000_000);
}

#[test]
fn a_reservation_held_in_credits_settles_for_less_and_refunds_the_rest() {
    let engine = engine();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let estimate = [(Unit::Requests, 10), (Unit::Tokens, 10_000)];
    let id = reserve(&engine, &key, &estimate, T0_MS, None);
    let actual = [(Unit::Requests, 4), (Unit::Tokens, 2_500)];
    let outcome = engine.settle(id, &actual, Some(T0_MS)).expect("settle");
    let SettleOutcome::Settled(settlement) = outcome else {
        panic!("expected a settlement, got {outcome:?}");
    };
    assert_eq!(
        settlement.held,
        ChargedTo::Credits {
            micros: price_micros(&engine, "m2.7", &estimate)
        }
    );
    let actual_price = price_micros(&engine, "m2.7", &actual);
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        1_000_000 - actual_price
    );
}

#[test]
fn a_reservation_request_may_not_carry_a_request_id_or_a_bad_lease() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let with_id = engine.reserve(&request(&key, &ONE_REQUEST, T0_MS).id("r"), None);
    assert!(matches!(
        with_id,
        Err(Error::InvalidArgument {
            field: "request_id",
            ..
        })
    ));
    for lease_ms in [0, DAY_MS + 1] {
        let bad = engine.reserve(&request(&key, &ONE_REQUEST, T0_MS), Some(lease_ms));
        assert!(
            matches!(
                bad,
                Err(Error::InvalidArgument {
                    field: "lease_ms",
                    ..
                })
            ),
            "{bad:?}"
        );
    }
    assert_eq!(m27_used(&engine, &key, T0_MS), 0);
    assert_eq!(engine.open_reservations(), 0);
}

// ---- Refunds ----------------------------------------------------------------------------------

#[test]
fn a_refund_by_request_id_gives_the_quota_back_and_a_second_refund_is_an_error() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1400, T0_MS), 1400);
    let hundred = [(Unit::Requests, 100)];
    assert!(engine
        .consume(&request(&key, &hundred, T0_MS).id("batch-7"))
        .expect("consume")
        .is_admitted());
    assert_eq!(m27_requests(&engine, &key, 1, T0_MS), 0);

    let refund = engine
        .refund("batch-7", Some(T0_MS + MINUTE_MS))
        .expect("refund");
    let starter = plan_id(&engine, "Starter");
    assert_eq!(refund.charged_to, ChargedTo::PlanQuota { plan: starter });
    assert_eq!(refund.given_back.total(), 100);
    assert_eq!(m27_used(&engine, &key, T0_MS + MINUTE_MS), 1400);

    let again = engine.refund("batch-7", Some(T0_MS + MINUTE_MS));
    assert!(
        matches!(
            again,
            Err(Error::InvalidArgument {
                field: "request_id",
                ..
            })
        ),
        "{again:?}"
    );
    assert_eq!(m27_used(&engine, &key, T0_MS + MINUTE_MS), 1400);
    assert_eq!(m27_requests(&engine, &key, 101, T0_MS + MINUTE_MS), 100);
}

#[test]
fn a_refund_of_a_request_paid_with_credits_gives_the_credits_back() {
    let engine = engine();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let song = [(Unit::Songs, 1), (Unit::Seconds, 240)];
    let paid = engine
        .consume(
            &UsageRequest::new(&key, "music-2.6", &song)
                .at(T0_MS)
                .id("song-1"),
        )
        .expect("consume");
    let price = price_micros(&engine, "music-2.6", &song);
    assert_eq!(
        admitted(paid).charged_to,
        ChargedTo::Credits { micros: price }
    );
    let refund = engine.refund("song-1", Some(T0_MS)).expect("refund");
    assert_eq!(refund.given_back.total(), price);
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 1_000_000);
    assert_eq!(
        engine
            .usage(&key, Some(T0_MS))
            .expect("report")
            .credits_charged_micros,
        0
    );
}

#[test]
fn a_refund_of_a_pay_as_you_go_request_takes_back_the_spend() {
    let engine = engine();
    user(&engine, "ada");
    engine
        .create_payg_key("ada", "payg-ada", Some(T0_MS))
        .expect("payg key");
    assert!(engine
        .consume(&request("payg-ada", &ONE_REQUEST, T0_MS).id("p-1"))
        .expect("consume")
        .is_admitted());
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    assert_eq!(
        engine
            .usage("payg-ada", Some(T0_MS))
            .expect("report")
            .payg_micros,
        price
    );
    assert_eq!(
        engine
            .refund("p-1", Some(T0_MS))
            .expect("refund")
            .given_back
            .total(),
        price
    );
    assert_eq!(
        engine
            .usage("payg-ada", Some(T0_MS))
            .expect("report")
            .payg_micros,
        0
    );
}

#[test]
fn refunding_a_denied_or_unknown_request_is_an_error() {
    let engine = engine();
    let key = user(&engine, "ada");
    let denied_decision = engine
        .consume(&request(&key, &ONE_REQUEST, T0_MS).id("no"))
        .expect("consume");
    assert!(!denied_decision.is_admitted());
    assert!(matches!(
        engine.refund("no", Some(T0_MS)),
        Err(Error::InvalidArgument {
            field: "request_id",
            ..
        })
    ));
    assert_eq!(
        engine.refund("never-seen", Some(T0_MS)),
        Err(Error::UnknownRequest {
            request_id: "never-seen".into(),
            horizon_ms: engine.policy().longest_window_ms(),
        })
    );
}

#[test]
fn a_refund_after_the_usage_aged_out_gives_nothing_back_and_takes_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let ten = [(Unit::Requests, 10)];
    assert!(engine
        .consume(&request(&key, &ten, T0_MS).id("old"))
        .expect("consume")
        .is_admitted());
    let later_ms = T0_MS + FIVE_HOURS_MS + 2 * BUCKET_MS;
    assert_eq!(m27_requests(&engine, &key, 5, later_ms), 5);
    let refund = engine.refund("old", Some(later_ms)).expect("refund");
    assert_eq!(refund.given_back.total(), 0);
    assert_eq!(m27_used(&engine, &key, later_ms), 5);
}

/// What a refund gives back is decided at the refund's own time, not by whether some request
/// moved the window since: otherwise a refused request (which moves a rolling window and is
/// never logged) would decide it, and a reopened engine would give back what the engine that
/// never closed had let age out.
#[test]
fn a_refund_gives_nothing_back_from_windows_that_aged_out_or_reset_by_its_time() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    let ten = [(Unit::Requests, 10)];
    let two_images = [(Unit::Images, 2)];
    for (resource, quantities, id) in [("m2.7", &ten[..], "chat"), ("image-01", &two_images, "pic")]
    {
        let decision = engine
            .consume(
                &UsageRequest::new(&key, resource, quantities)
                    .at(T0_MS)
                    .id(id),
            )
            .expect("consume");
        assert!(decision.is_admitted(), "{decision:?}");
    }
    // Within the window and the day, a refund gives everything back...
    let within = engine
        .refund("chat", Some(T0_MS + HOUR_MS))
        .expect("refund");
    assert_eq!(within.given_back.total(), 10);
    let chat_again = engine
        .consume(&request(&key, &ten, T0_MS + HOUR_MS).id("chat-2"))
        .expect("consume");
    assert!(chat_again.is_admitted());
    // ... and past it, nothing, though no request has touched the key since.
    let aged_ms = T0_MS + HOUR_MS + FIVE_HOURS_MS + 2 * BUCKET_MS;
    let aged = engine.refund("chat-2", Some(aged_ms)).expect("refund");
    assert_eq!(aged.given_back.counters, vec![]);
    let next_day_ms = T0_MS + DAY_MS;
    let reset = engine.refund("pic", Some(next_day_ms)).expect("refund");
    assert_eq!(reset.given_back.counters, vec![]);
    assert_eq!(m27_used(&engine, &key, aged_ms), 0);
    assert_eq!(
        used(&engine, &key, "image-01:images", daily(), next_day_ms),
        0
    );
    // The windows count new usage from zero.
    assert_eq!(m27_requests(&engine, &key, 4500, next_day_ms), 4500);
}

// ---- Usage corrections --------------------------------------------------------------------------

#[test]
fn adding_usage_counts_it_whatever_the_limit_and_removing_gives_it_back() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let at_ms = T0_MS + HOUR_MS;
    assert_eq!(m27_requests(&engine, &key, 1490, at_ms), 1490);
    let added = engine
        .adjust_usage(
            &key,
            "m2.7",
            &[(Unit::Requests, 30)],
            at_ms,
            AdjustmentDirection::Add,
            Some(at_ms + MINUTE_MS),
        )
        .expect("add");
    assert_eq!(
        added.limits,
        vec![AdjustedLimit {
            index: 0,
            name: "m2.7:requests per rolling:5h".to_string(),
            moved: 30
        }]
    );
    let report = limit(
        &engine,
        &key,
        "m2.7:requests",
        five_hours(),
        at_ms + MINUTE_MS,
    );
    assert_eq!((report.used, report.remaining), (1520, 0));

    let removed = engine
        .adjust_usage(
            &key,
            "m2.7",
            &[(Unit::Requests, 50)],
            at_ms,
            AdjustmentDirection::Remove,
            Some(at_ms + MINUTE_MS),
        )
        .expect("remove");
    assert_eq!(removed.limits[0].moved, 50);
    assert_eq!(m27_used(&engine, &key, at_ms + MINUTE_MS), 1470);
    assert_eq!(m27_requests(&engine, &key, 31, at_ms + MINUTE_MS), 30);
}

/// Usage added past the limit, in minute buckets of up to 60,000, then a swap to 10-minute
/// buckets: each new bucket holds the sum of ten old ones, more than a 16-bit slot can. The
/// swap makes the ring wide rather than clamp, so it all counts and all of it ages out. Before,
/// each merged bucket was clamped at 65,535 while the window's total kept the full sum: the
/// difference never aged out, and the key stayed denied for good (a debug build panicked).
#[test]
fn a_swap_to_wider_buckets_keeps_merged_buckets_past_sixteen_bits_whole() {
    let policy_with = |bucket: &str| five_hour_chat_plan(60_000, bucket);
    let engine = engine_with(policy_with("1m"));
    let key = seated(&engine, "ada", "A");
    let at_ms = T0_MS + HOUR_MS;
    for minute in 0..10 {
        engine
            .adjust_usage(
                &key,
                "chat",
                &[(Unit::Requests, 50_000)],
                at_ms + minute * MINUTE_MS,
                AdjustmentDirection::Add,
                Some(at_ms + 10 * MINUTE_MS),
            )
            .expect("add");
    }
    let used = |at_ms| engine.usage(&key, Some(at_ms)).expect("report").limits[0].used;
    assert_eq!(used(at_ms + 10 * MINUTE_MS), 500_000);
    engine
        .swap_policy(policy_with("10m"), Some(at_ms + 11 * MINUTE_MS))
        .expect("swap");
    assert_eq!(used(at_ms + 11 * MINUTE_MS), 500_000);
    // The units of [1:00, 1:10) leave when that bucket does, five hours on: all of them.
    let gone_ms = at_ms + FIVE_HOURS_MS + 10 * MINUTE_MS;
    assert_eq!(used(gone_ms - 1), 500_000);
    assert_eq!(used(gone_ms), 0);
    let request = UsageRequest::new(&key, "chat", &[(Unit::Requests, 60_000)]).at(gone_ms);
    assert!(engine.consume(&request).expect("consume").is_admitted());
}

/// The same past 32 bits: two minute buckets each holding a wide slot's most (`u32::MAX`,
/// usage added past a limit of 4,000,000,000), merged by a swap into one 10-minute bucket. A
/// slot counts no more than that, so the merged bucket keeps `u32::MAX`, the window stays full
/// until it ages out and nothing is left after. Before, the slot was clamped while the total
/// kept the whole sum: `u32::MAX` never aged out and the key was denied for good (a debug
/// build panicked in the swap).
#[test]
fn a_swap_merging_full_wide_buckets_leaves_nothing_counted_once_they_age_out() {
    let most = u64::from(u32::MAX);
    let policy_with = |bucket: &str| five_hour_chat_plan(4_000_000_000, bucket);
    let engine = engine_with(policy_with("1m"));
    let key = seated(&engine, "ada", "A");
    let at_ms = T0_MS + HOUR_MS;
    for minute in 0..2 {
        engine
            .adjust_usage(
                &key,
                "chat",
                &[(Unit::Requests, most)],
                at_ms + minute * MINUTE_MS,
                AdjustmentDirection::Add,
                Some(at_ms + 2 * MINUTE_MS),
            )
            .expect("add");
    }
    let used = |at_ms| engine.usage(&key, Some(at_ms)).expect("report").limits[0].used;
    assert_eq!(used(at_ms + 2 * MINUTE_MS), 2 * most);
    engine
        .swap_policy(policy_with("10m"), Some(at_ms + 3 * MINUTE_MS))
        .expect("swap");
    let gone_ms = at_ms + FIVE_HOURS_MS + 10 * MINUTE_MS;
    assert!(
        used(gone_ms - 1) >= 4_000_000_000,
        "full until the bucket ages out"
    );
    assert_eq!(used(gone_ms), 0);
    let request = UsageRequest::new(&key, "chat", &[(Unit::Requests, 1)]).at(gone_ms);
    assert!(engine.consume(&request).expect("consume").is_admitted());
}

#[test]
fn added_usage_ages_out_five_hours_after_it_happened() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let happened_ms = T0_MS + 30 * SECOND_MS;
    let noticed_ms = happened_ms + 3 * HOUR_MS;
    engine
        .adjust_usage(
            &key,
            "m2.7",
            &[(Unit::Requests, 1500)],
            happened_ms,
            AdjustmentDirection::Add,
            Some(noticed_ms),
        )
        .expect("add");
    assert_eq!(m27_requests(&engine, &key, 1, noticed_ms), 0);
    assert_eq!(
        m27_requests(&engine, &key, 1, happened_ms + FIVE_HOURS_MS - 1),
        0
    );
    let back_ms = happened_ms + FIVE_HOURS_MS + 2 * BUCKET_MS;
    assert_eq!(m27_used(&engine, &key, back_ms), 0);
}

#[test]
fn corrections_of_usage_whose_window_has_passed_move_nothing() {
    let (engine, clock) = engine_on_clock();
    let key = seated(&engine, "ada", "Plus");
    let now_ms = T0_MS + DAY_MS + HOUR_MS;
    clock.set_ms(now_ms);
    let rolling = engine
        .adjust_usage(
            &key,
            "m2.7",
            &ONE_REQUEST,
            now_ms - 6 * HOUR_MS,
            AdjustmentDirection::Add,
            Some(now_ms),
        )
        .expect("add");
    assert_eq!(rolling.limits[0].moved, 0);
    let daily_quota = engine
        .adjust_usage(
            &key,
            "image-01",
            &[(Unit::Images, 5)],
            T0_MS + HOUR_MS,
            AdjustmentDirection::Add,
            Some(now_ms),
        )
        .expect("add");
    assert_eq!(daily_quota.limits[0].moved, 0);
    assert_eq!(m27_used(&engine, &key, now_ms), 0);
    assert_eq!(used(&engine, &key, "image-01:images", daily(), now_ms), 0);
    // The same day's daily usage does move.
    let today = engine
        .adjust_usage(
            &key,
            "image-01",
            &[(Unit::Images, 5)],
            now_ms - MINUTE_MS,
            AdjustmentDirection::Add,
            Some(now_ms),
        )
        .expect("add");
    assert_eq!(today.limits[0].moved, 5);
    assert_eq!(used(&engine, &key, "image-01:images", daily(), now_ms), 5);
}

#[test]
fn a_correction_dated_in_the_future_is_an_error_and_changes_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let future = engine.adjust_usage(
        &key,
        "m2.7",
        &ONE_REQUEST,
        T0_MS + 1,
        AdjustmentDirection::Add,
        Some(T0_MS),
    );
    assert!(
        matches!(
            future,
            Err(Error::InvalidArgument {
                field: "usage_at_ms",
                ..
            })
        ),
        "{future:?}"
    );
    assert_eq!(m27_used(&engine, &key, T0_MS), 0);
}

// ---- Policy swaps -------------------------------------------------------------------------------

#[test]
fn a_policy_swap_keeps_usage_so_1500_used_of_a_new_2000_leaves_500() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1500, T0_MS), 1500);
    assert_eq!(TOKEN_PLAN_TOML.matches("amount = 1500,").count(), 1);
    let bigger =
        Policy::from_toml_str(&TOKEN_PLAN_TOML.replace("amount = 1500,", "amount = 2000,"))
            .expect("a valid policy");
    engine
        .swap_policy(bigger, Some(T0_MS + MINUTE_MS))
        .expect("swap");
    let report = limit(
        &engine,
        &key,
        "m2.7:requests",
        five_hours(),
        T0_MS + MINUTE_MS,
    );
    assert_eq!(
        (report.amount, report.used, report.remaining),
        (2000, 1500, 500)
    );
    assert_eq!(m27_requests(&engine, &key, 501, T0_MS + MINUTE_MS), 500);
}

#[test]
fn a_refund_after_a_policy_swap_gives_back_to_the_carried_window() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let hundred = [(Unit::Requests, 100)];
    assert!(engine
        .consume(&request(&key, &hundred, T0_MS).id("before-swap"))
        .expect("consume")
        .is_admitted());
    let bigger =
        Policy::from_toml_str(&TOKEN_PLAN_TOML.replace("amount = 1500,", "amount = 2000,"))
            .expect("a valid policy");
    engine.swap_policy(bigger, Some(T0_MS)).expect("swap");
    assert_eq!(
        engine
            .refund("before-swap", Some(T0_MS))
            .expect("refund")
            .given_back
            .total(),
        100
    );
    assert_eq!(m27_used(&engine, &key, T0_MS), 0);
}

/// What a decision names, by name under `policy`: its plan, the plan of a plan-quota charge, its
/// limits' names, the limit a denial names, the upgrade it suggests (`?` for a number the
/// policy has no such thing at).
fn named(policy: &Policy, decision: &Decision) -> Vec<String> {
    let plan_name = |plan: tally_engine::PlanId| {
        policy
            .plans()
            .get(plan.index())
            .map_or("?".to_string(), |plan| plan.name.to_string())
    };
    let limit_name = |plan: Option<tally_engine::PlanId>, limit: u8| {
        plan.and_then(|plan| policy.plans().get(plan.index()))
            .and_then(|plan| plan.limits.get(usize::from(limit)))
            .map_or("?".to_string(), |limit| limit.name.to_string())
    };
    let (plan, statuses, mut names) = match decision {
        Decision::Admitted(admission) => {
            let charged = match admission.charged_to {
                ChargedTo::PlanQuota { plan } => format!("charged to {}", plan_name(plan)),
                other => format!("{other:?}"),
            };
            (admission.plan, admission.limits, vec![charged])
        }
        Decision::Denied(denial) => {
            let reason = match denial.reason {
                DenialReason::QuotaExhausted { limit, .. }
                | DenialReason::ExceedsLimit { limit, .. } => {
                    format!("denied on {}", limit_name(denial.plan, limit))
                }
                other => format!("{other:?}"),
            };
            let upgrade = denial.remedies.upgrade_to.map(plan_name);
            (
                denial.plan,
                denial.limits,
                vec![reason, format!("upgrade {upgrade:?}")],
            )
        }
    };
    names.push(format!("plan {:?}", plan.map(plan_name)));
    for status in statuses.as_slice() {
        names.push(format!(
            "{} {}/{}",
            limit_name(plan, status.limit),
            status.used,
            status.amount
        ));
    }
    names
}

#[test]
fn a_request_ids_repeat_after_a_policy_swap_names_what_the_first_decision_named() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let first = |id: &str| {
        engine
            .consume(&request(&key, &ONE_REQUEST, T0_MS).id(id))
            .expect("consume")
    };
    let admitted = first("admitted");
    assert!(admitted.is_admitted());
    assert_eq!(m27_requests(&engine, &key, 1_500, T0_MS), 1_499);
    let denied = first("denied");
    assert!(matches!(
        denied,
        Decision::Denied(denial) if matches!(denial.reason, DenialReason::QuotaExhausted { .. })
    ));
    let before = engine.policy();
    let named_before = [named(&before, &admitted), named(&before, &denied)];
    assert!(
        named_before[1].iter().any(|name| name.contains("Plus")),
        "{named_before:?}"
    );

    // A plan named before every other: every plan's number moves by one.
    let mut document = before.document().clone();
    let starter = document.plans["Starter"].clone();
    document.plans.insert("Aardvark".into(), starter);
    let renumbered = Policy::compile(document).expect("a valid policy");
    assert_ne!(renumbered.plan_id("Starter"), before.plan_id("Starter"));
    engine.swap_policy(renumbered, Some(T0_MS)).expect("swap");
    let now = engine.policy();
    for (decision, named_first) in [first("admitted"), first("denied")]
        .iter()
        .zip(&named_before)
    {
        assert_eq!(&named(&now, decision), named_first);
    }

    // A policy without the key's plan (its seat given up first): what it no longer has is
    // left out, never named as something else.
    engine
        .unassign_seat(&team_of("ada"), "ada", Some(T0_MS))
        .expect("unassign");
    let mut document = now.document().clone();
    assert!(document.plans.remove("Starter").is_some());
    engine
        .swap_policy(
            Policy::compile(document).expect("a valid policy"),
            Some(T0_MS),
        )
        .expect("swap");
    let without = engine.policy();
    let admitted_again = first("admitted");
    assert_eq!(
        named(&without, &admitted_again),
        vec!["charged to ?".to_string(), "plan None".to_string()]
    );
    assert!(matches!(
        admitted_again,
        Decision::Admitted(admission)
            if admission.charged_to == ChargedTo::PlanQuota { plan: tally_engine::GONE_PLAN }
    ));
    let denied_again = first("denied");
    assert_eq!(named(&without, &denied_again)[0], "denied on ?");
    assert_eq!(named(&without, &denied_again)[2], "plan None");
}

/// The plan a settlement names, in the policy in force when it is read.
fn settlement_plans(engine: &Engine, settlement: &tally_engine::Settlement) -> Vec<String> {
    let policy = engine.policy();
    let name = |charged: ChargedTo| match charged {
        ChargedTo::PlanQuota { plan } => policy
            .plans()
            .get(plan.index())
            .map_or("?".to_string(), |plan| plan.name.to_string()),
        other => format!("{other:?}"),
    };
    let mut names = vec![name(settlement.held)];
    names.extend(settlement.extra.map(name));
    names
}

/// A policy like `policy` with a plan `first` named before every other: every plan's number
/// moves by one.
fn with_a_plan_first(policy: &Policy, first: &str) -> Policy {
    let mut document = policy.document().clone();
    let starter = document.plans["Starter"].clone();
    assert!(document.plans.insert(first.into(), starter).is_none());
    Policy::compile(document).expect("a valid policy")
}

/// A settle after a policy swap that renumbered the plans said the estimate was held on the
/// plan whose number the reservation's plan had before the swap (Plus held, Plus-Highspeed
/// named beside its extra's Plus), and a settlement repeated after such a swap still named
/// the plans by their old numbers; as a request id's repeat does, it names them as it did.
#[test]
fn a_settlement_names_the_plan_held_on_after_a_policy_swap_renumbers_the_plans() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    let estimate = [(Unit::Requests, 10)];
    let reserved = engine
        .reserve(&request(&key, &estimate, T0_MS), None)
        .expect("reserve");
    assert!(reserved.decision.is_admitted());
    let id = reserved.reservation.expect("an id");

    let renumbered = with_a_plan_first(&engine.policy(), "Aardvark");
    assert_ne!(renumbered.plan_id("Plus"), engine.policy().plan_id("Plus"));
    engine.swap_policy(renumbered, Some(T0_MS)).expect("swap");
    let actual = [(Unit::Requests, 12)];
    let SettleOutcome::Settled(settlement) =
        engine.settle(id, &actual, Some(T0_MS)).expect("settle")
    else {
        panic!("a settle for two more within the plan was refused");
    };
    assert_eq!(settlement_plans(&engine, &settlement), ["Plus", "Plus"]);

    let renumbered = with_a_plan_first(&engine.policy(), "Aaa");
    assert_ne!(renumbered.plan_id("Plus"), engine.policy().plan_id("Plus"));
    engine.swap_policy(renumbered, Some(T0_MS)).expect("swap");
    let SettleOutcome::Settled(again) = engine.settle(id, &actual, Some(T0_MS)).expect("settle")
    else {
        panic!("a repeated settle was refused");
    };
    assert_eq!(settlement_plans(&engine, &again), ["Plus", "Plus"]);
}

#[test]
fn a_policy_swap_that_drops_a_seated_plan_is_refused_and_changes_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1000, T0_MS), 1000);
    let mut document = Policy::token_plan().document().clone();
    assert!(document.plans.remove("Starter").is_some());
    let without_starter = Policy::compile(document).expect("a valid policy");
    let before = engine.usage(&key, Some(T0_MS)).expect("report");

    let refused = engine.swap_policy(without_starter, Some(T0_MS));
    assert!(
        matches!(
            refused,
            Err(Error::InvalidArgument {
                field: "policy",
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(refused
        .expect_err("refused")
        .to_string()
        .contains("Starter"));
    assert!(engine.policy().plan_id("Starter").is_some());
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), before);
    assert_eq!(m27_requests(&engine, &key, 501, T0_MS), 500);
}

/// A swap whose usage could not carry over as it means is refused, naming the field of the
/// new policy, and changes nothing: a time zone changed under daily windows (the current
/// day's count would be read as another day's: from Shanghai to Los Angeles, 50 images used
/// on one day were admitted again the same day), and a meter kept by name that counts
/// another unit (10 requests read as 10 tokens).
#[test]
fn a_policy_swap_that_cannot_carry_usage_as_it_means_is_refused_and_changes_nothing() {
    let engine = engine();
    let key = seated(&engine, "ada", "Plus");
    let images =
        |count: u64, at_ms: u64| admit_count(&engine, &key, "image-01", Unit::Images, count, at_ms);
    assert_eq!(images(50, T0_MS), 50, "Plus: 50 images a day");
    let mut document = Policy::token_plan().document().clone();
    document.time_zone = "America/Los_Angeles".into();
    let elsewhere = Policy::compile(document).expect("a valid policy");
    let before = engine.usage(&key, Some(T0_MS)).expect("report");
    let refused = engine
        .swap_policy(elsewhere, Some(T0_MS + MINUTE_MS))
        .expect_err("refused");
    match &refused {
        Error::Policy(error) => {
            assert_eq!(error.field, "time_zone");
            assert!(error.problem.contains("America/Los_Angeles"), "{refused}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(engine.policy().calendar().time_zone(), "Asia/Shanghai");
    assert_eq!(engine.usage(&key, Some(T0_MS)).expect("report"), before);
    assert_eq!(images(1, T0_MS + 2 * MINUTE_MS), 0, "still used up");
    // Another name for the same zone is no change: the swap carries the day's count.
    let mut document = Policy::token_plan().document().clone();
    document.time_zone = "PRC".into();
    engine
        .swap_policy(
            Policy::compile(document).expect("valid"),
            Some(T0_MS + 3 * MINUTE_MS),
        )
        .expect("an alias of Asia/Shanghai");
    assert_eq!(images(1, T0_MS + 4 * MINUTE_MS), 0, "still used up");

    let quota = |unit: &str| {
        Policy::from_toml_str(&format!(
            r#"
            time_zone = "UTC"
            [resources.chat]
            units = ["requests", "tokens"]
            [meters.quota]
            resource = "chat"
            unit = "{unit}"
            [plans.P]
            limits = [{{ meter = "quota", amount = 10, window = "daily" }}]
            "#
        ))
        .expect("a valid policy")
    };
    let engine = engine_with(quota("requests"));
    let key = seated(&engine, "bob", "P");
    assert_eq!(
        admit_count(&engine, &key, "chat", Unit::Requests, 10, T0_MS),
        10
    );
    let refused = engine
        .swap_policy(quota("tokens"), Some(T0_MS))
        .expect_err("refused");
    match &refused {
        Error::Policy(error) => {
            assert_eq!(error.field, "meters.\"quota\"");
            assert!(error.problem.contains("\"chat\" tokens"), "{refused}");
            assert!(error.problem.contains("\"chat\" requests"), "{refused}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        admit_count(&engine, &key, "chat", Unit::Requests, 1, T0_MS),
        0
    );
    // The same meter, the same unit, another amount: carried.
    let mut bigger = quota("requests").document().clone();
    bigger.plans.get_mut("P").unwrap().limits[0].amount = 15;
    engine
        .swap_policy(Policy::compile(bigger).unwrap(), Some(T0_MS))
        .expect("swap");
    assert_eq!(
        admit_count(&engine, &key, "chat", Unit::Requests, 10, T0_MS),
        5
    );
}

/// A denial on a rolling limit suggests the plan with the next larger amount on the same meter
/// and span even where that plan's buckets are wider: no upgrade was suggested, though the seat
/// change it names carries the count (re-bucketed) and admits the request.
#[test]
fn a_denial_suggests_a_bigger_plan_whose_buckets_are_wider() {
    let policy = Policy::from_toml_str(
        r#"
        time_zone = "UTC"
        [resources.chat]
        units = ["requests"]
        [plans.Small]
        limits = [{ resource = "chat", unit = "requests", amount = 10, window = "rolling:5h", bucket = "60s" }]
        [plans.Big]
        limits = [{ resource = "chat", unit = "requests", amount = 100, window = "rolling:5h", bucket = "120s" }]
        "#,
    )
    .expect("a valid policy");
    let big = policy.plan_id("Big");
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "Small");
    assert_eq!(
        admit_count(&engine, &key, "chat", Unit::Requests, 10, T0_MS),
        10
    );
    match consume(&engine, &key, "chat", &ONE_REQUEST, T0_MS) {
        Decision::Denied(denial) => assert_eq!(denial.remedies.upgrade_to, big, "{denial:?}"),
        other => panic!("{other:?}"),
    }
    engine
        .assign_seat(&team_of("ada"), "ada", "Big", Some(T0_MS))
        .expect("upgrade");
    assert_eq!(
        admit_count(&engine, &key, "chat", Unit::Requests, 91, T0_MS),
        90
    );
}

/// A usage bar keeps its count across a swap that changes its prices, even from a single
/// unit priced 1 (which compiles like a plain meter on that unit): the swap was refused as a
/// meter that "counts a weighted sum of several units where the current policy's counts
/// \"chat\" tokens". The count is in micro-credits, already charged at the old price.
#[test]
fn a_policy_swap_that_raises_a_usage_bars_only_price_from_one_carries_its_count() {
    let bar = |price: u64| {
        Policy::from_toml_str(&format!(
            r#"
            time_zone = "UTC"
            [resources.chat]
            units = ["tokens"]
            price_micros = {{ tokens = {price} }}
            [meters.bar]
            priced = true
            [plans.P]
            limits = [{{ meter = "bar", amount = 100, window = "daily" }}]
            "#
        ))
        .expect("a valid policy")
    };
    let engine = engine_with(bar(1));
    let key = seated(&engine, "ada", "P");
    let tokens = |count: u64, at_ms: u64| {
        consume(&engine, &key, "chat", &[(Unit::Tokens, count)], at_ms).is_admitted()
    };
    assert!(tokens(60, T0_MS), "60 micros of 100");
    engine
        .swap_policy(bar(2), Some(T0_MS + MINUTE_MS))
        .expect("a bar may change its prices");
    assert!(
        tokens(20, T0_MS + 2 * MINUTE_MS),
        "40 more micros: 100 of 100"
    );
    assert!(!tokens(1, T0_MS + 2 * MINUTE_MS), "the bar is full");
}

/// A swap that moves a plan's limit to another window is refused, naming the new limit's
/// window, and changes nothing: the count carries only to the same meter over the same span,
/// so Starter's 1,500 requests of the last 5 hours would have been dropped and a 6-hour window
/// would have admitted 1,500 more at once (and Plus's 50 images of today again in a weekly
/// window). The way there is two swaps: one without the limit (its count dropped on purpose),
/// then the new window, which starts from 0. A window added beside the kept one moves no count.
#[test]
fn a_policy_swap_that_moves_a_limit_to_another_window_is_refused_and_changes_nothing() {
    let engine = engine();
    let starter = seated(&engine, "ada", "Starter");
    let plus = seated(&engine, "bob", "Plus");
    assert_eq!(m27_requests(&engine, &starter, 1500, T0_MS), 1500);
    let images = |count: u64, at_ms: u64| {
        admit_count(&engine, &plus, "image-01", Unit::Images, count, at_ms)
    };
    assert_eq!(images(50, T0_MS), 50, "Plus: 50 images a day");
    let five_hours =
        r#"{ resource = "m2.7", unit = "requests", amount = 1500, window = "rolling:5h" }"#;
    let six_hours =
        r#"{ resource = "m2.7", unit = "requests", amount = 1500, window = "rolling:6h" }"#;
    let daily_images =
        r#"{ resource = "image-01", unit = "images", amount = 50, window = "daily" }"#;
    let weekly_images =
        r#"{ resource = "image-01", unit = "images", amount = 50, window = "weekly" }"#;
    for (old, new, field, windows) in [
        (
            five_hours,
            six_hours,
            r#"plans."Starter".limits[0].window"#,
            ["rolling:6h", "rolling:5h"],
        ),
        (
            daily_images,
            weekly_images,
            r#"plans."Plus".limits[2].window"#,
            ["weekly", "daily"],
        ),
    ] {
        assert_eq!(TOKEN_PLAN_TOML.matches(old).count(), 1);
        let moved =
            Policy::from_toml_str(&TOKEN_PLAN_TOML.replace(old, new)).expect("a valid policy");
        let before = (
            engine.usage(&starter, Some(T0_MS)).expect("report"),
            engine.usage(&plus, Some(T0_MS)).expect("report"),
        );
        let refused = engine
            .swap_policy(moved, Some(T0_MS + MINUTE_MS))
            .expect_err("refused");
        match &refused {
            Error::Policy(error) => {
                assert_eq!(error.field, field, "{refused}");
                for window in windows {
                    assert!(error.problem.contains(window), "{refused}");
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(engine.policy().generation(), 0, "nothing swapped");
        let after = (
            engine.usage(&starter, Some(T0_MS)).expect("report"),
            engine.usage(&plus, Some(T0_MS)).expect("report"),
        );
        assert_eq!(after, before);
    }
    assert_eq!(
        m27_requests(&engine, &starter, 1, T0_MS + 2 * MINUTE_MS),
        0,
        "still used up"
    );
    assert_eq!(images(1, T0_MS + 2 * MINUTE_MS), 0, "still used up");

    // A weekly window beside the daily one: the daily count carries, the weekly starts at 0.
    let beside = format!("{daily_images},\n  {weekly_images}");
    let both = Policy::from_toml_str(&TOKEN_PLAN_TOML.replacen(daily_images, &beside, 1))
        .expect("a valid policy");
    engine
        .swap_policy(both, Some(T0_MS + 3 * MINUTE_MS))
        .expect("a window added");
    assert_eq!(
        images(1, T0_MS + 4 * MINUTE_MS),
        0,
        "the day's 50 still counted"
    );

    // Two swaps: Starter without its 5-hour limit, then with a 6-hour one, which starts at 0.
    let without = TOKEN_PLAN_TOML.replace(&format!("  {five_hours},\n"), "");
    assert_ne!(without, TOKEN_PLAN_TOML);
    engine
        .swap_policy(
            Policy::from_toml_str(&without).expect("valid"),
            Some(T0_MS + 5 * MINUTE_MS),
        )
        .expect("the limit removed");
    engine
        .swap_policy(
            Policy::from_toml_str(&TOKEN_PLAN_TOML.replace(five_hours, six_hours)).expect("valid"),
            Some(T0_MS + 6 * MINUTE_MS),
        )
        .expect("the limit back, over 6 hours");
    assert_eq!(
        m27_requests(&engine, &starter, 1501, T0_MS + 7 * MINUTE_MS),
        1500
    );
}

#[test]
fn a_policy_swap_that_changes_the_bucket_width_keeps_usage() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1500, T0_MS), 1500);
    let old = r#"{ resource = "m2.7", unit = "requests", amount = 1500, window = "rolling:5h" }"#;
    let new = r#"{ resource = "m2.7", unit = "requests", amount = 1500, window = "rolling:5h", bucket = "60s" }"#;
    assert_eq!(TOKEN_PLAN_TOML.matches(old).count(), 1);
    let finer = Policy::from_toml_str(&TOKEN_PLAN_TOML.replace(old, new)).expect("a valid policy");
    engine
        .swap_policy(finer, Some(T0_MS + MINUTE_MS))
        .expect("swap");
    let fine_window = tally_engine::Window::Rolling {
        window_ms: FIVE_HOURS_MS,
        bucket_ms: MINUTE_MS,
    };
    let at_ms = T0_MS + HOUR_MS;
    assert_eq!(
        used(&engine, &key, "m2.7:requests", fine_window, at_ms),
        1500
    );
    assert_eq!(
        m27_requests(&engine, &key, 1, at_ms),
        0,
        "quota released early by a swap"
    );
}

#[test]
fn a_policy_swap_that_changes_every_five_hour_bucket_keeps_usage() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1500, T0_MS), 1500);
    let old = r#"window = "rolling:5h" }"#;
    let new = r#"window = "rolling:5h", bucket = "60s" }"#;
    assert!(TOKEN_PLAN_TOML.matches(old).count() > 1);
    let finer = Policy::from_toml_str(&TOKEN_PLAN_TOML.replace(old, new)).expect("a valid policy");
    engine
        .swap_policy(finer, Some(T0_MS + MINUTE_MS))
        .expect("swap");
    let fine_window = tally_engine::Window::Rolling {
        window_ms: FIVE_HOURS_MS,
        bucket_ms: MINUTE_MS,
    };
    let at_ms = T0_MS + HOUR_MS;
    assert_eq!(
        used(&engine, &key, "m2.7:requests", fine_window, at_ms),
        1500
    );
    assert_eq!(
        m27_requests(&engine, &key, 1, at_ms),
        0,
        "quota released early by a swap"
    );
    // Reshaped, not dropped: the units come back, never before 5 h after use.
    assert_eq!(m27_requests(&engine, &key, 1, T0_MS + FIVE_HOURS_MS - 1), 0);
    assert_eq!(
        m27_requests(&engine, &key, 1500, T0_MS + FIVE_HOURS_MS + 2 * BUCKET_MS),
        1500
    );
}

// ---- Memory -------------------------------------------------------------------------------------

#[test]
fn never_used_keys_hold_no_usage_memory() {
    let engine = engine();
    for index in 0..100 {
        seated(&engine, &format!("user-{index}"), "Max");
    }
    let key = key_of("user-7");
    engine.usage(&key, Some(T0_MS)).expect("report");
    let stats = engine.memory_stats();
    assert_eq!(stats.keys, 100);
    assert_eq!((stats.keys_with_usage, stats.usage_bytes), (0, 0));
    assert!(consume(&engine, &key, "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
    let stats = engine.memory_stats();
    assert_eq!(stats.keys_with_usage, 1);
    assert!(stats.usage_bytes > 0);
}

/// Requests that can only be refused, and corrections that remove usage a key never had, keep
/// no windows either: a key they touch holds no usage memory, as if they had not happened.
#[test]
fn refused_oversized_requests_and_empty_removals_hold_no_usage_memory() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    // Starter's 5-hour limit is 1,500 requests.
    let oversized = [(Unit::Requests, 1_501)];
    let decision = consume(&engine, &key, "m2.7", &oversized, T0_MS);
    assert!(
        matches!(
            &decision,
            Decision::Denied(denial) if matches!(denial.reason, DenialReason::ExceedsLimit { .. })
        ),
        "{decision:?}"
    );
    let removed = engine
        .adjust_usage(
            &key,
            "m2.7",
            &ONE_REQUEST,
            T0_MS,
            AdjustmentDirection::Remove,
            Some(T0_MS),
        )
        .expect("remove");
    assert_eq!(removed.limits[0].moved, 0);
    let stats = engine.memory_stats();
    assert_eq!((stats.keys_with_usage, stats.usage_bytes), (0, 0));
    assert_eq!(engine.reclaim_idle(Some(T0_MS + DAY_MS)), Ok(0));
    // The key works as before: the whole limit, and a window once it is used.
    assert_eq!(m27_requests(&engine, &key, 1_501, T0_MS), 1_500);
    assert_eq!(engine.memory_stats().keys_with_usage, 1);
}

/// A reclaim frees the keys idle as of its time and leaves every other key as it was: its
/// idle check moved a kept key's 5-hour window to the reclaim's time, aging out units that a
/// request stamped before that time (a gateway whose clock lags) still counts, so the key
/// admitted what an engine that never reclaimed denies. Nothing of that is logged, so a
/// reopen from the log alone denied it again.
#[test]
fn a_reclaim_changes_nothing_on_a_key_it_keeps() {
    let (engine, _clock) = engine_on_clock();
    let (never_reclaimed, _clock) = engine_on_clock();
    for engine in [&engine, &never_reclaimed] {
        let key = seated(engine, "ada", "Starter");
        assert_eq!(m27_requests(engine, &key, 1_000, T0_MS), 1_000);
        assert_eq!(m27_requests(engine, &key, 500, T0_MS + 3 * HOUR_MS), 500);
    }
    // The first 1,000 have aged out by then, the 500 have not: the key is kept.
    let reclaim_ms = T0_MS + 5 * HOUR_MS + 30 * MINUTE_MS;
    assert_eq!(engine.reclaim_idle(Some(reclaim_ms)), Ok(0));
    // Stamped an hour before the reclaim: the whole limit is used in its window.
    let late_ms = T0_MS + 4 * HOUR_MS + 30 * MINUTE_MS;
    let key = key_of("ada");
    assert_eq!(m27_requests(&never_reclaimed, &key, 1, late_ms), 0);
    assert_eq!(
        m27_requests(&engine, &key, 1, late_ms),
        0,
        "a reclaim that kept the key released its quota early"
    );
    assert_eq!(m27_used(&engine, &key, late_ms), 1_500);
}

#[test]
fn reclaim_idle_frees_keys_whose_windows_are_empty_and_keeps_the_rest() {
    let (engine, clock) = engine_on_clock();
    let idle = seated(&engine, "ada", "Starter");
    let busy = seated(&engine, "bob", "Plus");
    let reserved = seated(&engine, "cy", "Starter");
    assert_eq!(m27_requests(&engine, &idle, 20, T0_MS), 20);
    assert_eq!(
        admit_count(&engine, &busy, "image-01", Unit::Images, 1, T0_MS),
        1
    );
    reserve(&engine, &reserved, &ONE_REQUEST, T0_MS, Some(DAY_MS));
    let at_ms = T0_MS + 6 * HOUR_MS; // the 5-hour window is empty; the day is not over
    assert_eq!(engine.reclaim_idle(Some(at_ms)), Ok(1));
    let stats = engine.memory_stats();
    assert_eq!(stats.keys_with_usage, 2);
    assert_eq!(used(&engine, &busy, "image-01:images", daily(), at_ms), 1);
    // A reclaimed key works as before.
    assert_eq!(m27_requests(&engine, &idle, 1501, at_ms), 1500);
    // The next day the image counter is empty too; the open reservation still pins its key.
    clock.set_ms(T0_MS + DAY_MS + 6 * HOUR_MS);
    assert_eq!(
        engine.reclaim_idle(Some(T0_MS + DAY_MS + 6 * HOUR_MS)),
        Ok(2)
    );
    assert_eq!(engine.memory_stats().keys_with_usage, 1);
}

#[test]
fn a_lease_that_ended_is_expired_without_another_reserve() {
    // A gateway reserved, then crashed; the others only consume. What it held comes back once
    // the lease ends on the engine's clock, at a thread's next look (every 256 requests).
    for on_its_own in [false, true] {
        let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
        let options = tally_engine::EngineOptions {
            expire_leases_on_its_own: on_its_own,
            ..tally_engine::EngineOptions::default()
        };
        let engine =
            Engine::new(Policy::token_plan(), clock.clone(), options).expect("valid options");
        let crashed = seated(&engine, "ada", "Starter");
        let other = seated(&engine, "bob", "Starter");
        reserve(
            &engine,
            &crashed,
            &[(Unit::Requests, 1000)],
            T0_MS,
            Some(MINUTE_MS),
        );
        for _ in 0..300 {
            consume(&engine, &other, "m2.7", &ONE_REQUEST, T0_MS);
        }
        assert_eq!(engine.open_reservations(), 1, "the lease has not ended");
        let later_ms = T0_MS + 2 * MINUTE_MS;
        clock.set_ms(later_ms);
        for _ in 0..300 {
            consume(&engine, &other, "m2.7", &ONE_REQUEST, later_ms);
        }
        let (open, held) = if on_its_own { (0, 0) } else { (1, 1000) };
        assert_eq!(engine.open_reservations(), open);
        assert_eq!(m27_used(&engine, &crashed, later_ms), held);
    }
}

/// An engine on a manual clock at `T0_MS`, with or without expiring leases on its own.
fn engine_expiring_leases(on_its_own: bool) -> (Engine, std::sync::Arc<tally_engine::ManualClock>) {
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    let options = tally_engine::EngineOptions {
        expire_leases_on_its_own: on_its_own,
        ..tally_engine::EngineOptions::default()
    };
    let engine = Engine::new(Policy::token_plan(), clock.clone(), options).expect("valid options");
    (engine, clock)
}

/// A gateway reserves `requests` of `key`'s 5-hour window at `T0_MS` for a minute, then crashes.
fn hold_for_a_minute(engine: &Engine, key: &str, requests: u64) {
    reserve(
        engine,
        key,
        &[(Unit::Requests, requests)],
        T0_MS,
        Some(MINUTE_MS),
    );
}

#[test]
fn a_request_after_a_lease_ended_is_not_denied_by_what_the_lease_held() {
    // A gateway holds the whole 5-hour quota of a Starter key (1,500 requests) for a minute,
    // then crashes. The next request, two minutes in, is the key's first since: no thread has
    // looked at the housekeeping, yet the hold no longer denies it.
    for on_its_own in [false, true] {
        let (engine, clock) = engine_expiring_leases(on_its_own);
        let key = seated(&engine, "ada", "Starter");
        hold_for_a_minute(&engine, &key, 1500);
        // Before the lease ends, by the request's time, the hold denies.
        let during_ms = T0_MS + 30 * SECOND_MS;
        clock.set_ms(T0_MS + 2 * MINUTE_MS);
        let decision = consume(&engine, &key, "m2.7", &ONE_REQUEST, during_ms);
        assert!(
            matches!(reason(decision), DenialReason::QuotaExhausted { .. }),
            "{decision:?}"
        );
        assert_eq!(engine.open_reservations(), 1);
        let after_ms = T0_MS + 2 * MINUTE_MS;
        let decision = consume(&engine, &key, "m2.7", &ONE_REQUEST, after_ms);
        if on_its_own {
            assert!(decision.is_admitted(), "{decision:?}");
            assert_eq!(engine.open_reservations(), 0);
            assert_eq!(m27_used(&engine, &key, after_ms), 1);
        } else {
            assert!(!decision.is_admitted(), "{decision:?}");
            assert_eq!(engine.open_reservations(), 1);
            assert_eq!(m27_used(&engine, &key, after_ms), 1500);
        }
    }
}

#[test]
fn a_lease_ended_by_the_request_but_not_by_the_clock_still_holds() {
    // A request stamped after the lease's end, on an engine whose clock says the lease has
    // not ended: as `reserve` judges it, one stamp ahead does not expire anyone's reservation.
    let (engine, clock) = engine_expiring_leases(true);
    let key = seated(&engine, "ada", "Starter");
    hold_for_a_minute(&engine, &key, 1500);
    clock.set_ms(T0_MS + 30 * SECOND_MS);
    let ahead_ms = T0_MS + 2 * MINUTE_MS;
    let decision = consume(&engine, &key, "m2.7", &ONE_REQUEST, ahead_ms);
    assert!(!decision.is_admitted(), "{decision:?}");
    let report = engine.usage(&key, Some(ahead_ms)).expect("report");
    assert_eq!(report.open_reservations, 1);
    assert_eq!(engine.open_reservations(), 1);
}

#[test]
fn every_way_of_asking_sees_an_ended_lease_expired() {
    let after_ms = T0_MS + 2 * MINUTE_MS;
    type Ask = fn(&Engine, &str) -> Decision;
    let ask: [(&str, Ask); 5] = [
        ("check", |engine, key| {
            engine
                .check(&request(key, &ONE_REQUEST, T0_MS + 2 * MINUTE_MS))
                .expect("check")
        }),
        ("consume with a request id", |engine, key| {
            let request = request(key, &ONE_REQUEST, T0_MS + 2 * MINUTE_MS).id("retry-1");
            let first = engine.consume(&request).expect("consume");
            let again = engine.consume_noting_replay(&request).expect("again");
            assert_eq!(again, (first, true), "the repeat replays the admission");
            first
        }),
        ("consume_many", |engine, key| {
            let requests = [request(key, &ONE_REQUEST, T0_MS + 2 * MINUTE_MS)];
            let mut results = engine.consume_many(&requests);
            results.pop().expect("one result").expect("consume_many")
        }),
        ("submit", |engine, key| {
            let request = request(key, &ONE_REQUEST, T0_MS + 2 * MINUTE_MS);
            let submitted = engine.submit(&request).expect("submit");
            submitted.complete().expect("complete").0
        }),
        ("consume with credits", |engine, key| {
            let quantities = [(Unit::Requests, 1)];
            let request =
                UsageRequest::new(key, "m2.7-highspeed", &quantities).at(T0_MS + 2 * MINUTE_MS);
            engine.consume(&request).expect("consume")
        }),
    ];
    for (way, ask) in ask {
        let (engine, clock) = engine_expiring_leases(true);
        let key = seated(&engine, "ada", "Starter");
        hold_for_a_minute(&engine, &key, 1500);
        // Credits a reservation on a resource the plan does not cover holds entirely.
        let highspeed = [(Unit::Requests, 4)];
        let price = price_micros(&engine, "m2.7-highspeed", &highspeed);
        engine.top_up("@ada", price, Some(T0_MS)).expect("top up");
        let held = engine
            .reserve(
                &UsageRequest::new(&key, "m2.7-highspeed", &highspeed).at(T0_MS),
                Some(MINUTE_MS),
            )
            .expect("reserve in credits");
        assert!(held.decision.is_admitted(), "{:?}", held.decision);
        assert_eq!(engine.credits_micros("@ada"), Ok(0));
        clock.set_ms(after_ms);
        let decision = ask(&engine, &key);
        assert!(decision.is_admitted(), "{way}: {decision:?}");
        assert_eq!(engine.open_reservations(), 0, "{way}");
    }
}

#[test]
fn the_usage_report_after_a_lease_ended_shows_nothing_held() {
    for on_its_own in [false, true] {
        let (engine, clock) = engine_expiring_leases(on_its_own);
        let key = seated(&engine, "ada", "Starter");
        hold_for_a_minute(&engine, &key, 700);
        let after_ms = T0_MS + 2 * MINUTE_MS;
        clock.set_ms(after_ms);
        let report = engine.usage(&key, Some(after_ms)).expect("report");
        let (open, held) = if on_its_own { (0, 0) } else { (1, 700) };
        assert_eq!(report.open_reservations, open);
        assert_eq!(m27_used(&engine, &key, after_ms), held);
    }
}

#[test]
fn a_gateway_whose_timestamps_lag_the_clock_keeps_its_leases_by_its_own_time() {
    // The engine's clock is an hour ahead of the gateway's stamps. Its reservation (the
    // default lease) and its requests are stamped on its own time; the housekeeping judges
    // the lease as of that time, as `reserve` does, so the settle a minute later succeeds.
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS + HOUR_MS));
    let engine = Engine::new(
        Policy::token_plan(),
        clock,
        tally_engine::EngineOptions::default(),
    )
    .expect("valid options");
    let key = seated(&engine, "ada", "Starter");
    let other = seated(&engine, "bob", "Starter");
    let id = reserve(&engine, &key, &[(Unit::Requests, 10)], T0_MS, None);
    for _ in 0..300 {
        consume(&engine, &other, "m2.7", &ONE_REQUEST, T0_MS + MINUTE_MS);
    }
    assert_eq!(engine.open_reservations(), 1);
    let settled = engine.settle(id, &[(Unit::Requests, 4)], Some(T0_MS + MINUTE_MS));
    assert!(settled.is_ok(), "{settled:?}");
    assert_eq!(m27_used(&engine, &key, T0_MS + MINUTE_MS), 4);
}

#[test]
fn idle_keys_are_reclaimed_on_their_own_a_bounded_step_at_a_time() {
    const KEYS: usize = 300;
    for every_ms in [0, 10 * 60 * 1000] {
        let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
        let options = tally_engine::EngineOptions {
            reclaim_idle_every_ms: every_ms,
            ..tally_engine::EngineOptions::default()
        };
        let engine =
            Engine::new(Policy::token_plan(), clock.clone(), options).expect("valid options");
        let keys: Vec<String> = (0..KEYS)
            .map(|index| seated(&engine, &format!("user{index}"), "Plus"))
            .collect();
        for key in &keys {
            assert!(consume(&engine, key, "m2.7", &ONE_REQUEST, T0_MS).is_admitted());
        }
        let driver = seated(&engine, "driver", "Max");
        // The next day at 01:00: the 5-hour window and the day's counters are empty. Ten
        // keys are used again, and one has a reservation open: those keep their windows.
        let mut now_ms = T0_MS + DAY_MS + HOUR_MS;
        clock.set_ms(now_ms);
        for key in &keys[..10] {
            assert!(consume(&engine, key, "m2.7", &ONE_REQUEST, now_ms).is_admitted());
        }
        reserve(&engine, &keys[10], &ONE_REQUEST, now_ms, Some(DAY_MS));
        assert_eq!(engine.memory_stats().keys_with_usage, KEYS as u64);
        // Requests on this thread look at the schedule every 256 (admitted or not: the
        // driver's 5-hour window fills); at most one step (one shard's keys, of 64) runs
        // until the clock moves.
        let drive = |now_ms: u64| {
            for _ in 0..300 {
                consume(&engine, &driver, "m2.7", &ONE_REQUEST, now_ms);
            }
        };
        drive(now_ms);
        let after_one_look = engine.memory_stats().keys_with_usage;
        if every_ms == 0 {
            assert_eq!(after_one_look, KEYS as u64 + 1);
            assert_eq!(engine.automatic_reclaims(), (0, 0));
            continue;
        }
        assert!(
            after_one_look > KEYS as u64 - 64,
            "one look freed {} keys",
            KEYS as u64 + 1 - after_one_look
        );
        // The steps of a round are spread over the interval: 64 steps, 9.4 s apart.
        for _ in 0..64 {
            now_ms += 10_000;
            clock.set_ms(now_ms);
            drive(now_ms);
        }
        let stats = engine.memory_stats();
        assert_eq!(
            stats.keys_with_usage, 12,
            "the ten used, the reserved and the driver"
        );
        assert_eq!(engine.automatic_reclaims(), (KEYS as u64 - 11, 1));
        // A reclaimed key works as before, its whole limit from empty windows.
        assert_eq!(m27_requests(&engine, &keys[20], 4501, now_ms), 4500);
    }
}

#[test]
fn a_request_that_can_never_fit_is_exceeds_limit_even_when_an_earlier_limit_is_full() {
    let engine = engine_with(two_limit_policy(true));
    let key = seated(&engine, "ada", "Two");
    assert_eq!(
        admit_count(&engine, &key, "chat", Unit::Requests, 10, T0_MS),
        10
    );
    let too_many_tokens = [(Unit::Requests, 1), (Unit::Tokens, 101)];
    let decision = consume(&engine, &key, "chat", &too_many_tokens, T0_MS);
    assert!(
        matches!(
            reason(decision),
            DenialReason::ExceedsLimit {
                amount: 100,
                requested: 101,
                ..
            }
        ),
        "{decision:?}"
    );
}

#[test]
fn a_usage_report_at_a_later_time_does_not_change_when_later_usage_is_released() {
    let used_at_ms = T0_MS + 30 * SECOND_MS;
    let probe_ms = used_at_ms + FIVE_HOURS_MS + 2 * BUCKET_MS;
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    assert_eq!(m27_requests(&engine, &key, 1, used_at_ms), 1);
    // A dashboard asks for the report with a clock four hours ahead.
    engine
        .usage(&key, Some(used_at_ms + 4 * HOUR_MS))
        .expect("report");
    assert_eq!(m27_requests(&engine, &key, 1499, used_at_ms), 1499);
    assert_eq!(
        m27_requests(&engine, &key, 1500, probe_ms),
        1500,
        "the report changed when the usage ages out"
    );
}

// ---- Concurrency ---------------------------------------------------------------------------------

#[test]
fn concurrent_consumers_never_admit_more_than_the_quota() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let admitted_total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4u64)
            .map(|thread| {
                let (engine, key) = (&engine, &key);
                scope.spawn(move || {
                    // Timestamps race back and forth over a few buckets.
                    (0..1000u64)
                        .map(|step| T0_MS + ((step + thread * 7) % 5) * BUCKET_MS)
                        .map(|at_ms| m27_requests(engine, key, 1, at_ms))
                        .sum::<u64>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("no panic"))
            .sum()
    });
    assert_eq!(admitted_total, 1500);
    assert_eq!(m27_used(&engine, &key, T0_MS + 5 * BUCKET_MS), 1500);
}

#[test]
fn concurrent_charges_never_take_credits_below_zero() {
    let engine = engine();
    let key = user(&engine, "ada");
    let price = price_micros(&engine, "m2.7", &ONE_REQUEST);
    engine
        .top_up("@ada", 777 * price + price / 2, Some(T0_MS))
        .expect("top up");
    let admitted_total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (engine, key) = (&engine, &key);
                scope.spawn(move || m27_requests(engine, key, 300, T0_MS))
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("no panic"))
            .sum()
    });
    assert_eq!(admitted_total, 777);
    assert_eq!(engine.credits_micros("@ada").expect("balance"), price / 2);
}

#[test]
fn concurrent_repeats_of_one_request_id_count_once() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let ten = [(Unit::Requests, 10)];
    let decisions: Vec<_> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (engine, key) = (&engine, &key);
                scope.spawn(move || {
                    (0..200)
                        .map(|_| {
                            engine
                                .consume(&request(key, &ten, T0_MS).id("once"))
                                .expect("consume")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().expect("no panic"))
            .collect()
    });
    assert!(decisions.iter().all(|decision| *decision == decisions[0]));
    assert_eq!(m27_used(&engine, &key, T0_MS), 10);
}

// ---- Bounded tables --------------------------------------------------------------------------------

#[test]
fn a_full_request_id_table_refuses_new_ids_and_counts_nothing() {
    let options = tally_engine::EngineOptions {
        idempotency_capacity: 64,
        ..tally_engine::EngineOptions::default()
    };
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine = Engine::new(Policy::token_plan(), clock.clone(), options).expect("valid options");
    let key = seated(&engine, "ada", "Starter");
    let mut remembered = 0;
    let mut refused = None;
    for index in 0..=64 {
        let id = format!("id-{index}");
        match engine.consume(&request(&key, &ONE_REQUEST, T0_MS).id(&id)) {
            Ok(decision) => {
                assert!(decision.is_admitted());
                remembered += 1;
            }
            Err(error) => {
                refused = Some((id, error));
                break;
            }
        }
    }
    let (id, error) = refused.expect("at most 64 ids fit");
    assert!(matches!(error, Error::CapacityExceeded { .. }), "{error:?}");
    assert_eq!(m27_used(&engine, &key, T0_MS), remembered);
    // Ids are forgotten by the engine's clock: just inside the horizon the table is still full,
    // once the remembered ids are older than the horizon the id is accepted.
    let horizon_ms = engine.policy().longest_window_ms();
    clock.set_ms(T0_MS + horizon_ms - MINUTE_MS);
    let still_full = engine.consume(&request(&key, &ONE_REQUEST, T0_MS + horizon_ms).id(&id));
    assert!(
        matches!(still_full, Err(Error::CapacityExceeded { .. })),
        "{still_full:?}"
    );
    let later_ms = T0_MS + horizon_ms + HOUR_MS;
    clock.set_ms(later_ms);
    assert!(engine
        .consume(&request(&key, &ONE_REQUEST, later_ms).id(&id))
        .expect("room again")
        .is_admitted());
}

/// The shipped policy, with room for two open reservations in all.
fn engine_with_room_for_two_reservations() -> Engine {
    let options = tally_engine::EngineOptions {
        max_open_reservations: 2,
        ..tally_engine::EngineOptions::default()
    };
    Engine::new(
        Policy::token_plan(),
        std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS)),
        options,
    )
    .expect("valid options")
}

#[test]
fn a_full_reservation_table_refuses_new_reservations_and_holds_nothing() {
    let engine = engine_with_room_for_two_reservations();
    let key = seated(&engine, "ada", "Starter");
    reserve(&engine, &key, &ONE_REQUEST, T0_MS, None);
    reserve(&engine, &key, &ONE_REQUEST, T0_MS, None);
    let third = engine.reserve(&request(&key, &ONE_REQUEST, T0_MS), None);
    assert!(
        matches!(third, Err(Error::CapacityExceeded { .. })),
        "{third:?}"
    );
    assert_eq!(m27_used(&engine, &key, T0_MS), 2);
    assert_eq!(
        engine
            .usage(&key, Some(T0_MS))
            .expect("report")
            .open_reservations,
        2
    );
}

/// Closed reservations are remembered so a repeated settle or void is idempotent, but no more
/// of them than `max_open_reservations`: with room for two, cycles of reserve and settle or void
/// keep the two closed last. A repeat of a forgotten one is an error and charges nothing again.
#[test]
fn closed_reservations_beyond_the_tables_capacity_are_forgotten_oldest_first() {
    let engine = engine_with_room_for_two_reservations();
    let key = seated(&engine, "ada", "Starter");
    let settled = reserve(&engine, &key, &ONE_REQUEST, T0_MS, None);
    let settlement = engine
        .settle(settled, &ONE_REQUEST, Some(T0_MS))
        .expect("settle");
    let mut voided = Vec::new();
    for _ in 0..100 {
        let id = reserve(&engine, &key, &ONE_REQUEST, T0_MS, None);
        engine.void(id, Some(T0_MS)).expect("void");
        voided.push(id);
    }
    assert_eq!(
        m27_used(&engine, &key, T0_MS),
        1,
        "only the settled one counts"
    );
    // The first settled and the first 98 voided are forgotten, oldest first.
    for id in std::iter::once(settled).chain(voided[..98].iter().copied()) {
        assert_eq!(
            engine.void(id, Some(T0_MS)),
            Err(Error::UnknownReservation {
                reservation: id.get()
            })
        );
    }
    assert_eq!(
        engine.settle(settled, &ONE_REQUEST, Some(T0_MS)),
        Err(Error::UnknownReservation {
            reservation: settled.get()
        }),
        "was {settlement:?}"
    );
    assert_eq!(m27_used(&engine, &key, T0_MS), 1, "nothing charged twice");
    // The two closed last are still remembered.
    for &id in &voided[98..] {
        assert_eq!(engine.void(id, Some(T0_MS)), Ok(()));
        assert!(matches!(
            engine.settle(id, &ONE_REQUEST, Some(T0_MS)),
            Err(Error::ReservationClosed {
                state: "voided",
                ..
            })
        ));
    }
}

#[test]
fn a_full_key_table_refuses_new_users_and_creates_nothing() {
    let options = tally_engine::EngineOptions {
        max_keys: 2,
        ..tally_engine::EngineOptions::default()
    };
    let engine = Engine::new(
        Policy::token_plan(),
        std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS)),
        options,
    )
    .expect("valid options");
    user(&engine, "ada");
    user(&engine, "bob");
    let third = engine.create_user("cy", "tp-cy", Some(T0_MS));
    assert!(
        matches!(third, Err(Error::CapacityExceeded { what: "keys", .. })),
        "{third:?}"
    );
    assert!(matches!(
        engine.credits_micros("@cy"),
        Err(Error::UnknownTeam { .. })
    ));
    assert!(matches!(
        engine.create_payg_key("ada", "payg-ada", Some(T0_MS)),
        Err(Error::CapacityExceeded { .. })
    ));
    assert_eq!(engine.memory_stats().keys, 2);
}

// ---- Seat changes and reclaim while usage is in flight ----------------------------------------------

#[test]
fn voiding_a_reservation_after_an_upgrade_gives_the_quota_back() {
    let engine = engine();
    let key = seated(&engine, "ada", "Starter");
    let id = reserve(&engine, &key, &[(Unit::Requests, 1000)], T0_MS, None);
    engine
        .assign_seat("@ada", "ada", "Plus", Some(T0_MS))
        .expect("upgrade");
    assert_eq!(m27_used(&engine, &key, T0_MS), 1000);
    engine.void(id, Some(T0_MS)).expect("void");
    assert_eq!(m27_used(&engine, &key, T0_MS), 0);
    assert_eq!(m27_requests(&engine, &key, 4501, T0_MS), 4500);
}

#[test]
fn reclaiming_an_idle_key_does_not_let_a_late_timestamp_release_quota_early() {
    for reclaim in [false, true] {
        let engine = engine();
        let key = seated(&engine, "ada", "Starter");
        assert_eq!(m27_requests(&engine, &key, 1, T0_MS), 1);
        let now_ms = T0_MS + 6 * HOUR_MS;
        assert_eq!(m27_used(&engine, &key, now_ms), 0);
        if reclaim {
            assert_eq!(engine.reclaim_idle(Some(now_ms)), Ok(1));
        }
        // A delayed gateway reports 1,500 requests stamped two hours ago. Each is counted at its
        // stamp or later (`at_ms` of the admission); counted within 5 h of T0, the unit used at
        // T0 is still in its window and holds one of the 1,500.
        let late_ms = now_ms - 2 * HOUR_MS;
        let counted_at: Vec<u64> = (0..1500)
            .filter_map(
                |_| match consume(&engine, &key, "m2.7", &ONE_REQUEST, late_ms) {
                    tally_engine::Decision::Admitted(admission) => Some(admission.at_ms),
                    tally_engine::Decision::Denied(_) => None,
                },
            )
            .collect();
        assert!(counted_at.iter().all(|at_ms| *at_ms >= late_ms));
        let beside_the_first = counted_at
            .iter()
            .filter(|at_ms| **at_ms < T0_MS + FIVE_HOURS_MS)
            .count();
        assert!(
            beside_the_first < 1500,
            "reclaim {reclaim}: {beside_the_first} admitted within 5 h of the unit used at T0"
        );
        if !reclaim {
            // Without reclaim the late requests are counted at their stamp, next to that unit.
            assert_eq!(counted_at.len(), 1499);
        }
    }
}

/// A plan whose only limit is 4,000 speech characters a day (Asia/Shanghai).
fn daily_only_policy() -> Policy {
    Policy::from_toml_str(
        r#"
time_zone = "Asia/Shanghai"
[resources.speech]
units = ["characters"]
[plans.Daily]
limits = [{ resource = "speech", unit = "characters", amount = 4000, window = "daily" }]
"#,
    )
    .expect("a valid policy")
}

#[test]
fn reclaiming_a_key_whose_counter_is_already_on_a_later_day_keeps_that_day_as_its_floor() {
    // The counter moves to day D+1 and is emptied there (a reservation stamped just after
    // midnight, voided); a reclaim stamped back on day D finds it idle. A later request
    // stamped on D must still not find day D's quota again.
    let (engine, clock) = engine_on_clock_with(daily_only_policy());
    let key = seated(&engine, "ada", "Daily");
    let all_of_it = [(Unit::Characters, 4000)];
    assert!(consume(&engine, &key, "speech", &all_of_it, T0_MS + HOUR_MS).is_admitted());
    let next_day_ms = T0_MS + DAY_MS;
    // The clock has reached D+1; the reclaim and the request after it come late, stamped on D.
    clock.set_ms(next_day_ms + 1);
    let outcome = engine
        .reserve(
            &UsageRequest::new(&key, "speech", &[(Unit::Characters, 1000)]).at(next_day_ms + 1),
            None,
        )
        .expect("reserve");
    let id = outcome.reservation.expect("a reservation");
    engine.void(id, Some(next_day_ms + 1)).expect("void");
    assert_eq!(engine.reclaim_idle(Some(T0_MS + 2 * HOUR_MS)), Ok(1));
    match consume(&engine, &key, "speech", &all_of_it, T0_MS + 3 * HOUR_MS) {
        tally_engine::Decision::Admitted(admission) => assert!(
            admission.at_ms >= next_day_ms,
            "counted at {} on the day already used up",
            admission.at_ms
        ),
        tally_engine::Decision::Denied(denial) => {
            panic!("day D+1 had room: {denial:?}")
        }
    }
}

#[test]
fn a_late_timestamp_counted_in_a_later_day_says_when_it_was_counted() {
    let engine = engine_with(daily_only_policy());
    let key = seated(&engine, "ada", "Daily");
    let day_ms = T0_MS + DAY_MS;
    let next_day = consume(&engine, &key, "speech", &[(Unit::Characters, 1000)], day_ms);
    assert!(next_day.is_admitted());
    // Stamped the millisecond before that day began: the counter has already counted on the
    // later day, so the request counts there, and the admission says so.
    let late = consume(
        &engine,
        &key,
        "speech",
        &[(Unit::Characters, 1000)],
        day_ms - 1,
    );
    let tally_engine::Decision::Admitted(admission) = late else {
        panic!("expected an admission, got {late:?}");
    };
    assert_eq!(admission.at_ms, day_ms);
    assert_eq!(admission.limits.as_slice()[0].used, 2000);
    assert_eq!(
        admission.limits.as_slice()[0].reset_at_ms,
        Some(day_ms + DAY_MS)
    );
    let report = engine.usage(&key, Some(day_ms)).expect("usage");
    assert_eq!(report.limits[0].used, 2000);
}

#[test]
fn reclaiming_an_idle_key_does_not_let_a_late_timestamp_release_a_daily_quota_early() {
    // A plan with a daily limit only: its keys have no rolling window that a reclaim moves to
    // its time.
    const DAILY_CHARACTERS: u64 = 4000;
    for reclaim in [false, true] {
        let (engine, clock) = engine_on_clock_with(daily_only_policy());
        let key = seated(&engine, "ada", "Daily");
        let all_of_it = [(Unit::Characters, DAILY_CHARACTERS)];
        assert!(consume(&engine, &key, "speech", &all_of_it, T0_MS).is_admitted());
        if reclaim {
            clock.set_ms(T0_MS + 2 * DAY_MS);
            assert_eq!(engine.reclaim_idle(Some(T0_MS + 2 * DAY_MS)), Ok(1));
        }
        // A delayed gateway reports the same amount again, stamped an hour after the first.
        let late_ms = T0_MS + HOUR_MS;
        match consume(&engine, &key, "speech", &all_of_it, late_ms) {
            tally_engine::Decision::Admitted(admission) => {
                assert!(reclaim, "admitted over the day's quota without a reclaim");
                assert!(
                    admission.at_ms >= T0_MS + DAY_MS,
                    "counted at {} on the day already used up",
                    admission.at_ms
                );
            }
            tally_engine::Decision::Denied(denial) => {
                assert!(
                    !reclaim,
                    "a reclaimed key counts late requests at the reclaim's time"
                );
                assert!(matches!(denial.reason, DenialReason::QuotaExhausted { .. }));
            }
        }
    }
}

// ---- Refunds across a price change ---------------------------------------------------------------

#[test]
fn a_refund_after_a_price_cut_gives_back_what_was_charged() {
    let engine = engine();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", 1_000_000, Some(T0_MS))
        .expect("top up");
    let paid = engine
        .consume(&request(&key, &ONE_REQUEST, T0_MS).id("paid"))
        .expect("consume");
    let ChargedTo::Credits { micros: charged } = admitted(paid).charged_to else {
        panic!("expected credits, got {paid:?}");
    };
    let old_price = "price_micros = { requests = 2000, tokens = 1 }";
    assert_eq!(TOKEN_PLAN_TOML.matches(old_price).count(), 1);
    let cheaper =
        TOKEN_PLAN_TOML.replace(old_price, "price_micros = { requests = 500, tokens = 1 }");
    engine
        .swap_policy(Policy::from_toml_str(&cheaper).expect("valid"), Some(T0_MS))
        .expect("swap");
    let refund = engine.refund("paid", Some(T0_MS)).expect("refund");
    assert_eq!(refund.given_back.total(), charged);
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 1_000_000);
}

#[test]
fn a_refund_after_a_price_cut_gives_the_whole_usage_bar_hold_back() {
    let engine = engine();
    let key = seated(&engine, "ada", "Bar-Plus");
    let image = [(Unit::Images, 4)];
    let paid = engine
        .consume(
            &UsageRequest::new(&key, "image-01", &image)
                .at(T0_MS)
                .id("img"),
        )
        .expect("consume");
    assert!(paid.is_admitted());
    let held = used(&engine, &key, "usage-bar", five_hours(), T0_MS);
    assert_eq!(held, price_micros(&engine, "image-01", &image));
    let old_price = "price_micros = { images = 25000, requests = 0 }";
    assert_eq!(TOKEN_PLAN_TOML.matches(old_price).count(), 1);
    let cheaper =
        TOKEN_PLAN_TOML.replace(old_price, "price_micros = { images = 10000, requests = 0 }");
    engine
        .swap_policy(Policy::from_toml_str(&cheaper).expect("valid"), Some(T0_MS))
        .expect("swap");
    assert_eq!(
        used(&engine, &key, "usage-bar", five_hours(), T0_MS),
        held,
        "usage carried"
    );
    engine.refund("img", Some(T0_MS)).expect("refund");
    assert_eq!(used(&engine, &key, "usage-bar", five_hours(), T0_MS), 0);
    assert_eq!(used(&engine, &key, "usage-bar", weekly(), T0_MS), 0);
}

// ---- How long request ids are remembered -----------------------------------------------------------

#[test]
fn a_request_id_stamped_before_the_horizon_is_refused_not_charged_on_every_retry() {
    // Before, the id was queued by its stamp and forgotten at once: each retry was decided and
    // charged again (two charges to credits, one refund).
    let (engine, clock) = engine_on_clock();
    let key = user(&engine, "dee");
    engine
        .top_up(&team_of("dee"), 1_000_000, Some(T0_MS))
        .expect("top up");
    let horizon_ms = Policy::token_plan().longest_window_ms();
    let old = UsageRequest::new(&key, "m2.7", &ONE_REQUEST)
        .at(T0_MS - horizon_ms - 2 * HOUR_MS)
        .id("req-1");
    for now_ms in [T0_MS, T0_MS + 1_000] {
        clock.set_ms(now_ms);
        match engine.consume(&old) {
            Err(Error::InvalidArgument {
                field: "at_ms",
                problem,
            }) => {
                assert!(problem.contains("request id"), "{problem}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(engine.credits_micros(&team_of("dee")), Ok(1_000_000));
    // Within the horizon it is remembered, and a retry counts nothing.
    let recent = UsageRequest::new(&key, "m2.7", &ONE_REQUEST)
        .at(T0_MS - horizon_ms + HOUR_MS)
        .id("req-2");
    let first = engine.consume(&recent).expect("consume");
    assert!(first.is_admitted());
    clock.set_ms(T0_MS + 2_000);
    assert_eq!(engine.consume(&recent).expect("repeat"), first);
    assert_eq!(
        engine.credits_micros(&team_of("dee")),
        Ok(1_000_000 - 2_000),
        "one request at 2,000 micro-credits, charged once"
    );
}

#[test]
fn request_ids_are_remembered_for_the_longest_window_of_a_swapped_in_policy() {
    // Ids are forgotten by the engine's clock, so the clock follows the requests.
    let (engine, clock) = engine_on_clock();
    let monthly = Policy::from_toml_str(
        r#"
time_zone = "Asia/Shanghai"
[resources.widget]
units = ["requests"]
price_micros = { requests = 10 }
[plans.Monthly]
limits = [{ resource = "widget", unit = "requests", amount = 100, window = "monthly" }]
"#,
    )
    .expect("a valid policy");
    engine.swap_policy(monthly, Some(T0_MS)).expect("swap");
    let key = seated(&engine, "ada", "Monthly");
    let december_ms = utc_ms(2026, 11, 30, 17, 0, 0); // 2026-12-01 01:00 in Shanghai
    let one = [(Unit::Requests, 1)];
    clock.set_ms(december_ms);
    let first = engine
        .consume(
            &UsageRequest::new(&key, "widget", &one)
                .at(december_ms)
                .id("once-a-month"),
        )
        .expect("consume");
    assert!(first.is_admitted());
    // Ten days on: past the shipped policy's horizon (a week and an hour), inside the month.
    let retry_ms = december_ms + 10 * DAY_MS;
    assert!(retry_ms - december_ms > Policy::token_plan().longest_window_ms());
    clock.set_ms(retry_ms);
    let again = engine
        .consume(
            &UsageRequest::new(&key, "widget", &one)
                .at(retry_ms)
                .id("once-a-month"),
        )
        .expect("consume");
    assert_eq!(again, first);
    assert_eq!(
        used(
            &engine,
            &key,
            "widget:requests",
            tally_engine::Window::Calendar(tally_engine::calendar::CalendarPeriod::Monthly),
            retry_ms
        ),
        1
    );
}

#[test]
fn a_far_future_timestamp_does_not_make_request_ids_forgotten() {
    // Stamps decades ahead of the clock, which the default bound refuses: without a bound
    // (opted out), they are taken, and must still not make the table forget "req-a".
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    let options = tally_engine::EngineOptions {
        max_ahead_of_clock_ms: 0,
        ..tally_engine::EngineOptions::default()
    };
    let engine = Engine::new(Policy::token_plan(), clock.clone(), options).expect("valid options");
    let key = seated(&engine, "ada", "Starter");
    let other = seated(&engine, "bob", "Max");
    let ten = [(Unit::Requests, 10)];
    let first = engine
        .consume(&request(&key, &ten, T0_MS).id("req-a"))
        .expect("consume");
    assert!(first.is_admitted());
    // Another client with a clock decades ahead sends requests with ids of its own; with 64
    // shards, some land in the shard of "req-a".
    let future_ms = utc_ms(2099, 1, 1, 0, 0, 0);
    for index in 0..256 {
        let id = format!("skewed-{index}");
        engine
            .consume(&request(&other, &ONE_REQUEST, future_ms).id(&id))
            .expect("consume");
    }
    clock.set_ms(T0_MS + MINUTE_MS);
    let retry = engine
        .consume(&request(&key, &ten, T0_MS + MINUTE_MS).id("req-a"))
        .expect("consume");
    assert_eq!(retry, first);
    assert_eq!(
        m27_used(&engine, &key, T0_MS + MINUTE_MS),
        10,
        "the retry counted again"
    );
}
