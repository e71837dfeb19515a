//! One runner for the sources that read a socket on a thread of their own (QMP, the
//! guest agent), so that a stalled socket can never delay a host tick.
//!
//! The runner owns what every such source needs and none should write twice: the
//! stream's writer (opened in the episode, closed and handed back for the manifest),
//! connecting with backoff (100 ms doubling to 2 s), `source_stale` once per outage and
//! `source_recovered` when the source has a sign of life again, a fatal write error as
//! a `source_error`, the connects/stale/row/error counts of meta.sources[], and the stop
//! flag. A source only says how to connect, how to run one connection, and what it
//! summarizes at the end ([`SocketSource`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value as Json};

use crate::collector::SourceContext;
use crate::contract::events::Event;
use crate::episode::meta::SourceMeta;
use crate::episode::telemetry_file;
use crate::error::Error;
use crate::jsonl::{FileStats, JsonlWriter};
use crate::row::Row;

/// The first wait after a failed connect or a lost connection; it doubles up to
/// [`BACKOFF_MAX`] while connects keep failing, and starts over after a good one.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a connection ended before the capture did.
#[derive(Debug)]
pub enum Fault {
    /// The connection is unusable (closed, stalled, garbage): the runner marks the source
    /// stale and reconnects.
    Transport(String),
    /// Writing the stream failed: the source cannot go on.
    Write(Error),
}

impl From<Error> for Fault {
    fn from(e: Error) -> Self {
        Fault::Write(e)
    }
}

/// A source that runs on its own thread and reads one socket, reconnecting when it must.
pub trait SocketSource: Send + 'static {
    /// Open a connection (and run any handshake); `Err` is the reason, one line.
    fn connect(&mut self, link: &mut Link) -> Result<(), String>;
    /// Serve the open connection until the stop flag (`Ok`) or a fault.
    fn session(&mut self, link: &mut Link) -> Result<(), Fault>;
    /// Drop the connection after a fault, with whatever it left half-read.
    fn disconnect(&mut self, link: &mut Link);
    /// After the last session, whatever its end: what is still buffered goes out.
    fn wind_down(&mut self, link: &mut Link);
    /// The source's own facts for its meta.sources[] entry.
    fn summary(&self, extra: &mut Map<String, Json>);
}

/// What a source is, for its stream and meta.sources[].
#[derive(Debug, Clone)]
pub struct Spec {
    pub source: &'static str,
    /// The thread's name (`cis490-<source>`).
    pub thread: &'static str,
    pub available_in_deployment: bool,
    pub socket: PathBuf,
}

/// A source's way to the episode while it runs: its stream, the shared event log and
/// clock, its health, and the stop flag.
pub struct Link {
    pub ctx: SourceContext,
    spec: Spec,
    writer: JsonlWriter,
    stop: Arc<AtomicBool>,
    stale: bool,
    rows: u64,
    errors: u64,
    connects: u64,
    stale_count: u64,
}

impl Link {
    /// Open the source's stream in the episode (before its thread starts, so a source can
    /// do synchronous start-up work on it: QMP's vCPU map).
    pub fn open(spec: Spec, ctx: &SourceContext) -> Result<Self, Error> {
        let writer = JsonlWriter::create(&ctx.dir, &telemetry_file(spec.source))?;
        Ok(Self {
            ctx: ctx.clone(),
            spec,
            writer,
            stop: Arc::new(AtomicBool::new(false)),
            stale: false,
            rows: 0,
            errors: 0,
            connects: 0,
            stale_count: 0,
        })
    }

    pub fn source(&self) -> &'static str {
        self.spec.source
    }

    pub fn socket(&self) -> String {
        self.spec.socket.display().to_string()
    }

    /// Write one row of the stream.
    pub fn write(&mut self, row: &Row) -> Result<(), Fault> {
        self.writer.write_row(row)?;
        self.rows += 1;
        Ok(())
    }

    /// Flush the stream when its interval has passed (rows reach the disk in bounded time).
    pub fn flush_if_due(&mut self) -> Result<(), Fault> {
        Ok(self.writer.flush_if_due()?)
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Count a problem that cost data (a refused command, a failed connect).
    pub fn error(&mut self) {
        self.errors += 1;
    }

    /// Count a connection made.
    pub fn connected(&mut self) {
        self.connects += 1;
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleep `d` in small steps; false if the stop flag was raised meanwhile.
    pub fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.stopping() {
                return false;
            }
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(20)));
        }
        !self.stopping()
    }

    /// The source has no usable data now: one `source_stale` per outage.
    pub fn stale(&mut self, reason: &str) {
        if self.stale {
            return;
        }
        self.stale = true;
        self.stale_count += 1;
        let event = Event::SourceStale {
            source: self.spec.source.into(),
            socket: Some(self.socket()),
            message: reason.into(),
        };
        self.ctx.events.record(&event);
    }

    /// A sign of life: `source_recovered` if the source was stale.
    pub fn alive(&mut self) {
        if std::mem::take(&mut self.stale) {
            let event = Event::SourceRecovered {
                source: self.spec.source.into(),
                socket: Some(self.socket()),
            };
            self.ctx.events.record(&event);
        }
    }
}

/// Start `source` on its own thread.
pub fn spawn<S: SocketSource>(source: S, link: Link) -> Result<Running<S>, Error> {
    let stop = link.stop.clone();
    let spec = link.spec.clone();
    let thread = spec.thread;
    let handle = std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || run(source, link))
        .map_err(|e| Error::io(format!("spawning the {thread} thread"), e))?;
    Ok(Running {
        stop,
        spec,
        handle: Some(handle),
    })
}

/// The connect → serve → reconnect loop, then the close.
fn run<S: SocketSource>(mut source: S, mut link: Link) -> Ended<S> {
    let mut backoff = BACKOFF_MIN;
    let mut fatal = None;
    while !link.stopping() {
        if let Err(why) = source.connect(&mut link) {
            link.error();
            link.stale(&why);
            if !link.sleep(backoff) {
                break;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        link.connected();
        backoff = BACKOFF_MIN;
        match source.session(&mut link) {
            Ok(()) => break,
            Err(Fault::Transport(why)) => {
                source.disconnect(&mut link);
                link.error();
                link.stale(&why);
                if !link.sleep(backoff) {
                    break;
                }
            }
            Err(Fault::Write(e)) => {
                fatal = Some(e);
                break;
            }
        }
    }
    source.wind_down(&mut link);
    let closed = link.writer.close();
    let stats = match fatal {
        Some(e) => {
            link.ctx.events.record(&Event::SourceError {
                source: link.spec.source.into(),
                message: e.to_string(),
                fatal: Some(true),
            });
            Err(e)
        }
        None => closed,
    };
    Ended {
        source,
        stats,
        rows: link.rows,
        errors: link.errors,
        connects: link.connects,
        stale_count: link.stale_count,
    }
}

struct Ended<S> {
    source: S,
    stats: Result<FileStats, Error>,
    rows: u64,
    errors: u64,
    connects: u64,
    stale_count: u64,
}

/// A source running on its thread.
pub struct Running<S: SocketSource> {
    stop: Arc<AtomicBool>,
    spec: Spec,
    handle: Option<JoinHandle<Ended<S>>>,
}

/// What the capture keeps of a running socket source, whatever its kind.
pub trait Background: Send {
    /// Stop the thread, close the stream, and return the `meta.sources[]` entry and the
    /// stream's manifest entry.
    fn finish(self: Box<Self>) -> (SourceMeta, Result<FileStats, Error>);
}

impl<S: SocketSource> Background for Running<S> {
    fn finish(mut self: Box<Self>) -> (SourceMeta, Result<FileStats, Error>) {
        self.stop.store(true, Ordering::SeqCst);
        let ended = match self.handle.take().map(JoinHandle::join) {
            Some(Ok(ended)) => ended,
            // Nothing of the thread's state survives a panic: say so in the only place left.
            _ => {
                let meta = SourceMeta {
                    name: self.spec.source.into(),
                    file: telemetry_file(self.spec.source),
                    available_in_deployment: self.spec.available_in_deployment,
                    rows: 0,
                    errors: 1,
                    extra: Map::new(),
                };
                let why = format!("the {} thread panicked", self.spec.thread);
                return (meta, Err(Error::Other(why)));
            }
        };
        let mut extra = Map::new();
        let spec = &self.spec;
        extra.insert("socket".into(), spec.socket.display().to_string().into());
        extra.insert("connects".into(), ended.connects.into());
        extra.insert("stale_count".into(), ended.stale_count.into());
        ended.source.summary(&mut extra);
        let meta = SourceMeta {
            name: spec.source.into(),
            file: telemetry_file(spec.source),
            available_in_deployment: spec.available_in_deployment,
            rows: ended.rows,
            errors: ended.errors,
            extra,
        };
        (meta, ended.stats)
    }
}

impl<S: SocketSource> Drop for Running<S> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
