//! Profiling loop for the admission hot path (`perf record` friendly): tally's `consume` on a
//! plan with three limits beside governor's keyed `check_key`, in alternating bursts so a noisy
//! machine affects both alike. `cargo run --release --example hotloop -- KEYS [THREADS]`
//! (default 1 key; with THREADS, that many threads each on its own keys, tally only; with
//! `HOTLOOP_SEPARATE=1` as well, each thread on an engine of its own, which shows what two cores
//! give a loop that shares nothing).
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tally_engine::*;

const POLICY: &str = r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.P]
limits = [
 { resource = "chat", unit = "requests", amount = ROLLING_AMOUNT, window = "rolling:5h" },
 { resource = "chat", unit = "requests", amount = 100000000000000, window = "daily" },
 { resource = "chat", unit = "requests", amount = 200000000000000, window = "weekly" },
]
"#;

const SEQUENCE: usize = 1 << 20;
const BURST: usize = 200_000;
/// Paired bursts per run; `HOTLOOP_ROUNDS` sets another (e.g. 1 under callgrind).
fn rounds() -> usize {
    std::env::var("HOTLOOP_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(15)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let t0 = 1_790_000_000_000u64;
    let new_engine = || {
        Engine::new(
            Policy::from_toml_str(&POLICY.replace(
                "ROLLING_AMOUNT",
                &std::env::var("HOTLOOP_ROLLING_AMOUNT").unwrap_or_else(|_| "4000000000".into()),
            ))
            .expect("valid policy"),
            Arc::new(ManualClock::new(t0)),
            EngineOptions {
                max_keys: 4_000_000,
                // Stamps run ahead of a clock that stands still: no bound ahead of it.
                max_ahead_of_clock_ms: 0,
                ..EngineOptions::default()
            },
        )
        .expect("valid options")
    };
    let engine = new_engine();
    let n_keys: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("a key count"))
        .unwrap_or(1);
    let threads: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().expect("a thread count"))
        .unwrap_or(0);
    if n_keys == 0 || threads > n_keys {
        // Each thread takes its own keys: a thread without one would have nothing to admit.
        eprintln!("hotloop KEYS [THREADS]: KEYS must be at least 1 and at least THREADS (got KEYS={n_keys}, THREADS={threads})");
        std::process::exit(2);
    }
    let keys: Vec<String> = (0..n_keys).map(|i| format!("key-{i:08}")).collect();
    let governor: DefaultKeyedRateLimiter<u64> = RateLimiter::keyed(Quota::per_second(
        NonZeroU32::new(1_000_000_000).expect("non-zero"),
    ));
    let q = [(Unit::Requests, 1)];
    let add_key = |engine: &Engine, i: usize, k: &str| {
        let u = format!("u{i}");
        engine.create_user(&u, k, None).expect("new user");
        engine
            .assign_seat(&format!("@{u}"), &u, "P", None)
            .expect("seat");
        let first = UsageRequest::new(k, "chat", &q).at(t0);
        assert!(engine.consume(&first).expect("valid").is_admitted());
    };
    for (i, k) in keys.iter().enumerate() {
        add_key(&engine, i, k);
        assert!(governor.check_key(&(i as u64)).is_ok());
    }
    // With HOTLOOP_SEPARATE, thread t's keys (key i goes to thread i % threads) also live in
    // an engine of their own.
    let separate: Vec<Engine> = if threads > 0 && std::env::var_os("HOTLOOP_SEPARATE").is_some() {
        (0..threads)
            .map(|thread| {
                let own = new_engine();
                for (i, k) in keys.iter().enumerate().skip(thread).step_by(threads) {
                    add_key(&own, i, k);
                }
                own
            })
            .collect()
    } else {
        Vec::new()
    };
    // Keys in request order in one string, read sequentially (as the bench does): the
    // random-access cost measured is the limiter's, not the key list's.
    let mut x = 88172645463325252u64;
    let order: Vec<usize> = (0..SEQUENCE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n_keys as u64) as usize
        })
        .collect();
    let width = keys[0].len();
    let sequence: String = order.iter().map(|&i| keys[i].as_str()).collect();
    let governor_sequence: Vec<u64> = order.iter().map(|&i| i as u64).collect();
    if threads > 0 {
        // Each thread on its own keys (key i goes to thread i % threads): admissions per
        // second over all threads, the median of ROUNDS bursts.
        let barrier = std::sync::Barrier::new(threads);
        let mut rates = Vec::new();
        for _ in 0..rounds() {
            let started = Instant::now();
            std::thread::scope(|scope| {
                for thread in 0..threads {
                    let engine = separate.get(thread).unwrap_or(&engine);
                    let (keys, barrier, q) = (&keys, &barrier, &q);
                    scope.spawn(move || {
                        let mine: Vec<&String> =
                            keys.iter().skip(thread).step_by(threads).collect();
                        barrier.wait();
                        for step in 0..BURST {
                            let key = mine[step % mine.len()];
                            let request =
                                UsageRequest::new(key, "chat", q).at(t0 + step as u64 / 64);
                            let admitted =
                                matches!(engine.consume(&request), Ok(d) if d.is_admitted());
                            std::hint::black_box(admitted);
                        }
                    });
                }
            });
            rates.push((threads * BURST) as f64 / started.elapsed().as_secs_f64() / 1e6);
        }
        println!(
            "keys={n_keys} threads={threads}{}: {:.2} M admissions/s",
            if separate.is_empty() {
                ""
            } else {
                " (an engine each)"
            },
            median(rates)
        );
        return;
    }
    let mut step = 0u64;
    let (mut tally_ns, mut governor_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut into_ns, mut into_ratios) = (Vec::new(), Vec::new());
    let mut decision = Decision::denied(DenialReason::UnknownKey);
    for _ in 0..rounds() {
        let started = Instant::now();
        for _ in 0..BURST {
            let position = (step as usize) & (SEQUENCE - 1);
            let admitted = governor.check_key(&governor_sequence[position]).is_ok();
            std::hint::black_box(admitted);
            step += 1;
        }
        let governor_burst = started.elapsed().as_nanos() as f64 / BURST as f64;
        let started = Instant::now();
        for _ in 0..BURST {
            let position = (step as usize) & (SEQUENCE - 1);
            let key = &sequence[position * width..(position + 1) * width];
            let request = UsageRequest::new(key, "chat", &q).at(t0 + step / 64);
            let admitted = matches!(engine.consume(&request), Ok(d) if d.is_admitted());
            debug_assert!(admitted);
            std::hint::black_box(admitted);
            step += 1;
        }
        let tally_burst = started.elapsed().as_nanos() as f64 / BURST as f64;
        // The same through `consume_into`, the decision written into one reused value.
        let started = Instant::now();
        for _ in 0..BURST {
            let position = (step as usize) & (SEQUENCE - 1);
            let key = &sequence[position * width..(position + 1) * width];
            let request = UsageRequest::new(key, "chat", &q).at(t0 + step / 64);
            let admitted =
                engine.consume_into(&request, &mut decision).is_ok() && decision.is_admitted();
            debug_assert!(admitted);
            std::hint::black_box(admitted);
            step += 1;
        }
        let into_burst = started.elapsed().as_nanos() as f64 / BURST as f64;
        into_ns.push(into_burst);
        into_ratios.push(into_burst / governor_burst);
        tally_ns.push(tally_burst);
        governor_ns.push(governor_burst);
        ratios.push(tally_burst / governor_burst);
    }
    println!(
        "keys={n_keys} governor {:.1} ns, tally {:.1} ns, ratio {:.2}x; consume_into {:.1} ns, \
         ratio {:.2}x (medians of {} bursts of each)",
        median(governor_ns),
        median(tally_ns),
        median(ratios),
        median(into_ns),
        median(into_ratios),
        rounds()
    );
}
