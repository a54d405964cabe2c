//! tally's engine: the quota model of an AI provider's subscription plans (plans, keys, teams,
//! seats, credits) and lock-free admission on rolling and calendar windows.
//!
//! ```
//! use std::sync::Arc;
//! use tally_engine::{Engine, EngineOptions, ManualClock, Policy, Unit, UsageRequest};
//!
//! let clock = Arc::new(ManualClock::new(1_790_000_000_000));
//! let engine = Engine::new(Policy::token_plan(), clock, EngineOptions::default()).unwrap();
//! engine.create_user("ada", "tp-ada", None).unwrap();
//! engine.assign_seat("@ada", "ada", "Starter", None).unwrap();
//! let decision = engine
//!     .consume(&UsageRequest::new("tp-ada", "m2.7", &[(Unit::Requests, 1)]))
//!     .unwrap();
//! assert!(decision.is_admitted());
//! ```
//!
//! Modules, one concept each: `clock` (where now comes from), `calendar` (local days, weeks
//! and months of a time zone), `policy` (the plan document and its compiled form), `window`
//! (the lock-free sliding buckets and calendar counters), `ledger` (per-key counters and team
//! credits), `accounts` (users, teams, seats, keys), `lock` (the read-mostly lock of a key
//! shard), `admission` (the decision), `idempotency` (request ids), `reservation` (reserve,
//! settle, void), `adjustment` (refunds and corrections), `submission` (consumes decided now
//! and acknowledged once durable), `pages` (huge-page memory for key tables and usage),
//! `error` (what a call can fail with), `options` (the options' ranges), `event` (the event
//! format), `log` (the event log's segment files), `recovery` (opening a database, checkpoints,
//! verify), `engine` (the handle tying them together).

pub mod accounts;
pub mod adjustment;
pub mod admission;
pub mod calendar;
pub mod clock;
pub mod engine;
pub mod error;
pub mod event;
pub mod idempotency;
pub mod ledger;
pub mod lock;
pub mod log;
pub mod options;
pub mod pages;
pub mod policy;
pub mod recovery;
pub mod reservation;
pub mod submission;
pub mod window;

pub use accounts::KeyKind;
pub use adjustment::{AdjustedLimit, AdjustmentOutcome, Refund};
pub use admission::{
    Admission, ChargedTo, Decision, Denial, DenialReason, LimitStatus, LimitStatuses, Quantities,
    Remedies, GONE_LIMIT, GONE_PLAN, GONE_RESOURCE,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{
    AdjustmentDirection, Engine, EngineOptions, LimitReport, MemoryStats, ReserveOutcome,
    SettleOutcome, UsageReport, UsageRequest, MAX_CREDITS_MICROS,
};
pub use error::Error;
pub use event::{Event, EventBody};
pub use log::{Durability, Faults};
pub use options::RecordedOptions;
pub use policy::{PlanId, Policy, PolicyDocument, PolicyError, ResourceId, Unit, Window};
pub use recovery::{CompactReport, Health, OpenOptions, OpenReport, VerifyReport};
pub use reservation::{ReservationId, Settlement};
pub use submission::{Submission, Submitted};

/// A policy's document as JSON: the form the event log stores.
pub fn policy_json(policy: &Policy) -> String {
    serde_json::to_string(policy.document()).unwrap_or_default()
}
