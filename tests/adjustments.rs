//! Refunds, usage corrections and the idle reclaim on a durable engine, against the log they
//! leave: what a reopen rebuilds from it must be what the engine that never closed held.

mod log_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use log_support::*;
use tally_engine::{Clock, Engine, EngineOptions, EventBody, Policy, Unit, UsageRequest};

/// A clock that holds each thread named `batch` in its second read until released: a
/// `consume_many` reads it once per request with an id, so the second request's read comes
/// after the first was decided and remembered, before the chunk's events are appended.
#[derive(Debug)]
struct SecondReadHold {
    now_ms: u64,
    /// (a batch is held, the batch may go on)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl SecondReadHold {
    fn new(now_ms: u64) -> SecondReadHold {
        SecondReadHold {
            now_ms,
            state: Mutex::new((false, false)),
            changed: Condvar::new(),
        }
    }

    /// Holds the next batch thread's second read again (each trial's batch is a new thread).
    fn arm(&self) {
        *self.state.lock().unwrap() = (false, false);
    }

    fn wait_until_held(&self) {
        let mut state = self.state.lock().unwrap();
        while !state.0 {
            let (next, timeout) = self
                .changed
                .wait_timeout(state, Duration::from_secs(10))
                .unwrap();
            assert!(!timeout.timed_out(), "the batch never read the clock");
            state = next;
        }
    }

    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}

impl Clock for SecondReadHold {
    fn now_ms(&self) -> u64 {
        thread_local! {
            static READS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let reads = READS.with(|reads| {
            reads.set(reads.get() + 1);
            reads.get()
        });
        if std::thread::current().name() == Some("batch") && reads == 2 {
            let mut state = self.state.lock().unwrap();
            state.0 = true;
            self.changed.notify_all();
            // At most a minute: a test that failed before releasing it ends.
            let held = std::time::Instant::now();
            while !state.1 && held.elapsed().as_secs() < 60 {
                state = self
                    .changed
                    .wait_timeout(state, Duration::from_secs(1))
                    .unwrap()
                    .0;
            }
        }
        self.now_ms
    }
}

/// A refund of a request a `consume_many` decided but has not appended yet (its chunk is still
/// being decided) must not be logged before the admission it gives back: replayed first, it
/// found no request to mark refunded, so after a reopen the same request was refunded again
/// (credits given back twice), and a crash before the chunk was appended kept the refund of a
/// charge that never was.
#[test]
fn a_refund_of_a_request_still_in_a_batch_is_logged_after_it() {
    let dir = TempDir::new("refund-staged");
    let clock = Arc::new(SecondReadHold::new(T0_MS));
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    // No seat: every request is charged to the team's credits.
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 10_000_000, Some(T0_MS)).unwrap();
    let quantities = [(Unit::Requests, 1)];
    let batch = [
        UsageRequest::new("key-ada", "m2.7", &quantities)
            .at(T0_MS + 1)
            .id("r1"),
        UsageRequest::new("key-ada", "m2.7", &quantities)
            .at(T0_MS + 1)
            .id("r2"),
    ];
    let (refund, results) = std::thread::scope(|scope| {
        let batching = std::thread::Builder::new()
            .name("batch".into())
            .spawn_scoped(scope, || engine.consume_many(&batch))
            .unwrap();
        // r1 is decided and remembered; the batch waits in r2's read of the clock.
        clock.wait_until_held();
        let refunding = scope.spawn(|| engine.refund("r1", Some(T0_MS + 2)));
        // A refund that waits for r1's event waits for the batch: let it go on after a while.
        std::thread::sleep(Duration::from_millis(300));
        clock.release();
        (refunding.join().unwrap(), batching.join().unwrap())
    });
    let refund = refund.expect("r1 was admitted: it can be refunded");
    assert!(results
        .iter()
        .all(|result| result.as_ref().unwrap().is_admitted()));
    let price = refund.given_back.credits_micros;
    assert!(price > 0, "{refund:?}");
    let balance = engine.credits_micros("@ada").unwrap();
    assert_eq!(balance, 10_000_000 - price, "r2 charged, r1 refunded");

    // The log says so in order: r1's admission, then its refund.
    let kinds: Vec<String> = engine
        .events_after(0, 100)
        .unwrap()
        .iter()
        .filter_map(|event| match &event.body {
            EventBody::UsageAdmitted {
                request_id: Some(id),
                ..
            } => Some(format!("admitted {id}")),
            EventBody::Refunded { request_id, .. } => Some(format!("refunded {request_id}")),
            _ => None,
        })
        .collect();
    let admitted = kinds.iter().position(|kind| kind == "admitted r1");
    let refunded = kinds.iter().position(|kind| kind == "refunded r1");
    assert!(
        admitted.is_some() && refunded > admitted,
        "the refund is logged before the admission it gives back: {kinds:?}"
    );

    // A reopen (no checkpoint: the log is replayed) knows r1 was refunded.
    drop(engine);
    let engine = open(dir.path(), Policy::token_plan(), sync_options());
    assert_eq!(engine.credits_micros("@ada").unwrap(), balance);
    let again = engine.refund("r1", Some(T0_MS + 3));
    assert!(again.is_err(), "r1 refunded a second time: {again:?}");
    assert_eq!(engine.credits_micros("@ada").unwrap(), balance);
}

/// The shipped policy with the Plus 5-hour amount changed: a swap that keeps every price.
fn plus_amount(amount: u64) -> Policy {
    Policy::from_toml_str(
        &tally_engine::policy::TOKEN_PLAN_TOML
            .replace("amount = 1500,", &format!("amount = {amount},")),
    )
    .expect("a valid policy")
}

/// Credits charged for a request come back whole on its refund, however many policy swaps
/// came since: the charge is in the receipt. Once the request's generation was no longer
/// kept (`max_policy_generations`), the refund gave back nothing and still marked the request
/// refunded: the credits were lost for good.
#[test]
fn a_refund_gives_credits_back_whole_after_its_policy_generation_is_dropped() {
    let options = EngineOptions {
        max_policy_generations: 2,
        ..EngineOptions::default()
    };
    let engine = Engine::new(Policy::token_plan(), clock(), options).unwrap();
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 10_000_000, Some(T0_MS)).unwrap();
    let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 3)])
        .at(T0_MS + 1)
        .id("r1");
    assert!(engine.consume(&request).unwrap().is_admitted());
    let charged = 10_000_000 - engine.credits_micros("@ada").unwrap();
    assert!(charged > 0);
    engine
        .swap_policy(plus_amount(2_000), Some(T0_MS + 2))
        .unwrap();
    engine
        .swap_policy(plus_amount(2_500), Some(T0_MS + 3))
        .unwrap();
    let refund = engine.refund("r1", Some(T0_MS + 4)).unwrap();
    assert_eq!(refund.given_back.credits_micros, charged, "{refund:?}");
    assert_eq!(engine.credits_micros("@ada").unwrap(), 10_000_000);
    assert!(
        engine.refund("r1", Some(T0_MS + 5)).is_err(),
        "refunded once"
    );

    // So do the credits a reservation held, when it is voided.
    let held = engine
        .reserve(
            &UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 3)]).at(T0_MS + 6),
            None,
        )
        .unwrap();
    assert_eq!(engine.credits_micros("@ada").unwrap(), 10_000_000 - charged);
    engine
        .swap_policy(plus_amount(3_000), Some(T0_MS + 7))
        .unwrap();
    engine
        .swap_policy(plus_amount(3_500), Some(T0_MS + 8))
        .unwrap();
    engine
        .void(held.reservation.unwrap(), Some(T0_MS + 9))
        .unwrap();
    assert_eq!(engine.credits_micros("@ada").unwrap(), 10_000_000);
}

/// A reservation settled for less gives back the unused part of its hold, however many policy
/// swaps came while it was open: on credits, the price of the unused units (priced in the
/// reservation's own generation); on plan quota, the unused units. Once more swaps than
/// `max_policy_generations` came, the reservation's generation was let go, and a settle for
/// less gave back nothing of a hold on credits (while reporting the units released) nor of
/// one on plan quota. A reopen (the log replayed) and `verify` agree.
#[test]
fn a_reservation_settled_for_less_after_more_swaps_than_generations_kept_gives_the_rest_back() {
    let dir = TempDir::new("settle-less-after-swaps");
    let options = tally_engine::OpenOptions {
        engine: EngineOptions {
            max_policy_generations: 2,
            ..EngineOptions::default()
        },
        ..sync_options()
    };
    let engine = open(dir.path(), Policy::token_plan(), options.clone());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.create_user("bob", "key-bob", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 100_000, Some(T0_MS)).unwrap();
    engine
        .assign_seat("@bob", "bob", "Starter", Some(T0_MS))
        .unwrap();
    let reserve = |key: &str, quantities: &[(Unit, u64)]| {
        let request = UsageRequest::new(key, "m2.7", quantities).at(T0_MS + 1);
        let outcome = engine.reserve(&request, None).unwrap();
        outcome.reservation.expect("reserved")
    };
    // 1 request and 10,000 tokens: 2,000 + 10,000 micro-credits.
    let on_credits = reserve("key-ada", &[(Unit::Requests, 1), (Unit::Tokens, 10_000)]);
    assert_eq!(engine.credits_micros("@ada").unwrap(), 88_000);
    let on_quota = reserve("key-bob", &[(Unit::Requests, 100)]);
    for (swap, amount) in [2_000, 2_500, 3_000].into_iter().enumerate() {
        engine
            .swap_policy(plus_amount(amount), Some(T0_MS + 2 + swap as u64))
            .unwrap();
    }
    let settled = engine
        .settle(
            on_credits,
            &[(Unit::Requests, 1), (Unit::Tokens, 10)],
            Some(T0_MS + 10),
        )
        .unwrap();
    assert!(matches!(settled, tally_engine::SettleOutcome::Settled(_)));
    assert_eq!(
        engine.credits_micros("@ada").unwrap(),
        100_000 - 2_010,
        "the unused 9,990 tokens' credits came back"
    );
    engine
        .settle(on_quota, &[(Unit::Requests, 40)], Some(T0_MS + 10))
        .unwrap();
    let used = |engine: &Engine| engine.usage("key-bob", Some(T0_MS + 10)).unwrap().limits[0].used;
    assert_eq!(used(&engine), 40, "the unused 60 requests came back");
    // With nothing open, the next swap lets the old generations go as before.
    engine
        .swap_policy(plus_amount(3_500), Some(T0_MS + 11))
        .unwrap();
    let before = state(
        &engine,
        &["key-ada", "key-bob"],
        &["@ada", "@bob"],
        T0_MS + 12,
    );
    drop(engine);
    let engine = open(dir.path(), plus_amount(3_500), options.clone());
    let after = state(
        &engine,
        &["key-ada", "key-bob"],
        &["@ada", "@bob"],
        T0_MS + 12,
    );
    assert_same_state(&after, &before, "after a reopen");
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), options).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
}

/// A refund whose event cannot be logged gives nothing back, also when it gave back the
/// receipt's whole charge because the receipt's policy generation is no longer kept: the
/// undo takes the credits again without that generation.
#[test]
fn a_failed_refund_after_its_policy_generation_is_dropped_gives_no_credits_back() {
    let dir = TempDir::new("refund-dropped-generation-fails");
    let faults = tally_engine::Faults::new();
    let options = tally_engine::OpenOptions {
        engine: EngineOptions {
            max_policy_generations: 2,
            ..EngineOptions::default()
        },
        faults: Some(Arc::clone(&faults)),
        ..sync_options()
    };
    let engine = open(dir.path(), Policy::token_plan(), options);
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 10_000_000, Some(T0_MS)).unwrap();
    let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 3)])
        .at(T0_MS + 1)
        .id("r1");
    assert!(engine.consume(&request).unwrap().is_admitted());
    let balance = engine.credits_micros("@ada").unwrap();
    assert!(balance < 10_000_000);
    engine
        .swap_policy(plus_amount(2_000), Some(T0_MS + 2))
        .unwrap();
    engine
        .swap_policy(plus_amount(2_500), Some(T0_MS + 3))
        .unwrap();
    faults.fail_next_inserts(1);
    let refused = engine.refund("r1", Some(T0_MS + 4));
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        engine.credits_micros("@ada").unwrap(),
        balance,
        "a refund that failed gave credits back"
    );
    // The reopened engine holds the same, and the request can still be refunded whole.
    drop(engine);
    let engine = open(dir.path(), Policy::token_plan(), sync_options());
    assert_eq!(engine.credits_micros("@ada").unwrap(), balance);
    engine.refund("r1", Some(T0_MS + 5)).unwrap();
    assert_eq!(engine.credits_micros("@ada").unwrap(), 10_000_000);
}

/// A refund of plan quota charged under a policy generation no longer kept cannot find the
/// counters its receipt names (the units still count: the swaps carried them). It was marked
/// refunded with nothing given back, and `tally refund` said the usage no longer counted in
/// any window. It is refused, naming the request id, and changes nothing.
#[test]
fn a_plan_quota_refund_after_its_policy_generation_is_dropped_is_refused_and_changes_nothing() {
    let options = EngineOptions {
        max_policy_generations: 2,
        ..EngineOptions::default()
    };
    let engine = Engine::new(Policy::token_plan(), clock(), options).unwrap();
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ada", "ada", "Plus", Some(T0_MS))
        .unwrap();
    let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 3)])
        .at(T0_MS + 1)
        .id("r1");
    assert!(engine.consume(&request).unwrap().is_admitted());
    let used = |at_ms| -> Vec<u64> {
        let report = engine.usage("key-ada", Some(at_ms)).unwrap();
        report.limits.iter().map(|limit| limit.used).collect()
    };
    assert_eq!(used(T0_MS + 1)[0], 3);
    engine
        .swap_policy(plus_amount(2_000), Some(T0_MS + 2))
        .unwrap();
    engine
        .swap_policy(plus_amount(2_500), Some(T0_MS + 3))
        .unwrap();
    let before = used(T0_MS + 4);
    assert_eq!(before[0], 3, "the swaps carried the usage");
    let refused = engine.refund("r1", Some(T0_MS + 4));
    match &refused {
        Err(tally_engine::Error::InvalidArgument { field, problem }) => {
            assert_eq!(&**field, "request_id");
            assert!(problem.contains("no longer kept"), "{problem}");
        }
        other => panic!("expected a refusal naming request_id, got {other:?}"),
    }
    assert_eq!(used(T0_MS + 4), before, "nothing given back");
    // Still not refunded: the same answer again, not "already refunded".
    let again = format!("{:?}", engine.refund("r1", Some(T0_MS + 5)));
    assert!(again.contains("no longer kept"), "{again}");
}

/// A refund that finds no record for its id at its first look, and the record a `consume_many`
/// chunk has just staged at its second, gave back and logged at once: the refund came before
/// the admission in the log, so a replay applied it to nothing, and after a reopen the request
/// could be refunded again (credits given back twice).
#[test]
fn a_refund_racing_the_first_decision_of_its_id_in_a_batch_is_logged_after_it() {
    let dir = TempDir::new("refund-races-staged");
    let clock = Arc::new(SecondReadHold::new(T0_MS));
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 100_000_000, Some(T0_MS)).unwrap();
    let quantities = [(Unit::Requests, 1)];
    for trial in 0..40 {
        let (first, second) = (format!("first-{trial}"), format!("second-{trial}"));
        let batch = [
            UsageRequest::new("key-ada", "m2.7", &quantities)
                .at(T0_MS + 1)
                .id(&first),
            UsageRequest::new("key-ada", "m2.7", &quantities)
                .at(T0_MS + 1)
                .id(&second),
        ];
        clock.arm();
        let refunded = AtomicBool::new(false);
        let asked = std::time::Instant::now();
        std::thread::scope(|scope| {
            let batching = std::thread::Builder::new()
                .name("batch".into())
                .spawn_scoped(scope, || engine.consume_many(&batch))
                .unwrap();
            let refunding = scope.spawn(|| loop {
                match engine.refund(&first, Some(T0_MS + 2)) {
                    // Until the batch has decided it (within a minute: one that failed never
                    // does).
                    Err(tally_engine::Error::UnknownRequest { .. })
                        if asked.elapsed().as_secs() < 60 =>
                    {
                        continue
                    }
                    outcome => {
                        refunded.store(true, Ordering::SeqCst);
                        return outcome;
                    }
                }
            });
            clock.wait_until_held();
            // A refund that waits for the first decision's event waits for the batch.
            for _ in 0..50 {
                if refunded.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            clock.release();
            refunding
                .join()
                .unwrap()
                .expect("admitted: it can be refunded");
            assert!(batching
                .join()
                .unwrap()
                .iter()
                .all(|result| result.as_ref().unwrap().is_admitted()));
        });
        let kinds: Vec<String> = engine
            .events_after(0, 1_000)
            .unwrap()
            .iter()
            .filter_map(|event| match &event.body {
                EventBody::UsageAdmitted {
                    request_id: Some(id),
                    ..
                } if &**id == first.as_str() => Some("admitted".to_string()),
                EventBody::Refunded { request_id, .. } if &**request_id == first.as_str() => {
                    Some("refunded".to_string())
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds,
            ["admitted", "refunded"],
            "trial {trial}: the refund is logged before the admission it gives back"
        );
    }
    let balance = engine.credits_micros("@ada").unwrap();
    drop(engine);
    let engine = open(dir.path(), Policy::token_plan(), sync_options());
    assert_eq!(engine.credits_micros("@ada").unwrap(), balance);
}

/// The policy generations kept past `max_policy_generations` for an open reservation are
/// bounded by its lease (at most 24 h, ARCHITECTURE.md's bounds): once the lease has ended,
/// a swap lets them go even when nothing else expired the reservation (no request, no
/// reserve came since). Before, a reservation whose lease ended days ago, never expired for
/// want of traffic, held every generation since its own: each swap added one for good.
#[test]
fn swaps_after_a_reservations_lease_ended_keep_no_more_generations_than_the_bound() {
    let dir = TempDir::new("generations-after-lease");
    let options = tally_engine::OpenOptions {
        engine: EngineOptions {
            max_policy_generations: 2,
            ..EngineOptions::default()
        },
        ..sync_options()
    };
    let clock = clock();
    let engine = Engine::open(
        dir.path(),
        Policy::token_plan(),
        clock.clone(),
        options.clone(),
    )
    .unwrap();
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine.top_up("@ada", 10_000_000, Some(T0_MS)).unwrap();
    let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 1)]).at(T0_MS);
    let reserved = engine.reserve(&request, Some(MINUTE_MS)).unwrap();
    assert!(reserved.reservation.is_some());
    // Two days later (the lease, a minute, and the longest lease, a day, long over).
    let later = T0_MS + 2 * DAY_MS;
    clock.set_ms(later);
    for swap in 0..10u64 {
        engine
            .swap_policy(plus_amount(2_000 + swap), Some(later + swap))
            .unwrap();
    }
    let current = engine.policy().generation();
    let kept = (0..=current)
        .filter(|&generation| engine.policy_of_generation(generation).is_some())
        .count();
    assert!(
        kept <= 2,
        "{kept} policy generations kept of {} swapped in, with max_policy_generations 2 and \
         the only reservation's lease ended two days ago",
        current + 1
    );
    // Its hold came back (the reservation expired), and the credits with it.
    assert_eq!(engine.open_reservations(), 0);
    assert_eq!(engine.credits_micros("@ada").unwrap(), 10_000_000);
    // The log says the same: the expiry, then the swaps.
    let last = current + 1;
    let before = state(&engine, &["key-ada"], &["@ada"], later + 20);
    drop(engine);
    let engine = Engine::open(dir.path(), plus_amount(2_009), clock, options.clone()).unwrap();
    assert_same_state(
        &state(&engine, &["key-ada"], &["@ada"], later + 20),
        &before,
        "after a reopen",
    );
    assert_eq!(engine.open_reservations(), 0);
    assert_eq!(engine.policy().generation() + 1, last);
    engine.close().unwrap();
    let report = Engine::verify(dir.path(), options).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
}

/// A swap that is refused changes nothing (`swap_policy`'s contract, the CLI's and the
/// wrappers' "refused, changing nothing"), not even the ended leases it would expire first
/// had it gone ahead: the refusal is decided before anything is expired or logged.
#[test]
fn a_refused_swap_expires_no_ended_lease_and_logs_nothing() {
    let dir = TempDir::new("refused-swap-expires-nothing");
    let clock = clock();
    let engine = Engine::open(
        dir.path(),
        Policy::token_plan(),
        clock.clone(),
        sync_options(),
    )
    .unwrap();
    engine.create_user("ada", "key-ada", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ada", "ada", "Plus", Some(T0_MS))
        .unwrap();
    let request = UsageRequest::new("key-ada", "m2.7", &[(Unit::Requests, 1)]).at(T0_MS);
    assert!(engine
        .reserve(&request, Some(MINUTE_MS))
        .unwrap()
        .reservation
        .is_some());
    let later = T0_MS + 2 * DAY_MS;
    clock.set_ms(later);
    let events_before = engine.events_after(0, 1_000).unwrap().len();
    // Plus (ada's seat) renamed away: refused, ada being seated on it.
    let without_plus = Policy::from_toml_str(
        &tally_engine::policy::TOKEN_PLAN_TOML.replace("[plans.Plus]", "[plans.Plus-Renamed]"),
    )
    .expect("a valid policy");
    let refused = engine.swap_policy(without_plus, Some(later));
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        engine.open_reservations(),
        1,
        "the refused swap expired the ended lease"
    );
    let events_after = engine.events_after(0, 1_000).unwrap();
    assert_eq!(
        events_after.len(),
        events_before,
        "the refused swap logged {:?}",
        events_after[events_before..]
            .iter()
            .map(|event| event.body.kind())
            .collect::<Vec<_>>()
    );
    engine.close().unwrap();
}
