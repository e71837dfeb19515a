//! One line from the in-guest agent (guest-controlled bytes) → a row's fields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(accepted) = cis490::agent::line::check(data) {
        // The one bound the row writer relies on: a guest cannot add unbounded columns.
        assert!(accepted.fields.len() <= cis490::agent::line::MAX_FIELDS);
    }
});
