//! The episode's clock pair. Every row in every file is stamped with `t_mono_ns`
//! (CLOCK_MONOTONIC minus one episode-wide origin) and `t_wall_ns` (CLOCK_REALTIME), so
//! rows of different streams join exactly on `t_mono_ns`.

use serde::Serialize;

/// Raw CLOCK_MONOTONIC in nanoseconds.
pub fn mono_raw_ns() -> u64 {
    read_clock(libc::CLOCK_MONOTONIC)
}

/// Raw CLOCK_REALTIME in nanoseconds since the Unix epoch.
pub fn wall_ns() -> u64 {
    read_clock(libc::CLOCK_REALTIME)
}

fn read_clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids used here always exist on Linux.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleep until the absolute CLOCK_MONOTONIC instant `deadline_raw_ns`.
///
/// Absolute deadlines (TIMER_ABSTIME) are what keep a 1 kHz sampler from drifting: the
/// time spent sampling is not added to the period. Returns early (false) if a signal
/// interrupted the sleep, so the caller can look at its stop flag.
pub fn sleep_until_mono(deadline_raw_ns: u64) -> bool {
    let ts = libc::timespec {
        tv_sec: (deadline_raw_ns / 1_000_000_000) as _,
        tv_nsec: (deadline_raw_ns % 1_000_000_000) as _,
    };
    // SAFETY: `ts` is a valid timespec; the remaining-time pointer may be null with TIMER_ABSTIME.
    let rc = unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
    rc == 0
}

/// One clock origin for the whole episode (written to `meta.clock`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EpisodeClock {
    pub mono_origin_ns: u64,
    pub wall_origin_ns: u64,
}

/// The two timestamps every row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub t_mono_ns: u64,
    pub t_wall_ns: u64,
}

impl EpisodeClock {
    pub fn start() -> Self {
        let mono_origin_ns = mono_raw_ns();
        let wall_origin_ns = wall_ns();
        Self {
            mono_origin_ns,
            wall_origin_ns,
        }
    }

    /// Stamp "now" on the episode clock.
    pub fn stamp(&self) -> Stamp {
        let mono = mono_raw_ns();
        let wall = wall_ns();
        Stamp {
            t_mono_ns: mono.saturating_sub(self.mono_origin_ns),
            t_wall_ns: wall,
        }
    }

    /// Episode-relative monotonic time of a raw CLOCK_MONOTONIC reading.
    pub fn rel(&self, raw_mono_ns: u64) -> u64 {
        raw_mono_ns.saturating_sub(self.mono_origin_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_relative_to_origin_and_non_decreasing() {
        let clock = EpisodeClock::start();
        let a = clock.stamp();
        let b = clock.stamp();
        assert!(b.t_mono_ns >= a.t_mono_ns);
        // The origin was taken a moment ago, so relative time must be tiny, not an epoch value.
        assert!(
            a.t_mono_ns < 5_000_000_000,
            "t_mono_ns {} not relative",
            a.t_mono_ns
        );
        assert!(a.t_wall_ns >= clock.wall_origin_ns);
    }

    #[test]
    fn sleep_until_a_past_deadline_returns_at_once() {
        let before = mono_raw_ns();
        sleep_until_mono(before.saturating_sub(1_000_000));
        assert!(mono_raw_ns() - before < 1_000_000_000);
    }
}
