//! The tick loop: sleeps to absolute deadlines, asks every host collector for its rows,
//! writes them, and decides when the episode ends.
//!
//! Deadlines are `origin + seq × interval` on CLOCK_MONOTONIC, so time spent sampling
//! never accumulates into drift. A deadline missed by more than one interval is not
//! caught up with a burst: the skipped ticks become a `gap` event and sampling resumes at
//! the next future deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::contract::events::Event;
use serde_json::json;

use crate::clock::{self, EpisodeClock};
use crate::collector::{Collector, Sink, Tick, TickOutput};
use crate::episode::meta::SourceMeta;
use crate::episode::{telemetry_file, EventLog};
use crate::error::Error;
use crate::jsonl::{Compression, FileStats, JsonlWriter};
use crate::target::Target;

/// A polled source with its streams.
pub struct Slot {
    pub collector: Box<dyn Collector>,
    pub streams: Vec<StreamSlot>,
}

/// One stream of a slot: its writer and counts.
pub struct StreamSlot {
    pub stream: crate::collector::Stream,
    pub writer: JsonlWriter,
    pub rows: u64,
    pub errors: u64,
    last_error: Option<String>,
}

impl Slot {
    pub fn new(
        collector: Box<dyn Collector>,
        dir: &crate::episode::EpisodeDir,
        compression: Compression,
    ) -> Result<Self, Error> {
        let mut streams = Vec::new();
        for stream in collector.streams() {
            let writer =
                JsonlWriter::create_with(dir, &telemetry_file(stream.source), compression)?;
            streams.push(StreamSlot {
                stream,
                writer,
                rows: 0,
                errors: 0,
                last_error: None,
            });
        }
        Ok(Self { collector, streams })
    }
}

/// The sink a slot's source fills during one tick: each flush writes the output's rows to
/// the stream's file and its problems and gaps to events.jsonl.
struct SlotSink<'a> {
    streams: &'a mut [StreamSlot],
    out: &'a mut TickOutput,
    events: &'a EventLog,
    live: Option<&'a crate::status::LiveStats>,
    /// The first stream's number across all slots (the live status line's index).
    base: usize,
    /// The first write error: the capture ends with it once the source returns.
    write_error: Option<Error>,
}

impl crate::collector::Sink for SlotSink<'_> {
    fn out(&mut self) -> &mut TickOutput {
        self.out
    }

    fn flush(&mut self, stream: usize) {
        let out = &mut *self.out;
        let Some(s) = self.streams.get_mut(stream) else {
            // Not a stream of this source: a bug, kept visible rather than lost silently.
            out.problem(format!(
                "rows for stream #{stream}, which this source does not have"
            ));
            return;
        };
        if self.write_error.is_none() {
            for row in out.rows() {
                if let Err(e) = s.writer.write_row(row) {
                    self.write_error = Some(e);
                    break;
                }
            }
        }
        s.rows += out.rows().len() as u64;
        if let Some(live) = self.live {
            let last = out.rows().last().map(|r| r.stamp.t_mono_ns);
            live.record(
                self.base + stream,
                out.rows().len(),
                last,
                out.problems.len(),
            );
        }
        for (from, to) in &out.gaps {
            self.events
                .record(&Event::gap(s.stream.source, *from, *to, None));
        }
        for problem in &out.problems {
            s.errors += 1;
            self.events
                .record(&Event::source_error(s.stream.source, problem));
        }
        out.clear();
    }
}

/// Why the sampling loop ended: the contract's end reasons (the loop never ends as
/// `Recovered`, which only `cis490 recover` writes).
pub use crate::contract::EndReason;

pub struct Outcome {
    /// How late each sampled tick woke up (ns after its deadline).
    pub lateness: LatenessHistogram,
    /// The scheduling policy the sampler thread ran under.
    pub policy: SamplerPolicy,
    pub end_reason: EndReason,
    pub error: Option<Error>,
    pub ticks_scheduled: u64,
    pub ticks_missed: u64,
}

pub struct Sampler {
    /// Whether to run the sampler thread SCHED_FIFO (`--realtime` / `--no-realtime`).
    pub realtime: Realtime,
    pub interval_ns: u64,
    /// The kernel snapshots' period, when the BPF snapshot sources run.
    pub kernel_interval_ns: Option<u64>,
    pub duration_ns: Option<u64>,
    pub clock: EpisodeClock,
    pub slots: Vec<Slot>,
    pub events: EventLog,
    pub stop: Arc<AtomicBool>,
    pub target: Target,
    /// Progress counters for the live status line (slot order).
    pub live: Option<Arc<crate::status::LiveStats>>,
    /// The one output every source fills, reused across ticks and streams.
    pub out: TickOutput,
}

impl Sampler {
    pub fn run(&mut self) -> Outcome {
        let policy = tune_sampler_thread(self.realtime, self.interval_ns, &self.events);
        let mut seq: u64 = 0;
        let mut missed: u64 = 0;
        let mut lateness = LatenessHistogram::default();
        let (end_reason, error) = loop {
            let due = seq * self.interval_ns;
            if let Some(d) = self.duration_ns.filter(|&d| due >= d) {
                // Close at the requested duration, not at the last tick before it.
                clock::sleep_until_mono(self.clock.mono_origin_ns + d);
                break (EndReason::Duration, None);
            }
            // A signal interrupts the sleep only if it lands on this thread; otherwise the
            // flag is seen at the deadline, at most one interval later.
            while !clock::sleep_until_mono(self.clock.mono_origin_ns + due) {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                self.events.record(&Event::Signal {
                    message: "SIGINT/SIGTERM received; closing the episode".into(),
                });
                break (EndReason::Signal, None);
            }
            let now = self.clock.rel(clock::mono_raw_ns());
            if now > due + self.interval_ns {
                // Resume at the first deadline still in the future (bounded by the duration).
                let mut next = now / self.interval_ns + 1;
                if let Some(d) = self.duration_ns {
                    next = next.min(d.div_ceil(self.interval_ns));
                }
                for slot in self
                    .slots
                    .iter()
                    .filter(|s| !s.collector.kernel_clocked() && !s.collector.own_schedule())
                {
                    for s in &slot.streams {
                        self.events.record(&Event::gap(
                            s.stream.source,
                            seq,
                            next - 1,
                            Some(now - due),
                        ));
                    }
                }
                missed += next - seq;
                if let Some(live) = &self.live {
                    live.missed(next - seq);
                }
                seq = next;
                continue;
            }
            lateness.record(now.saturating_sub(due));
            if !self.target.alive() {
                self.events.record(&Event::TargetExit {
                    pid: self.target.pid().into(),
                });
                break (EndReason::TargetExit, None);
            }
            let tick = Tick {
                seq,
                scheduled_ns: due,
            };
            if let Err(e) = self.sample_all(tick, false) {
                break (EndReason::Error, Some(e));
            }
            if let Some(msg) = self.events.failure() {
                break (
                    EndReason::Error,
                    Some(Error::Other(format!("events.jsonl: {msg}"))),
                );
            }
            seq += 1;
        };
        // What the kernel snapshot sources wrote since the last drain. When the target has
        // exited, first let the kernel take one more snapshot: what its threads did after
        // the latest one (the kvm source's last exits, say) belongs to that next tick.
        if let (EndReason::TargetExit, None, Some(k)) =
            (end_reason, &error, self.kernel_interval_ns)
        {
            let wait = (k + k / 10 + 2_000_000).min(1_100_000_000);
            clock::sleep_until_mono(clock::mono_raw_ns() + wait);
        }
        let error = match error {
            None => {
                let last = Tick {
                    seq,
                    scheduled_ns: seq * self.interval_ns,
                };
                self.sample_all(last, true).err()
            }
            e => e,
        };
        let end_reason = if error.is_some() {
            EndReason::Error
        } else {
            end_reason
        };
        Outcome {
            lateness,
            policy,
            end_reason,
            error,
            ticks_scheduled: seq,
            ticks_missed: missed,
        }
    }

    /// Run every collector for `tick` (`only_kernel_clocked`: just the kernel snapshot
    /// sources, for the final drain).
    fn sample_all(&mut self, tick: Tick, only_kernel_clocked: bool) -> Result<(), Error> {
        // Streams are numbered across slots for the live status line.
        let mut base = 0;
        for slot in self.slots.iter_mut() {
            let n = slot.streams.len();
            if only_kernel_clocked && !slot.collector.kernel_clocked() {
                base += n;
                continue;
            }
            self.out.clear();
            let mut sink = SlotSink {
                streams: &mut slot.streams,
                out: &mut self.out,
                events: &self.events,
                live: self.live.as_deref(),
                base,
                write_error: None,
            };
            let res = slot.collector.collect(tick, &self.clock, &mut sink);
            // What a single-stream source left in the output is its stream's.
            sink.flush(0);
            if let Some(e) = sink.write_error.take() {
                return Err(e);
            }
            // A source that cannot go on this tick: reported on its first stream.
            let first = &mut slot.streams[0];
            if let Err(e) = res {
                // The target exiting mid-tick shows up here first; that is not a source error.
                // Its threads vanish from /proc a moment before the pidfd reports the exit,
                // so give an exit in progress a short while to complete.
                if !self
                    .target
                    .exits_within(std::time::Duration::from_millis(100))
                {
                    first.errors += 1;
                    if let Some(live) = &self.live {
                        live.record(base, 0, None, 1);
                    }
                    let msg = e.to_string();
                    // One event per distinct failure, not one per tick.
                    if first.last_error.as_deref() != Some(msg.as_str()) {
                        self.events
                            .record(&Event::source_error(first.stream.source, &msg));
                        first.last_error = Some(msg);
                    }
                }
            } else {
                first.last_error = None;
            }
            for s in &mut slot.streams {
                s.writer.flush_if_due()?;
            }
            base += n;
        }
        Ok(())
    }

    /// Close every stream: the `meta.sources[]` entries, the manifest entries, and the
    /// first close error (a full disk shows up here at the latest).
    pub fn close_streams(slots: Vec<Slot>) -> (Vec<SourceMeta>, Vec<FileStats>, Option<Error>) {
        let mut metas = Vec::new();
        let mut stats = Vec::new();
        let mut first_err = None;
        for slot in slots {
            for (i, s) in slot.streams.into_iter().enumerate() {
                let file = s.writer.name().to_owned();
                metas.push(SourceMeta {
                    name: s.stream.source.to_owned(),
                    file: file.clone(),
                    available_in_deployment: s.stream.available_in_deployment,
                    rows: s.rows,
                    errors: s.errors,
                    extra: slot.collector.summary(i),
                });
                match s.writer.close() {
                    Ok(st) => stats.push(st),
                    Err(e) => {
                        stats.push(FileStats::unknown(file));
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        (metas, stats, first_err)
    }
}

/// `--realtime` (on), `--no-realtime` (off), or neither (auto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Realtime {
    /// SCHED_FIFO at rates of [`AUTO_REALTIME_MIN_HZ`] and above, when permitted.
    Auto,
    On,
    Off,
}

impl Realtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Realtime::Auto => "auto",
            Realtime::On => "on",
            Realtime::Off => "off",
        }
    }
}

/// From this rate up (a tick every 10 ms or less) `auto` asks for SCHED_FIFO. Under the
/// default policy the sampler waits behind runnable threads (the target's own, or a
/// build) for up to a few ms: measured at 1 kHz, 204 of 60 000 ticks missed on an idle
/// machine versus 4 with SCHED_FIFO (BENCHMARKS.md, section 4). At 10 Hz such delays
/// cost nothing.
pub const AUTO_REALTIME_MIN_HZ: u64 = 100;

/// SCHED_FIFO priority of the sampler: above normal threads, below the kernel's own
/// (threaded IRQs run at 50).
const SAMPLER_PRIORITY: i32 = 10;

/// What the sampler thread ran under (`meta.result.sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerPolicy {
    pub requested: Realtime,
    pub fifo: bool,
}

impl SamplerPolicy {
    pub fn summary(&self) -> serde_json::Value {
        json!({
            "policy": if self.fifo { "SCHED_FIFO" } else { "SCHED_OTHER" },
            "priority": if self.fifo { SAMPLER_PRIORITY } else { 0 },
            "realtime": self.requested.as_str(),
        })
    }
}

/// Make this (the sampler's) thread wake on time. The default timer slack of 50 µs
/// would add up to 50 µs to every deadline, so it is set to 1 ns. SCHED_FIFO lets the
/// sampler preempt busy threads at its deadlines; it needs CAP_SYS_NICE (or an
/// RLIMIT_RTPRIO), and the outcome is an event whenever it was tried.
fn tune_sampler_thread(realtime: Realtime, interval_ns: u64, events: &EventLog) -> SamplerPolicy {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    let want = match realtime {
        Realtime::On => true,
        Realtime::Off => false,
        Realtime::Auto => interval_ns <= 1_000_000_000 / AUTO_REALTIME_MIN_HZ,
    };
    let mut policy = SamplerPolicy {
        requested: realtime,
        fifo: false,
    };
    if !want {
        return policy;
    }
    // SAFETY: sched_param is plain data; musl's has extra fields, so start from zero.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = SAMPLER_PRIORITY;
    // SAFETY: sets this thread's own scheduling policy with a valid param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        policy.fifo = true;
        events.record(&Event::SamplerRealtime {
            ok: true,
            realtime: realtime.as_str().into(),
            policy: Some("SCHED_FIFO".into()),
            priority: Some(SAMPLER_PRIORITY as u64),
            message: None,
        });
    } else {
        let e = std::io::Error::last_os_error();
        events.record(&Event::SamplerRealtime {
            ok: false,
            realtime: realtime.as_str().into(),
            policy: None,
            priority: None,
            message: Some(format!(
                "SCHED_FIFO refused: {e}; sampling at normal priority"
            )),
        });
        if realtime == Realtime::On {
            tracing::warn!("--realtime: SCHED_FIFO refused ({e}); sampling at normal priority");
        }
    }
    policy
}

/// Wake-up lateness of sampled ticks: 1 µs buckets up to 100 ms, then one overflow
/// bucket, plus the exact maximum. Fixed size (400 KiB) whatever the capture length.
pub struct LatenessHistogram {
    buckets: Vec<u32>,
    overflow: u64,
    count: u64,
    max_ns: u64,
}

const LATENESS_BUCKETS: usize = 100_000;

impl Default for LatenessHistogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; LATENESS_BUCKETS],
            overflow: 0,
            count: 0,
            max_ns: 0,
        }
    }
}

impl LatenessHistogram {
    pub fn record(&mut self, late_ns: u64) {
        self.count += 1;
        self.max_ns = self.max_ns.max(late_ns);
        match self.buckets.get_mut((late_ns / 1000) as usize) {
            Some(b) => *b = b.saturating_add(1),
            None => self.overflow += 1,
        }
    }

    /// The q-quantile (0..=1) in ns, to 1 µs (the upper edge of its bucket).
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return Some(((i as u64 + 1) * 1000).min(self.max_ns));
            }
        }
        Some(self.max_ns)
    }

    /// `{count, p50_ns, p99_ns, max_ns}` for meta.result.tick_lateness.
    pub fn summary(&self) -> serde_json::Value {
        json!({"count": self.count, "p50_ns": self.quantile_ns(0.5), "p99_ns": self.quantile_ns(0.99), "max_ns": self.max_ns})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_quantiles() {
        let mut h = LatenessHistogram::default();
        assert_eq!(h.quantile_ns(0.5), None);
        for i in 0..100u64 {
            h.record(i * 1000 + 500);
        }
        h.record(5_000_000_000);
        assert_eq!(h.quantile_ns(0.5), Some(51_000));
        assert_eq!(h.quantile_ns(0.99), Some(100_000));
        assert_eq!(h.quantile_ns(1.0), Some(5_000_000_000));
        assert_eq!(h.summary()["max_ns"], 5_000_000_000u64);
    }
}
