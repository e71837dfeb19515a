//! Helpers for the QEMU-facing tests: locating binaries, running a capture, reading an
//! episode, and the real test VM (`xtask vm start|stop`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A workspace binary built by `cargo build --workspace --bins` (what `cargo xtask test` does first).
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join("debug").join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace --bins` (cargo xtask test does)",
        p.display()
    );
    p
}

pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/data/qemu-10.0.2").join(name)
}

/// A long-lived stand-in target process (killed on drop).
pub struct Sleeper(pub Child);

impl Sleeper {
    pub fn spawn() -> Self {
        Sleeper(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep"),
        )
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cis490 trace` with `args` (plus `--data-root root`); stdout/stderr captured.
pub fn spawn_trace(root: &Path, args: &[&str]) -> Child {
    Command::new(bin("cis490"))
        .arg("trace")
        .arg("--data-root")
        .arg(root)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cis490 trace")
}

/// Wait for a capture to end; returns (exit ok, episode dir from the last stdout line, stderr).
pub fn wait_trace(child: Child, timeout: Duration) -> (bool, PathBuf, String) {
    let pid = child.id();
    let t = Instant::now();
    let killer = std::thread::spawn(move || {
        while t.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(100));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().expect("wait cis490");
    let _ = killer.join();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    (out.status.success(), dir, stderr)
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

pub fn events_named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

/// The source's entry in meta.sources.
pub fn source_meta<'a>(meta: &'a Value, name: &str) -> &'a Value {
    meta["sources"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no source {name} in meta: {}", meta["sources"]))
}

/// Peak resident memory (VmHWM, KiB) of a live process.
pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The real test VM, started by `xtask vm start` in its own run directory, stopped on drop.
pub struct TestVm {
    pub run_dir: PathBuf,
    pub info: HashMap<String, String>,
}

impl TestVm {
    pub fn start(run_dir: &Path) -> Self {
        let out = Command::new(bin("xtask"))
            .args(["vm", "start", "--run-dir"])
            .arg(run_dir)
            .current_dir(workspace_root())
            .output()
            .expect("run xtask vm start");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "xtask vm start failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        TestVm {
            run_dir: run_dir.to_owned(),
            info,
        }
    }

    pub fn get(&self, key: &str) -> &str {
        self.info
            .get(key)
            .unwrap_or_else(|| panic!("xtask vm start printed no {key}="))
    }

    pub fn pid(&self) -> u32 {
        self.get("PID").parse().expect("PID is a number")
    }

    /// Type a command on the guest's serial console and wait for `marker` in the console log.
    pub fn console_run(&self, cmd: &str, marker: &str, timeout: Duration) -> String {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(self.get("CONSOLE"))
            .expect("connect console socket");
        s.write_all(format!("{cmd}\n").as_bytes())
            .expect("write console");
        let log = PathBuf::from(self.get("CONSOLE_LOG"));
        let t = Instant::now();
        loop {
            let text =
                String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
            if text.contains(marker) {
                return text;
            }
            assert!(
                t.elapsed() < timeout,
                "no {marker:?} on the guest console within {timeout:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = Command::new(bin("xtask"))
            .args(["vm", "stop", "--run-dir"])
            .arg(&self.run_dir)
            .status();
    }
}

/// The contract: `t_mono_ns` never decreases within a file.
pub fn assert_mono_non_decreasing(dir: &Path, file: &str) {
    let rows = read_jsonl(&dir.join(file));
    let t: Vec<u64> = rows
        .iter()
        .map(|r| r["t_mono_ns"].as_u64().unwrap())
        .collect();
    if let Some(i) = t.windows(2).position(|w| w[1] < w[0]) {
        panic!(
            "{file}: t_mono_ns decreases at line {}: {} then {}",
            i + 2,
            t[i],
            t[i + 1]
        );
    }
}
