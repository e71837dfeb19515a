//! Set-up for the shipper's tests (tests/ship.rs): s3s-fs, an S3-compatible server that
//! keeps objects as files (SigV4, multipart), under target/tools beside bpf-linker. The
//! tests start it on 127.0.0.1 themselves.

use std::process::Command;

use anyhow::bail;

use crate::util;

const S3S_FS: &str = "s3s-fs@0.14.1";

/// Install s3s-fs into target/tools/bin unless a working one is there.
pub fn s3() -> anyhow::Result<()> {
    let tools = super::bpf::tools_dir();
    let bin = tools.join("bin").join("s3s-fs");
    let works = |b: &std::path::Path| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&bin) {
        return Ok(());
    }
    eprintln!(
        "setup: installing {S3S_FS} (the tests' S3 server) into {} (about three minutes)",
        tools.display()
    );
    util::run(
        Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .args(["install", S3S_FS, "--features", "binary", "--locked"])
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
