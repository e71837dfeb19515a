//! The pure part of the `perf` source: which counters, how a reading becomes a row, how
//! the process row sums live and exited threads, and why a counter is missing. Unit
//! tested without perf_event_open.

use crate::row::{Row, Value};

pub const SOURCE: &str = "perf";

/// The hardware group's members, in column order.
pub const HW: [&str; 7] = [
    "cycles",
    "instructions",
    "ref_cycles",
    "cache_references",
    "cache_misses",
    "branch_instructions",
    "branch_misses",
];
/// The software group's members, in column order.
pub const SW: [&str; 3] = ["page_faults", "context_switches", "cpu_migrations"];

/// One group's reading: each member's count (None: that member could not be opened)
/// and the group's enabled and running times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupReading<const N: usize> {
    pub counts: [Option<u64>; N],
    pub time_enabled_ns: u64,
    pub time_running_ns: u64,
}

impl<const N: usize> GroupReading<N> {
    /// Element-wise sum (the process row): a member missing in either is missing.
    pub fn add(&mut self, o: &GroupReading<N>) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a = match (*a, b) {
                (Some(x), Some(y)) => Some(x.saturating_add(y)),
                _ => None,
            };
        }
        self.time_enabled_ns = self.time_enabled_ns.saturating_add(o.time_enabled_ns);
        self.time_running_ns = self.time_running_ns.saturating_add(o.time_running_ns);
    }
}

/// A thread's reading: either group may be absent (hardware: no PMU here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    pub hw: Option<GroupReading<7>>,
    pub sw: Option<GroupReading<3>>,
}

impl Reading {
    pub fn add(&mut self, o: &Reading) {
        fn merge<const N: usize>(a: &mut Option<GroupReading<N>>, b: &Option<GroupReading<N>>) {
            match (a.as_mut(), b) {
                (Some(x), Some(y)) => x.add(y),
                (None, Some(y)) => *a = Some(*y),
                _ => {}
            }
        }
        merge(&mut self.hw, &o.hw);
        merge(&mut self.sw, &o.sw);
    }
}

/// The counter value scaled for multiplexing, as `perf stat` does: count × enabled /
/// running (docs/data-model.md). The columns hold the raw count; this is what a reader
/// computes when running < enabled.
pub fn scaled(count: u64, enabled_ns: u64, running_ns: u64) -> Option<f64> {
    (running_ns > 0).then(|| count as f64 * enabled_ns as f64 / running_ns as f64)
}

/// The row of one thread (`tid` Some) or of the process (None), columns in the
/// contract's order.
pub fn perf_row(
    row: &mut Row,
    seq: u64,
    tid: Option<u32>,
    comm: Option<std::sync::Arc<str>>,
    vcpu: Option<u32>,
    r: &Reading,
) {
    row.seq = Some(seq);
    row.thread_columns = true;
    row.tid = tid;
    row.comm = comm;
    row.vcpu = vcpu;
    let v = |x: Option<u64>| x.map_or(Value::Null, Value::U64);
    for (i, name) in HW.iter().enumerate() {
        row.push(*name, v(r.hw.and_then(|g| g.counts[i])));
    }
    for (i, name) in SW.iter().enumerate() {
        row.push(*name, v(r.sw.and_then(|g| g.counts[i])));
    }
    row.push("hw_time_enabled_ns", v(r.hw.map(|g| g.time_enabled_ns)))
        .push("hw_time_running_ns", v(r.hw.map(|g| g.time_running_ns)))
        .push("sw_time_enabled_ns", v(r.sw.map(|g| g.time_enabled_ns)))
        .push("sw_time_running_ns", v(r.sw.map(|g| g.time_running_ns)));
}

/// Why a group or counter did not open, in words for meta.sources[perf].
pub fn open_failure(errno: Option<i32>) -> String {
    match errno {
        Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) => {
            "no PMU driver for this event (the kernel has software events only)".into()
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "not permitted (perf_event_paranoid, or no CAP_PERFMON)".into()
        }
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors".into(),
        Some(libc::ESRCH) => "the thread exited".into(),
        Some(e) => format!(
            "perf_event_open failed: {}",
            std::io::Error::from_raw_os_error(e)
        ),
        None => "perf_event_open failed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Stamp;

    fn stamp() -> Stamp {
        Stamp {
            t_mono_ns: 1,
            t_wall_ns: 2,
        }
    }

    #[test]
    fn a_row_has_every_column_and_nulls_the_hardware_group_it_could_not_open() {
        let r = Reading {
            hw: None,
            sw: Some(GroupReading {
                counts: [Some(10), Some(3), None],
                time_enabled_ns: 100,
                time_running_ns: 100,
            }),
        };
        let mut row = Row::new(stamp(), SOURCE, false);
        perf_row(&mut row, 7, Some(42), None, Some(0), &r);
        let names: Vec<&str> = row.fields.iter().map(|(n, _)| n.as_ref()).collect();
        let want: Vec<&str> = HW
            .iter()
            .chain(SW.iter())
            .copied()
            .chain([
                "hw_time_enabled_ns",
                "hw_time_running_ns",
                "sw_time_enabled_ns",
                "sw_time_running_ns",
            ])
            .collect();
        assert_eq!(names, want);
        assert_eq!(row.get("cycles"), Some(&Value::Null));
        assert_eq!(row.get("page_faults"), Some(&Value::U64(10)));
        assert_eq!(row.get("cpu_migrations"), Some(&Value::Null));
        assert_eq!(row.get("hw_time_running_ns"), Some(&Value::Null));
        assert_eq!(row.get("sw_time_enabled_ns"), Some(&Value::U64(100)));
        assert_eq!((row.tid, row.vcpu, row.seq), (Some(42), Some(0), Some(7)));
    }

    #[test]
    fn the_process_sum_keeps_a_member_only_where_every_thread_has_it() {
        let g = |a, b| GroupReading {
            counts: [Some(a), b, Some(1)],
            time_enabled_ns: 5,
            time_running_ns: 4,
        };
        let mut total = Reading::default();
        total.add(&Reading {
            hw: None,
            sw: Some(g(2, Some(3))),
        });
        total.add(&Reading {
            hw: None,
            sw: Some(g(5, None)),
        });
        let sw = total.sw.unwrap();
        assert_eq!(sw.counts, [Some(7), None, Some(2)]);
        assert_eq!((sw.time_enabled_ns, sw.time_running_ns), (10, 8));
        assert!(total.hw.is_none());
    }

    #[test]
    fn scaling_and_reasons() {
        assert_eq!(scaled(100, 10, 5), Some(200.0));
        assert_eq!(scaled(100, 10, 0), None);
        assert!(open_failure(Some(libc::ENOENT)).contains("no PMU driver"));
        assert!(open_failure(Some(libc::EACCES)).contains("not permitted"));
    }
}
