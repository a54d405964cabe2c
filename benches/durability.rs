//! Durability benchmark: group-commit throughput in `Durability::Sync`, space amplification and
//! open time, each measured beside a raw append + fdatasync baseline in the same run.
//!
//! Targets (the log issue): `Sync` at >= 1 M events/s on 2 cores and >= half of a raw append +
//! fdatasync at the same batch size; space <= 1.5x the encoded events; opening a database with
//! 10 M events of history in <= 1 s.
//!
//! Besides the targets it prints what explains them: the raw append written over zeros written
//! ahead of it, as the log's `Sync` writer writes (its fdatasyncs seldom commit a new file
//! length; a reference, not the issue's baseline), the same load in `Durability::None` (what
//! the engine and its writer absorb without any fsync: the ceiling of every `Sync` figure), the
//! bytes the process wrote per event (`wchar`: the log's write amplification), events per
//! fdatasync (the group commit's batch), per-call latency percentiles, the records, segments
//! and snapshots on disk, and where an open's time goes. Every key is admitted once, untimed,
//! before the first measurement (a key's first admission allocates its windows). Opens are
//! measured twice: in this process (memory it already had) and each in a new process of its
//! own, as a restart opens (every page of the state faults in fresh).
//!
//! Plain `fn main` (not criterion): the figures are throughput, sizes and open times, not the
//! latency of one closure. Run:
//!
//! ```text
//! cargo bench --bench durability                 # full run: a few minutes
//! cargo bench --bench durability -- --test       # quick: seconds, every path exercised (CI)
//! ```
//!
//! Environment (defaults: full / quick):
//! - `TALLY_BENCH_QUICK=1`: the quick defaults, as `--test`.
//! - `TALLY_BENCH_EVENTS`: events per throughput measurement at most (2,000,000 / 20,000).
//! - `TALLY_BENCH_SECONDS`: seconds per throughput measurement at most (1.0 / 0.05).
//! - `TALLY_BENCH_RUNS`: repetitions; medians are quoted (3 / 1).
//! - `TALLY_BENCH_KEYS`: keys in every database (100,000 / 1,000).
//! - `TALLY_BENCH_BATCHES`: `consume_many` batch sizes (100,1000,10000).
//! - `TALLY_BENCH_THREADS`: thread counts calling `consume`, without and with request ids
//!   (1,16,64,256).
//! - `TALLY_BENCH_IN_FLIGHT`: requests each `submit`ting thread keeps in flight (256,1000).
//! - `TALLY_BENCH_HISTORY_EVENTS`: history of the open-time database (10,000,000 / 20,000).
//! - `TALLY_BENCH_TAIL_EVENTS`: events after the last checkpoint (1,000,000 / 5,000).
//! - `TALLY_BENCH_OPENS`: opens per open-time figure (3 / 3).
//! - `TALLY_BENCH_CHECKPOINT_EVERY`: checkpoint interval while measuring throughput (the
//!   engine's default, 1,000,000); `0` turns periodic checkpoints off to isolate the log.
//! - `TALLY_BENCH_RING_BUCKETS`: buckets of every key's 5-hour window holding usage when the
//!   throughput measurements start (1; at most 225, a full ring): the warm-up admits every key
//!   that many times, spread over the window, so checkpoints copy and write rings as full as a
//!   key busy all day has them.
//! - `TALLY_BENCH_SECTIONS`: any of `throughput,open` (both).
//! - `TALLY_BENCH_DIR`: where the temporary databases go (the system temp dir).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tally_engine::event::encode_body;
use tally_engine::log::EventLog;
use tally_engine::{
    Durability, Engine, EngineOptions, EventBody, ManualClock, OpenOptions, OpenReport, Policy,
    Unit, UsageRequest, Window,
};

/// Every limit is far above what the benchmark consumes, so every request is admitted and
/// every admission writes one event (a denial writes nothing and would flatter the figures).
/// Two limits, as a real plan has (requests on a rolling window, tokens per day): the event
/// carries a hold per limit. The profiling loops in `examples/` read the same file.
const POLICY_TOML: &str = include_str!("durability-policy.toml");
const RESOURCE: &str = "m2.7";
const PLAN: &str = "Bench";
const QUANTITIES: [(Unit, u64); 2] = [(Unit::Requests, 1), (Unit::Tokens, 1_500)];
/// 2026-09-21 (UTC): an ordinary present-day timestamp.
const BASE_MS: u64 = 1_790_000_000_000;
/// A stored event is its body behind two varints (time delta, body length): 2 bytes for these
/// events; a record adds 44 bytes (an 8-byte frame and a 36-byte header) for all of its events
/// together.
const EVENT_FRAME_BYTES: usize = 2;
/// The throughput runs' timestamps advance as fast as a 1 M events/s gateway's clock would.
const THROUGHPUT_MS_PER_MILLION: u64 = 1_000;
/// The benchmark plan's rolling window.
const WINDOW_MS: u64 = 5 * 3_600_000;
/// The open-time history is spread over a day, so a 5-hour window holds a realistic part of it.
const HISTORY_MS_PER_MILLION_AT_10M: u64 = 24 * 3_600 * 1_000 / 10;

// ---------------------------------------------------------------------------------------------
// Settings.

struct Settings {
    quick: bool,
    events_per_measure: u64,
    measure_time: Duration,
    runs: usize,
    keys: usize,
    batches: Vec<usize>,
    threads: Vec<usize>,
    in_flight: Vec<usize>,
    history_events: u64,
    tail_events: u64,
    opens: usize,
    checkpoint_every: u64,
    ring_buckets: u64,
    sections: String,
    dir: PathBuf,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .replace(['_', ','], "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            item.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {item:?} is not a number"))
        })
        .collect()
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::args().any(|argument| argument == "--test")
            || std::env::var("TALLY_BENCH_QUICK").is_ok_and(|value| value == "1");
        let pick = |full: u64, fast: u64| if quick { fast } else { full };
        let checkpoint_every = match env_or("TALLY_BENCH_CHECKPOINT_EVERY", u64::MAX) {
            0 => u64::MAX,
            u64::MAX => OpenOptions::default().checkpoint_every_events,
            every => every,
        };
        Settings {
            quick,
            events_per_measure: env_or("TALLY_BENCH_EVENTS", pick(2_000_000, 20_000)),
            measure_time: Duration::from_secs_f64(env_or(
                "TALLY_BENCH_SECONDS",
                if quick { 0.05 } else { 1.0 },
            )),
            runs: env_or("TALLY_BENCH_RUNS", pick(3, 1) as usize).max(1),
            keys: env_or("TALLY_BENCH_KEYS", pick(100_000, 1_000) as usize).max(1),
            batches: env_list("TALLY_BENCH_BATCHES", "100,1000,10000"),
            threads: env_list("TALLY_BENCH_THREADS", "1,16,64,256"),
            in_flight: env_list("TALLY_BENCH_IN_FLIGHT", "256,1000"),
            history_events: env_or("TALLY_BENCH_HISTORY_EVENTS", pick(10_000_000, 20_000)),
            tail_events: env_or("TALLY_BENCH_TAIL_EVENTS", pick(1_000_000, 5_000)),
            opens: env_or("TALLY_BENCH_OPENS", 3usize).max(1),
            checkpoint_every,
            ring_buckets: env_or("TALLY_BENCH_RING_BUCKETS", 1u64).clamp(1, ring_buckets()),
            sections: std::env::var("TALLY_BENCH_SECTIONS")
                .unwrap_or_else(|_| "throughput,open".into()),
            dir: std::env::var_os("TALLY_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small tools: temporary directories, sizes, medians, the key set and the timeline.

/// A directory removed on drop, also when a measurement panics.
struct TempDir(PathBuf);

impl TempDir {
    fn new(settings: &Settings, name: &str) -> TempDir {
        let path = settings
            .dir
            .join(format!("tally-durability-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes allocated on disk under `path`, as `du` counts them (sparse holes excluded).
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = metadata.blocks() * 512;
    if !metadata.is_dir() {
        return own;
    }
    let children = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| disk_bytes(&entry.path()))
                .sum()
        })
        .unwrap_or(0);
    own + children
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

fn percentile_us(latencies_us: &mut [u32], fraction: f64) -> u32 {
    if latencies_us.is_empty() {
        return 0;
    }
    latencies_us.sort_unstable();
    let index = ((latencies_us.len() - 1) as f64 * fraction).round() as usize;
    latencies_us[index]
}

fn millions(value: f64) -> String {
    format!("{:.3} M", value / 1e6)
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Keys (and their users) with fixed-width names, so every event has the same size.
struct Keys {
    keys: Vec<String>,
}

impl Keys {
    fn new(count: usize) -> Keys {
        Keys {
            keys: (0..count).map(|index| format!("tp-{index:07}")).collect(),
        }
    }

    fn key(&self, index: u64) -> &str {
        &self.keys[(index % self.keys.len() as u64) as usize]
    }

    fn user(index: usize) -> String {
        format!("user-{index:07}")
    }
}

/// Explicit request timestamps from an event index: the engine's clock is never read, and the
/// history the windows see does not depend on how fast this machine is.
#[derive(Clone, Copy)]
struct Timeline {
    /// When event 0 happens.
    base_ms: u64,
    ms_per_million_events: u64,
}

impl Timeline {
    fn at_ms(self, index: u64) -> u64 {
        let offset = u128::from(index) * u128::from(self.ms_per_million_events) / 1_000_000;
        self.base_ms + offset as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Engines.

fn policy() -> Policy {
    Policy::from_toml_str(POLICY_TOML).expect("the benchmark policy is valid")
}

/// The buckets of the benchmark plan's rolling window (its default width).
fn ring_buckets() -> u64 {
    let policy = policy();
    let rolling = policy
        .counters()
        .iter()
        .find_map(|counter| match counter.window {
            Window::Rolling {
                window_ms,
                bucket_ms,
            } => Some(window_ms / bucket_ms),
            Window::Calendar(_) => None,
        });
    rolling.expect("the benchmark plan has a rolling window")
}

fn open_engine(dir: &Path, durability: Durability, checkpoint_every: u64) -> Engine {
    let options = OpenOptions {
        durability,
        engine: EngineOptions {
            // The request-id sections remember every id they send (the timeline never passes
            // the horizon): about a million over their 4 thread counts x 3 runs of a second,
            // more on a faster disk. The default 1,000,000 filled up once.
            idempotency_capacity: 8_000_000,
            // The timeline runs ahead of a clock that stands still: no bound ahead of it.
            max_ahead_of_clock_ms: 0,
            ..EngineOptions::default()
        },
        checkpoint_every_events: checkpoint_every,
        ..OpenOptions::default()
    };
    let clock = Arc::new(ManualClock::new(BASE_MS));
    Engine::open(dir, policy(), clock, options).expect("opening the engine")
}

/// Creates every key with a seat on the benchmark plan, without fsyncs (setup is not measured),
/// and checkpoints it away so later opens do not replay the setup.
fn create_database(dir: &Path, keys: &Keys) {
    let engine = open_engine(dir, Durability::None, u64::MAX);
    for index in 0..keys.keys.len() {
        let user = Keys::user(index);
        engine
            .create_user(&user, &keys.keys[index], Some(BASE_MS))
            .expect("creating a user");
        engine
            .assign_seat(&format!("@{user}"), &user, PLAN, Some(BASE_MS))
            .expect("assigning a seat");
    }
    engine.close().expect("closing after setup");
}

/// The encoded size of one admitted usage event, as tally writes it for these requests.
fn usage_event_bytes(settings: &Settings) -> Vec<u8> {
    let dir = TempDir::new(settings, "event-size");
    let keys = Keys::new(1);
    create_database(&dir.0, &keys);
    let engine = open_engine(&dir.0, Durability::None, u64::MAX);
    let request = UsageRequest::new(keys.key(0), RESOURCE, &QUANTITIES).at(BASE_MS);
    assert!(engine.consume(&request).expect("consume").is_admitted());
    // Without Sync the event may still be queued for the writer: make it readable first.
    engine.sync().expect("sync");
    let events = engine.events_after(0, usize::MAX).expect("reading the log");
    let last = events.last().expect("the usage event");
    assert!(
        matches!(last.body, EventBody::UsageAdmitted { .. }),
        "{:?}",
        events
            .iter()
            .map(|event| event.body.kind())
            .collect::<Vec<_>>()
    );
    encode_body(&last.body)
}

/// The bytes one event takes in a tally record: the body behind its time delta and length.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(EVENT_FRAME_BYTES + body.len());
    bytes.push(0);
    bytes.push(body.len() as u8);
    bytes.extend_from_slice(body);
    bytes
}

// ---------------------------------------------------------------------------------------------
// Throughput measurements.

/// One measurement: events written, wall time, and the latency of each call (a whole
/// `consume_many` batch, one `consume`, or one raw write + fdatasync).
struct Sample {
    events: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// Bytes the whole process handed to `write`-like calls meanwhile (`wchar`): the log's
    /// write amplification, seen from the syscalls.
    written_bytes: u64,
    /// fdatasyncs of the log (or of the raw file) meanwhile.
    flushes: u64,
}

impl Sample {
    fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// This process's `wchar` from `/proc/self/io` (0 where unavailable).
fn process_written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("wchar:"))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Appends `batch` framed events per write to a plain file, one fdatasync per batch: the floor
/// any log pays for the same bytes and the same number of durable syncs. With `zeros_ahead`,
/// the writes go over zeros written 1 MiB ahead of them, as the log's `Sync` writer does (an
/// fdatasync then seldom commits a new file length): printed for reference, not the issue's
/// baseline.
fn raw_append(
    dir: &Path,
    event: &[u8],
    batch: usize,
    settings: &Settings,
    zeros_ahead: bool,
) -> (Sample, u64) {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!("raw-{batch}"));
    let mut file = File::create(&path).expect("creating the raw file");
    let zeros = vec![0u8; 1 << 20];
    let (mut written, mut zeroed) = (0u64, 0u64);
    let mut buffer = Vec::with_capacity(batch * event.len());
    let mut latencies_us = Vec::new();
    let mut events = 0u64;
    let written_before = process_written_bytes();
    let started = Instant::now();
    while events < settings.events_per_measure && started.elapsed() < settings.measure_time {
        let call = Instant::now();
        // Copying the events in is part of the cost: a log cannot write bytes it has not built.
        buffer.clear();
        for _ in 0..batch {
            buffer.extend_from_slice(event);
        }
        written += buffer.len() as u64;
        if zeros_ahead && written > zeroed {
            while zeroed < written + zeros.len() as u64 {
                file.write_all_at(&zeros, zeroed)
                    .expect("writing zeros ahead in the raw file");
                zeroed += zeros.len() as u64;
            }
        }
        file.write_all(&buffer).expect("appending to the raw file");
        file.sync_data().expect("fdatasync of the raw file");
        latencies_us.push(call.elapsed().as_micros() as u32);
        events += batch as u64;
    }
    let elapsed = started.elapsed();
    drop(file);
    let bytes = disk_bytes(&path);
    let _ = std::fs::remove_file(&path);
    let sample = Sample {
        events,
        elapsed,
        flushes: latencies_us.len() as u64,
        latencies_us,
        written_bytes: process_written_bytes() - written_before,
    };
    (sample, bytes)
}

/// How callers reach the engine.
#[derive(Clone, Copy)]
enum Calls {
    /// `consume_many` with this many requests per call.
    Many(usize),
    /// `consume`, one request per call; with `ids`, each under a request id of its own (the
    /// id's record is kept, and a repeat must wait for the first decision's event).
    One { ids: bool },
    /// `submit`, one request per call, each completed once `in_flight` more were submitted
    /// after it (an event loop keeping that many requests in flight).
    Submit { in_flight: usize },
}

/// An engine under load and what the driving threads share.
struct Target<'a> {
    engine: &'a Engine,
    keys: &'a Keys,
    timeline: Timeline,
    /// Numbers events across all measurements of this engine, so timestamps only move forward.
    cursor: &'a AtomicU64,
    /// Without `Sync` a call returns before the writer has stored its event: the measurement
    /// then ends with `sync()`, so the figure is what the log absorbed, not what was queued.
    sync_at_end: bool,
}

/// Admits one request on every key at `at_ms`, in batches of 1,000 (untimed).
fn warm_up(target: &Target<'_>, keys: usize, at_ms: u64) {
    let mut requests = Vec::with_capacity(1_000);
    let mut done = 0;
    while done < keys {
        let count = (keys - done).min(1_000);
        let first = target.cursor.fetch_add(count as u64, Ordering::Relaxed);
        requests.clear();
        requests.extend((first..first + count as u64).map(|index| {
            UsageRequest::new(target.keys.key(index), RESOURCE, &QUANTITIES).at(at_ms)
        }));
        let admitted = target
            .engine
            .consume_many(&requests)
            .into_iter()
            .filter(|result| result.as_ref().is_ok_and(|decision| decision.is_admitted()))
            .count();
        assert_eq!(admitted, count, "every warm-up request must be admitted");
        done += count;
    }
    if target.sync_at_end {
        target.engine.sync().expect("sync");
    }
}

/// Issues admitted requests from `threads` threads until the event or time budget is spent.
fn drive(target: &Target<'_>, calls: Calls, threads: usize, settings: &Settings) -> Sample {
    let per_thread = settings.events_per_measure.div_ceil(threads as u64);
    let start = Barrier::new(threads + 1);
    let written_before = process_written_bytes();
    let flushes_before = target.engine.log_writer_flushes();
    let mut started = Instant::now();
    let outcomes: Vec<(u64, Vec<u32>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    drive_one_thread(target, calls, per_thread, settings.measure_time)
                })
            })
            .collect();
        // Timing starts when every thread is ready, not while 256 threads are being spawned.
        start.wait();
        started = Instant::now();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a benchmark thread panicked"))
            .collect()
    });
    if target.sync_at_end {
        target.engine.sync().expect("sync");
    }
    let mut sample = Sample {
        events: 0,
        elapsed: started.elapsed(),
        latencies_us: Vec::new(),
        written_bytes: process_written_bytes() - written_before,
        flushes: target.engine.log_writer_flushes() - flushes_before,
    };
    for (events, latencies_us) in outcomes {
        sample.events += events;
        sample.latencies_us.extend(latencies_us);
    }
    sample
}

fn drive_one_thread(
    target: &Target<'_>,
    calls: Calls,
    budget_events: u64,
    budget_time: Duration,
) -> (u64, Vec<u32>) {
    let per_call = match calls {
        Calls::Many(batch) => batch,
        Calls::One { .. } => 1,
        Calls::Submit { in_flight } => {
            return drive_submitting(target, in_flight, budget_events, budget_time);
        }
    };
    let started = Instant::now();
    let mut requests = Vec::with_capacity(per_call);
    let mut latencies_us = Vec::new();
    let mut events = 0u64;
    while events < budget_events && started.elapsed() < budget_time {
        let first = target.cursor.fetch_add(per_call as u64, Ordering::Relaxed);
        requests.clear();
        requests.extend((first..first + per_call as u64).map(|index| {
            UsageRequest::new(target.keys.key(index), RESOURCE, &QUANTITIES)
                .at(target.timeline.at_ms(index))
        }));
        let call = Instant::now();
        let admitted = match calls {
            Calls::Many(_) => {
                let results = target.engine.consume_many(&requests);
                let admitted = results
                    .iter()
                    .filter(|result| result.as_ref().is_ok_and(|decision| decision.is_admitted()))
                    .count();
                if admitted != per_call {
                    // Say which request and what it got, so a failed run can be followed up.
                    let (index, result) = results
                        .iter()
                        .enumerate()
                        .find(|(_, result)| {
                            !result.as_ref().is_ok_and(|decision| decision.is_admitted())
                        })
                        .expect("one was not admitted");
                    panic!(
                        "{admitted} of {per_call} admitted; request {index} ({:?}) got {result:?}",
                        requests[index]
                    );
                }
                admitted
            }
            Calls::Submit { .. } => unreachable!("driven by drive_submitting"),
            Calls::One { ids } => {
                let id = ids.then(|| format!("bench-{first}"));
                let request = match &id {
                    Some(id) => requests[0].id(id),
                    None => requests[0],
                };
                usize::from(
                    target
                        .engine
                        .consume(&request)
                        .expect("consume")
                        .is_admitted(),
                )
            }
        };
        latencies_us.push(call.elapsed().as_micros() as u32);
        // A denial writes no event: the figures would be wrong, so stop loudly.
        assert_eq!(
            admitted, per_call,
            "every benchmark request must be admitted"
        );
        events += per_call as u64;
    }
    (events, latencies_us)
}

/// One thread submitting requests one at a time and completing each once `in_flight` more
/// were submitted; the latency is from submit to complete.
fn drive_submitting(
    target: &Target<'_>,
    in_flight: usize,
    budget_events: u64,
    budget_time: Duration,
) -> (u64, Vec<u32>) {
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(in_flight + 1);
    let mut latencies_us = Vec::new();
    let mut events = 0u64;
    let mut complete = |(submitted, at): (tally_engine::Submitted<'_, '_>, Instant)| {
        let (decision, _) = submitted.complete().expect("complete");
        // A denial writes no event: the figures would be wrong, so stop loudly.
        assert!(
            decision.is_admitted(),
            "every benchmark request must be admitted"
        );
        latencies_us.push(at.elapsed().as_micros() as u32);
    };
    while events < budget_events && started.elapsed() < budget_time {
        let index = target.cursor.fetch_add(1, Ordering::Relaxed);
        let request = UsageRequest::new(target.keys.key(index), RESOURCE, &QUANTITIES)
            .at(target.timeline.at_ms(index));
        pending.push_back((
            target.engine.submit(&request).expect("submit"),
            Instant::now(),
        ));
        if pending.len() > in_flight {
            complete(pending.pop_front().expect("one is pending"));
        }
        events += 1;
    }
    pending.into_iter().for_each(&mut complete);
    (events, latencies_us)
}

// ---------------------------------------------------------------------------------------------
// Section 1: throughput, raw baseline side by side.

/// The target for `Sync`: this many events per second, and this share of the raw baseline.
const TARGET_EVENTS_PER_SECOND: f64 = 1_000_000.0;
const TARGET_SHARE_OF_RAW: f64 = 0.5;
const TARGET_SPACE_AMPLIFICATION: f64 = 1.5;
const TARGET_OPEN_SECONDS: f64 = 1.0;

/// One line of the throughput table: its samples over the runs and the raw batch it is
/// compared with.
struct Row {
    label: String,
    raw_batch: usize,
    samples: Vec<Sample>,
}

impl Row {
    fn new(label: String, raw_batch: usize) -> Row {
        Row {
            label,
            raw_batch,
            samples: Vec::new(),
        }
    }

    /// The median over the runs of a figure of each sample.
    fn median_of(&self, figure: impl Fn(&Sample) -> f64) -> f64 {
        let mut values: Vec<f64> = self.samples.iter().map(figure).collect();
        median(&mut values)
    }

    fn median_events_per_second(&self) -> f64 {
        self.median_of(Sample::events_per_second)
    }

    fn median_written_per_event(&self) -> f64 {
        self.median_of(|sample| sample.written_bytes as f64 / sample.events.max(1) as f64)
    }

    fn median_events_per_flush(&self) -> f64 {
        self.median_of(|sample| sample.events as f64 / sample.flushes.max(1) as f64)
    }

    fn latency_us(&self, fraction: f64) -> u32 {
        let mut all: Vec<u32> = self
            .samples
            .iter()
            .flat_map(|sample| sample.latencies_us.iter().copied())
            .collect();
        percentile_us(&mut all, fraction)
    }
}

/// One tally configuration of the throughput table.
struct Config {
    calls: Calls,
    threads: usize,
    /// `Sync` (the figure the targets are about) or `None` (no fsync: what the engine and its
    /// writer thread can absorb at all, the ceiling any `Sync` figure lives under).
    sync: bool,
    row: Row,
}

fn configs(settings: &Settings) -> Vec<Config> {
    let mut configs = Vec::new();
    for &batch in &settings.batches {
        for (threads, sync) in [(1, true), (2, true), (4, true), (1, false), (2, false)] {
            let mode = if sync { "" } else { ", None (no fsync)" };
            let label = format!("consume_many({batch}) x {threads} thread(s){mode}");
            let row = Row::new(label, batch);
            let calls = Calls::Many(batch);
            configs.push(Config {
                calls,
                threads,
                sync,
                row,
            });
        }
    }
    for &in_flight in &settings.in_flight {
        for threads in [1, 2] {
            let label = format!("submit, {in_flight} in flight x {threads} thread(s)");
            let row = Row::new(label, in_flight * threads);
            configs.push(Config {
                calls: Calls::Submit { in_flight },
                threads,
                sync: true,
                row,
            });
        }
    }
    for ids in [false, true] {
        for &threads in &settings.threads {
            let label = if ids {
                format!("consume with request ids x {threads} thread(s)")
            } else {
                format!("consume x {threads} thread(s)")
            };
            let row = Row::new(label, threads);
            configs.push(Config {
                calls: Calls::One { ids },
                threads,
                sync: true,
                row,
            });
        }
    }
    configs
}

fn throughput(settings: &Settings, body: &[u8]) {
    let event = framed(body);
    let keys = Keys::new(settings.keys);
    let dir = TempDir::new(settings, "throughput");
    let (sync_database, none_database) = (dir.0.join("sync"), dir.0.join("none"));
    let raw_dir = dir.0.join("raw");
    std::fs::create_dir_all(&raw_dir).expect("creating the raw directory");
    create_database(&sync_database, &keys);
    create_database(&none_database, &keys);
    let sync_engine = open_engine(&sync_database, Durability::Sync, settings.checkpoint_every);
    let none_engine = open_engine(&none_database, Durability::None, settings.checkpoint_every);
    // The warm-up's rounds are `spacing_ms` apart from BASE_MS on (each in a bucket of its
    // own); the measured events follow the last round, so every round is still in the window.
    let spacing_ms = WINDOW_MS / settings.ring_buckets;
    let timeline = Timeline {
        base_ms: BASE_MS + (settings.ring_buckets - 1) * spacing_ms,
        ms_per_million_events: THROUGHPUT_MS_PER_MILLION,
    };
    let (sync_cursor, none_cursor) = (AtomicU64::new(0), AtomicU64::new(0));
    let sync_target = Target {
        engine: &sync_engine,
        keys: &keys,
        timeline,
        cursor: &sync_cursor,
        sync_at_end: false,
    };
    let none_target = Target {
        engine: &none_engine,
        cursor: &none_cursor,
        sync_at_end: true,
        ..sync_target
    };
    // Every key's first admission allocates its windows (about a kilobyte each, fresh pages
    // the kernel zeroes): a cost a running gateway pays once per key, not per event. Untimed,
    // so the first row measured on each database is not the only one that pays it.
    for target in [&sync_target, &none_target] {
        for round in 0..settings.ring_buckets {
            warm_up(target, settings.keys, BASE_MS + round * spacing_ms);
        }
    }
    let mut configs = configs(settings);
    let mut raw_batches: Vec<usize> = configs.iter().map(|config| config.row.raw_batch).collect();
    raw_batches.sort_unstable();
    raw_batches.dedup();
    let mut raw: Vec<Row> = raw_batches
        .iter()
        .map(|&batch| Row::new(format!("raw append + fdatasync, batch {batch}"), batch))
        .collect();
    let mut raw_over_zeros: Vec<Row> = raw_batches
        .iter()
        .map(|&batch| {
            Row::new(
                format!("raw, over zeros written ahead, batch {batch}"),
                batch,
            )
        })
        .collect();
    let mut raw_space = (0u64, 0u64);
    for run in 0..settings.runs {
        // Raw and tally alternate within each run, so both see the same disk and neighbours.
        for config in &mut configs {
            let raw_row = raw
                .iter_mut()
                .find(|raw_row| raw_row.raw_batch == config.row.raw_batch)
                .expect("every compared batch is measured raw");
            if raw_row.samples.len() <= run {
                let (sample, bytes) =
                    raw_append(&raw_dir, &event, raw_row.raw_batch, settings, false);
                // The largest raw file says most about the file's own overhead (block rounding).
                if sample.events > raw_space.1 {
                    raw_space = (bytes, sample.events);
                }
                raw_row.samples.push(sample);
                let batch = raw_row.raw_batch;
                let over_zeros = raw_over_zeros
                    .iter_mut()
                    .find(|row| row.raw_batch == batch)
                    .expect("every raw batch is measured over zeros too");
                over_zeros
                    .samples
                    .push(raw_append(&raw_dir, &event, batch, settings, true).0);
            }
            let target = if config.sync {
                &sync_target
            } else {
                &none_target
            };
            let sample = drive(target, config.calls, config.threads, settings);
            config.row.samples.push(sample);
        }
    }
    let flushed = raw_at_flush_sizes(&raw_dir, &event, &configs, settings);
    print_throughput(settings, &raw, &raw_over_zeros, &configs);
    print_raw_at_flush_sizes(&configs, &flushed);
    // The periodic checkpoints' cuts held every lock: admission waited that long each time.
    for (what, engine) in [("Sync", &sync_engine), ("None", &none_engine)] {
        println!("{what} database: {}", cut_summary(engine, settings.keys));
    }
    sync_engine.close().expect("closing the Sync database");
    none_engine.close().expect("closing the None database");
    println!();
    let (raw_bytes, raw_events) = raw_space;
    println!("## Space after the throughput runs");
    println!(
        "raw file: {} for {raw_events} events = {:.3}x the encoded events ({} B body + {EVENT_FRAME_BYTES} B frame each)",
        mebibytes(raw_bytes),
        raw_bytes as f64 / (raw_events as f64 * body.len() as f64),
        body.len()
    );
    println!(
        "Sync database ({} usage events):",
        sync_cursor.load(Ordering::Relaxed)
    );
    space_report(&sync_database);
    println!(
        "None database ({} usage events):",
        none_cursor.load(Ordering::Relaxed)
    );
    space_report(&none_database);
}

/// The checkpoint cuts this engine took so far: how long each held the engine's locks (every
/// key shard write-locked: no admission meanwhile; and from its first lock to its last).
fn cut_summary(engine: &Engine, keys: usize) -> String {
    let times = engine.cut_lock_times();
    if times.is_empty() {
        return "checkpoint cut: none taken".into();
    }
    let summary = |held: &mut Vec<f64>| {
        let longest = held.iter().copied().fold(0.0, f64::max);
        format!("median {:.2} ms, max {longest:.2} ms", median(held))
    };
    let milliseconds = |time: std::time::Duration| time.as_secs_f64() * 1e3;
    let mut shards: Vec<f64> = times
        .iter()
        .map(|time| milliseconds(time.key_shards))
        .collect();
    let mut every: Vec<f64> = times
        .iter()
        .map(|time| milliseconds(time.every_lock))
        .collect();
    format!(
        "checkpoint cut: {} cuts, {} with {keys} keys (key shards write-locked); every lock held {}",
        times.len(),
        summary(&mut shards),
        summary(&mut every)
    )
}

fn print_throughput(settings: &Settings, raw: &[Row], raw_over_zeros: &[Row], configs: &[Config]) {
    println!();
    println!(
        "## Throughput: medians of {} run(s), each at most {} events or {:.2} s; {} keys, {} of {} buckets of each one's 5-hour window used; checkpoint every {}",
        settings.runs,
        settings.events_per_measure,
        settings.measure_time.as_secs_f64(),
        settings.keys,
        settings.ring_buckets,
        ring_buckets(),
        if settings.checkpoint_every == u64::MAX {
            "never".to_string()
        } else {
            settings.checkpoint_every.to_string()
        },
    );
    println!(
        "{:<50} {:>10} {:>9} {:>9} {:>10} {:>8} {:>14} {:>7}  target (Sync)",
        "what",
        "events/s",
        "p50 call",
        "p99 call",
        "written/ev",
        "ev/flush",
        "raw same batch",
        "ratio"
    );
    for row in raw.iter().chain(raw_over_zeros) {
        println!(
            "{:<50} {:>10} {:>7}us {:>7}us {:>8.0} B {:>8.0}",
            row.label,
            millions(row.median_events_per_second()),
            row.latency_us(0.5),
            row.latency_us(0.99),
            row.median_written_per_event(),
            row.median_events_per_flush(),
        );
    }
    for config in configs {
        let row = &config.row;
        let raw_row = raw
            .iter()
            .find(|raw_row| raw_row.raw_batch == row.raw_batch);
        let raw_rate = raw_row.map_or(f64::NAN, Row::median_events_per_second);
        let rate = row.median_events_per_second();
        let ratio = rate / raw_rate;
        let verdict = match (
            rate >= TARGET_EVENTS_PER_SECOND,
            ratio >= TARGET_SHARE_OF_RAW,
        ) {
            _ if !config.sync => "(reference)",
            (true, true) => "met",
            (false, true) => "MISSED: < 1 M/s",
            (true, false) => "MISSED: < 0.5x raw",
            (false, false) => "MISSED: both",
        };
        // Without `Sync` the writer flushes only at a segment's end and at `sync()`.
        let per_flush = if config.sync {
            format!("{:.0}", row.median_events_per_flush())
        } else {
            "-".to_string()
        };
        println!(
            "{:<50} {:>10} {:>7}us {:>7}us {:>8.0} B {per_flush:>8} {:>14} {:>6.3}x  {verdict}",
            row.label,
            millions(rate),
            row.latency_us(0.5),
            row.latency_us(0.99),
            row.median_written_per_event(),
            millions(raw_rate),
            ratio,
        );
    }
}

/// A `Sync` row whose flushes carried fewer events than the batch it is compared with (a
/// `submit` window's flush carries what was submitted during the flush before, about half of
/// it; 256 threads are never all queued at once) is compared there with a raw batch of its
/// window. Raw at the events its flushes did carry, measured after the rows (`runs` times
/// each), says how much of the gap is the smaller batch and how much the engine.
fn raw_at_flush_sizes(
    raw_dir: &Path,
    event: &[u8],
    configs: &[Config],
    settings: &Settings,
) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for config in configs {
        let Some(per_flush) = smaller_flushes(config) else {
            continue;
        };
        if rows.iter().any(|row| row.raw_batch == per_flush) {
            continue;
        }
        let mut row = Row::new(format!("raw, batch {per_flush}"), per_flush);
        for _ in 0..settings.runs {
            row.samples
                .push(raw_append(raw_dir, event, per_flush, settings, false).0);
        }
        rows.push(row);
    }
    rows
}

/// The events a `Sync` row's flushes carried, if fewer than nine tenths of the batch it is
/// compared with.
fn smaller_flushes(config: &Config) -> Option<usize> {
    let per_flush = config.row.median_events_per_flush().round().max(1.0) as usize;
    (config.sync && (per_flush as f64) < 0.9 * config.row.raw_batch as f64).then_some(per_flush)
}

fn print_raw_at_flush_sizes(configs: &[Config], flushed: &[Row]) {
    if flushed.is_empty() {
        return;
    }
    println!(
        "Sync rows whose flushes carried fewer events than the batch compared above, beside raw at the batch they carried (same ratio target):"
    );
    for config in configs {
        let row = &config.row;
        let Some(per_flush) = smaller_flushes(config) else {
            continue;
        };
        let Some(raw_row) = flushed
            .iter()
            .find(|raw_row| raw_row.raw_batch == per_flush)
        else {
            continue;
        };
        let (rate, raw_rate) = (
            row.median_events_per_second(),
            raw_row.median_events_per_second(),
        );
        println!(
            "  {:<48} {:>10} at {per_flush:>5} ev/flush; raw batch {per_flush:>5}: {:>10} (p50 {:>5}us); ratio {:.3}x",
            row.label,
            millions(rate),
            millions(raw_rate),
            raw_row.latency_us(0.5),
            rate / raw_rate,
        );
    }
}

/// What a closed database holds: events, records, segments, snapshots and bytes on disk, and
/// the space amplification over the encoded event bodies.
fn space_report(database: &Path) -> u64 {
    let on_disk = disk_bytes(database);
    let log = EventLog::open(database, Durability::None, None).expect("opening the log");
    let (mut records, mut events, mut body_bytes) = (0u64, 0u64, 0u64);
    let problems = log.walk(|record| {
        records += 1;
        events += u64::from(record.count);
        record
            .for_each(|event| {
                body_bytes += event.body.len() as u64;
                Ok(true)
            })
            .expect("a sound record");
    });
    assert!(problems.is_empty(), "{problems:?}");
    let snapshot = log.snapshot_pointer().expect("reading the snapshots");
    let previous = log
        .previous_snapshot_pointer()
        .expect("reading the snapshots");
    let snapshot_bytes = snapshot.map_or(0, |pointer| pointer.bytes);
    let previous_bytes = previous.map_or(0, |pointer| pointer.bytes);
    let segments = log.segments().len();
    log.close().expect("closing the log");
    let segment_bytes = disk_bytes(&database.join("events"));
    let sled_bytes = on_disk
        .saturating_sub(segment_bytes)
        .saturating_sub(disk_bytes(&database.join("snapshots")));
    let body_bytes = body_bytes.max(1);
    println!(
        "log: {events} events in {records} records ({:.0} events per record) in {segments} segment(s); bodies {}, segments {} ({:.3}x the bodies)",
        events as f64 / records.max(1) as f64,
        mebibytes(body_bytes),
        mebibytes(segment_bytes),
        segment_bytes as f64 / body_bytes as f64,
    );
    println!(
        "snapshots kept: latest {} + previous {}; sled (meta, cursors) {}; du {}",
        mebibytes(snapshot_bytes),
        mebibytes(previous_bytes),
        mebibytes(sled_bytes),
        mebibytes(on_disk)
    );
    let amplification = on_disk as f64 / body_bytes as f64;
    let without_snapshots =
        on_disk.saturating_sub(snapshot_bytes + previous_bytes) as f64 / body_bytes as f64;
    println!(
        "space amplification: {amplification:.3}x the encoded events ({:.3}x without the snapshots); target <= {TARGET_SPACE_AMPLIFICATION}x: {}",
        without_snapshots,
        if amplification <= TARGET_SPACE_AMPLIFICATION { "met" } else { "MISSED" }
    );
    snapshot_bytes
}

// ---------------------------------------------------------------------------------------------
// Section 2: open time of a database with a long history.

/// Writes `events` usage events as fast as possible (no fsync: this builds history, it is not
/// a durability figure) from 2 threads.
fn write_history(target: &Target<'_>, events: u64, settings: &Settings) -> Sample {
    let budget = Settings {
        events_per_measure: events,
        measure_time: Duration::from_secs(3_600),
        batches: Vec::new(),
        threads: Vec::new(),
        in_flight: Vec::new(),
        sections: String::new(),
        dir: settings.dir.clone(),
        ..*settings
    };
    // Batches split the count evenly between the 2 threads, so exactly `events` are written.
    let batch = (events / 2).clamp(1, 10_000) as usize;
    drive(target, Calls::Many(batch), 2, &budget)
}

/// Median seconds of an open, and of closing again without having written anything; and
/// where each open's time went.
struct OpenFigures {
    open_seconds: f64,
    close_seconds: f64,
    reports: Vec<OpenReport>,
}

/// Opens the database `opens` times. Periodic checkpoints are off, so an open that replays a
/// tail does not write a checkpoint and change the next open.
fn median_open_seconds(database: &Path, settings: &Settings) -> OpenFigures {
    let (mut opens, mut closes, mut reports) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..settings.opens {
        // A restart is a new process; let this process's previous sled threads let go of the
        // directory lock first, so the lock-retry sleep is not counted as open time.
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let engine = open_engine(database, Durability::Sync, u64::MAX);
        opens.push(started.elapsed().as_secs_f64());
        reports.extend(engine.open_report());
        // Closing flushes durably: the first flush after an open is also what the first `Sync`
        // commit pays.
        let started = Instant::now();
        drop(engine);
        closes.push(started.elapsed().as_secs_f64());
    }
    OpenFigures {
        open_seconds: median(&mut opens),
        close_seconds: median(&mut closes),
        reports,
    }
}

/// Opens the database in a new process each time, as a restart does, `settings.opens` times:
/// the median seconds and each open's report. A new process starts on fresh memory (every page
/// of the state faults in), which the opens in this process do not see.
fn new_process_opens(database: &Path, settings: &Settings) -> (f64, Vec<String>) {
    let mut seconds = Vec::new();
    let mut reports = Vec::new();
    for _ in 0..settings.opens {
        std::thread::sleep(Duration::from_millis(200));
        let output = std::process::Command::new(std::env::current_exe().expect("this program"))
            .env(OPEN_ONCE, database)
            .output()
            .expect("running the open in a new process");
        let text = String::from_utf8_lossy(&output.stdout);
        let (open, report) = text.trim().split_once(' ').unwrap_or_else(|| {
            panic!(
                "the new process ({}) printed {text:?}; its errors: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        });
        seconds.push(open.parse::<f64>().expect("seconds"));
        reports.push(report.to_string());
    }
    (median(&mut seconds), reports)
}

/// Set to a database path, this program only opens it once and prints the seconds and the
/// open's report (see `new_process_opens`).
const OPEN_ONCE: &str = "TALLY_BENCH_OPEN_ONCE";

fn open_once(database: &Path) {
    let started = Instant::now();
    let engine = open_engine(database, Durability::Sync, u64::MAX);
    let seconds = started.elapsed().as_secs_f64();
    let report = engine.open_report().expect("an opened engine has a report");
    println!("{seconds:.3} {report}");
    drop(engine);
}

/// How many segment files the log has.
fn segment_files(database: &Path) -> usize {
    std::fs::read_dir(database.join("events")).map_or(0, |entries| entries.count())
}

fn print_open(what: &str, figures: &OpenFigures, database: &Path, settings: &Settings) {
    let open = figures.open_seconds;
    println!(
        "open, {what}: {open:.3} s; target <= {TARGET_OPEN_SECONDS} s: {}",
        if open <= TARGET_OPEN_SECONDS {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "  closing it again without writing: {:.3} s ({} segment files)",
        figures.close_seconds,
        segment_files(database)
    );
    for report in &figures.reports {
        println!("  one open: {report}");
    }
    let (restart, reports) = new_process_opens(database, settings);
    println!(
        "  opened in a new process each time (a restart): {restart:.3} s; target <= {TARGET_OPEN_SECONDS} s: {}",
        if restart <= TARGET_OPEN_SECONDS {
            "met"
        } else {
            "MISSED"
        }
    );
    for report in reports {
        println!("  one open: {report}");
    }
}

fn open_times(settings: &Settings) {
    let keys = Keys::new(settings.keys);
    let dir = TempDir::new(settings, "history");
    let database = dir.0.join("db");
    create_database(&database, &keys);
    // The history spans a day whatever its length, so the 5-hour windows hold a realistic part.
    let timeline = Timeline {
        base_ms: BASE_MS,
        ms_per_million_events: HISTORY_MS_PER_MILLION_AT_10M * 10_000_000
            / settings.history_events.max(1),
    };
    let cursor = AtomicU64::new(0);
    println!();
    println!(
        "## Open time: {} events of history over 24 h, {} keys; median of {} opens (warm page cache)",
        settings.history_events, settings.keys, settings.opens
    );
    let engine = open_engine(&database, Durability::None, u64::MAX);
    let target = Target {
        engine: &engine,
        keys: &keys,
        timeline,
        cursor: &cursor,
        sync_at_end: true,
    };
    let history = write_history(&target, settings.history_events, settings);
    let started = Instant::now();
    engine.close().expect("closing after the history");
    println!(
        "history written in {:.1} s: {} events/s, {:.0} B written per event (Durability::None, consume_many batches of up to 10,000 x 2 threads); close() with its checkpoint {:.3} s",
        history.elapsed.as_secs_f64(),
        millions(history.events_per_second()),
        history.written_bytes as f64 / history.events.max(1) as f64,
        started.elapsed().as_secs_f64()
    );
    space_report(&database);
    let checkpointed = median_open_seconds(&database, settings);
    print_open(
        "snapshot covers everything",
        &checkpointed,
        &database,
        settings,
    );

    let engine = open_engine(&database, Durability::None, u64::MAX);
    let target = Target {
        engine: &engine,
        keys: &keys,
        timeline,
        cursor: &cursor,
        sync_at_end: true,
    };
    write_history(&target, settings.tail_events, settings);
    // Dropping without close() leaves the tail after the last checkpoint, as a crash would.
    drop(engine);
    let with_tail = median_open_seconds(&database, settings);
    let what = format!("{} events after the last checkpoint", settings.tail_events);
    print_open(&what, &with_tail, &database, settings);
    // With the default options an open that replayed more than half the interval leaves a
    // checkpoint due, which its first commit takes: measured once, since that changes the
    // database.
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let engine = open_engine(
        &database,
        Durability::Sync,
        OpenOptions::default().checkpoint_every_events,
    );
    println!(
        "open with default options (replays the tail; the first commit after it checkpoints): {:.3} s",
        started.elapsed().as_secs_f64()
    );
    drop(engine);
}

// ---------------------------------------------------------------------------------------------

fn main() {
    if let Some(database) = std::env::var_os(OPEN_ONCE) {
        open_once(Path::new(&database));
        return;
    }
    let settings = Settings::from_env();
    let started = Instant::now();
    let body = usage_event_bytes(&settings);
    println!(
        "# tally durability benchmark{}",
        if settings.quick {
            " (quick: --test / TALLY_BENCH_QUICK)"
        } else {
            ""
        }
    );
    println!(
        "encoded UsageAdmitted event: {} B body ({} of them zero bytes), {} B framed in a record (2 limits, key of {} B)",
        body.len(),
        body.iter().filter(|&&byte| byte == 0).count(),
        body.len() + EVENT_FRAME_BYTES,
        Keys::new(1).key(0).len()
    );
    // The machines are shared: the load says how much of the 2 cores this run really had.
    println!("load average at the start {}", load_average());
    if settings.sections.contains("throughput") {
        let section = Instant::now();
        throughput(&settings, &body);
        println!("(section: {:.1} s)", section.elapsed().as_secs_f64());
    }
    if settings.sections.contains("open") {
        let section = Instant::now();
        open_times(&settings);
        println!("(section: {:.1} s)", section.elapsed().as_secs_f64());
    }
    println!();
    println!(
        "total {:.1} s; load average at the end {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}
