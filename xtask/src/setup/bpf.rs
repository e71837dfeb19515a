//! Set-up for the BPF backend: nightly rust-src, bpf-linker, tracefs, test tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::util;

/// The BPF toolchain: nightly with rust-src (the BPF crate is built with
/// `-Z build-std=core`), bpf-linker 0.13.0 linked against that nightly's own libLLVM,
/// installed under `target/tools` (found there by cis490/build.rs), and a mounted tracefs.
/// Each step checks first, so a machine that has everything pays a few process starts.
pub fn bpf() -> anyhow::Result<()> {
    let nightly = nightly_info()?;
    ensure_rust_src(&nightly)?;
    ensure_bpf_linker(&nightly)?;
    ensure_tracefs();
    ensure_test_tools()
}

/// The BPF tests build a veth pair in a network namespace (`ip`, from iproute2) and drop
/// capabilities (`setpriv`, from util-linux, always present on Debian).
fn ensure_test_tools() -> anyhow::Result<()> {
    let have_ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .any(|p| Path::new(p).exists());
    if have_ip {
        return Ok(());
    }
    eprintln!("setup: installing iproute2 (for the network-namespace tests)");
    util::run(Command::new("apt-get").args(["update", "-qq"]))?;
    util::run(Command::new("apt-get").args([
        "install",
        "-y",
        "--no-install-recommends",
        "iproute2",
    ]))
}

/// What `rustc +nightly -vV` and `--print sysroot` say.
struct Nightly {
    sysroot: PathBuf,
    release: String,
    host: String,
    llvm_major: String,
}

/// A command with the environment cargo sets for `cargo xtask` removed, so the
/// `+nightly` toolchain and its own flags apply.
pub fn clean(program: &str) -> Command {
    let mut c = Command::new(program);
    for k in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        c.env_remove(k);
    }
    c
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_info() -> anyhow::Result<Nightly> {
    let vv = match output(clean("rustc").args(["+nightly", "-vV"])) {
        Ok(v) => v,
        Err(_) => {
            eprintln!("setup: installing the nightly toolchain (minimal profile, rust-src)");
            util::run(clean("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            output(clean("rustc").args(["+nightly", "-vV"]))?
        }
    };
    let field = |k: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("`rustc +nightly -vV` has no `{k}` line"))
    };
    let release = field("release:")?;
    let host = field("host:")?;
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm.split('.').next().unwrap_or_default().to_owned();
    let sysroot =
        PathBuf::from(output(clean("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    Ok(Nightly {
        sysroot,
        release,
        host,
        llvm_major,
    })
}

fn ensure_rust_src(n: &Nightly) -> anyhow::Result<()> {
    let src = n.sysroot.join("lib/rustlib/src/rust/library/core");
    if src.is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    util::run(clean("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

pub fn tools_dir() -> PathBuf {
    util::root().join("target").join("tools")
}

fn linker_works(path: &Path) -> bool {
    Command::new(path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The nightly's own libLLVM (`libLLVM-22-rust-1.97.0-nightly.so`), linked by name.
fn llvm_dylib(n: &Nightly) -> anyhow::Result<String> {
    let lib = n.sysroot.join("lib");
    let expected = format!("LLVM-{}-rust-{}", n.llvm_major, n.release);
    if lib.join(format!("lib{expected}.so")).exists() {
        return Ok(expected);
    }
    // Fall back to whatever libLLVM-<major>-*.so the toolchain ships.
    for e in std::fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_prefix("lib").and_then(|s| s.strip_suffix(".so")) {
            if stem.starts_with(&format!("LLVM-{}", n.llvm_major)) {
                return Ok(stem.to_owned());
            }
        }
    }
    bail!(
        "no libLLVM-{}*.so in {} (the nightly toolchain ships one; reinstall it with `rustup toolchain install nightly`)",
        n.llvm_major,
        lib.display()
    )
}

fn ensure_bpf_linker(n: &Nightly) -> anyhow::Result<()> {
    let tools = tools_dir();
    let linker = tools.join("bin").join("bpf-linker");
    if linker_works(&linker) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker 0.13.0 against the nightly's LLVM {} into {} (about a minute)",
        n.llvm_major,
        tools.display()
    );
    let dylib = llvm_dylib(n)?;
    let lib = n.sysroot.join("lib");
    let rustflags = format!(
        "-L native={lib} -l dylib={dylib} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib.display()
    );
    let features = format!("llvm-{},no-llvm-linking", n.llvm_major);
    // `--target` keeps RUSTFLAGS off build scripts and proc macros.
    util::run(
        clean("cargo")
            .env("RUSTFLAGS", rustflags)
            .args([
                "+nightly",
                "install",
                "bpf-linker@0.13.0",
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features", &features])
            .args(["--target", &n.host])
            .arg("--root")
            .arg(&tools)
            .arg("--target-dir")
            .arg(tools.join("build")),
    )?;
    if !linker_works(&linker) {
        bail!("{} was built but does not start", linker.display());
    }
    Ok(())
}

/// tracefs is where tracepoints are attached; mount it if it is not. Not fatal: without
/// root the capture falls back to /proc and `cis490 doctor` explains why.
fn ensure_tracefs() {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tracefs"));
    if mounted {
        return;
    }
    let ok = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "setup: warning: could not mount tracefs at /sys/kernel/tracing (not root?); \
             the BPF backend will be unavailable and captures use /proc"
        );
    }
}
