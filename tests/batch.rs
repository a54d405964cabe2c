//! `consume_many` against a sequence of `consume` calls on the same inputs: the same decisions
//! (replays, conflicts and errors included), the same usage afterwards, and again after the
//! batch's engine is closed and reopened.

mod log_support;

use log_support::*;
use tally_engine::{Decision, EngineOptions, Error, OpenOptions, Policy, Unit, UsageRequest};

/// A small deterministic generator (xorshift64*), so a failing seed can be rerun.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One drawn request, owning its strings: `(key, resource, quantities, id, at_ms)`.
type Drawn = (
    String,
    String,
    Vec<(Unit, u64)>,
    Option<String>,
    Option<u64>,
);

/// A batch over every kind of key, with denials (not covered, over a maximum, exhausted),
/// bad entries (a zero quantity, an unknown resource, an empty key, an empty id, a time past
/// 2100), and request ids drawn from a small pool, so that ids repeat inside the batch and
/// across batches, with the same and with other quantities.
fn draw_batch(draw: &mut Draw, at_ms: u64, len: usize) -> Vec<Drawn> {
    (0..len)
        .map(|index| {
            let key = match draw.below(12) {
                0..=7 => KEYS[draw.below(KEYS.len() as u64) as usize].to_string(),
                8 => "key-nobody".to_string(),
                9 => "key-bob".to_string(),
                10 => "payg-dee".to_string(),
                _ => "key-eve".to_string(),
            };
            let (resource, quantities) = match draw.below(8) {
                0..=2 => ("m2.7", vec![(Unit::Requests, 1 + draw.below(3))]),
                3 => (
                    "m2.7",
                    vec![(Unit::Requests, 1), (Unit::Tokens, 1 + draw.below(5_000))],
                ),
                4 => ("m2.7-highspeed", vec![(Unit::Requests, 1 + draw.below(2))]),
                5 => (
                    "speech-2.8",
                    vec![(Unit::Characters, 1 + draw.below(2_000))],
                ),
                6 => ("image-01", vec![(Unit::Images, 1 + draw.below(4))]),
                _ => (
                    "music-2.6",
                    vec![(Unit::Songs, 1), (Unit::Seconds, 1 + draw.below(400))],
                ),
            };
            let (mut key, mut resource, mut quantities) = (key, resource.to_string(), quantities);
            let mut at = Some(at_ms + index as u64);
            let mut id = match draw.below(3) {
                0 => None,
                _ => Some(format!("id-{}", draw.below(40))),
            };
            match draw.below(36) {
                0 => quantities = vec![(Unit::Requests, 0)],
                1 => resource = "m9".to_string(),
                2 => key = String::new(),
                3 => id = Some(String::new()),
                4 => at = Some(5_000_000_000_000),
                5 => at = None,
                6 => at = at.map(|at| at + 2 * DAY_MS),
                7 => key = format!("key-\u{7}{}", draw.below(3)),
                8 => id = Some("i".repeat(129)),
                9 => {
                    key = format!("key-\u{7}{}", draw.below(3));
                    resource = "m9".to_string();
                }
                10 => {
                    key = format!("key-\u{7}{}", draw.below(3));
                    id = Some(String::new());
                }
                _ => {}
            }
            (key, resource, quantities, id, at)
        })
        .collect()
}

fn request_of(drawn: &Drawn) -> UsageRequest<'_> {
    let (key, resource, quantities, id, at) = drawn;
    let mut request = UsageRequest::new(key, resource, quantities);
    if let Some(at) = at {
        request = request.at(*at);
    }
    match id {
        Some(id) => request.id(id),
        None => request,
    }
}

fn outcome(result: &Result<(Decision, bool), Error>) -> String {
    format!("{result:?}")
}

fn batches_decide_as_consume_calls(options: EngineOptions, seed: u64, label: &str) {
    let dir = TempDir::new(label);
    let open_options = OpenOptions {
        engine: options,
        ..sync_options()
    };
    // One clock for both, moved on past the request-id horizon now and then.
    let clock = std::sync::Arc::new(tally_engine::ManualClock::new(T0_MS));
    let engine = open_on_clock(dir.path(), clock.clone(), open_options.clone());
    let sequence = tally_engine::Engine::new(Policy::token_plan(), clock.clone(), options).unwrap();
    create_accounts(&engine);
    create_accounts(&sequence);
    let mut draw = Draw(seed);
    let mut at_ms = T0_MS + 10 * MINUTE_MS;
    let mut engine = engine;
    for round in 0..12 {
        let len = 1 + draw.below(150) as usize;
        let drawn = draw_batch(&mut draw, at_ms, len);
        let requests: Vec<UsageRequest<'_>> = drawn.iter().map(request_of).collect();
        let (results, replays) = engine.consume_many_noting_replay(&requests);
        for (index, request) in requests.iter().enumerate() {
            let expected = sequence.consume_noting_replay(request);
            let got = results[index]
                .clone()
                .map(|decision| (decision, replays[index]));
            assert_eq!(
                outcome(&got),
                outcome(&expected),
                "seed {seed} round {round} entry {index}: {:?}",
                drawn[index]
            );
        }
        let at = at_ms + len as u64;
        assert_same_state(
            &state(&engine, &KEYS, &TEAMS, at),
            &state(&sequence, &KEYS, &TEAMS, at),
            &format!("seed {seed} round {round}: after the batch"),
        );
        at_ms += 7 * MINUTE_MS;
        if round % 3 == 2 {
            // Past every window and the horizon: the ids drawn so far are forgotten.
            at_ms += 40 * DAY_MS;
            clock.set_ms(at_ms);
        }
        if round % 4 == 3 {
            drop(engine);
            engine = open_on_clock(dir.path(), clock.clone(), open_options.clone());
            assert_same_state(
                &state(&engine, &KEYS, &TEAMS, at),
                &state(&sequence, &KEYS, &TEAMS, at),
                &format!("seed {seed} round {round}: after a reopen"),
            );
        }
    }
}

#[test]
fn a_batch_decides_each_request_as_a_sequence_of_consume_calls_would() {
    for seed in 1..=6u64 {
        batches_decide_as_consume_calls(
            EngineOptions::default(),
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            &format!("batch-model-{seed}"),
        );
    }
}

#[test]
fn a_batch_with_the_request_id_table_full_decides_as_consume_calls_would() {
    for seed in 1..=6u64 {
        let options = EngineOptions {
            idempotency_capacity: 12,
            ..EngineOptions::default()
        };
        batches_decide_as_consume_calls(
            options,
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d),
            &format!("batch-model-full-{seed}"),
        );
    }
}

/// An entry with more than one thing wrong (a key with a control character, and an unknown
/// resource or a bad request id) is refused for the same one as its `consume` would be (and
/// `submit`): the batch checked such a key first, and the C ABI answered it with another
/// status than a single call.
#[test]
fn an_entry_wrong_twice_is_refused_for_what_its_consume_is_refused_for() {
    let engine = twin(Policy::token_plan());
    create_accounts(&engine);
    let one = [(Unit::Requests, 1)];
    let bad_key = "key-\u{7}bob";
    let too_long = "i".repeat(129);
    let requests = [
        UsageRequest::new(bad_key, "m9", &one).at(T0_MS),
        UsageRequest::new(bad_key, "m2.7", &one).at(T0_MS).id(""),
        UsageRequest::new(bad_key, "m2.7", &one)
            .at(T0_MS)
            .id(&too_long),
        UsageRequest::new(bad_key, "m9", &one)
            .at(T0_MS)
            .id("some-id"),
    ];
    let results = engine.consume_many(&requests);
    for (request, result) in requests.iter().zip(&results) {
        let single = engine.consume(request);
        assert!(single.is_err(), "{request:?}: {single:?}");
        assert_eq!(
            format!("{result:?}"),
            format!("{single:?}"),
            "{request:?}: the batch's error, then consume's"
        );
        let submitted = engine
            .submit(request)
            .map(|submitted| *submitted.decision());
        assert_eq!(
            format!("{submitted:?}"),
            format!("{single:?}"),
            "{request:?}: submit's error, then consume's"
        );
    }
}

/// The request-id table fills up in the middle of a batch: the later new ids are refused with
/// `CapacityExceeded` and count nothing, the batch's other entries (repeats of its ids, requests
/// without one) are still decided; and when the batch's flush fails, the places its ids took
/// are given back, so after a reopen those ids are decided afresh.
#[test]
fn a_batch_that_fills_the_request_id_table_refuses_the_rest_and_counts_nothing_for_them() {
    for flush_fails in [false, true] {
        let dir = TempDir::new(&format!("batch-full-{flush_fails}"));
        let faults = tally_engine::Faults::new();
        let options = OpenOptions {
            engine: EngineOptions {
                idempotency_capacity: 3,
                ..EngineOptions::default()
            },
            faults: Some(std::sync::Arc::clone(&faults)),
            ..sync_options()
        };
        let engine = open_token_plan(dir.path(), options.clone());
        create_accounts(&engine);
        let one = [(Unit::Requests, 1)];
        let at = T0_MS + MINUTE_MS;
        let with = |id: &'static str| UsageRequest::new("key-bob", "m2.7", &one).at(at).id(id);
        let batch = [
            with("a"),
            with("b"),
            with("c"),
            with("d"),
            with("a"),
            UsageRequest::new("key-bob", "m2.7", &one).at(at),
            with("e"),
        ];
        if flush_fails {
            faults.fail_next_flushes(1);
        }
        let (results, replays) = engine.consume_many_noting_replay(&batch);
        let full = |index: usize| {
            assert!(
                matches!(results[index], Err(Error::CapacityExceeded { .. })),
                "{flush_fails}: entry {index}: {:?}",
                results[index]
            );
        };
        full(3);
        full(6);
        let used = engine.usage("key-bob", Some(at)).unwrap().limits[0].used;
        if flush_fails {
            for index in [0, 1, 2, 4, 5] {
                assert!(
                    matches!(results[index], Err(Error::Storage { .. })),
                    "entry {index}: {:?}",
                    results[index]
                );
            }
            assert_eq!(used, 0, "everything given back");
        } else {
            for index in [0, 1, 2, 4, 5] {
                assert!(
                    matches!(&results[index], Ok(decision) if decision.is_admitted()),
                    "entry {index}: {:?}",
                    results[index]
                );
            }
            assert!(replays[4], "the repeat of a is a replay");
            assert_eq!(used, 4, "a, b, c and the one without an id");
        }
        drop(engine);
        let engine = open_token_plan(dir.path(), options);
        let used_after = engine.usage("key-bob", Some(at)).unwrap().limits[0].used;
        assert_eq!(used_after, used, "{flush_fails}: on disk");
        let (again, replays) = engine.consume_many_noting_replay(&batch[..4]);
        if flush_fails {
            assert!(
                again[..3]
                    .iter()
                    .all(|result| matches!(result, Ok(d) if d.is_admitted()))
                    && replays[..3].iter().all(|replayed| !replayed),
                "decided afresh after a reopen: {again:?}"
            );
        } else {
            assert!(replays[..3].iter().all(|replayed| *replayed), "{replays:?}");
        }
        // The table holds a, b and c again: a fourth id is refused.
        assert!(
            matches!(again[3], Err(Error::CapacityExceeded { .. })),
            "{flush_fails}: {:?}",
            again[3]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A proptest: random batches against the same requests consumed one by one on a twin.

mod twin_model {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::FileFailurePersistence;
    use tally_engine::{Durability, Engine, ManualClock};

    /// The keys a drawn request names: every kind of key of the populated world (`KEYS`,
    /// credits-charged ones among them), then one that does not exist.
    fn drawn_key(index: usize) -> &'static str {
        KEYS.get(index).copied().unwrap_or("key-nobody")
    }
    const DRAWN_KEYS: usize = KEYS.len() + 1;

    /// One drawn request of a batch.
    #[derive(Debug, Clone)]
    struct Entry {
        key: usize,
        /// 0..=2 m2.7 requests (the Starter quota fills and falls to credits), 3 m2.7 with
        /// tokens, 4 image-01, 5 speech, 6 music.
        resource: u8,
        amount: u64,
        /// An id from a pool of 6 (repeats within and across batches; a repeat with another
        /// amount is a conflict).
        id: Option<u8>,
        /// Seconds from the case's current time: back as well as forward.
        offset_s: i64,
        unstamped: bool,
        /// 0: sound; 1 a zero quantity; 2 an unknown resource; 3 an empty key; 4 an empty id;
        /// 5 a time past 2100.
        wrong: u8,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Batch(Vec<Entry>),
        /// A hold on m2.7 by key (index), amount, lease (seconds), offset (seconds).
        Reserve(usize, u64, u64, i64),
        /// The case's current time (and the clock) moves on by this many seconds.
        Advance(u64),
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            0..DRAWN_KEYS,
            0u8..7,
            prop_oneof![3 => 1u64..4, 1 => 100u64..1_600, 1 => 1_000u64..4_000],
            prop_oneof![1 => Just(None), 2 => (0u8..6).prop_map(Some)],
            -600i64..600,
            prop::bool::weighted(0.05),
            prop_oneof![12 => Just(0u8), 1 => 1u8..6],
        )
            .prop_map(
                |(key, resource, amount, id, offset_s, unstamped, wrong)| Entry {
                    key,
                    resource,
                    amount,
                    id,
                    offset_s,
                    unstamped,
                    wrong,
                },
            )
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => prop::collection::vec(entry(), 0..80).prop_map(Op::Batch),
            3 => (0..DRAWN_KEYS, prop_oneof![1u64..4, 100u64..1_600, 1_000u64..4_500], 1u64..900, -300i64..300)
                .prop_map(|(key, amount, lease_s, offset_s)| Op::Reserve(key, amount, lease_s, offset_s)),
            2 => (1u64..2_400).prop_map(Op::Advance),
        ]
    }

    /// An entry's strings, owned: `(key, resource, quantities, id, at_ms)`.
    fn drawn_of(entry: &Entry, now_ms: u64) -> Drawn {
        let mut key = drawn_key(entry.key).to_string();
        let (mut resource, mut quantities) = match entry.resource {
            0..=2 => ("m2.7", vec![(Unit::Requests, entry.amount)]),
            3 => (
                "m2.7",
                vec![(Unit::Requests, 1), (Unit::Tokens, entry.amount * 7)],
            ),
            4 => ("image-01", vec![(Unit::Images, 1 + entry.amount % 4)]),
            5 => ("speech-2.8", vec![(Unit::Characters, entry.amount * 5)]),
            _ => (
                "music-2.6",
                vec![(Unit::Songs, 1), (Unit::Seconds, 1 + entry.amount % 300)],
            ),
        };
        let mut id = entry.id.map(|id| format!("id-{id}"));
        let mut at =
            (!entry.unstamped).then(|| now_ms.saturating_add_signed(entry.offset_s * 1_000));
        match entry.wrong {
            1 => quantities = vec![(Unit::Requests, 0)],
            2 => resource = "m9",
            3 => key = String::new(),
            4 => id = Some(String::new()),
            5 => at = Some(5_000_000_000_000),
            _ => {}
        }
        (key, resource.to_string(), quantities, id, at)
    }

    fn config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(48);
        ProptestConfig {
            cases,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
                "proptest-regressions/batch.txt",
            ))),
            ..ProptestConfig::default()
        }
    }

    fn run(ops: &[Op], case: u64) -> Result<(), TestCaseError> {
        let dir = TempDir::new(&format!("batch-twin-{case}"));
        let clock = std::sync::Arc::new(ManualClock::new(T0_MS));
        let options = OpenOptions {
            durability: Durability::None,
            ..OpenOptions::default()
        };
        let batched = open_on_clock(dir.path(), clock.clone(), options.clone());
        let single = Engine::new(
            Policy::token_plan(),
            clock.clone(),
            EngineOptions::default(),
        )
        .unwrap();
        create_accounts(&batched);
        create_accounts(&single);
        let mut now_ms = T0_MS + 10 * MINUTE_MS;
        clock.set_ms(now_ms);
        let mut latest_ms = now_ms;
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Advance(seconds) => {
                    now_ms += seconds * 1_000;
                    clock.set_ms(now_ms);
                }
                Op::Reserve(key, amount, lease_s, offset_s) => {
                    let quantities = [(Unit::Requests, *amount)];
                    let at = now_ms.saturating_add_signed(offset_s * 1_000);
                    latest_ms = latest_ms.max(at);
                    let request = UsageRequest::new(drawn_key(*key), "m2.7", &quantities).at(at);
                    let lease = Some(lease_s * 1_000);
                    let got = batched
                        .reserve(&request, lease)
                        .map(|o| (o.decision, o.reservation.is_some()));
                    let expected = single
                        .reserve(&request, lease)
                        .map(|o| (o.decision, o.reservation.is_some()));
                    prop_assert_eq!(
                        format!("{got:?}"),
                        format!("{expected:?}"),
                        "step {}: reserve",
                        step
                    );
                }
                Op::Batch(entries) => {
                    let drawn: Vec<Drawn> = entries.iter().map(|e| drawn_of(e, now_ms)).collect();
                    let requests: Vec<UsageRequest<'_>> = drawn.iter().map(request_of).collect();
                    for request in &requests {
                        if let Some(at) = request.at_ms.filter(|at| *at < 4_000_000_000_000) {
                            latest_ms = latest_ms.max(at);
                        }
                    }
                    // A batch expires first the leases ended by its latest request's time and
                    // the clock's (documented, `tests/leases.rs`): so does the twin, before its
                    // requests. A request stamped after that point decides as a consume would.
                    if !requests.is_empty() {
                        let latest = match requests.iter().any(|r| r.at_ms.is_none()) {
                            true => now_ms,
                            false => requests
                                .iter()
                                .filter_map(|r| r.at_ms)
                                .max()
                                .unwrap()
                                .min(now_ms),
                        };
                        single.expire_reservations(Some(latest)).unwrap();
                    }
                    let (results, replays) = batched.consume_many_noting_replay(&requests);
                    prop_assert_eq!(results.len(), requests.len());
                    prop_assert_eq!(replays.len(), requests.len());
                    for (index, request) in requests.iter().enumerate() {
                        let expected = single.consume_noting_replay(request);
                        let got = results[index]
                            .clone()
                            .map(|decision| (decision, replays[index]));
                        prop_assert_eq!(
                            outcome(&got),
                            outcome(&expected),
                            "step {} entry {}: {:?}",
                            step,
                            index,
                            drawn[index]
                        );
                    }
                }
            }
        }
        // Compared once at the end: a usage report expires the leases ended by the clock's
        // time, so one after every step would leave no lease to end in a later batch.
        let at = latest_ms.max(now_ms) + 20 * MINUTE_MS;
        assert_same_state(
            &state(&batched, &KEYS, &TEAMS, at),
            &state(&single, &KEYS, &TEAMS, at),
            &format!("case {case}: at the end"),
        );
        drop(batched);
        let reopened = open_on_clock(dir.path(), clock.clone(), options);
        let at = latest_ms.max(now_ms) + 20 * MINUTE_MS;
        assert_same_state(
            &state(&reopened, &KEYS, &TEAMS, at),
            &state(&single, &KEYS, &TEAMS, at),
            &format!("case {case}: after a reopen"),
        );
        Ok(())
    }

    static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn a_random_batch_decides_as_the_same_requests_consumed_one_by_one_on_a_twin(
            ops in prop::collection::vec(op(), 1..24),
        ) {
            let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            run(&ops, case)?;
        }
    }
}

/// A batch at the C ABI's bound (`TALLY_MAX_BATCH`, 4,096) and one past it, whose log fails
/// mid-way (a short write, or a failed fdatasync) while small segments are sealed, and so made
/// durable, on the way: every admission answered is on disk after a reopen, no entry answered
/// with the error counts, in memory or on disk, and the answered request ids are remembered.
#[test]
fn a_batch_at_the_bound_whose_log_fails_mid_way_keeps_exactly_what_it_answered() {
    const MAX_BATCH: usize = 4_096;
    for (len, short_write) in [
        (MAX_BATCH, true),
        (MAX_BATCH + 1, false),
        (MAX_BATCH, false),
        (MAX_BATCH + 1, true),
    ] {
        let label = format!("batch-bound-{len}-{short_write}");
        let dir = TempDir::new(&label);
        let faults = tally_engine::Faults::new();
        let options = OpenOptions {
            // Sealed every few hundred events: the batch's first chunks are durable on their
            // own before the failure.
            segment_bytes: 16 * 1024,
            ..sync_options_with(&faults)
        };
        let engine = open_token_plan(dir.path(), options.clone());
        create_accounts(&engine);
        let mut draw = Draw(len as u64 * 31 + u64::from(short_write));
        let at_ms = T0_MS + 10 * MINUTE_MS;
        // An id comes back with its first request (a replay), never another one: a conflict
        // with an entry whose event the log then lost is answered before that loss is known
        // (see `a_conflict_with_a_first_decision_the_log_loses_answers_the_logs_error`).
        let mut first_of_id = std::collections::HashMap::new();
        let drawn: Vec<Drawn> = draw_batch(&mut draw, at_ms, len)
            .into_iter()
            .map(|(key, resource, quantities, id, at)| {
                // Every entry sound and stamped, so the twin decides it as the batch did.
                let at = at.filter(|at| *at < at_ms + DAY_MS).or(Some(at_ms));
                let id = id.filter(|id| !id.is_empty() && id.len() <= 128);
                let key = match key.is_empty() || key.contains('\u{7}') {
                    true => "key-ada".to_string(),
                    false => key,
                };
                let resource = match resource.as_str() {
                    "m9" => "m2.7".to_string(),
                    _ => resource,
                };
                let quantities = match quantities[0].1 {
                    0 => vec![(Unit::Requests, 1)],
                    _ => quantities,
                };
                let drawn = (key, resource, quantities, id, at);
                match &drawn.3 {
                    Some(id) => first_of_id.entry(id.clone()).or_insert(drawn).clone(),
                    None => drawn,
                }
            })
            .collect();
        let requests: Vec<UsageRequest<'_>> = drawn.iter().map(request_of).collect();
        let faults_now = std::sync::Arc::clone(&faults);
        // The first events go through; the failure comes once the writer has written a few
        // records (each write, each seal's fdatasync, counted down by the hold).
        let failer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(2));
            match short_write {
                true => faults_now.fail_next_inserts(1),
                false => faults_now.fail_next_flushes(1),
            }
        });
        let first_seq = last_seq(&engine) + 1;
        let (results, first_replays) = engine.consume_many_noting_replay(&requests);
        failer.join().unwrap();
        assert_eq!(results.len(), len, "{label}: one result per entry");
        let mut admitted = 0;
        let mut failed = 0;
        for (index, result) in results.iter().enumerate() {
            match result {
                Ok(decision) => {
                    admitted += usize::from(decision.is_admitted() && !first_replays[index]);
                }
                Err(Error::Storage { .. }) => failed += 1,
                // An entry made wrong by the drawing (music without songs): refused alike.
                Err(Error::InvalidArgument { .. }) => {}
                Err(other) => panic!("{label}: entry {index}: {other:?}"),
            }
        }
        let at = at_ms + HOUR_MS;
        let in_memory = state(&engine, &KEYS, &TEAMS, at);
        drop(engine);
        let reopened = open_token_plan(dir.path(), options.clone());
        assert_same_state(
            &state(&reopened, &KEYS, &TEAMS, at),
            &in_memory,
            &format!("{label}: after a reopen ({admitted} admitted, {failed} failed)"),
        );
        // Exactly the admissions answered (a replay's is its first's) are on disk.
        let (mut logged, mut after) = (0, first_seq - 1);
        loop {
            let events = reopened.events_after(after, 100_000).unwrap();
            let Some(last) = events.last() else {
                break;
            };
            after = last.seq;
            logged += events
                .iter()
                .filter(|event| matches!(event.body, tally_engine::EventBody::UsageAdmitted { .. }))
                .count();
        }
        assert_eq!(
            logged, admitted,
            "{label}: admissions on disk ({failed} failed)"
        );
        if len == MAX_BATCH + 1 {
            assert!(failed > 0, "{label}: the log failed within the batch");
        }
        // The answered ids are remembered as answered (but for a key's own refusal, which is
        // never remembered), with the decision answered.
        let (again, replays) = reopened.consume_many_noting_replay(&requests);
        for (index, result) in results.iter().enumerate() {
            let Ok(decision) = result else {
                continue;
            };
            let keyless = matches!(
                decision,
                Decision::Denied(denial) if matches!(
                    denial.reason,
                    tally_engine::DenialReason::UnknownKey | tally_engine::DenialReason::KeyRevoked
                )
            );
            if requests[index].request_id.is_some() && !keyless {
                assert!(replays[index], "{label}: entry {index}'s id is remembered");
                assert_eq!(
                    again[index].as_ref().ok(),
                    Some(decision),
                    "{label}: entry {index}"
                );
            }
        }
    }
}

/// An empty batch answers nothing, logs nothing and changes nothing.
#[test]
fn an_empty_batch_answers_nothing_and_logs_nothing() {
    let dir = TempDir::new("batch-empty");
    let engine = open_token_plan(dir.path(), sync_options());
    create_accounts(&engine);
    let before = (
        last_seq(&engine),
        state(&engine, &KEYS, &TEAMS, T0_MS + MINUTE_MS),
    );
    let (results, replays) = engine.consume_many_noting_replay(&[]);
    assert!(results.is_empty() && replays.is_empty());
    let after = (
        last_seq(&engine),
        state(&engine, &KEYS, &TEAMS, T0_MS + MINUTE_MS),
    );
    assert_eq!(after, before);
}

/// A request id used twice in one batch with other quantities, whose first entry's event the
/// log then loses: consumed one by one, the first answers the log's error and is forgotten, and
/// the second is decided afresh (and answers the log's error too). The batch answers the second
/// `RequestIdConflict` instead, decided against a first decision that never stood, before its
/// loss is known: a caller that takes a conflict for its own mistake does not retry a request
/// that was never counted. A conflict with a first decision not yet durable waits for it, as a
/// replay does, and answers the log's error if it never will be; so do `consume` and `submit`.
#[test]
fn a_conflict_with_a_first_decision_the_log_loses_answers_the_logs_error() {
    let dir = TempDir::new("batch-conflict-lost");
    let faults = tally_engine::Faults::new();
    let engine = open_token_plan(dir.path(), sync_options_with(&faults));
    create_accounts(&engine);
    let (one, two) = ([(Unit::Requests, 1)], [(Unit::Requests, 2)]);
    let at = T0_MS + MINUTE_MS;
    let batch = [
        UsageRequest::new("key-bob", "m2.7", &one).at(at).id("x"),
        UsageRequest::new("key-bob", "m2.7", &two).at(at).id("x"),
    ];
    faults.fail_next_flushes(1);
    let results = engine.consume_many(&batch);
    assert!(
        matches!(results[0], Err(Error::Storage { .. })),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(results[1], Err(Error::Storage { .. })),
        "the second entry answers the log's error, as its consume would: {:?}",
        results[1]
    );
}
