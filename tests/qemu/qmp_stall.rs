//! A QMP server that answers with real QEMU 10.0.2 replies, then stalls in the middle of
//! a reply, then disappears, then comes back. The capture must go on (host ticks kept),
//! mark `qmp` stale, and reconnect and resume rows when the server is back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cis490_tests::qemu_harness::*;
use serde_json::Value;

/// The captured reply for a command, with the request's id put in.
fn reply(cmd: &str, id: &Value) -> String {
    let file = match cmd {
        "qmp_capabilities" => "tcg/qmp_capabilities.json",
        "query-version" => "tcg/query-version.json",
        "query-cpus-fast" => "tcg/query-cpus-fast.json",
        "query-name" => "tcg/query-name.json",
        "query-memory-size-summary" => "tcg/query-memory-size-summary.json",
        // The KVM schema, so the collector also polls query-stats vm and vcpu.
        "query-stats-schemas" => "kvm/query-stats-schemas.json",
        "query-status" => "tcg/query-status.json",
        "query-blockstats" => "tcg/query-blockstats.json",
        "query-stats" => "",
        _ => "tcg/error.unknown-command.json",
    };
    let mut v: Value = if cmd == "query-stats" {
        serde_json::json!({"return": []})
    } else {
        serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap()
    };
    v["id"] = id.clone();
    format!("{v}\n")
}

fn stats_reply(target: &str, id: &Value) -> String {
    let file = if target == "vm" {
        "kvm/query-stats.vm.json"
    } else {
        "kvm/query-stats.vcpu.json"
    };
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
    v["id"] = id.clone();
    format!("{v}\n")
}

/// Serve one connection. Returns when the client leaves or `stall_after` status polls
/// were answered (then: half a reply, and a hang of `stall_for`).
fn serve(s: UnixStream, polls: &AtomicU64, stall_after: Option<u64>, stall_for: Duration) {
    let mut w = s.try_clone().unwrap();
    let greeting = std::fs::read_to_string(fixture("tcg/greeting.json")).unwrap();
    if w.write_all(format!("{}\n", greeting.trim()).as_bytes())
        .is_err()
    {
        return;
    }
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        let req: Value = serde_json::from_str(&line).unwrap();
        let cmd = req["execute"].as_str().unwrap_or_default();
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let out = if cmd == "query-stats" {
            stats_reply(req["arguments"]["target"].as_str().unwrap_or_default(), &id)
        } else {
            reply(cmd, &id)
        };
        if cmd == "query-status" {
            let n = polls.fetch_add(1, Ordering::SeqCst) + 1;
            if stall_after.is_some_and(|k| n >= k) {
                let half = &out.as_bytes()[..out.len() / 2];
                let _ = w.write_all(half);
                std::thread::sleep(stall_for);
                return;
            }
            if n == 3 {
                // An asynchronous event between replies.
                let _ = w.write_all(b"{\"timestamp\": {\"seconds\": 1795314803, \"microseconds\": 662494}, \"event\": \"STOP\"}\n");
            }
        }
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

fn t_of(rows: &[Value]) -> Vec<u64> {
    rows.iter()
        .map(|r| r["t_mono_ns"].as_u64().unwrap())
        .collect()
}

#[test]
fn stalled_then_closed_then_returning_qmp_server() {
    let tmp = tempfile::tempdir().unwrap();
    let sock: PathBuf = tmp.path().join("qmp.sock");
    let target = Sleeper::spawn();
    let polls = Arc::new(AtomicU64::new(0));
    let p = polls.clone();
    let sock2 = sock.clone();
    let server = std::thread::spawn(move || {
        let listener = UnixListener::bind(&sock2).unwrap();
        // Phase 1: normal service for ~20 polls, then a stall mid-reply for 4 s.
        let (s, _) = listener.accept().unwrap();
        serve(s, &p, Some(20), Duration::from_secs(4));
        // Phase 2: gone (no socket at all) for 2 s.
        drop(listener);
        std::fs::remove_file(&sock2).unwrap();
        let gone_at = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        // Phase 3: back, serving normally until the capture ends.
        let listener = UnixListener::bind(&sock2).unwrap();
        eprintln!("server back after {:?}", gone_at.elapsed());
        let (s, _) = listener.accept().unwrap();
        serve(s, &p, None, Duration::ZERO);
    });
    // Let the server bind first.
    let t = Instant::now();
    while !Path::new(&sock).exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }

    let pid = target.pid().to_string();
    let root = tmp.path().join("data");
    let child = spawn_trace(
        &root,
        &[
            "--qemu-pid",
            &pid,
            "--duration",
            "12",
            "--rate-hz",
            "20",
            "--backend",
            "proc",
            "--no-agent",
            "--qmp",
            sock.to_str().unwrap(),
            "--qmp-rate-hz",
            "10",
        ],
    );
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(60));
    assert!(ok, "trace failed: {stderr}");
    let _ = server.join();
    assert!(dir.join("done.marker").exists());
    assert_mono_non_decreasing(&dir, "events.jsonl");
    assert_mono_non_decreasing(&dir, "telemetry-qmp.jsonl");
    assert_mono_non_decreasing(&dir, "telemetry-proc.jsonl");

    let meta = read_json(&dir.join("meta.json"));
    assert_eq!(meta["result"]["end_reason"], "duration");
    assert_eq!(
        meta["host_fingerprint"]["qemu_version"],
        "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
    );
    assert_eq!(meta["vm"]["vcpus"], 2);
    assert_eq!(meta["vm"]["ram_mib"], 256);
    assert_eq!(meta["vm"]["vcpu_threads"][1]["tid"], 6847);
    let qmp = source_meta(&meta, "qmp");
    assert!(qmp["connects"].as_u64().unwrap() >= 2, "{qmp}");
    assert_eq!(qmp["stats_targets"], serde_json::json!(["vm", "vcpu"]));

    let events = read_jsonl(&dir.join("events.jsonl"));
    let stale: Vec<_> = events_named(&events, "source_stale")
        .into_iter()
        .filter(|e| e["source"] == "qmp")
        .collect();
    let recovered: Vec<_> = events_named(&events, "source_recovered")
        .into_iter()
        .filter(|e| e["source"] == "qmp")
        .collect();
    assert!(!stale.is_empty(), "no source_stale for qmp");
    assert!(!recovered.is_empty(), "qmp never recovered");
    let stale_t = stale[0]["t_mono_ns"].as_u64().unwrap();
    let recovered_t = recovered.last().unwrap()["t_mono_ns"].as_u64().unwrap();
    assert!(
        recovered_t > stale_t + 2_000_000_000,
        "stale {stale_t} recovered {recovered_t}"
    );
    assert!(events_named(&events, "qmp_event")
        .iter()
        .any(|e| e["qmp_event"] == "STOP"));

    // Rows before the stall and after the recovery; vm, vcpu and block kinds.
    let rows = read_jsonl(&dir.join("telemetry-qmp.jsonl"));
    let ts = t_of(&rows);
    assert!(
        ts.iter().any(|&t| t < stale_t),
        "no qmp rows before the stall"
    );
    assert!(
        ts.iter().any(|&t| t > recovered_t),
        "no qmp rows after recovery"
    );
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "t_mono_ns decreased");
    let kinds = |k: &str| rows.iter().filter(|r| r["kind"] == k).count();
    assert!(kinds("vm") > 0 && kinds("vcpu") > 0 && kinds("block") > 0);
    let vcpu_row = rows.iter().find(|r| r["kind"] == "vcpu").unwrap();
    assert!(vcpu_row["vcpu"].is_u64() && vcpu_row["tid"].is_u64());
    assert!(vcpu_row["kvm_halt_wait_hist_count"].is_u64());
    assert!(vcpu_row["kvm_blocking"].is_boolean());
    let block = rows.iter().find(|r| r["kind"] == "block").unwrap();
    assert_eq!(block["device"], "vblk0");

    // The host sampler never waited for QMP: its ticks went on through the stall.
    let proc_rows = read_jsonl(&dir.join("telemetry-proc.jsonl"));
    let during = proc_rows
        .iter()
        .filter(|r| {
            let t = r["t_mono_ns"].as_u64().unwrap();
            t > stale_t.saturating_sub(3_000_000_000) && t < recovered_t
        })
        .count();
    assert!(
        during > 20,
        "only {during} proc rows while QMP was stalled/gone"
    );
    let scheduled = meta["result"]["ticks_scheduled"].as_u64().unwrap();
    let missed = meta["result"]["ticks_missed"].as_u64().unwrap();
    assert!(
        missed * 10 <= scheduled,
        "host sampler missed {missed} of {scheduled}"
    );
}
