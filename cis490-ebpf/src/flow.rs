//! Flows on the watched interfaces (tc ingress and egress, attached through TCX links):
//! Ethernet (one or two VLAN tags), IPv4, IPv6, TCP, UDP and ICMP parsed in the kernel,
//! counted per interface and per flow under the tick they belong to (`TICK_EPOCH`, as
//! the kvm programs). The programs only read: every packet goes on (TC_ACT_UNSPEC, which
//! for TCX is "next"), none is delayed, changed or dropped.
//!
//! Per-CPU tables: a flow's two directions may be handled on two CPUs at once, and per-CPU
//! values need no atomic adds; user space sums the CPUs.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, generated::bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use cis490_common::flow::{
    DnsRecord, FlowDelta, FlowDeltaKey, FlowIfKey, FlowIfStats, FlowKey, DNS_COPY,
    DNS_PER_CPU_PER_S, FAMILY_IPV4, FAMILY_IPV6, MAX_FLOW_DELTAS, MAX_FLOW_DIRS,
    MAX_FLOW_IF_DELTAS, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use cis490_common::MAX_NET_IFS;

use crate::globals::tick_epoch;

/// ifindex → slot of the watched interfaces (filled by the loader).
#[map]
static FLOW_IFS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_NET_IFS, 0);

/// Flows the programs have seen, in their first direction → CLOCK_MONOTONIC of the first
/// packet. LRU: never full; the least recently seen flow is forgotten first.
#[map]
static FLOW_DIRS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(MAX_FLOW_DIRS, 0);

#[map]
static FLOW_DELTAS: PerCpuHashMap<FlowDeltaKey, FlowDelta> =
    PerCpuHashMap::with_max_entries(MAX_FLOW_DELTAS, 0);

#[map]
static FLOW_IF_DELTAS: PerCpuHashMap<FlowIfKey, FlowIfStats> =
    PerCpuHashMap::with_max_entries(MAX_FLOW_IF_DELTAS, 0);

/// DNS messages for user space to parse (headers and the message, at most `DNS_COPY`
/// bytes of it).
#[map]
static DNS_RING: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

/// Per CPU: start of the current second, messages copied in it.
#[map]
static DNS_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// All zero, never written: the initial values of new entries, passed to the kernel from
/// map memory rather than copied onto the 512-byte stack.
#[repr(C)]
pub struct Zeros {
    ifs: FlowIfStats,
    delta: FlowDelta,
}

#[map]
static ZEROS: Array<Zeros> = Array::with_max_entries(1, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const DNS_PORT: u16 = 53;

#[classifier]
pub fn cis490_flow_ingress(ctx: TcContext) -> i32 {
    handle(&ctx, false);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn cis490_flow_egress(ctx: TcContext) -> i32 {
    handle(&ctx, true);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn be16(ctx: &TcContext, off: usize) -> Option<u16> {
    ctx.load::<u16>(off).ok().map(u16::from_be)
}

/// This tick's counters of interface `slot` (this CPU's copy), created at zero.
#[inline(always)]
fn if_stats(slot: u32, epoch: u64) -> Option<*mut FlowIfStats> {
    let k = FlowIfKey {
        ifslot: slot,
        _pad: 0,
        epoch,
    };
    if let Some(p) = FLOW_IF_DELTAS.get_ptr_mut(&k) {
        return Some(p);
    }
    // EEXIST when another CPU created the key meanwhile: this CPU's copy is zero then.
    // SAFETY: a map value nothing writes, read by the kernel only.
    let zero = unsafe { &ZEROS.get(0)?.ifs };
    let _ = FLOW_IF_DELTAS.insert(&k, zero, BPF_NOEXIST as u64);
    FLOW_IF_DELTAS.get_ptr_mut(&k)
}

/// What the parse of one packet found.
struct Parsed {
    key: FlowKey,
    tcp_flags: u8,
    /// 1: a DNS query, 2: a DNS response, 0: not DNS (or no header in this packet).
    dns: u8,
    /// Where the DNS message starts in the packet, and its length as the packet says.
    dns_off: usize,
    dns_len: usize,
}

/// Not inlined: its own stack frame (each field load is a stack slot) keeps the packet
/// handler's under the BPF limit.
#[inline(never)]
fn parse(ctx: &TcContext, slot: u32) -> Option<Parsed> {
    let mut off = 14usize;
    let mut proto = be16(ctx, 12)?;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = be16(ctx, 16)?;
        off = 18;
        if proto == ETH_P_8021Q {
            proto = be16(ctx, 20)?;
            off = 22;
        }
    }
    let mut key = FlowKey {
        ifslot: slot as u8,
        ..FlowKey::default()
    };
    let l4;
    let mut first_fragment = true;
    match proto {
        ETH_P_IP => {
            let vihl = ctx.load::<u8>(off).ok()?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            key.family = FAMILY_IPV4;
            key.proto = ctx.load::<u8>(off + 9).ok()?;
            first_fragment = be16(ctx, off + 6)? & 0x1fff == 0;
            let src = ctx.load::<[u8; 4]>(off + 12).ok()?;
            let dst = ctx.load::<[u8; 4]>(off + 16).ok()?;
            key.src[..4].copy_from_slice(&src);
            key.dst[..4].copy_from_slice(&dst);
            l4 = off + ihl;
        }
        ETH_P_IPV6 => {
            key.family = FAMILY_IPV6;
            key.proto = ctx.load::<u8>(off + 6).ok()?;
            key.src = ctx.load::<[u8; 16]>(off + 8).ok()?;
            key.dst = ctx.load::<[u8; 16]>(off + 24).ok()?;
            l4 = off + 40;
        }
        _ => return None,
    }
    let mut tcp_flags = 0u8;
    let mut dns = 0u8;
    let mut dns_off = 0usize;
    let mut dns_len = 0usize;
    if first_fragment {
        match key.proto {
            IPPROTO_TCP => {
                key.sport = be16(ctx, l4)?;
                key.dport = be16(ctx, l4 + 2)?;
                tcp_flags = ctx.load::<u8>(l4 + 13).ok()?;
                if key.sport == DNS_PORT || key.dport == DNS_PORT {
                    let doff = usize::from(ctx.load::<u8>(l4 + 12).ok()? >> 4) * 4;
                    // A 2-byte length, then the header: id, then flags (QR is the top bit).
                    if let Ok(flags) = ctx.load::<u8>(l4 + doff + 4) {
                        dns = 1 + (flags >> 7);
                        dns_off = l4 + doff + 2;
                        dns_len = usize::from(be16(ctx, l4 + doff).unwrap_or(0));
                    }
                }
            }
            IPPROTO_UDP => {
                key.sport = be16(ctx, l4)?;
                key.dport = be16(ctx, l4 + 2)?;
                if key.sport == DNS_PORT || key.dport == DNS_PORT {
                    if let Ok(flags) = ctx.load::<u8>(l4 + 8 + 2) {
                        dns = 1 + (flags >> 7);
                        dns_off = l4 + 8;
                        dns_len = usize::from(be16(ctx, l4 + 4)?.saturating_sub(8));
                    }
                }
            }
            _ => {}
        }
    }
    Some(Parsed {
        key,
        tcp_flags,
        dns,
        dns_off,
        dns_len,
    })
}

/// Whether this CPU may copy one more DNS message in the current second.
#[inline(always)]
fn dns_allowed(now: u64) -> bool {
    let Some(r) = DNS_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's value of a per-CPU array, valid for the program run.
    unsafe {
        if now.wrapping_sub((*r)[0]) >= 1_000_000_000 {
            (*r)[0] = now;
            (*r)[1] = 0;
        }
        if (*r)[1] >= DNS_PER_CPU_PER_S {
            return false;
        }
        (*r)[1] += 1;
    }
    true
}

/// Copy the DNS message of `p` to user space; false when it was dropped (rate, ring).
/// Not inlined: its own stack frame keeps the packet handler's under the BPF limit.
#[inline(never)]
fn copy_dns(ctx: &TcContext, p: &Parsed, egress: bool, now: u64) -> bool {
    if !dns_allowed(now) {
        return false;
    }
    let in_packet = (ctx.len() as usize).saturating_sub(p.dns_off);
    let n = if in_packet < DNS_COPY {
        in_packet
    } else {
        DNS_COPY
    };
    if n == 0 {
        return true;
    }
    let Some(mut entry) = DNS_RING.reserve::<DnsRecord>(0) else {
        return false;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points to a reserved DnsRecord in the ring; every field written
    // below lies inside it, and `msg` gets at most DNS_COPY bytes.
    let copied = unsafe {
        (*rec).ktime_ns = now;
        (*rec).src = p.key.src;
        (*rec).dst = p.key.dst;
        (*rec).sport = p.key.sport;
        (*rec).dport = p.key.dport;
        (*rec).family = p.key.family;
        (*rec).ifslot = p.key.ifslot;
        (*rec).egress = u8::from(egress);
        (*rec).transport = p.key.proto;
        (*rec).wire_len = p.dns_len as u32;
        // The helper itself, not TcContext::load_bytes, which takes the minimum with the
        // packet's length again and so hands the verifier a length that may be 0; and
        // the length read back through memory, so the compiler cannot fold the check
        // below into the earlier ones: the verifier needs it right before the call.
        let n = core::ptr::read_volatile(&n);
        if n == 0 || n > DNS_COPY {
            entry.discard(0);
            return true;
        }
        (*rec).len = n as u32;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            p.dns_off as u32,
            (&raw mut (*rec).msg).cast::<c_void>(),
            n as u32,
        ) == 0
    };
    if copied {
        entry.submit(0);
        true
    } else {
        entry.discard(0);
        false
    }
}

#[inline(always)]
fn handle(ctx: &TcContext, egress: bool) {
    // SAFETY: `skb` is the program's context; ifindex is a field tc programs may read.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let Some(slot) = (unsafe { FLOW_IFS.get(&ifindex) }).copied() else {
        return;
    };
    let epoch = tick_epoch();
    let Some(st) = if_stats(slot, epoch) else {
        return;
    };
    let len = u64::from(ctx.len());
    // SAFETY (every `*st` below): this CPU's value of a per-CPU map, valid for the
    // program run; tc programs do not nest on one CPU.
    unsafe {
        if egress {
            (*st).tx_packets += 1;
            (*st).tx_bytes += len;
        } else {
            (*st).rx_packets += 1;
            (*st).rx_bytes += len;
        }
    }
    let Some(p) = parse(ctx, slot) else {
        unsafe { (*st).other_packets += 1 };
        return;
    };
    unsafe {
        match p.key.proto {
            IPPROTO_TCP => {
                (*st).tcp_packets += 1;
                let f = p.tcp_flags;
                if f & TCP_SYN != 0 {
                    if f & TCP_ACK != 0 {
                        (*st).tcp_synack += 1;
                    } else {
                        (*st).tcp_syn += 1;
                    }
                }
                if f & TCP_RST != 0 {
                    (*st).tcp_rst += 1;
                }
                if f & TCP_FIN != 0 {
                    (*st).tcp_fin += 1;
                }
            }
            IPPROTO_UDP => (*st).udp_packets += 1,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => (*st).icmp_packets += 1,
            _ => (*st).other_packets += 1,
        }
        match p.dns {
            1 => (*st).dns_queries += 1,
            2 => (*st).dns_responses += 1,
            _ => {}
        }
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if p.dns != 0 && !copy_dns(ctx, &p, egress, now) {
        // SAFETY: as above.
        unsafe { (*st).dns_dropped += 1 };
    }
    // The flow in its first direction: as this packet shows it, or reversed, or new.
    let rev = p.key.reversed();
    let (flow, forward, created) = if FLOW_DIRS.get_ptr(&p.key).is_some() {
        (p.key, true, false)
    } else if FLOW_DIRS.get_ptr(&rev).is_some() {
        (rev, false, false)
    } else {
        let _ = FLOW_DIRS.insert(&p.key, &now, BPF_NOEXIST as u64);
        unsafe { (*st).flows_new += 1 };
        (p.key, true, true)
    };
    let dk = FlowDeltaKey { flow, epoch };
    let d = match FLOW_DELTAS.get_ptr_mut(&dk) {
        Some(d) => d,
        None => {
            // SAFETY: as in if_stats.
            if let Some(z) = unsafe { ZEROS.get(0) } {
                let _ = FLOW_DELTAS.insert(&dk, &z.delta, BPF_NOEXIST as u64);
            }
            match FLOW_DELTAS.get_ptr_mut(&dk) {
                Some(d) => d,
                None => {
                    unsafe { (*st).untracked_packets += 1 };
                    return;
                }
            }
        }
    };
    // SAFETY: this CPU's value of a per-CPU map, valid for the program run.
    unsafe {
        if forward {
            (*d).packets_fwd += 1;
            (*d).bytes_fwd += len;
        } else {
            (*d).packets_rev += 1;
            (*d).bytes_rev += len;
        }
        if (*d).first_ns == 0 {
            (*d).first_ns = now;
        }
        (*d).last_ns = now;
        (*d).tcp_flags |= u32::from(p.tcp_flags);
        if created {
            (*d).created = 1;
        }
    }
}
