//! Request ids: how long one is remembered, what a check and a repeat answer, and what a
//! reopen keeps when another call fell between a `consume_many` chunk's decisions and its
//! append.

mod log_support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log_support::*;
use tally_engine::{
    Clock, Decision, DenialReason, Engine, OpenOptions, Policy, Unit, UsageRequest,
};

/// An in-memory engine on a manual clock at T0, with the populated accounts, and its clock.
fn accounts_in_memory() -> (Arc<tally_engine::ManualClock>, Engine) {
    let clock = Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine = Engine::new(
        Policy::token_plan(),
        Arc::clone(&clock) as Arc<dyn Clock>,
        tally_engine::EngineOptions::default(),
    )
    .expect("an engine");
    create_accounts(&engine);
    (clock, engine)
}

/// The same, logged in `dir` (`Sync`).
fn accounts_logged(dir: &std::path::Path) -> (Arc<tally_engine::ManualClock>, Engine) {
    let clock = Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine = open_on_clock(dir, clock.clone(), sync_options());
    create_accounts(&engine);
    (clock, engine)
}

/// A clock that runs a hook once, on its `trigger`th read after being armed: a way to make
/// another thread act at a chosen point inside an engine call (the clock is read just before
/// a `consume_many` request with an id takes its id's shard).
#[derive(Debug, Default)]
struct HookClock {
    now_ms: AtomicU64,
    reads: AtomicUsize,
    trigger: AtomicUsize,
    hook: Mutex<Option<Hook>>,
}

struct Hook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl HookClock {
    fn new(now_ms: u64) -> HookClock {
        HookClock {
            now_ms: AtomicU64::new(now_ms),
            trigger: AtomicUsize::new(usize::MAX),
            ..HookClock::default()
        }
    }

    /// Runs `hook` on the `nth` read from now (1: the next one).
    fn arm(&self, nth: usize, hook: impl FnOnce() + Send + 'static) {
        *self.hook.lock().unwrap() = Some(Hook(Box::new(hook)));
        let reads = self.reads.load(Ordering::SeqCst);
        self.trigger.store(reads + nth, Ordering::SeqCst);
    }
}

impl Clock for HookClock {
    fn now_ms(&self) -> u64 {
        let read = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        if read == self.trigger.load(Ordering::SeqCst) {
            let hook = self.hook.lock().unwrap().take();
            if let Some(Hook(hook)) = hook {
                hook();
            }
        }
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// A hook that runs `call` on a thread of its own and waits for it at most 300 ms (it may be
/// waiting for the very call the hook interrupted); the thread goes into `joins`.
fn on_a_thread(
    engine: &Arc<Engine>,
    joins: &Arc<Mutex<Vec<JoinHandle<()>>>>,
    call: impl FnOnce(&Engine) + Send + 'static,
) -> impl FnOnce() + Send + 'static {
    let engine = Arc::clone(engine);
    let joins = Arc::clone(joins);
    move || {
        let (done, finished) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            call(&engine);
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(Duration::from_millis(300));
        joins.lock().unwrap().push(thread);
    }
}

/// A durable engine on a `HookClock` at ten minutes past `T0_MS` (returned), in a new
/// directory named after `name`, with `create_accounts`'s accounts.
fn hooked_engine(name: &str) -> (TempDir, u64, Arc<HookClock>, Arc<Engine>) {
    let dir = TempDir::new(name);
    let at_ms = T0_MS + 10 * MINUTE_MS;
    let clock = Arc::new(HookClock::new(at_ms));
    let engine = Arc::new(open_on_clock(dir.path(), clock.clone(), sync_options()));
    create_accounts(&engine);
    (dir, at_ms, clock, engine)
}

fn join_all(joins: &Arc<Mutex<Vec<JoinHandle<()>>>>) {
    for thread in joins.lock().unwrap().drain(..) {
        thread.join().expect("the hook's thread");
    }
}

const ONE: [(Unit, u64); 1] = [(Unit::Requests, 1)];

/// Sends two requests on `key-eve` at `at_ms` (ids "first" and "second") with `call` run on another thread on the clock read of the
/// second request (the first decided, its record kept, its event staged but not appended);
/// returns the batch and its results once `call` has ended.
fn batch_with_a_call_in_its_gap(
    engine: &Arc<Engine>,
    clock: &HookClock,
    at_ms: u64,
    call: impl FnOnce(&Engine) + Send + 'static,
) -> (
    [UsageRequest<'static>; 2],
    Vec<Result<Decision, tally_engine::Error>>,
) {
    let joins = Arc::new(Mutex::new(Vec::new()));
    clock.arm(2, on_a_thread(engine, &joins, call));
    let batch = [
        UsageRequest::new("key-eve", "m2.7", &ONE)
            .at(at_ms)
            .id("first"),
        UsageRequest::new("key-eve", "m2.7", &ONE)
            .at(at_ms)
            .id("second"),
    ];
    let results = engine.consume_many(&batch);
    join_all(&joins);
    (batch, results)
}

/// The token plan with one more plan, named to sort first: every plan's id moves up by one.
fn token_plan_with_a_plan_in_front() -> Policy {
    let mut document = Policy::token_plan().document().clone();
    let starter = document.plans["Starter"].clone();
    document.plans.insert("Aaa".into(), starter);
    Policy::compile(document).expect("a valid policy")
}

#[test]
fn a_swap_between_a_batch_chunks_decisions_and_its_append_renames_the_ids_after_a_reopen_too() {
    let (dir, at_ms, clock, engine) = hooked_engine("idem-swap-chunk");
    // Between the batch's two requests, another thread swaps in a policy that renumbers every
    // plan.
    let (batch, results) = batch_with_a_call_in_its_gap(&engine, &clock, at_ms, move |engine| {
        engine
            .swap_policy(token_plan_with_a_plan_in_front(), Some(at_ms))
            .expect("the swap");
    });
    for result in results {
        assert!(result.expect("admitted").is_admitted());
    }
    assert_eq!(engine.policy().generation(), 1, "the swap ran");
    let repeat = |engine: &Engine| -> Decision { engine.consume(&batch[0]).expect("a repeat") };
    let live = repeat(&engine);
    let Decision::Admitted(admission) = live else {
        panic!("admitted: {live:?}");
    };
    let plan = admission.plan.expect("on a plan");
    assert_eq!(&*engine.policy().plan(plan).name, "Plus");
    // Dropped, not closed: no checkpoint, the reopen replays the log.
    drop(Arc::try_unwrap(engine).expect("the only handle"));
    let reopened = open(
        dir.path(),
        token_plan_with_a_plan_in_front(),
        sync_options(),
    );
    let after = repeat(&reopened);
    let named = |decision: &Decision| match decision {
        Decision::Admitted(admission) => admission
            .plan
            .map(|plan| reopened.policy().plan(plan).name.to_string()),
        Decision::Denied(_) => None,
    };
    assert_eq!(
        named(&after),
        Some("Plus".to_string()),
        "the repeat after the reopen names another plan: {after:?}"
    );
    assert_eq!(after, live);
}

#[test]
fn a_refund_of_an_id_whose_batch_chunk_is_not_yet_appended_stays_refunded_after_a_reopen() {
    let (dir, at_ms, clock, engine) = hooked_engine("idem-refund-chunk");
    // Between the batch's two requests, another thread refunds the first.
    let refunded = Arc::new(Mutex::new(None));
    let outcome = Arc::clone(&refunded);
    let (_, results) = batch_with_a_call_in_its_gap(&engine, &clock, at_ms, move |engine| {
        *outcome.lock().unwrap() = Some(engine.refund("first", Some(at_ms)).is_ok());
    });
    for result in results {
        assert!(result.expect("admitted").is_admitted());
    }
    assert_eq!(*refunded.lock().unwrap(), Some(true), "the refund ran");
    let used = |engine: &Engine| engine.usage("key-eve", Some(at_ms)).unwrap().limits[0].used;
    assert_eq!(used(&engine), 1, "two admitted, one refunded");
    assert!(
        engine.refund("first", Some(at_ms)).is_err(),
        "refunded once"
    );
    // Dropped, not closed: no checkpoint, the reopen replays the log.
    drop(Arc::try_unwrap(engine).expect("the only handle"));
    let reopened = open(dir.path(), Policy::token_plan(), sync_options());
    let used_after_reopen = used(&reopened);
    let again = reopened.refund("first", Some(at_ms));
    assert_eq!(
        (used_after_reopen, again.is_err()),
        (1, true),
        "after the reopen: used {used_after_reopen}, a second refund {again:?}, used then {}",
        used(&reopened)
    );
}

#[test]
fn a_request_stamped_ahead_of_the_clock_is_remembered_for_the_horizon_after_its_stamp() {
    let (clock, engine) = accounts_in_memory();
    let horizon_ms = engine.policy().longest_window_ms();
    // A gateway whose clock is an hour ahead of the engine's.
    let at_ms = T0_MS + HOUR_MS;
    let request = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(at_ms)
        .id("ahead");
    let (_, replayed) = engine.consume_noting_replay(&request).expect("the first");
    assert!(!replayed);
    // Its retry, within the horizon after the request's timestamp (not after the clock's
    // time when it arrived).
    clock.set_ms(at_ms + horizon_ms - MINUTE_MS);
    let (_, replayed) = engine.consume_noting_replay(&request).expect("the retry");
    let used = engine.usage("key-eve", Some(at_ms)).unwrap().limits[0].used;
    assert_eq!(
        (replayed, used),
        (true, 1),
        "the retry was decided and counted again"
    );
}

#[test]
fn a_check_of_an_id_past_the_horizon_answers_what_a_consume_would() {
    let (clock, engine) = accounts_in_memory();
    let horizon_ms = engine.policy().longest_window_ms();
    let first = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("old");
    engine.consume(&first).expect("the first");
    // Past the horizon (its shard not used since, so the id is still in the table), the id
    // sent again at the clock's time: a new request for a consume.
    let now_ms = T0_MS + horizon_ms + MINUTE_MS;
    clock.set_ms(now_ms);
    let again = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(now_ms)
        .id("old");
    let (_, check_replayed) = engine.check_noting_replay(&again).expect("the check");
    let (_, consume_replayed) = engine.consume_noting_replay(&again).expect("the consume");
    assert_eq!(
        check_replayed, consume_replayed,
        "check said replayed {check_replayed}, the consume {consume_replayed}"
    );
}

/// A new id stamped longer ago than the horizon: `consume` refuses it (a retry could not be
/// recognised), so `check` must refuse it too rather than answer a decision no consume gives.
#[test]
fn a_check_of_a_new_id_stamped_before_the_horizon_is_refused_as_a_consume_is() {
    let (clock, engine) = accounts_in_memory();
    let horizon_ms = engine.policy().longest_window_ms();
    clock.set_ms(T0_MS + horizon_ms + MINUTE_MS);
    let old = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("too-old");
    let consumed = engine.consume(&old);
    assert!(
        matches!(consumed, Err(tally_engine::Error::InvalidArgument { .. })),
        "the consume: {consumed:?}"
    );
    let checked = engine.check(&old);
    assert_eq!(
        checked, consumed,
        "the check answered what no consume would"
    );
    assert_eq!(
        engine
            .usage("key-eve", Some(T0_MS + horizon_ms))
            .unwrap()
            .limits[0]
            .used,
        0
    );
}

/// How many ids `admit_old_ids` admits: enough that some fall in another shard than the first
/// (64 shards, by the id's hash).
const OLD_IDS: usize = 16;

/// The requests `admit_old_ids` admits, on the pay-as-you-go key (each admitted and charged)
/// at `T0_MS`, ids "old-0" onwards.
fn old_requests(ids: &[String]) -> Vec<UsageRequest<'_>> {
    ids.iter()
        .map(|id| UsageRequest::new("payg-dee", "m2.7", &ONE).at(T0_MS).id(id))
        .collect()
}

fn old_ids() -> Vec<String> {
    (0..OLD_IDS).map(|n| format!("old-{n}")).collect()
}

fn admit_old_ids(engine: &Engine) {
    create_accounts(engine);
    for request in old_requests(&old_ids()) {
        assert!(engine.consume(&request).expect("admitted").is_admitted());
    }
}

/// Past the horizon of the old ids, a check of "old-0" at the clock's time: its shard drops
/// the ids past the horizon (a sweep), and no other shard is used. Returns the clock's time.
fn sweep_the_first_shard_past_the_horizon(
    engines: &[&Engine],
    clock: &tally_engine::ManualClock,
) -> u64 {
    let horizon_ms = engines[0].policy().longest_window_ms();
    let now_ms = T0_MS + horizon_ms + MINUTE_MS;
    clock.set_ms(now_ms);
    for engine in engines {
        let check = UsageRequest::new("payg-dee", "m2.7", &ONE)
            .at(now_ms)
            .id("old-0");
        let (_, replayed) = engine.check_noting_replay(&check).expect("the check");
        assert!(!replayed, "old-0 is past its horizon");
    }
    now_ms
}

/// Each old id's refund at the clock's time.
fn refund_every_old_id(
    engine: &Engine,
) -> Vec<(String, Result<tally_engine::Refund, tally_engine::Error>)> {
    old_ids()
        .into_iter()
        .map(|id| {
            let refunded = engine.refund(&id, None);
            (id, refunded)
        })
        .collect()
}

fn payg_spend(engine: &Engine) -> u64 {
    engine.usage("payg-dee", Some(T0_MS)).unwrap().payg_micros
}

/// Ids past their horizon, some in a shard a check has since swept, the others in shards not
/// used since: every refund is `UnknownRequest` and gives nothing back. The refund looked the
/// id up without the horizon: the swept one was unknown and the others were refunded.
#[test]
fn a_refund_of_an_id_past_its_horizon_is_unknown_whether_or_not_its_shard_was_swept() {
    let clock = Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine = Engine::new(
        Policy::token_plan(),
        Arc::clone(&clock) as Arc<dyn Clock>,
        tally_engine::EngineOptions::default(),
    )
    .expect("an engine");
    admit_old_ids(&engine);
    let spent = payg_spend(&engine);
    assert!(spent > 0, "the old requests were charged");
    sweep_the_first_shard_past_the_horizon(&[&engine], &clock);
    for (id, refunded) in refund_every_old_id(&engine) {
        assert!(
            matches!(&refunded, Err(tally_engine::Error::UnknownRequest { request_id, .. }) if *request_id == id),
            "{id}: {refunded:?}"
        );
    }
    assert_eq!(payg_spend(&engine), spent, "nothing given back");
}

/// An id is refunded up to the horizon after its stamp (the clock's time), and is unknown a
/// millisecond later, though no sweep has dropped it.
#[test]
fn a_refund_is_answered_up_to_the_horizon_after_the_stamp_and_unknown_a_millisecond_later() {
    for past_ms in [0, 1] {
        let clock = Arc::new(tally_engine::ManualClock::new(T0_MS));
        let engine = Engine::new(
            Policy::token_plan(),
            Arc::clone(&clock) as Arc<dyn Clock>,
            tally_engine::EngineOptions::default(),
        )
        .expect("an engine");
        admit_old_ids(&engine);
        let horizon_ms = engine.policy().longest_window_ms();
        clock.set_ms(T0_MS + horizon_ms + past_ms);
        let refunded = engine.refund("old-1", None);
        match past_ms {
            0 => assert!(refunded.is_ok(), "within the horizon: {refunded:?}"),
            _ => assert!(
                matches!(refunded, Err(tally_engine::Error::UnknownRequest { .. })),
                "past the horizon: {refunded:?}"
            ),
        }
    }
}

/// A database whose engine stopped after a check swept one shard past the old ids' horizon
/// (no checkpoint: the reopen replays every old id's admission), then closed cleanly (its
/// snapshot holds the ids its cut found): each reopen answers every old id's refund, and its
/// repeat, as an engine that never stopped does. The reopen restored the swept id, which the
/// live engine had forgotten, and refunded it.
#[test]
fn a_reopened_engine_answers_refunds_and_repeats_past_the_horizon_as_the_live_one_does() {
    let dir = TempDir::new("idem-refund-forgotten");
    let clock = Arc::new(tally_engine::ManualClock::new(T0_MS));
    let durable = open_on_clock(dir.path(), clock.clone(), sync_options());
    let live = Engine::new(
        Policy::token_plan(),
        Arc::clone(&clock) as Arc<dyn Clock>,
        tally_engine::EngineOptions::default(),
    )
    .expect("an engine");
    admit_old_ids(&durable);
    admit_old_ids(&live);
    sweep_the_first_shard_past_the_horizon(&[&durable, &live], &clock);
    drop(durable);
    let ids = old_ids();
    let repeats = |engine: &Engine| -> Vec<_> {
        old_requests(&ids)
            .iter()
            .map(|request| {
                engine
                    .consume_noting_replay(request)
                    .map(|(_, replayed)| replayed)
            })
            .collect()
    };
    let live_refunds = refund_every_old_id(&live);
    let live_repeats = repeats(&live);
    let replayed = open_on_clock(dir.path(), clock.clone(), sync_options());
    assert_eq!(refund_every_old_id(&replayed), live_refunds, "replayed");
    assert_eq!(repeats(&replayed), live_repeats, "replayed");
    replayed.close().expect("a clean close");
    let restored = open_on_clock(dir.path(), clock, sync_options());
    assert_eq!(
        refund_every_old_id(&restored),
        live_refunds,
        "from a snapshot"
    );
    assert_eq!(repeats(&restored), live_repeats, "from a snapshot");
}

#[test]
fn a_seat_change_between_a_batch_chunks_decisions_and_its_append_keeps_the_usage_after_a_reopen() {
    let (dir, at_ms, clock, engine) = hooked_engine("idem-seat-chunk");
    // Between the batch's two requests (the first admitted on Plus), another thread moves the
    // key to a plan that does not count m2.7.
    let (_, admitted) = batch_with_a_call_in_its_gap(&engine, &clock, at_ms, move |engine| {
        engine
            .assign_seat("@eve", "eve", "Plus-Highspeed", Some(at_ms))
            .expect("the seat change");
    });
    assert!(admitted[0].as_ref().expect("decided").is_admitted());
    // Back on Plus within the window: the usage counted on it counts again.
    engine
        .assign_seat("@eve", "eve", "Plus", Some(at_ms + 1))
        .expect("back on Plus");
    let used = |engine: &Engine| engine.usage("key-eve", Some(at_ms + 2)).unwrap().limits[0].used;
    let live = used(&engine);
    // 1 with the seat changed between the two requests, 2 with it changed after the batch.
    assert!(live >= 1, "used {live}");
    drop(Arc::try_unwrap(engine).expect("the only handle"));
    let reopened = open(dir.path(), Policy::token_plan(), sync_options());
    assert_eq!(used(&reopened), live, "the admitted unit after the reopen");
}

#[test]
fn a_correction_between_a_batch_chunks_decisions_and_its_append_is_replayed_as_it_was_applied() {
    let (dir, at_ms, clock, engine) = hooked_engine("idem-correction-chunk");
    // Between the batch's two requests, another thread removes the unit the first counted.
    let (_, results) = batch_with_a_call_in_its_gap(&engine, &clock, at_ms, move |engine| {
        engine
            .adjust_usage(
                "key-eve",
                "m2.7",
                &ONE,
                at_ms,
                tally_engine::AdjustmentDirection::Remove,
                Some(at_ms),
            )
            .expect("the correction");
    });
    for decided in results {
        assert!(decided.expect("decided").is_admitted());
    }
    let used = |engine: &Engine| engine.usage("key-eve", Some(at_ms + 1)).unwrap().limits[0].used;
    let live = used(&engine);
    // 1 with the correction between the two requests or after the batch.
    assert_eq!(live, 1);
    drop(Arc::try_unwrap(engine).expect("the only handle"));
    let reopened = open(dir.path(), Policy::token_plan(), sync_options());
    assert_eq!(
        used(&reopened),
        live,
        "the correction replayed as it was applied"
    );
}

/// A repeat of an id submitted while the batch that first decided it has not appended its
/// chunk yet: the submission is not durable, and its completion (detached, on another thread)
/// waits for the chunk and answers the first decision as a replay, counting nothing.
#[test]
fn a_submitted_repeat_of_an_id_whose_batch_chunk_is_not_yet_appended_waits_for_it() {
    let (_dir, at_ms, clock, engine) = hooked_engine("idem-submit-chunk");
    let seen = Arc::new(Mutex::new(None));
    let outcome = Arc::clone(&seen);
    let (batch, results) = batch_with_a_call_in_its_gap(&engine, &clock, at_ms, move |engine| {
        let repeat = UsageRequest::new("key-eve", "m2.7", &ONE)
            .at(at_ms)
            .id("first");
        let submission = engine.submit(&repeat).expect("a repeat").detach();
        let durable = engine.is_durable(&submission).expect("its engine");
        *outcome.lock().unwrap() = Some((durable, submission));
    });
    let (durable, submission) = seen.lock().unwrap().take().expect("the submit ran");
    assert!(!durable, "durable before its chunk was appended");
    let first = results[0].clone().expect("admitted");
    let completed = std::thread::scope(|scope| {
        scope
            .spawn(|| engine.complete(submission))
            .join()
            .expect("no panic")
    });
    assert_eq!(completed, Ok((first, true)), "the first decision, replayed");
    assert_eq!(
        engine.usage("key-eve", Some(at_ms)).unwrap().limits[0].used,
        2,
        "the batch's two, nothing for the repeat"
    );
    assert!(engine.consume_noting_replay(&batch[0]).unwrap().1);
}

/// A check of an id whose first decision (a batch's) is staged but not yet appended: a
/// repeat's answer acknowledges the first decision as much as the first call's does, so it
/// waits until that decision's event is durable (were it never, the id would be forgotten and
/// a consume decide it anew). The check answered the staged decision at once, before its
/// event was even in the log.
#[test]
fn a_check_of_an_id_whose_batch_chunk_is_not_yet_appended_waits_for_it() {
    let (_dir, at_ms, clock, engine) = hooked_engine("idem-check-chunk");
    let seen = Arc::new(Mutex::new(None));
    let outcome = Arc::clone(&seen);
    let (_, results) = batch_with_a_call_in_its_gap(&engine, &clock, at_ms, move |engine| {
        let repeat = UsageRequest::new("key-eve", "m2.7", &ONE)
            .at(at_ms)
            .id("first");
        let checked = engine.check_noting_replay(&repeat);
        // What the log held when the check answered.
        *outcome.lock().unwrap() = Some((checked, last_seq(engine)));
    });
    let (checked, logged_when_answered) = seen.lock().unwrap().take().expect("the check ran");
    let first = results[0].clone().expect("admitted");
    assert_eq!(checked, Ok((first, true)), "the first decision, replayed");
    // The batch's two events are the log's last two.
    let first_seq = last_seq(&engine) - 1;
    assert!(
        logged_when_answered >= first_seq,
        "the check answered with the log at {logged_when_answered}, before the first \
         decision's event {first_seq}"
    );
}

/// An engine on a manual clock whose request-id table has one place, with the accounts of
/// `create_accounts`.
fn accounts_with_one_request_id_place() -> Engine {
    let engine = Engine::new(
        Policy::token_plan(),
        Arc::new(tally_engine::ManualClock::new(T0_MS)) as Arc<dyn Clock>,
        tally_engine::EngineOptions {
            idempotency_capacity: 1,
            ..tally_engine::EngineOptions::default()
        },
    )
    .expect("an engine");
    create_accounts(&engine);
    engine
}

/// `request` answered by check, consume, `consume_many` and submit, in that order.
fn on_every_path(
    engine: &Engine,
    request: &UsageRequest<'_>,
) -> [Result<Decision, tally_engine::Error>; 4] {
    let submitted = engine
        .submit(request)
        .and_then(|submission| submission.complete())
        .map(|(decision, _)| decision);
    [
        engine.check(request),
        engine.consume(request),
        engine
            .consume_many(std::slice::from_ref(request))
            .pop()
            .expect("one"),
        submitted,
    ]
}

/// A new id when the request-id table is full of live ids: `consume` refuses it
/// (`CapacityExceeded`, the id could not be remembered), so `check` must refuse it too.
#[test]
fn a_check_of_a_new_id_with_the_table_full_is_refused_as_a_consume_is() {
    let engine = accounts_with_one_request_id_place();
    let first = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("first");
    engine.consume(&first).expect("the first");
    let second = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("second");
    let checked = engine.check(&second);
    let consumed = engine.consume(&second);
    assert!(
        matches!(consumed, Err(tally_engine::Error::CapacityExceeded { .. })),
        "the consume: {consumed:?}"
    );
    assert_eq!(
        checked, consumed,
        "the check answered what no consume would"
    );
}

/// A request with a new id from a key the engine does not know, or has revoked, is denied as
/// such whatever the request-id table says: with the table full it was refused
/// `CapacityExceeded`, and stamped too long ago the `at_ms` error, though such a denial is
/// never remembered (it takes no place, needs no stamp) and the same request with room was
/// denied `UnknownKey`. Every path alike: consume, check, consume_many, submit.
#[test]
fn a_new_id_without_a_valid_key_is_denied_as_such_whatever_the_table_says() {
    let engine = accounts_with_one_request_id_place();
    engine.revoke_key("key-ada", Some(T0_MS)).expect("revoke");
    let filler = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("filler");
    assert!(engine
        .consume(&filler)
        .expect("the table's one place")
        .is_admitted());
    let horizon_ms = engine.policy().longest_window_ms();
    let answers = |key: &str, id: &str, at_ms: u64| {
        on_every_path(
            &engine,
            &UsageRequest::new(key, "m2.7", &ONE).at(at_ms).id(id),
        )
    };
    let stale_ms = T0_MS - horizon_ms - 1;
    for (key, reason) in [
        ("key-nobody", DenialReason::UnknownKey),
        ("key-ada", DenialReason::KeyRevoked),
    ] {
        for (what, at_ms) in [("full", T0_MS), ("stale", stale_ms)] {
            for answer in answers(key, &format!("{key}-{what}"), at_ms) {
                match answer {
                    Ok(Decision::Denied(denial)) => {
                        assert_eq!(denial.reason, reason, "{key}, {what}")
                    }
                    other => panic!("{key}, {what}: {other:?}"),
                }
            }
        }
    }
    // A working key still meets the table's refusals.
    for answer in answers("key-eve", "eve-new", T0_MS) {
        assert!(
            matches!(answer, Err(tally_engine::Error::CapacityExceeded { .. })),
            "{answer:?}"
        );
    }
    for answer in answers("key-eve", "eve-stale", stale_ms) {
        assert!(
            matches!(
                answer,
                Err(tally_engine::Error::InvalidArgument { field: "at_ms", .. })
            ),
            "{answer:?}"
        );
    }
    // An unknown resource is refused as such first, as with room.
    let request = UsageRequest::new("key-nobody", "m9", &ONE)
        .at(T0_MS)
        .id("nobody-m9");
    assert!(
        matches!(
            engine.consume(&request),
            Err(tally_engine::Error::UnknownResource { .. })
        ),
        "{:?}",
        engine.consume(&request)
    );
}

/// A key no key could ever be (a control character in it) under a new id is refused for
/// the key, naming it, whatever the request-id table says, as the same request with room is:
/// with the table full, or stamped too long ago, it was denied `UnknownKey` instead (the
/// key's own refusal, asked first, skipped the key's shape). Every path alike.
#[test]
fn a_new_id_on_a_malformed_key_is_refused_for_the_key_whatever_the_table_says() {
    let engine = accounts_with_one_request_id_place();
    let horizon_ms = engine.policy().longest_window_ms();
    let answers = |id: &str, at_ms: u64| {
        on_every_path(
            &engine,
            &UsageRequest::new("key\nnobody", "m2.7", &ONE)
                .at(at_ms)
                .id(id),
        )
    };
    let is_key_error = |answer: &Result<Decision, tally_engine::Error>| {
        matches!(
            answer,
            Err(tally_engine::Error::InvalidArgument { field: "key", .. })
        )
    };
    // With room: the key's error.
    for answer in answers("roomy", T0_MS) {
        assert!(is_key_error(&answer), "with room: {answer:?}");
    }
    let filler = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("filler");
    assert!(engine
        .consume(&filler)
        .expect("the table's one place")
        .is_admitted());
    for (what, at_ms) in [("full", T0_MS), ("stale", T0_MS - horizon_ms - 1)] {
        for answer in answers(what, at_ms) {
            assert!(is_key_error(&answer), "{what}: {answer:?}");
        }
    }
}

/// After a reopen, a new id stamped before the bound the open sets (past the latest stamp of
/// an id forgotten before the close: it may be a retry of that one) but within the horizon of
/// the clock, stepped back: `consume` refuses it, and `check` does too.
#[test]
fn a_check_after_a_reopen_refuses_a_new_id_stamped_before_what_was_forgotten_as_a_consume_does() {
    let dir = TempDir::new("idem-check-forgotten");
    let (clock, engine) = accounts_logged(dir.path());
    let horizon_ms = engine.policy().longest_window_ms();
    let gone = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("gone");
    assert!(engine.consume(&gone).expect("the first").is_admitted());
    // Past its horizon, a check of it forgets it.
    clock.set_ms(T0_MS + horizon_ms + 2 * HOUR_MS);
    assert!(engine.check(&gone).is_err(), "forgotten");
    engine.close().expect("a clean close");
    clock.set_ms(T0_MS + 2 * HOUR_MS);
    let engine = open_on_clock(dir.path(), clock, sync_options());
    let old = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("maybe-forgotten");
    let checked = engine.check(&old);
    let consumed = engine.consume(&old);
    assert!(
        matches!(consumed, Err(tally_engine::Error::InvalidArgument { .. })),
        "the consume: {consumed:?}"
    );
    assert_eq!(
        checked, consumed,
        "the check answered what no consume would"
    );
}

/// A request id denied because no valid key sent it (a key the engine does not know, or one
/// it revoked) is neither remembered nor logged: before, each such denial took a place in the
/// request-id table for the whole horizon (a month) and an event in the log, so a caller with
/// no key could fill the table, and every new id of every key was refused `CapacityExceeded`
/// until the month passed. Such an id is decided anew when it comes again: admitted once the
/// key exists, or on the member's new key after a rotation.
#[test]
fn an_id_denied_for_want_of_a_valid_key_takes_no_place_and_logs_nothing() {
    let dir = TempDir::new("ids-no-key");
    let options = OpenOptions {
        engine: tally_engine::EngineOptions {
            idempotency_capacity: 5,
            ..tally_engine::EngineOptions::default()
        },
        ..sync_options()
    };
    let engine = open_token_plan(dir.path(), options.clone());
    create_accounts(&engine);
    engine.revoke_key("key-ada", Some(T0_MS)).expect("revoke");
    let events = last_seq(&engine);
    let ids: Vec<String> = (0..12).map(|n| format!("stray-{n}")).collect();
    let unknown = |n: usize| {
        UsageRequest::new(
            if n % 2 == 0 { "key-nobody" } else { "key-ada" },
            "m2.7",
            &ONE,
        )
        .at(T0_MS)
        .id(&ids[n])
    };
    for n in 0..4 {
        let decision = engine.consume(&unknown(n)).expect("a denial, not an error");
        assert!(!decision.is_admitted(), "{decision:?}");
    }
    let batch: Vec<UsageRequest<'_>> = (4..8).map(unknown).collect();
    for decided in engine.consume_many(&batch) {
        assert!(!decided.expect("a denial").is_admitted());
    }
    for n in 8..12 {
        let (decision, _) = engine
            .submit(&unknown(n))
            .expect("submitted")
            .complete()
            .expect("a denial");
        assert!(!decision.is_admitted());
    }
    assert_eq!(
        last_seq(&engine),
        events,
        "a denial without a valid key is not logged"
    );
    // The table has every place left: new ids of a working key are admitted (four here,
    // and one more below, of the five places).
    for n in 0..4 {
        let id = format!("eve-{n}");
        let request = UsageRequest::new("key-eve", "m2.7", &ONE).at(T0_MS).id(&id);
        assert!(engine.consume(&request).expect("a place").is_admitted());
    }
    // The key made after its id was denied: the retry is decided anew, and admitted.
    engine
        .create_user("nobody", "key-nobody", Some(T0_MS))
        .expect("the key now");
    engine
        .assign_seat("@nobody", "nobody", "Plus", Some(T0_MS))
        .expect("a seat");
    let (decision, replayed) = engine
        .consume_noting_replay(
            &UsageRequest::new("key-nobody", "m2.7", &ONE)
                .at(T0_MS)
                .id("late"),
        )
        .expect("admitted");
    assert!(decision.is_admitted() && !replayed);
    drop(engine);
    // Nothing of the strays comes back after a reopen either; the admitted ids do.
    let engine = open_token_plan(dir.path(), options);
    let (decision, replayed) = engine
        .consume_noting_replay(
            &UsageRequest::new("key-eve", "m2.7", &ONE)
                .at(T0_MS)
                .id("eve-0"),
        )
        .expect("a repeat");
    assert!(decision.is_admitted() && replayed);
}

/// A member whose key was revoked and replaced retries, on the new key, a request the old key
/// was denied under the same id: it is decided on the new key (before, the id was remembered
/// for the old key and the retry was `RequestIdConflict` for a month).
#[test]
fn an_id_denied_on_a_revoked_key_is_decided_anew_on_its_replacement() {
    let engine = twin(Policy::token_plan());
    create_accounts(&engine);
    engine.revoke_key("key-eve", Some(T0_MS)).expect("revoke");
    let old = UsageRequest::new("key-eve", "m2.7", &ONE)
        .at(T0_MS)
        .id("retry-me");
    assert!(!engine.consume(&old).expect("denied").is_admitted());
    engine
        .add_member("@eve", "eve", "key-eve-2", Some(T0_MS))
        .expect("a new key");
    engine
        .assign_seat("@eve", "eve", "Plus", Some(T0_MS))
        .expect("its seat");
    let new = UsageRequest::new("key-eve-2", "m2.7", &ONE)
        .at(T0_MS)
        .id("retry-me");
    let (decision, replayed) = engine.consume_noting_replay(&new).expect("no conflict");
    assert!(decision.is_admitted() && !replayed, "{decision:?}");
    // Remembered now, as any admitted id.
    let (_, replayed) = engine.consume_noting_replay(&new).expect("a repeat");
    assert!(replayed);
}

/// A request id denied because its key did not exist yet is decided anew when it is retried
/// once the key does: admitted, not the old `UnknownKey` replayed. (The test above retries
/// under a fresh id, as its table has no place left for this one.)
#[test]
fn an_id_denied_for_an_unknown_key_is_admitted_when_retried_once_the_key_exists() {
    let engine = twin(Policy::token_plan());
    create_accounts(&engine);
    let request = UsageRequest::new("key-later", "m2.7", &ONE)
        .at(T0_MS)
        .id("early");
    let (decision, replayed) = engine.consume_noting_replay(&request).expect("a denial");
    assert!(!decision.is_admitted() && !replayed, "{decision:?}");
    engine
        .create_user("later", "key-later", Some(T0_MS))
        .expect("the key now");
    engine
        .assign_seat("@later", "later", "Plus", Some(T0_MS))
        .expect("its seat");
    let (decision, replayed) = engine.consume_noting_replay(&request).expect("admitted");
    assert!(decision.is_admitted() && !replayed, "{decision:?}");
    let (_, replayed) = engine.consume_noting_replay(&request).expect("a repeat");
    assert!(replayed, "the admitted id is remembered");
}

/// An id forgotten by the clock (past the horizon), then a clean close (its checkpoint's
/// snapshot no longer holds the id, and no event follows it) and a reopen on a clock stepped
/// back within the id's horizon: the retry of the forgotten id, stamped as it first was, is
/// refused as the engine that never closed refuses it (its shard forgot ids by that clock).
/// The open bounded forgotten ids by the newest logged event's time alone, which was the id's
/// own (nothing logged since): the retry was decided and charged again.
#[test]
fn an_id_forgotten_before_a_close_is_not_decided_again_after_a_reopen_on_a_clock_stepped_back() {
    let dir = TempDir::new("idem-forgotten-close");
    let (clock, engine) = accounts_logged(dir.path());
    let horizon_ms = engine.policy().longest_window_ms();
    // On the pay-as-you-go key: every admission is charged (its spend), none is refused.
    let retried = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS)
        .id("forgotten");
    let (_, replayed) = engine.consume_noting_replay(&retried).expect("the first");
    assert!(!replayed);
    let spent = payg_spend(&engine);
    assert!(spent > 0, "the first was charged");
    // The clock passes the id's horizon; a check of it (nothing logged) forgets it.
    clock.set_ms(T0_MS + horizon_ms + MINUTE_MS);
    let live = engine.check(&retried);
    assert!(
        matches!(
            live,
            Err(tally_engine::Error::InvalidArgument { field: "at_ms", .. })
        ),
        "forgotten, and too old to be remembered again: {live:?}"
    );
    engine.close().expect("a clean close");
    // The clock stepped back across the restart, to within the id's horizon.
    clock.set_ms(T0_MS + horizon_ms - MINUTE_MS);
    let reopened = open_on_clock(dir.path(), clock, sync_options());
    let after = reopened.consume_noting_replay(&retried);
    assert!(
        matches!(
            after,
            Err(tally_engine::Error::InvalidArgument { field: "at_ms", .. })
        ),
        "the retry after the reopen: {after:?}, spent {} (first {spent})",
        payg_spend(&reopened)
    );
    assert_eq!(payg_spend(&reopened), spent, "charged once");
}

/// How far ahead the clock glitches in the tests below: a year, far past the horizon.
const GLITCH_MS: u64 = 365 * DAY_MS;

/// Whether `result` is the refusal of a new id stamped too early to be remembered.
fn refused_as_too_old<T>(result: &Result<T, tally_engine::Error>) -> bool {
    matches!(
        result,
        Err(tally_engine::Error::InvalidArgument { field: "at_ms", .. })
    )
}

/// A clock that reads a year ahead for one checkpoint, then comes back: nothing was forgotten
/// by that reading (no request came), so a fresh id stamped by the real clock is decided, live
/// and after a reopen, and an id remembered before the glitch is still answered as a repeat.
/// The open bounded forgotten ids by the latest checkpoint's clock reading less the horizon:
/// every new id was refused for eleven months after every reopen (and the glitched record of
/// when the checkpoint's events were logged stayed until compaction, which it held back too).
#[test]
fn a_clock_glitched_ahead_at_a_checkpoint_refuses_no_fresh_id_after_a_reopen() {
    let dir = TempDir::new("idem-glitch-checkpoint");
    let (clock, engine) = accounts_logged(dir.path());
    let before = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS)
        .id("before");
    let (_, replayed) = engine.consume_noting_replay(&before).expect("the first");
    assert!(!replayed);
    clock.set_ms(T0_MS + GLITCH_MS);
    engine
        .checkpoint()
        .expect("a checkpoint on the glitched clock");
    clock.set_ms(T0_MS + MINUTE_MS);
    let live = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS + MINUTE_MS)
        .id("fresh-live");
    let (decision, replayed) = engine
        .consume_noting_replay(&live)
        .expect("a fresh id live");
    assert!(decision.is_admitted() && !replayed, "{decision:?}");
    engine.close().expect("a clean close");
    clock.set_ms(T0_MS + 2 * MINUTE_MS);
    let reopened = open_on_clock(dir.path(), clock, sync_options());
    let fresh = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS + 2 * MINUTE_MS)
        .id("fresh-after-reopen");
    let after = reopened.consume_noting_replay(&fresh);
    assert!(
        matches!(&after, Ok((decision, false)) if decision.is_admitted()),
        "a fresh id after the reopen: {after:?}"
    );
    let (_, replayed) = reopened.consume_noting_replay(&before).expect("a repeat");
    assert!(replayed, "the id from before the glitch is remembered");
}

/// A request that comes while the clock reads a year ahead forgets the ids its shard held
/// (their horizon has passed by that reading): their retries, stamped as they first were, are
/// refused from then on, live and after a reopen, never decided and charged again. That is
/// the whole of the glitch's consequence for request ids: a fresh id stamped after every id
/// forgotten is decided as usual once the clock is back. The shard bounded what it forgot by
/// the glitched clock less the horizon, refusing every new id stamped before that for eleven
/// months; and the open, bounding by the clock's readings at checkpoints (none glitched),
/// decided and charged the forgotten id's retry again.
#[test]
fn a_request_on_a_clock_glitched_ahead_refuses_only_the_ids_it_forgot() {
    let dir = TempDir::new("idem-glitch-request");
    let (clock, engine) = accounts_logged(dir.path());
    let before = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS)
        .id("before");
    let (_, replayed) = engine.consume_noting_replay(&before).expect("the first");
    assert!(!replayed);
    let price = payg_spend(&engine);
    assert!(price > 0, "the first was charged");
    clock.set_ms(T0_MS + GLITCH_MS);
    // Its retry, on the glitched clock: too old to be remembered, and forgotten.
    assert!(refused_as_too_old(&engine.consume_noting_replay(&before)));
    clock.set_ms(T0_MS + MINUTE_MS);
    let retry = engine.consume_noting_replay(&before);
    assert!(
        refused_as_too_old(&retry),
        "the forgotten id's retry: {retry:?}"
    );
    // Fresh ids enough to land in every one of the table's 64 shards, the forgetful one too.
    const FRESH: u64 = 256;
    let fresh_ids: Vec<String> = (0..FRESH).map(|n| format!("fresh-live-{n}")).collect();
    for id in &fresh_ids {
        let live = UsageRequest::new("payg-dee", "m2.7", &ONE)
            .at(T0_MS + MINUTE_MS)
            .id(id);
        let after = engine.consume_noting_replay(&live);
        assert!(
            matches!(&after, Ok((decision, false)) if decision.is_admitted()),
            "a fresh id ({id}) once the clock is back: {after:?}"
        );
    }
    engine.close().expect("a clean close");
    clock.set_ms(T0_MS + 2 * MINUTE_MS);
    let reopened = open_on_clock(dir.path(), clock, sync_options());
    let retry = reopened.consume_noting_replay(&before);
    assert!(
        refused_as_too_old(&retry),
        "the retry after the reopen: {retry:?}"
    );
    let fresh = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS + 2 * MINUTE_MS)
        .id("fresh-after-reopen");
    let after = reopened.consume_noting_replay(&fresh);
    assert!(
        matches!(&after, Ok((decision, false)) if decision.is_admitted()),
        "a fresh id after the reopen: {after:?}"
    );
    let live = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS + MINUTE_MS)
        .id(&fresh_ids[0]);
    let (_, replayed) = reopened.consume_noting_replay(&live).expect("a repeat");
    assert!(replayed, "an id decided after the glitch is remembered");
    // Charged for the first request and the fresh ones, never for a retry.
    assert_eq!(payg_spend(&reopened), (FRESH + 2) * price);
}

/// An id forgotten before one checkpoint, then a later checkpoint that records its cut's
/// request-id bound but cannot store its snapshot, then a crash: the open restores the earlier
/// snapshot (which no longer holds the id) and bounds forgotten ids by the later cut's record,
/// which covers it. The forgotten id's retry, stamped as it first was, on a clock back from a
/// glitch, is refused, never decided and charged again; a fresh id is decided.
#[test]
fn a_later_checkpoint_that_recorded_its_bound_but_stored_no_snapshot_still_bounds_the_open() {
    let dir = TempDir::new("idem-failed-cut-bound");
    let (clock, engine) = accounts_logged(dir.path());
    let before = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS)
        .id("before");
    let (_, replayed) = engine.consume_noting_replay(&before).expect("the first");
    assert!(!replayed);
    let price = payg_spend(&engine);
    assert!(price > 0, "the first was charged");
    // Forgotten by a glitched clock, then a checkpoint once it is back: its snapshot has no
    // record of the id, and no event after it names it.
    clock.set_ms(T0_MS + GLITCH_MS);
    assert!(refused_as_too_old(&engine.consume_noting_replay(&before)));
    clock.set_ms(T0_MS + MINUTE_MS);
    engine.checkpoint().expect("the checkpoint that stores");
    let between = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS + MINUTE_MS)
        .id("between");
    let (decision, _) = engine.consume_noting_replay(&between).expect("between");
    assert!(decision.is_admitted());
    // A later checkpoint records its bound, then cannot store its snapshot.
    let snapshots = dir.path().join("snapshots");
    let aside = dir.path().join("snapshots-aside");
    std::fs::rename(&snapshots, &aside).unwrap();
    std::fs::write(&snapshots, b"not a directory").unwrap();
    assert!(engine.checkpoint().is_err(), "its snapshot is not stored");
    std::fs::remove_file(&snapshots).unwrap();
    std::fs::rename(&aside, &snapshots).unwrap();
    // A crash: no checkpoint at the close.
    drop(engine);
    clock.set_ms(T0_MS + 2 * MINUTE_MS);
    let reopened = open_on_clock(dir.path(), clock, sync_options());
    let retry = reopened.consume_noting_replay(&before);
    assert!(
        refused_as_too_old(&retry),
        "the forgotten id's retry: {retry:?}"
    );
    let (_, replayed) = reopened.consume_noting_replay(&between).expect("a repeat");
    assert!(
        replayed,
        "the id logged after the stored snapshot is restored"
    );
    let fresh = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS + 2 * MINUTE_MS)
        .id("fresh");
    let after = reopened.consume_noting_replay(&fresh);
    assert!(
        matches!(&after, Ok((decision, false)) if decision.is_admitted()),
        "a fresh id after the reopen: {after:?}"
    );
    assert_eq!(payg_spend(&reopened), 3 * price, "each id charged once");
}

/// An id decided anew once past its horizon (a second request, charged), then refunded: the
/// refund gives back the second decision's charge. After a crash (the whole log replayed) and
/// after a clean close (from its snapshot), the id answers as the live engine did: its repeat
/// is the second decision, charged nothing (so is the first request's retry, stamped as it
/// was: the id's record is the second's), and a second refund is refused; the spend is the
/// first request's alone.
#[test]
fn an_id_decided_anew_past_its_horizon_then_refunded_answers_alike_after_a_reopen() {
    for clean in [false, true] {
        let dir = TempDir::new("idem-anew-refunded");
        let (clock, engine) = accounts_logged(dir.path());
        let horizon_ms = engine.policy().longest_window_ms();
        let first = UsageRequest::new("payg-dee", "m2.7", &ONE)
            .at(T0_MS)
            .id("anew");
        assert!(!engine.consume_noting_replay(&first).expect("first").1);
        let price = payg_spend(&engine);
        let later_ms = T0_MS + horizon_ms + MINUTE_MS;
        clock.set_ms(later_ms);
        let second = UsageRequest::new("payg-dee", "m2.7", &ONE)
            .at(later_ms)
            .id("anew");
        let (decision, replayed) = engine.consume_noting_replay(&second).expect("anew");
        assert!(decision.is_admitted() && !replayed, "{decision:?}");
        assert_eq!(
            payg_spend(&engine),
            2 * price,
            "the forgotten id is charged anew"
        );
        engine
            .refund("anew", None)
            .expect("the refund of the second");
        assert_eq!(
            payg_spend(&engine),
            price,
            "clean {clean}: the second given back"
        );
        let live_retry = engine.consume_noting_replay(&first);
        assert!(
            matches!(&live_retry, Ok((_, true))),
            "clean {clean}: the first's retry, live: {live_retry:?}"
        );
        if clean {
            engine.close().expect("a clean close");
        } else {
            drop(engine);
        }
        let reopened = open_on_clock(dir.path(), clock.clone(), sync_options());
        assert_eq!(
            payg_spend(&reopened),
            price,
            "clean {clean}: after the reopen"
        );
        let (_, replayed) = reopened.consume_noting_replay(&second).expect("a repeat");
        assert!(replayed, "clean {clean}: the second decision is remembered");
        assert!(
            reopened.refund("anew", None).is_err(),
            "clean {clean}: refunded once"
        );
        // The first request's retry (stamped as it was) finds the id's record, the second
        // decision's: answered from it, never decided again.
        let retry = reopened.consume_noting_replay(&first);
        assert!(
            matches!(&retry, Ok((_, true))),
            "clean {clean}: the first's retry: {retry:?}"
        );
        assert_eq!(
            payg_spend(&reopened),
            price,
            "clean {clean}: nothing charged again"
        );
    }
}

/// A batch naming, twice, an id whose record is past its horizon (not yet swept, or swept):
/// the first is decided anew and charged, the second answers it; after a crash the log
/// restores the new decision, whose repeat is answered, and nothing more is charged.
#[test]
fn a_batch_naming_twice_an_id_past_its_horizon_decides_it_once_and_a_reopen_agrees() {
    let dir = TempDir::new("idem-batch-anew");
    let (clock, engine) = accounts_logged(dir.path());
    let horizon_ms = engine.policy().longest_window_ms();
    let first = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(T0_MS)
        .id("batched");
    assert!(!engine.consume_noting_replay(&first).expect("first").1);
    let price = payg_spend(&engine);
    let later_ms = T0_MS + horizon_ms + MINUTE_MS;
    clock.set_ms(later_ms);
    let again = UsageRequest::new("payg-dee", "m2.7", &ONE)
        .at(later_ms)
        .id("batched");
    let (results, replays) = engine.consume_many_noting_replay(&[again, again]);
    assert!(
        matches!(&results[0], Ok(decision) if decision.is_admitted()),
        "{results:?}"
    );
    assert!(results[1].is_ok(), "{results:?}");
    assert_eq!(replays, vec![false, true], "decided once, then answered");
    assert_eq!(payg_spend(&engine), 2 * price);
    drop(engine);
    let reopened = open_on_clock(dir.path(), clock, sync_options());
    let (_, replayed) = reopened.consume_noting_replay(&again).expect("a repeat");
    assert!(replayed, "the batch's decision is restored");
    assert_eq!(payg_spend(&reopened), 2 * price, "nothing charged again");
}
