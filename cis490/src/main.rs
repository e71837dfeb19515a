use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use cis490::labels::{self, Phase};
use cis490::trace::{self, TraceConfig};
use cis490::Error;

#[derive(Parser)]
#[command(
    name = "cis490",
    version,
    about = "Low-overhead tracer for one QEMU process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture one episode of a QEMU process. The last line on stdout is the episode path.
    Trace(TraceArgs),
    /// Send a phase transition to a running capture.
    Mark {
        /// The episode directory of the running capture.
        episode_dir: PathBuf,
        #[arg(long, value_enum)]
        phase: Phase,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Check whether the BPF backend works on this machine and what `--backend auto` picks.
    Doctor,
    /// Check episode directories against the output contract; exit 0 only if all pass.
    Validate {
        #[arg(required = true)]
        episode_dirs: Vec<PathBuf>,
    },
    /// Export episodes into a typed Parquet dataset, Hive-partitioned by episode
    /// (`OUT/<stream>/episode_id=<id>/part-0.parquet`, and `OUT/episodes/…` with one row
    /// per episode; docs/datasets.md). Refuses an episode validate does not pass unless
    /// --allow-incomplete.
    Export {
        #[arg(required = true)]
        episode_dirs: Vec<PathBuf>,
        /// The dataset's root directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "parquet")]
        format: ExportFormat,
        /// Export incomplete or invalid episodes too; the episodes table records
        /// `complete`, `valid` and the problem count.
        #[arg(long)]
        allow_incomplete: bool,
        /// Read every written file back and compare every value with the episode.
        #[arg(long)]
        verify: bool,
    },
    /// Ship every complete, valid episode under DATA_ROOT that is not yet shipped to
    /// S3-compatible storage: its raw files and its Parquet export, each read back and
    /// checked after upload, the episode's marker object (PREFIX/shipped/<id>.json) last.
    /// Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and the other AWS_*
    /// variables); docs/datasets.md.
    #[cfg(feature = "ship")]
    Ship {
        data_root: PathBuf,
        /// s3://BUCKET/PREFIX
        #[arg(long)]
        to: String,
        /// The store's URL (overrides AWS_ENDPOINT); a plain http:// endpoint is accepted
        /// when given here.
        #[arg(long)]
        endpoint: Option<String>,
        /// Overrides AWS_REGION (default us-east-1).
        #[arg(long)]
        region: Option<String>,
        /// Keep running: ship each episode as its done.marker appears; wait out store
        /// outages with backoff (SIGINT/SIGTERM to stop).
        #[arg(long)]
        watch: bool,
        /// Files larger than this many bytes go up as multipart uploads (8 MiB parts).
        #[arg(long, default_value_t = cis490::ship::store::SINGLE_PUT_MAX)]
        multipart_above: u64,
        /// Where multipart uploads in progress are journaled, so a shipper killed mid-file
        /// resumes at the file's next part (default: $XDG_STATE_HOME/cis490/ship, else
        /// ~/.local/state/cis490/ship; never inside the data root).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Plot an episode (stacked panels on one time axis) and print a per-phase summary.
    Report {
        episode_dir: PathBuf,
        /// Output file, .png or .svg (default: <episode_dir>.report.png next to the episode).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Seal an episode whose capture was killed hard: drop a partial last line of each
    /// stream, write meta.json (end_reason "recovered"), manifest.json and done.marker.
    /// Refuses a capture that is still running; a sealed episode is left as it is.
    Recover { episode_dir: PathBuf },
    /// List the episodes under a data root, newest first.
    Ls {
        #[arg(default_value = "./data")]
        data_root: PathBuf,
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
        /// Do not validate file contents (no hashing, no row checks): a complete episode
        /// shows `sealed:<reason>` instead of `ok:<reason>`.
        #[arg(long)]
        quick: bool,
    },
    /// Internal: load and attach the BPF programs, hand the fds to the capture on stdin
    /// (see bpf/handoff.rs).
    #[command(name = "__bpf-loader", hide = true)]
    BpfLoader {
        #[arg(long)]
        pid: u32,
        /// NAME:RX_HEADER_LEN
        #[arg(long = "net-if")]
        net_ifs: Vec<String>,
        #[arg(long)]
        bpf_stats: bool,
        /// Snapshot interval of the capture.
        #[arg(long)]
        interval_ns: u64,
        #[arg(long)]
        bpf_wakeups: bool,
        #[arg(long)]
        bpf_timer_cpu: Option<u32>,
        #[arg(long)]
        kvm: bool,
        #[arg(long, default_value_t = cis490_common::MAX_KVM_KEYS)]
        kvm_key_table: u32,
        #[arg(long)]
        flow: bool,
    },
    /// In-guest agent: stream guest stats as JSON lines to a virtio-serial port.
    Agent {
        /// The virtio-serial port to write to.
        #[arg(long, default_value = cis490::agent::guest::DEFAULT_PORT)]
        port: PathBuf,
        /// Lines per second.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rate_hz: u32,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ExportFormat {
    Parquet,
}

#[derive(clap::Args)]
struct TraceArgs {
    #[command(flatten)]
    capture: trace::CaptureOptions,
    #[command(flatten)]
    host: cis490::backend::HostOptions,
    #[command(flatten)]
    net: cis490::net::NetOptions,
    #[command(flatten)]
    perf: cis490::perf::PerfOptions,
    #[command(flatten)]
    qemu: cis490::qemu_sources::QemuSourceOptions,
    /// At close, export the episode into `<data-root>/dataset/` (the same layout as
    /// `cis490 export`); the episode path is still the last line on stdout.
    #[arg(long, value_enum, help_heading = "Capture")]
    export: Option<ExportFormat>,
    /// No live status line on stderr (it is shown only when stderr is a terminal).
    #[arg(long, short, help_heading = "Capture")]
    quiet: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CIS490_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,object_store=warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cis490: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Trace(args) => cmd_trace(args),
        Command::Doctor => {
            let (checks, verdict) = cis490::doctor::run();
            print!("{}", cis490::doctor::render(&checks, &verdict));
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { episode_dirs } => Ok(cmd_validate(&episode_dirs)),
        Command::Export {
            episode_dirs,
            out,
            format: ExportFormat::Parquet,
            allow_incomplete,
            verify,
        } => cmd_export(&episode_dirs, &out, allow_incomplete, verify),
        #[cfg(feature = "ship")]
        Command::Ship {
            data_root,
            to,
            endpoint,
            region,
            watch,
            multipart_above,
            state_dir,
        } => cmd_ship(cis490::ship::ShipOptions {
            data_root,
            to,
            store: cis490::ship::StoreOptions {
                endpoint,
                region,
                multipart_above: Some(multipart_above),
                state_dir,
            },
            watch,
        }),
        Command::Report {
            episode_dir,
            output,
        } => cmd_report(&episode_dir, output),
        Command::Ls {
            data_root,
            json,
            quick,
        } => cmd_ls(&data_root, json, quick),
        Command::Recover { episode_dir } => {
            let outcome = cis490::recover::run(&episode_dir)?;
            print!("{}", outcome.describe());
            Ok(ExitCode::SUCCESS)
        }
        Command::BpfLoader {
            pid,
            net_ifs,
            bpf_stats,
            interval_ns,
            bpf_wakeups,
            bpf_timer_cpu,
            kvm,
            kvm_key_table,
            flow,
        } => {
            let specs: Result<Vec<_>, _> = net_ifs
                .iter()
                .map(|a| cis490::bpf::handoff::parse_net_if(a))
                .collect();
            match specs {
                Ok(specs) => cis490::bpf::handoff::run_helper(
                    pid,
                    &specs,
                    bpf_stats,
                    cis490::bpf::loader::SnapSpec {
                        interval_ns,
                        count_wakeups: bpf_wakeups,
                        timer_cpu: bpf_timer_cpu,
                        kvm,
                        kvm_keys: kvm_key_table,
                        flow,
                    },
                ),
                Err(e) => {
                    eprintln!("cis490 __bpf-loader: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Agent { port, rate_hz } => {
            let cfg = cis490::agent::guest::AgentConfig {
                port,
                rate_hz,
                proc_root: "/".into(),
                max_lines: None,
            };
            cis490::agent::guest::run(&cfg).map_err(|e| Error::io("agent", e))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Mark {
            episode_dir,
            phase,
            reason,
        } => {
            let reply = labels::send_mark(&episode_dir, phase, reason)?;
            if reply.ok {
                println!(
                    "{} -> {} at t_mono_ns={}",
                    reply.prev.as_deref().unwrap_or("-"),
                    phase.as_str(),
                    reply.t_mono_ns.unwrap_or_default()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                Err(Error::Usage(format!(
                    "refused: {}",
                    reply.error.unwrap_or_default()
                )))
            }
        }
    }
}

fn cmd_trace(args: TraceArgs) -> Result<ExitCode, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::io("installing signal handler", e))?;
    }
    let export_root = args.export.map(|_| args.capture.data_root.join("dataset"));
    let cfg = TraceConfig {
        capture: args.capture,
        host: args.host,
        net: args.net,
        perf: args.perf,
        qemu: args.qemu,
        status_line: !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let result = trace::run(cfg, stop)?;
    let mut code = match &result.error {
        Some(e) => {
            eprintln!("cis490: error: episode ended early: {e}");
            ExitCode::from(1)
        }
        None => ExitCode::SUCCESS,
    };
    tracing::info!(end_reason = result.end_reason.as_str(), "episode closed");
    if let Some(root) = export_root {
        // The dataset gets the episode directory's own mode (private unless --group).
        let mode = std::fs::metadata(&result.dir)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
            .unwrap_or(0o700);
        let done = cis490::export::out::OutDir::open_root(&root, mode)
            .and_then(|out| cis490::export::export_episode(&result.dir, &out, Default::default()));
        match done {
            Ok(e) => tracing::info!(
                dataset = %root.display(),
                streams = e.streams.len(),
                "episode exported"
            ),
            Err(e) => {
                eprintln!("cis490: error: export: {e}");
                code = ExitCode::from(1);
            }
        }
    }
    println!("{}", result.dir.display());
    Ok(code)
}

fn cmd_validate(dirs: &[PathBuf]) -> ExitCode {
    let mut all_pass = true;
    for dir in dirs {
        let report = cis490::validate::validate_dir(dir);
        for p in &report.problems {
            println!("{}: {p}", dir.display());
        }
        let verdict = report.verdict();
        all_pass &= verdict == cis490::validate::Verdict::Pass;
        println!(
            "{}: {} ({} problems)",
            dir.display(),
            verdict.as_str(),
            report.problems.len()
        );
    }
    if all_pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn cmd_export(
    dirs: &[PathBuf],
    out: &std::path::Path,
    allow_incomplete: bool,
    verify: bool,
) -> Result<ExitCode, Error> {
    use cis490::export;
    let root = export::out::OutDir::open_root(out, 0o755)?;
    let opts = export::ExportOptions { allow_incomplete };
    let mut failed = 0;
    for dir in dirs {
        let done = export::export_episode(dir, &root, opts).and_then(|e| {
            if verify {
                for s in &e.streams {
                    s.verify(&e.phases)?;
                }
            }
            Ok(e)
        });
        match done {
            Ok(e) => {
                let rows: u64 = e.streams.iter().map(|s| s.counts.rows).sum();
                println!(
                    "{}: {} streams, {rows} rows{} -> {}",
                    dir.display(),
                    e.streams.len(),
                    if verify { ", verified" } else { "" },
                    out.display()
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("cis490: error: {e}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(feature = "ship")]
fn cmd_ship(opts: cis490::ship::ShipOptions) -> Result<ExitCode, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::Usage(format!("cannot handle signals: {e}")))?;
    }
    match cis490::ship::run(&opts, &stop) {
        Ok(s) => {
            println!(
                "{} shipped ({} objects, {} already in the store, {} bytes sent in {:.1} s), {} already shipped, {} incomplete, {} not shipped",
                s.shipped, s.objects, s.reused, s.bytes_sent, s.seconds, s.already, s.incomplete, s.refused
            );
            Ok(if s.refused == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => {
            eprintln!("cis490 ship: error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn cmd_report(dir: &std::path::Path, output: Option<PathBuf>) -> Result<ExitCode, Error> {
    let out = cis490::report::run(dir, output)?;
    print!("{}", out.summary);
    println!("{}", out.path.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_ls(root: &std::path::Path, json: bool, quick: bool) -> Result<ExitCode, Error> {
    let check = if quick {
        cis490::ls::Check::Quick
    } else {
        cis490::ls::Check::Full
    };
    let episodes = cis490::ls::list_with(root, check)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&episodes).map_err(Error::Json)?
        );
    } else {
        print!("{}", cis490::ls::format_table(&episodes));
    }
    Ok(ExitCode::SUCCESS)
}
