//! The snapshot schedule's arithmetic: which tick a timer run belongs to and how late it
//! is. The snapshot program runs it in the kernel on every timer run; it is plain integer
//! arithmetic over [`TickState`] and the grid origin, so it lives here, where the host's
//! unit tests can reach it.

use crate::TickState;

/// A timer run's place on the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// The tick number: the latest grid instant at or before the run.
    pub seq: u64,
    /// How long after its grid instant the run came (ns).
    pub late_ns: u64,
}

impl TickState {
    /// Place a run at `now` (CLOCK_MONOTONIC ns) on the grid `origin + k × interval`
    /// (`interval` > 0): the latest grid instant at or before `now` (an hrtimer never
    /// fires early; one that fires a period or more late skips the instants in between,
    /// which become holes).
    ///
    /// Two runs never share a number: a run that lands on the previous run's tick (the
    /// grid estimate was a little late) takes the next one. An origin of 0 (user space
    /// has not set one yet) or one in the future is replaced by `now`. Should a run come
    /// before its own grid instant, the origin moves back by the difference, so lateness
    /// is never negative and never understated.
    #[inline(always)]
    pub fn schedule(&mut self, origin: &mut u64, now: u64, interval: u64) -> Scheduled {
        if *origin == 0 || *origin > now {
            *origin = now;
        }
        let mut seq = (now - *origin) / interval;
        if self.runs > 0 && seq <= self.last_seq {
            seq = self.last_seq + 1;
        }
        self.runs += 1;
        self.last_seq = seq;
        let due = *origin + seq * interval;
        if now < due {
            *origin -= due - now;
            Scheduled { seq, late_ns: 0 }
        } else {
            Scheduled {
                seq,
                late_ns: now - due,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn run(st: &mut TickState, origin: &mut u64, now: u64) -> (u64, u64) {
        let s = st.schedule(origin, now, MS);
        (s.seq, s.late_ns)
    }

    #[test]
    fn on_time_runs_are_numbered_by_the_grid() {
        let (mut st, mut origin) = (TickState::default(), 10 * MS);
        assert_eq!(run(&mut st, &mut origin, 10 * MS), (0, 0));
        assert_eq!(run(&mut st, &mut origin, 11 * MS + 3), (1, 3));
        assert_eq!(run(&mut st, &mut origin, 12 * MS + 40_000), (2, 40_000));
        assert_eq!(origin, 10 * MS);
        assert_eq!((st.runs, st.last_seq), (3, 2));
    }

    #[test]
    fn a_late_run_skips_the_instants_in_between() {
        let (mut st, mut origin) = (TickState::default(), 5 * MS);
        assert_eq!(run(&mut st, &mut origin, 5 * MS), (0, 0));
        // 3.5 intervals late: ticks 1..=3 are holes, this run is tick 4, 0.5 ms late.
        assert_eq!(run(&mut st, &mut origin, 9 * MS + MS / 2), (4, MS / 2));
        assert_eq!(run(&mut st, &mut origin, 10 * MS), (5, 0));
    }

    #[test]
    fn no_origin_yet_or_one_in_the_future_starts_the_grid_at_the_run() {
        let (mut st, mut origin) = (TickState::default(), 0);
        assert_eq!(run(&mut st, &mut origin, 77 * MS), (0, 0));
        assert_eq!(origin, 77 * MS);
        let (mut st, mut origin) = (TickState::default(), 90 * MS);
        assert_eq!(run(&mut st, &mut origin, 80 * MS), (0, 0));
        assert_eq!(origin, 80 * MS);
    }

    #[test]
    fn two_runs_in_one_interval_get_two_numbers() {
        // The estimated origin was early: two runs fall into tick 3's interval.
        let base = 1_000 * MS;
        let (mut st, mut origin) = (TickState::default(), base);
        assert_eq!(run(&mut st, &mut origin, base + 3 * MS + 100), (3, 100));
        // The second run takes tick 4, and came before tick 4's instant: the origin moves
        // back by the difference, so lateness stays >= 0 and later runs are measured
        // from the corrected grid.
        assert_eq!(run(&mut st, &mut origin, base + 3 * MS + 900_000), (4, 0));
        assert_eq!(origin, base - 100_000);
        assert_eq!(run(&mut st, &mut origin, base + 5 * MS), (5, 100_000));
    }

    #[test]
    fn a_restart_grid_continues_the_numbering() {
        // User space rewrites the origin after a restart, aligned by whole intervals; the
        // numbering goes on by time from the last tick.
        let (mut st, mut origin) = (TickState::default(), 0);
        assert_eq!(run(&mut st, &mut origin, 2 * MS), (0, 0));
        assert_eq!(run(&mut st, &mut origin, 3 * MS), (1, 0));
        origin = 2 * MS + 250_000; // new grid: same numbering, 0.25 ms phase shift
        assert_eq!(run(&mut st, &mut origin, 50 * MS + 250_000), (48, 0));
    }
}
