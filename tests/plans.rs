//! Every cell of the seed's two plan tables ("Token Plan", Standard Plans and Highspeed Plans):
//! the shipped policy admits exactly the seed's figure in its window and denies the next unit;
//! an empty cell means the plan does not cover the resource (credits may still pay for it).
//!
//! The figures below are copied from the seed text, not read from the policy file: the point is
//! that the shipped policy matches the published tables.

mod common;

use common::*;
use tally_engine::{ChargedTo, DenialReason, Engine, Error, Policy, Unit, UsageRequest, Window};

/// How one unit of a cell is asked for: songs carry their length (at most 5 minutes each).
fn one_unit(unit: Unit) -> Vec<(Unit, u64)> {
    match unit {
        Unit::Songs => vec![(Unit::Songs, 1), (Unit::Seconds, 300)],
        other => vec![(other, 1)],
    }
}

/// Fills `resource` up to `figure` units at `at_ms`, in requests of at most `chunk` units.
/// Returns how many units were admitted.
fn fill(engine: &Engine, key: &str, resource: &str, unit: Unit, figure: u64, at_ms: u64) -> u64 {
    // Characters come in large requests; everything else one unit per request, as the seed
    // counts them ("requests", "images", "songs", videos per day).
    let chunk = if unit == Unit::Characters { 700 } else { 1 };
    let mut admitted_units = 0;
    let mut left = figure;
    while left > 0 {
        let size = left.min(chunk);
        let quantities = match unit {
            Unit::Songs => vec![(Unit::Songs, size), (Unit::Seconds, 300)],
            other => vec![(other, size)],
        };
        if consume(engine, key, resource, &quantities, at_ms).is_admitted() {
            admitted_units += size;
        }
        left -= size;
    }
    admitted_units
}

/// The seed's figure for `plan` on `resource` per `unit`: exactly `figure` units are admitted in
/// the window, the next unit is denied with `QuotaExhausted` on that limit, and the quota comes
/// back when the window resets.
fn assert_seed_quota(plan: &str, resource: &str, unit: Unit, figure: u64, rolling: bool) {
    let engine = engine();
    let key = seated(&engine, "ada", plan);
    let meter = format!("{resource}:{unit}");
    let window = if rolling { five_hours() } else { daily() };
    let index = limit_index(&engine, plan, &meter, window);

    let start_ms = T0_MS + HOUR_MS;
    let admitted_units = fill(&engine, &key, resource, unit, figure, start_ms);
    assert_eq!(
        admitted_units, figure,
        "{plan}: {resource} admits the seed's {figure} {unit}"
    );
    let report = limit(&engine, &key, &meter, window, start_ms);
    assert_eq!((report.amount, report.used), (figure, figure), "{plan}");
    assert_eq!(report.remaining, 0, "{plan}");

    let next = consume(
        &engine,
        &key,
        resource,
        &one_unit(unit),
        start_ms + MINUTE_MS,
    );
    let (denied_limit, retry_at_ms, _, _) = quota_exhausted(next);
    assert_eq!(denied_limit, index, "{plan}: the {meter} limit denies");
    let denial = denied(next);
    assert_eq!(denial.plan, Some(plan_id(&engine, plan)));
    let status = denial
        .limits
        .as_slice()
        .iter()
        .find(|status| status.limit == index)
        .expect("the denial reports the limit");
    assert_eq!((status.amount, status.used), (figure, figure), "{plan}");

    let reset_ms = if rolling {
        assert!(
            retry_at_ms >= start_ms + FIVE_HOURS_MS,
            "{plan}: not before 5 h"
        );
        // Generous: the exact lateness is checked in tests/windows.rs.
        start_ms + FIVE_HOURS_MS + 2 * BUCKET_MS
    } else {
        // Local midnight in Asia/Shanghai after T0 + 1 h.
        assert_eq!(retry_at_ms, T0_MS + DAY_MS, "{plan}: daily reset");
        T0_MS + DAY_MS
    };
    if !rolling {
        let before_reset = consume(&engine, &key, resource, &one_unit(unit), reset_ms - 1);
        assert!(
            !before_reset.is_admitted(),
            "{plan}: nothing back before local midnight"
        );
    }
    let again = fill(&engine, &key, resource, unit, figure, reset_ms);
    assert_eq!(
        again, figure,
        "{plan}: the whole quota is back after the reset"
    );
    assert!(!consume(&engine, &key, resource, &one_unit(unit), reset_ms).is_admitted());
}

/// A request larger than the whole limit can never fit: `ExceedsLimit`, not a wait.
fn assert_one_request_over_the_figure_exceeds_the_limit(
    plan: &str,
    resource: &str,
    unit: Unit,
    figure: u64,
) {
    let engine = engine();
    let key = seated(&engine, "ada", plan);
    let decision = consume(&engine, &key, resource, &[(unit, figure + 1)], T0_MS);
    match reason(decision) {
        DenialReason::ExceedsLimit {
            amount, requested, ..
        } => assert_eq!((amount, requested), (figure, figure + 1), "{plan}"),
        other => panic!("{plan}: expected ExceedsLimit, got {other:?}"),
    }
    assert!(consume(&engine, &key, resource, &[(unit, figure)], T0_MS).is_admitted());
}

/// An empty cell: the plan does not cover the resource; with team credits the request is
/// charged to credits at the resource's price.
fn assert_not_covered(plan: &str, resource: &str, unit: Unit) {
    let engine = engine();
    let key = seated(&engine, "ada", plan);
    let quantities = one_unit(unit);
    match reason(consume(&engine, &key, resource, &quantities, T0_MS)) {
        DenialReason::ResourceNotCovered { resource: denied } => {
            assert_eq!(denied, resource_id(&engine, resource), "{plan}")
        }
        other => panic!("{plan}: expected ResourceNotCovered for {resource}, got {other:?}"),
    }
    let report = engine.usage(&key, Some(T0_MS)).expect("report");
    assert!(
        report
            .limits
            .iter()
            .all(|limit| !limit.meter.starts_with(&format!("{resource}:"))),
        "{plan} has no limit on {resource}"
    );

    let top_up_micros = 10_000_000;
    engine
        .top_up("@ada", top_up_micros, Some(T0_MS))
        .expect("top up");
    let price = price_micros(&engine, resource, &quantities);
    let admission = admitted(consume(&engine, &key, resource, &quantities, T0_MS));
    assert_eq!(admission.charged_to, ChargedTo::Credits { micros: price });
    assert_eq!(
        engine.credits_micros("@ada").expect("balance"),
        top_up_micros - price
    );
}

macro_rules! seed_quota {
    ($name:ident, $plan:literal, $resource:literal, $unit:expr, $figure:literal, rolling) => {
        #[test]
        fn $name() {
            assert_seed_quota($plan, $resource, $unit, $figure, true);
        }
    };
    ($name:ident, $plan:literal, $resource:literal, $unit:expr, $figure:literal, daily) => {
        #[test]
        fn $name() {
            assert_seed_quota($plan, $resource, $unit, $figure, false);
        }
    };
}

macro_rules! not_covered {
    ($name:ident, $plan:literal, $resource:literal, $unit:expr) => {
        #[test]
        fn $name() {
            assert_not_covered($plan, $resource, $unit);
        }
    };
}

// ---- Standard Plans: Starter, Plus, Max -------------------------------------------------------
// M2.7:           1,500 / 4,500 / 15,000 requests per 5 hours
// Speech 2.8:     (empty) / 4,000 / 11,000 characters per day
// image-01:       (empty) / 50 / 120 images per day
// Hailuo-2.3-Fast 768P 6s: (empty) / (empty) / 2 per day
// Hailuo-2.3 768P 6s:      (empty) / (empty) / 2 per day
// Music-2.6:      100 / 100 / 100 songs per day (each at most 5 minutes)

seed_quota!(
    starter_admits_1500_m27_requests_in_five_hours_and_denies_the_1501st,
    "Starter",
    "m2.7",
    Unit::Requests,
    1500,
    rolling
);
not_covered!(
    starter_does_not_cover_speech,
    "Starter",
    "speech-2.8",
    Unit::Characters
);
not_covered!(
    starter_does_not_cover_image_01,
    "Starter",
    "image-01",
    Unit::Images
);
not_covered!(
    starter_does_not_cover_hailuo_fast,
    "Starter",
    "hailuo-2.3-fast-768p-6s",
    Unit::Videos
);
not_covered!(
    starter_does_not_cover_hailuo,
    "Starter",
    "hailuo-2.3-768p-6s",
    Unit::Videos
);
seed_quota!(
    starter_admits_100_songs_a_day_and_denies_the_101st,
    "Starter",
    "music-2.6",
    Unit::Songs,
    100,
    daily
);

seed_quota!(
    plus_admits_4500_m27_requests_in_five_hours_and_denies_the_4501st,
    "Plus",
    "m2.7",
    Unit::Requests,
    4500,
    rolling
);
seed_quota!(
    plus_admits_4000_speech_characters_a_day_and_denies_the_4001st,
    "Plus",
    "speech-2.8",
    Unit::Characters,
    4000,
    daily
);
seed_quota!(
    plus_admits_50_images_a_day_and_denies_the_51st,
    "Plus",
    "image-01",
    Unit::Images,
    50,
    daily
);
not_covered!(
    plus_does_not_cover_hailuo_fast,
    "Plus",
    "hailuo-2.3-fast-768p-6s",
    Unit::Videos
);
not_covered!(
    plus_does_not_cover_hailuo,
    "Plus",
    "hailuo-2.3-768p-6s",
    Unit::Videos
);
seed_quota!(
    plus_admits_100_songs_a_day_and_denies_the_101st,
    "Plus",
    "music-2.6",
    Unit::Songs,
    100,
    daily
);

seed_quota!(
    max_admits_15000_m27_requests_in_five_hours_and_denies_the_15001st,
    "Max",
    "m2.7",
    Unit::Requests,
    15000,
    rolling
);
seed_quota!(
    max_admits_11000_speech_characters_a_day_and_denies_the_11001st,
    "Max",
    "speech-2.8",
    Unit::Characters,
    11000,
    daily
);
seed_quota!(
    max_admits_120_images_a_day_and_denies_the_121st,
    "Max",
    "image-01",
    Unit::Images,
    120,
    daily
);
seed_quota!(
    max_admits_2_hailuo_fast_videos_a_day_and_denies_the_3rd,
    "Max",
    "hailuo-2.3-fast-768p-6s",
    Unit::Videos,
    2,
    daily
);
seed_quota!(
    max_admits_2_hailuo_videos_a_day_and_denies_the_3rd,
    "Max",
    "hailuo-2.3-768p-6s",
    Unit::Videos,
    2,
    daily
);
seed_quota!(
    max_admits_100_songs_a_day_and_denies_the_101st,
    "Max",
    "music-2.6",
    Unit::Songs,
    100,
    daily
);

// ---- Highspeed Plans: Plus-Highspeed, Max-Highspeed, Ultra-Highspeed -------------------------
// M2.7-highspeed: 4,500 / 15,000 / 30,000 requests per 5 hours
// Speech 2.8:     9,000 / 19,000 / 50,000 characters per day
// image-01:       100 / 200 / 800 images per day
// Hailuo-2.3-Fast 768P 6s: (empty) / 3 / 5 per day
// Hailuo-2.3 768P 6s:      (empty) / 3 / 5 per day
// Music-2.6:      100 / 100 / 100 songs per day (each at most 5 minutes)

seed_quota!(
    plus_highspeed_admits_4500_m27_highspeed_requests_in_five_hours_and_denies_the_4501st,
    "Plus-Highspeed",
    "m2.7-highspeed",
    Unit::Requests,
    4500,
    rolling
);
seed_quota!(
    plus_highspeed_admits_9000_speech_characters_a_day_and_denies_the_9001st,
    "Plus-Highspeed",
    "speech-2.8",
    Unit::Characters,
    9000,
    daily
);
seed_quota!(
    plus_highspeed_admits_100_images_a_day_and_denies_the_101st,
    "Plus-Highspeed",
    "image-01",
    Unit::Images,
    100,
    daily
);
not_covered!(
    plus_highspeed_does_not_cover_hailuo_fast,
    "Plus-Highspeed",
    "hailuo-2.3-fast-768p-6s",
    Unit::Videos
);
not_covered!(
    plus_highspeed_does_not_cover_hailuo,
    "Plus-Highspeed",
    "hailuo-2.3-768p-6s",
    Unit::Videos
);
seed_quota!(
    plus_highspeed_admits_100_songs_a_day_and_denies_the_101st,
    "Plus-Highspeed",
    "music-2.6",
    Unit::Songs,
    100,
    daily
);

seed_quota!(
    max_highspeed_admits_15000_m27_highspeed_requests_in_five_hours_and_denies_the_15001st,
    "Max-Highspeed",
    "m2.7-highspeed",
    Unit::Requests,
    15000,
    rolling
);
seed_quota!(
    max_highspeed_admits_19000_speech_characters_a_day_and_denies_the_19001st,
    "Max-Highspeed",
    "speech-2.8",
    Unit::Characters,
    19000,
    daily
);
seed_quota!(
    max_highspeed_admits_200_images_a_day_and_denies_the_201st,
    "Max-Highspeed",
    "image-01",
    Unit::Images,
    200,
    daily
);
seed_quota!(
    max_highspeed_admits_3_hailuo_fast_videos_a_day_and_denies_the_4th,
    "Max-Highspeed",
    "hailuo-2.3-fast-768p-6s",
    Unit::Videos,
    3,
    daily
);
seed_quota!(
    max_highspeed_admits_3_hailuo_videos_a_day_and_denies_the_4th,
    "Max-Highspeed",
    "hailuo-2.3-768p-6s",
    Unit::Videos,
    3,
    daily
);
seed_quota!(
    max_highspeed_admits_100_songs_a_day_and_denies_the_101st,
    "Max-Highspeed",
    "music-2.6",
    Unit::Songs,
    100,
    daily
);

seed_quota!(
    ultra_highspeed_admits_30000_m27_highspeed_requests_in_five_hours_and_denies_the_30001st,
    "Ultra-Highspeed",
    "m2.7-highspeed",
    Unit::Requests,
    30000,
    rolling
);
seed_quota!(
    ultra_highspeed_admits_50000_speech_characters_a_day_and_denies_the_50001st,
    "Ultra-Highspeed",
    "speech-2.8",
    Unit::Characters,
    50000,
    daily
);
seed_quota!(
    ultra_highspeed_admits_800_images_a_day_and_denies_the_801st,
    "Ultra-Highspeed",
    "image-01",
    Unit::Images,
    800,
    daily
);
seed_quota!(
    ultra_highspeed_admits_5_hailuo_fast_videos_a_day_and_denies_the_6th,
    "Ultra-Highspeed",
    "hailuo-2.3-fast-768p-6s",
    Unit::Videos,
    5,
    daily
);
seed_quota!(
    ultra_highspeed_admits_5_hailuo_videos_a_day_and_denies_the_6th,
    "Ultra-Highspeed",
    "hailuo-2.3-768p-6s",
    Unit::Videos,
    5,
    daily
);
seed_quota!(
    ultra_highspeed_admits_100_songs_a_day_and_denies_the_101st,
    "Ultra-Highspeed",
    "music-2.6",
    Unit::Songs,
    100,
    daily
);

// ---- Each plan whole: the seed's limits and no others --------------------------------------------
// The tests above try each cell; these check that a plan has nothing besides them (an extra cap,
// a limit on another unit or window) and that each limit counts what the seed says.

/// What a limit counts: one unit of one resource, or the older seed's shared usage bar (every
/// priced unit of every resource, at its pay-as-you-go price).
#[derive(Clone, Copy)]
enum Counts {
    Unit(&'static str, Unit),
    UsageBar,
}

type SeedPlan = (&'static str, Vec<(Counts, Window, u64)>);

/// Every plan of both seeds, its limits copied from the seed tables. The usage bar's sizes are
/// the policy's ASSUMED figures (the seed shows the bar, not its size): 1/10 of the monthly
/// price per 5 hours and 1/2 per week, in micro-credits.
fn seed_plans() -> Vec<SeedPlan> {
    use Counts::{Unit as One, UsageBar};
    let m27 = |amount| (One("m2.7", Unit::Requests), five_hours(), amount);
    let m27_highspeed = |amount| (One("m2.7-highspeed", Unit::Requests), five_hours(), amount);
    let speech = |amount| (One("speech-2.8", Unit::Characters), daily(), amount);
    let image = |amount| (One("image-01", Unit::Images), daily(), amount);
    let fast = |amount| {
        (
            One("hailuo-2.3-fast-768p-6s", Unit::Videos),
            daily(),
            amount,
        )
    };
    let hailuo = |amount| (One("hailuo-2.3-768p-6s", Unit::Videos), daily(), amount);
    let music = (One("music-2.6", Unit::Songs), daily(), 100);
    let bar = |price_micros: u64| {
        vec![
            (UsageBar, five_hours(), price_micros / 10),
            (UsageBar, weekly(), price_micros / 2),
        ]
    };
    vec![
        ("Starter", vec![m27(1_500), music]),
        ("Plus", vec![m27(4_500), speech(4_000), image(50), music]),
        (
            "Max",
            vec![
                m27(15_000),
                speech(11_000),
                image(120),
                fast(2),
                hailuo(2),
                music,
            ],
        ),
        (
            "Plus-Highspeed",
            vec![m27_highspeed(4_500), speech(9_000), image(100), music],
        ),
        (
            "Max-Highspeed",
            vec![
                m27_highspeed(15_000),
                speech(19_000),
                image(200),
                fast(3),
                hailuo(3),
                music,
            ],
        ),
        (
            "Ultra-Highspeed",
            vec![
                m27_highspeed(30_000),
                speech(50_000),
                image(800),
                fast(5),
                hailuo(5),
                music,
            ],
        ),
        ("Bar-Plus", bar(20_000_000)),
        ("Bar-Max", bar(50_000_000)),
        ("Bar-Ultra", bar(120_000_000)),
    ]
}

/// A limit as text, `name [resource unit xweight, ...] per window: amount`, with the meter's
/// terms sorted, so two lists of limits compare as sorted lists of text.
fn limit_text(
    name: &str,
    mut terms: Vec<(String, Unit, u64)>,
    window: Window,
    amount: u64,
) -> String {
    terms.sort();
    let terms: Vec<String> = terms
        .iter()
        .map(|(resource, unit, weight)| format!("{resource} {unit} x{weight}"))
        .collect();
    format!("{name} [{}] per {window:?}: {amount}", terms.join(", "))
}

/// The seed's limits of a plan, as `limit_text`.
fn expected_limits(policy: &Policy, limits: &[(Counts, Window, u64)]) -> Vec<String> {
    let mut texts: Vec<String> = limits
        .iter()
        .map(|(counts, window, amount)| match *counts {
            Counts::Unit(resource, unit) => limit_text(
                &format!("{resource}:{unit}"),
                vec![(resource.to_string(), unit, 1)],
                *window,
                *amount,
            ),
            Counts::UsageBar => {
                let priced = policy.resources().iter().flat_map(|resource| {
                    Unit::ALL.into_iter().filter_map(|unit| {
                        let price = resource.price_micros[unit.index()]?;
                        (price > 0).then(|| (resource.name.to_string(), unit, price))
                    })
                });
                limit_text("usage-bar", priced.collect(), *window, *amount)
            }
        })
        .collect();
    texts.sort();
    texts
}

/// The shipped policy's limits of a plan, as `limit_text`.
fn shipped_limits(policy: &Policy, plan: &str) -> Vec<String> {
    let plan = policy.plan(policy.plan_id(plan).expect("a seed plan"));
    let mut texts: Vec<String> = plan
        .limits
        .iter()
        .map(|limit| {
            let meter = policy.meter(limit.meter);
            let terms = meter
                .terms
                .iter()
                .map(|(resource, unit, weight)| {
                    (policy.resource(*resource).name.to_string(), *unit, *weight)
                })
                .collect();
            limit_text(&meter.name, terms, limit.window, limit.amount)
        })
        .collect();
    texts.sort();
    texts
}

#[test]
fn every_plan_has_exactly_the_seeds_limits_each_counting_what_the_seed_says() {
    let policy = Policy::token_plan();
    let seeds = seed_plans();
    let mut names: Vec<&str> = policy.plans().iter().map(|plan| &*plan.name).collect();
    let mut seed_names: Vec<&str> = seeds.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    seed_names.sort_unstable();
    assert_eq!(
        names, seed_names,
        "the policy has the seeds' plans, no others"
    );
    for (plan, limits) in &seeds {
        assert_eq!(
            shipped_limits(&policy, plan),
            expected_limits(&policy, limits),
            "{plan}"
        );
    }
}

/// A standard plan covers the resources of its cells (an empty cell: not covered, see the
/// tests above); the usage bar plans cover "All models on the API Platform". No plan sets a
/// per-request maximum of its own (a song's 5 minutes hold for every key: the resource's).
#[test]
fn every_plan_covers_exactly_the_seeds_resources_and_sets_no_maximum_of_its_own() {
    let policy = Policy::token_plan();
    for (name, limits) in seed_plans() {
        let plan = policy.plan(policy.plan_id(name).expect("a seed plan"));
        let mut covered: Vec<&str> = policy
            .resources()
            .iter()
            .zip(&plan.covers)
            .filter(|(_, covers)| **covers)
            .map(|(resource, _)| &*resource.name)
            .collect();
        let mut expected: Vec<&str> = if name.starts_with("Bar-") {
            policy
                .resources()
                .iter()
                .map(|resource| &*resource.name)
                .collect()
        } else {
            limits
                .iter()
                .map(|(counts, _, _)| match counts {
                    Counts::Unit(resource, _) => *resource,
                    Counts::UsageBar => unreachable!("a standard plan has no usage bar"),
                })
                .collect()
        };
        covered.sort_unstable();
        expected.sort_unstable();
        assert_eq!(covered, expected, "{name}");
        assert!(
            plan.maximums.iter().flatten().all(|maximum| *maximum == 0),
            "{name}"
        );
    }
}

// ---- M2.7 versus M2.7-highspeed ---------------------------------------------------------------

not_covered!(
    plus_highspeed_does_not_cover_plain_m27,
    "Plus-Highspeed",
    "m2.7",
    Unit::Requests
);
not_covered!(
    max_highspeed_does_not_cover_plain_m27,
    "Max-Highspeed",
    "m2.7",
    Unit::Requests
);
not_covered!(
    ultra_highspeed_does_not_cover_plain_m27,
    "Ultra-Highspeed",
    "m2.7",
    Unit::Requests
);
not_covered!(
    starter_does_not_cover_m27_highspeed,
    "Starter",
    "m2.7-highspeed",
    Unit::Requests
);
not_covered!(
    plus_does_not_cover_m27_highspeed,
    "Plus",
    "m2.7-highspeed",
    Unit::Requests
);
not_covered!(
    max_does_not_cover_m27_highspeed,
    "Max",
    "m2.7-highspeed",
    Unit::Requests
);

// ---- One request larger than the whole quota --------------------------------------------------

#[test]
fn one_request_for_more_than_a_whole_quota_is_denied_as_exceeding_the_limit() {
    let cells = [
        ("Starter", "m2.7", Unit::Requests, 1500),
        ("Plus", "speech-2.8", Unit::Characters, 4000),
        ("Max", "image-01", Unit::Images, 120),
        ("Max", "hailuo-2.3-fast-768p-6s", Unit::Videos, 2),
        ("Ultra-Highspeed", "m2.7-highspeed", Unit::Requests, 30000),
        ("Ultra-Highspeed", "speech-2.8", Unit::Characters, 50000),
    ];
    for (plan, resource, unit, figure) in cells {
        assert_one_request_over_the_figure_exceeds_the_limit(plan, resource, unit, figure);
    }
}

// ---- Songs: at most 5 minutes each ------------------------------------------------------------

#[test]
fn a_song_of_exactly_five_minutes_is_admitted_on_every_plan() {
    for plan in [
        "Starter",
        "Plus",
        "Max",
        "Plus-Highspeed",
        "Max-Highspeed",
        "Ultra-Highspeed",
    ] {
        let engine = engine();
        let key = seated(&engine, "ada", plan);
        let song = [(Unit::Songs, 1), (Unit::Seconds, 300)];
        assert!(
            consume(&engine, &key, "music-2.6", &song, T0_MS).is_admitted(),
            "{plan}"
        );
        assert_eq!(
            used(&engine, &key, "music-2.6:songs", daily(), T0_MS),
            1,
            "{plan}"
        );
    }
}

#[test]
fn a_song_of_301_seconds_is_over_the_request_maximum_on_every_plan_and_counts_nothing() {
    for plan in [
        "Starter",
        "Plus",
        "Max",
        "Plus-Highspeed",
        "Max-Highspeed",
        "Ultra-Highspeed",
    ] {
        let engine = engine();
        let key = seated(&engine, "ada", plan);
        engine
            .top_up("@ada", 10_000_000, Some(T0_MS))
            .expect("top up");
        let song = [(Unit::Songs, 1), (Unit::Seconds, 301)];
        assert_eq!(
            reason(consume(&engine, &key, "music-2.6", &song, T0_MS)),
            DenialReason::OverRequestMaximum {
                unit: Unit::Seconds,
                maximum: 300,
                requested: 301
            },
            "{plan}"
        );
        assert_eq!(
            used(&engine, &key, "music-2.6:songs", daily(), T0_MS),
            0,
            "{plan}"
        );
        assert_eq!(
            engine.credits_micros("@ada").expect("balance"),
            10_000_000,
            "{plan}: credits do not pay for an over-long song either"
        );
    }
}

/// A song carries its length: without `seconds` the 5-minute maximum could not be checked, so
/// the request is refused (not admitted, not denied) on every plan, and counts nothing.
#[test]
fn a_song_without_its_length_is_refused_on_every_plan_and_counts_nothing() {
    let plans: Vec<String> = Policy::token_plan()
        .document()
        .plans
        .keys()
        .cloned()
        .collect();
    assert_eq!(plans.len(), 9, "{plans:?}");
    for plan in &plans {
        let plan = plan.as_str();
        let engine = engine();
        let key = seated(&engine, "ada", plan);
        let song = [(Unit::Songs, 1)];
        let request = UsageRequest::new(&key, "music-2.6", &song).at(T0_MS);
        match engine.consume(&request) {
            Err(Error::InvalidArgument { field, problem }) => {
                assert_eq!(field, "quantities", "{plan}");
                assert!(problem.contains("seconds"), "{plan}: {problem}");
            }
            other => panic!("{plan}: a song without seconds gave {other:?}"),
        }
        let report = engine.usage(&key, Some(T0_MS)).expect("report");
        assert!(
            report.limits.iter().all(|limit| limit.used == 0),
            "{plan}: nothing counted"
        );
    }
}

#[test]
fn two_songs_in_one_request_are_over_the_request_maximum() {
    let engine = engine();
    let key = seated(&engine, "ada", "Max");
    let songs = [(Unit::Songs, 2), (Unit::Seconds, 300)];
    assert!(matches!(
        reason(consume(&engine, &key, "music-2.6", &songs, T0_MS)),
        DenialReason::OverRequestMaximum {
            unit: Unit::Songs,
            ..
        }
    ));
}

#[test]
fn an_over_long_song_is_denied_even_when_credits_would_pay_for_it() {
    let engine = engine();
    let key = user(&engine, "ada");
    engine
        .top_up("@ada", 10_000_000, Some(T0_MS))
        .expect("top up");
    let song = [(Unit::Songs, 1), (Unit::Seconds, 301)];
    assert!(matches!(
        reason(consume(&engine, &key, "music-2.6", &song, T0_MS)),
        DenialReason::OverRequestMaximum { .. }
    ));
    assert_eq!(engine.credits_micros("@ada").expect("balance"), 10_000_000);
    let song = [(Unit::Songs, 1), (Unit::Seconds, 300)];
    assert!(consume(&engine, &key, "music-2.6", &song, T0_MS).is_admitted());
}

// ---- The older seed's plans: price per month and agents ---------------------------------------

#[test]
fn the_usage_bar_plans_carry_the_older_seeds_prices_and_agent_counts() {
    // "$20 /month, 3-4 agents", "$50 /month, 4-5 agents", "$120 /month, 6-7 agents"; the cap on
    // open reservations is the upper figure of each range.
    let engine = engine();
    let policy = engine.policy();
    for (plan, price_micros, agents) in [
        ("Bar-Plus", 20_000_000, 4),
        ("Bar-Max", 50_000_000, 5),
        ("Bar-Ultra", 120_000_000, 7),
    ] {
        let plan = policy.plan(plan_id(&engine, plan));
        assert_eq!(
            plan.price_micros_per_month,
            Some(price_micros),
            "{}",
            plan.name
        );
        assert_eq!(plan.max_open_reservations, Some(agents), "{}", plan.name);
        let windows: Vec<_> = plan.limits.iter().map(|limit| limit.window).collect();
        assert_eq!(
            windows,
            vec![five_hours(), weekly()],
            "{}: 5-hour rolling and weekly windows",
            plan.name
        );
    }
}

/// Mid limits tokens per day, Small does not; Max has more of both. A key on Mid fills its
/// day's tokens, moves down to Small (the day's token count stays with the key, dormant: a seat
/// change keeps usage counted), then runs out of Small's requests. The denial suggests a plan
/// "that takes the request now on every limit it touches" (`upgrade_for`), but `takes_now`
/// counted only the usage on limits of the *current* plan, so it saw 0 tokens used on Mid's
/// daily limit and offered Mid. Moved to Mid, the key is refused the same request on that very
/// limit (its dormant count came back with the seat). Max would have taken it. Now the
/// suggestion counts what a seat change would bring back (`KeyUsage::rearranged`).
#[test]
fn a_suggested_upgrade_counts_the_usage_a_seat_change_would_bring_back() {
    let policy = Policy::from_toml_str(
        r#"
time_zone = "UTC"
[resources.chat]
units = ["requests", "tokens"]
[plans.Small]
price_micros_per_month = 10
limits = [
  { resource = "chat", unit = "requests", amount = 10, window = "rolling:5h" },
]
covers = ["chat"]
[plans.Mid]
price_micros_per_month = 20
limits = [
  { resource = "chat", unit = "requests", amount = 20, window = "rolling:5h" },
  { resource = "chat", unit = "tokens", amount = 100, window = "daily" },
]
[plans.Max]
price_micros_per_month = 50
limits = [
  { resource = "chat", unit = "requests", amount = 30, window = "rolling:5h" },
  { resource = "chat", unit = "tokens", amount = 1000, window = "daily" },
]
"#,
    )
    .expect("a valid policy");
    let engine = engine_with(policy);
    let key = seated(&engine, "ada", "Mid");
    let at_ms = T0_MS + HOUR_MS;
    // Mid: one request with the day's 100 tokens.
    admitted(consume(
        &engine,
        &key,
        "chat",
        &[(Unit::Requests, 1), (Unit::Tokens, 100)],
        at_ms,
    ));
    // Down to Small: 9 more requests fill its 10.
    engine
        .assign_seat(&team_of("ada"), "ada", "Small", Some(at_ms))
        .expect("seat change");
    assert_eq!(
        admit_count(&engine, &key, "chat", Unit::Requests, 9, at_ms),
        9
    );
    let request = [(Unit::Requests, 1), (Unit::Tokens, 1)];
    let denial = denied(consume(&engine, &key, "chat", &request, at_ms));
    assert!(
        matches!(denial.reason, DenialReason::QuotaExhausted { .. }),
        "{denial:?}"
    );
    let offered = denial
        .remedies
        .upgrade_to
        .expect("a bigger plan is offered");
    let offered = engine.policy().plan(offered).name.to_string();

    // Take the offer: the same request must now be admitted.
    engine
        .assign_seat(&team_of("ada"), "ada", &offered, Some(at_ms))
        .expect("seat change");
    let after = consume(&engine, &key, "chat", &request, at_ms);
    assert!(
        after.is_admitted(),
        "offered {offered}, which refuses the same request once seated: {after:?}"
    );
}
