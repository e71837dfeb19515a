//! A small blocking, line-based QMP client with a deadline on every read.
//!
//! Why not the `qapi` crate's client: its async client sends every command with id 0
//! (QEMU's `oob` capability is not recognized), and a command future dropped before its
//! reply — exactly what a timeout does — poisons it ("duplicate command id 0") and the
//! drop aborts the process. A tracer must survive a stalled or lying QEMU, so this
//! transport gives every command a unique id, a hard deadline, and on any fault simply
//! drops the connection; the collector reconnects. `qapi`'s types are still used to build
//! commands and to decode replies (see `parse.rs`).
//!
//! Memory is bounded whatever QEMU sends: a line longer than [`MAX_LINE`] is skipped as it
//! arrives (never buffered whole), events pass a token bucket ([`EVENT_RATE_PER_S`],
//! burst [`EVENT_BURST`]) into a queue of at most [`MAX_PENDING_EVENTS`], and an event's
//! `data` is kept only when its line is under [`MAX_EVENT_LINE`]. What is dropped is
//! counted ([`EventDrops`]).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use super::parse::{is_event_line, parse_message, Message};

/// Far above any real reply (query-stats-schemas is ~10 KiB, query-blockstats with many
/// devices ~100 KiB). A longer line is skipped without being buffered.
pub const MAX_LINE: usize = 8 << 20;
/// An event line longer than this keeps its name but not its `data` (real QEMU events are
/// well under 1 KiB): what a hostile QEMU can put into events.jsonl stays bounded.
pub const MAX_EVENT_LINE: usize = 4 << 10;
/// Event names longer than this are cut (real ones are under 32 bytes).
pub const MAX_EVENT_NAME: usize = 128;
/// QMP events admitted per second (token bucket rate) and at once (bucket size). QEMU
/// sends a handful per minute; a flood past this is dropped and counted.
pub const EVENT_RATE_PER_S: u32 = 100;
pub const EVENT_BURST: u32 = 1000;
/// Admitted events waiting for the collector; more are dropped and counted.
pub const MAX_PENDING_EVENTS: usize = 1024;
const READ_CHUNK: usize = 16 * 1024;
/// While events are being shed (bucket empty), each socket read waits this long first:
/// a flooding QEMU is then held back by its own full socket instead of costing a core.
const SHED_READ_PACE: Duration = Duration::from_millis(10);
/// A command's reply is read at full speed through this many bytes of other lines (more
/// than a full socket buffer holds), so polls go on under a flood; past that (a reply
/// withheld behind endless events) reads are paced as well.
const REPLY_UNPACED_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket-level failure, timeout, or garbage: the connection is unusable.
    #[error("{0}")]
    Transport(String),
    /// QEMU answered with an error reply; the connection is fine.
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
    /// A line over [`MAX_LINE`] arrived while this command waited: it is skipped (never
    /// buffered whole) and the command fails; the connection stays usable.
    #[error("QMP line longer than {MAX_LINE} bytes skipped")]
    Oversized,
}

/// An asynchronous QMP event as received.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Json,
    pub timestamp_us: Option<u64>,
    /// Set when the event's line was over [`MAX_EVENT_LINE`]: its length; `data` is null.
    pub data_dropped_bytes: Option<usize>,
}

/// A token bucket on an explicit clock (pure, so tests can drive time).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(rate_per_s: u32, burst: u32) -> Self {
        Self {
            rate_per_s: f64::from(rate_per_s),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate_per_s).min(self.burst);
        }
        self.last = Some(now);
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a token is available now (without taking it).
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }
}

/// Why events were not delivered (cumulative over the source's life).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventDrops {
    /// Over the token bucket's rate.
    pub rate_limited: u64,
    /// Admitted, but [`MAX_PENDING_EVENTS`] were already waiting.
    pub queue_full: u64,
    /// Delivered without `data` (line over [`MAX_EVENT_LINE`]).
    pub data_dropped: u64,
}

impl EventDrops {
    pub fn dropped(&self) -> u64 {
        self.rate_limited + self.queue_full
    }
}

/// Admitted events waiting for the collector, behind the rate limit. Lives as long as
/// the source, across reconnects, so a reconnecting flooder gets no fresh burst.
#[derive(Debug)]
pub struct EventQueue {
    pending: VecDeque<QmpEvent>,
    bucket: TokenBucket,
    pub drops: EventDrops,
}

impl Default for EventQueue {
    fn default() -> Self {
        Self {
            pending: VecDeque::new(),
            bucket: TokenBucket::new(EVENT_RATE_PER_S, EVENT_BURST),
            drops: EventDrops::default(),
        }
    }
}

impl EventQueue {
    pub fn offer(&mut self, ev: QmpEvent, now: Instant) {
        if !self.bucket.take(now) {
            self.drops.rate_limited += 1;
        } else if self.pending.len() >= MAX_PENDING_EVENTS {
            self.drops.queue_full += 1;
        } else {
            if ev.data_dropped_bytes.is_some() {
                self.drops.data_dropped += 1;
            }
            self.pending.push_back(ev);
        }
    }

    /// Whether new events would be dropped now (the bucket is empty).
    pub fn shedding(&mut self, now: Instant) -> bool {
        !self.bucket.ready(now)
    }

    pub fn drain(&mut self) -> std::collections::vec_deque::Drain<'_, QmpEvent> {
        self.pending.drain(..)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// What [`LineBuffer::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed<'a> {
    /// A complete line, without its newline.
    Line(&'a [u8]),
    /// A line grew past [`MAX_LINE`]: what was buffered is dropped and the rest of the
    /// line will be skipped as it arrives.
    Oversized,
}

/// Splits a byte stream into lines. Memory is bounded by [`MAX_LINE`] plus one read, and
/// each byte is searched for a newline once (a long line arriving in many reads is not
/// rescanned from its start on every read).
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Start of the first line not yet returned.
    start: usize,
    /// `buf[start..scanned]` is known to hold no newline.
    scanned: usize,
    /// Inside an oversized line: drop bytes up to and including the next newline.
    skipping: bool,
    /// Oversized lines seen.
    pub oversized: u64,
}

impl LineBuffer {
    pub fn push(&mut self, mut data: &[u8]) {
        if self.skipping {
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.skipping = false;
                    data = &data[nl + 1..];
                }
                None => return,
            }
        }
        if self.start > 0 {
            // Drop what was returned; what is left is less than one line.
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    pub fn next_line(&mut self) -> Option<Framed<'_>> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let nl = self.scanned + i;
                let line_start = self.start;
                self.start = nl + 1;
                self.scanned = nl + 1;
                Some(Framed::Line(&self.buf[line_start..nl]))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > MAX_LINE {
                    self.buf.clear();
                    self.buf.shrink_to(READ_CHUNK * 2);
                    self.start = 0;
                    self.scanned = 0;
                    self.skipping = true;
                    self.oversized += 1;
                    Some(Framed::Oversized)
                } else {
                    None
                }
            }
        }
    }

    /// Forget everything (a new connection).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.shrink_to(READ_CHUNK * 2);
        self.start = 0;
        self.scanned = 0;
        self.skipping = false;
    }
}

/// A QMP client bound to one socket path. It outlives connections: [`QmpConn::open`]
/// (re)connects, [`QmpConn::close`] drops the connection; the event queue, its rate limit
/// and the counters carry over.
pub struct QmpConn {
    path: PathBuf,
    stream: Option<UnixStream>,
    lines: LineBuffer,
    next_id: u64,
    pub greeting_version: Option<String>,
    /// Events read while waiting for replies or between polls, in order.
    pub events: EventQueue,
}

fn transport(what: impl std::fmt::Display) -> QmpError {
    QmpError::Transport(what.to_string())
}

impl QmpConn {
    /// A client for `path`, not connected yet.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            stream: None,
            lines: LineBuffer::default(),
            next_id: 1,
            greeting_version: None,
            events: EventQueue::default(),
        }
    }

    /// Connect, read the greeting, and enter command mode, all within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let mut c = Self::new(path);
        c.open(timeout)?;
        Ok(c)
    }

    /// (Re)connect: greeting and `qmp_capabilities` within `timeout`. On error the client
    /// is left closed.
    pub fn open(&mut self, timeout: Duration) -> Result<(), QmpError> {
        self.close();
        let r = self.handshake(timeout);
        if r.is_err() {
            self.close();
        }
        r
    }

    fn handshake(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = connect_unix(&self.path)
            .map_err(|e| transport(format!("connect {}: {e}", self.path.display())))?;
        stream.set_write_timeout(Some(timeout)).map_err(transport)?;
        self.stream = Some(stream);
        self.greeting_version = None;
        match self.read_message(deadline, &mut REPLY_UNPACED_BYTES.clone())? {
            Some(Message::Greeting { version }) => self.greeting_version = version,
            Some(_) => return Err(transport("first message is not the QMP greeting")),
            None => {
                return Err(transport(
                    "no QMP greeting (socket busy with another client?)",
                ))
            }
        }
        self.execute_until("qmp_capabilities", None, deadline)?;
        Ok(())
    }

    /// Drop the connection (if any) and whatever was half read on it.
    pub fn close(&mut self) {
        self.stream = None;
        self.lines.clear();
    }

    pub fn is_open(&self) -> bool {
        self.stream.is_some()
    }

    /// Lines over [`MAX_LINE`] skipped so far.
    pub fn lines_oversized(&self) -> u64 {
        self.lines.oversized
    }

    /// Run a typed command from the `qapi` crate (its arguments serialized by serde).
    pub fn run<C: qapi::Command>(&mut self, cmd: &C, timeout: Duration) -> Result<Json, QmpError> {
        let args = serde_json::to_value(cmd).map_err(transport)?;
        let args = match args {
            Json::Object(o) if o.is_empty() => None,
            Json::Null => None,
            other => Some(other),
        };
        self.execute(C::NAME, args, timeout)
    }

    pub fn execute(
        &mut self,
        name: &str,
        args: Option<Json>,
        timeout: Duration,
    ) -> Result<Json, QmpError> {
        self.execute_until(name, args, Instant::now() + timeout)
    }

    fn execute_until(
        &mut self,
        name: &str,
        args: Option<Json>,
        deadline: Instant,
    ) -> Result<Json, QmpError> {
        let id = format!("cis490-{}", self.next_id);
        self.next_id += 1;
        let mut req = json!({"execute": name, "id": id});
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&req).map_err(transport)?;
        line.push(b'\n');
        self.stream
            .as_mut()
            .ok_or_else(|| transport("not connected"))?
            .write_all(&line)
            .map_err(|e| transport(format!("sending {name}: {e}")))?;
        let mut unpaced = REPLY_UNPACED_BYTES;
        loop {
            let Some(msg) = self.read_message(deadline, &mut unpaced)? else {
                return Err(transport(format!("{name}: no reply in time")));
            };
            match msg {
                Message::Return {
                    id: Some(Json::String(r)),
                    value,
                } if r == id => return Ok(value),
                Message::Error {
                    id: Some(Json::String(r)),
                    class,
                    desc,
                } if r == id => return Err(QmpError::Command { class, desc }),
                // A late reply to an earlier command, or one without our id: not ours.
                // (Events were queued by read_message.)
                Message::Return { .. } | Message::Error { .. } | Message::Event { .. } => {}
                Message::Greeting { .. } => return Err(transport("unexpected second greeting")),
            }
        }
    }

    /// Read events until `deadline` (used between polls so events arrive promptly).
    pub fn wait_events(&mut self, deadline: Instant) -> Result<(), QmpError> {
        loop {
            match self.read_message(deadline, &mut 0) {
                // A stray reply: not ours.
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                // Nobody waits for a reply now: the skipped line costs nothing more.
                Err(QmpError::Oversized) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Next complete message other than an event, or None when `deadline` passes first.
    /// Events are queued (rate-limited) on the way. EOF and garbage are transport errors; a
    /// line over [`MAX_LINE`] is [`QmpError::Oversized`]. Reads are paced while events are
    /// being shed, once `unpaced` bytes (counted down here) have been read.
    fn read_message(
        &mut self,
        deadline: Instant,
        unpaced: &mut usize,
    ) -> Result<Option<Message>, QmpError> {
        loop {
            match self.lines.next_line() {
                Some(Framed::Oversized) => return Err(QmpError::Oversized),
                Some(Framed::Line(bytes)) => {
                    let len = bytes.len();
                    // Shedding a flood: an event line is dropped without building it.
                    if self.events.shedding(Instant::now()) && is_event_line(bytes) {
                        self.events.drops.rate_limited += 1;
                        continue;
                    }
                    let text = std::str::from_utf8(bytes)
                        .map_err(|_| transport("QMP line is not UTF-8"))?
                        .trim();
                    if text.is_empty() {
                        continue;
                    }
                    let msg =
                        parse_message(text).map_err(|e| transport(format!("bad QMP line: {e}")))?;
                    // Events are queued (or dropped and counted), never returned.
                    if let Message::Event {
                        mut name,
                        data,
                        timestamp_us,
                    } = msg
                    {
                        if name.len() > MAX_EVENT_NAME {
                            let mut cut = MAX_EVENT_NAME;
                            while !name.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            name.truncate(cut);
                        }
                        let big = len > MAX_EVENT_LINE;
                        self.events.offer(
                            QmpEvent {
                                name,
                                data: if big { Json::Null } else { data },
                                timestamp_us,
                                data_dropped_bytes: big.then_some(len),
                            },
                            Instant::now(),
                        );
                        continue;
                    }
                    return Ok(Some(msg));
                }
                None => {}
            }
            let mut now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if *unpaced == 0 && self.events.shedding(now) {
                std::thread::sleep(SHED_READ_PACE.min(deadline - now));
                now = Instant::now();
                if now >= deadline {
                    return Ok(None);
                }
            }
            let stream = self
                .stream
                .as_mut()
                .ok_or_else(|| transport("not connected"))?;
            stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .map_err(transport)?;
            let mut chunk = [0u8; READ_CHUNK];
            match stream.read(&mut chunk) {
                Ok(0) => return Err(transport("QMP socket closed")),
                Ok(n) => {
                    *unpaced = unpaced.saturating_sub(n);
                    self.lines.push(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(transport(format!("QMP read: {e}"))),
            }
        }
    }
}

/// Connect to a Unix stream socket without ever blocking: a peer whose listen backlog is
/// full (a QEMU main loop that stopped accepting) gives an error instead of a hang.
pub fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the fd is owned by the UnixStream right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A scripted server: greeting, then for each request the closure's answer lines.
    fn server(
        script: impl Fn(&str, usize) -> Vec<u8> + Send + 'static,
    ) -> (tempfile::TempDir, PathBufGuard) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\n").unwrap();
            for (i, line) in BufReader::new(s).lines().enumerate() {
                let line = line.unwrap();
                let id = serde_json::from_str::<Json>(&line).unwrap()["id"].to_string();
                if w.write_all(&script(&id, i)).is_err() {
                    return;
                }
            }
        });
        (dir, PathBufGuard(path))
    }

    struct PathBufGuard(std::path::PathBuf);

    #[test]
    fn events_and_stray_replies_are_sorted_out_by_id() {
        let (_d, p) = server(|id, i| {
            match i {
            0 => format!("{{\"return\": {{}}, \"id\": {id}}}\n").into_bytes(),
            _ => format!(
                "{{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}, \"event\": \"RESUME\"}}\n\
                 {{\"return\": 99, \"id\": \"someone-else\"}}\n{{\"return\": {{\"ok\": 1}}, \"id\": {id}}}\n"
            )
            .into_bytes(),
        }
        });
        let mut c = QmpConn::connect(&p.0, Duration::from_secs(5)).unwrap();
        assert_eq!(c.greeting_version.as_deref(), Some("10.0.2"));
        let v = c
            .execute("query-status", None, Duration::from_secs(5))
            .unwrap();
        assert_eq!(v["ok"], 1);
        let evs: Vec<QmpEvent> = c.events.drain().collect();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].name, "RESUME");
        assert_eq!(evs[0].timestamp_us, Some(1_000_002));
        assert_eq!(evs[0].data_dropped_bytes, None);
    }

    #[test]
    fn command_errors_keep_the_connection_garbage_and_stalls_do_not() {
        let (_d, p) = server(|id, i| {
            match i {
            0 => format!("{{\"return\": {{}}, \"id\": {id}}}\n").into_bytes(),
            1 => format!("{{\"id\": {id}, \"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"no\"}}}}\n").into_bytes(),
            2 => b"this is not json\n".to_vec(),
            _ => Vec::new(),
        }
        });
        let mut c = QmpConn::connect(&p.0, Duration::from_secs(5)).unwrap();
        let e = c.execute("nope", None, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, QmpError::Command { ref class, .. } if class == "CommandNotFound"));
        let e = c
            .execute("query-status", None, Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(e, QmpError::Transport(ref m) if m.contains("bad QMP line")),
            "{e}"
        );
        // Silence: the deadline holds.
        let t = Instant::now();
        let e = c
            .execute("query-status", None, Duration::from_millis(300))
            .unwrap_err();
        assert!(
            matches!(e, QmpError::Transport(ref m) if m.contains("no reply in time")),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_socket_that_never_greets_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mute.sock");
        let _l = UnixListener::bind(&path).unwrap();
        let t = Instant::now();
        let e = QmpConn::connect(&path, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(e.to_string().contains("no QMP greeting"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(connect_unix(&dir.path().join("absent.sock")).is_err());
    }

    #[test]
    fn line_buffer_joins_lines_split_across_reads() {
        let mut b = LineBuffer::default();
        b.push(b"{\"a\":");
        assert_eq!(b.next_line(), None);
        b.push(b"1}\n{\"b\"");
        assert_eq!(b.next_line(), Some(Framed::Line(b"{\"a\":1}")));
        assert_eq!(b.next_line(), None);
        b.push(b":2}\n\n");
        assert_eq!(b.next_line(), Some(Framed::Line(b"{\"b\":2}")));
        assert_eq!(b.next_line(), Some(Framed::Line(b"")));
        assert_eq!(b.next_line(), None);
    }

    #[test]
    fn line_buffer_skips_an_oversized_line_without_holding_it() {
        let mut b = LineBuffer::default();
        let chunk = vec![b'x'; READ_CHUNK];
        let mut oversized = 0;
        // 100 MiB without a newline, in 16 KiB reads, then the end of that line and a
        // good one in the same read.
        for _ in 0..(100 << 20) / READ_CHUNK {
            b.push(&chunk);
            while let Some(f) = b.next_line() {
                assert_eq!(f, Framed::Oversized);
                oversized += 1;
            }
            assert!(b.buf.capacity() <= 2 * MAX_LINE, "{}", b.buf.capacity());
        }
        assert_eq!(oversized, 1);
        assert_eq!(b.oversized, 1);
        b.push(b"xxxx\n{\"ok\":1}\n");
        assert_eq!(b.next_line(), Some(Framed::Line(b"{\"ok\":1}")));
        assert_eq!(b.next_line(), None);
    }

    #[test]
    fn line_buffer_searches_only_new_bytes() {
        let mut b = LineBuffer::default();
        b.push(&[b'x'; 1000]);
        assert_eq!(b.next_line(), None);
        assert_eq!(b.scanned, 1000);
        b.push(b"yy");
        assert_eq!(b.next_line(), None);
        assert_eq!(b.scanned, 1002);
        b.push(b"\nz");
        assert!(matches!(b.next_line(), Some(Framed::Line(l)) if l.len() == 1002));
        assert_eq!(b.next_line(), None);
        // What was returned is dropped on the next push; the scan mark follows.
        b.push(b"z");
        assert_eq!((b.start, b.scanned, b.buf.len()), (0, 1, 2));
    }

    #[test]
    fn token_bucket_burst_then_rate() {
        let t0 = Instant::now();
        let mut tb = TokenBucket::new(100, 1000);
        assert_eq!((0..1500).filter(|_| tb.take(t0)).count(), 1000);
        assert!(!tb.ready(t0));
        // 0.5 s later: 50 more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..1000).filter(|_| tb.take(t1)).count(), 50);
        // Never more than the burst, however long the pause.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..5000).filter(|_| tb.take(t2)).count(), 1000);
    }

    fn ev(n: usize) -> QmpEvent {
        QmpEvent {
            name: format!("E{n}"),
            data: Json::Null,
            timestamp_us: None,
            data_dropped_bytes: None,
        }
    }

    #[test]
    fn event_queue_rate_limits_and_caps_what_waits() {
        let t0 = Instant::now();
        let mut q = EventQueue::default();
        for i in 0..5000 {
            q.offer(ev(i), t0);
        }
        // The burst is admitted up to the queue's cap; the rest is over the rate.
        assert_eq!(q.len(), EVENT_BURST.min(MAX_PENDING_EVENTS as u32) as usize);
        assert_eq!(q.drops.rate_limited, 5000 - u64::from(EVENT_BURST));
        assert_eq!(q.drops.queue_full, 0);
        assert!(q.shedding(t0));
        let first: Vec<_> = q.drain().take(3).map(|e| e.name).collect();
        assert_eq!(first, ["E0", "E1", "E2"]);
        assert!(q.is_empty());
        // Nobody drains for a long time while events keep coming at the rate: the queue
        // stops at its cap and counts the rest.
        let mut t = t0;
        for i in 0..3000 {
            t += Duration::from_millis(10);
            q.offer(ev(i), t);
        }
        assert_eq!(q.len(), MAX_PENDING_EVENTS);
        assert_eq!(q.drops.queue_full, 3000 - MAX_PENDING_EVENTS as u64);
        assert_eq!(q.drops.dropped(), q.drops.rate_limited + q.drops.queue_full);
    }

    #[test]
    fn oversized_reply_fails_that_command_and_the_connection_goes_on() {
        let (_d, p) = server(|id, i| match i {
            0 => format!("{{\"return\": {{}}, \"id\": {id}}}\n").into_bytes(),
            1 => {
                let mut big = b"{\"return\": \"".to_vec();
                big.resize(MAX_LINE + 3 * READ_CHUNK, b'x');
                big.extend_from_slice(format!("\", \"id\": {id}}}\n").as_bytes());
                big
            }
            _ => format!("{{\"return\": {{\"ok\": {i}}}, \"id\": {id}}}\n").into_bytes(),
        });
        let mut c = QmpConn::connect(&p.0, Duration::from_secs(5)).unwrap();
        let e = c
            .execute("query-blockstats", None, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(e, QmpError::Oversized), "{e}");
        assert_eq!(c.lines_oversized(), 1);
        let v = c
            .execute("query-status", None, Duration::from_secs(5))
            .unwrap();
        assert_eq!(v["ok"], 2);
    }

    #[test]
    fn big_event_keeps_its_name_not_its_data() {
        let (_d, p) = server(|id, i| match i {
            0 => format!("{{\"return\": {{}}, \"id\": {id}}}\n").into_bytes(),
            _ => {
                let pad = "y".repeat(MAX_EVENT_LINE);
                let name = "N".repeat(MAX_EVENT_NAME + 10);
                format!(
                    "{{\"event\": \"{name}\", \"data\": {{\"pad\": \"{pad}\"}}}}\n\
                     {{\"event\": \"SMALL\", \"data\": {{\"k\": 1}}}}\n\
                     {{\"return\": {{}}, \"id\": {id}}}\n"
                )
                .into_bytes()
            }
        });
        let mut c = QmpConn::connect(&p.0, Duration::from_secs(5)).unwrap();
        c.execute("query-status", None, Duration::from_secs(5))
            .unwrap();
        let evs: Vec<QmpEvent> = c.events.drain().collect();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].name.len(), MAX_EVENT_NAME);
        assert_eq!(evs[0].data, Json::Null);
        assert!(evs[0].data_dropped_bytes.unwrap() > MAX_EVENT_LINE);
        assert_eq!(evs[1].data["k"], 1);
        assert_eq!(c.events.drops.data_dropped, 1);
    }
}
