//! The `perf` source (`telemetry-perf.jsonl`): per target thread, two perf_event counting
//! groups (hardware: cycles, instructions, …; software: page faults, context switches,
//! migrations) opened with perf_event_open through the perf-event2 crate, read at
//! `--perf-rate-hz` on the host sampler's ticks, new threads followed, exited threads'
//! final counts kept in the process row. Where the PMU or a counter cannot be opened its
//! column is null and meta.sources[perf] says why; the capture goes on.
//!
//! Counts include kernel mode (`exclude_kernel` off): a vCPU thread spends its guest time
//! in the kernel's KVM_RUN, which is what this source is for. Cumulative since the thread
//! was first seen by this source.

pub mod counts;

/// `cis490 trace`'s "perf" options.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "perf")]
pub struct PerfOptions {
    /// How often the `perf` source reads its counters (perf_event_open, per thread), on
    /// the host sampler's ticks, so at most the sampler's own rate: --rate-hz with
    /// /proc, the lower of --rate-hz and 20 Hz with BPF (the host only drains there).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub perf_rate_hz: u32,
    /// No `perf` source.
    #[arg(long)]
    pub no_perf: bool,
}

impl PerfOptions {
    /// The reading rate, or None with `--no-perf`.
    pub fn rate_hz(&self) -> Option<u32> {
        (!self.no_perf).then_some(self.perf_rate_hz)
    }
}

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use perf_event::events::{Hardware, Software};
use perf_event::{Builder, Counter, Group};

use crate::clock::EpisodeClock;
use crate::collector::{Collector, Sink, Stream, Tick, VcpuMap};
use crate::error::Error;
use counts::{open_failure, perf_row, GroupReading, Reading, HW, SOURCE, SW};

const HW_EVENTS: [Hardware; 7] = [
    Hardware::CPU_CYCLES,
    Hardware::INSTRUCTIONS,
    Hardware::REF_CPU_CYCLES,
    Hardware::CACHE_REFERENCES,
    Hardware::CACHE_MISSES,
    Hardware::BRANCH_INSTRUCTIONS,
    Hardware::BRANCH_MISSES,
];
const SW_EVENTS: [Software; 3] = [
    Software::PAGE_FAULTS,
    Software::CONTEXT_SWITCHES,
    Software::CPU_MIGRATIONS,
];

/// One counting group of a thread: the group (its leader is a dummy event) and each
/// member that opened.
struct OpenGroup<const N: usize> {
    group: Group,
    members: [Option<Counter>; N],
}

impl<const N: usize> OpenGroup<N> {
    fn read(&mut self) -> std::io::Result<GroupReading<N>> {
        let data = self.group.read()?;
        let mut counts = [None; N];
        for (c, m) in counts.iter_mut().zip(&self.members) {
            *c = m.as_ref().and_then(|m| data.get(m)).map(|e| e.value());
        }
        Ok(GroupReading {
            counts,
            time_enabled_ns: data.time_enabled().map_or(0, |d| d.as_nanos() as u64),
            time_running_ns: data.time_running().map_or(0, |d| d.as_nanos() as u64),
        })
    }
}

fn builder_for<E: perf_event::events::Event>(e: E, tid: u32) -> Builder<'static> {
    let mut b = Builder::new(e);
    b.observe_pid(tid as i32)
        .any_cpu()
        .exclude_kernel(false)
        .exclude_hv(false)
        .inherit(false);
    b
}

/// Open a group for `tid` with `events`; Err if the group itself cannot be opened (the
/// reason is the errno), members that fail are None with their errno.
fn open_group<E: perf_event::events::Event + Copy, const N: usize>(
    tid: u32,
    events: &[E; N],
) -> Result<(OpenGroup<N>, [Option<i32>; N]), Option<i32>> {
    let mut leader = Group::builder();
    leader
        .observe_pid(tid as i32)
        .any_cpu()
        .exclude_kernel(false)
        .exclude_hv(false);
    let mut group = leader.build_group().map_err(|e| e.raw_os_error())?;
    let mut members: [Option<Counter>; N] = std::array::from_fn(|_| None);
    let mut failed = [None; N];
    for (i, e) in events.iter().enumerate() {
        match group.add(&builder_for(*e, tid)) {
            Ok(c) => members[i] = Some(c),
            Err(err) => failed[i] = Some(err.raw_os_error().unwrap_or(0)),
        }
    }
    if members.iter().all(Option::is_none) {
        return Err(failed[0]);
    }
    group.enable().map_err(|e| e.raw_os_error())?;
    Ok((OpenGroup { group, members }, failed))
}

/// [`open_group`] for one thread, with the source's bookkeeping: a group that cannot be
/// opened at all marks the whole group unavailable (not retried for later threads), a
/// member that fails is recorded by column, and running out of descriptors is counted
/// (the next thread may still fit).
fn open_tracked<E: perf_event::events::Event + Copy, const N: usize>(
    tid: u32,
    events: &[E; N],
    names: &[&'static str; N],
    unavailable: &mut Option<String>,
    member_failures: &mut BTreeMap<&'static str, String>,
    out_of_fds: &mut u64,
) -> Option<OpenGroup<N>> {
    if unavailable.is_some() {
        return None;
    }
    match open_group(tid, events) {
        Ok((g, failed)) => {
            for (name, e) in names.iter().zip(failed) {
                if let Some(e) = e {
                    member_failures
                        .entry(name)
                        .or_insert_with(|| open_failure(Some(e)));
                }
            }
            Some(g)
        }
        // The thread exited between the listing and the open.
        Err(Some(libc::ESRCH)) => None,
        Err(Some(libc::EMFILE | libc::ENFILE)) => {
            *out_of_fds += 1;
            None
        }
        Err(e) => {
            *unavailable = Some(open_failure(e));
            None
        }
    }
}

struct Thread {
    hw: Option<OpenGroup<7>>,
    sw: Option<OpenGroup<3>>,
    comm: Option<Arc<str>>,
    last: Reading,
}

pub struct PerfCollector {
    pid: u32,
    vcpus: VcpuMap,
    period_ns: u64,
    rate_hz: u32,
    next_ns: Option<u64>,
    seq: u64,
    threads: BTreeMap<u32, Thread>,
    /// Final readings of threads that exited, kept in the process row.
    retired: Reading,
    /// Why the hardware group is not there (set at the first failure: it is not retried
    /// for every thread, a PMU does not appear mid-capture).
    hw_unavailable: Option<String>,
    sw_unavailable: Option<String>,
    /// Members that failed to open, by column, with the reason.
    member_failures: BTreeMap<&'static str, String>,
    threads_followed: u64,
    threads_exited: u64,
    open_failures: u64,
    reads: u64,
    process_comm: Option<Arc<str>>,
}

impl PerfCollector {
    /// `rate_hz` is `--perf-rate-hz`; reads happen on the first host tick at or after each
    /// period, so the effective rate is at most the host sampler's.
    pub fn new(pid: u32, vcpus: VcpuMap, rate_hz: u32) -> Self {
        // Twelve descriptors per thread (two leaders, ten members): a QEMU with a few
        // hundred threads needs more than the default soft limit of 1024.
        // SAFETY: getrlimit/setrlimit on a local struct.
        unsafe {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        let process_comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|s| Arc::from(s.trim_end()));
        PerfCollector {
            pid,
            vcpus,
            period_ns: 1_000_000_000 / u64::from(rate_hz.max(1)),
            rate_hz,
            next_ns: None,
            seq: 0,
            threads: BTreeMap::new(),
            retired: Reading::default(),
            hw_unavailable: None,
            sw_unavailable: None,
            member_failures: BTreeMap::new(),
            threads_followed: 0,
            threads_exited: 0,
            open_failures: 0,
            reads: 0,
            process_comm,
        }
    }

    fn open_thread(&mut self, tid: u32) -> Thread {
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid))
            .ok()
            .map(|s| Arc::from(s.trim_end()));
        let mut t = Thread {
            hw: None,
            sw: None,
            comm,
            last: Reading::default(),
        };
        t.hw = open_tracked(
            tid,
            &HW_EVENTS,
            &HW,
            &mut self.hw_unavailable,
            &mut self.member_failures,
            &mut self.open_failures,
        );
        t.sw = open_tracked(
            tid,
            &SW_EVENTS,
            &SW,
            &mut self.sw_unavailable,
            &mut self.member_failures,
            &mut self.open_failures,
        );
        t
    }

    fn live_tids(&self) -> std::io::Result<BTreeSet<u32>> {
        Ok(std::fs::read_dir(format!("/proc/{}/task", self.pid))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect())
    }
}

fn read_thread(t: &mut Thread) -> Reading {
    // A failed read (the thread's events torn down) keeps the last values: counts never
    // go backwards.
    if let Some(g) = t.hw.as_mut() {
        if let Ok(r) = g.read() {
            t.last.hw = Some(r);
        }
    }
    if let Some(g) = t.sw.as_mut() {
        if let Ok(r) = g.read() {
            t.last.sw = Some(r);
        }
    }
    t.last
}

impl Collector for PerfCollector {
    fn streams(&self) -> Vec<Stream> {
        vec![Stream {
            source: SOURCE,
            available_in_deployment: false,
        }]
    }
    fn collect(
        &mut self,
        tick: Tick,
        clock: &EpisodeClock,
        sink: &mut dyn Sink,
    ) -> Result<(), Error> {
        let out = sink.out();
        let now = tick.scheduled_ns;
        match self.next_ns {
            Some(next) if now < next => return Ok(()),
            // Behind by more than a period (a late host tick): the next read is one period
            // from now, not a burst of catch-up reads.
            Some(next) => {
                self.next_ns = Some((next + self.period_ns).max(now + self.period_ns / 2))
            }
            None => self.next_ns = Some(now + self.period_ns),
        }
        let live = match self.live_tids() {
            Ok(l) => l,
            // The target is gone: the sampler ends the capture; nothing to read.
            Err(_) => return Ok(()),
        };
        let seq = self.seq;
        self.seq += 1;
        self.reads += 1;
        // Threads that exited: one last read (an event of an exited task keeps its final
        // count), their row, and their counts into the process total.
        let gone: Vec<u32> = self
            .threads
            .keys()
            .filter(|t| !live.contains(t))
            .copied()
            .collect();
        let mut total = self.retired;
        for tid in gone {
            let mut t = self.threads.remove(&tid).expect("listed");
            let r = read_thread(&mut t);
            self.retired.add(&r);
            total.add(&r);
            self.threads_exited += 1;
            let vcpu = self.vcpus.get(tid);
            let row = out.new_row(clock.stamp(), SOURCE, false);
            perf_row(row, seq, Some(tid), t.comm.clone(), vcpu, &r);
        }
        for &tid in &live {
            if !self.threads.contains_key(&tid) {
                let t = self.open_thread(tid);
                self.threads_followed += 1;
                self.threads.insert(tid, t);
            }
        }
        for (&tid, t) in self.threads.iter_mut() {
            let r = read_thread(t);
            total.add(&r);
            let vcpu = self.vcpus.get(tid);
            let row = out.new_row(clock.stamp(), SOURCE, false);
            perf_row(row, seq, Some(tid), t.comm.clone(), vcpu, &r);
        }
        let row = out.new_row(clock.stamp(), SOURCE, false);
        perf_row(row, seq, None, self.process_comm.clone(), None, &total);
        Ok(())
    }
    fn own_schedule(&self) -> bool {
        true
    }
    fn summary(&self, _stream: usize) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let mut m = serde_json::Map::new();
        m.insert("method".into(), "perf_event_open, one hardware and one software counting group per thread, kernel mode included".into());
        m.insert("perf_rate_hz".into(), self.rate_hz.into());
        m.insert("reads".into(), self.reads.into());
        m.insert(
            "hardware".into(),
            match &self.hw_unavailable {
                None => json!("available"),
                Some(why) => json!(format!("unavailable: {why}")),
            },
        );
        m.insert(
            "software".into(),
            match &self.sw_unavailable {
                None => json!("available"),
                Some(why) => json!(format!("unavailable: {why}")),
            },
        );
        m.insert("counters_unavailable".into(), json!(self.member_failures));
        m.insert("threads_followed".into(), self.threads_followed.into());
        m.insert("threads_exited".into(), self.threads_exited.into());
        m.insert(
            "threads_not_opened_out_of_fds".into(),
            self.open_failures.into(),
        );
        m.insert(
            "counters_since".into(),
            "each thread's first read by this source".into(),
        );
        m
    }
}
