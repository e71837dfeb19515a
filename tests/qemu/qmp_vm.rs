//! The QMP source against the real test VM (`xtask vm start`, QEMU 10.0.2, TCG here):
//! the vCPU map is filled before sampling starts, so the very first host rows of the vCPU
//! threads carry `vcpu` (issue 11 part 4); QMP rows carry request/reply instants (part 3);
//! QEMU's own thread ids pass the target check (issue 16 F10).

use std::time::Duration;

use cis490_tests::*;
use serde_json::Value;

/// Trace the VM's QEMU for `secs` with `backend`; the episode directory.
fn trace(vm: &TestVm, root: &std::path::Path, backend: &str, secs: u64) -> std::path::PathBuf {
    let child = spawn_trace(
        root,
        &[
            "--qemu-pid",
            &vm.pid().to_string(),
            "--duration",
            &secs.to_string(),
            "--rate-hz",
            "100",
            "--backend",
            backend,
            "--no-agent",
            "--qmp",
            vm.get("QMP"),
        ],
    );
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(secs + 30));
    assert!(ok, "trace --backend {backend} failed: {stderr}");
    dir
}

/// The first row of each vCPU thread in `file` has its index in `vcpu`.
fn first_rows_have_vcpu(dir: &std::path::Path, file: &str, threads: &[Value]) {
    let rows = read_jsonl(&dir.join(file));
    let first_seq = rows.iter().filter_map(|r| r["seq"].as_u64()).min();
    for t in threads {
        let (idx, tid) = (t["index"].as_u64().unwrap(), t["tid"].as_u64().unwrap());
        let first = rows
            .iter()
            .find(|r| r["tid"].as_u64() == Some(tid))
            .unwrap_or_else(|| panic!("{file}: no row of vCPU thread {tid}"));
        assert_eq!(
            first["vcpu"].as_u64(),
            Some(idx),
            "{file}: the first row of vCPU thread {tid} lacks vcpu {idx}: {first}"
        );
        // ... and that row is from the very first snapshot.
        assert_eq!(first["seq"].as_u64(), first_seq, "{file}: {first}");
    }
    // No row of any vCPU thread has a null vcpu.
    let tids: Vec<u64> = threads.iter().map(|t| t["tid"].as_u64().unwrap()).collect();
    for r in &rows {
        if r["tid"].as_u64().is_some_and(|t| tids.contains(&t)) {
            assert!(r["vcpu"].is_u64(), "{file}: {r}");
        }
    }
}

#[test]
fn real_vm_first_host_rows_of_vcpu_threads_carry_vcpu() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = TestVm::start(&tmp.path().join("vm"));
    let qemu = vm.pid();
    let root = tmp.path().join("data");

    // /proc backend, then the BPF backend (root with BPF here; under CI a BPF that does
    // not load is a failure, not a skip: `--backend bpf` refuses to fall back).
    for (backend, file) in [
        ("proc", "telemetry-proc.jsonl"),
        ("bpf", "telemetry-bpf-sched.jsonl"),
    ] {
        let dir = trace(&vm, &root, backend, 3);
        let meta = read_json(&dir.join("meta.json"));
        assert_eq!(meta["backend"]["used"], backend, "{}", meta["backend"]);
        let threads = meta["vm"]["vcpu_threads"].as_array().unwrap().clone();
        assert_eq!(threads.len(), 2, "{}", meta["vm"]);
        for t in &threads {
            let tid = t["tid"].as_u64().unwrap();
            assert!(
                std::path::Path::new(&format!("/proc/{qemu}/task/{tid}")).exists(),
                "vCPU tid {tid} is not a thread of QEMU {qemu}"
            );
        }
        let qmp = source_meta(&meta, "qmp");
        assert_eq!(qmp["vcpu_tid_mismatches"], 0, "{qmp}");
        assert_eq!(qmp["stat_name_collisions"], 0, "{qmp}");
        assert_eq!(qmp["events_dropped"], 0, "{qmp}");
        first_rows_have_vcpu(&dir, file, &threads);

        // QMP rows: request <= sample <= reply, and the uncertainty is stated.
        let rows = read_jsonl(&dir.join("telemetry-qmp.jsonl"));
        assert!(rows.len() >= 10, "{} qmp rows", rows.len());
        for r in &rows {
            let req = r["t_request_mono_ns"].as_u64().unwrap();
            let smp = r["t_sample_mono_ns"].as_u64().unwrap();
            let rep = r["t_mono_ns"].as_u64().unwrap();
            let rtt = r["rtt_ns"].as_u64().unwrap();
            assert!(req <= smp && smp <= rep && rep - req == rtt, "{r}");
        }
        let unc = &qmp["sample_uncertainty_ns"];
        assert!(unc["max_ns"].is_u64() && unc["p50_ns"].is_u64(), "{qmp}");
        eprintln!(
            "{backend}: qmp rtt_ns {} sample_uncertainty_ns {unc}",
            qmp["rtt_ns"]
        );
    }
}
