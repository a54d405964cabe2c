//! The cast of a simulation: who holds which key, on which plan, in which team, with whose
//! credits, and when the heavy users burst. Built once, in the engine and here, before any
//! traffic runs.

use tally_engine::calendar::CalendarPeriod;
use tally_engine::policy::{Limit, Plan};
use tally_engine::{Engine, Error, PlanId, Policy, ResourceId, Unit};

use crate::rng::Rng;
use crate::traffic::{burst_requests_to_exhaust, Catalog};

pub const MINUTE_MS: u64 = 60_000;
pub const HOUR_MS: u64 = 60 * MINUTE_MS;
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// One heavy burst may send at most this many requests: it bounds a run's cost, and plans whose
/// windows hold more than this (Max, Ultra) simply are not exhausted by it.
pub const MAX_BURST_REQUESTS: u64 = 8_000;
/// Every this many rounds of seating (one key per plan a round), a round of heavy users.
const HEAVY_EVERY_ROUNDS: u64 = 64;
/// Named teams: one per this many keys, within the bounds below.
const KEYS_PER_TEAM: u64 = 250;
const MIN_TEAMS: u64 = 3;
const MAX_TEAMS: u64 = 12;
const TEAM_NAMES: [&str; MAX_TEAMS as usize] = [
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "soylent",
    "tyrell",
    "wayne",
    "stark",
    "wonka",
    "cyberdyne",
    "aperture",
];
/// Whether `engine` already holds a run's accounts: every run creates the first named team
/// first, so a second run on the same database would be refused at its first account.
pub fn already_built(engine: &Engine) -> bool {
    engine.credits_micros(TEAM_NAMES[0]).is_ok()
}

/// The burst for a scripted seat change straddles the change by this much on each side.
const SEAT_CHANGE_BURST_HALF_MS: u64 = 90 * MINUTE_MS;
const MICROS_PER_CREDIT: u64 = 1_000_000;

const _: () = assert!(TEAM_NAMES.len() as u64 == MAX_TEAMS && MIN_TEAMS <= MAX_TEAMS);
// The first keys are scripted (see `SCRIPTED`): the smallest run must hold them all.
const _: () = assert!(SCRIPTED.len() as u64 <= crate::cli::MIN_KEYS);

/// How a key reaches paid resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// A plan key in the user's Default Team, with a seat bought for themselves.
    Individual,
    /// A plan key in a named team, with a seat the team assigned.
    TeamSeat,
    /// A plan key in a named team that has credits but gave this member no seat.
    CreditsOnly,
    /// A plan key with neither a seat nor credits: every call is refused.
    Unseated,
    /// A pay-as-you-go key: never draws on plan quota or credits.
    PayAsYouGo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appetite {
    Light,
    Regular,
    Heavy,
}

impl Appetite {
    /// Thousandths of a request per hour at the busiest local hours.
    pub fn milli_requests_per_hour(self) -> u64 {
        match self {
            Appetite::Light => 400,
            Appetite::Regular => 4_000,
            Appetite::Heavy => 20_000,
        }
    }
}

/// A team's credits policy in the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeamRole {
    /// Bought plenty up front.
    Corporate,
    /// Bought a little and never tops up: runs dry.
    Shoestring,
    /// Tops up whenever the balance falls below a quarter of its first purchase.
    Prepaid,
}

/// A stretch of simulated time in which a key sends `requests` evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Burst {
    pub start_ms: u64,
    pub end_ms: u64,
    pub requests: u64,
}

#[derive(Debug, Clone)]
pub struct Actor {
    pub key: String,
    pub user: String,
    pub access: Access,
    pub appetite: Appetite,
    /// The seat now (seat changes move it).
    pub plan: Option<PlanId>,
    pub chat: ResourceId,
    /// Index into `Scenario::accounts` of the team whose credits this key draws on.
    pub account: Option<usize>,
    /// Sorted, non-overlapping.
    pub bursts: Vec<Burst>,
    pub rng: Rng,
}

/// A team holding credits: a named team, or a user's Default Team.
#[derive(Debug, Clone)]
pub struct CreditAccount {
    pub team: String,
    /// `None` for a Default Team.
    pub role: Option<TeamRole>,
    pub members: u64,
    pub seated: u64,
    pub credits_only: u64,
    pub initial_micros: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatChangeKind {
    Upgrade,
    Downgrade,
}

/// A seat change the scenario makes mid-window, during the key's burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeatChange {
    pub kind: SeatChangeKind,
    pub actor: usize,
    pub from: PlanId,
    pub to: PlanId,
    pub at_ms: u64,
}

/// A team member's key that leaks halfway through the run: revoked then, and the member given
/// a new key in its place on the same seat; whoever holds the old one goes on sending.
#[derive(Debug, Clone)]
pub struct KeyRotation {
    pub actor: usize,
    /// The team the key is in.
    pub team: String,
    pub new_key: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub actors: Vec<Actor>,
    pub accounts: Vec<CreditAccount>,
    pub seat_changes: Vec<SeatChange>,
    pub rotation: Option<KeyRotation>,
    pub users: u64,
    pub engine_keys: u64,
}

/// The simulation's shape, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub keys: u64,
    pub days: u64,
    pub seed: u64,
    pub start_ms: u64,
    pub slot_ms: u64,
}

impl Shape {
    pub fn end_ms(&self) -> u64 {
        self.start_ms + self.days * DAY_MS
    }
}

/// What the first keys are, so even the smallest run has one of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Plain(Access),
    Scripted(SeatChangeKind),
}

const SCRIPTED: [Role; 7] = [
    Role::Plain(Access::TeamSeat),
    Role::Plain(Access::CreditsOnly),
    Role::Plain(Access::PayAsYouGo),
    Role::Plain(Access::Unseated),
    Role::Plain(Access::CreditsOnly),
    Role::Scripted(SeatChangeKind::Upgrade),
    Role::Scripted(SeatChangeKind::Downgrade),
];

/// Builds the accounts in `engine` and returns who sends what.
pub fn build(engine: &Engine, policy: &Policy, shape: &Shape) -> Result<Scenario, Error> {
    let mut builder = Builder::new(engine, policy, shape)?;
    let mut roles = Rng::stream(shape.seed, u64::from_le_bytes(*b"roles\0\0\0"));
    let seated_first = SCRIPTED.len() as u64 + policy.plans().len() as u64;
    for index in 0..shape.keys {
        let role = match SCRIPTED.get(index as usize) {
            Some(role) => *role,
            // Then a seat on each plan (its first, heavy, user), alternating individual and team.
            None if index < seated_first && index % 2 == 0 => Role::Plain(Access::Individual),
            None if index < seated_first => Role::Plain(Access::TeamSeat),
            None => Role::Plain(random_access(&mut roles)),
        };
        builder.add_actor(index, role)?;
    }
    builder.top_up_teams()?;
    builder.script_rotation();
    Ok(builder.finish())
}

fn random_access(rng: &mut Rng) -> Access {
    match rng.below(1_000) {
        0..=11 => Access::PayAsYouGo,
        12..=41 => Access::Unseated,
        42..=81 => Access::CreditsOnly,
        82..=281 => Access::TeamSeat,
        _ => Access::Individual,
    }
}

struct Builder<'a> {
    engine: &'a Engine,
    policy: &'a Policy,
    shape: &'a Shape,
    catalog: Catalog,
    named_teams: usize,
    /// Keys seated round-robin so far: decides plan and appetite.
    seated: u64,
    team_members: u64,
    engine_keys: u64,
    first_midnight_ms: u64,
    upgrade: Option<(PlanId, PlanId)>,
    downgrade: Option<(PlanId, PlanId)>,
    scenario: Scenario,
}

impl<'a> Builder<'a> {
    fn new(engine: &'a Engine, policy: &'a Policy, shape: &'a Shape) -> Result<Self, Error> {
        let named_teams = (shape.keys / KEYS_PER_TEAM).clamp(MIN_TEAMS, MAX_TEAMS) as usize;
        let mut accounts = Vec::new();
        for (index, name) in TEAM_NAMES.iter().take(named_teams).enumerate() {
            engine.create_team(name, Some(shape.start_ms))?;
            accounts.push(CreditAccount {
                team: (*name).to_string(),
                role: Some(match index {
                    0 => TeamRole::Corporate,
                    1 => TeamRole::Shoestring,
                    _ => TeamRole::Prepaid,
                }),
                members: 0,
                seated: 0,
                credits_only: 0,
                initial_micros: 0,
            });
        }
        let catalog = Catalog::new(policy);
        Ok(Builder {
            engine,
            policy,
            shape,
            upgrade: upgrade_pair(policy, &catalog),
            downgrade: downgrade_pair(policy, &catalog),
            catalog,
            named_teams,
            seated: 0,
            team_members: 0,
            engine_keys: 0,
            first_midnight_ms: policy
                .calendar()
                .period_of(CalendarPeriod::Daily, shape.start_ms)
                .end_ms,
            scenario: Scenario {
                actors: Vec::new(),
                accounts,
                seat_changes: Vec::new(),
                rotation: None,
                users: 0,
                engine_keys: 0,
            },
        })
    }

    fn add_actor(&mut self, index: u64, role: Role) -> Result<(), Error> {
        let at = Some(self.shape.start_ms);
        let user = format!("u{index:06}");
        let default_key = format!("tp-{user}");
        self.engine.create_user(&user, &default_key, at)?;
        self.scenario.users += 1;
        self.engine_keys += 1;
        let mut actor = Actor {
            key: default_key,
            user,
            access: Access::Unseated,
            appetite: Appetite::Regular,
            plan: None,
            chat: self.catalog.chat_for(None),
            account: None,
            bursts: Vec::new(),
            // The key's own stream: its setup draws and then its traffic.
            rng: Rng::stream(self.shape.seed, index),
        };
        match role {
            Role::Scripted(kind) => self.script_seat_change(&mut actor, kind)?,
            Role::Plain(access) => self.give_access(&mut actor, access)?,
        }
        self.scenario.actors.push(actor);
        Ok(())
    }

    fn give_access(&mut self, actor: &mut Actor, access: Access) -> Result<(), Error> {
        let at = Some(self.shape.start_ms);
        actor.access = access;
        match access {
            Access::Individual => {
                self.seat_round_robin(actor, &format!("@{}", actor.user))?;
                // One individual in ten also bought credits for their Default Team.
                if actor.rng.chance(100_000) {
                    actor.account = Some(self.default_team_account(&actor.user)?);
                }
            }
            Access::TeamSeat | Access::CreditsOnly => {
                let team = (self.team_members % self.named_teams as u64) as usize;
                self.team_members += 1;
                let name = self.scenario.accounts[team].team.clone();
                actor.key = format!("tp-{name}-{}", actor.user);
                self.engine.add_member(&name, &actor.user, &actor.key, at)?;
                self.engine_keys += 1;
                actor.account = Some(team);
                let account = &mut self.scenario.accounts[team];
                account.members += 1;
                if access == Access::TeamSeat {
                    account.seated += 1;
                    self.seat_round_robin(actor, &name)?;
                } else {
                    account.credits_only += 1;
                }
            }
            Access::Unseated => {}
            Access::PayAsYouGo => {
                actor.key = format!("pg-{}", actor.user);
                self.engine.create_payg_key(&actor.user, &actor.key, at)?;
                self.engine_keys += 1;
            }
        }
        Ok(())
    }

    /// Seats the key on the next plan in turn; every `HEAVY_EVERY_ROUNDS` rounds the whole round
    /// is heavy, so each plan has its heavy users (the first round included: small runs too).
    fn seat_round_robin(&mut self, actor: &mut Actor, team: &str) -> Result<(), Error> {
        let plans = self.policy.plans().len() as u64;
        let plan = PlanId((self.seated % plans) as u16);
        let round = self.seated / plans;
        self.seated += 1;
        self.seat(actor, team, plan)?;
        actor.appetite = if round % HEAVY_EVERY_ROUNDS == 0 {
            Appetite::Heavy
        } else if actor.rng.chance(500_000) {
            Appetite::Light
        } else {
            Appetite::Regular
        };
        if actor.appetite == Appetite::Heavy {
            let needed = self.requests_to_exhaust(actor.plan, actor.chat);
            let straddle_midnight = self.seated % 2 == 0;
            actor.bursts = self.daily_bursts(needed, straddle_midnight, &mut actor.rng);
        }
        Ok(())
    }

    fn seat(&mut self, actor: &mut Actor, team: &str, plan: PlanId) -> Result<(), Error> {
        let name = &self.policy.plan(plan).name;
        self.engine
            .assign_seat(team, &actor.user, name, Some(self.shape.start_ms))?;
        actor.plan = Some(plan);
        actor.chat = self.catalog.chat_for(Some(self.policy.plan(plan)));
        Ok(())
    }

    /// One burst a day at a random time, sized to go a fifth to a half past the `needed` calls
    /// that fill the plan's rolling chat limit (within `MAX_BURST_REQUESTS`). With
    /// `straddle_midnight` the first burst straddles the first local midnight, so daily quotas
    /// used up before it are seen to reset after it.
    fn daily_bursts(&self, needed: u64, straddle_midnight: bool, rng: &mut Rng) -> Vec<Burst> {
        (0..self.shape.days)
            .map(|day| {
                let duration_ms = rng.between(60, 150) * MINUTE_MS;
                let random_start_ms =
                    self.shape.start_ms + day * DAY_MS + rng.below(DAY_MS - duration_ms);
                let start_ms = match self.first_midnight_ms.checked_sub(duration_ms / 2) {
                    Some(start_ms) if day == 0 && straddle_midnight => {
                        start_ms.max(self.shape.start_ms)
                    }
                    _ => random_start_ms,
                };
                let requests = (needed * rng.between(120, 150) / 100).min(MAX_BURST_REQUESTS);
                Burst {
                    start_ms,
                    end_ms: start_ms + duration_ms,
                    requests,
                }
            })
            .collect()
    }

    fn requests_to_exhaust(&self, plan: Option<PlanId>, chat: ResourceId) -> u64 {
        const WITHOUT_ROLLING_LIMIT: u64 = 500;
        plan.and_then(|plan| burst_requests_to_exhaust(self.policy.plan(plan), chat))
            .unwrap_or(WITHOUT_ROLLING_LIMIT)
    }

    /// The first team member with a seat leaks its key halfway through the run (at the start of
    /// a slot).
    fn script_rotation(&mut self) {
        let Some((actor, account)) =
            self.scenario
                .actors
                .iter()
                .enumerate()
                .find_map(|(index, actor)| match (actor.access, actor.account) {
                    (Access::TeamSeat, Some(account)) => Some((index, account)),
                    _ => None,
                })
        else {
            return;
        };
        let half_ms = self.shape.days * DAY_MS / 2;
        self.scenario.rotation = Some(KeyRotation {
            actor,
            team: self.scenario.accounts[account].team.clone(),
            new_key: format!("{}-2", self.scenario.actors[actor].key),
            at_ms: self.shape.start_ms + half_ms / self.shape.slot_ms * self.shape.slot_ms,
        });
    }

    /// A heavy individual whose seat changes mid-burst: an upgrade after the window is used up
    /// (the rest of the burst fits the bigger plan), or a downgrade to a plan smaller than what
    /// was already used (the rest is refused until usage ages out).
    fn script_seat_change(&mut self, actor: &mut Actor, kind: SeatChangeKind) -> Result<(), Error> {
        let pair = match kind {
            SeatChangeKind::Upgrade => self.upgrade,
            SeatChangeKind::Downgrade => self.downgrade,
        };
        let Some((from, to)) = pair else {
            // The policy has no such pair of plans: this key is an ordinary individual.
            return self.give_access(actor, Access::Individual);
        };
        actor.access = Access::Individual;
        self.seat(actor, &format!("@{}", actor.user), from)?;
        let run_ms = self.shape.days * DAY_MS;
        let fifths = if kind == SeatChangeKind::Upgrade {
            2
        } else {
            3
        };
        let offset_ms = run_ms * fifths / 5 / self.shape.slot_ms * self.shape.slot_ms;
        let at_ms = self.shape.start_ms + offset_ms.max(SEAT_CHANGE_BURST_HALF_MS);
        let needed_from = self.requests_to_exhaust(Some(from), actor.chat);
        let before_change = match kind {
            // A tenth of a burst is not chat: 13/10 of the window in calls fills it before.
            SeatChangeKind::Upgrade => needed_from * 13 / 10,
            SeatChangeKind::Downgrade => {
                let needed_to = self.requests_to_exhaust(Some(to), actor.chat);
                (needed_to * 3).min(needed_from * 3 / 4)
            }
        };
        actor.bursts = vec![Burst {
            start_ms: at_ms - SEAT_CHANGE_BURST_HALF_MS,
            end_ms: at_ms + SEAT_CHANGE_BURST_HALF_MS,
            requests: before_change * 2,
        }];
        self.scenario.seat_changes.push(SeatChange {
            kind,
            actor: self.scenario.actors.len(),
            from,
            to,
            at_ms,
        });
        Ok(())
    }

    fn default_team_account(&mut self, user: &str) -> Result<usize, Error> {
        const DEFAULT_TEAM_CREDITS_MICROS: u64 = 2 * MICROS_PER_CREDIT;
        let team = format!("@{user}");
        self.engine.top_up(
            &team,
            DEFAULT_TEAM_CREDITS_MICROS,
            Some(self.shape.start_ms),
        )?;
        self.scenario.accounts.push(CreditAccount {
            team,
            role: None,
            members: 1,
            seated: 1,
            credits_only: 0,
            initial_micros: DEFAULT_TEAM_CREDITS_MICROS,
        });
        Ok(self.scenario.accounts.len() - 1)
    }

    /// The named teams' first purchase, sized by their members.
    fn top_up_teams(&mut self) -> Result<(), Error> {
        for account in self.scenario.accounts.iter_mut() {
            let Some(role) = account.role else { continue };
            let per_member_micros = match role {
                TeamRole::Corporate => 20 * MICROS_PER_CREDIT,
                TeamRole::Shoestring => MICROS_PER_CREDIT / 5,
                TeamRole::Prepaid => 3 * MICROS_PER_CREDIT / 2,
            };
            account.initial_micros = per_member_micros * account.members.max(1);
            self.engine.top_up(
                &account.team,
                account.initial_micros,
                Some(self.shape.start_ms),
            )?;
        }
        Ok(())
    }

    fn finish(mut self) -> Scenario {
        // The rotation's new key is made during the run.
        self.scenario.engine_keys = self.engine_keys + u64::from(self.scenario.rotation.is_some());
        self.scenario
    }
}

/// The rolling limit chat moves on `plan`, and whether it counts plain requests (as the
/// newer seed's plans do) rather than a priced bar.
fn chat_rolling_limit(plan: &Plan, chat: ResourceId) -> Option<(usize, &Limit, bool)> {
    plan.touches[chat.index()].iter().find_map(|touch| {
        let index = usize::from(touch.limit);
        let limit = &plan.limits[index];
        let by_requests =
            touch.weights[Unit::Requests.index()] > 0 && touch.weights[Unit::Tokens.index()] == 0;
        limit.window.shape().map(|_| (index, limit, by_requests))
    })
}

/// The smallest plan whose rolling chat limit has an upgrade (Starter -> Plus in the seed),
/// preferring plans that count requests over the priced bar.
fn upgrade_pair(policy: &Policy, catalog: &Catalog) -> Option<(PlanId, PlanId)> {
    (0..policy.plans().len())
        .filter_map(|index| {
            let plan = policy.plan(PlanId(index as u16));
            let (limit_index, limit, by_requests) =
                chat_rolling_limit(plan, catalog.chat_for(Some(plan)))?;
            let to = plan.next_bigger(limit_index)?;
            Some(((!by_requests, limit.amount), (PlanId(index as u16), to)))
        })
        .min()
        .map(|(_, pair)| pair)
}

/// The steepest downgrade on a shared rolling chat counter (Max -> Starter in the seed),
/// preferring plans that count requests over the priced bar.
fn downgrade_pair(policy: &Policy, catalog: &Catalog) -> Option<(PlanId, PlanId)> {
    let plans = policy.plans();
    let candidates = plans.iter().enumerate().flat_map(|(from_index, from)| {
        let chat_limit = chat_rolling_limit(from, catalog.chat_for(Some(from)));
        plans.iter().enumerate().filter_map(move |(to_index, to)| {
            let (_, limit, by_requests) = chat_limit?;
            let smaller = to
                .limits
                .iter()
                .find(|other| other.counter == limit.counter && other.amount < limit.amount)?;
            let steepness = limit.amount / smaller.amount.max(1);
            let pair = (PlanId(from_index as u16), PlanId(to_index as u16));
            Some(((!by_requests, std::cmp::Reverse(steepness)), pair))
        })
    });
    candidates
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, pair)| pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(policy: &Policy, pair: Option<(PlanId, PlanId)>) -> (String, String) {
        let (from, to) = pair.expect("a pair of plans");
        (
            policy.plan(from).name.to_string(),
            policy.plan(to).name.to_string(),
        )
    }

    #[test]
    fn the_seed_upgrades_starter_to_plus_and_downgrades_max_to_starter() {
        let policy = Policy::token_plan();
        let catalog = Catalog::new(&policy);
        assert_eq!(
            names(&policy, upgrade_pair(&policy, &catalog)),
            ("Starter".into(), "Plus".into())
        );
        assert_eq!(
            names(&policy, downgrade_pair(&policy, &catalog)),
            ("Max".into(), "Starter".into())
        );
    }

    #[test]
    fn the_smallest_run_has_every_kind_of_key_and_a_heavy_user_on_every_plan() {
        use std::sync::Arc;
        let policy = Policy::token_plan();
        let shape = Shape {
            keys: crate::cli::MIN_KEYS,
            days: 1,
            seed: 3,
            start_ms: 1_772_413_200_000,
            slot_ms: 300_000,
        };
        let clock = Arc::new(tally_engine::ManualClock::new(shape.start_ms));
        let engine =
            Engine::new(Policy::token_plan(), clock, Default::default()).expect("valid options");
        let scenario = build(&engine, &policy, &shape).expect("the scenario builds");
        for access in [
            Access::Individual,
            Access::TeamSeat,
            Access::CreditsOnly,
            Access::Unseated,
            Access::PayAsYouGo,
        ] {
            assert!(
                scenario.actors.iter().any(|actor| actor.access == access),
                "{access:?}"
            );
        }
        for plan in 0..policy.plans().len() {
            let heavy_on_plan = scenario.actors.iter().any(|actor| {
                actor.plan == Some(PlanId(plan as u16)) && actor.appetite == Appetite::Heavy
            });
            assert!(
                heavy_on_plan,
                "plan {}",
                policy.plan(PlanId(plan as u16)).name
            );
        }
        assert_eq!(scenario.seat_changes.len(), 2);
        assert!(scenario
            .accounts
            .iter()
            .all(|account| account.initial_micros > 0));
    }
}
