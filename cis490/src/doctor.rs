//! `cis490 doctor`: one screen on whether the BPF backend works here, what `--backend
//! auto` would pick, and how to fix what is missing.

use crate::bpf::{loader, tracefs};

pub struct Check {
    pub ok: bool,
    pub what: String,
    pub detail: String,
    /// How to fix it (empty when ok).
    pub fix: String,
}

fn check(
    ok: bool,
    what: impl Into<String>,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        ok,
        what: what.into(),
        detail: detail.into(),
        fix: if ok { String::new() } else { fix.into() },
    }
}

/// Kernel release as (major, minor).
pub fn parse_release(s: &str) -> Option<(u32, u32)> {
    let mut it = s.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Whether the bpf() syscall works: create (and close) a one-element array map.
fn bpf_syscall() -> Result<(), String> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = MapCreate {
        map_type: 2, // BPF_MAP_TYPE_ARRAY
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: BPF_MAP_CREATE (0) with a correctly sized attribute prefix.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: fd was just returned by the kernel.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

pub fn run() -> (Vec<Check>, String) {
    let mut out = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim().to_owned();
    let new_enough = parse_release(&release).is_some_and(|v| v >= (5, 8));
    out.push(check(
        new_enough,
        "kernel version",
        release.clone(),
        "Linux >= 5.8 is needed (CAP_BPF, BPF_ENABLE_STATS); use --backend proc on older kernels",
    ));
    let caps = loader::effective_caps();
    let missing = loader::missing_caps(caps);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    out.push(check(
        missing.is_none(),
        "privileges",
        match &missing {
            None => format!("euid {euid}, CapEff {caps:#x}"),
            Some(why) => format!("euid {euid}, CapEff {caps:#x}: {why}"),
        },
        "run as root, or grant the binary CAP_BPF and CAP_PERFMON \
         (setcap cap_bpf,cap_perfmon,cap_sys_admin+ep $(command -v cis490); CAP_SYS_ADMIN only to mount tracefs)",
    ));
    let sys = bpf_syscall();
    out.push(check(
        sys.is_ok(),
        "bpf() syscall",
        sys.clone().err().unwrap_or_else(|| "creates maps".into()),
        "bpf() refused: needs CAP_BPF (or root) and a kernel with CONFIG_BPF_SYSCALL",
    ));
    // The snapshot program reads task_struct fields at offsets taken from the kernel's BTF.
    let btf = crate::bpf::btf::vmlinux_task_layout();
    out.push(check(
        btf.is_ok(),
        "BTF",
        match &btf {
            Ok(l) => format!(
                "{}: task_struct pid at {}, se.sum_exec_runtime at {}, ioac at {}",
                crate::bpf::btf::VMLINUX,
                l.pid,
                l.sum_exec_runtime,
                l.ioac
            ),
            Err(e) => e.to_string(),
        },
        "a kernel built with CONFIG_DEBUG_INFO_BTF (task_struct offsets for the snapshot program)",
    ));
    let mounted = tracefs::find();
    let can_mount = missing.is_none();
    out.push(check(
        mounted.is_some() || can_mount,
        "tracefs",
        match &mounted {
            Some(p) => format!("mounted at {}", p.display()),
            None if can_mount => "not mounted; auto mounts it at /sys/kernel/tracing".into(),
            None => "not mounted".into(),
        },
        "mount -t tracefs nodev /sys/kernel/tracing (as root)",
    ));
    if let Some(root) = &mounted {
        for (cat, name) in tracefs::all_tracepoints() {
            let path = root.join("events").join(&cat).join(&name).join("format");
            let ok = std::fs::metadata(&path).is_ok();
            // The kvm ones exist only with the kvm module loaded, and only the kvm source
            // needs them: their absence is no failure.
            if cat == "kvm" {
                out.push(check(
                    true,
                    format!("tracepoint {cat}:{name}"),
                    if ok {
                        "present"
                    } else {
                        "missing (no kvm module loaded: the kvm source will say absent)"
                    },
                    "",
                ));
                continue;
            }
            out.push(check(
                ok,
                format!("tracepoint {cat}:{name}"),
                if ok { "present" } else { "missing" },
                "a kernel with CONFIG_FTRACE_SYSCALLS / the scheduler, block and net tracepoints",
            ));
        }
    }
    // The definitive answer: load and attach for this very process, then unload.
    let snap = crate::bpf::loader::SnapSpec {
        interval_ns: 100_000_000,
        count_wakeups: true,
        timer_cpu: None,
        kvm: false,
        kvm_keys: cis490_common::MAX_KVM_KEYS,
        flow: false,
    };
    let verdict = match crate::bpf::start(
        std::process::id(),
        &Default::default(),
        &[],
        false,
        snap,
        crate::collector::RowsMode::All,
        crate::bpf::KvmPlan::Off,
    ) {
        Ok(_) => "--backend auto would use: bpf (programs load and attach here)".to_owned(),
        Err(why) => format!("--backend auto would use: proc (BPF unavailable: {why})"),
    };
    (out, verdict)
}

pub fn render(checks: &[Check], verdict: &str) -> String {
    let mut s = String::new();
    for c in checks {
        s.push_str(&format!(
            "{:<8} {:<40} {}\n",
            if c.ok { "OK" } else { "MISSING" },
            c.what,
            c.detail
        ));
        if !c.ok {
            s.push_str(&format!("         fix: {}\n", c.fix));
        }
    }
    s.push_str(verdict);
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_parse() {
        assert_eq!(parse_release("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(parse_release("5.8"), Some((5, 8)));
        assert_eq!(parse_release("x"), None);
    }

    #[test]
    fn render_shows_fix_only_for_missing() {
        let c = vec![
            check(true, "a", "fine", "never shown"),
            check(false, "b", "absent", "do this"),
        ];
        let s = render(&c, "verdict");
        assert!(s.contains("OK") && s.contains("MISSING"));
        assert!(!s.contains("never shown"));
        assert!(s.contains("fix: do this"));
        assert!(s.ends_with("verdict\n"));
    }
}
