//! The hub's `Range` header parser: any header value against any file size must give a range
//! inside the file, or "whole file", or "unsatisfiable" — never a panic or a range past the end.
#![no_main]

use drover_hub::api::{RangeRequest, parse_range};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64)| {
    let (header, size) = input;
    match parse_range(header, size) {
        RangeRequest::Partial(r) => {
            assert!(r.start <= r.end, "{header:?} {size}: {r:?}");
            assert!(r.end < size, "{header:?} {size}: {r:?}");
        }
        RangeRequest::Full | RangeRequest::Unsatisfiable => {}
    }
});
