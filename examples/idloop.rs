//! Profiling loop for request ids (`perf record` friendly): a database of KEYS keys seated on the
//! durability benchmark's plan, every key warmed up with one request (untimed), then IDS
//! `consume` calls on keys in sequence, each under a new request id of 36 characters (a UUID's
//! length, as gateways send), then the same IDS again (repeats: each answered with its first
//! decision, counting nothing). Prints the time per call of each pass and the resident memory
//! the remembered ids added, per id.
//! `cargo run --release --example idloop -- KEYS IDS [memory|none|sync]`
//! (defaults 100000, 1000000, memory; `memory` opens no log at all, `none` logs every decision
//! without an fsync).
use std::time::Instant;

mod support;

/// The process's resident set, in bytes (Linux).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("statm's resident field");
    pages * 4096
}

fn main() {
    let mut args = support::Args::from_env();
    let keys = args.number(100_000, "KEYS").max(1);
    let ids = args.number(1_000_000, "IDS") as u64;
    let mode = args.word("memory");
    let dir = support::scratch_dir("idloop");
    let engine = support::engine(&dir, support::durability(&mode));
    let names = support::seated_keys(&engine, keys);
    let request = |call: u64| support::request(&names, call);
    for call in 0..keys as u64 {
        let decision = engine.consume(&request(call)).expect("warm-up");
        assert!(decision.is_admitted(), "every request must be admitted");
    }
    // A UUID's shape and length, different for every call.
    let id = |call: u64| {
        format!(
            "{:08x}-0000-4000-8000-{call:012x}",
            call.wrapping_mul(2_654_435_761) as u32
        )
    };
    let resident_before = resident_bytes();
    let pass = |repeat: bool| {
        let started = Instant::now();
        for call in 0..ids {
            let id = id(call);
            let (decision, replayed) = engine
                .consume_noting_replay(&request(call).id(&id))
                .expect("consume under a request id");
            assert!(decision.is_admitted(), "every request must be admitted");
            assert_eq!(replayed, repeat, "a first call decides, a repeat replays");
        }
        started.elapsed().as_nanos() as f64 / ids as f64
    };
    let first = pass(false);
    let resident_after = resident_bytes();
    let repeated = pass(true);
    println!(
        "{keys} keys, {ids} request ids ({mode}): new id {first:.0} ns per call, repeat {repeated:.0} ns; \
         resident memory +{:.1} MiB, {:.0} B per id",
        resident_after.saturating_sub(resident_before) as f64 / (1 << 20) as f64,
        resident_after.saturating_sub(resident_before) as f64 / ids as f64,
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}
