//! The `net` source: rx/tx bytes and packets of the VM's tap interface(s), from the BPF
//! snapshots (counters since attach, `crate::bpf::net`) or, without BPF, from the
//! interface's own statistics in sysfs ([`sysfs`], counters since the interface was
//! created). Both are what a gateway could see, hence available_in_deployment = true.
//!
//! Interfaces come from `--net-if` or are detected from QEMU: `-netdev tap,ifname=…` on
//! its command line, and the `iff:` line of its tun/tap file descriptors.

pub mod netns;
pub mod sysfs;

use cis490_common::NetStats;

use crate::row::{Row, Value};

pub use sysfs::SysfsNetCollector;

/// Which interfaces are watched and what is captured on them (`cis490 trace`'s "Network"
/// options).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Network")]
pub struct NetOptions {
    /// Network interface of the VM for the `net` source (repeatable); default: QEMU's
    /// tap interfaces, detected from its command line and file descriptors.
    #[arg(long = "net-if", value_name = "NAME")]
    pub net_if: Vec<String>,
    /// No `flow` and `flows` sources (the BPF backend otherwise counts packets, protocols,
    /// TCP flags, DNS messages and flows in the kernel on the interfaces `net` watches).
    #[arg(long)]
    pub no_flow: bool,
    /// Write capture.pcapng beside the streams: every packet of the watched interfaces,
    /// both directions, cut at --pcap-snaplen, the file never above --pcap-max-mib
    /// (packets past it are counted in meta.result.pcap, not written). For forensics;
    /// needs CAP_NET_RAW (without it the capture goes on and meta says why).
    #[arg(long)]
    pub pcap: bool,
    /// Bytes kept of each packet in capture.pcapng.
    #[arg(long, value_name = "BYTES", default_value_t = crate::pcap::DEFAULT_SNAPLEN,
          value_parser = clap::value_parser!(u32).range(64..=262_144))]
    pub pcap_snaplen: u32,
    /// Size cap of capture.pcapng.
    #[arg(long, value_name = "MIB", default_value_t = crate::pcap::DEFAULT_MAX_BYTES >> 20,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub pcap_max_mib: u64,
}

impl NetOptions {
    /// The packet capture's settings, with `--pcap`.
    pub fn pcap(&self) -> Option<crate::pcap::PcapOptions> {
        self.pcap.then_some(crate::pcap::PcapOptions {
            snaplen: self.pcap_snaplen,
            max_bytes: self.pcap_max_mib << 20,
        })
    }
}

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

/// Link-layer header length of an interface of `pid`'s network namespace (what its rx
/// path strips before netif_receive_skb): 14 for Ethernet (ARPHRD_ETHER, taps and veth),
/// 0 otherwise (tun).
pub fn rx_header_len(pid: u32, name: &str) -> u32 {
    match netns::run_in(pid, || netns::link_type(name)) {
        Ok(Some(netns::ARPHRD_ETHER)) => 14,
        _ => 0,
    }
}

/// One `net` row: an interface's counters (null when they could not be read).
pub fn net_row(stamp: crate::clock::Stamp, seq: u64, ifname: &str, s: Option<NetStats>) -> Row {
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

/// `meta.sources[net]`: how the counters were taken and since when.
pub fn summary(
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
}
