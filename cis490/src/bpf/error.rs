//! The BPF backend's one error type. Each variant is the stage that failed, so a caller
//! can tell "this host cannot run the programs" (a capability, tracefs, BTF: fall back to
//! /proc and say why) from a failure of a capture already running (the timer, a record).
//! The messages are what `--backend auto` prints as its fallback reason; they cross from
//! the loader helper process to the capture as JSON.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum BpfError {
    /// The process lacks a capability the programs need.
    #[error("{0}")]
    Capability(String),
    /// tracefs cannot be mounted, or a tracepoint or field is not as the programs read it.
    #[error("{0}")]
    Tracefs(String),
    /// The kernel's BTF is missing, unreadable, or lacks what the programs read.
    #[error("{0}")]
    Btf(String),
    /// aya or the kernel refused to load or attach a program or map, or the request
    /// cannot be met (an offline `--bpf-timer-cpu`, too many interfaces).
    #[error("{0}")]
    Load(String),
    /// The perf event that runs the snapshots.
    #[error("{0}")]
    Timer(String),
    /// The loader helper process or the hand-over of its file descriptors.
    #[error("{0}")]
    Handoff(String),
    /// A ring-buffer record that is not what the programs write.
    #[error("{0}")]
    Record(String),
    /// Reading or emptying a program's table in a running capture (what was not taken
    /// stays in the table and is counted at the next drain).
    #[error("{0}")]
    Map(String),
}

/// `Result` of the BPF backend.
pub type Result<T, E = BpfError> = std::result::Result<T, E>;
