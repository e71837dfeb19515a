//! Types shared by the cis490 BPF programs and the user-space loader.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers, because the same bytes
//! are written by the kernel side into BPF maps and read back by user space.
#![no_std]
