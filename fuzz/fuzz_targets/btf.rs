//! Kernel BTF (/sys/kernel/btf/vmlinux) → the task_struct layout the BPF programs use.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cis490::bpf::btf::task_layout(Cursor::new(data));
    let _ = cis490::bpf::btf::find_members(
        Cursor::new(data),
        &[("task_struct", "pid"), ("sched_entity", "sum_exec_runtime")],
    );
});
