//! `cargo xtask demo`: the main job on a built-in target. Boots the test VM (a real QEMU
//! guest running the cis490 agent), traces it with every source while walking through
//! the phases, validates the episode, prints a one-screen summary and the episode path,
//! and draws the report next to it. Where the VM cannot start, the bundled multi-threaded
//! workload is traced instead, and the demo says so.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::util::{self, root};
use crate::vm;

fn target_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    target.join("debug").join(name)
}

pub fn run(duration: f64) -> anyhow::Result<()> {
    util::cargo(&["build", "--locked", "--workspace", "--bins"])?;
    let opts = vm::StartOpts {
        run_dir: Some(vm::default_run_dir().with_file_name("demo")),
        // The guest beacons (resolves a name, then sends a request to it) every second, so
        // the network streams have rows; on the tap network they reach the VM's own
        // namespace and nothing else.
        append: "cis490.beacon_s=1".into(),
        ..Default::default()
    };
    let run_dir = opts.run_dir.clone().expect("set above");
    let _ = vm::stop(&run_dir);
    let dir = match vm::start(&opts) {
        Ok(kv) => {
            let pid = kv
                .iter()
                .find(|(k, _)| *k == "PID")
                .map(|(_, v)| v.clone())
                .context("vm start gave no PID")?;
            eprintln!("demo target: the test VM, QEMU pid {pid} (QMP and agent sockets found from its command line)");
            let res = trace(&pid, duration);
            let _ = vm::stop(&run_dir);
            res?
        }
        Err(e) => {
            eprintln!("demo: the test VM did not start ({e:#}); tracing the bundled multi-threaded target instead");
            let mut load = Command::new(target_bin("cis490-testload"))
                .args(["--spin", "2", "--switch", "2", "--io", "1"])
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the bundled target")?;
            let mut ready = String::new();
            BufReader::new(load.stdout.take().expect("piped")).read_line(&mut ready)?;
            eprintln!(
                "demo target: cis490-testload pid {} (2 busy, 2 sleeping, 1 I/O thread)",
                load.id()
            );
            let res = trace(&load.id().to_string(), duration);
            let _ = load.kill();
            let _ = load.wait();
            res?
        }
    };
    let validate = Command::new(target_bin("cis490"))
        .arg("validate")
        .arg(&dir)
        .output()?;
    summary(&dir)?;
    print!("{}", String::from_utf8_lossy(&validate.stdout));
    // The picture goes next to the episode; its per-phase table is `cis490 report DIR`.
    let report = Command::new(target_bin("cis490"))
        .arg("report")
        .arg(&dir)
        .stderr(Stdio::inherit())
        .output()?;
    if let Some(png) = String::from_utf8_lossy(&report.stdout)
        .lines()
        .rev()
        .find(|l| l.ends_with(".png"))
    {
        println!(
            "report    {png}  (per-phase table: cis490 report {})",
            dir.display()
        );
    }
    println!("{}", dir.display());
    if !validate.status.success() {
        bail!("the demo episode did not validate");
    }
    Ok(())
}

/// `cis490 trace` for `duration` s, marking `armed` at a third and `infecting` at two
/// thirds, as a researcher would while driving the VM.
fn trace(pid: &str, duration: f64) -> anyhow::Result<PathBuf> {
    let episodes = root().join("data").join("episodes");
    let before = list_dirs(&episodes);
    let child = Command::new(target_bin("cis490"))
        .args([
            "trace",
            "--qemu-pid",
            pid,
            "--duration",
            &duration.to_string(),
            "--rate-hz",
            "10",
            "--pcap",
            "-q",
        ])
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running cis490 trace")?;
    let start = Instant::now();
    let mut dir = None;
    while dir.is_none() && start.elapsed().as_secs_f64() < duration {
        dir = list_dirs(&episodes)
            .into_iter()
            .find(|d| !before.contains(d) && d.join("control.sock").exists());
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(d) = &dir {
        for (at, phase) in [
            (duration / 3.0, "armed"),
            (duration * 2.0 / 3.0, "infecting"),
        ] {
            let wait = at - start.elapsed().as_secs_f64();
            if wait > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
            let _ = Command::new(target_bin("cis490"))
                .arg("mark")
                .arg(d)
                .args(["--phase", phase, "--reason", "demo"])
                .stdout(Stdio::null())
                .status();
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("cis490 trace failed: {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(
        stdout
            .lines()
            .last()
            .context("no episode path printed")?
            .trim(),
    ))
}

fn list_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn summary(dir: &Path) -> anyhow::Result<()> {
    let meta: Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)?;
    let r = &meta["result"];
    println!("episode   {}", meta["episode_id"].as_str().unwrap_or("?"));
    println!(
        "backend   {} (requested {}){}",
        meta["backend"]["used"].as_str().unwrap_or("?"),
        meta["backend"]["requested"].as_str().unwrap_or("?"),
        meta["backend"]["fallback_reason"]
            .as_str()
            .map(|r| format!(", fallback: {r}"))
            .unwrap_or_default()
    );
    println!(
        "ended     {} after {:.2} s; ticks {} scheduled, {} missed; phases {}",
        r["end_reason"].as_str().unwrap_or("?"),
        r["duration_observed_s"].as_f64().unwrap_or(0.0),
        r["ticks_scheduled"],
        r["ticks_missed"],
        r["phases_observed"]
    );
    for s in meta["sources"].as_array().into_iter().flatten() {
        println!(
            "source    {:<10} {:>7} rows  {}",
            s["name"].as_str().unwrap_or("?"),
            s["rows"],
            s["file"].as_str().unwrap_or("?")
        );
    }
    network(dir, &meta);
    // Per-thread on-CPU time over the capture, from whichever host stream exists.
    for file in ["telemetry-bpf-sched.jsonl", "telemetry-proc.jsonl"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let mut first_last: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for line in text.lines() {
            let Ok(row) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let Some(ns) = row["on_cpu_ns"].as_u64() else {
                continue;
            };
            let who = match row["tid"].as_u64() {
                Some(tid) => format!("{tid:>7} {}", row["comm"].as_str().unwrap_or("")),
                None => "  total (process)".into(),
            };
            first_last
                .entry(who)
                .and_modify(|e| e.1 = ns)
                .or_insert((ns, ns));
        }
        println!("on-CPU time during the capture ({file}):");
        for (who, (a, b)) in first_last {
            println!("  {who:<28} {:>10.1} ms", (b - a) as f64 / 1e6);
        }
        break;
    }
    Ok(())
}

fn last_line(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}

/// The network as the gateway saw it: packets, flows, DNS names, the packet capture.
fn network(dir: &Path, meta: &Value) {
    let Some(flow) = last_line(&dir.join("telemetry-flow.jsonl")) else {
        println!("network   no flow rows (no tap, or no BPF: see meta.json sources)");
        return;
    };
    println!(
        "network   {}: {} packets in, {} out; {} flows; {} DNS queries, {} responses",
        flow["ifname"].as_str().unwrap_or("?"),
        flow["rx_packets"],
        flow["tx_packets"],
        flow["flows_new"],
        flow["dns_queries"],
        flow["dns_responses"]
    );
    let names: std::collections::BTreeSet<String> =
        std::fs::read_to_string(dir.join("telemetry-dns.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|r| r["qname"].as_str().map(str::to_owned))
            .collect();
    if !names.is_empty() {
        let some: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
        println!("dns       {} names, e.g. {}", names.len(), some.join(", "));
    }
    let pcap = &meta["result"]["pcap"];
    if pcap.is_object() {
        println!(
            "pcap      {} ({} packets, {} bytes, {} dropped)",
            pcap["status"].as_str().unwrap_or("?"),
            pcap["packets_written"],
            pcap["bytes_written"],
            pcap["packets_dropped_kernel"]
        );
    }
}
