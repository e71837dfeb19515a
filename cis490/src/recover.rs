//! `cis490 recover EPISODE`: seal an episode whose capture was killed hard (SIGKILL,
//! power loss), so its rows are not lost to tools that take only complete episodes.
//!
//! A capture flushes every stream at least every 0.5 s, so a killed one leaves whole
//! lines plus at most a partial last line per stream (a zstd stream: whole blocks plus a
//! cut one and no frame end). Recover drops the partial tail (a zstd stream is decoded to
//! its longest valid prefix and re-encoded), appends the `episode_end` event the capture
//! never wrote, writes meta.json with `end_reason: "recovered"` and the span the rows
//! cover, rebuilds manifest.json from the files on disk and writes done.marker last.
//!
//! It refuses a capture that is still running: one holding the episode's lock (taken by
//! `trace` for its whole life and released by the kernel when it dies) or whose control
//! socket answers. A stale control socket and our own leftover temp files are removed.
//! A sealed episode (done.marker present) is left exactly as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::contract::EndReason;
use crate::episode::dir::{is_temp_name, temp_name, try_lock};
use crate::episode::meta::{ResultMeta, SourceMeta};
use crate::episode::{
    self, stats_on_disk, EpisodeDir, Meta, CONTROL_SOCKET, DONE, EVENTS, LABELS, MANIFEST, META,
};
use crate::error::Error;
use crate::jsonl::FileStats;

/// One line longer than this is not a row cis490 wrote: recovery stops reading there.
const MAX_LINE: usize = 16 << 20;
/// meta.json is read whole; it is small (QEMU's command line is its largest part).
const MAX_META: u64 = 16 << 20;

/// What recovery did to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFix {
    pub file: String,
    /// Bytes of a partial last line removed (for .zst: decoded bytes).
    pub dropped_bytes: u64,
    /// Whole lines removed: a final line that is not a JSON object, or for .zst the
    /// decoded text after the last newline.
    pub dropped_lines: u64,
    pub reencoded: bool,
}

impl StreamFix {
    pub fn changed(&self) -> bool {
        self.dropped_bytes > 0 || self.dropped_lines > 0 || self.reencoded
    }
}

#[derive(Debug)]
pub struct RecoverOutcome {
    pub dir: PathBuf,
    /// done.marker was already there: nothing was changed.
    pub already_sealed: bool,
    pub fixes: Vec<StreamFix>,
    /// Entries removed: a stale control.sock, temp files of an interrupted write.
    pub removed: Vec<String>,
    /// Episode-relative end of the recovered data (the newest row's t_mono_ns).
    pub span_ns: u64,
    pub rows_total: u64,
}

impl RecoverOutcome {
    pub fn describe(&self) -> String {
        if self.already_sealed {
            return format!(
                "{}: already sealed (done.marker exists); nothing changed\n",
                self.dir.display()
            );
        }
        let mut out = String::new();
        for f in self.fixes.iter().filter(|f| f.changed()) {
            let mut what = Vec::new();
            if f.dropped_bytes > 0 {
                what.push(format!(
                    "dropped {} bytes of a partial last line",
                    f.dropped_bytes
                ));
            }
            if f.dropped_lines > 0 {
                what.push(format!(
                    "dropped {} unreadable final line(s)",
                    f.dropped_lines
                ));
            }
            if f.reencoded {
                what.push("re-encoded its decodable prefix as a whole zstd frame".into());
            }
            out.push_str(&format!("{}: {}\n", f.file, what.join(", ")));
        }
        for r in &self.removed {
            out.push_str(&format!("removed {r}\n"));
        }
        out.push_str(&format!(
            "{}: recovered {} rows over {:.3} s; sealed (end_reason \"recovered\")\n",
            self.dir.display(),
            self.rows_total,
            self.span_ns as f64 / 1e9
        ));
        out
    }
}

/// The last complete row of a stream, as recovery needs it.
#[derive(Debug, Default, Clone)]
struct Tail {
    t_mono_ns: Option<u64>,
    seq: Option<u64>,
    available_in_deployment: Option<bool>,
}

impl Tail {
    fn of(line: &[u8]) -> Option<Tail> {
        let v: Value = serde_json::from_slice(line).ok()?;
        let obj = v.as_object()?;
        Some(Tail {
            t_mono_ns: obj.get("t_mono_ns").and_then(Value::as_u64),
            seq: obj.get("seq").and_then(Value::as_u64),
            available_in_deployment: obj.get("available_in_deployment").and_then(Value::as_bool),
        })
    }
}

fn is_stream(name: &str) -> bool {
    name == EVENTS
        || name == LABELS
        || (name.starts_with("telemetry-")
            && (name.ends_with(".jsonl") || name.ends_with(".jsonl.zst")))
}

fn source_of(file: &str) -> Option<&str> {
    let s = file.strip_prefix("telemetry-")?;
    s.strip_suffix(".zst").unwrap_or(s).strip_suffix(".jsonl")
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Recover the episode at `path`.
pub fn run(path: &Path) -> Result<RecoverOutcome, Error> {
    let dir = EpisodeDir::open_existing(path)?;
    let mut outcome = RecoverOutcome {
        dir: dir.path().to_path_buf(),
        already_sealed: false,
        fixes: Vec::new(),
        removed: Vec::new(),
        span_ns: 0,
        rows_total: 0,
    };
    let st = dir.stat()?;
    if st.st_uid != euid() {
        return Err(Error::Usage(format!(
            "{}: owned by uid {}; recover only modifies episodes this user owns",
            path.display(),
            st.st_uid
        )));
    }
    if dir.stat_entry(DONE)?.is_some() {
        outcome.already_sealed = true;
        return Ok(outcome);
    }
    if !try_lock(&dir).map_err(|e| Error::io("locking the episode", e))? {
        return Err(Error::Usage(format!(
            "{}: the capture is still running (it holds the episode's lock); stop it instead",
            path.display()
        )));
    }
    let stale_socket = probe_control_socket(&dir)?;
    let mut meta = read_meta(&dir)?;
    for required in [EVENTS, LABELS] {
        if dir.stat_entry(required)?.is_none() {
            return Err(Error::Usage(format!(
                "{}: no {required}: the capture was killed before its streams existed, so it \
                 wrote no rows; nothing to recover",
                path.display()
            )));
        }
    }
    if stale_socket {
        dir.remove(CONTROL_SOCKET)?;
        outcome.removed.push(format!("stale {CONTROL_SOCKET}"));
    }
    for name in dir.entries()? {
        // Our own temp files (an atomic write cut short); only regular files.
        if is_temp_name(&name)
            && dir
                .stat_entry(&name)?
                .is_some_and(|s| rustix::fs::FileType::from_raw_mode(s.st_mode).is_file())
        {
            dir.remove(&name)?;
            outcome.removed.push(name);
        }
    }

    // Streams: drop partial tails and note each one's last row.
    let mut tails: BTreeMap<String, Tail> = BTreeMap::new();
    for name in dir.entries()?.into_iter().filter(|n| is_stream(n)) {
        let (fix, tail) = if name.ends_with(".zst") {
            fix_zstd(&dir, &name)?
        } else {
            fix_plain(&dir, &name)?
        };
        outcome.fixes.push(fix);
        tails.insert(name, tail);
    }
    if let Some(fix) = fix_pcap(&dir)? {
        outcome.fixes.push(fix);
    }
    let span_ns = tails
        .values()
        .filter_map(|t| t.t_mono_ns)
        .max()
        .unwrap_or(0);
    outcome.span_ns = span_ns;

    let events = scan_events(&dir)?;
    if dir.stat_entry(EVENTS)?.is_some() && !events.has_end {
        let t_mono = span_ns.max(events.last_t_mono);
        let line = json!({
            "t_mono_ns": t_mono,
            "t_wall_ns": meta.clock.wall_origin_ns + t_mono,
            "event": "episode_end",
            "end_reason": "recovered",
            "recovered_by": "cis490 recover",
        });
        let mut f = dir.open_regular(EVENTS, true)?;
        let mut text = serde_json::to_vec(&line).map_err(Error::Json)?;
        text.push(b'\n');
        f.seek(SeekFrom::End(0))
            .and_then(|_| f.write_all(&text))
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(format!("appending to {}", dir.join(EVENTS).display()), e))?;
    }
    let phases = scan_labels(&dir)?;

    // Every stream's figures from disk, after the fixes.
    let mut files: Vec<FileStats> = Vec::new();
    for name in dir.entries()? {
        if name == MANIFEST || name == DONE || name == META {
            continue;
        }
        let Some(st) = dir.stat_entry(&name)? else {
            continue;
        };
        if !rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() {
            // Not ours to list or remove; validate names it.
            continue;
        }
        files.push(stats_on_disk(&dir, &name)?);
    }

    // meta.sources: every telemetry stream on disk, keeping what the capture had already
    // recorded about a source (its extra facts) but with the rows really there.
    let old: BTreeMap<String, SourceMeta> = meta
        .sources
        .drain(..)
        .map(|s| (s.name.clone(), s))
        .collect();
    let mut sources = Vec::new();
    let mut max_seq: Option<u64> = None;
    let mut max_gap_ticks = 0u64;
    for f in files.iter().filter(|f| source_of(&f.name).is_some()) {
        let name = source_of(&f.name).unwrap_or_default().to_owned();
        let tail = tails.get(&f.name).cloned().unwrap_or_default();
        if let Some(seq) = tail.seq {
            max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
        }
        max_gap_ticks = max_gap_ticks.max(events.gap_ticks.get(&name).copied().unwrap_or(0));
        let errors = events.errors.get(&name).copied().unwrap_or(0);
        let s = match old.get(&name) {
            Some(o) => SourceMeta {
                file: f.name.clone(),
                rows: f.lines,
                errors: o.errors.max(errors),
                ..o.clone()
            },
            None => SourceMeta {
                name,
                file: f.name.clone(),
                available_in_deployment: tail.available_in_deployment.unwrap_or(false),
                rows: f.lines,
                errors,
                extra: Map::new(),
            },
        };
        sources.push(s);
    }
    let rows_total = sources.iter().map(|s| s.rows).sum();
    outcome.rows_total = rows_total;
    meta.sources = sources;
    let previous = meta.result.take();
    let mut extra = previous
        .as_ref()
        .map(|r| r.extra.clone())
        .unwrap_or_default();
    // A recovery that was itself interrupted after writing meta.json: keep the capture's
    // own end reason, not "recovered".
    let previous_end_reason = match previous.as_ref() {
        Some(r) if r.end_reason == EndReason::Recovered => extra
            .get("recovered")
            .and_then(|r| r["previous_end_reason"].as_str())
            .map(str::to_owned),
        Some(r) => Some(r.end_reason.as_str().to_owned()),
        None => None,
    };
    // A killed capture never wrote result.pcap: its capture.pcapng (cut to whole blocks
    // above) is described here, without the counts only the capture knew.
    if dir.stat_entry(crate::pcap::FILE)?.is_some() && !extra.contains_key(crate::pcap::META_KEY) {
        extra.insert(
            crate::pcap::META_KEY.into(),
            json!({"status": "written", "file": crate::pcap::FILE, "recovered_by": "cis490 recover"}),
        );
    }
    extra.insert(
        "recovered".into(),
        json!({
            "previous_end_reason": previous_end_reason,
            "recovered_at": crate::trace::rfc3339_from_ns(now_wall_ns()),
            "dropped": outcome.fixes.iter()
                .filter(|f| f.changed())
                .map(|f| json!({"file": f.file, "bytes": f.dropped_bytes, "lines": f.dropped_lines,
                                "reencoded": f.reencoded}))
                .collect::<Vec<_>>(),
            "removed": outcome.removed,
        }),
    );
    meta.ended_at_wall = Some(crate::trace::rfc3339_from_ns(
        meta.clock.wall_origin_ns + span_ns,
    ));
    meta.result = Some(ResultMeta {
        end_reason: EndReason::Recovered,
        phases_observed: phases,
        // Whether the target outlived the capture is unknown after a kill; keep what the
        // capture had recorded, else false.
        pid_alive_at_end: previous.as_ref().is_some_and(|r| r.pid_alive_at_end),
        duration_observed_s: span_ns as f64 / 1e9,
        ticks_scheduled: previous
            .as_ref()
            .map_or(max_seq.map_or(0, |s| s + 1), |r| r.ticks_scheduled),
        ticks_missed: previous.as_ref().map_or(max_gap_ticks, |r| r.ticks_missed),
        rows_total,
        error: previous.as_ref().and_then(|r| r.error.clone()),
        extra,
    });
    dir.write_json_atomic(META, &meta)?;
    files.push(stats_on_disk(&dir, META)?);
    episode::seal(&dir, &meta.episode_id, files)?;
    Ok(outcome)
}

/// Refuse when the episode's control socket answers (its capture is running); `true`
/// when a socket is there but nobody listens (a killed capture's, to remove).
fn probe_control_socket(dir: &EpisodeDir) -> Result<bool, Error> {
    let Some(sock) = dir.stat_entry(CONTROL_SOCKET)? else {
        return Ok(false);
    };
    if rustix::fs::FileType::from_raw_mode(sock.st_mode) != rustix::fs::FileType::Socket {
        return Err(Error::Usage(format!(
            "{}: {CONTROL_SOCKET} is not a socket; refusing to touch this episode",
            dir.path().display()
        )));
    }
    match std::os::unix::net::UnixStream::connect(dir.fd_path(CONTROL_SOCKET)) {
        Ok(s) => {
            // Closing at once: the capture reads an empty request and answers nothing.
            let _ = s.shutdown(std::net::Shutdown::Both);
            Err(Error::Usage(format!(
                "{}: the capture is still running (its control socket answers); stop it instead",
                dir.path().display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(true),
        Err(e) => Err(Error::io(
            format!("probing {}", dir.join(CONTROL_SOCKET).display()),
            e,
        )),
    }
}

fn now_wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn read_meta(dir: &EpisodeDir) -> Result<Meta, Error> {
    if dir.stat_entry(META)?.is_none() {
        return Err(Error::Usage(format!(
            "{}: no meta.json: not an episode, or killed before its first write (nothing to recover)",
            dir.path().display()
        )));
    }
    let file = dir.open_regular(META, false)?;
    let mut text = Vec::new();
    file.take(MAX_META + 1)
        .read_to_end(&mut text)
        .map_err(|e| Error::io(format!("reading {}", dir.join(META).display()), e))?;
    if text.len() as u64 > MAX_META {
        return Err(Error::Usage(format!(
            "{}: larger than {MAX_META} bytes",
            dir.join(META).display()
        )));
    }
    serde_json::from_slice(&text).map_err(|e| {
        Error::Usage(format!(
            "{}: not a cis490 meta.json ({e})",
            dir.join(META).display()
        ))
    })
}

/// Read `reader` line by line (at most [`MAX_LINE`] bytes a line), calling `each` with
/// every complete line. Returns the bytes after the last newline (a partial line), or
/// `Err` position info when a line is too long (then reading stops at its start).
struct LineScan {
    /// Bytes of complete lines seen.
    good_bytes: u64,
    /// Bytes read past the last newline.
    partial: u64,
    /// Reading stopped early: a too-long line or a read error (e.g. a cut zstd frame).
    stopped: bool,
}

fn scan_lines(reader: impl Read, mut each: impl FnMut(&[u8])) -> LineScan {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let mut line: Vec<u8> = Vec::new();
    let mut scan = LineScan {
        good_bytes: 0,
        partial: 0,
        stopped: false,
    };
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) => break,
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                scan.stopped = true;
                break;
            }
        };
        let (take, done) = match memchr(buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE {
            scan.stopped = true;
            break;
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            each(&line);
            scan.good_bytes += line.len() as u64;
            line.clear();
        }
    }
    scan.partial = line.len() as u64;
    scan
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// A plain stream: cut it after its last complete line that is a JSON object.
fn fix_plain(dir: &EpisodeDir, name: &str) -> Result<(StreamFix, Tail), Error> {
    use std::os::unix::fs::FileExt;
    let ctx = || format!("recovering {}", dir.join(name).display());
    let mut file = dir.open_regular(name, true)?;
    let size = file.metadata().map_err(|e| Error::io(ctx(), e))?.len();
    // (start, length) of the last few lines, to step back over unreadable ones; only
    // these are parsed (parsing every row would cost most of the time).
    let mut last_lines: std::collections::VecDeque<(u64, usize)> = Default::default();
    let mut offset = 0u64;
    let scan = scan_lines(&mut file, |line| {
        if last_lines.len() == 8 {
            last_lines.pop_front();
        }
        last_lines.push_back((offset, line.len()));
        offset += line.len() as u64;
    });
    if scan.stopped {
        // A line too long to be a row, or a read error: cutting there could drop whole
        // rows after it, so leave the file as it is.
        return Err(Error::Other(format!(
            "{}: unreadable at byte {} (a line longer than {MAX_LINE} bytes or a read error); \
             not modified",
            dir.join(name).display(),
            scan.good_bytes
        )));
    }
    let mut keep = scan.good_bytes;
    let mut dropped_lines = 0;
    let mut tail = Tail::default();
    let mut line = Vec::new();
    // A power loss can leave a whole but garbled last line (e.g. zero-filled blocks
    // ending in a newline of a later write): drop such lines at the very end only.
    while let Some((start, len)) = last_lines.pop_back() {
        line.resize(len, 0);
        file.read_exact_at(&mut line, start)
            .map_err(|e| Error::io(ctx(), e))?;
        if let Some(t) = Tail::of(&line) {
            tail = t;
            break;
        }
        keep = start;
        dropped_lines += 1;
    }
    if keep < size {
        file.set_len(keep)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(ctx(), e))?;
    }
    Ok((
        StreamFix {
            file: name.to_owned(),
            dropped_bytes: size - keep,
            dropped_lines,
            reencoded: false,
        },
        tail,
    ))
}

/// capture.pcapng (`--pcap`) of a killed capture: cut a torn last block, so the file is
/// whole blocks that any pcapng reader takes. A file that is not pcapng from its start is
/// left as it is (validate names it).
fn fix_pcap(dir: &EpisodeDir) -> Result<Option<StreamFix>, Error> {
    let name = crate::pcap::FILE;
    let Some(st) = dir.stat_entry(name)? else {
        return Ok(None);
    };
    if !rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() {
        return Ok(None);
    }
    let ctx = || format!("recovering {}", dir.join(name).display());
    let file = dir.open_regular(name, true)?;
    let walk = crate::pcap::walk_file(&file).map_err(|e| Error::io(ctx(), e))?;
    let size = st.st_size as u64;
    let keep = walk.whole_bytes;
    if walk.stopped.is_some() && keep > 0 && keep < size {
        file.set_len(keep)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(ctx(), e))?;
    }
    Ok(Some(StreamFix {
        file: name.to_owned(),
        dropped_bytes: if keep > 0 { size - keep } else { 0 },
        dropped_lines: 0,
        reencoded: false,
    }))
}

/// A zstd stream: decode its longest valid prefix; when that is not the whole file (no
/// frame end, a cut block, a partial line), re-encode the complete lines into a new file
/// that replaces it.
fn fix_zstd(dir: &EpisodeDir, name: &str) -> Result<(StreamFix, Tail), Error> {
    let ctx = || format!("recovering {}", dir.join(name).display());
    let file = dir.open_regular(name, false)?;
    let tmp = temp_name(name);
    let out = dir.create_file(&tmp)?;
    let result = (|| -> Result<(StreamFix, Tail, bool), Error> {
        let mut enc = zstd::stream::write::Encoder::new(out, 3).map_err(|e| Error::io(ctx(), e))?;
        let mut tail = Tail::default();
        let mut write_err = None;
        let decoder = zstd::stream::read::Decoder::new(file).map_err(|e| Error::io(ctx(), e))?;
        let mut last = Vec::new();
        let scan = scan_lines(decoder, |line| {
            last.clear();
            last.extend_from_slice(line);
            if write_err.is_none() {
                if let Err(e) = enc.write_all(line) {
                    write_err = Some(e);
                }
            }
        });
        if let Some(e) = write_err {
            return Err(Error::io(ctx(), e));
        }
        if let Some(t) = Tail::of(&last) {
            tail = t;
        }
        let intact = !scan.stopped && scan.partial == 0;
        let out = enc.finish().map_err(|e| Error::io(ctx(), e))?;
        out.sync_all().map_err(|e| Error::io(ctx(), e))?;
        Ok((
            StreamFix {
                file: name.to_owned(),
                dropped_bytes: scan.partial,
                dropped_lines: 0,
                reencoded: !intact,
            },
            tail,
            intact,
        ))
    })();
    match result {
        Ok((fix, tail, true)) => {
            dir.remove(&tmp)?;
            Ok((fix, tail))
        }
        Ok((fix, tail, false)) => {
            dir.rename(&tmp, name)?;
            dir.sync()?;
            Ok((fix, tail))
        }
        Err(e) => {
            let _ = dir.remove(&tmp);
            Err(e)
        }
    }
}

#[derive(Default)]
struct EventFacts {
    has_end: bool,
    last_t_mono: u64,
    /// `source_error` events per source.
    errors: BTreeMap<String, u64>,
    /// Ticks declared missing by `gap` events, per source.
    gap_ticks: BTreeMap<String, u64>,
}

fn scan_events(dir: &EpisodeDir) -> Result<EventFacts, Error> {
    let mut facts = EventFacts::default();
    if dir.stat_entry(EVENTS)?.is_none() {
        return Ok(facts);
    }
    let file = dir.open_regular(EVENTS, false)?;
    scan_lines(file, |line| {
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        if let Some(t) = obj.get("t_mono_ns").and_then(Value::as_u64) {
            facts.last_t_mono = facts.last_t_mono.max(t);
        }
        let source = obj.get("source").and_then(Value::as_str).unwrap_or("");
        match obj.get("event").and_then(Value::as_str) {
            Some("episode_end") => facts.has_end = true,
            Some("source_error") => *facts.errors.entry(source.to_owned()).or_default() += 1,
            Some("gap") => {
                let from = obj.get("from_seq").and_then(Value::as_u64).unwrap_or(0);
                let to = obj.get("to_seq").and_then(Value::as_u64).unwrap_or(from);
                *facts.gap_ticks.entry(source.to_owned()).or_default() +=
                    to.saturating_sub(from) + 1;
            }
            _ => {}
        }
    });
    Ok(facts)
}

/// The phases in labels.jsonl, in order of first appearance.
fn scan_labels(dir: &EpisodeDir) -> Result<Vec<String>, Error> {
    let mut phases = Vec::new();
    let mut seen = BTreeSet::new();
    if dir.stat_entry(LABELS)?.is_none() {
        return Ok(phases);
    }
    let file = dir.open_regular(LABELS, false)?;
    scan_lines(file, |line| {
        if let Ok(v) = serde_json::from_slice::<Value>(line) {
            if let Some(p) = v["phase"].as_str() {
                if seen.insert(p.to_owned()) {
                    phases.push(p.to_owned());
                }
            }
        }
    });
    Ok(phases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_refuses_an_episode_whose_control_socket_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join(CONTROL_SOCKET);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = run(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("control socket answers"), "{err}");
        assert!(sock.exists());
        // Nobody listening any more: a stale socket, removed only once the directory is
        // known to be an episode (this one has no meta.json: left alone).
        drop(listener);
        let err = run(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("no meta.json"), "{err}");
        assert!(sock.exists());
        // Something else under the socket's name: refused, untouched.
        std::fs::remove_file(&sock).unwrap();
        std::fs::write(&sock, b"x").unwrap();
        let err = run(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }

    #[test]
    fn source_names_come_from_stream_files() {
        assert_eq!(source_of("telemetry-proc.jsonl"), Some("proc"));
        assert_eq!(source_of("telemetry-bpf-io.jsonl.zst"), Some("bpf-io"));
        assert_eq!(source_of("events.jsonl"), None);
        assert!(is_stream("labels.jsonl") && !is_stream("meta.json"));
    }

    #[test]
    fn line_scan_keeps_complete_lines_and_measures_the_partial_tail() {
        let mut lines = Vec::new();
        let s = scan_lines(&b"{\"a\":1}\n{\"a\":2}\n{\"a\""[..], |l| {
            lines.push(l.to_vec())
        });
        assert_eq!(lines.len(), 2);
        assert_eq!((s.good_bytes, s.partial, s.stopped), (16, 4, false));
    }

    #[test]
    fn plain_stream_loses_only_its_partial_and_garbled_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = EpisodeDir::open_existing(tmp.path()).unwrap();
        let good = "{\"t_mono_ns\":5,\"seq\":0}\n{\"t_mono_ns\":7,\"seq\":1}\n";
        let partial = "{\"t_mono_ns\":9,\"se";
        std::fs::write(
            tmp.path().join("telemetry-proc.jsonl"),
            format!("{good}\0\0\0\n{partial}"),
        )
        .unwrap();
        let (fix, tail) = fix_plain(&dir, "telemetry-proc.jsonl").unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("telemetry-proc.jsonl")).unwrap(),
            good
        );
        assert_eq!(
            (fix.dropped_lines, fix.dropped_bytes),
            (1, 4 + partial.len() as u64)
        );
        assert_eq!((tail.t_mono_ns, tail.seq), (Some(7), Some(1)));
        // A second pass finds nothing to drop.
        let (fix, _) = fix_plain(&dir, "telemetry-proc.jsonl").unwrap();
        assert_eq!((fix.dropped_lines, fix.dropped_bytes), (0, 0));
    }

    #[test]
    fn plain_stream_with_an_overlong_line_is_left_unmodified() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = EpisodeDir::open_existing(tmp.path()).unwrap();
        let mut data = b"{\"t_mono_ns\":5}\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE + 1));
        data.extend_from_slice(b"\n{\"t_mono_ns\":6}\n{\"t_mo");
        let path = tmp.path().join("telemetry-agent.jsonl");
        std::fs::write(&path, &data).unwrap();
        let err = fix_plain(&dir, "telemetry-agent.jsonl").unwrap_err();
        assert!(err.to_string().contains("not modified"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn cut_zstd_stream_is_reencoded_to_its_decodable_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = EpisodeDir::open_existing(tmp.path()).unwrap();
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        let mut plain = Vec::new();
        for i in 0..2000u64 {
            let line = format!("{{\"t_mono_ns\":{i},\"seq\":{i}}}\n");
            enc.write_all(line.as_bytes()).unwrap();
            if i % 100 == 99 {
                enc.flush().unwrap();
            }
            if i < 1000 {
                plain.extend_from_slice(line.as_bytes());
            }
            if i == 999 {
                enc.flush().unwrap();
            }
        }
        // As a kill leaves it: flushed blocks, then a cut one, no frame end.
        let flushed = enc.get_ref().len();
        let mut bytes = enc.get_ref().clone();
        let cut_at = bytes.len() - 7;
        bytes.truncate(cut_at);
        assert!(flushed > cut_at);
        let name = "telemetry-proc.jsonl.zst";
        std::fs::write(tmp.path().join(name), &bytes).unwrap();
        let (fix, tail) = fix_zstd(&dir, name).unwrap();
        assert!(fix.reencoded);
        let decoded =
            zstd::stream::decode_all(std::fs::File::open(tmp.path().join(name)).unwrap()).unwrap();
        assert!(decoded.len() >= plain.len() && decoded.starts_with(&plain));
        assert!(decoded.ends_with(b"\n"));
        let last = decoded[..decoded.len() - 1]
            .rsplit(|&b| b == b'\n')
            .next()
            .unwrap();
        assert_eq!(tail.t_mono_ns, Tail::of(last).unwrap().t_mono_ns);
        // Now whole: a second pass leaves the file byte for byte.
        let before = std::fs::read(tmp.path().join(name)).unwrap();
        let (fix, _) = fix_zstd(&dir, name).unwrap();
        assert!(!fix.reencoded);
        assert_eq!(std::fs::read(tmp.path().join(name)).unwrap(), before);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
