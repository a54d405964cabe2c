//! How long a step of the automatic reclaim (`EngineOptions::reclaim_idle_every_ms`) holds its
//! shard's write lock, from the first step of a shard to its last: KEYS seated keys (no usage,
//! so every step visits its 512 keys and frees nothing), and one key consumed at a clock that
//! moves far enough each time for a step to be due at every housekeeping look. Prints the time
//! of the calls that took a step (the step's own time and a consume's), by how far into its
//! shard the step began.
//! `cargo run --release --example reclaimloop -- KEYS` (default 4000000; about 1 KiB a key).
use std::sync::Arc;
use std::time::Instant;

mod support;

use support::{BASE_MS, QUANTITIES};
use tally_engine::*;

fn main() {
    let mut args = support::Args::from_env();
    let keys = args.number(4_000_000, "KEYS").max(1);
    let clock = Arc::new(ManualClock::new(BASE_MS));
    let engine = Engine::new(
        Policy::from_toml_str(support::POLICY).expect("policy"),
        Arc::clone(&clock) as Arc<dyn Clock>,
        EngineOptions {
            max_keys: keys as u64 + 1,
            max_users: keys as u64 + 1,
            max_teams: keys as u64 + 1,
            // A step is due a millisecond after the last one, so at every look.
            reclaim_idle_every_ms: 1,
            max_ahead_of_clock_ms: 0,
            ..EngineOptions::default()
        },
    )
    .expect("valid options");
    let names = support::seated_keys(&engine, keys);
    let hot = &names[0];
    let shard_keys = keys / 64;
    // Calls slower than this took a step (a consume alone is well under a microsecond).
    let step_ns = 2_000;
    let mut by_depth: Vec<Vec<u64>> = vec![Vec::new(); 4];
    let mut at_ms = BASE_MS;
    let (_, rounds_before) = engine.automatic_reclaims();
    let mut steps = 0usize;
    let started = Instant::now();
    while engine.automatic_reclaims().1 == rounds_before && started.elapsed().as_secs() < 600 {
        at_ms += 2;
        clock.set_ms(at_ms);
        let request = UsageRequest::new(hot, "m2.7", &QUANTITIES).at(at_ms);
        let call = Instant::now();
        let decision = engine.consume(&request).expect("valid");
        let ns = call.elapsed().as_nanos() as u64;
        assert!(decision.is_admitted());
        if ns >= step_ns {
            // Steps go through a shard 512 keys at a time, shard after shard.
            let depth = (steps * 512) % shard_keys.max(1) * 4 / shard_keys.max(1);
            by_depth[depth.min(3)].push(ns);
            steps += 1;
        }
    }
    println!(
        "keys={keys} ({shard_keys} a shard): {steps} calls took a step of the reclaim in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for (quarter, times) in by_depth.iter_mut().enumerate() {
        times.sort_unstable();
        if times.is_empty() {
            continue;
        }
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize] as f64 / 1e3;
        println!(
            "  steps in quarter {} of their shard: {} calls, median {:.0} us, p99 {:.0} us, max {:.0} us",
            quarter + 1,
            times.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}
