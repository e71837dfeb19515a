//! Net programs: rx/tx bytes and packets of the watched interfaces (map `NET_IFS`: name →
//! slot, filled by user space; per-CPU array `NET`: counters per slot).

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
    EbpfContext,
};
use cis490_common::{IfName, NetIf, NetStats, IFNAMSIZ, MAX_NET_IFS};

use crate::globals::offsets;

#[map]
static NET_IFS: HashMap<IfName, NetIf> = HashMap::with_max_entries(MAX_NET_IFS, 0);

#[map]
pub static NET: PerCpuArray<NetStats> = PerCpuArray::with_max_entries(MAX_NET_IFS, 0);

/// The watched interface a `__data_loc char[] name` field names, if any.
#[inline(always)]
fn watched(ctx: &TracePointContext, name_field: u32) -> Option<NetIf> {
    // SAFETY: a bounded probe read of the tracepoint record at the format file's offset.
    let loc = unsafe { ctx.read_at::<u32>(name_field as usize) }.ok()?;
    // __data_loc: offset of the string in the record (low 16 bits), length (high 16).
    let at = (loc & 0xffff) as usize;
    let mut name = IfName([0u8; IFNAMSIZ]);
    // The buffer starts zeroed and the copy stops at the NUL, so the key is the name
    // NUL-padded exactly as user space wrote it.
    // SAFETY: the source is inside the tracepoint record (__data_loc offset); the helper
    // copies at most IFNAMSIZ bytes into `name` and faults into an error, never a crash.
    unsafe {
        bpf_probe_read_kernel_str_bytes((ctx.as_ptr() as *const u8).add(at), &mut name.0).ok()?;
    }
    // SAFETY: the value is copied out at once, before anything could update the entry.
    unsafe { NET_IFS.get(&name) }.copied()
}

#[tracepoint]
pub fn cis490_net_dev_xmit(ctx: TracePointContext) -> u32 {
    let off = offsets();
    // rc != NETDEV_TX_OK: the driver did not take the packet, the device does not count it.
    // SAFETY (this and the reads below): bounded probe reads of the tracepoint record at
    // offsets the loader took from this kernel's format file.
    match unsafe { ctx.read_at::<i32>(off.xmit_rc as usize) } {
        Ok(0) => {}
        _ => return 0,
    }
    let Some(netif) = watched(&ctx, off.xmit_name) else {
        return 0;
    };
    let Ok(len) = (unsafe { ctx.read_at::<u32>(off.xmit_len as usize) }) else {
        return 0;
    };
    if let Some(s) = NET.get_ptr_mut(netif.slot) {
        // SAFETY: this CPU's value of a per-CPU array, valid for the program run; tracepoint
        // programs do not nest on one CPU.
        unsafe {
            (*s).tx_bytes += u64::from(len);
            (*s).tx_packets += 1;
        }
    }
    0
}

#[tracepoint]
pub fn cis490_netif_receive_skb(ctx: TracePointContext) -> u32 {
    let off = offsets();
    let Some(netif) = watched(&ctx, off.recv_name) else {
        return 0;
    };
    // SAFETY: as in cis490_net_dev_xmit.
    let Ok(len) = (unsafe { ctx.read_at::<u32>(off.recv_len as usize) }) else {
        return 0;
    };
    if let Some(s) = NET.get_ptr_mut(netif.slot) {
        // SAFETY: as in cis490_net_dev_xmit.
        unsafe {
            (*s).rx_bytes += u64::from(len) + u64::from(netif.rx_header_len);
            (*s).rx_packets += 1;
        }
    }
    0
}
