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

use crate::error::{Error, Result};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Byte offsets in `struct task_struct` of what the programs read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    /// `pid` (the thread id); `tgid` follows it directly, so one 8-byte read gets both.
    pub pid: u32,
    /// `flags` (PF_EXITING).
    pub flags: u32,
    /// `se.sum_exec_runtime`: the scheduler's on-CPU time of the task, the first field
    /// of /proc/<pid>/task/<tid>/schedstat.
    pub sum_exec_runtime: u32,
    /// `se.nr_migrations`.
    pub nr_migrations: u32,
    /// `sched_info.pcount`, followed by `sched_info.run_delay` (schedstat fields 3, 2).
    pub pcount: u32,
    /// `nvcsw`, followed by `nivcsw`.
    pub nvcsw: u32,
    /// `ioac`: the seven u64 of `struct task_io_accounting`, in /proc's io order.
    pub ioac: u32,
    /// `stats.nr_wakeups`, where the kernel has CONFIG_SCHEDSTATS.
    pub nr_wakeups: Option<u32>,
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
fn tail_len(kind: u32, vlen: u32) -> Result<u64> {
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
    let name_of = |off: u32| -> Option<&str> {
        names
            .iter()
            .find(|(_, offs)| offs.contains(&off))
            .map(|(n, _)| *n)
    };

    // 2. Stream the type records; decode members only of the wanted structs.
    r.seek(SeekFrom::Start(base + u64::from(type_off)))
        .map_err(|e| bad(format!("seeking to the types: {e}")))?;
    let mut found = Found::default();
    let mut done = 0u64;
    let mut id = 0u32;
    while done < u64::from(type_len) {
        id += 1;
        let [name_off, info, _size] = read_u32s::<3>(&mut r, "type record")?;
        let kind = (info >> 24) & 0x1f;
        let vlen = info & 0xffff;
        let kind_flag = info >> 31 == 1;
        let tail = tail_len(kind, vlen)?;
        done += 12 + tail;
        let sname = (kind == KIND_STRUCT).then(|| name_of(name_off)).flatten();
        let Some(sname) = sname.filter(|n| wanted.iter().any(|(s, _)| s == n)) else {
            r.seek_relative(tail as i64)
                .map_err(|e| bad(format!("skipping type {id}: {e}")))?;
            continue;
        };
        if found.structs.insert(sname.to_owned(), id).is_some() {
            return Err(bad(format!("two structs named {sname}")));
        }
        for _ in 0..vlen {
            let [m_name, m_type, m_off] = read_u32s::<3>(&mut r, "struct member")?;
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
        ("task_struct", "se"),
        ("task_struct", "sched_info"),
        ("task_struct", "nvcsw"),
        ("task_struct", "nivcsw"),
        ("task_struct", "ioac"),
        ("task_struct", "stats"),
        ("sched_entity", "sum_exec_runtime"),
        ("sched_entity", "nr_migrations"),
        ("sched_info", "pcount"),
        ("sched_info", "run_delay"),
        ("sched_statistics", "nr_wakeups"),
    ];
    wanted.extend(IOAC_MEMBERS.iter().map(|m| ("task_io_accounting", *m)));
    let found = find_members(r, &wanted)?;
    for s in [
        "task_struct",
        "sched_entity",
        "sched_info",
        "task_io_accounting",
    ] {
        if !found.structs.contains_key(s) {
            return Err(bad(format!("no struct {s}")));
        }
    }
    let pid = follows(&found, "task_struct", "pid", "tgid", 4)?;
    let flags = byte_offset(&found, "task_struct", "flags")?;
    let se = struct_member(&found, "task_struct", "se", "sched_entity")?;
    let si = struct_member(&found, "task_struct", "sched_info", "sched_info")?;
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
    Ok(TaskLayout {
        pid,
        flags,
        sum_exec_runtime: se + byte_offset(&found, "sched_entity", "sum_exec_runtime")?,
        nr_migrations: se + byte_offset(&found, "sched_entity", "nr_migrations")?,
        pcount: si + follows(&found, "sched_info", "pcount", "run_delay", 8)?,
        nvcsw: follows(&found, "task_struct", "nvcsw", "nivcsw", 8)?,
        ioac,
        nr_wakeups,
    })
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

    /// A kernel-like layout with the kinds a reader must step over around the structs.
    fn kernel_like(tgid_bits: u32, se_type: u32) -> Vec<u8> {
        let mut b = Blob::new();
        b.ty("int", 1, 0, false, 4); // 1
        b.u32s(&[32]);
        b.ty("long long unsigned int", 1, 0, false, 8); // 2
        b.u32s(&[64]);
        b.ty("", 13, 2, false, 0); // 3: FUNC_PROTO with two params
        b.u32s(&[0, 1, 0, 2]);
        b.ty("pid_t", 8, 0, false, 1); // 4: typedef
        b.ty("sched_entity", 4, 3, false, 64); // 5
        b.member("load", 2, 0);
        b.member("sum_exec_runtime", 2, 128);
        b.member("nr_migrations", 2, 320);
        b.ty("", 3, 0, false, 0); // 6: array
        b.u32s(&[1, 1, 16]);
        b.ty("state", 6, 2, false, 4); // 7: enum
        b.u32s(&[0, 0, 0, 1]);
        b.ty("sched_info", 4, 3, false, 48); // 8
        b.member("pcount", 2, 0);
        b.member("run_delay", 2, 64);
        b.member("last_arrival", 2, 128);
        b.ty("task_io_accounting", 4, 7, false, 56); // 9
        for (i, m) in IOAC_MEMBERS.iter().enumerate() {
            b.member(m, 2, i as u32 * 64);
        }
        // 10: task_struct with a bitfield (kind_flag: offsets carry a bitfield size).
        b.ty("task_struct", 4, 10, true, 4096);
        b.member("flags", 1, 3 << 24 | 64);
        b.member("se", se_type, 1024);
        b.member("sched_info", 8, 8064);
        b.member("pid", 4, 10112);
        b.member("tgid", 4, tgid_bits);
        b.member("comm", 6, 12000);
        b.member("nvcsw", 2, 12800);
        b.member("nivcsw", 2, 12864);
        b.member("ioac", 9, 16384);
        b.member("unused", 2, 20000);
        b.ty("task_struct", 7, 0, false, 0); // 11: a FWD of the same name is no struct
        b.bytes()
    }

    #[test]
    fn finds_task_struct_layout_in_a_hand_built_blob() {
        let l = task_layout(Cursor::new(kernel_like(10144, 5))).unwrap();
        assert_eq!(
            l,
            TaskLayout {
                pid: 1264,
                flags: 8,
                sum_exec_runtime: 128 + 16,
                nr_migrations: 128 + 40,
                pcount: 1008,
                nvcsw: 1600,
                ioac: 2048,
                nr_wakeups: None,
            }
        );
    }

    #[test]
    fn layout_errors_say_what_is_wrong() {
        let e = task_layout(Cursor::new(kernel_like(10208, 5))).unwrap_err();
        assert!(e.to_string().contains("does not follow pid"), "{e}");
        let e = task_layout(Cursor::new(kernel_like(10144, 2))).unwrap_err();
        assert!(e.to_string().contains("not a struct sched_entity"), "{e}");
        let mut blob = kernel_like(10144, 5);
        blob.truncate(200);
        assert!(task_layout(Cursor::new(blob)).is_err());
        let mut blob = kernel_like(10144, 5);
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
    }
}
