//! Phase labels: labels.jsonl, the capture's `control.sock`, and the `cis490 mark` client.
//!
//! The running capture owns the phase state. `cis490 mark` sends one JSON request line
//! over the episode's Unix socket; the capture validates the transition, stamps it on
//! its own clock, appends it to labels.jsonl and answers with one JSON line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::EpisodeClock;
use crate::episode::{EpisodeDir, EventLog, CONTROL_SOCKET, LABELS};
use crate::error::Error;
use crate::jsonl::{FileStats, JsonlWriter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Phase {
    Clean,
    Armed,
    Infecting,
    InfectedRunning,
    Dormant,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Clean,
        Phase::Armed,
        Phase::Infecting,
        Phase::InfectedRunning,
        Phase::Dormant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Clean => "clean",
            Phase::Armed => "armed",
            Phase::Infecting => "infecting",
            Phase::InfectedRunning => "infected_running",
            Phase::Dormant => "dormant",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Debug, Serialize)]
struct LabelRow<'a> {
    t_mono_ns: u64,
    t_wall_ns: u64,
    phase: &'a str,
    prev: Option<&'a str>,
    reason: Option<&'a str>,
}

/// labels.jsonl and the current phase.
pub struct Labels {
    writer: JsonlWriter,
    current: Option<Phase>,
    observed: Vec<Phase>,
    clock: EpisodeClock,
}

impl Labels {
    /// Create labels.jsonl with its first row: `clean`, prev null.
    pub fn create(dir: &EpisodeDir, clock: EpisodeClock) -> Result<Self, Error> {
        let writer = JsonlWriter::create(dir, LABELS)?;
        let mut labels = Self {
            writer,
            current: None,
            observed: Vec::new(),
            clock,
        };
        labels.transition(Phase::Clean, Some("episode_start"))?;
        Ok(labels)
    }

    /// Record a transition; refused (Err(Usage)) when `phase` is already current.
    pub fn transition(&mut self, phase: Phase, reason: Option<&str>) -> Result<u64, Error> {
        if self.current == Some(phase) {
            return Err(Error::Usage(format!(
                "phase is already {}; a transition to it is refused",
                phase.as_str()
            )));
        }
        let stamp = self.clock.stamp();
        self.writer.write_value(&LabelRow {
            t_mono_ns: stamp.t_mono_ns,
            t_wall_ns: stamp.t_wall_ns,
            phase: phase.as_str(),
            prev: self.current.map(Phase::as_str),
            reason,
        })?;
        self.writer.flush()?;
        self.current = Some(phase);
        if !self.observed.contains(&phase) {
            self.observed.push(phase);
        }
        Ok(stamp.t_mono_ns)
    }

    pub fn current(&self) -> Option<Phase> {
        self.current
    }

    pub fn observed(&self) -> Vec<String> {
        self.observed
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect()
    }

    pub fn close(self) -> Result<FileStats, Error> {
        self.writer.close()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MarkRequest {
    pub phase: String,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MarkReply {
    pub ok: bool,
    pub error: Option<String>,
    pub t_mono_ns: Option<u64>,
    pub prev: Option<String>,
}

/// Requests are tiny; anything longer is not a mark request.
const MAX_REQUEST: u64 = 4096;

/// The control socket server, on its own thread until `stop`. The thread blocks in
/// accept() (polling would wake it 50 times a second for the whole capture, about 0.2 %
/// of a core in this project's VM); `stop` wakes it by shutting the listening socket down.
pub struct ControlServer {
    dir: EpisodeDir,
    stop: Arc<AtomicBool>,
    listener: UnixListener,
    handle: Option<JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(
        dir: &EpisodeDir,
        labels: Arc<Mutex<Labels>>,
        events: EventLog,
    ) -> Result<Self, Error> {
        // Bound through the directory handle with its final mode from the start: never
        // reachable, even for an instant, with wider permissions.
        let listener = crate::episode::dir::bind_unix_private(dir, CONTROL_SOCKET)
            .map_err(|e| Error::io(format!("binding {}", dir.join(CONTROL_SOCKET).display()), e))?;
        let served = listener
            .try_clone()
            .map_err(|e| Error::io("control socket", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("cis490-control".into())
            .spawn(move || serve(served, labels, events, stop2))
            .map_err(|e| Error::io("spawning control thread", e))?;
        Ok(Self {
            dir: dir.clone(),
            stop,
            listener,
            handle: Some(handle),
        })
    }

    /// Stop serving and remove the socket (it is not part of the finished episode).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On Linux, shutdown() of a listening socket makes a blocked accept() return
        // (EINVAL), and every later one at once.
        // SAFETY: shutdown(2) on a socket fd this struct owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let _ = self.dir.remove(CONTROL_SOCKET);
    }
}

fn serve(
    listener: UnixListener,
    labels: Arc<Mutex<Labels>>,
    events: EventLog,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => handle_client(stream, &labels, &events),
            // Out of file descriptors and the like: try again a little later.
            Err(_) if !stop.load(Ordering::SeqCst) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => {}
        }
    }
}

fn handle_client(stream: UnixStream, labels: &Arc<Mutex<Labels>>, events: &EventLog) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let reply = match BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line) {
        Ok(_) => apply(&line, labels, events),
        Err(e) => MarkReply {
            ok: false,
            error: Some(format!("reading request: {e}")),
            t_mono_ns: None,
            prev: None,
        },
    };
    if let Ok(mut text) = serde_json::to_string(&reply) {
        text.push('\n');
        let _ = (&stream).write_all(text.as_bytes());
    }
}

fn apply(line: &str, labels: &Arc<Mutex<Labels>>, events: &EventLog) -> MarkReply {
    let refuse = |error: String| MarkReply {
        ok: false,
        error: Some(error),
        t_mono_ns: None,
        prev: None,
    };
    let req: MarkRequest = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return refuse(format!("malformed request: {e}")),
    };
    let Some(phase) = Phase::parse(&req.phase) else {
        let known: Vec<_> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        return refuse(format!(
            "unknown phase {:?}; phases are {}",
            req.phase,
            known.join(", ")
        ));
    };
    let mut labels = labels.lock().unwrap_or_else(|p| p.into_inner());
    let prev_phase = labels.current();
    let prev = prev_phase.map(|p| p.as_str().to_owned());
    match labels.transition(phase, req.reason.as_deref()) {
        Ok(t) => {
            events.record(&crate::contract::events::Event::Phase {
                phase,
                prev: prev_phase,
                reason: req.reason.clone(),
            });
            MarkReply {
                ok: true,
                error: None,
                t_mono_ns: Some(t),
                prev,
            }
        }
        Err(e) => refuse(e.to_string()),
    }
}

/// The `cis490 mark` client.
pub fn send_mark(
    episode_dir: &Path,
    phase: Phase,
    reason: Option<String>,
) -> Result<MarkReply, Error> {
    let path = episode_dir.join(CONTROL_SOCKET);
    let stream = UnixStream::connect(&path).map_err(|e| {
        Error::Usage(format!(
            "cannot reach the capture at {}: {e} (is `cis490 trace` still running for this episode?)",
            path.display()
        ))
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| Error::io("control socket", e))?;
    let mut req = serde_json::to_string(&MarkRequest {
        phase: phase.as_str().into(),
        reason,
    })
    .map_err(Error::Json)?;
    req.push('\n');
    (&stream)
        .write_all(req.as_bytes())
        .map_err(|e| Error::io("sending mark", e))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| Error::io("reading mark reply", e))?;
    serde_json::from_str(line.trim())
        .map_err(|e| Error::Other(format!("malformed reply from capture: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_same_phase_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let clock = EpisodeClock::start();
        let ep = EpisodeDir::open_existing(dir.path()).unwrap();
        let mut labels = Labels::create(&ep, clock).unwrap();
        assert!(labels.transition(Phase::Clean, None).is_err());
        labels
            .transition(Phase::Armed, Some("loaded sample"))
            .unwrap();
        assert!(labels.transition(Phase::Armed, None).is_err());
        labels.transition(Phase::Clean, None).unwrap();
        assert_eq!(labels.observed(), vec!["clean", "armed"]);
        let stats = labels.close().unwrap();
        assert_eq!(stats.lines, 3);
        let text = std::fs::read_to_string(dir.path().join(LABELS)).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows[0]["phase"], "clean");
        assert!(rows[0]["prev"].is_null());
        assert_eq!(rows[1]["prev"], "clean");
        assert_eq!(rows[1]["reason"], "loaded sample");
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
    }

    #[test]
    fn control_server_serves_marks_and_stops_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let clock = EpisodeClock::start();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let ep = EpisodeDir::open_existing(dir.path()).unwrap();
        let _serial = crate::episode::dir::UMASK_LOCK
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let labels = Arc::new(Mutex::new(Labels::create(&ep, clock).unwrap()));
        let events = EventLog::create(&ep, clock).unwrap();
        let server = ControlServer::start(&ep, labels.clone(), events).unwrap();
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::symlink_metadata(dir.path().join(CONTROL_SOCKET))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "control.sock mode {mode:o}");
        let reply = send_mark(dir.path(), Phase::Armed, None).unwrap();
        assert!(reply.ok, "{reply:?}");
        assert_eq!(reply.prev.as_deref(), Some("clean"));
        // The server thread is blocked in accept(): stop must wake it, not wait for a client.
        let t = std::time::Instant::now();
        server.stop();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(!dir.path().join(CONTROL_SOCKET).exists());
        assert!(send_mark(dir.path(), Phase::Infecting, None).is_err());
    }
}
