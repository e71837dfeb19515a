//! The `kvm` and `kvm-keys` streams: VM exits of the target's vCPU threads, counted in
//! the kernel by kind and key (cis490-ebpf/src/kvm.rs) on the snapshot ticks.
//!
//! - `names`: names of exit reasons, CPUID leaves, MSRs (pure)
//! - `fold`: the kernel's per-tick entries into cumulative per-thread and per-key counts
//!   (pure, unit-tested)
//! - here: the kinds (which column or key kind each kernel kind becomes), and what the
//!   host and the target are (is it a KVM VM; do exits carry a reason here)
//!
//! The collectors, which read the kernel's map, are in `bpf::kvm`.

pub mod fold;
pub mod names;

use cis490_common as c;

pub const SOURCE: &str = "kvm";
pub const KEYS_SOURCE: &str = "kvm-keys";

/// What one kernel kind (`cis490_common::KVM_*`) becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub code: u32,
    /// Its count column in `kvm`.
    pub column: &'static str,
    /// Its `kind` in `kvm-keys`; None: counted, no key (only the `kvm` column).
    pub key_kind: Option<&'static str>,
}

/// In `kvm`'s column order.
pub const KINDS: &[Kind] = &[
    kind(c::KVM_EXIT_REASON, "exits", Some("exit_reason")),
    kind(
        c::KVM_USERSPACE_EXIT,
        "userspace_exits",
        Some("userspace_exit"),
    ),
    kind(c::KVM_PIO_READ, "pio_reads", Some("pio_read")),
    kind(c::KVM_PIO_WRITE, "pio_writes", Some("pio_write")),
    kind(c::KVM_MMIO_READ, "mmio_reads", Some("mmio_read")),
    kind(c::KVM_MMIO_WRITE, "mmio_writes", Some("mmio_write")),
    kind(c::KVM_FAST_MMIO, "fast_mmio_writes", Some("fast_mmio")),
    kind(c::KVM_MSR_READ, "msr_reads", Some("msr_read")),
    kind(c::KVM_MSR_WRITE, "msr_writes", Some("msr_write")),
    kind(c::KVM_CPUID, "cpuid_exits", Some("cpuid")),
    kind(c::KVM_HYPERCALL, "hypercalls", Some("hypercall")),
    kind(c::KVM_EMULATED_INSN, "emulated_insns", None),
    kind(c::KVM_EMULATION_FAILED, "emulation_failures", None),
    kind(c::KVM_HALT_WAKEUP, "halt_wakeups", None),
];

const fn kind(code: u32, column: &'static str, key_kind: Option<&'static str>) -> Kind {
    Kind {
        code,
        column,
        key_kind,
    }
}

/// `kvm-keys`' `kind` values, in [`KINDS`] order.
pub const KEY_KINDS: &[&str] = &[
    "exit_reason",
    "userspace_exit",
    "pio_read",
    "pio_write",
    "mmio_read",
    "mmio_write",
    "fast_mmio",
    "msr_read",
    "msr_write",
    "cpuid",
    "hypercall",
];

/// The kind a kernel code stands for.
pub fn kind_of(code: u32) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.code == code)
}

/// The name of `key` of kernel kind `code` (null in `kvm-keys` when None).
pub fn key_name(code: u32, key: u64, isa: Option<names::ExitIsa>) -> Option<&'static str> {
    match code {
        c::KVM_EXIT_REASON => match isa? {
            names::ExitIsa::Vmx => names::vmx_exit(key),
            names::ExitIsa::Svm => names::svm_exit(key),
        },
        c::KVM_USERSPACE_EXIT => names::userspace_exit(key),
        c::KVM_MSR_READ | c::KVM_MSR_WRITE => names::msr(key),
        c::KVM_CPUID => names::cpuid_leaf(key),
        _ => None,
    }
}

/// Whether `kvm_exit` fires on this host, and with which numbering: it does on VT-x and
/// AMD-V (kvm_intel, kvm_amd); other backends (the nested `kvm_pvm` seen in this lab)
/// never fire it, and then the `exits` column is null and `Err` says why.
pub fn exit_isa(sys_module: &std::path::Path) -> Result<names::ExitIsa, String> {
    if sys_module.join("kvm_intel").exists() {
        return Ok(names::ExitIsa::Vmx);
    }
    if sys_module.join("kvm_amd").exists() {
        return Ok(names::ExitIsa::Svm);
    }
    let others: Vec<String> = std::fs::read_dir(sys_module)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("kvm_"))
                .collect()
        })
        .unwrap_or_default();
    Err(if others.is_empty() {
        "no kvm_intel or kvm_amd module: kvm:kvm_exit does not fire here".to_owned()
    } else {
        format!(
            "the KVM backend is {} (not kvm_intel or kvm_amd): kvm:kvm_exit does not fire here",
            others.join(", ")
        )
    })
}

/// `Ok` when process `pid` holds a KVM VM (an `anon_inode:kvm-vm` fd, which QEMU opens
/// under `-accel kvm` and never under TCG); `Err` says why not.
pub fn target_is_kvm_vm(pid: u32) -> Result<(), String> {
    let dir = format!("/proc/{pid}/fd");
    let entries =
        std::fs::read_dir(&dir).map_err(|e| format!("cannot list {dir} ({e}) to find a KVM VM"))?;
    for e in entries.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:kvm-vm") {
            return Ok(());
        }
    }
    Err(format!(
        "process {pid} holds no KVM VM (no anon_inode:kvm-vm fd): not a KVM guest (TCG, or not QEMU)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_kind_has_one_column_and_key_kinds_match() {
        for code in 1..c::KVM_KINDS {
            assert!(kind_of(code).is_some(), "kind {code}");
        }
        assert!(kind_of(0).is_none() && kind_of(c::KVM_KINDS).is_none());
        let keyed: Vec<&str> = KINDS.iter().filter_map(|k| k.key_kind).collect();
        assert_eq!(keyed, KEY_KINDS);
    }

    #[test]
    fn key_names_depend_on_kind_and_isa() {
        assert_eq!(
            key_name(c::KVM_EXIT_REASON, 10, Some(names::ExitIsa::Vmx)),
            Some("CPUID")
        );
        assert_eq!(
            key_name(c::KVM_EXIT_REASON, 0x72, Some(names::ExitIsa::Svm)),
            Some("cpuid")
        );
        assert_eq!(key_name(c::KVM_EXIT_REASON, 10, None), None);
        assert_eq!(key_name(c::KVM_CPUID, 1, None), Some("features"));
        assert_eq!(key_name(c::KVM_PIO_WRITE, 0x80, None), None);
    }

    #[test]
    fn exit_isa_reads_the_loaded_modules() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("kvm")).unwrap();
        let e = exit_isa(d.path()).unwrap_err();
        assert!(e.contains("no kvm_intel or kvm_amd"), "{e}");
        std::fs::create_dir(d.path().join("kvm_pvm")).unwrap();
        let e = exit_isa(d.path()).unwrap_err();
        assert!(e.contains("kvm_pvm"), "{e}");
        std::fs::create_dir(d.path().join("kvm_amd")).unwrap();
        assert_eq!(exit_isa(d.path()), Ok(names::ExitIsa::Svm));
        std::fs::create_dir(d.path().join("kvm_intel")).unwrap();
        assert_eq!(exit_isa(d.path()), Ok(names::ExitIsa::Vmx));
    }

    #[test]
    fn a_process_without_a_vm_is_not_a_kvm_target() {
        let e = target_is_kvm_vm(std::process::id()).unwrap_err();
        assert!(e.contains("no KVM VM"), "{e}");
        let e = target_is_kvm_vm(u32::MAX - 1).unwrap_err();
        assert!(e.contains("cannot list"), "{e}");
    }
}
