//! `drover`: the operator's command line. It runs the hub (`drover hub`) and a whole local
//! fleet (`drover demo`), and manages fleets, devices and releases through the hub's API.

mod client;
mod cmd;
mod demo;
mod profile;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Drover: signed updates and fleet management for Linux devices in the field.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about, long_about = None)]
struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The hub's URL (overrides `drover login`).
    #[arg(long, global = true, env = "DROVER_HUB_URL")]
    hub: Option<String>,
    /// The API token (overrides `drover login`).
    #[arg(long, global = true, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A CA file to trust for the hub (overrides `drover login`).
    #[arg(long, global = true, env = "DROVER_CA_FILE")]
    ca: Option<PathBuf>,
    /// Where `drover login` keeps its settings.
    #[arg(long, global = true, env = "DROVER_CLI_CONFIG")]
    cli_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub server (or manage its organizations).
    Hub(Box<cmd::hub::HubArgs>),
    /// Run a hub and a fleet of agents locally, and deploy a release to them.
    Demo(demo::DemoArgs),
    /// Save the hub URL, token and CA file for later commands.
    Login(cmd::login::LoginArgs),
    /// Fleets: groups of devices sharing a provisioning key, release key and config.
    #[command(subcommand)]
    Fleet(cmd::fleet::FleetCommand),
    /// Devices: list, inspect, accept, revoke, retry, configure.
    #[command(subcommand)]
    Device(cmd::device::DeviceCommand),
    /// Sites: where devices are installed, and for which customer.
    #[command(subcommand)]
    Site(cmd::site::SiteCommand),
    /// Release signing keys.
    #[command(subcommand)]
    Keys(cmd::release::KeysCommand),
    /// Releases: sign and upload artifacts, list them.
    #[command(subcommand)]
    Release(cmd::release::ReleaseCommand),
    /// Deploy a release to a fleet, or to one device.
    Deploy(cmd::release::DeployArgs),
    /// Time series: one channel of one meter of one device.
    #[command(subcommand)]
    Series(cmd::data::SeriesCommand),
    /// Read a series over a time range, raw or rolled up.
    Query(cmd::data::QueryArgs),
    /// Energy reports: create, show, freeze (immutable, hashed), export.
    #[command(subcommand)]
    Report(cmd::data::ReportCommand),
    /// Show fleets converging on their targets (`--watch` to follow live).
    Status(cmd::status::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Hub(_) => "info",
        Command::Demo(_) => "warn",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What every API command needs.
pub struct Ctx {
    json: bool,
    hub: Option<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
    cli_config: PathBuf,
}

impl Ctx {
    /// A client for the configured hub.
    pub fn client(&self) -> anyhow::Result<client::HubClient> {
        profile::Connection::resolve(
            &self.cli_config,
            self.hub.clone(),
            self.token.clone(),
            self.ca.clone(),
        )?
        .client()
    }

    /// Whether to print JSON.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Prints a value as pretty JSON.
    pub fn print_json(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Ctx {
        json: cli.json,
        hub: cli.hub,
        token: cli.token,
        ca: cli.ca,
        cli_config: cli.cli_config.unwrap_or_else(profile::default_path),
    };
    match cli.command {
        Command::Hub(args) => cmd::hub::run(*args).await,
        Command::Demo(args) => demo::run(&ctx, args).await,
        Command::Login(args) => cmd::login::run(&ctx, args).await,
        Command::Fleet(command) => cmd::fleet::run(&ctx, command).await,
        Command::Device(command) => cmd::device::run(&ctx, command).await,
        Command::Site(command) => cmd::site::run(&ctx, command).await,
        Command::Keys(command) => cmd::release::keys(&ctx, command).await,
        Command::Release(command) => cmd::release::run(&ctx, command).await,
        Command::Deploy(args) => cmd::release::deploy(&ctx, args).await,
        Command::Series(command) => cmd::data::series(&ctx, command).await,
        Command::Query(args) => cmd::data::query(&ctx, args).await,
        Command::Report(command) => cmd::data::report(&ctx, command).await,
        Command::Status(args) => cmd::status::run(&ctx, args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
