//! `cargo xtask setup`: everything a fresh machine needs, each step idempotent and
//! cheap when already done.

mod bpf;
mod vm;

pub use bpf::bpf;
pub use vm::vm;

pub fn all() -> anyhow::Result<()> {
    bpf()?;
    vm()?;
    Ok(())
}
