//! `cargo xtask soak --minutes N`: a long 1 kHz capture of the test VM under hostile
//! conditions, reported minute by minute (a benchmark, not a CI test).
//!
//! - The guest floods its agent channel. A virtio-serial port opens once in the guest (a
//!   second opener gets EBUSY), so the soak cannot simply add a writer next to the agent:
//!   through the guest's root shell on the serial console it restarts the real agent
//!   writing into a FIFO, relays that FIFO to the port with `cat`, and runs a busybox
//!   flooder that writes into the same FIFO: lines with 250 never-seen keys, 60 KB and
//!   70 KB lines, bursts of 2,048 malformed/deep/non-object lines and 4 KiB of
//!   /dev/urandom, every `--flood-pause-s`. The host therefore reads the real agent's
//!   lines mixed with the flood, as it would from a compromised guest.
//! - QMP stalls once a minute. cis490 gets `--qmp <proxy>`; the proxy forwards bytes
//!   both ways to QEMU's QMP socket but withholds everything QEMU sends for
//!   `--stall-s` seconds once per `--stall-every-s` (see [`StallSchedule`]).
//! - Every second the soak reads cis490's VmRSS/VmHWM and CPU time (and QEMU's CPU time)
//!   from /proc; at the end it reads the episode: rows per stream per minute, gap events,
//!   seq holes of the host streams not declared by a gap event (rows lost: must be 0),
//!   stale/recovered events, agent rejects, meta.json's result, and `cis490 validate`.

use crate::util::mono_ns;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::util::{self, root};
use crate::vm;

/// Streams whose `seq` is the host tick (the sampler's or the kernel snapshot timer's):
/// every tick either has rows or is declared by a `gap` event. Rows lost = holes in
/// these streams' seqs that no gap event declares.
const HOST_STREAMS: [&str; 4] = ["proc", "bpf-sched", "bpf-io", "net"];
/// VmRSS may grow this much from the first minute to the last (allocator and page-cache
/// noise) before the soak calls it not flat: max(1 MiB, 5 %).
const RSS_SLACK_KIB: u64 = 1024;
const RSS_SLACK_FRACTION: f64 = 0.05;
/// Replies withheld by the proxy beyond this are dropped with the connection (counted):
/// the proxy must not become the unbounded buffer the soak is looking for.
const PROXY_MAX_PENDING: usize = 16 << 20;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Length of the capture in minutes.
    #[arg(long, default_value_t = 30)]
    pub minutes: u32,
    /// Host sampling rate of the capture.
    #[arg(long, default_value_t = 1000)]
    pub rate_hz: u32,
    /// Write the markdown section here (default: print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace (or append) the "Soak" section of BENCHMARKS.md with the result.
    #[arg(long)]
    pub write_benchmarks: bool,
    /// Keep the episode (default: deleted after the report; 1 kHz writes ~6 MB/s).
    #[arg(long)]
    pub keep: bool,
    /// QMP stall: seconds between stall starts.
    #[arg(long, default_value_t = 60)]
    pub stall_every_s: u64,
    /// QMP stall: seconds every reply is withheld.
    #[arg(long, default_value_t = 10)]
    pub stall_s: u64,
    /// The guest agent's own rate (lines/s) inside the flood.
    #[arg(long, default_value_t = 10)]
    pub agent_rate_hz: u32,
    /// Seconds the guest flooder sleeps between rounds (each round ~180 KB, ~2,300 lines).
    #[arg(long, default_value = "0.1")]
    pub flood_pause_s: String,
}

// ---------------------------------------------------------------------------------------
// Pure parts (unit-tested below).

/// The memory lines of /proc/<pid>/status the soak follows, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemStatus {
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
}

/// VmRSS and VmHWM of a /proc/<pid>/status text; None when either is missing (a kernel
/// thread, or a zombie whose mm is gone).
pub fn parse_status(text: &str) -> Option<MemStatus> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(MemStatus {
        vm_rss_kib: field("VmRSS")?,
        vm_hwm_kib: field("VmHWM")?,
    })
}

/// utime + stime (clock ticks) of a /proc/<pid>/stat text. The comm field may hold
/// spaces and parentheses ("CPU 1/KVM"), so fields are counted after the last ')'.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let (_, rest) = text.rsplit_once(')')?;
    // After ')': state is field 3, utime field 14, stime field 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// When the QMP proxy withholds QEMU's bytes: windows of `length` starting at `first`
/// and then every `every`, measured from the proxy's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallSchedule {
    pub first: Duration,
    pub every: Duration,
    pub length: Duration,
}

impl StallSchedule {
    /// Stalls in the middle of each minute by default: clear of the start (QMP's setup
    /// handshake) and of the end (the close sequence), so each one is seen whole.
    pub fn new(every_s: u64, length_s: u64) -> anyhow::Result<Self> {
        if every_s == 0 || length_s >= every_s {
            bail!("--stall-s {length_s} must be shorter than --stall-every-s {every_s}");
        }
        Ok(Self {
            first: Duration::from_secs(every_s / 2),
            every: Duration::from_secs(every_s),
            length: Duration::from_secs(length_s),
        })
    }

    pub fn is_stalled(&self, since_start: Duration) -> bool {
        let Some(into) = since_start.checked_sub(self.first) else {
            return false;
        };
        let phase = into.as_nanos() % self.every.as_nanos();
        phase < self.length.as_nanos()
    }

    /// The windows (start, end) that begin before `total`.
    pub fn windows(&self, total: Duration) -> Vec<(Duration, Duration)> {
        let mut out = Vec::new();
        let mut at = self.first;
        while at < total {
            out.push((at, at + self.length));
            at += self.every;
        }
        out
    }
}

/// `t_mono_ns` and `seq` of one telemetry row. cis490's row writer always starts a line
/// with `{"t_mono_ns":N,"t_wall_ns":N,"source":"…","available_in_deployment":B` and then
/// `,"seq":N` when the stream has one: that prefix is read without a JSON parse (a 30-min
/// 1 kHz episode is ~12 GB). Any other line is parsed as JSON. None: not a row.
pub fn row_head(line: &str) -> Option<(u64, Option<u64>)> {
    fn digits(s: &str) -> Option<(u64, &str)> {
        let end = s
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(s.len());
        Some((s[..end].parse().ok()?, &s[end..]))
    }
    let fast = || -> Option<(u64, Option<u64>)> {
        let (t, rest) = digits(line.strip_prefix("{\"t_mono_ns\":")?)?;
        let (_, rest) = digits(rest.strip_prefix(",\"t_wall_ns\":")?)?;
        let rest = rest.strip_prefix(",\"source\":\"")?;
        // Source names are plain identifiers (no escapes), so the next quote ends it.
        let rest = &rest[rest.find('"')? + 1..];
        let rest = rest.strip_prefix(",\"available_in_deployment\":")?;
        let rest = rest
            .strip_prefix("true")
            .or_else(|| rest.strip_prefix("false"))?;
        match rest.strip_prefix(",\"seq\":") {
            Some(s) => Some((t, Some(digits(s)?.0))),
            None => Some((t, None)),
        }
    };
    fast().or_else(|| {
        let v: Value = serde_json::from_str(line).ok()?;
        Some((v["t_mono_ns"].as_u64()?, v["seq"].as_u64()))
    })
}

/// The ticks of one stream: which seqs have rows, and which are declared missing by
/// `gap` events.
#[derive(Debug, Default)]
pub struct SeqAccount {
    seen: Vec<u64>,
    declared: Vec<u64>,
    max_seq: Option<u64>,
    /// Rows counted (several per tick in per-thread streams).
    pub rows: u64,
}

fn bit_set(bits: &mut Vec<u64>, i: u64) -> bool {
    let (w, b) = ((i / 64) as usize, i % 64);
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    let was = bits[w] & (1 << b) != 0;
    bits[w] |= 1 << b;
    was
}

fn bit_get(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// What [`SeqAccount::finish`] found over ticks 0..=max_seq (and up to `ticks_scheduled`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeqResult {
    /// Distinct ticks with at least one row.
    pub ticks_with_rows: u64,
    /// Ticks declared by gap events.
    pub declared: u64,
    /// Ticks with neither rows nor a gap event: rows lost.
    pub undeclared: u64,
    /// The first few undeclared ranges (inclusive).
    pub undeclared_ranges: Vec<(u64, u64)>,
    /// Ticks with rows that a gap event also declares.
    pub declared_but_present: u64,
}

impl SeqAccount {
    pub fn row(&mut self, seq: u64) {
        self.rows += 1;
        bit_set(&mut self.seen, seq);
        self.max_seq = Some(self.max_seq.map_or(seq, |m| m.max(seq)));
    }

    pub fn gap(&mut self, from_seq: u64, to_seq: u64) {
        for s in from_seq..=to_seq {
            bit_set(&mut self.declared, s);
        }
    }

    /// Account ticks 0..`end` where `end` is `ticks_scheduled` when known (so ticks lost
    /// at the end count too), else one past the highest seq with rows.
    pub fn finish(&self, ticks_scheduled: Option<u64>) -> SeqResult {
        let end = ticks_scheduled
            .unwrap_or(0)
            .max(self.max_seq.map_or(0, |m| m + 1));
        let mut r = SeqResult::default();
        let mut open: Option<(u64, u64)> = None;
        for s in 0..end {
            let (seen, declared) = (bit_get(&self.seen, s), bit_get(&self.declared, s));
            r.ticks_with_rows += u64::from(seen);
            r.declared += u64::from(declared);
            r.declared_but_present += u64::from(seen && declared);
            if !seen && !declared {
                r.undeclared += 1;
                open = match open {
                    Some((a, b)) if b + 1 == s => Some((a, s)),
                    Some(done) => {
                        if r.undeclared_ranges.len() < 5 {
                            r.undeclared_ranges.push(done);
                        }
                        Some((s, s))
                    }
                    None => Some((s, s)),
                };
            }
        }
        if let Some(done) = open {
            if r.undeclared_ranges.len() < 5 {
                r.undeclared_ranges.push(done);
            }
        }
        r
    }
}

/// RSS is flat when the largest VmRSS of any minute after the first exceeds the first
/// minute's largest by at most max(1 MiB, 5 %). The first minute is the baseline: it holds
/// the start-up (BPF load, first QMP replies, buffers reaching their working size).
/// Returns (flat, growth in KiB).
pub fn rss_flat(max_rss_per_minute: &[u64]) -> (bool, i64) {
    let Some((&first, rest)) = max_rss_per_minute.split_first() else {
        return (false, 0);
    };
    let Some(&peak_after) = rest.iter().max() else {
        return (true, 0);
    };
    let slack = RSS_SLACK_KIB.max((first as f64 * RSS_SLACK_FRACTION) as u64);
    let growth = peak_after as i64 - first as i64;
    (growth <= slack as i64, growth)
}

/// `doc` with its `## Soak` section (up to the next `## ` heading) replaced by `section`,
/// or `section` appended when there is none. `section` starts with its own heading.
pub fn replace_section(doc: &str, section: &str) -> String {
    let section = section.trim_end();
    let lines: Vec<&str> = doc.lines().collect();
    let Some(start) = lines
        .iter()
        .position(|l| l.trim_end() == "## Soak" || l.starts_with("## Soak "))
    else {
        let mut out = doc.trim_end().to_owned();
        out.push_str("\n\n");
        out.push_str(section);
        out.push('\n');
        return out;
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = lines[..start].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(section);
    out.push('\n');
    if end < lines.len() {
        out.push('\n');
        out.push_str(&lines[end..].join("\n"));
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------
// The QMP proxy.

#[derive(Debug, Default)]
struct ProxyStats {
    connections: AtomicU64,
    bytes_to_qemu: AtomicU64,
    bytes_to_client: AtomicU64,
    max_withheld: AtomicU64,
    overflows: AtomicU64,
}

struct QmpProxy {
    stop: Arc<AtomicBool>,
    stats: Arc<ProxyStats>,
    started_mono_ns: u64,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl QmpProxy {
    fn start(listen: &Path, upstream: &Path, schedule: StallSchedule) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(listen);
        let listener =
            UnixListener::bind(listen).with_context(|| format!("binding {}", listen.display()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ProxyStats::default());
        let started = Instant::now();
        let started_mono_ns = mono_ns();
        let (stop2, stats2, upstream) = (stop.clone(), stats.clone(), upstream.to_owned());
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        stats2.connections.fetch_add(1, Ordering::Relaxed);
                        let _ = client.set_nonblocking(false);
                        match UnixStream::connect(&upstream) {
                            Ok(up) => spawn_pair(client, up, schedule, started, &stop2, &stats2),
                            Err(e) => eprintln!("soak: qmp proxy: connecting upstream: {e}"),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        eprintln!("soak: qmp proxy: accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        Ok(Self {
            stop,
            stats,
            started_mono_ns,
            accept: Some(accept),
        })
    }

    fn finish(mut self) -> Arc<ProxyStats> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        self.stats.clone()
    }
}

/// Two threads per connection: the client's bytes go straight to QEMU; QEMU's bytes are
/// buffered and released only outside stall windows. Either side closing closes both,
/// so QEMU's one-client QMP socket is free for the client's reconnect.
fn spawn_pair(
    client: UnixStream,
    up: UnixStream,
    schedule: StallSchedule,
    started: Instant,
    stop: &Arc<AtomicBool>,
    stats: &Arc<ProxyStats>,
) {
    let (Ok(mut client_r), Ok(mut up_w)) = (client.try_clone(), up.try_clone()) else {
        return;
    };
    let stats_up = stats.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match client_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if up_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    stats_up
                        .bytes_to_qemu
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let _ = up_w.shutdown(std::net::Shutdown::Both);
        let _ = client_r.shutdown(std::net::Shutdown::Both);
    });
    let (stop, stats) = (stop.clone(), stats.clone());
    std::thread::spawn(move || {
        let (mut up_r, mut client_w) = (up, client);
        let _ = up_r.set_read_timeout(Some(Duration::from_millis(20)));
        let _ = client_w.set_write_timeout(Some(Duration::from_secs(5)));
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while !stop.load(Ordering::Relaxed) {
            match up_r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
            stats
                .max_withheld
                .fetch_max(pending.len() as u64, Ordering::Relaxed);
            if pending.len() > PROXY_MAX_PENDING {
                stats.overflows.fetch_add(1, Ordering::Relaxed);
                break;
            }
            if !pending.is_empty() && !schedule.is_stalled(started.elapsed()) {
                if client_w.write_all(&pending).is_err() {
                    break;
                }
                stats
                    .bytes_to_client
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                pending.clear();
            }
        }
        let _ = up_r.shutdown(std::net::Shutdown::Both);
        let _ = client_w.shutdown(std::net::Shutdown::Both);
    });
}

// ---------------------------------------------------------------------------------------
// The guest side.

/// Typed into the guest's console (into `cat > /tmp/soak.sh`, one line at a time). Runs as
/// `sh /tmp/soak.sh AGENT_RATE_HZ PAUSE_S`.
const GUEST_SCRIPT: &str = r#"# cis490 soak: the real agent and a flooder share the agent port through a FIFO
PORT=/dev/virtio-ports/cis490.guest.agent
cd /tmp
killall cis490 2>/dev/null
while pidof cis490 >/dev/null; do sleep 0.1; done
rm -f ga.fifo; mkfifo ga.fifo
(while :; do cat ga.fifo > $PORT; sleep 0.2; done) </dev/null >/dev/null 2>&1 &
/bin/cis490 agent --port /tmp/ga.fifo --rate-hz $1 </dev/null >/dev/null 2>&1 &
printf '{"seq":7,"flood":1}\n[1,2,3]\nnot json at all\n{"a":{"b":{"c":{"d":{"e":{"f":1}}}}}}\n{"unterminated":\n"just a string"\n{"x":1e400}\n{"nul":"\\u0000"}\n' > b
for i in 1 2 3 4 5 6 7 8; do cat b b > b2; mv b2 b; done
head -c 70000 /dev/zero | tr '\0' x > x70k
{ printf '{"big":"'; cat x70k; printf '"}\n'; } > big
{ printf '{"seq":1,"mid":"'; head -c 60000 x70k; printf '"}\n'; } > mid
k=0; t=''
while [ $k -lt 250 ]; do t="$t\"kNNN_$k\":$k,"; k=$((k+1)); done
printf '{%s"end":1}\n' "$t" > keys
echo "soak-flood: $((6*7)) started" > /dev/console
n=0
while :; do
  n=$((n+1))
  sed "s/NNN/$n/g" keys
  cat mid big b
  head -c 4096 /dev/urandom; echo
  echo $n > flood.n
  sleep $2
done > ga.fifo
"#;

/// The guest's serial console: typed lines go in through the socket, what the guest
/// prints (including the echo of typed lines) is read back from the log file.
///
/// QEMU reads the socket only as fast as the guest's UART takes bytes and drops what is
/// still unread when the client hangs up, so a connection is held until the guest has
/// shown (by its echo or its answer) that it got everything typed on it. While held,
/// what QEMU sends back on it is read and discarded: unread, a few hundred echoed
/// characters (one socket buffer entry each) fill the socket and stall the guest's UART,
/// and with it the tty's echo and input.
struct Console {
    socket: PathBuf,
    log: PathBuf,
}

/// A console connection; dropping it hangs up (which also ends its draining thread).
struct HeldConnection(UnixStream);

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

impl Console {
    fn log_len(&self) -> usize {
        std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }

    /// Type `lines` on a new connection, a short pause after each so the tty's input
    /// buffer never overflows. The connection is returned: keep it until the guest
    /// answered.
    fn type_lines(&self, lines: &[&str]) -> anyhow::Result<HeldConnection> {
        let mut s = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting {}", self.socket.display()))?;
        s.set_write_timeout(Some(Duration::from_secs(120)))?;
        let mut reader = s.try_clone()?;
        std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
        });
        for l in lines {
            s.write_all(l.as_bytes())?;
            s.write_all(b"\n")?;
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(HeldConnection(s))
    }

    /// Wait for `marker` in what the guest printed after byte `skip` of the log.
    fn wait_for(&self, skip: usize, marker: &str, timeout: Duration) -> anyhow::Result<String> {
        let t = Instant::now();
        loop {
            let all = std::fs::read(&self.log).unwrap_or_default();
            let text = String::from_utf8_lossy(all.get(skip..).unwrap_or_default()).into_owned();
            if text.contains(marker) {
                return Ok(text);
            }
            if t.elapsed() > timeout {
                bail!(
                    "no {marker:?} on the guest console within {timeout:?}:\n{}",
                    tail(&text, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Type one command and wait for `marker`.
    fn run(&self, cmd: &str, marker: &str, timeout: Duration) -> anyhow::Result<String> {
        let skip = self.log_len();
        let _held = self.type_lines(&[cmd])?;
        self.wait_for(skip, marker, timeout)
    }

    /// Write `text` to `path` in the guest, checked by its size. It goes through a plain
    /// `cat` reading the tty (canonical mode, ended by ^D), never through the shell's line
    /// editor, which reads ahead in raw mode and loses what was typed before the command
    /// it is reading starts; so the content is typed only once the `cat` line has been
    /// echoed in full. A short write (a slow, loaded guest) is retried.
    fn write_file(&self, path: &str, text: &str) -> anyhow::Result<()> {
        let want = text.len();
        let mut got = None;
        for _ in 0..3 {
            let skip = self.log_len();
            let cmd = format!("cat > {path}");
            {
                let _held = self.type_lines(&[&cmd])?;
                self.wait_for(skip, &format!("{cmd}\r\n"), Duration::from_secs(120))?;
            }
            std::thread::sleep(Duration::from_secs(1));
            // ^D at the start of a line ends `cat`; the check line after it goes to the
            // shell, on the same connection, held until the answer came.
            let check = format!("echo \"soak-size: $(wc -c < {path}) bytes, $((6*7))\"");
            let mut lines: Vec<&str> = text.lines().collect();
            lines.push("\u{4}");
            lines.push(&check);
            let skip = self.log_len();
            let held = self.type_lines(&lines)?;
            let mut out = self.wait_for(skip, " bytes, 42", Duration::from_secs(120));
            drop(held);
            // A loaded guest may have lost the check line: type it again on its own.
            for _ in 0..3 {
                if out.is_ok() {
                    break;
                }
                out = self.run(&check, " bytes, 42", Duration::from_secs(60));
            }
            let out = out.unwrap_or_default();
            // The echo of the typed line has "soak-size: $(wc", the answer a number.
            got = out.lines().find_map(|l| {
                l.split("soak-size: ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<usize>()
                    .ok()
            });
            if got == Some(want) {
                return Ok(());
            }
            eprintln!("soak: {path} in the guest has {got:?} bytes, not {want}; typing it again");
        }
        bail!("could not write {path} in the guest ({got:?} bytes, want {want})")
    }
}

// ---------------------------------------------------------------------------------------
// Sampling and reading the episode.

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    mono_ns: u64,
    mem: MemStatus,
    cpu_ticks: u64,
    qemu_cpu_ticks: u64,
}

fn sample(cis_pid: u32, qemu_pid: u32) -> Option<Sample> {
    let read = |p: String| std::fs::read_to_string(p).ok();
    let mem = parse_status(&read(format!("/proc/{cis_pid}/status"))?)?;
    let cpu_ticks = parse_stat_cpu_ticks(&read(format!("/proc/{cis_pid}/stat"))?)?;
    let qemu_cpu_ticks = read(format!("/proc/{qemu_pid}/stat"))
        .and_then(|s| parse_stat_cpu_ticks(&s))
        .unwrap_or(0);
    Some(Sample {
        mono_ns: mono_ns(),
        mem,
        cpu_ticks,
        qemu_cpu_ticks,
    })
}

#[derive(Debug, Default, Clone)]
struct Minute {
    max_rss_kib: u64,
    hwm_kib: u64,
    cpu_pct: Option<f64>,
    qemu_cpu_pct: Option<f64>,
    rows: BTreeMap<String, u64>,
    missed_ticks: u64,
    qmp_stale: u64,
    qmp_recovered: u64,
    agent_rejects: u64,
    /// Agent rows from the real agent (its lines carry the guest's `mono_ns`; the
    /// flood's do not).
    agent_real_rows: u64,
    qmp_events: u64,
}

fn minute_of(t_mono_ns: u64, minutes: usize) -> usize {
    ((t_mono_ns / 60_000_000_000) as usize).min(minutes.saturating_sub(1))
}

struct EpisodeFacts {
    minutes: Vec<Minute>,
    streams: Vec<String>,
    seq: BTreeMap<String, SeqResult>,
    meta: Value,
    /// Each stall window on the episode's time axis, with the qmp stale/recovered event
    /// times around it.
    stalls: Vec<StallSeen>,
    /// Seconds into the capture at which VmRSS rose by at least 1 MiB from the previous
    /// sample, and by how much (KiB).
    rss_steps: Vec<(f64, u64)>,
    /// Largest VmRSS after the capture's duration (the close sequence), KiB.
    close_max_rss_kib: Option<u64>,
    /// VmHWM of the last sample (close sequence included), KiB.
    last_hwm_kib: u64,
}

#[derive(Debug, Clone)]
struct StallSeen {
    from_ns: u64,
    to_ns: u64,
    stale_at_ns: Option<u64>,
    recovered_at_ns: Option<u64>,
    missed_ticks_inside: u64,
}

fn read_lines(path: &Path, mut f: impl FnMut(&str)) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        f(line.trim_end_matches('\n'));
    }
}

fn read_episode(
    dir: &Path,
    minutes: usize,
    samples: &[Sample],
    stall_windows_mono: &[(u64, u64)],
) -> anyhow::Result<EpisodeFacts> {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("meta.json")).context("meta.json")?,
    )?;
    let origin = meta["clock"]["mono_origin_ns"]
        .as_u64()
        .context("meta.clock.mono_origin_ns")?;
    let ticks_scheduled = meta["result"]["ticks_scheduled"].as_u64();
    let mut mins = vec![Minute::default(); minutes];

    // Process samples, on the episode's axis.
    let tck = clk_tck() as f64;
    let mut by_min: Vec<Vec<Sample>> = vec![Vec::new(); minutes];
    let capture_ns = minutes as u64 * 60_000_000_000;
    let mut close_max_rss_kib = None;
    let mut rss_steps = Vec::new();
    let mut prev_rss = None;
    for s in samples {
        let Some(t) = s.mono_ns.checked_sub(origin) else {
            continue;
        };
        // Samples after the duration are the close sequence (flush, manifest hashing),
        // not the steady state the table is about.
        if t >= capture_ns {
            close_max_rss_kib = close_max_rss_kib.max(Some(s.mem.vm_rss_kib));
            continue;
        }
        if let Some(p) = prev_rss {
            if s.mem.vm_rss_kib >= p + 1024 {
                rss_steps.push((t as f64 / 1e9, s.mem.vm_rss_kib - p));
            }
        }
        prev_rss = Some(s.mem.vm_rss_kib);
        by_min[minute_of(t, minutes)].push(*s);
    }
    let mut prev_last: Option<Sample> = None;
    for (m, ss) in by_min.iter().enumerate() {
        let (Some(first), Some(last)) = (ss.first(), ss.last()) else {
            continue;
        };
        let from = prev_last.unwrap_or(*first);
        let dt = (last.mono_ns - from.mono_ns) as f64 / 1e9;
        if dt > 0.0 {
            mins[m].cpu_pct = Some((last.cpu_ticks - from.cpu_ticks) as f64 / tck / dt * 100.0);
            mins[m].qemu_cpu_pct = Some(
                last.qemu_cpu_ticks.saturating_sub(from.qemu_cpu_ticks) as f64 / tck / dt * 100.0,
            );
        }
        mins[m].max_rss_kib = ss.iter().map(|s| s.mem.vm_rss_kib).max().unwrap_or(0);
        mins[m].hwm_kib = last.mem.vm_hwm_kib;
        prev_last = Some(*last);
    }

    // Events.
    let tick_stream = if meta["backend"]["used"] == "bpf" {
        "bpf-sched"
    } else {
        "proc"
    };
    let mut gaps: BTreeMap<String, Vec<(u64, u64, u64)>> = BTreeMap::new();
    let mut stale_t = Vec::new();
    let mut recovered_t = Vec::new();
    read_lines(&dir.join("events.jsonl"), |line| {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let t = v["t_mono_ns"].as_u64().unwrap_or(0);
        let m = minute_of(t, minutes);
        let source = v["source"].as_str().unwrap_or_default();
        match v["event"].as_str().unwrap_or_default() {
            "gap" => {
                if let (Some(a), Some(b)) = (v["from_seq"].as_u64(), v["to_seq"].as_u64()) {
                    gaps.entry(source.to_owned()).or_default().push((t, a, b));
                    if source == tick_stream {
                        mins[m].missed_ticks += b - a + 1;
                    }
                }
            }
            "source_stale" if source == "qmp" => {
                mins[m].qmp_stale += 1;
                stale_t.push(t);
            }
            "source_recovered" if source == "qmp" => {
                mins[m].qmp_recovered += 1;
                recovered_t.push(t);
            }
            "agent_rejects" => {
                if let Some(o) = v["since_last_event"].as_object() {
                    mins[m].agent_rejects += o.values().filter_map(Value::as_u64).sum::<u64>();
                }
            }
            "qmp_event" => mins[m].qmp_events += 1,
            _ => {}
        }
    })?;

    // Telemetry streams.
    let mut streams = Vec::new();
    let mut seq = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("telemetry-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .trim_start_matches("telemetry-")
            .trim_end_matches(".jsonl")
            .to_owned();
        let host = HOST_STREAMS.contains(&name.as_str());
        let counted = host || name == "qmp";
        let mut acct = SeqAccount::default();
        let mut bad = 0u64;
        read_lines(&f, |line| match row_head(line) {
            Some((t, s)) => {
                let m = &mut mins[minute_of(t, minutes)];
                *m.rows.entry(name.clone()).or_default() += 1;
                if name == "agent" && line.contains("\"guest_mono_ns\":") {
                    m.agent_real_rows += 1;
                }
                if let (true, Some(s)) = (counted, s) {
                    acct.row(s);
                }
            }
            None => bad += 1,
        })?;
        if bad > 0 {
            eprintln!("soak: {bad} unreadable lines in {}", f.display());
        }
        if counted {
            for &(_, a, b) in gaps.get(&name).map(Vec::as_slice).unwrap_or_default() {
                acct.gap(a, b);
            }
            // Only the host streams tick with the episode's ticks_scheduled.
            let end = if host { ticks_scheduled } else { None };
            seq.insert(name.clone(), acct.finish(end));
        }
        streams.push(name);
    }

    let tick_gaps = gaps.get(tick_stream).cloned().unwrap_or_default();
    let stalls = stall_windows_mono
        .iter()
        .filter_map(|&(a, b)| Some((a.checked_sub(origin)?, b.checked_sub(origin)?)))
        .map(|(from_ns, to_ns)| StallSeen {
            from_ns,
            to_ns,
            stale_at_ns: stale_t
                .iter()
                .copied()
                .find(|&t| t >= from_ns && t <= to_ns),
            recovered_at_ns: recovered_t.iter().copied().find(|&t| t > from_ns),
            missed_ticks_inside: tick_gaps
                .iter()
                .filter(|(t, _, _)| *t >= from_ns && *t <= to_ns + 1_000_000_000)
                .map(|(_, a, b)| b - a + 1)
                .sum(),
        })
        .collect();
    Ok(EpisodeFacts {
        minutes: mins,
        streams,
        seq,
        meta,
        stalls,
        rss_steps,
        close_max_rss_kib,
        last_hwm_kib: samples.last().map_or(0, |s| s.mem.vm_hwm_kib),
    })
}

// ---------------------------------------------------------------------------------------
// The command.

struct RunFacts {
    command: String,
    started_at: String,
    accel: String,
    flood_rounds: Option<u64>,
    proxy: Arc<ProxyStats>,
    validate: String,
    trace_ok: bool,
    episode: PathBuf,
    episode_bytes: u64,
    samples: Vec<Sample>,
    /// Each stall window as absolute CLOCK_MONOTONIC ns (start, end).
    stall_windows_mono: Vec<(u64, u64)>,
}

pub fn run(args: &SoakArgs) -> anyhow::Result<()> {
    if args.minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    let schedule = StallSchedule::new(args.stall_every_s, args.stall_s)?;
    let command = soak_command_line(args);
    util::cargo(&[
        "build",
        "--release",
        "--locked",
        "-p",
        "cis490",
        "--bin",
        "cis490",
    ])?;
    let cis490 = vm::target_dir().join("release").join("cis490");
    let started_at = String::from_utf8_lossy(
        &Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()?
            .stdout,
    )
    .trim()
    .to_owned();

    let run_dir = vm::default_run_dir().with_file_name("soak");
    let _ = vm::stop(&run_dir);
    let opts = vm::StartOpts {
        run_dir: Some(run_dir.clone()),
        ..Default::default()
    };
    let kv = vm::start(&opts)?;
    let get = |k: &str| {
        kv.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let result = (|| -> anyhow::Result<RunFacts> {
        let qemu_pid: u32 = get("PID").parse().context("vm PID")?;
        let console = Console {
            socket: PathBuf::from(get("CONSOLE")),
            log: PathBuf::from(get("CONSOLE_LOG")),
        };
        // The hostile guest: the script, then started detached from the console.
        console.write_file("/tmp/soak.sh", GUEST_SCRIPT)?;
        let start = format!(
            "setsid sh /tmp/soak.sh {} {} </dev/null >/dev/null 2>&1 &",
            args.agent_rate_hz, args.flood_pause_s
        );
        console.run(&start, "soak-flood: 42 started", Duration::from_secs(120))?;
        eprintln!("soak: guest flooder running");

        let proxy_sock = run_dir.join("qmp-soak-proxy.sock");
        let proxy = QmpProxy::start(&proxy_sock, Path::new(&get("QMP")), schedule)?;
        let scratch = vm::target_dir().join("soak-episodes");
        std::fs::create_dir_all(&scratch)?;
        let secs = u64::from(args.minutes) * 60;
        let mut child = Command::new(&cis490)
            .args(["trace", "--qemu-pid", &qemu_pid.to_string()])
            .args(["--rate-hz", &args.rate_hz.to_string()])
            .args(["--duration", &secs.to_string(), "-q"])
            .arg("--qmp")
            .arg(&proxy_sock)
            .args(["--agent", &get("AGENT")])
            .arg("--data-root")
            .arg(&scratch)
            .env("CIS490_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning cis490 trace")?;
        let cis_pid = child.id();
        let stderr_reader = drain(child.stderr.take());
        let stdout_reader = drain(child.stdout.take());
        let mut samples = Vec::new();
        let t0 = Instant::now();
        let limit = Duration::from_secs(secs + 120);
        let mut next_report = 60;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if let Some(s) = sample(cis_pid, qemu_pid) {
                samples.push(s);
            }
            if t0.elapsed().as_secs() >= next_report {
                if let Some(s) = samples.last() {
                    eprintln!(
                        "soak: {} min: VmRSS {} KiB, VmHWM {} KiB",
                        next_report / 60,
                        s.mem.vm_rss_kib,
                        s.mem.vm_hwm_kib
                    );
                }
                next_report += 60;
            }
            if t0.elapsed() > limit {
                signal(&child, libc::SIGINT);
                std::thread::sleep(Duration::from_secs(10));
                signal(&child, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let proxy_started = proxy.started_mono_ns;
        let proxy_stats = proxy.finish();
        let stdout = stdout_reader.join().unwrap_or_default();
        let stderr = stderr_reader.join().unwrap_or_default();
        let episode = crate::util::episode_path(stdout.as_bytes());
        if !episode.join("meta.json").exists() {
            bail!("cis490 trace ({status}) left no episode:\n{stderr}");
        }
        if !stderr.trim().is_empty() {
            eprintln!("soak: cis490 stderr:\n{}", tail(&stderr, 20));
        }
        // How many flood rounds the guest wrote.
        let flood_rounds = console
            .run(
                "echo \"FLOODN=$(cat /tmp/flood.n) END$((40+2))\"",
                "END42",
                Duration::from_secs(30),
            )
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.contains("END42") && l.contains("FLOODN="))?
                    .split("FLOODN=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        let v = Command::new(&cis490)
            .arg("validate")
            .arg(&episode)
            .output()?;
        let validate = if v.status.success() {
            "ok".to_owned()
        } else {
            format!(
                "FAILED: {}",
                tail(&String::from_utf8_lossy(&v.stdout), 8).replace('\n', " / ")
            )
        };
        let windows = schedule
            .windows(Duration::from_secs(secs))
            .into_iter()
            .map(|(a, b)| {
                (
                    proxy_started + a.as_nanos() as u64,
                    proxy_started + b.as_nanos() as u64,
                )
            })
            .collect();
        Ok(RunFacts {
            command: command.clone(),
            started_at,
            accel: get("ACCEL"),
            flood_rounds,
            proxy: proxy_stats,
            validate,
            trace_ok: status.success(),
            episode_bytes: dir_bytes(&episode),
            episode,
            samples,
            stall_windows_mono: windows,
        })
    })();
    let _ = vm::stop(&run_dir);
    let facts = result?;
    let ep = read_episode(
        &facts.episode,
        args.minutes as usize,
        &facts.samples,
        &facts.stall_windows_mono,
    )?;
    let md = render(args, &facts, &ep);
    if args.keep {
        eprintln!("soak: episode kept in {}", facts.episode.display());
    } else {
        let _ = std::fs::remove_dir_all(&facts.episode);
    }
    match &args.out {
        Some(p) => std::fs::write(p, &md).with_context(|| format!("{}", p.display()))?,
        None => print!("{md}"),
    }
    if args.write_benchmarks {
        let path = root().join("BENCHMARKS.md");
        let doc = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(&path, replace_section(&doc, &md))?;
        eprintln!("soak: updated the Soak section of {}", path.display());
    }
    Ok(())
}

fn soak_command_line(a: &SoakArgs) -> String {
    let mut s = format!("cargo xtask soak --minutes {}", a.minutes);
    if a.rate_hz != 1000 {
        let _ = write!(s, " --rate-hz {}", a.rate_hz);
    }
    if a.stall_every_s != 60 || a.stall_s != 10 {
        let _ = write!(
            s,
            " --stall-every-s {} --stall-s {}",
            a.stall_every_s, a.stall_s
        );
    }
    if a.agent_rate_hz != 10 {
        let _ = write!(s, " --agent-rate-hz {}", a.agent_rate_hz);
    }
    if a.flood_pause_s != "0.1" {
        let _ = write!(s, " --flood-pause-s {}", a.flood_pause_s);
    }
    s
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn render(args: &SoakArgs, f: &RunFacts, ep: &EpisodeFacts) -> String {
    let mut md = String::new();
    let result = &ep.meta["result"];
    let backend = ep.meta["backend"]["used"].as_str().unwrap_or("?");
    let _ = writeln!(md, "## Soak\n");
    let _ = writeln!(
        md,
        "- command: `{}` (started {}; the {} test VM, {} backend, {} Hz)",
        f.command, f.started_at, f.accel, backend, args.rate_hz
    );
    let _ = writeln!(
        md,
        "- hostile guest: the real agent ({} lines/s) and a busybox flooder share the agent port through a FIFO in the guest (the port opens once: EBUSY for a second writer); each flood round writes a 250-new-key line, a 60 KB and a 70 KB line, 2,048 malformed/deep/non-object lines and 4 KiB of /dev/urandom, then sleeps {} s; {} rounds written.",
        args.agent_rate_hz,
        args.flood_pause_s,
        f.flood_rounds.map_or("?".into(), |n| n.to_string())
    );
    let _ = writeln!(
        md,
        "- QMP: cis490's `--qmp` is a proxy that withholds every byte QEMU sends for {} s every {} s (first at {} s); {} connections, {} bytes to QEMU, {} bytes back, at most {} bytes withheld at once{}.",
        args.stall_s,
        args.stall_every_s,
        args.stall_every_s / 2,
        f.proxy.connections.load(Ordering::Relaxed),
        f.proxy.bytes_to_qemu.load(Ordering::Relaxed),
        f.proxy.bytes_to_client.load(Ordering::Relaxed),
        f.proxy.max_withheld.load(Ordering::Relaxed),
        match f.proxy.overflows.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(", {n} connections dropped over the 16 MiB bound"),
        }
    );
    let _ = writeln!(
        md,
        "- RSS and CPU: cis490's /proc/<pid>/status and stat, read every 250 ms (RSS: the minute's largest VmRSS; CPU: share of one core over the minute, all threads; samples after the duration, the close sequence, are reported apart). Rows: lines of each telemetry file whose `t_mono_ns` falls in the minute (the close sequence counts in the last).\n"
    );
    let streams: Vec<&String> = ep.streams.iter().collect();
    let _ = write!(
        md,
        "| minute | VmRSS MiB | VmHWM MiB | cis490 CPU | QEMU CPU | missed ticks |"
    );
    for s in &streams {
        let _ = write!(md, " rows {s} |");
    }
    let _ = writeln!(
        md,
        " real agent rows | agent rejects | qmp stale / recovered | qmp events |"
    );
    let _ = write!(md, "|---|---|---|---|---|---|");
    for _ in &streams {
        let _ = write!(md, "---|");
    }
    let _ = writeln!(md, "---|---|---|---|");
    let pct = |p: Option<f64>| p.map_or("—".into(), |p| format!("{p:.1} %"));
    for (i, m) in ep.minutes.iter().enumerate() {
        let _ = write!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            i + 1,
            mib(m.max_rss_kib),
            mib(m.hwm_kib),
            pct(m.cpu_pct),
            pct(m.qemu_cpu_pct),
            m.missed_ticks
        );
        for s in &streams {
            let _ = write!(md, " {} |", m.rows.get(*s).copied().unwrap_or(0));
        }
        let _ = writeln!(
            md,
            " {} | {} | {} / {} | {} |",
            m.agent_real_rows, m.agent_rejects, m.qmp_stale, m.qmp_recovered, m.qmp_events
        );
    }
    let _ = writeln!(md);

    // Verdicts.
    let rss: Vec<u64> = ep.minutes.iter().map(|m| m.max_rss_kib).collect();
    let (flat, growth) = rss_flat(&rss);
    let _ = writeln!(
        md,
        "- **RSS flat: {}** (largest VmRSS of minutes 2–{} vs minute 1: {:+.1} MiB; allowed max(1 MiB, 5 %); VmHWM at the end {} MiB).",
        if flat { "yes" } else { "NO" },
        ep.minutes.len(),
        growth as f64 / 1024.0,
        mib(ep.minutes.last().map_or(0, |m| m.hwm_kib))
    );
    let steps: Vec<String> = ep
        .rss_steps
        .iter()
        .take(12)
        .map(|(t, d)| format!("{t:.0} s +{} MiB", mib(*d)))
        .collect();
    let _ = writeln!(
        md,
        "- VmRSS steps of 1 MiB or more between two samples: {}; largest VmRSS during the close sequence (after the duration): {}; VmHWM at the last sample: {} MiB.",
        if steps.is_empty() {
            "none".to_owned()
        } else {
            steps.join(", ")
        },
        ep.close_max_rss_kib
            .map_or("no sample (it took under 250 ms)".into(), |k| format!(
                "{} MiB",
                mib(k)
            )),
        mib(ep.last_hwm_kib)
    );
    let host: Vec<(&String, &SeqResult)> = ep
        .seq
        .iter()
        .filter(|(n, _)| HOST_STREAMS.contains(&n.as_str()))
        .collect();
    let lost: u64 = host.iter().map(|(_, r)| r.undeclared).sum();
    let mut detail = Vec::new();
    for (n, r) in &host {
        detail.push(format!(
            "{n}: {} ticks with rows, {} declared by gap events, {} undeclared{}{}",
            r.ticks_with_rows,
            r.declared,
            r.undeclared,
            match r.declared_but_present {
                0 => String::new(),
                n => format!(" ({n} declared ticks nonetheless have rows)"),
            },
            if r.undeclared_ranges.is_empty() {
                String::new()
            } else {
                format!(" (first: {:?})", r.undeclared_ranges)
            }
        ));
    }
    let _ = writeln!(
        md,
        "- **Rows lost (host-stream seq holes not declared by a gap event): {lost}** {}: {}.",
        if lost == 0 && !host.is_empty() {
            "(ok)"
        } else {
            "(FAIL)"
        },
        detail.join("; ")
    );
    let scheduled = result["ticks_scheduled"].as_u64().unwrap_or(0);
    let missed = result["ticks_missed"].as_u64().unwrap_or(0);
    let _ = writeln!(
        md,
        "- Missed ticks: {missed} of {scheduled} ({:.3} %), all declared by gap events; tick lateness p99 {} µs, max {} µs ({} ticks, `{}`).",
        missed as f64 * 100.0 / scheduled.max(1) as f64,
        result["tick_lateness"]["p99_ns"].as_u64().unwrap_or(0) / 1000,
        result["tick_lateness"]["max_ns"].as_u64().unwrap_or(0) / 1000,
        result["tick_source"].as_str().unwrap_or("?"),
        result["end_reason"].as_str().unwrap_or("?"),
    );
    let marked = ep.stalls.iter().filter(|s| s.stale_at_ns.is_some()).count();
    let recovered = ep
        .stalls
        .iter()
        .filter(|s| s.recovered_at_ns.is_some())
        .count();
    let stall_detail: Vec<String> = ep
        .stalls
        .iter()
        .map(|s| {
            let at =
                |t: Option<u64>| t.map_or("never".into(), |t| format!("{:.1} s", t as f64 / 1e9));
            format!(
                "{:.1}–{:.1} s: stale at {}, recovered at {}, {} host ticks missed",
                s.from_ns as f64 / 1e9,
                s.to_ns as f64 / 1e9,
                at(s.stale_at_ns),
                at(s.recovered_at_ns),
                s.missed_ticks_inside
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "- **QMP stalls: {} injected, {marked} marked stale, {recovered} recovered** ({}; for comparison, the host ticks missed in any {} s at the capture's average rate: {:.0}). QMP seq holes without a gap event: {}; QMP polls a gap event declares missing that nonetheless have rows: {}.",
        ep.stalls.len(),
        stall_detail.join("; "),
        args.stall_s + 1,
        missed as f64 / scheduled.max(1) as f64 * f64::from(args.rate_hz) * (args.stall_s + 1) as f64,
        ep.seq.get("qmp").map_or("—".into(), |r| r.undeclared.to_string()),
        ep.seq
            .get("qmp")
            .map_or("—".into(), |r| r.declared_but_present.to_string())
    );
    let agent = ep.meta["sources"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "agent"))
        .cloned()
        .unwrap_or(Value::Null);
    let _ = writeln!(
        md,
        "- Agent: {} rows ({} from the real agent), {} bytes received, {} connects; rejects {}.",
        agent["rows"],
        ep.minutes.iter().map(|m| m.agent_real_rows).sum::<u64>(),
        agent["bytes_read"],
        agent["connects"],
        agent["rejects"]
    );
    let _ = writeln!(
        md,
        "- Episode: {:.1} MiB, end_reason `{}`, trace exit {}, `cis490 validate`: {}.",
        f.episode_bytes as f64 / 1048576.0,
        result["end_reason"].as_str().unwrap_or("?"),
        if f.trace_ok { "0" } else { "non-zero" },
        f.validate
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> String {
        std::fs::read_to_string(root().join("tests/data/qemu-10.0.2").join(rel)).unwrap()
    }

    #[test]
    fn status_parser_reads_vmrss_and_vmhwm_of_a_real_qemu_status() {
        let s = parse_status(&fixture("kvm/proc/status")).unwrap();
        assert_eq!(
            s,
            MemStatus {
                vm_rss_kib: 33792,
                vm_hwm_kib: 33916
            }
        );
        // This very process too (a live kernel's format).
        let me = parse_status(&std::fs::read_to_string("/proc/self/status").unwrap()).unwrap();
        assert!(me.vm_rss_kib > 0 && me.vm_hwm_kib >= me.vm_rss_kib);
    }

    #[test]
    fn status_parser_bad_input_without_memory_lines_is_none() {
        assert_eq!(
            parse_status("Name:\tkthreadd\nState:\tS (sleeping)\n"),
            None
        );
        assert_eq!(parse_status("VmRSS:\tlots kB\nVmHWM:\t1 kB\n"), None);
        // A prefix of another field name is not the field (VmRSSx).
        assert_eq!(parse_status("VmRSSx:\t5 kB\nVmHWM:\t1 kB\n"), None);
    }

    #[test]
    fn stat_parser_counts_fields_after_a_comm_with_spaces_and_slashes() {
        // Real QEMU process stat: utime 13, stime 182.
        assert_eq!(parse_stat_cpu_ticks(&fixture("kvm/proc/stat")), Some(195));
        let tid = std::fs::read_dir(root().join("tests/data/qemu-10.0.2/kvm/proc/task"))
            .unwrap()
            .flatten()
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.starts_with("CPU 1/"))
            })
            .unwrap();
        let text = std::fs::read_to_string(tid.path().join("stat")).unwrap();
        assert!(text.contains("(CPU 1/KVM)"));
        let f: Vec<&str> = text
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let want: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        assert_eq!(parse_stat_cpu_ticks(&text), Some(want));
        assert_eq!(parse_stat_cpu_ticks("12 (x) S 1"), None);
    }

    #[test]
    fn stall_schedule_withholds_ten_seconds_in_the_middle_of_each_minute() {
        let s = StallSchedule::new(60, 10).unwrap();
        let at = |secs: f64| s.is_stalled(Duration::from_secs_f64(secs));
        assert!(!at(0.0) && !at(29.999));
        assert!(at(30.0) && at(39.999));
        assert!(!at(40.0) && !at(89.9));
        assert!(at(90.0) && at(99.0) && !at(100.0));
        assert!(at(30.0 + 60.0 * 29.0));
        assert_eq!(
            s.windows(Duration::from_secs(120)),
            vec![
                (Duration::from_secs(30), Duration::from_secs(40)),
                (Duration::from_secs(90), Duration::from_secs(100))
            ]
        );
        assert!(s.windows(Duration::from_secs(30)).is_empty());
    }

    #[test]
    fn stall_schedule_bad_input_stall_as_long_as_the_period_is_refused() {
        assert!(StallSchedule::new(10, 10).is_err());
        assert!(StallSchedule::new(0, 0).is_err());
    }

    #[test]
    fn row_head_reads_cis490_row_prefixes_and_falls_back_to_json() {
        assert_eq!(
            row_head(
                r#"{"t_mono_ns":5,"t_wall_ns":9,"source":"bpf-sched","available_in_deployment":false,"seq":42,"tid":7}"#
            ),
            Some((5, Some(42)))
        );
        assert_eq!(
            row_head(
                r#"{"t_mono_ns":5,"t_wall_ns":9,"source":"agent","available_in_deployment":true,"guest_seq":3}"#
            ),
            Some((5, None))
        );
        // Another key order: parsed as JSON.
        assert_eq!(
            row_head(r#"{"seq":3,"t_mono_ns":8,"t_wall_ns":9}"#),
            Some((8, Some(3)))
        );
        assert_eq!(row_head("{\"t_mono_ns\":12,\"t_w"), None);
        assert_eq!(row_head(""), None);
    }

    #[test]
    fn hole_accounting_separates_declared_gaps_from_lost_rows() {
        let mut a = SeqAccount::default();
        // Ticks 0..=9; several rows per tick (per-thread streams); 3-4 declared; 7 lost.
        for s in [0, 0, 1, 1, 2, 5, 5, 6, 8, 9] {
            a.row(s);
        }
        a.gap(3, 4);
        let r = a.finish(None);
        assert_eq!(r.ticks_with_rows, 7);
        assert_eq!(r.declared, 2);
        assert_eq!(r.undeclared, 1);
        assert_eq!(r.undeclared_ranges, vec![(7, 7)]);
        assert_eq!(r.declared_but_present, 0);
        assert_eq!(a.rows, 10);
        // Ticks that came due after the last row are lost too unless declared.
        let r = a.finish(Some(13));
        assert_eq!(r.undeclared, 4);
        assert_eq!(r.undeclared_ranges, vec![(7, 7), (10, 12)]);
    }

    #[test]
    fn hole_accounting_all_declared_is_zero_lost_and_overlaps_are_counted() {
        let mut a = SeqAccount::default();
        for s in (0..200).filter(|s| !(64..130).contains(s)) {
            a.row(s);
        }
        a.gap(64, 129);
        a.gap(10, 10); // declared, yet it has rows: a contradiction to report
        let r = a.finish(Some(200));
        assert_eq!(r.undeclared, 0);
        assert!(r.undeclared_ranges.is_empty());
        assert_eq!(r.declared, 67);
        assert_eq!(r.declared_but_present, 1);
        assert_eq!(r.ticks_with_rows, 134);
    }

    #[test]
    fn rss_flat_allows_noise_and_catches_growth() {
        assert_eq!(rss_flat(&[10_000, 10_400, 10_900]), (true, 900));
        assert_eq!(rss_flat(&[10_000, 10_000, 12_000]), (false, 2000));
        // 5 % of a large baseline is the slack.
        assert_eq!(rss_flat(&[100_000, 104_000]), (true, 4000));
        assert_eq!(rss_flat(&[9_000]), (true, 0));
        assert_eq!(rss_flat(&[]), (false, 0));
    }

    #[test]
    fn soak_section_is_replaced_in_place_or_appended() {
        let doc = "# B\n\n## 1. CPU\nx\n\n## Soak\nold\nold2\n\n## Goals\ny\n";
        let out = replace_section(doc, "## Soak\n\nnew\n");
        assert_eq!(
            out,
            "# B\n\n## 1. CPU\nx\n\n## Soak\n\nnew\n\n## Goals\ny\n"
        );
        let out = replace_section("# B\n\n## 1. CPU\nx\n", "## Soak\n\nnew\n");
        assert_eq!(out, "# B\n\n## 1. CPU\nx\n\n## Soak\n\nnew\n");
        // Last section of the file.
        let out = replace_section("# B\n## Soak\nold\n", "## Soak\nnew");
        assert_eq!(out, "# B\n## Soak\nnew\n");
    }

    #[test]
    fn an_episode_is_read_into_minutes_holes_and_stalls() {
        // A two-minute episode in cis490's format: bpf-sched ticks 0..=9 at 0 s and 60 s,
        // tick 4 declared by a gap, tick 7 missing without one; agent rows from the real
        // agent (guest_mono_ns) and from the flood; a qmp stall marked and recovered.
        let dir = std::env::temp_dir().join(format!("soak-episode-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let origin = 1_000_000_000_000u64;
        std::fs::write(
            dir.join("meta.json"),
            serde_json::json!({
                "clock": {"mono_origin_ns": origin},
                "backend": {"used": "bpf"},
                "result": {"ticks_scheduled": 10, "ticks_missed": 1},
                "sources": [],
            })
            .to_string(),
        )
        .unwrap();
        let mut sched = String::new();
        for seq in (0..10u64).filter(|&s| s != 4 && s != 7) {
            let t = if seq < 5 { seq } else { 60_000_000_000 + seq };
            for tid in [1, 2] {
                sched.push_str(&format!("{{\"t_mono_ns\":{t},\"t_wall_ns\":1,\"source\":\"bpf-sched\",\"available_in_deployment\":false,\"seq\":{seq},\"tid\":{tid}}}\n"));
            }
        }
        std::fs::write(dir.join("telemetry-bpf-sched.jsonl"), sched).unwrap();
        std::fs::write(
            dir.join("telemetry-agent.jsonl"),
            "{\"t_mono_ns\":5,\"t_wall_ns\":1,\"source\":\"agent\",\"available_in_deployment\":true,\"seq\":0,\"guest_seq\":3,\"guest_mono_ns\":9}\n\
             {\"t_mono_ns\":6,\"t_wall_ns\":1,\"source\":\"agent\",\"available_in_deployment\":true,\"seq\":1,\"guest_seq\":7,\"guest_flood\":1}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("events.jsonl"),
            [
                r#"{"t_mono_ns":4,"t_wall_ns":1,"event":"gap","source":"bpf-sched","from_seq":4,"to_seq":4}"#,
                r#"{"t_mono_ns":31000000000,"t_wall_ns":1,"event":"source_stale","source":"qmp"}"#,
                r#"{"t_mono_ns":40000000000,"t_wall_ns":1,"event":"source_recovered","source":"qmp"}"#,
                r#"{"t_mono_ns":70000000000,"t_wall_ns":1,"event":"agent_rejects","source":"agent","since_last_event":{"rate_limited":40,"nul":2}}"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let sample = |t_s: u64, rss: u64| Sample {
            mono_ns: origin + t_s * 1_000_000_000,
            mem: MemStatus {
                vm_rss_kib: rss,
                vm_hwm_kib: rss,
            },
            cpu_ticks: t_s * 10,
            qemu_cpu_ticks: 0,
        };
        let samples = [
            sample(1, 9000),
            sample(59, 9100),
            sample(61, 11000),
            sample(119, 9500),
        ];
        let windows = [(origin + 30_000_000_000, origin + 40_000_000_000)];
        let ep = read_episode(&dir, 2, &samples, &windows).unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        let r = &ep.seq["bpf-sched"];
        assert_eq!((r.ticks_with_rows, r.declared, r.undeclared), (8, 1, 1));
        assert_eq!(r.undeclared_ranges, vec![(7, 7)]);
        assert!(
            !ep.seq.contains_key("agent"),
            "agent seqs are not host ticks"
        );
        assert_eq!(ep.minutes[0].rows["bpf-sched"], 8);
        assert_eq!(ep.minutes[1].rows["bpf-sched"], 8);
        assert_eq!(ep.minutes[0].missed_ticks, 1);
        assert_eq!(
            (ep.minutes[0].rows["agent"], ep.minutes[0].agent_real_rows),
            (2, 1)
        );
        assert_eq!(ep.minutes[1].agent_rejects, 42);
        assert_eq!(
            (ep.minutes[0].qmp_stale, ep.minutes[0].qmp_recovered),
            (1, 1)
        );
        assert_eq!(ep.minutes[1].max_rss_kib, 11000);
        assert_eq!(ep.rss_steps, vec![(61.0, 1900)]);
        // 10 ticks/s of CPU time at 100 ticks/s = 10 % (CLK_TCK is 100 on Linux).
        let cpu = ep.minutes[0].cpu_pct.unwrap();
        assert!((cpu - 1000.0 / clk_tck() as f64).abs() < 0.01, "{cpu}");
        assert_eq!(ep.stalls.len(), 1);
        assert_eq!(ep.stalls[0].stale_at_ns, Some(31_000_000_000));
        assert_eq!(ep.stalls[0].recovered_at_ns, Some(40_000_000_000));
    }

    #[test]
    fn the_proxy_withholds_qemu_bytes_during_a_stall_and_forwards_after() {
        // A real pair of Unix sockets: a stand-in upstream echoing a reply per line.
        let dir = std::env::temp_dir().join(format!("soak-proxy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let up_path = dir.join("up.sock");
        let _ = std::fs::remove_file(&up_path);
        let up = UnixListener::bind(&up_path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = up.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                let _ = w.write_all(format!("reply:{line}\n").as_bytes());
            }
        });
        // Stall from 0.5 s to 3.5 s after the proxy's start.
        let schedule = StallSchedule {
            first: Duration::from_millis(500),
            every: Duration::from_secs(60),
            length: Duration::from_secs(3),
        };
        let listen = dir.join("proxy.sock");
        let before_start = Instant::now();
        let proxy = QmpProxy::start(&listen, &up_path, schedule).unwrap();
        let c = UnixStream::connect(&listen).unwrap();
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        let mut line = String::new();
        w.write_all(b"a\n").unwrap();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "reply:a\n");
        std::thread::sleep(Duration::from_secs(1).saturating_sub(before_start.elapsed()));
        let sent = before_start.elapsed();
        // The stall ends at least 3.5 s after `before_start`: "b" went in inside it.
        assert!(
            sent < Duration::from_millis(3400),
            "too late to test: {sent:?}"
        );
        w.write_all(b"b\n").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "reply:b\n");
        let replied = before_start.elapsed();
        assert!(
            replied >= Duration::from_millis(3500),
            "reply came at {replied:?}, inside the stall"
        );
        let stats = proxy.finish();
        assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
        assert_eq!(stats.bytes_to_qemu.load(Ordering::Relaxed), 4);
        assert!(stats.max_withheld.load(Ordering::Relaxed) >= 8);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
