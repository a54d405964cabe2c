//! Submitted consumes (`Engine::submit`, `Submitted::complete`): the same decisions as
//! `consume`, applied at once, acknowledged only once durable, given back if the log fails.

mod log_support;

use std::sync::Arc;
use std::time::Duration;

use log_support::*;
use tally_engine::{
    Decision, Durability, Error, Faults, OpenOptions, Policy, Submission, Unit, UsageRequest,
};

/// A mix of requests on the populated accounts: plan quota, credits, pay-as-you-go, a usage
/// bar, denials (not covered, over a maximum, no seat), with and without request ids, and a
/// repeated id.
/// `(key, resource, quantities, request id)`.
type Drawn = (&'static str, &'static str, Vec<(Unit, u64)>, Option<String>);

fn requests() -> Vec<Drawn> {
    let mut requests = Vec::new();
    for step in 0..60u64 {
        let (key, resource, quantities) = match step % 10 {
            0 => ("key-ada", "m2.7", vec![(Unit::Requests, 1)]),
            1 => ("key-bob", "m2.7-highspeed", vec![(Unit::Requests, 2)]),
            2 => ("key-cy", "speech-2.8", vec![(Unit::Characters, 900)]),
            3 => ("payg-dee", "m2.7", vec![(Unit::Requests, 1)]),
            4 => ("key-eve", "image-01", vec![(Unit::Images, 3)]),
            5 => (
                "key-ada-acme",
                "music-2.6",
                vec![(Unit::Songs, 1), (Unit::Seconds, 280)],
            ),
            6 => (
                "key-bob-acme",
                "music-2.6",
                vec![(Unit::Songs, 1), (Unit::Seconds, 400)],
            ),
            7 => ("key-dee", "m2.7", vec![(Unit::Requests, 1)]),
            8 => ("key-ada", "image-01", vec![(Unit::Images, 1)]),
            _ => ("key-eve", "m2.7", vec![(Unit::Requests, 500)]),
        };
        // Every third request carries an id; every ninth repeats the id before it.
        let id = match step % 9 {
            0 if step > 0 => Some(format!("id-{}", step - 3)),
            _ if step % 3 == 0 => Some(format!("id-{step}")),
            _ => None,
        };
        requests.push((key, resource, quantities, id));
    }
    requests
}

fn request_of<'r>(
    (key, resource, quantities, id): &'r (
        &'static str,
        &'static str,
        Vec<(Unit, u64)>,
        Option<String>,
    ),
    step: usize,
) -> UsageRequest<'r> {
    let request =
        UsageRequest::new(key, resource, quantities).at(T0_MS + 10 * MINUTE_MS + step as u64);
    match id {
        Some(id) => request.id(id),
        None => request,
    }
}

#[test]
fn submitted_consumes_decide_as_consume_does_and_are_durable_once_completed() {
    let requests = requests();
    let dir = TempDir::new("submission-same");
    let engine = open_token_plan(dir.path(), sync_options());
    let twin = twin(Policy::token_plan());
    create_accounts(&engine);
    create_accounts(&twin);
    // Submitted all at once, completed afterwards, in order: every decision is made and
    // applied at submission (the later requests see the earlier ones).
    let submitted: Vec<_> = requests
        .iter()
        .enumerate()
        .map(|(step, request)| engine.submit(&request_of(request, step)))
        .collect();
    let mut admitted = 0;
    for (step, submitted) in submitted.into_iter().enumerate() {
        let expected = twin.consume_noting_replay(&request_of(&requests[step], step));
        let completed = submitted.and_then(|submitted| submitted.complete());
        assert_eq!(
            format!("{completed:?}"),
            format!("{expected:?}"),
            "request {step}: {:?}",
            requests[step]
        );
        admitted += usize::from(matches!(completed, Ok((Decision::Admitted(_), false))));
    }
    assert!(admitted >= 20, "the mix admits most requests: {admitted}");
    same_as_twin_now_and_after_a_reopen(engine, &twin, &dir);
}

/// The engine's state equals the twin's, and again after the engine is dropped and reopened.
fn same_as_twin_now_and_after_a_reopen(
    engine: tally_engine::Engine,
    twin: &tally_engine::Engine,
    dir: &TempDir,
) {
    let at = T0_MS + 11 * MINUTE_MS;
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, at),
        &state(twin, &KEYS, &TEAMS, at),
        "after completing",
    );
    drop(engine);
    let reopened = open_token_plan(dir.path(), OpenOptions::default());
    assert_same_state(
        &state(&reopened, &KEYS, &TEAMS, at),
        &state(twin, &KEYS, &TEAMS, at),
        "after a reopen",
    );
}

fn faulty(dir: &TempDir) -> (tally_engine::Engine, Arc<Faults>) {
    let faults = Faults::new();
    let options = OpenOptions {
        durability: Durability::Sync,
        faults: Some(Arc::clone(&faults)),
        ..OpenOptions::default()
    };
    let engine = open_token_plan(dir.path(), options);
    create_accounts(&engine);
    (engine, faults)
}

fn used(engine: &tally_engine::Engine, key: &str) -> u64 {
    engine.usage(key, Some(T0_MS)).expect("a known key").limits[0].used
}

#[test]
fn a_submitted_consume_is_applied_at_once_and_acknowledged_only_once_durable() {
    let dir = TempDir::new("submission-held");
    let (engine, faults) = faulty(&dir);
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS);
    faults.hold_flushes();
    // In a thread of its own: a submit that waited for its flush would wait for ever.
    let submitted = std::thread::scope(|scope| {
        let submitting = scope.spawn(|| engine.submit(&request));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !submitting.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !submitting.is_finished() {
            faults.release_flushes();
            panic!("submit waited for its flush");
        }
        submitting.join().expect("no panic")
    });
    let submitted = submitted.expect("valid");
    assert_eq!(used(&engine, "key-bob"), 1, "applied at submission");
    assert!(!submitted.is_durable(), "its flush is held");
    let (completed, answered_early) = std::thread::scope(|scope| {
        let completing = scope.spawn(|| submitted.complete());
        std::thread::sleep(Duration::from_millis(100));
        let answered_early = completing.is_finished();
        faults.release_flushes();
        (completing.join().expect("no panic"), answered_early)
    });
    assert!(
        !answered_early,
        "complete returned before the event was durable"
    );
    let (decision, replayed) = completed.expect("durable");
    assert!(decision.is_admitted() && !replayed, "{decision:?}");
    let again = engine.submit(&request).expect("valid");
    let asked = std::time::Instant::now();
    while !again.is_durable() {
        assert!(asked.elapsed().as_secs() < 60, "never durable");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(again.complete().expect("durable").0.is_admitted());
    drop(engine);
    let reopened = open_token_plan(dir.path(), OpenOptions::default());
    assert_eq!(used(&reopened, "key-bob"), 2, "both durable");
}

/// A thread with many submissions in flight (enough that its completions may poll for their
/// flush instead of parking at once) is answered only once they are durable, or, if the flush
/// fails, gets the error for every one and every effect back.
fn many_in_flight_on_one_thread(flush_fails: bool) {
    const IN_FLIGHT: usize = 100;
    let dir = TempDir::new("submission-many");
    let (engine, faults) = faulty(&dir);
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS);
    faults.hold_flushes();
    if flush_fails {
        faults.fail_next_flushes(1);
    }
    let submitted: Vec<_> = (0..IN_FLIGHT)
        .map(|_| engine.submit(&request).expect("valid"))
        .collect();
    assert_eq!(
        used(&engine, "key-bob"),
        IN_FLIGHT as u64,
        "applied at submission"
    );
    // Set just before the flush may go: a completion that returns before it sees it unset.
    let released = std::sync::atomic::AtomicBool::new(false);
    let outcomes = std::thread::scope(|scope| {
        let completing = scope.spawn(|| {
            submitted
                .into_iter()
                .map(|submitted| {
                    let outcome = submitted.complete();
                    (outcome, released.load(std::sync::atomic::Ordering::SeqCst))
                })
                .collect::<Vec<_>>()
        });
        // Far longer than any poll: the completions must be parked on the held flush.
        std::thread::sleep(Duration::from_millis(100));
        released.store(true, std::sync::atomic::Ordering::SeqCst);
        faults.release_flushes();
        completing.join().expect("no panic")
    });
    for (index, (outcome, after_release)) in outcomes.iter().enumerate() {
        assert!(
            after_release,
            "submission {index} completed before the flush went"
        );
        match (flush_fails, outcome) {
            (false, Ok((decision, false))) if decision.is_admitted() => {}
            (true, Err(Error::Storage { .. })) => {}
            _ => panic!("submission {index}, the flush failing {flush_fails}: {outcome:?}"),
        }
    }
    let expected = if flush_fails { 0 } else { IN_FLIGHT as u64 };
    assert_eq!(used(&engine, "key-bob"), expected);
    drop(engine);
    let reopened = open_token_plan(dir.path(), OpenOptions::default());
    assert_eq!(
        used(&reopened, "key-bob"),
        expected,
        "what was acknowledged, on disk"
    );
}

#[test]
fn a_thread_with_many_submissions_in_flight_completes_each_once_durable() {
    many_in_flight_on_one_thread(false);
}

#[test]
fn a_thread_with_many_submissions_in_flight_gets_a_failed_flush_for_each() {
    many_in_flight_on_one_thread(true);
}

/// Either way of completing: `Submitted::complete`, or `Engine::complete` of the detached
/// `Submission` once the request's strings are gone.
enum Pending<'e, 'r> {
    Borrowing(tally_engine::Submitted<'e, 'r>),
    Detached(Submission),
}

impl Pending<'_, '_> {
    fn complete(self, engine: &tally_engine::Engine) -> Result<(Decision, bool), Error> {
        match self {
            Pending::Borrowing(submitted) => submitted.complete(),
            Pending::Detached(submission) => engine.complete(submission),
        }
    }
}

fn a_failed_flush_gives_back_every_submission(detached: bool) {
    let dir = TempDir::new("submission-failed");
    let (engine, faults) = faulty(&dir);
    let balance_before = engine.credits_micros("@dee").expect("a team");
    faults.hold_flushes();
    faults.fail_next_flushes(1);
    // Detached: the strings the request borrowed are dropped before it completes.
    let detach = |key: String, id: Option<String>| -> Pending<'_, 'static> {
        let one = vec![(Unit::Requests, 1)];
        let resource = String::from("m2.7");
        let request = UsageRequest::new(&key, &resource, &one).at(T0_MS);
        let request = match &id {
            Some(id) => request.id(id),
            None => request,
        };
        Pending::Detached(engine.submit(&request).expect("valid").detach())
    };
    let one = [(Unit::Requests, 1)];
    let plain = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS);
    let with_id = plain.id("lost-1");
    let credits = UsageRequest::new("payg-dee", "m2.7", &one).at(T0_MS);
    let submitted: Vec<Pending<'_, '_>> = if detached {
        vec![
            detach("key-bob".into(), None),
            detach("key-bob".into(), Some("lost-1".into())),
            detach("payg-dee".into(), None),
            // A repeat of the id while its first decision is not durable: it shares its fate.
            detach("key-bob".into(), Some("lost-1".into())),
        ]
    } else {
        // The repeat of the id, last, shares its first decision's fate.
        vec![
            Pending::Borrowing(engine.submit(&plain).expect("valid")),
            Pending::Borrowing(engine.submit(&with_id).expect("valid")),
            Pending::Borrowing(engine.submit(&credits).expect("valid")),
            Pending::Borrowing(engine.submit(&with_id).expect("valid")),
        ]
    };
    assert_eq!(used(&engine, "key-bob"), 2, "applied at submission");
    faults.release_flushes();
    for (index, submitted) in submitted.into_iter().enumerate() {
        let outcome = submitted.complete(&engine);
        assert!(
            matches!(outcome, Err(Error::Storage { .. })),
            "request {index} (the last is the repeat): {outcome:?}"
        );
    }
    assert_eq!(used(&engine, "key-bob"), 0, "both given back");
    drop(engine);
    let reopened = open_token_plan(dir.path(), OpenOptions::default());
    assert_eq!(used(&reopened, "key-bob"), 0, "nothing was logged");
    assert_eq!(
        reopened.credits_micros("@dee").expect("a team"),
        balance_before,
        "no pay-as-you-go spend was logged"
    );
    let (decision, replayed) = reopened.consume_noting_replay(&with_id).expect("valid");
    assert!(decision.is_admitted() && !replayed, "the id was forgotten");
}

#[test]
fn a_submitted_consume_whose_flush_fails_is_given_back_and_its_id_forgotten() {
    a_failed_flush_gives_back_every_submission(false);
}

#[test]
fn a_detached_submission_whose_flush_fails_is_given_back_after_its_strings_are_gone() {
    a_failed_flush_gives_back_every_submission(true);
}

#[test]
fn submitted_request_ids_are_answered_once_and_conflicts_refused() {
    let engine = twin(Policy::token_plan());
    create_accounts(&engine);
    let one = [(Unit::Requests, 1)];
    let two = [(Unit::Requests, 2)];
    let first = UsageRequest::new("key-bob", "m2.7", &one)
        .at(T0_MS)
        .id("same");
    let (decision, replayed) = engine.submit(&first).unwrap().complete().unwrap();
    assert!(decision.is_admitted() && !replayed);
    let (again, replayed) = engine.submit(&first).unwrap().complete().unwrap();
    assert!(replayed, "a repeat is a replay");
    assert_eq!(again, decision, "with the first decision");
    assert_eq!(used(&engine, "key-bob"), 1, "counted once");
    let conflicting = UsageRequest::new("key-bob", "m2.7", &two)
        .at(T0_MS)
        .id("same");
    assert!(matches!(
        engine.submit(&conflicting),
        Err(Error::RequestIdConflict { .. })
    ));
    assert_eq!(used(&engine, "key-bob"), 1, "a conflict changes nothing");
}

/// A conflict with a submission whose flush then fails: the first decision never stood (its id
/// is forgotten), so the conflicting request answers the log's error, not `RequestIdConflict`,
/// through `submit` and `consume` alike; with the first durable, the conflict is refused.
#[test]
fn a_conflict_with_a_submission_whose_flush_fails_answers_the_logs_error() {
    for through_consume in [false, true] {
        let dir = TempDir::new(&format!("submit-conflict-lost-{through_consume}"));
        let (engine, faults) = faulty(&dir);
        let (one, two) = ([(Unit::Requests, 1)], [(Unit::Requests, 2)]);
        let first = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS).id("x");
        let conflicting = UsageRequest::new("key-bob", "m2.7", &two).at(T0_MS).id("x");
        faults.hold_flushes();
        let submitted = engine.submit(&first).unwrap();
        wait_until_flush_held(&faults);
        faults.fail_next_flushes(1);
        faults.release_flushes();
        let answer = match through_consume {
            true => engine.consume(&conflicting),
            false => engine.submit(&conflicting).map(|s| *s.decision()),
        };
        assert!(
            matches!(answer, Err(Error::Storage { .. })),
            "{through_consume}: {answer:?}"
        );
        assert!(matches!(submitted.complete(), Err(Error::Storage { .. })));
        assert_eq!(
            used(&engine, "key-bob"),
            0,
            "{through_consume}: nothing counted"
        );
    }
    let dir = TempDir::new("submit-conflict-kept");
    let (engine, _faults) = faulty(&dir);
    let one = [(Unit::Requests, 1)];
    let two = [(Unit::Requests, 2)];
    let submitted = engine
        .submit(&UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS).id("x"))
        .unwrap();
    let conflicting = UsageRequest::new("key-bob", "m2.7", &two).at(T0_MS).id("x");
    assert!(matches!(
        engine.submit(&conflicting),
        Err(Error::RequestIdConflict { .. })
    ));
    assert!(submitted.complete().unwrap().0.is_admitted());
    assert_eq!(used(&engine, "key-bob"), 1, "the first counted once");
}

#[test]
fn bad_input_to_submit_is_refused_and_changes_nothing() {
    let engine = twin(Policy::token_plan());
    create_accounts(&engine);
    let before = state(&engine, &KEYS, &TEAMS, T0_MS);
    let zero = [(Unit::Requests, 0)];
    let one = [(Unit::Requests, 1)];
    let too_long = "k".repeat(200);
    for (what, request) in [
        (
            "a zero quantity",
            UsageRequest::new("key-bob", "m2.7", &zero).at(T0_MS),
        ),
        (
            "an unknown resource",
            UsageRequest::new("key-bob", "m9", &one).at(T0_MS),
        ),
        (
            "an empty key",
            UsageRequest::new("", "m2.7", &one).at(T0_MS),
        ),
        (
            "a key too long",
            UsageRequest::new(&too_long, "m2.7", &one).at(T0_MS),
        ),
        (
            "a time past 2100",
            UsageRequest::new("key-bob", "m2.7", &one).at(5_000_000_000_000),
        ),
        (
            "an empty request id",
            UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS).id(""),
        ),
    ] {
        let outcome = engine.submit(&request);
        assert!(outcome.is_err(), "{what}: {outcome:?}");
        assert_eq!(
            engine
                .consume(&request)
                .map(|_| ())
                .unwrap_err()
                .to_string(),
            outcome.unwrap_err().to_string(),
            "{what}: the same error as consume"
        );
    }
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, T0_MS),
        &before,
        "after bad input",
    );
}

#[test]
fn detached_submissions_decide_as_consume_does_once_their_strings_are_gone() {
    let drawn = requests();
    let dir = TempDir::new("submission-detached");
    let engine = open_token_plan(dir.path(), sync_options());
    let twin = twin(Policy::token_plan());
    create_accounts(&engine);
    create_accounts(&twin);
    let submissions: Vec<_> = drawn
        .iter()
        .enumerate()
        .map(|(step, request)| {
            // Copies the request's strings, so they are gone when the submission completes.
            let (key, resource, quantities, id) = request.clone();
            let (key, resource, id) = (key.to_owned(), resource.to_owned(), id);
            let owned = UsageRequest::new(&key, &resource, &quantities)
                .at(T0_MS + 10 * MINUTE_MS + step as u64);
            let owned = match &id {
                Some(id) => owned.id(id),
                None => owned,
            };
            engine.submit(&owned).map(|submitted| submitted.detach())
        })
        .collect();
    for (step, submission) in submissions.into_iter().enumerate() {
        let expected = twin.consume_noting_replay(&request_of(&drawn[step], step));
        if let Ok(submission) = &submission {
            assert_eq!(
                Ok(submission.decision()),
                expected.as_ref().map(|(decision, _)| decision),
                "request {step}: the decision is known at submission"
            );
        }
        let completed = submission.and_then(|submission| engine.complete(submission));
        assert_eq!(
            format!("{completed:?}"),
            format!("{expected:?}"),
            "request {step}: {:?}",
            drawn[step]
        );
    }
    same_as_twin_now_and_after_a_reopen(engine, &twin, &dir);
}

#[test]
fn a_submission_completed_on_another_engine_is_refused_and_changes_nothing_there() {
    let dir = TempDir::new("submission-other");
    let (engine, faults) = faulty(&dir);
    let other = twin(Policy::token_plan());
    create_accounts(&other);
    let one = [(Unit::Requests, 1)];
    let request = UsageRequest::new("key-bob", "m2.7", &one).at(T0_MS);
    faults.hold_flushes();
    let submission = engine.submit(&request).expect("valid").detach();
    let before = state(&other, &KEYS, &TEAMS, T0_MS);
    let durable = other.is_durable(&submission);
    // Refused: the other engine has no log, so it would answer at once as if durable.
    let completed = other.complete(submission);
    // Released before any assertion: a failing one must not leave the engine's drop waiting.
    faults.release_flushes();
    assert!(
        matches!(
            &durable,
            Err(Error::InvalidArgument {
                field: "submission",
                ..
            })
        ),
        "{durable:?}"
    );
    assert!(
        matches!(
            &completed,
            Err(Error::InvalidArgument {
                field: "submission",
                ..
            })
        ),
        "{completed:?}"
    );
    assert_same_state(
        &state(&other, &KEYS, &TEAMS, T0_MS),
        &before,
        "the other engine",
    );
    assert_eq!(
        used(&engine, "key-bob"),
        1,
        "its own engine keeps the effect"
    );
    let second = engine.submit(&request).expect("valid").detach();
    let asked = std::time::Instant::now();
    while !engine.is_durable(&second).expect("its own engine") {
        assert!(asked.elapsed().as_secs() < 60, "never durable");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (decision, replayed) = engine.complete(second).expect("durable");
    assert!(decision.is_admitted() && !replayed, "{decision:?}");
    assert_eq!(used(&engine, "key-bob"), 2);
}

/// Submissions completed on another thread than the one that submitted them, a repeat of a
/// submitted id arriving through `consume_many` on a third before the first is durable (with a
/// conflicting use of it beside it), and the flush they all wait for failing: every caller
/// gets the error (the conflict too: it waits for the first decision, which never stood, as a
/// replay does), memory is given back to what it was and equals the
/// disk after a reopen, where the ids are decided afresh.
#[test]
fn submissions_completed_elsewhere_and_a_batch_repeating_their_ids_all_get_a_failed_flush() {
    let dir = TempDir::new("submission-elsewhere");
    let (engine, faults) = faulty(&dir);
    let at = T0_MS + MINUTE_MS;
    let before = state(&engine, &KEYS, &TEAMS, at);
    let one = [(Unit::Requests, 1)];
    let two = [(Unit::Requests, 2)];
    let huge = [(Unit::Requests, 100_000)];
    let with_id = UsageRequest::new("key-bob", "m2.7", &one)
        .at(at)
        .id("sub-x");
    let plain = UsageRequest::new("payg-dee", "m2.7", &one).at(at);
    let denied = UsageRequest::new("key-eve", "m2.7", &huge)
        .at(at)
        .id("sub-denied");
    faults.hold_flushes();
    faults.fail_next_flushes(1);
    let submitted = vec![
        engine.submit(&with_id).expect("valid"),
        engine.submit(&plain).expect("valid"),
        engine.submit(&denied).expect("valid"),
    ];
    assert!(
        !submitted[2].decision().is_admitted(),
        "a denial under an id"
    );
    let batch = [
        with_id,
        UsageRequest::new("key-bob", "m2.7", &two)
            .at(at)
            .id("sub-x"),
        UsageRequest::new("key-ada-acme", "m2.7", &one)
            .at(at)
            .id("batch-y"),
        denied,
    ];
    let (completed, (batch_results, replays)) = std::thread::scope(|scope| {
        let completing = scope.spawn(|| {
            submitted
                .into_iter()
                .map(|submitted| submitted.complete())
                .collect::<Vec<_>>()
        });
        let batching = scope.spawn(|| engine.consume_many_noting_replay(&batch));
        std::thread::sleep(Duration::from_millis(100));
        let early = completing.is_finished() || batching.is_finished();
        faults.release_flushes();
        let outcome = (
            completing.join().expect("no panic"),
            batching.join().expect("no panic"),
        );
        assert!(!early, "answered before the flush went: {outcome:?}");
        outcome
    });
    for (index, outcome) in completed.iter().enumerate() {
        assert!(
            matches!(outcome, Err(Error::Storage { .. })),
            "submission {index}: {outcome:?}"
        );
    }
    for (index, result) in batch_results.iter().enumerate() {
        assert!(
            matches!(result, Err(Error::Storage { .. })),
            "batch entry {index}: {result:?}"
        );
        assert!(!replays[index], "batch entry {index}: not a replay");
    }
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, at),
        &before,
        "in memory, after the failed flush",
    );
    drop(engine);
    let reopened = open_token_plan(dir.path(), OpenOptions::default());
    assert_same_state(&state(&reopened, &KEYS, &TEAMS, at), &before, "on disk");
    for request in [with_id, denied, batch[2]] {
        let (_, replayed) = reopened.consume_noting_replay(&request).expect("valid");
        assert!(!replayed, "{request:?}: decided afresh after a reopen");
    }
}

/// Threads submitting requests whose ids repeat across them, each completing on another
/// thread than the one that submitted it, with batches of the same ids beside them, while a
/// flush fails partway: what the engine counts in memory once every call has answered is what
/// the reopened database counts, and every id whose answer stood is remembered after the
/// reopen (every other one decided afresh).
#[test]
fn concurrent_submissions_and_batches_under_a_failing_flush_leave_memory_equal_to_disk() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 300;
    let dir = TempDir::new("submission-stress");
    let (engine, faults) = faulty(&dir);
    let at = T0_MS + MINUTE_MS;
    let one = [(Unit::Requests, 1)];
    let ids: Vec<String> = (0..PER_THREAD).map(|index| format!("s-{index}")).collect();
    let request = |index: usize| -> UsageRequest<'_> {
        let key = if index % 2 == 0 {
            "payg-dee"
        } else {
            "key-bob"
        };
        let request = UsageRequest::new(key, "m2.7", &one).at(at);
        match index % 3 {
            0 => request,
            _ => request.id(&ids[index]),
        }
    };
    let (sender, receiver) = std::sync::mpsc::channel::<(usize, Submission)>();
    let receiver = std::sync::Mutex::new(receiver);
    let stood = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let sender = sender.clone();
            let (engine, faults) = (&engine, &faults);
            scope.spawn(move || {
                for index in 0..PER_THREAD {
                    if thread == 0 && index == PER_THREAD / 2 {
                        faults.fail_next_flushes(1);
                    }
                    if index % 50 == 49 {
                        let batch: Vec<_> = (index - 10..index).map(request).collect();
                        let _ = engine.consume_many(&batch);
                        continue;
                    }
                    if let Ok(submitted) = engine.submit(&request(index)) {
                        let _ = sender.send((index, submitted.detach()));
                    }
                }
            });
        }
        drop(sender);
        for _ in 0..2 {
            let (engine, receiver, stood) = (&engine, &receiver, &stood);
            scope.spawn(move || loop {
                let next = receiver.lock().unwrap().recv();
                let Ok((index, submission)) = next else {
                    return;
                };
                if let Ok((decision, _)) = engine.complete(submission) {
                    if decision.is_admitted() && index % 3 != 0 {
                        stood.lock().unwrap().push(index);
                    }
                }
            });
        }
    });
    let in_memory = state(&engine, &KEYS, &TEAMS, at);
    let fresh = UsageRequest::new("payg-dee", "m2.7", &one).at(at);
    assert!(
        engine.consume(&fresh).is_err(),
        "the flush failed partway: the log is failed"
    );
    drop(engine);
    let reopened = open_token_plan(dir.path(), OpenOptions::default());
    assert_same_state(
        &state(&reopened, &KEYS, &TEAMS, at),
        &in_memory,
        "the reopened database against memory once every call answered",
    );
    let stood = stood.into_inner().unwrap();
    assert!(
        !stood.is_empty(),
        "some submissions stood before the failure"
    );
    for index in (0..PER_THREAD).filter(|index| index % 3 != 0) {
        let (_, replayed) = reopened
            .check_noting_replay(&request(index))
            .expect("a check");
        if stood.contains(&index) {
            assert!(replayed, "id {index} stood: remembered after the reopen");
        }
    }
}
