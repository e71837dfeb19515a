//! capture.pcapng (`--pcap`) read back through the pcap-file crate, the crate cis490
//! writes it with.

use std::path::Path;

use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};

/// One packet: its direction, lengths and time; for IPv4 over Ethernet its protocol,
/// ports and TCP flags (zero for any other frame).
pub struct PcapPacket {
    pub outbound: bool,
    pub original_len: u64,
    pub captured: usize,
    pub wall_ns: u64,
    pub ethertype: u16,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
}

pub struct Pcap {
    pub ifaces: Vec<String>,
    pub packets: Vec<PcapPacket>,
}

/// Interface names (each with nanosecond timestamps) and, per packet, the direction
/// flag (epb_flags bits 0-1: 1 inbound, 2 outbound; a packet without one fails), lengths,
/// and the IPv4 protocol, ports and TCP flags.
pub fn read_pcap(path: &Path) -> Pcap {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = PcapNgReader::new(&bytes[..]).unwrap();
    let mut out = Pcap {
        ifaces: Vec::new(),
        packets: Vec::new(),
    };
    while let Some(b) = r.next_block() {
        match b.unwrap() {
            Block::InterfaceDescription(i) => {
                assert!(i
                    .options
                    .contains(&InterfaceDescriptionOption::IfTsResol(9)));
                for o in &i.options {
                    if let InterfaceDescriptionOption::IfName(n) = o {
                        out.ifaces.push(n.to_string());
                    }
                }
            }
            Block::EnhancedPacket(p) => {
                let flags = p.options.iter().find_map(|o| match o {
                    EnhancedPacketOption::Flags(f) => Some(*f),
                    _ => None,
                });
                let d = &p.data;
                let ethertype = d
                    .get(12..14)
                    .map_or(0, |t| u16::from_be_bytes([t[0], t[1]]));
                let (mut proto, mut src_port, mut dst_port, mut tcp_flags) = (0, 0, 0, 0);
                if ethertype == 0x0800 && d.len() >= 34 {
                    proto = d[23];
                    let l4 = 14 + usize::from(d[14] & 0x0f) * 4;
                    if d.len() >= l4 + 4 {
                        src_port = u16::from_be_bytes([d[l4], d[l4 + 1]]);
                        dst_port = u16::from_be_bytes([d[l4 + 2], d[l4 + 3]]);
                    }
                    if proto == 6 && d.len() > l4 + 13 {
                        tcp_flags = d[l4 + 13];
                    }
                }
                out.packets.push(PcapPacket {
                    outbound: match flags {
                        Some(2) => true,
                        Some(1) => false,
                        other => panic!("packet without a direction: {other:?}"),
                    },
                    original_len: u64::from(p.original_len),
                    captured: d.len(),
                    wall_ns: p.timestamp.as_nanos() as u64,
                    ethertype,
                    proto,
                    src_port,
                    dst_port,
                    tcp_flags,
                });
            }
            _ => {}
        }
    }
    out
}
