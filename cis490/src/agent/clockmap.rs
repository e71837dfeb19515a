//! Guest clock → host episode clock, estimated from the agent's own stamps.
//!
//! Every agent line carries the guest's CLOCK_MONOTONIC at sampling (`mono_ns`) and is
//! stamped on the host when it arrives (`t_mono_ns`). For line *i*,
//! `arrival_i − guest_i = offset + slope·guest_i + delay_i` with `delay_i ≥ 0` (the time
//! the line spent in the guest, virtio-serial and QEMU). Delays are never negative, so
//! the *lower envelope* of `arrival − guest` over guest time is the clock relation plus
//! the smallest delay, as NTP's clock filter and the linear-programming skew estimator
//! of Moon, Skelly and Towsley (INFOCOM 1999) use it:
//!
//! 1. min-filter: keep the line with the smallest `arrival − guest` per [`BUCKET_NS`] of
//!    guest time, over a sliding window of [`WINDOW_BUCKETS`] buckets (64 s);
//! 2. lower convex hull of those minima;
//! 3. the line under every point that is highest at the minima's mean guest time — the
//!    hull edge spanning that mean (the LP optimum: it minimizes the summed distance to
//!    the points while staying under all of them).
//!
//! A line that arrives late (the first line after a connect, which blocked in the guest
//! until a host listened) lies far above the envelope and never moves it. Until the
//! window spans [`MIN_DRIFT_SPAN_NS`] of guest time, or when the hull's slope is beyond
//! [`MAX_DRIFT_PPM`], drift is taken as 0 and only the offset (the window's minimum) is
//! used. A guest clock that goes backwards (guest reboot, hostile guest) resets it.
//!
//! Pure arithmetic on (guest_ns, arrival_ns) pairs: no clocks, no I/O.

use std::collections::VecDeque;

pub const BUCKET_NS: u64 = 500_000_000;
pub const WINDOW_BUCKETS: u64 = 128;
pub const MIN_DRIFT_SPAN_NS: u64 = 5_000_000_000;
/// Beyond 1 %, a slope is not a clock's drift but a stale point or a lying guest.
pub const MAX_DRIFT_PPM: f64 = 10_000.0;
/// Drift assumed possible while it is not yet estimated, for the stated uncertainty.
pub const ASSUMED_DRIFT_PPM: f64 = 100.0;
/// Lines needed before a sampling instant is estimated at all: the first line after a
/// connect is typically stale, and one point cannot say so.
pub const MIN_SAMPLES: u64 = 3;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    id: u64,
    guest_ns: u64,
    /// arrival − guest at the bucket's lowest point.
    diff_ns: i128,
}

/// The current estimate: `host(g) = ref_host_ns + (g − ref_guest_ns) · (1 + slope)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    pub ref_guest_ns: u64,
    /// Host episode clock (t_mono_ns axis) at `ref_guest_ns`.
    pub ref_host_ns: i128,
    /// d(arrival − guest)/d(guest): host ns per guest ns, minus 1.
    pub slope: f64,
    pub drift_estimated: bool,
    pub uncertainty_ns: u64,
    /// Guest time covered by the window.
    pub span_ns: u64,
}

impl Fit {
    /// Estimated host episode time of the guest instant `guest_ns`.
    pub fn host_at(&self, guest_ns: u64) -> i128 {
        let dg = i128::from(guest_ns) - i128::from(self.ref_guest_ns);
        // dg spans at most the window plus what a hostile guest jumps: f64 keeps the
        // product's magnitude, and the slope is bounded by MAX_DRIFT_PPM.
        self.ref_host_ns + dg + (self.slope * dg as f64).round() as i128
    }

    /// The guest clock's rate relative to the host's, in ppm: positive when the guest
    /// clock runs fast.
    pub fn drift_ppm(&self) -> f64 {
        (1.0 / (1.0 + self.slope) - 1.0) * 1e6
    }

    /// Host episode clock minus guest clock at the reference point.
    pub fn offset_ns(&self) -> i128 {
        self.ref_host_ns - i128::from(self.ref_guest_ns)
    }
}

#[derive(Debug, Default)]
pub struct ClockMap {
    buckets: VecDeque<Bucket>,
    last_guest_ns: Option<u64>,
    samples: u64,
    resets: u64,
    fit: Option<Fit>,
}

impl ClockMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn fit(&self) -> Option<Fit> {
        self.fit
    }

    /// Lines used since the last reset.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Times the guest clock went backwards and the estimate restarted.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Add one line (guest sampling clock, host arrival on the episode clock) and return
    /// the estimated host instant of its sampling, never later than its arrival; None
    /// while fewer than [`MIN_SAMPLES`] lines are known.
    pub fn observe(&mut self, guest_ns: u64, arrival_ns: u64) -> Option<i128> {
        if self.last_guest_ns.is_some_and(|last| guest_ns < last) {
            self.buckets.clear();
            self.samples = 0;
            self.fit = None;
            self.resets += 1;
        }
        self.last_guest_ns = Some(guest_ns);
        self.samples += 1;
        let diff_ns = i128::from(arrival_ns) - i128::from(guest_ns);
        let id = guest_ns / BUCKET_NS;
        let changed = match self.buckets.back_mut() {
            Some(b) if b.id == id => {
                if diff_ns < b.diff_ns {
                    b.guest_ns = guest_ns;
                    b.diff_ns = diff_ns;
                    true
                } else {
                    false
                }
            }
            _ => {
                self.buckets.push_back(Bucket {
                    id,
                    guest_ns,
                    diff_ns,
                });
                while let (Some(f), Some(b)) = (self.buckets.front(), self.buckets.back()) {
                    if b.id - f.id >= WINDOW_BUCKETS {
                        self.buckets.pop_front();
                    } else {
                        break;
                    }
                }
                true
            }
        };
        if changed || self.fit.is_none() {
            self.fit = fit(&self.buckets);
        }
        if self.samples < MIN_SAMPLES {
            return None;
        }
        let fit = self.fit?;
        Some(fit.host_at(guest_ns).min(i128::from(arrival_ns)))
    }
}

/// Lower-envelope fit of the bucket minima (see the module comment).
fn fit(buckets: &VecDeque<Bucket>) -> Option<Fit> {
    let first = *buckets.front()?;
    let last = *buckets.back()?;
    // Coordinates relative to the first minimum keep f64 exact to well under 1 ns.
    let pts: Vec<(f64, f64)> = buckets
        .iter()
        .map(|b| {
            (
                (b.guest_ns - first.guest_ns) as f64,
                (b.diff_ns - first.diff_ns) as f64,
            )
        })
        .collect();
    let span_ns = last.guest_ns - first.guest_ns;
    let mean_x = pts.iter().map(|p| p.0).sum::<f64>() / pts.len() as f64;
    let mut line = None;
    if span_ns >= MIN_DRIFT_SPAN_NS && pts.len() >= 2 {
        let hull = lower_hull(&pts);
        if let Some(w) = hull
            .windows(2)
            .find(|w| w[0].0 <= mean_x && mean_x <= w[1].0)
        {
            let slope = (w[1].1 - w[0].1) / (w[1].0 - w[0].0);
            if slope.is_finite() && (slope * 1e6).abs() <= MAX_DRIFT_PPM {
                line = Some((slope, w[0].1 + slope * (mean_x - w[0].0), true));
            }
        }
    }
    let (slope, y_at_mean, drift_estimated) = line.unwrap_or_else(|| {
        let min_y = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        (0.0, min_y, false)
    });
    // Residuals of the minima above the envelope: how tightly the minima pin it.
    let mut residuals: Vec<f64> = pts
        .iter()
        .map(|p| (p.1 - (y_at_mean + slope * (p.0 - mean_x))).max(0.0))
        .collect();
    residuals.sort_by(f64::total_cmp);
    let mut uncertainty = residuals[residuals.len() / 2];
    if !drift_estimated {
        uncertainty += ASSUMED_DRIFT_PPM * 1e-6 * span_ns as f64;
    }
    let ref_guest_ns = first.guest_ns.saturating_add(mean_x.round() as u64);
    let ref_diff = first.diff_ns + y_at_mean.round() as i128;
    Some(Fit {
        ref_guest_ns,
        ref_host_ns: i128::from(ref_guest_ns) + ref_diff,
        slope,
        drift_estimated,
        uncertainty_ns: uncertainty.round().min(u64::MAX as f64) as u64,
        span_ns,
    })
}

/// Andrew's monotone chain, lower half; `pts` sorted by x (bucket order is guest order).
fn lower_hull(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut hull: Vec<(f64, f64)> = Vec::with_capacity(pts.len());
    for &p in pts {
        while hull.len() >= 2 {
            let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
            let cross = (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0);
            if cross <= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(p);
    }
    hull
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic jitter: xorshift, exponential-ish delays with occasional long ones.
    struct Jitter(u64);
    impl Jitter {
        fn next_unit(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        /// 50 µs minimum, mean +300 µs, and 1 in 20 lines 5–25 ms late.
        fn delay_ns(&mut self) -> u64 {
            let u = self.next_unit().max(1e-12);
            let mut d = 50_000.0 - 300_000.0 * u.ln();
            if self.next_unit() < 0.05 {
                d += 5e6 + 20e6 * self.next_unit();
            }
            d as u64
        }
    }

    /// A guest clock `offset` ahead of the host episode clock, running `ppm` fast.
    fn guest_of(host_ns: u64, offset_ns: u64, ppm: f64) -> u64 {
        offset_ns + (host_ns as f64 * (1.0 + ppm * 1e-6)).round() as u64
    }

    #[test]
    fn offset_drift_and_jittered_delays_are_recovered() {
        let mut map = ClockMap::new();
        let mut j = Jitter(0x9e37_79b9_7f4a_7c15);
        let (offset, ppm) = (7_300_000_000u64, 200.0);
        let mut worst_late = 0i128;
        for k in 0..900u64 {
            // 10 Hz for 90 s: the window (64 s) slides too.
            let sampled = 1_000_000_000 + k * 100_000_000;
            let g = guest_of(sampled, offset, ppm);
            let arrival = sampled + j.delay_ns();
            let est = map.observe(g, arrival);
            if k >= MIN_SAMPLES {
                let est = est.unwrap();
                assert!(est <= i128::from(arrival));
                if k > 100 {
                    // Once drift is known: the estimate sits at sampling + the minimum
                    // delay (50 µs), give or take the jitter of the minima.
                    let err = est - i128::from(sampled);
                    worst_late = worst_late.max(err.abs());
                    assert!((0..=250_000).contains(&err), "line {k}: error {err} ns");
                }
            }
        }
        let fit = map.fit().unwrap();
        assert!(fit.drift_estimated);
        assert!(
            (fit.drift_ppm() - ppm).abs() < 5.0,
            "drift {} ppm",
            fit.drift_ppm()
        );
        // Host minus guest at the reference: −offset − ppm·host, plus the 50 µs delay.
        let want =
            -(offset as i128) - ((fit.ref_host_ns as f64) * ppm * 1e-6).round() as i128 + 50_000;
        assert!(
            (fit.offset_ns() - want).abs() < 200_000,
            "offset {} want {want}",
            fit.offset_ns()
        );
        assert!(fit.uncertainty_ns < 1_000_000, "{fit:?}");
        assert!(fit.span_ns >= 60_000_000_000);
        eprintln!("worst |error| after warm-up: {worst_late} ns; {fit:?}");
    }

    #[test]
    fn a_stale_first_line_seconds_old_does_not_poison_the_estimate() {
        let mut map = ClockMap::new();
        let offset = 2_000_000_000u64;
        // Sampled at host 0.5 s, delivered only when the host connected at 3.5 s.
        let g0 = guest_of(500_000_000, offset, 0.0);
        assert_eq!(map.observe(g0, 3_500_000_000), None);
        for k in 1..200u64 {
            let sampled = 3_500_000_000 + k * 100_000_000;
            let arrival = sampled + 80_000 + (k % 7) * 30_000;
            let est = map.observe(guest_of(sampled, offset, 0.0), arrival);
            if k + 1 >= MIN_SAMPLES {
                // Not later than the smallest delay seen so far (110 µs from line 1 on,
                // 80 µs once line 7 came); a few µs early while drift is first fitted
                // over a short span of jittered minima. A poisoned estimate would be
                // seconds off.
                let err = est.unwrap() - i128::from(sampled);
                assert!((-20_000..=110_000).contains(&err), "line {k}: error {err}");
            }
        }
        let fit = map.fit().unwrap();
        assert!(fit.drift_ppm().abs() < 5.0, "{fit:?}");
        // With the final fit the stale line's own sampling instant comes out right.
        let err = fit.host_at(g0) - 500_000_000;
        assert!(
            (0..=100_000).contains(&err),
            "stale line placed {err} ns off"
        );
    }

    #[test]
    fn a_guest_clock_that_goes_back_restarts_the_estimate() {
        let mut map = ClockMap::new();
        for k in 0..50u64 {
            map.observe(10_000_000_000 + k * 100_000_000, k * 100_000_000 + 1_000);
        }
        assert_eq!(map.samples(), 50);
        // A reboot: guest uptime starts again.
        assert_eq!(map.observe(1_000_000, 6_000_000_000), None);
        assert_eq!(map.resets(), 1);
        assert_eq!(map.samples(), 1);
        map.observe(101_000_000, 6_100_000_000);
        let est = map.observe(201_000_000, 6_200_000_000).unwrap();
        assert_eq!(est, 6_200_000_000);
        assert_eq!(map.fit().unwrap().offset_ns(), 5_999_000_000);
    }

    #[test]
    fn hostile_guest_clocks_never_panic_and_never_place_a_line_after_its_arrival() {
        let mut map = ClockMap::new();
        let values = [0, u64::MAX, u64::MAX - 1, 1, u64::MAX / 2, u64::MAX];
        for (i, &g) in values.iter().cycle().take(60).enumerate() {
            let arrival = i as u64 * 1_000_000;
            if let Some(est) = map.observe(g, arrival) {
                assert!(est <= i128::from(arrival));
            }
        }
        // Huge forward jumps every line: each is its own bucket, the window slides.
        let mut map = ClockMap::new();
        for k in 0..300u64 {
            let g = k.wrapping_mul(0x0123_4567_89ab_cdef) | (k << 50);
            if let Some(est) = map.observe(g.max(k), k * 1_000) {
                assert!(est <= i128::from(k * 1_000));
            }
        }
    }
}
