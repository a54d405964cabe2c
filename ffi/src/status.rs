//! `tally_status`: the one result type of every fallible function, and how engine errors map
//! onto it.

use std::ffi::c_char;

use ::tally_engine::Error;

use crate::panic::boundary_or;

/// What a call did. `TALLY_OK` (0) is success; every other value says why the call failed and
/// changed nothing (except where a function's documentation says otherwise), and
/// `tally_last_error` gives the detail for the calling thread.
///
/// Codes are stable: a code is never reused or renumbered. A retired code stays here as a
/// comment, and new codes are added at the end.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tally_status {
    TALLY_OK = 0,
    /// A required pointer was NULL (or an optional one was NULL with a non-zero length).
    TALLY_NULL_POINTER = 1,
    /// A string argument was not valid UTF-8.
    TALLY_INVALID_UTF8 = 2,
    /// A string argument that must not be empty was empty.
    TALLY_EMPTY_STRING = 3,
    /// A string argument was longer than its bound (`TALLY_MAX_ID_BYTES`, ...).
    TALLY_STRING_TOO_LONG = 4,
    /// A string argument contained a NUL byte.
    TALLY_NUL_IN_STRING = 5,
    /// Another argument was malformed; the last error names the field and says why.
    TALLY_INVALID_ARGUMENT = 6,
    /// A `uint32_t` that carries an enum (unit, durability, policy kind) was out of range.
    TALLY_BAD_ENUM = 7,
    /// A quantity was 0 or above `TALLY_MAX_QUANTITY`, a unit was given twice, there were none
    /// or too many; or the quantities do not fit the resource (a unit it does not meter, or
    /// one it requires missing) or, for a usage correction, no limit of the key's plan counts
    /// any of their units. The last error says which.
    TALLY_BAD_QUANTITY = 8,
    /// An amount, balance, count or weighted sum would pass the most it can hold: 64 bits, or
    /// a smaller bound the last error names (a team's credits and charges together 2^63 - 1, a
    /// window's count under a usage correction); nothing changed.
    TALLY_OVERFLOW = 9,
    /// A timestamp is at or after 2100-01-01T00:00:00Z, or further ahead of the engine's clock
    /// than `max_ahead_of_clock_ms` allows; or a request with a request id is stamped longer
    /// ago than the idempotency horizon (its id could not be remembered), unless its key is
    /// unknown or revoked: that denial, never remembered, is answered instead.
    TALLY_BAD_TIMESTAMP = 10,
    /// An output buffer was NULL or too small; `*needed` holds the size to pass next time.
    TALLY_BUFFER_TOO_SMALL = 11,
    /// The engine handle was closed (`tally_engine_close`): use after close, or a second close.
    TALLY_CLOSED = 12,
    /// An earlier call on this handle panicked; only close and free are allowed now.
    TALLY_POISONED = 13,
    /// This call panicked inside the library (a bug). If it panicked inside an engine's call,
    /// that handle is now poisoned (`TALLY_POISONED`); a panic elsewhere (checking arguments,
    /// options) leaves it as it was.
    TALLY_PANIC = 14,
    /// An admin call named a key that does not exist (consume and check answer an unknown key
    /// with a denial, `TALLY_DENIAL_UNKNOWN_KEY`, not with this status).
    TALLY_UNKNOWN_KEY = 15,
    TALLY_UNKNOWN_TEAM = 16,
    TALLY_UNKNOWN_USER = 17,
    TALLY_UNKNOWN_RESOURCE = 18,
    TALLY_UNKNOWN_PLAN = 19,
    TALLY_UNKNOWN_RESERVATION = 20,
    /// `tally_engine_refund` named a request id no request used (within the horizon); one whose
    /// request was denied is `TALLY_INVALID_ARGUMENT`.
    TALLY_UNKNOWN_REQUEST = 21,
    /// The user, team, key or membership already exists.
    TALLY_ALREADY_EXISTS = 22,
    TALLY_NOT_A_MEMBER = 23,
    /// The request id was used before with a different key, resource or quantities.
    TALLY_REQUEST_ID_CONFLICT = 24,
    /// A bounded table (keys, users, teams, request ids, reservations, export cursors) is full.
    TALLY_CAPACITY_EXCEEDED = 25,
    /// The reservation is already settled or voided: a settle with other amounts than its
    /// settlement's, a settle after a void, or a void after a settle. One whose lease ended
    /// is `TALLY_RESERVATION_EXPIRED` instead.
    TALLY_RESERVATION_CLOSED = 26,
    /// A credits withdrawal asked for more than the team holds.
    TALLY_INSUFFICIENT_CREDITS = 27,
    /// The policy document is invalid, or a swap could not carry its usage over as it means
    /// (the last error names the field). A swap that would drop a plan someone is seated on is
    /// `TALLY_INVALID_ARGUMENT`.
    TALLY_POLICY_INVALID = 28,
    /// The database could not be read or written.
    TALLY_STORAGE = 29,
    /// An earlier write or flush of the event log failed: the log refuses every change until
    /// the engine is closed and opened again. Reads (usage, credits) still work.
    TALLY_LOG_FAILED = 30,
    /// The database is open in another engine (this process or another one).
    TALLY_DATABASE_LOCKED = 31,
    /// The database cannot be read: damaged files or records.
    TALLY_DATABASE_DAMAGED = 32,
    /// The directory holds files that are not a tally database (or is not a directory).
    TALLY_DATABASE_FOREIGN = 33,
    /// The database was written by a newer tally in a format this build cannot read.
    TALLY_DATABASE_NEWER_FORMAT = 34,
    /// The call needs an event log, and the engine is in memory (`tally_engine_open_in_memory`).
    TALLY_NOT_DURABLE = 35,
    /// The reservation's lease ended before it was settled: the engine expired it (or this
    /// settle did, stamped when the lease had ended) and gave back everything it held, so
    /// nothing is charged for it. Usage that really happened can be counted with
    /// `tally_engine_adjust_usage` (add) at the reservation's time. Voiding an expired
    /// reservation is a no-op (`TALLY_OK`). A kind of `TALLY_RESERVATION_CLOSED` (which
    /// libraries before this code answered for it too): code that only asks whether the
    /// reservation is closed should accept both.
    TALLY_RESERVATION_EXPIRED = 36,
}

use tally_status::*;

/// Every status, in code order (for tests and `tally_status_name`).
pub(crate) const ALL_STATUSES: [tally_status; 37] = [
    TALLY_OK,
    TALLY_NULL_POINTER,
    TALLY_INVALID_UTF8,
    TALLY_EMPTY_STRING,
    TALLY_STRING_TOO_LONG,
    TALLY_NUL_IN_STRING,
    TALLY_INVALID_ARGUMENT,
    TALLY_BAD_ENUM,
    TALLY_BAD_QUANTITY,
    TALLY_OVERFLOW,
    TALLY_BAD_TIMESTAMP,
    TALLY_BUFFER_TOO_SMALL,
    TALLY_CLOSED,
    TALLY_POISONED,
    TALLY_PANIC,
    TALLY_UNKNOWN_KEY,
    TALLY_UNKNOWN_TEAM,
    TALLY_UNKNOWN_USER,
    TALLY_UNKNOWN_RESOURCE,
    TALLY_UNKNOWN_PLAN,
    TALLY_UNKNOWN_RESERVATION,
    TALLY_UNKNOWN_REQUEST,
    TALLY_ALREADY_EXISTS,
    TALLY_NOT_A_MEMBER,
    TALLY_REQUEST_ID_CONFLICT,
    TALLY_CAPACITY_EXCEEDED,
    TALLY_RESERVATION_CLOSED,
    TALLY_INSUFFICIENT_CREDITS,
    TALLY_POLICY_INVALID,
    TALLY_STORAGE,
    TALLY_LOG_FAILED,
    TALLY_DATABASE_LOCKED,
    TALLY_DATABASE_DAMAGED,
    TALLY_DATABASE_FOREIGN,
    TALLY_DATABASE_NEWER_FORMAT,
    TALLY_NOT_DURABLE,
    TALLY_RESERVATION_EXPIRED,
];

impl tally_status {
    /// The status's name as in the header, NUL-terminated.
    pub(crate) fn name_with_nul(self) -> &'static str {
        match self {
            TALLY_OK => "TALLY_OK\0",
            TALLY_NULL_POINTER => "TALLY_NULL_POINTER\0",
            TALLY_INVALID_UTF8 => "TALLY_INVALID_UTF8\0",
            TALLY_EMPTY_STRING => "TALLY_EMPTY_STRING\0",
            TALLY_STRING_TOO_LONG => "TALLY_STRING_TOO_LONG\0",
            TALLY_NUL_IN_STRING => "TALLY_NUL_IN_STRING\0",
            TALLY_INVALID_ARGUMENT => "TALLY_INVALID_ARGUMENT\0",
            TALLY_BAD_ENUM => "TALLY_BAD_ENUM\0",
            TALLY_BAD_QUANTITY => "TALLY_BAD_QUANTITY\0",
            TALLY_OVERFLOW => "TALLY_OVERFLOW\0",
            TALLY_BAD_TIMESTAMP => "TALLY_BAD_TIMESTAMP\0",
            TALLY_BUFFER_TOO_SMALL => "TALLY_BUFFER_TOO_SMALL\0",
            TALLY_CLOSED => "TALLY_CLOSED\0",
            TALLY_POISONED => "TALLY_POISONED\0",
            TALLY_PANIC => "TALLY_PANIC\0",
            TALLY_UNKNOWN_KEY => "TALLY_UNKNOWN_KEY\0",
            TALLY_UNKNOWN_TEAM => "TALLY_UNKNOWN_TEAM\0",
            TALLY_UNKNOWN_USER => "TALLY_UNKNOWN_USER\0",
            TALLY_UNKNOWN_RESOURCE => "TALLY_UNKNOWN_RESOURCE\0",
            TALLY_UNKNOWN_PLAN => "TALLY_UNKNOWN_PLAN\0",
            TALLY_UNKNOWN_RESERVATION => "TALLY_UNKNOWN_RESERVATION\0",
            TALLY_UNKNOWN_REQUEST => "TALLY_UNKNOWN_REQUEST\0",
            TALLY_ALREADY_EXISTS => "TALLY_ALREADY_EXISTS\0",
            TALLY_NOT_A_MEMBER => "TALLY_NOT_A_MEMBER\0",
            TALLY_REQUEST_ID_CONFLICT => "TALLY_REQUEST_ID_CONFLICT\0",
            TALLY_CAPACITY_EXCEEDED => "TALLY_CAPACITY_EXCEEDED\0",
            TALLY_RESERVATION_CLOSED => "TALLY_RESERVATION_CLOSED\0",
            TALLY_INSUFFICIENT_CREDITS => "TALLY_INSUFFICIENT_CREDITS\0",
            TALLY_POLICY_INVALID => "TALLY_POLICY_INVALID\0",
            TALLY_STORAGE => "TALLY_STORAGE\0",
            TALLY_LOG_FAILED => "TALLY_LOG_FAILED\0",
            TALLY_DATABASE_LOCKED => "TALLY_DATABASE_LOCKED\0",
            TALLY_DATABASE_DAMAGED => "TALLY_DATABASE_DAMAGED\0",
            TALLY_DATABASE_FOREIGN => "TALLY_DATABASE_FOREIGN\0",
            TALLY_DATABASE_NEWER_FORMAT => "TALLY_DATABASE_NEWER_FORMAT\0",
            TALLY_NOT_DURABLE => "TALLY_NOT_DURABLE\0",
            TALLY_RESERVATION_EXPIRED => "TALLY_RESERVATION_EXPIRED\0",
        }
    }
}

const UNKNOWN_STATUS: &str = "TALLY_UNKNOWN_STATUS\0";

/// The name of a status as spelled in this header (`"TALLY_BUFFER_TOO_SMALL"`), or
/// `"TALLY_UNKNOWN_STATUS"` for a value that is not a status. The string is static: never free
/// it. Takes a `uint32_t` so any value can be named safely. Never fails.
#[no_mangle]
pub extern "C" fn tally_status_name(status: u32) -> *const c_char {
    boundary_or(UNKNOWN_STATUS.as_ptr().cast(), || {
        let name = usize::try_from(status)
            .ok()
            .and_then(|index| ALL_STATUSES.get(index))
            .map_or(UNKNOWN_STATUS, |status| status.name_with_nul());
        name.as_ptr().cast()
    })
}

/// A failed call: the status to return and the message for `tally_last_error`.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub status: tally_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: tally_status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl Failure {
    /// An engine error whose invalid (or overflowing) argument the engine calls `engine_field`
    /// where the C function's argument is `argument` (the engine's `quantities` are
    /// `tally_engine_settle`'s `actual`): the status is the engine field's, the message names
    /// the C argument.
    pub fn naming(error: Error, engine_field: &str, argument: &str) -> Failure {
        let names_field = match &error {
            Error::InvalidArgument { field, .. } | Error::Overflow { field } => {
                *field == engine_field
            }
            _ => false,
        };
        // Both messages are `field: problem` (the engine's `Display`): the problem is kept.
        let message = error.to_string();
        let problem = message
            .strip_prefix(engine_field)
            .and_then(|rest| rest.strip_prefix(": "));
        match problem {
            Some(problem) if names_field => {
                Failure::new(status_of(&error), format!("{argument}: {problem}"))
            }
            _ => Failure::new(status_of(&error), message),
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure::new(status_of(&error), error.to_string())
    }
}

/// The status an engine error maps to.
pub(crate) fn status_of(error: &Error) -> tally_status {
    match error {
        Error::InvalidArgument { field, problem } => match *field {
            "at_ms" => TALLY_BAD_TIMESTAMP,
            // Past the end of the time range; usage "after now" is a plain invalid argument.
            "usage_at_ms" if problem.contains("time range") => TALLY_BAD_TIMESTAMP,
            "quantities" | "actual" => TALLY_BAD_QUANTITY,
            "engine" if problem.contains("in-memory") => TALLY_NOT_DURABLE,
            _ => TALLY_INVALID_ARGUMENT,
        },
        Error::UnknownResource { .. } => TALLY_UNKNOWN_RESOURCE,
        Error::UnknownPlan { .. } => TALLY_UNKNOWN_PLAN,
        Error::UnknownTeam { .. } => TALLY_UNKNOWN_TEAM,
        Error::UnknownUser { .. } => TALLY_UNKNOWN_USER,
        Error::UnknownKey { .. } => TALLY_UNKNOWN_KEY,
        Error::UnknownReservation { .. } => TALLY_UNKNOWN_RESERVATION,
        Error::UnknownRequest { .. } => TALLY_UNKNOWN_REQUEST,
        Error::AlreadyExists { .. } => TALLY_ALREADY_EXISTS,
        Error::NotAMember { .. } => TALLY_NOT_A_MEMBER,
        Error::RequestIdConflict { .. } => TALLY_REQUEST_ID_CONFLICT,
        Error::CapacityExceeded { .. } => TALLY_CAPACITY_EXCEEDED,
        Error::Overflow { .. } => TALLY_OVERFLOW,
        // The engine names the state it found; only an ended lease gets a status of its own.
        // The boundary test `a_reservation_whose_lease_ended_is_expired_...` settles a
        // reservation in each state, so a renamed state fails there, not silently here.
        Error::ReservationClosed { state, .. } if *state == "expired" => TALLY_RESERVATION_EXPIRED,
        Error::ReservationClosed { .. } => TALLY_RESERVATION_CLOSED,
        Error::InsufficientCredits { .. } => TALLY_INSUFFICIENT_CREDITS,
        Error::Policy(_) => TALLY_POLICY_INVALID,
        Error::Storage { problem } => storage_status(problem),
    }
}

/// The engine reports every storage problem as `Error::Storage` with a message; these are the
/// phrases its log and recovery use for the cases a caller handles differently. A test opens a
/// locked, damaged, foreign and newer-format database for each, so a reworded message fails
/// there rather than silently becoming `TALLY_STORAGE`.
fn storage_status(problem: &str) -> tally_status {
    const PHRASES: [(&str, tally_status); 10] = [
        ("the log failed at event", TALLY_LOG_FAILED),
        ("is locked by another process", TALLY_DATABASE_LOCKED),
        ("this build reads up to", TALLY_DATABASE_NEWER_FORMAT),
        ("not a tally database", TALLY_DATABASE_FOREIGN),
        ("is not a directory", TALLY_DATABASE_FOREIGN),
        ("damaged", TALLY_DATABASE_DAMAGED),
        ("cannot read its version", TALLY_DATABASE_DAMAGED),
        ("but this build reads version", TALLY_DATABASE_DAMAGED),
        ("does not carry sequence number", TALLY_DATABASE_DAMAGED),
        ("is not an 8-byte sequence number", TALLY_DATABASE_DAMAGED),
    ];
    PHRASES
        .iter()
        .find(|(phrase, _)| problem.contains(phrase))
        .map_or(TALLY_STORAGE, |(_, status)| *status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn every_status_is_listed_at_its_own_code_and_named_as_in_the_header() {
        for (code, status) in ALL_STATUSES.iter().enumerate() {
            assert_eq!(*status as usize, code);
            // SAFETY: tally_status_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(tally_status_name(code as u32)) };
            assert_eq!(name.to_str().ok(), Some(format!("{status:?}").as_str()));
        }
    }

    #[test]
    fn a_closed_reservation_is_expired_only_when_its_lease_ended() {
        let closed = |state| Error::ReservationClosed {
            reservation: 7,
            state,
        };
        assert_eq!(status_of(&closed("expired")), TALLY_RESERVATION_EXPIRED);
        assert_eq!(status_of(&closed("settled")), TALLY_RESERVATION_CLOSED);
        assert_eq!(status_of(&closed("voided")), TALLY_RESERVATION_CLOSED);
    }

    #[test]
    fn an_unknown_status_value_has_a_name_too() {
        for value in [ALL_STATUSES.len() as u32, 999, u32::MAX] {
            // SAFETY: as above.
            let name = unsafe { CStr::from_ptr(tally_status_name(value)) };
            assert_eq!(name.to_str(), Ok("TALLY_UNKNOWN_STATUS"));
        }
    }
}
