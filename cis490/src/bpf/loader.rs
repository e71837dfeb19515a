//! Loading and attaching the embedded kernel programs for one target.
//!
//! Every failure comes back as one line saying exactly what is missing (capability,
//! tracefs, tracepoint, verifier output), which `backend` records as the fallback reason.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{Iter, PerfEvent, RawTracePoint, SchedClassifier, TcAttachType, TracePoint};
use aya::{Ebpf, EbpfLoader};
use cis490_common::{
    IfName, KvmKey, NetIf, SnapConfig, SnapRecord, ThreadSlot, MAX_CPUS, MAX_NET_IFS, MAX_SLOTS,
    SLOT_FREE,
};

use super::error::BpfError;
use super::{btf, tracefs};

/// An error of this stage (see [`BpfError`]).
fn load_err(msg: impl Into<String>) -> BpfError {
    BpfError::Load(msg.into())
}

/// The object built by build.rs from the `cis490-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cis490-probes"));

/// The raw-tracepoint programs that keep the set of followed threads, and their
/// tracepoints.
const THREAD_SET_PROGRAMS: &[(&str, &str)] = &[
    ("cis490_sched_fork", "sched_process_fork"),
    ("cis490_sched_exit", "sched_process_exit"),
];

/// What the capture asks of the snapshot program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapSpec {
    /// Time between two snapshots (the capture's `--rate-hz`).
    pub interval_ns: u64,
    /// `--bpf-wakeups`: count wakeups with sched_wakeup programs where the kernel keeps
    /// no per-task count.
    pub count_wakeups: bool,
    /// `--bpf-timer-cpu`: the CPU whose timer runs the snapshots (default: the first
    /// online CPU).
    pub timer_cpu: Option<u32>,
    /// Attach the `kvm` programs (the target is a KVM VM and `--no-kvm` was not given).
    pub kvm: bool,
    /// Entries of the kvm programs' key table (`--kvm-key-table`).
    pub kvm_keys: u32,
    /// Attach the `flow` programs to the watched interfaces (`--no-flow` not given).
    pub flow: bool,
}

/// The `flow` programs' maps (see cis490-ebpf/src/flow.rs).
pub struct FlowMaps {
    pub deltas:
        PerCpuHashMap<MapData, cis490_common::flow::FlowDeltaKey, cis490_common::flow::FlowDelta>,
    pub ifs: PerCpuArray<MapData, cis490_common::flow::FlowIfSlot>,
    pub dns: RingBuf<MapData>,
}

/// What became of the `flow` programs.
pub enum FlowLoad {
    NotAsked,
    Attached(Box<FlowMaps>),
    /// Why they are not attached (one line); the other programs are unaffected.
    Failed(String),
}

/// The `kvm` programs' maps (see cis490-ebpf/src/kvm.rs).
pub struct KvmMaps {
    pub counts: HashMap<MapData, KvmKey, u64>,
    pub other: HashMap<MapData, KvmKey, u64>,
    pub lost: PerCpuArray<MapData, u64>,
}

/// What became of the `kvm` programs.
pub enum KvmLoad {
    NotAsked,
    Attached(Box<KvmMaps>),
    /// Why they are not attached (one line); the other programs are unaffected.
    Failed(String),
}

/// Where the `wakeups` column comes from (meta.sources[].wakeups of `bpf-sched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeupSource {
    /// The kernel's own count (`stats.nr_wakeups`, CONFIG_SCHEDSTATS), since thread start.
    Schedstats,
    /// sched_wakeup/sched_wakeup_new programs (`--bpf-wakeups`), since attach.
    Programs,
    /// Not counted: the column is null.
    None,
}

impl WakeupSource {
    pub fn as_str(self) -> &'static str {
        match self {
            WakeupSource::Schedstats => "schedstats",
            WakeupSource::Programs => "bpf_since_attach",
            WakeupSource::None => "not_counted",
        }
    }
}

/// Bytes of ring buffer for half a second of snapshots of `threads` threads (doubled
/// for growth) and `net_ifs` interfaces: a power of two pages, 256 KiB to 8 MiB. User
/// space drains every 50 ms, so half a second is ten drains of slack. The kernel maps the
/// ring's pages twice (for records that wrap), and all of them count in the capture's
/// RSS once the ring has gone round: 8 MiB is 16 MiB of RSS, which keeps a capture of a
/// 200-thread target at 1 kHz under 32 MiB and still holds 160 ms (three drains) of its
/// records (BENCHMARKS.md section 10; a 16 MiB ring made it 44 MiB).
pub fn ring_bytes(interval_ns: u64, threads: usize, net_ifs: usize) -> u32 {
    const RING_MAX_BYTES: u64 = 8 << 20;
    const RECORD_HEADER: u64 = 8;
    let per_tick = (threads.max(4) as u64 * 2)
        * (std::mem::size_of::<SnapRecord>() as u64 + RECORD_HEADER)
        + net_ifs as u64 * (std::mem::size_of::<cis490_common::NetRecord>() as u64 + RECORD_HEADER)
        + std::mem::size_of::<cis490_common::TickRecord>() as u64
        + RECORD_HEADER;
    let ticks_per_half_second = (500_000_000 / interval_ns.max(1)).max(1);
    let want = per_tick * ticks_per_half_second;
    want.next_power_of_two().clamp(256 << 10, RING_MAX_BYTES) as u32
}

/// A watched interface: its name and the link-layer header length its rx path strips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetIfSpec {
    pub name: String,
    pub rx_header_len: u32,
}

/// Everything loaded for one capture. Dropping it detaches and unloads the programs.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// The snapshot program's output.
    pub snaps: RingBuf<MapData>,
    /// Element 0 = 1 starts the snapshots (see [`start_snapshots`]).
    pub control: Array<MapData, u32>,
    pub timer: super::timer::SnapTimer,
    pub wakeups: WakeupSource,
    /// Names of the loaded programs (for run-time statistics).
    pub programs: Vec<&'static str>,
    /// Held while `--bpf-stats` is on: the kernel counts run time while this fd is open
    /// and reverts by itself when it closes, even if cis490 is killed.
    pub stats_fd: Option<OwnedFd>,
    pub kvm: KvmLoad,
    pub flow: FlowLoad,
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
        "missing capability {} (the BPF programs need CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN; run as root)",
        missing.join("+")
    ))
}

fn attach(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<(), BpfError> {
    let p: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| load_err(format!("program {prog} missing from the embedded object")))?
        .try_into()
        .map_err(|e| load_err(format!("program {prog}: {e}")))?;
    if p.fd().is_err() {
        p.load()
            .map_err(|e| load_err(format!("loading program {prog}: {}", flatten(&e))))?;
    }
    p.attach(category, name).map_err(|e| {
        load_err(format!(
            "attaching {prog} to {category}:{name}: {}",
            flatten(&e)
        ))
    })?;
    Ok(())
}

/// Attach a raw-tracepoint program (loaded on first use) to tracepoint `name`.
fn attach_raw(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<(), BpfError> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| load_err(format!("program {prog} missing from the embedded object")))?
        .try_into()
        .map_err(|e| load_err(format!("program {prog}: {e}")))?;
    if p.fd().is_err() {
        p.load()
            .map_err(|e| load_err(format!("loading program {prog}: {}", flatten(&e))))?;
    }
    p.attach(name).map_err(|e| {
        load_err(format!(
            "attaching {prog} to raw tracepoint {name}: {}",
            flatten(&e)
        ))
    })?;
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

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or_else(|| load_err(format!("map {name} missing from the embedded object")))?;
    T::try_from(m).map_err(|e| load_err(format!("map {name}: {e}")))
}

/// The CPU whose timer runs the snapshots: `asked` (`--bpf-timer-cpu`) if it is online,
/// else the first online CPU.
fn snapshot_cpu(asked: Option<u32>) -> Result<u32, BpfError> {
    let online =
        aya::util::online_cpus().map_err(|(f, e)| load_err(format!("reading {f}: {e}")))?;
    match asked {
        Some(c) if online.contains(&c) => Ok(c),
        Some(c) => Err(load_err(format!("--bpf-timer-cpu {c}: no such online CPU"))),
        None => online
            .first()
            .copied()
            .ok_or_else(|| load_err("no online CPU".to_owned())),
    }
}

/// Set by the loader helper process (`cis490 __bpf-loader`), which is single-threaded and
/// exits right after loading: it may change its own mount namespace.
pub static HIDE_KERNEL_BTF: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Hide /sys/kernel/btf from this process only: a private mount namespace with an empty
/// read-only tmpfs over it, so that aya's `EbpfLoader::new()` finds no kernel BTF and does
/// not parse it (aya 0.14 parses it eagerly, before `.btf(None)` can say it is not
/// needed). Everything cis490 needs from the BTF has been read by then. Needs
/// CAP_SYS_ADMIN, which loading BPF programs as root implies; where it fails, aya parses
/// as before and nothing else changes.
fn hide_kernel_btf() -> Result<(), BpfError> {
    let os = |what: &str| load_err(format!("{what}: {}", std::io::Error::last_os_error()));
    // SAFETY: plain syscalls with constant, NUL-terminated arguments; they change only
    // this (single-threaded) process's view of the mount table.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(os("unshare(CLONE_NEWNS)"));
        }
        // Private first, so nothing mounted here propagates back to the host.
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(os("making / private"));
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/sys/kernel/btf".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=4k".as_ptr().cast(),
        ) != 0
        {
            return Err(os("mounting tmpfs over /sys/kernel/btf"));
        }
    }
    Ok(())
}

/// Run the seeding iterator once: every thread of the target that exists now gets a
/// slot. Returns how many slots are live afterwards.
fn seed_threads(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<usize, BpfError> {
    let p: &mut Iter = ebpf
        .program_mut("cis490_seed_task")
        .ok_or(load_err(
            "program cis490_seed_task missing from the embedded object",
        ))?
        .try_into()
        .map_err(|e| load_err(format!("program cis490_seed_task: {e}")))?;
    p.load("task", btf)
        .map_err(|e| load_err(format!("loading the task iterator: {}", flatten(&e))))?;
    let id = p
        .attach()
        .map_err(|e| load_err(format!("attaching the task iterator: {}", flatten(&e))))?;
    let link = p
        .take_link(id)
        .map_err(|e| load_err(format!("task iterator link: {}", flatten(&e))))?;
    let mut file = link
        .into_file()
        .map_err(|e| load_err(format!("task iterator: {}", flatten(&e))))?;
    // The program writes nothing: reading to the end runs it over every task.
    let mut sink = Vec::new();
    file.read_to_end(&mut sink)
        .map_err(|e| load_err(format!("running the task iterator: {e}")))?;
    let slots: Array<&MapData, ThreadSlot> = Array::try_from(
        ebpf.map("SLOTS")
            .ok_or(load_err("map SLOTS missing from the embedded object"))?,
    )
    .map_err(|e| load_err(format!("map SLOTS: {e}")))?;
    Ok(slots
        .iter()
        .filter_map(Result::ok)
        .filter(|s| s.state != SLOT_FREE)
        .count())
}

/// Let the snapshot timer take snapshots from its next run on (the capture calls this
/// once its clock origin is set and it is about to drain).
pub fn start_snapshots(control: &mut Array<MapData, u32>) -> Result<(), BpfError> {
    control
        .set(0, 1, 0)
        .map_err(|e| load_err(format!("starting the snapshots (map CONTROL): {e}")))
}

/// Whether the kernel counts wakeups per task right now (CONFIG_SCHEDSTATS and
/// kernel.sched_schedstats = 1); the count is read only then.
fn schedstats_on() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/sched_schedstats")
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

/// Load the programs for `pid`, follow its threads, and start the snapshot timer.
pub fn load(
    pid: u32,
    net_ifs: &[NetIfSpec],
    bpf_stats: bool,
    snap: SnapSpec,
) -> Result<Loaded, BpfError> {
    if let Some(why) = missing_caps(effective_caps()) {
        return Err(BpfError::Capability(why));
    }
    if snap.interval_ns == 0 {
        return Err(load_err("snapshot interval of 0 ns"));
    }
    let root = tracefs::ensure_mounted()?;
    let mut offsets = tracefs::offsets(&root, !net_ifs.is_empty())?;
    // Read (streaming, a few KiB) before aya's loader parses the same BTF in full, so the
    // two are never in memory together.
    let task = btf::vmlinux_task_layout().map_err(|e| BpfError::Btf(e.to_string()))?;
    btf::snapshot_offsets(&task, &mut offsets)
        .map_err(|e| BpfError::Btf(format!("{}: {e}", btf::VMLINUX)))?;
    offsets.task_nr_wakeups = match task.nr_wakeups {
        Some(off) if schedstats_on() => off,
        _ => 0,
    };
    let wakeups = if offsets.task_nr_wakeups != 0 {
        WakeupSource::Schedstats
    } else if snap.count_wakeups {
        WakeupSource::Programs
    } else {
        WakeupSource::None
    };
    if net_ifs.len() > MAX_NET_IFS as usize {
        return Err(load_err(format!(
            "at most {MAX_NET_IFS} interfaces can be watched"
        )));
    }
    let ncpus = aya::util::nr_cpus().map_err(|(f, e)| load_err(format!("reading {f}: {e}")))?;
    if ncpus > MAX_CPUS as usize && !net_ifs.is_empty() {
        return Err(load_err(format!(
            "{ncpus} possible CPUs: the net counters are summed over at most {MAX_CPUS}"
        )));
    }
    let config = SnapConfig {
        interval_ns: snap.interval_ns,
        ncpus: ncpus as u32,
        net_ifs: net_ifs.len() as u32,
        count_wakeups: u32::from(wakeups == WakeupSource::Programs),
        _pad: 0,
    };
    let threads_now = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .map_err(|e| load_err(format!("listing /proc/{pid}/task: {e}")))?;
    let stats_fd = if bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
                load_err(format!(
                    "enabling BPF run-time statistics (BPF_ENABLE_STATS): {e}"
                ))
            })?,
        )
    } else {
        None
    };
    // Not aya's full parse of the kernel's BTF for the task iterator: it needs one type id.
    let iter_btf = super::iter_btf::task_iter_btf(std::path::Path::new(btf::VMLINUX))?;
    // No kernel BTF for aya either: EbpfLoader::new() parses all of it (~15 MiB, most of
    // the loader's CPU) for CO-RE relocations, which Rust BPF programs do not have (the
    // offsets come from `btf`, above). `.btf(None)` comes too late to prevent the parse;
    // in the helper process the file is hidden from aya instead (see `hide_kernel_btf`).
    if HIDE_KERNEL_BTF.load(std::sync::atomic::Ordering::Relaxed) {
        if let Err(e) = hide_kernel_btf() {
            tracing::debug!("kernel BTF stays visible to aya (it will parse it): {e}");
        }
    }
    // The kvm programs need every KVM tracepoint's format; without one they stay off.
    let kvm_offsets = snap.kvm.then(|| tracefs::kvm_offsets(&root));
    let mut loader = EbpfLoader::new();
    loader
        .btf(None)
        .override_global("TARGET_TGID", &pid, true)
        .override_global("OFFSETS", &offsets, true)
        .override_global("SNAP_CONFIG", &config, true)
        .map_max_entries(
            "SNAPS",
            ring_bytes(snap.interval_ns, threads_now, net_ifs.len()),
        );
    match &kvm_offsets {
        Some(Ok(o)) => {
            loader.override_global("KVM_OFFSETS", o, true);
            loader.map_max_entries("KVM_COUNTS", snap.kvm_keys.max(1));
        }
        // Not a KVM capture: no tables of preallocated entries.
        _ => {
            loader.map_max_entries("KVM_COUNTS", 1);
            loader.map_max_entries("KVM_OTHER", 1);
        }
    }
    let flow = snap.flow && !net_ifs.is_empty();
    // The watched interfaces' ifindexes, for the flow programs (a global they scan).
    // Indexes are per network namespace: the target's (see crate::net::netns).
    let ifindex = if flow {
        crate::net::netns::run_in(pid, || {
            let mut out = [0u32; MAX_NET_IFS as usize];
            for (slot, spec) in net_ifs.iter().enumerate() {
                let name = std::ffi::CString::new(spec.name.as_str())
                    .map_err(|_| load_err(format!("{:?} is not an interface name", spec.name)))?;
                // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
                out[slot] = unsafe { libc::if_nametoindex(name.as_ptr()) };
            }
            Ok::<_, BpfError>(out)
        })
        .map_err(load_err)??
    } else {
        [0; MAX_NET_IFS as usize]
    };
    if flow {
        loader.override_global("FLOW_IFINDEX", &ifindex, true);
        loader.map_max_entries(
            "FLOW_IF_TICKS",
            net_ifs.len() as u32 * cis490_common::flow::FLOW_IF_RING,
        );
    }
    if !flow {
        for m in ["FLOW_DIRS", "FLOW_DELTAS", "FLOW_IF_TICKS"] {
            loader.map_max_entries(m, 1);
        }
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| load_err(format!("loading the BPF object: {}", flatten(&e))))?;

    // Kept until the programs are loaded: closing a map's last fd before the program that
    // uses it is loaded makes the load fail ("fd is not pointing to valid bpf_map").
    let mut ifs_map = None;
    if !net_ifs.is_empty() {
        let mut ifs: HashMap<MapData, IfName, NetIf> = take(&mut ebpf, "NET_IFS")?;
        for (slot, spec) in net_ifs.iter().enumerate() {
            let key = IfName::new(&spec.name).ok_or_else(|| {
                load_err(format!("{:?} is not a valid interface name", spec.name))
            })?;
            let val = NetIf {
                slot: slot as u32,
                rx_header_len: spec.rx_header_len,
            };
            ifs.insert(key, val, 0).map_err(|e| {
                load_err(format!(
                    "configuring interface {}: {}",
                    spec.name,
                    flatten(&e)
                ))
            })?;
        }
        ifs_map = Some(ifs);
    }

    let mut programs = Vec::new();
    // The thread set first, then the seeding: a thread created in between is added by
    // sched_process_fork (a slot is never given twice to one tid).
    for (prog, name) in THREAD_SET_PROGRAMS {
        attach_raw(&mut ebpf, prog, name)?;
        programs.push(*prog);
    }
    if wakeups == WakeupSource::Programs {
        for tp in ["sched_wakeup", "sched_wakeup_new"] {
            attach_raw(&mut ebpf, "cis490_sched_wakeup", tp)?;
        }
        programs.push("cis490_sched_wakeup");
    }
    let seeded = seed_threads(&mut ebpf, &iter_btf)?;
    drop(iter_btf);
    if seeded == 0 {
        return Err(load_err(format!(
            "the task iterator found no thread of process {pid} (has it exited?)"
        )));
    }
    if seeded > MAX_SLOTS as usize {
        return Err(load_err(format!("more than {MAX_SLOTS} threads")));
    }
    let (bc, bn) = tracefs::BLOCK_TRACEPOINT;
    attach(&mut ebpf, "cis490_block_rq_issue", bc, bn)?;
    programs.push("cis490_block_rq_issue");
    if !net_ifs.is_empty() {
        attach(&mut ebpf, "cis490_net_dev_xmit", "net", "net_dev_xmit")?;
        attach(
            &mut ebpf,
            "cis490_netif_receive_skb",
            "net",
            "netif_receive_skb",
        )?;
        programs.extend(["cis490_net_dev_xmit", "cis490_netif_receive_skb"]);
    }
    drop(ifs_map);
    let kvm = match kvm_offsets {
        None => KvmLoad::NotAsked,
        Some(Err(e)) => KvmLoad::Failed(e.to_string()),
        Some(Ok(_)) => match attach_kvm(&mut ebpf, &mut programs) {
            Ok(maps) => KvmLoad::Attached(Box::new(maps)),
            Err(e) => KvmLoad::Failed(e.to_string()),
        },
    };
    let flow = if flow {
        // tc links are made in the namespace of the thread that asks: the target's.
        let attached =
            crate::net::netns::run_in(pid, || attach_flow(&mut ebpf, net_ifs, &mut programs));
        match attached {
            Ok(Ok(maps)) => FlowLoad::Attached(Box::new(maps)),
            Ok(Err(e)) => FlowLoad::Failed(e.to_string()),
            Err(e) => FlowLoad::Failed(e),
        }
    } else {
        FlowLoad::NotAsked
    };
    let snaps: RingBuf<MapData> = take(&mut ebpf, "SNAPS")?;
    let control: Array<MapData, u32> = take(&mut ebpf, "CONTROL")?;
    // Last: the timer starts now, with every thread already followed.
    let cpu = snapshot_cpu(snap.timer_cpu)?;
    let p: &mut PerfEvent = ebpf
        .program_mut("cis490_snapshot")
        .ok_or(load_err(
            "program cis490_snapshot missing from the embedded object",
        ))?
        .try_into()
        .map_err(|e| load_err(format!("program cis490_snapshot: {e}")))?;
    p.load()
        .map_err(|e| load_err(format!("loading program cis490_snapshot: {}", flatten(&e))))?;
    let prog_fd = p
        .fd()
        .map_err(|e| load_err(format!("program cis490_snapshot: {e}")))?
        .as_fd();
    let timer_fd = super::timer::open(cpu, snap.interval_ns, prog_fd)?;
    programs.push("cis490_snapshot");
    let grid: Array<MapData, u64> = take(&mut ebpf, "GRID")?;
    let mut timer = super::timer::SnapTimer::new(timer_fd, grid, snap.interval_ns);
    // Before CONTROL lets the program run (see TickState).
    timer.start()?;
    Ok(Loaded {
        ebpf,
        snaps,
        control,
        timer,
        wakeups,
        programs,
        stats_fd,
        kvm,
        flow,
    })
}

/// Attach the flow programs to every watched interface, ingress and egress, as TCX links
/// (kernel 6.6 and later: a link is an fd, so the attachment ends with the capture even if
/// it is killed; older kernels get a netlink tc filter).
fn attach_flow(
    ebpf: &mut Ebpf,
    net_ifs: &[NetIfSpec],
    programs: &mut Vec<&'static str>,
) -> Result<FlowMaps, BpfError> {
    for (prog, dir) in [
        ("cis490_flow_ingress", TcAttachType::Ingress),
        ("cis490_flow_egress", TcAttachType::Egress),
    ] {
        let p: &mut SchedClassifier = ebpf
            .program_mut(prog)
            .ok_or_else(|| load_err(format!("program {prog} missing from the embedded object")))?
            .try_into()
            .map_err(|e| load_err(format!("program {prog}: {e}")))?;
        p.load()
            .map_err(|e| load_err(format!("loading program {prog}: {}", flatten(&e))))?;
        for spec in net_ifs {
            // Before 6.6 the netlink attach needs the clsact qdisc (present already is fine).
            let _ = aya::programs::tc::qdisc_add_clsact(&spec.name);
            p.attach(&spec.name, dir).map_err(|e| {
                load_err(format!(
                    "attaching {prog} to {}: {}",
                    spec.name,
                    flatten(&e)
                ))
            })?;
        }
        programs.push(prog);
    }
    Ok(FlowMaps {
        deltas: take(ebpf, "FLOW_DELTAS")?,
        ifs: take(ebpf, "FLOW_IF_TICKS")?,
        dns: take(ebpf, "DNS_RING")?,
    })
}

/// Attach every `kvm` program and take its maps. A failure part-way leaves the programs
/// attached so far counting into maps nobody reads until the capture ends (cheap; the
/// kvm source then says why it is absent).
fn attach_kvm(ebpf: &mut Ebpf, programs: &mut Vec<&'static str>) -> Result<KvmMaps, BpfError> {
    for (prog, name) in tracefs::KVM_TRACEPOINTS {
        if *name == "kvm_exit" {
            attach(ebpf, prog, "kvm", name)?;
        } else {
            attach_raw(ebpf, prog, name)?;
        }
        programs.push(prog);
    }
    Ok(KvmMaps {
        counts: take(ebpf, "KVM_COUNTS")?,
        other: take(ebpf, "KVM_OTHER")?,
        lost: take(ebpf, "KVM_LOST")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_holds_half_a_second_within_bounds() {
        // 1 kHz, 9 threads: (18 × 248 + 56) B × 500 ≈ 2.3 MB → 4 MiB.
        assert_eq!(ring_bytes(1_000_000, 9, 0), 4 << 20);
        // 1 kHz, 4 threads: (8 × 248 + 56) B × 500 ≈ 1 MB → 1 MiB.
        assert_eq!(ring_bytes(1_000_000, 4, 0), 1 << 20);
        // 10 Hz: the floor.
        assert_eq!(ring_bytes(100_000_000, 9, 0), 256 << 10);
        // Very many threads at 1 kHz: the ceiling.
        assert_eq!(ring_bytes(1_000_000, 400, 16), 8 << 20);
        for (i, t, n) in [(1_000_000, 1, 0), (3_333_333, 40, 2), (1_000_000_000, 0, 0)] {
            let b = ring_bytes(i, t, n);
            assert!(b.is_power_of_two() && b.is_multiple_of(4096), "{b}");
        }
    }

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
