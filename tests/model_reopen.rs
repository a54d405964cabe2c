//! A durable engine against one that never closes.
//!
//! Random sequences of consume (with and without request ids, retries included), check,
//! top-up, seat changes, time steps, reserve, settle, void, refund, policy swaps, checkpoint
//! and close-and-reopen (by `close()` or by drop) run side by side on an engine opened on a fresh
//! temporary directory and on an in-memory twin (`Engine::new`). After every step the two must
//! have answered the same thing and report the same state (every key's usage report, every
//! team's balance, the open reservations); after every reopen, the reopened engine's state must
//! equal the state just before it. Each case ends with `verify`: sound, and the last snapshot
//! equal to a replay of the log.
//!
//! Each case also draws the durability mode and how often the engine checkpoints by itself
//! (every 3 or 10 events, or practically never), so replay from the start, from a checkpoint,
//! and from an automatic checkpoint are all exercised.
//!
//! Every request id answered is retried, denied or admitted, also after it was admitted anew
//! past its horizon; consumes alternate between `consume` and `consume_many`, with and without
//! ids, whatever the checkpoint interval; credits are withdrawn as well as topped up; reports
//! are compared whole; and `verify` must find nothing, past the idempotency horizon too. (Each
//! was once a known bug kept out of the way here; `0463c78` fixed them.)
//!
//! Keys are revoked too, and members' keys rotated (revoked, then a new one given by
//! `add_member`): an operation's key is the member's key now, and requests go to revoked keys
//! as well (retried ids, `ConsumeRevoked`), so the revoked flags, the revoked keys' seats and
//! usage, and which key a member's seat changes reach must all come back from the log.
//!
//! `PROPTEST_CASES` sets the number of cases (default 64, about 10 s in debug).

mod log_support;

use std::sync::Arc;

use log_support::{
    assert_same_state, state, State, TempDir, DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tally_engine::{
    AdjustmentDirection, Decision, Durability, Engine, EngineOptions, Error, ManualClock,
    OpenOptions, Policy, ReservationId, SettleOutcome, Unit, UsageRequest,
};

/// 2026-09-22T00:00:00+08:00 minus 2 hours: cases cross a local midnight early on.
const START_MS: u64 = 1_790_000_000_000 + 8 * HOUR_MS;

const POLICY: &str = r#"
time_zone = "Asia/Shanghai"

[resources.chat]
units = ["requests", "tokens"]
price_micros = { requests = 1000, tokens = 1 }

[resources.image]
units = ["images"]
price_micros = { images = 20000 }

[meters.bar]
priced = true

[plans.Small]
limits = [
  { resource = "chat", unit = "requests", amount = 6, window = "rolling:1h", bucket = "60s" },
  { resource = "chat", unit = "requests", amount = 15, window = "daily" },
]

[plans.Big]
limits = [
  { resource = "chat", unit = "requests", amount = 20, window = "rolling:1h", bucket = "60s" },
  { resource = "image", unit = "images", amount = 3, window = "daily" },
]

# Calendar windows only: a reclaimed key has no rolling window to carry the reclaim's time.
[plans.Daily]
limits = [
  { resource = "chat", unit = "requests", amount = 12, window = "daily" },
  { resource = "image", unit = "images", amount = 2, window = "daily" },
]

[plans.Bar]
covers = ["*"]
max_open_reservations = 2
limits = [{ meter = "bar", amount = 30000, window = "rolling:2h" }]
"#;

/// The policies a case swaps between: 0 is `POLICY`; 1 changes amounts (usage carries over);
/// 2 re-buckets Small's rolling window to 2-minute buckets (its usage re-bucketed) and
/// removes Small's daily limit (its count kept, unread, in the daily counter Daily's plan
/// still has, and read again after a swap back to 0). Moving a limit to another window is
/// refused (`Policy::check_swap_to`). 3 drops the Daily plan: refused while a working key has
/// a seat on it, else it takes the revoked keys' seats on it away.
fn policy_version(version: usize) -> Policy {
    let text = match version {
        0 => POLICY.to_string(),
        1 => POLICY
            .replace("amount = 6,", "amount = 9,")
            .replace("amount = 3,", "amount = 5,"),
        3 => POLICY.replace(
            "[plans.Daily]\nlimits = [\n  \
             { resource = \"chat\", unit = \"requests\", amount = 12, window = \"daily\" },\n  \
             { resource = \"image\", unit = \"images\", amount = 2, window = \"daily\" },\n]\n",
            "",
        ),
        _ => POLICY.replace(
            "amount = 6, window = \"rolling:1h\", bucket = \"60s\" },\n  \
             { resource = \"chat\", unit = \"requests\", amount = 15, window = \"daily\" },",
            "amount = 7, window = \"rolling:1h\", bucket = \"120s\" },",
        ),
    };
    assert!(version == 0 || text != POLICY, "policy {version} differs");
    Policy::from_toml_str(&text).expect("a valid policy")
}

fn policy() -> Policy {
    policy_version(0)
}

/// Plan keys u0..u3 (own Default Teams), c0 and c1 (u0 and u1 in team crew), and a
/// pay-as-you-go key of u2: the first keys of `MEMBERS` (in the same order) and p2. An
/// operation's `key` is an index here, standing for the key that has taken its place now.
const KEYS: [&str; 7] = ["k0", "k1", "k2", "k3", "c0", "c1", "p2"];
const TEAMS: [&str; 5] = ["@u0", "@u1", "@u2", "@u3", "crew"];
/// The seats that can change: `(team, user)`.
const MEMBERS: [(&str, &str); 6] = [
    ("@u0", "u0"),
    ("@u1", "u1"),
    ("@u2", "u2"),
    ("@u3", "u3"),
    ("crew", "u0"),
    ("crew", "u1"),
];
const PLANS: [&str; 4] = ["Small", "Big", "Daily", "Bar"];
const RESOURCES: [&str; 2] = ["chat", "image"];

#[derive(Clone, Debug)]
enum RequestId {
    None,
    /// A new id.
    Fresh,
    /// The id of an earlier answered request, retried with its own key, resource and amount.
    Retry(usize),
}

#[derive(Clone, Debug)]
enum Op {
    Consume {
        key: usize,
        resource: usize,
        amount: u64,
        id: RequestId,
    },
    Check {
        key: usize,
        resource: usize,
        amount: u64,
    },
    TopUp {
        team: usize,
        micros: u64,
    },
    Withdraw {
        team: usize,
        micros: u64,
    },
    Seat {
        member: usize,
        plan: Option<usize>,
    },
    Advance {
        ms: u64,
    },
    Reserve {
        key: usize,
        amount: u64,
        lease_ms: u64,
    },
    Settle {
        which: usize,
        amount: u64,
    },
    Void {
        which: usize,
    },
    Refund {
        which: usize,
    },
    /// A correction of usage `back_ms` ago: added if `add`, else removed.
    Adjust {
        key: usize,
        resource: usize,
        amount: u64,
        back_ms: u64,
        add: bool,
    },
    ReclaimIdle,
    Checkpoint,
    Reopen {
        close: bool,
        /// Reopened as a tool would: the shipped policy and the default options given, the
        /// stored policy and the recorded options asked for. It must run exactly as the owner's
        /// open does (the run goes on with it).
        as_tool: bool,
    },
    SwapPolicy {
        version: usize,
    },
    /// Revokes the key (again, if it is revoked already: nothing changes).
    Revoke {
        key: usize,
    },
    /// Revokes the member's key (if it is not yet) and gives the member a new one in its place.
    Rotate {
        member: usize,
    },
    /// A consume on the `which`-th revoked key (rotated away or not), with a new request id.
    ConsumeRevoked {
        which: usize,
        resource: usize,
        amount: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let id = prop_oneof![
        3 => Just(RequestId::None),
        2 => Just(RequestId::Fresh),
        2 => any::<usize>().prop_map(RequestId::Retry),
    ];
    prop_oneof![
        8 => (0..KEYS.len(), 0..RESOURCES.len(), 1..=4u64, id).prop_map(
            |(key, resource, amount, id)| Op::Consume { key, resource, amount, id }
        ),
        2 => (0..KEYS.len(), 0..RESOURCES.len(), 1..=4u64)
            .prop_map(|(key, resource, amount)| Op::Check { key, resource, amount }),
        2 => (0..TEAMS.len(), prop_oneof![Just(1_000u64), Just(25_000), Just(100_000)])
            .prop_map(|(team, micros)| Op::TopUp { team, micros }),
        1 => (0..TEAMS.len(), prop_oneof![Just(500u64), Just(20_000), Just(1_000_000)])
            .prop_map(|(team, micros)| Op::Withdraw { team, micros }),
        3 => (0..MEMBERS.len(), prop::option::weighted(0.85, 0..PLANS.len()))
            .prop_map(|(member, plan)| Op::Seat { member, plan }),
        3 => prop_oneof![
            4 => (1..=600u64).prop_map(|seconds| seconds * SECOND_MS),
            2 => (10..=90u64).prop_map(|minutes| minutes * MINUTE_MS),
            1 => Just(DAY_MS),
        ]
        .prop_map(|ms| Op::Advance { ms }),
        2 => (0..KEYS.len(), 1..=5u64, 5..=120u64).prop_map(|(key, amount, minutes)| {
            Op::Reserve { key, amount, lease_ms: minutes * MINUTE_MS }
        }),
        2 => (any::<usize>(), 0..=7u64).prop_map(|(which, amount)| Op::Settle { which, amount }),
        1 => any::<usize>().prop_map(|which| Op::Void { which }),
        1 => any::<usize>().prop_map(|which| Op::Refund { which }),
        1 => (0..KEYS.len(), 0..RESOURCES.len(), 1..=4u64, 0..=(3 * HOUR_MS), any::<bool>())
            .prop_map(|(key, resource, amount, back_ms, add)| {
                Op::Adjust { key, resource, amount, back_ms, add }
            }),
        1 => Just(Op::ReclaimIdle),
        1 => Just(Op::Checkpoint),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(close, as_tool)| Op::Reopen { close, as_tool }),
        1 => (0..4usize).prop_map(|version| Op::SwapPolicy { version }),
        // Rare, so the operations above keep most of their share.
        2 => prop_oneof![
            1 => (0..KEYS.len()).prop_map(|key| Op::Revoke { key }),
            2 => (0..MEMBERS.len()).prop_map(|member| Op::Rotate { member }),
            1 => (any::<usize>(), 0..RESOURCES.len(), 1..=4u64).prop_map(
                |(which, resource, amount)| Op::ConsumeRevoked { which, resource, amount }
            ),
        ],
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    durability: Durability,
    checkpoint_every_events: u64,
    /// How long an export reader has: with a periodic checkpoint every few events, a short
    /// retention has each of them compact what it lets go (the log's start moves on, and what
    /// came before lives on in the snapshots only).
    retention_ms: u64,
    seats: Vec<Option<usize>>,
}

fn setup() -> impl Strategy<Value = Setup> {
    let durability = prop_oneof![
        Just(Durability::Sync),
        Just(Durability::Interval { ms: 2 }),
        Just(Durability::None),
    ];
    let every = prop_oneof![Just(3u64), Just(10), Just(1_000_000)];
    let retention = prop_oneof![Just(0u64), Just(HOUR_MS), Just(7 * DAY_MS)];
    let seats = prop::collection::vec(prop::option::weighted(0.8, 0..PLANS.len()), MEMBERS.len());
    (durability, every, retention, seats).prop_map(
        |(durability, checkpoint_every_events, retention_ms, seats)| Setup {
            durability,
            checkpoint_every_events,
            retention_ms,
            seats,
        },
    )
}

/// The durable engine, its twin and what the sequence has produced so far.
struct Run {
    dir: TempDir,
    options: OpenOptions,
    clock: Arc<ManualClock>,
    durable: Option<Engine>,
    twin: Engine,
    now_ms: u64,
    /// Answered request ids with `(key, resource, amount)` (the key an index in `keys`) and the
    /// decision now remembered.
    answered: Vec<(String, usize, usize, u64, Decision)>,
    consumes: u64,
    next_id: u64,
    /// Each reservation opened, as the durable engine and the twin numbered it: an open hands
    /// out ids after every one an earlier run may have handed out (`reservation_ids_through`),
    /// so after a reopen the durable engine's skip ahead of the twin's.
    reservations: Vec<(ReservationId, ReservationId)>,
    reopens: u32,
    /// The policy in force (reopening passes it, as a deployment would).
    policy_version: usize,
    /// Every key made: `KEYS`, then the members' new keys, each in place of a revoked one.
    keys: Vec<String>,
    /// For each of `KEYS`, the index in `keys` of the key in its place now.
    current: [usize; KEYS.len()],
    /// The keys revoked (indexes in `keys`), in the order they were.
    revoked: Vec<usize>,
}

impl Run {
    fn new(setup: &Setup) -> Run {
        let dir = TempDir::new("model-reopen");
        // Reclaims happen when a case says (`ReclaimIdle`), leases expire on a `Reserve`, on
        // both engines alike: the engine's own housekeeping would come at different times to
        // an engine reopened and its twin.
        let engine_options = EngineOptions {
            reclaim_idle_every_ms: 0,
            expire_leases_on_its_own: false,
            ..EngineOptions::default()
        };
        let options = OpenOptions {
            durability: setup.durability,
            checkpoint_every_events: setup.checkpoint_every_events,
            retention_ms: setup.retention_ms,
            engine: engine_options,
            ..OpenOptions::default()
        };
        let clock = Arc::new(ManualClock::new(START_MS));
        let durable = Engine::open(dir.path(), policy(), clock.clone(), options.clone())
            .expect("open a fresh database");
        let twin = Engine::new(policy(), clock.clone(), engine_options).expect("valid options");
        let mut run = Run {
            dir,
            options,
            clock,
            durable: Some(durable),
            twin,
            now_ms: START_MS,
            answered: Vec::new(),
            consumes: 0,
            next_id: 0,
            reservations: Vec::new(),
            reopens: 0,
            policy_version: 0,
            keys: KEYS.iter().map(|key| key.to_string()).collect(),
            current: std::array::from_fn(|key| key),
            revoked: Vec::new(),
        };
        run.create_accounts(&setup.seats);
        run
    }

    fn durable(&self) -> &Engine {
        self.durable.as_ref().expect("open")
    }

    /// Runs `call` on both engines and requires the same answer (an error is an answer too:
    /// settling a closed reservation, refunding twice).
    fn both<T: PartialEq + std::fmt::Debug>(&self, what: &str, call: impl Fn(&Engine) -> T) -> T {
        let durable = call(self.durable());
        let twin = call(&self.twin);
        assert_eq!(
            durable, twin,
            "{what}: the durable engine and the twin answer differently"
        );
        durable
    }

    fn create_accounts(&mut self, seats: &[Option<usize>]) {
        let at = Some(self.now_ms);
        for user in 0..4 {
            let (name, key) = (format!("u{user}"), format!("k{user}"));
            self.both("create a user", |engine| {
                engine.create_user(&name, &key, at)
            })
            .expect("create a user");
        }
        self.both("create a team", |engine| engine.create_team("crew", at))
            .expect("create a team");
        for (user, key) in [("u0", "c0"), ("u1", "c1")] {
            self.both("add a member", |engine| {
                engine.add_member("crew", user, key, at)
            })
            .expect("add a member");
        }
        self.both("create a key", |engine| {
            engine.create_payg_key("u2", "p2", at)
        })
        .expect("create a pay-as-you-go key");
        for (member, plan) in seats.iter().enumerate() {
            self.seat(member, *plan);
        }
    }

    fn seat(&self, member: usize, plan: Option<usize>) {
        let (team, user) = MEMBERS[member];
        let at = Some(self.now_ms);
        let changed = self.both("a seat change", |engine| match plan {
            Some(plan) => engine.assign_seat(team, user, PLANS[plan], at),
            None => engine.unassign_seat(team, user, at),
        });
        if let Err(error) = changed {
            // Only policy 3 lacks a plan (Daily).
            assert!(
                self.policy_version == 3 && matches!(error, Error::UnknownPlan { .. }),
                "a seat change: {error}"
            );
        }
    }

    fn compare_states(&self, context: &str) {
        assert_same_state(
            &self.observed(self.durable()),
            &self.observed(&self.twin),
            context,
        );
    }

    /// The state of every key (revoked ones too) and team.
    fn observed(&self, engine: &Engine) -> State {
        let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        state(engine, &keys, &TEAMS, self.now_ms)
    }

    /// The key in the place of `KEYS[key]` now.
    fn key(&self, key: usize) -> &str {
        &self.keys[self.current[key]]
    }

    fn revoke(&mut self, key: usize) {
        let name = self.keys[key].clone();
        let at = Some(self.now_ms);
        let revoked = self
            .both("revoke", |engine| engine.revoke_key(&name, at))
            .expect("revoke a known key");
        assert_eq!(revoked, !self.revoked.contains(&key), "revoking {name}");
        if revoked {
            self.revoked.push(key);
        }
    }

    fn rotate(&mut self, member: usize) {
        let (team, user) = MEMBERS[member];
        self.revoke(self.current[member]);
        let name = format!("{}-r{}", KEYS[member], self.keys.len());
        let at = Some(self.now_ms);
        self.both("add a member in a revoked key's place", |engine| {
            engine.add_member(team, user, &name, at)
        })
        .expect("a member whose key was revoked is given a new one");
        self.current[member] = self.keys.len();
        self.keys.push(name);
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Consume {
                key,
                resource,
                amount,
                id,
            } => self.consume(*key, *resource, *amount, id),
            Op::Check {
                key,
                resource,
                amount,
            } => {
                let quantities = quantities(*resource, *amount);
                let request = UsageRequest::new(self.key(*key), RESOURCES[*resource], &quantities)
                    .at(self.now_ms);
                let _compared = self.both("check", |engine| engine.check(&request));
            }
            Op::TopUp { team, micros } => {
                let at = Some(self.now_ms);
                self.both("top-up", |engine| engine.top_up(TEAMS[*team], *micros, at))
                    .expect("a top-up");
            }
            Op::Withdraw { team, micros } => {
                let at = Some(self.now_ms);
                // More than the balance is an error, from both alike.
                let _compared = self.both("withdrawal", |engine| {
                    engine.withdraw_credits(TEAMS[*team], *micros, at)
                });
            }
            Op::Seat { member, plan } => self.seat(*member, *plan),
            Op::Advance { ms } => {
                self.now_ms += ms;
                self.clock.set_ms(self.now_ms);
            }
            Op::Reserve {
                key,
                amount,
                lease_ms,
            } => {
                let quantities = [(Unit::Requests, *amount)];
                let request =
                    UsageRequest::new(self.key(*key), "chat", &quantities).at(self.now_ms);
                let durable = self.durable().reserve(&request, Some(*lease_ms));
                let twin = self.twin.reserve(&request, Some(*lease_ms));
                let answer = |outcome: &Result<tally_engine::ReserveOutcome, Error>| {
                    outcome
                        .as_ref()
                        .map(|outcome| (outcome.decision, outcome.reservation.is_some()))
                        .map_err(Clone::clone)
                };
                assert_eq!(
                    answer(&durable),
                    answer(&twin),
                    "reserve: the durable engine and the twin answer differently"
                );
                if let (Ok(durable), Ok(twin)) = (durable, twin) {
                    self.reservations
                        .extend(durable.reservation.zip(twin.reservation));
                }
            }
            Op::Settle { which, amount } => {
                if let Some(id) = pick(&self.reservations, *which) {
                    let actual: Vec<(Unit, u64)> = if *amount == 0 {
                        Vec::new()
                    } else {
                        vec![(Unit::Requests, *amount)]
                    };
                    let at = Some(self.now_ms);
                    let durable = self.durable().settle(id.0, &actual, at);
                    let twin = self
                        .twin
                        .settle(id.1, &actual, at)
                        .map(|outcome| match outcome {
                            SettleOutcome::Settled(mut settlement) => {
                                settlement.reservation = id.0;
                                SettleOutcome::Settled(settlement)
                            }
                            denied => denied,
                        });
                    assert_eq!(
                        durable,
                        twin.map_err(|error| as_durable(error, id)),
                        "settle: the durable engine and the twin answer differently"
                    );
                }
            }
            Op::Void { which } => {
                if let Some(id) = pick(&self.reservations, *which) {
                    let at = Some(self.now_ms);
                    assert_eq!(
                        self.durable().void(id.0, at),
                        self.twin
                            .void(id.1, at)
                            .map_err(|error| as_durable(error, id)),
                        "void: the durable engine and the twin answer differently"
                    );
                }
            }
            Op::Refund { which } => {
                if let Some((id, ..)) = pick(&self.answered, *which) {
                    let at = Some(self.now_ms);
                    let _compared = self.both("refund", |engine| engine.refund(&id, at));
                }
            }
            Op::Adjust {
                key,
                resource,
                amount,
                back_ms,
                add,
            } => {
                let at_ms = self.now_ms;
                let usage_at_ms = at_ms.saturating_sub(*back_ms).max(START_MS);
                let quantities = quantities(*resource, *amount);
                let direction = if *add {
                    AdjustmentDirection::Add
                } else {
                    AdjustmentDirection::Remove
                };
                let _compared = self.both("adjustment", |engine| {
                    engine.adjust_usage(
                        self.key(*key),
                        RESOURCES[*resource],
                        &quantities,
                        usage_at_ms,
                        direction,
                        Some(at_ms),
                    )
                });
            }
            Op::ReclaimIdle => {
                // How many keys each frees is not compared: it counts window memory, which a
                // replay allocates again for keys whose windows had been reclaimed (reclaiming
                // is not an event). What they count must stay equal (compared after each step).
                let at = Some(self.now_ms);
                self.durable()
                    .reclaim_idle(at)
                    .expect("reclaim the durable engine's idle keys");
                self.twin
                    .reclaim_idle(at)
                    .expect("reclaim the twin's idle keys");
            }
            Op::Checkpoint => {
                self.durable().checkpoint().expect("checkpoint");
            }
            Op::Reopen { close, as_tool } => self.reopen(*close, *as_tool),
            Op::Revoke { key } => self.revoke(self.current[*key]),
            Op::Rotate { member } => self.rotate(*member),
            Op::ConsumeRevoked {
                which,
                resource,
                amount,
            } => {
                if let Some(key) = pick(&self.revoked, *which) {
                    self.consume_on(key, *resource, *amount, &RequestId::Fresh);
                }
            }
            Op::SwapPolicy { version } => {
                let at = Some(self.now_ms);
                let swapped = self.both("swap", |engine| {
                    engine.swap_policy(policy_version(*version), at)
                });
                match swapped {
                    Ok(_) => self.policy_version = *version,
                    // Refused alike by both: a working key has a seat on a plan it drops.
                    Err(error) => assert_eq!(*version, 3, "a swap to {version}: {error}"),
                }
            }
        }
    }

    fn consume(&mut self, key: usize, resource: usize, amount: u64, id: &RequestId) {
        self.consume_on(self.current[key], resource, amount, id);
    }

    /// A consume on `self.keys[key]` (a retry: on the key of the id it retries).
    fn consume_on(&mut self, key: usize, resource: usize, amount: u64, id: &RequestId) {
        let (key, resource, amount, id) = match id {
            RequestId::None => (key, resource, amount, None),
            RequestId::Fresh => {
                self.next_id += 1;
                (key, resource, amount, Some(format!("r{}", self.next_id)))
            }
            RequestId::Retry(which) => match pick(&self.answered, *which) {
                Some((id, key, resource, amount, _)) => (key, resource, amount, Some(id)),
                None => (key, resource, amount, None),
            },
        };
        let quantities = quantities(resource, amount);
        let mut request =
            UsageRequest::new(&self.keys[key], RESOURCES[resource], &quantities).at(self.now_ms);
        if let Some(id) = &id {
            request = request.id(id);
        }
        self.consumes += 1;
        let durable = if self.consumes % 2 == 0 {
            let mut results = self.durable().consume_many(&[request]);
            results.pop().expect("one result")
        } else {
            self.durable().consume(&request)
        };
        let twin = self.twin.consume(&request);
        assert_eq!(
            durable, twin,
            "consume {request:?}: the engines answer differently"
        );
        let Some(id) = id else { return };
        let Ok(decision) = twin else { return };
        match self.answered.iter().position(|answered| answered.0 == id) {
            None => self.answered.push((id, key, resource, amount, decision)),
            // Retried past the idempotency horizon, the id was decided anew.
            Some(index) => self.answered[index].4 = decision,
        }
    }

    /// Closes the durable engine and checks the database: sound, and its latest snapshot
    /// equal to a replay of the log. Returns the first event the log still holds (past 1 once
    /// compaction removed some).
    fn verify(mut self) -> u64 {
        self.durable.take().expect("open").close().expect("close");
        let report = Engine::verify(self.dir.path(), self.options.clone()).expect("verify");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.snapshot_matches_replay, Some(true));
        report.first_seq
    }

    fn reopen(&mut self, close: bool, as_tool: bool) {
        let before = self.observed(self.durable());
        let engine = self.durable.take().expect("open");
        if close {
            engine.close().expect("close");
        } else {
            drop(engine);
        }
        let engine = if as_tool {
            let tool = OpenOptions {
                durability: self.options.durability,
                use_recorded: true,
                ..OpenOptions::default()
            };
            let engine = Engine::open_with_stored_policy(
                self.dir.path(),
                Policy::token_plan(),
                self.clock.clone(),
                tool,
            )
            .unwrap_or_else(|error| panic!("reopening as a tool: {error}"));
            assert_eq!(
                *engine.options(),
                self.options.engine,
                "the recorded options"
            );
            engine
        } else {
            Engine::open(
                self.dir.path(),
                policy_version(self.policy_version),
                self.clock.clone(),
                self.options.clone(),
            )
            .unwrap_or_else(|error| panic!("reopening: {error}"))
        };
        self.durable = Some(engine);
        self.reopens += 1;
        assert_same_state(
            &self.observed(self.durable()),
            &before,
            &format!("after reopen {} (close: {close})", self.reopens),
        );
    }
}

fn quantities(resource: usize, amount: u64) -> Vec<(Unit, u64)> {
    match resource {
        0 => vec![(Unit::Requests, amount), (Unit::Tokens, amount * 150)],
        _ => vec![(Unit::Images, amount)],
    }
}

/// The twin's error about reservation `ids.1` as the durable engine says it of `ids.0`.
fn as_durable(error: Error, ids: (ReservationId, ReservationId)) -> Error {
    let durable = |reservation: u64| match reservation == ids.1.get() {
        true => ids.0.get(),
        false => reservation,
    };
    match error {
        Error::UnknownReservation { reservation } => Error::UnknownReservation {
            reservation: durable(reservation),
        },
        Error::ReservationClosed { reservation, state } => Error::ReservationClosed {
            reservation: durable(reservation),
            state,
        },
        other => other,
    }
}

fn pick<T: Clone>(items: &[T], which: usize) -> Option<T> {
    if items.is_empty() {
        None
    } else {
        Some(items[which % items.len()].clone())
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        max_shrink_iters: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model_reopen.txt",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_reopened_engine_keeps_its_state_and_decides_like_one_that_never_closed(
        setup in setup(),
        ops in prop::collection::vec(op(), 1..48),
    ) {
        let mut run = Run::new(&setup);
        run.compare_states("after the accounts");
        for (step, op) in ops.iter().enumerate() {
            run.apply(op);
            run.compare_states(&format!("after step {step}: {op:?}"));
        }
        // A last reopen of each kind, so every case ends by recovering.
        run.reopen(false, false);
        run.compare_states("after the final drop");
        run.reopen(true, true);
        run.compare_states("after the final close, reopened as a tool");
        run.reopen(true, false);
        run.compare_states("after the final close");
        run.verify();
    }
}

/// The same comparison on one fixed, long sequence that touches every operation, so a run
/// with few random cases still covers them all.
#[test]
fn a_fixed_sequence_of_every_operation_with_reopens_keeps_the_twins_equal() {
    for (durability, every, retention_ms) in [
        (Durability::Sync, 1_000_000, 7 * DAY_MS),
        (Durability::Sync, 3, 0),
        (Durability::None, 10, HOUR_MS),
    ] {
        let setup = Setup {
            durability,
            checkpoint_every_events: every,
            retention_ms,
            seats: vec![Some(0), Some(1), Some(2), None, Some(1), Some(0)],
        };
        let mut run = Run::new(&setup);
        let mut ops = Vec::new();
        for round in 0..6 {
            ops.extend([
                Op::Consume {
                    key: round % 4,
                    resource: 0,
                    amount: 3,
                    id: RequestId::Fresh,
                },
                Op::Consume {
                    key: 4,
                    resource: 1,
                    amount: 1,
                    id: RequestId::None,
                },
                Op::Consume {
                    key: 6,
                    resource: 0,
                    amount: 2,
                    id: RequestId::None,
                },
                Op::Reserve {
                    key: round % 4,
                    amount: 2,
                    lease_ms: 30 * MINUTE_MS,
                },
                Op::TopUp {
                    team: round % 5,
                    micros: 25_000,
                },
                Op::Withdraw {
                    team: (round + 2) % 5,
                    micros: 20_000,
                },
                Op::Consume {
                    key: 5,
                    resource: 1,
                    amount: 2,
                    id: RequestId::Fresh,
                },
                Op::Reopen {
                    close: round % 2 == 0,
                    as_tool: round % 3 == 0,
                },
                Op::Consume {
                    key: 0,
                    resource: 0,
                    amount: 1,
                    id: RequestId::Retry(round),
                },
                Op::Settle {
                    which: round,
                    amount: 3,
                },
                Op::Refund { which: round },
                Op::Seat {
                    member: round,
                    plan: Some(round % PLANS.len()),
                },
                Op::Check {
                    key: round % 7,
                    resource: 0,
                    amount: 4,
                },
                Op::Void { which: round + 1 },
                Op::Checkpoint,
                Op::Advance { ms: 20 * MINUTE_MS },
                Op::Reopen {
                    close: round % 2 == 1,
                    as_tool: round % 3 == 1,
                },
            ]);
            // A key rotated every other round (its seat stays with the revoked key; the next
            // round's seat change of that member goes to the new one), requests on it after,
            // and p2 revoked, twice.
            if round % 2 == 1 {
                ops.extend([
                    Op::Rotate { member: round },
                    Op::ConsumeRevoked {
                        which: round,
                        resource: 0,
                        amount: 1,
                    },
                    Op::Consume {
                        key: 0,
                        resource: 0,
                        amount: 1,
                        id: RequestId::Retry(round + 2),
                    },
                    Op::Seat {
                        member: round,
                        plan: Some(1),
                    },
                    Op::Revoke { key: 6 },
                    Op::Reopen {
                        close: round == 3,
                        as_tool: round == 5,
                    },
                ]);
            }
        }
        // Two days on (past the daily window and the retention), requests enough for periodic
        // checkpoints, which compact what the retention lets go, then a reopen.
        ops.push(Op::Advance { ms: DAY_MS });
        ops.push(Op::Advance { ms: DAY_MS });
        for key in 0..8 {
            ops.push(Op::Consume {
                key: key % 4,
                resource: 0,
                amount: 1,
                id: RequestId::Fresh,
            });
        }
        ops.push(Op::Reopen {
            close: false,
            as_tool: false,
        });
        for (step, op) in ops.iter().enumerate() {
            run.apply(op);
            run.compare_states(&format!("{durability:?} step {step}: {op:?}"));
        }
        assert!(run.reopens >= 12);
        assert!(!run.answered.is_empty() && !run.reservations.is_empty());
        assert_eq!(run.keys.len(), KEYS.len() + 3, "three keys rotated");
        assert_eq!(run.revoked.len(), 4, "three rotated and p2");
        let first_kept = run.verify();
        // With a checkpoint every 3 events, the periodic ones compacted what the retention
        // let go (and the twins still agreed, through the reopens after it).
        assert_eq!(
            first_kept > 1,
            every == 3 || every == 10,
            "{durability:?}, every {every}, retention {retention_ms} ms: log starts at {first_kept}"
        );
    }
}
