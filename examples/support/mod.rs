//! What the profiling loops (`cutloop`, `manyloop`) share: the durability benchmark's plan
//! (two limits, far above anything they consume) and a database of seated keys.
use std::path::Path;
use std::sync::Arc;

use tally_engine::*;

/// The durability benchmark's policy: the file `benches/durability.rs` reads too.
pub const POLICY: &str = include_str!("../../benches/durability-policy.toml");

/// 2026-09-21 (UTC); the loops' timestamps count from here.
pub const BASE_MS: u64 = 1_790_000_000_000;

/// What one request of the loops uses.
pub const QUANTITIES: [(Unit, u64); 2] = [(Unit::Requests, 1), (Unit::Tokens, 1_500)];

/// An engine on the benchmark's policy: with a log at `dir` (`Some(durability)`, periodic
/// checkpoints off) or without one.
pub fn engine(dir: &Path, durability: Option<Durability>) -> Engine {
    let policy = Policy::from_toml_str(POLICY).expect("policy");
    let clock = Arc::new(ManualClock::new(BASE_MS));
    // The loops' stamps run ahead of a clock that stands still: no bound ahead of it.
    let unbounded = EngineOptions {
        max_ahead_of_clock_ms: 0,
        ..EngineOptions::default()
    };
    match durability {
        None => Engine::new(policy, clock, unbounded).expect("valid options"),
        Some(durability) => {
            let options = OpenOptions {
                durability,
                checkpoint_every_events: u64::MAX,
                engine: unbounded,
                ..OpenOptions::default()
            };
            Engine::open(dir, policy, clock, options).expect("open")
        }
    }
}

/// Creates `keys` users, each with a key seated on the plan; returns the keys' names.
pub fn seated_keys(engine: &Engine, keys: usize) -> Vec<String> {
    let names: Vec<String> = (0..keys).map(|index| format!("tp-{index:07}")).collect();
    for (index, key) in names.iter().enumerate() {
        let user = format!("user-{index:07}");
        engine.create_user(&user, key, Some(BASE_MS)).expect("user");
        engine
            .assign_seat(&format!("@{user}"), &user, "Bench", Some(BASE_MS))
            .expect("seat");
    }
    names
}
