/// Helpers for the QMP / guest-agent / test-VM tests.
#[path = "qemu/harness.rs"]
pub mod qemu_harness;
