//! Per-thread bookkeeping shared by the sched and io drains (pure: no map access).
//!
//! Each tick the collector hands the map's current entries to [`ThreadTable::update`].
//! The table keeps what was last reported per thread so that
//! - a thread's reported counters never decrease (each field is clamped to its last value),
//! - the process total never decreases when a thread ends: the final values of removed
//!   threads accumulate in `gone`,
//! - exited entries are removed from the kernel map only after a grace period, once their
//!   last switch-out has certainly been accounted.

use std::collections::BTreeMap;

use cis490_common::{IoStats, SchedStats, FLAG_EXITED};

/// How long an entry flagged exited stays in the map before it is removed.
pub const EXIT_GRACE_NS: u64 = 200_000_000;

/// The counters of one map value type.
pub trait Counters: Copy + Default {
    /// Number of counter fields and their names, in output order.
    const NAMES: &'static [&'static str];
    fn values(&self) -> Vec<u64>;
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
    fn values(&self) -> Vec<u64> {
        vec![
            self.on_cpu_ns,
            self.voluntary_switches,
            self.involuntary_switches,
            self.wakeups,
            self.runqueue_wait_ns,
            self.runqueue_waits,
            self.migrations,
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
    fn values(&self) -> Vec<u64> {
        vec![
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

#[derive(Debug, Clone)]
struct Thread {
    reported: Vec<u64>,
    exited_since_ns: Option<u64>,
}

/// What one update decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// (tid, reported counters) of every live thread, by tid.
    pub threads: Vec<(u32, Vec<u64>)>,
    /// Process total: live threads plus every thread removed since attach.
    pub total: Vec<u64>,
    /// Entries user space should now delete from the kernel map.
    pub remove: Vec<u32>,
}

#[derive(Debug)]
pub struct ThreadTable {
    width: usize,
    threads: BTreeMap<u32, Thread>,
    gone: Vec<u64>,
}

impl ThreadTable {
    pub fn new(width: usize) -> Self {
        Self {
            width,
            threads: BTreeMap::new(),
            gone: vec![0; width],
        }
    }

    fn retire(&mut self, tid: u32) {
        if let Some(t) = self.threads.remove(&tid) {
            for (g, v) in self.gone.iter_mut().zip(&t.reported) {
                *g += v;
            }
        }
    }

    /// `entries`: (tid, counters, flags) read from the map now;
    /// `now_ns`: CLOCK_MONOTONIC now.
    pub fn update(&mut self, entries: &[(u32, Vec<u64>, u32)], now_ns: u64) -> Update {
        let mut out = Update::default();
        // Threads that left the map without us removing them (an entry removed after the
        // liveness check, or by the io side): retire what they reported.
        let present: std::collections::HashSet<u32> = entries.iter().map(|e| e.0).collect();
        let vanished: Vec<u32> = self
            .threads
            .keys()
            .copied()
            .filter(|t| !present.contains(t))
            .collect();
        for tid in vanished {
            self.retire(tid);
        }
        for (tid, values, flags) in entries {
            let t = self.threads.entry(*tid).or_insert_with(|| Thread {
                reported: vec![0; self.width],
                exited_since_ns: None,
            });
            for (r, v) in t.reported.iter_mut().zip(values) {
                *r = (*r).max(*v);
            }
            if flags & FLAG_EXITED != 0 {
                let since = *t.exited_since_ns.get_or_insert(now_ns);
                if now_ns.saturating_sub(since) >= EXIT_GRACE_NS {
                    out.remove.push(*tid);
                }
            }
        }
        for tid in &out.remove {
            self.retire(*tid);
        }
        let mut total = self.gone.clone();
        for (tid, t) in &self.threads {
            for (s, v) in total.iter_mut().zip(&t.reported) {
                *s += v;
            }
            out.threads.push((*tid, t.reported.clone()));
        }
        out.total = total;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(tid: u32, v: &[u64], flags: u32) -> (u32, Vec<u64>, u32) {
        (tid, v.to_vec(), flags)
    }
    const C: u32 = 0;
    const X: u32 = FLAG_EXITED;

    #[test]
    fn rows_per_thread_and_total() {
        let mut t = ThreadTable::new(2);
        let u = t.update(&[e(10, &[100, 1], C), e(11, &[50, 2], C)], 0);
        assert_eq!(u.threads, vec![(10, vec![100, 1]), (11, vec![50, 2])]);
        assert_eq!(u.total, vec![150, 3]);
        assert!(u.remove.is_empty());
    }

    #[test]
    fn counters_never_go_back_and_exited_threads_stay_in_total() {
        let mut t = ThreadTable::new(1);
        t.update(&[e(1, &[120], C), e(2, &[10], C)], 0);
        // A smaller value (an entry re-created under the same tid) never lowers a row.
        let u = t.update(&[e(1, &[110], C), e(2, &[10], C)], 1);
        assert_eq!(u.threads[0], (1, vec![120]));
        // Thread 2 exits: kept until the grace period is over, then removed.
        let u = t.update(&[e(1, &[130], C), e(2, &[15], X)], 10);
        assert!(u.remove.is_empty());
        assert_eq!(u.total, vec![145]);
        let u = t.update(&[e(1, &[130], C), e(2, &[16], X)], 10 + EXIT_GRACE_NS);
        assert_eq!(u.remove, vec![2]);
        assert_eq!(u.threads, vec![(1, vec![130])]);
        assert_eq!(u.total, vec![146]);
        // Gone from the map next tick: the total keeps it.
        let u = t.update(&[e(1, &[131], C)], 20 + EXIT_GRACE_NS);
        assert_eq!(u.total, vec![147]);
        // A thread vanishing without an exit flag is retired too, never subtracted.
        let u = t.update(&[], 30 + EXIT_GRACE_NS);
        assert_eq!(u.total, vec![147]);
        assert!(u.threads.is_empty());
    }
}
