//! Storage faults: a record insert or a durable flush that fails (`Faults`, `Sync` durability)
//! makes the call that needed it return `Error::Storage` with nothing applied, in memory or on
//! disk, and fails the log until the engine is reopened.
//!
//! Every case builds the same world in a durable engine and in an in-memory twin, runs the call
//! on the twin first (it must succeed and change something: the call is worth failing), injects
//! one fault, runs the call on the durable engine and checks:
//! - it returns a Storage error, and the state (every usage report, every balance, open
//!   reservations, keys and teams that the call would have created) is what it was;
//! - later calls that would log are refused with a Storage error, still changing nothing;
//! - after closing, the database verifies sound and holds no event of the failed call;
//! - after reopening, the state is what it was, and the same call now succeeds with exactly the
//!   twin's outcome and leaves exactly the twin's state.

mod log_support;

use std::sync::Arc;

use log_support::*;
use tally_engine::{
    AdjustmentDirection, Decision, Durability, Engine, Error, Faults, OpenOptions, Policy,
    ReservationId, Unit, UsageReport, UsageRequest,
};

#[derive(Clone, Copy, Debug)]
enum Fault {
    Insert,
    Flush,
}

/// The time every call of a case runs at.
const AT_MS: u64 = POPULATED_MS + 10 * 60 * 1_000;

/// Keys, teams and users a call may create, probed beside the world's.
const NEW_KEYS: [&str; 3] = ["key-zed", "key-cy-acme", "payg-ada"];
const NEW_TEAMS: [&str; 2] = ["@zed", "beta"];

/// What a caller can observe: the world's state, and whether the things a call may create
/// exist.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    state: State,
    new_keys: Vec<Result<UsageReport, Error>>,
    new_teams: Vec<Result<u64, Error>>,
}

fn observe(engine: &Engine, at_ms: u64) -> Observed {
    Observed {
        state: state(engine, &KEYS, &TEAMS, at_ms),
        new_keys: NEW_KEYS
            .iter()
            .map(|key| engine.usage(key, Some(at_ms)))
            .collect(),
        new_teams: NEW_TEAMS
            .iter()
            .map(|team| engine.credits_micros(team))
            .collect(),
    }
}

#[track_caller]
fn assert_same(actual: &Observed, expected: &Observed, context: &str) {
    assert_same_state(&actual.state, &expected.state, context);
    assert_eq!(actual.new_keys, expected.new_keys, "{context}: new keys");
    assert_eq!(actual.new_teams, expected.new_teams, "{context}: new teams");
}

#[track_caller]
fn assert_storage_error<T: std::fmt::Debug>(result: &Result<T, Error>, context: &str) {
    assert!(
        matches!(result, Err(Error::Storage { .. })),
        "{context}: expected a Storage error, got {result:?}"
    );
}

/// A call under test: its outcome as text, or the error.
type Call = dyn Fn(&Engine, &World) -> Result<String, Error>;

/// One case of the module's comment, with the state observed at `observed_at`: a call stamped
/// later than that moves rolling windows on to its time whether it succeeds or not, and what a
/// window counted at an earlier time is not kept.
fn fault_case(label: &str, fault: Fault, call: &Call, observed_at: u64) {
    let dir = TempDir::new(&format!("fault-{label}-{fault:?}"));
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let twin = twin(Policy::token_plan());
    let world = populate(&engine);
    assert_eq!(world, populate(&twin));
    let before = observe(&engine, observed_at);
    assert_same(&before, &observe(&twin, observed_at), "before the call");
    let expected = call(&twin, &world).expect("the call succeeds without a fault");
    let expected_after = observe(&twin, observed_at);
    assert_ne!(expected_after, before, "the call changes something");
    let events = last_seq(&engine);

    match fault {
        Fault::Insert => faults.fail_next_inserts(1),
        Fault::Flush => faults.fail_next_flushes(1),
    }
    let failed = call(&engine, &world);
    assert_storage_error(&failed, "the failed call");
    assert_same(
        &observe(&engine, observed_at),
        &before,
        "in memory after the failed call",
    );

    // The log is failed: calls that would log are refused, and change nothing either.
    let one = [(Unit::Requests, 1)];
    let later = engine.consume(&UsageRequest::new("key-bob", "m2.7", &one).at(AT_MS));
    assert_storage_error(&later, "a later consume");
    assert_storage_error(&engine.top_up("@bob", 1, Some(AT_MS)), "a later top-up");
    assert_storage_error(&call(&engine, &world), "the same call again");
    assert_same(
        &observe(&engine, observed_at),
        &before,
        "after the refused calls",
    );
    drop(engine);

    let report = Engine::verify(dir.path(), sync_options_with(&faults)).expect("verify");
    assert!(report.is_sound(), "{:?}", report.problems);
    assert_eq!(
        report.last_seq, events,
        "no event of the failed call is on disk"
    );

    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    assert_same(&observe(&engine, observed_at), &before, "on disk");
    assert_eq!(last_seq(&engine), events);
    assert_eq!(
        call(&engine, &world),
        Ok(expected),
        "the call after reopening"
    );
    assert_same(
        &observe(&engine, observed_at),
        &expected_after,
        "after the call succeeded",
    );
    assert!(last_seq(&engine) > events, "the successful call was logged");
}

fn both_faults(label: &str, call: &Call) {
    both_faults_observed_at(label, call, AT_MS);
}

fn both_faults_observed_at(label: &str, call: &Call, observed_at: u64) {
    fault_case(label, Fault::Insert, call, observed_at);
    fault_case(label, Fault::Flush, call, observed_at);
}

/// A `Sync` database with `faults` and `create_accounts`' users, keys, seats and credits.
fn accounts_in_sync_database(label: &str) -> (TempDir, Arc<Faults>, Engine) {
    let dir = TempDir::new(label);
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    create_accounts(&engine);
    (dir, faults, engine)
}

fn admitted(decision: Result<Decision, Error>, charged: &str) -> Result<String, Error> {
    let decision = decision?;
    let text = format!("{decision:?}");
    assert!(decision.is_admitted(), "{text}");
    assert!(text.contains(charged), "charged to {charged}: {text}");
    Ok(text)
}

/// A `consume_many`'s outcome: all or nothing, every request of a failed batch answers the
/// error; otherwise every request is admitted. (These batches fit in one log file: none of
/// their events is made durable before the flush that fails.)
fn all_admitted_or_all_failed(
    results: &[Result<Decision, Error>],
    requests: usize,
) -> Result<String, Error> {
    assert_eq!(results.len(), requests);
    if let Some(error) = results.iter().find_map(|result| result.clone().err()) {
        assert!(
            results.iter().all(|result| result.is_err()),
            "a batch half failed: {results:?}"
        );
        return Err(error);
    }
    assert!(results
        .iter()
        .all(|result| matches!(result, Ok(d) if d.is_admitted())));
    Ok(format!("{results:?}"))
}

fn open_reservation(world: &World, key: &str) -> ReservationId {
    world
        .open
        .iter()
        .find(|(_, holder)| holder == key)
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("{key} holds an open reservation"))
}

#[test]
fn a_failed_consume_from_plan_quota_admits_nothing_and_changes_nothing() {
    both_faults("consume-quota", &|engine, _| {
        let quantities = [(Unit::Requests, 3), (Unit::Tokens, 500)];
        let request = UsageRequest::new("key-bob", "m2.7", &quantities).at(AT_MS);
        admitted(engine.consume(&request), "PlanQuota")
    });
}

#[test]
fn a_failed_consume_charged_to_credits_admits_nothing_and_changes_nothing() {
    both_faults("consume-credits", &|engine, _| {
        let quantities = [(Unit::Requests, 2)];
        let request = UsageRequest::new("key-dee", "m2.7", &quantities).at(AT_MS);
        admitted(engine.consume(&request), "Credits")
    });
}

#[test]
fn a_failed_consume_on_a_usage_bar_admits_nothing_and_changes_nothing() {
    both_faults("consume-bar", &|engine, _| {
        let quantities = [(Unit::Characters, 500)];
        let request = UsageRequest::new("key-cy", "speech-2.8", &quantities).at(AT_MS);
        admitted(engine.consume(&request), "PlanQuota")
    });
}

#[test]
fn a_failed_pay_as_you_go_consume_records_no_spend() {
    both_faults("consume-payg", &|engine, _| {
        let quantities = [(Unit::Requests, 1), (Unit::Tokens, 2_000)];
        let request = UsageRequest::new("payg-dee", "m2.7", &quantities).at(AT_MS);
        admitted(engine.consume(&request), "PayAsYouGo")
    });
}

#[test]
fn a_failed_consume_with_a_request_id_does_not_remember_the_id() {
    // After reopening, the same id is decided afresh (and admitted): nothing remembered it.
    both_faults("consume-id", &|engine, _| {
        let quantities = [(Unit::Requests, 4)];
        let request = UsageRequest::new("key-ada-acme", "m2.7", &quantities)
            .at(AT_MS)
            .id("fault-id");
        admitted(engine.consume(&request), "PlanQuota")
    });
}

#[test]
fn a_failed_consume_many_admits_none_of_its_requests() {
    both_faults("consume-many", &|engine, _| {
        let quota = [(Unit::Requests, 3)];
        let credits = [(Unit::Requests, 1)];
        let requests = [
            UsageRequest::new("key-bob", "m2.7", &quota).at(AT_MS),
            UsageRequest::new("key-dee", "m2.7", &credits).at(AT_MS),
            UsageRequest::new("key-ada-acme", "m2.7", &quota)
                .at(AT_MS)
                .id("many-1"),
            UsageRequest::new("key-eve", "image-01", &[(Unit::Images, 1)]).at(AT_MS),
        ];
        all_admitted_or_all_failed(&engine.consume_many(&requests), requests.len())
    });
}

#[test]
fn a_failed_consume_many_of_several_chunks_admits_none_of_its_requests() {
    // `consume_many` appends its events a chunk at a time: a batch of several chunks fails as a
    // whole, whichever chunk's append or which wait meets the fault.
    both_faults("consume-many-chunks", &|engine, _| {
        let one = [(Unit::Requests, 1)];
        let ids: Vec<String> = (0..150).map(|index| format!("chunked-{index}")).collect();
        let requests: Vec<UsageRequest<'_>> = ids
            .iter()
            .enumerate()
            .map(|(index, id)| {
                let key = if index % 2 == 0 {
                    "key-bob"
                } else {
                    "payg-dee"
                };
                let request = UsageRequest::new(key, "m2.7", &one).at(AT_MS);
                if index % 10 == 0 {
                    request.id(id)
                } else {
                    request
                }
            })
            .collect();
        all_admitted_or_all_failed(&engine.consume_many(&requests), requests.len())
    });
}

#[test]
fn a_failed_reserve_holds_nothing_and_opens_no_reservation() {
    both_faults("reserve", &|engine, _| {
        let quantities = [(Unit::Requests, 5)];
        let request = UsageRequest::new("key-bob", "m2.7", &quantities).at(AT_MS);
        let outcome = engine.reserve(&request, Some(60 * 60 * 1_000))?;
        assert!(outcome.reservation.is_some());
        // Not the id: after the reopen it comes after every one the failed run may have
        // handed out (`reservation_ids_through`), past the twin's.
        Ok(format!("{:?}", outcome.decision))
    });
}

#[test]
fn a_failed_reserve_charged_to_credits_holds_nothing() {
    both_faults("reserve-credits", &|engine, _| {
        let quantities = [(Unit::Requests, 2)];
        let request = UsageRequest::new("key-dee", "m2.7", &quantities).at(AT_MS);
        let outcome = engine.reserve(&request, None)?;
        assert!(outcome.reservation.is_some());
        Ok(format!("{:?}", outcome.decision))
    });
}

#[test]
fn a_failed_settle_for_less_than_the_estimate_gives_nothing_back_and_keeps_it_open() {
    both_faults("settle-less", &|engine, world| {
        let id = open_reservation(world, "key-bob");
        let outcome = engine.settle(id, &[(Unit::Requests, 12)], Some(AT_MS))?;
        Ok(format!("{outcome:?}"))
    });
}

#[test]
fn a_failed_settle_for_more_than_the_estimate_charges_nothing_extra_and_keeps_it_open() {
    both_faults("settle-more", &|engine, world| {
        let id = open_reservation(world, "key-dee");
        let outcome = engine.settle(id, &[(Unit::Requests, 4)], Some(AT_MS))?;
        let text = format!("{outcome:?}");
        assert!(text.contains("extra: Some(Credits"), "{text}");
        Ok(text)
    });
}

#[test]
fn a_failed_void_frees_nothing_and_keeps_the_reservation_open() {
    both_faults("void", &|engine, world| {
        let id = open_reservation(world, "key-bob");
        engine.void(id, Some(AT_MS)).map(|()| "voided".into())
    });
}

#[test]
fn a_failed_expiry_frees_nothing_and_keeps_the_reservations_open() {
    // `populate`'s open reservations were made at 5 hours with a lease of 2 hours.
    const LEASES_ENDED_MS: u64 = T0_MS + 7 * HOUR_MS;
    let call: &Call = &|engine, world| {
        assert!(!world.open.is_empty());
        let expired = engine.expire_reservations(Some(LEASES_ENDED_MS))?;
        assert_eq!(expired, world.open.len());
        Ok(format!("{expired} expired"))
    };
    both_faults_observed_at("expire", call, LEASES_ENDED_MS);
}

#[test]
fn a_failed_top_up_adds_no_credits() {
    both_faults("top-up", &|engine, _| {
        engine
            .top_up("@bob", 250_000, Some(AT_MS))
            .map(|balance| balance.to_string())
    });
}

#[test]
fn a_failed_withdrawal_takes_no_credits() {
    both_faults("withdraw", &|engine, _| {
        engine
            .withdraw_credits("acme", 40_000, Some(AT_MS))
            .map(|balance| balance.to_string())
    });
}

#[test]
fn a_failed_seat_assignment_leaves_the_old_seat() {
    both_faults("assign-seat", &|engine, _| {
        engine
            .assign_seat("@ada", "ada", "Max", Some(AT_MS))
            .map(|()| "seated".into())
    });
}

#[test]
fn a_failed_seat_removal_leaves_the_seat() {
    both_faults("unassign-seat", &|engine, _| {
        engine
            .unassign_seat("acme", "bob", Some(AT_MS))
            .map(|()| "unseated".into())
    });
}

#[test]
fn a_failed_refund_gives_nothing_back_and_the_request_stays_refundable() {
    both_faults("refund-quota", &|engine, _| {
        engine
            .refund("req-b1", Some(AT_MS))
            .map(|refund| format!("{refund:?}"))
    });
}

#[test]
fn a_failed_refund_of_a_credits_charge_gives_no_credits_back() {
    both_faults("refund-credits", &|engine, _| {
        engine
            .refund("req-b3", Some(AT_MS))
            .map(|refund| format!("{refund:?}"))
    });
}

#[test]
fn a_failed_usage_correction_upwards_counts_nothing() {
    both_faults("adjust-add", &|engine, _| {
        engine
            .adjust_usage(
                "key-bob",
                "m2.7",
                &[(Unit::Requests, 9)],
                AT_MS - 60 * 60 * 1_000,
                AdjustmentDirection::Add,
                Some(AT_MS),
            )
            .map(|outcome| format!("{outcome:?}"))
    });
}

#[test]
fn a_failed_usage_correction_downwards_gives_nothing_back() {
    both_faults("adjust-remove", &|engine, _| {
        engine
            .adjust_usage(
                "key-eve",
                "speech-2.8",
                &[(Unit::Characters, 1_000)],
                T0_MS + 3 * HOUR_MS,
                AdjustmentDirection::Remove,
                Some(AT_MS),
            )
            .map(|outcome| format!("{outcome:?}"))
    });
}

#[test]
fn a_failed_account_creation_creates_no_user_team_or_key() {
    both_faults("create-user", &|engine, _| {
        engine
            .create_user("zed", "key-zed", Some(AT_MS))
            .map(|()| "created".into())
    });
    both_faults("create-team", &|engine, _| {
        engine
            .create_team("beta", Some(AT_MS))
            .map(|()| "created".into())
    });
    both_faults("add-member", &|engine, _| {
        engine
            .add_member("acme", "cy", "key-cy-acme", Some(AT_MS))
            .map(|()| "added".into())
    });
    both_faults("payg-key", &|engine, _| {
        engine
            .create_payg_key("ada", "payg-ada", Some(AT_MS))
            .map(|()| "created".into())
    });
}

#[test]
fn a_failed_policy_swap_keeps_the_old_policy() {
    both_faults("swap", &|engine, _| {
        let text =
            tally_engine::policy::TOKEN_PLAN_TOML.replace("amount = 1500,", "amount = 1700,");
        let policy = Policy::from_toml_str(&text).expect("a valid policy");
        engine
            .swap_policy(policy, Some(AT_MS))
            .map(|()| "swapped".into())
    });
}

#[test]
fn after_a_failure_the_engine_reopens_with_the_same_faults_object_and_works() {
    // The failure lives in memory only: a reopen with injection still configured (nothing
    // pending) works, and each later failure is handled like the first.
    let (dir, faults, mut engine) = accounts_in_sync_database("fault-again");
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS);
    for round in 0..4u64 {
        if round % 2 == 0 {
            faults.fail_next_flushes(1);
        } else {
            faults.fail_next_inserts(1);
        }
        assert_storage_error(&engine.consume(&request), "a failed consume");
        drop(engine);
        engine = open_token_plan(dir.path(), sync_options_with(&faults));
        let used = engine.usage("key-bob", Some(T0_MS)).unwrap().limits[0].used;
        assert_eq!(used, round, "only the successful consumes counted");
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    assert_eq!(
        engine.usage("key-bob", Some(T0_MS)).unwrap().limits[0].used,
        4
    );
}

/// Without `Sync`, a call returns before its event is written, so a write that fails later
/// cannot fail the call: the log is failed for every later call, and a reopen holds exactly
/// what was written before the failure; the acknowledged request that failed is gone (the
/// durability modes' documented trade-off, without a crash). In memory it stays counted until
/// the reopen.
#[test]
fn without_sync_a_failed_write_fails_every_later_call_and_a_reopen_holds_what_was_written() {
    for durability in [Durability::Interval { ms: 20 }, Durability::None] {
        let dir = TempDir::new("fault-interval");
        let faults = Faults::new();
        let options = OpenOptions {
            durability,
            faults: Some(Arc::clone(&faults)),
            ..OpenOptions::default()
        };
        let engine = open_token_plan(dir.path(), options.clone());
        create_accounts(&engine);
        let one = [(Unit::Requests, 1)];
        let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS);
        assert!(engine.consume(&request).unwrap().is_admitted());
        engine.sync().expect("written and durable");
        faults.fail_next_inserts(1);
        let acknowledged = engine.consume(&request);
        engine
            .sync()
            .expect_err("the write behind the acknowledgement failed");
        let later = engine.consume(&request);
        assert_storage_error(&later, "a later consume");
        assert_storage_error(&engine.top_up("@bob", 1, Some(T0_MS)), "a later top-up");
        drop(engine);
        let engine = open_token_plan(dir.path(), options);
        let used = engine.usage("key-bob", Some(T0_MS)).unwrap().limits[0].used;
        // Usually acknowledged before the writer failed (and now lost); if the writer failed
        // first, the call saw it and gave its effect back. Either way only the first counts.
        let admitted = matches!(&acknowledged, Ok(decision) if decision.is_admitted());
        let refused = matches!(&acknowledged, Err(Error::Storage { .. }));
        assert!(admitted || refused, "{acknowledged:?}");
        assert_eq!(used, 1, "{durability:?}");
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
}

/// `Sync` callers on many threads wait for one fdatasync (group commit); when it fails, every
/// one of them gets the error, none is acknowledged, and what memory holds afterwards is what
/// the reopened database holds: nothing of any of them.
#[test]
fn when_a_group_commits_fdatasync_fails_every_waiting_caller_fails_and_memory_equals_disk() {
    let (dir, faults, engine) = accounts_in_sync_database("fault-group");
    let before = state(&engine, &KEYS, &TEAMS, AT_MS);
    let events = last_seq(&engine);
    let keys = [
        "key-ada",
        "key-bob",
        "key-eve",
        "key-ada-acme",
        "key-bob-acme",
        "key-cy",
    ];
    faults.hold_flushes();
    let results: Vec<Result<Decision, Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = keys
            .iter()
            .map(|key| {
                let engine = &engine;
                scope.spawn(move || {
                    let one = [(Unit::Requests, 1)];
                    engine.consume(&UsageRequest::new(key, "m2.7", &one).at(AT_MS))
                })
            })
            .collect();
        let start = std::time::Instant::now();
        while faults.flushes_held() == 0 && start.elapsed() < HOLD_AT_MOST {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The callers that were not first append behind the held flush and wait too.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            handles.iter().all(|handle| !handle.is_finished()),
            "a caller was answered before its flush"
        );
        faults.fail_next_flushes(1);
        faults.release_flushes();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("no panic"))
            .collect()
    });
    for result in &results {
        assert_storage_error(result, "a caller of the failed group");
    }
    let in_memory = state(&engine, &KEYS, &TEAMS, AT_MS);
    assert_same_state(&in_memory, &before, "in memory after the failed group");
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, AT_MS),
        &in_memory,
        "on disk, as in memory",
    );
    assert_eq!(
        last_seq(&engine),
        events,
        "no event of the group is on disk"
    );
}

/// In `Interval` mode the writer's own fdatasync, made in the background after the calls it
/// covers returned, can fail with nobody waiting: the next call that logs is refused with that
/// error (nothing of it applied), which names the answered events it may have lost, and so is
/// `close`, so the caller learns of it either way.
#[test]
fn with_interval_a_failed_background_flush_fails_the_next_call_and_the_close() {
    let dir = TempDir::new("fault-interval-flush");
    let faults = Faults::new();
    let options = OpenOptions {
        durability: Durability::Interval { ms: 5 },
        faults: Some(Arc::clone(&faults)),
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    create_accounts(&engine);
    engine.sync().expect("written and durable");
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS);
    faults.hold_flushes();
    faults.fail_next_flushes(1);
    assert!(engine.consume(&request).unwrap().is_admitted());
    // The writer's own flush, due 5 ms after the call, reaches the hold, then takes the fault.
    let started = std::time::Instant::now();
    while faults.flushes_held() == 0 && started.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(faults.flushes_held(), 1, "the writer flushed");
    let unflushed = last_seq(&engine);
    faults.release_flushes();
    let started = std::time::Instant::now();
    while engine.health().log_failure.is_none() && started.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let before = state(&engine, &KEYS, &TEAMS, T0_MS);
    let later = engine.consume(&request);
    assert_storage_error(&later, "a consume after the failed flush");
    // The error says which answered events the failed flush may have lost: the acknowledged
    // consume's, written but never made durable. (It said only that nothing from the next
    // event on was kept, as if everything before it were safe.)
    let problem = storage_problem(later.as_ref().unwrap_err());
    assert!(problem.contains("injected fault"), "{problem}");
    assert!(
        problem.contains(&format!(
            "events {unflushed} to {unflushed} were written since the last fdatasync that \
             succeeded and may be missing after a reopen"
        )),
        "{problem}"
    );
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, T0_MS),
        &before,
        "the refused call changed nothing",
    );
    assert_storage_error(&engine.close(), "the close");
    let report = Engine::verify(dir.path(), options).expect("verify");
    assert!(report.is_sound(), "{:?}", report.problems);
}

/// A background failure reaches a monitor through `health` before any call fails: the
/// writer's own flush failing in `Interval` mode (a `check` and a `usage` report still answer,
/// and never say), a periodic checkpoint that cannot store its snapshot, an automatic
/// compaction that cannot read a segment. Each clears once one succeeds again; the log's stays.
#[test]
fn health_reports_what_failed_in_the_background() {
    // The log, failed by its writer's flush after the call returned.
    let dir = TempDir::new("health-log");
    let faults = Faults::new();
    let options = OpenOptions {
        durability: Durability::Interval { ms: 5 },
        faults: Some(Arc::clone(&faults)),
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options);
    create_accounts(&engine);
    engine.sync().expect("written and durable");
    assert!(engine.health().is_healthy(), "{:?}", engine.health());
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS);
    faults.fail_next_flushes(1);
    assert!(engine.consume(&request).unwrap().is_admitted());
    let started = std::time::Instant::now();
    while engine.health().log_failure.is_none() && started.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let health = engine.health();
    let failure = health.log_failure.as_deref().expect("the log's failure");
    assert!(failure.contains("injected fault"), "{failure}");
    assert!(!health.is_healthy());
    assert!(
        engine.check(&request).is_ok(),
        "read-only calls still answer"
    );
    drop(engine);

    // A periodic checkpoint whose snapshot cannot be stored, then an automatic compaction
    // that cannot read the segment it judges.
    let dir = TempDir::new("health-background");
    let clock = clock();
    let options = OpenOptions {
        retention_ms: SECOND_MS,
        checkpoint_every_events: 4,
        ..sync_options()
    };
    let engine = open_on_clock(
        dir.path(),
        Arc::clone(&clock) as Arc<dyn tally_engine::Clock>,
        options,
    );
    create_accounts(&engine);
    let consume_some = |at_ms: u64| {
        for index in 0..12 {
            let request = UsageRequest::new("key-bob", "m2.7", &one).at(at_ms + index);
            assert!(engine.consume(&request).unwrap().is_admitted());
        }
        // Waits for the last periodic checkpoint (and its compaction) to end.
        engine.checkpoint().expect("checkpoint")
    };
    consume_some(T0_MS);
    assert!(engine.health().is_healthy(), "{:?}", engine.health());
    let snapshots = dir.path().join("snapshots");
    let aside = dir.path().join("snapshots-aside");
    std::fs::rename(&snapshots, &aside).unwrap();
    std::fs::write(&snapshots, b"not a directory").unwrap();
    for index in 0..12 {
        let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS + 100 + index);
        assert!(engine.consume(&request).unwrap().is_admitted());
    }
    let started = std::time::Instant::now();
    while engine.health().checkpoint_failure.is_none() && started.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        engine.health().checkpoint_failure.is_some(),
        "{:?}",
        engine.health()
    );
    std::fs::remove_file(&snapshots).unwrap();
    std::fs::rename(&aside, &snapshots).unwrap();
    consume_some(T0_MS + 200);
    assert_eq!(
        engine.health().checkpoint_failure,
        None,
        "a later one stored"
    );
    // The oldest segment made unreadable (a directory where its file was), then events 40
    // days on (past the policy's longest window, a month): their periodic checkpoints'
    // compactions judge it and fail.
    let events = dir.path().join("events");
    let mut segments: Vec<_> = std::fs::read_dir(&events)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    segments.sort();
    let oldest = segments[0].clone();
    let kept = oldest.with_extension("kept");
    std::fs::rename(&oldest, &kept).unwrap();
    std::fs::create_dir(&oldest).unwrap();
    let later = T0_MS + 40 * DAY_MS;
    clock.set_ms(later);
    consume_some(later);
    let failure = engine.health().compaction_failure;
    assert!(failure.is_some(), "{:?}", engine.health());
    assert!(engine.health().log_failure.is_none());
    std::fs::remove_dir(&oldest).unwrap();
    std::fs::rename(&kept, &oldest).unwrap();
    consume_some(later + 100);
    assert!(engine.health().is_healthy(), "{:?}", engine.health());
    assert!(
        engine.events_after(0, 1).unwrap()[0].seq > 1,
        "the compaction went through once the segment read again"
    );
}

/// A periodic checkpoint's thread that panics never reaches the code noting its failure, and
/// the next periodic checkpoint's join, which learns of it (once), skipped its own checkpoint
/// without a word: a thread panicking every time left the log growing and `health` clear.
/// Now the panic is the checkpoint's failure until one stores; an explicit checkpoint, or a
/// close's, is taken all the same (it answered the old panic and took none, and the close
/// closed nothing).
#[test]
fn health_reports_a_periodic_checkpoint_whose_thread_panicked() {
    let dir = TempDir::new("health-panic");
    let faults = Faults::new();
    let options = OpenOptions {
        checkpoint_every_events: 4,
        faults: Some(Arc::clone(&faults)),
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options);
    create_accounts(&engine);
    engine.checkpoint().expect("checkpoint");
    let one = [(Unit::Requests, 1)];
    let mut at_ms = T0_MS;
    let mut consume = |count: u64| {
        for _ in 0..count {
            at_ms += 1;
            let request = UsageRequest::new("key-bob", "m2.7", &one).at(at_ms);
            assert!(engine.consume(&request).unwrap().is_admitted());
        }
    };
    faults.panic_next_snapshots(1);
    // Past one periodic checkpoint (its thread panics), then past the next (which joins it).
    consume(4);
    let started = std::time::Instant::now();
    while engine.health().checkpoint_failure.is_none() && started.elapsed().as_secs() < 10 {
        consume(1);
    }
    let failure = engine.health().checkpoint_failure.expect("the panic noted");
    assert!(failure.contains("panicked"), "{failure}");
    // The next one stores: the failure clears.
    consume(8);
    engine.checkpoint().expect("checkpoint");
    assert!(engine.health().is_healthy(), "{:?}", engine.health());
    // An explicit checkpoint after a panicked periodic one is taken all the same, and once
    // stored supersedes it; so is a close's (it answered the old panic, and closed nothing).
    for close in [false, true] {
        faults.panic_next_snapshots(1);
        // Requests until a periodic checkpoint has run, as above: the one due after 4 events
        // may be paced (the explicit checkpoint before it cost 10 ms or more on a loaded
        // machine) and come only with a later request, up to 8.
        consume(4);
        let started = std::time::Instant::now();
        while engine.health().checkpoint_failure.is_none() && started.elapsed().as_secs() < 10 {
            consume(1);
        }
        let failure = engine.health().checkpoint_failure.expect("the panic noted");
        assert!(failure.contains("panicked"), "{failure}");
        if !close {
            let seq = engine.checkpoint().expect("a checkpoint of its own");
            assert_eq!(seq, last_seq(&engine), "every event in it");
            assert!(engine.health().is_healthy(), "{:?}", engine.health());
        }
    }
    let last = last_seq(&engine);
    engine
        .close()
        .expect("a clean close, its checkpoint stored");
    let engine = open_token_plan(dir.path(), sync_options());
    let report = engine.open_report().expect("opened from disk");
    assert_eq!(report.events_replayed, 0, "the close's checkpoint");
    assert_eq!(last_seq(&engine), last);
}

/// A retried request id is answered with the first decision, and that answer is an
/// acknowledgement too: the retry answers only once the first decision's event is durable. If
/// that event is never made durable (its flush fails), the retry gets the log's error, as the
/// first call does, never the decision: a retry told "admitted" for usage the log then lost
/// would be an acknowledged event lost. Every way of sending the first call and the retry
/// (`consume`, `consume_many`), with the flush failing and succeeding.
#[test]
fn a_retried_request_id_answers_only_once_the_first_decision_is_durable() {
    for first_many in [true, false] {
        for retry_many in [true, false] {
            for flush_fails in [true, false] {
                retry_while_the_first_is_not_durable(first_many, retry_many, flush_fails);
            }
        }
    }
}

/// Runs `first` with flushes held until its event is written and its flush waits, then
/// `second`; lets the flush go 100 ms later. Returns both results and whether `second` had
/// answered before the flush went.
fn second_while_the_first_waits<A: Send, B: Send>(
    faults: &Faults,
    first: impl FnOnce() -> A + Send,
    second: impl FnOnce() -> B + Send,
) -> (A, B, bool) {
    faults.hold_flushes();
    std::thread::scope(|scope| {
        let first = scope.spawn(first);
        let start = std::time::Instant::now();
        while faults.flushes_held() == 0 && start.elapsed() < HOLD_AT_MOST {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let second = scope.spawn(second);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let answered_early = second.is_finished();
        faults.release_flushes();
        (
            first.join().expect("no panic"),
            second.join().expect("no panic"),
            answered_early,
        )
    })
}

fn retry_while_the_first_is_not_durable(first_many: bool, retry_many: bool, flush_fails: bool) {
    let through = |many: bool| if many { "consume_many" } else { "consume" };
    let context = format!(
        "first through {}, retry through {}, the flush {}",
        through(first_many),
        through(retry_many),
        if flush_fails { "failing" } else { "succeeding" }
    );
    let (dir, faults, engine) = accounts_in_sync_database("fault-retry");
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-bob", "m2.7", &one)
        .at(T0_MS)
        .id("retried");
    let send = |many: bool| -> Result<(Decision, bool), Error> {
        if many {
            let (mut results, replays) =
                engine.consume_many_noting_replay(std::slice::from_ref(&request));
            results
                .pop()
                .expect("one result")
                .map(|decision| (decision, replays[0]))
        } else {
            engine.consume_noting_replay(&request)
        }
    };
    if flush_fails {
        faults.fail_next_flushes(1);
    }
    let (first, retry, answered_early) =
        second_while_the_first_waits(&faults, || send(first_many), || send(retry_many));
    assert!(
        !answered_early,
        "{context}: the retry answered ({retry:?}) before the first decision was durable"
    );
    if flush_fails {
        assert_storage_error(&first, &format!("{context}: the first call"));
        assert_storage_error(&retry, &format!("{context}: the retry"));
    } else {
        let (first, first_replayed) = first.expect("the first call");
        let (retry, retry_replayed) = retry.expect("the retry");
        assert!(
            first.is_admitted() && !first_replayed,
            "{context}: {first:?}"
        );
        assert_eq!(
            retry, first,
            "{context}: the retry answers the first decision"
        );
        assert!(retry_replayed, "{context}: the retry is a replay");
    }
    drop(engine);
    let engine = open_token_plan(dir.path(), OpenOptions::default());
    let used = engine.usage("key-bob", Some(T0_MS)).unwrap().limits[0].used;
    assert_eq!(
        used,
        u64::from(!flush_fails),
        "{context}: counted after a reopen"
    );
    let (again, replayed) = engine
        .consume_noting_replay(&request)
        .expect("after a reopen");
    assert!(again.is_admitted(), "{context}: {again:?}");
    assert_eq!(
        replayed, !flush_fails,
        "{context}: a replay after a reopen only if the first decision was kept"
    );
}

// ---------------------------------------------------------------------------------------------
// Reservations share fdatasyncs: a reserve, settle or void waits for its event with the
// reservation table's lock let go, and a call about a reservation whose latest event is not
// durable yet waits for that event before it acts or answers.

/// How long a test lets flushes stay held at most: a call that waits for its flush while
/// holding the table's lock (so that `ready` below blocks on it) ends the test instead of
/// hanging it.
const HOLD_AT_MOST: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs each call on a thread of its own with flushes held until `ready` (polled on the
/// engine) is true, then lets them go. Returns the calls' results and whether `ready` was seen
/// true while every call was still waiting.
fn with_flushes_held<'a, T: Send>(
    engine: &Engine,
    faults: &Faults,
    calls: Vec<Box<dyn FnOnce() -> T + Send + 'a>>,
    ready: impl Fn(&Engine) -> bool,
) -> (Vec<T>, bool) {
    faults.hold_flushes();
    let released = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let start = std::time::Instant::now();
            while !released.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < HOLD_AT_MOST
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            faults.release_flushes();
        });
        let handles: Vec<_> = calls.into_iter().map(|call| scope.spawn(call)).collect();
        let start = std::time::Instant::now();
        let all_waiting = loop {
            if ready(engine) {
                break handles.iter().all(|handle| !handle.is_finished());
            }
            if start.elapsed() > HOLD_AT_MOST {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        faults.release_flushes();
        released.store(true, std::sync::atomic::Ordering::Relaxed);
        let results = handles
            .into_iter()
            .map(|handle| handle.join().expect("no panic"))
            .collect();
        (results, all_waiting)
    })
}

/// A seat change appends its event with the append gate write-held (no `consume_many` chunk
/// between deciding and appending), then waits for it to be durable: with the gate let go, so
/// a batch on a key of another shard decides, counts and appends meanwhile. Before, the gate
/// was held through the fdatasync and every batch waited for it. The batch on the seat's own
/// key still comes after the seat change (the shard's lock, held until the seat changes): the
/// chunk-gap test in tests/idempotency.rs checks that order survives a reopen.
#[test]
fn a_batch_on_another_key_goes_on_while_a_seat_change_waits_for_its_flush() {
    use tally_engine::accounts::KeyTable;
    let (dir, faults, engine) = accounts_in_sync_database("fault-seat-gate");
    let shard = |key: &str| KeyTable::shard_index(KeyTable::hash(key));
    // Eve's seat changes; the batch is on a key of another shard.
    let other = ["key-bob", "key-ada"]
        .into_iter()
        .find(|key| shard(key) != shard("key-eve"))
        .expect("a key in another shard than key-eve's");
    let one = [(Unit::Requests, 1)];
    let batch = [UsageRequest::new(other, "m2.7", &one).at(T0_MS)];
    let used = |engine: &Engine| engine.usage(other, Some(T0_MS)).unwrap().limits[0].used;
    assert_eq!(used(&engine), 0);
    faults.hold_flushes();
    let (seat, batched, counted_meanwhile) = std::thread::scope(|scope| {
        let seat = scope.spawn(|| engine.assign_seat("@eve", "eve", "Max", Some(T0_MS)));
        // The seat change's event is written and its flush waits at the hold.
        let start = std::time::Instant::now();
        while faults.flushes_held() == 0 && start.elapsed() < HOLD_AT_MOST {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let batched = scope.spawn(|| engine.consume_many(&batch));
        // The batch decides and counts before it appends its event; it then waits for its
        // own flush, held too.
        let start = std::time::Instant::now();
        while used(&engine) == 0 && start.elapsed() < HOLD_AT_MOST {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let counted_meanwhile = used(&engine) == 1 && !seat.is_finished();
        faults.release_flushes();
        (
            seat.join().expect("no panic"),
            batched.join().expect("no panic"),
            counted_meanwhile,
        )
    });
    seat.expect("the seat change");
    for result in batched {
        assert!(result.expect("decided").is_admitted());
    }
    assert!(
        counted_meanwhile,
        "the batch on {other} waited for the seat change's flush"
    );
    drop(engine);
    let engine = open_token_plan(dir.path(), OpenOptions::default());
    assert_eq!(used(&engine), 1, "the batch's unit after a reopen");
    let eve = engine.usage("key-eve", Some(T0_MS)).unwrap();
    assert_eq!(
        eve.plan.as_deref(),
        Some("Max"),
        "the seat change after a reopen"
    );
}

/// The other side of the seat change's early let-go of the append gate: a batch on the very
/// key whose seat changes, sent while the change waits for its flush, waits for the key's
/// shard (write-locked until the seat changes), so it decides on the new seat and its event
/// comes after the seat change's in the log; a reopen replays the same usage.
#[test]
fn a_batch_on_the_key_whose_seat_changes_decides_after_it_and_is_logged_after_it() {
    let (dir, faults, engine) = accounts_in_sync_database("fault-seat-same-key");
    let one = [(Unit::Requests, 1)];
    let batch = [UsageRequest::new("key-eve", "m2.7", &one).at(T0_MS)];
    let before = last_seq(&engine);
    faults.hold_flushes();
    let (seat, batched) = std::thread::scope(|scope| {
        let seat = scope.spawn(|| engine.assign_seat("@eve", "eve", "Max", Some(T0_MS)));
        let start = std::time::Instant::now();
        while faults.flushes_held() == 0 && start.elapsed() < HOLD_AT_MOST {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let batched = scope.spawn(|| engine.consume_many(&batch));
        std::thread::sleep(std::time::Duration::from_millis(50));
        faults.release_flushes();
        (
            seat.join().expect("no panic"),
            batched.join().expect("no panic"),
        )
    });
    seat.expect("the seat change");
    let decided = batched
        .into_iter()
        .next()
        .expect("one result")
        .expect("decided");
    let Decision::Admitted(admission) = &decided else {
        panic!("admitted: {decided:?}");
    };
    let plan = admission.plan.expect("on a plan");
    assert_eq!(
        &*engine.policy().plan(plan).name,
        "Max",
        "decided on the new seat"
    );
    let logged: Vec<&str> = engine
        .events_after(before, 100)
        .expect("the log")
        .iter()
        .map(|event| event.body.kind())
        .collect();
    assert_eq!(logged, ["seat_changed", "usage_admitted"]);
    let used = |engine: &Engine| engine.usage("key-eve", Some(T0_MS)).unwrap().limits[0].used;
    let live = used(&engine);
    assert_eq!(live, 1);
    drop(engine);
    let engine = open_token_plan(dir.path(), OpenOptions::default());
    assert_eq!(used(&engine), live, "the batch's unit after a reopen");
}

#[test]
fn concurrent_reserves_settles_and_voids_wait_for_their_flush_together() {
    const CALLS: usize = 8;
    let (dir, faults, engine) = accounts_in_sync_database("fault-reservations-together");
    let at = T0_MS + MINUTE_MS;
    let estimate = [(Unit::Requests, 3)];
    let request = UsageRequest::new("key-bob", "m2.7", &estimate).at(at);
    let before = engine.usage("key-bob", Some(at)).expect("usage");

    let reserves = (0..CALLS)
        .map(|_| -> Box<dyn FnOnce() -> _ + Send> { Box::new(|| engine.reserve(&request, None)) })
        .collect();
    let (reserved, all_waiting) = with_flushes_held(&engine, &faults, reserves, |engine| {
        engine.open_reservations() == CALLS
    });
    assert!(
        all_waiting,
        "all {CALLS} reserves were open together, none answered before its flush"
    );
    let mut ids: Vec<ReservationId> = reserved
        .into_iter()
        .map(|outcome| {
            let outcome = outcome.expect("reserve");
            assert!(outcome.decision.is_admitted(), "{outcome:?}");
            outcome.reservation.expect("an id")
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), CALLS, "distinct ids");

    // Half settled for one request each, half voided, all at once.
    let closes = ids
        .iter()
        .enumerate()
        .map(|(index, &id)| -> Box<dyn FnOnce() -> _ + Send> {
            let engine = &engine;
            Box::new(move || {
                if index % 2 == 0 {
                    engine
                        .settle(id, &[(Unit::Requests, 1)], Some(at))
                        .map(|outcome| format!("{outcome:?}"))
                } else {
                    engine.void(id, Some(at)).map(|()| "voided".to_string())
                }
            })
        })
        .collect();
    let (closed, all_waiting) = with_flushes_held(&engine, &faults, closes, |engine| {
        engine.open_reservations() == 0
    });
    assert!(
        all_waiting,
        "all {CALLS} closes were made together, none answered before its flush"
    );
    for (index, result) in closed.iter().enumerate() {
        let text = result.as_ref().expect("settle or void");
        assert!(
            text.starts_with(if index % 2 == 0 { "Settled" } else { "voided" }),
            "{text}"
        );
    }
    let after = engine.usage("key-bob", Some(at)).expect("usage");
    assert_eq!(
        after.limits[0].used,
        before.limits[0].used + CALLS as u64 / 2,
        "one request counted per settle, nothing per void"
    );
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    assert_eq!(engine.usage("key-bob", Some(at)).expect("usage"), after);
    assert_eq!(engine.open_reservations(), 0);
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ReservationCall {
    Reserve,
    Settle,
    Void,
}
use ReservationCall::{Reserve, Settle, Void};

/// For every pair of calls about one reservation where the second comes while the first's
/// event is not yet durable: the second does not answer before the first's flush. If the flush
/// succeeds, the second acts on or answers from the first's result; if it fails, both get the
/// log's error and the reservation is as it was before the first, in memory and on disk.
#[test]
fn a_call_about_a_reservation_whose_last_event_is_not_durable_waits_for_it() {
    for (first, second) in [
        (Reserve, Settle),
        (Reserve, Void),
        (Settle, Settle),
        (Settle, Void),
        (Void, Void),
        (Void, Settle),
    ] {
        for flush_fails in [false, true] {
            second_call_while_the_first_is_not_durable(first, second, flush_fails);
        }
    }
}

fn second_call_while_the_first_is_not_durable(
    first: ReservationCall,
    second: ReservationCall,
    flush_fails: bool,
) {
    let context = format!(
        "{first:?} then {second:?}, the flush {}",
        if flush_fails { "failing" } else { "succeeding" }
    );
    let (dir, faults, engine) = accounts_in_sync_database("fault-reservation-pending");
    let at = T0_MS + MINUTE_MS;
    let estimate = [(Unit::Requests, 3)];
    let request = UsageRequest::new("key-bob", "m2.7", &estimate).at(at);
    let actual = [(Unit::Requests, 2)];
    if first != Reserve {
        engine
            .reserve(&request, None)
            .expect("a durable reservation");
    }
    // The first reservation of this engine.
    let id = ReservationId(std::num::NonZeroU64::new(1).unwrap());
    let open_before = engine.open_reservations();
    let usage_before = engine.usage("key-bob", Some(at)).expect("usage");
    let call = |call: ReservationCall, engine: &Engine| -> Result<String, Error> {
        match call {
            Reserve => engine.reserve(&request, None).map(|outcome| {
                assert_eq!(outcome.reservation, Some(id), "{context}");
                "reserved".to_string()
            }),
            Settle => engine
                .settle(id, &actual, Some(at))
                .map(|outcome| format!("{outcome:?}")),
            Void => engine.void(id, Some(at)).map(|()| "voided".to_string()),
        }
    };
    if flush_fails {
        faults.fail_next_flushes(1);
    }
    let (first_result, second_result, answered_early) =
        second_while_the_first_waits(&faults, || call(first, &engine), || call(second, &engine));
    assert!(
        !answered_early,
        "{context}: the second call answered ({second_result:?}) before the first's flush"
    );
    if flush_fails {
        assert_storage_error(&first_result, &format!("{context}: the first call"));
        assert_storage_error(&second_result, &format!("{context}: the second call"));
        assert_eq!(engine.open_reservations(), open_before, "{context}");
        assert_eq!(
            engine.usage("key-bob", Some(at)).expect("usage"),
            usage_before,
            "{context}: in memory"
        );
    } else {
        let first_result = first_result.expect("the first call");
        let expected_second = match (first, second) {
            (Settle, Settle) => Ok(first_result.clone()),
            (_, Settle) if first != Reserve => Err(Error::ReservationClosed {
                reservation: id.get(),
                state: "voided",
            }),
            (Settle, Void) => Err(Error::ReservationClosed {
                reservation: id.get(),
                state: "settled",
            }),
            (_, Settle) => Ok(second_result.clone().expect("settled")),
            (_, _) => Ok("voided".to_string()),
        };
        assert_eq!(second_result, expected_second, "{context}");
        if first == Reserve && second == Settle {
            assert!(second_result.unwrap().starts_with("Settled"), "{context}");
        }
        assert_eq!(engine.open_reservations(), 0, "{context}");
    }
    let open_after = engine.open_reservations();
    let usage_after = engine.usage("key-bob", Some(at)).expect("usage");
    drop(engine);
    let engine = open_token_plan(dir.path(), OpenOptions::default());
    assert_eq!(engine.open_reservations(), open_after, "{context}: on disk");
    assert_eq!(
        engine.usage("key-bob", Some(at)).expect("usage"),
        usage_after,
        "{context}: on disk"
    );
}

/// A settle or a void appends its closing event under the reservation table's lock, lets the
/// lock go, waits for the event to be durable and only then frees its key's reservation slot
/// (a close whose event fails leaves the reservation open again, slot and all). A checkpoint
/// cut in that gap holds the closing event, and the key's count of open reservations from
/// before the slot was freed: reopened from that snapshot, the key counted for good a
/// reservation that no longer existed, one fewer it could open under a plan's maximum. Found
/// by `checkpoints_cut_under_concurrent_load_hold_exactly_the_events_up_to_them`
/// (tests/log.rs), which failed now and then under load.
#[test]
fn a_checkpoint_cut_while_a_close_waits_for_its_flush_counts_the_reservation_closed() {
    for settle in [true, false] {
        let context = if settle { "settled" } else { "voided" };
        let (dir, faults, engine) = accounts_in_sync_database("fault-close-cut");
        let estimate = [(Unit::Requests, 2)];
        let request = UsageRequest::new("key-bob", "m2.7", &estimate).at(AT_MS);
        let open = |engine: &Engine| {
            engine
                .usage("key-bob", Some(AT_MS))
                .expect("usage")
                .open_reservations
        };
        let reservation = engine
            .reserve(&request, None)
            .expect("reserve")
            .reservation
            .expect("a reservation");
        assert_eq!(open(&engine), 1, "{context}: after the reserve");
        let cuts_before = engine.cut_lock_times().len();
        faults.hold_flushes();
        let (closed, checkpoint, cut_in_the_gap) = std::thread::scope(|scope| {
            let closed = scope.spawn(|| {
                if settle {
                    engine
                        .settle(reservation, &[(Unit::Requests, 1)], Some(AT_MS))
                        .map(drop)
                } else {
                    engine.void(reservation, Some(AT_MS))
                }
            });
            // The closing event is appended and its flush waits at the hold.
            let start = std::time::Instant::now();
            while faults.flushes_held() == 0 && start.elapsed() < HOLD_AT_MOST {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let checkpoint = scope.spawn(|| engine.checkpoint());
            // The checkpoint's cut is taken; it then waits for the same flush.
            let start = std::time::Instant::now();
            while engine.cut_lock_times().len() == cuts_before && start.elapsed() < HOLD_AT_MOST {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let cut_in_the_gap = engine.cut_lock_times().len() > cuts_before
                && !closed.is_finished()
                && open(&engine) == 1;
            faults.release_flushes();
            (
                closed.join().expect("no panic"),
                checkpoint.join().expect("no panic"),
                cut_in_the_gap,
            )
        });
        closed.unwrap_or_else(|error| panic!("{context}: {error}"));
        let seq = checkpoint.unwrap_or_else(|error| panic!("{context}: checkpoint: {error}"));
        assert!(
            cut_in_the_gap,
            "{context}: the cut was not taken while the close waited for its flush"
        );
        assert_eq!(open(&engine), 0, "{context}: once the close is durable");
        assert_eq!(last_seq(&engine), seq, "{context}: the close is in the cut");
        // Dropped without `close`: the reopen restores the snapshot cut in the gap.
        drop(engine);
        let engine = open_token_plan(dir.path(), sync_options_with(&faults));
        assert_eq!(open(&engine), 0, "{context}: reopened from the cut");
        assert_eq!(engine.open_reservations(), 0, "{context}: reopened");
        // A later snapshot agrees with a replay from that one.
        engine.reserve(&request, None).expect("reserve again");
        engine.checkpoint().expect("checkpoint");
        drop(engine);
        let report = Engine::verify(dir.path(), sync_options_with(&Faults::new())).expect("verify");
        assert!(report.is_sound(), "{context}: {:?}", report.problems);
        assert_eq!(
            report.snapshot_matches_replay,
            Some(true),
            "{context}: the latest snapshot against a replay from the one cut in the gap"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A batch mixing keys, denials, bad entries and request ids, when the log fails under it.

/// One entry of the mixed batch: `(key, resource, quantities, id)`.
type Entry = (&'static str, &'static str, Vec<(Unit, u64)>, Option<String>);

/// What a mixed batch's entry must answer once the log fails under the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Logged by this batch (an admission, or a decision under a new id), or a repeat of
    /// such an id: the log's error.
    Failed,
    /// Bad input, or an id reused for something else: its own error, whatever the log did.
    OwnError,
    /// A repeat of an id whose first decision was durable before the batch: that decision.
    Replay,
    /// A denial without an id: nothing logged, nothing counted.
    Denied,
}

/// `len` entries over several chunks: admissions on quota, credits and pay-as-you-go, denials
/// with and without ids, bad entries, new ids, ids repeated inside the batch with the same and
/// with other quantities, and ids first used (and made durable) before the batch.
fn mixed_batch(len: usize) -> Vec<(Entry, Expect)> {
    (0..len)
        .map(|index| {
            let id = |name: String| Some(name);
            match index % 10 {
                0 => (
                    ("key-bob", "m2.7", vec![(Unit::Requests, 1)], None),
                    Expect::Failed,
                ),
                1 => (
                    (
                        "payg-dee",
                        "m2.7",
                        vec![(Unit::Requests, 1)],
                        id(format!("new-{index}")),
                    ),
                    Expect::Failed,
                ),
                // A repeat, same quantities, of the id two entries back.
                2 if index >= 10 => (
                    (
                        "payg-dee",
                        "m2.7",
                        vec![(Unit::Requests, 1)],
                        id(format!("new-{}", index - 11)),
                    ),
                    Expect::Failed,
                ),
                // The same id, other quantities: a conflict.
                3 if index >= 10 => (
                    (
                        "payg-dee",
                        "m2.7",
                        vec![(Unit::Requests, 2)],
                        id(format!("new-{}", index - 2)),
                    ),
                    Expect::OwnError,
                ),
                4 => (
                    ("key-bob", "m9", vec![(Unit::Requests, 1)], None),
                    Expect::OwnError,
                ),
                5 => (
                    (
                        "key-bob",
                        "m2.7",
                        vec![(Unit::Requests, 0)],
                        id(format!("bad-{index}")),
                    ),
                    Expect::OwnError,
                ),
                // Not covered by the plan, no credits on the team: a denial.
                6 => (
                    ("key-eve", "m2.7", vec![(Unit::Requests, 100_000)], None),
                    Expect::Denied,
                ),
                // A denial under a new id: logged, so its repeat gets the same answer.
                7 => (
                    (
                        "key-eve",
                        "m2.7",
                        vec![(Unit::Requests, 100_000)],
                        id(format!("denied-{index}")),
                    ),
                    Expect::Failed,
                ),
                // An id first used before the batch, durable.
                8 => (
                    (
                        "key-cy",
                        "image-01",
                        vec![(Unit::Images, 1)],
                        id("before".into()),
                    ),
                    Expect::Replay,
                ),
                _ => (
                    ("key-ada-acme", "m2.7", vec![(Unit::Requests, 1)], None),
                    Expect::Failed,
                ),
            }
        })
        .collect()
}

fn entry_request(entry: &Entry) -> UsageRequest<'_> {
    let (key, resource, quantities, id) = entry;
    let request = UsageRequest::new(key, resource, quantities).at(T0_MS + MINUTE_MS);
    match id {
        Some(id) => request.id(id),
        None => request,
    }
}

/// The log fails under a mixed batch of several chunks (its write, or its flush): every entry
/// whose decision the batch logged, and every repeat of such an id, answers the log's error;
/// the rest answer what they would anyway; memory is what it was before the batch and equals
/// the disk after a reopen, where the failed ids are decided afresh.
fn a_mixed_batch_under_a_failing_log(fault: Fault) {
    let (dir, faults, engine) = accounts_in_sync_database(&format!("fault-mixed-{fault:?}"));
    let before_request = UsageRequest::new("key-cy", "image-01", &[(Unit::Images, 1)])
        .at(T0_MS + MINUTE_MS)
        .id("before");
    let first = engine.consume(&before_request).expect("durable");
    let batch = mixed_batch(200);
    let requests: Vec<UsageRequest<'_>> = batch
        .iter()
        .map(|(entry, _)| entry_request(entry))
        .collect();
    let at = T0_MS + 2 * MINUTE_MS;
    let before = state(&engine, &KEYS, &TEAMS, at);
    match fault {
        Fault::Insert => faults.fail_next_inserts(1),
        Fault::Flush => faults.fail_next_flushes(1),
    }
    let (results, replays) = engine.consume_many_noting_replay(&requests);
    for (index, ((entry, expect), result)) in batch.iter().zip(&results).enumerate() {
        let context = format!("{fault:?}, entry {index} {entry:?}");
        match expect {
            Expect::Failed => assert_storage_error(result, &context),
            // A conflict with an id whose first decision the failed log lost answers the log's
            // error, whether the failure refused the first's chunk before the conflict was
            // decided (the id forgotten, decided afresh and refused in its turn, as a `consume`
            // after the failure would be) or only after (a conflict is answered once its first
            // decision stands, as a replay).
            Expect::OwnError if entry.2 == [(Unit::Requests, 2)] => {
                assert_storage_error(result, &context)
            }
            Expect::OwnError => assert!(
                matches!(
                    result,
                    Err(Error::InvalidArgument { .. } | Error::UnknownResource { .. })
                ),
                "{context}: {result:?}"
            ),
            Expect::Replay => {
                assert_eq!(result.as_ref().ok(), Some(&first), "{context}");
                assert!(replays[index], "{context}: a replay");
            }
            Expect::Denied => assert!(
                matches!(result, Ok(decision) if !decision.is_admitted()),
                "{context}: {result:?}"
            ),
        }
    }
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, at),
        &before,
        &format!("{fault:?}: in memory after the failed batch"),
    );
    drop(engine);
    let engine = open_token_plan(dir.path(), OpenOptions::default());
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, at),
        &before,
        &format!("{fault:?}: on disk"),
    );
    // Each failed id once (a repeat of one retried here would be a replay of the retry).
    let mut retried = std::collections::HashSet::new();
    for ((entry, expect), request) in batch.iter().zip(&requests) {
        if *expect != Expect::Failed || !entry.3.as_ref().is_some_and(|id| retried.insert(id)) {
            continue;
        }
        let (_, replayed) = engine
            .consume_noting_replay(request)
            .unwrap_or_else(|error| panic!("{fault:?}: {entry:?} after a reopen: {error}"));
        assert!(
            !replayed,
            "{fault:?}: {entry:?} decided afresh after a reopen"
        );
    }
}

#[test]
fn a_mixed_batch_whose_write_fails_answers_every_logged_entry_with_the_error() {
    a_mixed_batch_under_a_failing_log(Fault::Insert);
}

#[test]
fn a_mixed_batch_whose_flush_fails_answers_every_logged_entry_with_the_error() {
    a_mixed_batch_under_a_failing_log(Fault::Flush);
}

/// A flush (even runs) or a write (odd runs) that fails while checkpoints are cut back to back
/// and three threads consume (with request ids, one at a time and in `consume_many` batches)
/// and reserve and void: each thread stops at its first error. In `Sync` mode memory never runs ahead of disk, so after the drop
/// (no `close`) the reopened engine (from whichever snapshot was stored before the failure, and
/// the log after it) must hold exactly the state the failed engine had, every acknowledged id
/// must be a replay, and every reservation acknowledged open still open. A checkpoint whose cut
/// holds an event the failure took back must not be stored.
#[test]
fn a_flush_failing_while_checkpoints_are_cut_loses_nothing_acknowledged_and_adds_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    for run in 0..12u64 {
        let context = format!("run {run}");
        let (dir, faults, engine) = accounts_in_sync_database("fault-racing-checkpoints");
        let running = AtomicBool::new(true);
        let keys = ["key-ada", "key-bob", "key-cy", "key-eve", "key-ada-acme"];
        let (ids, open) = std::thread::scope(|scope| {
            let (engine, running) = (&engine, &running);
            let singles = scope.spawn(move || {
                let _stops_the_others = StoreOnDrop(running, false);
                let mut acknowledged = Vec::new();
                for step in 0..10_000u64 {
                    let key = keys[step as usize % keys.len()];
                    let id = format!("one-{step}");
                    let request = UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)])
                        .at(AT_MS)
                        .id(&id);
                    match engine.consume(&request) {
                        Ok(decision) => acknowledged.push((key, id, decision.is_admitted())),
                        Err(_) => break,
                    }
                }
                acknowledged
            });
            let batches = scope.spawn(move || {
                let _stops_the_others = StoreOnDrop(running, false);
                let mut acknowledged = Vec::new();
                'rounds: for round in 0..1_000u64 {
                    let ids: Vec<String> = (0..70)
                        .map(|index| format!("many-{round}-{index}"))
                        .collect();
                    let requests: Vec<UsageRequest<'_>> = ids
                        .iter()
                        .enumerate()
                        .map(|(index, id)| {
                            UsageRequest::new(
                                keys[index % keys.len()],
                                "m2.7",
                                &[(Unit::Requests, 1)],
                            )
                            .at(AT_MS)
                            .id(id)
                        })
                        .collect();
                    let results = engine.consume_many(&requests);
                    for (index, (id, result)) in ids.iter().zip(results).enumerate() {
                        match result {
                            Ok(decision) => acknowledged.push((
                                keys[index % keys.len()],
                                id.clone(),
                                decision.is_admitted(),
                            )),
                            Err(_) => break 'rounds,
                        }
                    }
                }
                acknowledged
            });
            let reservations = scope.spawn(move || {
                let _stops_the_others = StoreOnDrop(running, false);
                let mut open = Vec::new();
                for step in 0..10_000u64 {
                    let key = keys[step as usize % keys.len()];
                    let request = UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)]).at(AT_MS);
                    let Ok(outcome) = engine.reserve(&request, Some(DAY_MS)) else {
                        break;
                    };
                    let Some(reservation) = outcome.reservation else {
                        continue;
                    };
                    if step % 2 == 0 {
                        open.push(reservation);
                    } else if engine.void(reservation, Some(AT_MS)).is_err() {
                        // Open again, as it was: the void failed.
                        open.push(reservation);
                        break;
                    }
                }
                open
            });
            scope.spawn(move || {
                while running.load(Relaxed) {
                    let _ = engine.checkpoint();
                }
            });
            std::thread::sleep(std::time::Duration::from_millis(5 + run * 3));
            if run % 2 == 0 {
                faults.fail_next_flushes(1);
            } else {
                faults.fail_next_inserts(1);
            }
            let mut ids = singles.join().expect("no panic");
            ids.extend(batches.join().expect("no panic"));
            (ids, reservations.join().expect("no panic"))
        });
        assert!(engine.checkpoint().is_err(), "{context}: the log failed");
        let before = state(&engine, &KEYS, &TEAMS, AT_MS);
        drop(engine);
        let report = Engine::verify(dir.path(), sync_options_with(&Faults::new())).expect("verify");
        assert!(report.is_sound(), "{context}: {:?}", report.problems);
        let reopened = open_token_plan(dir.path(), sync_options_with(&Faults::new()));
        let after = state(&reopened, &KEYS, &TEAMS, AT_MS);
        assert_same_state(&after, &before, &format!("{context}: reopened"));
        for (key, id, admitted) in &ids {
            let request = UsageRequest::new(key, "m2.7", &[(Unit::Requests, 1)])
                .at(AT_MS)
                .id(id);
            let (decision, replayed) = reopened.check_noting_replay(&request).expect("check");
            assert!(replayed, "{context}: {id} forgotten after the reopen");
            assert_eq!(decision.is_admitted(), *admitted, "{context}: {id}");
        }
        for reservation in open {
            reopened
                .void(reservation, Some(AT_MS))
                .unwrap_or_else(|error| panic!("{context}: {reservation:?}: {error}"));
        }
    }
}
