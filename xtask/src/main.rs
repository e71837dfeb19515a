//! Project automation: `cargo xtask <command>`.
//!
//! setup  installs what a fresh machine lacks (apt packages, rust-src, bpf-linker, tracefs)
//! demo   traces a bundled target for a few seconds and prints the episode and a summary
//! test   builds everything and runs the whole test suite (what CI runs)

mod demo;
mod setup;
mod util;
mod vm;

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
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// The test VM: start | stop | status | build.
    Vm {
        #[command(subcommand)]
        command: vm::VmCommand,
    },
    /// Set up, build, and run every test (the command CI runs).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::all(),
        Command::Demo { duration } => {
            setup::all()?;
            demo::run(duration)
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
        Command::Test { cargo_test_args } => {
            setup::all()?;
            util::cargo(&["build", "--locked", "--workspace", "--bins"])?;
            // The guest kernel + initramfs (with the static agent) the VM tests boot.
            vm::build_assets()?;
            let mut args = vec!["test", "--locked", "--workspace"];
            let extra: Vec<&str> = cargo_test_args.iter().map(String::as_str).collect();
            if !extra.is_empty() {
                args.push("--");
                args.extend(extra);
            }
            util::cargo(&args)
        }
    }
}
