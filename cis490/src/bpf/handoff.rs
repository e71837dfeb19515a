//! Loading the kernel programs in a short-lived helper process.
//!
//! aya's `EbpfLoader::new()` parses the kernel's whole BTF (/sys/kernel/btf/vmlinux, about
//! 5 MiB of file and 15 MiB of heap once parsed; aya-rs/aya#1172) even though cis490's
//! programs need none of it to load. In the capture process that transient would set its
//! peak RSS to about three times its steady state for the whole run. So `cis490 trace`
//! re-executes itself as `cis490 __bpf-loader`, which loads, seeds and attaches exactly as
//! [`loader::load`] does and then hands every resulting kernel object over a Unix socket
//! (SCM_RIGHTS): the snapshot ring buffer the collectors read, and the perf-event, bpf_link and
//! statistics fds that keep the programs attached. Kernel objects live as long as any fd
//! refers to them, so the helper then exits at once, without running destructors (aya
//! would detach on drop). Its own peak RSS and run time come back with the fds and are
//! reported in the `backend_selected` event, so the cost is moved, not hidden.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use super::error::BpfError;
use super::loader::{self, FlowLoad, FlowMaps, KvmLoad, KvmMaps, NetIfSpec, SnapSpec};

/// An error of this stage (see [`BpfError`]).
fn handoff_err(msg: impl Into<String>) -> BpfError {
    BpfError::Handoff(msg.into())
}

/// The hidden subcommand the helper runs as.
pub const SUBCOMMAND: &str = "__bpf-loader";

/// How long the capture waits for the helper (verifying a dozen programs takes well under
/// a second; this only bounds a helper that hangs).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// SCM_MAX_FD: the most fds one message can carry.
const MAX_FDS: usize = 253;

/// What the helper process reports besides the fds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoaderReport {
    pub pid: u32,
    /// VmHWM of the helper when it handed over (where aya's BTF parse shows).
    pub peak_rss_kib: Option<u64>,
    /// VmHWM less the mapped files' pages then (RssFile: mostly the binary's text, which
    /// follows the binary's size and build profile): the helper's own data at its peak.
    pub peak_data_kib: Option<u64>,
    pub elapsed_ms: u64,
}

/// The reply message; the fds follow in this order: `maps`, then `holds` of them.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Ok {
        /// Names of the fds before the holds, in fd order: maps "SNAPS", "CONTROL",
        /// "GRID", then "TIMER", the snapshot timer's perf event.
        maps: Vec<String>,
        /// Loaded programs: (name, kernel program id) for `--bpf-stats`.
        programs: Vec<(String, u32)>,
        /// Number of fds after the maps that only keep attachments alive.
        holds: usize,
        peak_rss_kib: Option<u64>,
        peak_data_kib: Option<u64>,
        /// [`loader::WakeupSource::as_str`].
        wakeups: String,
        /// Why the kvm programs asked for are not attached (their maps are then not
        /// among the fds).
        #[serde(default)]
        kvm_error: Option<String>,
        /// The same for the flow programs.
        #[serde(default)]
        flow_error: Option<String>,
    },
    Err(BpfError),
}

/// Everything the capture needs from a load, wherever it happened.
pub struct Attached {
    pub snaps: RingBuf<MapData>,
    pub control: Array<MapData, u32>,
    pub timer: super::timer::SnapTimer,
    /// Where bpf-sched's `wakeups` column comes from.
    pub wakeups: &'static str,
    /// (name, kernel program id) of every loaded program.
    pub programs: Vec<(String, u32)>,
    /// Keeps the programs attached (and run-time statistics on) until dropped.
    pub keepalive: KeepAlive,
    /// Set when the load ran in the helper process.
    pub loader: Option<LoaderReport>,
    pub kvm: KvmLoad,
    pub flow: FlowLoad,
}

/// What holds the attachments: the fds handed over by the helper, or the in-process aya
/// object (`cis490 doctor`, or when the helper cannot be started).
pub enum KeepAlive {
    Fds(#[allow(dead_code)] Vec<OwnedFd>),
    InProcess(
        #[allow(dead_code)] Box<aya::Ebpf>,
        #[allow(dead_code)] Option<OwnedFd>,
    ),
}

fn program_ids(ebpf: &aya::Ebpf, names: &[&'static str]) -> Vec<(String, u32)> {
    names
        .iter()
        .filter_map(|n| {
            let id = ebpf.program(n)?.info().ok()?.id();
            Some(((*n).to_owned(), id))
        })
        .collect()
}

/// Load in this process (the aya object stays here).
pub fn load_in_process(
    pid: u32,
    net_ifs: &[NetIfSpec],
    bpf_stats: bool,
    snap: SnapSpec,
) -> Result<Attached, BpfError> {
    let mut l = loader::load(pid, net_ifs, bpf_stats, snap)?;
    let programs = program_ids(&l.ebpf, &l.programs);
    let kvm = std::mem::replace(&mut l.kvm, KvmLoad::NotAsked);
    let flow = std::mem::replace(&mut l.flow, FlowLoad::NotAsked);
    Ok(Attached {
        kvm,
        flow,
        snaps: l.snaps,
        control: l.control,
        timer: l.timer,
        wakeups: l.wakeups.as_str(),
        programs,
        keepalive: KeepAlive::InProcess(Box::new(l.ebpf), l.stats_fd),
        loader: None,
    })
}

/// Load through the helper process; falls back to loading in process only when the
/// helper cannot be started at all (e.g. the executable was replaced meanwhile).
pub fn load(
    pid: u32,
    net_ifs: &[NetIfSpec],
    bpf_stats: bool,
    snap: SnapSpec,
) -> Result<Attached, BpfError> {
    let exe = match std::env::current_exe() {
        Ok(p) if p.exists() => p,
        other => {
            tracing::warn!("no executable to start the BPF loader process from ({other:?}); loading in process");
            return load_in_process(pid, net_ifs, bpf_stats, snap);
        }
    };
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| handoff_err(format!("socketpair for the BPF loader: {e}")))?;
    let mut cmd = Command::new(&exe);
    cmd.arg(SUBCOMMAND).arg("--pid").arg(pid.to_string());
    for s in net_ifs {
        cmd.arg("--net-if")
            .arg(format!("{}:{}", s.name, s.rx_header_len));
    }
    if bpf_stats {
        cmd.arg("--bpf-stats");
    }
    cmd.arg("--interval-ns").arg(snap.interval_ns.to_string());
    if snap.count_wakeups {
        cmd.arg("--bpf-wakeups");
    }
    if let Some(c) = snap.timer_cpu {
        cmd.arg("--bpf-timer-cpu").arg(c.to_string());
    }
    if snap.kvm {
        cmd.arg("--kvm");
        cmd.arg("--kvm-key-table").arg(snap.kvm_keys.to_string());
    }
    if snap.flow {
        cmd.arg("--flow");
    }
    let started = Instant::now();
    let mut child = match cmd
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot start the BPF loader process ({e}); loading in process");
            return load_in_process(pid, net_ifs, bpf_stats, snap);
        }
    };
    let got = receive(&ours);
    // The helper exits right after sending; reap it either way (kill one that hangs).
    if got.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    let (reply, fds) = got.map_err(|e| {
        handoff_err(match &status {
            Ok(s) if !s.success() => format!("the BPF loader process failed ({s}): {e}"),
            _ => format!("the BPF loader process: {e}"),
        })
    })?;
    let (maps, programs, holds, peak_rss_kib, peak_data_kib, wakeups, (kvm_error, flow_error)) =
        match reply {
            Reply::Ok {
                maps,
                programs,
                holds,
                peak_rss_kib,
                peak_data_kib,
                wakeups,
                kvm_error,
                flow_error,
            } => (
                maps,
                programs,
                holds,
                peak_rss_kib,
                peak_data_kib,
                wakeups,
                (kvm_error, flow_error),
            ),
            // The helper's own error, with its stage.
            Reply::Err(why) => return Err(why),
        };
    if fds.len() != maps.len() + holds {
        return Err(handoff_err(format!(
            "the BPF loader process sent {} fds, expected {}",
            fds.len(),
            maps.len() + holds
        )));
    }
    let mut fds = fds.into_iter();
    let mut snaps = None;
    let mut control = None;
    let mut grid = None;
    let mut timer_fd = None;
    let mut kvm_counts = None;
    let mut kvm_other = None;
    let mut kvm_lost = None;
    let mut flow_deltas = None;
    let mut flow_ifs = None;
    let mut dns_ring = None;
    for name in &maps {
        let fd = fds.next().expect("counted above");
        if name == "TIMER" {
            timer_fd = Some(fd);
            continue;
        }
        let data = MapData::from_fd(fd)
            .map_err(|e| handoff_err(format!("map {name} from the loader: {e}")))?;
        match name.as_str() {
            "SNAPS" => {
                snaps = Some(
                    RingBuf::try_from(Map::RingBuf(data))
                        .map_err(|e| handoff_err(format!("map SNAPS from the loader: {e}")))?,
                )
            }
            "CONTROL" => {
                control = Some(
                    Array::try_from(Map::Array(data))
                        .map_err(|e| handoff_err(format!("map CONTROL from the loader: {e}")))?,
                )
            }
            "GRID" => {
                grid = Some(
                    Array::try_from(Map::Array(data))
                        .map_err(|e| handoff_err(format!("map GRID from the loader: {e}")))?,
                )
            }
            "KVM_COUNTS" => {
                kvm_counts = Some(
                    HashMap::try_from(Map::HashMap(data))
                        .map_err(|e| handoff_err(format!("map KVM_COUNTS from the loader: {e}")))?,
                )
            }
            "KVM_OTHER" => {
                kvm_other = Some(
                    HashMap::try_from(Map::HashMap(data))
                        .map_err(|e| handoff_err(format!("map KVM_OTHER from the loader: {e}")))?,
                )
            }
            "FLOW_DELTAS" => {
                flow_deltas = Some(
                    PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(|e| {
                        handoff_err(format!("map FLOW_DELTAS from the loader: {e}"))
                    })?,
                )
            }
            "FLOW_IF_TICKS" => {
                flow_ifs =
                    Some(PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|e| {
                        handoff_err(format!("map FLOW_IF_TICKS from the loader: {e}"))
                    })?)
            }
            "DNS_RING" => {
                dns_ring = Some(
                    RingBuf::try_from(Map::RingBuf(data))
                        .map_err(|e| handoff_err(format!("map DNS_RING from the loader: {e}")))?,
                )
            }
            "KVM_LOST" => {
                kvm_lost = Some(
                    PerCpuArray::try_from(Map::PerCpuArray(data))
                        .map_err(|e| handoff_err(format!("map KVM_LOST from the loader: {e}")))?,
                )
            }
            other => {
                return Err(handoff_err(format!(
                    "the BPF loader process sent unknown map {other}"
                )))
            }
        }
    }
    let kvm = match (kvm_counts, kvm_other, kvm_lost, kvm_error) {
        (Some(counts), Some(other), Some(lost), None) => KvmLoad::Attached(Box::new(KvmMaps {
            counts,
            other,
            lost,
        })),
        (None, None, None, Some(why)) => KvmLoad::Failed(why),
        (None, None, None, None) if !snap.kvm => KvmLoad::NotAsked,
        _ => {
            return Err(handoff_err(
                "the BPF loader process sent an incomplete kvm answer".to_owned(),
            ))
        }
    };
    let flow = match (flow_deltas, flow_ifs, dns_ring, flow_error) {
        (Some(deltas), Some(ifs), Some(dns), None) => {
            FlowLoad::Attached(Box::new(FlowMaps { deltas, ifs, dns }))
        }
        (None, None, None, Some(why)) => FlowLoad::Failed(why),
        (None, None, None, None) => FlowLoad::NotAsked,
        _ => {
            return Err(handoff_err(
                "the BPF loader process sent an incomplete flow answer".to_owned(),
            ))
        }
    };
    Ok(Attached {
        kvm,
        flow,
        snaps: snaps.ok_or(handoff_err("the BPF loader process sent no SNAPS map"))?,
        control: control.ok_or(handoff_err("the BPF loader process sent no CONTROL map"))?,
        timer: super::timer::SnapTimer::new(
            timer_fd.ok_or(handoff_err("the BPF loader process sent no snapshot timer"))?,
            grid.ok_or(handoff_err("the BPF loader process sent no GRID map"))?,
            snap.interval_ns,
        ),
        wakeups: [
            loader::WakeupSource::Schedstats,
            loader::WakeupSource::Programs,
            loader::WakeupSource::None,
        ]
        .into_iter()
        .map(loader::WakeupSource::as_str)
        .find(|s| *s == wakeups)
        .ok_or_else(|| handoff_err(format!("the BPF loader process sent wakeups = {wakeups:?}")))?,
        programs,
        keepalive: KeepAlive::Fds(fds.collect()),
        loader: Some(LoaderReport {
            pid: child.id(),
            peak_rss_kib,
            peak_data_kib,
            elapsed_ms: started.elapsed().as_millis() as u64,
        }),
    })
}

fn receive(sock: &OwnedFd) -> Result<(Reply, Vec<OwnedFd>), BpfError> {
    rustix::net::sockopt::set_socket_timeout(
        sock,
        rustix::net::sockopt::Timeout::Recv,
        Some(REPLY_TIMEOUT),
    )
    .map_err(|e| handoff_err(format!("setting a receive timeout: {e}")))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| {
        handoff_err(match e {
            rustix::io::Errno::AGAIN => format!("no reply within {} s", REPLY_TIMEOUT.as_secs()),
            e => format!("receiving its reply: {e}"),
        })
    })?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if msg.bytes == 0 {
        return Err(handoff_err("it exited without a reply"));
    }
    let reply = serde_json::from_slice(&buf[..msg.bytes.min(buf.len())])
        .map_err(|e| handoff_err(format!("unreadable reply: {e}")))?;
    Ok((reply, fds))
}

/// Parse a `--net-if NAME:RX_HEADER_LEN` argument of the helper.
pub fn parse_net_if(arg: &str) -> Result<NetIfSpec, BpfError> {
    let (name, hdr) = arg
        .rsplit_once(':')
        .ok_or_else(|| handoff_err(format!("{arg:?}: expected NAME:RX_HEADER_LEN")))?;
    Ok(NetIfSpec {
        name: name.to_owned(),
        rx_header_len: hdr
            .parse()
            .map_err(|_| handoff_err(format!("{arg:?}: bad header length")))?,
    })
}

/// The helper's side: load, hand everything over on fd 0, exit without destructors.
pub fn run_helper(pid: u32, net_ifs: &[NetIfSpec], bpf_stats: bool, snap: SnapSpec) -> ! {
    // SAFETY: fd 0 is the socket the capture passed as stdin; it stays open until _exit.
    let sock = unsafe { BorrowedFd::borrow_raw(0) };
    loader::HIDE_KERNEL_BTF.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcome = loader::load(pid, net_ifs, bpf_stats, snap);
    let sent = match &outcome {
        Ok(l) => {
            let mut maps = vec![
                ("SNAPS", l.snaps.as_fd()),
                ("CONTROL", l.control.map().fd().as_fd()),
                ("GRID", l.timer.grid().map().fd().as_fd()),
                ("TIMER", l.timer.fd().as_fd()),
            ];
            let kvm_error = match &l.kvm {
                KvmLoad::Attached(k) => {
                    maps.push(("KVM_COUNTS", k.counts.map().fd().as_fd()));
                    maps.push(("KVM_OTHER", k.other.map().fd().as_fd()));
                    maps.push(("KVM_LOST", k.lost.map().fd().as_fd()));
                    None
                }
                KvmLoad::Failed(why) => Some(why.clone()),
                KvmLoad::NotAsked => None,
            };
            let flow_error = match &l.flow {
                FlowLoad::Attached(f) => {
                    maps.push(("FLOW_DELTAS", f.deltas.map().fd().as_fd()));
                    maps.push(("FLOW_IF_TICKS", f.ifs.map().fd().as_fd()));
                    maps.push(("DNS_RING", f.dns.as_fd()));
                    None
                }
                FlowLoad::Failed(why) => Some(why.clone()),
                FlowLoad::NotAsked => None,
            };
            let holds = attachment_fds();
            let (hwm, rss_file) = peak_and_file_kib();
            let reply = Reply::Ok {
                maps: maps.iter().map(|(n, _)| (*n).to_owned()).collect(),
                programs: program_ids(&l.ebpf, &l.programs),
                holds: holds.len(),
                peak_rss_kib: hwm,
                peak_data_kib: hwm.zip(rss_file).map(|(h, f)| h.saturating_sub(f)),
                wakeups: l.wakeups.as_str().to_owned(),
                kvm_error,
                flow_error,
            };
            let fds: Vec<BorrowedFd<'_>> = maps
                .iter()
                .map(|(_, fd)| *fd)
                // SAFETY: the listed fds stay open until _exit below.
                .chain(
                    holds
                        .iter()
                        .map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) }),
                )
                .collect();
            send(sock, &reply, &fds)
        }
        Err(why) => send(sock, &Reply::Err(why.clone()), &[]),
    };
    let code = match sent {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cis490 {SUBCOMMAND}: sending to the capture: {e}");
            1
        }
    };
    // SAFETY: ends the process without unwinding or destructors: aya's would detach the
    // programs the capture now holds.
    unsafe { libc::_exit(code) }
}

fn send(sock: BorrowedFd<'_>, reply: &Reply, fds: &[BorrowedFd<'_>]) -> Result<(), BpfError> {
    if fds.len() > MAX_FDS {
        return Err(handoff_err(format!(
            "{} fds exceed one message ({MAX_FDS})",
            fds.len()
        )));
    }
    let body = serde_json::to_vec(reply).map_err(|e| handoff_err(e.to_string()))?;
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(handoff_err("control buffer too small"));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&body)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| handoff_err(e.to_string()))?;
    Ok(())
}

/// The fds of this process that keep programs attached or statistics on: perf events
/// (tracepoint attachments), bpf links (raw tracepoints, fentry/fexit) and the
/// BPF_ENABLE_STATS fd. Found by their anon-inode names, so every attach style the loader
/// uses is covered without aya exposing its link fds.
fn attachment_fds() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(e.path()) {
            if is_attachment(&target.to_string_lossy()) {
                out.push(fd);
            }
        }
    }
    out.sort_unstable();
    out
}

fn is_attachment(link_target: &str) -> bool {
    matches!(
        link_target,
        "anon_inode:[perf_event]" | "anon_inode:bpf_link" | "anon_inode:bpf-stats"
    )
}

/// VmHWM and RssFile of this process (kB), from one read of /proc/self/status.
fn peak_and_file_kib() -> (Option<u64>, Option<u64>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
    };
    (field("VmHWM:"), field("RssFile:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_if_argument_round_trips() {
        let s = parse_net_if("tap0:14").unwrap();
        assert_eq!((s.name.as_str(), s.rx_header_len), ("tap0", 14));
        assert!(parse_net_if("tap0").is_err());
        assert!(parse_net_if("tap0:x").is_err());
    }

    #[test]
    fn only_attachment_inodes_are_handed_over() {
        for t in [
            "anon_inode:[perf_event]",
            "anon_inode:bpf_link",
            "anon_inode:bpf-stats",
        ] {
            assert!(is_attachment(t), "{t}");
        }
        for t in [
            "anon_inode:bpf-map",
            "anon_inode:bpf-prog",
            "socket:[1]",
            "/dev/null",
        ] {
            assert!(!is_attachment(t), "{t}");
        }
    }

    #[test]
    fn reply_round_trips_through_json() {
        let r = Reply::Ok {
            maps: vec!["SNAPS".into(), "CONTROL".into()],
            programs: vec![("p".into(), 7)],
            holds: 3,
            peak_rss_kib: Some(1),
            peak_data_kib: Some(1),
            wakeups: "not_counted".into(),
            kvm_error: None,
            flow_error: None,
        };
        let back: Reply = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(
            matches!(back, Reply::Ok { holds: 3, ref wakeups, .. } if wakeups == "not_counted")
        );
    }
}
