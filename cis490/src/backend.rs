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

/// How the host is sampled: the backend and the BPF programs' settings (`cis490 trace`'s
/// "Host backend" options). The BPF loader gets them from here, once ([`snap_spec`]).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Host backend")]
pub struct HostOptions {
    /// Host backend: auto tries BPF and falls back to /proc.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Record each BPF program's run count and run time (kernel BPF statistics, on only
    /// for the capture) in meta.json's result.
    #[arg(long)]
    pub bpf_stats: bool,
    /// Count wakeups per thread (bpf-sched `wakeups`) with programs on sched_wakeup and
    /// sched_wakeup_new where the kernel keeps no count of its own (no
    /// CONFIG_SCHEDSTATS): every wakeup on the machine then pays for a filter. Without
    /// it, such a kernel's `wakeups` column is null.
    #[arg(long)]
    pub bpf_wakeups: bool,
    /// The CPU whose timer takes the BPF snapshots (default: the first online CPU). On a
    /// host with isolated cores for the VM, give a housekeeping core.
    #[arg(long, value_name = "CPU")]
    pub bpf_timer_cpu: Option<u32>,
    /// No `kvm` and `kvm-keys` sources (the BPF backend otherwise adds them: VM exits by
    /// kind and key when the target is a KVM VM, empty streams with the reason when not).
    #[arg(long)]
    pub no_kvm: bool,
    /// Entries of the kernel's table of VM-exit keys (thread, tick, kind, key), emptied 20
    /// times a second. Exits whose key finds it full keep their kind's count but lose
    /// their key (counted in meta.sources[kvm].overflow_events).
    #[arg(long, value_name = "ENTRIES", default_value_t = cis490_common::MAX_KVM_KEYS,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub kvm_key_table: u32,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            bpf_stats: false,
            bpf_wakeups: false,
            bpf_timer_cpu: None,
            no_kvm: false,
            kvm_key_table: cis490_common::MAX_KVM_KEYS,
        }
    }
}

/// What the backend samples: the target and the capture's shape.
pub struct Plan<'a> {
    pub pid: u32,
    /// The target's command line (for tap autodetection).
    pub cmdline: &'a [String],
    /// The capture's sampling interval (the BPF snapshot timer's period).
    pub interval_ns: u64,
    /// `--rows`: every thread at every tick, or only threads that changed.
    pub rows: crate::collector::RowsMode,
    pub vcpus: &'a VcpuMap,
}

/// The BPF snapshot's settings from the options (the one place they are translated).
pub fn snap_spec(
    host: &HostOptions,
    net: &crate::net::NetOptions,
    interval_ns: u64,
) -> bpf::loader::SnapSpec {
    bpf::loader::SnapSpec {
        interval_ns,
        count_wakeups: host.bpf_wakeups,
        timer_cpu: host.bpf_timer_cpu,
        kvm: false,
        kvm_keys: if host.kvm_key_table == 0 {
            cis490_common::MAX_KVM_KEYS
        } else {
            host.kvm_key_table
        },
        flow: !net.no_flow,
    }
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
pub fn net_interfaces(
    pid: u32,
    cmdline: &[String],
    requested: &[String],
) -> Result<Vec<String>, Error> {
    if requested.is_empty() {
        return Ok(crate::net::detect_taps(pid, cmdline));
    }
    let mut out: Vec<String> = Vec::new();
    for n in requested {
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
    host: &HostOptions,
    net: &crate::net::NetOptions,
    plan: &Plan<'_>,
) -> Result<Selected, Error> {
    let (requested, pid, vcpus) = (host.backend, plan.pid, plan.vcpus);
    let net_ifs = net_interfaces(pid, plan.cmdline, &net.net_if)?;
    let proc_backend = |fallback_reason: Option<String>, reason: String| {
        let mut collectors: Vec<Box<dyn Collector>> =
            vec![Box::new(ProcCollector::new(pid, vcpus.clone(), plan.rows))];
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
    let snap = snap_spec(host, net, plan.interval_ns);
    let kvm = if host.no_kvm {
        bpf::KvmPlan::Off
    } else {
        match crate::kvm::target_is_kvm_vm(pid) {
            Ok(()) => bpf::KvmPlan::Attach,
            Err(why) => bpf::KvmPlan::Absent(why),
        }
    };
    match bpf::start(pid, vcpus, &specs, host.bpf_stats, snap, plan.rows, kvm) {
        Ok(b) => Ok(Selected {
            collectors: vec![Box::new(b.source)],
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

    fn names(ifs: &[&str]) -> Vec<String> {
        ifs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn net_if_names_are_validated_and_deduplicated() {
        let got = net_interfaces(1, &[], &names(&["tap0", "tap1", "tap0"])).unwrap();
        assert_eq!(got, vec!["tap0", "tap1"]);
        for bad in ["", "sixteen-chars-xx", "a/b"] {
            let e = net_interfaces(1, &[], &names(&[bad])).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
        }
    }

    #[test]
    fn taps_are_autodetected_from_the_cmdline_without_net_if() {
        let cmdline = names(&["qemu", "-netdev", "tap,id=n,ifname=tapX"]);
        // A pid with no fds to read: only the command line counts.
        let got = net_interfaces(i32::MAX as u32 - 3, &cmdline, &[]).unwrap();
        assert_eq!(got, vec!["tapX"]);
    }

    #[test]
    fn proc_backend_adds_sysfs_net_only_with_interfaces() {
        let v = VcpuMap::default();
        let host = HostOptions {
            backend: BackendChoice::Proc,
            ..Default::default()
        };
        let plan = Plan {
            pid: std::process::id(),
            cmdline: &[],
            interval_ns: 100_000_000,
            rows: Default::default(),
            vcpus: &v,
        };
        let net = |ifs: &[&str]| crate::net::NetOptions {
            net_if: names(ifs),
            ..Default::default()
        };
        let s = select(&host, &net(&[]), &plan).unwrap();
        assert_eq!(s.used, "proc");
        assert_eq!(s.collectors.len(), 1);
        let s = select(&host, &net(&["lo"]), &plan).unwrap();
        let names: Vec<_> = (s.collectors.iter())
            .flat_map(|c| c.streams())
            .map(|s| s.source)
            .collect();
        assert_eq!(names, vec!["proc", "net"]);
        assert!(s.fallback_reason.is_none());
    }
}
