//! Checkpoints, compaction and export readers across reopens: `verify` after an open changed
//! the generations kept, a compacted world reopened against its in-memory twin, and readers at
//! different places across segment rotations.

mod log_support;

use log_support::*;
use tally_engine::{Engine, EngineOptions, OpenOptions, Policy, Unit, UsageRequest};

fn tiny(amount: u64) -> Policy {
    Policy::from_toml_str(&format!(
        r#"
time_zone = "UTC"

[resources.chat]
units = ["requests"]
price_micros = {{ requests = 1000 }}

[plans.Tiny]
limits = [{{ resource = "chat", unit = "requests", amount = {amount}, window = "rolling:10s" }}]
"#
    ))
    .expect("a valid policy")
}

/// `verify` replays from the snapshot before the latest with the options the database
/// recorded last. Reopened with a larger `max_policy_generations` (and closed, or crashed,
/// before two new snapshots), the snapshot before the latest was taken under the smaller
/// bound, and the replay keeps generations the live engine had let go: `verify` calls a
/// database unsound that opens, and runs, exactly as before.
#[test]
fn verify_with_the_recorded_options_is_sound_after_a_reopen_that_raised_the_generations_kept() {
    let dir = TempDir::new("checkpoints-options");
    let first = OpenOptions {
        engine: EngineOptions {
            max_policy_generations: 2,
            ..EngineOptions::default()
        },
        ..sync_options()
    };
    let engine = open(dir.path(), tiny(5), first);
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ann", "ann", "Tiny", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    engine
        .consume(&UsageRequest::new("key-ann", "chat", &one).at(T0_MS))
        .unwrap();
    engine.checkpoint().unwrap();
    for amount in [6, 7, 8] {
        engine.swap_policy(tiny(amount), Some(T0_MS + 1)).unwrap();
    }
    let before = state(&engine, &["key-ann"], &["@ann"], T0_MS + 2);
    engine.close().unwrap();
    // The owner reopens it with the default bound (recorded), and closes it again.
    let engine = open(dir.path(), tiny(8), sync_options());
    assert_same_state(
        &state(&engine, &["key-ann"], &["@ann"], T0_MS + 2),
        &before,
        "reopened",
    );
    engine.close().unwrap();
    let engine = open(dir.path(), tiny(8), sync_options());
    assert_same_state(
        &state(&engine, &["key-ann"], &["@ann"], T0_MS + 2),
        &before,
        "reopened again",
    );
    drop(engine);
    // As `tally verify` runs it: with the options the database recorded.
    let verified = Engine::verify(
        dir.path(),
        OpenOptions {
            use_recorded: true,
            ..sync_options()
        },
    )
    .unwrap();
    assert!(verified.replayed_with_recorded_options);
    assert!(verified.is_sound(), "{:?}", verified.problems);
}

/// Readers at different places, reading a few events at a time across segment rotations,
/// checkpoints and compactions, each see every event once, in order.
#[test]
fn readers_at_different_places_see_every_event_once_across_rotations() {
    let dir = TempDir::new("checkpoints-readers");
    let options = OpenOptions {
        segment_bytes: 256,
        retention_ms: SECOND_MS,
        checkpoint_every_events: 7,
        ..sync_options()
    };
    let engine = open(dir.path(), tiny(1_000), options);
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine
        .assign_seat("@ann", "ann", "Tiny", Some(T0_MS))
        .unwrap();
    let one = [(Unit::Requests, 1)];
    let mut readers: Vec<(u64, usize, Vec<u64>)> =
        vec![(0, 1, Vec::new()), (0, 3, Vec::new()), (0, 17, Vec::new())];
    for index in 0..300u64 {
        engine
            .consume(&UsageRequest::new("key-ann", "chat", &one).at(T0_MS + index))
            .unwrap();
        for (at, limit, seen) in readers.iter_mut() {
            if (index as usize) % *limit == 0 {
                let events = engine.events_after(*at, *limit).unwrap();
                for event in &events {
                    seen.push(event.seq);
                }
                if let Some(last) = events.last() {
                    *at = last.seq;
                }
            }
        }
    }
    let last = last_seq(&engine);
    for (at, limit, seen) in readers.iter_mut() {
        loop {
            let events = engine.events_after(*at, *limit).unwrap();
            let Some(event) = events.last() else { break };
            *at = event.seq;
            seen.extend(events.iter().map(|event| event.seq));
        }
        let expected: Vec<u64> = (1..=last).collect();
        assert_eq!(*seen, expected, "reader by {limit}");
    }
}

/// The populated world (open reservations, request ids, corrections, calendar windows),
/// checkpointed, a day on compacted, reopened: the same as a twin that never closed, through
/// lease expiry, refunds and retries after the reopen; and `verify` is sound throughout.
#[test]
fn the_world_compacted_and_reopened_matches_its_twin() {
    let dir = TempDir::new("checkpoints-world");
    let clock = log_support::clock();
    let twin_clock = log_support::clock();
    let options = OpenOptions {
        retention_ms: SECOND_MS,
        ..sync_options()
    };
    let reopen = |options: &OpenOptions| {
        Engine::open(
            dir.path(),
            Policy::token_plan(),
            std::sync::Arc::clone(&clock) as std::sync::Arc<dyn tally_engine::Clock>,
            options.clone(),
        )
        .unwrap()
    };
    let engine = reopen(&options);
    let twin = Engine::new(
        Policy::token_plan(),
        twin_clock.clone(),
        EngineOptions::default(),
    )
    .unwrap();
    let world = populate(&engine);
    assert_eq!(world, populate(&twin));
    engine.checkpoint().unwrap();
    let later = POPULATED_MS + 30 * MINUTE_MS;
    clock.set_ms(later);
    twin_clock.set_ms(later);
    let continued = continue_world(&engine, &world, later);
    assert_eq!(continued, continue_world(&twin, &world, later));
    engine.checkpoint().unwrap();
    let day = later + 40 * DAY_MS;
    clock.set_ms(day);
    twin_clock.set_ms(day);
    let one = [(Unit::Requests, 1)];
    for key in KEYS {
        let request = UsageRequest::new(key, "m2.7", &one).at(day).id(key);
        assert_eq!(engine.consume(&request), twin.consume(&request), "{key}");
    }
    let report = engine.compact(None).unwrap();
    assert!(report.events_removed > 0, "{report:?}");
    let before = state(&engine, &KEYS, &TEAMS, day);
    assert_same_state(&before, &state(&twin, &KEYS, &TEAMS, day), "before");
    engine.close().unwrap();
    let verified = Engine::verify(dir.path(), options.clone()).unwrap();
    assert!(verified.is_sound(), "{:?}", verified.problems);
    let engine = reopen(&options);
    assert_same_state(&state(&engine, &KEYS, &TEAMS, day), &before, "reopened");
    for key in KEYS {
        let request = UsageRequest::new(key, "m2.7", &one).at(day + 1).id(key);
        assert_eq!(
            engine.consume(&request),
            twin.consume(&request),
            "retry {key}"
        );
        assert_eq!(
            engine.refund(key, Some(day + 2)),
            twin.refund(key, Some(day + 2)),
            "refund {key}"
        );
        assert_eq!(
            engine.refund("req-a1", Some(day + 2)),
            twin.refund("req-a1", Some(day + 2)),
            "refund req-a1"
        );
    }
    assert_same_state(
        &state(&engine, &KEYS, &TEAMS, day + 3),
        &state(&twin, &KEYS, &TEAMS, day + 3),
        "after retries and refunds",
    );
    engine.close().unwrap();
    let verified = Engine::verify(dir.path(), options.clone()).unwrap();
    assert!(verified.is_sound(), "{:?}", verified.problems);
}

/// The same the other way: the bound lowered at a reopen, as `ARCHITECTURE.md`'s bounds allow
/// ("policy generations past `max_policy_generations` (until the next swap)"). The replay
/// from the snapshot before the latest lets go generations the live engine kept.
#[test]
fn verify_with_the_recorded_options_is_sound_after_a_reopen_that_lowered_the_generations_kept() {
    let dir = TempDir::new("checkpoints-options-low");
    let engine = open(dir.path(), tiny(5), sync_options());
    engine.create_user("ann", "key-ann", Some(T0_MS)).unwrap();
    engine.checkpoint().unwrap();
    for amount in [6, 7, 8] {
        engine.swap_policy(tiny(amount), Some(T0_MS + 1)).unwrap();
    }
    engine.close().unwrap();
    let low = OpenOptions {
        engine: EngineOptions {
            max_policy_generations: 2,
            ..EngineOptions::default()
        },
        ..sync_options()
    };
    let engine = open(dir.path(), tiny(8), low);
    engine.close().unwrap();
    let verified = Engine::verify(
        dir.path(),
        OpenOptions {
            use_recorded: true,
            ..sync_options()
        },
    )
    .unwrap();
    assert!(verified.is_sound(), "{:?}", verified.problems);
}

/// A clock that reads a year ahead for one checkpoint, then comes back: the record that the
/// checkpoint's events were logged by then is lowered by the next checkpoint's (they were
/// logged by its time too), so compaction goes on once the retention has passed on the real
/// clock. The glitched record held back the removal of its segments and of every later one
/// (compaction removes the oldest first) until the real clock passed the glitch plus the
/// retention: a year of segments kept.
#[test]
fn a_clock_glitched_ahead_at_a_checkpoint_does_not_hold_compaction_back() {
    let dir = TempDir::new("glitch-compaction");
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine = open_on_clock(dir.path(), clock.clone(), sync_options());
    create_accounts(&engine);
    let request = UsageRequest::new("payg-dee", "m2.7", &[(Unit::Requests, 1)]);
    engine.consume(&request).expect("a consume");
    clock.set_ms(T0_MS + 365 * DAY_MS);
    engine
        .checkpoint()
        .expect("a checkpoint on the glitched clock");
    clock.set_ms(T0_MS + MINUTE_MS);
    engine.consume(&request).expect("a consume");
    engine.checkpoint().expect("a checkpoint on the real clock");
    clock.set_ms(T0_MS + 60 * DAY_MS);
    engine.consume(&request).expect("a consume");
    let report = engine.compact(None).expect("a compaction");
    assert!(
        report.events_removed > 0 && report.first_seq_kept > 1,
        "the segments before the glitched checkpoint are past the retention: {report:?}"
    );
}
