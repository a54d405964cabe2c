//! Recovery: opening a database rebuilds every window, balance, key, seat, idempotency record and
//! reservation exactly as they were at the last acknowledged event — from the latest snapshot
//! (checkpoint) plus the events after it — and `verify` checks a database.
//!
//! A checkpoint takes a consistent cut: it holds every lock a state change logs under (the
//! reservation table, the idempotency shards, the registry, the policy list and every key shard
//! for writing), so every event appended so far has been applied in memory and no applied change
//! is missing from the log. The cut is serialised, the log synced up to it, and the snapshot
//! stored as one file; opening then replays only the events after it.
//!
//! Replay applies each event's exact effect (the counters, epochs and amounts a usage moved), so
//! the order in which concurrent requests met in memory does not matter: counter and credit
//! changes commute, and everything order-sensitive (seats, policies, reservations, request ids)
//! is logged under the lock that orders it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::accounts::{KeyKind, KeyState, KeyTable, Registry, TeamRecord, UserRecord};
use crate::adjustment::{force_fitting, unforce_counter};
use crate::admission::{ChargedTo, Decision, Quantities, Receipt};
use crate::clock::Clock;
use crate::engine::{AdjustmentDirection, Engine, EngineOptions};
use crate::error::Error;
use crate::event::{
    Event, EventBody, GivenBack, ReservationEnd, FORMAT_VERSION, OLDEST_FORMAT_VERSION,
};
use crate::idempotency::{Fingerprint, LoggedAs, RequestRecord};
use crate::ledger::{Counter, KeyUsage, Team, WindowState};
use crate::log::{Durability, EventLog, Faults, SnapshotBytes};
use crate::options::RecordedOptions;
use crate::policy::{CounterId, PlanId, Policy, Window};
use crate::reservation::{Closed, Reservation, ReservationId};
use crate::window::{CalendarCounter, RollingWindow};

mod buckets;
mod cut;
mod pacing;

pub use cut::CutLockTime;
pub(crate) use cut::Cuts;
use cut::RawCut;
pub(crate) use pacing::CheckpointPacing;

/// How far behind the event it looks at an applier applies (see `apply_usage_run`), and how
/// far behind it the second look-ahead (a usage event's name and usage) runs: in events of
/// the run, of which 5 or 3 in 8 are the applier's own.
const REPLAY_AHEAD: usize = 16;
const REPLAY_POINTEES_AHEAD: usize = 8;
const _: () = assert!(REPLAY_POINTEES_AHEAD < REPLAY_AHEAD);
/// Events per batch the replay's decoder hands over, and batches it may be ahead by.
const REPLAY_BATCH: usize = 4096;
const REPLAY_BATCHES_QUEUED: usize = 8;
/// A run of usage events at least this long is shared with the replay's helper thread; a
/// shorter one costs less applied here than the hand-over (a wake-up) does.
const PARALLEL_REPLAY_RUN: usize = 64;
/// The helper applies the keys of 3 key shards in 8: on two cores it shares its core with
/// the decoder (a fifth to a quarter of the work), so the opening thread takes the rest
/// (`openloop`: the opening thread waited 100-170 ms per open for the helper at half and
/// half, 20-70 ms at 3 in 8).
const HELPER_SHARDS_OF_8: usize = 3;

/// From this many keys (teams) on, a snapshot's keys (teams) are restored on two threads.
const PARALLEL_RESTORE_KEYS: usize = 4096;
const PARALLEL_RESTORE_TEAMS: usize = 4096;

/// A batch of events read for replay. A usage event without a decision (nearly every event of
/// a busy log) is not decoded into an `Event`: its body is copied into `bodies` and read in
/// place by whichever applier applies it, so neither thread allocates for it. Every other
/// event is decoded in full into `decoded`.
#[derive(Default)]
struct ReplayBatch {
    events: Vec<ReplayEvent>,
    /// The bodies of the usage events read in place, back to back.
    bodies: Vec<u8>,
    decoded: Vec<Event>,
}

struct ReplayEvent {
    seq: u64,
    at_ms: u64,
    /// The key's hash, for a usage event.
    hash: Option<u64>,
    what: ReplayBody,
}

enum ReplayBody {
    /// A usage event without a decision, checked by `read_usage` on the decoder's thread:
    /// its key is `bodies[key]`, and its receipt is read from `bodies[receipt_at..]`.
    InPlace {
        key: std::ops::Range<usize>,
        receipt_at: usize,
    },
    /// `decoded[index]`.
    Decoded(usize),
}

impl ReplayBatch {
    fn clear(&mut self) {
        self.events.clear();
        self.bodies.clear();
        self.decoded.clear();
    }

    /// The key and receipt of a usage event read in place.
    fn usage(
        &self,
        event: &ReplayEvent,
        key: &std::ops::Range<usize>,
        receipt_at: usize,
    ) -> Result<(&str, Receipt), Error> {
        // Both were read on the decoder's thread; read again, they cannot fail short of a bug.
        let key = self
            .bodies
            .get(key.clone())
            .and_then(|key| std::str::from_utf8(key).ok());
        let receipt = self
            .bodies
            .get(receipt_at..)
            .and_then(crate::event::read_receipt);
        key.zip(receipt)
            .ok_or_else(|| storage(format!("event {}: its usage reads differently", event.seq)))
    }
}

/// Which of replay's two appliers applies the usage events of a key (1: the helper): by key
/// shard, so the two never take the same shard's lock.
fn applier_of(hash: u64) -> usize {
    usize::from(KeyTable::shard_index(hash) % 8 < HELPER_SHARDS_OF_8)
}

/// The key whose debts (see `Debts`) a barrier event may touch.
fn debtor_key(body: &EventBody) -> Option<&str> {
    match body {
        EventBody::ReservationOpened { key, .. }
        | EventBody::ReservationClosed { key, .. }
        | EventBody::Refunded { key, .. }
        | EventBody::UsageAdjusted { key, .. } => Some(key),
        _ => None,
    }
}

/// The replay's second applier: a thread that applies its keys' share of a run of usage
/// events while the opening thread applies the rest (see `Engine::apply_decoded`).
struct ReplayHelper {
    work: std::sync::mpsc::SyncSender<(Arc<ReplayBatch>, std::ops::Range<usize>, Debts)>,
    done: std::sync::mpsc::Receiver<(Result<u64, Error>, Debts)>,
}

impl ReplayHelper {
    /// Starts the helper in `scope`; `None` if no thread could be started (the opening thread
    /// then applies everything).
    fn start<'scope>(
        engine: &'scope Engine,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) -> Option<ReplayHelper> {
        let (work, runs) =
            std::sync::mpsc::sync_channel::<(Arc<ReplayBatch>, std::ops::Range<usize>, Debts)>(1);
        let (answers, done) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("tally-replay-helper".into())
            .spawn_scoped(scope, move || {
                for (batch, run, mut debts) in runs {
                    let applied = engine.apply_usage_run(&batch, run, 1, &mut debts);
                    // Its share of the batch is let go before answering, so the opening thread
                    // gets the batch back whole.
                    drop(batch);
                    if answers.send((applied, debts)).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(ReplayHelper { work, done })
    }

    fn send(
        &self,
        batch: Arc<ReplayBatch>,
        run: std::ops::Range<usize>,
        debts: Debts,
    ) -> Result<(), Error> {
        self.work
            .send((batch, run, debts))
            .map_err(|_| storage("the replay's helper thread stopped"))
    }

    /// The helper's count of applied events (or its error) and its debts, once it is done
    /// with its run.
    fn wait(&self) -> Result<(Result<u64, Error>, Debts), Error> {
        self.done
            .recv()
            .map_err(|_| storage("the replay's helper thread stopped"))
    }
}

/// The replay's decoder: reads events `(after, up_to]` in order, checks that none is missing
/// and that each decodes (an error names the event), and sends them in batches (see
/// `ReplayBatch`). Stops early, without an error, once the applier has stopped listening (it
/// failed).
fn decode_for_replay(
    log: &EventLog,
    after: u64,
    up_to: u64,
    batches: &std::sync::mpsc::SyncSender<ReplayBatch>,
    returned: &std::sync::mpsc::Receiver<ReplayBatch>,
) -> Result<(), Error> {
    let mut next = after;
    let mut batch = ReplayBatch::default();
    let mut listening = true;
    log.scan(after, |raw| {
        if raw.seq > up_to {
            return Ok(false);
        }
        if raw.seq != next + 1 {
            return Err(storage(format!(
                "the log jumps from event {next} to {}: events are missing",
                raw.seq
            )));
        }
        next = raw.seq;
        let (hash, what) = match crate::event::read_usage(raw.body) {
            Some(usage) => {
                let at = batch.bodies.len();
                batch.bodies.extend_from_slice(raw.body);
                let key = at + usage.key_at..at + usage.key_at + usage.key.len();
                let receipt_at = at + usage.receipt_at;
                (
                    Some(KeyTable::hash(usage.key)),
                    ReplayBody::InPlace { key, receipt_at },
                )
            }
            None => {
                let event = crate::event::decode_raw(raw)?;
                let hash = match &event.body {
                    EventBody::UsageAdmitted { key, .. } => Some(KeyTable::hash(key)),
                    _ => None,
                };
                batch.decoded.push(event);
                (hash, ReplayBody::Decoded(batch.decoded.len() - 1))
            }
        };
        batch.events.push(ReplayEvent {
            seq: raw.seq,
            at_ms: raw.at_ms,
            hash,
            what,
        });
        if batch.events.len() == REPLAY_BATCH {
            // A batch the applier is done with, emptied here (what it decoded freed on the
            // thread that allocated it), or a new one.
            let empty = match returned.try_recv() {
                Ok(mut done) => {
                    done.clear();
                    done
                }
                Err(_) => ReplayBatch::default(),
            };
            let full = std::mem::replace(&mut batch, empty);
            listening = batches.send(full).is_ok();
        }
        Ok(listening)
    })?;
    if listening && !batch.events.is_empty() {
        let _ = batches.send(batch);
    }
    Ok(())
}

/// How to open a database. `Engine::open` checks each option against its range first
/// (`OpenOptions::validate`; the constants are in `options`).
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// An interval is 1 to `MAX_FLUSH_INTERVAL_MS` (60,000) ms.
    pub durability: Durability,
    pub engine: EngineOptions,
    /// A checkpoint is taken once this many events were logged since the last one. At least 1
    /// (each checkpoint also seals a log segment, so a small interval means many small files);
    /// `u64::MAX` in effect leaves checkpoints to `checkpoint` and `close`. A checkpoint whose
    /// work took 10 ms or more (of wall-clock time) holds the next one back until four times
    /// that has passed since it started, or until twice this many events came, whichever is
    /// first (`recovery::pacing`): checkpoints take about a quarter of a core, unless twice this
    /// many events come within four times a checkpoint's cost (then the cap comes first and
    /// they take more). So opening replays up to about twice this many events (more after a
    /// crash while a checkpoint's snapshot was being written: the tail before it too).
    pub checkpoint_every_events: u64,
    /// How long an export reader has: `compact`, and each periodic checkpoint once its
    /// snapshot is stored (judged at the engine clock's time at its cut), drop an event (its
    /// effect lives on in the snapshot) only once its timestamp is this long past the longest
    /// window and it was logged at least this long ago on the engine's clock, so a request
    /// delivered late, stamped long ago, stays this long after it was logged too. 0 to
    /// `MAX_PERIOD_MS`.
    pub retention_ms: u64,
    /// Faults to inject into the storage (tests).
    pub faults: Option<Arc<Faults>>,
    /// A log segment is sealed and a new one started past this many bytes (and at every
    /// checkpoint); compaction deletes whole segments. At least `MIN_SEGMENT_BYTES` (256).
    pub segment_bytes: u64,
    /// Open as a tool: run an existing database with the options it recorded (see
    /// `options::RecordedOptions`: the engine's options, `checkpoint_every_events` and
    /// `retention_ms`) instead of the ones here, which then apply only to a database that
    /// recorded none (a new one, or one written before options were recorded), and record
    /// nothing. False (the default): open as the database's owner, with the options here,
    /// and record them when the open succeeds. For tools that open or verify a gateway's
    /// database: with the defaults, a tool would keep request ids for a shorter horizon or
    /// compact events a longer retention keeps. The durability, faults and `segment_bytes`
    /// are always this call's own.
    pub use_recorded: bool,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            durability: Durability::Sync,
            engine: EngineOptions::default(),
            checkpoint_every_events: 1_000_000,
            retention_ms: 7 * 24 * 60 * 60 * 1_000,
            faults: None,
            segment_bytes: crate::log::SEGMENT_BYTES,
            use_recorded: false,
        }
    }
}

/// A key's counter in a snapshot. Its bytes are `buckets`' (`CounterRef`, `CounterWire`): a
/// rolling window's buckets packed from format 4 on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "buckets::CounterWire")]
enum CounterSnapshot {
    Rolling {
        head: u64,
        wide: bool,
        buckets: Vec<(u64, u64)>,
    },
    Calendar {
        period: u32,
        count: u64,
    },
}

/// A name in a decoded snapshot: borrowed from the snapshot's bytes (no allocation per name
/// while decoding: 100,000 keys, users and teams are about a million names), owned when a
/// snapshot is built from the engine.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    /// Borrowed whenever the input can lend it (bincode from a slice always can). serde's own
    /// `#[serde(borrow)]` borrows only a `Cow` that is itself a field, not one in an `Option`,
    /// a tuple or a `Vec`.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Name<'a>, D::Error> {
        struct Text;
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = Cow<'de, str>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Borrowed(text))
            }

            fn visit_str<E>(self, text: &str) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Owned(text.to_owned()))
            }

            fn visit_string<E>(self, text: String) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Owned(text))
            }
        }
        deserializer.deserialize_str(Text).map(Name)
    }
}

impl std::ops::Deref for Name<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Name<'_> {
    fn from(text: String) -> Self {
        Name(Cow::Owned(text))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "'de: 'a"))]
struct KeySnapshot<'a> {
    key: Name<'a>,
    payg: bool,
    user: Name<'a>,
    team: Name<'a>,
    seat: Option<u16>,
    open_reservations: u32,
    payg_micros: u64,
    time_floor_ms: u64,
    counters: Option<Vec<(u16, CounterSnapshot)>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "'de: 'a"))]
struct TeamSnapshot<'a> {
    name: Name<'a>,
    owner: Option<Name<'a>>,
    balance_micros: u64,
    charged_micros: u64,
    members: Vec<(Name<'a>, Name<'a>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RequestSnapshot {
    id: String,
    arrived_ms: u64,
    key: String,
    resource: String,
    quantities: Quantities,
    decision: Decision,
    receipt: Option<Receipt>,
    refunded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ReservationSnapshot {
    id: u64,
    key: String,
    resource: String,
    estimate: Quantities,
    receipt: Receipt,
    expires_at_ms: u64,
}

/// The whole engine state at one sequence number. A checkpoint writes its bytes without
/// building it (`RawCut::encode`, through the borrowed `SnapshotRef` and friends): a change
/// here is a change there too (a test compares the bytes).
///
/// Users, teams, each team's members and keys are in the order the checkpoint copied them
/// (the key shards' and the registry's), not sorted: a snapshot is read whole, by names, and
/// sorting 100,000 of each by name took about a third of a checkpoint's encoding. Two
/// snapshots of the same state compare equal once both are `in_name_order`. Request ids are
/// in arrival order and reservations by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "'de: 'a"))]
struct Snapshot<'a> {
    version: u16,
    seq: u64,
    newest_at_ms: u64,
    policies: Vec<Option<String>>,
    users: Vec<(Name<'a>, Name<'a>, Vec<Name<'a>>)>,
    teams: Vec<TeamSnapshot<'a>>,
    keys: Vec<KeySnapshot<'a>>,
    requests: Vec<RequestSnapshot>,
    open_reservations: Vec<ReservationSnapshot>,
    closed_reservations: Vec<(u64, u64, Closed)>,
    next_reservation: u64,
    /// The keys a usage correction left short, each with its `KeyState::short_until_ms`
    /// (format 4 on; an open of an older snapshot works them out: `mark_short_periods`).
    short_keys: Vec<(Name<'a>, u64)>,
    /// The keys revoked (`KeyState::revoked`; format 5 on: none could be before).
    revoked_keys: Vec<Name<'a>>,
}

/// A snapshot of format 4: `Snapshot` without `revoked_keys`.
#[derive(Deserialize)]
#[serde(bound(deserialize = "'de: 'a"))]
struct SnapshotFormat4<'a> {
    version: u16,
    seq: u64,
    newest_at_ms: u64,
    policies: Vec<Option<String>>,
    users: Vec<(Name<'a>, Name<'a>, Vec<Name<'a>>)>,
    teams: Vec<TeamSnapshot<'a>>,
    keys: Vec<KeySnapshot<'a>>,
    requests: Vec<RequestSnapshot>,
    open_reservations: Vec<ReservationSnapshot>,
    closed_reservations: Vec<(u64, u64, Closed)>,
    next_reservation: u64,
    short_keys: Vec<(Name<'a>, u64)>,
}

impl<'a> From<SnapshotFormat4<'a>> for Snapshot<'a> {
    fn from(old: SnapshotFormat4<'a>) -> Snapshot<'a> {
        Snapshot {
            version: old.version,
            seq: old.seq,
            newest_at_ms: old.newest_at_ms,
            policies: old.policies,
            users: old.users,
            teams: old.teams,
            keys: old.keys,
            requests: old.requests,
            open_reservations: old.open_reservations,
            closed_reservations: old.closed_reservations,
            next_reservation: old.next_reservation,
            short_keys: old.short_keys,
            revoked_keys: Vec::new(),
        }
    }
}

/// A snapshot of formats 2 and 3: `Snapshot` without `short_keys`, in bincode's fixed-width
/// integers.
#[derive(Deserialize)]
#[serde(bound(deserialize = "'de: 'a"))]
struct SnapshotFormat3<'a> {
    version: u16,
    seq: u64,
    newest_at_ms: u64,
    policies: Vec<Option<String>>,
    users: Vec<(Name<'a>, Name<'a>, Vec<Name<'a>>)>,
    teams: Vec<TeamSnapshot<'a>>,
    keys: Vec<KeySnapshot<'a>>,
    requests: Vec<RequestSnapshot>,
    open_reservations: Vec<ReservationSnapshot>,
    closed_reservations: Vec<(u64, u64, Closed)>,
    next_reservation: u64,
}

impl<'a> From<SnapshotFormat3<'a>> for Snapshot<'a> {
    fn from(old: SnapshotFormat3<'a>) -> Snapshot<'a> {
        Snapshot {
            version: old.version,
            seq: old.seq,
            newest_at_ms: old.newest_at_ms,
            policies: old.policies,
            users: old.users,
            teams: old.teams,
            keys: old.keys,
            requests: old.requests,
            open_reservations: old.open_reservations,
            closed_reservations: old.closed_reservations,
            next_reservation: old.next_reservation,
            short_keys: Vec::new(),
            revoked_keys: Vec::new(),
        }
    }
}

/// How a snapshot's body is encoded from format 4 on: bincode with varint integers, as event
/// bodies are (formats 2 and 3 used bincode's fixed-width legacy encoding, 8 bytes for every
/// `u64` and string length). The body's first field is its version: one varint byte, where
/// formats 2 and 3 wrote two (`[2 or 3, 0]`), so the first byte tells them apart.
pub(crate) fn snapshot_encoding() -> impl bincode::Options + Copy {
    bincode::DefaultOptions::new().with_varint_encoding()
}

impl Snapshot<'_> {
    /// The snapshot with its users, teams, each team's members and keys sorted by name: the
    /// one order two snapshots of the same state are compared in (`verify`, tests).
    fn in_name_order(mut self) -> Self {
        for team in &mut self.teams {
            team.members.sort();
        }
        self.teams.sort_by(|a, b| a.name.cmp(&b.name));
        self.users.sort();
        self.keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        self.short_keys.sort();
        self.revoked_keys.sort();
        self
    }
}

/// Where an open spent its time, measured with the process's monotonic clock (a figure for
/// benchmarks and operators; no engine logic reads it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Opening the log (sled, and a scan of the last segment for a torn tail).
    pub log_open: Duration,
    /// Reading the latest snapshot's bytes, and decoding them.
    pub snapshot_read: Duration,
    pub snapshot_decode: Duration,
    /// Bytes of usage memory made ready on another thread during the decode,
    /// as the snapshot's hint asked (0 for a snapshot without one).
    pub usage_warmed_bytes: u64,
    /// Rebuilding users, teams, keys, request ids and reservations from the decoded snapshot,
    /// then freeing it.
    pub restore: Duration,
    /// Reading, decoding and applying the events after the snapshot.
    pub replay: Duration,
    pub events_replayed: u64,
    /// The whole open, including the policy check after the replay.
    pub total: Duration,
}

impl std::fmt::Display for OpenReport {
    /// One line, in milliseconds: `log 12 + snapshot read 50 + decode 60 + restore 300 (196
    /// MiB warmed) + replay 1000000 events 370 = 800 ms`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
        write!(
            f,
            "log {:.0} + snapshot read {:.0} + decode {:.0} + restore {:.0} ({} MiB warmed) + replay {} events {:.0} = {:.0} ms",
            ms(self.log_open),
            ms(self.snapshot_read),
            ms(self.snapshot_decode),
            ms(self.restore),
            self.usage_warmed_bytes >> 20,
            self.events_replayed,
            ms(self.replay),
            ms(self.total)
        )
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub events: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub snapshot_seq: Option<u64>,
    /// Whether the latest snapshot equals a replay from the one before it (or from the start).
    pub snapshot_matches_replay: Option<bool>,
    /// Everything wrong, one line each; empty when the database is sound.
    pub problems: Vec<String>,
    /// Whether the replay ran with the options the database recorded (asked for with
    /// `use_recorded`, and a record was there and decoded), not the ones given.
    pub replayed_with_recorded_options: bool,
    /// The log ends in a write a crash cut short, never acknowledged, which the next open
    /// cuts off: where, and how many bytes. Not a problem (the database is sound with it).
    pub torn_tail: Option<String>,
}

impl VerifyReport {
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Which policy `Engine::open_choosing` runs an existing database with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PolicyChoice {
    /// The caller's, swapped in if it differs from the stored one.
    Given,
    /// The stored one; the caller's only for a new database.
    Stored,
}

/// What has gone wrong where no call's answer reports it, for a monitor (`Engine::health`): a
/// log that failed in the background (in `Interval` and `None` modes only the next call that
/// logs is refused, and `check` and `usage` never are), or a periodic checkpoint or automatic
/// compaction that failed (its error goes nowhere else: opening replays more, or the segments
/// it would have removed stay, until one succeeds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The log failed: every call that logs is refused until the engine is reopened.
    pub log_failure: Option<String>,
    /// The last periodic checkpoint could not store its snapshot, or could not start or
    /// finish its thread (a panic) (cleared by one that stores).
    pub checkpoint_failure: Option<String>,
    /// The last automatic compaction failed (cleared by one that succeeds, or by `compact`).
    pub compaction_failure: Option<String>,
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.log_failure.is_none()
            && self.checkpoint_failure.is_none()
            && self.compaction_failure.is_none()
    }
}

/// The last failures of the periodic checkpoints and compactions, which run on the snapshot
/// thread (`checkpoint_in_background`): `Health`'s.
#[derive(Debug, Default)]
pub(crate) struct BackgroundProblems {
    checkpoint: parking_lot::Mutex<Option<String>>,
    compaction: parking_lot::Mutex<Option<String>>,
}

impl BackgroundProblems {
    fn note<T>(slot: &parking_lot::Mutex<Option<String>>, outcome: &Result<T, Error>) {
        *slot.lock() = outcome.as_ref().err().map(ToString::to_string);
    }
}

/// Runs a periodic checkpoint's step on its snapshot thread, a panic in it turned into the
/// step's error, so that `health` reports it at once and as that step's failure. Left to
/// unwind, a panic was learnt only when the next periodic checkpoint joined the thread (never,
/// with no request crossing the next interval), always as the checkpoint's failure, which the
/// thread that join started cleared a request later by storing its snapshot: a compaction
/// panicking after every checkpoint went unreported while the log grew. Whatever the step
/// holds is dropped or cleared after it (a cut's copies left on locks run into fragments of
/// their own, and the cut is cleared before it is kept as the spare).
fn unless_panicked<T>(step: &str, work: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|message| (*message).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(storage(format!("{step}: its thread panicked ({message})")))
    })
}

/// What `compact` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    pub snapshot_seq: u64,
    pub events_removed: u64,
    pub first_seq_kept: u64,
}

fn storage(problem: impl Into<String>) -> Error {
    Error::Storage {
        problem: problem.into(),
    }
}

fn policy_from_json(document: &str, generation: u32) -> Result<Policy, Error> {
    let mut policy = Policy::from_logged_json(document).map_err(|error| {
        storage(format!(
            "policy generation {generation} in the log: {error}"
        ))
    })?;
    policy.generation = generation;
    Ok(policy)
}

impl Engine {
    /// Opens (or creates) the database in `dir`. `policy` is the policy to run with: on a new
    /// database it is the first event; on an existing one, if it differs from the stored policy
    /// it is swapped in (usage carries over), and refused as `swap_policy` refuses it (it drops
    /// a plan someone is seated on, or its usage could not carry over as it means).
    /// Options out of range (`OpenOptions::validate`) are refused before the directory is
    /// touched: nothing is created or changed.
    pub fn open(
        dir: impl AsRef<Path>,
        policy: Policy,
        clock: Arc<dyn Clock>,
        options: OpenOptions,
    ) -> Result<Engine, Error> {
        Engine::open_choosing(dir.as_ref(), policy, PolicyChoice::Given, clock, options)
    }

    /// Opens (or creates) the database in `dir` with the policy it last ran with: an existing
    /// database keeps its stored policy whatever `new_database_policy` says, and nothing is
    /// swapped or logged for it; a new database starts with `new_database_policy`. For tools
    /// that look at or correct a database a gateway runs (the `tally` operator commands): opening
    /// it must not change the gateway's policy.
    pub fn open_with_stored_policy(
        dir: impl AsRef<Path>,
        new_database_policy: Policy,
        clock: Arc<dyn Clock>,
        options: OpenOptions,
    ) -> Result<Engine, Error> {
        Engine::open_choosing(
            dir.as_ref(),
            new_database_policy,
            PolicyChoice::Stored,
            clock,
            options,
        )
    }

    fn open_choosing(
        dir: &Path,
        policy: Policy,
        choice: PolicyChoice,
        clock: Arc<dyn Clock>,
        mut options: OpenOptions,
    ) -> Result<Engine, Error> {
        options.validate()?;
        let started = Instant::now();
        let mut report = OpenReport::default();
        // Changes nothing of the database (but sled's own files) until `finish_open` below,
        // once nothing refused the open: a refused open leaves it as it found it (a torn
        // tail, a snapshot's leftover kept for the operator to look at).
        let log = EventLog::open_unfinished(
            dir,
            options.durability,
            options.faults.clone(),
            options.segment_bytes,
        )?;
        let recorded = log.recorded_options()?;
        // The request-id horizon option the database last ran with (see `forgotten_before`
        // below); unknown (none recorded, or a record that does not decode), the one given.
        let last_recorded = recorded
            .as_deref()
            .and_then(|bytes| RecordedOptions::decode(bytes).ok());
        let last_horizon_option_ms = last_recorded
            .as_ref()
            .map_or(options.engine.idempotency_horizon_ms, |recorded| {
                recorded.idempotency_horizon_ms
            });
        // The closed reservations the database last ran with a bound on (see below).
        let last_closed_capacity = last_recorded.as_ref().map_or(0, |recorded| {
            usize::try_from(recorded.max_open_reservations).unwrap_or(usize::MAX)
        });
        if options.use_recorded {
            if let Some(bytes) = recorded {
                RecordedOptions::decode(&bytes)?.apply_to(&mut options)?;
            }
        }
        report.log_open = started.elapsed();
        let wanted =
            serde_json::to_string(policy.document()).map_err(|error| storage(error.to_string()))?;
        let engine = Engine::new(policy, clock, options.engine)?;
        // Closed reservations were acknowledged (a repeated settle answers from them) and are
        // kept whole under a lower bound than the database ran with, as request ids are: the
        // snapshot's all of them, and a replayed close forgets the oldest past the bound the
        // closes were made under (the one recorded, if higher), as they were live. The next
        // close forgets the oldest past this open's bound.
        let closed_capacity = engine.reservations.capacity;
        engine
            .reservations
            .inner
            .lock()
            .set_closed_capacity(usize::MAX);
        let mut replayed_from = 0;
        // Whether the snapshot (an older format's) does not say which keys a correction left
        // short; a log replayed from its start, or after a newer snapshot, marks them as the
        // live corrections did.
        let mut marks_unknown = false;
        if let Some(pointer) = log.snapshot_pointer()? {
            // The replay starts at the event after the snapshot: a log starting later lacks
            // events (a replay that reads none would not notice), as `verify` reports.
            let start = log.log_start()?;
            if start > pointer.seq.saturating_add(1) {
                return Err(storage(format!(
                    "{}: the log starts at event {start} but the snapshot covers events up to \
                     {}: events {} to {} are missing",
                    dir.display(),
                    pointer.seq,
                    pointer.seq + 1,
                    start - 1
                )));
            }
            let step = Instant::now();
            let bytes = log.read_snapshot(&pointer)?;
            report.snapshot_read = step.elapsed();
            // The keys' usage memory is made ready on the other core while this one decodes
            // the snapshot (see `pages::Warmer`); finished once they are restored.
            let warmer = crate::pages::Warmer::start(bytes.usage_hint());
            let step = Instant::now();
            let decoded = DecodedSnapshot::decode(bytes, pointer.seq)?;
            report.snapshot_decode = step.elapsed();
            let step = Instant::now();
            marks_unknown = decoded.snapshot().version < 4;
            engine.restore(decoded.snapshot())?;
            report.usage_warmed_bytes = warmer.finish() as u64;
            // Freeing the decoded snapshot and unmapping its bytes (19-27 ms at 100,000 keys,
            // measured) overlaps the replay: nothing waits for it. Without a thread, the
            // closure and the snapshot with it are dropped here.
            let _ = std::thread::Builder::new()
                .name("tally-snapshot-free".into())
                .spawn(move || drop(decoded));
            report.restore = step.elapsed();
            replayed_from = pointer.seq;
        } else if log.log_start()? > 1 {
            return Err(storage(format!(
                "{}: the log starts after event 1 but there is no snapshot",
                dir.display()
            )));
        }
        engine
            .reservations
            .inner
            .lock()
            .set_closed_capacity(closed_capacity.max(last_closed_capacity));
        let step = Instant::now();
        let replayed = engine.replay_log(&log, replayed_from, u64::MAX)?;
        engine
            .reservations
            .inner
            .lock()
            .set_closed_capacity(closed_capacity);
        report.replay = step.elapsed();
        report.events_replayed = replayed;
        let fresh = replayed_from == 0 && replayed == 0;
        // Before anything can race a close: which keys a correction left short.
        if marks_unknown {
            engine.mark_short_periods();
        }
        // The bound below which new request ids are refused, as they may be retries of ids
        // forgotten before the close (`Shard::forgotten_before_ms`):
        // - A checkpoint of this build records it (`ids_forgotten_before`): what its cut's
        //   shards refused, past the stamps of the ids they forgot (`Shard::expire`). An id
        //   forgotten since the cut is in the snapshot or the log after it, and restored. Used
        //   whenever it covers the snapshot restored, and not the clock's readings: a clock
        //   that read a year ahead at one checkpoint (or for one request stamped by it) left
        //   every new id refused for eleven months after each reopen, though nothing, or only
        //   ids stamped before the glitch, had been forgotten.
        // - Without a snapshot, the whole log is replayed and every id it names restored:
        //   nothing forgotten is missing, and nothing is refused.
        // - With a snapshot an earlier build took, the bound is guessed from the clock's
        //   readings, as that build did. Ids stamped more than the horizon before the newest
        //   logged event, or before the latest checkpoint's clock time (recorded with the
        //   snapshot), may have been forgotten before the close: their retry must not be
        //   decided again if the clock now reads earlier (stepped back across the restart).
        //   The horizon they were forgotten by is the one the database last ran with (its
        //   recorded option, and the longest window of the policy restored), which this open
        //   may grow: ids stamped more than that horizon before the clock's time may have been
        //   forgotten too. Bounded by the grown horizon alone, or by the newest logged event
        //   alone, the retry of such an id was decided and charged again.
        let recorded_bound_ms = log
            .ids_forgotten_before()
            .filter(|(seq, _)| replayed_from > 0 && *seq >= replayed_from)
            .map(|(_, bound_ms)| bound_ms);
        let bound_ms = match recorded_bound_ms {
            Some(bound_ms) => bound_ms,
            None if replayed_from == 0 => 0,
            None => {
                let last_horizon_ms =
                    last_horizon_option_ms.max(engine.policy().longest_window_ms());
                let horizon_ms = engine.requests.horizon_ms().min(last_horizon_ms);
                let clock_ran_ms = engine
                    .newest_event_ms()
                    .max(log.latest_logged_by_ms().unwrap_or(0));
                clock_ran_ms
                    .saturating_sub(horizon_ms)
                    .max(engine.now_ms().saturating_sub(last_horizon_ms))
            }
        };
        engine.requests.forgotten_before(bound_ms);
        // Reservation ids: one is recorded as handed out (`reservation_ids_through`) before it
        // is answered, so the next ones come after every id an earlier run answered, also one
        // whose event a crash or a failed write lost (acknowledged in `Interval` or `None`
        // mode), which the snapshot and the log end before: its caller's settle or void would
        // otherwise close another key's reservation.
        {
            let ids_through = log.reservation_ids_through()?;
            let mut table = engine.reservations.inner.lock();
            table.next_id = table.next_id.max(ids_through);
            table.ids_through = table.next_id;
        }
        // Before the open changes anything: a table's bound below what the database holds.
        engine.refuse_bounds_below_held()?;
        // The policy given is swapped in below: refused as the swap refuses it, before the
        // open changes anything.
        let swap = !fresh
            && choice == PolicyChoice::Given
            && serde_json::to_string(engine.policy().document())
                .ok()
                .as_deref()
                != Some(wanted.as_str());
        let swap_to = if swap {
            let old = engine.policy();
            let new = Policy::from_json_str(&wanted)?;
            old.check_swap_to(&new)?;
            engine.refuse_dropping_seated_plans(&engine.keys.lock_all(), &old, &new)?;
            Some(new)
        } else {
            None
        };
        log.finish_open()?;
        if engine.journal.set(log).is_err() {
            unreachable!("a new engine has no journal yet");
        }
        engine
            .checkpointed_seq
            .store(replayed_from, Ordering::Relaxed);
        let at_ms = engine.now_ms().min(crate::calendar::MAX_TIMESTAMP_MS - 1);
        if fresh {
            engine.commit(
                at_ms,
                EventBody::PolicySwapped {
                    generation: 0,
                    document: wanted,
                },
            )?;
        } else if let Some(new) = swap_to {
            engine.swap_policy(new, Some(at_ms))?;
        }
        if replayed > options.checkpoint_every_events / 2 {
            // Checkpointed by the first commit after the open (or by close()), as a periodic
            // checkpoint is by the commit that crosses the interval: the open neither waits
            // for the snapshot to be encoded and written (0.4-0.6 s at 100,000 keys, measured
            // on top of replaying 1,000,000 events) nor holds every lock for the cut (50-90
            // ms). Until it lands, the next open replays this tail again, and no more than it
            // plus what was committed since.
            engine.checkpoint_due.store(true, Ordering::Relaxed);
        }
        engine
            .checkpoint_every
            .store(options.checkpoint_every_events.max(1), Ordering::Relaxed);
        engine
            .retention_ms
            .store(options.retention_ms, Ordering::Relaxed);
        // An open that ran with options of its own records them, last, once nothing can refuse
        // it (a refused open records nothing). One that ran as recorded records nothing: it is
        // a tool looking at the database, and leaves the record to the database's owner (even
        // where there is none yet, or one a newer build wrote with options this one ignores).
        if !options.use_recorded {
            engine
                .require_journal()?
                .record_options(&RecordedOptions::of(&options).encode())?;
        }
        report.total = started.elapsed();
        let _ = engine.open_report.set(report);
        Ok(engine)
    }

    /// Refuses an open whose table bounds (`EngineOptions`) are below what the restored and
    /// replayed database holds: the replay keeps everything acknowledged, so the engine would
    /// run above its own bound (and record the smaller one). `InvalidArgument` naming the
    /// first such option, the bound given and how many the database holds.
    ///
    /// Counted as the live tables count them when full: keys, users and teams (each user's
    /// Default Team too) whole; reservations whose lease the clock's now has not ended (a
    /// reserve expires the others before it counts); request ids stamped within the horizon
    /// (a full table drops the others first). Not refused: the closed reservations remembered
    /// for repeated settles and the policy generations kept (`max_open_reservations`,
    /// `max_policy_generations`): acknowledged under the bound the database ran with, they are
    /// kept until the first close or swap after the open forgets the oldest past this one.
    fn refuse_bounds_below_held(&self) -> Result<(), Error> {
        let now_ms = self.now_ms();
        let (users, teams) = {
            let registry = self.registry.lock();
            (registry.users.len(), registry.teams.len())
        };
        let open_reservations = self
            .reservations
            .inner
            .lock()
            .open
            .values()
            .filter(|reservation| reservation.expires_at_ms > now_ms)
            .count();
        let request_ids = self
            .requests
            .held_within(now_ms, self.requests.horizon_ms());
        let options = self.options();
        use crate::options::wide;
        let held: [(&'static str, u64, u64, &str); 5] = [
            ("max_keys", options.max_keys, self.keys.len(), "keys"),
            ("max_users", options.max_users, wide(users), "users"),
            (
                "max_teams",
                options.max_teams,
                wide(teams),
                "teams (a Default Team for each user among them)",
            ),
            (
                "max_open_reservations",
                wide(options.max_open_reservations),
                wide(open_reservations),
                "reservations open (their leases not ended by the clock's now)",
            ),
            (
                "idempotency_capacity",
                wide(options.idempotency_capacity),
                wide(request_ids),
                "request ids remembered (stamped within the horizon of the clock's now)",
            ),
        ];
        for (option, bound, held, what) in held {
            if held > bound {
                return Err(Error::invalid(
                    option,
                    format!(
                        "{bound} is below the {held} {what} the database holds: open it with \
                         {option} of at least {held}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Where the open that built this engine spent its time; `None` for an in-memory engine.
    pub fn open_report(&self) -> Option<OpenReport> {
        self.open_report.get().copied()
    }

    /// Replays events in `(after, up_to]`; returns how many.
    ///
    /// Reading and decoding the log runs on a thread of its own, a batch of events at a time,
    /// while this thread applies them: on two cores the two overlap (decoding was about a
    /// third of an open's replay).
    fn replay_log(&self, log: &EventLog, after: u64, up_to: u64) -> Result<u64, Error> {
        self.set_replaying(true);
        let replayed = self.replay_log_inner(log, after, up_to);
        self.set_replaying(false);
        replayed
    }

    fn replay_log_inner(&self, log: &EventLog, after: u64, up_to: u64) -> Result<u64, Error> {
        let (batches, received) = std::sync::mpsc::sync_channel(REPLAY_BATCHES_QUEUED);
        // Applied batches go back to the decoder, which drops their events: freed on the
        // thread that allocated them, they cost a third of what they did here.
        let (used, returned) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let decoder = std::thread::Builder::new()
                .name("tally-replay-decoder".into())
                .spawn_scoped(scope, move || {
                    decode_for_replay(log, after, up_to, &batches, &returned)
                })
                .map_err(|error| storage(format!("starting the replay's decoder: {error}")))?;
            let applied = self.apply_decoded(scope, &received, &used);
            // A decoder still sending stops at its next batch.
            drop(received);
            drop(used);
            let decoded = decoder
                .join()
                .unwrap_or_else(|_| Err(storage("the replay's decoder panicked")));
            // The applier is behind the decoder: its error is about the earlier event.
            let count = applied?;
            decoded?;
            self.finish_replay(count)
        })
    }

    /// Applies the decoded events as they arrive, in order; returns how many.
    ///
    /// A run of usage events (all but a few of a busy log's) is applied by two threads, each
    /// taking the keys of its own key shards (`applier_of`): a usage event's counter and
    /// credit changes commute with any other key's, and each key's own stay in log order.
    /// Every other event is a barrier, applied here alone once both are done with the run
    /// before it. Request ids are restored here, in log order, for the whole run.
    fn apply_decoded<'scope>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        received: &std::sync::mpsc::Receiver<ReplayBatch>,
        used: &std::sync::mpsc::Sender<ReplayBatch>,
    ) -> Result<u64, Error> {
        let mut count = 0;
        // Debts are kept by key, so each applier holds those of its own keys; a barrier event
        // uses the one of the key it names.
        let mut debts = [Debts::default(), Debts::default()];
        let mut helper: Option<ReplayHelper> = None;
        let mut helper_failed = false;
        for batch in received {
            let batch = Arc::new(batch);
            let events = &batch.events;
            let mut start = 0;
            while start < events.len() {
                let end = events[start..]
                    .iter()
                    .position(|event| event.hash.is_none())
                    .map_or(events.len(), |offset| start + offset);
                let run = start..end;
                if run.len() >= PARALLEL_REPLAY_RUN && helper.is_none() && !helper_failed {
                    helper = ReplayHelper::start(self, scope);
                    helper_failed = helper.is_none();
                }
                match helper.as_ref().filter(|_| run.len() >= PARALLEL_REPLAY_RUN) {
                    Some(helper) => {
                        let theirs = std::mem::take(&mut debts[1]);
                        helper.send(Arc::clone(&batch), run.clone(), theirs)?;
                        let applied = self.apply_usage_run(&batch, run.clone(), 0, &mut debts[0]);
                        let requests = self.restore_requests_of_run(&batch, run);
                        // The helper's events of the run come before this thread's later ones
                        // only by key: whichever error it is, it is this run's.
                        let (helped, theirs) = helper.wait()?;
                        debts[1] = theirs;
                        count += applied? + helped?;
                        requests?;
                    }
                    None => {
                        count += self.apply_usage_run(&batch, run.clone(), 0, &mut debts[0])?;
                        count += self.apply_usage_run(&batch, run.clone(), 1, &mut debts[1])?;
                        self.restore_requests_of_run(&batch, run)?;
                    }
                }
                let Some(barrier) = events.get(end) else {
                    break;
                };
                let ReplayBody::Decoded(index) = barrier.what else {
                    unreachable!("an event without a key's hash is decoded in full");
                };
                let event = &batch.decoded[index];
                let owner =
                    debtor_key(&event.body).map_or(0, |key| applier_of(KeyTable::hash(key)));
                self.replay(event, None, &mut debts[owner])
                    .map_err(|error| replaying(event.seq, event.body.kind(), error))?;
                self.note_event_time(event.at_ms);
                count += 1;
                start = end + 1;
            }
            // The helper let go of its share when it answered.
            if let Ok(batch) = Arc::try_unwrap(batch) {
                let _ = used.send(batch);
            }
        }
        Ok(count)
    }

    /// Applies the usage events of `batch.events[run]` whose keys belong to `applier` (see
    /// `apply_decoded`); returns how many.
    ///
    /// Each is applied `REPLAY_AHEAD` events behind the one just looked at, so the key table
    /// entry of each, then its name and usage, start loading before it is applied (as in
    /// `consume_many`): over many keys each would otherwise wait on misses. The distances count
    /// events of the run, of which 5 or 3 in 8 are this applier's.
    fn apply_usage_run(
        &self,
        batch: &ReplayBatch,
        run: std::ops::Range<usize>,
        applier: usize,
        debts: &mut Debts,
    ) -> Result<u64, Error> {
        let events = &batch.events[run];
        let mine = |index: usize| -> Option<(u64, &ReplayEvent)> {
            let event = events.get(index)?;
            event
                .hash
                .filter(|&hash| applier_of(hash) == applier)
                .map(|hash| (hash, event))
        };
        let (mut count, mut newest_ms) = (0, 0);
        for index in 0..events.len() + REPLAY_AHEAD {
            if let Some((hash, _)) = mine(index) {
                self.keys.prefetch_entry(hash);
            }
            if let Some((hash, _)) = index.checked_sub(REPLAY_POINTEES_AHEAD).and_then(mine) {
                self.keys.prefetch_pointees(hash);
            }
            let Some((hash, event)) = index.checked_sub(REPLAY_AHEAD).and_then(mine) else {
                continue;
            };
            match &event.what {
                ReplayBody::InPlace { key, receipt_at } => {
                    let (key, receipt) = batch.usage(event, key, *receipt_at)?;
                    self.apply_receipt(key, Some(hash), &receipt, debts)
                        .map_err(|error| replaying(event.seq, "usage_admitted", error))?;
                }
                ReplayBody::Decoded(index) => {
                    if let EventBody::UsageAdmitted { key, receipt, .. } =
                        &batch.decoded[*index].body
                    {
                        self.apply_receipt(key, Some(hash), receipt, debts)
                            .map_err(|error| replaying(event.seq, "usage_admitted", error))?;
                    }
                }
            }
            newest_ms = newest_ms.max(event.at_ms);
            count += 1;
        }
        // Once per run: a locked instruction on a line both appliers write, per event, would
        // cost more than the event.
        self.note_event_time(newest_ms);
        Ok(count)
    }

    /// Restores the request ids of a run of usage events, in log order (a later record of an
    /// id replaces an earlier one). Only a fully decoded usage event has a decision to keep.
    fn restore_requests_of_run(
        &self,
        batch: &ReplayBatch,
        run: std::ops::Range<usize>,
    ) -> Result<(), Error> {
        for event in &batch.events[run] {
            if let ReplayBody::Decoded(index) = event.what {
                let event = &batch.decoded[index];
                self.restore_request_of_usage(event)
                    .map_err(|error| replaying(event.seq, event.body.kind(), error))?;
            }
        }
        Ok(())
    }

    /// Refuses a receipt the replay keeps (a request id's, an open reservation's) that its
    /// policies cannot read (`unreadable_receipt`): only a record written wrong has one, its
    /// crc sound. Let in, it moved nothing (a generation after the current one, a key that
    /// does not exist), the next checkpoint stored it, and the open after that refused the
    /// snapshot; a refund of it indexed past its policy's counters.
    fn check_kept_receipt(&self, key: &str, receipt: &Receipt) -> Result<(), Error> {
        match unreadable_receipt(&self.policies.read(), receipt) {
            None => Ok(()),
            Some(why) => Err(storage(format!("key {key:?}: {why}"))),
        }
    }

    /// Restores the request id of an admitted usage event that has one, refusing a receipt
    /// its policies cannot read (`check_kept_receipt`).
    fn restore_request_of_usage(&self, event: &Event) -> Result<(), Error> {
        let EventBody::UsageAdmitted {
            key,
            resource,
            quantities,
            request_id: Some(id),
            decision: Some(decision),
            receipt,
        } = &event.body
        else {
            return Ok(());
        };
        self.check_kept_receipt(key, receipt)?;
        let record = request_record(key, resource, quantities, decision, Some(*receipt));
        self.requests
            .restore(id, event.at_ms, self.now_ms(), record);
        Ok(())
    }

    fn finish_replay(&self, count: u64) -> Result<u64, Error> {
        // A debt left over is a correction whose usage aged out of its window before the
        // correction was logged: it no longer counts anywhere, so there is nothing to settle.
        let registry = self.registry.lock();
        for record in registry.teams.values() {
            if record.team.balance_micros() > i64::MAX as u64 {
                return Err(storage(format!(
                    "team {:?}: the log's credits sum to a negative balance",
                    record.team.name
                )));
            }
        }
        Ok(count)
    }

    /// Applies one logged event. `looked_ahead` is the key's hash of a usage event whose key
    /// `replay_log` prefetched (so the lookup neither reads nor writes prefetch hints).
    fn replay(
        &self,
        event: &Event,
        looked_ahead: Option<u64>,
        debts: &mut Debts,
    ) -> Result<(), Error> {
        let at = Some(event.at_ms);
        match &event.body {
            EventBody::UserCreated { user, key } => self.create_user(user, key, at),
            EventBody::TeamCreated { team } => self.create_team(team, at),
            EventBody::MemberAdded { team, user, key } => self.add_member(team, user, key, at),
            EventBody::KeyRevoked { key } => self.revoke_key(key, at).map(drop),
            EventBody::PayAsYouGoKeyCreated { user, key } => self.create_payg_key(user, key, at),
            EventBody::SeatChanged {
                team, user, plan, ..
            } => match plan {
                Some(plan) => self.assign_seat(team, user, plan, at),
                None => self.unassign_seat(team, user, at),
            },
            EventBody::CreditsToppedUp { team, micros } => {
                self.team(team)?.replay_add(*micros, false);
                Ok(())
            }
            EventBody::CreditsWithdrawn { team, micros } => {
                self.team(team)?.replay_take(*micros, false);
                Ok(())
            }
            EventBody::PolicySwapped {
                generation,
                document,
            } => self.replay_policy(*generation, document, event),
            EventBody::UsageAdmitted { key, receipt, .. } => {
                self.apply_receipt(key, looked_ahead, receipt, debts)?;
                self.restore_request_of_usage(event)
            }
            EventBody::RequestDenied {
                request_id,
                key,
                resource,
                quantities,
                decision,
            } => {
                // An earlier build logged a denial for want of a valid key too: this one
                // does not remember such an id (`idempotency::remembers`), after a restart
                // either.
                if crate::idempotency::remembers(decision) {
                    let record = request_record(key, resource, quantities, decision, None);
                    self.requests
                        .restore(request_id, event.at_ms, self.now_ms(), record);
                }
                Ok(())
            }
            EventBody::ReservationOpened {
                reservation,
                key,
                resource,
                estimate,
                expires_at_ms,
                receipt,
                ..
            } => {
                // Ids count up from 1, each the one after the last: 0 is none, and after the
                // largest none could follow (the next reserve's id overflowed).
                let id = std::num::NonZeroU64::new(*reservation)
                    .filter(|id| id.get() < u64::MAX)
                    .map(ReservationId)
                    .ok_or_else(|| {
                        storage(format!(
                            "reservation {reservation}: not an id a reservation is given \
                             (1 to {})",
                            u64::MAX - 1
                        ))
                    })?;
                // A live reserve needs its key (its creation is logged first) and a new id:
                // a record that says otherwise was written wrong, and replayed it underflowed
                // the key's open count when it closed, or left a stale lease behind.
                if !self.keys.read(key, |_, state| state.is_some()) {
                    return Err(storage(format!(
                        "reservation {reservation} is on key {key:?}, which does not exist at \
                         this point of the log"
                    )));
                }
                if self
                    .reservations
                    .inner
                    .lock()
                    .open
                    .contains_key(reservation)
                {
                    return Err(storage(format!(
                        "reservation {reservation} is opened again while it is open"
                    )));
                }
                self.check_kept_receipt(key, receipt)?;
                self.apply_receipt(key, None, receipt, debts)?;
                self.keys.read(key, |_, state| {
                    state.map(|state| state.open_reservations.fetch_add(1, Ordering::AcqRel))
                });
                let mut table = self.reservations.inner.lock();
                table.next_id = table.next_id.max(*reservation);
                let entry = Reservation {
                    key: key.as_str().into(),
                    resource: resource.as_str().into(),
                    estimate: *estimate,
                    receipt: *receipt,
                    expires_at_ms: *expires_at_ms,
                    opened_seq: 0,
                };
                table.insert(id, entry);
                Ok(())
            }
            EventBody::ReservationClosed {
                reservation,
                key,
                end,
                given_back,
            } => {
                self.apply_given_back(key, given_back, debts)?;
                if let ReservationEnd::Settled {
                    extra: Some(extra), ..
                } = end
                {
                    self.apply_receipt(key, None, extra, debts)?;
                }
                let closed = Closed::from(end);
                let mut table = self.reservations.inner.lock();
                if let Some(entry) = table.remove_open(*reservation) {
                    table.close(*reservation, closed, event.at_ms, 0);
                    drop(table);
                    self.keys.read(&entry.key, |_, state| {
                        state.map(KeyState::close_reservation)
                    });
                }
                Ok(())
            }
            EventBody::Refunded {
                request_id,
                key,
                given_back,
            } => {
                self.apply_given_back(key, given_back, debts)?;
                self.requests.with_record(request_id, |record| {
                    if let Some(record) = record {
                        record.refunded = true;
                    }
                    Ok(())
                })
            }
            EventBody::UsageAdjusted {
                key,
                resource,
                quantities,
                usage_at_ms,
                direction,
                generation,
                moved,
            } => {
                let counters: Vec<_> = moved.clone();
                match direction {
                    AdjustmentDirection::Add => {
                        self.apply_counters(key, None, *generation, counters, debts)?;
                    }
                    AdjustmentDirection::Remove => {
                        // Marked first, as the live removal was.
                        self.mark_replayed_removal(key, resource, quantities, *usage_at_ms);
                        let given = GivenBack {
                            generation: *generation,
                            counters,
                            ..GivenBack::default()
                        };
                        self.apply_given_back(key, &given, debts)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn replay_policy(&self, generation: u32, document: &str, event: &Event) -> Result<(), Error> {
        // Generation 0 is a new database's first event (`open` logs it only when there is
        // nothing to replay). Anywhere else it is a record written wrong, its crc sound:
        // installed, it replaced the policy list under keys seated and counted under the old
        // one, and the next swap or admission indexed past the new policy's plans.
        if generation == 0 && event.seq != 1 {
            return Err(storage(
                "policy generation 0 after the first event: only a new database starts with one",
            ));
        }
        let at_ms = event.at_ms;
        let policy = policy_from_json(document, generation)?;
        if generation == 0 {
            self.install_policies(vec![Some(Arc::new(policy))]);
            return Ok(());
        }
        let expected = self.policies.read().len() as u32;
        if generation != expected {
            return Err(storage(format!(
                "policy generation {generation} follows generation {}",
                expected - 1
            )));
        }
        self.swap_policy_checked(policy, Some(at_ms), false)
    }

    /// Replaces the policy list (a new engine being restored) and points every shard at the last.
    fn install_policies(&self, policies: Vec<Option<Arc<Policy>>>) {
        let current = policies
            .last()
            .and_then(Clone::clone)
            .unwrap_or_else(|| unreachable!("a restored list is never empty"));
        let mut list = self.policies.write();
        *list = policies;
        for mut shard in self.keys.lock_all() {
            shard.policy = Arc::clone(&current);
        }
        // The horizons follow the policy's longest window, as after a swap: the engine was
        // built with the caller's policy, which need not be the one restored.
        self.set_horizons_for(&current);
    }

    /// Applies what a logged admitted usage moved (`looked_ahead`: see `replay`).
    fn apply_receipt(
        &self,
        key: &str,
        looked_ahead: Option<u64>,
        receipt: &Receipt,
        debts: &mut Debts,
    ) -> Result<(), Error> {
        match receipt.charged_to {
            ChargedTo::PlanQuota { .. } => {
                // Holds are (counter, amount, time); moves are (counter, time, amount).
                let moves = receipt
                    .holds
                    .as_slice()
                    .iter()
                    .map(|&(counter, amount, time)| (counter, time, amount));
                return self.apply_counters(key, looked_ahead, receipt.generation, moves, debts);
            }
            ChargedTo::Credits { micros } => {
                self.keys.read(key, |_, state| {
                    state.map(|state| state.team.replay_take(micros, true))
                });
            }
            ChargedTo::PayAsYouGo { micros } => {
                self.keys
                    .read(key, |_, state| state.map(|state| state.add_payg(micros)));
            }
        }
        Ok(())
    }

    /// Adds logged counter amounts `moves` (counter, time, amount) of policy `generation`,
    /// first paying off any debt from an earlier removal. `looked_ahead`: see `replay`.
    ///
    /// The hot part of an open's replay, once per usage event: a move of the current policy
    /// (nearly all of them) is applied without looking its generation up (a lock and an `Arc`
    /// clone), and nothing is allocated.
    fn apply_counters(
        &self,
        key: &str,
        looked_ahead: Option<u64>,
        generation: u32,
        moves: impl IntoIterator<Item = (CounterId, u64, u64)> + Clone,
        debts: &mut Debts,
    ) -> Result<(), Error> {
        let apply = |(then, later): (&Policy, &[Arc<Policy>]),
                     policy: &Policy,
                     state: &KeyState,
                     debts: &mut Debts| {
            check_counters(
                key,
                then,
                moves
                    .clone()
                    .into_iter()
                    .map(|(counter, time, _)| (counter, time)),
            )?;
            let usage = state
                .usage
                .get_or_init(|| KeyUsage::for_plan(policy, state.seat));
            for (counter, time, amount) in moves.clone() {
                // Where the swaps since, and a seat change to a plan counting the same meter
                // over the same span with other buckets, put the usage counted before it.
                let located = usage.find_carried((then, later), policy, counter, time);
                let Some((current, time, counter_state)) = located else {
                    continue;
                };
                let owed = debts.take(key, current, time, amount);
                if amount > owed {
                    let (forced, over) =
                        force_fitting(policy, counter_state, current, time, amount - owed);
                    debts.add_surplus(key, current, time, over);
                    if let Some(slot) = forced {
                        // So the key's next event prefetches the slots its sweep reads, as a
                        // live admission does: after a restore the hint points nowhere.
                        state.usage.note_slot(slot);
                    }
                }
            }
            Ok(())
        };
        let (hash, looked_ahead) = match looked_ahead {
            Some(hash) => (hash, true),
            None => (KeyTable::hash(key), false),
        };
        let current = self
            .keys
            .read_hashed(hash, key, looked_ahead, |policy, state| {
                if policy.generation != generation {
                    return None;
                }
                Some(match state {
                    Some(state) => apply((policy, &[]), policy, state, debts),
                    None => Ok(()),
                })
            });
        if let Some(applied) = current {
            return applied;
        }
        // An older generation's move (a `consume_many` chunk decided before a swap and
        // appended after it): its policy and the later ones, which carried its usage, are
        // looked up outside the key's shard lock (the policy list is locked before the shards,
        // never after).
        let (Some(then), later) = self.policy_lineage(generation) else {
            return Ok(());
        };
        self.keys
            .read_hashed(hash, key, looked_ahead, |policy, state| match state {
                Some(state) => apply((&then, &later), policy, state, debts),
                None => Ok(()),
            })
    }

    /// Takes back logged give-back amounts exactly; what the counter does not hold yet (its add
    /// comes later in the log) is kept as a debt.
    fn apply_given_back(
        &self,
        key: &str,
        given: &GivenBack,
        debts: &mut Debts,
    ) -> Result<(), Error> {
        let (then, later) = self.policy_lineage(given.generation);
        if let Some(then) = then.as_deref() {
            check_counters(
                key,
                then,
                given
                    .counters
                    .iter()
                    .map(|&(counter, time, _)| (counter, time)),
            )?;
        }
        self.keys.read(key, |policy, state| {
            let Some(state) = state else { return };
            if given.credits_micros > 0 {
                state.team.replay_add(given.credits_micros, true);
            }
            if given.payg_micros > 0 {
                state.subtract_payg(given.payg_micros);
            }
            let (Some(usage), Some(then)) = (state.usage.get(), then.as_deref()) else {
                return;
            };
            for &(counter, time, amount) in &given.counters {
                let located = usage.find_carried((then, &later), policy, counter, time);
                let Some((current, time, _)) = located else {
                    continue;
                };
                // Units an add could not put in a full bucket first (see `force_fitting`).
                let surplus = debts.take_surplus(key, current, time, amount);
                let short = unforce_counter(policy, usage, current, time, amount - surplus);
                if short > 0 {
                    debts.add(key, current, time, short);
                }
            }
        });
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Checkpoints.

    /// Takes a consistent snapshot of the whole state and stores it; returns the sequence
    /// number it covers. Opening then replays only the events after it.
    pub fn checkpoint(&self) -> Result<u64, Error> {
        let journal = self.journal().ok_or_else(|| {
            Error::invalid("engine", "an in-memory engine has no log to checkpoint")
        })?;
        let _one_at_a_time = self.checkpointing.lock();
        // A periodic checkpoint still being written lands first (snapshots keep their order).
        // Its failure is the periodic checkpoint's (noted for `health`), and does not stop this
        // one, which supersedes it once stored: returned here, it made `close` after a failed
        // periodic checkpoint fail too, without its checkpoint (an open replayed the tail) and
        // leaving the log to be closed by the drop.
        let previous = journal.finish_snapshot_in_background();
        if previous.is_err() {
            BackgroundProblems::note(&self.background.checkpoint, &previous);
        }
        // A new segment and a snapshot are written in this build's format: recorded first.
        journal.record_format()?;
        let started = Instant::now();
        let mut cut = self.cut_rotating(journal);
        let seq = cut.seq;
        let ids_forgotten_before_ms = cut.ids_forgotten_before_ms;
        // Every event up to the cut was logged by now.
        let logged_by_ms = self.now_ms();
        let written = cut.finish_copies().and_then(|()| {
            let usage_bytes = cut.usage_bytes;
            let bytes = cut.encode()?;
            self.checkpoint_pacing.note(started, started.elapsed());
            journal.sync()?;
            // Recorded before the snapshot is stored: a snapshot without it (a crash between
            // the two) would leave the open bounding forgotten request ids by the newest
            // logged event alone, and an id the snapshot forgot could be decided again.
            journal.record_logged_by(seq, logged_by_ms, ids_forgotten_before_ms)?;
            journal.write_snapshot(seq, usage_bytes, bytes)
        });
        self.cuts.give_back(cut);
        BackgroundProblems::note(&self.background.checkpoint, &written);
        written?;
        self.checkpointed_seq.store(seq, Ordering::Relaxed);
        self.checkpoint_due.store(false, Ordering::Relaxed);
        Ok(seq)
    }

    /// The cut of a checkpoint; the next segment starts right after it, so compaction can drop
    /// whole segments.
    fn cut_rotating(&self, journal: &EventLog) -> RawCut {
        self.cut_raw(|| {
            let seq = journal.next_seq() - 1;
            journal.rotate_at(seq + 1);
            seq
        })
    }

    /// A periodic checkpoint: the cut is taken here (every lock held for its duration); making
    /// the snapshot of it, encoding it, waiting for the log to be durable up to it and writing
    /// it happen on the log's snapshot thread, so the caller that crossed the threshold goes
    /// back to work at once.
    fn checkpoint_in_background(&self, journal: &EventLog) {
        let _one_at_a_time = self.checkpointing.lock();
        // (An append crossed the threshold: this build's format is recorded already.) The
        // previous one's failure, its thread's panic included (told once, by this join), is
        // noted for `health`: skipped silently, a checkpoint thread that panicked every time
        // left the log growing with nothing reported.
        let ready = journal
            .finish_snapshot_in_background()
            .and_then(|()| journal.record_format());
        if ready.is_err() {
            BackgroundProblems::note(&self.background.checkpoint, &ready);
            return;
        }
        let started = Instant::now();
        let mut cut = self.cut_rotating(journal);
        let seq = cut.seq;
        let ids_forgotten_before_ms = cut.ids_forgotten_before_ms;
        // Every event up to the cut was logged by now.
        let logged_by_ms = self.now_ms();
        // Retention after the snapshot is stored, judged at the cut's clock time.
        let compactor = journal.compactor();
        let longest_window_ms = self.policy().longest_window_ms();
        let retention_ms = self.retention_ms.load(Ordering::Relaxed);
        let background = Arc::clone(&self.background);
        self.checkpointed_seq.store(seq, Ordering::Relaxed);
        self.checkpoint_due.store(false, Ordering::Relaxed);
        let spare = Arc::clone(&self.cuts.spare);
        let pacing = Arc::clone(&self.checkpoint_pacing);
        let background_noted = Arc::clone(&self.background);
        let started_thread = journal.write_snapshot_in_background(
            seq,
            (logged_by_ms, ids_forgotten_before_ms),
            Box::new(move |store| {
                // The shard copies no admission ran yet run here, off the caller's thread.
                let stored = unless_panicked("writing a snapshot", || {
                    cut.finish_copies()?;
                    let usage_bytes = cut.usage_bytes;
                    let bytes = cut.encode()?;
                    // The work, not the disk: the store below waits for the log's flush.
                    pacing.note(started, started.elapsed());
                    // Stored once the log is durable through the cut, after the record of
                    // when its events were logged (see `checkpoint`).
                    store(bytes, usage_bytes)
                });
                Cuts::keep_spare(&spare, cut);
                BackgroundProblems::note(&background.checkpoint, &stored);
                stored?;
                // The segments retention lets go, as `compact` removes them. One that fails
                // stays (each removal is durable before the next) for the next checkpoint's
                // compaction, or `compact`'s; `health` says so meanwhile. The snapshot stands
                // either way.
                let compacted = unless_panicked("compacting the log", || {
                    compactor.compact_after_checkpoint(
                        logged_by_ms,
                        longest_window_ms,
                        retention_ms,
                    )
                });
                // Skipped for a running `compact`: that one notes its own outcome (cleared
                // here, its failure noted just before was lost).
                if !matches!(compacted, Ok(None)) {
                    BackgroundProblems::note(&background.compaction, &compacted);
                }
                Ok(())
            }),
        );
        if started_thread.is_err() {
            BackgroundProblems::note(&background_noted.checkpoint, &started_thread);
        }
    }

    /// What has gone wrong where no call's answer reports it (`Health`): the log's failure,
    /// and the last periodic checkpoint's and automatic compaction's. For a monitor: read-only
    /// traffic (`check`, `usage`) never learns of them otherwise.
    pub fn health(&self) -> Health {
        Health {
            log_failure: self
                .journal()
                .and_then(EventLog::failure)
                .map(|error| error.to_string()),
            checkpoint_failure: self.background.checkpoint.lock().clone(),
            compaction_failure: self.background.compaction.lock().clone(),
        }
    }

    /// Takes a checkpoint if enough events were logged since the last one and the last one's
    /// cost allows another yet (`pacing`; called after a commit; the caller that crosses the
    /// threshold does the cut). Inlined, so an engine
    /// without a log pays one load per admission, not a call that saves every register.
    #[inline]
    pub(crate) fn maybe_checkpoint(&self) {
        if let Some(journal) = self.journal() {
            self.maybe_checkpoint_logged(journal);
        }
    }

    #[inline(never)]
    fn maybe_checkpoint_logged(&self, journal: &EventLog) {
        let seq = journal.last_appended();
        let every = self.checkpoint_every.load(Ordering::Relaxed);
        let last = self.checkpointed_seq.load(Ordering::Relaxed);
        let due = self.checkpoint_due.load(Ordering::Relaxed);
        let behind = seq.saturating_sub(last);
        if !due && behind < every {
            return;
        }
        // Pacing holds a checkpoint back until the tail is `MAX_PACED_INTERVALS` intervals long
        // at most, so an open replays about that much at most.
        let capped = behind >= every.saturating_mul(pacing::MAX_PACED_INTERVALS);
        if capped
            || self
                .checkpoint_pacing
                .allows(seq, pacing::recheck_events(every))
        {
            if let Some(_busy) = self.checkpointing.try_lock() {
                drop(_busy);
                self.checkpoint_in_background(journal);
            }
        }
    }

    /// The cut as it was gathered before `cut_raw` (every string and bucket list built under
    /// the locks): the reference the raw cut is tested against.
    #[cfg(test)]
    fn cut_reference(&self, seq: u64) -> Snapshot<'static> {
        let table = self.reservations.inner.lock();
        let requests_guard = self.requests.lock_all();
        let registry = self.registry.lock();
        let policies_guard = self.policies.read();
        let shards = self.keys.lock_all();
        let teams: Vec<TeamSnapshot> = registry
            .teams
            .values()
            .map(|record| {
                let mut members: Vec<(Name, Name)> = record
                    .members
                    .iter()
                    .map(|(user, key)| (user.to_string().into(), key.to_string().into()))
                    .collect();
                members.sort();
                TeamSnapshot {
                    name: record.team.name.to_string().into(),
                    owner: record
                        .owner
                        .as_deref()
                        .map(|owner| owner.to_string().into()),
                    balance_micros: record.team.balance_micros(),
                    charged_micros: record.team.charged_micros(),
                    members,
                }
            })
            .collect();
        let users: Vec<(Name, Name, Vec<Name>)> = registry
            .users
            .values()
            .map(|record| {
                let keys = record
                    .payg_keys
                    .iter()
                    .map(|key| key.to_string().into())
                    .collect();
                (
                    record.name.to_string().into(),
                    record.default_team.to_string().into(),
                    keys,
                )
            })
            .collect();
        let mut keys = Vec::new();
        let mut short_keys = Vec::new();
        let mut revoked_keys = Vec::new();
        for shard in &shards {
            for (key, state) in shard.iter() {
                keys.push(key_snapshot(&shard.policy, key, state));
                if state.short_until_ms > 0 {
                    short_keys.push((key.to_string().into(), state.short_until_ms));
                }
                if state.revoked {
                    revoked_keys.push(key.to_string().into());
                }
            }
        }
        let requests = crate::idempotency::RequestTable::export(&requests_guard)
            .into_iter()
            .map(|(arrived_ms, id, record)| {
                let first = record.first_use();
                RequestSnapshot {
                    id,
                    arrived_ms,
                    key: first.fingerprint.key.to_string(),
                    resource: first.fingerprint.resource.to_string(),
                    quantities: first.fingerprint.quantities,
                    decision: first.decision,
                    receipt: first.receipt,
                    refunded: record.refunded,
                }
            })
            .collect();
        let open_reservations: Vec<ReservationSnapshot> = table
            .open
            .iter()
            .map(|(id, reservation)| ReservationSnapshot {
                id: *id,
                key: reservation.key.to_string(),
                resource: reservation.resource.to_string(),
                estimate: reservation.estimate,
                receipt: reservation.receipt,
                expires_at_ms: reservation.expires_at_ms,
            })
            .collect();
        let closed_reservations: Vec<(u64, u64, Closed)> = table
            .closed_order
            .iter()
            .filter_map(|(at_ms, id)| {
                table
                    .closed
                    .get(id)
                    .map(|(closed, _)| (*id, *at_ms, *closed))
            })
            .collect();
        let policies = policies_guard
            .iter()
            .map(|policy| {
                policy
                    .as_ref()
                    .and_then(|policy| serde_json::to_string(policy.document()).ok())
            })
            .collect();
        let snapshot = Snapshot {
            version: FORMAT_VERSION,
            seq,
            newest_at_ms: self.newest_event_ms(),
            policies,
            users,
            teams,
            keys,
            requests,
            open_reservations,
            closed_reservations,
            next_reservation: table.next_id,
            short_keys,
            revoked_keys,
        };
        // Everything is copied: the engine goes on while the copy is put in order.
        drop((shards, policies_guard, registry, requests_guard, table));
        let mut snapshot = snapshot.in_name_order();
        snapshot
            .open_reservations
            .sort_by_key(|reservation| reservation.id);
        snapshot.closed_reservations.sort_by_key(|closed| closed.0);
        snapshot
    }

    /// Rebuilds the state of a new engine from a snapshot (its lists in any order).
    fn restore(&self, snapshot: &Snapshot<'_>) -> Result<(), Error> {
        let mut policies = Vec::with_capacity(snapshot.policies.len());
        for (generation, document) in snapshot.policies.iter().enumerate() {
            policies.push(match document {
                Some(document) => Some(Arc::new(policy_from_json(document, generation as u32)?)),
                None => None,
            });
        }
        if policies.last().is_none_or(Option::is_none) {
            return Err(storage(format!(
                "snapshot {}: no current policy",
                snapshot.seq
            )));
        }
        // Only damaged or hostile bytes have a receipt these policies cannot read; read, it
        // panicked the open of an older snapshot (`mark_short_periods`) or a later close or
        // refund.
        let generations = policies.clone();
        let unreadable = |receipt: &Receipt| unreadable_receipt(&generations, receipt);
        self.install_policies(policies);
        let policy = self.policy();
        let mut registry = self.registry.lock();
        for (user, default_team, payg_keys) in &snapshot.users {
            let name: Arc<str> = (&**user).into();
            let payg_keys = payg_keys.iter().map(|key| (&**key).into()).collect();
            let record = UserRecord {
                name: Arc::clone(&name),
                default_team: (&**default_team).into(),
                payg_keys,
            };
            registry.users.insert(name, record);
        }
        let teams = team_records(&registry, &snapshot.teams);
        registry.teams.reserve(teams.len());
        for (name, record) in teams {
            registry.teams.insert(name, record);
        }
        // On two threads from `PARALLEL_RESTORE_KEYS` keys on: the registry is only read by
        // now, and a key's restore touches nothing another key's does but the key table's
        // shard locks and the usage slab's lock.
        // A key's count of open reservations is taken from the reservations the snapshot
        // holds open on it: a snapshot of an earlier build could count one whose close it
        // held (see `RawCut::count_open_reservations`), and restored so it stayed counted.
        let mut open_on: HashMap<&str, u32> =
            HashMap::with_capacity(snapshot.open_reservations.len());
        for reservation in &snapshot.open_reservations {
            let count = open_on.entry(&reservation.key).or_default();
            *count = count.saturating_add(1);
        }
        let (restored, helped) = in_halves(&snapshot.keys, PARALLEL_RESTORE_KEYS, |keys| {
            self.restore_key_run(&registry, &policy, keys, &open_on, snapshot.seq)
        });
        let counted = restored?.saturating_add(helped?);
        if counted != snapshot.open_reservations.len() as u64 {
            // Only keys counting some were looked up: one that counts none holds one open.
            let counting: std::collections::HashSet<&str> = snapshot
                .keys
                .iter()
                .filter(|key| key.open_reservations > 0)
                .map(|key| &*key.key)
                .collect();
            let uncounted = open_on
                .iter()
                .find(|(key, _)| !counting.contains(**key))
                .map(|(key, open)| {
                    format!(
                        "{open} of them on key {key:?}, which counts none open or is not in \
                         the snapshot"
                    )
                })
                .unwrap_or_else(|| format!("its keys count {counted}"));
            return Err(storage(format!(
                "snapshot {}: {} reservations are open, {uncounted}",
                snapshot.seq,
                snapshot.open_reservations.len()
            )));
        }
        drop(registry);
        for key in &snapshot.revoked_keys {
            if self
                .keys
                .write(key, |_, state| state.map(|state| state.revoked = true))
                .is_none()
            {
                return Err(storage(format!(
                    "snapshot {}: unknown key {:?} is listed as revoked",
                    snapshot.seq, &**key
                )));
            }
        }
        for (key, short_until_ms) in &snapshot.short_keys {
            let found = self.keys.write(key, |_, state| {
                state.map(|state| state.short_until_ms = *short_until_ms)
            });
            if found.is_none() {
                return Err(storage(format!(
                    "snapshot {}: a correction left unknown key {:?} short",
                    snapshot.seq, &**key
                )));
            }
        }
        // One clock read for them all (each id is queued for forgetting by it if its stamp is
        // ahead: `RequestTable::restore`), not one per id.
        let now_ms = self.now_ms();
        for request in &snapshot.requests {
            // Longer than any request could name: damage (the crc sound).
            let too_long = [
                (
                    "id",
                    request.id.len(),
                    crate::idempotency::MAX_REQUEST_ID_BYTES,
                ),
                ("key", request.key.len(), crate::accounts::MAX_KEY_BYTES),
                (
                    "resource",
                    request.resource.len(),
                    crate::policy::MAX_NAME_BYTES,
                ),
            ]
            .into_iter()
            .find(|&(_, len, most)| len > most);
            if let Some((what, len, most)) = too_long {
                return Err(storage(format!(
                    "snapshot {}: request id {:?}: its {what} is {len} bytes, more than the \
                     {most} a request may name",
                    snapshot.seq,
                    request.id.chars().take(64).collect::<String>()
                )));
            }
            if let Some(why) = request.receipt.as_ref().and_then(unreadable) {
                return Err(storage(format!(
                    "snapshot {}: request id {:?}: {why}",
                    snapshot.seq, request.id
                )));
            }
            // An earlier build's snapshot may keep a denial for want of a valid key, which
            // this one does not remember (as the replay of its `RequestDenied`).
            if !crate::idempotency::remembers(&request.decision) {
                continue;
            }
            let mut record = request_record(
                &request.key,
                &request.resource,
                &request.quantities,
                &request.decision,
                request.receipt,
            );
            record.refunded = request.refunded;
            self.requests
                .restore(&request.id, request.arrived_ms, now_ms, record);
        }
        // Ids count up from 1, the next handed out being the last plus one: after the largest
        // none could follow (the next reserve overflowed), and an open one past the last
        // would be handed out again (its reservation replaced).
        if snapshot.next_reservation == u64::MAX {
            return Err(storage(format!(
                "snapshot {}: the last reservation id is {}, after which none can follow",
                snapshot.seq,
                u64::MAX
            )));
        }
        let mut table = self.reservations.inner.lock();
        table.next_id = snapshot.next_reservation;
        for reservation in &snapshot.open_reservations {
            if let Some(why) = unreadable(&reservation.receipt) {
                return Err(storage(format!(
                    "snapshot {}: reservation {}: {why}",
                    snapshot.seq, reservation.id
                )));
            }
            if reservation.id > snapshot.next_reservation {
                return Err(storage(format!(
                    "snapshot {}: reservation {} is open, past the last id handed out, {}",
                    snapshot.seq, reservation.id, snapshot.next_reservation
                )));
            }
            let id = ReservationId(
                std::num::NonZeroU64::new(reservation.id)
                    .ok_or_else(|| storage("reservation 0"))?,
            );
            let entry = Reservation {
                key: reservation.key.as_str().into(),
                resource: reservation.resource.as_str().into(),
                estimate: reservation.estimate,
                receipt: reservation.receipt,
                expires_at_ms: reservation.expires_at_ms,
                opened_seq: 0,
            };
            table.insert(id, entry);
        }
        // A snapshot lists closed reservations by id; they are remembered in order of closing
        // time (see `ReservationInner::close`), so each goes in at the back.
        let mut closed_reservations: Vec<&(u64, u64, Closed)> =
            snapshot.closed_reservations.iter().collect();
        closed_reservations.sort_by_key(|&&(id, at_ms, _)| (at_ms, id));
        for &&(id, at_ms, closed) in &closed_reservations {
            table.close(id, closed, at_ms, 0);
        }
        self.note_event_time(snapshot.newest_at_ms);
        Ok(())
    }

    /// Restores `keys` from a snapshot (see `restore`).
    fn restore_key_run(
        &self,
        registry: &Registry,
        policy: &Policy,
        keys: &[KeySnapshot<'_>],
        open_on: &HashMap<&str, u32>,
        seq: u64,
    ) -> Result<u64, Error> {
        // Reservations counted open on these keys.
        let mut counted = 0u64;
        for key in keys {
            let team = registry
                .teams
                .get(&*key.team)
                .map(|record| Arc::clone(&record.team))
                .ok_or_else(|| {
                    storage(format!(
                        "snapshot {}: key {:?} names unknown team {:?}",
                        seq, key.key, key.team
                    ))
                })?;
            let kind = if key.payg {
                KeyKind::PayAsYouGo
            } else {
                KeyKind::Plan
            };
            let mut state = KeyState::new(kind, user_name(registry, &key.user), team);
            state.seat = key.seat.map(PlanId);
            if key.open_reservations > 0 {
                let open = open_on.get(&*key.key).copied().unwrap_or(0);
                state.open_reservations.store(open, Ordering::Release);
                counted += u64::from(open);
            }
            state.payg_micros.store(key.payg_micros, Ordering::Release);
            state.time_floor_ms = key.time_floor_ms;
            if let Some(counters) = &key.counters {
                state
                    .usage
                    .set(Some(restore_usage(policy, counters, seq, &key.key)?));
            }
            self.keys.insert(&key.key, state);
        }
        Ok(counted)
    }

    // -----------------------------------------------------------------------------------------
    // Export, retention, verify, close.

    /// Up to `limit` events after sequence number `after`, in order: for billing export. After
    /// compaction, 0 reads from the oldest event kept and an older `after` is an error naming
    /// the events compacted away; an `after` past the last event is an error too
    /// (`EventLog::events_after`).
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, Error> {
        self.require_journal()?.events_after(after, limit)
    }

    /// A named export cursor (0 if never saved); it survives restarts.
    pub fn cursor(&self, name: &str) -> Result<u64, Error> {
        crate::engine::check_id("cursor", name, 128)?;
        self.require_journal()?.cursor(name)
    }

    /// Saves a named export cursor at `seq` (at most the last event's); it survives restarts.
    /// A new name is refused once `log::MAX_CURSORS` (1,024) are saved
    /// (`CapacityExceeded { what: "cursors" }`); an existing one is always saved.
    pub fn save_cursor(&self, name: &str, seq: u64) -> Result<(), Error> {
        crate::engine::check_id("cursor", name, 128)?;
        let journal = self.require_journal()?;
        if seq >= journal.next_seq() {
            return Err(Error::invalid(
                "seq",
                format!("{seq} is beyond the last event, {}", journal.next_seq() - 1),
            ));
        }
        // A reader may have been handed events written but not yet flushed (`Interval` and
        // `None` modes): a cursor made durable past them, then a power loss, would point past
        // the log's end, over the events that take those numbers after the reopen.
        if seq > 0 {
            match journal.durability() {
                Durability::Sync => journal.wait(seq)?,
                _ => journal.sync()?,
            }
        }
        journal.save_cursor(name, seq)
    }

    /// Every saved export cursor, by name (in byte order), with its sequence number: the
    /// readers that hold the database's places under `log::MAX_CURSORS`, and how far each
    /// has read.
    pub fn cursors(&self) -> Result<Vec<(String, u64)>, Error> {
        self.require_journal()?.cursors()
    }

    /// Deletes a named export cursor durably (a reader that is gone for good), freeing its
    /// place under `log::MAX_CURSORS`; returns whether it was saved. Reading it afterwards
    /// gives 0, as for a name never saved.
    pub fn delete_cursor(&self, name: &str) -> Result<bool, Error> {
        crate::engine::check_id("cursor", name, 128)?;
        self.require_journal()?.delete_cursor(name)
    }

    /// How many fdatasyncs of the event log its writer has made since the engine opened (0
    /// without a log): in `Sync` mode, events per flush is the group commit's batch.
    pub fn log_writer_flushes(&self) -> u64 {
        self.journal().map_or(0, EventLog::writer_flushes)
    }

    /// Makes everything logged so far durable, whatever the durability mode.
    pub fn sync(&self) -> Result<(), Error> {
        self.require_journal()?.sync()
    }

    /// Takes a checkpoint, then drops the log's oldest whole sealed segments whose every event
    /// is covered by the snapshot before the latest (the events after it are kept, so `verify`
    /// can replay between the two), is stamped more than the longest window plus
    /// `retention_ms` before `at_ms` (the clock's time if `None`), and was logged at least
    /// `retention_ms` before it on the engine's clock (their effect lives on in the snapshot).
    /// When an event was logged is judged by the first checkpoint's cut at or after it, whose
    /// clock time is recorded in the database (`log::EventLog::record_logged_by`); events an
    /// earlier build logged, which recorded none, count as logged at this build's first
    /// checkpoint. So a request delivered late, stamped long ago, stays `retention_ms` after
    /// it was logged for a reader, as every other event does.
    pub fn compact(&self, at_ms: Option<u64>) -> Result<CompactReport, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let journal = self.require_journal()?;
        let snapshot_seq = self.checkpoint()?;
        journal.wait_rotation(snapshot_seq + 1)?;
        let keep_after = journal
            .previous_snapshot_pointer()?
            .map_or(0, |pointer| pointer.seq);
        let retention_ms = self.retention_ms.load(Ordering::Relaxed);
        // Removable: stamped before the longest window plus the retention before `at_ms`, and
        // logged at least `retention_ms` before it on the engine's clock.
        let removed =
            match crate::log::retention_cut(at_ms, self.policy().longest_window_ms(), retention_ms)
            {
                Some((before_ms, logged_by_ms)) => {
                    let removed = journal.compact(keep_after, before_ms, logged_by_ms);
                    // This one's outcome is the compaction's health now.
                    BackgroundProblems::note(&self.background.compaction, &removed);
                    removed?
                }
                None => 0,
            };
        Ok(CompactReport {
            snapshot_seq,
            events_removed: removed,
            first_seq_kept: journal.log_start()?,
        })
    }

    /// The options the database in `dir` recorded when it was last opened with options of its
    /// own (`None` if it recorded none), read without changing anything; the database must not
    /// be open.
    pub fn recorded_options(dir: impl AsRef<Path>) -> Result<Option<RecordedOptions>, Error> {
        let log = EventLog::open_read_only(dir.as_ref())?;
        let recorded = log.recorded_options()?;
        log.close()?;
        recorded
            .map(|bytes| RecordedOptions::decode(&bytes))
            .transpose()
    }

    /// Checks a database: every record decodes, sequence numbers are gap-free, the latest
    /// snapshot equals a replay of the log from the snapshot before it (or from the start), and
    /// the events after it replay onto it as an open replays them;
    /// of the keys a correction left short, a snapshot of format 4 on must mark at least those
    /// the replay marks (the live engine may have marked more); every saved cursor reads back
    /// and is at most the log's last event, as is every record of when events were logged.
    /// The replay runs with `options`: they must be the ones the database was opened with (the
    /// snapshot holds what they keep, e.g. `max_policy_generations` generations), which
    /// `use_recorded` reads from the database itself (recorded options that do not decode are
    /// one of the problems reported, and the replay runs with `options` as given). Nothing of
    /// tally's is written: no directory created, no crash leftover removed, no format recorded
    /// (sled may write its own files when it opens).
    pub fn verify(dir: impl AsRef<Path>, mut options: OpenOptions) -> Result<VerifyReport, Error> {
        options.validate()?;
        let log = EventLog::open_read_only(dir.as_ref())?;
        let mut report = VerifyReport {
            torn_tail: log.torn_tail().map(str::to_owned),
            ..VerifyReport::default()
        };
        if options.use_recorded {
            if let Some(bytes) = log.recorded_options()? {
                match RecordedOptions::decode(&bytes)
                    .and_then(|recorded| recorded.apply_to(&mut options))
                {
                    Ok(()) => report.replayed_with_recorded_options = true,
                    Err(error) => report.problems.push(error.to_string()),
                }
            }
        }
        let mut bodies = Vec::new();
        let problems = log.walk(|record| {
            report.records += 1;
            let _ = record.for_each(|raw| {
                if let Err(error) = crate::event::decode_body(raw.seq, raw.body) {
                    bodies.push(format!(
                        "log record of events {} to {}: {error}",
                        record.first_seq,
                        record.last_seq()
                    ));
                }
                if report.first_seq == 0 {
                    report.first_seq = raw.seq;
                }
                report.last_seq = raw.seq;
                report.events += 1;
                Ok(true)
            });
        });
        // The records are sound and every body decodes: an open's replay of the tail means
        // something whatever else is wrong.
        let records_sound = problems.is_empty() && bodies.is_empty();
        report.problems.extend(problems);
        report.problems.extend(bodies);
        // A billing reader's cursor that reading after fails.
        report
            .problems
            .extend(log.cursor_problems(log.next_seq() - 1));
        // A record of when events were logged that compaction cannot read, or that would date
        // events not logged yet.
        report
            .problems
            .extend(log.logged_by_problems(log.next_seq() - 1));
        // A record of the reservation ids handed out that does not read back: every open
        // refuses it, as going on without it could hand out an id again.
        if let Err(error) = log.reservation_ids_through() {
            report.problems.push(error.to_string());
        }
        // The latest snapshot, read and decoded once: compared with a replay of the log up to
        // it, then restored for the replay of the events after it.
        let latest = log.snapshot_pointer()?;
        // Named even when it cannot be read.
        report.snapshot_seq = latest.map(|pointer| pointer.seq);
        let latest_bytes = match &latest {
            Some(pointer) => match log.read_snapshot(pointer) {
                Ok(bytes) => Some(bytes),
                Err(error) => {
                    report.problems.push(error.to_string());
                    None
                }
            },
            None => None,
        };
        let stored = match (&latest, &latest_bytes) {
            (Some(pointer), Some(bytes)) => match decode_snapshot_of(bytes, pointer.seq) {
                Ok(snapshot) => Some(snapshot.in_name_order()),
                Err(error) => {
                    report.problems.push(error.to_string());
                    None
                }
            },
            _ => None,
        };
        if let (Some(pointer), Some(stored)) = (latest, &stored) {
            match verify_snapshot(&log, pointer, stored, &options) {
                Ok(mismatch) => {
                    report.snapshot_matches_replay = Some(mismatch.is_none());
                    if let Some(mismatch) = mismatch {
                        report.problems.push(format!(
                            "snapshot {} does not match a replay of the log{mismatch}",
                            pointer.seq
                        ));
                    }
                }
                Err(error) => {
                    // The replay up to the snapshot stops at damage the walk above listed
                    // already: one damaged record is one problem.
                    let problem = error.to_string();
                    if !report.problems.contains(&problem) {
                        report.problems.push(problem);
                    }
                }
            }
        }
        // What open needs first: the event after the snapshot, or event 1 without one.
        let start = log.log_start()?;
        let problems_before_start = report.problems.len();
        match report.snapshot_seq {
            None if start > 1 => report.problems.push(format!(
                "the log starts at event {start} but there is no snapshot: events 1 to {} are \
                 missing",
                start - 1
            )),
            Some(seq) if start > seq.saturating_add(1) => report.problems.push(format!(
                "the log starts at event {start} but the snapshot covers events up to {seq}: \
                 events {} to {} are missing",
                seq + 1,
                start - 1
            )),
            _ => {}
        }
        // What an open replays: the events after the latest snapshot (every event without one)
        // applied to it. An event that decodes but cannot be applied (a record written wrong,
        // its crc sound) refuses the open. Checked whenever the records are sound, the snapshot
        // decodes and no event an open needs is missing, whatever else was found (a snapshot
        // that does not match a replay, options that do not decode).
        let tail_replayable = records_sound
            && report.problems.len() == problems_before_start
            && (latest.is_none() || stored.is_some());
        if tail_replayable {
            if let Err(problem) = verify_tail(&log, stored.as_ref(), &options) {
                report.problems.push(problem);
            }
        }
        log.close()?;
        Ok(report)
    }

    /// Checkpoints, flushes and closes the log. Dropping the engine also closes it, without
    /// the checkpoint.
    pub fn close(self) -> Result<(), Error> {
        if let Some(journal) = self.journal() {
            self.checkpoint()?;
            journal.close()?;
        }
        Ok(())
    }

    fn require_journal(&self) -> Result<&EventLog, Error> {
        self.journal()
            .ok_or_else(|| Error::invalid("engine", "an in-memory engine has no log"))
    }
}

/// Restores the latest snapshot (if any) into an engine of its own and replays the events after
/// it, as an open does; what went wrong, naming which of the two refused.
fn verify_tail(
    log: &EventLog,
    latest: Option<&Snapshot<'_>>,
    options: &OpenOptions,
) -> Result<(), String> {
    let engine = Engine::new(
        Policy::token_plan(),
        Arc::new(crate::clock::ManualClock::new(0)),
        options.engine,
    )
    .map_err(|error| error.to_string())?;
    let from = match latest {
        Some(snapshot) => {
            engine.restore(snapshot).map_err(|error| {
                format!(
                    "the latest snapshot ({}) cannot be restored as an open restores it: {error}",
                    snapshot.seq
                )
            })?;
            snapshot.seq
        }
        None => 0,
    };
    engine
        .replay_log(log, from, u64::MAX)
        .map(|_| ())
        .map_err(|error| {
            format!(
                "the events after the latest snapshot do not replay as an open replays them: \
                 {error}"
            )
        })
}

/// Replays from the snapshot before the latest (or the start) up to the latest and compares;
/// `None` if they match, else what differs (empty, or `": ..."` naming it).
fn verify_snapshot(
    log: &EventLog,
    latest: crate::log::SnapshotPointer,
    stored: &Snapshot<'_>,
    options: &OpenOptions,
) -> Result<Option<String>, Error> {
    let base_bytes = match log.previous_snapshot_pointer()? {
        Some(previous) if previous.seq < latest.seq => {
            Some((log.read_snapshot(&previous)?, previous.seq))
        }
        _ => None,
    };
    let base = match &base_bytes {
        Some((bytes, seq)) => Some(decode_snapshot_of(bytes, *seq)?),
        None => None,
    };
    let first_needed = base.as_ref().map_or(1, |snapshot| snapshot.seq + 1);
    if log.log_start()? > first_needed {
        return Err(storage(format!(
            "the events before snapshot {} were compacted: nothing to replay it from",
            latest.seq
        )));
    }
    let policy = Policy::token_plan();
    // Every generation the replay passes through is kept (`normalized` then compares only the
    // ones the snapshot kept): the snapshots were taken under the bound of their time, which
    // an open since may have raised or lowered (the recorded options are the latest), and a
    // replay under another bound let go of other generations than the live engine did.
    let engine = Engine::new(
        policy,
        Arc::new(crate::clock::ManualClock::new(0)),
        crate::EngineOptions {
            max_policy_generations: crate::options::MAX_POLICY_GENERATIONS,
            ..options.engine
        },
    )?;
    // So is every closed reservation (`normalized` compares only the ones the snapshot kept):
    // an open keeps those it restores and replays under a lower bound than the closes were
    // made under (`Engine::open`), forgetting the oldest past the bound only at a later close.
    engine
        .reservations
        .inner
        .lock()
        .set_closed_capacity(usize::MAX);
    let from = match &base {
        Some(snapshot) => {
            engine.restore(snapshot)?;
            snapshot.seq
        }
        None => 0,
    };
    engine.replay_log(log, from, latest.seq)?;
    let replayed = engine.cut(|| latest.seq)?;
    // The keys a correction left short are compared one way (`normalized` leaves them out):
    // the live engine marked each key as it applied a removal the replay reads, so a snapshot
    // of format 4 on lists at least every mark the replay sets (it may list more: a removal
    // refused after marking, an older snapshot's open marking cautiously). One that does not
    // lets the reopened engine give back a short period's hold under the read lock.
    if stored.version >= 4 {
        for (key, until) in &replayed.short_keys {
            let kept = stored
                .short_keys
                .iter()
                .find(|(stored_key, _)| stored_key == key)
                .map_or(0, |&(_, kept)| kept);
            if kept < *until {
                return Ok(Some(format!(
                    ": a correction in the log left key {:?} short until {until} ms, and the \
                     snapshot marks it {}",
                    &**key,
                    match kept {
                        0 => "not at all".to_string(),
                        kept => format!("only until {kept} ms"),
                    }
                )));
            }
        }
    }
    let (mut replayed, stored) = (normalized(&replayed, stored), normalized(stored, stored));
    // A snapshot may be ahead of the replay in reservation ids: an open skips the ids an
    // earlier run may have handed out (`reservation_ids_through`), which no event names.
    replayed.next_reservation = replayed.next_reservation.max(stored.next_reservation);
    Ok((replayed != stored).then(|| first_difference(&replayed, &stored)))
}

/// Where two normalized snapshots first differ, for `verify`'s report: `": field: the replay
/// has .., the snapshot .."`, each side cut to a few hundred characters (empty if they agree).
fn first_difference(replayed: &Snapshot<'_>, stored: &Snapshot<'_>) -> String {
    fn cut(text: String) -> String {
        const MOST: usize = 300;
        match text.char_indices().nth(MOST) {
            Some((end, _)) => format!("{}..", &text[..end]),
            None => text,
        }
    }
    fn list<T: std::fmt::Debug + PartialEq>(
        field: &str,
        replayed: &[T],
        stored: &[T],
    ) -> Option<String> {
        let at = replayed
            .iter()
            .zip(stored)
            .position(|(replayed, stored)| replayed != stored);
        match at {
            Some(index) => Some(format!(
                ": {field}[{index}]: the replay has {}, the snapshot {}",
                cut(format!("{:?}", replayed[index])),
                cut(format!("{:?}", stored[index]))
            )),
            None if replayed.len() > stored.len() => Some(format!(
                ": {field}: the replay has {} more than the snapshot, the first {}",
                replayed.len() - stored.len(),
                cut(format!("{:?}", replayed[stored.len()]))
            )),
            None if stored.len() > replayed.len() => Some(format!(
                ": {field}: the snapshot has {} more than the replay, the first {}",
                stored.len() - replayed.len(),
                cut(format!("{:?}", stored[replayed.len()]))
            )),
            None => None,
        }
    }
    let scalar = |field: &str, replayed: u64, stored: u64| {
        (replayed != stored)
            .then(|| format!(": {field}: the replay has {replayed}, the snapshot {stored}"))
    };
    scalar("seq", replayed.seq, stored.seq)
        .or_else(|| scalar("newest_at_ms", replayed.newest_at_ms, stored.newest_at_ms))
        .or_else(|| list("policies", &replayed.policies, &stored.policies))
        .or_else(|| list("users", &replayed.users, &stored.users))
        .or_else(|| list("teams", &replayed.teams, &stored.teams))
        .or_else(|| list("keys", &replayed.keys, &stored.keys))
        .or_else(|| list("requests", &replayed.requests, &stored.requests))
        .or_else(|| {
            list(
                "open_reservations",
                &replayed.open_reservations,
                &stored.open_reservations,
            )
        })
        .or_else(|| {
            list(
                "closed_reservations",
                &replayed.closed_reservations,
                &stored.closed_reservations,
            )
        })
        .or_else(|| {
            // A snapshot may be ahead of the replay: an open skips the ids an earlier run may
            // have handed out (`reservation_ids_through`), which no event names. Behind it, it
            // would hand out an id again.
            (replayed.next_reservation > stored.next_reservation).then(|| {
                format!(
                    ": next_reservation: the replay has {}, the snapshot {}, which would hand \
                     out an id again",
                    replayed.next_reservation, stored.next_reservation
                )
            })
        })
        .or_else(|| list("short_keys", &replayed.short_keys, &stored.short_keys))
        .or_else(|| list("revoked_keys", &replayed.revoked_keys, &stored.revoked_keys))
        .unwrap_or_default()
}

/// A decoded snapshot together with the bytes its names borrow, so that both can be handed to
/// another thread and freed there, the snapshot first.
struct DecodedSnapshot {
    /// Borrows from `*bytes`: `'static` only in name, never handed out as such (`snapshot`
    /// shortens it to the borrow of `self`).
    snapshot: std::mem::ManuallyDrop<Snapshot<'static>>,
    /// From `Box::into_raw`; freed in `drop`, after the snapshot.
    bytes: std::ptr::NonNull<SnapshotBytes>,
}

// SAFETY: it owns both parts (the bytes through the raw pointer, as a `Box` would) and both
// are `Send`.
unsafe impl Send for DecodedSnapshot {}

impl DecodedSnapshot {
    fn decode(bytes: SnapshotBytes, seq: u64) -> Result<DecodedSnapshot, Error> {
        let bytes = std::ptr::NonNull::from(Box::leak(Box::new(bytes)));
        // SAFETY: the box just leaked lives until `drop` (or the error path below) frees it,
        // after the last borrow of it, which only the snapshot holds.
        let borrowed: &'static SnapshotBytes = unsafe { bytes.as_ref() };
        match decode_snapshot_of(borrowed, seq) {
            Ok(snapshot) => Ok(DecodedSnapshot {
                snapshot: std::mem::ManuallyDrop::new(snapshot),
                bytes,
            }),
            Err(error) => {
                // SAFETY: from `Box::leak` above; the failed decode left no borrow of it.
                drop(unsafe { Box::from_raw(bytes.as_ptr()) });
                Err(error)
            }
        }
    }

    /// The snapshot, borrowed no longer than `self` (covariance shortens `'static`).
    fn snapshot(&self) -> &Snapshot<'_> {
        &self.snapshot
    }
}

impl Drop for DecodedSnapshot {
    fn drop(&mut self) {
        // SAFETY: the snapshot is dropped once, here, and before the bytes it borrows; the
        // bytes came from `Box::leak` in `decode` and nothing borrows them any more.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.snapshot);
            drop(Box::from_raw(self.bytes.as_ptr()));
        }
    }
}

/// A snapshot's body as a build of format 3 wrote it: the same state without the keys a
/// correction left short, every rolling window's buckets as plain integer pairs, fixed-width
/// integers and the body's version 3. For tests of databases older builds wrote; the caller
/// fixes the file's header.
#[doc(hidden)]
pub fn snapshot_body_in_format_3(body: &[u8]) -> Result<Vec<u8>, Error> {
    let snapshot = decode_snapshot(body, 0)?;
    buckets::in_format_3(|| fixed_width_body(&snapshot, 3))
        .map_err(|error| storage(format!("encoding a snapshot: {error}")))
}

/// `snapshot` in format 3's layout (`SnapshotFormat3`: fixed-width integers, no `short_keys`)
/// saying `version`; its rolling buckets packed unless inside `buckets::in_format_3`.
fn fixed_width_body(snapshot: &Snapshot<'_>, version: u16) -> bincode::Result<Vec<u8>> {
    bincode::serialize(&(
        version,
        snapshot.seq,
        snapshot.newest_at_ms,
        &snapshot.policies,
        &snapshot.users,
        &snapshot.teams,
        &snapshot.keys,
        &snapshot.requests,
        &snapshot.open_reservations,
        &snapshot.closed_reservations,
        snapshot.next_reservation,
    ))
}

/// The format version a snapshot's body says it is in (see `snapshot_encoding`).
fn snapshot_version(bytes: &[u8], seq: u64) -> Result<u16, Error> {
    let version = match bytes {
        [old @ (2 | 3), 0, ..] => u16::from(*old),
        _ => snapshot_encoding()
            .allow_trailing_bytes()
            .deserialize(bytes)
            .map_err(|error| {
                storage(format!("snapshot {seq}: cannot read its version: {error}"))
            })?,
    };
    // Formats 2 and 3 wrote `[version, 0]`, and format 4 on never writes a varint below 4:
    // `[3, 1]` is neither (read as format 3 it said version 259, and its keys a correction
    // left short were taken as listed).
    if matches!(version, 2 | 3) && bytes.get(1) != Some(&0) {
        return Err(storage(format!(
            "snapshot {seq}: cannot read its version: its first bytes {:?} are neither a \
             format-2 or -3 version ([2 or 3, 0]) nor a varint of 4 or more",
            &bytes[..bytes.len().min(2)]
        )));
    }
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(storage(format!(
            "snapshot {seq}: format version {version}; this build reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}{}",
            if version > FORMAT_VERSION {
                ": upgrade tally"
            } else {
                ""
            }
        )));
    }
    Ok(version)
}

/// `decode_snapshot` of the file of snapshot `seq`: a body covering another event (its file
/// named, and its header's seq, outside the checksum, set, for another) is refused, as a
/// restore from it and a replay from `seq` on would skip or repeat the events between.
fn decode_snapshot_of(bytes: &[u8], seq: u64) -> Result<Snapshot<'_>, Error> {
    let snapshot = decode_snapshot(bytes, seq)?;
    if snapshot.seq != seq {
        return Err(storage(format!(
            "snapshot {seq}: its body is the snapshot of event {}, not of event {seq}",
            snapshot.seq
        )));
    }
    Ok(snapshot)
}

fn decode_snapshot(bytes: &[u8], seq: u64) -> Result<Snapshot<'_>, Error> {
    let damaged = |error: bincode::Error| storage(format!("snapshot {seq} is damaged: {error}"));
    if snapshot_version(bytes, seq)? < 4 || in_fixed_width_format_4(bytes, seq) {
        return bincode::deserialize::<SnapshotFormat3>(bytes)
            .map(|old| Snapshot {
                // A fixed-width format-4 body lists no short keys either: read as format 3,
                // so an open works them out (`mark_short_periods`).
                version: old.version.min(3),
                ..Snapshot::from(old)
            })
            .map_err(damaged);
    }
    if snapshot_version(bytes, seq)? == 4 {
        return snapshot_encoding()
            .deserialize::<SnapshotFormat4>(bytes)
            .map(Snapshot::from)
            .map_err(damaged);
    }
    snapshot_encoding().deserialize(bytes).map_err(damaged)
}

/// Whether `bytes`, a body of snapshot `seq`, is one main's builds wrote between packing
/// rolling buckets (f95a593) and the varint body with `short_keys` (82b60da), which kept the
/// version 4: format 3's layout in fixed-width integers, buckets packed (`CounterWire` reads
/// both), version `[4, 0]`, then `seq` in 8 bytes. A varint body goes on after its version
/// with `seq` as a varint, whose first byte is 0 only for snapshot 0.
fn in_fixed_width_format_4(bytes: &[u8], seq: u64) -> bool {
    seq != 0 && bytes.get(..2) == Some(&[4, 0]) && bytes.get(2..10) == Some(&seq.to_le_bytes())
}

/// A snapshot with what does not change what the engine would decide taken out: ring heads
/// (advanced by reads without events), buckets and periods no longer live as of `reference`'s
/// time, empty counters, and keys whose usage was reclaimed.
fn normalized<'a>(snapshot: &Snapshot<'a>, reference: &Snapshot<'_>) -> Snapshot<'a> {
    let mut out = snapshot.clone();
    let policy = reference
        .policies
        .last()
        .and_then(|document| document.as_deref())
        .and_then(|document| Policy::from_logged_json(document).ok());
    let head_of = |key: &str, counter: u16| -> Option<u64> {
        let found = reference
            .keys
            .binary_search_by(|probe| (*probe.key).cmp(key))
            .ok()?;
        reference.keys[found]
            .counters
            .as_ref()?
            .iter()
            .find_map(|(id, state)| match state {
                CounterSnapshot::Rolling { head, .. } if *id == counter => Some(*head),
                _ => None,
            })
    };
    out.newest_at_ms = 0;
    // The policy generations the reference let go (`max_policy_generations`, the bound of its
    // time) are let go here too: `verify`'s replay keeps them all.
    for (generation, document) in out.policies.iter_mut().enumerate() {
        if reference
            .policies
            .get(generation)
            .is_some_and(Option::is_none)
        {
            *document = None;
        }
    }
    // A snapshot an older build wrote says its own format version (one this build reads):
    // the state is what is compared.
    out.version = FORMAT_VERSION;
    // Which keys a correction left short only sends their closes to the write lock (a key
    // marked needlessly is slower, never wrong), and the open of an older snapshot marks them
    // from the counters, cautiously, where no event says so: not compared.
    out.short_keys.clear();
    // Request ids and closed reservations age out of memory without an event (by the clock),
    // so a replay may still hold some the live engine had forgotten: compare only the ones the
    // reference kept.
    // (Looked up in sets: with a scan of the reference's list per item, the crash test's 16
    // checks of about 40,000 ids took 114 s in a debug build; 10 s with the sets.)
    let kept_ids: std::collections::HashSet<&str> =
        reference.requests.iter().map(|kept| &*kept.id).collect();
    // An earlier build's snapshot may keep a denial for want of a valid key, which this
    // build's restore and replay leave out (`idempotency::remembers`): not compared.
    out.requests.retain(|request| {
        kept_ids.contains(&*request.id) && crate::idempotency::remembers(&request.decision)
    });
    let kept_closes: std::collections::HashSet<u64> = reference
        .closed_reservations
        .iter()
        .map(|kept| kept.0)
        .collect();
    out.closed_reservations
        .retain(|closed| kept_closes.contains(&closed.0));
    for request in &mut out.requests {
        request.arrived_ms = 0;
    }
    for closed in &mut out.closed_reservations {
        closed.1 = 0;
    }
    // Idle windows are reclaimed without an event, setting the key's time floor to when they
    // were empty: a replay still holds what had aged out by then. Count as of that time too.
    let floor_of = |key: &str| -> u64 {
        reference
            .keys
            .binary_search_by(|probe| (*probe.key).cmp(key))
            .map_or(0, |found| reference.keys[found].time_floor_ms)
    };
    for key in &mut out.keys {
        let floor_ms = floor_of(&key.key);
        key.time_floor_ms = 0;
        let Some(counters) = key.counters.as_mut() else {
            continue;
        };
        for (id, state) in counters.iter_mut() {
            match state {
                CounterSnapshot::Rolling {
                    head,
                    buckets,
                    wide,
                } => {
                    let shape = policy.as_ref().and_then(|policy| {
                        policy
                            .counters()
                            .get(usize::from(*id))
                            .and_then(|spec| spec.window.shape())
                    });
                    let reference_head = head_of(&key.key, *id)
                        .unwrap_or(*head)
                        .max(*head)
                        .max(shape.map_or(0, |shape| shape.epoch(floor_ms)));
                    let span = shape.map_or(0, |shape| shape.buckets);
                    buckets.retain(|(epoch, count)| *count > 0 && epoch + span >= reference_head);
                    *head = 0;
                    *wide = false;
                }
                CounterSnapshot::Calendar { period, count } => {
                    let current = policy.as_ref().and_then(|policy| {
                        match policy.counters().get(usize::from(*id))?.window {
                            Window::Calendar(kind) => Some(
                                policy
                                    .calendar()
                                    .period_of(kind, reference.newest_at_ms.max(floor_ms))
                                    .index,
                            ),
                            Window::Rolling { .. } => None,
                        }
                    });
                    if *count == 0 || current.is_some_and(|current| *period < current) {
                        *period = 0;
                        *count = 0;
                    }
                }
            }
        }
        counters.retain(|(_, state)| match state {
            CounterSnapshot::Rolling { buckets, .. } => !buckets.is_empty(),
            CounterSnapshot::Calendar { count, .. } => *count > 0,
        });
        if counters.is_empty() {
            key.counters = None;
        }
    }
    out
}

#[cfg(test)]
fn key_snapshot(policy: &Policy, key: &str, state: &KeyState) -> KeySnapshot<'static> {
    let counters = state.usage.get().map(|usage| {
        usage
            .counters
            .iter()
            .map(|counter| {
                let snapshot = match &counter.state {
                    WindowState::Rolling(window) => {
                        let shape = policy
                            .counter(counter.id)
                            .window
                            .shape()
                            .unwrap_or_else(|| unreachable!());
                        let head = window.head();
                        let buckets = window
                            .buckets(shape, head)
                            .into_iter()
                            .map(|(start_ms, count)| (start_ms / shape.bucket_ms, count))
                            .collect();
                        CounterSnapshot::Rolling {
                            head,
                            wide: window.is_wide(),
                            buckets,
                        }
                    }
                    WindowState::Calendar(calendar) => {
                        let (period, count) = calendar.raw();
                        CounterSnapshot::Calendar { period, count }
                    }
                };
                (counter.id.0, snapshot)
            })
            .collect()
    });
    KeySnapshot {
        key: key.to_string().into(),
        payg: state.kind == KeyKind::PayAsYouGo,
        user: state.user.to_string().into(),
        team: state.team.name.to_string().into(),
        seat: state.seat.map(|seat| seat.0),
        open_reservations: state.open_reservations.load(Ordering::Acquire),
        payg_micros: state.payg_micros.load(Ordering::Acquire),
        time_floor_ms: state.time_floor_ms,
        counters,
    }
}

/// The records of a snapshot's teams, built on two threads from `PARALLEL_RESTORE_TEAMS` teams
/// on (each a handful of allocations and a lookup of each member's name among the users);
/// inserting them into the registry stays on one thread.
fn team_records(registry: &Registry, teams: &[TeamSnapshot<'_>]) -> Vec<(Box<str>, TeamRecord)> {
    let build = |teams: &[TeamSnapshot<'_>]| -> Vec<(Box<str>, TeamRecord)> {
        teams
            .iter()
            .map(|team| {
                let state = Arc::new(Team::new(&team.name));
                state.restore(team.balance_micros, team.charged_micros);
                let members = team
                    .members
                    .iter()
                    .map(|(user, key)| (user_name(registry, user), (&**key).into()))
                    .collect();
                let owner = team
                    .owner
                    .as_deref()
                    .map(|owner| user_name(registry, owner));
                let record = TeamRecord {
                    team: state,
                    members,
                    owner,
                };
                ((&*team.name).into(), record)
            })
            .collect()
    };
    let (mut records, helped) = in_halves(teams, PARALLEL_RESTORE_TEAMS, build);
    records.extend(helped);
    records
}

/// `work` over the two halves of `items`, the second on a thread of its own, from `threshold`
/// items on (below it, over all of them here, and over nothing): a restore's keys and teams.
fn in_halves<T: Sync, R: Send>(
    items: &[T],
    threshold: usize,
    work: impl Fn(&[T]) -> R + Sync,
) -> (R, R) {
    if items.len() < threshold {
        return (work(items), work(&[]));
    }
    let (mine, theirs) = items.split_at(items.len() / 2);
    let (done, helped) = beside("tally-restore", || work(theirs), || work(mine));
    // No second thread: this one does their half too.
    (done, helped.unwrap_or_else(|| work(theirs)))
}

/// Runs `theirs` on a scoped thread named `name` while this thread runs `mine`; returns both
/// results, `None` for `theirs` if no thread could be had (it did not run: the caller does its
/// work some other way). A panic in `theirs` (a bug) goes on as if it had happened here.
fn beside<A, B: Send>(
    name: &str,
    theirs: impl FnOnce() -> B + Send,
    mine: impl FnOnce() -> A,
) -> (A, Option<B>) {
    std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, theirs);
        let done = mine();
        let helped = helper.ok().map(|helper| {
            helper
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        (done, helped)
    })
}

/// The record a logged (or snapshotted) request id restores: its request's fingerprint and
/// first decision, not refunded.
fn request_record(
    key: &str,
    resource: &str,
    quantities: &Quantities,
    decision: &Decision,
    receipt: Option<Receipt>,
) -> RequestRecord {
    let fingerprint = Fingerprint {
        key,
        resource,
        quantities: *quantities,
    };
    // Restored from the database: durable. The arrival is set by `RequestTable::restore`.
    RequestRecord::new(
        0,
        &fingerprint,
        decision,
        receipt.as_ref(),
        LoggedAs::Durable,
    )
}

/// The registry's one copy of a user's name: every mention of a user shares it, as before the
/// restart (a user without a record keeps a copy of its own).
fn user_name(registry: &Registry, user: &str) -> Arc<str> {
    registry
        .users
        .get_key_value(user)
        .map_or_else(|| user.into(), |(name, _)| Arc::clone(name))
}

fn restore_usage(
    policy: &Policy,
    counters: &[(u16, CounterSnapshot)],
    seq: u64,
    key: &str,
) -> Result<crate::ledger::UsageBox, Error> {
    let mut restored = Vec::with_capacity(counters.len());
    for (id, snapshot) in counters {
        let spec = policy.counters().get(usize::from(*id)).ok_or_else(|| {
            storage(format!(
                "a snapshot names counter {id}, which the policy does not have"
            ))
        })?;
        // A period or head a replayed move could not have put there (`unreadable_move`).
        let time = match snapshot {
            CounterSnapshot::Rolling { head, .. } => *head,
            CounterSnapshot::Calendar { period, .. } => u64::from(*period),
        };
        if let Some(why) = unreadable_move(policy, CounterId(*id), time) {
            return Err(storage(format!(
                "snapshot {seq}: key {key:?}'s counter {id}: it counts in {why}"
            )));
        }
        let state = match (snapshot, spec.window.shape()) {
            (
                CounterSnapshot::Rolling {
                    head,
                    wide,
                    buckets,
                },
                Some(shape),
            ) => WindowState::Rolling(
                RollingWindow::restored(shape, *wide, *head, buckets).map_err(|why| {
                    storage(format!("snapshot {seq}: key {key:?}'s counter {id}: {why}"))
                })?,
            ),
            (CounterSnapshot::Calendar { period, count }, None) => {
                WindowState::Calendar(CalendarCounter::restored(*period, *count))
            }
            _ => {
                return Err(storage(format!(
                    "a snapshot's counter {id} does not match its window"
                )))
            }
        };
        restored.push(Counter {
            id: CounterId(*id),
            state,
        });
    }
    Ok(KeyUsage::from_counters(restored))
}

/// An error of replaying event `seq` (of kind `kind`), naming it.
fn replaying(seq: u64, kind: &str, error: Error) -> Error {
    storage(format!("replaying event {seq} ({kind}): {error}"))
}

/// Refuses a logged move on a counter that `then`, the policy generation it names, does not
/// have, or at a time its counter cannot hold (`unreadable_move`): only a record written wrong
/// has one (its crc is sound), and replayed it indexed past the policy's counters, tripped the
/// packing of a calendar counter's period, or moved a ring's head past where the key's next
/// admission could compute its bucket's start.
fn check_counters(
    key: &str,
    then: &Policy,
    moves: impl IntoIterator<Item = (CounterId, u64)>,
) -> Result<(), Error> {
    match moves
        .into_iter()
        .find_map(|(counter, time)| unreadable_move(then, counter, time))
    {
        None => Ok(()),
        Some(why) => Err(storage(format!("key {key:?}: it moves {why}"))),
    }
}

/// Why `then` cannot hold units on `counter` at `time` (an epoch or a period; `None`: it can):
/// a counter it does not have, a calendar period past the 16 bits a counter tells apart, or a
/// rolling bucket starting past twice the range of timestamps (a head carried through swaps
/// to other buckets stays within a bucket of it; past it, the bucket's start overflows).
fn unreadable_move(then: &Policy, counter: CounterId, time: u64) -> Option<String> {
    let Some(spec) = then.counters().get(counter.index()) else {
        return Some(format!(
            "counter {}, which policy generation {} does not have ({} counters)",
            counter.index(),
            then.generation,
            then.counters().len()
        ));
    };
    let past = match spec.window {
        Window::Calendar(_) => time >= crate::window::CALENDAR_PERIODS,
        Window::Rolling { .. } => spec.window.shape().is_some_and(|shape| {
            time.checked_mul(shape.bucket_ms)
                .is_none_or(|start| start > 2 * crate::calendar::MAX_TIMESTAMP_MS)
        }),
    };
    past.then(|| {
        format!(
            "counter {}'s {} {time}, past the range of timestamps",
            counter.index(),
            match spec.window {
                Window::Calendar(_) => "period",
                Window::Rolling { .. } => "bucket",
            }
        )
    })
}

/// Why `receipt` could not be read under `policies` (`None`: it can): a generation after the
/// current one, or a hold its generation cannot hold (`unreadable_move`). A receipt a restore or a
/// replay keeps (a request id's, an open reservation's) is read later by a refund or close,
/// and by the next open of an older snapshot (`mark_short_periods`).
fn unreadable_receipt(policies: &[Option<Arc<Policy>>], receipt: &Receipt) -> Option<String> {
    let Some(then) = policies.get(receipt.generation as usize) else {
        return Some(format!(
            "its policy generation {} is after the current one, {}",
            receipt.generation,
            policies.len().saturating_sub(1)
        ));
    };
    let then = then.as_deref()?;
    receipt
        .holds
        .as_slice()
        .iter()
        .find_map(|&(counter, _, time)| unreadable_move(then, counter, time))
        .map(|why| format!("it holds units on {why}"))
}

/// Amounts removed before the log's matching add (replay order differs from memory order only
/// for commuting counter changes): paid off by the next add to the same counter and time.
///
/// Also, live, what an undo after a failed log could not take off a counter (`Engine::undo_debts`).
///
/// And, in a replay, the other way round: units an add could not put in a rolling bucket
/// already full (`adjustment::force_fitting`), taken by the next removal from the same counter and time
/// before the counter (the live removal, logged after the add, had freed the room first).
#[derive(Debug, Default)]
pub(crate) struct Debts {
    owed: HashMap<(String, CounterId, u64), u64>,
    surplus: HashMap<(String, CounterId, u64), u64>,
}

impl Debts {
    pub(crate) fn add_surplus(&mut self, key: &str, counter: CounterId, time: u64, amount: u64) {
        if amount > 0 {
            *self.surplus.entry((key.into(), counter, time)).or_default() += amount;
        }
    }

    /// Takes up to `amount` of surplus; returns how much.
    pub(crate) fn take_surplus(
        &mut self,
        key: &str,
        counter: CounterId,
        time: u64,
        amount: u64,
    ) -> u64 {
        if self.surplus.is_empty() {
            return 0;
        }
        let entry = (key.to_string(), counter, time);
        let Some(surplus) = self.surplus.get_mut(&entry) else {
            return 0;
        };
        let taken = (*surplus).min(amount);
        *surplus -= taken;
        if *surplus == 0 {
            self.surplus.remove(&entry);
        }
        taken
    }

    pub(crate) fn add(&mut self, key: &str, counter: CounterId, time: u64, amount: u64) {
        *self.owed.entry((key.into(), counter, time)).or_default() += amount;
    }

    /// Takes up to `amount` of debt; returns how much was owed and is now paid.
    pub(crate) fn take(&mut self, key: &str, counter: CounterId, time: u64, amount: u64) -> u64 {
        if self.owed.is_empty() {
            return 0;
        }
        let entry = (key.to_string(), counter, time);
        let Some(owed) = self.owed.get_mut(&entry) else {
            return 0;
        };
        let paid = (*owed).min(amount);
        *owed -= paid;
        if *owed == 0 {
            self.owed.remove(&entry);
        }
        paid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::engine::UsageRequest;
    use crate::policy::Unit;

    const T0: u64 = 1_790_000_000_000;
    const MINUTE: u64 = 60_000;
    const DAY: u64 = 24 * 60 * MINUTE;

    fn m27(key: &str, requests: u64, at_ms: u64) -> UsageRequest<'_> {
        static QUANTITIES: [[(Unit, u64); 2]; 4] = [
            [(Unit::Requests, 1), (Unit::Tokens, 1_000)],
            [(Unit::Requests, 2), (Unit::Tokens, 2_000)],
            [(Unit::Requests, 3), (Unit::Tokens, 3_000)],
            [(Unit::Requests, 4), (Unit::Tokens, 4_000)],
        ];
        UsageRequest::new(key, "m2.7", &QUANTITIES[(requests as usize - 1) % 4]).at(at_ms)
    }

    /// An empty directory of this process's for a test's database (`label` tells them apart).
    fn fresh_dir(label: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tally-recovery-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// An engine on a log in `dir` (the token plan, `options`), with user `u` seated on
    /// `plan` (key `tp-u`) at `T0`.
    fn seated_on_disk(dir: &Path, plan: &str, options: OpenOptions) -> Engine {
        seated_on_disk_on(dir, plan, options, Arc::new(ManualClock::new(T0)))
    }

    /// `seated_on_disk` on `clock`, which the test keeps to move.
    fn seated_on_disk_on(
        dir: &Path,
        plan: &str,
        options: OpenOptions,
        clock: Arc<ManualClock>,
    ) -> Engine {
        let engine = Engine::open(dir, Policy::token_plan(), clock, options).expect("open");
        engine.create_user("u", "tp-u", Some(T0)).expect("user");
        engine.assign_seat("@u", "u", plan, Some(T0)).expect("seat");
        engine
    }

    /// Rewrites snapshot `seq` in `dir` through `change`, its header's length and crc made to
    /// match (damage a crc does not catch).
    fn rewrite_snapshot(dir: &Path, seq: u64, change: impl FnOnce(&mut Snapshot<'_>)) {
        let path = dir.join("snapshots").join(format!("{seq:020}.snap"));
        let file = std::fs::read(&path).expect("the snapshot");
        let mut snapshot = decode_snapshot(&file[32..], seq).expect("decoding");
        change(&mut snapshot);
        let body = snapshot_encoding().serialize(&snapshot).expect("encoding");
        let mut damaged = file[..32].to_vec();
        damaged[20..28].copy_from_slice(&(body.len() as u64).to_le_bytes());
        damaged[28..32].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        damaged.extend(body);
        std::fs::write(&path, damaged).expect("rewriting");
    }

    /// A fresh in-memory engine on the token plan, a snapshot's restore to go into it.
    fn blank_engine() -> Engine {
        Engine::new(
            Policy::token_plan(),
            Arc::new(ManualClock::new(T0 + 8 * DAY)),
            EngineOptions::default(),
        )
        .expect("valid options")
    }

    /// A fresh in-memory engine restored from snapshot `bytes` covering events up to `seq`.
    fn restored_from(bytes: &[u8], seq: u64) -> Engine {
        let restored = blank_engine();
        restored
            .restore(&decode_snapshot(bytes, seq).expect("decoding"))
            .expect("restoring");
        restored
    }

    /// An engine holding every kind of state a snapshot carries: narrow rings (request
    /// quotas), wide rings (the priced usage bar), daily and weekly counters, dormant counters
    /// of an earlier plan, keys reclaimed with a time floor, pay-as-you-go keys, teams with
    /// members and credits, request ids (admitted and denied), open and closed reservations.
    fn busy_engine() -> (Engine, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(T0));
        let engine = Engine::new(
            Policy::token_plan(),
            clock.clone(),
            EngineOptions::default(),
        )
        .expect("valid options");
        let plans = ["Starter", "Plus", "Bar-Plus", "Max", ""];
        for index in 0..300u64 {
            let user = format!("user-{index}");
            engine
                .create_user(&user, &format!("tp-{index}"), Some(T0))
                .expect("user");
            let plan = plans[index as usize % plans.len()];
            if !plan.is_empty() {
                engine
                    .assign_seat(&format!("@{user}"), &user, plan, Some(T0))
                    .expect("seat");
            }
        }
        // Long names sharing their first 16 bytes (sorted past their prefixes).
        for index in [3u64, 1, 12, 2, 11] {
            let user = format!("a-user-with-a-long-name-{index}");
            let key = format!("tp-with-a-long-name-{index}");
            engine.create_user(&user, &key, Some(T0)).expect("user");
            engine
                .assign_seat(&format!("@{user}"), &user, "Plus", Some(T0))
                .expect("seat");
        }
        // Keys used once, then reclaimed as idle a week later: they keep a time floor.
        for index in 0..20u64 {
            let _ = engine.consume(&m27(&format!("tp-{index}"), 1, T0 + index * MINUTE));
        }
        let t1 = T0 + 8 * DAY;
        clock.set_ms(t1);
        assert!(engine.reclaim_idle(Some(t1)).expect("reclaim") > 0);
        // Usage over many buckets of the 5-hour windows, and on daily quotas.
        for step in 0..3_000u64 {
            let index = (step * 7) % 300;
            let at_ms = t1 + step * MINUTE / 10;
            let key = format!("tp-{index}");
            let _ = engine.consume(&m27(&key, 1 + step % 4, at_ms));
            if step % 5 == 0 {
                let speech = UsageRequest::new(&key, "speech-2.8", &[(Unit::Characters, 40)]);
                let _ = engine.consume(&speech.at(at_ms));
            }
        }
        // Dormant counters: Plus keys with usage move to the shared usage bar, and back on one.
        for index in [1u64, 6, 11, 16, 21, 26] {
            let user = format!("user-{index}");
            engine
                .assign_seat(&format!("@{user}"), &user, "Bar-Plus", Some(t1 + DAY / 4))
                .expect("seat change");
        }
        engine
            .assign_seat("@user-21", "user-21", "Plus", Some(t1 + DAY / 4))
            .expect("seat back");
        // A team with members, credits and a credit-paid video.
        engine.create_team("acme", Some(t1)).expect("team");
        for index in [2u64, 3, 4] {
            let user = format!("user-{index}");
            engine
                .add_member("acme", &user, &format!("acme-{index}"), Some(t1))
                .expect("member");
        }
        engine
            .assign_seat("acme", "user-3", "Max", Some(t1))
            .expect("seat");
        engine.top_up("acme", 50_000_000, Some(t1)).expect("top-up");
        engine
            .top_up("@user-4", 3_000_000, Some(t1))
            .expect("top-up");
        for _ in 0..4 {
            let video = UsageRequest::new("acme-3", "hailuo-2.3-768p-6s", &[(Unit::Videos, 1)]);
            assert!(engine.consume(&video.at(t1 + 60 * MINUTE)).is_ok());
        }
        // Pay-as-you-go keys.
        for index in [5u64, 7] {
            let key = format!("payg-{index}");
            engine
                .create_payg_key(&format!("user-{index}"), &key, Some(t1))
                .expect("payg key");
            for step in 0..5 {
                let _ = engine.consume(&m27(&key, 2, t1 + step * MINUTE));
            }
        }
        for index in [3u64, 1, 12, 2, 11] {
            let key = format!("tp-with-a-long-name-{index}");
            let _ = engine.consume(&m27(&key, 1, t1 + index * MINUTE));
        }
        // Request ids: admitted ones, and a denied one (a key without a seat or credits).
        for step in 0..40u64 {
            let id = format!("req-{step}");
            let key = format!("tp-{}", 30 + step % 7);
            let request = m27(&key, 1, t1 + 70 * MINUTE + step).id(&id);
            engine.consume(&request).expect("a request with an id");
        }
        let id = "req-denied";
        let denied = engine
            .consume(&m27("tp-9", 1, t1 + 80 * MINUTE).id(id))
            .expect("a denial is a decision");
        assert!(!denied.is_admitted());
        // Reservations: some settled, one voided, some left open.
        let mut reserved = Vec::new();
        for index in [8u64, 13, 17, 22, 23] {
            let key = format!("tp-{index}");
            let outcome = engine
                .reserve(&m27(&key, 3, t1 + 90 * MINUTE), Some(3_600_000))
                .expect("reserve");
            reserved.extend(outcome.reservation);
        }
        assert!(reserved.len() >= 4, "{reserved:?}");
        engine
            .settle(
                reserved[0],
                &[(Unit::Requests, 2), (Unit::Tokens, 500)],
                Some(t1 + 95 * MINUTE),
            )
            .expect("settle");
        engine
            .void(reserved[1], Some(t1 + 96 * MINUTE))
            .expect("void");
        // A removal of usage a key's daily counter recorded: the key is left short.
        engine
            .adjust_usage(
                "acme-3",
                "hailuo-2.3-768p-6s",
                &[(Unit::Videos, 1)],
                t1 + 60 * MINUTE,
                AdjustmentDirection::Remove,
                Some(t1 + 97 * MINUTE),
            )
            .expect("a correction");
        (engine, clock)
    }

    /// A body whose first byte says format 2 or 3 must go on with the `0` of that format's
    /// fixed-width version: `[3, 1, ...]` is neither a format-3 body nor a format-4 one (whose
    /// varint version is 4 or more), and read as format 3 it said version 259, so the open
    /// skipped working out the keys a correction left short.
    #[test]
    fn a_body_whose_version_is_neither_fixed_nor_a_varint_of_4_or_more_is_refused() {
        let (engine, _clock) = busy_engine();
        let bytes = snapshot_encoding()
            .serialize(&engine.cut(|| 9).expect("cut"))
            .expect("encoding");
        let mut old = snapshot_body_in_format_3(&bytes).expect("format 3");
        assert_eq!(decode_snapshot(&old, 9).expect("format 3 reads").version, 3);
        for second in [1u8, 0x80] {
            old[1] = second;
            let error = match decode_snapshot(&old, 9) {
                Ok(snapshot) => panic!("[3, {second}] read as version {}", snapshot.version),
                Err(error) => error.to_string(),
            };
            assert!(
                error.contains("snapshot 9") && error.contains("version"),
                "{error}"
            );
        }
    }

    /// `snapshot`'s body as a build of format 3 wrote it, whatever it holds (unlike
    /// `snapshot_body_in_format_3`, which reads it from format-4 bytes first).
    fn in_format_3(snapshot: &Snapshot<'_>) -> Vec<u8> {
        buckets::in_format_3(|| fixed_width_body(snapshot, 3)).expect("format 3")
    }

    /// A receipt restored from a snapshot names counters of its policy generation, which the
    /// open of an older snapshot reads at once (`mark_short_periods`) and a close or refund
    /// later: one naming a counter its generation does not have, or a generation after the
    /// current one, is damage, refused by the restore and named by its request id or
    /// reservation, not an index out of bounds panicking the open.
    #[test]
    fn a_receipt_naming_a_counter_its_policy_lacks_is_refused_at_restore() {
        let (engine, _clock) = busy_engine();
        let reference = engine.cut(|| 9).expect("cut");
        let current = u32::try_from(reference.policies.len() - 1).expect("a few generations");
        let bad = |receipt: &mut Receipt, counter: u16, generation: u32| {
            receipt.generation = generation;
            receipt.holds = crate::admission::Holds::from_slice(&[(CounterId(counter), 1, 0)])
                .expect("one hold");
        };
        let plan_quota =
            |receipt: &Receipt| matches!(receipt.charged_to, ChargedTo::PlanQuota { .. });
        for (counter, generation) in [(200, current), (0, current + 1)] {
            let mut on_a_request = reference.clone();
            let request = on_a_request
                .requests
                .iter_mut()
                .find(|request| request.receipt.as_ref().is_some_and(plan_quota))
                .expect("a request charged to plan quota");
            bad(
                request.receipt.as_mut().expect("found with one"),
                counter,
                generation,
            );
            let id = request.id.clone();
            let mut on_a_reservation = reference.clone();
            let reservation = on_a_reservation
                .open_reservations
                .iter_mut()
                .find(|reservation| plan_quota(&reservation.receipt))
                .expect("an open reservation charged to plan quota");
            bad(&mut reservation.receipt, counter, generation);
            let reservation_id = reservation.id;
            for (snapshot, named) in [
                (on_a_request, format!("{id:?}")),
                (on_a_reservation, format!("reservation {reservation_id}")),
            ] {
                let bytes = in_format_3(&snapshot);
                let restored = blank_engine();
                let decoded = decode_snapshot(&bytes, 9).expect("decoding");
                let result = restored.restore(&decoded);
                if result.is_ok() {
                    // What an open of this format-3 snapshot does next.
                    restored.mark_short_periods();
                }
                let error = result
                    .expect_err("a receipt its policy cannot read")
                    .to_string();
                assert!(
                    error.contains("snapshot 9") && error.contains(&named),
                    "counter {counter}, generation {generation}: {error}"
                );
            }
        }
    }

    /// Main's builds from f95a593 to bf4d010 already said format 4 (in the database's
    /// metadata and every snapshot) and packed rolling buckets, but wrote the body in bincode's
    /// fixed-width integers without `short_keys`: 82b60da changed both without a new version.
    /// Such a snapshot reads as what it is, a body with no marks (the open works them out as
    /// for format 3), not as a varint body that is damaged.
    #[test]
    fn a_snapshot_of_the_fixed_width_builds_of_format_4_still_reads() {
        let (engine, _clock) = busy_engine();
        let reference = engine.cut(|| 9).expect("cut");
        let interim = fixed_width_body(&reference, 4).expect("encoding");
        assert_eq!(interim[..2], [4, 0]);
        let decoded = match decode_snapshot(&interim, 9) {
            Ok(decoded) => decoded,
            Err(error) => panic!("the fixed-width format-4 body: {error}"),
        };
        assert!(
            decoded.version < 4,
            "its marks are to be worked out at open"
        );
        let mut expected = reference.clone();
        expected.short_keys.clear();
        expected.version = decoded.version;
        assert_eq!(decoded, expected);
        // A varint body says its seq right after the version: `[4, 0]` only for snapshot 0.
        let varint = snapshot_encoding().serialize(&reference).expect("encoding");
        assert_eq!(varint[..2], [FORMAT_VERSION as u8, 9]);
        assert_eq!(decode_snapshot(&varint, 9).expect("decoding"), reference);
    }

    /// A rolling bucket's count is restored into one slot of its ring: a count that slot
    /// cannot hold (more than 16 bits in a narrow ring, 32 in a wide one, alone or with a
    /// bucket listed twice) is damage, refused by the restore and named, not a debug
    /// assertion's panic (in a release build, the count's high bits spilled into the slot's
    /// lap tag, or the count was clamped while the ring's total kept all of it).
    #[test]
    fn a_bucket_count_its_slot_cannot_hold_is_refused_not_restored() {
        let (engine, _clock) = busy_engine();
        let reference = engine.cut(|| 9).expect("cut");
        // A count too large alone, narrow and wide; then a bucket twice, each fitting but
        // not both (format 4 refuses it as it decodes; format 3 does not look).
        for (wide, count, twice) in [
            (false, 0x1_0000u64, false),
            (true, 1 << 32, false),
            (false, 0x8000, true),
        ] {
            let mut snapshot = reference.clone();
            let (key, id) = snapshot
                .keys
                .iter_mut()
                .find_map(|key| {
                    let name = key.key.to_string();
                    key.counters.as_mut()?.iter_mut().find_map(|(id, counter)| {
                        let id = *id;
                        match counter {
                            CounterSnapshot::Rolling {
                                head,
                                wide: is_wide,
                                buckets,
                            } if *is_wide == wide && !buckets.is_empty() => {
                                *buckets = vec![(*head, count); 1 + usize::from(twice)];
                                Some((name.clone(), id))
                            }
                            _ => None,
                        }
                    })
                })
                .expect("a ring of that width with usage");
            let plain = in_format_3(&snapshot);
            let packed = snapshot_encoding().serialize(&snapshot);
            assert_eq!(
                packed.is_err(),
                twice,
                "a bucket twice is refused as it is packed"
            );
            for bytes in packed.into_iter().chain([plain]) {
                let restored = blank_engine();
                let result = decode_snapshot(&bytes, 9).and_then(|decoded| {
                    restored.restore(&decoded)?;
                    Ok(decoded.version)
                });
                let error = result
                    .expect_err("a count its slot cannot hold")
                    .to_string();
                assert!(
                    error.contains("snapshot 9") && error.contains(&count.to_string()),
                    "{key} counter {id}, wide {wide}: {error}"
                );
            }
        }
    }

    /// The next reservation id is the last plus one: a snapshot whose last id is the largest
    /// there is (the first reserve after it overflowed), or with an open reservation past the
    /// last id (the table would hand its id out again, replacing it), is damage, refused by
    /// the restore and named.
    #[test]
    fn reservation_ids_the_table_cannot_go_on_from_are_refused_at_restore() {
        let (engine, _clock) = busy_engine();
        let reference = engine.cut(|| 9).expect("cut");
        assert!(!reference.open_reservations.is_empty());
        let mut last_is_max = reference.clone();
        last_is_max.next_reservation = u64::MAX;
        let mut open_past_last = reference.clone();
        open_past_last.open_reservations[0].id = reference.next_reservation + 1;
        for (snapshot, named) in [
            (last_is_max, u64::MAX.to_string()),
            (
                open_past_last,
                format!("reservation {}", reference.next_reservation + 1),
            ),
        ] {
            let restored = blank_engine();
            let error = restored
                .restore(&snapshot)
                .expect_err("ids the table cannot go on from")
                .to_string();
            assert!(
                error.contains("snapshot 9") && error.contains(&named),
                "{error}"
            );
        }
    }

    /// A key's count of open reservations is restored from the reservations the snapshot holds
    /// open on it. An earlier build's cut could count one more (a close whose event it held,
    /// its slot not yet freed: `RawCut::count_open_reservations`); restored as written, that
    /// reservation stayed counted for good. A key that counts none while the snapshot holds
    /// one open on it is damage, refused and named.
    #[test]
    fn a_keys_open_reservations_are_restored_from_the_ones_the_snapshot_holds_open() {
        let (engine, _clock) = busy_engine();
        let reference = engine.cut(|| 9).expect("cut");
        let open_on = |snapshot: &Snapshot<'_>, key: &str| {
            snapshot
                .open_reservations
                .iter()
                .filter(|reservation| reservation.key == key)
                .count() as u32
        };
        let (index, holder) = reference
            .keys
            .iter()
            .enumerate()
            .find(|(_, key)| key.open_reservations > 0)
            .map(|(index, key)| (index, key.key.to_string()))
            .expect("a key with a reservation open");
        let held = open_on(&reference, &holder);
        assert_eq!(reference.keys[index].open_reservations, held, "as cut");
        let idle = reference
            .keys
            .iter()
            .find(|key| key.open_reservations == 0 && !key.payg)
            .map(|key| key.key.to_string())
            .expect("a key with none open");
        let mut ahead = reference.clone();
        ahead.keys[index].open_reservations += 1;
        let position = |key: &str| ahead.keys.iter().position(|k| &*k.key == key);
        let idle_index = position(&idle).expect("the idle key");
        ahead.keys[idle_index].open_reservations = 2;
        let restored = blank_engine();
        restored.restore(&ahead).expect("restore");
        let open = |key: &str| restored.usage(key, None).expect("usage").open_reservations;
        assert_eq!(
            open(&holder),
            held,
            "{holder}: counted one ahead in the snapshot"
        );
        assert_eq!(open(&idle), 0, "{idle}: counted two with none open");
        let mut behind = reference.clone();
        behind.keys[index].open_reservations = 0;
        let error = blank_engine()
            .restore(&behind)
            .expect_err("reservations open on a key that counts none")
            .to_string();
        assert!(
            error.contains("snapshot 9") && error.contains(&format!("{holder:?}")),
            "{error}"
        );
    }

    /// A calendar counter's period past the 16 bits its word tells apart, or a ring's head past
    /// the range of timestamps, is damage, refused by the restore and named, as the replay
    /// refuses such a move: restored, the period tripped a debug assertion packing the word (in
    /// a release build its high bits were lost), and the head made the key's next admission
    /// overflow computing its bucket's start.
    #[test]
    fn a_period_or_head_past_the_range_of_timestamps_is_refused_at_restore() {
        let (engine, _clock) = busy_engine();
        let reference = engine.cut(|| 9).expect("cut");
        for (calendar, far) in [
            (true, 1u64 << 16),
            (true, u64::from(u32::MAX)),
            (false, 1 << 50),
        ] {
            let mut snapshot = reference.clone();
            let found = snapshot.keys.iter_mut().find_map(|key| {
                key.counters
                    .as_mut()?
                    .iter_mut()
                    .find_map(|(_, counter)| match counter {
                        CounterSnapshot::Calendar { period, .. } if calendar => {
                            *period = far as u32;
                            Some(())
                        }
                        CounterSnapshot::Rolling { head, .. } if !calendar => {
                            *head = far;
                            Some(())
                        }
                        _ => None,
                    })
            });
            found.expect("a counter of that kind");
            for bytes in [
                snapshot_encoding().serialize(&snapshot).expect("encoding"),
                in_format_3(&snapshot),
            ] {
                let restored = blank_engine();
                let error = decode_snapshot(&bytes, 9)
                    .and_then(|decoded| restored.restore(&decoded))
                    .expect_err("a period or head past the range of timestamps")
                    .to_string();
                assert!(
                    error.contains("snapshot 9") && error.contains(&far.to_string()),
                    "{error}"
                );
            }
        }
    }

    /// What `verify` says of a snapshot that does not match a replay: the first field and
    /// item that differ, both sides, or what one side has more of.
    #[test]
    fn a_mismatch_names_the_first_item_that_differs() {
        let (engine, _clock) = busy_engine();
        let replayed = engine.cut(|| 7).expect("cut").in_name_order();
        assert_eq!(first_difference(&replayed, &replayed), "");
        let mut stored = replayed.clone();
        stored.teams[0].balance_micros += 1;
        let said = first_difference(&replayed, &stored);
        assert!(said.starts_with(": teams[0]: the replay has "), "{said}");
        let (replay_side, stored_side) = said.split_once(", the snapshot ").expect("both sides");
        assert!(
            replay_side.contains(&format!(
                "balance_micros: {}",
                replayed.teams[0].balance_micros
            )) && stored_side.contains(&format!(
                "balance_micros: {}",
                stored.teams[0].balance_micros
            )),
            "{said}"
        );
        let mut stored = replayed.clone();
        let extra = stored.keys.pop().expect("a key");
        let said = first_difference(&replayed, &stored);
        assert!(
            said.starts_with(": keys: the replay has 1 more than the snapshot, the first ")
                && said.contains(&format!("{:?}", extra.key)),
            "{said}"
        );
        // A snapshot ahead of the replay in reservation ids (an open skipped ids an earlier run
        // may have handed out) is no difference; one behind it would hand out an id again.
        let mut stored = replayed.clone();
        stored.next_reservation += 1;
        assert_eq!(first_difference(&replayed, &stored), "");
        let mut ahead = replayed.clone();
        ahead.next_reservation += 1;
        assert_eq!(
            first_difference(&ahead, &replayed),
            format!(
                ": next_reservation: the replay has {}, the snapshot {}, which would hand out an \
                 id again",
                ahead.next_reservation, replayed.next_reservation
            )
        );
    }

    /// A request id an earlier build remembered for a denial for want of a valid key (logged
    /// as `RequestDenied`, or in its snapshot) is not restored: this build neither remembers
    /// nor logs one (`idempotency::remembers`), so after an upgrade the id is decided anew
    /// once the key exists, as it would be had this build denied it, and takes no place in
    /// the table every key shares. It had come back from the log and answered its old
    /// `UnknownKey` for the rest of the horizon (found in review).
    #[test]
    fn an_earlier_builds_unknown_key_denial_is_not_restored_under_its_id() {
        let dir = fresh_dir("old-unknown-key-denial");
        let engine = seated_on_disk(&dir, "Max", OpenOptions::default());
        assert!(engine
            .consume(&m27("tp-u", 1, T0).id("kept"))
            .expect("valid")
            .is_admitted());
        let latest = engine.checkpoint().expect("a snapshot");
        let quantities = Quantities::new(m27("tp-later", 1, T0).quantities).expect("quantities");
        // What an earlier build logged for a key it did not know.
        engine
            .commit(
                T0,
                EventBody::RequestDenied {
                    request_id: "stray-logged".into(),
                    key: "tp-later".into(),
                    resource: "m2.7".into(),
                    quantities,
                    decision: Decision::denied(crate::admission::DenialReason::UnknownKey),
                },
            )
            .expect("logged");
        drop(engine);
        // And what its snapshot kept of one.
        rewrite_snapshot(&dir, latest, |snapshot| {
            let kept = snapshot.requests.first().expect("the id's record").clone();
            snapshot.requests.push(RequestSnapshot {
                id: "stray-snapshot".into(),
                key: "tp-later".into(),
                decision: Decision::denied(crate::admission::DenialReason::UnknownKey),
                receipt: None,
                ..kept
            });
        });
        let engine = Engine::open(
            &dir,
            Policy::token_plan(),
            Arc::new(ManualClock::new(T0)),
            OpenOptions::default(),
        )
        .expect("reopen");
        engine
            .create_user("later", "tp-later", Some(T0))
            .expect("the key now");
        engine
            .assign_seat("@later", "later", "Max", Some(T0))
            .expect("its seat");
        for id in ["stray-logged", "stray-snapshot"] {
            let (decision, replayed) = engine
                .consume_noting_replay(&m27("tp-later", 1, T0).id(id))
                .expect("valid");
            assert!(
                decision.is_admitted() && !replayed,
                "{id}: the earlier build's denial came back: {decision:?}, replayed {replayed}"
            );
        }
        // The admitted id still is remembered.
        let (_, replayed) = engine
            .consume_noting_replay(&m27("tp-u", 1, T0).id("kept"))
            .expect("a repeat");
        assert!(replayed, "the admitted id was forgotten");
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `verify` of a database an earlier build wrote, whose snapshots both keep a request id it
    /// remembered for a denial for want of a valid key (logged between them), finds the
    /// replay matching: this build's replay leaves such an id out, as its restore does, so
    /// the comparison leaves it out of both (found in review: the replay had one fewer).
    #[test]
    fn verify_ignores_an_earlier_builds_unknown_key_denial_in_its_snapshots() {
        let dir = fresh_dir("verify-old-unknown-key-denial");
        let engine = seated_on_disk(&dir, "Max", OpenOptions::default());
        assert!(engine
            .consume(&m27("tp-u", 1, T0).id("kept"))
            .expect("valid")
            .is_admitted());
        engine.checkpoint().expect("the previous snapshot");
        let quantities = Quantities::new(m27("tp-later", 1, T0).quantities).expect("quantities");
        let denial = Decision::denied(crate::admission::DenialReason::UnknownKey);
        engine
            .commit(
                T0,
                EventBody::RequestDenied {
                    request_id: "stray".into(),
                    key: "tp-later".into(),
                    resource: "m2.7".into(),
                    quantities,
                    decision: denial,
                },
            )
            .expect("logged");
        let latest = engine.checkpoint().expect("the latest snapshot");
        drop(engine);
        // The earlier build's latest snapshot remembered the id it logged.
        rewrite_snapshot(&dir, latest, |snapshot| {
            let kept = snapshot.requests.first().expect("the id's record").clone();
            snapshot.requests.push(RequestSnapshot {
                id: "stray".into(),
                key: "tp-later".into(),
                decision: denial,
                receipt: None,
                ..kept
            });
        });
        let report = Engine::verify(&dir, OpenOptions::default()).expect("verify");
        assert!(
            report.is_sound() && report.snapshot_matches_replay == Some(true),
            "{:?}",
            report.problems
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A snapshot's request id whose id, key or resource is longer than any request may name
    /// (its crc sound: damage a crc does not catch) is refused at open, naming the snapshot,
    /// the id and the field. It had panicked the open: the record encoded both lengths as u16s
    /// and `expect`ed that they fit (found in review).
    #[test]
    fn a_snapshot_request_named_longer_than_a_request_may_is_refused() {
        for (field, len) in [
            ("key", 129),
            ("key", 70_000),
            ("resource", 65),
            ("resource", 70_000),
            ("id", 129),
        ] {
            let dir = fresh_dir(&format!("long-request-{field}-{len}"));
            let engine = seated_on_disk(&dir, "Max", OpenOptions::default());
            assert!(engine
                .consume(&m27("tp-u", 1, T0).id("retried"))
                .expect("valid")
                .is_admitted());
            let latest = engine.checkpoint().expect("a snapshot");
            drop(engine);
            rewrite_snapshot(&dir, latest, |snapshot| {
                let request = snapshot.requests.first_mut().expect("the id's record");
                let long = "r".repeat(len);
                match field {
                    "key" => request.key = long,
                    "resource" => request.resource = long,
                    _ => request.id = long,
                }
            });
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Engine::open(
                    &dir,
                    Policy::token_plan(),
                    Arc::new(ManualClock::new(T0)),
                    OpenOptions::default(),
                )
                .map(drop)
            }));
            let Ok(Err(error)) = opened else {
                panic!("{field} of {len} bytes: the open did not refuse: {opened:?}");
            };
            let text = error.to_string();
            assert!(
                text.contains(&format!("its {field} is {len} bytes"))
                    && text.contains(&format!("snapshot {latest}")),
                "{field} of {len} bytes: {text}"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// A latest snapshot the restore refuses (its crc sound) is reported as the snapshot's
    /// problem, not as the events after it failing to replay.
    #[test]
    fn verify_names_a_snapshot_its_restore_refuses() {
        let dir = fresh_dir("verify-restore");
        let engine = seated_on_disk(&dir, "Max", OpenOptions::default());
        assert!(engine
            .consume(&m27("tp-u", 1, T0))
            .expect("valid")
            .is_admitted());
        let latest = engine.checkpoint().expect("the snapshot verify checks");
        drop(engine);
        // The latest snapshot with a bucket counting more than any slot holds.
        rewrite_snapshot(&dir, latest, |snapshot| {
            let bucket = snapshot
                .keys
                .iter_mut()
                .filter_map(|key| key.counters.as_mut())
                .flat_map(|counters| counters.iter_mut())
                .find_map(|(_, counter)| match counter {
                    CounterSnapshot::Rolling { buckets, .. } => buckets.first_mut(),
                    _ => None,
                })
                .expect("a rolling window with usage");
            bucket.1 = 1 << 32;
        });
        let report = Engine::verify(&dir, OpenOptions::default()).expect("verify");
        assert!(
            report
                .problems
                .iter()
                .any(|problem| problem.contains(&format!(
                    "the latest snapshot ({latest}) cannot be restored as an open restores it"
                )) && problem.contains(&(1u64 << 32).to_string())),
            "{:?}",
            report.problems
        );
        assert!(
            !report
                .problems
                .iter()
                .any(|problem| problem.contains("events after the latest snapshot")),
            "{:?}",
            report.problems
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `verify` compares the latest snapshot with a replay of the log: the keys a correction
    /// left short too, one way. The live engine marked every key the replay marks (as it
    /// applied the removal the replay reads), and may have marked more (a removal refused after
    /// marking, or an older snapshot's open working marks out cautiously): a snapshot missing
    /// a mark the log sets would let a reopened engine give back a short period's hold under
    /// the read lock, so it is a problem, named by its key.
    #[test]
    fn verify_finds_a_snapshot_missing_a_mark_its_log_sets() {
        let dir = fresh_dir("verify-marks");
        let engine = seated_on_disk(&dir, "Max", OpenOptions::default());
        let video = UsageRequest::new("tp-u", "hailuo-2.3-768p-6s", &[(Unit::Videos, 1)]);
        assert!(engine.consume(&video.at(T0)).expect("valid").is_admitted());
        engine
            .checkpoint()
            .expect("the snapshot verify replays from");
        engine
            .adjust_usage(
                "tp-u",
                "hailuo-2.3-768p-6s",
                &[(Unit::Videos, 1)],
                T0,
                AdjustmentDirection::Remove,
                Some(T0 + MINUTE),
            )
            .expect("a correction");
        let latest = engine.checkpoint().expect("the snapshot verify checks");
        drop(engine);
        let report = Engine::verify(&dir, OpenOptions::default()).expect("verify");
        assert!(report.is_sound(), "{:?}", report.problems);
        // The latest snapshot without its list of short keys.
        rewrite_snapshot(&dir, latest, |snapshot| {
            assert_eq!(snapshot.short_keys.len(), 1, "{:?}", snapshot.short_keys);
            snapshot.short_keys.clear();
        });
        let report = Engine::verify(&dir, OpenOptions::default()).expect("verify");
        assert!(
            report
                .problems
                .iter()
                .any(|problem| problem.contains(&format!("snapshot {latest}"))
                    && problem.contains("\"tp-u\"")),
            "{:?}",
            report.problems
        );
        assert_eq!(report.snapshot_matches_replay, Some(false));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A seat given while the member's key is revoked and a new one given in its place goes
    /// where a replay of the log puts it. The seat change found the member's key before the
    /// rotation and logged its event after it; a replay finds the member's key by name at the
    /// event, the new one: the live engine had seated the revoked key, the reopened one the
    /// new key.
    #[test]
    fn a_seat_given_while_the_members_key_is_rotated_is_where_a_replay_puts_it() {
        let dir = fresh_dir("seat-rotated");
        let clock = Arc::new(ManualClock::new(T0));
        let engine = Arc::new(
            Engine::open(&dir, Policy::token_plan(), clock, OpenOptions::default()).expect("open"),
        );
        engine.create_user("u", "tp-u", Some(T0)).expect("user");
        engine.create_team("acme", Some(T0)).expect("team");
        engine
            .add_member("acme", "u", "acme-u-1", Some(T0))
            .expect("member");
        {
            let engine = Arc::clone(&engine);
            crate::engine::BEFORE_SEAT_CHANGE.with(|pause| {
                *pause.borrow_mut() = Some(Box::new(move || {
                    engine.revoke_key("acme-u-1", Some(T0)).expect("revoke");
                    engine
                        .add_member("acme", "u", "acme-u-2", Some(T0))
                        .expect("a new key in its place");
                }));
            });
        }
        let seated = engine.assign_seat("acme", "u", "Plus", Some(T0));
        crate::engine::BEFORE_SEAT_CHANGE.with(|pause| pause.borrow_mut().take());
        seated.expect("seat");
        let plans = |engine: &Engine| {
            ["acme-u-1", "acme-u-2"].map(|key| engine.usage(key, Some(T0)).expect("key").plan)
        };
        let live = plans(&engine);
        drop(Arc::into_inner(engine).expect("the only handle"));
        let clock = Arc::new(ManualClock::new(T0));
        let reopened =
            Engine::open(&dir, Policy::token_plan(), clock, OpenOptions::default()).expect("open");
        assert_eq!(live, plans(&reopened), "live, then replayed");
        assert_eq!(
            live,
            [None, Some("Plus".to_string())],
            "the member's key is seated"
        );
        drop(reopened);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A swap that drops a revoked key's plan replays as it ran: the key loses its seat at the
    /// swap's point of the log (revoked by then), and the snapshot after it matches a replay.
    #[test]
    fn a_swap_dropping_a_revoked_keys_plan_replays_as_it_ran() {
        let dir = fresh_dir("swap-revoked");
        let engine = seated_on_disk(&dir, "Starter", OpenOptions::default());
        assert!(engine
            .consume(&m27("tp-u", 1, T0))
            .expect("valid")
            .is_admitted());
        engine
            .checkpoint()
            .expect("the snapshot verify replays from");
        assert_eq!(engine.revoke_key("tp-u", Some(T0)), Ok(true));
        let mut document = Policy::token_plan().document().clone();
        assert!(document.plans.remove("Starter").is_some());
        engine
            .swap_policy(Policy::compile(document).expect("valid"), Some(T0 + 1))
            .expect("swap");
        let live = engine.usage("tp-u", Some(T0 + 1)).expect("key");
        drop(engine);
        let clock = Arc::new(ManualClock::new(T0 + 1));
        let reopened =
            Engine::open(&dir, Policy::token_plan(), clock, OpenOptions::default()).expect("open");
        assert_eq!(reopened.usage("tp-u", Some(T0 + 1)).expect("key"), live);
        assert_eq!(live.plan, None);
        reopened.checkpoint().expect("the snapshot verify checks");
        drop(reopened);
        let report = Engine::verify(&dir, OpenOptions::default()).expect("verify");
        assert!(report.is_sound(), "{:?}", report.problems);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A body's first byte tells its format: `[2 | 3, 0]` fixed-width, a varint from 4 on
    /// (format 5 adds the revoked keys at the end);
    /// a version this build does not read is refused by number.
    #[test]
    fn a_snapshot_body_says_its_format_in_its_first_bytes() {
        assert_eq!(snapshot_version(&[2, 0, 9, 9], 1).unwrap(), 2);
        assert_eq!(snapshot_version(&[3, 0], 1).unwrap(), 3);
        assert_eq!(snapshot_version(&[4, 0, 0], 1).unwrap(), 4);
        assert_eq!(snapshot_version(&[5, 0, 0], 1).unwrap(), 5);
        for (bytes, said) in [
            (
                &[6u8, 1][..],
                "format version 6; this build reads versions 2 to 5: upgrade",
            ),
            (&[1, 0], "format version 1"),
        ] {
            let error = snapshot_version(bytes, 7).unwrap_err().to_string();
            assert!(
                error.contains("snapshot 7") && error.contains(said),
                "{error}"
            );
        }
        let error = snapshot_version(&[], 7).unwrap_err().to_string();
        assert!(error.contains("cannot read its version"), "{error}");
        // A format-4 body cut short is damage, named by its snapshot.
        let (engine, _clock) = busy_engine();
        let bytes = snapshot_encoding()
            .serialize(&engine.cut(|| 9).expect("cut"))
            .expect("encoding");
        let error = decode_snapshot(&bytes[..bytes.len() / 2], 9).unwrap_err();
        assert!(
            error.to_string().contains("snapshot 9 is damaged"),
            "{error}"
        );
    }

    #[test]
    fn the_raw_cut_makes_the_snapshot_the_locked_gathering_made() {
        let (engine, _clock) = busy_engine();
        // Revoked keys: a team member's, given a new key in its place (the old key leaves the
        // team's members but not the key table), a pay-as-you-go one and a long-named one.
        let t1 = T0 + 8 * DAY;
        for key in ["acme-4", "payg-7", "tp-with-a-long-name-12"] {
            assert_eq!(engine.revoke_key(key, Some(t1 + DAY)), Ok(true));
        }
        engine
            .add_member("acme", "user-4", "acme-4-again", Some(t1 + DAY))
            .expect("a new key in its place");
        let reference = engine.cut_reference(4_242);
        let snapshot = engine.cut(|| 4_242).expect("cut");
        // Every kind of state is there, so the comparison covers it.
        let counters: Vec<&CounterSnapshot> = reference
            .keys
            .iter()
            .flat_map(|key| key.counters.iter().flatten().map(|(_, counter)| counter))
            .collect();
        let rings = |wide: bool| {
            counters
                .iter()
                .filter(|counter| {
                    matches!(counter, CounterSnapshot::Rolling { wide: w, buckets, .. }
                        if *w == wide && buckets.len() > 1)
                })
                .count()
        };
        assert!(rings(false) > 10 && rings(true) > 10);
        assert!(counters.iter().any(
            |counter| matches!(counter, CounterSnapshot::Calendar { count, .. } if *count > 0)
        ));
        assert!(reference.keys.iter().any(|key| key.time_floor_ms > 0));
        assert!(reference
            .keys
            .iter()
            .any(|key| key.payg && key.payg_micros > 0));
        assert!(reference.keys.iter().any(|key| {
            let plan = key
                .seat
                .map_or(0, |seat| engine.policy().plan(PlanId(seat)).limits.len());
            key.counters
                .as_ref()
                .is_some_and(|counters| counters.len() > plan)
        }));
        assert!(reference.teams.iter().any(|team| team.members.len() == 3));
        assert!(reference.requests.len() == 41);
        assert!(reference
            .requests
            .iter()
            .any(|request| request.receipt.is_none()));
        assert!(reference.open_reservations.len() >= 2);
        assert_eq!(reference.closed_reservations.len(), 2);
        assert!(reference.users.iter().any(|user| !user.2.is_empty()));
        assert!(reference
            .short_keys
            .iter()
            .any(|(key, until)| &**key == "acme-3" && *until > 0));
        assert_eq!(
            reference.revoked_keys.len(),
            3,
            "{:?}",
            reference.revoked_keys
        );

        assert_eq!(snapshot, reference);
        let bytes = snapshot_encoding().serialize(&reference).expect("encoding");
        assert_eq!(
            snapshot_encoding().serialize(&snapshot).expect("encoding"),
            bytes,
            "the snapshot's bytes changed"
        );
        // What a checkpoint writes: the bytes straight from the cut.
        let written = encoded_in_name_order(&mut engine.cut_raw(|| 4_242));
        assert_eq!(written, reference);

        // And a restored engine cuts to the same snapshot again.
        let restored = restored_from(&bytes, 4_242);
        assert_eq!(restored.cut(|| 4_242).expect("cut"), reference);
        assert_eq!(restored.cut_reference(4_242), reference);

        // A later cut reuses the buffers of the one before (emptied): still the same.
        let t2 = T0 + 8 * DAY + 3 * 60 * MINUTE;
        for step in 0..500u64 {
            let key = format!("tp-{}", (step * 13) % 300);
            let _ = engine.consume(&m27(&key, 1 + step % 4, t2 + step * MINUTE / 7));
        }
        engine
            .create_user("late", "tp-late", Some(t2))
            .expect("user");
        let reference = engine.cut_reference(5_000);
        assert_ne!(reference.keys, snapshot.keys);
        assert_eq!(engine.cut(|| 5_000).expect("cut"), reference);
        let written = encoded_in_name_order(&mut engine.cut_raw(|| 5_000));
        assert_eq!(written, reference);
    }

    /// A checkpoint's bytes for `cut` (`RawCut::encode`), checked to be the bytes of the cut's
    /// own `Snapshot` (field for field, in the order the cut copied), and to decode to it; that
    /// snapshot in name order.
    fn encoded_in_name_order(cut: &mut RawCut) -> Snapshot<'static> {
        let written = cut.encode().expect("encoding").to_vec();
        let snapshot = cut.to_snapshot();
        assert!(
            written == snapshot_encoding().serialize(&snapshot).expect("encoding"),
            "RawCut::encode wrote other bytes than its snapshot's"
        );
        let decoded = decode_snapshot(&written, snapshot.seq).expect("decoding");
        assert_eq!(decoded, snapshot);
        snapshot.in_name_order()
    }

    #[test]
    fn a_cut_is_the_state_at_its_instant_whoever_copies_its_shards_and_whatever_changes_after() {
        let (engine, clock) = busy_engine();
        for round in 0..3u64 {
            let reference = engine.cut_reference(4_242);
            let mut full = engine.cut_raw(|| 4_242);
            full.finish_copies().expect("every shard copied");
            let usage_bytes = full.usage_bytes;
            assert!(usage_bytes > 0);
            engine.cuts.give_back(full);
            let mut cut = engine.cut_raw(|| 4_242 + round);
            // No shard copied yet, nor the registry.
            assert_eq!(cut.shards_left(), KeyTable::SHARDS);
            assert!(cut.registry_left());
            // Then, before the cut is finished: usage on most keys, a new user and key, a
            // seat changed, credits topped up, from this thread and another. Each shard they
            // touch is copied first, as the cut left it.
            let at_ms = clock.now_ms();
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    for index in (0..300u64).step_by(2) {
                        let _ = engine.consume(&m27(&format!("tp-{index}"), 1, at_ms));
                    }
                    // New request ids, in most of the request-id shards.
                    for index in 0..200u64 {
                        let id = format!("after-the-cut-{round}-{index}");
                        let key = format!("tp-{}", index % 300);
                        let _ = engine.consume(&m27(&key, 1, at_ms).id(&id));
                    }
                });
                for index in (1..300u64).step_by(2) {
                    let _ = engine.consume(&m27(&format!("tp-{index}"), 2, at_ms));
                }
            });
            let user = format!("late-user-{round}");
            engine
                .create_user(&user, &format!("late-key-{round}"), Some(at_ms))
                .expect("user");
            engine
                .assign_seat(&format!("@{user}"), &user, "Max", Some(at_ms))
                .expect("seat");
            engine
                .assign_seat("@user-4", "user-4", "Max", Some(at_ms))
                .expect("seat");
            engine
                .top_up("@user-7", 5_000_000, Some(at_ms))
                .expect("top-up");
            let left = cut.shards_left();
            assert!(left < KeyTable::SHARDS / 2, "{left} shards left");
            // The new user's creation copied the registry first, as the cut left it.
            assert!(!cut.registry_left());
            assert!(
                !reference.requests.is_empty(),
                "ids from before the cut are in it"
            );
            cut.seq = 4_242;
            let written = encoded_in_name_order(&mut cut);
            assert_eq!(written, reference, "round {round}");
            assert_eq!(
                cut.usage_bytes, usage_bytes,
                "the usage hint counts every key's"
            );
            engine.cuts.give_back(cut);
            let now = engine.cut_reference(6_000 + round);
            assert_ne!(now.keys, reference.keys);
            assert_ne!(now.teams, reference.teams);
            assert_eq!(engine.cut(|| 6_000 + round).expect("cut"), now);
        }
    }

    #[test]
    fn a_cut_taken_before_the_last_one_was_finished_finishes_it_first_and_each_is_its_instant() {
        let (engine, clock) = busy_engine();
        let at_ms = clock.now_ms();
        let first_reference = engine.cut_reference(10);
        let mut first = engine.cut_raw(|| 10);
        assert!(first.registry_left());
        // Credits and a new team between the two cuts: only the second has them.
        engine
            .top_up("@user-3", 7_000_000, Some(at_ms))
            .expect("top-up");
        engine.create_team("between", Some(at_ms)).expect("team");
        let _ = engine.consume(&m27("tp-3", 1, at_ms));
        assert!(
            !first.registry_left(),
            "the top-up copied the registry first"
        );
        let second_reference = engine.cut_reference(11);
        assert_ne!(second_reference.teams, first_reference.teams);
        // The second cut's locks run whatever copies of the first were still left.
        let mut second = engine.cut_raw(|| 11);
        assert_eq!(first.shards_left(), 0);
        assert!(second.registry_left());
        assert_eq!(encoded_in_name_order(&mut second), second_reference);
        assert_eq!(encoded_in_name_order(&mut first), first_reference);
        engine.cuts.give_back(first);
        engine.cuts.give_back(second);
    }

    #[test]
    fn credits_charged_until_the_key_shards_are_locked_are_in_the_cut_keys_and_balances_alike() {
        let (engine, clock) = busy_engine();
        let at_ms = clock.now_ms();
        // A key with no seat: every request is charged to its team's credits.
        engine
            .create_user("payer", "tp-payer", Some(at_ms))
            .expect("user");
        engine
            .top_up("@payer", 50_000_000, Some(at_ms))
            .expect("top-up");
        let charge = || {
            let decision = engine.consume(&m27("tp-payer", 3, at_ms)).expect("consume");
            assert!(decision.is_admitted(), "{decision:?}");
        };
        charge();
        let balance = || engine.credits_micros("@payer").expect("the team's balance");
        let before = balance();
        // Charged while every lock but the key shards' is held: the cut's instant is after it.
        let mut cut = engine.cut_raw_between(|| 20, charge);
        let reference = engine.cut_reference(20);
        assert!(balance() < before, "the charge moved the balance");
        assert_eq!(encoded_in_name_order(&mut cut), reference);
        engine.cuts.give_back(cut);
    }

    #[test]
    fn a_decoded_snapshot_borrows_every_name_from_its_bytes() {
        let (engine, _clock) = busy_engine();
        let bytes = snapshot_encoding()
            .serialize(&engine.cut(|| 7).expect("cut"))
            .expect("encoding");
        let decoded = decode_snapshot(&bytes, 7).expect("decoding");
        let borrowed = |name: &Name<'_>| matches!(name.0, Cow::Borrowed(_));
        assert!(!decoded.keys.is_empty() && !decoded.teams.is_empty());
        for key in &decoded.keys {
            assert!(
                borrowed(&key.key) && borrowed(&key.user) && borrowed(&key.team),
                "{key:?}"
            );
        }
        for team in &decoded.teams {
            assert!(
                borrowed(&team.name) && team.owner.iter().all(borrowed),
                "{team:?}"
            );
            assert!(team
                .members
                .iter()
                .all(|(user, key)| borrowed(user) && borrowed(key)));
        }
        assert!(decoded.users.iter().any(|user| !user.2.is_empty()));
        for (name, team, payg_keys) in &decoded.users {
            assert!(borrowed(name) && borrowed(team) && payg_keys.iter().all(borrowed));
        }
    }

    #[test]
    fn a_decoded_snapshot_travels_with_its_bytes_and_a_failed_decode_frees_them() {
        let (engine, _clock) = busy_engine();
        let reference = engine.cut(|| 7).expect("cut");
        // A file: a header (not read by the decode), then the body.
        let mut file = vec![0u8; 32];
        file.extend(snapshot_encoding().serialize(&reference).expect("encoding"));
        let decoded =
            DecodedSnapshot::decode(SnapshotBytes::from_file(file.clone()), 7).expect("decoding");
        let elsewhere = std::thread::spawn(move || {
            assert_eq!(*decoded.snapshot(), reference);
            drop(decoded);
        });
        elsewhere.join().expect("the other thread");
        file.truncate(file.len() - 9);
        let error = DecodedSnapshot::decode(SnapshotBytes::from_file(file), 7)
            .err()
            .expect("a cut body");
        assert!(
            error.to_string().contains("snapshot 7 is damaged"),
            "{error}"
        );
    }

    #[test]
    fn a_restored_engine_keeps_one_copy_of_each_user_name() {
        let (engine, _clock) = busy_engine();
        let bytes = snapshot_encoding()
            .serialize(&engine.cut(|| 7).expect("cut"))
            .expect("encoding");
        let restored = restored_from(&bytes, 7);
        let registry = restored.registry.lock();
        let mut keys_seen = 0;
        for shard in restored.keys.lock_all().iter() {
            for (key, state) in shard.iter() {
                let (name, _) = registry
                    .users
                    .get_key_value(&*state.user)
                    .unwrap_or_else(|| panic!("{key}: its user has a record"));
                assert!(
                    Arc::ptr_eq(name, &state.user),
                    "{key}: a copy of its user's name"
                );
                keys_seen += 1;
            }
        }
        assert!(keys_seen > 100, "the busy engine has its keys back");
        for (team, record) in &registry.teams {
            for user in record.members.keys().chain(record.owner.iter()) {
                let (name, _) = registry
                    .users
                    .get_key_value(user)
                    .expect("a member's record");
                assert!(Arc::ptr_eq(name, user), "{team}: a copy of {user}'s name");
            }
        }
    }

    #[test]
    fn every_cut_is_timed() {
        let (engine, _clock) = busy_engine();
        assert!(engine.cut_lock_times().is_empty());
        engine.cut(|| 1).expect("cut");
        engine.cut(|| 2).expect("cut");
        assert_eq!(engine.cut_lock_times().len(), 2);
    }

    /// A replayed usage event of an older policy generation (a `consume_many` chunk decided
    /// before a swap and appended after it) goes through that generation's counters, as one of
    /// the current generation does through the current ones.
    #[test]
    fn a_replayed_receipt_of_an_older_generation_counts_like_a_current_one() {
        let dir = fresh_dir("older");
        let engine = seated_on_disk(&dir, "Plus", OpenOptions::default());
        assert!(engine
            .consume(&m27("tp-u", 2, T0))
            .expect("valid")
            .is_admitted());
        let receipt = first_usage_receipt(&engine);
        let used = |engine: &Engine| -> Vec<u64> {
            let report = engine.usage("tp-u", Some(T0)).expect("usage");
            report.limits.iter().map(|limit| limit.used).collect()
        };
        let once = used(&engine);
        assert!(once.iter().any(|used| *used > 0), "{once:?}");
        // The current generation's receipt, applied again: every counter the request touched
        // counts it twice.
        engine
            .apply_receipt("tp-u", None, &receipt, &mut Debts::default())
            .expect("applied");
        let twice = used(&engine);
        assert_eq!(twice, once.iter().map(|used| 2 * used).collect::<Vec<_>>());
        // The same receipt once the policy has moved on a generation: looked up, translated.
        engine
            .swap_policy(Policy::token_plan(), Some(T0))
            .expect("swap");
        assert_eq!(engine.policy().generation, receipt.generation + 1);
        engine
            .apply_receipt(
                "tp-u",
                Some(KeyTable::hash("tp-u")),
                &receipt,
                &mut Debts::default(),
            )
            .expect("applied");
        assert_eq!(
            used(&engine),
            once.iter().map(|used| 3 * used).collect::<Vec<_>>()
        );
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The receipt of the first usage event in the log.
    fn first_usage_receipt(engine: &Engine) -> Receipt {
        engine
            .events_after(0, usize::MAX)
            .expect("events")
            .into_iter()
            .find_map(|event| match event.body {
                EventBody::UsageAdmitted { receipt, .. } => Some(receipt),
                _ => None,
            })
            .expect("the usage event")
    }

    /// A policy of one resource and plans of one 5-hour limit each, `(plan, bucket)`.
    fn five_hour_plans(plans: &[(&str, &str)]) -> Policy {
        let mut document =
            "time_zone = \"UTC\"\n[resources.chat]\nunits = [\"requests\"]\n".to_string();
        for (plan, bucket) in plans {
            document.push_str(&format!(
                "[plans.{plan}]\nlimits = [{{ resource = \"chat\", unit = \"requests\", amount = \
                 1000, window = \"rolling:5h\", bucket = \"{bucket}\" }}]\n"
            ));
        }
        Policy::from_toml_str(&document).expect("a valid policy")
    }

    /// The same after swaps that change the bucket width: the older generation's units go
    /// where the swaps put the usage counted before them, not to the bucket of the same number
    /// in the new width. Each case uses 60 requests at 0:40 past an hour, seated on B.
    /// - Two swaps, 10 m -> 12 m -> 10 m: [40, 50) goes to [48, 60), then to [50, 60). Before,
    ///   a 10-minute bucket's number was used as a 12-minute one's (an hour and a half late).
    /// - One swap where B's 10-minute buckets become 12-minute ones beside A's hourly ones:
    ///   the swap carries B's counter to A's (the first of the same span), then B's limit takes
    ///   it over (`KeyUsage::rearranged`): [40, 50) goes to [0, 60), then to [48, 60). Before,
    ///   the move went to A's counter, which the key does not have, and was dropped.
    ///
    /// Either way, both sixties leave together, when the last bucket does (at 6:00).
    #[test]
    fn a_replayed_receipt_of_an_older_generation_lands_where_the_swaps_put_its_usage() {
        // (label, the first policy's plans, each swap's plans): plans as `(name, bucket)`.
        type Plans<'a> = &'a [(&'a str, &'a str)];
        let cases: [(&str, Plans<'_>, &[Plans<'_>]); 2] = [
            (
                "older-width",
                &[("B", "10m")],
                &[&[("B", "12m")], &[("B", "10m")]],
            ),
            (
                "older-span",
                &[("A", "1h"), ("B", "10m")],
                &[&[("A", "1h"), ("B", "12m")]],
            ),
        ];
        let hour = 60 * MINUTE;
        let base = T0.next_multiple_of(hour);
        let at_ms = base + 40 * MINUTE;
        for (label, first, swaps) in cases {
            let dir = fresh_dir(label);
            let clock = Arc::new(ManualClock::new(at_ms));
            let policy = five_hour_plans(first);
            let engine = Engine::open(&dir, policy, clock, OpenOptions::default()).expect("open");
            engine.create_user("u", "k", Some(at_ms)).expect("user");
            engine
                .assign_seat("@u", "u", "B", Some(at_ms))
                .expect("seat");
            let sixty = [(Unit::Requests, 60)];
            let request = UsageRequest::new("k", "chat", &sixty).at(at_ms);
            assert!(engine.consume(&request).expect("valid").is_admitted());
            let receipt = first_usage_receipt(&engine);
            for (minutes, plans) in (41..).zip(swaps.iter()) {
                engine
                    .swap_policy(five_hour_plans(plans), Some(base + minutes * MINUTE))
                    .expect("swap");
            }
            engine
                .apply_receipt("k", None, &receipt, &mut Debts::default())
                .expect("applied");
            let used = |at_ms: u64| engine.usage("k", Some(at_ms)).expect("usage").limits[0].used;
            assert_eq!(used(base + 43 * MINUTE), 120, "{label}");
            assert_eq!(used(base + 5 * hour + 59 * MINUTE), 120, "{label}");
            assert_eq!(used(base + 6 * hour), 0, "{label}");
            drop(engine);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// Replay hands events over in batches of `REPLAY_BATCH` and applies each `REPLAY_AHEAD`
    /// behind: a log of two full batches and a last one shorter than the look-ahead reopens
    /// to exactly the state it was closed with.
    #[test]
    fn a_log_of_whole_batches_and_a_short_last_one_replays_every_event() {
        let dir = fresh_dir("batches");
        let options = || OpenOptions {
            durability: Durability::None,
            checkpoint_every_events: u64::MAX,
            ..OpenOptions::default()
        };
        let keys: Vec<String> = (0..7).map(|index| format!("tp-{index}")).collect();
        let clock = Arc::new(ManualClock::new(T0));
        let engine =
            Engine::open(&dir, Policy::token_plan(), clock.clone(), options()).expect("open");
        for (index, key) in keys.iter().enumerate() {
            let user = format!("u-{index}");
            engine.create_user(&user, key, Some(T0)).expect("user");
            engine
                .assign_seat(&format!("@{user}"), &user, "Max", Some(T0))
                .expect("seat");
        }
        let wanted = 2 * REPLAY_BATCH as u64 + 3;
        let journal = engine.journal().expect("a log");
        let mut step = 0u64;
        while journal.last_appended() < wanted {
            let key = &keys[(step % 7) as usize];
            let at_ms = T0 + step * 7 * MINUTE / 10;
            // The requests come as the time passes (over four days in all).
            clock.set_ms(at_ms);
            assert!(engine
                .consume(&m27(key, 1 + step % 4, at_ms))
                .expect("valid")
                .is_admitted());
            step += 1;
        }
        assert_eq!(journal.last_appended(), wanted);
        let at_ms = T0 + step * 7 * MINUTE / 10;
        let state = |engine: &Engine| -> Vec<Vec<u64>> {
            keys.iter()
                .map(|key| {
                    let report = engine.usage(key, Some(at_ms)).expect("usage");
                    report.limits.iter().map(|limit| limit.used).collect()
                })
                .collect()
        };
        let before = state(&engine);
        assert!(before.iter().flatten().any(|used| *used > 0));
        engine.close().expect("close");
        // Replayed from the first event, past the checkpoint close() took.
        let reopened = {
            let clock = Arc::new(ManualClock::new(at_ms));
            let engine = Engine::new(Policy::token_plan(), clock, EngineOptions::default())
                .expect("valid options");
            let segment_bytes = OpenOptions::default().segment_bytes;
            let log =
                EventLog::open_with(&dir, Durability::None, None, segment_bytes).expect("log");
            let replayed = engine.replay_log(&log, 0, u64::MAX).expect("replay");
            assert_eq!(replayed, wanted);
            drop(log);
            engine
        };
        assert_eq!(state(&reopened), before);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// From `PARALLEL_RESTORE_KEYS` keys and `PARALLEL_RESTORE_TEAMS` teams on, a snapshot's keys
    /// and teams are restored on two threads: such a snapshot, with keys of both halves seated,
    /// used, in teams with members and credits, restores to an engine that cuts to it again.
    #[test]
    fn a_snapshot_of_many_keys_and_teams_restored_on_two_threads_cuts_to_itself() {
        let clock = Arc::new(ManualClock::new(T0));
        let engine = Engine::new(Policy::token_plan(), clock, EngineOptions::default())
            .expect("valid options");
        let users = PARALLEL_RESTORE_KEYS.max(PARALLEL_RESTORE_TEAMS) + 100;
        for index in 0..users {
            let user = format!("user-{index}");
            let key = format!("tp-{index}");
            engine.create_user(&user, &key, Some(T0)).expect("user");
            if index % 4 != 0 {
                engine
                    .assign_seat(&format!("@{user}"), &user, "Plus", Some(T0))
                    .expect("seat");
            }
            if index % 3 == 0 {
                let _ = engine.consume(&m27(&key, 1 + index as u64 % 4, T0 + MINUTE));
            }
            // Every tenth user's Default Team has credits and a colleague as a member.
            if index % 10 == 9 {
                engine
                    .top_up(&format!("@{user}"), 1_000 + index as u64, Some(T0))
                    .expect("top-up");
                engine
                    .add_member(
                        &format!("@{user}"),
                        "user-0",
                        &format!("m-{index}"),
                        Some(T0),
                    )
                    .expect("member");
            }
        }
        let reference = engine.cut_reference(9);
        assert!(reference.keys.len() >= PARALLEL_RESTORE_KEYS);
        assert!(reference.teams.len() >= PARALLEL_RESTORE_TEAMS);
        let bytes = snapshot_encoding().serialize(&reference).expect("encoding");
        let restored = restored_from(&bytes, 9);
        assert_eq!(restored.cut_reference(9), reference);
        // The last key of the second half is there, and so is its usage.
        let last = format!("tp-{}", users - 1);
        assert_eq!(
            restored.usage(&last, Some(T0 + MINUTE)).expect("usage"),
            engine.usage(&last, Some(T0 + MINUTE)).expect("usage")
        );
    }

    /// Replay applies runs of usage events on two threads, each taking its own key shards,
    /// and every other event alone between runs: a log of long runs over keys of both
    /// appliers, paid from plan quota and from credits, some under request ids, between
    /// top-ups, reservations, settlements and refunds, replays to the state it was closed with.
    #[test]
    fn long_usage_runs_between_other_events_replay_on_two_appliers_to_the_same_state() {
        let dir = fresh_dir("appliers");
        let options = OpenOptions {
            durability: Durability::None,
            checkpoint_every_events: u64::MAX,
            ..OpenOptions::default()
        };
        let clock = Arc::new(ManualClock::new(T0));
        let engine = Engine::open(&dir, Policy::token_plan(), clock, options).expect("open");
        let keys: Vec<String> = (0..24).map(|index| format!("tp-{index}")).collect();
        let helped = keys
            .iter()
            .filter(|key| applier_of(KeyTable::hash(key)) == 1)
            .count();
        assert!(
            helped > 0 && helped < keys.len(),
            "{helped} of the keys are the helper's"
        );
        for (index, key) in keys.iter().enumerate() {
            let user = format!("u-{index}");
            engine.create_user(&user, key, Some(T0)).expect("user");
            // A key without a seat is paid from its Default Team's credits.
            if index % 3 != 0 {
                engine
                    .assign_seat(&format!("@{user}"), &user, "Plus", Some(T0))
                    .expect("seat");
            }
            engine
                .top_up(&format!("@{user}"), 500_000_000, Some(T0))
                .expect("top-up");
        }
        let mut at_ms = T0;
        let mut charged = [0u64; 2];
        for round in 0..6u64 {
            // A run of usage events well past `PARALLEL_REPLAY_RUN`.
            for step in 0..300u64 {
                at_ms += MINUTE / 20;
                let key = &keys[((round * 300 + step) * 7 % 24) as usize];
                let id = format!("r-{round}-{step}");
                let request = m27(key, 1 + step % 4, at_ms);
                let request = if step % 5 == 0 {
                    request.id(&id)
                } else {
                    request
                };
                let Decision::Admitted(admission) = engine.consume(&request).expect("valid") else {
                    panic!("{key} denied at {at_ms}");
                };
                let credits = matches!(admission.charged_to, ChargedTo::Credits { .. });
                charged[usize::from(credits)] += 1;
            }
            engine
                .top_up("@u-1", 1_000_000, Some(at_ms))
                .expect("top-up");
            let key = &keys[round as usize];
            let reserved = engine
                .reserve(&m27(key, 4, at_ms), None)
                .expect("valid")
                .reservation
                .expect("reserved");
            engine
                .settle(
                    reserved,
                    &[(Unit::Requests, 1), (Unit::Tokens, 500)],
                    Some(at_ms),
                )
                .expect("settled");
            engine
                .refund(&format!("r-{round}-0"), Some(at_ms))
                .expect("refunded");
        }
        assert!(
            charged[0] > 0 && charged[1] > 0,
            "quota and credits: {charged:?}"
        );
        let before = engine.cut_reference(1);
        engine.close().expect("close");
        // Replayed from the first event, past the checkpoint close() took.
        let clock = Arc::new(ManualClock::new(T0));
        let reopened = Engine::new(Policy::token_plan(), clock, EngineOptions::default())
            .expect("valid options");
        let segment_bytes = OpenOptions::default().segment_bytes;
        let log = EventLog::open_with(&dir, Durability::None, None, segment_bytes).expect("log");
        reopened.replay_log(&log, 0, u64::MAX).expect("replay");
        drop(log);
        let after = reopened.cut_reference(1);
        assert_eq!(normalized(&after, &before), normalized(&before, &before));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An open that replayed more than half the checkpoint interval leaves a checkpoint due:
    /// the first commit after it takes one covering everything replayed (its snapshot written
    /// in the background, landed at the latest as the log closes), and the next open replays
    /// only what came after it.
    #[test]
    fn an_open_that_replayed_a_long_tail_is_checkpointed_by_its_first_commit() {
        let dir = fresh_dir("open-cut");
        let open = |every: u64| {
            let clock = Arc::new(ManualClock::new(T0));
            let options = OpenOptions {
                durability: Durability::None,
                checkpoint_every_events: every,
                ..OpenOptions::default()
            };
            Engine::open(&dir, Policy::token_plan(), clock, options).expect("open")
        };
        let engine = open(u64::MAX);
        engine.create_user("u", "tp-u", Some(T0)).expect("user");
        engine
            .assign_seat("@u", "u", "Max", Some(T0))
            .expect("seat");
        for step in 0..300u64 {
            let request = m27("tp-u", 1, T0 + step * MINUTE);
            assert!(engine.consume(&request).expect("valid").is_admitted());
        }
        let last = engine.journal().expect("a log").last_appended();
        // Dropped without close(): no checkpoint, the whole log is a tail.
        drop(engine);
        let engine = open(400);
        // Nothing checkpointed yet: the open did not wait for it.
        assert!(engine.checkpoint_due.load(Ordering::Relaxed));
        assert_eq!(engine.checkpointed_seq.load(Ordering::Relaxed), 0);
        // Far under the interval of 400 events since the open, yet the first commit cuts.
        let request = m27("tp-u", 1, T0 + 300 * MINUTE);
        assert!(engine.consume(&request).expect("valid").is_admitted());
        assert!(!engine.checkpoint_due.load(Ordering::Relaxed));
        assert_eq!(engine.checkpointed_seq.load(Ordering::Relaxed), last + 1);
        let used = engine.usage("tp-u", Some(T0 + DAY)).expect("usage");
        // Dropped without close(): the background snapshot lands as the log closes.
        drop(engine);
        let segment_bytes = OpenOptions::default().segment_bytes;
        let log = EventLog::open_with(&dir, Durability::None, None, segment_bytes).expect("log");
        let pointer = log.snapshot_pointer().expect("pointer");
        assert_eq!(pointer.map(|pointer| pointer.seq), Some(last + 1));
        drop(log);
        let engine = open(400);
        assert!(!engine.checkpoint_due.load(Ordering::Relaxed));
        assert_eq!(
            engine.usage("tp-u", Some(T0 + DAY)).expect("usage").limits,
            used.limits
        );
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A checkpoint records when its events were logged before it stores its snapshot, and
    /// durably: the open bounds the request ids a snapshot may have forgotten by that record,
    /// so a snapshot found without it (a crash between the two, when the record came after)
    /// let the retry of a forgotten id be decided and charged again. Here the snapshot cannot
    /// be stored (the folder is a file), the explicit checkpoint's and a periodic one's: the
    /// record is there all the same.
    #[test]
    fn a_checkpoint_records_when_its_events_were_logged_before_storing_its_snapshot() {
        let dir = fresh_dir("logged-by-first");
        let options = OpenOptions {
            durability: Durability::None,
            checkpoint_every_events: 20,
            ..OpenOptions::default()
        };
        let clock = Arc::new(ManualClock::new(T0));
        let engine = seated_on_disk_on(&dir, "Max", options, clock.clone());
        let journal = engine.journal().expect("on disk");
        let snapshots = dir.join("snapshots");
        std::fs::remove_dir_all(&snapshots).expect("the snapshots folder goes");
        std::fs::write(&snapshots, b"").expect("a file in its place");
        clock.set_ms(T0 + 1_000);
        let stored = engine.checkpoint();
        assert!(stored.is_err(), "no snapshot stored: {stored:?}");
        assert_eq!(
            journal.latest_logged_by_ms(),
            Some(T0 + 1_000),
            "after {stored:?}"
        );
        // A periodic one, on its own thread, a minute later on the clock.
        clock.set_ms(T0 + 60_000);
        let before = engine.checkpointed_seq.load(Ordering::Relaxed);
        let mut step = 0;
        while engine.checkpointed_seq.load(Ordering::Relaxed) == before {
            step += 1;
            assert!(step < 10_000, "no periodic checkpoint");
            let request = m27("tp-u", 1, T0 + step);
            assert!(engine.consume(&request).expect("valid").is_admitted());
        }
        let stored = journal.finish_snapshot_in_background();
        assert!(stored.is_err(), "no snapshot stored: {stored:?}");
        assert_eq!(journal.latest_logged_by_ms(), Some(T0 + 60_000));
        drop(engine);
        let _ = std::fs::remove_file(&snapshots);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A periodic checkpoint's thread that panics is `health`'s checkpoint failure as soon as
    /// it ends, and one whose compaction panics (its snapshot stored) is the compaction's: a
    /// panic was learnt only by the next periodic checkpoint's join (with no request crossing
    /// the next interval, never), always as the checkpoint's, and the thread that join started
    /// cleared it a request later by storing its snapshot, so a compaction panicking every
    /// time went unreported while the log grew.
    #[test]
    fn a_periodic_checkpoints_panic_is_reported_at_once_as_what_panicked() {
        let dir = fresh_dir("panicked");
        let faults = Faults::new();
        let options = OpenOptions {
            durability: Durability::None,
            checkpoint_every_events: 50,
            faults: Some(Arc::clone(&faults)),
            ..OpenOptions::default()
        };
        let engine = seated_on_disk(&dir, "Max", options);
        let step = std::cell::Cell::new(0);
        // Consumes until a periodic checkpoint's cut (it moves `checkpointed_seq`), then
        // waits (10 s at most) for `health` to say what `reported` reads.
        let periodic_then = |reported: &dyn Fn(&Health) -> bool| {
            let before = engine.checkpointed_seq.load(Ordering::Relaxed);
            while engine.checkpointed_seq.load(Ordering::Relaxed) == before {
                step.set(step.get() + 1);
                assert!(step.get() < 10_000, "no periodic checkpoint");
                let request = m27("tp-u", 1, T0 + step.get());
                assert!(engine.consume(&request).expect("valid").is_admitted());
            }
            let started = Instant::now();
            while !reported(&engine.health()) && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
            engine.health()
        };
        faults.panic_next_snapshots(1);
        let health = periodic_then(&|health| health.checkpoint_failure.is_some());
        let failure = health
            .checkpoint_failure
            .expect("the snapshot thread's panic");
        assert!(failure.contains("panicked"), "{failure}");
        assert_eq!(health.compaction_failure, None);
        faults.panic_next_compactions(1);
        let health = periodic_then(&|health| health.compaction_failure.is_some());
        let failure = health.compaction_failure.expect("the compaction's panic");
        assert!(failure.contains("panicked"), "{failure}");
        assert_eq!(health.checkpoint_failure, None, "its snapshot was stored");
        // The next compaction that runs clears it, and the thread ended without a failure
        // for the next checkpoint to learn.
        let health = periodic_then(&|health| health.is_healthy());
        assert!(health.is_healthy(), "{health:?}");
        engine.checkpoint().expect("checkpoint");
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A periodic checkpoint waits while the last one's cost says so (`pacing`), but never
    /// past twice the interval. An explicit `checkpoint` is never held back, and a cheap one
    /// lifts the wait.
    #[test]
    fn a_costly_checkpoint_holds_the_next_periodic_one_back() {
        let dir = fresh_dir("paced");
        let options = OpenOptions {
            durability: Durability::None,
            checkpoint_every_events: 50,
            ..OpenOptions::default()
        };
        let engine = seated_on_disk(&dir, "Max", options);
        let consume = |step: u64| {
            let request = m27("tp-u", 1, T0 + step * MINUTE);
            assert!(engine.consume(&request).expect("valid").is_admitted());
        };
        let log = || engine.journal().expect("a log");
        for step in 0..60 {
            consume(step);
        }
        let unpaced = engine.checkpointed_seq.load(Ordering::Relaxed);
        assert!(unpaced > 0, "a checkpoint every 50 events");
        // As if the last checkpoint's work had taken an hour: none for four hours... (Once its
        // snapshot thread has noted what it really cost, or that note, landing later, would
        // lift the wait: on a loaded machine it came in the middle of the loop below.)
        log()
            .finish_snapshot_in_background()
            .expect("the first checkpoint lands");
        engine
            .checkpoint_pacing
            .note(Instant::now(), Duration::from_secs(3_600));
        let mut step = 60;
        while log().last_appended() < unpaced + 99 {
            consume(step);
            step += 1;
        }
        assert_eq!(engine.checkpointed_seq.load(Ordering::Relaxed), unpaced);
        // ...unless the tail reaches twice the interval.
        consume(step);
        step += 1;
        let capped = engine.checkpointed_seq.load(Ordering::Relaxed);
        assert_eq!(capped, unpaced + 100);
        // `checkpoint` is not paced, and notes its own cost (far less than an hour's).
        engine
            .checkpoint_pacing
            .note(Instant::now(), Duration::from_secs(3_600));
        consume(step);
        step += 1;
        let explicit = engine.checkpoint().expect("checkpoint");
        assert!(explicit > capped);
        let soon = Instant::now() + Duration::from_secs(60);
        let wait = engine.checkpoint_pacing.next_not_before();
        assert!(wait.is_none_or(|at| at < soon), "{wait:?}");
        // Held back again; then a cheap checkpoint's note lifts the wait, and the next
        // commit takes one. (The recheck a held-back commit arms is `pacing`'s own test.)
        engine
            .checkpoint_pacing
            .note(Instant::now(), Duration::from_secs(3_600));
        let held = engine.checkpointed_seq.load(Ordering::Relaxed);
        while log().last_appended() < held + 60 {
            consume(step);
            step += 1;
        }
        assert_eq!(engine.checkpointed_seq.load(Ordering::Relaxed), held);
        engine
            .checkpoint_pacing
            .note(Instant::now(), Duration::from_millis(1));
        consume(step);
        assert!(engine.checkpointed_seq.load(Ordering::Relaxed) > held);
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A snapshot says the newest timestamp of the events it holds (`newest_at_ms`: the instant
    /// `verify` judges from which calendar periods are over), and a replay notes every event's.
    /// Live, every change noted its event's time but a reservation's opening and a usage
    /// correction: a checkpoint cut while one of those was the newest event said an earlier
    /// time than a replay of the same log gives.
    #[test]
    fn every_logged_change_notes_its_time_as_the_replay_of_its_event_does() {
        let dir = fresh_dir("newest-event");
        let engine = seated_on_disk(&dir, "Plus", OpenOptions::default());
        let newest = |engine: &Engine| engine.cut(|| 0).expect("cut").newest_at_ms;
        // Each change is stamped after every event before it.
        let mut at_ms = T0;
        let mut later = || {
            at_ms += MINUTE;
            at_ms
        };
        let consumed_at = later();
        let consumed = engine
            .consume(&m27("tp-u", 1, consumed_at))
            .expect("consume");
        assert!(consumed.is_admitted(), "{consumed:?}");
        assert_eq!(newest(&engine), consumed_at, "after a consume");
        let reserved_at = later();
        let reservation = engine
            .reserve(&m27("tp-u", 2, reserved_at), Some(DAY))
            .expect("reserve")
            .reservation
            .expect("a reservation");
        assert_eq!(newest(&engine), reserved_at, "after a reserve");
        let corrected_at = later();
        engine
            .adjust_usage(
                "tp-u",
                "m2.7",
                &[(Unit::Requests, 1)],
                consumed_at,
                AdjustmentDirection::Add,
                Some(corrected_at),
            )
            .expect("a correction");
        assert_eq!(newest(&engine), corrected_at, "after a usage correction");
        let settled_at = later();
        engine
            .settle(
                reservation,
                &[(Unit::Requests, 1), (Unit::Tokens, 500)],
                Some(settled_at),
            )
            .expect("settle");
        assert_eq!(newest(&engine), settled_at, "after a settle");
        // The newest event is a reservation's opening again when the engine goes away.
        let reserved_last_at = later();
        engine
            .reserve(&m27("tp-u", 1, reserved_last_at), Some(DAY))
            .expect("reserve")
            .reservation
            .expect("a reservation");
        let live = newest(&engine);
        // Dropped without close(): no checkpoint, the reopen replays the whole log.
        drop(engine);
        let clock = Arc::new(ManualClock::new(T0));
        let reopened =
            Engine::open(&dir, Policy::token_plan(), clock, OpenOptions::default()).expect("open");
        assert_eq!(live, newest(&reopened), "live, against a replay of its log");
        assert_eq!(live, reserved_last_at, "the newest event's time");
        drop(reopened);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
