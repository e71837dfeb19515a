//! Scheduler programs: on-CPU time, context switches, wakeups, run-queue waits and
//! migrations per thread of the target (map `SCHED`, key = tid).
//!
//! sched_switch's arguments give prev_pid/next_pid (tids) but no tgid of the incoming
//! thread, so membership is tracked in `SCHED` itself: user space seeds it from
//! /proc/<pid>/task at attach, sched_process_fork adds children of the target as
//! unconfirmed candidates, and every switch-out confirms (or removes) a thread by the
//! tgid of `current` (still the outgoing task when sched_switch fires).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use cis490_common::{is_involuntary, SchedStats, FLAG_CONFIRMED, FLAG_EXITED, MAX_THREADS};

use crate::globals::{add, current, offsets, target_tgid};

#[map]
static SCHED: HashMap<u32, SchedStats> = HashMap::with_max_entries(MAX_THREADS, 0);

const ZERO: SchedStats = SchedStats {
    on_cpu_ns: 0,
    voluntary_switches: 0,
    involuntary_switches: 0,
    wakeups: 0,
    runqueue_wait_ns: 0,
    runqueue_waits: 0,
    migrations: 0,
    enqueued_at_ns: 0,
    flags: 0,
    _pad: 0,
};

#[inline(always)]
fn entry_or_insert(tid: u32, flags: u32) -> Option<*mut SchedStats> {
    if let Some(p) = SCHED.get_ptr_mut(tid) {
        return Some(p);
    }
    let mut v = ZERO;
    v.flags = flags;
    // NOEXIST: a concurrent insert of the same tid wins and we use its element.
    let _ = SCHED.insert(tid, v, BPF_NOEXIST as u64);
    SCHED.get_ptr_mut(tid)
}

#[tracepoint]
pub fn cis490_sched_switch(ctx: TracePointContext) -> u32 {
    let _ = try_switch(&ctx);
    0
}

/// Runs on every context switch of the machine, so it does only what each case needs:
/// prev_state and the clock are read only when a target thread is involved.
fn try_switch(ctx: &TracePointContext) -> Result<(), i32> {
    let off = offsets();
    let prev = unsafe { ctx.read_at::<u32>(off.switch_prev_pid as usize)? };
    let next = unsafe { ctx.read_at::<u32>(off.switch_next_pid as usize)? };

    let (tgid, _) = current();
    if prev != 0 {
        if tgid == target_tgid() {
            let prev_state = unsafe { ctx.read_at::<u64>(off.switch_prev_state as usize)? };
            if let Some(st) = entry_or_insert(prev, FLAG_CONFIRMED) {
                unsafe {
                    (*st).flags |= FLAG_CONFIRMED;
                    if is_involuntary(prev_state) {
                        (*st).involuntary_switches += 1;
                        // Still runnable: it waits on a run queue from now on.
                        if (*st).enqueued_at_ns == 0 {
                            (*st).enqueued_at_ns = bpf_ktime_get_ns();
                        }
                    } else {
                        (*st).voluntary_switches += 1;
                        (*st).enqueued_at_ns = 0;
                    }
                }
            }
        } else if let Some(st) = SCHED.get_ptr_mut(prev) {
            // A fork candidate that ran as another process: not one of the target's threads.
            if unsafe { (*st).flags } & FLAG_CONFIRMED == 0 {
                let _ = SCHED.remove(prev);
            }
        }
    }

    if next != 0 {
        if let Some(st) = SCHED.get_ptr_mut(next) {
            unsafe {
                let enq = (*st).enqueued_at_ns;
                if enq != 0 && (*st).flags & FLAG_EXITED == 0 {
                    let now = bpf_ktime_get_ns();
                    if now > enq {
                        (*st).runqueue_wait_ns += now - enq;
                    }
                    (*st).runqueue_waits += 1;
                }
                (*st).enqueued_at_ns = 0;
            }
        }
    }
    Ok(())
}

/// The scheduler charging run time to a task (update_curr): exactly the increments of
/// its sum_exec_runtime, so on_cpu_ns is the same quantity as /proc's schedstat (steal
/// time excluded). It can fire on another CPU than the task's, hence the lookup by pid,
/// not `current`; it runs under the task's run-queue lock, like sched_switch.
#[tracepoint]
pub fn cis490_sched_runtime(ctx: TracePointContext) -> u32 {
    let off = offsets();
    let Ok(tid) = (unsafe { ctx.read_at::<u32>(off.runtime_pid as usize) }) else {
        return 0;
    };
    if let Some(st) = SCHED.get_ptr_mut(tid) {
        if let Ok(rt) = unsafe { ctx.read_at::<u64>(off.runtime_runtime as usize) } {
            unsafe { (*st).on_cpu_ns += rt };
        }
    }
    0
}

#[tracepoint]
pub fn cis490_sched_wakeup(ctx: TracePointContext) -> u32 {
    let _ = try_wakeup(&ctx);
    0
}

fn try_wakeup(ctx: &TracePointContext) -> Result<(), i32> {
    let tid = unsafe { ctx.read_at::<u32>(offsets().wakeup_pid as usize)? };
    let st = SCHED.get_ptr_mut(tid).ok_or(0)?;
    unsafe {
        if (*st).flags & FLAG_EXITED != 0 {
            return Ok(());
        }
        add(&raw mut (*st).wakeups, 1);
        if (*st).enqueued_at_ns == 0 {
            (*st).enqueued_at_ns = bpf_ktime_get_ns();
        }
    }
    Ok(())
}

#[tracepoint]
pub fn cis490_sched_migrate(ctx: TracePointContext) -> u32 {
    if let Ok(tid) = unsafe { ctx.read_at::<u32>(offsets().migrate_pid as usize) } {
        if let Some(st) = SCHED.get_ptr_mut(tid) {
            unsafe { add(&raw mut (*st).migrations, 1) };
        }
    }
    0
}

/// Does nothing: attached to sched_switch beside the real program when `--bpf-stats` is
/// on, so the cost of dispatch and of the statistics themselves is measured in the same
/// run and can be subtracted (the benchmark reports both).
#[tracepoint]
pub fn cis490_baseline_noop(_ctx: TracePointContext) -> u32 {
    0
}

/// A task forked by the target: a new thread (or a child process, weeded out at its
/// first switch-out). Added now so its wakeup_new and first run-queue wait count.
#[tracepoint]
pub fn cis490_sched_fork(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current();
    if tgid == target_tgid() {
        if let Ok(child) = unsafe { ctx.read_at::<u32>(offsets().fork_child_pid as usize) } {
            let _ = entry_or_insert(child, 0);
        }
    }
    0
}

/// A thread of the target exits: mark it, user space moves its final counters into the
/// process total and removes the entry after its last switch-out.
#[tracepoint]
pub fn cis490_sched_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current();
    if tgid == target_tgid() {
        if let Some(st) = SCHED.get_ptr_mut(tid) {
            unsafe { (*st).flags |= FLAG_EXITED };
        }
    }
    0
}
