//! `tally simulate`: runs the scenario's traffic through one engine, slot by slot of simulated
//! time, with explicit timestamps (and a `ManualClock` kept at the slot), so days pass in
//! seconds and the same seed gives the same decisions.
//!
//! One thread on purpose: decisions then happen in one order, so team credits run out at the
//! same request on every run and the report is reproducible.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_engine::calendar::CalendarPeriod;
use tally_engine::{
    ChargedTo, Decision, Engine, Error, LimitReport, ManualClock, MemoryStats, PlanId, Policy,
    UsageRequest, Window,
};

use crate::outcome::{error_kind, Counts};
use crate::rng::Rng;
use crate::scenario::{
    self, Access, Appetite, Burst, CreditAccount, Scenario, SeatChangeKind, Shape, DAY_MS, HOUR_MS,
    MINUTE_MS,
};
use crate::traffic::{activity_percent, requests_in_slot, Catalog, Request};

/// 2026-03-02T13:00:00Z, 21:00 in the shipped policy's Asia/Shanghai: the first local midnight
/// comes three hours in, and the run ends in a busy evening, so the closing usage bars are full.
pub const START_MS: u64 = 1_772_456_400_000;
/// Simulated time advances in slots; a key's requests within one are spread evenly.
pub const SLOT_MS: u64 = 5 * MINUTE_MS;
/// Prepaid teams check their balance this often and top up when it runs low.
const TOP_UP_CHECK_MS: u64 = 6 * HOUR_MS;
/// One request in twenty carries a request id, and one of those in twelve is retried. Few:
/// the engine keeps every id for at least the policy's longest window (a week and an hour
/// here) at about 400 bytes each, which dominates the run's memory.
const REQUEST_ID_PER_MILLION: u64 = 50_000;
const RETRY_PER_MILLION: u64 = 80_000;
const RETRY_DELAY_MS: u64 = 1_500;
/// The engine remembers a million request ids (`EngineOptions::idempotency_capacity`); a run
/// stops attaching ids well before that bound (and the ~400 MB a full table takes).
const MAX_REQUEST_IDS: u64 = 200_000;
/// Now and then a revoked or mistyped key calls in.
const STRAY_PER_MILLION_SLOTS: u64 = 300_000;
const STRAY_KEYS: u64 = 50;
/// A slot's requests go to the engine in batches of at most this many (a bound on the memory
/// of one `consume_many`; a slot of the default run holds about 2,500).
const MAX_BATCH_REQUESTS: usize = 16_384;
/// A seat change's effect is counted over the five hours after it.
const SEAT_CHANGE_WATCH_MS: u64 = 5 * HOUR_MS;

const _: () = assert!(DAY_MS % SLOT_MS == 0 && TOP_UP_CHECK_MS % SLOT_MS == 0);
const _: () = assert!(RETRY_DELAY_MS < SLOT_MS);

/// Where a request's counts go besides the totals: a plan's row or one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    Plan(PlanId),
    NoSeat,
    PayAsYouGo,
    UnknownKey,
}

/// One row of the per-plan table.
#[derive(Debug, Clone)]
pub struct RowSummary {
    pub label: String,
    pub keys: u64,
    pub heavy: u64,
    /// Keys refused by one of the plan's limits at least once.
    pub keys_limited: u64,
    pub counts: Counts,
    /// The busiest key's usage bar at the end of the run.
    pub sample: Option<UsageSample>,
}

#[derive(Debug, Clone)]
pub struct UsageSample {
    pub key: String,
    pub heavy: bool,
    pub limits: Vec<LimitReport>,
}

#[derive(Debug, Clone)]
pub struct TeamSummary {
    pub account: CreditAccount,
    pub mid_run_top_ups: u64,
    pub mid_run_top_up_micros: u64,
    /// Summed from the admissions charged to credits.
    pub charged_micros: u64,
    pub end_micros: u64,
}

impl TeamSummary {
    pub fn topped_up_micros(&self) -> u64 {
        self.account.initial_micros + self.mid_run_top_up_micros
    }

    /// Whether the engine's balance is what the top-ups minus the charges say it should be.
    pub fn reconciles(&self) -> bool {
        self.topped_up_micros().checked_sub(self.charged_micros) == Some(self.end_micros)
    }
}

#[derive(Debug, Clone)]
pub struct SeatChangeSummary {
    pub kind: SeatChangeKind,
    pub key: String,
    pub from: String,
    pub to: String,
    pub at_ms: u64,
    /// The key's chat window just before and just after the change.
    pub before: Option<LimitReport>,
    pub after: Option<LimitReport>,
    /// This key's decisions in the five hours after the change.
    pub counts_after: Counts,
}

/// The leaked key revoked halfway through, and its member's new key.
#[derive(Debug, Clone)]
pub struct RotationSummary {
    pub old_key: String,
    pub new_key: String,
    /// The seat the new key was given (the old key's).
    pub plan: Option<String>,
    pub at_ms: u64,
    /// Requests sent on the revoked key after it was revoked.
    pub leaked: Counts,
    /// The member's requests on the new key in the five hours after the rotation.
    pub owner_after: Counts,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub shape: Shape,
    pub policy: String,
    pub time_zone: String,
    pub users: u64,
    pub engine_keys: u64,
    pub named_teams: u64,
    pub keys_by_access: Vec<(Access, u64)>,
    pub heavy_keys: u64,
    pub totals: Counts,
    pub rows: Vec<RowSummary>,
    pub teams: Vec<TeamSummary>,
    pub seat_changes: Vec<SeatChangeSummary>,
    pub rotation: Option<RotationSummary>,
    pub requests_with_ids: u64,
    pub replays: u64,
    /// Replays that got back exactly their first decision.
    pub replays_matching: u64,
    /// Keys refused on a daily limit and later admitted on it after local midnight.
    pub daily_resets_seen: u64,
    pub errors: Vec<(&'static str, u64)>,
    /// What the keys hold at the end of the run.
    pub memory: MemoryStats,
    /// Keys whose idle windows the engine freed on its own, and its finished rounds.
    pub reclaimed_on_its_own: (u64, u64),
    pub wall: Duration,
}

/// Runs a whole simulation on `engine` (a fresh database whose clock is `clock`): builds the
/// accounts, sends the traffic, and summarises.
pub fn run(
    shape: Shape,
    engine: &Engine,
    clock: &ManualClock,
    policy_name: &str,
) -> Result<Summary, Error> {
    clock.set_ms(shape.start_ms);
    let policy = engine.policy();
    let scenario = scenario::build(engine, &policy, &shape)?;
    let mut simulation = Simulation::new(engine, clock, policy, shape, scenario);
    let started = Instant::now();
    simulation.send_traffic()?;
    let wall = started.elapsed();
    simulation.summarise(policy_name, wall)
}

/// Per-key state the traffic loop keeps.
#[derive(Debug, Clone, Default)]
struct KeyProgress {
    next_burst: usize,
    limited: bool,
    /// `(plan, limit, local day)` of the last refusal on a daily limit.
    daily_denial: Option<(PlanId, u8, u32)>,
    seat_change: Option<usize>,
}

/// Who sends a request of a slot's batch: a key of the scenario, a key that never existed (its
/// number), or whoever holds the key the rotation revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    Actor(usize),
    Stray(usize),
    Leaked,
}

/// A request decided on before it is sent: a slot's requests are drawn first (drawing does not
/// depend on decisions), then sent as one batch, then recorded in the order they were drawn.
#[derive(Debug, Clone, Copy)]
struct Planned {
    sender: Sender,
    at_ms: u64,
    request: Request,
    request_id: Option<u64>,
    retried: bool,
}

struct Simulation<'a> {
    engine: &'a Engine,
    clock: &'a ManualClock,
    policy: Arc<Policy>,
    catalog: Catalog,
    shape: Shape,
    scenario: Scenario,
    progress: Vec<KeyProgress>,
    rows: Vec<Counts>,
    totals: Counts,
    account_charged_micros: Vec<u64>,
    mid_run_top_ups: Vec<(u64, u64)>,
    seat_changes: Vec<SeatChangeSummary>,
    seat_changes_done: usize,
    rotation: Option<RotationSummary>,
    next_request_id: u64,
    replays: u64,
    replays_matching: u64,
    daily_resets_seen: u64,
    errors: Vec<(&'static str, u64)>,
    stray_rng: Rng,
    stray_keys: Vec<String>,
    /// The slot's requests, in the order they are decided.
    batch: Vec<Planned>,
}

impl<'a> Simulation<'a> {
    fn new(
        engine: &'a Engine,
        clock: &'a ManualClock,
        policy: Arc<Policy>,
        shape: Shape,
        scenario: Scenario,
    ) -> Simulation<'a> {
        let mut progress = vec![KeyProgress::default(); scenario.actors.len()];
        for (index, change) in scenario.seat_changes.iter().enumerate() {
            progress[change.actor].seat_change = Some(index);
        }
        let seat_changes = scenario
            .seat_changes
            .iter()
            .map(|change| SeatChangeSummary {
                kind: change.kind,
                key: scenario.actors[change.actor].key.clone(),
                from: policy.plan(change.from).name.to_string(),
                to: policy.plan(change.to).name.to_string(),
                at_ms: change.at_ms,
                before: None,
                after: None,
                counts_after: Counts::default(),
            })
            .collect();
        let rotation = scenario.rotation.as_ref().map(|rotation| {
            let actor = &scenario.actors[rotation.actor];
            RotationSummary {
                old_key: actor.key.clone(),
                new_key: rotation.new_key.clone(),
                plan: actor.plan.map(|plan| policy.plan(plan).name.to_string()),
                at_ms: rotation.at_ms,
                leaked: Counts::default(),
                owner_after: Counts::default(),
            }
        });
        Simulation {
            engine,
            clock,
            rotation,
            catalog: Catalog::new(&policy),
            rows: vec![Counts::default(); policy.plans().len() + 3],
            policy,
            shape,
            progress,
            totals: Counts::default(),
            account_charged_micros: vec![0; scenario.accounts.len()],
            mid_run_top_ups: vec![(0, 0); scenario.accounts.len()],
            seat_changes,
            seat_changes_done: 0,
            scenario,
            next_request_id: 0,
            replays: 0,
            replays_matching: 0,
            daily_resets_seen: 0,
            errors: Vec::new(),
            stray_rng: Rng::stream(shape.seed, u64::from_le_bytes(*b"strays\0\0")),
            stray_keys: (0..STRAY_KEYS)
                .map(|number| format!("tp-unknown-{number}"))
                .collect(),
            batch: Vec::new(),
        }
    }

    fn send_traffic(&mut self) -> Result<(), Error> {
        let slots = self.shape.days * DAY_MS / self.shape.slot_ms;
        for slot in 0..slots {
            let slot_start = self.shape.start_ms + slot * self.shape.slot_ms;
            self.clock.set_ms(slot_start);
            self.run_due_seat_changes(slot_start)?;
            self.run_due_rotation(slot_start)?;
            if slot > 0 && (slot_start - self.shape.start_ms) % TOP_UP_CHECK_MS == 0 {
                self.top_up_low_teams(slot_start)?;
            }
            let percent = activity_percent(self.local_hour(slot_start));
            self.batch.clear();
            for index in 0..self.scenario.actors.len() {
                self.plan_slot(index, slot_start, percent);
            }
            self.plan_stray(slot_start);
            let batch = std::mem::take(&mut self.batch);
            for chunk in batch.chunks(MAX_BATCH_REQUESTS) {
                self.send_batch(chunk);
            }
            self.batch = batch;
        }
        Ok(())
    }

    /// The local clock's hour (0-23) in the policy's time zone: on the days a clock changes,
    /// not the hours since local midnight.
    fn local_hour(&self, at_ms: u64) -> u64 {
        u64::from(self.policy.calendar().local_hour(at_ms))
    }

    /// Draws this key's requests for the slot: its ordinary rate plus any burst in progress.
    fn plan_slot(&mut self, index: usize, slot_start: u64, percent: u64) {
        let slot_ms = self.shape.slot_ms;
        let actor = &mut self.scenario.actors[index];
        let progress = &mut self.progress[index];
        let rate = actor.appetite.milli_requests_per_hour();
        let ordinary = requests_in_slot(&mut actor.rng, rate, percent, slot_ms);
        let burst = burst_requests_in_slot(
            &actor.bursts,
            &mut progress.next_burst,
            slot_start,
            slot_ms,
            &mut actor.rng,
        );
        let total = ordinary + burst;
        for position in 0..total {
            // Burst and ordinary calls mixed at random, about `burst` of the former.
            let in_burst = actor.rng.below(total) < burst;
            let request = if in_burst {
                self.catalog
                    .draw_burst(&mut actor.rng, actor.chat, &self.policy)
            } else {
                self.catalog
                    .draw_ordinary(&mut actor.rng, actor.chat, &self.policy)
            };
            let request_id = (self.next_request_id < MAX_REQUEST_IDS
                && actor.rng.chance(REQUEST_ID_PER_MILLION))
            .then(|| {
                self.next_request_id += 1;
                self.next_request_id
            });
            let retried = request_id.is_some() && actor.rng.chance(RETRY_PER_MILLION);
            self.batch.push(Planned {
                sender: Sender::Actor(index),
                at_ms: slot_start + (2 * position + 1) * slot_ms / (2 * total),
                request,
                request_id,
                retried,
            });
        }
    }

    /// A request from a key that does not exist (mistyped, made up) now and then, and once the
    /// rotation revoked the leaked key, as often from whoever holds it.
    fn plan_stray(&mut self, slot_start: u64) {
        let leaked = self.rotation_done();
        if leaked && self.stray_rng.chance(STRAY_PER_MILLION_SLOTS) {
            let chat = self.catalog.chat_for(None);
            let request = self
                .catalog
                .draw_ordinary(&mut self.stray_rng, chat, &self.policy);
            let at_ms = slot_start + self.stray_rng.below(self.shape.slot_ms);
            self.batch.push(Planned {
                sender: Sender::Leaked,
                at_ms,
                request,
                request_id: None,
                retried: false,
            });
        }
        if !self.stray_rng.chance(STRAY_PER_MILLION_SLOTS) {
            return;
        }
        let number = self.stray_rng.below(STRAY_KEYS) as usize;
        let chat = self.catalog.chat_for(None);
        let request = self
            .catalog
            .draw_ordinary(&mut self.stray_rng, chat, &self.policy);
        let at_ms = slot_start + self.stray_rng.below(self.shape.slot_ms);
        self.batch.push(Planned {
            sender: Sender::Stray(number),
            at_ms,
            request,
            request_id: None,
            retried: false,
        });
    }

    /// Decides a batch with one `consume_many` (one wait for durability, so `--durability sync`
    /// costs one flush per batch, not per request), then records the outcomes in order. A
    /// retried request follows its first attempt in the batch: a gateway retry after a
    /// timeout, same id, same request, a little later.
    fn send_batch(&mut self, batch: &[Planned]) {
        let engine = self.engine;
        let ids: Vec<Option<String>> = batch
            .iter()
            .map(|planned| planned.request_id.map(|id| format!("req-{id}")))
            .collect();
        let mut requests = Vec::with_capacity(batch.len() + batch.len() / 16);
        for (planned, id) in batch.iter().zip(&ids) {
            let key = match planned.sender {
                Sender::Actor(index) => &self.scenario.actors[index].key,
                Sender::Stray(number) => &self.stray_keys[number],
                Sender::Leaked => match &self.rotation {
                    Some(rotation) => &rotation.old_key,
                    None => unreachable!("a leaked key only once a rotation revoked it"),
                },
            };
            let resource = &*self.policy.resource(planned.request.resource).name;
            let mut request =
                UsageRequest::new(key, resource, planned.request.quantities()).at(planned.at_ms);
            if let Some(id) = id {
                request = request.id(id);
            }
            requests.push(request);
            if planned.retried {
                requests.push(request.at(planned.at_ms + RETRY_DELAY_MS));
            }
        }
        let mut outcomes = engine.consume_many(&requests).into_iter();
        drop(requests);
        for planned in batch {
            let Some(outcome) = outcomes.next() else {
                unreachable!("consume_many answers every request")
            };
            if planned.retried {
                let again = outcomes.next();
                self.replays += 1;
                self.replays_matching += u64::from(again.as_ref() == Some(&outcome));
            }
            match planned.sender {
                Sender::Actor(index) => {
                    let actor = &self.scenario.actors[index];
                    let row = row_of(actor.access, actor.plan);
                    self.record(Some(index), row, &outcome, planned.at_ms);
                }
                Sender::Stray(_) => self.record(None, Row::UnknownKey, &outcome, planned.at_ms),
                Sender::Leaked => {
                    if let Some(rotation) = &mut self.rotation {
                        rotation.leaked.record(&outcome);
                    }
                    self.record(None, Row::UnknownKey, &outcome, planned.at_ms);
                }
            }
        }
    }

    fn record(
        &mut self,
        index: Option<usize>,
        row: Row,
        outcome: &Result<Decision, Error>,
        at_ms: u64,
    ) {
        self.totals.record(outcome);
        let plans = self.policy.plans().len();
        let row_index = match row {
            Row::Plan(plan) => plan.index(),
            Row::NoSeat => plans,
            Row::PayAsYouGo => plans + 1,
            Row::UnknownKey => plans + 2,
        };
        self.rows[row_index].record(outcome);
        if let Err(error) = outcome {
            self.count_error(error_kind(error));
        }
        let Some(index) = index else { return };
        if let Ok(decision) = outcome {
            self.follow_key(index, decision, at_ms);
        }
        if let (Some(rotation), Some(scripted)) = (&mut self.rotation, &self.scenario.rotation) {
            if scripted.actor == index
                && (rotation.at_ms..rotation.at_ms + SEAT_CHANGE_WATCH_MS).contains(&at_ms)
            {
                rotation.owner_after.record(outcome);
            }
        }
        if let Some(change) = self.progress[index].seat_change {
            let summary = &mut self.seat_changes[change];
            if (summary.at_ms..summary.at_ms + SEAT_CHANGE_WATCH_MS).contains(&at_ms) {
                summary.counts_after.record(outcome);
            }
        }
    }

    fn count_error(&mut self, kind: &'static str) {
        match self.errors.iter_mut().find(|(name, _)| *name == kind) {
            Some((_, count)) => *count += 1,
            None => self.errors.push((kind, 1)),
        }
    }

    /// Per-key bookkeeping: credits charged to its team, whether it hit a limit, and whether
    /// a daily limit that refused it let it through again after local midnight.
    fn follow_key(&mut self, index: usize, decision: &Decision, at_ms: u64) {
        let day = || {
            self.policy
                .calendar()
                .period_of(CalendarPeriod::Daily, at_ms)
                .index
        };
        let progress = &mut self.progress[index];
        match decision {
            Decision::Admitted(admission) => match admission.charged_to {
                ChargedTo::Credits { micros } => {
                    if let Some(account) = self.scenario.actors[index].account {
                        self.account_charged_micros[account] += micros;
                    }
                }
                ChargedTo::PlanQuota { plan } => {
                    let Some((denied_plan, limit, denied_day)) = progress.daily_denial else {
                        return;
                    };
                    let same_limit = admission.limits.as_slice().iter().any(|s| s.limit == limit);
                    if denied_plan == plan && same_limit && day() > denied_day {
                        self.daily_resets_seen += 1;
                        progress.daily_denial = None;
                    }
                }
                ChargedTo::PayAsYouGo { .. } => {}
            },
            Decision::Denied(denial) => {
                use tally_engine::DenialReason::{ExceedsLimit, QuotaExhausted};
                match (denial.reason, denial.plan) {
                    (QuotaExhausted { limit, .. }, Some(plan)) => {
                        progress.limited = true;
                        let window = self.policy.plan(plan).limits[usize::from(limit)].window;
                        if window == Window::Calendar(CalendarPeriod::Daily) {
                            progress.daily_denial = Some((plan, limit, day()));
                        }
                    }
                    (ExceedsLimit { .. }, _) => progress.limited = true,
                    _ => {}
                }
            }
        }
    }

    fn run_due_seat_changes(&mut self, now_ms: u64) -> Result<(), Error> {
        while let Some(change) = self.scenario.seat_changes.get(self.seat_changes_done) {
            if change.at_ms > now_ms {
                break;
            }
            let change = *change;
            self.seat_changes_done += 1;
            let actor = &self.scenario.actors[change.actor];
            let (key, user) = (actor.key.clone(), actor.user.clone());
            let before = chat_bar(self.engine, &key, now_ms)?;
            let to = self.policy.plan(change.to);
            self.engine
                .assign_seat(&format!("@{user}"), &user, &to.name, Some(now_ms))?;
            let actor = &mut self.scenario.actors[change.actor];
            actor.plan = Some(change.to);
            actor.chat = self.catalog.chat_for(Some(to));
            let summary = &mut self.seat_changes[self.seat_changes_done - 1];
            summary.before = before;
            summary.after = chat_bar(self.engine, &key, now_ms)?;
        }
        Ok(())
    }

    /// Whether the rotation has revoked the leaked key.
    fn rotation_done(&self) -> bool {
        match (&self.scenario.rotation, &self.rotation) {
            (Some(scripted), Some(rotation)) => {
                self.scenario.actors[scripted.actor].key != rotation.old_key
            }
            _ => false,
        }
    }

    /// Revokes the leaked key when its time comes and gives its member a new key in its place,
    /// on the same seat (a new key starts with none); the member goes on with the new key.
    fn run_due_rotation(&mut self, now_ms: u64) -> Result<(), Error> {
        let Some(scripted) = &self.scenario.rotation else {
            return Ok(());
        };
        if scripted.at_ms > now_ms || self.rotation_done() {
            return Ok(());
        }
        let actor = &self.scenario.actors[scripted.actor];
        let at = Some(scripted.at_ms);
        self.engine.revoke_key(&actor.key, at)?;
        self.engine
            .add_member(&scripted.team, &actor.user, &scripted.new_key, at)?;
        if let Some(plan) = actor.plan {
            let plan = &self.policy.plan(plan).name;
            self.engine
                .assign_seat(&scripted.team, &actor.user, plan, at)?;
        }
        let new_key = scripted.new_key.clone();
        self.scenario.actors[scripted.actor].key = new_key;
        Ok(())
    }

    /// Prepaid teams buy their first purchase again when under a quarter of it is left.
    fn top_up_low_teams(&mut self, now_ms: u64) -> Result<(), Error> {
        for (index, account) in self.scenario.accounts.iter().enumerate() {
            if account.role != Some(scenario::TeamRole::Prepaid) {
                continue;
            }
            let balance = self.engine.credits_micros(&account.team)?;
            if balance < account.initial_micros / 4 {
                self.engine
                    .top_up(&account.team, account.initial_micros, Some(now_ms))?;
                let (count, micros) = &mut self.mid_run_top_ups[index];
                *count += 1;
                *micros += account.initial_micros;
            }
        }
        Ok(())
    }

    fn summarise(self, policy_name: &str, wall: Duration) -> Result<Summary, Error> {
        let end_ms = self.shape.end_ms();
        let rows = self.row_summaries(end_ms)?;
        let teams = self.team_summaries()?;
        let actors = &self.scenario.actors;
        let mut keys_by_access: Vec<(Access, u64)> = Vec::new();
        for actor in actors {
            match keys_by_access
                .iter_mut()
                .find(|(access, _)| *access == actor.access)
            {
                Some((_, count)) => *count += 1,
                None => keys_by_access.push((actor.access, 1)),
            }
        }
        keys_by_access.sort();
        Ok(Summary {
            shape: self.shape,
            policy: policy_name.to_string(),
            time_zone: self.policy.calendar().time_zone().to_string(),
            users: self.scenario.users,
            engine_keys: self.scenario.engine_keys,
            named_teams: self
                .scenario
                .accounts
                .iter()
                .filter(|a| a.role.is_some())
                .count() as u64,
            keys_by_access,
            heavy_keys: actors
                .iter()
                .filter(|a| a.appetite == Appetite::Heavy)
                .count() as u64,
            totals: self.totals,
            rows,
            teams,
            seat_changes: self.seat_changes,
            rotation: self.rotation,
            requests_with_ids: self.next_request_id,
            replays: self.replays,
            replays_matching: self.replays_matching,
            daily_resets_seen: self.daily_resets_seen,
            errors: self.errors,
            memory: self.engine.memory_stats(),
            reclaimed_on_its_own: self.engine.automatic_reclaims(),
            wall,
        })
    }

    fn row_summaries(&self, end_ms: u64) -> Result<Vec<RowSummary>, Error> {
        let plans = self.policy.plans().len();
        let mut summaries = Vec::with_capacity(plans + 3);
        for index in 0..plans + 3 {
            let row = match index {
                _ if index < plans => Row::Plan(PlanId(index as u16)),
                _ if index == plans => Row::NoSeat,
                _ if index == plans + 1 => Row::PayAsYouGo,
                _ => Row::UnknownKey,
            };
            let members: Vec<usize> = (0..self.scenario.actors.len())
                .filter(|&actor| {
                    let actor_row = &self.scenario.actors[actor];
                    row_of(actor_row.access, actor_row.plan) == row
                })
                .collect();
            let label = match row {
                Row::Plan(plan) => self.policy.plan(plan).name.to_string(),
                Row::NoSeat => "(no seat)".into(),
                Row::PayAsYouGo => "(pay-as-you-go)".into(),
                Row::UnknownKey => "(revoked or unknown keys)".into(),
            };
            let sample = match row {
                Row::Plan(_) => self.busiest(&members, end_ms)?,
                _ => None,
            };
            let actors = &self.scenario.actors;
            summaries.push(RowSummary {
                label,
                keys: members.len() as u64,
                heavy: members
                    .iter()
                    .filter(|&&a| actors[a].appetite == Appetite::Heavy)
                    .count() as u64,
                keys_limited: members
                    .iter()
                    .filter(|&&a| self.progress[a].limited)
                    .count() as u64,
                counts: self.rows[index],
                sample,
            });
        }
        Ok(summaries)
    }

    /// The key whose fullest limit is fullest at `at_ms` (ties: the first key).
    fn busiest(&self, members: &[usize], at_ms: u64) -> Result<Option<UsageSample>, Error> {
        let mut best: Option<(u128, UsageSample)> = None;
        for &index in members {
            let actor = &self.scenario.actors[index];
            let report = self.engine.usage(&actor.key, Some(at_ms))?;
            let fullest = report
                .limits
                .iter()
                .map(|limit| u128::from(limit.used) * 1_000_000 / u128::from(limit.amount.max(1)))
                .max()
                .unwrap_or(0);
            if best.as_ref().is_none_or(|(score, _)| fullest > *score) {
                let sample = UsageSample {
                    key: actor.key.clone(),
                    heavy: actor.appetite == Appetite::Heavy,
                    limits: report.limits,
                };
                best = Some((fullest, sample));
            }
        }
        Ok(best.map(|(_, sample)| sample))
    }

    fn team_summaries(&self) -> Result<Vec<TeamSummary>, Error> {
        let mut teams = Vec::with_capacity(self.scenario.accounts.len());
        for (index, account) in self.scenario.accounts.iter().enumerate() {
            let (mid_run_top_ups, mid_run_top_up_micros) = self.mid_run_top_ups[index];
            teams.push(TeamSummary {
                account: account.clone(),
                mid_run_top_ups,
                mid_run_top_up_micros,
                charged_micros: self.account_charged_micros[index],
                end_micros: self.engine.credits_micros(&account.team)?,
            });
        }
        Ok(teams)
    }
}

fn row_of(access: Access, plan: Option<PlanId>) -> Row {
    match (access, plan) {
        (Access::PayAsYouGo, _) => Row::PayAsYouGo,
        (_, Some(plan)) => Row::Plan(plan),
        (_, None) => Row::NoSeat,
    }
}

/// The requests of the burst in progress that fall in this slot: its share by overlap, the
/// fraction of a request sent with that chance.
fn burst_requests_in_slot(
    bursts: &[Burst],
    next: &mut usize,
    slot_start: u64,
    slot_ms: u64,
    rng: &mut Rng,
) -> u64 {
    while bursts
        .get(*next)
        .is_some_and(|burst| burst.end_ms <= slot_start)
    {
        *next += 1;
    }
    let Some(burst) = bursts.get(*next) else {
        return 0;
    };
    let overlap_start = burst.start_ms.max(slot_start);
    let overlap_end = burst.end_ms.min(slot_start + slot_ms);
    if overlap_end <= overlap_start {
        return 0;
    }
    let duration_ms = burst.end_ms - burst.start_ms;
    let expected_milli = burst.requests * 1_000 * (overlap_end - overlap_start) / duration_ms;
    expected_milli / 1_000 + u64::from(rng.chance((expected_milli % 1_000) * 1_000))
}

/// The first rolling limit of a key's usage report: the chat window the seat change is about.
fn chat_bar(engine: &Engine, key: &str, at_ms: u64) -> Result<Option<LimitReport>, Error> {
    let report = engine.usage(key, Some(at_ms))?;
    Ok(report
        .limits
        .into_iter()
        .find(|limit| matches!(limit.window, Window::Rolling { .. })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_engine::EngineOptions;

    #[test]
    fn request_ids_stay_well_within_what_the_engine_remembers() {
        // Ids hash unevenly into the engine's shards: keep half the capacity free.
        let capacity = EngineOptions::default().idempotency_capacity as u64;
        assert!(MAX_REQUEST_IDS * 2 <= capacity);
    }

    #[test]
    fn a_burst_sends_its_requests_across_the_slots_it_overlaps() {
        let burst = Burst {
            start_ms: 1_000 * SLOT_MS + SLOT_MS / 2,
            end_ms: 1_012 * SLOT_MS + SLOT_MS / 2,
            requests: 1_200,
        };
        let mut rng = Rng::new(1);
        let mut next = 0;
        let sent: Vec<u64> = (998..1_016)
            .map(|slot| {
                burst_requests_in_slot(&[burst], &mut next, slot * SLOT_MS, SLOT_MS, &mut rng)
            })
            .collect();
        assert_eq!(sent.iter().sum::<u64>(), 1_200);
        assert_eq!(&sent[..2], [0, 0]);
        assert_eq!(sent[2], 50, "half a slot of a 100-per-slot burst");
        assert_eq!(sent[3], 100);
        assert_eq!(&sent[15..], [0, 0, 0]);
    }

    #[test]
    fn every_key_kind_lands_in_its_row() {
        assert_eq!(row_of(Access::PayAsYouGo, None), Row::PayAsYouGo);
        assert_eq!(
            row_of(Access::Individual, Some(PlanId(3))),
            Row::Plan(PlanId(3))
        );
        assert_eq!(row_of(Access::CreditsOnly, None), Row::NoSeat);
        assert_eq!(row_of(Access::Unseated, None), Row::NoSeat);
    }
}
