//! The test VM's network: a tap in a network namespace of its own, made by `xtask vm start`
//! and removed by `xtask vm stop`, with a DNS responder and a TCP (HTTP) server inside it.
//! Nothing leaves the machine: the namespace holds only the tap and its loopback.
//!
//! QEMU runs in that namespace (`nsenter --net`), as a lab runs a malware VM, so the tracer
//! finds the tap in its target's namespace (cis490::net::netns). The guest is 10.0.2.15,
//! the namespace's end of the tap 10.0.2.2 (gateway, resolver, server), the same addresses
//! as QEMU's user-mode network, which is the fallback when the namespace cannot be made
//! (not root, no `ip` or `nsenter`).
//!
//! The responder answers A queries for names under `cis490.test` with 10.0.2.2, NODATA for
//! other types of those names, and NXDOMAIN for every other name (what a resolver gives a
//! malware's generated domains). The server answers any request on port 8080 with a short
//! HTTP reply and closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

pub const GUEST_IP: &str = "10.0.2.15";
pub const GATEWAY_IP: &str = "10.0.2.2";
pub const HTTP_PORT: u16 = 8080;
/// Names under this suffix resolve (to the gateway); the rest are NXDOMAIN.
pub const ZONE: &str = "cis490.test";

/// The namespace and tap of one run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapNet {
    pub netns: String,
    pub tap: String,
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("net")
}

fn serve_pid_file(dir: &Path) -> PathBuf {
    dir.join("netserve.pid")
}

/// Names from the run directory (FNV-1a of its path): runs in other directories, such as
/// tests running at once, get namespaces and taps of their own.
pub fn names(dir: &Path) -> TapNet {
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    TapNet {
        netns: format!("cis490-vm-{h:08x}"),
        // IFNAMSIZ: at most 15 bytes.
        tap: format!("c490v{h:08x}"),
    }
}

/// The network of a running VM of `dir` (None: user-mode networking).
pub fn current(dir: &Path) -> Option<TapNet> {
    let text = std::fs::read_to_string(state_file(dir)).ok()?;
    let mut w = text.split_whitespace();
    match (w.next(), w.next(), w.next()) {
        (Some("tap"), Some(ns), Some(tap)) => Some(TapNet {
            netns: ns.into(),
            tap: tap.into(),
        }),
        _ => None,
    }
}

/// Why a tap network cannot be made here (None: it can).
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        return Some("not root (a network namespace and a tap need CAP_NET_ADMIN)".into());
    }
    for tool in ["ip", "nsenter"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("no `{tool}` on this machine"));
        }
    }
    None
}

extern "C" {
    fn geteuid() -> u32;
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Make the namespace, the tap in it and the servers; record them in the run directory.
pub fn setup(dir: &Path) -> anyhow::Result<TapNet> {
    let net = names(dir);
    teardown(dir);
    let _ = Command::new("ip")
        .args(["netns", "del", &net.netns])
        .stderr(Stdio::null())
        .status();
    ip(&["netns", "add", &net.netns])?;
    let made = (|| -> anyhow::Result<()> {
        let n = net.netns.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "tuntap", "add", "dev", &net.tap, "mode", "tap"])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{GATEWAY_IP}/24"),
            "dev",
            &net.tap,
        ])?;
        ip(&["-n", n, "link", "set", &net.tap, "up"])?;
        start_servers(dir, &net)
    })();
    if let Err(e) = made {
        let _ = Command::new("ip")
            .args(["netns", "del", &net.netns])
            .status();
        return Err(e);
    }
    std::fs::write(state_file(dir), format!("tap {} {}\n", net.netns, net.tap))?;
    Ok(net)
}

/// The namespace's servers: this xtask binary's hidden `vm net-serve`, in its own process
/// group (it outlives `xtask vm start`), ready once it printed READY. Started as
/// /proc/self/exe: `cargo xtask demo` rebuilds the xtask binary while it runs, and the
/// path of the running one may no longer exist.
fn start_servers(dir: &Path, net: &TapNet) -> anyhow::Result<()> {
    let log = std::fs::File::create(dir.join("netserve.log"))?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args([
        "vm",
        "net-serve",
        "--netns",
        &net.netns,
        "--addr",
        GATEWAY_IP,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting the VM network's servers")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    if line.trim() != "READY" {
        let _ = child.kill();
        let log = std::fs::read_to_string(dir.join("netserve.log")).unwrap_or_default();
        bail!("the VM network's servers did not start: {}", log.trim());
    }
    std::fs::write(serve_pid_file(dir), format!("{}\n", child.id()))?;
    // Not waited for: stopped by teardown (init reaps it once this process is gone).
    drop(child);
    Ok(())
}

/// Stop the servers and remove the namespace (with the tap in it). Quiet when there is
/// nothing to remove.
pub fn teardown(dir: &Path) {
    if let Ok(text) = std::fs::read_to_string(serve_pid_file(dir)) {
        if let Ok(pid) = text.trim().parse::<i32>() {
            let ours = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("net-serve"));
            if ours {
                // SAFETY: kill(2) of the server this run directory started.
                unsafe { kill(pid, 9) };
            }
        }
        let _ = std::fs::remove_file(serve_pid_file(dir));
    }
    if let Some(net) = current(dir) {
        let _ = Command::new("ip")
            .args(["netns", "del", &net.netns])
            .stderr(Stdio::null())
            .status();
    }
    let _ = std::fs::remove_file(state_file(dir));
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    /// nstype 0x40000000: CLONE_NEWNET.
    fn setns(fd: i32, nstype: i32) -> i32;
}

/// `xtask vm net-serve`: in namespace `netns`, the DNS responder (UDP 53) and the HTTP
/// server (TCP 8080) on `addr`, until killed.
pub fn serve(netns: &str, addr: &str) -> anyhow::Result<()> {
    // Still one thread here: setns moves the whole (single-threaded) process.
    let path = format!("/run/netns/{netns}");
    let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns(2) on an fd we own.
    if unsafe { setns(std::os::fd::AsRawFd::as_raw_fd(&ns), 0x4000_0000) } != 0 {
        bail!("entering {path}: {}", std::io::Error::last_os_error());
    }
    let dns = UdpSocket::bind((addr, 53)).with_context(|| format!("binding {addr}:53"))?;
    let http = TcpListener::bind((addr, HTTP_PORT))
        .with_context(|| format!("binding {addr}:{HTTP_PORT}"))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = dns.recv_from(&mut buf) else {
                continue;
            };
            if let Some((reply, what)) = dns_reply(&buf[..n]) {
                eprintln!("dns {from}: {what}");
                let _ = dns.send_to(&reply, from);
            }
        }
    });
    println!("READY");
    std::io::stdout().flush()?;
    for conn in http.incoming().flatten() {
        std::thread::spawn(move || http_reply(conn));
    }
    Ok(())
}

fn http_reply(mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while req.len() < 8192 && !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let first = String::from_utf8_lossy(&req);
    eprintln!(
        "http {:?}: {}",
        conn.peer_addr().ok(),
        first.lines().next().unwrap_or("")
    );
    let _ =
        conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
}

/// The reply to one DNS query, and a line for the log; None for what is not a query.
pub fn dns_reply(q: &[u8]) -> Option<(Vec<u8>, String)> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut at = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = usize::from(*q.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 || labels.len() > 127 {
            return None;
        }
        labels.push(String::from_utf8_lossy(q.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*q.get(at)?, *q.get(at + 1)?]);
    let question_end = at + 4;
    q.get(question_end - 1)?;
    let name = labels.join(".");
    let in_zone = name == ZONE || name.ends_with(&format!(".{ZONE}"));
    let answer = in_zone && qtype == 1;
    let rcode = if in_zone { 0 } else { 3 };
    let mut r = Vec::with_capacity(question_end + 16);
    r.extend_from_slice(&q[..2]);
    // QR, opcode 0, AA, RD copied; RA; rcode.
    r.push(0x84 | (q[2] & 0x01));
    r.push(0x80 | rcode);
    r.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    if answer {
        // A pointer to the question's name, A, IN, TTL 60, 4 bytes of address.
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        let ip: std::net::Ipv4Addr = GATEWAY_IP.parse().expect("a constant address");
        r.extend_from_slice(&ip.octets());
    }
    let what = format!(
        "{name} type {qtype}: {}",
        if answer {
            GATEWAY_IP
        } else if in_zone {
            "no data"
        } else {
            "NXDOMAIN"
        }
    );
    Some((r, what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::dns_query;

    #[test]
    fn names_in_the_zone_resolve_to_the_gateway_and_others_do_not_exist() {
        let (r, what) = dns_reply(&dns_query(7, "C2.cis490.test", 1)).unwrap();
        assert_eq!(&r[..2], &[0, 7]);
        assert_eq!(r[3] & 0x0f, 0, "{what}");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 0, 2, 2]);
        let (r, _) = dns_reply(&dns_query(8, "c2.cis490.test", 28)).unwrap();
        assert_eq!((r[3] & 0x0f, r[7]), (0, 0), "AAAA: no data");
        let (r, what) = dns_reply(&dns_query(9, "xkqjzv.example", 1)).unwrap();
        assert_eq!(r[3] & 0x0f, 3, "{what}");
        // Not a query: a response, a truncated question, no question.
        let mut resp = dns_query(1, "a.cis490.test", 1);
        resp[2] |= 0x80;
        assert!(dns_reply(&resp).is_none());
        let q = dns_query(1, "a.cis490.test", 1);
        assert!(dns_reply(&q[..q.len() - 1]).is_none());
        assert!(dns_reply(&q[..12]).is_none());
    }

    #[test]
    fn names_differ_per_run_directory_and_fit_an_interface_name() {
        let a = names(Path::new("/tmp/a/vm"));
        let b = names(Path::new("/tmp/b/vm"));
        assert_ne!(a, b);
        assert!(a.tap.len() <= 15);
    }
}
