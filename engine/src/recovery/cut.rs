//! A checkpoint's cut: the state copied raw under the locks (`RawCut`), and made into the
//! snapshot's bytes (or a `Snapshot`) after they are let go.
//!
//! The copy spends nothing it can leave for later: strings go back to back into one buffer,
//! counters as their words, each ring as its head and occupied slots (`RollingWindow::copy_raw`),
//! into the previous cut's buffers, with every key's scattered allocations prefetched a few keys
//! ahead.
//!
//! The key shards are write-locked all at once only for an instant: each shard's copy is left
//! on its lock (`WriteGuard::leave`) and runs when the shard is next taken, by the first
//! admission to come to it or by the thread finishing the cut (`RawCut::finish_copies`, for a
//! periodic checkpoint the snapshot thread), so admission waits for one shard's copy at most,
//! not for every key's. The registry (users, teams, members) is left on its lock the same way,
//! once the teams' balances are read: they move under the key shards' locks too. Turning slots
//! into live buckets and encoding (in the order things were copied) happen afterwards.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use bincode::Options;

use super::buckets::{Buckets, CounterRef};
use super::{
    snapshot_encoding, storage, CounterSnapshot, KeySnapshot, Name, RequestSnapshot,
    ReservationSnapshot, Snapshot, TeamSnapshot,
};
use crate::accounts::{
    KeyKind, KeyState, KeyTable, Registry, Shard, ShardLocks, TeamRecord, UserRecord,
};
use crate::admission::{Decision, Quantities, Receipt};
use crate::engine::Engine;
use crate::error::Error;
use crate::event::FORMAT_VERSION;
use crate::idempotency::{
    FirstUse, RequestRecord, RequestShards, RequestTable, Shard as RequestShard,
};
use crate::ledger::{Team, WindowState};
use crate::lock::LeavableMutex;
use crate::lock::{LeavableGuard, WriteGuard};
use crate::policy::{CounterId, Policy};
use crate::reservation::{Closed, ReservationInner};
use crate::window::{prefetch, RawRing};

/// How many cut durations `Engine::cut_lock_times` keeps.
const CUT_TIMES_KEPT: usize = 4_096;

/// `references` emptied, as references of another lifetime in the same memory (a collect from
/// an iterator over the vector's own items reuses its allocation; with none, nothing is made).
fn emptied<'b, T: ?Sized>(mut references: Vec<&T>) -> Vec<&'b T> {
    references.clear();
    references
        .into_iter()
        .map(|_| unreachable!("the vector is empty"))
        .collect()
}

/// Grows `buffer` to hold `wanted` elements without reallocating.
fn room<T>(buffer: &mut Vec<T>, wanted: usize) {
    buffer.reserve(wanted.saturating_sub(buffer.len()));
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
struct SnapshotRef<'a, U, T, K, R, O, S, V> {
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
    short_keys: S,
    revoked_keys: V,
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
    short_until_ms: u64,
    revoked: bool,
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
    /// The record's first use as it encodes it (`RequestRecord::encoded_first_use`), in
    /// `RawCut::first_uses`: copied as bytes under the shard's lock, decoded off it.
    first_use: std::ops::Range<usize>,
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
pub(crate) struct RawCut {
    pub(super) seq: u64,
    /// The request-id shards' bound on the ids they forgot, read under their locks: an id
    /// stamped before it may be in neither this snapshot nor the log after it.
    pub(super) ids_forgotten_before_ms: u64,
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
    /// The request ids' first uses, encoded (`RawRequest::first_use`).
    first_uses: Vec<u8>,
    open_reservations: Vec<RawReservation>,
    closed_reservations: Vec<(u64, u64, Closed)>,
    next_reservation: u64,
    /// The last encoding's bytes (`encode`), the buffer kept by `clear` for the next one: a
    /// fresh buffer of a snapshot's size every checkpoint was page faults and zeroed pages
    /// on the snapshot thread (and in this VM, memory the host had taken back).
    encoded: Vec<u8>,
    /// What the keys' usage takes in memory, in usage blocks: the snapshot's hint for how much
    /// memory an open makes ready ahead (`SnapshotBytes::usage_hint`).
    pub(super) usage_bytes: usize,
    /// The teams' `(balance, charged)` micros in the registry's order, read under every lock
    /// (`read_balances`): in the cut's registry fragment, whose copy of the teams takes them.
    balances: Vec<(u64, u64)>,
    /// The memory of the list of teams a cut reads the balances of (`team_list`), kept empty.
    team_list: Vec<&'static Team>,
    /// The copies the cut left on the key shards', the request-id shards' and the registry's
    /// locks (`leave_copies`), until `finish_copies` moves them in.
    lazy: Option<LeftCopies>,
    /// A buffer for the registry's copy, kept between cuts (emptied) as the others are.
    spare_registry: Option<Box<RawCut>>,
    /// A buffer for each key shard's copy, kept between cuts (emptied) as the others are.
    spare_fragments: Vec<RawCut>,
    /// And for each request-id shard's.
    spare_request_fragments: Vec<RawCut>,
}

/// What a cut left on the key shards', the request-id shards' and the registry's locks: every
/// copy goes into its own fragment, whichever thread runs it.
#[derive(Debug)]
struct LeftCopies {
    shards: ShardLocks,
    /// Shard `i`'s keys once its copy has run (`None` before, or if the copy failed).
    fragments: Arc<[Mutex<Option<RawCut>>]>,
    request_shards: RequestShards,
    /// Request-id shard `i`'s records once its copy has run.
    request_fragments: Arc<[Mutex<Option<RawCut>>]>,
    registry: Arc<LeavableMutex<Registry>>,
    /// The users, teams (with their balances) and members once the registry's copy has run.
    registry_fragment: Arc<Mutex<Option<RawCut>>>,
}

impl RawCut {
    /// A cut with room for about `keys` keys, made before the locks are taken.
    fn with_capacity(keys: usize) -> RawCut {
        let mut cut = RawCut::default();
        cut.reserve(keys);
        cut
    }

    /// Makes room for about `keys` keys (and as many users and teams), so that copying them
    /// under the locks does not allocate; and in each shard's fragment for its share of them.
    fn reserve(&mut self, keys: usize) {
        self.spare_fragments.resize_with(
            KeyTable::SHARDS.max(self.spare_fragments.len()),
            RawCut::default,
        );
        for fragment in &mut self.spare_fragments {
            fragment.reserve_keys(keys / KeyTable::SHARDS);
        }
        // Their records are copied off the locks: these grow as they need to.
        let request_shards = crate::idempotency::SHARDS;
        self.spare_request_fragments.resize_with(
            request_shards.max(self.spare_request_fragments.len()),
            RawCut::default,
        );
        self.reserve_keys(keys);
        // About a user, a Default Team and a member per key.
        let keys = keys + keys / 16 + 64;
        room(&mut self.balances, keys);
        room(&mut self.team_list, keys);
        let registry = self.spare_registry.get_or_insert_with(Default::default);
        room(&mut registry.teams, keys);
        room(&mut registry.members, keys);
        room(&mut registry.users, keys);
        registry
            .texts
            .0
            .reserve((keys * 48).saturating_sub(registry.texts.0.len()));
    }

    /// Room for about `keys` keys' names, counters and slots.
    fn reserve_keys(&mut self, keys: usize) {
        let keys = keys + keys / 16 + 64;
        self.texts
            .0
            .reserve((keys * 112).saturating_sub(self.texts.0.len()));
        room(&mut self.shards, 64);
        room(&mut self.keys, keys);
        room(&mut self.counters, keys * 2);
        room(&mut self.slots, keys * 2);
    }

    /// Empties the cut, keeping its buffers' memory for the next one.
    fn clear(&mut self) {
        let RawCut {
            seq,
            ids_forgotten_before_ms,
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
            first_uses,
            open_reservations,
            closed_reservations,
            next_reservation,
            encoded: _,
            usage_bytes,
            balances,
            team_list: _,
            lazy,
            spare_registry,
            spare_fragments,
            spare_request_fragments,
        } = self;
        (*seq, *ids_forgotten_before_ms, *newest_at_ms) = (0, 0, 0);
        (*next_reservation, *usage_bytes) = (0, 0);
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
        first_uses.clear();
        open_reservations.clear();
        closed_reservations.clear();
        balances.clear();
        // A cut given back unfinished: copies still to run put their keys where nothing reads
        // them.
        *lazy = None;
        for fragment in spare_fragments
            .iter_mut()
            .chain(spare_request_fragments)
            .chain(spare_registry.as_deref_mut())
        {
            fragment.clear();
        }
    }

    /// Leaves each key shard's copy on its lock (every shard write-locked, in shard order),
    /// each request-id shard's on its own (every one locked) and the registry's on its lock
    /// (its balances already read, `read_balances`), and lets go of them: a copy runs when its
    /// lock is next taken, before anything under it can change, so it is the state as it is
    /// now (see the module's comment).
    fn leave_copies(
        &mut self,
        shards: Vec<WriteGuard<'_, Shard>>,
        locks: ShardLocks,
        request_shards: Vec<LeavableGuard<'_, RequestShard>>,
        request_locks: RequestShards,
        (registry, registry_lock): (LeavableGuard<'_, Registry>, Arc<LeavableMutex<Registry>>),
    ) {
        debug_assert!(self.lazy.is_none());
        let fragments: Arc<[Mutex<Option<RawCut>>]> =
            shards.iter().map(|_| Mutex::new(None)).collect();
        for (index, shard) in shards.into_iter().enumerate() {
            let mut fragment = self.spare_fragments.pop().unwrap_or_default();
            let copied = Arc::clone(&fragments);
            shard.leave(Box::new(move |shard: &Shard| {
                fragment.copy_keys(shard);
                *copied[index].lock() = Some(fragment);
            }));
        }
        let request_fragments: Arc<[Mutex<Option<RawCut>>]> =
            request_shards.iter().map(|_| Mutex::new(None)).collect();
        for (index, shard) in request_shards.into_iter().enumerate() {
            let mut fragment = self.spare_request_fragments.pop().unwrap_or_default();
            let copied = Arc::clone(&request_fragments);
            shard.leave(Box::new(move |shard: &RequestShard| {
                RequestTable::visit(shard, |arrived_ms, id, record| {
                    fragment.push_request(arrived_ms, id, record);
                });
                *copied[index].lock() = Some(fragment);
            }));
        }
        let registry_fragment = Arc::new(Mutex::new(None));
        let mut fragment = self.spare_registry.take().unwrap_or_default();
        std::mem::swap(&mut fragment.balances, &mut self.balances);
        let copied = Arc::clone(&registry_fragment);
        registry.leave(Box::new(move |registry: &Registry| {
            if fragment.copy_registry(registry) {
                *copied.lock() = Some(*fragment);
            }
        }));
        self.lazy = Some(LeftCopies {
            shards: locks,
            fragments,
            request_shards: request_locks,
            request_fragments,
            registry: registry_lock,
            registry_fragment,
        });
    }

    /// Runs the key and request-id shard copies the cut left that have not run yet, then moves
    /// the users the helper copied, every shard's keys (shards in order) and the request ids in:
    /// the same cut as copying every shard in turn under the locks. An error if a shard's copy
    /// failed (it panicked, in whichever thread ran it).
    pub(super) fn finish_copies(&mut self) -> Result<(), Error> {
        let Some(lazy) = self.lazy.take() else {
            return Ok(());
        };
        // A copy that panics here leaves its fragment missing: reported below, as one that
        // panicked in another thread is.
        let settle = |lock: &dyn Fn()| {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(lock));
        };
        for shard in lazy.shards.iter() {
            settle(&|| shard.settle());
        }
        for shard in lazy.request_shards.iter() {
            settle(&|| shard.settle());
        }
        settle(&|| lazy.registry.settle());
        let registry = lazy.registry_fragment.lock().take();
        let registry_missing = match registry {
            Some(mut fragment) => {
                self.absorb(&mut fragment);
                std::mem::swap(&mut fragment.balances, &mut self.balances);
                self.spare_registry = Some(Box::new(fragment));
                false
            }
            None => true,
        };
        let missing_keys = self.absorb_fragments(&lazy.fragments, |cut| &mut cut.spare_fragments);
        // Request ids are put in their order when encoded: any order of shards would do.
        let missing_requests = self.absorb_fragments(&lazy.request_fragments, |cut| {
            &mut cut.spare_request_fragments
        });
        if missing_keys.is_none() {
            self.count_open_reservations();
        }
        let missing = (missing_keys.map(|index| format!("key shard {index}")))
            .or(missing_requests.map(|index| format!("request-id shard {index}")))
            .or(registry_missing.then(|| "the registry".to_string()));
        match missing {
            None => Ok(()),
            Some(what) => Err(storage(format!(
                "a checkpoint's copy of {what} failed; the checkpoint is not taken"
            ))),
        }
    }

    /// Moves the shards' copies in, in shard order, keeping their buffers in the pool `spare`
    /// gives; the first shard whose copy is missing (it failed), if any.
    fn absorb_fragments(
        &mut self,
        fragments: &[Mutex<Option<RawCut>>],
        spare: fn(&mut RawCut) -> &mut Vec<RawCut>,
    ) -> Option<usize> {
        let mut missing = None;
        for (index, fragment) in fragments.iter().enumerate() {
            match fragment.lock().take() {
                Some(mut fragment) => {
                    self.absorb(&mut fragment);
                    spare(self).push(fragment);
                }
                None => missing = missing.or(Some(index)),
            }
        }
        missing
    }

    /// How many key shards' copies the cut left that have not run yet.
    #[cfg(test)]
    pub(super) fn shards_left(&self) -> usize {
        self.lazy.as_ref().map_or(0, |lazy| {
            lazy.fragments
                .iter()
                .filter(|fragment| fragment.lock().is_none())
                .count()
        })
    }

    /// Whether the registry's copy the cut left has not run yet (or ran and failed).
    #[cfg(test)]
    pub(super) fn registry_left(&self) -> bool {
        self.lazy
            .as_ref()
            .is_some_and(|lazy| lazy.registry_fragment.lock().is_none())
    }

    /// Every user, team and key copied is in this cut's own lists (`finish_copies`).
    fn debug_assert_absorbed(&self) {
        debug_assert!(self.lazy.is_none());
    }

    /// Moves what `helper` copied (the registry, a shard's keys or request ids) after this
    /// cut's own, as if one thread had copied them all: their strings, pay-as-you-go keys,
    /// members, counters and slots are appended and every index into them shifted. Leaves
    /// `helper` empty, its buffers kept.
    fn absorb(&mut self, helper: &mut RawCut) {
        let (text_base, key_base) = (self.texts.0.len(), self.keys.len());
        let (counter_base, slot_base) = (self.counters.len(), self.slots.len());
        let shift = |text: Text| Text {
            start: text.start + text_base,
            end: text.end + text_base,
        };
        self.texts.0.push_str(&helper.texts.0);
        let payg_base = self.payg_keys.len();
        self.payg_keys.extend(helper.payg_keys.drain(..).map(shift));
        self.users
            .extend(helper.users.drain(..).map(|user| RawUser {
                name: shift(user.name),
                default_team: shift(user.default_team),
                payg_keys: user.payg_keys.start + payg_base..user.payg_keys.end + payg_base,
            }));
        let member_base = self.members.len();
        self.members.extend(
            helper
                .members
                .drain(..)
                .map(|(user, key)| (shift(user), shift(key))),
        );
        self.teams
            .extend(helper.teams.drain(..).map(|team| RawTeam {
                name: shift(team.name),
                owner: team.owner.map(shift),
                members: team.members.start + member_base..team.members.end + member_base,
                ..team
            }));
        self.keys.extend(helper.keys.drain(..).map(|key| {
            RawKey {
                key: shift(key.key),
                user: shift(key.user),
                team: shift(key.team),
                counters: key
                    .counters
                    .map(|range| range.start + counter_base..range.end + counter_base),
                ..key
            }
        }));
        self.counters
            .extend(helper.counters.drain(..).map(|counter| match counter {
                RawCounter::Rolling { id, ring, slots } => RawCounter::Rolling {
                    id,
                    ring,
                    slots: slots.start + slot_base..slots.end + slot_base,
                },
                calendar @ RawCounter::Calendar { .. } => calendar,
            }));
        self.slots.extend_from_slice(&helper.slots);
        let first_use_base = self.first_uses.len();
        self.first_uses.extend_from_slice(&helper.first_uses);
        self.requests
            .extend(helper.requests.drain(..).map(|request| RawRequest {
                id: shift(request.id),
                first_use: request.first_use.start + first_use_base
                    ..request.first_use.end + first_use_base,
                ..request
            }));
        self.shards.extend(
            helper
                .shards
                .drain(..)
                .map(|(policy, end)| (policy, end + key_base)),
        );
        self.usage_bytes += helper.usage_bytes;
        helper.clear();
    }

    /// Every key of a shard (as a cut left it: nothing in it can change), with the shard's
    /// policy.
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
            // The block of counters and a ring per rolling counter at most.
            self.usage_bytes +=
                crate::pages::usage_block_bytes(usage.memory_bytes(), 1 + usage.counters.len());
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
            short_until_ms: state.short_until_ms,
            revoked: state.revoked,
            counters,
        };
        self.keys.push(raw);
    }

    /// Sets each copied key's count of open reservations to the open reservations the cut
    /// holds on it. The key's own count can be ahead: a settle or void appends its closing
    /// event under the reservation table's lock but frees the key's slot only once the event
    /// is durable, after it let the lock go (`Engine::finish_close`), and a cut can fall in
    /// between. The cut holds that event; replayed, it frees the slot. Only keys whose count
    /// is above zero are looked up: the count is never behind the table (a reserve takes the
    /// slot and opens the reservation under the table's lock).
    fn count_open_reservations(&mut self) {
        let RawCut {
            texts,
            keys,
            open_reservations,
            ..
        } = self;
        let mut open: std::collections::HashMap<&str, u32> =
            std::collections::HashMap::with_capacity(open_reservations.len());
        for reservation in open_reservations.iter() {
            *open.entry(texts.str(reservation.key)).or_default() += 1;
        }
        for key in keys.iter_mut().filter(|key| key.open_reservations > 0) {
            let held = open.get(texts.str(key.key)).copied().unwrap_or(0);
            debug_assert!(
                held <= key.open_reservations,
                "key {:?}: {held} reservations open in the table, its count {}",
                texts.str(key.key),
                key.open_reservations
            );
            key.open_reservations = held;
        }
    }

    /// Every team in the registry's order (it is locked), for `read_balances`: the only part
    /// of the registry read under every lock, a pass over the teams' records that follows no
    /// pointer.
    /// Into the previous cut's list (`give_back_team_list`): no allocation under the locks.
    fn team_list<'r>(&mut self, registry: &'r Registry) -> Vec<&'r Team> {
        let mut teams = emptied(std::mem::take(&mut self.team_list));
        teams.extend(registry.teams.values().map(|record| {
            // Into the cache before the key shards are locked, if it holds them all.
            prefetch(Arc::as_ptr(&record.team));
            &*record.team
        }));
        teams
    }

    /// Keeps the memory of `teams` (`team_list`) for the next cut.
    fn give_back_team_list(&mut self, teams: Vec<&Team>) {
        self.team_list = emptied(teams);
    }

    /// The balances of `teams` (as `team_list` listed them, with the key shards write-locked
    /// too: credits move under a shard's read lock), for the registry's copy to take.
    fn read_balances(&mut self, teams: &[&Team]) {
        const PREFETCH_AHEAD: usize = 16;
        self.balances.clear();
        for (index, team) in teams.iter().enumerate() {
            if let Some(ahead) = teams.get(index + PREFETCH_AHEAD) {
                prefetch(*ahead as *const Team);
            }
            self.balances
                .push((team.balance_micros(), team.charged_micros()));
        }
    }

    /// The registry's users, teams (with `self.balances`, read at the cut's instant) and
    /// members, as the cut left the registry: nothing in it changed since its balances were
    /// read. A team count that differs from the balances' would mean it did: then nothing is
    /// copied and `false` returned (the checkpoint fails rather than mix two instants).
    ///
    /// Memory-bound as `copy_keys` is (a team's record, its `Team`, its name and its members'
    /// names are each somewhere else), so it prefetches the same way: the records' pointees
    /// `PREFETCH_AHEAD` teams or users ahead, what those point to half as far.
    fn copy_registry(&mut self, registry: &Registry) -> bool {
        debug_assert!(self.users.is_empty() && self.teams.is_empty());
        if registry.teams.len() != self.balances.len() {
            debug_assert!(false, "the registry changed after its balances were read");
            return false;
        }
        self.copy_users(registry);
        self.copy_teams(registry);
        true
    }

    /// The registry's teams and members (see `copy_registry`).
    fn copy_teams(&mut self, registry: &Registry) {
        const PREFETCH_AHEAD: usize = 16;
        let far = |record: &TeamRecord| {
            prefetch(Arc::as_ptr(&record.team));
            if let Some(owner) = &record.owner {
                prefetch(owner.as_ptr());
            }
        };
        let near = |record: &TeamRecord| {
            prefetch(record.team.name.as_ptr());
            for (user, key) in record.members.iter().take(2) {
                prefetch(user.as_ptr());
                prefetch(key.as_ptr());
            }
        };
        let mut first = registry.teams.values();
        let mut second = registry.teams.values();
        first.by_ref().take(PREFETCH_AHEAD).for_each(far);
        second.by_ref().take(PREFETCH_AHEAD / 2).for_each(near);
        for (index, record) in registry.teams.values().enumerate() {
            if let Some(ahead) = first.next() {
                far(ahead);
            }
            if let Some(ahead) = second.next() {
                near(ahead);
            }
            let (balance, charged) = self.balances[index];
            self.push_team(record, balance, charged);
        }
    }

    /// The registry's users and their pay-as-you-go keys (see `copy_registry`).
    fn copy_users(&mut self, registry: &Registry) {
        const PREFETCH_AHEAD: usize = 16;
        let user_pointees = |record: &UserRecord| {
            prefetch(record.name.as_ptr());
            prefetch(record.default_team.as_ptr());
        };
        let mut ahead = registry.users.values();
        ahead.by_ref().take(PREFETCH_AHEAD).for_each(user_pointees);
        for record in registry.users.values() {
            if let Some(later) = ahead.next() {
                user_pointees(later);
            }
            self.push_user(record);
        }
    }

    fn push_team(&mut self, record: &TeamRecord, balance_micros: u64, charged_micros: u64) {
        let first = self.members.len();
        for (user, key) in &record.members {
            let pair = (self.texts.push(user), self.texts.push(key));
            self.members.push(pair);
        }
        let raw = RawTeam {
            name: self.texts.push(&record.team.name),
            owner: record.owner.as_deref().map(|owner| self.texts.push(owner)),
            balance_micros,
            charged_micros,
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
        let start = self.first_uses.len();
        self.first_uses
            .extend_from_slice(record.encoded_first_use());
        let raw = RawRequest {
            arrived_ms,
            id: self.texts.push(id),
            first_use: start..self.first_uses.len(),
            refunded: record.refunded,
        };
        self.requests.push(raw);
    }

    /// What `request`'s id was first used for, and its first decision.
    fn first_use(&self, request: &RawRequest) -> FirstUse<'_> {
        FirstUse::decode(&self.first_uses[request.first_use.clone()])
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
        self.closed_reservations
            .extend(table.closed_order.iter().filter_map(|(at_ms, id)| {
                table
                    .closed
                    .get(id)
                    .map(|(closed, _)| (*id, *at_ms, *closed))
            }));
        self.next_reservation = table.next_id;
    }

    /// The snapshot of the cut: strings and bucket lists built; users, teams and keys in the
    /// order they were copied, request ids and reservations put in theirs. In name order, the
    /// same `Snapshot` as gathering it all under the locks (`Engine::cut_reference`).
    pub(super) fn to_snapshot(&self) -> Snapshot<'static> {
        self.debug_assert_absorbed();
        let texts = &self.texts;
        let policies = policy_documents(&self.policies);
        let teams: Vec<TeamSnapshot> = self
            .teams
            .iter()
            .map(|team| {
                let members: Vec<(Name, Name)> = self.members[team.members.clone()]
                    .iter()
                    .map(|&(user, key)| (texts.get(user).into(), texts.get(key).into()))
                    .collect();
                TeamSnapshot {
                    name: texts.get(team.name).into(),
                    owner: team.owner.map(|owner| texts.get(owner).into()),
                    balance_micros: team.balance_micros,
                    charged_micros: team.charged_micros,
                    members,
                }
            })
            .collect();
        let users: Vec<(Name, Name, Vec<Name>)> = self
            .users
            .iter()
            .map(|user| {
                let keys = self.payg_keys[user.payg_keys.clone()]
                    .iter()
                    .map(|&key| texts.get(key).into())
                    .collect();
                (
                    texts.get(user.name).into(),
                    texts.get(user.default_team).into(),
                    keys,
                )
            })
            .collect();
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut first = 0;
        for (policy, end) in &self.shards {
            for key in &self.keys[first..*end] {
                keys.push(self.key_snapshot(policy, key));
            }
            first = *end;
        }
        let mut requests: Vec<RequestSnapshot> = self
            .requests
            .iter()
            .map(|request| {
                let first = self.first_use(request);
                RequestSnapshot {
                    id: texts.get(request.id),
                    arrived_ms: request.arrived_ms,
                    key: first.fingerprint.key.to_owned(),
                    resource: first.fingerprint.resource.to_owned(),
                    quantities: first.fingerprint.quantities,
                    decision: first.decision,
                    receipt: first.receipt,
                    refunded: request.refunded,
                }
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
            short_keys: self
                .keys
                .iter()
                .filter(|key| key.short_until_ms > 0)
                .map(|key| (texts.get(key.key).into(), key.short_until_ms))
                .collect(),
            revoked_keys: self
                .keys
                .iter()
                .filter(|key| key.revoked)
                .map(|key| texts.get(key.key).into())
                .collect(),
        }
    }

    /// The snapshot's bincode bytes written straight from the cut: the very bytes of
    /// `snapshot_encoding().serialize(&self.to_snapshot())` (tested), without building the `Snapshot`
    /// (a few strings and lists per key, allocated and freed again on the snapshot thread,
    /// which shares the cores with admission). The borrowed types below mirror `Snapshot`'s
    /// field for field, so serde writes the same bytes.
    pub(super) fn encode(&mut self) -> Result<&[u8], Error> {
        self.finish_copies()?;
        // Into the last encoding's buffer, with room for its size and an eighth more: one
        // pass (`bincode::serialize` would first walk everything once to measure it).
        let mut bytes = std::mem::take(&mut self.encoded);
        let last = bytes.len();
        bytes.clear();
        bytes.reserve(last + last / 8);
        self.encoded = self.encode_into(bytes)?;
        Ok(&self.encoded)
    }

    fn encode_into(&self, mut bytes: Vec<u8>) -> Result<Vec<u8>, Error> {
        self.debug_assert_absorbed();
        let texts = &self.texts;
        let text = |text: Text| texts.str(text);
        let policies = policy_documents(&self.policies);
        // Users, teams and keys in the order they were copied (see `Snapshot`): each list read
        // front to back, as are the strings, which were copied in the same order.
        let members: Vec<(&str, &str)> = self
            .members
            .iter()
            .map(|&(user, key)| (text(user), text(key)))
            .collect();
        let mut requests: Vec<usize> = (0..self.requests.len()).collect();
        requests.sort_by(|&a, &b| {
            let (a, b) = (&self.requests[a], &self.requests[b]);
            (a.arrived_ms, text(a.id)).cmp(&(b.arrived_ms, text(b.id)))
        });
        let mut open: Vec<usize> = (0..self.open_reservations.len()).collect();
        open.sort_by_key(|&index| self.open_reservations[index].id);
        let mut closed = self.closed_reservations.clone();
        closed.sort_by_key(|closed| closed.0);
        let short_keys: Vec<usize> = (0..self.keys.len())
            .filter(|&index| self.keys[index].short_until_ms > 0)
            .collect();
        let revoked_keys: Vec<usize> = (0..self.keys.len())
            .filter(|&index| self.keys[index].revoked)
            .collect();

        let snapshot = SnapshotRef {
            version: FORMAT_VERSION,
            seq: self.seq,
            newest_at_ms: self.newest_at_ms,
            policies: &policies,
            users: SeqOf(self.users.len(), |index: usize| {
                let user = &self.users[index];
                let payg_keys = &self.payg_keys[user.payg_keys.clone()];
                (
                    text(user.name),
                    text(user.default_team),
                    SeqOf(payg_keys.len(), move |index: usize| text(payg_keys[index])),
                )
            }),
            teams: SeqOf(self.teams.len(), |index: usize| {
                let team = &self.teams[index];
                TeamRef {
                    name: text(team.name),
                    owner: team.owner.map(text),
                    balance_micros: team.balance_micros,
                    charged_micros: team.charged_micros,
                    members: &members[team.members.clone()],
                }
            }),
            keys: SeqOf(self.keys.len(), |index: usize| {
                let key = &self.keys[index];
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
                        // The policy of the key's shard, whose counter ids the key's use.
                        let shard = self.shards.partition_point(|(_, end)| *end <= index);
                        let policy = &self.shards[shard].0;
                        SeqOf(counters.len(), move |offset: usize| {
                            let index = counters.start + offset;
                            match &self.counters[index] {
                                RawCounter::Rolling { id, ring, slots } => (
                                    *id,
                                    CounterRef::Rolling {
                                        head: ring.head,
                                        wide: ring.wide,
                                        buckets: Buckets::Copied {
                                            ring: *ring,
                                            shape: policy
                                                .counter(CounterId(*id))
                                                .window
                                                .shape()
                                                .unwrap_or_else(|| {
                                                    unreachable!("a ring is on a rolling window")
                                                }),
                                            slots: &self.slots[slots.clone()],
                                        },
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
                let first = self.first_use(request);
                RequestRef {
                    id: text(request.id),
                    arrived_ms: request.arrived_ms,
                    key: first.fingerprint.key,
                    resource: first.fingerprint.resource,
                    quantities: first.fingerprint.quantities,
                    decision: first.decision,
                    receipt: first.receipt,
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
            short_keys: SeqOf(short_keys.len(), |index: usize| {
                let key = &self.keys[short_keys[index]];
                (text(key.key), key.short_until_ms)
            }),
            revoked_keys: SeqOf(revoked_keys.len(), |index: usize| {
                text(self.keys[revoked_keys[index]].key)
            }),
        };
        snapshot_encoding()
            .serialize_into(&mut bytes, &snapshot)
            .map_err(|error| storage(format!("encoding a snapshot: {error}")))?;
        Ok(bytes)
    }

    fn key_snapshot(&self, policy: &Policy, key: &RawKey) -> KeySnapshot<'static> {
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
            key: self.texts.get(key.key).into(),
            payg: key.payg,
            user: self.texts.get(key.user).into(),
            team: self.texts.get(key.team).into(),
            seat: key.seat,
            open_reservations: key.open_reservations,
            payg_micros: key.payg_micros,
            time_floor_ms: key.time_floor_ms,
            counters,
        }
    }
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
    /// While every key shard was write-locked: no admission at all. (Each shard's copy runs
    /// later, when the shard is next taken; an admission that comes to a shard before the cut
    /// finished copying it waits for that shard's copy.)
    pub key_shards: std::time::Duration,
}

/// What the checkpoint cuts keep between them: how long each held the locks, and the previous
/// cut's buffers, emptied, so the next cut copies into memory already allocated (and mapped)
/// instead of growing buffers under the locks. The buffers hold about 150 bytes per key and
/// per team, plus 16 per occupied ring slot, beside the strings' bytes, and the last
/// snapshot's bytes (`RawCut::encode`).
#[derive(Debug, Default)]
pub(crate) struct Cuts {
    times: Mutex<std::collections::VecDeque<CutLockTime>>,
    pub(super) spare: Arc<Mutex<Option<RawCut>>>,
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

    pub(super) fn give_back(&self, cut: RawCut) {
        Cuts::keep_spare(&self.spare, cut);
    }

    /// Keeps `cut`'s buffers (emptied) for the next cut.
    pub(super) fn keep_spare(spare: &Mutex<Option<RawCut>>, mut cut: RawCut) {
        cut.clear();
        *spare.lock() = Some(cut);
    }
}

impl Engine {
    /// How long each checkpoint cut since the engine was created held its locks, oldest
    /// first; the latest `CUT_TIMES_KEPT` are kept. For benchmarks.
    #[doc(hidden)]
    pub fn cut_lock_times(&self) -> Vec<CutLockTime> {
        self.cuts.times.lock().iter().copied().collect()
    }

    /// Builds a snapshot with every lock taken in the engine's lock order (see `cut_raw`).
    pub(super) fn cut(&self, seq: impl FnOnce() -> u64) -> Result<Snapshot<'static>, Error> {
        let mut cut = self.cut_raw(seq);
        let snapshot = cut
            .finish_copies()
            .map(|()| cut.to_snapshot().in_name_order());
        self.cuts.give_back(cut);
        snapshot
    }

    /// Copies the state at one sequence number (the one `seq` returns, called with every lock
    /// held): every event appended up to it has been applied and no applied change is
    /// unlogged. The keys' copies are left on the shards' locks: `RawCut::finish_copies` (which
    /// `encode` calls) completes the cut.
    ///
    /// The locks are taken in the engine's lock order: the append gate (no `consume_many`
    /// chunk is between applying its effects and appending their events), the reservation
    /// table (copied at once), every request-id shard, the registry (its teams listed), the
    /// policies (copied). None of them can change after, for its lock stays held until the end.
    /// Only then are the key shards write-locked (admission waits from here on), `seq` read,
    /// and the team balances read (credits move under a key shard's read lock). The request-id
    /// shards', the registry's and each key shard's copies are left on their locks
    /// (`RawCut::leave_copies`) to run when the lock is next taken, so admission waits only for
    /// the balances, and then, on a shard no one copied yet, for that shard's copy.
    ///
    /// Only raw copies are made: strings into one buffer, counter words, each ring's occupied
    /// slots, into the previous cut's buffers (no allocation under the locks when the state
    /// has not grown). Putting them in order, converting and encoding happen after the locks
    /// are let go (`RawCut::encode`, for a periodic checkpoint on the snapshot thread; or
    /// `RawCut::to_snapshot`).
    pub(super) fn cut_raw(&self, seq: impl FnOnce() -> u64) -> RawCut {
        self.cut_raw_between(seq, || {})
    }

    /// `cut_raw`, running `between` once every lock but the key shards' is held (for tests:
    /// what may still change there, credits charged under a key shard's read lock, must be in
    /// the cut).
    pub(super) fn cut_raw_between(
        &self,
        seq: impl FnOnce() -> u64,
        between: impl FnOnce(),
    ) -> RawCut {
        let keys = self.keys.len() as usize;
        let mut cut = self.cuts.take_spare(keys);
        let locking = std::time::Instant::now();
        // First of all: no `consume_many` chunk is between applying and appending.
        let gate = self.append_gate.write();
        let table = self.reservations.inner.lock();
        cut.copy_reservations(&table);
        // Their records are copied later, each shard's when it is next locked.
        let requests_guard = self.requests.lock_all();
        cut.ids_forgotten_before_ms = RequestTable::forgotten_before_ms(&requests_guard);
        // The registry is copied later too; only its teams are listed now, for their balances.
        let registry = self.registry.lock();
        let teams = cut.team_list(&registry);
        let policies_guard = self.policies.read();
        cut.policies.clone_from(&policies_guard);
        between();
        let shards_locking = std::time::Instant::now();
        let shards = self.keys.lock_all();
        cut.seq = seq();
        cut.newest_at_ms = self.newest_event_ms();
        // Credits move under a key shard's read lock (admission) as well as the registry's.
        cut.read_balances(&teams);
        cut.give_back_team_list(teams);
        // Each copy runs when its lock is next taken: admission goes on from here.
        cut.leave_copies(
            shards,
            self.keys.shard_locks(),
            requests_guard,
            self.requests.shard_locks(),
            (registry, Arc::clone(&self.registry)),
        );
        let key_shards = shards_locking.elapsed();
        drop((policies_guard, table, gate));
        self.cuts.note(CutLockTime {
            every_lock: locking.elapsed(),
            key_shards,
        });
        cut
    }
}

/// The policies by generation as a snapshot keeps them: each one's document in JSON.
fn policy_documents(policies: &[Option<Arc<Policy>>]) -> Vec<Option<String>> {
    policies
        .iter()
        .map(|policy| {
            policy
                .as_ref()
                .and_then(|policy| serde_json::to_string(policy.document()).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_list_keeps_its_memory_for_the_next_cut() {
        let values = [1u32, 2, 3];
        let mut list: Vec<&u32> = Vec::with_capacity(1_000);
        list.extend(values.iter());
        let memory = list.as_ptr() as usize;
        let kept: Vec<&'static u32> = emptied(list);
        assert!(kept.is_empty());
        assert!(kept.capacity() >= 1_000);
        assert_eq!(kept.as_ptr() as usize, memory, "the same allocation");
    }
}
