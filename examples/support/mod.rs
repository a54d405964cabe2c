//! What the profiling loops (`cutloop`, `manyloop`, `submitloop`, `idloop`, ...) share: the
//! durability benchmark's plan (two limits, far above anything they consume), a database of
//! seated keys, and (for the loops that take a mode) the log mode and a scratch directory.
// Each loop compiles this module on its own and uses part of it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
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

/// A loop's log mode, from its last argument: `memory` (no log at all), `none` (every event
/// logged, no fsync) or `sync`.
pub fn durability(mode: &str) -> Option<Durability> {
    match mode {
        "memory" => None,
        "none" => Some(Durability::None),
        "sync" => Some(Durability::Sync),
        other => panic!("mode {other:?}: none, sync or memory"),
    }
}

/// A fresh directory for loop `name`'s database, in the temp dir (one per process); the loop
/// removes it when it ends.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The loops' request number `index`: the keys in sequence, stamped one millisecond per
/// thousand requests (the durability bench's timeline).
pub fn request(names: &[String], index: u64) -> UsageRequest<'_> {
    UsageRequest::new(
        &names[(index % names.len() as u64) as usize],
        "m2.7",
        &QUANTITIES,
    )
    .at(BASE_MS + index / 1_000)
}

/// A loop's arguments, in order: numbers, then its mode, each with a default.
pub struct Args(std::iter::Skip<std::env::Args>);

impl Args {
    pub fn from_env() -> Args {
        Args(std::env::args().skip(1))
    }

    /// The next argument as a number (`what` names it when it is not one), or `default`.
    pub fn number(&mut self, default: usize, what: &str) -> usize {
        self.0
            .next()
            .map_or(default, |text| text.parse().expect(what))
    }

    /// The next argument as it is, or `default`.
    pub fn word(&mut self, default: &str) -> String {
        self.0.next().unwrap_or_else(|| default.into())
    }
}
