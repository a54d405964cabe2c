//! What the event log costs beside a caller appending at a steady rate (a gateway that is busy
//! but not flat out): one thread appends an event every GAP microseconds (spinning in between),
//! and the process's CPU time beyond that thread's own wall time is what the log spent, on the
//! writer thread and in wake-ups. Linux only (reads `/proc/self/stat`).
//! `cargo run --release --example pacedloop -- [GAP_US] [EVENTS] [none|interval|sync]`
//! (defaults 10, 100000, interval: `Durability::Interval { ms: 10 }`).
//!
//! `sync` is a lone `Sync` caller instead: it sleeps out the gap after each event and waits
//! for the event's flush, and the figure is the whole process's CPU time per event (the
//! caller's and the writer's polls, `WRITER_POLL` and `CALLER_POLL_MAX` in `log.rs`, among
//! it): what a quiet gateway's log costs.
use std::time::{Duration, Instant};

use tally_engine::event::encode_body;
use tally_engine::log::EventLog;
use tally_engine::{Durability, EventBody};

/// User plus system CPU time of the whole process so far, in seconds (clock ticks of 10 ms).
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a command name")
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gap_us: u64 = args.next().map_or(10, |arg| arg.parse().expect("GAP_US"));
    let events: u64 = args
        .next()
        .map_or(100_000, |arg| arg.parse().expect("EVENTS"));
    let durability = match args.next().as_deref() {
        None | Some("interval") => Durability::Interval { ms: 10 },
        Some("none") => Durability::None,
        Some("sync") => Durability::Sync,
        Some(other) => panic!("mode {other:?}: none, interval or sync"),
    };
    let dir = std::env::temp_dir().join(format!("tally-pacedloop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory");
    let log = EventLog::open(&dir, durability, None).expect("open the log");
    let body = encode_body(&EventBody::CreditsToppedUp {
        team: "acme".into(),
        micros: 1,
    });
    let cpu_before = process_cpu_s();
    let start = Instant::now();
    if durability == Durability::Sync {
        for _ in 0..events {
            std::thread::sleep(Duration::from_micros(gap_us));
            let seq = log.append(1_000, &body).expect("append");
            log.wait(seq).expect("the flush");
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = process_cpu_s() - cpu_before;
        println!(
            "Sync, one caller sleeping {gap_us} us between events: {events} events in {wall:.2} \
             s; {cpu:.3} s of CPU, {:.1} us per event, {:.1}% of a core",
            cpu * 1e6 / events as f64,
            cpu * 100.0 / wall
        );
    } else {
        for event in 0..events {
            let due = start + Duration::from_micros(event * gap_us);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            log.append(1_000, &body).expect("append");
        }
        let wall = start.elapsed().as_secs_f64();
        let beyond = process_cpu_s() - cpu_before - wall;
        println!(
            "{durability:?}, an event every {gap_us} us: {events} events in {wall:.2} s; the \
             log spent {beyond:.3} s of CPU beside the caller, {:.2} us per event",
            beyond * 1e6 / events as f64
        );
    }
    log.close().expect("close the log");
    let _ = std::fs::remove_dir_all(&dir);
}
