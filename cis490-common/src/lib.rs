//! Types shared by the cis490 BPF programs and the user-space loader.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers, because the same bytes
//! are written by the kernel side into BPF maps and read back by user space. Every field
//! is a `u64` or `u32` with explicit padding, so both sides agree on the layout.
#![no_std]

pub mod flow;
pub mod grid;

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
/// the thread started: the same numbers /proc/<pid>/task/<tid>/{schedstat,stat,status,io}
/// print, read in the kernel without text formatting, plus what the snapshot adds to
/// bring the scheduler's lagging counters up to the snapshot's own instant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounters {
    /// On-CPU time as of the snapshot: `se.sum_exec_runtime` plus, for a thread that is
    /// on a CPU, the slice it has run between the scheduler's last update of that counter
    /// and the snapshot's instant ([`running_slice`], negative when that update came after
    /// the instant).
    pub on_cpu_ns: u64,
    /// `se.sum_exec_runtime` as the kernel holds it (schedstat field 1; what /proc's
    /// utime/stime split is scaled to).
    pub sum_exec_runtime: u64,
    /// `sched_info.pcount` (schedstat field 3): times the thread was put on a CPU.
    pub timeslices_count: u64,
    /// `sched_info.run_delay` (schedstat field 2) plus, for a thread waiting on a run
    /// queue now, the wait so far ([`pending_wait`]).
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
    /// `min_flt`, `maj_flt` (stat fields 10 and 12).
    pub minflt: u64,
    pub majflt: u64,
    /// `utime`, `stime` (ns, tick-sampled) and `prev_cputime.{utime,stime}`: user space
    /// turns them into /proc's stat utime/stime exactly as the kernel does
    /// (cputime_adjust, then clock ticks).
    pub utime_ns: u64,
    pub stime_ns: u64,
    pub prev_utime_ns: u64,
    pub prev_stime_ns: u64,
    /// `__state` (the letter /proc prints is derived from it in user space).
    pub task_state: u32,
    /// `thread_info.cpu`: the CPU the thread runs or last ran on (stat field 39).
    pub cpu: u32,
    /// `on_cpu`: 1 while the thread is on a CPU.
    pub on_cpu: u32,
    /// `EXACT_*` bits: what was added to the kernel's values.
    pub exact: u32,
}

/// `ThreadCounters::exact`: a running slice was added to `on_cpu_ns`.
pub const EXACT_SLICE: u32 = 1;
/// `ThreadCounters::exact`: a pending run-queue wait was added to `runqueue_wait_ns`.
pub const EXACT_WAIT: u32 = 2;

/// Longest running slice or pending wait added (1 s). The scheduler brings a running
/// task's counters up to date at least at every scheduler tick (≤ 10 ms at CONFIG_HZ
/// 100), so anything longer can only be an inconsistent read (clocks of a run queue the
/// task just left): nothing is added then.
pub const MAX_CATCH_UP_NS: u64 = 1_000_000_000;

/// The time a task that is on a CPU has run between the scheduler's last update of its
/// `sum_exec_runtime` and the snapshot's instant: `now − se.exec_start`, with `now` in the
/// domain of exec_start, the run queue's `clock_task` (sched_clock minus IRQ and steal
/// time). `now_sched` is sched_clock (local_clock) at the snapshot; the run queue's
/// `clock`/`clock_task` pair from its last update carries clock_task to it:
/// `clock_task + (now_sched − clock)` (IRQ/steal time since that update, at most one
/// tick, is not subtracted).
///
/// Signed, because the snapshot can reach a task late: when the task's CPU ran its tick
/// after the snapshot's instant (the snapshot's own CPU was interrupted or its vCPU taken
/// by the host between taking `now_sched` and reading the task), `sum_exec_runtime` is
/// already past the instant, and the time run since then is taken back off. That is
/// exact for a task that ran through that time, and for one that got its CPU only after
/// the instant a lower bound, within `clock − now_sched` of the truth. Seen here: single
/// rows 30–320 µs ahead of the thread's own clock before this was signed. 0 when any input
/// is missing or inconsistent.
#[inline(always)]
pub fn running_slice(now_sched: u64, rq_clock: u64, rq_clock_task: u64, exec_start: u64) -> i64 {
    if now_sched == 0 || rq_clock == 0 || exec_start == 0 {
        return 0;
    }
    let since_update = now_sched.wrapping_sub(rq_clock) as i64;
    let ran_before = rq_clock_task.wrapping_sub(exec_start) as i64;
    if since_update.unsigned_abs() > MAX_CATCH_UP_NS || ran_before.unsigned_abs() > MAX_CATCH_UP_NS
    {
        return 0;
    }
    let slice = ran_before + since_update;
    if slice.unsigned_abs() > MAX_CATCH_UP_NS {
        0
    } else {
        slice
    }
}

/// The wait so far of a task queued on a run queue and not yet on a CPU:
/// `now − sched_info.last_queued` (both sched_clock: last_queued is the run queue's
/// `clock` at enqueue; 0 when the task is not queued). 0 when inconsistent.
#[inline(always)]
pub fn pending_wait(now_sched: u64, last_queued: u64) -> u64 {
    if now_sched == 0 || last_queued == 0 || now_sched <= last_queued {
        return 0;
    }
    let w = now_sched - last_queued;
    if w > MAX_CATCH_UP_NS {
        0
    } else {
        w
    }
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
    /// Records the ring buffer had no room for, since attach (reported in `source_error`
    /// events; the snapshots they belonged to are gaps, see `lost_in_snapshot`).
    pub lost_records: u64,
    /// Threads of the target that got no slot (all `MAX_SLOTS` taken), since attach.
    pub unslotted: u64,
    /// The process's resident pages (`mm->rss_stat`: file + anon + shmem, each clamped at
    /// 0 as /proc's VmRSS does), read once per snapshot through a live thread's `mm`;
    /// [`MM_UNKNOWN`] when not read (no live thread, no `mm`, offsets unknown).
    pub mm_rss_pages: u64,
    /// `mm->total_vm` (pages: /proc's VmSize and stat's vsize), or [`MM_UNKNOWN`].
    pub mm_total_vm: u64,
    /// Records of this snapshot the ring buffer had no room for: user space then drops
    /// the snapshot's other records and declares its seq a gap (a tick with some
    /// threads missing would otherwise look complete).
    pub lost_in_snapshot: u64,
}

/// `TickRecord::mm_*` not read.
pub const MM_UNKNOWN: u64 = u64::MAX;

/// The `mm->rss_stat[]` counters /proc's VmRSS sums: MM_FILEPAGES, MM_ANONPAGES and
/// MM_SHMEMPAGES (MM_SWAPENTS, index 2, is not resident).
pub const RSS_COUNTERS: [u32; 3] = [0, 1, 3];

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
    /// sched_clock − CLOCK_MONOTONIC, from the last snapshot whose clock reads were close
    /// together ([`TickState::sched_clock_at`]); 0 until one was.
    pub sched_minus_mono_ns: i64,
}

/// Two CLOCK_MONOTONIC reads around the sched_clock read at most this far apart pair
/// the clocks to within half of it.
pub const CLOCK_PAIR_TIGHT_NS: u64 = 2_000;

impl TickState {
    /// sched_clock at the snapshot's instant `mono_before` (CLOCK_MONOTONIC, the rows'
    /// timestamp). `sched` was read after it and before `mono_after`; an interrupt (or the
    /// host taking the vCPU) between the reads would put `sched` later than the instant
    /// the rows claim, by up to tens of µs seen here. When the reads are close together
    /// the offset between the clocks is measured (and kept); otherwise the last measured
    /// offset carries `mono_before` into sched_clock (the two clocks drift apart by at
    /// most NTP's 500 ppm: 5 µs over the 10 ms between snapshots at 100 Hz). 0 when
    /// `sched` is 0 (unknown).
    #[inline(always)]
    pub fn sched_clock_at(&mut self, mono_before: u64, sched: u64, mono_after: u64) -> u64 {
        if sched == 0 {
            return 0;
        }
        let spread = mono_after.wrapping_sub(mono_before);
        if spread <= CLOCK_PAIR_TIGHT_NS {
            let mid = mono_before + spread / 2;
            self.sched_minus_mono_ns = sched.wrapping_sub(mid) as i64;
        } else if self.sched_minus_mono_ns == 0 {
            return sched;
        }
        mono_before.wrapping_add_signed(self.sched_minus_mono_ns)
    }
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

/// A run of consecutive u64 words of a kernel struct that the snapshot copies with one
/// probe read (each bpf_probe_read_kernel costs a call and a fault-safe copy: one read
/// of 12 words is cheaper than six reads of two). At most [`WINDOW_WORDS`] words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Byte offset of the first word in the struct.
    pub off: u32,
    /// Words to copy (1..=WINDOW_WORDS).
    pub words: u32,
}

/// Longest [`Window`], in u64 words.
pub const WINDOW_WORDS: u32 = 16;

/// Byte offsets of the fields the programs read, set by user space at load time as the
/// read-only global `OFFSETS`: tracepoint fields from tracefs
/// `events/<category>/<name>/format`, kernel struct fields from the kernel's BTF (both
/// differ between kernel versions and configurations; Rust eBPF has no CO-RE).
///
/// The task_struct fields a snapshot reads are grouped in five windows; the `*_at`
/// fields are positions inside a window: word indices, or byte positions for the u32
/// fields of `head`.
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
    /// `flags` (PF_EXITING: a thread already exiting is not given a slot).
    pub task_flags: u32,
    /// `ioac`: seven consecutive u64 (rchar … cancelled_write_bytes).
    pub task_ioac: u32,
    /// `stats.nr_wakeups`, or 0 when the kernel keeps no wakeup count (no
    /// CONFIG_SCHEDSTATS, or schedstats off).
    pub task_nr_wakeups: u32,
    /// task_struct from `thread_info.cpu` to `on_cpu`: byte positions of those and of
    /// `__state` (u32 each).
    pub head: Window,
    pub head_cpu_at: u32,
    pub head_state_at: u32,
    pub head_on_cpu_at: u32,
    /// `se` (sched_entity) from `exec_start` on: word indices of `exec_start`,
    /// `sum_exec_runtime`, `nr_migrations`, `cfs_rq`.
    pub se: Window,
    pub se_exec_start_at: u32,
    pub se_sum_exec_runtime_at: u32,
    pub se_nr_migrations_at: u32,
    pub se_cfs_rq_at: u32,
    /// `sched_info` from `pcount` to `last_queued`.
    pub sched_info: Window,
    pub si_pcount_at: u32,
    pub si_run_delay_at: u32,
    pub si_last_queued_at: u32,
    /// task_struct from `utime` to `maj_flt` (utime, stime, prev_cputime, nvcsw, nivcsw,
    /// min_flt, maj_flt).
    pub times: Window,
    pub tm_utime_at: u32,
    pub tm_stime_at: u32,
    pub tm_prev_utime_at: u32,
    pub tm_prev_stime_at: u32,
    pub tm_nvcsw_at: u32,
    pub tm_nivcsw_at: u32,
    pub tm_min_flt_at: u32,
    pub tm_maj_flt_at: u32,
    /// `rq` in `struct cfs_rq` (the run queue a running task's clocks come from); 0: no
    /// running slice is added (a kernel without CONFIG_FAIR_GROUP_SCHED).
    pub cfs_rq_rq: u32,
    /// `struct rq` from `clock` to `clock_task`; word index of `clock_task`.
    pub rq_clocks: Window,
    pub rq_clock_task_at: u32,
    /// `event` in the perf program's real context (`struct bpf_perf_event_data_kern`),
    /// and `hw.prev_count` in `struct perf_event`: the cpu-clock event's local_clock()
    /// at its latest update (the snapshot's sched_clock "now"). 0: none.
    pub perf_ctx_event: u32,
    pub perf_event_prev_count: u32,
    /// `mm` in task_struct; 0: the process row's rss_kb and vsize_bytes are not read.
    pub task_mm: u32,
    /// `total_vm` and `rss_stat` in mm_struct (both inside an anonymous struct there).
    pub mm_total_vm: u32,
    pub mm_rss_stat: u32,
    /// `rss_stat[]`'s element: its size and where its s64 `count` is (a `struct
    /// percpu_counter` since Linux 6.2, whose `count` is what /proc reads).
    pub rss_counter_size: u32,
    pub rss_counter_count: u32,
}

const fn win(off: u32, words: u32) -> Window {
    Window { off, words }
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
        task_flags: 44,
        task_ioac: 2152,
        task_nr_wakeups: 0,
        head: win(16, 5),
        head_cpu_at: 4,
        head_state_at: 8,
        head_on_cpu_at: 36,
        se: win(224, 10),
        se_exec_start_at: 0,
        se_sum_exec_runtime_at: 1,
        se_nr_migrations_at: 6,
        se_cfs_rq_at: 9,
        sched_info: win(1008, 6),
        si_pcount_at: 0,
        si_run_delay_at: 1,
        si_last_queued_at: 5,
        times: win(1488, 12),
        tm_utime_at: 0,
        tm_stime_at: 1,
        tm_prev_utime_at: 3,
        tm_prev_stime_at: 4,
        tm_nvcsw_at: 6,
        tm_nivcsw_at: 7,
        tm_min_flt_at: 10,
        tm_maj_flt_at: 11,
        cfs_rq_rq: 312,
        rq_clocks: win(2776, 6),
        rq_clock_task_at: 5,
        perf_ctx_event: 16,
        perf_event_prev_count: 504,
        task_mm: 1136,
        mm_total_vm: 368,
        mm_rss_stat: 968,
        rss_counter_size: 40,
        rss_counter_count: 8,
    };
}

impl Default for Offsets {
    fn default() -> Self {
        Self::LINUX_6_18
    }
}

// ---------------------------------------------------------------------------------------
// KVM: per-vCPU-thread counts of VM exits by kind and key (map `KVM_COUNTS`).

/// What a `KVM_COUNTS` entry counts. The numbers are part of the map's key: user space
/// turns them into the `kvm` columns and the `kvm-keys` kinds (cis490/src/kvm).
pub const KVM_EXIT_REASON: u32 = 1;
pub const KVM_USERSPACE_EXIT: u32 = 2;
pub const KVM_PIO_READ: u32 = 3;
pub const KVM_PIO_WRITE: u32 = 4;
pub const KVM_MMIO_READ: u32 = 5;
pub const KVM_MMIO_WRITE: u32 = 6;
pub const KVM_FAST_MMIO: u32 = 7;
pub const KVM_MSR_READ: u32 = 8;
pub const KVM_MSR_WRITE: u32 = 9;
pub const KVM_CPUID: u32 = 10;
pub const KVM_HYPERCALL: u32 = 11;
pub const KVM_EMULATED_INSN: u32 = 12;
pub const KVM_EMULATION_FAILED: u32 = 13;
pub const KVM_HALT_WAKEUP: u32 = 14;
/// One past the highest kind.
pub const KVM_KINDS: u32 = 15;

/// Entries of `KVM_COUNTS`: (thread, tick, kind, key) triples alive at once. User space
/// removes an entry once its tick is drained (20 times a second), so this bounds the
/// distinct keys of about 50 ms of exits; past it, counts go to the kind's
/// [`KVM_KEY_OTHER`] entry, and past that to `KVM_LOST`.
pub const MAX_KVM_KEYS: u32 = 16384;

/// The key of a count whose own key found the table full: the kind's total stays exact,
/// the key is lost (counted in `kvm-keys` as key null and in meta.sources[kvm]). Such
/// counts go to their own table, `KVM_OTHER`, keyed by (thread, tick, kind) only: a guest
/// can fill `KVM_COUNTS` with keys of its choosing, but not this one.
pub const KVM_KEY_OTHER: u64 = u64::MAX;

/// Entries of `KVM_OTHER`: threads × kinds × ticks between two drains (8 vCPU threads ×
/// 14 kinds × 50 ticks at 1 kHz is 5,600).
pub const MAX_KVM_OTHER: u32 = 8192;

/// `key` of a `KVM_USERSPACE_EXIT` whose errno was negative (the run was interrupted or
/// failed): this bit plus the errno's magnitude, instead of the exit reason.
pub const KVM_USERSPACE_ERRNO: u64 = 1 << 32;

/// A `KVM_COUNTS` key. `epoch` is the seq of the snapshot tick the event belongs to: the
/// snapshot program sets `TICK_EPOCH` to its own seq + 1 when it runs, so every event
/// between two snapshots is counted under the later one's seq and user space can give
/// each tick exactly its own events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvmKey {
    pub tid: u32,
    pub kind: u32,
    pub epoch: u64,
    pub key: u64,
}

/// Field offsets of the KVM tracepoint records the kvm programs read (from this kernel's
/// format files). Only `kvm_exit` is read as a record: the other programs are raw
/// tracepoints, which take the arguments themselves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmOffsets {
    pub exit_reason: u32,
    pub _pad: u32,
}

impl KvmOffsets {
    /// Linux 6.18 x86_64 (the loader reads the running kernel's own).
    pub const LINUX_6_18: Self = Self {
        exit_reason: 8,
        _pad: 0,
    };
}

/// `kvm_mmio`'s `type`: a read (satisfied) and a write. KVM_TRACE_MMIO_UNSATISFIED_READ
/// (0) is the first half of a read that goes to user space; its second half is a read,
/// so only 1 and 2 are counted.
pub const KVM_TRACE_MMIO_READ: u32 = 1;
pub const KVM_TRACE_MMIO_WRITE: u32 = 2;

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
    unsafe impl aya::Pod for super::Window {}
    unsafe impl aya::Pod for super::KvmKey {}
    unsafe impl aya::Pod for super::flow::FlowKey {}
    unsafe impl aya::Pod for super::flow::FlowDeltaKey {}
    unsafe impl aya::Pod for super::flow::FlowDelta {}
    unsafe impl aya::Pod for super::flow::FlowIfKey {}
    unsafe impl aya::Pod for super::flow::FlowIfStats {}
    unsafe impl aya::Pod for super::flow::DnsRecord {}
    unsafe impl aya::Pod for super::flow::FlowIfSlot {}
    unsafe impl aya::Pod for super::KvmOffsets {}
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
        // 8 counters, io[7], minflt, majflt, 4 cputimes, then four u32.
        assert_eq!(core::mem::size_of::<ThreadCounters>(), 23 * 8);
        assert_eq!(core::mem::size_of::<ThreadSlot>(), 16 + 23 * 8);
        assert_eq!(core::mem::size_of::<SnapRecord>(), 24 + 23 * 8 + 4 * 8);
        assert_eq!(core::mem::size_of::<NetRecord>(), 24 + 4 * 8);
        assert_eq!(core::mem::size_of::<TickRecord>(), 9 * 8);
        assert_eq!(core::mem::size_of::<TickState>(), 5 * 8);
        assert_eq!(core::mem::size_of::<NetStats>(), 4 * 8);
        assert_eq!(core::mem::size_of::<NetIf>(), 8);
        assert_eq!(core::mem::size_of::<Offsets>(), 48 * 4);
        assert_eq!(core::mem::size_of::<Window>(), 8);
        assert_eq!(core::mem::size_of::<KvmKey>(), 24);
        assert_eq!(core::mem::size_of::<KvmOffsets>(), 2 * 4);
        // The snapshot reads these by field; user space by the same struct.
        use core::mem::offset_of;
        assert_eq!(offset_of!(ThreadCounters, on_cpu_ns), 0);
        assert_eq!(offset_of!(ThreadCounters, sum_exec_runtime), 8);
        assert_eq!(offset_of!(ThreadCounters, io), 8 * 8);
        assert_eq!(offset_of!(ThreadCounters, minflt), 15 * 8);
        assert_eq!(offset_of!(ThreadCounters, majflt), 16 * 8);
        assert_eq!(offset_of!(ThreadCounters, utime_ns), 17 * 8);
        assert_eq!(offset_of!(ThreadCounters, prev_stime_ns), 20 * 8);
        assert_eq!(offset_of!(ThreadCounters, task_state), 21 * 8);
        assert_eq!(offset_of!(ThreadCounters, cpu), 21 * 8 + 4);
        assert_eq!(offset_of!(ThreadCounters, on_cpu), 22 * 8);
        assert_eq!(offset_of!(ThreadCounters, exact), 22 * 8 + 4);
        assert_eq!(offset_of!(SnapRecord, counters), 24);
        assert_eq!(offset_of!(Offsets, head), 11 * 4);
        assert_eq!(offset_of!(Offsets, se), 16 * 4);
        assert_eq!(offset_of!(Offsets, rq_clocks), 38 * 4);
        assert_eq!(offset_of!(Offsets, perf_event_prev_count), 42 * 4);
        assert_eq!(offset_of!(Offsets, task_mm), 43 * 4);
        assert_eq!(offset_of!(Offsets, rss_counter_count), 47 * 4);
        assert_eq!(offset_of!(TickRecord, unslotted), 5 * 8);
        assert_eq!(offset_of!(TickRecord, mm_rss_pages), 6 * 8);
        assert_eq!(offset_of!(TickRecord, mm_total_vm), 7 * 8);
        // Every record starts with its kind, so user space can tell them apart.
        assert_eq!(core::mem::offset_of!(SnapRecord, kind), 0);
        assert_eq!(core::mem::offset_of!(NetRecord, kind), 0);
        assert_eq!(core::mem::offset_of!(TickRecord, kind), 0);
    }

    #[test]
    fn a_running_slice_is_carried_forward_in_the_run_queues_task_clock() {
        // rq updated at sched_clock 1_000 (clock_task 900: 100 ns of steal so far); the
        // task's exec_start is that update; now is 1_400.
        assert_eq!(running_slice(1_400, 1_000, 900, 900), 400);
        // exec_start after the rq update (set at the switch-in with a later clock_task).
        assert_eq!(running_slice(1_400, 1_000, 900, 950), 350);
        // The task ran 100 ns between exec_start and the rq's update, 300 ns since.
        assert_eq!(running_slice(1_300, 1_000, 900, 800), 400);
    }

    #[test]
    fn a_task_read_after_its_cpus_tick_passed_the_snapshot_is_taken_back_to_it() {
        // The snapshot's instant is sched_clock 900; its CPU was held up, and before it
        // read the task the task's CPU ticked at 1_000 (clock_task 1_000) and brought
        // sum_exec_runtime up to then (exec_start = 1_000): 100 ns too many.
        assert_eq!(running_slice(900, 1_000, 1_000, 1_000), -100);
        // The tick was at 1_000, the task ran on 50 ns after it: still 100 ns back.
        assert_eq!(running_slice(900, 1_000, 1_000, 950), -50);
        // exec_start set by the switch-in at clock_task 2_000, after the snapshot (now_task
        // 1_300): the task's runtime then was 700 ns less (a lower bound if it was not
        // running at the instant).
        assert_eq!(running_slice(1_400, 1_000, 900, 2_000), -700);
    }

    #[test]
    fn the_snapshots_sched_clock_is_taken_at_its_monotonic_instant() {
        let mut st = TickState::default();
        // Tight reads (1 µs apart): the offset is measured at their middle.
        assert_eq!(st.sched_clock_at(10_000, 50_700, 11_000), 50_200);
        assert_eq!(st.sched_minus_mono_ns, 40_200);
        // 30 µs between the reads: sched (read late) is not used, the kept offset is.
        assert_eq!(
            st.sched_clock_at(1_010_000, 1_080_000, 1_040_000),
            1_050_200
        );
        assert_eq!(
            st.sched_minus_mono_ns, 40_200,
            "a loose pair measures nothing"
        );
        // No offset yet: the read as it is.
        let mut fresh = TickState::default();
        assert_eq!(fresh.sched_clock_at(10_000, 80_000, 40_000), 80_000);
        // sched_clock unknown stays unknown.
        assert_eq!(st.sched_clock_at(10_000, 0, 10_100), 0);
        // A negative offset (sched_clock behind CLOCK_MONOTONIC).
        let mut behind = TickState::default();
        assert_eq!(behind.sched_clock_at(100_000, 60_500, 101_000), 60_000);
        assert_eq!(behind.sched_minus_mono_ns, -40_000);
    }

    #[test]
    fn missing_or_inconsistent_clocks_add_nothing() {
        assert_eq!(running_slice(0, 1_000, 900, 900), 0, "no sched_clock now");
        assert_eq!(running_slice(1_400, 0, 0, 900), 0, "no run queue read");
        assert_eq!(running_slice(1_400, 1_000, 900, 0), 0, "no exec_start");
        let far = 1_000 + MAX_CATCH_UP_NS + 1;
        assert_eq!(
            running_slice(far + 900, 1_000, 900, 900),
            0,
            "a slice over 1 s"
        );
        assert_eq!(
            running_slice(1_000, far + 1_000, far + 1_000, far + 1_000),
            0,
            "a run queue updated over 1 s after the snapshot"
        );
        assert_eq!(pending_wait(5_000, 3_000), 2_000);
        assert_eq!(pending_wait(5_000, 0), 0, "not queued");
        assert_eq!(pending_wait(0, 3_000), 0, "no sched_clock now");
        assert_eq!(pending_wait(3_000, 5_000), 0, "queued after now");
        assert_eq!(pending_wait(MAX_CATCH_UP_NS + 10, 5), 0, "a wait over 1 s");
    }
}
