//! The one trait every polled source implements.
//!
//! The sampler calls `collect` once per tick. A collector reads its values, stamps each
//! row when it was read, and hands rows to the [`TickOutput`]. Problems that lose only
//! part of a tick (one unreadable file, a vanished thread) are reported as
//! [`TickOutput::problem`] and become `source_error` events; an `Err` means the source
//! cannot go on this tick at all.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::clock::EpisodeClock;
use crate::error::Error;
use crate::row::Row;

/// One scheduled sampling instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Tick number from 0; a missed tick leaves a gap in `seq`.
    pub seq: u64,
    /// Episode-relative CLOCK_MONOTONIC time the tick was scheduled for.
    pub scheduled_ns: u64,
}

/// Where a collector puts what it read during one tick. Reused across ticks so a tick
/// allocates nothing once it has grown to its working size: [`TickOutput::new_row`] hands
/// out the rows of earlier ticks again, field lists and all.
#[derive(Debug, Default)]
pub struct TickOutput {
    /// Rows `..len` are this tick's; the rest are kept for their allocations.
    rows: Vec<Row>,
    len: usize,
    pub problems: Vec<String>,
    /// Ticks of a kernel-clocked source that never came: (from_seq, to_seq) inclusive,
    /// written as `gap` events.
    pub gaps: Vec<(u64, u64)>,
}

impl TickOutput {
    /// Append a row built elsewhere.
    pub fn row(&mut self, row: Row) {
        if self.len < self.rows.len() {
            self.rows[self.len] = row;
        } else {
            self.rows.push(row);
        }
        self.len += 1;
    }

    /// Append a fresh row (as `Row::new`) and return it to be filled in.
    pub fn new_row(
        &mut self,
        stamp: crate::clock::Stamp,
        source: &'static str,
        available_in_deployment: bool,
    ) -> &mut Row {
        if self.len < self.rows.len() {
            self.rows[self.len].reset(stamp, source, available_in_deployment);
        } else {
            self.rows
                .push(Row::new(stamp, source, available_in_deployment));
        }
        self.len += 1;
        &mut self.rows[self.len - 1]
    }

    /// Take back the row appended last (a row `--rows changed` does not keep).
    pub fn pop_row(&mut self) {
        self.len = self.len.saturating_sub(1);
    }

    /// Row `index` of this tick, to finish filling in (a total written before the rows
    /// it sums).
    pub fn row_mut(&mut self, index: usize) -> &mut Row {
        assert!(index < self.len, "row {index} of {}", self.len);
        &mut self.rows[index]
    }

    /// This tick's rows, in the order they were added.
    pub fn rows(&self) -> &[Row] {
        &self.rows[..self.len]
    }

    pub fn problem(&mut self, message: impl Into<String>) {
        self.problems.push(message.into());
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.problems.clear();
        self.gaps.clear();
    }
}

/// A stream a source writes: its name (the file is `telemetry-<source>.jsonl`) and
/// whether a deployed detector could see its data (see the episode contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    pub source: &'static str,
    pub available_in_deployment: bool,
}

/// Where a polled source hands over a tick's rows, one stream at a time: it fills
/// [`Sink::out`] with a stream's rows, problems and gaps, then [`Sink::flush`]es them to
/// that stream. The sampler writes at each flush and reuses one output for every stream,
/// so a source with several streams (the BPF snapshot, 50 ticks of 200 threads in one
/// drain) never holds more than one stream's rows. What a single-stream source leaves in
/// the output is flushed to its stream after `collect`.
pub trait Sink {
    fn out(&mut self) -> &mut TickOutput;
    /// Write what the output holds as stream `stream`'s, and empty it. A write error ends
    /// the capture; the sampler keeps it (the source goes on unaware).
    fn flush(&mut self, stream: usize);
}

/// A lone output is the sink of a single-stream source (unit tests read it back).
impl Sink for TickOutput {
    fn out(&mut self) -> &mut TickOutput {
        self
    }
    fn flush(&mut self, _stream: usize) {}
}

/// The one trait of the sources the sampler polls. Most write one stream; the BPF
/// snapshot writes all of its streams from one drain of the kernel's ring, in the order
/// its [`Collector::streams`] lists them.
pub trait Collector: Send {
    /// The streams this source writes, in the order of their numbers in [`Sink::flush`].
    fn streams(&self) -> Vec<Stream>;
    /// Read this tick into `sink`. An `Err` (the source cannot go on this tick at all) is
    /// reported on the first stream.
    fn collect(
        &mut self,
        tick: Tick,
        clock: &EpisodeClock,
        sink: &mut dyn Sink,
    ) -> Result<(), Error>;
    /// Whether the rows come from the kernel's own timer (the BPF snapshots) rather
    /// than from this tick: their `seq` and stamps are the kernel's, the sampler only
    /// drains them, a late host tick is no gap for them (the ring buffer holds the
    /// snapshots), and they are drained once more when the capture ends.
    fn kernel_clocked(&self) -> bool {
        false
    }
    /// Whether the source reads on its own period (a multiple of the host tick) and numbers
    /// its reads itself (`seq` counts reads, not ticks): a missed host tick only delays its
    /// next read, so the sampler declares no gap for it.
    fn own_schedule(&self) -> bool {
        false
    }
    /// Extra facts for stream `stream`'s `meta.sources[]` entry at the end (e.g. counts
    /// of rejected input).
    fn summary(&self, stream: usize) -> serde_json::Map<String, serde_json::Value> {
        let _ = stream;
        serde_json::Map::new()
    }
}

/// Host thread id → vCPU index, filled from QMP `query-cpus-fast` and read by every host
/// backend to fill the `vcpu` column of per-thread rows.
#[derive(Debug, Clone, Default)]
pub struct VcpuMap(Arc<RwLock<HashMap<u32, u32>>>);

impl VcpuMap {
    pub fn set(&self, map: HashMap<u32, u32>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    pub fn get(&self, tid: u32) -> Option<u32> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tid)
            .copied()
    }

    pub fn snapshot(&self) -> HashMap<u32, u32> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What every socket source gets from the capture: where to write, the episode clock,
/// the shared event log and the vCPU map (its stop flag is its runner's,
/// [`crate::threaded`]).
#[derive(Clone)]
pub struct SourceContext {
    pub dir: crate::episode::EpisodeDir,
    pub clock: EpisodeClock,
    pub events: crate::episode::EventLog,
    pub vcpus: VcpuMap,
}

/// `--rows`: which thread rows a per-thread host stream writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RowsMode {
    /// Every thread at every tick.
    #[default]
    All,
    /// A thread's row only when one of its values (counters, state, CPU, name, vCPU)
    /// differs from its last written row, and at least every [`KEYFRAME_NS`]; its final
    /// row always. The process row is written at every tick.
    Changed,
}

impl RowsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RowsMode::All => "all",
            RowsMode::Changed => "changed",
        }
    }
}

/// With `--rows changed`, every thread still gets a row at least this often, so a reader
/// that looks at any one-second window sees every live thread.
pub const KEYFRAME_NS: u64 = 1_000_000_000;

/// The `--rows changed` filter of one stream: remembers each thread's last written row.
#[derive(Debug, Default)]
pub struct ChangedRows {
    mode: RowsMode,
    /// Rows compared by their fields ([`ChangedRows::filter_last`]).
    last: std::collections::HashMap<u32, Last<(crate::row::FieldName, crate::row::Value)>>,
    /// For sources whose thread row is a function of a few numbers (the BPF snapshot's
    /// counters): those numbers as last written, so a repeat is found before its row is
    /// built ([`ChangedRows::skip_values`]).
    last_values: std::collections::HashMap<u32, Last<u64>>,
    /// Thread rows not written because nothing changed.
    pub skipped: u64,
}

/// A thread's last written row, as what it is compared by: `key` (its fields, or the
/// numbers they are made from), name and vCPU.
#[derive(Debug)]
struct Last<T> {
    t_mono_ns: u64,
    comm: Option<Arc<str>>,
    vcpu: Option<u32>,
    key: Vec<T>,
}

/// The one decision of both filters: true = leave the row out (it repeats the thread's
/// last written row less than [`KEYFRAME_NS`] after it, and `keep` is false); otherwise
/// it becomes the thread's last row.
fn repeats<T: PartialEq + Clone>(
    last: &mut std::collections::HashMap<u32, Last<T>>,
    tid: u32,
    t_mono_ns: u64,
    key: &[T],
    comm: &Option<Arc<str>>,
    vcpu: Option<u32>,
    keep: bool,
) -> bool {
    if let Some(prev) = last.get_mut(&tid) {
        let same = prev.key == key && prev.comm == *comm && prev.vcpu == vcpu;
        if same && !keep && t_mono_ns.saturating_sub(prev.t_mono_ns) < KEYFRAME_NS {
            return true;
        }
        prev.t_mono_ns = t_mono_ns;
        prev.comm.clone_from(comm);
        prev.vcpu = vcpu;
        prev.key.clear();
        prev.key.extend_from_slice(key);
    } else {
        last.insert(
            tid,
            Last {
                t_mono_ns,
                comm: comm.clone(),
                vcpu,
                key: key.to_vec(),
            },
        );
    }
    false
}

impl ChangedRows {
    pub fn new(mode: RowsMode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    /// Decide on the thread row just appended to `out` (its last row): with
    /// `--rows changed`, take it back when it repeats the thread's last written row
    /// (all but stamp and seq) less than [`KEYFRAME_NS`] after it. `keep`: write it
    /// anyway (a thread's final row).
    pub fn filter_last(&mut self, out: &mut TickOutput, keep: bool) {
        if self.mode == RowsMode::All {
            return;
        }
        let Some(row) = out.rows().last() else {
            return;
        };
        let Some(tid) = row.tid else {
            return;
        };
        let t = row.stamp.t_mono_ns;
        if repeats(
            &mut self.last,
            tid,
            t,
            &row.fields,
            &row.comm,
            row.vcpu,
            keep,
        ) {
            self.skipped += 1;
            out.pop_row();
        }
    }

    /// A thread that ended: nothing more to compare against.
    pub fn forget(&mut self, tid: u32) {
        self.last.remove(&tid);
        self.last_values.remove(&tid);
    }

    /// The decision of [`ChangedRows::filter_last`], taken before the row is built, for a
    /// source whose thread row is a function of (`values`, `comm`, `vcpu`): true = leave
    /// the row out (a repeat of the thread's last written row, less than [`KEYFRAME_NS`]
    /// after it); false = build and write it (it is then the thread's last row). With
    /// 200 threads at 1 kHz, most of which did not run, this is most of the rows, and
    /// building each before comparing it cost more than the rest of the drain.
    pub fn skip_values(
        &mut self,
        tid: u32,
        t_mono_ns: u64,
        values: &[u64],
        comm: &Option<Arc<str>>,
        vcpu: Option<u32>,
        keep: bool,
    ) -> bool {
        if self.mode == RowsMode::All {
            return false;
        }
        let skip = repeats(
            &mut self.last_values,
            tid,
            t_mono_ns,
            values,
            comm,
            vcpu,
            keep,
        );
        self.skipped += u64::from(skip);
        skip
    }

    /// For meta.sources: the mode, and the rows it left out.
    pub fn summary(&self, m: &mut serde_json::Map<String, serde_json::Value>) {
        m.insert("rows_mode".into(), self.mode.as_str().into());
        if self.mode == RowsMode::Changed {
            m.insert("rows_unchanged_skipped".into(), self.skipped.into());
        }
    }
}

#[cfg(test)]
mod changed_rows_tests {
    use super::*;
    use crate::clock::Stamp;

    fn thread_row(out: &mut TickOutput, t: u64, tid: u32, on_cpu: u64) {
        let row = out.new_row(
            Stamp {
                t_mono_ns: t,
                t_wall_ns: t,
            },
            "proc",
            false,
        );
        row.tid = Some(tid);
        row.seq = Some(t / 1_000_000);
        row.push("on_cpu_ns", on_cpu);
    }

    #[test]
    fn changed_keeps_a_thread_row_only_when_a_value_changed_or_a_second_passed() {
        let mut f = ChangedRows::new(RowsMode::Changed);
        let mut out = TickOutput::default();
        let ms = 1_000_000;
        // t = 0: first row of tid 7 kept; 1 ms later the same values: left out.
        thread_row(&mut out, 0, 7, 100);
        f.filter_last(&mut out, false);
        thread_row(&mut out, ms, 7, 100);
        f.filter_last(&mut out, false);
        assert_eq!(out.rows().len(), 1);
        // Changed: kept.
        thread_row(&mut out, 2 * ms, 7, 150);
        f.filter_last(&mut out, false);
        assert_eq!(out.rows().len(), 2);
        // Unchanged, but a second after the last written row: kept (the keyframe).
        thread_row(&mut out, 2 * ms + KEYFRAME_NS - 1, 7, 150);
        f.filter_last(&mut out, false);
        assert_eq!(out.rows().len(), 2);
        thread_row(&mut out, 2 * ms + KEYFRAME_NS, 7, 150);
        f.filter_last(&mut out, false);
        assert_eq!(out.rows().len(), 3);
        // A final row is written whatever it repeats.
        thread_row(&mut out, 3 * KEYFRAME_NS / 2, 7, 150);
        f.filter_last(&mut out, true);
        assert_eq!(out.rows().len(), 4);
        assert_eq!(f.skipped, 2);
        // Another thread's first row, and a name change, are kept.
        thread_row(&mut out, 3 * KEYFRAME_NS / 2, 8, 150);
        f.filter_last(&mut out, false);
        thread_row(&mut out, 3 * KEYFRAME_NS / 2 + ms, 8, 150);
        out.rows.last_mut().unwrap().comm = Some("renamed".into());
        f.filter_last(&mut out, false);
        assert_eq!(out.rows().len(), 6);
    }

    #[test]
    fn all_keeps_every_row_and_process_rows_are_never_filtered() {
        let mut f = ChangedRows::new(RowsMode::All);
        let mut out = TickOutput::default();
        for t in 0..3 {
            thread_row(&mut out, t, 7, 100);
            f.filter_last(&mut out, false);
        }
        assert_eq!(out.rows().len(), 3);
        let mut f = ChangedRows::new(RowsMode::Changed);
        let mut out = TickOutput::default();
        for t in 0..3 {
            thread_row(&mut out, t, 7, 100);
            out.rows.last_mut().unwrap().tid = None;
            f.filter_last(&mut out, false);
        }
        assert_eq!(
            out.rows().len(),
            3,
            "the process row is written at every tick"
        );
    }

    #[test]
    fn skip_values_decides_as_filter_last_does_before_the_row_is_built() {
        let ms = 1_000_000;
        let name: Option<Arc<str>> = Some("CPU 0/KVM".into());
        let mut f = ChangedRows::new(RowsMode::Changed);
        let mut skip = |t: u64, v: u64, comm: &Option<Arc<str>>, vcpu, keep| {
            f.skip_values(7, t, &[v, 1, 2], comm, vcpu, keep)
        };
        assert!(
            !skip(0, 100, &name, Some(0), false),
            "a first row is written"
        );
        assert!(skip(ms, 100, &name, Some(0), false), "a repeat is left out");
        assert!(
            !skip(2 * ms, 150, &name, Some(0), false),
            "a change is written"
        );
        assert!(
            !skip(3 * ms, 150, &None, Some(0), false),
            "a name change too"
        );
        assert!(!skip(4 * ms, 150, &None, None, false), "and a vCPU change");
        assert!(skip(4 * ms + KEYFRAME_NS - 1, 150, &None, None, false));
        assert!(
            !skip(4 * ms + KEYFRAME_NS, 150, &None, None, false),
            "the keyframe"
        );
        assert!(
            !skip(4 * ms + KEYFRAME_NS + 1, 150, &None, None, true),
            "a final row"
        );
        assert_eq!(f.skipped, 2);
        let mut all = ChangedRows::new(RowsMode::All);
        assert!(!all.skip_values(7, 0, &[1], &None, None, false));
        assert!(!all.skip_values(7, 1, &[1], &None, None, false));
    }
}
