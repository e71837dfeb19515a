//! Starting the QEMU-facing background sources (`qmp`, `agent`) of a capture, and
//! copying what QMP learned into meta.json.

use std::path::PathBuf;
use std::time::Duration;

use crate::contract::events::Event;

use crate::agent::reader::AgentReaderConfig;
use crate::collector::SourceContext;
use crate::episode::meta::{Meta, VcpuThread};
use crate::qemu_args;
use crate::qmp::{FactsHandle, QmpConfig, QmpFacts};
use crate::threaded::Background;

/// `cis490 trace`'s "QEMU sources" options.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "QEMU sources")]
pub struct QemuSourceOptions {
    /// QMP Unix socket (default: found in the QEMU command line: -qmp unix:… or -chardev
    /// socket + -mon mode=control). Each QMP socket serves one client: give cis490 its own.
    #[arg(long)]
    pub qmp: Option<PathBuf>,
    /// QMP polling rate (query-stats, query-blockstats, query-status), 1..=100 Hz.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub qmp_rate_hz: u32,
    /// Do not use QMP.
    #[arg(long, conflicts_with = "qmp")]
    pub no_qmp: bool,
    /// Guest agent chardev socket (default: the socket chardev behind the
    /// `cis490.guest.agent` virtserialport in the QEMU command line).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Do not read the guest agent.
    #[arg(long, conflicts_with = "agent")]
    pub no_agent: bool,
    /// Most bytes per second the guest agent's stream may grow by (token bucket, one
    /// second of burst); lines over it are dropped unparsed and counted (byte_rate).
    #[arg(long, value_name = "BYTES", default_value_t = crate::agent::reader::DEFAULT_MAX_BYTES_PER_S,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub agent_max_bytes_per_s: u64,
    /// Most bytes the guest agent's stream may hold per episode; lines past it are
    /// dropped and counted (byte_budget). Default: a quarter of the free space where the
    /// episode is written, at most 1 GiB.
    #[arg(long, value_name = "BYTES")]
    pub agent_max_bytes: Option<u64>,
}

pub struct Started {
    pub background: Vec<Box<dyn Background>>,
    pub qmp_facts: Option<FactsHandle>,
}

/// Start what can be started. A source whose socket is neither given nor found in the
/// command line is skipped with a `source_skipped` event; a given socket that does not
/// answer yet is kept trying (the source is marked stale meanwhile).
pub fn start(
    opts: &QemuSourceOptions,
    pid: u32,
    cmdline: &[String],
    ctx: &SourceContext,
) -> Result<Started, crate::Error> {
    let mut background: Vec<Box<dyn Background>> = Vec::new();
    let mut qmp_facts = None;
    if !opts.no_qmp {
        let found = opts
            .qmp
            .clone()
            .or_else(|| qemu_args::qmp_socket(cmdline).map(|p| qemu_args::resolve(pid, p)));
        match found {
            Some(socket) => {
                ctx.events.record(&Event::SourceStarted {
                    source: "qmp".into(),
                    socket: Some(socket.display().to_string()),
                    rate_hz: Some(opts.qmp_rate_hz.into()),
                    autodetected: Some(opts.qmp.is_none()),
                });
                let (src, facts) = crate::qmp::collector::start(
                    QmpConfig {
                        socket,
                        target_pid: pid,
                        rate_hz: opts.qmp_rate_hz,
                        // Generous: a loaded host can delay QEMU's main loop for a while.
                        command_timeout: Duration::from_secs(2),
                    },
                    ctx,
                )?;
                qmp_facts = Some(facts);
                background.push(Box::new(src));
            }
            None => ctx.events.record(&Event::SourceSkipped {
                source: "qmp".into(),
                reason: "no --qmp and no QMP unix socket in the QEMU command line".into(),
            }),
        }
    }
    if !opts.no_agent {
        let found = opts
            .agent
            .clone()
            .or_else(|| qemu_args::agent_socket(cmdline).map(|p| qemu_args::resolve(pid, p)));
        match found {
            Some(socket) => {
                ctx.events.record(&Event::SourceStarted {
                    source: "agent".into(),
                    socket: Some(socket.display().to_string()),
                    rate_hz: None,
                    autodetected: Some(opts.agent.is_none()),
                });
                background.push(Box::new(crate::agent::reader::start(
                    AgentReaderConfig {
                        socket,
                        max_bytes_per_s: opts.agent_max_bytes_per_s,
                        max_bytes: opts.agent_max_bytes,
                    },
                    ctx,
                )?));
            }
            None => ctx.events.record(&Event::SourceSkipped {
                source: "agent".into(),
                reason: format!(
                    "no --agent and no socket chardev behind a {} virtserialport in the QEMU command line",
                    qemu_args::AGENT_PORT_NAME
                ),
            }),
        }
    }
    Ok(Started {
        background,
        qmp_facts,
    })
}

/// Copy QMP's facts into meta (only what QMP actually answered).
pub fn apply_facts(meta: &mut Meta, f: &QmpFacts) {
    if f.qemu_version.is_some() {
        meta.host_fingerprint.qemu_version = f.qemu_version.clone();
    }
    if f.vcpus_reported > 0 {
        // The count QMP gave; vcpu_threads lists only thread ids that are the target's.
        meta.vm.vcpus = Some(f.vcpus_reported as u32);
        meta.vm.vcpu_threads = f
            .vcpus
            .iter()
            .map(|c| VcpuThread {
                index: c.index,
                tid: c.tid,
            })
            .collect();
    }
    if f.ram_mib.is_some() {
        meta.vm.ram_mib = f.ram_mib;
    }
}
