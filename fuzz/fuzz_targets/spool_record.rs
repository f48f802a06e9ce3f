//! The spool's record decoder, which reads back whatever a power cut or a failing SD card left
//! on disk: arbitrary bytes must never panic, a record that decodes must re-encode to exactly
//! the bytes it came from, and decoding a valid record cut short must say so.
#![no_main]

use drover_protocol::spool::{RecordError, decode_record, encode_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = drover_protocol::spool::check_segment_header(data);
    // Records back to back, as a segment holds them.
    let mut rest = data;
    while let Ok((record, used)) = decode_record(rest) {
        assert!(!record.readings.is_empty());
        let mut again = Vec::new();
        encode_record(record.id, record.first_reading, &record.readings, &mut again).unwrap();
        assert_eq!(again, rest[..used], "a decoded record re-encodes to its bytes");
        for cut in [0, used / 2, used - 1] {
            assert!(
                matches!(decode_record(&rest[..cut]), Err(RecordError::Truncated { .. })),
                "a record cut at {cut} of {used} bytes is reported as truncated"
            );
        }
        rest = &rest[used..];
    }
});
