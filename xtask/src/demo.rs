//! `cargo xtask demo`: the main job on a built-in target. Starts the bundled
//! multi-threaded workload, traces it, prints the episode path and a one-screen summary.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::util::{self, root};

fn target_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    target.join("debug").join(name)
}

pub fn run(duration: f64) -> anyhow::Result<()> {
    util::cargo(&["build", "--locked", "--workspace", "--bins"])?;
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
    let out = Command::new(target_bin("cis490"))
        .args([
            "trace",
            "--qemu-pid",
            &load.id().to_string(),
            "--duration",
            &duration.to_string(),
            "--rate-hz",
            "10",
        ])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cis490 trace")?;
    let _ = load.kill();
    let _ = load.wait();
    if !out.status.success() {
        bail!("cis490 trace failed: {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(
        stdout
            .lines()
            .last()
            .context("no episode path printed")?
            .trim(),
    );
    summary(&dir)?;
    println!("{}", dir.display());
    Ok(())
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
