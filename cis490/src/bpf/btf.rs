//! A small streaming reader of kernel BTF: the byte offsets of the few `task_struct`
//! fields the programs read (Rust eBPF has no CO-RE relocations, so the
//! loader passes them in the `OFFSETS` global).
//!
//! It never holds the type section in memory: the string section is scanned once for the
//! wanted names, then the type records are streamed and only the wanted structs' members
//! are decoded (about 64 KiB of buffer, where a full parse of vmlinux BTF takes ~15 MiB,
//! and aya's loader does one of those itself a moment later).
//!
//! Format: Documentation/bpf/btf.rst (header, type section of `btf_type` records each
//! followed by a kind-specific tail, string section of NUL-terminated names).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use cis490_common::{Offsets, Window, WINDOW_WORDS};

use crate::error::{Error, Result};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// Byte offsets in `struct task_struct` (and the structs reached from it) of what the
/// programs read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    /// `pid` (the thread id); `tgid` follows it directly, so one 8-byte read gets both.
    pub pid: u32,
    /// `flags` (PF_EXITING).
    pub flags: u32,
    /// `thread_info.cpu` (u32): the CPU the task runs or last ran on.
    pub cpu: u32,
    /// `__state` (u32).
    pub state: u32,
    /// `on_cpu` (int).
    pub on_cpu: u32,
    /// `se.exec_start`: the run queue's clock_task when `sum_exec_runtime` was last
    /// brought up to date.
    pub exec_start: u32,
    /// `se.sum_exec_runtime`: the scheduler's on-CPU time of the task, the first field
    /// of /proc/<pid>/task/<tid>/schedstat.
    pub sum_exec_runtime: u32,
    /// `se.nr_migrations`.
    pub nr_migrations: u32,
    /// `se.cfs_rq` (CONFIG_FAIR_GROUP_SCHED): the way to the task's run queue.
    pub cfs_rq: Option<u32>,
    /// `sched_info.pcount`, followed by `sched_info.run_delay` (schedstat fields 3, 2).
    pub pcount: u32,
    /// `sched_info.last_queued`: the run queue clock when the task was queued, 0 when not.
    pub last_queued: u32,
    /// `utime`, `stime`, `prev_cputime.utime`, `prev_cputime.stime`.
    pub utime: u32,
    pub stime: u32,
    pub prev_utime: u32,
    pub prev_stime: u32,
    /// `nvcsw`, followed by `nivcsw`.
    pub nvcsw: u32,
    /// `min_flt`, `maj_flt`.
    pub min_flt: u32,
    pub maj_flt: u32,
    /// `ioac`: the seven u64 of `struct task_io_accounting`, in /proc's io order.
    pub ioac: u32,
    /// `stats.nr_wakeups`, where the kernel has CONFIG_SCHEDSTATS.
    pub nr_wakeups: Option<u32>,
    /// `cfs_rq.rq`, `rq.clock`, `rq.clock_task` (absent without CONFIG_FAIR_GROUP_SCHED).
    pub cfs_rq_rq: Option<u32>,
    pub rq_clock: Option<u32>,
    pub rq_clock_task: Option<u32>,
    /// `bpf_perf_event_data_kern.event` and `perf_event.hw.prev_count`.
    pub perf_ctx_event: Option<u32>,
    pub perf_event_prev_count: Option<u32>,
    /// The process's memory counters (the process row's rss_kb, vsize_bytes): `mm` in
    /// task_struct, `total_vm` and `rss_stat` in mm_struct, and `rss_stat`'s element size
    /// and counter offset. None: not found, those columns stay null.
    pub mm: Option<MmLayout>,
}

/// Where the process's memory counters are (see [`TaskLayout::mm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmLayout {
    pub task_mm: u32,
    pub total_vm: u32,
    pub rss_stat: u32,
    pub counter_size: u32,
    pub counter_count: u32,
}

/// The members of `struct task_io_accounting`, in the order the snapshot reads them.
pub const IOAC_MEMBERS: [&str; 7] = [
    "rchar",
    "wchar",
    "syscr",
    "syscw",
    "read_bytes",
    "write_bytes",
    "cancelled_write_bytes",
];

/// A member of a struct: offset in bits and its type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub bit_offset: u32,
    pub type_id: u32,
}

/// What [`find_members`] found: the type id of each wanted struct and the wanted members.
#[derive(Debug, Default)]
pub struct Found {
    pub structs: HashMap<String, u32>,
    pub members: HashMap<(String, String), Member>,
    /// Byte size of each wanted struct.
    pub sizes: HashMap<String, u32>,
}

/// Members of anonymous structs and unions met while streaming: the wanted-named ones
/// and the anonymous ones nested in them, by the anonymous type's id. Anonymous types
/// can come before or after the struct that embeds them, so the embedding is resolved
/// after the stream ([`resolve_anonymous`]).
#[derive(Default)]
struct Anonymous {
    /// Anonymous members of the wanted structs: (struct, type id, bit offset).
    in_wanted: Vec<(String, u32, u32)>,
    /// Anonymous type id → its members with a wanted name.
    named: HashMap<u32, Vec<(String, Member)>>,
    /// Anonymous type id → its own anonymous members (type id, bit offset).
    nested: HashMap<u32, Vec<(u32, u32)>>,
}

/// Wanted members not found directly in their struct, looked up through its anonymous
/// members (recursively; offsets add up), as C code names `mm->total_vm` although
/// total_vm sits in an anonymous struct inside mm_struct.
fn resolve_anonymous(found: &mut Found, anon: &Anonymous, wanted: &[(&str, &str)]) {
    fn search(anon: &Anonymous, ty: u32, base: u32, m: &str, depth: u32) -> Option<Member> {
        if depth > 8 {
            return None;
        }
        if let Some(hit) = anon
            .named
            .get(&ty)
            .and_then(|v| v.iter().find(|(n, _)| n == m))
        {
            return Some(Member {
                bit_offset: base + hit.1.bit_offset,
                type_id: hit.1.type_id,
            });
        }
        anon.nested
            .get(&ty)?
            .iter()
            .find_map(|&(inner, off)| search(anon, inner, base + off, m, depth + 1))
    }
    for (s, m) in wanted {
        let key = ((*s).to_owned(), (*m).to_owned());
        if found.members.contains_key(&key) {
            continue;
        }
        let hit = anon
            .in_wanted
            .iter()
            .filter(|(st, _, _)| st == s)
            .find_map(|&(_, ty, off)| search(anon, ty, off, m, 0));
        if let Some(member) = hit {
            found.members.insert(key, member);
        }
    }
}

fn bad(detail: impl Into<String>) -> Error {
    Error::parse("BTF", detail)
}

fn read_u32s<const N: usize>(r: &mut impl Read, what: &str) -> Result<[u32; N]> {
    let mut b = [0u8; 64];
    let b = &mut b[..N * 4];
    r.read_exact(b)
        .map_err(|e| bad(format!("truncated {what}: {e}")))?;
    let mut out = [0u32; N];
    for (i, c) in b.chunks_exact(4).enumerate() {
        out[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(out)
}

/// Size of the kind-specific data after a `btf_type` record.
pub(super) fn tail_len(kind: u32, vlen: u32) -> Result<u64> {
    let vlen = u64::from(vlen);
    Ok(match kind {
        // INT, VAR, DECL_TAG: one u32.
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
        2 | 7..=12 | 16 | 18 => 0,
        // ARRAY: btf_array.
        3 => 12,
        // STRUCT, UNION: btf_member; DATASEC: btf_var_secinfo; ENUM64: btf_enum64.
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM: btf_enum; FUNC_PROTO: btf_param.
        6 | 13 => 8 * vlen,
        k => {
            return Err(bad(format!(
                "unknown type kind {k} (a BTF newer than this reader)"
            )))
        }
    })
}

/// Find `wanted` (struct name, member name) pairs in a BTF blob. Each wanted struct must
/// exist once as a STRUCT; members not found are simply absent from the result.
pub fn find_members<R: Read + Seek>(r: R, wanted: &[(&str, &str)]) -> Result<Found> {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let [magic_ver, hdr_len, type_off, type_len, str_off, str_len] =
        read_u32s::<6>(&mut r, "header")?;
    let magic = magic_ver as u16;
    if magic != MAGIC {
        return Err(bad(if magic.swap_bytes() == MAGIC {
            "BTF of the other byte order".to_owned()
        } else {
            format!("bad magic {magic:#06x}")
        }));
    }
    if hdr_len < 24 {
        return Err(bad(format!("header length {hdr_len}")));
    }
    let base = u64::from(hdr_len);

    // 1. String offsets of every wanted name (BTF deduplicates strings, but nothing
    //    forbids duplicates, so keep all).
    let mut names: HashMap<&str, Vec<u32>> = HashMap::new();
    for (s, m) in wanted {
        names.entry(s).or_default();
        names.entry(m).or_default();
    }
    r.seek(SeekFrom::Start(base + u64::from(str_off)))
        .map_err(|e| bad(format!("seeking to the strings: {e}")))?;
    let mut strings = (&mut r).take(u64::from(str_len));
    let mut pos = 0u32;
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        let n = strings
            .read_until(0, &mut buf)
            .map_err(|e| bad(format!("reading the strings: {e}")))?;
        if n == 0 {
            break;
        }
        let s = buf.strip_suffix(&[0]).unwrap_or(&buf);
        if let Ok(s) = std::str::from_utf8(s) {
            if let Some(v) = names.get_mut(s) {
                v.push(pos);
            }
        }
        pos += n as u32;
    }
    if pos != str_len {
        return Err(bad(format!("string section: {pos} of {str_len} bytes")));
    }
    let by_offset: HashMap<u32, &str> = names
        .iter()
        .flat_map(|(n, offs)| offs.iter().map(move |o| (*o, *n)))
        .collect();
    let name_of = |off: u32| -> Option<&str> { by_offset.get(&off).copied() };
    let is_wanted_member = |m: &str| wanted.iter().any(|(_, w)| *w == m);
    let mut anon = Anonymous::default();

    // 2. Stream the type records; decode members only of the wanted structs.
    r.seek(SeekFrom::Start(base + u64::from(type_off)))
        .map_err(|e| bad(format!("seeking to the types: {e}")))?;
    let mut found = Found::default();
    let mut done = 0u64;
    let mut id = 0u32;
    while done < u64::from(type_len) {
        id += 1;
        let [name_off, info, size] = read_u32s::<3>(&mut r, "type record")?;
        let kind = (info >> 24) & 0x1f;
        let vlen = info & 0xffff;
        let kind_flag = info >> 31 == 1;
        let tail = tail_len(kind, vlen)?;
        done += 12 + tail;
        let bit_off = |m_off: u32| {
            if kind_flag {
                m_off & 0x00ff_ffff
            } else {
                m_off
            }
        };
        if (kind == KIND_STRUCT || kind == KIND_UNION) && name_off == 0 {
            // An anonymous struct or union: keep what a wanted member lookup may need.
            for _ in 0..vlen {
                let [m_name, m_type, m_off] = read_u32s::<3>(&mut r, "anonymous member")?;
                if m_name == 0 {
                    anon.nested
                        .entry(id)
                        .or_default()
                        .push((m_type, bit_off(m_off)));
                } else if let Some(mname) = name_of(m_name).filter(|n| is_wanted_member(n)) {
                    anon.named.entry(id).or_default().push((
                        mname.to_owned(),
                        Member {
                            bit_offset: bit_off(m_off),
                            type_id: m_type,
                        },
                    ));
                }
            }
            continue;
        }
        let sname = (kind == KIND_STRUCT).then(|| name_of(name_off)).flatten();
        let Some(sname) = sname.filter(|n| wanted.iter().any(|(s, _)| s == n)) else {
            r.seek_relative(tail as i64)
                .map_err(|e| bad(format!("skipping type {id}: {e}")))?;
            continue;
        };
        if found.structs.insert(sname.to_owned(), id).is_some() {
            return Err(bad(format!("two structs named {sname}")));
        }
        found.sizes.insert(sname.to_owned(), size);
        for _ in 0..vlen {
            let [m_name, m_type, m_off] = read_u32s::<3>(&mut r, "struct member")?;
            if m_name == 0 {
                anon.in_wanted
                    .push((sname.to_owned(), m_type, bit_off(m_off)));
                continue;
            }
            let Some(mname) = name_of(m_name) else {
                continue;
            };
            if wanted.iter().any(|(s, m)| *s == sname && *m == mname) {
                // With kind_flag the top 8 bits are a bitfield size, the rest the offset.
                let bit_offset = if kind_flag {
                    m_off & 0x00ff_ffff
                } else {
                    m_off
                };
                found.members.insert(
                    (sname.to_owned(), mname.to_owned()),
                    Member {
                        bit_offset,
                        type_id: m_type,
                    },
                );
            }
        }
    }
    if done != u64::from(type_len) {
        return Err(bad(format!("type section overruns its {type_len} bytes")));
    }
    resolve_anonymous(&mut found, &anon, wanted);
    Ok(found)
}

/// The byte offset of a member that must exist and be byte aligned.
fn byte_offset(found: &Found, s: &str, m: &str) -> Result<u32> {
    let mem = found
        .members
        .get(&(s.to_owned(), m.to_owned()))
        .ok_or_else(|| bad(format!("struct {s} has no member {m}")))?;
    if mem.bit_offset % 8 != 0 {
        return Err(bad(format!("{s}.{m} is not byte aligned")));
    }
    Ok(mem.bit_offset / 8)
}

/// `s.m` must be a member of struct type `inner`; its byte offset.
fn struct_member(found: &Found, s: &str, m: &str, inner: &str) -> Result<u32> {
    let mem = found
        .members
        .get(&(s.to_owned(), m.to_owned()))
        .ok_or_else(|| bad(format!("struct {s} has no member {m}")))?;
    if found.structs.get(inner) != Some(&mem.type_id) {
        return Err(bad(format!("{s}.{m} is not a struct {inner}")));
    }
    byte_offset(found, s, m)
}

/// `b` must sit `gap` bytes after `a` in struct `s` (the programs read them together).
fn follows(found: &Found, s: &str, a: &str, b: &str, gap: u32) -> Result<u32> {
    let at = byte_offset(found, s, a)?;
    let next = byte_offset(found, s, b)?;
    if next != at + gap {
        return Err(bad(format!(
            "{s}.{b} at {next} does not follow {a} at {at}"
        )));
    }
    Ok(at)
}

/// The `task_struct` layout from a BTF blob.
pub fn task_layout<R: Read + Seek>(r: R) -> Result<TaskLayout> {
    let mut wanted = vec![
        ("task_struct", "pid"),
        ("task_struct", "tgid"),
        ("task_struct", "flags"),
        ("task_struct", "thread_info"),
        ("task_struct", "__state"),
        ("task_struct", "on_cpu"),
        ("task_struct", "se"),
        ("task_struct", "sched_info"),
        ("task_struct", "utime"),
        ("task_struct", "stime"),
        ("task_struct", "prev_cputime"),
        ("task_struct", "nvcsw"),
        ("task_struct", "nivcsw"),
        ("task_struct", "min_flt"),
        ("task_struct", "maj_flt"),
        ("task_struct", "ioac"),
        ("task_struct", "stats"),
        ("thread_info", "cpu"),
        ("sched_entity", "exec_start"),
        ("sched_entity", "sum_exec_runtime"),
        ("sched_entity", "nr_migrations"),
        ("sched_entity", "cfs_rq"),
        ("sched_info", "pcount"),
        ("sched_info", "run_delay"),
        ("sched_info", "last_queued"),
        ("prev_cputime", "utime"),
        ("prev_cputime", "stime"),
        ("sched_statistics", "nr_wakeups"),
        ("cfs_rq", "rq"),
        ("rq", "clock"),
        ("rq", "clock_task"),
        ("bpf_perf_event_data_kern", "event"),
        ("perf_event", "hw"),
        ("hw_perf_event", "prev_count"),
        ("task_struct", "mm"),
        ("mm_struct", "total_vm"),
        ("mm_struct", "rss_stat"),
        ("percpu_counter", "count"),
        ("mm_rss_stat", "count"),
    ];
    wanted.extend(IOAC_MEMBERS.iter().map(|m| ("task_io_accounting", *m)));
    let found = find_members(r, &wanted)?;
    for s in [
        "task_struct",
        "thread_info",
        "sched_entity",
        "sched_info",
        "prev_cputime",
        "task_io_accounting",
    ] {
        if !found.structs.contains_key(s) {
            return Err(bad(format!("no struct {s}")));
        }
    }
    let pid = follows(&found, "task_struct", "pid", "tgid", 4)?;
    let flags = byte_offset(&found, "task_struct", "flags")?;
    let ti = struct_member(&found, "task_struct", "thread_info", "thread_info")?;
    let se = struct_member(&found, "task_struct", "se", "sched_entity")?;
    let si = struct_member(&found, "task_struct", "sched_info", "sched_info")?;
    let pc = struct_member(&found, "task_struct", "prev_cputime", "prev_cputime")?;
    let ioac = struct_member(&found, "task_struct", "ioac", "task_io_accounting")?;
    for (i, pair) in IOAC_MEMBERS.windows(2).enumerate() {
        let at = follows(&found, "task_io_accounting", pair[0], pair[1], 8)?;
        if at != i as u32 * 8 {
            return Err(bad(format!(
                "task_io_accounting.{} at {at}, expected {}",
                pair[0],
                i * 8
            )));
        }
    }
    // Without CONFIG_SCHEDSTATS there is no `stats` member: no wakeup count.
    let nr_wakeups = match (
        struct_member(&found, "task_struct", "stats", "sched_statistics"),
        byte_offset(&found, "sched_statistics", "nr_wakeups"),
    ) {
        (Ok(st), Ok(w)) => Some(st + w),
        _ => None,
    };
    // The running slice needs the run queue (CONFIG_FAIR_GROUP_SCHED gives se.cfs_rq and
    // cfs_rq.rq) and the perf event's clock; without them it is simply not added.
    let opt = |s: &str, m: &str| byte_offset(&found, s, m).ok();
    let rq_path = match (opt("sched_entity", "cfs_rq"), opt("cfs_rq", "rq")) {
        (Some(c), Some(r)) => Some((se + c, r)),
        _ => None,
    };
    let perf = match (
        opt("bpf_perf_event_data_kern", "event"),
        struct_member(&found, "perf_event", "hw", "hw_perf_event").ok(),
        opt("hw_perf_event", "prev_count"),
    ) {
        (Some(e), Some(hw), Some(p)) => Some((e, hw + p)),
        _ => None,
    };
    // rss_stat: an array of `struct percpu_counter` since Linux 6.2 (/proc reads each
    // one's `count`); before, a `struct mm_rss_stat` of atomic_long_t count[].
    let mm = (|| {
        let task_mm = opt("task_struct", "mm")?;
        let total_vm = opt("mm_struct", "total_vm")?;
        let rss = found
            .members
            .get(&("mm_struct".to_owned(), "rss_stat".to_owned()))?;
        if rss.bit_offset % 8 != 0 {
            return None;
        }
        let old = found.structs.get("mm_rss_stat") == Some(&rss.type_id);
        let (rss_stat, counter_size, counter_count) = if old {
            (rss.bit_offset / 8 + opt("mm_rss_stat", "count")?, 8, 0)
        } else {
            (
                rss.bit_offset / 8,
                *found.sizes.get("percpu_counter")?,
                opt("percpu_counter", "count")?,
            )
        };
        Some(MmLayout {
            task_mm,
            total_vm,
            rss_stat,
            counter_size,
            counter_count,
        })
    })();
    Ok(TaskLayout {
        mm,
        pid,
        flags,
        cpu: ti + byte_offset(&found, "thread_info", "cpu")?,
        state: byte_offset(&found, "task_struct", "__state")?,
        on_cpu: byte_offset(&found, "task_struct", "on_cpu")?,
        exec_start: se + byte_offset(&found, "sched_entity", "exec_start")?,
        sum_exec_runtime: se + byte_offset(&found, "sched_entity", "sum_exec_runtime")?,
        nr_migrations: se + byte_offset(&found, "sched_entity", "nr_migrations")?,
        cfs_rq: rq_path.map(|p| p.0),
        pcount: si + follows(&found, "sched_info", "pcount", "run_delay", 8)?,
        last_queued: si + byte_offset(&found, "sched_info", "last_queued")?,
        utime: byte_offset(&found, "task_struct", "utime")?,
        stime: byte_offset(&found, "task_struct", "stime")?,
        prev_utime: pc + byte_offset(&found, "prev_cputime", "utime")?,
        prev_stime: pc + byte_offset(&found, "prev_cputime", "stime")?,
        nvcsw: follows(&found, "task_struct", "nvcsw", "nivcsw", 8)?,
        min_flt: byte_offset(&found, "task_struct", "min_flt")?,
        maj_flt: byte_offset(&found, "task_struct", "maj_flt")?,
        ioac,
        nr_wakeups,
        cfs_rq_rq: rq_path.map(|p| p.1),
        rq_clock: opt("rq", "clock"),
        rq_clock_task: opt("rq", "clock_task"),
        perf_ctx_event: perf.map(|p| p.0),
        perf_event_prev_count: perf.map(|p| p.1),
    })
}

/// A window over the given byte offsets of one struct: from the lowest, rounded down to
/// a word, to the end of the word holding the highest. `what` names it in errors.
fn window_over(what: &str, offsets: &[u32]) -> Result<Window> {
    let lo = offsets.iter().min().copied().unwrap_or(0) & !7;
    let hi = offsets.iter().max().copied().unwrap_or(0);
    let words = (hi - lo) / 8 + 1;
    if words > WINDOW_WORDS {
        return Err(bad(format!(
            "{what}: fields {lo}..{hi} span {words} words, more than the {WINDOW_WORDS} one read takes"
        )));
    }
    Ok(Window { off: lo, words })
}

/// Word index of 8-byte field `at` in window `w` (it must be word aligned).
fn word_at(w: &Window, what: &str, at: u32) -> Result<u32> {
    if !at.is_multiple_of(8) {
        return Err(bad(format!("{what} at {at} is not 8-byte aligned")));
    }
    Ok((at - w.off) / 8)
}

/// Byte position of 4-byte field `at` in window `w` (it must be 4-byte aligned).
fn u32_at(w: &Window, what: &str, at: u32) -> Result<u32> {
    if !at.is_multiple_of(4) {
        return Err(bad(format!("{what} at {at} is not 4-byte aligned")));
    }
    Ok(at - w.off)
}

/// Fill the task_struct part of the snapshot program's `Offsets` from a layout: the
/// fields grouped into windows read with one probe each (pure: unit-tested).
pub fn snapshot_offsets(l: &TaskLayout, o: &mut Offsets) -> Result<()> {
    o.task_pid = l.pid;
    o.task_flags = l.flags;
    o.task_ioac = l.ioac;
    o.head = window_over(
        "task_struct cpu/__state/on_cpu",
        &[l.cpu, l.state, l.on_cpu],
    )?;
    o.head_cpu_at = u32_at(&o.head, "thread_info.cpu", l.cpu)?;
    o.head_state_at = u32_at(&o.head, "__state", l.state)?;
    o.head_on_cpu_at = u32_at(&o.head, "on_cpu", l.on_cpu)?;
    let mut se = vec![l.exec_start, l.sum_exec_runtime, l.nr_migrations];
    se.extend(l.cfs_rq);
    o.se = window_over("sched_entity", &se)?;
    o.se_exec_start_at = word_at(&o.se, "se.exec_start", l.exec_start)?;
    o.se_sum_exec_runtime_at = word_at(&o.se, "se.sum_exec_runtime", l.sum_exec_runtime)?;
    o.se_nr_migrations_at = word_at(&o.se, "se.nr_migrations", l.nr_migrations)?;
    o.se_cfs_rq_at = match l.cfs_rq {
        Some(c) => word_at(&o.se, "se.cfs_rq", c)?,
        None => 0,
    };
    o.sched_info = window_over("sched_info", &[l.pcount, l.pcount + 8, l.last_queued])?;
    o.si_pcount_at = word_at(&o.sched_info, "sched_info.pcount", l.pcount)?;
    o.si_run_delay_at = o.si_pcount_at + 1;
    o.si_last_queued_at = word_at(&o.sched_info, "sched_info.last_queued", l.last_queued)?;
    o.times = window_over(
        "task_struct utime..maj_flt",
        &[
            l.utime,
            l.stime,
            l.prev_utime,
            l.prev_stime,
            l.nvcsw,
            l.nvcsw + 8,
            l.min_flt,
            l.maj_flt,
        ],
    )?;
    let t = o.times;
    o.tm_utime_at = word_at(&t, "utime", l.utime)?;
    o.tm_stime_at = word_at(&t, "stime", l.stime)?;
    o.tm_prev_utime_at = word_at(&t, "prev_cputime.utime", l.prev_utime)?;
    o.tm_prev_stime_at = word_at(&t, "prev_cputime.stime", l.prev_stime)?;
    o.tm_nvcsw_at = word_at(&t, "nvcsw", l.nvcsw)?;
    o.tm_nivcsw_at = o.tm_nvcsw_at + 1;
    o.tm_min_flt_at = word_at(&t, "min_flt", l.min_flt)?;
    o.tm_maj_flt_at = word_at(&t, "maj_flt", l.maj_flt)?;
    // The running slice: all of the run queue path and the perf clock, or none.
    match (
        l.cfs_rq_rq,
        l.rq_clock,
        l.rq_clock_task,
        l.perf_ctx_event,
        l.perf_event_prev_count,
    ) {
        (Some(rq), Some(clock), Some(clock_task), Some(ev), Some(prev))
            if clock_task > clock && l.cfs_rq.is_some() =>
        {
            o.cfs_rq_rq = rq;
            o.rq_clocks = window_over("rq clock..clock_task", &[clock, clock_task])?;
            o.rq_clock_task_at = word_at(&o.rq_clocks, "rq.clock_task", clock_task)?;
            if o.rq_clocks.off != clock {
                return Err(bad(format!("rq.clock at {clock} is not 8-byte aligned")));
            }
            o.perf_ctx_event = ev;
            o.perf_event_prev_count = prev;
        }
        _ => {
            o.cfs_rq_rq = 0;
            o.perf_event_prev_count = 0;
        }
    }
    match l.mm {
        Some(m) => {
            o.task_mm = m.task_mm;
            o.mm_total_vm = m.total_vm;
            o.mm_rss_stat = m.rss_stat;
            o.rss_counter_size = m.counter_size;
            o.rss_counter_count = m.counter_count;
        }
        None => o.task_mm = 0,
    }
    Ok(())
}

/// The running kernel's `task_struct` layout, from /sys/kernel/btf/vmlinux.
pub fn vmlinux_task_layout() -> Result<TaskLayout> {
    let path = Path::new(VMLINUX);
    let f = std::fs::File::open(path).map_err(|e| {
        Error::io(
            format!(
                "{VMLINUX} (kernel BTF, CONFIG_DEBUG_INFO_BTF, is needed for task_struct offsets)"
            ),
            e,
        )
    })?;
    task_layout(f).map_err(|e| Error::Other(format!("{VMLINUX}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A hand-built BTF blob: strings, and type records appended by the helpers.
    struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Blob {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn u32s(&mut self, v: &[u32]) {
            for x in v {
                self.types.extend_from_slice(&x.to_le_bytes());
            }
        }
        fn ty(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, size: u32) {
            let n = if name.is_empty() { 0 } else { self.s(name) };
            self.u32s(&[n, (kind_flag as u32) << 31 | kind << 24 | vlen, size]);
        }
        fn member(&mut self, name: &str, type_id: u32, off: u32) {
            let n = self.s(name);
            self.u32s(&[n, type_id, off]);
        }
        /// An anonymous member (name offset 0, as in real BTF).
        fn anon_member(&mut self, type_id: u32, off: u32) {
            self.u32s(&[0, type_id, off]);
        }
        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            for v in [
                u32::from(MAGIC) | 1 << 16,
                24,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A kernel-like layout (Linux 6.18 x86_64's offsets) with the kinds a reader must
    /// step over around the structs.
    fn kernel_like(tgid_bits: u32, se_type: u32) -> Vec<u8> {
        let mut b = Blob::new();
        b.ty("int", 1, 0, false, 4); // 1
        b.u32s(&[32]);
        b.ty("long long unsigned int", 1, 0, false, 8); // 2
        b.u32s(&[64]);
        b.ty("", 13, 2, false, 0); // 3: FUNC_PROTO with two params
        b.u32s(&[0, 1, 0, 2]);
        b.ty("pid_t", 8, 0, false, 1); // 4: typedef
        b.ty("sched_entity", 4, 5, false, 256); // 5
        b.member("load", 2, 0);
        b.member("exec_start", 2, 96 * 8);
        b.member("sum_exec_runtime", 2, 104 * 8);
        b.member("nr_migrations", 2, 144 * 8);
        b.member("cfs_rq", 2, 168 * 8);
        b.ty("", 3, 0, false, 0); // 6: array
        b.u32s(&[1, 1, 16]);
        b.ty("state", 6, 2, false, 4); // 7: enum
        b.u32s(&[0, 0, 0, 1]);
        b.ty("sched_info", 4, 4, false, 48); // 8
        b.member("pcount", 2, 0);
        b.member("run_delay", 2, 64);
        b.member("last_arrival", 2, 32 * 8);
        b.member("last_queued", 2, 40 * 8);
        b.ty("task_io_accounting", 4, 7, false, 56); // 9
        for (i, m) in IOAC_MEMBERS.iter().enumerate() {
            b.member(m, 2, i as u32 * 64);
        }
        b.ty("thread_info", 4, 2, false, 24); // 10
        b.member("flags", 2, 0);
        b.member("cpu", 1, 20 * 8);
        b.ty("prev_cputime", 4, 2, false, 24); // 11
        b.member("utime", 2, 0);
        b.member("stime", 2, 64);
        // 12: task_struct with a bitfield (kind_flag: offsets carry a bitfield size).
        b.ty("task_struct", 4, 21, true, 4096);
        b.member("mm", 2, 1136 * 8);
        b.member("thread_info", 10, 0);
        b.member("__state", 1, 24 * 8);
        b.member("flags", 1, (3 << 24) | (44 * 8));
        b.member("on_cpu", 1, 52 * 8);
        b.member("se", se_type, 128 * 8);
        b.member("sched_info", 8, 1008 * 8);
        b.member("pid", 4, 1264 * 8);
        b.member("tgid", 4, tgid_bits);
        b.member("comm", 6, 1400 * 8);
        b.member("utime", 2, 1488 * 8);
        b.member("stime", 2, 1496 * 8);
        b.member("gtime", 2, 1504 * 8);
        b.member("prev_cputime", 11, 1512 * 8);
        b.member("nvcsw", 2, 1536 * 8);
        b.member("nivcsw", 2, 1544 * 8);
        b.member("min_flt", 2, 1568 * 8);
        b.member("maj_flt", 2, 1576 * 8);
        b.member("ioac", 9, 2152 * 8);
        b.member("unused", 2, 3000 * 8);
        b.member("last", 2, 4000 * 8);
        b.ty("task_struct", 7, 0, false, 0); // 13: a FWD of the same name is no struct
        b.ty("cfs_rq", 4, 1, false, 512); // 14
        b.member("rq", 2, 312 * 8);
        b.ty("rq", 4, 2, false, 3584); // 15
        b.member("clock", 2, 2776 * 8);
        b.member("clock_task", 2, 2816 * 8);
        b.ty("bpf_perf_event_data_kern", 4, 1, false, 24); // 16
        b.member("event", 2, 16 * 8);
        b.ty("perf_event", 4, 1, false, 1352); // 17
        b.member("hw", 18, 360 * 8);
        b.ty("hw_perf_event", 4, 1, false, 208); // 18
        b.member("prev_count", 2, 144 * 8);
        // mm_struct as Linux 6.18 has it: everything in an anonymous struct (defined
        // after it), total_vm one level deeper in an anonymous union, rss_stat an array
        // of struct percpu_counter.
        b.ty("mm_struct", 4, 2, false, 1472); // 19
        b.anon_member(21, 0);
        b.member("cpu_bitmap", 2, 1464 * 8);
        b.ty("percpu_counter", 4, 2, false, 40); // 20
        b.member("lock", 1, 0);
        b.member("count", 2, 64);
        b.ty("", 4, 2, false, 1464); // 21: anonymous struct
        b.anon_member(22, 8 * 8);
        b.member("rss_stat", 23, 968 * 8);
        b.ty("", 5, 1, false, 1400); // 22: anonymous union
        b.member("total_vm", 2, 360 * 8);
        b.ty("", 3, 0, false, 0); // 23: percpu_counter[4]
        b.u32s(&[20, 1, 4]);
        b.bytes()
    }

    #[test]
    fn finds_task_struct_layout_in_a_hand_built_blob() {
        let l = task_layout(Cursor::new(kernel_like(1268 * 8, 5))).unwrap();
        assert_eq!(
            (l.pid, l.flags, l.cpu, l.state, l.on_cpu),
            (1264, 44, 20, 24, 52)
        );
        assert_eq!(
            (l.exec_start, l.sum_exec_runtime, l.nr_migrations, l.cfs_rq),
            (224, 232, 272, Some(296))
        );
        assert_eq!((l.pcount, l.last_queued), (1008, 1048));
        assert_eq!(
            (l.utime, l.stime, l.prev_utime, l.prev_stime, l.nvcsw),
            (1488, 1496, 1512, 1520, 1536)
        );
        assert_eq!(
            (l.min_flt, l.maj_flt, l.ioac, l.nr_wakeups),
            (1568, 1576, 2152, None)
        );
        assert_eq!(
            (l.cfs_rq_rq, l.rq_clock, l.rq_clock_task),
            (Some(312), Some(2776), Some(2816))
        );
        assert_eq!(
            (l.perf_ctx_event, l.perf_event_prev_count),
            (Some(16), Some(504))
        );
        // Through two anonymous levels: 0 + 8 + 360 = 368.
        assert_eq!(
            l.mm,
            Some(MmLayout {
                task_mm: 1136,
                total_vm: 368,
                rss_stat: 968,
                counter_size: 40,
                counter_count: 8
            })
        );
    }

    #[test]
    fn members_in_anonymous_types_defined_before_their_struct_are_found() {
        let mut b = Blob::new();
        b.ty("long", 1, 0, false, 8); // 1
        b.u32s(&[64]);
        b.ty("", 5, 1, false, 8); // 2: anonymous union, before its struct
        b.member("total_vm", 1, 0);
        b.ty("mm_struct", 4, 2, false, 64); // 3
        b.member("x", 1, 0);
        b.anon_member(2, 16 * 8);
        let f = find_members(Cursor::new(b.bytes()), &[("mm_struct", "total_vm")]).unwrap();
        assert_eq!(
            f.members[&("mm_struct".to_owned(), "total_vm".to_owned())].bit_offset,
            16 * 8
        );
        assert_eq!(f.sizes["mm_struct"], 64);
    }

    #[test]
    fn windows_of_a_linux_6_18_layout_are_the_built_in_offsets() {
        let l = task_layout(Cursor::new(kernel_like(1268 * 8, 5))).unwrap();
        // Start from nonsense in every task field: all must be set from the layout.
        let mut o = Offsets::LINUX_6_18;
        let w = Window { off: 9, words: 99 };
        (o.head, o.se, o.sched_info, o.times, o.rq_clocks) = (w, w, w, w, w);
        o.head_on_cpu_at = 77;
        o.se_cfs_rq_at = 77;
        o.si_last_queued_at = 77;
        o.tm_maj_flt_at = 77;
        o.rq_clock_task_at = 77;
        o.perf_event_prev_count = 77;
        snapshot_offsets(&l, &mut o).unwrap();
        assert_eq!(o, Offsets::LINUX_6_18);
    }

    #[test]
    fn without_the_run_queue_path_no_running_slice_is_configured() {
        let mut l = task_layout(Cursor::new(kernel_like(1268 * 8, 5))).unwrap();
        l.cfs_rq_rq = None;
        let mut o = Offsets::LINUX_6_18;
        snapshot_offsets(&l, &mut o).unwrap();
        assert_eq!((o.cfs_rq_rq, o.perf_event_prev_count), (0, 0));
    }

    #[test]
    fn fields_too_far_apart_for_one_window_are_refused_with_their_names() {
        let mut l = task_layout(Cursor::new(kernel_like(1268 * 8, 5))).unwrap();
        l.maj_flt = l.utime + 8 * WINDOW_WORDS;
        let e = snapshot_offsets(&l, &mut Offsets::default()).unwrap_err();
        assert!(e.to_string().contains("utime..maj_flt"), "{e}");
        let mut l = task_layout(Cursor::new(kernel_like(1268 * 8, 5))).unwrap();
        l.min_flt += 4;
        let e = snapshot_offsets(&l, &mut Offsets::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("min_flt at 1572 is not 8-byte aligned"),
            "{e}"
        );
    }

    #[test]
    fn layout_errors_say_what_is_wrong() {
        let e = task_layout(Cursor::new(kernel_like(1276 * 8, 5))).unwrap_err();
        assert!(e.to_string().contains("does not follow pid"), "{e}");
        let e = task_layout(Cursor::new(kernel_like(1268 * 8, 2))).unwrap_err();
        assert!(e.to_string().contains("not a struct sched_entity"), "{e}");
        let mut blob = kernel_like(1268 * 8, 5);
        blob.truncate(200);
        assert!(task_layout(Cursor::new(blob)).is_err());
        let mut blob = kernel_like(1268 * 8, 5);
        blob[0] = 0;
        let e = task_layout(Cursor::new(blob)).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        let mut b = Blob::new();
        b.ty("int", 1, 0, false, 4);
        b.u32s(&[32]);
        let e = task_layout(Cursor::new(b.bytes())).unwrap_err();
        assert!(e.to_string().contains("no struct task_struct"), "{e}");
        let mut b = Blob::new();
        b.ty("x", 25, 0, false, 4);
        let e = task_layout(Cursor::new(b.bytes())).unwrap_err();
        assert!(e.to_string().contains("unknown type kind 25"), "{e}");
    }

    /// The running kernel's own BTF (kernel-touching: needs CONFIG_DEBUG_INFO_BTF, which
    /// the BPF backend requires anyway).
    #[test]
    fn vmlinux_has_a_usable_task_struct() {
        let l = vmlinux_task_layout().unwrap();
        assert!(l.pid > 0 && l.pid < 16384, "{l:?}");
        for off in [
            l.sum_exec_runtime,
            l.nr_migrations,
            l.pcount,
            l.nvcsw,
            l.ioac,
        ] {
            assert!(off > 0 && off < 16384, "{l:?}");
        }
        let mut o = Offsets::LINUX_6_18;
        snapshot_offsets(&l, &mut o).unwrap();
        assert!(
            o.perf_event_prev_count != 0,
            "the sched_clock source: {l:?}"
        );
        // mm_struct keeps its counters in an anonymous struct (6.18): found through it.
        let mm = l.mm.expect("mm_struct's total_vm and rss_stat");
        assert!(
            mm.total_vm > 0 && mm.rss_stat > 0 && mm.counter_size >= 8,
            "{mm:?}"
        );
    }
}
