//! Reservations: holds for work whose cost is known only at the end (a video rendered for
//! minutes, a chat call billed by tokens).
//!
//! `reserve` admits an estimate like a consume (it counts against every limit, or the credits)
//! and remembers what it moved; `settle` charges the actual amount, `void` gives it all back, and
//! a reservation not closed by the end of its lease expires as if voided, so a crashed gateway
//! leaks nothing. Closed reservations are remembered for the idempotency horizon, so settle and
//! void are idempotent. The table is bounded.

use std::collections::{BTreeSet, VecDeque};
use std::num::NonZeroU64;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::admission::{ChargedTo, Quantities, Receipt};
use crate::error::Error;

/// A reservation's id, unique within an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub NonZeroU64);

impl ReservationId {
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

pub const DEFAULT_LEASE_MS: u64 = 10 * 60 * 1_000;
pub const MAX_LEASE_MS: u64 = 24 * 60 * 60 * 1_000;

#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    pub key: Box<str>,
    pub resource: Box<str>,
    pub estimate: Quantities,
    pub receipt: Receipt,
    pub expires_at_ms: u64,
}

/// How a settlement ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub reservation: ReservationId,
    /// Where the estimate was held.
    pub held: ChargedTo,
    /// Where the part of the actual amount beyond the estimate was charged, if any.
    pub extra: Option<ChargedTo>,
    /// Units of the estimate given back (estimate minus actual, per unit).
    pub released: Quantities,
    pub actual: Quantities,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closed {
    Settled(Settlement),
    Voided,
    Expired,
}

impl Closed {
    pub fn state(&self) -> &'static str {
        match self {
            Closed::Settled(_) => "settled",
            Closed::Voided => "voided",
            Closed::Expired => "expired",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct ReservationInner {
    pub open: FxHashMap<u64, Reservation>,
    pub by_expiry: BTreeSet<(u64, u64)>,
    pub closed: FxHashMap<u64, Closed>,
    pub closed_order: VecDeque<(u64, u64)>,
    pub next_id: u64,
    pub newest_ms: u64,
}

#[derive(Debug)]
pub(crate) struct ReservationTable {
    pub inner: Mutex<ReservationInner>,
    pub capacity: usize,
    pub horizon_ms: u64,
}

impl ReservationTable {
    pub fn new(capacity: usize, horizon_ms: u64) -> ReservationTable {
        ReservationTable {
            inner: Mutex::new(ReservationInner::default()),
            capacity: capacity.max(1),
            horizon_ms,
        }
    }
}

impl ReservationInner {
    pub fn allocate_id(&mut self) -> ReservationId {
        self.next_id += 1;
        ReservationId(NonZeroU64::new(self.next_id).unwrap_or(NonZeroU64::MIN))
    }

    pub fn insert(&mut self, id: ReservationId, reservation: Reservation) {
        self.by_expiry.insert((reservation.expires_at_ms, id.get()));
        self.open.insert(id.get(), reservation);
    }

    pub fn remove_open(&mut self, id: u64) -> Option<Reservation> {
        let reservation = self.open.remove(&id)?;
        self.by_expiry.remove(&(reservation.expires_at_ms, id));
        Some(reservation)
    }

    pub fn close(&mut self, id: u64, closed: Closed, at_ms: u64) {
        self.closed.insert(id, closed);
        self.closed_order.push_back((at_ms, id));
    }

    /// Forgets closed reservations older than the horizon.
    pub fn forget_closed(&mut self, at_ms: u64, horizon_ms: u64) {
        self.newest_ms = self.newest_ms.max(at_ms);
        let oldest_kept = self.newest_ms.saturating_sub(horizon_ms);
        while let Some(&(closed_ms, id)) = self.closed_order.front() {
            if closed_ms >= oldest_kept {
                break;
            }
            self.closed_order.pop_front();
            self.closed.remove(&id);
        }
    }

    /// Open reservations whose lease ended at or before `at_ms`.
    pub fn overdue(&self, at_ms: u64) -> Vec<u64> {
        self.by_expiry
            .range(..(at_ms.saturating_add(1), 0))
            .map(|&(_, id)| id)
            .collect()
    }

    pub fn lookup(&self, id: u64) -> Result<&Reservation, Error> {
        if let Some(reservation) = self.open.get(&id) {
            return Ok(reservation);
        }
        Err(match self.closed.get(&id) {
            Some(closed) => Error::ReservationClosed {
                reservation: id,
                state: closed.state(),
            },
            None => Error::UnknownReservation { reservation: id },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The engine's reservation calls. Lock order: the reservation table, then a key shard.

use crate::admission::{Decision, DenialReason, Mode};
use crate::engine::{
    decide_for_key, resolve_resource, Engine, ReserveOutcome, SettleOutcome, UsageRequest,
};
use crate::policy::Unit;

impl Engine {
    /// Holds an estimate against every limit (or the credits) until `settle`, `void` or the end
    /// of the lease (`lease_ms`, default `EngineOptions::default_lease_ms`, at most a day).
    pub fn reserve(
        &self,
        request: &UsageRequest<'_>,
        lease_ms: Option<u64>,
    ) -> Result<ReserveOutcome, Error> {
        let at_ms = self.resolve_time(request.at_ms)?;
        let estimate = Quantities::new(request.quantities)?;
        crate::engine::check_id("key", request.key, crate::accounts::MAX_KEY_BYTES)?;
        if request.request_id.is_some() {
            return Err(Error::invalid(
                "request_id",
                "reservations are identified by the id reserve returns",
            ));
        }
        let lease_ms = lease_ms.unwrap_or(self.options().default_lease_ms);
        if lease_ms == 0 || lease_ms > MAX_LEASE_MS {
            return Err(Error::invalid(
                "lease_ms",
                format!("must be between 1 and {MAX_LEASE_MS}"),
            ));
        }
        let mut table = self.reservations.inner.lock();
        self.expire_locked(&mut table, at_ms);
        if table.open.len() >= self.reservations.capacity {
            return Err(Error::CapacityExceeded {
                what: "reservations",
                capacity: self.reservations.capacity as u64,
            });
        }
        let outcome = self.keys.read(request.key, |policy, state| {
            let resource = resolve_resource(policy, request.resource, &estimate)?;
            let Some(state) = state else {
                return Ok((Decision::denied(DenialReason::UnknownKey), None));
            };
            let maximum = state
                .seat
                .and_then(|seat| policy.plan(seat).max_open_reservations);
            if let Err(open) = state.open_reservation(maximum) {
                let reason = DenialReason::TooManyReservations {
                    open,
                    maximum: maximum.unwrap_or(open),
                };
                return Ok((Decision::denied(reason), None));
            }
            let decided = decide_for_key(policy, state, resource, &estimate, at_ms, Mode::Consume);
            if !matches!(decided, Ok((Decision::Admitted(_), _))) {
                state.close_reservation();
            }
            decided
        })?;
        let (decision, receipt) = outcome;
        let Some(receipt) = receipt.filter(|_| decision.is_admitted()) else {
            return Ok(ReserveOutcome {
                decision,
                reservation: None,
            });
        };
        let id = table.allocate_id();
        let reservation = Reservation {
            key: request.key.into(),
            resource: request.resource.into(),
            estimate,
            receipt,
            expires_at_ms: at_ms.saturating_add(lease_ms),
        };
        table.insert(id, reservation);
        Ok(ReserveOutcome {
            decision,
            reservation: Some(id),
        })
    }

    /// Charges the actual amount: less than the estimate gives the rest back; more is admitted
    /// like a consume (plan quota, then credits) only if it still fits. Settling again with the
    /// same amounts returns the first settlement.
    pub fn settle(
        &self,
        id: ReservationId,
        actual: &[(Unit, u64)],
        at_ms: Option<u64>,
    ) -> Result<SettleOutcome, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let actual = Quantities::new_allowing_none(actual)?;
        let mut table = self.reservations.inner.lock();
        table.forget_closed(at_ms, self.reservations.horizon_ms);
        if let Some(Closed::Settled(settlement)) = table.closed.get(&id.get()) {
            if settlement.actual == actual {
                return Ok(SettleOutcome::Settled(*settlement));
            }
        }
        let reservation = table.lookup(id.get())?.clone();
        if reservation.expires_at_ms <= at_ms {
            self.close_reservation(&mut table, id.get(), &reservation, Closed::Expired, at_ms);
            return Err(Error::ReservationClosed {
                reservation: id.get(),
                state: "expired",
            });
        }
        let (extra, released) = actual.differences(&reservation.estimate);
        let extra_charge = if extra.is_empty() {
            None
        } else {
            match self.charge_extra(&reservation, &extra, at_ms)? {
                Decision::Admitted(admission) => Some(admission.charged_to),
                Decision::Denied(denial) => return Ok(SettleOutcome::Denied(Box::new(denial))),
            }
        };
        self.give_back(
            &reservation.key,
            &reservation.resource,
            &reservation.receipt,
            &released,
            at_ms,
        );
        let settlement = Settlement {
            reservation: id,
            held: reservation.receipt.charged_to,
            extra: extra_charge,
            released,
            actual,
        };
        self.close_reservation(
            &mut table,
            id.get(),
            &reservation,
            Closed::Settled(settlement),
            at_ms,
        );
        Ok(SettleOutcome::Settled(settlement))
    }

    fn charge_extra(
        &self,
        reservation: &Reservation,
        extra: &Quantities,
        at_ms: u64,
    ) -> Result<Decision, Error> {
        self.keys.read(&reservation.key, |policy, state| {
            let resource = resolve_resource(policy, &reservation.resource, extra)?;
            let state = state.ok_or_else(|| Error::UnknownKey {
                key: reservation.key.to_string(),
            })?;
            Ok(decide_for_key(policy, state, resource, extra, at_ms, Mode::Consume)?.0)
        })
    }

    /// Frees everything a reservation holds. Voiding again is a no-op.
    pub fn void(&self, id: ReservationId, at_ms: Option<u64>) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let mut table = self.reservations.inner.lock();
        table.forget_closed(at_ms, self.reservations.horizon_ms);
        if matches!(
            table.closed.get(&id.get()),
            Some(Closed::Voided) | Some(Closed::Expired)
        ) {
            return Ok(());
        }
        let reservation = table.lookup(id.get())?.clone();
        self.give_back(
            &reservation.key,
            &reservation.resource,
            &reservation.receipt,
            &reservation.estimate,
            at_ms,
        );
        self.close_reservation(&mut table, id.get(), &reservation, Closed::Voided, at_ms);
        Ok(())
    }

    /// Expires every reservation whose lease ended at or before `at_ms`, freeing what it held;
    /// returns how many. Also runs on every `reserve`.
    pub fn expire_reservations(&self, at_ms: Option<u64>) -> Result<usize, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let mut table = self.reservations.inner.lock();
        Ok(self.expire_locked(&mut table, at_ms))
    }

    fn expire_locked(&self, table: &mut ReservationInner, at_ms: u64) -> usize {
        table.forget_closed(at_ms, self.reservations.horizon_ms);
        let overdue = table.overdue(at_ms);
        for id in &overdue {
            if let Some(reservation) = table.open.get(id).cloned() {
                self.give_back(
                    &reservation.key,
                    &reservation.resource,
                    &reservation.receipt,
                    &reservation.estimate,
                    at_ms,
                );
                self.close_reservation(table, *id, &reservation, Closed::Expired, at_ms);
            }
        }
        overdue.len()
    }

    fn close_reservation(
        &self,
        table: &mut ReservationInner,
        id: u64,
        reservation: &Reservation,
        closed: Closed,
        at_ms: u64,
    ) {
        table.remove_open(id);
        table.close(id, closed, at_ms);
        self.keys.read(&reservation.key, |_, state| {
            if let Some(state) = state {
                state.close_reservation();
            }
        });
    }

    /// Open reservations right now.
    pub fn open_reservations(&self) -> usize {
        self.reservations.inner.lock().open.len()
    }
}
