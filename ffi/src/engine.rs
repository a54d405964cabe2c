//! The engine handle's life (open, close, free) and the admin calls: users, teams, members,
//! keys, seats, credits and policy swaps.

use std::ffi::c_char;

use ::tally_engine::{Durability, Engine, OpenOptions, Policy};

use crate::checks::{
    text, Out, TALLY_MAX_DOCUMENT_BYTES, TALLY_MAX_ID_BYTES, TALLY_MAX_NAME_BYTES,
};
use crate::decision::at;
use crate::handle::{free_boxed, tally_engine, to_boxed_ptr, try_ref, EngineHandle};
use crate::options::{clock_time, open_options, tally_options};
use crate::panic::boundary;
use crate::status::{tally_status, Failure};

/// When an acknowledged change is on disk (`durability` of `tally_engine_open`).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tally_durability {
    /// A call returns after its event is written and fdatasynced (concurrent calls share a
    /// flush). A crash, even a power loss, loses nothing acknowledged.
    TALLY_DURABILITY_SYNC = 0,
    /// A call returns once its event is queued; the log starts its fdatasync at the latest
    /// `interval_ms` (1..=60,000) after the call returned (later only while an earlier write
    /// or fdatasync is still running then: a slow disk). A process crash loses the events not yet written (queued or being written: at
    /// most 32,768); a power loss also those written since the last completed fdatasync. A
    /// write or fdatasync that fails after its calls returned fails every later call
    /// (`TALLY_LOG_FAILED`) until the engine is reopened; the events it carried may be missing
    /// from the database.
    TALLY_DURABILITY_INTERVAL = 1,
    /// No fsync of events (only when a log segment is sealed, on `tally_engine_sync` and on
    /// close): a process crash loses what it loses with `TALLY_DURABILITY_INTERVAL`, a power
    /// loss whatever the kernel had not written back. For tests and benchmarks.
    TALLY_DURABILITY_NONE = 2,
}

/// Where a policy comes from (`policy_source` of open and swap).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tally_policy_source {
    /// The shipped Token Plan policy; `policy` must be NULL with length 0.
    TALLY_POLICY_DEFAULT = 0,
    /// `policy` is the path of a `.toml` or `.json` file.
    TALLY_POLICY_FILE = 1,
    /// `policy` is a TOML document.
    TALLY_POLICY_TOML = 2,
    /// `policy` is a JSON document.
    TALLY_POLICY_JSON = 3,
    /// `tally_engine_open` only: the policy the database last ran with, nothing swapped in or
    /// logged; a new database starts with the shipped Token Plan. For tools that look at or
    /// correct a gateway's database without changing its policy (pair it with
    /// `tally_options_set_use_recorded` to keep the database's options too). `policy` must be
    /// NULL with length 0. `tally_engine_open_in_memory` and `tally_engine_swap_policy` have no
    /// stored policy and refuse it (`TALLY_INVALID_ARGUMENT`).
    TALLY_POLICY_STORED = 4,
}

fn bad_enum(field: &str, value: u32) -> Failure {
    Failure::new(
        tally_status::TALLY_BAD_ENUM,
        format!("{field}: {value} is not one of its enum's values"),
    )
}

fn policy_failure(error: ::tally_engine::PolicyError) -> Failure {
    Failure::new(
        tally_status::TALLY_POLICY_INVALID,
        format!("policy: {error}"),
    )
}

/// `policy`/`policy_len` of a source that takes no text (`name`): NULL with length 0.
fn no_policy_text(name: &str, policy: *const c_char, policy_len: usize) -> Result<(), Failure> {
    if !policy.is_null() || policy_len != 0 {
        return Err(Failure::new(
            tally_status::TALLY_INVALID_ARGUMENT,
            format!("policy: must be NULL with length 0 for {name}"),
        ));
    }
    Ok(())
}

/// Loads a policy as `source` says. `TALLY_POLICY_STORED` is refused: it names no policy, and
/// only `tally_engine_open` (which checks for it first) gives it a meaning.
pub(crate) fn load_policy(
    source: u32,
    policy: *const c_char,
    policy_len: usize,
) -> Result<Policy, Failure> {
    let document = |field| text(field, policy, policy_len, TALLY_MAX_DOCUMENT_BYTES);
    match source {
        0 => {
            no_policy_text("TALLY_POLICY_DEFAULT", policy, policy_len)?;
            Ok(Policy::token_plan())
        }
        1 => Policy::load(std::path::Path::new(document("policy (path)")?)).map_err(policy_failure),
        2 => Policy::from_toml_str(document("policy (TOML)")?).map_err(policy_failure),
        3 => Policy::from_json_str(document("policy (JSON)")?).map_err(policy_failure),
        4 => Err(Failure::new(
            tally_status::TALLY_INVALID_ARGUMENT,
            "policy_source: TALLY_POLICY_STORED is for tally_engine_open only (an in-memory \
             engine or a swap has no stored policy to keep)",
        )),
        other => Err(bad_enum("policy_source", other)),
    }
}

fn durability(mode: u32, interval_ms: u32) -> Result<Durability, Failure> {
    match mode {
        0 => Ok(Durability::Sync),
        1 => Ok(Durability::Interval {
            ms: u64::from(interval_ms),
        }),
        2 => Ok(Durability::None),
        other => Err(bad_enum("durability_mode", other)),
    }
}

/// Opens (or creates) the database in the directory `path` and writes a new handle to
/// `*engine_out`. `policy_source` is a `tally_policy_source`; `policy`/`policy_len` its path or
/// text. On a new database the policy is the first event; on an existing one a different policy
/// is swapped in (usage carries over), except with `TALLY_POLICY_STORED`, which keeps the
/// database's own policy and logs nothing (a new database starts with the shipped Token Plan).
/// `durability_mode` is a `tally_durability`; `interval_ms` is read only for
/// `TALLY_DURABILITY_INTERVAL`. `options` are the engine's and the database's options
/// (`tally_options_new`; with `tally_options_set_use_recorded`, an existing database's
/// recorded ones), or NULL for the defaults; they are read during the call only. Without an
/// explicit timestamp the engine uses its clock: the system clock, or one of its own that
/// `tally_engine_set_clock` moves (`tally_options_set_manual_clock`).
///
/// Errors: `TALLY_INVALID_ARGUMENT` (an interval out of 1..=60,000 ms, or an option out of
/// range; the last error names it), `TALLY_DATABASE_LOCKED` (open elsewhere),
/// `TALLY_DATABASE_DAMAGED`, `TALLY_DATABASE_FOREIGN` (a directory of other files),
/// `TALLY_DATABASE_NEWER_FORMAT`, `TALLY_POLICY_INVALID`, `TALLY_STORAGE`. On error
/// `*engine_out` is not written, and bad arguments leave the directory as it was (not even
/// created). The handle must be closed with `tally_engine_close` and freed with
/// `tally_engine_free`.
#[no_mangle]
pub extern "C" fn tally_engine_open(
    path: *const c_char,
    path_len: usize,
    policy_source: u32,
    policy: *const c_char,
    policy_len: usize,
    durability_mode: u32,
    interval_ms: u32,
    options: *const tally_options,
    engine_out: *mut *mut tally_engine,
) -> tally_status {
    boundary(|| {
        let out = Out::new("engine_out", engine_out)?;
        let path = text("path", path, path_len, TALLY_MAX_DOCUMENT_BYTES)?;
        let durability = durability(durability_mode, interval_ms)?;
        let settings = open_options(options)?;
        let (clock, manual_clock) = settings.clock();
        let options = OpenOptions {
            durability,
            ..settings.open
        };
        // The engine calls the interval's range error "durability"; the C argument is
        // `interval_ms`.
        let named = |error| Failure::naming(error, "durability", "interval_ms");
        let engine = if policy_source == tally_policy_source::TALLY_POLICY_STORED as u32 {
            no_policy_text("TALLY_POLICY_STORED", policy, policy_len)?;
            Engine::open_with_stored_policy(path, Policy::token_plan(), clock, options)
                .map_err(named)?
        } else {
            let policy = load_policy(policy_source, policy, policy_len)?;
            Engine::open(path, policy, clock, options).map_err(named)?
        };
        out.set(to_boxed_ptr::<tally_engine>(EngineHandle::new(
            engine,
            manual_clock,
        )));
        Ok(())
    })
}

/// Creates an engine that keeps everything in memory (lost when closed): for tests and
/// simulations. Calls that need the event log (events, cursors, checkpoint, sync, compact)
/// answer `TALLY_NOT_DURABLE`. `options` as for `tally_engine_open` (NULL: the defaults); the
/// database's options (`checkpoint_every_events`, `retention_ms`, `use_recorded`) are not used.
///
/// Errors: `TALLY_INVALID_ARGUMENT` (an option out of range, or `TALLY_POLICY_STORED`: there is
/// no database to keep a policy), `TALLY_POLICY_INVALID`. On error `*engine_out` is not
/// written. The handle must be closed with `tally_engine_close` and freed with
/// `tally_engine_free`.
#[no_mangle]
pub extern "C" fn tally_engine_open_in_memory(
    policy_source: u32,
    policy: *const c_char,
    policy_len: usize,
    options: *const tally_options,
    engine_out: *mut *mut tally_engine,
) -> tally_status {
    boundary(|| {
        let out = Out::new("engine_out", engine_out)?;
        let settings = open_options(options)?;
        let policy = load_policy(policy_source, policy, policy_len)?;
        let (clock, manual_clock) = settings.clock();
        let engine = Engine::new(policy, clock, settings.open.engine)?;
        out.set(to_boxed_ptr::<tally_engine>(EngineHandle::new(
            engine,
            manual_clock,
        )));
        Ok(())
    })
}

/// Closes the engine: waits for calls other threads have inside it, takes a checkpoint and
/// flushes the database, and releases its lock so it can be opened again. Safe while other
/// threads are using the handle: their calls already inside finish normally, later ones get
/// `TALLY_CLOSED`. Closing again answers `TALLY_CLOSED` and changes nothing. The handle is
/// closed even when this returns a storage error. It is still allocated: free it with
/// `tally_engine_free`.
#[no_mangle]
pub extern "C" fn tally_engine_close(engine: *const tally_engine) -> tally_status {
    boundary(|| try_ref(engine)?.close())
}

/// Frees a handle, closing it first if it is still open (any close error is dropped: close
/// explicitly to see it). NULL is a no-op. The handle must not be used, by any thread, from the
/// moment this is called: a call racing or following free, or a second free, is undefined
/// behaviour like any use after free.
#[no_mangle]
pub extern "C" fn tally_engine_free(engine: *mut tally_engine) {
    let _ = boundary(|| {
        if let Ok(handle) = try_ref(engine) {
            if handle.is_open() {
                let _ = handle.close();
            }
        }
        free_boxed(engine);
        Ok(())
    });
}

/// Moves the engine's own clock (`tally_options_set_manual_clock`) to `now_ms` (milliseconds
/// since the Unix epoch, UTC), forward or back: from then on `TALLY_NOW` is that time, and so
/// is "now" for how far ahead a stamp may be, how long request ids are remembered, and when
/// leases end and idle keys are freed on their own (checked on the next call that looks).
/// Usage already counted stays counted: a clock moved back releases no quota early.
///
/// Errors: `TALLY_INVALID_ARGUMENT` if the engine reads the system clock (the last error says
/// so, naming `engine`), or `now_ms` is 0 or at or after 2100-01-01T00:00:00Z (naming
/// `now_ms`); `TALLY_CLOSED`, `TALLY_NULL_POINTER`. The clock is unchanged on error.
#[no_mangle]
pub extern "C" fn tally_engine_set_clock(engine: *const tally_engine, now_ms: u64) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        handle.with(|open| {
            let clock = open.manual_clock.as_ref().ok_or_else(system_clock)?;
            clock.set_ms(clock_time("now_ms", now_ms)?);
            Ok(())
        })
    })
}

/// Writes the time the engine's clock reads now (milliseconds since the Unix epoch, UTC) to
/// `*now_ms_out`: the system clock's, or the engine's own (`tally_engine_set_clock`).
///
/// Errors: `TALLY_CLOSED`, `TALLY_NULL_POINTER`; `*now_ms_out` is not written then.
#[no_mangle]
pub extern "C" fn tally_engine_clock(
    engine: *const tally_engine,
    now_ms_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let out = Out::new("now_ms_out", now_ms_out)?;
        let handle = try_ref(engine)?;
        let now_ms = handle.with(|open| Ok(open.engine.now_ms()))?;
        out.set(now_ms);
        Ok(())
    })
}

fn system_clock() -> Failure {
    Failure::new(
        tally_status::TALLY_INVALID_ARGUMENT,
        "engine: it reads the system clock, which only the system sets; open it with \
         tally_options_set_manual_clock for a clock of its own",
    )
}

fn id<'a>(field: &str, ptr: *const c_char, len: usize) -> Result<&'a str, Failure> {
    text(field, ptr, len, TALLY_MAX_ID_BYTES)
}

/// The longest name of an existing team: a user's Default Team is `@` and the user's name,
/// which may itself be `TALLY_MAX_ID_BYTES` long.
const MAX_TEAM_BYTES: usize = TALLY_MAX_ID_BYTES + 1;

/// A team that exists (not one being created): up to `MAX_TEAM_BYTES`.
fn existing_team<'a>(ptr: *const c_char, len: usize) -> Result<&'a str, Failure> {
    text("team", ptr, len, MAX_TEAM_BYTES)
}

/// Creates a user, their Default Team (named `@` + user) and their plan key in it. The key has
/// no resources until a seat is assigned or the team has credits.
#[no_mangle]
pub extern "C" fn tally_engine_create_user(
    engine: *const tally_engine,
    user: *const c_char,
    user_len: usize,
    key: *const c_char,
    key_len: usize,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let (user, key) = (id("user", user, user_len)?, id("key", key, key_len)?);
        handle.with(|open| Ok(open.engine.create_user(user, key, at(at_ms))?))
    })
}

/// Creates a team (with no members and no credits).
#[no_mangle]
pub extern "C" fn tally_engine_create_team(
    engine: *const tally_engine,
    team: *const c_char,
    team_len: usize,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let team = id("team", team, team_len)?;
        handle.with(|open| Ok(open.engine.create_team(team, at(at_ms))?))
    })
}

/// Adds an existing user to a team with their plan key for that team (one key per user per
/// team). A member whose key was revoked is given `key` in its place, with no seat;
/// otherwise a member already is `TALLY_ALREADY_EXISTS`.
#[no_mangle]
pub extern "C" fn tally_engine_add_member(
    engine: *const tally_engine,
    team: *const c_char,
    team_len: usize,
    user: *const c_char,
    user_len: usize,
    key: *const c_char,
    key_len: usize,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let team = existing_team(team, team_len)?;
        let (user, key) = (id("user", user, user_len)?, id("key", key, key_len)?);
        handle.with(|open| Ok(open.engine.add_member(team, user, key, at(at_ms))?))
    })
}

/// Revokes `key` (a plan or pay-as-you-go key, say one that leaked) and writes to
/// `*revoked_out` whether it was revoked now (`false`: it already was, and nothing was logged).
/// Every later request on it is denied `TALLY_DENIAL_KEY_REVOKED`, whatever its seat or its
/// team's credits (a repeat of a request id admitted before still returns its first decision).
/// What it used still counts, its open reservations still settle or void (a settle's extra
/// beyond the hold is denied) and its requests still refund. Revoking is for good: give the
/// member a new key with `tally_engine_add_member` (it starts with no seat). An unknown key is
/// `TALLY_UNKNOWN_KEY`.
#[no_mangle]
pub extern "C" fn tally_engine_revoke_key(
    engine: *const tally_engine,
    key: *const c_char,
    key_len: usize,
    at_ms: u64,
    revoked_out: *mut bool,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("revoked_out", revoked_out)?;
        let key = text("key", key, key_len, TALLY_MAX_ID_BYTES)?;
        out.set(handle.with(|open| Ok(open.engine.revoke_key(key, at(at_ms))?))?);
        Ok(())
    })
}

/// Issues a pay-as-you-go key to an existing user: admitted whenever the resource exists,
/// its spend recorded for billing; never touches plan quota or credits.
#[no_mangle]
pub extern "C" fn tally_engine_create_payg_key(
    engine: *const tally_engine,
    user: *const c_char,
    user_len: usize,
    key: *const c_char,
    key_len: usize,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let (user, key) = (id("user", user, user_len)?, id("key", key, key_len)?);
        handle.with(|open| Ok(open.engine.create_payg_key(user, key, at(at_ms))?))
    })
}

/// Gives the user's key in the team a seat on `plan`, or changes it (upgrade or downgrade) at
/// once; usage already counted stays counted.
#[no_mangle]
pub extern "C" fn tally_engine_assign_seat(
    engine: *const tally_engine,
    team: *const c_char,
    team_len: usize,
    user: *const c_char,
    user_len: usize,
    plan: *const c_char,
    plan_len: usize,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let (team, user) = (existing_team(team, team_len)?, id("user", user, user_len)?);
        let plan = text("plan", plan, plan_len, TALLY_MAX_NAME_BYTES)?;
        handle.with(|open| Ok(open.engine.assign_seat(team, user, plan, at(at_ms))?))
    })
}

/// Takes the seat away (the key falls back to the team's credits, if any).
#[no_mangle]
pub extern "C" fn tally_engine_unassign_seat(
    engine: *const tally_engine,
    team: *const c_char,
    team_len: usize,
    user: *const c_char,
    user_len: usize,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let (team, user) = (existing_team(team, team_len)?, id("user", user, user_len)?);
        handle.with(|open| Ok(open.engine.unassign_seat(team, user, at(at_ms))?))
    })
}

/// Adds `micros` micro-credits to the team's balance and writes the new balance to
/// `*balance_out`. `TALLY_OVERFLOW` (nothing changed) if the balance and everything charged to
/// the team would together pass 2^63 - 1 micro-credits.
#[no_mangle]
pub extern "C" fn tally_engine_top_up(
    engine: *const tally_engine,
    team: *const c_char,
    team_len: usize,
    micros: u64,
    at_ms: u64,
    balance_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("balance_out", balance_out)?;
        let team = existing_team(team, team_len)?;
        let balance = handle.with(|open| Ok(open.engine.top_up(team, micros, at(at_ms))?))?;
        out.set(balance);
        Ok(())
    })
}

/// Takes `micros` from the team's balance (a chargeback, a mistaken top-up), never below zero
/// (`TALLY_INSUFFICIENT_CREDITS`); writes the new balance to `*balance_out`.
#[no_mangle]
pub extern "C" fn tally_engine_withdraw_credits(
    engine: *const tally_engine,
    team: *const c_char,
    team_len: usize,
    micros: u64,
    at_ms: u64,
    balance_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("balance_out", balance_out)?;
        let team = existing_team(team, team_len)?;
        let balance =
            handle.with(|open| Ok(open.engine.withdraw_credits(team, micros, at(at_ms))?))?;
        out.set(balance);
        Ok(())
    })
}

/// Writes the team's credits balance in micro-credits to `*balance_out`.
#[no_mangle]
pub extern "C" fn tally_engine_credits(
    engine: *const tally_engine,
    team: *const c_char,
    team_len: usize,
    balance_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("balance_out", balance_out)?;
        let team = existing_team(team, team_len)?;
        out.set(handle.with(|open| Ok(open.engine.credits_micros(team)?))?);
        Ok(())
    })
}

/// Replaces the policy at run time (`policy_source` and `policy` as for open, but
/// `TALLY_POLICY_STORED`, which names no new policy, is `TALLY_INVALID_ARGUMENT`). Usage
/// carries over for every counter whose meter and window stay; seats move to the plan of the
/// same name. A swap that would drop a plan someone is seated on is refused
/// (`TALLY_INVALID_ARGUMENT`), and so is one whose usage could not carry over as it means (a
/// meter kept by name that counts another unit or another weighted sum (other terms or weights;
/// a usage bar may change its prices), a time zone changed under a daily, weekly or
/// monthly window that carries over, the week's first day (`week_start`) changed under a
/// weekly one, a plan's limit moved to another window, whose count so far would be dropped:
/// `TALLY_POLICY_INVALID`, naming the field), changing nothing. Waits for the calls inside
/// the handle.
#[no_mangle]
pub extern "C" fn tally_engine_swap_policy(
    engine: *const tally_engine,
    policy_source: u32,
    policy: *const c_char,
    policy_len: usize,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let policy = load_policy(policy_source, policy, policy_len)?;
        handle.with_exclusive(|open| {
            open.engine.swap_policy(policy, at(at_ms))?;
            open.policy = open.engine.policy();
            Ok(())
        })
    })
}
