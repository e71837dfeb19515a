//! The traced process: existence checks up front, and exit detection through a pidfd
//! (immune to pid reuse, one poll(2) per tick).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::error::Error;

pub struct Target {
    pid: u32,
    pidfd: OwnedFd,
}

impl Target {
    /// Open the target; a pid that does not exist or whose /proc files cannot be read is
    /// a usage error (exit code 2), reported before anything is created.
    pub fn open(pid: u32) -> Result<Self, Error> {
        if pid == 0 || pid > i32::MAX as u32 {
            return Err(Error::Usage(format!("--qemu-pid {pid} is not a valid pid")));
        }
        let stat = Path::new("/proc").join(pid.to_string()).join("stat");
        std::fs::read(&stat).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Usage(format!("no process with pid {pid}")),
            _ => Error::Usage(format!("process {pid} is not readable: {e}")),
        })?;
        // SAFETY: pidfd_open takes (pid, flags) and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::Usage(format!("cannot watch pid {pid}: {e}")));
        }
        // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { pid, pidfd })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// False once the process has exited (a zombie counts as exited).
    pub fn alive(&self) -> bool {
        !self.exits_within(std::time::Duration::ZERO)
    }

    /// True if the process has exited or exits within `limit` (poll on the pidfd).
    pub fn exits_within(&self, limit: std::time::Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = limit.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    /// The target's command line (NUL-separated in /proc), for meta.vm.qemu_cmdline.
    pub fn cmdline(&self) -> Vec<String> {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|b| parse_cmdline(&b))
            .unwrap_or_default()
    }
}

pub fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonexistent_pid_is_a_usage_error() {
        let err = Target::open(i32::MAX as u32 - 7)
            .err()
            .expect("no such pid");
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(Target::open(0).is_err());
    }

    #[test]
    fn own_process_is_alive_and_exited_child_is_not() {
        let me = Target::open(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(!me.cmdline().is_empty());
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let t = Target::open(child.id()).unwrap();
        assert!(t.alive());
        child.wait().unwrap();
        assert!(!t.alive());
    }

    #[test]
    fn cmdline_splits_on_nul() {
        assert_eq!(
            parse_cmdline(b"qemu\0-name\0vm 1\0"),
            vec!["qemu", "-name", "vm 1"]
        );
    }
}
