//! Load-time configuration and the small helpers every program shares.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::map,
    maps::Array,
};
use cis490_common::{Offsets, SnapConfig};

/// The traced process; 0 (never a user tgid) until the loader overrides it.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// Tracepoint and task_struct field offsets of the running kernel (see `Offsets`).
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::LINUX_6_18;

/// The snapshot program's interval and what it sums (see `SnapConfig`).
#[unsafe(no_mangle)]
static SNAP_CONFIG: SnapConfig = SnapConfig {
    interval_ns: 0,
    ncpus: 0,
    net_ifs: 0,
    count_wakeups: 0,
    _pad: 0,
};

/// Element 0: the seq of the snapshot the next event belongs to. The snapshot program sets
/// it to its own seq + 1 when it runs, so the programs that count events (kvm, flow)
/// count each under the tick it belongs to, and user space gives every tick exactly its
/// own events.
#[map]
pub static TICK_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// The current [`TICK_EPOCH`].
#[inline(always)]
pub fn tick_epoch() -> u64 {
    match TICK_EPOCH.get(0) {
        // SAFETY: a u64 map value; the snapshot's store to it is a single aligned word
        // write.
        Some(e) => unsafe { core::ptr::read_volatile(e) },
        None => 0,
    }
}

#[inline(always)]
pub fn target_tgid() -> u32 {
    // Volatile so the compiler does not fold the initial value; the loader rewrites it.
    // SAFETY: a read of a `u32` static that nothing in the program writes.
    unsafe { core::ptr::read_volatile(&TARGET_TGID) }
}

/// The offsets, by reference: the struct is too large to copy onto the 512-byte BPF
/// stack. The pointer goes through a volatile read so the compiler cannot fold the
/// initial values (the loader rewrites them).
#[inline(always)]
pub fn offsets() -> &'static Offsets {
    let p: *const Offsets = &raw const OFFSETS;
    // SAFETY: `p` points to a static; reading the local pointer volatile-ly only hides
    // its target from the optimizer.
    unsafe { &*core::ptr::read_volatile(&p) }
}

#[inline(always)]
pub fn snap_config() -> SnapConfig {
    // SAFETY: a volatile copy of a plain-data static that nothing in the program writes
    // (volatile for the same reason as `target_tgid`).
    unsafe { core::ptr::read_volatile(&SNAP_CONFIG) }
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// A `T` at `offset` bytes into the kernel object at `addr`.
#[inline(always)]
pub fn read<T>(addr: u64, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel never faults: a bad address is an error return, and
    // `T` is a plain integer or byte array at every call site.
    unsafe { bpf_probe_read_kernel((addr as usize + offset as usize) as *const T) }.ok()
}

/// (tgid, tid) of a task: `pid` and `tgid` are adjacent ints, read as one u64 (x86_64 and
/// every BPF target are little-endian, so pid is the low half).
#[inline(always)]
pub fn task_ids(task: u64, o: &Offsets) -> Option<(u32, u32)> {
    let v = read::<u64>(task, o.task_pid)?;
    Some(((v >> 32) as u32, v as u32))
}
