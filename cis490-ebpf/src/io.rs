//! I/O programs: bytes and calls of the read/write syscall family at syscall exit
//! (positive return values only), and block requests issued while a thread of the target
//! is current (map `IO`, key = tid).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use cis490_common::{IoStats, MAX_THREADS};

use crate::globals::{current, offsets, target_tgid};

#[map]
static IO: HashMap<u32, IoStats> = HashMap::with_max_entries(MAX_THREADS, 0);

const ZERO: IoStats = IoStats {
    read_bytes: 0,
    read_ops: 0,
    write_bytes: 0,
    write_ops: 0,
    blk_read_bytes: 0,
    blk_read_ops: 0,
    blk_write_bytes: 0,
    blk_write_ops: 0,
};

/// The entry of the current thread if it belongs to the target. Only the thread itself
/// updates its entry (syscall exit and block issue run in its context), so plain adds
/// are race-free.
#[inline(always)]
fn own_entry() -> Option<*mut IoStats> {
    let (tgid, tid) = current();
    if tgid != target_tgid() {
        return None;
    }
    if let Some(p) = IO.get_ptr_mut(tid) {
        return Some(p);
    }
    let _ = IO.insert(tid, ZERO, BPF_NOEXIST as u64);
    IO.get_ptr_mut(tid)
}

#[inline(always)]
fn syscall_exit(ctx: &TracePointContext, write: bool) -> u32 {
    // Filter on the tgid first: this runs for every read/write of every process.
    let (tgid, _) = current();
    if tgid != target_tgid() {
        return 0;
    }
    let ret = match unsafe { ctx.read_at::<i64>(offsets().sys_exit_ret as usize) } {
        Ok(r) if r > 0 => r as u64,
        _ => return 0,
    };
    if let Some(e) = own_entry() {
        unsafe {
            if write {
                (*e).write_bytes += ret;
                (*e).write_ops += 1;
            } else {
                (*e).read_bytes += ret;
                (*e).read_ops += 1;
            }
        }
    }
    0
}

/// Attached to sys_exit_{read,pread64,readv,preadv,preadv2}.
#[tracepoint]
pub fn cis490_sys_exit_read(ctx: TracePointContext) -> u32 {
    syscall_exit(&ctx, false)
}

/// Attached to sys_exit_{write,pwrite64,writev,pwritev,pwritev2}.
#[tracepoint]
pub fn cis490_sys_exit_write(ctx: TracePointContext) -> u32 {
    syscall_exit(&ctx, true)
}

#[tracepoint]
pub fn cis490_block_rq_issue(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current();
    if tgid != target_tgid() {
        return 0;
    }
    let off = offsets();
    let Ok(bytes) = (unsafe { ctx.read_at::<u32>(off.blk_bytes as usize) }) else {
        return 0;
    };
    let Ok(rwbs) = (unsafe { ctx.read_at::<[u8; 2]>(off.blk_rwbs as usize) }) else {
        return 0;
    };
    if bytes == 0 {
        return 0; // a pure flush
    }
    // rwbs: an optional leading 'F' (preflush), then R/W/D/E/N.
    let kind = if rwbs[0] == b'F' { rwbs[1] } else { rwbs[0] };
    if let Some(e) = own_entry() {
        unsafe {
            match kind {
                b'R' => {
                    (*e).blk_read_bytes += u64::from(bytes);
                    (*e).blk_read_ops += 1;
                }
                b'W' => {
                    (*e).blk_write_bytes += u64::from(bytes);
                    (*e).blk_write_ops += 1;
                }
                _ => {}
            }
        }
    }
    0
}
