//! A tracefs `events/<category>/<name>/format` file → its fields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cis490::bpf::tracefs::parse_format(text);
    }
});
