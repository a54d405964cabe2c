//! The traffic mix, after the Token Plan seed: M2.7 / M2.7-highspeed chat requests (sometimes
//! with tokens), Speech 2.8 characters, image-01 images, Hailuo videos and Music 2.6 songs
//! (`songs = 1, seconds = s`, a few over the 5-minute maximum). Also how busy a key is at each
//! local hour, and how many requests it sends in one slot of simulated time.

use tally_engine::policy::{Plan, UNIT_COUNT};
use tally_engine::{Policy, ResourceId, Unit};

use crate::rng::Rng;

/// How many units the mix draws for one request (a song names two).
const DRAWN_UNITS: usize = 2;
/// How many units a request may name: every unit, for a policy that requires them all.
pub const MAX_UNITS_PER_REQUEST: usize = UNIT_COUNT;

const HOUR_MS: u64 = 3_600_000;

/// The seed's resource names; a policy without one of them simply gets no such traffic.
const CHAT: &str = "m2.7";
const CHAT_HIGHSPEED: &str = "m2.7-highspeed";
const SPEECH: &str = "speech-2.8";
const IMAGE: &str = "image-01";
const VIDEO_FAST: &str = "hailuo-2.3-fast-768p-6s";
const VIDEO: &str = "hailuo-2.3-768p-6s";
const MUSIC: &str = "music-2.6";

/// "≤5min each": the seed's per-song maximum, which a few simulated songs go over on purpose.
const SONG_MAXIMUM_SECONDS: u64 = 300;

/// One request: a resource and up to two `(unit, quantity)` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub resource: ResourceId,
    quantities: [(Unit, u64); MAX_UNITS_PER_REQUEST],
    len: usize,
}

impl Request {
    pub fn quantities(&self) -> &[(Unit, u64)] {
        &self.quantities[..self.len]
    }
}

/// The policy's resources that traffic is drawn from, resolved once.
#[derive(Debug, Clone)]
pub struct Catalog {
    chat: Option<ResourceId>,
    chat_highspeed: Option<ResourceId>,
    speech: Option<ResourceId>,
    image: Option<ResourceId>,
    video_fast: Option<ResourceId>,
    video: Option<ResourceId>,
    music: Option<ResourceId>,
    /// For a policy that has neither chat model: its first resource stands in.
    fallback: ResourceId,
}

impl Catalog {
    pub fn new(policy: &Policy) -> Catalog {
        let find = |name: &str| policy.resource_id(name);
        Catalog {
            chat: find(CHAT),
            chat_highspeed: find(CHAT_HIGHSPEED),
            speech: find(SPEECH),
            image: find(IMAGE),
            video_fast: find(VIDEO_FAST),
            video: find(VIDEO),
            music: find(MUSIC),
            fallback: ResourceId(0),
        }
    }

    /// The chat model a key on `plan` talks to: M2.7-highspeed on a plan that covers it and not
    /// M2.7 (the Highspeed plans), M2.7 otherwise.
    pub fn chat_for(&self, plan: Option<&Plan>) -> ResourceId {
        let covers = |resource: Option<ResourceId>| match (plan, resource) {
            (Some(plan), Some(id)) => plan.covers[id.index()],
            _ => false,
        };
        if covers(self.chat_highspeed) && !covers(self.chat) {
            return self.chat_highspeed.unwrap_or(self.fallback);
        }
        self.chat.or(self.chat_highspeed).unwrap_or(self.fallback)
    }

    /// The chat model `chat` is not: keys now and then try the other one.
    fn other_chat(&self, chat: ResourceId) -> ResourceId {
        match (self.chat, self.chat_highspeed) {
            (Some(standard), Some(highspeed)) if chat == standard => highspeed,
            (Some(standard), Some(_)) => standard,
            _ => chat,
        }
    }

    /// An agent's call during a heavy burst: mostly long chat turns, some images and speech.
    pub fn draw_burst(&self, rng: &mut Rng, chat: ResourceId, policy: &Policy) -> Request {
        let roll = rng.below(100);
        let (resource, pairs) = match roll {
            0..=87 => (Some(chat), burst_chat_pairs(rng)),
            88..=93 => (self.image, [(Unit::Images, rng.between(2, 4)), NONE]),
            94..=97 => (
                self.speech,
                [(Unit::Characters, rng.between(1_500, 3_000)), NONE],
            ),
            _ => (self.music, song_pairs(rng)),
        };
        self.request(policy, resource, chat, pairs, rng)
    }

    /// An ordinary call: chat most of the time, the other modalities now and then.
    pub fn draw_ordinary(&self, rng: &mut Rng, chat: ResourceId, policy: &Policy) -> Request {
        let roll = rng.below(1_000);
        let (resource, pairs) = match roll {
            0..=839 => (Some(chat), chat_pairs(rng)),
            840..=859 => (Some(self.other_chat(chat)), chat_pairs(rng)),
            860..=909 => (
                self.speech,
                [(Unit::Characters, speech_characters(rng)), NONE],
            ),
            910..=949 => (self.image, [(Unit::Images, rng.between(1, 4)), NONE]),
            950..=979 => (self.music, song_pairs(rng)),
            980..=989 => (self.video_fast, [(Unit::Videos, 1), NONE]),
            _ => (self.video, [(Unit::Videos, 1), NONE]),
        };
        self.request(policy, resource, chat, pairs, rng)
    }

    /// Builds the request, falling back to chat for a resource the policy lacks and keeping
    /// only the units the resource meters (a custom policy may meter fewer).
    fn request(
        &self,
        policy: &Policy,
        resource: Option<ResourceId>,
        chat: ResourceId,
        pairs: [(Unit, u64); DRAWN_UNITS],
        rng: &mut Rng,
    ) -> Request {
        let (resource, pairs) = match resource {
            Some(resource) => (resource, pairs),
            None => (chat, chat_pairs(rng)),
        };
        let metered = &policy.resource(resource).units;
        let mut request = Request {
            resource,
            quantities: [NONE; MAX_UNITS_PER_REQUEST],
            len: 0,
        };
        for (unit, quantity) in pairs {
            if quantity > 0 && metered[unit.index()] {
                request.quantities[request.len] = (unit, quantity);
                request.len += 1;
            }
        }
        // A unit the resource requires that the draw did not name (a policy of its own may
        // require tokens on every chat call, or the seconds of a video): drawn as the mix
        // would, else the engine refuses the request as bad input.
        let required = &policy.resource(resource).required;
        for unit in Unit::ALL {
            let named = request.quantities().iter().any(|(named, _)| *named == unit);
            if required[unit.index()] && !named {
                request.quantities[request.len] = (unit, required_quantity(unit, rng));
                request.len += 1;
            }
        }
        if request.len == 0 {
            let unit = Unit::ALL
                .into_iter()
                .find(|unit| metered[unit.index()])
                .unwrap_or(Unit::Requests);
            request.quantities[0] = (unit, 1);
            request.len = 1;
        }
        request
    }
}

/// A quantity of `unit` for a request whose resource requires it and whose draw left it out.
fn required_quantity(unit: Unit, rng: &mut Rng) -> u64 {
    match unit {
        Unit::Tokens => rng.between(200, 12_000),
        Unit::Characters => speech_characters(rng),
        Unit::Images => rng.between(1, 4),
        Unit::Seconds => rng.between(30, SONG_MAXIMUM_SECONDS),
        Unit::Requests | Unit::Videos | Unit::Songs => 1,
    }
}

/// An unused slot of a request's pairs (quantity 0 is never sent).
const NONE: (Unit, u64) = (Unit::Requests, 0);

fn chat_pairs(rng: &mut Rng) -> [(Unit, u64); DRAWN_UNITS] {
    // Four chat requests in ten also report their tokens.
    let tokens = if rng.chance(400_000) {
        rng.between(200, 12_000)
    } else {
        0
    };
    [(Unit::Requests, 1), (Unit::Tokens, tokens)]
}

/// The nominal agent turn during a burst; `burst_requests_to_exhaust` sizes bursts with it.
pub const BURST_TOKENS_TYPICAL: u64 = 10_000;

fn burst_chat_pairs(rng: &mut Rng) -> [(Unit, u64); DRAWN_UNITS] {
    let tokens = rng.between(BURST_TOKENS_TYPICAL - 6_000, BURST_TOKENS_TYPICAL + 6_000);
    [(Unit::Requests, 1), (Unit::Tokens, tokens)]
}

fn speech_characters(rng: &mut Rng) -> u64 {
    // One in twenty is a long-form narration, larger than the smallest plans' daily quota.
    if rng.chance(50_000) {
        rng.between(4_500, 12_000)
    } else {
        rng.between(100, 2_500)
    }
}

fn song_pairs(rng: &mut Rng) -> [(Unit, u64); DRAWN_UNITS] {
    // Three songs in a hundred run past the 5-minute maximum, to show that denial.
    let seconds = if rng.chance(30_000) {
        rng.between(SONG_MAXIMUM_SECONDS + 1, SONG_MAXIMUM_SECONDS + 180)
    } else {
        rng.between(30, SONG_MAXIMUM_SECONDS)
    };
    [(Unit::Songs, 1), (Unit::Seconds, seconds)]
}

/// How many burst chat requests fill the smallest rolling limit chat touches on `plan`, or
/// `None` if no rolling limit meters it (then a burst cannot exhaust anything in particular).
pub fn burst_requests_to_exhaust(plan: &Plan, chat: ResourceId) -> Option<u64> {
    plan.touches[chat.index()]
        .iter()
        .filter_map(|touch| {
            let limit = &plan.limits[usize::from(touch.limit)];
            // Only a rolling window refills within the burst's day; calendar ones are skipped.
            limit.window.shape()?;
            let per_request = touch.weights[Unit::Requests.index()]
                + touch.weights[Unit::Tokens.index()] * BURST_TOKENS_TYPICAL;
            (per_request > 0).then(|| limit.amount.div_ceil(per_request))
        })
        .min()
}

/// How busy keys are at a local hour, in percent of their peak: quiet nights, a lunch dip and
/// a slower evening.
pub fn activity_percent(local_hour: u64) -> u64 {
    match local_hour {
        0..=6 => 10,
        7 => 40,
        8..=11 => 100,
        12..=13 => 80,
        14..=18 => 100,
        19..=22 => 70,
        _ => 40,
    }
}

/// How many requests a key sends in `slot_ms` at `milli_per_hour` thousandths of a request an
/// hour (at peak), scaled by `percent`: the whole part, plus one more with the fraction's odds.
pub fn requests_in_slot(rng: &mut Rng, milli_per_hour: u64, percent: u64, slot_ms: u64) -> u64 {
    let expected_milli = milli_per_hour * slot_ms / HOUR_MS * percent / 100;
    let whole = expected_milli / 1_000;
    let fraction_per_million = (expected_milli % 1_000) * 1_000;
    whole + u64::from(rng.chance(fraction_per_million))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::token_plan()
    }

    #[test]
    fn highspeed_plans_talk_to_the_highspeed_model_and_the_others_to_m2_7() {
        let policy = policy();
        let catalog = Catalog::new(&policy);
        let plan = |name: &str| policy.plan(policy.plan_id(name).expect(name));
        let name = |id: ResourceId| policy.resource(id).name.to_string();
        assert_eq!(
            name(catalog.chat_for(Some(plan("Plus-Highspeed")))),
            "m2.7-highspeed"
        );
        assert_eq!(name(catalog.chat_for(Some(plan("Starter")))), "m2.7");
        assert_eq!(name(catalog.chat_for(Some(plan("Bar-Plus")))), "m2.7");
        assert_eq!(name(catalog.chat_for(None)), "m2.7");
    }

    #[test]
    fn drawn_requests_only_name_units_their_resource_meters() {
        let policy = policy();
        let catalog = Catalog::new(&policy);
        let chat = catalog.chat_for(None);
        let mut rng = Rng::new(5);
        for _ in 0..5_000 {
            for request in [
                catalog.draw_ordinary(&mut rng, chat, &policy),
                catalog.draw_burst(&mut rng, chat, &policy),
            ] {
                let metered = &policy.resource(request.resource).units;
                assert!(!request.quantities().is_empty());
                for (unit, quantity) in request.quantities() {
                    assert!(metered[unit.index()] && *quantity > 0, "{request:?}");
                }
            }
        }
    }

    #[test]
    fn drawn_requests_carry_every_unit_their_resource_requires() {
        // A policy of its own may require units the traffic mix draws only now and then
        // (tokens on a chat call) or never (seconds of a video): a request without them is
        // refused as bad input, and a run counted half its traffic as engine errors.
        let policy = Policy::from_toml_str(
            r#"
time_zone = "UTC"
[resources."m2.7"]
units = ["requests", "tokens"]
required = ["requests", "tokens"]
price_micros = { requests = 1000, tokens = 1 }
[resources."hailuo-2.3-768p-6s"]
units = ["videos", "seconds", "characters"]
required = ["videos", "seconds", "characters"]
price_micros = { videos = 1000 }
[plans.One]
limits = [{ resource = "m2.7", unit = "tokens", amount = 100000, window = "weekly" }]
"#,
        )
        .expect("a policy");
        let catalog = Catalog::new(&policy);
        let chat = catalog.chat_for(None);
        let mut rng = Rng::new(5);
        for _ in 0..5_000 {
            for request in [
                catalog.draw_ordinary(&mut rng, chat, &policy),
                catalog.draw_burst(&mut rng, chat, &policy),
            ] {
                let resource = policy.resource(request.resource);
                let pairs = request.quantities();
                let required = Unit::ALL
                    .into_iter()
                    .filter(|unit| resource.required[unit.index()]);
                for unit in required {
                    assert!(pairs.iter().any(|(u, _)| *u == unit), "{request:?}");
                }
            }
        }
    }

    #[test]
    fn a_few_songs_run_past_the_five_minute_maximum() {
        let mut rng = Rng::new(9);
        let long = (0..10_000)
            .filter(|_| song_pairs(&mut rng)[1].1 > SONG_MAXIMUM_SECONDS)
            .count();
        assert!((200..400).contains(&long), "{long}");
    }

    #[test]
    fn bursts_are_sized_from_the_plans_own_rolling_limit() {
        let policy = policy();
        let catalog = Catalog::new(&policy);
        let needed = |name: &str| {
            let plan = policy.plan(policy.plan_id(name).expect(name));
            burst_requests_to_exhaust(plan, catalog.chat_for(Some(plan)))
        };
        assert_eq!(needed("Starter"), Some(1_500));
        assert_eq!(needed("Ultra-Highspeed"), Some(30_000));
        // The shared bar counts each call at its price: 2,000 + 10,000 tokens = 12,000 micros.
        assert_eq!(needed("Bar-Plus"), Some(2_000_000u64.div_ceil(12_000)));
    }

    #[test]
    fn the_expected_count_per_slot_is_kept_on_average() {
        let mut rng = Rng::new(11);
        // 4 requests an hour at peak, 5-minute slots: a third of a request per slot.
        let total: u64 = (0..30_000)
            .map(|_| requests_in_slot(&mut rng, 4_000, 100, 300_000))
            .sum();
        assert!((9_500..10_500).contains(&total), "{total}");
    }
}
