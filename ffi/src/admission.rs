//! The hot path and its relatives: consume, check, batches, reservations, refunds and usage
//! corrections.

use std::ffi::c_char;
use std::num::NonZeroU64;

use ::tally_engine::{
    AdjustmentDirection, ChargedTo, Decision, DenialReason, ReservationId, SettleOutcome,
};

use crate::checks::{
    copy_name, optional_slice, text, Out, OutSlice, TALLY_MAX_ID_BYTES, TALLY_MAX_NAME_BYTES,
};
use crate::decision::{
    at, quantities as checked_quantities, tally_decision, tally_quantity, tally_request, Request,
    TALLY_MAX_DECISION_LIMITS, TALLY_NAME_CAPACITY,
};
use crate::handle::{tally_engine, try_ref, Open};
use crate::last_error;
use crate::panic::boundary;
use crate::status::{tally_status, Failure};

/// The most requests one `tally_engine_consume_many` takes.
pub const TALLY_MAX_BATCH: usize = 4_096;

fn decide(open: &Open, request: &Request<'_>, consume: bool) -> Result<tally_decision, Failure> {
    let engine_request = request.engine_request();
    // Whether it is a replay is decided with the decision itself, under the id's lock. The
    // decision is written in place (`consume_into`), not copied out of a return value.
    let mut decision = Decision::denied(DenialReason::UnknownKey);
    let replayed = if consume {
        open.engine.consume_into(&engine_request, &mut decision)?
    } else {
        open.engine.check_into(&engine_request, &mut decision)?
    };
    Ok(tally_decision::from_engine(
        &decision,
        &open.policy,
        replayed,
    ))
}

/// Decides `*request` and, if admitted, counts it (all of it or nothing); writes the decision
/// to `*decision_out`. A denial is `TALLY_OK` with `admitted == false`: statuses are for calls
/// that could not be decided (bad input, `TALLY_REQUEST_ID_CONFLICT`, storage errors, ...).
/// An unknown key is a denial (`TALLY_DENIAL_UNKNOWN_KEY`); an unknown resource is
/// `TALLY_UNKNOWN_RESOURCE`. With durability SYNC it returns once the usage is on disk.
/// The boundary itself allocates nothing on success (no parsing, no heap).
#[no_mangle]
pub extern "C" fn tally_engine_consume(
    engine: *const tally_engine,
    request: *const tally_request,
    decision_out: *mut tally_decision,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("decision_out", decision_out)?;
        let request = Request::from_c(request)?;
        out.set(handle.with(|open| decide(open, &request, true))?);
        Ok(())
    })
}

/// The decision `tally_engine_consume` would make now, counting nothing. With a request id
/// already used, the first decision (`replayed`), once that decision's event is durable (as a
/// consume's repeat waits); a new request id a consume would refuse (stamped before the
/// request-id horizon, or with the request-id table full) is refused alike.
#[no_mangle]
pub extern "C" fn tally_engine_check(
    engine: *const tally_engine,
    request: *const tally_request,
    decision_out: *mut tally_decision,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("decision_out", decision_out)?;
        let request = Request::from_c(request)?;
        out.set(handle.with(|open| decide(open, &request, false))?);
        Ok(())
    })
}

/// Consumes `count` (1..=`TALLY_MAX_BATCH`) requests with one wait for durability (group
/// commit from one thread). Each is decided on its own: `statuses_out[i]` is its status and,
/// when that is `TALLY_OK`, `decisions_out[i]` its decision (otherwise `decisions_out[i]` is
/// left as it was; `tally_batch_entry_error(i, ...)` says what was wrong with entry `i`, as
/// `tally_last_error` does for a single call, until the thread's next batch). The call
/// itself returns `TALLY_OK` when the batch ran, or the status that kept it from running
/// (NULL arrays, closed handle, ...), in which case no entry is written. A crash before the
/// call returns may keep the events of the batch's first requests and lose the rest's: retry
/// the batch with the same request ids and each request counts once (the kept ones return
/// their decisions); without ids, a retry counts the kept ones again.
#[no_mangle]
pub extern "C" fn tally_engine_consume_many(
    engine: *const tally_engine,
    requests: *const tally_request,
    count: usize,
    statuses_out: *mut tally_status,
    decisions_out: *mut tally_decision,
) -> tally_status {
    // The previous batch's entry messages go first: a batch that fails as a whole leaves none.
    last_error::set_entries(Vec::new());
    boundary(|| {
        let handle = try_ref(engine)?;
        if count == 0 || count > TALLY_MAX_BATCH {
            return Err(Failure::new(
                tally_status::TALLY_INVALID_ARGUMENT,
                format!("count: {count}; between 1 and {TALLY_MAX_BATCH}"),
            ));
        }
        // The length of `requests` is the argument `count`, not a `requests_len`: say so
        // (optional_slice would speak of "a length" the caller never passed).
        if requests.is_null() {
            return Err(Failure::new(
                tally_status::TALLY_NULL_POINTER,
                format!("requests: is NULL with a count of {count}"),
            ));
        }
        let requests = optional_slice("requests", requests, count)?.unwrap_or(&[]);
        let statuses_out = OutSlice::new("statuses_out", statuses_out, count)?;
        let decisions_out = OutSlice::new("decisions_out", decisions_out, count)?;
        let checked: Vec<Result<Request<'_>, Failure>> = requests
            .iter()
            .map(|request| Request::from_c(request))
            .collect();
        let results = handle.with(|open| Ok(consume_checked(open, &checked)))?;
        let mut refused = Vec::new();
        for (index, result) in results.into_iter().enumerate() {
            let status = match result {
                Ok(decision) => {
                    decisions_out.set(index, decision);
                    tally_status::TALLY_OK
                }
                Err(failure) => {
                    refused.push((index, failure.message));
                    failure.status
                }
            };
            statuses_out.set(index, status);
        }
        // Each refused entry's message, for `tally_batch_entry_error`.
        last_error::set_entries(refused);
        Ok(())
    })
}

fn consume_checked(
    open: &Open,
    checked: &[Result<Request<'_>, Failure>],
) -> Vec<Result<tally_decision, Failure>> {
    let valid: Vec<&Request<'_>> = checked.iter().filter_map(|r| r.as_ref().ok()).collect();
    let engine_requests: Vec<_> = valid
        .iter()
        .map(|request| request.engine_request())
        .collect();
    let (results, replayed) = open.engine.consume_many_noting_replay(&engine_requests);
    let mut decided = results.into_iter().zip(replayed);
    checked
        .iter()
        .map(|request| match request {
            Err(failure) => Err(failure.clone()),
            Ok(_) => match decided.next() {
                Some((Ok(decision), replayed)) => Ok(tally_decision::from_engine(
                    &decision,
                    &open.policy,
                    replayed,
                )),
                Some((Err(error), _)) => Err(Failure::from(error)),
                None => Err(Failure::new(
                    tally_status::TALLY_PANIC,
                    "the engine answered fewer entries than it was given",
                )),
            },
        })
        .collect()
}

/// Holds an estimate (`*request`, without a request id) against every limit or the credits
/// until settled, voided or the lease ends (`lease_ms`; 0 = the `default_lease_ms` option,
/// 10 minutes unless set; at most 24 h). Writes the decision; when admitted, the reservation's
/// id (never 0) to `*reservation_out`, when denied 0. Gateways that learn the real cost at the
/// end (tokens) reserve an estimate, then settle the actual amount.
#[no_mangle]
pub extern "C" fn tally_engine_reserve(
    engine: *const tally_engine,
    request: *const tally_request,
    lease_ms: u64,
    decision_out: *mut tally_decision,
    reservation_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let decision_out = Out::new("decision_out", decision_out)?;
        let reservation_out = Out::new("reservation_out", reservation_out)?;
        let request = Request::from_c(request)?;
        let lease = (lease_ms != 0).then_some(lease_ms);
        let (decision, id) = handle.with(|open| {
            let outcome = open.engine.reserve(&request.engine_request(), lease)?;
            Ok((
                tally_decision::from_engine(&outcome.decision, &open.policy, false),
                outcome.reservation.map_or(0, ReservationId::get),
            ))
        })?;
        decision_out.set(decision);
        reservation_out.set(id);
        Ok(())
    })
}

fn reservation_id(reservation: u64) -> Result<ReservationId, Failure> {
    NonZeroU64::new(reservation)
        .map(ReservationId)
        .ok_or_else(|| {
            Failure::new(
                tally_status::TALLY_UNKNOWN_RESERVATION,
                "reservation: 0 is never a reservation id",
            )
        })
}

fn micros(charged_to: ChargedTo) -> u64 {
    match charged_to {
        ChargedTo::PlanQuota { .. } => 0,
        ChargedTo::Credits { micros } | ChargedTo::PayAsYouGo { micros } => micros,
    }
}

/// Charges the actual amount of a reservation (`actual`/`actual_len` quantities; none at all
/// is allowed: nothing was used). Less than the estimate gives the rest back; more is
/// admitted like a consume only if it still fits. Writes a decision: `admitted` = settled,
/// `charged_to` where the estimate was held and `charged_micros` the micro-credits held plus
/// any charged for the part beyond it. Not admitted: the part beyond the estimate did not
/// fit (the denial says why); nothing changed and the reservation stays open: settle with
/// less, or void it. Settling again with the same amounts answers the first settlement.
/// A reservation already settled (with other amounts) or voided is
/// `TALLY_RESERVATION_CLOSED`; one whose lease ended, by the engine's expiry or by `at_ms`,
/// is `TALLY_RESERVATION_EXPIRED` (its hold was given back and nothing is charged).
#[no_mangle]
pub extern "C" fn tally_engine_settle(
    engine: *const tally_engine,
    reservation: u64,
    actual: *const tally_quantity,
    actual_len: usize,
    at_ms: u64,
    decision_out: *mut tally_decision,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("decision_out", decision_out)?;
        let id = reservation_id(reservation)?;
        let actual = checked_quantities("actual", actual, actual_len, true)?;
        let decision = handle.with(|open| {
            // The engine names the quantities `actual`, as this argument is.
            let outcome = open.engine.settle(id, actual.as_slice(), at(at_ms))?;
            match outcome {
                SettleOutcome::Settled(settlement) => {
                    let mut decision = tally_decision::empty();
                    decision.admitted = true;
                    decision.charged_to = crate::decision::charged_to_code(settlement.held);
                    decision.charged_micros =
                        micros(settlement.held).saturating_add(settlement.extra.map_or(0, micros));
                    Ok(decision)
                }
                SettleOutcome::Denied(denial) => Ok(tally_decision::from_engine(
                    &Decision::Denied(*denial),
                    &open.policy,
                    false,
                )),
            }
        })?;
        out.set(decision);
        Ok(())
    })
}

/// Frees everything a reservation holds. Voiding again, or voiding one the engine expired
/// (its lease ended), is a no-op (`TALLY_OK`); voiding a settled one is
/// `TALLY_RESERVATION_CLOSED`.
#[no_mangle]
pub extern "C" fn tally_engine_void(
    engine: *const tally_engine,
    reservation: u64,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let id = reservation_id(reservation)?;
        handle.with(|open| Ok(open.engine.void(id, at(at_ms))?))
    })
}

/// Ends every reservation whose lease ended by `at_ms` (or now), giving back what they held;
/// writes how many to `*expired_out`. Reserve does this too as it goes, and so does the engine
/// from the admission path once a lease has ended on its clock.
#[no_mangle]
pub extern "C" fn tally_engine_expire_reservations(
    engine: *const tally_engine,
    at_ms: u64,
    expired_out: *mut u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("expired_out", expired_out)?;
        let expired = handle.with(|open| Ok(open.engine.expire_reservations(at(at_ms))?))?;
        out.set(expired as u64);
        Ok(())
    })
}

/// Refunds in full a request admitted under `request_id`: its quota, credits or pay-as-you-go
/// spend is given back (quota only where it still counts at `at_ms`: not what has aged out of
/// a rolling window or was counted on a day, week or month since ended). Refunding twice, or
/// an id whose request was denied (nothing to give back), is `TALLY_INVALID_ARGUMENT` naming
/// `request_id`; an id no request used within the horizon (the idempotency horizon after the
/// request's timestamp, by the engine's clock, not `at_ms`: past it the id is forgotten, the
/// same whenever the table drops it and after a reopen), or only with a key the engine did
/// not know (a denial it does not remember), is `TALLY_UNKNOWN_REQUEST`.
#[no_mangle]
pub extern "C" fn tally_engine_refund(
    engine: *const tally_engine,
    request_id: *const c_char,
    request_id_len: usize,
    at_ms: u64,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let request_id = text("request_id", request_id, request_id_len, TALLY_MAX_ID_BYTES)?;
        handle.with(|open| {
            open.engine.refund(request_id, at(at_ms))?;
            Ok(())
        })
    })
}

/// Which way `tally_engine_adjust_usage` corrects. Passed as `uint32_t` and checked: any
/// other value is `TALLY_BAD_ENUM`.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tally_adjustment_direction {
    /// Usage that really happened but was not counted: counted now, whatever the limit.
    TALLY_ADJUST_ADD = 1,
    /// Usage counted that should not have been: given back where its window still counts it.
    TALLY_ADJUST_REMOVE = 2,
}

/// One limit a usage correction touched.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct tally_limit_adjusted {
    /// Index into the key's plan's limits (as `tally_limit_status.limit_index`).
    pub limit_index: u32,
    /// Units added, or removed (at most what still counted: nothing for usage whose window has
    /// reset or aged out).
    pub moved: u64,
    /// The limit's name ("m2.7:requests per rolling:5h"), NUL-terminated.
    pub name: [c_char; TALLY_NAME_CAPACITY],
}

/// What `tally_engine_adjust_usage` moved: one entry per limit of the key's plan that counts
/// the resource, in the plan's order. Plain data: copy it freely.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct tally_adjustment {
    /// How many entries of `limits` are set.
    pub limit_count: u32,
    pub limits: [tally_limit_adjusted; TALLY_MAX_DECISION_LIMITS],
}

/// Corrects the usage a key's plan counted at `usage_at_ms` (when it happened; not after
/// `at_ms`): `direction` adds usage that was not counted (whatever the limit) or removes
/// usage that should not have been (given back only where its window still counts it). Every
/// limit of the plan that counts the resource, or none; logged as its own event (never an
/// edit of the original), except an addition every window has moved past, which moves 0 on
/// each limit and logs nothing. Writes what moved to `*adjustment_out`. A key without a seat
/// (including a pay-as-you-go key), or a resource its plan does not limit, is
/// `TALLY_INVALID_ARGUMENT`; units none of the plan's limits on the resource count
/// `TALLY_BAD_QUANTITY`; an unknown key `TALLY_UNKNOWN_KEY`, an unknown resource
/// `TALLY_UNKNOWN_RESOURCE`.
#[no_mangle]
pub extern "C" fn tally_engine_adjust_usage(
    engine: *const tally_engine,
    key: *const c_char,
    key_len: usize,
    resource: *const c_char,
    resource_len: usize,
    quantities: *const tally_quantity,
    quantities_len: usize,
    usage_at_ms: u64,
    direction: u32,
    at_ms: u64,
    adjustment_out: *mut tally_adjustment,
) -> tally_status {
    boundary(|| {
        let handle = try_ref(engine)?;
        let out = Out::new("adjustment_out", adjustment_out)?;
        let key = text("key", key, key_len, TALLY_MAX_ID_BYTES)?;
        let resource = text("resource", resource, resource_len, TALLY_MAX_NAME_BYTES)?;
        let quantities = checked_quantities("quantities", quantities, quantities_len, false)?;
        let direction = adjustment_direction(direction)?;
        if usage_at_ms == crate::decision::TALLY_NOW {
            return Err(Failure::new(
                tally_status::TALLY_BAD_TIMESTAMP,
                "usage_at_ms: when the usage happened, in milliseconds since the Unix epoch \
                 (TALLY_NOW is not a time here)",
            ));
        }
        let outcome = handle.with(|open| {
            Ok(open.engine.adjust_usage(
                key,
                resource,
                quantities.as_slice(),
                usage_at_ms,
                direction,
                at(at_ms),
            )?)
        })?;
        let mut adjustment = tally_adjustment {
            limit_count: 0,
            limits: [tally_limit_adjusted {
                limit_index: 0,
                moved: 0,
                name: [0; TALLY_NAME_CAPACITY],
            }; TALLY_MAX_DECISION_LIMITS],
        };
        for (slot, limit) in adjustment.limits.iter_mut().zip(&outcome.limits) {
            slot.limit_index = u32::from(limit.index);
            slot.moved = limit.moved;
            copy_name(&limit.name, &mut slot.name);
            adjustment.limit_count += 1;
        }
        out.set(adjustment);
        Ok(())
    })
}

fn adjustment_direction(direction: u32) -> Result<AdjustmentDirection, Failure> {
    match direction {
        value if value == tally_adjustment_direction::TALLY_ADJUST_ADD as u32 => {
            Ok(AdjustmentDirection::Add)
        }
        value if value == tally_adjustment_direction::TALLY_ADJUST_REMOVE as u32 => {
            Ok(AdjustmentDirection::Remove)
        }
        other => Err(Failure::new(
            tally_status::TALLY_BAD_ENUM,
            format!(
                "direction: {other} is not a tally_adjustment_direction (TALLY_ADJUST_ADD = 1, \
                 TALLY_ADJUST_REMOVE = 2)"
            ),
        )),
    }
}
