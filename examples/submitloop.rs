//! Profiling loop for `submit` (`perf record` / callgrind friendly): a database of KEYS keys
//! seated on the durability benchmark's plan, every key warmed up with one request (untimed),
//! then EVENTS single requests on keys in sequence, each completed once IN_FLIGHT more were
//! submitted, as the durability bench's `submit` rows drive them; prints the time per request.
//! `cargo run --release --example submitloop -- KEYS IN_FLIGHT EVENTS [none|sync|memory]`
//! (defaults 100000, 1000, 2000000, sync; `memory` opens no log at all).
use std::collections::VecDeque;
use std::time::Instant;

use tally_engine::*;

mod support;

fn main() {
    let mut args = support::Args::from_env();
    let keys = args.number(100_000, "KEYS").max(1);
    let in_flight = args.number(1_000, "IN_FLIGHT");
    let events = args.number(2_000_000, "EVENTS") as u64;
    let mode = args.word("sync");
    let dir = support::scratch_dir("submitloop");
    let engine = support::engine(&dir, support::durability(&mode));
    let names = support::seated_keys(&engine, keys);
    let request = |event: u64| support::request(&names, event);
    let complete = |submitted: Submitted<'_, '_>| {
        let (decision, _) = submitted.complete().expect("complete");
        assert!(decision.is_admitted(), "every request must be admitted");
    };
    let warmed = keys as u64;
    for event in 0..warmed {
        complete(engine.submit(&request(event)).expect("submit"));
    }
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(in_flight + 1);
    for event in warmed..warmed + events {
        pending.push_back(engine.submit(&request(event)).expect("submit"));
        if pending.len() > in_flight {
            complete(pending.pop_front().expect("one is pending"));
        }
    }
    pending.into_iter().for_each(complete);
    let elapsed = started.elapsed();
    println!(
        "{keys} keys, {events} requests, {in_flight} in flight ({mode}): {:.0} ns per request, {:.3} M requests/s",
        elapsed.as_nanos() as f64 / events as f64,
        events as f64 / elapsed.as_secs_f64() / 1e6
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}
