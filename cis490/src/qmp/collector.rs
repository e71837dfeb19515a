//! The `qmp` source: its own thread, its own schedule (`--qmp-rate-hz`), its own stream.
//!
//! Before the capture's sampling starts, [`QmpSource::start`] connects and asks
//! query-cpus-fast synchronously (at most [`STARTUP_BUDGET`]), so the shared [`VcpuMap`]
//! is filled before the first host snapshot and `vcpu` never starts as null on a vCPU
//! thread. Each thread id QMP names is checked against /proc/<target>/task: a foreign one
//! is reported (`qmp_vcpu_mismatch`) and never used.
//!
//! At connect: query-version, query-cpus-fast (→ the shared [`VcpuMap`] so host rows get
//! their `vcpu` column, and meta.vm.vcpu_threads), query-name, query-memory-size-summary,
//! query-stats-schemas. Per poll: query-status, query-stats for the `vm` and `vcpu`
//! targets the schemas list (nothing under TCG: no rows of that kind, not an error), and
//! query-blockstats. Each row carries the instants its request was sent and its reply
//! read (`t_request_mono_ns`, `t_mono_ns`), their midpoint `t_sample_mono_ns` (the best
//! estimate of when QEMU read the values) and `rtt_ns`. Asynchronous QMP events go to
//! events.jsonl as `qmp_event`, behind the transport's rate limit; drops are summarized
//! in `qmp_events_dropped` at most once a second.
//!
//! Any transport fault (refused, closed, stalled past the command timeout, garbage)
//! drops the connection, emits `source_stale` once, and reconnects with backoff
//! (100 ms doubling to 2 s); `source_recovered` follows the next successful handshake.
//! Nothing here shares a lock or a thread with the host sampler.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value as Json};

use super::parse::{self, Schemas, VcpuInfo};
use super::transport::{EventDrops, QmpConn, QmpError, EVENT_BURST, EVENT_RATE_PER_S};
use crate::collector::{BackgroundSource, SourceContext};
use crate::contract::events::Event;
use crate::episode::meta::SourceMeta;
use crate::episode::telemetry_file;
use crate::error::Error;
use crate::jsonl::{FileStats, JsonlWriter};
use crate::row::Row;
use crate::sampler::LatenessHistogram;

pub const SOURCE: &str = "qmp";

/// The most [`QmpSource::start`] waits for the first query-cpus-fast (connect, greeting
/// and reply) before the capture samples anyway.
pub const STARTUP_BUDGET: Duration = Duration::from_secs(1);
/// Foreign vCPU thread ids listed in one `qmp_vcpu_mismatch` event (the count is whole).
const MISMATCHES_LISTED: usize = 16;
/// Distinct stat-name collisions reported as events (all are counted).
const COLLISIONS_REPORTED: usize = 32;

#[derive(Debug, Clone)]
pub struct QmpConfig {
    pub socket: PathBuf,
    /// The traced QEMU: vCPU thread ids QMP names must be threads of this process.
    pub target_pid: u32,
    pub rate_hz: u32,
    /// Longest wait for one reply before the connection is declared stalled.
    pub command_timeout: Duration,
}

/// What QMP told us about the VM (for meta.json).
#[derive(Debug, Clone, Default)]
pub struct QmpFacts {
    pub qemu_version: Option<String>,
    /// vCPUs whose thread id is a thread of the target (foreign ones are left out).
    pub vcpus: Vec<VcpuInfo>,
    /// How many vCPUs query-cpus-fast listed, foreign thread ids included.
    pub vcpus_reported: usize,
    pub name: Option<String>,
    pub ram_mib: Option<u64>,
    /// True once the start queries completed on some connection.
    pub ready: bool,
}

#[derive(Default)]
struct Shared {
    facts: Mutex<QmpFacts>,
    rows: AtomicU64,
    errors: AtomicU64,
    connects: AtomicU64,
    stale_count: AtomicU64,
    polls: AtomicU64,
    polls_missed: AtomicU64,
    events: AtomicU64,
    events_rate_limited: AtomicU64,
    events_queue_full: AtomicU64,
    event_data_dropped: AtomicU64,
    lines_oversized: AtomicU64,
    stat_name_collisions: AtomicU64,
    vcpu_tid_mismatches: AtomicU64,
    stats_targets: Mutex<Vec<String>>,
    /// `rtt_ns` of the rows (request sent → reply read), summarized at the end.
    rtt: Mutex<Option<Json>>,
}

pub struct QmpSource {
    cfg: QmpConfig,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<Result<FileStats, Error>>>,
}

impl QmpSource {
    pub fn start(cfg: QmpConfig, ctx: &SourceContext) -> Result<Self, Error> {
        let writer = JsonlWriter::create(&ctx.dir, &telemetry_file(SOURCE))?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let mut worker = Worker {
            cfg: cfg.clone(),
            ctx: ctx.clone(),
            stop: stop.clone(),
            shared: shared.clone(),
            writer,
            interval_ns: 1_000_000_000 / u64::from(cfg.rate_hz.max(1)),
            origin_ns: ctx.clock.stamp().t_mono_ns,
            seq: 0,
            last_error: None,
            schemas: Schemas::default(),
            by_qom: HashMap::new(),
            last_mismatch: Vec::new(),
            collisions_seen: HashSet::new(),
            drops_reported: EventDrops::default(),
            last_drop_summary: None,
            rtt: LatenessHistogram::default(),
        };
        let mut conn = QmpConn::new(&cfg.socket);
        // Before any host sampling: the vCPU map, so the first snapshot has `vcpu`.
        worker.prefetch_vcpus(&mut conn);
        let handle = std::thread::Builder::new()
            .name("cis490-qmp".into())
            .spawn(move || worker.run(conn))
            .map_err(|e| Error::io("spawning the QMP thread", e))?;
        Ok(Self {
            cfg,
            stop,
            shared,
            handle: Some(handle),
        })
    }

    /// A handle on the facts that outlives the boxed source (read again at the end).
    pub fn facts_handle(&self) -> FactsHandle {
        FactsHandle(self.shared.clone())
    }
}

#[derive(Clone)]
pub struct FactsHandle(Arc<Shared>);

impl FactsHandle {
    pub fn get(&self) -> QmpFacts {
        self.0
            .facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wait up to `timeout` for the start queries; returns the facts either way.
    pub fn wait(&self, timeout: Duration) -> QmpFacts {
        let until = Instant::now() + timeout;
        loop {
            let f = self.get();
            if f.ready || Instant::now() >= until {
                return f;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl BackgroundSource for QmpSource {
    fn source(&self) -> &'static str {
        SOURCE
    }

    fn finish(mut self: Box<Self>) -> (SourceMeta, Result<FileStats, Error>) {
        let stats = crate::collector::stop_and_join(&self.stop, self.handle.take(), "QMP");
        let s = &self.shared;
        let mut extra = Map::new();
        extra.insert(
            "socket".into(),
            self.cfg.socket.display().to_string().into(),
        );
        extra.insert("rate_hz".into(), self.cfg.rate_hz.into());
        extra.insert("connects".into(), s.connects.load(Ordering::Relaxed).into());
        extra.insert(
            "stale_count".into(),
            s.stale_count.load(Ordering::Relaxed).into(),
        );
        extra.insert("polls".into(), s.polls.load(Ordering::Relaxed).into());
        extra.insert(
            "polls_missed".into(),
            s.polls_missed.load(Ordering::Relaxed).into(),
        );
        extra.insert("qmp_events".into(), s.events.load(Ordering::Relaxed).into());
        let rate_limited = s.events_rate_limited.load(Ordering::Relaxed);
        let queue_full = s.events_queue_full.load(Ordering::Relaxed);
        extra.insert("events_dropped".into(), (rate_limited + queue_full).into());
        extra.insert(
            "events_dropped_by_reason".into(),
            json!({"rate_limited": rate_limited, "queue_full": queue_full}),
        );
        extra.insert(
            "event_data_dropped".into(),
            s.event_data_dropped.load(Ordering::Relaxed).into(),
        );
        extra.insert(
            "event_limit".into(),
            json!({"rate_per_s": EVENT_RATE_PER_S, "burst": EVENT_BURST}),
        );
        extra.insert(
            "lines_oversized".into(),
            s.lines_oversized.load(Ordering::Relaxed).into(),
        );
        extra.insert(
            "stat_name_collisions".into(),
            s.stat_name_collisions.load(Ordering::Relaxed).into(),
        );
        extra.insert(
            "vcpu_tid_mismatches".into(),
            s.vcpu_tid_mismatches.load(Ordering::Relaxed).into(),
        );
        let rtt = s
            .rtt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(Json::Null);
        // A row's values were read by QEMU somewhere between request and reply: its
        // t_sample_mono_ns (the midpoint) is off by at most half the round trip.
        let half = |k: &str| rtt.get(k).and_then(Json::as_u64).map(|v| v / 2);
        extra.insert(
            "sample_uncertainty_ns".into(),
            json!({"p50_ns": half("p50_ns"), "p99_ns": half("p99_ns"), "max_ns": half("max_ns")}),
        );
        extra.insert("rtt_ns".into(), rtt);
        extra.insert(
            "stats_targets".into(),
            json!(*s.stats_targets.lock().unwrap_or_else(|p| p.into_inner())),
        );
        extra.insert(
            "histograms".into(),
            "summarized: <name>_count (sum of buckets) + <name>_buckets (comma-separated)".into(),
        );
        let meta = SourceMeta {
            name: SOURCE.into(),
            file: telemetry_file(SOURCE),
            available_in_deployment: false,
            rows: s.rows.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            extra,
        };
        (meta, stats)
    }
}

impl Drop for QmpSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Sleep `d` in small steps; false if `stop` was raised meanwhile.
pub(crate) fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(20)));
    }
    !stop.load(Ordering::SeqCst)
}

struct Worker {
    cfg: QmpConfig,
    ctx: SourceContext,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    writer: JsonlWriter,
    interval_ns: u64,
    origin_ns: u64,
    seq: u64,
    last_error: Option<String>,
    schemas: Schemas,
    /// qom_path → (vCPU index, its thread id when that is a thread of the target).
    by_qom: HashMap<String, (u32, Option<u32>)>,
    /// The foreign (index, tid) pairs last reported, so a reconnect does not repeat them.
    last_mismatch: Vec<(u32, u32)>,
    collisions_seen: HashSet<String>,
    drops_reported: EventDrops,
    last_drop_summary: Option<Instant>,
    rtt: LatenessHistogram,
}

/// Split QMP's vCPU list into those whose thread id `is_ours` accepts and the rest (a
/// thread id listed twice is foreign the second time: one thread is one vCPU).
pub fn split_foreign(
    vcpus: Vec<VcpuInfo>,
    is_ours: impl Fn(u32) -> bool,
) -> (Vec<VcpuInfo>, Vec<VcpuInfo>) {
    let mut seen = HashSet::new();
    vcpus
        .into_iter()
        .partition(|c| is_ours(c.tid) && seen.insert(c.tid))
}

/// Whether `tid` is a thread of process `pid` (its /proc/<pid>/task/<tid> exists).
pub fn is_thread_of(proc_root: &Path, pid: u32, tid: u32) -> bool {
    tid != 0
        && proc_root
            .join(pid.to_string())
            .join("task")
            .join(tid.to_string())
            .is_dir()
}

enum Fault {
    /// The connection is unusable: reconnect.
    Transport(String),
    /// Writing the stream failed: the source cannot go on.
    Write(Error),
}

impl From<QmpError> for Fault {
    fn from(e: QmpError) -> Self {
        Fault::Transport(e.to_string())
    }
}

/// Request and reply instants of what a row holds.
#[derive(Clone, Copy)]
struct Span {
    request: crate::clock::Stamp,
    reply: crate::clock::Stamp,
}

impl Worker {
    /// The synchronous part of the start: connect and fill the vCPU map, within
    /// [`STARTUP_BUDGET`]. Quietly leaves the connection closed on any failure; the
    /// thread then connects (and reports) as usual.
    fn prefetch_vcpus(&mut self, conn: &mut QmpConn) {
        use qapi::qmp::query_cpus_fast;
        let until = Instant::now() + STARTUP_BUDGET;
        if conn.open(STARTUP_BUDGET).is_err() {
            return;
        }
        self.shared.connects.fetch_add(1, Ordering::Relaxed);
        let left = until.saturating_duration_since(Instant::now());
        match conn.run(&query_cpus_fast {}, left.max(Duration::from_millis(50))) {
            Ok(v) => match parse::vcpus(v) {
                Ok(c) => {
                    let facts = self.apply_vcpus(c);
                    let mut f = self.shared.facts.lock().unwrap_or_else(|p| p.into_inner());
                    (f.vcpus, f.vcpus_reported) = facts;
                }
                Err(e) => self.parse_problem("query-cpus-fast", e),
            },
            Err(e @ QmpError::Command { .. }) => self.command_error("query-cpus-fast", &e),
            // Slow or broken: the thread starts over with its own timeouts.
            Err(_) => conn.close(),
        }
    }

    fn run(mut self, mut conn: QmpConn) -> Result<FileStats, Error> {
        let mut backoff = Duration::from_millis(100);
        let mut stale = false;
        let mut write_err = None;
        while !self.stop.load(Ordering::SeqCst) {
            if !conn.is_open() {
                if let Err(e) = conn.open(self.cfg.command_timeout) {
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    self.update_counters(&conn);
                    if !stale {
                        stale = true;
                        self.mark_stale(&e.to_string());
                    }
                    if !sleep_unless(&self.stop, backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
                self.shared.connects.fetch_add(1, Ordering::Relaxed);
            }
            backoff = Duration::from_millis(100);
            if stale {
                self.ctx.events.record(&Event::SourceRecovered {
                    source: SOURCE.into(),
                    socket: Some(self.cfg.socket.display().to_string()),
                });
            }
            match self.session(&mut conn) {
                Ok(()) => break,
                Err(Fault::Transport(msg)) => {
                    conn.close();
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    stale = true;
                    self.mark_stale(&msg);
                }
                Err(Fault::Write(e)) => {
                    self.ctx.events.record(&Event::SourceError {
                        source: SOURCE.into(),
                        message: e.to_string(),
                        fatal: Some(true),
                    });
                    write_err = Some(e);
                    break;
                }
            }
        }
        // Events read but not yet written still go out (they passed the rate limit).
        self.drain_events(&mut conn);
        self.update_counters(&conn);
        *self.shared.rtt.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.rtt.summary());
        let closed = self.writer.close();
        match write_err {
            Some(e) => Err(e),
            None => closed,
        }
    }

    /// Copy the transport's cumulative counters into the shared ones (for meta.json).
    fn update_counters(&self, conn: &QmpConn) {
        let d = conn.events.drops;
        let s = &self.shared;
        s.events_rate_limited
            .store(d.rate_limited, Ordering::Relaxed);
        s.events_queue_full.store(d.queue_full, Ordering::Relaxed);
        s.event_data_dropped
            .store(d.data_dropped, Ordering::Relaxed);
        s.lines_oversized
            .store(conn.lines_oversized(), Ordering::Relaxed);
    }

    fn mark_stale(&self, reason: &str) {
        self.shared.stale_count.fetch_add(1, Ordering::Relaxed);
        self.ctx.events.record(&Event::SourceStale {
            source: SOURCE.into(),
            socket: Some(self.cfg.socket.display().to_string()),
            message: reason.into(),
        });
    }

    /// A command error (QEMU said no): counted, one event per distinct message.
    fn command_error(&mut self, what: &str, e: &QmpError) {
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
        let msg = format!("{what}: {e}");
        if self.last_error.as_deref() != Some(msg.as_str()) {
            self.ctx.events.record(&Event::source_error(SOURCE, &msg));
            self.last_error = Some(msg);
        }
    }

    /// Run a command; a QEMU error reply (or a skipped oversized reply) is reported and
    /// gives None, a transport fault ends the session.
    fn cmd(
        &mut self,
        conn: &mut QmpConn,
        name: &str,
        args: Option<Json>,
    ) -> Result<Option<Json>, Fault> {
        match conn.execute(name, args, self.cfg.command_timeout) {
            Ok(v) => Ok(Some(v)),
            Err(e @ (QmpError::Command { .. } | QmpError::Oversized)) => {
                self.command_error(name, &e);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn typed<C: qapi::Command>(
        &mut self,
        conn: &mut QmpConn,
        cmd: &C,
    ) -> Result<Option<Json>, Fault> {
        match conn.run(cmd, self.cfg.command_timeout) {
            Ok(v) => Ok(Some(v)),
            Err(e @ (QmpError::Command { .. } | QmpError::Oversized)) => {
                self.command_error(C::NAME, &e);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn parse_problem(&mut self, what: &str, msg: String) {
        self.command_error(what, &QmpError::Transport(msg));
    }

    fn start_queries(&mut self, conn: &mut QmpConn) -> Result<(), Fault> {
        use qapi::qmp::{
            query_cpus_fast, query_memory_size_summary, query_name, query_stats_schemas,
            query_version,
        };
        let mut facts = QmpFacts::default();
        if let Some(v) = self.typed(conn, &query_version {})? {
            match parse::version_string(v) {
                Ok(s) => facts.qemu_version = Some(s),
                Err(e) => self.parse_problem("query-version", e),
            }
        }
        if let Some(v) = self.typed(conn, &query_cpus_fast {})? {
            match parse::vcpus(v) {
                Ok(c) => (facts.vcpus, facts.vcpus_reported) = self.apply_vcpus(c),
                Err(e) => self.parse_problem("query-cpus-fast", e),
            }
        }
        if let Some(v) = self.typed(conn, &query_name {})? {
            match parse::vm_name(v) {
                Ok(n) => facts.name = n,
                Err(e) => self.parse_problem("query-name", e),
            }
        }
        if let Some(v) = self.typed(conn, &query_memory_size_summary {})? {
            match parse::ram_mib(v) {
                Ok(m) => facts.ram_mib = Some(m),
                Err(e) => self.parse_problem("query-memory-size-summary", e),
            }
        }
        self.schemas = Schemas::default();
        if let Some(v) = self.typed(conn, &query_stats_schemas { provider: None })? {
            match Schemas::parse(v) {
                Ok(s) => self.schemas = s,
                Err(e) => self.parse_problem("query-stats-schemas", e),
            }
        }
        let targets: Vec<String> = ["vm", "vcpu"]
            .iter()
            .filter(|t| self.schemas.has(t))
            .map(|t| t.to_string())
            .collect();
        self.ctx.events.record(&Event::QmpConnected {
            source: SOURCE.into(),
            qemu_version: facts.qemu_version.clone(),
            vm_name: facts.name.clone(),
            vcpu_threads: facts
                .vcpus
                .iter()
                .map(|c| json!({"index": c.index, "tid": c.tid}))
                .collect(),
            stats_targets: json!(targets),
            stats_vm_count: self.schemas.stat_count("vm") as u64,
            stats_vcpu_count: self.schemas.stat_count("vcpu") as u64,
        });
        *self
            .shared
            .stats_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = targets;
        facts.ready = true;
        *self.shared.facts.lock().unwrap_or_else(|p| p.into_inner()) = facts;
        Ok(())
    }

    /// Check QMP's vCPU thread ids against the target's threads, report foreign ones,
    /// and publish the verified ones (the shared vCPU map, the `vcpu`/`tid` of vcpu rows).
    /// Returns (verified vCPUs, how many QMP listed).
    fn apply_vcpus(&mut self, listed: Vec<VcpuInfo>) -> (Vec<VcpuInfo>, usize) {
        let reported = listed.len();
        let pid = self.cfg.target_pid;
        let (ours, foreign) =
            split_foreign(listed, |tid| is_thread_of(Path::new("/proc"), pid, tid));
        self.shared
            .vcpu_tid_mismatches
            .store(foreign.len() as u64, Ordering::Relaxed);
        let pairs: Vec<(u32, u32)> = foreign.iter().map(|c| (c.index, c.tid)).collect();
        if !pairs.is_empty() && pairs != self.last_mismatch {
            self.ctx.events.record(&Event::QmpVcpuMismatch {
                source: SOURCE.into(),
                target_pid: pid.into(),
                message: "query-cpus-fast names thread ids that are not threads of the target (or lists one twice); they are not used".into(),
                foreign_count: pairs.len() as u64,
                foreign: pairs
                    .iter()
                    .take(MISMATCHES_LISTED)
                    .map(|(index, tid)| json!({"index": index, "tid": tid}))
                    .collect(),
            });
        }
        self.last_mismatch = pairs;
        self.by_qom = ours
            .iter()
            .map(|c| (c.qom_path.clone(), (c.index, Some(c.tid))))
            .chain(
                foreign
                    .iter()
                    .map(|c| (c.qom_path.clone(), (c.index, None))),
            )
            .collect();
        self.ctx
            .vcpus
            .set(ours.iter().map(|c| (c.tid, c.index)).collect());
        (ours, reported)
    }

    fn session(&mut self, conn: &mut QmpConn) -> Result<(), Fault> {
        self.start_queries(conn)?;
        self.drain_events(conn);
        loop {
            let due = self.origin_ns + self.seq * self.interval_ns;
            let now = self.ctx.clock.stamp().t_mono_ns;
            if now > due + self.interval_ns {
                // Missed polls (a reconnect, a slow reply): skip to the next deadline, and
                // say so, like the host sampler does.
                let next = (now - self.origin_ns) / self.interval_ns + 1;
                self.ctx
                    .events
                    .record(&Event::gap(SOURCE, self.seq, next - 1, Some(now - due)));
                self.shared
                    .polls_missed
                    .fetch_add(next - self.seq, Ordering::Relaxed);
                self.seq = next;
                continue;
            }
            if now < due {
                // Wait for the deadline while listening for events.
                let wait = Duration::from_nanos(due - now);
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    if self.stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    let step = (until - Instant::now()).min(Duration::from_millis(50));
                    conn.wait_events(Instant::now() + step)?;
                    self.drain_events(conn);
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let rows_before = self.shared.rows.load(Ordering::Relaxed);
            if let Err(fault) = self.poll(conn) {
                // A poll that wrote rows before a later reply was withheld is partial, not
                // missing: its seq is taken, so the gap declared after the reconnect starts
                // at the next one (found by `cargo xtask soak`: a stall between query-status
                // and query-blockstats).
                if self.shared.rows.load(Ordering::Relaxed) > rows_before {
                    self.seq += 1;
                }
                return Err(fault);
            }
            self.drain_events(conn);
            self.shared.polls.fetch_add(1, Ordering::Relaxed);
            self.seq += 1;
            self.writer.flush_if_due().map_err(Fault::Write)?;
        }
    }

    fn drain_events(&mut self, conn: &mut QmpConn) {
        for ev in conn.events.drain() {
            self.shared.events.fetch_add(1, Ordering::Relaxed);
            self.ctx.events.record(&Event::QmpEvent {
                source: SOURCE.into(),
                qmp_event: ev.name,
                data: Some(ev.data),
                qemu_timestamp_us: ev.timestamp_us,
                data_dropped_bytes: ev.data_dropped_bytes.map(|n| n as u64),
            });
        }
        // Dropped events: one summary at most every second, with the counts since the
        // previous one (the totals go to meta.sources[qmp]).
        let d = conn.events.drops;
        if d != self.drops_reported
            && self
                .last_drop_summary
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            let r = self.drops_reported;
            self.ctx.events.record(&Event::QmpEventsDropped {
                source: SOURCE.into(),
                rate_limited: d.rate_limited - r.rate_limited,
                queue_full: d.queue_full - r.queue_full,
                data_dropped: d.data_dropped - r.data_dropped,
                total_dropped: d.dropped(),
                rate_per_s: EVENT_RATE_PER_S as u64,
                burst: EVENT_BURST as u64,
            });
            self.drops_reported = d;
            self.last_drop_summary = Some(Instant::now());
            self.update_counters(conn);
        }
    }

    /// The request/reply instants of a row: `t_mono_ns` is the reply (the stamp), then
    /// `t_request_mono_ns`, the midpoint `t_sample_mono_ns` and `rtt_ns` as columns.
    fn stamp_span(&mut self, row: &mut Row, span: Span) {
        let (req, rep) = (
            span.request.t_mono_ns,
            span.reply.t_mono_ns.max(span.request.t_mono_ns),
        );
        row.stamp = span.reply;
        row.push("t_request_mono_ns", req);
        row.push("t_sample_mono_ns", req + (rep - req) / 2);
        row.push("rtt_ns", rep - req);
    }

    /// Report stat values dropped because their column was taken (once per name).
    fn report_collisions(&mut self, names: &[String]) {
        for n in names {
            if self.collisions_seen.insert(n.clone()) {
                let count = self.collisions_seen.len();
                self.shared
                    .stat_name_collisions
                    .store(count as u64, Ordering::Relaxed);
                if count <= COLLISIONS_REPORTED {
                    self.ctx.events.record(&Event::source_error(
                        SOURCE,
                        format!(
                            "query-stats: stat {n} maps to a column another stat of the row already has; its values are dropped"
                        ),
                    ));
                }
            }
        }
    }

    fn row(&self, kind: &'static str) -> Row {
        let mut r = Row::new(self.ctx.clock.stamp(), SOURCE, false);
        r.seq = Some(self.seq);
        r.thread_columns = true;
        r.push("kind", kind);
        r
    }

    fn write(&mut self, row: &Row) -> Result<(), Fault> {
        self.writer.write_row(row).map_err(Fault::Write)?;
        self.shared.rows.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn poll(&mut self, conn: &mut QmpConn) -> Result<(), Fault> {
        use qapi::qmp::{query_blockstats, query_status};
        // The VM row: run state plus the `vm` target's stats; its span runs from the first
        // request to the last reply.
        let request = self.ctx.clock.stamp();
        let status = self.typed(conn, &query_status {})?;
        let mut vm_fields = Vec::new();
        if let Some(v) = status {
            if let Err(e) = parse::status_fields(v, &mut vm_fields) {
                self.parse_problem("query-status", e);
            }
        }
        if self.schemas.has("vm") {
            // StatsFilter's `vm` variant does not serialize in qapi 0.15: raw arguments.
            if let Some(v) = self.cmd(conn, "query-stats", Some(json!({"target": "vm"})))? {
                match parse::stats_rows(v) {
                    Ok(rows) => {
                        let mut dropped = Vec::new();
                        for r in rows {
                            dropped.extend(r.collisions);
                            for (k, v) in r.fields {
                                if !parse::push_unique(&mut vm_fields, k.clone(), v) {
                                    dropped.push(format!("vm/{k}"));
                                }
                            }
                        }
                        self.report_collisions(&dropped);
                    }
                    Err(e) => self.parse_problem("query-stats vm", e),
                }
            }
        }
        let span = Span {
            request,
            reply: self.ctx.clock.stamp(),
        };
        let mut vm = self.row("vm");
        self.stamp_span(&mut vm, span);
        vm.fields.extend(vm_fields);
        self.rtt
            .record(span.reply.t_mono_ns.saturating_sub(span.request.t_mono_ns));
        self.write(&vm)?;

        if self.schemas.has("vcpu") {
            let request = self.ctx.clock.stamp();
            if let Some(v) = self.cmd(conn, "query-stats", Some(json!({"target": "vcpu"})))? {
                let span = Span {
                    request,
                    reply: self.ctx.clock.stamp(),
                };
                self.rtt
                    .record(span.reply.t_mono_ns.saturating_sub(span.request.t_mono_ns));
                match parse::stats_rows(v) {
                    Ok(rows) => {
                        for r in rows {
                            self.report_collisions(&r.collisions);
                            let mut row = self.row("vcpu");
                            self.stamp_span(&mut row, span);
                            if let Some(&(index, tid)) =
                                r.qom_path.as_ref().and_then(|q| self.by_qom.get(q))
                            {
                                // A foreign thread id is never written (see apply_vcpus).
                                row.tid = tid;
                                row.vcpu = Some(index);
                            }
                            row.push("qom_path", r.qom_path.clone());
                            row.fields.extend(r.fields);
                            self.write(&row)?;
                        }
                    }
                    Err(e) => self.parse_problem("query-stats vcpu", e),
                }
            }
        }

        let request = self.ctx.clock.stamp();
        if let Some(v) = self.typed(conn, &query_blockstats { query_nodes: None })? {
            let span = Span {
                request,
                reply: self.ctx.clock.stamp(),
            };
            self.rtt
                .record(span.reply.t_mono_ns.saturating_sub(span.request.t_mono_ns));
            match parse::block_rows(v) {
                Ok(rows) => {
                    for b in rows {
                        let mut row = self.row("block");
                        self.stamp_span(&mut row, span);
                        row.fields.extend(b.fields);
                        self.write(&row)?;
                    }
                }
                Err(e) => self.parse_problem("query-blockstats", e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(index: u32, tid: u32) -> VcpuInfo {
        VcpuInfo {
            index,
            tid,
            qom_path: format!("/machine/unattached/device[{index}]"),
        }
    }

    #[test]
    fn foreign_vcpu_thread_ids_are_split_off() {
        let ours = [6846, 6847];
        let (ok, bad) = split_foreign(vec![cpu(0, 6846), cpu(1, 2), cpu(2, 6847)], |t| {
            ours.contains(&t)
        });
        assert_eq!(ok, vec![cpu(0, 6846), cpu(2, 6847)]);
        assert_eq!(bad, vec![cpu(1, 2)]);
    }

    #[test]
    fn a_vcpu_thread_id_listed_twice_is_foreign_the_second_time() {
        let (ok, bad) = split_foreign(vec![cpu(0, 6846), cpu(1, 6846)], |_| true);
        assert_eq!(ok, vec![cpu(0, 6846)]);
        assert_eq!(bad, vec![cpu(1, 6846)]);
    }

    #[test]
    fn thread_of_checks_the_real_task_directory() {
        let pid = std::process::id();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let proc = Path::new("/proc");
        assert!(is_thread_of(proc, pid, tid));
        assert!(is_thread_of(proc, pid, pid));
        // pid 1's thread is not one of ours, nor is thread 0.
        assert!(!is_thread_of(proc, pid, 1));
        assert!(!is_thread_of(proc, pid, 0));
    }
}
