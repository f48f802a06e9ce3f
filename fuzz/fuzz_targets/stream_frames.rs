//! Frames on the telemetry stream as the hub reads them, each against the frames before it
//! (`StreamContext`): arbitrary bytes must never panic, and every batch decoded must
//! round-trip through the two ends of another stream that carries the same batches.
//!
//! The input is a sequence of frames, each a length byte and that many bytes, to which the
//! target appends the correct CRC-32 (so that mutations reach the fields behind the checksum).
//! The first byte chooses the device's `Drover-Last-Seq`.
#![no_main]

use drover_protocol::batch::stream::StreamContext;
use drover_protocol::ids::DeviceId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&last, mut rest)) = data.split_first() else {
        return;
    };
    let Ok(device) = DeviceId::parse("fuzz-device") else {
        return;
    };
    let mut receiver = StreamContext::new(device.clone(), u64::from(last));
    // A second stream that carries what the first accepted, written by a sender: both of its
    // ends must agree on every batch.
    let mut sender = StreamContext::new(device.clone(), u64::from(last));
    let mut mirror = StreamContext::new(device.clone(), u64::from(last));
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        let mut frame = body.to_vec();
        frame.extend(crc32fast::hash(body).to_le_bytes());
        let Ok(mut batch) = receiver.decode(&frame) else {
            continue;
        };
        // A plain frame names its own device; a stream frame is the stream's.
        batch.device = device.clone();
        let again = sender
            .encode(&batch)
            .expect("a decoded batch is within the limits");
        assert_eq!(mirror.decode(&again).expect("an encoded frame decodes"), batch);
    }
});
