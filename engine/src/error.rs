//! Errors: bad input, operations that can never succeed, and a database that could not be read
//! or written.
//!
//! Following governor's two result layers, an expected outcome such as a denial with its retry
//! time is a `Decision`, not an error. An `Error` means the call itself was wrong (unknown
//! resource, zero quantity, a request id reused for something else, ...) or the event log failed
//! (`Storage`), and changed nothing.

use std::fmt;

use crate::policy::PolicyError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A field of a call was malformed: `field` names it, `problem` says what was wrong.
    InvalidArgument {
        field: &'static str,
        problem: String,
    },
    UnknownResource {
        resource: String,
    },
    UnknownPlan {
        plan: String,
    },
    UnknownTeam {
        team: String,
    },
    UnknownUser {
        user: String,
    },
    /// An unknown key named by a call that is not an admission (`revoke_key`, `usage`,
    /// `adjust_usage`): the admission path reports unknown keys as a denial instead. (A
    /// pay-as-you-go key where a plan's is needed, a correction's, is `InvalidArgument`.)
    UnknownKey {
        key: String,
    },
    UnknownReservation {
        reservation: u64,
    },
    /// A refund named a request id that is not remembered: no request used it, or it is past
    /// the idempotency horizon (`horizon_ms`, as set now) by the engine's clock, and so
    /// forgotten, whether the table had dropped it yet or not.
    UnknownRequest {
        request_id: String,
        horizon_ms: u64,
    },
    AlreadyExists {
        what: &'static str,
        id: String,
    },
    NotAMember {
        team: String,
        user: String,
    },
    /// The same request id came back with a different key, resource or quantities (answered
    /// by a consume once the first decision's event is durable: if the log loses it, the
    /// log's error instead).
    RequestIdConflict {
        request_id: String,
    },
    /// A bounded table is full; nothing was changed.
    CapacityExceeded {
        what: &'static str,
        capacity: u64,
    },
    /// Adding to a balance or counter would take it past the most it can hold (`field` says
    /// which, and the bound where it is not a `u64`'s).
    Overflow {
        field: &'static str,
    },
    /// A reservation can no longer be settled or voided.
    ReservationClosed {
        reservation: u64,
        state: &'static str,
    },
    /// A credits correction asked to take more than the team holds.
    InsufficientCredits {
        team: String,
        balance_micros: u64,
        needed_micros: u64,
    },
    Policy(PolicyError),
    /// The event log could not be read or written; the call changed nothing.
    Storage {
        problem: String,
    },
}

impl Error {
    pub(crate) fn invalid(field: &'static str, problem: impl Into<String>) -> Error {
        Error::InvalidArgument {
            field,
            problem: problem.into(),
        }
    }

    /// This error with its field `from` named `to`: a call whose argument has another name
    /// than the field the shared check names (a settle's `actual` quantities).
    pub(crate) fn naming(self, from: &'static str, to: &'static str) -> Error {
        match self {
            Error::InvalidArgument { field, problem } if field == from => {
                Error::InvalidArgument { field: to, problem }
            }
            Error::Overflow { field } if field == from => Error::Overflow { field: to },
            other => other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { field, problem } => write!(f, "{field}: {problem}"),
            Error::UnknownResource { resource } => write!(f, "resource: unknown resource {resource:?}"),
            Error::UnknownPlan { plan } => write!(f, "plan: unknown plan {plan:?}"),
            Error::UnknownTeam { team } => write!(f, "team: unknown team {team:?}"),
            Error::UnknownUser { user } => write!(f, "user: unknown user {user:?}"),
            Error::UnknownKey { key } => write!(f, "key: unknown key {key:?}"),
            Error::UnknownReservation { reservation } => {
                write!(f, "reservation: unknown reservation {reservation} (never opened, or closed and since forgotten)")
            }
            Error::UnknownRequest {
                request_id,
                horizon_ms,
            } => write!(
                f,
                "request_id: no request {request_id:?} is remembered: none used it, or it was \
                 stamped more than the idempotency horizon ({horizon_ms} ms) before the engine's \
                 clock, and is forgotten"
            ),
            Error::AlreadyExists { what, id } => write!(f, "{what}: {id:?} already exists"),
            Error::NotAMember { team, user } => write!(f, "user: {user:?} is not a member of team {team:?}"),
            Error::RequestIdConflict { request_id } => write!(
                f,
                "request_id: {request_id:?} was already used for a different key, resource or quantities"
            ),
            Error::CapacityExceeded { what, capacity } => {
                write!(f, "{what}: the bound of {capacity} is reached; nothing was changed")
            }
            Error::Overflow { field } => write!(f, "{field}: the result would be past the most it can hold"),
            Error::ReservationClosed { reservation, state } => {
                write!(f, "reservation: reservation {reservation} is already {state}")
            }
            Error::InsufficientCredits {
                team,
                balance_micros,
                needed_micros,
            } => write!(
                f,
                "micros: team {team:?} holds {balance_micros} micro-credits, {needed_micros} needed"
            ),
            Error::Policy(error) => write!(f, "policy: {error}"),
            Error::Storage { problem } => write!(f, "storage: {problem}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<PolicyError> for Error {
    fn from(error: PolicyError) -> Error {
        Error::Policy(error)
    }
}
