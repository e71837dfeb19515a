//! Project automation: `cargo xtask <command>`.
//!
//! setup  installs what a fresh machine lacks (apt packages, rust-src, bpf-linker, tracefs)
//! demo   traces a bundled target for a few seconds and prints the episode and a summary
//! test   builds everything and runs the whole test suite (what CI runs)
//! soak   a long 1 kHz capture of the test VM under a flooding guest and stalling QMP
//! fuzz   fuzzes every parser of untrusted input for a bounded time (docs/fuzzing.md)

mod bench;
mod bpf_test_run;
mod demo;
mod flow_bench;
mod fuzz;
mod kvm_bench;
mod setup;
mod soak;
mod util;
mod vm;
mod vm_net;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything a fresh machine lacks. Idempotent; cheap when nothing is missing.
    Setup,
    /// Run the main job on a built-in target: trace it, print the episode path and a summary.
    Demo {
        /// Seconds to trace.
        #[arg(long, default_value_t = 9.0)]
        duration: f64,
    },
    /// Measure overhead, timing and cost side by side; writes BENCHMARKS.md.
    Bench {
        /// Shorter runs (fewer rounds, 10 s timing) for a quick look.
        #[arg(long)]
        quick: bool,
        /// Run only these sections (comma-separated numbers 1-15; 1 and 5 share their
        /// runs). Default: all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<u32>,
        /// Write the report here instead of BENCHMARKS.md (for partial or trial runs).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Long 1 kHz capture of the test VM with a flooding guest agent and a QMP socket
    /// that stalls every minute; reports RSS, CPU, missed ticks and rows lost per minute.
    Soak(soak::SoakArgs),
    /// The test VM: start | stop | status | build.
    Vm {
        #[command(subcommand)]
        command: vm::VmCommand,
    },
    /// Fuzz every parser of untrusted input (fuzz/, cargo-fuzz): seed corpora from real
    /// fixtures, then each target for a bounded time. Fails on a crash.
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (default: all).
        #[arg(long)]
        target: Option<String>,
    },
    /// Set up, build, and run every test (the command CI runs).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
}

/// Seconds each fuzz target runs in `cargo xtask test` (7 targets: 2.3 minutes, plus the
/// fuzz crate's build).
const CI_FUZZ_SECONDS: u64 = 20;

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::all(),
        Command::Demo { duration } => {
            setup::all()?;
            demo::run(duration)
        }
        Command::Bench { quick, only, out } => {
            setup::all()?;
            bench::run(quick, &only, out)
        }
        Command::Soak(args) => {
            setup::all()?;
            setup::vm()?;
            soak::run(&args)
        }
        Command::Vm { command } => {
            if !matches!(
                command,
                vm::VmCommand::Stop { .. } | vm::VmCommand::Status { .. }
            ) {
                setup::vm()?;
            }
            vm::run(command)
        }
        Command::Fuzz { seconds, target } => {
            setup::all()?;
            fuzz::run(seconds, target.as_deref(), fuzz::Build::Release).map(drop)
        }
        Command::Test { cargo_test_args } => {
            setup::all()?;
            util::cargo(&["build", "--locked", "--workspace", "--bins"])?;
            // The guest kernel + initramfs (with the static agent) the VM tests boot.
            vm::build_assets()?;
            let mut args = vec!["test", "--locked", "--workspace", "--"];
            // One test at a time: the integration tests trace real busy processes and a
            // real VM on a 2-core machine, and several at once would starve each other's
            // samplers (and then, truthfully, miss ticks).
            args.push("--test-threads=1");
            args.extend(cargo_test_args.iter().map(String::as_str));
            util::cargo(&args)?;
            // Replay every fuzz corpus (seeded from the real fixtures) and fuzz each target
            // briefly: a parser change that crashes on a known or nearby input fails CI.
            fuzz::run(CI_FUZZ_SECONDS, None, fuzz::Build::Dev).map(drop)
        }
    }
}
