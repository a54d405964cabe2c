//! Accounts: users, teams, members, seats and keys.
//!
//! A user has a Default Team of their own and one plan key per team they belong to; a key exists
//! before any resources and becomes usable when its member gets a seat (a plan) or the team has
//! credits. Pay-as-you-go keys belong to a user and never draw on plan quota or credits.
//!
//! Keys live in a sharded table: each shard is a `ShardLock` (see `lock`) over a hash table,
//! read-locked on the admission path (each thread on its own reader counter, so threads on
//! different keys write no common cache line), write-locked only by admin calls, a checkpoint's
//! cut, the idle keys' reclaim and a give-back into a calendar period a usage correction removed
//! units from (`KeyState::short_until_ms`). The shard also holds the policy the keys in it are
//! laid out for, so a policy swap (all shards write-locked) and admission never see each other
//! half-done.
//!
//! Over many keys a lookup waits for three cache misses one after another: the table's control
//! bytes, the entry, then what the entry points to (a long name, the usage, its counters and the
//! rolling slot). A name of up to `INLINE_NAME_BYTES` sits in the entry itself, so comparing it
//! misses nothing more. Each shard also keeps a small table of prefetch hints indexed straight by
//! the key's hash (`KeyHint`): read alongside the control bytes, it starts loading the entry (or
//! a long name) and the usage while the control bytes are still on their way. A hint is only
//! ever prefetched, never dereferenced, so one that is stale or belongs to another key costs a
//! wasted prefetch, nothing else.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::ledger::{Team, UsageCell};
use crate::lock::{ShardLock, WriteGuard};
use crate::pages::{boxed_slice_in, TablePages, UsagePages};
use crate::policy::{same_name, PlanId, Policy};
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
    /// Revoked (`Engine::revoke_key`): every later request is denied `KeyRevoked`; what it
    /// used still counts, its reservations still settle and its requests still refund. Never
    /// cleared; written under the shard's write lock only.
    pub revoked: bool,
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
    /// The end (UTC ms, exclusive) of the latest calendar period a usage correction removed
    /// units from on this key (0: none). A calendar period that starts before it may record
    /// fewer units than the receipts naming it hold, and its counter keeps an admission's
    /// units in flight in the same word as the recorded ones: a give-back of a hold there
    /// runs under the shard's write lock (`Engine::give_back`). Only grows; written under the
    /// shard's write lock only, so a reader holding the read lock sees it fixed. Kept in a
    /// snapshot (format 4 on: `short_keys`), set again by a replayed removal as the live one
    /// set it (`Engine::mark_replayed_removal`); an open from an older snapshot works it out
    /// from the counters and the outstanding receipts (`Engine::mark_short_periods`).
    pub short_until_ms: u64,
}

impl KeyState {
    pub fn new(kind: KeyKind, user: Arc<str>, team: Arc<Team>) -> KeyState {
        KeyState {
            kind,
            revoked: false,
            user,
            team,
            seat: None,
            usage: UsageCell::default(),
            open_reservations: AtomicU32::new(0),
            payg_micros: AtomicU64::new(0),
            time_floor_ms: 0,
            short_until_ms: 0,
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
    name: KeyName,
    state: KeyState,
}

/// Names up to this many bytes are kept in the table entry (`KeyName::Inline`).
const INLINE_NAME_BYTES: usize = 22;

/// A key's name. Every admission compares it, so a short one sits in the entry the lookup
/// reads anyway; a longer one is a block of its own on the usage pages, like the key's usage
/// (over a million keys the global allocator's 4 KiB pages made a name there a page walk per
/// request: hotloop at 1,000,000 keys with the allocator's heap on huge pages, `consume_into`
/// 2.13-2.18x governor against 2.32-2.53x).
#[derive(Debug)]
enum KeyName {
    Inline {
        len: u8,
        bytes: [u8; INLINE_NAME_BYTES],
    },
    Paged(allocator_api2::boxed::Box<str, UsagePages>),
}

impl KeyName {
    fn new(key: &str) -> KeyName {
        if key.len() > INLINE_NAME_BYTES {
            return KeyName::Paged(name_on_pages(key));
        }
        let mut bytes = [0; INLINE_NAME_BYTES];
        bytes[..key.len()].copy_from_slice(key.as_bytes());
        KeyName::Inline {
            len: key.len() as u8,
            bytes,
        }
    }

    #[inline]
    fn as_str(&self) -> &str {
        match self {
            // SAFETY: the first `len` bytes were copied whole from a `str` (`KeyName::new`).
            KeyName::Inline { len, bytes } => unsafe {
                std::str::from_utf8_unchecked(bytes.get_unchecked(..usize::from(*len)))
            },
            KeyName::Paged(name) => name,
        }
    }

    /// The name's own block, if it has one (what a lookup would miss on after the entry).
    #[inline]
    fn block(&self) -> Option<*const u8> {
        match self {
            KeyName::Inline { .. } => None,
            KeyName::Paged(name) => Some(name.as_ptr()),
        }
    }
}

/// `key`'s bytes in a block of their own on the usage pages.
fn name_on_pages(key: &str) -> allocator_api2::boxed::Box<str, UsagePages> {
    let mut bytes = allocator_api2::vec::Vec::with_capacity_in(key.len(), UsagePages);
    bytes.extend_from_slice(key.as_bytes());
    let (raw, allocator) =
        allocator_api2::boxed::Box::into_raw_with_allocator(bytes.into_boxed_slice());
    // SAFETY: the bytes were copied from a `str`, so they are UTF-8; `[u8]` and `str` have the
    // same layout, and the box is rebuilt with the allocator it came from.
    unsafe { allocator_api2::boxed::Box::from_raw_in(raw as *mut str, allocator) }
}

#[derive(Debug)]
pub struct Shard {
    pub policy: Arc<Policy>,
    keys: HashTable<KeyEntry, TablePages>,
    /// Prefetch hints, a power of two of them and at least twice as many as keys (empty
    /// while the shard holds fewer than `HINTS_FROM_KEYS`); see the module comment.
    hints: allocator_api2::boxed::Box<[KeyHint], TablePages>,
}

/// A shard keeps prefetch hints once it holds this many keys (8,192 over all shards). With
/// hints in every shard, two threads on 1,024 keys each (32 per shard) went from 10.4-10.8 to
/// 8.4-9.5 M admissions/s. But from 128 per shard on, the lookup's misses already go to DRAM on
/// these machines: at 16,384 keys (`hotloop`, 3 alternating pairs against a threshold of 1,024)
/// one thread did 3.15/3.22/2.66 M admissions/s against 2.44/2.37/2.50, two threads
/// 5.36/6.53/5.27 against 4.31/5.20/5.00.
const HINTS_FROM_KEYS: usize = 128;

/// Where the first key found at this hint's index keeps what a lookup reads: its hash (the
/// hint's holder; 0 for none), where the lookup reads the name (the entry for a name kept
/// inline, tagged in bit 0, or the name's block), the usage's block and the rolling slot written
/// last (0 for none). Relaxed loads and stores: a holder to compare and addresses to prefetch,
/// never dereferenced.
#[derive(Debug, Default)]
#[repr(align(32))]
struct KeyHint {
    words: [AtomicUsize; 4],
}

/// Starts loading a table entry at `start`: both lines it may span.
#[inline]
fn prefetch_entry_at(start: *const u8) {
    prefetch(start);
    prefetch(start.wrapping_add(std::mem::size_of::<KeyEntry>() - 1));
}

/// Bit 0 of a hint's name word: the address is an entry's (its name is inline), which spans up
/// to two lines; otherwise it is a name's block, one line.
const HINT_ENTRY: usize = 1;

impl Shard {
    fn new(policy: Arc<Policy>) -> Shard {
        Shard {
            policy,
            keys: HashTable::new_in(TablePages),
            hints: boxed_slice_in(0, TablePages, KeyHint::default),
        }
    }

    #[inline]
    fn hint(&self, hash: u64) -> Option<&KeyHint> {
        // Bits of the hash that neither the shard index (32..38) nor the table's own index
        // (the low bits) is taken from, so keys that share one do not crowd the other.
        let index = (hash >> 40) as usize & self.hints.len().wrapping_sub(1);
        self.hints.get(index)
    }

    /// Starts loading what the hint for `hash` says a lookup of the key will read after its
    /// entry; a no-op without one.
    #[inline]
    fn prefetch_hinted(&self, hash: u64) {
        let Some(hint) = self.hint(hash) else {
            return;
        };
        let [_, name, usage, slot] =
            std::array::from_fn(|word| hint.words[word].load(Ordering::Relaxed));
        if name & HINT_ENTRY != 0 {
            prefetch_entry_at((name & !HINT_ENTRY) as *const u8);
        } else if name != 0 {
            prefetch(name as *const u8);
        }
        crate::ledger::prefetch_usage([usage, slot]);
    }

    /// Makes the hint for `hash` point where `entry`'s lookup reads, if the hint is free or
    /// already this key's (written only if something moved). A hint another key holds is left
    /// alone: two keys taking turns to overwrite one would write its line on every lookup, and
    /// bounce it between the cores of the threads using them (measured with hints in every
    /// shard, rewritten by the last key found: two threads on 1,024 keys each fell to 7.7-8.0
    /// M admissions/s, against 8.4-9.5 left alone and 10.4-11.7 without hints).
    #[inline]
    fn note_hint(&self, hash: u64, entry: &KeyEntry) {
        if let Some(hint) = self.hint(hash) {
            Shard::note_in(hint, entry);
        }
    }

    /// `note_hint`'s work, out of line so the lookup stays small enough to inline.
    #[inline(never)]
    fn note_in(hint: &KeyHint, entry: &KeyEntry) {
        let words = &hint.words;
        // The hash as the holder (on a 32-bit target its low half: a clash costs a prefetch).
        let holder = entry.hash as usize;
        let held_by = words[0].load(Ordering::Relaxed);
        if held_by != holder && held_by != 0 {
            return;
        }
        let now = Shard::hint_words(entry);
        let differs = (0..4).fold(false, |differs, word| {
            differs | (words[word].load(Ordering::Relaxed) != now[word])
        });
        if differs {
            for (word, address) in words.iter().zip(now) {
                word.store(address, Ordering::Relaxed);
            }
        }
    }

    /// What a hint held by `entry`'s key says (see `KeyHint`).
    fn hint_words(entry: &KeyEntry) -> [usize; 4] {
        let name = match entry.name.block() {
            Some(block) => block as usize,
            None => std::ptr::from_ref(entry) as usize | HINT_ENTRY,
        };
        let [usage, slot] = entry.state.usage.prefetch_addresses();
        [entry.hash as usize, name, usage, slot]
    }

    /// The words the hint for `hash` holds now.
    #[cfg(test)]
    fn hinted(&self, hash: u64) -> Option<[usize; 4]> {
        self.hint(hash)
            .map(|hint| std::array::from_fn(|word| hint.words[word].load(Ordering::Relaxed)))
    }

    /// The admission path's lookup. Over many keys each step of it is a cache miss; the key's
    /// usage (and a long name) live in other blocks, so the usage is prefetched before the
    /// name is compared and the misses overlap instead of adding up.
    #[inline]
    pub fn find(&self, hash: u64, key: &str) -> Option<&KeyState> {
        self.find_noting(hash, key, true)
    }

    /// `find`, leaving the key's prefetch hint alone unless `note_hint`. The entries are
    /// walked with `iter_hash` in a plain loop (the same candidates in the same order as
    /// `HashTable::find`): `find` calls its test through a `dyn FnMut`, which stayed a call of
    /// its own on the admission path, its captures passed through memory. Always inlined: as
    /// a call of its own (`#[inline]`), or with `Iterator::find` instead of the loop, it saved
    /// nothing (callgrind, hot-key `consume_into`: 987 as before, 971 so).
    #[inline(always)]
    fn find_noting(&self, hash: u64, key: &str, note_hint: bool) -> Option<&KeyState> {
        for entry in self.keys.iter_hash(hash) {
            if entry.hash != hash {
                continue;
            }
            // Also here: the hint may have been another key's.
            entry.state.usage.prefetch();
            if same_name(entry.name.as_str(), key) {
                if note_hint {
                    self.note_hint(hash, entry);
                }
                return Some(&entry.state);
            }
        }
        None
    }

    /// A batch's first look ahead: starts loading the entries the key may sit in, reading
    /// only the table's control bytes (a small array, mostly in cache). Never dereferences an
    /// entry, so it costs no wait for one.
    #[inline]
    fn prefetch_entry(&self, hash: u64) {
        let _ = self.keys.find(hash, |entry| {
            prefetch_entry_at(std::ptr::from_ref(entry).cast());
            false
        });
    }

    /// A batch's second look ahead, once the entry is (likely) in cache: starts loading the
    /// key's name and usage (see `UsageCell::prefetch`), so the real lookup waits for neither.
    #[inline]
    fn prefetch_pointees(&self, hash: u64) {
        let _ = self.keys.find(hash, |entry| {
            if entry.hash == hash {
                if let Some(block) = entry.name.block() {
                    prefetch(block);
                }
                entry.state.usage.prefetch();
            }
            false
        });
    }

    pub fn find_mut(&mut self, hash: u64, key: &str) -> Option<&mut KeyState> {
        self.keys
            .find_mut(hash, |entry| entry.name.as_str() == key)
            .map(|entry| &mut entry.state)
    }

    pub fn insert(&mut self, hash: u64, key: &str, state: KeyState) {
        let least = 2 * (self.keys.len() + 1);
        if self.keys.len() >= HINTS_FROM_KEYS && self.hints.len() < least {
            // Doubled as the keys double (the old hints are dropped; they refill as keys are
            // looked up): two to four hints per key, 64 to 128 bytes.
            self.hints = boxed_slice_in(least.next_power_of_two(), TablePages, KeyHint::default);
        }
        self.keys.insert_unique(
            hash,
            KeyEntry {
                hash,
                name: KeyName::new(key),
                state,
            },
            |entry| entry.hash,
        );
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut KeyState)> {
        self.keys
            .iter_mut()
            .map(|entry| (entry.name.as_str(), &mut entry.state))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &KeyState)> {
        self.keys
            .iter()
            .map(|entry| (entry.name.as_str(), &entry.state))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn table_bytes(&self) -> usize {
        self.keys.capacity() * (std::mem::size_of::<KeyEntry>() + 1)
            + std::mem::size_of_val(&*self.hints)
    }
}

#[derive(Debug)]
pub struct KeyTable {
    /// Shared with a checkpoint's snapshot thread, which settles the copies a cut left on the
    /// shards (`ShardLock::settle`).
    shards: Arc<[CachePadded<ShardLock<Shard>>]>,
    // Relaxed: a bound check only; the authoritative insert happens under a shard's write lock
    // and the registry mutex, which serialise key creation.
    count: AtomicU64,
}

impl KeyTable {
    pub fn new(policy: Arc<Policy>) -> KeyTable {
        KeyTable {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(ShardLock::new(Shard::new(Arc::clone(&policy)))))
                .collect(),
            count: AtomicU64::new(0),
        }
    }

    pub fn hash(key: &str) -> u64 {
        FxBuildHasher.hash_one(key)
    }

    fn shard_of(&self, hash: u64) -> &ShardLock<Shard> {
        &self.shards[KeyTable::shard_index(hash)]
    }

    /// The shard a key of this hash lives in (public for tests that need two keys in
    /// different shards).
    pub fn shard_index(hash: u64) -> usize {
        ((hash >> 32) as usize) & (SHARDS - 1)
    }

    /// Runs `f` with the key's shard read-locked: the admission path.
    #[inline]
    pub fn read<R>(&self, key: &str, f: impl FnOnce(&Policy, Option<&KeyState>) -> R) -> R {
        self.read_hashed(KeyTable::hash(key), key, false, f)
    }

    /// `read` with the key's hash already at hand (`KeyTable::hash(key)`). A batch that
    /// looked ahead (`prefetch_entry`, `prefetch_pointees`) says so: the prefetch hints are
    /// then neither read nor written, since the hint's own line would be the one miss left
    /// (measured: `consume_many` at 100,000 keys, p50 of a batch of 1,000 up from about 0.4 to
    /// 0.6 ms).
    #[inline]
    pub fn read_hashed<R>(
        &self,
        hash: u64,
        key: &str,
        looked_ahead: bool,
        f: impl FnOnce(&Policy, Option<&KeyState>) -> R,
    ) -> R {
        debug_assert_eq!(hash, KeyTable::hash(key));
        let shard = self.shard_of(hash).read();
        if !looked_ahead {
            shard.prefetch_hinted(hash);
        }
        f(&shard.policy, shard.find_noting(hash, key, !looked_ahead))
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
        ShardLock::write_all(self.shards.iter().map(|shard| &**shard))
    }

    pub const SHARDS: usize = SHARDS;

    /// The shard locks themselves, for a thread that outlives a borrow of the table (a
    /// checkpoint's snapshot thread settling a cut's copies).
    pub(crate) fn shard_locks(&self) -> ShardLocks {
        Arc::clone(&self.shards)
    }

    /// Runs `f` on shard `index` (below `SHARDS`) write-locked.
    pub fn with_shard<R>(&self, index: usize, f: impl FnOnce(&mut Shard) -> R) -> R {
        f(&mut self.shards[index].write())
    }

    /// Visits every shard write-locked, one at a time.
    pub fn for_each_shard(&self, mut f: impl FnMut(&mut Shard)) {
        for shard in self.shards.iter() {
            f(&mut shard.write());
        }
    }
}

/// Every key shard's lock, in shard order (`KeyTable::shard_locks`).
pub(crate) type ShardLocks = Arc<[CachePadded<ShardLock<Shard>>]>;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> KeyState {
        KeyState::new(KeyKind::Plan, "u".into(), Arc::new(Team::new("@u")))
    }

    /// Names of every length up to 40 bytes, some of two-byte characters: up to
    /// `INLINE_NAME_BYTES` they sit in the entry, longer in a block; each is found by its own
    /// name, and a name of the same length that differs in its last character is not found
    /// even with the first name's hash (the bytes are compared, not only the hash).
    #[test]
    fn names_up_to_the_inline_size_sit_in_the_entry_and_longer_ones_in_a_block() {
        let mut shard = Shard::new(Arc::new(Policy::token_plan()));
        let names: Vec<String> = (1..=40)
            .map(|len| "é".repeat(len / 2) + &"k".repeat(len % 2))
            .collect();
        for name in &names {
            shard.insert(KeyTable::hash(name), name, state());
        }
        for name in &names {
            let hash = KeyTable::hash(name);
            let entry = shard
                .keys
                .find(hash, |entry| entry.hash == hash)
                .expect("inserted");
            assert_eq!(entry.name.as_str(), name);
            assert_eq!(
                entry.name.block().is_none(),
                name.len() <= INLINE_NAME_BYTES,
                "{} bytes",
                name.len()
            );
            assert!(shard.find(hash, name).is_some(), "{name}");
            let other = match name.strip_suffix('k') {
                Some(rest) => format!("{rest}q"),
                None => format!("{}è", &name[..name.len() - 2]),
            };
            assert_eq!(other.len(), name.len());
            assert!(shard.find(hash, &other).is_none(), "{other} is not {name}");
        }
        let listed: std::collections::BTreeSet<&str> = shard.iter().map(|(name, _)| name).collect();
        assert_eq!(listed, names.iter().map(String::as_str).collect());
    }

    #[test]
    fn a_lookup_leaves_a_hint_of_what_it_read_and_the_hints_grow_with_the_keys() {
        let policy = Arc::new(Policy::token_plan());
        let plus = policy.plan_id("Plus");
        let mut shard = Shard::new(Arc::clone(&policy));
        let names: Vec<String> = (0..3 * HINTS_FROM_KEYS)
            .map(|i| format!("key-{i}"))
            .collect();
        for (count, name) in names.iter().enumerate() {
            shard.insert(KeyTable::hash(name), name, state());
            if count < HINTS_FROM_KEYS {
                assert!(shard.hints.is_empty(), "{count} keys");
            } else {
                assert!(shard.hints.len().is_power_of_two());
                assert!(shard.hints.len() >= 2 * (count + 1), "{count} keys");
            }
        }
        // Half the keys get usage, so their hints carry usage, counters and slot addresses.
        for name in names.iter().step_by(2) {
            let state = shard
                .find_mut(KeyTable::hash(name), name)
                .expect("inserted");
            state
                .usage
                .set(Some(crate::ledger::KeyUsage::for_plan(&policy, plus)));
        }
        let mut owners = std::collections::HashMap::new();
        for name in &names {
            let hash = KeyTable::hash(name);
            let state = shard.find(hash, name).expect("inserted");
            let index = (hash >> 40) as usize & (shard.hints.len() - 1);
            // A hint belongs to the first key found at its index.
            if *owners.entry(index).or_insert(name) != name {
                continue;
            }
            let [usage, slot] = state.usage.prefetch_addresses();
            let entry = shard
                .keys
                .find(hash, |entry| entry.name.as_str() == name.as_str())
                .expect("inserted");
            // Every name here is short: the hint points at the entry itself.
            assert!(entry.name.block().is_none(), "{name} is kept inline");
            let entry_address = std::ptr::from_ref(entry) as usize | HINT_ENTRY;
            assert_eq!(
                shard.hinted(hash),
                Some([hash as usize, entry_address, usage, slot]),
                "{name}"
            );
            assert_eq!(
                usage != 0,
                name.trim_start_matches("key-").parse::<u32>().unwrap() % 2 == 0
            );
        }
    }
}
