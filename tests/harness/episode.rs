//! Running a capture and reading an episode back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::paths::bin;

/// The episode directory printed as the last stdout line of `cis490 trace`.
pub fn episode_dir_from(out: &Output) -> PathBuf {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no stdout; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let dir = PathBuf::from(last.trim());
    assert!(
        dir.is_absolute(),
        "last stdout line is not an absolute path: {last:?}"
    );
    assert!(dir.is_dir(), "{} is not a directory", dir.display());
    dir
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every line of a JSON-lines file, each parsed (a parse failure names the line).
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{}: {e}: {l}", path.display(), i + 1))
        })
        .collect()
}

/// The episode directories under a data root.
pub fn episodes(data_root: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(data_root.join("episodes")) {
        Ok(rd) => rd
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.is_dir())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether the first episode under `data_root` has rows in `file` yet: the capture's
/// sources are running.
pub fn first_episode_has_rows(data_root: &Path, file: &str) -> bool {
    episodes(data_root)
        .first()
        .is_some_and(|d| std::fs::metadata(d.join(file)).is_ok_and(|m| m.len() > 0))
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

/// Whether `events` hold a `source_error` of `source` whose message contains `needle`.
pub fn has_source_error(events: &[Value], source: &str, needle: &str) -> bool {
    events.iter().any(|e| {
        e["event"] == "source_error"
            && e["source"] == source
            && e["message"].as_str().is_some_and(|m| m.contains(needle))
    })
}

/// `cis490 validate DIR` passes (its report is the failure message).
pub fn assert_valid(dir: &Path) {
    let out = super::paths::cis490()
        .arg("validate")
        .arg(dir)
        .output()
        .expect("run cis490 validate");
    assert!(
        out.status.success(),
        "cis490 validate {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}
