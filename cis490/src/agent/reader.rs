//! The `agent` source: reads the in-guest agent's JSON lines from the chardev socket
//! behind the `cis490.guest.agent` virtserialport and writes each valid line as a row of
//! telemetry-agent.jsonl (host arrival stamps + the guest's fields as `guest_*`).
//!
//! Fixed memory whatever the guest sends: one read chunk plus one line buffer of at most
//! [`MAX_LINE`] bytes; a longer line is skipped to its newline without being kept. A
//! token bucket ([`FLOOD_RATE`] lines/s, burst [`FLOOD_BURST`]) drops floods before they
//! are parsed, so a flooding guest costs this thread one newline scan per line and never
//! touches the host sampler (own thread, own stream, no shared lock on the hot path).
//! Bytes are budgeted too, per second (token bucket, checked before parsing) and per
//! episode (checked exactly, against the row's own size), so a guest can fill at most its
//! share of the disk and never cost the host's own streams a row (issue 16, F4).
//! Rejects are counted per reason (meta.sources[].rejects) and summarized in at most one
//! `agent_rejects` event per second. A line is stamped when it arrives; its own guest
//! clocks (`guest_t_guest_ns`, `guest_mono_ns`) are kept as they are, so the stale
//! first line after a connect (written while no host listened) stays recognizable, and
//! `guest_mono_ns` against the arrival stamps gives the guest → host clock map
//! ([`super::clockmap`]) that places each line's sampling instant on the episode clock
//! (`t_sample_mono_ns`).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Map};

use super::clockmap::ClockMap;
use super::line::{self, Columns, Reject, ValueIssue, MAX_LINE};
use crate::collector::SourceContext;
use crate::contract::events::Event;
use crate::error::Error;
use crate::row::{Row, Value};
use crate::threaded::{self, Fault, Link, Running, SocketSource, Spec};

pub const SOURCE: &str = "agent";
pub const FLOOD_RATE: f64 = 1000.0;
pub const FLOOD_BURST: f64 = 200.0;
/// No line for this long while connected marks the source stale (the guest may be
/// paused or hung; the connection is kept).
pub const STALE_AFTER: Duration = Duration::from_secs(5);
const CHUNK: usize = 64 * 1024;

/// Default of `--agent-max-bytes-per-s`: ~70× what the lab agent writes at 10 Hz.
pub const DEFAULT_MAX_BYTES_PER_S: u64 = 1024 * 1024;
/// Ceiling of the default per-episode budget (see [`default_max_bytes`]).
pub const DEFAULT_MAX_BYTES_CAP: u64 = 1024 * 1024 * 1024;
/// Below this much budget left no row fits (the header alone is ~100 bytes): lines are
/// then dropped before parsing.
const MIN_ROW_BYTES: u64 = 128;

#[derive(Debug, Clone)]
pub struct AgentReaderConfig {
    pub socket: PathBuf,
    /// Bytes of telemetry-agent.jsonl per second (token bucket, burst one second).
    pub max_bytes_per_s: u64,
    /// Bytes of telemetry-agent.jsonl per episode; None = [`default_max_bytes`].
    pub max_bytes: Option<u64>,
}

impl AgentReaderConfig {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            max_bytes_per_s: DEFAULT_MAX_BYTES_PER_S,
            max_bytes: None,
        }
    }
}

/// The per-episode budget when none is given: a quarter of the space free for
/// unprivileged users where the episode is written, at most 1 GiB. A guest can then
/// never take the space the host's own streams need, even on a small file system.
pub fn default_max_bytes(dir: &std::path::Path) -> u64 {
    free_bytes(dir).map_or(DEFAULT_MAX_BYTES_CAP, |free| {
        (free / 4).min(DEFAULT_MAX_BYTES_CAP)
    })
}

// The statvfs field types differ between targets: the conversions are not useless on all.
#[allow(clippy::useless_conversion)]
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// The agent source: the stream's state between reads (one chunk, one line buffer) and
/// what meta.sources[agent] reports. Runs on [`crate::threaded`]'s runner.
pub struct AgentSource {
    cfg: AgentReaderConfig,
    stream: Option<UnixStream>,
    chunk: Vec<u8>,
    line: Vec<u8>,
    /// Inside a too-long line: skip to its newline.
    discarding: bool,
    /// Why the line being discarded is dropped, when it is counted at its newline (the
    /// byte budgets; a too-long line is counted when it is found too long).
    skip_reason: Option<Reject>,
    tokens: f64,
    /// Bytes the stream may still grow by this second (may go one row negative).
    byte_tokens: f64,
    /// Bytes the stream may still grow by in this episode.
    budget_left: u64,
    max_bytes: u64,
    last_refill: Instant,
    /// When the last row was written (the connection is stale after [`STALE_AFTER`]).
    last_line: Instant,
    columns: Columns,
    clock: ClockMap,
    /// A row serialized to measure it against the byte budgets.
    scratch: Vec<u8>,
    rejects: [u64; Reject::ALL.len()],
    value_issues: [u64; ValueIssue::ALL.len()],
    reported: [u64; Reject::ALL.len() + ValueIssue::ALL.len()],
    last_report: Instant,
    seq: u64,
    bytes_read: u64,
    bytes_written: u64,
}

/// Start reading the agent's socket on its own thread.
pub fn start(cfg: AgentReaderConfig, ctx: &SourceContext) -> Result<Running<AgentSource>, Error> {
    let spec = Spec {
        source: SOURCE,
        thread: "cis490-agent",
        available_in_deployment: true,
        socket: cfg.socket.clone(),
    };
    let link = Link::open(spec, ctx)?;
    let max_bytes = cfg
        .max_bytes
        .unwrap_or_else(|| default_max_bytes(ctx.dir.path()));
    let source = AgentSource {
        stream: None,
        chunk: vec![0u8; CHUNK],
        line: Vec::with_capacity(MAX_LINE),
        discarding: false,
        skip_reason: None,
        tokens: FLOOD_BURST,
        byte_tokens: cfg.max_bytes_per_s as f64,
        budget_left: max_bytes,
        max_bytes,
        last_refill: Instant::now(),
        last_line: Instant::now(),
        columns: Columns::new(),
        clock: ClockMap::new(),
        scratch: Vec::with_capacity(MAX_LINE * 2),
        rejects: [0; Reject::ALL.len()],
        value_issues: [0; ValueIssue::ALL.len()],
        reported: [0; Reject::ALL.len() + ValueIssue::ALL.len()],
        last_report: Instant::now(),
        seq: 0,
        bytes_read: 0,
        bytes_written: 0,
        cfg,
    };
    threaded::spawn(source, link)
}

impl SocketSource for AgentSource {
    fn connect(&mut self, link: &mut Link) -> Result<(), String> {
        let stream = crate::qmp::transport::connect_unix(&self.cfg.socket)
            .map_err(|e| format!("connect {}: {e}", self.cfg.socket.display()))?;
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        self.stream = Some(stream);
        self.line.clear();
        self.discarding = false;
        self.skip_reason = None;
        self.last_line = Instant::now();
        link.ctx.events.record(&Event::AgentConnected {
            source: SOURCE.into(),
            socket: Some(link.socket()),
        });
        Ok(())
    }

    fn session(&mut self, link: &mut Link) -> Result<(), Fault> {
        let Some(mut stream) = self.stream.take() else {
            return Err(Fault::Transport("agent socket not connected".into()));
        };
        let mut chunk = std::mem::take(&mut self.chunk);
        let res = self.serve(link, &mut stream, &mut chunk);
        self.chunk = chunk;
        self.stream = Some(stream);
        res
    }

    fn disconnect(&mut self, _link: &mut Link) {
        if !self.line.is_empty() || self.discarding {
            self.reject(Reject::Partial);
        }
        self.line.clear();
        self.discarding = false;
        self.skip_reason = None;
        self.stream = None;
    }

    fn wind_down(&mut self, link: &mut Link) {
        // Stopped (not disconnected) with half a line pending: the guest's last words.
        if !self.line.is_empty() || self.discarding {
            self.reject(Reject::PartialAtStop);
        }
        self.report_rejects(link, true);
    }

    fn summary(&self, extra: &mut Map<String, serde_json::Value>) {
        let total: u64 = self.rejects.iter().sum();
        extra.insert("bytes_read".into(), self.bytes_read.into());
        extra.insert("rejected_lines".into(), total.into());
        extra.insert("rejects".into(), self.rejects_map().into());
        extra.insert(
            "dropped_values".into(),
            self.value_issues[ValueIssue::Array.index()].into(),
        );
        extra.insert("bytes_written".into(), self.bytes_written.into());
        extra.insert(
            "byte_budget".into(),
            json!({"max_bytes": self.max_bytes,
                   "max_bytes_per_s": self.cfg.max_bytes_per_s}),
        );
        extra.insert(
            "clock_map".into(),
            match self.clock.fit() {
                Some(f) => json!({
                    "guest_clock": "guest_mono_ns",
                    "offset_ns": clamp_i64(f.offset_ns()),
                    "drift_ppm": (f.drift_ppm() * 1000.0).round() / 1000.0,
                    "uncertainty_ns": f.uncertainty_ns,
                    "samples": self.clock.samples(),
                    "drift_estimated": f.drift_estimated,
                    "span_s": f.span_ns as f64 / 1e9,
                    "ref_guest_mono_ns": f.ref_guest_ns,
                    "ref_t_mono_ns": clamp_i64(f.ref_host_ns),
                    "host_ns_per_guest_ns": 1.0 + f.slope,
                    "resets": self.clock.resets(),
                }),
                None => serde_json::Value::Null,
            },
        );
        extra.insert(
            "guest_columns".into(),
            self.columns
                .kinds()
                .map(|(n, k)| (n.to_owned(), k.map(line::Kind::as_str).into()))
                .collect::<Map<_, _>>()
                .into(),
        );
    }
}

impl AgentSource {
    /// Read the connection until the stop flag or a fault.
    fn serve(
        &mut self,
        link: &mut Link,
        stream: &mut UnixStream,
        chunk: &mut [u8],
    ) -> Result<(), Fault> {
        loop {
            if link.stopping() {
                return Ok(());
            }
            match stream.read(chunk) {
                Ok(0) => return Err(Fault::Transport("agent socket closed".into())),
                Ok(n) => {
                    self.bytes_read += n as u64;
                    if self.feed(link, &chunk[..n])? > 0 {
                        self.last_line = Instant::now();
                        link.alive();
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Fault::Transport(format!("agent read: {e}"))),
            }
            if self.last_line.elapsed() > STALE_AFTER {
                link.stale(&format!(
                    "no agent row written for {} s",
                    STALE_AFTER.as_secs()
                ));
            }
            self.report_rejects(link, false);
            link.flush_if_due()?;
        }
    }

    /// Whole lines dropped, by reason, then single values dropped or altered, by reason.
    fn rejects_map(&self) -> Map<String, serde_json::Value> {
        let lines = Reject::ALL
            .iter()
            .map(|r| (r.as_str(), self.rejects[r.index()]));
        let values = ValueIssue::ALL
            .iter()
            .map(|r| (r.as_str(), self.value_issues[r.index()]));
        lines
            .chain(values)
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect()
    }

    fn reject(&mut self, r: Reject) {
        self.rejects[r.index()] += 1;
    }

    /// At most one summary event per second (and one at the end).
    fn report_rejects(&mut self, link: &Link, last: bool) {
        if !last && self.last_report.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_report = Instant::now();
        let mut delta = Map::new();
        let counters = self.rejects.iter().zip(Reject::ALL.map(Reject::as_str));
        let values = (self.value_issues.iter()).zip(ValueIssue::ALL.map(ValueIssue::as_str));
        for (i, (&now, name)) in counters.chain(values).enumerate() {
            let d = now - self.reported[i];
            if d > 0 {
                delta.insert(name.into(), d.into());
            }
            self.reported[i] = now;
        }
        if !delta.is_empty() {
            link.ctx.events.record(&Event::AgentRejects {
                source: SOURCE.into(),
                since_last_event: serde_json::Value::Object(delta),
            });
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = now;
        self.tokens = (self.tokens + dt * FLOOD_RATE).min(FLOOD_BURST);
        let rate = self.cfg.max_bytes_per_s as f64;
        self.byte_tokens = (self.byte_tokens + dt * rate).min(rate);
    }

    /// Whether the byte budgets leave room for a line: checked when a line starts, so a
    /// line over budget is skipped to its newline without being copied or parsed.
    fn byte_budget_reject(&mut self) -> Option<Reject> {
        self.refill();
        if self.byte_tokens <= 0.0 {
            Some(Reject::ByteRate)
        } else if self.budget_left < MIN_ROW_BYTES {
            Some(Reject::ByteBudget)
        } else {
            None
        }
    }

    fn take_token(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Consume bytes; returns how many lines were written.
    fn feed(&mut self, link: &mut Link, mut data: &[u8]) -> Result<usize, Fault> {
        let mut written = 0;
        while !data.is_empty() {
            let nl = memchr::memchr(b'\n', data);
            let (part, rest, complete) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if !self.discarding && self.line.is_empty() {
                if let Some(r) = self.byte_budget_reject() {
                    self.skip_reason = Some(r);
                    self.discarding = true;
                }
            }
            if self.discarding {
                if complete {
                    self.discarding = false;
                    if let Some(r) = self.skip_reason.take() {
                        self.reject(r);
                    }
                }
                continue;
            }
            if self.line.len() + part.len() > MAX_LINE {
                // Too long: count it once, drop what we have, skip to its newline.
                self.reject(Reject::TooLong);
                self.line.clear();
                self.discarding = !complete;
                continue;
            }
            self.line.extend_from_slice(part);
            if !complete {
                continue;
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                self.line.clear();
                continue;
            }
            if !self.take_token() {
                self.reject(Reject::RateLimited);
                self.line.clear();
                continue;
            }
            let stamp = link.ctx.clock.stamp();
            let res = line::check(&self.line, &mut self.columns);
            self.line.clear();
            match res {
                Ok(acc) => {
                    for i in ValueIssue::ALL {
                        let n = acc.issue(i);
                        if n > 0 {
                            self.value_issues[i.index()] += u64::from(n);
                        }
                    }
                    let mut row = Row::new(stamp, SOURCE, true);
                    row.seq = Some(self.seq);
                    let sampled = guest_mono_ns(&acc.fields)
                        .and_then(|g| self.clock.observe(g, stamp.t_mono_ns))
                        .map_or(Value::Null, |t| Value::I64(clamp_i64(t)));
                    row.fields.reserve(acc.fields.len() + 1);
                    row.push("t_sample_mono_ns", sampled);
                    row.fields.extend(acc.fields);
                    // The exact size of what would be written, against the budgets.
                    self.scratch.clear();
                    row.write_json_line(&mut self.scratch);
                    let len = self.scratch.len() as u64;
                    if len > self.budget_left {
                        self.reject(Reject::ByteBudget);
                        continue;
                    }
                    self.budget_left -= len;
                    self.byte_tokens -= len as f64;
                    self.seq += 1;
                    link.write(&row)?;
                    self.bytes_written += len;
                    written += 1;
                }
                Err(r) => self.reject(r),
            }
        }
        Ok(written)
    }
}

/// The guest's sampling clock of a line, if it sent one as an integer.
fn guest_mono_ns(fields: &[(crate::row::FieldName, Value)]) -> Option<u64> {
    fields.iter().find_map(|(k, v)| match v {
        Value::U64(g) if k == "guest_mono_ns" => Some(*g),
        _ => None,
    })
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}
