//! Scheduler programs: on-CPU time, context switches, wakeups, run-queue waits and
//! migrations per thread of the target (map `SCHED`, key = tid).
//!
//! Raw tracepoints: the kernel calls them with the tracepoint's own arguments (task
//! pointers), without first filling a trace record, so an event of another process
//! costs one 8-byte read of the task's pid and tgid (offsets from BTF, set by the loader)
//! and a compare; the map is touched only for the target's threads. Membership is the
//! tgid itself: user space seeds `SCHED` from /proc/<pid>/task at attach, the programs
//! add a thread of the target they do not know yet.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::HashMap,
    programs::RawTracePointContext,
};
use cis490_common::{is_involuntary, SchedStats, FLAG_EXITED, MAX_THREADS};

use crate::globals::{
    add, current, target_tgid, task_pid_offset, task_sched_info_offset,
    task_sum_exec_runtime_offset,
};

#[map]
static SCHED: HashMap<u32, SchedStats> = HashMap::with_max_entries(MAX_THREADS, 0);

/// The scheduler's own accounting of a task: (sum_exec_runtime, run_delay, pcount).
#[derive(Clone, Copy)]
struct Accounting {
    exec: u64,
    run_delay: u64,
    pcount: u64,
}

#[inline(always)]
fn read<T>(task: u64, offset: usize) -> Option<T> {
    unsafe { bpf_probe_read_kernel((task as usize + offset) as *const T) }.ok()
}

#[inline(always)]
fn accounting(task: u64) -> Option<Accounting> {
    let exec = read::<u64>(task, task_sum_exec_runtime_offset())?;
    // sched_info starts with pcount, then run_delay.
    let [pcount, run_delay] = read::<[u64; 2]>(task, task_sched_info_offset())?;
    Some(Accounting {
        exec,
        run_delay,
        pcount,
    })
}

/// (tgid, tid) of a task: `pid` and `tgid` are adjacent ints, read as one u64 (x86_64 and
/// every BPF target are little-endian, so pid is the low half).
#[inline(always)]
fn task_ids(task: u64) -> Option<(u32, u32)> {
    let v = read::<u64>(task, task_pid_offset())?;
    Some(((v >> 32) as u32, v as u32))
}

/// The entry of a thread known to be the target's, created if missing with the task's
/// accounting now as its base (the counters start at 0).
#[inline(always)]
fn entry_or_insert(tid: u32, task: u64, now: Option<Accounting>) -> Option<*mut SchedStats> {
    if let Some(p) = SCHED.get_ptr_mut(tid) {
        return Some(p);
    }
    let base = match now {
        Some(a) => a,
        None => accounting(task)?,
    };
    let v = SchedStats {
        exec_base_ns: base.exec,
        run_delay_base_ns: base.run_delay,
        pcount_base: base.pcount,
        ..SchedStats::ZERO
    };
    // NOEXIST: a concurrent insert of the same tid wins and we use its element.
    let _ = SCHED.insert(tid, v, BPF_NOEXIST as u64);
    SCHED.get_ptr_mut(tid)
}

/// TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state). Runs on every context switch of the machine: a switch that
/// involves no thread of the target costs a helper call, one probe read and compares.
///
/// On-CPU time, run-queue wait and switch-in count come from the scheduler's own
/// accounting in task_struct (already updated for prev when the tracepoint fires), so no
/// sched_stat_runtime program and no clock read at wakeup are needed; the clock is read
/// only when a target thread switches in (user space adds its running slice).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn cis490_sched_switch(ctx: RawTracePointContext) -> u32 {
    let target = target_tgid();
    // `current` is still the outgoing task here.
    let (prev_tgid, prev) = current();
    let next_task = ctx.arg::<u64>(2);
    let Some((next_tgid, next)) = task_ids(next_task) else {
        return 0;
    };
    if prev_tgid == target {
        let prev_task = ctx.arg::<u64>(1);
        let preempt = ctx.arg::<u64>(0) & 0xff != 0;
        let prev_state = ctx.arg::<u64>(3) as u32;
        if let Some(acc) = accounting(prev_task) {
            if let Some(st) = entry_or_insert(prev, prev_task, Some(acc)) {
                unsafe {
                    if is_involuntary(preempt, prev_state) {
                        (*st).involuntary_switches += 1;
                    } else {
                        (*st).voluntary_switches += 1;
                    }
                    // Off CPU first, then the new total: a reader copying the value in
                    // address order sees the old total with or without the running slice,
                    // or the new total without it, never the new total plus the slice.
                    core::ptr::write_volatile(&raw mut (*st).running_since_ns, 0);
                    core::ptr::write_volatile(
                        &raw mut (*st).on_cpu_ns,
                        acc.exec.saturating_sub((*st).exec_base_ns),
                    );
                    (*st).runqueue_wait_ns = acc.run_delay.saturating_sub((*st).run_delay_base_ns);
                    (*st).runqueue_waits = acc.pcount.saturating_sub((*st).pcount_base);
                }
            }
        }
    }
    if next_tgid == target {
        if let Some(st) = entry_or_insert(next, next_task, None) {
            unsafe { (*st).running_since_ns = bpf_ktime_get_ns() };
        }
    }
    0
}

/// TP_PROTO(struct task_struct *p), for sched_wakeup and sched_wakeup_new.
#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn cis490_sched_wakeup(ctx: RawTracePointContext) -> u32 {
    let Some((tgid, tid)) = task_ids(ctx.arg::<u64>(0)) else {
        return 0;
    };
    if tgid != target_tgid() {
        return 0;
    }
    if let Some(st) = SCHED.get_ptr_mut(tid) {
        unsafe { add(&raw mut (*st).wakeups, 1) };
    }
    0
}

/// TP_PROTO(struct task_struct *p, int dest_cpu).
#[raw_tracepoint(tracepoint = "sched_migrate_task")]
pub fn cis490_sched_migrate(ctx: RawTracePointContext) -> u32 {
    let Some((tgid, tid)) = task_ids(ctx.arg::<u64>(0)) else {
        return 0;
    };
    if tgid != target_tgid() {
        return 0;
    }
    if let Some(st) = SCHED.get_ptr_mut(tid) {
        unsafe { add(&raw mut (*st).migrations, 1) };
    }
    0
}

/// Does nothing: attached to sched_switch beside the real program when `--bpf-stats` is
/// on, so the cost of dispatch and of the statistics themselves is measured in the same
/// run and can be subtracted (the benchmark reports both). A raw tracepoint like the
/// real one, so both pay the same dispatch.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn cis490_baseline_noop(_ctx: RawTracePointContext) -> u32 {
    0
}

/// TP_PROTO(struct task_struct *parent, struct task_struct *child): a new thread of the
/// target (a child process has its own tgid) is added now, so its wakeup_new counts.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn cis490_sched_fork(ctx: RawTracePointContext) -> u32 {
    let child = ctx.arg::<u64>(1);
    if let Some((tgid, tid)) = task_ids(child) {
        if tgid == target_tgid() {
            let _ = entry_or_insert(tid, child, None);
        }
    }
    0
}

/// TP_PROTO(struct task_struct *p, bool group_dead), p being `current`: a thread of the
/// target exits. Mark it; user space moves its final counters into the process total and
/// removes the entry after its last switch-out.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn cis490_sched_exit(_ctx: RawTracePointContext) -> u32 {
    let (tgid, tid) = current();
    if tgid == target_tgid() {
        if let Some(st) = SCHED.get_ptr_mut(tid) {
            unsafe { (*st).flags |= FLAG_EXITED };
        }
    }
    0
}
