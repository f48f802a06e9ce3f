//! `drover-agent`: the device daemon. Parses arguments, sets up logging, loads the config and
//! calls [`drover_agent::run`] until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use drover_agent::AgentConfig;
use tokio_util::sync::CancellationToken;

/// The Drover device agent: enrols with a hub, checks in, and installs signed releases.
#[derive(Debug, Parser)]
#[command(name = "drover-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// The agent config file (TOML; see agent.example.toml).
        #[arg(long, short, env = "DROVER_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Print the device ID, the current release and the update state, from the state directory.
    Status {
        /// The agent config file (TOML), for its state_dir.
        #[arg(long, short, env = "DROVER_AGENT_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = AgentConfig::load(&config)?;
            // One thread: the agent is mostly waiting, and must stay small on a Raspberry Pi.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
                let result = drover_agent::run(config, shutdown).await;
                signals.abort();
                result
            })
        }
        Command::Status { config } => {
            let config = AgentConfig::load(&config)?;
            let status = drover_agent::status(&config.state_dir).with_context(|| {
                format!("reading the state directory {}", config.state_dir.display())
            })?;
            println!("{status}");
            Ok(())
        }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: under systemd the log goes to the journal as plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the agent with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
