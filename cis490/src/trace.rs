//! `cis490 trace`: open the target, pick the backend, create the episode, run the
//! sampler on its own thread, and close the episode whatever ended it.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::backend::{self, BackendChoice};
use crate::clock::EpisodeClock;
use crate::collector::{BackgroundSource, VcpuMap};
use crate::contract::events::Event;
use crate::episode::meta::{
    BackendMeta, ClockMeta, HostFingerprint, Meta, ResultMeta, Schedule, Tool, UserMeta, Vm,
    SCHEMA_VERSION,
};
use crate::episode::{self, EventLog};
use crate::error::Error;
use crate::jsonl::Compression;
use crate::labels::{ControlServer, Labels};
use crate::sampler::{EndReason, Sampler, Slot};
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct TraceConfig {
    pub pid: u32,
    pub duration: Option<Duration>,
    pub rate_hz: u32,
    pub data_root: PathBuf,
    pub episode_id: Option<String>,
    pub backend: BackendChoice,
    pub user_meta: UserMeta,
    /// `--net-if` (empty: autodetect the target's taps).
    pub net_ifs: Vec<String>,
    /// `--bpf-stats`: record each BPF program's run count and run time in meta.result.
    pub bpf_stats: bool,
    /// `--bpf-wakeups`: count wakeups with programs where the kernel does not.
    pub bpf_wakeups: bool,
    /// `--bpf-timer-cpu`.
    pub bpf_timer_cpu: Option<u32>,
    pub compression: Compression,
    /// `--rows`: every thread at every tick, or only the threads that changed.
    pub rows: crate::collector::RowsMode,
    /// `--perf-rate-hz`; None with `--no-perf`.
    pub perf_rate_hz: Option<u32>,
    /// The kvm sources (`--no-kvm` turns them off).
    pub kvm: bool,
    /// `--kvm-key-table`.
    pub kvm_key_table: u32,
    /// The flow sources on the watched interfaces (`--no-flow` turns them off).
    pub flow: bool,
    /// `--pcap`: capture.pcapng of the watched interfaces.
    pub pcap: Option<crate::pcap::PcapOptions>,
    /// Who may read the episode besides its owner (`--group`).
    pub access: crate::episode::Access,
    pub realtime: crate::sampler::Realtime,
    /// Redraw a status line on stderr while capturing (the caller checks for a TTY).
    pub status_line: bool,
    /// The QMP and guest-agent sources.
    pub qemu: crate::qemu_sources::QemuSourceOptions,
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

pub fn run(cfg: TraceConfig, stop: Arc<AtomicBool>) -> Result<TraceResult, Error> {
    // Everything that can be refused is checked before the episode directory exists, so a
    // bad pid, id or backend leaves nothing behind.
    let id = match &cfg.episode_id {
        Some(s) => ulid::Ulid::from_string(s)
            .map_err(|e| Error::Usage(format!("--episode-id {s:?} is not a ULID: {e}")))?
            .to_string(),
        None => ulid::Ulid::new().to_string(),
    };
    let target = Target::open(cfg.pid)?;
    let vcpus = VcpuMap::default();
    let cmdline = target.cmdline();
    let interval_ns = 1_000_000_000 / u64::from(cfg.rate_hz);
    let backend_opts = backend::BackendOptions {
        net_ifs: cfg.net_ifs.clone(),
        bpf_stats: cfg.bpf_stats,
        bpf_wakeups: cfg.bpf_wakeups,
        bpf_timer_cpu: cfg.bpf_timer_cpu,
        cmdline: cmdline.clone(),
        interval_ns,
        rows: cfg.rows,
        kvm: cfg.kvm,
        kvm_key_table: cfg.kvm_key_table,
        flow: cfg.flow,
    };
    let mut selected = backend::select(cfg.backend, cfg.pid, &vcpus, &backend_opts)?;
    let bpf_session = selected.session.take();
    let dir = episode::create_dir(&cfg.data_root, &id, cfg.access)?;
    // Held until this process exits (even by SIGKILL): `cis490 recover` refuses a locked
    // episode, whatever state its control socket is in.
    if !episode::dir::try_lock(&dir).map_err(|e| Error::io("locking the episode", e))? {
        return Err(Error::Other(format!(
            "{} is locked by another process",
            dir.path().display()
        )));
    }

    let clock = EpisodeClock::start();
    let um = &cfg.user_meta;
    let mut meta = Meta {
        episode_id: id.clone(),
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
            target_pid: cfg.pid,
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
            interval_ns,
            rate_hz: cfg.rate_hz,
            baseline_seconds: um.baseline_seconds,
            infected_seconds: um.infected_seconds,
            dormant_seconds: um.dormant_seconds,
        },
        backend: BackendMeta {
            requested: cfg.backend.as_str().into(),
            used: selected.used.into(),
            fallback_reason: selected.fallback_reason.clone(),
        },
        sources: Vec::new(),
        result: None,
    };
    // The first write into the new directory doubles as the writability check: it
    // happens before any sampling.
    if let Err(e) = episode::write_json_atomic(&dir, episode::META, &meta) {
        // rmdir removes only the empty directory we made (never a symlink's target).
        let _ = std::fs::remove_dir(dir.path());
        return Err(Error::Usage(format!(
            "data root {} is not writable: {e}",
            cfg.data_root.display()
        )));
    }
    let events = EventLog::create(&dir, clock)?;
    events.record(&Event::EpisodeStart {
        episode_id: id.to_string(),
        target_pid: cfg.pid.into(),
        rate_hz: cfg.rate_hz.into(),
    });
    events.record(&Event::BackendSelected {
        requested: cfg.backend.as_str().into(),
        used: selected.used.to_string(),
        reason: Some(selected.reason.clone()),
        fallback_reason: selected.fallback_reason.clone(),
        net_interfaces: json!(selected.net_ifs),
        bpf_loader: bpf_session
            .as_ref()
            .and_then(|s| s.loader.as_ref())
            .map(|l| json!(l)),
    });
    if let Some(why) = &selected.fallback_reason {
        tracing::warn!("BPF unavailable ({why}); falling back to /proc");
    }
    let labels = Arc::new(Mutex::new(Labels::create(&dir, clock)?));
    let control = ControlServer::start(&dir, labels.clone(), events.clone())?;

    let mut slots = Vec::new();
    for c in selected.collectors {
        events.record(&Event::SourceStarted {
            source: c.source().into(),
            socket: None,
            rate_hz: None,
            autodetected: None,
        });
        slots.push(Slot::new(c, &dir, cfg.compression)?);
    }
    if let Some(rate) = cfg.perf_rate_hz {
        let perf = crate::perf::PerfCollector::new(cfg.pid, vcpus.clone(), rate);
        events.record(&Event::SourceStarted {
            source: crate::perf::counts::SOURCE.into(),
            socket: None,
            rate_hz: Some(rate.into()),
            autodetected: None,
        });
        slots.push(Slot::new(Box::new(perf), &dir, cfg.compression)?);
    }

    // After the streams exist: a capture that cannot have its packet sockets goes on
    // without them and says why in meta.result.pcap.
    let pcap = cfg.pcap.map(|opts| {
        crate::pcap::PcapCapture::start(cfg.pid, selected.net_ifs.clone(), &dir, opts).map_err(
            |why| {
                tracing::warn!("--pcap: no packet capture: {why}");
                why
            },
        )
    });

    // Sources on their own threads (QMP, guest agent) start here; they share the clock
    // and event log but never the sampler's thread.
    let ctx = crate::collector::SourceContext {
        dir: dir.clone(),
        clock,
        events: events.clone(),
        vcpus: vcpus.clone(),
        stop: stop.clone(),
    };
    let started = crate::qemu_sources::start(&cfg.qemu, cfg.pid, &meta.vm.qemu_cmdline, &ctx)?;
    let background: Vec<Box<dyn BackgroundSource>> = started.background;

    let live = Arc::new(crate::status::LiveStats::new(
        slots.iter().map(|s| s.collector.source()),
    ));
    // With BPF the kernel takes the snapshots on its own timer; the host thread only
    // drains them (and watches the target), a few times a second whatever the rate.
    let host_interval_ns = if bpf_session.is_some() {
        interval_ns.max(crate::bpf::snap::DRAIN_INTERVAL_NS)
    } else {
        interval_ns
    };
    let mut sampler = Sampler {
        realtime: cfg.realtime,
        interval_ns: host_interval_ns,
        kernel_interval_ns: bpf_session.as_ref().map(|_| interval_ns),
        duration_ns: cfg.duration.map(|d| d.as_nanos() as u64),
        clock,
        slots,
        events: events.clone(),
        stop,
        target,
        live: Some(live.clone()),
    };
    if let Some(session) = &bpf_session {
        session
            .start_snapshots()
            .map_err(|e| Error::Other(e.to_string()))?;
    }
    tracing::info!(episode = %dir.path().display(), rate_hz = cfg.rate_hz, backend = selected.used, "capture started");
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
    if let Some(h) = &started.qmp_facts {
        let facts = h.wait(Duration::from_secs(1));
        if facts.ready {
            crate::qemu_sources::apply_facts(&mut meta, &facts);
            if let Err(e) = episode::write_json_atomic(&dir, episode::META, &meta) {
                tracing::warn!("rewriting meta.json with QMP facts: {e}");
            }
        }
    }
    if cfg.status_line {
        crate::status::run_until(
            || handle.is_finished(),
            &live,
            &labels,
            dir.path(),
            clock,
            interval_ns,
        );
    }
    let (sampler, outcome) = handle
        .join()
        .map_err(|_| Error::Other("sampler thread panicked".into()))?;
    let end_stamp = clock.stamp();

    // Closing sequence.
    for slot in &sampler.slots {
        events.record(&Event::SourceStopped {
            source: slot.collector.source().into(),
            rows: slot.rows,
        });
    }
    let pid_alive_at_end = sampler.target.alive();
    let (mut sources, mut stats, mut close_err) = Sampler::close_streams(sampler.slots);
    for b in background {
        let (source_meta, file_stats) = b.finish();
        events.record(&Event::SourceStopped {
            source: source_meta.name.clone(),
            rows: source_meta.rows,
        });
        match file_stats {
            Ok(s) => stats.push(s),
            Err(e) => {
                // Listed anyway; the manifest is then rebuilt from what is on disk.
                stats.push(crate::jsonl::FileStats::unknown(source_meta.file.clone()));
                close_err.get_or_insert(e);
            }
        }
        sources.push(source_meta);
    }
    control.stop();
    let pcap_meta = pcap.map(|started| match started {
        Err(why) => crate::pcap::socket::absent(&why),
        Ok(capture) => {
            let (v, written) = capture.finish();
            // Hashed as it was written; after a write error, as it is on disk.
            match written.map_or_else(|| episode::stats_on_disk(&dir, crate::pcap::FILE), Ok) {
                Ok(s) => stats.push(s),
                Err(e) => {
                    close_err.get_or_insert(e);
                }
            }
            v
        }
    });
    let labels = Arc::try_unwrap(labels)
        .map_err(|_| Error::Other("labels still shared after the control server stopped".into()))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let phases_observed = labels.observed();
    let labels_close = labels.close();

    let mut error = outcome.error.or(close_err);
    match labels_close {
        Ok(s) => stats.push(s),
        Err(e) => {
            stats.push(crate::jsonl::FileStats::unknown(episode::LABELS));
            error.get_or_insert(e);
        }
    }
    let end_reason = if error.is_some() {
        EndReason::Error
    } else {
        outcome.end_reason
    };
    events.record(&Event::EpisodeEnd {
        end_reason,
        error: error.as_ref().map(|e| e.to_string()),
        recovered_by: None,
    });
    if let Some(msg) = events.failure() {
        error.get_or_insert(Error::Other(format!("events.jsonl: {msg}")));
    }
    match events.close() {
        Ok(s) => stats.push(s),
        Err(e) => {
            stats.push(crate::jsonl::FileStats::unknown(episode::EVENTS));
            error.get_or_insert(e);
        }
    }
    let end_reason = if error.is_some() {
        EndReason::Error
    } else {
        end_reason
    };

    if let Some(h) = &started.qmp_facts {
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
        rows_total: sources.iter().map(|s| s.rows).sum(),
        error: error.as_ref().map(|e| e.to_string()),
        extra,
    });
    if let (Some(session), Some(result)) = (&bpf_session, meta.result.as_mut()) {
        if cfg.bpf_stats {
            result
                .extra
                .insert("bpf_programs".into(), session.program_stats());
        }
    }
    // The programs stay attached until `bpf_session` drops at the end of this function,
    // after the episode is complete: detaching waits for an RCU grace period per
    // tracepoint (~1 s in total), which should not delay done.marker.
    meta.sources = sources;
    let trusted = error.is_none();
    if let Err(e) = episode::finish(&dir, &meta, stats, trusted) {
        // Without done.marker the episode is visibly incomplete; say why.
        let first = error.map(|x| format!("{x}; then ")).unwrap_or_default();
        return Err(Error::Other(format!(
            "{first}closing episode {}: {e}",
            dir.path().display()
        )));
    }
    Ok(TraceResult {
        dir: dir.path().to_path_buf(),
        end_reason,
        error,
    })
}
