//! The `net` source from the kernel snapshots (see [`crate::net`] for the stream and the
//! interface detection, which are not BPF).

use std::sync::Arc;

use super::Session;
use crate::clock::EpisodeClock;
use crate::collector::{Collector, Tick, TickOutput};
use crate::error::Error;
use crate::net::{net_row, summary, SOURCE};

/// `net` rows from the kernel snapshots (the programs count per CPU; the snapshot sums
/// the CPUs), one per interface per snapshot, on the snapshot's seq and stamp.
pub struct BpfNetCollector {
    names: Vec<String>,
    session: Arc<Session>,
}

impl BpfNetCollector {
    pub fn new(names: Vec<String>, session: Arc<Session>) -> Self {
        Self { names, session }
    }
}

impl Collector for BpfNetCollector {
    fn source(&self) -> &'static str {
        SOURCE
    }
    fn available_in_deployment(&self) -> bool {
        true
    }
    fn kernel_clocked(&self) -> bool {
        true
    }
    fn collect(
        &mut self,
        _tick: Tick,
        _clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        // The batch the bpf-sched collector drained this host tick.
        let drain = self.session.lock_drain();
        let batch = &drain.asm.batch;
        out.gaps.extend_from_slice(&batch.gaps);
        for tick in &batch.ticks {
            let recs = &batch.nets[tick.nets.0..tick.nets.1];
            for (slot, name) in self.names.iter().enumerate() {
                let stats = recs
                    .iter()
                    .find(|r| r.slot as usize == slot)
                    .map(|r| r.stats);
                if stats.is_none() {
                    out.problem(format!("snapshot {} has no counters for {name}", tick.seq));
                }
                out.row(net_row(tick.stamp, tick.seq, name, stats));
            }
        }
        Ok(())
    }
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        summary("bpf", "attach", &self.names)
    }
}
