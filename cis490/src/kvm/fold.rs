//! Folding the kernel's per-tick entries into cumulative counts.
//!
//! The kernel counts under (thread, epoch, kind, key), where the epoch is the seq of the
//! snapshot tick the event belongs to (cis490-ebpf/src/kvm.rs). User space takes the
//! entries whose tick it has drained, gives each to the first drained tick at or after
//! its epoch (a tick that never came, a gap, hands its events to the next one), and
//! keeps per-thread totals by kind and per-key totals since attach.

use std::collections::{BTreeMap, HashMap};

use cis490_common::{KvmKey, KVM_KEY_OTHER, KVM_KINDS};

/// Per-kind totals of one thread, indexed by kernel kind code.
pub type KindCounts = [u64; KVM_KINDS as usize];

/// One key whose count changed in a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyChange {
    pub tid: u32,
    /// Kernel kind code.
    pub kind: u32,
    /// None: counts whose own key found the kernel's table full.
    pub key: Option<u64>,
    /// Since attach.
    pub count: u64,
}

/// The key changes of one drained tick: `changes[range]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickChanges {
    pub seq: u64,
    pub range: std::ops::Range<usize>,
    /// Totals of every thread as of this tick (the `kvm` rows).
    pub threads: Vec<(u32, KindCounts)>,
}

/// Distinct (thread, kind, key) totals user space keeps. The guest chooses the keys (any
/// CPUID leaf, MSR index, port or page), so a hostile one could otherwise grow this table
/// for as long as the capture runs; past the bound a new key's exits go to the kind's
/// overflow key, as in the kernel.
pub const MAX_TRACKED_KEYS: usize = 1 << 16;

#[derive(Debug)]
pub struct Fold {
    threads: BTreeMap<u32, KindCounts>,
    keys: HashMap<(u32, u32, u64), u64>,
    max_keys: usize,
    /// The highest tick given out so far.
    last_seq: Option<u64>,
    /// Exits of a keyed kind counted under its overflow key (their key is lost, the kind
    /// total is not): the `kvm-keys` rows with key null.
    pub overflow_events: u64,
    /// Entries whose tick had been given out already (an event that raced its snapshot),
    /// counted in the next tick instead.
    pub late_entries: u64,
    /// Entries of a kind code this build does not know (never expected).
    pub unknown_kinds: u64,
    /// This batch's output.
    pub changes: Vec<KeyChange>,
    pub ticks: Vec<TickChanges>,
}

impl Default for Fold {
    fn default() -> Self {
        Self::with_max_keys(MAX_TRACKED_KEYS)
    }
}

impl Fold {
    pub fn with_max_keys(max_keys: usize) -> Self {
        Self {
            threads: BTreeMap::new(),
            keys: HashMap::new(),
            max_keys,
            last_seq: None,
            overflow_events: 0,
            late_entries: 0,
            unknown_kinds: 0,
            changes: Vec::new(),
            ticks: Vec::new(),
        }
    }

    /// Which entries are final for a batch whose highest tick is `last_tick`.
    pub fn is_final(entry: &KvmKey, last_tick: u64) -> bool {
        entry.epoch <= last_tick
    }

    /// Fold `entries` (all final for `tick_seqs`, which ascend) into the totals; fills
    /// `changes` and `ticks` with one [`TickChanges`] per tick of `tick_seqs`.
    pub fn apply(&mut self, entries: &mut [(KvmKey, u64)], tick_seqs: &[u64]) {
        self.changes.clear();
        self.ticks.clear();
        if tick_seqs.is_empty() {
            return;
        }
        let last = tick_seqs.len() - 1;
        let tick_of = |epoch: u64| tick_seqs.partition_point(|s| *s < epoch).min(last);
        if let Some(given) = self.last_seq {
            self.late_entries += entries.iter().filter(|(k, _)| k.epoch <= given).count() as u64;
        }
        // Tick, then thread, kind, key: one change row per key per tick, in that order.
        entries.sort_unstable_by_key(|(k, _)| (tick_of(k.epoch), k.tid, k.kind, k.key));
        let mut i = 0;
        let mut this_tick: HashMap<(u32, u32, Option<u64>), usize> = HashMap::new();
        for (t, seq) in tick_seqs.iter().enumerate() {
            let start = self.changes.len();
            this_tick.clear();
            while i < entries.len() && tick_of(entries[i].0.epoch) == t {
                let (k, n) = entries[i];
                i += 1;
                let slot = k.kind as usize;
                if slot == 0 || slot >= KVM_KINDS as usize {
                    self.unknown_kinds += 1;
                    continue;
                }
                self.threads.entry(k.tid).or_insert([0; KVM_KINDS as usize])[slot] += n;
                let mut k = k;
                if k.key != KVM_KEY_OTHER
                    && self.keys.len() >= self.max_keys
                    && !self.keys.contains_key(&(k.tid, k.kind, k.key))
                {
                    k.key = KVM_KEY_OTHER;
                }
                // A keyless kind (emulated instructions, wake-ups) loses nothing there.
                if k.key == KVM_KEY_OTHER
                    && super::kind_of(k.kind).is_some_and(|c| c.key_kind.is_some())
                {
                    self.overflow_events += n;
                }
                let total = self.keys.entry((k.tid, k.kind, k.key)).or_insert(0);
                *total += n;
                let key = (k.key != KVM_KEY_OTHER).then_some(k.key);
                // One change per key per tick (keys folded into the overflow key need
                // not be adjacent in the sort order).
                match this_tick.get(&(k.tid, k.kind, key)) {
                    Some(&at) => self.changes[at].count = *total,
                    None => {
                        this_tick.insert((k.tid, k.kind, key), self.changes.len());
                        self.changes.push(KeyChange {
                            tid: k.tid,
                            kind: k.kind,
                            key,
                            count: *total,
                        });
                    }
                }
            }
            self.ticks.push(TickChanges {
                seq: *seq,
                range: start..self.changes.len(),
                threads: self.threads.iter().map(|(t, c)| (*t, *c)).collect(),
            });
        }
        self.last_seq = tick_seqs.last().copied().max(self.last_seq);
    }

    /// Add a thread with no event yet (a vCPU thread QMP named): it gets rows of zeros.
    pub fn know_thread(&mut self, tid: u32) {
        self.threads.entry(tid).or_insert([0; KVM_KINDS as usize]);
    }
}

/// The process row's totals: every thread's, summed.
pub fn process_total(threads: &[(u32, KindCounts)]) -> KindCounts {
    let mut total = [0; KVM_KINDS as usize];
    for (_, c) in threads {
        for (t, v) in total.iter_mut().zip(c) {
            *t += v;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use cis490_common::{KVM_CPUID, KVM_MSR_READ, KVM_PIO_WRITE};

    fn e(tid: u32, epoch: u64, kind: u32, key: u64, n: u64) -> (KvmKey, u64) {
        (
            KvmKey {
                tid,
                kind,
                epoch,
                key,
            },
            n,
        )
    }

    #[test]
    fn each_tick_gets_exactly_its_own_events_and_totals_accumulate() {
        let mut f = Fold::default();
        let mut batch = vec![
            e(7, 1, KVM_PIO_WRITE, 0x510, 3),
            // Counted before the first snapshot ran (epoch 0): the first tick's.
            e(7, 0, KVM_PIO_WRITE, 0x510, 2),
            e(7, 2, KVM_PIO_WRITE, 0x510, 5),
            e(7, 2, KVM_CPUID, 0x4000_0000, 1),
            e(9, 2, KVM_MSR_READ, 0x10, 4),
        ];
        f.apply(&mut batch, &[1, 2]);
        assert_eq!(f.ticks.len(), 2);
        assert_eq!(f.ticks[0].seq, 1);
        // Tick 1 takes epochs 0 and 1 of the same key as one change.
        let t1 = &f.changes[f.ticks[0].range.clone()];
        assert_eq!(
            t1,
            &[KeyChange {
                tid: 7,
                kind: KVM_PIO_WRITE,
                key: Some(0x510),
                count: 5
            }]
        );
        let t2 = &f.changes[f.ticks[1].range.clone()];
        assert_eq!(t2.len(), 3);
        assert_eq!((t2[0].kind, t2[0].count), (KVM_PIO_WRITE, 10));
        assert_eq!((t2[1].kind, t2[1].key), (KVM_CPUID, Some(0x4000_0000)));
        assert_eq!((t2[2].tid, t2[2].count), (9, 4));
        // Thread totals as of each tick; thread 9 first appears in tick 2.
        assert_eq!(f.ticks[0].threads.len(), 1);
        assert_eq!(f.ticks[0].threads[0].1[KVM_PIO_WRITE as usize], 5);
        let total = process_total(&f.ticks[1].threads);
        assert_eq!(total[KVM_PIO_WRITE as usize], 10);
        assert_eq!(total[KVM_CPUID as usize], 1);
        assert_eq!(total[KVM_MSR_READ as usize], 4);
        assert_eq!(f.late_entries, 0);
    }

    #[test]
    fn a_gap_hands_its_events_to_the_next_tick_and_late_entries_are_kept() {
        let mut f = Fold::default();
        f.apply(&mut [e(1, 5, KVM_CPUID, 1, 1)], &[5]);
        // Tick 6 never came (a gap); its events go to tick 7. An entry of tick 5, seen
        // only now, is late: counted in tick 7, not lost.
        let mut batch = vec![
            e(1, 6, KVM_CPUID, 1, 2),
            e(1, 7, KVM_CPUID, 1, 4),
            e(1, 5, KVM_CPUID, 1, 8),
        ];
        f.apply(&mut batch, &[7]);
        assert_eq!(f.ticks.len(), 1);
        assert_eq!(f.changes[f.ticks[0].range.clone()][0].count, 15);
        assert_eq!(f.late_entries, 1);
    }

    #[test]
    fn overflow_keys_keep_the_kind_total_and_have_no_key() {
        let mut f = Fold::default();
        let mut batch = vec![
            e(1, 1, KVM_PIO_WRITE, 0x80, 1),
            e(1, 1, KVM_PIO_WRITE, KVM_KEY_OTHER, 6),
        ];
        f.apply(&mut batch, &[1]);
        assert_eq!(f.ticks[0].threads[0].1[KVM_PIO_WRITE as usize], 7);
        assert_eq!(f.overflow_events, 6);
        let c = &f.changes[f.ticks[0].range.clone()];
        assert_eq!(c[1].key, None);
        assert_eq!(c[1].count, 6);
    }

    #[test]
    fn user_space_keeps_a_bounded_number_of_keys() {
        // A guest that probes ever new keys: past the bound they share the overflow key,
        // and the kind's total stays exact.
        let mut f = Fold::with_max_keys(3);
        let mut batch: Vec<_> = (0..10).map(|leaf| e(1, 1, KVM_CPUID, leaf, 1)).collect();
        f.apply(&mut batch, &[1]);
        let c = &f.changes[f.ticks[0].range.clone()];
        assert_eq!(c.len(), 4, "{c:?}");
        assert_eq!(
            c[3],
            KeyChange {
                tid: 1,
                kind: KVM_CPUID,
                key: None,
                count: 7
            }
        );
        assert_eq!(f.overflow_events, 7);
        assert_eq!(f.ticks[0].threads[0].1[KVM_CPUID as usize], 10);
        // Keys it already has keep counting as themselves.
        f.apply(
            &mut [e(1, 2, KVM_CPUID, 0, 5), e(1, 2, KVM_CPUID, 99, 1)],
            &[2],
        );
        let c = &f.changes[f.ticks[0].range.clone()];
        assert_eq!((c[0].key, c[0].count), (Some(0), 6));
        assert_eq!((c[1].key, c[1].count), (None, 8));
    }

    #[test]
    fn unknown_kinds_are_counted_not_folded_and_empty_batches_give_nothing() {
        let mut f = Fold::default();
        f.apply(&mut [e(1, 1, 0, 0, 1), e(1, 1, 99, 0, 1)], &[1]);
        assert_eq!(f.unknown_kinds, 2);
        assert!(f.changes.is_empty());
        assert!(f.ticks[0].threads.is_empty());
        f.apply(&mut [], &[]);
        assert!(f.ticks.is_empty());
    }

    #[test]
    fn known_threads_without_events_get_zero_rows() {
        let mut f = Fold::default();
        f.know_thread(42);
        f.apply(&mut [], &[3]);
        assert_eq!(f.ticks[0].threads, vec![(42, [0; KVM_KINDS as usize])]);
    }
}
