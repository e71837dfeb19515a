//! `cargo xtask bench` section 13: what the `kvm` source costs per VM exit, under an
//! exit-heavy KVM guest: the probe firmware of tests/qemu/kvm_exits.rs (port I/O, CPUID,
//! RDMSR and WRMSR in tight loops, then isa-debug-exit) assembled with large counts.
//!
//! Three modes, alternating, `rounds` each: the guest untraced (the baseline), traced
//! with `--no-kvm`, and traced with the kvm programs and `--bpf-stats` (the kernel's own
//! run count and run time of every program). The guest's run time is from QMP `cont` to
//! QEMU's exit.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::bench::stats;

use crate::util::root;

const COUNTS: [(&str, u32); 6] = [
    ("OUTS", 50_000),
    ("INS", 50_000),
    ("CPUIDS", 50_000),
    ("RDMSRS", 50_000),
    ("WRMSRS", 25_000),
    ("SPREAD", 0),
];

/// The probe firmware with [`COUNTS`], in `dir`.
fn firmware(dir: &Path) -> anyhow::Result<PathBuf> {
    let obj = dir.join("kvm-probe.o");
    let bin = dir.join("kvm-probe.bin");
    let mut a = Command::new("as");
    a.arg("--32");
    for (sym, n) in COUNTS {
        a.arg("--defsym").arg(format!("{sym}={n}"));
    }
    let st = a
        .arg("-o")
        .arg(&obj)
        .arg(root().join("tests/qemu/guest/kvm-probe.S"))
        .status()
        .context("running as (binutils)")?;
    anyhow::ensure!(st.success(), "as failed: {st}");
    let st = Command::new("ld")
        .args(["-m", "elf_i386", "-Ttext", "0", "--oformat", "binary", "-o"])
        .arg(&bin)
        .arg(&obj)
        .status()
        .context("running ld")?;
    anyhow::ensure!(st.success(), "ld failed: {st}");
    Ok(bin)
}

/// A paused QEMU running the probe under KVM (a child of this process).
struct Guest {
    child: Child,
    qmp: PathBuf,
}

impl Guest {
    fn start(dir: &Path, image: &Path) -> anyhow::Result<Guest> {
        let qmp = dir.join("control.sock");
        let _ = std::fs::remove_file(&qmp);
        let child = Command::new("qemu-system-x86_64")
            .args(["-name", "cis490-kvm-bench,debug-threads=on"])
            .args(["-machine", "pc", "-accel", "kvm", "-smp", "1", "-m", "16"])
            .args(["-nodefaults", "-display", "none", "-S", "-bios"])
            .arg(image)
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let t = Instant::now();
        while !qmp.exists() {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(10),
                "QEMU made no QMP socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Guest { child, qmp })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `cont`, then the seconds until QEMU exits.
    fn run(mut self) -> anyhow::Result<f64> {
        let s = UnixStream::connect(&self.qmp)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut w = s;
        let mut line = String::new();
        r.read_line(&mut line)?;
        let t = Instant::now();
        for c in ["qmp_capabilities", "cont"] {
            writeln!(w, "{{\"execute\":\"{c}\"}}")?;
            loop {
                line.clear();
                r.read_line(&mut line)?;
                if line.contains("\"return\"") {
                    break;
                }
                if line.contains("\"error\"") {
                    bail!("QMP {c}: {line}");
                }
            }
        }
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(t.elapsed().as_secs_f64());
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                bail!("the guest did not end within 120 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One traced run: the guest's run time and the episode's meta.json.
fn traced(
    cis490: &Path,
    dir: &Path,
    image: &Path,
    extra: &[&str],
) -> anyhow::Result<(f64, Value, Value)> {
    let guest = Guest::start(dir, image)?;
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let trace = Command::new(cis490)
        .args(["trace", "--qemu-pid", &guest.pid().to_string()])
        .args([
            "--duration",
            "120",
            "--rate-hz",
            "10",
            "--no-qmp",
            "--no-perf",
        ])
        .args(extra)
        .arg("--data-root")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting cis490 trace")?;
    // Running once the kernel's snapshots arrive (bpf-sched's first rows).
    let t = Instant::now();
    loop {
        let started = std::fs::read_dir(data.join("episodes"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::metadata(e.path().join("telemetry-bpf-sched.jsonl"))
                    .is_ok_and(|m| m.len() > 0)
            });
        if started {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the capture did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = guest.run()?;
    let out = trace.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "cis490 trace failed: {}", out.status);
    let ep = crate::util::episode_path(&out.stdout);
    let meta: Value = serde_json::from_slice(&std::fs::read(ep.join("meta.json"))?)?;
    let last_kvm = std::fs::read_to_string(ep.join("telemetry-kvm.jsonl"))
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| l.contains("\"tid\":null"))
                .and_then(|l| serde_json::from_str(l).ok())
        })
        .unwrap_or(Value::Null);
    Ok((secs, meta, last_kvm))
}

pub fn section(cis490: &Path, rounds: usize, scratch: &Path) -> anyhow::Result<String> {
    anyhow::ensure!(Path::new("/dev/kvm").exists(), "no /dev/kvm");
    let dir = scratch.join("kvm-bench");
    std::fs::create_dir_all(&dir)?;
    let image = firmware(&dir)?;
    let mut untraced = Vec::new();
    let mut no_kvm = Vec::new();
    let mut with_kvm = Vec::new();
    // (program → (run_cnt, run_time_ns)) summed over rounds, and the last kvm totals.
    let mut progs: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let mut totals = Value::Null;
    for _ in 0..rounds {
        untraced.push(Guest::start(&dir, &image)?.run()?);
        no_kvm.push(traced(cis490, &dir, &image, &["--no-kvm"])?.0);
        let (secs, meta, last) = traced(cis490, &dir, &image, &["--bpf-stats"])?;
        with_kvm.push(secs);
        let kvm = meta["sources"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "kvm"))
            .cloned()
            .unwrap_or(Value::Null);
        anyhow::ensure!(
            kvm["status"] == "attached",
            "kvm source not attached: {kvm}"
        );
        if let Some(p) = meta["result"]["bpf_programs"].as_object() {
            for (name, v) in p.iter().filter(|(n, _)| n.starts_with("cis490_kvm_")) {
                let e = progs.entry(name.clone()).or_default();
                e.0 += v["run_cnt"].as_u64().unwrap_or(0);
                e.1 += v["run_time_ns"].as_u64().unwrap_or(0);
            }
        }
        totals = last;
    }
    let base = stats(&untraced).0;
    let nk = stats(&no_kvm).0;
    let wk = stats(&with_kvm).0;
    let mut md = String::new();
    writeln!(
        md,
        "Guest: the probe firmware of tests/qemu/kvm_exits.rs under `-accel kvm` (this host: the nested `kvm_pvm` backend, which emulates the guest's real-mode code instruction by instruction, so every instruction is a `kvm_emulate_insn` event), assembled with {}; run time from QMP `cont` to QEMU's exit, median of {rounds} alternating rounds. Captures: `cis490 trace --rate-hz 10 --no-qmp --no-perf` (BPF backend).\n",
        COUNTS
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(md, "| mode | guest run time | vs untraced |")?;
    writeln!(md, "|---|---|---|")?;
    writeln!(md, "| untraced (baseline) | {:.3} s | 1 |", base)?;
    writeln!(
        md,
        "| traced, `--no-kvm` | {:.3} s | {:.3}x |",
        nk,
        nk / base
    )?;
    writeln!(
        md,
        "| traced, kvm programs on | {:.3} s | {:.3}x |",
        wk,
        wk / base
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "In-kernel cost of the kvm programs (`--bpf-stats`: the kernel's run count and run time, summed over the {rounds} traced rounds; a run is one tracepoint hit on the host, the filter to the target included):\n"
    )?;
    writeln!(md, "| program | runs | ns per run |")?;
    writeln!(md, "|---|---|---|")?;
    let (mut all_runs, mut all_ns) = (0u64, 0u64);
    for (name, (runs, ns)) in &progs {
        all_runs += runs;
        all_ns += ns;
        let per = if *runs > 0 {
            format!("{:.0}", *ns as f64 / *runs as f64)
        } else {
            "-".into()
        };
        writeln!(md, "| {name} | {runs} | {per} |")?;
    }
    writeln!(
        md,
        "| all kvm programs | {all_runs} | {:.0} |\n",
        all_ns as f64 / all_runs.max(1) as f64
    )?;
    if !totals.is_null() {
        writeln!(
            md,
            "Counts of the last traced round (kvm process row): pio_writes {}, pio_reads {}, cpuid_exits {}, msr_reads {}, msr_writes {}, userspace_exits {}, emulated_insns {}.\n",
            totals["pio_writes"], totals["pio_reads"], totals["cpuid_exits"], totals["msr_reads"],
            totals["msr_writes"], totals["userspace_exits"], totals["emulated_insns"]
        )?;
    }
    Ok(md)
}
