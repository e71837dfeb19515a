//! The cis490 kernel programs for ONE target process: a snapshot program the kernel runs
//! on its own timer, which reads the target's per-thread scheduler and I/O accounting
//! from task_struct and streams it through a ring buffer (`snap`); the thread set it
//! follows (fork, exit, a seeding task iterator); block-request and per-interface packet
//! counters (`io`, `net`); VM exits of a KVM target by kind and key (`kvm`). Nothing runs per context switch or per syscall.
//!
//! Every program filters in the kernel: the target's tgid (`TARGET_TGID`) and the
//! tracepoint field offsets (`OFFSETS`) are read-only globals set by the loader.
//!
//! Built only for bpfel-unknown-none (by cis490/build.rs through aya-build); a host build
//! of the workspace compiles this crate to an empty program.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod globals;
#[cfg(target_arch = "bpf")]
mod io;
#[cfg(target_arch = "bpf")]
mod kvm;
#[cfg(target_arch = "bpf")]
mod net;
#[cfg(target_arch = "bpf")]
mod snap;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
