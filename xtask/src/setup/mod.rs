//! `cargo xtask setup`: everything a fresh machine needs, each step idempotent and
//! cheap when already done.

mod bpf;
mod datasets;
mod fuzz;
mod s3;
mod vm;

pub use bpf::{bpf, clean};
pub use datasets::datasets;
pub use fuzz::fuzz;
pub use vm::vm;

pub fn all() -> anyhow::Result<()> {
    bpf()?;
    fuzz()?;
    s3::s3()?;
    vm()?;
    datasets()?;
    Ok(())
}
