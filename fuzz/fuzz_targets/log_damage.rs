//! A small real database whose log segments and snapshots the input damages (bytes flipped,
//! set or zeroed, files cut short, grown or removed), then opened: no panic, a refusal is a
//! storage error that `verify` reports too, and an open that succeeds holds exactly the
//! acknowledged top-ups up to the damage, never one twice, never one skipped in the middle.
//!
//! Two templates are built once per process, every top-up acknowledged in `Sync` mode (with
//! usage events, request ids and open reservations among them, on the plan's quota): one
//! copied while the engine was still open (as a crash leaves it: the last segment ends in the
//! zeros written ahead, no clean close recorded) and the same database after a clean close.
//! After a clean close every top-up must come back. After the crash, only events at or past
//! the first damaged byte of the last segment may be cut off (a torn tail there cannot be told
//! from a write that never finished), and none a snapshot covers. A database that opened opens
//! again (after a clean close) to the same balance and the same events.
//!
//! Input: byte 0 picks the template; then 6-byte operations `[kind, file, offset u16 LE,
//! value, length]` on the database's segment and snapshot files (in name order). One kind
//! makes a damaged frame's or snapshot's checksum sound again, so the decoders and the
//! replay's checks see the damage: then only no panic, and a storage error, are asked.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tally_engine::{
    Durability, Engine, EventBody, ManualClock, OpenOptions, Policy, Unit, UsageRequest,
};

const T0_MS: u64 = 1_795_363_200_000;
const TEAM: &str = "@u0";
/// Top-ups of 2^i micros: the balance says exactly which of them an open kept.
const TOP_UPS: u32 = 24;
/// A checkpoint after this many top-ups (a snapshot in the middle, a segment after it).
const CHECKPOINT_AFTER: u32 = 12;

struct Template {
    dir: PathBuf,
    /// Whether the template was closed cleanly (else copied as a crash leaves it).
    clean: bool,
    /// The latest snapshot's sequence number.
    snapshot_seq: u64,
    /// The last segment's name and its records: first event, start and end offsets.
    last_segment: String,
    records: Vec<(u64, u64, u64)>,
    /// Each top-up's sequence number, in order.
    top_up_seqs: Vec<u64>,
}

struct Templates {
    crashed: Template,
    clean: Template,
}

fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("tally-fuzz-log-damage-{}", std::process::id()))
}

fn options() -> OpenOptions {
    OpenOptions {
        durability: Durability::Sync,
        segment_bytes: 512,
        checkpoint_every_events: u64::MAX,
        ..OpenOptions::default()
    }
}

fn open(dir: &Path) -> Result<Engine, tally_engine::Error> {
    Engine::open(
        dir,
        Policy::token_plan(),
        Arc::new(ManualClock::new(T0_MS)),
        options(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a copy");
    for entry in std::fs::read_dir(from).expect("read a directory") {
        let entry = entry.expect("an entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// The segment and snapshot files, in name order.
fn damageable(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["events", "snapshots"] {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join(sub))
            .expect("a database directory")
            .map(|entry| entry.expect("an entry").path())
            .collect();
        names.sort();
        files.extend(names);
    }
    files
}

/// Each record of a segment: its first event, where it starts and ends (zeros end the records).
fn record_starts(path: &Path) -> Vec<(u64, u64, u64)> {
    let bytes = std::fs::read(path).expect("a segment");
    let mut at = 32;
    let mut starts = Vec::new();
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            break;
        }
        let first = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
        starts.push((first, at as u64, (at + 8 + len) as u64));
        at += 8 + len;
    }
    starts
}

fn latest_snapshot_seq(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("snapshots"))
        .expect("snapshots")
        .filter_map(|entry| {
            entry
                .ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".snap")?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

fn describe(dir: PathBuf, clean: bool, top_up_seqs: Vec<u64>) -> Template {
    let events = damageable(&dir)
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect::<Vec<_>>();
    let last = events.last().expect("a segment").clone();
    Template {
        snapshot_seq: latest_snapshot_seq(&dir),
        last_segment: last
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned(),
        records: record_starts(&last),
        top_up_seqs,
        clean,
        dir,
    }
}

/// Removes the scratch directories of runs that ended (libFuzzer exits without cleaning up).
fn remove_stale_scratch() {
    let root = scratch_root();
    let (Some(parent), Some(name)) = (root.parent(), root.file_name()) else {
        return;
    };
    let prefix = name
        .to_string_lossy()
        .rsplit_once('-')
        .map(|(prefix, _)| format!("{prefix}-"));
    let Some(prefix) = prefix else {
        return;
    };
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(&prefix) {
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn build() -> Templates {
    remove_stale_scratch();
    let root = scratch_root();
    let _ = std::fs::remove_dir_all(&root);
    let live = root.join("live");
    let engine = open(&live).expect("a new database");
    engine.create_user("u0", "k0", Some(T0_MS)).expect("a user");
    engine
        .assign_seat(TEAM, "u0", "Plus", Some(T0_MS))
        .expect("a seat");
    // Usage events, with and without request ids, and an open reservation among the top-ups,
    // all taken from the plan's quota (the balance is the top-ups' alone).
    let one = [(Unit::Requests, 1)];
    for i in 0..TOP_UPS {
        if i == CHECKPOINT_AFTER {
            engine.checkpoint().expect("a checkpoint");
        }
        let at_ms = T0_MS + u64::from(i);
        engine.top_up(TEAM, 1 << i, Some(at_ms)).expect("a top-up");
        let id = format!("r{i}");
        let request = UsageRequest::new("k0", "m2.7", &one).at(at_ms);
        match i % 3 {
            0 => drop(engine.consume(&request).expect("a consume")),
            1 => drop(engine.consume(&request.id(&id)).expect("a consume")),
            _ => drop(engine.reserve(&request, None).expect("a reservation")),
        }
    }
    assert_eq!(
        engine.credits_micros(TEAM).expect("a balance"),
        (1 << TOP_UPS) - 1,
        "only the top-ups move the balance"
    );
    let top_up_seqs: Vec<u64> = engine
        .events_after(0, usize::MAX)
        .expect("the events")
        .into_iter()
        .filter(|event| matches!(event.body, EventBody::CreditsToppedUp { .. }))
        .map(|event| event.seq)
        .collect();
    assert_eq!(top_up_seqs.len(), TOP_UPS as usize);
    // Every top-up was acknowledged (Sync): a copy now is what a crash leaves.
    let crashed = root.join("crashed");
    copy_dir(&live, &crashed);
    engine.close().expect("a clean close");
    let clean = root.join("clean");
    copy_dir(&live, &clean);
    Templates {
        crashed: describe(crashed, false, top_up_seqs.clone()),
        clean: describe(clean, true, top_up_seqs),
    }
}

fn templates() -> &'static Templates {
    static TEMPLATES: OnceLock<Templates> = OnceLock::new();
    TEMPLATES.get_or_init(build)
}

/// Makes the checksum of what holds `at` sound again: the frame of a segment (its length
/// kept), or a snapshot's body (its header's length and crc): damage a crc cannot show, to
/// reach the decoders and the replay's checks.
fn reseal(path: &Path, bytes: &mut [u8], at: usize) {
    if path.extension().is_some_and(|ext| ext == "snap") {
        if bytes.len() >= 32 {
            let len = (bytes.len() - 32) as u64;
            bytes[20..28].copy_from_slice(&len.to_le_bytes());
            let crc = crc32fast::hash(&bytes[32..]);
            bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        }
        return;
    }
    let mut start = 32;
    while start + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[start..start + 4].try_into().expect("4 bytes")) as usize;
        let end = start + 8 + len;
        if len == 0 || end > bytes.len() {
            return;
        }
        if at < end {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&bytes[start..start + 4]);
            hasher.update(&bytes[start + 8..end]);
            let crc = hasher.finalize();
            bytes[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
            return;
        }
        start = end;
    }
}

/// Applies the operations to the copy in `dir`; returns the lowest offset of the last segment
/// they touched (`u64::MAX`: none; 0: the file removed) and whether a checksum was made sound
/// over damage.
fn damage(dir: &Path, template: &Template, ops: &[u8]) -> (u64, bool) {
    let mut lowest = u64::MAX;
    let mut resealed = false;
    for op in ops.chunks_exact(6).take(8) {
        let files = damageable(dir);
        if files.is_empty() {
            break;
        }
        let path = &files[usize::from(op[1]) % files.len()];
        let mut bytes = std::fs::read(path).expect("a file");
        let is_last = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy() == template.last_segment);
        // Offsets fall mostly on the records (the last segment holds 1 MiB of zeros ahead).
        let span = bytes.len().min(4096) + 1;
        let at = usize::from(u16::from_le_bytes([op[2], op[3]])) % span;
        let (value, len) = (op[4], usize::from(op[5]) % 64 + 1);
        let touched = match op[0] % 7 {
            0 => {
                if let Some(byte) = bytes.get_mut(at) {
                    *byte ^= value.max(1);
                }
                at
            }
            1 => {
                if let Some(byte) = bytes.get_mut(at) {
                    *byte = value;
                }
                at
            }
            2 => {
                bytes.truncate(at);
                at
            }
            3 => {
                let end = (at + len).min(bytes.len());
                bytes.get_mut(at..end).map(|range| range.fill(0));
                at
            }
            4 => {
                let grown = bytes.len();
                bytes.extend(std::iter::repeat_n(value, len));
                grown
            }
            5 => {
                reseal(path, &mut bytes, at);
                resealed = true;
                at
            }
            _ => {
                std::fs::remove_file(path).expect("remove a file");
                if is_last {
                    lowest = 0;
                }
                continue;
            }
        };
        std::fs::write(path, bytes).expect("write a file");
        if is_last {
            lowest = lowest.min(touched as u64);
        }
    }
    (lowest, resealed)
}

fn check(template: &Template, ops: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = scratch_root().join(format!("case-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&template.dir, &dir);
    let (lowest, resealed) = damage(&dir, template, ops);
    let verified = Engine::verify(&dir, options());
    let opened = open(&dir);
    match opened {
        Err(error) => {
            assert!(
                matches!(error, tally_engine::Error::Storage { .. }),
                "a damaged database is refused as a storage error: {error:?}"
            );
            if let Ok(report) = &verified {
                assert!(
                    !report.is_sound(),
                    "verify finds sound what an open refuses ({error}): {report:?}"
                );
            }
        }
        // Damage under a sound checksum reads as what was written: only no panic, and a
        // refusal a storage error, are asked of it.
        Ok(engine) if resealed => engine.close().expect("closes"),
        Ok(engine) => {
            // A team not there held nothing (an open that lost every event, below).
            let balance = match engine.credits_micros(TEAM) {
                Err(tally_engine::Error::UnknownTeam { .. }) => 0,
                other => other.expect("a balance"),
            };
            let kept = u64::BITS - balance.leading_zeros();
            assert_eq!(
                balance,
                (1u64 << kept) - 1,
                "the top-ups kept are the first {kept}, none skipped or counted twice"
            );
            // The top-ups that must be there: all after a clean close; after a crash, those
            // recorded wholly before the first damaged byte of the last segment (all of them
            // if it was not touched) and those the snapshot covers.
            let must = if template.clean || lowest == u64::MAX {
                TOP_UPS
            } else {
                // The record holding the first damaged byte, and every one after it, may be
                // cut off (a removed last segment is refused: the log had reached it).
                let floor = template
                    .records
                    .iter()
                    .find(|record| record.2 > lowest)
                    .map_or(u64::MAX, |record| record.0 - 1)
                    .max(template.snapshot_seq);
                template
                    .top_up_seqs
                    .iter()
                    .filter(|&&seq| seq <= floor)
                    .count() as u32
            };
            assert!(
                kept >= must,
                "{kept} top-ups kept, but {must} were acknowledged before the damage"
            );
            // What the open recovered is what the database now holds: closed and opened
            // again, the same balance and the same events (a recovery that cut a torn tail
            // does not cut again, nor bring anything back).
            let events = engine.events_after(0, usize::MAX).ok();
            engine.close().expect("closes");
            let again = open(&dir).unwrap_or_else(|error| {
                panic!("a database that opened after damage is refused on reopen: {error}")
            });
            let balance_again = match again.credits_micros(TEAM) {
                Err(tally_engine::Error::UnknownTeam { .. }) => 0,
                other => other.expect("a balance"),
            };
            assert_eq!(balance_again, balance, "the balance changed on reopen");
            let events_again = again.events_after(0, usize::MAX).ok();
            assert!(events_again == events, "the events changed on reopen");
            again.close().expect("closes");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, ops)) = data.split_first() else {
        return;
    };
    let templates = templates();
    let template = if which & 1 == 0 {
        &templates.crashed
    } else {
        &templates.clean
    };
    check(template, ops);
});
