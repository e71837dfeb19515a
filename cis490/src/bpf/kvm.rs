//! The `kvm` and `kvm-keys` sources: the kvm programs' per-tick counts (map `KVM_COUNTS`)
//! read after each drain of the snapshots and folded onto the drained ticks (see
//! [`crate::kvm::fold`]). Two parts of the snapshot source, in this order: `kvm`, then
//! `kvm-keys`, which writes out `kvm`'s fold.

use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{HashMap, IterableMap, MapData, PerCpuArray};
use cis490_common::KvmKey;

use super::error::BpfError;
use super::loader::KvmMaps;
use super::Part;
use super::{Comms, ProgramsStatus};
use crate::clock::{self, EpisodeClock, Stamp};
use crate::collector::{TickOutput, VcpuMap};
use crate::error::Error;
use crate::kvm::fold::{process_total, Fold};
use crate::kvm::names::ExitIsa;
use crate::kvm::{self as k, KINDS};

/// What the two collectors share: the fold, and the stamps of its latest ticks.
#[derive(Default)]
struct Shared {
    fold: Fold,
    /// (episode seq, stamp) of each tick in `fold.ticks`.
    stamps: Vec<(u64, Stamp)>,
    /// The drain's gaps (snapshots that never came), declared for kvm-keys too.
    gaps: Vec<(u64, u64)>,
    /// Thread names as the kvm rows have them, for the kvm-keys rows.
    names: std::collections::HashMap<u32, Arc<str>>,
}

/// The two streams' parts of the snapshot source (`kvm` first: `kvm-keys` writes its fold).
pub(crate) fn parts(
    pid: u32,
    vcpus: &VcpuMap,
    maps: Result<KvmMaps, String>,
) -> Vec<Box<dyn Part>> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let isa = k::exit_isa(std::path::Path::new("/sys/module"));
    let (status, maps) = ProgramsStatus::of(maps);
    vec![
        Box::new(KvmCollector {
            pid,
            maps,
            status: status.clone(),
            isa: isa.clone(),
            shared: shared.clone(),
            comms: Comms::new(pid),
            vcpus: vcpus.clone(),
            entries: Vec::new(),
            lost_reported: 0,
            overflow_reported: 0,
        }),
        Box::new(KvmKeysCollector {
            status,
            isa,
            shared,
            vcpus: vcpus.clone(),
        }),
    ]
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct KvmCollector {
    pid: u32,
    maps: Option<KvmMaps>,
    status: ProgramsStatus,
    isa: Result<ExitIsa, String>,
    shared: Arc<Mutex<Shared>>,
    comms: Comms,
    vcpus: VcpuMap,
    entries: Vec<(KvmKey, u64)>,
    lost_reported: u64,
    overflow_reported: u64,
}

/// Move the entries of ticks up to kernel seq `last` from `map` to `out`.
fn take_final(
    map: &mut HashMap<MapData, KvmKey, u64>,
    last: u64,
    out: &mut Vec<(KvmKey, u64)>,
) -> Result<(), BpfError> {
    let from = out.len();
    for item in map.iter() {
        let (key, n) = item.map_err(|e| BpfError::Map(format!("reading a kvm table: {e}")))?;
        if Fold::is_final(&key, last) {
            out.push((key, n));
        }
    }
    for i in from..out.len() {
        if let Err(e) = map.remove(&out[i].0) {
            // Not removed: counted in a later drain instead of now.
            out.truncate(i);
            return Err(BpfError::Map(format!("removing a kvm table entry: {e}")));
        }
    }
    Ok(())
}

fn lost_events(lost: &PerCpuArray<MapData, u64>) -> Option<u64> {
    lost.get(&0, 0).ok().map(|v| v.iter().sum())
}

impl Part for KvmCollector {
    fn stream(&self) -> crate::collector::Stream {
        crate::collector::Stream {
            source: k::SOURCE,
            available_in_deployment: false,
        }
    }
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = self.status.summary("bpf_tracepoints");
        m.insert(
            "exits".into(),
            match &self.isa {
                Ok(ExitIsa::Vmx) => "kvm_exit (vmx reasons)".into(),
                Ok(ExitIsa::Svm) => "kvm_exit (svm exit codes)".into(),
                Err(why) => format!("null: {why}").into(),
            },
        );
        if let Some(maps) = &self.maps {
            let s = lock(&self.shared);
            m.insert(
                "key_table_entries".into(),
                maps.counts
                    .map()
                    .info()
                    .map_or(serde_json::Value::Null, |i| i.max_entries().into()),
            );
            m.insert("overflow_events".into(), s.fold.overflow_events.into());
            m.insert(
                "lost_events".into(),
                lost_events(&maps.lost).map_or(serde_json::Value::Null, Into::into),
            );
            m.insert("late_entries".into(), s.fold.late_entries.into());
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
        let mut shared = lock(&self.shared);
        let shared = &mut *shared;
        shared.stamps.clear();
        shared.fold.ticks.clear();
        shared.fold.changes.clear();
        shared.gaps.clear();
        shared.gaps.extend_from_slice(&batch.gaps);
        let Some(maps) = &mut self.maps else {
            return Ok(());
        };
        let Some(last) = batch.ticks.last().map(|t| t.kernel_seq) else {
            return Ok(());
        };
        self.entries.clear();
        for map in [&mut maps.counts, &mut maps.other] {
            if let Err(e) = take_final(map, last, &mut self.entries) {
                // What was not removed stays in the map: the next drain counts it (late,
                // not lost).
                out.problem(e.to_string());
            }
        }
        let now = clock::mono_raw_ns();
        // vCPU threads by name while they live: a guest that ends between two drains
        // would otherwise leave its thread's rows without one.
        for tid in self.vcpus.snapshot().keys() {
            shared.fold.know_thread(*tid);
            if let Some(name) = self.comms.get(*tid, now) {
                shared.names.insert(*tid, name);
            }
        }
        let seqs: Vec<u64> = batch.ticks.iter().map(|t| t.kernel_seq).collect();
        shared.fold.apply(&mut self.entries, &seqs);
        shared
            .stamps
            .extend(batch.ticks.iter().map(|t| (t.seq, t.stamp)));
        let exits_counted = self.isa.is_ok();
        for (t, (seq, stamp)) in shared.fold.ticks.iter().zip(&shared.stamps) {
            let total = process_total(&t.threads);
            let row = out.new_row(*stamp, k::SOURCE, false);
            row.seq = Some(*seq);
            row.thread_columns = true;
            row.comm = self.comms.get(self.pid, now);
            push_counts(row, &total, exits_counted);
            for (tid, counts) in &t.threads {
                let row = out.new_row(*stamp, k::SOURCE, false);
                row.seq = Some(*seq);
                row.thread_columns = true;
                row.tid = Some(*tid);
                row.comm = match self.comms.get(*tid, now) {
                    Some(name) => {
                        shared.names.insert(*tid, name.clone());
                        Some(name)
                    }
                    None => shared.names.get(tid).cloned(),
                };
                row.vcpu = self.vcpus.get(*tid);
                push_counts(row, counts, exits_counted);
            }
        }
        let f = &shared.fold;
        if f.overflow_events > self.overflow_reported {
            out.problem(format!(
                "kvm key table full: {} exits counted without their key ({} since attach)",
                f.overflow_events - self.overflow_reported,
                f.overflow_events
            ));
            self.overflow_reported = f.overflow_events;
        }
        if let Some(lost) = lost_events(&maps.lost).filter(|l| *l > self.lost_reported) {
            out.problem(format!(
                "kvm key tables full: {} exits not counted at all ({lost} since attach)",
                lost - self.lost_reported
            ));
            self.lost_reported = lost;
        }
        Ok(())
    }
}

fn push_counts(row: &mut crate::row::Row, counts: &[u64], exits_counted: bool) {
    for kind in KINDS {
        let v = counts[kind.code as usize];
        if kind.code == cis490_common::KVM_EXIT_REASON && !exits_counted {
            row.push(kind.column, None::<u64>);
        } else {
            row.push(kind.column, v);
        }
    }
}

pub struct KvmKeysCollector {
    status: ProgramsStatus,
    isa: Result<ExitIsa, String>,
    shared: Arc<Mutex<Shared>>,
    vcpus: VcpuMap,
}

impl Part for KvmKeysCollector {
    fn stream(&self) -> crate::collector::Stream {
        crate::collector::Stream {
            source: k::KEYS_SOURCE,
            available_in_deployment: false,
        }
    }
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        self.status.summary("bpf_tracepoints")
    }
    fn fill(
        &mut self,
        _drain: &super::snap::Drain,
        _clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        let shared = lock(&self.shared);
        out.gaps.extend_from_slice(&shared.gaps);
        let isa = self.isa.as_ref().ok().copied();
        for (t, (seq, stamp)) in shared.fold.ticks.iter().zip(&shared.stamps) {
            for c in &shared.fold.changes[t.range.clone()] {
                let Some(kind) = k::kind_of(c.kind).and_then(|k| k.key_kind) else {
                    continue;
                };
                let row = out.new_row(*stamp, k::KEYS_SOURCE, false);
                row.seq = Some(*seq);
                row.thread_columns = true;
                row.tid = Some(c.tid);
                row.comm = shared.names.get(&c.tid).cloned();
                row.vcpu = self.vcpus.get(c.tid);
                row.push("kind", kind)
                    .push("key", c.key)
                    .push(
                        "name",
                        match c.key {
                            Some(key) => k::key_name(c.kind, key, isa),
                            None => Some("(key table full)"),
                        },
                    )
                    .push("count", c.count);
            }
        }
        Ok(())
    }
}
