//! `drover-bench`: measures Drover against its goals and writes BENCHMARKS.md.
//!
//! - `checkin`: no-change check-ins per second and p99 latency of one hub, beside nginx serving
//!   a static `204` to the same requests from the same load generator (wrk);
//! - `agent`: the agent's binary size and its resident memory when idle;
//! - `all`: both, rewriting BENCHMARKS.md.
//!
//! It runs the release binaries built beside it (`drover`, `drover-agent`) as child processes,
//! the way an operator runs them, and talks to them only over their HTTP APIs.

mod agent;
mod checkin;
mod children;
mod device;
mod hub;
mod machine;
mod nginx;
mod procfs;
mod report;
mod stats;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

/// Measures the hub's check-in throughput beside nginx and the agent's footprint, and writes
/// BENCHMARKS.md.
#[derive(Debug, Parser)]
#[command(name = "drover-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// No-change check-ins per second and p99 latency, hub beside nginx; prints its section.
    Checkin(CheckinArgs),
    /// The agent's binary size and idle resident memory; prints its section.
    Agent(AgentArgs),
    /// Both benchmarks; rewrites BENCHMARKS.md (keeping its hand-written notes).
    All {
        #[command(flatten)]
        checkin: CheckinArgs,
        #[command(flatten)]
        agent: AgentArgs,
        /// The file to write.
        #[arg(long, default_value = "BENCHMARKS.md")]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
struct CheckinArgs {
    /// Devices to enrol; wrk cycles over their credentials.
    #[arg(long, default_value_t = 256)]
    devices: usize,
    /// Measured runs per server and load.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per measured run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of unmeasured warm-up per server and load.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// wrk loads as THREADSxCONNECTIONS; each is measured against both servers.
    #[arg(long = "load", value_delimiter = ',', default_value = "2x64,1x64")]
    loads: Vec<String>,
}

impl CheckinArgs {
    fn options(&self) -> anyhow::Result<checkin::Options> {
        anyhow::ensure!(self.devices > 0, "--devices must be at least 1");
        anyhow::ensure!(self.runs > 0, "--runs must be at least 1");
        anyhow::ensure!(self.duration > 0, "--duration must be at least 1 second");
        Ok(checkin::Options {
            devices: self.devices,
            runs: self.runs,
            duration: Duration::from_secs(self.duration),
            warmup: Duration::from_secs(self.warmup.max(1)),
            loads: self
                .loads
                .iter()
                .map(|l| wrk::Load::parse(l))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// VmRSS samples to take from the idle agent.
    #[arg(long, default_value_t = 11)]
    samples: usize,
    /// Milliseconds between samples.
    #[arg(long, default_value_t = 1000)]
    sample_interval_ms: u64,
}

impl AgentArgs {
    fn options(&self) -> anyhow::Result<agent::Options> {
        anyhow::ensure!(self.samples > 0, "--samples must be at least 1");
        Ok(agent::Options {
            samples: self.samples,
            interval: Duration::from_millis(self.sample_interval_ms),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("drover-bench: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let machine = machine::Machine::probe()?;
    match cli.command {
        Command::Checkin(args) => {
            let report = checkin::run(args.options()?)
                .await
                .context("the check-in benchmark")?;
            println!("{}", report::machine_section(&machine));
            println!("{}", report::checkin_section(&report));
        }
        Command::Agent(args) => {
            let report = agent::run(args.options()?)
                .await
                .context("the agent benchmark")?;
            println!("{}", report::machine_section(&machine));
            println!("{}", report::agent_section(&report));
        }
        Command::All {
            checkin,
            agent,
            output,
        } => {
            // Check the arguments of both before spending minutes on the first.
            let (checkin_options, agent_options) = (checkin.options()?, agent.options()?);
            let agent_report = agent::run(agent_options)
                .await
                .context("the agent benchmark")?;
            let checkin_report = checkin::run(checkin_options)
                .await
                .context("the check-in benchmark")?;
            let existing = std::fs::read_to_string(&output).unwrap_or_default();
            let text = report::document(
                &machine,
                Some(&checkin_report),
                Some(&agent_report),
                report::kept_notes(&existing),
            );
            std::fs::write(&output, &text)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{text}");
            eprintln!("wrote {}", output.display());
        }
    }
    Ok(())
}
