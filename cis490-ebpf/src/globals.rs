//! Load-time configuration and the small helpers every program shares.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use cis490_common::Offsets;

/// The traced process; 0 (never a user tgid) until the loader overrides it.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// Tracepoint field offsets of the running kernel (see `Offsets`).
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::LINUX_6_18;

#[inline(always)]
pub fn target_tgid() -> u32 {
    // Volatile so the compiler does not fold the initial value; the loader rewrites it.
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

#[inline(always)]
pub fn offsets() -> Offsets {
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Offsets of `task_struct` fields, each read alone (the programs on the scheduler's hot
/// path load only the field they use; `offsets()` copies the whole struct).
#[inline(always)]
pub fn task_pid_offset() -> usize {
    unsafe { core::ptr::read_volatile(&raw const OFFSETS.task_pid) as usize }
}

#[inline(always)]
pub fn task_sum_exec_runtime_offset() -> usize {
    unsafe { core::ptr::read_volatile(&raw const OFFSETS.task_sum_exec_runtime) as usize }
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Add to a counter another CPU may update at the same time (a wakeup or migration
/// recorded by the waker's CPU). Rust's bpf target has no atomic read-modify-write in
/// `core`, so this is a plain add: two CPUs hitting the same thread's counter in the
/// same instant can lose one increment (rare: a thread is woken by one waker at a time).
#[inline(always)]
pub fn add(counter: *mut u64, v: u64) {
    // SAFETY: `counter` points into a live map value.
    unsafe { *counter += v };
}
