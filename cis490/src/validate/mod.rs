//! `cis490 validate`: check an episode directory against the output contract.
//!
//! The checks are pure functions over bytes and parsed JSON, one file per thing checked:
//! [`rows`] (every line of a JSONL file: framing, clock, header, types against the
//! contract), [`sequence`] (seq holes against declared gaps), [`labels`] (the phase
//! chain), [`meta`] (meta.json deserialized into the contract's types, then cross-checked
//! with the files) and [`manifest`] (sizes, lines, sha256). [`validate_dir`] only reads the
//! files and feeds them in. Files are streamed line by line, so a multi-GiB telemetry file
//! is checked in constant memory (except one small record per seq hole).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::episode::{DONE, EVENTS, LABELS, MANIFEST, META};
use crate::labels::Phase;
use crate::untrusted::{self, LineRead, LineReader, MAX_LINE_BYTES};

mod labels;
mod manifest;
mod meta;
mod rows;
mod sequence;

pub use labels::check_labels;
pub use manifest::check_manifest;
pub use meta::check_meta;
use rows::scan_file;
pub use rows::{scan_bytes, FileKind, FileScan, ScannedFile};
pub use sequence::check_seq_holes;

/// At most this many problems of one file are listed; the rest are counted.
const MAX_PROBLEMS_PER_FILE: usize = 20;

/// One thing wrong with an episode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file it is in (None: the episode as a whole).
    pub file: Option<String>,
    /// 1-based line number within that file.
    pub line: Option<u64>,
    pub message: String,
}

impl Problem {
    fn new(file: Option<&str>, line: Option<u64>, message: impl Into<String>) -> Self {
        Self {
            file: file.map(str::to_owned),
            line,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: {}", self.message),
            (Some(file), None) => write!(f, "{file}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// No done.marker: the capture is still running or was killed.
    Incomplete,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Incomplete => "INCOMPLETE",
        }
    }
}

#[derive(Debug)]
pub struct EpisodeReport {
    pub problems: Vec<Problem>,
    pub complete: bool,
    /// No readable directory or no meta.json: not an episode at all (FAIL, not INCOMPLETE).
    pub not_an_episode: bool,
}

impl EpisodeReport {
    pub fn verdict(&self) -> Verdict {
        if self.not_an_episode {
            Verdict::Fail
        } else if !self.complete {
            Verdict::Incomplete
        } else if self.problems.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
}

/// A `gap` event: ticks `from_seq..=to_seq` of `source` were not sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapDecl {
    pub from_seq: u64,
    pub to_seq: u64,
}

/// Seqs missing between two rows of a stream (or before its first row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqHole {
    pub from_seq: u64,
    pub to_seq: u64,
    /// t_mono_ns of the rows around the hole (0 before the first row).
    pub after_t: u64,
    pub before_t: u64,
    /// Line of the first row after the hole.
    pub line: u64,
}

/// Validate one episode directory.
pub fn validate_dir(dir: &Path) -> EpisodeReport {
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem::new(
                None,
                None,
                format!("cannot read directory: {e}"),
            ));
            return EpisodeReport {
                problems,
                complete: false,
                not_an_episode: true,
            };
        }
    };
    let mut names: Vec<(String, std::fs::Metadata)> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        match entry.metadata() {
            Ok(md) => names.push((name, md)),
            Err(e) => problems.push(Problem::new(Some(&name), None, format!("stat: {e}"))),
        }
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let done = names
        .iter()
        .find(|(n, _)| n == DONE)
        .map(|(_, md)| md.clone());
    let complete = done.is_some();
    match &done {
        None => problems.push(Problem::new(
            None,
            None,
            "done.marker missing: episode incomplete (capture still running or killed)",
        )),
        Some(done_md) => {
            let done_t = done_md.modified().ok();
            for (name, md) in &names {
                if name != DONE && md.modified().ok() > done_t {
                    problems.push(Problem::new(
                        Some(name),
                        None,
                        "modified after done.marker (done.marker must be the last write)",
                    ));
                }
            }
        }
    }

    // events.jsonl first: the other streams' seq holes are checked against its gaps.
    let mut scanned: Vec<ScannedFile> = Vec::new();
    let mut on_disk = BTreeMap::new();
    let mut order: Vec<&(String, std::fs::Metadata)> = names.iter().collect();
    order.sort_by_key(|(n, _)| n != EVENTS);
    for (name, md) in order {
        // done.marker and manifest.json too must be regular files; their contents are
        // checked elsewhere (manifest) or not at all (done.marker).
        if !md.is_file() {
            // A running (or killed) capture's control socket is expected until it closes.
            if name == crate::episode::CONTROL_SOCKET && !complete {
                continue;
            }
            problems.push(Problem::new(
                Some(name),
                None,
                "not a regular file (an episode holds only files)",
            ));
            continue;
        }
        if name == DONE || name == MANIFEST {
            continue;
        }
        let kind = FileKind::of(name);
        match scan_file(&dir.join(name), name, kind) {
            Ok(f) => {
                on_disk.insert(name.clone(), (f.bytes, f.lines, f.sha256.clone()));
                scanned.push(f);
            }
            Err(e) => problems.push(Problem::new(Some(name), None, format!("cannot read: {e}"))),
        }
    }
    if let Some((_, md)) = names.iter().find(|(n, _)| n == crate::pcap::FILE) {
        if md.is_file() {
            problems.extend(check_pcap(&dir.join(crate::pcap::FILE)));
        }
    }
    for required in [META, EVENTS, LABELS] {
        if !names.iter().any(|(n, _)| n == required) {
            problems.push(Problem::new(Some(required), None, "missing"));
        }
    }
    for f in &scanned {
        problems.extend(f.problems.iter().cloned());
    }
    if complete {
        if let Some(ev) = scanned.iter().find(|f| f.name == EVENTS) {
            for needed in ["episode_start", "episode_end"] {
                if !ev.event_names.iter().any(|e| e == needed) {
                    problems.push(Problem::new(
                        Some(EVENTS),
                        None,
                        format!("no {needed} event in a complete episode"),
                    ));
                }
            }
        }
    }
    let (gaps, errors) = scanned
        .iter()
        .find(|f| f.name == EVENTS)
        .map(|f| (f.gaps.clone(), f.source_errors.clone()))
        .unwrap_or_default();
    for f in scanned.iter().filter(|f| f.source.is_some()) {
        let source = f.source.as_deref().unwrap_or_default();
        let sparse = crate::contract::stream_for_file(&f.name).is_some_and(|s| s.sparse);
        problems.extend(check_seq_holes(
            f,
            gaps.get(source).map(Vec::as_slice).unwrap_or(&[]),
            errors.get(source).map(Vec::as_slice).unwrap_or(&[]),
            sparse,
        ));
    }
    let listed_on_disk = |name: &str| names.iter().any(|(n, _)| n == name);
    // Read only what the directory listing showed, through the safe reader: a FIFO or a
    // symlink named meta.json is refused (and already reported above), never opened.
    let meta = match untrusted::read_json(&dir.join(META), untrusted::MAX_META_BYTES) {
        Ok(m) => Some(m),
        Err(e) => {
            if listed_on_disk(META) {
                problems.push(Problem::new(Some(META), None, e));
            }
            None
        }
    };
    if let Some(meta) = &meta {
        let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        problems.extend(check_meta(meta, dir_name.as_deref(), complete, &scanned));
    }
    let manifest_path = dir.join(MANIFEST);
    if listed_on_disk(MANIFEST) {
        match untrusted::read_json(&manifest_path, untrusted::MAX_MANIFEST_BYTES) {
            Ok(manifest) => problems.extend(check_manifest(
                &manifest,
                meta.as_ref().and_then(|m| m["episode_id"].as_str()),
                &on_disk,
            )),
            Err(e) => problems.push(Problem::new(Some(MANIFEST), None, e)),
        }
    } else if complete {
        problems.push(Problem::new(
            Some(MANIFEST),
            None,
            "missing although done.marker exists",
        ));
    }
    EpisodeReport {
        problems,
        complete,
        not_an_episode: meta.is_none(),
    }
}

/// capture.pcapng (`--pcap`) is whole pcapng blocks (read without following a symlink).
fn check_pcap(path: &Path) -> Vec<Problem> {
    let name = crate::pcap::FILE;
    let file = match untrusted::open_regular(path) {
        Ok((f, _)) => f,
        Err(e) => return vec![Problem::new(Some(name), None, e.to_string())],
    };
    match crate::pcap::walk_file(&file) {
        Ok(w) => match w.stopped {
            None => Vec::new(),
            Some(why) => vec![Problem::new(
                Some(name),
                None,
                format!("not whole pcapng blocks after {} blocks: {why}", w.blocks),
            )],
        },
        Err(e) => vec![Problem::new(Some(name), None, format!("cannot read: {e}"))],
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A telemetry-proc.jsonl of these rows, each given the header fields.
    pub(crate) fn tele(lines: &[&str]) -> ScannedFile {
        let lines: Vec<String> = lines
            .iter()
            .map(|l| {
                l.replacen(
                    '{',
                    r#"{"source":"proc","available_in_deployment":false,"#,
                    1,
                )
            })
            .collect();
        tele_raw(&lines)
    }

    pub(crate) fn tele_raw(lines: &[String]) -> ScannedFile {
        let mut data = lines.join("\n").into_bytes();
        data.push(b'\n');
        scan_bytes(
            "telemetry-proc.jsonl",
            FileKind::Telemetry {
                source: "proc".into(),
            },
            &data,
        )
    }
}
