//! Events: every change of state, as appended to the log before it is acknowledged.
//!
//! An event is immutable once written. It carries its sequence number, the time it happened and
//! what it did exactly (the counters, epochs and amounts a usage moved; the micro-credits it
//! charged or gave back), so replaying the log reproduces the engine's state whatever the order
//! in which concurrent requests were applied in memory. Bodies are bincode (serde) behind a
//! format version; a record of an unknown version or a damaged record is an error naming it.

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::admission::{Decision, Quantities, Receipt};
use crate::engine::AdjustmentDirection;
use crate::error::Error;
use crate::policy::CounterId;
use crate::reservation::Settlement;

/// The version of the event and record encoding written by this build.
pub const FORMAT_VERSION: u16 = 1;

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
}

impl EventBody {
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

/// A log record: many events packed into one sled value (sled's cost is per insert, so one
/// record per group commit). Keyed by its first event's sequence number, big-endian.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

pub fn encode_body(body: &EventBody) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    encoding().serialize(body).unwrap_or_default()
}

pub fn encode_record(record: &Record) -> Vec<u8> {
    encoding().serialize(record).unwrap_or_default()
}

/// Decodes a record stored under `key`; errors name the record and, for a body, the event.
pub fn decode_record(key: &[u8], value: &[u8]) -> Result<Record, Error> {
    let first = record_key_seq(key)?;
    // The version comes first in the encoding: read it alone so a newer format is named as such.
    let version: u16 = encoding()
        .deserialize::<u16>(value.get(..3).unwrap_or(value))
        .map_err(|error| Error::Storage {
            problem: format!("log record {first}: cannot read its version: {error}"),
        })?;
    if version != FORMAT_VERSION {
        return Err(Error::Storage {
            problem: format!(
                "log record {first}: format version {version}, but this build reads version {FORMAT_VERSION}"
            ),
        });
    }
    let record: Record = encoding()
        .deserialize(value)
        .map_err(|error| Error::Storage {
            problem: format!("log record {first}: damaged: {error}"),
        })?;
    if record.events.first().map(|event| event.0) != Some(first) {
        return Err(Error::Storage {
            problem: format!(
                "log record {first}: its first event does not carry sequence number {first}"
            ),
        });
    }
    Ok(record)
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

pub fn record_key(first_seq: u64) -> [u8; 8] {
    first_seq.to_be_bytes()
}

pub fn record_key_seq(key: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| Error::Storage {
        problem: format!("log record key {key:?} is not an 8-byte sequence number"),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(first: u64) -> Record {
        let body = EventBody::TeamCreated { team: "t".into() };
        Record {
            version: FORMAT_VERSION,
            newest_at_ms: 7,
            events: vec![
                (first, 7, encode_body(&body)),
                (first + 1, 7, encode_body(&body)),
            ],
        }
    }

    #[test]
    fn a_record_round_trips() {
        let encoded = encode_record(&record(5));
        let decoded = decode_record(&record_key(5), &encoded).expect("decodes");
        assert_eq!(decoded, record(5));
        let event = decode_event(5, &decoded.events[1]).expect("decodes");
        assert_eq!(event.seq, 6);
        assert_eq!(event.body, EventBody::TeamCreated { team: "t".into() });
    }

    #[test]
    fn a_newer_version_is_an_error_naming_the_record() {
        let mut newer = record(9);
        newer.version = FORMAT_VERSION + 1;
        let error = decode_record(&record_key(9), &encode_record(&newer)).expect_err("refused");
        assert!(error.to_string().contains("log record 9"), "{error}");
        assert!(error.to_string().contains("format version 2"), "{error}");
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_it() {
        let mut encoded = encode_record(&record(3));
        encoded.truncate(encoded.len() - 3);
        let error = decode_record(&record_key(3), &encoded).expect_err("refused");
        assert!(
            error.to_string().contains("log record 3: damaged"),
            "{error}"
        );
        let bad_body = (3, 1, vec![250, 250, 250]);
        let error = decode_event(3, &bad_body).expect_err("refused");
        assert!(error.to_string().contains("event 3 is damaged"), "{error}");
    }
}
