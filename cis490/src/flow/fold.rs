//! Folding the flow programs' per-tick entries into cumulative counts (pure).
//!
//! The kernel counts per (interface, tick) and per (flow, tick), per CPU; the collector
//! sums the CPUs, takes the entries whose tick it has drained, and hands them here. As for
//! the kvm source, an entry goes to the first drained tick at or after its epoch.

use std::collections::{HashMap, HashSet};

use cis490_common::flow::{FlowDelta, FlowDeltaKey, FlowIfKey, FlowIfStats, FlowKey};

/// Flows user space keeps; past it the least recently seen sixteenth is forgotten (a
/// forgotten flow that sends again starts a new series), counted in `flows_evicted`.
pub const MAX_TRACKED_FLOWS: usize = 1 << 16;
/// Distinct destination addresses (and ports) counted per interface; past it the count
/// stops growing and `distinct_saturated` says so.
pub const MAX_DISTINCT: usize = 1 << 16;

/// A flow as the `flows` rows show it: cumulative since it was first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRow {
    pub key: FlowKey,
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    pub packets_rev: u64,
    pub bytes_rev: u64,
    pub tcp_flags: u32,
    /// CLOCK_MONOTONIC.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
}

/// An interface as of one tick (the `flow` row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfTick {
    pub slot: u32,
    /// Cumulative since attach.
    pub totals: FlowIfStats,
    /// Flows with a packet in this tick.
    pub flows_active: u64,
    /// Distinct destination addresses and ports of the flows seen since attach (their
    /// first direction's).
    pub distinct_dst_addrs: u64,
    pub distinct_dst_ports: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickOut {
    pub seq: u64,
    pub ifs: Vec<IfTick>,
    /// This tick's changed flows: `changed[flows]`.
    pub flows: std::ops::Range<usize>,
}

#[derive(Debug)]
pub struct FlowFold {
    totals: Vec<FlowIfStats>,
    flows: HashMap<FlowKey, FlowRow>,
    max_flows: usize,
    dst_addrs: Vec<HashSet<([u8; 16], u8)>>,
    dst_ports: Vec<HashSet<u16>>,
    last_seq: Option<u64>,
    pub flows_evicted: u64,
    /// Flows the kernel created again after its LRU table forgot them.
    pub flows_reseen: u64,
    pub distinct_saturated: bool,
    pub late_entries: u64,
    /// Entries for an interface slot that is not watched (never expected).
    pub unknown_slots: u64,
    pub ticks: Vec<TickOut>,
    pub changed: Vec<FlowRow>,
}

/// Sum of the per-CPU values of one flow delta.
pub fn sum_deltas(values: impl IntoIterator<Item = FlowDelta>) -> FlowDelta {
    let mut s = FlowDelta::default();
    for v in values {
        s.packets_fwd += v.packets_fwd;
        s.bytes_fwd += v.bytes_fwd;
        s.packets_rev += v.packets_rev;
        s.bytes_rev += v.bytes_rev;
        if v.first_ns != 0 && (s.first_ns == 0 || v.first_ns < s.first_ns) {
            s.first_ns = v.first_ns;
        }
        s.last_ns = s.last_ns.max(v.last_ns);
        s.tcp_flags |= v.tcp_flags;
        s.created |= v.created;
    }
    s
}

/// Sum of the per-CPU values of one interface's counters.
pub fn sum_ifs(values: impl IntoIterator<Item = FlowIfStats>) -> FlowIfStats {
    let mut s = FlowIfStats::default();
    for v in values {
        add_if(&mut s, &v);
    }
    s
}

fn add_if(s: &mut FlowIfStats, v: &FlowIfStats) {
    s.rx_packets += v.rx_packets;
    s.rx_bytes += v.rx_bytes;
    s.tx_packets += v.tx_packets;
    s.tx_bytes += v.tx_bytes;
    s.tcp_packets += v.tcp_packets;
    s.udp_packets += v.udp_packets;
    s.icmp_packets += v.icmp_packets;
    s.other_packets += v.other_packets;
    s.tcp_syn += v.tcp_syn;
    s.tcp_synack += v.tcp_synack;
    s.tcp_rst += v.tcp_rst;
    s.tcp_fin += v.tcp_fin;
    s.flows_new += v.flows_new;
    s.dns_queries += v.dns_queries;
    s.dns_responses += v.dns_responses;
    s.untracked_packets += v.untracked_packets;
    s.dns_dropped += v.dns_dropped;
}

impl FlowFold {
    pub fn new(interfaces: usize) -> Self {
        Self::with_max_flows(interfaces, MAX_TRACKED_FLOWS)
    }

    pub fn with_max_flows(interfaces: usize, max_flows: usize) -> Self {
        Self {
            totals: vec![FlowIfStats::default(); interfaces],
            flows: HashMap::new(),
            max_flows: max_flows.max(16),
            dst_addrs: vec![HashSet::new(); interfaces],
            dst_ports: vec![HashSet::new(); interfaces],
            last_seq: None,
            flows_evicted: 0,
            flows_reseen: 0,
            distinct_saturated: false,
            late_entries: 0,
            unknown_slots: 0,
            ticks: Vec::new(),
            changed: Vec::new(),
        }
    }

    /// Forget the least recently seen sixteenth of the flows.
    fn evict(&mut self) {
        let mut seen: Vec<(u64, FlowKey)> = self
            .flows
            .values()
            .map(|f| (f.last_seen_ns, f.key))
            .collect();
        seen.sort_unstable();
        let n = (self.flows.len() / 16).max(1);
        for (_, k) in seen.into_iter().take(n) {
            self.flows.remove(&k);
            self.flows_evicted += 1;
        }
    }

    /// Fold the entries (all final for `tick_seqs`, which ascend; per-CPU values already
    /// summed) into the totals, filling `ticks` and `changed`.
    pub fn apply(
        &mut self,
        ifs: &mut [(FlowIfKey, FlowIfStats)],
        flows: &mut [(FlowDeltaKey, FlowDelta)],
        tick_seqs: &[u64],
    ) {
        self.ticks.clear();
        self.changed.clear();
        if tick_seqs.is_empty() {
            return;
        }
        let last = tick_seqs.len() - 1;
        let tick_of = |epoch: u64| tick_seqs.partition_point(|s| *s < epoch).min(last);
        if let Some(given) = self.last_seq {
            self.late_entries += ifs.iter().filter(|(k, _)| k.epoch <= given).count() as u64
                + flows.iter().filter(|(k, _)| k.epoch <= given).count() as u64;
        }
        ifs.sort_unstable_by_key(|(k, _)| (tick_of(k.epoch), k.ifslot));
        flows.sort_unstable_by_key(|(k, _)| (tick_of(k.epoch), k.flow));
        let (mut i, mut j) = (0, 0);
        let nifs = self.totals.len();
        for (t, seq) in tick_seqs.iter().enumerate() {
            while i < ifs.len() && tick_of(ifs[i].0.epoch) == t {
                let (k, v) = ifs[i];
                i += 1;
                match self.totals.get_mut(k.ifslot as usize) {
                    Some(total) => add_if(total, &v),
                    None => self.unknown_slots += 1,
                }
            }
            let start = self.changed.len();
            let mut active = vec![0u64; nifs];
            while j < flows.len() && tick_of(flows[j].0.epoch) == t {
                let (k, d) = flows[j];
                j += 1;
                let slot = usize::from(k.flow.ifslot);
                if slot >= nifs {
                    self.unknown_slots += 1;
                    continue;
                }
                if !self.flows.contains_key(&k.flow) {
                    if self.flows.len() >= self.max_flows {
                        self.evict();
                    }
                    if d.created == 0 {
                        // Known to the kernel, not (any more) here: evicted before.
                    } else if self.dst_addrs[slot].len() < MAX_DISTINCT
                        && self.dst_ports[slot].len() < MAX_DISTINCT
                    {
                        self.dst_addrs[slot].insert((k.flow.dst, k.flow.family));
                        self.dst_ports[slot].insert(k.flow.dport);
                    } else {
                        self.distinct_saturated = true;
                    }
                } else if d.created != 0 {
                    self.flows_reseen += 1;
                }
                let f = self.flows.entry(k.flow).or_insert(FlowRow {
                    key: k.flow,
                    packets_fwd: 0,
                    bytes_fwd: 0,
                    packets_rev: 0,
                    bytes_rev: 0,
                    tcp_flags: 0,
                    first_seen_ns: d.first_ns,
                    last_seen_ns: 0,
                });
                f.packets_fwd += d.packets_fwd;
                f.bytes_fwd += d.bytes_fwd;
                f.packets_rev += d.packets_rev;
                f.bytes_rev += d.bytes_rev;
                f.tcp_flags |= d.tcp_flags;
                f.last_seen_ns = f.last_seen_ns.max(d.last_ns);
                let row = *f;
                // Sorted by flow within the tick: a flow's entries of folded epochs are
                // adjacent, so one row per flow per tick.
                let in_tick = self.changed.len() > start;
                match self.changed.last_mut() {
                    Some(c) if in_tick && c.key == row.key => *c = row,
                    _ => {
                        self.changed.push(row);
                        active[slot] += 1;
                    }
                }
            }
            let ifs_out = (0..nifs)
                .map(|s| IfTick {
                    slot: s as u32,
                    totals: self.totals[s],
                    flows_active: active[s],
                    distinct_dst_addrs: self.dst_addrs[s].len() as u64,
                    distinct_dst_ports: self.dst_ports[s].len() as u64,
                })
                .collect();
            self.ticks.push(TickOut {
                seq: *seq,
                ifs: ifs_out,
                flows: start..self.changed.len(),
            });
        }
        self.last_seq = tick_seqs.last().copied().max(self.last_seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cis490_common::flow::FAMILY_IPV4;

    fn key(dst: u8, dport: u16, slot: u8) -> FlowKey {
        let mut k = FlowKey {
            sport: 40000,
            dport,
            proto: 17,
            family: FAMILY_IPV4,
            ifslot: slot,
            ..FlowKey::default()
        };
        k.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.dst[..4].copy_from_slice(&[10, 0, 0, dst]);
        k
    }

    fn delta(
        epoch: u64,
        k: FlowKey,
        fwd: u64,
        rev: u64,
        created: u32,
    ) -> (FlowDeltaKey, FlowDelta) {
        (
            FlowDeltaKey { flow: k, epoch },
            FlowDelta {
                packets_fwd: fwd,
                bytes_fwd: fwd * 100,
                packets_rev: rev,
                bytes_rev: rev * 60,
                first_ns: 1000 + epoch,
                last_ns: 2000 + epoch,
                tcp_flags: 0,
                created,
            },
        )
    }

    fn ifs(epoch: u64, slot: u32, rx: u64) -> (FlowIfKey, FlowIfStats) {
        (
            FlowIfKey {
                ifslot: slot,
                _pad: 0,
                epoch,
            },
            FlowIfStats {
                rx_packets: rx,
                udp_packets: rx,
                ..FlowIfStats::default()
            },
        )
    }

    #[test]
    fn per_cpu_values_sum_with_min_first_and_max_last() {
        let a = delta(1, key(2, 53, 0), 1, 0, 1).1;
        let mut b = delta(1, key(2, 53, 0), 0, 2, 0).1;
        b.first_ns = 5;
        b.last_ns = 99_999;
        b.tcp_flags = 0x12;
        let z = FlowDelta::default();
        let s = sum_deltas([a, z, b]);
        assert_eq!((s.packets_fwd, s.packets_rev), (1, 2));
        assert_eq!(
            (s.first_ns, s.last_ns, s.tcp_flags, s.created),
            (5, 99_999, 0x12, 1)
        );
        let t = sum_ifs([ifs(1, 0, 3).1, ifs(1, 0, 4).1]);
        assert_eq!((t.rx_packets, t.udp_packets), (7, 7));
    }

    #[test]
    fn ticks_get_their_own_packets_and_flows_accumulate() {
        let mut f = FlowFold::new(2);
        let k = key(2, 9999, 0);
        let mut i = vec![ifs(1, 0, 3), ifs(2, 0, 2), ifs(2, 1, 1)];
        let mut d = vec![
            delta(2, k, 1, 1, 0),
            delta(1, k, 2, 0, 1),
            delta(2, key(3, 80, 1), 1, 0, 1),
        ];
        f.apply(&mut i, &mut d, &[1, 2]);
        assert_eq!(f.ticks.len(), 2);
        let t1 = &f.ticks[0];
        assert_eq!(t1.ifs[0].totals.rx_packets, 3);
        assert_eq!(
            (t1.ifs[0].flows_active, t1.ifs[0].distinct_dst_addrs),
            (1, 1)
        );
        assert_eq!(f.changed[t1.flows.clone()][0].packets_fwd, 2);
        let t2 = &f.ticks[1];
        assert_eq!(t2.ifs[0].totals.rx_packets, 5);
        assert_eq!(t2.ifs[1].totals.rx_packets, 1);
        let c = &f.changed[t2.flows.clone()];
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].packets_fwd, c[0].packets_rev, c[0].bytes_fwd),
            (3, 1, 300)
        );
        assert_eq!(c[0].first_seen_ns, 1001);
        assert_eq!(c[0].last_seen_ns, 2002);
        assert_eq!(t2.ifs[1].distinct_dst_ports, 1);
        assert_eq!(f.late_entries, 0);
    }

    #[test]
    fn a_gap_folds_into_the_next_tick_as_one_row_per_flow() {
        let mut f = FlowFold::new(1);
        let k = key(2, 9999, 0);
        let mut d = vec![
            delta(4, k, 1, 0, 1),
            delta(5, k, 1, 0, 0),
            delta(6, k, 1, 0, 0),
        ];
        f.apply(&mut [], &mut d, &[6]);
        assert_eq!(f.changed.len(), 1);
        assert_eq!(f.changed[0].packets_fwd, 3);
        assert_eq!(f.ticks[0].ifs[0].flows_active, 1);
    }

    #[test]
    fn the_flow_table_is_bounded_and_evictions_are_counted() {
        let mut f = FlowFold::with_max_flows(1, 16);
        let mut d: Vec<_> = (0..40u16)
            .map(|p| delta(1, key(2, p, 0), 1, 0, 1))
            .collect();
        f.apply(&mut [], &mut d, &[1]);
        assert!(f.flows.len() <= 16, "{}", f.flows.len());
        assert!(f.flows_evicted >= 24, "{}", f.flows_evicted);
        // Every flow still got its row in the tick it changed.
        assert_eq!(f.changed.len(), 40);
        assert_eq!(f.ticks[0].ifs[0].distinct_dst_ports, 40);
    }

    #[test]
    fn a_flow_the_kernel_created_again_is_counted_as_reseen() {
        let mut f = FlowFold::new(1);
        let k = key(2, 1, 0);
        f.apply(&mut [], &mut [delta(1, k, 1, 0, 1)], &[1]);
        f.apply(&mut [], &mut [delta(2, k, 1, 0, 1)], &[2]);
        assert_eq!(f.flows_reseen, 1);
        assert_eq!(f.changed[0].packets_fwd, 2);
    }

    #[test]
    fn entries_of_an_unwatched_slot_are_counted_not_folded() {
        let mut f = FlowFold::new(1);
        f.apply(
            &mut [ifs(1, 5, 1)],
            &mut [delta(1, key(2, 1, 3), 1, 0, 1)],
            &[1],
        );
        assert_eq!(f.unknown_slots, 2);
        assert!(f.changed.is_empty());
    }
}
