//! The `net` source: rx/tx bytes and packets of the VM's tap interface(s), from the BPF
//! programs (counters since attach) or, without BPF, from the interface's own
//! statistics in sysfs (counters since the interface was created). Both are what a
//! gateway could see, hence available_in_deployment = true.
//!
//! Interfaces come from `--net-if` or are detected from QEMU: `-netdev tap,ifname=…` on
//! its command line, and the `iff:` line of its tun/tap file descriptors.

use std::path::Path;
use std::sync::Arc;

use cis490_common::NetStats;

use super::Session;
use crate::clock::EpisodeClock;
use crate::collector::{Collector, Tick, TickOutput};
use crate::error::Error;
use crate::row::{Row, Value};

pub const SOURCE: &str = "net";

/// Tap interface names on a QEMU command line (`-netdev`/`-net`/`-nic` with type tap and
/// `ifname=`, in key=value or JSON form), in order, without duplicates.
pub fn taps_from_cmdline(args: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |name: &str| {
        if !name.is_empty() && !out.iter().any(|n| n == name) {
            out.push(name.to_owned());
        }
    };
    let mut it = args.iter().peekable();
    while let Some(arg) = it.next() {
        let opt = arg.strip_prefix("--").map_or(arg.as_str(), |s| s);
        let opt = opt.strip_prefix('-').unwrap_or(opt);
        let (opt, inline) = match opt.split_once('=') {
            Some((o, v)) => (o, Some(v.to_owned())),
            None => (opt, None),
        };
        if !matches!(opt, "netdev" | "net" | "nic") || !arg.starts_with('-') {
            continue;
        }
        let Some(value) = inline.or_else(|| it.next().cloned()) else {
            continue;
        };
        if value.trim_start().starts_with('{') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&value) {
                if v["type"] == "tap" {
                    if let Some(n) = v["ifname"].as_str() {
                        push(n);
                    }
                }
            }
            continue;
        }
        let mut parts = value.split(',');
        let first = parts.next().unwrap_or("");
        let is_tap = first == "tap" || first == "type=tap";
        if !is_tap {
            continue;
        }
        for p in parts {
            if let Some(n) = p.strip_prefix("ifname=") {
                push(n);
            }
        }
    }
    out
}

/// The interface of a tun/tap fd from its /proc/<pid>/fdinfo text (`iff:\t<name>`).
pub fn iff_from_fdinfo(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("iff:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Taps of a running QEMU: its command line first, then its tun/tap fds.
pub fn detect_taps(pid: u32, cmdline: &[String]) -> Vec<String> {
    let mut out = taps_from_cmdline(cmdline);
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in entries.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path()) {
                if let Some(n) = iff_from_fdinfo(&text) {
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
            }
        }
    }
    out
}

/// Link-layer header length of an interface (what its rx path strips before
/// netif_receive_skb): 14 for Ethernet (ARPHRD_ETHER, taps and veth), 0 otherwise (tun).
pub fn rx_header_len(name: &str) -> u32 {
    let t = std::fs::read_to_string(format!("/sys/class/net/{name}/type")).unwrap_or_default();
    if t.trim() == "1" {
        14
    } else {
        0
    }
}

fn net_row(stamp: crate::clock::Stamp, seq: u64, ifname: &str, s: Option<NetStats>) -> Row {
    let mut row = Row::new(stamp, SOURCE, true);
    row.seq = Some(seq);
    row.push("ifname", ifname);
    let f = |v: fn(&NetStats) -> u64| s.as_ref().map_or(Value::Null, |s| Value::U64(v(s)));
    row.push("rx_bytes", f(|s| s.rx_bytes))
        .push("rx_packets", f(|s| s.rx_packets))
        .push("tx_bytes", f(|s| s.tx_bytes))
        .push("tx_packets", f(|s| s.tx_packets));
    row
}

/// `net` rows from the kernel snapshots (the programs count per CPU; the snapshot sums
/// the CPUs), one per interface per snapshot, on the snapshot's seq and stamp.
pub struct BpfNetCollector {
    names: Vec<String>,
    session: Arc<Session>,
}

impl BpfNetCollector {
    pub fn new(names: Vec<String>, session: Arc<Session>) -> Self {
        Self { names, session }
    }
}

impl Collector for BpfNetCollector {
    fn source(&self) -> &'static str {
        SOURCE
    }
    fn available_in_deployment(&self) -> bool {
        true
    }
    fn kernel_clocked(&self) -> bool {
        true
    }
    fn collect(
        &mut self,
        _tick: Tick,
        _clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        // The batch the bpf-sched collector drained this host tick.
        let drain = self.session.lock_drain();
        let batch = &drain.asm.batch;
        out.gaps.extend_from_slice(&batch.gaps);
        for tick in &batch.ticks {
            let recs = &batch.nets[tick.nets.0..tick.nets.1];
            for (slot, name) in self.names.iter().enumerate() {
                let stats = recs
                    .iter()
                    .find(|r| r.slot as usize == slot)
                    .map(|r| r.stats);
                if stats.is_none() {
                    out.problem(format!("snapshot {} has no counters for {name}", tick.seq));
                }
                out.row(net_row(tick.stamp, tick.seq, name, stats));
            }
        }
        Ok(())
    }
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        summary("bpf", "attach", &self.names)
    }
}

fn summary(
    method: &str,
    since: &str,
    names: &[String],
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("method".into(), method.into());
    m.insert("counters_since".into(), since.into());
    m.insert("interfaces".into(), names.to_vec().into());
    m
}

/// The fallback: /sys/class/net/<if>/statistics/{rx,tx}_{bytes,packets}.
pub struct SysfsNetCollector {
    names: Vec<String>,
    sys_root: std::path::PathBuf,
    reported: std::collections::HashSet<String>,
}

impl SysfsNetCollector {
    pub fn new(names: Vec<String>) -> Self {
        Self::with_root(names, Path::new("/sys/class/net"))
    }

    /// `sys_root` is /sys/class/net except in tests.
    pub fn with_root(names: Vec<String>, sys_root: &Path) -> Self {
        Self {
            names,
            sys_root: sys_root.to_owned(),
            reported: Default::default(),
        }
    }

    fn read(&self, name: &str) -> Result<NetStats, String> {
        let dir = self.sys_root.join(name).join("statistics");
        let get = |f: &str| -> Result<u64, String> {
            let p = dir.join(f);
            std::fs::read_to_string(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .trim()
                .parse()
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        Ok(NetStats {
            rx_bytes: get("rx_bytes")?,
            rx_packets: get("rx_packets")?,
            tx_bytes: get("tx_bytes")?,
            tx_packets: get("tx_packets")?,
        })
    }
}

impl Collector for SysfsNetCollector {
    fn source(&self) -> &'static str {
        SOURCE
    }
    fn available_in_deployment(&self) -> bool {
        true
    }
    fn collect(
        &mut self,
        tick: Tick,
        clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        for i in 0..self.names.len() {
            let name = &self.names[i];
            let stats = match self.read(name) {
                Ok(s) => Some(s),
                Err(e) => {
                    // One event per interface that disappears, not one per tick.
                    if self.reported.insert(name.clone()) {
                        out.problem(format!("interface {name}: {e}"));
                    }
                    None
                }
            };
            out.row(net_row(clock.stamp(), tick.seq, &self.names[i], stats));
        }
        Ok(())
    }
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        summary("sysfs", "interface_creation", &self.names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_cmdline() -> Vec<String> {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/qemu-10.0.2/tcg/proc/cmdline.txt"
        );
        // The fixture stores the command line with spaces instead of NULs.
        let text = std::fs::read_to_string(p).unwrap();
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn tap_from_the_real_qemu_cmdline() {
        assert_eq!(taps_from_cmdline(&fixture_cmdline()), vec!["cis490tap0"]);
    }

    #[test]
    fn tap_forms() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            taps_from_cmdline(&a(&[
                "qemu",
                "-netdev",
                "user,id=n0",
                "--netdev",
                "tap,id=n1,ifname=tapA",
                "-nic",
                "tap,ifname=tapB,model=virtio",
                "-netdev",
                r#"{"type":"tap","id":"n3","ifname":"tapC"}"#,
                "-net=tap,ifname=tapA",
                "-append",
                "netdev tap,ifname=nope",
            ])),
            vec!["tapA", "tapB", "tapC"]
        );
        assert!(taps_from_cmdline(&a(&["qemu", "-netdev", "tap,id=n1,fd=3"])).is_empty());
    }

    #[test]
    fn fdinfo_iff_line() {
        let text = "pos:\t0\nflags:\t0104002\nmnt_id:\t26\nino:\t1043\niff:\tcis490tap0\n";
        assert_eq!(iff_from_fdinfo(text).as_deref(), Some("cis490tap0"));
        assert_eq!(iff_from_fdinfo("pos:\t0\nflags:\t02\n"), None);
    }

    #[test]
    fn sysfs_rows_and_missing_interface() {
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("tap0/statistics");
        std::fs::create_dir_all(&st).unwrap();
        for (f, v) in [
            ("rx_bytes", "100\n"),
            ("rx_packets", "2\n"),
            ("tx_bytes", "300\n"),
            ("tx_packets", "4\n"),
        ] {
            std::fs::write(st.join(f), v).unwrap();
        }
        let mut c = SysfsNetCollector::with_root(vec!["tap0".into(), "gone0".into()], dir.path());
        let clock = EpisodeClock::start();
        let mut out = TickOutput::default();
        c.collect(
            Tick {
                seq: 0,
                scheduled_ns: 0,
            },
            &clock,
            &mut out,
        )
        .unwrap();
        c.collect(
            Tick {
                seq: 1,
                scheduled_ns: 0,
            },
            &clock,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.rows().len(), 4);
        assert_eq!(out.rows()[0].get("rx_bytes"), Some(&Value::U64(100)));
        assert_eq!(out.rows()[0].get("tx_packets"), Some(&Value::U64(4)));
        assert_eq!(out.rows()[1].get("rx_bytes"), Some(&Value::Null));
        assert!(out.rows()[0].available_in_deployment);
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
    }
}
