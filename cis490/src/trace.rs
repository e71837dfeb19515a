//! `cis490 trace`: open the target, pick the backend, create the episode, run the
//! sampler on its own thread, and close the episode whatever ended it.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::backend;
use crate::clock::EpisodeClock;
use crate::collector::VcpuMap;
use crate::contract::events::Event;
use crate::episode::meta::{
    BackendMeta, ClockMeta, HostFingerprint, Meta, ResultMeta, Schedule, Tool, UserMeta, Vm,
    SCHEMA_VERSION,
};
use crate::episode::{self, EventLog};
use crate::error::Error;
use crate::jsonl::Compression;
use crate::labels::{ControlServer, Labels};
use crate::sampler::{EndReason, Realtime, Sampler, Slot};
use crate::target::Target;

/// What one capture is: the target, how long, how often, where it goes (`cis490
/// trace`'s "Capture" options).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Capture")]
pub struct CaptureOptions {
    /// Process id of the QEMU process to trace.
    #[arg(long = "qemu-pid")]
    pub pid: u32,
    /// Seconds to capture; absent: until the target exits or SIGINT/SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Host sampling rate, 1..=1000 Hz.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rate_hz: u32,
    /// Where episodes are written (`<DIR>/episodes/<id>/`).
    #[arg(long, default_value = "./data")]
    pub data_root: PathBuf,
    /// Use this ULID as the episode id; an existing id is refused.
    #[arg(long)]
    pub episode_id: Option<String>,
    /// JSON object with image_name, image_sha256, snapshot_name, exploit, sample
    /// (and optionally baseline_seconds, infected_seconds, dormant_seconds) for meta.json.
    #[arg(long = "meta", value_name = "FILE")]
    pub meta_file: Option<PathBuf>,
    /// Store telemetry streams compressed (`zstd`: telemetry-*.jsonl.zst, read directly by
    /// DuckDB and pandas); useful for long 1 kHz captures.
    #[arg(long, value_enum, default_value_t = Compression::None)]
    pub compress: Compression,
    /// Thread rows of the host streams: `all` (every thread at every tick) or `changed`
    /// (a thread's row only when a value of it changed since its last row, and at least
    /// once a second; the process row at every tick). Loses no counter value: a left-out
    /// row repeats the thread's last one.
    #[arg(long, value_enum, default_value = "all")]
    pub rows: crate::collector::RowsMode,
    /// Give this group (name or gid) read access to the episode (directories 0750, files
    /// 0640). Default: owner only (0700/0600), or the data root's group when it is setgid.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Run the host sampler thread SCHED_FIFO (needs CAP_SYS_NICE) for tighter timing,
    /// whatever the rate. Default: SCHED_FIFO from 100 Hz up when permitted.
    #[arg(long, conflicts_with = "no_realtime")]
    pub realtime: bool,
    /// Keep the host sampler thread at normal priority (SCHED_OTHER) at any rate.
    #[arg(long)]
    pub no_realtime: bool,
}

impl CaptureOptions {
    pub fn realtime(&self) -> Realtime {
        match (self.realtime, self.no_realtime) {
            (true, _) => Realtime::On,
            (_, true) => Realtime::Off,
            _ => Realtime::Auto,
        }
    }

    pub fn interval_ns(&self) -> u64 {
        1_000_000_000 / u64::from(self.rate_hz.max(1))
    }

    /// The episode id: `--episode-id` checked, or a new ULID.
    fn episode_id(&self) -> Result<String, Error> {
        match &self.episode_id {
            Some(s) => Ok(ulid::Ulid::from_string(s)
                .map_err(|e| Error::Usage(format!("--episode-id {s:?} is not a ULID: {e}")))?
                .to_string()),
            None => Ok(ulid::Ulid::new().to_string()),
        }
    }

    /// `--meta`'s facts, or none.
    fn user_meta(&self) -> Result<UserMeta, Error> {
        match &self.meta_file {
            Some(path) => UserMeta::read_file(path)
                .map_err(|e| Error::Usage(format!("--meta {}: {e}", path.display()))),
            None => Ok(UserMeta::default()),
        }
    }

    /// Who may read the episode (`--group` resolved).
    fn access(&self) -> Result<crate::episode::Access, Error> {
        Ok(crate::episode::Access {
            group: self
                .group
                .as_deref()
                .map(crate::episode::dir::group_by_name)
                .transpose()?,
        })
    }
}

/// A positive number of seconds (`--duration`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Everything `cis490 trace` was asked, one options struct per concern (each flattened
/// into the command line by clap).
#[derive(Debug, Clone)]
pub struct TraceConfig {
    pub capture: CaptureOptions,
    pub host: crate::backend::HostOptions,
    pub net: crate::net::NetOptions,
    pub perf: crate::perf::PerfOptions,
    pub qemu: crate::qemu_sources::QemuSourceOptions,
    /// Redraw a status line on stderr while capturing (the caller checks for a TTY).
    pub status_line: bool,
}

pub struct TraceResult {
    pub dir: PathBuf,
    pub end_reason: EndReason,
    /// Set when the episode ended as `error` (the process then exits non-zero).
    pub error: Option<Error>,
}

pub fn rfc3339_from_ns(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let nanos = (ns % 1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn host_fingerprint() -> HostFingerprint {
    HostFingerprint {
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        qemu_version: None,
    }
}

/// One capture, start to end: open the target, choose the backend, open the episode,
/// start the sources, run, and close with the outcome, whatever ended it.
pub fn run(cfg: TraceConfig, stop: Arc<AtomicBool>) -> Result<TraceResult, Error> {
    // Everything that can be refused is checked before the episode directory exists, so a
    // bad pid, id, --meta, --group or backend leaves nothing behind.
    let id = cfg.capture.episode_id()?;
    let user_meta = cfg.capture.user_meta()?;
    let access = cfg.capture.access()?;
    let target = Target::open(cfg.capture.pid)?;
    let cmdline = target.cmdline();
    let vcpus = VcpuMap::default();
    let interval_ns = cfg.capture.interval_ns();
    let plan = backend::Plan {
        pid: cfg.capture.pid,
        cmdline: &cmdline,
        interval_ns,
        rows: cfg.capture.rows,
        vcpus: &vcpus,
    };
    let mut selected = backend::select(&cfg.host, &cfg.net, &plan)?;
    let bpf_session = selected.session.take();
    let clock = EpisodeClock::start();
    let meta = initial_meta(&cfg, &id, &user_meta, cmdline, &selected, clock);
    let mut episode = Episode::open(&cfg.capture.data_root, access, meta, clock)?;
    episode.announce(&cfg, &selected, bpf_session.as_deref());
    let sources = Sources::start(&cfg, &episode, selected, &vcpus)?;

    // The capture: the sampler on its own thread until the duration, a signal, the
    // target's exit or an error.
    let live = Arc::new(crate::status::LiveStats::new(
        sources
            .slots
            .iter()
            .flat_map(|s| s.streams.iter().map(|x| x.stream.source)),
    ));
    // With BPF the kernel takes the snapshots on its own timer; the host thread only
    // drains them (and watches the target), a few times a second whatever the rate.
    let host_interval_ns = match &bpf_session {
        Some(_) => interval_ns.max(crate::bpf::snap::DRAIN_INTERVAL_NS),
        None => interval_ns,
    };
    let Sources {
        slots,
        background,
        pcap,
        qmp_facts,
    } = sources;
    let mut sampler = Sampler {
        realtime: cfg.capture.realtime(),
        interval_ns: host_interval_ns,
        kernel_interval_ns: bpf_session.as_ref().map(|_| interval_ns),
        duration_ns: cfg.capture.duration.map(|d| d.as_nanos() as u64),
        clock: episode.clock,
        slots,
        events: episode.events.clone(),
        stop,
        target,
        live: Some(live.clone()),
        out: Default::default(),
    };
    if let Some(session) = &bpf_session {
        session
            .start_snapshots()
            .map_err(|e| Error::Other(e.to_string()))?;
    }
    tracing::info!(episode = %episode.dir.path().display(), rate_hz = cfg.capture.rate_hz, backend = episode.meta.backend.used, "capture started");
    let handle = std::thread::Builder::new()
        .name("cis490-sampler".into())
        .spawn(move || {
            let outcome = sampler.run();
            (sampler, outcome)
        })
        .map_err(|e| Error::io("spawning sampler thread", e))?;
    // QMP's start facts (version, vCPU threads, RAM) go into meta.json as soon as they
    // are known; the sampler is already running, and a slow QMP is not waited for long
    // (the end write catches up).
    if let Some(h) = &qmp_facts {
        let facts = h.wait(Duration::from_secs(1));
        if facts.ready {
            crate::qemu_sources::apply_facts(&mut episode.meta, &facts);
            if let Err(e) = episode::write_json_atomic(&episode.dir, episode::META, &episode.meta) {
                tracing::warn!("rewriting meta.json with QMP facts: {e}");
            }
        }
    }
    if cfg.status_line {
        crate::status::run_until(
            || handle.is_finished(),
            &live,
            &episode.labels,
            episode.dir.path(),
            episode.clock,
            interval_ns,
        );
    }
    let (sampler, outcome) = handle
        .join()
        .map_err(|_| Error::Other("sampler thread panicked".into()))?;
    let end_stamp = episode.clock.stamp();

    // The close, in the contract's order: every stream, labels, events (with
    // episode_end), then meta.json, manifest.json and done.marker. The first error wins.
    let mut closing = Closing::new(outcome.error);
    for s in sampler.slots.iter().flat_map(|slot| &slot.streams) {
        episode.events.record(&Event::SourceStopped {
            source: s.stream.source.into(),
            rows: s.rows,
        });
    }
    let pid_alive_at_end = sampler.target.alive();
    let (mut sources_meta, stats, close_err) = Sampler::close_streams(sampler.slots);
    closing.stats.extend(stats);
    closing.keep(close_err);
    for b in background {
        let (source_meta, file_stats) = b.finish();
        episode.events.record(&Event::SourceStopped {
            source: source_meta.name.clone(),
            rows: source_meta.rows,
        });
        closing.file(&source_meta.file, file_stats);
        sources_meta.push(source_meta);
    }
    episode.control.stop();
    let pcap_meta = pcap.map(|started| match started {
        Err(why) => crate::pcap::socket::absent(&why),
        Ok(capture) => {
            let (v, written) = capture.finish();
            // Hashed as it was written; after a write error, as it is on disk.
            let stats = written.map_or_else(
                || episode::stats_on_disk(&episode.dir, crate::pcap::FILE),
                Ok,
            );
            closing.file(crate::pcap::FILE, stats);
            v
        }
    });
    let labels = Arc::try_unwrap(episode.labels)
        .map_err(|_| Error::Other("labels still shared after the control server stopped".into()))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let phases_observed = labels.observed();
    closing.file(episode::LABELS, labels.close());
    let end_reason = closing.end_reason(outcome.end_reason);
    episode.events.record(&Event::EpisodeEnd {
        end_reason,
        error: closing.error.as_ref().map(|e| e.to_string()),
        recovered_by: None,
    });
    if let Some(msg) = episode.events.failure() {
        closing.keep(Some(Error::Other(format!("events.jsonl: {msg}"))));
    }
    closing.file(episode::EVENTS, episode.events.close());
    let end_reason = closing.end_reason(end_reason);

    let mut meta = episode.meta;
    if let Some(h) = &qmp_facts {
        crate::qemu_sources::apply_facts(&mut meta, &h.get());
    }
    meta.ended_at_wall = Some(rfc3339_from_ns(end_stamp.t_wall_ns));
    let mut extra: serde_json::Map<String, serde_json::Value> = [
        ("tick_lateness".to_owned(), outcome.lateness.summary()),
        ("sampler".to_owned(), outcome.policy.summary()),
    ]
    .into_iter()
    .collect();
    if let Some(v) = pcap_meta {
        extra.insert(crate::pcap::META_KEY.into(), v);
    }
    let (ticks_scheduled, ticks_missed) = match &bpf_session {
        // The ticks are the kernel timer's; the host's own wake-ups only drained them.
        Some(session) => {
            let (scheduled, missed, lateness) = session.kernel_schedule();
            extra.insert("tick_source".into(), "kernel".into());
            extra.insert("drain_lateness".into(), outcome.lateness.summary());
            extra.insert("tick_lateness".into(), lateness);
            if cfg.host.bpf_stats {
                extra.insert("bpf_programs".into(), session.program_stats());
            }
            (scheduled, missed)
        }
        None => {
            extra.insert("tick_source".into(), "host".into());
            (outcome.ticks_scheduled, outcome.ticks_missed)
        }
    };
    meta.result = Some(ResultMeta {
        end_reason,
        phases_observed,
        pid_alive_at_end,
        duration_observed_s: end_stamp.t_mono_ns as f64 / 1e9,
        ticks_scheduled,
        ticks_missed,
        rows_total: sources_meta.iter().map(|s| s.rows).sum(),
        error: closing.error.as_ref().map(|e| e.to_string()),
        extra,
    });
    // The programs stay attached until `bpf_session` drops at the end of this function,
    // after the episode is complete: detaching waits for an RCU grace period per
    // tracepoint (~1 s in total), which should not delay done.marker.
    meta.sources = sources_meta;
    let trusted = closing.error.is_none();
    if let Err(e) = episode::finish(&episode.dir, &meta, closing.stats, trusted) {
        // Without done.marker the episode is visibly incomplete; say why.
        let first = closing
            .error
            .map(|x| format!("{x}; then "))
            .unwrap_or_default();
        return Err(Error::Other(format!(
            "{first}closing episode {}: {e}",
            episode.dir.path().display()
        )));
    }
    Ok(TraceResult {
        dir: episode.dir.path().to_path_buf(),
        end_reason,
        error: closing.error,
    })
}

/// meta.json as it is written before the first tick (result and sources come at the end).
fn initial_meta(
    cfg: &TraceConfig,
    id: &str,
    um: &UserMeta,
    cmdline: Vec<String>,
    selected: &backend::Selected,
    clock: EpisodeClock,
) -> Meta {
    let c = &cfg.capture;
    Meta {
        episode_id: id.to_owned(),
        schema_version: SCHEMA_VERSION,
        tool: Tool {
            name: "cis490".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        started_at_wall: rfc3339_from_ns(clock.wall_origin_ns),
        ended_at_wall: None,
        clock: ClockMeta {
            mono_origin_ns: clock.mono_origin_ns,
            wall_origin_ns: clock.wall_origin_ns,
        },
        host_fingerprint: host_fingerprint(),
        vm: Vm {
            target_pid: c.pid,
            qemu_cmdline: cmdline,
            vcpus: None,
            ram_mib: None,
            vcpu_threads: Vec::new(),
            image_name: um.image_name.clone(),
            image_sha256: um.image_sha256.clone(),
            snapshot_name: um.snapshot_name.clone(),
        },
        exploit: um.exploit.clone(),
        sample: um.sample.clone(),
        schedule: Schedule {
            interval_ns: c.interval_ns(),
            rate_hz: c.rate_hz,
            baseline_seconds: um.baseline_seconds,
            infected_seconds: um.infected_seconds,
            dormant_seconds: um.dormant_seconds,
        },
        backend: BackendMeta {
            requested: cfg.host.backend.as_str().into(),
            used: selected.used.into(),
            fallback_reason: selected.fallback_reason.clone(),
        },
        sources: Vec::new(),
        result: None,
    }
}

/// The open episode: its directory (locked), clock, meta.json so far, event log, labels
/// and the control socket `cis490 mark` talks to.
struct Episode {
    dir: episode::EpisodeDir,
    clock: EpisodeClock,
    meta: Meta,
    events: EventLog,
    labels: Arc<Mutex<Labels>>,
    control: ControlServer,
}

impl Episode {
    fn open(
        data_root: &std::path::Path,
        access: episode::Access,
        meta: Meta,
        clock: EpisodeClock,
    ) -> Result<Self, Error> {
        let dir = episode::create_dir(data_root, &meta.episode_id, access)?;
        // Held until this process exits (even by SIGKILL): `cis490 recover` refuses a
        // locked episode, whatever state its control socket is in.
        if !episode::dir::try_lock(&dir).map_err(|e| Error::io("locking the episode", e))? {
            return Err(Error::Other(format!(
                "{} is locked by another process",
                dir.path().display()
            )));
        }
        // The first write into the new directory doubles as the writability check: it
        // happens before any sampling.
        if let Err(e) = episode::write_json_atomic(&dir, episode::META, &meta) {
            // rmdir removes only the empty directory we made (never a symlink's target).
            let _ = std::fs::remove_dir(dir.path());
            return Err(Error::Usage(format!(
                "data root {} is not writable: {e}",
                data_root.display()
            )));
        }
        let events = EventLog::create(&dir, clock)?;
        let labels = Arc::new(Mutex::new(Labels::create(&dir, clock)?));
        let control = ControlServer::start(&dir, labels.clone(), events.clone())?;
        Ok(Self {
            dir,
            clock,
            meta,
            events,
            labels,
            control,
        })
    }

    /// The first events: what is captured, with which backend and why.
    fn announce(
        &self,
        cfg: &TraceConfig,
        selected: &backend::Selected,
        bpf: Option<&crate::bpf::Session>,
    ) {
        self.events.record(&Event::EpisodeStart {
            episode_id: self.meta.episode_id.clone(),
            target_pid: cfg.capture.pid.into(),
            rate_hz: cfg.capture.rate_hz.into(),
        });
        self.events.record(&Event::BackendSelected {
            requested: cfg.host.backend.as_str().into(),
            used: selected.used.to_string(),
            reason: Some(selected.reason.clone()),
            fallback_reason: selected.fallback_reason.clone(),
            net_interfaces: json!(selected.net_ifs),
            bpf_loader: bpf.and_then(|s| s.loader.as_ref()).map(|l| json!(l)),
        });
        if let Some(why) = &selected.fallback_reason {
            tracing::warn!("BPF unavailable ({why}); falling back to /proc");
        }
    }
}

/// The capture's sources once started: the polled ones (each with its stream), those on
/// their own threads, and the packet capture.
struct Sources {
    slots: Vec<Slot>,
    background: Vec<Box<dyn crate::threaded::Background>>,
    pcap: Option<Result<crate::pcap::PcapCapture, String>>,
    qmp_facts: Option<crate::qmp::FactsHandle>,
}

impl Sources {
    fn start(
        cfg: &TraceConfig,
        episode: &Episode,
        selected: backend::Selected,
        vcpus: &VcpuMap,
    ) -> Result<Self, Error> {
        let (dir, events) = (&episode.dir, &episode.events);
        let pid = cfg.capture.pid;
        let mut polled = selected.collectors;
        let mut rates = vec![None; polled.len()];
        if let Some(rate) = cfg.perf.rate_hz() {
            polled.push(Box::new(crate::perf::PerfCollector::new(
                pid,
                vcpus.clone(),
                rate,
            )));
            rates.push(Some(rate));
        }
        let mut slots = Vec::new();
        for (c, rate) in polled.into_iter().zip(rates) {
            for stream in c.streams() {
                events.record(&Event::SourceStarted {
                    source: stream.source.into(),
                    socket: None,
                    rate_hz: rate.map(Into::into),
                    autodetected: None,
                });
            }
            slots.push(Slot::new(c, dir, cfg.capture.compress)?);
        }
        // After the streams exist: a capture that cannot have its packet sockets goes on
        // without them and says why in meta.result.pcap.
        let pcap = cfg.net.pcap().map(|opts| {
            crate::pcap::PcapCapture::start(pid, selected.net_ifs.clone(), dir, opts).map_err(
                |why| {
                    tracing::warn!("--pcap: no packet capture: {why}");
                    why
                },
            )
        });
        // Sources on their own threads (QMP, guest agent): they share the clock and event
        // log but never the sampler's thread.
        let ctx = crate::collector::SourceContext {
            dir: dir.clone(),
            clock: episode.clock,
            events: events.clone(),
            vcpus: vcpus.clone(),
        };
        let started =
            crate::qemu_sources::start(&cfg.qemu, pid, &episode.meta.vm.qemu_cmdline, &ctx)?;
        Ok(Self {
            slots,
            background: started.background,
            pcap,
            qmp_facts: started.qmp_facts,
        })
    }
}

/// The close sequence's bookkeeping: every file's manifest entry, and the first error.
struct Closing {
    stats: Vec<crate::jsonl::FileStats>,
    error: Option<Error>,
}

impl Closing {
    fn new(error: Option<Error>) -> Self {
        Self {
            stats: Vec::new(),
            error,
        }
    }

    /// Keep `e` unless an earlier error is kept.
    fn keep(&mut self, e: Option<Error>) {
        if let Some(e) = e {
            self.error.get_or_insert(e);
        }
    }

    /// A closed file: its manifest entry, or, after an error, an entry the manifest
    /// rebuilds from what is on disk.
    fn file(&mut self, name: &str, closed: Result<crate::jsonl::FileStats, Error>) {
        match closed {
            Ok(s) => self.stats.push(s),
            Err(e) => {
                self.stats
                    .push(crate::jsonl::FileStats::unknown(name.to_owned()));
                self.keep(Some(e));
            }
        }
    }

    /// The end reason: `error` once any error is kept, else what ended the sampling.
    fn end_reason(&self, sampled: EndReason) -> EndReason {
        if self.error.is_some() {
            EndReason::Error
        } else {
            sampled
        }
    }
}
