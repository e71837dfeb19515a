//! Every line of one JSONL file: framing, size cap, clock fields, the header every row
//! carries, duplicate keys, and each value's type against the contract.

use super::*;
use crate::fields::RowMap;

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
        let row = match crate::fields::parse_object(body) {
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

    fn telemetry_row(&mut self, n: u64, t: u64, obj: &RowMap) {
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

    fn event_row(&mut self, n: u64, t: u64, obj: &RowMap) {
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

    fn label_row(&mut self, n: u64, t: u64, obj: &RowMap) {
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
            sha256: crate::jsonl::hex(&self.hasher.finalize()),
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

/// Scan a whole byte slice (tests, small files).
pub fn scan_bytes(name: &str, kind: FileKind, data: &[u8]) -> ScannedFile {
    let mut scan = FileScan::new(name, kind);
    for chunk in data.split_inclusive(|&b| b == b'\n') {
        scan.feed(chunk);
    }
    scan.finish()
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
    scanned.sha256 = crate::jsonl::hex(&counted.hasher.finalize());
    if let Some(e) = decode_error {
        scanned.problems.push(Problem::new(
            Some(name),
            None,
            format!("zstd stream does not decode to the end: {e}"),
        ));
    }
    Ok(scanned)
}

pub(super) fn scan_file(
    path: &Path,
    name: &str,
    kind: Option<FileKind>,
) -> Result<ScannedFile, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::testutil::*;

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
}
