//! The policy: resources with their units and prices, meters, windows, limits and plans, in a
//! human-edited TOML or JSON document; its validation (errors name the field and say why) and
//! its compilation into the dense, immutable tables that admission reads.

use std::collections::BTreeMap;
use std::fmt;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use jiff::civil::Weekday;

use crate::calendar::{Calendar, CalendarPeriod};

/// What a quantity counts. A usage request carries one quantity per unit it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Requests,
    Characters,
    Images,
    Videos,
    Songs,
    Seconds,
    Tokens,
}

pub const UNIT_COUNT: usize = 7;

impl Unit {
    pub const ALL: [Unit; UNIT_COUNT] = [
        Unit::Requests,
        Unit::Characters,
        Unit::Images,
        Unit::Videos,
        Unit::Songs,
        Unit::Seconds,
        Unit::Tokens,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Characters => "characters",
            Unit::Images => "images",
            Unit::Videos => "videos",
            Unit::Songs => "songs",
            Unit::Seconds => "seconds",
            Unit::Tokens => "tokens",
        }
    }

    pub fn parse(name: &str) -> Option<Unit> {
        Unit::ALL.into_iter().find(|unit| unit.name() == name)
    }

    /// The unit's position in per-unit arrays; also its stable code at the C boundary.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(index: usize) -> Option<Unit> {
        Unit::ALL.get(index).copied()
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// Bounds on everything a policy can make grow (TIGER_STYLE). Each is checked on load.
pub const MAX_NAME_BYTES: usize = 64;
pub const MAX_RESOURCES: usize = 256;
pub const MAX_METERS: usize = 256;
pub const MAX_PLANS: usize = 64;
pub const MAX_LIMITS_PER_PLAN: usize = 16;
/// The largest policy document, as compact JSON: a swap logs the whole document as one event
/// (`log::MAX_EVENT_BYTES`, 48 KiB), and every kept generation stays in memory. The shipped
/// Token Plan is under 6 KiB.
pub const MAX_POLICY_DOCUMENT_BYTES: usize = 40 * 1024;
/// `Policy::load` reads at most this much of a file: room for any document within
/// `MAX_POLICY_DOCUMENT_BYTES` and comments besides, while a mistaken path (a log segment, a
/// device) is refused rather than read whole into memory.
pub const MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;
const _: () = assert!(MAX_POLICY_DOCUMENT_BYTES + 1024 <= crate::log::MAX_EVENT_BYTES);
/// How many limits of one plan may apply to one resource: the admission path keeps them inline.
pub const MAX_LIMITS_PER_RESOURCE: usize = 4;
/// A rolling bucket counts up to `u32::MAX` (its slot packs a 32-bit lap tag and count).
pub const MAX_ROLLING_AMOUNT: u64 = u32::MAX as u64;
/// A calendar counter packs a 16-bit period tag and a 48-bit count into one atomic word.
pub const MAX_CALENDAR_AMOUNT: u64 = (1 << 48) - 1;
/// The largest quantity of one unit in one request.
pub const MAX_QUANTITY: u64 = 1 << 40;
/// The narrowest bucket: a millisecond, the resolution of tally's timestamps. Nothing else
/// needs a wider floor: a ring's memory, and the slots one move of its head sweeps, are bounded
/// by `MAX_BUCKETS_PER_WINDOW` whatever the width; its lap tags by the window's length
/// (`window::MIN_LAP_MS`); epochs, retry and reset times are exact integers of milliseconds.
pub const MIN_BUCKET_MS: u64 = 1;
/// The shortest rolling window. Every lap of a ring lasts longer (a window and a bucket), which
/// is what keeps a wide ring's lap tags from repeating within tally's range of timestamps
/// (`window::MIN_LAP_MS`); and it leaves room for 210 buckets (8 ms each).
pub const MIN_ROLLING_WINDOW_MS: u64 = 2 * SECOND_MS;
pub const MAX_BUCKETS_PER_WINDOW: u64 = 4_096;
pub const MAX_ROLLING_WINDOW_MS: u64 = 366 * DAY_MS;
pub const MAX_RESERVATIONS_PER_KEY: u32 = 4_096;
/// The longest unit name ("characters").
const MAX_UNIT_NAME_BYTES: usize = {
    let mut longest = 0;
    let mut index = 0;
    while index < UNIT_COUNT {
        let len = Unit::ALL[index].name().len();
        if len > longest {
            longest = len;
        }
        index += 1;
    }
    longest
};
/// The longest limit name (`Limit::name`, `"{meter} per {window}"`, which the C ABI copies into
/// fixed arrays): the longest meter name, an implicit `resource:unit` (a named meter's has at
/// most `MAX_NAME_BYTES` and no `:`), and the longest window, a rolling one just under
/// `MAX_ROLLING_WINDOW_MS` with every part written (`compile_limit` asserts the bound).
pub const MAX_LIMIT_NAME_BYTES: usize = MAX_NAME_BYTES
    + ":".len()
    + MAX_UNIT_NAME_BYTES
    + " per ".len()
    + "rolling:365d23h59m59s999ms".len();
const _: () = assert!(
    MAX_ROLLING_WINDOW_MS == 366 * DAY_MS,
    "MAX_LIMIT_NAME_BYTES assumes it"
);
/// The default bucket width is the window divided by this: the error of a rolling window (how
/// much later than the exact time a unit is released) is at most one bucket, 1/210 = 0.476%.
pub const DEFAULT_BUCKETS_PER_WINDOW: u64 = 210;
/// Windows shorter than this had a 1 s bucket by default until buckets could be shorter than a
/// second (fewer than 210 buckets: 1.7% on one minute). A database depends on the buckets its
/// logged policies were compiled with (its rings' shapes, its snapshots), so a logged document
/// without a bucket on such a window still gets 1 s; a document being loaded gets the new
/// default and states it (`state_changed_buckets`), so every one logged since has its bucket.
/// From this length on the two rules agree.
const ONE_SECOND_DEFAULT_BELOW_MS: u64 = DEFAULT_BUCKETS_PER_WINDOW * SECOND_MS;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;
const WEEK_MS: u64 = 7 * DAY_MS;
/// The longest calendar month, when clocks do not change in it.
const MONTH_MS: u64 = 31 * DAY_MS;

const _: () = assert!(
    DEFAULT_BUCKETS_PER_WINDOW * 5 > 1_000,
    "default error must be under 0.5%"
);
const _: () = assert!(DEFAULT_BUCKETS_PER_WINDOW <= MAX_BUCKETS_PER_WINDOW);
const _: () = assert!(MIN_ROLLING_WINDOW_MS / DEFAULT_BUCKETS_PER_WINDOW >= MIN_BUCKET_MS);
const _: () = assert!(MAX_LIMITS_PER_RESOURCE <= MAX_LIMITS_PER_PLAN);
const _: () = assert!(MAX_QUANTITY <= MAX_CALENDAR_AMOUNT);

// ---------------------------------------------------------------------------------------------
// The document: what a person writes.

/// A policy as written in a TOML or JSON file. `Policy::compile` validates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// The IANA time zone in which daily, weekly and monthly windows reset.
    pub time_zone: String,
    /// The day weekly windows reset on, at local midnight: `monday` (the default when it is
    /// left out, as in every document written before it could be named) to `sunday`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub week_start: Option<String>,
    #[serde(deserialize_with = "unique_keys")]
    pub resources: BTreeMap<String, ResourceDocument>,
    #[serde(default, deserialize_with = "unique_keys")]
    pub meters: BTreeMap<String, MeterDocument>,
    #[serde(deserialize_with = "unique_keys")]
    pub plans: BTreeMap<String, PlanDocument>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The units a request for this resource may carry.
    pub units: Vec<Unit>,
    /// The price per unit in micro-credits, for credits and pay-as-you-go. A resource with no
    /// price cannot be paid for with credits.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_keys"
    )]
    pub price_micros: BTreeMap<Unit, u64>,
    /// Per-request maximums that hold for every key, whatever its plan.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_keys"
    )]
    pub max_per_request: BTreeMap<Unit, u64>,
    /// Units every request for this resource must carry (a speech call without characters
    /// would otherwise pass a characters quota for free).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<Unit>,
}

/// A meter is one resource's unit, or a weighted sum (`terms`), or every priced resource's
/// usage at its price (`priced = true`: the older seed's shared usage bar).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MeterDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub priced: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub terms: Vec<TermDocument>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermDocument {
    pub resource: String,
    pub unit: Unit,
    pub weight: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PlanDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_micros_per_month: Option<u64>,
    /// Resources the plan covers. Absent: the resources its limits touch. `["*"]`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Vec<LimitDocument>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maximums: Vec<MaximumDocument>,
    /// How many reservations one key may hold open at once (the older seed's "agents").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_open_reservations: Option<u32>,
}

/// A limit names a meter, or a resource and unit (an implicit meter `resource:unit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
    pub amount: u64,
    /// `rolling:5h`, `daily`, `weekly` or `monthly`.
    pub window: String,
    /// Bucket width of a rolling window, e.g. `90s` or `250ms` (at least 1 ms); it must divide
    /// the window evenly. Default: the widest that splits the window into at least 210 equal
    /// buckets, in whole seconds where one does (80 s, 225 buckets, for 5 hours; 250 ms, 240
    /// buckets, for one minute). A policy loaded with a window under 210 s states its default
    /// bucket here, as the log then keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaximumDocument {
    pub resource: String,
    pub unit: Unit,
    pub amount: u64,
}

/// Deserializes a map refusing a key given twice. JSON allows a repeated key and serde keeps
/// the last, so a second plan (or resource, or meter) of the same name would silently replace
/// the first; TOML refuses repeats itself, so this costs it nothing.
fn unique_keys<'de, D, K, V>(deserializer: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    use serde::de::{DeserializeSeed, Error, IntoDeserializer, MapAccess, Visitor};

    struct UniqueKeys<K, V>(std::marker::PhantomData<(K, V)>);

    /// Stands in for a key's value and refuses it: failing there rather than in the map puts
    /// the key in the error's path (`plans."P"`, not `plans`).
    struct Refuse(String);

    impl<'de> DeserializeSeed<'de> for Refuse {
        type Value = std::convert::Infallible;

        fn deserialize<D: serde::Deserializer<'de>>(self, _: D) -> Result<Self::Value, D::Error> {
            Err(D::Error::custom(self.0))
        }
    }

    impl<'de, K, V> Visitor<'de> for UniqueKeys<K, V>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        type Value = BTreeMap<K, V>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table whose keys differ")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = BTreeMap::new();
            // The key is read as text first, so the error's path shows it even where it is a
            // unit (serde_path_to_error records only keys read as text or numbers).
            while let Some(name) = map.next_key::<String>()? {
                let key = match K::deserialize(name.as_str().into_deserializer()) {
                    Ok(key) => key,
                    Err(error) => {
                        let error: serde::de::value::Error = error;
                        match map.next_value_seed(Refuse(error.to_string()))? {}
                    }
                };
                if entries.contains_key(&key) {
                    match map.next_value_seed(Refuse(format!("{name:?} appears twice")))? {}
                }
                let value = map.next_value()?;
                entries.insert(key, value);
            }
            Ok(entries)
        }
    }

    deserializer.deserialize_map(UniqueKeys(std::marker::PhantomData))
}

/// A policy that failed to load: `field` is the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub field: String,
    pub problem: String,
}

impl PolicyError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> PolicyError {
        PolicyError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for PolicyError {}

// ---------------------------------------------------------------------------------------------
// The compiled policy: what admission reads.

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
        pub struct $name(pub u16);
        impl $name {
            pub fn index(self) -> usize {
                usize::from(self.0)
            }
        }
    };
}

id_type!(ResourceId);
id_type!(MeterId);
id_type!(PlanId);
id_type!(
    /// A distinct (meter, window) pair: the identity of a usage counter, kept across seat
    /// changes and policy swaps so usage already counted stays counted.
    CounterId
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Rolling { window_ms: u64, bucket_ms: u64 },
    Calendar(CalendarPeriod),
}

impl Window {
    /// Number of buckets the window spans (rolling only); the ring holds one more, the bucket
    /// being filled now.
    pub fn buckets(&self) -> u64 {
        match *self {
            Window::Rolling {
                window_ms,
                bucket_ms,
            } => window_ms.div_ceil(bucket_ms),
            Window::Calendar(_) => 0,
        }
    }

    /// The longest time a unit stays counted in this window. A calendar period lasts longer
    /// than its nominal length when clocks go back inside it, by as much as they go back (two
    /// hours in Antarctica/Troll, seven once in Antarctica/Vostok), so its span is the
    /// longest period of `calendar`'s zone, and never less than nominal plus an hour (the
    /// figure before spans were read from the zone, so no zone's horizon shrank).
    pub fn span_ms(&self, calendar: &Calendar) -> u64 {
        match *self {
            Window::Rolling {
                window_ms,
                bucket_ms,
            } => window_ms
                .div_ceil(bucket_ms)
                .saturating_add(1)
                .saturating_mul(bucket_ms),
            Window::Calendar(period) => {
                let floor_ms = match period {
                    CalendarPeriod::Daily => DAY_MS + HOUR_MS,
                    CalendarPeriod::Weekly => WEEK_MS + HOUR_MS,
                    CalendarPeriod::Monthly => MONTH_MS + HOUR_MS,
                };
                calendar.longest_period_ms(period).max(floor_ms)
            }
        }
    }
}

impl Window {
    /// The ring geometry of a rolling window.
    pub fn shape(&self) -> Option<crate::window::RollingShape> {
        match *self {
            Window::Rolling {
                window_ms,
                bucket_ms,
            } => Some(crate::window::RollingShape::new(window_ms, bucket_ms)),
            Window::Calendar(_) => None,
        }
    }
}

impl Window {
    /// Whether two windows count the same span: equal, or rolling over the same duration with
    /// buckets of another width (the usage carries over, reshaped).
    pub fn span_equals(&self, other: Window) -> bool {
        same_window_ignoring_buckets(*self, other)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Window::Rolling { window_ms, .. } => {
                write!(f, "rolling:{}", format_duration(window_ms))
            }
            Window::Calendar(period) => f.write_str(period.name()),
        }
    }
}

#[derive(Debug)]
pub struct Resource {
    pub name: Box<str>,
    pub units: [bool; UNIT_COUNT],
    /// Micro-credits per unit; `None` where the unit has no price.
    pub price_micros: [Option<u64>; UNIT_COUNT],
    /// 0 where there is no maximum.
    pub max_per_request: [u64; UNIT_COUNT],
    /// Units every request must carry.
    pub required: [bool; UNIT_COUNT],
    /// `price_micros` with 0 for unpriced units, and whether any unit is priced: precomputed
    /// for the admission path.
    pub price_weights: [u64; UNIT_COUNT],
    pub priced: bool,
    /// `units` and `required` as bit masks (bit `i` for unit index `i`), for the admission
    /// path's one-instruction check of a request's units.
    pub unit_mask: u8,
    pub required_mask: u8,
    /// Whether any per-request maximum is set (the admission path skips the check otherwise).
    pub has_maximum: bool,
    /// Requests whose quantities sum to at most this cannot overflow the price, so admission
    /// need not price a request the plan takes to find out.
    pub safe_quantity_sum: u64,
}

/// Bit `i` set where `flags[i]`.
fn unit_mask(flags: &[bool; UNIT_COUNT]) -> u8 {
    flags
        .iter()
        .enumerate()
        .fold(0, |mask, (index, flag)| mask | (u8::from(*flag) << index))
}

impl Resource {
    /// Whether credits (and pay-as-you-go) can pay for this resource.
    pub fn is_priced(&self) -> bool {
        self.priced
    }
}

#[derive(Debug)]
pub struct Meter {
    pub name: Box<str>,
    pub terms: Vec<(ResourceId, Unit, u64)>,
}

#[derive(Debug)]
pub struct CounterSpec {
    pub meter: MeterId,
    pub window: Window,
}

#[derive(Debug)]
pub struct Limit {
    /// e.g. `m2.7:requests per rolling:5h`.
    pub name: Box<str>,
    pub meter: MeterId,
    pub counter: CounterId,
    pub amount: u64,
    pub window: Window,
    /// `window.shape()`, worked out once: admission needs it on every request, and it costs a
    /// division.
    pub shape: Option<crate::window::RollingShape>,
}

/// The limits of a plan that one resource's usage moves, with the weight of each unit.
#[derive(Debug, Clone, Copy)]
pub struct Touch {
    /// Index into `Plan::limits`.
    pub limit: u8,
    pub weights: [u64; UNIT_COUNT],
    /// `(unit, weight)` when only one unit has a weight: the admission path's shortcut (a
    /// `Unit`, not its index, so indexing the quantities by it needs no bounds check).
    pub single: Option<(Unit, u64)>,
}

#[derive(Debug)]
pub struct Plan {
    pub name: Box<str>,
    pub limits: Vec<Limit>,
    /// Indexed by `ResourceId`.
    pub covers: Vec<bool>,
    /// Indexed by `ResourceId`: the limits each resource moves, in `limits` order.
    pub touches: Vec<Vec<Touch>>,
    /// Indexed by `ResourceId`: per-request maximums, 0 where none.
    pub maximums: Vec<[u64; UNIT_COUNT]>,
    pub max_open_reservations: Option<u32>,
    pub price_micros_per_month: Option<u64>,
    /// Indexed like `limits`: every plan with a larger amount on the same meter and span, smallest
    /// amount first (`admission::upgrade_for`): a denial's, kept apart from the `Limit`s admission reads
    /// on every request.
    pub limit_upgrades: Vec<Upgrades>,
    /// Indexed by `ResourceId`: what admission reads of `covers`, `maximums` (whether any is
    /// set) and `touches`, in one place (one bounds check per request instead of one per list).
    pub(crate) admission: Vec<ResourceAdmission>,
}

/// A plan's admission summary for one resource (`Plan::admission`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResourceAdmission {
    pub covers: bool,
    pub has_maximum: bool,
    /// `Some(unit)` when every touch takes `unit` alone at weight 1 (the usual plan): each
    /// touched limit's amount is then that unit's quantity, which cannot overflow.
    pub unit_at_weight_one: Option<Unit>,
    /// The touched limits' indexes, in `touches` order (the first `limit_count`).
    pub limits: [u8; MAX_LIMITS_PER_RESOURCE],
    pub limit_count: u8,
}

impl ResourceAdmission {
    fn of(covers: bool, has_maximum: bool, touches: &[Touch]) -> ResourceAdmission {
        let mut limits = [0; MAX_LIMITS_PER_RESOURCE];
        let mut limit_count = 0;
        for (slot, touch) in limits.iter_mut().zip(touches) {
            *slot = touch.limit;
            limit_count += 1;
        }
        let unit = touches
            .first()
            .and_then(|touch| touch.single)
            .map(|(unit, _)| unit);
        let plain = touches.len() <= MAX_LIMITS_PER_RESOURCE
            && touches
                .iter()
                .all(|touch| touch.single.is_some() && touch.single == unit.map(|unit| (unit, 1)));
        ResourceAdmission {
            covers,
            has_maximum,
            unit_at_weight_one: unit.filter(|_| plain),
            limits,
            limit_count,
        }
    }

    /// The touched limits' indexes.
    #[inline]
    pub fn limits(&self) -> &[u8] {
        &self.limits[..usize::from(self.limit_count).min(MAX_LIMITS_PER_RESOURCE)]
    }
}

impl Plan {
    /// The plan with the smallest larger amount on limit `limit`'s meter and span: the next
    /// bigger plan.
    pub fn next_bigger(&self, limit: usize) -> Option<PlanId> {
        self.limit_upgrades
            .get(limit)?
            .first()
            .map(|(_, plan)| *plan)
    }
}

/// Up to this many resources, `Policy::resource_id` scans the list instead of hashing.
const LINEAR_LOOKUP_MAX: usize = 16;

/// Whether two names (a key's, a resource's) are the same bytes. Names on the admission path
/// are short, and for up to 32 bytes two overlapping word loads per side replace the call to
/// `memcmp` that `==` makes (two such calls were about 4% of a hot key's instructions).
#[inline(always)]
pub(crate) fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let len = a.len();
    if len != b.len() {
        return false;
    }
    // Each pair of loads covers `len` bytes, overlapping in the middle.
    fn ends<const N: usize>(bytes: &[u8]) -> ([u8; N], [u8; N]) {
        let len = bytes.len();
        let mut first = [0; N];
        let mut last = [0; N];
        first.copy_from_slice(&bytes[..N]);
        last.copy_from_slice(&bytes[len - N..]);
        (first, last)
    }
    match len {
        0 => true,
        1..=3 => a[0] == b[0] && a[len / 2] == b[len / 2] && a[len - 1] == b[len - 1],
        4..=7 => ends::<4>(a) == ends::<4>(b),
        8..=16 => ends::<8>(a) == ends::<8>(b),
        17..=32 => ends::<16>(a) == ends::<16>(b),
        _ => a == b,
    }
}

/// A validated, compiled policy. Immutable; the engine swaps whole policies.
#[derive(Debug)]
pub struct Policy {
    document: PolicyDocument,
    calendar: Calendar,
    resources: Vec<Resource>,
    resource_ids: FxHashMap<Box<str>, ResourceId>,
    meters: Vec<Meter>,
    counters: Vec<CounterSpec>,
    plans: Vec<Plan>,
    plan_ids: FxHashMap<Box<str>, PlanId>,
    longest_window_ms: u64,
    /// Set by the engine when it installs the policy: receipts name counters of a generation.
    pub(crate) generation: u32,
}

/// The default policy shipped with tally: the Token Plan seeds' plans with every number from
/// their tables (see the comments in the file for what the seeds leave open).
pub const TOKEN_PLAN_TOML: &str = include_str!("../policy/token-plan.toml");

impl Policy {
    pub fn token_plan() -> Policy {
        match Policy::from_toml_str(TOKEN_PLAN_TOML) {
            Ok(policy) => policy,
            // The shipped file is tested; failing here is a build defect, not bad input.
            Err(error) => panic!("the shipped token-plan policy is invalid: {error}"),
        }
    }

    pub fn from_toml_str(text: &str) -> Result<Policy, PolicyError> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|error| PolicyError::new("(toml)", error.to_string().trim_end()))?;
        let document: PolicyDocument =
            serde_path_to_error::deserialize(deserializer).map_err(path_error)?;
        Policy::compile(document)
    }

    pub fn from_json_str(text: &str) -> Result<Policy, PolicyError> {
        Compiler::default().compile(json_document(text, true)?)
    }

    /// Loads a `.toml` or `.json` policy file of at most `MAX_POLICY_FILE_BYTES`.
    pub fn load(path: &std::path::Path) -> Result<Policy, PolicyError> {
        use std::io::Read as _;
        // The name first: a path that names no policy is not read at all.
        let json = match path.extension().and_then(|extension| extension.to_str()) {
            Some("json") => true,
            Some("toml") => false,
            _ => {
                return Err(PolicyError::new(
                    "(file)",
                    format!("{}: a policy file ends in .toml or .json", path.display()),
                ))
            }
        };
        let cannot_read = |error: std::io::Error| {
            PolicyError::new("(file)", format!("cannot read {}: {error}", path.display()))
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|file| {
                file.take(MAX_POLICY_FILE_BYTES + 1)
                    .read_to_string(&mut text)
            })
            .map_err(cannot_read)?;
        if text.len() as u64 > MAX_POLICY_FILE_BYTES {
            return Err(PolicyError::new(
                "(file)",
                format!(
                    "{} is larger than {MAX_POLICY_FILE_BYTES} bytes, the most a policy file \
                     may hold",
                    path.display()
                ),
            ));
        }
        if json {
            Policy::from_json_str(&text)
        } else {
            Policy::from_toml_str(&text)
        }
    }

    pub fn compile(document: PolicyDocument) -> Result<Policy, PolicyError> {
        Compiler::default().compile(document)
    }

    /// A policy read back from a database's log or snapshot (its JSON). It was valid when it
    /// was logged, under the rules of the build that logged it, and the database depends on
    /// it: the rules added since for policies being loaded (`Compiler::logged`) are not
    /// applied again, so a database an earlier build wrote still opens.
    pub fn from_logged_json(text: &str) -> Result<Policy, PolicyError> {
        Compiler {
            logged: true,
            ..Compiler::default()
        }
        .compile(json_document(text, false)?)
    }

    /// The document, as a database logs it: loaded, a rolling window under 210 s that named no
    /// bucket names the one it got (`state_changed_buckets`); read back from a log, as logged.
    pub fn document(&self) -> &PolicyDocument {
        &self.document
    }

    /// The document as TOML. Every number a valid policy holds fits TOML's integers; an error
    /// (which a valid policy cannot give) is returned, never an empty string.
    pub fn to_toml_string(&self) -> Result<String, PolicyError> {
        toml::to_string(&self.document).map_err(|error| PolicyError::new(".", error.to_string()))
    }

    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// The id of the resource named `name`. A policy names a handful of resources: comparing
    /// lengths, then bytes, over the list beats hashing the name (measured: the hash map
    /// lookup was about 100 instructions of a hot-key admission's 1,400). Always inlined: with
    /// `same_name` in it the compiler had made it a call, 45 instructions a request.
    #[inline(always)]
    pub fn resource_id(&self, name: &str) -> Option<ResourceId> {
        if self.resources.len() <= LINEAR_LOOKUP_MAX {
            return self
                .resources
                .iter()
                .position(|resource| same_name(&resource.name, name))
                .map(|index| ResourceId(index as u16));
        }
        self.resource_ids.get(name).copied()
    }

    pub fn resource(&self, id: ResourceId) -> &Resource {
        &self.resources[id.index()]
    }

    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    pub fn meter(&self, id: MeterId) -> &Meter {
        &self.meters[id.index()]
    }

    pub fn counter(&self, id: CounterId) -> &CounterSpec {
        &self.counters[id.index()]
    }

    pub fn counters(&self) -> &[CounterSpec] {
        &self.counters
    }

    pub fn plan_id(&self, name: &str) -> Option<PlanId> {
        self.plan_ids.get(name).copied()
    }

    pub fn plan(&self, id: PlanId) -> &Plan {
        &self.plans[id.index()]
    }

    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    /// Which of the engine's policies this is: 0 for the first a database ran with, one more
    /// for each swap (and 0 for a policy no engine has installed).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The longest time any window keeps a unit counted: the idempotency horizon's floor.
    pub fn longest_window_ms(&self) -> u64 {
        self.longest_window_ms
    }

    /// The weights with which `resource`'s units move `counter`'s meter.
    pub fn counter_weights(&self, counter: CounterId, resource: ResourceId) -> [u64; UNIT_COUNT] {
        let mut weights = [0; UNIT_COUNT];
        for (term_resource, unit, weight) in &self.meter(self.counter(counter).meter).terms {
            if *term_resource == resource {
                weights[unit.index()] = *weight;
            }
        }
        weights
    }

    /// Finds the counter of another policy with the same meter name and window, so counts
    /// carry across a policy swap.
    pub fn same_counter_in(&self, counter: CounterId, other: &Policy) -> Option<CounterId> {
        let spec = self.counter(counter);
        let meter_name = &self.meter(spec.meter).name;
        let same_meter = |candidate: &CounterSpec| other.meter(candidate.meter).name == *meter_name;
        other
            .counters
            .iter()
            .position(|candidate| same_meter(candidate) && candidate.window == spec.window)
            .or_else(|| {
                other.counters.iter().position(|candidate| {
                    same_meter(candidate)
                        && same_window_ignoring_buckets(candidate.window, spec.window)
                })
            })
            .map(|index| CounterId(index as u16))
    }

    /// Where a swap to `other` put the units this policy's `counter` held at `time` (an epoch
    /// or a calendar period): the same counter in `other` and, if the bucket width changed, the
    /// bucket they were re-bucketed to (`RollingWindow::reshaped`). `None` if `other` has no
    /// such counter (the usage was dropped with it).
    pub fn carry(&self, counter: CounterId, time: u64, other: &Policy) -> Option<(CounterId, u64)> {
        if self.generation == other.generation {
            return Some((counter, time));
        }
        let carried = self.same_counter_in(counter, other)?;
        let time = match (
            self.counter(counter).window.shape(),
            other.counter(carried).window.shape(),
        ) {
            (Some(from), Some(to)) if from != to => from.carried_epoch(to, time),
            _ => time,
        };
        Some((carried, time))
    }
}

impl Policy {
    /// Whether a swap from this policy to `new` can carry every count over. Refused, naming the
    /// field of `new`: a meter that keeps its name but counts something else (its count so far
    /// would be read in another unit; a meter whose count does not carry, as no limit of one
    /// side or the other uses it over the same span, may change), a time zone changed under
    /// a calendar window that carries over (the current day's, week's or month's count would
    /// be read as another one's; a calendar window new in `new` starts from 0 and may be in
    /// any zone; another name for the same offsets, such as an alias, is no change), and the
    /// week's first day changed under a weekly window that carries over. A usage bar
    /// (`priced = true`) may change its prices: its count is in micro-credits, already charged
    /// at the old prices; a weighted meter of `terms` kept by name must keep its terms
    /// (resources, units and weights, in any order), as other terms count another sum. And a
    /// plan kept by name whose limit on a meter kept
    /// by name moves to another window (`rolling:5h` to `rolling:6h`, `daily` to `weekly`):
    /// its seated keys' count so far would be dropped and the new window start from 0
    /// (`check_windows_kept`).
    pub fn check_swap_to(&self, new: &Policy) -> Result<(), PolicyError> {
        self.check_windows_kept(new)?;
        let calendar_carried = (0..self.counters.len()).any(|index| {
            let counter = CounterId(index as u16);
            matches!(self.counter(counter).window, Window::Calendar(_))
                && self.same_counter_in(counter, new).is_some()
        });
        let (from, to) = (self.calendar.time_zone(), new.calendar.time_zone());
        if calendar_carried && !self.calendar.same_offsets_as(&new.calendar) {
            return Err(PolicyError::new(
                "time_zone",
                format!(
                    "{to:?} where the current policy has {from:?}: a swap cannot move daily, \
                     weekly or monthly windows to another time zone (the current period's count \
                     would be read as another period's). To move them, swap first to a policy \
                     without them (their counts are dropped), then to this one"
                ),
            ));
        }
        // Nor a week's first day under a weekly window that carries over: a week index names
        // other days then.
        let weekly_carried = (0..self.counters.len()).any(|index| {
            let counter = CounterId(index as u16);
            self.counter(counter).window == Window::Calendar(CalendarPeriod::Weekly)
                && self.same_counter_in(counter, new).is_some()
        });
        let (from, to) = (self.calendar.week_start(), new.calendar.week_start());
        if weekly_carried && from != to {
            return Err(PolicyError::new(
                "week_start",
                format!(
                    "{to:?} where the current policy's weeks start on {from:?}: a swap cannot \
                     move weekly windows to another first day of the week (the current week's \
                     count would be read as another week's). To move them, swap first to a \
                     policy without them (their counts are dropped), then to this one"
                ),
            ));
        }
        for (index, meter) in self.meters.iter().enumerate() {
            let Some(other) = new.meters.iter().find(|other| other.name == meter.name) else {
                continue;
            };
            // Only a meter with a count that carries: one no limit uses has no counter, and a
            // counter the new policy has no counter for is dropped, not read as another's.
            let carried = (0..self.counters.len()).any(|counter| {
                let counter = CounterId(counter as u16);
                self.counter(counter).meter.index() == index
                    && self.same_counter_in(counter, new).is_some()
            });
            if !carried {
                continue;
            }
            let (was, is) = (self.meter_counts(meter), new.meter_counts(other));
            if was != is && !(self.is_usage_bar(meter) && new.is_usage_bar(other)) {
                return Err(PolicyError::new(
                    format!("meters.{:?}", &*meter.name),
                    format!(
                        "counts {is} where the current policy's counts {was}: its count so far \
                         cannot carry over; give the new meter another name (it then starts \
                         from 0)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a swap that moves a plan's limit to another window, naming the new limit's
    /// `window`: the plan (by name) limits a meter (by name) over a window the new plan does
    /// not, and the new plan limits it over one the old plan did not. A count carries only to
    /// the same meter over the same span (buckets may differ: re-bucketed), so the seated keys'
    /// count in the old window would be dropped and the new window would admit it again.
    /// Adding a window beside those kept, or removing one, moves no count and is let through;
    /// so the route to another window is two swaps, the first removing the limit (its count
    /// dropped on purpose).
    fn check_windows_kept(&self, new: &Policy) -> Result<(), PolicyError> {
        for new_plan in &new.plans {
            let Some(old_plan) = self.plan_id(&new_plan.name).map(|plan| self.plan(plan)) else {
                continue;
            };
            let windows_on = |policy: &Policy, plan: &Plan, meter: &str| -> Vec<Window> {
                plan.limits
                    .iter()
                    .filter(|limit| &*policy.meter(limit.meter).name == meter)
                    .map(|limit| limit.window)
                    .collect()
            };
            for (index, limit) in new_plan.limits.iter().enumerate() {
                let meter = &*new.meter(limit.meter).name;
                let old_windows = windows_on(self, old_plan, meter);
                if old_windows.iter().any(|old| old.span_equals(limit.window)) {
                    continue;
                }
                let new_windows = windows_on(new, new_plan, meter);
                let Some(dropped) = old_windows
                    .iter()
                    .find(|old| !new_windows.iter().any(|new| new.span_equals(**old)))
                else {
                    continue;
                };
                return Err(PolicyError::new(
                    format!("plans.{:?}.limits[{index}].window", &*new_plan.name),
                    format!(
                        "{} on {meter:?} where the current policy's {:?} counts it over \
                         {dropped}: a swap carries a count only to the same meter over the same \
                         window, so the count so far would be dropped and admitted again. To \
                         start this window from 0, swap first to a policy whose {:?} has no \
                         {dropped} limit on {meter:?} (its count is dropped), then to this one",
                        limit.window, &*old_plan.name, &*new_plan.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether `meter` is a usage bar (`priced = true`): its count is in micro-credits whatever
    /// its prices, so it carries to a bar of the same name with any prices, even where either
    /// compiled to a single term of weight 1 (one unit priced 1), which looks like a plain meter.
    fn is_usage_bar(&self, meter: &Meter) -> bool {
        self.document
            .meters
            .get(&*meter.name)
            .is_some_and(|document| document.priced)
    }

    fn meter_counts(&self, meter: &Meter) -> MeterCounts<'_> {
        match meter.terms.as_slice() {
            [(resource, unit, 1)] => MeterCounts::Plain(&self.resource(*resource).name, *unit),
            terms => {
                // By name, in one order: the same sum listed otherwise counts the same.
                let mut terms: Vec<_> = terms
                    .iter()
                    .map(|(resource, unit, weight)| {
                        (&*self.resource(*resource).name, *unit, *weight)
                    })
                    .collect();
                terms.sort_unstable();
                MeterCounts::Weighted(terms)
            }
        }
    }
}

/// What a meter's count is in, to tell whether a swap can carry it.
#[derive(PartialEq, Eq)]
enum MeterCounts<'a> {
    /// One resource's unit.
    Plain(&'a str, Unit),
    /// A weighted sum (a `terms` meter, or a usage bar at its prices): its terms by resource
    /// name, unit and weight,
    /// sorted. Another sum counts in another unit (a usage bar excepted: `check_swap_to`).
    Weighted(Vec<(&'a str, Unit, u64)>),
}

impl fmt::Display for MeterCounts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeterCounts::Plain(resource, unit) => write!(f, "{resource:?} {}", unit.name()),
            MeterCounts::Weighted(terms) => {
                f.write_str("the weighted sum")?;
                for (index, (resource, unit, weight)) in terms.iter().enumerate() {
                    let plus = if index == 0 { "" } else { " +" };
                    write!(f, "{plus} {weight} x {resource:?} {}", unit.name())?;
                }
                Ok(())
            }
        }
    }
}

/// Where the units `then`'s `counter` held at `time` are under `now`, having been carried by
/// every swap in between: `later` lists the kept generations after `then`, oldest first (it may
/// end before or at `now`). Each swap re-buckets on its own, so two that change the width
/// back and forth can leave units a bucket later than one step straight from `then` would put
/// them. A generation no longer kept is stepped over, as one swap.
pub(crate) fn carry_through(
    then: &Policy,
    later: &[std::sync::Arc<Policy>],
    now: &Policy,
    counter: CounterId,
    time: u64,
) -> Option<(CounterId, u64)> {
    let mut from = then;
    let mut carried = (counter, time);
    for next in later.iter().map(|policy| &**policy).chain([now]) {
        if next.generation <= from.generation || next.generation > now.generation {
            continue;
        }
        carried = from.carry(carried.0, carried.1, next)?;
        from = next;
    }
    debug_assert_eq!(from.generation, now.generation);
    Some(carried)
}

/// A JSON policy document, read (not yet checked); an error names the field's path.
/// The document in `text`; with `whole`, refused if anything but whitespace follows it (a
/// policy being loaded). A logged one is read as earlier builds read it.
fn json_document(text: &str, whole: bool) -> Result<PolicyDocument, PolicyError> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let document = serde_path_to_error::deserialize(&mut deserializer).map_err(path_error)?;
    if whole {
        deserializer
            .end()
            .map_err(|error| PolicyError::new(".", error.to_string()))?;
    }
    Ok(document)
}

/// A document that does not fit the schema: the error names the path of the field (`.` for the
/// whole document, e.g. when a required table is missing).
fn path_error<E: std::fmt::Display>(error: serde_path_to_error::Error<E>) -> PolicyError {
    PolicyError::new(
        field_path(error.path()),
        error.inner().to_string().trim_end(),
    )
}

/// A field's path written as the compiler's checks write it: names a person chose (of a
/// resource, meter or plan) quoted, `plans."Max".limits[0].unit`, the schema's own keys bare.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut text = String::new();
    let mut table = None;
    for (depth, segment) in path.iter().enumerate() {
        if !matches!(segment, Segment::Seq { .. }) && depth > 0 {
            text.push('.');
        }
        match (depth, segment, table) {
            (0, Segment::Map { key }, _) => {
                table = Some(key.as_str());
                text.push_str(key);
            }
            (1, Segment::Map { key }, Some("resources" | "meters" | "plans")) => {
                text.push_str(&format!("{key:?}"));
            }
            (_, segment, _) => text.push_str(&segment.to_string()),
        }
    }
    if text.is_empty() {
        text.push('.');
    }
    text
}

#[derive(Default)]
struct Compiler {
    resources: Vec<Resource>,
    resource_ids: FxHashMap<Box<str>, ResourceId>,
    meters: Vec<Meter>,
    /// Named meters (`meters."…"`) and implicit ones (`resource:unit`), all by name: the names
    /// cannot collide, a named meter's has no `:`.
    meter_ids: FxHashMap<Box<str>, MeterId>,
    /// The named meters come first in `meters`: ids below this are theirs.
    named_meters: usize,
    /// Compiling a document read back from a log or snapshot (`Policy::from_logged_json`):
    /// the checks added in format 3 for policies being loaded are skipped (a resource named
    /// "*", a meter name with ':' or a limit naming an implicit meter, a plan price past
    /// credits, an empty plan, repeated covers and maximums and maximums on what a plan does
    /// not cover, durations repeating a unit, the document's size, a plan's second limit on a
    /// meter and rolling span with other buckets; since, a unit repeated in a resource's
    /// `required`), and what they refuse
    /// compiles as earlier builds compiled it. A rolling window under 210 s without a bucket
    /// gets 1 s, as builds before sub-second buckets gave it (`ONE_SECOND_DEFAULT_BELOW_MS`),
    /// and the document is kept as logged: nothing is stated in it.
    logged: bool,
    counters: Vec<CounterSpec>,
}

/// Whether `c` shows nothing, yet makes a name differ from one that looks the same
/// (`Plus\u{200b}`, `Plus\u{fe0f}`): a Unicode format character (general category Cf, whose
/// bidi controls also reorder what an operator reads, `U+202E`) or a default-ignorable code
/// point (Default_Ignorable_Code_Point: variation selectors, the combining grapheme joiner,
/// Hangul fillers, and the code points reserved as such), as of Unicode 16.
pub(crate) fn is_invisible_character(c: char) -> bool {
    matches!(
        u32::from(c),
        0xAD | 0x34F
            | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}

/// A plan's, resource's or meter's name: not empty, at most `MAX_NAME_BYTES`, without
/// whitespace or control characters, and (unless `logged`: documents logged before the rule
/// load as they were) without invisible characters (`is_invisible_character`).
fn check_name(field: &str, name: &str, logged: bool) -> Result<(), PolicyError> {
    if name.is_empty() {
        return Err(PolicyError::new(field, "a name must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(PolicyError::new(
            field,
            format!("{name:?} is longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(PolicyError::new(
            field,
            format!("{name:?} contains whitespace or control characters"),
        ));
    }
    if !logged && name.chars().any(is_invisible_character) {
        return Err(PolicyError::new(
            field,
            format!(
                "{name:?} contains an invisible character (such as a zero-width space, a \
                 direction override or a variation selector), so it would differ from a name \
                 that looks the same"
            ),
        ));
    }
    Ok(())
}

impl Compiler {
    fn compile(mut self, mut document: PolicyDocument) -> Result<Policy, PolicyError> {
        let week_start = match document.week_start.as_deref() {
            None => Weekday::Monday,
            Some(name) => parse_weekday(name).ok_or_else(|| {
                PolicyError::new(
                    "week_start",
                    format!(
                        "{name:?} is not a day of the week: write monday, tuesday, wednesday, \
                         thursday, friday, saturday or sunday"
                    ),
                )
            })?,
        };
        let calendar = Calendar::with_week_start(&document.time_zone, week_start)
            .map_err(|error| PolicyError::new("time_zone", error.to_string()))?;
        self.compile_resources(&document)?;
        self.compile_named_meters(&document)?;
        let mut plans = Vec::with_capacity(document.plans.len());
        if document.plans.is_empty() {
            return Err(PolicyError::new(
                "plans",
                "a policy needs at least one plan",
            ));
        }
        if document.plans.len() > MAX_PLANS {
            return Err(PolicyError::new(
                "plans",
                format!("more than {MAX_PLANS} plans"),
            ));
        }
        for (name, plan) in &document.plans {
            plans.push(self.compile_plan(name, plan)?);
        }
        if !self.logged {
            state_changed_buckets(&mut document, &plans);
        }
        let plan_ids = plans
            .iter()
            .enumerate()
            .map(|(index, plan)| (plan.name.clone(), PlanId(index as u16)))
            .collect();
        link_upgrades(&mut plans);
        // Each window once: a calendar span looks at every offset change of the zone.
        let mut windows: Vec<Window> = Vec::new();
        for counter in &self.counters {
            if !windows.contains(&counter.window) {
                windows.push(counter.window);
            }
        }
        let longest_window_ms = windows
            .iter()
            .map(|window| window.span_ms(&calendar))
            .max()
            .unwrap_or(0);
        // Last: every field's own error first. (A document always encodes: plain data.)
        let bytes = serde_json::to_vec(&document).map_or(usize::MAX, |json| json.len());
        if bytes > MAX_POLICY_DOCUMENT_BYTES && !self.logged {
            return Err(PolicyError::new(
                ".",
                format!(
                    "the policy is {bytes} bytes as JSON; at most {MAX_POLICY_DOCUMENT_BYTES} \
                     (a swap logs it as one event): shorten its descriptions"
                ),
            ));
        }
        Ok(Policy {
            document,
            calendar,
            resources: self.resources,
            resource_ids: self.resource_ids,
            meters: self.meters,
            counters: self.counters,
            plans,
            plan_ids,
            longest_window_ms,
            generation: 0,
        })
    }

    fn compile_resources(&mut self, document: &PolicyDocument) -> Result<(), PolicyError> {
        if document.resources.is_empty() {
            return Err(PolicyError::new(
                "resources",
                "a policy needs at least one resource",
            ));
        }
        if document.resources.len() > MAX_RESOURCES {
            return Err(PolicyError::new(
                "resources",
                format!("more than {MAX_RESOURCES} resources"),
            ));
        }
        for (name, resource) in &document.resources {
            let field = format!("resources.{name:?}");
            check_name(&field, name, self.logged)?;
            if name == "*" && !self.logged {
                return Err(PolicyError::new(
                    field,
                    "\"*\" cannot name a resource: covers = [\"*\"] means every resource",
                ));
            }
            if resource.units.is_empty() {
                return Err(PolicyError::new(
                    format!("{field}.units"),
                    "list at least one unit",
                ));
            }
            let mut units = [false; UNIT_COUNT];
            for (index, unit) in resource.units.iter().enumerate() {
                if units[unit.index()] {
                    return Err(PolicyError::new(
                        format!("{field}.units[{index}]"),
                        format!("{unit} is listed twice"),
                    ));
                }
                units[unit.index()] = true;
            }
            let mut price_micros = [None; UNIT_COUNT];
            for (unit, price) in &resource.price_micros {
                if !units[unit.index()] {
                    return Err(PolicyError::new(
                        format!("{field}.price_micros.{unit}"),
                        format!("{unit} is not one of the resource's units"),
                    ));
                }
                if *price > MAX_QUANTITY {
                    return Err(PolicyError::new(
                        format!("{field}.price_micros.{unit}"),
                        format!("{price} exceeds the largest price, {MAX_QUANTITY}"),
                    ));
                }
                price_micros[unit.index()] = Some(*price);
            }
            let max_per_request =
                self.compile_maximums(&field, &units, &resource.max_per_request)?;
            let mut required = [false; UNIT_COUNT];
            for (index, unit) in resource.required.iter().enumerate() {
                if !units[unit.index()] {
                    return Err(PolicyError::new(
                        format!("{field}.required[{index}]"),
                        format!("{unit} is not one of the resource's units"),
                    ));
                }
                // A slip like a repeated unit in `units`; a logged document may hold one.
                if required[unit.index()] && !self.logged {
                    return Err(PolicyError::new(
                        format!("{field}.required[{index}]"),
                        format!("{unit} is listed twice"),
                    ));
                }
                required[unit.index()] = true;
            }
            let id = ResourceId(self.resources.len() as u16);
            self.resource_ids.insert(name.as_str().into(), id);
            self.resources.push(Resource {
                name: name.as_str().into(),
                units,
                price_micros,
                max_per_request,
                required,
                price_weights: price_micros.map(|price| price.unwrap_or(0)),
                unit_mask: unit_mask(&units),
                required_mask: unit_mask(&required),
                priced: price_micros.iter().any(Option::is_some),
                has_maximum: max_per_request.iter().any(|maximum| *maximum > 0),
                safe_quantity_sum: u64::MAX
                    / price_micros
                        .iter()
                        .flatten()
                        .copied()
                        .max()
                        .unwrap_or(1)
                        .max(1),
            });
        }
        Ok(())
    }

    fn compile_maximums(
        &self,
        field: &str,
        units: &[bool; UNIT_COUNT],
        maximums: &BTreeMap<Unit, u64>,
    ) -> Result<[u64; UNIT_COUNT], PolicyError> {
        let mut compiled = [0; UNIT_COUNT];
        for (unit, amount) in maximums {
            let field = format!("{field}.max_per_request.{unit}");
            if !units[unit.index()] {
                return Err(PolicyError::new(
                    field,
                    format!("{unit} is not one of the resource's units"),
                ));
            }
            if *amount == 0 || *amount > MAX_QUANTITY {
                return Err(PolicyError::new(
                    field,
                    format!("must be between 1 and {MAX_QUANTITY}"),
                ));
            }
            compiled[unit.index()] = *amount;
        }
        Ok(compiled)
    }

    fn resource(&self, field: &str, name: &str) -> Result<ResourceId, PolicyError> {
        self.resource_ids
            .get(name)
            .copied()
            .ok_or_else(|| PolicyError::new(field, format!("unknown resource {name:?}")))
    }

    fn unit_of(&self, field: &str, resource: ResourceId, unit: Unit) -> Result<(), PolicyError> {
        let resource = &self.resources[resource.index()];
        if resource.units[unit.index()] {
            Ok(())
        } else {
            Err(PolicyError::new(
                field,
                format!("resource {:?} does not meter {unit}", resource.name),
            ))
        }
    }

    fn compile_named_meters(&mut self, document: &PolicyDocument) -> Result<(), PolicyError> {
        if document.meters.len() > MAX_METERS {
            return Err(PolicyError::new(
                "meters",
                format!("more than {MAX_METERS} meters"),
            ));
        }
        for (name, meter) in &document.meters {
            let field = format!("meters.{name:?}");
            check_name(&field, name, self.logged)?;
            // A limit on a resource and unit counts on the implicit meter `resource:unit`,
            // looked up by that name: a named meter called so would take over every such
            // limit, whatever it counts.
            if name.contains(':') && !self.logged {
                return Err(PolicyError::new(
                    field,
                    format!(
                        "{name:?} contains \":\", which only implicit meters (resource:unit) have"
                    ),
                ));
            }
            let terms = self.meter_terms(&field, meter)?;
            self.add_meter(name, terms);
        }
        self.named_meters = self.meters.len();
        Ok(())
    }

    fn meter_terms(
        &self,
        field: &str,
        meter: &MeterDocument,
    ) -> Result<Vec<(ResourceId, Unit, u64)>, PolicyError> {
        let kinds = usize::from(meter.resource.is_some() || meter.unit.is_some())
            + usize::from(meter.priced)
            + usize::from(!meter.terms.is_empty());
        if kinds != 1 {
            return Err(PolicyError::new(
                field,
                "give exactly one of: resource and unit, priced = true, or terms",
            ));
        }
        if meter.priced {
            let terms: Vec<_> = self
                .resources
                .iter()
                .enumerate()
                .flat_map(|(index, resource)| {
                    Unit::ALL.into_iter().filter_map(move |unit| {
                        resource.price_micros[unit.index()]
                            .map(|price| (ResourceId(index as u16), unit, price))
                    })
                })
                .filter(|(_, _, weight)| *weight > 0)
                .collect();
            if terms.is_empty() {
                return Err(PolicyError::new(
                    format!("{field}.priced"),
                    "no resource has a price",
                ));
            }
            return Ok(terms);
        }
        if !meter.terms.is_empty() {
            let mut terms = Vec::with_capacity(meter.terms.len());
            for (index, term) in meter.terms.iter().enumerate() {
                let term_field = format!("{field}.terms[{index}]");
                let resource = self.resource(&format!("{term_field}.resource"), &term.resource)?;
                self.unit_of(&format!("{term_field}.unit"), resource, term.unit)?;
                if term.weight == 0 || term.weight > MAX_QUANTITY {
                    return Err(PolicyError::new(
                        format!("{term_field}.weight"),
                        format!("must be between 1 and {MAX_QUANTITY}"),
                    ));
                }
                if terms
                    .iter()
                    .any(|(r, u, _)| *r == resource && *u == term.unit)
                {
                    return Err(PolicyError::new(
                        term_field,
                        "this resource and unit appear twice",
                    ));
                }
                terms.push((resource, term.unit, term.weight));
            }
            return Ok(terms);
        }
        let resource_name = meter.resource.as_deref().ok_or_else(|| {
            PolicyError::new(format!("{field}.resource"), "missing: name the resource")
        })?;
        let unit = meter
            .unit
            .ok_or_else(|| PolicyError::new(format!("{field}.unit"), "missing: name the unit"))?;
        let resource = self.resource(&format!("{field}.resource"), resource_name)?;
        self.unit_of(&format!("{field}.unit"), resource, unit)?;
        Ok(vec![(resource, unit, 1)])
    }

    fn add_meter(&mut self, name: &str, terms: Vec<(ResourceId, Unit, u64)>) -> MeterId {
        let id = MeterId(self.meters.len() as u16);
        self.meter_ids.insert(name.into(), id);
        self.meters.push(Meter {
            name: name.into(),
            terms,
        });
        id
    }

    fn limit_meter(&mut self, field: &str, limit: &LimitDocument) -> Result<MeterId, PolicyError> {
        match (&limit.meter, &limit.resource, limit.unit) {
            (Some(meter), None, None) => {
                // Only named meters: an implicit one exists once an earlier plan's limit made
                // it, so finding it here would make a policy valid or not by its plans' order.
                let named = self.meter_ids.get(meter.as_str()).copied();
                let logged = self.logged;
                named
                    .filter(|id| logged || id.index() < self.named_meters)
                    .ok_or_else(|| {
                        let hint = if meter.contains(':') {
                            ": for an implicit meter write resource = \"…\", unit = \"…\""
                        } else {
                            ""
                        };
                        PolicyError::new(
                            format!("{field}.meter"),
                            format!("unknown meter {meter:?}{hint}"),
                        )
                    })
            }
            (None, Some(resource_name), Some(unit)) => {
                let resource = self.resource(&format!("{field}.resource"), resource_name)?;
                self.unit_of(&format!("{field}.unit"), resource, unit)?;
                let name = format!("{resource_name}:{unit}");
                if let Some(id) = self.meter_ids.get(name.as_str()) {
                    return Ok(*id);
                }
                if self.meters.len() >= MAX_METERS {
                    return Err(PolicyError::new(
                        field,
                        format!("more than {MAX_METERS} meters"),
                    ));
                }
                Ok(self.add_meter(&name, vec![(resource, unit, 1)]))
            }
            _ => Err(PolicyError::new(
                field,
                "name either a meter, or a resource and a unit",
            )),
        }
    }

    fn counter(&mut self, meter: MeterId, window: Window) -> CounterId {
        if let Some(index) = self
            .counters
            .iter()
            .position(|counter| counter.meter == meter && counter.window == window)
        {
            return CounterId(index as u16);
        }
        self.counters.push(CounterSpec { meter, window });
        CounterId((self.counters.len() - 1) as u16)
    }

    fn compile_plan(&mut self, name: &str, plan: &PlanDocument) -> Result<Plan, PolicyError> {
        let field = format!("plans.{name:?}");
        check_name(&field, name, self.logged)?;
        // At most what credits can hold: it names what a plan costs, and stays a number TOML
        // can write (a signed 64-bit integer).
        if !self.logged
            && plan
                .price_micros_per_month
                .is_some_and(|price| price > crate::engine::MAX_CREDITS_MICROS)
        {
            return Err(PolicyError::new(
                format!("{field}.price_micros_per_month"),
                format!(
                    "must be at most {} (what credits can hold)",
                    crate::engine::MAX_CREDITS_MICROS
                ),
            ));
        }
        if plan.limits.len() > MAX_LIMITS_PER_PLAN {
            return Err(PolicyError::new(
                format!("{field}.limits"),
                format!("more than {MAX_LIMITS_PER_PLAN} limits"),
            ));
        }
        let mut limits: Vec<Limit> = Vec::with_capacity(plan.limits.len());
        for (index, limit) in plan.limits.iter().enumerate() {
            let limit_field = format!("{field}.limits[{index}]");
            let compiled = self.compile_limit(&limit_field, limit)?;
            // Nor the same meter over the same span with other buckets: a seat change or swap
            // carries a key's count into one counter per meter and span, so the other would
            // start from 0.
            let logged = self.logged;
            if limits.iter().any(|other| {
                other.counter == compiled.counter
                    || (!logged
                        && other.meter == compiled.meter
                        && same_window_ignoring_buckets(other.window, compiled.window))
            }) {
                return Err(PolicyError::new(
                    limit_field,
                    format!("a second limit on {}", compiled.name),
                ));
            }
            limits.push(compiled);
        }
        let touches = self.plan_touches(&field, &limits)?;
        let covers = self.plan_covers(&field, plan, &touches)?;
        let maximums = self.plan_maximums(&field, plan, &covers)?;
        if let Some(open) = plan.max_open_reservations {
            if open == 0 || open > MAX_RESERVATIONS_PER_KEY {
                return Err(PolicyError::new(
                    format!("{field}.max_open_reservations"),
                    format!("must be between 1 and {MAX_RESERVATIONS_PER_KEY}"),
                ));
            }
        }
        let admission = (covers.iter().zip(&maximums).zip(&touches))
            .map(|((covers, units), touches)| {
                let has_maximum = units.iter().any(|maximum| *maximum > 0);
                ResourceAdmission::of(*covers, has_maximum, touches)
            })
            .collect();
        Ok(Plan {
            name: name.into(),
            limits,
            covers,
            touches,
            maximums,
            max_open_reservations: plan.max_open_reservations,
            price_micros_per_month: plan.price_micros_per_month,
            limit_upgrades: Vec::new(),
            admission,
        })
    }

    /// Per-request maximums, indexed by `ResourceId`, 0 where none. One per resource and unit
    /// (a second would silently replace the first), and only on resources the plan covers
    /// (elsewhere the plan never admits anything for it to bound).
    fn plan_maximums(
        &self,
        field: &str,
        plan: &PlanDocument,
        covers: &[bool],
    ) -> Result<Vec<[u64; UNIT_COUNT]>, PolicyError> {
        let mut maximums = vec![[0; UNIT_COUNT]; self.resources.len()];
        for (index, maximum) in plan.maximums.iter().enumerate() {
            let max_field = format!("{field}.maximums[{index}]");
            let resource = self.resource(&format!("{max_field}.resource"), &maximum.resource)?;
            self.unit_of(&format!("{max_field}.unit"), resource, maximum.unit)?;
            if !covers[resource.index()] && !self.logged {
                return Err(PolicyError::new(
                    format!("{max_field}.resource"),
                    format!(
                        "the plan does not cover {:?}, so a maximum on it bounds nothing",
                        maximum.resource
                    ),
                ));
            }
            if maximum.amount == 0 || maximum.amount > MAX_QUANTITY {
                return Err(PolicyError::new(
                    format!("{max_field}.amount"),
                    format!("must be between 1 and {MAX_QUANTITY}"),
                ));
            }
            let slot = &mut maximums[resource.index()][maximum.unit.index()];
            if *slot != 0 && !self.logged {
                return Err(PolicyError::new(
                    max_field,
                    format!(
                        "a second maximum on {:?} {}",
                        maximum.resource, maximum.unit
                    ),
                ));
            }
            *slot = maximum.amount;
        }
        Ok(maximums)
    }

    fn compile_limit(&mut self, field: &str, limit: &LimitDocument) -> Result<Limit, PolicyError> {
        let meter = self.limit_meter(field, limit)?;
        let window = parse_window(field, &limit.window, limit.bucket.as_deref(), self.logged)?;
        let max_amount = match window {
            Window::Rolling { .. } => MAX_ROLLING_AMOUNT,
            Window::Calendar(_) => MAX_CALENDAR_AMOUNT,
        };
        if limit.amount == 0 || limit.amount > max_amount {
            return Err(PolicyError::new(
                format!("{field}.amount"),
                format!(
                    "{} is out of range: a {window} limit is between 1 and {max_amount}",
                    limit.amount
                ),
            ));
        }
        let counter = self.counter(meter, window);
        let name = format!("{} per {window}", self.meters[meter.index()].name);
        debug_assert!(
            name.len() <= MAX_LIMIT_NAME_BYTES,
            "limit name {name:?} is longer than MAX_LIMIT_NAME_BYTES"
        );
        Ok(Limit {
            name: name.into(),
            meter,
            counter,
            amount: limit.amount,
            window,
            shape: window.shape(),
        })
    }

    fn plan_touches(&self, field: &str, limits: &[Limit]) -> Result<Vec<Vec<Touch>>, PolicyError> {
        let mut touches: Vec<Vec<Touch>> = vec![Vec::new(); self.resources.len()];
        for (limit_index, limit) in limits.iter().enumerate() {
            for (resource, unit, weight) in &self.meters[limit.meter.index()].terms {
                let list = &mut touches[resource.index()];
                match list
                    .iter_mut()
                    .find(|touch| usize::from(touch.limit) == limit_index)
                {
                    Some(touch) => touch.weights[unit.index()] = *weight,
                    None => {
                        let mut weights = [0; UNIT_COUNT];
                        weights[unit.index()] = *weight;
                        list.push(Touch {
                            limit: limit_index as u8,
                            weights,
                            single: None,
                        });
                    }
                }
                if list.len() > MAX_LIMITS_PER_RESOURCE {
                    return Err(PolicyError::new(
                        format!("{field}.limits"),
                        format!(
                            "more than {MAX_LIMITS_PER_RESOURCE} limits apply to resource {:?}",
                            self.resources[resource.index()].name
                        ),
                    ));
                }
            }
        }
        for list in &mut touches {
            for touch in list.iter_mut() {
                let mut weighted = touch
                    .weights
                    .iter()
                    .enumerate()
                    .filter(|(_, weight)| **weight > 0);
                touch.single = match (weighted.next(), weighted.next()) {
                    (Some((unit, weight)), None) => Some((Unit::ALL[unit], *weight)),
                    _ => None,
                };
            }
        }
        Ok(touches)
    }

    fn plan_covers(
        &self,
        field: &str,
        plan: &PlanDocument,
        touches: &[Vec<Touch>],
    ) -> Result<Vec<bool>, PolicyError> {
        let covers = match &plan.covers {
            None => touches.iter().map(|list| !list.is_empty()).collect(),
            Some(names) => self.listed_covers(field, names, touches)?,
        };
        if !covers.contains(&true) && !self.logged {
            return Err(PolicyError::new(
                field,
                "the plan has no limits and covers no resource, so it admits nothing: give it limits or covers",
            ));
        }
        Ok(covers)
    }

    /// The resources `covers = [...]` names: `["*"]` all of them, each at most once, and every
    /// resource a limit meters among them.
    fn listed_covers(
        &self,
        field: &str,
        names: &[String],
        touches: &[Vec<Touch>],
    ) -> Result<Vec<bool>, PolicyError> {
        if names.iter().any(|name| name == "*") {
            if names.len() != 1 {
                return Err(PolicyError::new(
                    format!("{field}.covers"),
                    "\"*\" stands alone",
                ));
            }
            return Ok(vec![true; self.resources.len()]);
        }
        let mut covers = vec![false; self.resources.len()];
        for (index, name) in names.iter().enumerate() {
            let covers_field = format!("{field}.covers[{index}]");
            let resource = self.resource(&covers_field, name)?;
            if covers[resource.index()] && !self.logged {
                return Err(PolicyError::new(
                    covers_field,
                    format!("{name:?} is listed twice"),
                ));
            }
            covers[resource.index()] = true;
        }
        for (resource, list) in touches.iter().enumerate() {
            if !list.is_empty() && !covers[resource] {
                return Err(PolicyError::new(
                    format!("{field}.covers"),
                    format!(
                        "a limit meters {:?} but the plan does not cover it",
                        self.resources[resource].name
                    ),
                ));
            }
        }
        Ok(covers)
    }
}

/// Writes into `document` the bucket each rolling limit without one got where the default
/// changed (windows under `ONE_SECOND_DEFAULT_BELOW_MS`), so the document as logged says what
/// it was compiled with: a replay gives it the same buckets, and a logged document without a
/// bucket on such a window is known to be older (1 s). Longer windows are left as written (their
/// default did not change), so an existing database's stored policy and the same file loaded
/// now are still the same document, and opening it swaps nothing. `plans` are `document`'s,
/// compiled, in its order.
fn state_changed_buckets(document: &mut PolicyDocument, plans: &[Plan]) {
    for (plan_document, plan) in document.plans.values_mut().zip(plans) {
        for (limit_document, limit) in plan_document.limits.iter_mut().zip(&plan.limits) {
            if let Window::Rolling {
                window_ms,
                bucket_ms,
            } = limit.window
            {
                if limit_document.bucket.is_none() && window_ms < ONE_SECOND_DEFAULT_BELOW_MS {
                    limit_document.bucket = Some(format_duration(bucket_ms));
                }
            }
        }
    }
}

/// Two windows count the same span (a rolling window whose buckets changed width still holds the
/// same usage: it is reshaped, never dropped).
fn same_window_ignoring_buckets(a: Window, b: Window) -> bool {
    match (a, b) {
        (Window::Rolling { window_ms: x, .. }, Window::Rolling { window_ms: y, .. }) => x == y,
        (a, b) => a == b,
    }
}

/// The cheapest of the plans `accept` takes (by monthly price; unpriced last, then the first).
pub(crate) fn cheapest_plan(plans: &[Plan], accept: impl Fn(&Plan) -> bool) -> Option<PlanId> {
    plans
        .iter()
        .enumerate()
        .filter(|(_, plan)| accept(plan))
        .min_by_key(|(_, plan)| plan.price_micros_per_month.unwrap_or(u64::MAX))
        .map(|(index, _)| PlanId(index as u16))
}

/// Every plan with a larger amount on a limit's counter, with that amount, smallest first.
type Upgrades = Box<[(u64, PlanId)]>;

/// For each limit, every plan with a larger amount on the same meter over the same span,
/// smallest first. The same span, not the same counter: a rolling window's buckets may differ
/// between plans, and a seat change carries the count across them (re-bucketed).
fn link_upgrades(plans: &mut [Plan]) {
    let upgrades: Vec<Vec<Upgrades>> = plans
        .iter()
        .map(|plan| {
            plan.limits
                .iter()
                .map(|limit| {
                    let mut bigger: Vec<(u64, PlanId)> = plans
                        .iter()
                        .enumerate()
                        .filter_map(|(other_index, other)| {
                            other
                                .limits
                                .iter()
                                .find(|candidate| {
                                    candidate.meter == limit.meter
                                        && candidate.window.span_equals(limit.window)
                                        && candidate.amount > limit.amount
                                })
                                .map(|candidate| (candidate.amount, PlanId(other_index as u16)))
                        })
                        .collect();
                    bigger.sort_unstable();
                    bigger.into_boxed_slice()
                })
                .collect()
        })
        .collect();
    for (plan, upgrades) in plans.iter_mut().zip(upgrades) {
        plan.limit_upgrades = upgrades;
    }
}

/// The day of the week a policy's `week_start` names, in lower case: `monday` to `sunday`.
fn parse_weekday(name: &str) -> Option<Weekday> {
    Some(match name {
        "monday" => Weekday::Monday,
        "tuesday" => Weekday::Tuesday,
        "wednesday" => Weekday::Wednesday,
        "thursday" => Weekday::Thursday,
        "friday" => Weekday::Friday,
        "saturday" => Weekday::Saturday,
        "sunday" => Weekday::Sunday,
        _ => return None,
    })
}

/// `logged`: durations as earlier builds read them (a unit may repeat), and a window under
/// `ONE_SECOND_DEFAULT_BELOW_MS` without a bucket gets 1 s, as they gave it.
fn parse_window(
    field: &str,
    window: &str,
    bucket: Option<&str>,
    logged: bool,
) -> Result<Window, PolicyError> {
    let window_field = format!("{field}.window");
    let calendar = match window {
        "daily" => Some(CalendarPeriod::Daily),
        "weekly" => Some(CalendarPeriod::Weekly),
        "monthly" => Some(CalendarPeriod::Monthly),
        _ => None,
    };
    if let Some(period) = calendar {
        if bucket.is_some() {
            return Err(PolicyError::new(
                format!("{field}.bucket"),
                "only a rolling window has buckets",
            ));
        }
        return Ok(Window::Calendar(period));
    }
    let Some(duration) = window.strip_prefix("rolling:") else {
        return Err(PolicyError::new(
            window_field,
            format!("{window:?} is not a window: write rolling:DURATION (e.g. rolling:5h), daily, weekly or monthly"),
        ));
    };
    let window_ms = parse_duration(duration, !logged)
        .map_err(|problem| PolicyError::new(&window_field, problem))?;
    if !(MIN_ROLLING_WINDOW_MS..=MAX_ROLLING_WINDOW_MS).contains(&window_ms) {
        return Err(PolicyError::new(
            window_field,
            format!(
                "a rolling window lasts between {} and {}",
                format_duration(MIN_ROLLING_WINDOW_MS),
                format_duration(MAX_ROLLING_WINDOW_MS)
            ),
        ));
    }
    let bucket_field = format!("{field}.bucket");
    let bucket_ms = match bucket {
        Some(text) => {
            parse_duration(text, !logged).map_err(|problem| PolicyError::new(&bucket_field, problem))?
        }
        None if logged && window_ms < ONE_SECOND_DEFAULT_BELOW_MS => SECOND_MS,
        None => default_bucket_ms(window_ms).ok_or_else(|| {
            PolicyError::new(
                &bucket_field,
                format!(
                    "no bucket divides {} into between {DEFAULT_BUCKETS_PER_WINDOW} and {MAX_BUCKETS_PER_WINDOW} equal buckets: give one",
                    format_duration(window_ms)
                ),
            )
        })?,
    };
    if bucket_ms < MIN_BUCKET_MS {
        return Err(PolicyError::new(
            bucket_field,
            format!("a bucket lasts at least {}", format_duration(MIN_BUCKET_MS)),
        ));
    }
    if window_ms % bucket_ms != 0 {
        return Err(PolicyError::new(
            bucket_field,
            format!(
                "{} does not divide the window ({}) evenly, so a unit could come back more than one bucket late",
                format_duration(bucket_ms),
                format_duration(window_ms)
            ),
        ));
    }
    if bucket_ms * 2 > window_ms {
        return Err(PolicyError::new(
            bucket_field,
            format!(
                "a bucket lasts at most half the window ({})",
                format_duration(window_ms)
            ),
        ));
    }
    if window_ms.div_ceil(bucket_ms) > MAX_BUCKETS_PER_WINDOW {
        return Err(PolicyError::new(
            bucket_field,
            format!("the window would have more than {MAX_BUCKETS_PER_WINDOW} buckets"),
        ));
    }
    Ok(Window::Rolling {
        window_ms,
        bucket_ms,
    })
}

/// The default bucket: the widest that divides the window into at least
/// `DEFAULT_BUCKETS_PER_WINDOW` equal buckets (so a unit comes back at most one bucket, under
/// 0.5% of the window, late), preferring whole seconds; in milliseconds where no whole second
/// does (every window under 210 s: 250 ms for one minute). `None` where no count of buckets from
/// 210 to `MAX_BUCKETS_PER_WINDOW` divides the window (say a prime number of milliseconds past
/// 4,096).
fn default_bucket_ms(window_ms: u64) -> Option<u64> {
    widest_bucket_ms(window_ms, MIN_BUCKET_MS)
}

/// The widest bucket of at least `floor_ms` that divides the window into between
/// `DEFAULT_BUCKETS_PER_WINDOW` and `MAX_BUCKETS_PER_WINDOW` equal buckets, whole seconds first.
/// Builds before sub-second buckets searched with a floor of 1 s.
fn widest_bucket_ms(window_ms: u64, floor_ms: u64) -> Option<u64> {
    let fits = |buckets: u64, whole_seconds: bool| {
        let bucket_ms = window_ms / buckets;
        window_ms % buckets == 0
            && bucket_ms >= floor_ms
            && (!whole_seconds || bucket_ms % SECOND_MS == 0)
    };
    let range = DEFAULT_BUCKETS_PER_WINDOW..=MAX_BUCKETS_PER_WINDOW;
    range
        .clone()
        .find(|buckets| fits(*buckets, true))
        .or_else(|| range.clone().find(|buckets| fits(*buckets, false)))
        .map(|buckets| window_ms / buckets)
}

/// Parses `5h`, `90s`, `1h30m`, `1500ms`, `7d`, `2w`.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    parse_duration(text, true)
}

/// `parse_duration_ms`; without `one_unit_each`, a unit may repeat or follow a smaller one (as
/// builds before format 3 read durations: "5h5h" is 10 hours).
fn parse_duration(text: &str, one_unit_each: bool) -> Result<u64, String> {
    let mut total: u64 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return Err("a duration must not be empty".into());
    }
    // Each unit at most once, the largest first ("1h30m"): "5h5h" or "30m1h" is a slip.
    let mut previous_scale = u64::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "{text:?} is not a duration like 5h, 90s, 1h30m or 1500ms"
            ));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: the number is too large"))?;
        rest = &rest[digits..];
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let scale = match &rest[..letters] {
            "ms" => 1,
            "s" => SECOND_MS,
            "m" => MINUTE_MS,
            "h" => HOUR_MS,
            "d" => DAY_MS,
            "w" => WEEK_MS,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use ms, s, m, h, d or w)"
                ))
            }
        };
        if one_unit_each && scale >= previous_scale {
            return Err(format!(
                "{text:?}: each unit at most once, the largest first (like 1h30m)"
            ));
        }
        previous_scale = scale;
        rest = &rest[letters..];
        total = number
            .checked_mul(scale)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| format!("{text:?} is too long"))?;
    }
    Ok(total)
}

pub fn format_duration(mut ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    let mut text = String::new();
    for (scale, unit) in [
        (DAY_MS, "d"),
        (HOUR_MS, "h"),
        (MINUTE_MS, "m"),
        (SECOND_MS, "s"),
        (1, "ms"),
    ] {
        if ms >= scale {
            text.push_str(&format!("{}{unit}", ms / scale));
            ms %= scale;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{Amounts, Quantities};

    /// A plan's admission summary says what `covers`, `maximums` and `touches` say, and
    /// its weight-1 shortcut is taken only where it gives the amounts `Amounts::fill` gives.
    #[test]
    fn a_plans_admission_summary_agrees_with_its_touches() {
        let policy = Policy::from_toml_str(
            r#"time_zone = "UTC"
[resources.chat]
units = ["requests", "tokens"]
[resources.image]
units = ["images", "requests"]
[meters.heavy]
terms = [{ resource = "image", unit = "images", weight = 100 }]
[meters.both]
terms = [{ resource = "chat", unit = "requests", weight = 1 }, { resource = "chat", unit = "tokens", weight = 1 }]
[meters.one]
terms = [{ resource = "image", unit = "requests", weight = 1 }]
[plans.Plain]
limits = [
 { resource = "chat", unit = "requests", amount = 50, window = "rolling:5h" },
 { resource = "chat", unit = "requests", amount = 100, window = "daily" },
]
[plans.Mixed]
covers = ["*"]
limits = [
 { meter = "both", amount = 1000, window = "daily" },
 { meter = "heavy", amount = 1000, window = "daily" },
 { meter = "one", amount = 10, window = "weekly" },
 { resource = "image", unit = "requests", amount = 10, window = "daily" },
]
"#,
        )
        .expect("valid");
        let (chat, image) = (policy.resource_id("chat"), policy.resource_id("image"));
        let (chat, image) = (chat.expect("chat"), image.expect("image"));
        let shortcut = |plan: &str, resource: ResourceId| {
            let plan = policy.plan(policy.plan_id(plan).expect("plan"));
            let summary = plan.admission[resource.index()];
            assert_eq!(summary.covers, plan.covers[resource.index()]);
            let maximums = &plan.maximums[resource.index()];
            assert_eq!(
                summary.has_maximum,
                maximums.iter().any(|maximum| *maximum > 0)
            );
            let touches = &plan.touches[resource.index()];
            let limits: Vec<u8> = touches.iter().map(|touch| touch.limit).collect();
            assert_eq!(summary.limits(), &limits[..]);
            for quantities in [
                &[(Unit::Requests, 3)][..],
                &[(Unit::Requests, 3), (Unit::Tokens, 7)],
                &[(Unit::Images, 2), (Unit::Requests, 1)],
                &[(Unit::Tokens, 5)],
            ] {
                let quantities = Quantities::new(quantities).expect("valid");
                let mut filled = Amounts::empty();
                assert!(filled.fill(touches, &quantities));
                if let Some(unit) = summary.unit_at_weight_one {
                    let mut shortcut = Amounts::empty();
                    shortcut.fill_at_weight_one(summary.limits(), quantities.get(unit));
                    assert_eq!(shortcut.as_slice(), filled.as_slice(), "{quantities:?}");
                }
            }
            summary.unit_at_weight_one
        };
        assert_eq!(shortcut("Plain", chat), Some(Unit::Requests));
        assert_eq!(shortcut("Plain", image), None);
        // Two units on one meter, or a weight of 100: the general fill.
        assert_eq!(shortcut("Mixed", chat), None);
        assert_eq!(shortcut("Mixed", image), None);
    }

    /// The longest limit name a policy can make (a resource name of `MAX_NAME_BYTES`, the
    /// longest unit, every part of a rolling window under `MAX_ROLLING_WINDOW_MS`) is
    /// `MAX_LIMIT_NAME_BYTES` long: the bound the C ABI's name arrays are sized by is reached,
    /// and the policy loads.
    fn longest_names_json() -> String {
        let resource = "r".repeat(MAX_NAME_BYTES);
        let plan = "p".repeat(MAX_NAME_BYTES);
        format!(
            r#"{{"time_zone":"UTC","resources":{{"{resource}":{{"units":["characters"]}}}},"meters":{{}},"plans":{{"{plan}":{{"limits":[{{"resource":"{resource}","unit":"characters","amount":5,"window":"rolling:365d23h59m59s998ms","bucket":"182d23h59m59s999ms"}}]}}}}}}"#
        )
    }

    #[test]
    fn the_longest_limit_name_is_max_limit_name_bytes_long() {
        let policy = Policy::from_json_str(&longest_names_json()).unwrap();
        let plan = &policy.plans[0];
        assert_eq!(plan.name.len(), MAX_NAME_BYTES);
        assert_eq!(
            plan.limits[0].name.len(),
            MAX_LIMIT_NAME_BYTES,
            "{}",
            plan.limits[0].name
        );
        assert_eq!(MAX_LIMIT_NAME_BYTES, 106);
    }

    /// `same_name` agrees with `==` at every length it treats apart (and beyond), for equal
    /// names, a byte differing at each position, and names of different lengths.
    #[test]
    fn same_name_agrees_with_byte_equality_at_every_length_and_position() {
        for len in 0..=40usize {
            let name: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            assert!(same_name(&name, &name.clone()), "len {len}");
            for position in 0..len {
                let mut other = name.clone().into_bytes();
                other[position] = b'Z';
                let other = String::from_utf8(other).unwrap();
                assert!(
                    !same_name(&name, &other),
                    "len {len}, differing at {position}"
                );
                assert!(
                    !same_name(&other, &name),
                    "len {len}, differing at {position}"
                );
            }
            let longer = format!("{name}a");
            assert!(!same_name(&name, &longer) && !same_name(&longer, &name));
        }
    }

    #[test]
    fn the_resource_scan_finds_what_the_name_map_holds_and_nothing_else() {
        let policy = Policy::token_plan();
        assert!(
            policy.resources().len() <= LINEAR_LOOKUP_MAX,
            "the scan is the path tested"
        );
        for (name, id) in &policy.resource_ids {
            assert_eq!(policy.resource_id(name), Some(*id), "{name}");
        }
        for unknown in ["", "m2", "m2.7 ", "M2.7", "m2.7-highspeed-x"] {
            assert_eq!(policy.resource_id(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn the_shipped_policy_compiles_with_every_seed_plan() {
        let policy = Policy::token_plan();
        for plan in [
            "Starter",
            "Plus",
            "Max",
            "Plus-Highspeed",
            "Max-Highspeed",
            "Ultra-Highspeed",
            "Bar-Plus",
            "Bar-Max",
            "Bar-Ultra",
        ] {
            assert!(policy.plan_id(plan).is_some(), "{plan}");
        }
        assert_eq!(policy.calendar().time_zone(), "Asia/Shanghai");
    }

    #[test]
    fn the_default_bucket_divides_the_window_into_at_least_210() {
        assert_eq!(default_bucket_ms(5 * HOUR_MS), Some(80 * SECOND_MS));
        assert_eq!(default_bucket_ms(WEEK_MS), Some(2_880 * SECOND_MS));
        // Under 210 s no whole second does: the bucket is in milliseconds. (It was 1 s, 60
        // buckets, an error of 1.7% on one minute.)
        assert_eq!(default_bucket_ms(60 * SECOND_MS), Some(250));
        assert_eq!(default_bucket_ms(2 * SECOND_MS), Some(8));
        assert_eq!(default_bucket_ms(10 * SECOND_MS), Some(40));
        let short = (2..=210).map(|seconds| seconds * SECOND_MS);
        let odd = [2_001, 2_003, 3_333, 4_096, 209_999, 210_500];
        for window_ms in [
            HOUR_MS,
            5 * HOUR_MS,
            DAY_MS,
            WEEK_MS,
            30 * DAY_MS,
            7_777 * SECOND_MS,
        ]
        .into_iter()
        .chain(short)
        .chain(odd)
        {
            let bucket_ms = default_bucket_ms(window_ms).expect("a bucket");
            assert_eq!(window_ms % bucket_ms, 0, "{window_ms}");
            assert!(
                window_ms / bucket_ms >= DEFAULT_BUCKETS_PER_WINDOW,
                "{window_ms}"
            );
        }
    }

    /// Every window from 2 s to 4 minutes, compiled with its default bucket, splits into at
    /// least 210 equal buckets (an error under 0.5%), at most `MAX_BUCKETS_PER_WINDOW`.
    #[test]
    fn every_short_windows_default_bucket_errs_under_half_a_percent() {
        for window_ms in (2 * SECOND_MS..=4 * MINUTE_MS).step_by(500) {
            let window = format!("rolling:{}", format_duration(window_ms));
            let Window::Rolling { bucket_ms, .. } =
                parse_window("f", &window, None, false).expect(&window)
            else {
                unreachable!()
            };
            assert_eq!(window_ms % bucket_ms, 0, "{window}");
            let buckets = window_ms / bucket_ms;
            assert!(
                (DEFAULT_BUCKETS_PER_WINDOW..=MAX_BUCKETS_PER_WINDOW).contains(&buckets),
                "{window}: {buckets} buckets"
            );
        }
    }

    /// From `ONE_SECOND_DEFAULT_BELOW_MS` on, the default is what builds before sub-second
    /// buckets gave (their rule, below, with its 1 s floor): a logged document without a bucket
    /// on such a window compiles as it did, and the document need not state it.
    #[test]
    fn from_210_seconds_on_the_default_bucket_is_what_it_was_before_sub_second_buckets() {
        fn before(window_ms: u64) -> Option<u64> {
            if window_ms < DEFAULT_BUCKETS_PER_WINDOW * SECOND_MS {
                return (window_ms % SECOND_MS == 0).then_some(SECOND_MS);
            }
            widest_bucket_ms(window_ms, SECOND_MS)
        }
        let seconds = (210..=3 * 3_600).map(|seconds| seconds * SECOND_MS);
        let odd = (0..2_000).map(|step| ONE_SECOND_DEFAULT_BELOW_MS + step * 7_919);
        let long = [
            5 * HOUR_MS,
            DAY_MS,
            WEEK_MS,
            MONTH_MS,
            MAX_ROLLING_WINDOW_MS,
        ];
        for window_ms in seconds.chain(odd).chain(long) {
            if let Some(bucket_ms) = before(window_ms) {
                assert_eq!(default_bucket_ms(window_ms), Some(bucket_ms), "{window_ms}");
            }
        }
    }

    #[test]
    fn a_bucket_below_the_minimum_is_refused_naming_the_bucket() {
        let error = parse_window("plans.\"P\".limits[0]", "rolling:2s", Some("0ms"), false)
            .expect_err("refused");
        assert_eq!(error.field, "plans.\"P\".limits[0].bucket");
        assert!(error.problem.contains("at least 1ms"), "{}", error.problem);
        assert!(parse_window("f", "rolling:2s", Some("1ms"), false).is_ok());
        assert!(parse_window("f", "rolling:60s", Some("250ms"), false).is_ok());
    }

    /// A name with an invisible format character looks like another: `Plus\u{200b}` beside
    /// `Plus`, or a direction override that shows an operator a different name. Refused on load,
    /// naming the field; a document logged before the rule still replays.
    #[test]
    fn a_name_with_an_invisible_format_character_is_refused_unless_logged() {
        for (place, invisible) in [
            ("plan", "Plus\u{200b}"),
            ("plan", "\u{202e}sulP"),
            ("resource", "m2.7\u{2060}"),
            ("meter", "\u{feff}bar"),
            ("plan", "Pl\u{ad}us"),
            ("resource", "tag\u{e0041}"),
        ] {
            let (resource, meter, plan) = match place {
                "plan" => ("chat", "bar", invisible),
                "resource" => (invisible, "bar", "P"),
                _ => ("chat", invisible, "P"),
            };
            let json = serde_json::json!({
                "time_zone": "UTC",
                "resources": {resource: {"units": ["requests"]}},
                "meters": {meter: {"terms": [{"resource": resource, "unit": "requests", "weight": 1}]}},
                "plans": {plan: {"limits": [
                    {"meter": meter, "amount": 5, "window": "rolling:5h"}
                ]}},
            })
            .to_string();
            let error = Policy::from_json_str(&json).expect_err(invisible);
            let field = match place {
                "plan" => format!("plans.{invisible:?}"),
                "resource" => format!("resources.{invisible:?}"),
                _ => format!("meters.{invisible:?}"),
            };
            assert_eq!(error.field, field, "{error}");
            assert!(error.to_string().contains("invisible character"), "{error}");
            let logged = Policy::from_logged_json(&json).expect(invisible);
            assert_eq!(logged.document(), &serde_json::from_str(&json).unwrap());
        }
        // Visible letters of other scripts, and marks that combine with a letter, stay names.
        for name in ["Plüs", "計画", "Plan\u{301}", "Ultra-Highspeed"] {
            let json = format!(
                r#"{{"time_zone":"UTC","resources":{{"chat":{{"units":["requests"]}}}},"meters":{{}},"plans":{{"{name}":{{"limits":[{{"resource":"chat","unit":"requests","amount":5,"window":"rolling:5h"}}]}}}}}}"#
            );
            Policy::from_json_str(&json).expect(name);
        }
    }

    /// Characters that show nothing but are not format characters (Cf) make look-alike names
    /// too: a variation selector, the combining grapheme joiner, a Hangul filler (Unicode's
    /// Default_Ignorable_Code_Point). `Plus\u{fe0f}` beside `Plus` is two plans an operator
    /// reads as one, so such a name is refused as one with a zero-width space is.
    #[test]
    fn a_name_with_an_ignorable_character_that_is_no_format_character_is_refused() {
        for invisible in [
            "Plus\u{fe0f}",
            "Plus\u{34f}",
            "Plus\u{3164}",
            "\u{115f}Plus",
            "Plus\u{ffa0}",
            "Plus\u{180b}",
            "Plus\u{17b4}",
            "Plus\u{e0100}",
            "Plus\u{2065}",
        ] {
            let json = format!(
                r#"{{"time_zone":"UTC","resources":{{"chat":{{"units":["requests"]}}}},"meters":{{}},"plans":{{"{invisible}":{{"limits":[{{"resource":"chat","unit":"requests","amount":5,"window":"rolling:5h"}}]}}}}}}"#
            );
            let error = Policy::from_json_str(&json).expect_err(invisible);
            assert_eq!(error.field, format!("plans.{invisible:?}"), "{error}");
            assert!(error.to_string().contains("invisible"), "{error}");
            Policy::from_logged_json(&json).expect(invisible);
        }
    }

    /// A one-minute policy as a build before sub-second buckets logged it: no bucket, so 1 s.
    const ONE_MINUTE_JSON: &str = r#"{"time_zone":"UTC","resources":{"chat":{"units":["requests"]}},"meters":{},"plans":{"P":{"limits":[{"resource":"chat","unit":"requests","amount":5,"window":"rolling:1m"},{"resource":"chat","unit":"requests","amount":50,"window":"rolling:5h"}]}}}"#;

    fn bucket_of(policy: &Policy, limit: usize) -> u64 {
        match policy.plans()[0].limits[limit].window {
            Window::Rolling { bucket_ms, .. } => bucket_ms,
            Window::Calendar(_) => unreachable!(),
        }
    }

    /// A database depends on the buckets its logged policies were compiled with: a document
    /// logged without a bucket on a window under 210 s was compiled with 1 s, and is still.
    #[test]
    fn a_logged_document_without_a_bucket_on_a_short_window_keeps_its_one_second_buckets() {
        let logged = Policy::from_logged_json(ONE_MINUTE_JSON).expect("opens");
        assert_eq!(bucket_of(&logged, 0), SECOND_MS);
        assert_eq!(bucket_of(&logged, 1), 80 * SECOND_MS);
        // Left as logged: a snapshot writes it back byte for byte (`verify` compares them).
        assert_eq!(
            serde_json::to_string(logged.document()).unwrap(),
            ONE_MINUTE_JSON
        );
    }

    /// A document being loaded gets the new default, and states it where the rule changed, so
    /// the log holds it and a replay compiles the same; a 5-hour window is left as written.
    #[test]
    fn a_loaded_document_states_a_short_windows_bucket_so_its_log_replays_the_same() {
        let loaded = Policy::from_json_str(ONE_MINUTE_JSON).expect("loads");
        assert_eq!(bucket_of(&loaded, 0), 250);
        assert_eq!(bucket_of(&loaded, 1), 80 * SECOND_MS);
        let limits = &loaded.document().plans["P"].limits;
        assert_eq!(limits[0].bucket.as_deref(), Some("250ms"));
        assert_eq!(limits[1].bucket, None);
        let json = serde_json::to_string(loaded.document()).unwrap();
        let replayed = Policy::from_logged_json(&json).expect("replays");
        assert_eq!(bucket_of(&replayed, 0), 250);
        assert_eq!(replayed.document(), loaded.document());
        // Loading it again is the same document (an open compares them to decide on a swap).
        let again = Policy::from_json_str(&json).expect("loads");
        assert_eq!(again.document(), loaded.document());
        // The shipped policy's windows are all long: its document is as written.
        let shipped: PolicyDocument = toml::from_str(TOKEN_PLAN_TOML).unwrap();
        assert_eq!(Policy::token_plan().document(), &shipped);
    }

    #[test]
    fn durations_parse_and_print_back() {
        assert_eq!(parse_duration_ms("5h"), Ok(5 * HOUR_MS));
        assert_eq!(parse_duration_ms("1h30m"), Ok(90 * MINUTE_MS));
        assert_eq!(parse_duration_ms("1500ms"), Ok(1_500));
        assert!(parse_duration_ms("").is_err());
        assert!(parse_duration_ms("5 hours").is_err());
        assert!(parse_duration_ms("99999999999999999999d").is_err());
        // Each unit once, the largest first: "5h5h" was read as 10 hours.
        assert_eq!(parse_duration_ms("1w2d"), Ok(9 * DAY_MS));
        for slip in ["5h5h", "30m1h", "1s1s", "10ms1s"] {
            let problem = parse_duration_ms(slip).expect_err(slip);
            assert!(problem.contains("the largest first"), "{slip}: {problem}");
        }
        assert_eq!(format_duration(90 * MINUTE_MS + 1), "1h30m1ms");
    }

    #[test]
    fn a_bucket_that_does_not_divide_the_window_is_refused() {
        let error = parse_window("plans.\"P\".limits[0]", "rolling:5h", Some("85s"), false)
            .expect_err("refused");
        assert_eq!(error.field, "plans.\"P\".limits[0].bucket");
        assert!(
            error.problem.contains("does not divide"),
            "{}",
            error.problem
        );
        assert!(parse_window("f", "rolling:5h", Some("90s"), false).is_ok());
    }

    #[test]
    fn a_schema_error_names_the_field_path() {
        let text =
            TOKEN_PLAN_TOML.replacen("[plans.Starter]", "[plans.Starter]\ncolour = \"red\"", 1);
        let error = Policy::from_toml_str(&text).expect_err("refused");
        assert!(error.field.contains("Starter"), "{error}");
        assert!(error.problem.contains("colour"), "{error}");
    }

    fn refused(text: &str) -> PolicyError {
        match Policy::from_toml_str(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(error) => error,
        }
    }

    /// A chat resource and an image resource, in UTC, for the policies below; plans follow.
    const CHAT_AND_IMAGE: &str = r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[resources.image]
units = ["images"]
"#;

    /// `CHAT_AND_IMAGE` with the image's units line replaced by `image_units` (its `units`, and
    /// `required` if given), and a plan P covering everything.
    fn with_image_units(image_units: &str) -> String {
        CHAT_AND_IMAGE.replace("units = [\"images\"]", image_units)
            + "[plans.P]\ncovers = [\"*\"]\n"
    }

    /// Before, the meter below counted images and took over the plan's limit on chat requests:
    /// a chat request moved nothing, the limit filled with images.
    #[test]
    fn a_named_meter_called_like_an_implicit_meter_is_refused() {
        let text = format!(
            r#"{CHAT_AND_IMAGE}
[meters."chat:requests"]
resource = "image"
unit = "images"
[plans.P]
limits = [{{ resource = "chat", unit = "requests", amount = 10, window = "daily" }}]
"#
        );
        let error = refused(&text);
        assert_eq!(error.field, r#"meters."chat:requests""#, "{error}");
        assert!(error.problem.contains("implicit"), "{error}");
    }

    /// `meter = "chat:requests"` found the implicit meter only when a plan earlier in name
    /// order had a limit on chat requests: plan "B" was valid beside "A", not beside "C".
    #[test]
    fn a_limit_naming_an_implicit_meter_as_a_meter_is_refused_whatever_the_plans_order() {
        for other in ["A", "C"] {
            let text = format!(
                r#"{CHAT_AND_IMAGE}
[plans.{other}]
limits = [{{ resource = "chat", unit = "requests", amount = 10, window = "daily" }}]
[plans.B]
limits = [{{ meter = "chat:requests", amount = 10, window = "daily" }}]
"#
            );
            let error = refused(&text);
            assert_eq!(
                error.field, r#"plans."B".limits[0].meter"#,
                "{other}: {error}"
            );
            assert!(error.problem.contains("resource ="), "{error}");
        }
    }

    /// A field is written one way whether the schema or a check refuses it: before, an
    /// unknown unit was at `plans.P.limits[0].unit` and a unit the resource lacks at
    /// `plans."P".limits[0].unit`.
    #[test]
    fn schema_errors_and_checks_write_a_field_the_same_way() {
        let with_unit = |unit: &str| {
            format!(
                r#"{CHAT_AND_IMAGE}
[plans.P]
limits = [{{ resource = "chat", unit = "{unit}", amount = 10, window = "daily" }}]
"#
            )
        };
        let unknown = refused(&with_unit("bananas"));
        let not_metered = refused(&with_unit("images"));
        assert!(unknown.problem.contains("bananas"), "{unknown}");
        assert!(
            not_metered.problem.contains("does not meter"),
            "{not_metered}"
        );
        assert_eq!(unknown.field, r#"plans."P".limits[0].unit"#);
        assert_eq!(not_metered.field, unknown.field);
        let error = refused(&format!("{CHAT_AND_IMAGE}[plans.P]\ncolour = 1\n"));
        assert_eq!(error.field, r#"plans."P".colour"#);
    }

    /// JSON allows a repeated key and serde kept the last: a second plan "P" replaced the
    /// first (amount 99999 instead of 10), a second resource its price. TOML refuses repeats.
    #[test]
    fn a_json_policy_repeating_a_name_is_refused_naming_it() {
        let chat = r#""chat":{"units":["requests"],"price_micros":{"requests":1000}}"#;
        let limit = |amount: u64| {
            format!(
                r#"{{"limits":[{{"resource":"chat","unit":"requests","amount":{amount},"window":"daily"}}]}}"#
            )
        };
        let json = |resources: &str, meters: &str, plans: &str| {
            format!(
                r#"{{"time_zone":"UTC","resources":{{{resources}}},"meters":{{{meters}}},"plans":{{{plans}}}}}"#
            )
        };
        let bar = r#""bar":{"priced":true}"#;
        let one_plan = format!(r#""P":{}"#, limit(10));
        let cases = [
            (
                json(chat, bar, &format!(r#"{one_plan},"P":{}"#, limit(99999))),
                r#"plans."P""#,
                r#""P""#,
            ),
            (
                json(&format!("{chat},{chat}"), bar, &one_plan),
                r#"resources."chat""#,
                r#""chat""#,
            ),
            (
                json(chat, &format!("{bar},{bar}"), &one_plan),
                r#"meters."bar""#,
                r#""bar""#,
            ),
            (
                json(
                    &chat.replace("1000", r#"1000,"requests":0"#),
                    bar,
                    &one_plan,
                ),
                r#"resources."chat".price_micros.requests"#,
                r#""requests""#,
            ),
        ];
        for (text, field, name) in cases {
            let error = match Policy::from_json_str(&text) {
                Ok(_) => panic!("accepted: {text}"),
                Err(error) => error,
            };
            assert!(error.field.starts_with(field), "{error}");
            assert!(
                error.problem.contains(&format!("{name} appears twice")),
                "{error}"
            );
        }
        // The same policy without the repeats loads.
        Policy::from_json_str(&json(chat, bar, &one_plan)).expect("valid");
    }

    /// TOML refused a repeated name before; it still does, and says so.
    #[test]
    fn a_toml_policy_repeating_a_name_is_refused() {
        let text = format!(
            "{CHAT_AND_IMAGE}[plans.P]\ncovers = [\"chat\"]\n[plans.P]\ncovers = [\"image\"]\n"
        );
        let error = refused(&text);
        assert!(error.problem.contains("duplicate"), "{error}");
    }

    /// A unit stays counted until its period ends, so the longest window is the longest
    /// period of the zone: 26 h for a day of Antarctica/Troll, whose clocks go back 2 h on the
    /// last Sunday of October (before, every zone's day was taken to last at most 25 h).
    #[test]
    fn the_longest_window_is_the_longest_period_of_the_policys_zone() {
        let daily_in = |zone: &str, window: &str| {
            let text = format!(
                r#"time_zone = "{zone}"
[resources.chat]
units = ["requests"]
[plans.P]
limits = [{{ resource = "chat", unit = "requests", amount = 10, window = "{window}" }}]
"#
            );
            Policy::from_toml_str(&text)
                .expect("valid")
                .longest_window_ms()
        };
        assert_eq!(daily_in("Antarctica/Troll", "daily"), 26 * HOUR_MS);
        assert_eq!(
            daily_in("Antarctica/Troll", "weekly"),
            WEEK_MS + 2 * HOUR_MS
        );
        assert_eq!(
            daily_in("Antarctica/Troll", "monthly"),
            31 * DAY_MS + 2 * HOUR_MS
        );
        // Zones whose clocks go back at most an hour keep the figures they had.
        assert_eq!(daily_in("UTC", "daily"), DAY_MS + HOUR_MS);
        assert_eq!(daily_in("America/New_York", "weekly"), WEEK_MS + HOUR_MS);
        assert_eq!(daily_in("Asia/Shanghai", "monthly"), 31 * DAY_MS + HOUR_MS);
        assert_eq!(Policy::token_plan().longest_window_ms(), WEEK_MS + HOUR_MS);
    }

    /// `week_start` names the day weekly windows reset on; a document without it (every one
    /// logged before it could be named) has Monday weeks and writes no `week_start` back. A
    /// swap may change it under windows that are not weekly, never under a weekly window
    /// that carries over (the current week's count would be read as another week's).
    #[test]
    fn the_weeks_first_day_is_monday_unless_named_and_a_swap_keeps_it_under_weekly_windows() {
        let with = |week_start: Option<&str>, window: &str| {
            let line = week_start.map_or(String::new(), |day| format!("week_start = \"{day}\"\n"));
            Policy::from_toml_str(&format!(
                r#"time_zone = "UTC"
{line}[resources.chat]
units = ["requests"]
[plans.P]
limits = [{{ resource = "chat", unit = "requests", amount = 10, window = "{window}" }}]
"#
            ))
        };
        let monday = with(None, "weekly").expect("valid");
        assert_eq!(monday.calendar().week_start(), Weekday::Monday);
        let json = |policy: &Policy| serde_json::to_string(policy.document()).expect("json");
        assert!(!json(&monday).contains("week_start"));
        let sunday = with(Some("sunday"), "weekly").expect("valid");
        assert_eq!(sunday.calendar().week_start(), Weekday::Sunday);
        assert_eq!(sunday.document().week_start.as_deref(), Some("sunday"));
        let logged = Policy::from_logged_json(&json(&sunday)).expect("replays");
        assert_eq!(logged.calendar().week_start(), Weekday::Sunday);
        for name in ["Sunday", "sun", "", "funday"] {
            let error = with(Some(name), "weekly").expect_err("not a day");
            assert_eq!(error.field, "week_start", "{name:?}");
            assert!(error.problem.contains(&format!("{name:?}")), "{error}");
        }
        let refused = monday.check_swap_to(&sunday).expect_err("weekly carried");
        assert_eq!(refused.field, "week_start");
        assert!(refused.problem.contains("Sunday"), "{refused}");
        assert!(sunday.check_swap_to(&monday).is_err());
        assert!(monday
            .check_swap_to(&with(Some("monday"), "weekly").unwrap())
            .is_ok());
        // Daily windows do not care which day a week starts on.
        let daily = with(None, "daily").expect("valid");
        assert!(daily
            .check_swap_to(&with(Some("friday"), "daily").unwrap())
            .is_ok());
    }

    /// A plan with no limits and no covers (or empty covers) admitted nothing and was
    /// accepted; a seat on it looked like a plan and was none.
    #[test]
    fn a_plan_with_nothing_in_it_is_refused_naming_it() {
        for body in ["", "covers = []\n", "max_open_reservations = 3\n"] {
            let error = refused(&format!("{CHAT_AND_IMAGE}[plans.Empty]\n{body}"));
            assert_eq!(error.field, r#"plans."Empty""#, "{body:?}: {error}");
            assert!(error.problem.contains("admits nothing"), "{error}");
        }
        // Covering a resource without limiting it is a plan: the resource is unlimited.
        let policy = Policy::from_toml_str(&format!(
            "{CHAT_AND_IMAGE}[plans.Open]\ncovers = [\"chat\"]\n"
        ))
        .expect("valid");
        let plan = policy.plan(policy.plan_id("Open").expect("plan"));
        assert_eq!(plan.covers, vec![true, false]);
    }

    /// Two maximums on the same resource and unit were accepted and the last kept; a maximum
    /// on a resource the plan does not cover, and a resource covered twice, were accepted too.
    #[test]
    fn repeated_or_pointless_maximums_and_covers_are_refused_naming_them() {
        let limit =
            r#"limits = [{ resource = "chat", unit = "requests", amount = 10, window = "daily" }]"#;
        let plan = |rest: &str| format!("{CHAT_AND_IMAGE}[plans.P]\n{limit}\n{rest}");
        let error = refused(&plan(
            r#"maximums = [
  { resource = "chat", unit = "requests", amount = 1 },
  { resource = "chat", unit = "requests", amount = 5 },
]
"#,
        ));
        assert_eq!(error.field, r#"plans."P".maximums[1]"#, "{error}");
        assert!(error.problem.contains("second maximum"), "{error}");
        let error = refused(&plan(
            "maximums = [{ resource = \"image\", unit = \"images\", amount = 1 }]\n",
        ));
        assert_eq!(error.field, r#"plans."P".maximums[0].resource"#, "{error}");
        assert!(error.problem.contains("does not cover"), "{error}");
        let error = refused(&plan("covers = [\"chat\", \"image\", \"chat\"]\n"));
        assert_eq!(error.field, r#"plans."P".covers[2]"#, "{error}");
        assert!(error.problem.contains("twice"), "{error}");
        // One maximum per unit, on a covered resource, is fine.
        let policy = Policy::from_toml_str(&plan(
            "covers = [\"chat\", \"image\"]\nmaximums = [{ resource = \"image\", unit = \"images\", amount = 2 }]\n",
        ))
        .expect("valid");
        let plan = policy.plan(policy.plan_id("P").expect("plan"));
        assert_eq!(plan.maximums[1][Unit::Images.index()], 2);
    }

    /// Two limits of a plan on the same meter over the same rolling span, differing only in
    /// their buckets, were accepted as two counters. A seat change (or swap) carries a key's
    /// count into only one of them, so the other started from 0: a key that used 8 requests on
    /// plan X (20 per 5 h) and moved to Y (20 per 5 h, and 10 per 5 h with wider buckets) was
    /// admitted 10 more, 18 in 5 hours on a plan limited to 10.
    #[test]
    fn a_second_limit_on_the_same_meter_and_span_with_other_buckets_is_refused() {
        let limit = |amount: u64, bucket: &str| {
            format!(
                r#"{{ resource = "chat", unit = "requests", amount = {amount}, window = "rolling:5h", bucket = "{bucket}" }}"#
            )
        };
        let text = format!(
            "{CHAT_AND_IMAGE}[plans.Y]\nlimits = [{}, {}]\n",
            limit(20, "60s"),
            limit(10, "120s")
        );
        let error = refused(&text);
        assert_eq!(error.field, r#"plans."Y".limits[1]"#, "{error}");
        assert!(error.problem.contains("second limit"), "{error}");
        // Other plans may count the same span with other buckets: a seat change reshapes.
        let text = format!(
            "{CHAT_AND_IMAGE}[plans.X]\nlimits = [{}]\n[plans.Y]\nlimits = [{}]\n",
            limit(20, "60s"),
            limit(10, "120s")
        );
        Policy::from_toml_str(&text).expect("valid");
    }

    /// `covers = ["*"]` means every resource, so a resource called "*" could not be covered
    /// alone; it was accepted.
    #[test]
    fn a_resource_named_star_is_refused() {
        let text = format!(
            "{CHAT_AND_IMAGE}[resources.\"*\"]\nunits = [\"requests\"]\n[plans.P]\ncovers = [\"*\"]\n"
        );
        let error = refused(&text);
        assert_eq!(error.field, r#"resources."*""#, "{error}");
        assert!(error.problem.contains("every resource"), "{error}");
    }

    /// A swap logs the whole document as one event: a policy larger than an event could hold
    /// was valid, swapped in memory, and refused only when logged, naming `event` rather than
    /// the policy (and `Engine::open` on a new directory left files behind).
    #[test]
    fn a_policy_larger_than_its_bound_is_refused_naming_its_size() {
        let shipped = serde_json::to_vec(Policy::token_plan().document()).expect("encodes");
        assert!(shipped.len() < 6 * 1024, "{} bytes", shipped.len());
        let long = |bytes: usize| {
            TOKEN_PLAN_TOML.replacen(
                "description = \"Standard plan: M2.7 and Music\"",
                &format!("description = \"{}\"", "x".repeat(bytes)),
                1,
            )
        };
        let fits = MAX_POLICY_DOCUMENT_BYTES - shipped.len() - 64;
        Policy::from_toml_str(&long(fits)).expect("at the bound");
        let error = refused(&long(MAX_POLICY_DOCUMENT_BYTES));
        assert_eq!(error.field, ".", "{error}");
        assert!(
            error
                .problem
                .contains(&format!("at most {MAX_POLICY_DOCUMENT_BYTES}")),
            "{error}"
        );
    }

    /// A plan's monthly price had no bound: a JSON policy with one past 2^63 was valid, and
    /// `to_toml_string` gave "" for it (TOML integers are signed 64-bit).
    #[test]
    fn a_plan_price_past_what_credits_hold_is_refused_and_every_valid_policy_writes_as_toml() {
        let json = |price: u64| {
            format!(
                r#"{{"time_zone":"UTC","resources":{{"chat":{{"units":["requests"]}}}},
                "plans":{{"P":{{"price_micros_per_month":{price},
                "limits":[{{"resource":"chat","unit":"requests","amount":5,"window":"daily"}}]}}}}}}"#
            )
        };
        let error = Policy::from_json_str(&json(u64::MAX)).expect_err("refused");
        assert_eq!(
            error.field, r#"plans."P".price_micros_per_month"#,
            "{error}"
        );
        let at_bound = Policy::from_json_str(&json(i64::MAX as u64)).expect("valid");
        let toml = at_bound.to_toml_string().expect("writes");
        let again = Policy::from_toml_str(&toml).expect("reads back");
        assert_eq!(again.document(), at_bound.document());
    }

    #[test]
    fn a_json_policy_is_the_same_document_as_its_toml() {
        let policy = Policy::token_plan();
        let json = serde_json::to_string(policy.document()).expect("serialises");
        let again = Policy::from_json_str(&json).expect("parses");
        assert_eq!(again.document(), policy.document());
    }

    /// A JSON policy is one document and nothing after it: trailing text (a second document
    /// pasted after the first, a stray word) is refused, not silently dropped.
    #[test]
    fn a_json_policy_with_anything_after_the_document_is_refused() {
        assert!(Policy::from_json_str(ONE_MINUTE_JSON).is_ok());
        assert!(Policy::from_json_str(&format!("{ONE_MINUTE_JSON}\n")).is_ok());
        for trailing in [
            " trailing",
            "{}",
            &ONE_MINUTE_JSON.replace("\"P\"", "\"Q\""),
        ] {
            let text = format!("{ONE_MINUTE_JSON}{trailing}");
            let error = Policy::from_json_str(&text).expect_err(trailing);
            assert!(error.problem.contains("trailing"), "{trailing}: {error}");
        }
    }

    /// A usage bar (`priced = true`) may change its prices on a swap: its count is in
    /// micro-credits, already charged at the old prices (`check_swap_to`). A bar over a single
    /// unit priced 1 compiled to one term of weight 1 and was taken for a plain meter on that
    /// unit, so raising that price to 2 (or pricing a second unit) was refused as "counts a
    /// weighted sum of several units where the current policy's counts ..." while the same
    /// change from 2 to 3 went through.
    #[test]
    fn a_usage_bar_may_change_its_prices_whatever_they_were() {
        let bar = |prices: &str| {
            Policy::from_toml_str(&format!(
                r#"time_zone = "UTC"
[resources.chat]
units = ["requests", "tokens"]
price_micros = {{ {prices} }}
[meters.bar]
priced = true
[plans.P]
limits = [{{ meter = "bar", amount = 1000, window = "daily" }}]
"#
            ))
            .expect("valid")
        };
        let one = bar("tokens = 1");
        for other in ["tokens = 2", "tokens = 1, requests = 5"] {
            let other = bar(other);
            assert!(one.check_swap_to(&other).is_ok(), "{other:?}");
            assert!(other.check_swap_to(&one).is_ok(), "{other:?}");
        }
        assert!(bar("tokens = 2").check_swap_to(&bar("tokens = 3")).is_ok());
        // A meter of one term of weight 1 counts that unit: moved to another, it is refused.
        let terms = |resource: &str, unit: &str| {
            Policy::from_toml_str(&format!(
                r#"{CHAT_AND_IMAGE}[meters.m]
terms = [{{ resource = "{resource}", unit = "{unit}", weight = 1 }}]
[plans.P]
covers = ["*"]
limits = [{{ meter = "m", amount = 1000, window = "daily" }}]
"#
            ))
            .expect("valid")
        };
        let error = terms("chat", "requests")
            .check_swap_to(&terms("image", "images"))
            .expect_err("another unit");
        assert_eq!(error.field, r#"meters."m""#, "{error}");
    }

    /// A weighted meter that is no usage bar (`terms`) counts in a unit its terms define: kept
    /// by name, it carries its count only where its terms stay. Every weighted sum was taken for
    /// every other (`MeterCounts::Weighted` held no terms), so a meter redefined over other
    /// resources, or with other weights, carried its count into the new one's unit.
    #[test]
    fn a_weighted_meter_that_counts_other_terms_is_refused_on_a_swap() {
        let terms = |terms: &str| {
            Policy::from_toml_str(&format!(
                r#"time_zone = "UTC"
[resources.chat]
units = ["requests", "tokens"]
[resources.image]
units = ["images", "requests"]
[meters.m]
terms = [{terms}]
[plans.P]
covers = ["*"]
limits = [{{ meter = "m", amount = 1000, window = "daily" }}]
"#
            ))
            .expect("valid")
        };
        let chat = r#"{ resource = "chat", unit = "requests", weight = 100 },
 { resource = "chat", unit = "tokens", weight = 1 }"#;
        let images = r#"{ resource = "image", unit = "images", weight = 100 },
 { resource = "image", unit = "requests", weight = 1 }"#;
        let heavier = r#"{ resource = "chat", unit = "requests", weight = 200 },
 { resource = "chat", unit = "tokens", weight = 1 }"#;
        let reordered = r#"{ resource = "chat", unit = "tokens", weight = 1 },
 { resource = "chat", unit = "requests", weight = 100 }"#;
        for other in [images, heavier] {
            let error = terms(chat)
                .check_swap_to(&terms(other))
                .expect_err("another weighted sum");
            assert_eq!(error.field, r#"meters."m""#, "{error}");
        }
        // The same sum, its terms listed in another order: the count carries.
        assert_eq!(terms(chat).check_swap_to(&terms(reordered)), Ok(()));
    }

    /// A swap refuses a meter kept by name that counts something else, as its count so far
    /// would be read in another unit. A meter no limit uses has no count (no counter), nor
    /// does one the new policy's limits no longer use carry any, yet redefining either was
    /// refused, "its count so far cannot carry over", where there was none to carry.
    #[test]
    fn a_meter_without_a_count_to_carry_may_be_redefined_on_a_swap() {
        let with = |unit: &str, limited: bool| {
            let limit = if limited {
                r#"{ meter = "m", amount = 5, window = "daily" }"#
            } else {
                r#"{ resource = "chat", unit = "requests", amount = 5, window = "daily" }"#
            };
            Policy::from_toml_str(&format!(
                r#"time_zone = "UTC"
[resources.chat]
units = ["requests", "tokens"]
[meters.m]
resource = "chat"
unit = "{unit}"
[plans.P]
limits = [{limit}]
"#
            ))
            .expect("valid")
        };
        // Unused on both sides, and used only before or only after the swap: nothing carries.
        assert_eq!(
            with("requests", false).check_swap_to(&with("tokens", false)),
            Ok(())
        );
        assert_eq!(
            with("requests", true).check_swap_to(&with("tokens", false)),
            Ok(())
        );
        assert_eq!(
            with("requests", false).check_swap_to(&with("tokens", true)),
            Ok(())
        );
        // Used on both sides: its count would carry, and is refused as before.
        let error = with("requests", true)
            .check_swap_to(&with("tokens", true))
            .expect_err("carried into another unit");
        assert_eq!(error.field, r#"meters."m""#, "{error}");
    }

    /// A denial suggests a plan with a larger amount on the limit that refused
    /// (`admission::upgrade_for`, from `next_bigger`'s list).
    /// Plans were linked by counter, which includes the bucket width, so a bigger plan counting
    /// the same meter over the same rolling span with other buckets was never suggested,
    /// though a seat change onto it carries the count (re-bucketed) as onto any other.
    #[test]
    fn a_bigger_plan_over_the_same_span_with_other_buckets_is_an_upgrade() {
        let text = format!(
            r#"{CHAT_AND_IMAGE}[plans.Small]
limits = [{{ resource = "chat", unit = "requests", amount = 10, window = "rolling:5h", bucket = "60s" }}]
[plans.Big]
limits = [{{ resource = "chat", unit = "requests", amount = 100, window = "rolling:5h", bucket = "120s" }}]
"#
        );
        let policy = Policy::from_toml_str(&text).expect("valid");
        let (small, big) = (policy.plan_id("Small"), policy.plan_id("Big"));
        let plan = policy.plan(small.expect("plan"));
        assert_eq!(plan.next_bigger(0), big);
        // Another span is another limit: no upgrade.
        let other = text.replace(r#""rolling:5h", bucket = "120s""#, r#""rolling:6h""#);
        let policy = Policy::from_toml_str(&other).expect("valid");
        let plan = policy.plan(policy.plan_id("Small").expect("plan"));
        assert_eq!(plan.next_bigger(0), None);
    }

    /// A resource's `units` listed twice is refused, as are repeated covers, maximums and
    /// meter terms; a unit listed twice in `required` was accepted (and kept in the document
    /// as written). A logged document from an earlier build may hold one, and still compiles.
    #[test]
    fn a_required_unit_listed_twice_is_refused_naming_it() {
        let text = with_image_units(
            "units = [\"images\", \"requests\"]\nrequired = [\"images\", \"requests\", \"images\"]",
        );
        let error = refused(&text);
        assert_eq!(error.field, r#"resources."image".required[2]"#, "{error}");
        assert!(error.problem.contains("images is listed twice"), "{error}");
        let logged = r#"{"time_zone":"UTC","resources":{"image":{"units":["images"],
            "required":["images","images"]}},"plans":{"P":{"covers":["*"]}}}"#;
        let policy = Policy::from_logged_json(logged).expect("replays");
        assert!(policy.resources()[0].required[Unit::Images.index()]);
    }

    /// An entry of a resource's `units` or `required` that is refused is named with its index,
    /// as a unit repeated in `required` is (`required[2]`), and as a schema error names an entry
    /// of a list: a unit listed twice in `units`, or one in `required` the resource does not
    /// meter, named the whole list.
    #[test]
    fn a_refused_unit_entry_is_named_with_its_index() {
        let twice = with_image_units("units = [\"images\", \"requests\", \"images\"]");
        let error = refused(&twice);
        assert_eq!(error.field, r#"resources."image".units[2]"#, "{error}");
        assert!(error.problem.contains("images is listed twice"), "{error}");
        let not_a_unit =
            with_image_units("units = [\"images\"]\nrequired = [\"images\", \"videos\"]");
        let error = refused(&not_a_unit);
        assert_eq!(error.field, r#"resources."image".required[1]"#, "{error}");
        assert!(error.problem.contains("videos is not one of"), "{error}");
    }

    /// A policy file is read only up to a bound (the document it holds is at most
    /// `MAX_POLICY_DOCUMENT_BYTES` as JSON anyway): a mistaken path to a log, a disk image or a
    /// device is refused as too large, not read whole into memory first.
    #[test]
    fn a_policy_file_past_the_bound_is_refused_without_reading_it_whole() {
        let directory =
            std::env::temp_dir().join(format!("tally-policy-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        let big = directory.join("big.toml");
        let comment = "# a comment line that pads the file out\n";
        let mut text = TOKEN_PLAN_TOML.to_string();
        while text.len() <= MAX_POLICY_FILE_BYTES as usize {
            text.push_str(comment);
        }
        std::fs::write(&big, &text).unwrap();
        let error = Policy::load(&big).expect_err("too large");
        assert_eq!(error.field, "(file)", "{error}");
        assert!(error.problem.contains("larger than"), "{error}");
        // At the bound it loads.
        let fits = directory.join("fits.toml");
        let mut fitting = TOKEN_PLAN_TOML.to_string();
        while fitting.len() + comment.len() <= MAX_POLICY_FILE_BYTES as usize {
            fitting.push_str(comment);
        }
        std::fs::write(&fits, &fitting).unwrap();
        assert!(Policy::load(&fits).is_ok());
        // A device that never ends (a symlink named like a policy) is refused, not read forever.
        #[cfg(unix)]
        {
            let endless = directory.join("endless.toml");
            std::os::unix::fs::symlink("/dev/zero", &endless).unwrap();
            let error = Policy::load(&endless).expect_err("endless");
            assert!(error.problem.contains("larger than"), "{error}");
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// Valid documents with names a person may choose (quotes, dots, brackets, non-ASCII),
    /// prices, maximums, a usage bar, rolling (short ones too, whose bucket a load states) and
    /// calendar windows.
    fn valid_documents() -> impl proptest::strategy::Strategy<Value = PolicyDocument> {
        use proptest::prelude::*;
        let name = || "[A-Za-z0-9\"'.\\[\\]#=é中-]{1,8}";
        let windows = [
            ("daily", None),
            ("weekly", None),
            ("monthly", None),
            ("rolling:5h", None),
            ("rolling:1m", None),
            ("rolling:1h", Some("90s")),
            ("rolling:1d2h", None),
        ];
        let resource = (
            proptest::sample::subsequence(Unit::ALL.to_vec(), 1..=UNIT_COUNT),
            proptest::option::of("[ -~]{0,12}"),
            0u64..5_000,
            0u64..5_000,
            any::<u8>(),
        );
        let limit = (
            any::<usize>(),
            1u64..1_000_000,
            proptest::sample::select(windows.to_vec()),
        );
        let plan = (
            proptest::collection::vec((limit, any::<bool>()), 0..4),
            proptest::option::of(0u64..1 << 40),
        );
        (
            proptest::collection::btree_map(name(), resource, 1..4),
            proptest::collection::btree_map(name(), plan, 1..4),
            proptest::sample::select(vec!["UTC", "Asia/Shanghai", "America/New_York"]),
            proptest::option::of(proptest::sample::select(vec!["monday", "sunday"])),
        )
            .prop_map(|(resources, plans, time_zone, week_start)| {
                let units: Vec<(String, Vec<Unit>)> = resources
                    .iter()
                    .map(|(name, (units, ..))| (name.clone(), units.clone()))
                    .collect();
                let resources: BTreeMap<_, _> = resources
                    .into_iter()
                    .map(|(name, (units, description, price, maximum, picks))| {
                        let picked = |bit: u32| {
                            units
                                .iter()
                                .enumerate()
                                .filter(move |(index, _)| {
                                    (picks >> ((*index as u32 + bit) % 8)) & 1 == 1
                                })
                                .map(|(_, unit)| *unit)
                        };
                        let document = ResourceDocument {
                            description,
                            price_micros: picked(0).map(|unit| (unit, price)).collect(),
                            max_per_request: picked(3).map(|unit| (unit, maximum + 1)).collect(),
                            required: picked(5).take(1).collect(),
                            units,
                        };
                        (name, document)
                    })
                    .collect();
                let priced = resources
                    .values()
                    .any(|resource| resource.price_micros.values().any(|price| *price > 0));
                let mut meters = BTreeMap::new();
                if priced {
                    let bar = MeterDocument {
                        priced: true,
                        ..MeterDocument::default()
                    };
                    meters.insert("bar".to_string(), bar);
                }
                let plans = plans
                    .into_iter()
                    .map(|(name, (limits, price))| {
                        let mut seen = Vec::new();
                        let limits: Vec<LimitDocument> = limits
                            .into_iter()
                            .filter_map(|((pick, amount, (window, bucket)), on_bar)| {
                                let (resource, units) = &units[pick % units.len()];
                                let unit = units[(pick / 7) % units.len()];
                                let meter = (on_bar && priced).then(|| "bar".to_string());
                                // One limit per meter and window: a bar's is the bar's.
                                let counted = match &meter {
                                    Some(bar) => (bar.clone(), None, window),
                                    None => (resource.clone(), Some(unit), window),
                                };
                                if seen.contains(&counted) {
                                    return None;
                                }
                                seen.push(counted);
                                Some(LimitDocument {
                                    resource: meter.is_none().then(|| resource.clone()),
                                    unit: meter.is_none().then_some(unit),
                                    meter,
                                    amount,
                                    window: window.to_string(),
                                    bucket: bucket.map(str::to_string),
                                })
                            })
                            .collect();
                        let plan = PlanDocument {
                            price_micros_per_month: price,
                            covers: Some(vec!["*".to_string()]),
                            limits,
                            ..PlanDocument::default()
                        };
                        (name, plan)
                    })
                    .collect();
                PolicyDocument {
                    time_zone: time_zone.to_string(),
                    week_start: week_start.map(str::to_string),
                    resources,
                    meters,
                    plans,
                }
            })
    }

    proptest::proptest! {
        /// A loaded policy's document, written back as the log stores it (compact JSON), as
        /// pretty JSON or as TOML, loads to the same document and the same compiled tables;
        /// read back as logged, too; and a swap to it from the original carries everything.
        #[test]
        fn a_valid_policy_written_back_as_json_or_toml_loads_the_same(
            document in valid_documents()
        ) {
            let policy = match Policy::compile(document) {
                Ok(policy) => policy,
                // Five limits of a plan on one resource: a valid refusal, not the subject.
                Err(error) if error.problem.contains("limits apply to") => return Ok(()),
                Err(error) => panic!("{error}"),
            };
            let compiled = format!("{policy:?}");
            let json = serde_json::to_string(policy.document()).expect("json");
            let pretty = serde_json::to_string_pretty(policy.document()).expect("json");
            let toml = policy.to_toml_string().expect("toml");
            for again in [
                Policy::from_json_str(&json),
                Policy::from_json_str(&pretty),
                Policy::from_logged_json(&json),
                Policy::from_toml_str(&toml),
            ] {
                let again = again.expect("reloads");
                proptest::prop_assert_eq!(again.document(), policy.document());
                proptest::prop_assert_eq!(&format!("{again:?}"), &compiled);
                proptest::prop_assert!(policy.check_swap_to(&again).is_ok());
            }
        }
    }
}
