//! /proc/<pid>/{stat,status,io,schedstat} text (kernel-formatted, but the comm field in
//! stat is chosen by the traced process) through each parser.
#![no_main]

use cis490::procfs::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse::parse_schedstat(data);
    let _ = parse::parse_io(data);
    let _ = parse::parse_status(data);
    let _ = parse::tid_of(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse::parse_stat(text);
    }
});
