//! `cargo xtask fuzz`: build the fuzz crate (fuzz/, cargo-fuzz on nightly), write each
//! target's seed corpus from real inputs, and fuzz every target for a bounded time.
//!
//! Seeds are generated here, not committed: the QMP replies, /proc files and agent lines
//! of tests/data/qemu-10.0.2, this kernel's own tracefs format files and slices of its
//! /sys/kernel/btf/vmlinux, and a real episode captured by the debug binary. Corpora live
//! in fuzz/corpus/<target> (git-ignored) and grow across runs; a crash leaves its input in
//! fuzz/artifacts/<target> and fails the command.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::util;

/// Every fuzz target, in the order they run.
pub const TARGETS: [&str; 7] = [
    "agent_line",
    "qmp_message",
    "procfs",
    "tracefs_format",
    "btf",
    "episode",
    "dns_message",
];

/// DNS messages for the `dns_message` seeds: queries of several types and names, and
/// responses with compression, A, AAAA and CNAME answers (built here: no capture of real
/// DNS traffic is in the fixtures).
fn dns_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, (name, t)) in [
        ("example.test", 1u16),
        ("c2.evil.test", 28),
        ("x.y.z.test", 16),
    ]
    .into_iter()
    .enumerate()
    {
        let q = crate::util::dns_query(i as u16, name, t);
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 3;
        r.extend_from_slice(&[
            0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 60, 0, 6, 3, b'c', b'd', b'n', 0xc0, 0x0c,
        ]);
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 77, 0, 99]);
        r.extend_from_slice(&[0xc0, 0x0c, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
        r.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        out.push((format!("query-{i}"), q));
        out.push((format!("response-{i}"), r));
    }
    out
}

/// The separator the `episode` target splits its input on, and the files in order
/// (fuzz/fuzz_targets/episode.rs has the same two).
const EPISODE_SEP: &[u8] = b"\n--8<--\n";
const EPISODE_FILES: [&str; 8] = [
    "meta.json",
    "events.jsonl",
    "labels.jsonl",
    "telemetry-proc.jsonl",
    "telemetry-qmp.jsonl.zst",
    "telemetry-agent.jsonl",
    "manifest.json",
    "done.marker",
];

fn fuzz_dir() -> PathBuf {
    util::root().join("fuzz")
}

fn fixtures() -> PathBuf {
    util::root().join("tests/data/qemu-10.0.2")
}

/// `cargo +nightly fuzz ...` with cargo-fuzz from target/tools/bin and the environment
/// of the outer `cargo xtask` removed (its toolchain and flags must not apply).
fn cargo_fuzz() -> Command {
    let mut c = crate::setup::clean("cargo");
    let tools = util::root().join("target/tools/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(tools);
    c.env("PATH", std::env::join_paths(dirs).expect("PATH joins"));
    c.args(["+nightly", "fuzz"]);
    c.current_dir(fuzz_dir());
    c
}

/// What one target's run found.
pub struct Outcome {
    pub target: String,
    pub seconds: f64,
    pub execs: u64,
    pub corpus_files: usize,
}

/// How the fuzz crate is built.
#[derive(Clone, Copy)]
pub enum Build {
    /// Optimized: `cargo xtask fuzz` (many executions per second for long runs).
    Release,
    /// Unoptimized: `cargo xtask test`'s corpus replay and short run, where the build
    /// (2.7 min against 5.9 min optimized, measured) is most of the cost.
    Dev,
}

/// Build, seed and fuzz `targets` for `seconds` each; fails on the first crash.
pub fn run(seconds: u64, only: Option<&str>, build: Build) -> anyhow::Result<Vec<Outcome>> {
    let profile = match build {
        Build::Release => "-O",
        Build::Dev => "-D",
    };
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; the targets are {TARGETS:?}"),
        None => TARGETS.to_vec(),
    };
    let started = Instant::now();
    // The episode seed is captured by the real binary.
    util::cargo(&["build", "--locked", "-p", "cis490", "--bin", "cis490"])?;
    eprintln!("fuzz: building the fuzz crate (nightly, cargo-fuzz)");
    // cargo-fuzz's default AddressSanitizer: the parsers are safe Rust, but they sit on
    // C (zstd) and unsafe fd code, and one build serves both `build` and `run`.
    util::run(cargo_fuzz().args(["build", profile, "--debug-assertions"]))
        .map_err(|e| e.context("building the fuzz crate"))?;
    eprintln!("fuzz: built in {:.0?}", started.elapsed());
    let mut outcomes = Vec::new();
    for t in targets {
        let corpus = fuzz_dir().join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let seeds = write_seeds(t, &corpus)?;
        let artifacts = fuzz_dir().join("artifacts").join(t);
        std::fs::create_dir_all(&artifacts)?;
        eprintln!("fuzz: {t}: {seeds} seeds, fuzzing {seconds} s");
        let t0 = Instant::now();
        let out = cargo_fuzz()
            .args(["run", profile, "--debug-assertions", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A hang (an input that takes >10 s) is a finding too.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .output()
            .with_context(|| format!("running fuzz target {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {t} found a crash (input in {}):\n{}",
                artifacts.display(),
                tail.join("\n")
            );
        }
        let execs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let corpus_files = std::fs::read_dir(&corpus)?.count();
        eprintln!(
            "fuzz: {t}: {execs} execs in {:.0?}, no finding; corpus {corpus_files} files",
            t0.elapsed()
        );
        outcomes.push(Outcome {
            target: t.to_owned(),
            seconds: t0.elapsed().as_secs_f64(),
            execs,
            corpus_files,
        });
    }
    println!(
        "{:<16} {:>9} {:>12} {:>8}",
        "target", "seconds", "execs", "corpus"
    );
    for o in &outcomes {
        println!(
            "{:<16} {:>9.0} {:>12} {:>8}",
            o.target, o.seconds, o.execs, o.corpus_files
        );
    }
    eprintln!("fuzz: all done in {:.0?}", started.elapsed());
    Ok(outcomes)
}

/// Write a seed file named after its content's origin (idempotent across runs).
fn seed(corpus: &Path, name: &str, data: &[u8]) -> anyhow::Result<()> {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    std::fs::write(corpus.join(format!("seed-{name}")), data)
        .with_context(|| format!("writing seed {name}"))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(fixtures())
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

/// The seeds of one target; returns how many were written.
fn write_seeds(target: &str, corpus: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut put = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        n += 1;
        seed(corpus, name, data)
    };
    match target {
        "agent_line" => {
            let p = fixtures().join("tcg/guest-agent.sample.jsonl");
            let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            for (i, line) in text.split(|&b| b == b'\n').enumerate() {
                if !line.is_empty() {
                    put(&format!("agent-{i}"), line)?;
                }
            }
        }
        "qmp_message" => {
            for p in files_under(&fixtures()) {
                let name = rel(&p);
                if name.contains("/proc") || name.ends_with(".request.json") {
                    continue;
                }
                let data = std::fs::read(&p)?;
                if name.ends_with(".json") {
                    // One reply per file, as QEMU sends it: one line.
                    let v: serde_json::Value = match serde_json::from_slice(&data) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    put(&name, serde_json::to_string(&v)?.as_bytes())?;
                } else if name.ends_with(".jsonl") && name.contains("events") {
                    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
                        if !line.is_empty() {
                            put(&format!("{name}-{i}"), line)?;
                        }
                    }
                }
            }
        }
        "procfs" => {
            for p in files_under(&fixtures()) {
                let name = rel(&p);
                if name.contains("/proc/") || name.contains("proc-io") {
                    put(&name, &std::fs::read(&p)?)?;
                }
            }
        }
        "tracefs_format" => {
            let events = Path::new("/sys/kernel/tracing/events");
            let mut found = 0;
            for cat in [
                "sched",
                "raw_syscalls",
                "block",
                "net",
                "sock",
                "tcp",
                "syscalls",
            ] {
                let Ok(entries) = std::fs::read_dir(events.join(cat)) else {
                    continue;
                };
                let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                dirs.sort();
                // syscalls has ~700 events of two shapes: a few are enough.
                let take = if cat == "syscalls" { 8 } else { dirs.len() };
                for d in dirs.into_iter().take(take) {
                    if let Ok(data) = std::fs::read(d.join("format")) {
                        let name = format!("{cat}-{}", d.file_name().unwrap().to_string_lossy());
                        put(&name, &data)?;
                        found += 1;
                    }
                }
            }
            if found == 0 {
                bail!("no tracefs format files under {} (run `cargo xtask setup` as root to mount tracefs)", events.display());
            }
        }
        "btf" => {
            let p = Path::new("/sys/kernel/btf/vmlinux");
            let btf = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            for (types, strings) in [(256, 1024), (4096, 16384), (65536, 65536), (262144, 262144)] {
                put(
                    &format!("vmlinux-{types}-{strings}"),
                    &btf_slice(&btf, types, strings)?,
                )?;
            }
        }
        "dns_message" => {
            for (name, data) in dns_seeds() {
                put(&name, &data)?;
            }
        }
        "episode" => {
            let parts = real_episode_parts()?;
            put("episode-real", &parts.join(EPISODE_SEP))?;
            // The same episode without done.marker (incomplete) and with each file alone.
            let mut incomplete = parts.clone();
            incomplete[7].clear();
            put("episode-incomplete", &incomplete.join(EPISODE_SEP))?;
            for (i, part) in parts.iter().enumerate() {
                let mut only = vec![Vec::new(); EPISODE_FILES.len()];
                only[i] = part.clone();
                put(
                    &format!("episode-only-{}", EPISODE_FILES[i]),
                    &only.join(EPISODE_SEP),
                )?;
            }
        }
        other => bail!("no seeds for {other}"),
    }
    Ok(n)
}

/// A small BTF blob from the kernel's: its header with the first `types` bytes of the
/// type section and the first `strings` bytes of the string section.
fn btf_slice(btf: &[u8], types: usize, strings: usize) -> anyhow::Result<Vec<u8>> {
    let u32_at = |i: usize| -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(
            btf.get(i..i + 4)
                .context("BTF shorter than its header")?
                .try_into()?,
        ))
    };
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let types = types.min(type_len);
    let strings = strings.min(str_len);
    let t = &btf[hdr_len + type_off..hdr_len + type_off + types];
    let s = &btf[hdr_len + str_off..hdr_len + str_off + strings];
    let mut out = btf[..24].to_vec();
    out[4..8].copy_from_slice(&24u32.to_le_bytes());
    out[8..12].copy_from_slice(&0u32.to_le_bytes());
    out[12..16].copy_from_slice(&(types as u32).to_le_bytes());
    out[16..20].copy_from_slice(&(types as u32).to_le_bytes());
    out[20..24].copy_from_slice(&(strings as u32).to_le_bytes());
    out.extend_from_slice(t);
    out.extend_from_slice(s);
    Ok(out)
}

/// The files of a real episode (1 s at 20 Hz of `sleep`, /proc backend), in
/// [`EPISODE_FILES`] order; telemetry-qmp.jsonl.zst is the proc stream compressed by the
/// `zstd` tool when it is installed (empty otherwise).
fn real_episode_parts() -> anyhow::Result<Vec<Vec<u8>>> {
    let tmp = std::env::temp_dir().join(format!("cis490-fuzz-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut sleeper = Command::new("sleep").arg("30").spawn()?;
    let out = Command::new(util::root().join("target/debug/cis490"))
        .args(["trace", "--qemu-pid", &sleeper.id().to_string()])
        .args([
            "--duration",
            "1",
            "--rate-hz",
            "20",
            "--backend",
            "proc",
            "--quiet",
        ])
        .arg("--data-root")
        .arg(&tmp)
        .output()?;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    if !out.status.success() {
        bail!(
            "capturing the episode seed failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .context("cis490 trace printed no episode path")?
            .trim(),
    );
    let mut parts = Vec::new();
    for name in EPISODE_FILES {
        parts.push(std::fs::read(dir.join(name)).unwrap_or_default());
    }
    if let Ok(z) = Command::new("zstd")
        .args(["-q", "-c"])
        .arg(dir.join("telemetry-proc.jsonl"))
        .output()
    {
        if z.status.success() {
            parts[4] = z.stdout;
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(parts)
}
