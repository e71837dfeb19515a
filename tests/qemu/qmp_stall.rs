//! A QMP server that answers with real QEMU 10.0.2 replies, then stalls in the middle of
//! a reply, then disappears, then comes back. The capture must go on (host ticks kept),
//! mark `qmp` stale, and reconnect and resume rows when the server is back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cis490_tests::*;
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
fn serve(
    s: UnixStream,
    polls: &AtomicU64,
    stall_after: Option<u64>,
    stall_for: Duration,
    tids: &[u32],
) {
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
        let out = if cmd == "query-stats" || cmd == "query-cpus-fast" {
            hostile_reply(
                &Hostile {
                    tids: tids.to_vec(),
                    ..Hostile::default()
                },
                &req,
            )
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
    // A target with real threads: QMP's vCPU thread ids must be the target's (F10).
    let target = cis490_tests::Load::start(&["--spin", "0", "--switch", "2"]);
    let tids = two_tids(target.pid());
    let tids2 = tids.clone();
    let polls = Arc::new(AtomicU64::new(0));
    let p = polls.clone();
    let sock2 = sock.clone();
    let server = std::thread::spawn(move || {
        let listener = UnixListener::bind(&sock2).unwrap();
        // Phase 1: normal service for ~20 polls, then a stall mid-reply for 4 s.
        let (s, _) = listener.accept().unwrap();
        serve(s, &p, Some(20), Duration::from_secs(4), &tids2);
        // Phase 2: gone (no socket at all) for 2 s.
        drop(listener);
        std::fs::remove_file(&sock2).unwrap();
        let gone_at = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        // Phase 3: back, serving normally until the capture ends.
        let listener = UnixListener::bind(&sock2).unwrap();
        eprintln!("server back after {:?}", gone_at.elapsed());
        let (s, _) = listener.accept().unwrap();
        serve(s, &p, None, Duration::ZERO, &tids2);
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
    assert_eq!(meta["vm"]["vcpu_threads"][1]["tid"], tids[1]);
    assert_eq!(source_meta(&meta, "qmp")["vcpu_tid_mismatches"], 0);
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
    assert!(tids.contains(&(vcpu_row["tid"].as_u64().unwrap() as u32)));
    // Request and reply instants (issue 11): request <= sample <= reply = t_mono_ns.
    for r in &rows {
        let (req, smp, rep, rtt) = (
            r["t_request_mono_ns"].as_u64().unwrap(),
            r["t_sample_mono_ns"].as_u64().unwrap(),
            r["t_mono_ns"].as_u64().unwrap(),
            r["rtt_ns"].as_u64().unwrap(),
        );
        assert!(req <= smp && smp <= rep && rep - req == rtt, "{r}");
        assert_eq!(smp, req + rtt / 2, "{r}");
    }
    let rtt = &source_meta(&meta, "qmp")["rtt_ns"];
    assert!(
        rtt["count"].as_u64().unwrap() > 0 && rtt["max_ns"].as_u64().unwrap() > 0,
        "{rtt}"
    );
    let unc = &source_meta(&meta, "qmp")["sample_uncertainty_ns"];
    assert_eq!(
        unc["max_ns"].as_u64().unwrap(),
        rtt["max_ns"].as_u64().unwrap() / 2
    );
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
    // The vCPU map was filled before sampling began: the first row of each "vCPU"
    // thread already has its index.
    for (i, tid) in tids.iter().enumerate() {
        let first = proc_rows
            .iter()
            .find(|r| r["tid"] == *tid)
            .expect("a proc row of the vCPU thread");
        assert_eq!(first["vcpu"], i, "{first}");
    }
    let scheduled = meta["result"]["ticks_scheduled"].as_u64().unwrap();
    let missed = meta["result"]["ticks_missed"].as_u64().unwrap();
    assert!(
        missed * 10 <= scheduled,
        "host sampler missed {missed} of {scheduled}"
    );
}

// ---------------------------------------------------------------------------------------
// Hostile QEMU: floods, withheld replies, huge replies, foreign thread ids, wrong ids, no
// greeting (issue 16 F5, F6, F10 and the "held up" cases). One configurable fake server.
// ---------------------------------------------------------------------------------------

/// How the fake QMP server misbehaves.
#[derive(Clone, Default)]
struct Hostile {
    /// `thread-id`s answered by query-cpus-fast (the fixture's vCPU order).
    tids: Vec<u32>,
    /// Write events as fast as the socket takes them, from the greeting on.
    flood: bool,
    /// Never answer this command (the connection stays open).
    withhold: Option<&'static str>,
    /// Answer this command once with one line of this many bytes (no newline before the end).
    huge_reply: Option<(&'static str, usize)>,
    /// Answer every command after qmp_capabilities with an id that is not the request's.
    wrong_ids: bool,
    /// Accept the connection and say nothing at all.
    no_greeting: bool,
}

const FLOOD_EVENT: &[u8] =
    b"{\"timestamp\": {\"seconds\": 1795314803, \"microseconds\": 662494}, \"event\": \"BLOCK_IO_ERROR\", \"data\": {\"device\": \"vblk0\", \"operation\": \"write\", \"action\": \"report\"}}\n";

fn hostile_reply(h: &Hostile, req: &Value) -> String {
    let cmd = req["execute"].as_str().unwrap_or_default();
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let id = if h.wrong_ids && cmd != "qmp_capabilities" {
        Value::String("not-yours".into())
    } else {
        id
    };
    if cmd == "query-cpus-fast" && !h.tids.is_empty() {
        let mut v: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("tcg/query-cpus-fast.json")).unwrap(),
        )
        .unwrap();
        for (cpu, tid) in v["return"].as_array_mut().unwrap().iter_mut().zip(&h.tids) {
            cpu["thread-id"] = (*tid).into();
        }
        v["id"] = id;
        return format!("{v}\n");
    }
    if cmd == "query-stats" {
        return stats_reply(req["arguments"]["target"].as_str().unwrap_or_default(), &id);
    }
    reply(cmd, &id)
}

/// Serve one connection the hostile way; returns when the client is gone.
fn serve_hostile(s: UnixStream, h: &Hostile, huge_sent: &AtomicU64, huge: Option<&[u8]>) {
    if h.no_greeting {
        // Hold the connection open, silent, until the client leaves.
        let mut buf = [0u8; 4096];
        let mut r = &s;
        while std::io::Read::read(&mut r, &mut buf).is_ok_and(|n| n > 0) {}
        return;
    }
    let w = Arc::new(std::sync::Mutex::new(s.try_clone().unwrap()));
    // Set while a reply waits for the writer: the flood steps aside (a real QEMU queues
    // replies and events in one buffer, in order; a mutex alone could starve replies).
    let replying = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let greeting = std::fs::read_to_string(fixture("tcg/greeting.json")).unwrap();
    if w.lock()
        .unwrap()
        .write_all(format!("{}\n", greeting.trim()).as_bytes())
        .is_err()
    {
        return;
    }
    if h.flood {
        let w = w.clone();
        let replying = replying.clone();
        std::thread::spawn(move || {
            let batch: Vec<u8> = FLOOD_EVENT.repeat(64);
            // Whole lines under the lock, so replies never land inside an event.
            loop {
                while replying.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                if w.lock().unwrap().write_all(&batch).is_err() {
                    return;
                }
            }
        });
    }
    let send = |bytes: &[u8]| {
        replying.store(true, Ordering::SeqCst);
        let ok = w.lock().unwrap().write_all(bytes).is_ok();
        replying.store(false, Ordering::SeqCst);
        ok
    };
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        let Ok(req) = serde_json::from_str::<Value>(&line) else {
            return;
        };
        let cmd = req["execute"].as_str().unwrap_or_default();
        if h.withhold == Some(cmd) {
            continue;
        }
        if let (Some((huge_cmd, _)), Some(big)) = (h.huge_reply, huge) {
            if huge_cmd == cmd && huge_sent.fetch_add(1, Ordering::SeqCst) == 0 {
                if !send(big) {
                    return;
                }
                continue;
            }
        }
        let out = hostile_reply(h, &req);
        if !send(out.as_bytes()) {
            return;
        }
    }
}

/// Start the fake server on `sock`; it serves every connection (one at a time) forever.
fn start_hostile(sock: &Path, h: Hostile) {
    let listener = UnixListener::bind(sock).unwrap();
    let huge_sent = Arc::new(AtomicU64::new(0));
    // Built before the capture starts, so sending it is only the socket's work:
    // `{"return": "xxxx…"}`, valid JSON if it were ever read whole.
    let huge: Option<Arc<Vec<u8>>> = h.huge_reply.map(|(_, bytes)| {
        let mut big = vec![b'x'; bytes];
        big[..12].copy_from_slice(b"{\"return\": \"");
        big[bytes - 3..].copy_from_slice(b"\"}\n");
        Arc::new(big)
    });
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let h = h.clone();
            let huge_sent = huge_sent.clone();
            let huge = huge.clone();
            // Each connection on its own thread, so a withheld one does not block a reconnect.
            std::thread::spawn(move || {
                serve_hostile(s, &h, &huge_sent, huge.as_deref().map(Vec::as_slice))
            });
        }
    });
}

/// What a hostile capture cost: its episode, wall time, peak RSS and CPU time of cis490.
struct Outcome {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    elapsed: Duration,
    hwm_kb: u64,
}

/// Run `cis490 trace` against a hostile server for `secs` seconds, watching its memory and CPU.
fn hostile_capture(h: Hostile, target_pid: u32, secs: u64) -> Outcome {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("qmp.sock");
    start_hostile(&sock, h);
    let root = tmp.path().join("data");
    let pid = target_pid.to_string();
    let secs_s = secs.to_string();
    let t = Instant::now();
    let child = spawn_trace(
        &root,
        &[
            "--qemu-pid",
            &pid,
            "--duration",
            &secs_s,
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
    let cpid = child.id();
    let watch = std::thread::spawn(move || {
        let (mut hwm, mut cpu) = (0, 0);
        while let Some(h) = vm_hwm_kb(cpid) {
            hwm = hwm.max(h);
            cpu = cpu_ms(cpid).unwrap_or(cpu).max(cpu);
            std::thread::sleep(Duration::from_millis(50));
        }
        (hwm, cpu)
    });
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(secs + 30));
    let elapsed = t.elapsed();
    let (hwm_kb, cpu_ms) = watch.join().unwrap();
    assert!(ok, "trace failed: {stderr}");
    let meta = read_json(&dir.join("meta.json"));
    if std::env::var_os("QMP_TEST_DEBUG").is_some() {
        eprintln!(
            "{}",
            std::fs::read_to_string(dir.join("events.jsonl")).unwrap()
        );
    }
    eprintln!(
        "capture of {secs} s: wall {elapsed:?}, cis490 VmHWM {hwm_kb} KiB, CPU {cpu_ms} ms, \
         {} qmp_event lines; meta.sources[qmp] = {}",
        count_events(&dir, "qmp_event"),
        source_meta(&meta, "qmp")
    );
    Outcome {
        _tmp: tmp,
        dir,
        elapsed,
        hwm_kb,
    }
}

/// Two real thread ids of `pid` other than its main thread (stand-ins for vCPU threads).
fn two_tids(pid: u32) -> Vec<u32> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&t| t != pid)
        .collect();
    tids.sort_unstable();
    assert!(tids.len() >= 2, "target {pid} has threads {tids:?}");
    tids.truncate(2);
    tids
}

/// Lines of a file that match `event`.
fn count_events(dir: &Path, event: &str) -> usize {
    let text = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let needle = format!("\"event\":\"{event}\"");
    text.lines().filter(|l| l.contains(&needle)).count()
}

fn qmp_stale_and_on_time(o: &Outcome, secs: u64) {
    let meta = read_json(&o.dir.join("meta.json"));
    assert_eq!(meta["result"]["end_reason"], "duration");
    assert!(o.dir.join("done.marker").exists());
    assert!(
        o.elapsed < Duration::from_secs(secs + 8),
        "capture of {secs} s took {:?}",
        o.elapsed
    );
}

#[test]
fn qmp_event_flood_is_rate_limited_and_counted() {
    let target = cis490_tests::Load::start(&["--spin", "0", "--switch", "2"]);
    let tids = two_tids(target.pid());
    let secs = 5;
    let o = hostile_capture(
        Hostile {
            tids,
            flood: true,
            ..Hostile::default()
        },
        target.pid(),
        secs,
    );
    qmp_stale_and_on_time(&o, secs);
    let meta = read_json(&o.dir.join("meta.json"));
    let qmp = source_meta(&meta, "qmp");
    let written = count_events(&o.dir, "qmp_event") as u64;
    // Burst 1000 + 100/s over the capture (+1 s of slack for start and end).
    assert!(
        written <= 1000 + 100 * (o.elapsed.as_secs() + 2),
        "{written} qmp_event rows"
    );
    assert!(written >= 100, "only {written} qmp_event rows");
    assert_eq!(qmp["qmp_events"], written, "{qmp}");
    let dropped = qmp["events_dropped"].as_u64().expect("events_dropped");
    assert!(dropped > written, "dropped {dropped}, written {written}");
    // At most one summary a second.
    let summaries = count_events(&o.dir, "qmp_events_dropped") as u64;
    assert!(
        (1..=secs + 2).contains(&summaries),
        "{summaries} qmp_events_dropped events"
    );
    // Polling went on under the flood (slower: each reply waits behind the events queued
    // before it; at least one poll a second even on a loaded 2-core machine).
    let rows = read_jsonl(&o.dir.join("telemetry-qmp.jsonl"));
    assert!(
        rows.iter().filter(|r| r["kind"] == "vm").count() as u64 >= secs,
        "{} qmp rows",
        rows.len()
    );
    assert!(o.hwm_kb < 150 * 1024, "VmHWM {} KiB", o.hwm_kb);
}

#[test]
fn qmp_event_flood_while_a_reply_is_withheld_keeps_memory_bounded() {
    let target = cis490_tests::Load::start(&["--spin", "0", "--switch", "2"]);
    let tids = two_tids(target.pid());
    let secs = 6;
    let o = hostile_capture(
        Hostile {
            tids,
            flood: true,
            withhold: Some("query-blockstats"),
            ..Hostile::default()
        },
        target.pid(),
        secs,
    );
    qmp_stale_and_on_time(&o, secs);
    let meta = read_json(&o.dir.join("meta.json"));
    let qmp = source_meta(&meta, "qmp");
    assert!(qmp["stale_count"].as_u64().unwrap() >= 1, "{qmp}");
    assert!(qmp["events_dropped"].as_u64().unwrap() > 0, "{qmp}");
    let written = count_events(&o.dir, "qmp_event") as u64;
    assert!(
        written <= 1000 + 100 * (o.elapsed.as_secs() + 2),
        "{written} qmp_event rows"
    );
    assert!(o.hwm_kb < 150 * 1024, "VmHWM {} KiB", o.hwm_kb);
}

#[test]
fn qmp_huge_reply_is_rejected_and_the_source_goes_on() {
    let target = cis490_tests::Load::start(&["--spin", "0", "--switch", "2"]);
    let tids = two_tids(target.pid());
    let secs = 5;
    let o = hostile_capture(
        Hostile {
            tids,
            huge_reply: Some(("query-blockstats", 100 << 20)),
            ..Hostile::default()
        },
        target.pid(),
        secs,
    );
    qmp_stale_and_on_time(&o, secs);
    let meta = read_json(&o.dir.join("meta.json"));
    let qmp = source_meta(&meta, "qmp");
    assert_eq!(qmp["lines_oversized"], 1, "{qmp}");
    let events = read_jsonl(&o.dir.join("events.jsonl"));
    let rejected = events_named(&events, "source_error")
        .into_iter()
        .find(|e| e["source"] == "qmp" && e["message"].as_str().unwrap().contains("longer than"))
        .expect("a source_error for the oversized reply");
    let t_rejected = rejected["t_mono_ns"].as_u64().unwrap();
    // The source went on: block rows after the rejected one.
    let rows = read_jsonl(&o.dir.join("telemetry-qmp.jsonl"));
    assert!(
        rows.iter()
            .filter(|r| r["kind"] == "block" && r["t_mono_ns"].as_u64().unwrap() > t_rejected)
            .count()
            >= 10,
        "no block rows after the rejected reply"
    );
    // The 100 MiB never sat in memory: the line buffer stops at the 8 MiB cap.
    assert!(o.hwm_kb < 100 * 1024, "VmHWM {} KiB", o.hwm_kb);
}

#[test]
fn qmp_foreign_vcpu_thread_ids_are_reported_and_never_used() {
    let target = cis490_tests::Load::start(&["--spin", "0", "--switch", "2"]);
    let secs = 3;
    let o = hostile_capture(
        Hostile {
            tids: vec![1, 2],
            ..Hostile::default()
        },
        target.pid(),
        secs,
    );
    qmp_stale_and_on_time(&o, secs);
    let meta = read_json(&o.dir.join("meta.json"));
    assert_eq!(meta["vm"]["vcpu_threads"], serde_json::json!([]));
    let qmp = source_meta(&meta, "qmp");
    assert_eq!(qmp["vcpu_tid_mismatches"], 2, "{qmp}");
    let events = read_jsonl(&o.dir.join("events.jsonl"));
    let mismatch = events_named(&events, "qmp_vcpu_mismatch");
    assert!(!mismatch.is_empty(), "no qmp_vcpu_mismatch event");
    assert_eq!(mismatch[0]["foreign"][0]["tid"], 1, "{}", mismatch[0]);
    // No QMP row carries the foreign tids, and no host row became a "vCPU" thread.
    for r in read_jsonl(&o.dir.join("telemetry-qmp.jsonl")) {
        assert!(r["tid"] != 1 && r["tid"] != 2, "{r}");
    }
    let proc_rows = read_jsonl(&o.dir.join("telemetry-proc.jsonl"));
    assert!(!proc_rows.is_empty());
    for r in proc_rows {
        assert!(r["vcpu"].is_null(), "{r}");
    }
}

#[test]
fn qmp_replies_with_wrong_ids_mark_the_source_stale_without_a_hang() {
    let target = Sleeper::spawn();
    let secs = 4;
    let o = hostile_capture(
        Hostile {
            wrong_ids: true,
            ..Hostile::default()
        },
        target.pid(),
        secs,
    );
    qmp_stale_and_on_time(&o, secs);
    let meta = read_json(&o.dir.join("meta.json"));
    let qmp = source_meta(&meta, "qmp");
    assert!(qmp["stale_count"].as_u64().unwrap() >= 1, "{qmp}");
    assert_eq!(qmp["rows"], 0, "{qmp}");
    assert!(meta["host_fingerprint"]["qemu_version"].is_null());
}

#[test]
fn qmp_server_without_greeting_marks_the_source_stale_without_a_hang() {
    let target = Sleeper::spawn();
    let secs = 4;
    let o = hostile_capture(
        Hostile {
            no_greeting: true,
            ..Hostile::default()
        },
        target.pid(),
        secs,
    );
    qmp_stale_and_on_time(&o, secs);
    let meta = read_json(&o.dir.join("meta.json"));
    let qmp = source_meta(&meta, "qmp");
    assert!(qmp["stale_count"].as_u64().unwrap() >= 1, "{qmp}");
    assert_eq!(qmp["connects"], 0, "{qmp}");
    let events = read_jsonl(&o.dir.join("events.jsonl"));
    assert!(events_named(&events, "source_stale")
        .iter()
        .any(|e| e["source"] == "qmp" && e["message"].as_str().unwrap().contains("greeting")));
}

/// A reply withheld after the poll already wrote rows (query-status answered, then
/// query-blockstats never): the poll is partial, so the gap declared after the reconnect
/// must start at the next seq, and the episode must pass `cis490 validate` (found by
/// `cargo xtask soak`: "gap event declares seq N..=M missing, but rows with seq N exist").
#[test]
fn qmp_reply_withheld_mid_poll_declares_a_gap_validate_accepts() {
    let target = cis490_tests::Load::start(&["--spin", "0", "--switch", "2"]);
    let tids = two_tids(target.pid());
    let secs = 8;
    let o = hostile_capture(
        Hostile {
            tids,
            withhold: Some("query-blockstats"),
            ..Hostile::default()
        },
        target.pid(),
        secs,
    );
    qmp_stale_and_on_time(&o, secs);
    let rows = read_jsonl(&o.dir.join("telemetry-qmp.jsonl"));
    assert!(
        rows.iter().any(|r| r["kind"] == "vm"),
        "no vm row was written before the withheld reply"
    );
    assert!(count_events(&o.dir, "gap") >= 1, "no gap declared");
    let out = std::process::Command::new(bin("cis490"))
        .arg("validate")
        .arg(&o.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
