//! Set-up for `cargo xtask fuzz`: cargo-fuzz under target/tools (beside bpf-linker), and
//! the nightly toolchain it drives (installed by the BPF set-up).

use std::process::Command;

use anyhow::bail;

use crate::util;

/// The cargo-fuzz version `cargo xtask fuzz` is run with (`--locked`: its own lock file).
const CARGO_FUZZ: &str = "cargo-fuzz@0.13.2";

/// Install cargo-fuzz into target/tools/bin unless a working one is there.
pub fn fuzz() -> anyhow::Result<()> {
    let tools = super::bpf::tools_dir();
    let bin = tools.join("bin").join("cargo-fuzz");
    let works = |b: &std::path::Path| {
        Command::new(b)
            .args(["fuzz", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&bin) {
        return Ok(());
    }
    eprintln!(
        "setup: installing {CARGO_FUZZ} into {} (about two minutes)",
        tools.display()
    );
    util::run(
        Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .args(["install", CARGO_FUZZ, "--locked"])
            .arg("--root")
            .arg(&tools)
            .arg("--target-dir")
            .arg(tools.join("build")),
    )?;
    if !works(&bin) {
        bail!("{} was built but does not start", bin.display());
    }
    Ok(())
}
