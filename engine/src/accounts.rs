//! Accounts: users, teams, members, seats and keys.
//!
//! A user has a Default Team of their own and one plan key per team they belong to; a key exists
//! before any resources and becomes usable when its member gets a seat (a plan) or the team has
//! credits. Pay-as-you-go keys belong to a user and never draw on plan quota or credits.
//!
//! Keys live in a sharded table: each shard is a `ShardLock` (see `lock`) over a hash table,
//! read-locked on the admission path (each thread on its own reader counter, so threads on
//! different keys write no common cache line), write-locked only by admin calls. The shard also holds the policy the keys in it are laid out
//! for, so a policy swap (all shards write-locked) and admission never see each other half-done.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::ledger::{Team, UsageCell};
use crate::lock::{ShardLock, WriteGuard};
use crate::pages::TablePages;
use crate::policy::{PlanId, Policy};
use crate::window::prefetch;

pub const MAX_KEY_BYTES: usize = 128;
pub const MAX_ID_BYTES: usize = 128;
const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A Token Plan key: plan quota first, then the team's credits.
    Plan,
    /// A pay-as-you-go API key: never draws on plan quota or credits.
    PayAsYouGo,
}

#[derive(Debug)]
pub struct KeyState {
    pub kind: KeyKind,
    pub user: Arc<str>,
    pub team: Arc<Team>,
    pub seat: Option<PlanId>,
    pub usage: UsageCell,
    // AcqRel CAS: bounded by the plan's maximum; increments and decrements pair exactly.
    pub open_reservations: AtomicU32,
    // AcqRel CAS with an overflow check: pay-as-you-go spend recorded for billing.
    pub payg_micros: AtomicU64,
    /// Requests are counted no earlier than this (set when idle windows are reclaimed; written
    /// under the shard's write lock only).
    pub time_floor_ms: u64,
}

impl KeyState {
    pub fn new(kind: KeyKind, user: Arc<str>, team: Arc<Team>) -> KeyState {
        KeyState {
            kind,
            user,
            team,
            seat: None,
            usage: UsageCell::default(),
            open_reservations: AtomicU32::new(0),
            payg_micros: AtomicU64::new(0),
            time_floor_ms: 0,
        }
    }

    /// Records pay-as-you-go spend; `None` (nothing recorded) if the tally would overflow.
    pub fn add_payg(&self, micros: u64) -> Option<u64> {
        self.payg_micros
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |spent| {
                spent.checked_add(micros)
            })
            .map(|before| before + micros)
            .ok()
    }

    pub fn subtract_payg(&self, micros: u64) {
        let _ = self
            .payg_micros
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |spent| {
                Some(spent.saturating_sub(micros))
            });
    }

    /// Opens a reservation slot if fewer than `maximum` are open.
    pub fn open_reservation(&self, maximum: Option<u32>) -> Result<(), u32> {
        let maximum = maximum.unwrap_or(crate::policy::MAX_RESERVATIONS_PER_KEY);
        self.open_reservations
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < maximum).then_some(open + 1)
            })
            .map(|_| ())
    }

    pub fn close_reservation(&self) {
        let before = self.open_reservations.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "closing a reservation that was never opened");
    }
}

#[derive(Debug)]
struct KeyEntry {
    hash: u64,
    name: Box<str>,
    state: KeyState,
}

#[derive(Debug)]
pub struct Shard {
    pub policy: Arc<Policy>,
    keys: HashTable<KeyEntry, TablePages>,
}

impl Shard {
    /// The admission path's lookup. Over many keys each step of it is a cache miss; the
    /// name's bytes and the key's usage live in two other allocations, so the usage is
    /// prefetched before the name is compared and the two misses overlap instead of adding up.
    #[inline]
    pub fn find(&self, hash: u64, key: &str) -> Option<&KeyState> {
        self.keys
            .find(hash, |entry| {
                entry.hash == hash && {
                    entry.state.usage.prefetch();
                    &*entry.name == key
                }
            })
            .map(|entry| &entry.state)
    }

    /// A batch's first look ahead: starts loading the entries the key may sit in, reading
    /// only the table's control bytes (a small array, mostly in cache). Never dereferences an
    /// entry, so it costs no wait for one.
    #[inline]
    fn prefetch_entry(&self, hash: u64) {
        let _ = self.keys.find(hash, |entry| {
            let start = std::ptr::from_ref(entry).cast::<u8>();
            prefetch(start);
            prefetch(start.wrapping_add(std::mem::size_of::<KeyEntry>() - 1));
            false
        });
    }

    /// A batch's second look ahead, once the entry is (likely) in cache: starts loading the
    /// key's name and usage (see `UsageCell::prefetch`), so the real lookup waits for neither.
    #[inline]
    fn prefetch_pointees(&self, hash: u64) {
        let _ = self.keys.find(hash, |entry| {
            if entry.hash == hash {
                prefetch(entry.name.as_ptr());
                entry.state.usage.prefetch();
            }
            false
        });
    }

    pub fn find_mut(&mut self, hash: u64, key: &str) -> Option<&mut KeyState> {
        self.keys
            .find_mut(hash, |entry| &*entry.name == key)
            .map(|entry| &mut entry.state)
    }

    pub fn insert(&mut self, hash: u64, key: &str, state: KeyState) {
        self.keys.insert_unique(
            hash,
            KeyEntry {
                hash,
                name: key.into(),
                state,
            },
            |entry| entry.hash,
        );
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut KeyState)> {
        self.keys
            .iter_mut()
            .map(|entry| (&*entry.name, &mut entry.state))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &KeyState)> {
        self.keys.iter().map(|entry| (&*entry.name, &entry.state))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn table_bytes(&self) -> usize {
        self.keys.capacity() * (std::mem::size_of::<KeyEntry>() + 1)
    }
}

#[derive(Debug)]
pub struct KeyTable {
    shards: Box<[CachePadded<ShardLock<Shard>>]>,
    // Relaxed: a bound check only; the authoritative insert happens under a shard's write lock
    // and the registry mutex, which serialise key creation.
    count: AtomicU64,
}

impl KeyTable {
    pub fn new(policy: Arc<Policy>) -> KeyTable {
        KeyTable {
            shards: (0..SHARDS)
                .map(|_| {
                    CachePadded::new(ShardLock::new(Shard {
                        policy: Arc::clone(&policy),
                        keys: HashTable::new_in(TablePages),
                    }))
                })
                .collect(),
            count: AtomicU64::new(0),
        }
    }

    pub fn hash(key: &str) -> u64 {
        FxBuildHasher.hash_one(key)
    }

    fn shard_of(&self, hash: u64) -> &ShardLock<Shard> {
        &self.shards[((hash >> 32) as usize) & (SHARDS - 1)]
    }

    /// Runs `f` with the key's shard read-locked: the admission path.
    #[inline]
    pub fn read<R>(&self, key: &str, f: impl FnOnce(&Policy, Option<&KeyState>) -> R) -> R {
        self.read_hashed(KeyTable::hash(key), key, f)
    }

    /// `read` with the key's hash already at hand (`KeyTable::hash(key)`).
    #[inline]
    pub fn read_hashed<R>(
        &self,
        hash: u64,
        key: &str,
        f: impl FnOnce(&Policy, Option<&KeyState>) -> R,
    ) -> R {
        debug_assert_eq!(hash, KeyTable::hash(key));
        let shard = self.shard_of(hash).read();
        f(&shard.policy, shard.find(hash, key))
    }

    /// Looks ahead for a batch (see `Shard::prefetch_entry`): what `read` of this key will
    /// touch first starts loading now. Only hints; correct whatever the key.
    #[inline]
    pub fn prefetch_entry(&self, hash: u64) {
        self.shard_of(hash).read().prefetch_entry(hash);
    }

    /// The second look ahead (see `Shard::prefetch_pointees`), some requests after the first.
    #[inline]
    pub fn prefetch_pointees(&self, hash: u64) {
        self.shard_of(hash).read().prefetch_pointees(hash);
    }

    /// Runs `f` with the key's shard write-locked: admin calls.
    pub fn write<R>(&self, key: &str, f: impl FnOnce(&Policy, Option<&mut KeyState>) -> R) -> R {
        let hash = KeyTable::hash(key);
        let mut shard = self.shard_of(hash).write();
        let policy = Arc::clone(&shard.policy);
        f(&policy, shard.find_mut(hash, key))
    }

    pub fn insert(&self, key: &str, state: KeyState) {
        let hash = KeyTable::hash(key);
        let mut shard = self.shard_of(hash).write();
        debug_assert!(shard.find(hash, key).is_none());
        shard.insert(hash, key, state);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write-locks every shard in order: for a policy swap and full sweeps.
    pub fn lock_all(&self) -> Vec<WriteGuard<'_, Shard>> {
        self.shards.iter().map(|shard| shard.write()).collect()
    }

    /// Visits every shard write-locked, one at a time.
    pub fn for_each_shard(&self, mut f: impl FnMut(&mut Shard)) {
        for shard in self.shards.iter() {
            f(&mut shard.write());
        }
    }
}

/// A team as the admin side sees it: who is in it and with which key.
#[derive(Debug)]
pub struct TeamRecord {
    pub team: Arc<Team>,
    /// user -> that user's plan key in this team.
    pub members: FxHashMap<Arc<str>, Box<str>>,
    /// The user whose Default Team this is, if it is one.
    pub owner: Option<Arc<str>>,
}

#[derive(Debug)]
pub struct UserRecord {
    pub name: Arc<str>,
    pub default_team: Box<str>,
    pub payg_keys: Vec<Box<str>>,
}

/// Users and teams: cold state behind one mutex.
#[derive(Debug, Default)]
pub struct Registry {
    pub users: FxHashMap<Arc<str>, UserRecord>,
    pub teams: FxHashMap<Box<str>, TeamRecord>,
}

impl Registry {
    /// The team named `team`, or the error naming it.
    pub fn team(&self, team: &str) -> Result<Arc<Team>, crate::error::Error> {
        self.teams
            .get(team)
            .map(|record| Arc::clone(&record.team))
            .ok_or_else(|| crate::error::Error::UnknownTeam { team: team.into() })
    }
}

/// The Default Team of `user` is named `@user`; other team names cannot start with `@`.
pub fn default_team_name(user: &str) -> String {
    format!("@{user}")
}
