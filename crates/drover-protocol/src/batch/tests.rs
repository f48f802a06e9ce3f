//! Batch-level tests: the golden vector, round trips, every error path, and the size budget.

use proptest::prelude::*;

use super::bits::BitWriter;
use super::*;
use crate::reading::{CHANNELS, Channel, MeterId};

pub(super) fn device() -> DeviceId {
    DeviceId::parse("k3x9m2p7qa").unwrap()
}

/// Two meters, a clock that got synced after the first poll, and a power reading that failed
/// in the second poll: the example annotated in docs/protocol.md.
pub(super) fn golden_batch() -> Batch {
    let t0 = 1_780_000_000_000;
    let meter = MeterId::parse("modbus-12345678").unwrap();
    let heat_pump = MeterId::parse("s0-heatpump").unwrap();
    let r = |meter: &MeterId, channel, ts_ms, value, scale, clock| Reading {
        meter: meter.clone(),
        channel,
        ts_ms,
        value,
        scale,
        clock,
    };
    use ClockState::{Synced, Unsynced};
    Batch {
        device: device(),
        seq: 7,
        readings: vec![
            r(&meter, Channel::EnergyImport, t0, 12_345_678, 0, Unsynced),
            r(&meter, Channel::Power, t0, 23_411, -1, Unsynced),
            r(
                &meter,
                Channel::EnergyImport,
                t0 + 2001,
                12_345_679,
                0,
                Synced,
            ),
            // The power reading of this poll failed.
            r(
                &meter,
                Channel::EnergyImport,
                t0 + 4003,
                12_345_681,
                0,
                Synced,
            ),
            r(&meter, Channel::Power, t0 + 4003, 23_456, -1, Synced),
            r(&heat_pump, Channel::Pulses, t0 + 1000, 1234, 0, Synced),
        ],
    }
}

/// The golden batch's frame. A change here is a format change: bump [`FORMAT_VERSION`] or
/// explain why old hubs still read it, and update docs/protocol.md.
const GOLDEN: &str = "0124a7578cc70f850002f4e79c1122000ebde30a7534c4005fd101406062f185380870354947db730d6857360b7465c3d3875dbc3c4afa01725cd200b50d2263";

/// The fields of a batch's body with their bit offsets and lengths, as in the annotated example
/// in docs/protocol.md.
pub(super) fn annotate(batch: &Batch) -> String {
    fields(&frame::encode_body(batch, None).unwrap().0)
}

/// The fields an encoder wrote, one per line: bit offset, length and what it is.
pub(super) fn fields(body: &BitWriter) -> String {
    let total = body.bit_len();
    let trace = &body.trace;
    let mut out = String::new();
    for (i, (at, what)) in trace.iter().enumerate() {
        let end = trace.get(i + 1).map_or(total, |next| next.0);
        out += &format!("{at:>5} {:>4}  {what}\n", end - at);
    }
    out
}

pub(super) fn hex(bytes: &[u8]) -> String {
    crate::ids::to_hex(bytes)
}

pub(super) fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// A frame around a hand-written body, with a correct checksum.
pub(super) fn seal(version: u8, body: BitWriter) -> Vec<u8> {
    let mut frame = vec![version];
    frame.extend(body.finish());
    let crc = crc32fast::hash(&frame);
    frame.extend(crc.to_le_bytes());
    frame
}

/// A body that starts like a real one: device "a", seq 0, base time 0.
fn header() -> BitWriter {
    let mut w = BitWriter::default();
    w.bits(6, 0);
    w.bits(6, 0);
    w.uv(0);
    w.sv(0);
    w
}

/// A header and one meter "m" with one timestamp column of `rows` rows, all synced, up to the
/// first series (channel code `channel`).
fn one_meter(rows: u64, channel: u8) -> BitWriter {
    let mut w = header();
    w.ue(1); // one meter
    w.bits(1, 0); // text ID
    w.bits(6, 0);
    w.bits(7, u64::from(b'm'));
    w.ue(0); // one timestamp column
    w.ue(0); // one series
    w.ue(rows - 1);
    w.ue(0); // one clock run
    w.bits(2, 0);
    w.bits(2, 1); // delta predictor
    w.sv(0);
    if rows > 1 {
        w.bits(2, 0); // packed, every delta 1000
        w.sv(1000);
        w.bits(7, 0);
    }
    w.bits(8, u64::from(channel));
    w
}

#[test]
fn the_golden_batch_encodes_to_the_golden_bytes_and_back() {
    let batch = golden_batch();
    let frame = encode(&batch).unwrap();
    assert_eq!(
        hex(&frame),
        GOLDEN,
        "the batch format changed; the fields are now:\n{}",
        annotate(&batch)
    );
    assert_eq!(decode(&unhex(GOLDEN)).unwrap(), batch.canonical());
}

#[test]
fn the_protocol_page_shows_the_golden_vector() {
    let page = include_str!("../../../../docs/protocol.md");
    let spaced: String = page.split_whitespace().collect();
    assert!(
        spaced.contains(GOLDEN),
        "docs/protocol.md must show the golden frame {GOLDEN} (annotated:\n{})",
        annotate(&golden_batch())
    );
}

#[test]
fn the_order_of_readings_does_not_change_the_bytes() {
    let batch = golden_batch();
    let mut reversed = batch.clone();
    reversed.readings.reverse();
    assert_eq!(encode(&reversed).unwrap(), encode(&batch).unwrap());
}

#[test]
fn an_empty_batch_round_trips() {
    let batch = Batch {
        device: device(),
        seq: u64::MAX,
        readings: vec![],
    };
    assert_eq!(decode(&encode(&batch).unwrap()).unwrap(), batch);
}

/// The signal of telemetry-anchors §2.3 in 1-minute, 5-minute and 1-hour batches. The limits
/// are the sizes measured when the format was made, plus about 1 %: a change that makes the
/// format bigger fails here. The all-in figures add, per request and upstream, one TLS 1.3
/// record (22 B), TCP/IPv4 with timestamps (52 B per 1448-byte segment) and the HTTP request
/// head (a minimal HTTP/1.1 head with a bearer token ≈ 120 B; HTTP/2 with HPACK ≈ 20 B).
#[test]
fn payload_bytes_per_point_stay_under_the_measured_budget() {
    let all_in = |payload: usize, http: usize| {
        let tls = payload + http + 22;
        tls + 52 * tls.div_ceil(1448)
    };
    for (polls, limit) in [(30usize, 107usize), (60, 165), (150, 335), (1800, 3600)] {
        let readings = synthetic::solar_meter(7, polls);
        let points = readings.len();
        let batch = Batch {
            device: device(),
            seq: 123_456,
            readings,
        };
        let frame = encode(&batch).unwrap();
        assert_eq!(decode(&frame).unwrap(), batch.canonical());
        let per_point = |bytes: usize| bytes as f64 / points as f64;
        println!(
            "{polls:>4} points per series: payload {:>4} B = {:.3} B/pt; all-in {:.2} B/pt over HTTP/1.1, {:.2} over HTTP/2",
            frame.len(),
            per_point(frame.len()),
            per_point(all_in(frame.len(), 120)),
            per_point(all_in(frame.len(), 20)),
        );
        assert!(
            frame.len() <= limit,
            "{polls} polls: {} B, budget {limit} B; fields:\n{}",
            frame.len(),
            annotate(&batch)
        );
    }
}

#[test]
fn a_channel_that_failed_in_some_polls_keeps_sharing_the_timestamps() {
    let full = synthetic::solar_meter(3, 150);
    let mut gappy = full.clone();
    // Drop the power reading of every tenth poll.
    let mut poll = 0;
    gappy.retain(|r| {
        let keep = r.channel != Channel::Power || poll % 10 != 0;
        if r.channel == Channel::VoltageL1 {
            poll += 1;
        }
        keep
    });
    let size = |readings: Vec<Reading>| {
        let batch = Batch {
            device: device(),
            seq: 1,
            readings,
        };
        let frame = encode(&batch).unwrap();
        assert_eq!(decode(&frame).unwrap(), batch.canonical());
        frame.len()
    };
    let (full, gappy) = (size(full), size(gappy));
    // 15 fewer power readings (≈ 13 B) against a few bytes of presence runs.
    assert!(gappy <= full + 8, "{gappy} B with gaps, {full} B without");
}

#[test]
fn series_polled_on_different_schedules_get_their_own_timestamps() {
    let meter = MeterId::parse("modbus-7").unwrap();
    let reading = |channel, ts_ms, value| Reading {
        meter: meter.clone(),
        channel,
        ts_ms,
        value,
        scale: 0,
        clock: ClockState::Synced,
    };
    let mut readings = vec![];
    for i in 0..150 {
        readings.push(reading(Channel::Power, i * 2000 + i % 3, 1000 + i % 7));
        if i % 30 == 0 {
            readings.push(reading(Channel::EnergyImport, i * 2000 + 1000, 5000 + i));
        }
    }
    let batch = Batch {
        device: device(),
        seq: 1,
        readings,
    };
    let body = frame::encode_body(&batch, None).unwrap().0;
    assert!(
        body.trace
            .iter()
            .any(|(_, f)| f == "timestamp columns − 1: ue 1"),
        "{}",
        annotate(&batch)
    );
    assert_eq!(decode(&encode(&batch).unwrap()).unwrap(), batch.canonical());
}

// Round trips of arbitrary batches.

fn meter_id() -> impl Strategy<Value = MeterId> {
    prop_oneof![
        Just("modbus-12345678".to_string()),
        Just("modbus-0".to_string()),
        Just("modbus-18446744073709551615".to_string()),
        // Not canonical decimal, or too big for a u64: these travel as text.
        Just("modbus-007".to_string()),
        Just("modbus-18446744073709551616".to_string()),
        Just("s0-heatpump".to_string()),
        "[A-Za-z0-9._:-]{1,64}",
    ]
    .prop_map(|text| MeterId::parse(&text).unwrap())
}

fn timestamp() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => (0i64..60).prop_map(|i| 1_780_000_000_000 + i * 2000),
        2 => -5_000i64..5_000,
        1 => any::<i64>(),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
    ]
}

fn value() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => -100i64..100,
        2 => 12_345_000i64..12_346_000,
        2 => any::<i64>(),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
    ]
}

fn clock() -> impl Strategy<Value = ClockState> {
    prop_oneof![
        6 => Just(ClockState::Synced),
        1 => Just(ClockState::Unsynced),
        1 => Just(ClockState::Unknown),
    ]
}

/// Readings in no particular structure: any meter, channel, time, value, scale and clock.
pub(super) fn loose_readings() -> impl Strategy<Value = Vec<Reading>> {
    let reading = (
        prop::sample::select(vec![0usize, 0, 0, 1, 2]),
        prop::sample::select(CHANNELS.to_vec()),
        timestamp(),
        value(),
        prop_oneof![4 => Just(-1i8), 2 => Just(0i8), 1 => any::<i8>()],
        clock(),
    );
    (
        prop::collection::vec(meter_id(), 3),
        prop::collection::vec(reading, 0..60),
    )
        .prop_map(|(meters, rows)| {
            rows.into_iter()
                .map(|(m, channel, ts_ms, value, scale, clock)| Reading {
                    meter: meters[m].clone(),
                    channel,
                    ts_ms,
                    value,
                    scale,
                    clock,
                })
                .collect()
        })
}

/// Readings as a meter produces them: polls that read several channels at one timestamp, with
/// jittered or jumping clocks, clock-state changes and failed channels.
pub(super) fn polled_readings() -> impl Strategy<Value = Vec<Reading>> {
    let poll = (
        prop_oneof![8 => 1990i64..2010, 1 => any::<i64>(), 1 => -100_000i64..0],
        clock(),
        prop::collection::vec((value(), prop::bool::weighted(0.9)), 3),
    );
    (meter_id(), timestamp(), prop::collection::vec(poll, 1..80)).prop_map(
        |(meter, start, polls)| {
            let channels = [Channel::EnergyImport, Channel::Power, Channel::VoltageL1];
            let mut ts_ms = start;
            let mut out = vec![];
            for (step, clock, values) in polls {
                ts_ms = ts_ms.wrapping_add(step);
                for (channel, (value, ok)) in channels.into_iter().zip(values) {
                    if ok {
                        out.push(Reading {
                            meter: meter.clone(),
                            channel,
                            ts_ms,
                            value,
                            scale: -1,
                            clock,
                        });
                    }
                }
            }
            out
        },
    )
}

fn batch(readings: impl Strategy<Value = Vec<Reading>>) -> impl Strategy<Value = Batch> {
    ("[a-z0-9_-]{1,64}", any::<u64>(), readings).prop_map(|(device, seq, readings)| Batch {
        device: DeviceId::parse(&device).unwrap(),
        seq,
        readings,
    })
}

fn check_round_trip(batch: &Batch) -> Result<(), TestCaseError> {
    let frame = encode(batch).unwrap();
    prop_assert_eq!(decode(&frame).unwrap(), batch.canonical());
    let mut shuffled = batch.clone();
    shuffled.readings.reverse();
    shuffled.readings.rotate_left(batch.readings.len() / 3);
    prop_assert_eq!(&encode(&shuffled).unwrap(), &frame);
    // The quick coder's frames read back the same, and are never smaller.
    let quick = encode_quick(batch).unwrap();
    prop_assert_eq!(decode(&quick).unwrap(), batch.canonical());
    prop_assert!(quick.len() >= frame.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn loose_batches_round_trip(batch in batch(loose_readings())) {
        check_round_trip(&batch)?;
    }

    #[test]
    fn polled_batches_round_trip(batch in batch(polled_readings())) {
        check_round_trip(&batch)?;
    }
}

// Every error.

#[test]
fn every_truncation_of_a_valid_frame_is_an_error() {
    for frame in [
        unhex(GOLDEN),
        encode(&Batch {
            device: device(),
            seq: 9,
            readings: synthetic::solar_meter(2, 30),
        })
        .unwrap(),
    ] {
        for len in 0..frame.len() {
            assert!(decode(&frame[..len]).is_err(), "cut at {len}");
        }
        assert!(matches!(
            decode(&frame[..3]),
            Err(BatchError::Truncated { offset: 3 })
        ));
    }
}

#[test]
fn every_flipped_bit_is_a_checksum_error() {
    let frame = unhex(GOLDEN);
    for bit in 0..frame.len() * 8 {
        let mut bad = frame.clone();
        bad[bit / 8] ^= 0x80 >> (bit % 8);
        assert!(
            matches!(decode(&bad), Err(BatchError::BadChecksum { .. })),
            "bit {bit}"
        );
    }
}

#[test]
fn a_body_cut_short_under_a_valid_checksum_is_truncated() {
    let frame = unhex(GOLDEN);
    let body = &frame[1..frame.len() - 4];
    for len in 0..body.len() {
        let mut w = BitWriter::default();
        for &b in &body[..len] {
            w.bits(8, u64::from(b));
        }
        let err = decode(&seal(FORMAT_VERSION, w)).unwrap_err();
        assert!(
            matches!(err, BatchError::Truncated { .. }),
            "{len}: {err:?}"
        );
    }
}

#[test]
fn other_versions_are_refused_after_the_checksum() {
    let mut w = BitWriter::default();
    w.bits(8, 0);
    assert_eq!(decode(&seal(3, w)), Err(BatchError::UnsupportedVersion(3)));
}

#[test]
fn device_ids_outside_the_alphabet_are_refused() {
    let mut w = BitWriter::default();
    w.bits(6, 0);
    w.bits(6, 63);
    assert_eq!(decode(&seal(1, w)), Err(BatchError::BadDeviceId));
}

#[test]
fn bad_meter_ids_are_refused() {
    let mut w = header();
    w.ue(1);
    w.bits(1, 0);
    w.bits(6, 2);
    for c in b"a/b" {
        w.bits(7, u64::from(*c));
    }
    let err = decode(&seal(1, w)).unwrap_err();
    assert!(matches!(err, BatchError::BadMeterId(_)), "{err:?}");
    assert!(err.to_string().contains("a/b"), "{err}");
}

#[test]
fn unknown_channels_and_clock_states_are_refused() {
    let w = one_meter(1, 200);
    assert_eq!(decode(&seal(1, w)), Err(BatchError::UnknownChannel(200)));

    let mut w = header();
    w.ue(1);
    w.bits(1, 1);
    w.uv(5); // modbus-5
    w.ue(0);
    w.ue(0);
    w.ue(0); // one row
    w.ue(0);
    w.bits(2, 3); // clock state 3
    assert_eq!(decode(&seal(1, w)), Err(BatchError::UnknownClockState(3)));
}

#[test]
fn huge_declared_counts_are_refused_before_anything_is_allocated() {
    let started = std::time::Instant::now();
    // 2^40 meters, 2^40 rows, 2^40 series: each announced in a few bytes.
    let mut w = header();
    w.ue(1 << 40);
    assert_eq!(
        decode(&seal(1, w)),
        Err(BatchError::TooLarge {
            what: "meters",
            limit: MAX_METERS
        })
    );
    let mut w = header();
    w.ue(1);
    w.bits(1, 1);
    w.uv(5);
    w.ue(0);
    w.ue(1 << 40);
    assert!(matches!(
        decode(&seal(1, w)),
        Err(BatchError::TooLarge { what: "series", .. })
    ));
    let mut w = header();
    w.ue(1);
    w.bits(1, 1);
    w.uv(5);
    w.ue(0);
    w.ue(0);
    w.ue(1 << 40);
    assert!(matches!(
        decode(&seal(1, w)),
        Err(BatchError::TooLarge {
            what: "readings",
            ..
        })
    ));
    // Within the per-column limit, but over the batch's total: 300 meters would be refused at
    // the meter count, so use 2 meters of 40,000 rows each (zero-width columns cost no bits).
    let mut w = header();
    w.ue(2);
    for _ in 0..2 {
        w.bits(1, 1);
        w.uv(5);
        w.ue(0);
        w.ue(0);
        w.ue(39_999);
        w.ue(0);
        w.bits(2, 0);
        w.bits(2, 1);
        w.sv(0);
        w.bits(2, 0);
        w.sv(1000);
        w.bits(7, 0);
        w.bits(8, u64::from(Channel::Power.code()));
        w.se(0);
        w.bits(1, 0);
        w.bits(2, 0); // predictor none
        w.bits(2, 0);
        w.sv(7);
        w.bits(7, 0);
    }
    assert!(matches!(
        decode(&seal(1, w)),
        Err(BatchError::TooLarge {
            what: "readings",
            ..
        })
    ));
    let oversized = vec![0u8; MAX_BATCH_BYTES + 1];
    assert!(matches!(
        decode(&oversized),
        Err(BatchError::TooLarge { what: "bytes", .. })
    ));
    assert!(started.elapsed().as_secs() < 2, "{:?}", started.elapsed());
}

#[test]
fn encoding_refuses_batches_past_the_limits() {
    let meter = MeterId::parse("m").unwrap();
    let reading = Reading {
        meter,
        channel: Channel::Power,
        ts_ms: 0,
        value: 0,
        scale: 0,
        clock: ClockState::Synced,
    };
    let batch = Batch {
        device: device(),
        seq: 0,
        readings: vec![reading; MAX_READINGS + 1],
    };
    assert_eq!(
        encode(&batch),
        Err(BatchError::TooLarge {
            what: "readings",
            limit: MAX_READINGS
        })
    );
}

#[test]
fn trailing_bytes_and_stray_padding_are_refused() {
    let frame = unhex(GOLDEN);
    let body = &frame[1..frame.len() - 4];
    let mut w = BitWriter::default();
    for &b in body.iter().chain(&[0, 0]) {
        w.bits(8, u64::from(b));
    }
    assert_eq!(
        decode(&seal(1, w)),
        Err(BatchError::TrailingBytes { count: 2 })
    );
    // The golden body ends with 5 padding bits; set the last one.
    let mut w = BitWriter::default();
    for (i, &b) in body.iter().enumerate() {
        w.bits(8, u64::from(if i + 1 == body.len() { b | 1 } else { b }));
    }
    assert_eq!(
        decode(&seal(1, w)),
        Err(BatchError::Invalid("the padding bits are not zero"))
    );
}

#[test]
fn malformed_fields_are_refused_with_a_reason() {
    // A scale that does not fit an i8.
    let mut w = one_meter(1, Channel::Power.code());
    w.se(128);
    let err = decode(&seal(1, w)).unwrap_err();
    assert!(matches!(err, BatchError::Invalid(_)), "{err:?}");
    // More clock runs than rows.
    let mut w = header();
    w.ue(1);
    w.bits(1, 1);
    w.uv(5);
    w.ue(0);
    w.ue(0);
    w.ue(1); // two rows
    w.ue(2); // three runs
    let err = decode(&seal(1, w)).unwrap_err();
    assert!(matches!(err, BatchError::Invalid(_)), "{err:?}");
    // Presence runs longer than the column.
    let mut w = one_meter(3, Channel::Power.code());
    w.se(0);
    w.bits(1, 1);
    w.ue(4);
    let err = decode(&seal(1, w)).unwrap_err();
    assert!(matches!(err, BatchError::Invalid(_)), "{err:?}");
}

#[test]
fn every_error_has_a_code_and_a_message_for_a_4xx_body() {
    let errors = [
        BatchError::Truncated { offset: 3 },
        BatchError::BadChecksum {
            expected: 1,
            actual: 2,
        },
        BatchError::UnsupportedVersion(9),
        BatchError::BadDeviceId,
        BatchError::BadMeterId(MeterId::parse("").unwrap_err()),
        BatchError::UnknownChannel(99),
        BatchError::UnknownClockState(3),
        BatchError::TooLarge {
            what: "readings",
            limit: MAX_READINGS,
        },
        BatchError::TrailingBytes { count: 1 },
        BatchError::Invalid("x"),
    ];
    let mut codes: Vec<&str> = errors.iter().map(BatchError::code).collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), errors.len());
    for e in &errors {
        assert!(e.code().starts_with("batch_"));
        assert!(e.to_string().len() > 20, "{e}");
    }
}

/// The fuzz target's seeds (`fuzz/seeds/batch_decode/`) are frames without their checksum (the
/// target appends it). This keeps them current: after a format change, run
/// `DROVER_WRITE_FUZZ_SEEDS=1 cargo test -p drover-protocol fuzz_seeds` to rewrite them.
#[test]
fn fuzz_seeds_are_current_frames() {
    let mut gappy = synthetic::solar_meter(5, 30);
    gappy.retain(|r| r.channel != Channel::Power || r.ts_ms % 3 != 0);
    let seeds: [(&str, Batch, &[u8]); 3] = [
        (
            "golden",
            golden_batch(),
            include_bytes!("../../../../fuzz/seeds/batch_decode/golden"),
        ),
        (
            "one_minute",
            Batch {
                device: device(),
                seq: 1,
                readings: synthetic::solar_meter(1, 30),
            },
            include_bytes!("../../../../fuzz/seeds/batch_decode/one_minute"),
        ),
        (
            "missing_power",
            Batch {
                device: device(),
                seq: 2,
                readings: gappy,
            },
            include_bytes!("../../../../fuzz/seeds/batch_decode/missing_power"),
        ),
    ];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/batch_decode");
    for (name, batch, stored) in seeds {
        let frame = encode(&batch).unwrap();
        let seed = &frame[..frame.len() - 4];
        if std::env::var_os("DROVER_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::write(format!("{dir}/{name}"), seed).unwrap();
            continue;
        }
        assert_eq!(
            stored, seed,
            "fuzz seed {name} is stale: run DROVER_WRITE_FUZZ_SEEDS=1 cargo test -p drover-protocol fuzz_seeds"
        );
    }
}
