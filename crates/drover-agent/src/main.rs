//! `drover-agent`: the device daemon. Parses arguments, sets up logging, loads the config and
//! calls [`drover_agent::run`] until SIGINT or SIGTERM. `drover-agent modbus probe` dumps the
//! registers of a Modbus device.

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
    Run(Settings),
    /// Print the device ID, the current release and the update state, from the state directory.
    Status(Settings),
    /// Modbus tools.
    #[command(subcommand)]
    Modbus(ModbusCommand),
}

#[derive(Debug, Subcommand)]
enum ModbusCommand {
    /// Dump registers of a Modbus TCP device (hex, u16, i16, u32, u64, f32), for writing the
    /// register map of a new meter model.
    Probe(ProbeArgs),
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// The gateway's or meter's host name or address.
    #[arg(long)]
    host: String,
    /// Its TCP port.
    #[arg(long, default_value_t = drover_agent::meters::config::DEFAULT_MODBUS_PORT)]
    port: u16,
    /// The Modbus unit (slave) ID.
    #[arg(long, default_value_t = drover_agent::meters::config::DEFAULT_MODBUS_UNIT)]
    unit: u8,
    /// The first register.
    #[arg(long)]
    start: u16,
    /// How many registers.
    #[arg(long, default_value_t = 1)]
    count: u16,
    /// Read input registers (function 4) instead of holding registers (function 3).
    #[arg(long)]
    input: bool,
    /// How long connecting and each request may take, such as "3s".
    #[arg(long, default_value = "3s", value_parser = drover_agent::duration::parse_duration)]
    timeout: std::time::Duration,
}

/// The config file and the flags (or `DROVER_AGENT_*` variables) that override it, so that an
/// image can carry one config while each box gets, say, its provisioning key from the
/// environment.
#[derive(Debug, clap::Args)]
struct Settings {
    /// The agent config file (TOML; see agent.example.toml). Without it, the flags below must
    /// give at least the hub URL and the device type.
    #[arg(long, short, env = "DROVER_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The hub's URL.
    #[arg(long, env = "DROVER_AGENT_HUB_URL")]
    hub_url: Option<String>,
    /// A PEM file with the only CA to trust for the hub.
    #[arg(long, env = "DROVER_AGENT_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The fleet's provisioning key (needed until the device is enrolled).
    #[arg(long, env = "DROVER_AGENT_PROVISIONING_KEY", hide_env_values = true)]
    provisioning_key: Option<String>,
    /// The fleet's release public key (ed25519:...).
    #[arg(long, env = "DROVER_AGENT_RELEASE_KEY")]
    release_key: Option<String>,
    /// Where the agent keeps its state.
    #[arg(long, env = "DROVER_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The device type (hardware), such as raspberrypi4-arm64.
    #[arg(long, env = "DROVER_AGENT_DEVICE_TYPE")]
    device_type: Option<String>,
}

impl Settings {
    /// The config file (or the defaults) with the flags laid over it, validated.
    fn config(self) -> anyhow::Result<AgentConfig> {
        let mut config = match &self.config {
            Some(path) => AgentConfig::load(path)?,
            None => AgentConfig::default(),
        };
        if let Some(v) = self.hub_url {
            config.hub_url = v;
        }
        if let Some(v) = self.ca_file {
            config.ca_file = Some(v);
        }
        if let Some(v) = self.provisioning_key {
            config.provisioning_key = Some(drover_agent::Secret::new(v));
        }
        if let Some(v) = self.release_key {
            config.release_key = Some(v);
        }
        if let Some(v) = self.state_dir {
            config.state_dir = v;
        }
        if let Some(v) = self.device_type {
            config.device_type = v;
        }
        config.validate()?;
        Ok(config)
    }
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
        Command::Run(settings) => {
            let config = settings.config()?;
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
        Command::Modbus(ModbusCommand::Probe(args)) => probe(args),
        Command::Status(settings) => {
            let config = settings.config()?;
            let status = drover_agent::status(&config.state_dir).with_context(|| {
                format!("reading the state directory {}", config.state_dir.display())
            })?;
            println!("{status}");
            Ok(())
        }
    }
}

fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    use drover_agent::meters::modbus::{link::Endpoint, maps::RegisterKind, probe};
    let probe = probe::Probe {
        endpoint: Endpoint {
            host: args.host,
            port: args.port,
            unit: args.unit,
            connect_timeout: args.timeout,
            timeout: args.timeout,
        },
        kind: if args.input {
            RegisterKind::Input
        } else {
            RegisterKind::Holding
        },
        start: args.start,
        count: args.count,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let words = runtime
        .block_on(probe::read(&probe))
        .context("probing registers")?;
    print!("{}", probe::format(&probe, &words));
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Settings {
        let mut argv = vec!["drover-agent", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(settings) | Command::Status(settings) => settings,
            Command::Modbus(_) => unreachable!("the tests parse `run`"),
        }
    }

    #[test]
    fn flags_alone_make_a_config() {
        let config = settings(&[
            "--hub-url",
            "https://hub.example.com",
            "--device-type",
            "rpi4",
            "--state-dir",
            "/tmp/state",
            "--provisioning-key",
            "drv_p_x",
        ])
        .config()
        .unwrap();
        assert_eq!(config.hub_url, "https://hub.example.com");
        assert_eq!(config.provisioning_key.unwrap().expose(), "drv_p_x");
    }

    #[test]
    fn flags_override_the_file_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "hub_url = 'https://a.example'\ndevice_type = 'rpi4'\nstate_dir = '/tmp/s'\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let config = settings(&["--config", path, "--hub-url", "https://b.example"])
            .config()
            .unwrap();
        assert_eq!(config.hub_url, "https://b.example");
        assert_eq!(config.device_type, "rpi4");
        let err = settings(&["--config", path, "--device-type", "has space"])
            .config()
            .unwrap_err();
        assert!(format!("{err:#}").contains("device_type"), "{err:#}");
        let err = settings(&["--device-type", "rpi4"]).config().unwrap_err();
        assert!(format!("{err:#}").contains("hub_url"), "{err:#}");
    }
}
