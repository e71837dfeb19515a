//! The BPF backend against the real kernel (CI runs as root on a kernel with BTF, so
//! these load and attach real programs): accuracy against /proc schedstat, status and
//! io, exact syscall byte counts, a veth pair in a network namespace, fallback without
//! capabilities, threads created after attach, a target that exits mid-capture, the
//! kernel timer's 1 kHz schedule, and a stalled capture that overflows the ring.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use cis490_tests::clock::mono_raw_ns as mono_ns;
use cis490_tests::{cis490, cis490_path, has_source_error};

fn testtarget() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cis490-bpf-testtarget"))
}

/// A target process driven through stdin/stdout; killed when dropped.
struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<std::process::ChildStdout>,
}

impl Target {
    fn start(args: &[&str]) -> Self {
        let mut child = testtarget()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn test target");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdin, out }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.read_line(&mut s).expect("target stdout");
        s.trim().to_owned()
    }
    fn send(&mut self, s: &str) {
        let w = self.stdin.as_mut().unwrap();
        writeln!(w, "{s}").unwrap();
        w.flush().unwrap();
    }
    /// A `burst N` target: start its threads now and return their tids.
    fn burst(&mut self) -> Vec<u64> {
        self.send("go");
        let line = self.line();
        assert!(line.starts_with("burst"), "{line}");
        line.split(' ')
            .skip(1)
            .map(|s| s.parse().unwrap())
            .collect()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `cis490 trace`.
struct Capture {
    child: Child,
    data: tempfile::TempDir,
}

impl Capture {
    fn start(pid: u32, extra: &[&str]) -> Self {
        Self::start_with(cis490(), pid, extra)
    }
    fn start_with(mut cmd: Command, pid: u32, extra: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let child = cmd
            .args(["trace", "--qemu-pid", &pid.to_string(), "--data-root"])
            .arg(data.path())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cis490");
        Self { child, data }
    }
    fn episode_dir(&self) -> Option<PathBuf> {
        let dir = self.data.path().join("episodes");
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .next()
            .map(|e| e.path())
    }
    /// Wait until `file` of the episode has at least one row (the programs are attached
    /// before the first row is written).
    fn wait_rows(&self, file: &str) -> PathBuf {
        let t0 = Instant::now();
        loop {
            if let Some(d) = self.episode_dir() {
                if std::fs::read_to_string(d.join(file)).is_ok_and(|s| s.contains('\n')) {
                    return d;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no rows in {file} after 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn finish(mut self) -> (std::process::Output, tempfile::TempDir) {
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        (out, self.data)
    }
}

fn rows(dir: &Path, file: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn meta(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap()
}

fn single_episode(data: &Path) -> PathBuf {
    let eps: Vec<_> = std::fs::read_dir(data.join("episodes"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(eps.len(), 1);
    eps[0].path()
}

fn assert_complete_bpf(dir: &Path, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "cis490 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("done.marker").exists());
    let m = meta(dir);
    assert_eq!(m["backend"]["used"], "bpf", "{}", m["backend"]);
    assert!(m["backend"]["fallback_reason"].is_null());
    // The programs were loaded by the `__bpf-loader` helper process, which exited before
    // sampling began: every count these tests check comes through the fds it handed over.
    let events = rows(dir, "events.jsonl");
    let sel = events
        .iter()
        .find(|e| e["event"] == "backend_selected")
        .expect("backend_selected event");
    let loader = &sel["bpf_loader"];
    let pid = loader["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no bpf_loader report: {sel}"));
    assert!(loader["peak_rss_kib"].as_u64().unwrap() > 0, "{loader}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| !c.contains("__bpf-loader")),
        "the loader process {pid} is still running"
    );
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn thread_rows(rows: &[Value], tid: u32) -> Vec<&Value> {
    rows.iter().filter(|r| r["tid"] == tid).collect()
}

fn schedstat_on_cpu(pid: u32, tid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Linear interpolation of (t, v) samples at time `t`.
fn interpolate(samples: &[(u64, u64)], t: u64) -> f64 {
    let i = samples.partition_point(|s| s.0 <= t);
    assert!(i > 0 && i < samples.len(), "t outside the sampled window");
    let (t0, v0) = samples[i - 1];
    let (t1, v1) = samples[i];
    v0 as f64 + (v1 as f64 - v0 as f64) * (t - t0) as f64 / (t1 - t0).max(1) as f64
}

#[test]
fn on_cpu_matches_schedstat_within_2_percent() {
    let mut target = Target::start(&["spin", "2"]);
    let line = target.line();
    let tids: Vec<u32> = line
        .strip_prefix("tids ")
        .unwrap()
        .split(' ')
        .map(|s| s.parse().unwrap())
        .collect();
    let pid = target.pid();
    let cap = Capture::start(
        pid,
        &["--backend", "bpf", "--duration", "3", "--rate-hz", "100"],
    );
    // Ground truth sampled alongside: (CLOCK_MONOTONIC, schedstat on-CPU ns) per thread.
    let mut truth: Vec<Vec<(u64, u64)>> = vec![Vec::new(); tids.len()];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        for (i, tid) in tids.iter().enumerate() {
            let before = mono_ns();
            if let Some(v) = schedstat_on_cpu(pid, *tid) {
                let after = mono_ns();
                truth[i].push((before / 2 + after / 2, v));
            }
        }
        if cap
            .episode_dir()
            .is_some_and(|d| d.join("done.marker").exists())
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let origin = u(&meta(&dir)["clock"], "mono_origin_ns");
    let sched = rows(&dir, "telemetry-bpf-sched.jsonl");
    for (i, tid) in tids.iter().enumerate() {
        let r = thread_rows(&sched, *tid);
        assert!(
            r.len() > 150,
            "tid {tid}: only {} rows at 100 Hz over 3 s",
            r.len()
        );
        // Window: from 0.3 s in (attach settled) to the last row.
        let first = r.iter().find(|x| u(x, "t_mono_ns") > 300_000_000).unwrap();
        let last = r.last().unwrap();
        let (ta, tb) = (
            origin + u(first, "t_mono_ns"),
            origin + u(last, "t_mono_ns"),
        );
        let bpf_delta = (u(last, "on_cpu_ns") - u(first, "on_cpu_ns")) as f64;
        let proc_delta = interpolate(&truth[i], tb) - interpolate(&truth[i], ta);
        assert!(
            proc_delta > 2e8,
            "tid {tid} ran only {proc_delta} ns: machine too busy to measure"
        );
        let err = (bpf_delta - proc_delta).abs() / proc_delta;
        eprintln!(
            "tid {tid}: bpf {bpf_delta:.0} ns, schedstat {proc_delta:.0} ns, error {:.3}%",
            err * 100.0
        );
        assert!(
            err < 0.02,
            "tid {tid}: bpf {bpf_delta} vs schedstat {proc_delta} ({:.2}%)",
            err * 100.0
        );
        // Per-thread counters never decrease.
        // Without --bpf-wakeups on a kernel without schedstats the column is null, not 0.
        if meta(&dir)["sources"][0]["wakeups"] == "not_counted" {
            assert!(r.iter().all(|x| x["wakeups"].is_null()), "{}", r[0]);
        }
        for w in r.windows(2) {
            for k in [
                "on_cpu_ns",
                "involuntary_switches",
                "runqueue_wait_ns",
                "timeslices_count",
            ] {
                assert!(u(w[1], k) >= u(w[0], k), "{k} decreased for tid {tid}");
            }
        }
    }
    // The process-total row of each tick (tid null) is at least the sum of its threads.
    let last_seq = sched.last().unwrap()["seq"].clone();
    let last: Vec<&Value> = sched.iter().filter(|r| r["seq"] == last_seq).collect();
    let total = last
        .iter()
        .find(|r| r["tid"].is_null())
        .expect("process row");
    let sum: u64 = last
        .iter()
        .filter(|r| !r["tid"].is_null())
        .map(|r| u(r, "on_cpu_ns"))
        .sum();
    assert_eq!(u(total, "on_cpu_ns"), sum);
    assert_eq!(total["source"], "bpf-sched");
    assert_eq!(total["available_in_deployment"], false);
}

#[test]
fn read_write_bytes_are_exact() {
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("io.bin");
    let mut target = Target::start(&["io", file.to_str().unwrap()]);
    assert_eq!(target.line(), "ready");
    let cap = Capture::start(
        target.pid(),
        &["--backend", "bpf", "--duration", "3", "--rate-hz", "20"],
    );
    cap.wait_rows("telemetry-bpf-io.jsonl");
    target.send("go");
    let done = target.line();
    let f: Vec<u64> = done
        .split(' ')
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (tid, wb, wo, rb, ro) = (f[0] as u32, f[1], f[2], f[3], f[4]);
    assert_eq!(wb, 100_000 + 12_345);
    assert_eq!(rb, 60_000 + 7_000);
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let io = rows(&dir, "telemetry-bpf-io.jsonl");
    // The I/O thread lived a few ms, between two 50 ms snapshots: its counters at exit
    // come in its final record. It was created after attach, and the kernel's per-task
    // accounting starts at 0 for a new thread: exactly its own syscalls.
    let r = thread_rows(&io, tid);
    let last = r
        .last()
        .unwrap_or_else(|| panic!("no bpf-io rows for the I/O thread {tid}"));
    assert_eq!(u(last, "wchar"), wb);
    assert_eq!(u(last, "syscw"), wo);
    assert_eq!(
        u(last, "rchar"),
        rb,
        "the 0-byte pread at EOF adds no bytes"
    );
    assert_eq!(
        u(last, "syscr"),
        ro + 1,
        "the kernel counts the 0-byte pread at EOF as a read call"
    );
    // The process total from before "go" to the end also has the main thread's "go\n"
    // read and "done ...\n" write (the totals include what the threads did before
    // attach, so compare differences).
    let totals: Vec<&Value> = io.iter().filter(|r| r["tid"].is_null()).collect();
    let (first, end) = (totals[0], totals[totals.len() - 1]);
    assert_eq!(
        u(end, "wchar") - u(first, "wchar"),
        wb + done.len() as u64 + 1
    );
    assert_eq!(u(end, "rchar") - u(first, "rchar"), rb + 3);
    assert!(io.iter().all(|r| r["source"] == "bpf-io"));
}

/// Threads created in a burst from two CPUs at once (their slot claims race) each get a
/// row in every snapshot from their first on: the snapshot lists only the slots below
/// the claimers' bound (plus a margin), and a raise lost to the race must not hide one.
#[test]
fn threads_created_in_a_racing_burst_are_in_every_snapshot_after_their_first() {
    let mut target = Target::start(&["burst", "300"]);
    assert_eq!(target.line(), "ready");
    let cap = Capture::start(
        target.pid(),
        &["--backend", "bpf", "--rate-hz", "200", "--duration", "2.5"],
    );
    cap.wait_rows("telemetry-bpf-sched.jsonl");
    let burst = target.burst();
    assert_eq!(burst.len(), 300);
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let sched = rows(&dir, "telemetry-bpf-sched.jsonl");
    let mut seqs: std::collections::HashMap<u64, Vec<u64>> = std::collections::HashMap::new();
    for r in &sched {
        if let Some(t) = r["tid"].as_u64() {
            seqs.entry(t).or_default().push(u(r, "seq"));
        }
    }
    // Seqs that have a process row: the snapshots that ran (missed ones, and ones that
    // lost records to a full ring buffer, are gaps without rows).
    let ran: std::collections::BTreeSet<u64> = sched
        .iter()
        .filter(|r| r["tid"].is_null())
        .map(|r| u(r, "seq"))
        .collect();
    let last = *ran.iter().next_back().unwrap();
    for t in &burst {
        let s = seqs
            .get(t)
            .unwrap_or_else(|| panic!("burst thread {t} never reported"));
        let first = s[0];
        let have: std::collections::HashSet<u64> = s.iter().copied().collect();
        let missing: Vec<u64> = ran
            .range(first..=last)
            .filter(|q| !have.contains(q))
            .copied()
            .collect();
        assert!(
            missing.is_empty(),
            "thread {t}: first row at seq {first}, then missing from {} snapshots (first {:?})",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
    validate(&dir);
}

#[test]
fn threads_created_after_attach_are_counted_and_kept_in_the_total() {
    let mut target = Target::start(&["late"]);
    assert_eq!(target.line(), "ready");
    // No --duration: the threads spin a fixed amount of CPU, which takes longer on a
    // loaded machine; the capture is ended (SIGINT) once they have been joined.
    let cap = Capture::start(
        target.pid(),
        &["--backend", "bpf", "--rate-hz", "50", "--bpf-wakeups"],
    );
    cap.wait_rows("telemetry-bpf-sched.jsonl");
    target.send("go");
    let line = target.line();
    let late: Vec<u32> = line
        .split(' ')
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    // Long enough for their final records to be drained while the capture runs.
    std::thread::sleep(Duration::from_millis(400));
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(cap.child.id() as i32, libc::SIGINT) };
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let sched = rows(&dir, "telemetry-bpf-sched.jsonl");
    let mut late_final = 0;
    for tid in &late {
        let r = thread_rows(&sched, *tid);
        let last = r
            .last()
            .unwrap_or_else(|| panic!("late thread {tid} never reported"));
        let on = u(last, "on_cpu_ns");
        // Each spun 300 ms of its own CPU time, all of it after attach.
        assert!(on >= 280_000_000, "late thread {tid} on_cpu_ns {on}");
        assert!(
            u(last, "wakeups") >= 1,
            "wakeup_new of {tid} not counted: {last}"
        );
        // Each of them: one row per snapshot while it lived, the last its exit record.
        assert!(r.len() >= 5, "late thread {tid}: {} rows", r.len());
        late_final += on;
    }
    // They exited: their rows stop, the process total keeps them and never decreases.
    let totals: Vec<&Value> = sched.iter().filter(|r| r["tid"].is_null()).collect();
    for w in totals.windows(2) {
        assert!(
            u(w[1], "on_cpu_ns") >= u(w[0], "on_cpu_ns"),
            "process total decreased"
        );
        assert!(u(w[1], "voluntary_switches") >= u(w[0], "voluntary_switches"));
    }
    let last_total = totals.last().unwrap();
    assert!(u(last_total, "on_cpu_ns") >= late_final);
    let last_seq = last_total["seq"].clone();
    assert!(
        !sched.iter().any(
            |r| r["seq"] == last_seq && late.contains(&(r["tid"].as_u64().unwrap_or(0) as u32))
        ),
        "exited threads still reported at the end"
    );
}

/// /proc/<pid>/task/<tid>/<file> as whitespace-separated numbers (schedstat) or
/// `key: value` lines (status, io), as (key, value) pairs.
fn proc_numbers(pid: u32, tid: u32, file: &str) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/{file}")).unwrap();
    if file == "schedstat" {
        return text
            .split_whitespace()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v.parse().unwrap()))
            .collect();
    }
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

fn proc_value(pairs: &[(String, u64)], key: &str) -> u64 {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("{key} missing"))
        .1
}

#[test]
fn an_idle_threads_counters_equal_proc_exactly() {
    // The main thread of `spin 1` blocks on stdin for both captures: its kernel counters
    // do not move, so the snapshot and /proc must agree to the unit, column by column.
    let mut target = Target::start(&["spin", "1"]);
    target.line();
    let pid = target.pid();
    let capture = |backend: &str| {
        let cap = Capture::start(
            pid,
            &["--backend", backend, "--duration", "1", "--rate-hz", "100"],
        );
        let (out, data) = cap.finish();
        let dir = single_episode(data.path());
        (out, data, dir)
    };
    let (out, _bpf_data, dir) = capture("bpf");
    assert_complete_bpf(&dir, &out);
    let sched = rows(&dir, "telemetry-bpf-sched.jsonl");
    let io = rows(&dir, "telemetry-bpf-io.jsonl");
    let s = *thread_rows(&sched, pid).last().expect("main thread row");
    let i = *thread_rows(&io, pid).last().expect("main thread io row");
    let (pout, _proc_data, pdir) = capture("proc");
    assert!(
        pout.status.success(),
        "{}",
        String::from_utf8_lossy(&pout.stderr)
    );
    let prows = rows(&pdir, "telemetry-proc.jsonl");
    let p = *thread_rows(&prows, pid)
        .last()
        .expect("proc main thread row");

    // The bpf thread's columns: bpf-sched and bpf-io together.
    let mut bpf = s.as_object().unwrap().clone();
    for (k, v) in i.as_object().unwrap() {
        bpf.entry(k.clone()).or_insert(v.clone());
    }
    // Stamps and stream identity differ by construction.
    let not_values = [
        "t_mono_ns",
        "t_wall_ns",
        "seq",
        "source",
        "stream",
        "backend",
    ];
    let mut compared = Vec::new();
    for (k, pv) in p.as_object().unwrap() {
        if not_values.contains(&k.as_str()) {
            continue;
        }
        let Some(bv) = bpf.get(k) else {
            continue;
        };
        assert_eq!(bv, pv, "column {k}: bpf {s} / {i}, proc {p}");
        compared.push(k.clone());
    }
    for k in [
        "on_cpu_ns",
        "runqueue_wait_ns",
        "timeslices_count",
        "voluntary_switches",
        "involuntary_switches",
        "minflt",
        "majflt",
        "utime_ticks",
        "stime_ticks",
        "state",
        "last_cpu",
        "num_threads",
        "rss_kb",
        "vsize_bytes",
        "rchar",
        "cancelled_write_bytes",
    ] {
        assert!(
            compared.iter().any(|c| c == k),
            "{k} not in both: {compared:?}"
        );
    }
    assert_eq!(s["state"], "S", "blocked on stdin: {s}");
    // And against /proc's files directly (the idle thread's schedstat is exact).
    let schedstat = proc_numbers(pid, pid, "schedstat");
    assert_eq!(u(s, "on_cpu_ns"), proc_value(&schedstat, "0"), "{s}");
    assert_eq!(u(s, "runqueue_wait_ns"), proc_value(&schedstat, "1"), "{s}");
}

/// The process row's rss_kb and vsize_bytes (bpf-sched), read by the snapshot through the
/// target's `mm`: vsize equal to /proc's, rss_kb within the per-CPU batch of VmRSS, for an
/// idle process, and both following it when it grows by 64 MiB during the capture.
#[test]
fn the_process_rows_memory_matches_proc_and_follows_growth() {
    let mut target = Target::start(&["mem"]);
    assert_eq!(target.line(), "ready");
    let pid = target.pid();
    let cap = Capture::start(
        pid,
        &["--backend", "bpf", "--duration", "3", "--rate-hz", "100"],
    );
    // Grow only once the capture has written its first rows (a slow start-up on a
    // loaded machine would otherwise see only the grown process).
    cap.wait_rows("telemetry-bpf-sched.jsonl");
    target.send("grow 64");
    assert_eq!(target.line(), "grown");
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    // Read after the capture: the target has been idle since it grew.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_rss: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // Field 23 (vsize) is the 21st after the comm's closing parenthesis.
    let vsize: u64 = fields[20].parse().unwrap();
    let sched = rows(&dir, "telemetry-bpf-sched.jsonl");
    let process: Vec<&Value> = sched.iter().filter(|r| r["tid"].is_null()).collect();
    let (first, last) = (process[0], *process.last().unwrap());
    // rss_kb is the kernel's global count of each rss_stat counter (percpu_counter.count);
    // /proc's VmRSS also adds the per-CPU deltas not yet folded into it, each below the
    // counter's batch (32 pages): within 3 counters x CPUs x 32 pages, never exact by
    // luck alone (docs/data-model.md).
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let page_kb = 4;
    let bound = 3 * cpus * 32 * page_kb;
    let rss = u(last, "rss_kb");
    assert!(
        rss.abs_diff(vm_rss) <= bound,
        "rss_kb {rss} vs VmRSS {vm_rss} kB: more than the per-CPU batch bound {bound} kB apart; last row {last}"
    );
    assert_eq!(
        u(last, "vsize_bytes"),
        vsize,
        "vsize {vsize}, last row {last}"
    );
    // Both ends carry the same per-CPU slack, so the growth is seen within one bound of
    // 64 MiB, not exactly (CI saw 65,408 kB of 65,536: 128 kB still in per-CPU deltas).
    let grown = u(last, "rss_kb").saturating_sub(u(first, "rss_kb"));
    assert!(
        grown + bound >= 64 * 1024,
        "64 MiB touched, {grown} kB seen (bound {bound} kB): first {first}, last {last}"
    );
    assert!(u(last, "vsize_bytes") >= u(first, "vsize_bytes") + (64 << 20));
    // Thread rows carry no process columns, as in proc.
    assert!(sched
        .iter()
        .filter(|r| !r["tid"].is_null())
        .all(|r| r["rss_kb"].is_null() && r["vsize_bytes"].is_null()));
    validate(&dir);
}

/// One sample of the spinner's own counters, as the kernel gives them to the running
/// thread itself: (CLOCK_MONOTONIC ns, CLOCK_THREAD_CPUTIME_ID ns, schedstat run_delay ns).
type Truth = (u64, u64, u64);

/// The spinner's samples just before and just after `t`.
fn bracket(truth: &[Truth], t: u64) -> (Truth, Truth) {
    let i = truth.partition_point(|s| s.0 <= t);
    assert!(
        i > 0 && i < truth.len(),
        "t {t} outside the spinner's samples"
    );
    (truth[i - 1], truth[i])
}

/// Time in `a..b` in which the spinner neither ran nor waited on a run queue: its vCPU was
/// taken by the host (steal time, which the kernel takes out of a thread's runtime). From
/// the samples bracketing the window, so it may include up to two ~20 µs sample gaps.
fn stolen(truth: &[Truth], a: u64, b: u64) -> u64 {
    let (s, _) = bracket(truth, a);
    let (_, e) = bracket(truth, b);
    (e.0 - s.0).saturating_sub((e.1 - s.1) + (e.2 - s.2))
}

/// The spinner's on-CPU time at `t`, interpolated between the bracketing samples.
fn truth_on_cpu(truth: &[Truth], t: u64) -> f64 {
    let (s, e) = bracket(truth, t);
    s.1 as f64 + (e.1 - s.1) as f64 * (t - s.0) as f64 / (e.0 - s.0).max(1) as f64
}

/// One thread spinning on its own core, traced at `rate_hz`, checked against the thread's
/// own exact counters (the spinner samples CLOCK_THREAD_CPUTIME_ID and its run_delay every
/// ~20 µs, see bpf_testtarget.rs):
/// - every snapshot's on_cpu_ns and runqueue_wait_ns lie between the spinner's samples
///   around the snapshot's instant, on_cpu_ns above it by no more than the steal time of
///   the kernel ticks before it (docs/bpf-backend.md, "Limits");
/// - in the ticks the thread ran through without steal, the per-tick on-CPU delta is one
///   interval (`lo`..`hi` ns at p5 and p95) and never 0: the staircase is gone;
/// - the total over the run is within 0.5 % of /proc's schedstat.
fn spinner_is_exact_at_every_tick(rate_hz: u32, lo: u64, hi: u64) {
    let mut target = Target::start(&["spin-truth"]);
    let tid: u32 = target
        .line()
        .strip_prefix("tids ")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = target.pid();
    // The CI machine gives the spinner a core of its own; on a shared machine (other
    // builds running) nice −20 gets it close to that: the test is about the snapshot,
    // not about the machine's other load.
    // SAFETY: setpriority on a thread id of our own child, no pointers.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -20) };
    let rate = rate_hz.to_string();
    let cap = Capture::start(
        pid,
        &["--backend", "bpf", "--duration", "3", "--rate-hz", &rate],
    );
    let mut schedstat: Vec<(u64, u64)> = Vec::new();
    let t0 = Instant::now();
    let mut done = false;
    while t0.elapsed() < Duration::from_secs(60) {
        let before = mono_ns();
        if let Some(v) = schedstat_on_cpu(pid, tid) {
            schedstat.push((before / 2 + mono_ns() / 2, v));
        }
        if done {
            break; // one sample after the capture ended, so it brackets every row
        }
        done = cap
            .episode_dir()
            .is_some_and(|d| d.join("done.marker").exists());
        std::thread::sleep(Duration::from_millis(2));
    }
    let truth_file = tempfile::NamedTempFile::new().unwrap();
    target.send(&format!("dump {}", truth_file.path().display()));
    assert_eq!(target.line(), "dumped");
    let truth: Vec<Truth> = std::fs::read_to_string(truth_file.path())
        .unwrap()
        .lines()
        .map(|l| {
            let v: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1], v[2])
        })
        .collect();
    let (out, data) = cap.finish();
    assert!(
        data.path().join("episodes").exists(),
        "no episode: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let origin = u(&meta(&dir)["clock"], "mono_origin_ns");
    let sched = rows(&dir, "telemetry-bpf-sched.jsonl");
    let at = |x: &Value| origin + u(x, "t_mono_ns");
    // From 0.3 s in (attach settled) to the end.
    let r: Vec<&Value> = thread_rows(&sched, tid)
        .into_iter()
        .filter(|x| u(x, "t_mono_ns") > 300_000_000)
        .collect();
    assert!(
        truth[0].0 < at(r[0]) && truth.last().unwrap().0 > at(r[r.len() - 1]),
        "the spinner's samples do not cover the rows"
    );

    // 1. Every row against the spinner's own counters at its instant. The kernel takes
    // steal time out of a running thread's runtime at its next update; until then the
    // snapshot counts it as running, and the never-decrease clamp holds the excess until
    // the thread has run it off: the excess is bounded by the steal time of the last few
    // kernel ticks (30 ms covers 3 ticks at CONFIG_HZ 100 and up). Slack: a sample's
    // instant is the middle of reads at most 10 µs apart, so 20 µs above; 50 µs below,
    // where single rows have been seen up to 18 µs short (not explained; far from the
    // 1–4 ms a stale counter gives).
    let slack = 20_000u64;
    let slack_under = 50_000u64;
    let recent = 30_000_000u64;
    let mut worst_over = 0i64;
    let mut worst_under = 0i64;
    let mut outside: Vec<String> = Vec::new();
    let overs: Vec<i64> = r
        .iter()
        .map(|x| u(x, "on_cpu_ns") as i64 - truth_on_cpu(&truth, at(x)) as i64)
        .collect();
    for (i, x) in r.iter().enumerate() {
        let t = at(x);
        let (s, e) = bracket(&truth, t);
        let on = u(x, "on_cpu_ns");
        let allowed = stolen(&truth, t.saturating_sub(recent).max(truth[0].0), t);
        let over = on as i64 - e.1 as i64;
        let under = s.1 as i64 - on as i64;
        worst_over = worst_over.max(over);
        worst_under = worst_under.max(under);
        let wait = u(x, "runqueue_wait_ns");
        if on + slack_under < s.1
            || on > e.1 + allowed + slack
            || wait + slack_under < s.2
            || wait > e.2 + slack
        {
            outside.push(format!(
                "{x}: spinner before {s:?}, after {e:?}, steal in the last 30 ms {allowed} ns; \
                 on_cpu minus the spinner's, rows {}..{}: {:?}",
                i.saturating_sub(6),
                i + 4,
                &overs[i.saturating_sub(6)..(i + 4).min(overs.len())]
            ));
        }
    }

    // 2. Per tick, in the ticks the spinner ran through (ran ≥ 98 % of the interval by its
    // own clock) with no steal since 12 ms before the tick began (the kernel subtracts
    // steal at its next tick on that CPU: ≤ 10 ms at CONFIG_HZ 100, 4 ms here).
    let pairs: Vec<(&Value, &Value)> = r
        .windows(2)
        .filter(|w| u(w[1], "seq") == u(w[0], "seq") + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    let mut clean: Vec<u64> = Vec::new();
    let mut all: Vec<u64> = Vec::new();
    for (a, b) in &pairs {
        let (ta, tb) = (at(a), at(b));
        let d = u(b, "on_cpu_ns") - u(a, "on_cpu_ns");
        all.push(d);
        let ran = truth_on_cpu(&truth, tb) - truth_on_cpu(&truth, ta);
        let from = ta.saturating_sub(12_000_000).max(truth[0].0);
        if ran >= 0.98 * (tb - ta) as f64 && stolen(&truth, from, tb) < 2 * slack {
            clean.push(d);
        }
    }
    let total_stolen = stolen(&truth, at(r[0]), at(r[r.len() - 1]));
    clean.sort_unstable();
    all.sort_unstable();
    let pct = |v: &[u64], q: f64| v[((v.len().max(1) - 1) as f64 * q) as usize];
    let zeros = |v: &[u64]| v.iter().filter(|d| **d == 0).count();

    // 3. The total, against /proc at two of its own samples, one early and one late: of
    // each quarter of the run the sample closest to a snapshot, where the snapshots'
    // series (exact at each snapshot) is interpolated over the least time.
    let bpf_series: Vec<(u64, u64)> = r.iter().map(|x| (at(x), u(x, "on_cpu_ns"))).collect();
    let (t_first, t_last) = (bpf_series[0].0, bpf_series.last().unwrap().0);
    let to_snapshot = |t: u64| {
        let i = bpf_series.partition_point(|s| s.0 <= t);
        (t - bpf_series[i - 1].0).min(bpf_series[i].0 - t)
    };
    let inside: Vec<(u64, u64)> = schedstat
        .iter()
        .copied()
        .filter(|(t, _)| *t > t_first && *t < t_last)
        .collect();
    assert!(
        inside.len() > 8,
        "{} /proc samples in the run",
        inside.len()
    );
    let quarter = inside.len() / 4;
    let best = |s: &[(u64, u64)]| *s.iter().min_by_key(|(t, _)| to_snapshot(*t)).unwrap();
    let (ta, va) = best(&inside[..quarter]);
    let (tb, vb) = best(&inside[inside.len() - quarter..]);
    let bpf_delta = interpolate(&bpf_series, tb) - interpolate(&bpf_series, ta);
    let proc_delta = (vb - va) as f64;
    assert!(
        proc_delta > 2e8,
        "the spinner ran only {proc_delta} ns between the samples: machine too busy"
    );
    let err = (bpf_delta - proc_delta).abs() / proc_delta;

    eprintln!(
        "{rate_hz} Hz: {} rows, {} outside the spinner's bracket; on_cpu above the later \
         sample by at most {worst_over} ns, below the earlier by at most {worst_under} ns; \
         steal over the run {total_stolen} ns. {} of {} ticks ran through without steal: \
         on_cpu delta p5 {} p50 {} p95 {} ns, {} zero; all ticks p5 {} p50 {} p95 {} ns, {} zero; \
         total bpf {bpf_delta:.0} vs schedstat {proc_delta:.0} ns ({:.3} %)",
        r.len(),
        outside.len(),
        clean.len(),
        pairs.len(),
        pct(&clean, 0.05),
        pct(&clean, 0.5),
        pct(&clean, 0.95),
        zeros(&clean),
        pct(&all, 0.05),
        pct(&all, 0.5),
        pct(&all, 0.95),
        zeros(&all),
        err * 100.0
    );
    assert!(
        outside.is_empty(),
        "{} of {} rows outside the spinner's own counters: {:#?}",
        outside.len(),
        r.len(),
        &outside[..outside.len().min(3)]
    );
    assert!(err < 0.005, "total off by {:.3} %", err * 100.0);
    // Judged when the spinner ran through at least a tenth of the ticks (and 20) without
    // steal. Under CI the spinner has its core, so fewer is a failure that says so; on a
    // shared development machine it is said, and the checks above still hold.
    let judged = clean.len() * 10 >= pairs.len() && clean.len() >= 20;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        judged || !ci,
        "the spinner ran through only {} of {} ticks without steal (steal over the run \
         {total_stolen} ns): machine too busy to judge per-tick deltas",
        clean.len(),
        pairs.len()
    );
    if !judged {
        eprintln!("per-tick deltas not judged: too few clean ticks (shared machine)");
        return;
    }
    assert_eq!(
        zeros(&clean),
        0,
        "ticks with no on-CPU time for a thread that ran through them"
    );
    assert!(
        pct(&clean, 0.05) >= lo && pct(&clean, 0.95) <= hi,
        "p5 {} / p95 {} ns outside {lo}..{hi}",
        pct(&clean, 0.05),
        pct(&clean, 0.95)
    );
}

#[test]
fn a_spinning_threads_on_cpu_is_exact_at_every_tick_at_1khz() {
    spinner_is_exact_at_every_tick(1000, 800_000, 1_200_000);
}

#[test]
fn a_spinning_threads_on_cpu_is_exact_at_every_tick_at_100hz() {
    spinner_is_exact_at_every_tick(100, 9_000_000, 11_000_000);
}

/// Every seq of `file` from 0 to ticks_scheduled - 1 is either in a row or in a `gap`
/// event of its source.
fn assert_seq_complete(dir: &Path, file: &str, source: &str) -> usize {
    let scheduled = u(&meta(dir)["result"], "ticks_scheduled");
    let mut seen = vec![false; scheduled as usize];
    for r in rows(dir, file) {
        seen[u(&r, "seq") as usize] = true;
    }
    let in_rows = seen.iter().filter(|x| **x).count();
    for e in rows(dir, "events.jsonl") {
        if e["event"] == "gap" && e["source"] == source {
            for q in u(&e, "from_seq")..=u(&e, "to_seq") {
                assert!(!seen[q as usize], "seq {q} both in a row and a gap");
                seen[q as usize] = true;
            }
        }
    }
    let holes: Vec<usize> = (0..seen.len()).filter(|q| !seen[*q]).collect();
    assert!(holes.is_empty(), "{file}: undeclared holes {holes:?}");
    in_rows
}

fn validate(dir: &Path) {
    let out = cis490().arg("validate").arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_kernel_timer_keeps_1khz_and_declares_every_hole() {
    let mut target = Target::start(&["spin", "2"]);
    target.line();
    let cap = Capture::start(
        target.pid(),
        &["--backend", "bpf", "--duration", "2", "--rate-hz", "1000"],
    );
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let m = meta(&dir);
    let r = &m["result"];
    assert_eq!(r["tick_source"], "kernel", "{r}");
    // The host thread only drains (20 Hz): no realtime priority is needed for 1 kHz.
    assert_eq!(r["sampler"]["policy"], "SCHED_OTHER", "{r}");
    let scheduled = u(r, "ticks_scheduled");
    assert!(
        (1800..=2050).contains(&scheduled),
        "{scheduled} ticks in 2 s at 1 kHz"
    );
    assert_eq!(
        u(&r["tick_lateness"], "count"),
        scheduled - u(r, "ticks_missed")
    );
    let ticks = assert_seq_complete(&dir, "telemetry-bpf-sched.jsonl", "bpf-sched");
    assert_seq_complete(&dir, "telemetry-bpf-io.jsonl", "bpf-io");
    assert_eq!(ticks as u64, scheduled - u(r, "ticks_missed"));
    // One stamp per snapshot, on the timer's 1 ms grid.
    let sched = rows(&dir, "telemetry-bpf-sched.jsonl");
    let mut stamps: Vec<(u64, u64)> = sched
        .iter()
        .filter(|x| x["tid"].is_null())
        .map(|x| (u(x, "seq"), u(x, "t_mono_ns")))
        .collect();
    stamps.dedup();
    let mut per_tick: Vec<f64> = stamps
        .windows(2)
        .map(|w| (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0) as f64)
        .collect();
    per_tick.sort_by(f64::total_cmp);
    let median = per_tick[per_tick.len() / 2];
    assert!(
        (950_000.0..=1_050_000.0).contains(&median),
        "median ns per tick {median}"
    );
    validate(&dir);
}

#[test]
fn a_timer_on_an_idle_cpu_is_restarted_and_its_holes_declared() {
    // perf throttles the snapshot timer of a CPU that gets no scheduler tick (an idle
    // one, NO_HZ) and leaves it stopped; the capture notices the silence and restarts it.
    // Whether this kernel throttles in a given run is chance, so the test makes the case
    // happen: the capture is told (CIS490_FAULT_TIMER_STOP_AFTER_MS) to stop its own timer
    // once after 1 s, the state a throttled timer is in. Put it on the last CPU too, with a
    // target that only sleeps: every tick is a row or a declared gap.
    let last_cpu = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .unwrap()
        .trim()
        .rsplit(['-', ','])
        .next()
        .unwrap()
        .to_owned();
    let mut target = Target::start(&["spin", "0"]);
    target.line();
    let mut cmd = cis490();
    cmd.env("CIS490_FAULT_TIMER_STOP_AFTER_MS", "1000");
    let cap = Capture::start_with(
        cmd,
        target.pid(),
        &[
            "--backend",
            "bpf",
            "--duration",
            "3",
            "--rate-hz",
            "1000",
            "--bpf-timer-cpu",
            &last_cpu,
        ],
    );
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let m = meta(&dir);
    let restarts = u(&m["sources"][0], "timer_restarts");
    eprintln!(
        "timer on CPU {last_cpu}: {restarts} restarts, {} of {} ticks missed",
        m["result"]["ticks_missed"], m["result"]["ticks_scheduled"]
    );
    assert!(restarts >= 1, "the stopped timer was never restarted");
    assert!(
        rows(&dir, "events.jsonl")
            .iter()
            .any(|e| e["event"] == "source_error"
                && e["message"].as_str().unwrap().contains("restarted it")),
        "a restart without its event"
    );
    // Whether the restarted timer then keeps firing is up to the kernel (on this nested VM
    // an idle CPU's timer fires a few dozen times between stalls, docs/bpf-backend.md); what
    // the capture owes is that every tick is a row or a declared gap.
    assert_seq_complete(&dir, "telemetry-bpf-sched.jsonl", "bpf-sched");
    assert_seq_complete(&dir, "telemetry-bpf-io.jsonl", "bpf-io");
    validate(&dir);
}

#[test]
fn a_stalled_capture_loses_snapshots_visibly_and_goes_on() {
    let mut target = Target::start(&["spin", "2"]);
    target.line();
    let cap = Capture::start(
        target.pid(),
        &["--backend", "bpf", "--duration", "6", "--rate-hz", "1000"],
    );
    cap.wait_rows("telemetry-bpf-sched.jsonl");
    // The capture stops draining for 3 s; the kernel keeps snapshotting into a ring
    // sized for half a second of twice as many threads (~1.9 s here).
    let pid = cap.child.id() as i32;
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(3000));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let events = rows(&dir, "events.jsonl");
    assert!(
        has_source_error(&events, "bpf-sched", "ring buffer full"),
        "no ring-full error"
    );
    for src in ["bpf-sched", "bpf-io"] {
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "gap" && e["source"] == src),
            "no gap event for {src}"
        );
    }
    let in_rows = assert_seq_complete(&dir, "telemetry-bpf-sched.jsonl", "bpf-sched");
    let scheduled = u(&meta(&dir)["result"], "ticks_scheduled");
    assert!(u(&meta(&dir)["result"], "ticks_missed") >= 500);
    // Sampling resumed after the stall: the last ticks are there.
    let sched = rows(&dir, "telemetry-bpf-sched.jsonl");
    assert!(
        u(sched.last().unwrap(), "seq") + 200 > scheduled,
        "no rows after the stall"
    );
    assert!(in_rows >= 2500, "{in_rows} ticks in rows");
    validate(&dir);
}

#[test]
fn target_exit_mid_capture_closes_the_episode() {
    let child = Command::new("sleep").arg("1").spawn().unwrap();
    let cap = Capture::start(
        child.id(),
        &["--backend", "bpf", "--duration", "30", "--rate-hz", "20"],
    );
    let t0 = Instant::now();
    let mut child = child;
    child.wait().unwrap();
    let (out, data) = cap.finish();
    assert!(t0.elapsed() < Duration::from_secs(15));
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    assert_eq!(meta(&dir)["result"]["end_reason"], "target_exit");
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(events.contains("\"target_exit\""));
}

#[test]
fn without_capabilities_auto_falls_back_and_bpf_fails_clearly() {
    let child = Command::new("sleep").arg("20").spawn().unwrap();
    let pid = child.id();
    let mut child = child;
    let dropped = || {
        let mut c = Command::new("setpriv");
        c.args([
            "--inh-caps=-all",
            "--bounding-set=-bpf,-perfmon,-sys_admin",
            "--",
        ])
        .arg(cis490_path());
        c
    };
    // auto: a /proc episode that says why.
    let cap = Capture::start_with(dropped(), pid, &["--duration", "1", "--net-if", "lo"]);
    let (out, data) = cap.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = single_episode(data.path());
    let m = meta(&dir);
    assert_eq!(m["backend"]["requested"], "auto");
    assert_eq!(m["backend"]["used"], "proc");
    let why = m["backend"]["fallback_reason"].as_str().unwrap();
    assert!(why.contains("CAP_BPF"), "{why}");
    assert!(dir.join("telemetry-proc.jsonl").exists());
    assert!(!dir.join("telemetry-bpf-sched.jsonl").exists());
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let sel: Value = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["event"] == "backend_selected")
        .unwrap();
    assert_eq!(sel["fallback_reason"], why);
    // The net source falls back to sysfs counters, still deployment-visible.
    let net = rows(&dir, "telemetry-net.jsonl");
    assert!(net
        .iter()
        .all(|r| r["ifname"] == "lo" && r["available_in_deployment"] == true));
    assert!(net[0]["rx_bytes"].is_u64());
    let src = m["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "net")
        .unwrap();
    assert_eq!(src["method"], "sysfs");

    // bpf: refused with the cause, non-zero exit, nothing left behind.
    let cap = Capture::start_with(dropped(), pid, &["--duration", "1", "--backend", "bpf"]);
    let (out, data) = cap.finish();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BPF backend unavailable") && err.contains("CAP_BPF"),
        "{err}"
    );
    let left = std::fs::read_dir(data.path().join("episodes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "an episode directory was left behind");
    let _ = child.kill();
    let _ = child.wait();
}

/// A veth pair: one end in the root namespace (traced), the other in a namespace of its
/// own with a UDP echo server. Addresses are 10.249.x.y/30 on this pair only; nothing
/// is routed anywhere else.
struct Veth {
    ns: String,
    host_if: String,
    echo: Option<Child>,
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

impl Veth {
    fn create() -> Self {
        let n = std::process::id() % 60;
        let ns = format!("cis490t{}", std::process::id());
        let host_if = format!("c490h{}", std::process::id() % 100000);
        let peer = format!("c490p{}", std::process::id() % 100000);
        let host_ip = format!("10.249.{n}.1/30");
        let peer_ip = format!("10.249.{n}.2/30");
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        sh(&["ip", "netns", "add", &ns]);
        let v = Veth {
            ns: ns.clone(),
            host_if: host_if.clone(),
            echo: None,
        };
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", &ns]);
        // No IPv6: no router solicitations or DAD packets between our counter readings.
        for (pre, ifn) in [
            (vec![], host_if.as_str()),
            (vec!["ip", "netns", "exec", ns.as_str()], peer.as_str()),
        ] {
            let mut a: Vec<&str> = pre.clone();
            // /proc/sys/net is per network namespace: `ip netns exec` writes the peer's.
            let cmd = format!("echo 1 > /proc/sys/net/ipv6/conf/{ifn}/disable_ipv6");
            a.extend(["sh", "-c", &cmd]);
            sh(&a);
        }
        sh(&["ip", "addr", "add", &host_ip, "dev", &host_if]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&[
            "ip", "netns", "exec", &ns, "ip", "addr", "add", &peer_ip, "dev", &peer,
        ]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &peer, "up"]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        v
    }

    fn start_echo(&mut self) -> String {
        let n = std::process::id() % 60;
        let addr = format!("10.249.{n}.2:7777");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(env!("CARGO_BIN_EXE_cis490-bpf-testtarget"))
            .args(["udp-echo", &addr])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        self.echo = Some(child);
        addr
    }

    fn stats(&self) -> [u64; 4] {
        let get = |f: &str| -> u64 {
            std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{f}", self.host_if))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        [
            get("rx_bytes"),
            get("rx_packets"),
            get("tx_bytes"),
            get("tx_packets"),
        ]
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        if let Some(mut c) = self.echo.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn net_counts_match_the_interface_statistics() {
    let mut veth = Veth::create();
    let echo = veth.start_echo();
    let sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let host_if = veth.host_if.clone();
    let cap = Capture::start(
        sleeper.id(),
        &[
            "--backend",
            "bpf",
            "--duration",
            "4",
            "--rate-hz",
            "20",
            "--net-if",
            &host_if,
        ],
    );
    cap.wait_rows("telemetry-net.jsonl");
    std::thread::sleep(Duration::from_millis(100));
    let before = veth.stats();
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 2000];
    let mut echoed = 0;
    for i in 0..40usize {
        let payload = vec![i as u8; 100 + i * 30];
        sock.send_to(&payload, &echo).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            assert_eq!(n, payload.len());
            echoed += 1;
        }
    }
    assert!(echoed >= 38, "only {echoed} of 40 datagrams echoed");
    std::thread::sleep(Duration::from_millis(200));
    let after = veth.stats();
    let (out, data) = cap.finish();
    let mut sleeper = sleeper;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let net = rows(&dir, "telemetry-net.jsonl");
    let last = net.last().unwrap();
    assert_eq!(last["ifname"], host_if.as_str());
    assert_eq!(last["available_in_deployment"], true);
    let got = [
        u(last, "rx_bytes"),
        u(last, "rx_packets"),
        u(last, "tx_bytes"),
        u(last, "tx_packets"),
    ];
    let want: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert!(
        want[1] >= 38 && want[3] >= 40,
        "too little traffic: {want:?}"
    );
    assert_eq!(
        got.to_vec(),
        want,
        "bpf [rx_bytes, rx_packets, tx_bytes, tx_packets] vs sysfs deltas"
    );
    let m = meta(&dir);
    let src = m["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "net")
        .unwrap();
    assert_eq!(src["method"], "bpf");
}

/// Start-up (issue 17): the loader helper hides /sys/kernel/btf from aya in a mount
/// namespace of its own, so aya parses none of it. The host must not see that mount, and
/// the helper's peak RSS shows that no full parse happened.
#[test]
fn the_loader_hides_the_kernel_btf_from_aya_only_in_its_own_mount_namespace() {
    let mut target = Target::start(&["spin", "0"]);
    target.line();
    let cap = Capture::start(target.pid(), &["--backend", "bpf", "--duration", "0.5"]);
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let loader = rows(&dir, "events.jsonl")
        .into_iter()
        .find(|e| e["event"] == "backend_selected")
        .expect("backend_selected")["bpf_loader"]
        .clone();
    // The helper's own data at its peak (VmHWM less the binary's mapped pages, which
    // follow the binary's size and profile): ~6 MiB here; aya's full parse of the
    // kernel's BTF adds ~14 MiB (the debug helper's VmHWM went from ~18 to ~32 MiB with
    // it). 12 MiB tells the two apart.
    let peak = u(&loader, "peak_data_kib");
    assert!(peak < 12 * 1024, "loader peak data {peak} KiB: {loader}");
    // The host's view is untouched: the file is there and nothing is mounted over it.
    let btf = std::fs::metadata("/sys/kernel/btf/vmlinux").expect("host still sees vmlinux BTF");
    assert!(btf.len() > 1_000_000, "vmlinux BTF of {} bytes", btf.len());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/sys/kernel/btf")),
        "a mount over /sys/kernel/btf leaked to the host:\n{mounts}"
    );
}

#[test]
fn bpf_stats_are_recorded_in_meta() {
    let mut target = Target::start(&["spin", "1"]);
    target.line();
    let sysctl = || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    let before = sysctl();
    let cap = Capture::start(
        target.pid(),
        &["--backend", "bpf", "--duration", "1", "--bpf-stats"],
    );
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let progs = &meta(&dir)["result"]["bpf_programs"];
    // The snapshot timer ran once per 100 ms tick (10 Hz default) over the second.
    let snap = &progs["cis490_snapshot"];
    assert!(u(snap, "run_cnt") >= 5, "{progs}");
    assert!(u(snap, "run_time_ns") > 0, "{progs}");
    assert!(progs["cis490_sched_fork"].is_object(), "{progs}");
    // Nothing runs per context switch, wakeup or syscall.
    for name in [
        "cis490_sched_switch",
        "cis490_sched_wakeup",
        "cis490_sys_exit_write",
    ] {
        assert!(progs.get(name).is_none(), "{name} attached: {progs}");
    }
    // Statistics were on only while the capture held them.
    assert_eq!(sysctl(), before);
}

#[test]
fn doctor_reports_what_auto_picks() {
    let out = cis490().arg("doctor").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "privileges",
        "bpf() syscall",
        "BTF",
        // The streaming BTF reader found the task_struct offsets the programs need.
        "task_struct pid at",
        "tracefs",
        "sched:sched_process_fork",
        "kernel version",
    ] {
        assert!(
            text.contains(line),
            "doctor does not mention {line}:\n{text}"
        );
    }
    assert!(text.contains("--backend auto would use: bpf"), "{text}");
    assert!(!text.contains("MISSING"), "{text}");

    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--bounding-set=-bpf,-perfmon,-sys_admin",
            "--",
        ])
        .arg(cis490_path())
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("MISSING  privileges"), "{text}");
    assert!(text.contains("fix: "), "{text}");
    assert!(text.contains("--backend auto would use: proc"), "{text}");
}

#[test]
fn tap_is_autodetected_from_the_target_fds() {
    let name = format!("c490t{}", std::process::id() % 100000);
    let mut target = Target::start(&["tap", &name]);
    assert_eq!(target.line(), "ready");
    // No --net-if: the tap comes from the `iff:` line of the target's tun fd.
    let cap = Capture::start(target.pid(), &["--backend", "bpf", "--duration", "1"]);
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let net = rows(&dir, "telemetry-net.jsonl");
    assert!(!net.is_empty());
    assert!(
        net.iter().all(|r| r["ifname"] == name.as_str()),
        "{:?}",
        net[0]
    );
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    let sel: Value = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["event"] == "backend_selected")
        .unwrap();
    assert_eq!(sel["net_interfaces"], serde_json::json!([name]));
}

#[test]
fn sigint_ends_a_bpf_capture_cleanly_and_stats_are_switched_off() {
    let mut target = Target::start(&["spin", "1"]);
    target.line();
    let sysctl = || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    let before = sysctl();
    let cap = Capture::start(
        target.pid(),
        &["--backend", "bpf", "--bpf-stats", "--rate-hz", "50"],
    );
    cap.wait_rows("telemetry-bpf-sched.jsonl");
    // (The sysctl shows only what was written to it; BPF_ENABLE_STATS turns the counting
    // on without touching it, and run_cnt > 0 below shows it was on.)
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(cap.child.id() as i32, libc::SIGINT) };
    let (out, data) = cap.finish();
    let dir = single_episode(data.path());
    assert_complete_bpf(&dir, &out);
    let m = meta(&dir);
    assert_eq!(m["result"]["end_reason"], "signal");
    assert!(
        m["result"]["bpf_programs"]["cis490_snapshot"]["run_cnt"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(sysctl(), before);
}

// ---- The perf source (perf_event_open counting groups; every capture unless --no-perf) ----

/// The software group's page faults of a thread that touches 64 MiB: at least one per
/// page, and equal to what /proc's minflt + majflt saw over the same capture within a
/// few faults (the two windows start and end a read apart; the target idles around the
/// growth). Hardware columns: counted where the machine has a PMU, else null in every
/// row with the reason in meta.sources[perf].
#[test]
fn perf_page_faults_follow_procs_fault_counts_and_hardware_nulls_say_why() {
    let mut target = Target::start(&["mem"]);
    assert_eq!(target.line(), "ready");
    let pid = target.pid();
    let cap = Capture::start(
        pid,
        &[
            "--backend",
            "proc",
            "--duration",
            "3",
            "--rate-hz",
            "100",
            "--perf-rate-hz",
            "20",
        ],
    );
    cap.wait_rows("telemetry-perf.jsonl");
    target.send("grow 64");
    assert_eq!(target.line(), "grown");
    let (out, data) = cap.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = single_episode(data.path());
    validate(&dir);
    let perf = rows(&dir, "telemetry-perf.jsonl");
    let proc = rows(&dir, "telemetry-proc.jsonl");
    let main_perf: Vec<&Value> = perf
        .iter()
        .filter(|r| r["tid"].as_u64() == Some(u64::from(pid)))
        .collect();
    let main_proc: Vec<&Value> = proc
        .iter()
        .filter(|r| r["tid"].as_u64() == Some(u64::from(pid)))
        .collect();
    assert!(
        main_perf.len() >= 40,
        "{} perf rows at 20 Hz over 3 s",
        main_perf.len()
    );
    let pf = |r: &Value| u(r, "page_faults");
    let faults = |r: &Value| u(r, "minflt") + u(r, "majflt");
    let perf_delta = pf(main_perf.last().unwrap()) - pf(main_perf[0]);
    let proc_delta = faults(main_proc.last().unwrap()) - faults(main_proc[0]);
    assert!(
        perf_delta >= 16384,
        "64 MiB is 16,384 pages, perf saw {perf_delta} faults"
    );
    assert!(
        perf_delta.abs_diff(proc_delta) <= 64,
        "perf page_faults +{perf_delta}, proc minflt+majflt +{proc_delta}"
    );
    // The process row sums its threads at every read.
    for seq in 0..=u(perf.last().unwrap(), "seq") {
        let of_seq: Vec<&Value> = perf.iter().filter(|r| u(r, "seq") == seq).collect();
        let total = of_seq
            .iter()
            .find(|r| r["tid"].is_null())
            .expect("process row");
        let sum: u64 = of_seq
            .iter()
            .filter(|r| !r["tid"].is_null())
            .map(|r| pf(r))
            .sum();
        assert_eq!(pf(total), sum, "seq {seq}");
    }
    let m = meta(&dir);
    let src = m["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "perf")
        .expect("meta.sources[perf]");
    let hw = ["cycles", "instructions", "branch_instructions"];
    if src["hardware"] == "available" {
        assert!(main_perf.iter().all(|r| hw.iter().all(|c| !r[c].is_null())));
        assert!(u(main_perf.last().unwrap(), "cycles") > 0);
    } else {
        let why = src["hardware"].as_str().unwrap();
        assert!(
            why.contains("no PMU driver") || why.contains("not permitted"),
            "{why}"
        );
        assert!(perf.iter().all(|r| hw.iter().all(|c| r[c].is_null())));
        assert!(perf.iter().all(|r| r["hw_time_enabled_ns"].is_null()));
    }
    assert_eq!(src["software"], "available", "{src}");
}

/// Threads created during the capture are followed from the read after they appear, and
/// `--no-perf` writes no perf stream.
#[test]
fn perf_follows_threads_created_during_the_capture_and_no_perf_turns_it_off() {
    let mut target = Target::start(&["burst", "100"]);
    assert_eq!(target.line(), "ready");
    let cap = Capture::start(
        target.pid(),
        &["--backend", "proc", "--duration", "2", "--rate-hz", "50"],
    );
    cap.wait_rows("telemetry-perf.jsonl");
    let burst = target.burst();
    assert_eq!(burst.len(), 100);
    let (out, data) = cap.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = single_episode(data.path());
    validate(&dir);
    let perf = rows(&dir, "telemetry-perf.jsonl");
    let last_seq = u(perf.last().unwrap(), "seq");
    let in_last: std::collections::HashSet<u64> = perf
        .iter()
        .filter(|r| u(r, "seq") == last_seq)
        .filter_map(|r| r["tid"].as_u64())
        .collect();
    for t in &burst {
        assert!(in_last.contains(t), "thread {t} not in the last read");
    }
    let m = meta(&dir);
    let src = m["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "perf")
        .unwrap();
    assert!(u(src, "threads_followed") >= 101, "{src}");

    let cap = Capture::start(
        target.pid(),
        &["--backend", "proc", "--duration", "0.5", "--no-perf"],
    );
    let (out, data) = cap.finish();
    assert!(out.status.success());
    let dir = single_episode(data.path());
    assert!(!dir.join("telemetry-perf.jsonl").exists());
    assert!(!meta(&dir)["sources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "perf"));
}

/// Per seq of a bpf-sched episode: the process row's on_cpu_ns and num_threads, and the
/// on_cpu_ns of each thread as of that seq (its latest row at or before it, which is
/// what a left-out `--rows changed` row means).
fn process_and_latest_threads(dir: &Path) -> Vec<(u64, u64, u64, u64, usize)> {
    /// (the process row's on_cpu_ns and num_threads, then (tid, on_cpu_ns) per thread row)
    type Seq = (Option<(u64, u64)>, Vec<(u64, u64)>);
    let mut latest: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut by_seq: std::collections::BTreeMap<u64, Seq> = Default::default();
    for r in rows(dir, "telemetry-bpf-sched.jsonl") {
        let e = by_seq.entry(u(&r, "seq")).or_default();
        match r["tid"].as_u64() {
            None => e.0 = Some((u(&r, "on_cpu_ns"), u(&r, "num_threads"))),
            Some(tid) => e.1.push((tid, u(&r, "on_cpu_ns"))),
        }
    }
    let mut out = Vec::new();
    for (seq, (process, threads)) in by_seq {
        let written = threads.len();
        latest.extend(threads);
        let (total, live) = process.unwrap_or_else(|| panic!("seq {seq} has no process row"));
        out.push((seq, total, latest.values().sum(), live, written));
    }
    out
}

/// Issue 17: a 202-thread target at 1 kHz puts ~10,000 records in the ring per drain; the
/// capture takes them in batches of ~4,096 (each turned into rows and written before the
/// next) and must lose nothing. With `--rows all` every tick has every thread, and the
/// process row is their sum; with `--rows changed` the rows that were left out repeat the
/// thread's last one, so the sum of each thread's latest row is the process row at every
/// tick (a changed row wrongly left out would break it).
#[test]
fn a_wide_target_at_1khz_is_read_in_batches_and_no_row_is_lost() {
    let target = cis490_tests::Load::start(&[
        "--spin",
        "1",
        "--switch",
        "0",
        "--threads",
        "202",
        "--nap-ms",
        "5",
    ]);
    for mode in ["all", "changed"] {
        let cap = Capture::start(
            target.pid(),
            &[
                "--backend",
                "bpf",
                "--duration",
                "3",
                "--rate-hz",
                "1000",
                "--rows",
                mode,
            ],
        );
        let (out, data) = cap.finish();
        let dir = single_episode(data.path());
        assert_complete_bpf(&dir, &out);
        assert_seq_complete(&dir, "telemetry-bpf-sched.jsonl", "bpf-sched");
        assert_seq_complete(&dir, "telemetry-bpf-io.jsonl", "bpf-io");
        let ticks = process_and_latest_threads(&dir);
        // A debug build cannot format 400,000 rows a second: the ring then fills, and the
        // snapshots it dropped are declared gaps (checked above). Every tick written is
        // whole; a release build writes nearly all 3,000.
        assert!(ticks.len() >= 300, "{mode}: {} ticks in 3 s", ticks.len());
        let mut written = 0;
        for &(seq, total, sum, live, n) in &ticks {
            assert!(live >= 202, "{mode}: seq {seq}: {live} threads");
            if mode == "all" {
                assert_eq!(n as u64, live, "{mode}: seq {seq}: {n} thread rows");
            }
            assert_eq!(total, sum, "{mode}: seq {seq}: process row vs its threads");
            written += n;
        }
        if mode == "changed" {
            // Most rows are left out: the 5 ms sleepers change every ~5th tick.
            assert!(written < ticks.len() * 202 / 2, "{written} thread rows");
        }
        validate(&dir);
    }
}
