//! The cis490 kernel programs: tracepoints that aggregate per-thread scheduler and I/O
//! counters and per-interface packet counters of ONE target process into BPF maps.
//! User space drains the maps on its own tick; nothing is streamed per event.
//!
//! Every program filters in the kernel: the target's tgid (`TARGET_TGID`) and the
//! tracepoint field offsets (`OFFSETS`) are read-only globals set by the loader.
//!
//! Built only for bpfel-unknown-none (by cis490/build.rs through aya-build); a host build
//! of the workspace compiles this crate to an empty program.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod globals;
#[cfg(target_arch = "bpf")]
mod io;
#[cfg(target_arch = "bpf")]
mod net;
#[cfg(target_arch = "bpf")]
mod sched;

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
