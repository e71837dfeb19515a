//! The `flow` and `flows` sources: the flow programs' per-tick tables read after each drain
//! of the snapshots and folded onto the drained ticks (see [`crate::flow::fold`]). Two parts of
//! the snapshot source, in this order: `flow`, then `flows`, which writes out `flow`'s fold.

use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use aya::Pod;
use cis490_common::flow::{FlowIfKey, FlowIfSlot, FlowIfStats, FLOW_IF_RING};

use super::error::BpfError;
use super::loader::FlowMaps;
use super::Part;
use super::ProgramsStatus;
use crate::clock::{EpisodeClock, Stamp};
use crate::collector::TickOutput;
use crate::error::Error;
use crate::flow::fold::{sum_deltas, sum_ifs, FlowFold};
use crate::flow::{self as f};

struct Shared {
    fold: FlowFold,
    /// (episode seq, stamp) of each tick in `fold.ticks`.
    stamps: Vec<(u64, Stamp)>,
    gaps: Vec<(u64, u64)>,
}

/// The streams' parts of the snapshot source (`flow` first: `flows` writes its fold;
/// then `dns` when its ring is there).
pub(crate) fn parts(names: Vec<String>, maps: Result<FlowMaps, String>) -> Vec<Box<dyn Part>> {
    let (maps, dns) = match maps {
        Ok(m) => {
            let FlowMaps { deltas, ifs, dns } = m;
            (Ok((deltas, ifs)), Some(dns))
        }
        Err(e) => (Err(e), None),
    };
    let shared = Arc::new(Mutex::new(Shared {
        fold: FlowFold::new(names.len()),
        stamps: Vec::new(),
        gaps: Vec::new(),
    }));
    let (status, maps) = ProgramsStatus::of(maps);
    let mut out: Vec<Box<dyn Part>> = vec![
        Box::new(FlowCollector {
            names: names.clone(),
            maps,
            status: status.clone(),
            shared: shared.clone(),
            untracked_reported: 0,
            evicted_reported: 0,
            if_taken: None,
        }),
        Box::new(FlowsCollector {
            names: names.clone(),
            status,
            shared,
        }),
    ];
    if let Some(ring) = dns {
        out.push(Box::new(super::dns::DnsCollector::new(names, ring)));
    }
    out
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Move the per-CPU entries of ticks up to kernel seq `last` from `map` to `out`, summed.
fn take_final<K: Pod + Copy, V: Pod + Copy>(
    map: &mut PerCpuHashMap<MapData, K, V>,
    epoch: impl Fn(&K) -> u64,
    sum: impl Fn(&[V]) -> V,
    last: u64,
    out: &mut Vec<(K, V)>,
) -> Result<(), BpfError> {
    out.clear();
    for item in map.iter() {
        let (key, values) =
            item.map_err(|e| BpfError::Map(format!("reading a flow table: {e}")))?;
        if epoch(&key) <= last {
            out.push((key, sum(&values)));
        }
    }
    for i in 0..out.len() {
        if let Err(e) = map.remove(&out[i].0) {
            out.truncate(i);
            return Err(BpfError::Map(format!("removing a flow table entry: {e}")));
        }
    }
    Ok(())
}

/// The two per-tick tables of the flow programs.
type Tables = (
    PerCpuHashMap<MapData, cis490_common::flow::FlowDeltaKey, cis490_common::flow::FlowDelta>,
    PerCpuArray<MapData, cis490_common::flow::FlowIfSlot>,
);

/// Take the per-interface counters of the ticks after `taken` up to kernel seq `last`
/// from the ring (`FLOW_IF_TICKS`, per CPU: an entry holds the tick it says; one of
/// another tick was reset or not written, and counts nothing for this one).
fn take_if_ticks(
    ring: &PerCpuArray<MapData, FlowIfSlot>,
    slots: usize,
    taken: &mut Option<u64>,
    last: u64,
    out: &mut Vec<(FlowIfKey, FlowIfStats)>,
) -> Result<(), BpfError> {
    let n = u64::from(FLOW_IF_RING);
    let from = match *taken {
        Some(t) => t + 1,
        None => 0,
    }
    // Older than the ring: overwritten since.
    .max((last + 1).saturating_sub(n));
    for epoch in from..=last {
        for slot in 0..slots {
            let idx = slot as u32 * FLOW_IF_RING + (epoch % n) as u32;
            let values = ring
                .get(&idx, 0)
                .map_err(|e| BpfError::Map(format!("reading map FLOW_IF_TICKS: {e}")))?;
            let mine = values.iter().filter(|v| v.epoch == epoch).map(|v| v.stats);
            let sum = sum_ifs(mine);
            if sum != FlowIfStats::default() {
                out.push((
                    FlowIfKey {
                        ifslot: slot as u32,
                        _pad: 0,
                        epoch,
                    },
                    sum,
                ));
            }
        }
    }
    *taken = Some(last.max(taken.unwrap_or(0)));
    Ok(())
}

pub struct FlowCollector {
    names: Vec<String>,
    maps: Option<Tables>,
    status: ProgramsStatus,
    shared: Arc<Mutex<Shared>>,
    untracked_reported: u64,
    evicted_reported: u64,
    /// The latest tick whose per-interface counters were taken from the ring.
    if_taken: Option<u64>,
}

impl Part for FlowCollector {
    fn stream(&self) -> crate::collector::Stream {
        crate::collector::Stream {
            source: f::SOURCE,
            available_in_deployment: true,
        }
    }
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = self.status.summary("bpf_tc");
        m.insert("interfaces".into(), self.names.clone().into());
        if self.maps.is_some() {
            let s = lock(&self.shared);
            let fold = &s.fold;
            m.insert(
                "flow_table_entries".into(),
                cis490_common::flow::MAX_FLOW_DELTAS.into(),
            );
            m.insert("flows_evicted".into(), fold.flows_evicted.into());
            m.insert("flows_reseen".into(), fold.flows_reseen.into());
            m.insert("distinct_saturated".into(), fold.distinct_saturated.into());
            m.insert("late_entries".into(), fold.late_entries.into());
            m.insert("untracked_packets".into(), self.untracked_reported.into());
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
        let mut guard = lock(&self.shared);
        let shared = &mut *guard;
        shared.stamps.clear();
        shared.gaps.clear();
        shared.gaps.extend_from_slice(&batch.gaps);
        shared.fold.ticks.clear();
        shared.fold.changed.clear();
        let Some(maps) = &mut self.maps else {
            return Ok(());
        };
        let Some(last) = batch.ticks.last().map(|t| t.kernel_seq) else {
            return Ok(());
        };
        let (deltas, if_ring) = maps;
        let mut ifs = Vec::new();
        if let Err(e) = take_if_ticks(
            if_ring,
            self.names.len(),
            &mut self.if_taken,
            last,
            &mut ifs,
        ) {
            out.problem(e.to_string());
        }
        let mut flows = Vec::new();
        if let Err(e) = take_final(
            deltas,
            |k| k.epoch,
            |v| sum_deltas(v.iter().copied()),
            last,
            &mut flows,
        ) {
            out.problem(e.to_string());
        }
        let seqs: Vec<u64> = batch.ticks.iter().map(|t| t.kernel_seq).collect();
        shared.fold.apply(&mut ifs, &mut flows, &seqs);
        shared
            .stamps
            .extend(batch.ticks.iter().map(|t| (t.seq, t.stamp)));
        for (t, (seq, stamp)) in shared.fold.ticks.iter().zip(&shared.stamps) {
            for i in &t.ifs {
                let Some(name) = self.names.get(i.slot as usize) else {
                    continue;
                };
                let c = &i.totals;
                let row = out.new_row(*stamp, f::SOURCE, true);
                row.seq = Some(*seq);
                row.push("ifname", name.as_str())
                    .push("rx_packets", c.rx_packets)
                    .push("rx_bytes", c.rx_bytes)
                    .push("tx_packets", c.tx_packets)
                    .push("tx_bytes", c.tx_bytes)
                    .push("tcp_packets", c.tcp_packets)
                    .push("udp_packets", c.udp_packets)
                    .push("icmp_packets", c.icmp_packets)
                    .push("other_packets", c.other_packets)
                    .push("tcp_syn", c.tcp_syn)
                    .push("tcp_synack", c.tcp_synack)
                    .push("tcp_rst", c.tcp_rst)
                    .push("tcp_fin", c.tcp_fin)
                    .push("flows_new", c.flows_new)
                    .push("flows_active", i.flows_active)
                    .push("distinct_dst_addrs", i.distinct_dst_addrs)
                    .push("distinct_dst_ports", i.distinct_dst_ports)
                    .push("dns_queries", c.dns_queries)
                    .push("dns_responses", c.dns_responses)
                    .push("untracked_packets", c.untracked_packets)
                    .push("dns_dropped", c.dns_dropped);
            }
        }
        let untracked: u64 = shared.fold.ticks.last().map_or(0, |t| {
            t.ifs.iter().map(|i| i.totals.untracked_packets).sum()
        });
        if untracked > self.untracked_reported {
            out.problem(format!(
                "flow table full ({} entries): {} packets counted on their interface but in no flow ({untracked} since attach)",
                cis490_common::flow::MAX_FLOW_DELTAS,
                untracked - self.untracked_reported
            ));
            self.untracked_reported = untracked;
        }
        let evicted = shared.fold.flows_evicted;
        if evicted > self.evicted_reported {
            out.problem(format!(
                "{} flows forgotten to keep the table at {} (the least recently seen; {evicted} since attach)",
                evicted - self.evicted_reported,
                crate::flow::fold::MAX_TRACKED_FLOWS
            ));
            self.evicted_reported = evicted;
        }
        Ok(())
    }
}

pub struct FlowsCollector {
    names: Vec<String>,
    status: ProgramsStatus,
    shared: Arc<Mutex<Shared>>,
}

impl Part for FlowsCollector {
    fn stream(&self) -> crate::collector::Stream {
        crate::collector::Stream {
            source: f::FLOWS_SOURCE,
            available_in_deployment: true,
        }
    }
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        self.status.summary("bpf_tc")
    }
    fn fill(
        &mut self,
        _drain: &super::snap::Drain,
        clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        let shared = lock(&self.shared);
        out.gaps.extend_from_slice(&shared.gaps);
        for (t, (seq, stamp)) in shared.fold.ticks.iter().zip(&shared.stamps) {
            for fl in &shared.fold.changed[t.flows.clone()] {
                let Some(name) = self.names.get(usize::from(fl.key.ifslot)) else {
                    continue;
                };
                let (src, dst) = f::addrs(&fl.key);
                let row = out.new_row(*stamp, f::FLOWS_SOURCE, true);
                row.seq = Some(*seq);
                row.push("ifname", name.as_str())
                    .push("proto", f::proto_name(fl.key.proto))
                    .push("src_addr", src)
                    .push("dst_addr", dst)
                    .push("src_port", u64::from(fl.key.sport))
                    .push("dst_port", u64::from(fl.key.dport))
                    .push("packets_fwd", fl.packets_fwd)
                    .push("bytes_fwd", fl.bytes_fwd)
                    .push("packets_rev", fl.packets_rev)
                    .push("bytes_rev", fl.bytes_rev)
                    .push("tcp_flags", u64::from(fl.tcp_flags))
                    .push("first_seen_ns", clock.rel(fl.first_seen_ns))
                    .push("last_seen_ns", clock.rel(fl.last_seen_ns));
            }
        }
        Ok(())
    }
}
