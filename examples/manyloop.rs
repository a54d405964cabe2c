//! Profiling loop for `consume_many` (`perf record` / callgrind friendly): a database of KEYS
//! keys seated on the durability benchmark's plan, every key warmed up with one request (untimed),
//! then BATCHES batches of BATCH requests on keys in sequence, as the durability bench issues
//! them; prints the time per event.
//! `cargo run --release --example manyloop -- KEYS BATCH BATCHES [none|sync|memory]`
//! (defaults 100000, 1000, 2000, none; `memory` opens no log at all).
use std::time::Instant;

use tally_engine::*;

mod support;

fn main() {
    let mut args = support::Args::from_env();
    let keys = args.number(100_000, "KEYS");
    let batch = args.number(1_000, "BATCH").max(1);
    let batches = args.number(2_000, "BATCHES");
    let mode = args.word("none");
    let dir = support::scratch_dir("manyloop");
    let engine = support::engine(&dir, support::durability(&mode));
    let names = support::seated_keys(&engine, keys);
    let run = |first: u64, count: u64| {
        let mut requests = Vec::with_capacity(batch);
        let mut index = first;
        while index < first + count {
            requests.clear();
            requests
                .extend((index..index + batch as u64).map(|event| support::request(&names, event)));
            let admitted = engine
                .consume_many(&requests)
                .into_iter()
                .filter(|result| result.as_ref().is_ok_and(Decision::is_admitted))
                .count();
            assert_eq!(admitted, batch, "every request must be admitted");
            index += batch as u64;
        }
        index
    };
    let warmed = run(0, keys as u64);
    let events = (batch * batches) as u64;
    let started = Instant::now();
    run(warmed, events);
    let elapsed = started.elapsed();
    println!(
        "{keys} keys, {batches} batches of {batch} ({mode}): {:.0} ns per event, {:.3} M events/s",
        elapsed.as_nanos() as f64 / events as f64,
        events as f64 / elapsed.as_secs_f64() / 1e6
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}
