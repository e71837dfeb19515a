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
//! Memory is bounded: a line longer than [`MAX_LINE`] is a protocol error.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use super::parse::{parse_message, Message};

/// Far above any real reply (query-stats-schemas is ~10 KiB, query-blockstats with many
/// devices ~100 KiB).
pub const MAX_LINE: usize = 8 << 20;

#[derive(Debug)]
pub enum QmpError {
    /// Socket-level failure, timeout, or garbage: the connection is unusable.
    Transport(String),
    /// QEMU answered with an error reply; the connection is fine.
    Command { class: String, desc: String },
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpError::Transport(s) => write!(f, "{s}"),
            QmpError::Command { class, desc } => write!(f, "{class}: {desc}"),
        }
    }
}

/// An asynchronous QMP event as received.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Json,
    pub timestamp_us: Option<u64>,
}

pub struct QmpConn {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    pub greeting_version: Option<String>,
    /// Events read while waiting for replies, in order.
    pub events: Vec<QmpEvent>,
}

fn transport(what: impl std::fmt::Display) -> QmpError {
    QmpError::Transport(what.to_string())
}

impl QmpConn {
    /// Connect, read the greeting, and enter command mode, all within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = UnixStream::connect(path)
            .map_err(|e| transport(format!("connect {}: {e}", path.display())))?;
        stream.set_write_timeout(Some(timeout)).map_err(transport)?;
        let mut c = QmpConn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            next_id: 1,
            greeting_version: None,
            events: Vec::new(),
        };
        match c.read_message(deadline)? {
            Some(Message::Greeting { version }) => c.greeting_version = version,
            Some(_) => return Err(transport("first message is not the QMP greeting")),
            None => {
                return Err(transport(
                    "no QMP greeting (socket busy with another client?)",
                ))
            }
        }
        c.execute_until("qmp_capabilities", None, deadline)?;
        Ok(c)
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
            .write_all(&line)
            .map_err(|e| transport(format!("sending {name}: {e}")))?;
        loop {
            let Some(msg) = self.read_message(deadline)? else {
                return Err(transport(format!("{name}: no reply in time")));
            };
            match msg {
                Message::Event {
                    name,
                    data,
                    timestamp_us,
                } => self.events.push(QmpEvent {
                    name,
                    data,
                    timestamp_us,
                }),
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
                Message::Return { .. } | Message::Error { .. } => {}
                Message::Greeting { .. } => return Err(transport("unexpected second greeting")),
            }
        }
    }

    /// Read events until `deadline` (used between polls so events arrive promptly).
    pub fn wait_events(&mut self, deadline: Instant) -> Result<(), QmpError> {
        while let Some(msg) = self.read_message(deadline)? {
            if let Message::Event {
                name,
                data,
                timestamp_us,
            } = msg
            {
                self.events.push(QmpEvent {
                    name,
                    data,
                    timestamp_us,
                });
            }
        }
        Ok(())
    }

    /// Next complete message, or None when `deadline` passes first. EOF and garbage are
    /// transport errors.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Message>, QmpError> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = std::str::from_utf8(&line[..nl])
                    .map_err(|_| transport("QMP line is not UTF-8"))?
                    .trim();
                if text.is_empty() {
                    continue;
                }
                return parse_message(text)
                    .map(Some)
                    .map_err(|e| transport(format!("bad QMP line: {e}")));
            }
            if self.buf.len() > MAX_LINE {
                return Err(transport(format!("QMP line longer than {MAX_LINE} bytes")));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .map_err(transport)?;
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(transport("QMP socket closed")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
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
