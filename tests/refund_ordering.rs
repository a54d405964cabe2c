//! A give-back's credits and the log's order: credits a refund or a reservation's close gives
//! back must not be spent by a request logged before the give-back's own event. If they are,
//! and the give-back's write then fails, the log holds a charge paid with credits no logged
//! event gives: a replay sums the team's balance below zero and the database refuses to open,
//! although every request it was told of stands (the spending one was acknowledged, the
//! give-back was refused).
//!
//! Each test pauses the give-back between giving back in memory and appending its event
//! (`Faults::hold_give_backs`), lets another request of the team be decided (and, if admitted,
//! made durable) meanwhile, makes the give-back's write fail, then reopens: the database must
//! open, to what the engine acknowledged.

mod log_support;

use std::sync::Arc;

use log_support::*;
use tally_engine::{ChargedTo, Decision, Engine, Error, Faults, Policy, Unit, UsageRequest};

/// m2.7's price: 2,000 micro-credits a request, 1 a token.
const REQUEST_MICROS: u64 = 2_000;

/// `zed` (no seat: every request is paid with @zed's credits) on a fresh durable engine,
/// with `micros` topped up.
fn open_zed(dir: &TempDir, faults: &Arc<Faults>, micros: u64) -> Engine {
    let engine = open_token_plan(dir.path(), sync_options_with(faults));
    let at = Some(T0_MS);
    engine.create_user("zed", "key-zed", at).expect("a user");
    engine.top_up("@zed", micros, at).expect("a top-up");
    engine
}

/// Runs `give_back` (a refund or a close of something paid with @zed's credits) on another
/// thread, held between its give-back and its append; meanwhile consumes one m2.7 request on
/// `key-zed`, which only the credits given back could pay. Then the give-back's write fails.
/// Returns the consume's decision and the give-back's outcome.
fn spend_while_held<T: Send>(
    engine: &Engine,
    faults: &Faults,
    give_back: impl FnOnce(&Engine) -> Result<T, Error> + Send,
) -> (Decision, Result<T, Error>) {
    faults.hold_give_backs();
    std::thread::scope(|scope| {
        let held = scope.spawn(|| give_back(engine));
        wait_until_give_back_held(faults);
        // Sync: an admitted request returns once its event is durable, ahead of the held one.
        let one = [(Unit::Requests, 1)];
        let spent = engine
            .consume(&UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS + 2))
            .expect("decided");
        if let Decision::Admitted(admission) = &spent {
            assert_eq!(
                admission.charged_to,
                ChargedTo::Credits {
                    micros: REQUEST_MICROS
                }
            );
        }
        faults.fail_next_inserts(1);
        faults.release_give_backs();
        let outcome = held.join().expect("no panic");
        (spent, outcome)
    })
}

/// Closes `engine` and reopens its database: it must open, to `acknowledged`.
fn assert_reopens_to(engine: Engine, dir: &TempDir, acknowledged: &State, context: &str) {
    drop(engine);
    let reopened = Engine::open(dir.path(), Policy::token_plan(), clock(), sync_options());
    let engine = match reopened {
        Ok(engine) => engine,
        Err(error) => panic!("{context}: the database no longer opens: {error}"),
    };
    let on_disk = state(&engine, &["key-zed"], &["@zed"], T0_MS + 3);
    assert_same_state(
        &on_disk,
        acknowledged,
        &format!("{context}: reopened, against what the engine acknowledged"),
    );
}

#[test]
fn a_refunds_credits_are_not_spent_ahead_of_its_event() {
    let dir = TempDir::new("refund-ordering-refund");
    let faults = Faults::new();
    let engine = open_zed(&dir, &faults, REQUEST_MICROS);
    let one = [(Unit::Requests, 1)];
    let first = engine
        .consume(
            &UsageRequest::new("key-zed", "m2.7", &one)
                .at(T0_MS)
                .id("r1"),
        )
        .expect("admitted");
    assert!(matches!(first, Decision::Admitted(_)), "{first:?}");
    assert_eq!(engine.credits_micros("@zed").unwrap(), 0);

    let (spent, refunded) = spend_while_held(&engine, &faults, |engine| {
        engine.refund("r1", Some(T0_MS + 1))
    });
    assert!(
        matches!(refunded, Err(Error::Storage { .. })),
        "the refund's write fails: {refunded:?}"
    );
    let acknowledged = state(&engine, &["key-zed"], &["@zed"], T0_MS + 3);
    assert_reopens_to(
        engine,
        &dir,
        &acknowledged,
        &format!("a refund whose write failed, racing {spent:?}"),
    );
}

#[test]
fn a_voids_credits_are_not_spent_ahead_of_its_event() {
    let dir = TempDir::new("refund-ordering-void");
    let faults = Faults::new();
    let engine = open_zed(&dir, &faults, REQUEST_MICROS);
    let one = [(Unit::Requests, 1)];
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
        "the hold took it"
    );

    let (spent, voided) =
        spend_while_held(&engine, &faults, |engine| engine.void(id, Some(T0_MS + 1)));
    assert!(
        matches!(voided, Err(Error::Storage { .. })),
        "the void's write fails: {voided:?}"
    );
    let acknowledged = state(&engine, &["key-zed"], &["@zed"], T0_MS + 3);
    assert_eq!(acknowledged.open_reservations, 1, "the hold stands");
    assert_reopens_to(
        engine,
        &dir,
        &acknowledged,
        &format!("a void whose write failed, racing {spent:?}"),
    );
}

#[test]
fn an_expirys_credits_are_not_spent_ahead_of_its_event() {
    let dir = TempDir::new("refund-ordering-expiry");
    let faults = Faults::new();
    let engine = open_zed(&dir, &faults, REQUEST_MICROS);
    let one = [(Unit::Requests, 1)];
    let reserved = engine
        .reserve(
            &UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS),
            Some(1),
        )
        .expect("reserve");
    assert!(reserved.reservation.is_some(), "a credits hold");
    assert_eq!(
        engine.credits_micros("@zed").unwrap(),
        0,
        "the hold took it"
    );

    let (spent, expired) = spend_while_held(&engine, &faults, |engine| {
        engine.expire_reservations(Some(T0_MS + 1))
    });
    assert!(
        matches!(expired, Err(Error::Storage { .. })),
        "the expiry's write fails: {expired:?}"
    );
    let acknowledged = state(&engine, &["key-zed"], &["@zed"], T0_MS + 3);
    assert_reopens_to(
        engine,
        &dir,
        &acknowledged,
        &format!("an expiry whose write failed, racing {spent:?}"),
    );
}

/// A settle of a credits hold that trades units (less of one, more of another) and pays its
/// extra with what the hold gives back: the rest of the give-back must not be spendable before
/// the close is appended either.
#[test]
fn a_settles_credits_left_over_from_its_extra_are_not_spent_ahead_of_its_event() {
    let dir = TempDir::new("refund-ordering-settle");
    let faults = Faults::new();
    // A request and 5,000 tokens: 7,000 micros, all of the balance.
    let engine = open_zed(&dir, &faults, REQUEST_MICROS + 5_000);
    let estimate = [(Unit::Requests, 1), (Unit::Tokens, 5_000)];
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
        "the hold took it"
    );

    // Two requests and no tokens: the 5,000 tokens given back pay the second request's 2,000
    // and leave 3,000, enough for the consume racing it.
    let (spent, settled) = spend_while_held(&engine, &faults, |engine| {
        engine.settle(id, &[(Unit::Requests, 2)], Some(T0_MS + 1))
    });
    assert!(
        matches!(settled, Err(Error::Storage { .. })),
        "the settle's write fails: {settled:?}"
    );
    let acknowledged = state(&engine, &["key-zed"], &["@zed"], T0_MS + 3);
    assert_reopens_to(
        engine,
        &dir,
        &acknowledged,
        &format!("a settle whose write failed, racing {spent:?}"),
    );
}

/// The weaker form, for plan units: a refund gives units back before its event is appended
/// (under its key's lock, as an admission takes them), and a request on the key may take that
/// room and be logged first. If the refund's write then fails, the undo puts the units back
/// whatever the limit, as a replay of the log counts them: memory and disk agree (the key is
/// over its limit by what the failed refund had freed), nothing acknowledged is lost and the
/// database opens. Units are given back before the append, unlike credits: they are the key's
/// own, and no replay of them can refuse.
#[test]
fn a_refunds_units_taken_ahead_of_its_event_count_alike_in_memory_and_on_disk() {
    let dir = TempDir::new("refund-ordering-units");
    let faults = Faults::new();
    let engine = open_zed(&dir, &faults, 1);
    engine
        .withdraw_credits("@zed", 1, Some(T0_MS))
        .expect("no credits left");
    engine
        .assign_seat("@zed", "zed", "Starter", Some(T0_MS))
        .expect("a seat");
    // Starter: 1,500 requests in 5 hours, all taken by r1.
    let all = [(Unit::Requests, 1_500)];
    let first = engine
        .consume(
            &UsageRequest::new("key-zed", "m2.7", &all)
                .at(T0_MS)
                .id("r1"),
        )
        .expect("admitted");
    assert!(
        matches!(&first, Decision::Admitted(admission)
            if matches!(admission.charged_to, ChargedTo::PlanQuota { .. })),
        "{first:?}"
    );
    faults.hold_give_backs();
    let (spent, refunded) = std::thread::scope(|scope| {
        let held = scope.spawn(|| engine.refund("r1", Some(T0_MS + 1)));
        wait_until_give_back_held(&faults);
        let one = [(Unit::Requests, 1)];
        let spent = engine
            .consume(&UsageRequest::new("key-zed", "m2.7", &one).at(T0_MS + 2))
            .expect("decided");
        faults.fail_next_inserts(1);
        faults.release_give_backs();
        (spent, held.join().expect("no panic"))
    });
    assert!(
        matches!(&spent, Decision::Admitted(admission)
            if matches!(admission.charged_to, ChargedTo::PlanQuota { .. })),
        "the room the refund made is taken: {spent:?}"
    );
    assert!(
        matches!(refunded, Err(Error::Storage { .. })),
        "the refund's write fails: {refunded:?}"
    );
    let acknowledged = state(&engine, &["key-zed"], &["@zed"], T0_MS + 3);
    assert_reopens_to(
        engine,
        &dir,
        &acknowledged,
        "a refund of units whose write failed",
    );
}
