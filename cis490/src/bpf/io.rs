//! The `bpf-io` collector: drains map `IO` each tick into one row per thread and a
//! process-total row (tid null).

use std::sync::Arc;

use cis490_common::IoStats;

use super::table::{Counters, Entry, ThreadTable, Values, MAX_WIDTH};
use super::{Comms, Session};
use crate::clock::{self, EpisodeClock};
use crate::collector::{Collector, Tick, TickOutput, VcpuMap};
use crate::error::Error;

pub const SOURCE: &str = "bpf-io";

pub struct IoCollector {
    pid: u32,
    map: super::batch::HashDrain<IoStats>,
    session: Arc<Session>,
    table: ThreadTable,
    comms: Comms,
    vcpus: VcpuMap,
    entries: Vec<Entry>,
    /// This tick's rows: the table's threads plus live threads without I/O so far.
    threads: Vec<(u32, Values)>,
    live: Vec<u32>,
    retired: Vec<u32>,
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
            table: ThreadTable::new(),
            comms: Comms::new(pid),
            vcpus,
            entries: Vec::new(),
            threads: Vec::new(),
            live: Vec::new(),
            retired: Vec::new(),
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
            .extend(self.map.entries().map(|(tid, v)| Entry::of(tid, v)));
        let now = clock::mono_raw_ns();
        let update = self.table.update(&self.entries, now);
        // Threads the sched side removed: their final values were read just now; the
        // table retires them when they are gone from the map next tick.
        self.session.take_retired(&mut self.retired);
        for &tid in &self.retired {
            self.map.remove(tid);
            self.comms.forget(tid);
        }
        // Threads without I/O so far have no map entry: they get a row of zeros.
        self.session.live_into(&mut self.live);
        self.threads.clear();
        self.threads.extend_from_slice(&update.threads);
        for &tid in &self.live {
            if update
                .threads
                .binary_search_by_key(&tid, |(t, _)| *t)
                .is_err()
            {
                self.threads.push((tid, [0; MAX_WIDTH]));
            }
        }
        self.threads.sort_unstable_by_key(|(t, _)| *t);
        let stamp = clock.stamp();
        let names = IoStats::NAMES;
        for (tid, values) in &self.threads {
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
