//! The `bpf-sched` and `bpf-io` collectors: one row per thread per kernel snapshot and a
//! process-total row (tid null), from the drained [`Batch`](super::snap::Batch).
//!
//! Both streams come from the same snapshot records, so they are one collector type
//! with a [`Stream`] saying which columns it writes. The `bpf-sched` one runs first on
//! each host tick and drains the ring; `bpf-io` and `net` read the same batch.

use std::sync::Arc;

use cis490_common::{SnapRecord, REC_THREAD_EXITED};

use super::table::{Entry, ThreadTable, Values, MAX_WIDTH, UNAVAILABLE};
use super::{Comms, Session};
use crate::clock::{self, EpisodeClock};
use crate::collector::{Collector, Tick, TickOutput, VcpuMap};
use crate::error::Error;

/// `bpf-io`'s columns: the task io counters in the order the snapshot reads them (the
/// members of `struct task_io_accounting`, whose names are also `proc`'s columns), then
/// the block request counters.
const IO_NAMES: [&str; 11] = {
    let m = super::btf::IOAC_MEMBERS;
    [
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        m[6],
        "blk_read_bytes",
        "blk_write_bytes",
        "blk_read_ops",
        "blk_write_ops",
    ]
};

/// Which stream a [`SnapCollector`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Sched,
    Io,
}

impl Stream {
    pub fn source(self) -> &'static str {
        match self {
            Stream::Sched => "bpf-sched",
            Stream::Io => "bpf-io",
        }
    }

    /// Column names, in the order of [`Stream::values`]. Same names as the `proc`
    /// stream's for the same kernel quantities.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Stream::Sched => &[
                "on_cpu_ns",
                "voluntary_switches",
                "involuntary_switches",
                "wakeups",
                "runqueue_wait_ns",
                "timeslices_count",
                "migrations",
            ],
            Stream::Io => &IO_NAMES,
        }
    }

    pub fn values(self, r: &SnapRecord) -> Values {
        let c = &r.counters;
        let mut v = [0; MAX_WIDTH];
        match self {
            Stream::Sched => v[..7].copy_from_slice(&[
                c.on_cpu_ns,
                c.voluntary_switches,
                c.involuntary_switches,
                c.wakeups,
                c.runqueue_wait_ns,
                c.timeslices_count,
                c.migrations,
            ]),
            Stream::Io => {
                v[..7].copy_from_slice(&c.io);
                v[7..11].copy_from_slice(&[
                    r.blk.read_bytes,
                    r.blk.write_bytes,
                    r.blk.read_ops,
                    r.blk.write_ops,
                ]);
            }
        }
        v
    }
}

pub struct SnapCollector {
    stream: Stream,
    pid: u32,
    session: Arc<Session>,
    table: ThreadTable,
    comms: Comms,
    vcpus: VcpuMap,
    entries: Vec<Entry>,
}

impl SnapCollector {
    pub fn new(stream: Stream, pid: u32, session: Arc<Session>, vcpus: VcpuMap) -> Self {
        Self {
            stream,
            pid,
            session,
            table: ThreadTable::new(),
            comms: Comms::new(pid),
            vcpus,
            entries: Vec::new(),
        }
    }
}

fn push_counter(row: &mut crate::row::Row, name: &'static str, v: u64) {
    if v == UNAVAILABLE {
        row.push(name, None::<u64>);
    } else {
        row.push(name, v);
    }
}

impl Collector for SnapCollector {
    fn source(&self) -> &'static str {
        self.stream.source()
    }

    fn available_in_deployment(&self) -> bool {
        false
    }

    fn kernel_clocked(&self) -> bool {
        true
    }

    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("method".into(), "kernel_snapshot".into());
        if self.stream == Stream::Sched {
            m.insert("wakeups".into(), self.session.wakeups.into());
            m.insert(
                "timer_restarts".into(),
                self.session.timer_restarts().into(),
            );
        }
        m
    }

    fn collect(
        &mut self,
        _tick: Tick,
        clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        let mut drain = self.session.lock_drain();
        if self.stream == Stream::Sched {
            drain.drain(clock);
            out.problems
                .extend(drain.asm.batch.problems.iter().cloned());
            if let Some(msg) = drain
                .last_sign_of_life_ns()
                .and_then(|t| self.session.restart_timer_if_stalled(t))
            {
                out.problem(msg);
            }
        }
        let batch = &drain.asm.batch;
        out.gaps.extend_from_slice(&batch.gaps);
        let now = clock::mono_raw_ns();
        let names = self.stream.names();
        for tick in &batch.ticks {
            let records = &batch.threads[tick.threads.0..tick.threads.1];
            self.entries.clear();
            self.entries.extend(records.iter().map(|r| Entry {
                tid: r.tid,
                values: self.stream.values(r),
                exited: r.kind == REC_THREAD_EXITED,
            }));
            // Slot order is the kernel's; rows go by tid.
            self.entries.sort_unstable_by_key(|e| e.tid);
            let update = self.table.update(&self.entries);
            for (tid, values) in &update.threads {
                let row = out.new_row(tick.stamp, self.stream.source(), false);
                row.seq = Some(tick.seq);
                row.thread_columns = true;
                row.tid = Some(*tid);
                row.comm = self.comms.get(*tid, now);
                row.vcpu = self.vcpus.get(*tid);
                for (name, v) in names.iter().zip(values) {
                    push_counter(row, name, *v);
                }
            }
            let row = out.new_row(tick.stamp, self.stream.source(), false);
            row.seq = Some(tick.seq);
            row.thread_columns = true;
            row.comm = self.comms.get(self.pid, now);
            for (name, v) in names.iter().zip(&update.total) {
                push_counter(row, name, *v);
            }
            for e in &self.entries {
                if e.exited {
                    self.comms.forget(e.tid);
                }
            }
        }
        Ok(())
    }
}
