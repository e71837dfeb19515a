//! `cis490 validate`: check an episode directory against the output contract.
//!
//! The checks are pure functions over bytes and parsed JSON ([`FileScan`], [`check_labels`],
//! [`check_seq_holes`], [`check_meta`], [`check_manifest`]); [`validate_dir`] only reads the
//! files and feeds them in. Files are streamed line by line, so a multi-GiB telemetry file
//! is checked in constant memory (except one small record per seq hole).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::episode::{DONE, EVENTS, LABELS, MANIFEST, META};
use crate::labels::Phase;
use crate::untrusted::{self, LineRead, LineReader, MAX_LINE_BYTES};

/// At most this many problems of one file are listed; the rest are counted.
const MAX_PROBLEMS_PER_FILE: usize = 20;

pub const END_REASONS: [&str; 5] = ["duration", "target_exit", "signal", "error", "recovered"];

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

/// What kind of file a scan is reading; decides the per-line checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    Telemetry { source: String },
    Events,
    Labels,
}

impl FileKind {
    pub fn of(name: &str) -> Option<FileKind> {
        if name == EVENTS {
            Some(FileKind::Events)
        } else if name == LABELS {
            Some(FileKind::Labels)
        } else {
            name.strip_prefix("telemetry-")
                .and_then(|s| {
                    s.strip_suffix(".jsonl")
                        .or_else(|| s.strip_suffix(".jsonl.zst"))
                })
                .map(|s| FileKind::Telemetry {
                    source: s.to_owned(),
                })
        }
    }
}

/// One row parsed with its duplicate keys noticed: serde_json (with preserve_order) keeps
/// one value of `{"a":1,"a":2}` silently, so a row that says two things would pass.
struct RowObject {
    map: Map<String, Value>,
    duplicates: Vec<String>,
}

impl<'de> serde::Deserialize<'de> for RowObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> serde::de::Visitor<'de> for RowVisitor {
            type Value = RowObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<RowObject, A::Error> {
                let mut map = Map::new();
                let mut duplicates = Vec::new();
                while let Some(key) = a.next_key::<String>()? {
                    let value: Value = a.next_value()?;
                    if map.contains_key(&key) {
                        if !duplicates.contains(&key) {
                            duplicates.push(key);
                        }
                    } else {
                        map.insert(key, value);
                    }
                }
                Ok(RowObject { map, duplicates })
            }
        }
        d.deserialize_map(RowVisitor)
    }
}

/// Streaming check of one JSON-lines file: every line a JSON object with integer clock
/// fields, t_mono_ns never decreasing, seq never decreasing (holes recorded), and the
/// byte/line/sha256 bookkeeping the manifest is compared against.
pub struct FileScan {
    pub name: String,
    kind: FileKind,
    hasher: Sha256,
    pub bytes: u64,
    /// Newline-terminated lines (what the manifest counts).
    pub lines: u64,
    /// Bytes after the last newline: a partial final line.
    pub partial_tail: Option<u64>,
    last_mono: Option<u64>,
    last_seq: Option<(u64, u64)>,
    pub first_seq: Option<u64>,
    pub holes: Vec<SeqHole>,
    /// Events file only: gap declarations and source_error times per source.
    pub gaps: BTreeMap<String, Vec<GapDecl>>,
    pub source_errors: BTreeMap<String, Vec<u64>>,
    /// Events file only: the distinct event names seen.
    pub event_names: Vec<String>,
    /// Labels file only: the phases, in order.
    pub label_rows: Vec<(u64, String, Option<String>)>,
    problems: Vec<Problem>,
    suppressed: usize,
    /// Every value against its column's declared type (the contract module), when on.
    types: Option<crate::contract::TypeCheck>,
}

impl FileScan {
    pub fn new(name: &str, kind: FileKind) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            hasher: Sha256::new(),
            bytes: 0,
            lines: 0,
            partial_tail: None,
            last_mono: None,
            last_seq: None,
            first_seq: None,
            holes: Vec::new(),
            gaps: BTreeMap::new(),
            source_errors: BTreeMap::new(),
            event_names: Vec::new(),
            label_rows: Vec::new(),
            problems: Vec::new(),
            suppressed: 0,
            types: None,
        }
    }

    /// Also check every value against the contract's declared column types.
    pub fn with_contract(mut self) -> Self {
        self.types = Some(crate::contract::TypeCheck::for_file(&self.name));
        self
    }

    fn problem(&mut self, line: Option<u64>, message: String) {
        if self.problems.len() < MAX_PROBLEMS_PER_FILE {
            self.problems
                .push(Problem::new(Some(&self.name), line, message));
        } else {
            self.suppressed += 1;
        }
    }

    /// Feed one chunk as read by `read_until(b'\n')`: a full line with its newline, or the
    /// final bytes of the file without one.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.absorb(chunk);
        if chunk.len() > MAX_LINE_BYTES {
            self.too_long(chunk.len() as u64, chunk.ends_with(b"\n"));
        } else {
            self.check_line(chunk);
        }
    }

    /// Count and hash raw bytes (what the manifest describes), checked or not.
    fn absorb(&mut self, raw: &[u8]) {
        self.hasher.update(raw);
        self.bytes += raw.len() as u64;
    }

    /// A line over [`MAX_LINE_BYTES`]: counted, reported with its length, never parsed.
    fn too_long(&mut self, bytes: u64, terminated: bool) {
        let n = self.lines + 1;
        if terminated {
            self.lines += 1;
        } else {
            self.partial_tail = Some(bytes);
        }
        self.problem(
            Some(n),
            format!(
                "line is {bytes} bytes, over the {MAX_LINE_BYTES}-byte line cap (not parsed{})",
                if terminated {
                    ""
                } else {
                    "; no newline either"
                }
            ),
        );
    }

    /// The per-line checks of one line at most [`MAX_LINE_BYTES`] long (bytes already
    /// absorbed).
    fn check_line(&mut self, chunk: &[u8]) {
        let Some(body) = chunk.strip_suffix(b"\n") else {
            if !chunk.is_empty() {
                self.partial_tail = Some(chunk.len() as u64);
                let n = self.lines + 1;
                self.problem(
                    Some(n),
                    format!(
                        "truncated final line ({} bytes, no newline): the writer was cut off mid-line",
                        chunk.len()
                    ),
                );
            }
            return;
        };
        self.lines += 1;
        let n = self.lines;
        let row: RowObject = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                // Parsed again only to tell a non-object from invalid JSON.
                let msg = match serde_json::from_slice::<Value>(body) {
                    Ok(_) => "not a JSON object".to_owned(),
                    Err(_) => format!("not valid JSON: {e}"),
                };
                self.problem(Some(n), msg);
                return;
            }
        };
        if !row.duplicates.is_empty() {
            self.problem(
                Some(n),
                format!(
                    "duplicate keys {:?}: a reader would silently keep only one value",
                    row.duplicates
                ),
            );
        }
        let obj = &row.map;
        let mut clock_ok = true;
        for key in ["t_mono_ns", "t_wall_ns"] {
            if obj.get(key).and_then(Value::as_u64).is_none() {
                self.problem(
                    Some(n),
                    format!("{key} missing or not a non-negative integer"),
                );
                clock_ok = false;
            }
        }
        let t = obj.get("t_mono_ns").and_then(Value::as_u64).unwrap_or(0);
        if clock_ok {
            if let Some(last) = self.last_mono {
                if t < last {
                    self.problem(
                        Some(n),
                        format!("t_mono_ns decreased: {t} after {last} (non-monotonic row)"),
                    );
                }
            }
            self.last_mono = Some(self.last_mono.map_or(t, |l| l.max(t)));
        }
        let type_problems = self.types.as_mut().map(|t| t.check(obj));
        for message in type_problems.unwrap_or_default() {
            self.problem(Some(n), message);
        }
        match self.kind.clone() {
            FileKind::Telemetry { .. } => self.telemetry_row(n, t, obj),
            FileKind::Events => self.event_row(n, t, obj),
            FileKind::Labels => self.label_row(n, t, obj),
        }
    }

    fn telemetry_row(&mut self, n: u64, t: u64, obj: &Map<String, Value>) {
        for (key, v) in obj {
            if v.is_object() || v.is_array() {
                self.problem(Some(n), format!("field {key} is nested; rows must be flat"));
            }
        }
        if let FileKind::Telemetry { source } = &self.kind {
            if obj.get("source").and_then(Value::as_str) != Some(source.as_str()) {
                let msg = format!(
                    "source is {}, not {source:?} as the file name says",
                    obj.get("source").unwrap_or(&Value::Null)
                );
                self.problem(Some(n), msg);
            }
        }
        if !obj
            .get("available_in_deployment")
            .is_some_and(Value::is_boolean)
        {
            self.problem(
                Some(n),
                "available_in_deployment missing or not a bool".into(),
            );
        }
        let seq = match obj.get("seq") {
            None | Some(Value::Null) => return,
            Some(v) => match v.as_u64() {
                Some(s) => s,
                None => {
                    self.problem(Some(n), "seq is not a non-negative integer".into());
                    return;
                }
            },
        };
        match self.last_seq {
            None => {
                self.first_seq = Some(seq);
                if seq > 0 {
                    self.holes.push(SeqHole {
                        from_seq: 0,
                        to_seq: seq - 1,
                        after_t: 0,
                        before_t: t,
                        line: n,
                    });
                }
            }
            Some((last, _)) if seq < last => {
                self.problem(Some(n), format!("seq decreased: {seq} after {last}"));
                return;
            }
            Some((last, last_t)) if seq > last + 1 => self.holes.push(SeqHole {
                from_seq: last + 1,
                to_seq: seq - 1,
                after_t: last_t,
                before_t: t,
                line: n,
            }),
            _ => {}
        }
        self.last_seq = Some((seq, t));
    }

    fn event_row(&mut self, n: u64, t: u64, obj: &Map<String, Value>) {
        let Some(event) = obj.get("event").and_then(Value::as_str) else {
            self.problem(Some(n), "event name missing or not a string".into());
            return;
        };
        let source = obj.get("source").and_then(Value::as_str).map(str::to_owned);
        if !self.event_names.iter().any(|e| e == event) {
            self.event_names.push(event.to_owned());
        }
        match event {
            "gap" => {
                let from = obj.get("from_seq").and_then(Value::as_u64);
                let to = obj.get("to_seq").and_then(Value::as_u64);
                match (source, from, to) {
                    (Some(s), Some(from_seq), Some(to_seq)) if from_seq <= to_seq => self
                        .gaps
                        .entry(s)
                        .or_default()
                        .push(GapDecl { from_seq, to_seq }),
                    _ => self.problem(
                        Some(n),
                        "gap event without source and from_seq <= to_seq".into(),
                    ),
                }
            }
            "source_error" => match source {
                Some(s) => self.source_errors.entry(s).or_default().push(t),
                None => self.problem(Some(n), "source_error event without source".into()),
            },
            _ => {}
        }
    }

    fn label_row(&mut self, n: u64, t: u64, obj: &Map<String, Value>) {
        let phase = obj.get("phase").and_then(Value::as_str);
        let prev = match obj.get("prev") {
            None => {
                self.problem(Some(n), "label row without prev".into());
                return;
            }
            Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.problem(Some(n), "prev is neither a string nor null".into());
                return;
            }
        };
        match phase {
            Some(p) => self.label_rows.push((t, p.to_owned(), prev)),
            None => self.problem(Some(n), "label row without a phase string".into()),
        }
    }

    /// Close the scan: the problems found and the file's manifest facts.
    pub fn finish(mut self) -> ScannedFile {
        for message in self.types.take().map(|t| t.finish()).unwrap_or_default() {
            self.problem(None, message);
        }
        let mut problems = std::mem::take(&mut self.problems);
        if let FileKind::Labels = self.kind {
            problems.extend(check_labels(&self.name, &self.label_rows));
        }
        if self.suppressed > 0 {
            problems.push(Problem::new(
                Some(&self.name),
                None,
                format!("... and {} more problems in this file", self.suppressed),
            ));
        }
        let source = match &self.kind {
            FileKind::Telemetry { source } => Some(source.clone()),
            _ => None,
        };
        ScannedFile {
            name: self.name,
            source,
            bytes: self.bytes,
            lines: self.lines,
            sha256: hex(&self.hasher.finalize()),
            partial_tail: self.partial_tail,
            first_seq: self.first_seq,
            last_seq: self.last_seq.map(|(s, _)| s),
            holes: self.holes,
            gaps: self.gaps,
            source_errors: self.source_errors,
            event_names: self.event_names,
            label_phases: self.label_rows.into_iter().map(|(_, p, _)| p).collect(),
            problems,
        }
    }
}

/// The facts of one scanned file.
#[derive(Debug, Clone)]
pub struct ScannedFile {
    pub name: String,
    pub source: Option<String>,
    pub bytes: u64,
    pub lines: u64,
    pub sha256: String,
    pub partial_tail: Option<u64>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub holes: Vec<SeqHole>,
    pub gaps: BTreeMap<String, Vec<GapDecl>>,
    pub source_errors: BTreeMap<String, Vec<u64>>,
    pub event_names: Vec<String>,
    pub label_phases: Vec<String>,
    pub problems: Vec<Problem>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Scan a whole byte slice (tests, small files).
pub fn scan_bytes(name: &str, kind: FileKind, data: &[u8]) -> ScannedFile {
    let mut scan = FileScan::new(name, kind);
    for chunk in data.split_inclusive(|&b| b == b'\n') {
        scan.feed(chunk);
    }
    scan.finish()
}

/// labels.jsonl: first row `clean` with prev null, known phases, prev equal to the phase
/// before, and no transition to the phase already current.
pub fn check_labels(file: &str, rows: &[(u64, String, Option<String>)]) -> Vec<Problem> {
    let mut out = Vec::new();
    if rows.is_empty() {
        out.push(Problem::new(
            Some(file),
            None,
            "no label rows (the first row must be clean)",
        ));
        return out;
    }
    let mut current: Option<&str> = None;
    for (i, (_, phase, prev)) in rows.iter().enumerate() {
        let line = Some(i as u64 + 1);
        if Phase::parse(phase).is_none() {
            out.push(Problem::new(
                Some(file),
                line,
                format!("unknown phase {phase:?}"),
            ));
        }
        if i == 0 && (phase != "clean" || prev.is_some()) {
            out.push(Problem::new(
                Some(file),
                line,
                format!("first label must be clean with prev null, found {phase:?} prev {prev:?}"),
            ));
        }
        if i > 0 && prev.as_deref() != current {
            out.push(Problem::new(
                Some(file),
                line,
                format!("prev {prev:?} does not match the phase before it ({current:?})"),
            ));
        }
        if current == Some(phase.as_str()) {
            out.push(Problem::new(
                Some(file),
                line,
                format!("transition to the phase already current ({phase})"),
            ));
        }
        current = Some(phase);
    }
    out
}

/// Whether the ranges cover every seq of `from..=to`; returns the first uncovered seq.
fn first_uncovered(from: u64, to: u64, ranges: &[(u64, u64)]) -> Option<u64> {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut next = from;
    for (a, b) in sorted {
        if a > next {
            break;
        }
        if b >= next {
            if b >= to {
                return None;
            }
            next = b + 1;
        }
    }
    Some(next)
}

/// Every hole in a stream's seq must be declared by `gap` events for that source (or, for a
/// tick the source itself failed, explained by a `source_error` between the rows around it);
/// and a declared gap must not contain seqs that have rows.
pub fn check_seq_holes(
    file: &ScannedFile,
    gaps: &[GapDecl],
    source_error_times: &[u64],
) -> Vec<Problem> {
    let mut out = Vec::new();
    let declared: Vec<(u64, u64)> = gaps.iter().map(|g| (g.from_seq, g.to_seq)).collect();
    for hole in &file.holes {
        if first_uncovered(hole.from_seq, hole.to_seq, &declared).is_none() {
            continue;
        }
        let explained = source_error_times
            .iter()
            .any(|&t| t >= hole.after_t && t <= hole.before_t);
        if !explained {
            out.push(Problem::new(
                Some(&file.name),
                Some(hole.line),
                format!(
                    "undeclared seq gap {}..={}: no gap event for source {} covers it",
                    hole.from_seq,
                    hole.to_seq,
                    file.source.as_deref().unwrap_or("?")
                ),
            ));
        }
    }
    if let (Some(first), Some(last)) = (file.first_seq, file.last_seq) {
        let holes: Vec<(u64, u64)> = file.holes.iter().map(|h| (h.from_seq, h.to_seq)).collect();
        for g in gaps {
            let (a, b) = (g.from_seq.max(first), g.to_seq.min(last));
            if a > b {
                continue;
            }
            if let Some(s) = first_uncovered(a, b, &holes) {
                out.push(Problem::new(
                    Some(&file.name),
                    None,
                    format!(
                        "gap event declares seq {}..={} missing, but rows with seq {s} exist",
                        g.from_seq, g.to_seq
                    ),
                ));
            }
        }
    }
    out
}

fn require_keys(out: &mut Vec<Problem>, v: &Value, path: &str, keys: &[&str]) {
    match v.as_object() {
        Some(obj) => {
            for k in keys {
                if !obj.contains_key(*k) {
                    out.push(Problem::new(
                        Some(META),
                        None,
                        format!("missing key {path}{k}"),
                    ));
                }
            }
        }
        None => out.push(Problem::new(
            Some(META),
            None,
            format!("{} is not an object", path.trim_end_matches('.')),
        )),
    }
}

/// meta.json: every contract key present; for a complete episode a result with a known
/// end_reason; sources[] agreeing with the telemetry files on disk.
pub fn check_meta(
    meta: &Value,
    dir_name: Option<&str>,
    complete: bool,
    files: &[ScannedFile],
) -> Vec<Problem> {
    let mut out = Vec::new();
    require_keys(
        &mut out,
        meta,
        "",
        &[
            "episode_id",
            "schema_version",
            "tool",
            "started_at_wall",
            "ended_at_wall",
            "clock",
            "host_fingerprint",
            "vm",
            "exploit",
            "sample",
            "schedule",
            "backend",
            "sources",
            "result",
        ],
    );
    if !out.is_empty() && !meta.is_object() {
        return out;
    }
    require_keys(&mut out, &meta["tool"], "tool.", &["name", "version"]);
    require_keys(
        &mut out,
        &meta["clock"],
        "clock.",
        &["mono_origin_ns", "wall_origin_ns"],
    );
    require_keys(
        &mut out,
        &meta["host_fingerprint"],
        "host_fingerprint.",
        &["hostname", "kernel", "cpus", "qemu_version"],
    );
    require_keys(
        &mut out,
        &meta["vm"],
        "vm.",
        &[
            "target_pid",
            "qemu_cmdline",
            "vcpus",
            "ram_mib",
            "vcpu_threads",
            "image_name",
            "image_sha256",
            "snapshot_name",
        ],
    );
    require_keys(
        &mut out,
        &meta["schedule"],
        "schedule.",
        &[
            "interval_ns",
            "rate_hz",
            "baseline_seconds",
            "infected_seconds",
            "dormant_seconds",
        ],
    );
    require_keys(
        &mut out,
        &meta["backend"],
        "backend.",
        &["requested", "used", "fallback_reason"],
    );
    if meta["schema_version"].as_u64() != Some(u64::from(crate::episode::meta::SCHEMA_VERSION)) {
        out.push(Problem::new(
            Some(META),
            None,
            format!("schema_version is {}, expected 1", meta["schema_version"]),
        ));
    }
    if let (Some(id), Some(dir)) = (meta["episode_id"].as_str(), dir_name) {
        if id != dir {
            out.push(Problem::new(
                Some(META),
                None,
                format!("episode_id {id} differs from the directory name {dir}"),
            ));
        }
    }
    let telemetry: BTreeMap<&str, &ScannedFile> = files
        .iter()
        .filter(|f| f.source.is_some())
        .map(|f| (f.name.as_str(), f))
        .collect();
    let mut listed = BTreeSet::new();
    let mut rows_sum = 0u64;
    if let Some(sources) = meta["sources"].as_array() {
        for (i, s) in sources.iter().enumerate() {
            require_keys(
                &mut out,
                s,
                &format!("sources[{i}]."),
                &["name", "file", "available_in_deployment", "rows", "errors"],
            );
            let name = s["name"].as_str().unwrap_or("?");
            let file = s["file"].as_str().unwrap_or("");
            let rows = s["rows"].as_u64().unwrap_or(0);
            rows_sum += rows;
            if file != format!("telemetry-{name}.jsonl")
                && file != format!("telemetry-{name}.jsonl.zst")
            {
                out.push(Problem::new(
                    Some(META),
                    None,
                    format!("sources[{i}] file {file:?} is not telemetry-{name}.jsonl"),
                ));
            }
            listed.insert(file.to_owned());
            match telemetry.get(file) {
                None => out.push(Problem::new(
                    Some(META),
                    None,
                    format!("sources[{i}] names {file}, which does not exist"),
                )),
                Some(f) if f.lines != rows => out.push(Problem::new(
                    Some(META),
                    None,
                    format!(
                        "sources[{i}] says {rows} rows, but {file} has {} lines",
                        f.lines
                    ),
                )),
                _ => {}
            }
        }
    } else if meta.get("sources").is_some() {
        out.push(Problem::new(Some(META), None, "sources is not an array"));
    }
    if complete {
        for name in telemetry.keys() {
            if !listed.contains(*name) {
                out.push(Problem::new(
                    Some(META),
                    None,
                    format!("{name} exists but meta.sources[] does not list it"),
                ));
            }
        }
    }
    match meta.get("result") {
        Some(Value::Null) | None => {
            if complete {
                out.push(Problem::new(
                    Some(META),
                    None,
                    "result is null in a complete episode",
                ));
            }
        }
        Some(result) => {
            require_keys(
                &mut out,
                result,
                "result.",
                &[
                    "end_reason",
                    "phases_observed",
                    "pid_alive_at_end",
                    "duration_observed_s",
                    "ticks_scheduled",
                    "ticks_missed",
                    "rows_total",
                ],
            );
            let reason = result["end_reason"].as_str().unwrap_or("");
            if !END_REASONS.contains(&reason) {
                out.push(Problem::new(
                    Some(META),
                    None,
                    format!(
                        "result.end_reason {:?} is not one of {END_REASONS:?}",
                        result["end_reason"]
                    ),
                ));
            }
            if let Some(total) = result["rows_total"].as_u64() {
                if total != rows_sum {
                    out.push(Problem::new(
                        Some(META),
                        None,
                        format!("result.rows_total {total} != sum of sources[].rows {rows_sum}"),
                    ));
                }
            }
            if meta["ended_at_wall"].is_null() {
                out.push(Problem::new(
                    Some(META),
                    None,
                    "ended_at_wall is null although result is set",
                ));
            }
            if let (Some(observed), Some(labels)) = (
                result["phases_observed"].as_array(),
                files.iter().find(|f| f.name == LABELS),
            ) {
                let a: BTreeSet<&str> = observed.iter().filter_map(Value::as_str).collect();
                let b: BTreeSet<&str> = labels.label_phases.iter().map(String::as_str).collect();
                if a != b {
                    out.push(Problem::new(
                        Some(META),
                        None,
                        format!("result.phases_observed {a:?} differs from the phases in labels.jsonl {b:?}"),
                    ));
                }
            }
        }
    }
    out
}

/// manifest.json against the files on disk: every listed file exists with the listed size,
/// line count and sha256, and every file but manifest.json and done.marker is listed.
pub fn check_manifest(
    manifest: &Value,
    meta_id: Option<&str>,
    on_disk: &BTreeMap<String, (u64, u64, String)>,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let m = |msg: String| Problem::new(Some(MANIFEST), None, msg);
    let Some(files) = manifest["files"].as_array() else {
        out.push(m("no files array".into()));
        return out;
    };
    if let (Some(a), Some(b)) = (manifest["episode_id"].as_str(), meta_id) {
        if a != b {
            out.push(m(format!("episode_id {a} differs from meta.json's {b}")));
        }
    }
    let mut listed = BTreeSet::new();
    for f in files {
        let Some(name) = f["name"].as_str() else {
            out.push(m("a files[] entry has no name".into()));
            continue;
        };
        listed.insert(name.to_owned());
        let Some((bytes, lines, sha)) = on_disk.get(name) else {
            out.push(m(format!("{name} is listed but missing")));
            continue;
        };
        if f["bytes"].as_u64() != Some(*bytes) {
            out.push(m(format!(
                "{name}: size {bytes} bytes, manifest says {}",
                f["bytes"]
            )));
        }
        if f["lines"].as_u64() != Some(*lines) {
            out.push(m(format!(
                "{name}: {lines} lines, manifest says {}",
                f["lines"]
            )));
        }
        if f["sha256"].as_str() != Some(sha.as_str()) {
            out.push(m(format!(
                "{name}: sha256 mismatch (content changed): {sha}, manifest says {}",
                f["sha256"]
            )));
        }
    }
    for name in on_disk.keys() {
        if name != MANIFEST && name != DONE && !listed.contains(name) {
            out.push(m(format!("{name} is in the episode but not listed")));
        }
    }
    out
}

/// Hashes and counts the raw bytes of a compressed stream as the decoder reads them.
struct RawHasher<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: std::io::Read> std::io::Read for RawHasher<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Feed every line of `reader` to `scan` through the line cap: memory stays bounded by
/// [`MAX_LINE_BYTES`] whatever the file (or a compressed stream) expands to. `check`
/// false only hashes and counts (files that are not JSON lines, e.g. meta.json).
/// `hash` false: the caller hashes the raw file itself (a compressed stream's size and
/// sha256 are those of the compressed bytes, so hashing the decoded ones would be waste).
fn scan_lines(
    reader: impl BufRead,
    scan: &mut FileScan,
    check: bool,
    hash: bool,
) -> std::io::Result<()> {
    let mut lines = LineReader::new(reader, MAX_LINE_BYTES);
    loop {
        let got = lines.next_line(|raw| {
            if hash {
                scan.absorb(raw)
            }
        })?;
        match got {
            LineRead::Eof => return Ok(()),
            LineRead::Line { terminated } if !check => scan.lines += u64::from(terminated),
            LineRead::TooLong { terminated, .. } if !check => scan.lines += u64::from(terminated),
            LineRead::Line { .. } => scan.check_line(lines.line()),
            LineRead::TooLong { bytes, terminated } => scan.too_long(bytes, terminated),
        }
    }
}

/// A `.jsonl.zst` stream: rows are checked on the decoded lines, while size and sha256
/// (what the manifest lists) are those of the compressed file.
fn scan_zstd_file(path: &Path, name: &str, kind: FileKind) -> Result<ScannedFile, String> {
    let (file, _) = untrusted::open_regular(path).map_err(|e| e.to_string())?;
    let mut scan = FileScan::new(name, kind).with_contract();
    let mut counted = RawHasher {
        inner: file,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut decode_error = None;
    {
        let decoder = untrusted::zstd_decoder(&mut counted).map_err(|e| e.to_string())?;
        let reader = BufReader::with_capacity(1 << 16, decoder);
        // What decoded before an error was checked; a frame cut short (a capture killed
        // hard) ends there.
        if let Err(e) = scan_lines(reader, &mut scan, true, false) {
            decode_error = Some(e.to_string());
        }
    }
    // Hash whatever the decoder did not need to read (trailing bytes after an error).
    std::io::copy(&mut counted, &mut std::io::sink()).map_err(|e| e.to_string())?;
    let mut scanned = scan.finish();
    scanned.bytes = counted.bytes;
    scanned.sha256 = hex(&counted.hasher.finalize());
    if let Some(e) = decode_error {
        scanned.problems.push(Problem::new(
            Some(name),
            None,
            format!("zstd stream does not decode to the end: {e}"),
        ));
    }
    Ok(scanned)
}

fn scan_file(path: &Path, name: &str, kind: Option<FileKind>) -> Result<ScannedFile, String> {
    if let (true, Some(kind)) = (name.ends_with(".zst"), kind.clone()) {
        return scan_zstd_file(path, name, kind);
    }
    let (file, _) = untrusted::open_regular(path).map_err(|e| e.to_string())?;
    let reader = BufReader::with_capacity(1 << 16, file);
    // Files that are not JSON lines (meta.json) are only hashed: treat them as an events
    // file whose lines are not checked.
    let mut scan = FileScan::new(name, kind.clone().unwrap_or(FileKind::Events)).with_contract();
    scan_lines(reader, &mut scan, kind.is_some(), true).map_err(|e| e.to_string())?;
    Ok(scan.finish())
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
        problems.extend(check_seq_holes(
            f,
            gaps.get(source).map(Vec::as_slice).unwrap_or(&[]),
            errors.get(source).map(Vec::as_slice).unwrap_or(&[]),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A telemetry-proc.jsonl of these rows, each given the header fields.
    fn tele(lines: &[&str]) -> ScannedFile {
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

    fn tele_raw(lines: &[String]) -> ScannedFile {
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

    #[test]
    fn intact_lines_pass_and_stats_match_the_writer() {
        let f = tele(&[
            r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":0,"tid":5}"#,
            r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":0,"tid":null}"#,
            r#"{"t_mono_ns":3,"t_wall_ns":4,"seq":1,"tid":5}"#,
        ]);
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert_eq!(f.lines, 3);
        assert!(f.holes.is_empty());
        assert_eq!((f.first_seq, f.last_seq), (Some(0), Some(1)));
    }

    #[test]
    fn truncated_final_line_is_reported() {
        let f = scan_bytes(
            "events.jsonl",
            FileKind::Events,
            b"{\"t_mono_ns\":1,\"t_wall_ns\":2,\"event\":\"x\"}\n{\"t_mono_ns\":3,\"t_w",
        );
        assert_eq!(f.lines, 1);
        assert_eq!(f.partial_tail, Some(19));
        assert!(
            f.problems[0].message.contains("truncated final line"),
            "{:?}",
            f.problems
        );
        assert_eq!(f.problems[0].line, Some(2));
    }

    #[test]
    fn bad_lines_non_monotonic_and_missing_clock_are_reported() {
        let f = tele(&[
            r#"{"t_mono_ns":5,"t_wall_ns":2,"seq":0}"#,
            r#"{"t_mono_ns":4,"t_wall_ns":2,"seq":1}"#,
            r#"[1,2]"#,
            r#"{"t_mono_ns":"6","t_wall_ns":2}"#,
            r#"{"t_mono_ns":7,"t_wall_ns":2,"x":{"a":1}}"#,
            r#"{"t_mono_ns":8,"t_wa"#,
        ]);
        let msgs: Vec<String> = f.problems.iter().map(ToString::to_string).collect();
        assert!(msgs[0].contains(":2: t_mono_ns decreased"), "{msgs:?}");
        assert!(msgs[1].contains(":3: not a JSON object"), "{msgs:?}");
        assert!(msgs[2].contains(":4: t_mono_ns missing"), "{msgs:?}");
        assert!(msgs[3].contains(":5: field x is nested"), "{msgs:?}");
        assert!(msgs[4].contains(":6: not valid JSON"), "{msgs:?}");
    }

    #[test]
    fn f9_duplicate_keys_in_a_row_are_a_problem() {
        let f = tele(&[
            r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":0,"kvm_exits":1,"kvm_exits":2}"#,
            r#"{"t_mono_ns":2,"t_wall_ns":2,"seq":1,"kvm_exits":1}"#,
        ]);
        assert_eq!(f.problems.len(), 1, "{:?}", f.problems);
        assert_eq!(f.problems[0].line, Some(1));
        assert!(
            f.problems[0]
                .message
                .contains(r#"duplicate keys ["kvm_exits"]"#),
            "{:?}",
            f.problems
        );
        let ev = scan_bytes(
            "events.jsonl",
            FileKind::Events,
            b"{\"t_mono_ns\":1,\"t_wall_ns\":1,\"event\":\"x\",\"event\":\"gap\"}\n",
        );
        assert!(
            ev.problems[0].message.contains("duplicate keys"),
            "{:?}",
            ev.problems
        );
    }

    #[test]
    fn f8_line_over_the_cap_is_a_problem_with_file_and_line() {
        let mut data = b"{\"t_mono_ns\":1,\"t_wall_ns\":1,\"event\":\"x\"}\n".to_vec();
        data.extend(std::iter::repeat_n(b' ', MAX_LINE_BYTES + 1));
        data.push(b'\n');
        let f = scan_bytes("events.jsonl", FileKind::Events, &data);
        assert_eq!(f.lines, 2);
        assert_eq!(f.bytes, data.len() as u64);
        let p = f.problems[0].to_string();
        assert!(
            p.starts_with(&format!(
                "events.jsonl:2: line is {} bytes, over the {MAX_LINE_BYTES}-byte line cap",
                MAX_LINE_BYTES + 2
            )),
            "{p}"
        );
    }

    #[test]
    fn seq_holes_must_be_declared() {
        let f = tele(&[
            r#"{"t_mono_ns":1,"t_wall_ns":1,"seq":0}"#,
            r#"{"t_mono_ns":2,"t_wall_ns":1,"seq":1}"#,
            r#"{"t_mono_ns":5,"t_wall_ns":1,"seq":4}"#,
            r#"{"t_mono_ns":6,"t_wall_ns":1,"seq":5}"#,
        ]);
        assert_eq!(f.holes.len(), 1);
        let undeclared = check_seq_holes(&f, &[], &[]);
        assert_eq!(undeclared.len(), 1);
        assert!(undeclared[0].message.contains("undeclared seq gap 2..=3"));
        assert_eq!(undeclared[0].line, Some(3));
        // Declared by two adjacent gap events.
        let gaps = [
            GapDecl {
                from_seq: 2,
                to_seq: 2,
            },
            GapDecl {
                from_seq: 3,
                to_seq: 3,
            },
        ];
        assert!(check_seq_holes(&f, &gaps, &[]).is_empty());
        // Half declared is still undeclared.
        assert_eq!(check_seq_holes(&f, &gaps[..1], &[]).len(), 1);
        // A failing source explains its own missing ticks.
        assert!(check_seq_holes(&f, &[], &[3]).is_empty());
        assert_eq!(check_seq_holes(&f, &[], &[9]).len(), 1);
        // A declared gap over seqs that have rows contradicts the stream.
        let wrong = check_seq_holes(
            &f,
            &[GapDecl {
                from_seq: 1,
                to_seq: 3,
            }],
            &[],
        );
        assert!(
            wrong[0].message.contains("rows with seq 1 exist"),
            "{wrong:?}"
        );
        // A gap at the end (after the last row) is fine.
        let end = [
            GapDecl {
                from_seq: 2,
                to_seq: 3,
            },
            GapDecl {
                from_seq: 6,
                to_seq: 9,
            },
        ];
        assert!(check_seq_holes(&f, &end, &[]).is_empty());
    }

    #[test]
    fn header_fields_must_match_the_file() {
        let f = tele_raw(&[
            r#"{"t_mono_ns":1,"t_wall_ns":1,"source":"qmp","available_in_deployment":false}"#
                .into(),
            r#"{"t_mono_ns":1,"t_wall_ns":1,"source":"proc","available_in_deployment":"no"}"#
                .into(),
        ]);
        assert!(
            f.problems[0]
                .message
                .contains("not \"proc\" as the file name says"),
            "{:?}",
            f.problems
        );
        assert!(
            f.problems[1].message.contains("available_in_deployment"),
            "{:?}",
            f.problems
        );
    }

    #[test]
    fn seq_decrease_is_a_problem() {
        let f = tele(&[
            r#"{"t_mono_ns":1,"t_wall_ns":1,"seq":1}"#,
            r#"{"t_mono_ns":2,"t_wall_ns":1,"seq":0}"#,
        ]);
        assert!(f
            .problems
            .iter()
            .any(|p| p.message.contains("seq decreased")));
        // The first row had seq 1: seq 0 is a hole before it.
        assert_eq!(f.holes[0].from_seq, 0);
    }

    #[test]
    fn events_collect_gaps_and_errors() {
        let f = scan_bytes(
            "events.jsonl",
            FileKind::Events,
            br#"{"t_mono_ns":1,"t_wall_ns":1,"event":"gap","source":"proc","from_seq":2,"to_seq":3}
{"t_mono_ns":2,"t_wall_ns":1,"event":"source_error","source":"qmp","message":"x"}
{"t_mono_ns":3,"t_wall_ns":1,"event":"gap","source":"proc","from_seq":5}
"#,
        );
        assert_eq!(
            f.gaps["proc"],
            vec![GapDecl {
                from_seq: 2,
                to_seq: 3
            }]
        );
        assert_eq!(f.source_errors["qmp"], vec![2]);
        assert_eq!(f.problems.len(), 1);
    }

    fn labels(rows: &[(&str, Option<&str>)]) -> Vec<Problem> {
        let rows: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, (p, prev))| (i as u64, p.to_string(), prev.map(str::to_owned)))
            .collect();
        check_labels("labels.jsonl", &rows)
    }

    #[test]
    fn label_chain_rules() {
        assert!(labels(&[
            ("clean", None),
            ("armed", Some("clean")),
            ("infecting", Some("armed"))
        ])
        .is_empty());
        assert!(labels(&[("armed", None)])[0]
            .message
            .contains("first label must be clean"));
        assert!(labels(&[("clean", Some("armed"))])[0]
            .message
            .contains("first label"));
        assert!(labels(&[("clean", None), ("bogus", Some("clean"))])[0]
            .message
            .contains("unknown phase"));
        assert!(labels(&[("clean", None), ("armed", Some("dormant"))])[0]
            .message
            .contains("does not match"));
        assert!(labels(&[("clean", None), ("clean", Some("clean"))])[0]
            .message
            .contains("already current"));
        assert!(labels(&[])[0].message.contains("no label rows"));
    }

    fn good_meta() -> Value {
        json!({
            "episode_id": "E", "schema_version": 1, "tool": {"name": "cis490", "version": "0"},
            "started_at_wall": "x", "ended_at_wall": "y",
            "clock": {"mono_origin_ns": 1, "wall_origin_ns": 2},
            "host_fingerprint": {"hostname": "h", "kernel": "k", "cpus": 2, "qemu_version": null},
            "vm": {"target_pid": 1, "qemu_cmdline": [], "vcpus": null, "ram_mib": null,
                   "vcpu_threads": [], "image_name": null, "image_sha256": null, "snapshot_name": null},
            "exploit": null, "sample": null,
            "schedule": {"interval_ns": 1, "rate_hz": 1, "baseline_seconds": null,
                         "infected_seconds": null, "dormant_seconds": null},
            "backend": {"requested": "proc", "used": "proc", "fallback_reason": null},
            "sources": [{"name": "proc", "file": "telemetry-proc.jsonl",
                         "available_in_deployment": false, "rows": 1, "errors": 0}],
            "result": {"end_reason": "duration", "phases_observed": ["clean"], "pid_alive_at_end": true,
                       "duration_observed_s": 1.0, "ticks_scheduled": 1, "ticks_missed": 0, "rows_total": 1}
        })
    }

    #[test]
    fn meta_contract() {
        let files = vec![
            tele(&[r#"{"t_mono_ns":1,"t_wall_ns":1,"seq":0}"#]),
            scan_bytes(
                "labels.jsonl",
                FileKind::Labels,
                b"{\"t_mono_ns\":1,\"t_wall_ns\":1,\"phase\":\"clean\",\"prev\":null}\n",
            ),
        ];
        assert!(check_meta(&good_meta(), Some("E"), true, &files).is_empty());
        let msgs = |m: &Value, complete| -> String {
            check_meta(m, Some("E"), complete, &files)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut m = good_meta();
        m["vm"].as_object_mut().unwrap().remove("vcpus");
        assert!(msgs(&m, true).contains("missing key vm.vcpus"));
        let mut m = good_meta();
        m["result"] = Value::Null;
        assert!(msgs(&m, true).contains("result is null"));
        assert!(!msgs(&m, false).contains("result is null"));
        let mut m = good_meta();
        m["result"]["end_reason"] = "crashed".into();
        assert!(msgs(&m, true).contains("end_reason"));
        let mut m = good_meta();
        m["sources"][0]["rows"] = 2.into();
        m["result"]["rows_total"] = 2.into();
        assert!(msgs(&m, true).contains("says 2 rows, but telemetry-proc.jsonl has 1 lines"));
        let mut m = good_meta();
        m["sources"] = json!([]);
        m["result"]["rows_total"] = 0.into();
        assert!(msgs(&m, true).contains("does not list it"));
        let mut m = good_meta();
        m["result"]["phases_observed"] = json!(["clean", "armed"]);
        assert!(msgs(&m, true).contains("phases_observed"));
        assert!(msgs(&good_meta(), true).is_empty());
        assert!(check_meta(&good_meta(), Some("F"), true, &files)[0]
            .message
            .contains("directory name"));
    }

    #[test]
    fn manifest_contract() {
        let mut disk = BTreeMap::new();
        disk.insert("a.jsonl".to_string(), (10, 2, "aa".to_string()));
        disk.insert(MANIFEST.to_string(), (1, 1, "m".to_string()));
        disk.insert(DONE.to_string(), (0, 0, "d".to_string()));
        let man = json!({"episode_id": "E", "files": [{"name": "a.jsonl", "bytes": 10, "lines": 2, "sha256": "aa"}]});
        assert!(check_manifest(&man, Some("E"), &disk).is_empty());
        let bad = json!({"episode_id": "E", "files": [{"name": "a.jsonl", "bytes": 11, "lines": 3, "sha256": "ab"},
                                                      {"name": "b.jsonl", "bytes": 1, "lines": 1, "sha256": "x"}]});
        let msgs: Vec<String> = check_manifest(&bad, Some("F"), &disk)
            .iter()
            .map(ToString::to_string)
            .collect();
        let all = msgs.join("\n");
        assert!(all.contains("differs from meta.json"), "{all}");
        assert!(all.contains("size 10 bytes"), "{all}");
        assert!(all.contains("2 lines"), "{all}");
        assert!(all.contains("sha256 mismatch"), "{all}");
        assert!(all.contains("b.jsonl is listed but missing"), "{all}");
        disk.insert(".meta.json.tmp".to_string(), (1, 0, "t".to_string()));
        assert!(check_manifest(&man, Some("E"), &disk)[0]
            .message
            .contains("not listed"));
    }
}
