//! Where things are: the workspace, its built binaries, the real fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The cargo target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// A binary of the workspace, built by `cargo build --workspace --bins` (which
/// `cargo xtask test` runs before the tests).
pub fn bin(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// The built `cis490` binary.
pub fn cis490_path() -> PathBuf {
    bin("cis490")
}

/// A command for the built `cis490` binary.
pub fn cis490() -> Command {
    Command::new(cis490_path())
}

/// A real QEMU 10.0.2 fixture (QMP replies, /proc snapshots, agent lines).
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/data/qemu-10.0.2").join(name)
}
