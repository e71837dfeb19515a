//! The `bpf-sched` and `bpf-io` collectors: one row per thread per kernel snapshot and a
//! process-total row (tid null), from the drained [`Batch`](super::snap::Batch).
//!
//! Both streams come from the same snapshot records, so they are one collector type
//! with a [`Stream`] saying which columns it writes. The `bpf-sched` one runs first on
//! each host tick and drains the ring; `bpf-io` and `net` read the same batch.

use std::sync::Arc;

use cis490_common::{SnapRecord, ThreadCounters, REC_THREAD_EXITED};

use super::table::{Entry, ThreadTable, Values, MAX_WIDTH, UNAVAILABLE};
use super::Part;
use super::{Comms, Session};
use crate::clock::{self, EpisodeClock};
use crate::collector::{TickOutput, VcpuMap};
use crate::error::Error;
use crate::row::Value;

/// `bpf-sched` columns 11 and 12 (`state`, `last_cpu`) are gauges, not counters.
const SCHED_GAUGES: u32 = 1 << 11 | 1 << 12;
const STATE_COL: usize = 11;
const LAST_CPU_COL: usize = 12;

/// The letter /proc prints for a task's state (fs/proc/array.c get_task_state:
/// `task_index_to_char(__task_state_index(__state, exit_state))`), from `__state`.
/// exit_state is never set on a thread the snapshot reads: sched_process_exit, which
/// ends its slot, runs before exit_notify sets it.
pub fn state_letter(state: u32) -> char {
    // include/linux/sched.h: TASK_REPORT is the bits below TASK_PARKED's next bit;
    // TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD; TASK_RTLOCK_WAIT reports as D.
    const TASK_UNINTERRUPTIBLE: u32 = 0x2;
    const TASK_REPORT: u32 = 0x7f;
    const TASK_NOLOAD: u32 = 0x400;
    const TASK_IDLE: u32 = TASK_UNINTERRUPTIBLE | TASK_NOLOAD;
    const TASK_REPORT_IDLE: u32 = TASK_REPORT + 1;
    const TASK_RTLOCK_WAIT: u32 = 0x1000;
    let mut s = state & TASK_REPORT;
    if state & TASK_IDLE == TASK_IDLE {
        s = TASK_REPORT_IDLE;
    }
    if state & TASK_RTLOCK_WAIT != 0 {
        s = TASK_UNINTERRUPTIBLE;
    }
    // fls(): index of the highest set bit, 1-based; 0 for none.
    let index = 32 - s.leading_zeros();
    b"RSDTtXZPI"[index as usize] as char
}

/// /proc's stat `utime`/`stime` in clock ticks for a thread: the kernel's cputime_adjust
/// (kernel/sched/cputime.c) of the tick-sampled utime/stime to `sum_exec_runtime`, kept
/// monotonic by `prev_cputime`, then nsec_to_clock_t. A pure function of what the
/// snapshot read: for a thread that is not running it is the value /proc prints (a
/// /proc read stores its result in prev_cputime, which gives the same result again).
pub fn cputime_ticks(c: &ThreadCounters, clk_tck: u64) -> (u64, u64) {
    let rtime = c.sum_exec_runtime;
    let (pu, ps) = (c.prev_utime_ns, c.prev_stime_ns);
    let (utime, stime) = if pu.saturating_add(ps) >= rtime {
        (pu, ps)
    } else {
        let mut stime = if c.stime_ns == 0 {
            0
        } else if c.utime_ns == 0 {
            rtime
        } else {
            // mul_u64_u64_div_u64: exact on x86_64 (128-bit intermediate).
            let st = u128::from(c.stime_ns) * u128::from(rtime)
                / (u128::from(c.stime_ns) + u128::from(c.utime_ns));
            (st as u64).min(rtime)
        };
        stime = stime.max(ps);
        let mut utime = rtime - stime;
        if utime < pu {
            utime = pu;
            stime = rtime - utime;
        }
        (utime, stime)
    };
    let ns_per_tick = 1_000_000_000 / clk_tck.max(1);
    (utime / ns_per_tick, stime / ns_per_tick)
}

/// USER_HZ, the unit of /proc's utime/stime.
fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

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
                "minflt",
                "majflt",
                "utime_ticks",
                "stime_ticks",
                "state",
                "last_cpu",
            ],
            Stream::Io => &IO_NAMES,
        }
    }

    /// `clk_tck`: USER_HZ (utime/stime are in its ticks, as /proc prints them).
    pub fn values(self, r: &SnapRecord, clk_tck: u64) -> Values {
        let c = &r.counters;
        let mut v = [0; MAX_WIDTH];
        match self {
            Stream::Sched => {
                let (utime, stime) = cputime_ticks(c, clk_tck);
                v[..13].copy_from_slice(&[
                    c.on_cpu_ns,
                    c.voluntary_switches,
                    c.involuntary_switches,
                    c.wakeups,
                    c.runqueue_wait_ns,
                    c.timeslices_count,
                    c.migrations,
                    c.minflt,
                    c.majflt,
                    utime,
                    stime,
                    u64::from(state_letter(c.task_state)),
                    u64::from(c.cpu),
                ])
            }
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
    clk_tck: u64,
    page_size: u64,
    changed: crate::collector::ChangedRows,
}

impl SnapCollector {
    pub fn new(
        stream: Stream,
        pid: u32,
        session: Arc<Session>,
        vcpus: VcpuMap,
        rows: crate::collector::RowsMode,
    ) -> Self {
        Self {
            changed: crate::collector::ChangedRows::new(rows),
            stream,
            pid,
            session,
            table: match stream {
                Stream::Sched => ThreadTable::with_gauges(SCHED_GAUGES),
                Stream::Io => ThreadTable::new(),
            },
            comms: Comms::new(pid),
            vcpus,
            entries: Vec::new(),
            clk_tck: clock_ticks_per_second(),
            page_size: page_size(),
        }
    }
}

fn push_counter(row: &mut crate::row::Row, name: &'static str, v: u64) {
    if v == UNAVAILABLE {
        row.push(name, None::<u64>);
    } else if name == "state" {
        row.push(name, Value::Char(char::from_u32(v as u32).unwrap_or('?')));
    } else {
        row.push(name, v);
    }
}

/// The process's memory as the process row reports it.
#[derive(Clone, Copy, Default)]
struct ProcessMemory {
    rss_kb: Option<u64>,
    vsize_bytes: Option<u64>,
}

impl ProcessMemory {
    /// From a snapshot's page counts (as /proc: VmRSS in KiB, stat's vsize in bytes).
    fn from_pages(rss_pages: Option<u64>, total_vm: Option<u64>, page_size: u64) -> Self {
        Self {
            rss_kb: rss_pages.map(|p| p * page_size / 1024),
            vsize_bytes: total_vm.map(|p| p * page_size),
        }
    }
}

/// `bpf-sched`'s columns /proc has for the process only: null on thread rows (as in
/// `proc`); on the process row the number of threads in the snapshot and the process's
/// memory, read by the snapshot through a live thread's `mm` (null when it could not be:
/// see docs/data-model.md).
fn push_process_only(row: &mut crate::row::Row, num_threads: Option<u64>, mem: ProcessMemory) {
    row.push("num_threads", num_threads)
        .push("rss_kb", mem.rss_kb)
        .push("vsize_bytes", mem.vsize_bytes);
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

impl Part for SnapCollector {
    fn stream(&self) -> crate::collector::Stream {
        crate::collector::Stream {
            source: self.stream.source(),
            available_in_deployment: false,
        }
    }

    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("method".into(), "kernel_snapshot".into());
        self.changed.summary(&mut m);
        if self.stream == Stream::Sched {
            m.insert("wakeups".into(), self.session.wakeups.into());
            m.insert(
                "timer_restarts".into(),
                self.session.timer_restarts().into(),
            );
        }
        m
    }

    fn fill(
        &mut self,
        drain: &super::snap::Drain,
        _clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        let batch = &drain.asm.batch;
        out.gaps.extend_from_slice(&batch.gaps);
        let now = clock::mono_raw_ns();
        let names = self.stream.names();
        for tick in &batch.ticks {
            let records = &batch.threads[tick.threads.0..tick.threads.1];
            self.entries.clear();
            let clk_tck = self.clk_tck;
            self.entries.extend(records.iter().map(|r| Entry {
                tid: r.tid,
                values: self.stream.values(r, clk_tck),
                exited: r.kind == REC_THREAD_EXITED,
            }));
            // Slot order is the kernel's; rows go by tid.
            self.entries.sort_unstable_by_key(|e| e.tid);
            let update = self.table.update(&self.entries);
            // The process row first, as proc writes it: a reader that types columns from
            // the first rows (polars) then sees num_threads as a number, not as null.
            let mut total = update.total;
            if self.stream == Stream::Sched {
                // The process's state and CPU are its main thread's, as in /proc/<pid>/stat.
                if let Some((_, leader)) = update.threads.iter().find(|(t, _)| *t == self.pid) {
                    total[STATE_COL] = leader[STATE_COL];
                    total[LAST_CPU_COL] = leader[LAST_CPU_COL];
                }
            }
            let row = out.new_row(tick.stamp, self.stream.source(), false);
            row.seq = Some(tick.seq);
            row.thread_columns = true;
            row.comm = self.comms.get(self.pid, now);
            for (name, v) in names.iter().zip(&total) {
                push_counter(row, name, *v);
            }
            if self.stream == Stream::Sched {
                let live = self.entries.iter().filter(|e| !e.exited).count() as u64;
                let mem =
                    ProcessMemory::from_pages(tick.mm_rss_pages, tick.mm_total_vm, self.page_size);
                push_process_only(row, Some(live), mem);
            }
            for (tid, values) in &update.threads {
                let comm = self.comms.get(*tid, now);
                let vcpu = self.vcpus.get(*tid);
                // A thread's final row is always written.
                let exited = self
                    .entries
                    .binary_search_by_key(tid, |e| e.tid)
                    .is_ok_and(|i| self.entries[i].exited);
                let t = tick.stamp.t_mono_ns;
                if self
                    .changed
                    .skip_values(*tid, t, values, &comm, vcpu, exited)
                {
                    continue;
                }
                let row = out.new_row(tick.stamp, self.stream.source(), false);
                row.seq = Some(tick.seq);
                row.thread_columns = true;
                row.tid = Some(*tid);
                row.comm = comm;
                row.vcpu = vcpu;
                for (name, v) in names.iter().zip(values) {
                    push_counter(row, name, *v);
                }
                if self.stream == Stream::Sched {
                    push_process_only(row, None, ProcessMemory::default());
                }
            }
            for e in &self.entries {
                if e.exited {
                    self.comms.forget(e.tid);
                    self.changed.forget(e.tid);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_letters_are_procs() {
        assert_eq!(state_letter(0), 'R');
        assert_eq!(state_letter(0x1), 'S');
        assert_eq!(state_letter(0x2), 'D');
        assert_eq!(state_letter(0x4), 'T');
        assert_eq!(state_letter(0x8), 't');
        assert_eq!(state_letter(0x40), 'P');
        // TASK_IDLE (uninterruptible, no load) is I, not D.
        assert_eq!(state_letter(0x402), 'I');
        // TASK_RTLOCK_WAIT reports as D; TASK_FREEZABLE and other high bits are masked.
        assert_eq!(state_letter(0x1000), 'D');
        assert_eq!(state_letter(0x2001), 'S');
        // __TASK_STOPPED | TASK_WAKEKILL (TASK_STOPPED) is T.
        assert_eq!(state_letter(0x104), 'T');
    }

    fn c(sum: u64, ut: u64, st: u64, pu: u64, ps: u64) -> ThreadCounters {
        ThreadCounters {
            sum_exec_runtime: sum,
            utime_ns: ut,
            stime_ns: st,
            prev_utime_ns: pu,
            prev_stime_ns: ps,
            ..Default::default()
        }
    }

    #[test]
    fn cputime_is_scaled_to_the_runtime_as_the_kernel_does() {
        const T: u64 = 10_000_000; // one tick at USER_HZ 100
                                   // 3:1 user:system samples, 400 ms of runtime: 300 / 100 ms.
        assert_eq!(cputime_ticks(&c(400 * T / 10, 12, 4, 0, 0), 100), (30, 10));
        // No system samples: all user; none at all: all user too.
        assert_eq!(cputime_ticks(&c(55 * T, 8, 0, 0, 0), 100), (55, 0));
        assert_eq!(cputime_ticks(&c(55 * T, 0, 0, 0, 0), 100), (55, 0));
        // Only system samples: all system.
        assert_eq!(cputime_ticks(&c(55 * T, 0, 3, 0, 0), 100), (0, 55));
        // prev_cputime already covers the runtime: it is what /proc prints.
        assert_eq!(
            cputime_ticks(&c(50 * T, 1, 1, 30 * T, 20 * T), 100),
            (30, 20)
        );
        // stime may not go below prev's: the new time goes to utime.
        assert_eq!(
            cputime_ticks(&c(60 * T, 9, 1, 30 * T, 20 * T), 100),
            (40, 20)
        );
        // utime may not go below prev's either.
        assert_eq!(
            cputime_ticks(&c(60 * T, 1, 9, 40 * T, 10 * T), 100),
            (40, 20)
        );
        // Truncated to whole ticks, like nsec_to_clock_t.
        assert_eq!(cputime_ticks(&c(T - 1, 1, 0, 0, 0), 100), (0, 0));
    }

    #[test]
    fn sched_columns_and_values_line_up() {
        let mut r = SnapRecord::default();
        r.counters.on_cpu_ns = 7;
        r.counters.minflt = 11;
        r.counters.majflt = 12;
        r.counters.task_state = 1;
        r.counters.cpu = 3;
        r.counters.sum_exec_runtime = 20_000_000;
        r.counters.utime_ns = 1;
        let v = Stream::Sched.values(&r, 100);
        let names = Stream::Sched.names();
        let get = |n: &str| v[names.iter().position(|x| *x == n).unwrap()];
        assert_eq!(get("on_cpu_ns"), 7);
        assert_eq!((get("minflt"), get("majflt")), (11, 12));
        assert_eq!((get("utime_ticks"), get("stime_ticks")), (2, 0));
        assert_eq!(names[STATE_COL], "state");
        assert_eq!(get("state"), u64::from('S'));
        assert_eq!(names[LAST_CPU_COL], "last_cpu");
        assert_eq!(get("last_cpu"), 3);
        assert!(names.len() <= MAX_WIDTH);
    }
}
