//! Set-up for the test VM and the static guest agent: musl target and musl-gcc, QEMU
//! 10.0.2 from bookworm-backports.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// The in-guest agent is a static musl build of cis490. Rust's musl target brings its own
/// libc, but C code in dependencies (zstd-sys) needs musl-gcc: Debian's musl-tools.
fn musl_target() -> anyhow::Result<()> {
    if output("x86_64-linux-musl-gcc", &["--version"]).is_none() {
        eprintln!("setup: installing musl-tools (musl-gcc for C code in the static agent build)");
        apt_install(&["musl-tools"])?;
    }
    const T: &str = "x86_64-unknown-linux-musl";
    let installed = output("rustup", &["target", "list", "--installed"]);
    match installed {
        Some(list) if list.lines().any(|l| l.trim() == T) => Ok(()),
        Some(_) => {
            let status = Command::new("rustup")
                .args(["target", "add", T])
                .status()
                .context("running rustup")?;
            if !status.success() {
                bail!("rustup target add {T} failed: {status}");
            }
            Ok(())
        }
        // No rustup: trust the toolchain (a missing target fails the agent build clearly).
        None => Ok(()),
    }
}

/// The kvm test's guest is a firmware image assembled from tests/qemu/guest/kvm-probe.S by
/// the test itself: GNU as and ld (binutils, which gcc usually brings along).
fn boot_sector_tools() -> anyhow::Result<()> {
    if output("as", &["--version"]).is_none() || output("ld", &["--version"]).is_none() {
        eprintln!("setup: installing binutils (as, ld: the kvm test's probe firmware)");
        apt_install(&["binutils"])?;
    }
    Ok(())
}

/// QEMU 10.0.2 comes from bookworm-backports; everything else stays on bookworm.
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/cis490-bookworm-backports.sources";
const BACKPORTS_SOURCES_TEXT: &str = "\
# Added by cis490 `cargo xtask setup` (setup::vm): QEMU 10.0.2 for the test VM.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";
/// Backports stay at the default priority 100 (never chosen on their own); only QEMU and
/// the firmware its 10.0.2 build depends on are pinned to it.
const BACKPORTS_PIN: &str = "/etc/apt/preferences.d/cis490-qemu-backports";
const BACKPORTS_PIN_TEXT: &str = "\
# Added by cis490 `cargo xtask setup` (setup::vm): take only QEMU from bookworm-backports.
Package: *
Pin: release n=bookworm-backports
Pin-Priority: 100

Package: qemu-system-x86 qemu-system-common qemu-system-data qemu-utils qemu-block-extra seabios ipxe-qemu
Pin: release n=bookworm-backports
Pin-Priority: 990
";
pub const QEMU_VERSION: &str = "10.0.2";

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn has_version(cmd: &str, version: &str) -> bool {
    output(cmd, &["--version"]).is_some_and(|v| v.contains(&format!("version {version}")))
}

fn write_if_different(path: &str, text: &str) -> anyhow::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    std::fs::write(path, text).with_context(|| format!("writing {path}"))?;
    Ok(true)
}

/// `apt-get install` with the package lists refreshed first when the install fails
/// (a fresh machine's lists may be missing or stale).
fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(pkgs);
    if apt(&args).is_ok() {
        return Ok(());
    }
    apt(&["update"])?;
    apt(&args)
}

fn apt(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// The test VM's host side: qemu-system-x86 and qemu-utils 10.0.2 from bookworm-backports.
/// The guest's kernel and busybox are fetched (not installed) by `xtask vm` into target/.
pub fn vm() -> anyhow::Result<()> {
    musl_target()?;
    boot_sector_tools()?;
    if has_version("qemu-system-x86_64", QEMU_VERSION) && has_version("qemu-img", QEMU_VERSION) {
        return Ok(());
    }
    if !Path::new("/etc/debian_version").exists() {
        bail!("setup::vm knows Debian bookworm only; install QEMU {QEMU_VERSION} yourself");
    }
    eprintln!("setup: installing QEMU {QEMU_VERSION} from bookworm-backports");
    let changed = write_if_different(BACKPORTS_SOURCES, BACKPORTS_SOURCES_TEXT)?
        | write_if_different(BACKPORTS_PIN, BACKPORTS_PIN_TEXT)?;
    if changed
        || output("apt-cache", &["policy", "qemu-system-x86"])
            .is_none_or(|p| !p.contains(&format!(":{QEMU_VERSION}")))
    {
        apt(&["update"])?;
    }
    apt(&[
        "install",
        "-y",
        "--no-install-recommends",
        "qemu-system-x86",
        "qemu-utils",
    ])?;
    if !has_version("qemu-system-x86_64", QEMU_VERSION) {
        bail!("qemu-system-x86_64 is not {QEMU_VERSION} after installing it from backports");
    }
    Ok(())
}
