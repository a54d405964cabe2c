//! Adjustments: refunds and corrections of recorded usage, each its own operation, never an edit.
//!
//! A refund gives back what an admitted request moved (its receipt): units in windows that are
//! still live, micro-credits to the team, pay-as-you-go spend. A usage correction adds usage that
//! really happened but was not counted, or removes usage counted by mistake, at the time it
//! happened. The same machinery frees what a reservation held. Every give-back returns exactly
//! what it moved (`GivenBack`), which is what the log records and what an undo reverses.

use std::sync::Arc;

use crate::accounts::{KeyState, KeyTable};
use crate::admission::{price_micros, Amounts, ChargedTo, Quantities, Receipt};
use crate::engine::{check_id, resolve_resource, AdjustmentDirection, Engine, MemoryStats};
use crate::error::Error;
use crate::event::{EventBody, GivenBack};
use crate::idempotency::LoggedAs;
use crate::ledger::{KeyUsage, WindowState};
use crate::policy::{CounterId, Policy, ResourceId, Unit, Window};

/// The error for a correction that no limit of the key's plan counts: the plan does not limit
/// `resource` at all (`uncounted_resource`), or its limits on it count none of the units given.
fn nothing_to_correct(plan: &str, resource: &str, uncounted_resource: bool) -> Error {
    if uncounted_resource {
        Error::invalid(
            "resource",
            format!("plan {plan:?} does not limit {resource:?}: a correction would move nothing"),
        )
    } else {
        Error::invalid(
            "quantities",
            format!(
                "plan {plan:?} limits {resource:?} by none of these units: a correction would move nothing"
            ),
        )
    }
}

/// What a refund gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub charged_to: ChargedTo,
    /// Exactly what was given back: window units per counter, micro-credits, pay-as-you-go.
    pub given_back: GivenBack,
}

/// Per limit of the key's plan the adjustment touched, how much it moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustmentOutcome {
    pub limits: Vec<AdjustedLimit>,
}

/// One limit an adjustment touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustedLimit {
    /// Index into the plan's `limits`.
    pub index: u8,
    pub name: String,
    /// Units added, or removed (at most what still counted).
    pub moved: u64,
}

/// When the credits a give-back returns reach the team's balance (`give_back_in`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreditsBack {
    /// At once: an undo of an effect whose event could not be logged (the log has failed:
    /// no later event becomes durable either), or a give-back of units alone.
    Now,
    /// Once the give-back's event is appended (`CreditsLater`).
    Later,
}

/// Credits a give-back (a refund, or a reservation's close) returns to the team, paid only once
/// its event is appended (`Engine::pay_later`). Any request that spends them is then decided
/// after that append, so its event comes after the give-back's in the log: it is durable only
/// if the give-back is, and a replay applies the give-back first. Paid before the append, they
/// could be spent by a request logged (and made durable) ahead of it; a failed write of the
/// give-back then left the log holding a charge no logged credit paid for, and the database
/// refused to open ("the log's credits sum to a negative balance").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CreditsLater {
    /// Micro-credits given back (the event's `GivenBack::credits_micros`).
    pub given: u64,
    /// What a settle's extra, paid with them, costs (at most `given`), taken in the same step.
    pub price: u64,
}

/// What an undo after a failed log could not take off a counter, noted for the undo of the
/// removal that had taken it to pay (`Engine::undo_debts`): units a consume (a hold, a
/// correction) added, which a refund (a close, a correction) not yet durable took, cannot be
/// taken off again by the addition's undo (the counter no longer holds them); the removal's
/// undo, if it comes after, then gives back only what is not owed. Without it the removal's
/// undo put them back in full, and the counter ended counting units no logged event counts.
#[derive(Clone, Copy)]
pub(crate) struct Undo<'a> {
    debts: &'a parking_lot::Mutex<crate::recovery::Debts>,
    /// Held through each undo's counter moves (`Engine::undo_serial`).
    serial: &'a parking_lot::Mutex<()>,
    key: &'a str,
}

impl<'a> Undo<'a> {
    /// Holds off every other undo until the guard is dropped: an undo's move of a counter and
    /// the debt or surplus it notes are one step to the others. Two failed calls' undos run at
    /// once (both wake on the same failed flush); an addition's undo that had taken what it
    /// could but not yet noted the rest let a removal's undo, run in between, find no debt
    /// and put its units back in full. Undos run only after the log failed: never contended
    /// on the hot path.
    fn serialized(&self) -> parking_lot::MutexGuard<'a, ()> {
        self.serial.lock()
    }

    /// Notes `short` units an undo could not take off `counter` at `time`.
    fn owe(&self, counter: CounterId, time: u64, short: u64) {
        if short > 0 {
            self.debts.lock().add(self.key, counter, time, short);
        }
    }

    /// Puts `amount` units back on `counter` at `time` (the undo of a removal): what undos
    /// of additions owe first, and what does not fit a full bucket is noted as a surplus for
    /// the undo of the addition that filled it.
    fn put_back(
        &self,
        policy: &Policy,
        state: &WindowState,
        counter: CounterId,
        time: u64,
        amount: u64,
    ) {
        let owed = self.debts.lock().take(self.key, counter, time, amount);
        if amount > owed {
            let (_, over) = force_fitting(policy, state, counter, time, amount - owed);
            self.debts.lock().add_surplus(self.key, counter, time, over);
        }
    }

    /// Of `amount` units an undo of an addition would take off `counter` at `time`, those a
    /// removal's undo could not put back (a full bucket), taken instead.
    fn take_surplus(&self, counter: CounterId, time: u64, amount: u64) -> u64 {
        self.debts
            .lock()
            .take_surplus(self.key, counter, time, amount)
    }
}

/// A test's pause at an undo's step (`UNDO_PAUSE`).
#[cfg(test)]
type UndoPause = Box<dyn Fn(&'static str)>;

#[cfg(test)]
thread_local! {
    /// Run on this thread at an undo's step ("owe": an addition's undo between taking its units
    /// off and noting what it could not): a test's window for another thread's undo.
    pub(crate) static UNDO_PAUSE: std::cell::RefCell<Option<UndoPause>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
fn undo_pause(step: &'static str) {
    UNDO_PAUSE.with(|pause| {
        if let Some(pause) = pause.borrow().as_ref() {
            pause(step);
        }
    });
}

#[cfg(not(test))]
fn undo_pause(_: &'static str) {}

impl Engine {
    /// The undo of an effect on `key` whose event could not be logged.
    pub(crate) fn undo<'a>(&'a self, key: &'a str) -> Undo<'a> {
        Undo {
            debts: &self.undo_debts,
            serial: &self.undo_serial,
            key,
        }
    }
}

impl CreditsLater {
    /// What `given` moved before its append: all of it but these credits (an undo then takes
    /// back only that).
    pub(crate) fn moved_before_append(&self, given: &GivenBack) -> GivenBack {
        GivenBack {
            credits_micros: given.credits_micros - self.given,
            ..given.clone()
        }
    }
}

impl Engine {
    /// Refunds a request admitted with `request_id`, in full. Refunding twice is an error. An
    /// id is remembered until the idempotency horizon after its request's timestamp, by the
    /// engine's clock (not `at_ms`), as for a repeat: past it, the id is forgotten and its
    /// refund is `UnknownRequest`, as for an id never used, whether or not the table has dropped
    /// it yet, and alike after a reopen.
    /// Credits and pay-as-you-go spend come back whole; plan usage comes back only where it
    /// still counts at `at_ms`: units aged out of a rolling window, or counted on a day (week,
    /// month) that has since ended, no longer hold anything back and are not given back.
    /// Plan usage charged under a policy generation no longer kept (`max_policy_generations`
    /// swaps since) cannot be found: that refund is refused (`InvalidArgument` naming
    /// `request_id`) and changes nothing.
    pub fn refund(&self, request_id: &str, at_ms: Option<u64>) -> Result<Refund, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        check_id(
            "request_id",
            request_id,
            crate::idempotency::MAX_REQUEST_ID_BYTES,
        )?;
        // The first decision's event is waited for first (after letting go of the id's shard,
        // as a repeat does): one staged in a `consume_many` chunk not yet appended would come
        // after the refund's in the log, and a replay would apply the refund before the usage
        // it gives back and restore the id unrefunded. A record staged after that first look
        // (the id's first decision made meanwhile) is waited for in turn.
        // Whether the id is remembered is by the clock, as for a repeat (`Shard::remembered`).
        let now_ms = self.now_ms();
        loop {
            let logged = self
                .requests
                .with_remembered(request_id, now_ms, |record| {
                    Ok(record.map(|record| record.logged.clone()))
                })?;
            if let Some(logged) = logged {
                self.await_first_decision(&logged)?;
            }
            if let Some(refund) = self.refund_logged(request_id, (at_ms, now_ms))? {
                return Ok(refund);
            }
        }
    }

    /// `refund` once the first decision's event is appended; `None` (nothing done) if the
    /// record is staged in a `consume_many` chunk not yet appended.
    fn refund_logged(
        &self,
        request_id: &str,
        (at_ms, now_ms): (u64, u64),
    ) -> Result<Option<Refund>, Error> {
        self.requests.with_remembered(request_id, now_ms, |record| {
            let record = record.ok_or_else(|| Error::UnknownRequest {
                request_id: request_id.into(),
                horizon_ms: self.requests.horizon_ms(),
            })?;
            if matches!(&record.logged, LoggedAs::Chunk(chunk) if chunk.get().is_none()) {
                return Ok(None);
            }
            if record.refunded {
                return Err(Error::invalid(
                    "request_id",
                    format!("{request_id:?} was already refunded"),
                ));
            }
            let first = record.first_use();
            let receipt = first.receipt.ok_or_else(|| {
                Error::invalid(
                    "request_id",
                    format!("{request_id:?} was denied: nothing to refund"),
                )
            })?;
            if matches!(receipt.charged_to, ChargedTo::PlanQuota { .. })
                && self.policy_lineage(receipt.generation).0.is_none()
            {
                // Its counters are named by a generation no longer kept: the units it took
                // still count (swaps carried them) but cannot be found. Refused, not marked
                // refunded with nothing given back.
                return Err(Error::invalid(
                    "request_id",
                    format!(
                        "{request_id:?} was charged to plan quota under policy generation {}, \
                         no longer kept (more than max_policy_generations swaps since): its \
                         usage cannot be found to give back; correct it with adjust_usage",
                        receipt.generation
                    ),
                ));
            }
            let fingerprint = first.fingerprint;
            // Write-locked, as a usage correction is: a calendar counter holds an admission's
            // units in flight in the same word as those recorded, and a refund that finds
            // fewer recorded than its receipt took (a correction removed some) took the
            // in-flight ones as its own under the read lock.
            // Its credits reach the team only once its event is appended (`CreditsLater`).
            let given_back = self.give_back_locked(
                true,
                fingerprint.key,
                fingerprint.resource,
                &receipt,
                &fingerprint.quantities,
                true,
                Some(at_ms),
                CreditsBack::Later,
            );
            let later = CreditsLater {
                given: given_back.credits_micros,
                price: 0,
            };
            if let Some(journal) = self.journal() {
                journal.hold_give_back();
            }
            let body = EventBody::Refunded {
                request_id: request_id.into(),
                key: fingerprint.key.to_string(),
                given_back: given_back.clone(),
            };
            let seq = match self.append_event(at_ms, body) {
                Ok(seq) => seq,
                Err(error) => {
                    self.take_back(fingerprint.key, &later.moved_before_append(&given_back));
                    return Err(error);
                }
            };
            self.pay_later(fingerprint.key, later);
            if let Err(error) = self.wait_event(seq) {
                self.take_back(fingerprint.key, &given_back);
                return Err(error);
            }
            record.refunded = true;
            Ok(Some(Refund {
                charged_to: receipt.charged_to,
                given_back,
            }))
        })
    }

    /// Gives back `quantities` (at most what the receipt moved), locking the key's shard.
    /// `whole` and `as_of_ms` as in `give_back_in`; credits at once (an undo's give-back).
    pub(crate) fn give_back(
        &self,
        key: &str,
        resource: &str,
        receipt: &Receipt,
        quantities: &Quantities,
        whole: bool,
        as_of_ms: Option<u64>,
    ) -> GivenBack {
        self.give_back_locked(
            false,
            key,
            resource,
            receipt,
            quantities,
            whole,
            as_of_ms,
            CreditsBack::Now,
        )
    }

    /// `give_back`, but the credits it gives back are only worked out, not added to the
    /// team's balance (`CreditsLater`): for a close, which appends its event next.
    pub(crate) fn give_back_before_append(
        &self,
        key: &str,
        resource: &str,
        receipt: &Receipt,
        quantities: &Quantities,
        whole: bool,
        as_of_ms: Option<u64>,
    ) -> GivenBack {
        self.give_back_locked(
            false,
            key,
            resource,
            receipt,
            quantities,
            whole,
            as_of_ms,
            CreditsBack::Later,
        )
    }

    /// Pays the team of `key` what a give-back left for after its event's append
    /// (`CreditsLater`), once that event is appended (or at once without a log).
    pub(crate) fn pay_later(&self, key: &str, later: CreditsLater) {
        if later == CreditsLater::default() {
            return;
        }
        self.keys.read(key, |_, state| {
            if let Some(state) = state {
                // Net credits (`given >= price`): refused only past `u64::MAX`, which a balance
                // plus what was charged to it never reaches (`MAX_CREDITS_MICROS`), and
                // `give_back_in` checked the balance had room for them.
                let paid = state.team.refund_and_charge(later.given, later.price);
                debug_assert!(paid.is_ok(), "credits given back overflow the balance");
            }
        });
    }

    /// `give_back`, with the key's shard write-locked if `exclusive` or if the receipt holds
    /// units in a calendar period a correction left short (no admission in flight on the key
    /// meanwhile), else read-locked; credits as `credits` says.
    #[allow(clippy::too_many_arguments)]
    fn give_back_locked(
        &self,
        exclusive: bool,
        key: &str,
        resource: &str,
        receipt: &Receipt,
        quantities: &Quantities,
        whole: bool,
        as_of_ms: Option<u64>,
        credits: CreditsBack,
    ) -> GivenBack {
        let (then, later) = self.policy_lineage(receipt.generation);
        let give = |policy: &Policy, state: Option<&KeyState>| match state {
            Some(state) => give_back_in(
                then.as_deref().map(|then| (then, &later[..])),
                policy,
                state,
                resource,
                receipt,
                quantities,
                whole,
                as_of_ms,
                credits,
                // Without a time, an undo (`give_back`).
                as_of_ms.is_none().then(|| self.undo(key)),
            ),
            _ => GivenBack {
                generation: policy.generation,
                ..GivenBack::default()
            },
        };
        if !exclusive {
            // The read lock, unless a hold is in a calendar period a correction left short
            // (`KeyState::short_until_ms`): there the counter may record fewer units than
            // the hold, and what makes up the difference in its word are units a concurrent
            // admission holds in flight (taken on an earlier limit, rolled back if a later
            // one refuses), which a give-back under the read lock would take as its own.
            // The mark is only written under the write lock, so it stands while this read
            // lock is held: a hold found clear of it is given back under the same hold of the
            // lock. A hold found in a short period goes to the write lock below, nothing
            // moved yet. Keys no correction removed from (nearly all) read one field.
            let given = self.keys.read(key, |policy, state| match state {
                Some(state)
                    if state.short_until_ms > 0
                        && holds_in_short_period(then.as_deref(), receipt, state) =>
                {
                    None
                }
                _ => Some(give(policy, state)),
            });
            if let Some(given) = given {
                return given;
            }
        }
        self.keys.write(key, |policy, state| {
            give(policy, state.map(|state| &*state))
        })
    }

    /// Marks, once an open has restored and replayed everything, each key with a calendar
    /// period that records fewer units than the outstanding receipts naming it hold (open
    /// reservations, request ids not refunded): a correction took some of theirs before the
    /// engine closed, and the snapshot the open restored was of a format (2 or 3) that does
    /// not keep `KeyState::short_until_ms`.
    /// A period found whole stays whole until a correction removes from it (which marks it
    /// then): every other change adds to a counter what it adds to a receipt, gives back at
    /// most what it takes off a receipt, or adds alone. Called before the engine is shared.
    pub(crate) fn mark_short_periods(&self) {
        let policies = self.policies.read().clone();
        // The receipt's generation, if kept, and whether it holds units on a calendar counter:
        // only those can be short.
        let calendar_holds = |receipt: &Receipt| {
            matches!(receipt.charged_to, ChargedTo::PlanQuota { .. })
                && policies
                    .get(receipt.generation as usize)
                    .and_then(Option::as_deref)
                    .is_some_and(|then| {
                        receipt.holds.as_slice().iter().any(|&(counter, _, _)| {
                            matches!(then.counter(counter).window, Window::Calendar(_))
                        })
                    })
        };
        // Lock order: the reservation table, the request-id shards, then key shards.
        let table = self.reservations.inner.lock();
        let requests = self.requests.lock_all();
        // (the key's hash, the key, a receipt), grouped by key below.
        let mut outstanding: Vec<(u64, &str, Receipt)> = Vec::new();
        for reservation in table.open.values() {
            if calendar_holds(&reservation.receipt) {
                let key = &*reservation.key;
                outstanding.push((KeyTable::hash(key), key, reservation.receipt));
            }
        }
        for shard in &requests {
            crate::idempotency::RequestTable::outstanding_receipts(shard, |key, receipt| {
                if calendar_holds(&receipt) {
                    outstanding.push((KeyTable::hash(key), key, receipt));
                }
            });
        }
        outstanding.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        // Each generation's lineage once (nearly every receipt shares one or two).
        let mut generations: Vec<u32> = outstanding.iter().map(|r| r.2.generation).collect();
        generations.sort_unstable();
        generations.dedup();
        let lineages: Vec<_> = generations
            .iter()
            .map(|&generation| self.policy_lineage(generation))
            .collect();
        let mut periods: Vec<PeriodHolds> = Vec::new();
        for receipts in outstanding.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (hash, key, _) = receipts[0];
            let short_until_ms = self.keys.read_hashed(hash, key, true, |policy, state| {
                let usage = state.and_then(|state| state.usage.get());
                periods.clear();
                let mut short_until_ms = 0;
                for (_, _, receipt) in receipts {
                    let Ok(index) = generations.binary_search(&receipt.generation) else {
                        continue;
                    };
                    let (Some(then), later) = &lineages[index] else {
                        continue;
                    };
                    for &(counter, held, time) in receipt.holds.as_slice() {
                        let Window::Calendar(kind) = then.counter(counter).window else {
                            continue;
                        };
                        let period = time as u32;
                        let located = usage
                            .map(|usage| usage.find_carried((then, later), policy, counter, time));
                        let (current, recorded) = match located {
                            Some(Some((current, _, WindowState::Calendar(counter)))) => {
                                match counter.raw() {
                                    // That period has reset: nothing is given back there.
                                    (stored, _) if stored > period => continue,
                                    (stored, count) if stored == period => (current, count),
                                    _ => (current, 0),
                                }
                            }
                            // Not in the key's windows (reclaimed, or laid out for a plan
                            // without it): a counter laid out anew later may come back to
                            // this period with other units. Short, to be safe (a period
                            // already over stays harmless: later ones start after it).
                            _ => {
                                let end_ms = then.calendar().period_bounds(kind, period).end_ms;
                                short_until_ms = short_until_ms.max(end_ms);
                                continue;
                            }
                        };
                        let at = (current, period);
                        match periods.iter_mut().find(|holds| holds.at == at) {
                            Some(holds) => holds.held = holds.held.saturating_add(held),
                            None => periods.push(PeriodHolds {
                                at,
                                kind,
                                held,
                                recorded,
                            }),
                        }
                    }
                }
                // A carried calendar counter keeps its zone's offsets (`check_swap_to`), so
                // the current calendar bounds its periods as the receipt's did.
                periods
                    .iter()
                    .filter(|holds| holds.held > holds.recorded)
                    .map(|holds| {
                        policy
                            .calendar()
                            .period_bounds(holds.kind, holds.at.1)
                            .end_ms
                    })
                    .fold(short_until_ms, u64::max)
            });
            if short_until_ms > 0 {
                self.keys.write(key, |_, state| {
                    if let Some(state) = state {
                        state.short_until_ms = state.short_until_ms.max(short_until_ms);
                    }
                });
            }
        }
    }

    /// Reverses a give-back whose event could not be logged.
    pub(crate) fn take_back(&self, key: &str, given: &GivenBack) {
        let (then, later) = self.policy_lineage(given.generation);
        self.keys.read(key, |policy, state| {
            if let (Some(state), Some(then)) = (state, then.as_deref()) {
                retake_in(then, &later, policy, state, given, Some(self.undo(key)));
            }
        });
    }

    /// Corrects recorded usage of a key's plan limits at the time it happened (`usage_at_ms`).
    /// Usage whose window has already reset or aged out is left alone (that limit moves 0); an
    /// addition every window has moved past moves nothing and logs nothing. All limits or none.
    /// A correction no limit of the plan counts is refused (`InvalidArgument` naming `resource`
    /// if the plan does not limit it, else `quantities`) and logs nothing; so is an addition
    /// past what a rolling bucket counts (65,535 under a limit of at most 65,535, else
    /// 4,294,967,295) or a calendar period (2^48 - 1): `Overflow` naming `quantities` and that
    /// bound.
    pub fn adjust_usage(
        &self,
        key: &str,
        resource: &str,
        quantities: &[(Unit, u64)],
        usage_at_ms: u64,
        direction: AdjustmentDirection,
        at_ms: Option<u64>,
    ) -> Result<AdjustmentOutcome, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        if usage_at_ms >= crate::calendar::MAX_TIMESTAMP_MS {
            return Err(Error::invalid(
                "usage_at_ms",
                format!("{usage_at_ms} is at or after 2100-01-01T00:00:00Z, the end of tally's time range"),
            ));
        }
        if usage_at_ms > at_ms {
            return Err(Error::invalid(
                "usage_at_ms",
                "usage cannot be corrected before it happens",
            ));
        }
        let quantities = Quantities::new(quantities)?;
        check_id("key", key, crate::accounts::MAX_KEY_BYTES)?;
        let journal = self.journal();
        // No `consume_many` chunk is between deciding and appending (the gate's write side,
        // as a seat change takes it): a removal of units such a chunk counted would be logged
        // before them, and a replay would remove nothing and then count them. Let go before
        // the wait for durability.
        let gate = self.append_gate.write();
        // Write-locked, as admin calls are: a calendar counter holds an admission's units in
        // flight (taken, to be rolled back if a later limit refuses) in the same word as those
        // recorded, and a removal under the read lock took them as recorded usage: it reported
        // and logged units that were never used, and the admission gave back fewer than it
        // took (a debug build panicked). No admission is in flight on the key meanwhile.
        let (outcome, seq, moved, generation) = self.keys.write(key, |policy, state| {
            let resource_id = resolve_resource(policy, resource, &quantities)?;
            let state = state.ok_or_else(|| Error::UnknownKey { key: key.into() })?;
            let plan_id = state.seat.ok_or_else(|| {
                Error::invalid(
                    "key",
                    format!("{key:?} has no seat: no plan usage to adjust"),
                )
            })?;
            let plan = policy.plan(plan_id);
            let touches = &plan.touches[resource_id.index()];
            let amounts = Amounts::of(touches, &quantities).ok_or(Error::Overflow {
                field: "quantities",
            })?;
            // A correction no limit counts could move nothing: refused before anything is
            // touched or logged (an event of it would only grow the log).
            if amounts.as_slice().is_empty() {
                return Err(nothing_to_correct(&plan.name, resource, touches.is_empty()));
            }
            // A removal leaves the calendar periods it takes from recording fewer units than
            // the receipts naming them may hold (the units it takes were theirs): from now on
            // a give-back of a hold in one of them runs under this write lock too
            // (`KeyState::short_until_ms`). Marked before any counter moves, whether or not
            // the removal then finds units or stands (an undone one leaves it only cautious).
            // A replay marks it the same way (`mark_replayed_removal`).
            if direction == AdjustmentDirection::Remove {
                let periods_end_ms = removal_short_until(policy, plan, &amounts, usage_at_ms);
                state.short_until_ms = state.short_until_ms.max(periods_end_ms);
            }
            let state = &*state;
            // Removing usage from a key that counts none removes nothing, so it looks at empty
            // windows without keeping them: a key with no usage holds no window memory.
            let scratch;
            let usage = match (state.usage.get(), direction) {
                (Some(usage), _) => usage,
                (None, AdjustmentDirection::Remove) => {
                    scratch = KeyUsage::for_plan(policy, Some(plan_id));
                    &*scratch
                }
                (None, AdjustmentDirection::Add) => state
                    .usage
                    .get_or_init(|| KeyUsage::for_plan(policy, Some(plan_id))),
            };
            let mut limits = Vec::new();
            let mut moved = Vec::new();
            for &(limit_index, amount) in amounts.as_slice() {
                let limit = &plan.limits[usize::from(limit_index)];
                let counter = &usage.counters[usize::from(limit_index)];
                let step = adjust_counter(
                    policy,
                    limit.window,
                    &counter.state,
                    amount,
                    usage_at_ms,
                    at_ms,
                    direction,
                );
                match step {
                    Ok((time, amount)) => {
                        limits.push(AdjustedLimit {
                            index: limit_index,
                            name: limit.name.to_string(),
                            moved: amount,
                        });
                        moved.push((counter.id, time, amount));
                    }
                    Err(error) => {
                        // Under the same write lock: nothing else moved them since.
                        undo_adjustment(policy, usage, &moved, direction, None);
                        return Err(error);
                    }
                }
            }
            // An addition every limit's window has moved past (aged out, reset) counts nothing
            // and changes no state: answered (each limit moved 0), not logged. A removal is
            // logged whatever it found: it marks the periods it took from as short (above),
            // which a replay must mark too.
            if direction == AdjustmentDirection::Add
                && moved.iter().all(|&(_, _, amount)| amount == 0)
            {
                return Ok((AdjustmentOutcome { limits }, None, moved, policy.generation));
            }
            let body = EventBody::UsageAdjusted {
                key: key.into(),
                resource: resource.into(),
                quantities,
                usage_at_ms,
                direction,
                generation: policy.generation,
                moved: moved.clone(),
            };
            let seq = match journal
                .map(|journal| journal.append(at_ms, crate::event::encode_body(&body)))
            {
                Some(Err(error)) => {
                    undo_adjustment(policy, usage, &moved, direction, Some(self.undo(key)));
                    return Err(error);
                }
                Some(Ok(seq)) => {
                    // Under the key's write lock, which a cut takes, as a replay notes it.
                    self.note_event_time(at_ms);
                    Some(seq)
                }
                None => None,
            };
            Ok((AdjustmentOutcome { limits }, seq, moved, policy.generation))
        })?;
        drop(gate);
        if let (Some(journal), Some(seq)) = (journal, seq) {
            if let Err(error) = journal.wait(seq) {
                // Undone where the counters are now, should a swap have moved them since;
                // write-locked as above (undoing an addition removes).
                let (then, later) = self.policy_lineage(generation);
                self.keys.write(key, |policy, state| {
                    let state = state.map(|state| &*state);
                    let usage = state.and_then(|state| state.usage.get());
                    let (Some(usage), Some(then)) = (usage, then.as_deref()) else {
                        return;
                    };
                    let carried: Vec<_> = moved
                        .iter()
                        .filter_map(|&(counter, time, amount)| {
                            usage
                                .find_carried((then, &later), policy, counter, time)
                                .map(|(counter, time, _)| (counter, time, amount))
                        })
                        .collect();
                    undo_adjustment(policy, usage, &carried, direction, Some(self.undo(key)));
                });
                return Err(error);
            }
        }
        Ok(outcome)
    }

    /// One step of the automatic reclaim (`EngineOptions::reclaim_idle_every_ms`), due by the
    /// clock's `now_ms`, freeing keys idle as of `as_of_ms` (at most `now_ms`): at most
    /// `RECLAIM_KEYS_PER_STEP` keys of one shard, under that shard's write lock, then the next
    /// step is scheduled so that a round over every shard takes about the interval. Another
    /// thread's step in progress makes this one a no-op.
    #[cold]
    #[inline(never)]
    pub(crate) fn reclaim_step(&self, now_ms: u64, as_of_ms: u64) {
        debug_assert!(as_of_ms <= now_ms);
        let Some(mut hand) = self.reclaim_hand.try_lock() else {
            return;
        };
        // Another thread may have just taken this step and scheduled the next.
        if now_ms
            < self
                .reclaim_due_ms
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if hand.shard == 0 && hand.skip == 0 {
            hand.round_started_ms = now_ms;
        }
        let skip = hand.skip;
        let (visited, len, reclaimed) = self.keys.with_shard(hand.shard, |shard| {
            let policy = Arc::clone(&shard.policy);
            let len = shard.len();
            let mut visited = 0;
            let mut reclaimed = 0;
            for (_, state) in shard.iter_mut().skip(skip).take(RECLAIM_KEYS_PER_STEP) {
                visited += 1;
                reclaimed += u64::from(reclaim_if_idle(&policy, state, as_of_ms));
            }
            (visited, len, reclaimed)
        });
        hand.reclaimed = hand.reclaimed.saturating_add(reclaimed);
        hand.skip += visited;
        // A shard that shrank or grew meanwhile is finished when the walk reaches its end
        // (keys moved by a resize are caught in the next round).
        if visited < RECLAIM_KEYS_PER_STEP || hand.skip >= len {
            hand.shard += 1;
            hand.skip = 0;
        }
        let every = self.options().reclaim_idle_every_ms;
        let steps = self.keys.len() / RECLAIM_KEYS_PER_STEP as u64 + KeyTable::SHARDS as u64;
        let next_step_ms = now_ms.saturating_add((every / steps).max(1));
        let due_ms = if hand.shard == KeyTable::SHARDS {
            hand.shard = 0;
            hand.rounds += 1;
            next_step_ms.max(hand.round_started_ms.saturating_add(every))
        } else {
            next_step_ms
        };
        self.reclaim_due_ms
            .store(due_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many keys the automatic reclaim has freed, and how many rounds it has finished.
    pub fn automatic_reclaims(&self) -> (u64, u64) {
        let hand = self.reclaim_hand.lock();
        (hand.reclaimed, hand.rounds)
    }

    /// Frees the window memory of keys with nothing counted in any window as of `at_ms` and no
    /// open reservation; returns how many keys were reclaimed. A reclaimed key's later requests
    /// are counted no earlier than `at_ms`, so one stamped before it (a delayed gateway) cannot
    /// find an emptied window in a period whose quota was already used.
    pub fn reclaim_idle(&self, at_ms: Option<u64>) -> Result<u64, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let mut reclaimed = 0;
        self.keys.for_each_shard(|shard| {
            let policy = Arc::clone(&shard.policy);
            for (_, state) in shard.iter_mut() {
                reclaimed += u64::from(reclaim_if_idle(&policy, state, at_ms));
            }
        });
        Ok(reclaimed)
    }

    /// Memory held by keys and their window counters.
    pub fn memory_stats(&self) -> MemoryStats {
        let mut stats = MemoryStats {
            keys: 0,
            keys_with_usage: 0,
            usage_bytes: 0,
            table_bytes: 0,
        };
        self.keys.for_each_shard(|shard| {
            stats.table_bytes += shard.table_bytes() as u64;
            for (name, state) in shard.iter() {
                stats.keys += 1;
                // The name's block on the usage pages.
                stats.table_bytes += crate::pages::block_bytes(name.len()) as u64;
                if let Some(usage) = state.usage.get() {
                    stats.keys_with_usage += 1;
                    stats.usage_bytes += usage.memory_bytes() as u64;
                }
            }
        });
        stats
    }
}

/// The end of the last calendar period a removal of `amounts` on `plan` at `usage_at_ms`
/// takes from (0 if it takes from none): until then the key is short
/// (`KeyState::short_until_ms`).
fn removal_short_until(
    policy: &Policy,
    plan: &crate::policy::Plan,
    amounts: &Amounts,
    usage_at_ms: u64,
) -> u64 {
    amounts
        .as_slice()
        .iter()
        .filter_map(
            |&(limit_index, _)| match plan.limits[usize::from(limit_index)].window {
                Window::Calendar(kind) => {
                    Some(policy.calendar().period_of(kind, usage_at_ms).end_ms)
                }
                Window::Rolling { .. } => None,
            },
        )
        .max()
        .unwrap_or(0)
}

impl Engine {
    /// Marks `key` short as the logged removal of `quantities` of `resource` at
    /// `usage_at_ms` marked it when it was applied live: a replay reaches this event with the
    /// key's seat and the policy as they were then (both are logged in order with it). What
    /// the live call would have refused is not in the log.
    pub(crate) fn mark_replayed_removal(
        &self,
        key: &str,
        resource: &str,
        quantities: &Quantities,
        usage_at_ms: u64,
    ) {
        self.keys.write(key, |policy, state| {
            let Some(state) = state else { return };
            let (Some(plan_id), Ok(resource_id)) =
                (state.seat, resolve_resource(policy, resource, quantities))
            else {
                return;
            };
            let plan = policy.plan(plan_id);
            if let Some(amounts) = Amounts::of(&plan.touches[resource_id.index()], quantities) {
                let until = removal_short_until(policy, plan, &amounts, usage_at_ms);
                state.short_until_ms = state.short_until_ms.max(until);
            }
        });
    }
}

/// What a key's outstanding receipts hold in one calendar period of one counter, against
/// what the counter records there (`Engine::mark_short_periods`).
struct PeriodHolds {
    /// The counter (in the current policy) and the period.
    at: (CounterId, u32),
    /// The counter's kind of period.
    kind: crate::calendar::CalendarPeriod,
    /// Units the receipts hold there.
    held: u64,
    /// Units the counter records there.
    recorded: u64,
}

/// Whether `receipt` holds units in a calendar period that starts before the key's
/// `short_until_ms`, where a correction may have left the counter recording fewer units than
/// the receipts naming the period hold. `then` is the receipt's policy generation (`None`: no
/// longer kept, so none of its plan usage is given back). A period starting at or after the
/// mark comes after every period a correction took from, in every calendar window kind.
fn holds_in_short_period(then: Option<&Policy>, receipt: &Receipt, state: &KeyState) -> bool {
    let (ChargedTo::PlanQuota { .. }, Some(then)) = (receipt.charged_to, then) else {
        return false;
    };
    receipt
        .holds
        .as_slice()
        .iter()
        .any(|&(counter, _, time)| match then.counter(counter).window {
            Window::Calendar(kind) => {
                then.calendar().period_bounds(kind, time as u32).start_ms < state.short_until_ms
            }
            Window::Rolling { .. } => false,
        })
}

/// Gives back the part of `receipt` that `quantities` accounts for, under the caller's lock.
///
/// `as_of_ms` is the time of a give-back that is an operation of its own (a refund, a
/// reservation settled, voided or expired): plan usage that has aged out of its rolling window
/// or whose calendar period has reset by then no longer counts, so none of it is given back,
/// as `adjust_usage` does. The rolling windows first move to that time, as an admission then
/// would: what a refund gives back must not depend on whether a request that moved a window
/// (and was refused, so never logged) happened before it, or a reopened engine would give back
/// what the engine that never closed had already let age out. `None` undoes an effect made a
/// moment ago (its event could not be logged): the counters are taken as they stand.
///
/// `then` is the receipt's policy generation and the kept ones after it
/// (`Engine::policy_lineage`); `None` if it is no longer kept: then no plan usage is given
/// back (its counters cannot be found), and credits or pay-as-you-go spend only when `whole`
/// says `quantities` are everything the receipt moved (a refund, a void, an undo), as the
/// receipt's charge, since no part of it can be priced.
///
/// Credits reach the team's balance at once if `credits` is `Now` (an undo), else they are
/// only worked out and recorded, for the caller to pay once its event is appended
/// (`CreditsLater`).
///
/// `undo` (an undo after a failed log) notes the units a counter no longer held to take off
/// (`Undo`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn give_back_in(
    then: Option<(&Policy, &[Arc<Policy>])>,
    policy: &Policy,
    state: &KeyState,
    resource: &str,
    receipt: &Receipt,
    quantities: &Quantities,
    whole: bool,
    as_of_ms: Option<u64>,
    credits: CreditsBack,
    undo: Option<Undo<'_>>,
) -> GivenBack {
    let mut given = GivenBack {
        generation: policy.generation,
        ..GivenBack::default()
    };
    // What was charged is priced and weighted by the policy in force then, not now: a price
    // cut since must not shrink a refund.
    if !matches!(receipt.charged_to, ChargedTo::PlanQuota { .. }) {
        let then = then.map(|(then, _)| then);
        let back = charge_given_back(then, resource, receipt, quantities, whole);
        if back > 0 {
            give_back_charge(state, receipt, back, credits, &mut given);
        }
        return given;
    }
    let Some((then, later)) = then else {
        return given;
    };
    let Some(resource) = then.resource_id(resource) else {
        return given;
    };
    if quantities.is_empty() {
        return given;
    }
    let Some(usage) = state.usage.get() else {
        return given;
    };
    let _serial = undo.map(|undo| undo.serialized());
    for &hold in receipt.holds.as_slice() {
        if let Some((moved, wanted)) = refund_hold(
            (then, later),
            policy,
            usage,
            resource,
            quantities,
            hold,
            as_of_ms,
            undo,
        ) {
            let (counter, time, amount) = moved;
            if let Some(undo) = undo {
                undo_pause("owe");
                undo.owe(counter, time, wanted - amount);
            }
            if amount > 0 {
                given.counters.push(moved);
            }
        }
    }
    given
}

/// How much of the credits or pay-as-you-go spend `receipt` charged giving back `quantities`
/// of it returns, as `give_back_in` works it out: their price under `then` (the receipt's
/// policy generation, if still kept), at most the charge; the whole charge if `then` is gone
/// and `whole`; else nothing (and nothing for a plan-quota receipt).
pub(crate) fn charge_given_back(
    then: Option<&Policy>,
    resource: &str,
    receipt: &Receipt,
    quantities: &Quantities,
    whole: bool,
) -> u64 {
    let (ChargedTo::Credits { micros } | ChargedTo::PayAsYouGo { micros }) = receipt.charged_to
    else {
        return 0;
    };
    if quantities.is_empty() {
        return 0;
    }
    let Some(then) = then else {
        return if whole { micros } else { 0 };
    };
    let Some(resource) = then.resource_id(resource) else {
        return 0;
    };
    let price = price_micros(then, resource, quantities).ok().flatten();
    price.unwrap_or(micros).min(micros)
}

/// Gives back `back` (from `charge_given_back`) of the credits or pay-as-you-go spend
/// `receipt` charged; credits as `credits` says.
fn give_back_charge(
    state: &KeyState,
    receipt: &Receipt,
    back: u64,
    credits: CreditsBack,
    given: &mut GivenBack,
) {
    match receipt.charged_to {
        ChargedTo::PlanQuota { .. } => {}
        ChargedTo::Credits { .. } => {
            let room = match credits {
                CreditsBack::Now => state.team.refund(back).is_some(),
                CreditsBack::Later => state.team.balance_micros().checked_add(back).is_some(),
            };
            if room {
                given.credits_micros = back;
            }
        }
        ChargedTo::PayAsYouGo { .. } => {
            state.subtract_payg(back);
            given.payg_micros = back;
        }
    }
}

/// Takes again what `given` gave back (the give-back's event could not be logged). `then` is
/// `given`'s generation and `later` the kept ones after it (`Engine::policy_lineage`). `undo`
/// (an undo after a failed log) pays what undos of additions owe first (`Undo`).
pub(crate) fn retake_in(
    then: &Policy,
    later: &[Arc<Policy>],
    policy: &Policy,
    state: &KeyState,
    given: &GivenBack,
    undo: Option<Undo<'_>>,
) {
    if given.credits_micros > 0 {
        state.team.force_charge(given.credits_micros);
    }
    if given.payg_micros > 0 {
        let _ = state.add_payg(given.payg_micros);
    }
    if let Some(usage) = state.usage.get() {
        let _serial = undo.map(|undo| undo.serialized());
        for &(counter, time, amount) in &given.counters {
            let located = usage.find_carried((then, later), policy, counter, time);
            if let Some((current, time, state)) = located {
                match undo {
                    Some(undo) => undo.put_back(policy, state, current, time, amount),
                    None => {
                        let _ = force_state(policy, state, current, time, amount);
                    }
                }
            }
        }
    }
}

/// Adds `amount` to a counter at `time` (an epoch or a period) whatever the limit.
/// Returns, for a rolling counter, the address of the slot it wrote (to note as the key's
/// prefetch hint); `None` for a calendar counter or a bucket that could not take it.
pub(crate) fn force_counter(
    policy: &Policy,
    usage: &KeyUsage,
    counter: CounterId,
    time: u64,
    amount: u64,
) -> Option<*const u8> {
    force_state(policy, usage.counter(counter)?, counter, time, amount)
}

/// `force_state`, as much of it as fits: a rolling bucket counts at most `bucket_capacity`, and
/// an add may meet a bucket a removal logged after it (a give-back moves before its append)
/// still fills in a replay, or one an add since filled in an undo. Returns the slot written,
/// if any, and the units that did not fit (`Debts`' surplus, for that removal, or that add's
/// undo, to take first).
pub(crate) fn force_fitting(
    policy: &Policy,
    state: &WindowState,
    counter: CounterId,
    time: u64,
    amount: u64,
) -> (Option<*const u8>, u64) {
    let forced = force_state(policy, state, counter, time, amount);
    if forced.is_some() {
        return (forced, 0);
    }
    let (WindowState::Rolling(ring), Some(shape)) = (state, policy.counter(counter).window.shape())
    else {
        return (None, 0);
    };
    let room = ring.room(shape, time);
    if room == 0 || room >= amount {
        return (None, amount.saturating_sub(room));
    }
    (ring.force(shape, time, room), amount - room)
}

/// `force_counter` on the counter's state, already looked up.
pub(crate) fn force_state(
    policy: &Policy,
    state: &WindowState,
    counter: CounterId,
    time: u64,
    amount: u64,
) -> Option<*const u8> {
    match (state, policy.counter(counter).window) {
        (WindowState::Rolling(ring), window @ Window::Rolling { .. }) => {
            let shape = window.shape()?;
            ring.advance(shape, time);
            ring.force(shape, time, amount)
        }
        (WindowState::Calendar(counter_state), Window::Calendar(_)) => {
            let _ = counter_state.force(time as u32, amount);
            None
        }
        _ => None,
    }
}

/// Takes `amount` off a counter at `time`; returns how much could not be taken (the counter
/// held less).
pub(crate) fn unforce_counter(
    policy: &Policy,
    usage: &KeyUsage,
    counter: CounterId,
    time: u64,
    amount: u64,
) -> u64 {
    let Some(state) = usage.counter(counter) else {
        return 0;
    };
    let taken = match (state, policy.counter(counter).window) {
        (WindowState::Rolling(ring), window @ Window::Rolling { .. }) => match window.shape() {
            Some(shape) => ring.refund(shape, time, amount),
            None => 0,
        },
        (WindowState::Calendar(counter_state), Window::Calendar(_)) => {
            counter_state.refund(time as u32, amount)
        }
        _ => 0,
    };
    amount - taken
}

/// Reverses a correction's moves; `undo` as in `retake_in` and `give_back_in`.
fn undo_adjustment(
    policy: &Policy,
    usage: &KeyUsage,
    moved: &[(CounterId, u64, u64)],
    direction: AdjustmentDirection,
    undo: Option<Undo<'_>>,
) {
    let _serial = undo.map(|undo| undo.serialized());
    for &(counter, time, amount) in moved {
        match direction {
            AdjustmentDirection::Add => {
                let surplus = undo.map_or(0, |undo| undo.take_surplus(counter, time, amount));
                let short = unforce_counter(policy, usage, counter, time, amount - surplus);
                if let Some(undo) = undo {
                    undo.owe(counter, time, short);
                }
            }
            AdjustmentDirection::Remove => match (undo, usage.counter(counter)) {
                (Some(undo), Some(state)) => undo.put_back(policy, state, counter, time, amount),
                _ => {
                    let _ = force_counter(policy, usage, counter, time, amount);
                }
            },
        }
    }
}

/// Gives back the part of one hold that `quantities` accounts for: `(counter, time, amount)`
/// in the current policy's ids and how many it meant to give back (the counter may have held
/// fewer), or `None` if its counter is gone or nothing was live (as of `as_of_ms`, see
/// `give_back_in`). `then` is the receipt's generation and the kept ones after
/// it, which carried the hold's units to where they are now. `undo` (an undo after a failed
/// log) takes what a full bucket could not take back first (`Undo::take_surplus`).
#[allow(clippy::too_many_arguments)]
fn refund_hold(
    (then, later): (&Policy, &[Arc<Policy>]),
    now: &Policy,
    usage: &KeyUsage,
    resource: ResourceId,
    quantities: &Quantities,
    (counter, held, time): (CounterId, u64, u64),
    as_of_ms: Option<u64>,
    undo: Option<Undo<'_>>,
) -> Option<((CounterId, u64, u64), u64)> {
    // Units aged out of the window they were counted in stay out when a swap or seat change
    // re-buckets it (`KeyUsage::rearranged`): the bucket they would have been carried to holds
    // only later units, which are not this hold's to give back.
    if let (Some(as_of_ms), Some(shape)) = (as_of_ms, then.counter(counter).window.shape()) {
        if shape.release_ms(time) <= as_of_ms {
            return None; // aged out
        }
    }
    // Where the swaps since, and a seat change between plans whose limits on this meter differ
    // only in their buckets, put the usage: give back there.
    let (current, time, state) = usage.find_carried((then, later), now, counter, time)?;
    let amount = quantities
        .weighted(&then.counter_weights(counter, resource))
        .unwrap_or(held)
        .min(held);
    let (time, given) = match state {
        WindowState::Rolling(window) => {
            let shape = now.counter(current).window.shape()?;
            let epoch = time;
            if let Some(as_of_ms) = as_of_ms {
                if !window.still_counts_at(shape, epoch, shape.epoch(as_of_ms)) {
                    return None; // aged out
                }
            }
            let surplus = undo.map_or(0, |undo| undo.take_surplus(current, epoch, amount));
            (
                epoch,
                surplus + window.refund(shape, epoch, amount - surplus),
            )
        }
        WindowState::Calendar(counter_state) => {
            let period = time as u32;
            if let (Some(as_of_ms), Window::Calendar(kind)) =
                (as_of_ms, now.counter(current).window)
            {
                let current_period = now.calendar().period_of(kind, as_of_ms).index;
                if !counter_state.still_counts_at(period, current_period) {
                    return None; // that period has reset
                }
            }
            (time, counter_state.refund(period, amount))
        }
    };
    Some(((current, time, given), amount))
}

// The bounds `adjust_counter`'s errors state, in words.
const _: () = assert!(crate::policy::MAX_ROLLING_AMOUNT == 4_294_967_295);
const _: () = assert!(crate::window::NARROW_MAX_AMOUNT == 65_535);
const _: () = assert!(crate::policy::MAX_CALENDAR_AMOUNT == 281_474_976_710_655);

/// Moves one counter for an adjustment: `(epoch or period, amount moved)`.
fn adjust_counter(
    policy: &Policy,
    window: Window,
    state: &WindowState,
    amount: u64,
    usage_at_ms: u64,
    at_ms: u64,
    direction: AdjustmentDirection,
) -> Result<(u64, u64), Error> {
    match (state, window) {
        (WindowState::Rolling(ring), Window::Rolling { .. }) => {
            let shape = window.shape().unwrap_or_else(|| unreachable!());
            let epoch = shape.epoch(usage_at_ms);
            if !ring.still_counts_at(shape, epoch, shape.epoch(at_ms)) {
                return Ok((epoch, 0)); // aged out already
            }
            match direction {
                AdjustmentDirection::Remove => Ok((epoch, ring.refund(shape, epoch, amount))),
                // A limit of at most 65,535 counts in 16-bit buckets: an error saying the wide
                // buckets' bound told a caller that an addition it refused would fit.
                AdjustmentDirection::Add => ring
                    .force(shape, epoch, amount)
                    .map(|_| (epoch, amount))
                    .ok_or(Error::Overflow {
                        field: if ring.bucket_capacity() == crate::window::NARROW_MAX_AMOUNT {
                            "quantities (a bucket of a rolling window whose limit is at most \
                             65,535 counts at most 65,535)"
                        } else {
                            "quantities (a rolling window's bucket counts at most 4,294,967,295)"
                        },
                    }),
            }
        }
        (WindowState::Calendar(counter), Window::Calendar(kind)) => {
            let period = policy.calendar().period_of(kind, usage_at_ms).index;
            let time = u64::from(period);
            if !counter.still_counts_at(period, policy.calendar().period_of(kind, at_ms).index) {
                return Ok((time, 0)); // that period has reset
            }
            match direction {
                AdjustmentDirection::Remove => Ok((time, counter.refund(period, amount))),
                AdjustmentDirection::Add => counter
                    .force(period, amount)
                    .map(|_| (time, amount))
                    .ok_or(Error::Overflow {
                        field: "quantities (a calendar period counts at most 281,474,976,710,655)",
                    }),
            }
        }
        _ => unreachable!("a key's counter always has its limit's kind of window"),
    }
}

/// Keys one step of the automatic reclaim visits under a shard's write lock. The admission
/// bench's `reclaim_idle` round over 200,000 Plus keys, half of them with usage a week old,
/// takes 65 us per 512 keys (239 us before `is_idle` skipped walking a ring a lap behind).
const RECLAIM_KEYS_PER_STEP: usize = 512;

/// Where the automatic reclaim's round has got to: the shard it is in and how many of that
/// shard's keys it has visited, and what it has done so far.
#[derive(Debug, Default)]
pub(crate) struct ReclaimHand {
    shard: usize,
    skip: usize,
    round_started_ms: u64,
    reclaimed: u64,
    rounds: u64,
}

/// Frees the key's windows if nothing is counted in them as of `at_ms` and it has no open
/// reservation; whether it did.
fn reclaim_if_idle(policy: &Policy, state: &mut KeyState, at_ms: u64) -> bool {
    let idle = state
        .open_reservations
        .load(std::sync::atomic::Ordering::Acquire)
        == 0
        && state
            .usage
            .get()
            .is_some_and(|usage| usage_is_idle(policy, usage, at_ms));
    if idle {
        // Later requests are counted no earlier than the reclaim's time, or the newest time
        // the windows had seen if later (a rolling head; the start of a calendar counter's
        // newest period, which may be past `at_ms` with nothing left in it): a late stamp
        // would otherwise find empty windows in a period whose quota was used (never released
        // early). Neither kind of window moves to `at_ms` when asked whether it is idle, so
        // the key needs `at_ms` itself.
        state.time_floor_ms = state
            .time_floor_ms
            .max(newest_time_ms(policy, state))
            .max(at_ms);
        state.usage.set(None);
    }
    idle
}

/// The newest time a key's windows have seen, in ms: a rolling window's head, the start of a
/// calendar counter's newest period.
fn newest_time_ms(policy: &Policy, state: &KeyState) -> u64 {
    let Some(usage) = state.usage.get() else {
        return 0;
    };
    usage
        .counters
        .iter()
        .filter_map(
            |counter| match (&counter.state, policy.counter(counter.id).window) {
                (WindowState::Rolling(ring), Window::Rolling { bucket_ms, .. }) => {
                    Some(ring.head().saturating_mul(bucket_ms))
                }
                (WindowState::Calendar(calendar), Window::Calendar(kind)) => {
                    match calendar.period() {
                        0 => None,
                        period => Some(policy.calendar().period_bounds(kind, period).start_ms),
                    }
                }
                _ => None,
            },
        )
        .max()
        .unwrap_or(0)
}

fn usage_is_idle(policy: &Policy, usage: &KeyUsage, at_ms: u64) -> bool {
    usage.counters.iter().all(|counter| match &counter.state {
        WindowState::Rolling(window) => match policy.counter(counter.id).window.shape() {
            Some(shape) => window.is_idle(shape, shape.epoch(at_ms)),
            None => false,
        },
        WindowState::Calendar(state) => match policy.counter(counter.id).window {
            crate::policy::Window::Calendar(kind) => {
                state
                    .used(policy.calendar().period_of(kind, at_ms).index)
                    .used
                    == 0
            }
            crate::policy::Window::Rolling { .. } => false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::KeyKind;
    use crate::admission::Holds;
    use crate::ledger::Team;
    use crate::policy::PlanId;

    /// A give-back goes to the write lock only for a calendar hold in a period that starts
    /// before the key's mark: not for a later period, a rolling window or a charge to credits,
    /// and never on a key no correction marked (the hot path).
    #[test]
    fn only_a_hold_in_a_period_a_correction_left_short_goes_to_the_write_lock() {
        let policy = Policy::token_plan();
        let find = |calendar: bool| {
            let index = policy
                .counters()
                .iter()
                .position(|spec| matches!(spec.window, Window::Calendar(_)) == calendar)
                .expect("the token plan has rolling and calendar windows");
            CounterId(index as u16)
        };
        let (daily, rolling) = (find(true), find(false));
        let Window::Calendar(kind) = policy.counter(daily).window else {
            unreachable!("found as a calendar window");
        };
        let day = policy.calendar().period_of(kind, 1_790_000_000_000);
        let receipt = |charged_to, holds: &[(CounterId, u64, u64)]| Receipt {
            charged_to,
            generation: policy.generation,
            holds: Holds::from_slice(holds).expect("a few holds"),
        };
        let quota = ChargedTo::PlanQuota { plan: PlanId(0) };
        let on_the_day = receipt(quota, &[(daily, 3, u64::from(day.index))]);
        let the_day_after = receipt(quota, &[(daily, 3, u64::from(day.index) + 1)]);
        let on_a_ring = receipt(quota, &[(rolling, 3, 7)]);
        let to_credits = receipt(ChargedTo::Credits { micros: 5 }, &[]);
        let mut state = KeyState::new(KeyKind::Plan, "u".into(), Arc::new(Team::new("@u")));
        for receipt in [&on_the_day, &the_day_after, &on_a_ring, &to_credits] {
            assert!(!holds_in_short_period(Some(&policy), receipt, &state));
        }
        // A correction removed from that day.
        state.short_until_ms = day.end_ms;
        assert!(holds_in_short_period(Some(&policy), &on_the_day, &state));
        assert!(!holds_in_short_period(None, &on_the_day, &state));
        for receipt in [&the_day_after, &on_a_ring, &to_credits] {
            assert!(!holds_in_short_period(Some(&policy), receipt, &state));
        }
    }

    /// Two failed calls' undos on one key run at once (both wake on the same failed flush):
    /// a consume's undo finds its units taken by a refund not yet undone and notes the
    /// shortfall a moment after taking what it could; the refund's undo, run in that moment,
    /// found no debt yet and put its units back in full. The counter then ended counting
    /// units no logged event counts, as before `Engine::undo_debts`.
    #[test]
    fn a_refunds_undo_racing_a_consumes_undo_leaves_the_counter_as_on_disk() {
        use crate::{
            AdjustmentDirection, Decision, Durability, Faults, ManualClock, OpenOptions, Unit,
            UsageRequest,
        };
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::{Duration, Instant};
        const T0: u64 = 1_790_000_000_000;
        let limit = "m2.7:requests per rolling:5h";
        let dir = std::env::temp_dir().join(format!("tally-undo-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let faults = Faults::new();
        let options = OpenOptions {
            durability: Durability::Sync,
            faults: Some(Arc::clone(&faults)),
            ..OpenOptions::default()
        };
        let open = || {
            Engine::open(
                &dir,
                Policy::token_plan(),
                Arc::new(ManualClock::new(T0)),
                options.clone(),
            )
            .expect("open")
        };
        let used = |engine: &Engine| {
            let report = engine.usage("key-ada", Some(T0 + 3)).expect("a report");
            let found = report.limits.iter().find(|report| report.name == limit);
            found.expect("the limit").used
        };
        let engine = open();
        engine
            .create_user("ada", "key-ada", Some(T0))
            .expect("a user");
        engine
            .assign_seat("@ada", "ada", "Max", Some(T0))
            .expect("a seat");
        let five = [(Unit::Requests, 5)];
        let first = engine
            .consume(&UsageRequest::new("key-ada", "m2.7", &five).at(T0).id("r1"))
            .expect("decided");
        assert!(matches!(first, Decision::Admitted(_)), "{first:?}");
        // A correction takes r1's units out again: the bucket is empty, r1's receipt names it.
        engine
            .adjust_usage(
                "key-ada",
                "m2.7",
                &five,
                T0,
                AdjustmentDirection::Remove,
                Some(T0),
            )
            .expect("a correction");
        engine.sync().expect("durable");
        let wait_for = |what: &dyn Fn() -> bool| {
            let start = Instant::now();
            while !what() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(what());
        };
        faults.hold_flushes();
        faults.fail_next_flushes(1);
        faults.hold_give_backs();
        let refund_done = Arc::new(AtomicBool::new(false));
        let refunded = std::thread::scope(|scope| {
            let request = UsageRequest::new("key-ada", "m2.7", &five).at(T0 + 1);
            let submitted = engine.submit(&request).expect("submitted");
            wait_for(&|| faults.flushes_held() > 0);
            assert_eq!(used(&engine), 5);
            let refund = {
                let (engine, done) = (&engine, Arc::clone(&refund_done));
                scope.spawn(move || {
                    let refunded = engine.refund("r1", Some(T0 + 2));
                    done.store(true, Ordering::SeqCst);
                    refunded
                })
            };
            wait_for(&|| faults.give_backs_held() > 0);
            assert_eq!(used(&engine), 0);
            // The consume's undo takes what it can (nothing), then, before it notes what it
            // could not, the refund's append fails and its undo runs (or waits its turn).
            {
                let (faults, done) = (Arc::clone(&faults), Arc::clone(&refund_done));
                UNDO_PAUSE.with(|pause| {
                    *pause.borrow_mut() = Some(Box::new(move |step| {
                        if step == "owe" {
                            faults.release_give_backs();
                            let start = Instant::now();
                            while !done.load(Ordering::SeqCst)
                                && start.elapsed() < Duration::from_millis(500)
                            {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }));
                });
            }
            faults.release_flushes();
            let completed = submitted.complete();
            UNDO_PAUSE.with(|pause| pause.borrow_mut().take());
            assert!(completed.is_err(), "{completed:?}");
            faults.release_give_backs();
            refund.join().expect("no panic")
        });
        assert!(refunded.is_err(), "{refunded:?}");
        let in_memory = used(&engine);
        drop(engine);
        let engine = open();
        let on_disk = used(&engine);
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(on_disk, 0, "r1 and the correction stand, nothing else");
        assert_eq!(
            in_memory, on_disk,
            "{limit}: in memory after both undos, as on disk"
        );
    }
}
