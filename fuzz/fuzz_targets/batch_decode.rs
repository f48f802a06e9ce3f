//! Telemetry batches as the hub's bridge decodes them: arbitrary bytes must never panic, and
//! whatever decodes must re-encode to a frame that decodes to the same batch.
//!
//! The input is decoded twice: as it is (which mostly exercises the checksum check), and with
//! its correct CRC-32 appended, so that mutations reach the fields behind the checksum. The
//! seeds are therefore frames without their last four bytes.
#![no_main]

use drover_protocol::batch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    sealed.extend(crc32fast::hash(data).to_le_bytes());
    check(&sealed);
});

fn check(frame: &[u8]) {
    let Ok(decoded) = batch::decode(frame) else {
        return;
    };
    let again = batch::encode(&decoded).expect("a decoded batch is within the limits");
    let round_trip = batch::decode(&again).expect("an encoded batch decodes");
    assert_eq!(round_trip, decoded);
    assert_eq!(batch::encode(&round_trip).unwrap(), again, "encoding is deterministic");
}
