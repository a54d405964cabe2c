//! The event log: append-only segment files, group commit, durability modes, snapshots, cursors
//! and compaction.
//!
//! Callers append encoded events to a queue (a short mutex: the sequence number is assigned
//! there, so the queue's order is the log's order). One writer thread drains the queue, packs
//! the events into records of at most `MAX_RECORD_BYTES`, appends the whole group to the active
//! segment file with one `write` and — in `Sync` mode — one `fdatasync` (over zeros written
//! ahead, so that most fdatasyncs do not also commit a new file length: `ZEROED_AHEAD_BYTES`).
//! Callers in `Sync` mode wait until their sequence number is durable; everyone in a group
//! shares one `fdatasync`, so throughput grows with concurrency and with `consume_many`'s
//! batches. A `Sync` writer with nothing queued polls briefly before it sleeps
//! (`WRITER_POLL`), and a lone caller waiting for a batch's flush polls for it before it parks
//! (`CALLER_POLL_MAX`): on these machines a thread's wake-up can cost as much as the flush.
//!
//! On disk, under the database directory:
//! - `events/<first seq, 20 digits>.seg`: the log. A segment starts with a 32-byte header
//!   (`TALLYLOG`, format version, its first sequence number, a crc) and holds frames
//!   `[payload length u32 LE][crc32 of length and payload u32 LE][payload]`, each payload one
//!   record of consecutive events (`event::encode_record_into`); the running last segment may
//!   end in zeros written ahead, which read as the end of the log. A segment is sealed (fsynced,
//!   never written again) when it passes `OpenOptions::segment_bytes` (default `SEGMENT_BYTES`,
//!   64 MiB) or when a checkpoint asks for a new one (so segments end at snapshots and
//!   compaction can drop whole files).
//! - `snapshots/<seq, 20 digits>.snap`: checkpoints, written to a temporary file, fsynced and
//!   renamed (then the directory fsynced); the latest two are kept.
//! - sled, for what is small and keyed: `meta` (the format version, the options the database
//!   was last opened with: `options::RecordedOptions`, the last event a clean close found
//!   durable, the newest segment recorded as created, and when events were logged:
//!   `logged_by/<seq>`, one per checkpoint, and the latest one's request-id bound,
//!   `ids_forgotten_before`) and `cursors` (named export cursors, at most
//!   `MAX_CURSORS`). sled's file lock also keeps a second process out of the directory.
//!
//! Opening scans the last segment. Zeros from a frame's start to the end of the file are the
//! end of the log (unless a snapshot or a clean close found the log durable past there: then
//! they are damage). A record whose length or crc is wrong is otherwise taken for a torn
//! write from a crash (its `fdatasync` never finished, so it was never acknowledged) and is
//! truncated away with everything after it, when nothing says its events were durable. Each
//! record carries the writer's durable point as it was written
//! (`event::RecordView::durable_before`), so a sound record after it that was written once its
//! events were durable says so; so does a snapshot at or after its events (snapshots are
//! stored once the log is durable up to them), and a clean close that found the log durable
//! through them (`durable_through` in `meta`: the records of the last write before it do not
//! show each other durable). What is left, a bad record in the last write before a crash, is
//! taken for a torn write. (A power loss can leave a later write on disk and an earlier one of
//! the same unsynced stretch torn: the drive need not keep their order.) A bad record shown
//! durable, or anywhere in an earlier segment, is damage and an error naming the file, offset
//! and sequence number.
//!
//! After a write or flush error the log is failed: every later append is refused until the
//! engine is reopened. In `Sync` mode the bytes written since the last durable point (the failed
//! group's and those of groups written before it, not yet flushed) are truncated away again and
//! their callers, still waiting, get the error and undo their in-memory effect, so memory never
//! runs ahead of disk. In the other modes a call was already answered when its event was
//! queued: a failed write's group is truncated away, a failed fdatasync leaves what was written
//! since the last good one to the kernel, and their effects stay in memory (not, or not surely,
//! on disk) until the reopen — the loss those modes accept.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::Error;
use crate::event::{
    decode_raw, encode_record_into, event_bytes_at_most, Event, RawEvent, Record, RecordError,
    RecordView, FORMAT_VERSION, OLDEST_FORMAT_VERSION, RECORD_HEADER_BYTES,
    RECORD_HEADER_BYTES_MIN,
};

/// A record's payload is at most this long (a group commit larger than this is several records
/// in the same write).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// A single event body is bounded too (a policy document is the largest).
pub const MAX_EVENT_BYTES: usize = 48 * 1024;
/// What is wrong where log segment `first` follows segment `previous` (named by their first
/// events), whose events end before `expected`: `None` when it starts at `expected`; else a gap
/// (events missing between them) or an overlap (events both segments hold: one from another
/// log, or a copy of the other's), each naming both segments and their events. An overlap was
/// reported as events missing, sending an operator to look for events that were there twice.
fn segment_boundary_problem(previous: u64, expected: u64, first: u64) -> Option<String> {
    let held = match expected.checked_sub(1).filter(|last| *last >= previous) {
        Some(last) => format!("events {previous} to {last}"),
        None => "no events".to_string(),
    };
    match first.cmp(&expected) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(format!(
            "log segment {} ({held}) is followed by log segment {}, which starts at event \
             {first}: a gap, events {expected} to {} are missing",
            segment_name(previous),
            segment_name(first),
            first - 1
        )),
        std::cmp::Ordering::Less => Some(format!(
            "log segments {} ({held}) and {} (from event {first}) overlap: events {first} to {} \
             are in both (a segment from another log, or a copy of one)",
            segment_name(previous),
            segment_name(first),
            expected - 1
        )),
    }
}

/// Why a record read where event `expected` comes next is damage: it starts elsewhere, or it
/// holds no events (the writer never writes one).
fn out_of_place(view: &RecordView<'_>, expected: u64) -> String {
    if view.count == 0 {
        "it holds no events".to_string()
    } else {
        format!(
            "it holds events {} to {} where event {expected} comes next",
            view.first_seq,
            view.last_seq()
        )
    }
}

/// What a record is when `RecordView::parse` refuses its header.
const NO_SOUND_HEADER: &str = "a record without a sound header (too short, numbering its events \
     from 0 or past 2^64, or saying events after its own first were durable)";
/// Events queued but not yet written, at most: an append waits for room beyond this. The writer
/// takes the whole queue at once, and appends refill it while it writes that group, so in the
/// modes that do not wait for durability a process crash loses at most twice this many
/// acknowledged events (written ones are in the kernel's hands: a power loss, not a process
/// crash, loses those not yet flushed).
pub const MAX_QUEUED_EVENTS: usize = 16_384;
/// `append_staged` wakes a sleeping writer once this many events are queued (see there), and
/// an append wakes a dozing one (see `WRITER_DOZE`).
pub const WAKE_WRITER_AT_EVENTS: usize = 1024;
/// In `None` and `Interval` modes the writer, finding the queue empty, first waits this long
/// (an interval is at least as long) for more events without asking to be woken, and only then sleeps
/// until an append wakes it. Under a steady stream of single appends nobody pays a wake-up
/// (a futex call and a context switch: in `examples/manyloop` with batches of one, about half
/// the calling thread's time went to the kernel waking the writer); an event queued while the
/// writer is idle waits at most this long to be written (while it writes or fdatasyncs, until
/// it is done).
pub const WRITER_DOZE: Duration = Duration::from_millis(1);
/// `Sync`: the writer, finding the queue empty, first polls it this long before it sleeps.
/// A wake-up costs far more here than a futex call: these machines' idle vCPUs halt at once
/// (the guest's halt polling is off), and a halted vCPU runs only once the host gets to it.
/// Polling, the writer writes each chunk a `consume_many` queues while the caller decides the
/// next one, and is awake when the caller asks for the flush. The poll is this long while the
/// writer's idle stretches are this short; once one is longer, it halves with each such stretch,
/// down to none (an engine called now and then does not keep a core busy: `examples/pacedloop`
/// in `sync` mode, an event every 5 ms, 1.9-2.1% of a core, as without the poll), and is full
/// again after a short one. Figures with `CALLER_POLL_MAX` (benches/README, 2026-12-06).
const WRITER_POLL: Duration = Duration::from_micros(100);
/// `Sync`: a caller whose wait serves at least `CALLER_POLL_EVENTS` events (a `consume_many`'s
/// batch, a submission's completion with many in flight: `wait_for`) polls for the flush
/// before it parks, for twice the last fdatasync's time and 100 us more, at most this
/// long, and not at all when the last fdatasync took longer (on a disk that slow a wake-up is a
/// small part of the wait). Only one caller polls at a time, and it stops as soon as another
/// thread appends: that one is busy, and may need the core. One thread's `consume_many(1000)`
/// in the durability bench went from 1.60-1.65 to 1.86-2.02 M events/s with both polls, its
/// `consume_many(100)` from 0.41-0.47 to 0.62-0.66; the rows with more threads than cores did
/// not move; one thread submitting with 256 in flight, from 0.82 to 0.94-1.04.
const CALLER_POLL_MAX: Duration = Duration::from_millis(1);
/// A caller polls (`CALLER_POLL_MAX`) only when its wait serves at least this many events:
/// the poll's time is then a small part of each event's. A lone caller of single events gained
/// nothing from it (`examples/pacedloop` in `sync` mode, back to back: 133 us per event either
/// way) and spent four times the CPU.
const CALLER_POLL_EVENTS: usize = 64;
/// A poll yields its core every this many looks (about every 5 us; `pause_or_yield`): a thread
/// woken on the same core, which may be the one the poll waits for, runs then instead of after
/// the poller's time slice. Polling with pauses alone, the durability bench's 256-thread
/// `consume` row admitted a third to two thirds as many events per second (an earlier attempt
/// was rejected for it: benches/README); yielding at every look, a lone caller gained half as
/// much.
const POLL_YIELD_EVERY: u32 = 8;
/// `Sync`: written events are fdatasynced once this many bytes wait, even before a caller asks
/// (bounds the flush a caller waits for).
const SYNC_AFTER_BYTES: u64 = 4 << 20;
/// A segment is sealed and a new one started once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// `Sync`: the active segment is written ahead with zeros this many bytes at a time, and the
/// groups are written over them. An fdatasync after a write that grows the file must commit
/// the file's new size (a journal commit: 190-280 us per flush of a 6-50 KB write on these
/// machines' disk); one after a write over blocks already written and durable has only the
/// data to flush (110-140 us; benches/README). So one flush per zeroed stretch pays the
/// commit, not every one.
const ZEROED_AHEAD_BYTES: u64 = 1 << 20;
/// The longest `Durability::Interval`: the time from the end of one background fdatasync to the
/// next. A power loss loses what was written since the last one that completed: this long, plus
/// the time the writer's write and fdatasync take.
pub const MAX_FLUSH_INTERVAL_MS: u64 = 60_000;
/// The most export cursors a database keeps. A cursor is a billing reader's place in the log:
/// a handful are expected, and each name is up to 128 bytes in sled, so any count past this is
/// a caller minting names (one per run, per request) rather than saving its place. Saving a
/// cursor already saved always works, whatever the count.
pub const MAX_CURSORS: u64 = 1_024;
const SEGMENT_HEADER_BYTES: usize = 32;
const SEGMENT_MAGIC: &[u8; 8] = b"TALLYLOG";
/// A snapshot's header: magic (8 bytes), format version (2), the usage hint in units of
/// `SNAPSHOT_HINT_UNIT` (2; builds before it wrote 0 there and read nothing), the sequence
/// number it covers (8), the body's length (8) and the body's CRC-32 (4).
const SNAPSHOT_HEADER_BYTES: usize = 32;
const SNAPSHOT_MAGIC: &[u8; 8] = b"TALLYSNP";
/// The usage hint counts usage chunks (see `SnapshotBytes::usage_hint`).
const SNAPSHOT_HINT_UNIT: usize = crate::pages::HUGE_PAGE_BYTES;
/// At most this many bytes of usage hinted per byte of snapshot file. A key's entry in a
/// snapshot takes at least 47 bytes (its fixed fields, names apart) and its usage usually a
/// few KiB (the benchmark's keys: 3.5 bytes of usage per byte of snapshot), up to 16 KiB per
/// ring. A hint past the bound is taken as damage (the hint is outside the checksum) and cut
/// to it: at worst an open warms less than its keys then take.
const SNAPSHOT_HINT_PER_BYTE: u64 = 64;
const FRAME_BYTES: usize = 8;
const EVENTS_DIR: &str = "events";
const SNAPSHOTS_DIR: &str = "snapshots";
/// Reads of a segment go through a buffer of this size (a frame is at most `MAX_RECORD_BYTES`).
const READ_CHUNK_BYTES: usize = 4 << 20;
const LOCK_RETRIES: u32 = 50;
const LOCK_RETRY_DELAY: Duration = Duration::from_millis(20);

const META_FORMAT: &[u8] = b"format_version";
/// The options the database was last opened with (`options::RecordedOptions`, as JSON).
const META_OPTIONS: &[u8] = b"options";
/// The last event a clean close found durable (u64 LE): opening treats a bad record up to it as
/// damage, not a torn write (the records of one write need not say it: nothing was written
/// after its fdatasync).
const META_DURABLE_THROUGH: &[u8] = b"durable_through";
/// The first sequence number of the newest segment created (u64 LE: by the writer, or by an
/// open starting a log or going on in a segment not yet recorded), recorded once the segment
/// is durable: opening refuses a log whose last segment is older (the newest one, and the
/// events in it, removed), and a recorded segment's damaged header as damage. Databases
/// written before it have none until their next open.
const META_LAST_SEGMENT: &[u8] = b"last_segment";
/// Prefix of the keys that say when events were logged, on the engine's clock: the key
/// `logged_by/` + a sequence number (u64 BE, so the keys sort by it) holds a clock time in ms
/// (u64 LE) by which every event up to that number was logged: the time of a checkpoint's
/// cut, recorded once the log is durable through it (`record_logged_by`). Compaction keeps a
/// segment until the first such time at or after its last event is `retention_ms` old
/// (`compact`). A database an earlier build wrote has none for its segments: the first
/// checkpoint this build takes covers them. Earlier builds ignore the keys (no format change).
const META_LOGGED_BY: &[u8] = b"logged_by/";
/// The bound the request-id shards refused new ids stamped before at the latest checkpoint's
/// cut (`RequestTable::forgotten_before_ms`), recorded with its `logged_by/` record: the
/// checkpoint's sequence number then the bound in ms (u64 LE each). An id stamped before it
/// may have been forgotten before the cut, and is in neither the snapshot nor the log after
/// it. The open bounds forgotten ids by it rather than by the clock's readings, which a clock
/// glitched far ahead for a moment left far ahead for good. Earlier builds ignore the key;
/// one naming an earlier checkpoint than the snapshot's (an earlier build took the later
/// one) is not used.
const META_IDS_FORGOTTEN_BEFORE: &[u8] = b"ids_forgotten_before";

/// The last reservation id an engine on this log may hand out (u64 LE): one past it is
/// recorded here, durably, before it is handed out (`Engine::reserve`, a block at a time), and
/// an open hands out ids only after it. So an id acknowledged and then lost with its event (a
/// reservation a crash or a failed write took back, in `Interval` or `None` mode) is never
/// handed out again after the reopen, where the snapshot and the log end before it: its
/// caller's settle or void would have closed another key's reservation. Earlier builds
/// ignore the key.
const META_RESERVATION_IDS_THROUGH: &[u8] = b"reservation_ids_through";

/// When an acknowledged event is on disk, and what a crash can lose. A change is acknowledged
/// when the call that made it returns it (`consume`, each request of `consume_many` when the
/// batch returns, an admin call, `Submitted::complete` or `Engine::complete`; `submit` alone
/// acknowledges nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A call returns only after its event is written and fdatasynced; concurrent callers share
    /// one fdatasync (group commit), made when a caller waits for an event written since the
    /// last. A crash, even a power loss, loses nothing acknowledged: a failed write or
    /// fdatasync fails the calls waiting for it (their effects given back) and every later one.
    Sync,
    /// A call returns once its event is queued (an append waits while `MAX_QUEUED_EVENTS` are).
    /// The writer writes it within `WRITER_DOZE` when idle (at once if it was asleep), once its
    /// current write or fdatasync is done when busy, and starts the fdatasync of what it wrote
    /// at the latest `ms` after the oldest event in it was queued (acknowledged), at once if
    /// its last fdatasync ended `ms` ago or more (a lone event after a quiet spell): an event's
    /// flush starts within `ms` of its acknowledgement and ends when the disk is done, later
    /// only while an earlier write or fdatasync still runs at that time (a slow disk); at most
    /// one fdatasync starts per `ms` while events keep coming.
    ///
    /// A process crash loses the acknowledged events not yet written: those queued (at most
    /// `MAX_QUEUED_EVENTS`) and the group the writer took from the queue and is writing (as
    /// many again), so at most twice `MAX_QUEUED_EVENTS`. A power loss also loses the events
    /// written since the last fdatasync that completed. A write or fdatasync that fails cannot
    /// fail calls already answered: the log fails and every later call is refused with its
    /// error until the engine is reopened, while the events acknowledged before it (the failed
    /// write's group and those queued behind it; for a failed fdatasync, those written since the
    /// last good one) stay counted in memory and are missing, or may be, after the reopen.
    Interval { ms: u64 },
    /// No fsync of events at all (only when a segment is sealed, on `sync()` and when the log
    /// closes: `Engine::close` or dropping the engine, so a clean shutdown loses nothing). For
    /// tests and benchmarks: a process crash loses what it loses in `Interval` mode (the queued
    /// events and the group being written: at most twice `MAX_QUEUED_EVENTS`), a power loss
    /// whatever the kernel had not written back, and a failed write what it does there.
    None,
}

/// Faults to inject into the log's storage: for tests of error paths.
#[derive(Debug, Default)]
pub struct Faults {
    // Relaxed: counters read and decremented by the writer thread only; tests set them.
    fail_inserts: AtomicU64,
    fail_flushes: AtomicU64,
    // Read and decremented by compaction (one at a time).
    fail_removals: AtomicU64,
    // Read and decremented by the snapshot thread (one at a time).
    panic_snapshots: AtomicU64,
    // Read and decremented by the compaction after a periodic checkpoint (one at a time).
    panic_compactions: AtomicU64,
    /// The writer's fdatasyncs (see `hold_flushes`).
    flushes: Hold,
    /// Reads of the log files (see `hold_scans`).
    scans: Hold,
    /// Refunds and reservation closes between their give-back and their append (see
    /// `hold_give_backs`).
    give_backs: Hold,
    /// Records of the reservation ids handed out (see `hold_id_records`).
    id_records: Hold,
    // Read and decremented by a reserve recording a block of ids (one at a time).
    fail_id_records: AtomicU64,
}

/// A test's pause of one kind of step: while on, each step that reaches it waits (polling: a
/// test's pause, not a hot path) and is counted; for `HOLD_LIMIT` at most, so a test that
/// fails while it holds a step (its release never comes) ends instead of hanging, its engine's
/// threads waiting there forever.
#[derive(Debug, Default)]
struct Hold {
    // Relaxed: a test's switch, polled by the step.
    on: AtomicBool,
    // Relaxed: how many steps have waited so far; a test polls it.
    held: AtomicU64,
}

/// How long a `Hold` keeps a step waiting at most: far longer than any test holds one.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

impl Hold {
    fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    fn wait(&self) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        while self.on.load(Ordering::Relaxed) && start.elapsed() < HOLD_LIMIT {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// The next `count` group writes fail, after writing half their bytes (a short write).
    pub fn fail_next_inserts(&self, count: u64) {
        self.fail_inserts.store(count, Ordering::Relaxed);
    }

    /// The next `count` fdatasyncs of the log fail.
    pub fn fail_next_flushes(&self, count: u64) {
        self.fail_flushes.store(count, Ordering::Relaxed);
    }

    /// The next `count` removals of a segment file by compaction fail, leaving the file, as an
    /// I/O error would.
    pub fn fail_next_removals(&self, count: u64) {
        self.fail_removals.store(count, Ordering::Relaxed);
    }

    /// The next `count` snapshot threads (a periodic checkpoint's) panic before they store
    /// their snapshot, as a defect would.
    pub fn panic_next_snapshots(&self, count: u64) {
        self.panic_snapshots.store(count, Ordering::Relaxed);
    }

    /// The next `count` compactions after a periodic checkpoint (on its snapshot thread, its
    /// snapshot stored) panic, as a defect would.
    pub fn panic_next_compactions(&self, count: u64) {
        self.panic_compactions.store(count, Ordering::Relaxed);
    }

    /// The writer's fdatasyncs wait (before they start, and before an injected failure) until
    /// `release_flushes`: written events stay not yet durable for as long as a test needs.
    pub fn hold_flushes(&self) {
        self.flushes.set(true);
    }

    pub fn release_flushes(&self) {
        self.flushes.set(false);
    }

    /// How many fdatasyncs have waited at the hold so far.
    pub fn flushes_held(&self) -> u64 {
        self.flushes.held()
    }

    /// A read of the log files (`events_after`, replay) waits, once it has listed them, until
    /// `release_scans`: a test's window for compaction to run meanwhile.
    pub fn hold_scans(&self) {
        self.scans.set(true);
    }

    pub fn release_scans(&self) {
        self.scans.set(false);
    }

    /// How many reads of the log files have waited at the hold so far.
    pub fn scans_held(&self) -> u64 {
        self.scans.held()
    }

    /// A refund or a reservation's close (settle, void, expiry) waits once it has given back
    /// in memory what it frees, just before it appends its event, until `release_give_backs`:
    /// a test's window for other requests to act (and be logged) between the two.
    pub fn hold_give_backs(&self) {
        self.give_backs.set(true);
    }

    pub fn release_give_backs(&self) {
        self.give_backs.set(false);
    }

    /// How many refunds and closes have waited at the hold so far.
    pub fn give_backs_held(&self) -> u64 {
        self.give_backs.held()
    }

    /// A record of the reservation ids that may be handed out
    /// (`EventLog::record_reservation_ids_through`) waits before it writes, until
    /// `release_id_records`: a test's window to see what goes on during its flush.
    pub fn hold_id_records(&self) {
        self.id_records.set(true);
    }

    pub fn release_id_records(&self) {
        self.id_records.set(false);
    }

    /// The next `count` records of reservation ids (`EventLog::record_reservation_ids_through`)
    /// fail before they write, as an I/O error would.
    pub fn fail_next_id_records(&self, count: u64) {
        self.fail_id_records.store(count, Ordering::Relaxed);
    }

    /// How many records of reservation ids have waited at the hold so far.
    pub fn id_records_held(&self) -> u64 {
        self.id_records.held()
    }

    fn take(counter: &AtomicU64) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }
}

/// Where a snapshot is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPointer {
    /// The snapshot holds the effect of every event up to and including this one.
    pub seq: u64,
    /// The encoded snapshot's length (without the file's header).
    pub bytes: u64,
}

/// A snapshot file's bytes, which deref to its body (after the header). On Linux the file is
/// mapped read-only rather than read: its pages are already in the page cache (just written,
/// or read by the open), so mapping them costs neither a copy nor fresh memory the kernel must
/// clear, which in a new process is most of a read's time (59 MiB at 100,000 keys: 40-70 ms
/// read, measured). A snapshot file is never written after its rename into place, and the
/// database's lock keeps other tally processes out, so the mapping's bytes do not change
/// while it lives (from the read to the end of the decode). Elsewhere the file is read.
pub struct SnapshotBytes {
    file: FileBytes,
}

enum FileBytes {
    #[cfg(target_os = "linux")]
    Mapped {
        start: std::ptr::NonNull<u8>,
        len: usize,
    },
    Read(Vec<u8>),
}

// SAFETY: a read-only mapping owned by this value alone (unmapped in `drop`), like a `Vec`.
unsafe impl Send for SnapshotBytes {}
// SAFETY: only ever read.
unsafe impl Sync for SnapshotBytes {}

impl SnapshotBytes {
    fn read(path: &Path) -> std::io::Result<SnapshotBytes> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let file = File::open(path)?;
            let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
            if len == 0 {
                return Ok(SnapshotBytes {
                    file: FileBytes::Read(Vec::new()),
                });
            }
            // SAFETY: a fresh private read-only mapping of an open file, not aliased by any
            // Rust reference until this returns; MAP_POPULATE maps the cached pages at once.
            let start = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_POPULATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if start == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let start = std::ptr::NonNull::new(start.cast::<u8>())
                .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
            Ok(SnapshotBytes {
                file: FileBytes::Mapped { start, len },
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            Ok(SnapshotBytes {
                file: FileBytes::Read(std::fs::read(path)?),
            })
        }
    }

    /// A snapshot file's bytes already in memory (tests).
    #[cfg(test)]
    pub(crate) fn from_file(bytes: Vec<u8>) -> SnapshotBytes {
        SnapshotBytes {
            file: FileBytes::Read(bytes),
        }
    }

    /// How many bytes of usage the snapshot's keys took when it was cut, as its header says (0
    /// in snapshots written before the hint existed). Only a hint: it is outside the checksum,
    /// so it decides nothing but how much memory an open makes ready ahead (see
    /// `pages::Warmer`), and a damaged one is bounded by `SNAPSHOT_HINT_PER_BYTE` times the
    /// file's length.
    pub fn usage_hint(&self) -> usize {
        let file = self.file();
        let Some(hint) = file.get(10..12) else {
            return 0;
        };
        let hint = usize::from(u16::from_le_bytes([hint[0], hint[1]])) * SNAPSHOT_HINT_UNIT;
        let bound = u64::try_from(file.len())
            .unwrap_or(u64::MAX)
            .saturating_mul(SNAPSHOT_HINT_PER_BYTE);
        hint.min(usize::try_from(bound).unwrap_or(usize::MAX))
    }

    /// The whole file, header included.
    fn file(&self) -> &[u8] {
        match &self.file {
            #[cfg(target_os = "linux")]
            // SAFETY: `len` readable bytes mapped at `start` until `drop`.
            FileBytes::Mapped { start, len } => unsafe {
                std::slice::from_raw_parts(start.as_ptr(), *len)
            },
            FileBytes::Read(bytes) => bytes,
        }
    }
}

impl std::ops::Deref for SnapshotBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.file().get(SNAPSHOT_HEADER_BYTES..).unwrap_or(&[])
    }
}

impl Drop for SnapshotBytes {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let FileBytes::Mapped { start, len } = self.file {
            // SAFETY: mapped by `read` with this length; no slice of it outlives `self`.
            unsafe { libc::munmap(start.as_ptr().cast(), len) };
        }
    }
}

/// A queued event: its body is `bytes[previous end..end]` of the queue's arena.
#[derive(Debug, Clone, Copy)]
struct Queued {
    seq: u64,
    at_ms: u64,
    end: usize,
}

/// Events waiting for the writer. Bodies are copied into one arena at append, so the caller's
/// buffer is freed on its own thread (a cross-thread free is slow in glibc's allocator) and the
/// writer frees nothing per event.
#[derive(Debug, Default)]
struct Batch {
    events: Vec<Queued>,
    bytes: Vec<u8>,
}

impl Batch {
    fn body(&self, index: usize) -> &[u8] {
        let start = if index == 0 {
            0
        } else {
            self.events[index - 1].end
        };
        &self.bytes[start..self.events[index].end]
    }

    /// Empties the batch for reuse, keeping at most `QUEUE_KEPT_BYTES` of event bytes: a
    /// burst of large events (policy swaps of up to `MAX_EVENT_BYTES` each, up to
    /// `MAX_QUEUED_EVENTS` of them) would otherwise hold its hundreds of MiB for good.
    fn clear(&mut self) {
        self.events.clear();
        self.bytes.clear();
        self.bytes.shrink_to(QUEUE_KEPT_BYTES);
    }
}

/// Event bytes a queue buffer keeps between batches (see `Batch::clear`): 16,384 usage events
/// of about 50 bytes, a full queue of them, fit many times over.
const QUEUE_KEPT_BYTES: usize = 4 << 20;

/// Events one thread has encoded but not yet appended: a `consume_many` chunk, handed to
/// `append_staged` at once so the queue's lock is taken (and its line moved between cores) once
/// per chunk instead of once per event. Its buffers are reused from chunk to chunk.
#[derive(Debug, Default)]
pub struct Staged {
    /// Each event: its timestamp and where its body ends in `bytes`.
    events: Vec<(u64, usize)>,
    bytes: Vec<u8>,
}

impl Staged {
    /// Encodes one event with `encode` (which appends its body to the buffer it is given).
    /// An event larger than `MAX_EVENT_BYTES` is refused and nothing is staged.
    pub fn push_with(
        &mut self,
        at_ms: u64,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Error> {
        let start = self.bytes.len();
        encode(&mut self.bytes);
        let bytes = self.bytes.len() - start;
        if bytes > MAX_EVENT_BYTES {
            self.bytes.truncate(start);
            return Err(Error::invalid(
                "event",
                format!("{bytes} bytes; at most {MAX_EVENT_BYTES}"),
            ));
        }
        self.events.push((at_ms, self.bytes.len()));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The newest timestamp staged (0 if none).
    pub fn newest_at_ms(&self) -> u64 {
        self.events
            .iter()
            .map(|&(at_ms, _)| at_ms)
            .max()
            .unwrap_or(0)
    }

    /// Empties it, keeping at most `kept_bytes` of buffer for the next chunk.
    pub fn clear(&mut self, kept_bytes: usize) {
        self.events.clear();
        self.bytes.clear();
        if self.bytes.capacity() > kept_bytes {
            *self = Staged::default();
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    next_seq: u64,
    batch: Batch,
    /// A checkpoint asked for a new segment starting at this sequence number.
    rotate_at: Option<u64>,
    stop: bool,
}

/// A position in the log: every event up to `seq` is in the segments up to the one starting at
/// `segment`, which is complete up to byte `end`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Position {
    seq: u64,
    segment: u64,
    end: u64,
}

#[derive(Debug, Default)]
struct Progress {
    /// Written to the segment file (not necessarily durable).
    written: Position,
    /// With `Sync`, fdatasynced; in the other modes the same as `written`. Readers see the log
    /// up to here, so nothing they return is taken back by a failed flush.
    visible: Position,
    /// The first sequence number that failed, and why.
    failure: Option<(u64, String)>,
}

#[derive(Debug)]
struct Shared {
    // Relaxed: the newest sequence number handed out, read to decide when to checkpoint.
    last_appended: AtomicU64,
    // Release when set (just after `progress.failure`, under its lock) / Acquire in `append`: a
    // lock-free first look, so appends do not all take the progress mutex the writer holds.
    failed: std::sync::atomic::AtomicBool,
    durability: Durability,
    faults: Option<Arc<Faults>>,
    events_dir: PathBuf,
    segment_bytes: u64,
    queue: Mutex<Queue>,
    queue_ready: Condvar,
    queue_room: Condvar,
    progress: Mutex<Progress>,
    progress_changed: Condvar,
    // Release after `progress.visible` moves, under its lock / Acquire in `wait`: a caller sees
    // its event durable without the progress mutex. Its address is also the key `Sync`
    // callers park on, each woken on its own (`wake_durable`).
    visible_seq: AtomicU64,
    // SeqCst, paired with `writer_asleep` (a Dekker handshake, see `Shared::demand`): the
    // newest sequence number a `Sync` caller waits for. The writer fdatasyncs only when asked.
    demand_seq: AtomicU64,
    // The writer is asleep on `queue_ready`. Stored by the writer only, under the queue's lock
    // (read there with Relaxed); SeqCst, paired with `demand_seq`, for `nudge`'s look without
    // the lock.
    writer_asleep: std::sync::atomic::AtomicBool,
    // Relaxed, stored and read under the queue's lock: the writer dozes (`WRITER_DOZE`) and
    // wants waking only once `WAKE_WRITER_AT_EVENTS` are queued.
    writer_dozing: std::sync::atomic::AtomicBool,
    // Relaxed: fdatasyncs of the log's segments by the writer so far (a statistic).
    writer_flushes: AtomicU64,
    // Relaxed, stored and read under `flush_turn`: every event up to here was made durable by
    // an fdatasync outside the writer (`sync_active_file`). The writer skips a flush it covers
    // and says which events a failed fdatasync of its own may have lost.
    synced_outside: AtomicU64,
    /// Held for an fdatasync of the active segment, the writer's or one outside it: they take
    /// turns, so the writer sees what the other made durable and does not repeat it. (A repeat
    /// took the place of the next one in `Faults`, and its failure failed events already
    /// durable.)
    flush_turn: Mutex<()>,
    // Set under the queue's lock by whoever wants the writer for something else than events
    // or a demand (a rotation, a wake, a close) / Relaxed, cleared under the lock by the
    // writer before it polls: the polling writer (`WRITER_POLL`) watches it without the lock.
    writer_poked: std::sync::atomic::AtomicBool,
    // Relaxed: the writer's last fdatasync took this many microseconds (an estimate for
    // `CALLER_POLL_MAX`).
    flush_micros: AtomicU64,
    // Relaxed: a `Sync` caller polls for its flush (`CALLER_POLL_MAX`); only one at a time.
    // It orders nothing: what the poller reads is `visible_seq`, with its own ordering.
    caller_polling: std::sync::atomic::AtomicBool,
    /// First sequence numbers of the segments, oldest first; the last is being written.
    segments: Mutex<Vec<u64>>,
    /// The segment being written (for `sync()` from other threads).
    active_file: Mutex<Arc<File>>,
    /// sled and its `meta` tree, where the writer records each segment it creates
    /// (`META_LAST_SEGMENT`).
    db: sled::Db,
    meta: sled::Tree,
    syncer: Arc<FileSyncer>,
}

/// A snapshot's encoder for `EventLog::write_snapshot_in_background`: called on the snapshot
/// thread with the store to hand the encoded bytes to, with what the snapshot's keys' usage
/// took in memory (see `EventLog::write_snapshot`); returns what the store returned.
pub type EncodeSnapshot =
    Box<dyn FnOnce(&mut dyn FnMut(&[u8], usize) -> Result<(), Error>) -> Result<(), Error> + Send>;

/// The open log. Dropping it stops the writer after a final flush.
#[derive(Debug)]
pub struct EventLog {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    cursors: sled::Tree,
    /// Held while a cursor is saved: counting the cursors and adding one are a single step,
    /// so racing saves of new names cannot pass `MAX_CURSORS` together.
    cursor_saves: Mutex<()>,
    snapshots_dir: PathBuf,
    syncer: Arc<FileSyncer>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// What compaction shares with the snapshot thread, which compacts after each periodic
    /// checkpoint (`Compactor`).
    compaction: Arc<Compaction>,
    /// A snapshot being encoded and written by its own thread (`write_snapshot_in_background`).
    snapshot_thread: Mutex<Option<JoinHandle<Result<(), Error>>>>,
    /// Opened by `open_read_only`: no writer, nothing repaired.
    read_only: bool,
    /// The database is of an older format this build reads: `record_format` records this
    /// build's in `meta` before anything is written in it.
    format_upgrade_pending: AtomicBool,
    /// What a read-only open found wrong at the end of the log.
    open_problem: Option<String>,
    /// The torn write a read-only open found at the end of the log (`torn_tail_note`).
    open_torn_tail: Option<String>,
    /// What an open that writes does once nothing refused it (`finish_open`), with the
    /// segment the writer goes on in; `None` once done, or read only.
    pending: Mutex<Option<(PendingOpen, Active)>>,
}

/// What `EventLog::finish_open` does, found by the open.
#[derive(Debug)]
struct PendingOpen {
    /// A new database: its format is recorded.
    record_format: bool,
    /// Segments a crash left while creating them, removed.
    leftovers: Vec<PathBuf>,
    /// The active segment's torn tail is cut off (at its `len`).
    torn: bool,
    /// The log has no segment: its first is created.
    create_first: bool,
    /// The active segment is recorded as created.
    record_segment: bool,
}

fn storage(context: impl std::fmt::Display, error: impl std::fmt::Display) -> Error {
    Error::Storage {
        problem: format!("{context}: {error}"),
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn segment_path(events_dir: &Path, first: u64) -> PathBuf {
    events_dir.join(segment_name(first))
}

/// The segments in `events_dir`, by first sequence number.
fn list_segments(events_dir: &Path) -> Result<Vec<u64>, Error> {
    let entries = match std::fs::read_dir(events_dir) {
        // Missing: none yet (an open makes it once nothing refused it; `verify` reads it so).
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        read => {
            read.map_err(|error| storage(format!("reading {}", events_dir.display()), error))?
        }
    };
    let mut firsts = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| storage("reading the log directory", error))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        match stem.parse::<u64>() {
            Ok(first) if stem.len() == 20 && first > 0 => firsts.push(first),
            _ => {
                return Err(storage(
                    events_dir.display(),
                    format!("{name} is not a segment name (20 digits, .seg)"),
                ))
            }
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

fn segment_header(first: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&first.to_le_bytes());
    let crc = crc32fast::hash(&header[..20]);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Checks a segment's header: magic, crc, version (a newer one is refused by name), and that it
/// starts where its name says.
fn check_segment_header(header: &[u8], first: u64, path: &Path) -> Result<(), Error> {
    let bad = |why: String| storage(format!("log segment {}", path.display()), why);
    if header.len() < SEGMENT_HEADER_BYTES || &header[..8] != SEGMENT_MAGIC {
        return Err(bad("not a tally log segment (bad header)".into()));
    }
    let crc = u32::from_le_bytes(header[20..24].try_into().unwrap_or_default());
    if crc != crc32fast::hash(&header[..20]) {
        return Err(bad("its header is damaged (crc mismatch)".into()));
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(bad(format!(
            "format version {version}, but this build reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}{}",
            if version > FORMAT_VERSION {
                ": upgrade tally"
            } else {
                ""
            }
        )));
    }
    let stated = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
    if stated != first {
        return Err(bad(format!(
            "its header says it starts at event {stated}, its name says {first}"
        )));
    }
    Ok(())
}

/// Whether a segment header is sound and of a format newer than this build's.
fn of_a_newer_format(header: &[u8]) -> bool {
    header.len() >= SEGMENT_HEADER_BYTES
        && &header[..8] == SEGMENT_MAGIC
        && u32::from_le_bytes(header[20..24].try_into().unwrap_or_default())
            == crc32fast::hash(&header[..20])
        && u16::from_le_bytes([header[8], header[9]]) > FORMAT_VERSION
}

fn frame_crc(len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// What is at `at` in a segment's bytes.
enum Frame<'a> {
    End,
    Sound { payload: &'a [u8], next: usize },
    Bad(String),
}

fn frame_at(bytes: &[u8], at: usize) -> Frame<'_> {
    if at == bytes.len() {
        return Frame::End;
    }
    let Some(header) = bytes.get(at..at + FRAME_BYTES) else {
        return Frame::Bad(format!(
            "{} bytes, too short for a frame header",
            bytes.len() - at
        ));
    };
    let len = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
    if (len as usize) < RECORD_HEADER_BYTES_MIN || len as usize > MAX_RECORD_BYTES {
        return Frame::Bad(format!("a record length of {len} bytes is impossible"));
    }
    let end = at + FRAME_BYTES + len as usize;
    let Some(payload) = bytes.get(at + FRAME_BYTES..end) else {
        return Frame::Bad(format!(
            "a record of {len} bytes runs past the end of the file"
        ));
    };
    if frame_crc(len, payload) != crc {
        return Frame::Bad("crc mismatch".into());
    }
    Frame::Sound { payload, next: end }
}

/// Whether a sound record after `from`, holding events from `expected` on, was written when
/// event `expected` was durable (or is a format-2 record, which does not say): if not, a bad
/// record at `from - 1` holding `expected` is a torn write; if so, it is damage.
fn durable_record_after(bytes: &[u8], from: usize, expected: u64) -> bool {
    let last_start = bytes
        .len()
        .saturating_sub(FRAME_BYTES + RECORD_HEADER_BYTES_MIN);
    (from..=last_start).any(|at| {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        if !(RECORD_HEADER_BYTES_MIN..=MAX_RECORD_BYTES).contains(&len)
            || at + FRAME_BYTES + len > bytes.len()
        {
            return false;
        }
        let first = u64::from_le_bytes(
            bytes[at + FRAME_BYTES..at + FRAME_BYTES + 8]
                .try_into()
                .unwrap_or_default(),
        );
        if first < expected || first - expected > u64::from(u32::MAX) {
            return false;
        }
        let Frame::Sound { payload, .. } = frame_at(bytes, at) else {
            return false;
        };
        RecordView::parse(payload)
            .is_some_and(|view| view.durable_before.is_none_or(|mark| mark > expected))
    })
}

fn damage(path: &Path, offset: usize, seq: u64, why: impl std::fmt::Display) -> Error {
    Error::Storage {
        problem: format!(
            "log segment {} is damaged at offset {offset} (the record of event {seq}): {why}",
            path.display()
        ),
    }
}

/// What `verify` says of a torn write at the end of the last segment: the bytes of a write
/// that was never acknowledged (`rest`, the file from `offset` on, less the zeros written
/// ahead after it), which the next open cuts off. Not a problem: nothing acknowledged is in it.
fn torn_tail_note(path: &Path, offset: usize, seq: u64, rest: &[u8]) -> String {
    let bytes = rest
        .iter()
        .rposition(|&byte| byte != 0)
        .map_or(0, |last| last + 1);
    format!(
        "log segment {} ends in {bytes} bytes at offset {offset} that hold no sound record (from \
         event {seq} on): a write cut short by a crash, never acknowledged; the next open cuts \
         them off",
        path.display()
    )
}

fn record_problem(path: &Path, offset: usize, error: RecordError) -> Error {
    match error {
        RecordError::Shape(seq) => damage(
            path,
            offset,
            seq,
            "its events do not fill it as its header says",
        ),
        RecordError::Visit(error) => match error {
            Error::Storage { problem } => Error::Storage {
                problem: format!(
                    "log segment {}, record at offset {offset}: {problem}",
                    path.display()
                ),
            },
            other => other,
        },
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| storage(format!("fsync of {}", dir.display()), error))
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    file: Arc<File>,
    first: u64,
    /// Where its records end: the next group is written here.
    len: u64,
    /// The file's length: from `len` to here it holds zeros written ahead
    /// (`ZEROED_AHEAD_BYTES`; only the active segment has such a tail, cut off when it is
    /// sealed). Never below `len`.
    zeroed: u64,
}

/// The last segment as opening scans it: read through a window of about `READ_CHUNK_BYTES`
/// rather than whole (a segment holds up to `segment_bytes`, 64 MiB by default, which read
/// whole was that much fresh memory, and page faults, on every open).
struct SegmentWindow {
    file: File,
    file_len: u64,
    bytes: Vec<u8>,
    /// `bytes[0]` is at this file offset.
    bytes_at: u64,
}

impl SegmentWindow {
    /// The bytes from file offset `at` on: a whole frame's worth at least (`FRAME_BYTES +
    /// MAX_RECORD_BYTES`), or up to the end of the file, so `frame_at(bytes, 0)` judges the
    /// frame at `at` exactly as on the whole file. `at` only moves forward.
    fn from(&mut self, at: u64) -> std::io::Result<&[u8]> {
        debug_assert!(at >= self.bytes_at);
        let want_end = self
            .file_len
            .min(at + (FRAME_BYTES + MAX_RECORD_BYTES) as u64);
        let have_end = self.bytes_at + self.bytes.len() as u64;
        if want_end > have_end {
            // What is left of the window moves to its front, and the rest is read after it.
            let keep = (at.min(have_end) - self.bytes_at) as usize;
            self.bytes.copy_within(keep.., 0);
            self.bytes.truncate(self.bytes.len() - keep);
            self.bytes_at += keep as u64;
            let end = self
                .file_len
                .min(self.bytes_at + READ_CHUNK_BYTES.max(FRAME_BYTES + MAX_RECORD_BYTES) as u64);
            let old = self.bytes.len();
            self.bytes.resize((end - self.bytes_at) as usize, 0);
            self.file
                .seek(SeekFrom::Start(self.bytes_at + old as u64))?;
            self.file.read_exact(&mut self.bytes[old..])?;
        }
        Ok(&self.bytes[(at - self.bytes_at) as usize..])
    }

    /// Everything from file offset `at` to the end of the file (a bad frame's rest, to tell a
    /// torn tail from damage).
    fn rest(&mut self, at: u64) -> std::io::Result<Vec<u8>> {
        let mut rest = vec![0; (self.file_len - at) as usize];
        self.file.seek(SeekFrom::Start(at))?;
        self.file.read_exact(&mut rest)?;
        Ok(rest)
    }
}

/// How long in all the compaction after a periodic checkpoint works, waiting for export readers
/// to let go of the files included: a waiting compaction holds new readers back (the lock is
/// fair), so readers polling back to back let it in within one `events_after` each, while one
/// reading for longer, or a backlog of segments to read and remove (each a directory fsync),
/// holds up neither it nor, through it, the request taking the next periodic checkpoint for
/// longer. The rest goes at the next checkpoint.
const COMPACTION_BUDGET: Duration = Duration::from_millis(100);

/// What compaction shares with the snapshot thread, which compacts after each periodic
/// checkpoint.
#[derive(Debug, Default)]
struct Compaction {
    /// Held while a compaction runs: two at once both listed the same old segments, and the
    /// second to reach one found it removed ("No such file"), failing a compaction that lost
    /// nothing.
    running: Mutex<()>,
    /// Held shared while the segment files are read (`scan`, `events_after`), exclusively
    /// while compaction removes one: a reader never finds a file of its list gone, nor reads on
    /// past events removed after it checked where the log starts.
    files: parking_lot::RwLock<()>,
    /// Where the last `events_after` stopped: (first sequence number of a record, its segment,
    /// its offset), so an export reading forward does not rescan the segment.
    resume: Mutex<Option<(u64, u64, u64)>>,
    /// The newest timestamp in each sealed segment compaction has read, by its first sequence
    /// number: a sealed segment never changes, and one kept for its timestamps (stamped within
    /// the longest window and the retention) is judged again at every periodic checkpoint, so
    /// it is read once, not each time. At most one entry per segment on disk.
    newest_at_ms: Mutex<std::collections::BTreeMap<u64, u64>>,
}

/// Compacts a log (`EventLog::compact`); a handle the snapshot thread takes along, as it
/// compacts after each periodic checkpoint.
#[derive(Debug, Clone)]
pub struct Compactor {
    shared: Arc<Shared>,
    meta: sled::Tree,
    snapshots_dir: PathBuf,
    state: Arc<Compaction>,
}

impl Compactor {
    /// The earliest clock time recorded by which every event up to `seq` was logged (the
    /// record of the first sequence number at or after it); `None` when none covers it yet.
    pub fn logged_by_ms(&self, seq: u64) -> Result<Option<u64>, Error> {
        let reading = |error| storage("reading when events were logged", error);
        let Some(entry) = self.meta.range(logged_by_key(seq)..).next() else {
            return Ok(None);
        };
        let (key, value) = entry.map_err(reading)?;
        if !key.starts_with(META_LOGGED_BY) {
            return Ok(None);
        }
        logged_by_record(&key, &value)
            .map(Some)
            .map_err(|problem| storage("compaction", problem))
    }

    /// Forgets the records of when events before `seq` were logged (their segments are gone).
    fn forget_logged_by_before(&self, seq: u64) -> Result<(), Error> {
        let forgetting = |error| storage("forgetting when compacted events were logged", error);
        let old: Vec<sled::IVec> = self
            .meta
            .range(logged_by_key(0)..logged_by_key(seq))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(forgetting)?;
        for key in old {
            self.meta.remove(key).map_err(forgetting)?;
        }
        Ok(())
    }

    /// The newest timestamp of the sealed segment at `path` (first event `first`), read once.
    fn newest_at_ms(&self, path: &Path, first: u64) -> Result<u64, Error> {
        if let Some(&newest_at_ms) = self.state.newest_at_ms.lock().get(&first) {
            return Ok(newest_at_ms);
        }
        let mut newest_at_ms = 0u64;
        let mut reader = FrameReader::open(path.to_path_buf(), first, 0, None)?;
        let mut expected = first;
        while let Some((at, payload)) = reader.next(expected)? {
            let view = RecordView::parse(payload)
                .ok_or_else(|| damage(path, at as usize, expected, NO_SOUND_HEADER))?;
            newest_at_ms = newest_at_ms.max(view.newest_at_ms);
            expected = view.last_seq() + 1;
        }
        self.state.newest_at_ms.lock().insert(first, newest_at_ms);
        Ok(newest_at_ms)
    }

    /// Removes a segment's file (one already gone counts as removed).
    fn remove_segment_file(&self, path: &Path) -> Result<(), Error> {
        let injected = self
            .shared
            .faults
            .as_deref()
            .is_some_and(|faults| Faults::take(&faults.fail_removals));
        let removal = if injected {
            Err(std::io::Error::other("injected fault"))
        } else {
            std::fs::remove_file(path)
        };
        match removal {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(storage(format!("removing {}", path.display()), error))
            }
            _ => Ok(()),
        }
    }

    /// Deletes whole sealed segments, oldest first, whose every event is at or before
    /// `up_to_seq`, stamped before `before_ms`, and was logged by `logged_by_ms` on the
    /// engine's clock (`logged_by_ms`: a segment no record covers stays); returns how many
    /// events they held.
    pub fn compact(&self, up_to_seq: u64, before_ms: u64, logged_by_ms: u64) -> Result<u64, Error> {
        // One at a time, each listing the segments the one before it left.
        let _one_at_a_time = self.state.running.lock();
        self.remove_old_segments(up_to_seq, before_ms, logged_by_ms, None)
    }

    /// `compact`'s work, its lock held; with a `deadline`, it starts no segment after it (but
    /// always the first) and stops at the first whose removal would wait for readers past it
    /// (see `compact_after_checkpoint`).
    fn remove_old_segments(
        &self,
        up_to_seq: u64,
        before_ms: u64,
        logged_by_ms: u64,
        deadline: Option<Instant>,
    ) -> Result<u64, Error> {
        let segments = self.shared.segments.lock().clone();
        let mut removed = 0u64;
        for pair in segments.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            let last = next - 1;
            if last > up_to_seq {
                break;
            }
            // A backlog (after an upgrade, a retention lowered, a far-future stamp aged out)
            // goes over several checkpoints: each segment read for its timestamps and removed
            // costs a read and a directory fsync, and the next periodic cut waits for this.
            if removed > 0 && deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                break;
            }
            // Judged before the segment is read: a late event's timestamp says nothing of
            // when a reader could first see it.
            let logged_ms = self.logged_by_ms(last)?;
            if logged_ms.is_none_or(|logged_ms| logged_ms > logged_by_ms) {
                break;
            }
            let path = segment_path(&self.shared.events_dir, first);
            if self.newest_at_ms(&path, first)? >= before_ms {
                break;
            }
            let files = match deadline {
                None => self.state.files.write(),
                Some(deadline) => match self.state.files.try_write_until(deadline) {
                    Some(files) => files,
                    None => break,
                },
            };
            self.remove_segment_file(&path)?;
            // Gone from the disk: gone from the list (not before: a file that stays, its
            // removal failed, stays in the log, for the next compaction to remove; dropped
            // from the list, it was left behind in front of a gap once the next one removed
            // the segments after it).
            self.shared
                .segments
                .lock()
                .retain(|segment| *segment != first);
            *self.state.resume.lock() = None;
            self.state.newest_at_ms.lock().remove(&first);
            drop(files);
            // Each removal durable before the next: a power loss mid-compaction leaves the
            // segments removed so far gone and the rest there, never an older one back in
            // front of a gap (which `verify` would report as events missing). One directory
            // fsync per segment, and compaction is rare.
            sync_dir(&self.shared.events_dir)?;
            removed += last + 1 - first;
        }
        if removed > 0 {
            let log_start = self.shared.segments.lock().first().copied().unwrap_or(1);
            self.forget_logged_by_before(log_start)?;
        }
        Ok(removed)
    }

    /// The compaction after a periodic checkpoint, whose snapshot is stored: as `compact`
    /// after the checkpoint `Engine::compact` takes, the events after the snapshot before the
    /// latest kept (so `verify` can replay between the two), with `now_ms` (the engine's clock
    /// at the cut) the time retention is judged by (`retention_cut`). It spends at most
    /// `COMPACTION_BUDGET` in all, waiting for export readers to let go of the files
    /// included (it starts no segment after that, but always the first), and waits for a
    /// running `compact` not at all: the next periodic checkpoint's cut, taken by the request
    /// that crosses the interval, waits for it, so one waiting for a reader, or removing a
    /// backlog of segments, held that request up for as long. What it leaves goes at the next
    /// one. Returns the events removed, or `None` if it left the work to a running `compact`
    /// (whose outcome, not this, says how compaction went).
    pub fn compact_after_checkpoint(
        &self,
        now_ms: u64,
        longest_window_ms: u64,
        retention_ms: u64,
    ) -> Result<Option<u64>, Error> {
        let panic = self
            .shared
            .faults
            .as_deref()
            .is_some_and(|faults| Faults::take(&faults.panic_compactions));
        assert!(!panic, "injected: the compaction after a checkpoint panics");
        let Some((before_ms, logged_by_ms)) =
            retention_cut(now_ms, longest_window_ms, retention_ms)
        else {
            return Ok(Some(0));
        };
        let Some(previous) = previous_snapshot(&self.snapshots_dir)? else {
            return Ok(Some(0));
        };
        let Some(_one_at_a_time) = self.state.running.try_lock() else {
            return Ok(None);
        };
        let deadline = Instant::now() + COMPACTION_BUDGET;
        self.remove_old_segments(previous.seq, before_ms, logged_by_ms, Some(deadline))
            .map(Some)
    }
}

/// What retention lets compaction remove at `now_ms`: events stamped before the first time
/// returned (the longest window plus the retention before now) and logged by the second (the
/// retention before now, on the engine's clock); `None` when nothing can be that old (a `now_ms`
/// less than `retention_ms` after 1970).
pub fn retention_cut(now_ms: u64, longest_window_ms: u64, retention_ms: u64) -> Option<(u64, u64)> {
    let logged_by_ms = now_ms.checked_sub(retention_ms)?;
    let horizon_ms = longest_window_ms.saturating_add(retention_ms);
    Some((now_ms.saturating_sub(horizon_ms), logged_by_ms))
}

/// What opening found at the end of the log.
struct Recovered {
    segments: Vec<u64>,
    active: Active,
    last_seq: u64,
    /// Read-only: the damage found at the end of the last segment (left alone).
    problem: Option<String>,
    /// Read-only: the torn write found at the end of the last segment, which an open would cut
    /// off (left alone): what `torn_tail_note` says of it.
    torn_tail: Option<String>,
    /// Whether the log has no segment: the open makes its first one (`PendingOpen`).
    created: bool,
    /// Crash leftovers (a segment whose header never became durable) the open removes once
    /// nothing refused it.
    leftovers: Vec<PathBuf>,
    /// The torn write at the end of the last segment, cut off (the file set to `active.len`)
    /// once nothing refused the open.
    torn: bool,
}

/// Scans the last segment, truncating a torn tail, and makes what it keeps durable (so the
/// durable points written after it are true); creates the first segment of a new log. Events
/// up to `durable_through` (the latest snapshot's, or the last clean close's) were durable: a
/// bad record among them is damage. `read_only` (verify) changes nothing: damage is reported
/// in `problem` and the log read up to it; a torn tail is left, and read as the log's end
/// without a problem, as an open cuts it off (it was never acknowledged).
fn recover_segments(
    events_dir: &Path,
    start_if_empty: u64,
    durable_through: u64,
    last_created: u64,
    read_only: bool,
) -> Result<Recovered, Error> {
    let mut segments = list_segments(events_dir)?;
    let mut problem = None;
    let mut torn_tail = None;
    let mut leftovers = Vec::new();
    let mut torn_at_end = false;
    while let Some(&first) = segments.last() {
        let path = segment_path(events_dir, first);
        let reading = |error| storage(format!("reading {}", path.display()), error);
        let mut file = File::open(&path).map_err(reading)?;
        let file_len = file.metadata().map_err(reading)?.len();
        let mut header = vec![0; file_len.min(SEGMENT_HEADER_BYTES as u64) as usize];
        file.read_exact(&mut header).map_err(reading)?;
        if file_len <= SEGMENT_HEADER_BYTES as u64
            && first > last_created
            && check_segment_header(&header, first, &path).is_err()
        {
            // A crash while creating the segment (its header is written and fsynced before
            // anything else, and it is recorded as created after that): it holds nothing. The
            // one before goes on, or a new first one. (One recorded had a durable header:
            // damaged, it is refused below.)
            // Removed by `EventLog::finish_open`, once nothing refused the open.
            if !read_only {
                leftovers.push(path);
            }
            segments.pop();
            continue;
        }
        // `read_only` (verify) reports damage and reads the log up to it.
        let mut readable = true;
        if let Err(error) = check_segment_header(&header, first, &path) {
            // A newer format is not damage: this build cannot judge it, verify included.
            if !read_only || of_a_newer_format(&header) {
                return Err(error);
            }
            problem = Some(error.to_string());
            readable = false;
        }
        let mut window = SegmentWindow {
            file,
            file_len,
            bytes: Vec::new(),
            bytes_at: 0,
        };
        let mut at = SEGMENT_HEADER_BYTES;
        let mut expected = first;
        loop {
            if !readable {
                break;
            }
            match frame_at(window.from(at as u64).map_err(reading)?, 0) {
                Frame::End => break,
                Frame::Sound { payload, next } => {
                    let checked = match RecordView::parse(payload) {
                        None => Err(damage(&path, at, expected, NO_SOUND_HEADER)),
                        Some(view) if view.first_seq != expected || view.count == 0 => {
                            Err(damage(&path, at, expected, out_of_place(&view, expected)))
                        }
                        Some(view) => Ok(view),
                    };
                    let view = match checked {
                        Ok(view) => view,
                        Err(error) if read_only => {
                            problem = Some(error.to_string());
                            break;
                        }
                        Err(error) => return Err(error),
                    };
                    if let Err(error) = view.for_each(|_| Ok(true)) {
                        let error = record_problem(&path, at, error);
                        if !read_only {
                            return Err(error);
                        }
                        problem = Some(error.to_string());
                        break;
                    }
                    expected = view.last_seq() + 1;
                    at += next;
                }
                Frame::Bad(why) => {
                    let rest = window.rest(at as u64).map_err(reading)?;
                    // Zeros to the end: written ahead for the groups to come (or, like a file
                    // cut short, where a crash kept nothing of a write). The log ends here,
                    // unless its events were durable: then records were lost, damage.
                    if expected > durable_through && rest.iter().all(|&byte| byte == 0) {
                        break;
                    }
                    // What shows its events were durable (then it is damage, not a torn write).
                    let proof = if expected <= durable_through {
                        Some(format!(
                            "it was durable: a snapshot or a clean close found the log durable \
                             through event {durable_through}"
                        ))
                    } else if durable_record_after(&rest, 1, expected) {
                        Some(
                            "it was durable: a sound record after it was written once it was"
                                .to_string(),
                        )
                    } else {
                        None
                    };
                    let torn = proof.is_none();
                    let why = match proof {
                        Some(proof) => format!("{why}; {proof}"),
                        None => why,
                    };
                    if read_only {
                        if torn {
                            torn_tail = Some(torn_tail_note(&path, at, expected, &rest));
                        } else {
                            problem = Some(damage(&path, at, expected, why).to_string());
                        }
                        break;
                    }
                    if !torn {
                        return Err(damage(&path, at, expected, why));
                    }
                    // A torn write at the end: never acknowledged. Cut off by
                    // `EventLog::finish_open`, once nothing refused the open (a refused one
                    // leaves the database as the crash left it); nothing reads past `at`.
                    torn_at_end = true;
                    window.file_len = at as u64;
                    break;
                }
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|error| storage(format!("opening {}", path.display()), error))?;
        // (Made durable by `EventLog::finish_open`: a crash in a mode that does not wait for
        // durability can leave events in the page cache only.)
        file.seek(SeekFrom::Start(at as u64))
            .map_err(|error| storage(format!("seeking in {}", path.display()), error))?;
        return Ok(Recovered {
            segments,
            active: Active {
                file: Arc::new(file),
                first,
                len: at as u64,
                zeroed: window.file_len.max(at as u64),
            },
            last_seq: expected - 1,
            problem,
            torn_tail,
            created: false,
            leftovers,
            torn: torn_at_end,
        });
    }
    // A placeholder, never written: the directory (or, missing, the database's).
    let placeholder = match events_dir.parent() {
        Some(parent) if !events_dir.exists() => parent,
        _ => events_dir,
    };
    let file = File::open(placeholder)
        .map_err(|error| storage(format!("opening {}", placeholder.display()), error))?;
    Ok(Recovered {
        segments,
        active: Active {
            file: Arc::new(file),
            first: start_if_empty,
            len: 0,
            zeroed: 0,
        },
        last_seq: start_if_empty - 1,
        problem,
        torn_tail,
        // No segment: an open that writes makes the first (`EventLog::finish_open`).
        created: !read_only,
        leftovers,
        torn: false,
    })
}

/// Creates a segment durably: header written and fsynced, then the directory fsynced.
fn create_segment(events_dir: &Path, first: u64) -> Result<File, Error> {
    let path = segment_path(events_dir, first);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|error| storage(format!("creating {}", path.display()), error))?;
    file.write_all(&segment_header(first))
        .and_then(|()| file.sync_all())
        .map_err(|error| storage(format!("writing {}", path.display()), error))?;
    sync_dir(events_dir)?;
    Ok(file)
}

/// Reads a segment's frames in order through a buffer, up to a limit.
struct FrameReader {
    file: File,
    path: PathBuf,
    buffer: Vec<u8>,
    /// `buffer[start..]` is unread; `buffer[0]` is at file offset `buffer_at`.
    start: usize,
    buffer_at: u64,
    limit: u64,
}

impl FrameReader {
    fn open(
        path: PathBuf,
        first: u64,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<FrameReader, Error> {
        let mut file = File::open(&path)
            .map_err(|error| storage(format!("opening {}", path.display()), error))?;
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        file.read_exact(&mut header)
            .map_err(|error| storage(format!("reading {}", path.display()), error))?;
        check_segment_header(&header, first, &path)?;
        let limit = match limit {
            Some(limit) => limit,
            None => file
                .metadata()
                .map_err(|error| storage(format!("reading {}", path.display()), error))?
                .len(),
        };
        let offset = offset.max(SEGMENT_HEADER_BYTES as u64);
        file.seek(SeekFrom::Start(offset))
            .map_err(|error| storage(format!("seeking in {}", path.display()), error))?;
        Ok(FrameReader {
            file,
            path,
            buffer: Vec::new(),
            start: 0,
            buffer_at: offset,
            limit,
        })
    }

    fn offset(&self) -> u64 {
        self.buffer_at + self.start as u64
    }

    /// Makes `want` bytes available at `start` (fewer only at the limit).
    fn fill(&mut self, want: usize) -> Result<(), Error> {
        let available = self.buffer.len() - self.start;
        if available >= want {
            return Ok(());
        }
        self.buffer.drain(..self.start);
        self.buffer_at += self.start as u64;
        self.start = 0;
        let end_of_buffer = self.buffer_at + self.buffer.len() as u64;
        let room = self.limit.saturating_sub(end_of_buffer);
        let read = (want.max(READ_CHUNK_BYTES) - self.buffer.len()).min(room as usize);
        let old = self.buffer.len();
        self.buffer.resize(old + read, 0);
        self.file
            .read_exact(&mut self.buffer[old..])
            .map_err(|error| storage(format!("reading {}", self.path.display()), error))
    }

    /// The next frame's offset and payload, crc-checked; `None` at the limit. `expected` is
    /// the sequence number the frame should start at (for error messages).
    fn next(&mut self, expected: u64) -> Result<Option<(u64, &[u8])>, Error> {
        let at = self.offset();
        if at >= self.limit {
            return Ok(None);
        }
        self.fill(FRAME_BYTES)?;
        let available = &self.buffer[self.start..];
        if available.len() < FRAME_BYTES {
            return Err(damage(
                &self.path,
                at as usize,
                expected,
                "a partial frame header",
            ));
        }
        let len = u32::from_le_bytes(available[..4].try_into().unwrap_or_default()) as usize;
        // A format-2 record's header is the shorter one: a record of one short event is
        // shorter than a format-3 header (as `frame_at` judges it at open).
        if !(RECORD_HEADER_BYTES_MIN..=MAX_RECORD_BYTES).contains(&len) {
            return Err(damage(
                &self.path,
                at as usize,
                expected,
                format!("a record length of {len} bytes is impossible"),
            ));
        }
        self.fill(FRAME_BYTES + len)?;
        let start = self.start;
        if self.buffer.len() - start < FRAME_BYTES + len {
            return Err(damage(
                &self.path,
                at as usize,
                expected,
                "the record runs past the end of the segment",
            ));
        }
        match frame_at(&self.buffer[start..start + FRAME_BYTES + len], 0) {
            Frame::Sound { .. } => {}
            Frame::Bad(why) => return Err(damage(&self.path, at as usize, expected, why)),
            Frame::End => return Ok(None),
        }
        self.start += FRAME_BYTES + len;
        Ok(Some((
            at,
            &self.buffer[start + FRAME_BYTES..start + FRAME_BYTES + len],
        )))
    }
}

impl EventLog {
    /// Opens (creating if needed) the log in `dir`, with segments of `SEGMENT_BYTES`.
    pub fn open(
        dir: &Path,
        durability: Durability,
        faults: Option<Arc<Faults>>,
    ) -> Result<EventLog, Error> {
        EventLog::open_with(dir, durability, faults, SEGMENT_BYTES)
    }

    /// Opens the log to read it only (`verify`, tools): no writer thread, no torn tail cut off,
    /// and damage at the end of the log reported by `walk` instead of refusing to open.
    /// A directory that holds no database (missing, empty, or other files: said apart in the
    /// error) is an error: reading never creates one. A database has sled's `db` and `conf`
    /// files: one of them alone (a creation cut short holds nothing to read; an operator's
    /// `conf` is not sled's, which sled could rewrite) is none.
    pub fn open_read_only(dir: &Path) -> Result<EventLog, Error> {
        check_dir_named(dir)?;
        if let Some(problem) = lost_sled_files(dir) {
            return Err(storage(dir.display(), problem));
        }
        if !holds_sled_files(dir) {
            return Err(storage(
                dir.display(),
                if !dir.exists() || holds_only_database_entries(dir) {
                    "holds no tally database"
                } else {
                    "holds files that are not a tally database"
                },
            ));
        }
        EventLog::open_inner(dir, Durability::None, None, SEGMENT_BYTES, true)
    }

    /// Opens the log, sealing segments once they hold `segment_bytes` (at least 256).
    pub fn open_with(
        dir: &Path,
        durability: Durability,
        faults: Option<Arc<Faults>>,
        segment_bytes: u64,
    ) -> Result<EventLog, Error> {
        let log = EventLog::open_unfinished(dir, durability, faults, segment_bytes)?;
        log.finish_open()?;
        Ok(log)
    }

    /// `open_with`, without what `finish_open` does: the log reads, and nothing of the
    /// database is changed (but sled's own files) until `finish_open`. Dropped before, it
    /// leaves the database as it found it.
    pub fn open_unfinished(
        dir: &Path,
        durability: Durability,
        faults: Option<Arc<Faults>>,
        segment_bytes: u64,
    ) -> Result<EventLog, Error> {
        EventLog::open_inner(dir, durability, faults, segment_bytes, false)
    }

    fn open_inner(
        dir: &Path,
        durability: Durability,
        faults: Option<Arc<Faults>>,
        segment_bytes: u64,
        read_only: bool,
    ) -> Result<EventLog, Error> {
        check_dir_named(dir)?;
        if let Durability::Interval { ms } = durability {
            if ms == 0 || ms > MAX_FLUSH_INTERVAL_MS {
                return Err(Error::invalid(
                    "durability",
                    format!("an interval is between 1 and {MAX_FLUSH_INTERVAL_MS} ms"),
                ));
            }
        }
        prepare_directory(dir)?;
        let db = open_sled(dir)?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|error| storage(format!("{}: tree {name}", dir.display()), error))
        };
        let (meta, cursors) = (tree("meta")?, tree("cursors")?);
        let events_dir = dir.join(EVENTS_DIR);
        let snapshots_dir = dir.join(SNAPSHOTS_DIR);
        let (format_upgrade_pending, format_new) =
            check_format(dir, &meta, &events_dir, read_only)?;
        let snapshot = latest_snapshots(&snapshots_dir)?.first().copied();
        // The segments as the open found them (`recover_segments` lists them again, once it
        // has removed a crash's leftover).
        let listed = list_segments(&events_dir)?;
        // `read_only` (verify) reports what an open refuses, and reads what there is.
        let mut missing = None;
        let start_if_empty = match snapshot {
            // An open records its options only once the log's first segment exists, and
            // nothing removes a log's last segment: a database that recorded them and has
            // neither a segment nor a snapshot lost its log, and is no new database.
            None => {
                let recorded = meta
                    .contains_key(META_OPTIONS)
                    .map_err(|error| storage("reading the recorded options", error))?;
                if recorded && listed.is_empty() {
                    missing = Some(storage(
                        dir.display(),
                        format!(
                            "has no log segments and no snapshot, but it was opened before (its \
                             options are recorded): its events are missing from {EVENTS_DIR}/"
                        ),
                    ));
                }
                1
            }
            Some(pointer) => {
                if listed.is_empty() {
                    missing = Some(storage(
                        dir.display(),
                        format!(
                            "has a snapshot at event {} but no log segments in {EVENTS_DIR}/",
                            pointer.seq
                        ),
                    ));
                }
                pointer.seq + 1
            }
        };
        // The newest segment recorded as created: the log reached it, so it is there (unless
        // another fault is found first).
        // A damaged record is refused; `verify` reports it and reads on as if there were none.
        let unless_verifying = |read: Result<u64, Error>, missing: &mut Option<Error>| match read {
            Err(error) if read_only => {
                missing.get_or_insert(error);
                Ok(0)
            }
            read => read,
        };
        let last_created = unless_verifying(last_created_segment(&meta), &mut missing)?;
        let last_listed = listed.last().copied().unwrap_or(0);
        if missing.is_none() && last_created > last_listed {
            missing = Some(storage(
                dir.display(),
                format!(
                    "log segment {} is missing from {EVENTS_DIR}/ (the log had reached it; the \
                     last one there is {}): its events are missing",
                    segment_name(last_created),
                    if last_listed == 0 {
                        "none".to_string()
                    } else {
                        segment_name(last_listed)
                    }
                ),
            ));
        }
        let closed_through = unless_verifying(clean_close_point(&meta), &mut missing)?;
        let durable_through = snapshot
            .map_or(0, |pointer| pointer.seq)
            .max(closed_through);
        if !read_only {
            if let Some(error) = missing.take() {
                return Err(error);
            }
        }
        // The directories are made, and a crash's leftovers removed, by `finish_open`, once
        // nothing refused the open (the engine's too: its snapshot and replay): a database
        // refused is left as it was. Reading only (`verify`) changes nothing of tally's: a
        // missing directory reads as empty (and is reported as the events it lacks), a crash's
        // leftover stays.
        let mut recovered = recover_segments(
            &events_dir,
            start_if_empty,
            durable_through,
            last_created,
            read_only,
        )?;
        let syncer = Arc::new(FileSyncer::new(dir)?);
        // The segment the log goes on in (or starts) is recorded before anything is written in
        // it, like every later one: its header is durable from here on, so a damaged one is
        // damage, not a crash's leftover to remove, and its removal is refused. One a crash
        // left unrecorded (or a database from before the record) is recorded here, else the
        // record would stay behind until the next rotation.
        let active_first = recovered.active.first;
        let record_segment = recovered.created || active_first > last_created;
        let last_seq = recovered.last_seq;
        if let Some(pointer) = snapshot.filter(|pointer| pointer.seq > last_seq) {
            missing = Some(storage(
                dir.display(),
                format!(
                    "the log ends at event {last_seq}, before the snapshot at event {}: events are missing{}",
                    pointer.seq,
                    // `verify` reads up to damage: name it.
                    recovered
                        .problem
                        .as_ref()
                        .map_or(String::new(), |problem| format!(" ({problem})"))
                ),
            ));
        }
        // (`verify` reads up to damage and reports it: then the log ends early for that.)
        if closed_through > last_seq && recovered.problem.is_none() && missing.is_none() {
            missing = Some(storage(
                dir.display(),
                format!(
                    "the log ends at event {last_seq}, before event {closed_through}, which a clean close found durable: events are missing"
                ),
            ));
        }
        if let Some(error) = missing {
            if !read_only {
                return Err(error);
            }
            // Names the damage it ends at, if any.
            recovered.problem = Some(error.to_string());
        }
        let position = Position {
            seq: last_seq,
            segment: recovered.active.first,
            end: recovered.active.len,
        };
        let pending = (!read_only).then(|| PendingOpen {
            record_format: format_new,
            leftovers: std::mem::take(&mut recovered.leftovers),
            torn: recovered.torn,
            create_first: recovered.created,
            record_segment,
        });
        let shared = Arc::new(Shared {
            last_appended: AtomicU64::new(last_seq),
            failed: std::sync::atomic::AtomicBool::new(false),
            durability,
            faults,
            events_dir,
            segment_bytes: segment_bytes.max(256),
            queue: Mutex::new(Queue {
                next_seq: last_seq + 1,
                ..Queue::default()
            }),
            queue_ready: Condvar::new(),
            queue_room: Condvar::new(),
            progress: Mutex::new(Progress {
                written: position,
                visible: position,
                failure: None,
            }),
            progress_changed: Condvar::new(),
            visible_seq: AtomicU64::new(position.seq),
            demand_seq: AtomicU64::new(position.seq),
            writer_asleep: std::sync::atomic::AtomicBool::new(false),
            writer_dozing: std::sync::atomic::AtomicBool::new(false),
            writer_flushes: AtomicU64::new(0),
            synced_outside: AtomicU64::new(0),
            flush_turn: Mutex::new(()),
            writer_poked: std::sync::atomic::AtomicBool::new(false),
            flush_micros: AtomicU64::new(0),
            caller_polling: std::sync::atomic::AtomicBool::new(false),
            segments: Mutex::new(recovered.segments),
            active_file: Mutex::new(Arc::clone(&recovered.active.file)),
            db: db.clone(),
            meta: meta.clone(),
            syncer: Arc::clone(&syncer),
        });
        let log = EventLog {
            dir: dir.to_path_buf(),
            db,
            meta,
            cursors,
            cursor_saves: Mutex::new(()),
            snapshots_dir,
            syncer,
            shared,
            writer: Mutex::new(None),
            compaction: Arc::new(Compaction::default()),
            snapshot_thread: Mutex::new(None),
            read_only,
            format_upgrade_pending: AtomicBool::new(format_upgrade_pending),
            open_problem: recovered.problem,
            open_torn_tail: recovered.torn_tail,
            pending: Mutex::new(pending.map(|pending| (pending, recovered.active))),
        };
        // Nothing can be appended: read only, or until `finish_open`.
        log.shared.queue.lock().stop = true;
        Ok(log)
    }

    /// Makes what an open found ready to write in, once nothing refused the open: records
    /// the format of a new database, makes the directories, removes a crash's leftovers (a
    /// snapshot's temporary file, a segment whose header never became durable), cuts off a
    /// torn tail, makes the last segment durable (or creates the first), records the segment
    /// the log goes on in and starts the writer. Until then the log only reads, and a log
    /// dropped unfinished (its open refused) leaves the database as the open found it: what
    /// an open repairs is repaired only by one that goes ahead. Nothing when read only or
    /// done already.
    pub fn finish_open(&self) -> Result<(), Error> {
        let mut slot = self.pending.lock();
        // Left in place until the writer starts: a finish that fails leaves a log that closes
        // as an unfinished one, recording nothing (its open is refused).
        let Some((pending, active)) = slot.as_mut() else {
            return Ok(());
        };
        let events_dir = &self.shared.events_dir;
        if pending.record_format {
            self.meta
                .insert(META_FORMAT, &FORMAT_VERSION.to_le_bytes())
                .map_err(|error| storage("writing metadata", error))?;
            self.syncer.flush(&self.db)?;
        }
        for sub in [events_dir, &self.snapshots_dir] {
            if !sub.exists() {
                std::fs::create_dir(sub)
                    .map_err(|error| storage(format!("creating {}", sub.display()), error))?;
                sync_dir(&self.dir)?;
            }
        }
        remove_temporary_snapshots(&self.snapshots_dir)?;
        for path in &pending.leftovers {
            std::fs::remove_file(path)
                .map_err(|error| storage(format!("removing {}", path.display()), error))?;
        }
        if !pending.leftovers.is_empty() {
            sync_dir(events_dir)?;
        }
        if pending.create_first {
            let file = Arc::new(create_segment(events_dir, active.first)?);
            *active = Active {
                file: Arc::clone(&file),
                first: active.first,
                len: SEGMENT_HEADER_BYTES as u64,
                zeroed: SEGMENT_HEADER_BYTES as u64,
            };
            *self.shared.segments.lock() = vec![active.first];
            *self.shared.active_file.lock() = file;
            let mut progress = self.shared.progress.lock();
            progress.written.end = active.len;
            progress.visible.end = active.len;
        } else {
            let path = segment_path(events_dir, active.first);
            if pending.torn {
                // A torn write at the end: never acknowledged. Cut off.
                active
                    .file
                    .set_len(active.len)
                    .and_then(|()| active.file.sync_all())
                    .map_err(|error| {
                        storage(
                            format!("truncating the torn tail of {}", path.display()),
                            error,
                        )
                    })?;
            }
            // A crash in a mode that does not wait for durability can leave events in the
            // page cache only: durable before anything is written after them with a durable
            // point.
            active
                .file
                .sync_data()
                .map_err(|error| storage(format!("fdatasync of {}", path.display()), error))?;
        }
        // The segment the log goes on in (or starts) is recorded before anything is written in
        // it, like every later one (see `open_inner`).
        if pending.record_segment {
            self.meta
                .insert(META_LAST_SEGMENT, &active.first.to_le_bytes())
                .map_err(|error| storage("writing metadata", error))?;
            self.syncer.flush(&self.db)?;
        }
        let Some((_, active)) = slot.take() else {
            unreachable!("held under the lock");
        };
        self.shared.queue.lock().stop = false;
        self.start_writer(active)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    fn start_writer(&self, active: Active) -> Result<(), Error> {
        let active_len = active.len;
        let writer = Writer {
            shared: Arc::clone(&self.shared),
            active,
            buffer: Vec::with_capacity(1 << 20),
            spare: Batch::default(),
            rotate_at: None,
            unsynced_from: None,
            unsynced_since: None,
            last_flush_ended: None,
            last_take: Instant::now(),
            durable_len: active_len,
            wrote: false,
            poll_for: WRITER_POLL,
            group_bytes: 0,
        };
        let handle = std::thread::Builder::new()
            .name("tally-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|error| storage("starting the log writer", error))?;
        *self.writer.lock() = Some(handle);
        Ok(())
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.shared.queue.lock().next_seq
    }

    /// The newest sequence number handed out (lock-free, possibly a moment stale).
    pub fn last_appended(&self) -> u64 {
        self.shared.last_appended.load(Ordering::Relaxed)
    }

    /// How many fdatasyncs of its segments the writer has made since the log opened: with
    /// `Sync`, events per flush is the group commit's batch.
    pub fn writer_flushes(&self) -> u64 {
        self.shared.writer_flushes.load(Ordering::Relaxed)
    }

    /// Every event up to here is durable (with `Sync`) or written.
    pub fn durable_seq(&self) -> u64 {
        self.shared.progress.lock().visible.seq
    }

    /// Records this build's format in `meta`, durably, if the database is of an older one
    /// (`OLDEST_FORMAT_VERSION` on), before the first event is appended: an open that reads
    /// the database and fails, or a tool that only reads it, leaves it as it was, and a build
    /// that reads only the older format refuses it by its version once something is written
    /// in this one (not as damage). The queue's lock makes concurrent first appends wait for
    /// it.
    #[cold]
    #[inline(never)]
    pub fn record_format(&self) -> Result<(), Error> {
        let _queue = self.shared.queue.lock();
        if !self.format_upgrade_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        self.meta
            .insert(META_FORMAT, &FORMAT_VERSION.to_le_bytes())
            .map_err(|error| storage("writing metadata", error))?;
        self.syncer.flush(&self.db)?;
        self.format_upgrade_pending.store(false, Ordering::Release);
        Ok(())
    }

    /// A refund's or a close's pause between its give-back and its append, if a test holds
    /// them (`Faults::hold_give_backs`).
    pub(crate) fn hold_give_back(&self) {
        if let Some(faults) = self.shared.faults.as_deref() {
            faults.give_backs.wait();
        }
    }

    /// Queues an encoded event body; returns its sequence number. Fails at once if the log has
    /// failed before.
    pub fn append(&self, at_ms: u64, body: impl AsRef<[u8]>) -> Result<u64, Error> {
        // Relaxed: set before the log was shared and only ever cleared; a stale true is
        // checked again under the queue's lock.
        if self.format_upgrade_pending.load(Ordering::Relaxed) {
            self.record_format()?;
        }
        let body = body.as_ref();
        if body.len() > MAX_EVENT_BYTES {
            return Err(Error::invalid(
                "event",
                format!("{} bytes; at most {MAX_EVENT_BYTES}", body.len()),
            ));
        }
        if self.shared.failed.load(Ordering::Acquire) {
            if let Some((seq, problem)) = &self.shared.progress.lock().failure {
                return Err(failed(*seq, problem));
            }
        }
        let mut queue = self.shared.queue.lock();
        while queue.batch.events.len() >= MAX_QUEUED_EVENTS && !queue.stop {
            self.shared.queue_ready.notify_one();
            self.shared.queue_room.wait(&mut queue);
        }
        if queue.stop {
            return Err(Error::Storage {
                problem: "the log is closed".into(),
            });
        }
        let seq = queue.next_seq;
        queue.next_seq += 1;
        self.shared.last_appended.store(seq, Ordering::Relaxed);
        queue.batch.bytes.extend_from_slice(body);
        let end = queue.batch.bytes.len();
        queue.batch.events.push(Queued { seq, at_ms, end });
        let wake = self.shared.writer_asleep.load(Ordering::Relaxed)
            || (self.shared.writer_dozing.load(Ordering::Relaxed)
                && queue.batch.events.len() == WAKE_WRITER_AT_EVENTS);
        drop(queue);
        if wake {
            self.shared.queue_ready.notify_one();
        }
        Ok(seq)
    }

    /// Queues every staged event, in order, under one hold of the queue's lock; returns the
    /// last one's sequence number (they get consecutive ones). All or nothing: if the log has
    /// failed or is closed, none is queued.
    ///
    /// Wakes a sleeping writer only once `WAKE_WRITER_AT_EVENTS` are queued: the caller, a
    /// `consume_many` with more chunks to come, calls `nudge` after its last one. (Woken for
    /// every chunk of 64, the writer cost each a futex wake-up, a context switch and a write:
    /// about a tenth of a batch's time, measured in `examples/manyloop`.)
    pub fn append_staged(&self, staged: &Staged) -> Result<u64, Error> {
        if self.format_upgrade_pending.load(Ordering::Relaxed) {
            self.record_format()?;
        }
        let count = staged.events.len();
        if count == 0 {
            return Err(Error::invalid(
                "events",
                "nothing staged to append".to_string(),
            ));
        }
        if self.shared.failed.load(Ordering::Acquire) {
            if let Some((seq, problem)) = &self.shared.progress.lock().failure {
                return Err(failed(*seq, problem));
            }
        }
        let mut queue = self.shared.queue.lock();
        // Room for the whole chunk (or an empty queue, for a chunk larger than the bound).
        while !queue.batch.events.is_empty()
            && queue.batch.events.len() + count > MAX_QUEUED_EVENTS
            && !queue.stop
        {
            self.shared.queue_ready.notify_one();
            self.shared.queue_room.wait(&mut queue);
        }
        if queue.stop {
            return Err(Error::Storage {
                problem: "the log is closed".into(),
            });
        }
        let first_seq = queue.next_seq;
        let offset = queue.batch.bytes.len();
        queue.batch.bytes.extend_from_slice(&staged.bytes);
        queue
            .batch
            .events
            .extend(
                staged
                    .events
                    .iter()
                    .enumerate()
                    .map(|(index, &(at_ms, end))| Queued {
                        seq: first_seq + index as u64,
                        at_ms,
                        end: offset + end,
                    }),
            );
        let last_seq = first_seq + count as u64 - 1;
        queue.next_seq = last_seq + 1;
        self.shared.last_appended.store(last_seq, Ordering::Relaxed);
        let wake = (self.shared.writer_asleep.load(Ordering::Relaxed)
            || self.shared.writer_dozing.load(Ordering::Relaxed))
            && queue.batch.events.len() >= WAKE_WRITER_AT_EVENTS;
        drop(queue);
        if wake {
            self.shared.queue_ready.notify_one();
        }
        Ok(last_seq)
    }

    /// Wakes the writer if it sleeps while events are queued (see `append_staged`).
    pub fn nudge(&self) {
        self.shared.nudge();
    }

    /// Waits, in `Sync` mode, until `seq` is durable; in the other modes returns at once unless
    /// the log has already failed at or before `seq`.
    ///
    /// A `Sync` caller parks on its own and the writer wakes exactly the callers its flush made
    /// durable, all at once. (Waiting on one condition variable, they were woken one after
    /// another, each passing the progress mutex on to the next: with hundreds of callers the
    /// wake-ups, not the `fdatasync`, set the pace.)
    pub fn wait(&self, seq: u64) -> Result<(), Error> {
        self.wait_for(seq, 1)
    }

    /// `wait`, for a caller whose wait serves `events` events (a `consume_many`'s batch; for a
    /// submission, the events queued up to it and since). With at least `CALLER_POLL_EVENTS`
    /// of them a lone `Sync` caller polls for the flush before it parks (`CALLER_POLL_MAX`).
    pub fn wait_for(&self, seq: u64, events: usize) -> Result<(), Error> {
        let shared = &*self.shared;
        if shared.durability == Durability::Sync && !shared.settled(seq) {
            shared.demand(seq);
            if events < CALLER_POLL_EVENTS || !shared.poll_until_durable(seq) {
                shared.park_until_durable(seq);
            }
        }
        if shared.failed.load(Ordering::Acquire) {
            if let Some((failed_seq, problem)) = &shared.progress.lock().failure {
                if *failed_seq <= seq {
                    return Err(failed(*failed_seq, problem));
                }
            }
        }
        Ok(())
    }

    /// In `Sync` mode, asks the writer to make `seq` durable now, without waiting for it (a
    /// later `wait` then finds it done, or nearer). In the other modes the writer needs no
    /// asking.
    pub fn hurry(&self, seq: u64) {
        let shared = &*self.shared;
        if shared.durability == Durability::Sync && !shared.settled(seq) {
            shared.demand(seq);
        }
    }

    /// Whether `wait(seq)` would return at once: `seq` is durable (in `Sync` mode; in the
    /// others a wait never waits), or the log has failed.
    pub fn is_settled(&self, seq: u64) -> bool {
        self.shared.durability != Durability::Sync || self.shared.settled(seq)
    }

    /// The log's failure, if it has failed (every later append and wait answers it).
    pub fn failure(&self) -> Option<Error> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return None;
        }
        let progress = self.shared.progress.lock();
        let (seq, problem) = progress.failure.as_ref()?;
        Some(failed(*seq, problem))
    }

    /// The first sequence number the log's failure covers, if it has failed: every event
    /// before it stays in the log (durable, in `Sync` mode), none from it on does.
    pub fn failed_from(&self) -> Option<u64> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return None;
        }
        Some(self.shared.progress.lock().failure.as_ref()?.0)
    }

    /// Waits until every event appended so far is written, then makes it durable, whatever
    /// the mode (a checkpoint, a close, `tally` commands).
    pub fn sync(&self) -> Result<(), Error> {
        let last = self.next_seq() - 1;
        if self.shared.durability == Durability::Sync {
            self.shared.demand(last);
        }
        self.shared.wake();
        let mut progress = self.shared.progress.lock();
        loop {
            if let Some((seq, problem)) = &progress.failure {
                return Err(failed(*seq, problem));
            }
            if progress.visible.seq >= last {
                break;
            }
            self.shared.progress_changed.wait(&mut progress);
        }
        drop(progress);
        if self.shared.durability == Durability::Sync {
            return Ok(());
        }
        self.shared.sync_active_file()
    }

    /// Asks for a new segment to start at `seq` (a checkpoint's first uncovered event), so the
    /// segments before it can later be dropped whole. Called while nothing can be appended.
    pub fn rotate_at(&self, seq: u64) {
        {
            let mut queue = self.shared.queue.lock();
            queue.rotate_at = Some(seq);
            self.shared.writer_poked.store(true, Ordering::Relaxed);
        }
        self.shared.queue_ready.notify_one();
    }

    /// Waits until the segment being written starts at or after `seq` (a rotation asked for
    /// with `rotate_at`), or the log failed.
    pub fn wait_rotation(&self, seq: u64) -> Result<(), Error> {
        let mut progress = self.shared.progress.lock();
        loop {
            if let Some((failed_seq, problem)) = &progress.failure {
                return Err(failed(*failed_seq, problem));
            }
            if progress.written.segment >= seq {
                return Ok(());
            }
            if self.shared.queue.lock().stop {
                return Ok(());
            }
            self.shared
                .progress_changed
                .wait_for(&mut progress, Duration::from_millis(50));
        }
    }

    fn visible(&self) -> Position {
        self.shared.progress.lock().visible
    }

    /// Waits until the writer has written every event up to `seq`, or the log failed or is
    /// closing.
    fn written_through(&self, seq: u64) {
        if self.visible().seq >= seq {
            return;
        }
        self.shared.wake();
        let mut progress = self.shared.progress.lock();
        while progress.visible.seq < seq && progress.failure.is_none() {
            let waited = self
                .shared
                .progress_changed
                .wait_for(&mut progress, Duration::from_millis(50));
            if waited.timed_out() && self.shared.queue.lock().stop {
                return;
            }
        }
    }

    /// Calls `visit` with every event after `after`, in order, read in place from the segments,
    /// until it returns false. Errors name the segment, offset and event; a gap is an error.
    pub fn scan(
        &self,
        after: u64,
        mut visit: impl FnMut(RawEvent<'_>) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let _files = self.compaction.files.read();
        self.scan_from(after, None, &mut visit).map(|_| ())
    }

    /// `scan`, optionally starting at a known record (`(first seq, segment, offset)`); returns
    /// where the record holding the last visited event starts.
    fn scan_from(
        &self,
        after: u64,
        hint: Option<(u64, u64, u64)>,
        visit: &mut dyn FnMut(RawEvent<'_>) -> Result<bool, Error>,
    ) -> Result<Option<(u64, u64, u64)>, Error> {
        let visible = self.visible();
        let segments = self.shared.segments.lock().clone();
        if let Some(faults) = self.shared.faults.as_deref() {
            faults.scans.wait();
        }
        let wanted = after.saturating_add(1);
        let index = segments
            .partition_point(|first| *first <= wanted)
            .saturating_sub(1);
        let mut stopped_at = None;
        // The segment before (its first event) and the event its events end before.
        let mut expected_first: Option<(u64, u64)> = None;
        for &first in &segments[index..] {
            if first > visible.segment {
                break;
            }
            if let Some((previous, expected)) = expected_first {
                if let Some(problem) = segment_boundary_problem(previous, expected, first) {
                    return Err(storage("the log", problem));
                }
            }
            let path = segment_path(&self.shared.events_dir, first);
            let limit = (first == visible.segment).then_some(visible.end);
            let (offset, mut next) = match hint {
                Some((hint_seq, hint_segment, hint_offset))
                    if hint_segment == first && hint_seq <= wanted && expected_first.is_none() =>
                {
                    (hint_offset, hint_seq)
                }
                _ => (0, first),
            };
            let mut reader = FrameReader::open(path.clone(), first, offset, limit)?;
            while let Some((at, payload)) = reader.next(next)? {
                let view = RecordView::parse(payload)
                    .ok_or_else(|| damage(&path, at as usize, next, NO_SOUND_HEADER))?;
                if view.first_seq != next || view.count == 0 {
                    return Err(damage(&path, at as usize, next, out_of_place(&view, next)));
                }
                next = view.last_seq() + 1;
                if view.last_seq() <= after {
                    continue;
                }
                stopped_at = Some((view.first_seq, first, at));
                let went_on = view
                    .for_each(|event| {
                        if event.seq <= after {
                            Ok(true)
                        } else {
                            visit(event)
                        }
                    })
                    .map_err(|error| record_problem(&path, at as usize, error))?;
                if !went_on {
                    return Ok(stopped_at);
                }
            }
            expected_first = Some((first, next));
        }
        Ok(stopped_at)
    }

    /// Reads up to `limit` events with sequence numbers greater than `after`, in order. In
    /// `None` and `Interval` modes that includes every event appended before the call (the
    /// writer is asked to write them first); in `Sync` mode, every event durable by then.
    ///
    /// `after` 0 reads from the oldest event still kept (after compaction, not event 1). Any
    /// other `after` older than that is an error naming what was compacted away, never a
    /// silent jump over the gap: a billing reader whose cursor fell behind the retention must
    /// hear that it lost events.
    /// An `after` past the last event appended is an error too (`InvalidArgument` "after").
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, Error> {
        if limit > 0 && self.shared.durability != Durability::Sync && !self.read_only {
            self.written_through(self.last_appended());
        }
        let _files = self.compaction.files.read();
        let start = self.log_start()?;
        if after > 0 && after.saturating_add(1) < start {
            return Err(Error::invalid(
                "after",
                format!(
                    "events {} to {} were compacted away (older than the log's retention) \
                     before being read after {after}: the log now starts at event {start}; read \
                     after {} to go on without them, or after 0 from the oldest event kept",
                    after + 1,
                    start - 1,
                    start - 1
                ),
            ));
        }
        // Past the last event appended no reader was handed: answered with nothing, a reader
        // polling from there would skip, unseen, the events that take those numbers.
        let next = self.next_seq();
        if after >= next {
            return Err(Error::invalid(
                "after",
                format!(
                    "{after} is past the end of the log: its last event is event {}",
                    next - 1
                ),
            ));
        }
        let mut out = Vec::with_capacity(limit.min(4_096));
        if limit == 0 {
            return Ok(out);
        }
        let hint = *self.compaction.resume.lock();
        let hint = hint.filter(|(seq, _, _)| *seq <= after.saturating_add(1));
        let stopped = self.scan_from(after, hint, &mut |event| {
            out.push(decode_raw(event)?);
            Ok(out.len() < limit)
        })?;
        if stopped.is_some() {
            *self.compaction.resume.lock() = stopped;
        }
        Ok(out)
    }

    /// The torn write a read-only open found at the end of the log, which an open that writes
    /// cuts off: not a problem (it was never acknowledged), but `verify` says so.
    pub fn torn_tail(&self) -> Option<&str> {
        self.open_torn_tail.as_deref()
    }

    /// Walks every segment from the start (for `verify` and tools), checking each header,
    /// frame (length and crc), record shape and that sequence numbers are gap-free; calls
    /// `record` with each sound record. Returns everything found wrong, going on with the next
    /// segment after damage.
    pub fn walk(&self, mut record: impl FnMut(&RecordView<'_>)) -> Vec<String> {
        let visible = self.visible();
        let segments = self.shared.segments.lock().clone();
        let mut problems: Vec<String> = self.open_problem.iter().cloned().collect();
        // The segment before (its first event) and the event its events end before.
        let mut expected: Option<(u64, u64)> = None;
        for &first in &segments {
            if first > visible.segment {
                break;
            }
            if let Some((previous, expected)) = expected {
                problems.extend(segment_boundary_problem(previous, expected, first));
            }
            let path = segment_path(&self.shared.events_dir, first);
            let limit = (first == visible.segment).then_some(visible.end);
            let mut reader = match FrameReader::open(path.clone(), first, 0, limit) {
                Ok(reader) => reader,
                Err(error) => {
                    // A last segment's damaged header is the open's problem already.
                    let problem = error.to_string();
                    if self.open_problem.as_ref() != Some(&problem) {
                        problems.push(problem);
                    }
                    expected = None;
                    continue;
                }
            };
            let mut next = first;
            // Damage hides where the segment's events end: the next segment's start is then
            // not checked against them (it would be reported as a gap no event fell into).
            let mut readable = true;
            loop {
                match reader.next(next) {
                    Ok(None) => break,
                    Err(error) => {
                        problems.push(error.to_string());
                        readable = false;
                        break;
                    }
                    Ok(Some((at, payload))) => {
                        let Some(view) = RecordView::parse(payload) else {
                            problems.push(
                                damage(&path, at as usize, next, NO_SOUND_HEADER).to_string(),
                            );
                            readable = false;
                            break;
                        };
                        if view.first_seq != next {
                            problems.push(format!(
                                "log segment {}, offset {at}: event {} follows event {}: a gap",
                                segment_name(first),
                                view.first_seq,
                                next - 1
                            ));
                        } else if view.count == 0 {
                            // As an open or a replay refuses it (the same words: listed once).
                            problems.push(
                                damage(&path, at as usize, next, out_of_place(&view, next))
                                    .to_string(),
                            );
                        }
                        if let Err(error) = view.for_each(|_| Ok(true)) {
                            problems.push(record_problem(&path, at as usize, error).to_string());
                        } else {
                            record(&view);
                        }
                        next = view.last_seq() + 1;
                    }
                }
            }
            expected = readable.then_some((first, next));
        }
        problems
    }

    /// Every record, decoded and owned, in order (tools and tests; `walk` and `scan` read in
    /// place).
    pub fn records(&self) -> Result<Vec<Record>, Error> {
        let mut records = Vec::new();
        let mut failure = None;
        let problems = self.walk(|view| match view.to_record() {
            Ok(record) => records.push(record),
            Err(_) => failure = Some(view.first_seq),
        });
        if let Some(problem) = problems.into_iter().next() {
            return Err(Error::Storage { problem });
        }
        if let Some(first) = failure {
            return Err(storage("the log", format!("record of event {first}")));
        }
        Ok(records)
    }

    /// The first sequence number still in the log (older ones were compacted away).
    pub fn log_start(&self) -> Result<u64, Error> {
        Ok(self.shared.segments.lock().first().copied().unwrap_or(1))
    }

    /// First sequence numbers of the segments, oldest first.
    pub fn segments(&self) -> Vec<u64> {
        self.shared.segments.lock().clone()
    }

    // -----------------------------------------------------------------------------------------
    // Snapshots.

    pub fn snapshot_pointer(&self) -> Result<Option<SnapshotPointer>, Error> {
        Ok(latest_snapshots(&self.snapshots_dir)?.first().copied())
    }

    pub fn previous_snapshot_pointer(&self) -> Result<Option<SnapshotPointer>, Error> {
        previous_snapshot(&self.snapshots_dir)
    }

    /// Stores a snapshot covering events up to `seq` durably (temporary file, fsync, rename,
    /// directory fsync). Keeps the one before (for `verify`) and deletes older ones.
    /// `usage_bytes` is what the snapshot's keys' usage took in memory: kept in the header as
    /// a hint for the open (see `SnapshotBytes::usage_hint`).
    pub fn write_snapshot(
        &self,
        seq: u64,
        usage_bytes: usize,
        bytes: &[u8],
    ) -> Result<SnapshotPointer, Error> {
        store_snapshot(&self.snapshots_dir, seq, usage_bytes, bytes)
    }

    /// Encodes and stores a snapshot covering events up to `seq` on a thread of its own:
    /// `encode` is called there with a `store` to hand its bytes to, which stores them once
    /// the log is durable up to `seq`, after recording that its events were logged by
    /// `logged_by_ms` (`record_logged_by`; so the encoder can keep its buffer for the next
    /// snapshot). One at a time: call `finish_snapshot_in_background` before the next.
    /// An error if the thread could not be started (the snapshot is then not written).
    pub fn write_snapshot_in_background(
        &self,
        seq: u64,
        (logged_by_ms, ids_forgotten_before_ms): (u64, u64),
        encode: EncodeSnapshot,
    ) -> Result<(), Error> {
        let shared = Arc::clone(&self.shared);
        let snapshots_dir = self.snapshots_dir.clone();
        let record_logged_by = self.logged_by_recorder();
        let handle = std::thread::Builder::new()
            .name("tally-snapshot".into())
            .spawn(move || {
                encode(&mut |bytes, usage_bytes| {
                    let panic = shared
                        .faults
                        .as_deref()
                        .is_some_and(|faults| Faults::take(&faults.panic_snapshots));
                    assert!(!panic, "injected: the snapshot thread panics");
                    Self::wait_durable(&shared, seq)?;
                    // Recorded before the snapshot is stored (see `Engine::checkpoint`).
                    record_logged_by(seq, logged_by_ms, ids_forgotten_before_ms)?;
                    store_snapshot(&snapshots_dir, seq, usage_bytes, bytes).map(|_| ())
                })
            })
            .map_err(|error| storage("starting the snapshot thread", error))?;
        *self.snapshot_thread.lock() = Some(handle);
        Ok(())
    }

    /// Waits until the log is durable up to `seq` (asking for it with `Sync`, syncing it
    /// otherwise).
    fn wait_durable(shared: &Shared, seq: u64) -> Result<(), Error> {
        if shared.durability == Durability::Sync {
            shared.demand(seq);
        }
        shared.wake();
        let mut progress = shared.progress.lock();
        loop {
            if let Some((failed_seq, problem)) = &progress.failure {
                return Err(failed(*failed_seq, problem));
            }
            if progress.visible.seq >= seq {
                break;
            }
            shared.progress_changed.wait(&mut progress);
        }
        drop(progress);
        if shared.durability != Durability::Sync {
            shared.sync_active_file()?;
        }
        Ok(())
    }

    /// Waits for a snapshot being written in the background; returns its error, if any.
    pub fn finish_snapshot_in_background(&self) -> Result<(), Error> {
        let handle = self.snapshot_thread.lock().take();
        match handle.map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(storage("writing a snapshot", "its thread panicked")),
        }
    }

    /// The body of the snapshot at `pointer`, its header and checksum checked.
    pub fn read_snapshot(&self, pointer: &SnapshotPointer) -> Result<SnapshotBytes, Error> {
        let path = self.snapshots_dir.join(format!("{:020}.snap", pointer.seq));
        let bytes = SnapshotBytes::read(&path)
            .map_err(|error| storage(format!("reading {}", path.display()), error))?;
        let bad = |why: String| storage(format!("snapshot {}", path.display()), why);
        let file = bytes.file();
        if file.len() < SNAPSHOT_HEADER_BYTES || &file[..8] != SNAPSHOT_MAGIC {
            return Err(bad("not a tally snapshot (bad header)".into()));
        }
        let version = u16::from_le_bytes([file[8], file[9]]);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(bad(format!(
                "format version {version}, but this build reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
            )));
        }
        let seq = u64::from_le_bytes(file[12..20].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(file[20..28].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(file[28..32].try_into().unwrap_or_default());
        if seq != pointer.seq || len != (file.len() - SNAPSHOT_HEADER_BYTES) as u64 {
            return Err(bad(format!(
                "its header says event {seq} and {len} bytes; the file holds {}",
                file.len() - SNAPSHOT_HEADER_BYTES
            )));
        }
        if crc32fast::hash(&file[SNAPSHOT_HEADER_BYTES..]) != crc {
            return Err(bad("damaged (crc mismatch)".into()));
        }
        Ok(bytes)
    }

    // -----------------------------------------------------------------------------------------
    // Export cursors and compaction.

    pub fn cursor(&self, name: &str) -> Result<u64, Error> {
        match self
            .cursors
            .get(name.as_bytes())
            .map_err(|error| storage("reading a cursor", error))?
        {
            None => Ok(0),
            Some(value) => {
                let bytes: [u8; 8] = value
                    .as_ref()
                    .try_into()
                    .map_err(|_| storage("reading a cursor", format!("{name:?} is not 8 bytes")))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Every saved cursor, by name in byte order, with its sequence number (at most
    /// `MAX_CURSORS`). One whose value is not a sequence number's 8 bytes is an error naming
    /// it (`verify` reports it too).
    pub fn cursors(&self) -> Result<Vec<(String, u64)>, Error> {
        let mut cursors = Vec::new();
        for entry in self.cursors.iter() {
            let (name, value) = entry.map_err(|error| storage("reading the cursors", error))?;
            let name = String::from_utf8_lossy(&name).into_owned();
            let bytes: [u8; 8] = value
                .as_ref()
                .try_into()
                .map_err(|_| storage("reading the cursors", format!("{name:?} is not 8 bytes")))?;
            cursors.push((name, u64::from_be_bytes(bytes)));
        }
        Ok(cursors)
    }

    /// What is wrong with the saved cursors, one line each (`verify`): a value that is not a
    /// sequence number's 8 bytes, or one past `last_seq`, the log's last event (a cursor is
    /// saved only once the log is durable through it, so such a one means events are missing or
    /// the cursor is damaged). Reading after either fails. One before the log's start is a
    /// reader that fell behind the retention, which reading after it reports: no problem here.
    pub fn cursor_problems(&self, last_seq: u64) -> Vec<String> {
        let mut problems = Vec::new();
        for entry in self.cursors.iter() {
            let (name, value) = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    problems.push(storage("reading the cursors", error).to_string());
                    break;
                }
            };
            let name = String::from_utf8_lossy(&name);
            match <[u8; 8]>::try_from(value.as_ref()) {
                Err(_) => problems.push(format!(
                    "cursor {name:?} holds {} bytes, not the 8 of a sequence number: damaged",
                    value.len()
                )),
                Ok(bytes) if u64::from_be_bytes(bytes) > last_seq => problems.push(format!(
                    "cursor {name:?} is at event {}, past the log's last event, {last_seq}: \
                     events are missing or the cursor is damaged",
                    u64::from_be_bytes(bytes)
                )),
                Ok(_) => {}
            }
        }
        problems
    }

    /// The options recorded by the last open that recorded any (`record_options`), as stored;
    /// `None` for a database that has none (new, or written by a build before they were).
    pub fn recorded_options(&self) -> Result<Option<Vec<u8>>, Error> {
        self.meta
            .get(META_OPTIONS)
            .map(|value| value.map(|bytes| bytes.to_vec()))
            .map_err(|error| storage("reading the recorded options", error))
    }

    /// Records the options durably, unless the same bytes are recorded already. The bytes are
    /// `options::RecordedOptions::encode`'s (anything else is read back as a damaged record).
    /// Refused on a read-only log.
    pub fn record_options(&self, bytes: &[u8]) -> Result<(), Error> {
        if self.read_only {
            return Err(storage(
                self.dir.display(),
                "opened read-only: nothing is recorded",
            ));
        }
        if self.recorded_options()?.as_deref() == Some(bytes) {
            return Ok(());
        }
        self.meta
            .insert(META_OPTIONS, bytes)
            .map_err(|error| storage("recording the options", error))?;
        self.syncer.flush(&self.db)
    }

    /// Saves a named cursor durably (it survives restarts). A new name is refused once
    /// `MAX_CURSORS` are saved (`CapacityExceeded`, nothing written); an existing one is
    /// always saved. Refused on a read-only log.
    pub fn save_cursor(&self, name: &str, seq: u64) -> Result<(), Error> {
        if self.read_only {
            return Err(storage(
                self.dir.display(),
                "opened read-only: nothing is saved",
            ));
        }
        let saving = self.cursor_saves.lock();
        let known = self
            .cursors
            .contains_key(name.as_bytes())
            .map_err(|error| storage("reading a cursor", error))?;
        // `len` walks the tree: at most `MAX_CURSORS` entries (more only in a database saved
        // before the bound), and only for a name not saved yet.
        if !known && self.cursors.len() as u64 >= MAX_CURSORS {
            return Err(Error::CapacityExceeded {
                what: "cursors",
                capacity: MAX_CURSORS,
            });
        }
        self.cursors
            .insert(name.as_bytes(), &seq.to_be_bytes())
            .map_err(|error| storage("saving a cursor", error))?;
        drop(saving);
        self.syncer.flush(&self.db)
    }

    /// Deletes a named cursor durably, freeing its place under `MAX_CURSORS`; whether it was
    /// saved. Refused on a read-only log.
    pub fn delete_cursor(&self, name: &str) -> Result<bool, Error> {
        if self.read_only {
            return Err(storage(
                self.dir.display(),
                "opened read-only: nothing is deleted",
            ));
        }
        let saving = self.cursor_saves.lock();
        let removed = self
            .cursors
            .remove(name.as_bytes())
            .map_err(|error| storage("deleting a cursor", error))?;
        drop(saving);
        if removed.is_none() {
            return Ok(false);
        }
        self.syncer.flush(&self.db)?;
        Ok(true)
    }

    /// Records that every event up to `seq` was logged by `clock_ms` on the engine's clock
    /// (unless it is recorded already: the earlier time stays), durably. Call it only once
    /// the log is durable through `seq` (a record naming events a crash then lost would date
    /// the events that take their numbers after it too early), and before a snapshot of
    /// `seq` is stored: the open bounds the request ids a snapshot may have forgotten by the
    /// latest record (`latest_logged_by_ms`), so a snapshot must never be found without its
    /// record. With it, that the request-id shards refused new ids stamped before
    /// `ids_forgotten_before_ms` at the cut (`META_IDS_FORGOTTEN_BEFORE`), replacing the
    /// previous checkpoint's. Refused on a read-only log.
    pub fn record_logged_by(
        &self,
        seq: u64,
        clock_ms: u64,
        ids_forgotten_before_ms: u64,
    ) -> Result<(), Error> {
        self.logged_by_recorder()(seq, clock_ms, ids_forgotten_before_ms)
    }

    /// `record_logged_by` for a snapshot thread: records into this log's `meta` (sled's
    /// trees are shared handles), with the same care.
    fn logged_by_recorder(&self) -> impl Fn(u64, u64, u64) -> Result<(), Error> + Send + 'static {
        let writable = (!self.read_only)
            .then(|| (self.meta.clone(), self.db.clone(), Arc::clone(&self.syncer)));
        move |seq, clock_ms, ids_forgotten_before_ms| match &writable {
            Some((meta, db, syncer)) => {
                record_logged_by(meta, seq, clock_ms)?;
                let mut value = [0u8; 16];
                value[..8].copy_from_slice(&seq.to_le_bytes());
                value[8..].copy_from_slice(&ids_forgotten_before_ms.to_le_bytes());
                meta.insert(META_IDS_FORGOTTEN_BEFORE, &value[..])
                    .map_err(|error| {
                        storage("recording which request ids were forgotten", error)
                    })?;
                syncer.flush(db)
            }
            None => Err(storage("the log", "opened read-only: nothing is recorded")),
        }
    }

    /// What is wrong with the records of when events were logged, one line each (`verify`): a
    /// key or a value that does not read back (`compact` fails on it), or a record naming an
    /// event past `last_seq`, the log's last (one is written only once the log is durable
    /// through its event, so such a one is damage: the events that take its number later
    /// would count as logged at its time, and go before a reader had the retention).
    pub fn logged_by_problems(&self, last_seq: u64) -> Vec<String> {
        let mut problems = Vec::new();
        for entry in self.meta.scan_prefix(META_LOGGED_BY) {
            let (key, value) = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    problems.push(storage("reading when events were logged", error).to_string());
                    break;
                }
            };
            match logged_by_record(&key, &value) {
                Err(problem) => problems.push(problem),
                Ok(_) => {
                    let seq = logged_by_seq(&key).unwrap_or_default();
                    if seq > last_seq {
                        problems.push(format!(
                            "the record that events up to {seq} were logged is past the log's \
                             last event, {last_seq}: events are missing or the record is damaged"
                        ));
                    }
                }
            }
        }
        problems
    }

    /// The earliest clock time recorded by which every event up to `seq` was logged (the
    /// record of the first sequence number at or after it); `None` when none covers it yet.
    pub fn logged_by_ms(&self, seq: u64) -> Result<Option<u64>, Error> {
        self.compactor().logged_by_ms(seq)
    }

    /// The latest checkpoint's record of the bound its request-id shards refused new ids
    /// stamped before (`META_IDS_FORGOTTEN_BEFORE`), as `(its seq, the bound in ms)`. `None`
    /// when none is recorded (a database no checkpoint of this build covers) or it does not
    /// read back.
    pub fn ids_forgotten_before(&self) -> Option<(u64, u64)> {
        let value = self.meta.get(META_IDS_FORGOTTEN_BEFORE).ok()??;
        let value = <[u8; 16]>::try_from(&value[..]).ok()?;
        let (seq, bound) = value.split_at(8);
        Some((
            u64::from_le_bytes(seq.try_into().ok()?),
            u64::from_le_bytes(bound.try_into().ok()?),
        ))
    }

    /// The last reservation id recorded as handed out at most (`META_RESERVATION_IDS_THROUGH`);
    /// 0 when none is (a new database, or one only earlier builds ran). A value that does not
    /// read back (not 8 bytes, or 2^64 - 1) is an error naming it: an open that went on
    /// without it could hand out an id again; `verify` reports it.
    pub fn reservation_ids_through(&self) -> Result<u64, Error> {
        let value = self
            .meta
            .get(META_RESERVATION_IDS_THROUGH)
            .map_err(|error| storage("reading the last reservation id handed out", error))?;
        match value {
            None => Ok(0),
            Some(value) => match <[u8; 8]>::try_from(&value[..]) {
                // No id is left after it (an id of 2^64 - 1 is refused, as a snapshot's last
                // one is): an engine going on from it would wrap to id 1.
                Ok(bytes) if u64::from_le_bytes(bytes) == u64::MAX => Err(storage(
                    "reading the last reservation id handed out",
                    "the record `reservation_ids_through` is 2^64 - 1, past the last id: damaged",
                )),
                Ok(bytes) => Ok(u64::from_le_bytes(bytes)),
                Err(_) => Err(storage(
                    "reading the last reservation id handed out",
                    format!(
                        "the record `reservation_ids_through` is {} bytes, not 8: damaged",
                        value.len()
                    ),
                )),
            },
        }
    }

    /// Records, durably (sled flushed before it returns), that reservation ids up to
    /// `through` may be handed out (`reservation_ids_through`). Refused on a read-only log.
    pub fn record_reservation_ids_through(&self, through: u64) -> Result<(), Error> {
        if self.read_only {
            return Err(storage("the log", "opened read-only: nothing is recorded"));
        }
        if let Some(faults) = self.shared.faults.as_deref() {
            faults.id_records.wait();
            if Faults::take(&faults.fail_id_records) {
                return Err(storage(
                    "recording the last reservation id handed out",
                    "injected fault",
                ));
            }
        }
        self.meta
            .insert(META_RESERVATION_IDS_THROUGH, &through.to_le_bytes()[..])
            .map_err(|error| storage("recording the last reservation id handed out", error))?;
        self.syncer.flush(&self.db)
    }

    /// The latest clock time a checkpoint recorded (`record_logged_by`): the engine's clock
    /// read at least that far while it ran. `None` when none is recorded; a record that does
    /// not read back is left out (`verify` reports it).
    pub fn latest_logged_by_ms(&self) -> Option<u64> {
        self.meta
            .scan_prefix(META_LOGGED_BY)
            .filter_map(|entry| {
                let (key, value) = entry.ok()?;
                logged_by_record(&key, &value).ok()
            })
            .max()
    }

    /// Deletes whole sealed segments, oldest first, whose every event is at or before
    /// `up_to_seq`, stamped before `before_ms`, and was logged by `logged_by_ms` on the
    /// engine's clock (`Compactor::compact`); returns how many events they held.
    pub fn compact(&self, up_to_seq: u64, before_ms: u64, logged_by_ms: u64) -> Result<u64, Error> {
        self.compactor().compact(up_to_seq, before_ms, logged_by_ms)
    }

    /// A handle that compacts this log from another thread (the snapshot thread's, after a
    /// periodic checkpoint).
    pub fn compactor(&self) -> Compactor {
        Compactor {
            shared: Arc::clone(&self.shared),
            meta: self.meta.clone(),
            snapshots_dir: self.snapshots_dir.clone(),
            state: Arc::clone(&self.compaction),
        }
    }

    /// Bytes the database uses on disk: segments, snapshots and sled.
    pub fn size_on_disk(&self) -> Result<u64, Error> {
        let files = |dir: &Path| -> u64 {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter_map(|entry| entry.metadata().ok())
                        .map(|metadata| metadata.len())
                        .sum()
                })
                .unwrap_or(0)
        };
        let sled = self
            .db
            .size_on_disk()
            .map_err(|error| storage("measuring the database", error))?;
        Ok(files(&self.shared.events_dir) + files(&self.snapshots_dir) + sled)
    }

    /// Stops the writer after it has written and flushed everything queued.
    pub fn close(&self) -> Result<(), Error> {
        let snapshot = self.finish_snapshot_in_background();
        {
            let mut queue = self.shared.queue.lock();
            queue.stop = true;
            self.shared.writer_poked.store(true, Ordering::Relaxed);
        }
        self.shared.queue_ready.notify_all();
        self.shared.queue_room.notify_all();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        let failure = self.shared.progress.lock().failure.clone();
        if let Some((seq, problem)) = failure {
            return Err(failed(seq, &problem));
        }
        // An open refused before `finish_open` leaves everything as it found it.
        if self.read_only || self.pending.lock().is_some() {
            return Ok(());
        }
        // Failed, it fails the log: a later close (the drop after this one) must not find it
        // clean.
        self.shared.sync_active_file()?;
        // Everything written is durable now: say so for the next open (made durable by the
        // flush below, with the rest of sled's writes).
        let written = self.shared.progress.lock().written.seq;
        if written > 0 && clean_close_point(&self.meta)? < written {
            self.meta
                .insert(META_DURABLE_THROUGH, &written.to_le_bytes())
                .map_err(|error| storage("writing metadata", error))?;
        }
        self.syncer.flush(&self.db)?;
        snapshot
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// `Sync`: the writer's poll after an idle stretch of `idle` that followed a poll of `poll`:
/// as long as `WRITER_POLL` if the stretch was that short (such a poll would have caught the
/// work), else half of `poll`, and none once that falls under an eighth of `WRITER_POLL`.
fn adapted_poll(poll: Duration, idle: Duration) -> Duration {
    if idle <= WRITER_POLL {
        WRITER_POLL
    } else if poll / 2 < WRITER_POLL / 8 {
        Duration::ZERO
    } else {
        poll / 2
    }
}

/// Between two looks of a poll (`WRITER_POLL`, `CALLER_POLL_MAX`): 64 pause instructions
/// (0.6 us here), and every `POLL_YIELD_EVERY`th time a yield of the core instead.
fn pause_or_yield(polls: &mut u32) {
    *polls = polls.wrapping_add(1);
    if *polls % POLL_YIELD_EVERY == 0 {
        std::thread::yield_now();
    } else {
        for _ in 0..64 {
            std::hint::spin_loop();
        }
    }
}

/// The newest segment recorded as created (`META_LAST_SEGMENT`), 0 if none is recorded.
fn last_created_segment(meta: &sled::Tree) -> Result<u64, Error> {
    recorded_seq(meta, META_LAST_SEGMENT)
}

/// The last event a clean close found durable (`META_DURABLE_THROUGH`), 0 if none did.
fn clean_close_point(meta: &sled::Tree) -> Result<u64, Error> {
    recorded_seq(meta, META_DURABLE_THROUGH)
}

/// A sequence number recorded in `meta` under `key` (u64 LE), 0 if none is. A value of another
/// length is damage, refused naming the key: read as 0, it would turn off the check it feeds.
fn recorded_seq(meta: &sled::Tree, key: &[u8]) -> Result<u64, Error> {
    let name = String::from_utf8_lossy(key);
    let Some(bytes) = meta
        .get(key)
        .map_err(|error| storage(format!("reading metadata `{name}`"), error))?
    else {
        return Ok(0);
    };
    match <[u8; 8]>::try_from(bytes.as_ref()) {
        Ok(bytes) => Ok(u64::from_le_bytes(bytes)),
        Err(_) => Err(storage(
            format!("metadata `{name}`"),
            format!(
                "holds {} bytes, not the 8 of a sequence number: damaged",
                bytes.len()
            ),
        )),
    }
}

/// Records in `meta` that the events up to `seq` were logged by `clock_ms`, unless a record of
/// them is there already: the first is the earliest (a later checkpoint with nothing logged
/// since cuts at the same event, and its later time would hold their compaction back). The
/// records before it that say a later time are lowered to `clock_ms`, as their events, before
/// `seq`, were logged by then too: a clock read far ahead at one checkpoint recorded its
/// events as logged a year on, and compaction (oldest first) removed neither its segments nor
/// any later one until the real clock passed that time plus the retention. So the records'
/// times never fall as their events rise, and the walk back stops at the first one not past
/// `clock_ms` (one read, but after such a glitch).
fn record_logged_by(meta: &sled::Tree, seq: u64, clock_ms: u64) -> Result<(), Error> {
    let recording = |error| storage("recording when events were logged", error);
    let recorded = meta
        .compare_and_swap(
            logged_by_key(seq),
            None as Option<&[u8]>,
            Some(&clock_ms.to_le_bytes()[..]),
        )
        .map_err(recording)?;
    // Recorded already: kept, and so were the ones before it.
    if recorded.is_err() {
        return Ok(());
    }
    let mut later = Vec::new();
    for entry in meta.range(logged_by_key(0)..logged_by_key(seq)).rev() {
        let (key, value) = entry.map_err(recording)?;
        // One that does not read back is left as it is (`verify` reports it).
        match logged_by_record(&key, &value) {
            Ok(logged_ms) if logged_ms > clock_ms => later.push(key),
            Ok(_) => break,
            Err(_) => {}
        }
    }
    for key in later {
        meta.insert(key, &clock_ms.to_le_bytes()[..])
            .map_err(recording)?;
    }
    Ok(())
}

/// The sequence number a `logged_by/` key names, if it is one's 8 bytes.
fn logged_by_seq(key: &[u8]) -> Option<u64> {
    let seq = key.strip_prefix(META_LOGGED_BY)?;
    Some(u64::from_be_bytes(<[u8; 8]>::try_from(seq).ok()?))
}

/// The clock time a `logged_by/` record holds, or what is wrong with it (naming its event).
fn logged_by_record(key: &[u8], value: &[u8]) -> Result<u64, String> {
    let Some(seq) = logged_by_seq(key) else {
        return Err(format!(
            "a record of when events were logged has a key of {} bytes, not `logged_by/` and \
             a sequence number's 8: damaged",
            key.len()
        ));
    };
    match <[u8; 8]>::try_from(value) {
        Ok(bytes) => Ok(u64::from_le_bytes(bytes)),
        Err(_) => Err(format!(
            "the record that events up to {seq} were logged holds {} bytes, not the 8 of a \
             time: damaged",
            value.len()
        )),
    }
}

/// The `meta` key of the record of when the events up to `seq` were logged.
fn logged_by_key(seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(META_LOGGED_BY.len() + 8);
    key.extend_from_slice(META_LOGGED_BY);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `Interval` and `None`: a failed fdatasync's error, saying that answered events (`which`,
/// those written since the last fdatasync that succeeded) may be lost. The log fails only from
/// the first event not written (those before it were answered, and may well be on disk), so
/// `failed`'s "nothing from then on was kept" alone read as if everything before were safe.
fn may_be_missing(error: Error, which: &str) -> Error {
    match error {
        Error::Storage { problem } => Error::Storage {
            problem: format!(
                "{problem}; {which} written since the last fdatasync that succeeded and may be \
                 missing after a reopen"
            ),
        },
        other => other,
    }
}

fn failed(seq: u64, problem: &str) -> Error {
    Error::Storage {
        problem: format!("the log failed at event {seq} ({problem}); nothing from then on was kept; reopen the engine"),
    }
}

/// Stores a snapshot durably (temporary file, fsync, rename, directory fsync); keeps the one
/// before it and deletes older ones.
fn store_snapshot(
    snapshots_dir: &Path,
    seq: u64,
    usage_bytes: usize,
    bytes: &[u8],
) -> Result<SnapshotPointer, Error> {
    let name = format!("{seq:020}.snap");
    let path = snapshots_dir.join(&name);
    let temporary = snapshots_dir.join(format!("{name}.tmp"));
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    header[..8].copy_from_slice(SNAPSHOT_MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let hint = usage_bytes
        .div_ceil(SNAPSHOT_HINT_UNIT)
        .min(usize::from(u16::MAX)) as u16;
    header[10..12].copy_from_slice(&hint.to_le_bytes());
    header[12..20].copy_from_slice(&seq.to_le_bytes());
    header[20..28].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    header[28..32].copy_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temporary)?;
        file.write_all(&header)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)
    };
    write().map_err(|error| storage(format!("writing snapshot {}", path.display()), error))?;
    sync_dir(snapshots_dir)?;
    let kept = latest_snapshots(snapshots_dir)?;
    let mut removed = false;
    for old in list_snapshots(snapshots_dir)? {
        if kept.iter().take(2).all(|pointer| pointer.seq != old) {
            let _ = std::fs::remove_file(snapshots_dir.join(format!("{old:020}.snap")));
            removed = true;
        }
    }
    if removed {
        sync_dir(snapshots_dir)?;
    }
    Ok(SnapshotPointer {
        seq,
        bytes: bytes.len() as u64,
    })
}

fn list_snapshots(dir: &Path) -> Result<Vec<u64>, Error> {
    let entries = match std::fs::read_dir(dir) {
        // Missing: none yet (an open makes it once nothing refused it; `verify` reads it so).
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        read => read.map_err(|error| storage(format!("reading {}", dir.display()), error))?,
    };
    let mut seqs: Vec<u64> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            // Only a snapshot's own name (20 digits, as `store_snapshot` writes it): another
            // number (`7.snap`, an operator's copy) named the same event again, read through
            // the snapshot's real name.
            let name = entry.file_name();
            let stem = name.to_str()?.strip_suffix(".snap")?;
            let digits = stem.len() == 20 && stem.bytes().all(|byte| byte.is_ascii_digit());
            digits.then(|| stem.parse().ok()).flatten()
        })
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// The snapshots, newest first.
/// The snapshot before the latest: what compaction keeps the events after, so `verify` can
/// replay from it to the latest.
fn previous_snapshot(dir: &Path) -> Result<Option<SnapshotPointer>, Error> {
    Ok(latest_snapshots(dir)?.get(1).copied())
}

fn latest_snapshots(dir: &Path) -> Result<Vec<SnapshotPointer>, Error> {
    let mut pointers = Vec::new();
    for seq in list_snapshots(dir)?.into_iter().rev() {
        let path = dir.join(format!("{seq:020}.snap"));
        let len = std::fs::metadata(&path)
            .map_err(|error| storage(format!("reading {}", path.display()), error))?
            .len();
        pointers.push(SnapshotPointer {
            seq,
            bytes: len.saturating_sub(SNAPSHOT_HEADER_BYTES as u64),
        });
    }
    Ok(pointers)
}

/// A crash while writing a snapshot leaves its temporary file: it was never renamed, so never
/// used.
fn remove_temporary_snapshots(dir: &Path) -> Result<(), Error> {
    let entries = std::fs::read_dir(dir)
        .map_err(|error| storage(format!("reading {}", dir.display()), error))?;
    for entry in entries.filter_map(Result::ok) {
        if entry.file_name().to_string_lossy().ends_with(".snap.tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Refuses an empty path: it names no directory, and sled would open the working directory
/// (writing its files there) before anything else noticed.
fn check_dir_named(dir: &Path) -> Result<(), Error> {
    if dir.as_os_str().is_empty() {
        return Err(Error::invalid(
            "dir",
            "is empty: name the database's directory",
        ));
    }
    Ok(())
}

/// Refuses a foreign directory.
fn prepare_directory(dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        return std::fs::create_dir_all(dir)
            .map_err(|error| storage(format!("creating {}", dir.display()), error));
    }
    if !dir.is_dir() {
        return Err(storage(dir.display(), "is not a directory"));
    }
    let is_empty = std::fs::read_dir(dir)
        .map_err(|error| storage(format!("reading {}", dir.display()), error))?
        .next()
        .is_none();
    // A database: sled's `db` and `conf` files, or nothing but what a database holds (one
    // whose creation was cut short). A name alone is not enough: a project folder with a `db`
    // directory, or a folder of the operator's files with a `conf` among them, was taken for
    // one, and sled wrote (or overwrote) its files into it.
    if !is_empty && !holds_sled_files(dir) && !holds_only_database_entries(dir) {
        return Err(storage(
            dir.display(),
            "exists and holds files that are not a tally database; choose an empty or new directory",
        ));
    }
    if let Some(problem) = lost_sled_files(dir) {
        return Err(storage(dir.display(), problem));
    }
    Ok(())
}

/// What is wrong with `dir` if it holds a log segment or a snapshot but not sled's `db` and
/// `conf` files: a database that lost them (its format, recorded options, export cursors and
/// the records that check the log is whole), not one whose creation was cut short (sled's
/// files are made, and their directory entries fsynced, before `events/` and `snapshots/`).
/// Opened as new, it ran on without them; taken by the `tally` commands for a creation cut
/// short, a refused command removed what it believed it had made: the log and snapshots.
pub fn lost_sled_files(dir: &Path) -> Option<String> {
    let missing: Vec<&str> = ["db", "conf"]
        .into_iter()
        .filter(|name| !dir.join(name).is_file())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let holds = |sub: &str, suffix: &str| {
        std::fs::read_dir(dir.join(sub)).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|entry| entry.file_name().to_string_lossy().ends_with(suffix))
        })
    };
    let holding = match (holds(EVENTS_DIR, ".seg"), holds(SNAPSHOTS_DIR, ".snap")) {
        (true, true) => format!("log segments in {EVENTS_DIR}/ and snapshots in {SNAPSHOTS_DIR}/"),
        (true, false) => format!("log segments in {EVENTS_DIR}/"),
        (false, true) => format!("snapshots in {SNAPSHOTS_DIR}/"),
        (false, false) => return None,
    };
    let (files, are) = match missing.len() {
        1 => ("file", "is"),
        _ => ("files", "are"),
    };
    Some(format!(
        "holds {holding} but sled's {} {files} {are} missing: a damaged database (its metadata \
         and export cursors are gone), not a new one; restore the missing {files} from a backup",
        missing.join(" and "),
    ))
}

/// Whether the directory `dir` holds sled's `db` and `conf` files: a database (a name alone is
/// not: a project's `db` directory, an operator's `conf`).
pub fn holds_sled_files(dir: &Path) -> bool {
    dir.join("db").is_file() && dir.join("conf").is_file()
}

/// Whether the directory `dir` holds nothing but entries a tally database holds (none at all
/// too): what a database whose creation was cut short may hold, where a new one may be made.
pub fn holds_only_database_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.into_iter().all(|entry| {
            entry.is_ok_and(|entry| {
                of_a_database(&entry.file_name().to_string_lossy(), entry.path().is_dir())
            })
        })
    })
}

/// Whether a directory entry named `name` (a directory if `is_dir`) is one a tally database
/// holds: sled's `db` and `conf` files and its `blobs` directory, the log's segments and the
/// snapshots (directories), sled's `snap.*` files, and the `quarantined-*` sled snapshot
/// leftovers `open_sled` moved aside. A `db` directory is a project's, not sled's.
fn of_a_database(name: &str, is_dir: bool) -> bool {
    match name {
        "db" | "conf" => !is_dir,
        "blobs" | EVENTS_DIR | SNAPSHOTS_DIR => is_dir,
        _ => name.starts_with("snap.") || name.starts_with("quarantined-"),
    }
}

/// Moves aside every `snap.*.generating` file; whether there was one. After a crash in the
/// middle of sled writing its snapshot, that file makes sled refuse to open the database every
/// time (upstream issues 1527 and 1533), though all data is intact without it. Called only
/// while this process holds sled's lock (opened, or refused by sled holding it): while
/// another process holds the database, such a file may be the snapshot its sled is writing
/// as it opens, and moving it would fail that open.
fn move_aside_generating_snapshots(dir: &Path) -> Result<bool, Error> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|error| storage(format!("reading {}", dir.display()), error))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("snap.") && name.ends_with(".generating"))
        .collect();
    for name in &names {
        // Not `snap.*`: sled reads every file so named as one of its snapshots.
        let aside = dir.join(format!("quarantined-{name}"));
        std::fs::rename(dir.join(name), &aside)
            .map_err(|error| storage(format!("moving aside {name}"), error))?;
    }
    Ok(!names.is_empty())
}

/// Opens sled, retrying briefly while a lock from this same process is still being released
/// (the file lock can outlive dropping the database: upstream issue 1234), and once after
/// moving aside a leftover `snap.*.generating` file that made it refuse.
fn open_sled(dir: &Path) -> Result<sled::Db, Error> {
    let config = sled::Config::new().path(dir);
    let mut attempt = 0;
    let mut moved_aside = false;
    loop {
        match config.open() {
            Ok(db) => {
                // Held now: a leftover that did not stop sled is not left for a later open.
                move_aside_generating_snapshots(dir)?;
                return Ok(db);
            }
            Err(error) if error.to_string().contains("could not acquire lock") => {
                attempt += 1;
                if attempt >= LOCK_RETRIES {
                    return Err(storage(
                        dir.display(),
                        "is locked by another process (or another engine in this one); close it first",
                    ));
                }
                std::thread::sleep(LOCK_RETRY_DELAY);
            }
            // sled took the lock before it refused: the file is no open's still going (one
            // started since, in this moment, could be; before, the whole open was exposed).
            Err(_) if !moved_aside && move_aside_generating_snapshots(dir)? => {
                moved_aside = true;
            }
            Err(error) => {
                return Err(storage(
                    format!("{} cannot be opened (damaged?)", dir.display()),
                    error,
                ))
            }
        }
    }
}

/// Checks the database's format version: whether it is an older one this build reads and
/// will write in its own (`EventLog::record_format`; never when `read_only`), and whether it
/// has none yet (a new database: `EventLog::finish_open` records this build's, never when
/// `read_only`).
fn check_format(
    dir: &Path,
    meta: &sled::Tree,
    events_dir: &Path,
    read_only: bool,
) -> Result<(bool, bool), Error> {
    match meta
        .get(META_FORMAT)
        .map_err(|error| storage("reading metadata", error))?
    {
        Some(value) => {
            // Another length is damage (as for `recorded_seq`): read as its first bytes, it
            // ran a database as one of another format.
            let Ok(version) = <[u8; 2]>::try_from(value.as_ref()).map(u16::from_le_bytes) else {
                return Err(storage(
                    format!("{}: metadata `format_version`", dir.display()),
                    format!(
                        "holds {} bytes, not the 2 of a format version: damaged",
                        value.len()
                    ),
                ));
            };
            if version > FORMAT_VERSION {
                return Err(storage(
                    dir.display(),
                    format!("was written in format version {version}; this build reads up to {FORMAT_VERSION}: upgrade tally"),
                ));
            }
            if version < OLDEST_FORMAT_VERSION {
                return Err(storage(
                    dir.display(),
                    format!("was written in format version {version} (the event log inside sled, by a development build); this build reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}: export its events with that build and start a new database"),
                ));
            }
            // Recorded by `EventLog::record_format`, once the open has read the database.
            Ok((version < FORMAT_VERSION && !read_only, false))
        }
        None => {
            let segments = if events_dir.exists() {
                list_segments(events_dir)?
            } else {
                Vec::new()
            };
            if let Some(&first) = segments.first() {
                // Segments that say they are tally's: a database whose metadata was lost
                // (sled opens a damaged or emptied `db` as a new, empty store), not a foreign
                // folder; said so, or the operator takes it for someone else's files.
                let mut magic = [0u8; 8];
                let tallys = File::open(segment_path(events_dir, first))
                    .and_then(|mut file| file.read_exact(&mut magic))
                    .is_ok_and(|()| &magic == SEGMENT_MAGIC);
                return Err(storage(
                    dir.display(),
                    if tallys {
                        "holds tally log segments but its metadata (sled's `db`) records no \
                         format version: the metadata was lost or damaged (its recorded \
                         options, export cursors and durable points with it), not a new \
                         database; restore sled's `db` and `conf` from a backup"
                    } else {
                        "has events but no format version: not a tally database"
                    },
                ));
            }
            // Recorded by the first open that writes, once nothing refused it, and durable
            // before the first segment exists: events without a format version would be
            // refused as not a tally database.
            Ok((false, !read_only))
        }
    }
}

/// Makes sled's writes (meta, cursors) durable: `flush()` only issues `sync_file_range` on
/// Linux (upstream issues 1452 and 1351), so it is followed by `fdatasync` of the `db` file.
/// sled holds no large values any more, so no blob files.
#[derive(Debug)]
struct FileSyncer {
    db_file: Mutex<File>,
}

impl FileSyncer {
    fn new(dir: &Path) -> Result<FileSyncer, Error> {
        let db_file = File::open(dir.join("db"))
            .map_err(|error| storage(format!("opening {}/db", dir.display()), error))?;
        sync_dir(dir)?;
        Ok(FileSyncer {
            db_file: Mutex::new(db_file),
        })
    }

    fn flush(&self, db: &sled::Db) -> Result<(), Error> {
        db.flush()
            .map_err(|error| storage("flushing sled", error))?;
        self.db_file
            .lock()
            .sync_data()
            .map_err(|error| storage("fdatasync of sled's db file", error))
    }
}

struct Writer {
    shared: Arc<Shared>,
    active: Active,
    /// The encoded group, reused.
    buffer: Vec<u8>,
    /// An empty queue vector with capacity, swapped in for the full one.
    spare: Batch,
    /// A new segment is due at this sequence number.
    rotate_at: Option<u64>,
    /// The first event written since the last fdatasync (none: all durable). `Sync` flushes
    /// when asked (`sync_due`), `Interval` when its time is up, `None` only at a segment's end.
    unsynced_from: Option<u64>,
    /// `Interval`: a time before the oldest event written since the last fdatasync was queued
    /// (the writer's take before that event's); the next fdatasync is due `ms` after it.
    /// (Counted from the end of the previous fdatasync, an event queued while a slow one ran
    /// waited for it and then the whole interval again.)
    unsynced_since: Option<Instant>,
    /// `Interval`: when the writer last took the queue's events.
    last_take: Instant,
    /// `Interval`: when the writer's last fdatasync ended (none yet: none since the open). One
    /// `ms` before that lets events written now be flushed at once: a lone event after a
    /// quiet spell is not held the whole interval, which would only lengthen what a power
    /// loss takes.
    last_flush_ended: Option<Instant>,
    /// `Sync`: the active segment's length at its last fdatasync; a failed write or flush cuts
    /// the file back to it.
    durable_len: u64,
    /// Whether this writer has written anything: a segment found full at open is rotated
    /// before the first write, not while idle (an open that only reads a database writes
    /// nothing, not even a new segment's header in this build's format).
    wrote: bool,
    /// `Sync`: how long the writer polls an empty queue before it sleeps (see `WRITER_POLL`).
    poll_for: Duration,
    /// The bytes of the last group written (`write_group`), for `report` to cut off again:
    /// the buffer itself is emptied and trimmed once the group is written.
    group_bytes: u64,
}

impl Writer {
    fn run(mut self) {
        loop {
            let (mut batch, queued_after, stop) = self.next_batch();
            let events = batch.events.len();
            let mut start = 0;
            while start < events {
                // A group is split where a checkpoint asked for a new segment.
                let end = match self.rotate_at {
                    Some(at) if at > batch.events[start].seq => batch.events[start..]
                        .iter()
                        .position(|event| event.seq >= at)
                        .map_or(events, |offset| start + offset),
                    _ => events,
                };
                let result = self.write_group(&batch, start..end);
                if result.is_ok() {
                    self.unsynced_from.get_or_insert(batch.events[start].seq);
                    self.unsynced_since
                        .get_or_insert_with(|| queued_after.unwrap_or_else(Instant::now));
                }
                let failed = result.is_err();
                self.report(batch.events[start].seq, batch.events[end - 1].seq, result);
                if failed {
                    // Later parts fail with it: their callers wait for sequence numbers past
                    // the failure.
                    break;
                }
                start = end;
            }
            batch.clear();
            self.spare = batch;
            if let Err(error) = self.rotate_if_due(None) {
                self.fail(error);
            }
            if self
                .flush_due_at()
                .is_some_and(|at| stop || Instant::now() >= at)
            {
                self.sync_written();
            }
            if self.sync_due(stop) {
                self.sync_written();
            }
            if stop {
                self.cut_zeros_ahead();
                return;
            }
        }
    }

    /// `Interval`: when the events written since the last fdatasync are due to be flushed
    /// (none written: never).
    fn flush_due_at(&self) -> Option<Instant> {
        match self.shared.durability {
            Durability::Interval { ms } if self.unsynced_from.is_some() => {
                let interval = Duration::from_millis(ms);
                // Within the interval of the oldest event's acknowledgement, and at once when
                // no fdatasync ended within the interval before now.
                let of_the_oldest = self.unsynced_since.map(|since| since + interval);
                let of_the_last = self.last_flush_ended.map(|ended| ended + interval);
                Some(match (of_the_oldest, of_the_last) {
                    (_, None) => Instant::now(),
                    (None, Some(last)) => last,
                    (Some(oldest), Some(last)) => oldest.min(last),
                })
            }
            _ => None,
        }
    }

    /// Waits for events (or a rotation, the interval deadline, or stop) and takes them all,
    /// with a time before the first of them was queued (`Interval`). In `None` and `Interval` modes it
    /// first dozes (`WRITER_DOZE`), then sleeps.
    fn next_batch(&mut self) -> (Batch, Option<Instant>, bool) {
        let mut queue = self.shared.queue.lock();
        let mut dozed = false;
        // `Sync`: when the queue was first found empty (the poll adapts to the idle time).
        let mut idle_since = None;
        while queue.batch.events.is_empty() && !queue.stop && queue.rotate_at.is_none() {
            let flush_at = self.flush_due_at();
            if flush_at.is_some_and(|at| Instant::now() >= at) {
                break;
            }
            if !dozed && self.shared.durability != Durability::Sync {
                dozed = true;
                let until = Instant::now() + WRITER_DOZE;
                let until = flush_at.map_or(until, |at| at.min(until));
                self.shared.writer_dozing.store(true, Ordering::Relaxed);
                let _ = self.shared.queue_ready.wait_until(&mut queue, until);
                self.shared.writer_dozing.store(false, Ordering::Relaxed);
                continue;
            }
            if self.shared.durability == Durability::Sync
                && idle_since.is_none()
                && !self.sync_due(false)
            {
                idle_since = Some(Instant::now());
                if !self.poll_for.is_zero() {
                    // Cleared under the lock, where every poke is set: none is lost.
                    self.shared.writer_poked.store(false, Ordering::Relaxed);
                    let appended = self.shared.last_appended.load(Ordering::Relaxed);
                    parking_lot::MutexGuard::unlocked(&mut queue, || self.poll(appended));
                    continue;
                }
            }
            // Say so before looking at the demand: a caller that asks later sees the flag and
            // wakes this thread (`Shared::nudge`).
            self.shared.writer_asleep.store(true, Ordering::SeqCst);
            match (self.shared.durability, flush_at) {
                (Durability::Sync, _) if self.sync_due(false) => break,
                (_, Some(at)) => {
                    if self
                        .shared
                        .queue_ready
                        .wait_until(&mut queue, at)
                        .timed_out()
                    {
                        break;
                    }
                }
                _ => self.shared.queue_ready.wait(&mut queue),
            }
        }
        self.shared.writer_asleep.store(false, Ordering::Relaxed);
        if let Some(since) = idle_since {
            self.poll_for = adapted_poll(self.poll_for, since.elapsed());
        }
        if let Some(at) = queue.rotate_at.take() {
            self.rotate_at = Some(at);
        }
        let batch = std::mem::replace(&mut queue.batch, std::mem::take(&mut self.spare));
        // `Interval`: every event of this batch was queued after the writer's previous take,
        // the time its flush is due from (a little early, never late; the append path reads
        // no clock for it).
        let queued_after = matches!(self.shared.durability, Durability::Interval { .. })
            .then(|| std::mem::replace(&mut self.last_take, Instant::now()));
        let stop = queue.stop;
        drop(queue);
        self.shared.queue_room.notify_all();
        (batch, queued_after, stop)
    }

    /// `Sync`: polls, without the queue's lock, for at most `poll_for`, until an event is queued
    /// after `appended`, a caller asks for a flush, or someone pokes the writer. The caller
    /// looks at the queue again under the lock either way.
    fn poll(&self, appended: u64) {
        let started = Instant::now();
        let mut polls = 0u32;
        while started.elapsed() < self.poll_for {
            // Relaxed: a hint, looked at again under the lock; a change seen late only makes
            // the poll longer, within `poll_for`.
            if self.shared.last_appended.load(Ordering::Relaxed) != appended
                || self.shared.writer_poked.load(Ordering::Relaxed)
                || self.sync_due(false)
            {
                return;
            }
            pause_or_yield(&mut polls);
        }
    }

    fn fail(&self, error: Error) {
        let mut progress = self.shared.progress.lock();
        self.shared.mark_failed(&mut progress, &error);
        self.shared.announce(progress);
    }

    fn flush(&self) -> Result<(), Error> {
        if let Some(faults) = self.shared.faults.as_deref() {
            faults.flushes.wait();
        }
        let _turn = self.shared.flush_turn.lock();
        // An fdatasync outside the writer (`sync`, a snapshot's) covered everything written:
        // another would only repeat it.
        let written = self.shared.progress.lock().written.seq;
        if self.shared.synced_outside.load(Ordering::Relaxed) >= written {
            return Ok(());
        }
        if self
            .shared
            .faults
            .as_deref()
            .is_some_and(|faults| Faults::take(&faults.fail_flushes))
        {
            return Err(storage("fdatasync of the log", "injected fault"));
        }
        self.shared.writer_flushes.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self
            .active
            .file
            .sync_data()
            .map_err(|error| storage("fdatasync of the log", error));
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shared.flush_micros.store(micros, Ordering::Relaxed);
        result
    }

    /// Starts a new segment if one is due: the active one is full, or a checkpoint asked for
    /// one at `next` (the next event to write; `None` when idle: the next sequence number).
    fn rotate_if_due(&mut self, next: Option<u64>) -> Result<(), Error> {
        let about_to_write = next.is_some();
        let written = self.shared.progress.lock().written.seq;
        let next = next.unwrap_or(written + 1);
        let holds_events = written >= self.active.first;
        let asked = self.rotate_at.is_some_and(|at| at <= next);
        if asked && !holds_events {
            self.rotate_at = None;
        }
        let full = self.active.len >= self.shared.segment_bytes && (self.wrote || about_to_write);
        if !holds_events || !(asked || full) || next != written + 1 {
            return Ok(());
        }
        if self.shared.progress.lock().failure.is_some() {
            return Ok(());
        }
        // The sealed segment is durable before the next one exists, whatever the mode: a later
        // segment never follows a torn one. (Its events are durable from here on, whether or
        // not the new segment can be made.) Its zeros written ahead are cut off first, and
        // that length made durable too: only the last segment may end in zeros.
        self.shared.writer_flushes.fetch_add(1, Ordering::Relaxed);
        let sealed = if self.active.zeroed > self.active.len {
            self.cut_zeros()
        } else {
            self.active.file.sync_data()
        }
        .map_err(|error| storage("fdatasync of a sealed segment", error));
        self.settle_flush(sealed)?;
        let file = Arc::new(create_segment(&self.shared.events_dir, next)?);
        self.active = Active {
            file: Arc::clone(&file),
            first: next,
            len: SEGMENT_HEADER_BYTES as u64,
            zeroed: SEGMENT_HEADER_BYTES as u64,
        };
        self.durable_len = self.active.len;
        self.rotate_at = None;
        self.shared.segments.lock().push(next);
        *self.shared.active_file.lock() = file;
        let mut progress = self.shared.progress.lock();
        let position = Position {
            seq: written,
            segment: next,
            end: SEGMENT_HEADER_BYTES as u64,
        };
        progress.written = position;
        progress.visible = position;
        self.shared
            .visible_seq
            .store(position.seq, Ordering::Release);
        drop(progress);
        self.shared.progress_changed.notify_all();
        self.shared.wake_durable(position.seq);
        // Recorded once the segment is durable (a crash before leaves the record one segment
        // behind, which refuses nothing, and the next open records it): an open finding an
        // older last segment refuses the log, as the newest one and its events were removed.
        self.shared
            .meta
            .insert(META_LAST_SEGMENT, &next.to_le_bytes())
            .map_err(|error| storage("writing metadata", error))?;
        self.shared.syncer.flush(&self.shared.db)
    }

    /// Appends one group of consecutive events with one write and, in `Sync` mode, one
    /// fdatasync. On failure the group's bytes are cut off again.
    fn write_group(&mut self, batch: &Batch, group: std::ops::Range<usize>) -> Result<(), Error> {
        if let Some((seq, problem)) = &self.shared.progress.lock().failure {
            return Err(failed(*seq, problem));
        }
        self.rotate_if_due(Some(batch.events[group.start].seq))?;
        // Every event before this one is fdatasynced: each record says so (it tells a torn
        // write from damage when the log opens after a crash).
        let durable_before = self.unsynced_from.unwrap_or(batch.events[group.start].seq);
        self.buffer.clear();
        let mut start = group.start;
        while start < group.end {
            let mut end = start;
            let mut bytes = 0;
            while end < group.end {
                let size = event_bytes_at_most(batch.body(end).len());
                if end > start && bytes + size > MAX_RECORD_BYTES - RECORD_HEADER_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let frame_at = self.buffer.len();
            self.buffer.extend_from_slice(&[0u8; FRAME_BYTES]);
            encode_record_into(
                &mut self.buffer,
                batch.events[start].seq,
                durable_before,
                (start..end).map(|index| (batch.events[index].at_ms, batch.body(index))),
            );
            let len = (self.buffer.len() - frame_at - FRAME_BYTES) as u32;
            let crc = frame_crc(len, &self.buffer[frame_at + FRAME_BYTES..]);
            self.buffer[frame_at..frame_at + 4].copy_from_slice(&len.to_le_bytes());
            self.buffer[frame_at + 4..frame_at + 8].copy_from_slice(&crc.to_le_bytes());
            start = end;
        }
        let before = self.active.len;
        let written = self.zero_ahead().and_then(|()| self.write_buffer());
        self.group_bytes = self.buffer.len() as u64;
        // A group is as large as the queue's batch (up to `MAX_QUEUED_EVENTS` events of up
        // to `MAX_EVENT_BYTES`): kept, a burst of large events held its hundreds of MiB for
        // good. Trimmed as the queue's arena is (`Batch::clear`).
        self.buffer.clear();
        self.buffer.shrink_to(QUEUE_KEPT_BYTES);
        match written {
            Ok(()) => {
                self.active.len = before + self.group_bytes;
                self.active.zeroed = self.active.zeroed.max(self.active.len);
                self.wrote = true;
                Ok(())
            }
            Err(error) => {
                // Nothing of a failed group may stay: its callers are told it failed. In
                // `Sync` mode neither may the groups written before it but not yet durable:
                // they fail with it.
                let keep = match self.shared.durability {
                    Durability::Sync => self.durable_len,
                    _ => before,
                };
                Err(self.cut_back(keep, error))
            }
        }
    }

    /// Cuts the active segment back to `len` bytes after `error`; returns the error to report.
    fn cut_back(&mut self, len: u64, error: Error) -> Error {
        let undo = self
            .active
            .file
            .set_len(len)
            .and_then(|()| (&*self.active.file).seek(SeekFrom::Start(len)).map(|_| ()));
        self.active.len = len;
        self.active.zeroed = len;
        match undo {
            Ok(()) => error,
            Err(undo) => storage(format!("{error}; cutting the failed write off again"), undo),
        }
    }

    /// `Sync`: should the events written but not yet durable be fdatasynced now? When a caller
    /// waits for one of them (nobody is acknowledged before that, so a flush earlier would only
    /// split a `consume_many` batch over several), when stopping, or when they are many.
    fn sync_due(&self, stop: bool) -> bool {
        let (Durability::Sync, Some(first)) = (self.shared.durability, self.unsynced_from) else {
            return false;
        };
        stop || self.shared.demand_seq.load(Ordering::SeqCst) >= first
            || self.active.len - self.durable_len >= SYNC_AFTER_BYTES
    }

    /// One fdatasync for every event written since the last one (in `Sync` mode the group
    /// commit), then their callers are woken. On failure the file is cut back to its durable length and
    /// every event after the durable point fails.
    fn sync_written(&mut self) {
        if self.unsynced_from.is_some() {
            let result = self.flush();
            // A failure is recorded for every caller to see; the writer carries on refusing.
            let _ = self.settle_flush(result);
        }
    }

    /// Applies the outcome of an fdatasync of the active segment: on success everything
    /// written is durable and its callers are woken; on failure (the kernel may have dropped
    /// the pages it could not write) the file is cut back to its durable length in `Sync` mode
    /// and every event after the durable point fails.
    fn settle_flush(&mut self, result: Result<(), Error>) -> Result<(), Error> {
        let result = match (result, self.unsynced_from) {
            (Ok(()), _) => Ok(()),
            (Err(error), _) if self.shared.durability == Durability::Sync => {
                Err(self.cut_back(self.durable_len, error))
            }
            (Err(error), Some(first)) => {
                let last = self.shared.progress.lock().written.seq;
                // Those an fdatasync outside the writer made durable meanwhile are safe.
                let first = first.max(self.shared.synced_outside.load(Ordering::Relaxed) + 1);
                if first <= last {
                    Err(may_be_missing(
                        error,
                        &format!("events {first} to {last} were"),
                    ))
                } else {
                    Err(error)
                }
            }
            (Err(error), None) => Err(error),
        };
        self.unsynced_from = None;
        self.unsynced_since = None;
        let mut progress = self.shared.progress.lock();
        match &result {
            Ok(()) if progress.failure.is_none() => {
                self.last_flush_ended = Some(Instant::now());
                self.durable_len = self.active.len;
                progress.visible = progress.written;
                self.shared
                    .visible_seq
                    .store(progress.visible.seq, Ordering::Release);
            }
            Ok(()) => {}
            Err(error) => self.shared.mark_failed(&mut progress, error),
        }
        self.shared.announce(progress);
        result
    }

    /// Stopping: cuts the zeros written ahead off the active segment, so a closed database's
    /// last segment ends with its last record. Zeros left there (a crash, or this failing)
    /// are read as the end of the log all the same, so a failure here changes nothing.
    fn cut_zeros_ahead(&mut self) {
        if self.active.zeroed > self.active.len && self.shared.progress.lock().failure.is_none() {
            let _ = self.cut_zeros();
        }
    }

    /// Cuts the active segment back to its records and makes that length durable (the file's
    /// data and metadata: a sealed segment must not be found longer after a crash).
    fn cut_zeros(&mut self) -> std::io::Result<()> {
        self.active.file.set_len(self.active.len)?;
        self.active.file.sync_all()?;
        self.active.zeroed = self.active.len;
        Ok(())
    }

    /// `Sync`: makes sure the group in `buffer` goes over zeros written ahead, writing zeros
    /// from the file's end to `ZEROED_AHEAD_BYTES` past the group's if it would not. Only the
    /// first fdatasync after it commits the new length. The other modes append: their flushes
    /// are few, and the zeros would double what they write.
    fn zero_ahead(&mut self) -> Result<(), Error> {
        let end = self.active.len + self.buffer.len() as u64;
        if self.shared.durability != Durability::Sync || end <= self.active.zeroed {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        // A whole stretch past the group, to a page boundary.
        let until = (end + ZEROED_AHEAD_BYTES).next_multiple_of(4_096);
        let mut at = self.active.zeroed;
        while at < until {
            let chunk = (until - at).min(ZEROS.len() as u64) as usize;
            self.active
                .file
                .write_all_at(&ZEROS[..chunk], at)
                .map_err(|error| storage("writing zeros ahead in the log", error))?;
            at += chunk as u64;
            // Each chunk written is on the file: a failure cuts the file back from its end.
            self.active.zeroed = at;
        }
        Ok(())
    }

    fn write_buffer(&self) -> Result<(), Error> {
        let mut file = &*self.active.file;
        if self
            .shared
            .faults
            .as_deref()
            .is_some_and(|faults| Faults::take(&faults.fail_inserts))
        {
            let half = self.buffer.len() / 2;
            let _ = file.write_all(&self.buffer[..half]);
            return Err(storage("writing the log", "injected fault"));
        }
        file.write_all(&self.buffer)
            .map_err(|error| storage("writing the log", error))
    }

    fn report(&mut self, first: u64, last: u64, result: Result<(), Error>) {
        let shared = Arc::clone(&self.shared);
        let mut progress = shared.progress.lock();
        match result {
            Ok(()) if progress.failure.is_none() => {
                let position = Position {
                    seq: last,
                    segment: self.active.first,
                    end: self.active.len,
                };
                progress.written = position;
                // `Sync`: visible once fdatasynced (`sync_written`).
                if self.shared.durability != Durability::Sync {
                    progress.visible = position;
                    self.shared.visible_seq.store(last, Ordering::Release);
                }
            }
            Ok(()) => {
                // Failed while this group was being written, by an fdatasync outside the
                // writer (`sync`, a snapshot's: `Shared::fail_after_flush`, in the modes that
                // do not wait for durability) from the first event not yet written, this
                // group's: its callers are told it failed, so its bytes must not stay, as a
                // failed write's do not. (If even the cut fails, they may come back at the
                // next open, as in `cut_back`.)
                if progress
                    .failure
                    .as_ref()
                    .is_some_and(|(failed_from, _)| *failed_from <= last)
                {
                    let group_start = self.active.len - self.group_bytes;
                    let _ = self.cut_back(group_start, storage("the log", "failed meanwhile"));
                }
            }
            Err(error) => {
                // In `Sync` mode the written events not yet durable fail with this group.
                debug_assert!(progress.visible.seq < first);
                shared.mark_failed(&mut progress, &error);
            }
        }
        shared.announce(progress);
    }
}

impl Shared {
    /// fdatasyncs the active segment from outside the writer (`sync` in the modes that do not
    /// wait for durability, the snapshot thread, `close`), the fault hook first. A failure
    /// fails the log, as the writer's own does: a later fdatasync can succeed after the kernel
    /// dropped the pages this one could not write.
    fn sync_active_file(&self) -> Result<(), Error> {
        // What this fdatasync covers if it succeeds: read before the file is taken, so a
        // rotation in between only seals (fdatasyncs) the segment holding them.
        let _turn = self.flush_turn.lock();
        let written = self.progress.lock().written.seq;
        let file = Arc::clone(&self.active_file.lock());
        let synced = if self
            .faults
            .as_deref()
            .is_some_and(|faults| Faults::take(&faults.fail_flushes))
        {
            Err(storage("fdatasync of the log", "injected fault"))
        } else {
            file.sync_data()
                .map_err(|error| storage("fdatasync of the log", error))
        };
        let synced = match synced {
            Err(error) if self.durability != Durability::Sync => {
                Err(may_be_missing(error, "the events (if any) were"))
            }
            synced => synced,
        };
        match &synced {
            Ok(()) => {
                self.synced_outside.fetch_max(written, Ordering::Relaxed);
            }
            Err(error) => self.fail_after_flush(error),
        }
        synced
    }

    /// An fdatasync of the log outside the writer failed. The kernel may have dropped the
    /// pages it could not write, and a later fdatasync can then succeed without them: nothing
    /// after the last good flush can be trusted any more, so the log fails as the writer's own
    /// failed flush makes it.
    fn fail_after_flush(&self, error: &Error) {
        let mut progress = self.progress.lock();
        self.mark_failed(&mut progress, error);
        self.announce(progress);
    }

    /// Marks the log failed from the first event not yet durable (in `Sync` mode, events
    /// written but not flushed fail too); a failure already recorded stays the one reported.
    fn mark_failed(&self, progress: &mut Progress, error: &Error) {
        let next = progress.visible.seq + 1;
        progress.failure.get_or_insert((next, error.to_string()));
        self.failed.store(true, Ordering::Release);
    }

    /// Lets the progress go and tells whoever waits on it: `sync`, rotations, snapshots and
    /// the parked `Sync` callers now durable (all of them once the log has failed).
    fn announce(&self, progress: parking_lot::MutexGuard<'_, Progress>) {
        let visible = progress.visible.seq;
        drop(progress);
        self.progress_changed.notify_all();
        self.wake_durable(visible);
    }

    /// `Sync`: asks the writer to make everything up to `seq` durable. The writer fdatasyncs
    /// only when asked, so one flush covers a whole `consume_many` batch instead of the first
    /// chunks that happened to be written. Dekker handshake, both sides SeqCst: this stores the
    /// demand then reads `writer_asleep`; the writer stores `writer_asleep` then reads the
    /// demand, so at least one of them sees the other and no demand is left asleep.
    fn demand(&self, seq: u64) {
        if self.demand_seq.fetch_max(seq, Ordering::SeqCst) >= seq {
            // An earlier demand covers it, and its caller made sure the writer sees it (its
            // events were queued before `seq`'s, so the writer takes `seq` with them).
            return;
        }
        self.nudge();
    }

    /// Wakes the writer whether it sleeps or dozes: for a caller about to wait on what it
    /// writes (`sync`, a snapshot, `events_after`), which should not wait out a doze.
    fn wake(&self) {
        let _queue = self.queue.lock();
        self.writer_poked.store(true, Ordering::Relaxed);
        self.queue_ready.notify_one();
    }

    /// Wakes the writer if it is asleep: for events queued without waking it (see
    /// `append_staged`) or a demand. Under the queue's lock: the writer is either past its
    /// look at the queue and the demand (and asleep, so this wakes it) or not yet at it (and
    /// sees them).
    fn nudge(&self) {
        if self.writer_asleep.load(Ordering::SeqCst) {
            let _queue = self.queue.lock();
            self.queue_ready.notify_one();
        }
    }

    /// The key `Sync` callers park on in `park_until_durable`.
    fn durable_key(&self) -> usize {
        std::ptr::from_ref(&self.visible_seq) as usize
    }

    /// Has `seq` become durable, or the log failed (so `seq` never will)?
    fn settled(&self, seq: u64) -> bool {
        self.failed.load(Ordering::Acquire) || self.visible_seq.load(Ordering::Acquire) >= seq
    }

    /// Parks the calling thread until `settled(seq)`. The parked thread's token is its
    /// sequence number, so `wake_durable` wakes only the threads it has made durable.
    fn park_until_durable(&self, seq: u64) {
        // On a 32-bit target a larger number parks as `usize::MAX`: woken early, it parks again.
        let token = parking_lot_core::ParkToken(usize::try_from(seq).unwrap_or(usize::MAX));
        while !self.settled(seq) {
            // SAFETY: the key is the address of this log's `visible_seq`, used as a key by
            // nothing else and alive while `self` is borrowed; the callbacks only load atomics,
            // cannot panic and call nothing in parking_lot. `validate` runs under the queue's
            // lock, which the waker takes after its Release store: no wake-up is lost.
            unsafe {
                parking_lot_core::park(
                    self.durable_key(),
                    || !self.settled(seq),
                    || {},
                    |_, _| {},
                    token,
                    None,
                );
            }
        }
    }

    /// A lone caller's poll for `seq` to be settled (see `CALLER_POLL_MAX`); returns whether
    /// it is.
    fn poll_until_durable(&self, seq: u64) -> bool {
        let flush = Duration::from_micros(self.flush_micros.load(Ordering::Relaxed));
        if flush > CALLER_POLL_MAX
            || self
                .caller_polling
                .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        let budget = (flush * 2 + Duration::from_micros(100)).min(CALLER_POLL_MAX);
        // Relaxed: a hint that another thread is busy appending; seen late, the poll is only
        // longer, within `budget`.
        let appended = self.last_appended.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut polls = 0u32;
        let mut settled = self.settled(seq);
        while !settled
            && started.elapsed() < budget
            && self.last_appended.load(Ordering::Relaxed) == appended
        {
            pause_or_yield(&mut polls);
            settled = self.settled(seq);
        }
        self.caller_polling.store(false, Ordering::Relaxed);
        settled
    }

    /// Wakes the parked callers whose events are durable up to `visible` (all of them once the
    /// log has failed). Called after the Release stores of `visible_seq` or `failed`.
    fn wake_durable(&self, visible: u64) {
        if self.durability != Durability::Sync {
            return;
        }
        let everyone = self.failed.load(Ordering::Acquire);
        let limit = usize::try_from(visible).unwrap_or(usize::MAX);
        // SAFETY: as in `park_until_durable`; the filter only compares tokens.
        unsafe {
            parking_lot_core::unpark_filter(
                self.durable_key(),
                |parking_lot_core::ParkToken(seq)| {
                    if everyone || seq <= limit {
                        parking_lot_core::FilterOp::Unpark
                    } else {
                        parking_lot_core::FilterOp::Skip
                    }
                },
                |_| parking_lot_core::DEFAULT_UNPARK_TOKEN,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{append_body_to, encode_body, EventBody};

    /// An empty directory under the temporary directory, unique to this test and process.
    fn fresh_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tally-log-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory");
        dir
    }

    fn top_up(micros: u64) -> EventBody {
        EventBody::CreditsToppedUp {
            team: "acme".into(),
            micros,
        }
    }

    /// A burst of large events does not leave the queue's buffers holding it for good.
    #[test]
    fn a_queue_buffer_keeps_a_bounded_capacity_once_written() {
        let mut batch = Batch::default();
        batch.bytes.resize(64 << 20, 7);
        batch.events.push(Queued {
            seq: 1,
            at_ms: 0,
            end: 64 << 20,
        });
        batch.clear();
        assert!(batch.events.is_empty() && batch.bytes.is_empty());
        assert!(
            batch.bytes.capacity() <= QUEUE_KEPT_BYTES,
            "{}",
            batch.bytes.capacity()
        );
        // A small batch keeps its room: nothing is reallocated from batch to batch.
        batch.bytes.resize(1 << 20, 7);
        let room = batch.bytes.capacity();
        batch.clear();
        assert_eq!(batch.bytes.capacity(), room);
    }

    /// Nor the writer's: it encodes each group whole into its buffer, so a burst of large
    /// events (policy swaps queued in `None` mode, a flood of long-keyed usage events) grew it
    /// to the group's size, up to `MAX_QUEUED_EVENTS` of up to `MAX_EVENT_BYTES`, and it kept
    /// that for good while the queue's arena went back to `QUEUE_KEPT_BYTES`.
    #[test]
    fn the_writers_buffer_keeps_a_bounded_capacity_once_a_group_is_written() {
        let dir = fresh_dir("writer-buffer-kept");
        let log = EventLog::open_with(&dir, Durability::Interval { ms: 60_000 }, None, 1 << 30)
            .expect("open");
        let first = log.append(1_000, encode_body(&top_up(1))).expect("append");
        let (mut writer, _) = writer_taken_over(&log, None);
        // 256 policy swaps of 40 KB: 10 MB in one group.
        let swap = EventBody::PolicySwapped {
            generation: 1,
            document: "x".repeat(40_000),
        };
        let mut batch = Batch::default();
        for index in 0..256 {
            append_body_to(&mut batch.bytes, &swap);
            batch.events.push(Queued {
                seq: first + 1 + index,
                at_ms: 1_000,
                end: batch.bytes.len(),
            });
        }
        assert!(batch.bytes.len() > 2 * QUEUE_KEPT_BYTES);
        writer.write_group(&batch, 0..256).expect("written");
        writer.report(first + 1, first + 256, Ok(()));
        assert!(
            writer.buffer.capacity() <= QUEUE_KEPT_BYTES,
            "the writer keeps {} bytes of buffer after writing a group of {}",
            writer.buffer.capacity(),
            batch.bytes.len()
        );
        drop(writer);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A close whose final fdatasync fails records nothing as durable, and neither does the
    /// close after it (the drop): a second fdatasync can succeed after the kernel dropped the
    /// pages the first could not write. Before, the drop's close recorded the log durable
    /// through its last event, and an open then refused the lost tail as damage (the review
    /// of this session's mends).
    #[test]
    fn a_close_whose_fdatasync_fails_records_nothing_durable() {
        let dir = fresh_dir("close-fails");
        let faults = Faults::new();
        let log = EventLog::open_with(&dir, Durability::None, Some(Arc::clone(&faults)), 1 << 20)
            .expect("open");
        for micros in 1..=3 {
            log.append(1_000, encode_body(&top_up(micros)))
                .expect("append");
        }
        faults.fail_next_flushes(1);
        assert!(log.close().is_err(), "the injected fault");
        let meta = log.meta.clone();
        drop(log);
        assert_eq!(
            clean_close_point(&meta).expect("read"),
            0,
            "nothing recorded"
        );
        drop(meta);
        // A close that syncs records every event durable.
        let log = EventLog::open(&dir, Durability::None, None).expect("reopen");
        log.append(1_000, encode_body(&top_up(4))).expect("append");
        log.close().expect("close");
        assert_eq!(clean_close_point(&log.meta).expect("read"), 4);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A log opened read-only (`verify`, tools) saves no cursor, as it records no options and
    /// deletes no cursor: it writes nothing of tally's.
    #[test]
    fn a_read_only_log_saves_no_cursor() {
        let dir = fresh_dir("read-only-cursor");
        let log = EventLog::open(&dir, Durability::Sync, None).expect("open");
        let seq = log.append(1_000, encode_body(&top_up(1))).expect("append");
        log.wait(seq).expect("durable");
        log.save_cursor("billing", seq).expect("saved");
        log.close().expect("close");
        drop(log);
        let read_only = EventLog::open_read_only(&dir).expect("read");
        for (name, saved) in [("billing", seq), ("another", 0)] {
            let error = read_only
                .save_cursor(name, seq - 1)
                .expect_err("opened read-only");
            assert!(error.to_string().contains("read-only"), "{error}");
            assert_eq!(read_only.cursor(name), Ok(saved), "{name} unchanged");
        }
        drop(read_only);
        let log = EventLog::open(&dir, Durability::Sync, None).expect("reopen");
        assert_eq!(log.cursor("billing"), Ok(seq));
        assert_eq!(log.cursor("another"), Ok(0));
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Makes `log` durable, stops its writer thread and returns a `Writer` in its place, for
    /// a test to play the writer's steps one at a time (`rotate_at`: the event a checkpoint
    /// asked a new segment for), with the active segment's length.
    fn writer_taken_over(log: &EventLog, rotate_at: Option<u64>) -> (Writer, u64) {
        log.sync().expect("written and durable");
        log.shared.queue.lock().stop = true;
        log.shared.queue_ready.notify_all();
        let handle = log.writer.lock().take().expect("a writer");
        handle.join().expect("the writer stops");
        let file = Arc::clone(&log.shared.active_file.lock());
        let len = file.metadata().expect("metadata").len();
        let writer = Writer {
            shared: Arc::clone(&log.shared),
            active: Active {
                file,
                first: 1,
                len,
                zeroed: len,
            },
            buffer: Vec::new(),
            spare: Batch::default(),
            rotate_at,
            unsynced_from: None,
            unsynced_since: None,
            last_flush_ended: None,
            last_take: Instant::now(),
            durable_len: len,
            wrote: true,
            poll_for: WRITER_POLL,
            group_bytes: 0,
        };
        (writer, len)
    }

    /// A group of one top-up event, numbered `seq`, as the writer takes it from the queue.
    fn one_top_up_group(seq: u64) -> Batch {
        let mut batch = Batch::default();
        append_body_to(&mut batch.bytes, &top_up(2));
        batch.events.push(Queued {
            seq,
            at_ms: 1_000,
            end: batch.bytes.len(),
        });
        batch
    }

    /// In the modes that do not wait for durability an fdatasync outside the writer (`sync`, a
    /// background snapshot's) fails the log from the first event not yet written, while the
    /// writer may be writing the group that starts there: its callers are told it failed (a
    /// `Submitted::complete`, a `consume` whose wait comes after), so its bytes are cut off
    /// again, as a failed write's are. Left, a request answered with the error was counted
    /// after the reopen. The writer's steps are played here one at a time.
    #[test]
    fn a_group_written_while_an_outside_fdatasync_fails_is_cut_off_again() {
        let dir = fresh_dir("outside-flush-fails");
        let log = EventLog::open_with(&dir, Durability::Interval { ms: 60_000 }, None, 1 << 20)
            .expect("open");
        let first = log.append(1_000, encode_body(&top_up(1))).expect("append");
        let (mut writer, len) = writer_taken_over(&log, None);
        let batch = one_top_up_group(first + 1);
        // The writer found the log sound and writes the group...
        writer.write_group(&batch, 0..1).expect("written");
        assert!(writer.active.len > len);
        // ...while an fdatasync outside it fails: the failure covers the group.
        log.shared
            .fail_after_flush(&storage("fdatasync of the log", "injected fault"));
        assert_eq!(log.failed_from(), Some(first + 1));
        assert!(log.wait(first + 1).is_err(), "its caller is told it failed");
        writer.report(first + 1, first + 1, Ok(()));
        let file_len = std::fs::metadata(segment_path(&log.shared.events_dir, 1))
            .expect("metadata")
            .len();
        assert_eq!(file_len, len, "the failed group's bytes cut off");
        drop(writer);
        drop(log);
        let log = EventLog::open(&dir, Durability::Sync, None).expect("reopen");
        let events = log.events_after(0, 10).expect("read");
        assert_eq!(
            events.iter().map(|event| event.seq).collect::<Vec<_>>(),
            vec![first],
            "only the event before the failure"
        );
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// As above, for a group the writer wrote into a segment it had just started (a
    /// checkpoint asked for one at the group's first event): the cut is measured in that new
    /// segment, which is left holding its header only, and the sealed one keeps every byte.
    #[test]
    fn a_group_rotated_into_a_new_segment_while_an_outside_fdatasync_fails_is_cut_off_there() {
        let dir = fresh_dir("outside-flush-fails-rotated");
        let log = EventLog::open_with(&dir, Durability::Interval { ms: 60_000 }, None, 1 << 20)
            .expect("open");
        let first = log.append(1_000, encode_body(&top_up(1))).expect("append");
        let (mut writer, len) = writer_taken_over(&log, Some(first + 1));
        let batch = one_top_up_group(first + 1);
        writer.write_group(&batch, 0..1).expect("written");
        assert_eq!(writer.active.first, first + 1, "written into a new segment");
        log.shared
            .fail_after_flush(&storage("fdatasync of the log", "injected fault"));
        assert_eq!(log.failed_from(), Some(first + 1));
        writer.report(first + 1, first + 1, Ok(()));
        let file_len = |segment| {
            std::fs::metadata(segment_path(&log.shared.events_dir, segment))
                .expect("metadata")
                .len()
        };
        assert_eq!(file_len(1), len, "the sealed segment keeps its events");
        assert_eq!(
            file_len(first + 1),
            SEGMENT_HEADER_BYTES as u64,
            "the failed group's bytes cut off its new segment"
        );
        drop(writer);
        drop(log);
        let log = EventLog::open(&dir, Durability::Sync, None).expect("reopen");
        let events = log.events_after(0, 10).expect("read");
        assert_eq!(
            events.iter().map(|event| event.seq).collect::<Vec<_>>(),
            vec![first],
            "only the event before the failure"
        );
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_staged_chunk_is_appended_in_order_with_consecutive_sequence_numbers() {
        let dir = fresh_dir("staged");
        let log = EventLog::open(&dir, Durability::Sync, None).expect("open");
        let single = log.append(1_000, encode_body(&top_up(1))).expect("append");
        let mut staged = Staged::default();
        for micros in 2..=4 {
            staged
                .push_with(1_000 + micros, |buffer| {
                    append_body_to(buffer, &top_up(micros))
                })
                .expect("stage");
        }
        // An event over the bound is refused and leaves the chunk as it was.
        let refused = staged.push_with(2_000, |buffer| {
            buffer.resize(buffer.len() + MAX_EVENT_BYTES + 1, 0)
        });
        assert!(matches!(
            refused,
            Err(Error::InvalidArgument { field: "event", .. })
        ));
        assert_eq!(staged.len(), 3);
        let last = log.append_staged(&staged).expect("append the chunk");
        assert_eq!(last, single + 3);
        assert_eq!(log.last_appended(), last);
        let after = log.append(1_010, encode_body(&top_up(5))).expect("append");
        assert_eq!(after, last + 1);
        log.wait(after).expect("durable");
        let events = log.events_after(0, 100).expect("read");
        let read: Vec<(u64, u64, EventBody)> = events
            .into_iter()
            .map(|event| (event.seq, event.at_ms, event.body))
            .collect();
        let expected: Vec<(u64, u64, EventBody)> = (1..=5u64)
            .map(|micros| {
                let at_ms = if micros == 1 {
                    1_000
                } else if micros == 5 {
                    1_010
                } else {
                    1_000 + micros
                };
                (single + micros - 1, at_ms, top_up(micros))
            })
            .collect();
        assert_eq!(read, expected);
        staged.clear(0);
        assert!(staged.is_empty());
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Runs `threads` threads, each appending and waiting `rounds` times in `Sync` mode: the
    /// first `batch_threads` of them `CALLER_POLL_EVENTS` events a round, waited for at once as
    /// a `consume_many` does (`wait_for`), the others one. Returns each event's outcome (its
    /// sequence number, 0 when its append failed, and what its wait returned). A thread not
    /// back within 60 s fails the test instead of hanging it: a lost wake-up shows as a failure.
    fn append_and_wait_from_threads(
        log: &Arc<EventLog>,
        threads: usize,
        rounds: usize,
        batch_threads: usize,
        faults: Option<(&Faults, usize)>,
    ) -> Vec<(u64, Result<(), Error>)> {
        let (sender, receiver) = std::sync::mpsc::channel();
        let start = Arc::new(std::sync::Barrier::new(threads));
        for thread in 0..threads {
            let (log, sender, start) = (Arc::clone(log), sender.clone(), Arc::clone(&start));
            let batch = if thread < batch_threads {
                CALLER_POLL_EVENTS
            } else {
                1
            };
            std::thread::spawn(move || {
                start.wait();
                for round in 0..rounds {
                    let mut appended = Vec::with_capacity(batch);
                    for event in 0..batch {
                        let micros = ((thread * rounds + round) * batch + event) as u64 + 1;
                        appended.push(log.append(1_000, encode_body(&top_up(micros))));
                    }
                    let last = appended.iter().filter_map(|seq| seq.as_ref().ok()).max();
                    let waited = last.map(|&last| log.wait_for(last, batch));
                    for seq in appended {
                        let outcome = match (seq, &waited) {
                            (Ok(seq), Some(waited)) => (seq, waited.clone()),
                            (Ok(seq), None) => unreachable!("{seq} appended, none waited for"),
                            (Err(error), _) => (0, Err(error)),
                        };
                        if sender.send(outcome).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        let events = batch_threads.min(threads) * rounds * CALLER_POLL_EVENTS
            + threads.saturating_sub(batch_threads) * rounds;
        let mut outcomes = Vec::new();
        for received in 0..events {
            if let Some((faults, after)) = faults {
                if received == after {
                    faults.fail_next_flushes(1);
                }
            }
            let outcome = receiver
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("a waiter never returned ({received} did)"));
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Every outcome succeeded, none acknowledged past the durable point, `expected` distinct
    /// events, and the log reads back exactly that many.
    fn assert_each_durable_once(
        log: &EventLog,
        outcomes: &[(u64, Result<(), Error>)],
        expected: usize,
    ) {
        let durable = log.durable_seq();
        for (seq, result) in outcomes {
            result.as_ref().expect("durable");
            assert!(*seq <= durable, "seq {seq} acknowledged past {durable}");
        }
        let mut seqs: Vec<u64> = outcomes.iter().map(|(seq, _)| *seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), expected);
        assert_eq!(
            log.events_after(0, expected + 1).expect("read").len(),
            expected
        );
    }

    #[test]
    fn every_sync_waiter_is_woken_once_its_event_is_durable() {
        let dir = fresh_dir("waiters");
        let log = Arc::new(EventLog::open(&dir, Durability::Sync, None).expect("open"));
        let outcomes = append_and_wait_from_threads(&log, 48, 40, 0, None);
        assert_each_durable_once(&log, &outcomes, 48 * 40);
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Batch waiters may poll for their flush (one at a time, while nobody else appends),
    /// single ones park: racing, each returns once its events are durable, every event logged
    /// once, and the poll's flag is left free.
    #[test]
    fn batch_and_single_sync_waiters_racing_are_each_answered_once_durable() {
        let dir = fresh_dir("batch-waiters");
        let log = Arc::new(EventLog::open(&dir, Durability::Sync, None).expect("open"));
        let outcomes = append_and_wait_from_threads(&log, 12, 20, 4, None);
        assert_each_durable_once(&log, &outcomes, 4 * 20 * CALLER_POLL_EVENTS + 8 * 20);
        assert!(!log.shared.caller_polling.load(Ordering::Relaxed));
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A batch caller whose flush is held stops polling within `CALLER_POLL_MAX` and parks:
    /// it answers only once the flush goes, and the poll's flag is free meanwhile.
    #[test]
    fn a_batch_caller_whose_flush_is_held_parks_until_it_goes() {
        let dir = fresh_dir("held-batch");
        let faults = Faults::new();
        let log = EventLog::open(&dir, Durability::Sync, Some(Arc::clone(&faults))).expect("open");
        // One flush first: the poll's length comes from the last fdatasync's time.
        let seq = log.append(1_000, encode_body(&top_up(1))).expect("append");
        log.wait(seq).expect("durable");
        faults.hold_flushes();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                let mut last = 0;
                for micros in 0..CALLER_POLL_EVENTS as u64 {
                    last = log
                        .append(1_000, encode_body(&top_up(micros + 2)))
                        .expect("append");
                }
                (last, log.wait_for(last, CALLER_POLL_EVENTS))
            });
            assert!(eventually(|| faults.flushes_held() > 0), "never flushed");
            std::thread::sleep(CALLER_POLL_MAX * 20);
            assert!(!waiter.is_finished(), "answered before its flush");
            assert!(
                eventually(|| !log.shared.caller_polling.load(Ordering::Relaxed)),
                "still polling while its flush is held"
            );
            faults.release_flushes();
            let (last, result) = waiter.join().expect("no panic");
            result.expect("durable");
            assert!(log.durable_seq() >= last);
        });
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A caller polls only when no other does and the last fdatasync was quick; a refused
    /// poll leaves the flag as it found it, a poll that ran frees it.
    #[test]
    fn only_one_caller_polls_and_none_after_a_slow_flush() {
        let dir = fresh_dir("one-poller");
        let log = EventLog::open(&dir, Durability::Sync, None).expect("open");
        // Written, never asked for: no flush makes it durable while the test looks.
        let seq = log.append(1_000, encode_body(&top_up(1))).expect("append");
        let shared = &*log.shared;
        // The quickest of a few refusals: a poll lasts its whole budget (nothing appends), and
        // one refusal may be preempted for longer than that on a loaded machine.
        let quickest_refusal = || {
            (0..5)
                .map(|_| {
                    let refused = Instant::now();
                    assert!(!shared.poll_until_durable(seq));
                    refused.elapsed()
                })
                .min()
                .expect("five")
        };
        shared.caller_polling.store(true, Ordering::Relaxed);
        assert!(
            quickest_refusal() < CALLER_POLL_MAX,
            "polled while another did"
        );
        // Refused, it left the flag as it was (only a poll that ran frees it).
        assert!(shared.caller_polling.load(Ordering::Relaxed));
        shared.caller_polling.store(false, Ordering::Relaxed);
        let slow = u64::try_from(CALLER_POLL_MAX.as_micros()).expect("small") + 1;
        shared.flush_micros.store(slow, Ordering::Relaxed);
        assert!(
            quickest_refusal() < CALLER_POLL_MAX,
            "polled after a slow flush"
        );
        shared.flush_micros.store(0, Ordering::Relaxed);
        let polled = Instant::now();
        assert!(!shared.poll_until_durable(seq), "durable without a flush");
        assert!(
            polled.elapsed() >= Duration::from_micros(100),
            "did not poll"
        );
        assert!(!shared.caller_polling.load(Ordering::Relaxed));
        assert!(!shared.settled(seq));
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The writer's poll stays full while its idle stretches are short, halves with each long
    /// one down to none, and is full again after one short stretch.
    #[test]
    fn the_writers_poll_follows_its_idle_stretches() {
        let long = WRITER_POLL * 3;
        assert_eq!(adapted_poll(WRITER_POLL, WRITER_POLL), WRITER_POLL);
        let mut poll = WRITER_POLL;
        let mut seen = vec![poll];
        while !poll.is_zero() {
            poll = adapted_poll(poll, long);
            seen.push(poll);
            assert!(seen.len() <= 8, "never reached none: {seen:?}");
        }
        assert_eq!(
            seen,
            [
                WRITER_POLL,
                WRITER_POLL / 2,
                WRITER_POLL / 4,
                WRITER_POLL / 8,
                Duration::ZERO
            ]
        );
        assert_eq!(adapted_poll(Duration::ZERO, long), Duration::ZERO);
        assert_eq!(adapted_poll(Duration::ZERO, WRITER_POLL / 2), WRITER_POLL);
    }

    /// Polls `condition` for up to 10 s.
    fn eventually(mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    fn written_seq(log: &EventLog) -> u64 {
        log.shared.progress.lock().written.seq
    }

    /// The pauses between appends in the tests of the writer's doze: none (it is busy or
    /// dozing), shorter than a doze, and longer (it has gone to sleep).
    const PAUSES_US: [u64; 4] = [0, 300, 1_500, 5_000];

    /// In `None` and `Interval` modes an append does not wake a dozing writer, so a reader
    /// right after it would find the event not yet written; `events_after` asks for it.
    #[test]
    fn without_sync_events_after_sees_every_event_appended_before_it() {
        for durability in [Durability::None, Durability::Interval { ms: 60_000 }] {
            let dir = fresh_dir("read-own-appends");
            let log = EventLog::open(&dir, durability, None).expect("open");
            for round in 0..40u64 {
                let seq = log
                    .append(1_000, encode_body(&top_up(round + 1)))
                    .expect("append");
                let events = log.events_after(seq - 1, 10).expect("read");
                assert_eq!(
                    events.first().map(|event| event.seq),
                    Some(seq),
                    "{durability:?}, round {round}"
                );
                let pause = PAUSES_US[round as usize % PAUSES_US.len()];
                std::thread::sleep(Duration::from_micros(pause));
            }
            log.close().expect("close");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// Whatever the writer was doing when an event came (writing, dozing, asleep), the event is
    /// written without anyone asking, and in `Interval` mode flushed: no append is left
    /// waiting for a wake-up that never comes.
    #[test]
    fn without_sync_every_append_is_written_whatever_the_writer_was_doing() {
        for durability in [Durability::None, Durability::Interval { ms: 5 }] {
            let dir = fresh_dir("doze");
            let log = EventLog::open(&dir, durability, None).expect("open");
            for round in 0..40u64 {
                let flushes = log.writer_flushes();
                let seq = log
                    .append(1_000, encode_body(&top_up(round + 1)))
                    .expect("append");
                assert!(
                    eventually(|| written_seq(&log) >= seq),
                    "{durability:?}, round {round}: never written"
                );
                if durability != Durability::None {
                    assert!(
                        eventually(|| log.writer_flushes() > flushes),
                        "{durability:?}, round {round}: never flushed"
                    );
                }
                let pause = PAUSES_US[round as usize % PAUSES_US.len()];
                std::thread::sleep(Duration::from_micros(pause));
            }
            log.close().expect("close");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// `Interval { ms }` promises an acknowledged event is fdatasynced at most `ms` after it
    /// was queued while the disk keeps up. The writer counted the interval from the end of its
    /// previous fdatasync, so an event queued while a flush took 800 ms waited those 800 ms
    /// and then the whole interval again: 1.8 s for an interval of 1 s.
    #[test]
    fn with_interval_an_event_queued_during_a_slow_flush_is_flushed_within_the_interval() {
        const INTERVAL_MS: u64 = 1_000;
        const SLOW_FLUSH_MS: u64 = 800;
        // Far below the 800 ms the old clock added, far above a loaded machine's wake-ups.
        const LATE_MS: u64 = 400;
        let dir = fresh_dir("interval-deadline");
        let faults = Faults::new();
        let durability = Durability::Interval { ms: INTERVAL_MS };
        let log = EventLog::open(&dir, durability, Some(Arc::clone(&faults))).expect("open");
        faults.hold_flushes();
        log.append(1_000, encode_body(&top_up(1))).expect("append");
        assert!(eventually(|| faults.flushes_held() == 1), "never flushed");
        // The first flush is under way (held: a slow disk) when the second event comes.
        let queued = Instant::now();
        let seq = log.append(1_000, encode_body(&top_up(2))).expect("append");
        std::thread::sleep(Duration::from_millis(SLOW_FLUSH_MS));
        faults.release_flushes();
        assert!(
            eventually(|| log.writer_flushes() >= 2),
            "the second event was never flushed"
        );
        let waited = queued.elapsed();
        assert!(written_seq(&log) >= seq);
        assert!(
            waited < Duration::from_millis(INTERVAL_MS + LATE_MS),
            "flushed {waited:?} after it was queued, with an interval of {INTERVAL_MS} ms"
        );
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The compaction after a periodic checkpoint has a budget: once it is spent, it starts no
    /// other segment (but always the first), and leaves the rest for the next checkpoint. A
    /// backlog of segments, each read and removed with a directory fsync, held up the request
    /// taking the next periodic checkpoint for as long as it took (279 ms for 1,000 tiny ones).
    #[test]
    fn a_compaction_whose_budget_is_spent_removes_one_segment_and_leaves_the_rest() {
        let dir = fresh_dir("compaction-budget");
        let log = EventLog::open_with(&dir, Durability::None, None, 256).expect("open");
        for micros in 1..=40 {
            // Written one at a time: a segment is sealed past its bytes after a write.
            log.append(1_000, encode_body(&top_up(micros)))
                .expect("append");
            log.sync().expect("sync");
        }
        let segments = log.segments();
        assert!(segments.len() >= 4, "{segments:?}");
        let last_seq = log.next_seq() - 1;
        log.record_logged_by(last_seq, 5_000, 0).expect("record");
        let compactor = log.compactor();
        let spent = Some(Instant::now());
        let removed = compactor
            .remove_old_segments(last_seq, 2_000, 5_000, spent)
            .expect("compact");
        assert_eq!(removed, segments[1] - segments[0], "the first segment only");
        // (The writer may have started a segment since, after the last full one.)
        assert!(
            log.segments().starts_with(&segments[1..]),
            "{:?} after {segments:?}",
            log.segments()
        );
        // Without a budget (`compact`), every sealed segment the rules let go.
        compactor
            .remove_old_segments(last_seq, 2_000, 5_000, None)
            .expect("compact");
        let newest = segments[segments.len() - 1];
        assert!(
            log.segments().iter().all(|&first| first >= newest),
            "{:?} after {segments:?}",
            log.segments()
        );
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The compaction after a periodic checkpoint leaves the work to a running `compact`, and
    /// says so (`None`): it answered `Ok(0)`, which cleared the failure `health` held for
    /// compaction while that `compact`, whose own outcome is the one to report, still ran.
    #[test]
    fn a_compaction_after_a_checkpoint_says_it_left_the_work_to_a_running_compact() {
        let dir = fresh_dir("compaction-skip");
        let log = EventLog::open_with(&dir, Durability::None, None, 256).expect("open");
        for micros in 1..=40 {
            log.append(1_000, encode_body(&top_up(micros)))
                .expect("append");
            log.sync().expect("sync");
        }
        let last_seq = log.next_seq() - 1;
        log.record_logged_by(last_seq, 5_000, 0).expect("record");
        // Two snapshots: compaction keeps what follows the one before the latest.
        log.write_snapshot(last_seq - 1, 0, b"").expect("snapshot");
        log.write_snapshot(last_seq, 0, b"").expect("snapshot");
        let compactor = log.compactor();
        let running = compactor.state.running.lock();
        let skipped = compactor.compact_after_checkpoint(1_000_000, 0, 0);
        assert!(matches!(skipped, Ok(None)), "{skipped:?}");
        drop(running);
        let removed = compactor.compact_after_checkpoint(1_000_000, 0, 0);
        assert!(matches!(removed, Ok(Some(1..))), "{removed:?}");
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The writer does not repeat an fdatasync that `sync` (or a snapshot's) made meanwhile:
    /// its own flush of the same events, already due, ran afterwards, and took the next
    /// injected fault meant for the events after them (under load, CI's stress run). A failure
    /// there also failed the log for events already durable.
    #[test]
    fn with_interval_the_writer_skips_a_flush_that_sync_already_made() {
        let dir = fresh_dir("interval-covered");
        let faults = Faults::new();
        let durability = Durability::Interval { ms: 5 };
        let log = EventLog::open(&dir, durability, Some(Arc::clone(&faults))).expect("open");
        faults.hold_flushes();
        log.append(1_000, encode_body(&top_up(1))).expect("append");
        // The writer's flush of event 1 is due and waits; `sync` makes event 1 durable first.
        assert!(eventually(|| faults.flushes_held() == 1), "never flushed");
        log.sync().expect("durable");
        faults.fail_next_flushes(1);
        faults.release_flushes();
        // The fault is the next fdatasync's: the one of event 2.
        let appended = log.append(1_000, encode_body(&top_up(2)));
        assert_eq!(appended.ok(), Some(2), "the log had not failed");
        assert!(eventually(|| log.failed_from().is_some()), "never failed");
        assert_eq!(log.failed_from(), Some(3), "event 2 stays written");
        let problem = log.sync().expect_err("failed").to_string();
        assert!(
            problem.contains("events 2 to 2 were written since the last fdatasync"),
            "{problem}"
        );
        let _ = log.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A lone event after a quiet spell (no fdatasync within the interval before it) is
    /// flushed at once, as before the interval was counted from the acknowledgement: waiting
    /// the whole interval would only lengthen what a power loss takes.
    #[test]
    fn with_interval_a_lone_event_after_a_quiet_spell_is_flushed_at_once() {
        const INTERVAL_MS: u64 = 20_000;
        let dir = fresh_dir("interval-quiet");
        let log =
            EventLog::open(&dir, Durability::Interval { ms: INTERVAL_MS }, None).expect("open");
        let queued = Instant::now();
        log.append(1_000, encode_body(&top_up(1))).expect("append");
        assert!(
            eventually(|| log.writer_flushes() >= 1),
            "not flushed within {:?} of an interval of {INTERVAL_MS} ms",
            queued.elapsed()
        );
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sync_flushes_only_when_a_caller_waits_and_then_once_for_everything_written() {
        let dir = fresh_dir("demand");
        let log = EventLog::open(&dir, Durability::Sync, None).expect("open");
        let durable = log.durable_seq();
        let flushes = log.writer_flushes();
        let mut last = 0;
        for micros in 1..=3 {
            last = log
                .append(1_000, encode_body(&top_up(micros)))
                .expect("append");
            // Each one written on its own (the writer takes what is queued).
            assert!(eventually(|| written_seq(&log) >= last), "never written");
        }
        // Written, asked for by nobody: not flushed, not yet visible to readers.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(log.writer_flushes(), flushes);
        assert_eq!(log.durable_seq(), durable);
        assert!(log.events_after(0, 10).expect("read").is_empty());
        // A wait for the first asks for it while the writer sleeps: one flush covers all three.
        log.wait(last - 2).expect("durable");
        assert_eq!(log.writer_flushes(), flushes + 1);
        assert_eq!(log.durable_seq(), last);
        log.wait(last).expect("durable");
        assert_eq!(log.writer_flushes(), flushes + 1);
        assert_eq!(log.events_after(0, 10).expect("read").len(), 3);
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_in_sync_mode_fails_the_written_events_not_yet_durable() {
        let dir = fresh_dir("unsynced-fail");
        let faults = Faults::new();
        let log = EventLog::open(&dir, Durability::Sync, Some(Arc::clone(&faults))).expect("open");
        let durable = log.append(1_000, encode_body(&top_up(1))).expect("append");
        log.wait(durable).expect("durable");
        let unsynced = log.append(1_001, encode_body(&top_up(2))).expect("append");
        assert!(
            eventually(|| written_seq(&log) >= unsynced),
            "never written"
        );
        faults.fail_next_inserts(1);
        let failing = log.append(1_002, encode_body(&top_up(3))).expect("append");
        assert!(log.wait(failing).is_err());
        // Written before the failure but never flushed: it fails too, and is cut off the file.
        assert!(log.wait(unsynced).is_err());
        log.wait(durable).expect("acknowledged before the failure");
        assert_eq!(log.durable_seq(), durable);
        assert!(log.close().is_err(), "the log stays failed");
        drop(log);
        let log = EventLog::open(&dir, Durability::Sync, None).expect("reopen");
        let events = log.events_after(0, 10).expect("read");
        assert_eq!(
            events.iter().map(|event| event.seq).collect::<Vec<_>>(),
            vec![durable]
        );
        log.close().expect("close");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_flush_wakes_every_sync_waiter_with_the_error() {
        let dir = fresh_dir("waiters-fail");
        let faults = Faults::new();
        let log = Arc::new(
            EventLog::open(&dir, Durability::Sync, Some(Arc::clone(&faults))).expect("open"),
        );
        let outcomes = append_and_wait_from_threads(&log, 32, 30, 0, Some((&faults, 200)));
        let durable = log.durable_seq();
        let failures = outcomes
            .iter()
            .filter(|(_, result)| result.is_err())
            .count();
        assert!(failures > 0, "the injected fault surfaced nowhere");
        for (seq, result) in &outcomes {
            // Acknowledged exactly when durable: everything after the failed flush fails.
            assert_eq!(
                result.is_ok(),
                *seq != 0 && *seq <= durable,
                "seq {seq}: {result:?}"
            );
        }
        assert!(outcomes.iter().filter(|(_, result)| result.is_ok()).count() >= 200);
        assert!(log.close().is_err(), "the log stays failed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
