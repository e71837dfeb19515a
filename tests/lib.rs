//! The integration tests' harness crate: every test binary under tests/ uses it
//! (`use cis490_tests::...`); the code is in [`harness`], one file per role.

pub mod harness;
pub use harness::*;
