//! The `net` fallback without BPF: /sys/class/net/<if>/statistics/{rx,tx}_{bytes,packets},
//! or, for a target in another network namespace (whose interfaces /sys/class/net does
//! not show), that namespace's /proc/<pid>/net/dev: the same counters of the same device.

use std::path::Path;

use cis490_common::NetStats;

use super::{net_row, summary, SOURCE};
use crate::clock::EpisodeClock;
use crate::collector::{Collector, Sink, Stream, Tick};
use crate::error::Error;

/// The fallback: the interfaces' own counters.
pub struct SysfsNetCollector {
    names: Vec<String>,
    from: Counters,
    reported: std::collections::HashSet<String>,
}

/// Where the counters are read.
enum Counters {
    /// /sys/class/net (or a test's directory of the same shape).
    Sysfs(std::path::PathBuf),
    /// A /proc/<pid>/net/dev file: the target's namespace is not ours.
    NetDev(std::path::PathBuf),
}

impl SysfsNetCollector {
    /// The counters of `names` in `pid`'s network namespace.
    pub fn new(pid: u32, names: Vec<String>) -> Self {
        match super::netns::is_ours(pid) {
            Ok(false) => Self::with_net_dev(names, Path::new(&format!("/proc/{pid}/net/dev"))),
            _ => Self::with_root(names, Path::new("/sys/class/net")),
        }
    }

    /// `sys_root` is /sys/class/net except in tests.
    pub fn with_root(names: Vec<String>, sys_root: &Path) -> Self {
        Self {
            names,
            from: Counters::Sysfs(sys_root.to_owned()),
            reported: Default::default(),
        }
    }

    /// Counters from a /proc/<pid>/net/dev file.
    pub fn with_net_dev(names: Vec<String>, net_dev: &Path) -> Self {
        Self {
            names,
            from: Counters::NetDev(net_dev.to_owned()),
            reported: Default::default(),
        }
    }

    fn read(&self, name: &str) -> Result<NetStats, String> {
        let root = match &self.from {
            Counters::Sysfs(root) => root,
            Counters::NetDev(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                return parse_net_dev(&text, name)
                    .ok_or_else(|| format!("{}: no interface {name}", path.display()));
            }
        };
        let dir = root.join(name).join("statistics");
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
    fn streams(&self) -> Vec<Stream> {
        vec![Stream {
            source: SOURCE,
            available_in_deployment: true,
        }]
    }
    fn collect(
        &mut self,
        tick: Tick,
        clock: &EpisodeClock,
        sink: &mut dyn Sink,
    ) -> Result<(), Error> {
        let out = sink.out();
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
    fn summary(&self, _stream: usize) -> serde_json::Map<String, serde_json::Value> {
        let method = match self.from {
            Counters::Sysfs(_) => "sysfs",
            Counters::NetDev(_) => "proc_net_dev",
        };
        summary(method, "interface_creation", &self.names)
    }
}

/// One interface's counters from /proc/net/dev text (`name: rx_bytes rx_packets errs drop
/// fifo frame compressed multicast tx_bytes tx_packets …`); None when it is not listed or
/// its line is malformed.
pub fn parse_net_dev(text: &str, name: &str) -> Option<NetStats> {
    text.lines().skip(2).find_map(|line| {
        let (ifname, rest) = line.split_once(':')?;
        if ifname.trim() != name {
            return None;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        (v.len() >= 10).then(|| NetStats {
            rx_bytes: v[0],
            rx_packets: v[1],
            tx_bytes: v[8],
            tx_packets: v[9],
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::TickOutput;
    use crate::row::Value;

    #[test]
    fn net_dev_of_a_real_qemu() {
        let text = include_str!("../../../tests/data/qemu-10.0.2/tcg/proc/net/dev");
        let s = parse_net_dev(text, "cis490tap0").unwrap();
        assert_eq!(
            (s.rx_bytes, s.rx_packets, s.tx_bytes, s.tx_packets),
            (46310, 41, 548750, 51)
        );
        assert!(parse_net_dev(text, "cis490tap").is_none());
        assert!(parse_net_dev(text, "Inter-").is_none());
        // A cut line is malformed, not zeros.
        assert!(parse_net_dev("h\nh\n  t0: 1 2 3\n", "t0").is_none());
        assert!(parse_net_dev("h\nh\n  t0: 1 x 3 4 5 6 7 8 9 10\n", "t0").is_none());
    }

    /// One tick of `c` into `out`.
    fn collect(c: &mut SysfsNetCollector, seq: u64, out: &mut TickOutput) {
        let clock = EpisodeClock::start();
        c.collect(
            Tick {
                seq,
                scheduled_ns: 0,
            },
            &clock,
            out,
        )
        .unwrap();
    }

    #[test]
    fn a_target_in_another_namespace_reads_its_net_dev() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        std::fs::write(
            &dev,
            include_str!("../../../tests/data/qemu-10.0.2/tcg/proc/net/dev"),
        )
        .unwrap();
        let mut c =
            SysfsNetCollector::with_net_dev(vec!["cis490tap0".into(), "gone0".into()], &dev);
        let mut out = TickOutput::default();
        collect(&mut c, 0, &mut out);
        assert_eq!(out.rows()[0].get("tx_bytes"), Some(&Value::U64(548750)));
        assert_eq!(out.rows()[1].get("tx_bytes"), Some(&Value::Null));
        assert!(
            out.problems[0].contains("no interface gone0"),
            "{:?}",
            out.problems
        );
        assert_eq!(c.summary(0)["method"], "proc_net_dev");
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
        let mut out = TickOutput::default();
        collect(&mut c, 0, &mut out);
        collect(&mut c, 1, &mut out);
        assert_eq!(out.rows().len(), 4);
        assert_eq!(out.rows()[0].get("rx_bytes"), Some(&Value::U64(100)));
        assert_eq!(out.rows()[0].get("tx_packets"), Some(&Value::U64(4)));
        assert_eq!(out.rows()[1].get("rx_bytes"), Some(&Value::Null));
        assert!(out.rows()[0].available_in_deployment);
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
    }
}
