//! The target's network namespace.
//!
//! A lab keeps a malware VM's network away from the host by starting QEMU in a network
//! namespace of its own: its tap then exists only there. Interface names and indexes are
//! per namespace, so everything that looks an interface up (its index for the tc
//! programs, its link type, the packet sockets of `--pcap`) does so in the namespace of
//! the target process (`/proc/<pid>/ns/net`), on a thread that entered it: setns(2) with
//! CLONE_NEWNET changes only the calling thread, and a socket or BPF link keeps the
//! namespace it was made in after that thread has gone.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Whether `pid` is in this thread's network namespace.
pub fn is_ours(pid: u32) -> Result<bool, String> {
    let id = |p: &str| {
        std::fs::metadata(p)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| format!("reading {p}: {e}"))
    };
    Ok(id(&format!("/proc/{pid}/ns/net"))? == id("/proc/thread-self/ns/net")?)
}

/// Enter `pid`'s network namespace on the calling thread (for a thread that is about to
/// do only that namespace's work, e.g. the `--pcap` writer).
pub fn enter(pid: u32) -> Result<(), String> {
    if is_ours(pid)? {
        return Ok(());
    }
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
    // SAFETY: setns(2) on an fd we own; it changes this thread's namespace only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "entering the network namespace of process {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Run `f` in `pid`'s network namespace: here when it is ours, else on a thread that
/// enters it and ends with `f` (the caller's thread never changes namespace).
pub fn run_in<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    if is_ours(pid)? {
        return Ok(f());
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(pid)?;
            Ok(f())
        })
        .join()
        .map_err(|_| format!("a thread in the network namespace of process {pid} panicked"))?
    })
}

/// The ARPHRD_* link type of interface `name` in the calling thread's namespace
/// (SIOCGIFHWADDR), or None when there is no such interface.
pub fn link_type(name: &str) -> Option<u16> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: a datagram socket only to ask an ioctl; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_ifru.ifru_hwaddr of the ifreq we pass.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR as _, &mut ifr) };
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds ifru_hwaddr.
    Some(unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_family })
}

/// ARPHRD_ETHER: taps, veth and bridges.
pub const ARPHRD_ETHER: u16 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_namespace_runs_inline() {
        let me = std::process::id();
        assert!(is_ours(me).unwrap());
        let tid = run_in(me, || std::thread::current().id()).unwrap();
        assert_eq!(tid, std::thread::current().id());
        assert_eq!(link_type("lo"), Some(772), "ARPHRD_LOOPBACK");
        assert_eq!(link_type("no-such-if0"), None);
        assert_eq!(link_type("a-name-longer-than-15"), None);
    }

    #[test]
    fn a_process_that_is_gone_is_an_error_not_a_guess() {
        let err = is_ours(u32::MAX - 1).unwrap_err();
        assert!(err.contains("/ns/net"), "{err}");
    }
}
