//! The entry points agree: `check` and `consume`, `consume_many`, `submit` and a reclaiming
//! engine decide the same random sequences alike; and a full reservation table answers a
//! request that could never hold a reservation as it does with room.

mod common;

use std::sync::Arc;

use common::*;
use tally_engine::{
    Decision, DenialReason, Engine, EngineOptions, Error, ManualClock, Policy, Unit, UsageRequest,
};

// ---- The entry points agree ---------------------------------------------------------------
//
// The same random sequence of requests (plan, credits-only, pay-as-you-go, revoked and unknown
// keys; request ids repeated and reused; stamps stepping back) and admin calls (seat changes,
// top-ups, revocations, refunds, policy swaps, reclaims) on four engines: `check` then `consume`,
// `consume_many` in random batches, `submit` + `complete`, and `consume` with `reclaim_idle`
// between (compared where stamps never go back: a reclaimed key counts a late stamp at the
// reclaim's time, by design). Every decision, error and usage report must agree.

const ONE_REQUEST: [(Unit, u64); 1] = [(Unit::Requests, 1)];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn setup(engine: &Engine) {
    seated(engine, "ada", "Starter");
    user(engine, "bob");
    engine.top_up("@bob", 50_000, Some(T0_MS)).unwrap();
    seated(engine, "cy", "Plus");
    engine.top_up("@cy", 30_000, Some(T0_MS)).unwrap();
    engine
        .create_payg_key("ada", "pg-ada", Some(T0_MS))
        .unwrap();
    seated(engine, "dee", "Starter");
    engine.revoke_key("tp-dee", Some(T0_MS)).unwrap();
    engine.create_team("acme", Some(T0_MS)).unwrap();
    engine
        .add_member("acme", "bob", "acme-bob", Some(T0_MS))
        .unwrap();
    engine.top_up("acme", 200_000, Some(T0_MS)).unwrap();
}

fn new_engine() -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0_MS));
    let options = EngineOptions {
        reclaim_idle_every_ms: 0,
        // Small: a full table's refusals are among what the entry points must agree on.
        idempotency_capacity: 8,
        ..EngineOptions::default()
    };
    let engine = Engine::new(Policy::token_plan(), clock.clone(), options).unwrap();
    setup(&engine);
    (engine, clock)
}

#[derive(Clone, Debug)]
struct Req {
    key: &'static str,
    resource: &'static str,
    quantities: Vec<(Unit, u64)>,
    at_ms: u64,
    id: Option<String>,
}

fn gen(rng: &mut Rng, n: usize) -> Vec<Req> {
    let keys = [
        "tp-ada", "tp-bob", "tp-cy", "pg-ada", "tp-dee", "acme-bob", "nobody",
    ];
    let mut at = T0_MS;
    let mut out = Vec::new();
    for _ in 0..n {
        match rng.below(10) {
            0 => at = at.saturating_sub(rng.below(3 * HOUR_MS)),
            1..=3 => at += rng.below(HOUR_MS),
            4 if rng.below(4) == 0 => at += 5 * HOUR_MS + rng.below(2 * DAY_MS),
            _ => {}
        }
        let key = keys[rng.below(keys.len() as u64) as usize];
        let (resource, quantities) = match rng.below(4) {
            0 | 1 => (
                "m2.7",
                if rng.below(2) == 0 {
                    vec![(Unit::Requests, 1 + rng.below(400))]
                } else {
                    vec![
                        (Unit::Requests, 1 + rng.below(3)),
                        (Unit::Tokens, 1 + rng.below(20_000)),
                    ]
                },
            ),
            2 => (
                "music-2.6",
                vec![
                    (Unit::Songs, 1 + rng.below(2)),
                    (Unit::Seconds, 1 + rng.below(400)),
                ],
            ),
            _ => ("image-01", vec![(Unit::Images, 1 + rng.below(60))]),
        };
        let id = (rng.below(3) == 0).then(|| format!("id-{}", rng.below(30)));
        out.push(Req {
            key,
            resource,
            quantities,
            at_ms: at,
            id,
        });
    }
    out
}

fn usage_request(req: &Req) -> UsageRequest<'_> {
    let mut r = UsageRequest::new(req.key, req.resource, &req.quantities).at(req.at_ms);
    if let Some(id) = &req.id {
        r = r.id(id);
    }
    r
}

#[derive(Clone, Debug)]
enum Op {
    Req(Req),
    Seat(&'static str, &'static str, Option<&'static str>, u64),
    TopUp(&'static str, u64, u64),
    Revoke(&'static str, u64),
    Reclaim(u64),
    Refund(String, u64),
    Swap(u8, u64),
}

fn variant(which: u8) -> Policy {
    use tally_engine::policy::TOKEN_PLAN_TOML;
    let text = match which {
        0 => TOKEN_PLAN_TOML.to_string(),
        1 => TOKEN_PLAN_TOML.replace(
            r#"{ resource = "m2.7", unit = "requests", amount = 1500, window = "rolling:5h" },"#,
            r#"{ resource = "m2.7", unit = "requests", amount = 300, window = "rolling:5h" },
  { resource = "image-01", unit = "images", amount = 7, window = "daily" },"#,
        ),
        _ => TOKEN_PLAN_TOML
            .replace(
                "price_micros = { images = 25000, requests = 0 }",
                "price_micros = { images = 700, requests = 0 }",
            )
            .replace(
                r#"{ resource = "music-2.6", unit = "songs", amount = 100, window = "daily" },
]

[plans.Plus]"#,
                r#"]

[plans.Plus]"#,
            ),
    };
    Policy::from_toml_str(&text).expect("valid variant")
}

fn gen_ops(rng: &mut Rng, n: usize, monotone: bool) -> Vec<Op> {
    let reqs = gen(rng, n);
    let mut ops = Vec::new();
    for mut req in reqs {
        if monotone {
            let last = ops
                .iter()
                .rev()
                .find_map(|op| match op {
                    Op::Req(r) => Some(r.at_ms),
                    _ => None,
                })
                .unwrap_or(T0_MS);
            req.at_ms = req.at_ms.max(last);
        }
        let at = req.at_ms;
        match rng.below(40) {
            0 => ops.push(Op::Seat(
                "@ada",
                "ada",
                [Some("Plus"), Some("Max"), Some("Starter"), None][rng.below(4) as usize],
                at,
            )),
            1 => ops.push(Op::Seat(
                "@cy",
                "cy",
                [Some("Plus"), Some("Bar-Plus"), Some("Plus-Highspeed"), None]
                    [rng.below(4) as usize],
                at,
            )),
            2 => ops.push(Op::Seat(
                "acme",
                "bob",
                [Some("Starter"), Some("Ultra-Highspeed"), None][rng.below(3) as usize],
                at,
            )),
            3 => ops.push(Op::TopUp(
                ["@bob", "@cy", "acme", "@ada"][rng.below(4) as usize],
                1 + rng.below(100_000),
                at,
            )),
            4 if rng.below(4) == 0 => {
                ops.push(Op::Revoke(["tp-cy", "acme-bob"][rng.below(2) as usize], at))
            }
            5 | 6 => ops.push(Op::Reclaim(at)),
            7 => ops.push(Op::Refund(format!("id-{}", rng.below(30)), at)),
            8 => ops.push(Op::Swap(rng.below(3) as u8, at)),
            _ => {}
        }
        ops.push(Op::Req(req));
    }
    ops
}

fn admin(engine: &Engine, op: &Op, reclaim: bool) -> String {
    match op {
        Op::Req(_) => unreachable!(),
        Op::Seat(team, user, Some(plan), at) => {
            format!("{:?}", engine.assign_seat(team, user, plan, Some(*at)))
        }
        Op::Seat(team, user, None, at) => {
            format!("{:?}", engine.unassign_seat(team, user, Some(*at)))
        }
        Op::TopUp(team, micros, at) => format!("{:?}", engine.top_up(team, *micros, Some(*at))),
        Op::Revoke(key, at) => format!("{:?}", engine.revoke_key(key, Some(*at))),
        Op::Reclaim(at) => {
            if reclaim {
                engine.reclaim_idle(Some(*at)).expect("reclaim");
            }
            String::new()
        }
        Op::Refund(id, at) => format!("{:?}", engine.refund(id, Some(*at))),
        Op::Swap(which, at) => format!("{:?}", engine.swap_policy(variant(*which), Some(*at))),
    }
}

fn run_differential(seed: u64, monotone: bool) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let ops = gen_ops(&mut rng, 400, monotone);
    let max_at = ops
        .iter()
        .filter_map(|op| match op {
            Op::Req(r) => Some(r.at_ms),
            _ => None,
        })
        .max()
        .unwrap();
    let engines: Vec<(Engine, Arc<ManualClock>)> = (0..4).map(|_| new_engine()).collect();
    for (_, clock) in &engines {
        clock.set_ms(max_at);
    }
    let (a, b, c, d) = (&engines[0].0, &engines[1].0, &engines[2].0, &engines[3].0);
    // a: check then consume; b: consume_many in batches; c: submit; d: consume with reclaims.
    let mut res_a = Vec::new();
    let mut res_b = Vec::new();
    let mut res_c = Vec::new();
    let mut res_d = Vec::new();
    let mut pending: Vec<&Req> = Vec::new();
    let flush = |pending: &mut Vec<&Req>, res_b: &mut Vec<Result<Decision, Error>>| {
        let batch: Vec<UsageRequest<'_>> = pending.iter().map(|r| usage_request(r)).collect();
        res_b.extend(b.consume_many(&batch));
        pending.clear();
    };
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Req(req) => {
                let checked = a.check(&usage_request(req));
                let consumed = a.consume(&usage_request(req));
                if let (Ok(x), Ok(y)) = (&checked, &consumed) {
                    assert_eq!(x, y, "seed {seed} op {i} check vs consume {req:?}");
                } else {
                    assert_eq!(
                        checked.is_ok(),
                        consumed.is_ok(),
                        "seed {seed} op {i} {req:?}: {checked:?} / {consumed:?}"
                    );
                }
                res_a.push((i, consumed));
                pending.push(req);
                if rng.below(20) == 0 {
                    flush(&mut pending, &mut res_b);
                }
                res_c.push(
                    c.submit(&usage_request(req))
                        .and_then(|s| s.complete().map(|(d, _)| d)),
                );
                res_d.push(d.consume(&usage_request(req)));
            }
            other => {
                flush(&mut pending, &mut res_b);
                let ra = admin(a, other, false);
                let rb = admin(b, other, false);
                let rc = admin(c, other, false);
                let rd = admin(d, other, true);
                assert_eq!(ra, rb, "seed {seed} op {i} {other:?}");
                assert_eq!(ra, rc, "seed {seed} op {i} {other:?}");
                if monotone {
                    assert_eq!(ra, rd, "seed {seed} op {i} {other:?} (reclaiming engine)");
                }
            }
        }
    }
    flush(&mut pending, &mut res_b);
    for (n, (i, ra)) in res_a.iter().enumerate() {
        let op = &ops[*i];
        assert_eq!(ra, &res_b[n], "seed {seed} op {i} consume vs many {op:?}");
        assert_eq!(ra, &res_c[n], "seed {seed} op {i} consume vs submit {op:?}");
        if monotone {
            assert_eq!(
                ra, &res_d[n],
                "seed {seed} op {i} consume vs reclaiming consume {op:?}"
            );
        }
    }
    for key in ["tp-ada", "tp-bob", "tp-cy", "pg-ada", "acme-bob"] {
        let ra = a.usage(key, Some(max_at)).unwrap();
        let rb = b.usage(key, Some(max_at)).unwrap();
        assert_eq!(format!("{ra:?}"), format!("{rb:?}"), "seed {seed} {key}");
        if monotone {
            let rd = d.usage(key, Some(max_at)).unwrap();
            assert_eq!(
                format!("{ra:?}"),
                format!("{rd:?}"),
                "seed {seed} {key} reclaiming"
            );
        }
    }
}

#[test]
fn consume_check_batch_and_submit_agree_on_random_sequences() {
    for seed in 1..12u64 {
        run_differential(seed, false);
    }
}

#[test]
fn a_reclaim_changes_no_decision_on_sequences_stamped_in_order() {
    for seed in 1..12u64 {
        run_differential(seed, true);
    }
}

fn engine_with_room_for_one_reservation() -> Engine {
    let options = EngineOptions {
        max_open_reservations: 1,
        ..EngineOptions::default()
    };
    Engine::new(
        Policy::token_plan(),
        Arc::new(ManualClock::new(T0_MS)),
        options,
    )
    .unwrap()
}

/// A full reservation table refuses a new reservation (`CapacityExceeded`), but a request
/// that could never hold one answers as it does with room: an unknown or a revoked key is
/// denied for its key, and an unknown resource is that error. The request-id table was made to
/// answer so (f4520d2: a gateway answers `CapacityExceeded` 503, an unknown key 401); the
/// reservation table refused all three `CapacityExceeded`, though with room none of them takes
/// a place.
#[test]
fn a_full_reservation_table_answers_a_keys_own_refusal_first() {
    for full in [false, true] {
        let engine = engine_with_room_for_one_reservation();
        let key = seated(&engine, "ada", "Starter");
        let revoked = seated(&engine, "bob", "Starter");
        engine.revoke_key(&revoked, Some(T0_MS)).expect("revoke");
        if full {
            let outcome = engine
                .reserve(
                    &UsageRequest::new(&key, "m2.7", &ONE_REQUEST).at(T0_MS),
                    None,
                )
                .expect("reserve");
            assert!(outcome.reservation.is_some());
        }
        let reserve = |key: &str, resource: &str| {
            engine.reserve(
                &UsageRequest::new(key, resource, &ONE_REQUEST).at(T0_MS),
                None,
            )
        };
        let denial = |key: &str| match reserve(key, "m2.7") {
            Ok(outcome) => {
                assert_eq!(outcome.reservation, None, "full {full}");
                reason(outcome.decision)
            }
            Err(error) => panic!("full {full}: {key} refused {error:?}"),
        };
        assert_eq!(denial("nobody"), DenialReason::UnknownKey, "full {full}");
        assert_eq!(denial(&revoked), DenialReason::KeyRevoked, "full {full}");
        assert_eq!(
            reserve(&key, "m9").map(|outcome| outcome.reservation),
            Err(Error::UnknownResource {
                resource: "m9".into()
            }),
            "full {full}"
        );
        // A usable key is still refused for want of a place.
        let refused = reserve(&key, "m2.7").map(|outcome| outcome.reservation);
        if full {
            assert_eq!(
                refused,
                Err(Error::CapacityExceeded {
                    what: "reservations",
                    capacity: 1
                })
            );
        } else {
            assert!(matches!(refused, Ok(Some(_))), "{refused:?}");
        }
    }
}
