//! Set-up for the shipper's tests (tests/ship.rs): s3s-fs, an S3-compatible server that
//! keeps objects as files (SigV4, multipart), under target/tools beside bpf-linker. The
//! tests start it on 127.0.0.1 themselves.

use super::tool::Tool;

pub fn s3() -> anyhow::Result<()> {
    Tool {
        spec: "s3s-fs@0.14.1",
        bin: "s3s-fs",
        check: &["--version"],
        features: &["binary"],
        why: "the tests' S3 server, about three minutes",
    }
    .ensure()
}
