//! One DNS message as the flow programs copy it from the guest's traffic (guest-controlled
//! bytes, at most 512) → the parser: a result or an error, never a panic, a loop or an
//! allocation that grows past the answers it keeps.
#![no_main]

use cis490::flow::dns;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = dns::parse(data) {
        assert!(m.answers.len() <= dns::MAX_ANSWERS);
        if let Some(name) = &m.qname {
            assert!(name.len() <= 255, "{name}");
        }
        let _ = m.qtype.map(dns::qtype_name);
    }
});
