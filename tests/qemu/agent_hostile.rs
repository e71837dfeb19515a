//! A hostile guest agent: a fake chardev server sends a 10 MiB line, invalid UTF-8, NULs,
//! 10 000-deep nesting, a 100 000 lines/s flood for 2 s and a half line before it
//! disconnects. The capture must keep bounded memory, keep its host ticks, record the
//! good lines around the garbage, count the rejects, and reconnect.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cis490_tests::qemu_harness::*;

fn good(seq: u64) -> String {
    format!("{{\"seq\":{seq},\"t_guest_ns\":1795314808324962000,\"mono_ns\":{},\"loadavg\":\"0.00 0.00 0.00 1/56 126\",\"meminfo_free_kb\":191544}}\n", seq * 100_000_000)
}

#[test]
fn hostile_agent_input_is_bounded_counted_and_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("ga.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let target = Sleeper::spawn();
    let flood_lines = Arc::new(AtomicU64::new(0));
    let server_done = Arc::new(AtomicBool::new(false));

    let (fl, done) = (flood_lines.clone(), server_done.clone());
    let server = std::thread::spawn(move || {
        // Connection 1: the garbage.
        let (mut s, _) = listener.accept().unwrap();
        let t0 = Instant::now();
        s.write_all(good(1).as_bytes()).unwrap();
        // 10 MiB line, sent in 64 KiB pieces with no newline until the end.
        let piece = vec![b'x'; 64 * 1024];
        s.write_all(b"{\"big\":\"").unwrap();
        for _ in 0..160 {
            s.write_all(&piece).unwrap();
        }
        s.write_all(b"\"}\n").unwrap();
        s.write_all(good(2).as_bytes()).unwrap();
        s.write_all(b"{\"seq\":\"\xff\xfe\xfd\"}\n").unwrap();
        s.write_all(b"{\"seq\":3,\"x\":\"a\0b\"}\n").unwrap();
        s.write_all(format!("{}{}\n", "[".repeat(10_000), "]".repeat(10_000)).as_bytes())
            .unwrap();
        s.write_all(format!("{}1{}\n", "{\"a\":".repeat(10_000), "}".repeat(10_000)).as_bytes())
            .unwrap();
        s.write_all(b"[1,2,3]\n\"just a string\"\n{\"unterminated\":\n")
            .unwrap();
        s.write_all(good(4).as_bytes()).unwrap();
        // Flood: 100 000 lines/s for 2 s, in batches of 1 000 every 10 ms.
        let start = Instant::now();
        let mut batch = String::new();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(2) {
            batch.clear();
            for _ in 0..1000 {
                batch.push_str("{\"seq\":100000,\"flood\":1}\n");
            }
            if s.write_all(batch.as_bytes()).is_err() {
                break;
            }
            n += 1000;
            let due = start + Duration::from_millis(10 * (n / 1000));
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        fl.store(n, Ordering::SeqCst);
        // The limiter refills; normal lines must get through again.
        std::thread::sleep(Duration::from_millis(500));
        for seq in 1000..1010 {
            s.write_all(good(seq).as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        s.write_all(b"{\"seq\":99,\"half\":").unwrap();
        drop(s);
        eprintln!("server: garbage phase took {:?}", t0.elapsed());
        // Connection 2: the reader reconnects; good lines again.
        let (mut s, _) = listener.accept().unwrap();
        for seq in 2000..2010 {
            let _ = s.write_all(good(seq).as_bytes());
            std::thread::sleep(Duration::from_millis(100));
        }
        done.store(true, Ordering::SeqCst);
        // Keep the connection open until the capture ends.
        std::thread::sleep(Duration::from_secs(30));
    });

    let pid = target.pid().to_string();
    let root = tmp.path().join("data");
    let child = spawn_trace(
        &root,
        &[
            "--qemu-pid",
            &pid,
            "--duration",
            "10",
            "--rate-hz",
            "20",
            "--backend",
            "proc",
            "--no-qmp",
            "--agent",
            sock.to_str().unwrap(),
        ],
    );
    let cis_pid = child.id();
    // Watch the capture's peak memory while it runs.
    let watcher = std::thread::spawn(move || {
        let mut peak = 0;
        while let Some(kb) = vm_hwm_kb(cis_pid) {
            peak = peak.max(kb);
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    });
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(60));
    let peak_kb = watcher.join().unwrap();
    assert!(ok, "trace failed: {stderr}");
    assert!(
        server_done.load(Ordering::SeqCst),
        "fake agent did not finish"
    );
    drop(server);

    assert!(dir.join("done.marker").exists());
    assert_mono_non_decreasing(&dir, "events.jsonl");
    assert_mono_non_decreasing(&dir, "telemetry-agent.jsonl");
    assert_mono_non_decreasing(&dir, "telemetry-proc.jsonl");
    let meta = read_json(&dir.join("meta.json"));
    let agent = source_meta(&meta, "agent");
    let rejects = &agent["rejects"];
    eprintln!(
        "agent meta: {agent}\npeak VmHWM {peak_kb} KiB, flood lines sent {}",
        flood_lines.load(Ordering::SeqCst)
    );
    for reason in [
        "too_long",
        "invalid_utf8",
        "nul",
        "too_deep",
        "not_object",
        "invalid_json",
        "partial_line",
    ] {
        assert!(
            rejects[reason].as_u64().unwrap() >= 1,
            "no {reason} reject counted: {rejects}"
        );
    }
    assert_eq!(rejects["too_deep"], 2);
    assert!(rejects["not_object"].as_u64().unwrap() >= 2);
    // The flood is limited to ~1000 lines/s: most of 200 000 lines are dropped unparsed.
    assert!(
        rejects["rate_limited"].as_u64().unwrap() > 100_000,
        "{rejects}"
    );
    assert!(
        agent["connects"].as_u64().unwrap() >= 2,
        "reader did not reconnect: {agent}"
    );

    let rows = read_jsonl(&dir.join("telemetry-agent.jsonl"));
    let seqs: Vec<u64> = rows
        .iter()
        .filter_map(|r| r["guest_seq"].as_u64())
        .collect();
    for want in [1, 2, 4, 1000, 1009, 2000, 2009] {
        assert!(
            seqs.contains(&want),
            "good line {want} missing; got {} rows",
            seqs.len()
        );
    }
    assert!(!seqs.contains(&3) && !seqs.contains(&99));
    assert!(rows.len() < 5000, "flood not bounded: {} rows", rows.len());
    assert_eq!(agent["rows"].as_u64().unwrap(), rows.len() as u64);
    for r in &rows {
        assert_eq!(r["source"], "agent");
        assert_eq!(r["available_in_deployment"], true);
        assert!(r
            .as_object()
            .unwrap()
            .values()
            .all(|v| !v.is_object() && !v.is_array()));
    }

    // Rejects are reported as events, at most about one per second.
    let events = read_jsonl(&dir.join("events.jsonl"));
    let rej = events_named(&events, "agent_rejects");
    assert!(!rej.is_empty());
    assert!(
        rej.len() <= 14,
        "{} agent_rejects events in 10 s",
        rej.len()
    );
    assert!(!events_named(&events, "source_stale").is_empty());

    // Fixed memory: a reader that buffered the 10 MiB line (and parsed it) would need
    // well over 20 MiB more than this.
    assert!(peak_kb > 0 && peak_kb < 24 * 1024, "peak RSS {peak_kb} KiB");

    // Host ticks went on: the proc stream has its rows and (almost) no missed ticks.
    let result = &meta["result"];
    let scheduled = result["ticks_scheduled"].as_u64().unwrap();
    let missed = result["ticks_missed"].as_u64().unwrap();
    assert!(scheduled >= 150, "{result}");
    assert!(
        missed * 10 <= scheduled,
        "host sampler missed {missed} of {scheduled} ticks"
    );
    assert!(source_meta(&meta, "proc")["rows"].as_u64().unwrap() > 0);
}
