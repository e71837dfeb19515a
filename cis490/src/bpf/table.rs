//! Per-thread bookkeeping shared by the `bpf-sched` and `bpf-io` rows (pure: no map
//! access).
//!
//! Each snapshot the collector hands the threads' counters to [`ThreadTable::update`].
//! The table keeps what was last reported per thread so that
//! - a thread's reported counters never decrease (each field is clamped to its last value),
//! - the process total never decreases when a thread ends: the final values of exited
//!   threads accumulate in `gone`, and a thread missing from one snapshot (its counters
//!   could not be read) keeps its last values in the total.
//!
//! It runs for every snapshot (1000 times a second at 1 kHz), so counters are fixed-size
//! arrays and the result is kept in buffers owned by the table: an update allocates
//! nothing once the set of threads is stable.

use std::collections::BTreeMap;

/// Room for the values of either stream (`bpf-sched` has the most, 13).
pub const MAX_WIDTH: usize = 16;

/// A counter the kernel does not keep on this machine (e.g. wakeups without
/// CONFIG_SCHEDSTATS); written as null, and a total with it is null too.
pub const UNAVAILABLE: u64 = u64::MAX;

/// One thread's counters in the stream's column order; slots past its width are 0.
pub type Values = [u64; MAX_WIDTH];

/// One thread in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub tid: u32,
    pub values: Values,
    /// Its last snapshot: it has exited.
    pub exited: bool,
}

/// What one update decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// (tid, reported counters) of every thread in this snapshot, in snapshot order.
    pub threads: Vec<(u32, Values)>,
    /// Process total: every thread seen since attach, exited ones with their last values.
    pub total: Values,
}

#[derive(Debug, Default)]
pub struct ThreadTable {
    threads: BTreeMap<u32, Values>,
    gone: Values,
    out: Update,
    /// Bit i set: column i is a gauge (a state letter, a CPU number), reported as read,
    /// never clamped, and not summed: its total is UNAVAILABLE (the caller decides).
    gauges: u32,
}

fn add(into: &mut Values, v: &Values) {
    for (s, x) in into.iter_mut().zip(v) {
        // UNAVAILABLE is u64::MAX: saturating keeps it so.
        *s = s.saturating_add(*x);
    }
}

impl ThreadTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table whose columns in `gauges` (bit i = column i) are gauges, not counters.
    pub fn with_gauges(gauges: u32) -> Self {
        Self {
            gauges,
            ..Self::default()
        }
    }

    /// `entries`: one snapshot's threads. The result stays valid until the next update.
    pub fn update(&mut self, entries: &[Entry]) -> &Update {
        let out = &mut self.out;
        out.threads.clear();
        for e in entries {
            let t = self.threads.entry(e.tid).or_insert([0; MAX_WIDTH]);
            for (i, (r, v)) in t.iter_mut().zip(&e.values).enumerate() {
                *r = if self.gauges & (1 << i) != 0 {
                    *v
                } else {
                    (*r).max(*v)
                };
            }
            out.threads.push((e.tid, *t));
            if e.exited {
                add(&mut self.gone, t);
                self.threads.remove(&e.tid);
            }
        }
        out.total = self.gone;
        for t in self.threads.values() {
            add(&mut out.total, t);
        }
        for (i, v) in out.total.iter_mut().enumerate() {
            if self.gauges & (1 << i) != 0 {
                *v = UNAVAILABLE;
            }
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
    fn e(tid: u32, x: &[u64], exited: bool) -> Entry {
        Entry {
            tid,
            values: v(x),
            exited,
        }
    }

    #[test]
    fn rows_per_thread_and_total() {
        let mut t = ThreadTable::new();
        let u = t.update(&[e(10, &[100, 1], false), e(11, &[50, 2], false)]);
        assert_eq!(u.threads, vec![(10, v(&[100, 1])), (11, v(&[50, 2]))]);
        assert_eq!(u.total, v(&[150, 3]));
    }

    #[test]
    fn counters_never_go_back_and_exited_threads_stay_in_total() {
        let mut t = ThreadTable::new();
        t.update(&[e(1, &[120], false), e(2, &[10], false)]);
        // A smaller value never lowers a row.
        let u = t.update(&[e(1, &[110], false), e(2, &[10], false)]);
        assert_eq!(u.threads[0], (1, v(&[120])));
        // Thread 2's last snapshot: reported, then kept in the total only.
        let u = t.update(&[e(1, &[130], false), e(2, &[16], true)]);
        assert_eq!(u.threads, vec![(1, v(&[130])), (2, v(&[16]))]);
        assert_eq!(u.total, v(&[146]));
        let u = t.update(&[e(1, &[131], false)]);
        assert_eq!(u.threads, vec![(1, v(&[131]))]);
        assert_eq!(u.total, v(&[147]));
        // Thread 1 missing from one snapshot: no row, but its values stay in the total.
        let u = t.update(&[]);
        assert!(u.threads.is_empty());
        assert_eq!(u.total, v(&[131 + 16]));
        // A new thread reusing tid 2 starts from its own values.
        let u = t.update(&[e(2, &[3], false)]);
        assert_eq!(u.threads, vec![(2, v(&[3]))]);
        assert_eq!(u.total, v(&[131 + 16 + 3]));
    }

    #[test]
    fn an_unavailable_counter_stays_unavailable_in_the_total() {
        let mut t = ThreadTable::new();
        let u = t.update(&[
            e(1, &[5, UNAVAILABLE], false),
            e(2, &[6, UNAVAILABLE], false),
        ]);
        assert_eq!(u.total, v(&[11, UNAVAILABLE]));
    }

    #[test]
    fn gauges_follow_the_kernel_both_ways_and_have_no_total() {
        let mut t = ThreadTable::with_gauges(0b10);
        t.update(&[e(1, &[10, 3], false), e(2, &[5, 1], false)]);
        let u = t.update(&[e(1, &[9, 0], false), e(2, &[6, 1], false)]);
        assert_eq!(
            u.threads[0],
            (1, v(&[10, 0])),
            "counter clamped, gauge as read"
        );
        assert_eq!(u.total, v(&[16, UNAVAILABLE]));
    }
}
