//! Processes the tests start and watch: the bundled targets, a sleeper, signals, CPU and
//! memory of a live process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::paths::bin;

/// The bundled multi-threaded target, killed when dropped.
pub struct Load {
    pub child: Child,
}

impl Load {
    /// Start `cis490-testload ARGS` and wait until it prints READY.
    pub fn start(args: &[&str]) -> Load {
        let mut child = Command::new(bin("cis490-testload"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start cis490-testload");
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read READY");
        assert!(line.starts_with("READY "), "testload said {line:?}");
        Load { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A long-lived stand-in target process (killed on drop).
pub struct Sleeper(pub Child);

impl Sleeper {
    pub fn spawn() -> Self {
        Sleeper(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep"),
        )
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait until `cond` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a pid this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}
/// kB fields of /proc/<pid>/status (`VmHWM:`, `RssFile:` …), from one read; None once
/// the process is gone or a field is missing.
fn status_kb<const N: usize>(pid: u32, names: [&str; N]) -> Option<[u64; N]> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut out = [0; N];
    for (v, name) in out.iter_mut().zip(names) {
        *v = s
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
    }
    Some(out)
}

/// Peak resident memory (VmHWM, KiB) of a live process.
pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    status_kb(pid, ["VmHWM:"]).map(|[h]| h)
}

/// (VmHWM, RssFile) of a live process, in KiB.
pub fn hwm_and_file_kb(pid: u32) -> Option<(u64, u64)> {
    status_kb(pid, ["VmHWM:", "RssFile:"]).map(|[h, f]| (h, f))
}

/// Peak memory of a process's own data, sampled until it exits: its peak RSS (VmHWM)
/// less the pages of files it maps (RssFile at the last sample, mostly the binary's
/// text, which grows with the binary's size and build profile, not with what the
/// process holds). An upper bound of the anonymous peak within the file pages touched
/// after the peak; what a buffered input would add shows in it whole.
pub fn watch_data_peak_kb(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let (mut peak, mut file) = (0, 0);
        while let Some((hwm, f)) = hwm_and_file_kb(pid) {
            peak = peak.max(hwm);
            file = f;
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        peak.saturating_sub(file)
    })
}

/// utime + stime of a live process, in clock ticks (USER_HZ).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime of a live process, in ms.
pub fn cpu_ms(pid: u32) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(cpu_ticks(pid)? * 1000 / hz)
}
