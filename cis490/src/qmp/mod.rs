//! The `qmp` source: QEMU's machine protocol on a Unix socket.
//!
//! `parse` is pure (unit-tested on real QEMU 10.0.2 replies), `transport` is a small
//! line-based client with deadlines, `collector` runs it on its own thread.

pub mod collector;
pub mod parse;
pub mod transport;

pub use collector::{FactsHandle, QmpConfig, QmpFacts, QmpSource};
