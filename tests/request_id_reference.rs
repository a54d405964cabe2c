//! Request ids probed for exactness: a repeat returns the first decision and counts nothing,
//! through batches, refunds, reopens and compaction.

mod log_support;

use std::sync::Arc;

use log_support::*;
use tally_engine::{Decision, Engine, Error, ManualClock, Unit, UsageRequest};

const THREE: [(Unit, u64); 1] = [(Unit::Requests, 3)];

fn m27_used(engine: &Engine, key: &str, at_ms: u64) -> u64 {
    engine
        .usage(key, Some(at_ms))
        .expect("a report")
        .limits
        .iter()
        .find(|limit| limit.meter == "m2.7:requests")
        .expect("an m2.7 limit")
        .used
}

fn consume_id(engine: &Engine, key: &str, id: &str, at_ms: u64) -> Result<(Decision, bool), Error> {
    engine.consume_noting_replay(&UsageRequest::new(key, "m2.7", &THREE).at(at_ms).id(id))
}

#[test]
fn the_same_id_twice_in_one_batch_counts_once_and_a_changed_twin_is_a_conflict() {
    let dir = TempDir::new("exact-ids-batch");
    let engine = open_token_plan(dir.path(), sync_options());
    create_accounts(&engine);
    let at = T0_MS + MINUTE_MS;
    let five = [(Unit::Requests, 5)];
    let requests = [
        UsageRequest::new("key-eve", "m2.7", &THREE).at(at).id("x"),
        UsageRequest::new("key-eve", "m2.7", &THREE)
            .at(at + 1)
            .id("x"),
        UsageRequest::new("key-eve", "m2.7", &five)
            .at(at + 2)
            .id("x"),
        UsageRequest::new("key-bob", "m2.7", &THREE)
            .at(at + 3)
            .id("x"),
    ];
    let (results, replays) = engine.consume_many_noting_replay(&requests);
    assert!(
        matches!(&results[0], Ok(d) if d.is_admitted()) && !replays[0],
        "{results:?}"
    );
    assert!(
        matches!(&results[1], Ok(d) if d.is_admitted()) && replays[1],
        "{results:?}"
    );
    assert!(
        matches!(&results[2], Err(Error::RequestIdConflict { .. })),
        "{results:?}"
    );
    assert!(
        matches!(&results[3], Err(Error::RequestIdConflict { .. })),
        "{results:?}"
    );
    assert_eq!(m27_used(&engine, "key-eve", at + 3), 3);
    assert_eq!(m27_used(&engine, "key-bob", at + 3), 0);
    engine.close().expect("close");
    let engine = open_token_plan(dir.path(), sync_options());
    assert_eq!(m27_used(&engine, "key-eve", at + 3), 3);
    let again = consume_id(&engine, "key-eve", "x", at + 4).expect("a repeat");
    assert!(again.1 && again.0.is_admitted(), "{again:?}");
    assert_eq!(m27_used(&engine, "key-eve", at + 4), 3);
}

#[test]
fn a_refunded_id_repeated_counts_nothing_and_refunds_only_once_across_reopen_and_compaction() {
    let dir = TempDir::new("exact-ids-refund");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    create_accounts(&engine);
    let at = T0_MS + MINUTE_MS;
    let first = consume_id(&engine, "key-eve", "r", at).expect("first");
    assert!(!first.1 && first.0.is_admitted());
    let repeat = consume_id(&engine, "key-eve", "r", at + 1).expect("repeat");
    assert_eq!(repeat, (first.0, true));
    assert_eq!(m27_used(&engine, "key-eve", at + 1), 3);
    let refund = engine.refund("r", Some(at + 2)).expect("refund");
    eprintln!("{refund:?}");
    assert_eq!(m27_used(&engine, "key-eve", at + 2), 0);
    let after = consume_id(&engine, "key-eve", "r", at + 3).expect("repeat after refund");
    assert_eq!(after, (first.0, true));
    assert_eq!(m27_used(&engine, "key-eve", at + 3), 0);
    assert!(engine.refund("r", Some(at + 4)).is_err());
    assert_eq!(m27_used(&engine, "key-eve", at + 4), 0);
    // Other traffic, a checkpoint and a compaction, a reopen.
    for i in 0..5 {
        let id = format!("o{i}");
        consume_id(&engine, "key-bob", &id, at + 10 + i).expect("other");
    }
    engine.checkpoint().expect("checkpoint");
    consume_id(&engine, "key-bob", "late", at + 20).expect("other");
    engine.checkpoint().expect("checkpoint");
    engine.compact(Some(at + 30)).expect("compact");
    engine.close().expect("close");
    let engine = open_on_clock(dir.path(), clock, sync_options());
    assert_eq!(m27_used(&engine, "key-eve", at + 40), 0);
    let after = consume_id(&engine, "key-eve", "r", at + 41).expect("repeat after reopen");
    assert_eq!(after, (first.0, true));
    assert_eq!(m27_used(&engine, "key-eve", at + 41), 0);
    assert!(engine.refund("r", Some(at + 42)).is_err());
    let bob = consume_id(&engine, "key-bob", "o1", at + 43).expect("bob repeat");
    assert!(bob.1);
    assert_eq!(m27_used(&engine, "key-bob", at + 43), 18);
    let refund = engine
        .refund("o1", Some(at + 44))
        .expect("a refund after reopen");
    eprintln!("{refund:?}");
    assert_eq!(m27_used(&engine, "key-bob", at + 44), 15);
}

#[test]
fn an_id_at_its_horizon_is_decided_alike_with_and_without_a_reopen() {
    for offset in [-1i64, 0, 1] {
        id_at_horizon(offset);
    }
}

fn id_at_horizon(offset: i64) {
    let dir = TempDir::new(&format!("exact-ids-horizon{offset}"));
    let clock = Arc::new(ManualClock::new(T0_MS));
    let durable = open_on_clock(dir.path(), clock.clone(), sync_options());
    let memory = Engine::new(
        tally_engine::Policy::token_plan(),
        clock.clone(),
        tally_engine::EngineOptions::default(),
    )
    .expect("an engine");
    let at = T0_MS + MINUTE_MS;
    for engine in [&durable, &memory] {
        create_accounts(engine);
        assert!(consume_id(engine, "key-eve", "h", at)
            .expect("first")
            .0
            .is_admitted());
    }
    let horizon = memory.options().idempotency_horizon_ms;
    let horizon = if horizon == 0 {
        memory.policy().longest_window_ms()
    } else {
        horizon
    };
    let later = (at + horizon).checked_add_signed(offset).unwrap();
    clock.set_ms(later);
    durable.close().expect("close");
    let durable = open_on_clock(dir.path(), clock.clone(), sync_options());
    let reopened = consume_id(&durable, "key-eve", "h", later);
    let kept = consume_id(&memory, "key-eve", "h", later);
    eprintln!("offset {offset}: in memory {kept:?} / reopened {reopened:?}");
    assert_eq!(kept, reopened, "offset {offset}");
    if offset > 0 {
        assert!(!kept.unwrap().1, "decided anew");
    } else {
        assert!(kept.unwrap().1, "a repeat");
    }
}
