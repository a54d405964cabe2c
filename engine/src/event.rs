//! Events: every change of state, as appended to the log before it is acknowledged.
//!
//! An event is immutable once written. It carries its sequence number, the time it happened and
//! what it did exactly (the counters, epochs and amounts a usage moved; the micro-credits it
//! charged or gave back), so replaying the log reproduces the engine's state whatever the order
//! in which concurrent requests were applied in memory. Bodies are bincode (serde, variable-length
//! integers); many events are packed into one record (`encode_record_into`: implicit sequence
//! numbers, time deltas, 2-3 bytes per event besides its body), which `log` frames with a length
//! and a crc in its segment files behind a format version. A damaged record or body is an error
//! naming it, never a panic and never a silently skipped event.

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::admission::{ChargedTo, Decision, Quantities, Receipt};
use crate::engine::AdjustmentDirection;
use crate::error::Error;
use crate::policy::CounterId;
use crate::reservation::Settlement;

/// The version of the event, record and snapshot encoding written by this build.
/// Version 5: the `KeyRevoked` event (and the `KeyRevoked` denial a remembered decision may
/// hold), snapshots listing the revoked keys; records are as in version 3.
/// Version 4: snapshots in varint integers, listing the keys a correction left short, their
/// rolling windows' buckets packed (`recovery::buckets`); events and records are as in
/// version 3.
/// Version 3: records carry the writer's durable point (`RecordView::durable_before`).
/// Version 2: the event log in segment files (see `log`); version 1 kept it in sled.
pub const FORMAT_VERSION: u16 = 5;

/// The oldest version this build reads: a version-2, -3 or -4 database is read as it is (its
/// records and snapshots tell their format apart) and written in version 5 from its next open
/// on.
pub const OLDEST_FORMAT_VERSION: u16 = 2;

/// Exactly what a give-back moved: per hold, the amount given back (used when a reservation is
/// settled or voided, a request refunded, a usage corrected).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GivenBack {
    /// The policy generation whose counter ids `counters` uses.
    pub generation: u32,
    /// `(counter, epoch or period, units given back)`.
    pub counters: Vec<(CounterId, u64, u64)>,
    pub credits_micros: u64,
    pub payg_micros: u64,
}

impl GivenBack {
    pub fn total(&self) -> u64 {
        self.counters
            .iter()
            .map(|(_, _, amount)| *amount)
            .sum::<u64>()
            + self.credits_micros
            + self.payg_micros
    }
}

/// How a reservation closed, with what it gave back and any extra charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReservationEnd {
    Settled {
        settlement: Settlement,
        extra: Option<Box<Receipt>>,
    },
    Voided,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    UserCreated {
        user: String,
        key: String,
    },
    TeamCreated {
        team: String,
    },
    MemberAdded {
        team: String,
        user: String,
        key: String,
    },
    PayAsYouGoKeyCreated {
        user: String,
        key: String,
    },
    SeatChanged {
        team: String,
        user: String,
        key: String,
        plan: Option<String>,
    },
    CreditsToppedUp {
        team: String,
        micros: u64,
    },
    CreditsWithdrawn {
        team: String,
        micros: u64,
    },
    /// The policy document as JSON; `generation` numbers the engine's policies.
    PolicySwapped {
        generation: u32,
        document: String,
    },
    /// Usage admitted (from plan quota, credits or pay-as-you-go) with what it moved.
    UsageAdmitted {
        key: String,
        resource: String,
        quantities: Quantities,
        request_id: Option<String>,
        /// The first decision, kept only under a request id (its retry is answered with it).
        decision: Option<Decision>,
        receipt: Receipt,
    },
    /// A denial under a request id: nothing moved, but a retry of the id gets this answer.
    RequestDenied {
        request_id: String,
        key: String,
        resource: String,
        quantities: Quantities,
        decision: Decision,
    },
    ReservationOpened {
        reservation: u64,
        key: String,
        resource: String,
        estimate: Quantities,
        expires_at_ms: u64,
        decision: Decision,
        receipt: Receipt,
    },
    ReservationClosed {
        reservation: u64,
        key: String,
        end: ReservationEnd,
        given_back: GivenBack,
    },
    Refunded {
        request_id: String,
        key: String,
        given_back: GivenBack,
    },
    UsageAdjusted {
        key: String,
        resource: String,
        quantities: Quantities,
        usage_at_ms: u64,
        direction: AdjustmentDirection,
        /// `(counter, epoch or period, units moved)` in `generation`.
        generation: u32,
        moved: Vec<(CounterId, u64, u64)>,
    },
    /// A key revoked (format 5 on): denied from then on, its usage kept.
    KeyRevoked {
        key: String,
    },
}

impl EventBody {
    /// The key the event is about, if it names one (everything a key did or had done to it).
    pub fn key(&self) -> Option<&str> {
        match self {
            EventBody::UserCreated { key, .. }
            | EventBody::MemberAdded { key, .. }
            | EventBody::PayAsYouGoKeyCreated { key, .. }
            | EventBody::SeatChanged { key, .. }
            | EventBody::UsageAdmitted { key, .. }
            | EventBody::RequestDenied { key, .. }
            | EventBody::ReservationOpened { key, .. }
            | EventBody::ReservationClosed { key, .. }
            | EventBody::Refunded { key, .. }
            | EventBody::UsageAdjusted { key, .. }
            | EventBody::KeyRevoked { key } => Some(key),
            EventBody::TeamCreated { .. }
            | EventBody::CreditsToppedUp { .. }
            | EventBody::CreditsWithdrawn { .. }
            | EventBody::PolicySwapped { .. } => None,
        }
    }

    /// A short name of the event's kind, for export and the command line.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::UserCreated { .. } => "user_created",
            EventBody::TeamCreated { .. } => "team_created",
            EventBody::MemberAdded { .. } => "member_added",
            EventBody::PayAsYouGoKeyCreated { .. } => "payg_key_created",
            EventBody::SeatChanged { .. } => "seat_changed",
            EventBody::CreditsToppedUp { .. } => "credits_topped_up",
            EventBody::CreditsWithdrawn { .. } => "credits_withdrawn",
            EventBody::PolicySwapped { .. } => "policy_swapped",
            EventBody::UsageAdmitted { .. } => "usage_admitted",
            EventBody::RequestDenied { .. } => "request_denied",
            EventBody::ReservationOpened { .. } => "reservation_opened",
            EventBody::ReservationClosed { .. } => "reservation_closed",
            EventBody::Refunded { .. } => "refunded",
            EventBody::UsageAdjusted { .. } => "usage_adjusted",
            EventBody::KeyRevoked { .. } => "key_revoked",
        }
    }
}

/// One event as stored: its sequence number (gap-free from 1), time and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    pub body: EventBody,
}

/// A log record, decoded and owned: for `verify`, tools and tests. Replay and export read
/// records in place instead ([`RecordView`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub version: u16,
    /// The newest `at_ms` of its events, so compaction can skip decoding bodies.
    pub newest_at_ms: u64,
    /// `(seq, at_ms, encoded EventBody)`.
    pub events: Vec<(u64, u64, Vec<u8>)>,
}

/// bincode with variable-length integers: most fields are small numbers, and fixed 8-byte
/// integers made three quarters of an event zeros.
fn encoding() -> impl Options {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .allow_trailing_bytes()
}

/// `EventBody::UsageAdmitted`, borrowed: it encodes to exactly the bytes of the owned event
/// (a test checks), so the admission path logs a usage without copying its key and resource
/// into `String`s and its body into a fresh `Vec` (three allocations per event, measured as a
/// large share of the journaled consume path).
pub(crate) struct UsageAdmittedRef<'a> {
    pub key: &'a str,
    pub resource: &'a str,
    pub quantities: &'a Quantities,
    pub request_id: Option<&'a str>,
    pub decision: Option<&'a Decision>,
    pub receipt: &'a Receipt,
}

/// `UsageAdmitted`'s position in `EventBody`, which serde encodes as the variant's tag.
const USAGE_ADMITTED_VARIANT: u32 = 8;

impl Serialize for UsageAdmittedRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStructVariant;
        let mut variant = serializer.serialize_struct_variant(
            "EventBody",
            USAGE_ADMITTED_VARIANT,
            "UsageAdmitted",
            6,
        )?;
        variant.serialize_field("key", self.key)?;
        variant.serialize_field("resource", self.resource)?;
        variant.serialize_field("quantities", self.quantities)?;
        variant.serialize_field("request_id", &self.request_id)?;
        variant.serialize_field("decision", &self.decision)?;
        variant.serialize_field("receipt", self.receipt)?;
        variant.end()
    }
}

/// Encodes a usage event into `buffer` (cleared first), reusing its allocation.
pub(crate) fn encode_usage_into(buffer: &mut Vec<u8>, usage: &UsageAdmittedRef<'_>) {
    buffer.clear();
    append_usage_to(buffer, usage);
}

/// Encodes a usage event at the end of `buffer` (what is there stays).
///
/// The event of a request without an id (no decision to remember) is written by hand, to the
/// very bytes bincode writes (a property test compares them over arbitrary events): through
/// serde, each of its twenty-odd integers was a call, a `Result` and a `memcpy` of a byte or
/// two, together a quarter of a `consume_many`'s instructions (callgrind, examples/manyloop).
/// It then went through a bounds-checked writer, a check and an `Option` per byte and the
/// strings copied a byte at a time: 387 instructions per event, three quarters of what the
/// log added to a `consume_many` request. It now writes through a cursor into room reserved
/// for the event's longest encoding, and copies each string at once.
pub(crate) fn append_usage_to(buffer: &mut Vec<u8>, usage: &UsageAdmittedRef<'_>) {
    if usage.decision.is_none() {
        let most = usage_bytes_at_most(usage);
        buffer.reserve(most);
        let spare = buffer.spare_capacity_mut();
        // Always so after `reserve`; checked, not assumed, since the writes below rely on it.
        if spare.len() >= most {
            let start = spare.as_mut_ptr().cast::<u8>();
            // SAFETY: `start` begins `most` bytes of spare capacity (just checked), and a
            // usage event without a decision encodes to at most `most` bytes
            // (`usage_bytes_at_most` counts every string, varint and tag `Cursor::usage`
            // writes; the cursor debug-asserts it stays inside).
            let written = unsafe {
                let mut cursor = Cursor::new(start, most);
                cursor.usage(usage);
                cursor.written(start)
            };
            debug_assert!(written <= most);
            // SAFETY: the cursor wrote every one of the first `written` bytes of the spare
            // capacity (it only ever advances past bytes it wrote), so they are initialised;
            // `written` is at most the spare capacity.
            unsafe { buffer.set_len(buffer.len() + written) };
            return;
        }
    }
    // With a decision to remember (a request id's), through serde. Serialising plain data
    // into a Vec cannot fail.
    let _ = encoding().serialize_into(&mut *buffer, usage);
}

/// The longest varint: a marker byte and eight bytes.
const MAX_VARINT_BYTES: usize = 9;

/// The most bytes `Cursor::usage` writes for `usage`: its strings, a varint each for the
/// variant's tag, three string lengths, the quantities, the charge's tag and value, the
/// generation, the holds' count and three per hold, and one byte each for the request id's and
/// the decision's option tags.
fn usage_bytes_at_most(usage: &UsageAdmittedRef<'_>) -> usize {
    let varints = 1 + 3 + usage.quantities.0.len() + 4 + 3 * usage.receipt.holds.as_slice().len();
    usage.key.len()
        + usage.resource.len()
        + usage.request_id.map_or(0, str::len)
        + varints * MAX_VARINT_BYTES
        + 2
}

/// Writes bincode's encoding at a raw position in memory the caller reserved. Every method is
/// unsafe for the same reason: the caller guarantees room for all that is written (the cursor
/// checks it only in debug builds, against the room it was given).
struct Cursor {
    at: *mut u8,
    #[cfg(debug_assertions)]
    end: *mut u8,
}

impl Cursor {
    /// # Safety
    /// `start` must be valid for writes of `room` bytes.
    #[inline(always)]
    unsafe fn new(start: *mut u8, room: usize) -> Cursor {
        #[cfg(not(debug_assertions))]
        let _ = room;
        Cursor {
            at: start,
            #[cfg(debug_assertions)]
            end: start.wrapping_add(room),
        }
    }

    /// How many bytes were written since `start` (the cursor's first position).
    ///
    /// # Safety
    /// `start` must be the pointer the cursor was made with.
    #[inline(always)]
    unsafe fn written(&self, start: *mut u8) -> usize {
        // SAFETY: both point into the same reserved room, `at` at or after `start`.
        unsafe { self.at.offset_from(start) as usize }
    }

    /// `EventBody::UsageAdmitted` without a decision, field by field as serde visits it.
    ///
    /// # Safety
    /// Room for `usage_bytes_at_most(usage)` bytes from the cursor on.
    #[inline(always)]
    unsafe fn usage(&mut self, usage: &UsageAdmittedRef<'_>) {
        // SAFETY (every call below): within the room the caller guarantees, which
        // `usage_bytes_at_most` counts field by field in this order.
        unsafe {
            self.varint(u64::from(USAGE_ADMITTED_VARIANT));
            self.str(usage.key);
            self.str(usage.resource);
            for &quantity in &usage.quantities.0 {
                self.varint(quantity);
            }
            match usage.request_id {
                None => self.byte(0),
                Some(request_id) => {
                    self.byte(1);
                    self.str(request_id);
                }
            }
            // The decision: `None`.
            self.byte(0);
            let receipt = usage.receipt;
            let (tag, value) = match receipt.charged_to {
                ChargedTo::PlanQuota { plan } => (0, u64::from(plan.0)),
                ChargedTo::Credits { micros } => (1, micros),
                ChargedTo::PayAsYouGo { micros } => (2, micros),
            };
            self.varint(tag);
            self.varint(value);
            self.varint(u64::from(receipt.generation));
            let holds = receipt.holds.as_slice();
            self.varint(holds.len() as u64);
            for &(counter, amount, epoch) in holds {
                self.varint(u64::from(counter.0));
                self.varint(amount);
                self.varint(epoch);
            }
        }
    }

    /// # Safety
    /// Room for `bytes.len()` bytes.
    #[inline(always)]
    unsafe fn put(&mut self, bytes: &[u8]) {
        #[cfg(debug_assertions)]
        debug_assert!(self.end as usize - self.at as usize >= bytes.len());
        // SAFETY: room for them (the caller's guarantee); `bytes` is another allocation
        // (a caller's string or a local), so the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.at, bytes.len());
            self.at = self.at.add(bytes.len());
        }
    }

    /// # Safety
    /// Room for one byte.
    #[inline(always)]
    unsafe fn byte(&mut self, byte: u8) {
        #[cfg(debug_assertions)]
        debug_assert!(self.at < self.end);
        // SAFETY: room for it (the caller's guarantee).
        unsafe {
            self.at.write(byte);
            self.at = self.at.add(1);
        }
    }

    /// bincode 1.3's variable-length unsigned integer (`VarintEncoding`): up to 250 in one
    /// byte, else a marker (251, 252, 253) and the value as a little-endian u16, u32 or u64.
    /// Every unsigned integer, enum tag and length of the event format is written this way.
    ///
    /// # Safety
    /// Room for `MAX_VARINT_BYTES` bytes.
    #[inline(always)]
    unsafe fn varint(&mut self, value: u64) {
        // SAFETY: at most `MAX_VARINT_BYTES` in every branch.
        unsafe {
            if value <= 250 {
                self.byte(value as u8);
            } else if let Ok(value) = u16::try_from(value) {
                self.byte(251);
                self.put(&value.to_le_bytes());
            } else if let Ok(value) = u32::try_from(value) {
                self.byte(252);
                self.put(&value.to_le_bytes());
            } else {
                self.byte(253);
                self.put(&value.to_le_bytes());
            }
        }
    }

    /// A string as bincode writes it: its length in bytes (a varint), then its bytes.
    ///
    /// # Safety
    /// Room for `MAX_VARINT_BYTES + text.len()` bytes.
    #[inline(always)]
    unsafe fn str(&mut self, text: &str) {
        // SAFETY: the caller's guarantee.
        unsafe {
            self.varint(text.len() as u64);
            self.put(text.as_bytes());
        }
    }
}

/// A usage event without a decision, read in place: replay's fast path (see `read_usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UsageView<'a> {
    pub key: &'a str,
    pub resource: &'a str,
    pub quantities: Quantities,
    pub request_id: Option<&'a str>,
    pub receipt: Receipt,
    /// Where `key`'s bytes start in the body, and where the receipt does (`read_receipt`).
    pub key_at: usize,
    pub receipt_at: usize,
}

/// Reads the body of a `UsageAdmitted` event without a decision, borrowing its strings; `None`
/// for any other body, or one bincode would not decode (the caller then decodes it through
/// serde, which names what is wrong). Accepts exactly what bincode does for such a body (a
/// property test compares the two over valid and damaged bodies): replay decodes nearly every
/// event here, without an allocation, where serde allocated its strings.
pub(crate) fn read_usage(body: &[u8]) -> Option<UsageView<'_>> {
    let mut reader = Reader { bytes: body, at: 0 };
    if reader.varint_u32()? != USAGE_ADMITTED_VARIANT {
        return None;
    }
    let key = reader.str()?;
    let key_at = reader.at - key.len();
    let resource = reader.str()?;
    let mut values = [0u64; crate::policy::UNIT_COUNT];
    for value in &mut values {
        *value = reader.varint()?;
    }
    let request_id = match reader.byte()? {
        0 => None,
        1 => Some(reader.str()?),
        _ => return None,
    };
    // The decision: only `None` is read here.
    if reader.byte()? != 0 {
        return None;
    }
    let receipt_at = reader.at;
    let receipt = reader.receipt()?;
    Some(UsageView {
        key,
        resource,
        quantities: Quantities::from_values(values),
        request_id,
        receipt,
        key_at,
        receipt_at,
    })
}

/// Reads a receipt as bincode encodes it, from the start of `bytes` (trailing bytes ignored).
pub(crate) fn read_receipt(bytes: &[u8]) -> Option<Receipt> {
    Reader { bytes, at: 0 }.receipt()
}

/// bincode's encoding, read by hand (see `Cursor` for the writing side).
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    #[inline(always)]
    fn byte(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    #[inline(always)]
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(len)?;
        let taken = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    /// bincode 1.3's `VarintEncoding`, as `Cursor::varint` writes it; a longer form than
    /// needed is accepted, as bincode accepts it.
    #[inline(always)]
    fn varint(&mut self) -> Option<u64> {
        match self.byte()? {
            byte @ 0..=250 => Some(u64::from(byte)),
            251 => Some(u64::from(u16::from_le_bytes(
                self.take(2)?.try_into().ok()?,
            ))),
            252 => Some(u64::from(u32::from_le_bytes(
                self.take(4)?.try_into().ok()?,
            ))),
            253 => Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            _ => None,
        }
    }

    #[inline(always)]
    fn varint_u16(&mut self) -> Option<u16> {
        u16::try_from(self.varint()?).ok()
    }

    #[inline(always)]
    fn varint_u32(&mut self) -> Option<u32> {
        u32::try_from(self.varint()?).ok()
    }

    /// A string: its length in bytes (a varint), then UTF-8.
    #[inline(always)]
    fn str(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.varint()?).ok()?;
        std::str::from_utf8(self.take(len)?).ok()
    }

    fn receipt(&mut self) -> Option<Receipt> {
        let charged_to = match self.varint_u32()? {
            0 => ChargedTo::PlanQuota {
                plan: crate::policy::PlanId(self.varint_u16()?),
            },
            1 => ChargedTo::Credits {
                micros: self.varint()?,
            },
            2 => ChargedTo::PayAsYouGo {
                micros: self.varint()?,
            },
            _ => return None,
        };
        let generation = self.varint_u32()?;
        let count = usize::try_from(self.varint()?).ok()?;
        if count > crate::policy::MAX_LIMITS_PER_RESOURCE {
            return None;
        }
        let mut holds = [(CounterId(0), 0, 0); crate::policy::MAX_LIMITS_PER_RESOURCE];
        for hold in &mut holds[..count] {
            *hold = (
                CounterId(self.varint_u16()?),
                self.varint()?,
                self.varint()?,
            );
        }
        Some(Receipt {
            charged_to,
            generation,
            holds: crate::admission::Holds::from_slice(&holds[..count])?,
        })
    }
}

/// Encodes an event body at the end of `buffer` (what is there stays).
pub(crate) fn append_body_to(buffer: &mut Vec<u8>, body: &EventBody) {
    // Serialising plain data into a Vec cannot fail.
    let _ = encoding().serialize_into(&mut *buffer, body);
}

pub fn encode_body(body: &EventBody) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    encoding().serialize(body).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The record payload (inside a log frame; see `log` for the frame and the segment files).
//
// ```text
// first_seq u64 LE | count u32 LE | newest_at_ms u64 LE | base_at_ms u64 LE
//     | durable_before u64 LE                                                    (36 bytes)
// count x [ at_ms - previous at_ms: zigzag varint | body length: varint | body ]
// ```
//
// Sequence numbers are implicit (first_seq + index: a record is gap-free by construction);
// the first event's "previous at_ms" is `base_at_ms`. An event costs its body plus 2-3 bytes.
//
// `durable_before` (format 3 on; bit 31 of `count` says it is there) is the writer's durable
// point when it wrote the record: every event before it had been fdatasynced. Opening tells a
// torn tail from damage with it: a bad record is a write that never reached the disk whole
// when no sound record after it says its events were durable (see `log::recover_segments`).
// Format 2 records have neither the bit nor the field (28 bytes of header).

/// Bytes of a record payload's fixed header, as written.
pub const RECORD_HEADER_BYTES: usize = 36;

/// Bytes of the shortest header a record can have (format 2: no durable point).
pub const RECORD_HEADER_BYTES_MIN: usize = 28;

/// Bit of a record's `count` saying a durable point follows the format-2 header.
const DURABLE_POINT_FLAG: u32 = 1 << 31;

/// One event read in place from a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    pub seq: u64,
    pub at_ms: u64,
    pub body: &'a [u8],
}

/// Appends the payload of a record holding `events` (consecutive sequence numbers) to `out`;
/// every event before `durable_before` (at most `first_seq`) is durable as it is written.
pub fn encode_record_into<'a, I>(out: &mut Vec<u8>, first_seq: u64, durable_before: u64, events: I)
where
    I: IntoIterator<Item = (u64, &'a [u8])> + Clone,
{
    let header_at = out.len();
    let mut count = 0u32;
    let mut newest = 0u64;
    let mut base = None;
    for (at_ms, _) in events.clone() {
        count += 1;
        newest = newest.max(at_ms);
        base.get_or_insert(at_ms);
    }
    let base = base.unwrap_or(0);
    debug_assert!(count < DURABLE_POINT_FLAG && durable_before <= first_seq);
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(&(count | DURABLE_POINT_FLAG).to_le_bytes());
    out.extend_from_slice(&newest.to_le_bytes());
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(&durable_before.to_le_bytes());
    debug_assert_eq!(out.len() - header_at, RECORD_HEADER_BYTES);
    let mut previous = base;
    for (at_ms, body) in events {
        let delta = at_ms.wrapping_sub(previous) as i64;
        put_varint(out, ((delta << 1) ^ (delta >> 63)) as u64);
        put_varint(out, body.len() as u64);
        out.extend_from_slice(body);
        previous = at_ms;
    }
}

/// The encoded size of one event inside a record, at most (for sizing records).
pub fn event_bytes_at_most(body_len: usize) -> usize {
    body_len + 20
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = *bytes.get(*at)?;
        *at += 1;
        if shift == 63 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// A record payload, checked for shape (not yet for its bodies), read in place.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub first_seq: u64,
    pub count: u32,
    pub newest_at_ms: u64,
    /// Every event before this one was durable when the record was written; `None` for a
    /// format-2 record, which does not say.
    pub durable_before: Option<u64>,
    base_at_ms: u64,
    events: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// Reads a payload's header; `None` if it is too short to hold one, numbers its events
    /// from 0 or past `u64::MAX` (damage: sequence numbers start at 1, and `last_seq() + 1`
    /// must fit), or puts its durable point after its own first event.
    pub fn parse(payload: &'a [u8]) -> Option<RecordView<'a>> {
        let header = payload.get(..RECORD_HEADER_BYTES_MIN)?;
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
        let first_seq = u64_at(0);
        let flagged = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        let count = flagged & !DURABLE_POINT_FLAG;
        if first_seq == 0 {
            return None;
        }
        first_seq.checked_add(u64::from(count))?;
        let (durable_before, events_at) = if flagged & DURABLE_POINT_FLAG != 0 {
            let mark = payload.get(RECORD_HEADER_BYTES_MIN..RECORD_HEADER_BYTES)?;
            let mark = u64::from_le_bytes(mark.try_into().unwrap_or_default());
            if mark > first_seq {
                return None;
            }
            (Some(mark), RECORD_HEADER_BYTES)
        } else {
            (None, RECORD_HEADER_BYTES_MIN)
        };
        Some(RecordView {
            first_seq,
            count,
            newest_at_ms: u64_at(12),
            durable_before,
            base_at_ms: u64_at(20),
            events: &payload[events_at..],
        })
    }

    /// The last sequence number in the record (`first_seq - 1` for an empty one). `parse`
    /// made sure `last_seq() + 1` fits.
    pub fn last_seq(&self) -> u64 {
        debug_assert!(self.first_seq.checked_add(u64::from(self.count)).is_some());
        (self.first_seq + u64::from(self.count)).saturating_sub(1)
    }

    /// Calls `visit` with each event in order; stops early (returning `Ok(false)`) when it
    /// returns false. A payload whose events do not fill it exactly is an error, described.
    pub fn for_each(
        &self,
        mut visit: impl FnMut(RawEvent<'a>) -> Result<bool, Error>,
    ) -> Result<bool, RecordError> {
        let bytes = self.events;
        let mut at = 0usize;
        let mut at_ms = self.base_at_ms;
        for index in 0..u64::from(self.count) {
            let seq = self.first_seq + index;
            let (Some(delta), Some(len)) = (get_varint(bytes, &mut at), get_varint(bytes, &mut at))
            else {
                return Err(RecordError::Shape(seq));
            };
            let delta = ((delta >> 1) as i64) ^ -((delta & 1) as i64);
            at_ms = at_ms.wrapping_add(delta as u64);
            let end = usize::try_from(len)
                .ok()
                .and_then(|len| at.checked_add(len))
                .filter(|end| *end <= bytes.len())
                .ok_or(RecordError::Shape(seq))?;
            let event = RawEvent {
                seq,
                at_ms,
                body: &bytes[at..end],
            };
            at = end;
            if !visit(event).map_err(RecordError::Visit)? {
                return Ok(false);
            }
        }
        if at != bytes.len() {
            return Err(RecordError::Shape(self.last_seq() + 1));
        }
        Ok(true)
    }

    /// The record, owned.
    pub fn to_record(&self) -> Result<Record, RecordError> {
        // Sized by what the bytes can hold (each event takes at least its two varints), not by
        // the count alone: a count of 2^31 - 1 over a few bytes asked for 80 GiB.
        let most = (self.count as usize).min(self.events.len() / 2);
        let mut events = Vec::with_capacity(most);
        self.for_each(|event| {
            events.push((event.seq, event.at_ms, event.body.to_vec()));
            Ok(true)
        })?;
        Ok(Record {
            version: FORMAT_VERSION,
            newest_at_ms: self.newest_at_ms,
            events,
        })
    }
}

/// What is wrong with a record's events.
#[derive(Debug)]
pub enum RecordError {
    /// The payload does not hold its events as it says, at this event.
    Shape(u64),
    /// The visitor failed.
    Visit(Error),
}

/// Decodes an event body; an error names the event.
pub fn decode_body(seq: u64, body: &[u8]) -> Result<EventBody, Error> {
    encoding()
        .deserialize(body)
        .map_err(|error| Error::Storage {
            problem: format!("event {seq} is damaged: {error}"),
        })
}

/// Decodes one stored event.
pub fn decode_raw(raw: RawEvent<'_>) -> Result<Event, Error> {
    Ok(Event {
        seq: raw.seq,
        at_ms: raw.at_ms,
        body: decode_body(raw.seq, raw.body)?,
    })
}

pub fn decode_event(
    record_first: u64,
    (seq, at_ms, body): &(u64, u64, Vec<u8>),
) -> Result<Event, Error> {
    let body: EventBody = encoding()
        .deserialize(body)
        .map_err(|error| Error::Storage {
            problem: format!("log record {record_first}: event {seq} is damaged: {error}"),
        })?;
    Ok(Event {
        seq: *seq,
        at_ms: *at_ms,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_usage_event_encodes_to_the_owned_events_bytes() {
        use crate::admission::{ChargedTo, DenialReason, Holds};
        use crate::policy::Unit;
        use crate::{Engine, EngineOptions, ManualClock, Policy, UsageRequest};
        let engine = Engine::new(
            Policy::token_plan(),
            std::sync::Arc::new(ManualClock::new(1_790_000_000_000)),
            EngineOptions::default(),
        )
        .expect("valid options");
        engine.create_user("ada", "tp-ada", None).expect("new user");
        engine
            .assign_seat("@ada", "ada", "Plus", None)
            .expect("a seat");
        let one = [(Unit::Requests, 1)];
        let admitted = engine
            .consume(&UsageRequest::new("tp-ada", "m2.7", &one))
            .expect("a valid request");
        assert!(admitted.is_admitted());
        let denied = Decision::denied(DenialReason::NoResources);
        let holds = Holds::from_slice(&[
            (CounterId(3), 1, 22_375_000),
            (CounterId(65_000), 1 << 40, u64::MAX),
        ])
        .expect("two holds fit");
        let receipt = Receipt {
            charged_to: ChargedTo::Credits { micros: 7_000 },
            generation: 2,
            holds,
        };
        let quantities =
            Quantities::new(&[(Unit::Requests, 1), (Unit::Tokens, 900)]).expect("valid quantities");
        let mut buffer = vec![0xAA; 3];
        for (request_id, decision) in [
            (None, None),
            (Some("req-1"), Some(admitted)),
            (Some(""), Some(denied)),
            (Some("r\u{e9}q-\u{1F600}"), None),
        ] {
            let owned = EventBody::UsageAdmitted {
                key: "tp-ada".into(),
                resource: "m2.7-highspeed".into(),
                quantities,
                request_id: request_id.map(Into::into),
                decision,
                receipt,
            };
            let usage = UsageAdmittedRef {
                key: "tp-ada",
                resource: "m2.7-highspeed",
                quantities: &quantities,
                request_id,
                decision: decision.as_ref(),
                receipt: &receipt,
            };
            encode_usage_into(&mut buffer, &usage);
            assert_eq!(buffer, encode_body(&owned), "{request_id:?}");
            assert_eq!(decode_body(0, &buffer).expect("decodes"), owned);
            // Appended after what a staged chunk already holds, it is the same bytes.
            let mut chunk = vec![0x55; 5];
            append_usage_to(&mut chunk, &usage);
            append_usage_to(&mut chunk, &usage);
            let once = encode_body(&owned);
            assert_eq!(chunk[..5], [0x55; 5]);
            assert_eq!(chunk[5..5 + once.len()], once[..]);
            assert_eq!(chunk[5 + once.len()..], once[..]);
        }
    }

    /// The longest usage event there can be (every integer at its widest, every list and
    /// string at its longest) fits the room `append_usage_to` reserves for it, and is still
    /// bincode's bytes. The cursor writes unchecked in release builds, so this bound is what
    /// keeps its writes inside the vector; in debug builds the cursor asserts it too.
    #[test]
    fn the_longest_usage_event_fits_the_room_reserved_for_it() {
        use crate::admission::Holds;
        use crate::policy::MAX_LIMITS_PER_RESOURCE;
        let hold = (CounterId(u16::MAX), u64::MAX, u64::MAX);
        let receipt = Receipt {
            charged_to: ChargedTo::Credits { micros: u64::MAX },
            generation: u32::MAX,
            holds: Holds::from_slice(&[hold; MAX_LIMITS_PER_RESOURCE]).expect("the maximum"),
        };
        let quantities = Quantities::from_values([u64::MAX; crate::policy::UNIT_COUNT]);
        // Longer than any name the engine accepts, so the varint of each length is wider too.
        let (key, resource, request_id) = ("k".repeat(70_000), "r".repeat(300), "i".repeat(300));
        let usage = UsageAdmittedRef {
            key: &key,
            resource: &resource,
            quantities: &quantities,
            request_id: Some(&request_id),
            decision: None,
            receipt: &receipt,
        };
        let mut by_hand = Vec::new();
        append_usage_to(&mut by_hand, &usage);
        assert!(
            by_hand.len() <= usage_bytes_at_most(&usage),
            "{} bytes written, {} reserved",
            by_hand.len(),
            usage_bytes_at_most(&usage)
        );
        let mut by_bincode = Vec::new();
        encoding()
            .serialize_into(&mut by_bincode, &usage)
            .expect("serialises");
        assert_eq!(by_hand, by_bincode);
    }

    /// Values around each of the varint's size boundaries, and anything else.
    fn boundary_u64() -> impl proptest::strategy::Strategy<Value = u64> {
        use proptest::prelude::*;
        prop_oneof![
            prop::sample::select(vec![
                0,
                1,
                250,
                251,
                252,
                253,
                255,
                256,
                65_535,
                65_536,
                u64::from(u32::MAX),
                u64::from(u32::MAX) + 1,
                u64::MAX - 1,
                u64::MAX,
            ]),
            any::<u64>(),
            0..1_000u64,
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]
        /// The hand-written encoding of a usage event without a decision is bincode's, byte for
        /// byte, whatever the strings, quantities, charge and holds.
        #[test]
        fn a_usage_event_written_by_hand_is_bincodes_bytes(
            body in usage_event(300, 70, 260),
            prefix in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4),
        ) {
            let EventBody::UsageAdmitted { key, resource, quantities, request_id, receipt, .. } =
                &body
            else {
                unreachable!("a usage event");
            };
            let usage = UsageAdmittedRef {
                key,
                resource,
                quantities,
                request_id: request_id.as_deref(),
                decision: None,
                receipt,
            };
            let mut by_hand = prefix.clone();
            append_usage_to(&mut by_hand, &usage);
            let mut by_bincode = prefix;
            encoding()
                .serialize_into(&mut by_bincode, &usage)
                .expect("serialises");
            proptest::prop_assert_eq!(by_hand, by_bincode);
        }
    }

    /// A usage event without a decision, as the property tests draw it: a key, a resource and
    /// a request id of at most the given lengths, any quantities, charge and holds.
    fn usage_event(
        key_chars: usize,
        resource_chars: usize,
        request_id_chars: usize,
    ) -> impl proptest::strategy::Strategy<Value = EventBody> {
        use crate::admission::{ChargedTo, Holds};
        use crate::policy::PlanId;
        use proptest::prelude::*;
        (
            proptest::string::string_regex(&format!(".{{0,{key_chars}}}")).expect("a pattern"),
            proptest::string::string_regex(&format!("[a-z0-9.-]{{0,{resource_chars}}}"))
                .expect("a pattern"),
            proptest::option::of(
                proptest::string::string_regex(&format!(".{{0,{request_id_chars}}}"))
                    .expect("a pattern"),
            ),
            proptest::array::uniform7(boundary_u64()),
            (0u8..3, boundary_u64(), any::<u16>()),
            any::<u32>(),
            proptest::collection::vec(
                (any::<u16>(), boundary_u64(), boundary_u64()),
                0..=crate::policy::MAX_LIMITS_PER_RESOURCE,
            ),
        )
            .prop_map(
                |(key, resource, request_id, values, charge, generation, holds)| {
                    let charged_to = match charge.0 {
                        0 => ChargedTo::PlanQuota {
                            plan: PlanId(charge.2),
                        },
                        1 => ChargedTo::Credits { micros: charge.1 },
                        _ => ChargedTo::PayAsYouGo { micros: charge.1 },
                    };
                    let holds: Vec<_> = holds
                        .into_iter()
                        .map(|(counter, amount, epoch)| (CounterId(counter), amount, epoch))
                        .collect();
                    EventBody::UsageAdmitted {
                        key,
                        resource,
                        quantities: Quantities::from_values(values),
                        request_id,
                        decision: None,
                        receipt: Receipt {
                            charged_to,
                            generation,
                            holds: Holds::from_slice(&holds).expect("at most the maximum"),
                        },
                    }
                },
            )
    }

    /// What `read_usage` read, as the owned event serde decodes.
    fn owned(view: &UsageView<'_>) -> EventBody {
        EventBody::UsageAdmitted {
            key: view.key.into(),
            resource: view.resource.into(),
            quantities: view.quantities,
            request_id: view.request_id.map(str::to_string),
            decision: None,
            receipt: view.receipt,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3_000))]
        /// Read by hand, a usage event without a decision is what serde decodes, and its key
        /// and receipt are where the view says.
        #[test]
        fn a_usage_event_read_by_hand_is_what_serde_decodes(body in usage_event(40, 20, 40)) {
            let bytes = encode_body(&body);
            let view = read_usage(&bytes).expect("read");
            proptest::prop_assert_eq!(&owned(&view), &body);
            proptest::prop_assert_eq!(&bytes[view.key_at..view.key_at + view.key.len()], view.key.as_bytes());
            proptest::prop_assert_eq!(read_receipt(&bytes[view.receipt_at..]), Some(view.receipt));
        }

        /// On damaged bodies (bytes changed, cut short or added) the hand reader accepts exactly
        /// the usage events without a decision that serde decodes, and reads them alike.
        #[test]
        fn a_damaged_usage_event_is_read_by_hand_only_as_serde_decodes_it(
            body in usage_event(40, 20, 40),
            changes in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..4),
            cut in proptest::option::of(proptest::prelude::any::<usize>()),
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3),
        ) {
            let mut bytes = encode_body(&body);
            for (at, byte) in changes {
                let len = bytes.len();
                bytes[at % len] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            bytes.extend(extra);
            let by_serde = match decode_body(1, &bytes) {
                Ok(decoded @ EventBody::UsageAdmitted { decision: None, .. }) => Some(decoded),
                _ => None,
            };
            let by_hand = read_usage(&bytes).map(|view| owned(&view));
            proptest::prop_assert_eq!(by_hand, by_serde);
        }
    }

    fn bodies() -> Vec<(u64, Vec<u8>)> {
        let body = EventBody::TeamCreated { team: "t".into() };
        vec![
            (1_790_000_000_007, encode_body(&body)),
            (1_790_000_000_003, encode_body(&body)),
            (1_790_000_100_000, Vec::new()),
        ]
    }

    fn encoded(first: u64) -> Vec<u8> {
        let events = bodies();
        let mut out = Vec::new();
        encode_record_into(
            &mut out,
            first,
            first - 1,
            events.iter().map(|(at, body)| (*at, body.as_slice())),
        );
        out
    }

    #[test]
    fn a_record_round_trips_with_times_going_back_and_forth() {
        let bytes = encoded(5);
        let view = RecordView::parse(&bytes).expect("a header");
        assert_eq!((view.first_seq, view.count, view.last_seq()), (5, 3, 7));
        assert_eq!(view.newest_at_ms, 1_790_000_100_000);
        let record = view.to_record().expect("decodes");
        let expected: Vec<_> = bodies()
            .into_iter()
            .enumerate()
            .map(|(index, (at, body))| (5 + index as u64, at, body))
            .collect();
        assert_eq!(record.events, expected);
        let event = decode_event(5, &record.events[1]).expect("decodes");
        assert_eq!(event.seq, 6);
        assert_eq!(event.body, EventBody::TeamCreated { team: "t".into() });
        // Two bytes of framing per event besides the body, for these.
        assert!(
            bytes.len()
                <= RECORD_HEADER_BYTES + 3 * 4 + bodies().iter().map(|b| b.1.len()).sum::<usize>()
        );
    }

    #[test]
    fn a_record_says_its_durable_point_and_a_format_2_record_is_read_without_one() {
        let bytes = encoded(5);
        let view = RecordView::parse(&bytes).expect("a header");
        assert_eq!(view.durable_before, Some(4));
        // Format 2: no flag in the count, no durable point, 8 bytes shorter.
        let mut old = bytes[..RECORD_HEADER_BYTES_MIN].to_vec();
        old[8..12].copy_from_slice(&3u32.to_le_bytes());
        old.extend_from_slice(&bytes[RECORD_HEADER_BYTES..]);
        let view = RecordView::parse(&old).expect("a format-2 header");
        assert_eq!(
            (view.first_seq, view.count, view.durable_before),
            (5, 3, None)
        );
        let old_record = view.to_record().expect("decodes");
        let new_record = RecordView::parse(&bytes).unwrap().to_record().unwrap();
        assert_eq!(old_record.events, new_record.events);
        // A durable point after the record's own first event cannot have been written.
        let mut later = bytes.clone();
        later[28..36].copy_from_slice(&6u64.to_le_bytes());
        assert!(RecordView::parse(&later).is_none());
        // A flagged header cut short of its durable point.
        assert!(RecordView::parse(&bytes[..RECORD_HEADER_BYTES - 1]).is_none());
    }

    /// A record's count is trusted for nothing but the loop: one whose crc is sound but whose
    /// count says 2^31 - 1 events over a few bytes is refused, not sized for (about 80 GiB).
    #[test]
    fn a_record_counting_more_events_than_its_bytes_hold_is_refused_without_sizing_for_them() {
        let mut bytes = encoded(3);
        bytes[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
        let view = RecordView::parse(&bytes).expect("a header");
        assert_eq!(view.count, (1 << 31) - 1);
        assert!(matches!(view.to_record(), Err(RecordError::Shape(6))));
    }

    #[test]
    fn a_record_that_does_not_hold_what_it_says_is_an_error_naming_the_event() {
        let mut bytes = encoded(3);
        bytes.truncate(bytes.len() - 3);
        bytes.push(9);
        let view = RecordView::parse(&bytes).expect("a header");
        assert!(matches!(view.to_record(), Err(RecordError::Shape(4 | 5))));
        let mut longer = encoded(3);
        longer.push(0);
        let view = RecordView::parse(&longer).expect("a header");
        assert!(matches!(view.to_record(), Err(RecordError::Shape(6))));
        let bad_body = (3, 1, vec![250, 250, 250]);
        let error = decode_event(3, &bad_body).expect_err("refused");
        assert!(error.to_string().contains("event 3 is damaged"), "{error}");
    }
}
