//! One line from the in-guest agent (guest-controlled bytes) → a row's fields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(accepted) = cis490::agent::line::check(data) {
        // What is accepted must respect the documented bounds.
        assert!(accepted.fields.len() <= cis490::agent::line::MAX_FIELDS);
        for (key, _) in &accepted.fields {
            assert!(key.len() <= cis490::agent::line::MAX_KEY + "guest_".len());
        }
    }
});
