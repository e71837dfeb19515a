//! Set-up for `cargo xtask fuzz`: cargo-fuzz under target/tools (beside bpf-linker), and
//! the nightly toolchain it drives (installed by the BPF set-up).

use super::tool::Tool;

/// Install cargo-fuzz 0.13.2 (`cargo xtask fuzz` runs it; `--locked`: its own lock file).
pub fn fuzz() -> anyhow::Result<()> {
    Tool {
        spec: "cargo-fuzz@0.13.2",
        bin: "cargo-fuzz",
        check: &["fuzz", "--version"],
        features: &[],
        why: "about two minutes",
    }
    .ensure()
}
