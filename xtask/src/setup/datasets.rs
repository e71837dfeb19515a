//! The Python readers the dataset tests load the Parquet export with (tests/export.rs):
//! DuckDB, polars, pyarrow and pandas, the tools docs/datasets.md shows. Pinned to the
//! versions the examples were written against; installed only when an import fails.

use std::process::Command;

use anyhow::{bail, Context};

/// `module==version` pairs, and the import name of each.
const READERS: &[(&str, &str)] = &[
    ("duckdb", "duckdb==2.0.1"),
    ("polars", "polars==2.1.0"),
    ("pyarrow", "pyarrow==26.0.1"),
    ("pandas", "pandas==3.1.1"),
];

pub fn datasets() -> anyhow::Result<()> {
    let imports = READERS
        .iter()
        .map(|(m, _)| *m)
        .collect::<Vec<_>>()
        .join(", ");
    let ok = Command::new("python3")
        .args(["-c", &format!("import {imports}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("setup: installing the dataset readers ({imports}) with pip");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(READERS.iter().map(|(_, spec)| *spec))
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip install of the dataset readers failed: {status}");
    }
    Ok(())
}
