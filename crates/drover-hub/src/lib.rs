//! The Drover hub, as a library: the server that devices check in with and operators manage
//! fleets through. The `drover hub` command, `drover demo` and the tests all call [`start`].
//!
//! - [`api`]: the HTTP surface (device API, management API, seed protocol, OpenAPI);
//! - [`store`]: the database (SQLite or PostgreSQL) behind one interface;
//! - [`artifacts`]: content-addressed release files;
//! - [`cache`]: what check-ins are answered from without touching the database;
//! - [`desired`]: working out what each device should run;
//! - [`server`], [`tls`]: connections, certificates.

pub mod api;
pub mod artifacts;
pub mod cache;
pub mod config;
pub mod desired;
pub mod error;
pub mod files;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

pub use config::HubConfig;
pub use state::HubState;
pub use store::Store;

/// The name of the organization made on first start.
pub const DEFAULT_ORG: &str = "default";
/// How many stored points the live stream buffers for slow listeners.
const LIVE_BUFFER: usize = 16_384;
/// The file (in the data directory) the first admin token is written to.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// A hub that is up and accepting connections.
#[derive(Debug)]
pub struct RunningHub {
    /// The bound address.
    pub addr: SocketAddr,
    /// The URL to reach it at (`http://127.0.0.1:port` or `https://...`).
    pub url: String,
    /// The admin token from the data directory's token file, if it is there.
    pub admin_token: Option<String>,
    /// The local CA certificate clients should trust, when the hub made one.
    pub ca_file: Option<PathBuf>,
    /// The shared state (for tests and the demo).
    pub state: HubState,
    tasks: tokio::task::JoinSet<()>,
}

impl RunningHub {
    /// Waits until the hub has stopped (after its shutdown token is cancelled) and the last
    /// presence batch is written.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        while let Some(result) = self.tasks.join_next().await {
            result.context("a hub task failed")?;
        }
        self.state.store.close().await;
        Ok(())
    }
}

/// Starts the hub: opens the database (migrating it), makes the first organization and admin
/// token if the database is new, binds the listener and starts serving. Returns once the hub
/// accepts connections; it stops when `shutdown` is cancelled.
pub async fn start(config: HubConfig, shutdown: CancellationToken) -> anyhow::Result<RunningHub> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let store = match &config.database_url {
        Some(url) => Store::connect(&url.0)
            .await
            .with_context(|| format!("opening {}", store::redact_url(&url.0)))?,
        None => Store::open_sqlite(&config.data_dir)
            .await
            .with_context(|| {
                format!(
                    "opening the SQLite database in {}",
                    config.data_dir.display()
                )
            })?,
    };
    let admin_token = bootstrap(&store, &config).await?;
    let artifacts = artifacts::LocalArtifacts::open(&config.data_dir)
        .await
        .context("opening the artifact directory")?;
    let (tls, ca_file) = match &config.tls {
        Some(tls_config) => {
            let files = tls::prepare(tls_config, &config.data_dir)?;
            (Some(tls::server_config(&files)?), files.ca)
        }
        None => (None, None),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let url = server::url_for(addr, tls.is_some());
    let (live, _) = tokio::sync::broadcast::channel(LIVE_BUFFER);
    let queue_config = telemetry::queue::QueueConfig {
        capacity: config.ingest_queue_capacity,
        max_group: config.ingest_group_max,
    };
    let folder =
        telemetry::folder::Folder::new(store.clone(), live.clone(), config.ingest_fold_batches)
            .await
            .context("counting the landed telemetry batches")?;
    let (ingest, writer) = telemetry::queue::LocalQueue::start(
        store.clone(),
        queue_config,
        folder.clone(),
        shutdown.clone(),
    );
    let state = HubState(Arc::new(state::Shared {
        store,
        artifacts: Arc::new(artifacts),
        devices: cache::DeviceCache::default(),
        presence: cache::PresenceBuffer::default(),
        operators: Default::default(),
        ingest: Arc::new(ingest),
        live,
        folder: folder.clone(),
        config,
        shutdown: shutdown.clone(),
    }));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        if let Err(e) = writer.await {
            tracing::error!(error = %e, "the ingest writer failed");
        }
    });
    tasks.spawn(telemetry::folder::run(
        folder,
        Duration::from_millis(state.config.ingest_fold_delay_ms),
        shutdown.clone(),
    ));
    tasks.spawn(telemetry::retention::run(state.clone(), shutdown.clone()));
    tasks.spawn(server::serve(
        listener,
        api::router(state.clone()),
        tls,
        shutdown.clone(),
    ));
    tasks.spawn(flush_presence(state.clone(), shutdown));
    tracing::info!(%url, "hub listening");
    Ok(RunningHub {
        addr,
        url,
        admin_token,
        ca_file,
        state,
        tasks,
    })
}

/// Runs the hub until `shutdown` is cancelled.
pub async fn run(config: HubConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await
}

/// On a new database, makes the default organization and its admin token and writes the token
/// to a 0600 file in the data directory (it is never logged). Returns the token from that file.
async fn bootstrap(store: &Store, config: &HubConfig) -> anyhow::Result<Option<String>> {
    let token_path = config.data_dir.join(ADMIN_TOKEN_FILE);
    if store.list_orgs().await?.is_empty() {
        match store.create_org(DEFAULT_ORG).await {
            Ok(org) => {
                let (_, token) = store.create_api_token(org.id, "admin", "admin").await?;
                files::write_file(&token_path, format!("{token}\n").as_bytes(), true)
                    .with_context(|| format!("writing {}", token_path.display()))?;
                tracing::info!(file = %token_path.display(), "created the first organization; its admin token is in this file");
            }
            // Another replica made it a moment ago.
            Err(store::StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match std::fs::read_to_string(&token_path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(_) => Ok(None),
    }
}

/// Writes batched last-seen times every `presence_flush_ms`, and once more at shutdown.
async fn flush_presence(state: HubState, shutdown: CancellationToken) {
    let period = Duration::from_millis(state.config.presence_flush_ms);
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(period) => false,
            () = shutdown.cancelled() => true,
        };
        let batch = state.presence.drain();
        if !batch.is_empty() {
            match state.store.flush_presence(&batch).await {
                Ok(()) => state.presence.written(),
                Err(e) => {
                    tracing::warn!(error = %e, devices = batch.len(), "writing last-seen times failed; will retry");
                    state.presence.restore();
                }
            }
        }
        if stopping {
            break;
        }
    }
}
