//! Stored chunk blobs as the hub reads them back (one chunk or several appended): arbitrary
//! bytes must never panic, and whatever decodes must re-encode to one chunk that decodes to the
//! same columns. A damaged database file must give an error, not take the hub down.
#![no_main]

use drover_protocol::chunk::{decode_appended, decode_columns, encode_columns};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Points have 3 columns, rollup buckets 9.
    for columns in [3, 9] {
        let Ok(decoded) = decode_appended(data, columns) else {
            continue;
        };
        let again = encode_columns(&decoded);
        assert_eq!(decode_columns(&again, columns).unwrap(), decoded);
    }
});
