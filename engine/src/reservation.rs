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
