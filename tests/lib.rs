//! Harness for the integration tests: locate the built binaries, start the bundled
//! target, run `cis490 trace`, and read an episode back.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A binary of the workspace, built by `cargo build --workspace --bins` (which
/// `cargo xtask test` runs before the tests).
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

pub fn cis490() -> Command {
    Command::new(bin("cis490"))
}

/// The bundled multi-threaded target, killed when dropped.
pub struct Load {
    pub child: Child,
}

impl Load {
    /// Start `cis490-testload ARGS` and wait until it prints READY.
    pub fn start(args: &[&str]) -> Load {
        let mut child = Command::new(bin("cis490-testload"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start cis490-testload");
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read READY");
        assert!(line.starts_with("READY "), "testload said {line:?}");
        Load { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.kill();
    }
}

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

/// Wait until `cond` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
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

pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a pid this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}
