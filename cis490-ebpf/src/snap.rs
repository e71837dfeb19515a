//! Snapshots: the target's per-thread counters read from the kernel's own accounting in
//! task_struct (the numbers /proc prints as schedstat, status and io) by a program the
//! kernel runs on its own timer, streamed to user space through ring buffer `SNAPS`.
//!
//! No program runs per context switch, wakeup or syscall: the scheduler and the I/O
//! accounting already keep these counters, so reading them `rate` times a second costs
//! a few hundred ns per thread per snapshot, whatever the target does. The snapshot runs
//! from a perf cpu-clock hrtimer (one CPU), so user space needs no wake-up per tick and
//! drains the ring a few times a second.
//!
//! Which threads: map `SLOTS` holds the task_struct address of each thread of the
//! target. It is seeded at attach by a task iterator (`cis490_seed_task`), grown by
//! sched_process_fork and marked by sched_process_exit, which copies the thread's final
//! counters into the slot while the task is still alive.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_perf_event_data, bpf_perf_event_value, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_task, bpf_ktime_get_ns,
        generated::{
            bpf_loop, bpf_map_lookup_percpu_elem, bpf_perf_prog_read_value, bpf_probe_read_kernel,
        },
    },
    macros::{map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{PerfEventContext, RawTracePointContext},
};
use cis490_common::{
    pending_wait, running_slice, NetRecord, NetStats, Offsets, SnapRecord, ThreadCounters,
    ThreadSlot, TickRecord, TickState, Window, EXACT_SLICE, EXACT_WAIT, MAX_CPUS, MAX_NET_IFS,
    MAX_SLOTS, MM_UNKNOWN, REC_NET, REC_THREAD, REC_THREAD_EXITED, REC_TICK, RSS_COUNTERS,
    SLOT_EXITED, SLOT_FREE, SLOT_LIVE, WINDOW_WORDS,
};

use crate::globals::{current, offsets, read, snap_config, target_tgid, task_ids};
use crate::io::{BLK, BLK_ZERO};
use crate::net::NET;

#[map]
static SLOTS: Array<ThreadSlot> = Array::with_max_entries(MAX_SLOTS, 0);

/// Slot index → tid of its owner. Taking a slot is an insert with BPF_NOEXIST, which the
/// kernel does atomically: the Rust BPF target has no compare-and-swap, and two CPUs may
/// add threads of the target at the same instant.
#[map]
static SLOT_CLAIMS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SLOTS, 0);

/// One past the highest slot index ever claimed (element 0). Slots are claimed lowest
/// free first, so the slots in use lie below it and a snapshot lists only those instead
/// of all 512 (at 10 threads, most of the snapshot's fixed cost). Raised by claimers
/// with a plain read-then-write, which two CPUs claiming at once can race: each then
/// takes a new slot at or above the old bound, so a lost raise leaves a slot in use at
/// most (claiming CPUs − 1) above it. The snapshot therefore also lists
/// `BOUND_MARGIN` slots beyond the bound, raises it when it finds one in use there, and
/// every `FULL_LIST_EVERY` snapshots lists all slots.
#[map]
static SLOT_BOUND: Array<u32> = Array::with_max_entries(1, 0);

/// Sized by the loader (`set_max_entries`) from the rate and the thread count.
#[map]
static SNAPS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static TICK: Array<TickState> = Array::with_max_entries(1, 0);

/// Element 0: the timer grid's origin (CLOCK_MONOTONIC ns), written by user space when
/// it (re)starts the timer (see `TickState`), moved back here if a run comes earlier.
/// Its own map, so user space never writes over the program's other state.
#[map]
static GRID: Array<u64> = Array::with_max_entries(1, 0);

/// Element 0: 1 once the capture has started sampling (it sets it); until then the
/// timer runs but takes no snapshot, so the episode's ticks start with the episode and
/// the set-up time (meta.json's fsync can take seconds on a busy disk) cannot fill the
/// ring.
#[map]
static CONTROL: Array<u32> = Array::with_max_entries(1, 0);

/// Wakeups per tid since attach (`--bpf-wakeups` on a kernel without schedstats).
#[map]
static WAKEUPS: HashMap<u32, u64> = HashMap::with_max_entries(MAX_SLOTS, 0);

const PF_EXITING: u32 = 0x4;

/// Copy `words` u64 from the kernel object at `addr + offset` straight into `dst` (map
/// memory): no stack copy, no memcpy call (the verifier would walk a byte loop per
/// thread per snapshot).
///
/// # Safety
/// `dst` must point to `words` writable u64 of map memory. `addr + offset` may be any
/// number: bpf_probe_read_kernel returns an error, never faults, on a bad kernel address.
#[inline(always)]
unsafe fn probe(dst: *mut u64, words: u32, addr: u64, offset: u32) -> bool {
    // SAFETY: the caller vouches for `dst`; the source is only read through the helper.
    unsafe {
        bpf_probe_read_kernel(
            dst as *mut c_void,
            words * 8,
            (addr + offset as u64) as *const c_void,
        ) == 0
    }
}

/// Where the task_struct windows are copied before the wanted words are picked out
/// (per CPU; element 0 for the snapshot, 1 for the exit program, which the snapshot's
/// timer interrupt can interrupt on the same CPU).
#[repr(C)]
pub struct WindowBufs {
    head: [u64; WINDOW_WORDS as usize],
    se: [u64; WINDOW_WORDS as usize],
    si: [u64; WINDOW_WORDS as usize],
    tm: [u64; WINDOW_WORDS as usize],
    rq: [u64; WINDOW_WORDS as usize],
}

#[map]
static WINDOWS: PerCpuArray<WindowBufs> = PerCpuArray::with_max_entries(2, 0);

/// `WINDOWS` element of the snapshot program.
pub const WIN_SNAPSHOT: u32 = 0;
/// `WINDOWS` element of the exit program.
pub const WIN_EXIT: u32 = 1;

/// Copy window `w` of the kernel object at `addr` into `dst` (map memory, WINDOW_WORDS
/// long): one probe read. The word count is bounded here so the verifier can prove the
/// copy stays inside `dst`.
///
/// # Safety
/// `dst` must point to WINDOW_WORDS writable u64 of map memory.
#[inline(always)]
unsafe fn probe_window(dst: *mut u64, addr: u64, w: Window) -> bool {
    let words = w.words;
    if words == 0 || words > WINDOW_WORDS {
        return false;
    }
    // SAFETY: dst is a WINDOW_WORDS-word map value; the helper copies words * 8 ≤ its
    // size bytes and fails (without faulting) on an unreadable kernel address.
    unsafe {
        bpf_probe_read_kernel(
            dst as *mut c_void,
            words * 8,
            (addr + w.off as u64) as *const c_void,
        ) == 0
    }
}

/// Word `at` of a window (the index is masked: the verifier needs it bounded).
#[inline(always)]
fn word(w: &[u64; WINDOW_WORDS as usize], at: u32) -> u64 {
    w[(at & (WINDOW_WORDS - 1)) as usize]
}

/// The u32 at byte `at` of a window (masked to an aligned position inside it).
#[inline(always)]
fn word32(w: &[u64; WINDOW_WORDS as usize], at: u32) -> u32 {
    let at = (at & (WINDOW_WORDS * 8 - 4)) as usize;
    // SAFETY: `at` is 4-aligned and at most size − 4 bytes into the array.
    unsafe { core::ptr::read_volatile((w.as_ptr() as *const u8).add(at) as *const u32) }
}

/// The kernel's counters of live task `tid`, read into `c` (map memory). `now_sched`:
/// sched_clock at the snapshot (0 from the exit program: nothing is brought forward).
///
/// # Safety
/// `c` and `bufs` must be map values of this CPU, valid for the program run.
#[inline(always)]
unsafe fn read_counters(
    tid: u32,
    task: u64,
    o: &Offsets,
    c: *mut ThreadCounters,
    bufs: *mut WindowBufs,
    now_sched: u64,
) -> bool {
    // SAFETY: `c` and `bufs` are map values of this CPU (valid, exclusively ours while
    // the program runs); kernel memory is only read through bpf_probe_read_kernel.
    unsafe {
        let b = &mut *bufs;
        if !(probe_window(b.head.as_mut_ptr(), task, o.head)
            && probe_window(b.se.as_mut_ptr(), task, o.se)
            && probe_window(b.si.as_mut_ptr(), task, o.sched_info)
            && probe_window(b.tm.as_mut_ptr(), task, o.times)
            && probe(&raw mut (*c).io as *mut u64, 7, task, o.task_ioac))
        {
            return false;
        }
        let sum = word(&b.se, o.se_sum_exec_runtime_at);
        let on_cpu = word32(&b.head, o.head_on_cpu_at);
        (*c).sum_exec_runtime = sum;
        (*c).migrations = word(&b.se, o.se_nr_migrations_at);
        (*c).timeslices_count = word(&b.si, o.si_pcount_at);
        (*c).voluntary_switches = word(&b.tm, o.tm_nvcsw_at);
        (*c).involuntary_switches = word(&b.tm, o.tm_nivcsw_at);
        (*c).minflt = word(&b.tm, o.tm_min_flt_at);
        (*c).majflt = word(&b.tm, o.tm_maj_flt_at);
        (*c).utime_ns = word(&b.tm, o.tm_utime_at);
        (*c).stime_ns = word(&b.tm, o.tm_stime_at);
        (*c).prev_utime_ns = word(&b.tm, o.tm_prev_utime_at);
        (*c).prev_stime_ns = word(&b.tm, o.tm_prev_stime_at);
        (*c).task_state = word32(&b.head, o.head_state_at);
        (*c).cpu = word32(&b.head, o.head_cpu_at);
        (*c).on_cpu = on_cpu;
        let mut exact = 0;
        let mut slice = 0;
        if on_cpu != 0 && now_sched != 0 && o.cfs_rq_rq != 0 {
            // A running task: its run queue's clocks carry exec_start forward to now.
            let cfs_rq = word(&b.se, o.se_cfs_rq_at);
            if let Some(rq) = read::<u64>(cfs_rq, o.cfs_rq_rq) {
                if rq != 0 && probe_window(b.rq.as_mut_ptr(), rq, o.rq_clocks) {
                    slice = running_slice(
                        now_sched,
                        word(&b.rq, 0),
                        word(&b.rq, o.rq_clock_task_at),
                        word(&b.se, o.se_exec_start_at),
                    );
                }
            }
        }
        if slice != 0 {
            exact |= EXACT_SLICE;
        }
        (*c).on_cpu_ns = sum.saturating_add_signed(slice);
        let mut wait = 0;
        if on_cpu == 0 {
            wait = pending_wait(now_sched, word(&b.si, o.si_last_queued_at));
        }
        if wait != 0 {
            exact |= EXACT_WAIT;
        }
        (*c).runqueue_wait_ns = word(&b.si, o.si_run_delay_at) + wait;
        (*c).exact = exact;
        if o.task_nr_wakeups != 0 {
            return probe(&raw mut (*c).wakeups, 1, task, o.task_nr_wakeups);
        }
        (*c).wakeups = if snap_config().count_wakeups != 0 {
            match WAKEUPS.get(&tid) {
                Some(n) => *n,
                None => 0,
            }
        } else {
            u64::MAX
        };
        true
    }
}

/// `*dst = *src` word by word (volatile, so the compiler emits no memcpy loop).
///
/// # Safety
/// `dst` and `src` must be valid, 8-byte aligned `T`s (map values or stack), and `T` a
/// plain-data struct whose size is a multiple of 8.
#[inline(always)]
unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    let n = core::mem::size_of::<T>() / 8;
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    for k in 0..n {
        // SAFETY: k < size_of::<T>() / 8 words inside both valid `T`s (the caller's
        // promise).
        unsafe { core::ptr::write_volatile(d.add(k), core::ptr::read_volatile(s.add(k))) };
    }
}

/// A search over the slots with bpf_loop (context on the caller's stack). One loop body
/// for the verifier instead of 512 (or 1,024) unrolled iterations: loading the fork, exit
/// and seeding programs cost ~30-45 ms of verifier time each, most of a capture's start-up.
#[repr(C)]
struct SlotSearch {
    tid: u32,
    /// The slot found, or `MAX_SLOTS`.
    found: u32,
    task: u64,
    /// `match_slot`: only a slot in state LIVE matches (else any slot in use).
    live_only: u32,
    _pad: u32,
}

impl SlotSearch {
    #[inline(always)]
    fn new(tid: u32, task: u64, live_only: bool) -> Self {
        Self {
            tid,
            found: MAX_SLOTS,
            task,
            live_only: u32::from(live_only),
            _pad: 0,
        }
    }
}

/// bpf_loop callback: stop at the slot that holds `tid`.
#[inline(never)]
extern "C" fn match_slot(i: u32, ctx: *mut c_void) -> i64 {
    let q = ctx.cast::<SlotSearch>();
    let Some(s) = SLOTS.get_ptr(i) else {
        return 1;
    };
    // SAFETY: `q` is the caller's stack value, `s` a map value; both outlive the call.
    unsafe {
        let state = (*s).state;
        let wanted = if (*q).live_only != 0 {
            state == SLOT_LIVE
        } else {
            state != SLOT_FREE
        };
        if wanted && (*s).tid == (*q).tid {
            (*q).found = i;
            return 1;
        }
    }
    0
}

/// bpf_loop callback: claim the first free slot for `tid` and stop.
#[inline(never)]
extern "C" fn claim_free_slot(i: u32, ctx: *mut c_void) -> i64 {
    let q = ctx.cast::<SlotSearch>();
    let Some(s) = SLOTS.get_ptr_mut(i) else {
        return 1;
    };
    // SAFETY: `q` is the caller's stack value, `s` a map value; both outlive the call.
    unsafe {
        if (*s).state != SLOT_FREE {
            return 0;
        }
        if SLOT_CLAIMS
            .insert(&i, &(*q).tid, BPF_NOEXIST as u64)
            .is_err()
        {
            return 0; // another CPU took it a moment ago
        }
        (*s).task = (*q).task;
        (*s).tid = (*q).tid;
        // Last: a snapshot on another CPU reads task and tid only once it sees LIVE
        // (x86 keeps stores in order; the volatile write keeps the compiler's order).
        core::ptr::write_volatile(&raw mut (*s).state, SLOT_LIVE);
        (*q).found = i;
        raise_bound(i);
    }
    1
}

/// Make `SLOT_BOUND` cover slot `i` (see there for the race this tolerates).
#[inline(always)]
fn raise_bound(i: u32) {
    if let Some(b) = SLOT_BOUND.get_ptr_mut(0) {
        // SAFETY: the single value of an array map, valid for the program run.
        unsafe {
            if core::ptr::read_volatile(b) <= i {
                core::ptr::write_volatile(b, i + 1);
            }
        }
    }
}

/// Run `cb` over every slot index with `q` as its context; returns `q.found`.
#[inline(always)]
fn search_slots(cb: extern "C" fn(u32, *mut c_void) -> i64, q: &mut SlotSearch) -> u32 {
    // SAFETY: bpf_loop calls `cb` with `q`, a stack value that outlives the call.
    unsafe {
        bpf_loop(
            MAX_SLOTS,
            cb as *mut c_void,
            (q as *mut SlotSearch).cast::<c_void>(),
            0,
        );
    }
    q.found
}

/// Give thread `tid` (task_struct at `task`) a slot, unless it has one.
#[inline(always)]
fn claim_slot(tid: u32, task: u64) {
    let mut q = SlotSearch::new(tid, task, false);
    if search_slots(match_slot, &mut q) < MAX_SLOTS {
        return;
    }
    let mut q = SlotSearch::new(tid, task, false);
    if search_slots(claim_free_slot, &mut q) < MAX_SLOTS {
        return;
    }
    if let Some(t) = TICK.get_ptr_mut(0) {
        // SAFETY: the single value of an array map, valid for the program run.
        unsafe { (*t).unslotted += 1 };
    }
}

/// Free slot `i` (the claim goes last, so nobody takes the slot before it is cleared).
///
/// # Safety
/// `s` must be slot `i`'s value in map SLOTS.
#[inline(always)]
unsafe fn free_slot(i: u32, s: *mut ThreadSlot) {
    // SAFETY: `s` is a SLOTS value (the caller's promise), valid for the program run.
    unsafe {
        core::ptr::write_volatile(&raw mut (*s).state, SLOT_FREE);
        (*s).task = 0;
    }
    let _ = SLOT_CLAIMS.remove(&i);
}

/// Task iterator (section `iter/task`), run once by the loader after the fork and exit
/// programs are attached: every thread of the target that exists now gets a slot.
/// Context: `struct bpf_iter__task { struct bpf_iter_meta *meta; struct task_struct *task; }`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub extern "C" fn cis490_seed_task(ctx: *mut c_void) -> i32 {
    // Read through bpf_probe_read_kernel so the address is a plain number to the
    // verifier (it goes into a map and is only ever read with probe reads).
    let Some(task) = read::<u64>(ctx as u64, 8) else {
        return 0;
    };
    if task == 0 {
        return 0; // the iteration's last call
    }
    let o = offsets();
    let Some((tgid, tid)) = task_ids(task, o) else {
        return 0;
    };
    if tgid != target_tgid() {
        return 0;
    }
    // An exiting thread may already be past sched_process_exit: a slot would never be
    // marked exited.
    match read::<u32>(task, o.task_flags) {
        Some(f) if f & PF_EXITING == 0 => claim_slot(tid, task),
        _ => {}
    }
    0
}

/// TP_PROTO(struct task_struct *p), for sched_wakeup and sched_wakeup_new; attached only
/// with `--bpf-wakeups` on a kernel that keeps no wakeup count (no CONFIG_SCHEDSTATS).
/// Another process's wakeup costs one probe read and a compare.
#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn cis490_sched_wakeup(ctx: RawTracePointContext) -> u32 {
    let Some((tgid, tid)) = task_ids(ctx.arg::<u64>(0), offsets()) else {
        return 0;
    };
    if tgid != target_tgid() {
        return 0;
    }
    match WAKEUPS.get_ptr_mut(&tid) {
        // Not atomic (the Rust BPF target has none): two CPUs waking the same thread in
        // the same instant can lose one count. A thread is woken by one waker at a time.
        // SAFETY: a map value of this tid, valid for the program run.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = WAKEUPS.insert(&tid, &1, BPF_NOEXIST as u64);
        }
    }
    0
}

/// TP_PROTO(struct task_struct *parent, struct task_struct *child): a new thread of the
/// target (a child process has its own tgid and is not followed).
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn cis490_sched_fork(ctx: RawTracePointContext) -> u32 {
    let child = ctx.arg::<u64>(1);
    if let Some((tgid, tid)) = task_ids(child, offsets()) {
        if tgid == target_tgid() {
            claim_slot(tid, child);
        }
    }
    0
}

/// TP_PROTO(struct task_struct *p, bool group_dead), p being `current`: keep the thread's
/// final counters in its slot (the task_struct may be freed soon after).
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn cis490_sched_exit(_ctx: RawTracePointContext) -> u32 {
    let (tgid, tid) = current();
    if tgid != target_tgid() {
        return 0;
    }
    // SAFETY: a helper without preconditions; the result is only used as a number.
    let task = unsafe { bpf_get_current_task() };
    let o = offsets();
    let Some(bufs) = WINDOWS.get_ptr_mut(WIN_EXIT) else {
        return 0;
    };
    let mut q = SlotSearch::new(tid, task, true);
    let i = search_slots(match_slot, &mut q);
    let Some(s) = SLOTS.get_ptr_mut(i) else {
        return 0; // no slot (MAX_SLOTS is out of the array's range)
    };
    // SAFETY: `s` is a map value and `bufs` this CPU's scratch value, both valid for the
    // program run; kernel memory is read only through bpf_probe_read_kernel.
    unsafe {
        // No sched_clock here: the final on-CPU time is the kernel's as of its last
        // update (the exiting task is running: up to a tick behind).
        if read_counters(tid, task, o, &raw mut (*s).last, bufs, 0) {
            core::ptr::write_volatile(&raw mut (*s).state, SLOT_EXITED);
        } else {
            free_slot(i, s);
        }
    }
    0
}

/// The slots in use at this snapshot, listed by a cheap pass over all of them (per CPU,
/// element 0): bpf_loop then calls the snapshot's body for these only. The count lives in
/// map memory, not in a register, so the verifier does not track one state per possible
/// count through the 512 iterations.
#[repr(C)]
pub struct ActiveSlots {
    n: u32,
    _pad: u32,
    idx: [u32; MAX_SLOTS as usize],
}

#[map]
static ACTIVE: PerCpuArray<ActiveSlots> = PerCpuArray::with_max_entries(1, 0);

/// The state of one snapshot's walk over the slots (bpf_loop's context, on the stack).
#[repr(C)]
struct SlotWalk {
    now: u64,
    now_sched: u64,
    seq: u64,
    threads: u32,
    _pad: u32,
    lost: u64,
}

/// bpf_loop callback: the `k`-th slot in use (`ACTIVE`) of one snapshot. Returns 0 (go
/// on) or 1 (stop).
#[inline(never)]
extern "C" fn snapshot_slot(k: u32, ctx: *mut c_void) -> i64 {
    let walk = ctx.cast::<SlotWalk>();
    let o = offsets();
    let Some(active) = ACTIVE.get_ptr(0) else {
        return 1;
    };
    // SAFETY: a map value of this CPU; the index is masked into the array.
    let i = unsafe { (*active).idx[(k & (MAX_SLOTS - 1)) as usize] };
    let Some(s) = SLOTS.get_ptr_mut(i) else {
        return 1;
    };
    let Some(bufs) = WINDOWS.get_ptr_mut(WIN_SNAPSHOT) else {
        return 1;
    };
    // SAFETY: `walk` is the caller's stack value; `s` and `bufs` are map values of this
    // CPU, `rec` is ring buffer memory reserved for this record (written in place: no
    // scratch copy, which cost a 240-byte memcpy per thread); kernel memory is read
    // only through bpf_probe_read_kernel.
    unsafe {
        let state = (*s).state;
        if state == SLOT_FREE {
            return 0;
        }
        let Some(mut entry) = SNAPS.reserve::<SnapRecord>(0) else {
            (*walk).lost += 1;
            return 0;
        };
        let rec = entry.as_mut_ptr();
        let tid = (*s).tid;
        (*rec).tid = tid;
        (*rec).seq = (*walk).seq;
        (*rec).ktime_ns = (*walk).now;
        if state == SLOT_EXITED {
            (*rec).kind = REC_THREAD_EXITED;
            copy_words(&raw mut (*rec).counters, &raw const (*s).last);
        } else {
            // The task_struct must still be this thread's (a slot left by a thread
            // whose exit was missed would otherwise be read forever).
            let task = (*s).task;
            match task_ids(task, o) {
                Some((tg, t)) if tg == target_tgid() && t == tid => {}
                _ => {
                    entry.discard(0);
                    free_slot(i, s);
                    return 0;
                }
            }
            (*rec).kind = REC_THREAD;
            let now_sched = (*walk).now_sched;
            if !read_counters(tid, task, o, &raw mut (*rec).counters, bufs, now_sched) {
                entry.discard(0);
                return 0;
            }
        }
        match BLK.get_ptr(&tid) {
            Some(b) => copy_words(&raw mut (*rec).blk, b),
            None => copy_words(&raw mut (*rec).blk, &BLK_ZERO),
        }
        entry.submit(BPF_RB_NO_WAKEUP as u64);
        (*walk).threads += 1;
        if state == SLOT_EXITED {
            free_slot(i, s);
            let _ = BLK.remove(&tid);
            let _ = WAKEUPS.remove(&tid);
        }
    }
    0
}

/// sched_clock (local_clock) now, in the domain of the run queues' clocks: the perf
/// cpu-clock event that runs this program keeps local_clock() of its latest update in
/// `hw.prev_count`; bpf_perf_prog_read_value updates it first. 0 when the offsets are
/// not known (no running slice or pending wait is added then).
#[inline(always)]
fn sched_clock_now(ctx: &PerfEventContext, o: &Offsets) -> u64 {
    if o.perf_event_prev_count == 0 {
        return 0;
    }
    let mut value = bpf_perf_event_value {
        counter: 0,
        enabled: 0,
        running: 0,
    };
    // SAFETY: the helper writes one bpf_perf_event_value into `value` (on the stack);
    // the context is the program's own.
    let r = unsafe {
        bpf_perf_prog_read_value(
            ctx.ctx as *mut bpf_perf_event_data,
            &mut value,
            core::mem::size_of::<bpf_perf_event_value>() as u32,
        )
    };
    if r != 0 {
        return 0;
    }
    // The program's context is really `struct bpf_perf_event_data_kern`; its `event`
    // pointer is read as a plain number (root may; the iterator does the same).
    match read::<u64>(ctx.ctx as u64, o.perf_ctx_event) {
        Some(event) if event != 0 => read::<u64>(event, o.perf_event_prev_count).unwrap_or(0),
        _ => 0,
    }
}

/// Slots listed per `list_active` call: few enough for the verifier to check one body
/// quickly, many enough that the per-call cost of bpf_loop (~6 ns) stays small (32 calls
/// per snapshot; one call per slot made the snapshot 45 % dearer).
const LIST_CHUNK: u32 = 16;
/// Slots listed beyond `SLOT_BOUND` (a bound lowered by racing claimers is off by less
/// than the number of CPUs claiming at once).
const BOUND_MARGIN: u32 = 64;
/// Every this many snapshots all slots are listed, whatever the bound.
const FULL_LIST_EVERY: u64 = 256;

/// How many chunks of slots snapshot `seq` lists.
#[inline(always)]
fn chunks_to_list(seq: u64) -> u32 {
    let all = MAX_SLOTS / LIST_CHUNK;
    if seq % FULL_LIST_EVERY == 0 {
        return all;
    }
    let bound = match SLOT_BOUND.get(0) {
        Some(b) => *b,
        None => return all,
    };
    let chunks = (bound.saturating_add(BOUND_MARGIN) + LIST_CHUNK - 1) / LIST_CHUNK;
    if chunks < all {
        chunks
    } else {
        all
    }
}

/// bpf_loop callback: list the in-use slots of chunk `c` in `ACTIVE`.
#[inline(never)]
extern "C" fn list_active(c: u32, _ctx: *mut c_void) -> i64 {
    let Some(active) = ACTIVE.get_ptr_mut(0) else {
        return 1;
    };
    for j in 0..LIST_CHUNK {
        let i = c * LIST_CHUNK + j;
        let Some(s) = SLOTS.get_ptr(i) else {
            return 1;
        };
        // SAFETY: map values valid for the program run; the index is masked into the
        // array.
        unsafe {
            if (*s).state != SLOT_FREE {
                let n = core::ptr::read_volatile(&raw const (*active).n);
                (*active).idx[(n & (MAX_SLOTS - 1)) as usize] = i;
                core::ptr::write_volatile(&raw mut (*active).n, n + 1);
                raise_bound(i);
            }
        }
    }
    0
}

/// One interface's packet counters summed over the CPUs (bpf_loop context).
#[repr(C)]
struct NetSum {
    slot: u32,
    _pad: u32,
    sum: NetStats,
}

/// bpf_loop callback: add CPU `cpu`'s counters of interface `slot` into the sum.
#[inline(never)]
extern "C" fn add_cpu_net(cpu: u32, ctx: *mut c_void) -> i64 {
    let q = ctx.cast::<NetSum>();
    // SAFETY: `q` is the caller's stack value, valid for the call; the per-CPU lookup
    // returns null or a map value.
    unsafe {
        let key = (*q).slot;
        let p = bpf_map_lookup_percpu_elem(
            core::ptr::addr_of!(NET) as *mut c_void,
            &key as *const u32 as *const c_void,
            cpu,
        ) as *const NetStats;
        if !p.is_null() {
            (*q).sum.rx_bytes += (*p).rx_bytes;
            (*q).sum.rx_packets += (*p).rx_packets;
            (*q).sum.tx_bytes += (*p).tx_bytes;
            (*q).sum.tx_packets += (*p).tx_packets;
        }
    }
    0
}

/// The process's resident pages and total_vm, read once per snapshot through the first
/// live thread among the listed slots (every thread of a process shares its `mm`):
/// what /proc prints as VmRSS (file + anon + shmem `rss_stat` counters, each clamped at 0
/// like get_mm_counter) and as stat's vsize. `MM_UNKNOWN` when there is nothing to read.
#[inline(always)]
fn process_memory(o: &Offsets) -> (u64, u64) {
    const UNKNOWN: (u64, u64) = (MM_UNKNOWN, MM_UNKNOWN);
    if o.task_mm == 0 {
        return UNKNOWN;
    }
    let Some(active) = ACTIVE.get_ptr(0) else {
        return UNKNOWN;
    };
    // SAFETY: this CPU's ACTIVE value, filled by this run's listing; constant indices.
    let n = unsafe { core::ptr::read_volatile(&raw const (*active).n) };
    for k in 0..4u32 {
        if k >= n {
            break;
        }
        // SAFETY: as above (k < 4 <= MAX_SLOTS).
        let i = unsafe { (*active).idx[k as usize] };
        let Some(s) = SLOTS.get_ptr(i) else {
            break;
        };
        // SAFETY: a SLOTS value, valid for the program run.
        let (state, task) = unsafe { ((*s).state, (*s).task) };
        if state != SLOT_LIVE {
            continue;
        }
        // Probe reads: a task that exits meanwhile gives an error or a NULL mm, never a
        // fault.
        let Some(mm) = read::<u64>(task, o.task_mm) else {
            continue;
        };
        if mm == 0 {
            continue;
        }
        let Some(total_vm) = read::<u64>(mm, o.mm_total_vm) else {
            continue;
        };
        let mut rss = 0u64;
        for c in RSS_COUNTERS {
            let at = o.mm_rss_stat + c * o.rss_counter_size + o.rss_counter_count;
            match read::<i64>(mm, at) {
                Some(v) if v > 0 => rss += v as u64,
                _ => {}
            }
        }
        return (rss, total_vm);
    }
    UNKNOWN
}

/// Runs every `SNAP_CONFIG.interval_ns` on one CPU (perf cpu-clock event): one record per
/// followed thread, one per watched interface, then the tick record.
#[perf_event]
pub fn cis490_snapshot(ctx: PerfEventContext) -> u32 {
    let o = offsets();
    // The snapshot's instant, and sched_clock read just after it: paired below.
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let sched_read = sched_clock_now(&ctx, o);
    // SAFETY: a helper without preconditions.
    let after = unsafe { bpf_ktime_get_ns() };
    let cfg = snap_config();
    if cfg.interval_ns == 0 {
        return 0;
    }
    match CONTROL.get(0) {
        Some(&1) => {}
        _ => return 0,
    }
    let Some(st) = TICK.get_ptr_mut(0) else {
        return 0;
    };
    let Some(grid) = GRID.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `st` and `grid` point at the values of single-entry array maps, valid for
    // the whole program run; the timer runs on one CPU, so no other run aliases them.
    let cis490_common::grid::Scheduled { seq, late_ns } =
        unsafe { (*st).schedule(&mut *grid, now, cfg.interval_ns) };
    // SAFETY: as above.
    let now_sched = unsafe { (*st).sched_clock_at(now, sched_read, after) };
    // Events counted from now on (kvm, flow) belong to the next snapshot.
    if let Some(e) = crate::globals::TICK_EPOCH.get_ptr_mut(0) {
        // SAFETY: the single value of an array map; an aligned word store that the KVM
        // programs read with a single load.
        unsafe { core::ptr::write_volatile(e, seq + 1) };
    }
    let mut walk = SlotWalk {
        now,
        now_sched,
        seq,
        threads: 0,
        _pad: 0,
        lost: 0,
    };
    let Some(active) = ACTIVE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `active` is this CPU's map value. bpf_loop calls `list_active` once per
    // chunk of slots (no context): the verifier checks one chunk, not 512 slots.
    unsafe {
        (*active).n = 0;
        bpf_loop(
            chunks_to_list(seq),
            list_active as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    // SAFETY: bpf_loop calls `snapshot_slot` once per slot in use with `walk`, a stack
    // value that outlives the call. One loop body for the verifier to check, instead of
    // 512 unrolled copies of it (which took it over a minute on a busy machine).
    unsafe {
        let n = core::ptr::read_volatile(&raw const (*active).n);
        bpf_loop(
            if n < MAX_SLOTS { n } else { MAX_SLOTS },
            snapshot_slot as *mut c_void,
            (&raw mut walk).cast::<c_void>(),
            0,
        );
    }
    let threads = walk.threads;
    let mut lost = walk.lost;
    let nifs = if cfg.net_ifs < MAX_NET_IFS {
        cfg.net_ifs
    } else {
        MAX_NET_IFS
    };
    let ncpus = if cfg.ncpus < MAX_CPUS {
        cfg.ncpus
    } else {
        MAX_CPUS
    };
    for slot in 0..MAX_NET_IFS {
        if slot >= nifs {
            break;
        }
        let sum = NetStats {
            rx_bytes: 0,
            rx_packets: 0,
            tx_bytes: 0,
            tx_packets: 0,
        };
        let mut q = NetSum { slot, _pad: 0, sum };
        // SAFETY: bpf_loop calls `add_cpu_net` once per CPU with `q`, a stack value that
        // outlives the call (one body for the verifier instead of MAX_CPUS copies).
        unsafe {
            bpf_loop(
                ncpus,
                add_cpu_net as *mut c_void,
                (&raw mut q).cast::<c_void>(),
                0,
            );
        }
        let sum = q.sum;
        let r = NetRecord {
            kind: REC_NET,
            slot,
            seq,
            ktime_ns: now,
            stats: sum,
        };
        if SNAPS
            .output::<NetRecord>(&r, BPF_RB_NO_WAKEUP as u64)
            .is_err()
        {
            lost += 1;
        }
    }
    let (mm_rss_pages, mm_total_vm) = process_memory(o);
    // SAFETY: `st` is the single value of an array map, valid for the program run.
    unsafe {
        (*st).lost_records += lost;
        let t = TickRecord {
            kind: REC_TICK,
            threads,
            seq,
            ktime_ns: now,
            late_ns,
            lost_records: (*st).lost_records,
            unslotted: (*st).unslotted,
            mm_rss_pages,
            mm_total_vm,
            lost_in_snapshot: lost,
        };
        // The tick record wakes no one either: user space drains on its own schedule.
        if SNAPS
            .output::<TickRecord>(&t, BPF_RB_NO_WAKEUP as u64)
            .is_err()
        {
            (*st).lost_records += 1;
        }
    }
    0
}
