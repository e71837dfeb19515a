//! What the `flow` programs (cis490-ebpf/src/flow.rs) count, per tick, on the watched
//! interfaces: per-interface packet and protocol counters, and per-flow deltas. Both are
//! keyed by the tick they belong to (the snapshot's epoch, as for the kvm programs), so
//! user space gives every tick exactly its own packets.

/// Entries of `FLOW_DELTAS`: (flow, tick) pairs alive between two drains. A packet whose
/// flow finds it full still counts in its interface's counters, and in
/// `FlowIfStats::untracked_packets`.
pub const MAX_FLOW_DELTAS: u32 = 16384;

/// Entries of `FLOW_DIRS`, the flows the programs know the first direction of (an LRU
/// table: the least recently seen flow is forgotten first; a forgotten flow that sends
/// again is a new flow to the kernel, and user space counts it as `flows_reseen`).
pub const MAX_FLOW_DIRS: u32 = 65536;

/// Ticks of per-interface counters kept per CPU (`FLOW_IF_TICKS`, a ring indexed by
/// interface slot × this + tick % this): user space reads a tick's entry within 512 ticks
/// (0.5 s at 1 kHz; it drains every 50 ms).
pub const FLOW_IF_RING: u32 = 512;

/// One entry of `FLOW_IF_TICKS`: the counters of tick `epoch` (an entry of an older tick
/// is reset when its ring position comes round again).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowIfSlot {
    pub epoch: u64,
    pub stats: FlowIfStats,
}

/// Address family of a [`FlowKey`].
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// One direction of a flow as a packet shows it. IPv4 addresses take the first 4 bytes.
/// ICMP has no ports (0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    /// The watched interface's slot (`--net-if` order).
    pub ifslot: u8,
    pub _pad: u8,
}

impl FlowKey {
    /// The same flow seen from the other side.
    #[inline(always)]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

/// A flow's counts of one tick; `FlowKey` is in the flow's first direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowDeltaKey {
    pub flow: FlowKey,
    pub epoch: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowDelta {
    pub packets_fwd: u64,
    pub bytes_fwd: u64,
    pub packets_rev: u64,
    pub bytes_rev: u64,
    /// CLOCK_MONOTONIC of this tick's first and last packet of the flow.
    pub first_ns: u64,
    pub last_ns: u64,
    /// OR of the TCP flags seen.
    pub tcp_flags: u32,
    /// 1: the flow's first packet (to the kernel) was in this tick.
    pub created: u32,
}

/// Which interface and tick a `FlowIfStats` belongs to (user space's key for the entries
/// it takes from `FLOW_IF_TICKS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowIfKey {
    pub ifslot: u32,
    pub _pad: u32,
    pub epoch: u64,
}

/// An interface's counts of one tick; rx is ingress, tx egress, as the `net` source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowIfStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tcp_packets: u64,
    pub udp_packets: u64,
    pub icmp_packets: u64,
    pub other_packets: u64,
    pub tcp_syn: u64,
    pub tcp_synack: u64,
    pub tcp_rst: u64,
    pub tcp_fin: u64,
    pub flows_new: u64,
    pub dns_queries: u64,
    pub dns_responses: u64,
    /// Packets of a flow that found `FLOW_DELTAS` full.
    pub untracked_packets: u64,
    /// DNS messages not copied to user space: over the rate bound or the ring full.
    pub dns_dropped: u64,
}

/// Bytes of a DNS message copied to user space; a longer one is copied in part (its
/// parse then fails as truncated, and is counted).
pub const DNS_COPY: usize = 512;

/// DNS messages copied per second per CPU, at most; the rest are counted in
/// `FlowIfStats::dns_dropped`.
pub const DNS_PER_CPU_PER_S: u64 = 2000;

/// One DNS message as the flow programs saw it (ring buffer `DNS_RING`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsRecord {
    pub ktime_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub ifslot: u8,
    /// 1: the interface sent it (tc egress), 0: received.
    pub egress: u8,
    /// 6 (TCP) or 17 (UDP).
    pub transport: u8,
    /// Bytes of `msg` copied.
    pub len: u32,
    /// The message's length in the packet (more than `len` when it was cut).
    pub wire_len: u32,
    pub msg: [u8; DNS_COPY],
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_reversal() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<FlowDeltaKey>(), 48);
        assert_eq!(core::mem::size_of::<FlowDelta>(), 56);
        assert_eq!(core::mem::size_of::<FlowIfKey>(), 16);
        assert_eq!(core::mem::size_of::<FlowIfStats>(), 17 * 8);
        assert_eq!(core::mem::size_of::<FlowIfSlot>(), 18 * 8);
        assert!(FLOW_IF_RING.is_power_of_two());
        assert_eq!(core::mem::size_of::<DnsRecord>(), 8 + 32 + 8 + 8 + DNS_COPY);
        let k = FlowKey {
            src: [1; 16],
            dst: [2; 16],
            sport: 3,
            dport: 4,
            proto: 17,
            family: FAMILY_IPV4,
            ifslot: 1,
            _pad: 0,
        };
        let r = k.reversed();
        assert_eq!((r.src, r.dst, r.sport, r.dport), ([2; 16], [1; 16], 4, 3));
        assert_eq!((r.proto, r.family, r.ifslot), (17, FAMILY_IPV4, 1));
        assert_eq!(r.reversed(), k);
    }
}
