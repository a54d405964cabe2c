//! `tally_options`: the engine's and the database's options, set one at a time before an open.
//! Each setter checks its value against the option's range at once (the engine's own check,
//! `OpenOptions::validate`), so the call that was wrong is the one that fails; the open
//! functions check them all again.

use std::ops::Deref;
use std::sync::Arc;

use ::tally_engine::calendar::MAX_TIMESTAMP_MS;
use ::tally_engine::{Clock, ManualClock, OpenOptions, SystemClock};

use crate::checks::Out;
use crate::handle::{free_boxed, to_boxed_ptr, try_mut, try_ref, Castable};
use crate::panic::boundary;
use crate::status::{tally_status, Failure};

/// The largest bound of a table (`max_keys`, `max_teams`, `max_users`, `idempotency_capacity`,
/// `max_open_reservations`): 2^32 entries, more memory than any machine has.
pub const TALLY_MAX_TABLE_ENTRIES: u64 = 4_294_967_296;
/// The longest `default_lease_ms`: a day.
pub const TALLY_MAX_LEASE_MS: u64 = 86_400_000;
/// The longest `idempotency_horizon_ms`: 366 days, the longest window a policy may have.
pub const TALLY_MAX_IDEMPOTENCY_HORIZON_MS: u64 = 31_622_400_000;
/// The longest `reclaim_idle_every_ms` and `retention_ms`: the span of timestamps tally
/// accepts (up to 2100-01-01T00:00:00Z).
pub const TALLY_MAX_PERIOD_MS: u64 = 4_102_444_800_000;
/// The default `max_ahead_of_clock_ms`: a day. A stamp further ahead of the engine's clock is
/// `TALLY_BAD_TIMESTAMP` unless the options set another bound (0: none).
pub const TALLY_DEFAULT_MAX_AHEAD_OF_CLOCK_MS: u64 = 86_400_000;
/// The fewest policy generations kept (`max_policy_generations`).
pub const TALLY_MIN_POLICY_GENERATIONS: u64 = 2;
/// The most policy generations kept (`max_policy_generations`).
pub const TALLY_MAX_POLICY_GENERATIONS: u64 = 65_536;

const _: () = assert!(TALLY_MAX_TABLE_ENTRIES == ::tally_engine::options::MAX_TABLE_ENTRIES);
const _: () = assert!(TALLY_MAX_LEASE_MS == ::tally_engine::reservation::MAX_LEASE_MS);
const _: () = assert!(
    TALLY_MAX_IDEMPOTENCY_HORIZON_MS == ::tally_engine::options::MAX_IDEMPOTENCY_HORIZON_MS
);
const _: () = assert!(TALLY_MAX_PERIOD_MS == ::tally_engine::options::MAX_PERIOD_MS);
const _: () = assert!(
    TALLY_DEFAULT_MAX_AHEAD_OF_CLOCK_MS == ::tally_engine::options::DEFAULT_MAX_AHEAD_OF_CLOCK_MS
);
const _: () =
    assert!(TALLY_MIN_POLICY_GENERATIONS == ::tally_engine::options::MIN_POLICY_GENERATIONS as u64);
const _: () =
    assert!(TALLY_MAX_POLICY_GENERATIONS == ::tally_engine::options::MAX_POLICY_GENERATIONS as u64);

/// Options for `tally_engine_open`, `tally_engine_open_in_memory` and `tally_verify`. Opaque.
/// Created by `tally_options_new` with every option at its default, changed by the
/// `tally_options_set_*` functions, freed by `tally_options_free`. The open functions and
/// `tally_verify` only read it: free it (or reuse it) whenever they have returned.
///
/// Threads: like a plain C struct, it must not be set from one thread while another sets or
/// reads it; once set, any number of threads may open with it at once.
#[allow(non_camel_case_types)]
pub struct tally_options {
    _private: [u8; 0],
}

impl Castable for tally_options {
    type RustType = Settings;
    const NAME: &'static str = "options";
}

/// What a `tally_options` holds: the engine's and the database's options, and which clock the
/// engines opened with them read.
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    pub open: OpenOptions,
    /// `Some(start)`: each engine opened gets a clock of its own, at `start` until
    /// `tally_engine_set_clock` moves it; `None`: the system clock.
    pub manual_clock_ms: Option<u64>,
}

impl Deref for Settings {
    type Target = OpenOptions;

    fn deref(&self) -> &OpenOptions {
        &self.open
    }
}

impl Settings {
    /// The clock for one engine to read, and the handle to move it by when it is manual.
    pub fn clock(&self) -> (Arc<dyn Clock>, Option<Arc<ManualClock>>) {
        match self.manual_clock_ms {
            None => (Arc::new(SystemClock), None),
            Some(start_ms) => {
                let clock = Arc::new(ManualClock::new(start_ms));
                (Arc::clone(&clock) as Arc<dyn Clock>, Some(clock))
            }
        }
    }
}

/// The options of an open: `options`' values, or the defaults for NULL.
pub(crate) fn open_options(options: *const tally_options) -> Result<Settings, Failure> {
    if options.is_null() {
        return Ok(Settings::default());
    }
    Ok(try_ref(options)?.clone())
}

/// Checks a time a manual clock is set to (`field` names it): a timestamp tally accepts,
/// after the epoch (0 is `TALLY_NOW`) and before 2100-01-01T00:00:00Z.
pub(crate) fn clock_time(field: &str, ms: u64) -> Result<u64, Failure> {
    if ms == 0 || ms >= MAX_TIMESTAMP_MS {
        return Err(Failure::new(
            tally_status::TALLY_INVALID_ARGUMENT,
            format!(
                "{field}: {ms} is out of range: allowed are 1 to {} (milliseconds since \
                 1970-01-01T00:00:00Z, before 2100-01-01T00:00:00Z)",
                MAX_TIMESTAMP_MS - 1
            ),
        ));
    }
    Ok(ms)
}

/// The options of a verify: `options`' values, or for NULL the database's recorded options
/// (the defaults where it recorded none). Verify must replay with the options the database
/// was opened with, and the database knows them better than a caller who passes nothing.
pub(crate) fn verify_options(options: *const tally_options) -> Result<OpenOptions, Failure> {
    if options.is_null() {
        return Ok(OpenOptions {
            use_recorded: true,
            ..OpenOptions::default()
        });
    }
    Ok(try_ref(options)?.open.clone())
}

/// Changes one option, checked at once: a value out of range leaves the options as they were.
/// Every option's range is its own (none depends on another's), so the full check that the
/// engine makes fails only on the value just changed, and names it.
fn set(options: *mut tally_options, change: impl FnOnce(&mut OpenOptions)) -> tally_status {
    boundary(|| {
        let options = try_mut(options)?;
        let mut changed = options.open.clone();
        change(&mut changed);
        changed.validate()?;
        options.open = changed;
        Ok(())
    })
}

/// A `uint64_t` for a `size_t` option; a value past `size_t` (32-bit targets) is refused by
/// the option's range, as `SIZE_MAX` is.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// Creates options with every value at its default and writes them to `*options_out`.
///
/// Errors: `TALLY_NULL_POINTER` if `options_out` is NULL. Ownership: the caller owns the
/// options and frees them with `tally_options_free`.
#[no_mangle]
pub extern "C" fn tally_options_new(options_out: *mut *mut tally_options) -> tally_status {
    boundary(|| {
        let out = Out::new("options_out", options_out)?;
        out.set(to_boxed_ptr::<tally_options>(Settings::default()));
        Ok(())
    })
}

/// Frees options from `tally_options_new`. NULL is a no-op. Engines opened with them are not
/// affected. Must be the last use of `options` by any thread. Never fails.
#[no_mangle]
pub extern "C" fn tally_options_free(options: *mut tally_options) {
    let _ = boundary(|| {
        free_boxed(options);
        Ok(())
    });
}

/// Keys at most: 1 to `TALLY_MAX_TABLE_ENTRIES` (default 16,000,000). A key past the bound
/// is refused with `TALLY_CAPACITY_EXCEEDED`. An open given a table bound (this one,
/// `max_teams`, `max_users`, `idempotency_capacity`, `max_open_reservations`) below what the
/// database holds is refused with `TALLY_INVALID_ARGUMENT` and changes nothing: the last error
/// names the option, the bound and how many the database holds.
///
/// Errors: `TALLY_NULL_POINTER` (`options` is NULL), `TALLY_INVALID_ARGUMENT` (out of range;
/// the last error names the option and the range); either way the options are unchanged.
#[no_mangle]
pub extern "C" fn tally_options_set_max_keys(
    options: *mut tally_options,
    max_keys: u64,
) -> tally_status {
    set(options, |options| options.engine.max_keys = max_keys)
}

/// Teams at most (each user's Default Team counts): 1 to `TALLY_MAX_TABLE_ENTRIES` (default
/// 4,000,000).
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_max_teams(
    options: *mut tally_options,
    max_teams: u64,
) -> tally_status {
    set(options, |options| options.engine.max_teams = max_teams)
}

/// Users at most: 1 to `TALLY_MAX_TABLE_ENTRIES` (default 8,000,000).
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_max_users(
    options: *mut tally_options,
    max_users: u64,
) -> tally_status {
    set(options, |options| options.engine.max_users = max_users)
}

/// Request ids remembered at once (390 to 580 bytes each resident, by the lengths of the id
/// and the key): 1 to `TALLY_MAX_TABLE_ENTRIES`
/// (default 1,000,000). A new id is refused (`TALLY_CAPACITY_EXCEEDED`) only when the table
/// holds that many ids still inside the horizon.
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_idempotency_capacity(
    options: *mut tally_options,
    idempotency_capacity: u64,
) -> tally_status {
    set(options, |options| {
        options.engine.idempotency_capacity = to_usize(idempotency_capacity);
    })
}

/// How long a request id is remembered, never less than the policy's longest window: 0 (the
/// default) for the policy's longest window, else 1 to `TALLY_MAX_IDEMPOTENCY_HORIZON_MS`.
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_idempotency_horizon_ms(
    options: *mut tally_options,
    idempotency_horizon_ms: u64,
) -> tally_status {
    set(options, |options| {
        options.engine.idempotency_horizon_ms = idempotency_horizon_ms;
    })
}

/// Reservations open at once: 1 to `TALLY_MAX_TABLE_ENTRIES` (default 1,000,000); also how many
/// closed ones are remembered (the most recently closed) so a repeated settle or void is
/// idempotent. An open with a lower bound than the reservations open in the database (their
/// leases not ended) is refused; one lower than the database ran with keeps the closed ones it
/// restores until its first close.
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_max_open_reservations(
    options: *mut tally_options,
    max_open_reservations: u64,
) -> tally_status {
    set(options, |options| {
        options.engine.max_open_reservations = to_usize(max_open_reservations);
    })
}

/// The lease of a reservation made with a lease of 0: 1 to `TALLY_MAX_LEASE_MS` (default
/// 600,000, 10 minutes).
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_default_lease_ms(
    options: *mut tally_options,
    default_lease_ms: u64,
) -> tally_status {
    set(options, |options| {
        options.engine.default_lease_ms = default_lease_ms;
    })
}

/// Policies kept so requests admitted before a swap are still refunded exactly:
/// `TALLY_MIN_POLICY_GENERATIONS` to `TALLY_MAX_POLICY_GENERATIONS` (default 1,024). More while
/// a reservation opened under an older one is open (at most its lease, 24 h): that generation
/// and every later one are kept until it closes, so its settle gives back exactly what it does
/// not use; those past the bound are let go at the first swap after that. An open with a lower
/// bound than the database kept keeps them until its first swap too.
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_max_policy_generations(
    options: *mut tally_options,
    max_policy_generations: u64,
) -> tally_status {
    set(options, |options| {
        options.engine.max_policy_generations = to_usize(max_policy_generations);
    })
}

/// How often, on the engine's clock, the engine frees idle keys' window memory on its own
/// (a key idle this long is freed within about twice this): 0 for never
/// (`tally_engine_reclaim_idle` still works), else 1 to `TALLY_MAX_PERIOD_MS` (default
/// 600,000, 10 minutes).
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_reclaim_idle_every_ms(
    options: *mut tally_options,
    reclaim_idle_every_ms: u64,
) -> tally_status {
    set(options, |options| {
        options.engine.reclaim_idle_every_ms = reclaim_idle_every_ms;
    })
}

/// Whether the engine expires reservations whose lease has ended on its own, from the
/// admission path (default true). False: only `tally_engine_reserve`, a late settle, a policy
/// swap and `tally_engine_expire_reservations` expire them.
///
/// Errors: `TALLY_NULL_POINTER` if `options` is NULL (every value is in range).
#[no_mangle]
pub extern "C" fn tally_options_set_expire_leases_on_its_own(
    options: *mut tally_options,
    expire_leases_on_its_own: bool,
) -> tally_status {
    set(options, |options| {
        options.engine.expire_leases_on_its_own = expire_leases_on_its_own;
    })
}

/// How far ahead of the engine's (system) clock an operation's explicit `at_ms` may be: one
/// stamped further ahead is refused (`TALLY_BAD_TIMESTAMP`, naming `at_ms`) and changes
/// nothing. Without a bound, one request stamped months ahead (a client's bad clock) moves its
/// key's windows there: for requests stamped now its usage does not age out, nor its
/// reservation's lease end, until the clock reaches that time, and compaction drops neither its
/// log segment nor any later one until the clock passes the stamp plus the longest window and
/// the retention: the log only grows until then. Default
/// `TALLY_DEFAULT_MAX_AHEAD_OF_CLOCK_MS` (a day: far more than any clock skew); 0: no bound,
/// timestamps are taken as given (tests and replays that run ahead of the clock); else 1 to
/// `TALLY_MAX_PERIOD_MS`. The log's own timestamps are never refused when an open replays it.
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_max_ahead_of_clock_ms(
    options: *mut tally_options,
    max_ahead_of_clock_ms: u64,
) -> tally_status {
    set(options, |options| {
        options.engine.max_ahead_of_clock_ms = max_ahead_of_clock_ms;
    })
}

/// A database checkpoints once this many events were logged since the last checkpoint: 1 to
/// 2^64 - 1 (default 1,000,000; each checkpoint also starts a new log file, so a small value
/// means many small files; 2^64 - 1 leaves checkpoints to `tally_engine_checkpoint` and
/// close). A checkpoint whose work took 10 ms or more (of wall-clock time) holds the next one
/// back until four times that has passed since it started, or until twice this many events
/// came, whichever is first: checkpoints take about a quarter of a core, unless twice this
/// many events come within four times a checkpoint's cost (then the cap comes first and they
/// take more). So an open replays up to about twice this many events (more after a crash while
/// a checkpoint's snapshot was being written: the tail before it too). Read by
/// `tally_engine_open` only.
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_checkpoint_every_events(
    options: *mut tally_options,
    checkpoint_every_events: u64,
) -> tally_status {
    set(options, |options| {
        options.checkpoint_every_events = checkpoint_every_events;
    })
}

/// How long an export reader has: `tally_engine_compact`, and each periodic checkpoint on its
/// own, drop an event only once its timestamp is this long past the policy's longest window
/// and it was logged at least this long ago on the engine's clock (a request delivered late, stamped long ago, stays this long
/// after it was logged): 0 to `TALLY_MAX_PERIOD_MS` (default 604,800,000, 7 days). Read by
/// `tally_engine_open` only.
///
/// Errors: as `tally_options_set_max_keys`.
#[no_mangle]
pub extern "C" fn tally_options_set_retention_ms(
    options: *mut tally_options,
    retention_ms: u64,
) -> tally_status {
    set(options, |options| options.retention_ms = retention_ms)
}

/// Whether to open as a tool (default false: as the database's owner). An owner's open runs
/// with the options set here and, once it succeeds, records them in the database (the engine's
/// options, `checkpoint_every_events` and `retention_ms`). True makes `tally_engine_open` and
/// `tally_verify` run an existing database with its recorded options instead, and record
/// nothing; the options set here then apply only to a database that recorded none (a new one,
/// or one written before options were recorded). For tools that open or verify a
/// gateway's database: with other options a tool would forget request ids sooner, compact
/// events the gateway's retention keeps, or see a sound database as unsound. The durability
/// is always the call's own. `tally_engine_open_in_memory` has no database and ignores it.
///
/// Errors: `TALLY_NULL_POINTER` if `options` is NULL (every value is in range).
#[no_mangle]
pub extern "C" fn tally_options_set_use_recorded(
    options: *mut tally_options,
    use_recorded: bool,
) -> tally_status {
    set(options, |options| options.use_recorded = use_recorded)
}

/// Gives each engine opened with these options a clock of its own that stands at
/// `manual_clock_ms` (milliseconds since the Unix epoch, UTC) and moves only when `tally_engine_set_clock` moves
/// it, instead of the system clock: for tests, simulations and replays, which then control
/// every time the engine reads (`TALLY_NOW`, how far ahead of the clock a stamp may be, how
/// long request ids are remembered, when leases end and idle keys are freed). 0 gives engines
/// the system clock again (the default). `tally_verify` reads no clock and ignores it.
///
/// Errors: `TALLY_NULL_POINTER` if `options` is NULL; `TALLY_INVALID_ARGUMENT` if
/// `manual_clock_ms` is at or after 2100-01-01T00:00:00Z (the last error names it), leaving the options
/// as they were.
#[no_mangle]
pub extern "C" fn tally_options_set_manual_clock(
    options: *mut tally_options,
    manual_clock_ms: u64,
) -> tally_status {
    boundary(|| {
        let options = try_mut(options)?;
        options.manual_clock_ms = match manual_clock_ms {
            0 => None,
            start_ms => Some(clock_time("manual_clock_ms", start_ms)?),
        };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handle::take_boxed;

    fn new_options() -> *mut tally_options {
        let mut options = std::ptr::null_mut();
        assert_eq!(tally_options_new(&mut options), tally_status::TALLY_OK);
        options
    }

    fn last_error() -> String {
        let mut buf = [0 as std::ffi::c_char; 512];
        let mut needed = 0;
        assert_eq!(
            crate::tally_last_error(buf.as_mut_ptr(), buf.len(), &mut needed),
            tally_status::TALLY_OK
        );
        // SAFETY: tally_last_error wrote a NUL-terminated string into `buf`.
        let text = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        text.to_string_lossy().into_owned()
    }

    #[test]
    fn a_refused_value_leaves_the_options_as_they_were() {
        let options = new_options();
        assert_eq!(
            tally_options_set_default_lease_ms(options, 5_000),
            tally_status::TALLY_OK
        );
        assert_eq!(
            tally_options_set_default_lease_ms(options, 0),
            tally_status::TALLY_INVALID_ARGUMENT
        );
        assert!(
            last_error().starts_with("default_lease_ms: 0 is out of range: allowed are 1 to "),
            "{}",
            last_error()
        );
        let options = take_boxed(options).expect("not NULL");
        assert_eq!(options.engine.default_lease_ms, 5_000);
    }

    #[test]
    fn use_recorded_is_off_by_default_and_set_by_its_setter() {
        let options = new_options();
        assert_eq!(
            tally_options_set_use_recorded(std::ptr::null_mut(), true),
            tally_status::TALLY_NULL_POINTER
        );
        assert_eq!(
            take_boxed(new_options()).map(|options| options.use_recorded),
            Some(false)
        );
        assert_eq!(
            tally_options_set_use_recorded(options, true),
            tally_status::TALLY_OK
        );
        assert_eq!(
            take_boxed(options).map(|options| options.use_recorded),
            Some(true)
        );
    }

    #[test]
    fn every_setter_of_a_number_names_its_option_when_it_refuses() {
        type Setter = extern "C" fn(*mut tally_options, u64) -> tally_status;
        let setters: [(&str, Setter); 11] = [
            ("max_keys", tally_options_set_max_keys),
            ("max_teams", tally_options_set_max_teams),
            ("max_users", tally_options_set_max_users),
            (
                "idempotency_capacity",
                tally_options_set_idempotency_capacity,
            ),
            (
                "idempotency_horizon_ms",
                tally_options_set_idempotency_horizon_ms,
            ),
            (
                "max_open_reservations",
                tally_options_set_max_open_reservations,
            ),
            ("default_lease_ms", tally_options_set_default_lease_ms),
            (
                "max_policy_generations",
                tally_options_set_max_policy_generations,
            ),
            (
                "reclaim_idle_every_ms",
                tally_options_set_reclaim_idle_every_ms,
            ),
            ("retention_ms", tally_options_set_retention_ms),
            (
                "max_ahead_of_clock_ms",
                tally_options_set_max_ahead_of_clock_ms,
            ),
        ];
        let options = new_options();
        for (name, set) in setters {
            assert_eq!(
                set(options, u64::MAX),
                tally_status::TALLY_INVALID_ARGUMENT,
                "{name}"
            );
            assert!(last_error().starts_with(&format!("{name}: ")), "{name}");
            assert_eq!(
                set(std::ptr::null_mut(), 1),
                tally_status::TALLY_NULL_POINTER,
                "{name}"
            );
        }
        assert_eq!(
            take_boxed(options).map(|options| options.engine),
            Some(::tally_engine::EngineOptions::default())
        );
    }
}
