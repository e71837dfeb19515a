//! One line from a QMP socket (QEMU-controlled) → a message, and a reply's `return` value
//! through every reply parser the collector uses.
#![no_main]

use cis490::qmp::parse::{self, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match parse::parse_message(line) {
        Ok(Message::Return { value, .. }) => {
            let _ = parse::version_string(value.clone());
            let _ = parse::vcpus(value.clone());
            let _ = parse::vm_name(value.clone());
            let _ = parse::ram_mib(value.clone());
            let mut fields = Vec::new();
            let _ = parse::status_fields(value.clone(), &mut fields);
            if let Ok(s) = parse::Schemas::parse(value.clone()) {
                let _ = s.has("vcpu");
                let _ = s.stat_count("vm");
            }
            let _ = parse::stats_rows(value.clone());
            let _ = parse::block_rows(value);
        }
        Ok(_) | Err(_) => {}
    }
});
