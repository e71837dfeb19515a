//! The `net` source from the kernel snapshots (see [`crate::net`] for the stream and the
//! interface detection, which are not BPF).

use super::Part;
use crate::clock::EpisodeClock;
use crate::collector::TickOutput;
use crate::error::Error;
use crate::net::{net_row, summary, SOURCE};

/// `net` rows from the kernel snapshots (the programs count per CPU; the snapshot sums
/// the CPUs), one per interface per snapshot, on the snapshot's seq and stamp.
pub struct BpfNetCollector {
    names: Vec<String>,
}

impl BpfNetCollector {
    pub fn new(names: Vec<String>) -> Self {
        Self { names }
    }
}

impl Part for BpfNetCollector {
    fn stream(&self) -> crate::collector::Stream {
        crate::collector::Stream {
            source: SOURCE,
            available_in_deployment: true,
        }
    }
    fn fill(
        &mut self,
        drain: &super::snap::Drain,
        _clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
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
