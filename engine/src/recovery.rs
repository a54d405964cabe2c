//! Recovery: opening a database rebuilds every window, balance, key, seat, idempotency record and
//! reservation exactly as they were at the last acknowledged event — from the latest snapshot
//! (checkpoint) plus the events after it — and `verify` checks a database.
//!
//! A checkpoint takes a consistent cut: it holds every lock a state change logs under (the
//! reservation table, the idempotency shards, the registry, the policy list and every key shard
//! for writing), so every event appended so far has been applied in memory and no applied change
//! is missing from the log. The cut is serialised, the log synced up to it, and the snapshot
//! stored in chunks; opening then replays only the events after it.
//!
//! Replay applies each event's exact effect (the counters, epochs and amounts a usage moved), so
//! the order in which concurrent requests met in memory does not matter: counter and credit
//! changes commute, and everything order-sensitive (seats, policies, reservations, request ids)
//! is logged under the lock that orders it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::accounts::{KeyKind, KeyState, Registry, Shard, TeamRecord, UserRecord};
use crate::adjustment::{force_counter, unforce_counter};
use crate::admission::{ChargedTo, Decision, Quantities, Receipt};
use crate::clock::Clock;
use crate::engine::{AdjustmentDirection, Engine, EngineOptions};
use crate::error::Error;
use crate::event::{Event, EventBody, GivenBack, ReservationEnd, FORMAT_VERSION};
use crate::idempotency::{Fingerprint, RequestRecord};
use crate::ledger::{Counter, KeyUsage, Team, WindowState};
use crate::log::{Durability, EventLog, Faults};
use crate::policy::{CounterId, PlanId, Policy, Window};
use crate::reservation::{Closed, Reservation, ReservationId, ReservationInner};
use crate::window::{prefetch, CalendarCounter, RawRing, RollingWindow};

/// How many cut durations `Engine::cut_lock_times` keeps.
const CUT_TIMES_KEPT: usize = 4_096;

/// How to open a database.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub durability: Durability,
    pub engine: EngineOptions,
    /// A checkpoint is taken once this many events were logged since the last one, so opening
    /// never replays more than about this many events.
    pub checkpoint_every_events: u64,
    /// Usage events stay in the log this long beyond the longest window before `compact` may
    /// drop them (their effect lives on in the snapshot).
    pub retention_ms: u64,
    /// Faults to inject into the storage (tests).
    pub faults: Option<Arc<Faults>>,
    /// A log segment is sealed and a new one started past this many bytes (and at every
    /// checkpoint); compaction deletes whole segments.
    pub segment_bytes: u64,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            durability: Durability::Sync,
            engine: EngineOptions::default(),
            checkpoint_every_events: 1_000_000,
            retention_ms: 7 * 24 * 60 * 60 * 1_000,
            faults: None,
            segment_bytes: crate::log::SEGMENT_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum CounterSnapshot {
    Rolling {
        head: u64,
        wide: bool,
        buckets: Vec<(u64, u64)>,
    },
    Calendar {
        period: u32,
        count: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeySnapshot {
    key: String,
    payg: bool,
    user: String,
    team: String,
    seat: Option<u16>,
    open_reservations: u32,
    payg_micros: u64,
    time_floor_ms: u64,
    counters: Option<Vec<(u16, CounterSnapshot)>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TeamSnapshot {
    name: String,
    owner: Option<String>,
    balance_micros: u64,
    charged_micros: u64,
    members: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RequestSnapshot {
    id: String,
    arrived_ms: u64,
    key: String,
    resource: String,
    quantities: Quantities,
    decision: Decision,
    receipt: Option<Receipt>,
    refunded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ReservationSnapshot {
    id: u64,
    key: String,
    resource: String,
    estimate: Quantities,
    receipt: Receipt,
    expires_at_ms: u64,
}

/// The whole engine state at one sequence number. A checkpoint writes its bytes without
/// building it (`RawCut::encode`, through the borrowed `SnapshotRef` and friends): a change
/// here is a change there too (a test compares the bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Snapshot {
    version: u16,
    seq: u64,
    newest_at_ms: u64,
    policies: Vec<Option<String>>,
    users: Vec<(String, String, Vec<String>)>,
    teams: Vec<TeamSnapshot>,
    keys: Vec<KeySnapshot>,
    requests: Vec<RequestSnapshot>,
    open_reservations: Vec<ReservationSnapshot>,
    closed_reservations: Vec<(u64, u64, Closed)>,
    next_reservation: u64,
}

/// A sequence of `len` elements made by a function of their index, serialized as a `Vec` of
/// them would be (`RawCut::encode`).
struct SeqOf<F>(usize, F);

impl<T: Serialize, F: Fn(usize) -> T> Serialize for SeqOf<F> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0))?;
        for index in 0..self.0 {
            seq.serialize_element(&(self.1)(index))?;
        }
        seq.end()
    }
}

// `Snapshot` and its parts with borrowed fields, for `RawCut::encode`: the same fields in the
// same order with the same serde shapes (`&str` for `String`, a sequence for a `Vec`), so the
// same bytes.

#[derive(Serialize)]
struct SnapshotRef<'a, U, T, K, R, O> {
    version: u16,
    seq: u64,
    newest_at_ms: u64,
    policies: &'a [Option<String>],
    users: U,
    teams: T,
    keys: K,
    requests: R,
    open_reservations: O,
    closed_reservations: &'a [(u64, u64, Closed)],
    next_reservation: u64,
}

#[derive(Serialize)]
enum CounterRef<'a> {
    Rolling {
        head: u64,
        wide: bool,
        buckets: &'a [(u64, u64)],
    },
    Calendar {
        period: u32,
        count: u64,
    },
}

#[derive(Serialize)]
struct KeyRef<'a, C> {
    key: &'a str,
    payg: bool,
    user: &'a str,
    team: &'a str,
    seat: Option<u16>,
    open_reservations: u32,
    payg_micros: u64,
    time_floor_ms: u64,
    counters: Option<C>,
}

#[derive(Serialize)]
struct TeamRef<'a> {
    name: &'a str,
    owner: Option<&'a str>,
    balance_micros: u64,
    charged_micros: u64,
    members: &'a [(&'a str, &'a str)],
}

#[derive(Serialize)]
struct RequestRef<'a> {
    id: &'a str,
    arrived_ms: u64,
    key: &'a str,
    resource: &'a str,
    quantities: Quantities,
    decision: Decision,
    receipt: Option<Receipt>,
    refunded: bool,
}

#[derive(Serialize)]
struct ReservationRef<'a> {
    id: u64,
    key: &'a str,
    resource: &'a str,
    estimate: Quantities,
    receipt: Receipt,
    expires_at_ms: u64,
}

/// Every string a cut copies, back to back in one buffer: copying one under the locks is a
/// `memcpy` onto its end, not an allocation.
#[derive(Debug, Default)]
struct Texts(String);

/// One string of a cut's `Texts`.
#[derive(Debug, Clone, Copy)]
struct Text {
    start: usize,
    end: usize,
}

impl Texts {
    fn push(&mut self, text: &str) -> Text {
        let start = self.0.len();
        self.0.push_str(text);
        Text {
            start,
            end: self.0.len(),
        }
    }

    fn str(&self, text: Text) -> &str {
        &self.0[text.start..text.end]
    }

    fn get(&self, text: Text) -> String {
        self.str(text).to_owned()
    }
}

/// A counter as the cut copied it.
#[derive(Debug)]
enum RawCounter {
    /// A ring's head and width, and where its occupied slots are in `RawCut::slots`.
    Rolling {
        id: u16,
        ring: RawRing,
        slots: std::ops::Range<usize>,
    },
    Calendar {
        id: u16,
        period: u32,
        count: u64,
    },
}

#[derive(Debug)]
struct RawKey {
    key: Text,
    user: Text,
    team: Text,
    payg: bool,
    seat: Option<u16>,
    open_reservations: u32,
    payg_micros: u64,
    time_floor_ms: u64,
    /// Its counters in `RawCut::counters`; `None` when the key holds no usage.
    counters: Option<std::ops::Range<usize>>,
}

#[derive(Debug)]
struct RawTeam {
    name: Text,
    owner: Option<Text>,
    balance_micros: u64,
    charged_micros: u64,
    /// Its `(user, key)` pairs in `RawCut::members`.
    members: std::ops::Range<usize>,
}

#[derive(Debug)]
struct RawUser {
    name: Text,
    default_team: Text,
    /// Its pay-as-you-go keys in `RawCut::payg_keys`.
    payg_keys: std::ops::Range<usize>,
}

#[derive(Debug)]
struct RawRequest {
    arrived_ms: u64,
    id: Text,
    key: Text,
    resource: Text,
    quantities: Quantities,
    decision: Decision,
    receipt: Option<Receipt>,
    refunded: bool,
}

#[derive(Debug)]
struct RawReservation {
    id: u64,
    key: Text,
    resource: Text,
    estimate: Quantities,
    receipt: Receipt,
    expires_at_ms: u64,
}

/// The engine's state at one sequence number as a checkpoint's cut copied it under every lock:
/// only raw copies (strings into one buffer, counter words, policies by reference), so the
/// locks are held as briefly as possible. `into_snapshot` makes the `Snapshot` of it, off the
/// locks.
#[derive(Debug, Default)]
struct RawCut {
    seq: u64,
    newest_at_ms: u64,
    policies: Vec<Option<Arc<Policy>>>,
    texts: Texts,
    /// Each key shard's policy and the end of its keys in `keys` (shards in order).
    shards: Vec<(Arc<Policy>, usize)>,
    keys: Vec<RawKey>,
    counters: Vec<RawCounter>,
    /// Every ring's occupied slots, `(slot index, raw word)` (`RollingWindow::copy_raw`).
    slots: Vec<(u32, u64)>,
    teams: Vec<RawTeam>,
    members: Vec<(Text, Text)>,
    users: Vec<RawUser>,
    payg_keys: Vec<Text>,
    requests: Vec<RawRequest>,
    open_reservations: Vec<RawReservation>,
    closed_reservations: Vec<(u64, u64, Closed)>,
    next_reservation: u64,
    /// How many bytes this cut's buffers last encoded to: room reserved for the next encoding
    /// (kept by `clear`).
    encoded_bytes: usize,
}

impl RawCut {
    /// A cut with room for about `keys` keys, made before the locks are taken.
    fn with_capacity(keys: usize) -> RawCut {
        let mut cut = RawCut::default();
        cut.reserve(keys);
        cut
    }

    /// Makes room for about `keys` keys (and as many users and teams), so that copying them
    /// under the locks does not allocate.
    fn reserve(&mut self, keys: usize) {
        let keys = keys + keys / 16 + 64;
        fn room<T>(buffer: &mut Vec<T>, wanted: usize) {
            buffer.reserve(wanted.saturating_sub(buffer.len()));
        }
        self.texts
            .0
            .reserve((keys * 112).saturating_sub(self.texts.0.len()));
        room(&mut self.shards, 64);
        room(&mut self.keys, keys);
        room(&mut self.counters, keys * 2);
        room(&mut self.slots, keys * 2);
        room(&mut self.teams, keys);
        room(&mut self.members, keys);
        room(&mut self.users, keys);
    }

    /// Empties the cut, keeping its buffers' memory for the next one.
    fn clear(&mut self) {
        let RawCut {
            seq,
            newest_at_ms,
            policies,
            texts,
            shards,
            keys,
            counters,
            slots,
            teams,
            members,
            users,
            payg_keys,
            requests,
            open_reservations,
            closed_reservations,
            next_reservation,
            encoded_bytes: _,
        } = self;
        (*seq, *newest_at_ms, *next_reservation) = (0, 0, 0);
        policies.clear();
        texts.0.clear();
        shards.clear();
        keys.clear();
        counters.clear();
        slots.clear();
        teams.clear();
        members.clear();
        users.clear();
        payg_keys.clear();
        requests.clear();
        open_reservations.clear();
        closed_reservations.clear();
    }

    /// Every key of a shard (write-locked), with the shard's policy.
    ///
    /// Memory-bound: a key's name, user, team, usage, counter list and rings are separate
    /// allocations scattered over the heap, each a cache miss, and each found only through the
    /// one before. So the loop runs a pipeline of prefetches ahead of the copy: the first
    /// allocations `PREFETCH_AHEAD` keys ahead, what they point to half as far ahead, the rings
    /// a quarter as far, and the misses of many keys overlap instead of adding up.
    fn copy_keys(&mut self, shard: &Shard) {
        const PREFETCH_AHEAD: usize = 16;
        let mut first = shard.iter();
        let mut second = shard.iter();
        let mut third = shard.iter();
        for _ in 0..PREFETCH_AHEAD {
            if let Some((key, state)) = first.next() {
                prefetch_key(key, state);
            }
        }
        for _ in 0..PREFETCH_AHEAD / 2 {
            if let Some((_, state)) = second.next() {
                prefetch_key_pointees(state);
            }
        }
        for _ in 0..PREFETCH_AHEAD / 4 {
            if let Some((_, state)) = third.next() {
                prefetch_rings(state);
            }
        }
        for (key, state) in shard.iter() {
            if let Some((key, state)) = first.next() {
                prefetch_key(key, state);
            }
            if let Some((_, state)) = second.next() {
                prefetch_key_pointees(state);
            }
            if let Some((_, state)) = third.next() {
                prefetch_rings(state);
            }
            self.push_key(key, state);
        }
        self.shards
            .push((Arc::clone(&shard.policy), self.keys.len()));
    }

    fn push_key(&mut self, key: &str, state: &KeyState) {
        let counters = state.usage.get().map(|usage| {
            let first = self.counters.len();
            for counter in &usage.counters {
                let raw = match &counter.state {
                    WindowState::Rolling(window) => {
                        let from = self.slots.len();
                        let ring = window.copy_raw(&mut self.slots);
                        RawCounter::Rolling {
                            id: counter.id.0,
                            ring,
                            slots: from..self.slots.len(),
                        }
                    }
                    WindowState::Calendar(calendar) => {
                        let (period, count) = calendar.raw();
                        RawCounter::Calendar {
                            id: counter.id.0,
                            period,
                            count,
                        }
                    }
                };
                self.counters.push(raw);
            }
            first..self.counters.len()
        });
        let raw = RawKey {
            key: self.texts.push(key),
            user: self.texts.push(&state.user),
            team: self.texts.push(&state.team.name),
            payg: state.kind == KeyKind::PayAsYouGo,
            seat: state.seat.map(|seat| seat.0),
            open_reservations: state.open_reservations.load(Ordering::Acquire),
            payg_micros: state.payg_micros.load(Ordering::Acquire),
            time_floor_ms: state.time_floor_ms,
            counters,
        };
        self.keys.push(raw);
    }

    /// The registry's users, teams and members (it is locked); the teams' balances are left
    /// for `copy_balances`, once the key shards are locked too. Returns the teams in the order
    /// of `self.teams`.
    fn copy_registry<'r>(&mut self, registry: &'r Registry) -> Vec<&'r Team> {
        let mut teams = Vec::with_capacity(registry.teams.len());
        for record in registry.teams.values() {
            self.push_team(record);
            teams.push(&*record.team);
        }
        for record in registry.users.values() {
            self.push_user(record);
        }
        teams
    }

    /// The balances of `teams` (as `copy_registry` returned them).
    fn copy_balances(&mut self, teams: &[&Team]) {
        for (raw, team) in self.teams.iter_mut().zip(teams) {
            raw.balance_micros = team.balance_micros();
            raw.charged_micros = team.charged_micros();
        }
    }

    fn push_team(&mut self, record: &TeamRecord) {
        let first = self.members.len();
        for (user, key) in &record.members {
            let pair = (self.texts.push(user), self.texts.push(key));
            self.members.push(pair);
        }
        let raw = RawTeam {
            name: self.texts.push(&record.team.name),
            owner: record.owner.as_deref().map(|owner| self.texts.push(owner)),
            balance_micros: 0,
            charged_micros: 0,
            members: first..self.members.len(),
        };
        self.teams.push(raw);
    }

    fn push_user(&mut self, record: &UserRecord) {
        let first = self.payg_keys.len();
        for key in &record.payg_keys {
            let key = self.texts.push(key);
            self.payg_keys.push(key);
        }
        let raw = RawUser {
            name: self.texts.push(&record.name),
            default_team: self.texts.push(&record.default_team),
            payg_keys: first..self.payg_keys.len(),
        };
        self.users.push(raw);
    }

    fn push_request(&mut self, arrived_ms: u64, id: &str, record: &RequestRecord) {
        let raw = RawRequest {
            arrived_ms,
            id: self.texts.push(id),
            key: self.texts.push(&record.fingerprint.key),
            resource: self.texts.push(&record.fingerprint.resource),
            quantities: record.fingerprint.quantities,
            decision: record.decision,
            receipt: record.receipt,
            refunded: record.refunded,
        };
        self.requests.push(raw);
    }

    /// The open and closed reservations (the table is locked).
    fn copy_reservations(&mut self, table: &ReservationInner) {
        for (id, reservation) in &table.open {
            let raw = RawReservation {
                id: *id,
                key: self.texts.push(&reservation.key),
                resource: self.texts.push(&reservation.resource),
                estimate: reservation.estimate,
                receipt: reservation.receipt,
                expires_at_ms: reservation.expires_at_ms,
            };
            self.open_reservations.push(raw);
        }
        self.closed_reservations.extend(
            table.closed_order.iter().filter_map(|(at_ms, id)| {
                table.closed.get(id).map(|closed| (*id, *at_ms, *closed))
            }),
        );
        self.next_reservation = table.next_id;
    }

    /// The snapshot of the cut: strings and bucket lists built, everything put in its order.
    /// The same `Snapshot` (and so the same bytes) as gathering it all under the locks.
    fn to_snapshot(&self) -> Snapshot {
        let texts = &self.texts;
        let policies = self
            .policies
            .iter()
            .map(|policy| {
                policy
                    .as_ref()
                    .and_then(|policy| serde_json::to_string(policy.document()).ok())
            })
            .collect();
        let mut teams: Vec<TeamSnapshot> = self
            .teams
            .iter()
            .map(|team| {
                let mut members: Vec<(String, String)> = self.members[team.members.clone()]
                    .iter()
                    .map(|&(user, key)| (texts.get(user), texts.get(key)))
                    .collect();
                members.sort();
                TeamSnapshot {
                    name: texts.get(team.name),
                    owner: team.owner.map(|owner| texts.get(owner)),
                    balance_micros: team.balance_micros,
                    charged_micros: team.charged_micros,
                    members,
                }
            })
            .collect();
        teams.sort_by(|a, b| a.name.cmp(&b.name));
        let mut users: Vec<(String, String, Vec<String>)> = self
            .users
            .iter()
            .map(|user| {
                let keys = self.payg_keys[user.payg_keys.clone()]
                    .iter()
                    .map(|&key| texts.get(key))
                    .collect();
                (texts.get(user.name), texts.get(user.default_team), keys)
            })
            .collect();
        users.sort();
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut first = 0;
        for (policy, end) in &self.shards {
            for key in &self.keys[first..*end] {
                keys.push(self.key_snapshot(policy, key));
            }
            first = *end;
        }
        keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let mut requests: Vec<RequestSnapshot> = self
            .requests
            .iter()
            .map(|request| RequestSnapshot {
                id: texts.get(request.id),
                arrived_ms: request.arrived_ms,
                key: texts.get(request.key),
                resource: texts.get(request.resource),
                quantities: request.quantities,
                decision: request.decision,
                receipt: request.receipt,
                refunded: request.refunded,
            })
            .collect();
        requests.sort_by(|a, b| (a.arrived_ms, &a.id).cmp(&(b.arrived_ms, &b.id)));
        let mut open_reservations: Vec<ReservationSnapshot> = self
            .open_reservations
            .iter()
            .map(|reservation| ReservationSnapshot {
                id: reservation.id,
                key: texts.get(reservation.key),
                resource: texts.get(reservation.resource),
                estimate: reservation.estimate,
                receipt: reservation.receipt,
                expires_at_ms: reservation.expires_at_ms,
            })
            .collect();
        open_reservations.sort_by_key(|reservation| reservation.id);
        let mut closed_reservations = self.closed_reservations.clone();
        closed_reservations.sort_by_key(|closed| closed.0);
        Snapshot {
            version: FORMAT_VERSION,
            seq: self.seq,
            newest_at_ms: self.newest_at_ms,
            policies,
            users,
            teams,
            keys,
            requests,
            open_reservations,
            closed_reservations,
            next_reservation: self.next_reservation,
        }
    }

    /// The snapshot's bincode bytes written straight from the cut: the very bytes of
    /// `bincode::serialize(&self.to_snapshot())` (tested), without building the `Snapshot`
    /// (a few strings and lists per key, allocated and freed again on the snapshot thread,
    /// which shares the cores with admission). The borrowed types below mirror `Snapshot`'s
    /// field for field, so serde writes the same bytes.
    fn encode(&mut self) -> Result<Vec<u8>, Error> {
        // Room for the last encoding's size: one pass (`bincode::serialize` would first walk
        // everything once to measure it).
        let bytes = Vec::with_capacity(self.encoded_bytes + self.encoded_bytes / 8);
        let bytes = self.encode_into(bytes)?;
        self.encoded_bytes = bytes.len();
        Ok(bytes)
    }

    fn encode_into(&self, mut bytes: Vec<u8>) -> Result<Vec<u8>, Error> {
        let texts = &self.texts;
        let text = |text: Text| texts.str(text);
        let policies: Vec<Option<String>> = self
            .policies
            .iter()
            .map(|policy| {
                policy
                    .as_ref()
                    .and_then(|policy| serde_json::to_string(policy.document()).ok())
            })
            .collect();
        // Every ring's live buckets in one list, each counter's range of it beside it.
        let mut buckets = Vec::new();
        let mut ranges = vec![0..0; self.counters.len()];
        let mut first = 0;
        for (policy, end) in &self.shards {
            for key in &self.keys[first..*end] {
                for index in key.counters.clone().unwrap_or(0..0) {
                    if let RawCounter::Rolling { id, ring, slots } = &self.counters[index] {
                        let shape = policy
                            .counter(CounterId(*id))
                            .window
                            .shape()
                            .unwrap_or_else(|| unreachable!("a ring is on a rolling window"));
                        let from = buckets.len();
                        ring.append_live_buckets(shape, &self.slots[slots.clone()], &mut buckets);
                        ranges[index] = from..buckets.len();
                    }
                }
            }
            first = *end;
        }
        // The orders `to_snapshot` sorts into, as lists of indexes. Names are compared by
        // their first 16 bytes as one integer first (`name_prefix`): no pointer to follow.
        let user_keys = |user: &RawUser| {
            self.payg_keys[user.payg_keys.clone()]
                .iter()
                .map(|&key| text(key))
        };
        let mut users = by_name_prefix(&self.users, |user| text(user.name));
        users.sort_by(|&(prefix_a, a), &(prefix_b, b)| {
            let (a, b) = (&self.users[a], &self.users[b]);
            prefix_a.cmp(&prefix_b).then_with(|| {
                (text(a.name), text(a.default_team))
                    .cmp(&(text(b.name), text(b.default_team)))
                    .then_with(|| user_keys(a).cmp(user_keys(b)))
            })
        });
        let mut teams = by_name_prefix(&self.teams, |team| text(team.name));
        teams.sort_by(|&(prefix_a, a), &(prefix_b, b)| {
            prefix_a
                .cmp(&prefix_b)
                .then_with(|| text(self.teams[a].name).cmp(text(self.teams[b].name)))
        });
        let mut members: Vec<(&str, &str)> = self
            .members
            .iter()
            .map(|&(user, key)| (text(user), text(key)))
            .collect();
        for team in &self.teams {
            members[team.members.clone()].sort();
        }
        let mut keys = by_name_prefix(&self.keys, |key| text(key.key));
        keys.sort_unstable_by(|&(prefix_a, a), &(prefix_b, b)| {
            prefix_a
                .cmp(&prefix_b)
                .then_with(|| text(self.keys[a].key).cmp(text(self.keys[b].key)))
        });
        let mut requests: Vec<usize> = (0..self.requests.len()).collect();
        requests.sort_by(|&a, &b| {
            let (a, b) = (&self.requests[a], &self.requests[b]);
            (a.arrived_ms, text(a.id)).cmp(&(b.arrived_ms, text(b.id)))
        });
        let mut open: Vec<usize> = (0..self.open_reservations.len()).collect();
        open.sort_by_key(|&index| self.open_reservations[index].id);
        let mut closed = self.closed_reservations.clone();
        closed.sort_by_key(|closed| closed.0);

        let snapshot = SnapshotRef {
            version: FORMAT_VERSION,
            seq: self.seq,
            newest_at_ms: self.newest_at_ms,
            policies: &policies,
            users: SeqOf(users.len(), |index: usize| {
                let user = &self.users[users[index].1];
                let payg_keys = &self.payg_keys[user.payg_keys.clone()];
                (
                    text(user.name),
                    text(user.default_team),
                    SeqOf(payg_keys.len(), move |index: usize| text(payg_keys[index])),
                )
            }),
            teams: SeqOf(teams.len(), |index: usize| {
                let team = &self.teams[teams[index].1];
                TeamRef {
                    name: text(team.name),
                    owner: team.owner.map(text),
                    balance_micros: team.balance_micros,
                    charged_micros: team.charged_micros,
                    members: &members[team.members.clone()],
                }
            }),
            keys: SeqOf(keys.len(), |index: usize| {
                let key = &self.keys[keys[index].1];
                KeyRef {
                    key: text(key.key),
                    payg: key.payg,
                    user: text(key.user),
                    team: text(key.team),
                    seat: key.seat,
                    open_reservations: key.open_reservations,
                    payg_micros: key.payg_micros,
                    time_floor_ms: key.time_floor_ms,
                    counters: key.counters.clone().map(|counters| {
                        let (buckets, ranges) = (&buckets, &ranges);
                        SeqOf(counters.len(), move |offset: usize| {
                            let index = counters.start + offset;
                            match &self.counters[index] {
                                RawCounter::Rolling { id, ring, .. } => (
                                    *id,
                                    CounterRef::Rolling {
                                        head: ring.head,
                                        wide: ring.wide,
                                        buckets: &buckets[ranges[index].clone()],
                                    },
                                ),
                                &RawCounter::Calendar { id, period, count } => {
                                    (id, CounterRef::Calendar { period, count })
                                }
                            }
                        })
                    }),
                }
            }),
            requests: SeqOf(requests.len(), |index: usize| {
                let request = &self.requests[requests[index]];
                RequestRef {
                    id: text(request.id),
                    arrived_ms: request.arrived_ms,
                    key: text(request.key),
                    resource: text(request.resource),
                    quantities: request.quantities,
                    decision: request.decision,
                    receipt: request.receipt,
                    refunded: request.refunded,
                }
            }),
            open_reservations: SeqOf(open.len(), |index: usize| {
                let reservation = &self.open_reservations[open[index]];
                ReservationRef {
                    id: reservation.id,
                    key: text(reservation.key),
                    resource: text(reservation.resource),
                    estimate: reservation.estimate,
                    receipt: reservation.receipt,
                    expires_at_ms: reservation.expires_at_ms,
                }
            }),
            closed_reservations: &closed,
            next_reservation: self.next_reservation,
        };
        bincode::serialize_into(&mut bytes, &snapshot)
            .map_err(|error| storage(format!("encoding a snapshot: {error}")))?;
        Ok(bytes)
    }

    fn key_snapshot(&self, policy: &Policy, key: &RawKey) -> KeySnapshot {
        let counters = key.counters.clone().map(|counters| {
            self.counters[counters]
                .iter()
                .map(|counter| match counter {
                    RawCounter::Rolling { id, ring, slots } => {
                        let shape = policy
                            .counter(CounterId(*id))
                            .window
                            .shape()
                            .unwrap_or_else(|| unreachable!("a ring is on a rolling window"));
                        let buckets = ring.live_buckets(shape, &self.slots[slots.clone()]);
                        let snapshot = CounterSnapshot::Rolling {
                            head: ring.head,
                            wide: ring.wide,
                            buckets,
                        };
                        (*id, snapshot)
                    }
                    &RawCounter::Calendar { id, period, count } => {
                        (id, CounterSnapshot::Calendar { period, count })
                    }
                })
                .collect()
        });
        KeySnapshot {
            key: self.texts.get(key.key),
            payg: key.payg,
            user: self.texts.get(key.user),
            team: self.texts.get(key.team),
            seat: key.seat,
            open_reservations: key.open_reservations,
            payg_micros: key.payg_micros,
            time_floor_ms: key.time_floor_ms,
            counters,
        }
    }
}

/// `items` as `(name_prefix(name), index)`, to be sorted by name.
fn by_name_prefix<'a, T>(items: &[T], name: impl Fn(&T) -> &'a str) -> Vec<(u128, usize)> {
    items
        .iter()
        .enumerate()
        .map(|(index, item)| (name_prefix(name(item)), index))
        .collect()
}

/// The first 16 bytes of `name`, zero-padded, as a big-endian integer: two names whose
/// prefixes differ compare as their prefixes do (a name that is a prefix of another pads with
/// zeros, which sort first); equal prefixes say nothing, and the names are compared.
fn name_prefix(name: &str) -> u128 {
    let mut bytes = [0u8; 16];
    let length = name.len().min(16);
    bytes[..length].copy_from_slice(&name.as_bytes()[..length]);
    u128::from_be_bytes(bytes)
}

/// The first allocations a key's copy reads: its name, user, team and usage.
fn prefetch_key(key: &str, state: &KeyState) {
    prefetch(key.as_ptr());
    prefetch(state.user.as_ptr());
    prefetch(Arc::as_ptr(&state.team));
    state.usage.prefetch();
}

/// What those point to: the team's name and the usage's counter list (`prefetch_key`'s lines
/// should have arrived by now).
fn prefetch_key_pointees(state: &KeyState) {
    prefetch(state.team.name.as_ptr());
    if let Some(usage) = state.usage.get() {
        prefetch(usage.counters.as_ptr());
    }
}

/// The key's rings' slot arrays.
fn prefetch_rings(state: &KeyState) {
    if let Some(usage) = state.usage.get() {
        for counter in &usage.counters {
            if let WindowState::Rolling(window) = &counter.state {
                window.prefetch_slots();
            }
        }
    }
}

/// How long one checkpoint cut held the engine's locks (see `Engine::cut_lock_times`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutLockTime {
    /// From taking the first lock (the reservation table) to letting go of the last: admin
    /// calls, reservations and requests with an id wait this long.
    pub every_lock: std::time::Duration,
    /// While every key shard was write-locked: no admission at all.
    pub key_shards: std::time::Duration,
}

/// What the checkpoint cuts keep between them: how long each held the locks, and the previous
/// cut's buffers, emptied, so the next cut copies into memory already allocated (and mapped)
/// instead of growing buffers under the locks. The buffers hold about 150 bytes per key and
/// per team, plus 16 per occupied ring slot, beside the strings' bytes.
#[derive(Debug, Default)]
pub(crate) struct Cuts {
    times: Mutex<std::collections::VecDeque<CutLockTime>>,
    spare: Arc<Mutex<Option<RawCut>>>,
}

impl Cuts {
    fn note(&self, time: CutLockTime) {
        let mut times = self.times.lock();
        if times.len() >= CUT_TIMES_KEPT {
            times.pop_front();
        }
        times.push_back(time);
    }

    /// The previous cut's buffers, or new ones, with room for about `keys` keys.
    fn take_spare(&self, keys: usize) -> RawCut {
        let mut cut = self
            .spare
            .lock()
            .take()
            .unwrap_or_else(|| RawCut::with_capacity(keys));
        cut.reserve(keys);
        cut
    }

    fn give_back(&self, cut: RawCut) {
        Cuts::keep_spare(&self.spare, cut);
    }

    /// Keeps `cut`'s buffers (emptied) for the next cut.
    fn keep_spare(spare: &Mutex<Option<RawCut>>, mut cut: RawCut) {
        cut.clear();
        *spare.lock() = Some(cut);
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub events: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub snapshot_seq: Option<u64>,
    /// Whether the latest snapshot equals a replay from the one before it (or from the start).
    pub snapshot_matches_replay: Option<bool>,
    /// Everything wrong, one line each; empty when the database is sound.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What `compact` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    pub snapshot_seq: u64,
    pub events_removed: u64,
    pub first_seq_kept: u64,
}

fn storage(problem: impl Into<String>) -> Error {
    Error::Storage {
        problem: problem.into(),
    }
}

fn policy_from_json(document: &str, generation: u32) -> Result<Policy, Error> {
    let mut policy = Policy::from_json_str(document).map_err(|error| {
        storage(format!(
            "policy generation {generation} in the log: {error}"
        ))
    })?;
    policy.generation = generation;
    Ok(policy)
}

impl Engine {
    /// Opens (or creates) the database in `dir`. `policy` is the policy to run with: on a new
    /// database it is the first event; on an existing one, if it differs from the stored policy
    /// it is swapped in (usage carries over), and refused if it drops a plan someone is seated on.
    pub fn open(
        dir: impl AsRef<Path>,
        policy: Policy,
        clock: Arc<dyn Clock>,
        options: OpenOptions,
    ) -> Result<Engine, Error> {
        let dir = dir.as_ref();
        let log = EventLog::open_with(
            dir,
            options.durability,
            options.faults.clone(),
            options.segment_bytes,
        )?;
        let wanted =
            serde_json::to_string(policy.document()).map_err(|error| storage(error.to_string()))?;
        let engine = Engine::new(policy, clock, options.engine);
        let mut replayed_from = 0;
        if let Some(pointer) = log.snapshot_pointer()? {
            let snapshot = decode_snapshot(&log.read_snapshot(&pointer)?, pointer.seq)?;
            engine.restore(&snapshot)?;
            replayed_from = pointer.seq;
        } else if log.log_start()? > 1 {
            return Err(storage(format!(
                "{}: the log starts after event 1 but there is no snapshot",
                dir.display()
            )));
        }
        let replayed = engine.replay_log(&log, replayed_from, u64::MAX)?;
        let fresh = replayed_from == 0 && replayed == 0;
        if engine.journal.set(log).is_err() {
            unreachable!("a new engine has no journal yet");
        }
        engine
            .checkpointed_seq
            .store(replayed_from, Ordering::Relaxed);
        let at_ms = engine.now_ms().min(crate::calendar::MAX_TIMESTAMP_MS - 1);
        if fresh {
            engine.commit(
                at_ms,
                EventBody::PolicySwapped {
                    generation: 0,
                    document: wanted,
                },
            )?;
        } else if serde_json::to_string(engine.policy().document())
            .ok()
            .as_deref()
            != Some(wanted.as_str())
        {
            engine.swap_policy(Policy::from_json_str(&wanted)?, Some(at_ms))?;
        }
        if replayed > options.checkpoint_every_events / 2 {
            engine.checkpoint()?;
        }
        engine
            .checkpoint_every
            .store(options.checkpoint_every_events.max(1), Ordering::Relaxed);
        engine
            .retention_ms
            .store(options.retention_ms, Ordering::Relaxed);
        Ok(engine)
    }

    /// Replays events in `(after, up_to]`; returns how many.
    fn replay_log(&self, log: &EventLog, after: u64, up_to: u64) -> Result<u64, Error> {
        let mut next = after;
        let mut count = 0;
        let mut debts = Debts::default();
        log.scan(after, |raw| {
            if raw.seq > up_to {
                return Ok(false);
            }
            if raw.seq != next + 1 {
                return Err(storage(format!(
                    "the log jumps from event {next} to {}: events are missing",
                    raw.seq
                )));
            }
            let event = crate::event::decode_raw(raw)?;
            self.replay(&event, &mut debts).map_err(|error| {
                storage(format!(
                    "replaying event {} ({}): {error}",
                    event.seq,
                    event.body.kind()
                ))
            })?;
            self.note_event_time(event.at_ms);
            next = event.seq;
            count += 1;
            Ok(true)
        })?;
        self.finish_replay(count, &debts)
    }

    fn finish_replay(&self, count: u64, _debts: &Debts) -> Result<u64, Error> {
        // A debt left over is a correction whose usage aged out of its window before the
        // correction was logged: it no longer counts anywhere, so there is nothing to settle.
        let registry = self.registry.lock();
        for record in registry.teams.values() {
            if record.team.balance_micros() > i64::MAX as u64 {
                return Err(storage(format!(
                    "team {:?}: the log's credits sum to a negative balance",
                    record.team.name
                )));
            }
        }
        Ok(count)
    }

    /// Applies one logged event.
    fn replay(&self, event: &Event, debts: &mut Debts) -> Result<(), Error> {
        let at = Some(event.at_ms);
        match &event.body {
            EventBody::UserCreated { user, key } => self.create_user(user, key, at),
            EventBody::TeamCreated { team } => self.create_team(team, at),
            EventBody::MemberAdded { team, user, key } => self.add_member(team, user, key, at),
            EventBody::PayAsYouGoKeyCreated { user, key } => self.create_payg_key(user, key, at),
            EventBody::SeatChanged {
                team, user, plan, ..
            } => match plan {
                Some(plan) => self.assign_seat(team, user, plan, at),
                None => self.unassign_seat(team, user, at),
            },
            EventBody::CreditsToppedUp { team, micros } => {
                self.team(team)?.replay_add(*micros, false);
                Ok(())
            }
            EventBody::CreditsWithdrawn { team, micros } => {
                self.team(team)?.replay_take(*micros, false);
                Ok(())
            }
            EventBody::PolicySwapped {
                generation,
                document,
            } => self.replay_policy(*generation, document, event.at_ms),
            EventBody::UsageAdmitted {
                key,
                resource,
                quantities,
                request_id,
                decision,
                receipt,
            } => {
                self.apply_receipt(key, receipt, debts)?;
                if let (Some(id), Some(decision)) = (request_id, decision) {
                    let fingerprint = Fingerprint {
                        key: key.as_str().into(),
                        resource: resource.as_str().into(),
                        quantities: *quantities,
                    };
                    let record = RequestRecord {
                        fingerprint,
                        decision: *decision,
                        receipt: Some(*receipt),
                        refunded: false,
                    };
                    self.requests.restore(id, event.at_ms, record);
                }
                Ok(())
            }
            EventBody::RequestDenied {
                request_id,
                key,
                resource,
                quantities,
                decision,
            } => {
                let fingerprint = Fingerprint {
                    key: key.as_str().into(),
                    resource: resource.as_str().into(),
                    quantities: *quantities,
                };
                let record = RequestRecord {
                    fingerprint,
                    decision: *decision,
                    receipt: None,
                    refunded: false,
                };
                self.requests.restore(request_id, event.at_ms, record);
                Ok(())
            }
            EventBody::ReservationOpened {
                reservation,
                key,
                resource,
                estimate,
                expires_at_ms,
                receipt,
                ..
            } => {
                self.apply_receipt(key, receipt, debts)?;
                self.keys.read(key, |_, state| {
                    state.map(|state| state.open_reservations.fetch_add(1, Ordering::AcqRel))
                });
                let mut table = self.reservations.inner.lock();
                table.next_id = table.next_id.max(*reservation);
                let id = ReservationId(
                    std::num::NonZeroU64::new(*reservation)
                        .ok_or_else(|| storage("reservation 0"))?,
                );
                let entry = Reservation {
                    key: key.as_str().into(),
                    resource: resource.as_str().into(),
                    estimate: *estimate,
                    receipt: *receipt,
                    expires_at_ms: *expires_at_ms,
                };
                table.insert(id, entry);
                Ok(())
            }
            EventBody::ReservationClosed {
                reservation,
                key,
                end,
                given_back,
            } => {
                self.apply_given_back(key, given_back, debts);
                let closed = match end {
                    ReservationEnd::Settled { settlement, extra } => {
                        if let Some(extra) = extra {
                            self.apply_receipt(key, extra, debts)?;
                        }
                        Closed::Settled(*settlement)
                    }
                    ReservationEnd::Voided => Closed::Voided,
                    ReservationEnd::Expired => Closed::Expired,
                };
                let mut table = self.reservations.inner.lock();
                if let Some(entry) = table.remove_open(*reservation) {
                    table.close(*reservation, closed, event.at_ms);
                    drop(table);
                    self.keys.read(&entry.key, |_, state| {
                        state.map(KeyState::close_reservation)
                    });
                }
                Ok(())
            }
            EventBody::Refunded {
                request_id,
                key,
                given_back,
            } => {
                self.apply_given_back(key, given_back, debts);
                self.requests.with_record(request_id, |record| {
                    if let Some(record) = record {
                        record.refunded = true;
                    }
                    Ok(())
                })
            }
            EventBody::UsageAdjusted {
                key,
                direction,
                generation,
                moved,
                ..
            } => {
                let counters: Vec<_> = moved.clone();
                match direction {
                    AdjustmentDirection::Add => {
                        let receipt_like = GivenBack {
                            generation: *generation,
                            counters,
                            ..GivenBack::default()
                        };
                        self.apply_counters(key, &receipt_like, debts);
                    }
                    AdjustmentDirection::Remove => {
                        let given = GivenBack {
                            generation: *generation,
                            counters,
                            ..GivenBack::default()
                        };
                        self.apply_given_back(key, &given, debts);
                    }
                }
                Ok(())
            }
        }
    }

    fn replay_policy(&self, generation: u32, document: &str, at_ms: u64) -> Result<(), Error> {
        let policy = policy_from_json(document, generation)?;
        if generation == 0 {
            self.install_policies(vec![Some(Arc::new(policy))]);
            return Ok(());
        }
        let expected = self.policies.read().len() as u32;
        if generation != expected {
            return Err(storage(format!(
                "policy generation {generation} follows generation {}",
                expected - 1
            )));
        }
        self.swap_policy(policy, Some(at_ms))
    }

    /// Replaces the policy list (a new engine being restored) and points every shard at the last.
    fn install_policies(&self, policies: Vec<Option<Arc<Policy>>>) {
        let current = policies
            .last()
            .and_then(Clone::clone)
            .unwrap_or_else(|| unreachable!("a restored list is never empty"));
        let mut list = self.policies.write();
        *list = policies;
        for mut shard in self.keys.lock_all() {
            shard.policy = Arc::clone(&current);
        }
    }

    /// Applies what a logged admitted usage moved.
    fn apply_receipt(&self, key: &str, receipt: &Receipt, debts: &mut Debts) -> Result<(), Error> {
        match receipt.charged_to {
            ChargedTo::PlanQuota { .. } => {
                // Holds are (counter, amount, time); moves are (counter, time, amount).
                let counters = receipt
                    .holds
                    .as_slice()
                    .iter()
                    .map(|&(counter, amount, time)| (counter, time, amount))
                    .collect();
                let moved = GivenBack {
                    generation: receipt.generation,
                    counters,
                    ..GivenBack::default()
                };
                self.apply_counters(key, &moved, debts);
            }
            ChargedTo::Credits { micros } => {
                self.keys.read(key, |_, state| {
                    state.map(|state| state.team.replay_take(micros, true))
                });
            }
            ChargedTo::PayAsYouGo { micros } => {
                self.keys
                    .read(key, |_, state| state.map(|state| state.add_payg(micros)));
            }
        }
        Ok(())
    }

    /// Adds logged counter amounts, first paying off any debt from an earlier removal.
    fn apply_counters(&self, key: &str, moved: &GivenBack, debts: &mut Debts) {
        let then = self.policy_of_generation(moved.generation);
        self.keys.read(key, |policy, state| {
            let (Some(state), Some(then)) = (state, then.as_deref()) else {
                return;
            };
            let usage = state
                .usage
                .get_or_init(|| KeyUsage::for_plan(policy, state.seat));
            for &(counter, time, amount) in &moved.counters {
                let Some(current) = translate(then, policy, counter) else {
                    continue;
                };
                let owed = debts.take(key, current, time, amount);
                if amount > owed {
                    force_counter(policy, usage, current, time, amount - owed);
                }
            }
        });
    }

    /// Takes back logged give-back amounts exactly; what the counter does not hold yet (its add
    /// comes later in the log) is kept as a debt.
    fn apply_given_back(&self, key: &str, given: &GivenBack, debts: &mut Debts) {
        let then = self.policy_of_generation(given.generation);
        self.keys.read(key, |policy, state| {
            let Some(state) = state else { return };
            if given.credits_micros > 0 {
                state.team.replay_add(given.credits_micros, true);
            }
            if given.payg_micros > 0 {
                state.subtract_payg(given.payg_micros);
            }
            let (Some(usage), Some(then)) = (state.usage.get(), then.as_deref()) else {
                return;
            };
            for &(counter, time, amount) in &given.counters {
                let Some(current) = translate(then, policy, counter) else {
                    continue;
                };
                let short = unforce_counter(policy, usage, current, time, amount);
                if short > 0 {
                    debts.add(key, current, time, short);
                }
            }
        });
    }

    // -----------------------------------------------------------------------------------------
    // Checkpoints.

    /// Takes a consistent snapshot of the whole state and stores it; returns the sequence
    /// number it covers. Opening then replays only the events after it.
    pub fn checkpoint(&self) -> Result<u64, Error> {
        let journal = self.journal().ok_or_else(|| {
            Error::invalid("engine", "an in-memory engine has no log to checkpoint")
        })?;
        let _one_at_a_time = self.checkpointing.lock();
        // A periodic checkpoint still being written lands first (snapshots keep their order).
        journal.finish_snapshot_in_background()?;
        let mut cut = self.cut_rotating(journal);
        let (seq, bytes) = (cut.seq, cut.encode());
        self.cuts.give_back(cut);
        let bytes = bytes?;
        journal.sync()?;
        journal.write_snapshot(seq, &bytes)?;
        self.checkpointed_seq.store(seq, Ordering::Relaxed);
        Ok(seq)
    }

    /// The cut of a checkpoint; the next segment starts right after it, so compaction can drop
    /// whole segments.
    fn cut_rotating(&self, journal: &EventLog) -> RawCut {
        self.cut_raw(|| {
            let seq = journal.next_seq() - 1;
            journal.rotate_at(seq + 1);
            seq
        })
    }

    /// A periodic checkpoint: the cut is taken here (every lock held for its duration); making
    /// the snapshot of it, encoding it, waiting for the log to be durable up to it and writing
    /// it happen on the log's snapshot thread, so the caller that crossed the threshold goes
    /// back to work at once.
    fn checkpoint_in_background(&self, journal: &EventLog) {
        let _one_at_a_time = self.checkpointing.lock();
        if journal.finish_snapshot_in_background().is_err() {
            return;
        }
        let mut cut = self.cut_rotating(journal);
        let seq = cut.seq;
        self.checkpointed_seq.store(seq, Ordering::Relaxed);
        let spare = Arc::clone(&self.cuts.spare);
        journal.write_snapshot_in_background(
            seq,
            Box::new(move || {
                let bytes = cut.encode();
                Cuts::keep_spare(&spare, cut);
                bytes
            }),
        );
    }

    /// Takes a checkpoint if enough events were logged since the last one (called after a
    /// commit; the caller that crosses the threshold does the work).
    pub(crate) fn maybe_checkpoint(&self) {
        let Some(journal) = self.journal() else {
            return;
        };
        let seq = journal.last_appended();
        let every = self.checkpoint_every.load(Ordering::Relaxed);
        let last = self.checkpointed_seq.load(Ordering::Relaxed);
        if seq.saturating_sub(last) >= every {
            if let Some(_busy) = self.checkpointing.try_lock() {
                drop(_busy);
                self.checkpoint_in_background(journal);
            }
        }
    }

    /// How long each checkpoint cut since the engine was created held its locks, oldest
    /// first; the latest `CUT_TIMES_KEPT` are kept. For benchmarks.
    #[doc(hidden)]
    pub fn cut_lock_times(&self) -> Vec<CutLockTime> {
        self.cuts.times.lock().iter().copied().collect()
    }

    /// Builds a snapshot with every lock taken in the engine's lock order (see `cut_raw`).
    fn cut(&self, seq: impl FnOnce() -> u64) -> Snapshot {
        let cut = self.cut_raw(seq);
        let snapshot = cut.to_snapshot();
        self.cuts.give_back(cut);
        snapshot
    }

    /// Copies the state at one sequence number (the one `seq` returns, called with every lock
    /// held): every event appended up to it has been applied and no applied change is
    /// unlogged.
    ///
    /// The locks are taken in the engine's lock order, and each part of the state is copied
    /// as soon as the lock that guards it is held: the reservation table, then the request
    /// ids, then the registry's users, teams and members. None of them can change after its
    /// copy, for its lock stays held until the end. Only then are the key shards
    /// write-locked (admission waits from here on), `seq` read, and what changes under a
    /// shard's read lock copied: team balances, keys, their counters. So admission waits only
    /// for the keys' copy.
    ///
    /// Only raw copies are made: strings into one buffer, counter words, each ring's occupied
    /// slots, into the previous cut's buffers (no allocation under the locks when the state
    /// has not grown). Putting them in order, converting and encoding happen after the locks
    /// are let go (`RawCut::to_snapshot`; for a periodic checkpoint, on the snapshot thread).
    fn cut_raw(&self, seq: impl FnOnce() -> u64) -> RawCut {
        let mut cut = self.cuts.take_spare(self.keys.len() as usize);
        let locking = std::time::Instant::now();
        let table = self.reservations.inner.lock();
        cut.copy_reservations(&table);
        let requests_guard = self.requests.lock_all();
        crate::idempotency::RequestTable::visit(&requests_guard, |arrived_ms, id, record| {
            cut.push_request(arrived_ms, id, record);
        });
        let registry = self.registry.lock();
        let teams = cut.copy_registry(&registry);
        let policies_guard = self.policies.read();
        cut.policies.clone_from(&policies_guard);
        let shards_locking = std::time::Instant::now();
        let shards = self.keys.lock_all();
        cut.seq = seq();
        cut.newest_at_ms = self.newest_event_ms();
        // Credits move under a key shard's read lock (admission) as well as the registry's.
        cut.copy_balances(&teams);
        for shard in &shards {
            cut.copy_keys(shard);
        }
        // Everything is copied: the engine goes on while the copy is put in order.
        drop(shards);
        let key_shards = shards_locking.elapsed();
        drop(teams);
        drop((policies_guard, registry, requests_guard, table));
        self.cuts.note(CutLockTime {
            every_lock: locking.elapsed(),
            key_shards,
        });
        cut
    }

    /// The cut as it was gathered before `cut_raw` (every string and bucket list built under
    /// the locks): the reference the raw cut is tested against.
    #[cfg(test)]
    fn cut_reference(&self, seq: u64) -> Snapshot {
        let table = self.reservations.inner.lock();
        let requests_guard = self.requests.lock_all();
        let registry = self.registry.lock();
        let policies_guard = self.policies.read();
        let shards = self.keys.lock_all();
        let teams: Vec<TeamSnapshot> = registry
            .teams
            .values()
            .map(|record| {
                let mut members: Vec<(String, String)> = record
                    .members
                    .iter()
                    .map(|(user, key)| (user.to_string(), key.to_string()))
                    .collect();
                members.sort();
                TeamSnapshot {
                    name: record.team.name.to_string(),
                    owner: record.owner.as_deref().map(Into::into),
                    balance_micros: record.team.balance_micros(),
                    charged_micros: record.team.charged_micros(),
                    members,
                }
            })
            .collect();
        let users: Vec<(String, String, Vec<String>)> = registry
            .users
            .values()
            .map(|record| {
                let keys = record.payg_keys.iter().map(|key| key.to_string()).collect();
                (
                    record.name.to_string(),
                    record.default_team.to_string(),
                    keys,
                )
            })
            .collect();
        let mut keys = Vec::new();
        for shard in &shards {
            for (key, state) in shard.iter() {
                keys.push(key_snapshot(&shard.policy, key, state));
            }
        }
        let requests = crate::idempotency::RequestTable::export(&requests_guard)
            .into_iter()
            .map(|(arrived_ms, id, record)| RequestSnapshot {
                id,
                arrived_ms,
                key: record.fingerprint.key.to_string(),
                resource: record.fingerprint.resource.to_string(),
                quantities: record.fingerprint.quantities,
                decision: record.decision,
                receipt: record.receipt,
                refunded: record.refunded,
            })
            .collect();
        let open_reservations: Vec<ReservationSnapshot> = table
            .open
            .iter()
            .map(|(id, reservation)| ReservationSnapshot {
                id: *id,
                key: reservation.key.to_string(),
                resource: reservation.resource.to_string(),
                estimate: reservation.estimate,
                receipt: reservation.receipt,
                expires_at_ms: reservation.expires_at_ms,
            })
            .collect();
        let closed_reservations: Vec<(u64, u64, Closed)> = table
            .closed_order
            .iter()
            .filter_map(|(at_ms, id)| table.closed.get(id).map(|closed| (*id, *at_ms, *closed)))
            .collect();
        let policies = policies_guard
            .iter()
            .map(|policy| {
                policy
                    .as_ref()
                    .and_then(|policy| serde_json::to_string(policy.document()).ok())
            })
            .collect();
        let mut snapshot = Snapshot {
            version: FORMAT_VERSION,
            seq,
            newest_at_ms: self.newest_event_ms(),
            policies,
            users,
            teams,
            keys,
            requests,
            open_reservations,
            closed_reservations,
            next_reservation: table.next_id,
        };
        // Everything is copied: the engine goes on while the copy is put in order.
        drop((shards, policies_guard, registry, requests_guard, table));
        snapshot.teams.sort_by(|a, b| a.name.cmp(&b.name));
        snapshot.users.sort();
        snapshot.keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        snapshot
            .open_reservations
            .sort_by_key(|reservation| reservation.id);
        snapshot.closed_reservations.sort_by_key(|closed| closed.0);
        snapshot
    }

    /// Rebuilds the state of a new engine from a snapshot.
    fn restore(&self, snapshot: &Snapshot) -> Result<(), Error> {
        let mut policies = Vec::with_capacity(snapshot.policies.len());
        for (generation, document) in snapshot.policies.iter().enumerate() {
            policies.push(match document {
                Some(document) => Some(Arc::new(policy_from_json(document, generation as u32)?)),
                None => None,
            });
        }
        if policies.last().is_none_or(Option::is_none) {
            return Err(storage(format!(
                "snapshot {}: no current policy",
                snapshot.seq
            )));
        }
        self.install_policies(policies);
        let policy = self.policy();
        let mut registry = self.registry.lock();
        for team in &snapshot.teams {
            let state = Arc::new(Team::new(&team.name));
            state.restore(team.balance_micros, team.charged_micros);
            let members = team
                .members
                .iter()
                .map(|(user, key)| (Arc::<str>::from(user.as_str()), key.as_str().into()))
                .collect();
            let owner = team.owner.as_deref().map(Arc::<str>::from);
            registry.teams.insert(
                team.name.as_str().into(),
                TeamRecord {
                    team: state,
                    members,
                    owner,
                },
            );
        }
        for (user, default_team, payg_keys) in &snapshot.users {
            let name: Arc<str> = user.as_str().into();
            let payg_keys = payg_keys.iter().map(|key| key.as_str().into()).collect();
            let record = UserRecord {
                name: Arc::clone(&name),
                default_team: default_team.as_str().into(),
                payg_keys,
            };
            registry.users.insert(name, record);
        }
        for key in &snapshot.keys {
            let team = registry
                .teams
                .get(key.team.as_str())
                .map(|record| Arc::clone(&record.team))
                .ok_or_else(|| {
                    storage(format!(
                        "snapshot {}: key {:?} names unknown team {:?}",
                        snapshot.seq, key.key, key.team
                    ))
                })?;
            let kind = if key.payg {
                KeyKind::PayAsYouGo
            } else {
                KeyKind::Plan
            };
            let mut state = KeyState::new(kind, key.user.as_str().into(), team);
            state.seat = key.seat.map(PlanId);
            state
                .open_reservations
                .store(key.open_reservations, Ordering::Release);
            state.payg_micros.store(key.payg_micros, Ordering::Release);
            state.time_floor_ms = key.time_floor_ms;
            if let Some(counters) = &key.counters {
                state.usage.set(Some(restore_usage(&policy, counters)?));
            }
            self.keys.insert(&key.key, state);
        }
        drop(registry);
        for request in &snapshot.requests {
            let fingerprint = Fingerprint {
                key: request.key.as_str().into(),
                resource: request.resource.as_str().into(),
                quantities: request.quantities,
            };
            let record = RequestRecord {
                fingerprint,
                decision: request.decision,
                receipt: request.receipt,
                refunded: request.refunded,
            };
            self.requests
                .restore(&request.id, request.arrived_ms, record);
        }
        let mut table = self.reservations.inner.lock();
        table.next_id = snapshot.next_reservation;
        for reservation in &snapshot.open_reservations {
            let id = ReservationId(
                std::num::NonZeroU64::new(reservation.id)
                    .ok_or_else(|| storage("reservation 0"))?,
            );
            let entry = Reservation {
                key: reservation.key.as_str().into(),
                resource: reservation.resource.as_str().into(),
                estimate: reservation.estimate,
                receipt: reservation.receipt,
                expires_at_ms: reservation.expires_at_ms,
            };
            table.insert(id, entry);
        }
        for &(id, at_ms, closed) in &snapshot.closed_reservations {
            table.close(id, closed, at_ms);
        }
        self.note_event_time(snapshot.newest_at_ms);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Export, retention, verify, close.

    /// Up to `limit` events after sequence number `after`, in order: for billing export.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, Error> {
        self.require_journal()?.events_after(after, limit)
    }

    /// A named export cursor (0 if never saved); it survives restarts.
    pub fn cursor(&self, name: &str) -> Result<u64, Error> {
        crate::engine::check_id("cursor", name, 128)?;
        self.require_journal()?.cursor(name)
    }

    pub fn save_cursor(&self, name: &str, seq: u64) -> Result<(), Error> {
        crate::engine::check_id("cursor", name, 128)?;
        let journal = self.require_journal()?;
        if seq >= journal.next_seq() {
            return Err(Error::invalid(
                "seq",
                format!("{seq} is beyond the last event, {}", journal.next_seq() - 1),
            ));
        }
        journal.save_cursor(name, seq)
    }

    /// Makes everything logged so far durable, whatever the durability mode.
    pub fn sync(&self) -> Result<(), Error> {
        self.require_journal()?.sync()
    }

    /// Takes a checkpoint, then drops usage events older than the longest window plus the
    /// retention (their effect lives on in the snapshot). Events after the snapshot before the
    /// latest are kept, so `verify` can replay between the two.
    pub fn compact(&self, at_ms: Option<u64>) -> Result<CompactReport, Error> {
        let at_ms = self.resolve_time(at_ms)?;
        let journal = self.require_journal()?;
        let snapshot_seq = self.checkpoint()?;
        journal.wait_rotation(snapshot_seq + 1)?;
        let keep_after = journal
            .previous_snapshot_pointer()?
            .map_or(0, |pointer| pointer.seq);
        let horizon = self
            .policy()
            .longest_window_ms()
            .saturating_add(self.retention_ms.load(Ordering::Relaxed));
        let removed = journal.compact(keep_after, at_ms.saturating_sub(horizon))?;
        Ok(CompactReport {
            snapshot_seq,
            events_removed: removed,
            first_seq_kept: journal.log_start()?,
        })
    }

    /// Checks a database: every record decodes, sequence numbers are gap-free, and the latest
    /// snapshot equals a replay of the log from the snapshot before it (or from the start).
    pub fn verify(dir: impl AsRef<Path>, options: OpenOptions) -> Result<VerifyReport, Error> {
        let log = EventLog::open_read_only(dir.as_ref())?;
        let mut report = VerifyReport::default();
        let mut bodies = Vec::new();
        let problems = log.walk(|record| {
            report.records += 1;
            let _ = record.for_each(|raw| {
                if let Err(error) = crate::event::decode_body(raw.seq, raw.body) {
                    bodies.push(format!(
                        "log record of events {} to {}: {error}",
                        record.first_seq,
                        record.last_seq()
                    ));
                }
                if report.first_seq == 0 {
                    report.first_seq = raw.seq;
                }
                report.last_seq = raw.seq;
                report.events += 1;
                Ok(true)
            });
        });
        report.problems.extend(problems);
        report.problems.extend(bodies);
        if let Some(pointer) = log.snapshot_pointer()? {
            report.snapshot_seq = Some(pointer.seq);
            match verify_snapshot(&log, pointer, &options) {
                Ok(matches) => {
                    report.snapshot_matches_replay = Some(matches);
                    if !matches {
                        report.problems.push(format!(
                            "snapshot {} does not match a replay of the log",
                            pointer.seq
                        ));
                    }
                }
                Err(error) => report.problems.push(error.to_string()),
            }
        }
        log.close()?;
        Ok(report)
    }

    /// Checkpoints, flushes and closes the log. Dropping the engine also closes it, without
    /// the checkpoint.
    pub fn close(self) -> Result<(), Error> {
        if let Some(journal) = self.journal() {
            self.checkpoint()?;
            journal.close()?;
        }
        Ok(())
    }

    fn require_journal(&self) -> Result<&EventLog, Error> {
        self.journal()
            .ok_or_else(|| Error::invalid("engine", "an in-memory engine has no log"))
    }
}

/// Replays from the snapshot before the latest (or the start) up to the latest and compares.
fn verify_snapshot(
    log: &EventLog,
    latest: crate::log::SnapshotPointer,
    options: &OpenOptions,
) -> Result<bool, Error> {
    let stored = decode_snapshot(&log.read_snapshot(&latest)?, latest.seq)?;
    let base = match log.previous_snapshot_pointer()? {
        Some(previous) if previous.seq < latest.seq => Some(decode_snapshot(
            &log.read_snapshot(&previous)?,
            previous.seq,
        )?),
        _ => None,
    };
    let first_needed = base.as_ref().map_or(1, |snapshot| snapshot.seq + 1);
    if log.log_start()? > first_needed {
        return Err(storage(format!(
            "the events before snapshot {} were compacted: nothing to replay it from",
            latest.seq
        )));
    }
    let policy = Policy::token_plan();
    let engine = Engine::new(
        policy,
        Arc::new(crate::clock::ManualClock::new(0)),
        options.engine,
    );
    let from = match &base {
        Some(snapshot) => {
            engine.restore(snapshot)?;
            snapshot.seq
        }
        None => 0,
    };
    engine.replay_log(log, from, latest.seq)?;
    let replayed = engine.cut(|| latest.seq);
    Ok(normalized(&replayed, &stored) == normalized(&stored, &stored))
}

fn decode_snapshot(bytes: &[u8], seq: u64) -> Result<Snapshot, Error> {
    let version: u16 = bincode::deserialize(bytes.get(..2).unwrap_or(&[]))
        .map_err(|error| storage(format!("snapshot {seq}: cannot read its version: {error}")))?;
    if version != FORMAT_VERSION {
        return Err(storage(format!(
            "snapshot {seq}: format version {version}; this build reads {FORMAT_VERSION}"
        )));
    }
    bincode::deserialize(bytes)
        .map_err(|error| storage(format!("snapshot {seq} is damaged: {error}")))
}

/// A snapshot with what does not change what the engine would decide taken out: ring heads
/// (advanced by reads without events), buckets and periods no longer live as of `reference`'s
/// time, empty counters, and keys whose usage was reclaimed.
fn normalized(snapshot: &Snapshot, reference: &Snapshot) -> Snapshot {
    let mut out = snapshot.clone();
    let policy = reference
        .policies
        .last()
        .and_then(|document| document.as_deref())
        .and_then(|document| Policy::from_json_str(document).ok());
    let head_of = |key: &str, counter: u16| -> Option<u64> {
        let found = reference
            .keys
            .binary_search_by(|probe| probe.key.as_str().cmp(key))
            .ok()?;
        reference.keys[found]
            .counters
            .as_ref()?
            .iter()
            .find_map(|(id, state)| match state {
                CounterSnapshot::Rolling { head, .. } if *id == counter => Some(*head),
                _ => None,
            })
    };
    out.newest_at_ms = 0;
    // Request ids and closed reservations age out of memory without an event (by the clock),
    // so a replay may still hold some the live engine had forgotten: compare only the ones the
    // reference kept.
    out.requests
        .retain(|request| reference.requests.iter().any(|kept| kept.id == request.id));
    out.closed_reservations.retain(|closed| {
        reference
            .closed_reservations
            .iter()
            .any(|kept| kept.0 == closed.0)
    });
    for request in &mut out.requests {
        request.arrived_ms = 0;
    }
    for closed in &mut out.closed_reservations {
        closed.1 = 0;
    }
    for key in &mut out.keys {
        key.time_floor_ms = 0;
        let Some(counters) = key.counters.as_mut() else {
            continue;
        };
        for (id, state) in counters.iter_mut() {
            match state {
                CounterSnapshot::Rolling {
                    head,
                    buckets,
                    wide,
                } => {
                    let reference_head = head_of(&key.key, *id).unwrap_or(*head).max(*head);
                    let span = policy
                        .as_ref()
                        .and_then(|policy| {
                            policy
                                .counters()
                                .get(usize::from(*id))
                                .and_then(|spec| spec.window.shape())
                        })
                        .map_or(0, |shape| shape.buckets);
                    buckets.retain(|(epoch, count)| *count > 0 && epoch + span >= reference_head);
                    *head = 0;
                    *wide = false;
                }
                CounterSnapshot::Calendar { period, count } => {
                    let current = policy.as_ref().and_then(|policy| {
                        match policy.counters().get(usize::from(*id))?.window {
                            Window::Calendar(kind) => Some(
                                policy
                                    .calendar()
                                    .period_of(kind, reference.newest_at_ms)
                                    .index,
                            ),
                            Window::Rolling { .. } => None,
                        }
                    });
                    if *count == 0 || current.is_some_and(|current| *period < current) {
                        *period = 0;
                        *count = 0;
                    }
                }
            }
        }
        counters.retain(|(_, state)| match state {
            CounterSnapshot::Rolling { buckets, .. } => !buckets.is_empty(),
            CounterSnapshot::Calendar { count, .. } => *count > 0,
        });
        if counters.is_empty() {
            key.counters = None;
        }
    }
    out
}

#[cfg(test)]
fn key_snapshot(policy: &Policy, key: &str, state: &KeyState) -> KeySnapshot {
    let counters = state.usage.get().map(|usage| {
        usage
            .counters
            .iter()
            .map(|counter| {
                let snapshot = match &counter.state {
                    WindowState::Rolling(window) => {
                        let shape = policy
                            .counter(counter.id)
                            .window
                            .shape()
                            .unwrap_or_else(|| unreachable!());
                        let head = window.head();
                        let buckets = window
                            .buckets(shape, head)
                            .into_iter()
                            .map(|(start_ms, count)| (start_ms / shape.bucket_ms, count))
                            .collect();
                        CounterSnapshot::Rolling {
                            head,
                            wide: window.is_wide(),
                            buckets,
                        }
                    }
                    WindowState::Calendar(calendar) => {
                        let (period, count) = calendar.raw();
                        CounterSnapshot::Calendar { period, count }
                    }
                };
                (counter.id.0, snapshot)
            })
            .collect()
    });
    KeySnapshot {
        key: key.into(),
        payg: state.kind == KeyKind::PayAsYouGo,
        user: state.user.to_string(),
        team: state.team.name.to_string(),
        seat: state.seat.map(|seat| seat.0),
        open_reservations: state.open_reservations.load(Ordering::Acquire),
        payg_micros: state.payg_micros.load(Ordering::Acquire),
        time_floor_ms: state.time_floor_ms,
        counters,
    }
}

fn restore_usage(policy: &Policy, counters: &[(u16, CounterSnapshot)]) -> Result<KeyUsage, Error> {
    let mut restored = Vec::with_capacity(counters.len());
    for (id, snapshot) in counters {
        let spec = policy.counters().get(usize::from(*id)).ok_or_else(|| {
            storage(format!(
                "a snapshot names counter {id}, which the policy does not have"
            ))
        })?;
        let state = match (snapshot, spec.window.shape()) {
            (
                CounterSnapshot::Rolling {
                    head,
                    wide,
                    buckets,
                },
                Some(shape),
            ) => WindowState::Rolling(RollingWindow::restored(shape, *wide, *head, buckets)),
            (CounterSnapshot::Calendar { period, count }, None) => {
                WindowState::Calendar(CalendarCounter::restored(*period, *count))
            }
            _ => {
                return Err(storage(format!(
                    "a snapshot's counter {id} does not match its window"
                )))
            }
        };
        restored.push(Counter {
            id: CounterId(*id),
            state,
        });
    }
    Ok(KeyUsage { counters: restored })
}

fn translate(then: &Policy, now: &Policy, counter: CounterId) -> Option<CounterId> {
    if then.generation == now.generation {
        Some(counter)
    } else {
        then.same_counter_in(counter, now)
    }
}

/// Amounts removed before the log's matching add (replay order differs from memory order only
/// for commuting counter changes): paid off by the next add to the same counter and time.
#[derive(Debug, Default)]
struct Debts {
    owed: HashMap<(String, CounterId, u64), u64>,
}

impl Debts {
    fn add(&mut self, key: &str, counter: CounterId, time: u64, amount: u64) {
        *self.owed.entry((key.into(), counter, time)).or_default() += amount;
    }

    /// Takes up to `amount` of debt; returns how much was owed and is now paid.
    fn take(&mut self, key: &str, counter: CounterId, time: u64, amount: u64) -> u64 {
        if self.owed.is_empty() {
            return 0;
        }
        let entry = (key.to_string(), counter, time);
        let Some(owed) = self.owed.get_mut(&entry) else {
            return 0;
        };
        let paid = (*owed).min(amount);
        *owed -= paid;
        if *owed == 0 {
            self.owed.remove(&entry);
        }
        paid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::engine::UsageRequest;
    use crate::policy::Unit;

    const T0: u64 = 1_790_000_000_000;
    const MINUTE: u64 = 60_000;
    const DAY: u64 = 24 * 60 * MINUTE;

    fn m27(key: &str, requests: u64, at_ms: u64) -> UsageRequest<'_> {
        static QUANTITIES: [[(Unit, u64); 2]; 4] = [
            [(Unit::Requests, 1), (Unit::Tokens, 1_000)],
            [(Unit::Requests, 2), (Unit::Tokens, 2_000)],
            [(Unit::Requests, 3), (Unit::Tokens, 3_000)],
            [(Unit::Requests, 4), (Unit::Tokens, 4_000)],
        ];
        UsageRequest::new(key, "m2.7", &QUANTITIES[(requests as usize - 1) % 4]).at(at_ms)
    }

    /// An engine holding every kind of state a snapshot carries: narrow rings (request
    /// quotas), wide rings (the priced usage bar), daily and weekly counters, dormant counters
    /// of an earlier plan, keys reclaimed with a time floor, pay-as-you-go keys, teams with
    /// members and credits, request ids (admitted and denied), open and closed reservations.
    fn busy_engine() -> (Engine, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(T0));
        let engine = Engine::new(
            Policy::token_plan(),
            clock.clone(),
            EngineOptions::default(),
        );
        let plans = ["Starter", "Plus", "Bar-Plus", "Max", ""];
        for index in 0..300u64 {
            let user = format!("user-{index}");
            engine
                .create_user(&user, &format!("tp-{index}"), Some(T0))
                .expect("user");
            let plan = plans[index as usize % plans.len()];
            if !plan.is_empty() {
                engine
                    .assign_seat(&format!("@{user}"), &user, plan, Some(T0))
                    .expect("seat");
            }
        }
        // Long names sharing their first 16 bytes (sorted past their prefixes).
        for index in [3u64, 1, 12, 2, 11] {
            let user = format!("a-user-with-a-long-name-{index}");
            let key = format!("tp-with-a-long-name-{index}");
            engine.create_user(&user, &key, Some(T0)).expect("user");
            engine
                .assign_seat(&format!("@{user}"), &user, "Plus", Some(T0))
                .expect("seat");
        }
        // Keys used once, then reclaimed as idle a week later: they keep a time floor.
        for index in 0..20u64 {
            let _ = engine.consume(&m27(&format!("tp-{index}"), 1, T0 + index * MINUTE));
        }
        let t1 = T0 + 8 * DAY;
        assert!(engine.reclaim_idle(Some(t1)).expect("reclaim") > 0);
        clock.set_ms(t1);
        // Usage over many buckets of the 5-hour windows, and on daily quotas.
        for step in 0..3_000u64 {
            let index = (step * 7) % 300;
            let at_ms = t1 + step * MINUTE / 10;
            let key = format!("tp-{index}");
            let _ = engine.consume(&m27(&key, 1 + step % 4, at_ms));
            if step % 5 == 0 {
                let speech = UsageRequest::new(&key, "speech-2.8", &[(Unit::Characters, 40)]);
                let _ = engine.consume(&speech.at(at_ms));
            }
        }
        // Dormant counters: Plus keys with usage move to the shared usage bar, and back on one.
        for index in [1u64, 6, 11, 16, 21, 26] {
            let user = format!("user-{index}");
            engine
                .assign_seat(&format!("@{user}"), &user, "Bar-Plus", Some(t1 + DAY / 4))
                .expect("seat change");
        }
        engine
            .assign_seat("@user-21", "user-21", "Plus", Some(t1 + DAY / 4))
            .expect("seat back");
        // A team with members, credits and a credit-paid video.
        engine.create_team("acme", Some(t1)).expect("team");
        for index in [2u64, 3, 4] {
            let user = format!("user-{index}");
            engine
                .add_member("acme", &user, &format!("acme-{index}"), Some(t1))
                .expect("member");
        }
        engine
            .assign_seat("acme", "user-3", "Max", Some(t1))
            .expect("seat");
        engine.top_up("acme", 50_000_000, Some(t1)).expect("top-up");
        engine
            .top_up("@user-4", 3_000_000, Some(t1))
            .expect("top-up");
        for _ in 0..4 {
            let video = UsageRequest::new("acme-3", "hailuo-2.3-768p-6s", &[(Unit::Videos, 1)]);
            assert!(engine.consume(&video.at(t1 + 60 * MINUTE)).is_ok());
        }
        // Pay-as-you-go keys.
        for index in [5u64, 7] {
            let key = format!("payg-{index}");
            engine
                .create_payg_key(&format!("user-{index}"), &key, Some(t1))
                .expect("payg key");
            for step in 0..5 {
                let _ = engine.consume(&m27(&key, 2, t1 + step * MINUTE));
            }
        }
        for index in [3u64, 1, 12, 2, 11] {
            let key = format!("tp-with-a-long-name-{index}");
            let _ = engine.consume(&m27(&key, 1, t1 + index * MINUTE));
        }
        // Request ids: admitted ones, and a denied one (a key without a seat or credits).
        for step in 0..40u64 {
            let id = format!("req-{step}");
            let key = format!("tp-{}", 30 + step % 7);
            let request = m27(&key, 1, t1 + 70 * MINUTE + step).id(&id);
            engine.consume(&request).expect("a request with an id");
        }
        let id = "req-denied";
        let denied = engine
            .consume(&m27("tp-9", 1, t1 + 80 * MINUTE).id(id))
            .expect("a denial is a decision");
        assert!(!denied.is_admitted());
        // Reservations: some settled, one voided, some left open.
        let mut reserved = Vec::new();
        for index in [8u64, 13, 17, 22, 23] {
            let key = format!("tp-{index}");
            let outcome = engine
                .reserve(&m27(&key, 3, t1 + 90 * MINUTE), Some(3_600_000))
                .expect("reserve");
            reserved.extend(outcome.reservation);
        }
        assert!(reserved.len() >= 4, "{reserved:?}");
        engine
            .settle(
                reserved[0],
                &[(Unit::Requests, 2), (Unit::Tokens, 500)],
                Some(t1 + 95 * MINUTE),
            )
            .expect("settle");
        engine
            .void(reserved[1], Some(t1 + 96 * MINUTE))
            .expect("void");
        (engine, clock)
    }

    #[test]
    fn the_raw_cut_makes_the_snapshot_the_locked_gathering_made() {
        let (engine, _clock) = busy_engine();
        let reference = engine.cut_reference(4_242);
        let snapshot = engine.cut(|| 4_242);
        // Every kind of state is there, so the comparison covers it.
        let counters: Vec<&CounterSnapshot> = reference
            .keys
            .iter()
            .flat_map(|key| key.counters.iter().flatten().map(|(_, counter)| counter))
            .collect();
        let rings = |wide: bool| {
            counters
                .iter()
                .filter(|counter| {
                    matches!(counter, CounterSnapshot::Rolling { wide: w, buckets, .. }
                        if *w == wide && buckets.len() > 1)
                })
                .count()
        };
        assert!(rings(false) > 10 && rings(true) > 10);
        assert!(counters.iter().any(
            |counter| matches!(counter, CounterSnapshot::Calendar { count, .. } if *count > 0)
        ));
        assert!(reference.keys.iter().any(|key| key.time_floor_ms > 0));
        assert!(reference
            .keys
            .iter()
            .any(|key| key.payg && key.payg_micros > 0));
        assert!(reference.keys.iter().any(|key| {
            let plan = key
                .seat
                .map_or(0, |seat| engine.policy().plan(PlanId(seat)).limits.len());
            key.counters
                .as_ref()
                .is_some_and(|counters| counters.len() > plan)
        }));
        assert!(reference.teams.iter().any(|team| team.members.len() == 3));
        assert!(reference.requests.len() == 41);
        assert!(reference
            .requests
            .iter()
            .any(|request| request.receipt.is_none()));
        assert!(reference.open_reservations.len() >= 2);
        assert_eq!(reference.closed_reservations.len(), 2);
        assert!(reference.users.iter().any(|user| !user.2.is_empty()));

        assert_eq!(snapshot, reference);
        let bytes = bincode::serialize(&reference).expect("encoding");
        assert_eq!(
            bincode::serialize(&snapshot).expect("encoding"),
            bytes,
            "the snapshot's bytes changed"
        );
        // What a checkpoint writes: the bytes straight from the cut.
        let written = engine.cut_raw(|| 4_242).encode().expect("encoding");
        assert!(written == bytes, "RawCut::encode wrote other bytes");

        // And a restored engine cuts to the same snapshot again.
        let restored = Engine::new(
            Policy::token_plan(),
            Arc::new(ManualClock::new(T0 + 8 * DAY)),
            EngineOptions::default(),
        );
        restored
            .restore(&decode_snapshot(&bytes, 4_242).expect("decoding"))
            .expect("restoring");
        assert_eq!(restored.cut(|| 4_242), reference);
        assert_eq!(restored.cut_reference(4_242), reference);

        // A later cut reuses the buffers of the one before (emptied): still the same.
        let t2 = T0 + 8 * DAY + 3 * 60 * MINUTE;
        for step in 0..500u64 {
            let key = format!("tp-{}", (step * 13) % 300);
            let _ = engine.consume(&m27(&key, 1 + step % 4, t2 + step * MINUTE / 7));
        }
        engine
            .create_user("late", "tp-late", Some(t2))
            .expect("user");
        let reference = engine.cut_reference(5_000);
        assert_ne!(reference.keys, snapshot.keys);
        assert_eq!(engine.cut(|| 5_000), reference);
        let written = engine.cut_raw(|| 5_000).encode().expect("encoding");
        assert!(written == bincode::serialize(&reference).expect("encoding"));
    }

    #[test]
    fn every_cut_is_timed() {
        let (engine, _clock) = busy_engine();
        assert!(engine.cut_lock_times().is_empty());
        engine.cut(|| 1);
        engine.cut(|| 2);
        assert_eq!(engine.cut_lock_times().len(), 2);
    }
}
