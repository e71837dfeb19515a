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
        let stream = connect_unix(path)
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
        assert_eq!(c.events.len(), 1);
        assert_eq!(c.events[0].name, "RESUME");
        assert_eq!(c.events[0].timestamp_us, Some(1_000_002));
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
}
