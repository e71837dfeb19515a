//! The `qmp` source: its own thread, its own schedule (`--qmp-rate-hz`), its own stream.
//!
//! At connect: query-version, query-cpus-fast (→ the shared [`VcpuMap`] so host rows get
//! their `vcpu` column, and meta.vm.vcpu_threads), query-name, query-memory-size-summary,
//! query-stats-schemas. Per poll: query-status, query-stats for the `vm` and `vcpu`
//! targets the schemas list (nothing under TCG: no rows of that kind, not an error), and
//! query-blockstats. Asynchronous QMP events go to events.jsonl as `qmp_event`.
//!
//! Any transport fault (refused, closed, stalled past the command timeout, garbage)
//! drops the connection, emits `source_stale` once, and reconnects with backoff
//! (100 ms doubling to 2 s); `source_recovered` follows the next successful handshake.
//! Nothing here shares a lock or a thread with the host sampler.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value as Json};

use super::parse::{self, Schemas, VcpuInfo};
use super::transport::{QmpConn, QmpError};
use crate::collector::{BackgroundSource, SourceContext};
use crate::episode::meta::SourceMeta;
use crate::episode::telemetry_file;
use crate::error::Error;
use crate::jsonl::{FileStats, JsonlWriter};
use crate::row::Row;

pub const SOURCE: &str = "qmp";

#[derive(Debug, Clone)]
pub struct QmpConfig {
    pub socket: PathBuf,
    pub rate_hz: u32,
    /// Longest wait for one reply before the connection is declared stalled.
    pub command_timeout: Duration,
}

/// What QMP told us about the VM (for meta.json).
#[derive(Debug, Clone, Default)]
pub struct QmpFacts {
    pub qemu_version: Option<String>,
    pub vcpus: Vec<VcpuInfo>,
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
    stats_targets: Mutex<Vec<String>>,
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
        let worker = Worker {
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
        };
        let handle = std::thread::Builder::new()
            .name("cis490-qmp".into())
            .spawn(move || worker.run())
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
    by_qom: HashMap<String, VcpuInfo>,
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

impl Worker {
    fn run(mut self) -> Result<FileStats, Error> {
        let mut backoff = Duration::from_millis(100);
        let mut stale = false;
        let mut write_err = None;
        while !self.stop.load(Ordering::SeqCst) {
            let conn = QmpConn::connect(&self.cfg.socket, self.cfg.command_timeout);
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
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
            };
            backoff = Duration::from_millis(100);
            self.shared.connects.fetch_add(1, Ordering::Relaxed);
            if stale {
                self.ctx.events.emit(
                    "source_recovered",
                    json!({"source": SOURCE, "socket": self.cfg.socket}),
                );
            }
            match self.session(&mut conn) {
                Ok(()) => break,
                Err(Fault::Transport(msg)) => {
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    stale = true;
                    self.mark_stale(&msg);
                }
                Err(Fault::Write(e)) => {
                    self.ctx.events.emit(
                        "source_error",
                        json!({"source": SOURCE, "message": e.to_string(), "fatal": true}),
                    );
                    write_err = Some(e);
                    break;
                }
            }
        }
        let closed = self.writer.close();
        match write_err {
            Some(e) => Err(e),
            None => closed,
        }
    }

    fn mark_stale(&self, reason: &str) {
        self.shared.stale_count.fetch_add(1, Ordering::Relaxed);
        self.ctx.events.emit(
            "source_stale",
            json!({"source": SOURCE, "socket": self.cfg.socket, "message": reason}),
        );
    }

    /// A command error (QEMU said no): counted, one event per distinct message.
    fn command_error(&mut self, what: &str, e: &QmpError) {
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
        let msg = format!("{what}: {e}");
        if self.last_error.as_deref() != Some(msg.as_str()) {
            self.ctx
                .events
                .emit("source_error", json!({"source": SOURCE, "message": msg}));
            self.last_error = Some(msg);
        }
    }

    /// Run a command; a QEMU error reply is reported and gives None, a transport fault
    /// ends the session.
    fn cmd(
        &mut self,
        conn: &mut QmpConn,
        name: &str,
        args: Option<Json>,
    ) -> Result<Option<Json>, Fault> {
        match conn.execute(name, args, self.cfg.command_timeout) {
            Ok(v) => Ok(Some(v)),
            Err(e @ QmpError::Command { .. }) => {
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
            Err(e @ QmpError::Command { .. }) => {
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
                Ok(c) => facts.vcpus = c,
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
        self.ctx.events.emit(
            "qmp_connected",
            json!({"source": SOURCE, "qemu_version": facts.qemu_version, "vm_name": facts.name,
                   "vcpu_threads": facts.vcpus.iter().map(|c| json!({"index": c.index, "tid": c.tid})).collect::<Vec<_>>(),
                   "stats_targets": targets,
                   "stats_vm_count": self.schemas.stat_count("vm"),
                   "stats_vcpu_count": self.schemas.stat_count("vcpu")}),
        );
        *self
            .shared
            .stats_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = targets;
        self.by_qom = facts
            .vcpus
            .iter()
            .map(|c| (c.qom_path.clone(), c.clone()))
            .collect();
        self.ctx
            .vcpus
            .set(facts.vcpus.iter().map(|c| (c.tid, c.index)).collect());
        facts.ready = true;
        *self.shared.facts.lock().unwrap_or_else(|p| p.into_inner()) = facts;
        Ok(())
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
                self.ctx.events.emit(
                    "gap",
                    json!({"source": SOURCE, "from_seq": self.seq, "to_seq": next - 1, "late_ns": now - due}),
                );
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
            self.poll(conn)?;
            self.drain_events(conn);
            self.shared.polls.fetch_add(1, Ordering::Relaxed);
            self.seq += 1;
            self.writer.flush_if_due().map_err(Fault::Write)?;
        }
    }

    fn drain_events(&mut self, conn: &mut QmpConn) {
        for ev in conn.events.drain(..) {
            self.shared.events.fetch_add(1, Ordering::Relaxed);
            self.ctx.events.emit(
                "qmp_event",
                json!({"source": SOURCE, "qmp_event": ev.name, "data": ev.data,
                       "qemu_timestamp_us": ev.timestamp_us}),
            );
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
        // The VM row: run state plus the `vm` target's stats.
        let status = self.typed(conn, &query_status {})?;
        let mut vm = self.row("vm");
        if let Some(v) = status {
            if let Err(e) = parse::status_fields(v, &mut vm.fields) {
                self.parse_problem("query-status", e);
            }
        }
        if self.schemas.has("vm") {
            // StatsFilter's `vm` variant does not serialize in qapi 0.15: raw arguments.
            if let Some(v) = self.cmd(conn, "query-stats", Some(json!({"target": "vm"})))? {
                match parse::stats_rows(v) {
                    Ok(rows) => {
                        for r in rows {
                            vm.fields.extend(r.fields);
                        }
                    }
                    Err(e) => self.parse_problem("query-stats vm", e),
                }
            }
        }
        vm.stamp = self.ctx.clock.stamp();
        self.write(&vm)?;

        if self.schemas.has("vcpu") {
            if let Some(v) = self.cmd(conn, "query-stats", Some(json!({"target": "vcpu"})))? {
                let stamp = self.ctx.clock.stamp();
                match parse::stats_rows(v) {
                    Ok(rows) => {
                        for r in rows {
                            let mut row = self.row("vcpu");
                            row.stamp = stamp;
                            if let Some(c) = r.qom_path.as_ref().and_then(|q| self.by_qom.get(q)) {
                                row.tid = Some(c.tid);
                                row.vcpu = Some(c.index);
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

        if let Some(v) = self.typed(conn, &query_blockstats { query_nodes: None })? {
            let stamp = self.ctx.clock.stamp();
            match parse::block_rows(v) {
                Ok(rows) => {
                    for b in rows {
                        let mut row = self.row("block");
                        row.stamp = stamp;
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
