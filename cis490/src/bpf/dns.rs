//! The `dns` source: DNS messages the flow programs copied (ring buffer `DNS_RING`),
//! parsed as hostile input ([`crate::flow::dns`]) into one row per message, stamped with
//! the packet's own time. A message that does not parse is counted by reason and skipped.

use std::collections::BTreeMap;

use aya::maps::{MapData, RingBuf};
use cis490_common::flow::DnsRecord;

use super::Part;
use crate::clock::{self, EpisodeClock, Stamp};
use crate::collector::TickOutput;
use crate::error::Error;
use crate::flow::dns;
use crate::flow::{self as f};

pub struct DnsCollector {
    names: Vec<String>,
    ring: RingBuf<MapData>,
    seq: u64,
    malformed: BTreeMap<&'static str, u64>,
    /// Messages longer than the kernel copies (their parse fails as truncated).
    cut: u64,
    bad_records: u64,
    /// t_mono_ns of the latest row: records of several CPUs may come a little out of
    /// order, and a stream's rows never go back in time.
    last_mono: u64,
    batch: Vec<DnsRecord>,
}

impl DnsCollector {
    pub fn new(names: Vec<String>, ring: RingBuf<MapData>) -> Self {
        Self {
            names,
            ring,
            seq: 0,
            malformed: BTreeMap::new(),
            cut: 0,
            bad_records: 0,
            last_mono: 0,
            batch: Vec::new(),
        }
    }
}

/// The record in a ring item, if the item is one.
fn record(bytes: &[u8]) -> Option<DnsRecord> {
    if bytes.len() < std::mem::size_of::<DnsRecord>() {
        return None;
    }
    // SAFETY: DnsRecord is plain data (repr(C), integers and byte arrays); the length was
    // checked and read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DnsRecord>()) })
}

impl Part for DnsCollector {
    fn stream(&self) -> crate::collector::Stream {
        crate::collector::Stream {
            source: f::DNS_SOURCE,
            available_in_deployment: true,
        }
    }
    fn summary(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("method".into(), "bpf_tc_ringbuf".into());
        m.insert(
            "malformed".into(),
            self.malformed
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
        m.insert("longer_than_copied".into(), self.cut.into());
        m.insert("bad_records".into(), self.bad_records.into());
        m.insert("copy_bytes".into(), cis490_common::flow::DNS_COPY.into());
        m
    }

    fn fill(
        &mut self,
        _drain: &super::snap::Drain,
        clock: &EpisodeClock,
        out: &mut TickOutput,
    ) -> Result<(), Error> {
        let wall_minus_mono = clock::wall_ns() as i64 - clock::mono_raw_ns() as i64;
        self.batch.clear();
        while let Some(item) = self.ring.next() {
            match record(&item) {
                Some(r) => self.batch.push(r),
                None => self.bad_records += 1,
            }
        }
        self.batch.sort_by_key(|r| r.ktime_ns);
        for r in &self.batch {
            let len = (r.len as usize).min(r.msg.len());
            if (r.wire_len as usize) > len {
                self.cut += 1;
            }
            let msg = match dns::parse(&r.msg[..len]) {
                Ok(m) => m,
                Err(e) => {
                    let n = self.malformed.entry(e.as_str()).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        out.problem(format!(
                            "a DNS message was malformed ({e}); skipped (meta.sources[dns].malformed counts them)"
                        ));
                    }
                    continue;
                }
            };
            let Some(name) = self.names.get(usize::from(r.ifslot)) else {
                self.bad_records += 1;
                continue;
            };
            let key = cis490_common::flow::FlowKey {
                src: r.src,
                dst: r.dst,
                family: r.family,
                ..Default::default()
            };
            let (src, dst) = f::addrs(&key);
            let t_mono_ns = clock.rel(r.ktime_ns).max(self.last_mono);
            self.last_mono = t_mono_ns;
            let stamp = Stamp {
                t_mono_ns,
                t_wall_ns: ((clock.mono_origin_ns + t_mono_ns) as i64 + wall_minus_mono) as u64,
            };
            let row = out.new_row(stamp, f::DNS_SOURCE, true);
            row.seq = Some(self.seq);
            self.seq += 1;
            row.push("ifname", name.as_str())
                .push("direction", if r.egress != 0 { "tx" } else { "rx" })
                .push("transport", if r.transport == 6 { "tcp" } else { "udp" })
                .push("src_addr", src)
                .push("dst_addr", dst)
                .push("src_port", u64::from(r.sport))
                .push("dst_port", u64::from(r.dport))
                .push("id", u64::from(msg.id))
                .push("is_response", msg.is_response)
                .push("opcode", u64::from(msg.opcode))
                .push("rcode", u64::from(msg.rcode))
                .push("qname", msg.qname)
                .push("qtype", msg.qtype.map(u64::from))
                .push("qtype_name", msg.qtype.and_then(dns::qtype_name))
                .push("answers", msg.answers.join(","))
                .push("answers_not_kept", u64::from(msg.answers_not_kept));
        }
        Ok(())
    }
}
