//! Adjustments: refunds and corrections of recorded usage, each its own operation, never an edit.
//!
//! A refund gives back what an admitted request moved (its receipt): units in windows that are
//! still live, micro-credits to the team, pay-as-you-go spend. A usage correction adds usage that
//! really happened but was not counted, or removes usage counted by mistake, at the time it
//! happened. The same machinery frees what a reservation held.

use crate::admission::{ChargedTo, Quantities, Receipt};
use crate::engine::{check_id, resolve_resource, AdjustmentDirection, Engine, MemoryStats};
use crate::error::Error;
use crate::ledger::{KeyUsage, WindowState};
use crate::policy::{CounterId, Policy, ResourceId, Unit};
use crate::window::RollingShape;

/// What a refund gave back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refund {
    pub charged_to: ChargedTo,
    /// Units given back to plan windows (summed over the limits), or micro-credits.
    pub given_back: u64,
}

/// Per limit of the key's plan, how much an adjustment moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustmentOutcome {
    pub limits: Vec<(String, u64)>,
}

impl Engine {
    /// Refunds a request admitted with `request_id`, in full. Refunding twice is an error.
    pub fn refund(&self, request_id: &str, at_ms: Option<u64>) -> Result<Refund, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        check_id(
            "request_id",
            request_id,
            crate::idempotency::MAX_REQUEST_ID_BYTES,
        )?;
        self.requests.with_record(request_id, |record| {
            let record = record.ok_or_else(|| Error::UnknownRequest {
                request_id: request_id.into(),
            })?;
            if record.refunded {
                return Err(Error::invalid(
                    "request_id",
                    format!("{request_id:?} was already refunded"),
                ));
            }
            let receipt = record.receipt.ok_or_else(|| {
                Error::invalid(
                    "request_id",
                    format!("{request_id:?} was denied: nothing to refund"),
                )
            })?;
            let fingerprint = &record.fingerprint;
            let given_back = self.give_back(
                &fingerprint.key,
                &fingerprint.resource,
                &receipt,
                &fingerprint.quantities,
                at_ms,
            );
            record.refunded = true;
            Ok(Refund {
                charged_to: receipt.charged_to,
                given_back,
            })
        })
    }

    /// Gives back `quantities` (at most what the receipt moved); returns the units or micros
    /// given back.
    pub(crate) fn give_back(
        &self,
        key: &str,
        resource: &str,
        receipt: &Receipt,
        quantities: &Quantities,
        at_ms: u64,
    ) -> u64 {
        if quantities.is_empty() {
            return 0;
        }
        let then = self.policy_of_generation(receipt.generation);
        self.keys.read(key, |policy, state| {
            let (Some(state), Some(resource)) = (state, policy.resource_id(resource)) else {
                return 0;
            };
            match receipt.charged_to {
                ChargedTo::PlanQuota { .. } => {
                    let Some(usage) = state.usage.get() else {
                        return 0;
                    };
                    let Some(then) = then.as_deref() else {
                        return 0;
                    };
                    let mut given = 0;
                    for &(counter, held, time) in receipt.holds.as_slice() {
                        given += refund_hold(
                            then,
                            policy,
                            usage,
                            resource,
                            quantities,
                            (counter, held, time),
                            at_ms,
                        );
                    }
                    given
                }
                ChargedTo::Credits { micros } => {
                    let price = crate::admission::price_micros(policy, resource, quantities)
                        .ok()
                        .flatten();
                    let back = price.unwrap_or(micros).min(micros);
                    state.team.refund(back).map_or(0, |_| back)
                }
                ChargedTo::PayAsYouGo { micros } => {
                    let price = crate::admission::price_micros(policy, resource, quantities)
                        .ok()
                        .flatten();
                    let back = price.unwrap_or(micros).min(micros);
                    state.subtract_payg(back);
                    back
                }
            }
        })
    }

    /// Corrects recorded usage of a key's plan limits at the time it happened (`usage_at_ms`).
    /// Usage whose window has already reset or aged out is left alone.
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
        let usage_at_ms = self.resolve_time(Some(usage_at_ms))?;
        if usage_at_ms > at_ms {
            return Err(Error::invalid(
                "usage_at_ms",
                "usage cannot be corrected before it happens",
            ));
        }
        let quantities = Quantities::new(quantities)?;
        check_id("key", key, crate::accounts::MAX_KEY_BYTES)?;
        self.keys.read(key, |policy, state| {
            let resource = resolve_resource(policy, resource, &quantities)?;
            let state = state.ok_or_else(|| Error::UnknownKey { key: key.into() })?;
            let plan_id = state.seat.ok_or_else(|| {
                Error::invalid(
                    "key",
                    format!("{key:?} has no seat: no plan usage to adjust"),
                )
            })?;
            let plan = policy.plan(plan_id);
            let amounts =
                crate::admission::Amounts::of(&plan.touches[resource.index()], &quantities)?;
            let usage = state
                .usage
                .get_or_init(|| KeyUsage::for_plan(policy, Some(plan_id)));
            let mut limits = Vec::new();
            for &(limit_index, amount) in amounts.as_slice() {
                let limit = &plan.limits[usize::from(limit_index)];
                let state = &usage.counters[usize::from(limit_index)].state;
                let moved = adjust_counter(
                    policy,
                    limit.window,
                    state,
                    amount,
                    usage_at_ms,
                    at_ms,
                    direction,
                )?;
                limits.push((limit.name.to_string(), moved));
            }
            Ok(AdjustmentOutcome { limits })
        })
    }

    /// Frees the window memory of keys with nothing counted in any window as of `at_ms` and no
    /// open reservation; returns how many keys were reclaimed.
    pub fn reclaim_idle(&self, at_ms: Option<u64>) -> Result<u64, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let mut reclaimed = 0;
        self.keys.for_each_shard(|shard| {
            let policy = std::sync::Arc::clone(&shard.policy);
            for (_, state) in shard.iter_mut() {
                let idle = state
                    .open_reservations
                    .load(std::sync::atomic::Ordering::Acquire)
                    == 0
                    && state
                        .usage
                        .get()
                        .is_some_and(|usage| usage_is_idle(&policy, usage, at_ms));
                if idle {
                    state.usage.set(None);
                    reclaimed += 1;
                }
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
                stats.table_bytes += name.len() as u64;
                if let Some(usage) = state.usage.get() {
                    stats.keys_with_usage += 1;
                    stats.usage_bytes += usage.memory_bytes() as u64;
                }
            }
        });
        stats
    }
}

/// Gives back the part of one hold that `quantities` accounts for.
fn refund_hold(
    then: &Policy,
    now: &Policy,
    usage: &KeyUsage,
    resource: ResourceId,
    quantities: &Quantities,
    (counter, held, time): (CounterId, u64, u64),
    at_ms: u64,
) -> u64 {
    let _ = at_ms;
    let Some(current) = (if then.generation == now.generation {
        Some(counter)
    } else {
        then.same_counter_in(counter, now)
    }) else {
        return 0;
    };
    let amount = quantities
        .weighted(&now.counter_weights(current, resource))
        .unwrap_or(held)
        .min(held);
    let Some(state) = usage.counter(current) else {
        return 0;
    };
    match state {
        WindowState::Rolling(window) => {
            let Some(shape) = now.counter(current).window.shape() else {
                return 0;
            };
            let epoch = match then.counter(counter).window.shape() {
                Some(old) if old != shape => shape.epoch(time * old.bucket_ms + old.bucket_ms - 1),
                _ => time,
            };
            window.refund(shape, epoch, amount)
        }
        WindowState::Calendar(counter_state) => counter_state.refund(time as u32, amount),
    }
}

fn adjust_counter(
    policy: &Policy,
    window: crate::policy::Window,
    state: &WindowState,
    amount: u64,
    usage_at_ms: u64,
    at_ms: u64,
    direction: AdjustmentDirection,
) -> Result<u64, Error> {
    match (state, window) {
        (WindowState::Rolling(ring), crate::policy::Window::Rolling { .. }) => {
            let shape: RollingShape = window.shape().unwrap_or_else(|| unreachable!());
            let head = ring.advance(shape, shape.epoch(at_ms));
            let epoch = shape.epoch(usage_at_ms);
            if epoch.saturating_add(shape.buckets) < head {
                return Ok(0); // aged out already
            }
            match direction {
                AdjustmentDirection::Remove => Ok(ring.refund(shape, epoch, amount)),
                AdjustmentDirection::Add => ring
                    .force(shape, epoch, amount)
                    .then_some(amount)
                    .ok_or(Error::Overflow {
                        field: "quantities (bucket count)",
                    }),
            }
        }
        (WindowState::Calendar(counter), crate::policy::Window::Calendar(kind)) => {
            let period = policy.calendar().period_of(kind, usage_at_ms).index;
            if counter
                .used(policy.calendar().period_of(kind, at_ms).index)
                .period
                != period
            {
                return Ok(0); // that period has reset
            }
            match direction {
                AdjustmentDirection::Remove => Ok(counter.refund(period, amount)),
                AdjustmentDirection::Add => {
                    counter
                        .force(period, amount)
                        .map(|_| amount)
                        .ok_or(Error::Overflow {
                            field: "quantities (period count)",
                        })
                }
            }
        }
        _ => unreachable!("a key's counter always has its limit's kind of window"),
    }
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
