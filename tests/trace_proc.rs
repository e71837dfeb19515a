//! `cis490 trace --backend proc` end to end against the bundled multi-threaded target:
//! the episode contract, every way an episode ends, phase marks, and bad input.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cis490_tests::{
    cis490, episode_dir_from, episodes, read_json, read_jsonl, send_signal, wait_for, Load,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn trace_cmd(pid: u32, data_root: &Path, extra: &[&str]) -> Command {
    let mut cmd = cis490();
    cmd.args(["trace", "--qemu-pid", &pid.to_string(), "--data-root"])
        .arg(data_root)
        .args(extra);
    cmd
}

fn trace(pid: u32, data_root: &Path, extra: &[&str]) -> std::process::Output {
    trace_cmd(pid, data_root, extra)
        .output()
        .expect("run cis490 trace")
}

/// A capture running in the background, for tests that act on it while it runs.
fn spawn_trace(pid: u32, data_root: &Path, extra: &[&str]) -> std::process::Child {
    trace_cmd(pid, data_root, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cis490 trace")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The checks every complete episode must pass, whatever ended it.
fn assert_complete_episode(dir: &Path) -> Value {
    let meta = read_json(&dir.join("meta.json"));
    let wall_origin = meta["clock"]["wall_origin_ns"]
        .as_u64()
        .expect("wall origin");
    // done.marker is the newest file.
    let done_mtime = std::fs::metadata(dir.join("done.marker"))
        .expect("done.marker")
        .modified()
        .unwrap();
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            entry.metadata().unwrap().modified().unwrap() <= done_mtime,
            "{name} newer than done.marker"
        );
        names.insert(name);
    }
    assert!(!names.contains("control.sock"), "control.sock left behind");
    // The manifest lists every file but itself and done.marker, with true checksums.
    let manifest = read_json(&dir.join("manifest.json"));
    let mut listed = BTreeSet::new();
    for f in manifest["files"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let data = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(
            f["bytes"].as_u64().unwrap(),
            data.len() as u64,
            "{name} size"
        );
        assert_eq!(
            f["lines"].as_u64().unwrap(),
            data.iter().filter(|&&b| b == b'\n').count() as u64,
            "{name} lines"
        );
        assert_eq!(
            f["sha256"].as_str().unwrap(),
            sha256_hex(&data),
            "{name} sha256"
        );
        listed.insert(name.to_owned());
    }
    let expected: BTreeSet<String> = names
        .iter()
        .filter(|n| *n != "manifest.json" && *n != "done.marker")
        .cloned()
        .collect();
    assert_eq!(listed, expected);
    // Every row: parseable, clock pair present, t_mono_ns non-decreasing, one origin.
    for name in names.iter().filter(|n| n.ends_with(".jsonl")) {
        let mut last = 0u64;
        for row in read_jsonl(&dir.join(name)) {
            let mono = row["t_mono_ns"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: t_mono_ns in {row}"));
            let wall = row["t_wall_ns"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: t_wall_ns in {row}"));
            assert!(mono >= last, "{name}: t_mono_ns went back {last} -> {mono}");
            last = mono;
            // Both clocks tick together, so wall - mono stays at the wall origin (50 ms slack
            // for the two reads and NTP slew over a short test).
            let skew = (wall as i128 - mono as i128 - wall_origin as i128).abs();
            assert!(
                skew < 50_000_000,
                "{name}: row not on the episode origin (skew {skew} ns): {row}"
            );
        }
    }
    // And the project's own validator agrees.
    let v = cis490().arg("validate").arg(dir).output().unwrap();
    assert!(
        v.status.success(),
        "cis490 validate failed:\n{}",
        String::from_utf8_lossy(&v.stdout)
    );
    let labels = read_jsonl(&dir.join("labels.jsonl"));
    assert_eq!(labels[0]["phase"], "clean");
    assert!(labels[0]["prev"].is_null());
    let result = &meta["result"];
    assert!(result.is_object(), "meta.result missing");
    for s in meta["sources"].as_array().unwrap() {
        let file = s["file"].as_str().unwrap();
        let lines = read_jsonl(&dir.join(file)).len() as u64;
        assert_eq!(
            s["rows"].as_u64().unwrap(),
            lines,
            "meta.sources rows for {file}"
        );
    }
    meta
}

#[test]
fn proc_episode_meets_the_contract() {
    let load = Load::start(&["--spin", "1", "--switch", "3"]);
    let root = tempfile::tempdir().unwrap();
    let meta_file = root.path().join("meta-in.json");
    std::fs::write(
        &meta_file,
        r#"{"image_name":"demo-img","snapshot_name":"s0","exploit":{"cve":"none"},"sample":null}"#,
    )
    .unwrap();
    let out = trace(
        load.pid(),
        root.path(),
        &[
            "--duration",
            "3",
            "--rate-hz",
            "50",
            "--backend",
            "proc",
            "--meta",
            meta_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "trace failed: {}", stderr(&out));
    let dir = episode_dir_from(&out);
    let meta = assert_complete_episode(&dir);

    let names: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = [
        "done.marker",
        "events.jsonl",
        "labels.jsonl",
        "manifest.json",
        "meta.json",
        "telemetry-perf.jsonl",
        "telemetry-proc.jsonl",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
    assert_eq!(dir.file_name().unwrap().len(), 26, "episode id is a ULID");
    assert_eq!(
        meta["episode_id"].as_str().unwrap(),
        dir.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(meta["schema_version"], 1);
    assert_eq!(meta["vm"]["image_name"], "demo-img");
    assert_eq!(meta["vm"]["snapshot_name"], "s0");
    assert_eq!(meta["exploit"]["cve"], "none");
    assert_eq!(
        meta["vm"]["target_pid"].as_u64().unwrap(),
        load.pid() as u64
    );
    assert_eq!(meta["backend"]["used"], "proc");
    assert_eq!(meta["schedule"]["interval_ns"], 20_000_000);
    let result = &meta["result"];
    assert_eq!(result["end_reason"], "duration");
    assert_eq!(result["ticks_scheduled"], 150);
    assert_eq!(result["pid_alive_at_end"], true);

    let rows = read_jsonl(&dir.join("telemetry-proc.jsonl"));
    // 5 threads (main + 1 spin + 3 switch; one core stays free for the tracer) + 1 process row per tick.
    let expected = 3.0 * 50.0 * 6.0;
    let n = rows.len() as f64;
    assert!(
        (n - expected).abs() <= expected * 0.10,
        "{n} rows, expected ~{expected}"
    );
    let mut by_seq: HashMap<u64, (usize, usize)> = HashMap::new();
    let mut comms = BTreeSet::new();
    for r in &rows {
        assert_eq!(r["source"], "proc");
        assert_eq!(r["available_in_deployment"], false);
        for field in [
            "on_cpu_ns",
            "runqueue_wait_ns",
            "voluntary_switches",
            "involuntary_switches",
            "utime_ticks",
            "stime_ticks",
            "minflt",
            "majflt",
            "rchar",
            "wchar",
            "syscr",
            "syscw",
            "read_bytes",
            "write_bytes",
        ] {
            assert!(r[field].is_u64(), "{field} not an integer in {r}");
        }
        let e = by_seq.entry(r["seq"].as_u64().unwrap()).or_default();
        if r["tid"].is_null() {
            e.0 += 1;
            assert!(r["rss_kb"].as_u64().unwrap() > 0);
            assert_eq!(r["num_threads"], 5);
        } else {
            e.1 += 1;
            comms.insert(r["comm"].as_str().unwrap().to_owned());
        }
    }
    assert!(
        by_seq.values().all(|&(p, t)| p == 1 && t == 5),
        "one process row and 5 thread rows per tick"
    );
    for c in ["spin-0", "switch-0", "switch-1", "switch-2"] {
        assert!(comms.contains(c), "thread {c} missing from {comms:?}");
    }
    // A spinning thread really accumulates on-CPU time in the rows.
    let spin: Vec<u64> = rows
        .iter()
        .filter(|r| r["comm"] == "spin-0")
        .map(|r| r["on_cpu_ns"].as_u64().unwrap())
        .collect();
    assert!(
        spin.last().unwrap() - spin[0] > 500_000_000,
        "spin-0 on-CPU grew only {} ns",
        spin.last().unwrap() - spin[0]
    );

    let events = read_jsonl(&dir.join("events.jsonl"));
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for k in [
        "episode_start",
        "backend_selected",
        "source_started",
        "source_stopped",
        "episode_end",
    ] {
        assert!(kinds.contains(&k), "event {k} missing: {kinds:?}");
    }
}

#[test]
fn threads_that_appear_mid_episode_are_picked_up_and_totals_never_decrease() {
    let load = Load::start(&["--spin", "1", "--switch", "1", "--spawn-after", "1"]);
    let root = tempfile::tempdir().unwrap();
    let out = trace(
        load.pid(),
        root.path(),
        &["--duration", "2.5", "--rate-hz", "20", "--backend", "proc"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = episode_dir_from(&out);
    assert_complete_episode(&dir);
    let rows = read_jsonl(&dir.join("telemetry-proc.jsonl"));
    let first_late = rows
        .iter()
        .find(|r| r["comm"] == "late-0")
        .expect("late thread recorded");
    assert!(
        first_late["seq"].as_u64().unwrap() >= 10,
        "late thread seen too early: {first_late}"
    );
    let totals: Vec<u64> = rows
        .iter()
        .filter(|r| r["tid"].is_null())
        .map(|r| r["on_cpu_ns"].as_u64().unwrap())
        .collect();
    assert!(
        totals.windows(2).all(|w| w[1] >= w[0]),
        "process on_cpu_ns decreased"
    );
}

#[test]
fn target_killed_mid_run_ends_with_target_exit() {
    let mut load = Load::start(&["--spin", "1", "--switch", "1"]);
    let root = tempfile::tempdir().unwrap();
    let child = spawn_trace(
        load.pid(),
        root.path(),
        &["--backend", "proc", "--rate-hz", "100"],
    );
    std::thread::sleep(Duration::from_millis(1200));
    load.kill();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = episode_dir_from(&out);
    let meta = assert_complete_episode(&dir);
    assert_eq!(meta["result"]["end_reason"], "target_exit");
    assert_eq!(meta["result"]["pid_alive_at_end"], false);
    let events = read_jsonl(&dir.join("events.jsonl"));
    assert!(events.iter().any(|e| e["event"] == "target_exit"));
    // The process vanishing mid-tick is an ending, not a source error.
    assert!(
        !events.iter().any(|e| e["event"] == "source_error"),
        "{events:?}"
    );
}

fn signal_ends_episode(sig: i32) {
    let load = Load::start(&["--spin", "1"]);
    let root = tempfile::tempdir().unwrap();
    let child = spawn_trace(load.pid(), root.path(), &["--backend", "proc"]);
    assert!(wait_for(Duration::from_secs(10), || episodes(root.path())
        .len()
        == 1));
    std::thread::sleep(Duration::from_millis(800));
    send_signal(child.id(), sig);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(&out)
    );
    let dir = episode_dir_from(&out);
    let meta = assert_complete_episode(&dir);
    assert_eq!(meta["result"]["end_reason"], "signal");
    let events = read_jsonl(&dir.join("events.jsonl"));
    assert!(events.iter().any(|e| e["event"] == "signal"));
    assert!(read_jsonl(&dir.join("telemetry-proc.jsonl")).len() >= 10);
}

#[test]
fn sigterm_closes_the_episode_cleanly() {
    signal_ends_episode(libc::SIGTERM);
}

#[test]
fn sigint_closes_the_episode_cleanly() {
    signal_ends_episode(libc::SIGINT);
}

fn mark(dir: &Path, args: &[&str]) -> std::process::Output {
    cis490().arg("mark").arg(dir).args(args).output().unwrap()
}

#[test]
fn mark_round_trip_and_refusals() {
    let load = Load::start(&["--spin", "1"]);
    let root = tempfile::tempdir().unwrap();
    let child = spawn_trace(
        load.pid(),
        root.path(),
        &["--backend", "proc", "--duration", "4"],
    );
    assert!(wait_for(Duration::from_secs(10), || episodes(root.path())
        .first()
        .is_some_and(|d| d.join("control.sock").exists())));
    let dir = episodes(root.path()).remove(0);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("control.sock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "control.sock mode");

    let ok = mark(&dir, &["--phase", "armed", "--reason", "sample staged"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let again = mark(&dir, &["--phase", "armed"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already armed"),
        "{}",
        stderr(&again)
    );
    let unknown = mark(&dir, &["--phase", "exploded"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("infected_running"),
        "the error lists valid phases: {}",
        stderr(&unknown)
    );
    assert!(mark(&dir, &["--phase", "infecting"]).status.success());

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let meta = assert_complete_episode(&dir);
    let labels = read_jsonl(&dir.join("labels.jsonl"));
    let phases: Vec<&str> = labels
        .iter()
        .map(|l| l["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["clean", "armed", "infecting"]);
    assert_eq!(labels[1]["prev"], "clean");
    assert_eq!(labels[1]["reason"], "sample staged");
    assert_eq!(labels[2]["prev"], "armed");
    assert_eq!(
        meta["result"]["phases_observed"],
        serde_json::json!(["clean", "armed", "infecting"])
    );
    // After the capture ends there is nobody to talk to: a clear error.
    let late = mark(&dir, &["--phase", "dormant"]);
    assert!(!late.status.success());
    assert!(stderr(&late).contains("still running"), "{}", stderr(&late));
}

#[test]
fn nonexistent_pid_is_exit_2_and_leaves_no_directory() {
    let root = tempfile::tempdir().unwrap();
    // pid_max is at most 2^22; this pid cannot exist.
    let out = trace(4_194_999, root.path(), &["--duration", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no process with pid"),
        "{}",
        stderr(&out)
    );
    assert!(episodes(root.path()).is_empty());
}

#[test]
fn existing_episode_id_is_refused_and_left_untouched() {
    let load = Load::start(&["--spin", "1"]);
    let root = tempfile::tempdir().unwrap();
    let id = "01JD0000000000000000000042";
    let first = trace(
        load.pid(),
        root.path(),
        &["--duration", "0.5", "--backend", "proc", "--episode-id", id],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let dir = episode_dir_from(&first);
    assert!(dir.ends_with(id));
    let before = std::fs::read(dir.join("manifest.json")).unwrap();
    let second = trace(
        load.pid(),
        root.path(),
        &["--duration", "0.5", "--backend", "proc", "--episode-id", id],
    );
    assert_eq!(second.status.code(), Some(2));
    assert!(
        stderr(&second).contains("already exists"),
        "{}",
        stderr(&second)
    );
    assert_eq!(std::fs::read(dir.join("manifest.json")).unwrap(), before);
    let bad = trace(
        load.pid(),
        root.path(),
        &["--duration", "0.5", "--episode-id", "not-a-ulid"],
    );
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn one_khz_reports_missed_ticks_truthfully() {
    let load = Load::start(&["--spin", "2", "--switch", "2"]);
    let root = tempfile::tempdir().unwrap();
    let out = trace(
        load.pid(),
        root.path(),
        &["--duration", "5", "--rate-hz", "1000", "--backend", "proc"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = episode_dir_from(&out);
    let meta = assert_complete_episode(&dir);
    let scheduled = meta["result"]["ticks_scheduled"].as_u64().unwrap();
    let missed = meta["result"]["ticks_missed"].as_u64().unwrap();
    assert_eq!(scheduled, 5000);
    // Whatever the machine managed, the accounting must agree three ways: the gap events,
    // the seqs present in the stream, and meta.result.
    let gaps: u64 = read_jsonl(&dir.join("events.jsonl"))
        .iter()
        .filter(|e| e["event"] == "gap" && e["source"] == "proc")
        .map(|e| e["to_seq"].as_u64().unwrap() - e["from_seq"].as_u64().unwrap() + 1)
        .sum();
    assert_eq!(gaps, missed);
    let seqs: BTreeSet<u64> = read_jsonl(&dir.join("telemetry-proc.jsonl"))
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len() as u64, scheduled - missed);
    assert!(seqs.iter().all(|&s| s < scheduled));
}

/// `meta.result.sampler.policy` and the `sampler_realtime` events of one short capture.
fn sampler_policy(mut cmd: Command, pid: u32, rate: &str, extra: &[&str]) -> (String, Vec<Value>) {
    let root = tempfile::tempdir().unwrap();
    cmd.args(["trace", "--qemu-pid", &pid.to_string(), "--data-root"])
        .arg(root.path())
        .args(["--duration", "0.3", "--backend", "proc", "--rate-hz", rate])
        .args(extra);
    let out = cmd.output().expect("run cis490 trace");
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = episode_dir_from(&out);
    let meta = assert_complete_episode(&dir);
    let events = read_jsonl(&dir.join("events.jsonl"))
        .into_iter()
        .filter(|e| e["event"] == "sampler_realtime")
        .collect();
    let policy = meta["result"]["sampler"]["policy"]
        .as_str()
        .unwrap()
        .to_owned();
    (policy, events)
}

#[test]
fn sampler_is_sched_fifo_at_high_rates_unless_refused_or_opted_out() {
    let load = Load::start(&["--spin", "0", "--switch", "1"]);
    let pid = load.pid();
    // As root: SCHED_FIFO from 100 Hz up by default, and on request at any rate.
    let (policy, events) = sampler_policy(cis490(), pid, "1000", &[]);
    assert_eq!(policy, "SCHED_FIFO");
    assert_eq!(events.len(), 1);
    assert_eq!(
        (&events[0]["ok"], &events[0]["realtime"]),
        (&Value::Bool(true), &Value::from("auto"))
    );
    let (policy, events) = sampler_policy(cis490(), pid, "100", &[]);
    assert_eq!((policy.as_str(), events.len()), ("SCHED_FIFO", 1));
    let (policy, events) = sampler_policy(cis490(), pid, "10", &[]);
    assert_eq!((policy.as_str(), events.len()), ("SCHED_OTHER", 0));
    let (policy, _) = sampler_policy(cis490(), pid, "10", &["--realtime"]);
    assert_eq!(policy, "SCHED_FIFO");
    let (policy, events) = sampler_policy(cis490(), pid, "1000", &["--no-realtime"]);
    assert_eq!((policy.as_str(), events.len()), ("SCHED_OTHER", 0));
    // Without CAP_SYS_NICE (and no RLIMIT_RTPRIO) the capture goes on at normal priority
    // and says so.
    let unprivileged = || {
        let mut c = Command::new("prlimit");
        c.args([
            "--rtprio=0:0",
            "--",
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-sys_nice",
            "--",
        ])
        .arg(cis490_tests::bin("cis490"));
        c
    };
    let (policy, events) = sampler_policy(unprivileged(), pid, "1000", &[]);
    assert_eq!(policy, "SCHED_OTHER");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["ok"], false);
    assert!(events[0]["message"]
        .as_str()
        .unwrap()
        .contains("SCHED_FIFO refused"));
    // Both flags at once is a usage error.
    let root = tempfile::tempdir().unwrap();
    let both = trace(
        pid,
        root.path(),
        &["--duration", "0.3", "--realtime", "--no-realtime"],
    );
    assert_eq!(both.status.code(), Some(2));
}

#[test]
fn bad_arguments_are_usage_errors_before_anything_is_written() {
    let load = Load::start(&["--spin", "1"]);
    let root = tempfile::tempdir().unwrap();
    for rate in ["0", "1001", "abc"] {
        let out = trace(
            load.pid(),
            root.path(),
            &["--rate-hz", rate, "--duration", "1"],
        );
        assert_eq!(out.status.code(), Some(2), "rate {rate}");
    }
    let bad_meta = root.path().join("bad.json");
    std::fs::write(&bad_meta, r#"{"imag_name": "typo"}"#).unwrap();
    let out = trace(
        load.pid(),
        root.path(),
        &["--duration", "1", "--meta", bad_meta.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("imag_name"), "{}", stderr(&out));
    // A data root that cannot hold directories (it is a file): clear error, exit 2.
    let file_root = root.path().join("plain-file");
    std::fs::write(&file_root, b"x").unwrap();
    let out = trace(load.pid(), &file_root, &["--duration", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("data root"), "{}", stderr(&out));
    assert!(episodes(root.path()).is_empty());
}

/// A full disk mid-capture: a clear error, non-zero exit, every row already written
/// still parses, and the episode is not passed off as a clean one.
#[test]
fn disk_full_ends_with_error_and_keeps_earlier_rows() {
    let mnt = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "cis490-test-full"])
        .arg(mnt.path())
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "this test needs root to mount a small tmpfs (CI runs as root)"
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(mnt.path());
    let load = Load::start(&["--spin", "2", "--switch", "4"]);
    let out = trace(
        load.pid(),
        mnt.path(),
        &["--duration", "20", "--rate-hz", "1000", "--backend", "proc"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("No space left"), "{}", stderr(&out));
    let dirs = episodes(mnt.path());
    assert_eq!(dirs.len(), 1);
    let dir = &dirs[0];
    let text = std::fs::read_to_string(dir.join("telemetry-proc.jsonl")).unwrap();
    let complete: Vec<&str> = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .collect();
    assert!(
        complete.len() > 100,
        "earlier rows lost: only {} lines",
        complete.len()
    );
    for l in complete {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
    if dir.join("done.marker").exists() {
        assert_eq!(
            read_json(&dir.join("meta.json"))["result"]["end_reason"],
            "error"
        );
    }
}

#[test]
fn zstd_streams_decode_to_the_rows_the_manifest_counts() {
    let load = Load::start(&["--spin", "1", "--switch", "1"]);
    let root = tempfile::tempdir().unwrap();
    let out = trace(
        load.pid(),
        root.path(),
        &[
            "--duration",
            "1.5",
            "--rate-hz",
            "100",
            "--backend",
            "proc",
            "--compress",
            "zstd",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = episode_dir_from(&out);
    let meta = read_json(&dir.join("meta.json"));
    assert_eq!(meta["sources"][0]["file"], "telemetry-proc.jsonl.zst");
    let raw = std::fs::read(dir.join("telemetry-proc.jsonl.zst")).unwrap();
    let manifest = read_json(&dir.join("manifest.json"));
    let entry = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "telemetry-proc.jsonl.zst")
        .expect("listed");
    assert_eq!(entry["sha256"].as_str().unwrap(), sha256_hex(&raw));
    assert_eq!(entry["bytes"].as_u64().unwrap(), raw.len() as u64);
    let text = String::from_utf8(zstd::stream::decode_all(&raw[..]).unwrap()).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entry["lines"].as_u64().unwrap(), rows.len() as u64);
    assert_eq!(
        meta["sources"][0]["rows"].as_u64().unwrap(),
        rows.len() as u64
    );
    // 4 threads + 1 total per tick, 150 ticks (some may be missed on a busy machine).
    assert!(rows.len() >= 400, "{} rows", rows.len());
    let v = cis490().arg("validate").arg(&dir).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    // A flipped byte inside the compressed stream is caught.
    let mut bad = raw.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(dir.join("telemetry-proc.jsonl.zst"), &bad).unwrap();
    let v = cis490().arg("validate").arg(&dir).output().unwrap();
    assert!(!v.status.success());
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("sha256 mismatch"),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
}

/// `--rows changed`, on both backends: the busy thread has a row at every tick, the
/// sleeping ones only when a value changed or a second passed, no written row repeats
/// the previous one of its thread within a second (so nothing but a repeat is left out:
/// the filter's unit tests in collector.rs show what is kept).
#[test]
fn rows_changed_leaves_out_only_repeats_and_writes_each_thread_every_second() {
    // 10 threads: 1 busy, 9 sleeping 100 ms at a time.
    let load = Load::start(&["--spin", "1", "--switch", "0", "--threads", "10"]);
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    for backend in ["proc", "bpf"] {
        let root = tempfile::tempdir().unwrap();
        let out = trace(
            load.pid(),
            root.path(),
            &[
                "--backend",
                backend,
                "--duration",
                "3",
                "--rate-hz",
                "100",
                "--rows",
                "changed",
            ],
        );
        if !out.status.success() && backend == "bpf" && !ci {
            eprintln!(
                "bpf unavailable here: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = episode_dir_from(&out);
        let file = if backend == "bpf" {
            "telemetry-bpf-sched.jsonl"
        } else {
            "telemetry-proc.jsonl"
        };
        let rows = read_jsonl(&dir.join(file));
        let meta = read_json(&dir.join("meta.json"));
        let src = meta["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["file"] == file)
            .unwrap();
        assert_eq!(src["rows_mode"], "changed", "{src}");
        let ticks: BTreeSet<u64> = rows
            .iter()
            .filter(|r| r["tid"].is_null())
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        let mut by_tid: HashMap<u64, Vec<&Value>> = HashMap::new();
        for r in rows.iter().filter(|r| !r["tid"].is_null()) {
            by_tid
                .entry(r["tid"].as_u64().unwrap())
                .or_default()
                .push(r);
        }
        assert_eq!(by_tid.len(), 10, "{backend}: threads {:?}", by_tid.keys());
        let strip = |r: &Value| {
            let mut m = r.as_object().unwrap().clone();
            for k in ["t_mono_ns", "t_wall_ns", "seq"] {
                m.remove(k);
            }
            m
        };
        let mut sparse = 0;
        for (tid, rs) in &by_tid {
            for w in rs.windows(2) {
                let dt = w[1]["t_mono_ns"].as_u64().unwrap() - w[0]["t_mono_ns"].as_u64().unwrap();
                assert!(
                    dt <= 1_000_000_000 + 20_000_000,
                    "{backend} tid {tid}: {dt} ns without a row"
                );
                assert!(
                    strip(w[0]) != strip(w[1]) || dt >= 1_000_000_000,
                    "{backend} tid {tid}: a repeated row {} ns after the last",
                    dt
                );
            }
            if rs.len() * 2 < ticks.len() {
                sparse += 1;
            }
        }
        // The sleepers wake 10 times a second: far fewer rows than ticks.
        assert!(sparse >= 8, "{backend}: only {sparse} threads had few rows");
        assert!(src["rows_unchanged_skipped"].as_u64().unwrap() > 0, "{src}");
        // The busy thread changes at every tick, so it has a row at (nearly) every one.
        let busiest = by_tid.values().map(Vec::len).max().unwrap();
        assert!(
            busiest * 100 >= ticks.len() * 95,
            "{backend}: the busy thread has {busiest} rows in {} ticks",
            ticks.len()
        );
        let v = cis490().arg("validate").arg(&dir).output().unwrap();
        assert!(
            v.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&v.stdout)
        );
    }
}
