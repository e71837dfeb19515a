//! The tick loop: sleeps to absolute deadlines, asks every host collector for its rows,
//! writes them, and decides when the episode ends.
//!
//! Deadlines are `origin + seq × interval` on CLOCK_MONOTONIC, so time spent sampling
//! never accumulates into drift. A deadline missed by more than one interval is not
//! caught up with a burst: the skipped ticks become a `gap` event and sampling resumes at
//! the next future deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;

use crate::clock::{self, EpisodeClock};
use crate::collector::{Collector, Tick, TickOutput};
use crate::episode::meta::SourceMeta;
use crate::episode::{telemetry_file, EventLog};
use crate::error::Error;
use crate::jsonl::{FileStats, JsonlWriter};
use crate::target::Target;

/// A collector with its stream and its counts.
pub struct Slot {
    pub collector: Box<dyn Collector>,
    pub writer: JsonlWriter,
    pub rows: u64,
    pub errors: u64,
    last_error: Option<String>,
}

impl Slot {
    pub fn new(collector: Box<dyn Collector>, dir: &std::path::Path) -> Result<Self, Error> {
        let writer = JsonlWriter::create(dir, &telemetry_file(collector.source()))?;
        Ok(Self {
            collector,
            writer,
            rows: 0,
            errors: 0,
            last_error: None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Duration,
    TargetExit,
    Signal,
    Error,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Duration => "duration",
            EndReason::TargetExit => "target_exit",
            EndReason::Signal => "signal",
            EndReason::Error => "error",
        }
    }
}

pub struct Outcome {
    pub end_reason: EndReason,
    pub error: Option<Error>,
    pub ticks_scheduled: u64,
    pub ticks_missed: u64,
}

pub struct Sampler {
    pub interval_ns: u64,
    pub duration_ns: Option<u64>,
    pub clock: EpisodeClock,
    pub slots: Vec<Slot>,
    pub events: EventLog,
    pub stop: Arc<AtomicBool>,
    pub target: Target,
    /// Progress counters for the live status line (slot order).
    pub live: Option<Arc<crate::status::LiveStats>>,
}

impl Sampler {
    pub fn run(&mut self) -> Outcome {
        let mut seq: u64 = 0;
        let mut missed: u64 = 0;
        let mut out = TickOutput::default();
        let (end_reason, error) = loop {
            let due = seq * self.interval_ns;
            if self.duration_ns.is_some_and(|d| due >= d) {
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
                self.events.emit(
                    "signal",
                    json!({"message": "SIGINT/SIGTERM received; closing the episode"}),
                );
                break (EndReason::Signal, None);
            }
            let now = self.clock.rel(clock::mono_raw_ns());
            if now > due + self.interval_ns {
                // Resume at the first deadline still in the future (bounded by the duration).
                let mut next = now / self.interval_ns + 1;
                if let Some(d) = self.duration_ns {
                    next = next.min(d.div_ceil(self.interval_ns));
                }
                for slot in &self.slots {
                    self.events.emit(
                        "gap",
                        json!({"source": slot.collector.source(), "from_seq": seq, "to_seq": next - 1,
                               "late_ns": now - due}),
                    );
                }
                missed += next - seq;
                if let Some(live) = &self.live {
                    live.missed(next - seq);
                }
                seq = next;
                continue;
            }
            if !self.target.alive() {
                self.events
                    .emit("target_exit", json!({"pid": self.target.pid()}));
                break (EndReason::TargetExit, None);
            }
            let tick = Tick {
                seq,
                scheduled_ns: due,
            };
            if let Err(e) = self.sample_all(tick, &mut out) {
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
        Outcome {
            end_reason,
            error,
            ticks_scheduled: seq,
            ticks_missed: missed,
        }
    }

    fn sample_all(&mut self, tick: Tick, out: &mut TickOutput) -> Result<(), Error> {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            out.clear();
            let res = slot.collector.collect(tick, &self.clock, out);
            for row in &out.rows {
                slot.writer.write_row(row)?;
            }
            slot.rows += out.rows.len() as u64;
            if let Some(live) = &self.live {
                let last = out.rows.last().map(|r| r.stamp.t_mono_ns);
                live.record(
                    i,
                    out.rows.len(),
                    last,
                    out.problems.len() + usize::from(res.is_err()),
                );
            }
            for problem in &out.problems {
                slot.errors += 1;
                self.events.emit(
                    "source_error",
                    json!({"source": slot.collector.source(), "message": problem}),
                );
            }
            if let Err(e) = res {
                // The target exiting mid-tick shows up here first; that is not a source error.
                if !self.target.alive() {
                    continue;
                }
                slot.errors += 1;
                let msg = e.to_string();
                // One event per distinct failure, not one per tick.
                if slot.last_error.as_deref() != Some(msg.as_str()) {
                    self.events.emit(
                        "source_error",
                        json!({"source": slot.collector.source(), "message": msg}),
                    );
                    slot.last_error = Some(msg);
                }
            } else {
                slot.last_error = None;
            }
            slot.writer.flush_if_due()?;
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
            let file = slot.writer.name().to_owned();
            metas.push(SourceMeta {
                name: slot.collector.source().to_owned(),
                file: file.clone(),
                available_in_deployment: slot.collector.available_in_deployment(),
                rows: slot.rows,
                errors: slot.errors,
                extra: slot.collector.summary(),
            });
            match slot.writer.close() {
                Ok(s) => stats.push(s),
                Err(e) => {
                    stats.push(FileStats {
                        name: file,
                        bytes: 0,
                        lines: 0,
                        sha256: String::new(),
                    });
                    first_err.get_or_insert(e);
                }
            }
        }
        (metas, stats, first_err)
    }
}
