//! The `agent` source: reads the in-guest agent's JSON lines from the chardev socket
//! behind the `cis490.guest.agent` virtserialport and writes each valid line as a row of
//! telemetry-agent.jsonl (host arrival stamps + the guest's fields as `guest_*`).
//!
//! Fixed memory whatever the guest sends: one read chunk plus one line buffer of at most
//! [`MAX_LINE`] bytes; a longer line is skipped to its newline without being kept. A
//! token bucket ([`FLOOD_RATE`] lines/s, burst [`FLOOD_BURST`]) drops floods before they
//! are parsed, so a flooding guest costs this thread one newline scan per line and never
//! touches the host sampler (own thread, own stream, no shared lock on the hot path).
//! Rejects are counted per reason (meta.sources[].rejects) and summarized in at most one
//! `agent_rejects` event per second. A line is stamped when it arrives; its own guest
//! clocks (`guest_t_guest_ns`, `guest_mono_ns`) are kept as they are, so the stale
//! first line after a connect (written while no host listened) stays recognizable.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map};

use super::line::{self, Reject, MAX_LINE};
use crate::collector::{BackgroundSource, SourceContext};
use crate::episode::meta::SourceMeta;
use crate::episode::telemetry_file;
use crate::error::Error;
use crate::jsonl::{FileStats, JsonlWriter};
use crate::qmp::collector::sleep_unless;
use crate::row::Row;

pub const SOURCE: &str = "agent";
pub const FLOOD_RATE: f64 = 1000.0;
pub const FLOOD_BURST: f64 = 200.0;
/// No line for this long while connected marks the source stale (the guest may be
/// paused or hung; the connection is kept).
pub const STALE_AFTER: Duration = Duration::from_secs(5);
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct AgentReaderConfig {
    pub socket: PathBuf,
}

#[derive(Default)]
struct Shared {
    rows: AtomicU64,
    errors: AtomicU64,
    connects: AtomicU64,
    bytes: AtomicU64,
    stale_count: AtomicU64,
    dropped_values: AtomicU64,
    rejects: [AtomicU64; Reject::ALL.len()],
}

pub struct AgentReader {
    cfg: AgentReaderConfig,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<Result<FileStats, Error>>>,
}

impl AgentReader {
    pub fn start(cfg: AgentReaderConfig, ctx: &SourceContext) -> Result<Self, Error> {
        let writer = JsonlWriter::create(&ctx.dir, &telemetry_file(SOURCE))?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let w = Worker {
            cfg: cfg.clone(),
            ctx: ctx.clone(),
            stop: stop.clone(),
            shared: shared.clone(),
            writer,
            line: Vec::with_capacity(MAX_LINE),
            discarding: false,
            tokens: FLOOD_BURST,
            last_refill: Instant::now(),
            reported: [0; Reject::ALL.len()],
            last_report: Instant::now(),
            seq: 0,
        };
        let handle = std::thread::Builder::new()
            .name("cis490-agent".into())
            .spawn(move || w.run())
            .map_err(|e| Error::io("spawning the agent reader thread", e))?;
        Ok(Self {
            cfg,
            stop,
            shared,
            handle: Some(handle),
        })
    }

    /// Reject counts so far, by reason.
    pub fn rejects(&self) -> Map<String, serde_json::Value> {
        rejects_map(&self.shared)
    }
}

fn rejects_map(s: &Shared) -> Map<String, serde_json::Value> {
    Reject::ALL
        .iter()
        .map(|r| {
            (
                r.as_str().to_owned(),
                s.rejects[r.index()].load(Ordering::Relaxed).into(),
            )
        })
        .collect()
}

impl BackgroundSource for AgentReader {
    fn source(&self) -> &'static str {
        SOURCE
    }

    fn finish(mut self: Box<Self>) -> (SourceMeta, Result<FileStats, Error>) {
        let stats = crate::collector::stop_and_join(&self.stop, self.handle.take(), "agent reader");
        let s = &self.shared;
        let rejects = rejects_map(s);
        let total: u64 = rejects.values().filter_map(|v| v.as_u64()).sum();
        let mut extra = Map::new();
        extra.insert(
            "socket".into(),
            self.cfg.socket.display().to_string().into(),
        );
        extra.insert("connects".into(), s.connects.load(Ordering::Relaxed).into());
        extra.insert("bytes_read".into(), s.bytes.load(Ordering::Relaxed).into());
        extra.insert(
            "stale_count".into(),
            s.stale_count.load(Ordering::Relaxed).into(),
        );
        extra.insert("rejected_lines".into(), total.into());
        extra.insert("rejects".into(), rejects.into());
        extra.insert(
            "dropped_values".into(),
            s.dropped_values.load(Ordering::Relaxed).into(),
        );
        let meta = SourceMeta {
            name: SOURCE.into(),
            file: telemetry_file(SOURCE),
            available_in_deployment: true,
            rows: s.rows.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            extra,
        };
        (meta, stats)
    }
}

impl Drop for AgentReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Worker {
    cfg: AgentReaderConfig,
    ctx: SourceContext,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    writer: JsonlWriter,
    line: Vec<u8>,
    /// Inside a too-long line: skip to its newline.
    discarding: bool,
    tokens: f64,
    last_refill: Instant,
    reported: [u64; Reject::ALL.len()],
    last_report: Instant,
    seq: u64,
}

impl Worker {
    fn run(mut self) -> Result<FileStats, Error> {
        let mut backoff = Duration::from_millis(100);
        let mut stale = false;
        let mut fatal = None;
        'outer: while !self.stop.load(Ordering::SeqCst) {
            let mut stream = match crate::qmp::transport::connect_unix(&self.cfg.socket) {
                Ok(s) => s,
                Err(e) => {
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    if !stale {
                        stale = true;
                        self.mark_stale(&format!("connect {}: {e}", self.cfg.socket.display()));
                    }
                    if !sleep_unless(&self.stop, backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            self.shared.connects.fetch_add(1, Ordering::Relaxed);
            self.ctx.events.emit(
                "agent_connected",
                json!({"source": SOURCE, "socket": self.cfg.socket}),
            );
            let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
            self.line.clear();
            self.discarding = false;
            let mut last_line = Instant::now();
            let mut chunk = vec![0u8; CHUNK];
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    break 'outer;
                }
                match stream.read(&mut chunk) {
                    Ok(0) => {
                        self.end_of_connection("agent socket closed");
                        stale = true;
                        break;
                    }
                    Ok(n) => {
                        self.shared.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        match self.feed(&chunk[..n]) {
                            Ok(0) => {}
                            Ok(_) => {
                                last_line = Instant::now();
                                if stale {
                                    stale = false;
                                    self.ctx
                                        .events
                                        .emit("source_recovered", json!({"source": SOURCE}));
                                }
                            }
                            Err(e) => {
                                fatal = Some(e);
                                break 'outer;
                            }
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        self.end_of_connection(&format!("agent read: {e}"));
                        stale = true;
                        break;
                    }
                }
                if !stale && last_line.elapsed() > STALE_AFTER {
                    stale = true;
                    self.mark_stale(&format!("no agent line for {} s", STALE_AFTER.as_secs()));
                }
                self.report_rejects(false);
                if let Err(e) = self.writer.flush_if_due() {
                    fatal = Some(e);
                    break 'outer;
                }
            }
            if !sleep_unless(&self.stop, backoff) {
                break;
            }
        }
        self.report_rejects(true);
        let closed = self.writer.close();
        match fatal {
            Some(e) => {
                self.ctx.events.emit(
                    "source_error",
                    json!({"source": SOURCE, "message": e.to_string(), "fatal": true}),
                );
                Err(e)
            }
            None => closed,
        }
    }

    fn mark_stale(&self, reason: &str) {
        self.shared.stale_count.fetch_add(1, Ordering::Relaxed);
        self.ctx.events.emit(
            "source_stale",
            json!({"source": SOURCE, "socket": self.cfg.socket, "message": reason}),
        );
    }

    fn end_of_connection(&mut self, reason: &str) {
        if !self.line.is_empty() || self.discarding {
            self.reject(Reject::Partial);
        }
        self.line.clear();
        self.discarding = false;
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
        self.mark_stale(reason);
    }

    fn reject(&mut self, r: Reject) {
        self.shared.rejects[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// At most one summary event per second (and one at the end).
    fn report_rejects(&mut self, last: bool) {
        if !last && self.last_report.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_report = Instant::now();
        let mut delta = Map::new();
        for r in Reject::ALL {
            let now = self.shared.rejects[r.index()].load(Ordering::Relaxed);
            let d = now - self.reported[r.index()];
            if d > 0 {
                delta.insert(r.as_str().into(), d.into());
            }
            self.reported[r.index()] = now;
        }
        if !delta.is_empty() {
            self.ctx.events.emit(
                "agent_rejects",
                json!({"source": SOURCE, "since_last_event": delta}),
            );
        }
    }

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = now;
        self.tokens = (self.tokens + dt * FLOOD_RATE).min(FLOOD_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Consume bytes; returns how many lines were written.
    fn feed(&mut self, mut data: &[u8]) -> Result<usize, Error> {
        let mut written = 0;
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n');
            let (part, rest, complete) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if self.discarding {
                if complete {
                    self.discarding = false;
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
            let stamp = self.ctx.clock.stamp();
            let res = line::check(&self.line);
            self.line.clear();
            match res {
                Ok(acc) => {
                    let mut row = Row::new(stamp, SOURCE, true);
                    row.seq = Some(self.seq);
                    self.seq += 1;
                    row.fields = acc.fields;
                    if acc.dropped_values > 0 {
                        self.shared
                            .dropped_values
                            .fetch_add(u64::from(acc.dropped_values), Ordering::Relaxed);
                    }
                    self.writer.write_row(&row)?;
                    self.shared.rows.fetch_add(1, Ordering::Relaxed);
                    written += 1;
                }
                Err(r) => self.reject(r),
            }
        }
        Ok(written)
    }
}
