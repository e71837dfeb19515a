//! The `flow` and `flows` streams: packets, protocols, TCP flags, DNS messages and flows on
//! the watched interfaces, counted in the kernel by tc programs (cis490-ebpf/src/flow.rs)
//! on the snapshot ticks.
//!
//! - `fold`: the kernel's per-tick entries into cumulative per-interface and per-flow
//!   counts (pure, unit-tested)
//! - `dns`: DNS messages the programs copied, parsed as hostile input (pure, fuzzed)
//! - here: how a flow key is written (addresses, protocol names)
//!
//! The collectors, which read the kernel's maps, are in `bpf::flow`.

pub mod dns;
pub mod fold;

use std::net::{Ipv4Addr, Ipv6Addr};

use cis490_common::flow::{FlowKey, FAMILY_IPV4};

pub const SOURCE: &str = "flow";
pub const FLOWS_SOURCE: &str = "flows";
pub const DNS_SOURCE: &str = "dns";

/// The protocol column: a name for the common ones, else the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// The source and destination addresses of a key, as text.
pub fn addrs(k: &FlowKey) -> (String, String) {
    let one = |a: &[u8; 16]| {
        if k.family == FAMILY_IPV4 {
            Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
        } else {
            Ipv6Addr::from(*a).to_string()
        }
    };
    (one(&k.src), one(&k.dst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cis490_common::flow::FAMILY_IPV6;

    #[test]
    fn keys_are_written_as_text() {
        let mut k = FlowKey {
            family: FAMILY_IPV4,
            ..FlowKey::default()
        };
        k.src[..4].copy_from_slice(&[10, 77, 0, 1]);
        k.dst[..4].copy_from_slice(&[8, 8, 8, 8]);
        assert_eq!(addrs(&k), ("10.77.0.1".into(), "8.8.8.8".into()));
        k.family = FAMILY_IPV6;
        k.src = "fe80::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(addrs(&k).0, "fe80::1");
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(47), "47");
    }
}
