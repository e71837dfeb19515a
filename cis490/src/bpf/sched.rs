//! The `bpf-sched` collector: drains map `SCHED` each tick into one row per thread and a
//! process-total row (tid null).

use std::sync::Arc;

use aya::maps::{HashMap, MapData, PerCpuArray};
use cis490_common::{OnCpu, SchedStats};

use super::table::{Counters, ThreadTable};
use super::{Comms, Session};
use crate::clock::{self, EpisodeClock};
use crate::collector::{Collector, Tick, TickOutput, VcpuMap};
use crate::error::Error;
use crate::row::Row;

pub const SOURCE: &str = "bpf-sched";

pub struct SchedCollector {
    pid: u32,
    map: HashMap<MapData, u32, SchedStats>,
    on_cpu: PerCpuArray<MapData, OnCpu>,
    session: Arc<Session>,
    table: ThreadTable,
    comms: Comms,
    vcpus: VcpuMap,
    entries: Vec<(u32, Vec<u64>, u32, bool)>,
    running: Vec<OnCpu>,
}

impl SchedCollector {
    pub fn new(
        pid: u32,
        map: HashMap<MapData, u32, SchedStats>,
        on_cpu: PerCpuArray<MapData, OnCpu>,
        session: Arc<Session>,
        vcpus: VcpuMap,
    ) -> Self {
        Self {
            pid,
            map,
            on_cpu,
            session,
            table: ThreadTable::new(SchedStats::NAMES.len()),
            comms: Comms::new(pid),
            vcpus,
            entries: Vec::new(),
            running: Vec::new(),
        }
    }
}

/// The slice `tid` has been running for at `now_ns`, if it is on a CPU now (the kernel
/// adds it to on_cpu_ns only at its switch-out). Pure, for tests.
pub fn running_slice(running: &[OnCpu], tid: u32, now_ns: u64) -> Option<u64> {
    running
        .iter()
        .find(|c| c.tid == tid && c.since_ns != 0)
        .map(|c| now_ns.saturating_sub(c.since_ns))
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
        for item in self.map.iter() {
            match item {
                Ok((tid, v)) => self.entries.push((tid, v.values(), v.flags, v.confirmed())),
                // An entry removed while iterating: it is read again next tick or retired.
                Err(e) => out.problem(format!("reading map SCHED: {e}")),
            }
        }
        self.running.clear();
        match self.on_cpu.get(&0, 0) {
            Ok(per_cpu) => self.running.extend(per_cpu.iter().copied()),
            Err(e) => out.problem(format!("reading map ON_CPU: {e}")),
        }
        let now = clock::mono_raw_ns();
        let running = &self.running;
        let update = self.table.update(
            &self.entries,
            &|tid| {
                running_slice(running, tid, now).map(|s| {
                    let mut v = vec![0; SchedStats::NAMES.len()];
                    v[0] = s;
                    v
                })
            },
            now,
        );
        for tid in &update.remove {
            let _ = self.map.remove(tid);
            self.comms.forget(*tid);
        }
        self.session.retire(&update.remove);

        let stamp = clock.stamp();
        for (tid, values) in &update.threads {
            let mut row = Row::new(stamp, SOURCE, false);
            row.seq = Some(tick.seq);
            row.thread_columns = true;
            row.tid = Some(*tid);
            row.comm = self.comms.get(*tid, now);
            row.vcpu = self.vcpus.get(*tid);
            for (name, v) in SchedStats::NAMES.iter().zip(values) {
                row.push(*name, *v);
            }
            out.row(row);
        }
        let mut row = Row::new(stamp, SOURCE, false);
        row.seq = Some(tick.seq);
        row.thread_columns = true;
        row.comm = self.comms.get(self.pid, now);
        for (name, v) in SchedStats::NAMES.iter().zip(&update.total) {
            row.push(*name, *v);
        }
        out.row(row);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_slice_only_for_the_thread_on_cpu() {
        let cpus = [
            OnCpu {
                tid: 5,
                _pad: 0,
                since_ns: 1_000,
            },
            OnCpu {
                tid: 0,
                _pad: 0,
                since_ns: 900,
            },
            OnCpu {
                tid: 7,
                _pad: 0,
                since_ns: 0,
            },
        ];
        assert_eq!(running_slice(&cpus, 5, 1_500), Some(500));
        assert_eq!(running_slice(&cpus, 6, 1_500), None);
        assert_eq!(
            running_slice(&cpus, 7, 1_500),
            None,
            "no switch-in seen yet"
        );
        assert_eq!(
            running_slice(&cpus, 5, 10),
            Some(0),
            "clock skew never goes negative"
        );
    }
}
