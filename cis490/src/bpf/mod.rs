//! The eBPF backend: kernel programs (crate `cis490-ebpf`, embedded at build time) that
//! snapshot the target's per-thread scheduler and I/O accounting and its interfaces'
//! packet counters on the kernel's own timer, streamed through a ring buffer that the
//! collectors drain a few times a second.
//!
//! - `tracefs`: mount, tracepoint list, field offsets from format files (pure parts tested)
//! - `btf`: task_struct field offsets from the kernel BTF (streaming reader)
//! - `loader`, `handoff`: load with the target's tgid, follow its threads, start the timer
//! - `snap`: the ring buffer drain (record parsing and schedule bookkeeping tested)
//! - `table`: per-thread bookkeeping (monotone counters, exited threads kept in totals)
//! - `sched`: the `bpf-sched` and `bpf-io` collectors
//! - `net`: the `net` source from the snapshots
//! - `kvm`: the `kvm` and `kvm-keys` sources (the kvm programs' counts per tick)
//! - `flow`: the `flow` and `flows` sources (the tc programs' counts per tick)
//! - `stats`: per-program run count / run time for `--bpf-stats`

pub mod btf;
pub mod dns;
pub mod error;
pub mod flow;
pub mod handoff;
pub mod iter_btf;
pub mod kvm;
pub mod loader;
pub mod net;
pub mod sched;
pub mod snap;
pub mod stats;
pub mod table;
pub mod timer;
pub mod tracefs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::collector::Collector;
use error::BpfError;

/// What the collectors of one capture share: what keeps the programs attached (dropping
/// the last reference detaches everything) and the ring buffer drain.
pub struct Session {
    _keepalive: handoff::KeepAlive,
    programs: Vec<(String, u32)>,
    /// Set when the programs were loaded by the `cis490 __bpf-loader` helper process.
    pub loader: Option<handoff::LoaderReport>,
    drain: Mutex<snap::Drain>,
    control: Mutex<aya::maps::Array<aya::maps::MapData, u32>>,
    timer: Mutex<timer::SnapTimer>,
    /// Where bpf-sched's `wakeups` column comes from (meta.sources[].wakeups).
    pub wakeups: &'static str,
}

impl Session {
    /// Start the kernel's snapshots (their tick 0 is the first timer run after this).
    pub fn start_snapshots(&self) -> Result<(), BpfError> {
        loader::start_snapshots(&mut self.control.lock().unwrap_or_else(|p| p.into_inner()))?;
        self.lock_drain().started_ns = crate::clock::mono_raw_ns();
        Ok(())
    }

    /// The drain; the snapshot source runs on the sampler thread, and the end reads the
    /// schedule after it, so this is never contended.
    pub(crate) fn lock_drain(&self) -> MutexGuard<'_, snap::Drain> {
        self.drain.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restart the snapshot timer when no tick has come for a while (`last_tick_ns`:
    /// CLOCK_MONOTONIC of the latest tick record, or of the start); see `timer`. Returns
    /// a message the first time it had to.
    pub(crate) fn restart_timer_if_stalled(&self, last_tick_ns: u64) -> Option<String> {
        let mut t = self.timer.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::clock::mono_raw_ns();
        t.inject_fault_if_due(now);
        let quiet_since = last_tick_ns.max(t.restarted_ns);
        if now.saturating_sub(quiet_since) < t.stall_ns() {
            return None;
        }
        let first = t.restarts == 0;
        match t.restart() {
            Ok(()) if first => Some(format!(
                "no snapshot for {} ms: the kernel throttled the timer (its CPU had no scheduler tick); restarted it (meta.sources[].timer_restarts counts restarts)",
                now.saturating_sub(last_tick_ns) / 1_000_000
            )),
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    pub(crate) fn timer_restarts(&self) -> u64 {
        self.timer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restarts
    }

    /// Run count and run time per program (meaningful with `--bpf-stats`).
    pub fn program_stats(&self) -> serde_json::Value {
        stats::collect(&self.programs)
    }

    /// The kernel timer's schedule as the episode saw it: (ticks scheduled, ticks
    /// missed, lateness summary). These replace the host sampler's figures in
    /// meta.result, since the host only drains.
    pub fn kernel_schedule(&self) -> (u64, u64, serde_json::Value) {
        let d = self.lock_drain();
        let s = &d.asm.schedule;
        (s.scheduled(), s.missed, s.lateness.summary())
    }
}

/// The BPF backend of one capture: the snapshot source and what keeps its programs.
pub struct Backend {
    pub source: SnapshotSource,
    pub session: Arc<Session>,
}

/// One stream of the snapshot source: its rows from what one drain of the kernel's ring
/// brought (the snapshots' ticks, and the kvm and flow tables read up to them).
pub(crate) trait Part: Send {
    fn stream(&self) -> crate::collector::Stream;
    fn fill(
        &mut self,
        drain: &snap::Drain,
        clock: &crate::clock::EpisodeClock,
        out: &mut crate::collector::TickOutput,
    ) -> Result<(), crate::Error>;
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
}

/// The BPF backend as one polled source: at each host tick it drains the ring once and
/// has each of its streams turn that drain into rows, in a fixed order: bpf-sched,
/// bpf-io and net from the snapshots; kvm, then kvm-keys (which writes kvm's fold);
/// flow, then flows (likewise); dns from its own ring. Every stream is on the kernel's
/// clock.
pub struct SnapshotSource {
    session: Arc<Session>,
    parts: Vec<Box<dyn Part>>,
}

impl Collector for SnapshotSource {
    fn streams(&self) -> Vec<crate::collector::Stream> {
        self.parts.iter().map(|p| p.stream()).collect()
    }

    fn kernel_clocked(&self) -> bool {
        true
    }

    fn summary(&self, stream: usize) -> serde_json::Map<String, serde_json::Value> {
        self.parts[stream].summary()
    }

    fn collect(
        &mut self,
        _tick: crate::collector::Tick,
        clock: &crate::clock::EpisodeClock,
        sink: &mut dyn crate::collector::Sink,
    ) -> Result<(), crate::Error> {
        let mut drain = self.session.lock_drain();
        let mut first = true;
        let started = std::time::Instant::now();
        loop {
            let more = drain.drain(clock, BATCH_RECORDS);
            // What the drain itself found is reported on the first stream (bpf-sched).
            let out = sink.out();
            out.problems
                .extend(drain.asm.batch.problems.iter().cloned());
            if first {
                first = false;
                if let Some(msg) = drain
                    .last_sign_of_life_ns()
                    .and_then(|t| self.session.restart_timer_if_stalled(t))
                {
                    out.problem(msg);
                }
            }
            for (i, part) in self.parts.iter_mut().enumerate() {
                let out = sink.out();
                // One stream's failure costs that stream's rows of this batch, not the others'.
                if let Err(e) = part.fill(&drain, clock, out) {
                    out.problem(e.to_string());
                }
                sink.flush(i);
            }
            // A ring that fills faster than it is taken (a loaded host) must not hold the
            // sampler here: what is left waits for the next host tick, which is due by now.
            if !more || started.elapsed() > DRAIN_BUDGET {
                return Ok(());
            }
        }
    }
}

/// The longest one host tick spends taking batches from the ring.
const DRAIN_BUDGET: std::time::Duration = std::time::Duration::from_nanos(snap::DRAIN_INTERVAL_NS);

/// Records taken from the ring per batch (~1 MiB of them), so that memory does not grow
/// with threads × rate × drain interval; a drain takes as many batches as the ring holds.
const BATCH_RECORDS: usize = 4096;

/// Whether an optional group of programs (kvm, flow) is attached, and if not why: the
/// `status` and `reason` of their sources in meta.sources.
#[derive(Debug, Clone)]
pub(crate) enum ProgramsStatus {
    Attached,
    Absent(String),
}

impl ProgramsStatus {
    /// The status of a load that gave `maps`, and the maps.
    pub(crate) fn of<T>(maps: Result<T, String>) -> (Self, Option<T>) {
        match maps {
            Ok(m) => (ProgramsStatus::Attached, Some(m)),
            Err(why) => (ProgramsStatus::Absent(why), None),
        }
    }

    /// A source's meta.sources entry so far: how it reads (`method`) and its status.
    pub(crate) fn summary(&self, method: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("method".into(), method.into());
        match self {
            ProgramsStatus::Attached => {
                m.insert("status".into(), "attached".into());
            }
            ProgramsStatus::Absent(why) => {
                m.insert("status".into(), "absent".into());
                m.insert("reason".into(), why.clone().into());
            }
        }
        m
    }
}

/// Whether the capture has `kvm` sources, and whether their programs are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmPlan {
    /// `--no-kvm`, or a check of BPF alone (`cis490 doctor`): no kvm sources.
    Off,
    /// The target is a KVM VM: attach the kvm programs.
    Attach,
    /// The streams are written empty and meta.sources says this.
    Absent(String),
}

/// Load and attach for `pid`; `Err` is the exact cause, one line.
pub fn start(
    pid: u32,
    vcpus: &crate::collector::VcpuMap,
    net_ifs: &[loader::NetIfSpec],
    bpf_stats: bool,
    mut snap: loader::SnapSpec,
    rows: crate::collector::RowsMode,
    kvm: KvmPlan,
) -> Result<Backend, BpfError> {
    snap.kvm = kvm == KvmPlan::Attach;
    let mut loaded = handoff::load(pid, net_ifs, bpf_stats, snap)?;
    let flow_load = std::mem::replace(&mut loaded.flow, loader::FlowLoad::NotAsked);
    let kvm_maps = match (
        kvm,
        std::mem::replace(&mut loaded.kvm, loader::KvmLoad::NotAsked),
    ) {
        (KvmPlan::Off, _) => None,
        (KvmPlan::Absent(why), _) => Some(Err(why)),
        (KvmPlan::Attach, loader::KvmLoad::Attached(m)) => Some(Ok(*m)),
        (KvmPlan::Attach, loader::KvmLoad::Failed(why)) => {
            Some(Err(format!("the kvm programs did not attach: {why}")))
        }
        (KvmPlan::Attach, loader::KvmLoad::NotAsked) => {
            Some(Err("the kvm programs were not loaded".to_owned()))
        }
    };
    let session = Arc::new(Session {
        _keepalive: loaded.keepalive,
        programs: loaded.programs,
        loader: loaded.loader,
        drain: Mutex::new(snap::Drain::new(loaded.snaps)),
        control: Mutex::new(loaded.control),
        timer: Mutex::new(loaded.timer),
        wakeups: loaded.wakeups,
    });
    let mut parts: Vec<Box<dyn Part>> = vec![
        Box::new(sched::SnapCollector::new(
            sched::Stream::Sched,
            pid,
            session.clone(),
            vcpus.clone(),
            rows,
        )),
        Box::new(sched::SnapCollector::new(
            sched::Stream::Io,
            pid,
            session.clone(),
            vcpus.clone(),
            rows,
        )),
    ];
    if !net_ifs.is_empty() {
        let names = net_ifs.iter().map(|s| s.name.clone()).collect();
        parts.push(Box::new(net::BpfNetCollector::new(names)));
    }
    if let Some(maps) = kvm_maps {
        parts.extend(kvm::parts(pid, vcpus, maps));
    }
    let names: Vec<String> = net_ifs.iter().map(|s| s.name.clone()).collect();
    match flow_load {
        loader::FlowLoad::NotAsked => {}
        loader::FlowLoad::Attached(m) => {
            parts.extend(flow::parts(names, Ok(*m)));
        }
        loader::FlowLoad::Failed(why) => parts.extend(flow::parts(
            names,
            Err(format!("the flow programs did not attach: {why}")),
        )),
    }
    Ok(Backend {
        source: SnapshotSource {
            session: session.clone(),
            parts,
        },
        session,
    })
}

/// Thread names from /proc/<pid>/task/<tid>/comm, re-read at most once a second per
/// thread (QEMU names its threads right after creating them). Names are shared
/// (`Arc<str>`) with the rows, so a row per thread per tick costs no string copy.
pub(crate) struct Comms {
    pid: u32,
    cache: HashMap<u32, (Arc<str>, u64)>,
}

const COMM_REFRESH_NS: u64 = 1_000_000_000;

impl Comms {
    pub(crate) fn new(pid: u32) -> Self {
        Self {
            pid,
            cache: HashMap::new(),
        }
    }

    pub(crate) fn get(&mut self, tid: u32, now_ns: u64) -> Option<Arc<str>> {
        if let Some((name, at)) = self.cache.get(&tid) {
            if now_ns.saturating_sub(*at) < COMM_REFRESH_NS {
                return Some(name.clone());
            }
        }
        match std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid)) {
            Ok(s) => {
                let read = s.trim_end_matches('\n');
                let entry = self
                    .cache
                    .entry(tid)
                    .or_insert_with(|| (Arc::from(read), now_ns));
                if &*entry.0 != read {
                    entry.0 = Arc::from(read);
                }
                entry.1 = now_ns;
                Some(entry.0.clone())
            }
            // Exited: keep the last name it had.
            Err(_) => self.cache.get(&tid).map(|(n, _)| n.clone()),
        }
    }

    pub(crate) fn forget(&mut self, tid: u32) {
        self.cache.remove(&tid);
    }
}
