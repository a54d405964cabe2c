//! The options' ranges: what each of `EngineOptions` and `OpenOptions` may be, checked before
//! anything is created (`Engine::new`, `Engine::open`, `Engine::verify`). A value out of range
//! is an `Error::InvalidArgument` naming the option, the value and the range, never a panic, a
//! silent substitute or an engine that can never admit.
//!
//! Each option is checked on its own; no option's range depends on another's, so a C caller
//! can be told at once which setter was wrong (`tally_options_set_*`).

use crate::calendar::MAX_TIMESTAMP_MS;
use crate::engine::EngineOptions;
use crate::error::Error;
use crate::log::{Durability, MAX_FLUSH_INTERVAL_MS};
use crate::policy::MAX_ROLLING_WINDOW_MS;
use crate::recovery::OpenOptions;
use crate::reservation::MAX_LEASE_MS;
use serde::{Deserialize, Serialize};

/// The largest bound a table may be given (`max_keys`, `max_teams`, `max_users`,
/// `idempotency_capacity`, `max_open_reservations`). Every entry lives in memory, a few
/// hundred bytes at least (a key's entry; a request id with its first decision, 390 to 580
/// bytes resident), so 2^32 of them is more than a terabyte: a larger bound would bound
/// nothing.
pub const MAX_TABLE_ENTRIES: u64 = 1 << 32;

/// The longest `idempotency_horizon_ms`: the longest window a policy may have. The horizon is
/// there to cover the policy's windows (0 takes the policy's longest); a longer one only keeps
/// ids that no window needs, until the table is full and refuses every new id.
pub const MAX_IDEMPOTENCY_HORIZON_MS: u64 = MAX_ROLLING_WINDOW_MS;

/// The longest period an option may name (`reclaim_idle_every_ms`, `retention_ms`): the span of
/// timestamps the engine accepts (1970 to 2100). A longer one could never elapse, and any
/// timestamp plus this still fits a `u64` (asserted below), so the sums the engine makes with
/// it cannot overflow.
pub const MAX_PERIOD_MS: u64 = MAX_TIMESTAMP_MS;
const _: () = assert!(MAX_TIMESTAMP_MS.checked_add(MAX_PERIOD_MS).is_some());

/// The default `max_ahead_of_clock_ms`: a day, far more than any clock skew, so a request
/// stamped months ahead (a client's bad clock) is refused rather than move its key's windows
/// (and its log segment's age, which compaction goes by) there for good.
pub const DEFAULT_MAX_AHEAD_OF_CLOCK_MS: u64 = 86_400_000;
const _: () = assert!(DEFAULT_MAX_AHEAD_OF_CLOCK_MS <= MAX_PERIOD_MS);

/// The fewest policy generations kept: the current one and the one it replaced, so a request
/// admitted just before a swap is still refunded exactly (the engine always kept two, whatever
/// it was asked).
pub const MIN_POLICY_GENERATIONS: usize = 2;
/// The most policy generations kept. Each kept generation stays compiled in memory and is
/// written, as its document, into every checkpoint's snapshot (the shipped policy's document
/// is about 10 KB): 65,536 of them is most of a gigabyte per checkpoint.
pub const MAX_POLICY_GENERATIONS: usize = 65_536;

/// The smallest log segment: the log never sealed one at fewer bytes than this (it raised any
/// smaller value to it). Above it no bound is needed: a segment is also sealed at every
/// checkpoint, and it is read through a fixed window, never whole.
pub const MIN_SEGMENT_BYTES: u64 = 256;

const _: () = assert!(MIN_POLICY_GENERATIONS <= MAX_POLICY_GENERATIONS);

/// One option's allowed values: `min..=max`, and 0 too when 0 has a meaning of its own.
struct Range {
    option: &'static str,
    min: u64,
    max: u64,
    /// What 0 means, for an option where 0 is allowed below `min`.
    zero_means: Option<&'static str>,
    unit: &'static str,
}

impl Range {
    fn check(&self, value: u64) -> Result<(), Error> {
        if (self.min..=self.max).contains(&value) || (value == 0 && self.zero_means.is_some()) {
            return Ok(());
        }
        let Range {
            option,
            min,
            max,
            unit,
            ..
        } = self;
        let allowed = match self.zero_means {
            Some(zero_means) => format!("0 ({zero_means}) or {min} to {max}{unit}"),
            None => format!("{min} to {max}{unit}"),
        };
        Err(Error::invalid(
            option,
            format!("{value} is out of range: allowed are {allowed}"),
        ))
    }
}

/// A table's bound: at least one entry (with none, nothing could ever be created or admitted),
/// at most `MAX_TABLE_ENTRIES`.
fn table(option: &'static str) -> Range {
    Range {
        option,
        min: 1,
        max: MAX_TABLE_ENTRIES,
        zero_means: None,
        unit: "",
    }
}

/// A `usize` option as a `u64` (saturating: a value past `u64` is out of every range anyway).
pub(crate) fn wide(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

impl EngineOptions {
    /// Checks every option against its range (see the fields and the constants of this
    /// module); the error names the first option out of range, its value and what is allowed.
    pub fn validate(&self) -> Result<(), Error> {
        table("max_keys").check(self.max_keys)?;
        table("max_teams").check(self.max_teams)?;
        table("max_users").check(self.max_users)?;
        table("idempotency_capacity").check(wide(self.idempotency_capacity))?;
        Range {
            option: "idempotency_horizon_ms",
            min: 1,
            max: MAX_IDEMPOTENCY_HORIZON_MS,
            zero_means: Some("the policy's longest window"),
            unit: " ms",
        }
        .check(self.idempotency_horizon_ms)?;
        table("max_open_reservations").check(wide(self.max_open_reservations))?;
        Range {
            option: "default_lease_ms",
            min: 1,
            max: MAX_LEASE_MS,
            zero_means: None,
            unit: " ms",
        }
        .check(self.default_lease_ms)?;
        Range {
            option: "max_policy_generations",
            min: MIN_POLICY_GENERATIONS as u64,
            max: MAX_POLICY_GENERATIONS as u64,
            zero_means: None,
            unit: "",
        }
        .check(wide(self.max_policy_generations))?;
        Range {
            option: "reclaim_idle_every_ms",
            min: 1,
            max: MAX_PERIOD_MS,
            zero_means: Some("never"),
            unit: " ms",
        }
        .check(self.reclaim_idle_every_ms)?;
        Range {
            option: "max_ahead_of_clock_ms",
            min: 1,
            max: MAX_PERIOD_MS,
            zero_means: Some("no bound"),
            unit: " ms",
        }
        .check(self.max_ahead_of_clock_ms)
    }
}

impl OpenOptions {
    /// Checks every option against its range, the engine's options too (see
    /// `EngineOptions::validate`); the error names the first option out of range.
    pub fn validate(&self) -> Result<(), Error> {
        if let Durability::Interval { ms } = self.durability {
            Range {
                option: "durability",
                min: 1,
                max: MAX_FLUSH_INTERVAL_MS,
                zero_means: None,
                unit: " ms (the interval)",
            }
            .check(ms)?;
        }
        self.engine.validate()?;
        Range {
            option: "checkpoint_every_events",
            min: 1,
            max: u64::MAX,
            zero_means: None,
            unit: "",
        }
        .check(self.checkpoint_every_events)?;
        Range {
            option: "retention_ms",
            min: 0,
            max: MAX_PERIOD_MS,
            zero_means: None,
            unit: " ms",
        }
        .check(self.retention_ms)?;
        Range {
            option: "segment_bytes",
            min: MIN_SEGMENT_BYTES,
            max: u64::MAX,
            zero_means: None,
            unit: "",
        }
        .check(self.segment_bytes)
    }
}

/// What a database records of the options it was opened with (an open with options of its own
/// writes them to the log's metadata once it succeeded; `OpenOptions::use_recorded` reads them
/// back and writes nothing):
/// every option that shapes what the database keeps and how, so a tool opening or verifying it
/// later (the `tally` commands, `verify`) runs it as its gateway does. Not recorded: the
/// durability (each process chooses its own), injected faults, and `segment_bytes` (it only
/// decides where the log's next file starts). Stored as JSON, so an option added later is
/// read as its default from a database that predates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RecordedOptions {
    pub max_keys: u64,
    pub max_teams: u64,
    pub max_users: u64,
    pub idempotency_capacity: u64,
    pub idempotency_horizon_ms: u64,
    pub max_open_reservations: u64,
    pub default_lease_ms: u64,
    pub max_policy_generations: u64,
    pub reclaim_idle_every_ms: u64,
    pub expire_leases_on_its_own: bool,
    pub max_ahead_of_clock_ms: u64,
    pub checkpoint_every_events: u64,
    pub retention_ms: u64,
}

impl Default for RecordedOptions {
    fn default() -> RecordedOptions {
        RecordedOptions::of(&OpenOptions::default())
    }
}

impl RecordedOptions {
    /// What `options` records.
    pub fn of(options: &OpenOptions) -> RecordedOptions {
        let engine = &options.engine;
        RecordedOptions {
            max_keys: engine.max_keys,
            max_teams: engine.max_teams,
            max_users: engine.max_users,
            idempotency_capacity: wide(engine.idempotency_capacity),
            idempotency_horizon_ms: engine.idempotency_horizon_ms,
            max_open_reservations: wide(engine.max_open_reservations),
            default_lease_ms: engine.default_lease_ms,
            max_policy_generations: wide(engine.max_policy_generations),
            reclaim_idle_every_ms: engine.reclaim_idle_every_ms,
            expire_leases_on_its_own: engine.expire_leases_on_its_own,
            max_ahead_of_clock_ms: engine.max_ahead_of_clock_ms,
            checkpoint_every_events: options.checkpoint_every_events,
            retention_ms: options.retention_ms,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self)
            .unwrap_or_else(|error| unreachable!("plain numbers always encode: {error}"))
    }

    /// Reads recorded options; bytes that do not decode, or options out of range, are a
    /// damaged database: `Error::Storage` saying what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<RecordedOptions, Error> {
        let recorded: RecordedOptions =
            serde_json::from_slice(bytes).map_err(|error| Error::Storage {
                problem: format!("the database's recorded options do not decode: {error}"),
            })?;
        let mut options = OpenOptions::default();
        recorded
            .apply_to(&mut options)
            .and_then(|()| options.validate())
            .map_err(|error| Error::Storage {
                problem: format!("the database's recorded options are out of range: {error}"),
            })?;
        Ok(recorded)
    }

    /// Puts the recorded options into `options` (its durability, faults and segment size stay).
    pub fn apply_to(&self, options: &mut OpenOptions) -> Result<(), Error> {
        let narrow = |option: &'static str, value: u64| {
            usize::try_from(value).map_err(|_| {
                Error::invalid(option, format!("{value} does not fit this machine's usize"))
            })
        };
        options.engine = EngineOptions {
            max_keys: self.max_keys,
            max_teams: self.max_teams,
            max_users: self.max_users,
            idempotency_capacity: narrow("idempotency_capacity", self.idempotency_capacity)?,
            idempotency_horizon_ms: self.idempotency_horizon_ms,
            max_open_reservations: narrow("max_open_reservations", self.max_open_reservations)?,
            default_lease_ms: self.default_lease_ms,
            max_policy_generations: narrow("max_policy_generations", self.max_policy_generations)?,
            reclaim_idle_every_ms: self.reclaim_idle_every_ms,
            expire_leases_on_its_own: self.expire_leases_on_its_own,
            max_ahead_of_clock_ms: self.max_ahead_of_clock_ms,
        };
        options.checkpoint_every_events = self.checkpoint_every_events;
        options.retention_ms = self.retention_ms;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(result: Result<(), Error>) -> (&'static str, String) {
        match result {
            Err(Error::InvalidArgument { field, problem }) => (field, problem),
            other => panic!("expected an invalid option, got {other:?}"),
        }
    }

    #[test]
    fn recorded_options_read_back_as_written_and_tolerate_other_builds() {
        let options = OpenOptions {
            engine: EngineOptions {
                max_keys: 5,
                idempotency_horizon_ms: 9,
                expire_leases_on_its_own: false,
                ..EngineOptions::default()
            },
            retention_ms: 7,
            ..OpenOptions::default()
        };
        let recorded = RecordedOptions::of(&options);
        let decoded = RecordedOptions::decode(&recorded.encode()).expect("decodes");
        assert_eq!(decoded, recorded);
        let mut applied = OpenOptions {
            durability: Durability::None,
            segment_bytes: 4096,
            ..OpenOptions::default()
        };
        decoded.apply_to(&mut applied).expect("fits");
        assert_eq!(applied.engine, options.engine);
        assert_eq!(applied.retention_ms, 7);
        assert_eq!(
            applied.checkpoint_every_events,
            options.checkpoint_every_events
        );
        assert_eq!(
            (applied.durability, applied.segment_bytes),
            (Durability::None, 4096),
            "not recorded: the caller's own"
        );
        // An older build's record lacks a field (its default is read); a newer one's has a
        // field this build does not know (ignored).
        let older = RecordedOptions::decode(br#"{"max_keys": 5}"#).expect("decodes");
        assert_eq!(
            older,
            RecordedOptions {
                max_keys: 5,
                ..RecordedOptions::default()
            }
        );
        let newer = RecordedOptions::decode(br#"{"max_keys": 5, "from_the_future": 1}"#);
        assert_eq!(newer.expect("decodes"), older);
    }

    #[test]
    fn the_default_options_are_valid() {
        assert_eq!(EngineOptions::default().validate(), Ok(()));
        assert_eq!(OpenOptions::default().validate(), Ok(()));
    }

    #[test]
    fn a_range_accepts_its_ends_and_refuses_one_past_them() {
        let range = Range {
            option: "x",
            min: 3,
            max: 7,
            zero_means: None,
            unit: " ms",
        };
        assert_eq!(range.check(3), Ok(()));
        assert_eq!(range.check(7), Ok(()));
        assert_eq!(
            problem(range.check(2)),
            ("x", "2 is out of range: allowed are 3 to 7 ms".to_string())
        );
        assert!(range.check(8).is_err());
        assert!(range.check(0).is_err());
    }

    #[test]
    fn a_range_with_a_meaning_for_zero_accepts_zero_and_says_what_it_means() {
        let range = Range {
            option: "x",
            min: 3,
            max: 7,
            zero_means: Some("never"),
            unit: "",
        };
        assert_eq!(range.check(0), Ok(()));
        assert_eq!(
            problem(range.check(1)),
            (
                "x",
                "1 is out of range: allowed are 0 (never) or 3 to 7".to_string()
            )
        );
    }

    #[test]
    fn a_usize_past_u64_is_out_of_every_range() {
        assert_eq!(wide(5), 5);
        assert!(table("x").check(wide(usize::MAX)).is_err());
    }

    #[test]
    fn the_first_option_out_of_range_is_the_one_named() {
        let options = EngineOptions {
            max_teams: 0,
            default_lease_ms: 0,
            ..EngineOptions::default()
        };
        assert_eq!(problem(options.validate()).0, "max_teams");
    }

    #[test]
    fn the_engine_options_inside_the_open_options_are_checked_too() {
        let options = OpenOptions {
            engine: EngineOptions {
                max_users: 0,
                ..EngineOptions::default()
            },
            ..OpenOptions::default()
        };
        assert_eq!(problem(options.validate()).0, "max_users");
    }
}
