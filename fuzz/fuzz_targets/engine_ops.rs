//! Arbitrary sequences of engine operations on the shipped policy, against invariants a simple
//! model can check: no panic; a team's credits equal top-ups minus charges plus refunds; no limit
//! of any key is ever reported above the largest amount it had on any plan the key held (usage
//! counted stays counted when a seat is downgraded; usage added by corrections aside); a
//! repeated request id never counts twice; a revoked key is never admitted again (but for a
//! repeat of a request id it had admitted), it is still reported with its usage, and its member
//! is given a new key only once it is revoked; an operation refused or denied, a repeat of a
//! request id and a check leave the key's usage report (its limits' usage, its team's credits,
//! its open reservations) as it was.
//!
//! An input is 3-byte operations: the first byte picks the operation (`op % 10`, but 240..=245,
//! added with key revocation and used by no corpus entry before, which revoke a key or give
//! its member a new one), the next two its arguments.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tally_engine::{
    AdjustmentDirection, ChargedTo, Decision, Engine, EngineOptions, ManualClock, Policy, SettleOutcome, Unit,
    DenialReason, UsageRequest,
};

const T0_MS: u64 = 1_795_363_200_000;
const PLANS: [&str; 6] = ["Starter", "Plus", "Max", "Plus-Highspeed", "Bar-Plus", "Ultra-Highspeed"];
const RESOURCES: [(&str, &[(Unit, u64)]); 6] = [
    ("m2.7", &[(Unit::Requests, 1)]),
    ("m2.7-highspeed", &[(Unit::Requests, 1), (Unit::Tokens, 900)]),
    ("speech-2.8", &[(Unit::Characters, 700)]),
    ("image-01", &[(Unit::Images, 2)]),
    ("music-2.6", &[(Unit::Songs, 1), (Unit::Seconds, 240)]),
    ("hailuo-2.3-768p-6s", &[(Unit::Videos, 1)]),
];

struct World {
    engine: Engine,
    at_ms: u64,
    credits: HashMap<String, i128>,
    /// Open reservations: each with the team whose credits it holds, the credits it holds and
    /// when its lease ends.
    reservations: Vec<(tally_engine::ReservationId, String, u64, u64)>,
    adjusted: bool,
    /// Request ids already answered: a repeat returns the first decision and charges nothing.
    answered: HashSet<String>,
    /// The plans each user's key has held.
    held: [Vec<&'static str>; 3],
    /// Each user's key in their Default Team: `k{user}`, then `k{user}.{n}` for the n-th key
    /// given in place of a revoked one.
    keys: [String; 3],
    /// How many keys each user was given in place of a revoked one.
    rotations: [u32; 3],
    /// Every key revoked so far.
    revoked: HashSet<String>,
    /// Keys replaced by a new one, with their user and the plans they held (their usage stays
    /// bounded too).
    retired: Vec<(usize, String, Vec<&'static str>)>,
    /// The key of each reservation opened.
    reserved_keys: HashMap<tally_engine::ReservationId, String>,
}

fuzz_target!(|data: &[u8]| {
    // Time moves only by the operations' stamps (the clock stays at T0_MS): no bound on how far
    // ahead of it they may be (opted out of the default, a day).
    let options = EngineOptions { max_ahead_of_clock_ms: 0, ..EngineOptions::default() };
    let engine = Engine::new(Policy::token_plan(), Arc::new(ManualClock::new(T0_MS)), options).expect("valid options");
    let mut world = World { engine, at_ms: T0_MS, credits: HashMap::new(), reservations: Vec::new(), adjusted: false, answered: HashSet::new(), held: Default::default(), keys: ["k0".into(), "k1".into(), "k2".into()], rotations: [0; 3], revoked: HashSet::new(), retired: Vec::new(), reserved_keys: HashMap::new() };
    for user in 0..3 {
        let name = format!("u{user}");
        world.engine.create_user(&name, &format!("k{user}"), Some(T0_MS)).expect("a fresh user");
        world.credits.insert(format!("@{name}"), 0);
    }
    for chunk in data.chunks(3).take(2_000) {
        let [op, a, b] = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        step(&mut world, op, a, b);
    }
    // The usage reports the check reads expire the leases ended by then: the model first.
    let as_of_ms = world.at_ms.min(T0_MS);
    expire(&mut world, as_of_ms);
    world.engine.expire_reservations(Some(as_of_ms)).expect("no log to fail");
    check_invariants(&world);
});

fn step(world: &mut World, op: u8, a: u8, b: u8) {
    let user = usize::from(a % 3);
    let key = world.keys[user].clone();
    let team = format!("@u{user}");
    if (240..=245).contains(&op) {
        return revoke_or_rotate(world, user, op >= 243, b);
    }
    let revoked = world.revoked.contains(&key);
    let (resource, quantities) = RESOURCES[usize::from(b) % RESOURCES.len()];
    // What the key's usage report (its limits' usage, its team's credits) was before the
    // operation: one refused, denied, replayed or only a check must leave it as it was.
    let before = matches!(op % 10, 0 | 1 | 4 | 5 | 6 | 9).then(|| usage_now(world, &key));
    let engine = &world.engine;
    match op % 10 {
        0 => {
            let plan = PLANS[usize::from(b) % PLANS.len()];
            if engine.assign_seat(&team, &format!("u{user}"), plan, Some(world.at_ms)).is_ok() {
                world.held[user].push(plan);
            } else {
                assert_unchanged(world, &key, before, "a refused assign_seat");
            }
        }
        1 => {
            let micros = u64::from(b) * 10_000 + 1;
            if engine.top_up(&team, micros, Some(world.at_ms)).is_ok() {
                *world.credits.entry(team).or_default() += i128::from(micros);
            } else {
                assert_unchanged(world, &key, before, "a refused top_up");
            }
        }
        2 => world.at_ms += u64::from(b) * 61_000,
        3 => world.at_ms = world.at_ms.saturating_sub(u64::from(b) * 1_000), // a stepped clock
        4 | 5 => {
            let id = format!("r{}", b % 16);
            let request = UsageRequest::new(&key, resource, quantities).at(world.at_ms);
            let with_id = op % 2 == 0;
            let request = if with_id { request.id(&id) } else { request };
            let open = engine.open_reservations();
            let consumed = engine.consume(&request);
            let mut changes = false;
            if let Ok(decision) = consumed {
                let repeat = with_id && world.answered.contains(&id);
                if revoked && !repeat {
                    assert_revoked_denial(&key, &decision);
                }
                // A repeat of a request id answers as the first did and counts nothing again.
                changes = !repeat && matches!(decision, Decision::Admitted(_));
                // A denial for a revoked key is not remembered under its id (the engine keeps
                // nothing for a caller without a valid key): sent again, the id is decided
                // anew, e.g. on the member's new key after a rotation.
                let remembered = !matches!(&decision, Decision::Denied(denial) if denial.reason == DenialReason::KeyRevoked);
                if with_id && remembered {
                    world.answered.insert(id);
                }
                if !repeat {
                    account(world, &team, decision);
                }
            }
            follow_expiry(world, open);
            if !changes && world.engine.open_reservations() == open {
                assert_unchanged(world, &key, before, "a consume refused, denied or repeated");
            }
        }
        6 => {
            let open = engine.open_reservations();
            let checked = engine.check(&UsageRequest::new(&key, resource, quantities).at(world.at_ms));
            if let (true, Ok(decision)) = (revoked, &checked) {
                assert_revoked_denial(&key, decision);
            }
            follow_expiry(world, open);
            if world.engine.open_reservations() == open {
                assert_unchanged(world, &key, before, "a check");
            }
        }
        7 => {
            let request = UsageRequest::new(&key, resource, quantities).at(world.at_ms);
            let lease_ms = u64::from(b) * 10_000 + 1;
            // A reserve first expires the leases that ended by the clock's now (which stays at
            // T0 here), or by its own stamp if that is earlier.
            expire(world, world.at_ms.min(T0_MS));
            if let Ok(outcome) = world.engine.reserve(&request, Some(lease_ms)) {
                if revoked {
                    assert_revoked_denial(&key, &outcome.decision);
                    assert!(outcome.reservation.is_none(), "{key} revoked: a reservation opened");
                }
                let held = match &outcome.decision {
                    Decision::Admitted(admission) => match admission.charged_to {
                        ChargedTo::Credits { micros } => micros,
                        _ => 0,
                    },
                    Decision::Denied(_) => 0,
                };
                account(world, &team, outcome.decision);
                let expires_at_ms = world.at_ms + lease_ms;
                world.reserved_keys.extend(outcome.reservation.map(|id| (id, key.clone())));
                world.reservations.extend(outcome.reservation.map(|id| (id, team, held, expires_at_ms)));
            }
        }
        8 => {
            // The reservation's own team: the one whose credits a settle or void moves, which
            // need not be this step's user.
            if let Some((id, team, held, expires_at_ms)) = world.reservations.pop() {
                if b % 2 == 0 && expires_at_ms <= world.at_ms {
                    // Settling a reservation whose lease has ended expires it, and the others
                    // whose lease ended by the clock's now (T0 here), or by the settle's stamp
                    // if that is earlier: a late stamp does not expire everyone's.
                    *world.credits.entry(team.clone()).or_default() += i128::from(held);
                    expire(world, world.at_ms.min(T0_MS));
                    let settled = world.engine.settle(id, &quantities[..1], Some(world.at_ms));
                    assert!(
                        matches!(settled, Err(tally_engine::Error::ReservationClosed { state: "expired", .. })),
                        "a settle after the lease: {settled:?}"
                    );
                    return;
                }
                let before = engine.credits_micros(&team).unwrap_or(0);
                let open_before = engine.open_reservations();
                let settled = if b % 2 == 0 {
                    engine.settle(id, &quantities[..1], Some(world.at_ms)).map(|outcome| matches!(outcome, SettleOutcome::Settled(_)))
                } else {
                    engine.void(id, Some(world.at_ms)).map(|()| true)
                };
                let _ = settled;
                let after = engine.credits_micros(&team).unwrap_or(0);
                // A settle refused (the extra did not fit, or the actual units are not the
                // resource's) leaves the reservation open, still holding its credits.
                let still_open = engine.open_reservations() == open_before;
                // Give-backs and extra charges on settle move this team's credits.
                *world.credits.entry(team.clone()).or_default() += i128::from(after) - i128::from(before);
                // A revoked key's settle charges no extra beyond its hold: its credits only come back.
                if world.reserved_keys.get(&id).is_some_and(|key| world.revoked.contains(key)) {
                    assert!(after >= before, "a revoked key's settle charged {} more micros", before - after);
                }
                if still_open {
                    assert_eq!(after, before, "a refused settle moves no credits");
                    world.reservations.push((id, team, held, expires_at_ms));
                }
            }
        }
        _ => {
            let direction = if b % 2 == 0 { AdjustmentDirection::Remove } else { AdjustmentDirection::Add };
            if engine.adjust_usage(&key, resource, quantities, world.at_ms, direction, Some(world.at_ms)).is_ok() {
                world.adjusted |= direction == AdjustmentDirection::Add;
            } else {
                assert_unchanged(world, &key, before, "a refused adjust_usage");
            }
        }
    }
}

/// Revokes the user's key (and checks that an unknown key is refused), or gives the user a new
/// key in its place (`rotate`); stamped at the run's time, or `b` seconds before it.
fn revoke_or_rotate(world: &mut World, user: usize, rotate: bool, b: u8) {
    let at_ms = if b.is_multiple_of(2) { world.at_ms } else { world.at_ms.saturating_sub(u64::from(b) * 1_000) };
    let key = world.keys[user].clone();
    let was_revoked = world.revoked.contains(&key);
    if !rotate {
        let now = world.engine.revoke_key(&key, Some(at_ms)).expect("a known key revokes");
        assert_eq!(now, !was_revoked, "{key}: revoke_key says whether it revoked it now");
        world.revoked.insert(key);
        let unknown = format!("nokey{user}");
        let refused = world.engine.revoke_key(&unknown, Some(world.at_ms));
        assert!(matches!(refused, Err(tally_engine::Error::UnknownKey { .. })), "{unknown}: {refused:?}");
        return;
    }
    let new_key = format!("k{user}.{}", world.rotations[user] + 1);
    match world.engine.add_member(&format!("@u{user}"), &format!("u{user}"), &new_key, Some(at_ms)) {
        Ok(()) => {
            assert!(was_revoked, "{key} works, yet its member was given {new_key} in its place");
            world.rotations[user] += 1;
            world.keys[user] = new_key;
            let held = std::mem::take(&mut world.held[user]);
            world.retired.push((user, key, held));
        }
        Err(tally_engine::Error::AlreadyExists { .. }) => {
            assert!(!was_revoked, "{key} revoked, yet its member could not be given {new_key}")
        }
        Err(error) => panic!("{new_key} for u{user}: {error}"),
    }
}

/// The key's usage report as of the run's time (the model first expires the leases the report
/// expires: those ended by then and by the clock's now, T0 here).
fn usage_now(world: &mut World, key: &str) -> tally_engine::UsageReport {
    expire(world, world.at_ms.min(T0_MS));
    world.engine.usage(key, Some(world.at_ms)).expect("a known key")
}

/// The key's usage report is as it was `before` the operation (its limits' usage, its team's
/// credits, its reservations).
fn assert_unchanged(world: &mut World, key: &str, before: Option<tally_engine::UsageReport>, what: &str) {
    let before = before.expect("a report taken before the operation");
    let after = usage_now(world, key);
    assert_eq!(after, before, "{what} changed {key}'s usage report");
}

/// A fresh decision on a revoked key: denied for that and nothing else.
fn assert_revoked_denial(key: &str, decision: &Decision) {
    match decision {
        Decision::Denied(denial) => {
            assert_eq!(denial.reason, DenialReason::KeyRevoked, "{key} revoked: denied for another reason")
        }
        Decision::Admitted(admission) => panic!("{key} revoked, yet admitted: {admission:?}"),
    }
}

/// A consume or check that a hold denied expires first the leases that ended by its time and
/// the clock's (which stays at T0 here), all of them: when the engine's open reservations fell
/// from `open_before`, the model expires the same.
fn follow_expiry(world: &mut World, open_before: usize) {
    if world.engine.open_reservations() < open_before {
        expire(world, world.at_ms.min(T0_MS));
    }
    assert_eq!(world.engine.open_reservations(), world.reservations.len(), "open reservations");
}

/// Gives back the credits of every reservation whose lease ended by `at_ms`, as the engine
/// expires them.
fn expire(world: &mut World, at_ms: u64) {
    let (ended, open): (Vec<_>, Vec<_>) =
        world.reservations.drain(..).partition(|&(_, _, _, expires_at_ms)| expires_at_ms <= at_ms);
    world.reservations = open;
    for (_, team, held, _) in ended {
        *world.credits.entry(team).or_default() += i128::from(held);
    }
}

fn account(world: &mut World, team: &str, decision: Decision) {
    if let Decision::Admitted(admission) = decision {
        if let ChargedTo::Credits { micros } = admission.charged_to {
            *world.credits.entry(team.into()).or_default() -= i128::from(micros);
        }
    }
}

fn check_invariants(world: &World) {
    for user in 0..3 {
        let team = format!("@u{user}");
        let balance = world.engine.credits_micros(&team).expect("a known team");
        let expected = world.credits.get(&team).copied().unwrap_or(0);
        assert_eq!(i128::from(balance), expected, "{team}: credits differ from top-ups minus charges");
    }
    let current = (0..3).map(|user| (user, world.keys[user].clone(), world.held[user].clone()));
    for (user, key, held) in current.chain(world.retired.iter().cloned()) {
        // A revoked key's usage still counts: the engine still reports it.
        let report = world.engine.usage(&key, Some(world.at_ms)).expect("a known key");
        assert_eq!(report.key, key, "user {user}'s key");
        assert_eq!(report.revoked, world.revoked.contains(&key), "{key}: revoked in its usage report");
        if !world.adjusted {
            let policy = world.engine.policy();
            for limit in &report.limits {
                // The largest amount this limit had on any plan the key held.
                let largest = held
                    .iter()
                    .filter_map(|plan| policy.plan_id(plan))
                    .flat_map(|plan| policy.plan(plan).limits.iter())
                    .filter(|held| *held.name == *limit.name)
                    .map(|held| held.amount)
                    .max()
                    .unwrap_or(0);
                assert!(limit.used <= largest.max(limit.amount), "{} over its amount: {limit:?}", report.key);
            }
        }
    }
}
