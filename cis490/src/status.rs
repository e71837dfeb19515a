//! The live status line of `cis490 trace` on a terminal.
//!
//! The sampler bumps a few atomics per slot and tick ([`LiveStats`]; no locks, no
//! allocation on the sampling path). The main thread, which otherwise only waits for the
//! sampler, redraws one stderr line twice a second from them. Sources on their own
//! threads (QMP, agent) are not in the sampler's slots: their progress is read from the
//! growth of their telemetry files, so they need no hook.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::{self, EpisodeClock};
use crate::labels::Labels;

/// Progress of one sampler slot.
#[derive(Debug, Default)]
pub struct SourceLive {
    pub name: String,
    pub rows: AtomicU64,
    /// t_mono_ns of the newest row (0: none yet).
    pub last_row_ns: AtomicU64,
    pub errors: AtomicU64,
}

/// Shared between the sampler (writer) and the status line (reader).
#[derive(Debug, Default)]
pub struct LiveStats {
    pub sources: Vec<SourceLive>,
    /// Ticks skipped so far (sum of the `gap` events' ranges).
    pub ticks_missed: AtomicU64,
}

impl LiveStats {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            sources: names
                .into_iter()
                .map(|n| SourceLive {
                    name: n.to_owned(),
                    ..Default::default()
                })
                .collect(),
            ticks_missed: AtomicU64::new(0),
        }
    }

    /// Called by the sampler after slot `i` collected a tick.
    pub fn record(&self, i: usize, rows: usize, last_row_ns: Option<u64>, problems: usize) {
        if let Some(s) = self.sources.get(i) {
            s.rows.fetch_add(rows as u64, Ordering::Relaxed);
            if let Some(t) = last_row_ns {
                s.last_row_ns.store(t, Ordering::Relaxed);
            }
            if problems > 0 {
                s.errors.fetch_add(problems as u64, Ordering::Relaxed);
            }
        }
    }

    pub fn missed(&self, ticks: u64) {
        self.ticks_missed.fetch_add(ticks, Ordering::Relaxed);
    }
}

/// One source as shown on the line.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceView {
    pub name: String,
    /// Rows per second (sampler sources) or bytes per second (file-observed sources).
    pub rate: f64,
    pub per_bytes: bool,
    pub stale: bool,
    pub errors: u64,
}

/// The status text (pure, for tests).
pub fn format_line(
    elapsed_s: f64,
    phase: &str,
    sources: &[SourceView],
    ticks_missed: u64,
) -> String {
    let mut parts = vec![format!("{:>7.1}s", elapsed_s), format!("phase {phase}")];
    for s in sources {
        let mut p = if s.per_bytes {
            format!("{} {:.1}KB/s", s.name, s.rate / 1024.0)
        } else {
            format!("{} {:.0} rows/s", s.name, s.rate)
        };
        if s.errors > 0 {
            p.push_str(&format!(" ({} err)", s.errors));
        }
        if s.stale {
            p.push_str(" STALE");
        }
        parts.push(p);
    }
    parts.push(format!("gaps {ticks_missed} ticks"));
    let stale: Vec<&str> = sources
        .iter()
        .filter(|s| s.stale)
        .map(|s| s.name.as_str())
        .collect();
    if !stale.is_empty() {
        parts.push(format!("stale: {}", stale.join(",")));
    }
    parts.join(" | ")
}

fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        120
    }
}

/// Redraws the line; keeps the previous counts to turn totals into rates.
pub struct StatusLine<'a> {
    live: &'a LiveStats,
    labels: &'a Mutex<Labels>,
    dir: &'a Path,
    clock: EpisodeClock,
    stale_after_ns: u64,
    prev_rows: Vec<u64>,
    prev_at: Instant,
    files: BTreeMap<String, (u64, Instant)>,
}

impl<'a> StatusLine<'a> {
    pub fn new(
        live: &'a LiveStats,
        labels: &'a Mutex<Labels>,
        dir: &'a Path,
        clock: EpisodeClock,
        interval_ns: u64,
    ) -> Self {
        Self {
            live,
            labels,
            dir,
            clock,
            stale_after_ns: (3 * interval_ns).max(2_000_000_000),
            prev_rows: vec![0; live.sources.len()],
            prev_at: Instant::now(),
            files: BTreeMap::new(),
        }
    }

    fn views(&mut self) -> Vec<SourceView> {
        let now_ns = self.clock.rel(clock::mono_raw_ns());
        let dt = self.prev_at.elapsed().as_secs_f64().max(1e-3);
        self.prev_at = Instant::now();
        let mut out = Vec::new();
        for (i, s) in self.live.sources.iter().enumerate() {
            let rows = s.rows.load(Ordering::Relaxed);
            let last = s.last_row_ns.load(Ordering::Relaxed);
            let stale = now_ns.saturating_sub(last) > self.stale_after_ns;
            out.push(SourceView {
                name: s.name.clone(),
                rate: (rows - self.prev_rows[i]) as f64 / dt,
                per_bytes: false,
                stale,
                errors: s.errors.load(Ordering::Relaxed),
            });
            self.prev_rows[i] = rows;
        }
        // Background sources: watch their files grow.
        if let Ok(entries) = std::fs::read_dir(self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(src) = name.strip_prefix("telemetry-").and_then(|s| {
                    s.strip_suffix(".jsonl")
                        .or_else(|| s.strip_suffix(".jsonl.zst"))
                }) else {
                    continue;
                };
                if self.live.sources.iter().any(|s| s.name == src) {
                    continue;
                }
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                let now = Instant::now();
                let entry = self.files.entry(src.to_owned()).or_insert((size, now));
                let grew = size.saturating_sub(entry.0);
                let since_growth = if grew > 0 {
                    entry.1 = now;
                    Duration::ZERO
                } else {
                    now - entry.1
                };
                entry.0 = size;
                out.push(SourceView {
                    name: src.to_owned(),
                    rate: grew as f64 / dt,
                    per_bytes: true,
                    stale: since_growth > Duration::from_secs(5),
                    errors: 0,
                });
            }
        }
        out
    }

    pub fn render(&mut self) -> String {
        let phase = self
            .labels
            .lock()
            .map(|l| l.current().map_or("-", |p| p.as_str()))
            .unwrap_or("?");
        let views = self.views();
        let elapsed = self.clock.rel(clock::mono_raw_ns()) as f64 / 1e9;
        format_line(
            elapsed,
            phase,
            &views,
            self.live.ticks_missed.load(Ordering::Relaxed),
        )
    }
}

/// Redraw the status line on stderr about twice a second until `done()` is true, then
/// erase it.
pub fn run_until(
    done: impl Fn() -> bool,
    live: &Arc<LiveStats>,
    labels: &Mutex<Labels>,
    dir: &Path,
    clock: EpisodeClock,
    interval_ns: u64,
) {
    let mut line = StatusLine::new(live, labels, dir, clock, interval_ns);
    let mut next = Instant::now();
    let stderr = std::io::stderr();
    while !done() {
        if Instant::now() >= next {
            let text = line.render();
            let width = terminal_width().saturating_sub(1);
            let text: String = text.chars().take(width).collect();
            let _ = write!(stderr.lock(), "\r\x1b[2K{text}");
            // After a stall, redraw once rather than catching up.
            next = Instant::now() + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = write!(stderr.lock(), "\r\x1b[2K");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_rates_gaps_and_stale_sources() {
        let v = vec![
            SourceView {
                name: "proc".into(),
                rate: 20.0,
                per_bytes: false,
                stale: false,
                errors: 0,
            },
            SourceView {
                name: "qmp".into(),
                rate: 2048.0,
                per_bytes: true,
                stale: true,
                errors: 0,
            },
        ];
        let s = format_line(12.34, "armed", &v, 3);
        assert_eq!(
            s,
            "   12.3s | phase armed | proc 20 rows/s | qmp 2.0KB/s STALE | gaps 3 ticks | stale: qmp"
        );
    }

    #[test]
    fn record_accumulates() {
        let l = LiveStats::new(["proc"]);
        l.record(0, 5, Some(10), 0);
        l.record(0, 3, None, 1);
        l.record(7, 3, None, 0);
        l.missed(2);
        assert_eq!(l.sources[0].rows.load(Ordering::Relaxed), 8);
        assert_eq!(l.sources[0].last_row_ns.load(Ordering::Relaxed), 10);
        assert_eq!(l.sources[0].errors.load(Ordering::Relaxed), 1);
        assert_eq!(l.ticks_missed.load(Ordering::Relaxed), 2);
    }
}
