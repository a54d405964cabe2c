//! Profiling loop for a checkpoint's cut (`perf record` friendly): a database of KEYS keys
//! seated on the durability benchmark's plan, each with usage in its windows, checkpointed
//! ROUNDS times; prints how long each checkpoint took and each cut held the engine's locks.
//! `cargo run --release --example cutloop -- KEYS ROUNDS` (defaults 100000, 15); with
//! `CUTLOOP_IDS=1` every request carries a request id (ten per key), which the cut copies too.
//! `CUTLOOP_EVENTS_PER_KEY` (10) and `CUTLOOP_SPREAD_MS` (10,000) set how many events each key
//! gets and over how long: `225` and `18000000` fill every key's 5-hour ring (225 buckets of
//! 80 s), as a key busy all day has it.
use std::time::Instant;

use tally_engine::*;

mod support;
use support::{BASE_MS, QUANTITIES};

fn main() {
    let mut args = std::env::args().skip(1);
    let keys: usize = args
        .next()
        .map_or(100_000, |text| text.parse().expect("KEYS"));
    let rounds: usize = args.next().map_or(15, |text| text.parse().expect("ROUNDS"));
    let dir = std::env::temp_dir().join(format!("tally-cutloop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = support::engine(&dir, Some(Durability::None));
    let names = support::seated_keys(&engine, keys);
    let quantities = QUANTITIES;
    // Ten events per key over ten seconds by default, as the benchmark's timeline spreads them.
    let per_key: usize = std::env::var("CUTLOOP_EVENTS_PER_KEY")
        .map_or(10, |text| text.parse().expect("CUTLOOP_EVENTS_PER_KEY"));
    let spread_ms: u64 = std::env::var("CUTLOOP_SPREAD_MS")
        .map_or(10_000, |text| text.parse().expect("CUTLOOP_SPREAD_MS"));
    let events = keys * per_key;
    // With `CUTLOOP_IDS=1`, each request carries an id of its own, which the cut copies too.
    let with_ids = std::env::var_os("CUTLOOP_IDS").is_some();
    let ids: Vec<String> = (0..if with_ids { events } else { 0 })
        .map(|index| format!("request-{index:09}"))
        .collect();
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(1_000) {
        let requests: Vec<UsageRequest<'_>> = chunk
            .iter()
            .map(|&index| {
                let request = UsageRequest::new(&names[index % keys], "m2.7", &quantities)
                    .at(BASE_MS + (index as u64) * spread_ms / events as u64);
                match ids.get(index) {
                    Some(id) => request.id(id),
                    None => request,
                }
            })
            .collect();
        for result in engine.consume_many(&requests) {
            assert!(result.expect("consume").is_admitted());
        }
    }
    println!(
        "{keys} keys, {events} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The whole checkpoint: the cut, then encoding and writing the snapshot (and its fsync).
    let mut whole: Vec<f64> = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            engine.checkpoint().expect("checkpoint");
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    whole.sort_by(f64::total_cmp);
    println!(
        "checkpoint(): median {:.2} ms, min {:.2} ms, max {:.2} ms",
        whole[whole.len() / 2],
        whole[0],
        whole[whole.len() - 1]
    );
    for (what, pick) in [
        ("key shards write-locked", true),
        ("every lock held", false),
    ] {
        let mut held: Vec<f64> = engine
            .cut_lock_times()
            .iter()
            .map(|time| {
                if pick {
                    time.key_shards
                } else {
                    time.every_lock
                }
            })
            .map(|time| time.as_secs_f64() * 1e3)
            .collect();
        let listed: Vec<String> = held.iter().map(|ms| format!("{ms:.1}")).collect();
        held.sort_by(f64::total_cmp);
        println!(
            "{what}: median {:.2} ms, min {:.2} ms, max {:.2} ms; each (ms): {}",
            held[held.len() / 2],
            held[0],
            held[held.len() - 1],
            listed.join(" ")
        );
    }
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}
