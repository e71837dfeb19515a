//! The `kvm` and `kvm-keys` sources against a real KVM guest with known exits: a tiny
//! firmware image (tests/qemu/guest/kvm-probe.S, assembled here with the counts below, run
//! with -bios instead of SeaBIOS, so no firmware exit mixes in) that makes exact numbers
//! of port writes and reads, CPUIDs of one leaf, RDMSRs and WRMSRs, then ends QEMU through
//! isa-debug-exit. Two QEMUs run it; only one is traced, and the other runs to its end
//! while the capture is on and the traced one still paused (on this lab's nested
//! `kvm_pvm` backend one of two KVM guests running at once stalls, so they take turns). The kernel's own tracefs events for the traced vCPU thread are the ground
//! truth for the per-kind totals.
//!
//! Under CI=true a missing /dev/kvm, QEMU or assembler is a failure, never a skip.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cis490_tests::*;
use serde_json::Value;

const OUTS: u64 = 1000;
const INS: u64 = 500;
const CPUIDS: u64 = 777;
const RDMSRS: u64 = 333;
const WRMSRS: u64 = 111;
const OUT_PORT: u64 = 0x700;
const IN_PORT: u64 = 0x701;
const LEAF: u64 = 0x4000_0010;
const MSR_TSC: u64 = 0x10;
const MSR_APIC_BASE: u64 = 0x1b;
const DEBUG_EXIT_PORT: u64 = 0xf4;

/// Fails under CI=true, else says why and returns false (the test then passes vacuously).
fn capable() -> bool {
    let missing = if !Path::new("/dev/kvm").exists() {
        Some("no /dev/kvm")
    } else if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        Some("no qemu-system-x86_64")
    } else if Command::new("as").arg("--version").output().is_err() {
        Some("no GNU as (binutils)")
    } else {
        // SAFETY: geteuid has no preconditions.
        (unsafe { libc::geteuid() } != 0).then_some("not root (BPF and tracefs need it)")
    };
    match missing {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {why}: the kvm source cannot be tested"
            );
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

/// Assemble the probe with this test's counts (and `spread` CPUIDs of distinct leaves)
/// into a 64 KiB firmware image.
fn firmware(dir: &Path, spread: u64) -> PathBuf {
    let src = root().join("tests/qemu/guest/kvm-probe.S");
    let obj = dir.join("kvm-probe.o");
    let bin = dir.join("kvm-probe.bin");
    let mut as_cmd = Command::new("as");
    as_cmd.arg("--32");
    for (sym, v) in [
        ("OUTS", OUTS),
        ("INS", INS),
        ("CPUIDS", CPUIDS),
        ("RDMSRS", RDMSRS),
        ("WRMSRS", WRMSRS),
        ("SPREAD", spread),
    ] {
        as_cmd.arg("--defsym").arg(format!("{sym}={v}"));
    }
    let out = as_cmd.arg("-o").arg(&obj).arg(&src).output().unwrap();
    assert!(
        out.status.success(),
        "as: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("ld")
        .args(["-m", "elf_i386", "-Ttext", "0", "--oformat", "binary", "-o"])
        .arg(&bin)
        .arg(&obj)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ld: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&bin).unwrap().len(), 64 << 10);
    bin
}

/// A paused QEMU running the probe firmware under KVM; killed on drop.
struct Guest {
    pid: u32,
    /// The harness's own QMP socket (the capture finds the first one on the command line).
    control: PathBuf,
}

impl Guest {
    fn start(dir: &Path, name: &str, image: &Path) -> Guest {
        let capture = dir.join(format!("{name}-qmp.sock"));
        let control = dir.join(format!("{name}-control.sock"));
        let pidfile = dir.join(format!("{name}.pid"));
        let out = Command::new("qemu-system-x86_64")
            .args(["-name", &format!("{name},debug-threads=on")])
            .args(["-machine", "pc", "-accel", "kvm", "-smp", "1", "-m", "16"])
            .args(["-nodefaults", "-display", "none", "-S"])
            .arg("-bios")
            .arg(image)
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", capture.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", control.display()))
            .arg("-pidfile")
            .arg(&pidfile)
            .arg("-daemonize")
            .output()
            .expect("run qemu-system-x86_64");
        assert!(
            out.status.success(),
            "QEMU -accel kvm did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(wait_for(Duration::from_secs(10), || control.exists()));
        Guest { pid, control }
    }

    /// The vCPU thread ("CPU 0/KVM", named by -name debug-threads=on).
    fn vcpu_tid(&self) -> u32 {
        let mut found = None;
        assert!(wait_for(Duration::from_secs(10), || {
            found = std::fs::read_dir(format!("/proc/{}/task", self.pid))
                .unwrap()
                .flatten()
                .find(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "CPU 0/KVM")
                })
                .and_then(|t| t.file_name().to_str()?.parse().ok());
            found.is_some()
        }));
        found.unwrap()
    }

    fn qmp(&self, command: &str) {
        let s = UnixStream::connect(&self.control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut line = String::new();
        r.read_line(&mut line).unwrap(); // greeting
        for c in ["qmp_capabilities", command] {
            writeln!(w, "{{\"execute\":\"{c}\"}}").unwrap();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line.contains("\"return\"") {
                    break;
                }
                assert!(!line.contains("\"error\""), "{c}: {line}");
            }
        }
    }

    /// Gone, or a zombie its (daemonized) parent has not reaped yet.
    fn exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).map_or(true, |s| {
            s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the QEMU this test started.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
    }
}

/// A tracefs instance counting some kvm events of one thread: the kernel's ground truth.
struct KernelCount {
    dir: PathBuf,
}

const COUNTED: &[&str] = &[
    "kvm_pio",
    "kvm_cpuid",
    "kvm_msr",
    "kvm_userspace_exit",
    "kvm_mmio",
];

impl KernelCount {
    fn start(tid: u32) -> KernelCount {
        let dir = PathBuf::from(format!(
            "/sys/kernel/tracing/instances/cis490-kvm-test-{tid}"
        ));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("create a tracefs instance");
        std::fs::write(dir.join("buffer_size_kb"), "8192").unwrap();
        for e in COUNTED {
            let ev = dir.join("events/kvm").join(e);
            std::fs::write(ev.join("filter"), format!("common_pid == {tid}")).unwrap();
            std::fs::write(ev.join("enable"), "1").unwrap();
        }
        KernelCount { dir }
    }

    /// Events by name, with the mmio ones split by type as the kvm source counts them.
    fn counts(&self) -> BTreeMap<String, u64> {
        std::fs::write(self.dir.join("tracing_on"), "0").unwrap();
        let text = std::fs::read_to_string(self.dir.join("trace")).unwrap();
        let mut out = BTreeMap::new();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let Some(name) = COUNTED.iter().find(|e| l.contains(&format!(" {e}: "))) else {
                continue;
            };
            let key = match *name {
                "kvm_pio" if l.contains("pio_write") => "pio_writes",
                "kvm_pio" => "pio_reads",
                "kvm_msr" if l.contains("msr_write") => "msr_writes",
                "kvm_msr" => "msr_reads",
                "kvm_mmio" if l.contains("mmio read ") => "mmio_reads",
                "kvm_mmio" if l.contains("mmio write ") => "mmio_writes",
                "kvm_mmio" => continue, // unsatisfied-read: the first half of a read
                "kvm_cpuid" => "cpuid_exits",
                _ => "userspace_exits",
            };
            *out.entry(key.to_owned()).or_insert(0) += 1;
        }
        let lost = std::fs::read_to_string(self.dir.join("per_cpu/cpu0/stats")).unwrap_or_default();
        assert!(!text.contains("LOST"), "tracefs lost events: {lost}");
        out
    }
}

impl Drop for KernelCount {
    fn drop(&mut self) {
        for e in COUNTED {
            let _ = std::fs::write(self.dir.join("events/kvm").join(e).join("enable"), "0");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn kvm_exits_are_counted_exactly_per_vcpu_thread_kind_and_key() {
    if !capable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = firmware(tmp.path(), 0);
    let target = Guest::start(tmp.path(), "target", &image);
    let bystander = Guest::start(tmp.path(), "bystander", &image);
    let tid = target.vcpu_tid();
    let other_tid = bystander.vcpu_tid();
    let kernel = KernelCount::start(tid);

    let data = tmp.path().join("data");
    let child = spawn_trace(
        &data,
        &[
            "--qemu-pid",
            &target.pid.to_string(),
            "--duration",
            "120",
            "--rate-hz",
            "50",
        ],
    );
    // The capture is on once the kernel's snapshots are arriving.
    assert!(
        wait_for(Duration::from_secs(30), || {
            first_episode_has_rows(&data, "telemetry-kvm.jsonl")
        }),
        "no kvm rows before the guests started"
    );
    // The untraced guest runs to its end first: its exits fire the same tracepoints.
    bystander.qmp("cont");
    assert!(
        wait_for(Duration::from_secs(60), || bystander.exited()),
        "the untraced guest did not end"
    );
    let before_cont = read_jsonl(&episodes(&data)[0].join("telemetry-kvm.jsonl"));
    target.qmp("cont");
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(120));
    assert!(ok, "trace failed: {stderr}");
    assert!(
        wait_for(Duration::from_secs(10), || target.exited()),
        "the traced guest did not run to its end"
    );
    let truth = kernel.counts();

    let meta = read_json(&dir.join("meta.json"));
    assert_eq!(
        meta["result"]["end_reason"], "target_exit",
        "{}",
        meta["result"]
    );
    let src = source_meta(&meta, "kvm");
    assert_eq!(src["status"], "attached", "{src}");
    assert_eq!(src["overflow_events"], 0, "{src}");
    assert_eq!(src["lost_events"], 0, "{src}");
    let exits_counted = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists());

    // kvm-keys: the guest's exits, exactly, on vCPU 0's thread; nothing of the bystander.
    let keys = read_jsonl(&dir.join("telemetry-kvm-keys.jsonl"));
    let mut last: BTreeMap<(u64, String, Option<u64>), u64> = BTreeMap::new();
    for r in &keys {
        let t = u(&r["tid"]);
        assert_ne!(t, u64::from(other_tid), "a row of the untraced guest: {r}");
        assert_eq!(t, u64::from(tid), "{r}");
        assert_eq!(r["vcpu"], 0, "{r}");
        assert_eq!(r["comm"], "CPU 0/KVM", "{r}");
        let k = (t, r["kind"].as_str().unwrap().to_owned(), r["key"].as_u64());
        let c = u(&r["count"]);
        let prev = last.insert(k.clone(), c);
        assert!(
            prev.is_none_or(|p| p < c),
            "{k:?}: {prev:?} then {c} (rows only when changed)"
        );
    }
    let key = |kind: &str, key: u64| {
        last.get(&(u64::from(tid), kind.to_owned(), Some(key)))
            .copied()
    };
    assert_eq!(key("pio_write", OUT_PORT), Some(OUTS));
    assert_eq!(key("pio_read", IN_PORT), Some(INS));
    assert_eq!(key("cpuid", LEAF), Some(CPUIDS));
    assert_eq!(key("msr_read", MSR_TSC), Some(RDMSRS));
    assert_eq!(key("msr_read", MSR_APIC_BASE), Some(WRMSRS));
    assert_eq!(key("msr_write", MSR_APIC_BASE), Some(WRMSRS));
    assert_eq!(key("pio_write", DEBUG_EXIT_PORT), Some(1));
    let named = keys
        .iter()
        .find(|r| r["kind"] == "msr_read" && r["key"] == MSR_TSC)
        .unwrap();
    assert_eq!(named["name"], "IA32_TIME_STAMP_COUNTER");

    // kvm: per tick, each keyed column of the thread equals the sum of its keys' counts
    // as of that tick; the process row is the thread's (one vCPU thread).
    let rows = read_jsonl(&dir.join("telemetry-kvm.jsonl"));
    let keyed = [
        ("pio_reads", "pio_read"),
        ("pio_writes", "pio_write"),
        ("msr_reads", "msr_read"),
        ("msr_writes", "msr_write"),
        ("cpuid_exits", "cpuid"),
        ("userspace_exits", "userspace_exit"),
        ("mmio_reads", "mmio_read"),
        ("mmio_writes", "mmio_write"),
    ];
    let mut asof: BTreeMap<(String, Option<u64>), u64> = BTreeMap::new();
    let mut key_rows = keys.iter().peekable();
    let mut ticks = 0;
    let mut seen_thread = false;
    for r in rows.iter().filter(|r| r["tid"] == u64::from(tid)) {
        let seq = u(&r["seq"]);
        while let Some(k) = key_rows.next_if(|k| u(&k["seq"]) <= seq) {
            asof.insert(
                (k["kind"].as_str().unwrap().to_owned(), k["key"].as_u64()),
                u(&k["count"]),
            );
        }
        for (col, kind) in keyed {
            let sum: u64 = asof
                .iter()
                .filter(|((k, _), _)| k == kind)
                .map(|(_, c)| c)
                .sum();
            assert_eq!(u(&r[col]), sum, "seq {seq}: {col} against the {kind} keys");
        }
        assert_eq!(r["exits"].is_null(), !exits_counted, "{r}");
        assert_eq!(r["vcpu"], 0);
        ticks += 1;
        seen_thread = true;
    }
    assert!(
        seen_thread && ticks > 10,
        "{ticks} ticks of the vCPU thread"
    );
    let final_thread = rows
        .iter()
        .rev()
        .find(|r| r["tid"] == u64::from(tid))
        .unwrap();
    let final_process = rows.iter().rev().find(|r| r["tid"].is_null()).unwrap();
    assert_eq!(final_thread["seq"], final_process["seq"]);
    for (col, _) in keyed {
        assert_eq!(final_thread[col], final_process[col], "{col}");
    }
    assert!(rows
        .iter()
        .all(|r| r["tid"].is_null() || r["tid"] == u64::from(tid)));

    // The kernel's own count of the same thread's events (tracefs) agrees with the
    // totals. The tracefs instance was enabled before the capture started, so it also
    // holds what came before the first snapshot, which the kvm source counts in its
    // first tick: both are "since the guest started".
    for (col, n) in &truth {
        assert_eq!(
            u(&final_thread[col.as_str()]),
            *n,
            "{col}: kvm source vs tracefs"
        );
    }
    // No firmware but the probe: the totals are the probe's own, exactly.
    let exact = [
        ("pio_writes", OUTS + 1),
        ("pio_reads", INS),
        ("cpuid_exits", CPUIDS),
        ("msr_reads", RDMSRS + WRMSRS),
        ("msr_writes", WRMSRS),
        ("mmio_reads", 0),
        ("mmio_writes", 0),
        ("hypercalls", 0),
    ];
    for (col, n) in exact {
        assert_eq!(u(&final_thread[col]), n, "{col}");
    }

    // Every row written before the traced guest was let go, while the other one ran: no
    // exit counted.
    assert!(
        before_cont.len() > 10,
        "{} rows before cont",
        before_cont.len()
    );
    for r in &before_cont {
        for (col, _) in keyed {
            assert_eq!(r[col], 0, "before cont: {r}");
        }
    }

    assert_valid(&dir);

    // The Parquet export types both streams and reads them back value for value.
    let dataset = tmp.path().join("dataset");
    let x = cis490()
        .arg("export")
        .arg(&dir)
        .arg("--out")
        .arg(&dataset)
        .arg("--verify")
        .output()
        .unwrap();
    assert!(
        x.status.success(),
        "export: {}",
        String::from_utf8_lossy(&x.stderr)
    );
    assert!(dataset.join("kvm").is_dir() && dataset.join("kvm-keys").is_dir());

    // The report ranks the CPUID leaves and MSRs of each phase.
    let png = tmp.path().join("report.png");
    let out = cis490()
        .arg("report")
        .arg(&dir)
        .arg("--output")
        .arg(&png)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |kind: &str, key: &str| {
        table
            .lines()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.windows(2).any(|p| p == [kind, key])
            })
            .unwrap_or_else(|| panic!("no {kind} {key} in the report table:\n{table}"))
            .to_owned()
    };
    assert!(
        line("cpuid", "0x40000010").ends_with(&format!(" {CPUIDS}")),
        "{table}"
    );
    assert!(
        line("msr_read", "0x10").contains("IA32_TIME_STAMP_COUNTER"),
        "{table}"
    );
    assert!(table.contains("vm-exits: pio_writes [exits/s]"), "{table}");
}

/// A guest that sprays keys: CPUIDs of thousands of distinct leaves at a key table of 64
/// entries. Those leaves lose their keys (rows with key null), never their count: the
/// CPUID total stays exact (probe and tracefs), the overflow is in meta.sources and a
/// source_error event, and nothing is lost outright.
#[test]
fn a_guest_spraying_keys_overflows_the_table_without_losing_a_count() {
    if !capable() {
        return;
    }
    const SPREAD: u64 = 3000;
    let tmp = tempfile::tempdir().unwrap();
    let image = firmware(tmp.path(), SPREAD);
    let target = Guest::start(tmp.path(), "target", &image);
    let tid = target.vcpu_tid();
    let kernel = KernelCount::start(tid);
    let data = tmp.path().join("data");
    let child = spawn_trace(
        &data,
        &[
            "--qemu-pid",
            &target.pid.to_string(),
            "--duration",
            "120",
            "--kvm-key-table",
            "64",
        ],
    );
    assert!(wait_for(Duration::from_secs(30), || {
        first_episode_has_rows(&data, "telemetry-kvm.jsonl")
    }));
    target.qmp("cont");
    let (ok, dir, stderr) = wait_trace(child, Duration::from_secs(120));
    assert!(ok, "trace failed: {stderr}");
    let truth = kernel.counts();

    let meta = read_json(&dir.join("meta.json"));
    let src = source_meta(&meta, "kvm");
    assert_eq!(src["key_table_entries"], 64, "{src}");
    assert_eq!(src["lost_events"], 0, "{src}");
    let overflow = u(&src["overflow_events"]);
    assert!(overflow > 0, "{src}");

    let rows = read_jsonl(&dir.join("telemetry-kvm.jsonl"));
    let last = rows
        .iter()
        .rev()
        .find(|r| r["tid"] == u64::from(tid))
        .unwrap();
    assert_eq!(u(&last["cpuid_exits"]), CPUIDS + SPREAD);
    assert_eq!(truth["cpuid_exits"], CPUIDS + SPREAD);

    // The keys that kept their own rows plus the overflow rows add up to the total.
    let keys = read_jsonl(&dir.join("telemetry-kvm-keys.jsonl"));
    let mut cpuid: BTreeMap<Option<u64>, u64> = BTreeMap::new();
    let mut overflow_rows = 0;
    for r in keys.iter().filter(|r| r["kind"] == "cpuid") {
        cpuid.insert(r["key"].as_u64(), u(&r["count"]));
        if r["key"].is_null() {
            assert_eq!(r["name"], "(key table full)", "{r}");
            overflow_rows += 1;
        }
    }
    assert!(overflow_rows > 0);
    assert_eq!(cpuid.values().sum::<u64>(), CPUIDS + SPREAD, "{cpuid:?}");
    // Every kind's overflow, across kinds, is what meta.sources counts.
    let mut all: BTreeMap<(String, Option<u64>), u64> = BTreeMap::new();
    for r in &keys {
        all.insert(
            (r["kind"].as_str().unwrap().to_owned(), r["key"].as_u64()),
            u(&r["count"]),
        );
    }
    let null_total: u64 = all
        .iter()
        .filter(|((_, k), _)| k.is_none())
        .map(|(_, c)| c)
        .sum();
    assert_eq!(null_total, overflow);

    let events = read_jsonl(&dir.join("events.jsonl"));
    assert!(
        has_source_error(&events, "kvm", "kvm key table full"),
        "no source_error for the full table"
    );
    assert_valid(&dir);
}
