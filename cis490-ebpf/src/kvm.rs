//! KVM exits of the target's vCPU threads, counted by kind and key (CPUID leaf, MSR,
//! port, guest-physical page, exit reason) per thread per snapshot tick, in map
//! `KVM_COUNTS`. Each program runs in the vCPU thread that exits (KVM's tracepoints fire
//! in the thread calling KVM_RUN), so an entry has one writer and plain adds are exact.
//!
//! Every program but `cis490_kvm_exit` is a raw tracepoint: it reads the tracepoint's
//! arguments (TP_PROTO) straight from its context, where a classic tracepoint program
//! would have the kernel build the event's record first and then read its fields with
//! probe reads (measured here: 113 ns per CPUID as a tracepoint program, BENCHMARKS.md
//! section 13). kvm_exit's reason is not among its arguments (it takes the vCPU), so that
//! one reads its record at the format file's offset.
//!
//! Ticks: an event is counted under `TICK_EPOCH` (globals.rs), the seq of the next
//! snapshot, so user space gives each snapshot tick exactly the events since the one
//! before, and removes entries once their tick is drained.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use cis490_common::{
    KvmKey, KvmOffsets, KVM_CPUID, KVM_EMULATED_INSN, KVM_EMULATION_FAILED, KVM_EXIT_REASON,
    KVM_FAST_MMIO, KVM_HALT_WAKEUP, KVM_HYPERCALL, KVM_KEY_OTHER, KVM_MMIO_READ, KVM_MMIO_WRITE,
    KVM_MSR_READ, KVM_MSR_WRITE, KVM_PIO_READ, KVM_PIO_WRITE, KVM_TRACE_MMIO_READ,
    KVM_TRACE_MMIO_WRITE, KVM_USERSPACE_ERRNO, KVM_USERSPACE_EXIT, MAX_KVM_KEYS, MAX_KVM_OTHER,
};

use crate::globals::{current, target_tgid, tick_epoch};

/// Tracepoint field offsets of the running kernel (set by the loader).
#[unsafe(no_mangle)]
static KVM_OFFSETS: KvmOffsets = KvmOffsets::LINUX_6_18;

/// Sized by the loader (`--kvm-key-table`).
#[map]
pub static KVM_COUNTS: HashMap<KvmKey, u64> = HashMap::with_max_entries(MAX_KVM_KEYS, 0);

/// Counts whose key found `KVM_COUNTS` full, under key [`KVM_KEY_OTHER`].
#[map]
static KVM_OTHER: HashMap<KvmKey, u64> = HashMap::with_max_entries(MAX_KVM_OTHER, 0);

/// Element 0: events counted nowhere because even the kind's [`KVM_KEY_OTHER`] entry
/// found `KVM_OTHER` full too, since attach (per CPU; user space sums).
#[map]
static KVM_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn kvm_offsets() -> &'static KvmOffsets {
    let p: *const KvmOffsets = &raw const KVM_OFFSETS;
    // SAFETY: `p` points to a static; the volatile read only hides its initial values
    // from the optimizer (the loader rewrites them).
    unsafe { &*core::ptr::read_volatile(&p) }
}

/// The current thread, if it belongs to the target.
#[inline(always)]
fn target_thread() -> Option<u32> {
    let (tgid, tid) = current();
    (tgid == target_tgid()).then_some(tid)
}

/// Add one to (tid, this tick, kind, key).
#[inline(always)]
fn count(tid: u32, kind: u32, key: u64) {
    let mut k = KvmKey {
        tid,
        kind,
        epoch: tick_epoch(),
        key,
    };
    if bump(&KVM_COUNTS, &k) {
        return;
    }
    k.key = KVM_KEY_OTHER;
    if bump(&KVM_OTHER, &k) {
        return;
    }
    if let Some(lost) = KVM_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's value; tracepoint programs do not nest on one CPU.
        unsafe { *lost += 1 };
    }
}

/// Add one to entry `k` of `map`, creating it; false when the table is full.
#[inline(always)]
fn bump(map: &HashMap<KvmKey, u64>, k: &KvmKey) -> bool {
    if let Some(v) = map.get_ptr_mut(k) {
        // SAFETY: the entry's only writer is the thread `k.tid` (this program runs in
        // it); user space removes an entry only after its tick is drained.
        unsafe { *v += 1 };
        return true;
    }
    map.insert(k, &1, BPF_NOEXIST as u64).is_ok()
}

/// A field of the tracepoint record at `offset`.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: a bounded probe read of the tracepoint record at an offset the loader took
    // from this kernel's format file.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[tracepoint]
pub fn cis490_kvm_exit(ctx: TracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    if let Some(reason) = field::<u32>(&ctx, kvm_offsets().exit_reason) {
        count(tid, KVM_EXIT_REASON, u64::from(reason));
    }
    0
}

/// Argument `n` of the tracepoint (each is one u64 slot), its low 32 bits.
#[inline(always)]
fn arg32(ctx: &RawTracePointContext, n: usize) -> u32 {
    ctx.arg::<u64>(n) as u32
}

// TP_PROTO(__u32 reason, int errno)
#[raw_tracepoint(tracepoint = "kvm_userspace_exit")]
pub fn cis490_kvm_userspace_exit(ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    let errno = arg32(&ctx, 1) as i32;
    let key = if errno < 0 {
        KVM_USERSPACE_ERRNO | u64::from(errno.unsigned_abs())
    } else {
        u64::from(arg32(&ctx, 0))
    };
    count(tid, KVM_USERSPACE_EXIT, key);
    0
}

// TP_PROTO(unsigned int rw, unsigned int port, unsigned int size, unsigned int count,
// const void *data)
#[raw_tracepoint(tracepoint = "kvm_pio")]
pub fn cis490_kvm_pio(ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    let kind = if arg32(&ctx, 0) != 0 {
        KVM_PIO_WRITE
    } else {
        KVM_PIO_READ
    };
    count(tid, kind, u64::from(arg32(&ctx, 1)));
    0
}

// TP_PROTO(int type, int len, u64 gpa, void *val)
#[raw_tracepoint(tracepoint = "kvm_mmio")]
pub fn cis490_kvm_mmio(ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    let kind = match arg32(&ctx, 0) {
        KVM_TRACE_MMIO_READ => KVM_MMIO_READ,
        KVM_TRACE_MMIO_WRITE => KVM_MMIO_WRITE,
        _ => return 0,
    };
    count(tid, kind, ctx.arg::<u64>(2) & !0xfff);
    0
}

// TP_PROTO(u64 gpa)
#[raw_tracepoint(tracepoint = "kvm_fast_mmio")]
pub fn cis490_kvm_fast_mmio(ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    count(tid, KVM_FAST_MMIO, ctx.arg::<u64>(0) & !0xfff);
    0
}

// TP_PROTO(unsigned write, u32 ecx, u64 data, bool exception)
#[raw_tracepoint(tracepoint = "kvm_msr")]
pub fn cis490_kvm_msr(ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    let kind = if arg32(&ctx, 0) != 0 {
        KVM_MSR_WRITE
    } else {
        KVM_MSR_READ
    };
    count(tid, kind, u64::from(arg32(&ctx, 1)));
    0
}

// TP_PROTO(unsigned int function, unsigned int index, unsigned long rax, ...)
#[raw_tracepoint(tracepoint = "kvm_cpuid")]
pub fn cis490_kvm_cpuid(ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    count(tid, KVM_CPUID, u64::from(arg32(&ctx, 0)));
    0
}

// TP_PROTO(unsigned long nr, unsigned long a0, ...)
#[raw_tracepoint(tracepoint = "kvm_hypercall")]
pub fn cis490_kvm_hypercall(ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    count(tid, KVM_HYPERCALL, ctx.arg::<u64>(0));
    0
}

// TP_PROTO(struct kvm_vcpu *vcpu, __u8 failed)
#[raw_tracepoint(tracepoint = "kvm_emulate_insn")]
pub fn cis490_kvm_emulate_insn(ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    count(tid, KVM_EMULATED_INSN, 0);
    if ctx.arg::<u64>(1) as u8 != 0 {
        count(tid, KVM_EMULATION_FAILED, 0);
    }
    0
}

// TP_PROTO(__u64 ns, bool waited, bool valid)
#[raw_tracepoint(tracepoint = "kvm_vcpu_wakeup")]
pub fn cis490_kvm_vcpu_wakeup(_ctx: RawTracePointContext) -> u32 {
    let Some(tid) = target_thread() else {
        return 0;
    };
    count(tid, KVM_HALT_WAKEUP, 0);
    0
}
