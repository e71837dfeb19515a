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
//! It runs on [`crate::threaded`]'s runner: any transport fault (refused, closed,
//! stalled past the command timeout, garbage) drops the connection, emits `source_stale`
//! once, and reconnects with backoff; `source_recovered` follows the next connect.
//! Nothing here shares a lock or a thread with the host sampler.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value as Json};

use super::parse::{self, Schemas, VcpuInfo};
use super::transport::{EventDrops, QmpConn, QmpError, EVENT_BURST, EVENT_RATE_PER_S};
use crate::collector::SourceContext;
use crate::contract::events::Event;
use crate::error::Error;
use crate::row::Row;
use crate::sampler::LatenessHistogram;
use crate::threaded::{self, Fault, Link, Running, SocketSource, Spec};

pub const SOURCE: &str = "qmp";

/// The most [`start`] waits for the first query-cpus-fast (connect, greeting and
/// reply) before the capture samples anyway.
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

/// Start the source: connect and fill the shared vCPU map synchronously (at most
/// [`STARTUP_BUDGET`]) so the first host snapshot has `vcpu`, then poll on its own thread.
pub fn start(
    cfg: QmpConfig,
    ctx: &SourceContext,
) -> Result<(Running<QmpSource>, FactsHandle), Error> {
    let spec = Spec {
        source: SOURCE,
        thread: "cis490-qmp",
        available_in_deployment: false,
        socket: cfg.socket.clone(),
    };
    let mut link = Link::open(spec, ctx)?;
    let facts = FactsHandle(Arc::default());
    let mut source = QmpSource {
        conn: QmpConn::new(&cfg.socket),
        interval_ns: 1_000_000_000 / u64::from(cfg.rate_hz.max(1)),
        origin_ns: ctx.clock.stamp().t_mono_ns,
        cfg,
        facts: facts.clone(),
        seq: 0,
        last_error: None,
        schemas: Schemas::default(),
        by_qom: HashMap::new(),
        last_mismatch: Vec::new(),
        collisions_seen: HashSet::new(),
        drops_reported: EventDrops::default(),
        last_drop_summary: None,
        rtt: LatenessHistogram::default(),
        polls: 0,
        polls_missed: 0,
        events: 0,
        vcpu_tid_mismatches: 0,
        stats_targets: Vec::new(),
    };
    // Before any host sampling: the vCPU map, so the first snapshot has `vcpu`.
    source.prefetch_vcpus(&mut link);
    Ok((threaded::spawn(source, link)?, facts))
}

/// The facts, readable while the source runs (meta.json is rewritten with them early).
#[derive(Clone)]
pub struct FactsHandle(Arc<Mutex<QmpFacts>>);

impl FactsHandle {
    pub fn get(&self) -> QmpFacts {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, facts: QmpFacts) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = facts;
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

pub struct QmpSource {
    cfg: QmpConfig,
    conn: QmpConn,
    facts: FactsHandle,
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
    /// `rtt_ns` of the rows (request sent → reply read), summarized at the end.
    rtt: LatenessHistogram,
    polls: u64,
    polls_missed: u64,
    events: u64,
    vcpu_tid_mismatches: u64,
    stats_targets: Vec<String>,
}

impl SocketSource for QmpSource {
    fn connect(&mut self, _link: &mut Link) -> Result<(), String> {
        // The start-up prefetch may have left a connection open.
        if self.conn.is_open() {
            return Ok(());
        }
        self.conn
            .open(self.cfg.command_timeout)
            .map_err(|e| e.to_string())
    }

    fn session(&mut self, link: &mut Link) -> Result<(), Fault> {
        link.alive();
        self.serve(link)
    }

    fn disconnect(&mut self, _link: &mut Link) {
        self.conn.close();
    }

    fn wind_down(&mut self, link: &mut Link) {
        // Events read but not yet written still go out (they passed the rate limit).
        self.drain_events(link);
    }

    fn summary(&self, extra: &mut Map<String, Json>) {
        extra.insert("rate_hz".into(), self.cfg.rate_hz.into());
        extra.insert("polls".into(), self.polls.into());
        extra.insert("polls_missed".into(), self.polls_missed.into());
        extra.insert("qmp_events".into(), self.events.into());
        let d = self.conn.events.drops;
        extra.insert(
            "events_dropped".into(),
            (d.rate_limited + d.queue_full).into(),
        );
        extra.insert(
            "events_dropped_by_reason".into(),
            json!({"rate_limited": d.rate_limited, "queue_full": d.queue_full}),
        );
        extra.insert("event_data_dropped".into(), d.data_dropped.into());
        extra.insert(
            "event_limit".into(),
            json!({"rate_per_s": EVENT_RATE_PER_S, "burst": EVENT_BURST}),
        );
        extra.insert("lines_oversized".into(), self.conn.lines_oversized().into());
        extra.insert(
            "stat_name_collisions".into(),
            (self.collisions_seen.len() as u64).into(),
        );
        extra.insert(
            "vcpu_tid_mismatches".into(),
            self.vcpu_tid_mismatches.into(),
        );
        let rtt = self.rtt.summary();
        // A row's values were read by QEMU somewhere between request and reply: its
        // t_sample_mono_ns (the midpoint) is off by at most half the round trip.
        let half = |k: &str| rtt.get(k).and_then(Json::as_u64).map(|v| v / 2);
        extra.insert(
            "sample_uncertainty_ns".into(),
            json!({"p50_ns": half("p50_ns"), "p99_ns": half("p99_ns"), "max_ns": half("max_ns")}),
        );
        extra.insert("rtt_ns".into(), rtt);
        extra.insert("stats_targets".into(), json!(self.stats_targets));
        extra.insert(
            "histograms".into(),
            "summarized: <name>_count (sum of buckets) + <name>_buckets (comma-separated)".into(),
        );
    }
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

impl QmpSource {
    /// The synchronous part of the start: connect and fill the vCPU map, within
    /// [`STARTUP_BUDGET`]. Quietly leaves the connection closed on any failure; the
    /// thread then connects (and reports) as usual.
    fn prefetch_vcpus(&mut self, link: &mut Link) {
        use qapi::qmp::query_cpus_fast;
        let until = Instant::now() + STARTUP_BUDGET;
        if self.conn.open(STARTUP_BUDGET).is_err() {
            return;
        }
        let left = until.saturating_duration_since(Instant::now());
        let reply = self
            .conn
            .run(&query_cpus_fast {}, left.max(Duration::from_millis(50)));
        match reply {
            Ok(v) => match parse::vcpus(v) {
                Ok(c) => {
                    let mut f = self.facts.get();
                    (f.vcpus, f.vcpus_reported) = self.apply_vcpus(link, c);
                    self.facts.set(f);
                }
                Err(e) => self.parse_problem(link, "query-cpus-fast", e),
            },
            Err(e @ QmpError::Command { .. }) => self.command_error(link, "query-cpus-fast", &e),
            // Slow or broken: the thread starts over with its own timeouts.
            Err(_) => self.conn.close(),
        }
    }

    /// A command error (QEMU said no): counted, one event per distinct message.
    fn command_error(&mut self, link: &mut Link, what: &str, e: &QmpError) {
        link.error();
        let msg = format!("{what}: {e}");
        if self.last_error.as_deref() != Some(msg.as_str()) {
            link.ctx.events.record(&Event::source_error(SOURCE, &msg));
            self.last_error = Some(msg);
        }
    }

    /// Run a command; a QEMU error reply (or a skipped oversized reply) is reported and
    /// gives None, a transport fault ends the session.
    fn cmd(
        &mut self,
        link: &mut Link,
        name: &str,
        args: Option<Json>,
    ) -> Result<Option<Json>, Fault> {
        match self.conn.execute(name, args, self.cfg.command_timeout) {
            Ok(v) => Ok(Some(v)),
            Err(e @ (QmpError::Command { .. } | QmpError::Oversized)) => {
                self.command_error(link, name, &e);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn typed<C: qapi::Command>(&mut self, link: &mut Link, cmd: &C) -> Result<Option<Json>, Fault> {
        match self.conn.run(cmd, self.cfg.command_timeout) {
            Ok(v) => Ok(Some(v)),
            Err(e @ (QmpError::Command { .. } | QmpError::Oversized)) => {
                self.command_error(link, C::NAME, &e);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn parse_problem(&mut self, link: &mut Link, what: &str, msg: String) {
        self.command_error(link, what, &QmpError::Transport(msg));
    }

    fn start_queries(&mut self, link: &mut Link) -> Result<(), Fault> {
        use qapi::qmp::{
            query_cpus_fast, query_memory_size_summary, query_name, query_stats_schemas,
            query_version,
        };
        let mut facts = QmpFacts::default();
        if let Some(v) = self.typed(link, &query_version {})? {
            match parse::version_string(v) {
                Ok(s) => facts.qemu_version = Some(s),
                Err(e) => self.parse_problem(link, "query-version", e),
            }
        }
        if let Some(v) = self.typed(link, &query_cpus_fast {})? {
            match parse::vcpus(v) {
                Ok(c) => (facts.vcpus, facts.vcpus_reported) = self.apply_vcpus(link, c),
                Err(e) => self.parse_problem(link, "query-cpus-fast", e),
            }
        }
        if let Some(v) = self.typed(link, &query_name {})? {
            match parse::vm_name(v) {
                Ok(n) => facts.name = n,
                Err(e) => self.parse_problem(link, "query-name", e),
            }
        }
        if let Some(v) = self.typed(link, &query_memory_size_summary {})? {
            match parse::ram_mib(v) {
                Ok(m) => facts.ram_mib = Some(m),
                Err(e) => self.parse_problem(link, "query-memory-size-summary", e),
            }
        }
        self.schemas = Schemas::default();
        if let Some(v) = self.typed(link, &query_stats_schemas { provider: None })? {
            match Schemas::parse(v) {
                Ok(s) => self.schemas = s,
                Err(e) => self.parse_problem(link, "query-stats-schemas", e),
            }
        }
        let targets: Vec<String> = ["vm", "vcpu"]
            .iter()
            .filter(|t| self.schemas.has(t))
            .map(|t| t.to_string())
            .collect();
        link.ctx.events.record(&Event::QmpConnected {
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
        self.stats_targets = targets;
        facts.ready = true;
        self.facts.set(facts);
        Ok(())
    }

    /// Check QMP's vCPU thread ids against the target's threads, report foreign ones,
    /// and publish the verified ones (the shared vCPU map, the `vcpu`/`tid` of vcpu rows).
    /// Returns (verified vCPUs, how many QMP listed).
    fn apply_vcpus(&mut self, link: &mut Link, listed: Vec<VcpuInfo>) -> (Vec<VcpuInfo>, usize) {
        let reported = listed.len();
        let pid = self.cfg.target_pid;
        let (ours, foreign) =
            split_foreign(listed, |tid| is_thread_of(Path::new("/proc"), pid, tid));
        self.vcpu_tid_mismatches = foreign.len() as u64;
        let pairs: Vec<(u32, u32)> = foreign.iter().map(|c| (c.index, c.tid)).collect();
        if !pairs.is_empty() && pairs != self.last_mismatch {
            link.ctx.events.record(&Event::QmpVcpuMismatch {
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
        link.ctx
            .vcpus
            .set(ours.iter().map(|c| (c.tid, c.index)).collect());
        (ours, reported)
    }

    fn serve(&mut self, link: &mut Link) -> Result<(), Fault> {
        self.start_queries(link)?;
        self.drain_events(link);
        loop {
            let due = self.origin_ns + self.seq * self.interval_ns;
            let now = link.ctx.clock.stamp().t_mono_ns;
            if now > due + self.interval_ns {
                // Missed polls (a reconnect, a slow reply): skip to the next deadline, and
                // say so, like the host sampler does.
                let next = (now - self.origin_ns) / self.interval_ns + 1;
                link.ctx
                    .events
                    .record(&Event::gap(SOURCE, self.seq, next - 1, Some(now - due)));
                self.polls_missed += next - self.seq;
                self.seq = next;
                continue;
            }
            if now < due {
                // Wait for the deadline while listening for events.
                let wait = Duration::from_nanos(due - now);
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    if link.stopping() {
                        return Ok(());
                    }
                    let step = (until - Instant::now()).min(Duration::from_millis(50));
                    self.conn.wait_events(Instant::now() + step)?;
                    self.drain_events(link);
                }
            }
            if link.stopping() {
                return Ok(());
            }
            let rows_before = link.rows();
            if let Err(fault) = self.poll(link) {
                // A poll that wrote rows before a later reply was withheld is partial, not
                // missing: its seq is taken, so the gap declared after the reconnect starts
                // at the next one (found by `cargo xtask soak`: a stall between query-status
                // and query-blockstats).
                if link.rows() > rows_before {
                    self.seq += 1;
                }
                return Err(fault);
            }
            self.drain_events(link);
            self.polls += 1;
            self.seq += 1;
            link.flush_if_due()?;
        }
    }

    fn drain_events(&mut self, link: &mut Link) {
        for ev in self.conn.events.drain() {
            self.events += 1;
            link.ctx.events.record(&Event::QmpEvent {
                source: SOURCE.into(),
                qmp_event: ev.name,
                data: Some(ev.data),
                qemu_timestamp_us: ev.timestamp_us,
                data_dropped_bytes: ev.data_dropped_bytes.map(|n| n as u64),
            });
        }
        // Dropped events: one summary at most every second, with the counts since the
        // previous one (the totals go to meta.sources[qmp]).
        let d = self.conn.events.drops;
        if d != self.drops_reported
            && self
                .last_drop_summary
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            let r = self.drops_reported;
            link.ctx.events.record(&Event::QmpEventsDropped {
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
    fn report_collisions(&mut self, link: &mut Link, names: &[String]) {
        for n in names {
            if self.collisions_seen.insert(n.clone()) {
                let count = self.collisions_seen.len();
                if count <= COLLISIONS_REPORTED {
                    link.ctx.events.record(&Event::source_error(
                        SOURCE,
                        format!(
                            "query-stats: stat {n} maps to a column another stat of the row already has; its values are dropped"
                        ),
                    ));
                }
            }
        }
    }

    fn row(&self, link: &Link, kind: &'static str) -> Row {
        let mut r = Row::new(link.ctx.clock.stamp(), SOURCE, false);
        r.seq = Some(self.seq);
        r.thread_columns = true;
        r.push("kind", kind);
        r
    }

    fn poll(&mut self, link: &mut Link) -> Result<(), Fault> {
        use qapi::qmp::{query_blockstats, query_status};
        // The VM row: run state plus the `vm` target's stats; its span runs from the first
        // request to the last reply.
        let request = link.ctx.clock.stamp();
        let status = self.typed(link, &query_status {})?;
        let mut vm_fields = Vec::new();
        if let Some(v) = status {
            if let Err(e) = parse::status_fields(v, &mut vm_fields) {
                self.parse_problem(link, "query-status", e);
            }
        }
        if self.schemas.has("vm") {
            // StatsFilter's `vm` variant does not serialize in qapi 0.15: raw arguments.
            if let Some(v) = self.cmd(link, "query-stats", Some(json!({"target": "vm"})))? {
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
                        self.report_collisions(link, &dropped);
                    }
                    Err(e) => self.parse_problem(link, "query-stats vm", e),
                }
            }
        }
        let span = Span {
            request,
            reply: link.ctx.clock.stamp(),
        };
        let mut vm = self.row(link, "vm");
        self.stamp_span(&mut vm, span);
        vm.fields.extend(vm_fields);
        self.rtt
            .record(span.reply.t_mono_ns.saturating_sub(span.request.t_mono_ns));
        link.write(&vm)?;

        if self.schemas.has("vcpu") {
            let request = link.ctx.clock.stamp();
            if let Some(v) = self.cmd(link, "query-stats", Some(json!({"target": "vcpu"})))? {
                let span = Span {
                    request,
                    reply: link.ctx.clock.stamp(),
                };
                self.rtt
                    .record(span.reply.t_mono_ns.saturating_sub(span.request.t_mono_ns));
                match parse::stats_rows(v) {
                    Ok(rows) => {
                        for r in rows {
                            self.report_collisions(link, &r.collisions);
                            let mut row = self.row(link, "vcpu");
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
                            link.write(&row)?;
                        }
                    }
                    Err(e) => self.parse_problem(link, "query-stats vcpu", e),
                }
            }
        }

        let request = link.ctx.clock.stamp();
        if let Some(v) = self.typed(link, &query_blockstats { query_nodes: None })? {
            let span = Span {
                request,
                reply: link.ctx.clock.stamp(),
            };
            self.rtt
                .record(span.reply.t_mono_ns.saturating_sub(span.request.t_mono_ns));
            match parse::block_rows(v) {
                Ok(rows) => {
                    for b in rows {
                        let mut row = self.row(link, "block");
                        self.stamp_span(&mut row, span);
                        row.fields.extend(b.fields);
                        link.write(&row)?;
                    }
                }
                Err(e) => self.parse_problem(link, "query-blockstats", e),
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
