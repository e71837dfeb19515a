//! The one harness every integration test uses: where the built binaries and fixtures
//! are ([`paths`]), the processes tests start and watch ([`process`]), running a capture
//! and reading its episode ([`episode`]) and its packet capture ([`pcap`]), the real test VM ([`qemu`]), a real S3-compatible server ([`s3`]) and the clock the
//! episode is stamped on ([`clock`], the product's own).

pub mod episode;
pub mod paths;
pub mod pcap;
pub mod process;
pub mod qemu;
pub mod s3;

/// CLOCK_MONOTONIC and CLOCK_REALTIME as the product reads them (`t_mono_ns` counts from
/// a raw CLOCK_MONOTONIC origin).
pub mod clock {
    pub use cis490::clock::{mono_raw_ns, wall_ns};
}

pub use episode::*;
pub use paths::*;
pub use pcap::*;
pub use process::*;
pub use qemu::*;
pub use s3::*;
