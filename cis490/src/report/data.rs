//! Loading an episode for the report, and deriving rates from cumulative counters.
//!
//! Nothing here draws. Files are streamed line by line and only the columns a panel needs
//! are kept, so an hour at 1 kHz still fits. A partial final line (incomplete episode) is
//! skipped, like any line that does not parse.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::Error;

/// One line of a plot: (seconds since the episode origin, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    /// Short name for the summary table ("cpu", "io", ...).
    pub short: String,
    /// What the y axis shows, with its unit.
    pub unit: String,
    pub series: Vec<Series>,
}

/// A phase interval from labels.jsonl, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseBand {
    pub phase: String,
    pub start_s: f64,
    pub end_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    Gap,
    SourceError,
    /// QMP run-state events (STOP, RESUME, SHUTDOWN, ...).
    Qmp,
    /// target_exit, signal.
    Lifecycle,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventMark {
    pub t_s: f64,
    pub kind: MarkKind,
    pub label: String,
}

/// Everything the report shows.
#[derive(Debug, Clone)]
pub struct Model {
    pub episode_id: String,
    pub end_s: f64,
    pub panels: Vec<Panel>,
    pub bands: Vec<PhaseBand>,
    pub marks: Vec<EventMark>,
    /// kvm-keys exits of the kinds the per-phase table ranks (CPUID leaves, MSRs).
    pub key_exits: Vec<KeyExits>,
    /// Flows as they first appear in `flows`, and DNS queries, for the network table.
    pub network: NetworkSeen,
}

/// What the per-phase network table counts: each flow once, at its first packet; each DNS
/// query at its time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkSeen {
    /// (seconds, destination address, destination port) of each flow's first packet.
    pub flows: Vec<(f64, String, u64)>,
    /// (seconds, name) of each DNS query.
    pub queries: Vec<(f64, String)>,
    seen: std::collections::HashSet<(String, String, String, String, u64, u64)>,
}

impl NetworkSeen {
    /// A `flows` row: counted the first time its flow appears.
    pub fn push_flow(&mut self, o: &Map<String, Value>) {
        let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let n = |k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
        let key = (
            s("ifname"),
            s("proto"),
            s("src_addr"),
            s("dst_addr"),
            n("src_port"),
            n("dst_port"),
        );
        if self.seen.insert(key) {
            self.flows.push((
                n("first_seen_ns") as f64 / 1e9,
                s("dst_addr"),
                n("dst_port"),
            ));
        }
    }

    /// A `dns` row: counted when it is a query.
    pub fn push_dns(&mut self, o: &Map<String, Value>) {
        if o.get("is_response").and_then(Value::as_bool) != Some(false) {
            return;
        }
        let (Some(t), Some(q)) = (
            o.get("t_mono_ns").and_then(Value::as_u64),
            o.get("qname").and_then(Value::as_str),
        ) else {
            return;
        };
        self.queries.push((t as f64 / 1e9, q.to_owned()));
    }

    /// (new flows, distinct destination addresses, distinct destination ports, DNS
    /// queries, distinct names) at the times `within` accepts.
    pub fn counts(&self, within: impl Fn(f64) -> bool) -> [usize; 5] {
        use std::collections::HashSet;
        let flows: Vec<_> = self.flows.iter().filter(|f| within(f.0)).collect();
        let addrs: HashSet<&str> = flows.iter().map(|f| f.1.as_str()).collect();
        let ports: HashSet<u64> = flows.iter().map(|f| f.2).collect();
        let queries: Vec<_> = self.queries.iter().filter(|q| within(q.0)).collect();
        let names: HashSet<&str> = queries.iter().map(|q| q.1.as_str()).collect();
        [
            flows.len(),
            addrs.len(),
            ports.len(),
            queries.len(),
            names.len(),
        ]
    }
}

/// Exits of one (kind, key) that a kvm-keys row adds to its series' previous row.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyExits {
    pub t_s: f64,
    pub kind: String,
    /// None: exits whose key the kernel's table had no room for.
    pub key: Option<u64>,
    pub name: Option<String>,
    pub exits: u64,
}

/// The kvm-keys kinds the per-phase table ranks.
pub const RANKED_KEY_KINDS: [&str; 3] = ["cpuid", "msr_read", "msr_write"];

/// Turns kvm-keys rows (cumulative per thread, kind and key) into the exits each adds.
#[derive(Default)]
pub struct KeyDeltas {
    last: BTreeMap<(u64, String, Option<u64>), u64>,
    pub out: Vec<KeyExits>,
}

impl KeyDeltas {
    pub fn push(&mut self, obj: &Map<String, Value>) {
        let (Some(t), Some(tid), Some(kind), Some(count)) = (
            obj.get("t_mono_ns").and_then(Value::as_u64),
            obj.get("tid").and_then(Value::as_u64),
            obj.get("kind").and_then(Value::as_str),
            obj.get("count").and_then(Value::as_u64),
        ) else {
            return;
        };
        if !RANKED_KEY_KINDS.contains(&kind) {
            return;
        }
        let key = obj.get("key").and_then(Value::as_u64);
        let prev = self
            .last
            .insert((tid, kind.to_owned(), key), count)
            .unwrap_or(0);
        if count > prev {
            self.out.push(KeyExits {
                t_s: t as f64 / 1e9,
                kind: kind.to_owned(),
                key,
                name: obj.get("name").and_then(Value::as_str).map(str::to_owned),
                exits: count - prev,
            });
        }
    }
}

/// The `n` (kind, key) pairs with the most exits at the times `within` accepts, most
/// first.
pub fn top_keys(exits: &[KeyExits], within: impl Fn(f64) -> bool, n: usize) -> Vec<KeyExits> {
    let mut sum: BTreeMap<(String, Option<u64>), KeyExits> = BTreeMap::new();
    for e in exits.iter().filter(|e| within(e.t_s)) {
        sum.entry((e.kind.clone(), e.key))
            .and_modify(|s| s.exits += e.exits)
            .or_insert_with(|| e.clone());
    }
    let mut v: Vec<KeyExits> = sum.into_values().collect();
    v.sort_by(|a, b| {
        b.exits
            .cmp(&a.exits)
            .then(a.kind.cmp(&b.kind))
            .then(a.key.cmp(&b.key))
    });
    v.truncate(n);
    v
}

/// A parsed row reduced to what the panels use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub t_ns: u64,
    pub seq: Option<u64>,
    pub tid: Option<u64>,
    pub vcpu: Option<u64>,
    /// A string that identifies the row's instance besides tid (a net interface).
    pub instance: Option<String>,
    pub fields: Vec<(String, f64)>,
}

/// Read every complete, parseable line of a JSON-lines file, opened with the safe reader
/// (a FIFO or symlink is an error, never a hang). A line over
/// [`crate::untrusted::MAX_LINE_BYTES`] is skipped in constant memory, like any line that
/// does not parse (`cis490 validate` names it).
pub fn for_each_object(path: &Path, mut f: impl FnMut(&Map<String, Value>)) -> Result<(), Error> {
    use crate::untrusted::{LineRead, LineReader, MAX_LINE_BYTES};
    let reader = crate::untrusted::open_stream(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e.into()))?;
    let mut lines = LineReader::new(reader, MAX_LINE_BYTES);
    loop {
        let got = lines
            .next_line(|_| {})
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        match got {
            LineRead::Eof | LineRead::Line { terminated: false } => return Ok(()),
            LineRead::Line { terminated: true } => {
                if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(lines.line()) {
                    f(&obj);
                }
            }
            LineRead::TooLong { .. } => {}
        }
    }
}

/// Keep the numeric fields `keep` selects.
pub fn sample_of(obj: &Map<String, Value>, keep: impl Fn(&str) -> bool) -> Option<Sample> {
    let t_ns = obj.get("t_mono_ns")?.as_u64()?;
    let instance = ["ifname", "iface", "interface", "dev", "device", "qom_path"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str))
        .map(str::to_owned);
    Some(Sample {
        t_ns,
        seq: obj.get("seq").and_then(Value::as_u64),
        tid: obj.get("tid").and_then(Value::as_u64),
        vcpu: obj.get("vcpu").and_then(Value::as_u64),
        instance,
        fields: obj
            .iter()
            .filter(|(k, _)| keep(k))
            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
            .collect(),
    })
}

/// Per-second rate of a cumulative counter: one point per consecutive pair, at the later
/// time. A decrease (counter reset, a thread id reused) yields no point rather than a
/// negative spike.
pub fn counter_rate(points: &[(u64, f64)]) -> Vec<(f64, f64)> {
    points
        .windows(2)
        .filter_map(|w| {
            let ((t0, v0), (t1, v1)) = (w[0], w[1]);
            if t1 <= t0 || v1 < v0 {
                return None;
            }
            Some((t1 as f64 / 1e9, (v1 - v0) / ((t1 - t0) as f64 / 1e9)))
        })
        .collect()
}

/// Sum rate points of several instances (threads) that belong to one line, tick by tick:
/// `tick` is the sampler seq (or a time bucket), the time is the latest of the tick.
pub fn sum_by_tick(points: impl IntoIterator<Item = (u64, f64, f64)>) -> Vec<(f64, f64)> {
    let mut by_tick: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (tick, t, v) in points {
        let e = by_tick.entry(tick).or_insert((t, 0.0));
        e.0 = e.0.max(t);
        e.1 += v;
    }
    by_tick.into_values().collect()
}

fn tick_of(s: &Sample, interval_ns: u64) -> u64 {
    s.seq.unwrap_or(s.t_ns / interval_ns.max(1))
}

/// CPU panel: on-CPU seconds per second (cores) per vCPU thread, for the other threads
/// together, and the process total when the source writes a total row.
pub fn cpu_panel(rows: &[Sample], interval_ns: u64, source: &str) -> Panel {
    /// (tick, t_ns, on_cpu_ns) of one thread.
    type ThreadPoints = Vec<(u64, u64, f64)>;
    let mut per_thread: BTreeMap<(String, u64), ThreadPoints> = BTreeMap::new();
    let mut total: Vec<(u64, f64)> = Vec::new();
    for s in rows {
        let Some(v) = s
            .fields
            .iter()
            .find(|(k, _)| k == "on_cpu_ns")
            .map(|(_, v)| *v)
        else {
            continue;
        };
        match s.tid {
            Some(tid) => {
                let group = match s.vcpu {
                    Some(i) => format!("vCPU {i}"),
                    None => "other threads".to_owned(),
                };
                per_thread.entry((group, tid)).or_default().push((
                    tick_of(s, interval_ns),
                    s.t_ns,
                    v,
                ));
            }
            None => total.push((s.t_ns, v)),
        }
    }
    let mut groups: BTreeMap<String, Vec<(u64, f64, f64)>> = BTreeMap::new();
    for ((group, _), pts) in per_thread {
        let ticks: Vec<u64> = pts.iter().map(|p| p.0).collect();
        let tv: Vec<(u64, f64)> = pts.iter().map(|p| (p.1, p.2)).collect();
        // counter_rate drops pairs; keep the tick of each pair's later row.
        for (i, w) in tv.windows(2).enumerate() {
            if let Some(&(t, r)) = counter_rate(w).first() {
                groups
                    .entry(group.clone())
                    .or_default()
                    .push((ticks[i + 1], t, r / 1e9));
            }
        }
    }
    let mut series: Vec<Series> = groups
        .into_iter()
        .map(|(name, pts)| Series {
            name,
            points: sum_by_tick(pts),
        })
        .collect();
    // vCPU lines first, in index order ("vCPU 10" after "vCPU 9").
    series.sort_by_key(|s| {
        s.name
            .strip_prefix("vCPU ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    });
    if !total.is_empty() {
        series.push(Series {
            name: "process total".into(),
            points: counter_rate(&total)
                .into_iter()
                .map(|(t, r)| (t, r / 1e9))
                .collect(),
        });
    }
    Panel {
        title: format!("CPU: on-CPU time per thread group ({source})"),
        short: "cpu".into(),
        unit: "cores".into(),
        series,
    }
}

/// Rates of the selected counter fields, one line per field and instance (vCPU, else
/// interface or QOM path). `process_only` keeps only process-level rows (tid null or
/// absent), for sources that also write per-thread rows.
pub fn counter_panel(
    rows: &[Sample],
    short: &str,
    title: String,
    unit: &str,
    process_only: bool,
    field_ok: impl Fn(&str) -> bool,
) -> Panel {
    let mut per: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for s in rows.iter().filter(|s| !process_only || s.tid.is_none()) {
        for (k, v) in &s.fields {
            if !field_ok(k) {
                continue;
            }
            let name = match (s.vcpu, &s.instance) {
                (Some(c), _) => format!("vcpu{c} {k}"),
                (None, Some(i)) => format!("{i} {k}"),
                (None, None) => k.clone(),
            };
            per.entry(name).or_default().push((s.t_ns, *v));
        }
    }
    Panel {
        title,
        short: short.into(),
        unit: unit.into(),
        series: per
            .into_iter()
            .map(|(name, pts)| Series {
                name,
                points: counter_rate(&pts),
            })
            .collect(),
    }
}

/// The values of gauge fields as they are.
pub fn gauge_panel(
    rows: &[Sample],
    short: &str,
    title: String,
    unit: &str,
    field_ok: impl Fn(&str) -> bool,
) -> Panel {
    let mut per: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in rows {
        for (k, v) in &s.fields {
            if field_ok(k) {
                per.entry(k.clone())
                    .or_default()
                    .push((s.t_ns as f64 / 1e9, *v));
            }
        }
    }
    Panel {
        title,
        short: short.into(),
        unit: unit.into(),
        series: per
            .into_iter()
            .map(|(name, points)| Series { name, points })
            .collect(),
    }
}

/// The QMP columns that count KVM exits: prefer the plain per-vCPU totals
/// (`exits`, `vcpu0_exits`) over the per-reason ones (`halt_exits`) when both exist.
pub fn exit_columns(names: &[String]) -> Vec<String> {
    let all: Vec<&String> = names.iter().filter(|n| n.ends_with("exits")).collect();
    let plain: Vec<String> = all
        .iter()
        .filter(|n| {
            let rest = n.trim_start_matches("vcpu");
            let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            let rest = rest.trim_start_matches('_');
            rest == "exits" || rest == "kvm_exits"
        })
        .map(|s| (*s).clone())
        .collect();
    if plain.is_empty() {
        all.into_iter().take(8).cloned().collect()
    } else {
        plain
    }
}

/// Counter units a cumulative guest CPU field can carry.
pub fn is_counter_name(name: &str) -> bool {
    [
        "_ns", "_us", "_ms", "_ticks", "_jiffies", "_count", "_ops", "_bytes",
    ]
    .iter()
    .any(|u| name.ends_with(u))
}

/// Guest CPU fields: the agent's cumulative `guest_cpu_<mode>_ns` (idle left out: it
/// would dwarf the rest) and load averages.
pub fn is_guest_cpu(name: &str) -> bool {
    name.starts_with("guest_")
        && (name.contains("cpu") || name.contains("load"))
        && !name.contains("idle")
}

pub fn is_guest_mem(name: &str) -> bool {
    name.starts_with("guest_")
        && !is_guest_cpu(name)
        && (name.contains("mem") || name.ends_with("_kb") || name.ends_with("_pages"))
}

/// Phase intervals from labels rows (t_ns, phase), the last one ending at `end_s`.
pub fn phase_bands(labels: &[(u64, String)], end_s: f64) -> Vec<PhaseBand> {
    let mut out: Vec<PhaseBand> = Vec::new();
    for (i, (t, phase)) in labels.iter().enumerate() {
        let start_s = *t as f64 / 1e9;
        let end = labels
            .get(i + 1)
            .map_or(end_s, |(t2, _)| *t2 as f64 / 1e9)
            .max(start_s);
        out.push(PhaseBand {
            phase: phase.clone(),
            start_s,
            end_s: end,
        });
    }
    out
}

/// The events that become markers: gaps, source errors, QMP run-state events, the end.
pub fn event_mark(obj: &Map<String, Value>) -> Option<EventMark> {
    let t_s = obj.get("t_mono_ns")?.as_u64()? as f64 / 1e9;
    let event = obj.get("event")?.as_str()?;
    let source = obj.get("source").and_then(Value::as_str).unwrap_or("");
    let is_qmp_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
    };
    let (kind, label) = match event {
        "gap" => (MarkKind::Gap, format!("gap {source}")),
        "source_error" => (MarkKind::SourceError, format!("error {source}")),
        "target_exit" | "signal" => (MarkKind::Lifecycle, event.to_owned()),
        e if is_qmp_name(e) => (MarkKind::Qmp, e.to_owned()),
        e if e.starts_with("qmp") => {
            // {"event":"qmp_event","qmp_event":"STOP",...}; else any upper-case value.
            let name = obj.get("qmp_event").and_then(Value::as_str).or_else(|| {
                obj.values()
                    .filter_map(Value::as_str)
                    .find(|s| is_qmp_name(s))
            })?;
            (MarkKind::Qmp, name.to_owned())
        }
        _ => return None,
    };
    Some(EventMark { t_s, kind, label })
}

/// Marks of one kind at the same millisecond become one mark ("gap proc,qmp,net"), so
/// the per-source gap events of one missed tick read as one label.
pub fn merge_marks(marks: Vec<EventMark>) -> Vec<EventMark> {
    let mut out: Vec<EventMark> = Vec::new();
    for m in marks {
        if let Some(prev) = out
            .iter_mut()
            .rev()
            .take(8)
            .find(|p| p.kind == m.kind && (p.t_s - m.t_s).abs() < 1e-3)
        {
            let (head, tail) = m.label.split_once(' ').unwrap_or((&m.label, ""));
            if prev.label.starts_with(head) && !tail.is_empty() {
                if !prev.label.split([' ', ',']).any(|x| x == tail) {
                    prev.label.push(',');
                    prev.label.push_str(tail);
                }
                continue;
            }
            if prev.label == m.label {
                continue;
            }
        }
        out.push(m);
    }
    out
}

/// At most about `2 × buckets` points for drawing: per time bucket the minimum and the
/// maximum (in time order), so spikes survive while an hour at 1 kHz stays a small picture.
/// The summary table uses the full series.
pub fn decimate(points: &[(f64, f64)], t0: f64, t1: f64, buckets: usize) -> Vec<(f64, f64)> {
    if points.len() <= 4 * buckets || buckets == 0 || t1 <= t0 {
        return points.to_vec();
    }
    let width = (t1 - t0) / buckets as f64;
    let mut out = Vec::with_capacity(2 * buckets + 2);
    let mut i = 0;
    while i < points.len() {
        let b = ((points[i].0 - t0) / width).floor();
        let mut lo = points[i];
        let mut hi = points[i];
        let mut j = i + 1;
        while j < points.len() && ((points[j].0 - t0) / width).floor() == b {
            if points[j].1 < lo.1 {
                lo = points[j];
            }
            if points[j].1 > hi.1 {
                hi = points[j];
            }
            j += 1;
        }
        if lo.0 <= hi.0 {
            out.push(lo);
            if hi != lo {
                out.push(hi);
            }
        } else {
            out.push(hi);
            out.push(lo);
        }
        i = j;
    }
    out
}

/// Mean and 95th percentile (nearest rank) of values.
pub fn mean_p95(values: &mut [f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    values.sort_by(f64::total_cmp);
    let rank = ((0.95 * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some((mean, values[rank - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_counts_each_flow_once_and_queries_by_phase() {
        let mut n = NetworkSeen::default();
        let flow = |first: u64, dst: &str, dport: u64| {
            serde_json::json!({"ifname": "tap0", "proto": "udp", "src_addr": "10.0.0.2",
                "dst_addr": dst, "src_port": 5000, "dst_port": dport, "first_seen_ns": first})
            .as_object()
            .unwrap()
            .clone()
        };
        n.push_flow(&flow(1_000_000_000, "1.1.1.1", 53));
        n.push_flow(&flow(1_000_000_000, "1.1.1.1", 53)); // the same flow's next row
        n.push_flow(&flow(2_500_000_000, "8.8.8.8", 53));
        n.push_flow(&flow(2_600_000_000, "8.8.8.8", 443));
        let q = |t: u64, name: &str, resp: bool| {
            serde_json::json!({"t_mono_ns": t, "qname": name, "is_response": resp})
                .as_object()
                .unwrap()
                .clone()
        };
        n.push_dns(&q(1_100_000_000, "a.test", false));
        n.push_dns(&q(1_200_000_000, "a.test", true));
        n.push_dns(&q(2_700_000_000, "b.test", false));
        n.push_dns(&q(2_800_000_000, "b.test", false));
        assert_eq!(n.counts(|t| t < 2.0), [1, 1, 1, 1, 1]);
        assert_eq!(n.counts(|t| t >= 2.0), [2, 1, 2, 2, 1]);
    }

    #[test]
    fn key_exits_are_the_differences_of_each_series_and_rank_per_window() {
        let mut d = KeyDeltas::default();
        let row = |t: u64, tid: u64, kind: &str, key: u64, count: u64| {
            serde_json::json!({"t_mono_ns": t, "tid": tid, "kind": kind, "key": key,
                "name": null, "count": count})
            .as_object()
            .unwrap()
            .clone()
        };
        d.push(&row(1_000_000_000, 7, "cpuid", 1, 5));
        d.push(&row(2_000_000_000, 7, "cpuid", 1, 8));
        d.push(&row(2_000_000_000, 8, "cpuid", 1, 2)); // another thread: its own series
        d.push(&row(2_500_000_000, 7, "msr_read", 0x10, 30));
        d.push(&row(2_500_000_000, 7, "pio_write", 0x80, 99)); // not ranked
        let exits: Vec<u64> = d.out.iter().map(|e| e.exits).collect();
        assert_eq!(exits, vec![5, 3, 2, 30]);
        let top = top_keys(&d.out, |t| (1.5..3.0).contains(&t), 5);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].kind.as_str(), top[0].exits), ("msr_read", 30));
        assert_eq!(
            (top[1].kind.as_str(), top[1].key, top[1].exits),
            ("cpuid", Some(1), 5)
        );
        assert_eq!(top_keys(&d.out, |t| t < 1.5, 1)[0].exits, 5);
        assert!(top_keys(&d.out, |t| t >= 3.0, 5).is_empty());
    }

    fn s(t_ns: u64, seq: u64, tid: Option<u64>, vcpu: Option<u64>, on_cpu: f64) -> Sample {
        Sample {
            t_ns,
            seq: Some(seq),
            tid,
            vcpu,
            instance: None,
            fields: vec![("on_cpu_ns".into(), on_cpu)],
        }
    }

    #[test]
    fn rates_from_cumulative_counters() {
        let r = counter_rate(&[
            (1_000_000_000, 0.0),
            (2_000_000_000, 500.0),
            (2_500_000_000, 1000.0),
        ]);
        assert_eq!(r, vec![(2.0, 500.0), (2.5, 1000.0)]);
        // A reset and a non-advancing clock produce no point.
        assert!(counter_rate(&[(1, 5.0), (2, 4.0), (2, 9.0)]).is_empty());
    }

    #[test]
    fn cpu_groups_by_vcpu_and_sums_other_threads() {
        let sec = 1_000_000_000u64;
        let rows = vec![
            s(0, 0, Some(10), Some(0), 0.0),
            s(0, 0, Some(11), None, 0.0),
            s(0, 0, Some(12), None, 0.0),
            s(0, 0, None, None, 0.0),
            s(sec, 1, Some(10), Some(0), 0.5e9),
            s(sec, 1, Some(11), None, 0.25e9),
            s(sec, 1, Some(12), None, 0.25e9),
            s(sec, 1, None, None, 1.0e9),
        ];
        let p = cpu_panel(&rows, sec, "proc");
        let names: Vec<&str> = p.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["vCPU 0", "other threads", "process total"]);
        assert_eq!(p.series[0].points, vec![(1.0, 0.5)]);
        assert_eq!(p.series[1].points, vec![(1.0, 0.5)]);
        assert_eq!(p.series[2].points, vec![(1.0, 1.0)]);
    }

    #[test]
    fn decimation_keeps_extremes_in_order() {
        let pts: Vec<(f64, f64)> = (0..1000)
            .map(|i| (i as f64 / 100.0, (i % 7) as f64))
            .collect();
        let mut spiky = pts.clone();
        spiky[500].1 = 99.0;
        let d = decimate(&spiky, 0.0, 10.0, 10);
        assert!(d.len() <= 20, "{}", d.len());
        assert!(d.iter().any(|p| p.1 == 99.0));
        assert!(d.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(decimate(&pts[..30], 0.0, 10.0, 10), pts[..30].to_vec());
    }

    #[test]
    fn exit_column_choice() {
        let names: Vec<String> = ["vcpu0_exits", "vcpu0_halt_exits", "vcpu1_exits", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(exit_columns(&names), vec!["vcpu0_exits", "vcpu1_exits"]);
        let only_reasons: Vec<String> = vec!["halt_exits".into(), "io_exits".into()];
        assert_eq!(exit_columns(&only_reasons), only_reasons);
        assert_eq!(exit_columns(&["exits".to_string()]), vec!["exits"]);
    }

    #[test]
    fn guest_field_classes() {
        assert!(is_guest_cpu("guest_cpu_user_ticks") && is_counter_name("guest_cpu_user_ticks"));
        assert!(is_guest_cpu("guest_loadavg_1m"));
        assert!(!is_guest_cpu("guest_cpu_idle_ns"));
        assert!(is_guest_mem("guest_meminfo_avail_kb"));
        assert!(!is_guest_mem("guest_cpu_kb") && !is_guest_mem("meminfo_kb"));
    }

    #[test]
    fn bands_marks_and_stats() {
        let b = phase_bands(&[(0, "clean".into()), (2_000_000_000, "armed".into())], 5.0);
        assert_eq!(
            b[1],
            PhaseBand {
                phase: "armed".into(),
                start_s: 2.0,
                end_s: 5.0
            }
        );
        assert_eq!(b[0].end_s, 2.0);
        let ev = |v: serde_json::Value| event_mark(v.as_object().unwrap());
        let m = ev(
            serde_json::json!({"t_mono_ns": 1_500_000_000u64, "event": "gap", "source": "proc"}),
        )
        .unwrap();
        assert_eq!(
            (m.kind, m.label.as_str(), m.t_s),
            (MarkKind::Gap, "gap proc", 1.5)
        );
        assert_eq!(
            ev(serde_json::json!({"t_mono_ns": 1, "event": "STOP"}))
                .unwrap()
                .kind,
            MarkKind::Qmp
        );
        let q = ev(serde_json::json!({"t_mono_ns": 1, "event": "qmp_event", "name": "RESUME"}))
            .unwrap();
        assert_eq!(q.label, "RESUME");
        assert!(ev(serde_json::json!({"t_mono_ns": 1, "event": "source_started"})).is_none());
        let g = |t: f64, label: &str| EventMark {
            t_s: t,
            kind: MarkKind::Gap,
            label: label.into(),
        };
        let merged = merge_marks(vec![
            g(1.0, "gap proc"),
            g(1.0, "gap qmp"),
            g(1.0, "gap qmp"),
            g(2.0, "gap proc"),
        ]);
        assert_eq!(merged, vec![g(1.0, "gap proc,qmp"), g(2.0, "gap proc")]);
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(mean_p95(&mut v), Some((50.5, 95.0)));
        assert_eq!(mean_p95(&mut []), None);
    }
}
