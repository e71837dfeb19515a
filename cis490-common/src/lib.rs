//! Types shared by the cis490 BPF programs and the user-space loader.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers, because the same bytes
//! are written by the kernel side into BPF maps and read back by user space. Every field
//! is a `u64` or `u32` with explicit padding, so both sides agree on the layout.
#![no_std]

/// Bounds of the maps. QEMU has a few dozen threads; this leaves room for thread churn
/// between two drains (exited entries are removed by user space). Not larger: the batched
/// drain walks every bucket of the hash map, ~13 µs per map per tick at 8192 entries vs
/// ~4.5 µs at 1024 (measured here), which at 1 kHz is most of the tracer's CPU.
pub const MAX_THREADS: u32 = 1024;
/// Interfaces watched by the net programs (`--net-if`, autodetected taps).
pub const MAX_NET_IFS: u32 = 16;
/// Linux IFNAMSIZ: interface names including the NUL.
pub const IFNAMSIZ: usize = 16;

/// `SchedStats::flags`: sched_process_exit fired for the thread; its counters are final
/// once its last switch-out has happened, and user space removes the entry later.
pub const FLAG_EXITED: u32 = 2;

/// Per-thread scheduler counters (map `SCHED`, key = tid). Cumulative since attach.
///
/// on_cpu_ns is the scheduler's own accounting of the task (`se.sum_exec_runtime`, the
/// first field of /proc/<pid>/task/<tid>/schedstat) read from task_struct at each
/// switch-out, minus its value when the thread was first seen (`exec_base_ns`). A thread
/// on a CPU has run `now - running_since_ns` more than on_cpu_ns says: user space adds
/// that at read time (see `SchedStats::on_cpu_at`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Time on CPU as the scheduler accounts it (steal time is not included), up to the
    /// thread's last switch-out.
    pub on_cpu_ns: u64,
    /// Switch-outs while blocking (the kernel's nvcsw).
    pub voluntary_switches: u64,
    /// Switch-outs while still runnable: preempted or yielded (the kernel's nivcsw).
    pub involuntary_switches: u64,
    /// sched_wakeup / sched_wakeup_new of the thread.
    pub wakeups: u64,
    /// Time from becoming runnable (wakeup or preemption) to the next switch-in.
    pub runqueue_wait_ns: u64,
    /// Number of such waits that ended in a switch-in.
    pub runqueue_waits: u64,
    /// sched_migrate_task of the thread.
    pub migrations: u64,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the thread became runnable; 0 when it is
    /// not waiting on a run queue.
    pub enqueued_at_ns: u64,
    /// bpf_ktime_get_ns() of the thread's switch-in while it is on a CPU; 0 while it is
    /// off CPU (and until its first switch-in after attach).
    pub running_since_ns: u64,
    pub exec_base_ns: u64,
    pub flags: u32,
    pub _pad: u32,
}

impl SchedStats {
    /// All zero (`Default` is not const; the kernel side builds entries from this).
    pub const ZERO: SchedStats = SchedStats {
        on_cpu_ns: 0,
        voluntary_switches: 0,
        involuntary_switches: 0,
        wakeups: 0,
        runqueue_wait_ns: 0,
        runqueue_waits: 0,
        migrations: 0,
        enqueued_at_ns: 0,
        running_since_ns: 0,
        exec_base_ns: 0,
        flags: 0,
        _pad: 0,
    };

    /// on_cpu_ns at CLOCK_MONOTONIC `now_ns`, counting the slice a thread on a CPU has run
    /// since its switch-in. `now_ns` should be taken before the map is read: the value is
    /// then never ahead of the thread's true run time (the slice runs to `now_ns` at most)
    /// and catches up at the next read.
    pub fn on_cpu_at(&self, now_ns: u64) -> u64 {
        let running = if self.running_since_ns != 0 {
            now_ns.saturating_sub(self.running_since_ns)
        } else {
            0
        };
        self.on_cpu_ns + running
    }
}

/// The first field of /proc/<pid>/task/<tid>/schedstat (the kernel's sum_exec_runtime),
/// the base of a thread seeded by user space.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Per-thread I/O counters (map `IO`, key = tid). Cumulative since attach.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Sum of positive return values of read, pread64, readv, preadv, preadv2.
    pub read_bytes: u64,
    pub read_ops: u64,
    /// Sum of positive return values of write, pwrite64, writev, pwritev, pwritev2.
    pub write_bytes: u64,
    pub write_ops: u64,
    /// Block requests issued (block_rq_issue) while a thread of the target was current.
    pub blk_read_bytes: u64,
    pub blk_read_ops: u64,
    pub blk_write_bytes: u64,
    pub blk_write_ops: u64,
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
/// differ between kernel versions and configurations).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `ret` of syscalls:sys_exit_*.
    pub sys_exit_ret: u32,
    pub blk_bytes: u32,
    pub blk_rwbs: u32,
    pub xmit_len: u32,
    pub xmit_rc: u32,
    /// __data_loc of the device name.
    pub xmit_name: u32,
    pub recv_len: u32,
    pub recv_name: u32,
    /// Byte offset of `pid` in `struct task_struct` (`tgid` follows it: one 8-byte read
    /// gives both), from the kernel's BTF. The sched programs are raw tracepoints whose
    /// arguments are task pointers.
    pub task_pid: u32,
    /// Byte offset of `se.sum_exec_runtime` in `struct task_struct`.
    pub task_sum_exec_runtime: u32,
}

impl Offsets {
    /// The layout of Linux 6.18 x86_64 (the kernel side's initial value).
    pub const LINUX_6_18: Offsets = Offsets {
        sys_exit_ret: 16,
        blk_bytes: 28,
        blk_rwbs: 34,
        xmit_len: 16,
        xmit_rc: 20,
        xmit_name: 24,
        recv_len: 16,
        recv_name: 20,
        task_pid: 1264,
        task_sum_exec_runtime: 232,
    };
}

impl Default for Offsets {
    fn default() -> Self {
        Self::LINUX_6_18
    }
}

/// Whether a switch-out counts as involuntary (the kernel's nivcsw), from sched_switch's
/// raw arguments: `preempt`, or a task still TASK_RUNNING (0) when it gave up the CPU
/// (a yield). A blocking task has a sleeping state (TASK_INTERRUPTIBLE 1,
/// TASK_UNINTERRUPTIBLE 2, TASK_IDLE kthreads 0x402, TASK_DEAD 0x80 at exit). This is the
/// classic tracepoint's classification: it reports preempt as TASK_REPORT_MAX and
/// TASK_RUNNING as 0.
pub const fn is_involuntary(preempt: bool, prev_state: u32) -> bool {
    preempt || prev_state == 0
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: repr(C), Copy, integer fields with explicit padding.
    unsafe impl aya::Pod for super::SchedStats {}
    unsafe impl aya::Pod for super::IoStats {}
    unsafe impl aya::Pod for super::NetStats {}
    unsafe impl aya::Pod for super::IfName {}
    unsafe impl aya::Pod for super::NetIf {}
    unsafe impl aya::Pod for super::Offsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_state_classification() {
        assert!(is_involuntary(false, 0), "yield: still running");
        assert!(is_involuntary(true, 0), "preempted while running");
        assert!(
            is_involuntary(true, 0x1),
            "preempted before it could block (the state is stale)"
        );
        assert!(!is_involuntary(false, 0x1), "S: interruptible sleep");
        assert!(!is_involuntary(false, 0x2), "D: uninterruptible sleep");
        assert!(!is_involuntary(false, 0x402), "I: idle kthread");
        assert!(
            !is_involuntary(false, 0x80),
            "TASK_DEAD: the final switch-out"
        );
    }

    #[test]
    fn on_cpu_adds_the_running_slice() {
        let mut s = SchedStats {
            on_cpu_ns: 1000,
            ..Default::default()
        };
        assert_eq!(s.on_cpu_at(5000), 1000, "off CPU: nothing to add");
        s.running_since_ns = 4000;
        assert_eq!(s.on_cpu_at(4500), 1500);
        assert_eq!(
            s.on_cpu_at(3000),
            1000,
            "switched in after `now`: nothing yet"
        );
    }

    #[test]
    fn schedstat_first_field_is_the_run_time() {
        assert_eq!(
            parse_schedstat("199938095 1130299253 654\n"),
            Some(199938095)
        );
        assert_eq!(parse_schedstat("x 2 3"), None);
        assert_eq!(parse_schedstat(""), None);
    }

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
        assert_eq!(core::mem::size_of::<SchedStats>(), 10 * 8 + 8);
        assert_eq!(core::mem::size_of::<IoStats>(), 8 * 8);
        assert_eq!(core::mem::size_of::<NetStats>(), 4 * 8);
        assert_eq!(core::mem::size_of::<NetIf>(), 8);
        assert_eq!(core::mem::size_of::<Offsets>(), 10 * 4);
    }
}
