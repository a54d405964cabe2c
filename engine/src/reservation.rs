//! Reservations: holds for work whose cost is known only at the end (a video rendered for
//! minutes, a chat call billed by tokens).
//!
//! `reserve` admits an estimate like a consume (it counts against every limit, or the credits)
//! and remembers what it moved; `settle` charges the actual amount, `void` gives it all back, and
//! a reservation not closed by the end of its lease expires as if voided, so a crashed gateway
//! leaks nothing. Closed reservations are remembered for the idempotency horizon, so settle and
//! void are idempotent. The table is bounded: `max_open_reservations` open ones, and as many
//! closed ones (the most recently closed; see `ReservationInner::close`).

use std::collections::{BTreeSet, VecDeque};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use rustc_hash::FxHashMap;

use crate::admission::{ChargedTo, Quantities, Receipt};
use crate::error::Error;

/// A reservation's id, unique within an engine.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ReservationId(pub NonZeroU64);

impl ReservationId {
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

pub const DEFAULT_LEASE_MS: u64 = 10 * 60 * 1_000;
pub const MAX_LEASE_MS: u64 = 24 * 60 * 60 * 1_000;
/// Reservation ids recorded as handed out at a time (`ReservationInner::ids_through`): one
/// flush of sled's file per this many reservations, and at most this many ids skipped at an
/// open. The next block is recorded once half of this many are left (`Engine::ids_recorded`).
pub(crate) const RESERVATION_IDS_PER_RECORD: u64 = 4_096;
const _: () = assert!(RESERVATION_IDS_PER_RECORD >= 2);

#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    pub key: Box<str>,
    pub resource: Box<str>,
    pub estimate: Quantities,
    pub receipt: Receipt,
    pub expires_at_ms: u64,
    /// The sequence number of its `ReservationOpened` event if this engine logged it (0 without
    /// a log or when restored): a settle or void waits for it to be durable before acting.
    pub opened_seq: u64,
}

/// How a settlement ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settlement {
    pub reservation: ReservationId,
    /// Where the estimate was held, its plan numbered as the policy in force names it (a swap
    /// since the reserve is followed).
    pub held: ChargedTo,
    /// Where the part of the actual amount beyond the estimate was charged, if any.
    pub extra: Option<ChargedTo>,
    /// Units of the estimate given back (estimate minus actual, per unit).
    pub released: Quantities,
    pub actual: Quantities,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Closed {
    Settled(Settlement),
    Voided,
    Expired,
}

impl From<&ReservationEnd> for Closed {
    fn from(end: &ReservationEnd) -> Closed {
        match end {
            ReservationEnd::Settled { settlement, .. } => Closed::Settled(*settlement),
            ReservationEnd::Voided => Closed::Voided,
            ReservationEnd::Expired => Closed::Expired,
        }
    }
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

#[derive(Debug)]
pub(crate) struct ReservationInner {
    pub open: FxHashMap<u64, Reservation>,
    /// Only `insert` and `remove_open` change it, and they keep `earliest_lease_end_ms` its first.
    by_expiry: BTreeSet<(u64, u64)>,
    /// The earliest end of an open reservation's lease (`u64::MAX`: none open), shared with
    /// `ReservationTable` so the admission path can ask whether a lease has ended without the
    /// table's lock. A hint: whoever acts on it reads `by_expiry` under the lock.
    earliest_lease_end_ms: Arc<AtomicU64>,
    /// Each closed reservation with the sequence number of its closing event (0 without a log
    /// or when restored): a repeated settle or void waits for that event to be durable before
    /// it answers, as the first call does.
    pub closed: FxHashMap<u64, (Closed, u64)>,
    /// `(closed at, id)` of every entry of `closed`, in that order (oldest first).
    pub closed_order: VecDeque<(u64, u64)>,
    /// The most closed reservations remembered (the table's capacity): past it, `close` forgets
    /// the oldest, so reserve-and-void cycles cannot grow the table for a whole horizon.
    closed_capacity: usize,
    pub next_id: u64,
    /// The last id the log records as handed out at most (`EventLog::reservation_ids_through`):
    /// one past it is recorded before it is handed out. 0 without a log (nothing to outlive).
    pub ids_through: u64,
}

impl ReservationInner {
    fn new(closed_capacity: usize) -> ReservationInner {
        ReservationInner {
            open: FxHashMap::default(),
            by_expiry: BTreeSet::new(),
            earliest_lease_end_ms: Arc::new(AtomicU64::new(u64::MAX)),
            closed: FxHashMap::default(),
            closed_order: VecDeque::new(),
            closed_capacity: closed_capacity.max(1),
            next_id: 0,
            ids_through: 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct ReservationTable {
    pub inner: Mutex<ReservationInner>,
    /// `ReservationInner::earliest_lease_end_ms`, read without the lock.
    earliest_lease_end_ms: Arc<AtomicU64>,
    pub capacity: usize,
    // Relaxed: a setting, changed by a policy swap.
    pub horizon_ms: std::sync::atomic::AtomicU64,
    /// Held while a block of ids is recorded (`Engine::ids_recorded`), taken with `inner` let
    /// go (never the other way round): the last id recorded by this engine (0: none yet).
    recording: Mutex<u64>,
}

impl ReservationTable {
    /// Whether an open reservation's lease ended at or before `at_ms`, without the table's
    /// lock: one load of a value that changes only when a reservation opens or closes.
    #[inline]
    pub fn lease_ended_by(&self, at_ms: u64) -> bool {
        self.earliest_lease_end() <= at_ms
    }

    /// The earliest end of an open lease (`u64::MAX`: none). Acquire: read before a decision,
    /// a value published after a close (Release) makes the decision see what it gave back.
    #[inline]
    pub fn earliest_lease_end(&self) -> u64 {
        self.earliest_lease_end_ms.load(Ordering::Acquire)
    }

    pub fn horizon(&self) -> u64 {
        self.horizon_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn new(capacity: usize, horizon_ms: u64) -> ReservationTable {
        let inner = ReservationInner::new(capacity);
        ReservationTable {
            earliest_lease_end_ms: Arc::clone(&inner.earliest_lease_end_ms),
            inner: Mutex::new(inner),
            capacity: capacity.max(1),
            horizon_ms: std::sync::atomic::AtomicU64::new(horizon_ms),
            recording: Mutex::new(0),
        }
    }
}

impl ReservationInner {
    pub fn insert(&mut self, id: ReservationId, reservation: Reservation) {
        self.by_expiry.insert((reservation.expires_at_ms, id.get()));
        self.open.insert(id.get(), reservation);
        self.publish_earliest_lease_end();
    }

    pub fn remove_open(&mut self, id: u64) -> Option<Reservation> {
        let reservation = self.open.remove(&id)?;
        self.by_expiry.remove(&(reservation.expires_at_ms, id));
        self.publish_earliest_lease_end();
        Some(reservation)
    }

    fn publish_earliest_lease_end(&self) {
        let earliest = self
            .by_expiry
            .first()
            .map_or(u64::MAX, |&(end_ms, _)| end_ms);
        // Stored only when it changes: every single request reads it before deciding, so its
        // line stays in their caches while reservations come and go behind the earliest.
        // Relaxed load: only this lock's holder writes it. Release store: a decision that
        // reads the new value (Acquire) sees what the close gave back before it.
        if self.earliest_lease_end_ms.load(Ordering::Relaxed) != earliest {
            self.earliest_lease_end_ms
                .store(earliest, Ordering::Release);
        }
    }

    /// Remembers `id` as closed at `at_ms`, then forgets the oldest closed reservations past
    /// `closed_capacity` (a repeated settle or void of one forgotten is `UnknownReservation`,
    /// never a second charge). `closed_order` stays in order of `(closing time, id)`, which
    /// `forget_closed` relies on: a close is nearly always the newest and goes at the back, but
    /// a request with an older timestamp (racing threads) goes before the newer ones. The id
    /// breaks ties, so the order, and with it which ones the bound forgets, is the same
    /// whether the closes came live, from a replay of the log (the same closes in the same
    /// order) or from a snapshot (listed by id).
    pub fn close(&mut self, id: u64, closed: Closed, at_ms: u64, seq: u64) {
        self.closed.insert(id, (closed, seq));
        let position = self
            .closed_order
            .iter()
            .rposition(|&closed_at| closed_at <= (at_ms, id))
            .map_or(0, |before| before + 1);
        self.closed_order.insert(position, (at_ms, id));
        while self.closed_order.len() > self.closed_capacity {
            if let Some((_, oldest)) = self.closed_order.pop_front() {
                self.closed.remove(&oldest);
            }
        }
    }

    /// Names the plans of the remembered settlements, made under `from`, as `to` numbers them
    /// (a policy swap): a repeated settle answers the first settlement with the names it had.
    pub fn rename_settlements(&mut self, from: &crate::policy::Policy, to: &crate::policy::Policy) {
        for (closed, _) in self.closed.values_mut() {
            if let Closed::Settled(settlement) = closed {
                settlement.held = settlement.held.in_policy(from, to);
                settlement.extra = settlement.extra.map(|extra| extra.in_policy(from, to));
            }
        }
    }

    /// Sets how many closed reservations `close` keeps, forgetting none now: an open restores
    /// and replays what the database acknowledged under the bound it ran with, and only a
    /// later close forgets the oldest past this one (`Engine::open`).
    pub fn set_closed_capacity(&mut self, capacity: usize) {
        self.closed_capacity = capacity.max(1);
    }

    /// Forgets closed reservations closed more than the horizon before `now_ms` (the engine's
    /// clock).
    pub fn forget_closed(&mut self, now_ms: u64, horizon_ms: u64) {
        let oldest_kept = now_ms.saturating_sub(horizon_ms);
        while let Some(&(closed_ms, id)) = self.closed_order.front() {
            if closed_ms >= oldest_kept {
                break;
            }
            self.closed_order.pop_front();
            self.closed.remove(&id);
        }
    }

    /// Takes back a close whose event never became durable: `id` is open again as it was.
    fn reopen(&mut self, id: ReservationId, reservation: Reservation) {
        if self.closed.remove(&id.get()).is_some() {
            if let Some(position) = self
                .closed_order
                .iter()
                .rposition(|&(_, closed)| closed == id.get())
            {
                self.closed_order.remove(position);
            }
        }
        self.insert(id, reservation);
    }

    /// The sequence number of the latest event about `id` (its opening or its closing), if
    /// it was logged by this engine (it may not be durable yet).
    fn pending_seq(&self, id: u64) -> Option<u64> {
        let seq = match (self.open.get(&id), self.closed.get(&id)) {
            (Some(reservation), _) => reservation.opened_seq,
            (None, Some(&(_, seq))) => seq,
            (None, None) => 0,
        };
        (seq != 0).then_some(seq)
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
            Some((closed, _)) => Error::ReservationClosed {
                reservation: id,
                state: closed.state(),
            },
            None => Error::UnknownReservation { reservation: id },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The engine's reservation calls. Lock order: the reservation table, then a key shard.
//
// Group commit: a call changes the table, the counters and the log together under the table's
// lock (a checkpoint's cut, which takes the lock too, never splits a change from its event),
// and waits for its event to be durable after letting the lock go, so concurrent reserves,
// settles and voids share fdatasyncs as consumes do. While it waits:
// - its reservation carries the event's sequence number (`opened_seq`, or the closed entry's),
//   and any other call about that reservation waits for the event before acting or answering
//   (so nothing ever builds on an event that may still be lost, and a repeated settle is not
//   answered before the first one is acknowledged);
// - if the event never becomes durable (the log failed: every later event fails too), the
//   call takes the lock again and undoes its change.
// Expiry closes reservations and waits while holding the lock (it runs inside other calls that
// hold it): it appends every overdue close first, so they share one flush.

use crate::adjustment::{CreditsBack, CreditsLater};
use crate::admission::{
    over_maximum, price_micros, try_credits, Amounts, Decision, DenialReason, Mode,
};
use crate::engine::{
    decide_for_key, resolve_resource, Engine, ReserveOutcome, SettleOutcome, UsageRequest,
};
use crate::event::{encode_body, EventBody, GivenBack, ReservationEnd};
use crate::policy::Unit;

/// Why a settle's `actual` amount is over a per-request maximum (the resource's own, then the
/// key's plan's, `state.seat`), if it is: the whole amount is checked, not only its extra.
fn over_maximums(
    policy: &crate::policy::Policy,
    state: &crate::accounts::KeyState,
    resource: crate::policy::ResourceId,
    actual: &Quantities,
) -> Option<DenialReason> {
    let plan_maximums = state
        .seat
        .map(|plan| &policy.plan(plan).maximums[resource.index()]);
    over_maximum(&policy.resource(resource).max_per_request, actual)
        .or_else(|| plan_maximums.and_then(|maximums| over_maximum(maximums, actual)))
}

/// A close applied and logged whose event may not be durable yet (`Engine::begin_close`).
struct Closing {
    id: ReservationId,
    reservation: Reservation,
    given_back: GivenBack,
    /// What a settle charged beyond the estimate, and where.
    extra: Option<(Receipt, Quantities)>,
    /// Credits `given_back` holds (and an extra they pay for) not yet moved: they are, once
    /// the closing event is appended (`CreditsLater`); then nothing.
    later: CreditsLater,
    /// The closing event's sequence number; 0 without a log.
    seq: u64,
}

/// The decision on a settle's `extra` beyond `reservation`'s estimate, as a consume of it
/// would be, under the key's read lock (`Engine::charge_extra`, which checked the maximums).
fn decide_extra(
    policy: &crate::policy::Policy,
    state: &crate::accounts::KeyState,
    resource: crate::policy::ResourceId,
    reservation: &Reservation,
    extra: &Quantities,
    at_ms: u64,
) -> Result<(Decision, Option<Receipt>), Error> {
    if let (ChargedTo::Credits { .. }, Some(plan)) = (reservation.receipt.charged_to, state.seat) {
        let plan = policy.plan(plan);
        let touches = &plan.touches[resource.index()];
        if plan.covers[resource.index()]
            && Amounts::of(touches, extra).is_some_and(|amounts| amounts.as_slice().is_empty())
        {
            // The request was paid with credits, its plan refusing it. An overrun in
            // units none of the plan's limits count would take nothing from them and
            // so "fit" even an exhausted plan, unpaid: it is the credits' request's,
            // paid as a consume of the whole amount would be.
            let price = price_micros(policy, resource, extra)?;
            let decision = try_credits(
                &state.team,
                price,
                at_ms,
                state.seat,
                None,
                Mode::Consume,
                DenialReason::NoResources,
            );
            let receipt = match decision {
                Decision::Admitted(admission) => Some(Receipt {
                    charged_to: admission.charged_to,
                    generation: policy.generation,
                    holds: Default::default(),
                }),
                Decision::Denied(_) => None,
            };
            return Ok((decision, receipt));
        }
    }
    decide_for_key(policy, state, resource, extra, at_ms, Mode::Consume)
}

/// Pays a settle's `extra`, which the team's balance alone could not (`denial`), with the
/// balance and `back` (what the credits hold gives back of its unused estimate) together, in
/// one step (`Team::refund_and_charge`): no other key of the team can take the credits given
/// back before the extra is paid. If `back` pays for it alone, nothing moves yet: the rest of
/// `back` reaches the balance once the close is appended (`CreditsLater`, returned), as any
/// close's credits do; else the balance pays the difference now. Admitted, it returns the
/// extra's receipt and what was given back (for the close to log, instead of giving it back
/// again); refused, `denial` with the credits it needs beside the hold (insufficient credits
/// of the balance and `back` together, not "no resources" when the balance alone was empty
/// nor the balance alone when it was short), and nothing changed.
#[allow(clippy::type_complexity)]
fn pay_extra_with_the_hold(
    policy: &crate::policy::Policy,
    state: &crate::accounts::KeyState,
    resource: crate::policy::ResourceId,
    extra: &Quantities,
    back: u64,
    mut denial: crate::admission::Denial,
    at_ms: u64,
) -> Result<(Decision, Option<Receipt>, Option<(GivenBack, CreditsLater)>), Error> {
    // Unpriced, the extra could not go to credits; with nothing given back, the balance alone
    // just refused it. A pay-as-you-go key never draws on credits.
    let price = price_micros(policy, resource, extra)?;
    let (Some(price), 1.., crate::accounts::KeyKind::Plan) = (price, back, state.kind) else {
        return Ok((Decision::Denied(denial), None, None));
    };
    let balance = state.team.balance_micros();
    let paid = match back.checked_sub(price) {
        // The balance after, once the rest is paid (as `refund_and_charge` would refuse it,
        // past `u64::MAX`).
        Some(rest) => balance
            .checked_add(rest)
            .map(|after| {
                let later = CreditsLater { given: back, price };
                (after, later)
            })
            .ok_or(balance),
        None => state
            .team
            .refund_and_charge(back, price)
            .map(|after| (after, CreditsLater::default())),
    };
    match paid {
        Ok((after, later)) => {
            let charged_to = ChargedTo::Credits { micros: price };
            let admission = crate::admission::Admission {
                charged_to,
                at_ms,
                plan: state.seat,
                limits: denial.limits,
                credits_balance_micros: Some(after),
            };
            let receipt = Receipt {
                charged_to,
                generation: policy.generation,
                holds: Default::default(),
            };
            let given = GivenBack {
                generation: policy.generation,
                credits_micros: back,
                ..GivenBack::default()
            };
            Ok((
                Decision::Admitted(admission),
                Some(receipt),
                Some((given, later)),
            ))
        }
        Err(balance) => {
            if matches!(
                denial.reason,
                DenialReason::NoResources | DenialReason::InsufficientCredits { .. }
            ) {
                // Decided on the balance alone (empty: "no resources"; short: that balance),
                // but what this settle could draw on is the balance and what the hold gives
                // back, as the credits needed below say.
                denial.reason = DenialReason::InsufficientCredits {
                    balance_micros: balance.saturating_add(back),
                    price_micros: price,
                };
            }
            denial.credits_balance_micros = Some(balance);
            denial.remedies.credits_needed_micros =
                Some(price.saturating_sub(balance.saturating_add(back)).max(1));
            Ok((Decision::Denied(denial), None, None))
        }
    }
}

/// A settle's `decision` on its `extra` beyond a credits hold, refused as "no resources" (the
/// balance was empty, and nothing the hold gives back paid for it): the key does pay with
/// credits (the hold is theirs). An extra that costs nothing (an overrun in units priced at 0)
/// fits an empty balance as it fits any other, and is charged 0 micros, as it is with a micro
/// to spare (`try_credits` charges only a balance above 0: that is what gives a key without a
/// seat access at all, which this key, holding credits, has). Otherwise the balance is only
/// short of the extra's price, so the denial says insufficient credits, as
/// `pay_extra_with_the_hold` says when the hold gives some back. Any other decision is
/// returned as it is, with its receipt.
fn credits_hold_short(
    policy: &crate::policy::Policy,
    state: &crate::accounts::KeyState,
    resource: crate::policy::ResourceId,
    reservation: &Reservation,
    extra: &Quantities,
    (mut decision, receipt): (Decision, Option<Receipt>),
    at_ms: u64,
) -> Result<(Decision, Option<Receipt>), Error> {
    if let (ChargedTo::Credits { .. }, Decision::Denied(denial)) =
        (reservation.receipt.charged_to, &mut decision)
    {
        if denial.reason == DenialReason::NoResources {
            match price_micros(policy, resource, extra)? {
                Some(0) if state.kind == crate::accounts::KeyKind::Plan => {
                    let charged_to = ChargedTo::Credits { micros: 0 };
                    let admission = crate::admission::Admission {
                        charged_to,
                        at_ms,
                        plan: state.seat,
                        limits: denial.limits,
                        credits_balance_micros: Some(state.team.balance_micros()),
                    };
                    let receipt = Receipt {
                        charged_to,
                        generation: policy.generation,
                        holds: Default::default(),
                    };
                    return Ok((Decision::Admitted(admission), Some(receipt)));
                }
                Some(price) => {
                    denial.reason = DenialReason::InsufficientCredits {
                        balance_micros: denial.credits_balance_micros.unwrap_or(0),
                        price_micros: price,
                    };
                }
                None => {}
            }
        }
    }
    Ok((decision, receipt))
}

/// The plan to suggest to a key refused for holding `maximum` open reservations (its plan's
/// agents, on `current`): of the plans that cap open reservations above `maximum` and could
/// ever take the `estimate` of `resource` (they cover it, their maximums allow it, each limit
/// it touches is at least its amount), those covering every resource `current` covers first
/// (`admission::keeps_coverage`), then the one with the fewest (the cheapest of those, then the
/// first). A plan without a cap is not suggested: it belongs to another family of plans (the
/// standard ones, not the usage bar's), whose limits say nothing of agents.
fn more_agents(
    policy: &crate::policy::Policy,
    current: &crate::policy::Plan,
    resource: crate::policy::ResourceId,
    estimate: &Quantities,
    maximum: u32,
) -> Option<crate::policy::PlanId> {
    policy
        .plans()
        .iter()
        .enumerate()
        .filter(|(_, plan)| crate::admission::can_ever_take(plan, resource, estimate))
        .filter_map(|(index, plan)| {
            let cap = plan.max_open_reservations.filter(|&cap| cap > maximum)?;
            let price = plan.price_micros_per_month.unwrap_or(u64::MAX);
            let loses = !crate::admission::keeps_coverage(current, plan);
            Some(((loses, cap, price, index), index))
        })
        .min()
        .map(|(_, index)| crate::policy::PlanId(index as u16))
}

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
        let journal = self.journal();
        let mut table = self.reservations.inner.lock();
        if let Some(journal) = journal {
            // Before anything changes: a failed record leaves everything as it was.
            table = self.ids_recorded(journal, table)?;
        }
        // Leases that ended by the clock's now (not this request's stamp: one request stamped
        // far ahead must not expire everyone's reservations).
        self.expire_locked(&mut table, at_ms.min(self.now_ms()))?;
        // A full table refuses a new reservation, but only once the request could hold one:
        // its own error (an unknown resource, units it does not meter) and the denial of a key
        // that is not valid (unknown, revoked) answer first, as with room, where none of them
        // takes a place (as the request-id table answers, `Engine::key_refusal`: a gateway
        // answers a full table 503, an unknown key 401).
        let full = table.open.len() >= self.reservations.capacity;
        // Never 2^64 - 1 (a replay and a restore refuse it) nor a wrap to 1 (handed out again).
        let Some(id) = (table.next_id.checked_add(1))
            .filter(|&id| id < u64::MAX)
            .and_then(NonZeroU64::new)
            .map(ReservationId)
        else {
            return Err(Error::CapacityExceeded {
                what: "reservation ids",
                capacity: u64::MAX - 1,
            });
        };
        let expires_at_ms = at_ms.saturating_add(lease_ms);
        // Recorded before it can be answered (`ids_recorded`): a real check, as an id past the
        // record is the one a reopen could hand out again.
        if journal.is_some() && id.get() > table.ids_through {
            return Err(Error::Storage {
                problem: format!(
                    "reservation id {} is past the ids recorded as handed out ({}): not \
                     handed out",
                    id.get(),
                    table.ids_through
                ),
            });
        }
        let (decision, receipt, seq) = self.keys.read(request.key, |policy, state| {
            let resource = resolve_resource(policy, request.resource, &estimate)?;
            let Some(state) = state else {
                return Ok((Decision::denied(DenialReason::UnknownKey), None, None));
            };
            if state.revoked {
                // Before its open reservations are counted: a revoked key is not at its agents.
                return Ok((Decision::denied(DenialReason::KeyRevoked), None, None));
            }
            if full {
                return Err(Error::CapacityExceeded {
                    what: "reservations",
                    capacity: self.reservations.capacity as u64,
                });
            }
            let plan = state.seat.map(|seat| policy.plan(seat));
            let maximum = plan.and_then(|plan| plan.max_open_reservations);
            if let Err(open) = state.open_reservation(maximum) {
                let reason = DenialReason::TooManyReservations {
                    open,
                    maximum: maximum.unwrap_or(open),
                };
                let mut decision = Decision::denied(reason);
                if let Decision::Denied(denial) = &mut decision {
                    denial.plan = state.seat;
                    denial.remedies.upgrade_to = plan.zip(maximum).and_then(|(plan, maximum)| {
                        more_agents(policy, plan, resource, &estimate, maximum)
                    });
                }
                return Ok((decision, None, None));
            }
            let (decision, receipt) =
                match decide_for_key(policy, state, resource, &estimate, at_ms, Mode::Consume) {
                    Ok((decision @ Decision::Admitted(_), Some(receipt))) => (decision, receipt),
                    other => {
                        state.close_reservation();
                        return other.map(|(decision, _)| (decision, None, None));
                    }
                };
            let body = EventBody::ReservationOpened {
                reservation: id.get(),
                key: request.key.into(),
                resource: request.resource.into(),
                estimate,
                expires_at_ms,
                decision,
                receipt,
            };
            match journal.map(|journal| journal.append(at_ms, encode_body(&body))) {
                Some(Err(error)) => {
                    crate::adjustment::give_back_in(
                        Some((policy, &[])),
                        policy,
                        state,
                        request.resource,
                        &receipt,
                        &estimate,
                        true,
                        None,
                        CreditsBack::Now,
                        Some(self.undo(request.key)),
                    );
                    state.close_reservation();
                    Err(error)
                }
                Some(Ok(seq)) => {
                    // Under the locks a cut takes, as a replay notes it.
                    self.note_event_time(at_ms);
                    Ok((decision, Some(receipt), Some(seq)))
                }
                None => Ok((decision, Some(receipt), None)),
            }
        })?;
        let Some(receipt) = receipt else {
            return Ok(ReserveOutcome {
                decision,
                reservation: None,
            });
        };
        let reservation = Reservation {
            key: request.key.into(),
            resource: request.resource.into(),
            estimate,
            receipt,
            expires_at_ms,
            opened_seq: seq.unwrap_or(0),
        };
        table.next_id += 1;
        table.insert(id, reservation);
        drop(table);
        if let (Some(journal), Some(seq)) = (journal, seq) {
            if let Err(error) = journal.wait(seq) {
                let mut table = self.reservations.inner.lock();
                // Nobody closed it: a settle or void waits for this event first, and expiry
                // too. Every later reservation's event failed with this one, so none of their
                // ids was handed out.
                let removed = table.remove_open(id.get());
                debug_assert!(
                    removed.is_some(),
                    "a reservation not yet durable was closed"
                );
                table.next_id = table.next_id.min(id.get() - 1);
                drop(table);
                self.give_back(
                    request.key,
                    request.resource,
                    &receipt,
                    &estimate,
                    true,
                    None,
                );
                self.release_slot(request.key);
                return Err(error);
            }
        }
        // Outside every lock.
        self.maybe_housekeep(1, || Some(at_ms));
        Ok(ReserveOutcome {
            decision,
            reservation: Some(id),
        })
    }

    /// The table again, its next id recorded as handed out (`ReservationInner::ids_through`),
    /// durably: an open hands out ids only after the record, so one acknowledged and then lost
    /// with its event is never handed out again. A block is recorded at a time, the next once
    /// half of one is left, and the flush runs with the table let go: settles, voids, expiry
    /// and a checkpoint's cut go on meanwhile, and so do reserves while ids are left (one
    /// recording, the others do not wait for it). Only a reserve with no recorded id left waits,
    /// and fails if the record does (nothing changed). The id after 2^64 - 2 is left to the
    /// caller to refuse.
    fn ids_recorded<'t>(
        &'t self,
        journal: &crate::log::EventLog,
        mut table: MutexGuard<'t, ReservationInner>,
    ) -> Result<MutexGuard<'t, ReservationInner>, Error> {
        loop {
            let Some(next) = table.next_id.checked_add(1).filter(|&id| id < u64::MAX) else {
                return Ok(table);
            };
            let left = table.ids_through.saturating_sub(table.next_id);
            let through = next
                .saturating_add(RESERVATION_IDS_PER_RECORD - 1)
                .min(u64::MAX - 1);
            if left > RESERVATION_IDS_PER_RECORD / 2 || through <= table.ids_through {
                return Ok(table);
            }
            let needed = left == 0;
            drop(table);
            let recording = if needed {
                Some(self.reservations.recording.lock())
            } else {
                // Another reserve is recording the next block: this one has an id meanwhile.
                self.reservations.recording.try_lock()
            };
            let recorded = match recording {
                Some(mut recorded) => {
                    // Never lower: another reserve may have recorded further meanwhile.
                    if *recorded < through {
                        match journal.record_reservation_ids_through(through) {
                            Ok(()) => *recorded = through,
                            Err(error) if needed => return Err(error),
                            // Ids are left: the next reserve tries again.
                            Err(_) => {}
                        }
                    }
                    *recorded
                }
                None => 0,
            };
            table = self.reservations.inner.lock();
            table.ids_through = table.ids_through.max(recorded);
            // Other reserves went on while the table was let go, and may have taken every id
            // recorded (this one's record ahead failed, or another was still flushing): then
            // this one waits for a record as a reserve with none left does.
            if !needed && table.ids_through > table.next_id {
                return Ok(table);
            }
        }
    }

    /// Charges the actual amount: less than the estimate gives the rest back; more is admitted
    /// like a consume (plan quota, then credits) only if it still fits, once the leases that
    /// ended by its time are expired (`EngineOptions::expire_leases_on_its_own`). Settling
    /// again with the same amounts returns the first settlement.
    pub fn settle(
        &self,
        id: ReservationId,
        actual: &[(Unit, u64)],
        at_ms: Option<u64>,
    ) -> Result<SettleOutcome, Error> {
        // The quantities' checks are shared with consume and reserve, which name them
        // `quantities`; here they are the `actual` argument.
        self.settle_named(id, actual, at_ms)
            .map_err(|error| error.naming("quantities", "actual"))
    }

    fn settle_named(
        &self,
        id: ReservationId,
        actual: &[(Unit, u64)],
        at_ms: Option<u64>,
    ) -> Result<SettleOutcome, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let actual = Quantities::new_allowing_none(actual)?;
        let mut table = self.lock_settled(id)?;
        table.forget_closed(self.now_ms(), self.reservations.horizon());
        if let Some((Closed::Settled(settlement), _)) = table.closed.get(&id.get()) {
            if settlement.actual == actual {
                return Ok(SettleOutcome::Settled(*settlement));
            }
        }
        let reservation = table.lookup(id.get())?.clone();
        if reservation.expires_at_ms <= at_ms {
            // This one's lease ended by the settle's stamp; the others' by the clock's now (as
            // `reserve` does: a settle stamped far ahead must not expire everyone's).
            self.expire_locked_with(&mut table, at_ms.min(self.now_ms()), Some(id.get()))?;
            return Err(Error::ReservationClosed {
                reservation: id.get(),
                state: "expired",
            });
        }
        let (extra, released) = actual.differences(&reservation.estimate);
        let whole = released == reservation.estimate;
        // What was given back of the unused estimate before the extra was decided, or with its
        // charge (below).
        let mut released_first = None;
        let extra_receipt = if extra.is_empty() {
            None
        } else {
            // The extra is decided like a consume, which an ended lease never denies nor sends
            // to credits: the leases ended by its time (and the clock's) are expired first.
            if self.options().expire_leases_on_its_own {
                self.expire_locked(&mut table, at_ms.min(self.now_ms()))?;
            }
            let charged = if !released.is_empty()
                && matches!(reservation.receipt.charged_to, ChargedTo::PlanQuota { .. })
            {
                // Some units used less and others more: on a meter weighing several units
                // (the usage bar) what the unused ones held makes room for the extra, so they
                // are given back first, or a settle the hold covers would be refused (or sent
                // to credits) on a full bar.
                let (decision, receipt, given) = self.release_then_charge_extra(
                    &reservation,
                    &actual,
                    &extra,
                    &released,
                    whole,
                    at_ms,
                )?;
                released_first = given.map(|given| (given, CreditsLater::default()));
                (decision, receipt)
            } else {
                // A credits hold trading units pays its extra with what it gives back of the
                // rest, in the same step (`charge_extra`): decided on the balance alone, a
                // settle the hold covers was refused when the balance beside it fell short.
                let released = (!released.is_empty()).then_some((&released, whole));
                let (decision, receipt, given) =
                    self.charge_extra(&reservation, &actual, &extra, released, at_ms)?;
                released_first = given;
                (decision, receipt)
            };
            match charged {
                (Decision::Admitted(_), receipt) => receipt,
                (Decision::Denied(denial), _) => {
                    return Ok(SettleOutcome::Denied(Box::new(denial)))
                }
            }
        };
        #[cfg(test)]
        tests::AFTER_EXTRA_CHARGE.with(|pause| {
            if let Some(pause) = pause.borrow().as_ref() {
                pause();
            }
        });
        // Where the estimate was held, as the policy in force names it (the hold's receipt
        // numbers its plan as the policy it was reserved under did; a swap since may have
        // renumbered them). The table's lock keeps the policy from changing meanwhile.
        let policy = self.policy();
        let held = match self.policy_lineage(reservation.receipt.generation).0 {
            Some(then) if then.generation != policy.generation => {
                reservation.receipt.charged_to.in_policy(&then, &policy)
            }
            _ => reservation.receipt.charged_to,
        };
        let settlement = Settlement {
            reservation: id,
            held,
            extra: extra_receipt.map(|receipt| receipt.charged_to),
            released,
            actual,
        };
        let end = ReservationEnd::Settled {
            settlement,
            extra: extra_receipt.map(Box::new),
        };
        let extra = extra_receipt.map(|receipt| (receipt, extra));
        let closing = self.begin_close_given(
            &mut table,
            id,
            reservation,
            &released,
            released_first,
            extra,
            end,
            at_ms,
        )?;
        drop(table);
        self.finish_close(closing, None)?;
        Ok(SettleOutcome::Settled(settlement))
    }

    /// Gives back `released` of a plan-quota hold, then charges `extra` as `charge_extra`
    /// does, with the key's shard write-locked throughout: no admission on the key takes the
    /// room the give-back made before the extra is decided, so a denied extra takes the
    /// give-back again exactly (and within the limits it was held under). Returns the extra's
    /// decision and receipt, and what was given back (`None` if the extra was denied).
    fn release_then_charge_extra(
        &self,
        reservation: &Reservation,
        actual: &Quantities,
        extra: &Quantities,
        released: &Quantities,
        whole: bool,
        at_ms: u64,
    ) -> Result<(Decision, Option<Receipt>, Option<GivenBack>), Error> {
        let (then, later) = self.policy_lineage(reservation.receipt.generation);
        self.keys.write(&reservation.key, |policy, state| {
            let state = state.ok_or_else(|| Error::UnknownKey {
                key: reservation.key.to_string(),
            })?;
            let state = &*state;
            let resource = resolve_resource(policy, &reservation.resource, actual)?;
            if let Some(reason) = over_maximums(policy, state, resource, actual) {
                return Ok((Decision::denied(reason), None, None));
            }
            // A plan-quota hold: units only, no credits to pay after the append.
            let given = crate::adjustment::give_back_in(
                then.as_deref().map(|then| (then, &later[..])),
                policy,
                state,
                &reservation.resource,
                &reservation.receipt,
                released,
                whole,
                Some(at_ms),
                CreditsBack::Now,
                None,
            );
            match decide_for_key(policy, state, resource, extra, at_ms, Mode::Consume) {
                Ok((decision @ Decision::Admitted(_), receipt)) => {
                    Ok((decision, receipt, Some(given)))
                }
                other => {
                    // Under the same write lock: the policy is the one `given` names.
                    crate::adjustment::retake_in(policy, &[], policy, state, &given, None);
                    other.map(|(decision, receipt)| (decision, receipt, None))
                }
            }
        })
    }

    /// Charges what `actual` takes beyond the estimate (`extra`) like a consume. The units
    /// and the per-request maximums are checked on the whole `actual` amount: an overrun is
    /// often of one unit alone (a chat call's tokens, without its one request), which no
    /// request of its own could carry, and a song's seconds are bounded in total.
    ///
    /// With `released` (the settle also gives back part of the estimate, `whole` as in
    /// `give_back_in`), an extra of a credits hold that the balance alone cannot pay is paid
    /// with the balance and what the hold gives back together (`pay_extra_with_the_hold`).
    /// Returns the extra's decision and receipt, and what was given back with it, if it was
    /// (with the credits still to move once the close is appended).
    #[allow(clippy::type_complexity)]
    fn charge_extra(
        &self,
        reservation: &Reservation,
        actual: &Quantities,
        extra: &Quantities,
        released: Option<(&Quantities, bool)>,
        at_ms: u64,
    ) -> Result<(Decision, Option<Receipt>, Option<(GivenBack, CreditsLater)>), Error> {
        // The hold's policy, looked up outside the key's shard lock (the policy list is
        // locked before the shards, never after).
        let then = match (released, reservation.receipt.charged_to) {
            (Some(_), ChargedTo::Credits { .. }) => {
                Some(self.policy_lineage(reservation.receipt.generation).0)
            }
            _ => None,
        };
        self.keys.read(&reservation.key, |policy, state| {
            let resource = resolve_resource(policy, &reservation.resource, actual)?;
            let state = state.ok_or_else(|| Error::UnknownKey {
                key: reservation.key.to_string(),
            })?;
            if state.revoked {
                // Before the credits paths below, which charge the team without deciding as a
                // consume would (`decide_extra`'s overrun, `pay_extra_with_the_hold`): a
                // revoked key settles within its hold, never beyond it.
                return Ok((Decision::denied(DenialReason::KeyRevoked), None, None));
            }
            if let Some(reason) = over_maximums(policy, state, resource, actual) {
                return Ok((Decision::denied(reason), None, None));
            }
            let (decision, receipt) =
                decide_extra(policy, state, resource, reservation, extra, at_ms)?;
            let (decision, receipt, given) = match (decision, then, released) {
                (Decision::Denied(denial), Some(then), Some((released, whole))) => {
                    let back = crate::adjustment::charge_given_back(
                        then.as_deref(),
                        &reservation.resource,
                        &reservation.receipt,
                        released,
                        whole,
                    );
                    pay_extra_with_the_hold(policy, state, resource, extra, back, denial, at_ms)?
                }
                (decision, ..) => (decision, receipt, None),
            };
            let (decision, receipt) = credits_hold_short(
                policy,
                state,
                resource,
                reservation,
                extra,
                (decision, receipt),
                at_ms,
            )?;
            Ok((decision, receipt, given))
        })
    }

    /// Frees everything a reservation holds. Voiding again is a no-op.
    pub fn void(&self, id: ReservationId, at_ms: Option<u64>) -> Result<(), Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let mut table = self.lock_settled(id)?;
        table.forget_closed(self.now_ms(), self.reservations.horizon());
        if matches!(
            table.closed.get(&id.get()),
            Some((Closed::Voided | Closed::Expired, _))
        ) {
            return Ok(());
        }
        let reservation = table.lookup(id.get())?.clone();
        let estimate = reservation.estimate;
        let closing = self.begin_close(
            &mut table,
            id,
            reservation,
            &estimate,
            None,
            ReservationEnd::Voided,
            at_ms,
        )?;
        drop(table);
        self.finish_close(closing, None)
    }

    /// The table, locked once the latest event about `id` is durable (waiting for it with the
    /// lock let go), or the log's error if it never will be.
    fn lock_settled(&self, id: ReservationId) -> Result<MutexGuard<'_, ReservationInner>, Error> {
        loop {
            let table = self.reservations.inner.lock();
            let pending = table.pending_seq(id.get());
            match (self.journal(), pending) {
                (Some(journal), Some(seq)) if !journal.is_settled(seq) => {
                    drop(table);
                    journal.wait(seq)?;
                }
                _ => return Ok(table),
            }
        }
    }

    /// Closes `reservation` under the table's lock: gives back `released` (a settle's unused
    /// estimate, or all of it), appends the closing event and moves the reservation to the
    /// closed ones. Its key's reservation slot stays taken until the event is durable
    /// (`finish_close`). An append that fails is undone here.
    #[allow(clippy::too_many_arguments)]
    fn begin_close(
        &self,
        table: &mut ReservationInner,
        id: ReservationId,
        reservation: Reservation,
        released: &Quantities,
        extra: Option<(Receipt, Quantities)>,
        end: ReservationEnd,
        at_ms: u64,
    ) -> Result<Closing, Error> {
        self.begin_close_given(table, id, reservation, released, None, extra, end, at_ms)
    }

    /// `begin_close`, where `given` is what was already given back of `released` (by
    /// `release_then_charge_extra` or `charge_extra`), if it was, with the credits still to
    /// move.
    ///
    /// The credits a close gives back reach the team only once its event is appended
    /// (`CreditsLater`): a request they pay for comes after the close in the log.
    #[allow(clippy::too_many_arguments)]
    fn begin_close_given(
        &self,
        table: &mut ReservationInner,
        id: ReservationId,
        reservation: Reservation,
        released: &Quantities,
        given: Option<(GivenBack, CreditsLater)>,
        extra: Option<(Receipt, Quantities)>,
        end: ReservationEnd,
        at_ms: u64,
    ) -> Result<Closing, Error> {
        let closed = Closed::from(&end);
        let (given_back, later) = given.unwrap_or_else(|| {
            let given = self.give_back_before_append(
                &reservation.key,
                &reservation.resource,
                &reservation.receipt,
                released,
                *released == reservation.estimate,
                Some(at_ms),
            );
            let later = CreditsLater {
                given: given.credits_micros,
                price: 0,
            };
            (given, later)
        });
        let mut closing = Closing {
            id,
            reservation,
            given_back,
            extra,
            later,
            seq: 0,
        };
        if let Some(journal) = self.journal() {
            journal.hold_give_back();
            let body = EventBody::ReservationClosed {
                reservation: id.get(),
                key: closing.reservation.key.to_string(),
                end,
                given_back: closing.given_back.clone(),
            };
            match journal.append(at_ms, encode_body(&body)) {
                Ok(seq) => closing.seq = seq,
                Err(error) => {
                    self.undo_close(&closing);
                    return Err(error);
                }
            }
            self.note_event_time(at_ms);
        }
        self.pay_later(&closing.reservation.key, closing.later);
        closing.later = CreditsLater::default();
        table.remove_open(id.get());
        table.close(id.get(), closed, at_ms, closing.seq);
        Ok(closing)
    }

    /// Waits for a close's event; then its key's reservation slot is free. If the event never
    /// becomes durable, the reservation is open again as before and the error returned. With
    /// `table` (the lock still held) the undo uses it; otherwise it takes the lock.
    fn finish_close(
        &self,
        closing: Closing,
        table: Option<&mut ReservationInner>,
    ) -> Result<(), Error> {
        let waited = match self.journal() {
            Some(journal) if closing.seq != 0 => journal.wait(closing.seq),
            _ => Ok(()),
        };
        if let Err(error) = waited {
            let mut reservation = closing.reservation.clone();
            reservation.opened_seq = 0;
            match table {
                Some(table) => table.reopen(closing.id, reservation),
                None => self
                    .reservations
                    .inner
                    .lock()
                    .reopen(closing.id, reservation),
            }
            self.undo_close(&closing);
            return Err(error);
        }
        self.release_slot(&closing.reservation.key);
        Ok(())
    }

    /// Gives back what a close charged beyond the estimate, then takes back what it gave back:
    /// in that order, as the inverse of a settle that paid its extra with what its credits
    /// hold gave back (`refund_and_charge`): the balance then holds the give-back less the
    /// extra's price, so taking the give-back first (`force_charge`) would take more than the
    /// balance may hold, a debt (`Team::debt_micros`) for the extra's give-back to pay: this
    /// order needs none.
    ///
    /// Credits not yet moved (`Closing::later`: the append failed) are left out: the ones given
    /// back, and an extra paid with them (a credits receipt, nothing else to give back).
    fn undo_close(&self, closing: &Closing) {
        let reservation = &closing.reservation;
        if let Some((receipt, extra)) = &closing.extra {
            if closing.later.price == 0 {
                self.give_back(
                    &reservation.key,
                    &reservation.resource,
                    receipt,
                    extra,
                    true,
                    None,
                );
            }
        }
        let moved = closing.later.moved_before_append(&closing.given_back);
        self.take_back(&reservation.key, &moved);
    }

    /// Expires every reservation whose lease ended at or before `at_ms`, freeing what it held;
    /// returns how many. Also runs on every `reserve`, and from the admission path once a lease
    /// has ended (`EngineOptions::expire_leases_on_its_own`).
    pub fn expire_reservations(&self, at_ms: Option<u64>) -> Result<usize, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let mut table = self.reservations.inner.lock();
        self.expire_locked(&mut table, at_ms)
    }

    /// Closes every overdue reservation, then waits for their events: appended one after the
    /// other, they share one flush (waited for one by one, each close cost an fdatasync of
    /// its own, under the table's lock: a thousand reservations of a crashed gateway held every
    /// reserve, settle and void for a thousand flushes).
    pub(crate) fn expire_locked(
        &self,
        table: &mut ReservationInner,
        at_ms: u64,
    ) -> Result<usize, Error> {
        self.expire_locked_with(table, at_ms, None)
    }

    /// `expire_locked`, also expiring reservation `also` (one whose lease a call's own stamp
    /// says has ended) if it is still open.
    fn expire_locked_with(
        &self,
        table: &mut ReservationInner,
        at_ms: u64,
        also: Option<u64>,
    ) -> Result<usize, Error> {
        table.forget_closed(self.now_ms(), self.reservations.horizon());
        let mut overdue = table.overdue(at_ms);
        if let Some(also) = also {
            if table.open.contains_key(&also) && !overdue.contains(&also) {
                overdue.push(also);
            }
        }
        if let Some(journal) = self.journal() {
            // Their reserves may still wait for their own events (a lease shorter than a flush).
            let opened = overdue
                .iter()
                .filter_map(|id| table.open.get(id))
                .map(|reservation| reservation.opened_seq)
                .max();
            if let Some(seq @ 1..) = opened {
                journal.wait(seq)?;
            }
        }
        let mut closings = Vec::with_capacity(overdue.len());
        let mut failure = None;
        for id in &overdue {
            let Some(reservation) = table.open.get(id).cloned() else {
                continue;
            };
            let id = ReservationId(NonZeroU64::new(*id).unwrap_or(NonZeroU64::MIN));
            let estimate = reservation.estimate;
            match self.begin_close(
                table,
                id,
                reservation,
                &estimate,
                None,
                ReservationEnd::Expired,
                at_ms,
            ) {
                Ok(closing) => closings.push(closing),
                // Undone already; the ones begun are finished (or undone) below.
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        // The first wait flushes every close appended above; the others return at once.
        for closing in closings {
            if let Err(error) = self.finish_close(closing, Some(&mut *table)) {
                failure.get_or_insert(error);
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(overdue.len()),
        }
    }

    pub(crate) fn release_slot(&self, key: &str) {
        self.keys.read(key, |_, state| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Engine, ManualClock, OpenOptions, Policy, UsageRequest};

    thread_local! {
        /// Run by a settle on this thread between charging its extra and closing (a test's
        /// window for a racing seat change).
        pub(super) static AFTER_EXTRA_CHARGE: std::cell::RefCell<Option<Box<dyn Fn()>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// Settles a Plus key's one-request reservation for two (an extra beyond the hold) while
    /// `race` runs on another thread from just after the extra is charged, given 300 ms to
    /// log whatever nothing holds back; returns the sequence numbers of the reservation's
    /// close and of the last `racer_kind` event.
    fn settle_racing(
        label: &str,
        racer_kind: &str,
        race: impl Fn(&Engine) + Send + Sync + 'static,
    ) -> (u64, u64) {
        const T0: u64 = 1_790_000_000_000;
        let dir = std::env::temp_dir().join(format!("tally-settle-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let clock = Arc::new(ManualClock::new(T0));
        let engine = Arc::new(
            Engine::open(&dir, Policy::token_plan(), clock, OpenOptions::default()).expect("open"),
        );
        engine.create_user("u", "tp-u", Some(T0)).expect("user");
        engine
            .assign_seat("@u", "u", "Plus", Some(T0))
            .expect("seat");
        let one = [(Unit::Requests, 1)];
        let request = UsageRequest::new("tp-u", "m2.7", &one).at(T0);
        let reserved = engine.reserve(&request, None).expect("reserve");
        let id = reserved.reservation.expect("admitted");
        let racer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
        let race = Arc::new(race);
        {
            let (engine, racer) = (Arc::clone(&engine), Arc::clone(&racer));
            AFTER_EXTRA_CHARGE.with(|pause| {
                *pause.borrow_mut() = Some(Box::new(move || {
                    let (engine, race) = (Arc::clone(&engine), Arc::clone(&race));
                    *racer.lock() = Some(std::thread::spawn(move || race(&engine)));
                    // Long enough for the racer's event to be logged, if nothing holds it back.
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }));
            });
        }
        let settled = engine.settle(id, &[(Unit::Requests, 2)], Some(T0));
        AFTER_EXTRA_CHARGE.with(|pause| pause.borrow_mut().take());
        assert!(
            matches!(settled, Ok(SettleOutcome::Settled(_))),
            "{settled:?}"
        );
        racer
            .lock()
            .take()
            .expect("raced")
            .join()
            .expect(racer_kind);
        let events = engine.events_after(0, 100).expect("events");
        let last_seq_of = |kind: &str| {
            events
                .iter()
                .rev()
                .find(|event| event.body.kind() == kind)
                .map(|event| event.seq)
                .expect(kind)
        };
        let seqs = (last_seq_of("reservation_closed"), last_seq_of(racer_kind));
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
        seqs
    }

    /// A seat change racing a settle that charges more than the estimate: the extra is
    /// decided on the old seat, so its event must come before the seat change's in the log, as
    /// a consume's does (appended under its key's lock). Before, the settle appended its close
    /// after letting the key go, and the seat change could land in between: a replay then
    /// applied the extra after the seat change, and found no counter for it when the key had
    /// none of the old plan's left.
    #[test]
    fn a_seat_change_racing_a_settles_extra_charge_is_logged_after_it() {
        let (closed, seat) = settle_racing("seat", "seat_changed", |engine| {
            engine
                .assign_seat("@u", "u", "Max", Some(1_790_000_000_000))
                .expect("upgrade");
        });
        assert!(
            closed < seat,
            "the close ({closed}) after the seat change ({seat})"
        );
    }

    /// A revocation racing a settle that charges more than the estimate: the extra was
    /// decided before the key was revoked, so its close comes before the revocation in the
    /// log. Before, the revocation could land between the extra's decision and its close's
    /// append, and the log showed an extra charged to a key after its `key_revoked`.
    #[test]
    fn a_revocation_racing_a_settles_extra_charge_is_logged_after_it() {
        let (closed, revoked) = settle_racing("revoke", "key_revoked", |engine| {
            assert_eq!(engine.revoke_key("tp-u", Some(1_790_000_000_000)), Ok(true));
        });
        assert!(
            closed < revoked,
            "the close ({closed}) after the revocation ({revoked})"
        );
    }

    /// `forget_closed` forgets from the front while the front is older than the horizon, so
    /// the closes must stay in time order whatever order they come in: a snapshot lists them
    /// by id, and a racing request can close with an older timestamp than the one before.
    #[test]
    fn closed_reservations_are_forgotten_by_closing_time_whatever_order_they_were_closed_in() {
        let mut table = ReservationInner::new(10);
        // Closed in the order a restore by id would close them: 1 late, 2 early, 3 later.
        table.close(1, Closed::Expired, 5_000, 0);
        table.close(2, Closed::Voided, 1_000, 0);
        table.close(3, Closed::Voided, 9_000, 0);
        table.close(4, Closed::Expired, 5_000, 0);
        assert_eq!(
            Vec::from(table.closed_order.clone()),
            [(1_000, 2), (5_000, 1), (5_000, 4), (9_000, 3)]
        );
        // A horizon of 4,000 at 6,000 keeps what closed at 2,000 or later.
        table.forget_closed(6_000, 4_000);
        assert!(!table.closed.contains_key(&2));
        assert!(table.closed.contains_key(&1) && table.closed.contains_key(&4));
        table.forget_closed(9_500, 4_000);
        assert_eq!(table.closed.keys().copied().collect::<Vec<_>>(), [3]);
        assert_eq!(Vec::from(table.closed_order.clone()), [(9_000, 3)]);
    }
}
