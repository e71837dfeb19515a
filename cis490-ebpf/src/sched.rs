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

use crate::globals::{add, current, target_tgid, task_pid_offset, task_sum_exec_runtime_offset};

#[map]
static SCHED: HashMap<u32, SchedStats> = HashMap::with_max_entries(MAX_THREADS, 0);

#[inline(always)]
fn read<T>(task: u64, offset: usize) -> Option<T> {
    unsafe { bpf_probe_read_kernel((task as usize + offset) as *const T) }.ok()
}

/// The scheduler's on-CPU time of a task (`se.sum_exec_runtime`: on the cache line
/// update_curr has just written when the task switches out).
#[inline(always)]
fn exec_runtime(task: u64) -> Option<u64> {
    read::<u64>(task, task_sum_exec_runtime_offset())
}

/// (tgid, tid) of a task: `pid` and `tgid` are adjacent ints, read as one u64 (x86_64 and
/// every BPF target are little-endian, so pid is the low half).
#[inline(always)]
fn task_ids(task: u64) -> Option<(u32, u32)> {
    let v = read::<u64>(task, task_pid_offset())?;
    Some(((v >> 32) as u32, v as u32))
}

/// The entry of a thread known to be the target's, created if missing with the task's
/// run time now as its base (its on_cpu_ns starts at 0).
#[inline(always)]
fn entry_or_insert(tid: u32, task: u64, exec_now: Option<u64>) -> Option<*mut SchedStats> {
    if let Some(p) = SCHED.get_ptr_mut(tid) {
        return Some(p);
    }
    let base = match exec_now {
        Some(e) => e,
        None => exec_runtime(task)?,
    };
    let v = SchedStats {
        exec_base_ns: base,
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
/// On-CPU time comes from the scheduler's own accounting in task_struct (already updated
/// for prev when the tracepoint fires), so no sched_stat_runtime program is needed; the
/// switch-in time starts the running slice user space adds for a thread on a CPU.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn cis490_sched_switch(ctx: RawTracePointContext) -> u32 {
    let target = target_tgid();
    // `current` is still the outgoing task here.
    let (prev_tgid, prev) = current();
    let next_task = ctx.arg::<u64>(2);
    let Some((next_tgid, next)) = task_ids(next_task) else {
        return 0;
    };
    if prev_tgid != target && next_tgid != target {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if prev_tgid == target {
        let prev_task = ctx.arg::<u64>(1);
        let preempt = ctx.arg::<u64>(0) & 0xff != 0;
        let prev_state = ctx.arg::<u64>(3) as u32;
        if let Some(exec) = exec_runtime(prev_task) {
            if let Some(st) = entry_or_insert(prev, prev_task, Some(exec)) {
                unsafe {
                    if is_involuntary(preempt, prev_state) {
                        (*st).involuntary_switches += 1;
                        // Still runnable: it waits on a run queue from now on.
                        if (*st).enqueued_at_ns == 0 {
                            (*st).enqueued_at_ns = now;
                        }
                    } else {
                        (*st).voluntary_switches += 1;
                        (*st).enqueued_at_ns = 0;
                    }
                    // Off CPU first, then the new total: a reader copying the value in
                    // address order sees the old total with or without the running slice,
                    // or the new total without it, never the new total plus the slice.
                    core::ptr::write_volatile(&raw mut (*st).running_since_ns, 0);
                    core::ptr::write_volatile(
                        &raw mut (*st).on_cpu_ns,
                        exec.saturating_sub((*st).exec_base_ns),
                    );
                }
            }
        }
    }
    if next_tgid == target {
        if let Some(st) = entry_or_insert(next, next_task, None) {
            unsafe {
                let enq = (*st).enqueued_at_ns;
                if enq != 0 && (*st).flags & FLAG_EXITED == 0 {
                    if now > enq {
                        (*st).runqueue_wait_ns += now - enq;
                    }
                    (*st).runqueue_waits += 1;
                }
                (*st).enqueued_at_ns = 0;
                (*st).running_since_ns = now;
            }
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
        unsafe {
            if (*st).flags & FLAG_EXITED == 0 {
                add(&raw mut (*st).wakeups, 1);
                if (*st).enqueued_at_ns == 0 {
                    (*st).enqueued_at_ns = bpf_ktime_get_ns();
                }
            }
        }
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
/// target (a child process has its own tgid) is added now, so its wakeup_new and first
/// run-queue wait count.
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
