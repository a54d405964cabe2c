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
