//! cis490: a low-overhead host-side tracer for one QEMU process.
//!
//! Sources (BPF or /proc on the host, QMP, the in-guest agent) write rows of one type
//! ([`row::Row`]) stamped on one clock pair ([`clock::EpisodeClock`]) into an episode
//! directory whose layout is the contract in docs/data-model.md.

pub mod agent;
pub mod backend;
pub mod bpf;
pub mod clock;
pub mod collector;
pub mod contract;
pub mod doctor;
pub mod episode;
pub mod error;
pub mod export;
pub mod fields;
pub mod flow;
pub mod jsonl;
pub mod kvm;
pub mod labels;
pub mod ls;
pub mod net;
pub mod pcap;
pub mod perf;
pub mod procfs;
pub mod qemu_args;
pub mod qemu_sources;
pub mod qmp;
pub mod recover;
pub mod report;
pub mod row;
pub mod sampler;
#[cfg(feature = "ship")]
pub mod ship;
pub mod status;
pub mod target;
pub mod threaded;
pub mod trace;
pub mod untrusted;
pub mod validate;

pub use error::{Error, Result};
