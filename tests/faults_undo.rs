//! Undoing what a failed log refused, in whatever order the calls see the failure: the engine's
//! state afterwards is what a reopen restores from the log. Each test had a refund's (a void's,
//! a settle's) credits spent or paid before the failure, and the undo left the team with
//! credits no logged event gives it (`Team::force_charge` stopped at zero).

mod log_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use log_support::*;
use tally_engine::{ChargedTo, Decision, Error, Faults, SettleOutcome, Unit, UsageRequest};

fn credits_charge(decision: &Decision) -> u64 {
    match decision {
        Decision::Admitted(admission) => match admission.charged_to {
            ChargedTo::Credits { micros } => micros,
            ref other => panic!("expected a credits charge, got {other:?}"),
        },
        other => panic!("expected an admission, got {other:?}"),
    }
}

/// A refund gives credits back; another request spends them before the refund's event is
/// durable; the flush fails, failing both. The refund is undone first (`Team::force_charge`,
/// which stops at zero, so it takes back less than it gave), then the submitted consume gives
/// back what it charged in full: the team ends with credits no event on disk gives it.
#[test]
fn a_failed_refund_undone_after_its_credits_were_spent_creates_credits() {
    let dir = TempDir::new("faults-undo-refund-undo");
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let at = Some(T0_MS);
    // zed has no seat: every request is charged to @zed's credits.
    engine.create_user("zed", "key-zed", at).expect("a user");
    let one = [(Unit::Requests, 1)];
    // What one request costs, from a twin.
    let price = {
        let twin = twin(tally_engine::Policy::token_plan());
        twin.create_user("zed", "key-zed", at).unwrap();
        twin.top_up("@zed", 1_000_000, at).unwrap();
        credits_charge(
            &twin
                .consume(&UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS))
                .unwrap(),
        )
    };
    assert!(price > 0);
    engine.top_up("@zed", price, at).expect("a top-up");
    let first = engine
        .consume(
            &UsageRequest::new("key-zed", "m2.7", &one)
                .at(T0_MS)
                .id("r1"),
        )
        .expect("admitted");
    assert_eq!(credits_charge(&first), price);
    assert_eq!(engine.credits_micros("@zed").unwrap(), 0);
    engine.sync().expect("durable");

    faults.hold_flushes();
    faults.fail_next_flushes(1);
    let refunded = std::thread::scope(|scope| {
        let refund = scope.spawn(|| engine.refund("r1", Some(T0_MS + 1)));
        wait_until_flush_held(&faults);
        // The refund's credits are back in memory, its event waiting for the held flush.
        let start = Instant::now();
        while engine.credits_micros("@zed").unwrap() != price
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(engine.credits_micros("@zed").unwrap(), price);
        // Another request spends them, its event queued behind the refund's.
        let request = UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS + 2);
        let submitted = engine.submit(&request).expect("submitted");
        assert_eq!(credits_charge(submitted.decision()), price);
        faults.release_flushes();
        let refunded = refund.join().expect("no panic");
        // The refund was undone first; now the submission is completed (and undone).
        let completed = submitted.complete();
        assert!(
            matches!(completed, Err(Error::Storage { .. })),
            "the submission fails with the log: {completed:?}"
        );
        refunded
    });
    assert!(
        matches!(refunded, Err(Error::Storage { .. })),
        "the refund fails: {refunded:?}"
    );
    let in_memory = engine.credits_micros("@zed").unwrap();
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let on_disk = engine.credits_micros("@zed").unwrap();
    assert_eq!(
        on_disk, 0,
        "on disk: r1 charged everything, nothing else stands"
    );
    assert_eq!(
        in_memory, on_disk,
        "in memory after both failed calls were undone, as on disk"
    );
}

/// The same through a void: a credits hold voided gives its credits back, a submitted consume
/// spends them before the void's event is durable, the flush fails. The void's undo
/// (`take_back`, `force_charge`) stops at zero, then the consume gives back its charge in
/// full: the reopened database has the reservation open and no credits, memory has the
/// reservation open and the credits too.
#[test]
fn a_failed_void_undone_after_its_credits_were_spent_creates_credits() {
    let dir = TempDir::new("faults-undo-void-undo");
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let at = Some(T0_MS);
    engine.create_user("zed", "key-zed", at).expect("a user");
    let one = [(Unit::Requests, 1)];
    let price = {
        let twin = twin(tally_engine::Policy::token_plan());
        twin.create_user("zed", "key-zed", at).unwrap();
        twin.top_up("@zed", 1_000_000, at).unwrap();
        credits_charge(
            &twin
                .consume(&UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS))
                .unwrap(),
        )
    };
    engine.top_up("@zed", price, at).expect("a top-up");
    let reserved = engine
        .reserve(
            &UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS),
            Some(HOUR_MS),
        )
        .expect("reserve");
    let id = reserved.reservation.expect("a credits hold");
    assert_eq!(
        engine.credits_micros("@zed").unwrap(),
        0,
        "the hold took it all"
    );
    engine.sync().expect("durable");

    faults.hold_flushes();
    faults.fail_next_flushes(1);
    let voided = std::thread::scope(|scope| {
        let void = scope.spawn(|| engine.void(id, Some(T0_MS + 1)));
        wait_until_flush_held(&faults);
        let start = Instant::now();
        while engine.credits_micros("@zed").unwrap() != price
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(engine.credits_micros("@zed").unwrap(), price);
        let request = UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS + 2);
        let submitted = engine.submit(&request).expect("submitted");
        assert_eq!(credits_charge(submitted.decision()), price);
        faults.release_flushes();
        let voided = void.join().expect("no panic");
        let completed = submitted.complete();
        assert!(
            matches!(completed, Err(Error::Storage { .. })),
            "the submission fails with the log: {completed:?}"
        );
        voided
    });
    assert!(
        matches!(voided, Err(Error::Storage { .. })),
        "the void fails: {voided:?}"
    );
    let in_memory = (
        engine.credits_micros("@zed").unwrap(),
        engine.open_reservations(),
    );
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let on_disk = (
        engine.credits_micros("@zed").unwrap(),
        engine.open_reservations(),
    );
    assert_eq!(
        on_disk,
        (0, 1),
        "on disk: the hold stands and took everything"
    );
    assert_eq!(
        in_memory, on_disk,
        "in memory after the failed calls, as on disk"
    );
}

/// No race at all: a settle of a credits hold that trades units (less of one, more of
/// another) and pays its extra with what the hold gives back (`refund_and_charge`, the
/// balance alone being short) fails to log. Its undo takes back what the hold gave back first
/// (`force_charge`, stopping at zero, though the balance then holds only the give-back less
/// the extra's price), then gives back the extra's price in full: the team gains credits.
#[test]
fn a_failed_settle_paying_its_extra_with_the_hold_is_undone_into_more_credits() {
    let dir = TempDir::new("faults-undo-settle-undo");
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let at = Some(T0_MS);
    engine.create_user("zed", "key-zed", at).expect("a user");
    // m2.7: 2,000 micros a request, 1 a token.
    let estimate = [(Unit::Requests, 1), (Unit::Tokens, 5_000)];
    engine.top_up("@zed", 7_000, at).expect("a top-up");
    let reserved = engine
        .reserve(
            &UsageRequest::new("key-zed", "m2.7", &estimate).at(T0_MS),
            Some(HOUR_MS),
        )
        .expect("reserve");
    let id = reserved.reservation.expect("a credits hold");
    assert_eq!(
        engine.credits_micros("@zed").unwrap(),
        0,
        "the hold took it all"
    );
    engine.sync().expect("durable");
    let before = state(&engine, &["key-zed"], &["@zed"], T0_MS + 1);

    // Without a fault the settle is admitted: the 5,000 tokens given back pay the 2,000 of the
    // second request (a twin shows it).
    {
        let twin = twin(tally_engine::Policy::token_plan());
        twin.create_user("zed", "key-zed", at).unwrap();
        twin.top_up("@zed", 7_000, at).unwrap();
        let id = twin
            .reserve(
                &UsageRequest::new("key-zed", "m2.7", &estimate).at(T0_MS),
                Some(HOUR_MS),
            )
            .unwrap()
            .reservation
            .unwrap();
        let settled = twin.settle(id, &[(Unit::Requests, 2)], Some(T0_MS + 1));
        assert!(
            matches!(settled, Ok(SettleOutcome::Settled(_))),
            "{settled:?}"
        );
        assert_eq!(twin.credits_micros("@zed").unwrap(), 3_000);
    }

    faults.fail_next_flushes(1);
    let settled = engine.settle(id, &[(Unit::Requests, 2)], Some(T0_MS + 1));
    assert!(
        matches!(settled, Err(Error::Storage { .. })),
        "the settle fails: {settled:?}"
    );
    let in_memory = state(&engine, &["key-zed"], &["@zed"], T0_MS + 1);
    drop(engine);
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let on_disk = state(&engine, &["key-zed"], &["@zed"], T0_MS + 1);
    assert_same_state(
        &on_disk,
        &before,
        "on disk: the hold stands, as before the settle",
    );
    assert_same_state(&in_memory, &before, "in memory after the failed settle");
}

/// `ada`'s key on a Max seat, with request `r1` of 5 `unit` of `resource` admitted at T0 (not
/// yet made durable).
fn max_key_with_r1(engine: &tally_engine::Engine, resource: &str, unit: Unit) {
    let at = Some(T0_MS);
    engine.create_user("ada", "key-ada", at).expect("a user");
    engine
        .assign_seat("@ada", "ada", "Max", at)
        .expect("a Max seat");
    let first = engine
        .consume(
            &UsageRequest::new("key-ada", resource, &[(unit, 5)])
                .at(T0_MS)
                .id("r1"),
        )
        .expect("decided");
    assert!(matches!(first, Decision::Admitted(_)), "{first:?}");
}

/// What `limit` counts on `key-ada` (at T0 + 3 ms) in `engine`, then in the same database
/// reopened: `(in memory, on disk)`.
fn counted_then_reopened(
    engine: tally_engine::Engine,
    dir: &std::path::Path,
    faults: &Arc<Faults>,
    limit: &str,
) -> (u64, u64) {
    let in_memory = used(&engine, "key-ada", limit, T0_MS + 3);
    drop(engine);
    let engine = open_token_plan(dir, sync_options_with(faults));
    (in_memory, used(&engine, "key-ada", limit, T0_MS + 3))
}

/// The used count of `key`'s limit named `limit` at `at_ms`.
fn used(engine: &tally_engine::Engine, key: &str, limit: &str, at_ms: u64) -> u64 {
    let report = engine.usage(key, Some(at_ms)).expect("a report");
    report
        .limits
        .iter()
        .find(|report| report.name == limit)
        .unwrap_or_else(|| panic!("no limit {limit:?} in {report:?}"))
        .used
}

/// Usage counters, as credits were: a consume (submitted, not yet durable) adds units to a
/// bucket a durable correction had emptied; a refund of an earlier request then takes them
/// (its receipt names that bucket) and is held before its append; the flush fails. The
/// consume's undo comes first and finds the bucket empty (`refund` stops at what it holds,
/// giving back nothing); the refund's undo then forces its units back in full. Memory ends
/// counting units that no logged event counts.
fn a_failed_refund_undone_after_a_failed_consume(
    label: &str,
    resource: &str,
    unit: Unit,
    limit: &str,
) {
    let dir = TempDir::new(label);
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    max_key_with_r1(&engine, resource, unit);
    let five = [(unit, 5)];
    // A correction takes r1's units out again (durable): the bucket is empty, and r1's
    // receipt still names it.
    engine
        .adjust_usage(
            "key-ada",
            resource,
            &five,
            T0_MS,
            tally_engine::AdjustmentDirection::Remove,
            Some(T0_MS),
        )
        .expect("a correction");
    engine.sync().expect("durable");
    assert_eq!(used(&engine, "key-ada", limit, T0_MS + 3), 0);

    faults.hold_flushes();
    faults.fail_next_flushes(1);
    faults.hold_give_backs();
    let refunded = std::thread::scope(|scope| {
        // The consume fills the bucket again, its event written but held before its flush.
        let request = UsageRequest::new("key-ada", resource, &five).at(T0_MS + 1);
        let submitted = engine.submit(&request).expect("submitted");
        assert!(
            matches!(submitted.decision(), Decision::Admitted(_)),
            "{:?}",
            submitted.decision()
        );
        wait_until_flush_held(&faults);
        assert_eq!(used(&engine, "key-ada", limit, T0_MS + 3), 5);
        // The refund of r1 takes the consume's units, then waits before its append.
        let refund = scope.spawn(|| engine.refund("r1", Some(T0_MS + 2)));
        wait_until_give_back_held(&faults);
        assert_eq!(used(&engine, "key-ada", limit, T0_MS + 3), 0);
        // The flush fails: the consume is undone first.
        faults.release_flushes();
        let completed = submitted.complete();
        assert!(
            matches!(completed, Err(Error::Storage { .. })),
            "the submission fails with the log: {completed:?}"
        );
        // Then the refund reaches its append, which the failed log refuses.
        faults.release_give_backs();
        refund.join().expect("no panic")
    });
    assert!(
        matches!(refunded, Err(Error::Storage { .. })),
        "the refund fails: {refunded:?}"
    );
    let (in_memory, on_disk) = counted_then_reopened(engine, dir.path(), &faults, limit);
    assert_eq!(
        on_disk, 0,
        "on disk: r1 and the correction stand, nothing else"
    );
    assert_eq!(
        in_memory, on_disk,
        "{limit}: in memory after both failed calls were undone, as on disk"
    );
}

#[test]
fn a_failed_refund_undone_after_a_failed_consume_leaves_a_rolling_counter_as_on_disk() {
    a_failed_refund_undone_after_a_failed_consume(
        "faults-undo-usage-rolling",
        "m2.7",
        Unit::Requests,
        "m2.7:requests per rolling:5h",
    );
}

#[test]
fn a_failed_refund_undone_after_a_failed_consume_leaves_a_daily_counter_as_on_disk() {
    a_failed_refund_undone_after_a_failed_consume(
        "faults-undo-usage-daily",
        "speech-2.8",
        Unit::Characters,
        "speech-2.8:characters per daily",
    );
}

/// The same with a correction upwards in place of the consume: its undo (`unforce_counter`,
/// stopping at what the counter holds) comes first and takes nothing, the refund's then puts
/// its units back in full.
#[test]
fn a_failed_refund_undone_after_a_failed_correction_upwards_leaves_the_counter_as_on_disk() {
    let dir = TempDir::new("faults-undo-usage-correction");
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let limit = "m2.7:requests per rolling:5h";
    max_key_with_r1(&engine, "m2.7", Unit::Requests);
    let five = [(Unit::Requests, 5)];
    let correct = |direction, at_ms| {
        engine.adjust_usage("key-ada", "m2.7", &five, T0_MS, direction, Some(at_ms))
    };
    correct(tally_engine::AdjustmentDirection::Remove, T0_MS).expect("a correction");
    engine.sync().expect("durable");
    assert_eq!(used(&engine, "key-ada", limit, T0_MS + 3), 0);

    faults.hold_flushes();
    faults.fail_next_flushes(1);
    let (added, refunded) = std::thread::scope(|scope| {
        let add = scope.spawn(|| correct(tally_engine::AdjustmentDirection::Add, T0_MS + 1));
        wait_until_flush_held(&faults);
        assert_eq!(used(&engine, "key-ada", limit, T0_MS + 3), 5);
        faults.hold_give_backs();
        let refund = scope.spawn(|| engine.refund("r1", Some(T0_MS + 2)));
        wait_until_give_back_held(&faults);
        assert_eq!(used(&engine, "key-ada", limit, T0_MS + 3), 0);
        faults.release_flushes();
        // The correction is undone first, then the refund reaches its append.
        let added = add.join().expect("no panic");
        faults.release_give_backs();
        (added, refund.join().expect("no panic"))
    });
    assert!(
        matches!(added, Err(Error::Storage { .. })),
        "the correction fails: {added:?}"
    );
    assert!(
        matches!(refunded, Err(Error::Storage { .. })),
        "the refund fails: {refunded:?}"
    );
    let (in_memory, on_disk) = counted_then_reopened(engine, dir.path(), &faults, limit);
    assert_eq!(on_disk, 0, "on disk: r1 and the first correction stand");
    assert_eq!(
        in_memory, on_disk,
        "in memory after both failed calls were undone, as on disk"
    );
}

fn snapshot_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("snapshots"))
        .map(|entries| {
            entries
                .map(|entry| entry.expect("an entry").path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A debt lives in memory only: a snapshot cut while one is open (a refund's undo has taken
/// credits a submitted consume spent, the consume not yet undone) would store a state no
/// reopen could pay it from. No snapshot is stored once the log failed: `checkpoint` and
/// `close` refuse, and the reopened database is the log's.
#[test]
fn no_snapshot_is_stored_while_a_failed_logs_undos_owe_credits() {
    let dir = TempDir::new("faults-undo-debt-checkpoint");
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let at = Some(T0_MS);
    engine.create_user("zed", "key-zed", at).expect("a user");
    let one = [(Unit::Requests, 1)];
    // m2.7: 2,000 micro-credits a request.
    let price = 2_000;
    engine.top_up("@zed", price, at).expect("a top-up");
    let first = engine
        .consume(
            &UsageRequest::new("key-zed", "m2.7", &one)
                .at(T0_MS)
                .id("r1"),
        )
        .expect("admitted");
    assert_eq!(credits_charge(&first), price);
    engine
        .checkpoint()
        .expect("a checkpoint while the log is sound");
    let snapshots = snapshot_files(dir.path());
    assert!(!snapshots.is_empty());

    faults.hold_flushes();
    faults.fail_next_flushes(1);
    let (refunded, submitted) = std::thread::scope(|scope| {
        let refund = scope.spawn(|| engine.refund("r1", Some(T0_MS + 1)));
        wait_until_flush_held(&faults);
        let start = Instant::now();
        while engine.credits_micros("@zed").unwrap() != price
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let request = UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS + 2);
        let submitted = engine.submit(&request).expect("submitted");
        assert_eq!(credits_charge(submitted.decision()), price);
        faults.release_flushes();
        (refund.join().expect("no panic"), submitted)
    });
    assert!(
        matches!(refunded, Err(Error::Storage { .. })),
        "{refunded:?}"
    );
    // The refund was undone; the consume's charge still stands, the debt open.
    let checkpointed = engine.checkpoint();
    assert!(
        matches!(checkpointed, Err(Error::Storage { .. })),
        "a checkpoint after the log failed: {checkpointed:?}"
    );
    assert_eq!(snapshot_files(dir.path()), snapshots, "no snapshot stored");
    let completed = submitted.complete();
    assert!(
        matches!(completed, Err(Error::Storage { .. })),
        "{completed:?}"
    );
    let in_memory = engine.credits_micros("@zed").unwrap();
    let closed = engine.close();
    assert!(
        matches!(closed, Err(Error::Storage { .. })),
        "close after the log failed: {closed:?}"
    );
    assert_eq!(snapshot_files(dir.path()), snapshots, "no snapshot stored");
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    assert_eq!(engine.credits_micros("@zed").unwrap(), 0);
    assert_eq!(in_memory, 0, "in memory, as on disk");
}

/// A rolling bucket of a limit of at most 65,535 counts at most 65,535. A refund frees its
/// units before its append (held there); a correction upwards then fills the bucket to the
/// brim, logged ahead of the refund. A replay applies the correction before the refund, to a
/// bucket still holding the refund's units: past the brim, refused (`force` changes nothing).
/// `fail` makes the refund's write fail (its undo cannot put its units back either: the bucket
/// is full); else it stands.
fn a_correction_fills_a_bucket_a_held_refund_emptied(label: &str, fail: bool) {
    let dir = TempDir::new(label);
    let faults = Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    let limit = "m2.7:requests per rolling:5h";
    max_key_with_r1(&engine, "m2.7", Unit::Requests);
    engine.sync().expect("durable");

    faults.hold_give_backs();
    let (added, refunded) = std::thread::scope(|scope| {
        let refund = scope.spawn(|| engine.refund("r1", Some(T0_MS + 1)));
        wait_until_give_back_held(&faults);
        assert_eq!(used(&engine, "key-ada", limit, T0_MS + 3), 0);
        let added = engine.adjust_usage(
            "key-ada",
            "m2.7",
            &[(Unit::Requests, 65_535)],
            T0_MS,
            tally_engine::AdjustmentDirection::Add,
            Some(T0_MS + 2),
        );
        if fail {
            faults.fail_next_inserts(1);
        }
        faults.release_give_backs();
        (added, refund.join().expect("no panic"))
    });
    assert!(
        added.is_ok(),
        "the correction fits the emptied bucket: {added:?}"
    );
    assert_eq!(refunded.is_err(), fail, "the refund: {refunded:?}");
    let (in_memory, on_disk) = counted_then_reopened(engine, dir.path(), &faults, limit);
    assert_eq!(
        in_memory, on_disk,
        "{limit}: in memory, as the reopened database (refund failed: {fail})"
    );
}

#[test]
fn a_correction_filling_a_bucket_a_held_refund_emptied_replays_as_in_memory() {
    a_correction_fills_a_bucket_a_held_refund_emptied("faults-undo-brim", false);
}

#[test]
fn a_failed_refund_of_a_bucket_a_correction_filled_leaves_it_as_on_disk() {
    a_correction_fills_a_bucket_a_held_refund_emptied("faults-undo-brim-failed", true);
}

/// The other way round: a refund frees a bucket's units (held before its append), a
/// correction upwards fills the bucket to the brim (65,535), both share a flush that fails.
/// If the refund is undone first, its units no longer fit (`force` refuses, changing
/// nothing); the correction's undo then takes all it added, leaving the bucket below the
/// log's (r1's 5). The order is the threads' (both wait for the same flush): tried a number of
/// times, each must end as the log says.
#[test]
fn a_failed_refund_and_a_failed_correction_filling_its_bucket_leave_it_as_on_disk() {
    for round in 0..24 {
        let dir = TempDir::new(&format!("faults-undo-brim-race-{round}"));
        let faults = Faults::new();
        let engine = open_token_plan(dir.path(), sync_options_with(&faults));
        let limit = "m2.7:requests per rolling:5h";
        max_key_with_r1(&engine, "m2.7", Unit::Requests);
        engine.sync().expect("durable");

        faults.hold_give_backs();
        let (added, refunded) = std::thread::scope(|scope| {
            let refund = scope.spawn(|| engine.refund("r1", Some(T0_MS + 1)));
            wait_until_give_back_held(&faults);
            faults.hold_flushes();
            faults.fail_next_flushes(1);
            let add = scope.spawn(|| {
                engine.adjust_usage(
                    "key-ada",
                    "m2.7",
                    &[(Unit::Requests, 65_535)],
                    T0_MS,
                    tally_engine::AdjustmentDirection::Add,
                    Some(T0_MS + 2),
                )
            });
            wait_until_flush_held(&faults);
            assert_eq!(used(&engine, "key-ada", limit, T0_MS + 3), 65_535);
            // The refund appends behind the correction, and waits for the same flush.
            faults.release_give_backs();
            std::thread::sleep(Duration::from_millis(20));
            faults.release_flushes();
            (
                add.join().expect("no panic"),
                refund.join().expect("no panic"),
            )
        });
        assert!(matches!(added, Err(Error::Storage { .. })), "{added:?}");
        assert!(
            matches!(refunded, Err(Error::Storage { .. })),
            "{refunded:?}"
        );
        let (in_memory, on_disk) = counted_then_reopened(engine, dir.path(), &faults, limit);
        assert_eq!(on_disk, 5, "round {round}: on disk, r1 alone");
        assert_eq!(
            in_memory, on_disk,
            "round {round}: in memory after both failed calls were undone, as on disk"
        );
    }
}
