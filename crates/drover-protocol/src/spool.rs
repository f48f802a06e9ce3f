//! The spool's on-disk record format: how the agent writes the readings of one append to a
//! segment file, and how it reads them back after a crash.
//!
//! This is local disk, not the wire: it favours simple framing and cheap checks over the last
//! byte (the wire format is the batch format's business). It lives here because it is a byte
//! format, and every byte format has one home, with golden vectors and a fuzz target.
//!
//! A segment file starts with [`SEGMENT_HEADER`] (`DRSPOOL` and the format version, 1), then
//! holds records back to back:
//!
//! ```text
//! offset  size  field
//! 0       4     body length n, u32 little-endian (MIN_BODY_BYTES ..= MAX_BODY_BYTES)
//! 4       4     CRC-32 (IEEE) of bytes 0..4 and the body, u32 little-endian
//! 8       n     body:
//!                 id             varint   the record ID: increasing by 1, never reused
//!                 first_reading  varint   readings appended before this record (its first
//!                                         reading's number), so a lost record's readings
//!                                         can still be counted from its neighbours
//!                 count          varint   1 ..= MAX_RECORD_READINGS
//!                 meters         varint m, then m × (length u8, ID bytes), in order of first
//!                                use; every one used
//!                 count × reading:
//!                   meter        varint   index into meters (at most one past the highest
//!                                         index used so far)
//!                   channel      u8       Channel code
//!                   ts           zigzag varint: the first reading's Unix ms, then the
//!                                difference from the previous reading's (wrapping)
//!                   value        zigzag varint
//!                   scale        i8
//!                   clock        u8       ClockState code
//! ```
//!
//! Varints are LEB128 (7 bits a byte, least significant first) in their shortest form;
//! zigzag maps 0, -1, 1, -2 ... to 0, 1, 2, 3 .... Every field has exactly one encoding, so
//! a record that decodes re-encodes to the same bytes.
//!
//! [`decode_record`] never panics: a record cut short (a torn write at the end of a file after
//! a power cut) is [`RecordError::Truncated`]; anything else that does not add up is another
//! [`RecordError`].
//!
//! ```
//! use drover_protocol::reading::{Channel, ClockState, MeterId, Reading};
//! use drover_protocol::spool::{decode_record, encode_record};
//!
//! let reading = Reading {
//!     meter: MeterId::parse("sim-1").unwrap(),
//!     channel: Channel::Power,
//!     ts_ms: 1_700_000_000_000,
//!     value: 1234,
//!     scale: 0,
//!     clock: ClockState::Synced,
//! };
//! let mut bytes = Vec::new();
//! encode_record(7, 40, std::slice::from_ref(&reading), &mut bytes).unwrap();
//! let (record, used) = decode_record(&bytes).unwrap();
//! assert_eq!((record.id, record.first_reading, used), (7, 40, bytes.len()));
//! assert_eq!(record.readings, [reading]);
//! assert!(decode_record(&bytes[..used - 1]).is_err());
//! ```

use crate::reading::{Channel, ClockState, MeterId, Reading};

/// The first bytes of every segment file: a magic string and the format version.
pub const SEGMENT_HEADER: [u8; 8] = *b"DRSPOOL\x01";
/// The bytes before a record's body: its length and its checksum.
pub const RECORD_HEADER_BYTES: usize = 8;
/// The most readings one record holds.
pub const MAX_RECORD_READINGS: usize = 16_384;
/// The smallest possible body: an ID, a first reading number, a count, one meter, one
/// reading.
pub const MIN_BODY_BYTES: usize = 1 + 1 + 1 + 1 + 2 + 6;
/// The largest body a decoder accepts: more than [`MAX_RECORD_READINGS`] readings of the
/// largest size, each with its own longest meter ID, can take.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// One append's readings, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record ID: one more than the previous record's.
    pub id: u64,
    /// How many readings were appended before this record: the number of its first reading.
    pub first_reading: u64,
    /// The readings, in the order they were appended (never empty).
    pub readings: Vec<Reading>,
}

impl Record {
    /// The number one past this record's last reading (`first_reading + readings.len()`).
    pub fn end_reading(&self) -> u64 {
        self.first_reading
            .saturating_add(self.readings.len() as u64)
    }
}

/// Why readings could not be encoded as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A record holds at least one reading.
    #[error("a spool record needs at least one reading")]
    Empty,
    /// More readings than [`MAX_RECORD_READINGS`].
    #[error("a spool record holds at most {MAX_RECORD_READINGS} readings (got {0})")]
    TooManyReadings(usize),
}

/// Why bytes are not a valid record or segment header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The bytes end before the record (or header) does: a torn write.
    #[error("truncated: the record needs {needed} bytes, {available} are there")]
    Truncated {
        /// Bytes the record needs (as far as its header tells).
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// The length field is outside `MIN_BODY_BYTES ..= MAX_BODY_BYTES` (zeros or garbage).
    #[error("bad record length {0}")]
    BadLength(u32),
    /// The checksum does not match: the record was damaged.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// The checksum in the record.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// The checksum matches but the body does not parse.
    #[error("malformed record body: {0}")]
    Malformed(&'static str),
    /// The file does not start with [`SEGMENT_HEADER`].
    #[error("not a spool segment (bad magic)")]
    BadMagic,
    /// The segment was written by a format version this build does not read.
    #[error("unsupported spool format version {0}")]
    UnsupportedVersion(u8),
}

/// Checks a segment file's first bytes.
pub fn check_segment_header(bytes: &[u8]) -> Result<(), RecordError> {
    let Some(head) = bytes.get(..SEGMENT_HEADER.len()) else {
        return Err(RecordError::Truncated {
            needed: SEGMENT_HEADER.len(),
            available: bytes.len(),
        });
    };
    let (magic, version) = head.split_at(SEGMENT_HEADER.len() - 1);
    if magic != &SEGMENT_HEADER[..SEGMENT_HEADER.len() - 1] {
        return Err(RecordError::BadMagic);
    }
    if version != &SEGMENT_HEADER[SEGMENT_HEADER.len() - 1..] {
        return Err(RecordError::UnsupportedVersion(version[0]));
    }
    Ok(())
}

/// Appends the record for `readings` to `out`. On error nothing is appended.
pub fn encode_record(
    id: u64,
    first_reading: u64,
    readings: &[Reading],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if readings.is_empty() {
        return Err(EncodeError::Empty);
    }
    if readings.len() > MAX_RECORD_READINGS {
        return Err(EncodeError::TooManyReadings(readings.len()));
    }
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    put_varint(out, id);
    put_varint(out, first_reading);
    put_varint(out, readings.len() as u64);

    // The meter table, in order of first use; each reading then names its meter by index.
    let mut meters: Vec<&str> = Vec::new();
    let mut indices = Vec::with_capacity(readings.len());
    for reading in readings {
        let id = reading.meter.as_str();
        // Readings of one append mostly share a meter, so the last one is tried first.
        let index = match meters.iter().rposition(|m| *m == id) {
            Some(index) => index,
            None => {
                meters.push(id);
                meters.len() - 1
            }
        };
        indices.push(index);
    }
    put_varint(out, meters.len() as u64);
    for meter in &meters {
        // Meter IDs are 1 to 64 bytes (MeterId's invariant), so the length fits a byte.
        out.push(meter.len() as u8);
        out.extend_from_slice(meter.as_bytes());
    }
    let mut previous_ts = 0i64;
    for (reading, index) in readings.iter().zip(indices) {
        put_varint(out, index as u64);
        out.push(reading.channel.code());
        put_varint(out, zigzag(reading.ts_ms.wrapping_sub(previous_ts)));
        previous_ts = reading.ts_ms;
        put_varint(out, zigzag(reading.value));
        out.push(reading.scale as u8);
        out.push(reading.clock as u8);
    }

    // The body cannot exceed MAX_BODY_BYTES: see its definition.
    let body_len = (out.len() - start - RECORD_HEADER_BYTES) as u32;
    let len_bytes = body_len.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(&out[start + RECORD_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + 8].copy_from_slice(&crc.finalize().to_le_bytes());
    Ok(())
}

/// Decodes the record at the start of `bytes`; returns it and how many bytes it took.
pub fn decode_record(bytes: &[u8]) -> Result<(Record, usize), RecordError> {
    let truncated = |needed| RecordError::Truncated {
        needed,
        available: bytes.len(),
    };
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<4>() else {
        return Err(truncated(RECORD_HEADER_BYTES));
    };
    let len = u32::from_le_bytes(*len_bytes);
    let body_len = len as usize;
    if !(MIN_BODY_BYTES..=MAX_BODY_BYTES).contains(&body_len) {
        return Err(RecordError::BadLength(len));
    }
    let total = RECORD_HEADER_BYTES + body_len;
    let Some((crc_bytes, rest)) = rest.split_first_chunk::<4>() else {
        return Err(truncated(total));
    };
    let Some(body) = rest.get(..body_len) else {
        return Err(truncated(total));
    };
    let stored = u32::from_le_bytes(*crc_bytes);
    let mut crc = crc32fast::Hasher::new();
    crc.update(len_bytes);
    crc.update(body);
    let computed = crc.finalize();
    if stored != computed {
        return Err(RecordError::BadChecksum { stored, computed });
    }
    let record = decode_body(body).map_err(RecordError::Malformed)?;
    Ok((record, total))
}

fn decode_body(body: &[u8]) -> Result<Record, &'static str> {
    let mut r = Reader { bytes: body };
    let id = r.varint()?;
    let first_reading = r.varint()?;
    let count = usize::try_from(r.varint()?).map_err(|_| "reading count too large")?;
    if count == 0 {
        return Err("no readings");
    }
    if count > MAX_RECORD_READINGS {
        return Err("too many readings");
    }
    let meter_count = usize::try_from(r.varint()?).map_err(|_| "meter count too large")?;
    if meter_count == 0 || meter_count > count {
        return Err("meter count out of range");
    }
    let mut meters: Vec<MeterId> = Vec::with_capacity(meter_count.min(r.bytes.len() / 2));
    for _ in 0..meter_count {
        let len = usize::from(r.byte()?);
        let text = std::str::from_utf8(r.take(len)?).map_err(|_| "meter ID is not UTF-8")?;
        let meter = MeterId::parse(text).map_err(|_| "invalid meter ID")?;
        if meters.contains(&meter) {
            return Err("meter listed twice");
        }
        meters.push(meter);
    }
    // Each reading takes at least 6 bytes, which bounds what a lying count can allocate.
    let mut readings = Vec::with_capacity(count.min(r.bytes.len() / 6));
    let mut used = 0usize;
    let mut ts = 0i64;
    for _ in 0..count {
        let index = usize::try_from(r.varint()?).map_err(|_| "meter index too large")?;
        if index > used || index >= meters.len() {
            return Err("meter index out of order or range");
        }
        if index == used {
            used += 1;
        }
        let channel = Channel::from_code(r.byte()?).ok_or("unknown channel")?;
        ts = ts.wrapping_add(unzigzag(r.varint()?));
        let value = unzigzag(r.varint()?);
        let scale = r.byte()? as i8;
        let clock = ClockState::from_code(r.byte()?).ok_or("unknown clock state")?;
        readings.push(Reading {
            meter: meters[index].clone(),
            channel,
            ts_ms: ts,
            value,
            scale,
            clock,
        });
    }
    if used != meters.len() {
        return Err("a listed meter is not used");
    }
    if !r.bytes.is_empty() {
        return Err("bytes after the last reading");
    }
    Ok(Record {
        id,
        first_reading,
        readings,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, &'static str> {
        let (&first, rest) = self.bytes.split_first().ok_or("body ends early")?;
        self.bytes = rest;
        Ok(first)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.bytes.len() < n {
            return Err("body ends early");
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// A canonical (shortest-form) LEB128 u64.
    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("varint overflows 64 bits");
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                if byte == 0 && shift > 0 {
                    return Err("varint not in shortest form");
                }
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes")
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn reading(meter: &str, channel: Channel, ts_ms: i64, value: i64) -> Reading {
        Reading {
            meter: MeterId::parse(meter).unwrap(),
            channel,
            ts_ms,
            value,
            scale: 0,
            clock: ClockState::Synced,
        }
    }

    fn encode(id: u64, first: u64, readings: &[Reading]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(id, first, readings, &mut out).unwrap();
        out
    }

    /// A poll of one meter: energy and power at the same instant, then a second meter.
    fn golden_readings() -> Vec<Reading> {
        let mut voltage = reading("m2", Channel::VoltageL1, 1_700_000_000_500, 2301);
        voltage.scale = -1;
        voltage.clock = ClockState::Unsynced;
        vec![
            reading("m1", Channel::EnergyImport, 1_700_000_000_000, 123_456),
            reading("m1", Channel::Power, 1_700_000_000_000, -70),
            voltage,
        ]
    }

    #[test]
    fn golden_vector() {
        let bytes = encode(300, 5, &golden_readings());
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            // body length 39, CRC-32 0xc9ad6708 (zlib.crc32 of these 4 bytes and the body)
            39, 0, 0, 0, 0x08, 0x67, 0xad, 0xc9,
            // id 300, first reading 5, 3 readings
            0xac, 0x02, 5, 3,
            // 2 meters: "m1", "m2"
            2, 2, b'm', b'1', 2, b'm', b'2',
            // m1, energy_import, ts 1_700_000_000_000 (zigzag), 123456 (zigzag), scale 0, synced
            0, 1, 0x80, 0xa0, 0xab, 0xfe, 0xf9, 0x62, 0x80, 0x89, 0x0f, 0, 0,
            // m1, power, ts +0, -70, scale 0, synced
            0, 3, 0, 0x8b, 0x01, 0, 0,
            // m2, voltage_l1, ts +500, 2301, scale -1, unsynced
            1, 4, 0xe8, 0x07, 0xfa, 0x23, 0xff, 1,
        ];
        assert_eq!(bytes, expected);
        let (record, used) = decode_record(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(record.id, 300);
        assert_eq!(record.first_reading, 5);
        assert_eq!(record.end_reading(), 8);
        assert_eq!(record.readings, golden_readings());
    }

    #[test]
    fn segment_header() {
        assert_eq!(check_segment_header(b"DRSPOOL\x01rest"), Ok(()));
        assert_eq!(
            check_segment_header(b"DRSPOOL\x02"),
            Err(RecordError::UnsupportedVersion(2))
        );
        assert_eq!(
            check_segment_header(b"\0\0\0\0\0\0\0\0"),
            Err(RecordError::BadMagic)
        );
        assert!(matches!(
            check_segment_header(b"DRSP"),
            Err(RecordError::Truncated {
                needed: 8,
                available: 4
            })
        ));
    }

    fn arb_reading() -> impl Strategy<Value = Reading> {
        let meters = vec![
            "m-0",
            "m-1",
            "modbus-12345678",
            "s0:heat.pump_1",
            &"x".repeat(64),
        ]
        .into_iter()
        .map(|m| MeterId::parse(m).unwrap())
        .collect::<Vec<_>>();
        (
            prop::sample::select(meters),
            prop::sample::select(crate::reading::CHANNELS.to_vec()),
            prop_oneof![
                4 => (0i64..1_000_000).prop_map(|d| 1_700_000_000_000 + d),
                1 => any::<i64>(),
                1 => Just(i64::MIN),
                1 => Just(i64::MAX),
            ],
            prop_oneof![
                4 => -100i64..100,
                2 => any::<i64>(),
                1 => Just(i64::MIN),
                1 => Just(i64::MAX),
            ],
            any::<i8>(),
            prop::sample::select(vec![
                ClockState::Synced,
                ClockState::Unsynced,
                ClockState::Unknown,
            ]),
        )
            .prop_map(|(meter, channel, ts_ms, value, scale, clock)| Reading {
                meter,
                channel,
                ts_ms,
                value,
                scale,
                clock,
            })
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(arb_reading(), 1..40),
        )
            .prop_map(|(id, first_reading, readings)| Record {
                id,
                first_reading,
                readings,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Records back to back, as a segment holds them, decode one by one to what was
        /// encoded, and re-encode to the same bytes.
        #[test]
        fn records_round_trip_back_to_back(records in prop::collection::vec(arb_record(), 1..5)) {
            let mut bytes = Vec::new();
            for r in &records {
                encode_record(r.id, r.first_reading, &r.readings, &mut bytes).unwrap();
            }
            let mut rest = &bytes[..];
            for want in records {
                let (got, used) = decode_record(rest).unwrap();
                prop_assert_eq!(&got, &want);
                prop_assert_eq!(encode(got.id, got.first_reading, &got.readings), &rest[..used]);
                rest = &rest[used..];
            }
            prop_assert!(rest.is_empty());
        }
    }

    #[test]
    fn every_cut_of_a_record_is_truncated() {
        let bytes = encode(1, 0, &golden_readings());
        for cut in 0..bytes.len() {
            let err = decode_record(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, RecordError::Truncated { .. }), "{cut}: {err}");
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode(9, 99, &golden_readings());
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            // A flipped length bit may also read as a longer, truncated record.
            assert!(decode_record(&damaged).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn zeros_and_garbage_are_refused() {
        assert_eq!(
            decode_record(&[0; 64]).unwrap_err(),
            RecordError::BadLength(0)
        );
        assert_eq!(
            decode_record(&[0xff; 64]).unwrap_err(),
            RecordError::BadLength(u32::MAX)
        );
    }

    /// Wraps a body in a valid header, so that the body's own checks are reached.
    fn framed(body: &[u8]) -> Vec<u8> {
        let len = (body.len() as u32).to_le_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&len);
        crc.update(body);
        let mut out = len.to_vec();
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn bodies_that_do_not_add_up_are_malformed() {
        let reading = [0u8, 3, 0, 0, 0, 0];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                [&[1, 0, 0, 1, 1, b'm'][..], &reading[..]].concat(),
                "no readings",
            ),
            (
                [&[1, 0, 1, 2, 1, b'm', 1, b'n'][..], &reading].concat(),
                "meter count",
            ),
            (
                [&[1, 0, 2, 2, 1, b'm', 1, b'm'][..], &reading, &reading].concat(),
                "twice",
            ),
            (
                [&[1, 0, 2, 2, 1, b'm', 1, b'n'][..], &reading, &reading].concat(),
                "not used",
            ),
            (
                [&[1, 0, 1, 1, 1, b'/'][..], &reading].concat(),
                "invalid meter",
            ),
            (
                [&[1, 0, 1, 1, 1, b'm'][..], &[0, 99, 0, 0, 0, 0]].concat(),
                "channel",
            ),
            (
                [&[1, 0, 1, 1, 1, b'm'][..], &[0, 3, 0, 0, 0, 7]].concat(),
                "clock",
            ),
            (
                [&[1, 0, 1, 1, 1, b'm'][..], &[1, 3, 0, 0, 0, 0]].concat(),
                "meter index",
            ),
            (
                [&[1, 0, 1, 1, 1, b'm'][..], &reading, &[0]].concat(),
                "after the last",
            ),
            (
                [&[0x81, 0, 0, 1, 1, 1, b'm'][..], &reading].concat(),
                "shortest form",
            ),
            (
                [&[1, 0, 1, 1, 9, b'm'][..], &reading].concat(),
                "ends early",
            ),
        ];
        for (body, why) in cases {
            match decode_record(&framed(&body)) {
                Err(RecordError::Malformed(m)) => assert!(m.contains(why), "{why}: {m}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn varints_at_the_limits() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut r = Reader { bytes: &out };
            assert_eq!(r.varint(), Ok(value));
            assert!(r.bytes.is_empty());
        }
        let overflow = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(Reader { bytes: &overflow }.varint().is_err());
        for value in [0, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(value)), value);
        }
    }

    #[test]
    fn encoding_refuses_empty_and_oversized_appends() {
        let mut out = vec![7];
        assert_eq!(encode_record(1, 0, &[], &mut out), Err(EncodeError::Empty));
        let many = vec![golden_readings()[0].clone(); MAX_RECORD_READINGS + 1];
        assert_eq!(
            encode_record(1, 0, &many, &mut out),
            Err(EncodeError::TooManyReadings(MAX_RECORD_READINGS + 1))
        );
        assert_eq!(out, [7], "nothing appended on error");
    }

    #[test]
    fn the_largest_record_fits_the_length_limit() {
        let readings: Vec<Reading> = (0..MAX_RECORD_READINGS)
            .map(|i| Reading {
                meter: MeterId::parse(&format!("{i:064}")).unwrap(),
                channel: Channel::Pulses,
                ts_ms: if i % 2 == 0 { i64::MIN } else { i64::MAX },
                value: i64::MIN,
                scale: -128,
                clock: ClockState::Unknown,
            })
            .collect();
        let bytes = encode(u64::MAX, u64::MAX, &readings);
        assert!(bytes.len() - RECORD_HEADER_BYTES <= MAX_BODY_BYTES);
        assert_eq!(decode_record(&bytes).unwrap().0.readings, readings);
    }
}
