//! The one thing the task iterator needs from the kernel's BTF: the type id of the
//! `bpf_iter_task` function, which becomes the program's attach_btf_id.
//!
//! aya's `Iter::load` takes a whole parsed [`aya::Btf`] for that single lookup, and
//! `EbpfLoader` parses the kernel's BTF again by default (for CO-RE relocations, which
//! Rust BPF programs do not have). Each full parse of vmlinux BTF (127,000 types here)
//! cost ~0.1 s of CPU and ~15 MiB of RSS in the loader process, most of a BPF capture's
//! start-up. Instead, the id is found by streaming the BTF file (names and type headers
//! only), and aya gets a synthetic BTF in which that id is a FUNC of that name: placeholder
//! PTR types fill the ids below it. aya only reads the id out of it.

use super::error::BpfError;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};

/// An error of this stage (see [`BpfError`]).
fn btf_err(msg: impl Into<String>) -> BpfError {
    BpfError::Btf(msg.into())
}

const MAGIC: u16 = 0xeb9f;
const KIND_PTR: u32 = 2;
const KIND_FUNC: u32 = 12;

fn read_u32s<const N: usize>(r: &mut impl Read, what: &str) -> Result<[u32; N], BpfError> {
    let mut b = [0u8; 64];
    let b = &mut b[..N * 4];
    r.read_exact(b)
        .map_err(|e| btf_err(format!("BTF: truncated {what}: {e}")))?;
    let mut out = [0u32; N];
    for (i, c) in b.chunks_exact(4).enumerate() {
        out[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(out)
}

/// The type id of the FUNC named `name` in a BTF blob.
pub fn func_id<R: Read + Seek>(r: R, name: &str) -> Result<u32, BpfError> {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let [magic_ver, hdr_len, type_off, type_len, str_off, str_len] =
        read_u32s::<6>(&mut r, "header")?;
    if magic_ver as u16 != MAGIC {
        return Err(btf_err(format!("BTF: bad magic {:#06x}", magic_ver as u16)));
    }
    if hdr_len < 24 {
        return Err(btf_err(format!("BTF: header length {hdr_len}")));
    }
    let base = u64::from(hdr_len);
    // The string offsets that spell `name` (BTF deduplicates, but keep every one).
    r.seek(SeekFrom::Start(base + u64::from(str_off)))
        .map_err(|e| btf_err(format!("BTF: seeking to the strings: {e}")))?;
    let mut offsets = Vec::new();
    let mut strings = (&mut r).take(u64::from(str_len));
    let (mut pos, mut buf) = (0u32, Vec::with_capacity(256));
    loop {
        buf.clear();
        let n = strings
            .read_until(0, &mut buf)
            .map_err(|e| btf_err(format!("BTF: reading the strings: {e}")))?;
        if n == 0 {
            break;
        }
        if buf.strip_suffix(&[0]).unwrap_or(&buf) == name.as_bytes() {
            offsets.push(pos);
        }
        pos += n as u32;
    }
    if offsets.is_empty() {
        return Err(btf_err(format!("BTF: no name {name}")));
    }
    r.seek(SeekFrom::Start(base + u64::from(type_off)))
        .map_err(|e| btf_err(format!("BTF: seeking to the types: {e}")))?;
    let (mut done, mut id) = (0u64, 0u32);
    while done < u64::from(type_len) {
        id += 1;
        let [name_off, info, _] = read_u32s::<3>(&mut r, "type record")?;
        let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
        if kind == KIND_FUNC && offsets.contains(&name_off) {
            return Ok(id);
        }
        let tail = super::btf::tail_len(kind, vlen).map_err(|e| btf_err(e.to_string()))?;
        done += 12 + tail;
        r.seek_relative(tail as i64)
            .map_err(|e| btf_err(format!("BTF: skipping type {id}: {e}")))?;
    }
    Err(btf_err(format!("BTF: no function {name}")))
}

/// A BTF blob in which type `id` is a FUNC named `name` and every id below it a
/// placeholder (an anonymous PTR to void).
pub fn synthetic_blob(id: u32, name: &str) -> Vec<u8> {
    assert!(id >= 1, "BTF type ids start at 1");
    let types = (id as usize) * 12;
    let strings = 1 + name.len() + 1;
    let mut b = Vec::with_capacity(24 + types + strings);
    let le = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
    // btf_header: magic, version 1, flags 0, hdr_len, type_off, type_len, str_off, str_len.
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&[1, 0]);
    for v in [24, 0, types as u32, types as u32, strings as u32] {
        le(&mut b, v);
    }
    for _ in 1..id {
        for v in [0, KIND_PTR << 24, 0] {
            le(&mut b, v);
        }
    }
    // FUNC: name at string offset 1, linkage global (vlen 1), type 0.
    for v in [1, KIND_FUNC << 24 | 1, 0] {
        le(&mut b, v);
    }
    b.push(0);
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b
}

/// The BTF aya's `Iter::load("task", …)` needs, from the kernel's BTF file at `path`.
pub fn task_iter_btf(path: &std::path::Path) -> Result<aya::Btf, BpfError> {
    const NAME: &str = "bpf_iter_task";
    let file =
        std::fs::File::open(path).map_err(|e| btf_err(format!("{}: {e}", path.display())))?;
    let id = func_id(file, NAME).map_err(|e| btf_err(format!("{}: {e}", path.display())))?;
    aya::Btf::parse(&synthetic_blob(id, NAME), aya::Endianness::default())
        .map_err(|e| btf_err(format!("synthetic BTF for {NAME}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_blob_holds_the_func_at_its_id_for_aya() {
        let blob = synthetic_blob(5, "bpf_iter_task");
        let btf = aya::Btf::parse(&blob, aya::Endianness::default()).unwrap();
        let id = btf
            .id_by_type_name_kind("bpf_iter_task", aya_obj::btf::BtfKind::Func)
            .unwrap();
        assert_eq!(id, 5);
        // And the streaming reader finds it there too.
        assert_eq!(
            func_id(std::io::Cursor::new(&blob), "bpf_iter_task").unwrap(),
            5
        );
        let e = func_id(std::io::Cursor::new(&blob), "bpf_iter_tcp").unwrap_err();
        assert!(
            matches!(&e, BpfError::Btf(m) if m.contains("no name")),
            "{e}"
        );
    }

    #[test]
    fn truncated_or_foreign_blobs_are_errors() {
        let blob = synthetic_blob(3, "f");
        assert!(func_id(std::io::Cursor::new(&blob[..30]), "f").is_err());
        let mut bad = blob.clone();
        bad[0] = 0;
        let e = func_id(std::io::Cursor::new(&bad), "f").unwrap_err();
        assert!(matches!(&e, BpfError::Btf(m) if m.contains("magic")), "{e}");
    }

    /// Against the running kernel's own BTF: the streamed id is the id a full parse
    /// gives (the full parse is what this module avoids in the loader).
    #[test]
    fn vmlinux_id_matches_a_full_parse() {
        let path = std::path::Path::new(super::super::btf::VMLINUX);
        if !path.exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} missing under CI",
                path.display()
            );
            return;
        }
        let full = aya::Btf::from_sys_fs().unwrap();
        let want = full
            .id_by_type_name_kind("bpf_iter_task", aya_obj::btf::BtfKind::Func)
            .unwrap();
        let got = func_id(std::fs::File::open(path).unwrap(), "bpf_iter_task").unwrap();
        assert_eq!(got, want);
        let synth = task_iter_btf(path).unwrap();
        assert_eq!(
            synth
                .id_by_type_name_kind("bpf_iter_task", aya_obj::btf::BtfKind::Func)
                .unwrap(),
            want
        );
    }
}
