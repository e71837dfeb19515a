//! Per-thread bookkeeping shared by the sched and io drains (pure: no map access).
//!
//! Each tick the collector hands the map's current entries to [`ThreadTable::update`].
//! The table keeps what was last reported per thread so that
//! - a thread's reported counters never decrease (each field is clamped to its last value),
//! - the process total never decreases when a thread ends: the final values of removed
//!   threads accumulate in `gone`,
//! - exited entries are removed from the kernel map only after a grace period, once their
//!   last switch-out has certainly been accounted.
//!
//! It runs on every tick (1000 times a second at 1 kHz), so counters are fixed-size
//! arrays and the result is kept in buffers owned by the table: an update allocates
//! nothing once the set of threads is stable.

use std::collections::BTreeMap;

use cis490_common::{IoStats, SchedStats, FLAG_EXITED};

/// How long an entry flagged exited stays in the map before it is removed.
pub const EXIT_GRACE_NS: u64 = 200_000_000;

/// Room for the counters of any map value type (`IoStats` has the most, 8).
pub const MAX_WIDTH: usize = 8;

/// One entry's counters in [`Counters::NAMES`] order; slots past the type's width are 0.
pub type Values = [u64; MAX_WIDTH];

/// The counters of one map value type.
pub trait Counters: Copy + Default {
    /// Number of counter fields and their names, in output order (at most `MAX_WIDTH`).
    const NAMES: &'static [&'static str];
    fn values(&self) -> Values;
    fn flags(&self) -> u32;
}

impl Counters for SchedStats {
    const NAMES: &'static [&'static str] = &[
        "on_cpu_ns",
        "voluntary_switches",
        "involuntary_switches",
        "wakeups",
        "runqueue_wait_ns",
        "runqueue_waits",
        "migrations",
    ];
    fn values(&self) -> Values {
        [
            self.on_cpu_ns,
            self.voluntary_switches,
            self.involuntary_switches,
            self.wakeups,
            self.runqueue_wait_ns,
            self.runqueue_waits,
            self.migrations,
            0,
        ]
    }
    fn flags(&self) -> u32 {
        self.flags
    }
}

/// IoStats has no flags: its entries are removed when the sched table removes the thread.
impl Counters for IoStats {
    const NAMES: &'static [&'static str] = &[
        "read_bytes",
        "write_bytes",
        "read_ops",
        "write_ops",
        "blk_read_bytes",
        "blk_write_bytes",
        "blk_read_ops",
        "blk_write_ops",
    ];
    fn values(&self) -> Values {
        [
            self.read_bytes,
            self.write_bytes,
            self.read_ops,
            self.write_ops,
            self.blk_read_bytes,
            self.blk_write_bytes,
            self.blk_read_ops,
            self.blk_write_ops,
        ]
    }
    fn flags(&self) -> u32 {
        0
    }
}

/// One map entry as read this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub tid: u32,
    pub values: Values,
    pub flags: u32,
}

impl Entry {
    pub fn of<V: Counters>(tid: u32, v: &V) -> Self {
        Self {
            tid,
            values: v.values(),
            flags: v.flags(),
        }
    }
}

#[derive(Debug, Clone)]
struct Thread {
    reported: Values,
    exited_since_ns: Option<u64>,
    /// The update that last found the thread in the map.
    seen: u64,
}

/// What one update decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// (tid, reported counters) of every live thread, by tid.
    pub threads: Vec<(u32, Values)>,
    /// Process total: live threads plus every thread removed since attach.
    pub total: Values,
    /// Entries user space should now delete from the kernel map.
    pub remove: Vec<u32>,
}

#[derive(Debug, Default)]
pub struct ThreadTable {
    threads: BTreeMap<u32, Thread>,
    gone: Values,
    generation: u64,
    out: Update,
}

fn add(into: &mut Values, v: &Values) {
    for (s, x) in into.iter_mut().zip(v) {
        *s += x;
    }
}

impl ThreadTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// `entries`: the map's entries read now; `now_ns`: CLOCK_MONOTONIC now. The result
    /// stays valid until the next update.
    pub fn update(&mut self, entries: &[Entry], now_ns: u64) -> &Update {
        self.generation += 1;
        let generation = self.generation;
        let out = &mut self.out;
        out.threads.clear();
        out.remove.clear();
        for e in entries {
            let t = self.threads.entry(e.tid).or_insert_with(|| Thread {
                reported: [0; MAX_WIDTH],
                exited_since_ns: None,
                seen: generation,
            });
            t.seen = generation;
            for (r, v) in t.reported.iter_mut().zip(&e.values) {
                *r = (*r).max(*v);
            }
            if e.flags & FLAG_EXITED != 0 {
                let since = *t.exited_since_ns.get_or_insert(now_ns);
                if now_ns.saturating_sub(since) >= EXIT_GRACE_NS {
                    out.remove.push(e.tid);
                }
            }
        }
        // Threads that left the map without us removing them (a candidate that was not the
        // target's, or an entry removed by the io side), and those removed now: retire what
        // they reported into the total.
        let gone = &mut self.gone;
        let remove = &out.remove;
        self.threads.retain(|tid, t| {
            let keep = t.seen == generation && !remove.contains(tid);
            if !keep {
                add(gone, &t.reported);
            }
            keep
        });
        out.total = *gone;
        for (tid, t) in &self.threads {
            add(&mut out.total, &t.reported);
            out.threads.push((*tid, t.reported));
        }
        &self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: &[u64]) -> Values {
        let mut out = [0; MAX_WIDTH];
        out[..x.len()].copy_from_slice(x);
        out
    }
    fn e(tid: u32, x: &[u64], flags: u32) -> Entry {
        Entry {
            tid,
            values: v(x),
            flags,
        }
    }
    const C: u32 = 0;
    const X: u32 = FLAG_EXITED;

    #[test]
    fn rows_per_thread_and_total() {
        let mut t = ThreadTable::new();
        let u = t.update(&[e(10, &[100, 1], C), e(11, &[50, 2], C)], 0);
        assert_eq!(u.threads, vec![(10, v(&[100, 1])), (11, v(&[50, 2]))]);
        assert_eq!(u.total, v(&[150, 3]));
        assert!(u.remove.is_empty());
    }

    #[test]
    fn counters_never_go_back_and_exited_threads_stay_in_total() {
        let mut t = ThreadTable::new();
        t.update(&[e(1, &[120], C), e(2, &[10], C)], 0);
        // A smaller value (an entry re-created under the same tid) never lowers a row.
        let u = t.update(&[e(1, &[110], C), e(2, &[10], C)], 1);
        assert_eq!(u.threads[0], (1, v(&[120])));
        // Thread 2 exits: kept until the grace period is over, then removed.
        let u = t.update(&[e(1, &[130], C), e(2, &[15], X)], 10);
        assert!(u.remove.is_empty());
        assert_eq!(u.total, v(&[145]));
        let u = t.update(&[e(1, &[130], C), e(2, &[16], X)], 10 + EXIT_GRACE_NS);
        assert_eq!(u.remove, vec![2]);
        assert_eq!(u.threads, vec![(1, v(&[130]))]);
        assert_eq!(u.total, v(&[146]));
        // Gone from the map next tick: the total keeps it.
        let u = t.update(&[e(1, &[131], C)], 20 + EXIT_GRACE_NS);
        assert_eq!(u.total, v(&[147]));
        // A thread vanishing without an exit flag is retired too, never subtracted.
        let u = t.update(&[], 30 + EXIT_GRACE_NS);
        assert_eq!(u.total, v(&[147]));
        assert!(u.threads.is_empty());
    }
}
