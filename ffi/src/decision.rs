//! Admission at the C boundary: the request, the decision struct and the enums they carry
//! (units, where a request was charged, why it was denied). Building a request borrows the
//! caller's memory and converting a decision copies into the caller's struct: the hot path
//! allocates nothing and parses nothing.

use std::ffi::c_char;

use ::tally_engine::{ChargedTo, Decision, DenialReason, LimitStatus, Policy, Unit, GONE_LIMIT};

use crate::checks::{
    copy_name, optional_slice, optional_text, reference, text, TALLY_MAX_ID_BYTES,
};
use crate::status::{tally_status, Failure};

/// Pass as any `at_ms` to use the engine's clock (the system's UTC time) instead of an
/// explicit timestamp. Explicit timestamps are milliseconds since 1970-01-01T00:00:00Z and
/// must be before 2100-01-01T00:00:00Z (`TALLY_BAD_TIMESTAMP`).
pub const TALLY_NOW: u64 = 0;
/// The capacity of the name arrays in `tally_decision`, including the NUL.
pub const TALLY_NAME_CAPACITY: usize = 128;
/// How many limits a decision reports at most (the limits of the plan that count the
/// resource).
pub const TALLY_MAX_DECISION_LIMITS: usize = 4;
/// The most quantities one request carries: one per unit.
pub const TALLY_MAX_QUANTITIES: usize = 7;
/// The largest amount of one quantity (`tally_quantity.amount`), 2^40; more is
/// `TALLY_BAD_QUANTITY`. Not to be confused with `TALLY_MAX_QUANTITIES`, how many a request
/// carries.
pub const TALLY_MAX_QUANTITY: u64 = 1_099_511_627_776;
/// `limit_index` when there is none.
pub const TALLY_NO_INDEX: u32 = u32::MAX;

const _: () = assert!(TALLY_MAX_DECISION_LIMITS == ::tally_engine::policy::MAX_LIMITS_PER_RESOURCE);
const _: () = assert!(TALLY_MAX_QUANTITIES == ::tally_engine::policy::UNIT_COUNT);
const _: () = assert!(TALLY_MAX_QUANTITY == ::tally_engine::policy::MAX_QUANTITY);
const _: () = assert!(TALLY_MAX_QUANTITY == 1 << 40);
// Every name a decision (or an adjustment) carries fits whole with its NUL: a plan's (at most
// `TALLY_MAX_NAME_BYTES`) and a limit's (`"{meter} per {window}"`, at most
// `MAX_LIMIT_NAME_BYTES`); `copy_name` would otherwise cut it silently.
const _: () = assert!(TALLY_NAME_CAPACITY > crate::checks::TALLY_MAX_NAME_BYTES);
const _: () = assert!(TALLY_NAME_CAPACITY > ::tally_engine::policy::MAX_LIMIT_NAME_BYTES);

/// What a quantity counts. Passed as `uint32_t` (`tally_quantity.unit`) and checked: any other
/// value is `TALLY_BAD_ENUM`.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tally_unit {
    TALLY_UNIT_REQUESTS = 0,
    TALLY_UNIT_CHARACTERS = 1,
    TALLY_UNIT_IMAGES = 2,
    TALLY_UNIT_VIDEOS = 3,
    TALLY_UNIT_SONGS = 4,
    TALLY_UNIT_SECONDS = 5,
    TALLY_UNIT_TOKENS = 6,
}

const _: () = assert!(tally_unit::TALLY_UNIT_TOKENS as usize + 1 == TALLY_MAX_QUANTITIES);

/// Where an admitted request was charged (`tally_decision.charged_to`).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tally_charged_to {
    /// Denied: charged nowhere.
    TALLY_CHARGED_TO_NONE = 0,
    /// Within the plan's quota.
    TALLY_CHARGED_TO_PLAN_QUOTA = 1,
    /// The plan could not take it; the team's credits paid `charged_micros`.
    TALLY_CHARGED_TO_CREDITS = 2,
    /// A pay-as-you-go key; `charged_micros` recorded for billing.
    TALLY_CHARGED_TO_PAY_AS_YOU_GO = 3,
}

/// Why a request was denied (`tally_decision.denial`). Codes are stable and never reused.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tally_denial {
    /// Admitted.
    TALLY_DENIAL_NONE = 0,
    /// No such key.
    TALLY_DENIAL_UNKNOWN_KEY = 1,
    /// The key has no seat and its team no credits.
    TALLY_DENIAL_NO_RESOURCES = 2,
    /// The key's plan does not cover the resource and credits cannot pay for it.
    TALLY_DENIAL_RESOURCE_NOT_COVERED = 3,
    /// A quantity is above the per-request maximum: `unit`, `requested`, `maximum`.
    TALLY_DENIAL_OVER_REQUEST_MAXIMUM = 4,
    /// The limit `limit_index` is used up; retry after `retry_after_ms` (at `retry_at_ms`).
    TALLY_DENIAL_QUOTA_EXHAUSTED = 5,
    /// The request is larger than the limit itself: waiting cannot help (`requested`,
    /// `maximum` = the limit's amount).
    TALLY_DENIAL_EXCEEDS_LIMIT = 6,
    /// The plan could not take it and the team's credits are short: `requested` = the price
    /// in micro-credits, `credits_balance_micros` the balance.
    TALLY_DENIAL_INSUFFICIENT_CREDITS = 7,
    /// The key holds as many open reservations as its plan allows (`requested` = open,
    /// `maximum`).
    TALLY_DENIAL_TOO_MANY_RESERVATIONS = 8,
    /// The key was revoked (`tally_engine_revoke_key`): nothing can let it through.
    TALLY_DENIAL_KEY_REVOKED = 9,
}

/// One quantity of a request: `unit` is a `tally_unit` value, `amount` 1..=`TALLY_MAX_QUANTITY`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct tally_quantity {
    pub unit: u32,
    pub amount: u64,
}

/// A usage request. Strings are (pointer, length) pairs of UTF-8 without NUL bytes; the
/// library reads them during the call only and never keeps or frees them.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct tally_request {
    /// The API key (1..=`TALLY_MAX_ID_BYTES` bytes).
    pub key: *const c_char,
    pub key_len: usize,
    /// The resource's name in the policy (for example `"m2.7"`).
    pub resource: *const c_char,
    pub resource_len: usize,
    /// 1..=`TALLY_MAX_QUANTITIES` quantities, no unit twice.
    pub quantities: *const tally_quantity,
    pub quantities_len: usize,
    /// Milliseconds since the Unix epoch, or `TALLY_NOW`.
    pub at_ms: u64,
    /// Optional idempotency id: NULL with length 0 for none. A repeat within the horizon
    /// answers with the first decision (`replayed`) and counts nothing; a repeat with another
    /// key, resource or quantities is `TALLY_REQUEST_ID_CONFLICT`. A denial for want of a
    /// valid key (`TALLY_DENIAL_UNKNOWN_KEY`, `TALLY_DENIAL_KEY_REVOKED`) is not remembered:
    /// the id is decided anew when it comes again, and such a request is denied so whatever
    /// its stamp or the request-id table's room (no `TALLY_BAD_TIMESTAMP` for an id stamped
    /// before the horizon, no `TALLY_CAPACITY_EXCEEDED` for a full table).
    pub request_id: *const c_char,
    pub request_id_len: usize,
}

/// One limit as a decision saw it.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct tally_limit_status {
    /// Index into the plan's limits (name it with `tally_decision.limit_name` or the usage
    /// report).
    pub limit_index: u32,
    pub used: u64,
    pub amount: u64,
    pub remaining: u64,
    /// When what is counted now will have aged out (rolling) or the period ends (calendar);
    /// 0 when nothing is counted in a rolling window.
    pub reset_at_ms: u64,
}

/// A decision, written by consume, check, reserve and settle. Plain data: copy it freely.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct tally_decision {
    /// Whether the request was admitted (whole).
    pub admitted: bool,
    /// The answer is the stored first decision of an earlier request with the same id, and
    /// nothing was counted now. Decided with the decision, under the id's lock: of threads
    /// using a new id at the same moment, exactly one is told false.
    pub replayed: bool,
    /// Whether `credits_balance_micros` holds the team's balance (credits were involved).
    pub has_credits_balance: bool,
    /// A `tally_charged_to` value.
    pub charged_to: u32,
    /// A `tally_denial` value; `TALLY_DENIAL_NONE` when admitted.
    pub denial: u32,
    /// The limit that denied (quota exhausted, exceeds limit) or, when admitted from quota, the
    /// tightest one (least remaining); `TALLY_NO_INDEX` if none.
    pub limit_index: u32,
    /// For `TALLY_DENIAL_OVER_REQUEST_MAXIMUM`: the `tally_unit` over its maximum.
    pub unit: u32,
    /// How many entries of `limits` are set.
    pub limit_count: u32,
    /// The amount, use and remaining room of `limit_index`'s limit (0 if none).
    pub limit_amount: u64,
    pub limit_used: u64,
    pub remaining: u64,
    /// When `limit_index`'s limit resets (0 if none or nothing counted).
    pub reset_at_ms: u64,
    /// For `TALLY_DENIAL_QUOTA_EXHAUSTED`: how long until the request would fit, and when.
    pub retry_after_ms: u64,
    pub retry_at_ms: u64,
    /// The time the usage was counted at (admitted; later than asked if the key's windows had
    /// already seen a later time).
    pub at_ms: u64,
    /// Micro-credits charged to credits or pay-as-you-go (0 from plan quota).
    pub charged_micros: u64,
    pub credits_balance_micros: u64,
    /// Denied: credits the team would need for the request to be charged to them (0 if
    /// that cannot help).
    pub credits_needed_micros: u64,
    /// See `tally_denial`: what was asked and the bound it hit.
    pub requested: u64,
    pub maximum: u64,
    /// The limits the request touched, in the plan's order.
    pub limits: [tally_limit_status; TALLY_MAX_DECISION_LIMITS],
    /// The key's plan ("" if none), NUL-terminated.
    pub plan: [c_char; TALLY_NAME_CAPACITY],
    /// `limit_index`'s limit's name ("m2.7:requests per rolling:5h"; "" if none).
    pub limit_name: [c_char; TALLY_NAME_CAPACITY],
    /// Denied: a plan with room for this request or that covers the resource ("" if none).
    pub upgrade_plan: [c_char; TALLY_NAME_CAPACITY],
}

impl tally_decision {
    pub(crate) fn empty() -> tally_decision {
        tally_decision {
            admitted: false,
            replayed: false,
            has_credits_balance: false,
            charged_to: tally_charged_to::TALLY_CHARGED_TO_NONE as u32,
            denial: tally_denial::TALLY_DENIAL_NONE as u32,
            limit_index: TALLY_NO_INDEX,
            unit: 0,
            limit_count: 0,
            limit_amount: 0,
            limit_used: 0,
            remaining: 0,
            reset_at_ms: 0,
            retry_after_ms: 0,
            retry_at_ms: 0,
            at_ms: 0,
            charged_micros: 0,
            credits_balance_micros: 0,
            credits_needed_micros: 0,
            requested: 0,
            maximum: 0,
            limits: [tally_limit_status::default(); TALLY_MAX_DECISION_LIMITS],
            plan: [0; TALLY_NAME_CAPACITY],
            limit_name: [0; TALLY_NAME_CAPACITY],
            upgrade_plan: [0; TALLY_NAME_CAPACITY],
        }
    }

    /// The C form of an engine decision; `policy` names its plan and limits.
    pub(crate) fn from_engine(decision: &Decision, policy: &Policy, replayed: bool) -> Self {
        let mut out = tally_decision::empty();
        out.replayed = replayed;
        let (plan, statuses, balance) = match decision {
            Decision::Admitted(admission) => {
                out.admitted = true;
                out.at_ms = admission.at_ms;
                out.charged_to = charged_to_code(admission.charged_to);
                out.charged_micros = match admission.charged_to {
                    ChargedTo::PlanQuota { .. } => 0,
                    ChargedTo::Credits { micros } | ChargedTo::PayAsYouGo { micros } => micros,
                };
                let tightest = admission
                    .limits
                    .as_slice()
                    .iter()
                    .min_by_key(|status| status.remaining())
                    .map(|status| status.limit);
                if matches!(admission.charged_to, ChargedTo::PlanQuota { .. }) {
                    out.limit_index = tightest.map_or(TALLY_NO_INDEX, u32::from);
                }
                (
                    admission.plan,
                    admission.limits,
                    admission.credits_balance_micros,
                )
            }
            Decision::Denied(denial) => {
                out.denial_reason(denial.reason);
                out.credits_needed_micros = denial.remedies.credits_needed_micros.unwrap_or(0);
                if let Some(upgrade) = denial.remedies.upgrade_to {
                    if let Some(plan) = policy.plans().get(upgrade.index()) {
                        copy_name(&plan.name, &mut out.upgrade_plan);
                    }
                }
                (denial.plan, denial.limits, denial.credits_balance_micros)
            }
        };
        if let Some(balance) = balance {
            out.has_credits_balance = true;
            out.credits_balance_micros = balance;
        }
        out.fill_limits(policy, plan, statuses.as_slice());
        out
    }

    fn denial_reason(&mut self, reason: DenialReason) {
        use tally_denial::*;
        let kind = match reason {
            DenialReason::UnknownKey => TALLY_DENIAL_UNKNOWN_KEY,
            DenialReason::NoResources => TALLY_DENIAL_NO_RESOURCES,
            DenialReason::ResourceNotCovered { .. } => TALLY_DENIAL_RESOURCE_NOT_COVERED,
            DenialReason::OverRequestMaximum {
                unit,
                maximum,
                requested,
            } => {
                self.unit = unit.index() as u32;
                (self.requested, self.maximum) = (requested, maximum);
                TALLY_DENIAL_OVER_REQUEST_MAXIMUM
            }
            DenialReason::QuotaExhausted {
                limit,
                retry_at_ms,
                retry_after_ms,
                reset_at_ms,
            } => {
                self.limit_index = limit_index(limit);
                (self.retry_at_ms, self.retry_after_ms) = (retry_at_ms, retry_after_ms);
                self.reset_at_ms = reset_at_ms;
                TALLY_DENIAL_QUOTA_EXHAUSTED
            }
            DenialReason::ExceedsLimit {
                limit,
                amount,
                requested,
            } => {
                self.limit_index = limit_index(limit);
                (self.requested, self.maximum) = (requested, amount);
                TALLY_DENIAL_EXCEEDS_LIMIT
            }
            DenialReason::InsufficientCredits {
                balance_micros,
                price_micros,
            } => {
                self.requested = price_micros;
                self.has_credits_balance = true;
                self.credits_balance_micros = balance_micros;
                TALLY_DENIAL_INSUFFICIENT_CREDITS
            }
            DenialReason::TooManyReservations { open, maximum } => {
                (self.requested, self.maximum) = (u64::from(open), u64::from(maximum));
                TALLY_DENIAL_TOO_MANY_RESERVATIONS
            }
            DenialReason::KeyRevoked => TALLY_DENIAL_KEY_REVOKED,
        };
        self.denial = kind as u32;
    }

    fn fill_limits(
        &mut self,
        policy: &Policy,
        plan: Option<::tally_engine::PlanId>,
        statuses: &[LimitStatus],
    ) {
        let plan = plan.and_then(|plan| policy.plans().get(plan.index()));
        if let Some(plan) = plan {
            copy_name(&plan.name, &mut self.plan);
        }
        for (slot, status) in self.limits.iter_mut().zip(statuses) {
            *slot = tally_limit_status {
                limit_index: u32::from(status.limit),
                used: status.used,
                amount: status.amount,
                remaining: status.remaining(),
                reset_at_ms: status.reset_at_ms.unwrap_or(0),
            };
        }
        self.limit_count = statuses.len().min(TALLY_MAX_DECISION_LIMITS) as u32;
        let chosen = statuses
            .iter()
            .find(|status| u32::from(status.limit) == self.limit_index);
        if let Some(status) = chosen {
            self.limit_amount = status.amount;
            self.limit_used = status.used;
            self.remaining = status.remaining();
            if self.reset_at_ms == 0 {
                self.reset_at_ms = status.reset_at_ms.unwrap_or(0);
            }
        }
        let limit = plan.and_then(|plan| plan.limits.get(self.limit_index as usize));
        if let Some(limit) = limit {
            copy_name(&limit.name, &mut self.limit_name);
        }
    }
}

/// A denial's limit as `limit_index`: `TALLY_NO_INDEX` for one a policy swap removed (a
/// remembered decision's, `Decision::in_policy`).
fn limit_index(limit: u8) -> u32 {
    if limit == GONE_LIMIT {
        TALLY_NO_INDEX
    } else {
        u32::from(limit)
    }
}

/// The `tally_charged_to` code of where a request was charged.
pub(crate) fn charged_to_code(charged_to: ChargedTo) -> u32 {
    let code = match charged_to {
        ChargedTo::PlanQuota { .. } => tally_charged_to::TALLY_CHARGED_TO_PLAN_QUOTA,
        ChargedTo::Credits { .. } => tally_charged_to::TALLY_CHARGED_TO_CREDITS,
        ChargedTo::PayAsYouGo { .. } => tally_charged_to::TALLY_CHARGED_TO_PAY_AS_YOU_GO,
    };
    code as u32
}

/// A checked `tally_request`: borrowed strings and the quantities on the stack.
pub(crate) struct Request<'a> {
    pub key: &'a str,
    pub resource: &'a str,
    pub quantities: Quantities,
    pub at_ms: Option<u64>,
    pub request_id: Option<&'a str>,
}

/// Quantities converted from C, inline (no allocation).
#[derive(Clone, Copy)]
pub(crate) struct Quantities {
    pairs: [(Unit, u64); TALLY_MAX_QUANTITIES],
    len: usize,
}

impl Quantities {
    pub fn as_slice(&self) -> &[(Unit, u64)] {
        &self.pairs[..self.len]
    }
}

/// `TALLY_NOW` becomes "ask the engine's clock".
pub(crate) fn at(at_ms: u64) -> Option<u64> {
    (at_ms != TALLY_NOW).then_some(at_ms)
}

/// Converts `len` C quantities; `allow_none` for settling (nothing used). `field` is the C
/// argument (or struct field) that holds them, which the error messages name.
pub(crate) fn quantities(
    field: &str,
    ptr: *const tally_quantity,
    len: usize,
    allow_none: bool,
) -> Result<Quantities, Failure> {
    let bad = |message: String| Failure::new(tally_status::TALLY_BAD_QUANTITY, message);
    // Checked before the items are borrowed, as `optional_text` checks a string's length.
    if !ptr.is_null() && len > TALLY_MAX_QUANTITIES {
        return Err(bad(format!(
            "{field}: {len} given; at most {TALLY_MAX_QUANTITIES}, one per unit"
        )));
    }
    let items = optional_slice(field, ptr, len)?.unwrap_or(&[]);
    if items.is_empty() && !allow_none {
        return Err(bad(format!("{field}: give at least one (unit, amount)")));
    }
    let mut out = Quantities {
        pairs: [(Unit::Requests, 0); TALLY_MAX_QUANTITIES],
        len: items.len(),
    };
    for (slot, item) in out.pairs.iter_mut().zip(items) {
        let unit = usize::try_from(item.unit)
            .ok()
            .and_then(Unit::from_index)
            .ok_or_else(|| {
                Failure::new(
                    tally_status::TALLY_BAD_ENUM,
                    format!("{field}: unit {} is not a tally_unit", item.unit),
                )
            })?;
        *slot = (unit, item.amount);
    }
    Ok(out)
}

impl<'a> Request<'a> {
    pub fn from_c(request: *const tally_request) -> Result<Request<'a>, Failure> {
        let request = reference("request", request)?;
        Ok(Request {
            key: text("key", request.key, request.key_len, TALLY_MAX_ID_BYTES)?,
            resource: text(
                "resource",
                request.resource,
                request.resource_len,
                crate::checks::TALLY_MAX_NAME_BYTES,
            )?,
            quantities: quantities(
                "quantities",
                request.quantities,
                request.quantities_len,
                false,
            )?,
            at_ms: at(request.at_ms),
            request_id: optional_text(
                "request_id",
                request.request_id,
                request.request_id_len,
                TALLY_MAX_ID_BYTES,
            )?,
        })
    }

    pub fn engine_request(&self) -> ::tally_engine::UsageRequest<'_> {
        ::tally_engine::UsageRequest {
            key: self.key,
            resource: self.resource,
            quantities: self.quantities.as_slice(),
            at_ms: self.at_ms,
            request_id: self.request_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::tally_engine::{Denial, LimitStatuses, Remedies};

    /// A remembered denial whose limit a policy swap removed: no index and no name, never the
    /// limit that now has its old number.
    #[test]
    fn a_denials_limit_a_swap_removed_has_no_index_and_no_name() {
        let policy = Policy::token_plan();
        let starter = policy.plan_id("Starter").expect("shipped");
        let denial = |limit: u8| {
            Decision::Denied(Denial {
                reason: DenialReason::QuotaExhausted {
                    limit,
                    retry_at_ms: 2,
                    retry_after_ms: 1,
                    reset_at_ms: 3,
                },
                plan: Some(starter),
                limits: LimitStatuses::default(),
                credits_balance_micros: None,
                remedies: Remedies::default(),
            })
        };
        let named = tally_decision::from_engine(&denial(0), &policy, true);
        assert_eq!(named.limit_index, 0);
        assert_ne!(named.limit_name[0], 0, "limit 0 is named");
        let gone = tally_decision::from_engine(&denial(::tally_engine::GONE_LIMIT), &policy, true);
        assert_eq!(gone.limit_index, TALLY_NO_INDEX);
        assert_eq!(gone.limit_name[0], 0, "no name");
        assert_eq!(gone.retry_at_ms, 2, "the rest as it was");
    }

    /// The longest plan and limit names a policy can have reach C whole: a 64-byte plan and
    /// a 106-byte limit name (`MAX_LIMIT_NAME_BYTES`), under the 128-byte arrays.
    #[test]
    fn the_longest_plan_and_limit_names_are_copied_whole() {
        use ::tally_engine::policy::{MAX_LIMIT_NAME_BYTES, MAX_NAME_BYTES};
        let resource = "r".repeat(MAX_NAME_BYTES);
        let plan = "p".repeat(MAX_NAME_BYTES);
        let policy = Policy::from_json_str(&format!(
            r#"{{"time_zone":"UTC","resources":{{"{resource}":{{"units":["characters"]}}}},"meters":{{}},"plans":{{"{plan}":{{"limits":[{{"resource":"{resource}","unit":"characters","amount":5,"window":"rolling:365d23h59m59s998ms","bucket":"182d23h59m59s999ms"}}]}}}}}}"#
        ))
        .expect("loads");
        let id = policy.plan_id(&plan).expect("loaded");
        let denial = Decision::Denied(Denial {
            reason: DenialReason::QuotaExhausted {
                limit: 0,
                retry_at_ms: 2,
                retry_after_ms: 1,
                reset_at_ms: 3,
            },
            plan: Some(id),
            limits: LimitStatuses::default(),
            credits_balance_micros: None,
            remedies: Remedies::default(),
        });
        let decision = tally_decision::from_engine(&denial, &policy, false);
        let text = |name: &[c_char; TALLY_NAME_CAPACITY]| {
            // SAFETY: `copy_name` always writes a NUL within the array.
            unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
                .to_str()
                .expect("UTF-8")
                .to_owned()
        };
        assert_eq!(text(&decision.plan), plan);
        let limit_name = text(&decision.limit_name);
        assert_eq!(limit_name.len(), MAX_LIMIT_NAME_BYTES, "{limit_name}");
        assert_eq!(limit_name, policy.plan(id).limits[0].name.as_ref());
    }

    /// A count past the bound is refused by its value alone, before anything at the pointer is
    /// borrowed: here one real quantity with a length a caller could get wrong.
    #[test]
    fn too_many_quantities_are_refused_before_they_are_read() {
        let one = tally_quantity {
            unit: tally_unit::TALLY_UNIT_REQUESTS as u32,
            amount: 1,
        };
        for len in [TALLY_MAX_QUANTITIES + 1, 1 << 40, isize::MAX as usize] {
            let Err(failure) = quantities("quantities", &one, len, false) else {
                panic!("{len} quantities taken");
            };
            assert_eq!(failure.status, tally_status::TALLY_BAD_QUANTITY, "{len}");
            assert!(
                failure.message.contains(&format!("{len} given; at most")),
                "{}",
                failure.message
            );
        }
        assert!(quantities("quantities", &one, 1, false).is_ok());
    }
}
