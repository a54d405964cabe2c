//! Admission benchmark: tally's check-and-consume beside the `governor` crate's keyed limiter,
//! in the same run so the ratios compare figures taken on the same noisy machine.
//!
//! `cargo bench --bench admission` runs, in order:
//! - a memory report (not a criterion timing): heap bytes per Plus key with usage in every
//!   limit, per key with no usage, and what a `check` or an aged-out window leaves behind;
//! - `hot_key`: one key; governor's `check_key` against tally's `consume`, `consume_into`
//!   (the decision written into the caller's) and `check` on a plan with three limits that
//!   all apply to the request;
//! - `million_keys`: keys drawn uniformly at random from 1,000,000, governor against tally;
//!   then the memory each side's keys hold, and what one dependent cache miss costs over that
//!   much memory (a pointer chase, not a criterion timing): the ratio a lookup that waits for
//!   its misses one after another cannot get under;
//! - `two_threads`: wall time per admission with two threads on disjoint keys;
//! - a summary: criterion's medians read back from this run's `estimates.json`, and the ratios
//!   against the targets of the admission issue.
//!
//! `cargo bench --bench admission -- --test` (CI) runs each benchmark once on small fixtures.
//!
//! Governor's keys are `u64` (its `DefaultKeyedRateLimiter`: a DashMap with the standard
//! library's SipHash). tally's keys are the strings an API key really is (`tp-0000042`).
//! Governor reads its quanta clock on every check; tally is given explicit timestamps, except in
//! `hot_key/tally_consume_system_clock`, which reads the engine's `SystemClock` instead.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, OnceCell, RefCell};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tally_engine::pages::usage_pages_stats;
use tally_engine::{
    Decision, DenialReason, Engine, EngineOptions, ManualClock, Policy, SystemClock, Unit,
    UsageRequest,
};

// ---------------------------------------------------------------------------------------------
// Heap accounting.

/// Counts live heap bytes and allocation calls. The memory figures are then exact heap bytes
/// (the resident set, page-granular and including malloc's slack, is printed beside them), and
/// the summary can show that an admission allocates nothing. The admission loops allocate
/// nothing, so the two counters are never touched while a benchmark is timed.
struct CountingAllocator;

// Relaxed: statistics, read only after the work they count has finished on this thread.
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; the wrapper only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` came from this allocator, i.e. from `System`, with this layout.
        unsafe { System.dealloc(pointer, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s size contract.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn allocations() -> usize {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// The resident set in bytes, from /proc (0 where there is no /proc).
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map_or(0, |kibibytes| kibibytes * 1024)
}

/// Bytes per key between two readings (signed: a phase may free more than it allocates).
fn per_key(before: usize, after: usize, keys: usize) -> f64 {
    (after as f64 - before as f64) / keys as f64
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// One resource with three limits that every request moves: a 5-hour rolling window at the
/// largest rolling amount (a bucket counts up to u32::MAX) and daily and weekly windows far
/// above anything a run can use, so every timed admission takes the admit path.
const BENCH_POLICY: &str = r#"
time_zone = "Asia/Shanghai"

[resources.chat]
units = ["requests", "tokens"]
price_micros = { requests = 2000, tokens = 1 }

[plans.Bench]
limits = [
  { resource = "chat", unit = "requests", amount = 4000000000, window = "rolling:5h" },
  { resource = "chat", unit = "requests", amount = 100000000000000, window = "daily" },
  { resource = "chat", unit = "requests", amount = 200000000000000, window = "weekly" },
]

# The same limits with the rolling window used up at once (beyond_the_plan).
[plans.Spent]
limits = [
  { resource = "chat", unit = "requests", amount = 100, window = "rolling:5h" },
  { resource = "chat", unit = "requests", amount = 100000000000000, window = "daily" },
  { resource = "chat", unit = "requests", amount = 200000000000000, window = "weekly" },
]
"#;
const BENCH_PLAN: &str = "Bench";
const SPENT_PLAN: &str = "Spent";
const BENCH_RESOURCE: &str = "chat";
const ONE_REQUEST: &[(Unit, u64)] = &[(Unit::Requests, 1)];

/// 2026-09-21T13:33:20Z: any fixed time well inside tally's range (it ends in 2100).
const START_MS: u64 = 1_790_000_000_000;
/// Simulated time moves 1 ms every 64 admissions: a hot key at 64,000 requests per second. A
/// 5-hour window of 225 buckets (80 s each) then crosses a bucket boundary every 5.12 million
/// admissions of one key, so the timed loops include windows rolling over (rarely, as in production) and the
/// timestamps never go backwards.
const ADMISSIONS_PER_MS: u64 = 64;

fn at_ms(step: u64) -> u64 {
    START_MS + step / ADMISSIONS_PER_MS
}

/// Governor's quota: one cell per nanosecond with a burst of a billion. A check takes tens of
/// nanoseconds, so the quota never runs out and governor, like tally, stays on its admit path.
fn governor_quota() -> Quota {
    Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap_or(NonZeroU32::MIN))
}

fn bench_engine(clock_start_ms: Option<u64>) -> Engine {
    let policy = match Policy::from_toml_str(BENCH_POLICY) {
        Ok(policy) => policy,
        Err(error) => panic!("the bench policy is invalid: {error}"),
    };
    let options = EngineOptions {
        max_keys: 4_000_000,
        // Stamps run ahead of a clock that stands still (as a replay's do): no bound ahead of
        // it. The check against the bound is the same compare either way.
        max_ahead_of_clock_ms: 0,
        ..EngineOptions::default()
    };
    match clock_start_ms {
        Some(start_ms) => Engine::new(policy, Arc::new(ManualClock::new(start_ms)), options)
            .expect("valid options"),
        None => Engine::new(policy, Arc::new(SystemClock), options).expect("valid options"),
    }
}

fn key_name(index: usize) -> String {
    format!("tp-{index:07}")
}

/// Creates user `u{index}` with key `key_name(index)`, seated on `plan` in their Default Team.
fn add_seated_key(engine: &Engine, index: usize, plan: &str) -> String {
    let user = format!("u{index}");
    let key = key_name(index);
    let created = engine
        .create_user(&user, &key, Some(START_MS))
        .and_then(|()| engine.assign_seat(&format!("@{user}"), &user, plan, Some(START_MS)));
    if let Err(error) = created {
        panic!("cannot create {key}: {error}");
    }
    key
}

/// The sequence of timed requests: a step counter that survives criterion's samples (time
/// must not go backwards between them) and a count of denials, which must stay zero.
#[derive(Default)]
struct Stream {
    step: Cell<u64>,
    denied: Cell<u64>,
}

impl Stream {
    fn next(&self) -> u64 {
        let step = self.step.get();
        self.step.set(step + 1);
        step
    }

    fn count(&self, admitted: bool) -> bool {
        self.denied.set(self.denied.get() + u64::from(!admitted));
        admitted
    }

    fn assert_never_denied(&self, what: &str) {
        assert_eq!(
            self.denied.get(),
            0,
            "{what}: a timed admission was denied, so the figure would mix in the deny path"
        );
    }
}

fn tally_admitted(result: Result<tally_engine::Decision, tally_engine::Error>) -> bool {
    matches!(result, Ok(decision) if decision.is_admitted())
}

/// Cheap xorshift64: the random key order is generated before timing starts.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Fixture sizes: the issue's sizes, or small ones for `--test`, which only checks that each
/// benchmark runs.
#[derive(Clone, Copy)]
struct Sizes {
    memory_keys: usize,
    million_keys: usize,
    random_sequence: usize,
    keys_per_thread: usize,
    /// Rounds of alternating bursts for the paired ratios, and admissions per burst.
    paired_rounds: usize,
    hot_burst: usize,
    million_burst: usize,
}

const FULL: Sizes = Sizes {
    memory_keys: 100_000,
    million_keys: 1_000_000,
    random_sequence: 1 << 20,
    keys_per_thread: 1 << 10,
    paired_rounds: 21,
    hot_burst: 100_000,
    million_burst: 20_000,
};
const QUICK: Sizes = Sizes {
    memory_keys: 2_000,
    million_keys: 10_000,
    random_sequence: 1 << 12,
    keys_per_thread: 1 << 4,
    paired_rounds: 3,
    hot_burst: 100,
    million_burst: 100,
};

/// Lines for the closing summary, gathered as the run goes.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
    memory_active_bytes: Option<f64>,
    memory_idle_bytes: Option<f64>,
    hot_paired: Option<Paired>,
    /// `consume_into` against governor, in bursts of its own alternating with governor's.
    hot_into_paired: Option<Paired>,
    million_paired: Option<Paired>,
    memory_reach: Option<MemoryReach>,
}

/// Medians of alternating bursts: governor's and tally's time per admission, and their ratio.
#[derive(Clone, Copy)]
struct Paired {
    governor_ns: f64,
    tally_ns: f64,
    ratio: f64,
}

/// Alternates a burst of governor admissions with a burst of tally admissions, `rounds` times,
/// and keeps the medians. The machine is shared: criterion times one benchmark after another,
/// so a neighbour's build starting between them skews the ratio of the two medians, while here
/// it lands on both halves of a round alike.
fn paired(
    rounds: usize,
    burst: usize,
    governor: impl Fn() -> bool,
    tally: impl Fn() -> bool,
) -> Paired {
    let burst_ns = |admit: &dyn Fn() -> bool| {
        let started = Instant::now();
        for _ in 0..burst {
            black_box(admit());
        }
        started.elapsed().as_nanos() as f64 / burst as f64
    };
    let (mut governor_ns, mut tally_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (governor_burst, tally_burst) = (burst_ns(&governor), burst_ns(&tally));
        governor_ns.push(governor_burst);
        tally_ns.push(tally_burst);
        ratios.push(tally_burst / governor_burst);
    }
    Paired {
        governor_ns: median(governor_ns),
        tally_ns: median(tally_ns),
        ratio: median(ratios),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Report {
    fn note(&mut self, line: String) {
        println!("{line}");
        self.lines.push(line);
    }
}

// ---------------------------------------------------------------------------------------------
// Memory (not timed).

/// Heap per key on the default policy's Plus plan (default bucket width): `count` keys with a
/// request on every Plus limit, `count` seated keys with none, then what a `check` allocates on
/// a key with no usage and what stays once every window has aged out.
fn memory_report(report: &mut Report, count: usize) {
    let engine = Engine::new(
        Policy::token_plan(),
        Arc::new(ManualClock::new(START_MS)),
        // Stamped up to 8 days ahead of a clock that stands still: no bound ahead of it.
        EngineOptions {
            max_ahead_of_clock_ms: 0,
            ..EngineOptions::default()
        },
    )
    .expect("valid options");
    let resident_empty = resident_bytes();
    let keys: Vec<String> = (0..2 * count).map(key_name).collect();
    let (heap_names, resident_names) = (live_bytes(), resident_bytes());
    for (index, key) in keys.iter().enumerate() {
        let user = format!("u{index}");
        if let Err(error) = engine.create_user(&user, key, Some(START_MS)) {
            panic!("memory: cannot create {key}: {error}");
        }
    }
    let (heap_users, resident_users) = (live_bytes(), resident_bytes());
    for index in 0..keys.len() {
        let user = format!("u{index}");
        if let Err(error) = engine.assign_seat(&format!("@{user}"), &user, "Plus", Some(START_MS)) {
            panic!("memory: cannot seat {user}: {error}");
        }
    }
    let (heap_seated, resident_seated) = (live_bytes(), resident_bytes());
    let (active, idle) = keys.split_at(count);
    for key in active {
        use_every_plus_limit(&engine, key);
    }
    let (heap_used, resident_used) = (live_bytes(), resident_bytes());

    // The engine's own figures first (what an operator sees), then the heap as this bench's
    // allocator counted it, which also covers what the engine's accounting might miss.
    let stats = engine.memory_stats();
    let engine_windows = stats.usage_bytes as f64 / stats.keys_with_usage.max(1) as f64;
    let idle_keys = stats.keys - stats.keys_with_usage;
    let account = per_key(heap_names, heap_users, keys.len());
    let idle_windows = per_key(heap_users, heap_seated, keys.len());
    let windows = per_key(heap_seated, heap_used, count);
    report.memory_active_bytes = Some(engine_windows.max(windows));
    report.memory_idle_bytes = Some(idle_windows);
    report.note(format!(
        "memory: plus key with usage = {engine_windows:.0} bytes/key (Engine::memory_stats: \
         {} keys with usage, {idle_keys} without); idle key = {idle_windows:.0} bytes/key \
         [{count} keys of each]",
        stats.keys_with_usage,
    ));
    report.note(format!(
        "memory cross-check (heap counted by the bench's allocator): windows {windows:.0} B per \
         key with usage; a seat on a key with no usage {idle_windows:.0} B; the account itself \
         (key, user, Default Team) {account:.0} B; key table {:.0} B per key (memory_stats)",
        stats.table_bytes as f64 / stats.keys.max(1) as f64,
    ));
    report.note(format!(
        "memory cross-check (resident set, page-granular, includes malloc's slack): windows \
         {:.0} B/key, seat {:.0} B/key, account {:.0} B/key; the engine itself {:.1} MiB \
         before any key",
        per_key(resident_seated, resident_used, count),
        per_key(resident_users, resident_seated, keys.len()),
        per_key(resident_names, resident_users, keys.len()),
        resident_empty as f64 / (1 << 20) as f64,
    ));
    memory_of_request_ids(report, &engine, active);
    memory_after_check_and_expiry(report, &engine, active, idle);
}

/// What a remembered request id takes, and what a `consume` under one costs: two requests
/// under new ids on every key with usage (ids of a UUID's length, as gateways send), then the
/// same again (repeats, answered with the first decision and counting nothing). Each pass
/// timed once, as a figure to read, not a target.
fn memory_of_request_ids(report: &mut Report, engine: &Engine, keys: &[String]) {
    let id = |call: usize| format!("{:08x}-0000-4000-8000-{call:012x}", call % 65_521);
    let ids = 2 * keys.len();
    let pass = |repeat: bool| {
        let started = Instant::now();
        for call in 0..ids {
            let id = id(call);
            let request = UsageRequest::new(&keys[call % keys.len()], "m2.7", ONE_REQUEST)
                .at(START_MS)
                .id(&id);
            match engine.consume_noting_replay(&request) {
                Ok((decision, replayed)) if tally_admitted(Ok(decision)) && replayed == repeat => {}
                other => panic!("memory: request id {id} (repeat: {repeat}): {other:?}"),
            }
        }
        started.elapsed().as_secs_f64() * 1e9 / ids as f64
    };
    let (heap_before, resident_before) = (live_bytes(), resident_bytes());
    let first_ns = pass(false);
    let (heap_after, resident_after) = (live_bytes(), resident_bytes());
    let repeat_ns = pass(true);
    report.note(format!(
        "memory: a remembered request id = {:.0} bytes/id (heap counted; resident {:.0} \
         B/id) [{ids} ids]; a consume under a new id took {first_ns:.0} ns, under a repeated \
         one {repeat_ns:.0} ns (one pass each, with the ids' formatting)",
        per_key(heap_before, heap_after, ids),
        per_key(resident_before, resident_after, ids),
    ));
}

/// One request on each Plus limit: m2.7 requests, speech characters, an image, a song.
fn use_every_plus_limit(engine: &Engine, key: &str) {
    let requests: [(&str, &[(Unit, u64)]); 4] = [
        ("m2.7", &[(Unit::Requests, 1)]),
        ("speech-2.8", &[(Unit::Characters, 100)]),
        ("image-01", &[(Unit::Images, 1)]),
        ("music-2.6", &[(Unit::Songs, 1), (Unit::Seconds, 200)]),
    ];
    for (resource, quantities) in requests {
        let request = UsageRequest::new(key, resource, quantities).at(START_MS);
        assert!(
            tally_admitted(engine.consume(&request)),
            "memory: {resource} on {key} was not admitted"
        );
    }
}

/// Whether keys with no usage stay free of window memory after a `check`, and whether keys
/// whose every window has aged out give their memory back through `Engine::reclaim_idle`.
fn memory_after_check_and_expiry(
    report: &mut Report,
    engine: &Engine,
    active: &[String],
    idle: &[String],
) {
    let before_check = live_bytes();
    for key in idle {
        let request = UsageRequest::new(key, "m2.7", ONE_REQUEST).at(START_MS);
        black_box(engine.check(&request).ok());
    }
    let check_bytes = per_key(before_check, live_bytes(), idle.len());
    // Eight days on, every Plus window (5 hours rolling, daily) is empty.
    let later_ms = START_MS + 8 * 24 * 3_600_000;
    let before_reclaim = live_bytes();
    let free_before = usage_pages_stats().free_bytes;
    let started = Instant::now();
    let reclaimed = match engine.reclaim_idle(Some(later_ms)) {
        Ok(reclaimed) => reclaimed,
        Err(error) => panic!("memory: reclaim_idle failed: {error}"),
    };
    let round = started.elapsed();
    let reclaim_bytes = per_key(before_reclaim, live_bytes(), active.len());
    // Usage blocks go back to the usage pages' free lists (for the next keys), not to the
    // global allocator: count both.
    let to_pages = per_key(free_before, usage_pages_stats().free_bytes, active.len());
    report.note(format!(
        "memory: a check on a key with no usage allocates {check_bytes:.0} bytes/key; 8 days \
         later reclaim_idle freed {reclaimed} of {} used keys, {:.0} bytes/key to the heap and \
         {to_pages:.0} bytes/key to the usage pages' free lists, leaving {} keys with usage",
        active.len(),
        -reclaim_bytes,
        engine.memory_stats().keys_with_usage,
    ));
    let keys = engine.memory_stats().keys;
    report.note(format!(
        "memory: that reclaim_idle round over {keys} keys took {:.1} ms, {:.0} us per 512 \
         keys: about how long a step of the automatic reclaim holds one shard's write lock",
        round.as_secs_f64() * 1e3,
        round.as_secs_f64() * 1e6 * 512.0 / keys.max(1) as f64,
    ));
}

// ---------------------------------------------------------------------------------------------
// hot_key

/// One admission of each kind on the hot key; each continues its own stream of timestamps.
struct HotKey {
    governor: DefaultKeyedRateLimiter<u64>,
    engine: Engine,
    key: String,
    clock_key: String,
    governor_stream: Stream,
    consume_stream: Stream,
    check_stream: Stream,
    clock_stream: Stream,
    /// The decision `consume_into` writes into, reused call after call.
    decision: RefCell<Decision>,
}

/// Governor's key for the hot-key case.
const HOT_GOVERNOR_KEY: u64 = 42;

impl HotKey {
    fn new() -> HotKey {
        // SystemClock for the one variant that asks the engine for the time; every other
        // request passes its own timestamp, so the clock is never read there.
        let engine = bench_engine(None);
        let key = add_seated_key(&engine, 0, BENCH_PLAN);
        let clock_key = add_seated_key(&engine, 1, BENCH_PLAN);
        HotKey {
            governor: RateLimiter::keyed(governor_quota()),
            engine,
            key,
            clock_key,
            governor_stream: Stream::default(),
            consume_stream: Stream::default(),
            check_stream: Stream::default(),
            clock_stream: Stream::default(),
            decision: RefCell::new(Decision::denied(DenialReason::UnknownKey)),
        }
    }

    fn governor_check(&self) -> bool {
        // The step is unused (governor reads its own clock) but counts the admissions alike.
        self.governor_stream.next();
        let admitted = self
            .governor
            .check_key(black_box(&HOT_GOVERNOR_KEY))
            .is_ok();
        self.governor_stream.count(admitted)
    }

    fn tally_consume(&self) -> bool {
        let step = self.consume_stream.next();
        let request = UsageRequest::new(black_box(&self.key), BENCH_RESOURCE, ONE_REQUEST);
        let admitted = tally_admitted(self.engine.consume(&request.at(at_ms(step))));
        self.consume_stream.count(admitted)
    }

    /// `consume` writing into a reused decision instead of returning one; it continues the
    /// consume stream (same key, same clock).
    fn tally_consume_into(&self) -> bool {
        let step = self.consume_stream.next();
        let request = UsageRequest::new(black_box(&self.key), BENCH_RESOURCE, ONE_REQUEST);
        let decision = &mut *self.decision.borrow_mut();
        let decided = self.engine.consume_into(&request.at(at_ms(step)), decision);
        self.consume_stream
            .count(decided.is_ok() && decision.is_admitted())
    }

    /// Shares the consume stream's clock: the windows it reads are full of real usage, and
    /// since a check also moves a window's head, a consume after it never goes back in time.
    fn tally_check(&self) -> bool {
        let step = self.consume_stream.next();
        let request = UsageRequest::new(black_box(&self.key), BENCH_RESOURCE, ONE_REQUEST);
        let admitted = tally_admitted(self.engine.check(&request.at(at_ms(step))));
        self.check_stream.count(admitted)
    }

    fn tally_consume_system_clock(&self) -> bool {
        let request = UsageRequest::new(black_box(&self.clock_key), BENCH_RESOURCE, ONE_REQUEST);
        let admitted = tally_admitted(self.engine.consume(&request));
        self.clock_stream.count(admitted)
    }

    fn assert_never_denied(&self) {
        self.governor_stream
            .assert_never_denied("hot_key/governor_check_key");
        self.consume_stream
            .assert_never_denied("hot_key/tally_consume");
        self.check_stream.assert_never_denied("hot_key/tally_check");
        self.clock_stream
            .assert_never_denied("hot_key/tally_consume_system_clock");
    }
}

fn bench_hot_key(criterion: &mut Criterion, sizes: Sizes, report: &mut Report) {
    let hot = HotKey::new();
    let mut group = criterion.benchmark_group("hot_key");
    group.throughput(Throughput::Elements(1));
    group.bench_function("governor_check_key", |bencher| {
        bencher.iter(|| hot.governor_check())
    });
    group.bench_function("tally_consume", |bencher| {
        bencher.iter(|| hot.tally_consume())
    });
    group.bench_function("tally_consume_into", |bencher| {
        bencher.iter(|| hot.tally_consume_into())
    });
    group.bench_function("tally_check", |bencher| bencher.iter(|| hot.tally_check()));
    group.bench_function("tally_consume_system_clock", |bencher| {
        bencher.iter(|| hot.tally_consume_system_clock())
    });
    group.finish();
    // Only when both sides ran (a filter may have skipped them).
    if hot.governor_stream.step.get() > 0 && hot.consume_stream.step.get() > 0 {
        report.hot_paired = Some(paired(
            sizes.paired_rounds,
            sizes.hot_burst,
            || hot.governor_check(),
            || hot.tally_consume(),
        ));
        report.hot_into_paired = Some(paired(
            sizes.paired_rounds,
            sizes.hot_burst,
            || hot.governor_check(),
            || hot.tally_consume_into(),
        ));
    }
    hot.assert_never_denied();
}

// ---------------------------------------------------------------------------------------------
// beyond_the_plan

/// Two keys whose 5-hour window their first 100 requests filled (in its newest bucket): one
/// whose team's credits pay for every later request, one whose team has none, so every later
/// request is refused with the time it would fit. Both report every limit's status.
struct BeyondThePlan {
    engine: Engine,
    paying: String,
    refused: String,
    paying_stream: Stream,
    refused_stream: Stream,
    decision: RefCell<Decision>,
}

impl BeyondThePlan {
    fn new() -> BeyondThePlan {
        let engine = bench_engine(Some(START_MS));
        let paying = add_seated_key(&engine, 0, SPENT_PLAN);
        let refused = add_seated_key(&engine, 1, SPENT_PLAN);
        if let Err(error) = engine.top_up("@u0", u64::MAX / 2, Some(START_MS)) {
            panic!("cannot top up: {error}");
        }
        for key in [&paying, &refused] {
            let request = UsageRequest::new(key, BENCH_RESOURCE, &[(Unit::Requests, 100)]);
            assert!(
                tally_admitted(engine.consume(&request.at(START_MS))),
                "the first 100 fit the plan"
            );
        }
        BeyondThePlan {
            engine,
            paying,
            refused,
            paying_stream: Stream::default(),
            refused_stream: Stream::default(),
            decision: RefCell::new(Decision::denied(DenialReason::UnknownKey)),
        }
    }

    /// Admitted and charged to credits (counted as admitted).
    fn credits(&self) -> bool {
        let step = self.paying_stream.next();
        let request = UsageRequest::new(black_box(&self.paying), BENCH_RESOURCE, ONE_REQUEST);
        let decision = &mut *self.decision.borrow_mut();
        let decided = self.engine.consume_into(&request.at(at_ms(step)), decision);
        let charged = matches!(
            decision,
            Decision::Admitted(admission)
                if matches!(admission.charged_to, tally_engine::ChargedTo::Credits { .. })
        );
        self.paying_stream.count(decided.is_ok() && charged)
    }

    /// Refused as quota exhausted (counted as "admitted" when it is that denial, so the
    /// stream's never-denied check holds it to the path it measures).
    fn refusal(&self) -> bool {
        let step = self.refused_stream.next();
        let request = UsageRequest::new(black_box(&self.refused), BENCH_RESOURCE, ONE_REQUEST);
        let decision = &mut *self.decision.borrow_mut();
        let decided = self.engine.consume_into(&request.at(at_ms(step)), decision);
        let refused = matches!(
            decision,
            Decision::Denied(denial) if matches!(denial.reason, DenialReason::QuotaExhausted { .. })
        );
        self.refused_stream.count(decided.is_ok() && refused)
    }
}

fn bench_beyond_the_plan(criterion: &mut Criterion) {
    let beyond = BeyondThePlan::new();
    let mut group = criterion.benchmark_group("beyond_the_plan");
    group.throughput(Throughput::Elements(1));
    group.bench_function("tally_consume_into_charged_to_credits", |bencher| {
        bencher.iter(|| beyond.credits())
    });
    group.bench_function("tally_consume_into_refused", |bencher| {
        bencher.iter(|| beyond.refusal())
    });
    group.finish();
    beyond
        .paying_stream
        .assert_never_denied("beyond_the_plan/charged_to_credits");
    beyond
        .refused_stream
        .assert_never_denied("beyond_the_plan/refused (a decision other than quota exhausted)");
}

// ---------------------------------------------------------------------------------------------
// million_keys

/// Both limiters with every key already holding state, and one random key order. tally's keys
/// are laid out in request order in one string (fixed width, sliced by position) and governor's
/// in a `Vec<u64>`, so each side reads its next key sequentially and the random-access cost
/// measured is the limiter's own.
struct MillionKeys {
    engine: Engine,
    governor: DefaultKeyedRateLimiter<u64>,
    /// How long building took, for the summary.
    setup_note: String,
    tally_sequence: String,
    governor_sequence: Vec<u64>,
    key_width: usize,
    /// Resident bytes each limiter's keys added while it was built (the memory its admissions
    /// reach into at random).
    tally_resident: usize,
    governor_resident: usize,
}

impl MillionKeys {
    fn build(sizes: Sizes) -> MillionKeys {
        let count = sizes.million_keys;
        let engine = bench_engine(Some(START_MS));
        let resident_before_tally = resident_bytes();
        let started = Instant::now();
        for index in 0..count {
            add_seated_key(&engine, index, BENCH_PLAN);
        }
        let created = started.elapsed();
        // One admission per key before timing, so the timed loop sees steady state (every key
        // with its windows allocated) rather than first-touch allocation.
        let started = Instant::now();
        for index in 0..count {
            let key = key_name(index);
            let request = UsageRequest::new(&key, BENCH_RESOURCE, ONE_REQUEST).at(START_MS);
            assert!(tally_admitted(engine.consume(&request)));
        }
        let first_touch = started.elapsed();
        let resident_before_governor = resident_bytes();
        let tally_resident = resident_before_governor.saturating_sub(resident_before_tally);
        let governor: DefaultKeyedRateLimiter<u64> = RateLimiter::keyed(governor_quota());
        let started = Instant::now();
        for index in 0..count as u64 {
            assert!(governor.check_key(&index).is_ok());
        }
        let governor_setup = started.elapsed();
        let governor_resident = resident_bytes().saturating_sub(resident_before_governor);
        let setup_note = format!(
            "million_keys setup: {count} tally users with a seat in {:.2} s ({:.2} µs/key), first \
             admission on each in {:.2} s; governor first check on each in {:.2} s",
            created.as_secs_f64(),
            created.as_secs_f64() * 1e6 / count as f64,
            first_touch.as_secs_f64(),
            governor_setup.as_secs_f64(),
        );
        println!("{setup_note}");
        let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
        let order: Vec<usize> = (0..sizes.random_sequence)
            .map(|_| (random.next() % count as u64) as usize)
            .collect();
        let key_width = key_name(0).len();
        let tally_sequence: String = order.iter().map(|&index| key_name(index)).collect();
        assert_eq!(
            tally_sequence.len(),
            key_width * order.len(),
            "keys are fixed width"
        );
        MillionKeys {
            engine,
            governor,
            setup_note,
            tally_sequence,
            governor_sequence: order.iter().map(|&index| index as u64).collect(),
            key_width,
            tally_resident,
            governor_resident,
        }
    }

    fn governor_check(&self, stream: &Stream) -> bool {
        let key = self.governor_key(stream.next());
        stream.count(self.governor.check_key(key).is_ok())
    }

    fn tally_consume(&self, stream: &Stream) -> bool {
        let step = stream.next();
        let request = UsageRequest::new(self.tally_key(step), BENCH_RESOURCE, ONE_REQUEST);
        stream.count(tally_admitted(
            self.engine.consume(&request.at(at_ms(step))),
        ))
    }

    fn tally_key(&self, step: u64) -> &str {
        let position = step as usize % self.governor_sequence.len();
        &self.tally_sequence[position * self.key_width..(position + 1) * self.key_width]
    }

    fn governor_key(&self, step: u64) -> &u64 {
        &self.governor_sequence[step as usize % self.governor_sequence.len()]
    }
}

fn bench_million_keys(criterion: &mut Criterion, sizes: Sizes, report: &mut Report) {
    let mut group = criterion.benchmark_group("million_keys");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(4));
    // Built on first use, so a filter that skips this group skips its setup too.
    let fixture: OnceCell<MillionKeys> = OnceCell::new();
    let governor_stream = Stream::default();
    group.bench_function("governor_check_key", |bencher| {
        let fixture = fixture.get_or_init(|| MillionKeys::build(sizes));
        bencher.iter(|| fixture.governor_check(&governor_stream))
    });
    let tally_stream = Stream::default();
    group.bench_function("tally_consume", |bencher| {
        let fixture = fixture.get_or_init(|| MillionKeys::build(sizes));
        bencher.iter(|| fixture.tally_consume(&tally_stream))
    });
    group.finish();
    if let Some(fixture) = fixture.get() {
        report.million_paired = Some(paired(
            sizes.paired_rounds,
            sizes.million_burst,
            || fixture.governor_check(&governor_stream),
            || fixture.tally_consume(&tally_stream),
        ));
    }
    governor_stream.assert_never_denied("million_keys/governor_check_key");
    tally_stream.assert_never_denied("million_keys/tally_consume");
    if let Some(fixture) = fixture.get() {
        report.memory_reach = Some(memory_reach(fixture, sizes));
    }
    if let Some(fixture) = fixture.into_inner() {
        report.lines.push(fixture.setup_note.clone());
        // Freeing a million keys' state takes a moment; say so rather than look stuck.
        let started = Instant::now();
        drop(fixture);
        println!(
            "million_keys: fixture freed in {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// What one cache miss costs at each limiter's footprint

/// The memory each limiter's million keys hold, and what a load that depends on the one before
/// costs over that much memory: at a million keys both limiters' admissions are a couple of
/// such loads in a row (a table's slot, then what it holds), so the ratio of the two latencies
/// is about what the ratio of the two limiters can come down to on this machine.
#[derive(Clone, Copy)]
struct MemoryReach {
    keys: usize,
    governor_bytes: usize,
    tally_bytes: usize,
    governor_load_ns: f64,
    tally_load_ns: f64,
}

/// Dependent loads timed per region (median of three passes of this many).
const PROBE_LOADS: usize = 2_000_000;

fn memory_reach(fixture: &MillionKeys, sizes: Sizes) -> MemoryReach {
    let loads = if sizes.million_keys < FULL.million_keys {
        PROBE_LOADS / 100
    } else {
        PROBE_LOADS
    };
    let keys = sizes.million_keys;
    // governor's tables come from malloc (4 KiB pages); tally's key tables and usage sit on
    // 2 MiB pages (`tally_engine::pages`).
    let reach = MemoryReach {
        keys,
        governor_bytes: fixture.governor_resident,
        tally_bytes: fixture.tally_resident,
        governor_load_ns: dependent_load_ns(fixture.governor_resident, false, loads),
        tally_load_ns: dependent_load_ns(fixture.tally_resident, true, loads),
    };
    println!(
        "million_keys memory reach: governor's keys {:.0} MiB resident, one dependent load over \
         as much memory (4 KiB pages) {:.1} ns; tally's keys {:.0} MiB, a load over as much \
         (2 MiB pages) {:.1} ns",
        reach.governor_bytes as f64 / f64::from(1 << 20),
        reach.governor_load_ns,
        reach.tally_bytes as f64 / f64::from(1 << 20),
        reach.tally_load_ns,
    );
    reach
}

/// One 64-byte cache line of the probe's region; its first word is the index of the next.
#[repr(C, align(64))]
struct ProbeLine([u32; 16]);

/// Nanoseconds per load when each load's address comes from the one before: a chase through
/// one random cycle over every cache line of `bytes` of fresh memory, on 2 MiB pages
/// (`MADV_HUGEPAGE`) or 4 KiB ones (`MADV_NOHUGEPAGE`). The median of three passes of `loads`.
fn dependent_load_ns(bytes: usize, huge_pages: bool, loads: usize) -> f64 {
    const HUGE_PAGE: usize = 2 << 20;
    let lines = (bytes / std::mem::size_of::<ProbeLine>()).clamp(2, u32::MAX as usize);
    let length = lines * std::mem::size_of::<ProbeLine>();
    // SAFETY: a fresh anonymous private mapping with no address hint; checked below.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            length + HUGE_PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(
        mapped != libc::MAP_FAILED,
        "probe: cannot map {length} bytes"
    );
    // Aligned to a huge page so the advice covers whole ones.
    let start = (mapped as usize).next_multiple_of(HUGE_PAGE) as *mut ProbeLine;
    let advice = if huge_pages {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: `start..start + length` lies inside the mapping (at most `HUGE_PAGE` was
    // skipped to align it). Advice only: a refusal changes the page size, not correctness.
    let _ = unsafe { libc::madvise(start.cast(), length, advice) };
    // SAFETY: `lines` lines from `start` are inside the mapping, zero-filled (a valid
    // `ProbeLine`), aligned to 64 bytes, and reached only through this slice until the unmap.
    let region = unsafe { std::slice::from_raw_parts_mut(start, lines) };
    // Sattolo's shuffle: a permutation that is one cycle through every line.
    let mut next: Vec<u32> = (0..lines as u32).collect();
    let mut random = XorShift(0x2545_F491_4F6C_DD1D);
    for at in (1..lines).rev() {
        next.swap(at, (random.next() % at as u64) as usize);
    }
    for (line, &to) in region.iter_mut().zip(&next) {
        line.0[0] = to;
    }
    drop(next);
    let mut at = 0u32;
    let mut passes = [0.0f64; 3];
    for pass in &mut passes {
        let started = Instant::now();
        for _ in 0..loads {
            at = region[at as usize].0[0];
        }
        *pass = started.elapsed().as_nanos() as f64 / loads as f64;
    }
    black_box(at);
    // SAFETY: the mapping made above, whole; `region` is not used after this.
    let _ = unsafe { libc::munmap(mapped, length + HUGE_PAGE) };
    passes.sort_by(f64::total_cmp);
    passes[1]
}

// ---------------------------------------------------------------------------------------------
// two_threads

/// Two threads, each on its own keys: a single key each, or 1,024 keys each cycled in order.
/// Each thread keeps its own step counter so its timestamps never go backwards.
struct TwoThreads {
    engine: Engine,
    governor: DefaultKeyedRateLimiter<u64>,
    keys: [Vec<String>; 2],
    governor_keys: [Vec<u64>; 2],
    steps: [AtomicU64; 2],
}

impl TwoThreads {
    fn build(keys_per_thread: usize) -> TwoThreads {
        let engine = bench_engine(Some(START_MS));
        let keys = [0, 1].map(|thread| {
            (0..keys_per_thread)
                .map(|index| add_seated_key(&engine, thread * keys_per_thread + index, BENCH_PLAN))
                .collect::<Vec<_>>()
        });
        let governor_keys = [0, 1].map(|thread| {
            (0..keys_per_thread as u64)
                .map(|index| (thread << 32) | index)
                .collect()
        });
        TwoThreads {
            engine,
            governor: RateLimiter::keyed(governor_quota()),
            keys,
            governor_keys,
            steps: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// `admissions` tally consumes on `thread`'s first `key_count` keys (through `consume`, or
    /// `consume_into` with one decision reused if `into`); returns the denials.
    fn tally_run(&self, thread: usize, key_count: usize, admissions: u64, into: bool) -> u64 {
        let keys = &self.keys[thread][..key_count];
        let first = self.steps[thread].load(Ordering::Relaxed);
        let mut denied = 0;
        let mut decision = Decision::denied(DenialReason::UnknownKey);
        for step in first..first + admissions {
            let key = &keys[step as usize % key_count];
            let request = UsageRequest::new(key, BENCH_RESOURCE, ONE_REQUEST).at(at_ms(step));
            let admitted = if into {
                self.engine.consume_into(&request, &mut decision).is_ok() && decision.is_admitted()
            } else {
                tally_admitted(self.engine.consume(&request))
            };
            denied += u64::from(!admitted);
        }
        self.steps[thread].store(first + admissions, Ordering::Relaxed);
        denied
    }

    fn governor_run(&self, thread: usize, key_count: usize, admissions: u64) -> u64 {
        let keys = &self.governor_keys[thread][..key_count];
        let mut denied = 0;
        for step in 0..admissions {
            let key = &keys[step as usize % key_count];
            denied += u64::from(self.governor.check_key(key).is_err());
        }
        denied
    }
}

/// Runs `admissions` split over two threads and returns the wall time from the moment both are
/// released until both are done, so criterion's time per iteration is wall time per admission
/// across both threads. Thread start-up happens before the barrier and is not counted.
fn two_thread_wall_time(admissions: u64, run: impl Fn(usize, u64) -> u64 + Sync) -> Duration {
    let barrier = Barrier::new(3);
    let shares = [admissions.div_ceil(2), admissions / 2];
    let (barrier, run) = (&barrier, &run);
    std::thread::scope(|scope| {
        let workers = [0, 1].map(|thread| {
            scope.spawn(move || {
                barrier.wait();
                run(thread, shares[thread])
            })
        });
        barrier.wait();
        let started = Instant::now();
        let denied: u64 = workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or(u64::MAX))
            .sum();
        let elapsed = started.elapsed();
        assert_eq!(denied, 0, "two_threads: a timed admission was denied");
        elapsed
    })
}

fn bench_two_threads(criterion: &mut Criterion, sizes: Sizes) {
    let mut group = criterion.benchmark_group("two_threads");
    group.throughput(Throughput::Elements(1));
    let fixture: OnceCell<TwoThreads> = OnceCell::new();
    let many = sizes.keys_per_thread;
    for (call, into) in [("consume", false), ("consume_into", true)] {
        for keys in [1, many] {
            let name = match keys {
                1 => format!("tally_{call}_1_key_each"),
                _ => format!("tally_{call}_{keys}_keys_each"),
            };
            group.bench_function(name, |bencher| {
                let fixture = fixture.get_or_init(|| TwoThreads::build(many));
                bencher.iter_custom(|iters| {
                    two_thread_wall_time(iters, |thread, admissions| {
                        fixture.tally_run(thread, keys, admissions, into)
                    })
                })
            });
        }
    }
    group.bench_function(format!("governor_check_key_{many}_keys_each"), |bencher| {
        let fixture = fixture.get_or_init(|| TwoThreads::build(many));
        bencher.iter_custom(|iters| {
            two_thread_wall_time(iters, |thread, admissions| {
                fixture.governor_run(thread, many, admissions)
            })
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Summary

/// Where criterion writes, found the way criterion 0.5 finds it: `CRITERION_HOME`, else
/// `CARGO_TARGET_DIR`'s `criterion`, else (under `cargo bench`, which sets `CARGO`) the target
/// directory `cargo metadata` names, else `target/criterion` below the working directory (the
/// executable run by hand).
fn criterion_directory() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    std::env::var_os("CARGO")
        .and_then(|cargo| {
            let output = std::process::Command::new(cargo)
                .args(["metadata", "--format-version", "1"])
                .output()
                .ok()?;
            let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            Some(PathBuf::from(metadata.get("target_directory")?.as_str()?).join("criterion"))
        })
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}

/// Criterion's median time per iteration (ns) for `group/bench`, if it was measured in this
/// run (an older file from an earlier or filtered run is ignored).
fn median_ns(group: &str, bench: &str, run_started: SystemTime) -> Option<f64> {
    let path = criterion_directory()
        .join(group)
        .join(bench)
        .join("new")
        .join("estimates.json");
    let modified = std::fs::metadata(&path)
        .and_then(|meta| meta.modified())
        .ok()?;
    if modified < run_started {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let estimates: serde_json::Value = serde_json::from_str(&text).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn show(value: Option<f64>) -> String {
    value.map_or_else(|| "not measured".to_string(), |ns| format!("{ns:.1} ns"))
}

/// `tally / governor` against `target`, e.g. "1.32x (target <= 1.5x: met)".
fn ratio(tally: Option<f64>, governor: Option<f64>, target: f64) -> String {
    match (tally, governor) {
        (Some(tally), Some(governor)) => {
            let ratio = tally / governor;
            let verdict = if ratio <= target { "met" } else { "MISSED" };
            format!("{ratio:.2}x (target <= {target}x: {verdict})")
        }
        _ => "no ratio".to_string(),
    }
}

/// Allocation calls per tally admission and per governor check on warm keys (expected 0).
fn allocations_per_admission() -> (f64, f64) {
    const ROUNDS: u64 = 10_000;
    let engine = bench_engine(Some(START_MS));
    let key = add_seated_key(&engine, 0, BENCH_PLAN);
    let governor: DefaultKeyedRateLimiter<u64> = RateLimiter::keyed(governor_quota());
    let warm = UsageRequest::new(&key, BENCH_RESOURCE, ONE_REQUEST).at(START_MS);
    black_box((engine.consume(&warm).ok(), governor.check_key(&7).ok()));
    let before = allocations();
    for step in 0..ROUNDS {
        let request = UsageRequest::new(&key, BENCH_RESOURCE, ONE_REQUEST).at(at_ms(step));
        black_box(engine.consume(&request).ok());
    }
    let tally = (allocations() - before) as f64 / ROUNDS as f64;
    let before = allocations();
    for _ in 0..ROUNDS {
        black_box(governor.check_key(&7).ok());
    }
    (tally, (allocations() - before) as f64 / ROUNDS as f64)
}

fn summary(report: &Report, sizes: Sizes, run_started: SystemTime) {
    let median = |group: &str, bench: &str| median_ns(group, bench, run_started);
    let hot_governor = median("hot_key", "governor_check_key");
    let hot_consume = median("hot_key", "tally_consume");
    let hot_consume_into = median("hot_key", "tally_consume_into");
    let million_governor = median("million_keys", "governor_check_key");
    let million_consume = median("million_keys", "tally_consume");
    let many = sizes.keys_per_thread;
    println!("\n== admission summary: criterion medians from this run ==");
    println!(
        "hot_key       governor check_key (u64 key) {} | tally consume, 3 limits {}: {} | \
         consume_into (decision written in place) {}: {} | tally check {} | tally consume \
         reading SystemClock {}",
        show(hot_governor),
        show(hot_consume),
        ratio(hot_consume, hot_governor, 1.5),
        show(hot_consume_into),
        ratio(hot_consume_into, hot_governor, 1.5),
        show(median("hot_key", "tally_check")),
        show(median("hot_key", "tally_consume_system_clock")),
    );
    println!(
        "million_keys  ({} keys) governor {} | tally consume {}: {}",
        sizes.million_keys,
        show(million_governor),
        show(million_consume),
        ratio(million_consume, million_governor, 1.2),
    );
    for (case, call, paired, target) in [
        ("hot_key", "consume", report.hot_paired, 1.5),
        ("hot_key", "consume_into", report.hot_into_paired, 1.5),
        ("million_keys", "consume", report.million_paired, 1.2),
    ] {
        if let Some(paired) = paired {
            let verdict = if paired.ratio <= target {
                "met"
            } else {
                "MISSED"
            };
            println!(
                "{case:<13} paired bursts (median of {} alternating rounds): governor {:.1} ns, \
                 tally {call} {:.1} ns: {:.2}x (target <= {target}x: {verdict})",
                sizes.paired_rounds, paired.governor_ns, paired.tally_ns, paired.ratio,
            );
        }
    }
    if let Some(reach) = report.memory_reach {
        let per_key = |bytes: usize| bytes as f64 / reach.keys.max(1) as f64;
        println!(
            "memory reach  ({} keys) governor's keys {:.0} B/key resident, a dependent load over \
             them {:.1} ns | tally's {:.0} B/key, {:.1} ns: {:.2}x (each of the two misses in a \
             row an admission waits for)",
            reach.keys,
            per_key(reach.governor_bytes),
            reach.governor_load_ns,
            per_key(reach.tally_bytes),
            reach.tally_load_ns,
            reach.tally_load_ns / reach.governor_load_ns,
        );
    }
    for bench in [
        "tally_consume_1_key_each".to_string(),
        format!("tally_consume_{many}_keys_each"),
        "tally_consume_into_1_key_each".to_string(),
        format!("tally_consume_into_{many}_keys_each"),
        format!("governor_check_key_{many}_keys_each"),
    ] {
        if let Some(ns) = median("two_threads", &bench) {
            let per_second = 1e9 / ns;
            let verdict = match (bench.starts_with("tally"), per_second >= 20e6) {
                (false, _) => "",
                (true, true) => " (target >= 20 M/s: met)",
                (true, false) => " (target >= 20 M/s: MISSED)",
            };
            println!(
                "two_threads   {bench}: {ns:.1} ns wall per admission = {:.1} M admissions/s{verdict}",
                per_second / 1e6
            );
        }
    }
    if let (Some(active), Some(idle)) = (report.memory_active_bytes, report.memory_idle_bytes) {
        let active_verdict = if active <= 2048.0 { "met" } else { "MISSED" };
        let idle_verdict = if idle <= 0.0 { "met" } else { "MISSED" };
        println!(
            "memory        plus key with usage {active:.0} B/key of windows (target <= 2048: \
             {active_verdict}); idle key {idle:.0} B/key (target 0: {idle_verdict})"
        );
    }
    let (tally_allocations, governor_allocations) = allocations_per_admission();
    println!(
        "allocations   per admission on a warm key: tally {tally_allocations:.2}, governor \
         {governor_allocations:.2}"
    );
    for line in &report.lines {
        println!("note          {line}");
    }
}

fn main() {
    let run_started = SystemTime::now();
    let arguments: Vec<String> = std::env::args().collect();
    let quick = arguments.iter().any(|argument| argument == "--test");
    // `--list` only names the benchmarks: no memory report, no fixtures.
    let listing = arguments.iter().any(|argument| argument == "--list");
    let sizes = if quick { QUICK } else { FULL };
    // Short windows keep the whole run under about three minutes; the command line can still
    // override them (criterion reads its arguments last).
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(40)
        .without_plots()
        .configure_from_args();
    let mut report = Report::default();
    if !listing {
        memory_report(&mut report, sizes.memory_keys);
    }
    bench_hot_key(&mut criterion, sizes, &mut report);
    bench_beyond_the_plan(&mut criterion);
    bench_million_keys(&mut criterion, sizes, &mut report);
    bench_two_threads(&mut criterion, sizes);
    criterion.final_summary();
    if quick {
        println!("admission: --test mode ran every benchmark once; no timings to summarise");
    } else if !listing {
        summary(&report, sizes, run_started);
    }
}
