//! An episode directory handed over by someone else, through the readers of `validate`,
//! `ls` and `report`. The input is split on [`SEP`] into the contents of the files below,
//! in order; an empty part leaves that file out.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Separates the files' contents in one fuzz input (xtask writes seeds the same way).
const SEP: &[u8] = b"\n--8<--\n";
const FILES: [&str; 8] = [
    "meta.json",
    "events.jsonl",
    "labels.jsonl",
    "telemetry-proc.jsonl",
    "telemetry-qmp.jsonl.zst",
    "telemetry-agent.jsonl",
    "manifest.json",
    "done.marker",
];

fn split<'a>(mut data: &'a [u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    while let Some(i) = data.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&data[..i]);
        data = &data[i + SEP.len()..];
    }
    parts.push(data);
    parts
}

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("01JFUZZ0000000000000000000");
    std::fs::create_dir(&dir).unwrap();
    for (name, part) in FILES.iter().zip(split(data)) {
        if !part.is_empty() {
            std::fs::write(dir.join(name), part).unwrap();
        }
    }
    let report = cis490::validate::validate_dir(&dir);
    let _ = report.verdict();
    let _ = cis490::ls::summarize_with(&dir, cis490::ls::Check::Quick);
    if let Some(s) = cis490::ls::summarize_with(&dir, cis490::ls::Check::Full) {
        // ls's state must agree with validate's verdict (F12).
        let agrees = match report.verdict() {
            cis490::validate::Verdict::Pass => s.state == "ok",
            cis490::validate::Verdict::Fail => s.state == "FAIL",
            cis490::validate::Verdict::Incomplete => s.state == "INCOMPLETE",
        };
        assert!(
            agrees,
            "ls says {} but validate {:?}",
            s.state,
            report.verdict()
        );
        let _ = cis490::ls::format_table(&[s]);
    }
    let _ = cis490::report::load(&dir);
});
