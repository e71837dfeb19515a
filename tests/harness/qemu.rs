//! The real test VM (`xtask vm start|stop`), one per test, in its own run directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::paths::{bin, root};

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
            .current_dir(root())
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
