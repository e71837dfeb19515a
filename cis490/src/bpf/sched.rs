//! The `bpf-sched` collector: drains map `SCHED` each tick into one row per thread and a
//! process-total row (tid null).

use std::sync::Arc;

use cis490_common::SchedStats;

use super::table::{Counters, Entry, ThreadTable};
use super::{Comms, Session};
use crate::clock::{self, EpisodeClock};
use crate::collector::{Collector, Tick, TickOutput, VcpuMap};
use crate::error::Error;

pub const SOURCE: &str = "bpf-sched";

pub struct SchedCollector {
    pid: u32,
    map: super::batch::HashDrain<SchedStats>,
    session: Arc<Session>,
    table: ThreadTable,
    comms: Comms,
    vcpus: VcpuMap,
    entries: Vec<Entry>,
    gone: Vec<u32>,
    last_liveness_ns: u64,
}

/// How often threads are checked against /proc/<pid>/task: a thread that exited without
/// its sched_process_exit being seen (it ended between the seeding of the map and the
/// attach) would otherwise be reported forever.
const LIVENESS_EVERY_NS: u64 = 1_000_000_000;

impl SchedCollector {
    pub fn new(
        pid: u32,
        map: super::batch::HashDrain<SchedStats>,
        session: Arc<Session>,
        vcpus: VcpuMap,
    ) -> Self {
        Self {
            pid,
            map,
            session,
            table: ThreadTable::new(),
            comms: Comms::new(pid),
            vcpus,
            entries: Vec::new(),
            gone: Vec::new(),
            last_liveness_ns: 0,
        }
    }
}

impl Collector for SchedCollector {
    fn source(&self) -> &'static str {
        SOURCE
    }

    fn available_in_deployment(&self) -> bool {
        false
    }

    fn collect(
        &mut self,
        tick: Tick,
        clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        self.entries.clear();
        // Before the read: a thread on a CPU is then reported with its run time up to a
        // moment the map already reflects (see `SchedStats::on_cpu_at`).
        let now = clock::mono_raw_ns();
        if let Err(e) = self.map.read() {
            out.problem(e);
        }
        self.entries.extend(self.map.entries().map(|(tid, v)| {
            let v = SchedStats {
                on_cpu_ns: v.on_cpu_at(now),
                ..*v
            };
            Entry::of(tid, &v)
        }));
        let update = self.table.update(&self.entries, now);
        for tid in &update.remove {
            self.map.remove(*tid);
            self.comms.forget(*tid);
        }
        self.gone.clear();
        self.gone.extend_from_slice(&update.remove);
        if now.saturating_sub(self.last_liveness_ns) >= LIVENESS_EVERY_NS {
            self.last_liveness_ns = now;
            for (tid, _) in &update.threads {
                let dir = format!("/proc/{}/task/{tid}", self.pid);
                if !std::path::Path::new(&dir).exists() && !update.remove.contains(tid) {
                    // Gone from the map next tick: the table then keeps its last values in
                    // the process total.
                    self.map.remove(*tid);
                    self.gone.push(*tid);
                }
            }
        }
        if !self.gone.is_empty() {
            self.session.retire(&self.gone);
        }
        self.session
            .set_live(update.threads.iter().map(|(tid, _)| *tid));

        let stamp = clock.stamp();
        let names = SchedStats::NAMES;
        for (tid, values) in &update.threads {
            let row = out.new_row(stamp, SOURCE, false);
            row.seq = Some(tick.seq);
            row.thread_columns = true;
            row.tid = Some(*tid);
            row.comm = self.comms.get(*tid, now);
            row.vcpu = self.vcpus.get(*tid);
            for (name, v) in names.iter().zip(values) {
                row.push(*name, *v);
            }
        }
        let row = out.new_row(stamp, SOURCE, false);
        row.seq = Some(tick.seq);
        row.thread_columns = true;
        row.comm = self.comms.get(self.pid, now);
        for (name, v) in names.iter().zip(&update.total) {
            row.push(*name, *v);
        }
        Ok(())
    }
}
