//! Block requests issued while a thread of the target is current (map `BLK`, key = tid).
//! The syscall-level I/O counters need no program: the snapshot reads the kernel's own
//! per-task accounting (`ioac`), so no syscall of any process pays for tracing.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use cis490_common::{BlkStats, MAX_SLOTS};

use crate::globals::{current, offsets, target_tgid};

#[map]
pub static BLK: HashMap<u32, BlkStats> = HashMap::with_max_entries(MAX_SLOTS, 0);

pub const BLK_ZERO: BlkStats = BlkStats {
    read_bytes: 0,
    read_ops: 0,
    write_bytes: 0,
    write_ops: 0,
};

#[tracepoint]
pub fn cis490_block_rq_issue(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if tgid != target_tgid() {
        return 0;
    }
    let off = offsets();
    // SAFETY (both reads): read_at is a bounded probe read of the tracepoint record at
    // offsets the loader took from this kernel's format file.
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
    let e = match BLK.get_ptr_mut(&tid) {
        Some(e) => e,
        None => {
            // NOEXIST: only this thread creates its entry (block issue runs in its
            // context), so plain adds below are race-free.
            let _ = BLK.insert(&tid, &BLK_ZERO, BPF_NOEXIST as u64);
            let Some(e) = BLK.get_ptr_mut(&tid) else {
                return 0;
            };
            e
        }
    };
    // SAFETY: `e` points at this thread's map value, valid for the program run; only this
    // thread's context updates it (see the insert above).
    unsafe {
        match kind {
            b'R' => {
                (*e).read_bytes += u64::from(bytes);
                (*e).read_ops += 1;
            }
            b'W' => {
                (*e).write_bytes += u64::from(bytes);
                (*e).write_ops += 1;
            }
            _ => {}
        }
    }
    0
}
