//! Profiling loop for `consume_many` (`perf record` / callgrind friendly): a database of KEYS
//! keys seated on the durability benchmark's plan, every key warmed up with one request (untimed),
//! then BATCHES batches of BATCH requests on keys in sequence, as the durability bench issues
//! them; prints the time per event.
//! `cargo run --release --example manyloop -- KEYS BATCH BATCHES [none|sync|memory]`
//! (defaults 100000, 1000, 2000, none; `memory` opens no log at all).
use std::time::Instant;

use tally_engine::*;

mod support;
use support::{BASE_MS, QUANTITIES};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut number = |default: usize, what: &str| {
        args.next()
            .map_or(default, |text| text.parse().expect(what))
    };
    let keys = number(100_000, "KEYS");
    let batch = number(1_000, "BATCH").max(1);
    let batches = number(2_000, "BATCHES");
    let mode = std::env::args().nth(4).unwrap_or_else(|| "none".into());
    let dir = std::env::temp_dir().join(format!("tally-manyloop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let durability = match mode.as_str() {
        "memory" => None,
        "none" => Some(Durability::None),
        "sync" => Some(Durability::Sync),
        other => panic!("mode {other:?}: none, sync or memory"),
    };
    let engine = support::engine(&dir, durability);
    let names = support::seated_keys(&engine, keys);
    let quantities = QUANTITIES;
    // One millisecond per thousand events, as the durability bench's timeline.
    let run = |first: u64, count: u64| {
        let mut requests = Vec::with_capacity(batch);
        let mut index = first;
        while index < first + count {
            requests.clear();
            requests.extend((index..index + batch as u64).map(|event| {
                UsageRequest::new(&names[(event % keys as u64) as usize], "m2.7", &quantities)
                    .at(BASE_MS + event / 1_000)
            }));
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
