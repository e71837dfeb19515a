//! `cargo xtask vm start|stop|status`: the small test guest every QEMU-facing test, the
//! demo and manual work trace.
//!
//! Assets are built from Debian packages only and cached under `<target>/cis490-vm/`:
//! the guest kernel (`apt-get download linux-image-*-cloud-amd64` + `dpkg -x`, never
//! installed), and an uncompressed initramfs (busybox-static, the virtio modules in
//! dependency order read from each module's `.modinfo`, a static musl build of `cis490`
//! as the in-guest agent, and `/init`). The initramfs is rebuilt only when one of its
//! inputs changes. Uncompressed because under TCG unpacking gzip costs more than copying.
//!
//! `start` boots QEMU daemonized (KVM only if it has been seen to boot this guest on this
//! host kernel, TCG otherwise; the verdict is cached) and returns once the agent's first
//! line arrived on the agent socket, printing `KEY=VALUE` lines.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::util;

/// Modules the guest needs; their dependencies are added from `.modinfo`.
const WANTED_MODULES: &[&str] = &["virtio_pci", "virtio_console", "virtio_blk", "virtio_net"];
pub const AGENT_PORT_NAME: &str = "cis490.guest.agent";
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::root().join("target"))
}

fn vm_dir() -> PathBuf {
    target_dir().join("cis490-vm")
}

pub fn default_run_dir() -> PathBuf {
    vm_dir().join("run").join("default")
}

#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// Build (if stale) and boot the test VM; print KEY=VALUE lines once the agent talks.
    Start {
        #[command(flatten)]
        opts: StartOpts,
    },
    /// Stop the VM of a run directory.
    Stop {
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Print KEY=VALUE lines of a running VM; exit 1 when it is not running.
    Status {
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Only build the guest kernel + initramfs (cached).
    Build,
    /// The VM network's DNS responder and HTTP server (run by `start` inside the VM's
    /// network namespace; see vm_net.rs).
    #[command(hide = true)]
    NetServe {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        addr: String,
    },
}

#[derive(clap::Args, Clone)]
pub struct StartOpts {
    /// Directory for sockets, disk, logs and the pid file (default target/cis490-vm/run/default).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u32,
    #[arg(long, default_value_t = 64)]
    pub disk_mib: u32,
    /// tcg, kvm, or auto (kvm only when it has been seen to boot the guest here).
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Agent lines per second in the guest.
    #[arg(long, default_value_t = 10)]
    pub agent_rate_hz: u32,
    /// Seconds to wait for the agent's first line.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Extra guest kernel command-line words (e.g. "loglevel=7" to see the boot;
    /// "cis490.beacon_s=2" makes the guest resolve a name and fetch a page every 2 s).
    #[arg(long, default_value = "")]
    pub append: String,
    /// The guest's network: `tap` (a tap in a network namespace of the VM's own, with a
    /// DNS responder and an HTTP server in it; root), `user` (QEMU's user-mode network,
    /// closed to the outside), or `auto` (tap where it can be made).
    #[arg(long, default_value = "auto")]
    pub net: String,
}

impl Default for StartOpts {
    /// The same defaults as the command line (for `xtask demo` and other callers).
    fn default() -> Self {
        Self {
            run_dir: None,
            smp: 2,
            mem_mib: 256,
            disk_mib: 64,
            accel: "auto".into(),
            agent_rate_hz: 10,
            timeout_s: 60,
            append: String::new(),
            net: "auto".into(),
        }
    }
}

pub fn run(cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Start { opts } => {
            let vm = start(&opts)?;
            for (k, v) in vm {
                println!("{k}={v}");
            }
            Ok(())
        }
        VmCommand::Stop { run_dir } => stop(&run_dir.unwrap_or_else(default_run_dir)),
        VmCommand::Status { run_dir } => {
            let dir = run_dir.unwrap_or_else(default_run_dir);
            match running_pid(&dir) {
                Some(pid) => {
                    println!("RUNNING=1");
                    for (k, v) in describe(&dir, pid) {
                        println!("{k}={v}");
                    }
                    Ok(())
                }
                None => {
                    println!("RUNNING=0");
                    std::process::exit(1)
                }
            }
        }
        VmCommand::NetServe { netns, addr } => crate::vm_net::serve(&netns, &addr),
        VmCommand::Build => {
            let a = build_assets()?;
            println!(
                "KERNEL={}\nINITRD={}",
                a.kernel.display(),
                a.initrd.display()
            );
            Ok(())
        }
    }
}

pub struct Assets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The current cloud kernel package, from the meta-package's dependency.
fn kernel_package() -> anyhow::Result<String> {
    // Stale or missing apt lists (a fresh machine, an old cache): update once and retry.
    kernel_package_once().or_else(|_| {
        sh(Command::new("apt-get").args(["-q", "update"]))?;
        kernel_package_once()
    })
}

fn kernel_package_once() -> anyhow::Result<String> {
    let deps = sh(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_owned)
        .context("apt-cache depends linux-image-cloud-amd64 names no linux-image-*-cloud-amd64 (run apt-get update)")
}

/// `apt-get download` + `dpkg -x` of one package into `<vm>/pkg/<name>/`, once.
fn fetch_and_extract(pkg: &str) -> anyhow::Result<PathBuf> {
    let dest = vm_dir().join("pkg").join(pkg);
    let done = dest.join(".extracted");
    if done.exists() {
        return Ok(dest);
    }
    let debs = vm_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
    };
    let deb = match find() {
        Some(d) => d,
        None => {
            eprintln!("vm: apt-get download {pkg}");
            let download = || {
                sh(Command::new("apt-get")
                    .args(["-q", "-o", "APT::Sandbox::User=root", "download", pkg])
                    .current_dir(&debs))
            };
            if download().is_err() {
                // A 404 from outdated lists: refresh them once.
                sh(Command::new("apt-get").args(["-q", "update"]))?;
                download()?;
            }
            find().with_context(|| format!("apt-get download {pkg} left no .deb"))?
        }
    };
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest)?;
    sh(Command::new("dpkg").arg("-x").arg(&deb).arg(&dest))?;
    std::fs::write(&done, deb.to_string_lossy().as_bytes())?;
    Ok(dest)
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated key=value strings).
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Modules to insert, dependencies first. Built-in modules are skipped.
fn module_order(moddir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = n.strip_suffix(".ko") {
                    files.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
    }
    let builtin = std::fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |m: &str| {
        builtin.lines().any(|l| {
            l.rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".ko"))
                .is_some_and(|f| f.replace('-', "_") == m)
        })
    };
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        m: &str,
        files: &BTreeMap<String, PathBuf>,
        is_builtin: &dyn Fn(&str) -> bool,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        if !seen.insert(m.to_owned()) {
            return Ok(());
        }
        let Some(path) = files.get(m) else {
            if is_builtin(m) {
                return Ok(());
            }
            bail!("guest kernel has no module {m} (neither .ko nor built in)");
        };
        for dep in modinfo_depends(&std::fs::read(path)?) {
            visit(&dep, files, is_builtin, seen, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
    for m in WANTED_MODULES {
        visit(m, &files, &is_builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

const INIT: &str = r#"#!/bin/busybox sh
# cis490 test guest init: mounts, virtio modules, the agent port, the agent, a console shell.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m"; done
# No udev here: name the virtio-serial ports the way udev would (names arrive late: poll).
mkdir -p /dev/virtio-ports
i=0
while [ ! -e /dev/virtio-ports/cis490.guest.agent ] && [ $i -lt 400 ]; do
  for d in /sys/class/virtio-ports/*; do
    [ -r "$d/name" ] || continue
    n=$(cat "$d/name")
    [ -n "$n" ] && ln -sf "/dev/${d##*/}" "/dev/virtio-ports/$n"
  done
  [ -e /dev/virtio-ports/cis490.guest.agent ] || sleep 0.05
  i=$((i+1))
done
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
ip route add default via 10.0.2.2 2>/dev/null
# The gateway resolves (the tap network's responder; QEMU's user network answers at .3).
if grep -q cis490.net=user /proc/cmdline; then ns=10.0.2.3; else ns=10.0.2.2; fi
echo "nameserver $ns" > /etc/resolv.conf
# cis490.beacon_s=N: every N s resolve a name and send a request to the address it
# resolved to, as a beaconing implant (busybox's wget crashes in this static build: nc).
beacon=$(sed -n 's/.*cis490.beacon_s=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$beacon" ]; then
  ( i=0; while true; do i=$((i+1))
      a=$(nslookup "beacon-$i.c2.cis490.test" 2>/dev/null | sed -n 's/^Address: *\([0-9.]*\)$/\1/p' | tail -n 1)
      [ -n "$a" ] && printf 'GET /beacon/%s HTTP/1.0\r\n\r\n' "$i" | nc -w 2 "$a" 8080 >/dev/null 2>&1
      sleep "$beacon"; done ) &
fi
rate=$(sed -n 's/.*cis490.agent_rate_hz=\([0-9]*\).*/\1/p' /proc/cmdline)
/bin/cis490 agent --rate-hz "${rate:-10}" </dev/null >/dev/console 2>&1 &
echo "cis490-guest: ready"
while true; do setsid cttyhack sh; done
"#;

/// Minimal `newc` cpio writer (what the kernel unpacks as initramfs).
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let header =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, data.len(), 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }
    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data, (0, 0));
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

fn agent_binary() -> PathBuf {
    target_dir()
        .join(MUSL_TARGET)
        .join("guest-agent")
        .join("cis490")
}

/// Build the static agent (profile `guest-agent`: release without debug info): it is what a deployment would
/// run in the guest, and a small initramfs boots faster under TCG.
fn build_agent() -> anyhow::Result<PathBuf> {
    util::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--locked", "--profile", "guest-agent"])
            .args(["--target", MUSL_TARGET, "-p", "cis490", "--bin", "cis490"]),
    )?;
    Ok(agent_binary())
}

/// Kernel + initramfs, rebuilt only when an input changed.
pub fn build_assets() -> anyhow::Result<Assets> {
    let kpkg = kernel_package()?;
    let kver = kpkg.trim_start_matches("linux-image-").to_owned();
    let kroot = fetch_and_extract(&kpkg)?;
    let bbroot = fetch_and_extract("busybox-static")?;
    let agent = build_agent()?;
    let kernel = kroot.join("boot").join(format!("vmlinuz-{kver}"));
    if !kernel.exists() {
        bail!("{} missing in {kpkg}", kernel.display());
    }
    let moddir = kroot.join("lib/modules").join(&kver);
    let modules = module_order(&moddir)?;
    let busybox = bbroot.join("bin/busybox");

    let meta = |p: &Path| -> anyhow::Result<String> {
        let m = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        let mtime = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(format!("{} {} {}", p.display(), m.len(), mtime.as_nanos()))
    };
    let mut inputs = format!("{kpkg}\n{}\n{}\n{INIT}\n", meta(&busybox)?, meta(&agent)?);
    for m in &modules {
        inputs.push_str(&meta(m)?);
        inputs.push('\n');
    }
    let initrd = vm_dir().join("initramfs.cpio");
    let stamp = vm_dir().join("initramfs.inputs");
    if initrd.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&inputs) {
        return Ok(Assets { kernel, initrd });
    }
    eprintln!("vm: building {}", initrd.display());
    let mut c = Cpio {
        out: Vec::new(),
        ino: 0,
    };
    for d in [
        "bin",
        "dev",
        "etc",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
    ] {
        c.dir(d);
    }
    c.entry("dev/console", 0o020600, &[], (5, 1));
    c.file("init", 0o755, INIT.as_bytes());
    c.file("bin/busybox", 0o755, &std::fs::read(&busybox)?);
    c.file("bin/cis490", 0o755, &std::fs::read(&agent)?);
    let mut order = String::new();
    for m in &modules {
        let name = m.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        c.file(&format!("lib/modules/{name}"), 0o644, &std::fs::read(m)?);
        order.push_str(name);
        order.push('\n');
    }
    c.file("etc/modules.order", 0o644, order.as_bytes());
    let tmp = initrd.with_extension("cpio.tmp");
    std::fs::write(&tmp, c.finish())?;
    std::fs::rename(&tmp, &initrd)?;
    std::fs::write(&stamp, inputs)?;
    Ok(Assets { kernel, initrd })
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

fn running_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: a zombie (reparented QEMU not yet reaped) counts as gone.
    let (head, tail) = stat.rsplit_once(')')?;
    let alive = head.contains("(qemu-system") && !tail.trim_start().starts_with(['Z', 'X']);
    alive.then_some(pid)
}

fn describe(dir: &Path, pid: u32) -> Vec<(&'static str, String)> {
    let p = |n: &str| dir.join(n).display().to_string();
    let mut v = vec![
        ("PID", pid.to_string()),
        ("QMP", p("qmp.sock")),
        ("QMP2", p("qmp2.sock")),
        ("AGENT", p("ga.sock")),
        ("CONSOLE", p("console.sock")),
        ("CONSOLE_LOG", p("console.log")),
        ("DISK", p("disk.qcow2")),
        (
            "ACCEL",
            std::fs::read_to_string(dir.join("accel"))
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
        ("RUN_DIR", dir.display().to_string()),
    ];
    match crate::vm_net::current(dir) {
        Some(net) => {
            v.push(("NET", "tap".into()));
            v.push(("NETNS", net.netns));
            v.push(("TAP", net.tap));
            v.push(("GUEST_IP", crate::vm_net::GUEST_IP.into()));
            v.push(("GATEWAY_IP", crate::vm_net::GATEWAY_IP.into()));
        }
        None => v.push(("NET", "user".into())),
    }
    v
}

fn kvm_verdict_file() -> PathBuf {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    vm_dir().join(format!("kvm-boots.{}", kernel.trim()))
}

pub fn start(opts: &StartOpts) -> anyhow::Result<Vec<(&'static str, String)>> {
    let dir = opts.run_dir.clone().unwrap_or_else(default_run_dir);
    if let Some(pid) = running_pid(&dir) {
        bail!(
            "a VM (pid {pid}) already runs in {}; `cargo xtask vm stop` first",
            dir.display()
        );
    }
    let assets = build_assets()?;
    std::fs::create_dir_all(&dir)?;
    let dir = std::fs::canonicalize(&dir)?;
    let accel = match opts.accel.as_str() {
        "tcg" => vec!["tcg"],
        "kvm" => vec!["kvm"],
        "auto" => {
            let kvm_ok = std::fs::read_to_string(kvm_verdict_file()).ok();
            match kvm_ok.as_deref().map(str::trim) {
                Some("yes") => vec!["kvm", "tcg"],
                Some(_) => vec!["tcg"],
                None if Path::new("/dev/kvm").exists() => vec!["kvm", "tcg"],
                None => vec!["tcg"],
            }
        }
        other => bail!("--accel {other}: expected tcg, kvm or auto"),
    };
    crate::vm_net::teardown(&dir);
    match opts.net.as_str() {
        "user" => {}
        "tap" => {
            if let Some(why) = crate::vm_net::unavailable() {
                bail!("--net tap: {why}");
            }
            crate::vm_net::setup(&dir)?;
        }
        "auto" => match crate::vm_net::unavailable() {
            None => {
                crate::vm_net::setup(&dir)?;
            }
            Some(why) => eprintln!("vm: user-mode network ({why})"),
        },
        other => bail!("--net {other}: expected tap, user or auto"),
    }
    let mut last_err = None;
    for (i, a) in accel.iter().enumerate() {
        let trying_kvm = *a == "kvm" && opts.accel == "auto";
        // A KVM try gets a short leash: TCG boots this guest in ~3 s.
        let timeout = if trying_kvm {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(opts.timeout_s)
        };
        match boot(opts, &dir, &assets, a, timeout) {
            Ok(v) => {
                if trying_kvm {
                    let _ = std::fs::write(kvm_verdict_file(), "yes\n");
                }
                return Ok(v);
            }
            Err(e) => {
                // QEMU only: the next try uses the same network.
                let _ = stop_qemu(&dir);
                if trying_kvm {
                    let _ = std::fs::write(kvm_verdict_file(), format!("no\n{e:#}\n"));
                    if i + 1 < accel.len() {
                        eprintln!("vm: KVM did not boot the guest ({e:#}); using TCG");
                    }
                }
                last_err = Some(e);
            }
        }
    }
    crate::vm_net::teardown(&dir);
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no accelerator tried")))
}

fn console_tail(dir: &Path) -> String {
    let text = std::fs::read(dir.join("console.log")).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let qlog = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
    format!(
        "console.log tail:\n{}\nqemu.log:\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n"),
        qlog.trim()
    )
}

fn boot(
    opts: &StartOpts,
    dir: &Path,
    assets: &Assets,
    accel: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    for f in [
        "qmp.sock",
        "qmp2.sock",
        "ga.sock",
        "console.sock",
        "console.log",
        "qemu.log",
        "qemu.pid",
        "disk.qcow2",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::fs::write(dir.join("accel"), format!("{accel}\n"))?;
    let disk = dir.join("disk.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg(format!("{}M", opts.disk_mib)))?;
    let p = |n: &str| dir.join(n).display().to_string();
    let started = Instant::now();
    let net = crate::vm_net::current(dir);
    // In the VM's network namespace when it has one (where its tap is).
    let mut cmd = match &net {
        Some(n) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", n.netns))
                .args(["--", "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    let netdev = match &net {
        Some(n) => format!("tap,id=net0,ifname={},script=no,downscript=no", n.tap),
        None => "user,id=net0,restrict=on".into(),
    };
    cmd.args(["-name", "cis490-vm,debug-threads=on"])
        .args(["-machine", "q35", "-accel", accel, "-cpu", "max"])
        .args([
            "-smp",
            &opts.smp.to_string(),
            "-m",
            &opts.mem_mib.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-chardev",
            &format!(
                "socket,id=con,path={},server=on,wait=off,logfile={}",
                p("console.sock"),
                p("console.log")
            ),
        ])
        .args(["-serial", "chardev:con"])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", p("qmp.sock")),
        ])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", p("qmp2.sock")),
        ])
        .args([
            "-chardev",
            &format!("socket,id=ga,path={},server=on,wait=off", p("ga.sock")),
        ])
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .args([
            "-device",
            &format!("virtserialport,bus=vser0.0,chardev=ga,name={AGENT_PORT_NAME},id=gaport"),
        ])
        // O_DIRECT + native AIO: host /proc/<qemu>/io then tracks guest disk I/O 1:1.
        .args([
            "-blockdev",
            &format!(
                "driver=file,filename={},node-name=disk0-file,cache.direct=on,aio=native",
                disk.display()
            ),
        ])
        .args(["-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0"])
        .args(["-device", "virtio-blk-pci,drive=disk0,id=vblk0"])
        .args(["-netdev", &netdev])
        .args([
            "-device",
            "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:00:00:01,romfile=",
        ])
        .args([
            "-pidfile",
            &p("qemu.pid"),
            "-daemonize",
            "-D",
            &p("qemu.log"),
        ])
        .arg("-kernel")
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&assets.initrd)
        .args([
            "-append",
            &format!(
                "console=ttyS0 quiet panic=-1 cis490.agent_rate_hz={} cis490.net={} {}",
                opts.agent_rate_hz,
                if net.is_some() { "tap" } else { "user" },
                opts.append
            ),
        ]);
    let out = cmd.output().context("starting qemu-system-x86_64")?;
    if !out.status.success() {
        bail!(
            "qemu-system-x86_64 failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            console_tail(dir)
        );
    }
    let pid = running_pid(dir)
        .with_context(|| format!("QEMU left no live pid\n{}", console_tail(dir)))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    // The agent's first line proves kernel, modules, port naming and agent all work.
    let deadline = started + timeout;
    let first = loop {
        if running_pid(dir).is_none() {
            bail!("QEMU exited during boot\n{}", console_tail(dir));
        }
        if Instant::now() > deadline {
            bail!(
                "no agent line within {:?} ({accel})\n{}",
                timeout,
                console_tail(dir)
            );
        }
        match first_agent_line(&dir.join("ga.sock"), deadline) {
            Ok(Some(l)) => break l,
            Ok(None) | Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let boot_ms = started.elapsed().as_millis();
    let mut v = describe(dir, pid);
    v.push(("BOOT_MS", boot_ms.to_string()));
    v.push(("FIRST_LINE_BYTES", first.len().to_string()));
    Ok(v)
}

/// Connect to the agent socket and read one line (None if the connection gave nothing).
fn first_agent_line(sock: &Path, deadline: Instant) -> anyhow::Result<Option<String>> {
    let s = UnixStream::connect(sock)?;
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_millis(10))))?;
    let mut r = std::io::BufReader::new(s.take(1 << 20));
    let mut line = String::new();
    r.read_line(&mut line)?;
    Ok(line.ends_with('\n').then_some(line))
}

/// Stop the VM of `dir` and remove its network.
pub fn stop(dir: &Path) -> anyhow::Result<()> {
    let res = stop_qemu(dir);
    crate::vm_net::teardown(dir);
    res
}

fn stop_qemu(dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = running_pid(dir) else {
        return Ok(());
    };
    // Ask politely over the harness QMP socket, then insist.
    if let Ok(mut s) = UnixStream::connect(dir.join("qmp2.sock")) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
    }
    let t = Instant::now();
    while running_pid(dir) == Some(pid) && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if running_pid(dir) == Some(pid) {
        // SAFETY: kill(2) on a pid we just verified is our QEMU.
        unsafe { libc_kill(pid as i32, 9) };
        while running_pid(dir) == Some(pid) && t.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = std::fs::remove_file(pid_file(dir));
    Ok(())
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_is_read_from_the_nul_separated_section() {
        let ko = b"junk\0license=GPL\0depends=virtio_ring,virtio\0name=virtio_pci\0";
        assert_eq!(modinfo_depends(ko), vec!["virtio_ring", "virtio"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
    }
}
