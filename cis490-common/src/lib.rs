//! Types shared by the cis490 BPF programs and the user-space loader.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers, because the same bytes
//! are written by the kernel side into BPF maps and read back by user space. Every field
//! is a `u64` or `u32` with explicit padding, so both sides agree on the layout.
#![no_std]

/// Threads of the target the snapshot program can follow at once (slots of map
/// `SLOTS`). QEMU has a few dozen threads (vCPUs, I/O threads, a worker pool); every
/// snapshot walks all slots (an inlined array access each, ~1 ns), so this stays small.
/// A thread created while every slot is taken is counted in `TickRecord::unslotted`.
pub const MAX_SLOTS: u32 = 512;
/// Interfaces watched by the net programs (`--net-if`, autodetected taps).
pub const MAX_NET_IFS: u32 = 16;
/// CPUs whose per-CPU net counters the snapshot sums (`bpf_map_lookup_percpu_elem`).
pub const MAX_CPUS: u32 = 256;
/// Linux IFNAMSIZ: interface names including the NUL.
pub const IFNAMSIZ: usize = 16;

/// `ThreadSlot::state`.
pub const SLOT_FREE: u32 = 0;
/// The slot follows a live thread: snapshots read its task_struct.
pub const SLOT_LIVE: u32 = 1;
/// sched_process_exit copied the thread's final counters into `ThreadSlot::last`; the
/// next snapshot reports them once (as `REC_THREAD_EXITED`) and frees the slot.
pub const SLOT_EXITED: u32 = 2;

/// A thread's counters as the kernel keeps them in its task_struct, cumulative since
/// the thread started: the same numbers /proc/<pid>/task/<tid>/{schedstat,status,io}
/// print, read in the kernel without text formatting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounters {
    /// `se.sum_exec_runtime` (schedstat field 1), updated by the scheduler at every
    /// switch and scheduler tick: a thread running through a snapshot is counted up to
    /// its CPU's last tick (at most 1/CONFIG_HZ behind).
    pub on_cpu_ns: u64,
    /// `sched_info.pcount` (schedstat field 3): times the thread was put on a CPU.
    /// Before run_delay, as in the kernel's struct: one probe read gets both.
    pub timeslices_count: u64,
    /// `sched_info.run_delay` (schedstat field 2): time spent runnable on a run queue.
    pub runqueue_wait_ns: u64,
    /// `nvcsw`, `nivcsw` (status voluntary/nonvoluntary_ctxt_switches).
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    /// `se.nr_migrations`.
    pub migrations: u64,
    /// `stats.nr_wakeups` where the kernel has CONFIG_SCHEDSTATS and schedstats are on;
    /// else, with `--bpf-wakeups`, sched_wakeup/sched_wakeup_new counted since attach;
    /// else `u64::MAX` (reported as null).
    pub wakeups: u64,
    /// `ioac` (task io): rchar, wchar, syscr, syscw, read_bytes, write_bytes,
    /// cancelled_write_bytes.
    pub io: [u64; 7],
}

/// Block requests issued (block_rq_issue) while a thread of the target was current
/// (map `BLK`, key = tid), cumulative since attach.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    pub read_bytes: u64,
    pub read_ops: u64,
    pub write_bytes: u64,
    pub write_ops: u64,
}

/// Value of map `SLOTS`: one followed thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadSlot {
    /// Kernel address of the thread's task_struct (read with bpf_probe_read_kernel only
    /// while the slot is live: sched_process_exit marks it before the task can be freed).
    pub task: u64,
    pub tid: u32,
    pub state: u32,
    /// Final counters, valid in state `SLOT_EXITED`.
    pub last: ThreadCounters,
}

/// `SnapRecord::kind` values (the first u32 of every ring buffer record).
pub const REC_THREAD: u32 = 1;
/// A thread's last record: it has exited; the counters are those at its exit.
pub const REC_THREAD_EXITED: u32 = 2;
pub const REC_NET: u32 = 3;
/// Ends a snapshot: every record of tick `seq` precedes it.
pub const REC_TICK: u32 = 4;

/// One thread in one snapshot (ring buffer `SNAPS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapRecord {
    pub kind: u32,
    pub tid: u32,
    /// Snapshot tick number from 0 (see `TickRecord`).
    pub seq: u64,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the snapshot began.
    pub ktime_ns: u64,
    pub counters: ThreadCounters,
    pub blk: BlkStats,
}

/// One watched interface in one snapshot, summed over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRecord {
    pub kind: u32,
    /// Interface slot (index of `--net-if` order).
    pub slot: u32,
    pub seq: u64,
    pub ktime_ns: u64,
    pub stats: NetStats,
}

/// The end of one snapshot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickRecord {
    pub kind: u32,
    /// Thread records written for this tick.
    pub threads: u32,
    pub seq: u64,
    pub ktime_ns: u64,
    /// How late this snapshot ran after its scheduled instant (see `TickState`).
    pub late_ns: u64,
    /// Records the ring buffer had no room for, since attach (user space turns a rise
    /// into `gap` events).
    pub lost_records: u64,
    /// Threads of the target that got no slot (all `MAX_SLOTS` taken), since attach.
    pub unslotted: u64,
}

/// Map `TICK` (one element): the snapshot program's schedule.
///
/// The program runs from a perf cpu-clock hrtimer, which fires on a fixed grid from the
/// moment the event was enabled (`enable + k * interval`, re-armed with hrtimer_forward).
/// User space writes the grid's origin into map `GRID` (from the event's own count of
/// enabled ns, to within a read(2), early rather than late: lateness is never
/// understated), and again, aligned to continue the numbering, whenever it has to
/// restart a stalled timer. Should a run come before the grid so estimated, the origin
/// moves back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickState {
    pub last_seq: u64,
    pub runs: u64,
    pub lost_records: u64,
    pub unslotted: u64,
}

/// Load-time settings of the snapshot program (read-only global `SNAP_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapConfig {
    pub interval_ns: u64,
    /// CPUs to sum per-CPU net counters over (possible CPUs, at most `MAX_CPUS`).
    pub ncpus: u32,
    /// Watched interfaces (slots 0..net_ifs of `NET`).
    pub net_ifs: u32,
    /// 1: count wakeups with the sched_wakeup programs (map `WAKEUPS`) where the kernel
    /// keeps no count of its own (`--bpf-wakeups`).
    pub count_wakeups: u32,
    pub _pad: u32,
}

/// Per-interface packet counters (per-CPU array `NET`, index = interface slot), from the
/// interface's own point of view: rx = received by the host on it (for a tap: sent by
/// the guest), tx = transmitted on it (for a tap: towards the guest).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Value of map `NET_IFS`: the interface's slot in `NET`, and the link-layer header
/// length netif_receive_skb's `len` lacks (eth_type_trans has pulled it by then, but the
/// interface's rx_bytes include it): 14 for Ethernet (taps, veth), 0 for L3 tun devices.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetIf {
    pub slot: u32,
    pub rx_header_len: u32,
}

/// Key of map `NET_IFS` (interface name → slot): the name NUL-padded to IFNAMSIZ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfName(pub [u8; IFNAMSIZ]);

impl IfName {
    /// `None` when the name does not fit (an interface name is at most 15 bytes).
    pub fn new(name: &str) -> Option<Self> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) {
            return None;
        }
        let mut out = [0u8; IFNAMSIZ];
        out[..b.len()].copy_from_slice(b);
        Some(Self(out))
    }
}

/// Byte offsets of the fields the programs read, set by user space at load time as the
/// read-only global `OFFSETS`: tracepoint fields from tracefs
/// `events/<category>/<name>/format`, task_struct fields from the kernel's BTF (both
/// differ between kernel versions and configurations; Rust eBPF has no CO-RE).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub blk_bytes: u32,
    pub blk_rwbs: u32,
    pub xmit_len: u32,
    pub xmit_rc: u32,
    /// __data_loc of the device name.
    pub xmit_name: u32,
    pub recv_len: u32,
    pub recv_name: u32,
    /// `pid` in `struct task_struct` (`tgid` follows it: one 8-byte read gives both).
    pub task_pid: u32,
    /// `se.sum_exec_runtime`.
    pub task_sum_exec_runtime: u32,
    /// `se.nr_migrations`.
    pub task_nr_migrations: u32,
    /// `sched_info.pcount` (`run_delay` follows it).
    pub task_pcount: u32,
    /// `nvcsw` (`nivcsw` follows it).
    pub task_nvcsw: u32,
    /// `ioac`: seven consecutive u64 (rchar … cancelled_write_bytes).
    pub task_ioac: u32,
    /// `stats.nr_wakeups`, or 0 when the kernel keeps no wakeup count (no
    /// CONFIG_SCHEDSTATS, or schedstats off).
    pub task_nr_wakeups: u32,
    /// `flags` (PF_EXITING: a thread already exiting is not given a slot).
    pub task_flags: u32,
    pub _pad: u32,
}

impl Offsets {
    /// The layout of Linux 6.18 x86_64 (the kernel side's initial value).
    pub const LINUX_6_18: Offsets = Offsets {
        blk_bytes: 28,
        blk_rwbs: 34,
        xmit_len: 16,
        xmit_rc: 20,
        xmit_name: 24,
        recv_len: 16,
        recv_name: 20,
        task_pid: 1264,
        task_sum_exec_runtime: 232,
        task_nr_migrations: 264,
        task_pcount: 880,
        task_nvcsw: 1640,
        task_ioac: 2584,
        task_nr_wakeups: 0,
        task_flags: 44,
        _pad: 0,
    };
}

impl Default for Offsets {
    fn default() -> Self {
        Self::LINUX_6_18
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: repr(C), Copy, integer fields with explicit padding.
    unsafe impl aya::Pod for super::ThreadSlot {}
    unsafe impl aya::Pod for super::BlkStats {}
    unsafe impl aya::Pod for super::TickState {}
    unsafe impl aya::Pod for super::SnapConfig {}
    unsafe impl aya::Pod for super::NetStats {}
    unsafe impl aya::Pod for super::IfName {}
    unsafe impl aya::Pod for super::NetIf {}
    unsafe impl aya::Pod for super::Offsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_nul_padded_and_bounded() {
        let n = IfName::new("tap0").unwrap();
        assert_eq!(&n.0[..5], b"tap0\0");
        assert!(n.0[4..].iter().all(|&b| b == 0));
        assert!(IfName::new("fifteen-chars-x").is_some());
        assert!(IfName::new("sixteen-chars-xx").is_none());
        assert!(IfName::new("").is_none());
        assert!(IfName::new("a\0b").is_none());
    }

    #[test]
    fn map_types_have_the_layout_the_kernel_side_writes() {
        assert_eq!(core::mem::size_of::<ThreadCounters>(), 14 * 8);
        assert_eq!(core::mem::size_of::<ThreadSlot>(), 16 + 14 * 8);
        assert_eq!(core::mem::size_of::<SnapRecord>(), 24 + 14 * 8 + 4 * 8);
        assert_eq!(core::mem::size_of::<NetRecord>(), 24 + 4 * 8);
        assert_eq!(core::mem::size_of::<TickRecord>(), 6 * 8);
        assert_eq!(core::mem::size_of::<TickState>(), 4 * 8);
        assert_eq!(core::mem::size_of::<NetStats>(), 4 * 8);
        assert_eq!(core::mem::size_of::<NetIf>(), 8);
        assert_eq!(core::mem::size_of::<Offsets>(), 16 * 4);
        // Every record starts with its kind, so user space can tell them apart.
        assert_eq!(core::mem::offset_of!(SnapRecord, kind), 0);
        assert_eq!(core::mem::offset_of!(NetRecord, kind), 0);
        assert_eq!(core::mem::offset_of!(TickRecord, kind), 0);
    }
}
