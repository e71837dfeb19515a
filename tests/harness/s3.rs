//! A real S3-compatible server on 127.0.0.1 for the shipper's tests: s3s-fs (installed by
//! `cargo xtask setup` under target/tools, beside bpf-linker), SigV4 with its own
//! credentials, objects stored as plain files under a temp root the tests can read.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::paths::target_dir;
use super::process::wait_for;

pub const ACCESS_KEY: &str = "cis490-test-key";
pub const SECRET_KEY: &str = "cis490-test-secret-0123456789";
pub const BUCKET: &str = "lab";

/// The s3s-fs binary. A missing one is a failure with the fix, never a skip: every
/// machine that ran `cargo xtask setup` has it.
pub fn s3s_fs() -> PathBuf {
    let p = target_dir().join("tools/bin/s3s-fs");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (it installs s3s-fs for the shipper's tests)",
        p.display()
    );
    p
}

pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    /// The store's root: bucket `lab` is the folder `lab/`, an object its path below it.
    pub root: tempfile::TempDir,
    /// The shippers' `--state-dir` (their multipart journals), one per server.
    pub state: tempfile::TempDir,
}

impl S3Server {
    /// Start on a free port with bucket [`BUCKET`] created.
    pub fn start() -> S3Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket folder");
        let mut s = S3Server {
            child: None,
            port,
            root,
            state: tempfile::tempdir().expect("temp dir"),
        };
        s.restart();
        s
    }

    /// (Re)start the server on the same port and root.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_for(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "s3s-fs did not listen on 127.0.0.1:{port}"
        );
    }

    /// Kill the server (the store is down until [`restart`](Self::restart)).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the server keeps the object `key` of the bucket.
    pub fn object(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// Every object key under `prefix` (plain files; s3s-fs keeps its own metadata in
    /// dot-files at the root, not under the bucket).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let base = self.root.path().join(BUCKET);
        let mut out = Vec::new();
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        walk(&base.join(prefix), &base, &mut out);
        out.sort();
        out
    }

    /// `cis490 ship DATA_ROOT --to s3://lab/PREFIX --endpoint …` with this server's
    /// credentials in the environment.
    pub fn ship(&self, data_root: &Path, prefix: &str) -> Command {
        let mut c = Command::new(super::paths::bin("cis490"));
        c.arg("ship")
            .arg(data_root)
            .arg("--to")
            .arg(format!("s3://{BUCKET}/{prefix}"))
            .arg("--endpoint")
            .arg(self.endpoint())
            .arg("--state-dir")
            .arg(self.state.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env_remove("AWS_ENDPOINT")
            .env_remove("AWS_SESSION_TOKEN");
        c
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
