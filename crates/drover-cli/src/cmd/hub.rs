//! `drover hub`: runs the hub server; `drover hub org create` makes another organization.
//!
//! Settings come from a TOML file (`--config`), then `DROVER_*` environment variables, then
//! flags, each overriding the one before (clap reads the environment for each flag).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use drover_hub::HubConfig;
use drover_hub::config::{Secret, TlsConfig};
use tokio_util::sync::CancellationToken;

/// The data directory when neither a config file nor a flag names one.
pub use drover_hub::config::DEFAULT_DATA_DIR;

/// `drover hub`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HubArgs {
    #[command(subcommand)]
    command: Option<HubCommand>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum HubCommand {
    /// Organizations (tenants): each has its own fleets, devices, releases and tokens.
    #[command(subcommand)]
    Org(OrgCommand),
}

#[derive(Debug, Subcommand)]
enum OrgCommand {
    /// Create an organization and print its first admin token (shown only once).
    Create {
        /// The organization's name.
        name: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// List organizations.
    List {
        #[command(flatten)]
        serve: ServeArgs,
    },
}

/// Where the hub's settings come from.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML config file (see crates/drover-hub/hub.example.toml).
    #[arg(long, env = "DROVER_HUB_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "DROVER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory: SQLite database, artifacts, TLS files, the first admin token.
    #[arg(long, env = "DROVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Use PostgreSQL (postgres://...) instead of SQLite in the data directory.
    #[arg(long, env = "DROVER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The URL devices reach the hub at (for absolute download URLs in the seed protocol).
    #[arg(long, env = "DROVER_PUBLIC_URL")]
    public_url: Option<String>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "DROVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "DROVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Make a local CA and server certificate in <data-dir>/tls (once) and serve HTTPS.
    #[arg(long, env = "DROVER_TLS_SELF_SIGNED")]
    tls_self_signed: bool,
    /// Extra host names or addresses for the generated certificate.
    #[arg(long = "tls-name", env = "DROVER_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// Seconds between device check-ins in new fleets.
    #[arg(long, env = "DROVER_DEFAULT_POLL_INTERVAL")]
    default_poll_interval: Option<i64>,
}

impl ServeArgs {
    /// The hub config: the file (if any) with flags and environment laid over it.
    pub fn config(&self) -> anyhow::Result<HubConfig> {
        let mut config = match &self.config {
            Some(path) => HubConfig::load(path)?,
            None => HubConfig::new(DEFAULT_DATA_DIR),
        };
        if let Some(dir) = &self.data_dir {
            config.data_dir.clone_from(dir);
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(url) = &self.database_url {
            config.database_url = Some(Secret(url.clone()));
        }
        if let Some(url) = &self.public_url {
            config.public_url = Some(url.clone());
        }
        if let Some(seconds) = self.default_poll_interval {
            config.default_poll_interval_s = seconds;
        }
        if self.tls_cert.is_some() || self.tls_self_signed {
            let mut tls = config.tls.take().unwrap_or(TlsConfig {
                cert: None,
                key: None,
                self_signed: false,
                names: Vec::new(),
            });
            if self.tls_cert.is_some() {
                tls.cert.clone_from(&self.tls_cert);
                tls.key.clone_from(&self.tls_key);
            }
            tls.self_signed |= self.tls_self_signed;
            tls.names.extend(self.tls_names.iter().cloned());
            config.tls = Some(tls);
        }
        config.validate()?;
        Ok(config)
    }
}

/// Runs `drover hub ...`.
pub async fn run(args: HubArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        None => serve(&args.serve).await,
        Some(HubCommand::Org(OrgCommand::Create { name, serve })) => {
            let store = open_store(&serve.config()?).await?;
            let org = store.create_org(&name).await?;
            let (_, token) = store.create_api_token(org.id, "admin", "admin").await?;
            eprintln!("Created organization {name:?}. Its admin token (shown only now):");
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Some(HubCommand::Org(OrgCommand::List { serve })) => {
            let store = open_store(&serve.config()?).await?;
            for org in store.list_orgs().await? {
                println!("{}", org.name);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn open_store(config: &HubConfig) -> anyhow::Result<drover_hub::Store> {
    match &config.database_url {
        Some(url) => Ok(drover_hub::Store::connect(&url.0).await?),
        None => {
            std::fs::create_dir_all(&config.data_dir)?;
            Ok(drover_hub::Store::open_sqlite(&config.data_dir).await?)
        }
    }
}

async fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    let data_dir = config.data_dir.clone();
    let shutdown = CancellationToken::new();
    let hub = drover_hub::start(config, shutdown.clone())
        .await
        .context("starting the hub")?;
    print_banner(&hub.url, &data_dir, hub.ca_file.as_deref());
    super::shutdown_signal().await;
    eprintln!("stopping...");
    shutdown.cancel();
    hub.wait().await?;
    Ok(ExitCode::SUCCESS)
}

fn print_banner(url: &str, data_dir: &Path, ca: Option<&Path>) {
    let token_file = data_dir.join(drover_hub::ADMIN_TOKEN_FILE);
    eprintln!("Drover hub at {url}");
    eprintln!("  data directory: {}", data_dir.display());
    if token_file.exists() {
        eprintln!("  admin token:    in {} (mode 0600)", token_file.display());
    }
    let ca_flag = match ca {
        Some(ca) => {
            eprintln!(
                "  local CA:       {} (give it to agents as ca_file)",
                ca.display()
            );
            format!(" --ca {}", ca.display())
        }
        None => String::new(),
    };
    eprintln!(
        "  log in with:    drover login --hub {url} --token-file {}{ca_flag}",
        token_file.display()
    );
}
