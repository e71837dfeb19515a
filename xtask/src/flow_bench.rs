//! `cargo xtask bench` section 14: what the `flow` programs cost per packet, under a UDP
//! flood over a veth pair into a network namespace this benchmark creates (nothing leaves
//! the machine).
//!
//! Three modes, alternating, `rounds` each: the flood untraced (the baseline), traced with
//! `--no-flow`, and traced with the flow programs and `--bpf-stats` (the kernel's own run
//! count and run time of every program). The flood is one thread sending 64-byte UDP
//! datagrams as fast as it can for a fixed time; its rate is the throughput measure.

use std::fmt::Write as _;
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::bench::stats;

const FLOOD_SECS: f64 = 4.0;

struct Pair {
    ns: String,
    host_if: String,
    peer_ip: String,
    host_ip: String,
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .with_context(|| format!("running {args:?}"))?;
    anyhow::ensure!(st.success(), "{args:?} failed: {st}");
    Ok(())
}

impl Pair {
    fn create() -> anyhow::Result<Pair> {
        let id = std::process::id() % 100000;
        let p = Pair {
            ns: format!("cis490b{id}"),
            host_if: format!("c490b{id}"),
            host_ip: "10.247.0.1".into(),
            peer_ip: "10.247.0.2".into(),
        };
        let peer_if = format!("c490c{id}");
        let _ = Command::new("ip")
            .args(["netns", "del", &p.ns])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &p.ns])?;
        sh(&[
            "ip", "link", "add", &p.host_if, "type", "veth", "peer", "name", &peer_if,
        ])?;
        sh(&["ip", "link", "set", &peer_if, "netns", &p.ns])?;
        sh(&["ip", "addr", "add", "10.247.0.1/30", "dev", &p.host_if])?;
        sh(&["ip", "link", "set", &p.host_if, "up"])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &p.ns,
            "ip",
            "addr",
            "add",
            "10.247.0.2/30",
            "dev",
            &peer_if,
        ])?;
        sh(&[
            "ip", "netns", "exec", &p.ns, "ip", "link", "set", &peer_if, "up",
        ])?;
        // Let neighbour discovery settle before the first flood.
        let _ = Command::new("ping")
            .args(["-c", "1", "-W", "1", &p.peer_ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        Ok(p)
    }

    /// Datagrams sent per second by one thread for FLOOD_SECS.
    fn flood(&self) -> anyhow::Result<f64> {
        let s = UdpSocket::bind((self.host_ip.as_str(), 0))?;
        s.connect((self.peer_ip.as_str(), 9))?;
        let buf = [0u8; 64];
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < FLOOD_SECS {
            for _ in 0..256 {
                // ENOBUFS or ECONNREFUSED (the peer's ICMP) are part of a flood: go on.
                let _ = s.send(&buf);
                n += 1;
            }
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// One traced flood: its rate and the episode's meta.json.
fn traced(
    cis490: &Path,
    pair: &Pair,
    scratch: &Path,
    extra: &[&str],
) -> anyhow::Result<(f64, Value)> {
    let (target, trace) = start_capture(cis490, pair, scratch, extra)?;
    let rate = pair.flood()?;
    let meta = finish_capture(target, trace)?;
    Ok((rate, meta))
}

/// A capture of the pair's host end, running (its first rows written).
fn start_capture(
    cis490: &Path,
    pair: &Pair,
    scratch: &Path,
    extra: &[&str],
) -> anyhow::Result<(std::process::Child, std::process::Child)> {
    let target = Command::new("sleep").arg("60").spawn()?;
    let data = scratch.join("flow-bench-data");
    let _ = std::fs::remove_dir_all(&data);
    let secs = FLOOD_SECS + 3.0;
    let trace = Command::new(cis490)
        .args([
            "trace",
            "--qemu-pid",
            &target.id().to_string(),
            "--backend",
            "bpf",
        ])
        .args([
            "--net-if",
            &pair.host_if,
            "--no-qmp",
            "--no-perf",
            "--no-kvm",
        ])
        .args(["--duration", &secs.to_string()])
        .args(extra)
        .arg("--data-root")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let t = Instant::now();
    while !std::fs::read_dir(data.join("episodes"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::metadata(e.path().join("telemetry-bpf-sched.jsonl")).is_ok_and(|m| m.len() > 0)
        })
    {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the capture did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((target, trace))
}

/// Wait for the capture's end; its meta.json.
fn finish_capture(
    target: std::process::Child,
    trace: std::process::Child,
) -> anyhow::Result<Value> {
    let out = trace.wait_with_output()?;
    let mut target = target;
    let _ = target.kill();
    let _ = target.wait();
    anyhow::ensure!(out.status.success(), "cis490 trace failed: {}", out.status);
    let ep = crate::util::episode_path(&out.stdout);
    let meta: Value = serde_json::from_slice(&std::fs::read(ep.join("meta.json"))?)?;
    Ok(meta)
}

/// Test runs (BPF_PROG_TEST_RUN) of the attached egress program and of an empty tc
/// program, alternating: medians of ns per run for each.
fn test_runs(cis490: &Path, pair: &Pair, scratch: &Path) -> anyhow::Result<(f64, f64)> {
    use crate::bpf_test_run as tr;
    let (target, trace) = start_capture(cis490, pair, scratch, &[])?;
    let result = (|| -> anyhow::Result<(f64, f64)> {
        let flow = tr::find_program("cis490_flow_egress")?;
        let empty = tr::empty_tc_program()?;
        let name = std::ffi::CString::new(pair.host_if.as_str())?;
        extern "C" {
            fn if_nametoindex(name: *const std::ffi::c_char) -> u32;
        }
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(ifindex > 0, "no interface {}", pair.host_if);
        let frame = udp_frame();
        let (mut f, mut e) = (Vec::new(), Vec::new());
        for _ in 0..TEST_RUN_ROUNDS {
            f.push(f64::from(tr::ns_per_run(
                &flow, &frame, ifindex, TEST_RUNS,
            )?));
            e.push(f64::from(tr::ns_per_run(
                &empty, &frame, ifindex, TEST_RUNS,
            )?));
        }
        Ok((stats(&f).0, stats(&e).0))
    })();
    finish_capture(target, trace)?;
    result
}

const TEST_RUNS: u32 = 1_000_000;
const TEST_RUN_ROUNDS: usize = 5;

/// The flood's datagram as a frame: Ethernet, IPv4 10.247.0.1 → 10.247.0.2, UDP to port
/// 9, 64 bytes of payload (106 bytes).
fn udp_frame() -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 92, 0, 1, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&[10, 247, 0, 1, 10, 247, 0, 2]);
    f.extend_from_slice(&[0x9c, 0x40, 0, 9, 0, 72, 0, 0]);
    f.extend_from_slice(&[0u8; 64]);
    f
}

pub fn section(cis490: &Path, rounds: usize, scratch: &Path) -> anyhow::Result<String> {
    let pair = Pair::create()?;
    let (mut base, mut off, mut on) = (Vec::new(), Vec::new(), Vec::new());
    let mut progs: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for _ in 0..rounds {
        base.push(pair.flood()?);
        off.push(traced(cis490, &pair, scratch, &["--no-flow"])?.0);
        let (rate, meta) = traced(cis490, &pair, scratch, &["--bpf-stats"])?;
        on.push(rate);
        let flow = meta["sources"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "flow"))
            .cloned()
            .unwrap_or(Value::Null);
        anyhow::ensure!(
            flow["status"] == "attached",
            "flow source not attached: {flow}"
        );
        if let Some(p) = meta["result"]["bpf_programs"].as_object() {
            for (name, v) in p.iter().filter(|(n, _)| n.starts_with("cis490_flow_")) {
                let e = progs.entry(name.clone()).or_default();
                e.0 += v["run_cnt"].as_u64().unwrap_or(0);
                e.1 += v["run_time_ns"].as_u64().unwrap_or(0);
            }
        }
    }
    let (run_flow, run_empty) = test_runs(cis490, &pair, scratch)?;
    let (b, o, f) = (stats(&base).0, stats(&off).0, stats(&on).0);
    let mut md = String::new();
    writeln!(
        md,
        "Flood: one thread sending 64-byte UDP datagrams for {FLOOD_SECS:.0} s over a veth pair into a namespace of the benchmark's own; median of {rounds} alternating rounds. Captures: `cis490 trace --backend bpf --net-if <veth> --no-qmp --no-perf --no-kvm`.\n"
    )?;
    writeln!(md, "| mode | datagrams/s sent | vs untraced |")?;
    writeln!(md, "|---|---|---|")?;
    writeln!(md, "| untraced (baseline) | {b:.0} | 1 |")?;
    writeln!(md, "| traced, `--no-flow` | {o:.0} | {:.3}x |", o / b)?;
    writeln!(md, "| traced, flow programs on | {f:.0} | {:.3}x |", f / b)?;
    writeln!(md)?;
    writeln!(md, "In-kernel cost (`--bpf-stats`, summed over the traced rounds; one run per packet and direction on the watched interface):\n")?;
    writeln!(md, "| program | runs | ns per run |")?;
    writeln!(md, "|---|---|---|")?;
    for (name, (runs, ns)) in &progs {
        writeln!(
            md,
            "| {name} | {runs} | {:.0} |",
            *ns as f64 / (*runs).max(1) as f64
        )?;
    }
    writeln!(md)?;
    writeln!(md, "The same egress program timed by the kernel itself (BPF_PROG_TEST_RUN: {TEST_RUNS} runs on the flood's 106-byte UDP frame as if sent on the veth, under a running capture; median of {TEST_RUN_ROUNDS} rounds alternating with an empty tc program, the baseline). No clock is read around each run, as `--bpf-stats` does:\n")?;
    writeln!(md, "| program | ns per run | vs empty |")?;
    writeln!(md, "|---|---|---|")?;
    writeln!(
        md,
        "| empty tc program (`r0 = TC_ACT_UNSPEC; exit`, baseline) | {run_empty:.0} | 1 |"
    )?;
    writeln!(
        md,
        "| cis490_flow_egress | {run_flow:.0} | {:.1}x |",
        run_flow / run_empty.max(1.0)
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "The flow program's own cost per packet: {:.0} ns (its test run less the empty program's).\n",
        run_flow - run_empty
    )?;
    Ok(md)
}
