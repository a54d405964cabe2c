//! The event log on sled: group commit, durability modes, snapshots, cursors and compaction.
//!
//! Callers append encoded events to a queue (a short mutex: the sequence number is assigned
//! there, so the queue's order is the log's order). One writer thread drains the queue, packs the
//! events into records of at most `MAX_RECORD_BYTES` (sled's cost is per insert, not per byte),
//! inserts them, and — in `Sync` mode — makes them durable once per batch: sled's `flush()` only
//! issues `sync_file_range` on Linux, which flushes neither the drive's cache nor metadata, so
//! the writer follows it with `fdatasync` of sled's `db` file and `fsync` of any blob files
//! (upstream issues 1452 and 1351). Callers in `Sync` mode wait until their sequence number is
//! durable; everyone in a batch shares one flush, so throughput grows with concurrency.
//!
//! Trees: `events` (record key = first sequence number, big-endian), `snapshots` (chunks keyed by
//! snapshot sequence number and chunk index), `meta` (format version, the latest snapshot, the
//! first retained sequence number), `cursors` (named export cursors).
//!
//! After a write or flush error the log is failed: the batch's callers get the error and undo
//! their in-memory effect, and every later append is refused until the engine is reopened. In
//! `Sync` mode memory therefore never runs ahead of disk; in the other modes a call was already
//! answered when its write fails, so its effect stays in memory (not on disk) until the reopen —
//! the loss those modes accept.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::event::{
    decode_event, decode_record, encode_record, record_key, Event, Record, FORMAT_VERSION,
};

/// Records stay small enough that a whole sled leaf of them (sled splits a leaf past 16 entries)
/// stays under sled's blob threshold (segment size / 4 = 128 KiB): otherwise every node split
/// rewrites both halves as new blob files, tripling the bytes written and fsyncing new files on
/// every commit (measured: 1,200-1,400 bytes written per 453-byte event with 64 KiB records).
pub const MAX_RECORD_BYTES: usize = 7 * 1024;
/// A single event body is bounded too (a policy document is the largest).
pub const MAX_EVENT_BYTES: usize = 48 * 1024;
/// Events queued but not yet written, at most: an append waits for room beyond this, so in the
/// modes that do not wait for durability a process crash loses at most this many events (plus
/// those written but not yet flushed).
pub const MAX_QUEUED_EVENTS: usize = 16_384;
const SNAPSHOT_CHUNK_BYTES: usize = 48 * 1024;
const LOCK_RETRIES: u32 = 50;
const LOCK_RETRY_DELAY: Duration = Duration::from_millis(20);

const META_FORMAT: &[u8] = b"format_version";
const META_SNAPSHOT: &[u8] = b"snapshot";
const META_PREVIOUS_SNAPSHOT: &[u8] = b"previous_snapshot";
const META_LOG_START: &[u8] = b"log_start";

/// When an acknowledged event is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A call returns only after its event is flushed and fsynced; concurrent callers share one
    /// flush (group commit). A crash loses nothing that was acknowledged.
    Sync,
    /// A call returns once its event is queued; the writer writes it and makes it durable in
    /// the background at most `ms` later. A crash can lose the acknowledged events still queued
    /// (at most `MAX_QUEUED_EVENTS`) and, on power loss, those written in the last `ms`.
    Interval { ms: u64 },
    /// No explicit flush (sled's own background flush, every 500 ms, still runs). For tests and
    /// benchmarks: a crash can lose the queued events (at most `MAX_QUEUED_EVENTS`) and any
    /// acknowledged event sled had not flushed.
    None,
}

/// Faults to inject into the log's storage: for tests of error paths.
#[derive(Debug, Default)]
pub struct Faults {
    // Relaxed: counters read and decremented by the writer thread only; tests set them.
    fail_inserts: AtomicU64,
    fail_flushes: AtomicU64,
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// The next `count` record inserts fail.
    pub fn fail_next_inserts(&self, count: u64) {
        self.fail_inserts.store(count, Ordering::Relaxed);
    }

    /// The next `count` durable flushes fail.
    pub fn fail_next_flushes(&self, count: u64) {
        self.fail_flushes.store(count, Ordering::Relaxed);
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPointer {
    /// The snapshot holds the effect of every event up to and including this one.
    pub seq: u64,
    pub chunks: u32,
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Queue {
    next_seq: u64,
    events: Vec<(u64, u64, Vec<u8>)>,
    stop: bool,
}

#[derive(Debug, Default)]
struct Progress {
    /// Every event up to here is durable (or, without `Sync`, written to sled).
    durable_seq: u64,
    /// The first sequence number that failed, and why.
    failure: Option<(u64, String)>,
}

#[derive(Debug)]
struct Shared {
    // Relaxed: the newest sequence number handed out, read to decide when to checkpoint.
    last_appended: AtomicU64,
    durability: Durability,
    faults: Option<Arc<Faults>>,
    queue: Mutex<Queue>,
    queue_ready: Condvar,
    queue_room: Condvar,
    progress: Mutex<Progress>,
    progress_changed: Condvar,
}

/// The open log. Dropping it stops the writer after a final flush.
#[derive(Debug)]
pub struct EventLog {
    dir: PathBuf,
    db: sled::Db,
    events: sled::Tree,
    snapshots: sled::Tree,
    meta: sled::Tree,
    cursors: sled::Tree,
    syncer: Arc<FileSyncer>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn storage(context: impl std::fmt::Display, error: impl std::fmt::Display) -> Error {
    Error::Storage {
        problem: format!("{context}: {error}"),
    }
}

impl EventLog {
    /// Opens (creating if needed) the log in `dir`.
    pub fn open(
        dir: &Path,
        durability: Durability,
        faults: Option<Arc<Faults>>,
    ) -> Result<EventLog, Error> {
        if let Durability::Interval { ms } = durability {
            if ms == 0 || ms > 60_000 {
                return Err(Error::invalid(
                    "durability",
                    "an interval is between 1 and 60,000 ms",
                ));
            }
        }
        prepare_directory(dir)?;
        let db = open_sled(dir)?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|error| storage(format!("{}: tree {name}", dir.display()), error))
        };
        let (events, snapshots, meta, cursors) = (
            tree("events")?,
            tree("snapshots")?,
            tree("meta")?,
            tree("cursors")?,
        );
        check_format(dir, &meta, &events)?;
        let last_seq = match events
            .last()
            .map_err(|error| storage("reading the log's end", error))?
        {
            Some((key, value)) => decode_record(&key, &value)?
                .events
                .last()
                .map_or(0, |event| event.0),
            None => read_u64(&meta, META_LOG_START)?.map_or(0, |start| start.saturating_sub(1)),
        };
        let shared = Arc::new(Shared {
            last_appended: AtomicU64::new(last_seq),
            durability,
            faults,
            queue: Mutex::new(Queue {
                next_seq: last_seq + 1,
                ..Queue::default()
            }),
            queue_ready: Condvar::new(),
            queue_room: Condvar::new(),
            progress: Mutex::new(Progress {
                durable_seq: last_seq,
                failure: None,
            }),
            progress_changed: Condvar::new(),
        });
        let syncer = Arc::new(FileSyncer::new(dir)?);
        let log = EventLog {
            dir: dir.to_path_buf(),
            db,
            events,
            snapshots,
            meta,
            cursors,
            syncer,
            shared,
            writer: Mutex::new(None),
        };
        log.start_writer()?;
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    fn start_writer(&self) -> Result<(), Error> {
        let writer = Writer {
            shared: Arc::clone(&self.shared),
            db: self.db.clone(),
            events: self.events.clone(),
            syncer: Arc::clone(&self.syncer),
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

    /// Every event up to here is durable (with `Sync`) or written.
    pub fn durable_seq(&self) -> u64 {
        self.shared.progress.lock().durable_seq
    }

    /// Queues an encoded event body; returns its sequence number. Fails at once if the log has
    /// failed before.
    pub fn append(&self, at_ms: u64, body: Vec<u8>) -> Result<u64, Error> {
        if body.len() > MAX_EVENT_BYTES {
            return Err(Error::invalid(
                "event",
                format!("{} bytes; at most {MAX_EVENT_BYTES}", body.len()),
            ));
        }
        if let Some((seq, problem)) = &self.shared.progress.lock().failure {
            return Err(failed(*seq, problem));
        }
        let mut queue = self.shared.queue.lock();
        while queue.events.len() >= MAX_QUEUED_EVENTS && !queue.stop {
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
        queue.events.push((seq, at_ms, body));
        drop(queue);
        self.shared.queue_ready.notify_one();
        Ok(seq)
    }

    /// Waits, in `Sync` mode, until `seq` is durable; in the other modes returns at once unless
    /// the log has already failed at or before `seq`.
    pub fn wait(&self, seq: u64) -> Result<(), Error> {
        let mut progress = self.shared.progress.lock();
        loop {
            if let Some((failed_seq, problem)) = &progress.failure {
                if *failed_seq <= seq {
                    return Err(failed(*failed_seq, problem));
                }
            }
            if self.shared.durability != Durability::Sync || progress.durable_seq >= seq {
                return Ok(());
            }
            self.shared.progress_changed.wait(&mut progress);
        }
    }

    /// Waits until every event appended so far is written, then makes it durable, whatever
    /// the mode (a checkpoint, a close, `tally` commands).
    pub fn sync(&self) -> Result<(), Error> {
        let last = self.next_seq() - 1;
        let mut progress = self.shared.progress.lock();
        loop {
            if let Some((seq, problem)) = &progress.failure {
                return Err(failed(*seq, problem));
            }
            if progress.durable_seq >= last {
                break;
            }
            self.shared.progress_changed.wait(&mut progress);
        }
        drop(progress);
        self.syncer.flush(&self.db, self.shared.faults.as_deref())
    }

    /// Reads up to `limit` events with sequence numbers greater than `after`, in order.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, Error> {
        let mut out = Vec::with_capacity(limit.min(4_096));
        let start = match self
            .events
            .range(..=record_key(after.saturating_add(1)))
            .next_back()
            .transpose()
            .map_err(|error| storage("reading the log", error))?
        {
            Some((key, _)) => key.to_vec(),
            None => record_key(0).to_vec(),
        };
        for entry in self.events.range(start..) {
            let (key, value) = entry.map_err(|error| storage("reading the log", error))?;
            let record = decode_record(&key, &value)?;
            let first = record.events.first().map_or(0, |event| event.0);
            for raw in &record.events {
                if raw.0 > after {
                    out.push(decode_event(first, raw)?);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every record, decoded, in order: for recovery and `verify`.
    pub fn records(&self) -> impl Iterator<Item = Result<Record, Error>> + '_ {
        self.events.iter().map(|entry| {
            let (key, value) = entry.map_err(|error| storage("reading the log", error))?;
            decode_record(&key, &value)
        })
    }

    /// The first sequence number still in the log (older ones were compacted away).
    pub fn log_start(&self) -> Result<u64, Error> {
        match self
            .events
            .first()
            .map_err(|error| storage("reading the log", error))?
        {
            Some((key, value)) => Ok(decode_record(&key, &value)?
                .events
                .first()
                .map_or(1, |event| event.0)),
            None => Ok(read_u64(&self.meta, META_LOG_START)?.unwrap_or(1)),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Snapshots.

    pub fn snapshot_pointer(&self) -> Result<Option<SnapshotPointer>, Error> {
        read_pointer(&self.meta, META_SNAPSHOT)
    }

    pub fn previous_snapshot_pointer(&self) -> Result<Option<SnapshotPointer>, Error> {
        read_pointer(&self.meta, META_PREVIOUS_SNAPSHOT)
    }

    /// Stores a snapshot covering events up to `seq` durably, then points the meta tree at it.
    /// Keeps the one before (for `verify`) and deletes older ones.
    pub fn write_snapshot(&self, seq: u64, bytes: &[u8]) -> Result<SnapshotPointer, Error> {
        let chunks: Vec<&[u8]> = bytes.chunks(SNAPSHOT_CHUNK_BYTES).collect();
        for (index, chunk) in chunks.iter().enumerate() {
            self.snapshots
                .insert(snapshot_key(seq, index as u32), *chunk)
                .map_err(|error| storage("writing a snapshot", error))?;
        }
        let pointer = SnapshotPointer {
            seq,
            chunks: chunks.len() as u32,
            bytes: bytes.len() as u64,
        };
        self.syncer.flush(&self.db, self.shared.faults.as_deref())?;
        let previous = self.snapshot_pointer()?;
        let encoded = bincode::serialize(&pointer).unwrap_or_default();
        self.meta
            .insert(META_SNAPSHOT, encoded)
            .map_err(|error| storage("writing a snapshot", error))?;
        if let Some(previous) = previous.filter(|previous| previous.seq != seq) {
            let encoded = bincode::serialize(&previous).unwrap_or_default();
            self.meta
                .insert(META_PREVIOUS_SNAPSHOT, encoded)
                .map_err(|error| storage("writing a snapshot", error))?;
            self.delete_snapshots_before(previous.seq)?;
        }
        self.syncer.flush(&self.db, self.shared.faults.as_deref())?;
        Ok(pointer)
    }

    fn delete_snapshots_before(&self, seq: u64) -> Result<(), Error> {
        for entry in self.snapshots.range(..snapshot_key(seq, 0)) {
            let (key, _) = entry.map_err(|error| storage("deleting old snapshots", error))?;
            self.snapshots
                .remove(key)
                .map_err(|error| storage("deleting old snapshots", error))?;
        }
        Ok(())
    }

    pub fn read_snapshot(&self, pointer: &SnapshotPointer) -> Result<Vec<u8>, Error> {
        let mut bytes = Vec::with_capacity(pointer.bytes as usize);
        for index in 0..pointer.chunks {
            let chunk = self
                .snapshots
                .get(snapshot_key(pointer.seq, index))
                .map_err(|error| storage("reading a snapshot", error))?
                .ok_or_else(|| {
                    storage(
                        format!("snapshot {}", pointer.seq),
                        format!("chunk {index} is missing"),
                    )
                })?;
            bytes.extend_from_slice(&chunk);
        }
        if bytes.len() as u64 != pointer.bytes {
            return Err(storage(
                format!("snapshot {}", pointer.seq),
                format!("{} bytes, expected {}", bytes.len(), pointer.bytes),
            ));
        }
        Ok(bytes)
    }

    // -----------------------------------------------------------------------------------------
    // Export cursors and compaction.

    pub fn cursor(&self, name: &str) -> Result<u64, Error> {
        Ok(read_u64(&self.cursors, name.as_bytes())?.unwrap_or(0))
    }

    /// Saves a named cursor durably (it survives restarts).
    pub fn save_cursor(&self, name: &str, seq: u64) -> Result<(), Error> {
        self.cursors
            .insert(name.as_bytes(), &seq.to_be_bytes())
            .map_err(|error| storage("saving a cursor", error))?;
        self.syncer.flush(&self.db, self.shared.faults.as_deref())
    }

    /// Removes records whose every event is at or before `up_to_seq` and older than
    /// `before_ms`; returns how many events were removed.
    pub fn compact(&self, up_to_seq: u64, before_ms: u64) -> Result<u64, Error> {
        let mut removed = 0u64;
        let mut next_start = None;
        for entry in self.events.iter() {
            let (key, value) = entry.map_err(|error| storage("compacting the log", error))?;
            let record = decode_record(&key, &value)?;
            let last = record.events.last().map_or(0, |event| event.0);
            if last > up_to_seq || record.newest_at_ms >= before_ms {
                break;
            }
            self.events
                .remove(&key)
                .map_err(|error| storage("compacting the log", error))?;
            removed += record.events.len() as u64;
            next_start = Some(last + 1);
        }
        if let Some(start) = next_start {
            self.meta
                .insert(META_LOG_START, &start.to_be_bytes())
                .map_err(|error| storage("compacting the log", error))?;
        }
        self.syncer.flush(&self.db, self.shared.faults.as_deref())?;
        Ok(removed)
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, Error> {
        self.db
            .size_on_disk()
            .map_err(|error| storage("measuring the database", error))
    }

    /// Stops the writer after it has written and flushed everything queued.
    pub fn close(&self) -> Result<(), Error> {
        {
            let mut queue = self.shared.queue.lock();
            queue.stop = true;
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
        self.syncer.flush(&self.db, None)
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn failed(seq: u64, problem: &str) -> Error {
    Error::Storage {
        problem: format!("the log failed at event {seq} ({problem}); nothing from then on was kept; reopen the engine"),
    }
}

fn snapshot_key(seq: u64, chunk: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&seq.to_be_bytes());
    key[8..].copy_from_slice(&chunk.to_be_bytes());
    key
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>, Error> {
    match tree
        .get(key)
        .map_err(|error| storage("reading metadata", error))?
    {
        None => Ok(None),
        Some(value) => {
            let bytes: [u8; 8] = value.as_ref().try_into().map_err(|_| {
                storage(
                    "reading metadata",
                    format!("{:?} is not 8 bytes", String::from_utf8_lossy(key)),
                )
            })?;
            Ok(Some(u64::from_be_bytes(bytes)))
        }
    }
}

fn read_pointer(meta: &sled::Tree, key: &[u8]) -> Result<Option<SnapshotPointer>, Error> {
    match meta
        .get(key)
        .map_err(|error| storage("reading metadata", error))?
    {
        None => Ok(None),
        Some(value) => bincode::deserialize(&value)
            .map(Some)
            .map_err(|error| storage("the snapshot pointer is damaged", error)),
    }
}

/// Refuses a foreign directory, and moves aside a leftover `snap.*.generating` file: after a
/// crash in the middle of sled writing its snapshot, that file makes sled refuse to open the
/// database every time (upstream issues 1527 and 1533), though all data is intact without it.
fn prepare_directory(dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        return std::fs::create_dir_all(dir)
            .map_err(|error| storage(format!("creating {}", dir.display()), error));
    }
    if !dir.is_dir() {
        return Err(storage(dir.display(), "is not a directory"));
    }
    let entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|error| storage(format!("reading {}", dir.display()), error))?
        .filter_map(Result::ok)
        .collect();
    let names: Vec<String> = entries
        .iter()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    let is_sled = names.iter().any(|name| name == "db" || name == "conf");
    // `quarantined-*` files are sled snapshot leftovers this function moved aside earlier.
    if !names.is_empty() && !is_sled {
        return Err(storage(
            dir.display(),
            "exists and holds files that are not a tally database; choose an empty or new directory",
        ));
    }
    for name in names
        .iter()
        .filter(|name| name.starts_with("snap.") && name.ends_with(".generating"))
    {
        // Not `snap.*`: sled reads every file so named as one of its snapshots.
        let aside = dir.join(format!("quarantined-{name}"));
        std::fs::rename(dir.join(name), &aside)
            .map_err(|error| storage(format!("moving aside {name}"), error))?;
    }
    Ok(())
}

/// Opens sled, retrying briefly while a lock from this same process is still being released
/// (the file lock can outlive dropping the database: upstream issue 1234).
fn open_sled(dir: &Path) -> Result<sled::Db, Error> {
    let config = sled::Config::new().path(dir);
    let mut attempt = 0;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
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
            Err(error) => {
                return Err(storage(
                    format!("{} cannot be opened (damaged?)", dir.display()),
                    error,
                ))
            }
        }
    }
}

fn check_format(dir: &Path, meta: &sled::Tree, events: &sled::Tree) -> Result<(), Error> {
    match meta
        .get(META_FORMAT)
        .map_err(|error| storage("reading metadata", error))?
    {
        Some(value) => {
            let version = value.first().copied().map_or(0, u16::from)
                | value.get(1).copied().map_or(0, |high| u16::from(high) << 8);
            if version > FORMAT_VERSION {
                return Err(storage(
                    dir.display(),
                    format!("was written in format version {version}; this build reads up to {FORMAT_VERSION}: upgrade tally"),
                ));
            }
            Ok(())
        }
        None => {
            if !events.is_empty() {
                return Err(storage(
                    dir.display(),
                    "has events but no format version: not a tally database",
                ));
            }
            meta.insert(META_FORMAT, &FORMAT_VERSION.to_le_bytes())
                .map_err(|error| storage("writing metadata", error))?;
            Ok(())
        }
    }
}

/// Makes sled's writes durable: `flush()` then `fdatasync` of the `db` file and `fsync` of new
/// blob files and of the blob directory.
#[derive(Debug)]
struct FileSyncer {
    dir: PathBuf,
    db_file: Mutex<File>,
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
}

impl FileSyncer {
    fn new(dir: &Path) -> Result<FileSyncer, Error> {
        let db_file = File::open(dir.join("db"))
            .map_err(|error| storage(format!("opening {}/db", dir.display()), error))?;
        if let Ok(directory) = File::open(dir) {
            let _ = directory.sync_all();
        }
        // Blob files already there are made durable once now; after that only new ones need
        // an fsync (seeding the set keeps the first commit after an open from syncing them all).
        let mut existing = HashSet::new();
        if let Ok(entries) = std::fs::read_dir(dir.join("blobs")) {
            for entry in entries.filter_map(Result::ok) {
                if let Ok(file) = File::open(entry.path()) {
                    let _ = file.sync_all();
                }
                existing.insert(entry.file_name());
            }
        }
        Ok(FileSyncer {
            dir: dir.to_path_buf(),
            db_file: Mutex::new(db_file),
            synced_blobs: Mutex::new(existing),
        })
    }

    fn flush(&self, db: &sled::Db, faults: Option<&Faults>) -> Result<(), Error> {
        if faults.is_some_and(|faults| Faults::take(&faults.fail_flushes)) {
            return Err(storage("flushing the log", "injected fault"));
        }
        db.flush()
            .map_err(|error| storage("flushing the log", error))?;
        self.db_file
            .lock()
            .sync_data()
            .map_err(|error| storage("fdatasync of sled's db file", error))?;
        self.sync_blobs()
    }

    fn sync_blobs(&self) -> Result<(), Error> {
        let blobs = self.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return Ok(());
        };
        let mut synced = self.synced_blobs.lock();
        let mut any = false;
        for entry in entries.filter_map(Result::ok) {
            if synced.contains(&entry.file_name()) {
                continue;
            }
            if let Ok(file) = File::open(entry.path()) {
                file.sync_all()
                    .map_err(|error| storage("fsync of a blob file", error))?;
            }
            synced.insert(entry.file_name());
            any = true;
        }
        if any {
            if let Ok(directory) = File::open(&blobs) {
                directory
                    .sync_all()
                    .map_err(|error| storage("fsync of the blob directory", error))?;
            }
        }
        Ok(())
    }
}

struct Writer {
    shared: Arc<Shared>,
    db: sled::Db,
    events: sled::Tree,
    syncer: Arc<FileSyncer>,
}

impl Writer {
    fn run(self) {
        let mut last_flush = Instant::now();
        let mut unflushed = false;
        loop {
            let (batch, stop) = self.next_batch(unflushed, last_flush);
            if !batch.is_empty() {
                let first = batch[0].0;
                let last = batch[batch.len() - 1].0;
                let mut result = self.write(&batch);
                unflushed |= result.is_ok();
                if let (Ok(keys), Durability::Sync) = (&result, self.shared.durability) {
                    if let Err(error) = self.syncer.flush(&self.db, self.shared.faults.as_deref()) {
                        self.unwrite(keys);
                        result = Err(error);
                    }
                    last_flush = Instant::now();
                    unflushed = false;
                }
                self.report(first, last, result.map(|_| ()));
            }
            if let Durability::Interval { ms } = self.shared.durability {
                if unflushed && (stop || last_flush.elapsed() >= Duration::from_millis(ms)) {
                    let result = self.syncer.flush(&self.db, self.shared.faults.as_deref());
                    if let Err(error) = result {
                        let mut progress = self.shared.progress.lock();
                        let next = progress.durable_seq + 1;
                        progress.failure.get_or_insert((next, error.to_string()));
                        self.shared.progress_changed.notify_all();
                    }
                    last_flush = Instant::now();
                    unflushed = false;
                }
            }
            if stop {
                return;
            }
        }
    }

    /// Waits for events (or the interval deadline, or stop) and takes them all.
    fn next_batch(&self, unflushed: bool, last_flush: Instant) -> (Vec<(u64, u64, Vec<u8>)>, bool) {
        let mut queue = self.shared.queue.lock();
        while queue.events.is_empty() && !queue.stop {
            match self.shared.durability {
                Durability::Interval { ms } if unflushed => {
                    let deadline = last_flush + Duration::from_millis(ms);
                    if Instant::now() >= deadline
                        || self
                            .shared
                            .queue_ready
                            .wait_until(&mut queue, deadline)
                            .timed_out()
                    {
                        break;
                    }
                }
                _ => self.shared.queue_ready.wait(&mut queue),
            }
        }
        let batch = std::mem::take(&mut queue.events);
        self.shared.queue_room.notify_all();
        (batch, queue.stop)
    }

    /// Inserts the batch as records of at most `MAX_RECORD_BYTES`, in one atomic sled batch.
    /// After a failure nothing more is written (no gap can follow a hole).
    fn write(&self, batch: &[(u64, u64, Vec<u8>)]) -> Result<Vec<[u8; 8]>, Error> {
        if let Some((seq, problem)) = &self.shared.progress.lock().failure {
            return Err(failed(*seq, problem));
        }
        let mut records = sled::Batch::default();
        let mut keys = Vec::new();
        let mut start = 0;
        while start < batch.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < batch.len()
                && (end == start || bytes + batch[end].2.len() + 24 <= MAX_RECORD_BYTES)
            {
                bytes += batch[end].2.len() + 24;
                end += 1;
            }
            let events = batch[start..end].to_vec();
            let newest_at_ms = events.iter().map(|event| event.1).max().unwrap_or(0);
            let record = Record {
                version: FORMAT_VERSION,
                newest_at_ms,
                events,
            };
            let key = record_key(batch[start].0);
            records.insert(&key, encode_record(&record));
            keys.push(key);
            start = end;
        }
        if self
            .shared
            .faults
            .as_deref()
            .is_some_and(|faults| Faults::take(&faults.fail_inserts))
        {
            return Err(storage("writing the log", "injected fault"));
        }
        self.events
            .apply_batch(records)
            .map_err(|error| storage("writing the log", error))?;
        Ok(keys)
    }

    /// A batch whose flush failed is taken out of sled again, so it cannot reach the disk
    /// later through sled's own background flush: its callers were told it failed.
    fn unwrite(&self, keys: &[[u8; 8]]) {
        let mut removal = sled::Batch::default();
        for key in keys {
            removal.remove(key);
        }
        let _ = self.events.apply_batch(removal);
    }

    fn report(&self, first: u64, last: u64, result: Result<(), Error>) {
        let mut progress = self.shared.progress.lock();
        match result {
            Ok(()) if progress.failure.is_none() => progress.durable_seq = last,
            Ok(()) => {}
            Err(error) => {
                progress.failure.get_or_insert((first, error.to_string()));
            }
        }
        drop(progress);
        self.shared.progress_changed.notify_all();
    }
}
