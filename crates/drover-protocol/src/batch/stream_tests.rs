//! Stream frames (version 2): streams of batches round-trip through the two ends' contexts,
//! the golden stream of docs/protocol.md, the size of a one-minute stream frame, and the
//! errors only a stream frame can have.

use proptest::prelude::*;

use super::bits::BitWriter;
use super::stream::{MAX_STREAM_METERS, StreamContext};
use super::tests::{
    device, fields, golden_batch, hex, loose_readings, polled_readings, seal, unhex,
};
use super::*;
use crate::reading::{CHANNELS, Channel, MeterId};

/// The golden batch, then the same meters six seconds later with the clock synced: the stream
/// of the example in docs/protocol.md, opened with `Drover-Last-Seq: 6`.
fn golden_stream() -> [Batch; 2] {
    let first = golden_batch();
    let mut second = first.clone();
    second.seq = 8;
    for r in &mut second.readings {
        r.ts_ms += 6006;
        r.clock = ClockState::Synced;
        r.value += match r.channel {
            Channel::EnergyImport => 3,
            Channel::Power => -12,
            _ => 2,
        };
    }
    [first, second]
}

/// The golden stream's two frames. A change here is a format change: bump
/// [`STREAM_FORMAT_VERSION`] and update docs/protocol.md.
const GOLDEN_STREAM: [&str; 2] = [
    "02539e70448800357bc614ea698800bfa20280c0c5e30a7010e06a928fb6e61ad057360b7465c3d3875dbc3c4afa01725cd200b9bcce62",
    "0217f4cfb8800bfa202800021e9286e235aae257d021404e3ec9f5",
];

/// Frames of `batches` written on one stream, opened with `last_seq`.
fn stream_frames(batches: &[Batch], last_seq: u64) -> Vec<Vec<u8>> {
    let mut context = StreamContext::new(device(), last_seq);
    batches.iter().map(|b| context.encode(b).unwrap()).collect()
}

/// Fields of the body of a stream frame written after `before` on the same stream.
fn annotate_after(before: &[Batch], batch: &Batch, last_seq: u64) -> String {
    let mut context = StreamContext::new(device(), last_seq);
    for b in before {
        context.encode(b).unwrap();
    }
    fields(&super::frame::encode_body(batch, Some(&context)).unwrap().0)
}

#[test]
fn the_golden_stream_encodes_to_the_golden_bytes_and_back() {
    let batches = golden_stream();
    let frames = stream_frames(&batches, 6);
    let got: Vec<String> = frames.iter().map(|f| hex(f)).collect();
    assert_eq!(
        got,
        GOLDEN_STREAM,
        "second frame's fields:\n{}",
        annotate_after(&batches[..1], &batches[1], 6)
    );
    let mut context = StreamContext::new(device(), 6);
    for (frame, batch) in GOLDEN_STREAM.iter().zip(&batches) {
        assert_eq!(context.decode(&unhex(frame)).unwrap(), batch.canonical());
    }
}

#[test]
fn the_protocol_page_shows_the_golden_stream() {
    let page = include_str!("../../../../docs/protocol.md");
    for frame in GOLDEN_STREAM {
        let body = &frame[2..frame.len() - 8];
        assert!(page.contains(body), "docs/protocol.md lacks {body}");
    }
}

/// One-minute batches of the synthetic meter, one after another, on one stream: the steady
/// frames are about a quarter smaller than plain ones, and must not grow.
#[test]
fn stream_frames_of_a_steady_meter_stay_under_the_measured_budget() {
    for (polls, limit) in [(30usize, 84usize), (150, 321)] {
        let readings = synthetic::solar_meter(7, polls * 12);
        let batches: Vec<Batch> = readings
            .chunks(polls * 3)
            .enumerate()
            .map(|(i, chunk)| Batch {
                device: device(),
                seq: 1000 + i as u64,
                readings: chunk.to_vec(),
            })
            .collect();
        let frames = stream_frames(&batches, 999);
        let mut context = StreamContext::new(device(), 999);
        for (frame, batch) in frames.iter().zip(&batches) {
            assert_eq!(context.decode(frame).unwrap(), batch.canonical());
        }
        let plain: usize = batches
            .iter()
            .map(|b| encode(b).unwrap().len())
            .sum::<usize>()
            / batches.len();
        let steady = &frames[1..];
        let mean = steady.iter().map(Vec::len).sum::<usize>() as f64 / steady.len() as f64;
        let largest = steady.iter().map(Vec::len).max().unwrap_or(0);
        println!(
            "{polls:>4} polls per batch: plain frame {plain} B, steady stream frame mean {mean:.1} B, largest {largest} B ({:.3} B/pt)",
            mean / (polls * 3) as f64
        );
        assert!(
            largest <= limit,
            "{polls} polls: a stream frame of {largest} B, budget {limit} B; fields of the second:\n{}",
            annotate_after(&batches[..1], &batches[1], 999)
        );
    }
}

/// A stream: where its context starts, then batches, each with how its seq follows the last
/// one's and whether it goes as a plain frame.
fn stream(
    readings: impl Strategy<Value = Vec<Reading>>,
) -> impl Strategy<Value = (u64, Vec<Batch>, Vec<bool>)> {
    let step = prop_oneof![8 => Just(1u64), 1 => any::<u64>(), 1 => Just(0u64)];
    (
        any::<u64>(),
        prop::collection::vec((step, prop::bool::weighted(0.15), readings), 1..6),
    )
        .prop_map(|(start, items)| {
            let mut seq = start;
            let mut batches = Vec::new();
            let mut plain = Vec::new();
            for (step, is_plain, readings) in items {
                seq = seq.wrapping_add(step);
                batches.push(Batch {
                    device: device(),
                    seq,
                    readings,
                });
                plain.push(is_plain);
            }
            (start, batches, plain)
        })
}

fn check_stream(start: u64, batches: &[Batch], plain: &[bool]) -> Result<(), TestCaseError> {
    let mut sender = StreamContext::new(device(), start);
    let mut receiver = StreamContext::new(device(), start);
    for (batch, &plain) in batches.iter().zip(plain) {
        let frame = if plain {
            sender.encode_plain(batch).unwrap()
        } else {
            sender.encode(batch).unwrap()
        };
        prop_assert_eq!(
            frame[0],
            if plain {
                FORMAT_VERSION
            } else {
                STREAM_FORMAT_VERSION
            }
        );
        prop_assert_eq!(receiver.decode(&frame).unwrap(), batch.canonical());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn streams_of_loose_batches_round_trip((start, batches, plain) in stream(loose_readings())) {
        check_stream(start, &batches, &plain)?;
    }

    #[test]
    fn streams_of_polled_batches_round_trip((start, batches, plain) in stream(polled_readings())) {
        check_stream(start, &batches, &plain)?;
    }
}

#[test]
fn a_stream_with_more_meters_than_its_context_keeps_the_rest_in_full() {
    let meters = MAX_STREAM_METERS + 100;
    let batches: Vec<Batch> = (0..meters)
        .collect::<Vec<_>>()
        .chunks(MAX_METERS)
        .cycle()
        .take(2 * meters.div_ceil(MAX_METERS))
        .enumerate()
        .map(|(i, chunk)| Batch {
            device: device(),
            seq: i as u64 + 1,
            readings: chunk
                .iter()
                .map(|&m| Reading {
                    meter: MeterId::parse(&format!("m{m}")).unwrap(),
                    channel: Channel::Power,
                    ts_ms: synthetic::START_MS + i as i64 * 60_000,
                    value: m as i64 + i as i64,
                    scale: 0,
                    clock: ClockState::Synced,
                })
                .collect(),
        })
        .collect();
    let frames = stream_frames(&batches, 0);
    let mut context = StreamContext::new(device(), 0);
    for (frame, batch) in frames.iter().zip(&batches) {
        assert_eq!(context.decode(frame).unwrap(), batch.canonical());
    }
}

/// Meters of 1,024 series each: the fifth one's shape is past the context's limit, so it is
/// forgotten, and that meter's headers travel again the next time.
#[test]
fn shapes_past_the_context_limit_are_forgotten_not_lost() {
    let scales: Vec<i8> = (-128i8..=127).collect();
    let meter_of = |m: usize, seq: u64| Batch {
        device: device(),
        seq,
        readings: CHANNELS[..4]
            .iter()
            .flat_map(|&channel| scales.iter().map(move |&scale| (channel, scale)))
            .map(|(channel, scale)| Reading {
                meter: MeterId::parse(&format!("m{m}")).unwrap(),
                channel,
                ts_ms: synthetic::START_MS + seq as i64 * 60_000,
                value: i64::from(scale) + seq as i64,
                scale,
                clock: ClockState::Synced,
            })
            .collect(),
    };
    let batches: Vec<Batch> = (0..12).map(|i| meter_of(i % 6, i as u64 + 1)).collect();
    assert_eq!(batches[0].readings.len(), MAX_SERIES);
    let frames = stream_frames(&batches, 0);
    let mut context = StreamContext::new(device(), 0);
    for (frame, batch) in frames.iter().zip(&batches) {
        assert_eq!(context.decode(frame).unwrap(), batch.canonical());
    }
    // The second time round, the first meters' headers are left out, the later ones' are not.
    assert!(
        frames[6].len() + 1000 < frames[0].len(),
        "{} {}",
        frames[6].len(),
        frames[0].len()
    );
    assert!(
        frames[11].len() + 1000 > frames[5].len(),
        "{} {}",
        frames[11].len(),
        frames[5].len()
    );
}

// Errors.

#[test]
fn a_stream_frame_is_refused_outside_a_stream() {
    let frames = stream_frames(&golden_stream(), 6);
    let err = decode(&frames[0]).unwrap_err();
    assert_eq!(err.code(), "batch_invalid", "{err}");
    assert!(
        err.to_string()
            .contains("only valid on the telemetry stream"),
        "{err}"
    );
}

/// Every cut of a stream frame is refused, and a refused frame leaves the context as it was:
/// the whole frame still decodes after all of them.
#[test]
fn a_refused_frame_leaves_the_context_as_it_was() {
    let batches = golden_stream();
    let frames = stream_frames(&batches, 6);
    let mut context = StreamContext::new(device(), 6);
    assert_eq!(context.decode(&frames[0]).unwrap(), batches[0].canonical());
    let second = &frames[1];
    for len in 0..second.len() {
        assert!(context.decode(&second[..len]).is_err(), "cut at {len}");
    }
    let mut flipped = second.clone();
    flipped[3] ^= 1;
    assert_eq!(
        context.decode(&flipped).unwrap_err().code(),
        "batch_checksum"
    );
    assert_eq!(context.decode(second).unwrap(), batches[1].canonical());
}

#[test]
fn a_meter_index_the_stream_never_gave_is_refused() {
    for known in [0usize, 1] {
        let mut context = StreamContext::new(device(), 0);
        for m in 0..known {
            context
                .encode(&Batch {
                    device: device(),
                    seq: 1,
                    readings: vec![Reading {
                        meter: MeterId::parse(&format!("m{m}")).unwrap(),
                        channel: Channel::Power,
                        ts_ms: 0,
                        value: 1,
                        scale: 0,
                        clock: ClockState::Synced,
                    }],
                })
                .unwrap();
        }
        let mut w = BitWriter::default();
        w.bits(1, 0); // the next seq
        w.sv(0); // base time step
        w.ue(1); // one meter
        w.bits(1, 1); // known, by index
        w.ue(known as u64); // one past the table
        let err = context.decode(&seal(STREAM_FORMAT_VERSION, w)).unwrap_err();
        assert_eq!(
            err,
            BatchError::Invalid("a meter index names no meter of the stream"),
            "{known} known"
        );
    }
}
