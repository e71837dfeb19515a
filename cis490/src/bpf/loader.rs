//! Loading and attaching the embedded kernel programs for one target.
//!
//! Every failure comes back as one line saying exactly what is missing (capability,
//! tracefs, tracepoint, verifier output), which `backend` records as the fallback reason.

use std::os::fd::OwnedFd;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use cis490_common::{
    parse_schedstat, IfName, IoStats, NetIf, NetStats, SchedStats, MAX_NET_IFS, MAX_THREADS,
};

use super::batch::HashDrain;
use super::{btf, tracefs};

/// The object built by build.rs from the `cis490-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cis490-probes"));

/// A raw-tracepoint program and the tracepoint it is attached to.
const SCHED_PROGRAMS: &[(&str, &str)] = &[
    ("cis490_sched_switch", "sched_switch"),
    ("cis490_sched_wakeup", "sched_wakeup"),
    ("cis490_sched_wakeup", "sched_wakeup_new"),
    ("cis490_sched_migrate", "sched_migrate_task"),
    ("cis490_sched_fork", "sched_process_fork"),
    ("cis490_sched_exit", "sched_process_exit"),
];

/// A watched interface: its name and the link-layer header length its rx path strips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetIfSpec {
    pub name: String,
    pub rx_header_len: u32,
}

/// Everything loaded for one capture. Dropping it detaches and unloads the programs.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub sched: HashDrain<SchedStats>,
    pub io: HashDrain<IoStats>,
    /// Present when interfaces were given.
    pub net: Option<PerCpuArray<MapData, NetStats>>,
    /// Names of the loaded programs (for run-time statistics).
    pub programs: Vec<&'static str>,
    /// Held while `--bpf-stats` is on: the kernel counts run time while this fd is open
    /// and reverts by itself when it closes, even if cis490 is killed.
    pub stats_fd: Option<OwnedFd>,
}

/// Which capabilities the process has, for error messages (CapEff of /proc/self/status).
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// `None` when the capabilities suffice to load and attach tracepoint programs.
pub fn missing_caps(caps: u64) -> Option<String> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    Some(format!(
        "missing capability {} (tracepoint programs need CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN; run as root)",
        missing.join("+")
    ))
}

fn attach(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<(), String> {
    let p: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing from the embedded object"))?
        .try_into()
        .map_err(|e| format!("program {prog}: {e}"))?;
    if p.fd().is_err() {
        p.load()
            .map_err(|e| format!("loading program {prog}: {}", flatten(&e)))?;
    }
    p.attach(category, name)
        .map_err(|e| format!("attaching {prog} to {category}:{name}: {}", flatten(&e)))?;
    Ok(())
}

/// Attach a raw-tracepoint program (loaded on first use) to tracepoint `name`.
fn attach_raw(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<(), String> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing from the embedded object"))?
        .try_into()
        .map_err(|e| format!("program {prog}: {e}"))?;
    if p.fd().is_err() {
        p.load()
            .map_err(|e| format!("loading program {prog}: {}", flatten(&e)))?;
    }
    p.attach(name)
        .map_err(|e| format!("attaching {prog} to raw tracepoint {name}: {}", flatten(&e)))?;
    Ok(())
}

/// An error and its sources on one line (the verifier log can be long: keep its tail).
fn flatten(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    let s = s.replace('\n', " | ");
    if s.len() > 2000 {
        let cut = s.len() - 2000;
        let cut = (cut..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        format!("…{}", &s[cut..])
    } else {
        s
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, String>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or_else(|| format!("map {name} missing from the embedded object"))?;
    T::try_from(m).map_err(|e| format!("map {name}: {e}"))
}

fn drain<V: Copy + Default>(ebpf: &mut Ebpf, name: &'static str) -> Result<HashDrain<V>, String> {
    let m = ebpf
        .take_map(name)
        .ok_or_else(|| format!("map {name} missing from the embedded object"))?;
    HashDrain::new(m, name, MAX_THREADS as usize)
}

/// Run once on every CPU this thread may use, so that a context switch happens on each
/// of them after attach: a thread of the target that was on a CPU at attach (and may
/// stay there for long on an idle machine, without any switch) is switched out, which
/// brings its on-CPU time into the map, and in again, which starts its running slice.
/// CPUs outside this process's affinity mask are not visited: a target thread running
/// there is counted from its first switch after attach.
fn visit_cpus() {
    // SAFETY: cpu_set_t is plain data; sched_{get,set}affinity(0, …) act on this thread.
    unsafe {
        let mut orig: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut orig) != 0 {
            return;
        }
        for cpu in 0..libc::CPU_SETSIZE as usize {
            if libc::CPU_ISSET(cpu, &orig) {
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut one);
                // Returns once this thread runs on `cpu`.
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one);
            }
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &orig);
    }
}

/// Load the programs filtered to `pid`, seed its current threads, and attach everything.
pub fn load(pid: u32, net_ifs: &[NetIfSpec], bpf_stats: bool) -> Result<Loaded, String> {
    if let Some(why) = missing_caps(effective_caps()) {
        return Err(why);
    }
    let root = tracefs::ensure_mounted()?;
    let mut offsets = tracefs::offsets(&root, !net_ifs.is_empty())?;
    // Read (streaming, a few KiB) before aya's loader parses the same BTF in full, so the
    // two are never in memory together.
    let task = btf::vmlinux_task_layout().map_err(|e| e.to_string())?;
    offsets.task_pid = task.pid;
    offsets.task_sum_exec_runtime = task.sum_exec_runtime;
    if net_ifs.len() > MAX_NET_IFS as usize {
        return Err(format!("at most {MAX_NET_IFS} interfaces can be watched"));
    }
    let stats_fd = if bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .map_err(|e| format!("enabling BPF run-time statistics (BPF_ENABLE_STATS): {e}"))?,
        )
    } else {
        None
    };
    let mut ebpf = EbpfLoader::new()
        .override_global("TARGET_TGID", &pid, true)
        .override_global("OFFSETS", &offsets, true)
        .load(OBJECT)
        .map_err(|e| format!("loading the BPF object: {}", flatten(&e)))?;

    let mut sched = drain(&mut ebpf, "SCHED")?;
    // Seed the threads that exist now, with the scheduler's accounting as their base (the
    // counters are since attach); ones created later come through sched_process_fork or
    // their first switch.
    let task_dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&task_dir).map_err(|e| format!("listing {task_dir}: {e}"))?;
    for entry in tasks.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread that exited meanwhile has no schedstat left: nothing to seed.
        let Some(exec) = std::fs::read_to_string(entry.path().join("schedstat"))
            .ok()
            .and_then(|s| parse_schedstat(&s))
        else {
            continue;
        };
        let v = SchedStats {
            exec_base_ns: exec,
            ..Default::default()
        };
        sched
            .insert(tid, &v)
            .map_err(|e| format!("seeding thread {tid}: {e}"))?;
    }
    let io = drain(&mut ebpf, "IO")?;
    // Kept until the programs are loaded: closing a map's last fd before the program that
    // uses it is loaded makes the load fail ("fd is not pointing to valid bpf_map").
    let mut ifs_map = None;
    let net = if net_ifs.is_empty() {
        None
    } else {
        let mut ifs: HashMap<MapData, IfName, NetIf> = take(&mut ebpf, "NET_IFS")?;
        for (slot, spec) in net_ifs.iter().enumerate() {
            let key = IfName::new(&spec.name)
                .ok_or_else(|| format!("{:?} is not a valid interface name", spec.name))?;
            let val = NetIf {
                slot: slot as u32,
                rx_header_len: spec.rx_header_len,
            };
            ifs.insert(key, val, 0)
                .map_err(|e| format!("configuring interface {}: {}", spec.name, flatten(&e)))?;
        }
        ifs_map = Some(ifs);
        Some(take(&mut ebpf, "NET")?)
    };

    let mut programs = Vec::new();
    for (prog, name) in SCHED_PROGRAMS {
        attach_raw(&mut ebpf, prog, name)?;
        programs.push(*prog);
    }
    if bpf_stats {
        // The in-kernel cost baseline: an empty program on the same tracepoint.
        attach_raw(&mut ebpf, "cis490_baseline_noop", "sched_switch")?;
        programs.push("cis490_baseline_noop");
    }
    for s in tracefs::READ_SYSCALLS {
        attach(
            &mut ebpf,
            "cis490_sys_exit_read",
            "syscalls",
            &format!("sys_exit_{s}"),
        )?;
    }
    for s in tracefs::WRITE_SYSCALLS {
        attach(
            &mut ebpf,
            "cis490_sys_exit_write",
            "syscalls",
            &format!("sys_exit_{s}"),
        )?;
    }
    programs.extend(["cis490_sys_exit_read", "cis490_sys_exit_write"]);
    let (bc, bn) = tracefs::BLOCK_TRACEPOINT;
    attach(&mut ebpf, "cis490_block_rq_issue", bc, bn)?;
    programs.push("cis490_block_rq_issue");
    if net.is_some() {
        attach(&mut ebpf, "cis490_net_dev_xmit", "net", "net_dev_xmit")?;
        attach(
            &mut ebpf,
            "cis490_netif_receive_skb",
            "net",
            "netif_receive_skb",
        )?;
        programs.extend(["cis490_net_dev_xmit", "cis490_netif_receive_skb"]);
    }
    programs.dedup();
    drop(ifs_map);
    visit_cpus();
    Ok(Loaded {
        ebpf,
        sched,
        io,
        net,
        programs,
        stats_fd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_check_names_what_is_missing() {
        assert_eq!(missing_caps(1 << CAP_SYS_ADMIN), None);
        assert_eq!(missing_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)), None);
        let m = missing_caps(1 << CAP_BPF).unwrap();
        assert!(m.starts_with("missing capability CAP_PERFMON ("), "{m}");
        let m = missing_caps(0).unwrap();
        assert!(
            m.starts_with("missing capability CAP_BPF+CAP_PERFMON ("),
            "{m}"
        );
    }
}
