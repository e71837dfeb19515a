//! The `bpf-sched` collector: drains map `SCHED` each tick into one row per thread and a
//! process-total row (tid null).

use std::sync::Arc;

use aya::maps::{HashMap, MapData};
use cis490_common::SchedStats;

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
    session: Arc<Session>,
    table: ThreadTable,
    comms: Comms,
    vcpus: VcpuMap,
    entries: Vec<(u32, Vec<u64>, u32, bool)>,
}

impl SchedCollector {
    pub fn new(
        pid: u32,
        map: HashMap<MapData, u32, SchedStats>,
        session: Arc<Session>,
        vcpus: VcpuMap,
    ) -> Self {
        Self {
            pid,
            map,
            session,
            table: ThreadTable::new(SchedStats::NAMES.len()),
            comms: Comms::new(pid),
            vcpus,
            entries: Vec::new(),
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
        for item in self.map.iter() {
            match item {
                Ok((tid, v)) => self.entries.push((tid, v.values(), v.flags, v.confirmed())),
                // An entry removed while iterating: it is read again next tick or retired.
                Err(e) => out.problem(format!("reading map SCHED: {e}")),
            }
        }
        let now = clock::mono_raw_ns();
        let update = self.table.update(&self.entries, now);
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
