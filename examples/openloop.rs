//! Profiling loop for opening a database (`perf record` friendly): builds, once, a database of
//! KEYS keys seated on the durability benchmark's plan with HISTORY events over 24 hours
//! (checkpointed on close) and TAIL more after its last checkpoint (left as a crash leaves
//! them), then opens it OPENS times without checkpointing, printing each open's time.
//! `cargo run --release --example openloop -- DIR [KEYS HISTORY TAIL OPENS]`
//! (defaults 100000, 10000000, 1000000, 3). An existing DIR is opened as it is.
use std::path::Path;
use std::time::Instant;

use tally_engine::*;

mod support;
use support::{BASE_MS, QUANTITIES};

/// The history spans a day whatever its length, as in the durability bench.
const DAY_MS: u64 = 24 * 3_600_000;

fn write_events(engine: &Engine, names: &[String], first: u64, count: u64, per_ms: f64) {
    let quantities = QUANTITIES;
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ first;
    let mut requests = Vec::with_capacity(10_000);
    let mut index = first;
    while index < first + count {
        requests.clear();
        let end = (index + 10_000).min(first + count);
        for event in index..end {
            // xorshift: keys in a random order, as traffic comes.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let key = &names[(state % names.len() as u64) as usize];
            let at_ms = BASE_MS + (event as f64 / per_ms) as u64;
            requests.push(UsageRequest::new(key, "m2.7", &quantities).at(at_ms));
        }
        for result in engine.consume_many(&requests) {
            assert!(result.expect("admitted").is_admitted());
        }
        index = end;
    }
}

fn build(dir: &Path, keys: usize, history: u64, tail: u64) {
    let started = Instant::now();
    let per_ms = history.max(1) as f64 / DAY_MS as f64;
    let engine = support::engine(dir, Some(Durability::None));
    let names = support::seated_keys(&engine, keys);
    write_events(&engine, &names, 0, history, per_ms);
    engine.close().expect("close, with its checkpoint");
    let engine = support::engine(dir, Some(Durability::None));
    write_events(&engine, &names, history, tail, per_ms);
    // Dropped without close(): the tail stays after the last checkpoint.
    drop(engine);
    println!(
        "built {}: {keys} keys, {history} events, then {tail} after the last checkpoint, in {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("DIR");
    let mut number = |default: u64, what: &str| {
        args.next()
            .map_or(default, |text| text.parse().expect(what))
    };
    let keys = number(100_000, "KEYS") as usize;
    let history = number(10_000_000, "HISTORY");
    let tail = number(1_000_000, "TAIL");
    let opens = number(3, "OPENS");
    let dir = Path::new(&dir);
    if !dir.exists() {
        build(dir, keys, history, tail);
    }
    for _ in 0..opens {
        let started = Instant::now();
        let engine = support::engine(dir, Some(Durability::None));
        let seconds = started.elapsed().as_secs_f64();
        let report = engine.open_report().expect("an opened engine has a report");
        println!("open: {seconds:.3} s ({report})");
        drop(engine);
    }
}
