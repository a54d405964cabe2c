//! The engine against an exact reference model.
//!
//! Random sequences of consume, check, usage reports, time steps (some of them backwards),
//! top-ups, refunds and seat changes run against both the engine and a model that keeps an
//! exact log of every unit the engine admitted from plan quota, with its timestamp. The model
//! knows nothing of buckets: a unit used at `t` counts in a rolling window of `W` at `now` iff
//! `t > now - W`, and in a daily window iff `t` falls on the same local date as `now`.
//!
//! The model follows the engine's decisions (it records what the engine admitted, not what it
//! would have admitted), so the two never drift apart, and checks each decision against itself:
//! - the engine never admits from plan quota what the exact model denies;
//! - when the engine refuses plan quota that the exact model would grant, the usage standing in
//!   the way is within one bucket width of its window's edge (the model with its rolling window
//!   one bucket longer refuses too); calendar windows are exact;
//! - credits: charged exactly the price, only when the balance covers it, and every team's
//!   balance is its top-ups minus its charges;
//! - `check` returns what the following `consume` returns and changes nothing;
//! - a refund (at the current time) gives back every unit the exact model still counts and
//!   none the one-bucket-late model no longer counts, exactly once; from credits, the charge;
//! - retry and reset times lie between the exact model's and the one-bucket-late model's.
//!
//! Timestamps that go backwards: the engine counts such a request at the newest time the key
//! has seen (documented in `window.rs`). The model calls that newest time the key's *horizon*
//! and evaluates every request at `max(timestamp, horizon)`. Units keep their own timestamp
//! for the no-over-admission check (so a unit is never released before `its timestamp + W`,
//! whatever the engine did with it) and the horizon's for the tolerance check, which is only
//! asserted for requests whose timestamp is not behind the horizon.
//!
//! The time zone is America/New_York, and cases start next to its 2026 daylight-saving
//! changes, so local days of 23 and 25 hours occur.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tally_engine::policy::{CounterId, MeterId};
use tally_engine::{
    ChargedTo, Decision, DenialReason, Engine, EngineOptions, ManualClock, PlanId, Policy,
    UsageReport, UsageRequest, Window,
};

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;
const BUCKET_MS: u64 = MINUTE_MS;
const WINDOW_MS: u64 = HOUR_MS;

const POLICY: &str = r#"
time_zone = "America/New_York"

[resources.chat]
units = ["requests"]
price_micros = { requests = 1000 }

[resources.image]
units = ["images"]
price_micros = { images = 5000 }

[plans.Small]
limits = [
  { resource = "chat", unit = "requests", amount = 10, window = "rolling:1h", bucket = "60s" },
  { resource = "chat", unit = "requests", amount = 25, window = "daily" },
]

[plans.Big]
limits = [
  { resource = "chat", unit = "requests", amount = 30, window = "rolling:1h", bucket = "60s" },
  { resource = "chat", unit = "requests", amount = 60, window = "daily" },
  { resource = "image", unit = "images", amount = 4, window = "daily" },
]

# Calendar windows only: nothing in a key's state moves with time until a request comes.
[plans.Daily]
limits = [
  { resource = "chat", unit = "requests", amount = 20, window = "daily" },
  { resource = "image", unit = "images", amount = 3, window = "daily" },
]
"#;

// ---------------------------------------------------------------------------------------------
// Local dates in America/New_York, computed here independently of the engine: the offsets in
// force between the 2025 autumn and the 2027 spring changes (every case stays in that range).

const SPRING_2026_MS: u64 = 1_772_953_200_000; // 2026-03-08T07:00:00Z, 02:00 EST -> 03:00 EDT
const AUTUMN_2026_MS: u64 = 1_793_512_800_000; // 2026-11-01T06:00:00Z, 02:00 EDT -> 01:00 EST
const SPRING_2027_MS: u64 = 1_805_007_600_000; // 2027-03-14T07:00:00Z
const MODEL_START_MS: u64 = 1_762_063_200_000; // 2025-11-02T06:00:00Z, the 2025 autumn change
const EST_OFFSET_MS: i64 = -5 * HOUR_MS as i64;
const EDT_OFFSET_MS: i64 = -4 * HOUR_MS as i64;

fn offset_ms(at_ms: u64) -> i64 {
    assert!(
        (MODEL_START_MS..SPRING_2027_MS).contains(&at_ms),
        "{at_ms} is outside the model's time zone table"
    );
    if (SPRING_2026_MS..AUTUMN_2026_MS).contains(&at_ms) {
        EDT_OFFSET_MS
    } else {
        EST_OFFSET_MS
    }
}

fn local_day(at_ms: u64) -> i64 {
    (at_ms as i64 + offset_ms(at_ms)).div_euclid(DAY_MS as i64)
}

/// When the local date `day` begins (New York never skips or repeats midnight).
fn local_midnight_ms(day: i64) -> u64 {
    [EST_OFFSET_MS, EDT_OFFSET_MS]
        .into_iter()
        .map(|offset| (day * DAY_MS as i64 - offset) as u64)
        .find(|&at| local_day(at) == day && local_day(at - 1) == day - 1)
        .unwrap_or_else(|| panic!("no local midnight found for day {day}"))
}

// ---------------------------------------------------------------------------------------------
// The policy as the model sees it.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counter {
    ChatRolling,
    ChatDaily,
    ImageDaily,
}

const COUNTERS: [Counter; 3] = [
    Counter::ChatRolling,
    Counter::ChatDaily,
    Counter::ImageDaily,
];

impl Counter {
    fn index(self) -> usize {
        self as usize
    }

    fn is_rolling(self) -> bool {
        self == Counter::ChatRolling
    }

    /// The model counter an engine limit stands for, found from the compiled policy.
    fn of_limit(policy: &Policy, plan: PlanId, limit: usize) -> Counter {
        let limit = &policy.plan(plan).limits[limit];
        Counter::of_meter(policy, limit.meter, limit.window)
    }

    /// The model counter an engine counter stands for.
    fn of_counter(policy: &Policy, counter: CounterId) -> Counter {
        let spec = policy.counter(counter);
        Counter::of_meter(policy, spec.meter, spec.window)
    }

    fn of_meter(policy: &Policy, meter: MeterId, window: Window) -> Counter {
        let meter = &*policy.meter(meter).name;
        match (meter, window) {
            ("chat:requests", Window::Rolling { .. }) => Counter::ChatRolling,
            ("chat:requests", Window::Calendar(_)) => Counter::ChatDaily,
            ("image:images", Window::Calendar(_)) => Counter::ImageDaily,
            other => panic!("the test policy has no limit like {other:?}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PlanName {
    Small,
    Big,
    Daily,
}

impl PlanName {
    fn name(self) -> &'static str {
        match self {
            PlanName::Small => "Small",
            PlanName::Big => "Big",
            PlanName::Daily => "Daily",
        }
    }

    fn amount(self, counter: Counter) -> Option<u64> {
        match (self, counter) {
            (PlanName::Small, Counter::ChatRolling) => Some(10),
            (PlanName::Small, Counter::ChatDaily) => Some(25),
            (PlanName::Small, Counter::ImageDaily) => None,
            (PlanName::Big, Counter::ChatRolling) => Some(30),
            (PlanName::Big, Counter::ChatDaily) => Some(60),
            (PlanName::Big, Counter::ImageDaily) => Some(4),
            (PlanName::Daily, Counter::ChatRolling) => None,
            (PlanName::Daily, Counter::ChatDaily) => Some(20),
            (PlanName::Daily, Counter::ImageDaily) => Some(3),
        }
    }

    /// The limits `resource` moves on this plan, or `None` if the plan does not cover it.
    fn limits_for(self, resource: Resource) -> Option<Vec<(Counter, u64)>> {
        let limits: Vec<(Counter, u64)> = resource
            .counters()
            .iter()
            .filter_map(|&counter| self.amount(counter).map(|amount| (counter, amount)))
            .collect();
        (!limits.is_empty()).then_some(limits)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Chat,
    Image,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::Chat => "chat",
            Resource::Image => "image",
        }
    }

    fn unit(self) -> tally_engine::Unit {
        match self {
            Resource::Chat => tally_engine::Unit::Requests,
            Resource::Image => tally_engine::Unit::Images,
        }
    }

    fn price_micros(self, amount: u64) -> u64 {
        match self {
            Resource::Chat => 1_000 * amount,
            Resource::Image => 5_000 * amount,
        }
    }

    fn counters(self) -> &'static [Counter] {
        match self {
            Resource::Chat => &[Counter::ChatRolling, Counter::ChatDaily],
            Resource::Image => &[Counter::ImageDaily],
        }
    }
}

/// The keys: two users, each with the key of their Default Team and a key in a shared team.
const KEYS: [(&str, &str, &str); 4] = [
    ("k0", "u0", "@u0"),
    ("k1", "u1", "@u1"),
    ("k2", "u0", "crew"),
    ("k3", "u1", "crew"),
];
const TEAMS: [&str; 3] = ["@u0", "@u1", "crew"];

fn team_index(key: usize) -> usize {
    TEAMS
        .iter()
        .position(|team| *team == KEYS[key].2)
        .unwrap_or_else(|| unreachable!())
}

// ---------------------------------------------------------------------------------------------
// The model.

/// Units admitted from plan quota by one request.
#[derive(Clone, Copy, Debug)]
struct Usage {
    /// The request's own timestamp.
    request_ms: u64,
    /// The key's horizon when it was admitted: `max(request_ms, newest time seen before)`.
    effective_ms: u64,
    /// The time the engine says it counted the request at (`Admission::at_ms`): the newest
    /// of the times its windows counted it at.
    counted_ms: u64,
    /// For a daily counter, the local day the unit is counted on: its own, or the newest day
    /// the counter had counted on before (a late timestamp never counts in an earlier day).
    counted_day: Option<i64>,
    amount: u64,
    /// The admitted request (an index into `Harness::admitted`).
    request: usize,
}

/// Which of a unit's times a count uses, and how long a rolling window lasts.
#[derive(Clone, Copy, Debug)]
enum Reading {
    /// Own timestamps, rolling window `W`: what the engine must count at least.
    Exact,
    /// Horizon timestamps, rolling window `W + bucket`: what the engine may count at most.
    OneBucketLate,
}

impl Reading {
    fn time(self, usage: &Usage) -> u64 {
        match self {
            Reading::Exact => usage.request_ms,
            Reading::OneBucketLate => usage.effective_ms,
        }
    }

    fn window_ms(self) -> u64 {
        match self {
            Reading::Exact => WINDOW_MS,
            Reading::OneBucketLate => WINDOW_MS + BUCKET_MS,
        }
    }
}

#[derive(Debug)]
struct KeyModel {
    seat: Option<PlanName>,
    /// The newest timestamp any request or report on this key carried (0: none yet).
    horizon_ms: u64,
    log: [Vec<Usage>; 3],
    /// Whether the engine holds windows for the key: from its first consume on a plan that
    /// covers the resource (and could take the amount) until a reclaim frees them.
    allocated: bool,
    /// Requests are counted no earlier than this: the time of the reclaim that freed the
    /// key's windows (0: never freed).
    floor_ms: u64,
    /// The newest local day each daily counter has counted on since its windows were made.
    counted_day: [Option<i64>; 3],
}

#[derive(Debug)]
struct Model {
    keys: Vec<KeyModel>,
    balances_micros: [u64; 3],
    charged_micros: [u64; 3],
}

impl Model {
    fn new() -> Model {
        Model {
            keys: (0..KEYS.len())
                .map(|_| KeyModel {
                    seat: None,
                    horizon_ms: 0,
                    log: Default::default(),
                    allocated: false,
                    floor_ms: 0,
                    counted_day: [None; 3],
                })
                .collect(),
            balances_micros: [0; 3],
            charged_micros: [0; 3],
        }
    }
}

impl KeyModel {
    /// Units counted in `counter` at `now_ms`.
    fn used(&self, counter: Counter, reading: Reading, now_ms: u64) -> u64 {
        self.log[counter.index()]
            .iter()
            .filter(|usage| counts(counter, reading, reading.time(usage), now_ms))
            .map(|usage| usage.amount)
            .sum()
    }

    /// The earliest time, from `now_ms` on, at which `amount` more fits under `limit` if
    /// nothing else is used meanwhile.
    fn fits_at_ms(
        &self,
        counter: Counter,
        reading: Reading,
        limit: u64,
        amount: u64,
        now_ms: u64,
    ) -> u64 {
        assert!(amount <= limit);
        let mut live: Vec<(u64, u64)> = self.log[counter.index()]
            .iter()
            .map(|usage| (reading.time(usage), usage.amount))
            .filter(|&(time, _)| counts(counter, reading, time, now_ms))
            .collect();
        let mut used: u64 = live.iter().map(|(_, amount)| amount).sum();
        if used + amount <= limit {
            return now_ms;
        }
        if !counter.is_rolling() {
            return local_midnight_ms(local_day(now_ms) + 1);
        }
        live.sort_unstable();
        for (time, units) in live {
            used -= units;
            if used + amount <= limit {
                return time + reading.window_ms();
            }
        }
        unreachable!("an empty window fits any amount up to the limit")
    }
}

fn counts(counter: Counter, reading: Reading, time_ms: u64, now_ms: u64) -> bool {
    if counter.is_rolling() {
        time_ms + reading.window_ms() > now_ms
    } else {
        local_day(time_ms) == local_day(now_ms)
    }
}

// ---------------------------------------------------------------------------------------------
// Operations.

#[derive(Clone, Debug)]
enum Op {
    Advance {
        ms: u64,
    },
    /// Advances to `offset_ms` around the time the key's oldest rolling usage leaves the exact
    /// window, if that is ahead: where the engine's bucketing shows.
    ToWindowEdge {
        key: usize,
        offset_ms: i64,
    },
    Consume {
        key: usize,
        resource: Resource,
        amount: u64,
        back_ms: u64,
    },
    Check {
        key: usize,
        resource: Resource,
        amount: u64,
        back_ms: u64,
    },
    Report {
        key: usize,
        back_ms: u64,
    },
    TopUp {
        key: usize,
        micros: u64,
    },
    /// Refunds the `which`-th admitted request not refunded yet (by its request id).
    Refund {
        which: usize,
    },
    Seat {
        key: usize,
        plan: Option<PlanName>,
    },
    /// Frees the windows of keys with nothing counted in them now.
    Reclaim,
}

fn advance_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0),
        3 => 1..BUCKET_MS,
        2 => Just(BUCKET_MS),
        3 => (2..=20u64).prop_map(|buckets| buckets * BUCKET_MS),
        2 => BUCKET_MS..WINDOW_MS,
        1 => Just(WINDOW_MS - 1),
        1 => Just(WINDOW_MS),
        1 => Just(WINDOW_MS + BUCKET_MS),
        2 => (3 * HOUR_MS)..(8 * HOUR_MS),
    ]
}

/// How far behind the current time a request's timestamp is: mostly not at all.
fn back_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        16 => Just(0),
        1 => 1..BUCKET_MS,
        1 => Just(BUCKET_MS),
        1 => BUCKET_MS..(5 * BUCKET_MS),
        1 => (WINDOW_MS / 2)..(3 * HOUR_MS),
    ]
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1..=3u64,
        3 => 4..=9u64,
        1 => 10..=32u64,
    ]
}

fn resource() -> impl Strategy<Value = Resource> {
    prop_oneof![4 => Just(Resource::Chat), 1 => Just(Resource::Image)]
}

fn plan() -> impl Strategy<Value = Option<PlanName>> {
    prop_oneof![
        3 => Just(Some(PlanName::Small)),
        3 => Just(Some(PlanName::Big)),
        2 => Just(Some(PlanName::Daily)),
        1 => Just(None),
    ]
}

fn key() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 2 => Just(1usize), 1 => Just(2usize), 1 => Just(3usize)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (key(), resource(), amount(), back_ms()).prop_map(|(key, resource, amount, back_ms)| {
            Op::Consume { key, resource, amount, back_ms }
        }),
        3 => (key(), resource(), amount(), back_ms()).prop_map(|(key, resource, amount, back_ms)| {
            Op::Check { key, resource, amount, back_ms }
        }),
        7 => advance_ms().prop_map(|ms| Op::Advance { ms }),
        3 => (key(), -(BUCKET_MS as i64)..=(BUCKET_MS as i64))
            .prop_map(|(key, offset_ms)| Op::ToWindowEdge { key, offset_ms }),
        2 => (key(), back_ms()).prop_map(|(key, back_ms)| Op::Report { key, back_ms }),
        1 => (key(), 1..30_000u64).prop_map(|(key, micros)| Op::TopUp { key, micros }),
        2 => any::<usize>().prop_map(|which| Op::Refund { which }),
        3 => (key(), plan()).prop_map(|(key, plan)| Op::Seat { key, plan }),
        1 => Just(Op::Reclaim),
    ]
}

/// Cases start a couple of hours before a local midnight next to a daylight-saving change, or
/// in the middle of summer.
fn start_ms() -> impl Strategy<Value = u64> {
    let anchors = [
        1_772_931_600_000u64, // 2026-03-07T20:00 EST: spring forward that night
        1_793_491_200_000,    // 2026-10-31T20:00 EDT: fall back that night
        1_781_577_000_000,    // 2026-06-15T22:30 EDT
    ];
    (0..anchors.len(), 0..(3 * HOUR_MS)).prop_map(move |(anchor, offset)| anchors[anchor] + offset)
}

// ---------------------------------------------------------------------------------------------
// The harness: runs one sequence against the engine and the model.

struct Harness {
    engine: Engine,
    clock: Arc<ManualClock>,
    policy: Arc<Policy>,
    model: Model,
    now_ms: u64,
    /// Every admitted request: `(id, key, resource, amount, where charged, refunded)`.
    admitted: Vec<(String, usize, Resource, u64, ChargedTo, bool)>,
    /// Requests consumed so far (each gets a fresh id).
    consumed: usize,
}

impl Harness {
    fn new(start_ms: u64) -> Harness {
        let policy = Policy::from_toml_str(POLICY).expect("the test policy is valid");
        let clock = Arc::new(ManualClock::new(start_ms));
        // Every request id is remembered for the whole case (at most 120 steps of at most 8
        // hours), so any admitted request can be refunded.
        // Keys' windows are reclaimed only when a case says (`Reclaim`): the model follows
        // which keys were freed.
        let options = EngineOptions {
            idempotency_horizon_ms: 60 * DAY_MS,
            reclaim_idle_every_ms: 0,
            ..EngineOptions::default()
        };
        let engine = Engine::new(policy, clock.clone(), options).expect("valid options");
        let at = Some(start_ms);
        engine.create_user("u0", "k0", at).expect("new user");
        engine.create_user("u1", "k1", at).expect("new user");
        engine.create_team("crew", at).expect("new team");
        engine
            .add_member("crew", "u0", "k2", at)
            .expect("new member");
        engine
            .add_member("crew", "u1", "k3", at)
            .expect("new member");
        let policy = engine.policy();
        Harness {
            engine,
            clock,
            policy,
            model: Model::new(),
            now_ms: start_ms,
            admitted: Vec::new(),
            consumed: 0,
        }
    }

    fn plan_name(&self, plan: PlanId) -> &str {
        &self.policy.plan(plan).name
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Advance { ms } => {
                self.now_ms += ms;
                self.clock.set_ms(self.now_ms);
            }
            Op::ToWindowEdge { key, offset_ms } => {
                let now_ms = self.now_ms;
                let oldest = self.model.keys[key].log[Counter::ChatRolling.index()]
                    .iter()
                    .map(|usage| usage.request_ms)
                    .filter(|&request_ms| request_ms + WINDOW_MS > now_ms)
                    .min();
                if let Some(oldest) = oldest {
                    let edge_ms = (oldest + WINDOW_MS) as i64 + offset_ms;
                    self.now_ms = self.now_ms.max(edge_ms as u64);
                    self.clock.set_ms(self.now_ms);
                }
            }
            Op::Consume {
                key,
                resource,
                amount,
                back_ms,
            } => self.consume(key, resource, amount, self.now_ms - back_ms)?,
            Op::Check {
                key,
                resource,
                amount,
                back_ms,
            } => self.check(key, resource, amount, self.now_ms - back_ms)?,
            Op::Report { key, back_ms } => {
                let at_ms = self.now_ms - back_ms;
                let report = self.engine.usage(KEYS[key].0, Some(at_ms)).expect("usage");
                self.verify_report(key, &report, at_ms)?;
                let key = &mut self.model.keys[key];
                key.horizon_ms = key.horizon_ms.max(at_ms);
            }
            Op::TopUp { key, micros } => {
                let team = team_index(key);
                let balance = self
                    .engine
                    .top_up(TEAMS[team], micros, Some(self.now_ms))
                    .expect("top-up");
                self.model.balances_micros[team] += micros;
                prop_assert_eq!(balance, self.model.balances_micros[team]);
            }
            Op::Refund { which } => self.refund(which)?,
            Op::Seat { key, plan } => {
                let (_, user, team) = KEYS[key];
                let at = Some(self.now_ms);
                match plan {
                    Some(plan) => self.engine.assign_seat(team, user, plan.name(), at),
                    None => self.engine.unassign_seat(team, user, at),
                }
                .expect("seat change");
                self.model.keys[key].seat = plan;
            }
            Op::Reclaim => self.reclaim()?,
        }
        for (team, name) in TEAMS.iter().enumerate() {
            prop_assert_eq!(
                self.engine.credits_micros(name).expect("team"),
                self.model.balances_micros[team],
                "team {}'s balance is its top-ups minus its charges",
                name
            );
        }
        Ok(())
    }

    fn consume(
        &mut self,
        key: usize,
        resource: Resource,
        amount: u64,
        at_ms: u64,
    ) -> Result<(), TestCaseError> {
        let quantities = [(resource.unit(), amount)];
        let request = UsageRequest::new(KEYS[key].0, resource.name(), &quantities).at(at_ms);
        let checked = self.engine.check(&request).expect("check");
        // Under an id of its own, so it can be refunded later.
        let id = format!("q{}", self.consumed);
        self.consumed += 1;
        let decision = self.engine.consume(&request.id(&id)).expect("consume");
        prop_assert_eq!(
            checked,
            decision,
            "check foretells the consume that follows it"
        );
        self.verify_decision(key, resource, amount, at_ms, &decision)?;
        let model = &mut self.model.keys[key];
        let limits = model.seat.and_then(|plan| plan.limits_for(resource));
        if limits.is_some_and(|limits| limits.iter().all(|&(_, limit)| amount <= limit)) {
            model.allocated = true;
        }
        self.record(key, resource, amount, at_ms, &decision);
        self.verify_days_hold_their_limits(key, resource, &decision)
    }

    /// Reclaims idle keys' windows now, when the model can tell which keys the engine finds
    /// idle: those whose windows count nothing now both exactly and one bucket late (a key in between could go either way, and then nothing is reclaimed).
    fn reclaim(&mut self) -> Result<(), TestCaseError> {
        let now_ms = self.now_ms;
        let mut idle = [false; KEYS.len()];
        for (key, model) in self.model.keys.iter().enumerate() {
            if !model.allocated {
                continue;
            }
            // Every counter the key ever used: a seat change keeps the counters of the plan
            // before it (usage counted stays counted, should the key go back to that plan).
            let mut exact_idle = true;
            let mut late_idle = true;
            for counter in COUNTERS {
                let log = &model.log[counter.index()];
                if counter.is_rolling() {
                    exact_idle &= model.used(counter, Reading::Exact, now_ms) == 0;
                    late_idle &= log
                        .iter()
                        .all(|usage| usage.counted_ms + WINDOW_MS + BUCKET_MS <= now_ms);
                } else {
                    let today = local_day(now_ms);
                    let held = log.iter().any(|usage| usage.counted_day >= Some(today));
                    exact_idle &= !held;
                    late_idle &= !held;
                }
            }
            if exact_idle != late_idle {
                return Ok(());
            }
            idle[key] = exact_idle;
        }
        let reclaimed = self.engine.reclaim_idle(Some(now_ms)).expect("reclaim");
        prop_assert_eq!(
            reclaimed,
            idle.iter().filter(|idle| **idle).count() as u64,
            "reclaimed the keys the model finds idle: {:?}",
            idle
        );
        for (key, model) in self.model.keys.iter_mut().enumerate() {
            // Every key's rolling windows were read at now.
            model.horizon_ms = model.horizon_ms.max(now_ms);
            if idle[key] {
                model.allocated = false;
                model.floor_ms = now_ms;
                model.counted_day = [None; 3];
            }
        }
        Ok(())
    }

    /// Whatever times requests carried, no day holds more than a daily limit: the units
    /// counted on the day this request was counted on (its own day, or the newest one the
    /// counter had counted on, or the day of the reclaim that freed the key's windows) fit the
    /// plan's limit. (Rolling windows are held to the exact model by `verify_decision`; a
    /// seat change can leave a key's rolling and daily windows at different times, so one
    /// `Admission::at_ms` cannot say where each counted.)
    fn verify_days_hold_their_limits(
        &self,
        key: usize,
        resource: Resource,
        decision: &Decision,
    ) -> Result<(), TestCaseError> {
        let Decision::Admitted(admission) = decision else {
            return Ok(());
        };
        let ChargedTo::PlanQuota { .. } = admission.charged_to else {
            return Ok(());
        };
        let model = &self.model.keys[key];
        let plan = model.seat.expect("a quota admission has a seat");
        let limits = plan.limits_for(resource).expect("covered");
        for (counter, limit) in limits.into_iter().filter(|(c, _)| !c.is_rolling()) {
            let log = &model.log[counter.index()];
            let day = log.last().and_then(|usage| usage.counted_day);
            let held: u64 = log
                .iter()
                .filter(|usage| usage.counted_day == day)
                .map(|usage| usage.amount)
                .sum();
            prop_assert!(
                held <= limit,
                "key {} {:?} holds {} on a limit of {} on day {:?}: {:?}",
                key,
                counter,
                held,
                limit,
                day,
                log
            );
            // The engine's counted time is never before the day it counted on.
            let counted_day = day.expect("a daily unit has its day");
            prop_assert!(
                local_day(admission.at_ms) >= counted_day,
                "counted at {} before day {}",
                admission.at_ms,
                counted_day
            );
        }
        Ok(())
    }

    fn check(
        &mut self,
        key: usize,
        resource: Resource,
        amount: u64,
        at_ms: u64,
    ) -> Result<(), TestCaseError> {
        let quantities = [(resource.unit(), amount)];
        let request = UsageRequest::new(KEYS[key].0, resource.name(), &quantities).at(at_ms);
        let name = KEYS[key].0;
        let before = self.engine.usage(name, Some(at_ms)).expect("usage");
        let decision = self.engine.check(&request).expect("check");
        let after = self.engine.usage(name, Some(at_ms)).expect("usage");
        prop_assert_eq!(
            without_resets_check_invented(&before, after),
            before,
            "check changes nothing"
        );
        self.verify_decision(key, resource, amount, at_ms, &decision)?;
        let key = &mut self.model.keys[key];
        key.horizon_ms = key.horizon_ms.max(at_ms);
        Ok(())
    }

    /// Checks one decision (of `consume` or `check`) against the model, before the model
    /// records it.
    fn verify_decision(
        &self,
        key: usize,
        resource: Resource,
        amount: u64,
        at_ms: u64,
        decision: &Decision,
    ) -> Result<(), TestCaseError> {
        let model = &self.model.keys[key];
        let now_ms = at_ms.max(model.horizon_ms);
        let behind = at_ms < model.horizon_ms;
        let limits = model.seat.and_then(|plan| plan.limits_for(resource));
        let exact_fits = limits.as_ref().map(|limits| {
            limits.iter().all(|&(counter, limit)| {
                model.used(counter, Reading::Exact, now_ms) + amount <= limit
            })
        });
        let late_fits = limits.as_ref().map(|limits| {
            limits.iter().all(|&(counter, limit)| {
                model.used(counter, Reading::OneBucketLate, now_ms) + amount <= limit
            })
        });
        let balance = self.model.balances_micros[team_index(key)];
        let price = resource.price_micros(amount);
        let credits_fit = balance > 0 && balance >= price;
        let context = format!(
            "key {key} {resource:?} x{amount} at {at_ms} (horizon {}, seat {:?}): {decision:?}",
            model.horizon_ms, model.seat
        );
        let quota_refused = match decision {
            Decision::Admitted(admission) => match admission.charged_to {
                ChargedTo::PlanQuota { plan } => {
                    prop_assert_eq!(
                        Some(self.plan_name(plan)),
                        model.seat.map(PlanName::name),
                        "charged to the seat's plan: {}",
                        &context
                    );
                    prop_assert_eq!(
                        exact_fits,
                        Some(true),
                        "never admits from quota what the exact model refuses: {}",
                        &context
                    );
                    prop_assert!(
                        at_ms <= admission.at_ms && admission.at_ms <= now_ms,
                        "counted between its timestamp and the key's horizon: {}",
                        &context
                    );
                    self.verify_admitted_statuses(key, plan, amount, now_ms, behind, decision)?;
                    false
                }
                ChargedTo::Credits { micros } => {
                    prop_assert_eq!(micros, price, "credits charge the price: {}", &context);
                    prop_assert!(credits_fit, "the balance covered it: {}", &context);
                    prop_assert_eq!(
                        admission.credits_balance_micros,
                        Some(balance - price),
                        "{}",
                        &context
                    );
                    true
                }
                ChargedTo::PayAsYouGo { .. } => {
                    return Err(TestCaseError::fail(format!(
                        "plan key charged as pay-as-you-go: {context}"
                    )));
                }
            },
            Decision::Denied(denial) => {
                prop_assert!(
                    !credits_fit,
                    "denied although the credits covered it: {}",
                    &context
                );
                self.verify_denial_reason(
                    key,
                    resource,
                    amount,
                    now_ms,
                    behind,
                    &denial.reason,
                    &context,
                )?;
                true
            }
        };
        if quota_refused && late_fits == Some(true) && !behind {
            return Err(TestCaseError::fail(format!(
                "refused plan quota although even the one-bucket-late model grants it \
                 (exact model: {exact_fits:?}): {context}"
            )));
        }
        Ok(())
    }

    /// The statuses an admission reports: each limit's count after the request.
    fn verify_admitted_statuses(
        &self,
        key: usize,
        plan: PlanId,
        amount: u64,
        now_ms: u64,
        behind: bool,
        decision: &Decision,
    ) -> Result<(), TestCaseError> {
        let Decision::Admitted(admission) = decision else {
            unreachable!()
        };
        let model = &self.model.keys[key];
        for status in admission.limits.as_slice() {
            let counter = Counter::of_limit(&self.policy, plan, usize::from(status.limit));
            let exact = model.used(counter, Reading::Exact, now_ms) + amount;
            let late = model.used(counter, Reading::OneBucketLate, now_ms) + amount;
            prop_assert!(
                exact <= status.used && (behind || status.used <= late),
                "{:?}: the admission reports {} used; the models say {}..={}",
                counter,
                status.used,
                exact,
                late
            );
            prop_assert!(status.used <= status.amount);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn verify_denial_reason(
        &self,
        key: usize,
        resource: Resource,
        amount: u64,
        now_ms: u64,
        behind: bool,
        reason: &DenialReason,
        context: &str,
    ) -> Result<(), TestCaseError> {
        let model = &self.model.keys[key];
        let balance = self.model.balances_micros[team_index(key)];
        let Some(plan) = model.seat else {
            let expected = if balance > 0 {
                "InsufficientCredits"
            } else {
                "NoResources"
            };
            prop_assert!(
                matches!(
                    (reason, balance > 0),
                    (DenialReason::InsufficientCredits { .. }, true)
                        | (DenialReason::NoResources, false)
                ),
                "a key without a seat is refused for {}: {}",
                expected,
                context
            );
            return Ok(());
        };
        if plan.limits_for(resource).is_none() {
            prop_assert!(
                matches!(reason, DenialReason::ResourceNotCovered { .. }),
                "{}",
                context
            );
            return Ok(());
        }
        let engine_plan = self.policy.plan_id(plan.name()).expect("plan");
        match *reason {
            DenialReason::ExceedsLimit {
                limit,
                amount: limit_amount,
                requested,
            } => {
                let counter = Counter::of_limit(&self.policy, engine_plan, usize::from(limit));
                prop_assert_eq!(requested, amount, "{}", context);
                prop_assert_eq!(Some(limit_amount), plan.amount(counter), "{}", context);
                prop_assert!(amount > limit_amount, "{}", context);
            }
            DenialReason::QuotaExhausted {
                limit,
                retry_at_ms,
                reset_at_ms,
                ..
            } => {
                let counter = Counter::of_limit(&self.policy, engine_plan, usize::from(limit));
                let limit_amount = plan.amount(counter).expect("the plan's limit");
                prop_assert!(amount <= limit_amount, "{}", context);
                let exact = model.fits_at_ms(counter, Reading::Exact, limit_amount, amount, now_ms);
                let late = model.fits_at_ms(
                    counter,
                    Reading::OneBucketLate,
                    limit_amount,
                    amount,
                    now_ms,
                );
                // A request behind the key's horizon may be told a retry time before the
                // horizon (its window had not seen the horizon yet): retrying then means now.
                prop_assert!(
                    exact <= retry_at_ms.max(now_ms),
                    "never told to retry before the exact model lets it fit ({}): {}",
                    exact,
                    context
                );
                prop_assert!(reset_at_ms >= retry_at_ms, "{}", context);
                if !behind {
                    prop_assert!(
                        model.used(counter, Reading::OneBucketLate, now_ms) + amount > limit_amount,
                        "{:?} refused although the one-bucket-late model has room: {}",
                        counter,
                        context
                    );
                    prop_assert!(
                        retry_at_ms <= late,
                        "told to retry later than the one-bucket-late model lets it fit ({}): {}",
                        late,
                        context
                    );
                    if counter.is_rolling() {
                        prop_assert!(reset_at_ms <= now_ms + WINDOW_MS + BUCKET_MS, "{}", context);
                    } else {
                        prop_assert_eq!(
                            reset_at_ms,
                            local_midnight_ms(local_day(now_ms) + 1),
                            "a daily limit resets at the next local midnight: {}",
                            context
                        );
                    }
                }
            }
            ref other => {
                return Err(TestCaseError::fail(format!(
                    "a seated key refused for {other:?}: {context}"
                )));
            }
        }
        Ok(())
    }

    fn verify_report(
        &self,
        key: usize,
        report: &UsageReport,
        at_ms: u64,
    ) -> Result<(), TestCaseError> {
        let model = &self.model.keys[key];
        let now_ms = at_ms.max(model.horizon_ms);
        let behind = at_ms < model.horizon_ms;
        let team = team_index(key);
        prop_assert_eq!(report.plan.as_deref(), model.seat.map(PlanName::name));
        prop_assert_eq!(report.team.as_str(), TEAMS[team]);
        prop_assert_eq!(
            report.credits_balance_micros,
            self.model.balances_micros[team]
        );
        prop_assert_eq!(
            report.credits_charged_micros,
            self.model.charged_micros[team]
        );
        let Some(plan) = model.seat else {
            prop_assert!(report.limits.is_empty());
            return Ok(());
        };
        let engine_plan = self.policy.plan_id(plan.name()).expect("plan");
        prop_assert_eq!(
            report.limits.len(),
            self.policy.plan(engine_plan).limits.len()
        );
        for (index, limit) in report.limits.iter().enumerate() {
            let counter = Counter::of_limit(&self.policy, engine_plan, index);
            let exact = model.used(counter, Reading::Exact, now_ms);
            let late = model.used(counter, Reading::OneBucketLate, now_ms);
            prop_assert_eq!(Some(limit.amount), plan.amount(counter));
            prop_assert!(
                exact <= limit.used && (behind || limit.used <= late),
                "{:?}: the report says {} used at {}; the models say {}..={}",
                counter,
                limit.used,
                at_ms,
                exact,
                late
            );
            // No `used <= amount` here: after a downgrade the usage counted under the bigger
            // plan stays counted and may exceed the smaller plan's limit.
            prop_assert_eq!(limit.remaining, limit.amount.saturating_sub(limit.used));
            if !counter.is_rolling() && !behind {
                if let Some(reset) = limit.reset_at_ms {
                    prop_assert_eq!(reset, local_midnight_ms(local_day(now_ms) + 1));
                }
            }
        }
        Ok(())
    }
}

/// Known engine bug (see `check_leaves_the_usage_report_as_it_was`): a key's first `check`
/// allocates its usage, after which the report gives its daily limits a reset time where it
/// gave none before. Undoes only that, so everything else `check` might change still shows.
fn without_resets_check_invented(before: &UsageReport, mut after: UsageReport) -> UsageReport {
    for (old, new) in before.limits.iter().zip(after.limits.iter_mut()) {
        if old.reset_at_ms.is_none() && matches!(new.window, Window::Calendar(_)) {
            new.reset_at_ms = None;
        }
    }
    after
}

impl Harness {
    /// Follows the engine: records what it admitted, where it charged it.
    /// Refunds an admitted request now. From plan quota, the engine gives back each of its
    /// units that still count as of now: everything the exact model still counts, nothing the
    /// one-bucket-late model no longer counts (its own day for a daily limit), either in
    /// between. The model then forgets what was given back. From credits, it gives the charge
    /// back.
    fn refund(&mut self, which: usize) -> Result<(), TestCaseError> {
        let open: Vec<usize> = (0..self.admitted.len())
            .filter(|&request| !self.admitted[request].5)
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let request = open[which % open.len()];
        let (ref id, key, resource, amount, charged_to, _) = self.admitted[request];
        let id = id.clone();
        let now_ms = self.now_ms;
        let refund = self.engine.refund(&id, Some(now_ms)).expect("refund");
        self.admitted[request].5 = true;
        let context = format!(
            "refund of request {request} (key {key} {resource:?} x{amount}) at {now_ms}: \
             {refund:?}"
        );
        prop_assert_eq!(refund.charged_to, charged_to, "{}", &context);
        let team = team_index(key);
        let model = &mut self.model.keys[key];
        // The refund moves the key's rolling windows to its time, as a request would.
        model.horizon_ms = model.horizon_ms.max(now_ms);
        match charged_to {
            ChargedTo::PlanQuota { .. } => {
                prop_assert_eq!(refund.given_back.credits_micros, 0, "{}", &context);
                let given: Vec<(Counter, u64)> = refund
                    .given_back
                    .counters
                    .iter()
                    .map(|&(counter, _, units)| (Counter::of_counter(&self.policy, counter), units))
                    .collect();
                for &counter in resource.counters() {
                    let log = &mut model.log[counter.index()];
                    let Some(position) = log.iter().position(|usage| usage.request == request)
                    else {
                        continue;
                    };
                    let usage = log[position];
                    let live =
                        |reading: Reading| counts(counter, reading, reading.time(&usage), now_ms);
                    let must = live(Reading::Exact)
                        && live(Reading::OneBucketLate)
                        && model
                            .seat
                            .is_some_and(|plan| plan.amount(counter).is_some());
                    let may = live(Reading::OneBucketLate);
                    match given.iter().find(|(given, _)| *given == counter) {
                        Some(&(_, units)) => {
                            prop_assert_eq!(units, amount, "{:?} {}", counter, &context);
                            prop_assert!(
                                may,
                                "{:?}: gave back what no longer counts: {}",
                                counter,
                                &context
                            );
                            log.remove(position);
                        }
                        None => prop_assert!(
                            !must,
                            "{:?}: kept what still counts: {}",
                            counter,
                            &context
                        ),
                    }
                }
                prop_assert!(
                    given
                        .iter()
                        .all(|(counter, _)| resource.counters().contains(counter)),
                    "gave back only on the request's counters: {}",
                    &context
                );
            }
            ChargedTo::Credits { micros } => {
                prop_assert!(refund.given_back.counters.is_empty(), "{}", &context);
                prop_assert_eq!(refund.given_back.credits_micros, micros, "{}", &context);
                self.model.balances_micros[team] += micros;
                self.model.charged_micros[team] -= micros;
            }
            ChargedTo::PayAsYouGo { .. } => unreachable!("plan keys only"),
        }
        Ok(())
    }

    fn record(
        &mut self,
        key: usize,
        resource: Resource,
        amount: u64,
        at_ms: u64,
        decision: &Decision,
    ) {
        let team = team_index(key);
        let model = &mut self.model.keys[key];
        let effective_ms = at_ms.max(model.horizon_ms);
        model.horizon_ms = effective_ms;
        let Decision::Admitted(admission) = decision else {
            return;
        };
        let request = self.admitted.len();
        // The id `consume` just gave it.
        let id = format!("q{}", self.consumed - 1);
        self.admitted
            .push((id, key, resource, amount, admission.charged_to, false));
        match admission.charged_to {
            ChargedTo::PlanQuota { .. } => {
                let plan = model.seat.expect("a quota admission has a seat");
                for &(counter, _) in &plan.limits_for(resource).expect("covered") {
                    let counted_day = (!counter.is_rolling()).then(|| {
                        let own = local_day(at_ms.max(model.floor_ms));
                        let day = model.counted_day[counter.index()].map_or(own, |d| d.max(own));
                        model.counted_day[counter.index()] = Some(day);
                        day
                    });
                    model.log[counter.index()].push(Usage {
                        request_ms: at_ms,
                        effective_ms,
                        counted_ms: admission.at_ms,
                        counted_day,
                        amount,
                        request,
                    });
                }
            }
            ChargedTo::Credits { micros } => {
                self.model.balances_micros[team] -= micros;
                self.model.charged_micros[team] += micros;
            }
            ChargedTo::PayAsYouGo { .. } => unreachable!("verified before"),
        }
    }
}

/// 512 cases unless `PROPTEST_CASES` says otherwise (about half a second in debug).
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// The state a case starts from: each key's seat, then each team's first top-up (0: none).
#[derive(Clone, Debug)]
struct Start {
    at_ms: u64,
    seats: Vec<Option<PlanName>>,
    top_ups_micros: Vec<u64>,
}

fn start() -> impl Strategy<Value = Start> {
    let top_up = prop_oneof![2 => Just(0u64), 1 => 1..50_000u64];
    (
        start_ms(),
        prop::collection::vec(plan(), KEYS.len()),
        prop::collection::vec(top_up, TEAMS.len()),
    )
        .prop_map(|(at_ms, seats, top_ups_micros)| Start {
            at_ms,
            seats,
            top_ups_micros,
        })
}

fn run_case(start: &Start, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(start.at_ms);
    let initial = start
        .seats
        .iter()
        .enumerate()
        .map(|(key, &plan)| Op::Seat { key, plan });
    let top_ups = start
        .top_ups_micros
        .iter()
        .enumerate()
        .filter(|(_, micros)| **micros > 0)
        .map(|(team, &micros)| {
            let key = (0..KEYS.len())
                .find(|&key| team_index(key) == team)
                .expect("a key");
            Op::TopUp { key, micros }
        });
    for op in initial.chain(top_ups).chain(ops.iter().cloned()) {
        harness.run(&op)?;
    }
    for (index, (key, _, _)) in KEYS.iter().enumerate() {
        let at_ms = harness.now_ms;
        let report = harness.engine.usage(key, Some(at_ms)).expect("usage");
        harness.verify_report(index, &report, at_ms)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_engine_agrees_with_an_exact_model_of_its_windows_and_credits(
        start in start(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        run_case(&start, &ops)?;
    }
}

#[test]
fn the_model_knows_new_york_local_days() {
    // 2026-03-08 lasts 23 hours and 2026-11-01 lasts 25.
    let spring = local_day(SPRING_2026_MS);
    assert_eq!(
        local_midnight_ms(spring + 1) - local_midnight_ms(spring),
        23 * HOUR_MS
    );
    let autumn = local_day(AUTUMN_2026_MS);
    assert_eq!(
        local_midnight_ms(autumn + 1) - local_midnight_ms(autumn),
        25 * HOUR_MS
    );
    // 2026-06-16T04:00:00Z is midnight in New York (EDT).
    assert_eq!(
        local_midnight_ms(local_day(1_781_582_400_000)),
        1_781_582_400_000
    );
    for counter in COUNTERS {
        assert_eq!(COUNTERS[counter.index()], counter);
    }
}

fn new_york_engine(start_ms: u64) -> Engine {
    let policy = Policy::from_toml_str(POLICY).expect("the test policy is valid");
    let engine = Engine::new(
        policy,
        Arc::new(ManualClock::new(start_ms)),
        EngineOptions::default(),
    )
    .expect("valid options");
    engine
        .create_user("u0", "k0", Some(start_ms))
        .expect("new user");
    engine
        .assign_seat("@u0", "u0", "Big", Some(start_ms))
        .expect("seat");
    engine
}

/// Minimised from the model test (seat on Big, then one `check` of one chat request).
#[test]
fn check_leaves_the_usage_report_as_it_was() {
    let at_ms = 1_772_931_600_000;
    let engine = new_york_engine(at_ms);
    let quantities = [(tally_engine::Unit::Requests, 1)];
    let before = engine.usage("k0", Some(at_ms)).expect("usage");
    let decision = engine
        .check(&UsageRequest::new("k0", "chat", &quantities).at(at_ms))
        .expect("check");
    assert!(decision.is_admitted());
    let after = engine.usage("k0", Some(at_ms)).expect("usage");
    // Before: every reset_at_ms is None; after: the daily limits' are Some(next midnight).
    assert_eq!(before, after);
}

// ---------------------------------------------------------------------------------------------
// Regressions of the check-rollback bug (fixed): `try_quota` in `Check` mode rolled back the
// limits before the one that refused, although in `Check` mode it never took anything from
// them, so every such check removed the request's amount from their counts. The model test
// above checks freely since.

const ROLLING_THEN_DAILY: &str = r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.Solo]
limits = [
  { resource = "chat", unit = "requests", amount = 10, window = "rolling:1h", bucket = "60s" },
  { resource = "chat", unit = "requests", amount = 5, window = "daily" },
]
"#;

const DAILY_THEN_ROLLING: &str = r#"
time_zone = "UTC"
[resources.chat]
units = ["requests"]
[plans.Solo]
limits = [
  { resource = "chat", unit = "requests", amount = 100, window = "daily" },
  { resource = "chat", unit = "requests", amount = 5, window = "rolling:1h", bucket = "60s" },
]
"#;

/// 23:30 UTC on 2026-09-21.
const HALF_AN_HOUR_BEFORE_MIDNIGHT_MS: u64 = 1_790_033_400_000;

fn solo_engine(policy: &str, at_ms: u64) -> Engine {
    let policy = Policy::from_toml_str(policy).expect("valid policy");
    let engine = Engine::new(
        policy,
        Arc::new(ManualClock::new(at_ms)),
        EngineOptions::default(),
    )
    .expect("valid options");
    engine
        .create_user("u0", "k0", Some(at_ms))
        .expect("new user");
    engine
        .assign_seat("@u0", "u0", "Solo", Some(at_ms))
        .expect("seat");
    engine
}

fn chat(engine: &Engine, requests: u64, at_ms: u64, check: bool) -> Decision {
    let quantities = [(tally_engine::Unit::Requests, requests)];
    let request = UsageRequest::new("k0", "chat", &quantities).at(at_ms);
    if check {
        engine.check(&request).expect("check")
    } else {
        engine.consume(&request).expect("consume")
    }
}

fn used(engine: &Engine, at_ms: u64) -> Vec<u64> {
    let report = engine.usage("k0", Some(at_ms)).expect("usage");
    report.limits.iter().map(|limit| limit.used).collect()
}

#[test]
fn the_check_rollback_reproductions_start_from_half_an_hour_before_midnight() {
    assert_eq!(
        HALF_AN_HOUR_BEFORE_MIDNIGHT_MS % DAY_MS,
        DAY_MS - 30 * MINUTE_MS
    );
}

/// Five requests fill the daily limit at 23:30; five checks refused by the daily limit each
/// take one unit off the rolling window; at 00:10, inside the same rolling hour, ten more
/// requests are admitted: fifteen in one hour on a limit of ten.
#[test]
fn a_check_refused_by_the_daily_limit_frees_no_rolling_quota() {
    let at_ms = HALF_AN_HOUR_BEFORE_MIDNIGHT_MS;
    let engine = solo_engine(ROLLING_THEN_DAILY, at_ms);
    assert!(chat(&engine, 5, at_ms, false).is_admitted());
    for _ in 0..5 {
        assert!(!chat(&engine, 1, at_ms, true).is_admitted());
    }
    assert_eq!(
        used(&engine, at_ms),
        [5, 5],
        "the checks changed the counts"
    );
    let next_day_ms = at_ms + 40 * MINUTE_MS;
    assert!(
        !chat(&engine, 10, next_day_ms, false).is_admitted(),
        "ten more inside the rolling hour of the first five"
    );
}

/// One check more than the rolling window holds takes its count below zero: a panic in debug
/// builds ("rolling total would go below zero"), and in release builds the count wraps to
/// u64::MAX, which locks the key out of its plan for good.
#[test]
fn checks_refused_by_the_daily_limit_never_take_the_rolling_count_below_zero() {
    let at_ms = HALF_AN_HOUR_BEFORE_MIDNIGHT_MS;
    let engine = solo_engine(ROLLING_THEN_DAILY, at_ms);
    assert!(chat(&engine, 5, at_ms, false).is_admitted());
    for _ in 0..6 {
        assert!(!chat(&engine, 1, at_ms, true).is_admitted());
    }
    let later_ms = at_ms + 2 * HOUR_MS;
    assert!(used(&engine, later_ms).iter().all(|used| *used <= 10));
    assert!(chat(&engine, 1, later_ms, false).is_admitted());
}

/// The same bug with the limits the other way round: checks refused by the rolling limit take
/// units off the daily count.
#[test]
fn a_check_refused_by_the_rolling_limit_frees_no_daily_quota() {
    let at_ms = HALF_AN_HOUR_BEFORE_MIDNIGHT_MS - 12 * HOUR_MS;
    let engine = solo_engine(DAILY_THEN_ROLLING, at_ms);
    assert!(chat(&engine, 5, at_ms, false).is_admitted());
    for _ in 0..5 {
        assert!(!chat(&engine, 1, at_ms, true).is_admitted());
    }
    assert_eq!(
        used(&engine, at_ms),
        [5, 5],
        "the checks changed the counts"
    );
}

// ---------------------------------------------------------------------------------------------
// A clock stepped backwards (the engine's own clock, no explicit timestamps).

#[test]
fn a_clock_stepped_back_counts_at_the_newest_time_and_releases_nothing_early() {
    let midnight_ms = 1_781_582_400_000; // 2026-06-16T00:00 EDT, a bucket boundary
    let start_ms = midnight_ms - 2 * HOUR_MS;
    let clock = Arc::new(ManualClock::new(start_ms));
    let policy = Policy::from_toml_str(POLICY).expect("the test policy is valid");
    let engine =
        Engine::new(policy, clock.clone(), EngineOptions::default()).expect("valid options");
    engine.create_user("u0", "k0", None).expect("new user");
    engine
        .assign_seat("@u0", "u0", "Small", None)
        .expect("seat");
    let consume = |requests: u64| {
        let quantities = [(tally_engine::Unit::Requests, requests)];
        engine
            .consume(&UsageRequest::new("k0", "chat", &quantities))
            .expect("consume")
    };
    let Decision::Admitted(first) = consume(10) else {
        panic!("an empty window takes ten")
    };
    assert_eq!(first.at_ms, start_ms);

    // Two hours back, then up to one millisecond before the window ends: still full.
    for at_ms in [start_ms - 2 * HOUR_MS, start_ms + WINDOW_MS - 1] {
        clock.set_ms(at_ms);
        assert!(!consume(1).is_admitted(), "released early at {at_ms}");
    }
    // Released when the bucket's last instant has aged out: one bucket after the window.
    clock.set_ms(start_ms + WINDOW_MS + BUCKET_MS);
    assert!(consume(1).is_admitted());

    // Across midnight and back: the new day stands, and a unit stamped before midnight counts
    // in it, at the newest time the rolling window has seen.
    clock.set_ms(midnight_ms + SECOND_MS);
    assert!(consume(1).is_admitted());
    clock.set_ms(midnight_ms - SECOND_MS);
    let Decision::Admitted(stepped_back) = consume(1) else {
        panic!("room in the new day")
    };
    let next_midnight_ms = local_midnight_ms(local_day(midnight_ms) + 1);
    assert_eq!(
        stepped_back.limits.as_slice()[1].reset_at_ms,
        Some(next_midnight_ms)
    );
    assert_eq!(stepped_back.at_ms, midnight_ms);
    let report = engine.usage("k0", None).expect("usage");
    let used: Vec<u64> = report.limits.iter().map(|limit| limit.used).collect();
    assert_eq!(used, [3, 2], "the rolling hour holds 3; the new day 2");
}

// ---------------------------------------------------------------------------------------------
// The one-bucket bound on the shipped 5-hour windows.

/// The shipped policy's 5-hour windows have the default bucket. It used to be 5h / 210 rounded
/// down to whole seconds, 85 s, which does not divide 5 h: the ring spanned 212 buckets and a
/// unit used at the start of a bucket came back 105 s after the window. The default now divides
/// the window (80 s, 225 buckets), and `window.rs` promises at most one bucket late.
#[test]
fn the_shipped_five_hour_window_releases_within_one_bucket_of_its_edge() {
    let policy = Policy::token_plan();
    let starter = policy.plan(policy.plan_id("Starter").expect("Starter"));
    let Window::Rolling {
        window_ms,
        bucket_ms,
    } = starter.limits[0].window
    else {
        panic!("Starter's first limit is rolling: {:?}", starter.limits[0]);
    };
    assert_eq!((window_ms, bucket_ms), (5 * HOUR_MS, 80 * SECOND_MS));
    assert_eq!(window_ms % bucket_ms, 0);
    let start_ms = 1_790_000_000_000 / bucket_ms * bucket_ms; // the start of a bucket
    let engine = Engine::new(
        Policy::token_plan(),
        Arc::new(ManualClock::new(start_ms)),
        EngineOptions::default(),
    )
    .expect("valid options");
    engine
        .create_user("ada", "tp-ada", Some(start_ms))
        .expect("user");
    engine
        .assign_seat("@ada", "ada", "Starter", Some(start_ms))
        .expect("seat");
    let consume = |requests: u64, at_ms: u64| {
        let quantities = [(tally_engine::Unit::Requests, requests)];
        engine
            .consume(&UsageRequest::new("tp-ada", "m2.7", &quantities).at(at_ms))
            .expect("consume")
    };
    assert!(consume(1_500, start_ms).is_admitted());
    assert!(
        !consume(1, start_ms + 5 * HOUR_MS - 1).is_admitted(),
        "never early"
    );
    let one_bucket_late_ms = start_ms + 5 * HOUR_MS + bucket_ms;
    let decision = consume(1, one_bucket_late_ms);
    assert!(
        decision.is_admitted(),
        "still refused one bucket after the window: {decision:?}"
    );
}
