//! `drover-bench`: measures Drover against its goals and writes BENCHMARKS.md.
//!
//! - `checkin`: no-change check-ins per second and p99 latency of one hub, beside nginx serving
//!   a static `204` to the same requests from the same load generator (wrk);
//! - `agent`: the agent's binary size and its resident memory when idle;
//! - `ingest`: durable telemetry ingest (acknowledged points per second) beside the same points
//!   inserted one row per point into the same database engine;
//! - `wire`: bytes per point on the wire, all-in (captured packets), beside the seed's JSON;
//! - `rest`: bytes per point at rest (chunks and the whole database file) beside one row per
//!   point;
//! - `query`: latency of "24 hours at 1-minute resolution" through the API beside a scan of
//!   one row per point;
//! - `all`: every one of them, rewriting BENCHMARKS.md.
//!
//! It runs the release binaries built beside it (`drover`, `drover-agent`) as child processes,
//! the way an operator runs them, and talks to them only over their HTTP APIs.

mod agent;
mod checkin;
mod children;
mod device;
mod hub;
mod ingest;
mod machine;
mod meter;
mod nginx;
mod pcap;
mod procfs;
mod query;
mod rawstore;
mod report;
mod report_data;
mod rest;
mod stats;
mod wire;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

/// Measures the hub against its goals (check-ins beside nginx, the agent's footprint, telemetry
/// ingest, bytes on the wire and at rest, queries) and writes BENCHMARKS.md.
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
    /// Acknowledged telemetry points per second, hub beside one row per point; prints its
    /// section.
    Ingest {
        #[command(flatten)]
        args: IngestArgs,
        #[command(flatten)]
        output: WriteArgs,
    },
    /// Bytes per point on the wire (captured with tcpdump), beside the seed's JSON; prints its
    /// section.
    Wire {
        #[command(flatten)]
        args: WireArgs,
        #[command(flatten)]
        output: WriteArgs,
    },
    /// Bytes per point at rest, beside one row per point; prints its section.
    Rest {
        #[command(flatten)]
        args: RestArgs,
        #[command(flatten)]
        output: WriteArgs,
    },
    /// Latency of "24 hours at 1-minute resolution" through the API, beside a raw scan; prints
    /// its section.
    Query {
        #[command(flatten)]
        args: QueryArgs,
        #[command(flatten)]
        output: WriteArgs,
    },
    /// Every benchmark; rewrites BENCHMARKS.md (keeping its hand-written notes).
    All {
        #[command(flatten)]
        checkin: CheckinArgs,
        #[command(flatten)]
        agent: AgentArgs,
        #[command(flatten)]
        ingest: IngestArgs,
        #[command(flatten)]
        wire: WireArgs,
        #[command(flatten)]
        rest: RestArgs,
        #[command(flatten)]
        query: QueryArgs,
        /// The file to write.
        #[arg(long, default_value = "BENCHMARKS.md")]
        output: PathBuf,
    },
}

/// Where a single benchmark's section goes besides stdout.
#[derive(Debug, Args)]
struct WriteArgs {
    /// Also replace this benchmark's section in the output file (keeping the rest).
    #[arg(long)]
    write: bool,
    /// The file `--write` updates.
    #[arg(long = "output", default_value = "BENCHMARKS.md")]
    file: PathBuf,
}

impl WriteArgs {
    /// Prints the section and, with `--write`, puts it into the file.
    fn emit(&self, number: u32, section: &str) -> anyhow::Result<()> {
        println!("{section}");
        if self.write {
            let existing = std::fs::read_to_string(&self.file)
                .with_context(|| format!("reading {}", self.file.display()))?;
            let text = report::replace_section(&existing, number, section);
            std::fs::write(&self.file, text)
                .with_context(|| format!("writing {}", self.file.display()))?;
            eprintln!("updated section {number} of {}", self.file.display());
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
struct IngestArgs {
    /// Loads as DEVICESxBATCHESxMINUTES: devices sending at once (each on its own keep-alive
    /// connection), batches each sends per run, minutes of meter data per batch (60 = 5,400
    /// points, 1 = 90); each load is measured on every engine.
    #[arg(
        id = "ingest_loads",
        long = "ingest-load",
        value_delimiter = ',',
        default_value = "128x4x60,64x6x5,64x15x1"
    )]
    loads: Vec<String>,
    /// Measured runs per load and engine (hub and reference alternate).
    #[arg(id = "ingest_runs", long = "ingest-runs", default_value_t = 5)]
    runs: usize,
    /// Also measure on this PostgreSQL server (a scratch database is created and dropped).
    #[arg(long = "postgres-url", env = "DROVER_BENCH_POSTGRES_URL")]
    postgres_url: Option<String>,
}

impl IngestArgs {
    fn options(&self) -> anyhow::Result<ingest::Options> {
        anyhow::ensure!(self.runs > 0, "--ingest-runs must be at least 1");
        Ok(ingest::Options {
            loads: self
                .loads
                .iter()
                .map(|l| ingest::Load::parse(l))
                .collect::<anyhow::Result<_>>()?,
            runs: self.runs,
            postgres_url: self.postgres_url.clone(),
        })
    }
}

#[derive(Debug, Args)]
struct WireArgs {
    /// Batches sent per measured kind (after the first, which opens the connection).
    #[arg(id = "wire_batches", long = "wire-batches", default_value_t = 30)]
    batches: usize,
    /// Milliseconds between batches, longer than the delayed-ACK timer so that every ACK
    /// goes out on its own as it would between batches a minute apart.
    #[arg(id = "wire_gap_ms", long = "wire-gap-ms", default_value_t = 250)]
    gap_ms: u64,
}

impl WireArgs {
    fn options(&self) -> anyhow::Result<wire::Options> {
        anyhow::ensure!(self.batches > 1, "--wire-batches must be at least 2");
        Ok(wire::Options {
            batches: self.batches,
            gap: Duration::from_millis(self.gap_ms),
        })
    }
}

#[derive(Debug, Args)]
struct RestArgs {
    /// Hours of data each device sends, one batch an hour.
    #[arg(id = "rest_hours", long = "rest-hours", default_value_t = 24)]
    hours: u32,
    /// Devices besides the first, each with its own meter.
    #[arg(id = "rest_devices", long = "rest-devices", default_value_t = 31)]
    devices: usize,
}

impl RestArgs {
    fn options(&self) -> anyhow::Result<rest::Options> {
        anyhow::ensure!(self.hours > 0, "--rest-hours must be at least 1");
        Ok(rest::Options {
            hours: self.hours,
            devices: self.devices,
        })
    }
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// Requests per measured run and kind.
    #[arg(id = "query_requests", long = "query-requests", default_value_t = 400)]
    requests: usize,
    /// Measured runs (API and raw scan alternate).
    #[arg(id = "query_runs", long = "query-runs", default_value_t = 5)]
    runs: usize,
}

impl QueryArgs {
    fn options(&self) -> anyhow::Result<query::Options> {
        anyhow::ensure!(self.requests > 0, "--query-requests must be at least 1");
        anyhow::ensure!(self.runs > 0, "--query-runs must be at least 1");
        Ok(query::Options {
            requests: self.requests,
            runs: self.runs,
        })
    }
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
        Command::Ingest { args, output } => {
            let report = ingest::run(args.options()?)
                .await
                .context("the ingest benchmark")?;
            output.emit(3, &report_data::ingest_section(&report, &machine))?;
        }
        Command::Wire { args, output } => {
            let report = wire::run(args.options()?)
                .await
                .context("the wire benchmark")?;
            output.emit(4, &report_data::wire_section(&report, &machine))?;
        }
        Command::Rest { args, output } => {
            let report = rest::run(args.options()?)
                .await
                .context("the at-rest benchmark")?;
            output.emit(5, &report_data::rest_section(&report, &machine))?;
        }
        Command::Query { args, output } => {
            let report = query::run(args.options()?)
                .await
                .context("the query benchmark")?;
            output.emit(6, &report_data::query_section(&report, &machine))?;
        }
        Command::All {
            checkin,
            agent,
            ingest,
            wire,
            rest,
            query,
            output,
        } => {
            // Check every benchmark's arguments before spending minutes on the first.
            let checkin_options = checkin.options()?;
            let agent_options = agent.options()?;
            let ingest_options = ingest.options()?;
            let wire_options = wire.options()?;
            let rest_options = rest.options()?;
            let query_options = query.options()?;
            let agent_report = agent::run(agent_options)
                .await
                .context("the agent benchmark")?;
            let checkin_report = checkin::run(checkin_options)
                .await
                .context("the check-in benchmark")?;
            let ingest_report = ingest::run(ingest_options)
                .await
                .context("the ingest benchmark")?;
            let wire_report = wire::run(wire_options)
                .await
                .context("the wire benchmark")?;
            let rest_report = rest::run(rest_options)
                .await
                .context("the at-rest benchmark")?;
            let query_report = query::run(query_options)
                .await
                .context("the query benchmark")?;
            let sections = [
                report::checkin_section(&checkin_report),
                report::agent_section(&agent_report),
                report_data::ingest_section(&ingest_report, &machine),
                report_data::wire_section(&wire_report, &machine),
                report_data::rest_section(&rest_report, &machine),
                report_data::query_section(&query_report, &machine),
            ];
            let existing = std::fs::read_to_string(&output).unwrap_or_default();
            let text = report::document(&machine, &sections, report::kept_notes(&existing));
            std::fs::write(&output, &text)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{text}");
            eprintln!("wrote {}", output.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `all` flattens every benchmark's arguments; two with the same ID (such as two `runs`
    /// fields) would silently share one value in a release build.
    #[test]
    fn all_has_no_clashing_arguments() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["drover-bench", "all", "--runs", "2", "--query-runs", "3"])
            .unwrap();
        let Command::All { checkin, query, .. } = cli.command else {
            panic!("not all");
        };
        assert_eq!((checkin.runs, query.runs), (2, 3));
    }
}
