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
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use cis490_common::flow::{
    DnsRecord, FlowDelta, FlowDeltaKey, FlowIfSlot, FlowIfStats, FlowKey, DNS_COPY,
    DNS_PER_CPU_PER_S, FAMILY_IPV4, FAMILY_IPV6, FLOW_IF_RING, MAX_FLOW_DELTAS, MAX_FLOW_DIRS,
    TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use cis490_common::MAX_NET_IFS;

use crate::globals::tick_epoch;

/// The watched interfaces' ifindexes, by slot (0: unused), set by the loader: a scan of
/// a few words instead of a hash lookup per packet.
#[unsafe(no_mangle)]
static FLOW_IFINDEX: [u32; MAX_NET_IFS as usize] = [0; MAX_NET_IFS as usize];

/// The slot of the watched interface `ifindex`.
#[inline(always)]
fn slot_of(ifindex: u32) -> Option<u32> {
    let p: *const [u32; MAX_NET_IFS as usize] = &raw const FLOW_IFINDEX;
    // SAFETY: a static; the volatile read of the pointer only hides its initial values
    // from the optimizer (the loader rewrites them).
    let ifs = unsafe { &*core::ptr::read_volatile(&p) };
    for (slot, i) in ifs.iter().enumerate() {
        if *i == ifindex && ifindex != 0 {
            return Some(slot as u32);
        }
    }
    None
}

/// Flows the programs have seen, in their first direction → CLOCK_MONOTONIC of the first
/// packet. LRU: never full; the least recently seen flow is forgotten first.
#[map]
static FLOW_DIRS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(MAX_FLOW_DIRS, 0);

#[map]
static FLOW_DELTAS: PerCpuHashMap<FlowDeltaKey, FlowDelta> =
    PerCpuHashMap::with_max_entries(MAX_FLOW_DELTAS, 0);

/// Per-interface counters per tick, per CPU: a ring of FLOW_IF_RING ticks per interface
/// (sized by the loader). An array, not a hash: its lookup is a few instructions.
#[map]
static FLOW_IF_TICKS: PerCpuArray<FlowIfSlot> =
    PerCpuArray::with_max_entries(MAX_NET_IFS * FLOW_IF_RING, 0);

/// DNS messages for user space to parse (headers and the message, at most `DNS_COPY`
/// bytes of it).
#[map]
static DNS_RING: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

/// Per CPU: start of the current second, messages copied in it.
#[map]
static DNS_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// All zero, never written: the initial value of new flow entries, passed to the kernel
/// from map memory rather than copied onto the 512-byte stack.
#[repr(C)]
pub struct Zeros {
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

/// `N` bytes of the packet's linear data at `off`, for direct reads at constant offsets
/// into them: one bounds check the verifier sees on the very pointer the reads use. (A
/// helper call, bpf_skb_load_bytes, per field was the programs' largest cost.)
#[inline(always)]
fn window<const N: usize>(ctx: &TcContext, off: usize) -> Option<*const u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    let at = (start + off) as *const u8;
    // SAFETY: pointer arithmetic only; nothing is read unless it is in bounds.
    if unsafe { at.add(N) } as usize > end {
        return None;
    }
    Some(at)
}

/// Byte `i` of a window (`i` < its N).
#[inline(always)]
fn byte(w: *const u8, i: usize) -> u8 {
    // SAFETY: the caller's window covers `i` (checked by `window`).
    unsafe { *w.add(i) }
}

/// Big-endian u16 at `i` of a window (`i + 1` < its N).
#[inline(always)]
fn be16_at(w: *const u8, i: usize) -> u16 {
    u16::from_be_bytes([byte(w, i), byte(w, i + 1)])
}

/// Headers the parser may read: Ethernet, two VLAN tags, IPv6, a TCP header with options,
/// and the DNS flags after it.
const HEADERS: usize = 22 + 60 + 60 + 6;

/// This tick's counters of interface `slot` (this CPU's copy), reset when the ring
/// position last held an older tick.
#[inline(always)]
fn if_stats(slot: u32, epoch: u64) -> Option<*mut FlowIfStats> {
    let idx = slot * FLOW_IF_RING + (epoch as u32 & (FLOW_IF_RING - 1));
    let e = FLOW_IF_TICKS.get_ptr_mut(idx)?;
    // SAFETY: this CPU's value of a per-CPU array, valid for the program run; tc programs
    // do not nest on one CPU.
    unsafe {
        if (*e).epoch != epoch {
            (*e).stats = FlowIfStats::default();
            (*e).epoch = epoch;
        }
        Some(&raw mut (*e).stats)
    }
}

/// What the parse of one packet found besides its flow key.
struct Parsed {
    tcp_flags: u8,
    /// 1: a DNS query, 2: a DNS response, 0: not DNS (or no header in this packet).
    dns: u8,
    /// Where the DNS message starts in the packet, and its length as the packet says.
    dns_off: usize,
    dns_len: usize,
}

/// Parse the packet's headers into `key` (its ifslot already set) and the rest.
#[inline(always)]
fn parse(ctx: &TcContext, key: &mut FlowKey) -> Option<Parsed> {
    // Headers outside the linear data (rare for a VM's packets) are pulled in first.
    let len = ctx.len() as usize;
    if ctx.data_end() - ctx.data() < HEADERS && len > ctx.data_end() - ctx.data() {
        let _ = ctx.pull_data(if len < HEADERS { len } else { HEADERS } as u32);
    }
    let eth = window::<14>(ctx, 0)?;
    let mut off = 14usize;
    let mut proto = be16_at(eth, 12);
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let tag = window::<8>(ctx, 14)?;
        proto = be16_at(tag, 2);
        off = 18;
        if proto == ETH_P_8021Q {
            proto = be16_at(tag, 6);
            off = 22;
        }
    }
    let l4;
    let mut first_fragment = true;
    match proto {
        ETH_P_IP => {
            let ip = window::<20>(ctx, off)?;
            let vihl = byte(ip, 0);
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            key.family = FAMILY_IPV4;
            key.proto = byte(ip, 9);
            first_fragment = be16_at(ip, 6) & 0x1fff == 0;
            for i in 0..4 {
                key.src[i] = byte(ip, 12 + i);
                key.dst[i] = byte(ip, 16 + i);
            }
            l4 = off + ihl;
        }
        ETH_P_IPV6 => {
            let ip = window::<40>(ctx, off)?;
            key.family = FAMILY_IPV6;
            key.proto = byte(ip, 6);
            for i in 0..16 {
                key.src[i] = byte(ip, 8 + i);
                key.dst[i] = byte(ip, 24 + i);
            }
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
                let t = window::<14>(ctx, l4)?;
                key.sport = be16_at(t, 0);
                key.dport = be16_at(t, 2);
                tcp_flags = byte(t, 13);
                if key.sport == DNS_PORT || key.dport == DNS_PORT {
                    let doff = usize::from(byte(t, 12) >> 4) * 4;
                    // A 2-byte length, then the header: id, then flags (QR is the top bit).
                    if let Some(d) = window::<5>(ctx, l4 + doff) {
                        dns = 1 + (byte(d, 4) >> 7);
                        dns_off = l4 + doff + 2;
                        dns_len = usize::from(be16_at(d, 0));
                    }
                }
            }
            IPPROTO_UDP => {
                let u = window::<8>(ctx, l4)?;
                key.sport = be16_at(u, 0);
                key.dport = be16_at(u, 2);
                if key.sport == DNS_PORT || key.dport == DNS_PORT {
                    if let Some(d) = window::<3>(ctx, l4 + 8) {
                        dns = 1 + (byte(d, 2) >> 7);
                        dns_off = l4 + 8;
                        dns_len = usize::from(be16_at(u, 4).saturating_sub(8));
                    }
                }
            }
            _ => {}
        }
    }
    Some(Parsed {
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
fn copy_dns(ctx: &TcContext, key: &FlowKey, p: &Parsed, egress: bool, now: u64) -> bool {
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
        (*rec).src = key.src;
        (*rec).dst = key.dst;
        (*rec).sport = key.sport;
        (*rec).dport = key.dport;
        (*rec).family = key.family;
        (*rec).ifslot = key.ifslot;
        (*rec).egress = u8::from(egress);
        (*rec).transport = key.proto;
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

/// The other direction of `k`, in place.
#[inline(always)]
fn reverse(k: &mut FlowKey) {
    core::mem::swap(&mut k.src, &mut k.dst);
    core::mem::swap(&mut k.sport, &mut k.dport);
}

#[inline(always)]
fn handle(ctx: &TcContext, egress: bool) {
    // SAFETY: `skb` is the program's context; ifindex is a field tc programs may read.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(slot) = slot_of(ifindex) else {
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
    // The key is parsed straight into the delta key (the stack is 512 bytes).
    let mut dk = FlowDeltaKey {
        flow: FlowKey {
            ifslot: slot as u8,
            ..FlowKey::default()
        },
        epoch,
    };
    let Some(p) = parse(ctx, &mut dk.flow) else {
        // SAFETY: `st` as above (this CPU's value, valid for the run).
        unsafe { (*st).other_packets += 1 };
        return;
    };
    // SAFETY: `st` as above (this CPU's value, valid for the run).
    unsafe {
        match dk.flow.proto {
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
    if p.dns != 0 && !copy_dns(ctx, &dk.flow, &p, egress, now) {
        // SAFETY: as above.
        unsafe { (*st).dns_dropped += 1 };
    }
    // The flow in its first direction. Most packets find their flow's entry of this tick
    // (as the packet shows it, or reversed: one or two lookups); the first packet of a
    // flow in a tick asks the table of known flows, and a flow it does not know is new.
    // The key is reversed in place: one key on the stack (512 bytes in all).
    let mut forward = true;
    let mut created = false;
    let d = match FLOW_DELTAS.get_ptr_mut(&dk) {
        Some(d) => d,
        None => {
            reverse(&mut dk.flow);
            match FLOW_DELTAS.get_ptr_mut(&dk) {
                Some(d) => {
                    forward = false;
                    d
                }
                None => {
                    if FLOW_DIRS.get_ptr(&dk.flow).is_some() {
                        forward = false;
                    } else {
                        reverse(&mut dk.flow);
                        if FLOW_DIRS.get_ptr(&dk.flow).is_none() {
                            let _ = FLOW_DIRS.insert(&dk.flow, &now, BPF_NOEXIST as u64);
                            // SAFETY: `st` as above (this CPU's value, valid for the run).
                            unsafe { (*st).flows_new += 1 };
                            created = true;
                        }
                    }
                    if let Some(z) = ZEROS.get(0) {
                        let _ = FLOW_DELTAS.insert(&dk, &z.delta, BPF_NOEXIST as u64);
                    }
                    match FLOW_DELTAS.get_ptr_mut(&dk) {
                        Some(d) => d,
                        None => {
                            // SAFETY: `st` as above (this CPU's value, valid for the run).
                            unsafe { (*st).untracked_packets += 1 };
                            return;
                        }
                    }
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
