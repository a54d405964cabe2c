//! Arbitrary sequences of C ABI calls (the `extern "C"` functions of `tally-ffi`, called from
//! Rust through its rlib) against one engine, in memory or on a temporary database with
//! durability NONE, with bad input of every kind: empty, non-UTF-8, NUL-holding and over-long
//! strings, NULL pointers with lengths, out-of-range enums, quantities of 0, 2^40 + 1 and
//! `u64::MAX`, timestamps going backwards or past 2100, reused request ids, buffers too small,
//! use after close.
//!
//! Invariants checked on every call:
//! - every status has a name (`tally_status_name` is not `TALLY_UNKNOWN_STATUS`) and is never
//!   `TALLY_PANIC` or `TALLY_POISONED` (libfuzzer-sys's panic hook also aborts on any panic the
//!   boundary would catch);
//! - a failed engine call leaves a last-error message; out-pointers are not written on failure;
//! - nothing but `TALLY_CLOSED` (or an argument error) after close;
//! - `TALLY_BUFFER_TOO_SMALL` reports a `needed` larger than the buffer, copies nothing, and a
//!   second call with `needed` bytes succeeds (or reports a larger size); text written is
//!   NUL-terminated UTF-8 of `needed - 1` bytes, and JSON where JSON is promised;
//! - a decision is admitted with a `charged_to` other than NONE and no denial, or denied with a
//!   known denial and `charged_to` NONE; names in it are NUL-terminated;
//! - a Starter key set up before the operations never gets more `m2.7` requests admitted from
//!   plan quota than its 5-hour limit (1,500) while every admission lies within 5 hours;
//! - a consume, check, reserve or settle refused (a status other than OK), a consume denied or
//!   answering a repeated request id, a check, a denied reserve or settle leaves the key's usage
//!   report (read through `tally_engine_usage` at the call's stamp before and after: every
//!   limit's used and remaining, the team's credits, the open reservations) as it was, in three
//!   inputs in four; excused: an expiry of a lease that may have ended between the reads, and a
//!   settle refused `TALLY_RESERVATION_EXPIRED` (documented: it gives the hold back);
//! - a key revoked (`tally_engine_revoke_key` answered OK) is never admitted again, and a
//!   fresh decision on it is denied `TALLY_DENIAL_KEY_REVOKED` (a repeat of a request id
//!   answers as the first did); revoking reports whether it revoked the key now, and
//!   `revoked_out` is not written on failure;
//! - a database closed cleanly verifies as sound, and opening it while open is
//!   `TALLY_DATABASE_LOCKED`;
//! - an in-memory engine opened on the shipped policy's JSON behaves as on the policy itself
//!   (the fixed key's Starter limit holds).
//!
//! Every handle is freed at the end of each input.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, CStr};
use std::path::PathBuf;
use std::ptr;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tally::*;

/// 2030-03-17T17:46:40Z: after the machine's clock, so explicit times are "the future".
const T0: u64 = 1_900_000_000_000;
/// 2100-01-01T00:00:00Z, the first timestamp the ABI refuses.
const Y2100: u64 = 4_102_444_800_000;
const HOUR_MS: u64 = 3_600_000;
const MAX_OPS: usize = 64;

const KEYS: [&str; 6] = ["k0", "k1", "k2", "k3", "kfixed", "kpayg"];
const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
const TEAMS: [&str; 6] = ["@u0", "@u1", "@u2", "@u3", "t0", "t1"];
const RESOURCES: [&str; 8] = [
    "m2.7",
    "m2.7-highspeed",
    "speech-2.8",
    "image-01",
    "hailuo-2.3-fast-768p-6s",
    "hailuo-2.3-768p-6s",
    "music-2.6",
    "no-such-model",
];
const PLANS: [&str; 10] = [
    "Starter",
    "Plus",
    "Max",
    "Plus-Highspeed",
    "Max-Highspeed",
    "Ultra-Highspeed",
    "Bar-Plus",
    "Bar-Max",
    "Bar-Ultra",
    "NoSuchPlan",
];
const IDS: [&str; 4] = ["r0", "r1", "r2", "r3"];
const CURSORS: [&str; 2] = ["billing", "audit"];

/// The user, team and key of the plan-quota invariant: set up on Starter before the operations
/// (the pools above never name them; a raw string that does switches the check off).
const FIXED_USER: &str = "fixed";
const FIXED_TEAM: &str = "@fixed";
const FIXED_KEY: &str = "kfixed";
const STARTER_M27_REQUESTS_PER_5H: u64 = 1500;

/// A string argument.
#[derive(Arbitrary, Debug, Clone)]
enum Text {
    /// A valid name from the field's pool.
    Pool(u8),
    Empty,
    Raw(Vec<u8>),
    /// A pool name with an invalid UTF-8 byte appended.
    NonUtf8(u8),
    /// A pool name with a NUL byte inside.
    Nul(u8),
    /// One to 256 bytes more than the field's bound.
    TooLong(u8),
    /// NULL with a non-zero length.
    NullWithLen(u8),
    /// NULL with length 0 ("not given" for optional strings).
    Null,
}

/// An argument as passed: the bytes (None = NULL) and the length.
struct Arg {
    bytes: Option<Vec<u8>>,
    len: usize,
}

impl Arg {
    fn ptr(&self) -> *const c_char {
        self.bytes
            .as_ref()
            .map_or(ptr::null(), |bytes| bytes.as_ptr().cast())
    }

    fn is(&self, text: &str) -> bool {
        self.bytes.as_deref() == Some(text.as_bytes())
    }
}

impl Text {
    fn arg(&self, pool: &[&str], max_bytes: usize) -> Arg {
        let pick = |index: u8| pool[usize::from(index) % pool.len()].as_bytes().to_vec();
        let bytes = match self {
            Text::Pool(index) => Some(pick(*index)),
            Text::Empty => Some(Vec::new()),
            Text::Raw(bytes) => Some(bytes.clone()),
            Text::NonUtf8(index) => Some([pick(*index), vec![0xff]].concat()),
            Text::Nul(index) => {
                let mut bytes = pick(*index);
                bytes.insert(1, 0);
                Some(bytes)
            }
            Text::TooLong(extra) => Some(vec![b'x'; max_bytes + 1 + usize::from(*extra)]),
            Text::NullWithLen(len) => {
                return Arg {
                    bytes: None,
                    len: usize::from(*len) + 1,
                }
            }
            Text::Null => None,
        };
        let len = bytes.as_ref().map_or(0, Vec::len);
        Arg { bytes, len }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum UnitArg {
    Requests,
    Characters,
    Images,
    Videos,
    Songs,
    Seconds,
    Tokens,
    Raw(u32),
}

impl UnitArg {
    fn code(self) -> u32 {
        match self {
            UnitArg::Requests => 0,
            UnitArg::Characters => 1,
            UnitArg::Images => 2,
            UnitArg::Videos => 3,
            UnitArg::Songs => 4,
            UnitArg::Seconds => 5,
            UnitArg::Tokens => 6,
            UnitArg::Raw(code) => code,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Amount {
    Zero,
    One,
    Small(u8),
    Medium(u16),
    Large(u32),
    Pow40,
    Pow40Plus1,
    Max,
    Raw(u64),
}

impl Amount {
    fn value(self) -> u64 {
        match self {
            Amount::Zero => 0,
            Amount::One => 1,
            Amount::Small(n) => u64::from(n),
            Amount::Medium(n) => u64::from(n),
            Amount::Large(n) => u64::from(n),
            Amount::Pow40 => 1 << 40,
            Amount::Pow40Plus1 => (1 << 40) + 1,
            Amount::Max => u64::MAX,
            Amount::Raw(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Quantities {
    /// The units the resource requires, each `n`.
    Typical(u8),
    List(Vec<(UnitArg, Amount)>),
    NullWithLen(u8),
}

/// Quantities as passed: the array (None = NULL) and its length.
struct QuantityArg {
    items: Option<Vec<tally_quantity>>,
    len: usize,
}

impl QuantityArg {
    fn ptr(&self) -> *const tally_quantity {
        self.items
            .as_ref()
            .map_or(ptr::null(), |items| items.as_ptr())
    }
}

fn required_units(resource: &[u8]) -> &'static [u32] {
    match resource {
        b"speech-2.8" => &[1],
        b"image-01" => &[2],
        b"hailuo-2.3-fast-768p-6s" | b"hailuo-2.3-768p-6s" => &[3],
        b"music-2.6" => &[4, 5],
        _ => &[0],
    }
}

impl Quantities {
    fn arg(&self, resource: &Arg) -> QuantityArg {
        let items: Vec<tally_quantity> = match self {
            Quantities::Typical(n) => {
                let units = required_units(resource.bytes.as_deref().unwrap_or_default());
                units
                    .iter()
                    .map(|&unit| tally_quantity {
                        unit,
                        amount: u64::from(*n) + 1,
                    })
                    .collect()
            }
            Quantities::List(list) => list
                .iter()
                .take(9)
                .map(|&(unit, amount)| tally_quantity {
                    unit: unit.code(),
                    amount: amount.value(),
                })
                .collect(),
            Quantities::NullWithLen(len) => {
                return QuantityArg {
                    items: None,
                    len: usize::from(*len) + 1,
                }
            }
        };
        let len = items.len();
        QuantityArg {
            items: Some(items),
            len,
        }
    }

    fn requests(&self, resource: &Arg) -> u64 {
        self.arg(resource)
            .items
            .unwrap_or_default()
            .iter()
            .filter(|quantity| quantity.unit == 0)
            // Saturating: a unit given twice with huge amounts is refused, never admitted.
            .fold(0u64, |sum, quantity| sum.saturating_add(quantity.amount))
    }
}

/// A timestamp argument; the run keeps a clock that the step variants move.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Time {
    /// `TALLY_NOW`: the engine's (system) clock.
    Now,
    Current,
    ForwardMs(u16),
    ForwardMinutes(u8),
    ForwardHours(u8),
    BackwardMs(u16),
    BackwardHours(u8),
    /// On a 5-hour window boundary (from T0).
    OnBoundary(u8),
    /// Around 2100-01-01 (at or after it is `TALLY_BAD_TIMESTAMP`).
    Near2100(i16),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone)]
struct Req {
    key: Text,
    resource: Text,
    quantities: Quantities,
    at: Time,
    id: Option<Text>,
}

/// A request's arguments, kept alive while the `tally_request` that points into them is used.
struct BuiltReq {
    key: Arg,
    resource: Arg,
    quantities: QuantityArg,
    at_ms: u64,
    id: Arg,
    requests: u64,
}

impl BuiltReq {
    fn raw(&self) -> tally_request {
        tally_request {
            key: self.key.ptr(),
            key_len: self.key.len,
            resource: self.resource.ptr(),
            resource_len: self.resource.len,
            quantities: self.quantities.ptr(),
            quantities_len: self.quantities.len,
            at_ms: self.at_ms,
            request_id: self.id.ptr(),
            request_id_len: self.id.len,
        }
    }
}

/// A caller-owned output buffer.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Buf {
    Null,
    NullWithLen(u8),
    Zero,
    Small(u8),
    Medium(u16),
    Large,
    /// `needed` itself is NULL.
    NullNeeded,
}

#[derive(Arbitrary, Debug, Clone)]
enum PolicyArg {
    Default,
    /// The current policy's own JSON (from `tally_engine_policy_json`).
    CurrentJson,
    Toml(String),
    Json(String),
    /// A source and text as given (file paths, out-of-range sources).
    Raw(u32, Text),
}

/// Which pointer of a call is NULL.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum NullCall {
    ConsumeRequest,
    ConsumeDecision,
    CheckRequest,
    ManyRequests(u8),
    ManyStatuses,
    ManyDecisions,
    ReserveOut,
    SettleOut,
    ExpireOut,
    TopUpOut,
    CreditsOut,
    CursorOut,
    CheckpointOut,
    CompactOut,
    OpenOut,
    VerifyOut,
    NullEngine(u8),
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Consume(Req),
    Check(Req),
    ConsumeMany(Vec<Req>),
    /// A batch of one request repeated `count` times (0 and above `TALLY_MAX_BATCH` included).
    ConsumeManyRepeated(Req, u16),
    CreateUser(Text, Text),
    CreateTeam(Text),
    AddMember(Text, Text, Text),
    CreatePaygKey(Text, Text),
    AssignSeat(Text, Text, Text),
    UnassignSeat(Text, Text),
    TopUp(Text, Amount),
    Withdraw(Text, Amount),
    Credits(Text),
    Reserve(Req, u64),
    Settle(u8, Quantities, Time),
    Void(u8, Time),
    Expire(Time),
    Refund(Text, Time),
    Usage(Text, Time, Buf),
    PolicyJson(Buf),
    EventsAfter(u64, u32, Buf),
    Cursor(Text),
    SaveCursor(Text, u64),
    Checkpoint,
    Sync,
    Compact(Time),
    SwapPolicy(PolicyArg, Time),
    LastError(Buf),
    StatusName(u32),
    Version,
    Null(NullCall),
    Close,
    /// Close (if open), free and open again: the same database, or a fresh in-memory engine.
    Reopen,
    /// Open the same database a second time (locked while open).
    OpenAgain,
    /// `tally_verify` on the database (locked while open; sound once closed).
    Verify(Buf),
    /// A reservation id the run made up.
    ForgeReservation(u64),
    /// Options set one at a time (`which` picks the setter), then an in-memory engine opened
    /// with them.
    Options(Vec<(u8, u64)>),
    // Appended with key revocation (arbitrary's derive scales a variant index over the variant
    // count, so the corpus entries written before decode to nearby variants now).
    /// `tally_engine_revoke_key` on a key; `revoked_out` is NULL when the `u8` is 0 mod 8.
    RevokeKey(Text, Time, u8),
    /// A leaked key rotated: revoke `key`, then give `user` a new key in `team`
    /// (`tally_engine_add_member`, which does so only for a member whose key is revoked).
    RotateKey {
        key: Text,
        team: Text,
        user: Text,
        new_key: Text,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// On a temporary database (one input in eight, 1 mod 8: sled is slow to open) or in
    /// memory.
    durable: u8,
    ops: Vec<Op>,
}

/// The plan-quota model of the fixed Starter key.
#[derive(Default)]
struct Fixed {
    broken: bool,
    admitted: u64,
    first_at: u64,
    last_at: u64,
    /// Plan-quota requests admitted under each request id (given back by a refund).
    by_id: HashMap<Vec<u8>, u64>,
}

struct World {
    engine: *mut tally_engine,
    closed: bool,
    dir: Option<PathBuf>,
    clock: u64,
    reservations: Vec<u64>,
    fixed: Fixed,
    /// The policy swapped in (JSON), to open the database with again; None = the default.
    policy: Option<Vec<u8>>,
    /// Whether this input opened the database a second time while it was open.
    tried_locked: bool,
    /// The keys revoked in this engine (or database) so far.
    revoked: HashSet<Vec<u8>>,
    /// Whether this input reads a key's usage report around each consume, check, reserve and
    /// settle that must change nothing (three inputs in four, by `durable`'s bits 4 and 5: the
    /// read before the call expires the leases ended by then, which the call would otherwise
    /// meet itself, so the other inputs keep reaching that path).
    unchanged_check: bool,
    /// When the lease of each reservation admitted ends, at the earliest and at the latest (a
    /// reservation stamped `TALLY_NOW` ends `lease` after a clock reading the run brackets),
    /// kept across reopens and closes: an expiry it may explain excuses a changed report.
    lease_ends: Vec<(u64, u64)>,
    /// The key each admitted reservation was made on (the report a refused settle re-reads).
    reservation_keys: HashMap<u64, Vec<u8>>,
}

/// A key's usage report read before a call that must change nothing.
struct Before {
    key: Option<Vec<u8>>,
    key_len: usize,
    /// The call's stamp, and the time both reports are read at.
    stamp: u64,
    read_at: u64,
    /// The system clock (the engine's) before the first read: the leases ended by then and by
    /// `read_at` were expired by that read.
    clock_before: u64,
    report: Result<serde_json::Value, tally_status>,
}

fn name_of(status: u32) -> &'static str {
    // SAFETY: tally_status_name returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(tally_status_name(status)) }
        .to_str()
        .expect("status names are ASCII")
}

fn last_error() -> String {
    let mut needed = 0usize;
    let status = tally_last_error(ptr::null_mut(), 0, &mut needed);
    assert_eq!(status, tally_status::TALLY_BUFFER_TOO_SMALL);
    let mut buf = vec![0xaau8; needed];
    let status = tally_last_error(buf.as_mut_ptr().cast(), buf.len(), &mut needed);
    assert_eq!(status, tally_status::TALLY_OK);
    assert_eq!(buf[needed - 1], 0);
    String::from_utf8(buf[..needed - 1].to_vec()).expect("the last error is UTF-8")
}

/// A status every call may return: named, not a panic, not poisoned.
fn known(status: tally_status, what: &str) -> tally_status {
    let code = status as u32;
    let name = name_of(code);
    assert_ne!(
        name, "TALLY_UNKNOWN_STATUS",
        "{what}: status {code} has no name"
    );
    assert!(
        !matches!(
            status,
            tally_status::TALLY_PANIC | tally_status::TALLY_POISONED
        ),
        "{what}: {name}: {}",
        last_error()
    );
    status
}

impl World {
    fn open(durable: bool) -> World {
        let dir = durable.then(|| {
            // On tmpfs where there is one: fsync there costs nothing.
            let shm = std::path::Path::new("/dev/shm");
            let base = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            let dir = base.join(format!("tally-fuzz-c-abi-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            dir
        });
        let mut world = World {
            engine: ptr::null_mut(),
            closed: true,
            dir,
            clock: T0,
            reservations: Vec::new(),
            fixed: Fixed::default(),
            policy: None,
            tried_locked: false,
            revoked: HashSet::new(),
            unchanged_check: false,
            lease_ends: Vec::new(),
            reservation_keys: HashMap::new(),
        };
        world.open_engine();
        world.set_up_fixed();
        world
    }

    /// The policy to open with, as JSON: the one swapped in last, or the shipped one (its JSON:
    /// parsing its TOML at every open would halve the executions per second; swaps to
    /// `TALLY_POLICY_DEFAULT` still load the TOML).
    fn policy_json_to_open(&self) -> &[u8] {
        self.policy
            .as_deref()
            .unwrap_or_else(|| default_policy_json())
    }

    /// Opens the database (policy as JSON, durability NONE) without keeping the handle.
    fn open_database(
        &self,
        dir: &std::path::Path,
        engine_out: *mut *mut tally_engine,
    ) -> tally_status {
        let path = dir.to_str().expect("a UTF-8 temp dir");
        let json = self.policy_json_to_open();
        with_unbounded_options(|options| {
            tally_engine_open(
                path.as_ptr().cast(),
                path.len(),
                3,
                json.as_ptr().cast(),
                json.len(),
                2,
                0,
                options,
                engine_out,
            )
        })
    }

    fn open_engine(&mut self) {
        let mut engine = ptr::null_mut();
        let status = match &self.dir {
            Some(dir) => self.open_database(dir, &mut engine),
            None => {
                self.policy = None;
                let json = default_policy_json();
                with_unbounded_options(|options| {
                    tally_engine_open_in_memory(
                        3,
                        json.as_ptr().cast(),
                        json.len(),
                        options,
                        &mut engine,
                    )
                })
            }
        };
        assert_eq!(
            known(status, "open"),
            tally_status::TALLY_OK,
            "open: {}",
            last_error()
        );
        assert!(!engine.is_null());
        self.engine = engine;
        self.closed = false;
    }

    fn set_up_fixed(&mut self) {
        let (user, team, key, plan) = (FIXED_USER, FIXED_TEAM, FIXED_KEY, "Starter");
        let status = tally_engine_create_user(
            self.engine,
            user.as_ptr().cast(),
            user.len(),
            key.as_ptr().cast(),
            key.len(),
            T0,
        );
        assert_eq!(status, tally_status::TALLY_OK, "{}", last_error());
        let status = tally_engine_assign_seat(
            self.engine,
            team.as_ptr().cast(),
            team.len(),
            user.as_ptr().cast(),
            user.len(),
            plan.as_ptr().cast(),
            plan.len(),
            T0,
        );
        assert_eq!(status, tally_status::TALLY_OK, "{}", last_error());
    }

    /// Checks an engine call's status: known, a message on failure, nothing but failures after
    /// close.
    fn engine_status(&self, status: tally_status, what: &str) -> tally_status {
        known(status, what);
        if status != tally_status::TALLY_OK {
            assert!(
                !last_error().is_empty(),
                "{what}: {} without a message",
                name_of(status as u32)
            );
        }
        if self.closed {
            assert_ne!(status, tally_status::TALLY_OK, "{what}: OK after close");
        }
        status
    }

    fn time(&mut self, time: Time) -> u64 {
        match time {
            Time::Now => TALLY_NOW,
            Time::Current => self.clock,
            Time::ForwardMs(ms) => {
                self.clock += u64::from(ms);
                self.clock
            }
            Time::ForwardMinutes(minutes) => {
                self.clock += u64::from(minutes) * 60_000;
                self.clock
            }
            Time::ForwardHours(hours) => {
                self.clock += u64::from(hours) * HOUR_MS;
                self.clock
            }
            Time::BackwardMs(ms) => {
                self.clock = self.clock.saturating_sub(u64::from(ms)).max(1);
                self.clock
            }
            Time::BackwardHours(hours) => {
                self.clock = self.clock.saturating_sub(u64::from(hours) * HOUR_MS).max(1);
                self.clock
            }
            Time::OnBoundary(n) => T0 + u64::from(n) * 5 * HOUR_MS,
            Time::Near2100(offset) => Y2100.wrapping_add_signed(i64::from(offset)),
            Time::Raw(ms) => ms,
        }
    }

    fn build(&mut self, req: &Req) -> BuiltReq {
        let key = req.key.arg(&KEYS, TALLY_MAX_ID_BYTES);
        let resource = req.resource.arg(&RESOURCES, TALLY_MAX_NAME_BYTES);
        let quantities = req.quantities.arg(&resource);
        let requests = req.quantities.requests(&resource);
        let at_ms = self.time(req.at);
        let id = req.id.as_ref().map_or(
            Arg {
                bytes: None,
                len: 0,
            },
            |id| id.arg(&IDS, TALLY_MAX_ID_BYTES),
        );
        BuiltReq {
            key,
            resource,
            quantities,
            at_ms,
            id,
            requests,
        }
    }

    /// Records an admission of the fixed key's `m2.7` requests from plan quota, and checks the
    /// 5-hour limit while every such admission lies within 5 hours.
    fn account(&mut self, built: &BuiltReq, decision: &tally_decision) {
        if !built.key.is(FIXED_KEY) || !built.resource.is("m2.7") || decision.replayed {
            return;
        }
        if !decision.admitted
            || decision.charged_to != tally_charged_to::TALLY_CHARGED_TO_PLAN_QUOTA as u32
        {
            return;
        }
        let fixed = &mut self.fixed;
        if fixed.admitted == 0 {
            fixed.first_at = decision.at_ms;
            fixed.last_at = decision.at_ms;
        }
        fixed.first_at = fixed.first_at.min(decision.at_ms);
        fixed.last_at = fixed.last_at.max(decision.at_ms);
        fixed.admitted = fixed.admitted.saturating_add(built.requests);
        if let Some(id) = &built.id.bytes {
            let by_id = fixed.by_id.entry(id.clone()).or_default();
            *by_id = by_id.saturating_add(built.requests);
        }
        if !fixed.broken && fixed.last_at - fixed.first_at < 5 * HOUR_MS {
            assert!(
                fixed.admitted <= STARTER_M27_REQUESTS_PER_5H,
                "{FIXED_KEY}: {} m2.7 requests admitted from plan quota within 5 hours ({}..{}); the limit is {STARTER_M27_REQUESTS_PER_5H}",
                fixed.admitted,
                fixed.first_at,
                fixed.last_at
            );
        }
    }

    /// An admin call naming the fixed user or team switches the plan-quota check off.
    fn touches_fixed(&mut self, args: &[&Arg]) {
        if args
            .iter()
            .any(|arg| arg.is(FIXED_USER) || arg.is(FIXED_TEAM) || arg.is(FIXED_KEY))
        {
            self.fixed.broken = true;
        }
    }

    fn step(&mut self, op: &Op) {
        let engine = self.engine;
        match op {
            Op::Consume(req) | Op::Check(req) => {
                let consume = matches!(op, Op::Consume(_));
                let built = self.build(req);
                let request = built.raw();
                let before = self.before(&built.key, built.at_ms);
                let mut decision = sentinel_decision();
                let status = if consume {
                    tally_engine_consume(engine, &request, &mut decision)
                } else {
                    tally_engine_check(engine, &request, &mut decision)
                };
                if self.engine_status(status, "consume/check") == tally_status::TALLY_OK {
                    check_decision(&decision, "consume/check");
                    self.check_revoked(&built, &decision, "consume/check");
                    if consume {
                        self.account(&built, &decision);
                    }
                    // A denial counts nothing (one under a request id is remembered, not
                    // counted), nor does a repeat of a request id or a check.
                    if !consume || !decision.admitted || decision.replayed {
                        self.assert_unchanged(before, "a consume denied or repeated, or a check");
                    }
                } else {
                    assert_untouched(&decision, "consume/check");
                    self.assert_unchanged(before, "a refused consume/check");
                }
            }
            Op::ConsumeMany(reqs) => {
                let built: Vec<BuiltReq> =
                    reqs.iter().take(16).map(|req| self.build(req)).collect();
                let raw: Vec<tally_request> = built.iter().map(BuiltReq::raw).collect();
                self.consume_many(&built, &raw);
            }
            Op::ConsumeManyRepeated(req, count) => {
                let count = usize::from(*count) % (TALLY_MAX_BATCH + 8);
                let one = self.build(req);
                let raw = vec![one.raw(); count];
                let built: Vec<&BuiltReq> = vec![&one; count];
                let mut statuses = vec![tally_status::TALLY_PANIC; count];
                let mut decisions = vec![sentinel_decision(); count];
                let status = tally_engine_consume_many(
                    engine,
                    raw.as_ptr(),
                    count,
                    statuses.as_mut_ptr(),
                    decisions.as_mut_ptr(),
                );
                self.batch_outcome(status, &built, &statuses, &decisions);
            }
            Op::CreateUser(user, key) => {
                let (user, key) = (
                    user.arg(&USERS, TALLY_MAX_ID_BYTES),
                    key.arg(&KEYS, TALLY_MAX_ID_BYTES),
                );
                self.touches_fixed(&[&user, &key]);
                let status = tally_engine_create_user(
                    engine,
                    user.ptr(),
                    user.len,
                    key.ptr(),
                    key.len,
                    self.clock,
                );
                self.engine_status(status, "create_user");
            }
            Op::CreateTeam(team) => {
                let team = team.arg(&TEAMS, TALLY_MAX_ID_BYTES);
                let status = tally_engine_create_team(engine, team.ptr(), team.len, self.clock);
                self.engine_status(status, "create_team");
            }
            Op::AddMember(team, user, key) => {
                let team = team.arg(&TEAMS, TALLY_MAX_ID_BYTES);
                let user = user.arg(&USERS, TALLY_MAX_ID_BYTES);
                let key = key.arg(&KEYS, TALLY_MAX_ID_BYTES);
                self.touches_fixed(&[&team, &user, &key]);
                let status = tally_engine_add_member(
                    engine,
                    team.ptr(),
                    team.len,
                    user.ptr(),
                    user.len,
                    key.ptr(),
                    key.len,
                    self.clock,
                );
                self.engine_status(status, "add_member");
            }
            Op::CreatePaygKey(user, key) => {
                let (user, key) = (
                    user.arg(&USERS, TALLY_MAX_ID_BYTES),
                    key.arg(&KEYS, TALLY_MAX_ID_BYTES),
                );
                self.touches_fixed(&[&user, &key]);
                let status = tally_engine_create_payg_key(
                    engine,
                    user.ptr(),
                    user.len,
                    key.ptr(),
                    key.len,
                    self.clock,
                );
                self.engine_status(status, "create_payg_key");
            }
            Op::AssignSeat(team, user, plan) => {
                let team = team.arg(&TEAMS, TALLY_MAX_ID_BYTES);
                let user = user.arg(&USERS, TALLY_MAX_ID_BYTES);
                let plan = plan.arg(&PLANS, TALLY_MAX_NAME_BYTES);
                self.touches_fixed(&[&team, &user]);
                let at = self.clock;
                let status = tally_engine_assign_seat(
                    engine,
                    team.ptr(),
                    team.len,
                    user.ptr(),
                    user.len,
                    plan.ptr(),
                    plan.len,
                    at,
                );
                self.engine_status(status, "assign_seat");
            }
            Op::UnassignSeat(team, user) => {
                let team = team.arg(&TEAMS, TALLY_MAX_ID_BYTES);
                let user = user.arg(&USERS, TALLY_MAX_ID_BYTES);
                self.touches_fixed(&[&team, &user]);
                let status = tally_engine_unassign_seat(
                    engine,
                    team.ptr(),
                    team.len,
                    user.ptr(),
                    user.len,
                    self.clock,
                );
                self.engine_status(status, "unassign_seat");
            }
            Op::TopUp(team, micros) | Op::Withdraw(team, micros) => {
                let top_up = matches!(op, Op::TopUp(..));
                let team = team.arg(&TEAMS, TALLY_MAX_ID_BYTES);
                self.touches_fixed(&[&team]);
                let mut balance = u64::MAX - 7;
                let mut before = u64::MAX - 7;
                let read = tally_engine_credits(engine, team.ptr(), team.len, &mut before);
                let status = if top_up {
                    tally_engine_top_up(
                        engine,
                        team.ptr(),
                        team.len,
                        micros.value(),
                        self.clock,
                        &mut balance,
                    )
                } else {
                    tally_engine_withdraw_credits(
                        engine,
                        team.ptr(),
                        team.len,
                        micros.value(),
                        self.clock,
                        &mut balance,
                    )
                };
                if self.engine_status(status, "top_up/withdraw") == tally_status::TALLY_OK {
                    assert_eq!(read, tally_status::TALLY_OK);
                    let expected = if top_up {
                        before.checked_add(micros.value())
                    } else {
                        before.checked_sub(micros.value())
                    };
                    assert_eq!(
                        Some(balance),
                        expected,
                        "top_up/withdraw: {before} then {micros:?}"
                    );
                } else {
                    assert_eq!(
                        balance,
                        u64::MAX - 7,
                        "top_up/withdraw: balance written on failure"
                    );
                    // A refused top-up or withdrawal moves no credits.
                    let mut after = u64::MAX - 7;
                    let reread = tally_engine_credits(engine, team.ptr(), team.len, &mut after);
                    assert_eq!(
                        reread, read,
                        "top_up/withdraw: the team's credits read differently after a refusal"
                    );
                    if read == tally_status::TALLY_OK {
                        assert_eq!(
                            after, before,
                            "top_up/withdraw: a refusal moved the credits ({micros:?})"
                        );
                    }
                }
            }
            Op::Credits(team) => {
                let team = team.arg(&TEAMS, TALLY_MAX_ID_BYTES);
                let mut balance = u64::MAX - 7;
                let status = tally_engine_credits(engine, team.ptr(), team.len, &mut balance);
                if self.engine_status(status, "credits") != tally_status::TALLY_OK {
                    assert_eq!(balance, u64::MAX - 7, "credits: written on failure");
                }
            }
            Op::Reserve(req, lease_ms) => {
                let built = self.build(req);
                let request = built.raw();
                let before = self.before(&built.key, built.at_ms);
                let clock_before = system_ms();
                let mut decision = sentinel_decision();
                let mut reservation = u64::MAX - 7;
                let status = tally_engine_reserve(
                    engine,
                    &request,
                    *lease_ms,
                    &mut decision,
                    &mut reservation,
                );
                if self.engine_status(status, "reserve") == tally_status::TALLY_OK {
                    check_decision(&decision, "reserve");
                    self.check_revoked(&built, &decision, "reserve");
                    if decision.admitted {
                        assert_ne!(reservation, 0, "reserve: admitted without a reservation id");
                        self.reservations.push(reservation);
                        // 0: the default lease (the engine's option, 10 minutes here).
                        let lease = if *lease_ms == 0 { 600_000 } else { *lease_ms };
                        let (earliest, latest) = if built.at_ms == TALLY_NOW {
                            (clock_before, system_ms())
                        } else {
                            (built.at_ms, built.at_ms)
                        };
                        self.lease_ends
                            .push((earliest.saturating_add(lease), latest.saturating_add(lease)));
                        if let Some(key) = &built.key.bytes {
                            self.reservation_keys.insert(reservation, key.clone());
                        }
                    } else {
                        assert_eq!(reservation, 0, "reserve: denied with a reservation id");
                        self.assert_unchanged(before, "a denied reserve");
                    }
                } else {
                    assert_untouched(&decision, "reserve");
                    assert_eq!(reservation, u64::MAX - 7, "reserve: id written on failure");
                    self.assert_unchanged(before, "a refused reserve");
                }
            }
            Op::Settle(which, quantities, at) => {
                let reservation = self.pick_reservation(*which);
                let resource = Arg {
                    bytes: Some(b"m2.7".to_vec()),
                    len: 4,
                };
                let actual = quantities.arg(&resource);
                let at = self.time(*at);
                // The report of the reservation's key (the fixed key's for an id the run
                // made up, or one the engine never gave).
                let key = self
                    .reservation_keys
                    .get(&reservation)
                    .map_or(FIXED_KEY.as_bytes(), Vec::as_slice)
                    .to_vec();
                let key = Arg {
                    len: key.len(),
                    bytes: Some(key),
                };
                let before = self.before(&key, at);
                let mut decision = sentinel_decision();
                let status = tally_engine_settle(
                    engine,
                    reservation,
                    actual.ptr(),
                    actual.len,
                    at,
                    &mut decision,
                );
                if self.engine_status(status, "settle") == tally_status::TALLY_OK {
                    check_decision(&decision, "settle");
                    // Denied: the part beyond the estimate did not fit; nothing changed and
                    // the reservation stays open.
                    if !decision.admitted {
                        self.assert_unchanged(before, "a denied settle");
                    }
                } else {
                    assert_untouched(&decision, "settle");
                    // Documented: a settle after the lease ended (by its stamp or the engine's
                    // expiry) expires the reservation, giving back its hold.
                    if status != tally_status::TALLY_RESERVATION_EXPIRED {
                        self.assert_unchanged(before, "a refused settle");
                    }
                }
            }
            Op::Void(which, at) => {
                let reservation = self.pick_reservation(*which);
                let at = self.time(*at);
                let status = tally_engine_void(engine, reservation, at);
                self.engine_status(status, "void");
            }
            Op::Expire(at) => {
                let at = self.time(*at);
                let mut expired = u64::MAX - 7;
                let status = tally_engine_expire_reservations(engine, at, &mut expired);
                if self.engine_status(status, "expire_reservations") != tally_status::TALLY_OK {
                    assert_eq!(
                        expired,
                        u64::MAX - 7,
                        "expire_reservations: written on failure"
                    );
                }
            }
            Op::Refund(id, at) => {
                let id = id.arg(&IDS, TALLY_MAX_ID_BYTES);
                let at = self.time(*at);
                let status = tally_engine_refund(engine, id.ptr(), id.len, at);
                if self.engine_status(status, "refund") == tally_status::TALLY_OK {
                    if let Some(given_back) =
                        id.bytes.as_ref().and_then(|id| self.fixed.by_id.remove(id))
                    {
                        self.fixed.admitted = self.fixed.admitted.saturating_sub(given_back);
                    }
                }
            }
            Op::Usage(key, at, buf) => {
                let key = key.arg(&KEYS, TALLY_MAX_ID_BYTES);
                let at = self.time(*at);
                self.text_call(*buf, true, "usage", |buf, len, needed| {
                    tally_engine_usage(engine, key.ptr(), key.len, at, buf, len, needed)
                });
            }
            Op::PolicyJson(buf) => {
                self.text_call(*buf, true, "policy_json", |buf, len, needed| {
                    tally_engine_policy_json(engine, buf, len, needed)
                });
            }
            Op::EventsAfter(after, limit, buf) => {
                // Mostly small limits: a full page of 65,536 events is slow to print.
                let limit = if *limit > TALLY_MAX_EVENTS_PER_CALL + 4 {
                    *limit
                } else {
                    *limit % 70
                };
                self.text_call(*buf, true, "events_after", |buf, len, needed| {
                    tally_engine_events_after(engine, *after, limit, buf, len, needed)
                });
            }
            Op::Cursor(name) => {
                let name = name.arg(&CURSORS, TALLY_MAX_ID_BYTES);
                let mut seq = u64::MAX - 7;
                let status = tally_engine_cursor(engine, name.ptr(), name.len, &mut seq);
                if self.engine_status(status, "cursor") != tally_status::TALLY_OK {
                    assert_eq!(seq, u64::MAX - 7, "cursor: written on failure");
                }
            }
            Op::SaveCursor(name, seq) => {
                let name = name.arg(&CURSORS, TALLY_MAX_ID_BYTES);
                let status = tally_engine_save_cursor(engine, name.ptr(), name.len, *seq % 64);
                self.engine_status(status, "save_cursor");
            }
            Op::Checkpoint => {
                let mut seq = u64::MAX - 7;
                let status = tally_engine_checkpoint(engine, &mut seq);
                if self.engine_status(status, "checkpoint") != tally_status::TALLY_OK {
                    assert_eq!(seq, u64::MAX - 7, "checkpoint: written on failure");
                }
            }
            Op::Sync => {
                let status = tally_engine_sync(engine);
                self.engine_status(status, "sync");
            }
            Op::Compact(at) => {
                let at = self.time(*at);
                let mut removed = u64::MAX - 7;
                let status = tally_engine_compact(engine, at, &mut removed);
                if self.engine_status(status, "compact") != tally_status::TALLY_OK {
                    assert_eq!(removed, u64::MAX - 7, "compact: written on failure");
                }
            }
            Op::SwapPolicy(policy, at) => {
                let at = self.time(*at);
                let (source, text) = match policy {
                    PolicyArg::Default => (
                        0,
                        Arg {
                            bytes: None,
                            len: 0,
                        },
                    ),
                    PolicyArg::CurrentJson => {
                        let json = self.policy_json().unwrap_or_default();
                        let len = json.len();
                        (
                            3,
                            Arg {
                                bytes: Some(json),
                                len,
                            },
                        )
                    }
                    PolicyArg::Toml(text) | PolicyArg::Json(text) => {
                        let source = if matches!(policy, PolicyArg::Toml(_)) {
                            2
                        } else {
                            3
                        };
                        let bytes = text.as_bytes().to_vec();
                        let len = bytes.len();
                        (
                            source,
                            Arg {
                                bytes: Some(bytes),
                                len,
                            },
                        )
                    }
                    PolicyArg::Raw(source, text) => {
                        // A file source reads only from the pool: a raw path could name a
                        // device that never ends.
                        let text = match (source, text) {
                            (1, Text::Raw(_)) => Text::Pool(0),
                            _ => text.clone(),
                        };
                        (
                            *source,
                            text.arg(&["/nonexistent/policy.toml"], TALLY_MAX_DOCUMENT_BYTES),
                        )
                    }
                };
                let status = tally_engine_swap_policy(engine, source, text.ptr(), text.len, at);
                if self.engine_status(status, "swap_policy") == tally_status::TALLY_OK {
                    if source == 0 {
                        self.policy = None;
                    } else {
                        // Another policy may give Starter other limits.
                        self.fixed.broken = true;
                        self.policy = Some(self.policy_json().expect("the policy just swapped in"));
                    }
                }
            }
            Op::LastError(buf) => {
                let before = last_error();
                let mut storage = buffer(*buf);
                let mut needed = usize::MAX;
                let needed_ptr: *mut usize = if matches!(buf, Buf::NullNeeded) {
                    ptr::null_mut()
                } else {
                    &mut needed
                };
                let status = known(
                    tally_last_error(storage.ptr(), storage.len, needed_ptr),
                    "last_error",
                );
                assert_eq!(last_error(), before, "last_error changed the last error");
                match status {
                    tally_status::TALLY_OK => {
                        assert_eq!(needed, before.len() + 1);
                        assert_eq!(
                            &storage.bytes.as_deref().expect("a buffer")[..needed - 1],
                            before.as_bytes()
                        );
                    }
                    tally_status::TALLY_BUFFER_TOO_SMALL => {
                        assert_eq!(needed, before.len() + 1);
                        assert!(storage.bytes.is_none() || storage.len < needed);
                        storage.assert_untouched("last_error");
                    }
                    tally_status::TALLY_NULL_POINTER => assert!(needed_ptr.is_null()),
                    other => panic!("last_error: {}", name_of(other as u32)),
                }
            }
            Op::StatusName(code) => {
                let name = name_of(*code);
                assert!(name.starts_with("TALLY_"), "status_name({code}): {name}");
                assert_eq!(
                    name == "TALLY_UNKNOWN_STATUS",
                    // The last status.
                    *code > tally_status::TALLY_RESERVATION_EXPIRED as u32
                );
            }
            Op::Version => {
                // SAFETY: a static NUL-terminated string.
                let version = unsafe { CStr::from_ptr(tally_version()) };
                assert_eq!(version.to_bytes(), b"0.1.0");
            }
            Op::Null(call) => self.null_call(*call),
            Op::Options(settings) => options_then_open(settings),
            Op::Close => {
                let status = tally_engine_close(engine);
                let status = known(status, "close");
                if self.closed {
                    assert_eq!(status, tally_status::TALLY_CLOSED, "a second close");
                } else {
                    assert_eq!(status, tally_status::TALLY_OK, "close: {}", last_error());
                    self.closed = true;
                    self.check_database_sound();
                }
            }
            Op::Reopen => {
                if !self.closed {
                    assert_eq!(
                        known(tally_engine_close(engine), "close"),
                        tally_status::TALLY_OK,
                        "close: {}",
                        last_error()
                    );
                    self.closed = true;
                    self.check_database_sound();
                }
                tally_engine_free(engine);
                self.engine = ptr::null_mut();
                self.open_engine();
                self.reservations.clear();
                if self.dir.is_none() {
                    // A fresh engine: set the fixed key up again.
                    self.fixed = Fixed::default();
                    self.revoked.clear();
                    self.set_up_fixed();
                }
            }
            Op::OpenAgain => {
                let Some(dir) = &self.dir else { return };
                if !self.closed {
                    // The engine retries a lock for about a second before it answers
                    // TALLY_DATABASE_LOCKED: once per input is enough.
                    if self.tried_locked {
                        return;
                    }
                    self.tried_locked = true;
                }
                let mut second = ptr::null_mut();
                let status = self.open_database(dir, &mut second);
                let status = known(status, "open again");
                if self.closed {
                    // The first handle released the database: this one may open it.
                    assert_eq!(
                        status,
                        tally_status::TALLY_OK,
                        "open after close: {}",
                        last_error()
                    );
                    assert_eq!(
                        tally_engine_close(second),
                        tally_status::TALLY_OK,
                        "{}",
                        last_error()
                    );
                    tally_engine_free(second);
                } else {
                    assert_eq!(
                        status,
                        tally_status::TALLY_DATABASE_LOCKED,
                        "open while open: {}",
                        last_error()
                    );
                    assert!(second.is_null(), "open wrote a handle on failure");
                }
            }
            Op::Verify(buf) => {
                let Some(dir) = self.dir.clone() else { return };
                let path = dir.to_str().expect("a UTF-8 temp dir");
                let closed = self.closed;
                let mut sound = None;
                self.text_call(*buf, true, "verify", |buf, len, needed| {
                    let mut out = false;
                    // NULL options: the ones the database recorded (the defaults it is
                    // opened with).
                    let status = tally_verify(
                        path.as_ptr().cast(),
                        path.len(),
                        ptr::null(),
                        &mut out,
                        buf,
                        len,
                        needed,
                    );
                    if status == tally_status::TALLY_OK {
                        sound = Some(out);
                    }
                    status
                });
                if let Some(sound) = sound {
                    assert!(closed, "verify succeeded on an open database");
                    assert!(sound, "a cleanly closed database is not sound");
                }
            }
            Op::ForgeReservation(id) => self.reservations.push(*id),
            Op::RevokeKey(key, at, out) => {
                let key = key.arg(&KEYS, TALLY_MAX_ID_BYTES);
                let at = self.time(*at);
                self.revoke(&key, at, out % 8 != 0);
            }
            Op::RotateKey {
                key,
                team,
                user,
                new_key,
            } => {
                let key = key.arg(&KEYS, TALLY_MAX_ID_BYTES);
                let team = team.arg(&TEAMS, TALLY_MAX_ID_BYTES);
                let user = user.arg(&USERS, TALLY_MAX_ID_BYTES);
                let new_key = new_key.arg(&KEYS, TALLY_MAX_ID_BYTES);
                // The fixed key may be revoked (it is then admitted nothing), not replaced.
                self.touches_fixed(&[&team, &user, &new_key]);
                self.revoke(&key, self.clock, true);
                let status = tally_engine_add_member(
                    engine,
                    team.ptr(),
                    team.len,
                    user.ptr(),
                    user.len,
                    new_key.ptr(),
                    new_key.len,
                    self.clock,
                );
                if self.engine_status(status, "add_member after revoke") == tally_status::TALLY_OK {
                    // Names are never reused: the new key is not a revoked one.
                    let new_key = new_key.bytes.unwrap_or_default();
                    assert!(
                        !self.revoked.contains(&new_key),
                        "add_member made a key of a revoked key's name"
                    );
                }
            }
        }
    }

    /// Revokes `key` (with `revoked_out` NULL unless `with_out`) and checks the answer against
    /// the keys revoked so far.
    fn revoke(&mut self, key: &Arg, at: u64, with_out: bool) {
        const UNWRITTEN: u8 = 0xa5;
        let mut out = std::mem::MaybeUninit::<bool>::uninit();
        // SAFETY: a byte written through the bool's pointer, read back as a byte below.
        unsafe { out.as_mut_ptr().cast::<u8>().write(UNWRITTEN) };
        let out_ptr = if with_out {
            out.as_mut_ptr()
        } else {
            ptr::null_mut()
        };
        let status = tally_engine_revoke_key(self.engine, key.ptr(), key.len, at, out_ptr);
        let status = self.engine_status(status, "revoke_key");
        // SAFETY: the byte initialised above, or the bool the call wrote over it.
        let byte = unsafe { out.as_ptr().cast::<u8>().read() };
        if status != tally_status::TALLY_OK {
            assert_eq!(
                byte, UNWRITTEN,
                "revoke_key: revoked_out written on failure"
            );
            if !with_out {
                assert_eq!(
                    status,
                    tally_status::TALLY_NULL_POINTER,
                    "revoke_key without revoked_out"
                );
            }
            return;
        }
        assert!(with_out, "revoke_key: OK with a NULL revoked_out");
        assert!(byte <= 1, "revoke_key: revoked_out holds {byte}");
        let key = key.bytes.clone().expect("a key revoked is not NULL");
        let was_revoked = self.revoked.contains(&key);
        assert_eq!(
            byte == 1,
            !was_revoked,
            "revoke_key: whether it revoked the key now"
        );
        self.revoked.insert(key);
    }

    /// A revoked key's fresh decision is a denial for that (a repeat answers as the first).
    fn check_revoked(&self, built: &BuiltReq, decision: &tally_decision, what: &str) {
        let Some(key) = &built.key.bytes else { return };
        if decision.replayed || !self.revoked.contains(key) {
            return;
        }
        assert!(!decision.admitted, "{what}: a revoked key admitted");
        assert_eq!(
            decision.denial,
            tally_denial::TALLY_DENIAL_KEY_REVOKED as u32,
            "{what}: a revoked key denied for another reason"
        );
    }

    /// The key's usage report before a call stamped `stamp` that may have to change nothing
    /// (None when this input does not check that). Read at the call's stamp, or at the run's
    /// time when the stamp is `TALLY_NOW` or past 2100, the same before and after.
    fn before(&self, key: &Arg, stamp: u64) -> Option<Before> {
        if !self.unchanged_check {
            return None;
        }
        let read_at = if stamp == TALLY_NOW || stamp >= Y2100 {
            self.clock
        } else {
            stamp
        };
        let clock_before = system_ms();
        Some(Before {
            key: key.bytes.clone(),
            key_len: key.len,
            stamp,
            read_at,
            clock_before,
            report: usage_report(self.engine, key.bytes.as_deref(), key.len, read_at),
        })
    }

    /// The key's usage report is as `before` the call, which was refused, denied, replayed or
    /// only a check: its limits' usage, its team's credits, its open reservations. Excused: an
    /// expiry of a lease that may have ended between the reads (the engine expires the leases
    /// ended by a call's stamp and its clock on many calls, housekeeping included), which
    /// gives back what the lease held; nothing else may differ.
    fn assert_unchanged(&self, before: Option<Before>, what: &str) {
        let Some(before) = before else { return };
        let after = usage_report(
            self.engine,
            before.key.as_deref(),
            before.key_len,
            before.read_at,
        );
        if after == before.report {
            return;
        }
        let clock_after = system_ms();
        // Every lease ended by this was expired by the first read (if it got that far: a key
        // it refused expires nothing).
        let expired_by = match before.report {
            Ok(_) => before.read_at.min(before.clock_before),
            Err(_) => 0,
        };
        // Nothing expires a lease ending after this: the reads and the call expire by their
        // stamp and the clock, whichever is earlier (`TALLY_NOW`: the clock).
        let may_expire_by = if before.stamp == TALLY_NOW {
            clock_after
        } else {
            before.read_at.max(before.stamp).min(clock_after)
        };
        let ended_between = self
            .lease_ends
            .iter()
            .any(|&(earliest, latest)| earliest <= may_expire_by && latest > expired_by);
        assert!(
            ended_between,
            "{what} changed the usage report of {:?} (read at {}):\nbefore {:?}\nafter  {:?}",
            before.key.as_deref().map(String::from_utf8_lossy),
            before.read_at,
            before.report,
            after
        );
    }

    fn pick_reservation(&self, which: u8) -> u64 {
        match self.reservations.len() {
            0 => u64::from(which),
            len => self.reservations[usize::from(which) % len],
        }
    }

    fn consume_many(&mut self, built: &[BuiltReq], raw: &[tally_request]) {
        let count = raw.len();
        let mut statuses = vec![tally_status::TALLY_PANIC; count];
        let mut decisions = vec![sentinel_decision(); count];
        // An empty Vec's pointer is dangling but not NULL: a batch of 0 is checked as such.
        let status = tally_engine_consume_many(
            self.engine,
            raw.as_ptr(),
            count,
            statuses.as_mut_ptr(),
            decisions.as_mut_ptr(),
        );
        let built: Vec<&BuiltReq> = built.iter().collect();
        self.batch_outcome(status, &built, &statuses, &decisions);
    }

    fn batch_outcome(
        &mut self,
        status: tally_status,
        built: &[&BuiltReq],
        statuses: &[tally_status],
        decisions: &[tally_decision],
    ) {
        if self.engine_status(status, "consume_many") != tally_status::TALLY_OK {
            for (entry, decision) in statuses.iter().zip(decisions) {
                assert_eq!(
                    *entry,
                    tally_status::TALLY_PANIC,
                    "consume_many: an entry written on failure"
                );
                assert_untouched(decision, "consume_many");
            }
            return;
        }
        assert!(
            !built.is_empty() && built.len() <= TALLY_MAX_BATCH,
            "consume_many ran {} requests",
            built.len()
        );
        for ((entry, decision), one) in statuses.iter().zip(decisions).zip(built) {
            if known(*entry, "consume_many entry") == tally_status::TALLY_OK {
                check_decision(decision, "consume_many entry");
                self.check_revoked(one, decision, "consume_many entry");
                self.account(one, decision);
            } else {
                assert_untouched(decision, "consume_many entry");
            }
        }
    }

    fn policy_json(&self) -> Option<Vec<u8>> {
        let mut needed = 0usize;
        if tally_engine_policy_json(self.engine, ptr::null_mut(), 0, &mut needed)
            != tally_status::TALLY_BUFFER_TOO_SMALL
        {
            return None;
        }
        let mut buf = vec![0u8; needed];
        if tally_engine_policy_json(self.engine, buf.as_mut_ptr().cast(), needed, &mut needed)
            != tally_status::TALLY_OK
        {
            return None;
        }
        buf.truncate(needed - 1);
        Some(buf)
    }

    /// A call with the size-query convention: the buffer as chosen, then (on
    /// `TALLY_BUFFER_TOO_SMALL`) `*needed` bytes until it fits.
    fn text_call(
        &self,
        buf: Buf,
        json: bool,
        what: &str,
        mut call: impl FnMut(*mut c_char, usize, *mut usize) -> tally_status,
    ) {
        let mut storage = buffer(buf);
        let mut needed = usize::MAX;
        let needed_ptr: *mut usize = if matches!(buf, Buf::NullNeeded) {
            ptr::null_mut()
        } else {
            &mut needed
        };
        let mut status = call(storage.ptr(), storage.len, needed_ptr);
        if what == "verify" {
            known(status, what);
        } else {
            self.engine_status(status, what);
        }
        if needed_ptr.is_null() {
            assert_ne!(
                status,
                tally_status::TALLY_OK,
                "{what}: OK with a NULL needed"
            );
            return;
        }
        for _ in 0..4 {
            match status {
                tally_status::TALLY_OK => {
                    check_text(&storage, needed, json, what);
                    return;
                }
                tally_status::TALLY_BUFFER_TOO_SMALL => {
                    assert_ne!(needed, usize::MAX, "{what}: too small without a size");
                    assert!(
                        storage.bytes.is_none() || needed > storage.len,
                        "{what}: too small, yet {needed} needed and {} given",
                        storage.len
                    );
                    storage.assert_untouched(what);
                    let given = needed;
                    storage = Storage::new(given);
                    status = known(call(storage.ptr(), storage.len, &mut needed), what);
                    assert!(
                        matches!(
                            status,
                            tally_status::TALLY_OK | tally_status::TALLY_BUFFER_TOO_SMALL
                        ),
                        "{what}: {} on the second call with {given} bytes: {}",
                        name_of(status as u32),
                        last_error()
                    );
                }
                _ => return,
            }
        }
        panic!("{what}: still too small after four calls");
    }

    fn null_call(&mut self, call: NullCall) {
        let engine = self.engine;
        let key = "k0";
        let resource = "m2.7";
        let quantities = [tally_quantity { unit: 0, amount: 1 }];
        let request = tally_request {
            key: key.as_ptr().cast(),
            key_len: key.len(),
            resource: resource.as_ptr().cast(),
            resource_len: resource.len(),
            quantities: quantities.as_ptr(),
            quantities_len: 1,
            at_ms: self.clock,
            request_id: ptr::null(),
            request_id_len: 0,
        };
        let mut decision = sentinel_decision();
        let mut status_out = tally_status::TALLY_PANIC;
        let mut number = 0u64;
        let team = "@u0";
        let (team_ptr, team_len) = (team.as_ptr().cast::<c_char>(), team.len());
        let status = match call {
            NullCall::ConsumeRequest => tally_engine_consume(engine, ptr::null(), &mut decision),
            NullCall::ConsumeDecision => tally_engine_consume(engine, &request, ptr::null_mut()),
            NullCall::CheckRequest => tally_engine_check(engine, ptr::null(), &mut decision),
            NullCall::ManyRequests(count) => {
                // Room for every entry, should the call write any.
                let count = usize::from(count) + 1;
                let mut statuses = vec![tally_status::TALLY_PANIC; count];
                let mut decisions = vec![sentinel_decision(); count];
                let status = tally_engine_consume_many(
                    engine,
                    ptr::null(),
                    count,
                    statuses.as_mut_ptr(),
                    decisions.as_mut_ptr(),
                );
                assert!(statuses
                    .iter()
                    .all(|&entry| entry == tally_status::TALLY_PANIC));
                status
            }
            NullCall::ManyStatuses => {
                tally_engine_consume_many(engine, &request, 1, ptr::null_mut(), &mut decision)
            }
            NullCall::ManyDecisions => {
                tally_engine_consume_many(engine, &request, 1, &mut status_out, ptr::null_mut())
            }
            NullCall::ReserveOut => {
                tally_engine_reserve(engine, &request, 0, &mut decision, ptr::null_mut())
            }
            NullCall::SettleOut => {
                tally_engine_settle(engine, 1, quantities.as_ptr(), 1, 0, ptr::null_mut())
            }
            NullCall::ExpireOut => tally_engine_expire_reservations(engine, 0, ptr::null_mut()),
            NullCall::TopUpOut => {
                tally_engine_top_up(engine, team_ptr, team_len, 1, 0, ptr::null_mut())
            }
            NullCall::CreditsOut => {
                tally_engine_credits(engine, team_ptr, team_len, ptr::null_mut())
            }
            NullCall::CursorOut => tally_engine_cursor(engine, team_ptr, team_len, ptr::null_mut()),
            NullCall::CheckpointOut => tally_engine_checkpoint(engine, ptr::null_mut()),
            NullCall::CompactOut => tally_engine_compact(engine, 0, ptr::null_mut()),
            NullCall::OpenOut => {
                tally_engine_open_in_memory(0, ptr::null(), 0, ptr::null(), ptr::null_mut())
            }
            NullCall::VerifyOut => {
                let mut needed = 0;
                let mut buf = [0 as c_char; 8];
                let path = "/nonexistent/tally-fuzz";
                tally_verify(
                    path.as_ptr().cast(),
                    path.len(),
                    ptr::null(),
                    ptr::null_mut(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut needed,
                )
            }
            NullCall::NullEngine(which) => {
                let null = ptr::null();
                match which % 8 {
                    0 => tally_engine_consume(null, &request, &mut decision),
                    1 => tally_engine_check(null, &request, &mut decision),
                    2 => tally_engine_close(null),
                    3 => tally_engine_sync(null),
                    4 => tally_engine_credits(null, team_ptr, team_len, &mut number),
                    5 => tally_engine_void(null, 1, 0),
                    6 => {
                        let mut needed = 0;
                        tally_engine_policy_json(null, ptr::null_mut(), 0, &mut needed)
                    }
                    _ => {
                        tally_engine_free(ptr::null_mut());
                        tally_status::TALLY_NULL_POINTER
                    }
                }
            }
        };
        let status = known(status, "a call with a NULL pointer");
        let expected =
            if matches!(call, NullCall::NullEngine(_) | NullCall::OpenOut) || !self.closed {
                vec![tally_status::TALLY_NULL_POINTER]
            } else {
                vec![tally_status::TALLY_NULL_POINTER, tally_status::TALLY_CLOSED]
            };
        assert!(
            expected.contains(&status),
            "{call:?}: {}: {}",
            name_of(status as u32),
            last_error()
        );
        assert_untouched(&decision, "a call with a NULL pointer");
        assert_eq!(
            status_out,
            tally_status::TALLY_PANIC,
            "an entry written on failure"
        );
        assert_eq!(number, 0);
    }

    /// Checks a cleanly closed database with `tally_verify`.
    fn check_database_sound(&self) {
        let Some(dir) = &self.dir else { return };
        let path = dir.to_str().expect("a UTF-8 temp dir");
        let mut needed = 0usize;
        let mut sound = false;
        let mut buf = vec![0u8; 64 * 1024];
        let status = tally_verify(
            path.as_ptr().cast(),
            path.len(),
            ptr::null(), // the options it recorded: the defaults it was opened with
            &mut sound,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut needed,
        );
        assert_eq!(
            known(status, "verify"),
            tally_status::TALLY_OK,
            "verify: {}",
            last_error()
        );
        assert!(
            sound,
            "a cleanly closed database is not sound: {}",
            String::from_utf8_lossy(&buf[..needed - 1])
        );
    }
}

/// Runs `open` with options that set no bound on how far ahead of the engine's clock a stamp
/// may be (opted out of the default, a day): the run stamps from `T0`, in 2030, years ahead of
/// the machine's clock the engine reads, as a replay would.
fn with_unbounded_options<T>(open: impl FnOnce(*const tally_options) -> T) -> T {
    let mut options = ptr::null_mut();
    assert_eq!(tally_options_new(&mut options), tally_status::TALLY_OK);
    assert_eq!(
        tally_options_set_max_ahead_of_clock_ms(options, 0),
        tally_status::TALLY_OK
    );
    let opened = open(options);
    tally_options_free(options);
    opened
}

/// Sets options one at a time: each value is taken or refused with `TALLY_INVALID_ARGUMENT`
/// (leaving the options as they were), so an in-memory engine then opens with them, whatever
/// was refused.
fn options_then_open(settings: &[(u8, u64)]) {
    let mut options = ptr::null_mut();
    assert_eq!(tally_options_new(&mut options), tally_status::TALLY_OK);
    for &(which, value) in settings.iter().take(16) {
        let status = match which % 14 {
            0 => tally_options_set_max_keys(options, value),
            1 => tally_options_set_max_teams(options, value),
            2 => tally_options_set_max_users(options, value),
            3 => tally_options_set_idempotency_capacity(options, value),
            4 => tally_options_set_idempotency_horizon_ms(options, value),
            5 => tally_options_set_max_open_reservations(options, value),
            6 => tally_options_set_default_lease_ms(options, value),
            7 => tally_options_set_max_policy_generations(options, value),
            8 => tally_options_set_reclaim_idle_every_ms(options, value),
            9 => tally_options_set_expire_leases_on_its_own(options, value % 2 == 1),
            10 => tally_options_set_checkpoint_every_events(options, value),
            11 => tally_options_set_retention_ms(options, value),
            12 => tally_options_set_max_ahead_of_clock_ms(options, value),
            _ => tally_options_set_use_recorded(options, value % 2 == 1),
        };
        let status = known(status, "set an option");
        assert!(
            matches!(
                status,
                tally_status::TALLY_OK | tally_status::TALLY_INVALID_ARGUMENT
            ),
            "setter {which} with {value}: {status:?} {}",
            last_error()
        );
    }
    let json = default_policy_json();
    let mut engine = ptr::null_mut();
    let status =
        tally_engine_open_in_memory(3, json.as_ptr().cast(), json.len(), options, &mut engine);
    assert_eq!(
        known(status, "open with options"),
        tally_status::TALLY_OK,
        "open with options: {}",
        last_error()
    );
    tally_engine_free(engine);
    tally_options_free(options);
}

/// The shipped policy's JSON, from an engine opened on it once per process.
fn default_policy_json() -> &'static [u8] {
    static JSON: OnceLock<Vec<u8>> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut engine = ptr::null_mut();
        assert_eq!(
            tally_engine_open_in_memory(0, ptr::null(), 0, ptr::null(), &mut engine),
            tally_status::TALLY_OK
        );
        let world = World {
            engine,
            closed: false,
            dir: None,
            clock: T0,
            reservations: Vec::new(),
            fixed: Fixed::default(),
            policy: None,
            tried_locked: false,
            revoked: HashSet::new(),
            unchanged_check: false,
            lease_ends: Vec::new(),
            reservation_keys: HashMap::new(),
        };
        let json = world.policy_json().expect("the shipped policy as JSON");
        tally_engine_free(engine);
        json
    })
}

/// An output buffer: None = NULL (with `len` as passed); filled with 0xAA to see writes.
struct Storage {
    bytes: Option<Vec<u8>>,
    len: usize,
}

impl Storage {
    fn new(len: usize) -> Storage {
        Storage {
            bytes: Some(vec![0xaa; len]),
            len,
        }
    }

    fn ptr(&mut self) -> *mut c_char {
        self.bytes
            .as_mut()
            .map_or(ptr::null_mut(), |bytes| bytes.as_mut_ptr().cast())
    }

    fn assert_untouched(&self, what: &str) {
        if let Some(bytes) = &self.bytes {
            assert!(
                bytes.iter().all(|&byte| byte == 0xaa),
                "{what}: wrote into a buffer that was too small"
            );
        }
    }
}

fn buffer(buf: Buf) -> Storage {
    match buf {
        Buf::Null | Buf::NullNeeded => Storage {
            bytes: None,
            len: 0,
        },
        Buf::NullWithLen(len) => Storage {
            bytes: None,
            len: usize::from(len) + 1,
        },
        Buf::Zero => Storage::new(0),
        Buf::Small(len) => Storage::new(usize::from(len)),
        Buf::Medium(len) => Storage::new(usize::from(len)),
        Buf::Large => Storage::new(1 << 16),
    }
}

fn check_text(storage: &Storage, needed: usize, json: bool, what: &str) {
    let bytes = storage.bytes.as_ref().expect("OK with a NULL buffer");
    assert!(
        needed >= 1 && needed <= storage.len,
        "{what}: needed {needed} of {}",
        storage.len
    );
    assert_eq!(
        bytes[needed - 1],
        0,
        "{what}: not NUL-terminated at needed - 1"
    );
    let text = &bytes[..needed - 1];
    assert!(!text.contains(&0), "{what}: a NUL inside the text");
    let text =
        std::str::from_utf8(text).unwrap_or_else(|error| panic!("{what}: not UTF-8: {error}"));
    assert!(
        bytes[needed..].iter().all(|&byte| byte == 0xaa),
        "{what}: wrote past needed"
    );
    if json {
        serde_json::from_str::<serde_json::Value>(text)
            .unwrap_or_else(|error| panic!("{what}: not JSON: {error}: {text}"));
    }
}

/// A decision full of values no call writes, to see whether a failed call wrote it.
/// The engine's clock (the system's), in milliseconds since the epoch.
fn system_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// A key's usage report as JSON, without what follows the time it is read at rather than the
/// state ("at_ms", each limit's "reset_at_ms"), or the status it was refused with.
fn usage_report(
    engine: *mut tally_engine,
    key: Option<&[u8]>,
    key_len: usize,
    at_ms: u64,
) -> Result<serde_json::Value, tally_status> {
    let key_ptr: *const c_char = key.map_or(ptr::null(), |key| key.as_ptr().cast());
    let mut needed = 0usize;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let status = tally_engine_usage(
            engine,
            key_ptr,
            key_len,
            at_ms,
            if buf.is_empty() {
                ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            },
            buf.len(),
            &mut needed,
        );
        match known(status, "usage (re-read)") {
            tally_status::TALLY_OK => break,
            tally_status::TALLY_BUFFER_TOO_SMALL => buf = vec![0; needed],
            other => return Err(other),
        }
    }
    let mut report: serde_json::Value =
        serde_json::from_slice(&buf[..needed - 1]).expect("the usage report is JSON");
    let object = report
        .as_object_mut()
        .expect("the usage report is an object");
    object.remove("at_ms");
    for limit in object
        .get_mut("limits")
        .and_then(serde_json::Value::as_array_mut)
        .expect("the usage report has limits")
    {
        limit
            .as_object_mut()
            .expect("a limit is an object")
            .remove("reset_at_ms");
    }
    Ok(report)
}

fn sentinel_decision() -> tally_decision {
    tally_decision {
        admitted: false,
        replayed: true,
        has_credits_balance: true,
        charged_to: 0xdead,
        denial: 0xdead,
        limit_index: 0xdead,
        unit: 0xdead,
        limit_count: 0xdead,
        limit_amount: 0xdead,
        limit_used: 0xdead,
        remaining: 0xdead,
        reset_at_ms: 0xdead,
        retry_after_ms: 0xdead,
        retry_at_ms: 0xdead,
        at_ms: 0xdead,
        charged_micros: 0xdead,
        credits_balance_micros: 0xdead,
        credits_needed_micros: 0xdead,
        requested: 0xdead,
        maximum: 0xdead,
        limits: [tally_limit_status {
            limit_index: 0xdead,
            used: 0xdead,
            amount: 0xdead,
            remaining: 0xdead,
            reset_at_ms: 0xdead,
        }; TALLY_MAX_DECISION_LIMITS],
        plan: [0x55; TALLY_NAME_CAPACITY],
        limit_name: [0x55; TALLY_NAME_CAPACITY],
        upgrade_plan: [0x55; TALLY_NAME_CAPACITY],
    }
}

fn assert_untouched(decision: &tally_decision, what: &str) {
    assert!(
        decision.charged_to == 0xdead
            && decision.denial == 0xdead
            && decision.replayed
            && decision.plan[0] == 0x55,
        "{what}: the decision was written on failure"
    );
}

fn check_decision(decision: &tally_decision, what: &str) {
    let charged_to = decision.charged_to;
    if decision.admitted {
        assert!(
            (1..=3).contains(&charged_to),
            "{what}: admitted, charged to {charged_to}"
        );
        assert_eq!(
            decision.denial, 0,
            "{what}: admitted with denial {}",
            decision.denial
        );
    } else {
        assert_eq!(charged_to, 0, "{what}: denied, yet charged to {charged_to}");
        assert!(
            // The last denial: `tally_denial`'s codes are only appended.
            (1..=tally_denial::TALLY_DENIAL_KEY_REVOKED as u32).contains(&decision.denial),
            "{what}: denied with denial {}",
            decision.denial
        );
    }
    assert!(
        decision.limit_count as usize <= TALLY_MAX_DECISION_LIMITS,
        "{what}: {} limits",
        decision.limit_count
    );
    for name in [&decision.plan, &decision.limit_name, &decision.upgrade_plan] {
        let end = name
            .iter()
            .position(|&byte| byte == 0)
            .unwrap_or_else(|| panic!("{what}: a name without a NUL"));
        let bytes: Vec<u8> = name[..end].iter().map(|&byte| byte as u8).collect();
        assert!(
            std::str::from_utf8(&bytes).is_ok(),
            "{what}: a name that is not UTF-8"
        );
    }
}

fuzz_target!(|input: Input| {
    let mut world = World::open(input.durable % 8 == 1);
    world.unchanged_check = (input.durable >> 4) % 4 != 3;
    for op in input.ops.iter().take(MAX_OPS) {
        world.step(op);
    }
    // Close explicitly to see its status (free drops it); `tally_verify` runs on the explicit
    // closes among the operations only, as it reads the whole database.
    let status = if world.closed {
        tally_status::TALLY_CLOSED
    } else {
        tally_status::TALLY_OK
    };
    assert_eq!(
        known(tally_engine_close(world.engine), "close"),
        status,
        "final close: {}",
        last_error()
    );
    tally_engine_free(world.engine);
    if let Some(dir) = &world.dir {
        let _ = std::fs::remove_dir_all(dir);
    }
});
