//! Lines from the in-guest agent (guest-controlled bytes) → rows' fields. The input is
//! split on newlines and fed through one column table, as the reader does within an
//! episode, so the per-episode key bound and column typing are fuzzed across lines too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut columns = cis490::agent::line::Columns::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(accepted) = cis490::agent::line::check(line, &mut columns) {
            // The bounds the row writer relies on: a guest cannot add unbounded columns.
            assert!(accepted.fields.len() <= cis490::agent::line::MAX_FIELDS);
        }
    }
});
