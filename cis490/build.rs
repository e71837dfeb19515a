//! Builds the kernel programs (crate `cis490-ebpf`, target bpfel-unknown-none, nightly
//! toolchain with rust-src) with aya-build and leaves the object in OUT_DIR, from where
//! `bpf::loader` embeds it into the binary.
//!
//! The BPF link step needs bpf-linker built against the nightly's LLVM. It lives in the
//! project's own `target/tools/bin` (installed by `cargo xtask setup`), never on a global
//! path, so the build says what to run instead of failing deep inside rustc.

use std::path::PathBuf;
use std::process::Command;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow::anyhow!("cis490 crate has no parent directory"))?
        .to_owned();
    let tools = root.join("target").join("tools").join("bin");
    let linker = tools.join("bpf-linker");
    println!("cargo:rerun-if-changed={}", linker.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("cis490-common").join("src").display()
    );

    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !works {
        let what = if linker.exists() {
            "does not start (the nightly toolchain it was built against changed?)"
        } else {
            "is missing"
        };
        // A plain message and exit(1): no backtrace burying the one line that matters.
        eprintln!(
            "\nerror: bpf-linker at {} {what}.\n  Run `cargo xtask setup` (installs rust-src for nightly \
             and bpf-linker matched to its LLVM into target/tools), then build again.\n",
            linker.display()
        );
        std::process::exit(1);
    }
    // The nested cargo build of the BPF crate finds the linker through PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools];
    dirs.extend(std::env::split_paths(&path));
    // SAFETY: build scripts are single-threaded here; the variable is only read by the
    // child processes spawned below.
    std::env::set_var("PATH", std::env::join_paths(dirs)?);

    let ebpf_dir = root.join("cis490-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "cis490-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
