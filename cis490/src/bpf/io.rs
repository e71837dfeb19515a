//! The `bpf-io` collector: drains map `IO` each tick into one row per thread and a
//! process-total row (tid null).

use std::sync::Arc;

use cis490_common::IoStats;

use super::table::{Counters, ThreadTable};
use super::{Comms, Session};
use crate::clock::{self, EpisodeClock};
use crate::collector::{Collector, Tick, TickOutput, VcpuMap};
use crate::error::Error;
use crate::row::Row;

pub const SOURCE: &str = "bpf-io";

pub struct IoCollector {
    pid: u32,
    map: super::batch::HashDrain<IoStats>,
    session: Arc<Session>,
    table: ThreadTable,
    comms: Comms,
    vcpus: VcpuMap,
    entries: Vec<(u32, Vec<u64>, u32)>,
}

impl IoCollector {
    pub fn new(
        pid: u32,
        map: super::batch::HashDrain<IoStats>,
        session: Arc<Session>,
        vcpus: VcpuMap,
    ) -> Self {
        Self {
            pid,
            map,
            session,
            table: ThreadTable::new(IoStats::NAMES.len()),
            comms: Comms::new(pid),
            vcpus,
            entries: Vec::new(),
        }
    }
}

impl Collector for IoCollector {
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
        if let Err(e) = self.map.read() {
            out.problem(e);
        }
        self.entries
            .extend(self.map.entries().map(|(tid, v)| (tid, v.values(), 0)));
        let now = clock::mono_raw_ns();
        let update = self.table.update(&self.entries, now);
        // Threads the sched side removed: their final values were read just now; the
        // table retires them when they are gone from the map next tick.
        for tid in self.session.take_retired() {
            self.map.remove(tid);
            self.comms.forget(tid);
        }
        // Threads without I/O so far have no map entry: they get a row of zeros.
        let mut threads = update.threads;
        let zeros = vec![0u64; IoStats::NAMES.len()];
        let missing: Vec<u32> = self
            .session
            .live()
            .into_iter()
            .filter(|tid| threads.binary_search_by_key(tid, |(t, _)| *t).is_err())
            .collect();
        threads.extend(missing.into_iter().map(|tid| (tid, zeros.clone())));
        threads.sort_unstable_by_key(|(t, _)| *t);
        let stamp = clock.stamp();
        for (tid, values) in &threads {
            let mut row = Row::new(stamp, SOURCE, false);
            row.seq = Some(tick.seq);
            row.thread_columns = true;
            row.tid = Some(*tid);
            row.comm = self.comms.get(*tid, now);
            row.vcpu = self.vcpus.get(*tid);
            for (name, v) in IoStats::NAMES.iter().zip(values) {
                row.push(*name, *v);
            }
            out.row(row);
        }
        let mut row = Row::new(stamp, SOURCE, false);
        row.seq = Some(tick.seq);
        row.thread_columns = true;
        row.comm = self.comms.get(self.pid, now);
        for (name, v) in IoStats::NAMES.iter().zip(&update.total) {
            row.push(*name, *v);
        }
        out.row(row);
        Ok(())
    }
}
