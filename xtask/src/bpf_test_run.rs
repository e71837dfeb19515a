//! The kernel's own timing of a BPF program (BPF_PROG_TEST_RUN): the program runs `repeat`
//! times on one packet, and the kernel reports the mean time per run. Unlike
//! `--bpf-stats`, which reads the clock twice around every run, nothing is added to the
//! runs themselves. Raw bpf(2) calls: xtask does not link aya.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context};

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_PROG_GET_NEXT_ID: i64 = 11;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// sizeof(struct __sk_buff) on current kernels; `ifindex` is at byte 40.
const SK_BUFF_CTX: usize = 192;

extern "C" {
    fn syscall(n: i64, ...) -> i64;
}

/// bpf(2) with an attr of 128 bytes (zero beyond what the command reads).
fn bpf(cmd: i64, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: bpf(2) reads and writes at most the 128 bytes we pass.
    let rc = unsafe { syscall(321, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn put_u32(a: &mut [u8], at: usize, v: u32) {
    a[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(a: &mut [u8], at: usize, v: u64) {
    a[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(a: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(a[at..at + 4].try_into().expect("4 bytes"))
}

/// The loaded program whose name is `name` (the kernel keeps 15 bytes of it).
pub fn find_program(name: &str) -> anyhow::Result<OwnedFd> {
    let want = &name.as_bytes()[..name.len().min(15)];
    let mut id = 0u32;
    loop {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, id);
        match bpf(BPF_PROG_GET_NEXT_ID, &mut attr) {
            Ok(_) => id = get_u32(&attr, 4),
            Err(e) if e.raw_os_error() == Some(2) => bail!("no loaded program named {name}"),
            Err(e) => return Err(e).context("listing BPF programs"),
        }
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, id);
        let Ok(fd) = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) else {
            continue;
        };
        // SAFETY: a new fd the kernel gave us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = [0u8; 256];
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
        put_u32(&mut attr, 4, info.len() as u32);
        put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).is_err() {
            continue;
        }
        // struct bpf_prog_info: name[16] at byte 64.
        let pname = &info[64..80];
        let len = pname.iter().position(|&b| b == 0).unwrap_or(16);
        if &pname[..len] == want {
            return Ok(fd);
        }
    }
}

/// A tc program that does nothing (`r0 = -1`, TC_ACT_UNSPEC; exit): the baseline, what
/// a test run costs by itself.
pub fn empty_tc_program() -> anyhow::Result<OwnedFd> {
    // mov64 r0, -1; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0x00, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading an empty tc program")?;
    // SAFETY: a new fd the kernel gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Mean nanoseconds per run of `prog` on `frame`, run `repeat` times as if it arrived on
/// interface `ifindex`.
pub fn ns_per_run(prog: &OwnedFd, frame: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<u32> {
    let mut ctx = [0u8; SK_BUFF_CTX];
    put_u32(&mut ctx, 40, ifindex);
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, frame.len() as u32);
    put_u64(&mut attr, 16, frame.as_ptr() as u64);
    put_u32(&mut attr, 32, repeat);
    put_u32(&mut attr, 40, ctx.len() as u32);
    put_u64(&mut attr, 48, ctx.as_ptr() as u64);
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    // struct { prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat,
    // duration, ... }: duration at byte 36.
    Ok(get_u32(&attr, 36))
}
