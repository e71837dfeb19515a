//! The capture thread of `--pcap`: one AF_PACKET socket per watched interface, made in the
//! target's network namespace (crate::net::netns), bound to the interface, reading both
//! directions with the kernel's receive timestamps into [`CappedWriter`].
//!
//! A packet socket only receives copies: the VM's packets are never delayed or dropped by
//! it. When the writer falls behind, the kernel drops copies from the socket's buffer (8 MiB
//! asked) and counts them; the counts go into the file's statistics blocks and into
//! meta.result.pcap.

use std::io::BufWriter;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pcap_file::DataLink;
use serde_json::{json, Value};

use super::{CappedWriter, Direction, Interface, PcapCounts, PcapOptions, FILE};
use crate::episode::EpisodeDir;
use crate::jsonl::FileStats;
use crate::net::netns;

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;
/// What one socket asks for its receive buffer.
const RCVBUF_BYTES: libc::c_int = 8 << 20;
/// How often the thread looks at its stop flag and flushes what it wrote.
const POLL_MS: libc::c_int = 100;

/// A running capture; [`PcapCapture::finish`] ends it.
pub struct PcapCapture {
    stop: Arc<AtomicBool>,
    /// Taken by `finish`; a capture dropped without it (a trace that failed part-way)
    /// still stops its thread.
    handle: Option<JoinHandle<Result<(PcapCounts, FileStats), String>>>,
    names: Vec<String>,
    opts: PcapOptions,
}

struct PacketSocket {
    fd: OwnedFd,
    name: String,
}

impl PcapCapture {
    /// Open a packet socket on each interface in `pid`'s network namespace, then create
    /// capture.pcapng in the episode and start copying. Err (and no file) when a socket
    /// cannot be had: the capture goes on without the pcap, and meta says why.
    pub fn start(
        pid: u32,
        names: Vec<String>,
        dir: &EpisodeDir,
        opts: PcapOptions,
    ) -> Result<Self, String> {
        if names.is_empty() {
            return Err(
                "the target has no network interface to capture (no tap found; --net-if names one)"
                    .into(),
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let dir = dir.clone();
        let thread_names = names.clone();
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("cis490-pcap".into())
            .spawn(move || {
                let opened = netns::enter(pid).and_then(|()| open_all(&thread_names, &dir, opts));
                let (sockets, writer) = match opened {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                run(&sockets, writer, &thread_stop)
            })
            .map_err(|e| format!("starting the pcap thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                handle: Some(handle),
                names,
                opts,
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err("the pcap thread ended before it started".into()),
        }
    }

    /// Stop copying, write the statistics, close the file: meta.result.pcap, and the
    /// file's manifest figures as written. The file exists whatever this says: after an
    /// error (no figures) it is as far as it got, to be listed as it is on disk.
    pub fn finish(mut self) -> (Value, Option<FileStats>) {
        self.stop.store(true, Ordering::Relaxed);
        let base = json!({
            "file": FILE,
            "interfaces": self.names,
            "snaplen": self.opts.snaplen,
            "max_bytes": self.opts.max_bytes,
            "timestamps": "kernel receive time, CLOCK_REALTIME, nanoseconds (meta.clock turns them into t_mono_ns)",
        });
        let mut v = base;
        let joined = match self.handle.take() {
            Some(h) => h.join(),
            None => Ok(Err("the capture was already finished".into())),
        };
        let mut stats = None;
        match joined {
            Ok(Ok((counts, written))) => {
                v["status"] = "written".into();
                if let (Value::Object(m), Ok(Value::Object(c))) =
                    (&mut v, serde_json::to_value(&counts))
                {
                    m.extend(c);
                }
                stats = Some(written);
            }
            Ok(Err(e)) => {
                v["status"] = "error".into();
                v["reason"] = e.into();
            }
            Err(_) => {
                v["status"] = "error".into();
                v["reason"] = "the pcap thread panicked".into();
            }
        }
        (v, stats)
    }
}

impl Drop for PcapCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// meta.result.pcap when there is no capture (and no file).
pub fn absent(reason: &str) -> Value {
    json!({"status": "absent", "reason": reason})
}

type FileWriter = CappedWriter<BufWriter<std::fs::File>>;

fn open_all(
    names: &[String],
    dir: &EpisodeDir,
    opts: PcapOptions,
) -> Result<(Vec<PacketSocket>, FileWriter), String> {
    let mut sockets = Vec::new();
    let mut ifaces = Vec::new();
    for name in names {
        sockets.push(open_socket(name)?);
        ifaces.push(Interface {
            name: name.clone(),
            linktype: match netns::link_type(name) {
                Some(netns::ARPHRD_ETHER) => DataLink::ETHERNET,
                _ => DataLink::RAW,
            },
        });
    }
    let file = dir.create_file(FILE).map_err(|e| e.to_string())?;
    let writer = CappedWriter::new(BufWriter::with_capacity(1 << 16, file), &ifaces, opts)?;
    Ok((sockets, writer))
}

fn os_err(what: &str, name: &str) -> String {
    format!("{what} for {name}: {}", std::io::Error::last_os_error())
}

fn setsockopt_int(fd: &OwnedFd, level: i32, opt: i32, v: libc::c_int) -> bool {
    // SAFETY: an int option of a socket we own.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// A raw packet socket on one interface of this thread's namespace, both directions,
/// with kernel timestamps.
fn open_socket(name: &str) -> Result<PacketSocket, String> {
    let cname = std::ffi::CString::new(name).map_err(|_| format!("{name:?}: not a name"))?;
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(format!(
            "no interface {name} in the target's network namespace"
        ));
    }
    // Protocol 0: nothing arrives before bind picks the interface (no other interface's
    // packet slips in first).
    // SAFETY: socket(2); the fd is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(os_err("opening a packet socket (needs CAP_NET_RAW)", name));
    }
    // SAFETY: a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if !setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF_BYTES) {
        let _ = setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF_BYTES);
    }
    if !setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1) {
        return Err(os_err("asking for kernel timestamps", name));
    }
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: bind with a sockaddr_ll of the right size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err("binding the packet socket", name));
    }
    Ok(PacketSocket {
        fd,
        name: name.to_owned(),
    })
}

/// One packet: (original length, bytes copied, direction, kernel time), or None when the
/// socket has nothing more now.
fn recv_one(
    s: &PacketSocket,
    buf: &mut [u8],
) -> Result<Option<(u32, usize, Direction, Duration)>, String> {
    // SAFETY: plain data for recvmsg to fill.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg into the buffers above; MSG_TRUNC makes it return the packet's
    // real length while copying at most buf.len().
    let n = unsafe {
        libc::recvmsg(
            s.fd.as_raw_fd(),
            &mut msg,
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(format!("reading packets of {}: {e}", s.name)),
        };
    }
    let original = n as usize;
    let copied = original.min(buf.len());
    let mut wall = None;
    // SAFETY: walking the control messages recvmsg wrote, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                wall = Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let wall = wall.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    });
    let dir = if from.sll_pkttype == PACKET_OUTGOING {
        Direction::Outbound
    } else {
        Direction::Inbound
    };
    Ok(Some((
        original.min(u32::MAX as usize) as u32,
        copied,
        dir,
        wall,
    )))
}

/// PACKET_STATISTICS since the last call: (packets, drops); packets include the drops.
fn kernel_stats(s: &PacketSocket) -> (u64, u64) {
    // SAFETY: tpacket_stats is plain data filled by getsockopt.
    let mut st: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            s.fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        (u64::from(st.tp_packets), u64::from(st.tp_drops))
    } else {
        (0, 0)
    }
}

fn run(
    sockets: &[PacketSocket],
    mut writer: FileWriter,
    stop: &AtomicBool,
) -> Result<(PcapCounts, FileStats), String> {
    let mut buf = vec![0u8; writer.snaplen() as usize];
    let mut per_iface = vec![(0u64, 0u64, 0u64); sockets.len()];
    let mut pollfds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut last_flush = Instant::now();
    let mut result = Ok(());
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        // SAFETY: poll on our own fds.
        unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, POLL_MS) };
        // A last pass after the stop takes what is already queued.
        for (i, s) in sockets.iter().enumerate() {
            for _ in 0..4096 {
                match recv_one(s, &mut buf) {
                    Ok(Some((original, copied, dir, wall))) => {
                        let before = writer.counts.packets_written;
                        if let Err(e) = writer.packet(i as u32, wall, original, &buf[..copied], dir)
                        {
                            result = Err(e);
                            break;
                        }
                        per_iface[i].2 += writer.counts.packets_written - before;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        if result.is_err() {
            break;
        }
        if last_flush.elapsed() >= Duration::from_millis(POLL_MS as u64) {
            // What is written is on disk within a poll period: a killed capture loses at
            // most that (recover cuts the torn last block).
            if let Err(e) = writer.flush() {
                result = Err(format!("writing {FILE}: {e}"));
                break;
            }
            last_flush = Instant::now();
        }
        if stopping {
            break;
        }
    }
    for (i, s) in sockets.iter().enumerate() {
        let (packets, drops) = kernel_stats(s);
        per_iface[i].0 += packets;
        per_iface[i].1 += drops;
    }
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (out, counts, stats) = writer.finish(wall, &per_iface)?;
    let file = out
        .into_inner()
        .map_err(|e| format!("writing {FILE}: {}", e.error()))?;
    file.sync_all()
        .map_err(|e| format!("syncing {FILE}: {e}"))?;
    result?;
    Ok((counts, stats))
}
