//! A snapshot's counters as bytes: each rolling window's live buckets packed (format 4 on), and
//! the plain form older snapshots wrote still read.
//!
//! A rolling bucket is an epoch and a count. Format 3 wrote both as fixed 8-byte integers, 16
//! bytes a bucket: a snapshot of 100,000 keys whose 5-hour rings were full took 230 MiB, and the
//! log's syncs waited behind its writeback. The live buckets of a ring are ascending and lie
//! within one window of its head, and most counts are small, so format 4 writes each bucket as
//! two LEB128 varints: the first bucket's distance below the head (then each bucket's distance
//! above the one before it), and its count. A bucket of a request-counting window then takes 2
//! bytes.

use std::cell::{Cell, RefCell};

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{self, SerializeStructVariant, Serializer};
use serde::{Deserialize, Serialize};

use super::CounterSnapshot;
use crate::window::{RawRing, RollingShape};

/// The serde name of a snapshot's counter and its variants' indices (what bincode writes).
/// Index 0 is format 3's `Rolling`, read only.
const COUNTER: &str = "CounterSnapshot";
const CALENDAR: u32 = 1;
const ROLLING_PACKED: u32 = 2;

/// At most ten bytes make a `u64` in LEB128 (7 bits each).
const MAX_VARINT_BYTES: usize = 10;

/// A counter as a snapshot writes it, borrowed: from a checkpoint's cut (`RawCut::encode`) or
/// from a `CounterSnapshot`, so both write the same bytes.
pub(super) enum CounterRef<'a> {
    Rolling {
        head: u64,
        wide: bool,
        buckets: Buckets<'a>,
    },
    Calendar {
        period: u32,
        count: u64,
    },
}

/// A rolling window's live buckets, as a snapshot is written from them.
#[derive(Clone, Copy)]
pub(super) enum Buckets<'a> {
    /// `(epoch, count)`, epochs ascending and at most the head.
    Listed(&'a [(u64, u64)]),
    /// A ring as a checkpoint's cut copied it, its occupied slots in slot order: packed
    /// straight from them, with no list of every ring's buckets built first (a snapshot of
    /// 100,000 full rings has 22 million).
    Copied {
        ring: RawRing,
        shape: RollingShape,
        slots: &'a [(u32, u64)],
    },
}

impl Buckets<'_> {
    fn for_each(self, mut each: impl FnMut(u64, u64)) {
        match self {
            Buckets::Listed(buckets) => {
                for &(epoch, count) in buckets {
                    each(epoch, count);
                }
            }
            Buckets::Copied { ring, shape, slots } => ring.for_each_live_bucket(shape, slots, each),
        }
    }
}

impl<'a> From<&'a CounterSnapshot> for CounterRef<'a> {
    fn from(counter: &'a CounterSnapshot) -> CounterRef<'a> {
        match counter {
            CounterSnapshot::Rolling {
                head,
                wide,
                buckets,
            } => CounterRef::Rolling {
                head: *head,
                wide: *wide,
                buckets: Buckets::Listed(buckets),
            },
            &CounterSnapshot::Calendar { period, count } => CounterRef::Calendar { period, count },
        }
    }
}

impl Serialize for CounterSnapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        CounterRef::from(self).serialize(serializer)
    }
}

thread_local! {
    /// Set while `in_format_3` runs: rolling buckets are written plain, as format 3 wrote them.
    static PLAIN: Cell<bool> = const { Cell::new(false) };
}

/// Runs `encode` with every rolling window's buckets written as format 3 wrote them (two
/// fixed integers each, variant 0): for tests of databases older builds wrote.
pub(super) fn in_format_3<T>(encode: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PLAIN.with(|plain| plain.set(false));
        }
    }
    PLAIN.with(|plain| plain.set(true));
    let _reset = Reset;
    encode()
}

impl Serialize for CounterRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            CounterRef::Rolling {
                head,
                wide,
                buckets,
            } if PLAIN.with(Cell::get) => {
                let mut listed = Vec::new();
                buckets.for_each(|epoch, count| listed.push((epoch, count)));
                let mut variant = serializer.serialize_struct_variant(COUNTER, 0, "Rolling", 3)?;
                variant.serialize_field("head", &head)?;
                variant.serialize_field("wide", &wide)?;
                variant.serialize_field("buckets", &listed)?;
                variant.end()
            }
            CounterRef::Rolling {
                head,
                wide,
                buckets,
            } => {
                let mut variant = serializer.serialize_struct_variant(
                    COUNTER,
                    ROLLING_PACKED,
                    "RollingPacked",
                    3,
                )?;
                variant.serialize_field("head", &head)?;
                variant.serialize_field("wide", &wide)?;
                variant.serialize_field("buckets", &Packed { head, buckets })?;
                variant.end()
            }
            CounterRef::Calendar { period, count } => {
                let mut variant =
                    serializer.serialize_struct_variant(COUNTER, CALENDAR, "Calendar", 2)?;
                variant.serialize_field("period", &period)?;
                variant.serialize_field("count", &count)?;
                variant.end()
            }
        }
    }
}

/// A ring's live buckets written as one byte string of varint pairs (see the module comment).
struct Packed<'a> {
    head: u64,
    buckets: Buckets<'a>,
}

thread_local! {
    /// Where a ring's buckets are packed before they are written: one buffer per encoding
    /// thread, reused for every ring (a few hundred bytes at most), not one allocation a ring.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Serialize for Packed<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Not `with`: a checkpoint (or a close) from a thread-exit destructor would panic.
        crate::engine::with_scratch(&SCRATCH, |bytes| {
            bytes.clear();
            pack(self.head, self.buckets, bytes).map_err(ser::Error::custom)?;
            serializer.serialize_bytes(bytes)
        })
    }
}

/// Appends `buckets` packed against `head` to `out`; an error names the bucket out of order.
fn pack(head: u64, buckets: Buckets<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    let mut previous: Option<u64> = None;
    let mut misplaced = None;
    buckets.for_each(|epoch, count| {
        let gap = match previous {
            None => head.checked_sub(epoch),
            Some(previous) => epoch.checked_sub(previous).filter(|&gap| gap > 0),
        };
        match gap.filter(|_| epoch <= head) {
            Some(gap) => {
                write_varint(out, gap);
                write_varint(out, count);
            }
            None => {
                misplaced.get_or_insert((epoch, previous));
            }
        }
        previous = Some(epoch);
    });
    match misplaced {
        None => Ok(()),
        Some((epoch, previous)) => Err(format!(
            "a rolling window's bucket {epoch} is not after {previous:?} and at most its head {head}"
        )),
    }
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a varint at `bytes[*at..]`, moving `at` past it.
fn read_varint(bytes: &[u8], at: &mut usize) -> Result<u64, &'static str> {
    let mut value = 0u64;
    for index in 0..MAX_VARINT_BYTES {
        let byte = *bytes.get(*at).ok_or("a varint runs past the end")?;
        *at += 1;
        let bits = u64::from(byte & 0x7F);
        // The tenth byte holds the top bit of a u64 alone.
        if index == MAX_VARINT_BYTES - 1 && bits > 1 {
            return Err("a varint overflows 64 bits");
        }
        value |= bits << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a varint is longer than 10 bytes")
}

/// Reads the varint pairs `pack` wrote: `(gap, count)` each, the gaps made epochs by
/// `to_epochs`.
fn read_pairs(bytes: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    // Room for exactly the pairs there are: each varint ends in the one byte of it below
    // 0x80. (Sized at two bytes a bucket, a ring of token counts, four or five bytes a
    // bucket, held twice the memory it needed until the restore freed it.)
    let varints = bytes.iter().filter(|&&byte| byte < 0x80).count();
    let mut pairs = Vec::with_capacity(varints / 2);
    let mut at = 0;
    while at < bytes.len() {
        let read = |at: &mut usize| {
            read_varint(bytes, at).map_err(|why| format!("rolling buckets, byte {}: {why}", *at))
        };
        let gap = read(&mut at)?;
        let count = read(&mut at)?;
        pairs.push((gap, count));
    }
    Ok(pairs)
}

/// Turns the gaps `read_pairs` read into epochs against `head`, in place; an error says which
/// bucket falls outside the ring.
fn to_epochs(head: u64, pairs: &mut [(u64, u64)]) -> Result<(), String> {
    let mut previous: Option<u64> = None;
    for (index, (gap_then_epoch, _)) in pairs.iter_mut().enumerate() {
        let gap = *gap_then_epoch;
        let epoch = match previous {
            None => head.checked_sub(gap),
            Some(previous) => previous.checked_add(gap).filter(|_| gap > 0),
        }
        .filter(|&epoch| epoch <= head)
        .ok_or_else(|| {
            format!(
                "rolling bucket {index} is {gap} from {}: not within its ring, whose head is {head}",
                if previous.is_some() { "the one before it" } else { "the head" }
            )
        })?;
        *gap_then_epoch = epoch;
        previous = Some(epoch);
    }
    Ok(())
}

/// A counter as a snapshot of any format this build reads has it.
#[derive(Deserialize)]
#[serde(rename = "CounterSnapshot")]
pub(super) enum CounterWire {
    /// Formats 2 and 3: every bucket as two fixed integers.
    Rolling {
        head: u64,
        wide: bool,
        buckets: Vec<(u64, u64)>,
    },
    Calendar {
        period: u32,
        count: u64,
    },
    /// Format 4 on.
    RollingPacked {
        head: u64,
        wide: bool,
        buckets: PackedPairs,
    },
}

/// Packed buckets as read: `(gap, count)` pairs, made `(epoch, count)` once the head is known
/// (`TryFrom<CounterWire>`), in the same allocation.
pub(super) struct PackedPairs(Vec<(u64, u64)>);

impl<'de> Deserialize<'de> for PackedPairs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PackedPairs, D::Error> {
        struct Pairs;
        impl Visitor<'_> for Pairs {
            type Value = PackedPairs;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("packed rolling buckets")
            }

            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<PackedPairs, E> {
                read_pairs(bytes).map(PackedPairs).map_err(E::custom)
            }
        }
        deserializer.deserialize_bytes(Pairs)
    }
}

impl TryFrom<CounterWire> for CounterSnapshot {
    type Error = String;

    fn try_from(wire: CounterWire) -> Result<CounterSnapshot, String> {
        Ok(match wire {
            CounterWire::Rolling {
                head,
                wide,
                buckets,
            } => CounterSnapshot::Rolling {
                head,
                wide,
                buckets,
            },
            CounterWire::Calendar { period, count } => CounterSnapshot::Calendar { period, count },
            CounterWire::RollingPacked {
                head,
                wide,
                buckets,
            } => {
                let PackedPairs(mut buckets) = buckets;
                to_epochs(head, &mut buckets)?;
                CounterSnapshot::Rolling {
                    head,
                    wide,
                    buckets,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::snapshot_encoding;
    use bincode::Options;
    use proptest::prelude::*;

    /// In bincode's fixed-width integers, which make the byte layout easy to write by hand
    /// below; `snapshot_encoding` (varints, what format 4 writes) is checked beside it.
    fn encoded(counter: &CounterSnapshot) -> Vec<u8> {
        bincode::serialize(counter).expect("encoding")
    }

    fn decoded(bytes: &[u8]) -> Result<CounterSnapshot, String> {
        bincode::deserialize(bytes).map_err(|error| error.to_string())
    }

    /// Live buckets as a ring holds them: ascending, within `span` of `head`, counts up to
    /// `max_count`.
    fn ring(head: u64, span: u64, max_count: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::btree_map(0..=span.min(head), 0..=max_count, 0..64).prop_map(
            move |buckets| {
                buckets
                    .into_iter()
                    .rev()
                    .map(|(behind, count)| (head - behind, count))
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn packed_buckets_read_back_as_written(
            (head, buckets, wide) in (0..u64::MAX, any::<bool>())
                .prop_flat_map(|(head, wide)| (Just(head), ring(head, 400, if wide { u64::MAX } else { 0xFFFF }), Just(wide)))
        ) {
            let counter = CounterSnapshot::Rolling { head, wide, buckets };
            let varints = snapshot_encoding().serialize(&counter).expect("encoding");
            prop_assert_eq!(snapshot_encoding().deserialize(&varints).ok(), Some(counter.clone()));
            prop_assert_eq!(decoded(&encoded(&counter)), Ok(counter));
        }

        #[test]
        fn varints_read_back_as_written(values in proptest::collection::vec(any::<u64>(), 0..32)) {
            let mut bytes = Vec::new();
            for &value in &values {
                write_varint(&mut bytes, value);
            }
            let mut at = 0;
            let mut read = Vec::new();
            while at < bytes.len() {
                read.push(read_varint(&bytes, &mut at).expect("a varint"));
            }
            prop_assert_eq!(read, values);
        }

        /// Whatever the bytes, decoding gives a counter or an error, never a panic.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(mut bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            bytes.splice(0..0, ROLLING_PACKED.to_le_bytes());
            let _ = decoded(&bytes);
        }
    }

    /// The decoded buckets take the memory they need, whatever their counts' size: the
    /// decoded snapshot holds them until every key is restored.
    #[test]
    fn packed_buckets_decode_into_a_list_of_their_own_length() {
        let head = 19_600_000;
        for count in [1, 300, 70_000, 1 << 31] {
            let counter = CounterSnapshot::Rolling {
                head,
                wide: true,
                buckets: (head - 199..=head).map(|epoch| (epoch, count)).collect(),
            };
            let bytes = snapshot_encoding().serialize(&counter).expect("encoding");
            let decoded: CounterSnapshot =
                snapshot_encoding().deserialize(&bytes).expect("decoding");
            let CounterSnapshot::Rolling { buckets, .. } = &decoded else {
                unreachable!("a rolling counter");
            };
            assert_eq!(decoded, counter);
            assert_eq!(buckets.capacity(), buckets.len(), "counts of {count}");
        }
    }

    #[test]
    fn a_bucket_of_a_request_window_takes_two_bytes_not_sixteen() {
        let head = 19_600_000; // 2025 in 90-second buckets
        let buckets: Vec<(u64, u64)> = (head - 199..=head).map(|epoch| (epoch, 37)).collect();
        let counter = CounterSnapshot::Rolling {
            head,
            wide: false,
            buckets,
        };
        let plain = CounterWireForTest::Rolling {
            head,
            wide: false,
            buckets: match &counter {
                CounterSnapshot::Rolling { buckets, .. } => buckets.clone(),
                CounterSnapshot::Calendar { .. } => unreachable!(),
            },
        };
        let (packed, plain) = (encoded(&counter), bincode::serialize(&plain).unwrap());
        // Variant, head, wide, the byte string's length: 4 + 8 + 1 + 8; then 2 bytes a bucket,
        // and one more for the first's distance below the head (199: two varint bytes).
        assert_eq!(packed.len(), 21 + 1 + 200 * 2);
        assert_eq!(plain.len(), 21 + 200 * 16);
        // As format 4 writes it, in varints: variant 1 byte, head 5, wide 1, length 3.
        let varints = snapshot_encoding().serialize(&counter).unwrap();
        assert_eq!(varints.len(), 10 + 1 + 200 * 2);
    }

    /// Format 3's counters, as its builds wrote them (serde's derive, in this variant order).
    #[derive(Serialize)]
    #[serde(rename = "CounterSnapshot")]
    enum CounterWireForTest {
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

    #[test]
    fn a_format_3_counter_still_reads() {
        let rolling = CounterWireForTest::Rolling {
            head: 1_000,
            wide: true,
            buckets: vec![(800, 5), (999, 1 << 40)],
        };
        assert_eq!(
            decoded(&bincode::serialize(&rolling).unwrap()),
            Ok(CounterSnapshot::Rolling {
                head: 1_000,
                wide: true,
                buckets: vec![(800, 5), (999, 1 << 40)],
            })
        );
        // What this build writes as format 3 is what format 3 wrote, and only while asked.
        let snapshot = CounterSnapshot::Rolling {
            head: 1_000,
            wide: true,
            buckets: vec![(800, 5), (999, 1 << 40)],
        };
        assert_eq!(
            in_format_3(|| encoded(&snapshot)),
            bincode::serialize(&rolling).unwrap()
        );
        assert_ne!(encoded(&snapshot), bincode::serialize(&rolling).unwrap());
        let calendar = CounterWireForTest::Calendar {
            period: 20_000,
            count: 7,
        };
        let expected = CounterSnapshot::Calendar {
            period: 20_000,
            count: 7,
        };
        assert_eq!(
            decoded(&bincode::serialize(&calendar).unwrap()),
            Ok(expected.clone())
        );
        // A calendar counter's bytes did not change.
        assert_eq!(encoded(&expected), bincode::serialize(&calendar).unwrap());
    }

    #[test]
    fn buckets_out_of_their_ring_are_refused_when_written_and_when_read() {
        for buckets in [
            vec![(1_001, 1)],       // above the head
            vec![(10, 1), (10, 2)], // a bucket twice
            vec![(10, 1), (9, 2)],  // descending
        ] {
            let counter = CounterSnapshot::Rolling {
                head: 1_000,
                wide: false,
                buckets: buckets.clone(),
            };
            let error = bincode::serialize(&counter).unwrap_err().to_string();
            assert!(error.contains("not after"), "{buckets:?}: {error}");
        }
        let packed = |pairs: &[(u64, u64)]| {
            let mut body = Vec::new();
            for &(gap, count) in pairs {
                write_varint(&mut body, gap);
                write_varint(&mut body, count);
            }
            let mut bytes = ROLLING_PACKED.to_le_bytes().to_vec();
            bytes.extend(1_000u64.to_le_bytes());
            bytes.push(0);
            bytes.extend((body.len() as u64).to_le_bytes());
            bytes.extend(body);
            bytes
        };
        assert_eq!(
            decoded(&packed(&[(1, 3), (1, 4)])),
            Ok(CounterSnapshot::Rolling {
                head: 1_000,
                wide: false,
                buckets: vec![(999, 3), (1_000, 4)],
            })
        );
        let below = decoded(&packed(&[(1_001, 3)])).unwrap_err();
        assert!(
            below.contains("rolling bucket 0 is 1001 from the head"),
            "{below}"
        );
        let above = decoded(&packed(&[(1, 3), (2, 4)])).unwrap_err();
        assert!(
            above.contains("rolling bucket 1 is 2 from the one before it"),
            "{above}"
        );
        let repeated = decoded(&packed(&[(5, 3), (0, 4)])).unwrap_err();
        assert!(repeated.contains("rolling bucket 1 is 0"), "{repeated}");
        // A varint cut short, and one of eleven bytes.
        let mut cut = packed(&[(1, 300)]);
        cut.pop();
        let last = cut.len() - 21;
        cut[13..21].copy_from_slice(&(last as u64).to_le_bytes());
        let error = decoded(&cut).unwrap_err();
        assert!(error.contains("runs past the end"), "{error}");
        let mut long = packed(&[]);
        long.truncate(13);
        long.extend(12u64.to_le_bytes());
        long.extend([0x80; 11]);
        long.push(0);
        let error = decoded(&long).unwrap_err();
        assert!(error.contains("longer than 10 bytes"), "{error}");
        let mut top = Vec::new();
        write_varint(&mut top, u64::MAX);
        assert_eq!(top.len(), MAX_VARINT_BYTES);
        *top.last_mut().unwrap() = 0x02;
        assert_eq!(read_varint(&top, &mut 0), Err("a varint overflows 64 bits"));
    }
}
