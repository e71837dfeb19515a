//! The declarations: one [`Stream`] per file cis490 writes. Order of columns is the order
//! the writers emit them.

use super::ColumnType::{Bool, Dict, Float64, Int64, UInt64, Utf8};
use super::{Column as C, Family as F, Stream, StreamKind, TypeRule};

const T_MONO: C = C::new(
    "t_mono_ns",
    UInt64,
    "ns",
    "CLOCK_MONOTONIC when the value was read, minus meta.clock.mono_origin_ns",
);
const T_WALL: C = C::new(
    "t_wall_ns",
    UInt64,
    "ns since the Unix epoch",
    "CLOCK_REALTIME read with t_mono_ns",
);
const AVAILABLE: C = C::new(
    "available_in_deployment",
    Bool,
    "",
    "whether a deployed detector could see this data (the same in every row of a stream)",
);
const SEQ: C = C::new(
    "seq",
    UInt64,
    "tick",
    "tick number of the sampler that produced the row, from 0; a missed tick is a gap",
);
const TID: C = C::new(
    "tid",
    UInt64,
    "",
    "host thread id; null on the process-total row",
)
.nullable();
const VCPU: C = C::new(
    "vcpu",
    UInt64,
    "",
    "vCPU index of the thread (QMP query-cpus-fast); null for other threads, or before QMP answered, or without QMP",
)
.nullable();

const fn source(name: &'static [&'static str]) -> C {
    C::new("source", Dict, "", "the stream's source name").values(name)
}

/// A cumulative count (never decreases for one thread, interface or device).
const fn counter(name: &'static str, unit: &'static str, description: &'static str) -> C {
    C::new(name, UInt64, unit, description)
        .nullable()
        .cumulative()
}

/// A value as of the row (a level, not a count): no difference is derived from it.
const fn gauge(name: &'static str, unit: &'static str, description: &'static str) -> C {
    C::new(name, UInt64, unit, description).nullable()
}

/// The task io counters, proc's and bpf-io's (the kernel's struct task_io_accounting).
macro_rules! task_io {
    () => {
        [
            counter(
                "rchar",
                "bytes",
                "bytes read by syscalls (read, pread, …); null when io is unreadable",
            ),
            counter("wchar", "bytes", "bytes written by syscalls"),
            counter("syscr", "count", "read syscalls"),
            counter("syscw", "count", "write syscalls"),
            counter(
                "read_bytes",
                "bytes",
                "bytes the storage layer fetched for the task",
            ),
            counter(
                "write_bytes",
                "bytes",
                "bytes the task caused to be sent to storage",
            ),
            counter(
                "cancelled_write_bytes",
                "bytes",
                "written bytes whose writeback was cancelled (truncated)",
            ),
        ]
    };
}

const PROC_SOURCE: &[&str] = &["proc"];
const PROC_IO: [C; 7] = task_io!();

const PROC: &[C] = &[
    T_MONO,
    T_WALL,
    source(PROC_SOURCE),
    AVAILABLE,
    SEQ,
    TID,
    C::new(
        "comm",
        Dict,
        "",
        "thread name (process name on the total row)",
    ),
    VCPU,
    C::new(
        "state",
        Dict,
        "one letter",
        "task state from stat (R, S, D, Z, …); the main thread's on the total row",
    ),
    C::new(
        "utime_ticks",
        UInt64,
        "USER_HZ ticks",
        "user CPU time, stat field 14",
    )
    .cumulative(),
    C::new(
        "stime_ticks",
        UInt64,
        "USER_HZ ticks",
        "system CPU time, stat field 15",
    )
    .cumulative(),
    C::new(
        "minflt",
        UInt64,
        "count",
        "minor page faults, stat field 10",
    )
    .cumulative(),
    C::new(
        "majflt",
        UInt64,
        "count",
        "major page faults, stat field 12",
    )
    .cumulative(),
    gauge(
        "last_cpu",
        "CPU index",
        "CPU the task last ran on, stat field 39",
    ),
    PROC_IO[0],
    PROC_IO[1],
    PROC_IO[2],
    PROC_IO[3],
    PROC_IO[4],
    PROC_IO[5],
    PROC_IO[6],
    counter(
        "on_cpu_ns",
        "ns",
        "time on a CPU, schedstat field 1 (total row: sum over every thread seen)",
    ),
    counter(
        "runqueue_wait_ns",
        "ns",
        "time runnable but waiting for a CPU, schedstat field 2",
    ),
    counter(
        "timeslices_count",
        "count",
        "timeslices run, schedstat field 3",
    ),
    counter(
        "voluntary_switches",
        "count",
        "status voluntary_ctxt_switches",
    ),
    counter(
        "involuntary_switches",
        "count",
        "status nonvoluntary_ctxt_switches",
    ),
    gauge(
        "rss_kb",
        "KiB",
        "resident set (status VmRSS); total row only, null on thread rows",
    ),
    gauge(
        "vsize_bytes",
        "bytes",
        "virtual size, stat field 23; total row only",
    ),
    gauge(
        "num_threads",
        "count",
        "threads of the process, stat field 20; total row only",
    ),
];

const SCHED_SOURCE: &[&str] = &["bpf-sched"];
const BPF_COMM: C = C::new(
    "comm",
    Dict,
    "",
    "thread name from /proc (process name on the total row); null when the thread was gone before its name was read",
)
.nullable();

const BPF_SCHED: &[C] = &[
    T_MONO,
    T_WALL,
    source(SCHED_SOURCE),
    AVAILABLE,
    SEQ,
    TID,
    BPF_COMM,
    VCPU,
    counter(
        "on_cpu_ns",
        "ns",
        "se.sum_exec_runtime (= proc's on_cpu_ns)",
    ),
    counter(
        "voluntary_switches",
        "count",
        "nvcsw (= proc's voluntary_switches)",
    ),
    counter(
        "involuntary_switches",
        "count",
        "nivcsw (= proc's involuntary_switches)",
    ),
    counter(
        "wakeups",
        "count",
        "wakeups (schedstats, or counted since attach); null when not counted",
    ),
    counter(
        "runqueue_wait_ns",
        "ns",
        "sched_info.run_delay (= proc's runqueue_wait_ns)",
    ),
    counter(
        "timeslices_count",
        "count",
        "sched_info.pcount (= proc's timeslices_count)",
    ),
    counter("migrations", "count", "se.nr_migrations"),
    counter(
        "minflt",
        "count",
        "min_flt (= proc's minflt); process row: sum over the threads seen since attach",
    ),
    counter(
        "majflt",
        "count",
        "maj_flt (= proc's majflt); process row: sum over the threads seen since attach",
    ),
    counter(
        "utime_ticks",
        "USER_HZ ticks",
        "utime after the kernel's cputime_adjust (= proc's utime_ticks)",
    ),
    counter(
        "stime_ticks",
        "USER_HZ ticks",
        "stime after the kernel's cputime_adjust (= proc's stime_ticks)",
    ),
    C::new(
        "state",
        Dict,
        "one letter",
        "task state, the letter proc prints; process row: the main thread's, null once it ended",
    )
    .nullable(),
    C::new(
        "last_cpu",
        UInt64,
        "CPU index",
        "CPU the thread last ran on (= proc's last_cpu); process row: the main thread's",
    )
    .nullable(),
    gauge(
        "num_threads",
        "count",
        "process row only: threads in the snapshot (= proc's num_threads up to 512 threads); null on thread rows",
    ),
    gauge(
        "rss_kb",
        "KiB",
        "process row only: mm->rss_stat file + anon + shmem pages (their global counts; within the per-CPU batch of VmRSS, docs/data-model.md); null on thread rows",
    ),
    gauge(
        "vsize_bytes",
        "bytes",
        "process row only: mm->total_vm x page size (= proc's vsize_bytes); null on thread rows",
    ),
];

const IO_SOURCE: &[&str] = &["bpf-io"];
const BPF_IO_TASK: [C; 7] = task_io!();

const BPF_IO: &[C] = &[
    T_MONO,
    T_WALL,
    source(IO_SOURCE),
    AVAILABLE,
    SEQ,
    TID,
    BPF_COMM,
    VCPU,
    BPF_IO_TASK[0],
    BPF_IO_TASK[1],
    BPF_IO_TASK[2],
    BPF_IO_TASK[3],
    BPF_IO_TASK[4],
    BPF_IO_TASK[5],
    BPF_IO_TASK[6],
    counter(
        "blk_read_bytes",
        "bytes",
        "block read requests issued in the thread's context, since attach",
    ),
    counter(
        "blk_write_bytes",
        "bytes",
        "block write requests, since attach",
    ),
    counter("blk_read_ops", "count", "block read requests, since attach"),
    counter(
        "blk_write_ops",
        "count",
        "block write requests, since attach",
    ),
];

const NET_SOURCE: &[&str] = &["net"];
const NET: &[C] = &[
    T_MONO,
    T_WALL,
    source(NET_SOURCE),
    AVAILABLE,
    SEQ,
    C::new("ifname", Dict, "", "interface name (the VM's tap)"),
    counter(
        "rx_bytes",
        "bytes",
        "received by the interface (tap rx = sent by the guest); null when unreadable",
    ),
    counter("rx_packets", "count", "packets received"),
    counter("tx_bytes", "bytes", "bytes sent by the interface"),
    counter("tx_packets", "count", "packets sent"),
];

const QMP_SOURCE: &[&str] = &["qmp"];
const VM: &[&str] = &["vm"];
const VCPU_KIND: &[&str] = &["vcpu"];
const BLOCK: &[&str] = &["block"];
const STATS_KINDS: &[&str] = &["vm", "vcpu"];

const fn block(name: &'static str, unit: &'static str, description: &'static str) -> C {
    C::new(name, UInt64, unit, description)
        .kinds(BLOCK, true)
        .cumulative()
}

const QMP: &[C] = &[
    T_MONO,
    T_WALL,
    source(QMP_SOURCE),
    AVAILABLE,
    C::new("seq", UInt64, "poll", "poll number, from 0"),
    C::new(
        "tid",
        UInt64,
        "",
        "host thread id of the vCPU (vcpu rows); null otherwise",
    )
    .nullable(),
    C::new("comm", Dict, "", "always null (QMP names no threads)").nullable(),
    C::new("vcpu", UInt64, "", "vCPU index (vcpu rows); null otherwise").nullable(),
    C::new(
        "t_request_mono_ns",
        UInt64,
        "ns",
        "when the row's request was sent, on t_mono_ns's axis (t_mono_ns: its reply read)",
    ),
    C::new(
        "t_sample_mono_ns",
        UInt64,
        "ns",
        "midpoint of request and reply: the best estimate of when QEMU read the values",
    ),
    C::new("rtt_ns", UInt64, "ns", "reply minus request instant"),
    C::new("kind", Dict, "", "which QMP object the row describes").values(&["vm", "vcpu", "block"]),
    C::new(
        "run_status",
        Dict,
        "",
        "query-status status (running, paused, …); absent when query-status failed",
    )
    .kinds(VM, false),
    C::new("running", Bool, "", "query-status running").kinds(VM, false),
    C::new("qom_path", Utf8, "", "the vCPU's QOM path from query-stats")
        .nullable()
        .kinds(VCPU_KIND, true),
    C::new(
        "device",
        Dict,
        "",
        "drive name, else the qdev id, else the node name",
    )
    .kinds(BLOCK, true),
    C::new("qdev", Utf8, "", "qdev path of the device")
        .nullable()
        .kinds(BLOCK, true),
    C::new("node_name", Utf8, "", "block node name")
        .nullable()
        .kinds(BLOCK, true),
    block("read_bytes", "bytes", "rd_bytes"),
    block("write_bytes", "bytes", "wr_bytes"),
    block("read_ops", "count", "rd_operations"),
    block("write_ops", "count", "wr_operations"),
    block("flush_ops", "count", "flush_operations"),
    block("unmap_ops", "count", "unmap_operations"),
    block("unmap_bytes", "bytes", "unmap_bytes"),
    block("read_merged_ops", "count", "rd_merged"),
    block("write_merged_ops", "count", "wr_merged"),
    block("read_time_ns", "ns", "rd_total_time_ns"),
    block("write_time_ns", "ns", "wr_total_time_ns"),
    block("flush_time_ns", "ns", "flush_total_time_ns"),
    block("failed_read_ops", "count", "failed_rd_operations"),
    block("failed_write_ops", "count", "failed_wr_operations"),
    block("failed_flush_ops", "count", "failed_flush_operations"),
    block("invalid_read_ops", "count", "invalid_rd_operations"),
    block("invalid_write_ops", "count", "invalid_wr_operations"),
    C::new(
        "write_highest_offset_bytes",
        UInt64,
        "bytes",
        "wr_highest_offset",
    )
    .kinds(BLOCK, true),
    C::new(
        "idle_time_ns",
        UInt64,
        "ns",
        "idle_time_ns; null until the device did I/O",
    )
    .nullable()
    .kinds(BLOCK, true),
];

const QMP_FAMILIES: &[F] = &[
    F::new(
        "*_buckets",
        TypeRule::Exact(Utf8),
        "",
        "a histogram statistic's buckets, comma-separated (lossless; the bucket count varies between kernels)",
    )
    .kinds(STATS_KINDS),
    F::new(
        "*_hist_count",
        TypeRule::Exact(UInt64),
        "count",
        "a histogram statistic's sum of buckets",
    )
    .kinds(STATS_KINDS),
    F::new(
        "kvm_*",
        TypeRule::OneOf(&[UInt64, Bool]),
        "as named",
        "`<provider>_<stat>` for every statistic query-stats returns (names sanitized to [a-z0-9_]); a statistic is an integer or a boolean, the same in every row",
    )
    .kinds(STATS_KINDS),
    F::new(
        "cryptodev_*",
        TypeRule::OneOf(&[UInt64, Bool]),
        "as named",
        "the cryptodev provider's statistics, as kvm_*",
    )
    .kinds(STATS_KINDS),
];

const AGENT_SOURCE: &[&str] = &["agent"];

const fn guest(
    name: &'static str,
    ty: super::ColumnType,
    unit: &'static str,
    d: &'static str,
) -> C {
    C::new(name, ty, unit, d).nullable().optional()
}

const AGENT: &[C] = &[
    T_MONO,
    T_WALL,
    source(AGENT_SOURCE),
    AVAILABLE,
    C::new("seq", UInt64, "line", "accepted line number, from 0"),
    C::new(
        "t_sample_mono_ns",
        Int64,
        "ns",
        "the guest's sampling instant mapped onto t_mono_ns's axis (guest clock offset and drift estimated from the lines' own timestamps; negative when sampled before the episode began; null for the first lines after a connect)",
    )
    .nullable(),
    guest("guest_seq", UInt64, "tick", "the agent's own tick number"),
    guest(
        "guest_t_guest_ns",
        UInt64,
        "ns since the Unix epoch",
        "the guest's CLOCK_REALTIME when it sampled",
    ),
    guest(
        "guest_mono_ns",
        UInt64,
        "ns",
        "the guest's CLOCK_MONOTONIC when it sampled",
    ),
    guest("guest_uptime_s", Float64, "s", "guest uptime"),
    guest(
        "guest_loadavg",
        Utf8,
        "",
        "/proc/loadavg as the guest printed it",
    ),
    guest("guest_load1", Float64, "", "1-minute load average"),
    guest("guest_load5", Float64, "", "5-minute load average"),
    guest("guest_load15", Float64, "", "15-minute load average"),
    guest(
        "guest_runnable_count",
        UInt64,
        "count",
        "runnable scheduling entities (loadavg field 4)",
    ),
    guest(
        "guest_threads_count",
        UInt64,
        "count",
        "scheduling entities (loadavg field 4)",
    ),
    guest(
        "guest_processes_count",
        UInt64,
        "count",
        "live processes (numeric directories of /proc)",
    ),
    guest("guest_ctxt_count", UInt64, "count", "/proc/stat ctxt"),
    guest("guest_forks_count", UInt64, "count", "/proc/stat processes"),
    guest(
        "guest_procs_running_count",
        UInt64,
        "count",
        "/proc/stat procs_running",
    ),
    guest(
        "guest_procs_blocked_count",
        UInt64,
        "count",
        "/proc/stat procs_blocked",
    ),
    guest(
        "guest_agent_cpu_ns",
        UInt64,
        "ns",
        "the agent's own on-CPU time",
    ),
];

const AGENT_FAMILIES: &[F] = &[
    F::new(
        "guest_meminfo_*_kb",
        TypeRule::Exact(UInt64),
        "KiB",
        "/proc/meminfo: total, free, avail, buffers, cached, dirty",
    ),
    F::new(
        "guest_cpu_*_ns",
        TypeRule::Exact(UInt64),
        "ns",
        "/proc/stat cpu line: user, nice, system, idle, iowait, irq, softirq, steal",
    ),
    F::new(
        "guest_net_*_bytes",
        TypeRule::Exact(UInt64),
        "bytes",
        "per guest interface (not lo): guest_net_<if>_{rx,tx}_bytes",
    ),
    F::new(
        "guest_net_*_packets",
        TypeRule::Exact(UInt64),
        "count",
        "per guest interface: guest_net_<if>_{rx,tx}_packets",
    ),
    F::new(
        "guest_disk_*_ops",
        TypeRule::Exact(UInt64),
        "count",
        "per whole disk: guest_disk_<dev>_{read,write}_ops",
    ),
    F::new(
        "guest_disk_*_bytes",
        TypeRule::Exact(UInt64),
        "bytes",
        "per whole disk: guest_disk_<dev>_{read,write}_bytes",
    ),
    F::new(
        "guest_disk_*_io_ms",
        TypeRule::Exact(UInt64),
        "ms",
        "per whole disk: time spent doing I/O",
    ),
    F::new(
        "guest_*",
        TypeRule::OneOf(&[Int64, UInt64, Float64, Bool, Utf8]),
        "",
        "any other field a guest sent (flattened, sanitized); each column keeps one type in a file, integers and floats mixed are Float64",
    ),
];

const EVENTS: &[C] = &[
    T_MONO,
    T_WALL,
    C::new(
        "event",
        Dict,
        "",
        "the event kind; its other fields are listed per kind below",
    ),
];

const LABELS: &[C] = &[
    T_MONO,
    T_WALL,
    C::new("phase", Dict, "", "the phase from this instant on").values(&super::PHASE_NAMES),
    C::new("prev", Dict, "", "the phase before; null on the first row")
        .nullable()
        .values(&super::PHASE_NAMES),
    C::new(
        "reason",
        Utf8,
        "",
        "why (episode_start on the first row, else what `cis490 mark` was given)",
    )
    .nullable(),
];

const PERF_SOURCE: &[&str] = &["perf"];

/// A perf_event count of the thread (kernel mode included), cumulative since the source
/// first saw the thread; null where the event could not be opened (meta.sources[perf]).
const fn perf_count(name: &'static str, description: &'static str) -> C {
    counter(name, "count", description)
}

const PERF: &[C] = &[
    T_MONO,
    T_WALL,
    source(PERF_SOURCE),
    AVAILABLE,
    C::new(
        "seq",
        UInt64,
        "read",
        "read number of the perf source (at --perf-rate-hz), from 0",
    ),
    TID,
    C::new(
        "comm",
        Dict,
        "",
        "thread name when the source first saw the thread (process name on the total row)",
    )
    .nullable(),
    VCPU,
    perf_count("cycles", "CPU cycles (hardware group)"),
    perf_count("instructions", "instructions retired (hardware group)"),
    perf_count("ref_cycles", "reference cycles, not scaled by frequency (hardware group)"),
    perf_count("cache_references", "last-level cache references (hardware group)"),
    perf_count("cache_misses", "last-level cache misses (hardware group)"),
    perf_count("branch_instructions", "branch instructions retired (hardware group)"),
    perf_count("branch_misses", "mispredicted branches (hardware group)"),
    perf_count("page_faults", "page faults, minor and major (software group)"),
    perf_count("context_switches", "context switches (software group)"),
    perf_count("cpu_migrations", "moves to another CPU (software group)"),
    counter(
        "hw_time_enabled_ns",
        "ns",
        "time the hardware group was enabled; a count scaled for multiplexing is count x enabled / running",
    ),
    counter(
        "hw_time_running_ns",
        "ns",
        "time the hardware group was on the PMU (below enabled when multiplexed)",
    ),
    counter("sw_time_enabled_ns", "ns", "time the software group was enabled"),
    counter("sw_time_running_ns", "ns", "time the software group was counting"),
];

const KVM_SOURCE: &[&str] = &["kvm"];

/// A count of the thread's VM exits of one kind, since attach (the process row: all
/// threads').
const fn kvm_count(name: &'static str, description: &'static str) -> C {
    counter(name, "count", description)
}

const KVM: &[C] = &[
    T_MONO,
    T_WALL,
    source(KVM_SOURCE),
    AVAILABLE,
    SEQ,
    TID,
    BPF_COMM,
    VCPU,
    kvm_count(
        "exits",
        "VM exits (kvm:kvm_exit); null on hosts where that tracepoint never fires (not VT-x or AMD-V: meta.sources[kvm].exits says why)",
    ),
    kvm_count(
        "userspace_exits",
        "returns of KVM_RUN to QEMU (kvm:kvm_userspace_exit), interrupted runs included",
    ),
    kvm_count("pio_reads", "port reads (IN) that exited (kvm:kvm_pio)"),
    kvm_count("pio_writes", "port writes (OUT) that exited"),
    kvm_count("mmio_reads", "emulated MMIO reads (kvm:kvm_mmio)"),
    kvm_count("mmio_writes", "emulated MMIO writes"),
    kvm_count(
        "fast_mmio_writes",
        "MMIO writes to an ioeventfd (kvm:kvm_fast_mmio: virtio doorbells)",
    ),
    kvm_count("msr_reads", "RDMSRs that exited (kvm:kvm_msr)"),
    kvm_count("msr_writes", "WRMSRs that exited"),
    kvm_count("cpuid_exits", "CPUIDs (kvm:kvm_cpuid; CPUID always exits)"),
    kvm_count("hypercalls", "hypercalls (kvm:kvm_hypercall)"),
    kvm_count(
        "emulated_insns",
        "instructions KVM emulated (kvm:kvm_emulate_insn)",
    ),
    kvm_count("emulation_failures", "emulations that failed"),
    kvm_count(
        "halt_wakeups",
        "wake-ups of the halted vCPU (kvm:kvm_vcpu_wakeup)",
    ),
];

const KVM_KEYS_SOURCE: &[&str] = &["kvm-keys"];

const KVM_KEYS: &[C] = &[
    T_MONO,
    T_WALL,
    source(KVM_KEYS_SOURCE),
    AVAILABLE,
    SEQ,
    C::new("tid", UInt64, "", "host thread id of the vCPU thread"),
    BPF_COMM,
    VCPU,
    C::new("kind", Dict, "", "what `key` is").values(crate::kvm::KEY_KINDS),
    C::new(
        "key",
        UInt64,
        "",
        "the leaf (cpuid), MSR index (msr_*), port (pio_*), guest-physical page address (mmio_*, fast_mmio), hypercall number, or reason (exit_reason: VMX basic reason or SVM exit code; userspace_exit: KVM_EXIT_*, or 2^32 + errno of an interrupted run); null: exits whose key found the kernel's key table full",
    )
    .nullable(),
    C::new(
        "name",
        Dict,
        "",
        "the key's name where cis490 knows one (exit reasons, common CPUID leaves and MSRs), else null",
    )
    .nullable(),
    C::new(
        "count",
        UInt64,
        "count",
        "exits of this thread with this kind and key, since attach",
    )
    .cumulative(),
];

const FLOW_SOURCE: &[&str] = &["flow"];

/// A count of the interface's packets since attach, from the flow programs.
const fn flow_count(name: &'static str, description: &'static str) -> C {
    C::new(name, UInt64, "count", description).cumulative()
}

const FLOW: &[C] = &[
    T_MONO,
    T_WALL,
    source(FLOW_SOURCE),
    AVAILABLE,
    SEQ,
    C::new("ifname", Dict, "", "interface name (the VM's tap, or --net-if)"),
    flow_count("rx_packets", "packets received (tc ingress)"),
    C::new("rx_bytes", UInt64, "bytes", "bytes received, link-layer headers included").cumulative(),
    flow_count("tx_packets", "packets sent (tc egress)"),
    C::new("tx_bytes", UInt64, "bytes", "bytes sent, link-layer headers included").cumulative(),
    flow_count("tcp_packets", "TCP packets, both directions"),
    flow_count("udp_packets", "UDP packets, both directions"),
    flow_count("icmp_packets", "ICMP and ICMPv6 packets, both directions"),
    flow_count("other_packets", "packets of any other protocol (ARP, other IP protocols, non-IP)"),
    flow_count("tcp_syn", "TCP SYNs without ACK (connection attempts)"),
    flow_count("tcp_synack", "TCP SYN+ACKs"),
    flow_count("tcp_rst", "TCP segments with RST"),
    flow_count("tcp_fin", "TCP segments with FIN"),
    flow_count("flows_new", "flows the kernel saw start (first packet of a 5-tuple in either direction)"),
    C::new("flows_active", UInt64, "count", "flows with a packet in this tick"),
    C::new(
        "distinct_dst_addrs",
        UInt64,
        "count",
        "distinct destination addresses (first direction) of the flows since attach; exact up to 65,536, then it stops and meta.sources[flow].distinct_saturated is true",
    ),
    C::new(
        "distinct_dst_ports",
        UInt64,
        "count",
        "distinct destination ports of the flows since attach (bounded as distinct_dst_addrs)",
    ),
    flow_count("dns_queries", "DNS messages with QR = 0 on UDP or TCP port 53"),
    flow_count("dns_responses", "DNS messages with QR = 1 on UDP or TCP port 53"),
    flow_count(
        "untracked_packets",
        "IP packets counted above but in no flow: the kernel's flow table was full (also a source_error event)",
    ),
    flow_count(
        "dns_dropped",
        "DNS messages counted above but not copied for the dns stream (over 2,000 per second per CPU, or its ring buffer full)",
    ),
];

const DNS_SOURCE: &[&str] = &["dns"];
const DIRECTIONS: &[&str] = &["rx", "tx"];
const TRANSPORTS: &[&str] = &["udp", "tcp"];

const DNS: &[C] = &[
    T_MONO,
    T_WALL,
    source(DNS_SOURCE),
    AVAILABLE,
    C::new("seq", UInt64, "message", "accepted message number, from 0 (t_mono_ns is the packet's own time)"),
    C::new("ifname", Dict, "", "interface name"),
    C::new("direction", Dict, "", "rx (received by the interface) or tx (sent)").values(DIRECTIONS),
    C::new("transport", Dict, "", "udp or tcp").values(TRANSPORTS),
    C::new("src_addr", Utf8, "", "source address"),
    C::new("dst_addr", Utf8, "", "destination address"),
    C::new("src_port", UInt64, "", "source port"),
    C::new("dst_port", UInt64, "", "destination port"),
    C::new("id", UInt64, "", "the message's id (matches a response to its query)"),
    C::new("is_response", Bool, "", "QR bit"),
    C::new("opcode", UInt64, "", "OPCODE (0 = query)"),
    C::new("rcode", UInt64, "", "RCODE (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, …)"),
    C::new("qname", Utf8, "", "the first question's name, lower-cased, no trailing dot; null without a question").nullable(),
    C::new("qtype", UInt64, "", "its type (1 A, 28 AAAA, 16 TXT, …)").nullable(),
    C::new("qtype_name", Dict, "", "the type's name where common, else null").nullable(),
    C::new("answers", Utf8, "", "addresses (A, AAAA) and names (CNAME) of the answer section, comma-separated, at most 32; empty for none"),
    C::new("answers_not_kept", UInt64, "count", "answers beyond those 32"),
];

const FLOWS_SOURCE: &[&str] = &["flows"];

const FLOWS: &[C] = &[
    T_MONO,
    T_WALL,
    source(FLOWS_SOURCE),
    AVAILABLE,
    SEQ,
    C::new("ifname", Dict, "", "interface name"),
    C::new(
        "proto",
        Dict,
        "",
        "tcp, udp, icmp, icmpv6, sctp, or the IP protocol number",
    ),
    C::new("src_addr", Utf8, "", "source address of the flow's first packet (IPv4 or IPv6 text)"),
    C::new("dst_addr", Utf8, "", "destination address of the flow's first packet"),
    C::new("src_port", UInt64, "", "source port of the first packet (0 for ICMP and non-first fragments)"),
    C::new("dst_port", UInt64, "", "destination port of the first packet"),
    C::new("packets_fwd", UInt64, "count", "packets in the first packet's direction, since the flow was first seen").cumulative(),
    C::new("bytes_fwd", UInt64, "bytes", "their bytes, link-layer headers included").cumulative(),
    C::new("packets_rev", UInt64, "count", "packets in the other direction").cumulative(),
    C::new("bytes_rev", UInt64, "bytes", "their bytes").cumulative(),
    C::new("tcp_flags", UInt64, "bit set", "OR of the TCP flags seen (FIN 1, SYN 2, RST 4, PSH 8, ACK 16, URG 32, ECE 64, CWR 128)"),
    C::new("first_seen_ns", UInt64, "ns", "CLOCK_MONOTONIC of the flow's first packet, minus meta.clock.mono_origin_ns (0 if before it)"),
    C::new("last_seen_ns", UInt64, "ns", "CLOCK_MONOTONIC of its latest packet, as first_seen_ns"),
];

pub static STREAMS: &[Stream] = &[
    Stream {
        name: "proc",
        file: "telemetry-proc.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(false),
        written_by: "--backend proc (or auto without BPF)",
        rows: "per tick the process total first (tid null), then one per thread",
        columns: PROC,
        families: &[],
        entity: &["tid"],
        sparse: false,
    },
    Stream {
        name: "bpf-sched",
        file: "telemetry-bpf-sched.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(false),
        written_by: "--backend bpf",
        rows: "one per thread per kernel snapshot, then the process total (tid null)",
        columns: BPF_SCHED,
        families: &[],
        entity: &["tid"],
        sparse: false,
    },
    Stream {
        name: "bpf-io",
        file: "telemetry-bpf-io.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(false),
        written_by: "--backend bpf",
        rows: "one per thread per kernel snapshot, then the process total (tid null)",
        columns: BPF_IO,
        families: &[],
        entity: &["tid"],
        sparse: false,
    },
    Stream {
        name: "net",
        file: "telemetry-net.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(true),
        written_by: "a tap interface found or --net-if (BPF, else sysfs)",
        rows: "one per interface per tick",
        columns: NET,
        families: &[],
        entity: &["ifname"],
        sparse: false,
    },
    Stream {
        name: "flow",
        file: "telemetry-flow.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(true),
        written_by: "the BPF backend on the interfaces `net` watches, unless --no-flow (tc programs)",
        rows: "one per interface per snapshot tick",
        columns: FLOW,
        families: &[],
        entity: &["ifname"],
        sparse: false,
    },
    Stream {
        name: "flows",
        file: "telemetry-flows.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(true),
        written_by: "with `flow`",
        rows: "per snapshot tick one per flow that had a packet in it",
        columns: FLOWS,
        families: &[],
        entity: &["ifname", "proto", "src_addr", "dst_addr", "src_port", "dst_port"],
        sparse: true,
    },
    Stream {
        name: "dns",
        file: "telemetry-dns.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(true),
        written_by: "with `flow` (DNS messages the tc programs copy)",
        rows: "one per DNS message that parses (malformed ones are counted in meta.sources[dns].malformed)",
        columns: DNS,
        families: &[],
        entity: &[],
        sparse: false,
    },
    Stream {
        name: "perf",
        file: "telemetry-perf.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(false),
        written_by: "every capture unless --no-perf (perf_event_open)",
        rows: "per read (--perf-rate-hz) one per thread, then the process total (tid null)",
        columns: PERF,
        families: &[],
        entity: &["tid"],
        sparse: false,
    },
    Stream {
        name: "kvm",
        file: "telemetry-kvm.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(false),
        written_by: "the BPF backend unless --no-kvm (kvm tracepoints; empty when the target is not a KVM VM)",
        rows: "per snapshot tick the process total first (tid null), then one per vCPU thread (every thread that exited to KVM, and QMP's vCPU threads)",
        columns: KVM,
        families: &[],
        entity: &["tid"],
        sparse: false,
    },
    Stream {
        name: "kvm-keys",
        file: "telemetry-kvm-keys.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(false),
        written_by: "with `kvm`",
        rows: "per snapshot tick one per (thread, kind, key) whose count changed in it",
        columns: KVM_KEYS,
        families: &[],
        entity: &["tid", "kind", "key"],
        sparse: true,
    },
    Stream {
        name: "qmp",
        file: "telemetry-qmp.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(false),
        written_by: "a QMP socket (--qmp or found in the QEMU command line)",
        rows: "per poll: one `vm` row, one `vcpu` row per vCPU (KVM), one `block` row per device",
        columns: QMP,
        families: QMP_FAMILIES,
        entity: &["kind", "tid", "device"],
        sparse: false,
    },
    Stream {
        name: "agent",
        file: "telemetry-agent.jsonl",
        kind: StreamKind::Telemetry,
        available_in_deployment: Some(true),
        written_by: "the guest agent's socket (--agent or found in the QEMU command line)",
        rows: "one per accepted guest line; guest fields are those the line had",
        columns: AGENT,
        families: AGENT_FAMILIES,
        entity: &[],
        sparse: false,
    },
    Stream {
        name: "events",
        file: "events.jsonl",
        kind: StreamKind::Events,
        available_in_deployment: None,
        written_by: "always",
        rows: "one per event",
        columns: EVENTS,
        families: &[],
        entity: &[],
        sparse: false,
    },
    Stream {
        name: "labels",
        file: "labels.jsonl",
        kind: StreamKind::Labels,
        available_in_deployment: None,
        written_by: "always",
        rows: "one per phase transition",
        columns: LABELS,
        families: &[],
        entity: &[],
        sparse: false,
    },
];
