//! Every value of every stream of real episodes has its column's declared type: a
//! 150-thread target traced with the BPF backend and with the /proc backend, and the test
//! VM traced with every source (QMP and agent included). The check is the contract's own
//! (`cis490::contract::TypeCheck`, what `cis490 validate` runs), not a second copy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use cis490::contract::events::EventLine;
use cis490::contract::{self, TypeCheck};
use cis490_tests::{cis490, episode_dir_from, read_json, spawn_trace, wait_trace, Load, TestVm};
use serde_json::Value;

/// What checking one episode found.
#[derive(Debug, Default)]
struct Checked {
    /// Stream name → (rows, values) checked.
    counts: BTreeMap<String, (u64, u64)>,
    problems: Vec<String>,
}

/// Run every line of every JSON-lines file of `dir` through the contract's check.
fn check_episode(dir: &Path) -> Checked {
    let mut out = Checked::default();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl"))
        .collect();
    names.sort();
    for name in names {
        let stream = contract::stream_for_file(&name)
            .unwrap_or_else(|| panic!("{name}: no stream of the contract"));
        let mut check = TypeCheck::for_file(&name);
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let (mut rows, mut values) = (0u64, 0u64);
        for (i, line) in text.lines().enumerate() {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}:{}: {e}", i + 1));
            let obj = v.as_object().expect("a JSON object per line");
            rows += 1;
            values += obj.len() as u64;
            for p in check.check(obj) {
                out.problems.push(format!("{name}:{}: {p}", i + 1));
            }
            // Events also read as the contract's typed enum.
            if name == "events.jsonl" {
                if let Err(e) = serde_json::from_value::<EventLine>(v.clone()) {
                    out.problems
                        .push(format!("{name}:{}: not an EventLine: {e}", i + 1));
                }
            }
        }
        for p in check.finish() {
            out.problems.push(format!("{name}: {p}"));
        }
        out.counts.insert(stream.name.to_owned(), (rows, values));
    }
    out
}

fn assert_meets_contract(dir: &Path, want: &[&str]) -> Checked {
    let checked = check_episode(dir);
    eprintln!(
        "{}: rows and values checked {:?}",
        dir.display(),
        checked.counts
    );
    assert!(
        checked.problems.is_empty(),
        "{} values off their declared type in {}:\n{}",
        checked.problems.len(),
        dir.display(),
        checked.problems.join("\n")
    );
    for s in want {
        let (rows, _) = checked.counts.get(*s).copied().unwrap_or_default();
        assert!(rows > 0, "stream {s} has no rows in {}", dir.display());
    }
    // And `cis490 validate`, which runs the same check, agrees.
    let v = cis490().arg("validate").arg(dir).output().unwrap();
    assert!(
        v.status.success(),
        "cis490 validate:\n{}",
        String::from_utf8_lossy(&v.stdout)
    );
    checked
}

/// Distinct thread ids of a per-thread stream.
fn tids(dir: &Path, file: &str) -> BTreeSet<u64> {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["tid"].as_u64())
        .collect()
}

const THREADS: usize = 150;

/// Trace the 150-thread target for 3 s at 100 Hz with `backend`.
fn wide_episode(backend: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let threads = THREADS.to_string();
    let load = Load::start(&[
        "--spin",
        "1",
        "--switch",
        "2",
        "--io",
        "1",
        "--threads",
        &threads,
    ]);
    let task_count = std::fs::read_dir(format!("/proc/{}/task", load.pid()))
        .unwrap()
        .count();
    assert!(task_count >= THREADS, "target has {task_count} threads");
    let tmp = tempfile::tempdir().unwrap();
    let out = cis490()
        .args([
            "trace",
            "--qemu-pid",
            &load.pid().to_string(),
            "--data-root",
        ])
        .arg(tmp.path())
        .args(["--backend", backend, "--duration", "3", "--rate-hz", "100"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cis490 trace --backend {backend} failed (the BPF backend needs root, BTF and tracefs; under CI that is a failure, not a skip):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = episode_dir_from(&out);
    let meta = read_json(&dir.join("meta.json"));
    assert_eq!(meta["backend"]["used"], backend, "{}", meta["backend"]);
    (tmp, dir)
}

#[test]
fn wide_target_bpf_episode_meets_the_contract() {
    let (_tmp, dir) = wide_episode("bpf");
    let checked = assert_meets_contract(&dir, &["bpf-sched", "bpf-io", "events", "labels"]);
    for f in ["telemetry-bpf-sched.jsonl", "telemetry-bpf-io.jsonl"] {
        let n = tids(&dir, f).len();
        assert!(n >= THREADS, "{f}: rows of {n} threads, want {THREADS}");
    }
    assert!(checked.counts["bpf-sched"].1 > 100_000);
}

#[test]
fn wide_target_proc_episode_meets_the_contract() {
    let (_tmp, dir) = wide_episode("proc");
    let checked = assert_meets_contract(&dir, &["proc", "events", "labels"]);
    let n = tids(&dir, "telemetry-proc.jsonl").len();
    assert!(n >= THREADS, "rows of {n} threads, want {THREADS}");
    assert!(checked.counts["proc"].1 > 100_000);
    // The process-only columns are integers in the very first line: a reader typing
    // columns from the first rows (polars: 100) must not see 150 nulls first.
    let text = std::fs::read_to_string(dir.join("telemetry-proc.jsonl")).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for col in ["rss_kb", "vsize_bytes", "num_threads"] {
        assert!(first[col].is_u64(), "{col} in the first line: {first}");
    }
}

#[test]
fn vm_episode_with_qmp_and_agent_meets_the_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&tmp.path().join("vm"));
    let root = tmp.path().join("data");
    // No --qmp/--agent: both are found in QEMU's command line; the host backend is auto.
    let child = spawn_trace(
        &root,
        &[
            "--qemu-pid",
            &vm.pid().to_string(),
            "--rate-hz",
            "20",
            "--duration",
            "8",
        ],
    );
    // Guest activity for the agent's disk and CPU columns while the capture runs.
    std::thread::sleep(Duration::from_secs(2));
    vm.console_run(
        "dd if=/dev/zero of=/dev/vda bs=1M count=4 oflag=direct && echo DD-$((40+1))-DONE",
        "DD-41-DONE",
        Duration::from_secs(60),
    );
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(60));
    assert!(ok, "trace failed: {stderr}");
    let meta = read_json(&dir.join("meta.json"));
    let host = if meta["backend"]["used"] == "bpf" {
        "bpf-sched"
    } else {
        "proc"
    };
    let checked = assert_meets_contract(&dir, &[host, "qmp", "agent", "events", "labels"]);
    // The agent's open-ended columns were really exercised, not only the fixed ones.
    let agent = std::fs::read_to_string(dir.join("telemetry-agent.jsonl")).unwrap();
    let first: Value = serde_json::from_str(agent.lines().next().unwrap()).unwrap();
    let keys: Vec<&String> = first.as_object().unwrap().keys().collect();
    assert!(
        keys.iter().any(|k| k.starts_with("guest_disk_"))
            && keys.iter().any(|k| k.starts_with("guest_cpu_")),
        "agent row lacks the per-disk/cpu families: {keys:?}"
    );
    assert!(checked.counts["qmp"].0 > 10);
}
