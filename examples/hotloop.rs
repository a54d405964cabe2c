use std::sync::Arc;
use std::time::Instant;
use tally_engine::*;
const POLICY: &str = r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.P]
limits = [
 { resource = "chat", unit = "requests", amount = 4000000000, window = "rolling:5h" },
 { resource = "chat", unit = "requests", amount = 100000000000000, window = "daily" },
 { resource = "chat", unit = "requests", amount = 200000000000000, window = "weekly" },
]
"#;
fn main() {
    let t0 = 1_790_000_000_000u64;
    let e = Engine::new(
        Policy::from_toml_str(POLICY).unwrap(),
        Arc::new(ManualClock::new(t0)),
        EngineOptions::default(),
    );
    let n_keys = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1usize);
    let keys: Vec<String> = (0..n_keys).map(|i| format!("key-{i:08}")).collect();
    for (i, k) in keys.iter().enumerate() {
        let u = format!("u{i}");
        e.create_user(&u, k, None).unwrap();
        e.assign_seat(&format!("@{u}"), &u, "P", None).unwrap();
    }
    let q = [(Unit::Requests, 1)];
    let mut x = 88172645463325252u64;
    let iters = 3_000_000u64;
    let mut best = f64::MAX;
    for _round in 0..5 {
        let start = Instant::now();
        for i in 0..iters {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = &keys[(x % n_keys as u64) as usize];
            let d = e
                .consume(&UsageRequest::new(k, "chat", &q).at(t0 + i / 64))
                .unwrap();
            debug_assert!(d.is_admitted());
            std::hint::black_box(d);
        }
        let ns = start.elapsed().as_nanos() as f64 / iters as f64;
        best = best.min(ns);
    }
    println!("keys={n_keys} best {best:.1} ns/consume");
}
