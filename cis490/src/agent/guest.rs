//! `cis490 agent`: the in-guest side. A static (musl) build of this same binary runs in
//! the guest and writes one flat JSON object per tick to a virtio-serial port.
//!
//! The port blocks writes while no host client is connected, so the first line a host
//! sees can be old; every line therefore carries the guest's own clocks (`t_guest_ns`
//! realtime, `mono_ns` monotonic) and a `seq` that counts lines written, so the host can
//! tell stale from fresh. Any I/O error (host gone, port reset) closes and reopens the
//! port after a short pause: the agent never exits because of the host.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::clock;

pub const DEFAULT_PORT: &str = "/dev/virtio-ports/cis490.guest.agent";

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub port: PathBuf,
    pub rate_hz: u32,
    /// Root of the procfs/sysfs to read (tests point this at a fixture tree).
    pub proc_root: PathBuf,
    /// Stop after this many lines (tests); None = forever.
    pub max_lines: Option<u64>,
}

/// Run the agent loop. Only returns when `max_lines` is reached.
pub fn run(cfg: &AgentConfig) -> std::io::Result<()> {
    let interval_ns = 1_000_000_000 / u64::from(cfg.rate_hz.max(1));
    let clk_tck = clk_tck();
    let mut seq: u64 = 0;
    let mut line = String::with_capacity(4096);
    let mut next = clock::mono_raw_ns();
    let mut port: Option<std::fs::File> = None;
    let mut files = ProcFiles::new(&cfg.proc_root);
    loop {
        if cfg.max_lines.is_some_and(|m| seq >= m) {
            return Ok(());
        }
        if port.is_none() {
            match OpenOptions::new().read(true).write(true).open(&cfg.port) {
                Ok(f) => port = Some(f),
                Err(e) => {
                    eprintln!(
                        "cis490 agent: opening {}: {e}; retrying",
                        cfg.port.display()
                    );
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            }
        }
        line.clear();
        files.snapshot(seq, clk_tck, &mut line);
        line.push('\n');
        let f = port.as_mut().expect("opened above");
        // Blocks while no host is connected: that is the "wait for the host" behaviour.
        if let Err(e) = f.write_all(line.as_bytes()) {
            eprintln!("cis490 agent: write: {e}; reopening the port");
            port = None;
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        seq += 1;
        // Absolute deadlines; after a long block, resume at the next future deadline
        // instead of bursting the missed ticks.
        next += interval_ns;
        let now = clock::mono_raw_ns();
        if next <= now {
            next = now + interval_ns - (now - next) % interval_ns;
        }
        clock::sleep_until_mono(next);
    }
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

/// The /proc files read every tick, kept open and re-read from offset 0: a tick then
/// costs no path lookups or opens, only the kernel generating the files (the agent runs
/// in the guest at 10 Hz; its cost counts).
pub struct ProcFiles {
    root: PathBuf,
    files: [Option<std::fs::File>; 6],
    bufs: [String; 6],
}

const FILES: [&str; 6] = [
    "proc/loadavg",
    "proc/meminfo",
    "proc/stat",
    "proc/net/dev",
    "proc/diskstats",
    // The agent's own on-CPU time, so its cost in the guest is part of every episode.
    "proc/self/schedstat",
];

impl ProcFiles {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            files: Default::default(),
            bufs: Default::default(),
        }
    }

    fn refresh(&mut self, i: usize) {
        use std::io::{Read, Seek, SeekFrom};
        self.bufs[i].clear();
        if self.files[i].is_none() {
            self.files[i] = std::fs::File::open(self.root.join(FILES[i])).ok();
        }
        let ok = match self.files[i].as_mut() {
            Some(f) => {
                f.seek(SeekFrom::Start(0)).is_ok() && f.read_to_string(&mut self.bufs[i]).is_ok()
            }
            None => false,
        };
        if !ok {
            // Reopen next tick (e.g. /proc/net/dev after a namespace change).
            self.files[i] = None;
            self.bufs[i].clear();
        }
    }

    /// Build one line (without the newline).
    pub fn snapshot(&mut self, seq: u64, clk_tck: u64, out: &mut String) {
        for i in 0..FILES.len() {
            self.refresh(i);
        }
        let mono = clock::mono_raw_ns();
        let _ = write!(
            out,
            "{{\"seq\":{seq},\"t_guest_ns\":{},\"mono_ns\":{mono}",
            clock::wall_ns(),
        );
        push_f64(out, "uptime_s", (mono / 10_000_000) as f64 / 100.0);
        format_loadavg(self.bufs[0].trim(), out);
        format_meminfo(&self.bufs[1], out);
        format_stat(&self.bufs[2], clk_tck, out);
        if let Some(n) = count_processes(&self.root.join("proc")) {
            let _ = write!(out, ",\"processes_count\":{n}");
        }
        format_net_dev(&self.bufs[3], out);
        format_diskstats(&self.bufs[4], out);
        if let Some(ns) = self.bufs[5]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            let _ = write!(out, ",\"agent_cpu_ns\":{ns}");
        }
        out.push('}');
    }
}

/// A float always with a fraction or exponent (`0.0`, not `0`): the host keeps a JSON
/// number's kind, and a column's first value fixes its type for the episode, so an
/// integer-looking float would make `load1` an integer column (issue 11, part 4).
/// Non-finite values (not valid JSON) are left out.
pub fn push_f64(out: &mut String, key: &str, v: f64) {
    if v.is_finite() {
        // `{:?}` of an f64 always has a `.` or an exponent.
        let _ = write!(out, ",\"{key}\":{v:?}");
    }
}

fn push_str(out: &mut String, key: &str, value: &str) {
    let _ = write!(out, ",\"{key}\":");
    out.push_str(&serde_json::to_string(value).unwrap_or_else(|_| "null".into()));
}

/// `0.00 0.01 0.05 1/56 122` → the raw string (compatible with earlier lab lines) plus
/// numbers: load1/5/15, runnable and total scheduling entities (= processes+threads).
pub fn format_loadavg(text: &str, out: &mut String) {
    push_str(out, "loadavg", text);
    let f: Vec<&str> = text.split_whitespace().collect();
    for (i, key) in ["load1", "load5", "load15"].iter().enumerate() {
        if let Some(v) = f.get(i).and_then(|s| s.parse::<f64>().ok()) {
            push_f64(out, key, v);
        }
    }
    if let Some((run, total)) = f.get(3).and_then(|s| s.split_once('/')) {
        if let (Ok(r), Ok(t)) = (run.parse::<u64>(), total.parse::<u64>()) {
            let _ = write!(out, ",\"runnable_count\":{r},\"threads_count\":{t}");
        }
    }
}

pub fn format_meminfo(text: &str, out: &mut String) {
    for line in text.lines() {
        let Some((k, rest)) = line.split_once(':') else {
            continue;
        };
        let key = match k {
            "MemTotal" => "meminfo_total_kb",
            "MemFree" => "meminfo_free_kb",
            "MemAvailable" => "meminfo_avail_kb",
            "Buffers" => "meminfo_buffers_kb",
            "Cached" => "meminfo_cached_kb",
            "Dirty" => "meminfo_dirty_kb",
            _ => continue,
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
        {
            let _ = write!(out, ",\"{key}\":{v}");
        }
    }
}

/// /proc/stat: the aggregate `cpu` line in ns, context switches, forks, running/blocked
/// and the process count (directories of /proc are not walked: `processes` is forks since
/// boot, `procs_running` the runnable count; the live count comes from loadavg's total).
pub fn format_stat(text: &str, clk_tck: u64, out: &mut String) {
    const CPU: [&str; 8] = [
        "cpu_user_ns",
        "cpu_nice_ns",
        "cpu_system_ns",
        "cpu_idle_ns",
        "cpu_iowait_ns",
        "cpu_irq_ns",
        "cpu_softirq_ns",
        "cpu_steal_ns",
    ];
    let ns_per_tick = 1_000_000_000 / clk_tck.max(1);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("cpu") => {
                for (key, v) in CPU.iter().zip(f) {
                    if let Ok(t) = v.parse::<u64>() {
                        let _ = write!(out, ",\"{key}\":{}", t * ns_per_tick);
                    }
                }
            }
            Some(k @ ("ctxt" | "processes" | "procs_running" | "procs_blocked")) => {
                if let Some(v) = f.next().and_then(|s| s.parse::<u64>().ok()) {
                    let key = match k {
                        "ctxt" => "ctxt_count",
                        "processes" => "forks_count",
                        "procs_running" => "procs_running_count",
                        _ => "procs_blocked_count",
                    };
                    let _ = write!(out, ",\"{key}\":{v}");
                }
            }
            _ => {}
        }
    }
}

/// Live processes (thread groups): the numeric directories of /proc.
pub fn count_processes(proc_dir: &Path) -> Option<u64> {
    let n = std::fs::read_dir(proc_dir)
        .ok()?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count();
    Some(n as u64)
}

/// Interface and disk names become part of column names: keep them to a safe alphabet.
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn col_name(name: &str) -> String {
    name.replace(['-', '.'], "_")
}

pub fn format_net_dev(text: &str, out: &mut String) {
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if !name_ok(name) || name == "lo" {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        if v.len() < 16 {
            continue;
        }
        let n = col_name(name);
        let _ = write!(
            out,
            ",\"net_{n}_rx_bytes\":{},\"net_{n}_rx_packets\":{},\"net_{n}_tx_bytes\":{},\"net_{n}_tx_packets\":{}",
            v[0], v[1], v[8], v[9]
        );
    }
}

/// /proc/diskstats for whole disks that did I/O-capable work (vd*, sd*, nvme*n*), not
/// partitions, ram or loop devices.
pub fn format_diskstats(text: &str, out: &mut String) {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 14 {
            continue;
        }
        let name = f[2];
        let whole_disk = (name.starts_with("vd") || name.starts_with("sd"))
            && name[2..].bytes().all(|b| b.is_ascii_lowercase())
            || (name.starts_with("nvme") && !name.contains('p'));
        if !whole_disk || !name_ok(name) {
            continue;
        }
        let num = |i: usize| f[i].parse::<u64>().unwrap_or(0);
        let n = col_name(name);
        let _ = write!(
            out,
            ",\"disk_{n}_read_ops\":{},\"disk_{n}_read_bytes\":{},\"disk_{n}_write_ops\":{},\"disk_{n}_write_bytes\":{},\"disk_{n}_io_ms\":{}",
            num(3),
            num(5) * 512,
            num(7),
            num(9) * 512,
            num(12)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_of_this_machine_is_one_flat_json_object() {
        let mut s = String::new();
        let mut files = ProcFiles::new(Path::new("/"));
        files.snapshot(6, 100, &mut s);
        // Re-reading the kept-open files gives fresh, complete values.
        s.clear();
        files.snapshot(7, 100, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let o = v.as_object().unwrap();
        assert_eq!(o["seq"], 7);
        assert!(o["t_guest_ns"].as_u64().unwrap() > 1_600_000_000_000_000_000);
        assert!(o["mono_ns"].as_u64().unwrap() > 0);
        assert!(o["meminfo_total_kb"].as_u64().unwrap() > 0);
        assert!(o["cpu_user_ns"].as_u64().is_some());
        assert!(o["threads_count"].as_u64().unwrap() > 0);
        assert!(
            o["agent_cpu_ns"].as_u64().unwrap() > 0,
            "the agent's own CPU time"
        );
        assert!(o["processes_count"].as_u64().unwrap() > 0);
        assert!(o.values().all(|v| !v.is_object() && !v.is_array()));
        // Floats are written as floats, whatever their value.
        assert!(o["uptime_s"].is_f64() && o["load1"].is_f64() && o["load15"].is_f64());
    }

    #[test]
    fn float_columns_are_written_with_a_fraction_even_when_whole() {
        let mut s = String::new();
        format_loadavg("0.00 1.00 0.08 1/56 122", &mut s);
        assert_eq!(
            s,
            ",\"loadavg\":\"0.00 1.00 0.08 1/56 122\",\"load1\":0.0,\"load5\":1.0,\"load15\":0.08,\"runnable_count\":1,\"threads_count\":56"
        );
        let mut s = String::new();
        push_f64(&mut s, "x", 1e21);
        push_f64(&mut s, "y", f64::NAN);
        assert_eq!(s, ",\"x\":1e21");
    }

    #[test]
    fn net_and_disk_lines_are_parsed_and_odd_names_skipped() {
        let net = "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes\n    lo: 10 1 0 0 0 0 0 0 10 1 0 0 0 0 0 0\n  eth0: 1500 12 0 0 0 0 0 0 900 7 0 0 0 0 0 0\n  e\"x: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n";
        let mut s = String::new();
        format_net_dev(net, &mut s);
        assert_eq!(
            s,
            ",\"net_eth0_rx_bytes\":1500,\"net_eth0_rx_packets\":12,\"net_eth0_tx_bytes\":900,\"net_eth0_tx_packets\":7"
        );
        let disk = " 254       0 vda 40 0 2048 10 32 0 65536 20 0 30 30 0 0 0 0\n 254       1 vda1 1 0 8 0 0 0 0 0 0 0 0 0 0 0 0\n   1       0 ram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        let mut s = String::new();
        format_diskstats(disk, &mut s);
        assert_eq!(
            s,
            ",\"disk_vda_read_ops\":40,\"disk_vda_read_bytes\":1048576,\"disk_vda_write_ops\":32,\"disk_vda_write_bytes\":33554432,\"disk_vda_io_ms\":30"
        );
    }
}
