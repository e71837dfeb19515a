//! `cargo xtask setup`: everything a fresh machine needs, each step idempotent.

pub fn all() -> anyhow::Result<()> {
    Ok(())
}
