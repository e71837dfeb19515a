//! `cargo install` of a pinned tool into target/tools (cargo-fuzz, s3s-fs), unless a
//! working one is already there.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::util;

/// A tool installed with `cargo install SPEC --locked [FEATURES]`.
pub struct Tool<'a> {
    /// `name@version`.
    pub spec: &'a str,
    /// The binary under target/tools/bin.
    pub bin: &'a str,
    /// Arguments that make a working binary exit 0 (`--version`).
    pub check: &'a [&'a str],
    pub features: &'a [&'a str],
    /// What it is for and how long it takes, for the set-up's one line.
    pub why: &'a str,
}

impl Tool<'_> {
    pub fn ensure(&self) -> anyhow::Result<()> {
        let tools = super::bpf::tools_dir();
        let bin = tools.join("bin").join(self.bin);
        let works = |b: &Path| {
            Command::new(b)
                .args(self.check)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if works(&bin) {
            return Ok(());
        }
        eprintln!(
            "setup: installing {} ({}) into {}",
            self.spec,
            self.why,
            tools.display()
        );
        let mut cmd = Command::new("cargo");
        cmd.env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .args(["install", self.spec, "--locked"]);
        if !self.features.is_empty() {
            cmd.arg("--features").arg(self.features.join(","));
        }
        cmd.arg("--root")
            .arg(&tools)
            .arg("--target-dir")
            .arg(tools.join("build"));
        util::run(&mut cmd)?;
        if !works(&bin) {
            bail!("{} was built but does not start", bin.display());
        }
        Ok(())
    }
}
