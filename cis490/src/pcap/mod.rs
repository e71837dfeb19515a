//! `--pcap`: a bounded packet capture of the watched interfaces next to the episode, in
//! `capture.pcapng`, for forensics (the feature streams stay `flow`, `flows` and `dns`).
//!
//! - here: the options, the writer that keeps the file within its size cap (pure: any
//!   `Write`, unit-tested), and the walk over a file's blocks that `recover` (cut a torn
//!   last block) and `validate` (name one) use
//! - [`socket`]: the packet sockets and the capture thread (kernel-touching; tested in
//!   tests/flow.rs against known traffic)
//!
//! The file is pcapng (one section, one interface description per interface with its name,
//! snap length and nanosecond timestamps, direction flags on every packet, interface
//! statistics with the kernel's drops at the end), written with the pcap-file crate.
//! Timestamps are the kernel's receive time on CLOCK_REALTIME, as pcapng readers expect;
//! meta.json's clock pair turns them into the episode's `t_mono_ns`.

pub mod socket;

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::interface_statistics::{
    InterfaceStatisticsBlock, InterfaceStatisticsOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness};
use sha2::{Digest, Sha256};

use crate::jsonl::FileStats;

pub use socket::PcapCapture;

/// The file, in the episode directory.
pub const FILE: &str = "capture.pcapng";
/// meta.result key of the capture's summary.
pub const META_KEY: &str = "pcap";

pub const DEFAULT_SNAPLEN: u32 = 65_535;
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// `--pcap`, `--pcap-snaplen`, `--pcap-max-mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcapOptions {
    /// Bytes kept of each packet (its original length is recorded too).
    pub snaplen: u32,
    /// The file never grows past this; packets after it are counted, not written.
    pub max_bytes: u64,
}

impl Default for PcapOptions {
    fn default() -> Self {
        Self {
            snaplen: DEFAULT_SNAPLEN,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Direction of a packet as the interface saw it (the pcapng epb_flags bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// One interface of the file.
#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    /// ETHERNET for taps and veth, RAW (IP first) for tun devices.
    pub linktype: DataLink,
}

/// Counts of one capture (meta.result.pcap).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PcapCounts {
    pub packets_written: u64,
    /// Packets longer than the snap length (written cut).
    pub packets_cut: u64,
    /// Packets that arrived after the size cap was reached (not written).
    pub packets_over_cap: u64,
    /// Packets the kernel dropped because the socket's buffer was full.
    pub packets_dropped_kernel: u64,
    pub bytes_written: u64,
}

/// The pcapng writer with the size cap: a packet is written only when it, and the
/// statistics blocks still to come, fit under `max_bytes`.
pub struct CappedWriter<W: Write> {
    inner: PcapNgWriter<Counting<W>>,
    opts: PcapOptions,
    ifaces: usize,
    pub counts: PcapCounts,
}

/// Bytes of one interface statistics block as [`CappedWriter::finish`] writes it: header
/// and trailer (12), interface id and timestamp (12), three 8-byte options with their
/// 4-byte headers (36), the end of options (4).
const STATS_BLOCK_BYTES: u64 = 64;

impl<W: Write> CappedWriter<W> {
    /// The section header and one interface description per interface.
    pub fn new(out: W, ifaces: &[Interface], opts: PcapOptions) -> Result<Self, String> {
        let section = SectionHeaderBlock {
            endianness: Endianness::native(),
            options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
                "cis490 {}",
                env!("CARGO_PKG_VERSION")
            )))],
            ..SectionHeaderBlock::default()
        };
        let mut inner = PcapNgWriter::with_section_header(Counting::new(out), section)
            .map_err(|e| format!("writing the pcapng section header: {e}"))?;
        for i in ifaces {
            inner
                .write_pcapng_block(InterfaceDescriptionBlock {
                    linktype: i.linktype,
                    snaplen: opts.snaplen,
                    options: vec![
                        InterfaceDescriptionOption::IfName(Cow::Owned(i.name.clone())),
                        // EnhancedPacketBlock writes nanoseconds.
                        InterfaceDescriptionOption::IfTsResol(9),
                    ],
                })
                .map_err(|e| format!("writing the pcapng interface of {}: {e}", i.name))?;
        }
        let mut w = Self {
            inner,
            opts,
            ifaces: ifaces.len(),
            counts: PcapCounts::default(),
        };
        w.counts.bytes_written = w.inner.get_ref().bytes;
        Ok(w)
    }

    /// Write one packet (`data` already at most the snap length, `original_len` what was
    /// on the wire), or count it as over the cap. Err only for a failed write.
    pub fn packet(
        &mut self,
        iface: u32,
        wall: Duration,
        original_len: u32,
        data: &[u8],
        dir: Direction,
    ) -> Result<(), String> {
        let data = &data[..data.len().min(self.opts.snaplen as usize)];
        // Header 28 + data padded to 4 + flags option 8 + end of options 4 + trailer 4.
        let need = 44 + data.len().next_multiple_of(4) as u64;
        let reserve = self.ifaces as u64 * STATS_BLOCK_BYTES;
        if self.counts.bytes_written + need + reserve > self.opts.max_bytes {
            self.counts.packets_over_cap += 1;
            return Ok(());
        }
        let flags = match dir {
            Direction::Inbound => 1,
            Direction::Outbound => 2,
        };
        self.inner
            .write_pcapng_block(EnhancedPacketBlock {
                interface_id: iface,
                timestamp: wall,
                original_len,
                data: Cow::Borrowed(data),
                options: vec![EnhancedPacketOption::Flags(flags)],
            })
            .map_err(|e| format!("writing {FILE}: {e}"))?;
        self.counts.packets_written += 1;
        if (data.len() as u32) < original_len {
            self.counts.packets_cut += 1;
        }
        self.counts.bytes_written = self.inner.get_ref().bytes;
        Ok(())
    }

    pub fn snaplen(&self) -> u32 {
        self.opts.snaplen
    }

    /// Push what is buffered to the underlying writer.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.get_mut().inner.flush()
    }

    /// Per interface: packets received and dropped by the kernel, and packets delivered
    /// to the file; then the writer back, with the final counts and the manifest's figures
    /// of everything written (so the file is not read again to list it).
    pub fn finish(
        mut self,
        wall: Duration,
        per_iface: &[(u64, u64, u64)],
    ) -> Result<(W, PcapCounts, FileStats), String> {
        for (id, (received, dropped, written)) in per_iface.iter().enumerate() {
            self.inner
                .write_pcapng_block(InterfaceStatisticsBlock {
                    interface_id: id as u32,
                    timestamp: wall.as_nanos() as u64,
                    options: vec![
                        InterfaceStatisticsOption::IsbIfRecv(*received),
                        InterfaceStatisticsOption::IsbOsDrop(*dropped),
                        InterfaceStatisticsOption::IsbUsrDeliv(*written),
                    ],
                })
                .map_err(|e| format!("writing {FILE}: {e}"))?;
        }
        self.counts.bytes_written = self.inner.get_ref().bytes;
        self.counts.packets_dropped_kernel = per_iface.iter().map(|p| p.1).sum();
        let counting = self.inner.into_inner();
        let stats = FileStats {
            name: FILE.to_owned(),
            bytes: counting.bytes,
            lines: counting.newlines,
            sha256: crate::jsonl::hex(&counting.sha.finalize()),
        };
        Ok((counting.inner, self.counts, stats))
    }
}

/// A writer that counts and hashes what went through it, as manifest.json lists a file
/// (bytes, 0x0A bytes as `lines`, sha256; see `episode::stats_on_disk`).
pub struct Counting<W> {
    inner: W,
    bytes: u64,
    newlines: u64,
    sha: Sha256,
}

impl<W> Counting<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            bytes: 0,
            newlines: 0,
            sha: Sha256::new(),
        }
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        self.newlines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What a walk over a pcapng file's blocks found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockWalk {
    /// Bytes of whole, well-formed blocks from the start.
    pub whole_bytes: u64,
    pub blocks: u64,
    /// Why the walk stopped before the end (None: the file is whole blocks).
    pub stopped: Option<String>,
}

/// Walk the blocks of a pcapng file in memory (see [`walk_file`]).
pub fn walk_blocks(bytes: &[u8]) -> BlockWalk {
    walk(bytes.len() as u64, |at, buf| {
        buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
        Ok(())
    })
    .unwrap_or_else(|e| BlockWalk {
        whole_bytes: 0,
        blocks: 0,
        stopped: Some(e.to_string()),
    })
}

/// Walk the blocks of a pcapng file on disk, reading each block's two lengths through
/// one buffered reader: the walk only moves forward, so a capture of a million packets
/// is a few hundred reads, not two system calls per packet.
pub fn walk_file(file: &std::fs::File) -> std::io::Result<BlockWalk> {
    use std::io::{BufReader, Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.seek(SeekFrom::Start(0))?;
    let mut pos = 0u64;
    walk(len, |at, buf| {
        // `walk` asks for increasing offsets; a skip within the buffer costs nothing.
        r.seek_relative(at as i64 - pos as i64)?;
        r.read_exact(buf)?;
        pos = at + buf.len() as u64;
        Ok(())
    })
}

/// A section header first (its magic gives the byte order), then blocks whose leading and
/// trailing lengths agree, are multiples of 4 and fit in the file. A capture killed
/// mid-write leaves a torn last block, which `recover` cuts at `whole_bytes`; anything
/// else is named by `validate`.
fn walk(
    len: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<BlockWalk> {
    let mut at = 0u64;
    let mut blocks = 0u64;
    let mut little = true;
    let stop = |at: u64, blocks: u64, why: String| {
        Ok(BlockWalk {
            whole_bytes: at,
            blocks,
            stopped: Some(why),
        })
    };
    let mut head = [0u8; 12];
    let mut tail = [0u8; 4];
    while at < len {
        let left = len - at;
        if left < 12 {
            return stop(
                at,
                blocks,
                format!("{left} bytes at the end are no whole block"),
            );
        }
        read_at(at, &mut head)?;
        if at == 0 {
            if head[..4] != [0x0A, 0x0D, 0x0D, 0x0A] {
                return stop(0, 0, "not a pcapng file (no section header first)".into());
            }
            little = match &head[8..12] {
                [0x4D, 0x3C, 0x2B, 0x1A] => true,
                [0x1A, 0x2B, 0x3C, 0x4D] => false,
                _ => return stop(0, 0, "section header with a bad byte-order magic".into()),
            };
        }
        let u32_of = |b: [u8; 4]| {
            if little {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            }
        };
        let block_len = u64::from(u32_of([head[4], head[5], head[6], head[7]]));
        if block_len < 12 || block_len % 4 != 0 {
            return stop(
                at,
                blocks,
                format!("block {blocks} has a bad length {block_len}"),
            );
        }
        if block_len > left {
            return stop(
                at,
                blocks,
                format!("block {blocks} says {block_len} bytes, {left} are left"),
            );
        }
        read_at(at + block_len - 4, &mut tail)?;
        if u64::from(u32_of(tail)) != block_len {
            return stop(at, blocks, format!("block {blocks}'s two lengths differ"));
        }
        at += block_len;
        blocks += 1;
    }
    Ok(BlockWalk {
        whole_bytes: at,
        blocks,
        stopped: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::{Block, PcapNgReader};

    fn eth() -> Vec<Interface> {
        vec![Interface {
            name: "tap0".into(),
            linktype: DataLink::ETHERNET,
        }]
    }

    #[test]
    fn packets_round_trip_through_a_real_reader() {
        let opts = PcapOptions {
            snaplen: 64,
            max_bytes: 1 << 20,
        };
        let mut w = CappedWriter::new(Vec::new(), &eth(), opts).unwrap();
        let big = vec![0xAB; 100];
        w.packet(
            0,
            Duration::from_nanos(1_700_000_000_123_456_789),
            100,
            &big,
            Direction::Outbound,
        )
        .unwrap();
        w.packet(
            0,
            Duration::from_nanos(1_700_000_000_200_000_000),
            3,
            b"abc",
            Direction::Inbound,
        )
        .unwrap();
        assert_eq!(w.counts.packets_written, 2);
        assert_eq!(w.counts.packets_cut, 1);
        let (bytes, counts, stats) = w
            .finish(Duration::from_secs(1_700_000_001), &[(5, 1, 2)])
            .unwrap();
        // The manifest's figures, as stats_on_disk would read them back.
        assert_eq!(stats.bytes, bytes.len() as u64);
        assert_eq!(stats.sha256, crate::jsonl::hex(&Sha256::digest(&bytes)));
        assert_eq!(
            stats.lines,
            bytes.iter().filter(|&&b| b == b'\n').count() as u64
        );
        assert_eq!(counts.packets_dropped_kernel, 1);
        assert_eq!(counts.bytes_written, bytes.len() as u64);
        assert_eq!(walk_blocks(&bytes).stopped, None);
        let mut r = PcapNgReader::new(&bytes[..]).unwrap();
        let mut packets = Vec::new();
        let mut stats = None;
        while let Some(b) = r.next_block() {
            match b.unwrap() {
                Block::EnhancedPacket(p) => packets.push((
                    p.timestamp.as_nanos(),
                    p.original_len,
                    p.data.len(),
                    p.options
                        .clone()
                        .into_iter()
                        .map(|o| format!("{o:?}"))
                        .collect::<Vec<_>>(),
                )),
                Block::InterfaceStatistics(s) => stats = Some(format!("{:?}", s.options)),
                _ => {}
            }
        }
        assert_eq!(r.interfaces().len(), 1);
        assert_eq!(packets[0].0, 1_700_000_000_123_456_789);
        assert_eq!(
            (packets[0].1, packets[0].2),
            (100, 64),
            "cut at the snap length"
        );
        assert_eq!(packets[0].3, vec!["Flags(2)"]);
        assert_eq!((packets[1].1, packets[1].2), (3, 3));
        let stats = stats.unwrap();
        assert!(stats.contains("IsbOsDrop(1)"), "{stats}");
    }

    #[test]
    fn the_size_cap_is_never_passed_and_what_it_refused_is_counted() {
        let opts = PcapOptions {
            snaplen: 1500,
            max_bytes: 4096,
        };
        let mut w = CappedWriter::new(Vec::new(), &eth(), opts).unwrap();
        for _ in 0..100 {
            w.packet(0, Duration::ZERO, 1000, &[0; 1000], Direction::Inbound)
                .unwrap();
        }
        let counts = w.counts.clone();
        let (bytes, _, _) = w
            .finish(Duration::ZERO, &[(100, 0, counts.packets_written)])
            .unwrap();
        assert!(bytes.len() as u64 <= 4096, "{} bytes", bytes.len());
        assert_eq!(counts.packets_written, 3);
        assert_eq!(counts.packets_over_cap, 97);
        assert_eq!(walk_blocks(&bytes).stopped, None);
    }

    #[test]
    fn a_torn_last_block_is_found_at_its_start() {
        let mut w = CappedWriter::new(Vec::new(), &eth(), PcapOptions::default()).unwrap();
        w.packet(0, Duration::ZERO, 60, &[1; 60], Direction::Inbound)
            .unwrap();
        let whole = w.counts.bytes_written;
        w.packet(0, Duration::ZERO, 60, &[2; 60], Direction::Inbound)
            .unwrap();
        let (bytes, _, _) = w.finish(Duration::ZERO, &[]).unwrap();
        let torn = &bytes[..bytes.len() - 7];
        let walk = walk_blocks(torn);
        assert_eq!(walk.whole_bytes, whole);
        assert!(walk.stopped.as_ref().unwrap().contains("are left"));
        assert_eq!(walk_blocks(&torn[..whole as usize]).stopped, None);
        // Not pcapng at all, and a block whose lengths disagree.
        assert!(walk_blocks(b"{\"a\":1}\n0123")
            .stopped
            .unwrap()
            .contains("not a pcapng"));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 1] ^= 0x10;
        assert!(walk_blocks(&bad).stopped.unwrap().contains("differ"));
        // The same walks on a file (the buffered reader recover and validate use).
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), torn).unwrap();
        assert_eq!(walk_file(tmp.as_file()).unwrap(), walk);
        std::fs::write(tmp.path(), &bytes).unwrap();
        assert_eq!(walk_file(tmp.as_file()).unwrap(), walk_blocks(&bytes));
    }
}
