//! Admission: whether a key may spend what it asks for, and where it is charged.
//!
//! One request touches every limit of the key's plan whose meter counts the resource. Limits are
//! reserved in the plan's order with a CAS each; if one does not fit, the ones already reserved
//! are given back and nothing is recorded, so a request is admitted whole or not at all. A request
//! the plan cannot take (quota exhausted or resource not covered) falls to the team's credits.

use std::mem::MaybeUninit;

use crate::calendar::CalendarPeriod;
use crate::error::Error;
use crate::ledger::{KeyUsage, Team, UsageCell, WindowState};
use crate::policy::{
    CounterId, Limit, Plan, PlanId, Policy, ResourceId, Touch, Unit, Window,
    MAX_LIMITS_PER_RESOURCE, MAX_QUANTITY, UNIT_COUNT,
};
use crate::window::{period_end_ms, RollingShape, RollingWindow};

/// A validated set of quantities, one per unit (0 = the unit is not in the request), and the
/// mask of the units present (bit `i` for unit index `i`), kept beside them because admission
/// tests it on every request. Serialized as the quantities alone.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(from = "QuantitiesOnWire", into = "QuantitiesOnWire")]
pub struct Quantities(pub(crate) [u64; UNIT_COUNT], u8);

/// How `Quantities` is encoded: the quantities only (the mask follows from them).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename = "Quantities")]
struct QuantitiesOnWire([u64; UNIT_COUNT]);

impl From<QuantitiesOnWire> for Quantities {
    fn from(wire: QuantitiesOnWire) -> Quantities {
        Quantities::from_values(wire.0)
    }
}

impl From<Quantities> for QuantitiesOnWire {
    fn from(quantities: Quantities) -> QuantitiesOnWire {
        QuantitiesOnWire(quantities.0)
    }
}

impl Quantities {
    /// Validates `(unit, quantity)` pairs: at least one, no unit twice, each in 1..=2^40.
    #[inline]
    pub fn new(pairs: &[(Unit, u64)]) -> Result<Quantities, Error> {
        let mut quantities = Quantities::default();
        quantities.parse(pairs)?;
        Ok(quantities)
    }

    /// `new`, written into `self` (all zero) where it will be read: the hot path. Built in a
    /// local and then moved, the quantities were stored a word at a time and at once read back
    /// 16 bytes at a time, a load the CPU cannot forward from those stores, which stalled every
    /// admission for about a sixth of its time (perf, hot key: `consume_into` 82 -> 67 ns).
    /// Always inlined: outlined (as the compiler chose once `admit` grew), a hot-key
    /// `consume_into` took 16 more instructions (callgrind: 995.6 against 979.6).
    #[inline(always)]
    pub(crate) fn parse(&mut self, pairs: &[(Unit, u64)]) -> Result<(), Error> {
        debug_assert!(self.is_empty() && self.1 == 0);
        // The usual request, one unit: nothing to find twice (callgrind, hot key: 965 -> 953
        // instructions per `consume_into`). Anything wrong goes to the loop, which names it.
        if let [(unit, quantity)] = *pairs {
            if (1..=MAX_QUANTITY).contains(&quantity) {
                self.0[unit.index()] = quantity;
                self.1 = 1 << unit.index();
                return Ok(());
            }
        }
        if pairs.is_empty() {
            return Err(Error::invalid(
                "quantities",
                "give at least one (unit, quantity)",
            ));
        }
        for &(unit, quantity) in pairs {
            let problem = if quantity == 0 {
                format!("{unit}: a quantity must be at least 1")
            } else if quantity > MAX_QUANTITY {
                format!("{unit}: {quantity} is more than the largest quantity, {MAX_QUANTITY}")
            } else if self.1 & (1 << unit.index()) != 0 {
                format!("{unit} is given twice")
            } else {
                self.0[unit.index()] = quantity;
                self.1 |= 1 << unit.index();
                continue;
            };
            *self = Quantities::default();
            return Err(Error::invalid("quantities", problem));
        }
        Ok(())
    }

    /// Quantities as they are (each at most `MAX_QUANTITY`), with their mask worked out.
    pub(crate) fn from_values(values: [u64; UNIT_COUNT]) -> Quantities {
        let mut mask = 0u8;
        for (index, quantity) in values.iter().enumerate() {
            mask |= u8::from(*quantity != 0) << index;
        }
        Quantities(values, mask)
    }

    /// Like `new`, but an empty list (nothing used) is allowed: for settling a reservation.
    pub fn new_allowing_none(pairs: &[(Unit, u64)]) -> Result<Quantities, Error> {
        if pairs.is_empty() {
            return Ok(Quantities::default());
        }
        Quantities::new(pairs)
    }

    pub fn get(&self, unit: Unit) -> u64 {
        self.0[unit.index()]
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|quantity| *quantity == 0)
    }

    /// The units present, as a bit mask (bit `i` for unit index `i`).
    #[inline]
    pub(crate) fn unit_mask(&self) -> u8 {
        debug_assert_eq!(self.1, Quantities::from_values(self.0).1);
        self.1
    }

    /// The sum of every quantity (at most 7 x 2^40: cannot overflow).
    pub fn sum(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn pairs(&self) -> impl Iterator<Item = (Unit, u64)> + '_ {
        Unit::ALL
            .into_iter()
            .filter(|unit| self.0[unit.index()] > 0)
            .map(|unit| (unit, self.0[unit.index()]))
    }

    /// Units in `self` beyond `other`, and units in `other` beyond `self`.
    pub(crate) fn differences(&self, other: &Quantities) -> (Quantities, Quantities) {
        let mut more = [0; UNIT_COUNT];
        let mut less = [0; UNIT_COUNT];
        for index in 0..UNIT_COUNT {
            more[index] = self.0[index].saturating_sub(other.0[index]);
            less[index] = other.0[index].saturating_sub(self.0[index]);
        }
        (Quantities::from_values(more), Quantities::from_values(less))
    }

    /// `sum(quantity * weight)`, or an error naming the overflow.
    pub(crate) fn weighted(&self, weights: &[u64; UNIT_COUNT]) -> Result<u64, Error> {
        let mut sum = 0u64;
        for (quantity, weight) in self.0.iter().zip(weights) {
            sum = quantity
                .checked_mul(*weight)
                .and_then(|part| sum.checked_add(part))
                .ok_or(Error::Overflow {
                    field: "quantities",
                })?;
        }
        Ok(sum)
    }
}

/// Where an admitted request was charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ChargedTo {
    PlanQuota { plan: PlanId },
    Credits { micros: u64 },
    PayAsYouGo { micros: u64 },
}

/// One limit's state as seen by a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct LimitStatus {
    /// Index into the plan's `limits`.
    pub limit: u8,
    pub used: u64,
    pub amount: u64,
    /// When everything counted now will have aged out (rolling) or the period ends (calendar);
    /// `None` for an empty rolling window.
    pub reset_at_ms: Option<u64>,
}

impl LimitStatus {
    pub fn remaining(&self) -> u64 {
        self.amount.saturating_sub(self.used)
    }
}

/// One item per limit a request touched (its status in a decision, its hold in a receipt),
/// inline so the hot path allocates nothing. Slots past `len` are left uninitialised: a
/// decision is built on every admission, and zeroing four unused statuses each time was a
/// measurable part of it. Encoded as a list of the used slots only (the log stores decisions
/// and receipts).
#[derive(Clone, Copy)]
pub struct PerLimit<T: PerLimitItem> {
    len: u8,
    items: [MaybeUninit<T>; MAX_LIMITS_PER_RESOURCE],
}

/// What a `PerLimit` holds, and what a list too long to decode is called in the error.
pub trait PerLimitItem: Copy {
    const TOO_MANY: &'static str;
}

/// The statuses of the limits a request touched.
pub type LimitStatuses = PerLimit<LimitStatus>;

impl PerLimitItem for LimitStatus {
    const TOO_MANY: &'static str = "at most 4 limit statuses";
}

impl<T: PerLimitItem> Default for PerLimit<T> {
    #[inline]
    fn default() -> PerLimit<T> {
        PerLimit {
            len: 0,
            // SAFETY: an array of `MaybeUninit` needs no initialisation (the pattern of
            // `MaybeUninit`'s documentation). Written `[MaybeUninit::uninit(); N]`, the empty
            // slots were stored as zeros (a 161-byte memset before every `consume` by value):
            // LLVM merged them with `len`'s store.
            items: unsafe { MaybeUninit::uninit().assume_init() },
        }
    }
}

impl<T: PerLimitItem + PartialEq> PartialEq for PerLimit<T> {
    fn eq(&self, other: &PerLimit<T>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: PerLimitItem + Eq> Eq for PerLimit<T> {}

impl<T: PerLimitItem + serde::Serialize> serde::Serialize for PerLimit<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.as_slice())
    }
}

/// Decoded in place, without a `Vec` (a repeated request id decodes its first decision).
impl<'de, T: PerLimitItem + serde::Deserialize<'de>> serde::Deserialize<'de> for PerLimit<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items<T>(std::marker::PhantomData<T>);

        impl<'de, T: PerLimitItem + serde::Deserialize<'de>> serde::de::Visitor<'de> for Items<T> {
            type Value = PerLimit<T>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(T::TOO_MANY)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut items: A,
            ) -> Result<PerLimit<T>, A::Error> {
                let mut built = PerLimit::default();
                while let Some(item) = items.next_element::<T>()? {
                    if usize::from(built.len) == MAX_LIMITS_PER_RESOURCE {
                        // Counted to the end, so the error says how long the list was.
                        let mut len = MAX_LIMITS_PER_RESOURCE + 1;
                        while items.next_element::<T>()?.is_some() {
                            len += 1;
                        }
                        return Err(serde::de::Error::invalid_length(len, &T::TOO_MANY));
                    }
                    built.push(item);
                }
                Ok(built)
            }
        }

        deserializer.deserialize_seq(Items(std::marker::PhantomData))
    }
}

impl<T: PerLimitItem + std::fmt::Debug> std::fmt::Debug for PerLimit<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl<T: PerLimitItem> PerLimit<T> {
    /// The items of a list of at most `MAX_LIMITS_PER_RESOURCE`, or `None` if it is longer.
    pub fn from_slice(items: &[T]) -> Option<PerLimit<T>> {
        if items.len() > MAX_LIMITS_PER_RESOURCE {
            return None;
        }
        let mut built = PerLimit::default();
        for item in items {
            built.push(*item);
        }
        Some(built)
    }

    #[inline]
    fn clear(&mut self) {
        self.len = 0;
    }

    #[inline]
    fn push(&mut self, item: T) {
        debug_assert!(usize::from(self.len) < MAX_LIMITS_PER_RESOURCE);
        self.items[usize::from(self.len)].write(item);
        self.len += 1;
    }

    /// Writes the item at `position` without touching `len`; `set_len` then says how many
    /// are written (the admission path writes one per limit taken, in order, and sets the
    /// count once).
    #[inline]
    fn set(&mut self, position: usize, item: T) {
        // A request touches at most that many limits (`Amounts` holds no more).
        debug_assert!(position < MAX_LIMITS_PER_RESOURCE);
        if let Some(slot) = self.items.get_mut(position) {
            slot.write(item);
        }
    }

    /// # Safety
    /// The first `len` items must have been written (`set` or `push`).
    #[inline]
    unsafe fn set_len(&mut self, len: usize) {
        debug_assert!(len <= MAX_LIMITS_PER_RESOURCE);
        self.len = len as u8;
    }

    #[inline]
    pub fn as_slice(&self) -> &[T] {
        let len = usize::from(self.len).min(MAX_LIMITS_PER_RESOURCE);
        // SAFETY: the first `len` items were written by `push` or `set` (`set_len`'s contract).
        unsafe { std::slice::from_raw_parts(self.items.as_ptr().cast::<T>(), len) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Admission {
    pub charged_to: ChargedTo,
    /// The time the usage was counted at: the request's, or later if the key's windows had
    /// already seen a later time (a clock stepping back never writes into the past).
    pub at_ms: u64,
    /// The plan whose limits `limits` describes, if the key has a seat.
    pub plan: Option<PlanId>,
    pub limits: LimitStatuses,
    /// The team's balance after this request, when credits were involved.
    pub credits_balance_micros: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DenialReason {
    UnknownKey,
    /// The key exists but has neither a seat nor credits.
    NoResources,
    /// The key's plan (or, without a seat, its team's credits) does not cover the resource, and
    /// credits do not either: the resource has no price they could pay.
    ResourceNotCovered {
        resource: ResourceId,
    },
    OverRequestMaximum {
        unit: Unit,
        maximum: u64,
        requested: u64,
    },
    /// A limit is used up; waiting until `retry_at_ms` lets this request fit.
    QuotaExhausted {
        limit: u8,
        retry_at_ms: u64,
        retry_after_ms: u64,
        reset_at_ms: u64,
    },
    /// The request is larger than the limit itself: waiting cannot help.
    ExceedsLimit {
        limit: u8,
        amount: u64,
        requested: u64,
    },
    InsufficientCredits {
        balance_micros: u64,
        price_micros: u64,
    },
    /// The key holds as many open reservations as its plan allows.
    TooManyReservations {
        open: u32,
        maximum: u32,
    },
    /// The key was revoked (`Engine::revoke_key`): nothing can let it through.
    KeyRevoked,
}

/// What could let a denied request through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Remedies {
    /// Credits the team would need to add for this request to be charged to credits.
    pub credits_needed_micros: Option<u64>,
    /// A plan a seat on would help, only ever one whose maximums allow the request and each of
    /// whose limits it touches is at least the request's amount on it: for a limit that denied,
    /// of those with a larger amount on it, the one with the smallest that takes the request on
    /// top of what is used on every limit it touches (a seat change keeps it), else the
    /// smallest that takes it once enough has reset; for a resource the key's plan does not
    /// cover (or a key without a seat), the cheapest such plan covering it; `None` when no plan
    /// can ever take the request; for a request over its plan's own maximum (not the
    /// resource's, which every plan keeps), likewise the cheapest plan that allows it; for a
    /// key holding as many open reservations as its plan allows, the covering plan with the
    /// fewest agents above that. In each case a plan that
    /// also covers every resource the key's plan covers comes first: one that drops some is
    /// offered only where no other can take the request.
    pub upgrade_to: Option<PlanId>,
    /// Waiting until then lets the request fit the plan.
    pub wait_until_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Denial {
    pub reason: DenialReason,
    pub plan: Option<PlanId>,
    pub limits: LimitStatuses,
    pub credits_balance_micros: Option<u64>,
    pub remedies: Remedies,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Decision {
    Admitted(Admission),
    Denied(Denial),
}

impl Decision {
    pub fn is_admitted(&self) -> bool {
        matches!(self, Decision::Admitted(_))
    }

    pub fn denied(reason: DenialReason) -> Decision {
        Decision::Denied(Denial {
            reason,
            plan: None,
            limits: LimitStatuses::default(),
            credits_balance_micros: None,
            remedies: Remedies::default(),
        })
    }
}

/// A plan a remembered decision named that the current policy no longer has
/// (`Decision::in_policy`): in a plan-quota charge, which needs one.
pub const GONE_PLAN: PlanId = PlanId(u16::MAX);
/// A resource a remembered denial named that the current policy no longer has.
pub const GONE_RESOURCE: ResourceId = ResourceId(u16::MAX);
/// A limit a remembered denial named that the plan no longer has.
pub const GONE_LIMIT: u8 = u8::MAX;

const _: () = assert!(crate::policy::MAX_PLANS < GONE_PLAN.0 as usize);
const _: () = assert!(crate::policy::MAX_RESOURCES < GONE_RESOURCE.0 as usize);
const _: () = assert!(crate::policy::MAX_LIMITS_PER_PLAN < GONE_LIMIT as usize);

impl ChargedTo {
    /// This charge, made under `from`, with its plan numbered as `to` numbers it (by name;
    /// `GONE_PLAN` if `to` no longer has it): a settlement names where its estimate was held
    /// as `Decision::in_policy` names a remembered decision's charge.
    pub(crate) fn in_policy(self, from: &Policy, to: &Policy) -> ChargedTo {
        match self {
            ChargedTo::PlanQuota { plan } => ChargedTo::PlanQuota {
                plan: from
                    .plans()
                    .get(plan.index())
                    .and_then(|plan| to.plan_id(&plan.name))
                    .unwrap_or(GONE_PLAN),
            },
            other => other,
        }
    }
}

impl Decision {
    /// This decision, made under `from`, with the plan, limits and resource it names as `to`
    /// numbers them: a policy swap may add, remove or reorder plans, limits and resources, and
    /// a request id's repeat answers the first decision with the names it had. Found by name;
    /// what `to` no longer has is left out: no plan (a plan-quota charge's `GONE_PLAN`), a
    /// limit's status dropped, a denial's limit `GONE_LIMIT`, its resource `GONE_RESOURCE`, no
    /// upgrade. The numbers (used, amounts, times, credits) are the first decision's.
    pub fn in_policy(&self, from: &Policy, to: &Policy) -> Decision {
        let plan_of = |plan: PlanId| {
            from.plans()
                .get(plan.index())
                .and_then(|plan| to.plan_id(&plan.name))
        };
        // A limit of `plan` (under `from`) by its index in the same plan under `to`.
        let limit_of = |plan: Option<PlanId>, limit: u8| -> Option<u8> {
            let old = from.plans().get(plan?.index())?;
            let name = &old.limits.get(usize::from(limit))?.name;
            let new = to.plan(plan_of(plan?)?);
            let index = new.limits.iter().position(|limit| limit.name == *name)?;
            u8::try_from(index).ok()
        };
        let statuses = |plan: Option<PlanId>, statuses: &LimitStatuses| {
            let mut kept = LimitStatuses::default();
            for status in statuses.as_slice() {
                if let Some(limit) = limit_of(plan, status.limit) {
                    kept.push(LimitStatus { limit, ..*status });
                }
            }
            kept
        };
        match *self {
            Decision::Admitted(admission) => Decision::Admitted(Admission {
                charged_to: admission.charged_to.in_policy(from, to),
                plan: admission.plan.and_then(plan_of),
                limits: statuses(admission.plan, &admission.limits),
                ..admission
            }),
            Decision::Denied(denial) => {
                let mut reason = denial.reason;
                match &mut reason {
                    DenialReason::ResourceNotCovered { resource } => {
                        *resource = from
                            .resources()
                            .get(resource.index())
                            .and_then(|resource| to.resource_id(&resource.name))
                            .unwrap_or(GONE_RESOURCE);
                    }
                    DenialReason::QuotaExhausted { limit, .. }
                    | DenialReason::ExceedsLimit { limit, .. } => {
                        *limit = limit_of(denial.plan, *limit).unwrap_or(GONE_LIMIT);
                    }
                    _ => {}
                }
                Decision::Denied(Denial {
                    reason,
                    plan: denial.plan.and_then(plan_of),
                    limits: statuses(denial.plan, &denial.limits),
                    remedies: Remedies {
                        upgrade_to: denial.remedies.upgrade_to.and_then(plan_of),
                        ..denial.remedies
                    },
                    ..denial
                })
            }
        }
    }
}

/// What an admitted request moved, so it can be refunded, settled or voided exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    pub charged_to: ChargedTo,
    /// The policy generation whose counter ids `holds` uses.
    pub generation: u32,
    pub holds: Holds,
}

/// A hold: `(counter, amount, epoch or period)`.
pub type Hold = (CounterId, u64, u64);

/// Units held on counters, one per limit taken.
pub type Holds = PerLimit<Hold>;

impl PerLimitItem for Hold {
    const TOO_MANY: &'static str = "at most 4 holds";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Consume,
    Check,
}

/// The amount a request adds to each limit of the plan it touches, computed before anything
/// changes so an overflow is an error with no effect.
pub(crate) struct Amounts {
    len: usize,
    /// Items past `len` are uninitialised (see `LimitStatuses`).
    items: [MaybeUninit<(u8, u64)>; MAX_LIMITS_PER_RESOURCE],
}

impl Amounts {
    /// `None` if an amount overflows (the caller names the error: building one here cost
    /// more than the whole computation on the admission path).
    #[inline]
    pub fn of(touches: &[Touch], quantities: &Quantities) -> Option<Amounts> {
        let mut amounts = Amounts::empty();
        amounts.fill(touches, quantities).then_some(amounts)
    }

    pub fn empty() -> Amounts {
        Amounts {
            len: 0,
            items: [MaybeUninit::uninit(); MAX_LIMITS_PER_RESOURCE],
        }
    }

    /// `of`, written in place: false if an amount overflows. The admission path uses this
    /// one: returned in an `Option`, the freshly written pairs were copied out with wide loads
    /// that could not be forwarded from the narrow stores that wrote them (a stall perf showed
    /// as the hottest instruction of a hot-key consume).
    #[inline(always)]
    pub fn fill(&mut self, touches: &[Touch], quantities: &Quantities) -> bool {
        let mut len = 0;
        for touch in touches.iter().take(MAX_LIMITS_PER_RESOURCE) {
            let amount = match touch.single {
                Some((unit, weight)) => match quantities.0[unit.index()].checked_mul(weight) {
                    Some(amount) => amount,
                    None => return false,
                },
                None => match quantities.weighted(&touch.weights) {
                    Ok(amount) => amount,
                    Err(_) => return false,
                },
            };
            if amount > 0 {
                if let Some(item) = self.items.get_mut(len) {
                    item.write((touch.limit, amount));
                    len += 1;
                }
            }
        }
        self.len = len;
        true
    }

    /// `fill` for a resource whose every touch takes one unit at weight 1
    /// (`ResourceAdmission::unit_at_weight_one`): `amount` (that unit's quantity) on each of
    /// `limits`, none if it is 0, as `fill` would write them.
    #[inline(always)]
    pub fn fill_at_weight_one(&mut self, limits: &[u8], amount: u64) {
        let mut len = 0;
        if amount > 0 {
            for (item, &limit) in self.items.iter_mut().zip(limits) {
                item.write((limit, amount));
                len += 1;
            }
        }
        self.len = len;
    }

    /// The first `(limit, amount)` larger than its limit's whole amount: a request no window
    /// can ever take.
    pub fn first_over_its_limit(&self, plan: &Plan) -> Option<(u8, u64)> {
        self.as_slice()
            .iter()
            .copied()
            .find(|&(limit, amount)| amount > plan.limits[usize::from(limit)].amount)
    }

    pub fn as_slice(&self) -> &[(u8, u64)] {
        let len = self.len.min(MAX_LIMITS_PER_RESOURCE);
        // SAFETY: `fill` wrote the first `len` items (the only way `len` grows).
        unsafe { std::slice::from_raw_parts(self.items.as_ptr().cast::<(u8, u64)>(), len) }
    }
}

/// Price of a request in micro-credits: `None` if the resource has no price.
pub(crate) fn price_micros(
    policy: &Policy,
    resource: ResourceId,
    quantities: &Quantities,
) -> Result<Option<u64>, Error> {
    let resource = policy.resource(resource);
    if !resource.priced {
        return Ok(None);
    }
    quantities.weighted(&resource.price_weights).map(Some)
}

/// The plan to suggest a seat on for a resource the key's plan does not cover (or a key with
/// no seat): the cheapest plan covering it whose limits and maximums can each take the
/// request; `None` if no plan can (suggesting the cheapest covering plan anyway, as an earlier
/// build did, offered a seat that would refuse the request too). For a key with a seat on
/// `current`, the cheapest such plan that also covers everything `current` covers, if one
/// does (else the cheapest of all): a move that gains the resource should not lose the key
/// the others it works with. A denial's path only: kept out of line, inlined it changed how
/// the admission path was inlined (5% more instructions per hot-key consume).
#[cold]
#[inline(never)]
pub(crate) fn cover_upgrade_for(
    policy: &Policy,
    current: Option<&Plan>,
    resource: ResourceId,
    quantities: &Quantities,
) -> Option<PlanId> {
    let able = |plan: &Plan| can_ever_take(plan, resource, quantities);
    current
        .and_then(|current| {
            crate::policy::cheapest_plan(policy.plans(), |plan| {
                able(plan) && keeps_coverage(current, plan)
            })
        })
        .or_else(|| crate::policy::cheapest_plan(policy.plans(), able))
}

/// Whether `candidate` covers every resource `current` covers: a seat moved to it loses the
/// key no resource it had.
pub(crate) fn keeps_coverage(current: &Plan, candidate: &Plan) -> bool {
    current
        .covers
        .iter()
        .zip(&candidate.covers)
        .all(|(&had, &has)| !had || has)
}

/// Whether a seat on `plan` could ever admit `quantities` of `resource`: the plan covers it,
/// its maximums allow them, and each limit they touch is at least their amount on it.
pub(crate) fn can_ever_take(plan: &Plan, resource: ResourceId, quantities: &Quantities) -> bool {
    let index = resource.index();
    plan.covers[index]
        && over_maximum(&plan.maximums[index], quantities).is_none()
        && Amounts::of(&plan.touches[index], quantities)
            .is_some_and(|amounts| amounts.first_over_its_limit(plan).is_none())
}

/// Whether a seat on `candidate` would admit `quantities` of `resource` now, counting on each
/// of its limits what the key has counted on the same meter and span: on a limit of its
/// current plan, or on a counter kept dormant from an earlier seat (a seat change carries
/// either to the candidate's limit, as `KeyUsage::rearranged` does); nothing where the key has
/// none.
fn takes_now(
    policy: &Policy,
    usage: &KeyUsage,
    candidate: &Plan,
    request: (ResourceId, &Quantities),
    at_ms: u64,
) -> bool {
    let (resource, quantities) = request;
    let Some(amounts) = Amounts::of(&candidate.touches[resource.index()], quantities) else {
        return false;
    };
    amounts.as_slice().iter().all(|&(limit_index, amount)| {
        let limit = &candidate.limits[usize::from(limit_index)];
        // The counter a seat change would give this limit (`KeyUsage::rearranged`): the same
        // one, else the same meter over the same span with other buckets.
        let same_span = |counter: &&crate::ledger::Counter| {
            let spec = policy.counter(counter.id);
            spec.meter == limit.meter && spec.window.span_equals(limit.window)
        };
        let used = usage
            .counters
            .iter()
            .find(|counter| counter.id == limit.counter)
            .or_else(|| usage.counters.iter().find(same_span))
            .map_or(0, |counter| {
                let window = policy.counter(counter.id).window;
                let own = Limit {
                    name: Box::from(""),
                    meter: limit.meter,
                    counter: counter.id,
                    amount: limit.amount,
                    window,
                    shape: window.shape(),
                };
                status_of(policy, &own, &counter.state, limit_index, at_ms).used
            });
        used.checked_add(amount)
            .is_some_and(|total| total <= limit.amount)
    })
}

/// The plan to suggest for a request of `quantities` of `resource` that limit `limit_index` of
/// the key's plan refused: of the plans with a larger amount on that limit's meter and span
/// (smallest first) that can ever take the request (`can_ever_take`), the first that covers
/// every resource the key's plan covers (`keeps_coverage`) and takes the request now on every
/// limit it touches, else the first that keeps the coverage, else the first that takes it
/// now, else the first; `None` if none can. A larger amount on the refusing limit alone is
/// not enough: the plan's other limits, or its maximums, may refuse the request too. And a
/// plan that drops a resource the key works with is a trap, not a remedy (a Plus key out of
/// image-01 images was offered Plus-Highspeed, which has more of them and no m2.7, where Max
/// has both).
#[cold]
#[inline(never)]
fn upgrade_for(
    policy: &Policy,
    plan_id: PlanId,
    usage: &KeyUsage,
    limit_index: u8,
    request: (ResourceId, &Quantities),
    at_ms: u64,
) -> Option<PlanId> {
    let (resource, quantities) = request;
    let plan = policy.plan(plan_id);
    let upgrades = plan.limit_upgrades.get(usize::from(limit_index))?;
    let able = || {
        upgrades
            .iter()
            .map(|&(_, candidate)| candidate)
            .filter(|&candidate| can_ever_take(policy.plan(candidate), resource, quantities))
    };
    let takes =
        |candidate: PlanId| takes_now(policy, usage, policy.plan(candidate), request, at_ms);
    let keeping = || able().filter(|&candidate| keeps_coverage(plan, policy.plan(candidate)));
    keeping()
        .find(|&candidate| takes(candidate))
        .or_else(|| keeping().next())
        .or_else(|| able().find(|&candidate| takes(candidate)))
        .or_else(|| able().next())
}

/// Checks per-request maximums (the resource's, then the plan's).
pub(crate) fn over_maximum(
    maximums: &[u64; UNIT_COUNT],
    quantities: &Quantities,
) -> Option<DenialReason> {
    Unit::ALL.into_iter().find_map(|unit| {
        let maximum = maximums[unit.index()];
        let requested = quantities.get(unit);
        (maximum > 0 && requested > maximum).then_some(DenialReason::OverRequestMaximum {
            unit,
            maximum,
            requested,
        })
    })
}

/// A decision and what it moved, filled in place along the admission path. A `Decision` is a
/// few hundred bytes: returned by value through every layer (and every `?`) it cost one
/// `memcpy` per layer, a fifth of a hot-key admission (measured with perf). The decision is
/// borrowed, so `Engine::consume_into` writes straight into the caller's.
pub(crate) struct Verdict<'d> {
    pub decision: &'d mut Decision,
    pub receipt: Option<Receipt>,
    /// The decision is the one remembered for the request's id: nothing was counted now.
    pub replayed: bool,
    /// The caller waits for the decision's event itself (`Engine::submit`): `decide` only
    /// notes its sequence number, as it does for a request id's first decision.
    pub defer_wait: bool,
    /// The sequence number of the event that logged the decision, when its caller waits for
    /// it (a request id's first decision, `defer_wait`); 0 otherwise.
    pub logged_seq: u64,
    /// The caller can expire ended leases and decide again (it holds no lock): a denial that
    /// a reservation's ended lease may have caused is then left unlogged, with
    /// `lease_ended_ms` set, instead of answered.
    pub may_expire_leases: bool,
    /// The time (the request's, or the clock's if earlier) by which a lease had ended when
    /// this verdict's denial was left for the caller to decide again; 0: not left.
    pub lease_ended_ms: u64,
    /// A reservation's lease had ended by the request's time and the clock's when the decision
    /// began (`may_expire_leases` only): a plan that refuses the request may be refusing on
    /// that hold, so the refusal is left as the plan's denial (for the caller to expire the
    /// lease and decide again) instead of being charged to credits, which would make the team
    /// pay for what its plan covers once the lease is expired.
    pub ended_lease_may_hold: bool,
}

impl<'d> Verdict<'d> {
    /// A verdict written into `decision` (whatever it holds is overwritten once decided).
    pub fn new(decision: &'d mut Decision) -> Verdict<'d> {
        Verdict {
            decision,
            receipt: None,
            replayed: false,
            defer_wait: false,
            logged_seq: 0,
            may_expire_leases: false,
            lease_ended_ms: 0,
            ended_lease_may_hold: false,
        }
    }

    /// Sets a denial with no receipt.
    pub fn deny(&mut self, reason: DenialReason) {
        *self.decision = Decision::denied(reason);
        self.receipt = None;
    }
}

/// Tries to take `amounts` from the limits of the key's plan (`plan`, numbered `plan_id`, which
/// the caller has looked up already), writing the admission and its receipt into `verdict`;
/// true if admitted. False leaves `verdict`'s decision half written, for the caller to
/// overwrite (with `plan_refusal`, or a charge to credits). In `Check` mode nothing is taken or
/// moved (not even a window's head). `at_ms` has been validated. A consume notes the slot it
/// wrote in `cell` (the cell `usage` came from), so the key's next request prefetches it.
/// Never inlined, as the compiler chose until a cold branch of `decide` changed its weighing:
/// inlined into `decide`, a hot-key consume ran 29 instructions more (callgrind).
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn try_quota(
    policy: &Policy,
    plan_id: PlanId,
    plan: &Plan,
    usage: &KeyUsage,
    cell: &UsageCell,
    amounts: &Amounts,
    at_ms: u64,
    mode: Mode,
    verdict: &mut Verdict<'_>,
) -> bool {
    debug_assert!(std::ptr::eq(plan, policy.plan(plan_id)));
    let charged_to = ChargedTo::PlanQuota { plan: plan_id };
    let admission = admitted_in_place(verdict.decision, charged_to, at_ms, Some(plan_id));
    let receipt = verdict.receipt.insert(Receipt {
        charged_to,
        generation: policy.generation,
        holds: Holds::default(),
    });
    // The rolling windows taken, to record in their buckets once every limit has fitted.
    let mut taken_rings = PerLimit::<TakenRing<'_>>::default();
    for (position, &(limit_index, amount)) in amounts.as_slice().iter().enumerate() {
        let limit = &plan.limits[usize::from(limit_index)];
        let state = &usage.counters[usize::from(limit_index)].state;
        debug_assert_eq!(usage.counters[usize::from(limit_index)].id, limit.counter);
        match take(policy, limit, state, amount, at_ms, mode) {
            Some((used, reset_at_ms, time, counted_ms)) => {
                admission.limits.set(
                    position,
                    LimitStatus {
                        limit: limit_index,
                        used,
                        amount: limit.amount,
                        reset_at_ms: Some(reset_at_ms),
                    },
                );
                receipt.holds.set(position, (limit.counter, amount, time));
                admission.at_ms = admission.at_ms.max(counted_ms);
                if let (WindowState::Rolling(ring), Some(shape)) = (state, limit.shape) {
                    taken_rings.push(TakenRing {
                        ring,
                        shape,
                        epoch: time,
                        amount,
                    });
                }
            }
            None => {
                if mode == Mode::Consume {
                    // SAFETY: a hold was set at every position before this one.
                    unsafe { receipt.holds.set_len(position) };
                    rollback(usage, amounts, &receipt.holds, position);
                }
                // The caller decides what the refusal says (`plan_refusal`), or whether credits
                // pay instead (then the refusal's retry time is never worked out).
                verdict.receipt = None;
                return false;
            }
        }
    }
    let taken = amounts.as_slice().len();
    // SAFETY: every limit fitted, so a status and a hold were set at each of its positions.
    unsafe {
        admission.limits.set_len(taken);
        receipt.holds.set_len(taken);
    }
    if mode == Mode::Consume {
        let mut noted = false;
        for taken in taken_rings.as_slice() {
            let slot = taken
                .ring
                .record_noting_slot(taken.shape, taken.epoch, taken.amount);
            if !noted {
                cell.note_slot(slot);
                noted = true;
            }
        }
    }
    true
}

/// A rolling window `try_quota` took `amount` from in bucket `epoch`, to record there once
/// every limit has fitted. Listed in a `PerLimit` (as many as were taken, nothing zeroed): an
/// array of four `Option`s cost four stores to clear and four tests to walk.
#[derive(Clone, Copy)]
struct TakenRing<'a> {
    ring: &'a RollingWindow,
    shape: RollingShape,
    epoch: u64,
    amount: u64,
}

impl PerLimitItem for TakenRing<'_> {
    const TOO_MANY: &'static str = "at most 4 rolling windows taken";
}

/// Makes `decision` an admission charged to `charged_to`, with no limit statuses yet, and
/// returns it. A decision that is an admission already (a caller reusing one) is rewritten
/// field by field: writing a whole `Admission` also wrote its unused status slots.
#[inline]
fn admitted_in_place(
    decision: &mut Decision,
    charged_to: ChargedTo,
    at_ms: u64,
    plan: Option<PlanId>,
) -> &mut Admission {
    if let Decision::Admitted(admission) = decision {
        admission.charged_to = charged_to;
        admission.at_ms = at_ms;
        admission.plan = plan;
        admission.limits.clear();
        admission.credits_balance_micros = None;
    } else {
        *decision = Decision::Admitted(Admission {
            charged_to,
            at_ms,
            plan,
            limits: LimitStatuses::default(),
            credits_balance_micros: None,
        });
    }
    match decision {
        Decision::Admitted(admission) => admission,
        Decision::Denied(_) => unreachable!("just made an admission"),
    }
}

/// Takes `amount` from one limit (in `Check` mode only looks): `Some((used, reset_at_ms, epoch
/// or period, counted_ms))`, or `None` if it does not fit. `counted_ms` is the time the amount
/// counts at: `at_ms`, or later if the window had already seen a later time (a rolling
/// window's newest bucket; a calendar counter's later period, from its start).
fn take(
    policy: &Policy,
    limit: &Limit,
    state: &WindowState,
    amount: u64,
    at_ms: u64,
    mode: Mode,
) -> Option<(u64, u64, u64, u64)> {
    match (state, limit.window) {
        (WindowState::Rolling(window), Window::Rolling { .. }) => {
            let shape = limit.shape.unwrap_or_else(|| unreachable!());
            let (epoch, used) = match mode {
                Mode::Consume => {
                    let epoch = window.advance(shape, shape.epoch(at_ms));
                    (epoch, window.try_reserve(amount, limit.amount).ok()?)
                }
                Mode::Check => {
                    let (epoch, used) = window.used_at(shape, shape.epoch(at_ms));
                    (
                        epoch,
                        used.checked_add(amount)
                            .filter(|next| *next <= limit.amount)?,
                    )
                }
            };
            Some((
                used,
                shape.release_ms(epoch),
                epoch,
                at_ms.max(epoch * shape.bucket_ms),
            ))
        }
        (WindowState::Calendar(counter), Window::Calendar(kind)) => {
            let period = policy.calendar().period_of(kind, at_ms);
            let now = match mode {
                Mode::Consume => counter.try_add(period.index, amount, limit.amount).ok()?,
                Mode::Check => {
                    let now = counter.used(period.index);
                    let used = now
                        .used
                        .checked_add(amount)
                        .filter(|next| *next <= limit.amount)?;
                    crate::window::PeriodUse {
                        period: now.period,
                        used,
                    }
                }
            };
            // A timestamp going backwards is counted in the newest period the counter has
            // seen (`effective` in `window`), never an earlier one.
            debug_assert!(now.period >= period.index);
            let (reset, counted_ms) = if now.period == period.index {
                (period.end_ms, at_ms)
            } else {
                let counted = policy.calendar().period_bounds(kind, now.period);
                (counted.end_ms, counted.start_ms)
            };
            Some((now.used, reset, u64::from(now.period), counted_ms))
        }
        _ => unreachable!("a key's counter always has its limit's kind of window"),
    }
}

/// When `amount` more fits `limit` (never earlier than the truth, at most one bucket later for a
/// rolling window), looking without changing anything; `at_ms` if it fits now.
fn fits_at(policy: &Policy, limit: &Limit, state: &WindowState, amount: u64, at_ms: u64) -> u64 {
    match (state, limit.window) {
        (WindowState::Rolling(window), Window::Rolling { .. }) => {
            let shape = limit.shape.unwrap_or_else(|| unreachable!());
            let (epoch, used) = window.used_at(shape, shape.epoch(at_ms));
            let Some(needed) = used
                .saturating_add(amount)
                .checked_sub(limit.amount)
                .filter(|needed| *needed > 0)
            else {
                return at_ms;
            };
            let drained = shape.release_ms(epoch);
            window
                .release_time(shape, epoch, needed)
                .unwrap_or(drained)
                .max(at_ms)
        }
        (WindowState::Calendar(counter), Window::Calendar(kind)) => {
            let period = policy.calendar().period_of(kind, at_ms);
            let now = counter.used(period.index);
            if now.used.saturating_add(amount) <= limit.amount {
                at_ms
            } else if now.period == period.index {
                period.end_ms
            } else {
                period_end_ms(policy.calendar(), kind, now.period, at_ms)
            }
        }
        _ => unreachable!("a key's counter always has its limit's kind of window"),
    }
}

/// The denial of a request larger than one of the limits it touches (the first in the plan's
/// order), if it is one: waiting cannot help it.
fn exceeded(
    policy: &Policy,
    plan_id: PlanId,
    usage: &KeyUsage,
    amounts: &Amounts,
    request: (ResourceId, &Quantities),
    at_ms: u64,
) -> Option<Denial> {
    let plan = policy.plan(plan_id);
    let (limit_index, amount) = amounts.first_over_its_limit(plan)?;
    let limit = &plan.limits[usize::from(limit_index)];
    let reason = DenialReason::ExceedsLimit {
        limit: limit_index,
        amount: limit.amount,
        requested: amount,
    };
    // A plan whose whole amount still cannot take the request would not help.
    let remedies = Remedies {
        upgrade_to: upgrade_for(policy, plan_id, usage, limit_index, request, at_ms),
        ..Remedies::default()
    };
    Some(quota_denial(
        policy, plan_id, usage, amounts, at_ms, reason, remedies,
    ))
}

/// What a plan that could not take `amounts` says: a request larger than one of the limits
/// itself can never fit, and says so (only a request some limit refused can be one: a take
/// checks `used + amount`); otherwise which limit keeps it out longest and when it will fit.
/// `request` is the resource and quantities asked for, to find a plan that would take them.
pub(crate) fn plan_refusal(
    policy: &Policy,
    plan_id: PlanId,
    usage: &KeyUsage,
    amounts: &Amounts,
    request: (ResourceId, &Quantities),
    at_ms: u64,
) -> Denial {
    exceeded(policy, plan_id, usage, amounts, request, at_ms)
        .unwrap_or_else(|| exhausted(policy, plan_id, usage, amounts, request, at_ms))
}

/// The status of every limit `amounts` touches, as of `at_ms`: what an admission charged to
/// credits reports for the plan that could not take it.
pub(crate) fn plan_statuses(
    policy: &Policy,
    plan_id: PlanId,
    usage: &KeyUsage,
    amounts: &Amounts,
    at_ms: u64,
) -> LimitStatuses {
    let plan = policy.plan(plan_id);
    let mut limits = LimitStatuses::default();
    for &(limit_index, _) in amounts.as_slice() {
        let limit = &plan.limits[usize::from(limit_index)];
        let state = &usage.counters[usize::from(limit_index)].state;
        limits.push(status_of(policy, limit, state, limit_index, at_ms));
    }
    limits
}

/// The denial of a request some limit could not take: the limit that keeps it out longest, when
/// it will fit (the latest of every limit's fit time), and the remedies.
fn exhausted(
    policy: &Policy,
    plan_id: PlanId,
    usage: &KeyUsage,
    amounts: &Amounts,
    request: (ResourceId, &Quantities),
    at_ms: u64,
) -> Denial {
    let plan = policy.plan(plan_id);
    let mut binding = None;
    for &(limit_index, amount) in amounts.as_slice() {
        let limit = &plan.limits[usize::from(limit_index)];
        let state = &usage.counters[usize::from(limit_index)].state;
        let retry_at = fits_at(policy, limit, state, amount, at_ms);
        if retry_at > at_ms && binding.is_none_or(|(_, latest)| retry_at > latest) {
            binding = Some((limit_index, retry_at));
        }
    }
    // Every limit fits now when the only obstacle was a concurrent request's reservation in
    // flight: retry at once.
    let (limit_index, retry_at_ms) = binding.unwrap_or((amounts.as_slice()[0].0, at_ms));
    let limit = &plan.limits[usize::from(limit_index)];
    let state = &usage.counters[usize::from(limit_index)].state;
    let status = status_of(policy, limit, state, limit_index, at_ms);
    let reset_at_ms = status.reset_at_ms.unwrap_or(retry_at_ms).max(retry_at_ms);
    let reason = DenialReason::QuotaExhausted {
        limit: limit_index,
        retry_at_ms,
        retry_after_ms: retry_at_ms - at_ms,
        reset_at_ms,
    };
    let remedies = Remedies {
        upgrade_to: upgrade_for(policy, plan_id, usage, limit_index, request, at_ms),
        wait_until_ms: Some(retry_at_ms),
        ..Remedies::default()
    };
    quota_denial(policy, plan_id, usage, amounts, at_ms, reason, remedies)
}

/// Gives back the first `taken` reservations of a request that another limit denied.
fn rollback(usage: &KeyUsage, amounts: &Amounts, holds: &Holds, taken: usize) {
    for (&(limit_index, amount), hold) in amounts.as_slice()[..taken].iter().zip(holds.as_slice()) {
        match &usage.counters[usize::from(limit_index)].state {
            WindowState::Rolling(window) => window.unreserve(amount),
            WindowState::Calendar(counter) => {
                // Nothing, if a concurrent request moved the counter to the next period
                // meanwhile: the held units stopped counting with theirs.
                let given = counter.refund(hold.2 as u32, amount);
                debug_assert!(
                    given == amount || given == 0,
                    "a calendar hold is given back whole, or its period has reset"
                );
            }
        }
    }
}

/// A quota denial with the status of every limit the request touches.
fn quota_denial(
    policy: &Policy,
    plan_id: PlanId,
    usage: &KeyUsage,
    amounts: &Amounts,
    at_ms: u64,
    reason: DenialReason,
    remedies: Remedies,
) -> Denial {
    Denial {
        reason,
        plan: Some(plan_id),
        limits: plan_statuses(policy, plan_id, usage, amounts, at_ms),
        credits_balance_micros: None,
        remedies,
    }
}

/// A limit's used, remaining and reset time as of `at_ms`, changing nothing.
pub(crate) fn status_of(
    policy: &Policy,
    limit: &Limit,
    state: &WindowState,
    limit_index: u8,
    at_ms: u64,
) -> LimitStatus {
    let (used, reset_at_ms) = match (state, limit.window) {
        (WindowState::Rolling(window), Window::Rolling { .. }) => {
            let shape = limit.shape.unwrap_or_else(|| unreachable!());
            let (epoch, used) = window.used_at(shape, shape.epoch(at_ms));
            (used, window.drain_time(shape, epoch).filter(|_| used > 0))
        }
        (WindowState::Calendar(counter), Window::Calendar(kind)) => {
            let period = policy.calendar().period_of(kind, at_ms);
            let now = counter.used(period.index);
            // A calendar window resets at its period's end whether or not anything is counted.
            (
                now.used,
                Some(period_end_ms(policy.calendar(), kind, now.period, at_ms)),
            )
        }
        _ => unreachable!("a key's counter always has its limit's kind of window"),
    };
    LimitStatus {
        limit: limit_index,
        used,
        amount: limit.amount,
        reset_at_ms,
    }
}

/// Charges a request to the team's credits, for a key whose plan could not take it. `denial`
/// is what the plan said (if the key has one); it is kept as the reason when credits fail too.
pub(crate) fn try_credits(
    team: &Team,
    price: Option<u64>,
    at_ms: u64,
    plan: Option<PlanId>,
    denial: Option<Denial>,
    mode: Mode,
    fallback: DenialReason,
) -> Decision {
    let balance = team.balance_micros();
    let Some(price) = price else {
        return Decision::Denied(denial.unwrap_or_else(|| bare_denial(fallback, plan)));
    };
    if balance > 0 {
        let limits = denial
            .as_ref()
            .map(|denial| denial.limits)
            .unwrap_or_default();
        if let Some(admission) = credits_admission(team, price, at_ms, plan, limits, mode) {
            return Decision::Admitted(admission);
        }
    }
    let mut denied = denial.unwrap_or_else(|| {
        let reason = if balance > 0 && !matches!(fallback, DenialReason::ResourceNotCovered { .. })
        {
            DenialReason::InsufficientCredits {
                balance_micros: balance,
                price_micros: price,
            }
        } else {
            fallback
        };
        bare_denial(reason, plan)
    });
    denied.credits_balance_micros = Some(balance);
    denied.remedies.credits_needed_micros = Some(price.saturating_sub(balance).max(1));
    Decision::Denied(denied)
}

/// Charges `price` to the team's credits (in `Check` mode, sees whether it could) and returns
/// the admission, reporting `limits` (the plan's, if it could not take the request); `None`
/// if the balance is short.
pub(crate) fn credits_admission(
    team: &Team,
    price: u64,
    at_ms: u64,
    plan: Option<PlanId>,
    limits: LimitStatuses,
    mode: Mode,
) -> Option<Admission> {
    let after = match mode {
        Mode::Consume => team.charge(price).ok()?,
        Mode::Check => team.balance_micros().checked_sub(price)?,
    };
    Some(Admission {
        charged_to: ChargedTo::Credits { micros: price },
        at_ms,
        plan,
        limits,
        credits_balance_micros: Some(after),
    })
}

fn bare_denial(reason: DenialReason, plan: Option<PlanId>) -> Denial {
    Denial {
        reason,
        plan,
        limits: LimitStatuses::default(),
        credits_balance_micros: None,
        remedies: Remedies::default(),
    }
}

/// The reason a calendar limit reports in words, e.g. "resets at local midnight".
pub fn window_reset_words(window: Window) -> &'static str {
    match window {
        Window::Rolling { .. } => "as usage ages out of the rolling window",
        Window::Calendar(CalendarPeriod::Daily) => "at local midnight",
        Window::Calendar(CalendarPeriod::Weekly) => "at local midnight on the week's first day",
        Window::Calendar(CalendarPeriod::Monthly) => "at local midnight on the 1st",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pair shortcut of `Quantities::parse` takes exactly what the loop takes, and
    /// leaves what it refuses to the loop's messages.
    #[test]
    fn one_pair_is_checked_as_the_loop_checks_it() {
        let largest = Quantities::new(&[(Unit::Tokens, MAX_QUANTITY)]).expect("the largest");
        assert_eq!(largest.get(Unit::Tokens), MAX_QUANTITY);
        assert_eq!(largest.unit_mask(), 1 << Unit::Tokens.index());
        assert_eq!(largest, Quantities::from_values(largest.0));
        for (quantity, says) in [(0, "at least 1"), (MAX_QUANTITY + 1, "largest quantity")] {
            let error = Quantities::new(&[(Unit::Tokens, quantity)]).expect_err("refused");
            assert!(error.to_string().contains(says), "{error}");
        }
        let twice = Quantities::new(&[(Unit::Tokens, 1), (Unit::Tokens, 2)]).expect_err("twice");
        assert!(twice.to_string().contains("given twice"), "{twice}");
    }

    #[test]
    fn quantities_carry_the_mask_of_their_units_and_encode_as_the_quantities_alone() {
        let quantities =
            Quantities::new(&[(Unit::Songs, 1), (Unit::Seconds, 280)]).expect("valid quantities");
        let expected = (1 << Unit::Songs.index()) | (1 << Unit::Seconds.index());
        assert_eq!(quantities.unit_mask(), expected);
        let values = quantities.0;
        assert_eq!(
            bincode::serialize(&quantities).expect("encode"),
            bincode::serialize(&values).expect("encode")
        );
        assert_eq!(
            serde_json::to_string(&quantities).expect("encode"),
            serde_json::to_string(&values).expect("encode")
        );
        let decoded: Quantities =
            bincode::deserialize(&bincode::serialize(&values).expect("encode")).expect("decode");
        assert_eq!(decoded, quantities);
        assert_eq!(decoded.unit_mask(), expected);
        let (more, less) = quantities.differences(&Quantities::new(&[(Unit::Songs, 1)]).unwrap());
        assert_eq!(more.unit_mask(), 1 << Unit::Seconds.index());
        assert_eq!(less.unit_mask(), 0);
    }

    /// A list of up to four items decodes in place as it was encoded, in bincode and JSON; a
    /// longer one is an error that says how long it was.
    #[test]
    fn a_per_limit_list_decodes_up_to_four_items_and_names_a_longer_ones_length() {
        let status = |limit: u8| LimitStatus {
            limit,
            used: u64::from(limit) * 1_000,
            amount: u64::MAX - u64::from(limit),
            reset_at_ms: (limit % 2 == 1).then_some(7),
        };
        for len in 0..=MAX_LIMITS_PER_RESOURCE as u8 {
            let items: Vec<LimitStatus> = (0..len).map(status).collect();
            let list = LimitStatuses::from_slice(&items).expect("at most four");
            let bytes = bincode::serialize(&list).expect("encode");
            assert_eq!(bytes, bincode::serialize(&items).expect("encode"));
            let decoded: LimitStatuses = bincode::deserialize(&bytes).expect("decode");
            assert_eq!(decoded.as_slice(), &items[..]);
            let json = serde_json::to_string(&list).expect("encode");
            let decoded: LimitStatuses = serde_json::from_str(&json).expect("decode");
            assert_eq!(decoded.as_slice(), &items[..]);
        }
        for len in [5u8, 9] {
            let items: Vec<LimitStatus> = (0..len).map(status).collect();
            let bytes = bincode::serialize(&items).expect("encode");
            let json = serde_json::to_string(&items).expect("encode");
            let errors = [
                bincode::deserialize::<LimitStatuses>(&bytes)
                    .expect_err("too long")
                    .to_string(),
                serde_json::from_str::<LimitStatuses>(&json)
                    .expect_err("too long")
                    .to_string(),
            ];
            for error in errors {
                assert!(
                    error.contains(&format!("invalid length {len}"))
                        && error.contains("at most 4 limit statuses"),
                    "{len} items: {error}"
                );
            }
        }
    }

    /// The admission path writes one status and one hold per limit at its position and sets
    /// their counts once: every limit taken is reported, in plan order, and a reused decision
    /// keeps none of the statuses of the one before.
    #[test]
    fn an_admission_reports_each_limit_it_took_once_and_a_reused_decision_only_those() {
        use crate::{Engine, EngineOptions, ManualClock, UsageRequest};
        const AT: u64 = 1_790_000_000_000;
        let policy = Policy::from_toml_str(
            r#"
time_zone = "UTC"
[resources.chat]
units = ["requests", "tokens"]
[plans.P]
limits = [
  { resource = "chat", unit = "requests", amount = 100, window = "rolling:5h" },
  { resource = "chat", unit = "requests", amount = 1000, window = "daily" },
  { resource = "chat", unit = "requests", amount = 3, window = "weekly" },
  { resource = "chat", unit = "tokens", amount = 50, window = "daily" },
]
"#,
        )
        .expect("valid policy");
        let engine = Engine::new(
            policy,
            std::sync::Arc::new(ManualClock::new(AT)),
            EngineOptions::default(),
        )
        .expect("valid options");
        engine.create_user("u", "key", Some(AT)).expect("user");
        engine.assign_seat("@u", "u", "P", Some(AT)).expect("seat");
        let statuses = |decision: &Decision| match decision {
            Decision::Admitted(admission) => admission
                .limits
                .as_slice()
                .iter()
                .map(|status| (status.limit, status.used, status.remaining()))
                .collect::<Vec<_>>(),
            Decision::Denied(denial) => panic!("denied: {denial:?}"),
        };
        let both = [(Unit::Requests, 1), (Unit::Tokens, 5)];
        let mut decision = engine
            .consume(&UsageRequest::new("key", "chat", &both).at(AT))
            .expect("valid request");
        assert_eq!(
            statuses(&decision),
            [(0, 1, 99), (1, 1, 999), (2, 1, 2), (3, 5, 45)]
        );
        // The decision held four statuses; a request on three limits leaves three.
        let requests = [(Unit::Requests, 1)];
        let request = UsageRequest::new("key", "chat", &requests).at(AT + 1);
        engine
            .consume_into(&request, &mut decision)
            .expect("valid request");
        assert_eq!(statuses(&decision), [(0, 2, 98), (1, 2, 998), (2, 2, 1)]);
        // Two more requests do not fit the weekly limit of 3: refused whole, nothing counted.
        let two = [(Unit::Requests, 2)];
        let refused = engine
            .consume(&UsageRequest::new("key", "chat", &two).at(AT + 2))
            .expect("valid request");
        assert!(!refused.is_admitted());
        engine
            .consume_into(&request.at(AT + 3), &mut decision)
            .expect("valid request");
        assert_eq!(statuses(&decision), [(0, 3, 97), (1, 3, 997), (2, 3, 0)]);
    }
}
