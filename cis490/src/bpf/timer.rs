//! The snapshot timer: the perf cpu-clock event whose hrtimer runs the snapshot program,
//! and the grid origin user space tells the program (map `GRID`).
//!
//! perf throttles an event that overflows more than perf_event_max_sample_rate / HZ
//! times (400 here) between two scheduler ticks of its CPU, and only a tick lifts the
//! throttle. A CPU that stays idle stops its tick (NO_HZ), so after ~0.4 s of idleness
//! at 1 kHz the timer stops until something runs there. The capture notices the silence
//! at its next drain and restarts the event (disable, reset, enable: enabling lifts the
//! throttle), with the grid aligned so the numbering goes on by time: the silent ticks
//! are holes, declared as gaps.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::error::BpfError;
use aya::maps::{Array, MapData};

/// An error of this stage (see [`BpfError`]).
fn timer_err(msg: impl Into<String>) -> BpfError {
    BpfError::Timer(msg.into())
}

/// The first 64 bytes of `struct perf_event_attr` (PERF_ATTR_SIZE_VER0), all this event
/// needs. aya's own PerfEvent::attach keeps no perf event fd once it has made a bpf_link,
/// and the timer needs one: to read when it was enabled and to restart it.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttrV0 {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// Bit 0: disabled.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
// `libc::Ioctl`: the request's type differs between glibc (c_ulong) and musl (c_int; the
// static guest-agent build compiles this too). Every value fits in 31 bits.
const PERF_EVENT_IOC_SET_BPF: libc::Ioctl = 0x4004_2408 as libc::Ioctl;

/// Open a disabled cpu-clock event on `cpu` with period `interval_ns`, and make program
/// `prog` its overflow handler (enable it with [`SnapTimer::start`]).
pub fn open(cpu: u32, interval_ns: u64, prog: BorrowedFd<'_>) -> Result<OwnedFd, BpfError> {
    let attr = PerfEventAttrV0 {
        type_: PERF_TYPE_SOFTWARE,
        size: std::mem::size_of::<PerfEventAttrV0>() as u32,
        config: PERF_COUNT_SW_CPU_CLOCK,
        sample_period: interval_ns,
        flags: 1,
        ..Default::default()
    };
    // SAFETY: a valid attr of its declared size; pid -1 + cpu: every task on that CPU.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttrV0,
            -1 as libc::pid_t,
            cpu as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(timer_err(format!(
            "perf_event_open (cpu-clock on CPU {cpu}): {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a new fd, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: SET_BPF takes the program fd as its argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) } != 0 {
        return Err(timer_err(format!(
            "attaching the snapshot program to its timer: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(fd)
}

/// The grid's origin for a restart: the new grid (enabled at `enabled_ns`) shifted by
/// whole intervals so that its ticks keep the old grid's numbering by time.
pub fn aligned_origin(old_origin_ns: u64, enabled_ns: u64, interval_ns: u64) -> u64 {
    if enabled_ns <= old_origin_ns {
        return old_origin_ns;
    }
    enabled_ns - (enabled_ns - old_origin_ns) / interval_ns * interval_ns
}

pub struct SnapTimer {
    fd: OwnedFd,
    grid: Array<MapData, u64>,
    interval_ns: u64,
    pub restarts: u64,
    /// CLOCK_MONOTONIC of the last restart (a restarted timer gets a full stall period).
    pub restarted_ns: u64,
    /// Fault injection for the restart test (see [`FAULT_STOP_ENV`]): when to stop the
    /// timer once, as perf's throttling would.
    fault_stop_at_ns: Option<u64>,
}

/// `CIS490_FAULT_TIMER_STOP_AFTER_MS=N`: N ms after the timer starts, the capture disables
/// it once, exactly as perf leaves a throttled timer on a CPU without scheduler ticks, so
/// that the test of the stall detection and restart (tests/bpf.rs) does not depend on
/// whether the kernel happens to throttle. Not a user option; meta.sources[] reports the
/// restart like any other.
pub const FAULT_STOP_ENV: &str = "CIS490_FAULT_TIMER_STOP_AFTER_MS";

const PERF_EVENT_IOC_ENABLE: libc::Ioctl = 0x2400 as libc::Ioctl;
const PERF_EVENT_IOC_DISABLE: libc::Ioctl = 0x2401 as libc::Ioctl;
const PERF_EVENT_IOC_RESET: libc::Ioctl = 0x2403 as libc::Ioctl;

impl SnapTimer {
    pub fn new(fd: OwnedFd, grid: Array<MapData, u64>, interval_ns: u64) -> Self {
        Self {
            fd,
            grid,
            interval_ns,
            restarts: 0,
            restarted_ns: 0,
            // Counted from when the capture takes the timer over (the loader helper
            // may have started it), which is before its first drain.
            fault_stop_at_ns: std::env::var(FAULT_STOP_ENV)
                .ok()
                .and_then(|ms| ms.parse::<u64>().ok())
                .map(|ms| crate::clock::mono_raw_ns() + ms * 1_000_000),
        }
    }

    /// Stop the timer if the injected fault is due (called at every drain).
    pub fn inject_fault_if_due(&mut self, now_ns: u64) {
        if self.fault_stop_at_ns.is_some_and(|at| now_ns >= at) {
            self.fault_stop_at_ns = None;
            tracing::warn!("{FAULT_STOP_ENV}: stopping the snapshot timer once");
            let _ = self.ioctl(PERF_EVENT_IOC_DISABLE, "disabling");
        }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn grid(&self) -> &Array<MapData, u64> {
        &self.grid
    }

    /// When the event was enabled: cpu-clock counts the ns it has been enabled, and its
    /// hrtimer was started at that moment (cpu_clock_event_start), so `now − count` is
    /// the grid's origin. `now` is read before the count is, so the origin comes out early
    /// by at most the read's duration, never late: lateness is never understated.
    fn enabled_at(&self) -> Result<u64, BpfError> {
        let before = crate::clock::mono_raw_ns();
        let mut count = [0u8; 8];
        // SAFETY: the fd is a perf event this struct owns; the buffer is 8 writable bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        if n != 8 {
            return Err(timer_err(format!(
                "reading the snapshot timer: {}",
                std::io::Error::last_os_error()
            )));
        }
        let count = u64::from_ne_bytes(count);
        before
            .checked_sub(count)
            .ok_or_else(|| timer_err(format!("snapshot timer count {count} ahead of the clock")))
    }

    /// Enable the timer and tell the program its grid (before CONTROL lets it run).
    pub fn start(&mut self) -> Result<(), BpfError> {
        self.ioctl(PERF_EVENT_IOC_ENABLE, "enabling")?;
        let origin = self.enabled_at()?;
        self.grid
            .set(0, origin, 0)
            .map_err(|e| timer_err(format!("setting the snapshot grid (map GRID): {e}")))
    }

    fn ioctl(&self, req: libc::Ioctl, what: &str) -> Result<(), BpfError> {
        // SAFETY: a perf event ioctl without argument on an fd this struct owns.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), req, 0) } != 0 {
            return Err(timer_err(format!(
                "{what} the snapshot timer: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Restart a throttled timer (see the module comment).
    pub fn restart(&mut self) -> Result<(), BpfError> {
        let old = self
            .grid
            .get(&0, 0)
            .map_err(|e| timer_err(format!("reading map GRID: {e}")))?;
        self.ioctl(PERF_EVENT_IOC_DISABLE, "disabling")?;
        self.ioctl(PERF_EVENT_IOC_RESET, "resetting")?;
        self.ioctl(PERF_EVENT_IOC_ENABLE, "enabling")?;
        let enabled = self.enabled_at()?;
        self.grid
            .set(0, aligned_origin(old, enabled, self.interval_ns), 0)
            .map_err(|e| timer_err(format!("setting the snapshot grid (map GRID): {e}")))?;
        self.restarts += 1;
        self.restarted_ns = crate::clock::mono_raw_ns();
        Ok(())
    }

    /// How long the drain waits, with no tick record, before it restarts the timer:
    /// three intervals, but at least a little more than one drain (50 ms), so that a
    /// drain that merely came early never restarts a healthy timer. Every ms of waiting
    /// is a lost tick at 1 kHz once perf has throttled the timer.
    pub fn stall_ns(&self) -> u64 {
        (3 * self.interval_ns).max(60_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_grid_keeps_the_numbering_by_time() {
        // Old grid at 1_000, 1 ms ticks; restarted at 5_300_500: tick 5 of the old grid
        // was at 5_001_000, so the new grid is origin 300_500 (its ticks at 5_300_500 + k ms
        // get numbers 5 + k, continuing from where time has got to).
        let o = aligned_origin(1_000, 5_300_500, 1_000_000);
        assert_eq!(o, 300_500);
        assert_eq!((5_300_500 + 1_000_000 - o) / 1_000_000, 6);
        assert_eq!(aligned_origin(1_000, 500, 1_000_000), 1_000);
        assert_eq!(aligned_origin(0, 7_000_000, 1_000_000), 0);
    }
}
