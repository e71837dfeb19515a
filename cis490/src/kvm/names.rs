//! Names for the keys of `kvm-keys`: VM-exit reasons (VMX and SVM numbering), KVM's
//! user-space exit reasons, and the CPUID leaves and MSRs a VM-detection probe or a
//! guest kernel commonly touches. A key without a name gets null: the number is the data.

/// Which numbering the host's `kvm_exit` reasons use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitIsa {
    /// Intel VT-x (kvm_intel): basic exit reasons (SDM Appendix C).
    Vmx,
    /// AMD-V (kvm_amd): SVM exit codes.
    Svm,
}

/// A VMX basic exit reason (the low 16 bits of `exit_reason`).
pub fn vmx_exit(reason: u64) -> Option<&'static str> {
    Some(match reason & 0xffff {
        0 => "EXCEPTION_NMI",
        1 => "EXTERNAL_INTERRUPT",
        2 => "TRIPLE_FAULT",
        3 => "INIT_SIGNAL",
        4 => "SIPI_SIGNAL",
        7 => "INTERRUPT_WINDOW",
        8 => "NMI_WINDOW",
        9 => "TASK_SWITCH",
        10 => "CPUID",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMOFF",
        27 => "VMON",
        28 => "CR_ACCESS",
        29 => "DR_ACCESS",
        30 => "IO_INSTRUCTION",
        31 => "MSR_READ",
        32 => "MSR_WRITE",
        33 => "INVALID_STATE",
        34 => "MSR_LOAD_FAIL",
        36 => "MWAIT_INSTRUCTION",
        37 => "MONITOR_TRAP_FLAG",
        39 => "MONITOR_INSTRUCTION",
        40 => "PAUSE_INSTRUCTION",
        41 => "MCE_DURING_VMENTRY",
        43 => "TPR_BELOW_THRESHOLD",
        44 => "APIC_ACCESS",
        45 => "EOI_INDUCED",
        46 => "GDTR_IDTR",
        47 => "LDTR_TR",
        48 => "EPT_VIOLATION",
        49 => "EPT_MISCONFIG",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "PREEMPTION_TIMER",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        56 => "APIC_WRITE",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "PML_FULL",
        63 => "XSAVES",
        64 => "XRSTORS",
        67 => "UMWAIT",
        68 => "TPAUSE",
        74 => "BUS_LOCK",
        75 => "NOTIFY",
        _ => return None,
    })
}

/// An SVM exit code.
pub fn svm_exit(code: u64) -> Option<&'static str> {
    Some(match code {
        0x000..=0x00f => "read_cr",
        0x010..=0x01f => "write_cr",
        0x020..=0x02f => "read_dr",
        0x030..=0x03f => "write_dr",
        0x040..=0x05f => "exception",
        0x060 => "interrupt",
        0x061 => "nmi",
        0x062 => "smi",
        0x063 => "init",
        0x064 => "vintr",
        0x06e => "rdtsc",
        0x06f => "rdpmc",
        0x070 => "pushf",
        0x071 => "popf",
        0x072 => "cpuid",
        0x073 => "rsm",
        0x074 => "iret",
        0x075 => "swint",
        0x076 => "invd",
        0x077 => "pause",
        0x078 => "hlt",
        0x079 => "invlpg",
        0x07a => "invlpga",
        0x07b => "io",
        0x07c => "msr",
        0x07d => "task_switch",
        0x07f => "shutdown",
        0x080 => "vmrun",
        0x081 => "hypercall",
        0x087 => "rdtscp",
        0x089 => "wbinvd",
        0x08a => "monitor",
        0x08b => "mwait",
        0x08d => "xsetbv",
        0x400 => "npf",
        0x401 => "avic_incomplete_ipi",
        0x402 => "avic_unaccelerated_access",
        0x403 => "vmgexit",
        _ => return None,
    })
}

/// A `kvm_run.exit_reason` (KVM_EXIT_*), or the errno of an interrupted or failed
/// KVM_RUN (keys with [`cis490_common::KVM_USERSPACE_ERRNO`] set).
pub fn userspace_exit(key: u64) -> Option<&'static str> {
    if key & cis490_common::KVM_USERSPACE_ERRNO != 0 {
        // EINTR is a signal to the vCPU thread (QEMU kicking it), every other errno an error.
        return Some(if key & 0xffff_ffff == 4 {
            "restart (EINTR)"
        } else {
            "error"
        });
    }
    Some(match key {
        0 => "UNKNOWN",
        1 => "EXCEPTION",
        2 => "IO",
        3 => "HYPERCALL",
        4 => "DEBUG",
        5 => "HLT",
        6 => "MMIO",
        7 => "IRQ_WINDOW_OPEN",
        8 => "SHUTDOWN",
        9 => "FAIL_ENTRY",
        10 => "INTR",
        11 => "SET_TPR",
        12 => "TPR_ACCESS",
        16 => "NMI",
        17 => "INTERNAL_ERROR",
        21 => "WATCHDOG",
        24 => "SYSTEM_EVENT",
        26 => "IOAPIC_EOI",
        27 => "HYPERV",
        29 => "X86_RDMSR",
        30 => "X86_WRMSR",
        35 => "X86_BUS_LOCK",
        36 => "XEN",
        38 => "NOTIFY",
        39 => "LOONGARCH_IOCSR",
        40 => "MEMORY_FAULT",
        _ => return None,
    })
}

/// A CPUID leaf (EAX on entry) that a guest or a VM-detection probe asks for.
pub fn cpuid_leaf(leaf: u64) -> Option<&'static str> {
    Some(match leaf {
        0x0 => "max_basic_and_vendor",
        0x1 => "features",
        0x2 => "cache_tlb",
        0x4 => "cache_topology",
        0x6 => "thermal_power",
        0x7 => "extended_features",
        0xb => "topology",
        0xd => "xsave",
        0x14 => "processor_trace",
        0x15 => "tsc_frequency",
        0x16 => "processor_frequency",
        0x1f => "topology_v2",
        0x4000_0000 => "hypervisor_vendor",
        0x4000_0001 => "hypervisor_features",
        0x4000_0010 => "hypervisor_timing",
        0x8000_0000 => "max_extended",
        0x8000_0001 => "extended_signature_features",
        0x8000_0002..=0x8000_0004 => "brand_string",
        0x8000_0006 => "l2_cache",
        0x8000_0007 => "power_management",
        0x8000_0008 => "address_sizes",
        _ => return None,
    })
}

/// An MSR index.
pub fn msr(index: u64) -> Option<&'static str> {
    Some(match index {
        0x10 => "IA32_TIME_STAMP_COUNTER",
        0x1b => "IA32_APIC_BASE",
        0x3a => "IA32_FEATURE_CONTROL",
        0x3b => "IA32_TSC_ADJUST",
        0x8b => "IA32_BIOS_SIGN_ID",
        0xe7 => "IA32_MPERF",
        0xe8 => "IA32_APERF",
        0xfe => "IA32_MTRRCAP",
        0x174 => "IA32_SYSENTER_CS",
        0x175 => "IA32_SYSENTER_ESP",
        0x176 => "IA32_SYSENTER_EIP",
        0x179 => "IA32_MCG_CAP",
        0x17a => "IA32_MCG_STATUS",
        0x1a0 => "IA32_MISC_ENABLE",
        0x277 => "IA32_PAT",
        0x2ff => "IA32_MTRR_DEF_TYPE",
        0x480..=0x491 => "IA32_VMX_*",
        0x6e0 => "IA32_TSC_DEADLINE",
        0x800..=0x8ff => "x2APIC",
        0x4b56_4d00 => "MSR_KVM_WALL_CLOCK_NEW",
        0x4b56_4d01 => "MSR_KVM_SYSTEM_TIME_NEW",
        0x4b56_4d02 => "MSR_KVM_ASYNC_PF_EN",
        0x4b56_4d03 => "MSR_KVM_STEAL_TIME",
        0x4b56_4d04 => "MSR_KVM_PV_EOI_EN",
        0x4000_0000..=0x4000_00ff => "HV_X64_*",
        0xc000_0080 => "IA32_EFER",
        0xc000_0081 => "IA32_STAR",
        0xc000_0082 => "IA32_LSTAR",
        0xc000_0083 => "IA32_CSTAR",
        0xc000_0084 => "IA32_FMASK",
        0xc000_0100 => "IA32_FS_BASE",
        0xc000_0101 => "IA32_GS_BASE",
        0xc000_0102 => "IA32_KERNEL_GS_BASE",
        0xc000_0103 => "IA32_TSC_AUX",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernels_tables() {
        // The numbers are the kernel's (the kvm_exit and kvm_userspace_exit formats).
        assert_eq!(vmx_exit(10), Some("CPUID"));
        assert_eq!(vmx_exit(30), Some("IO_INSTRUCTION"));
        // A failed VM entry sets bit 31; the basic reason is the low 16 bits.
        assert_eq!(vmx_exit(0x8000_0021), Some("INVALID_STATE"));
        assert_eq!(vmx_exit(5), None);
        assert_eq!(svm_exit(0x072), Some("cpuid"));
        assert_eq!(svm_exit(0x07b), Some("io"));
        assert_eq!(svm_exit(0x013), Some("write_cr"));
        assert_eq!(userspace_exit(2), Some("IO"));
        assert_eq!(userspace_exit(30), Some("X86_WRMSR"));
        assert_eq!(userspace_exit(1 << 32 | 4), Some("restart (EINTR)"));
        assert_eq!(userspace_exit(1 << 32 | 14), Some("error"));
        assert_eq!(userspace_exit(999), None);
        assert_eq!(cpuid_leaf(0x4000_0000), Some("hypervisor_vendor"));
        assert_eq!(cpuid_leaf(0x8000_0003), Some("brand_string"));
        assert_eq!(msr(0x10), Some("IA32_TIME_STAMP_COUNTER"));
        assert_eq!(msr(0xc000_0080), Some("IA32_EFER"));
        assert_eq!(msr(0x12345), None);
    }
}
