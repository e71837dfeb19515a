//! Host backend selection: which collectors sample the QEMU process on each tick.

use std::sync::Arc;

use crate::bpf;
use crate::collector::{Collector, VcpuMap};
use crate::error::Error;
use crate::procfs::ProcCollector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Bpf,
    Proc,
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Bpf => "bpf",
            BackendChoice::Proc => "proc",
        }
    }
}

/// Backend options beyond the choice itself.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// `--net-if`; empty: autodetect the target's taps.
    pub net_ifs: Vec<String>,
    /// `--bpf-stats`: count each program's run time for meta.result.
    pub bpf_stats: bool,
    /// `--bpf-wakeups`.
    pub bpf_wakeups: bool,
    /// `--bpf-timer-cpu`.
    pub bpf_timer_cpu: Option<u32>,
    /// The target's command line (for tap autodetection).
    pub cmdline: Vec<String>,
    /// The capture's sampling interval (the BPF snapshot timer's period).
    pub interval_ns: u64,
    /// `--rows`: every thread at every tick, or only threads that changed.
    pub rows: crate::collector::RowsMode,
    /// `--no-kvm` not given: the BPF backend adds the kvm sources (attached when the
    /// target is a KVM VM, else empty with the reason).
    pub kvm: bool,
    /// `--kvm-key-table` (0: the default).
    pub kvm_key_table: u32,
    /// `--no-flow` not given: the BPF backend adds the flow sources on the watched
    /// interfaces.
    pub flow: bool,
}

pub struct Selected {
    pub collectors: Vec<Box<dyn Collector>>,
    pub used: &'static str,
    /// Why `auto` did not get BPF (None when BPF was used or proc was asked for).
    pub fallback_reason: Option<String>,
    /// One line for the `backend_selected` event.
    pub reason: String,
    /// The loaded BPF programs, when BPF is used.
    pub session: Option<Arc<bpf::Session>>,
    /// Interfaces of the `net` source (empty: no `net` source).
    pub net_ifs: Vec<String>,
}

/// The interfaces to watch: `--net-if` as given (validated), else the target's taps.
pub fn net_interfaces(pid: u32, opts: &BackendOptions) -> Result<Vec<String>, Error> {
    if opts.net_ifs.is_empty() {
        return Ok(crate::net::detect_taps(pid, &opts.cmdline));
    }
    let mut out: Vec<String> = Vec::new();
    for n in &opts.net_ifs {
        if cis490_common::IfName::new(n).is_none() || n.contains('/') {
            return Err(Error::Usage(format!(
                "--net-if {n:?} is not an interface name (1 to 15 bytes, no '/')"
            )));
        }
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    if out.len() > cis490_common::MAX_NET_IFS as usize {
        return Err(Error::Usage(format!(
            "at most {} --net-if interfaces",
            cis490_common::MAX_NET_IFS
        )));
    }
    Ok(out)
}

/// Pick the host backend. `bpf` fails with the exact cause when BPF cannot be used;
/// `auto` falls back to /proc and says why, so a capture never dies for lack of BPF.
pub fn select(
    requested: BackendChoice,
    pid: u32,
    vcpus: &VcpuMap,
    opts: &BackendOptions,
) -> Result<Selected, Error> {
    let net_ifs = net_interfaces(pid, opts)?;
    let proc_backend = |fallback_reason: Option<String>, reason: String| {
        let mut collectors: Vec<Box<dyn Collector>> =
            vec![Box::new(ProcCollector::new(pid, vcpus.clone(), opts.rows))];
        if !net_ifs.is_empty() {
            collectors.push(Box::new(crate::net::SysfsNetCollector::new(
                pid,
                net_ifs.clone(),
            )));
        }
        Selected {
            collectors,
            used: "proc",
            fallback_reason,
            reason,
            session: None,
            net_ifs: net_ifs.clone(),
        }
    };
    if requested == BackendChoice::Proc {
        return Ok(proc_backend(None, "--backend proc requested".into()));
    }
    let specs: Vec<bpf::loader::NetIfSpec> = net_ifs
        .iter()
        .map(|n| bpf::loader::NetIfSpec {
            name: n.clone(),
            rx_header_len: crate::net::rx_header_len(pid, n),
        })
        .collect();
    let snap = bpf::loader::SnapSpec {
        interval_ns: opts.interval_ns,
        count_wakeups: opts.bpf_wakeups,
        timer_cpu: opts.bpf_timer_cpu,
        kvm: false,
        kvm_keys: if opts.kvm_key_table == 0 {
            cis490_common::MAX_KVM_KEYS
        } else {
            opts.kvm_key_table
        },
        flow: opts.flow,
    };
    let kvm = if !opts.kvm {
        bpf::KvmPlan::Off
    } else {
        match crate::kvm::target_is_kvm_vm(pid) {
            Ok(()) => bpf::KvmPlan::Attach,
            Err(why) => bpf::KvmPlan::Absent(why),
        }
    };
    match bpf::start(pid, vcpus, &specs, opts.bpf_stats, snap, opts.rows, kvm) {
        Ok(b) => Ok(Selected {
            collectors: b.collectors,
            used: "bpf",
            fallback_reason: None,
            reason: format!(
                "--backend {} requested; BPF programs loaded",
                requested.as_str()
            ),
            session: Some(b.session),
            net_ifs,
        }),
        Err(why) if requested == BackendChoice::Bpf => Err(Error::BpfUnavailable(why)),
        Err(why) => Ok(proc_backend(
            Some(why.to_string()),
            format!("bpf unavailable: {why}; using /proc"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(ifs: &[&str]) -> BackendOptions {
        BackendOptions {
            net_ifs: ifs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn net_if_names_are_validated_and_deduplicated() {
        let got = net_interfaces(1, &opts(&["tap0", "tap1", "tap0"])).unwrap();
        assert_eq!(got, vec!["tap0", "tap1"]);
        for bad in ["", "sixteen-chars-xx", "a/b"] {
            let e = net_interfaces(1, &opts(&[bad])).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
        }
    }

    #[test]
    fn taps_are_autodetected_from_the_cmdline_without_net_if() {
        let o = BackendOptions {
            cmdline: vec![
                "qemu".into(),
                "-netdev".into(),
                "tap,id=n,ifname=tapX".into(),
            ],
            ..Default::default()
        };
        // A pid with no fds to read: only the command line counts.
        let got = net_interfaces(i32::MAX as u32 - 3, &o).unwrap();
        assert_eq!(got, vec!["tapX"]);
    }

    #[test]
    fn proc_backend_adds_sysfs_net_only_with_interfaces() {
        let v = VcpuMap::default();
        let me = std::process::id();
        let s = select(BackendChoice::Proc, me, &v, &opts(&[])).unwrap();
        assert_eq!(s.used, "proc");
        assert_eq!(s.collectors.len(), 1);
        let s = select(BackendChoice::Proc, me, &v, &opts(&["lo"])).unwrap();
        let names: Vec<_> = s.collectors.iter().map(|c| c.source()).collect();
        assert_eq!(names, vec!["proc", "net"]);
        assert!(s.fallback_reason.is_none());
    }
}
