//! Draining the snapshot ring buffer (`SNAPS`): records of the kernel's own timer, one
//! per thread and per interface and a tick record ending each snapshot.
//!
//! The kernel ticks on its own; user space drains every few tens of milliseconds
//! ([`DRAIN_INTERVAL_NS`]), so the capture wakes ~20 times a second at any rate. A drain
//! collects the complete snapshots (those whose tick record has arrived; a snapshot being
//! written on another CPU at that moment is completed at the next drain) into a
//! [`Batch`], which the `bpf-sched`, `bpf-io` and `net` collectors turn into rows.
//!
//! Parsing ([`parse`]) and the schedule bookkeeping ([`Schedule`]) are pure and tested
//! here; the kernel side is tested in tests/bpf.rs.

use aya::maps::{MapData, RingBuf};
use cis490_common::{
    NetRecord, SnapRecord, TickRecord, REC_NET, REC_THREAD, REC_THREAD_EXITED, REC_TICK,
};

use super::error::BpfError;
use crate::clock::{EpisodeClock, Stamp};
use crate::sampler::LatenessHistogram;

/// An error of this stage (see [`BpfError`]).
fn record_err(msg: impl Into<String>) -> BpfError {
    BpfError::Record(msg.into())
}

/// How often the capture drains the ring (and the host sampler of the BPF backend ticks).
pub const DRAIN_INTERVAL_NS: u64 = 50_000_000;

/// One ring buffer record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Thread(SnapRecord),
    Net(NetRecord),
    Tick(TickRecord),
}

fn pod<T: Copy>(bytes: &[u8], what: &str) -> Result<T, BpfError> {
    if bytes.len() != std::mem::size_of::<T>() {
        return Err(record_err(format!(
            "{what} record of {} bytes, expected {}",
            bytes.len(),
            std::mem::size_of::<T>()
        )));
    }
    // SAFETY: the length matches and T is a plain repr(C) integer struct (any bit
    // pattern is a valid value); the read is unaligned-safe.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decode one record by its leading kind.
pub fn parse(bytes: &[u8]) -> Result<Record, BpfError> {
    let kind = bytes
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| record_err(format!("ring buffer record of {} bytes", bytes.len())))?;
    match kind {
        REC_THREAD | REC_THREAD_EXITED => pod(bytes, "thread").map(Record::Thread),
        REC_NET => pod(bytes, "net").map(Record::Net),
        REC_TICK => pod(bytes, "tick").map(Record::Tick),
        k => Err(record_err(format!(
            "ring buffer record of unknown kind {k}"
        ))),
    }
}

/// The kernel timer's schedule as seen from its tick records: episode-relative tick
/// numbers, holes, lateness. Ticks from before the episode's origin (the timer starts
/// while the backend is being set up) are dropped, and `seq` counts from the first tick
/// at or after the origin.
#[derive(Default)]
pub struct Schedule {
    /// Kernel seq of the episode's tick 0.
    base: Option<u64>,
    /// The next episode seq expected.
    next: u64,
    pub missed: u64,
    pub lateness: LatenessHistogram,
    /// Running totals from the latest tick record, and what was already reported.
    lost_records: u64,
    unslotted: u64,
    reported_lost: u64,
    reported_unslotted: u64,
    /// CLOCK_MONOTONIC of the latest tick record.
    pub last_ktime_ns: u64,
}

/// What one tick record means for the episode.
#[derive(Debug, PartialEq, Eq)]
pub enum TickVerdict {
    /// Before the episode began: drop its records.
    Early,
    /// Episode tick `seq`; `gap`: ticks that never came before it (inclusive range).
    Tick { seq: u64, gap: Option<(u64, u64)> },
}

impl Schedule {
    pub fn tick(&mut self, t: &TickRecord, mono_origin_ns: u64) -> TickVerdict {
        self.lost_records = self.lost_records.max(t.lost_records);
        self.last_ktime_ns = self.last_ktime_ns.max(t.ktime_ns);
        self.unslotted = self.unslotted.max(t.unslotted);
        let base = match self.base {
            Some(b) => b,
            None if t.ktime_ns < mono_origin_ns => return TickVerdict::Early,
            None => *self.base.insert(t.seq),
        };
        let Some(seq) = t.seq.checked_sub(base) else {
            return TickVerdict::Early;
        };
        if seq < self.next {
            // Cannot happen (the kernel numbers strictly upwards); never emit it twice.
            return TickVerdict::Early;
        }
        let gap = (seq > self.next).then(|| (self.next, seq - 1));
        if let Some((a, b)) = gap {
            self.missed += b - a + 1;
        }
        self.next = seq + 1;
        self.lateness.record(t.late_ns);
        TickVerdict::Tick { seq, gap }
    }

    /// Ticks of the episode so far (the last seq + 1).
    pub fn scheduled(&self) -> u64 {
        self.next
    }

    /// New losses since the last call, one problem line each (called once per drain,
    /// so a burst of losses is one event, not one per tick).
    pub fn losses(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if self.lost_records > self.reported_lost {
            out.push(format!(
                "snapshot ring buffer full: {} records lost ({} since attach)",
                self.lost_records - self.reported_lost,
                self.lost_records
            ));
            self.reported_lost = self.lost_records;
        }
        if self.unslotted > self.reported_unslotted {
            out.push(format!(
                "{} new threads not followed: all {} slots in use",
                self.unslotted - self.reported_unslotted,
                cis490_common::MAX_SLOTS
            ));
            self.reported_unslotted = self.unslotted;
        }
        out
    }
}

/// One complete snapshot of the episode.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    pub seq: u64,
    /// The kernel's own number of the snapshot (the kvm programs count under it).
    pub kernel_seq: u64,
    pub stamp: Stamp,
    /// Index range of its records in [`Batch::threads`] and [`Batch::nets`].
    pub threads: (usize, usize),
    pub nets: (usize, usize),
    /// The process's resident pages and total_vm at this snapshot (None: not read).
    pub mm_rss_pages: Option<u64>,
    pub mm_total_vm: Option<u64>,
}

/// The snapshots of one drain, shared by the three collectors of that host tick.
#[derive(Debug, Default)]
pub struct Batch {
    pub ticks: Vec<Tick>,
    pub threads: Vec<SnapRecord>,
    pub nets: Vec<NetRecord>,
    /// Holes in the episode's seq: (from, to) inclusive, for `gap` events.
    pub gaps: Vec<(u64, u64)>,
    pub problems: Vec<String>,
}

/// Assembles records into complete snapshots (pure: fed records, no ring access).
#[derive(Default)]
pub struct Assembler {
    pending_threads: Vec<SnapRecord>,
    pending_nets: Vec<NetRecord>,
    pub schedule: Schedule,
    pub batch: Batch,
}

impl Assembler {
    /// Start a new batch (the previous one has been turned into rows).
    pub fn begin(&mut self) {
        let b = &mut self.batch;
        b.ticks.clear();
        b.threads.clear();
        b.nets.clear();
        b.gaps.clear();
        b.problems.clear();
    }

    /// End the batch: losses the tick records reported during it.
    pub fn finish(&mut self) {
        let lines = self.schedule.losses();
        self.batch.problems.extend(lines);
    }

    /// `wall_minus_mono_ns`: CLOCK_REALTIME − CLOCK_MONOTONIC now, to stamp the kernel's
    /// monotonic snapshot times with a wall time too.
    pub fn push(&mut self, rec: Record, clock: &EpisodeClock, wall_minus_mono_ns: i64) {
        match rec {
            Record::Thread(r) => self.pending_threads.push(r),
            Record::Net(r) => self.pending_nets.push(r),
            Record::Tick(t) => {
                // Records of this snapshot; anything older belongs to a snapshot whose
                // tick record was lost, and is dropped with it.
                let stale = self
                    .pending_threads
                    .iter()
                    .filter(|r| r.seq != t.seq)
                    .count()
                    + self.pending_nets.iter().filter(|r| r.seq != t.seq).count();
                if stale > 0 {
                    self.batch.problems.push(format!(
                        "{stale} snapshot records without their tick record dropped"
                    ));
                }
                match self.schedule.tick(&t, clock.mono_origin_ns) {
                    TickVerdict::Early => {}
                    TickVerdict::Tick { seq, gap } if t.lost_in_snapshot > 0 => {
                        // Some of this snapshot's records found the ring buffer full:
                        // its rows would miss threads, so the whole snapshot is a gap.
                        let from = gap.map_or(seq, |(a, _)| a);
                        self.batch.gaps.push((from, seq));
                        self.schedule.missed += 1;
                    }
                    TickVerdict::Tick { seq, gap } => {
                        if let Some(g) = gap {
                            self.batch.gaps.push(g);
                        }
                        let b = &mut self.batch;
                        let t0 = b.threads.len();
                        b.threads
                            .extend(self.pending_threads.iter().filter(|r| r.seq == t.seq));
                        let n0 = b.nets.len();
                        b.nets
                            .extend(self.pending_nets.iter().filter(|r| r.seq == t.seq));
                        b.ticks.push(Tick {
                            seq,
                            kernel_seq: t.seq,
                            stamp: Stamp {
                                t_mono_ns: clock.rel(t.ktime_ns),
                                t_wall_ns: (t.ktime_ns as i64 + wall_minus_mono_ns) as u64,
                            },
                            threads: (t0, b.threads.len()),
                            nets: (n0, b.nets.len()),
                            mm_rss_pages: (t.mm_rss_pages != cis490_common::MM_UNKNOWN)
                                .then_some(t.mm_rss_pages),
                            mm_total_vm: (t.mm_total_vm != cis490_common::MM_UNKNOWN)
                                .then_some(t.mm_total_vm),
                        });
                    }
                }
                self.pending_threads.clear();
                self.pending_nets.clear();
            }
        }
    }
}

/// The ring buffer and its assembler.
pub struct Drain {
    ring: RingBuf<MapData>,
    pub asm: Assembler,
    /// CLOCK_MONOTONIC when the snapshots were started (0: not yet).
    pub started_ns: u64,
}

impl Drain {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            ring,
            asm: Assembler::default(),
            started_ns: 0,
        }
    }

    /// CLOCK_MONOTONIC of the latest sign of life of the timer: its latest tick, or the
    /// start (`None` before the start).
    pub fn last_sign_of_life_ns(&self) -> Option<u64> {
        (self.started_ns != 0).then(|| self.asm.schedule.last_ktime_ns.max(self.started_ns))
    }

    /// Read everything the kernel has written so far into a new batch.
    ///
    /// At most about `max_records` records go into one batch: it stops at the first tick
    /// record after that many and returns true (call again for the rest). A wide target
    /// at 1 kHz puts 10,000 records in the ring per drain; taken whole, they and their
    /// rows made most of the capture's memory (BENCHMARKS.md section 10).
    pub fn drain(&mut self, clock: &EpisodeClock, max_records: usize) -> bool {
        self.asm.begin();
        let wall_minus_mono = crate::clock::wall_ns() as i64 - crate::clock::mono_raw_ns() as i64;
        let mut read = 0usize;
        let mut more = false;
        while let Some(item) = self.ring.next() {
            read += 1;
            match parse(&item) {
                Ok(rec) => {
                    let tick = matches!(rec, Record::Tick(_));
                    self.asm.push(rec, clock, wall_minus_mono);
                    if tick && read >= max_records {
                        more = true;
                        break;
                    }
                }
                Err(e) => self.asm.batch.problems.push(e.to_string()),
            }
        }
        self.asm.finish();
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: plain repr(C) data viewed as bytes.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn thread(tid: u32, seq: u64, on_cpu: u64) -> SnapRecord {
        let mut r = SnapRecord {
            kind: REC_THREAD,
            tid,
            seq,
            ktime_ns: 0,
            ..Default::default()
        };
        r.counters.on_cpu_ns = on_cpu;
        r
    }

    fn tick(seq: u64, ktime_ns: u64) -> TickRecord {
        TickRecord {
            kind: REC_TICK,
            threads: 0,
            seq,
            ktime_ns,
            late_ns: 7,
            lost_records: 0,
            unslotted: 0,
            mm_rss_pages: cis490_common::MM_UNKNOWN,
            mm_total_vm: cis490_common::MM_UNKNOWN,
            lost_in_snapshot: 0,
        }
    }

    #[test]
    fn records_parse_by_kind_and_bad_ones_are_refused() {
        let t = thread(5, 3, 100);
        assert_eq!(parse(&bytes(&t)), Ok(Record::Thread(t)));
        let k = tick(3, 9);
        assert_eq!(parse(&bytes(&k)), Ok(Record::Tick(k)));
        let n = NetRecord {
            kind: REC_NET,
            slot: 1,
            ..Default::default()
        };
        assert_eq!(parse(&bytes(&n)), Ok(Record::Net(n)));
        let e = parse(&bytes(&t)[..100]).unwrap_err();
        assert!(
            matches!(&e, BpfError::Record(m) if m.contains("100 bytes")),
            "{e}"
        );
        let mut b = bytes(&k);
        b[0] = 99;
        assert!(parse(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown kind 99"));
        assert!(parse(&[1, 0]).is_err());
    }

    #[test]
    fn snapshots_complete_at_their_tick_record_and_seq_counts_from_the_origin() {
        let clock = EpisodeClock {
            mono_origin_ns: 1_000,
            wall_origin_ns: 0,
        };
        let mut a = Assembler::default();
        a.begin();
        // Kernel tick 7 came before the episode began: dropped.
        a.push(Record::Thread(thread(1, 7, 5)), &clock, 0);
        a.push(Record::Tick(tick(7, 900)), &clock, 0);
        // Kernel tick 8 is the episode's tick 0.
        a.push(Record::Thread(thread(1, 8, 10)), &clock, 0);
        a.push(Record::Thread(thread(2, 8, 20)), &clock, 0);
        a.push(Record::Tick(tick(8, 1_500)), &clock, 100);
        // Tick 9 is half written when the drain ends.
        a.push(Record::Thread(thread(1, 9, 11)), &clock, 0);
        assert_eq!(a.batch.ticks.len(), 1);
        let t = a.batch.ticks[0];
        assert_eq!(t.seq, 0);
        assert_eq!(t.stamp.t_mono_ns, 500);
        assert_eq!(t.stamp.t_wall_ns, 1_600);
        assert_eq!(&a.batch.threads[t.threads.0..t.threads.1].len(), &2);
        // Next drain: tick 9 completes, then 10 and 11 never come, then 12.
        a.begin();
        a.push(Record::Thread(thread(2, 9, 21)), &clock, 0);
        a.push(Record::Tick(tick(9, 2_500)), &clock, 0);
        a.push(Record::Tick(tick(12, 5_500)), &clock, 0);
        let seqs: Vec<u64> = a.batch.ticks.iter().map(|t| t.seq).collect();
        assert_eq!(seqs, vec![1, 4]);
        let t = a.batch.ticks[0];
        let on_cpu: Vec<u64> = a.batch.threads[t.threads.0..t.threads.1]
            .iter()
            .map(|r| r.counters.on_cpu_ns)
            .collect();
        assert_eq!(
            on_cpu,
            vec![11, 21],
            "the record from the previous drain is kept"
        );
        assert_eq!(a.batch.gaps, vec![(2, 3)]);
        assert_eq!(a.schedule.missed, 2);
        assert_eq!(a.schedule.scheduled(), 5);
        assert_eq!(a.schedule.lateness.quantile_ns(0.5), Some(7));
    }

    #[test]
    fn a_snapshot_that_lost_records_is_a_gap_not_a_tick_missing_threads() {
        let clock = EpisodeClock {
            mono_origin_ns: 0,
            wall_origin_ns: 0,
        };
        let mut a = Assembler::default();
        a.begin();
        a.push(Record::Thread(thread(1, 0, 5)), &clock, 0);
        a.push(Record::Tick(tick(0, 10)), &clock, 0);
        // Snapshot 1 got one of its two thread records into the ring, not the other.
        a.push(Record::Thread(thread(1, 1, 6)), &clock, 0);
        let mut t = tick(1, 20);
        t.lost_in_snapshot = 1;
        t.lost_records = 1;
        a.push(Record::Tick(t), &clock, 0);
        // Snapshot 2 never came; 3 lost records too: one gap 1..=3.
        let mut t = tick(3, 40);
        t.lost_in_snapshot = 2;
        t.lost_records = 3;
        a.push(Record::Tick(t), &clock, 0);
        a.push(Record::Thread(thread(1, 4, 8)), &clock, 0);
        a.push(Record::Tick(tick(4, 50)), &clock, 0);
        a.finish();
        let seqs: Vec<u64> = a.batch.ticks.iter().map(|t| t.seq).collect();
        assert_eq!(seqs, vec![0, 4]);
        assert_eq!(a.batch.gaps, vec![(1, 1), (2, 3)]);
        assert_eq!(a.schedule.missed, 3);
        assert_eq!(
            a.batch.threads.len(),
            2,
            "the partial snapshot's record is dropped"
        );
    }

    #[test]
    fn losses_are_reported_once_and_orphans_dropped() {
        let clock = EpisodeClock {
            mono_origin_ns: 0,
            wall_origin_ns: 0,
        };
        let mut a = Assembler::default();
        a.begin();
        a.push(Record::Thread(thread(1, 3, 5)), &clock, 0);
        let mut t = tick(4, 10);
        t.lost_records = 1;
        a.push(Record::Tick(t), &clock, 0);
        t.seq = 5;
        t.lost_records = 2;
        t.unslotted = 1;
        a.push(Record::Tick(t), &clock, 0);
        a.finish();
        assert_eq!(a.batch.ticks.len(), 2);
        let tk = a.batch.ticks[0];
        assert_eq!(tk.threads.0, tk.threads.1, "the orphan is not in tick 4");
        let p = a.batch.problems.join("\n");
        assert!(p.contains("2 records lost"), "one line for the drain: {p}");
        assert_eq!(a.batch.problems.len(), 3, "{p}");
        assert!(p.contains("1 new threads not followed"), "{p}");
        assert!(
            p.contains("1 snapshot records without their tick record"),
            "{p}"
        );
        a.begin();
        a.push(Record::Tick(TickRecord { seq: 6, ..t }), &clock, 0);
        a.finish();
        assert!(a.batch.problems.is_empty(), "{:?}", a.batch.problems);
    }
}
