//! Host backend selection: which collectors sample the QEMU process on each tick.

use crate::collector::{Collector, VcpuMap};
use crate::error::Error;
use crate::procfs::ProcCollector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Bpf,
    Proc,
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Bpf => "bpf",
            BackendChoice::Proc => "proc",
        }
    }
}

pub struct Selected {
    pub collectors: Vec<Box<dyn Collector>>,
    pub used: &'static str,
    /// Why `auto` did not get BPF (None when BPF was used or proc was asked for).
    pub fallback_reason: Option<String>,
    /// One line for the `backend_selected` event.
    pub reason: String,
}

/// Pick the host backend. `bpf` fails with the exact cause when BPF cannot be used;
/// `auto` falls back to /proc and says why, so a capture never dies for lack of BPF.
pub fn select(requested: BackendChoice, pid: u32, vcpus: &VcpuMap) -> Result<Selected, Error> {
    let proc_backend = |fallback_reason: Option<String>, reason: String| Selected {
        collectors: vec![Box::new(ProcCollector::new(pid, vcpus.clone())) as Box<dyn Collector>],
        used: "proc",
        fallback_reason,
        reason,
    };
    match requested {
        BackendChoice::Proc => Ok(proc_backend(None, "--backend proc requested".into())),
        BackendChoice::Bpf => Err(Error::BpfUnavailable(bpf_unavailable_reason())),
        BackendChoice::Auto => {
            let why = bpf_unavailable_reason();
            Ok(proc_backend(
                Some(why.clone()),
                format!("bpf unavailable: {why}; using /proc"),
            ))
        }
    }
}

fn bpf_unavailable_reason() -> String {
    "this build of cis490 has no BPF programs yet".into()
}
