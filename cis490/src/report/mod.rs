//! `cis490 report`: one picture of an episode (stacked panels on its time axis, phase bands,
//! event markers) and a per-phase summary table.
//!
//! [`data`] loads and derives (pure, unit-tested); [`draw`] only draws. The picture is
//! never written into the episode directory: a complete episode is immutable.

pub mod data;
pub mod draw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::episode::{EVENTS, LABELS, META};
use crate::error::Error;
use data::{Model, Panel, Sample};

pub struct ReportOutput {
    pub path: PathBuf,
    pub summary: String,
}

/// `<episode_dir>.report.png` beside the episode directory.
pub fn default_output(dir: &Path) -> PathBuf {
    let dir = dir.components().as_path();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "episode".into());
    dir.with_file_name(format!("{name}.report.png"))
}

fn load_rows(path: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<Sample>, Error> {
    let mut rows = Vec::new();
    data::for_each_object(path, |obj| {
        if let Some(s) = data::sample_of(obj, &keep) {
            rows.push(s);
        }
    })?;
    Ok(rows)
}

const PROC_IO: [&str; 4] = ["read_bytes", "write_bytes", "rchar", "wchar"];

/// Load an episode directory into the report model.
pub fn load(dir: &Path) -> Result<Model, Error> {
    // The safe reader: a FIFO or symlink named meta.json is refused, never opened.
    let meta: Value =
        crate::untrusted::read_json(&dir.join(META), crate::untrusted::MAX_META_BYTES).map_err(
            |e| {
                Error::Usage(format!(
                    "{} is not an episode directory (no readable meta.json: {e})",
                    dir.display()
                ))
            },
        )?;
    let interval_ns = meta["schedule"]["interval_ns"]
        .as_u64()
        .unwrap_or(100_000_000);
    // A stream written with --compress zstd is read the same way (jsonl::open_stream).
    let file = |source: &str| {
        let plain = dir.join(crate::episode::telemetry_file(source));
        let zst =
            crate::jsonl::Compression::Zstd.file_name(&crate::episode::telemetry_file(source));
        if plain.exists() {
            plain
        } else {
            dir.join(zst)
        }
    };
    let mut panels: Vec<Panel> = Vec::new();
    let mut last_t_ns = 0u64;
    let mut track = |rows: &[Sample]| {
        if let Some(t) = rows.iter().map(|s| s.t_ns).max() {
            last_t_ns = last_t_ns.max(t);
        }
    };

    // CPU: the BPF scheduler source when present (exact), else /proc.
    let cpu_source = ["bpf-sched", "proc"].into_iter().find(|s| file(s).exists());
    if let Some(src) = cpu_source {
        let rows = load_rows(&file(src), |k| k == "on_cpu_ns")?;
        track(&rows);
        panels.push(data::cpu_panel(&rows, interval_ns, src));
    }
    // I/O bytes/s of the process.
    // bpf-io has proc's task-io columns under the same names, plus block requests.
    let bpf_io = |k: &str| PROC_IO.contains(&k) || k == "blk_read_bytes" || k == "blk_write_bytes";
    if file("bpf-io").exists() {
        let rows = load_rows(&file("bpf-io"), bpf_io)?;
        track(&rows);
        panels.push(data::counter_panel(
            &rows,
            "io",
            "I/O (bpf-io; guest reads through the host cache show in rchar)".into(),
            "bytes/s",
            true,
            bpf_io,
        ));
    } else if file("proc").exists() {
        let rows = load_rows(&file("proc"), |k| PROC_IO.contains(&k))?;
        track(&rows);
        panels.push(data::counter_panel(
            &rows,
            "io",
            "I/O of the process (proc; guest reads through the host cache show in rchar)".into(),
            "bytes/s",
            true,
            |k| PROC_IO.contains(&k),
        ));
    }
    if file("net").exists() {
        let rows = load_rows(&file("net"), |k| k.ends_with("_bytes"))?;
        track(&rows);
        panels.push(data::counter_panel(
            &rows,
            "net",
            "Network (net)".into(),
            "bytes/s",
            true,
            |k| k.ends_with("_bytes"),
        ));
    }
    if file("qmp").exists() {
        let rows = load_rows(&file("qmp"), |k| k.ends_with("exits"))?;
        track(&rows);
        let mut names: Vec<String> = rows
            .iter()
            .flat_map(|s| s.fields.iter().map(|(k, _)| k.clone()))
            .collect();
        names.sort();
        names.dedup();
        let cols = data::exit_columns(&names);
        if !cols.is_empty() {
            // Per-vCPU rows carry the vCPU thread's tid: keep them.
            panels.push(data::counter_panel(
                &rows,
                "kvm",
                "KVM exits (qmp)".into(),
                "exits/s",
                false,
                |k| cols.iter().any(|c| c == k),
            ));
        }
    }
    // VM exits by kind from the kvm source (emulated instructions, far more numerous, are
    // left out of the picture), and the exits per CPUID leaf and MSR for the table.
    let mut key_exits = data::KeyDeltas::default();
    if file("kvm").exists() {
        let plotted = |k: &str| {
            crate::kvm::KINDS
                .iter()
                .any(|c| c.column == k && c.key_kind.is_some())
        };
        let rows = load_rows(&file("kvm"), plotted)?;
        track(&rows);
        let panel = data::counter_panel(
            &rows,
            "vm-exits",
            "VM exits by kind (kvm)".into(),
            "exits/s",
            true,
            plotted,
        );
        if panel.series.iter().any(|s| !s.points.is_empty()) {
            panels.push(panel);
        }
        if file("kvm-keys").exists() {
            data::for_each_object(&file("kvm-keys"), |o| key_exits.push(o))?;
        }
    }
    // The network as the flow programs saw it: packets per direction, new flows, DNS
    // queries, per interface; flows and queries for the per-phase table.
    let mut network = data::NetworkSeen::default();
    if file("flow").exists() {
        let plotted =
            |k: &str| matches!(k, "rx_packets" | "tx_packets" | "flows_new" | "dns_queries");
        let rows = load_rows(&file("flow"), plotted)?;
        track(&rows);
        let panel = data::counter_panel(
            &rows,
            "network",
            "Network (flow): packets, new flows, DNS queries".into(),
            "per s",
            true,
            plotted,
        );
        if panel.series.iter().any(|s| !s.points.is_empty()) {
            panels.push(panel);
        }
        if file("flows").exists() {
            data::for_each_object(&file("flows"), |o| network.push_flow(o))?;
        }
        if file("dns").exists() {
            data::for_each_object(&file("dns"), |o| network.push_dns(o))?;
        }
    }
    if file("agent").exists() {
        let rows = load_rows(&file("agent"), |k| {
            data::is_guest_cpu(k) || data::is_guest_mem(k)
        })?;
        track(&rows);
        let mut cpu = data::counter_panel(
            &rows,
            "guest-cpu",
            "Guest CPU (agent; cumulative _ns as cores, idle left out)".into(),
            "cores / load / per s",
            true,
            |k| data::is_guest_cpu(k) && data::is_counter_name(k),
        );
        for s in &mut cpu.series {
            if s.name.ends_with("_ns") {
                s.points.iter_mut().for_each(|p| p.1 /= 1e9);
            }
        }
        let gauges = data::gauge_panel(&rows, "", String::new(), "", |k| {
            data::is_guest_cpu(k) && !data::is_counter_name(k)
        });
        cpu.series.extend(gauges.series);
        if !cpu.series.is_empty() {
            panels.push(cpu);
        }
        let mem = data::gauge_panel(
            &rows,
            "guest-mem",
            "Guest memory (agent)".into(),
            "as reported",
            data::is_guest_mem,
        );
        if !mem.series.is_empty() {
            panels.push(mem);
        }
    }

    let mut labels: Vec<(u64, String)> = Vec::new();
    if dir.join(LABELS).exists() {
        data::for_each_object(&dir.join(LABELS), |o| {
            if let (Some(t), Some(p)) = (
                o.get("t_mono_ns").and_then(Value::as_u64),
                o.get("phase").and_then(Value::as_str),
            ) {
                labels.push((t, p.to_owned()));
            }
        })?;
    }
    let mut marks = Vec::new();
    if dir.join(EVENTS).exists() {
        data::for_each_object(&dir.join(EVENTS), |o| {
            if let Some(t) = o.get("t_mono_ns").and_then(Value::as_u64) {
                last_t_ns = last_t_ns.max(t);
            }
            marks.extend(data::event_mark(o));
        })?;
    }
    let end_s = meta["result"]["duration_observed_s"]
        .as_f64()
        .unwrap_or(0.0)
        .max(last_t_ns as f64 / 1e9)
        .max(1e-3);
    Ok(Model {
        episode_id: meta["episode_id"].as_str().unwrap_or("?").to_owned(),
        end_s,
        panels,
        bands: data::phase_bands(&labels, end_s),
        marks: data::merge_marks(marks),
        key_exits: key_exits.out,
        network,
    })
}

/// The per-phase table: for every plotted line, its mean and p95 within each phase.
pub fn summary_table(model: &Model) -> String {
    // Without labels (an episode cut before its first label) the whole episode is one row.
    let whole = [data::PhaseBand {
        phase: "(no labels)".into(),
        start_s: 0.0,
        end_s: model.end_s,
    }];
    let bands: &[data::PhaseBand] = if model.bands.is_empty() {
        &whole
    } else {
        &model.bands
    };
    // Phases in order of first appearance, durations summed over repeated visits.
    let mut order: Vec<String> = Vec::new();
    let mut duration: BTreeMap<String, f64> = BTreeMap::new();
    for b in bands {
        if !order.contains(&b.phase) {
            order.push(b.phase.clone());
        }
        *duration.entry(b.phase.clone()).or_default() += b.end_s - b.start_s;
    }
    let phase_at = |t: f64| {
        bands
            .iter()
            .rev()
            .find(|b| t >= b.start_s)
            .map(|b| b.phase.as_str())
    };
    let mut out = format!(
        "{:<18} {:>10}  {:<44} {:>14} {:>14} {:>7}\n",
        "phase", "duration_s", "stream", "mean", "p95", "n"
    );
    for phase in &order {
        let mut first = true;
        for panel in &model.panels {
            for s in &panel.series {
                let mut vals: Vec<f64> = s
                    .points
                    .iter()
                    .filter(|(t, _)| phase_at(*t) == Some(phase.as_str()))
                    .map(|p| p.1)
                    .collect();
                let n = vals.len();
                let Some((mean, p95)) = data::mean_p95(&mut vals) else {
                    continue;
                };
                let stream = format!("{}: {} [{}]", panel.short, s.name, panel.unit);
                out.push_str(&format!(
                    "{:<18} {:>10}  {:<44} {:>14} {:>14} {:>7}\n",
                    if first { phase.as_str() } else { "" },
                    if first {
                        format!("{:.2}", duration[phase])
                    } else {
                        String::new()
                    },
                    stream,
                    draw::si(mean),
                    draw::si(p95),
                    n
                ));
                first = false;
            }
        }
        if first {
            out.push_str(&format!(
                "{phase:<18} {:>10.2}  (no samples)\n",
                duration[phase]
            ));
        }
    }
    if !model.network.flows.is_empty() || !model.network.queries.is_empty() {
        out.push_str(&format!(
            "\nnetwork per phase (flows, dns)\n{:<18} {:>10} {:>14} {:>14} {:>12} {:>14}\n",
            "phase", "new_flows", "dst_addrs", "dst_ports", "dns_queries", "dns_names"
        ));
        for phase in &order {
            let c = model
                .network
                .counts(|t| phase_at(t) == Some(phase.as_str()));
            out.push_str(&format!(
                "{phase:<18} {:>10} {:>14} {:>14} {:>12} {:>14}\n",
                c[0], c[1], c[2], c[3], c[4]
            ));
        }
    }
    if !model.key_exits.is_empty() {
        out.push_str(&format!(
            "\ntop CPUID leaves and MSRs per phase (kvm-keys)\n{:<18} {:<10} {:>12}  {:<28} {:>10}\n",
            "phase", "kind", "key", "name", "exits"
        ));
        for phase in &order {
            let top = data::top_keys(
                &model.key_exits,
                |t| phase_at(t) == Some(phase.as_str()),
                TOP_KEYS,
            );
            for (i, e) in top.iter().enumerate() {
                out.push_str(&format!(
                    "{:<18} {:<10} {:>12}  {:<28} {:>10}\n",
                    if i == 0 { phase.as_str() } else { "" },
                    e.kind,
                    e.key
                        .map_or("(table full)".to_owned(), |k| format!("{k:#x}")),
                    e.name.as_deref().unwrap_or(""),
                    e.exits
                ));
            }
        }
    }
    out
}

/// Keys listed per phase in the table.
const TOP_KEYS: usize = 5;

/// Load, summarize and draw. The output must not be inside the episode directory.
pub fn run(dir: &Path, output: Option<PathBuf>) -> Result<ReportOutput, Error> {
    let canon_dir =
        std::fs::canonicalize(dir).map_err(|e| Error::Usage(format!("{}: {e}", dir.display())))?;
    let path = output.unwrap_or_else(|| default_output(&canon_dir));
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if std::fs::canonicalize(parent).is_ok_and(|p| p.starts_with(&canon_dir)) {
        return Err(Error::Usage(format!(
            "refusing to write {} inside the episode directory (episodes are immutable)",
            path.display()
        )));
    }
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => draw::Format::Png,
        Some(e) if e.eq_ignore_ascii_case("svg") => draw::Format::Svg,
        _ => {
            return Err(Error::Usage(format!(
                "{}: the output must end in .png or .svg",
                path.display()
            )))
        }
    };
    let model = load(dir)?;
    if model.panels.iter().all(|p| p.series.is_empty()) {
        return Err(Error::Usage(format!(
            "{}: no telemetry rows to plot",
            dir.display()
        )));
    }
    draw::render(&model, &path, format)?;
    Ok(ReportOutput {
        path,
        summary: summary_table(&model),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_output_is_beside_the_episode() {
        assert_eq!(
            default_output(Path::new("/d/episodes/01ABC/")),
            PathBuf::from("/d/episodes/01ABC.report.png")
        );
        assert_eq!(
            default_output(Path::new("01ABC")),
            PathBuf::from("01ABC.report.png")
        );
    }

    fn model(bands: Vec<data::PhaseBand>) -> Model {
        Model {
            episode_id: "E".into(),
            end_s: 4.0,
            panels: vec![Panel {
                title: "CPU".into(),
                short: "cpu".into(),
                unit: "cores".into(),
                series: vec![data::Series {
                    name: "vCPU 0".into(),
                    points: vec![(0.5, 1.0), (1.5, 3.0), (2.5, 10.0), (3.5, 20.0)],
                }],
            }],
            bands,
            marks: Vec::new(),
            key_exits: Vec::new(),
            network: Default::default(),
        }
    }

    #[test]
    fn summary_per_phase_and_without_labels() {
        let band = |p: &str, a: f64, b: f64| data::PhaseBand {
            phase: p.into(),
            start_s: a,
            end_s: b,
        };
        let t = summary_table(&model(vec![
            band("clean", 0.0, 2.0),
            band("armed", 2.0, 4.0),
        ]));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[1].starts_with("clean") && lines[1].contains("2.00"),
            "{t}"
        );
        // mean 2, p95 3 in clean; mean 15, p95 20 in armed.
        assert!(lines[1].contains("cpu: vCPU 0 [cores]"), "{t}");
        assert!(
            lines[1].contains(" 2.000 ") && lines[1].contains(" 3.000 "),
            "{t}"
        );
        assert!(
            lines[2].contains(" 15.0 ") && lines[2].contains(" 20.0 "),
            "{t}"
        );
        let t = summary_table(&model(Vec::new()));
        assert!(t.lines().nth(1).unwrap().starts_with("(no labels)"), "{t}");
        assert!(t.contains(" 8.500 "), "{t}");
    }

    #[test]
    fn output_inside_the_episode_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let err = run(d.path(), Some(d.path().join("report.png")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("inside the episode"), "{err}");
        let err = run(d.path(), Some(d.path().with_extension("gif")))
            .err()
            .unwrap();
        assert!(err.to_string().contains(".png or .svg"), "{err}");
    }
}
