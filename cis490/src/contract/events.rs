//! The event kinds of events.jsonl and the fields each carries (beside `t_mono_ns`,
//! `t_wall_ns` and `event`). A field marked required is in every event of its kind;
//! the others only where they apply. A field no kind declares is a contract violation.

use super::Column as C;
use super::ColumnType::{Bool, Dict, Json, UInt64, Utf8};

/// One event kind.
#[derive(Debug, Clone, Copy)]
pub struct EventKind {
    pub name: &'static str,
    pub when: &'static str,
    /// Its fields; [`super::Presence::Always`] = required, `Optional` = may be absent.
    pub fields: &'static [C],
}

impl EventKind {
    pub fn field(&self, name: &str) -> Option<&'static C> {
        self.fields.iter().find(|c| c.name == name)
    }
}

const fn req(name: &'static str, ty: super::ColumnType, d: &'static str) -> C {
    C::new(name, ty, "", d)
}
const fn opt(name: &'static str, ty: super::ColumnType, d: &'static str) -> C {
    C::new(name, ty, "", d).optional()
}

const SOURCE: C = req("source", Dict, "the source (stream name) it concerns");
const SOCKET: C = opt("socket", Utf8, "the socket path");
const MESSAGE: C = req("message", Utf8, "what happened, one line");

pub static EVENTS: &[EventKind] = &[
    EventKind {
        name: "episode_start",
        when: "first line",
        fields: &[
            req("episode_id", Utf8, "the episode's ULID"),
            req("target_pid", UInt64, "the traced process"),
            req("rate_hz", UInt64, "--rate-hz"),
        ],
    },
    EventKind {
        name: "backend_selected",
        when: "after start",
        fields: &[
            req("requested", Dict, "auto, bpf or proc").values(&["auto", "bpf", "proc"]),
            req("used", Dict, "bpf or proc").values(&["bpf", "proc"]),
            req("reason", Utf8, "why this backend").nullable(),
            req("fallback_reason", Utf8, "why BPF was not used").nullable(),
            req(
                "net_interfaces",
                Json,
                "the interfaces the net source reads (array)",
            ),
            req(
                "bpf_loader",
                Json,
                "{pid, peak_rss_kib, peak_data_kib (VmHWM less mapped files), elapsed_ms} of the BPF loader process; null on /proc",
            )
            .nullable(),
        ],
    },
    EventKind {
        name: "source_started",
        when: "per source",
        fields: &[
            SOURCE,
            SOCKET,
            opt("rate_hz", UInt64, "QMP poll rate"),
            opt(
                "autodetected",
                Bool,
                "the socket was found in the QEMU command line",
            ),
        ],
    },
    EventKind {
        name: "source_skipped",
        when: "a QEMU source was not started",
        fields: &[SOURCE, req("reason", Utf8, "why")],
    },
    EventKind {
        name: "source_stopped",
        when: "per source, at the end",
        fields: &[SOURCE, req("rows", UInt64, "rows the stream holds")],
    },
    EventKind {
        name: "source_error",
        when: "a source lost (part of) a tick; once per distinct problem",
        fields: &[
            SOURCE,
            MESSAGE,
            opt("fatal", Bool, "the source stopped writing"),
        ],
    },
    EventKind {
        name: "source_stale",
        when: "a QMP or agent socket stalled, closed or lied",
        fields: &[SOURCE, SOCKET, MESSAGE],
    },
    EventKind {
        name: "source_recovered",
        when: "a stale QMP or agent source came back",
        fields: &[SOURCE, SOCKET],
    },
    EventKind {
        name: "gap",
        when: "ticks with no rows",
        fields: &[
            SOURCE,
            req("from_seq", UInt64, "first missing seq"),
            req("to_seq", UInt64, "last missing seq (inclusive)"),
            opt(
                "late_ns",
                UInt64,
                "how late the tick ran (host-ticked sources)",
            ),
        ],
    },
    EventKind {
        name: "phase",
        when: "a transition accepted over control.sock",
        fields: &[
            req("phase", Dict, "the new phase").values(&super::PHASE_NAMES),
            req("prev", Dict, "the phase before")
                .nullable()
                .values(&super::PHASE_NAMES),
            req("reason", Utf8, "the reason given to `cis490 mark`").nullable(),
        ],
    },
    EventKind {
        name: "target_exit",
        when: "the traced process exited",
        fields: &[req("pid", UInt64, "its pid")],
    },
    EventKind {
        name: "signal",
        when: "SIGINT/SIGTERM received",
        fields: &[MESSAGE],
    },
    EventKind {
        name: "qmp_event",
        when: "an asynchronous QMP event",
        fields: &[
            SOURCE,
            req(
                "qmp_event",
                Dict,
                "QEMU's event name (STOP, RESUME, SHUTDOWN, …)",
            ),
            req("data", Json, "QEMU's event data").nullable(),
            req("qemu_timestamp_us", UInt64, "QEMU's timestamp of the event").nullable(),
            opt(
                "data_dropped_bytes",
                UInt64,
                "size of data too large to keep",
            ),
        ],
    },
    EventKind {
        name: "qmp_vcpu_mismatch",
        when: "query-cpus-fast named thread ids that are not the target's",
        fields: &[
            SOURCE,
            req("target_pid", UInt64, "the traced process"),
            MESSAGE,
            req("foreign_count", UInt64, "how many"),
            req("foreign", Json, "[{index, tid}], the first 16"),
        ],
    },
    EventKind {
        name: "qmp_events_dropped",
        when: "QMP events were dropped by the rate limit or queue (at most once a second)",
        fields: &[
            SOURCE,
            req("rate_limited", UInt64, "since the previous one"),
            req("queue_full", UInt64, "since the previous one"),
            req("data_dropped", UInt64, "since the previous one"),
            req("total_dropped", UInt64, "since the start"),
            req("rate_per_s", UInt64, "the limit"),
            req("burst", UInt64, "the burst"),
        ],
    },
    EventKind {
        name: "qmp_connected",
        when: "the QMP source (re)connected",
        fields: &[
            SOURCE,
            req("qemu_version", Utf8, "query-version").nullable(),
            req("vm_name", Utf8, "query-name").nullable(),
            req("vcpu_threads", Json, "[{index, tid}] from query-cpus-fast"),
            req("stats_targets", Json, "targets query-stats-schemas lists"),
            req("stats_vm_count", UInt64, "vm statistics offered"),
            req("stats_vcpu_count", UInt64, "vcpu statistics offered"),
        ],
    },
    EventKind {
        name: "agent_connected",
        when: "the agent socket connected",
        fields: &[SOURCE, SOCKET],
    },
    EventKind {
        name: "agent_rejects",
        when: "guest lines were dropped (at most one event per second)",
        fields: &[
            SOURCE,
            req(
                "since_last_event",
                Json,
                "{reason: count} since the previous one",
            ),
        ],
    },
    EventKind {
        name: "sampler_realtime",
        when: "SCHED_FIFO was tried for the host sampler",
        fields: &[
            req("ok", Bool, "whether it was granted"),
            req("realtime", Dict, "auto or on").values(&["auto", "on", "off"]),
            opt("policy", Dict, "SCHED_FIFO"),
            opt("priority", UInt64, "the FIFO priority"),
            opt("message", Utf8, "why it was refused"),
        ],
    },
    EventKind {
        name: "episode_end",
        when: "last line",
        fields: &[
            req("end_reason", Dict, "why the capture ended").values(&super::EndReason::NAMES),
            opt("error", Utf8, "the error, when end_reason is error"),
            opt(
                "recovered_by",
                Utf8,
                "`cis490 recover`, when it appended this line to a capture killed hard",
            ),
        ],
    },
];

pub fn kind(name: &str) -> Option<&'static EventKind> {
    EVENTS.iter().find(|k| k.name == name)
}

/// One events.jsonl line, typed: for readers (report, export) that want the fields of an
/// event rather than a JSON map. Deserialize only: emitters write through
/// `EventLog::emit`, and [`EVENTS`] (which `validate` checks against) stays the one
/// declaration of each kind's fields; a test keeps the two in step.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct EventLine {
    pub t_mono_ns: u64,
    pub t_wall_ns: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// The event kinds, tagged by `event`: what the writer emits ([`crate::episode::EventLog::record`])
/// and what validate reads. Fields a kind may omit, or hold null in, are `Option`; which
/// of the two a `None` becomes when written (absent or `null`) is [`EVENTS`]'s say, so
/// the declaration stays the one place. Fields a variant does not name (newer extras)
/// are ignored when reading.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    EpisodeStart {
        episode_id: String,
        target_pid: u64,
        rate_hz: u64,
    },
    BackendSelected {
        requested: String,
        used: String,
        reason: Option<String>,
        fallback_reason: Option<String>,
        net_interfaces: serde_json::Value,
        bpf_loader: Option<serde_json::Value>,
    },
    SourceStarted {
        source: String,
        socket: Option<String>,
        rate_hz: Option<u64>,
        autodetected: Option<bool>,
    },
    SourceSkipped {
        source: String,
        reason: String,
    },
    SourceStopped {
        source: String,
        rows: u64,
    },
    SourceError {
        source: String,
        message: String,
        fatal: Option<bool>,
    },
    SourceStale {
        source: String,
        socket: Option<String>,
        message: String,
    },
    SourceRecovered {
        source: String,
        socket: Option<String>,
    },
    Gap {
        source: String,
        from_seq: u64,
        to_seq: u64,
        late_ns: Option<u64>,
    },
    Phase {
        phase: super::Phase,
        prev: Option<super::Phase>,
        reason: Option<String>,
    },
    TargetExit {
        pid: u64,
    },
    Signal {
        message: String,
    },
    QmpEvent {
        source: String,
        qmp_event: String,
        data: Option<serde_json::Value>,
        qemu_timestamp_us: Option<u64>,
        data_dropped_bytes: Option<u64>,
    },
    QmpConnected {
        source: String,
        qemu_version: Option<String>,
        vm_name: Option<String>,
        vcpu_threads: serde_json::Value,
        stats_targets: serde_json::Value,
        stats_vm_count: u64,
        stats_vcpu_count: u64,
    },
    QmpVcpuMismatch {
        source: String,
        target_pid: u64,
        message: String,
        foreign_count: u64,
        foreign: serde_json::Value,
    },
    QmpEventsDropped {
        source: String,
        rate_limited: u64,
        queue_full: u64,
        data_dropped: u64,
        total_dropped: u64,
        rate_per_s: u64,
        burst: u64,
    },
    AgentConnected {
        source: String,
        socket: Option<String>,
    },
    AgentRejects {
        source: String,
        since_last_event: serde_json::Value,
    },
    SamplerRealtime {
        ok: bool,
        realtime: String,
        policy: Option<String>,
        priority: Option<u64>,
        message: Option<String>,
    },
    EpisodeEnd {
        end_reason: super::EndReason,
        error: Option<String>,
        recovered_by: Option<String>,
    },
}

impl Event {
    /// A `gap`: ticks `from_seq..=to_seq` of `source` have no rows.
    pub fn gap(source: &str, from_seq: u64, to_seq: u64, late_ns: Option<u64>) -> Event {
        Event::Gap {
            source: source.to_owned(),
            from_seq,
            to_seq,
            late_ns,
        }
    }

    /// A non-fatal `source_error`.
    pub fn source_error(source: &str, message: impl Into<String>) -> Event {
        Event::SourceError {
            source: source.to_owned(),
            message: message.into(),
            fatal: None,
        }
    }

    /// The `event` name of this kind, as in [`EVENTS`].
    pub fn name(&self) -> &'static str {
        match self {
            Event::EpisodeStart { .. } => "episode_start",
            Event::BackendSelected { .. } => "backend_selected",
            Event::SourceStarted { .. } => "source_started",
            Event::SourceSkipped { .. } => "source_skipped",
            Event::SourceStopped { .. } => "source_stopped",
            Event::SourceError { .. } => "source_error",
            Event::SourceStale { .. } => "source_stale",
            Event::SourceRecovered { .. } => "source_recovered",
            Event::Gap { .. } => "gap",
            Event::Phase { .. } => "phase",
            Event::TargetExit { .. } => "target_exit",
            Event::Signal { .. } => "signal",
            Event::QmpEvent { .. } => "qmp_event",
            Event::QmpConnected { .. } => "qmp_connected",
            Event::QmpVcpuMismatch { .. } => "qmp_vcpu_mismatch",
            Event::QmpEventsDropped { .. } => "qmp_events_dropped",
            Event::AgentConnected { .. } => "agent_connected",
            Event::AgentRejects { .. } => "agent_rejects",
            Event::SamplerRealtime { .. } => "sampler_realtime",
            Event::EpisodeEnd { .. } => "episode_end",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ColumnType, Presence};
    use super::*;
    use serde_json::{json, Map, Value};

    /// A value of the declared type (the first allowed one for closed sets).
    fn sample(c: &C) -> Value {
        if let Some(v) = c.values {
            return json!(v[0]);
        }
        match c.ty {
            ColumnType::Int64 | ColumnType::UInt64 => json!(1),
            ColumnType::Float64 => json!(1.5),
            ColumnType::Bool => json!(true),
            ColumnType::Utf8 | ColumnType::Dict => json!("x"),
            ColumnType::Json => json!({"a": [1]}),
        }
    }

    fn line(k: &EventKind, fields: impl Iterator<Item = (String, Value)>) -> Value {
        let mut m = Map::new();
        m.insert("t_mono_ns".into(), json!(1));
        m.insert("t_wall_ns".into(), json!(2));
        m.insert("event".into(), json!(k.name));
        m.extend(fields);
        Value::Object(m)
    }

    #[test]
    fn every_declared_kind_reads_as_its_variant_and_back() {
        let mut names = std::collections::HashSet::new();
        for k in EVENTS {
            assert!(names.insert(k.name), "{} declared twice", k.name);
            // Every declared field with a value, then only the required ones.
            for required_only in [false, true] {
                let v = line(
                    k,
                    k.fields
                        .iter()
                        .filter(|f| !required_only || f.presence == Presence::Always)
                        .map(|f| (f.name.to_owned(), sample(f))),
                );
                let read: EventLine = serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}: {v}", k.name));
                assert_eq!(read.event.name(), k.name);
                // The contract's check agrees the line is well-formed.
                let problems = super::super::check_row(
                    super::super::stream("events").unwrap(),
                    v.as_object().unwrap(),
                );
                assert!(problems.is_empty(), "{}: {problems:?}", k.name);
            }
            // Without a required non-nullable field the typed read fails too.
            for f in k
                .fields
                .iter()
                .filter(|f| f.presence == Presence::Always && !f.nullable)
            {
                let v = line(
                    k,
                    k.fields
                        .iter()
                        .filter(|g| g.name != f.name)
                        .map(|g| (g.name.to_owned(), sample(g))),
                );
                assert!(
                    serde_json::from_value::<EventLine>(v).is_err(),
                    "{} reads without its required {}",
                    k.name,
                    f.name
                );
            }
        }
    }
}
