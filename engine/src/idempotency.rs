//! Idempotency: a request id seen again within the horizon returns its first decision and counts
//! nothing; the same id with a different key, resource or quantities is an error.
//!
//! The table is sharded by the id's hash, each shard a mutex over a map and a queue in arrival
//! order; entries older than the horizon (at least the policy's longest window) are dropped as
//! new ones arrive. The table is bounded as a whole: when it holds its capacity of entries still
//! inside the horizon, a new id is refused with `CapacityExceeded` rather than forgotten early.

use std::collections::{BTreeMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::lock::{LeavableGuard, LeavableMutex};
use crossbeam_utils::CachePadded;
use rustc_hash::{FxBuildHasher, FxHashMap};

use bincode::Options;

use crate::admission::{Decision, Quantities, Receipt};
use crate::error::Error;

pub(crate) const SHARDS: usize = 64;

/// Whether a decision is remembered under its request id (and logged, so a restart remembers
/// it too): every one but a denial for want of a valid key (one the engine does not know, or
/// revoked). Such a caller is no principal the engine keeps anything for: its ids would each
/// take a place in the table every key shares, for the whole horizon (a month), and an event
/// in the log, so a caller with no key could fill the table and have every new id of every
/// key refused. Its id, sent again, is decided anew: admitted once the key exists, or on the
/// member's new key after a rotation.
pub(crate) fn remembers(decision: &Decision) -> bool {
    !matches!(
        decision,
        Decision::Denied(crate::admission::Denial {
            reason: crate::admission::DenialReason::UnknownKey
                | crate::admission::DenialReason::KeyRevoked,
            ..
        })
    )
}

/// What a request id was first used for: borrowed from the request being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint<'a> {
    pub key: &'a str,
    pub resource: &'a str,
    pub quantities: Quantities,
}

/// A remembered request id's first use and first decision. A table at its default capacity
/// holds a million of these, so what never changes after the first decision (the fingerprint,
/// the decision and its receipt) is kept encoded in one allocation (`first`), decoded only
/// when a repeat, a refund, a policy swap or a snapshot needs it. Decoded, a `Decision` alone
/// is 264 bytes and a `Receipt` 128: records that held them so took 1.5 KB per id resident
/// (`examples/idloop`), records kept so about 390 bytes.
#[derive(Debug)]
pub(crate) struct RequestRecord {
    /// The request's own timestamp, which snapshots carry (the id is forgotten the horizon
    /// after it: `Shard::remember`).
    pub arrived_ms: u64,
    pub refunded: bool,
    /// Where the event that logged the decision stands: a repeat answers only once it is
    /// durable.
    pub logged: LoggedAs,
    /// `FirstUse`'s layout: the key's length (`push_length`) and bytes, the resource's, then
    /// the quantities, the decision and the receipt (`first_use_encoding`).
    first: Box<[u8]>,
}

/// The encoding of a record's quantities, decision and receipt: the snapshot's.
fn first_use_encoding() -> impl bincode::Options + Copy {
    bincode::DefaultOptions::new().with_varint_encoding()
}

/// What `RequestRecord::first` holds, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FirstUse<'a> {
    pub fingerprint: Fingerprint<'a>,
    pub decision: Decision,
    pub receipt: Option<Receipt>,
}

impl<'a> FirstUse<'a> {
    /// Decodes what `RequestRecord::encoded_first_use` gave.
    pub fn decode(first: &'a [u8]) -> FirstUse<'a> {
        let (key, resource, rest) = FirstUse::split(first);
        let (quantities, decision, receipt) = first_use_encoding()
            .deserialize::<(Quantities, Decision, Option<Receipt>)>(rest)
            .expect("a record decodes as `encode_first_use` encoded it");
        FirstUse {
            fingerprint: Fingerprint {
                key,
                resource,
                quantities,
            },
            decision,
            receipt,
        }
    }

    /// The key and the resource, and the encoded rest (`first_use_encoding`).
    fn split(mut first: &'a [u8]) -> (&'a str, &'a str, &'a [u8]) {
        let mut text = || {
            let (len, after) = take_length(first);
            let (bytes, after) = after.split_at(len);
            first = after;
            // Written from a `&str` by `encode_first_use`.
            std::str::from_utf8(bytes).expect("a record's key and resource are UTF-8")
        };
        let key = text();
        let resource = text();
        (key, resource, first)
    }
}

impl RequestRecord {
    /// A record of a first decision, not refunded.
    pub fn new(
        arrived_ms: u64,
        fingerprint: &Fingerprint<'_>,
        decision: &Decision,
        receipt: Option<&Receipt>,
        logged: LoggedAs,
    ) -> RequestRecord {
        RequestRecord {
            arrived_ms,
            refunded: false,
            logged,
            first: encode_first_use(fingerprint, decision, receipt),
        }
    }

    /// Everything the record keeps of the first use, decoded.
    pub fn first_use(&self) -> FirstUse<'_> {
        FirstUse::decode(&self.first)
    }

    /// The first use as encoded (`FirstUse::decode` reads it): what a checkpoint's cut copies.
    pub fn encoded_first_use(&self) -> &[u8] {
        &self.first
    }

    /// The first decision (the receipt after it left encoded).
    pub fn decision(&self) -> Decision {
        self.quantities_and_decision().1
    }

    /// The first decision, if `fingerprint` is what the id was first used for (a repeat's
    /// answer).
    pub fn decision_for(&self, fingerprint: &Fingerprint<'_>) -> Option<Decision> {
        let (key, resource, _) = FirstUse::split(&self.first);
        if key != fingerprint.key || resource != fingerprint.resource {
            return None;
        }
        let (quantities, decision) = self.quantities_and_decision();
        (quantities == fingerprint.quantities).then_some(decision)
    }

    fn quantities_and_decision(&self) -> (Quantities, Decision) {
        let (_, _, rest) = FirstUse::split(&self.first);
        first_use_encoding()
            .allow_trailing_bytes()
            .deserialize(rest)
            .expect("a record decodes as `encode_first_use` encoded it")
    }

    /// Replaces the first decision (a policy swap renumbers what it names).
    pub fn set_decision(&mut self, decision: &Decision) {
        let first = self.first_use();
        self.first = encode_first_use(&first.fingerprint, decision, first.receipt.as_ref());
    }
}

/// `RequestRecord::first`.
fn encode_first_use(
    fingerprint: &Fingerprint<'_>,
    decision: &Decision,
    receipt: Option<&Receipt>,
) -> Box<[u8]> {
    let tail = (fingerprint.quantities, decision, receipt);
    // Sized exactly first, so the boxed slice is the buffer itself (no shrinking copy).
    let tail_bytes = first_use_encoding()
        .serialized_size(&tail)
        .map_or(0, |bytes| usize::try_from(bytes).unwrap_or(0));
    let mut first = Vec::with_capacity(
        2 * LENGTH_BYTES_MAX + fingerprint.key.len() + fingerprint.resource.len() + tail_bytes,
    );
    for text in [fingerprint.key, fingerprint.resource] {
        push_length(&mut first, text.len());
        first.extend_from_slice(text.as_bytes());
    }
    first_use_encoding()
        .serialize_into(&mut first, &tail)
        .expect("encoding into a Vec cannot fail");
    first.into_boxed_slice()
}

/// The most bytes `push_length` writes (a `usize` in 7-bit groups).
const LENGTH_BYTES_MAX: usize = usize::BITS.div_ceil(7) as usize;

/// Appends `len` in 7-bit groups, low first, the high bit set on all but the last: any length
/// fits (a snapshot's damaged record may name a key longer than any request could).
fn push_length(out: &mut Vec<u8>, mut len: usize) {
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
}

/// Reads what `push_length` wrote at the front of `bytes`: the length and the rest.
fn take_length(bytes: &[u8]) -> (usize, &[u8]) {
    let mut len = 0usize;
    for (index, &byte) in bytes.iter().enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return (len, &bytes[index + 1..]);
        }
    }
    unreachable!("a record's lengths end in a byte without the high bit (`push_length`)")
}

/// Where the event that logged a first decision stands in the log. Answering a repeat of the
/// request id is an acknowledgement too, so it waits until that event is durable, and answers
/// the log's error if it never will be (the first call then gives the effect back and forgets
/// the id).
#[derive(Debug, Clone, Default)]
pub(crate) enum LoggedAs {
    /// Durable already (restored from the log), or never to be (no log, or nothing logged).
    #[default]
    Durable,
    /// Appended as this event.
    Event(u64),
    /// Staged in a `consume_many` chunk, appended when the chunk ends.
    Chunk(Arc<ChunkSeq>),
}

/// A `consume_many` chunk's last sequence number, set once the chunk is appended: 0 until
/// then, `ChunkSeq::NEVER` if it never will be (its append failed, or its call unwound).
#[derive(Debug, Default)]
pub(crate) struct ChunkSeq(
    // Release on the store, Acquire on the load: a repeat that sees the number sees the chunk
    // appended.
    std::sync::atomic::AtomicU64,
);

impl ChunkSeq {
    pub const NEVER: u64 = u64::MAX;

    /// Sets the chunk's last sequence number (`NEVER` if it will have none); once.
    pub fn set(&self, seq: u64) {
        debug_assert_ne!(seq, 0, "sequence numbers start at 1");
        let previous = self.0.swap(seq, std::sync::atomic::Ordering::Release);
        debug_assert_eq!(previous, 0, "a chunk is appended once");
    }

    /// The chunk's last sequence number, or `NEVER`, if its call has set it.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            seq => Some(seq),
        }
    }

    /// The chunk's last sequence number, or `NEVER`, once its call has set it. The chunk's
    /// call is running (it holds no lock the caller waits on), so this yields, not parks.
    pub fn wait(&self) -> u64 {
        loop {
            let seq = self.0.load(std::sync::atomic::Ordering::Acquire);
            if seq != 0 {
                return seq;
            }
            std::thread::yield_now();
        }
    }
}

/// Sets a chunk's `ChunkSeq` to `NEVER` if it is dropped unset: a call that unwinds mid-chunk
/// leaves no repeat waiting forever.
#[derive(Debug, Default)]
pub(crate) struct ChunkSeqGuard(Option<Arc<ChunkSeq>>);

impl ChunkSeqGuard {
    /// The chunk's `ChunkSeq`, made on first use: a chunk without request ids allocates none.
    pub fn get(&mut self) -> Arc<ChunkSeq> {
        Arc::clone(self.0.get_or_insert_with(Default::default))
    }

    /// The chunk was appended up to `seq` (`NEVER`: it failed).
    pub fn set(mut self, seq: u64) {
        if let Some(chunk) = self.0.take() {
            chunk.set(seq);
        }
    }
}

impl Drop for ChunkSeqGuard {
    fn drop(&mut self) {
        if let Some(chunk) = self.0.take() {
            chunk.set(ChunkSeq::NEVER);
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Shard {
    records: FxHashMap<Arc<str>, RequestRecord>,
    /// Ids in arrival order, each with the time it is forgotten after (plus the horizon): its
    /// request's timestamp, at most `IN_ORDER_AHEAD_MS` ahead of the engine's clock when the
    /// id arrived and at most `IN_ORDER_BEHIND_MS` behind the newest stamp queued before it
    /// (so the queue is nearly in order: an id at its front keeps those behind it from being
    /// forgotten a little late at most).
    arrivals: VecDeque<(u64, Arc<str>)>,
    /// The newest stamp in `arrivals` (0 once it is empty).
    queued_newest_ms: u64,
    /// The ids stamped further ahead of the clock, or further behind the newest queued stamp,
    /// by their timestamp (and an arrival number, as an id may come back): in the queue, one
    /// id stamped far ahead (a gateway's clock, a typo) stayed at its front and kept every id
    /// behind it from being forgotten, until its shard, then (with the table bounded as a
    /// whole) the table, refused every new id. Queued by the clock's time instead, such an id
    /// was forgotten the horizon after that, and its retry (within the horizon after its
    /// timestamp, so not refused as too old) decided and counted again. Likewise an id stamped
    /// well before one queued ahead of it (a request stamped when it began, counted when it
    /// ended) waited behind it, up to a horizon late, and a full table refused new ids while
    /// it held such ids past the horizon.
    out_of_order: BTreeMap<(u64, u64), Arc<str>>,
    /// The arrival number of the next id put in `out_of_order`.
    next_out_of_order: u64,
    /// Every id stamped before this may have been forgotten: one past the latest stamp of an
    /// id `expire` dropped or a decision anew replaced (`RequestTable::once`), or an open's
    /// bound. A new id stamped before it is refused as too old, as one stamped more than the
    /// horizon before the clock is. Without it, a clock stepped back (or a horizon grown by a
    /// policy swap) let a retry of a forgotten id, stamped as it first was, seem inside the
    /// horizon, and count again. Bounded by the stamps of the ids dropped, not by the clock
    /// that dropped them: by the clock's time less the horizon, a clock that read a year ahead
    /// for one request refused every new id stamped by the real clock for eleven months (and,
    /// recorded by a checkpoint, after every reopen), where only the ids it forgot, all stamped
    /// before the glitch, could have their retries taken for new.
    forgotten_before_ms: u64,
}

/// How far ahead of the engine's clock a request may be stamped for its id to be queued in
/// `Shard::arrivals` (a gateway's clock a little ahead of the engine's); further ahead, it goes
/// into `Shard::out_of_order`.
const IN_ORDER_AHEAD_MS: u64 = 1_000;

/// How far behind the newest stamp queued in `Shard::arrivals` a request may be stamped for
/// its id to be queued there too (concurrent requests stamped a moment apart); further behind,
/// it goes into `Shard::out_of_order`, so it is forgotten at most this late.
const IN_ORDER_BEHIND_MS: u64 = 1_000;

/// Every request-id shard's lock, in shard order (`RequestTable::shard_locks`).
pub(crate) type RequestShards = Arc<[CachePadded<LeavableMutex<Shard>>]>;

#[derive(Debug)]
pub(crate) struct RequestTable {
    /// Shared with a checkpoint's snapshot thread, which settles the copies a cut left on the
    /// shards (`LeavableMutex::settle`).
    shards: RequestShards,
    /// Records held, over every shard: taken (`take_place`) before a new id is decided, given
    /// back when a record is dropped. Bounded by `capacity` as a whole: bounded shard by shard,
    /// a capacity of 64 refused the 21st id (its shard already held one).
    /// Relaxed: a count; a place is taken with one atomic add, so two shards can never both
    /// take the last one.
    held: CachePadded<AtomicUsize>,
    capacity: usize,
    /// The clock's millisecond of the last sweep of every shard (a full table's): at most one
    /// a millisecond, so a table full of live ids does not lock all 64 shards for every id it
    /// refuses. Relaxed: a schedule; `swap` lets one thread of those arriving together sweep.
    swept_at_ms: AtomicU64,
    // Relaxed: a setting, changed by a policy swap to cover its longest window.
    horizon_ms: std::sync::atomic::AtomicU64,
}

pub(crate) const MAX_REQUEST_ID_BYTES: usize = 128;

/// `once`'s answer where the table refuses a new id with `table_error`: the request's own
/// refusal first (`key_refusal`: the denial of a key that is not valid, or the request's own
/// error, such as an unknown resource), else the table's error.
fn own_refusal_first(
    key_refusal: impl FnOnce() -> Result<Option<Decision>, Error>,
    table_error: Error,
) -> Result<Option<(Decision, Option<LoggedAs>)>, Error> {
    match key_refusal()? {
        Some(denial) => Ok(Some((denial, None))),
        None => Err(table_error),
    }
}

impl RequestTable {
    pub fn new(capacity: usize, horizon_ms: u64) -> RequestTable {
        RequestTable {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(LeavableMutex::new(Shard::default())))
                .collect(),
            held: CachePadded::new(AtomicUsize::new(0)),
            capacity: capacity.max(1),
            swept_at_ms: AtomicU64::new(u64::MAX),
            horizon_ms: std::sync::atomic::AtomicU64::new(horizon_ms),
        }
    }

    /// Refuses, in every shard, new ids stamped before `bound_ms`, as if ids had been forgotten
    /// by it (`Shard::forgotten_before_ms`). At open: the bound the latest checkpoint's cut
    /// recorded (`forgotten_before_ms`), ids forgotten before it being in neither its snapshot
    /// nor the log after it; for a snapshot an earlier build took, a guess from the clock's
    /// readings (see `Engine::open`). The bound is not logged, only recorded by checkpoints.
    pub fn forgotten_before(&self, bound_ms: u64) {
        for mut shard in self.lock_all() {
            shard.forgotten_before_ms = shard.forgotten_before_ms.max(bound_ms);
        }
    }

    /// The latest bound any of `shards` refuses new ids stamped before (they may be retries of
    /// ids it forgot): what a checkpoint's cut records (`EventLog::record_logged_by`)
    /// for the open that restores its snapshot, as the ids forgotten before the cut are in
    /// neither the snapshot nor the log after it.
    pub fn forgotten_before_ms(shards: &[LeavableGuard<'_, Shard>]) -> u64 {
        shards
            .iter()
            .map(|shard| shard.forgotten_before_ms)
            .max()
            .unwrap_or(0)
    }

    pub fn horizon_ms(&self) -> u64 {
        self.horizon_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_horizon_ms(&self, horizon_ms: u64) {
        self.horizon_ms
            .store(horizon_ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records held of ids stamped within `horizon_ms` of `now_ms` (the engine's clock): those
    /// the table must keep, whatever its capacity (an id past the horizon is dropped when a
    /// full table sweeps). Drops nothing: an open counts them before anything may change.
    pub fn held_within(&self, now_ms: u64, horizon_ms: u64) -> usize {
        let oldest_kept = now_ms.saturating_sub(horizon_ms);
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .records
                    .values()
                    .filter(|record| record.arrived_ms >= oldest_kept)
                    .count()
            })
            .sum()
    }

    /// Records held now, over every shard.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes a place for a new record; false (and nothing taken) if the table is full.
    fn take_place(&self) -> bool {
        if self.held.fetch_add(1, Ordering::Relaxed) < self.capacity {
            return true;
        }
        self.held.fetch_sub(1, Ordering::Relaxed);
        false
    }

    /// Gives back the places of `records` dropped records.
    fn give_back_places(&self, records: usize) {
        if records > 0 {
            let before = self.held.fetch_sub(records, Ordering::Relaxed);
            debug_assert!(before >= records, "gave back more places than were taken");
        }
    }

    fn shard(&self, request_id: &str) -> &LeavableMutex<Shard> {
        let hash = FxBuildHasher.hash_one(request_id);
        &self.shards[(hash >> 32) as usize % SHARDS]
    }

    /// Runs `admit` once per request id: a repeat returns the first decision, with where its
    /// event stands (`Some`: the caller waits until it is durable before answering). `admit`
    /// returning `None` decided nothing to keep (it left a denial for its caller to decide
    /// again, see `Verdict::lease_ended_ms`): nothing is remembered, and `once` returns `None`.
    /// A decision `remembers` refuses (no valid key; `admit` logged none) is returned as a
    /// first decision and not remembered either. Where the table would refuse a new id (its
    /// stamp, no room), `key_refusal` is asked first: the denial it gives (an unknown or a
    /// revoked key, never remembered) is the answer, as it would be with room. (A stray id
    /// answered `CapacityExceeded` or the stamp's error where the same request with room
    /// answered `UnknownKey`.)
    pub fn once(
        &self,
        request_id: &str,
        fingerprint: &Fingerprint<'_>,
        (at_ms, now_ms): (u64, u64),
        key_refusal: impl FnOnce() -> Result<Option<Decision>, Error>,
        admit: impl FnOnce() -> Result<Option<(Decision, Option<Receipt>, LoggedAs)>, Error>,
    ) -> Result<Option<(Decision, Option<LoggedAs>)>, Error> {
        let horizon_ms = self.horizon_ms.load(Ordering::Relaxed);
        let oldest_kept_ms = now_ms.saturating_sub(horizon_ms);
        let mut shard = self.shard(request_id).lock();
        let dropped = shard.expire(now_ms, horizon_ms);
        self.give_back_places(dropped);
        if let Some(repeat) = Self::repeat(&shard, request_id, fingerprint, oldest_kept_ms) {
            return repeat.map(Some);
        }
        if let Err(error) = shard.refuse_new_id_stamped(at_ms, now_ms, horizon_ms) {
            return own_refusal_first(key_refusal, error);
        }
        if !self.take_place() {
            // Full: the places of ids past the horizon in other shards come back only when
            // those shards are used, so drop them all now, one shard at a time (holding one
            // shard while locking another could deadlock with a cut's `lock_all`).
            drop(shard);
            self.expire_every_shard(now_ms, horizon_ms);
            shard = self.shard(request_id).lock();
            if let Some(repeat) = Self::repeat(&shard, request_id, fingerprint, oldest_kept_ms) {
                return repeat.map(Some);
            }
            if !self.take_place() {
                return own_refusal_first(
                    key_refusal,
                    Error::CapacityExceeded {
                        what: "request_id (idempotency table)",
                        capacity: self.capacity() as u64,
                    },
                );
            }
        }
        let (decision, receipt, logged) = match admit() {
            Ok(Some(first)) if remembers(&first.0) => first,
            Ok(Some((unkept, ..))) => {
                self.give_back_places(1);
                return Ok(Some((unkept, None)));
            }
            kept_nothing => {
                self.give_back_places(1);
                return kept_nothing.map(|_| None);
            }
        };
        let id: Arc<str> = request_id.into();
        shard.remember(at_ms, now_ms, Arc::clone(&id));
        let record = RequestRecord::new(at_ms, fingerprint, &decision, receipt.as_ref(), logged);
        // In place of a record past the horizon `expire` had not dropped (`Shard::remembered`):
        // removed first, as `insert` would keep the old key, and the sweep that drops the old
        // arrival (`drop_record_of`, which knows its record by that key) would drop this one,
        // within its horizon, and a retry be decided and charged again. The stale record is
        // forgotten here as a sweep forgets it (`Shard::expire`): new ids stamped at or before
        // its stamp are refused from now on, for should this decision's log fail (`forget`),
        // nothing would be left of the first, and on a clock stepped back (or a horizon grown)
        // its retry would be decided and charged again.
        if let Some(stale) = shard.records.remove(&id) {
            shard.forgotten_before_ms = shard.forgotten_before_ms.max(stale.arrived_ms + 1);
            self.give_back_places(1);
        }
        shard.records.insert(id, record);
        Ok(Some((decision, None)))
    }

    /// A repeat of `request_id`: its first decision and where its event stands, or a conflict.
    fn repeat(
        shard: &Shard,
        request_id: &str,
        fingerprint: &Fingerprint<'_>,
        oldest_kept_ms: u64,
    ) -> Option<Result<(Decision, Option<LoggedAs>), Error>> {
        Self::known(shard, request_id, fingerprint, oldest_kept_ms)
            .map(|known| known.map(|(decision, logged)| (decision, Some(logged))))
    }

    /// Drops the ids past the horizon in every shard, one shard's lock at a time; at most once
    /// in each millisecond of the clock (ids are forgotten by it, so a second sweep in the same
    /// millisecond would find none).
    fn expire_every_shard(&self, now_ms: u64, horizon_ms: u64) {
        if self.swept_at_ms.swap(now_ms, Ordering::Relaxed) == now_ms {
            return;
        }
        for shard in self.shards.iter() {
            let dropped = shard.lock().expire(now_ms, horizon_ms);
            self.give_back_places(dropped);
        }
    }

    /// The first decision for `request_id`, if it is still remembered and matches. Ids past
    /// the horizon by `now_ms` (the engine's clock) are dropped first, as `once` drops them:
    /// one left in the table answered a check as a replay that a consume decided anew. A new
    /// id stamped (`at_ms`) where `once` refuses it is refused with `once`'s error: a check
    /// answered a decision for it that no consume would give; so is one the table has no
    /// place for (`CapacityExceeded`). A remembered decision comes
    /// with where its event stands, for the caller to wait until it is durable (after this
    /// has let go of the shard), as a consume's repeat does. Where `once` would answer
    /// `key_refusal`'s denial instead of refusing the id, this is `None` (the check decides,
    /// and denies the key as the consume would).
    pub fn peek(
        &self,
        request_id: &str,
        fingerprint: &Fingerprint<'_>,
        (at_ms, now_ms): (u64, u64),
        key_refusal: impl FnOnce() -> Result<Option<Decision>, Error>,
    ) -> Result<Option<(Decision, LoggedAs)>, Error> {
        let horizon_ms = self.horizon_ms.load(Ordering::Relaxed);
        let oldest_kept_ms = now_ms.saturating_sub(horizon_ms);
        let mut shard = self.shard(request_id).lock();
        let dropped = shard.expire(now_ms, horizon_ms);
        self.give_back_places(dropped);
        if let Some(known) = Self::known(&shard, request_id, fingerprint, oldest_kept_ms) {
            return known.map(Some);
        }
        // Where `once` answers the request's own refusal (`key_refusal` not `Ok(None)`), the
        // check decides (and refuses) the request as the consume would.
        if let Err(error) = shard.refuse_new_id_stamped(at_ms, now_ms, horizon_ms) {
            return match key_refusal() {
                Ok(None) => Err(error),
                _ => Ok(None),
            };
        }
        if self.held.load(Ordering::Relaxed) < self.capacity {
            return Ok(None);
        }
        // Full: as `once`, drop the ids past the horizon in every shard (one lock at a time)
        // before refusing the new id as `once` would, taking no place either way.
        drop(shard);
        self.expire_every_shard(now_ms, horizon_ms);
        let shard = self.shard(request_id).lock();
        if let Some(known) = Self::known(&shard, request_id, fingerprint, oldest_kept_ms) {
            return known.map(Some);
        }
        if self.held.load(Ordering::Relaxed) < self.capacity || !matches!(key_refusal(), Ok(None)) {
            return Ok(None);
        }
        Err(Error::CapacityExceeded {
            what: "request_id (idempotency table)",
            capacity: self.capacity() as u64,
        })
    }

    /// `request_id`'s first decision and where its event stands (for `peek` and `repeat`), or
    /// a conflict; `None` for an id not remembered (`Shard::remembered`).
    fn known(
        shard: &Shard,
        request_id: &str,
        fingerprint: &Fingerprint<'_>,
        oldest_kept_ms: u64,
    ) -> Option<Result<(Decision, LoggedAs), Error>> {
        let record = shard.remembered(request_id, oldest_kept_ms)?;
        Some(match record.decision_for(fingerprint) {
            Some(decision) => Ok((decision, record.logged.clone())),
            None => Err(Error::RequestIdConflict {
                request_id: request_id.into(),
            }),
        })
    }

    /// Where the event of `request_id`'s first decision stands, if the id is still in the
    /// table: for a caller told `RequestIdConflict`, which answers that only once the first
    /// decision is durable (a first whose log fails is forgotten, and never stood).
    pub fn logged_of(&self, request_id: &str) -> Option<LoggedAs> {
        let shard = self.shard(request_id).lock();
        shard
            .records
            .get(request_id)
            .map(|record| record.logged.clone())
    }

    /// Forgets `request_id` (its admission was given back because the log failed).
    pub fn forget(&self, request_id: &str) {
        let mut shard = self.shard(request_id).lock();
        if shard.records.remove(request_id).is_some() {
            self.give_back_places(1);
        }
    }

    /// Locks every shard, in order: for a checkpoint's cut.
    pub fn lock_all(&self) -> Vec<LeavableGuard<'_, Shard>> {
        self.shards.iter().map(|shard| shard.lock()).collect()
    }

    /// The shard locks themselves, for a thread that outlives a borrow of the table (a
    /// checkpoint's snapshot thread settling a cut's copies).
    pub fn shard_locks(&self) -> RequestShards {
        Arc::clone(&self.shards)
    }

    /// Rewrites every remembered decision of one shard with `rename` (a policy swap renumbers
    /// the plans, limits and resources decisions name: `Decision::in_policy`).
    pub fn rename_decisions(shard: &mut Shard, rename: impl Fn(&Decision) -> Decision) {
        for record in shard.records.values_mut() {
            let decision = record.decision();
            let renamed = rename(&decision);
            // Most name nothing the swap renumbered: left as they are.
            if renamed != decision {
                record.set_decision(&renamed);
            }
        }
    }

    /// Visits one shard's remembered records as `(arrival ms, id, record)`, in no particular
    /// order: for a checkpoint's cut, which puts them in order later.
    pub fn visit<'a>(shard: &'a Shard, mut visit: impl FnMut(u64, &'a str, &'a RequestRecord)) {
        for id in shard.ids() {
            // Only the arrival that created the record (an id may have come back since).
            match shard.records.get_key_value(id) {
                Some((stored, record)) if Arc::ptr_eq(stored, id) => {
                    visit(record.arrived_ms, stored, record);
                }
                _ => {}
            }
        }
    }

    /// Visits one shard's receipts not refunded, as `(key, receipt)`, in no particular order:
    /// what an open checks its counters against (`Engine::mark_short_periods`).
    pub fn outstanding_receipts<'a>(shard: &'a Shard, mut visit: impl FnMut(&'a str, Receipt)) {
        for record in shard.records.values() {
            if record.refunded {
                continue;
            }
            let first = record.first_use();
            if let Some(receipt) = first.receipt {
                visit(first.fingerprint.key, receipt);
            }
        }
    }

    /// The remembered records, oldest first, as `(arrival ms, id, record)`: the snapshot's
    /// order, as the cut gathered it before it let go of the locks first (the reference its
    /// test compares with).
    #[cfg(test)]
    pub fn export<'a>(
        guards: &'a [LeavableGuard<'_, Shard>],
    ) -> Vec<(u64, String, &'a RequestRecord)> {
        let mut out = Vec::new();
        for shard in guards {
            for id in shard.ids() {
                // Only the arrival that created the record (an id may have come back since).
                match shard.records.get_key_value(id) {
                    Some((stored, record)) if Arc::ptr_eq(stored, id) => {
                        out.push((record.arrived_ms, id.to_string(), record));
                    }
                    _ => {}
                }
            }
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out
    }

    /// Inserts a record from a snapshot or the log, unless its id is already known.
    /// A later record of the same id replaces the earlier one (live, the earlier one had aged
    /// out of the horizon before the id was admitted anew).
    /// Restored records take places even past the capacity (they were acknowledged, under an
    /// earlier and larger one); an open then refuses a capacity below those still within the
    /// horizon (`held_within`), so past it are only ids a full table drops before refusing.
    /// `arrived_ms` is the request's timestamp; `now_ms` the engine's clock (see
    /// `Shard::remember`).
    pub fn restore(
        &self,
        request_id: &str,
        arrived_ms: u64,
        now_ms: u64,
        mut record: RequestRecord,
    ) {
        record.arrived_ms = arrived_ms;
        let mut shard = self.shard(request_id).lock();
        if shard.records.remove(request_id).is_none() {
            self.held.fetch_add(1, Ordering::Relaxed);
        }
        let id: Arc<str> = request_id.into();
        shard.remember(arrived_ms, now_ms, Arc::clone(&id));
        shard.records.insert(id, record);
    }

    /// Calls `f` with the record of `request_id` under its shard's lock, if it is remembered by
    /// `now_ms` (the engine's clock; `Shard::remembered`): a refund's lookup.
    pub fn with_remembered<R>(
        &self,
        request_id: &str,
        now_ms: u64,
        f: impl FnOnce(Option<&mut RequestRecord>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let oldest_kept_ms = now_ms.saturating_sub(self.horizon_ms());
        let mut shard = self.shard(request_id).lock();
        f(shard.remembered_mut(request_id, oldest_kept_ms))
    }

    /// Calls `f` with the record of `request_id` under its shard's lock, whatever its stamp: a
    /// replayed refund's (the live one found it remembered).
    pub fn with_record<R>(
        &self,
        request_id: &str,
        f: impl FnOnce(Option<&mut RequestRecord>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut shard = self.shard(request_id).lock();
        f(shard.records.get_mut(request_id))
    }
}

impl Shard {
    /// Refuses a new id stamped `at_ms`, by the clock's `now_ms`, if it could not be
    /// remembered (for `once`, and `peek`, so a check refuses what a consume does): an id is
    /// forgotten the horizon after its request's timestamp (or the clock's now, if that is
    /// earlier), so one stamped longer ago than that would be forgotten at once, and a retry
    /// decided and charged again; nor one stamped before what this shard has already
    /// forgotten ids by (a later clock, before it stepped back, or a shorter horizon, before a
    /// swap grew it): the id may be one of those.
    fn refuse_new_id_stamped(&self, at_ms: u64, now_ms: u64, horizon_ms: u64) -> Result<(), Error> {
        let oldest_kept = now_ms.saturating_sub(horizon_ms);
        if at_ms < oldest_kept {
            return Err(Error::invalid(
                "at_ms",
                format!(
                    "{at_ms} is {} ms before the engine's clock, more than the {horizon_ms} ms a \
                     request id is remembered: a retry could not be recognised. Send it with a \
                     later timestamp, or without a request id",
                    now_ms - at_ms
                ),
            ));
        }
        if at_ms < self.forgotten_before_ms {
            return Err(Error::invalid(
                "at_ms",
                format!(
                    "{at_ms} is before {}, the stamp before which request ids were already \
                     forgotten (by a later clock, or a shorter horizon): a retry could not be \
                     recognised. Send it with a later timestamp, or without a request id",
                    self.forgotten_before_ms
                ),
            ));
        }
        Ok(())
    }

    /// Queues `id`, of a request stamped `at_ms`, to be forgotten the horizon after that
    /// (`now_ms`: the engine's clock).
    fn remember(&mut self, at_ms: u64, now_ms: u64, id: Arc<str>) {
        if at_ms <= now_ms.saturating_add(IN_ORDER_AHEAD_MS)
            && at_ms.saturating_add(IN_ORDER_BEHIND_MS) >= self.queued_newest_ms
        {
            self.queued_newest_ms = self.queued_newest_ms.max(at_ms);
            self.arrivals.push_back((at_ms, id));
        } else {
            self.next_out_of_order += 1;
            self.out_of_order
                .insert((at_ms, self.next_out_of_order), id);
        }
    }

    /// Every queued id (some perhaps forgotten, or come back since), in no particular order.
    fn ids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.arrivals
            .iter()
            .map(|(_, id)| id)
            .chain(self.out_of_order.values())
    }

    /// Drops ids stamped more than the horizon before `now_ms` (the engine's clock), and
    /// refuses from then on new ids stamped at or before the latest stamp dropped (a retry of
    /// one of them). Returns how many records it dropped.
    fn expire(&mut self, now_ms: u64, horizon_ms: u64) -> usize {
        let oldest_kept = now_ms.saturating_sub(horizon_ms);
        let mut dropped = 0;
        while let Some((arrived_ms, _)) = self.arrivals.front() {
            if *arrived_ms >= oldest_kept {
                break;
            }
            if let Some((arrived_ms, id)) = self.arrivals.pop_front() {
                self.forgotten_before_ms = self.forgotten_before_ms.max(arrived_ms + 1);
                dropped += self.drop_record_of(&id);
            }
        }
        if self.arrivals.is_empty() {
            // Nothing queued to keep in order with: a clock stepped back queues again.
            self.queued_newest_ms = 0;
        }
        while let Some(entry) = self.out_of_order.first_entry() {
            if entry.key().0 >= oldest_kept {
                break;
            }
            let arrived_ms = entry.key().0;
            let id = entry.remove();
            self.forgotten_before_ms = self.forgotten_before_ms.max(arrived_ms + 1);
            dropped += self.drop_record_of(&id);
        }
        dropped
    }

    /// Drops the record `id`'s arrival created, if it is still there (a forgotten id may have
    /// come back since): 1 if it was.
    fn drop_record_of(&mut self, id: &Arc<str>) -> usize {
        let same = self
            .records
            .get_key_value(id)
            .is_some_and(|(stored, _)| Arc::ptr_eq(stored, id));
        if same {
            self.records.remove(id);
        }
        usize::from(same)
    }

    /// `request_id`'s record, unless its request was stamped before `oldest_kept_ms` (the
    /// engine's clock less the horizon). Such an id is forgotten wherever it is looked up (a
    /// repeat, a check, a refund), whether `expire` has dropped it yet or not: it drops ids
    /// only in a shard something uses, and may keep one stamped up to `IN_ORDER_BEHIND_MS`
    /// behind an id queued ahead of it. A refund of an id past its horizon was given back in
    /// a shard not used since and refused in one swept, a repeat answered or decided anew,
    /// and a reopen, restoring the ids its log and snapshot hold, answered otherwise again.
    fn remembered(&self, request_id: &str, oldest_kept_ms: u64) -> Option<&RequestRecord> {
        let record = self.records.get(request_id)?;
        (record.arrived_ms >= oldest_kept_ms).then_some(record)
    }

    /// `remembered`, to change.
    fn remembered_mut(
        &mut self,
        request_id: &str,
        oldest_kept_ms: u64,
    ) -> Option<&mut RequestRecord> {
        let record = self.records.get_mut(request_id)?;
        (record.arrived_ms >= oldest_kept_ms).then_some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::MAX_KEY_BYTES;
    use crate::admission::DenialReason;
    use std::cell::Cell;

    const HORIZON_MS: u64 = 1_000;

    fn fingerprint() -> Fingerprint<'static> {
        Fingerprint {
            key: "key",
            resource: "chat",
            quantities: Quantities::default(),
        }
    }

    /// Two decisions (admitted, and denied with a reason and remedies) and a receipt with
    /// every part a record encodes: four limits' statuses or holds, counts at both ends of the
    /// varints.
    fn full_decisions() -> ([Decision; 2], Receipt) {
        use crate::admission::{
            Admission, ChargedTo, Denial, LimitStatus, LimitStatuses, PerLimit, Remedies,
        };
        use crate::policy::{CounterId, PlanId};
        let statuses: Vec<LimitStatus> = [0, 1, 300, u64::MAX]
            .into_iter()
            .enumerate()
            .map(|(limit, used)| LimitStatus {
                limit: limit as u8,
                used,
                amount: used.saturating_add(7),
                reset_at_ms: (limit % 2 == 0).then_some(1_790_000_000_000 + limit as u64),
            })
            .collect();
        let limits = LimitStatuses::from_slice(&statuses).expect("four statuses");
        let admitted = Decision::Admitted(Admission {
            charged_to: ChargedTo::Credits { micros: u64::MAX },
            at_ms: 1_790_000_000_123,
            plan: Some(PlanId(3)),
            limits,
            credits_balance_micros: Some(0),
        });
        let denied = Decision::Denied(Denial {
            reason: DenialReason::QuotaExhausted {
                limit: 2,
                retry_at_ms: 1_790_000_000_999,
                retry_after_ms: 876,
                reset_at_ms: u64::MAX,
            },
            plan: Some(PlanId(1)),
            limits,
            credits_balance_micros: None,
            remedies: Remedies {
                credits_needed_micros: Some(5),
                upgrade_to: Some(PlanId(2)),
                wait_until_ms: Some(1_790_000_001_000),
            },
        });
        assert_ne!(admitted, denied);
        let holds: Vec<(CounterId, u64, u64)> = (0..4)
            .map(|n| (CounterId(n), u64::MAX - u64::from(n), u64::from(n) * 1_000))
            .collect();
        let receipt = Receipt {
            charged_to: ChargedTo::PlanQuota { plan: PlanId(3) },
            generation: u32::MAX,
            holds: PerLimit::from_slice(&holds).expect("four holds"),
        };
        ([admitted, denied], receipt)
    }

    #[test]
    fn a_record_gives_back_exactly_what_it_was_made_of() {
        let (decisions, receipt) = full_decisions();
        let quantities = Quantities::new(&[
            (crate::policy::Unit::Songs, 1),
            (crate::policy::Unit::Seconds, 1 << 40),
        ])
        .expect("valid quantities");
        // Lengths of one, two and three 7-bit groups (no request names a key past
        // `MAX_KEY_BYTES`, but a damaged snapshot's record may).
        let cases = [
            ("k".repeat(MAX_KEY_BYTES - 1), Some(receipt)),
            ("k".repeat(MAX_KEY_BYTES), None),
            ("k".repeat(70_000), Some(receipt)),
        ];
        for ((key, receipt), decision) in cases.iter().flat_map(|case| decisions.map(|d| (case, d)))
        {
            let receipt = *receipt;
            let fingerprint = Fingerprint {
                key,
                resource: "music-2.6",
                quantities,
            };
            let record = RequestRecord::new(
                5,
                &fingerprint,
                &decision,
                receipt.as_ref(),
                LoggedAs::Event(9),
            );
            let first = record.first_use();
            assert_eq!(first.fingerprint, fingerprint);
            assert_eq!(first.decision, decision);
            assert_eq!(first.receipt, receipt);
            assert_eq!(record.decision(), decision);
            assert_eq!(record.decision_for(&fingerprint), Some(decision));
            assert_eq!(FirstUse::decode(record.encoded_first_use()), first);
            assert!(!record.refunded);
            assert_eq!(record.arrived_ms, 5);
            assert!(matches!(record.logged, LoggedAs::Event(9)));
        }
    }

    #[test]
    fn a_record_matches_only_its_own_key_resource_and_quantities() {
        let ([decision, _], receipt) = full_decisions();
        let quantities = |requests| {
            Quantities::new(&[(crate::policy::Unit::Requests, requests)]).expect("valid")
        };
        let own = Fingerprint {
            key: "tp-1",
            resource: "m2.7",
            quantities: quantities(1),
        };
        let record = RequestRecord::new(0, &own, &decision, Some(&receipt), LoggedAs::Durable);
        assert_eq!(record.decision_for(&own), Some(decision));
        let others = [
            Fingerprint { key: "tp-2", ..own },
            Fingerprint {
                key: "tp-1m",
                ..own
            },
            Fingerprint { key: "", ..own },
            // The key's end moved into the resource: the lengths tell them apart.
            Fingerprint {
                key: "tp-1m",
                resource: "2.7",
                ..own
            },
            Fingerprint {
                resource: "m2.7-highspeed",
                ..own
            },
            Fingerprint {
                quantities: quantities(2),
                ..own
            },
            Fingerprint {
                quantities: Quantities::new(&[
                    (crate::policy::Unit::Requests, 1),
                    (crate::policy::Unit::Tokens, 1),
                ])
                .expect("valid"),
                ..own
            },
        ];
        for other in others {
            assert_eq!(
                record.decision_for(&other),
                None,
                "{other:?} matched {own:?}"
            );
        }
    }

    #[test]
    fn a_records_new_decision_keeps_its_fingerprint_and_receipt() {
        let ([decision, _], receipt) = full_decisions();
        let own = Fingerprint {
            key: "tp-1",
            resource: "m2.7",
            quantities: Quantities::default(),
        };
        let mut record = RequestRecord::new(3, &own, &decision, Some(&receipt), LoggedAs::Durable);
        record.refunded = true;
        let renamed = Decision::denied(DenialReason::NoResources);
        record.set_decision(&renamed);
        let first = record.first_use();
        assert_eq!(
            (first.fingerprint, first.decision, first.receipt),
            (own, renamed, Some(receipt))
        );
        assert!(record.refunded && record.arrived_ms == 3);
    }

    /// `once` for a new id at `at_ms` (the clock at the same time): `Ok(true)` if decided now.
    fn first(table: &RequestTable, id: &str, at_ms: u64) -> Result<bool, Error> {
        decide_denied(table, id, (at_ms, at_ms), &Cell::new(0))
            .map(|kept| matches!(kept, Some((_, None))))
    }

    /// `id` stamped `at_ms` on a clock at `now_ms` through `once`: a first decision is denied
    /// (no resources), durable, and counted in `decided`.
    fn decide_denied(
        table: &RequestTable,
        id: &str,
        (at_ms, now_ms): (u64, u64),
        decided: &Cell<u32>,
    ) -> Result<Option<(Decision, Option<LoggedAs>)>, Error> {
        table.once(
            id,
            &fingerprint(),
            (at_ms, now_ms),
            || Ok(None),
            || {
                decided.set(decided.get() + 1);
                let decision = Decision::denied(DenialReason::NoResources);
                Ok(Some((decision, None, LoggedAs::Durable)))
            },
        )
    }

    /// An id named `{prefix}{n}` for the first `n` whose shard is `id`'s, so that one queues
    /// behind the other.
    fn id_in_the_shard_of(table: &RequestTable, id: &str, prefix: &str) -> String {
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|other| std::ptr::eq(table.shard(other), table.shard(id)))
            .expect("some id shares the shard")
    }

    #[test]
    fn the_capacity_bounds_the_whole_table_not_each_shard() {
        // Bounded shard by shard, a capacity of 64 (one per shard) refused the 21st id.
        let table = RequestTable::new(64, HORIZON_MS);
        for n in 0..64 {
            assert_eq!(first(&table, &format!("id-{n}"), 0), Ok(true), "id-{n}");
        }
        assert_eq!(table.len(), 64);
        assert_eq!(
            first(&table, "one-more", 0),
            Err(Error::CapacityExceeded {
                what: "request_id (idempotency table)",
                capacity: 64,
            })
        );
        // A repeat is still answered, and a forgotten id gives its place back.
        assert_eq!(first(&table, "id-7", 0), Ok(false));
        table.forget("id-7");
        assert_eq!(table.len(), 63);
        assert_eq!(first(&table, "one-more", 0), Ok(true));
        assert_eq!(table.len(), 64);
    }

    #[test]
    fn a_full_table_drops_the_ids_past_the_horizon_in_every_shard() {
        let table = RequestTable::new(100, HORIZON_MS);
        for n in 0..100 {
            assert_eq!(first(&table, &format!("old-{n}"), 0), Ok(true));
        }
        // Past the horizon, every new id finds room, though most old ids sit in other shards.
        let later_ms = HORIZON_MS + 1;
        for n in 0..100 {
            assert_eq!(
                first(&table, &format!("new-{n}"), later_ms),
                Ok(true),
                "new-{n}"
            );
        }
        assert_eq!(table.len(), 100);
        assert!(first(&table, "one-more", later_ms).is_err());
    }

    #[test]
    fn an_id_stamped_far_ahead_does_not_keep_the_others_from_being_forgotten() {
        // Queued by its own timestamp, an id stamped in 2096 stayed at its shard's front, every
        // id behind it was never forgotten, and the table filled with ids past the horizon.
        let table = RequestTable::new(100, HORIZON_MS);
        let stamped_ahead = table.once(
            "ahead",
            &fingerprint(),
            (4_000_000_000_000, 0),
            || Ok(None),
            || {
                Ok(Some((
                    Decision::denied(DenialReason::NoResources),
                    None,
                    LoggedAs::Durable,
                )))
            },
        );
        assert!(matches!(stamped_ahead, Ok(Some((_, None)))));
        // Ten new ids a round, each round past the horizon of the last: never more than ten
        // (and the one ahead) live at once, so none is ever refused. The shard behind the id
        // ahead gains about 10/64 of an id a round; in 1,000 rounds it would fill the table.
        for round in 1..=1_000u64 {
            let now_ms = round * 2 * HORIZON_MS;
            for n in 0..10 {
                let id = format!("round-{round}-{n}");
                assert_eq!(first(&table, &id, now_ms), Ok(true), "{id}");
            }
        }
    }

    #[test]
    fn an_id_stamped_ahead_is_remembered_for_the_horizon_after_its_stamp_restored_too() {
        // Queued by the clock's time when it arrived, it was forgotten the horizon after that,
        // and its retry (not too old to be refused) decided anew.
        let table = RequestTable::new(100, HORIZON_MS);
        // `Ok(true)`: a repeat.
        let decide = |id: &str, at_ms: u64, now_ms: u64| {
            table
                .once(
                    id,
                    &fingerprint(),
                    (at_ms, now_ms),
                    || Ok(None),
                    || {
                        let decision = Decision::denied(DenialReason::NoResources);
                        Ok(Some((decision, None, LoggedAs::Durable)))
                    },
                )
                .map(|kept| matches!(kept, Some((_, Some(_)))))
        };
        let ahead_ms = 10 * HORIZON_MS;
        assert_eq!(decide("live", ahead_ms, 0), Ok(false));
        let record = RequestRecord::new(
            0,
            &fingerprint(),
            &Decision::denied(DenialReason::NoResources),
            None,
            LoggedAs::Durable,
        );
        table.restore("restored", ahead_ms, 0, record);
        let last_ms = ahead_ms + HORIZON_MS;
        assert_eq!(decide("live", ahead_ms, last_ms), Ok(true));
        assert_eq!(decide("restored", ahead_ms, last_ms), Ok(true));
        // Past it, both forgotten, and a retry too old to be remembered.
        assert!(decide("live", ahead_ms, last_ms + 1).is_err());
        assert!(decide("restored", ahead_ms, last_ms + 1).is_err());
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn an_id_stamped_behind_one_queued_before_it_is_forgotten_at_its_own_horizon() {
        // Queued behind an id stamped later, an id stamped earlier (a gateway stamping a
        // request when it began, not when it was counted) stayed until the one in front of it
        // was forgotten: up to a whole horizon late. A full table then refused new ids while
        // it held ids past the horizon, though it first drops every one of those.
        // A minute's horizon: the earlier stamp is well behind the later one.
        let horizon_ms = 60_000;
        let table = RequestTable::new(2, horizon_ms);
        let now_ms = 10 * horizon_ms;
        let first_id = "stamped-now";
        let same_shard = id_in_the_shard_of(&table, first_id, "stamped-earlier-");
        let decide = |id: &str, at_ms: u64, now_ms: u64| {
            table.once(
                id,
                &fingerprint(),
                (at_ms, now_ms),
                || Ok(None),
                || {
                    let decision = Decision::denied(DenialReason::NoResources);
                    Ok(Some((decision, None, LoggedAs::Durable)))
                },
            )
        };
        assert!(matches!(
            decide(first_id, now_ms, now_ms),
            Ok(Some((_, None)))
        ));
        let earlier_ms = now_ms - horizon_ms + 1;
        assert!(matches!(
            decide(&same_shard, earlier_ms, now_ms),
            Ok(Some((_, None)))
        ));
        // Half a horizon on, the earlier id is past its horizon and the later one is not:
        // the table has room for one more.
        let later_ms = now_ms + horizon_ms / 2;
        assert!(matches!(
            decide("one-more", later_ms, later_ms),
            Ok(Some((_, None)))
        ));
        assert_eq!(table.len(), 2);
        // The later id is still remembered; the earlier one is refused as too old to be.
        assert!(matches!(
            decide(first_id, now_ms, later_ms),
            Ok(Some((_, Some(_))))
        ));
        assert!(decide(&same_shard, earlier_ms, later_ms).is_err());
    }

    #[test]
    fn an_id_forgotten_is_not_decided_again_when_the_clock_steps_back_or_the_horizon_grows() {
        // Forgotten by a clock at 2,001, the id was decided and counted again when the clock
        // stepped back to 1,500 (its stamp, 1,000, then seemed inside the horizon), or when a
        // policy swap grew the horizon: a retry within the horizon counted twice.
        let decide = |table: &RequestTable, at_ms: u64, now_ms: u64| {
            table.once(
                "retried",
                &fingerprint(),
                (at_ms, now_ms),
                || Ok(None),
                || {
                    let decision = Decision::denied(DenialReason::NoResources);
                    Ok(Some((decision, None, LoggedAs::Durable)))
                },
            )
        };
        let stamp_ms = HORIZON_MS;
        let forgotten_at_ms = stamp_ms + HORIZON_MS + 1;
        for grow_horizon in [false, true] {
            let table = RequestTable::new(10, HORIZON_MS);
            assert!(matches!(
                decide(&table, stamp_ms, stamp_ms),
                Ok(Some((_, None)))
            ));
            assert!(matches!(
                table.peek(
                    "retried",
                    &fingerprint(),
                    (forgotten_at_ms, forgotten_at_ms),
                    || Ok(None)
                ),
                Ok(None)
            ));
            let retried_at_ms = match grow_horizon {
                false => stamp_ms + HORIZON_MS / 2,
                true => {
                    table.set_horizon_ms(10 * HORIZON_MS);
                    forgotten_at_ms
                }
            };
            let retried = decide(&table, stamp_ms, retried_at_ms);
            assert!(
                matches!(&retried, Err(Error::InvalidArgument { field: "at_ms", .. })),
                "grow_horizon {grow_horizon}: {retried:?}"
            );
            // A request stamped after what was forgotten is decided as usual.
            let later = table.once(
                "later",
                &fingerprint(),
                (forgotten_at_ms, retried_at_ms),
                || Ok(None),
                || {
                    let decision = Decision::denied(DenialReason::NoResources);
                    Ok(Some((decision, None, LoggedAs::Durable)))
                },
            );
            assert!(matches!(later, Ok(Some((_, None)))), "{later:?}");
        }
    }

    #[test]
    fn a_clock_glitched_ahead_leaves_refused_only_ids_stamped_up_to_the_latest_it_forgot() {
        // A clock read far ahead for one expiry: the shard refused every new id stamped
        // before that reading less the horizon, long after the clock came back, though the
        // ids it dropped were all stamped before the glitch.
        let mut shard = Shard::default();
        let now_ms = 10 * HORIZON_MS;
        shard.remember(now_ms - 5, now_ms, "in-order".into());
        // Stamped ahead of the clock: kept by its stamp, out of the arrival order.
        let ahead_ms = now_ms + 10 * IN_ORDER_AHEAD_MS;
        shard.remember(ahead_ms, now_ms, "ahead".into());
        let glitched_ms = now_ms + 100 * HORIZON_MS;
        shard.expire(glitched_ms, HORIZON_MS);
        assert_eq!(shard.forgotten_before_ms, ahead_ms + 1);
        // The clock is back: a retry of either is refused, an id stamped after both is not.
        for stamp_ms in [now_ms - 5, ahead_ms] {
            assert!(shard
                .refuse_new_id_stamped(stamp_ms, now_ms, HORIZON_MS)
                .is_err());
        }
        assert!(shard
            .refuse_new_id_stamped(ahead_ms + 1, now_ms, HORIZON_MS)
            .is_ok());
        // Nothing dropped, nothing refused: an expiry that drops no id moves no bound.
        let mut untouched = Shard::default();
        untouched.remember(now_ms, now_ms, "kept".into());
        untouched.expire(now_ms + HORIZON_MS, HORIZON_MS);
        assert_eq!(untouched.forgotten_before_ms, 0);
    }

    #[test]
    fn a_decision_not_kept_or_failed_gives_its_place_back() {
        let table = RequestTable::new(1, HORIZON_MS);
        let left = table.once("left", &fingerprint(), (0, 0), || Ok(None), || Ok(None));
        assert!(matches!(left, Ok(None)));
        let failed = table.once(
            "failed",
            &fingerprint(),
            (0, 0),
            || Ok(None),
            || Err(Error::invalid("quantities", "test")),
        );
        assert!(failed.is_err());
        assert_eq!(table.len(), 0);
        assert_eq!(first(&table, "kept", 0), Ok(true));
        assert_eq!(table.len(), 1);
    }

    /// A decision `remembers` refuses (no valid key) comes back as a first decision and keeps
    /// no place, and its id is decided anew when it comes again.
    #[test]
    fn a_denial_for_want_of_a_valid_key_is_answered_and_not_remembered() {
        let table = RequestTable::new(2, HORIZON_MS);
        assert_eq!(first(&table, "kept", 0), Ok(true));
        for reason in [DenialReason::UnknownKey, DenialReason::KeyRevoked] {
            let mut decided = 0;
            for _ in 0..2 {
                let answered = table.once(
                    "stray",
                    &fingerprint(),
                    (0, 0),
                    || Ok(None),
                    || {
                        decided += 1;
                        Ok(Some((Decision::denied(reason), None, LoggedAs::Durable)))
                    },
                );
                assert!(
                    matches!(answered, Ok(Some((Decision::Denied(_), None)))),
                    "{answered:?}"
                );
            }
            assert_eq!(decided, 2, "{reason:?}: decided anew, not a repeat");
            assert_eq!(table.len(), 1, "{reason:?}: no place taken");
        }
    }

    #[test]
    fn an_id_past_the_horizon_is_forgotten_though_one_queued_ahead_of_it_keeps_it_queued() {
        // Stamped a moment after an id in its shard queued before it, an id stayed in the
        // table past its horizon until that one's: a repeat, or a check, answered its first
        // decision where, without the one ahead (its shard swept), it was decided anew.
        let table = RequestTable::new(10, HORIZON_MS);
        let ahead = "stamped-later";
        let behind = id_in_the_shard_of(&table, ahead, "stamped-earlier-");
        let decided = Cell::new(0);
        let decide = |id: &str, stamps| decide_denied(&table, id, stamps, &decided);
        assert!(matches!(decide(ahead, (500, 500)), Ok(Some((_, None)))));
        assert!(matches!(decide(&behind, (0, 500)), Ok(Some((_, None)))));
        // The earlier id is past its horizon, the later one not.
        let now_ms = HORIZON_MS + 1;
        let peeked = table.peek(&behind, &fingerprint(), (now_ms, now_ms), || Ok(None));
        assert!(matches!(peeked, Ok(None)), "the check: {peeked:?}");
        // Sent again with its stamp: too old to be remembered, as if its shard were swept.
        let again = decide(&behind, (0, now_ms));
        assert!(
            matches!(&again, Err(Error::InvalidArgument { field: "at_ms", .. })),
            "{again:?}"
        );
        // Stamped now: decided anew, its place taken once (the forgotten record's given back).
        assert!(matches!(
            decide(&behind, (now_ms, now_ms)),
            Ok(Some((_, None)))
        ));
        assert!(matches!(
            decide(ahead, (500, now_ms)),
            Ok(Some((_, Some(_))))
        ));
        assert_eq!(decided.get(), 3);
        assert_eq!(table.len(), 2);
        // Once the id ahead is past its horizon too, the sweep drops it and the forgotten
        // record's arrival behind it: not the record decided anew, still within its horizon,
        // whose repeat is answered, not decided and charged again.
        let later_ms = 500 + HORIZON_MS + 1;
        let repeat = decide(&behind, (now_ms, later_ms));
        assert!(matches!(repeat, Ok(Some((_, Some(_))))), "{repeat:?}");
        assert_eq!(decided.get(), 3);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_record_past_the_horizon_replaced_by_a_decision_its_log_then_failed_stays_forgotten() {
        // An id past its horizon but not swept (queued behind one stamped a moment later) was
        // decided anew in its record's place; that decision's log failed and was forgotten,
        // taking the only trace of the first decision with it, though its shard's bound had
        // not moved past the first stamp: on a clock stepped back (or a horizon grown), the
        // first request's retry was decided and charged again.
        let table = RequestTable::new(10, HORIZON_MS);
        let ahead = "stamped-later";
        let behind = id_in_the_shard_of(&table, ahead, "stamped-earlier-");
        let decided = Cell::new(0);
        let decide = |id: &str, stamps| decide_denied(&table, id, stamps, &decided);
        assert!(matches!(decide(ahead, (500, 500)), Ok(Some((_, None)))));
        assert!(matches!(decide(&behind, (0, 500)), Ok(Some((_, None)))));
        // Past its horizon, not swept: decided anew in its place, then that log fails.
        let now_ms = HORIZON_MS + 1;
        assert!(matches!(
            decide(&behind, (now_ms, now_ms)),
            Ok(Some((_, None)))
        ));
        table.forget(&behind);
        assert_eq!(table.len(), 1, "only the id ahead holds a place");
        // The clock steps back to where the first request is within its horizon: its retry,
        // stamped as it was, may not be decided again, as after a sweep that dropped it.
        let stepped_back_ms = 500;
        let retry = decide(&behind, (0, stepped_back_ms));
        assert!(
            matches!(&retry, Err(Error::InvalidArgument { field: "at_ms", .. })),
            "{retry:?}"
        );
        assert_eq!(decided.get(), 3);
        // A new id stamped after the forgotten one is decided.
        let fresh = decide(&behind, (1, stepped_back_ms));
        assert!(matches!(fresh, Ok(Some((_, None)))), "{fresh:?}");
    }

    #[test]
    fn no_acknowledged_decision_is_decided_again_under_random_clocks_horizons_and_failed_logs() {
        // A random walk over the table: ids decided (some then forgotten, as when their log
        // fails), checked, retried with their first stamps, on a clock that runs, steps back
        // and glitches ahead, with horizons that grow and shrink and a small capacity that
        // sweeps every shard. An id decided and kept (acknowledged) at a stamp is never
        // decided again at that stamp: its retry is answered or refused.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        for _round in 0..1_000 {
            let table = RequestTable::new(6, HORIZON_MS);
            // Ids in two shards, so that one queues behind another.
            let ids: Vec<String> = (0..)
                .map(|n| format!("id-{n}"))
                .filter(|id| {
                    std::ptr::eq(table.shard(id), table.shard("id-0"))
                        || std::ptr::eq(table.shard(id), table.shard("id-1"))
                })
                .take(8)
                .collect();
            let mut now_ms: u64 = 10 * HORIZON_MS;
            let mut acknowledged: std::collections::HashSet<(String, u64)> =
                std::collections::HashSet::new();
            for _step in 0..300 {
                match next(10) {
                    0 => now_ms += next(3 * HORIZON_MS),
                    1 => now_ms = now_ms.saturating_sub(next(3 * HORIZON_MS)),
                    2 => table.set_horizon_ms(HORIZON_MS / 2 + next(2 * HORIZON_MS)),
                    3 => {
                        let id = ids[next(ids.len() as u64) as usize].clone();
                        let at_ms = now_ms;
                        let _ = table.peek(&id, &fingerprint(), (at_ms, now_ms), || Ok(None));
                    }
                    _ => {
                        // A fresh stamp near the clock, or the retry of a decision kept.
                        let (id, at_ms) = if next(2) == 0 || acknowledged.is_empty() {
                            let id = ids[next(ids.len() as u64) as usize].clone();
                            (id, now_ms.saturating_sub(next(HORIZON_MS / 2)))
                        } else {
                            let nth = next(acknowledged.len() as u64) as usize;
                            acknowledged.iter().nth(nth).cloned().expect("in range")
                        };
                        let decided = Cell::new(false);
                        let result = table.once(
                            &id,
                            &fingerprint(),
                            (at_ms, now_ms),
                            || Ok(None),
                            || {
                                assert!(
                                    !acknowledged.contains(&(id.clone(), at_ms)),
                                    "{id} decided again at {at_ms} (clock {now_ms})"
                                );
                                decided.set(true);
                                let decision = Decision::denied(DenialReason::NoResources);
                                Ok(Some((decision, None, LoggedAs::Durable)))
                            },
                        );
                        if decided.get() {
                            assert!(matches!(result, Ok(Some((_, None)))), "{result:?}");
                            if next(4) == 0 {
                                table.forget(&id);
                            } else {
                                acknowledged.insert((id, at_ms));
                            }
                        }
                    }
                }
            }
        }
    }
}
