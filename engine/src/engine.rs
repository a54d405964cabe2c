//! The engine: one handle that ties the policy, the accounts, the ledger, admission,
//! idempotency and reservations together. Safe to share between threads (`Engine: Sync`).
//!
//! Data flow of one `consume`: resolve the timestamp (explicit or the `Clock`), validate the
//! quantities, read-lock the key's shard, resolve the resource in that shard's policy, then
//! `admission` tries the plan's limits (lock-free CAS on each window) and falls back to the
//! team's credits. With a request id the whole call runs once per id (`idempotency`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::accounts::{
    default_team_name, KeyKind, KeyState, KeyTable, Registry, TeamRecord, UserRecord, MAX_ID_BYTES,
    MAX_KEY_BYTES,
};
use crate::admission::{
    cover_upgrade_for, credits_admission, over_maximum, plan_refusal, plan_statuses, price_micros,
    try_credits, try_quota, Admission, Amounts, ChargedTo, Decision, DenialReason, Holds,
    LimitStatus, Mode, Quantities, Receipt, Verdict,
};
use crate::calendar::MAX_TIMESTAMP_MS;
use crate::clock::Clock;
use crate::error::Error;
use crate::event::{
    append_body_to, append_usage_to, encode_body, encode_usage_into, EventBody, UsageAdmittedRef,
};

thread_local! {
    /// Where this thread encodes the usage events it logs (the log copies them into its queue),
    /// so logging a usage allocates nothing.
    static EVENT_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
/// A usage event is a few dozen bytes; a buffer grown past this is given back.
const EVENT_BUFFER_KEPT_BYTES: usize = 4096;

thread_local! {
    /// `consume_many`'s chunk of events encoded but not yet appended (see there).
    static STAGED: std::cell::RefCell<Staged> = std::cell::RefCell::new(Staged::default());
    /// `consume_many`'s list of requests whose events are logged but not yet durable (see there).
    static PENDING: std::cell::RefCell<Vec<PendingEvent>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch value in `key`, or on a fresh one once the thread's
/// thread-locals are destroyed: a call from a thread-exit destructor (a `pthread_key` one, which
/// glibc runs after Rust's, or a C++ `thread_local`'s) is decided like any other. `with` would
/// panic there, and a panic inside the engine poisons it for every thread.
pub(crate) fn with_scratch<T: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut f = Some(f);
    match key.try_with(|cell| (f.take().expect("run once"))(&mut cell.borrow_mut())) {
        Ok(result) => result,
        Err(_) => (f.take().expect("not run: the value was destroyed"))(&mut T::default()),
    }
}

/// A request of a `consume_many` batch whose event is logged, to give back should the event
/// not become durable.
#[derive(Clone, Copy)]
struct PendingEvent {
    /// The request's place in the batch.
    index: usize,
    /// What it moved; `None` for a logged denial (a request id's).
    receipt: Option<Receipt>,
    /// The event's sequence number; `UNSEQUENCED` while its chunk is staged, not appended.
    seq: u64,
}

impl PendingEvent {
    const UNSEQUENCED: u64 = u64::MAX;
}
/// Entries of `PENDING` kept between calls (a batch of up to this many allocates nothing).
const PENDING_KEPT: usize = 4_096;
/// `consume_many` applies this many requests, then appends their events at once (one hold of
/// the log queue's lock); a checkpoint's cut waits for at most one chunk.
const STAGED_CHUNK: usize = 64;
/// Bytes of a thread's staged chunk kept between calls.
const STAGED_KEPT_BYTES: usize = 64 * 1024;
/// How far ahead `consume_many` starts loading a request's table entry, and then its name and
/// usage. One decision takes longer than a miss to memory, so a few requests suffice; more
/// would only risk the lines being evicted before use.
const ENTRY_AHEAD: usize = 4;
const POINTEES_AHEAD: usize = 2;
const _: () = assert!(POINTEES_AHEAD < ENTRY_AHEAD);
use crate::idempotency::{
    ChunkSeq, ChunkSeqGuard, Fingerprint, LoggedAs, RequestTable, MAX_REQUEST_ID_BYTES,
};
use crate::ledger::{KeyUsage, Team};
use crate::lock::{LeavableMutex, ShardLock};
use crate::log::{EventLog, Staged};
use crate::options::DEFAULT_MAX_AHEAD_OF_CLOCK_MS;
use crate::policy::{Policy, Resource, ResourceId, Unit, Window};
use crate::reservation::{ReservationId, ReservationTable, Settlement, DEFAULT_LEASE_MS};

// Admin calls take a timestamp like every other operation (validated now; stamped on the
// events they become once the engine has a log).

/// Bounds and horizons, chosen when the engine opens. `Engine::new` and `Engine::open` check
/// each against its range first (`EngineOptions::validate`; the constants are in `options`)
/// and refuse a value out of it with `Error::InvalidArgument` naming the option. `Engine::open`
/// also refuses, changing nothing, a table bound (`max_keys`, `max_users`, `max_teams`,
/// `max_open_reservations`, `idempotency_capacity`) below what the database holds, naming the
/// option, the bound and how many are held: replayed whole, it would run above its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Keys at most, 1 to `MAX_TABLE_ENTRIES` (2^32); at an open, at least the keys held.
    pub max_keys: u64,
    /// Teams at most (each user's Default Team counts), 1 to `MAX_TABLE_ENTRIES`; at an open,
    /// at least the teams held.
    pub max_teams: u64,
    /// Users at most, 1 to `MAX_TABLE_ENTRIES`; at an open, at least the users held.
    pub max_users: u64,
    /// Request ids remembered at once, 1 to `MAX_TABLE_ENTRIES`, exactly: a full table first
    /// drops the ids past the horizon in every shard, then refuses a new id
    /// (`CapacityExceeded`). Each id with its first decision takes about 390 bytes resident
    /// (a UUID's length on a short key) to 580 (128-byte ids on 128-byte keys, the longest):
    /// 0.4 to 0.6 GB for the default million. At an open, at least the ids the database
    /// holds stamped within the horizon of the clock's now.
    pub idempotency_capacity: usize,
    /// How long a request id is remembered; never less than the policy's longest window.
    /// 0 (the default): the policy's longest window; else 1 to `MAX_IDEMPOTENCY_HORIZON_MS`
    /// (366 days).
    pub idempotency_horizon_ms: u64,
    /// Reservations open at once, 1 to `MAX_TABLE_ENTRIES`; also how many closed ones are
    /// remembered (the most recently closed) so a repeated settle or void is idempotent. At an
    /// open, at least the reservations open in the database whose lease has not ended by the
    /// clock's now; one with a lower bound than the database ran with keeps the closed ones it
    /// restores until its first close (they only ever shrink, and were acknowledged).
    pub max_open_reservations: usize,
    /// The lease of a reservation made without one, 1 to `MAX_LEASE_MS` (24 h).
    pub default_lease_ms: u64,
    /// Policies kept so receipts from before a swap can still be refunded exactly:
    /// `MIN_POLICY_GENERATIONS` (2) to `MAX_POLICY_GENERATIONS` (65,536). More while a
    /// reservation opened under an older one is open (at most its lease, 24 h): that
    /// generation and every later one are kept until it closes, so its settle gives back
    /// exactly what it does not use; those past the bound are let go at the first swap after
    /// that. An open with a lower bound than the database kept keeps them until its first
    /// swap too.
    pub max_policy_generations: usize,
    /// How often, on the engine's clock, a round of `reclaim_idle` runs on its own: a step of
    /// at most 512 keys of one shard at a time from the admission path, the steps spread over
    /// the interval, each as of the clock's time (or the triggering requests' own, if earlier).
    /// A key idle this long is freed within about twice this, given traffic enough for the
    /// steps. 0: never (`reclaim_idle` can still be called); else 1 to `MAX_PERIOD_MS`.
    pub reclaim_idle_every_ms: u64,
    /// Whether reservations whose lease has ended (by the engine's clock, or the triggering
    /// requests' own timestamps if earlier, as `reserve` judges it) are expired from the
    /// admission path, so what a crashed gateway held comes back even if nobody calls `reserve`
    /// again: before a denial a hold may explain is answered or a plan refusal is charged to
    /// credits (the request is then decided again), before a settle's extra is decided, before
    /// a batch or a usage report, and at a thread's look every 256 requests (as
    /// for `reclaim_idle_every_ms`). False: only `reserve`, a late `settle`, a policy swap and
    /// `expire_reservations` expire them.
    pub expire_leases_on_its_own: bool,
    /// How far ahead of the engine's clock an operation's explicit timestamp may be: one
    /// stamped further ahead is refused (`InvalidArgument` on `at_ms`) and changes nothing.
    /// Without a bound, one request stamped months ahead (a client's bad clock) moves its key's
    /// windows there: for requests stamped now its usage does not age out, nor a reservation
    /// made so reach the end of its lease, until the clock reaches that time; and the log
    /// segment holding its event is as young
    /// as that stamp: compaction, which drops segments oldest first while their newest event is
    /// older than the longest window plus the retention, stops at that segment, so neither it
    /// nor any later one is dropped until the clock passes the stamp plus that horizon: the
    /// log only grows until then.
    /// Default `DEFAULT_MAX_AHEAD_OF_CLOCK_MS`, a day: far more than any clock skew.
    /// 0: no bound, explicit timestamps are taken as given (tests and replays that run ahead of
    /// the clock); else 1 to `MAX_PERIOD_MS`. The log's own timestamps are never refused when
    /// it is replayed at open.
    pub max_ahead_of_clock_ms: u64,
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            max_keys: 16_000_000,
            max_teams: 4_000_000,
            max_users: 8_000_000,
            idempotency_capacity: 1_000_000,
            idempotency_horizon_ms: 0,
            max_open_reservations: 1_000_000,
            default_lease_ms: DEFAULT_LEASE_MS,
            max_policy_generations: 1_024,
            reclaim_idle_every_ms: 10 * 60 * 1000,
            expire_leases_on_its_own: true,
            max_ahead_of_clock_ms: DEFAULT_MAX_AHEAD_OF_CLOCK_MS,
        }
    }
}

/// One usage request: `quantities` are `(unit, amount)` pairs, e.g. a song is
/// `[(Songs, 1), (Seconds, 280)]`. `at_ms` defaults to the engine's clock.
#[derive(Debug, Clone, Copy)]
pub struct UsageRequest<'a> {
    pub key: &'a str,
    pub resource: &'a str,
    pub quantities: &'a [(Unit, u64)],
    pub at_ms: Option<u64>,
    pub request_id: Option<&'a str>,
}

impl<'a> UsageRequest<'a> {
    pub fn new(key: &'a str, resource: &'a str, quantities: &'a [(Unit, u64)]) -> UsageRequest<'a> {
        UsageRequest {
            key,
            resource,
            quantities,
            at_ms: None,
            request_id: None,
        }
    }

    pub fn at(mut self, at_ms: u64) -> UsageRequest<'a> {
        self.at_ms = Some(at_ms);
        self
    }

    /// An idempotency id: a repeat within the horizon answers the first decision and counts
    /// nothing, unless that was a denial for want of a valid key (`UnknownKey`, `KeyRevoked`),
    /// which is not remembered (`idempotency::remembers`): the id is decided anew, and such a
    /// request is denied so even where a new id would be refused (stamped before the horizon,
    /// the table full).
    pub fn id(mut self, request_id: &'a str) -> UsageRequest<'a> {
        self.request_id = Some(request_id);
        self
    }
}

/// What `reserve` answered: a reservation id when admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReserveOutcome {
    pub decision: Decision,
    pub reservation: Option<ReservationId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled(Settlement),
    /// The actual amount went beyond the estimate and the rest did not fit: nothing changed,
    /// the reservation stays open (settle with less, or void it).
    Denied(Box<crate::admission::Denial>),
}

/// One limit on the console's usage bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitReport {
    pub name: String,
    pub meter: String,
    pub window: Window,
    pub amount: u64,
    pub used: u64,
    pub remaining: u64,
    pub reset_at_ms: Option<u64>,
}

/// A key's usage report: every limit of its plan, and the credits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub key: String,
    pub kind: KeyKind,
    /// The key was revoked (`Engine::revoke_key`): every request on it is denied.
    pub revoked: bool,
    pub user: String,
    pub team: String,
    pub plan: Option<String>,
    pub limits: Vec<LimitReport>,
    pub credits_balance_micros: u64,
    pub credits_charged_micros: u64,
    pub open_reservations: u32,
    pub payg_micros: u64,
    pub at_ms: u64,
}

impl LimitReport {
    /// The limit as JSON: `{"name", "meter", "window", "used", "amount", "remaining",
    /// "reset_at_ms": ms or null}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "meter": self.meter,
            "window": self.window.to_string(),
            "used": self.used,
            "amount": self.amount,
            "remaining": self.remaining,
            "reset_at_ms": self.reset_at_ms,
        })
    }
}

impl UsageReport {
    /// The report as JSON, the one form the C ABI and the `tally usage` command share:
    /// `{"key", "kind": "plan" | "pay_as_you_go", "revoked", "user", "team", "plan": name or null,
    /// "at_ms", "limits": [LimitReport::to_json], "credits_balance_micros",
    /// "credits_charged_micros", "open_reservations", "pay_as_you_go_micros"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "key": self.key,
            "kind": match self.kind {
                KeyKind::Plan => "plan",
                KeyKind::PayAsYouGo => "pay_as_you_go",
            },
            "revoked": self.revoked,
            "user": self.user,
            "team": self.team,
            "plan": self.plan,
            "at_ms": self.at_ms,
            "limits": self.limits.iter().map(LimitReport::to_json).collect::<Vec<_>>(),
            "credits_balance_micros": self.credits_balance_micros,
            "credits_charged_micros": self.credits_charged_micros,
            "open_reservations": self.open_reservations,
            "pay_as_you_go_micros": self.payg_micros,
        })
    }
}

/// Memory held by keys, for the per-key figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub keys: u64,
    pub keys_with_usage: u64,
    pub usage_bytes: u64,
    pub table_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AdjustmentDirection {
    /// Usage that really happened but was not counted: counted now, whatever the limit.
    Add,
    /// Usage counted that should not have been: given back if its window is still live.
    Remove,
}

/// What a consume's answer waits for before it is an acknowledgement (under a request id, or
/// submitted).
#[derive(Debug)]
pub(crate) enum Awaits {
    /// Nothing: no event was logged (no log), or the repeated id's first decision is durable
    /// already.
    Nothing,
    /// This call's own event; should it never become durable, its effect is given back.
    Event(u64),
    /// A repeat of a request id: the first decision's event.
    FirstDecision(LoggedAs),
}

/// Whether a decision's event went to the log: appended with this sequence number, staged
/// in a `consume_many` chunk (appended at the chunk's end), or not logged at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Logged {
    Not,
    At(u64),
    Staged,
}

impl Logged {
    /// The event's sequence number, if it has one yet (`PendingEvent::UNSEQUENCED`).
    fn seq(self) -> u64 {
        match self {
            Logged::At(seq) => seq,
            Logged::Not | Logged::Staged => PendingEvent::UNSEQUENCED,
        }
    }
}

/// The most a team's credits balance and everything charged to it may add up to, in
/// micro-credits (9.2 trillion credits): `Engine::top_up` refuses more.
pub const MAX_CREDITS_MICROS: u64 = i64::MAX as u64;

/// The cached bound `resolve_time` starts from: every timestamp passes without a bound; with
/// one, none does until the clock is read.
fn unbounded_ahead(options: &EngineOptions) -> u64 {
    if options.max_ahead_of_clock_ms == 0 {
        u64::MAX
    } else {
        0
    }
}

pub struct Engine {
    clock: Arc<dyn Clock>,
    options: EngineOptions,
    pub(crate) keys: KeyTable,
    /// Users and teams. A checkpoint's cut leaves its copy on the lock (`LeavableMutex`): the
    /// next to lock it, or the snapshot thread, copies it first.
    pub(crate) registry: Arc<LeavableMutex<Registry>>,
    /// Every installed policy by generation; the last is current. Also serialises swaps.
    pub(crate) policies: RwLock<Vec<Option<Arc<Policy>>>>,
    pub(crate) requests: RequestTable,
    pub(crate) reservations: ReservationTable,
    /// The event log, once recovery has replayed it (absent for an in-memory engine).
    pub(crate) journal: std::sync::OnceLock<EventLog>,
    /// Read-held by a `consume_many` chunk from its first decision until its staged events are
    /// appended; write-held by a checkpoint's cut first of all (see `cut_raw`), so a cut never
    /// sees an applied effect whose event is not yet in the log.
    pub(crate) append_gate: ShardLock<()>,
    /// The serialised checkpoint in progress, if any (see `recovery`).
    pub(crate) checkpointing: Mutex<()>,
    /// The sequence number the latest checkpoint covers.
    // Relaxed: compared against on the commit path to decide when to checkpoint; exactness
    // does not matter (a checkpoint a few events late is fine).
    pub(crate) checkpointed_seq: AtomicU64,
    /// A checkpoint is due at the next commit whatever `checkpointed_seq` says (an open that
    /// replayed a long tail). Relaxed: read on the commit path, like `checkpointed_seq`.
    pub(crate) checkpoint_due: AtomicBool,
    // Relaxed: settings read on the commit path; set once when the engine opens.
    pub(crate) checkpoint_every: AtomicU64,
    pub(crate) retention_ms: AtomicU64,
    // Relaxed fetch_max: the newest event time logged, stamped on snapshots.
    newest_event_ms: AtomicU64,
    // Relaxed: a timestamp at or below this is not too far ahead of the clock (the clock's
    // time plus `max_ahead_of_clock_ms` when last read: stricter than the truth as the clock
    // moves on; a clock stepped back lowers it at a thread's next housekeeping look, every
    // 256 requests). `u64::MAX` without a bound and while the log is replayed. Read by every
    // request: padded off the lines other threads write on every event (`newest_event_ms`'s
    // fetch_max).
    ahead_bound_ms: crossbeam_utils::CachePadded<AtomicU64>,
    // Relaxed: set while the log is replayed at open (before anyone else has the engine).
    // What was logged was acknowledged: the table bounds of the options opened with, which
    // may be lower than the ones it was logged under, do not refuse it (as restoring a
    // snapshot does not); later creations are held to them.
    replaying: AtomicBool,
    /// How long each checkpoint cut held the locks, and the last cut's buffers (`recovery`).
    pub(crate) cuts: crate::recovery::Cuts,
    /// When the next periodic checkpoint may start, after what the last one cost (`recovery`).
    pub(crate) checkpoint_pacing: Arc<crate::recovery::CheckpointPacing>,
    /// Where the open that built this engine spent its time (absent for an in-memory engine).
    pub(crate) open_report: std::sync::OnceLock<crate::recovery::OpenReport>,
    /// Unique in the process: a detached `Submission` names the engine that must complete it.
    pub(crate) instance: u64,
    /// When, on the engine's clock, the next step of the automatic reclaim is due (`u64::MAX`:
    /// never). Relaxed: a schedule read when a thread looks (`maybe_housekeep`); the step itself
    /// is serialised by `reclaim_hand`, and a step a little early or late is harmless.
    pub(crate) reclaim_due_ms: crossbeam_utils::CachePadded<AtomicU64>,
    /// Where the automatic reclaim's round has got to (see `adjustment`).
    pub(crate) reclaim_hand: Mutex<crate::adjustment::ReclaimHand>,
    /// What the periodic checkpoints and compactions found wrong in the background, for
    /// `health` (`recovery`).
    pub(crate) background: Arc<crate::recovery::BackgroundProblems>,
    /// Units an undo of an addition (a consume's, a hold's, a correction's) could not take off
    /// a counter after the log failed, by key, counter and time: a removal not yet undone (a
    /// refund's, a correction's) had taken them. That removal's undo pays the debt before it
    /// adds anything back (`adjustment::Undo`), so the counter ends where the log says, in
    /// whatever order the failed calls are undone. Empty but after a failure.
    pub(crate) undo_debts: Mutex<crate::recovery::Debts>,
    /// Held through each undo's counter moves and the debts or surpluses they note
    /// (`adjustment::Undo::serialized`), so no other undo runs between the two.
    pub(crate) undo_serial: Mutex<()>,
}

/// Requests a thread decides between two looks at the engine's housekeeping: whether a reclaim
/// step is due, whether a reservation's lease has ended (a look reads the clock).
const HOUSEKEEPING_LOOK_EVERY: u32 = 256;

thread_local! {
    /// This thread's requests left until its next look at the engine's housekeeping.
    static UNTIL_HOUSEKEEPING_LOOK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The next engine's `instance`. Relaxed: only uniqueness matters, which `fetch_add` gives.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("keys", &self.keys.len())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Whether `text` holds a Unicode control character (C0, DEL or C1). Every request id is
/// checked, so the common text (no byte below 0x20, no 0x7F, no 0xC2) is passed eight bytes
/// at a time; anything else is scanned byte by byte (`has_control_byte`). callgrind, a 36-byte
/// id: 645 instructions a call byte by byte.
fn has_control_character(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut words = bytes.chunks_exact(8);
    let plain = words.by_ref().all(|word| {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        !may_hold_control_byte(word)
    }) && words
        .remainder()
        .iter()
        .all(|&byte| byte >= 0x20 && byte != 0x7F && byte != 0xC2);
    !plain && has_control_byte(bytes)
}

/// Whether any byte of `word` is below 0x20, 0x7F, or 0xC2 (which starts a C1 control's
/// encoding, and other characters'): the bit tricks of "Bit Twiddling Hacks" (`hasless`,
/// `haszero`), exact for these values.
#[inline]
fn may_hold_control_byte(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    below_space | has_zero(word ^ (ONES * 0x7F)) | has_zero(word ^ (ONES * 0xC2)) != 0
}

/// `has_control_character`, byte by byte: C1 controls U+0080..U+009F are encoded as 0xC2
/// 0x80..0x9F.
fn has_control_byte(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(index, &byte)| {
        byte < 0x20
            || byte == 0x7F
            || (byte == 0xC2
                && bytes
                    .get(index + 1)
                    .is_some_and(|next| (0x80..=0x9F).contains(next)))
    })
}

pub(crate) fn check_id(field: &'static str, value: &str, max_bytes: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max_bytes {
        return Err(Error::invalid(
            field,
            format!("is {} bytes; at most {max_bytes}", value.len()),
        ));
    }
    if has_control_character(value) {
        return Err(Error::invalid(
            field,
            "must not contain control characters (NUL, newline, ...)",
        ));
    }
    Ok(())
}

/// Whether a new user, team or key name begins or ends with whitespace (Unicode's), which a
/// name being created must not: the gateways read a key from its header trimmed, so such a key
/// could never be used through them, and names that differ only so are mistaken for each
/// other (a team named " " shows as nothing). Names already in a log are taken as logged.
fn padded_with_whitespace(value: &str) -> bool {
    value.trim() != value
}

impl Engine {
    /// Refuses a new user, team or key name padded with whitespace (`padded_with_whitespace`),
    /// unless it is being replayed from the log (an earlier build took such names).
    fn check_new_name(&self, field: &'static str, value: &str) -> Result<(), Error> {
        // Names an earlier build logged replay as they were.
        if self.replaying.load(Ordering::Relaxed) {
            return Ok(());
        }
        if padded_with_whitespace(value) {
            return Err(Error::invalid(
                field,
                "must not begin or end with whitespace (a gateway reads keys trimmed, and \
                 names that differ only so are mistaken for each other)",
            ));
        }
        // As plan, resource and meter names (`policy::is_invisible_character`): a team
        // `acme\u{200b}` beside `acme` took top-ups meant for the other.
        if value.chars().any(crate::policy::is_invisible_character) {
            return Err(Error::invalid(
                field,
                "must not contain an invisible character (such as a zero-width space, a \
                 variation selector or a direction override): it would differ from a name that \
                 looks the same",
            ));
        }
        Ok(())
    }

    /// An engine in memory on `policy`, asking `clock` for the time. Refuses options out of
    /// range (`EngineOptions::validate`) with `Error::InvalidArgument` naming the option.
    pub fn new(
        policy: Policy,
        clock: Arc<dyn Clock>,
        options: EngineOptions,
    ) -> Result<Engine, Error> {
        options.validate()?;
        let horizon_ms = options
            .idempotency_horizon_ms
            .max(policy.longest_window_ms());
        let policy = Arc::new(policy);
        let reclaim_due_ms = match options.reclaim_idle_every_ms {
            0 => u64::MAX,
            every => clock.now_ms().saturating_add(every),
        };
        Ok(Engine {
            reclaim_due_ms: crossbeam_utils::CachePadded::new(AtomicU64::new(reclaim_due_ms)),
            reclaim_hand: Mutex::new(crate::adjustment::ReclaimHand::default()),
            clock,
            keys: KeyTable::new(Arc::clone(&policy)),
            registry: Arc::new(LeavableMutex::new(Registry::default())),
            policies: RwLock::new(vec![Some(policy)]),
            requests: RequestTable::new(options.idempotency_capacity, horizon_ms),
            reservations: ReservationTable::new(options.max_open_reservations, horizon_ms),
            journal: std::sync::OnceLock::new(),
            open_report: std::sync::OnceLock::new(),
            checkpointing: Mutex::new(()),
            cuts: crate::recovery::Cuts::default(),
            checkpoint_pacing: Arc::default(),
            checkpointed_seq: AtomicU64::new(0),
            checkpoint_due: AtomicBool::new(false),
            checkpoint_every: AtomicU64::new(u64::MAX),
            retention_ms: AtomicU64::new(0),
            newest_event_ms: AtomicU64::new(0),
            ahead_bound_ms: crossbeam_utils::CachePadded::new(AtomicU64::new(unbounded_ahead(
                &options,
            ))),
            replaying: AtomicBool::new(false),
            append_gate: ShardLock::new(()),
            options,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            background: Arc::default(),
            undo_debts: Mutex::default(),
            undo_serial: Mutex::new(()),
        })
    }

    pub fn policy(&self) -> Arc<Policy> {
        let policies = self.policies.read();
        policies
            .last()
            .and_then(Clone::clone)
            .unwrap_or_else(|| unreachable!("the current policy is always kept"))
    }

    /// The policy of `generation`, if still kept (`EngineOptions::max_policy_generations`):
    /// what names the plan and counter ids of a receipt logged under it (`Receipt::generation`).
    pub fn policy_of_generation(&self, generation: u32) -> Option<Arc<Policy>> {
        self.policies
            .read()
            .get(generation as usize)
            .and_then(Clone::clone)
    }

    /// The policy of `generation` and the kept generations after it, oldest first: what
    /// `policy::carry_through` follows to find where a swap put that generation's usage.
    /// `later` is empty, and allocates nothing, for the current generation.
    pub(crate) fn policy_lineage(
        &self,
        generation: u32,
    ) -> (Option<Arc<Policy>>, Vec<Arc<Policy>>) {
        let policies = self.policies.read();
        let index = generation as usize;
        let then = policies.get(index).and_then(Clone::clone);
        let later = match policies.get(index + 1..) {
            Some(later) if then.is_some() => later.iter().flatten().cloned().collect(),
            _ => Vec::new(),
        };
        (then, later)
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Counts `requests` decided on this thread; every `HOUSEKEEPING_LOOK_EVERY` of them, reads the
    /// clock and does the housekeeping that is due: a step of the automatic reclaim, the expiry
    /// of reservations whose lease has ended. Both are judged as of the clock's time, or the
    /// requests' own (`stamped_ms`, the earliest) if that is earlier, as `reserve` judges
    /// leases: a gateway whose timestamps lag the engine's clock does not see its leases end,
    /// or its keys' windows freed, before its own time says so. Call outside every lock.
    #[inline]
    pub(crate) fn maybe_housekeep(
        &self,
        requests: usize,
        stamped_ms: impl FnOnce() -> Option<u64>,
    ) {
        let look =
            UNTIL_HOUSEKEEPING_LOOK.with(|left| match left.get().checked_sub(requests as u32) {
                Some(n) if requests < HOUSEKEEPING_LOOK_EVERY as usize => {
                    left.set(n);
                    false
                }
                _ => {
                    left.set(HOUSEKEEPING_LOOK_EVERY);
                    true
                }
            });
        if look {
            self.look_at_housekeeping(stamped_ms());
        }
    }

    #[cold]
    #[inline(never)]
    fn look_at_housekeeping(&self, stamped_ms: Option<u64>) {
        let reclaims = self.reclaim_due_ms.load(Ordering::Relaxed) != u64::MAX;
        let leases = self.options.expire_leases_on_its_own;
        let ahead = self.options.max_ahead_of_clock_ms;
        let bounded = ahead > 0 && !self.replaying.load(Ordering::Relaxed);
        if !reclaims && !leases && !bounded {
            return;
        }
        let now_ms = self.clock.now_ms();
        if bounded {
            // Between looks the cached bound only rises: a clock stepped back lowers it here.
            self.ahead_bound_ms
                .store(now_ms.saturating_add(ahead), Ordering::Relaxed);
        }
        if !reclaims && !leases {
            return;
        }
        let as_of_ms = stamped_ms.map_or(now_ms, |stamped_ms| stamped_ms.min(now_ms));
        if reclaims && now_ms >= self.reclaim_due_ms.load(Ordering::Relaxed) {
            self.reclaim_step(now_ms, as_of_ms);
        }
        if leases && self.reservations.lease_ended_by(as_of_ms) {
            // A failure (the log refusing the expiry's event) leaves the reservations open
            // for the next look, or for the `reserve` that expires them and reports it.
            let _ = self.expire_reservations(Some(as_of_ms));
        }
    }

    pub(crate) fn note_event_time(&self, at_ms: u64) {
        self.newest_event_ms.fetch_max(at_ms, Ordering::Relaxed);
    }

    pub(crate) fn newest_event_ms(&self) -> u64 {
        self.newest_event_ms.load(Ordering::Relaxed)
    }

    /// Unique among the engines of the process: what a detached `Submission` names as the
    /// engine that made it (`Submission::instance_id`).
    pub fn instance_id(&self) -> u64 {
        self.instance
    }

    pub(crate) fn journal(&self) -> Option<&EventLog> {
        self.journal.get()
    }

    /// Logs a state change and, as the durability mode says, waits for it to be durable:
    /// write-ahead for admin calls (applied only if this succeeds).
    pub(crate) fn commit(&self, at_ms: u64, body: EventBody) -> Result<(), Error> {
        let seq = self.append_event(at_ms, body)?;
        self.wait_event(seq)
    }

    /// `commit`'s first half: appends the event; its sequence number (`None` without a log).
    pub(crate) fn append_event(&self, at_ms: u64, body: EventBody) -> Result<Option<u64>, Error> {
        match self.journal() {
            None => Ok(None),
            Some(journal) => {
                let seq = journal.append(at_ms, encode_body(&body))?;
                self.note_event_time(at_ms);
                Ok(Some(seq))
            }
        }
    }

    /// `commit`'s second half: waits for the event `append_event` appended to be durable.
    pub(crate) fn wait_event(&self, seq: Option<u64>) -> Result<(), Error> {
        match (self.journal(), seq) {
            (Some(journal), Some(seq)) => journal.wait(seq),
            _ => Ok(()),
        }
    }

    pub(crate) fn resolve_time(&self, at_ms: Option<u64>) -> Result<u64, Error> {
        let at_ms = at_ms.unwrap_or_else(|| self.clock.now_ms());
        if at_ms >= MAX_TIMESTAMP_MS {
            return Err(Error::invalid(
                "at_ms",
                format!(
                    "{at_ms} is at or after 2100-01-01T00:00:00Z, the end of tally's time range"
                ),
            ));
        }
        if at_ms > self.ahead_bound_ms.load(Ordering::Relaxed) {
            self.check_ahead_of_clock(at_ms)?;
        }
        Ok(at_ms)
    }

    /// Refuses a timestamp more than `max_ahead_of_clock_ms` ahead of the engine's clock
    /// (see the option). Reads the clock only when `at_ms` passes the bound cached at the last
    /// read.
    #[cold]
    fn check_ahead_of_clock(&self, at_ms: u64) -> Result<(), Error> {
        let ahead = self.options.max_ahead_of_clock_ms;
        debug_assert!(ahead > 0, "no bound is cached as u64::MAX");
        let now_ms = self.clock.now_ms();
        let bound = now_ms.saturating_add(ahead);
        if at_ms > bound {
            return Err(Error::invalid(
                "at_ms",
                format!(
                    "{at_ms} is {} ms ahead of the engine's clock ({now_ms}); at most {ahead} ms \
                     ahead is accepted (max_ahead_of_clock_ms)",
                    at_ms - now_ms
                ),
            ));
        }
        self.ahead_bound_ms.fetch_max(bound, Ordering::Relaxed);
        Ok(())
    }

    /// While the log is replayed, its timestamps are taken as they were logged, however far
    /// ahead of the clock they are now, and its creations whatever the table bounds
    /// (`replaying` true); afterwards the bound is read anew and the tables are held to theirs.
    pub(crate) fn set_replaying(&self, replaying: bool) {
        let bound = if replaying {
            u64::MAX
        } else {
            unbounded_ahead(&self.options)
        };
        self.ahead_bound_ms.store(bound, Ordering::Relaxed);
        self.replaying.store(replaying, Ordering::Relaxed);
    }

    // -----------------------------------------------------------------------------------------
    // Accounts (cold: the registry mutex, then a key shard's write lock).

    /// Creates a user, their Default Team (`@user`) and their plan key in it.
    pub fn create_user(&self, user: &str, key: &str, at_ms: Option<u64>) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        check_id("user", user, MAX_ID_BYTES)?;
        check_id("key", key, MAX_KEY_BYTES)?;
        self.check_new_name("user", user)?;
        self.check_new_name("key", key)?;
        let mut registry = self.registry.lock();
        if registry.users.contains_key(user) {
            return Err(Error::AlreadyExists {
                what: "user",
                id: user.into(),
            });
        }
        let team_name = default_team_name(user);
        if registry.teams.contains_key(team_name.as_str()) {
            return Err(Error::AlreadyExists {
                what: "team",
                id: team_name,
            });
        }
        self.check_room(&registry, 1)?;
        self.check_new_key(key)?;
        self.commit(
            at_ms,
            EventBody::UserCreated {
                user: user.into(),
                key: key.into(),
            },
        )?;
        let user_name: Arc<str> = user.into();
        let team = Arc::new(Team::new(&team_name));
        self.keys.insert(
            key,
            KeyState::new(KeyKind::Plan, Arc::clone(&user_name), Arc::clone(&team)),
        );
        let mut members = rustc_hash::FxHashMap::default();
        members.insert(Arc::clone(&user_name), key.into());
        registry.teams.insert(
            team_name.as_str().into(),
            TeamRecord {
                team,
                members,
                owner: Some(Arc::clone(&user_name)),
            },
        );
        registry.users.insert(
            Arc::clone(&user_name),
            UserRecord {
                name: user_name,
                default_team: team_name.into(),
                payg_keys: Vec::new(),
            },
        );
        Ok(())
    }

    fn check_room(&self, registry: &Registry, new_teams: u64) -> Result<(), Error> {
        if self.replaying.load(Ordering::Relaxed) {
            return Ok(());
        }
        if registry.users.len() as u64 >= self.options.max_users {
            return Err(Error::CapacityExceeded {
                what: "users",
                capacity: self.options.max_users,
            });
        }
        if registry.teams.len() as u64 + new_teams > self.options.max_teams {
            return Err(Error::CapacityExceeded {
                what: "teams",
                capacity: self.options.max_teams,
            });
        }
        Ok(())
    }

    fn check_new_key(&self, key: &str) -> Result<(), Error> {
        if self.keys.len() >= self.options.max_keys && !self.replaying.load(Ordering::Relaxed) {
            return Err(Error::CapacityExceeded {
                what: "keys",
                capacity: self.options.max_keys,
            });
        }
        if self.keys.read(key, |_, state| state.is_some()) {
            return Err(Error::AlreadyExists {
                what: "key",
                id: key.into(),
            });
        }
        Ok(())
    }

    pub fn create_team(&self, team: &str, at_ms: Option<u64>) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        check_id("team", team, MAX_ID_BYTES)?;
        self.check_new_name("team", team)?;
        if team.starts_with('@') {
            return Err(Error::invalid(
                "team",
                "names starting with '@' are Default Teams",
            ));
        }
        let mut registry = self.registry.lock();
        if registry.teams.contains_key(team) {
            return Err(Error::AlreadyExists {
                what: "team",
                id: team.into(),
            });
        }
        if registry.teams.len() as u64 >= self.options.max_teams
            && !self.replaying.load(Ordering::Relaxed)
        {
            return Err(Error::CapacityExceeded {
                what: "teams",
                capacity: self.options.max_teams,
            });
        }
        self.commit(at_ms, EventBody::TeamCreated { team: team.into() })?;
        let record = TeamRecord {
            team: Arc::new(Team::new(team)),
            members: Default::default(),
            owner: None,
        };
        registry.teams.insert(team.into(), record);
        Ok(())
    }

    /// Adds `user` to `team` with their plan key for that team (one key per user per team).
    pub fn add_member(
        &self,
        team: &str,
        user: &str,
        key: &str,
        at_ms: Option<u64>,
    ) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        check_id("key", key, MAX_KEY_BYTES)?;
        self.check_new_name("key", key)?;
        let mut registry = self.registry.lock();
        let user_name = registry
            .users
            .get(user)
            .map(|record| Arc::clone(&record.name))
            .ok_or_else(|| Error::UnknownUser { user: user.into() })?;
        let record = registry
            .teams
            .get_mut(team)
            .ok_or_else(|| Error::UnknownTeam { team: team.into() })?;
        if let Some(old_key) = record.members.get(user) {
            // A member whose key was revoked is given a new one in its place (a key rotated
            // after a leak); one whose key still works is a member already.
            let revoked = self
                .keys
                .read(old_key, |_, state| state.is_some_and(|state| state.revoked));
            if !revoked {
                return Err(Error::AlreadyExists {
                    what: "member",
                    id: format!("{user} in {team}"),
                });
            }
        }
        self.check_new_key(key)?;
        let body = EventBody::MemberAdded {
            team: team.into(),
            user: user.into(),
            key: key.into(),
        };
        self.commit(at_ms, body)?;
        self.keys.insert(
            key,
            KeyState::new(
                KeyKind::Plan,
                Arc::clone(&user_name),
                Arc::clone(&record.team),
            ),
        );
        record.members.insert(user_name, key.into());
        Ok(())
    }

    /// The team whose credits `key` draws on (a pay-as-you-go key's: its user's Default Team);
    /// `None` for a key the engine does not know. A key never changes team, and keys are never
    /// removed (a revoked one stays), so an export reader can name the team of any event's key
    /// even after compaction removed the event that made it.
    pub fn team_of_key(&self, key: &str) -> Option<String> {
        self.keys.read(key, |_, state| {
            state.map(|state| state.team.name.to_string())
        })
    }

    /// The team an event concerns, for an export reader billing by team: the team the event
    /// names (an event that makes a key or changes its seat says whose it is: it is logged
    /// before the key is in the table, so a reader may read it first), or its key's team (see
    /// `team_of_key`); `None` for a policy swap, and for a denial of a key the engine did not
    /// know then (a key of that name made later is no concern of it).
    pub fn team_of_event(&self, body: &EventBody) -> Option<String> {
        match body {
            EventBody::TeamCreated { team }
            | EventBody::CreditsToppedUp { team, .. }
            | EventBody::CreditsWithdrawn { team, .. }
            | EventBody::MemberAdded { team, .. }
            | EventBody::SeatChanged { team, .. } => Some(team.clone()),
            EventBody::UserCreated { user, .. } | EventBody::PayAsYouGoKeyCreated { user, .. } => {
                Some(default_team_name(user))
            }
            EventBody::RequestDenied {
                decision: Decision::Denied(denial),
                ..
            } if matches!(denial.reason, DenialReason::UnknownKey) => None,
            _ => body.key().and_then(|key| self.team_of_key(key)),
        }
    }

    /// Revokes `key` (a plan or a pay-as-you-go key, say one that leaked): every later
    /// request on it is denied `KeyRevoked`, whatever its seat, its team's credits or its
    /// request id (a repeat of a request admitted before still returns its first decision).
    /// What it used still counts in its windows, its open reservations still settle or void
    /// (a settle's extra beyond the hold is denied) and its requests still refund. Revoking
    /// is for good; the member can be given a new key with `add_member` (with no seat, as
    /// any new member). The revoked key keeps its seat, unused, until a policy swap drops
    /// the seat's plan: the swap takes the seat away instead of refusing, as it refuses for a
    /// key that works. Returns whether the key was revoked now (`false`: it already was,
    /// and nothing is logged).
    pub fn revoke_key(&self, key: &str, at_ms: Option<u64>) -> Result<bool, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        check_id("key", key, MAX_KEY_BYTES)?;
        // As for a seat change (`change_seat`), and in its lock order: no `consume_many`
        // chunk is between deciding on the key and appending its events, nor a settle between
        // charging its extra and appending its close. Decided before the revocation, their
        // events come before its own in the log; without these locks the log showed usage
        // admitted on the key after its `key_revoked`. Held until the event is appended.
        let gate = self.append_gate.write();
        let table = self.reservations.inner.lock();
        // Against `add_member` giving the member a new key in its place meanwhile.
        let _registry = self.registry.lock();
        self.keys.write(key, |_, state| {
            let state = state.ok_or_else(|| Error::UnknownKey { key: key.into() })?;
            if state.revoked {
                return Ok(false);
            }
            // Revoked once the event is durable, as a seat changes; a request on the key
            // meanwhile waits for the shard's lock, held until then (it decides revoked).
            let seq = self.append_event(at_ms, EventBody::KeyRevoked { key: key.into() })?;
            drop(table);
            drop(gate);
            self.wait_event(seq)?;
            state.revoked = true;
            Ok(true)
        })
    }

    /// Issues a pay-as-you-go key to `user`: never draws on plan quota or credits.
    pub fn create_payg_key(&self, user: &str, key: &str, at_ms: Option<u64>) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        check_id("key", key, MAX_KEY_BYTES)?;
        self.check_new_name("key", key)?;
        let mut registry = self.registry.lock();
        let record = registry
            .users
            .get(user)
            .ok_or_else(|| Error::UnknownUser { user: user.into() })?;
        let default_team = Arc::clone(&registry.teams[&*record.default_team].team);
        let user_name = Arc::clone(&record.name);
        self.check_new_key(key)?;
        self.commit(
            at_ms,
            EventBody::PayAsYouGoKeyCreated {
                user: user.into(),
                key: key.into(),
            },
        )?;
        self.keys.insert(
            key,
            KeyState::new(KeyKind::PayAsYouGo, user_name, default_team),
        );
        if let Some(record) = registry.users.get_mut(user) {
            record.payg_keys.push(key.into());
        }
        Ok(())
    }

    /// `user`'s key in `team`, in the registry locked as `registry`: a revoked key's member
    /// may be given a new one in its place (`add_member`), so the key is only the member's
    /// while the registry is locked.
    fn member_key(registry: &Registry, team: &str, user: &str) -> Result<Box<str>, Error> {
        let record = registry
            .teams
            .get(team)
            .ok_or_else(|| Error::UnknownTeam { team: team.into() })?;
        if !registry.users.contains_key(user) {
            return Err(Error::UnknownUser { user: user.into() });
        }
        record
            .members
            .get(user)
            .cloned()
            .ok_or_else(|| Error::NotAMember {
                team: team.into(),
                user: user.into(),
            })
    }

    /// Gives `user`'s key in `team` a seat on `plan`, or changes it (upgrade or downgrade) at
    /// once. Usage already counted in a window stays counted.
    pub fn assign_seat(
        &self,
        team: &str,
        user: &str,
        plan: &str,
        at_ms: Option<u64>,
    ) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        #[cfg(test)]
        BEFORE_SEAT_CHANGE.with(|pause| {
            if let Some(pause) = pause.borrow().as_ref() {
                pause();
            }
        });
        self.change_seat(team, user, Some(plan), at_ms)
    }

    pub fn unassign_seat(&self, team: &str, user: &str, at_ms: Option<u64>) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        self.change_seat(team, user, None, at_ms)
    }

    fn change_seat(
        &self,
        team: &str,
        user: &str,
        plan: Option<&str>,
        at_ms: u64,
    ) -> Result<(), Error> {
        // No `consume_many` chunk is between deciding and appending: its receipts name the
        // counters of the seat it was decided on, so its events must come before the seat
        // change's in the log, or a replay finds no counter for them and drops their usage.
        // Held until the event is appended, not through the wait for it to be durable (below).
        let gate = self.append_gate.write();
        // Nor a settle between charging its extra and appending its close: the extra was
        // decided on the old seat, so its event must come first, or a replay applies it after
        // the seat change and finds no counter for it where the new plan lacks the old one's.
        // A settle holds the table from its decision through its append (lock order: append
        // gate, reservation table, key shards); let go with the gate.
        let table = self.reservations.inner.lock();
        // The member's key, found with the registry locked until the event is appended (lock
        // order: reservation table, registry, key shards, as a cut takes them): a revoke and
        // the new key `add_member` gives in its place lock it too, so they come wholly before
        // or after, and the seat goes to the key that is the member's where the event stands
        // in the log, the one a replay finds by the member's name. Found before the lock, the
        // seat went to the revoked key while a replay gave it to the new one.
        let registry = self.registry.lock();
        let key = Self::member_key(&registry, team, user)?;
        let key = &*key;
        self.keys.write(key, |policy, state| {
            let state = state.ok_or_else(|| Error::UnknownKey { key: key.into() })?;
            let seat = match plan {
                Some(name) => Some(
                    policy
                        .plan_id(name)
                        .ok_or_else(|| Error::UnknownPlan { plan: name.into() })?,
                ),
                None => None,
            };
            if state.seat == seat {
                // Already so (the same plan again, or no seat to take away): nothing to log.
                return Ok(());
            }
            let body = EventBody::SeatChanged {
                team: team.into(),
                user: user.into(),
                key: key.into(),
                plan: plan.map(Into::into),
            };
            // Appended under the gate, then the gate is let go for the wait (an fdatasync in
            // `Sync` mode: held through it, the gate stalled every `consume_many` chunk on
            // every key for 100-200 us). The order still holds: a chunk deciding after this
            // on the key waits for its shard's lock, held (write) until the seat is changed,
            // so it decides on the new seat and appends after this event; a chunk on another
            // key has nothing to do with this seat. Still written ahead: the seat changes
            // only once the event is durable.
            let seq = self.append_event(at_ms, body)?;
            drop(registry);
            drop(table);
            drop(gate);
            self.wait_event(seq)?;
            state.seat = seat;
            let usage = state
                .usage
                .take()
                .map(|usage| KeyUsage::rearranged(usage, policy, policy, seat, at_ms));
            state.usage.set(usage);
            Ok(())
        })
    }

    /// Adds credits to a team; returns the new balance. A team's balance and everything charged
    /// to it (what a refund could give back) add up to at most `MAX_CREDITS_MICROS`: a top-up
    /// past that is `Error::Overflow` and changes nothing.
    pub fn top_up(&self, team: &str, micros: u64, at_ms: Option<u64>) -> Result<u64, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        if micros == 0 {
            return Err(Error::invalid(
                "micros",
                "a top-up must be at least 1 micro-credit",
            ));
        }
        let registry = self.registry.lock();
        let team_record = registry.team(team)?;
        // Replay sums credits with wrapping arithmetic and reads a balance past `i64::MAX` as
        // one that went below zero: a larger one would be logged, then refuse every open.
        let total = team_record
            .balance_micros()
            .checked_add(team_record.charged_micros())
            .and_then(|total| total.checked_add(micros));
        if total.is_none_or(|total| total > MAX_CREDITS_MICROS) {
            return Err(Error::Overflow { field: "micros" });
        }
        self.commit(
            at_ms,
            EventBody::CreditsToppedUp {
                team: team.into(),
                micros,
            },
        )?;
        // Still under the registry lock: no other top-up can pass the overflow check between.
        let after = team_record
            .credit(micros)
            .ok_or(Error::Overflow { field: "micros" });
        drop(registry);
        after
    }

    /// Corrects a team's balance downwards (a chargeback, a mistaken top-up). Never below zero.
    pub fn withdraw_credits(
        &self,
        team: &str,
        micros: u64,
        at_ms: Option<u64>,
    ) -> Result<u64, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        if micros == 0 {
            return Err(Error::invalid(
                "micros",
                "a correction must be at least 1 micro-credit",
            ));
        }
        let registry = self.registry.lock();
        let team_record = registry.team(team)?;
        let after = team_record
            .withdraw(micros)
            .map_err(|balance| Error::InsufficientCredits {
                team: team.into(),
                balance_micros: balance,
                needed_micros: micros,
            })?;
        if let Err(error) = self.commit(
            at_ms,
            EventBody::CreditsWithdrawn {
                team: team.into(),
                micros,
            },
        ) {
            team_record.credit(micros);
            return Err(error);
        }
        drop(registry);
        Ok(after)
    }

    pub fn credits_micros(&self, team: &str) -> Result<u64, Error> {
        Ok(self.team(team)?.balance_micros())
    }

    pub(crate) fn team(&self, team: &str) -> Result<Arc<Team>, Error> {
        self.registry.lock().team(team)
    }

    /// Sets how long request ids and ended reservations are remembered for `policy`: the
    /// `idempotency_horizon_ms` option, and never less than the policy's longest window.
    pub(crate) fn set_horizons_for(&self, policy: &Policy) {
        let horizon_ms = self
            .options
            .idempotency_horizon_ms
            .max(policy.longest_window_ms());
        self.requests.set_horizon_ms(horizon_ms);
        self.reservations
            .horizon_ms
            .store(horizon_ms, Ordering::Relaxed);
    }

    /// Replaces the policy at run time. Usage carries over for every counter whose meter (by
    /// name) and window stay; seats move to the plan of the same name, and a swap that would
    /// drop a plan someone is seated on is refused, changing nothing. So is one whose usage
    /// could not carry over as it means (`Policy::check_swap_to`: a meter kept by name that
    /// counts something else, a time zone changed under calendar windows, the week's first
    /// day changed under weekly windows, a plan's limit moved to another window, which would
    /// drop its count; a `Error::Policy` naming the new
    /// document's field). Remembered decisions (a
    /// request id's repeat answers its first) are renumbered to name the same plans, limits
    /// and resources in the new policy; what it no longer has they no longer name
    /// (`Decision::in_policy`). So are remembered settlements (a repeated settle answers its
    /// first with the same plans).
    pub fn swap_policy(&self, policy: Policy, at_ms: Option<u64>) -> Result<(), Error> {
        self.swap_policy_checked(policy, at_ms, true)
    }

    /// `swap_policy`; `check_carry` is false when replaying a swap already logged (an older
    /// build may have logged one this build's `Policy::check_swap_to` refuses).
    pub(crate) fn swap_policy_checked(
        &self,
        policy: Policy,
        at_ms: Option<u64>,
        check_carry: bool,
    ) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        // No `consume_many` chunk is between deciding and appending: its decisions (and their
        // request ids' records, renamed below) are made under the old policy, so its events
        // must come before the swap's in the log, or a replay restores them unrenamed. Held
        // through the wait for the event to be durable too, unlike a seat change's: a chunk's
        // next step after the gate is a request-id shard or a key shard, all write-locked
        // here until the new policy is installed (written ahead), so letting the gate go
        // after the append would let no chunk on.
        let _gate = self.append_gate.write();
        // The open reservations, unchanged until the swap is logged and the old generations
        // let go (below): as a checkpoint's cut, the reservation table comes after the gate.
        let mut reservations = self.reservations.inner.lock();
        // The policy list changes only here, under the gate: the one read now is the one
        // replaced below.
        let old = self.policy();
        let mut policy = policy;
        policy.generation =
            u32::try_from(self.policies.read().len()).map_err(|_| Error::Overflow {
                field: "policy generation",
            })?;
        if check_carry {
            // Refused before anything changes: a refused swap changes nothing, not even the
            // ended leases it expires first when it goes ahead (below). Seats and revocations
            // change only under the gate, so what is checked here still holds at the append.
            old.check_swap_to(&policy)?;
            self.refuse_dropping_seated_plans(&self.keys.lock_all(), &old, &policy)?;
            // Leases that ended by the clock's now (as `reserve` expires them) close first: an
            // open reservation keeps its generation and every later one past
            // `max_policy_generations` (below), which is bounded by its lease only if a swap
            // does not wait for something else to expire it. Without traffic, one whose lease
            // ended days ago held every generation swapped in since. Not in a replay: the log
            // holds the expiries.
            self.expire_locked(&mut reservations, at_ms.min(self.now_ms()))?;
        }
        // The remembered decisions are renamed for the new policy with the rest (lock order:
        // append gate, then request-id shards before the policy list).
        let mut requests = self.requests.lock_all();
        let mut policies = self.policies.write();
        let policy = Arc::new(policy);
        let mut shards = self.keys.lock_all();
        if !check_carry {
            // A replay checks at the same point of the log, so it agrees.
            self.refuse_dropping_seated_plans(&shards, &old, &policy)?;
        }
        let document = serde_json::to_string(policy.document())
            .map_err(|error| Error::invalid("policy", error.to_string()))?;
        self.commit(
            at_ms,
            EventBody::PolicySwapped {
                generation: policy.generation,
                document,
            },
        )?;
        for shard in shards.iter_mut() {
            for (_, state) in shard.iter_mut() {
                state.seat = state
                    .seat
                    .and_then(|seat| policy.plan_id(&old.plan(seat).name));
                let usage = state
                    .usage
                    .take()
                    .map(|usage| KeyUsage::rearranged(usage, &old, &policy, state.seat, at_ms));
                state.usage.set(usage);
            }
            shard.policy = Arc::clone(&policy);
        }
        drop(shards);
        // A repeat of a request id answers its first decision, named as it was: plans, limits
        // and resources are renumbered by a swap.
        for shard in requests.iter_mut() {
            RequestTable::rename_decisions(shard, |decision| decision.in_policy(&old, &policy));
        }
        drop(requests);
        // So does a repeated settle its settlement.
        reservations.rename_settlements(&old, &policy);
        self.set_horizons_for(&policy);
        policies.push(Some(policy));
        let kept = self.options.max_policy_generations.max(2);
        // Not from the oldest generation an open reservation's receipt names on: settling it
        // for less prices what it gives back (credits, pay-as-you-go) and finds its hold's
        // counters through that generation and every later one. Let go, a settle gave back
        // nothing of a hold on credits and reported the unused part released.
        let held = reservations
            .open
            .values()
            .map(|reservation| reservation.receipt.generation as usize)
            .min()
            .unwrap_or(usize::MAX);
        drop(reservations);
        let excess = policies.len().saturating_sub(kept).min(held);
        for generation in policies.iter_mut().take(excess) {
            *generation = None;
        }
        Ok(())
    }

    /// Refuses a swap to `policy` that drops a plan a key that works is seated on. A revoked
    /// key's seat is left out: no command can take it away once the member has a new key (a
    /// seat change finds the member's key), and the key is denied everything, so it loses the
    /// seat with the plan rather than refuse every such swap for good.
    pub(crate) fn refuse_dropping_seated_plans(
        &self,
        shards: &[impl std::ops::Deref<Target = crate::accounts::Shard>],
        old: &Policy,
        policy: &Policy,
    ) -> Result<(), Error> {
        for shard in shards {
            for (_, state) in shard.iter().filter(|(_, state)| !state.revoked) {
                if let Some(seat) = state.seat {
                    let name = &old.plan(seat).name;
                    if policy.plan_id(name).is_none() {
                        return Err(Error::invalid(
                            "policy",
                            format!("plan {name:?} has seats assigned but is missing from the new policy"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Admission (hot: a key shard's read lock and lock-free windows).

    /// Checks every limit that applies and admits all of the request or none of it.
    #[inline]
    pub fn consume(&self, request: &UsageRequest<'_>) -> Result<Decision, Error> {
        let mut decision = Decision::denied(DenialReason::UnknownKey);
        self.consume_into(request, &mut decision)?;
        Ok(decision)
    }

    /// `consume`, also saying whether the decision is a replay: the one remembered for the
    /// request's id, with nothing counted now (true only with a request id). Decided in the
    /// same step as the decision, so two threads racing on a new id cannot both be told
    /// "first" or both "replay".
    pub fn consume_noting_replay(
        &self,
        request: &UsageRequest<'_>,
    ) -> Result<(Decision, bool), Error> {
        let mut decision = Decision::denied(DenialReason::UnknownKey);
        let replayed = self.consume_into(request, &mut decision)?;
        Ok((decision, replayed))
    }

    /// `consume_noting_replay`, writing the decision into the caller's `decision` instead of
    /// returning it: `Ok(replayed)`. For a gateway's hot path: a `Decision` is a few hundred
    /// bytes, and returning one by value copies it. After an error, `decision` holds some
    /// valid decision that means nothing.
    pub fn consume_into(
        &self,
        request: &UsageRequest<'_>,
        decision: &mut Decision,
    ) -> Result<bool, Error> {
        let mut verdict = Verdict::new(decision);
        let outcome = self.admit(request, Mode::Consume, &mut verdict);
        // Outside every lock (a checkpoint takes them all, a reclaim step one shard).
        self.maybe_checkpoint();
        self.maybe_housekeep(1, || request.at_ms);
        outcome.map(|()| verdict.replayed)
    }

    /// The decision `consume` would make now, counting nothing. Like every call, it may first
    /// expire reservations whose lease has ended (see `EngineOptions::expire_leases_on_its_own`),
    /// so it answers what a consume would.
    /// With a request id, a known id answers its first decision (once that decision's event
    /// is durable, as a consume's repeat waits) and a new one that a consume would refuse
    /// (stamped before the request-id horizon) is refused alike.
    pub fn check(&self, request: &UsageRequest<'_>) -> Result<Decision, Error> {
        let mut decision = Decision::denied(DenialReason::UnknownKey);
        self.check_into(request, &mut decision)?;
        Ok(decision)
    }

    /// `check`, also saying whether the answer is the decision remembered for the request's id.
    pub fn check_noting_replay(
        &self,
        request: &UsageRequest<'_>,
    ) -> Result<(Decision, bool), Error> {
        let mut decision = Decision::denied(DenialReason::UnknownKey);
        let replayed = self.check_into(request, &mut decision)?;
        Ok((decision, replayed))
    }

    /// `check_noting_replay`, writing into the caller's `decision` (see `consume_into`).
    pub fn check_into(
        &self,
        request: &UsageRequest<'_>,
        decision: &mut Decision,
    ) -> Result<bool, Error> {
        let mut verdict = Verdict::new(decision);
        self.admit(request, Mode::Check, &mut verdict)
            .map(|()| verdict.replayed)
    }

    /// Decides `request` into `verdict` (its `receipt` is the effect this call made: none for a
    /// replay) and makes the answer an acknowledgement, waiting as the durability mode says.
    /// A denial that a reservation's ended lease may explain is decided again once the ended
    /// leases are expired (`EngineOptions::expire_leases_on_its_own`), so what a crashed
    /// gateway held never denies a request stamped after its lease ended.
    #[inline]
    fn admit(
        &self,
        request: &UsageRequest<'_>,
        mode: Mode,
        verdict: &mut Verdict<'_>,
    ) -> Result<(), Error> {
        verdict.may_expire_leases = true;
        self.admit_deciding(request, mode, verdict)?;
        if verdict.lease_ended_ms != 0 {
            return self.admit_after_expiring_leases(request, mode, verdict);
        }
        Ok(())
    }

    /// `admit`'s second decision, after the leases that had ended by the request's time (and
    /// the clock's) are expired. Holds no lock (expiry takes the table's, then key shards').
    #[cold]
    #[inline(never)]
    fn admit_after_expiring_leases(
        &self,
        request: &UsageRequest<'_>,
        mode: Mode,
        verdict: &mut Verdict<'_>,
    ) -> Result<(), Error> {
        self.expire_before_deciding_again(verdict)?;
        self.admit_deciding(request, mode, verdict)
    }

    /// Expires the leases a verdict's left denial was found to be waiting on (`lease_ended_ms`),
    /// and makes the verdict ready for the second, final decision (`admit`, `submit`). The
    /// denial left was the stale hold's: if the hold cannot be released (the log refuses the
    /// expiry's event), that error is the answer, not the denial.
    #[cold]
    pub(crate) fn expire_before_deciding_again(
        &self,
        verdict: &mut Verdict<'_>,
    ) -> Result<(), Error> {
        self.expire_reservations(Some(verdict.lease_ended_ms))?;
        verdict.may_expire_leases = false;
        verdict.lease_ended_ms = 0;
        Ok(())
    }

    /// Expires the reservations whose lease ended by `stamped_ms` (a request's time; `None`:
    /// the clock's) and by the clock's time, as `reserve` judges leases, for a caller that
    /// answers something else either way (a batch, a usage report). Reads the clock only when
    /// a lease has ended by the stamp. A failure (the log refusing an expiry's event) leaves
    /// them open, for the next look or the call that reports it, and is returned.
    fn expire_leases_ended_by(&self, stamped_ms: Option<u64>) -> Result<(), Error> {
        let ended_by_stamp = match stamped_ms {
            Some(stamp_ms) => self.reservations.lease_ended_by(stamp_ms),
            None => self.reservations.earliest_lease_end() != u64::MAX,
        };
        if !self.options.expire_leases_on_its_own || !ended_by_stamp {
            return Ok(());
        }
        let now_ms = self.clock.now_ms();
        let as_of_ms = stamped_ms.map_or(now_ms, |stamp_ms| stamp_ms.min(now_ms));
        if self.reservations.lease_ended_by(as_of_ms) {
            self.expire_reservations(Some(as_of_ms))?;
        }
        Ok(())
    }

    /// When `decision` is a denial an ended lease may explain (a limit or the credits, which a
    /// reservation holds) and a lease ended by the request's time `at_ms` and the clock's:
    /// the earlier of the two, for `admit` to expire by and decide again. `earliest_before` is
    /// the earliest lease end read before deciding: a lease another thread expired meanwhile
    /// (its release perhaps after the decision read the counters) counts as ended too.
    #[cold]
    #[inline(never)]
    fn lease_ended_before(
        &self,
        decision: &Decision,
        at_ms: u64,
        earliest_before: u64,
    ) -> Option<u64> {
        let Decision::Denied(denial) = decision else {
            return None;
        };
        let held = matches!(
            denial.reason,
            DenialReason::QuotaExhausted { .. }
                | DenialReason::InsufficientCredits { .. }
                | DenialReason::ResourceNotCovered { .. }
                | DenialReason::NoResources
        );
        if !held || !self.options.expire_leases_on_its_own {
            return None;
        }
        let ended_by = |ms: u64| earliest_before <= ms || self.reservations.lease_ended_by(ms);
        if !ended_by(at_ms) {
            return None;
        }
        let as_of_ms = at_ms.min(self.clock.now_ms());
        // A lease ends at its reserve's time plus at least 1 ms, so `as_of_ms` is not 0 here.
        (as_of_ms != 0 && ended_by(as_of_ms)).then_some(as_of_ms)
    }

    /// A batch does not stop mid-way to expire leases and decide a request again (its
    /// requests are decided in order, their events staged chunk by chunk), so it expires first
    /// the leases that ended by its latest request's time and the clock's, as if that request
    /// came first: what they held counts for none of its requests (one stamped before a lease's
    /// end included, as it would be had another request expired the lease just before it).
    /// If the log refuses the expiry, its error is returned: the batch answers it to each
    /// request a lease left open may deny, as `admit` does (`admit_without_waiting`).
    fn expire_leases_before_batch(&self, requests: &[UsageRequest<'_>]) -> Result<(), Error> {
        if requests.is_empty() || self.reservations.earliest_lease_end() == u64::MAX {
            return Ok(());
        }
        // Any request without a stamp is at the clock's time, which bounds the rest anyway.
        let latest_stamp_ms = match requests.iter().any(|request| request.at_ms.is_none()) {
            true => None,
            false => requests.iter().filter_map(|request| request.at_ms).max(),
        };
        self.expire_leases_ended_by(latest_stamp_ms)
    }

    /// `admit`, one decision. Always inlined: a call of its own on the hot path cost about 20
    /// instructions per consume (callgrind), the cold second decision's copy costs only size.
    #[inline(always)]
    fn admit_deciding(
        &self,
        request: &UsageRequest<'_>,
        mode: Mode,
        verdict: &mut Verdict<'_>,
    ) -> Result<(), Error> {
        let at_ms = self.resolve_time(request.at_ms)?;
        let mut quantities = Quantities::default();
        quantities.parse(request.quantities)?;
        if request.key.is_empty() || request.key.len() > MAX_KEY_BYTES {
            check_id("key", request.key, MAX_KEY_BYTES)?;
        }
        let Some(request_id) = request.request_id else {
            return self.decide(
                request.key,
                request.resource,
                &quantities,
                None,
                at_ms,
                mode,
                verdict,
            );
        };
        check_id("request_id", request_id, MAX_REQUEST_ID_BYTES)?;
        let fingerprint = Fingerprint {
            key: request.key,
            resource: request.resource,
            quantities,
        };
        match mode {
            Mode::Consume => {
                let awaits = self.consume_once(
                    request,
                    request_id,
                    fingerprint,
                    &quantities,
                    at_ms,
                    verdict,
                )?;
                self.acknowledge(request, awaits, verdict.receipt.as_ref(), false)
            }
            Mode::Check => {
                match self.requests.peek(
                    request_id,
                    &fingerprint,
                    (at_ms, self.clock.now_ms()),
                    || self.key_refusal(request.key, request.resource, &quantities),
                )? {
                    Some((decision, logged)) => {
                        // Answering the first decision acknowledges it, as a consume's
                        // repeat does: not before its event is durable.
                        self.await_first_decision(&logged)?;
                        *verdict.decision = decision;
                        verdict.receipt = None;
                        verdict.replayed = true;
                        Ok(())
                    }
                    None => self.decide(
                        request.key,
                        request.resource,
                        &quantities,
                        Some(request_id),
                        at_ms,
                        mode,
                        verdict,
                    ),
                }
            }
        }
    }

    /// The denial a request on `key` gets whatever its request id carries: an unknown or a
    /// revoked key's, which is never remembered (`idempotency::remembers`). The request-id
    /// table answers it where it would refuse a new id (its stamp, no room), as it would
    /// answer it with room; and the request's own error before the table's (an unknown
    /// resource, quantities it does not take, a key that can never be), in `decide_logged`'s
    /// order. `Ok(None)` for a usable key.
    #[cold]
    fn key_refusal(
        &self,
        key: &str,
        resource: &str,
        quantities: &Quantities,
    ) -> Result<Option<Decision>, Error> {
        self.keys.read(key, |policy, state| {
            resolve_resource(policy, resource, quantities)?;
            Ok(match state {
                None => {
                    // As `decide_logged`: a key not there may be one that can never be.
                    check_id("key", key, MAX_KEY_BYTES)?;
                    Some(Decision::denied(DenialReason::UnknownKey))
                }
                Some(state) if state.revoked => Some(Decision::denied(DenialReason::KeyRevoked)),
                Some(_) => None,
            })
        })
    }

    /// A consume under a request id, decided once: the first call decides and logs it, a
    /// repeat gets the first decision, into `verdict` either way (its `receipt` is the effect
    /// this call made: none for a repeat). Returns what the answer waits for, which the caller
    /// waits for after `once` has let go of the id's shard: calls with other ids in it do not
    /// wait for this one's flush, and a repeat arriving meanwhile waits for the same event.
    #[inline(never)]
    pub(crate) fn consume_once(
        &self,
        request: &UsageRequest<'_>,
        request_id: &str,
        fingerprint: Fingerprint,
        quantities: &Quantities,
        at_ms: u64,
        verdict: &mut Verdict<'_>,
    ) -> Result<Awaits, Error> {
        // What the first decision (if this call makes it) waits for, and its effect.
        let mut first = (Awaits::Nothing, None);
        let may_expire_leases = verdict.may_expire_leases;
        let mut lease_ended_ms = 0;
        let mut left = Decision::denied(DenialReason::UnknownKey);
        let kept = self.requests.once(
            request_id,
            &fingerprint,
            (at_ms, self.clock.now_ms()),
            || self.key_refusal(request.key, request.resource, quantities),
            || {
                let mut decision = Decision::denied(DenialReason::UnknownKey);
                let mut verdict = Verdict::new(&mut decision);
                verdict.may_expire_leases = may_expire_leases;
                self.decide(
                    request.key,
                    request.resource,
                    quantities,
                    Some(request_id),
                    at_ms,
                    Mode::Consume,
                    &mut verdict,
                )?;
                if verdict.lease_ended_ms != 0 {
                    // Left for the caller to decide again, after expiring: not remembered.
                    lease_ended_ms = verdict.lease_ended_ms;
                    left = decision;
                    return Ok(None);
                }
                let (awaits, logged_as) = match verdict.logged_seq {
                    0 => (Awaits::Nothing, LoggedAs::Durable),
                    seq => (Awaits::Event(seq), LoggedAs::Event(seq)),
                };
                let receipt = verdict.receipt;
                first = (awaits, receipt);
                Ok(Some((decision, receipt, logged_as)))
            },
        );
        // A conflict is answered once the first decision stands.
        let kept = kept.map_err(|error| self.conflict_once_first_stands(request_id, error))?;
        let Some((decision, replay)) = kept else {
            *verdict.decision = left;
            verdict.lease_ended_ms = lease_ended_ms;
            verdict.receipt = None;
            return Ok(Awaits::Nothing);
        };
        *verdict.decision = decision;
        verdict.replayed = replay.is_some();
        let awaits;
        (awaits, verdict.receipt) = match replay {
            Some(LoggedAs::Durable) => (Awaits::Nothing, None),
            Some(logged) => (Awaits::FirstDecision(logged), None),
            None => first,
        };
        Ok(awaits)
    }

    /// `error` as the answer to a request under `request_id`, once a conflict's first decision
    /// stands: a `RequestIdConflict` is decided against the first decision, so it is answered
    /// only once that decision's event is durable, as a replay is, and the log's error is the
    /// answer if it never will be (the first is then forgotten, and a request consumed after
    /// it would have been decided afresh). Other errors are returned as they are.
    #[cold]
    pub(crate) fn conflict_once_first_stands(&self, request_id: &str, error: Error) -> Error {
        if !matches!(error, Error::RequestIdConflict { .. }) {
            return error;
        }
        let Some(journal) = self.journal() else {
            return error;
        };
        match self.requests.logged_of(request_id) {
            Some(logged) => self.await_first_decision(&logged).err().unwrap_or(error),
            // Forgotten meanwhile: its log failed (or it aged out, the log sound).
            None => journal.failure().unwrap_or(error),
        }
    }

    /// Makes an admission's answer an acknowledgement: waits for what it `awaits` to be
    /// durable (as the durability mode says). If its own event never will be, its effect
    /// (`receipt`) is given back, the request id forgotten, and the log's error returned.
    /// `submitted`: the caller is completing a submission (its thread may keep many in flight,
    /// so a lone one polls for the flush: `EventLog::wait_for`), not answering a `consume`.
    #[inline(never)]
    pub(crate) fn acknowledge(
        &self,
        request: &UsageRequest<'_>,
        awaits: Awaits,
        receipt: Option<&Receipt>,
        submitted: bool,
    ) -> Result<(), Error> {
        match awaits {
            Awaits::Nothing => Ok(()),
            Awaits::FirstDecision(logged) => self.await_first_decision(&logged),
            Awaits::Event(seq) => {
                let Some(journal) = self.journal() else {
                    return Ok(());
                };
                // A submission's wait serves what was queued up to it and since, the thread's
                // other submissions among them.
                let serves = if submitted {
                    usize::try_from(journal.last_appended().saturating_sub(seq) + 1)
                        .unwrap_or(usize::MAX)
                } else {
                    1
                };
                journal.wait_for(seq, serves).inspect_err(|_| {
                    // The quantities were valid when the request was decided, so they still are.
                    if let (Some(receipt), Ok(quantities)) =
                        (receipt, Quantities::new(request.quantities))
                    {
                        self.give_back(
                            request.key,
                            request.resource,
                            receipt,
                            &quantities,
                            true,
                            None,
                        );
                    }
                    if let Some(request_id) = request.request_id {
                        self.requests.forget(request_id);
                    }
                })
            }
        }
    }

    /// Decides one request (not a batch's) and, for a consume, logs the decision. Without a
    /// request id, an admitted consume then waits until its event is durable (as the mode
    /// says), and if the log fails, the effect is given back and the error returned; with one
    /// (or the verdict's `defer_wait`), the event's sequence number goes into the verdict's
    /// `logged_seq`, and the caller waits (after letting go of the id's shard; `submit`'s
    /// caller when it completes). Not inlined: `decide_logged` is inlined into it
    /// once, and `admit` (inlined into the hot path) stays small. (With a function of its own
    /// for each case, or this one inlined, a hot-key `consume_into` took 57 to 84 more
    /// instructions; returning how the event was logged, 24 more.)
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decide(
        &self,
        key: &str,
        resource: &str,
        quantities: &Quantities,
        request_id: Option<&str>,
        at_ms: u64,
        mode: Mode,
        verdict: &mut Verdict<'_>,
    ) -> Result<(), Error> {
        let logged = self.decide_logged(
            key, resource, quantities, request_id, at_ms, mode, verdict, None,
        )?;
        if let Logged::At(seq) = logged {
            if request_id.is_some() || verdict.defer_wait {
                verdict.logged_seq = seq;
            } else if let Some(receipt) = &verdict.receipt {
                // Without an id only an admission is logged.
                self.await_durable(seq, key, resource, quantities, receipt)?;
            }
        }
        Ok(())
    }

    /// Decides, and for an admitted consume appends the usage event while the key's shard is
    /// still read-locked (so a checkpoint's cut sees every applied effect logged). A `batch`
    /// (from `consume_many_with`, which looked ahead) brings the key's hash and, with a log, a
    /// `staged` chunk to stage the event in for the caller to append before it lets a cut in.
    /// Does not wait for the event to be durable.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn decide_logged(
        &self,
        key: &str,
        resource: &str,
        quantities: &Quantities,
        request_id: Option<&str>,
        at_ms: u64,
        mode: Mode,
        verdict: &mut Verdict<'_>,
        batch: Option<(u64, Option<&mut Staged>)>,
    ) -> Result<Logged, Error> {
        let journal = self.journal().filter(|_| mode == Mode::Consume);
        // A batch looked ahead (with or without a log), and knows the key's hash.
        let (hash, looked_ahead, staged) = match batch {
            Some((hash, staged)) => (hash, true, staged),
            None => (KeyTable::hash(key), false, None),
        };
        // Read before deciding (see `lease_ended_before`); a line that changes only when the
        // earliest lease does.
        let earliest_lease_end_ms = match verdict.may_expire_leases {
            true => self.reservations.earliest_lease_end(),
            false => u64::MAX,
        };
        // The clock is read only once a lease has ended by the request's time (rare).
        verdict.ended_lease_may_hold = earliest_lease_end_ms <= at_ms
            && self.options.expire_leases_on_its_own
            && earliest_lease_end_ms <= self.clock.now_ms();
        self.keys
            .read_hashed(hash, key, looked_ahead, |policy, state| {
                let (resource_id, resource_spec) =
                    resolve_resource_spec(policy, resource, quantities)?;
                match state {
                    Some(state) => decide_for_key_into(
                        policy,
                        state,
                        resource_id,
                        resource_spec,
                        quantities,
                        at_ms,
                        mode,
                        verdict,
                    )?,
                    None => {
                        // A key that is not there may be one that can never be: say what is wrong.
                        check_id("key", key, MAX_KEY_BYTES)?;
                        verdict.deny(DenialReason::UnknownKey);
                    }
                }
                // An admitted consume has its receipt: one test on the hot path.
                if verdict.receipt.is_none()
                    && verdict.may_expire_leases
                    && !verdict.decision.is_admitted()
                {
                    if let Some(as_of_ms) =
                        self.lease_ended_before(verdict.decision, at_ms, earliest_lease_end_ms)
                    {
                        // Neither answered nor logged: the caller expires and decides again.
                        verdict.lease_ended_ms = as_of_ms;
                        return Ok(Logged::Not);
                    }
                }
                let Some(journal) = journal else {
                    return Ok(Logged::Not);
                };
                let (Some(state), Some(receipt)) = (state, verdict.receipt) else {
                    // A denial under a request id is logged too, so its retry gets the same
                    // answer after a restart; unless it is not remembered (no valid key).
                    let Some(request_id) =
                        request_id.filter(|_| crate::idempotency::remembers(verdict.decision))
                    else {
                        return Ok(Logged::Not);
                    };
                    let body = EventBody::RequestDenied {
                        request_id: request_id.into(),
                        key: key.into(),
                        resource: resource.into(),
                        quantities: *quantities,
                        decision: *verdict.decision,
                    };
                    return match staged {
                        Some(staged) => staged
                            .push_with(at_ms, |buffer| append_body_to(buffer, &body))
                            .map(|()| Logged::Staged),
                        // A logged event like an admission's: its time is the newest event's
                        // (a checkpoint's snapshot keeps it, for the open's request-id bound).
                        None => journal.append(at_ms, encode_body(&body)).map(|seq| {
                            self.note_event_time(at_ms);
                            Logged::At(seq)
                        }),
                    };
                };
                let usage = UsageAdmittedRef {
                    key,
                    resource,
                    quantities,
                    request_id,
                    decision: request_id.map(|_| &*verdict.decision),
                    receipt: &receipt,
                };
                let logged = match staged {
                    Some(staged) => staged
                        .push_with(at_ms, |buffer| append_usage_to(buffer, &usage))
                        .map(|()| Logged::Staged),
                    None => with_scratch(&EVENT_BUFFER, |buffer| {
                        encode_usage_into(buffer, &usage);
                        let appended = journal.append(at_ms, buffer.as_slice());
                        if buffer.capacity() > EVENT_BUFFER_KEPT_BYTES {
                            *buffer = Vec::new();
                        }
                        appended.map(Logged::At)
                    }),
                };
                match logged {
                    Ok(logged) => {
                        // A staged chunk notes its newest timestamp once, before it is appended.
                        if logged != Logged::Staged {
                            self.note_event_time(at_ms);
                        }
                        Ok(logged)
                    }
                    Err(error) => {
                        crate::adjustment::give_back_in(
                            Some((policy, &[])),
                            policy,
                            state,
                            resource,
                            &receipt,
                            quantities,
                            true,
                            None,
                            crate::adjustment::CreditsBack::Now,
                            Some(self.undo(key)),
                        );
                        Err(error)
                    }
                }
            })
    }

    /// Waits until the event that logged a request id's first decision is durable, before a
    /// repeat answers that decision: the log's error if it never will be.
    pub(crate) fn await_first_decision(&self, logged: &LoggedAs) -> Result<(), Error> {
        let Some(journal) = self.journal() else {
            return Ok(());
        };
        let seq = match logged {
            LoggedAs::Durable => return Ok(()),
            LoggedAs::Event(seq) => *seq,
            LoggedAs::Chunk(chunk) => match chunk.wait() {
                ChunkSeq::NEVER => {
                    return Err(journal.failure().unwrap_or_else(|| Error::Storage {
                        problem: "the first call with this request id stopped before its \
                                  decision was logged"
                            .into(),
                    }))
                }
                seq => seq,
            },
        };
        journal.wait(seq)
    }

    /// Waits for `seq`; if the log failed, gives the receipt's effect back.
    fn await_durable(
        &self,
        seq: u64,
        key: &str,
        resource: &str,
        quantities: &Quantities,
        receipt: &Receipt,
    ) -> Result<(), Error> {
        let Some(journal) = self.journal() else {
            return Ok(());
        };
        if let Err(error) = journal.wait(seq) {
            self.give_back(key, resource, receipt, quantities, true, None);
            return Err(error);
        }
        Ok(())
    }

    /// Consumes many requests with one wait for durability: each is decided on its own (all of
    /// it or none), then the call waits once for the last event (in `Durability::Sync`; in the
    /// other modes it returns once the events are queued), so a gateway batching its
    /// requests gets group commit from a single thread. The decisions are acknowledged when
    /// the call returns them, not before: a request's effect is applied (the batch's later
    /// requests see it) before its event is durable. If the log fails, every request whose
    /// event it did not keep is given back and answers the error; those whose events it kept
    /// (made durable before the failure, as a full log file is sealed) stand, as they will
    /// after a reopen. A crash before the call returns may likewise keep the events of the
    /// batch's first requests and lose the rest's: after a reopen the kept ones count and the
    /// others never happened. A batch retried with the same request ids counts each request
    /// once (the kept ones return their decisions); without ids, a retry counts the kept ones
    /// again.
    ///
    /// The events are appended 64 at a time (one hold of the log queue's lock per chunk), while
    /// the batch's keys are looked up a few requests ahead so their cache misses overlap.
    pub fn consume_many(&self, requests: &[UsageRequest<'_>]) -> Vec<Result<Decision, Error>> {
        self.consume_many_noting(requests, None)
    }

    /// `consume_many`, also saying for each request whether its decision is a replay (see
    /// `consume_noting_replay`; false for a request that failed).
    pub fn consume_many_noting_replay(
        &self,
        requests: &[UsageRequest<'_>],
    ) -> (Vec<Result<Decision, Error>>, Vec<bool>) {
        let mut replays = Vec::with_capacity(requests.len());
        let results = self.consume_many_noting(requests, Some(&mut replays));
        (results, replays)
    }

    fn consume_many_noting(
        &self,
        requests: &[UsageRequest<'_>],
        replays: Option<&mut Vec<bool>>,
    ) -> Vec<Result<Decision, Error>> {
        let expiry_failure = self.expire_leases_before_batch(requests).err();
        // What to give back should the append or wait fail, kept in a per-thread list reused
        // from call to call: built afresh it grew by doubling on every batch, a copy and a
        // large free (a consolidation of malloc's free lists) per call.
        with_scratch(&PENDING, |pending| {
            pending.clear();
            if self.journal().is_some() {
                // Room for every request at once: a batch larger than what is kept would
                // otherwise regrow the list by doubling on every call, copying its receipts
                // each time (in callgrind, at batch 10,000, 4% of a `consume_many`'s
                // instructions were those copies, and malloc's frees of the old lists more).
                pending.reserve(requests.len());
            }
            let results =
                self.consume_many_with(requests, pending, replays, expiry_failure.as_ref());
            if pending.capacity() > PENDING_KEPT {
                *pending = Vec::new();
            }
            results
        })
    }

    fn consume_many_with(
        &self,
        requests: &[UsageRequest<'_>],
        pending: &mut Vec<PendingEvent>,
        mut replays: Option<&mut Vec<bool>>,
        expiry_failure: Option<&Error>,
    ) -> Vec<Result<Decision, Error>> {
        let mut results = Vec::with_capacity(requests.len());
        let journal = self.journal();
        let mut last_seq = None;
        // Replays whose first decision's event may not be durable yet, waited for at the end.
        let mut first_decisions = Vec::new();
        // Entries refused as conflicts, answered so once their first decisions stand (at the
        // end: a first staged in this batch is appended by then).
        let mut conflicts = Vec::new();
        // Over many keys each request's lookup is a chain of cache misses (the table entry,
        // then the name and the usage it points to). A batch knows its keys in advance, so
        // the entry of the request `ENTRY_AHEAD` on and the pointees of the one
        // `POINTEES_AHEAD` on start loading while this one is decided.
        let mut hashes = [0u64; ENTRY_AHEAD];
        for (ahead, request) in requests.iter().take(ENTRY_AHEAD).enumerate() {
            hashes[ahead] = KeyTable::hash(request.key);
            self.keys.prefetch_entry(hashes[ahead]);
        }
        with_scratch(&STAGED, |staged| {
            for (chunk_index, chunk) in requests.chunks(STAGED_CHUNK).enumerate() {
                let first_index = chunk_index * STAGED_CHUNK;
                let first_pending = pending.len();
                // Empty unless a previous call unwound mid-chunk: its events must not be logged.
                staged.clear(STAGED_KEPT_BYTES);
                let mut chunk_seq = ChunkSeqGuard::default();
                // The chunk's events are applied now and appended at its end: the gate keeps
                // a checkpoint's cut out in between, so a cut never sees an effect unlogged.
                let gate = journal.map(|_| self.append_gate.read());
                for (offset, request) in chunk.iter().enumerate() {
                    let index = first_index + offset;
                    let hash = hashes[index % ENTRY_AHEAD];
                    debug_assert_eq!(hash, KeyTable::hash(request.key));
                    if let Some(later) = requests.get(index + ENTRY_AHEAD) {
                        let hash = KeyTable::hash(later.key);
                        hashes[index % ENTRY_AHEAD] = hash;
                        self.keys.prefetch_entry(hash);
                    }
                    if index + POINTEES_AHEAD < requests.len() {
                        self.keys
                            .prefetch_pointees(hashes[(index + POINTEES_AHEAD) % ENTRY_AHEAD]);
                    }
                    let mut replayed = false;
                    let batch = (hash, journal.map(|_| &mut *staged));
                    // Decided in place: a decision is a few hundred bytes, and moving it out
                    // through the calls and into the list was four copies per request.
                    results.push(Ok(Decision::denied(DenialReason::UnknownKey)));
                    let Some(Ok(decision)) = results.last_mut() else {
                        unreachable!("a decision was just pushed");
                    };
                    match self.admit_without_waiting(
                        request,
                        batch,
                        decision,
                        index,
                        pending,
                        &mut chunk_seq,
                        expiry_failure,
                    ) {
                        Ok(None) => {}
                        Ok(Some(LoggedAs::Durable)) => replayed = true,
                        Ok(Some(logged)) => {
                            replayed = true;
                            first_decisions.push((index, logged));
                        }
                        Err(error) => {
                            if let (Error::RequestIdConflict { .. }, Some(request_id)) =
                                (&error, request.request_id)
                            {
                                conflicts.push((index, self.requests.logged_of(request_id)));
                            }
                            results[index] = Err(error);
                        }
                    }
                    if let Some(replays) = replays.as_deref_mut() {
                        replays.push(replayed);
                    }
                }
                let (Some(journal), false) = (journal, staged.is_empty()) else {
                    continue;
                };
                self.note_event_time(staged.newest_at_ms());
                let appended = journal.append_staged(staged);
                let staged_events = staged.len() as u64;
                staged.clear(STAGED_KEPT_BYTES);
                chunk_seq.set(*appended.as_ref().unwrap_or(&ChunkSeq::NEVER));
                match appended {
                    Ok(seq) => {
                        last_seq = last_seq.max(Some(seq));
                        // The chunk's events got consecutive numbers ending at `seq`, in the
                        // order their requests were staged.
                        let mut next = seq + 1 - staged_events;
                        for entry in &mut pending[first_pending..] {
                            if entry.seq == PendingEvent::UNSEQUENCED {
                                entry.seq = next;
                                next += 1;
                            }
                        }
                        debug_assert_eq!(next, seq + 1, "one pending entry per staged event");
                    }
                    Err(error) => {
                        // Still behind the gate: no cut sees the effects of events that will
                        // never be in the log.
                        self.undo_pending(
                            requests,
                            &pending[first_pending..],
                            &mut results,
                            replays.as_deref_mut(),
                            &error,
                        );
                        pending.truncate(first_pending);
                    }
                }
                drop(gate);
            }
        });
        if let (Some(journal), Some(last_seq)) = (journal, last_seq) {
            // The chunks were queued without waking the writer (see `EventLog::append_staged`).
            journal.nudge();
            match journal.wait_for(last_seq, pending.len()) {
                Ok(()) => self.maybe_checkpoint(),
                Err(error) => {
                    // The events before the failure stay in the log (a sealed segment is
                    // fdatasynced on its own): their requests stand. The rest never will be.
                    let failed_from = journal.failed_from().unwrap_or(0);
                    pending.retain(|entry| entry.seq >= failed_from);
                    self.undo_pending(
                        requests,
                        pending,
                        &mut results,
                        replays.as_deref_mut(),
                        &error,
                    );
                }
            }
        }
        // A replay answers once its first decision is durable (after this batch's own wait:
        // a first decision staged in this batch is then appended).
        for (index, logged) in first_decisions {
            if let Err(error) = self.await_first_decision(&logged) {
                results[index] = Err(error);
                if let Some(replays) = replays.as_deref_mut() {
                    replays[index] = false;
                }
            }
        }
        if let (Some(journal), false) = (journal, conflicts.is_empty()) {
            for (index, logged) in conflicts {
                let failure = match logged {
                    Some(logged) => self.await_first_decision(&logged).err(),
                    // Forgotten before the conflict was answered: its log failed.
                    None => journal.failure(),
                };
                if let Some(failure) = failure {
                    results[index] = Err(failure);
                }
            }
        }
        // The batch's earliest stamp, worked out only when this thread looks.
        self.maybe_housekeep(requests.len(), || {
            requests.iter().filter_map(|request| request.at_ms).min()
        });
        results
    }

    /// A `consume_many`'s logged decisions whose events could not be made durable: their
    /// effects are given back, their request ids forgotten, and each one's result is the error.
    fn undo_pending(
        &self,
        requests: &[UsageRequest<'_>],
        pending: &[PendingEvent],
        results: &mut [Result<Decision, Error>],
        mut replays: Option<&mut Vec<bool>>,
        error: &Error,
    ) {
        for &PendingEvent { index, receipt, .. } in pending {
            let request = &requests[index];
            // The quantities were valid when the request was decided, so they still are.
            if let (Some(receipt), Ok(quantities)) = (receipt, Quantities::new(request.quantities))
            {
                self.give_back(
                    request.key,
                    request.resource,
                    &receipt,
                    &quantities,
                    true,
                    None,
                );
            }
            if let Some(request_id) = request.request_id {
                self.requests.forget(request_id);
            }
            results[index] = Err(error.clone());
            if let Some(replays) = replays.as_deref_mut() {
                replays[index] = false;
            }
        }
    }

    /// One request of `consume_many` (the `index`th), decided into `decision`: if it is a
    /// replay, where the first decision's event stands. If its event was staged, what to give
    /// back should the batch's append or wait fail goes onto `pending`, and a first decision's
    /// record points at `chunk`, the chunk's sequence number to be. `expiry_failure`: the log
    /// refused the batch's expiry of ended leases (`expire_leases_before_batch`), so a denial
    /// such a lease may explain is neither answered nor logged (nor remembered for its id):
    /// the request answers that error, as `admit`'s would.
    #[allow(clippy::too_many_arguments)]
    fn admit_without_waiting(
        &self,
        request: &UsageRequest<'_>,
        batch: (u64, Option<&mut Staged>),
        decision: &mut Decision,
        index: usize,
        pending: &mut Vec<PendingEvent>,
        chunk: &mut ChunkSeqGuard,
        expiry_failure: Option<&Error>,
    ) -> Result<Option<LoggedAs>, Error> {
        let at_ms = self.resolve_time(request.at_ms)?;
        let mut quantities = Quantities::default();
        quantities.parse(request.quantities)?;
        // Checked as `admit_deciding` checks it: a key of a sound length is looked at further
        // only once it is not found (`decide_logged`), so an entry with more than one thing
        // wrong is refused for the same one as its `consume` (and the C ABI's status) is.
        if request.key.is_empty() || request.key.len() > MAX_KEY_BYTES {
            check_id("key", request.key, MAX_KEY_BYTES)?;
        }
        let Some(request_id) = request.request_id else {
            let mut verdict = Verdict::new(decision);
            verdict.may_expire_leases = expiry_failure.is_some();
            let logged = self.decide_logged(
                request.key,
                request.resource,
                &quantities,
                None,
                at_ms,
                Mode::Consume,
                &mut verdict,
                Some(batch),
            )?;
            if let (Some(error), true) = (expiry_failure, verdict.lease_ended_ms != 0) {
                return Err(error.clone());
            }
            if let (true, Some(receipt)) = (logged != Logged::Not, verdict.receipt) {
                pending.push(PendingEvent {
                    index,
                    receipt: Some(receipt),
                    seq: logged.seq(),
                });
            }
            return Ok(None);
        };
        check_id("request_id", request_id, MAX_REQUEST_ID_BYTES)?;
        let fingerprint = Fingerprint {
            key: request.key,
            resource: request.resource,
            quantities,
        };
        let kept = self.requests.once(
            request_id,
            &fingerprint,
            (at_ms, self.clock.now_ms()),
            || self.key_refusal(request.key, request.resource, &quantities),
            || {
                let mut decision = Decision::denied(DenialReason::UnknownKey);
                let mut verdict = Verdict::new(&mut decision);
                verdict.may_expire_leases = expiry_failure.is_some();
                let outcome = self.decide_logged(
                    request.key,
                    request.resource,
                    &quantities,
                    Some(request_id),
                    at_ms,
                    Mode::Consume,
                    &mut verdict,
                    Some(batch),
                )?;
                if verdict.lease_ended_ms != 0 {
                    // Left for the expiry's error: not remembered.
                    return Ok(None);
                }
                // Logged, admitted or denied: the batch's wait decides whether it stands.
                let receipt = verdict.receipt;
                let logged = match outcome {
                    Logged::Not => LoggedAs::Durable,
                    Logged::Staged => LoggedAs::Chunk(chunk.get()),
                    Logged::At(seq) => LoggedAs::Event(seq),
                };
                if outcome != Logged::Not {
                    pending.push(PendingEvent {
                        index,
                        receipt,
                        seq: outcome.seq(),
                    });
                }
                Ok(Some((decision, receipt, logged)))
            },
        )?;
        match kept {
            Some((kept, replay)) => {
                *decision = kept;
                Ok(replay)
            }
            // Left undecided, which a batch's verdict is only once its expiry failed.
            None => Err(expiry_failure
                .cloned()
                .expect("a batch leaves a denial undecided only when its expiry failed")),
        }
    }

    /// The console's usage bar for a key: every limit of its plan, and the credits.
    pub fn usage(&self, key: &str, at_ms: Option<u64>) -> Result<UsageReport, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        check_id("key", key, MAX_KEY_BYTES)?;
        // What an ended lease held is not reported as used (as `consume` would not count it);
        // if the log refuses the expiry, the holds are reported as they stand.
        let _ = self.expire_leases_ended_by(Some(at_ms));
        self.keys.read(key, |policy, state| {
            let state = state.ok_or_else(|| Error::UnknownKey { key: key.into() })?;
            // As a request stamped `at_ms` is decided: no earlier than the key's time floor.
            let as_of_ms = at_ms.max(state.time_floor_ms);
            let mut limits = Vec::new();
            if let Some(plan_id) = state.seat {
                let plan = policy.plan(plan_id);
                let usage = state.usage.get();
                for (index, limit) in plan.limits.iter().enumerate() {
                    let status = match usage {
                        Some(usage) => crate::admission::status_of(
                            policy,
                            limit,
                            &usage.counters[index].state,
                            index as u8,
                            as_of_ms,
                        ),
                        // No usage yet: the same report as empty windows (a calendar window
                        // still resets at its period's end).
                        None => LimitStatus {
                            limit: index as u8,
                            used: 0,
                            amount: limit.amount,
                            reset_at_ms: match limit.window {
                                Window::Calendar(kind) => {
                                    Some(policy.calendar().period_of(kind, as_of_ms).end_ms)
                                }
                                Window::Rolling { .. } => None,
                            },
                        },
                    };
                    limits.push(LimitReport {
                        name: limit.name.to_string(),
                        meter: policy.meter(limit.meter).name.to_string(),
                        window: limit.window,
                        amount: limit.amount,
                        used: status.used,
                        remaining: status.remaining(),
                        reset_at_ms: status.reset_at_ms,
                    });
                }
            }
            Ok(UsageReport {
                key: key.into(),
                kind: state.kind,
                revoked: state.revoked,
                user: state.user.to_string(),
                team: state.team.name.to_string(),
                plan: state.seat.map(|seat| policy.plan(seat).name.to_string()),
                limits,
                credits_balance_micros: state.team.balance_micros(),
                credits_charged_micros: state.team.charged_micros(),
                open_reservations: state
                    .open_reservations
                    .load(std::sync::atomic::Ordering::Acquire),
                payg_micros: state.payg_micros.load(Ordering::Acquire),
                at_ms,
            })
        })
    }
}

/// Resolves a resource name and checks the request's units against it.
pub(crate) fn resolve_resource(
    policy: &Policy,
    resource: &str,
    quantities: &Quantities,
) -> Result<ResourceId, Error> {
    resolve_resource_spec(policy, resource, quantities).map(|(id, _)| id)
}

/// `resolve_resource`, with the resource's definition (the admission path reads it next).
/// Always inlined: once a cold caller (`Engine::key_refusal`) called it too, the admission
/// path called it out of line, 30 instructions more per hot-key consume (callgrind).
#[inline(always)]
pub(crate) fn resolve_resource_spec<'p>(
    policy: &'p Policy,
    resource: &str,
    quantities: &Quantities,
) -> Result<(ResourceId, &'p Resource), Error> {
    let id = policy
        .resource_id(resource)
        .ok_or_else(|| Error::UnknownResource {
            resource: resource.into(),
        })?;
    let spec = policy.resource(id);
    // One mask test for the usual request (every unit metered, every required unit there);
    // the messages below are worked out only when something is wrong.
    let given = quantities.unit_mask();
    if (spec.required_mask & !given) | (given & !spec.unit_mask) == 0 {
        return Ok((id, spec));
    }
    let (metered, required) = (&spec.units, &spec.required);
    if let Some(unit) = Unit::ALL
        .into_iter()
        .find(|unit| required[unit.index()] && quantities.get(*unit) == 0)
    {
        return Err(Error::invalid(
            "quantities",
            format!("a request for {resource:?} must carry {unit}"),
        ));
    }
    if let Some((unit, _)) = quantities.pairs().find(|(unit, _)| !metered[unit.index()]) {
        return Err(Error::invalid(
            "quantities",
            format!("resource {resource:?} does not meter {unit}"),
        ));
    }
    Ok((id, spec))
}

/// The admission decision for one existing key.
#[inline]
pub(crate) fn decide_for_key(
    policy: &Policy,
    state: &KeyState,
    resource: ResourceId,
    quantities: &Quantities,
    at_ms: u64,
    mode: Mode,
) -> Result<(Decision, Option<Receipt>), Error> {
    let mut decision = Decision::denied(DenialReason::UnknownKey);
    let mut verdict = Verdict::new(&mut decision);
    decide_for_key_into(
        policy,
        state,
        resource,
        policy.resource(resource),
        quantities,
        at_ms,
        mode,
        &mut verdict,
    )?;
    let receipt = verdict.receipt;
    Ok((decision, receipt))
}

/// `decide_for_key`, written into `verdict` in place (the hot path). `resource_spec` is
/// `policy.resource(resource)`, which the caller has at hand.
#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide_for_key_into(
    policy: &Policy,
    state: &KeyState,
    resource: ResourceId,
    resource_spec: &Resource,
    quantities: &Quantities,
    at_ms: u64,
    mode: Mode,
    verdict: &mut Verdict<'_>,
) -> Result<(), Error> {
    // Time never goes back for a key, even across a reclaim of its idle windows: the request
    // is decided at its key's time floor if that is later.
    let floor_ms = state.time_floor_ms;
    decide_at_or_after_floor(
        policy,
        state,
        resource,
        resource_spec,
        quantities,
        at_ms.max(floor_ms),
        mode,
        verdict,
    )?;
    if floor_ms > at_ms {
        wait_from_request_time(verdict.decision, at_ms);
    }
    Ok(())
}

/// Measures a quota denial's `retry_after_ms` from `request_at_ms`, the request's own
/// timestamp, where the request was decided at a later time (its key's time floor): the
/// caller waits from its own timestamp, and `request_at_ms + retry_after_ms` must be
/// `retry_at_ms`, never earlier.
#[cold]
fn wait_from_request_time(decision: &mut Decision, request_at_ms: u64) {
    if let Decision::Denied(crate::admission::Denial {
        reason:
            DenialReason::QuotaExhausted {
                retry_at_ms,
                retry_after_ms,
                ..
            },
        ..
    }) = decision
    {
        *retry_after_ms = retry_at_ms.saturating_sub(request_at_ms);
    }
}

/// A request over its key's plan's own maximum (not the resource's): denied naming the plan,
/// with a plan whose maximum and limits allow it to suggest (neither credits nor waiting lift a
/// plan's maximum). Out of line, as the other denials' remedies are: inlined, the hot path ran
/// 22 instructions more per consume (callgrind).
#[cold]
#[inline(never)]
fn deny_over_plan_maximum(
    verdict: &mut Verdict<'_>,
    policy: &Policy,
    plan_id: crate::policy::PlanId,
    reason: DenialReason,
    (resource, quantities): (ResourceId, &Quantities),
) {
    verdict.deny(reason);
    if let Decision::Denied(denial) = verdict.decision {
        denial.plan = Some(plan_id);
        denial.remedies.upgrade_to =
            cover_upgrade_for(policy, Some(policy.plan(plan_id)), resource, quantities);
    }
}

/// `decide_for_key_into` at `at_ms`, already at or after the key's time floor.
#[inline]
#[allow(clippy::too_many_arguments)]
fn decide_at_or_after_floor(
    policy: &Policy,
    state: &KeyState,
    resource: ResourceId,
    resource_spec: &Resource,
    quantities: &Quantities,
    at_ms: u64,
    mode: Mode,
    verdict: &mut Verdict<'_>,
) -> Result<(), Error> {
    debug_assert!(std::ptr::eq(resource_spec, policy.resource(resource)));
    debug_assert!(at_ms >= state.time_floor_ms);
    if state.revoked {
        verdict.deny(DenialReason::KeyRevoked);
        return Ok(());
    }
    if resource_spec.has_maximum {
        if let Some(reason) = over_maximum(&resource_spec.max_per_request, quantities) {
            verdict.deny(reason);
            return Ok(());
        }
    }
    // A price that overflows is bad input whoever pays; only large requests need the check.
    if resource_spec.priced && quantities.sum() > resource_spec.safe_quantity_sum {
        price_micros(policy, resource, quantities)?;
    }
    if state.kind == KeyKind::PayAsYouGo {
        let price = price_micros(policy, resource, quantities)?;
        (*verdict.decision, verdict.receipt) =
            pay_as_you_go(policy, state, resource, price, at_ms, mode)?;
        return Ok(());
    }
    let mut quota_denial = None;
    // The price, once worked out (itself `None` for a resource without one).
    let mut price = None;
    let mut fallback = DenialReason::NoResources;
    // A key without a seat: a seat on a plan that covers the resource would help, as credits
    // would (the seed's "once a seat is assigned, or Credits access is available").
    let mut suggest_cover = state.seat.is_none();
    if let Some(plan_id) = state.seat {
        let plan = policy.plan(plan_id);
        let summary = &plan.admission[resource.index()];
        if summary.has_maximum {
            if let Some(reason) = over_maximum(&plan.maximums[resource.index()], quantities) {
                deny_over_plan_maximum(verdict, policy, plan_id, reason, (resource, quantities));
                return Ok(());
            }
        }
        if summary.covers {
            let mut amounts = Amounts::empty();
            match summary.unit_at_weight_one {
                Some(unit) => amounts.fill_at_weight_one(summary.limits(), quantities.get(unit)),
                None => {
                    if !amounts.fill(&plan.touches[resource.index()], quantities) {
                        return Err(Error::Overflow {
                            field: "quantities",
                        });
                    }
                }
            }
            // A check on a key that never used anything looks at empty windows without keeping
            // them: a key with no usage holds no window memory. So does a consume larger than
            // one of the limits, which empty windows can only refuse (whatever it takes from
            // the scratch windows before that goes with them).
            let scratch;
            let usage = match (state.usage.get(), mode) {
                (Some(usage), _) => usage,
                (None, Mode::Consume) if amounts.first_over_its_limit(plan).is_none() => state
                    .usage
                    .get_or_init(|| KeyUsage::for_plan(policy, Some(plan_id))),
                (None, _) => {
                    scratch = KeyUsage::for_plan(policy, Some(plan_id));
                    &*scratch
                }
            };
            if try_quota(
                policy,
                plan_id,
                plan,
                usage,
                &state.usage,
                &amounts,
                at_ms,
                mode,
                verdict,
            ) {
                return Ok(());
            }
            // The plan may be refusing on a hold whose lease has ended: denied, for the caller
            // to expire it and decide again (`Verdict::ended_lease_may_hold`), rather than
            // charged to credits. A request over a limit itself is refused whatever is held.
            if verdict.ended_lease_may_hold && amounts.first_over_its_limit(plan).is_none() {
                let denial = plan_refusal(
                    policy,
                    plan_id,
                    usage,
                    &amounts,
                    (resource, quantities),
                    at_ms,
                );
                *verdict.decision = Decision::Denied(denial);
                verdict.receipt = None;
                return Ok(());
            }
            // Credits that cover the price admit the request with the plan's limit statuses;
            // when the plan would take it again (a scan of a rolling window's buckets) is
            // worked out only for a refusal.
            price = Some(price_micros(policy, resource, quantities)?);
            if let Some(price) = price.flatten().filter(|_| state.team.balance_micros() > 0) {
                let limits = plan_statuses(policy, plan_id, usage, &amounts, at_ms);
                if let Some(admission) =
                    credits_admission(&state.team, price, at_ms, state.seat, limits, mode)
                {
                    *verdict.decision = Decision::Admitted(admission);
                    verdict.receipt = Some(Receipt {
                        charged_to: admission.charged_to,
                        generation: policy.generation,
                        holds: Holds::default(),
                    });
                    return Ok(());
                }
            }
            quota_denial = Some(plan_refusal(
                policy,
                plan_id,
                usage,
                &amounts,
                (resource, quantities),
                at_ms,
            ));
        } else {
            fallback = DenialReason::ResourceNotCovered { resource };
            suggest_cover = true;
        }
    }
    // Priced only now: a request the plan took never needs it.
    let price = match price {
        Some(price) => price,
        None => price_micros(policy, resource, quantities)?,
    };
    // A key without a seat but with credits has resources: what it lacks for a resource
    // without a price is a plan that covers it.
    if price.is_none() && state.seat.is_none() && state.team.balance_micros() > 0 {
        fallback = DenialReason::ResourceNotCovered { resource };
    }
    let mut decision = try_credits(
        &state.team,
        price,
        at_ms,
        state.seat,
        quota_denial,
        mode,
        fallback,
    );
    let receipt = match &mut decision {
        Decision::Admitted(admission) => Some(Receipt {
            charged_to: admission.charged_to,
            generation: policy.generation,
            holds: Holds::default(),
        }),
        Decision::Denied(denial) => {
            if denial.remedies.upgrade_to.is_none() && suggest_cover {
                let current = state.seat.map(|seat| policy.plan(seat));
                denial.remedies.upgrade_to =
                    cover_upgrade_for(policy, current, resource, quantities);
            }
            None
        }
    };
    *verdict.decision = decision;
    verdict.receipt = receipt;
    Ok(())
}

fn pay_as_you_go(
    policy: &Policy,
    state: &KeyState,
    resource: ResourceId,
    price: Option<u64>,
    at_ms: u64,
    mode: Mode,
) -> Result<(Decision, Option<Receipt>), Error> {
    let _ = policy;
    let Some(price) = price else {
        return Ok((
            Decision::denied(DenialReason::ResourceNotCovered { resource }),
            None,
        ));
    };
    // The key's spend is a total that never resets: once this price would take it past `u64`,
    // a check answers what a consume would, the same error naming what overflowed.
    let fits = match mode {
        Mode::Consume => state.add_payg(price),
        Mode::Check => state.payg_micros.load(Ordering::Acquire).checked_add(price),
    };
    fits.ok_or(Error::Overflow {
        field: "key (pay_as_you_go_micros, its total pay-as-you-go spend)",
    })?;
    let charged_to = ChargedTo::PayAsYouGo { micros: price };
    let admission = Admission {
        charged_to,
        at_ms,
        plan: None,
        limits: Default::default(),
        credits_balance_micros: None,
    };
    let receipt = Receipt {
        charged_to,
        generation: policy.generation,
        holds: Holds::default(),
    };
    Ok((Decision::Admitted(admission), Some(receipt)))
}

#[cfg(test)]
thread_local! {
    /// Run by `assign_seat` on this thread before `change_seat` locks anything, where it once
    /// found the member's key (a test's window for a racing revoke and rotation).
    pub(crate) static BEFORE_SEAT_CHANGE: std::cell::RefCell<Option<Box<dyn Fn()>>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_found_by_the_byte_scan_exactly_as_by_char() {
        for text in [
            "plain",
            "tab\there",
            "nul\0",
            "del\u{7f}",
            "c1\u{85}x",
            "é ü ß",
            "\u{a0}nbsp",
            "日本",
            "eight by\u{9f}",
            "seven b\u{80}",
            "£ and ¿ start with 0xC2 too",
            "0123456789abcdef0123456789abcdef0123",
            "0123456789abcdef0123456789abcdef012\n",
            "0123456789abcdef\u{1}123456789abcdef0123",
        ] {
            assert_eq!(
                has_control_character(text),
                text.chars().any(char::is_control),
                "{text:?}"
            );
        }
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// The word-at-a-time pass agrees with a scan by `char` on any text, drawn from an
        /// alphabet dense in the bytes it looks for (below 0x20, 0x7F, and 0xC2 leading C1
        /// controls and printable characters alike), at every alignment.
        #[test]
        fn the_word_at_a_time_scan_finds_control_characters_exactly(
            text in proptest::collection::vec(
                proptest::sample::select(vec![
                    'a', 'Z', ' ', '~', '\u{0}', '\n', '\u{1f}', '\u{7f}', '\u{80}', '\u{9f}',
                    '\u{a0}', '£', '¿', 'é', '日', '\u{7ff}',
                ]),
                0..40,
            ).prop_map(|chars: Vec<char>| chars.into_iter().collect::<String>()),
            skip in 0usize..8,
        ) {
            let text = &text[text.char_indices().nth(skip).map_or(text.len(), |(at, _)| at)..];
            proptest::prop_assert_eq!(
                has_control_character(text),
                text.chars().any(char::is_control)
            );
        }
    }

    fn engine_in_memory() -> Engine {
        Engine::new(
            Policy::token_plan(),
            Arc::new(crate::ManualClock::new(1_900_000_000_000)),
            EngineOptions::default(),
        )
        .expect("an engine")
    }

    /// An event that makes a key is logged before the key is in the table (admin calls write
    /// ahead), so an export reader can read it first: its team comes from the event itself.
    #[test]
    fn an_event_that_makes_a_key_names_its_team_before_the_key_exists() {
        let engine = engine_in_memory();
        let cases = [
            (
                EventBody::UserCreated {
                    user: "ada".into(),
                    key: "tp-ada".into(),
                },
                "@ada",
            ),
            (
                EventBody::MemberAdded {
                    team: "acme".into(),
                    user: "ada".into(),
                    key: "tp-ada-acme".into(),
                },
                "acme",
            ),
            (
                EventBody::PayAsYouGoKeyCreated {
                    user: "ada".into(),
                    key: "pg-ada".into(),
                },
                "@ada",
            ),
            (
                EventBody::SeatChanged {
                    team: "acme".into(),
                    user: "ada".into(),
                    key: "tp-ada-acme".into(),
                    plan: Some("Plus".into()),
                },
                "acme",
            ),
        ];
        for (body, team) in cases {
            assert_eq!(
                engine.team_of_event(&body).as_deref(),
                Some(team),
                "{}",
                body.kind()
            );
        }
    }

    /// A denial of a key the engine did not know concerned no team, even once a key of that
    /// name is made later: it is not billed to the team that key went to.
    #[test]
    fn an_unknown_key_denial_names_no_team_even_once_the_key_is_made() {
        let engine = engine_in_memory();
        let resource = Policy::token_plan().resources()[0].name.to_string();
        let denial = |reason| EventBody::RequestDenied {
            request_id: "req-1".into(),
            key: "tp-later".into(),
            resource: resource.clone(),
            quantities: Quantities::new(&[(Unit::Requests, 1)]).expect("quantities"),
            decision: Decision::denied(reason),
        };
        engine
            .create_user("later", "tp-later", None)
            .expect("the key made after the denial");
        assert_eq!(
            engine.team_of_event(&denial(DenialReason::UnknownKey)),
            None
        );
        // A denial of the key once it existed is its team's.
        assert_eq!(
            engine
                .team_of_event(&denial(DenialReason::NoResources))
                .as_deref(),
            Some("@later")
        );
    }

    /// A name an earlier build logged padded with whitespace replays as logged; only a name
    /// being created now is refused.
    #[test]
    fn a_padded_name_from_the_log_is_taken_as_logged() {
        let engine = Engine::new(
            Policy::token_plan(),
            Arc::new(crate::ManualClock::new(1_900_000_000_000)),
            EngineOptions::default(),
        )
        .expect("an engine");
        assert!(engine.create_team(" padded", None).is_err());
        engine.set_replaying(true);
        engine
            .create_team(" padded", None)
            .expect("replayed as logged");
        engine
            .create_user("ann ", "tp-ann ", None)
            .expect("replayed as logged");
        engine.set_replaying(false);
        assert!(engine.create_team(" padded too", None).is_err());
        assert!(padded_with_whitespace("\u{3000}x") && !padded_with_whitespace("a b"));
    }
}
