//! The eBPF backend: kernel programs (crate `cis490-ebpf`, embedded at build time) that
//! aggregate per-thread scheduler and I/O counters and per-interface packet counters of
//! the target in the kernel, drained by collectors on the sampler's tick.
//!
//! - `tracefs`: mount, tracepoint list, field offsets from format files (pure parts tested)
//! - `btf`: task_struct field offsets from the kernel BTF (streaming reader)
//! - `loader`: load with the target's tgid, seed its threads, attach
//! - `table`: per-thread bookkeeping (monotone counters, exited threads kept in totals)
//! - `sched`, `io`: the `bpf-sched` and `bpf-io` collectors
//! - `net`: the `net` source (BPF or sysfs) and tap autodetection
//! - `stats`: per-program run count / run time for `--bpf-stats`

pub mod batch;
pub mod btf;
pub mod handoff;
pub mod io;
pub mod loader;
pub mod net;
pub mod sched;
pub mod stats;
pub mod table;
pub mod tracefs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::collector::Collector;

/// What the collectors of one capture share: what keeps the programs attached (dropping
/// the last reference detaches everything) and the tids the sched side removed, which the io side
/// removes from its own map after reading their final values.
pub struct Session {
    _keepalive: handoff::KeepAlive,
    programs: Vec<(String, u32)>,
    /// Set when the programs were loaded by the `cis490 __bpf-loader` helper process.
    pub loader: Option<handoff::LoaderReport>,
    retired: Mutex<Vec<u32>>,
    /// The live threads the sched side reported this tick (it runs first), so the io
    /// side writes a row for every thread, also those that have done no I/O yet.
    live: Mutex<Vec<u32>>,
}

impl Session {
    fn retire(&self, tids: &[u32]) {
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(tids);
    }

    fn set_live(&self, tids: impl Iterator<Item = u32>) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.clear();
        live.extend(tids);
    }

    /// Copy the live threads into `out` (a buffer the caller reuses every tick).
    fn live_into(&self, out: &mut Vec<u32>) {
        out.clear();
        out.extend_from_slice(&self.live.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Move the retired tids into `out` (cleared first).
    fn take_retired(&self, out: &mut Vec<u32>) {
        out.clear();
        out.append(&mut self.retired.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Run count and run time per program (meaningful with `--bpf-stats`).
    pub fn program_stats(&self) -> serde_json::Value {
        stats::collect(&self.programs)
    }
}

/// The BPF collectors of one capture.
pub struct Backend {
    pub collectors: Vec<Box<dyn Collector>>,
    pub session: Arc<Session>,
}

/// Load and attach for `pid`; `Err` is the exact cause, one line.
pub fn start(
    pid: u32,
    vcpus: &crate::collector::VcpuMap,
    net_ifs: &[loader::NetIfSpec],
    bpf_stats: bool,
) -> Result<Backend, String> {
    let loaded = handoff::load(pid, net_ifs, bpf_stats)?;
    let session = Arc::new(Session {
        _keepalive: loaded.keepalive,
        programs: loaded.programs,
        loader: loaded.loader,
        retired: Mutex::new(Vec::new()),
        live: Mutex::new(Vec::new()),
    });
    let mut collectors: Vec<Box<dyn Collector>> = vec![
        Box::new(sched::SchedCollector::new(
            pid,
            loaded.sched,
            session.clone(),
            vcpus.clone(),
        )),
        Box::new(io::IoCollector::new(
            pid,
            loaded.io,
            session.clone(),
            vcpus.clone(),
        )),
    ];
    if let Some(map) = loaded.net {
        let names = net_ifs.iter().map(|s| s.name.clone()).collect();
        collectors.push(Box::new(net::BpfNetCollector::new(
            map,
            names,
            session.clone(),
        )));
    }
    Ok(Backend {
        collectors,
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
