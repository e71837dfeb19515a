//! `cargo xtask setup`: everything a fresh machine needs, each step idempotent and
//! cheap when already done.

mod bpf;
mod datasets;
mod fuzz;
mod s3;
mod tool;
mod vm;

pub use bpf::{bpf, clean};
pub use datasets::datasets;
pub use fuzz::fuzz;
pub use vm::vm;

pub fn all() -> anyhow::Result<()> {
    bpf()?;
    fuzz()?;
    // s3s-fs is a three-minute compile; the VM and dataset steps are mostly downloads and
    // apt, so the compile runs beside them.
    let s3 = std::thread::spawn(s3::s3);
    let rest = vm().and_then(|()| datasets());
    let s3 = s3
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the s3s-fs install thread panicked")));
    rest?;
    s3
}
