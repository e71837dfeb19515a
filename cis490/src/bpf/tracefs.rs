//! tracefs: where it is, mounting it when it is not, and the field offsets of the
//! tracepoints the programs read (parsed from `events/<category>/<name>/format`).

use std::path::{Path, PathBuf};

use super::error::BpfError;
use cis490_common::{KvmOffsets, Offsets};

/// An error of this stage (see [`BpfError`]).
fn tracefs_err(msg: impl Into<String>) -> BpfError {
    BpfError::Tracefs(msg.into())
}

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Every tracepoint the programs attach to, as (category, name). The net ones are only
/// attached when there are interfaces to watch. The sched ones are raw tracepoints,
/// attached by name and read through their arguments: no format offsets. They follow
/// the target's thread set; its counters are read by the snapshot program.
pub const SCHED_TRACEPOINTS: &[(&str, &str)] = &[
    ("sched", "sched_process_fork"),
    ("sched", "sched_process_exit"),
];
pub const BLOCK_TRACEPOINT: (&str, &str) = ("block", "block_rq_issue");
pub const NET_TRACEPOINTS: &[(&str, &str)] =
    &[("net", "net_dev_xmit"), ("net", "netif_receive_skb")];

/// The KVM tracepoints (attached when the target is a KVM VM), as (program, name) in
/// category `kvm`; all but kvm_exit are attached as raw tracepoints (their arguments are
/// read, see cis490-ebpf/src/kvm.rs), kvm_exit as a tracepoint (its record is read).
pub const KVM_TRACEPOINTS: &[(&str, &str)] = &[
    ("cis490_kvm_exit", "kvm_exit"),
    ("cis490_kvm_userspace_exit", "kvm_userspace_exit"),
    ("cis490_kvm_pio", "kvm_pio"),
    ("cis490_kvm_mmio", "kvm_mmio"),
    ("cis490_kvm_fast_mmio", "kvm_fast_mmio"),
    ("cis490_kvm_msr", "kvm_msr"),
    ("cis490_kvm_cpuid", "kvm_cpuid"),
    ("cis490_kvm_hypercall", "kvm_hypercall"),
    ("cis490_kvm_emulate_insn", "kvm_emulate_insn"),
    ("cis490_kvm_vcpu_wakeup", "kvm_vcpu_wakeup"),
];

/// The raw-tracepoint programs' arguments, by the names their tracepoint's format gives
/// the fields that record them, in argument order: a kernel whose format lists other
/// fields first has changed the tracepoint, and the kvm programs stay off rather than
/// count the wrong argument. (kvm_emulate_insn records more than its arguments: only its
/// `failed` is checked.)
const KVM_ARGS: &[(&str, &[&str])] = &[
    ("kvm_userspace_exit", &["reason", "errno"]),
    ("kvm_pio", &["rw", "port", "size", "count"]),
    ("kvm_mmio", &["type", "len", "gpa"]),
    ("kvm_fast_mmio", &["gpa"]),
    ("kvm_msr", &["write", "ecx", "data", "exception"]),
    ("kvm_cpuid", &["function", "index"]),
    ("kvm_hypercall", &["nr", "a0", "a1", "a2", "a3"]),
    ("kvm_vcpu_wakeup", &["ns", "waited", "valid"]),
];

/// All tracepoints used, for `cis490 doctor`.
pub fn all_tracepoints() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = SCHED_TRACEPOINTS
        .iter()
        .map(|(c, n)| (c.to_string(), n.to_string()))
        .collect();
    v.push((BLOCK_TRACEPOINT.0.into(), BLOCK_TRACEPOINT.1.into()));
    for (c, n) in NET_TRACEPOINTS {
        v.push((c.to_string(), n.to_string()));
    }
    for (_, n) in KVM_TRACEPOINTS {
        v.push(("kvm".to_owned(), n.to_string()));
    }
    v
}

/// The mounted tracefs, if any (the debugfs location counts too).
pub fn find() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut parts = line.split_whitespace();
        let (_, Some(dir), Some(fstype)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if fstype == "tracefs" && (dir == TRACEFS || dir == DEBUGFS_TRACING) {
            return Some(PathBuf::from(dir));
        }
    }
    None
}

/// The mounted tracefs, mounting it at /sys/kernel/tracing first if needed. `Err` is the
/// exact cause, for `backend.fallback_reason`.
pub fn ensure_mounted() -> Result<PathBuf, BpfError> {
    if let Some(p) = find() {
        return Ok(p);
    }
    let src = c"nodev";
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(tracefs_err(format!(
            "tracefs is not mounted and `mount -t tracefs nodev {TRACEFS}` failed: {e} \
             (needs CAP_SYS_ADMIN; or mount it once as root)"
        )));
    }
    Ok(PathBuf::from(TRACEFS))
}

/// One `field:` line of a format file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// Parse a tracepoint `format` file into its fields.
pub fn parse_format(text: &str) -> Vec<Field> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse().ok();
            } else if decl.is_none() && !part.is_empty() {
                decl = Some(part.to_owned());
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // "char prev_comm[16]" → "prev_comm"; "__data_loc char[] name" → "name".
        let last = decl.split_whitespace().last().unwrap_or("");
        let name = last.split('[').next().unwrap_or("").to_owned();
        out.push(Field { name, offset, size });
    }
    out
}

/// Read and parse `events/<category>/<name>/format`; `Err` says which tracepoint is missing.
pub fn format(root: &Path, category: &str, name: &str) -> Result<Vec<Field>, BpfError> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        tracefs_err({
            format!(
                "tracepoint {category}:{name} unavailable ({}: {e})",
                path.display()
            )
        })
    })?;
    Ok(parse_format(&text))
}

fn field(fields: &[Field], tp: &str, name: &str, size: u32) -> Result<u32, BpfError> {
    let f = fields
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| tracefs_err(format!("tracepoint {tp} has no field `{name}`")))?;
    if f.size != size {
        return Err(tracefs_err(format!(
            "tracepoint {tp} field `{name}` has size {} (expected {size})",
            f.size
        )));
    }
    Ok(f.offset)
}

/// The offsets of every tracepoint field the programs read, from the running kernel's
/// formats (the task_struct offsets come from BTF, see `btf`).
/// `with_net`: whether the net tracepoints are needed.
pub fn offsets(root: &Path, with_net: bool) -> Result<Offsets, BpfError> {
    let mut o = Offsets::LINUX_6_18;
    let bl = format(root, BLOCK_TRACEPOINT.0, BLOCK_TRACEPOINT.1)?;
    o.blk_bytes = field(&bl, "block:block_rq_issue", "bytes", 4)?;
    let rwbs = bl.iter().find(|f| f.name == "rwbs").ok_or(tracefs_err(
        "tracepoint block:block_rq_issue has no field `rwbs`",
    ))?;
    o.blk_rwbs = rwbs.offset;
    if with_net {
        let x = format(root, "net", "net_dev_xmit")?;
        o.xmit_len = field(&x, "net:net_dev_xmit", "len", 4)?;
        o.xmit_rc = field(&x, "net:net_dev_xmit", "rc", 4)?;
        o.xmit_name = field(&x, "net:net_dev_xmit", "name", 4)?;
        let r = format(root, "net", "netif_receive_skb")?;
        o.recv_len = field(&r, "net:netif_receive_skb", "len", 4)?;
        o.recv_name = field(&r, "net:netif_receive_skb", "name", 4)?;
    }
    Ok(o)
}

/// The offset of kvm_exit's `exit_reason` (the one record field the kvm programs read),
/// after checking that every other KVM tracepoint exists with the arguments the raw
/// programs read (see [`KVM_ARGS`]).
pub fn kvm_offsets(root: &Path) -> Result<KvmOffsets, BpfError> {
    let mut o = KvmOffsets::LINUX_6_18;
    o.exit_reason = field(
        &format(root, "kvm", "kvm_exit")?,
        "kvm:kvm_exit",
        "exit_reason",
        4,
    )?;
    for (tp, args) in KVM_ARGS {
        let fields = format(root, "kvm", tp)?;
        let names: Vec<&str> = fields
            .iter()
            .map(|f| f.name.as_str())
            .filter(|n| !n.starts_with("common_"))
            .take(args.len())
            .collect();
        if names != *args {
            return Err(tracefs_err(format!(
                "tracepoint kvm:{tp} records {names:?} first, not its arguments {args:?} as on the kernels cis490 knows"
            )));
        }
    }
    let e = format(root, "kvm", "kvm_emulate_insn")?;
    if !e.iter().any(|f| f.name == "failed") {
        return Err(tracefs_err(
            "tracepoint kvm:kvm_emulate_insn has no field `failed`",
        ));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWITCH: &str = "name: sched_switch
ID: 330
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;
\tfield:int next_prio;\toffset:60;\tsize:4;\tsigned:1;

print fmt: \"prev_comm=%s\"
";

    #[test]
    fn parses_sched_switch_format() {
        let f = parse_format(SWITCH);
        let get = |n: &str| f.iter().find(|x| x.name == n).cloned().unwrap();
        assert_eq!(get("prev_pid").offset, 24);
        assert_eq!(get("prev_state").size, 8);
        assert_eq!(get("next_pid").offset, 56);
        assert_eq!(get("prev_comm").size, 16);
        assert_eq!(get("common_pid").offset, 4);
        assert_eq!(field(&f, "t", "next_pid", 4), Ok(56));
        let e = field(&f, "t", "next_pid", 8).unwrap_err();
        assert!(
            matches!(&e, BpfError::Tracefs(m) if m.contains("size")),
            "{e}"
        );
        assert!(field(&f, "t", "child_pid", 4)
            .unwrap_err()
            .to_string()
            .contains("child_pid"));
    }

    #[test]
    fn parses_data_loc_fields() {
        let f = parse_format(
            "\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;\n\
             \tfield:int rc;\toffset:20;\tsize:4;\tsigned:1;\n",
        );
        assert_eq!(
            f[0],
            Field {
                name: "name".into(),
                offset: 24,
                size: 4
            }
        );
        assert_eq!(f[1].name, "rc");
    }

    /// The KVM formats of Linux 6.18.44 (copied from this kernel's tracefs).
    const KVM_FORMATS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/tracefs-linux-6.18"
    );

    #[test]
    fn kvm_offsets_come_from_the_format_files() {
        let o = kvm_offsets(Path::new(KVM_FORMATS)).unwrap();
        assert_eq!(o, KvmOffsets::LINUX_6_18);
        // One format missing: the error names the tracepoint.
        let dir = tempfile::tempdir().unwrap();
        let e = kvm_offsets(dir.path()).unwrap_err();
        assert!(e.to_string().contains("kvm:kvm_exit"), "{e}");
        // A format whose fields are not the arguments the programs read: refused.
        let copy = dir.path().join("events/kvm");
        for (_, tp) in KVM_TRACEPOINTS {
            let from = Path::new(KVM_FORMATS).join("events/kvm").join(tp);
            std::fs::create_dir_all(copy.join(tp)).unwrap();
            std::fs::copy(from.join("format"), copy.join(tp).join("format")).unwrap();
        }
        assert_eq!(kvm_offsets(dir.path()).unwrap(), KvmOffsets::LINUX_6_18);
        let pio = copy.join("kvm_pio/format");
        let text = std::fs::read_to_string(&pio).unwrap();
        std::fs::write(&pio, text.replace("unsigned int rw;", "unsigned int dir;")).unwrap();
        let e = kvm_offsets(dir.path()).unwrap_err();
        assert!(e.to_string().contains("kvm:kvm_pio records"), "{e}");
    }

    #[test]
    fn missing_tracepoint_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = format(dir.path(), "sched", "sched_switch").unwrap_err();
        assert!(e.to_string().contains("sched:sched_switch"), "{e}");
    }
}
