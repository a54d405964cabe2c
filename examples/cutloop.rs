//! Profiling loop for a checkpoint's cut (`perf record` friendly): a database of KEYS keys
//! seated on the durability benchmark's plan, each with usage in its windows, checkpointed
//! ROUNDS times; prints how long each cut held the engine's locks.
//! `cargo run --release --example cutloop -- KEYS ROUNDS` (defaults 100000, 15).
use std::sync::Arc;
use std::time::Instant;

use tally_engine::*;

const POLICY: &str = r#"
time_zone = "UTC"

[resources."m2.7"]
units = ["requests", "tokens"]
price_micros = { requests = 2000, tokens = 1 }

[plans.Bench]
limits = [
  { resource = "m2.7", unit = "requests", amount = 4294967295, window = "rolling:5h" },
  { resource = "m2.7", unit = "tokens", amount = 281474976710655, window = "daily" },
]
"#;
const BASE_MS: u64 = 1_790_000_000_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let keys: usize = args
        .next()
        .map_or(100_000, |text| text.parse().expect("KEYS"));
    let rounds: usize = args.next().map_or(15, |text| text.parse().expect("ROUNDS"));
    let dir = std::env::temp_dir().join(format!("tally-cutloop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = OpenOptions {
        durability: Durability::None,
        checkpoint_every_events: u64::MAX,
        ..OpenOptions::default()
    };
    let policy = Policy::from_toml_str(POLICY).expect("policy");
    let clock = Arc::new(ManualClock::new(BASE_MS));
    let engine = Engine::open(&dir, policy, clock, options).expect("open");
    let names: Vec<String> = (0..keys).map(|index| format!("tp-{index:07}")).collect();
    for (index, key) in names.iter().enumerate() {
        let user = format!("user-{index:07}");
        engine.create_user(&user, key, Some(BASE_MS)).expect("user");
        engine
            .assign_seat(&format!("@{user}"), &user, "Bench", Some(BASE_MS))
            .expect("seat");
    }
    let quantities = [(Unit::Requests, 1), (Unit::Tokens, 1_500)];
    // Ten events per key over ten seconds, as the benchmark's timeline spreads them.
    let events = keys * 10;
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(1_000) {
        let requests: Vec<UsageRequest<'_>> = chunk
            .iter()
            .map(|&index| {
                UsageRequest::new(&names[index % keys], "m2.7", &quantities)
                    .at(BASE_MS + (index as u64) * 10_000 / events as u64)
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
    for _ in 0..rounds {
        engine.checkpoint().expect("checkpoint");
    }
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
