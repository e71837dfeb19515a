//! The `net` fallback without BPF: /sys/class/net/<if>/statistics/{rx,tx}_{bytes,packets}.

use std::path::Path;

use cis490_common::NetStats;

use super::{net_row, summary, SOURCE};
use crate::clock::EpisodeClock;
use crate::collector::{Collector, Tick, TickOutput};
use crate::error::Error;

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
    use crate::row::Value;

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
