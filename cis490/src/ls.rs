//! `cis490 ls`: one line per episode under a data root, newest first.
//!
//! Works on incomplete episodes too (a capture still running or killed): whatever meta.json
//! says at start, plus what is on disk (telemetry files, labels.jsonl), is enough for a line.
//!
//! The STATE column agrees with `cis490 validate`: by default every complete episode is
//! validated in full ([`crate::validate::validate_dir`]), and `ok:<end_reason>` means
//! validate passes; `FAIL` means it fails (the first problem is in `--json`'s
//! `first_problem`); `INCOMPLETE` means no done.marker. With `--quick` the file contents
//! are not read (no hashing, no row checks): only the listing is checked (done.marker,
//! every entry a regular file, meta.json readable), and a complete episode that passes
//! that shows `sealed:<end_reason>`, never `ok`. Everything printed from the episode (its
//! directory name, meta.json strings, file names, phases) is escaped: control characters
//! and bytes that are not UTF-8 are shown as `\xNN` / `\u{NNNN}`, never sent to the
//! terminal raw.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::episode::{DONE, LABELS, META};
use crate::error::Error;
use crate::untrusted::{self, LineRead, LineReader, MAX_LINE_BYTES};
use crate::validate::{self, Verdict};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EpisodeSummary {
    /// The directory name, escaped for printing (see [`printable_bytes`]).
    pub id: String,
    #[serde(serialize_with = "serialize_path_escaped")]
    pub dir: PathBuf,
    pub started_at_wall: Option<String>,
    /// From meta.result for a complete episode; for an incomplete one an estimate from the
    /// newest file modification time (`duration_estimated` is then true).
    pub duration_s: Option<f64>,
    pub duration_estimated: bool,
    pub backend: Option<String>,
    pub sources: Vec<String>,
    pub phases: Vec<String>,
    pub complete: bool,
    pub end_reason: Option<String>,
    /// `ok`, `FAIL`, `INCOMPLETE`, or with `--quick` `sealed` (complete, contents not
    /// checked).
    pub state: String,
    /// The first problem validate (or the quick check) found, when `state` is `FAIL`.
    pub first_problem: Option<String>,
}

/// How much of validate `ls` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Full validation of every complete episode: `ok` means validate passes.
    Full,
    /// The directory listing and meta.json only: never says `ok`.
    Quick,
}

/// A path as JSON: a string, with bytes that are not UTF-8 escaped (serde refuses a
/// non-UTF-8 path, which would fail the whole listing).
fn serialize_path_escaped<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    use std::os::unix::ffi::OsStrExt;
    s.serialize_str(&printable_bytes(p.as_os_str().as_bytes()))
}

/// `s` safe to print on a terminal: control characters (C0, DEL, C1) and the bidi
/// overrides that reorder what a terminal shows become `\u{NNNN}`; a backslash is doubled
/// so an escape cannot be faked.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() || bidi {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes (a file name) safe to print: [`printable`] for UTF-8 runs, `\xNN` for the rest.
pub fn printable_bytes(b: &[u8]) -> String {
    let mut out = String::new();
    for chunk in b.utf8_chunks() {
        out.push_str(&printable(chunk.valid()));
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// The directory holding episode directories: `<root>/episodes` when it exists, else `root`
/// itself (so `cis490 ls data/episodes` works too).
pub fn episodes_dir(root: &Path) -> PathBuf {
    let sub = root.join("episodes");
    if sub.is_dir() {
        sub
    } else {
        root.to_path_buf()
    }
}

/// Distinct phases of labels.jsonl in order of first appearance (complete lines only).
pub fn phases_of_labels(text: &str) -> Vec<String> {
    phases_of_label_lines(text.as_bytes()).unwrap_or_default()
}

/// [`phases_of_labels`] streamed, each line under the reader's cap (a longer line is
/// skipped, like one that does not parse).
pub fn phases_of_label_lines(reader: impl BufRead) -> std::io::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    let mut lines = LineReader::new(reader, MAX_LINE_BYTES);
    loop {
        match lines.next_line(|_| {})? {
            LineRead::Eof => return Ok(out),
            LineRead::Line { terminated: true } => {
                if let Ok(v) = serde_json::from_slice::<Value>(lines.line()) {
                    if let Some(p) = v["phase"].as_str() {
                        if !out.iter().any(|x| x == p) {
                            out.push(p.to_owned());
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fn wall_ns_of_rfc3339(s: &str) -> Option<i128> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .map(i128::from)
}

/// Summarize one episode directory; None if it does not look like an episode at all.
pub fn summarize(dir: &Path) -> Option<EpisodeSummary> {
    summarize_with(dir, Check::Full)
}

/// [`summarize`] with the given depth of checking.
pub fn summarize_with(dir: &Path, check: Check) -> Option<EpisodeSummary> {
    use std::os::unix::ffi::OsStrExt;
    let id = printable_bytes(dir.file_name()?.as_bytes());
    // The safe reader: a FIFO or symlink named meta.json is refused, never opened.
    let meta: Option<Value> = untrusted::read_json(&dir.join(META), untrusted::MAX_META_BYTES).ok();
    let mut files: Vec<(String, std::fs::Metadata)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            // DirEntry::metadata does not follow symlinks.
            Some((
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().ok()?,
            ))
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if meta.is_none()
        && !files
            .iter()
            .any(|(n, _)| n == LABELS || n.starts_with("telemetry-"))
    {
        return None;
    }
    let complete = files.iter().any(|(n, _)| n == DONE);
    let meta_readable = meta.is_some();
    let m = meta.unwrap_or(Value::Null);
    let started = m["started_at_wall"].as_str().map(str::to_owned);
    let mut sources: Vec<String> = m["sources"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for (name, _) in &files {
        if let Some(s) = name.strip_prefix("telemetry-").and_then(|s| {
            s.strip_suffix(".jsonl")
                .or_else(|| s.strip_suffix(".jsonl.zst"))
        }) {
            if !sources.iter().any(|x| x == s) {
                sources.push(s.to_owned());
            }
        }
    }
    let phases = untrusted::open_stream(&dir.join(LABELS))
        .ok()
        .and_then(|r| phases_of_label_lines(r).ok())
        .unwrap_or_default();
    let (state, first_problem) = state_of(dir, complete, check, &files, meta_readable);
    let mut duration_s = m["result"]["duration_observed_s"].as_f64();
    let mut estimated = false;
    if duration_s.is_none() {
        let newest = files
            .iter()
            .filter_map(|(_, md)| md.modified().ok())
            .max()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128);
        if let (Some(end), Some(start)) = (newest, started.as_deref().and_then(wall_ns_of_rfc3339))
        {
            duration_s = Some(((end - start).max(0) as f64) / 1e9);
            estimated = true;
        }
    }
    Some(EpisodeSummary {
        id,
        dir: dir.to_path_buf(),
        started_at_wall: started,
        duration_s,
        duration_estimated: estimated,
        backend: m["backend"]["used"].as_str().map(str::to_owned),
        sources,
        phases,
        complete,
        end_reason: m["result"]["end_reason"].as_str().map(str::to_owned),
        state,
        first_problem,
    })
}

/// The STATE of an episode, as validate would judge it (see the module doc).
fn state_of(
    dir: &Path,
    complete: bool,
    check: Check,
    files: &[(String, std::fs::Metadata)],
    meta_readable: bool,
) -> (String, Option<String>) {
    // validate's order: no readable meta.json is not an episode (FAIL) even without
    // done.marker; only then does a missing done.marker make it INCOMPLETE.
    if !meta_readable {
        return (
            "FAIL".into(),
            Some(format!("{META}: missing or unreadable")),
        );
    }
    if !complete {
        return ("INCOMPLETE".into(), None);
    }
    match check {
        Check::Full => {
            let report = validate::validate_dir(dir);
            match report.verdict() {
                Verdict::Pass => ("ok".into(), None),
                Verdict::Incomplete => ("INCOMPLETE".into(), None),
                Verdict::Fail => (
                    "FAIL".into(),
                    report.problems.first().map(ToString::to_string),
                ),
            }
        }
        Check::Quick => {
            // Each of these is also a validate failure, so FAIL here never contradicts it.
            if let Some((name, _)) = files.iter().find(|(_, md)| !md.is_file()) {
                return (
                    "FAIL".into(),
                    Some(format!(
                        "{name}: not a regular file (an episode holds only files)"
                    )),
                );
            }
            ("sealed".into(), None)
        }
    }
}

/// Every episode under `root`, newest first (ULIDs sort by creation time; the start time
/// breaks ties and orders non-ULID names).
pub fn list(root: &Path) -> Result<Vec<EpisodeSummary>, Error> {
    list_with(root, Check::Full)
}

/// [`list`] with the given depth of checking.
pub fn list_with(root: &Path, check: Check) -> Result<Vec<EpisodeSummary>, Error> {
    let dir = episodes_dir(root);
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| Error::Usage(format!("cannot list {}: {e}", dir.display())))?;
    let mut out: Vec<EpisodeSummary> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| summarize_with(&e.path(), check))
        .collect();
    sort_newest_first(&mut out);
    Ok(out)
}

pub fn sort_newest_first(v: &mut [EpisodeSummary]) {
    v.sort_by(|a, b| {
        let ka = (
            a.started_at_wall.as_deref().and_then(wall_ns_of_rfc3339),
            &a.id,
        );
        let kb = (
            b.started_at_wall.as_deref().and_then(wall_ns_of_rfc3339),
            &b.id,
        );
        kb.cmp(&ka)
    });
}

/// The human-readable table.
pub fn format_table(v: &[EpisodeSummary]) -> String {
    let mut out = format!(
        "{:<26}  {:<27}  {:>9}  {:<7}  {:<16}  {:<24}  {}\n",
        "ID", "STARTED", "DURATION", "BACKEND", "STATE", "SOURCES", "PHASES"
    );
    for e in v {
        let dur = match e.duration_s {
            Some(d) if e.duration_estimated => format!("~{d:.1}s"),
            Some(d) => format!("{d:.1}s"),
            None => "-".into(),
        };
        let reason = e.end_reason.as_deref().unwrap_or("complete");
        let state = match e.state.as_str() {
            "ok" | "sealed" => format!("{}:{reason}", e.state),
            other => other.to_owned(),
        };
        out.push_str(&format!(
            "{:<26}  {:<27}  {:>9}  {:<7}  {:<16}  {:<24}  {}\n",
            e.id,
            printable(e.started_at_wall.as_deref().unwrap_or("-")),
            dur,
            printable(e.backend.as_deref().unwrap_or("-")),
            printable(&state),
            if e.sources.is_empty() {
                "-".into()
            } else {
                printable(&e.sources.join(","))
            },
            if e.phases.is_empty() {
                "-".into()
            } else {
                printable(&e.phases.join(">"))
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_distinct_in_order_and_skip_partial_lines() {
        let t = "{\"phase\":\"clean\"}\n{\"phase\":\"armed\"}\n{\"phase\":\"clean\"}\n{\"phase\":\"dorm";
        assert_eq!(phases_of_labels(t), vec!["clean", "armed"]);
    }

    /// Found by the `episode` fuzz target: labels.jsonl without meta.json or done.marker
    /// was INCOMPLETE in ls but FAIL in validate (not an episode).
    #[test]
    fn fuzz_regression_no_meta_and_no_done_marker_is_fail_like_validate() {
        let d = tempfile::tempdir().unwrap();
        let ep = d.path().join("01JFUZZ0000000000000000000");
        std::fs::create_dir(&ep).unwrap();
        std::fs::write(
            ep.join(LABELS),
            "{\"t_mono_ns\":1,\"t_wall_ns\":1,\"phase\":\"clean\",\"prev\":null}\n",
        )
        .unwrap();
        assert_eq!(validate::validate_dir(&ep).verdict(), Verdict::Fail);
        for check in [Check::Full, Check::Quick] {
            let s = summarize_with(&ep, check).unwrap();
            assert_eq!(s.state, "FAIL", "{check:?}");
        }
    }

    #[test]
    fn summaries_of_complete_and_incomplete_dirs() {
        let root = tempfile::tempdir().unwrap();
        let eps = root.path().join("episodes");
        let a = eps.join("01A00000000000000000000000");
        let b = eps.join("01B00000000000000000000000");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::create_dir_all(eps.join("junk")).unwrap();
        std::fs::write(
            a.join(META),
            r#"{"started_at_wall":"2026-01-01T00:00:00Z","backend":{"used":"proc"},
                "sources":[{"name":"proc"}],"result":{"duration_observed_s":2.5,"end_reason":"duration"}}"#,
        )
        .unwrap();
        std::fs::write(a.join(DONE), "").unwrap();
        std::fs::write(a.join(LABELS), "{\"phase\":\"clean\"}\n").unwrap();
        std::fs::write(
            b.join(META),
            r#"{"started_at_wall":"2026-01-02T00:00:00Z","backend":{"used":"bpf"},"sources":[],"result":null}"#,
        )
        .unwrap();
        std::fs::write(b.join("telemetry-bpf-sched.jsonl"), "").unwrap();
        let v = list(root.path()).unwrap();
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].id, "01B00000000000000000000000");
        assert!(!v[0].complete);
        assert!(v[0].duration_estimated);
        assert_eq!(v[0].sources, vec!["bpf-sched"]);
        assert!(v[1].complete);
        assert_eq!(v[1].duration_s, Some(2.5));
        assert_eq!(v[1].phases, vec!["clean"]);
        let table = format_table(&v);
        assert!(table.contains("INCOMPLETE"));
        // This hand-made meta.json lacks most contract keys: validate fails it, so ls
        // must not call it ok; the quick listing does not read contents and says sealed.
        assert!(table.contains("FAIL"), "{table}");
        assert!(!table.contains("ok:"), "{table}");
        assert!(v[1].first_problem.is_some());
        let quick = format_table(&list_with(root.path(), Check::Quick).unwrap());
        assert!(quick.contains("sealed:duration"), "{quick}");
        // Passing the episodes directory itself works too.
        assert_eq!(list(&eps).unwrap().len(), 2);
    }
}
