//! A hub under test: the release `drover hub` started as a child process on a data directory
//! (SQLite by default, or PostgreSQL; plain HTTP, or HTTPS from its own local CA), and the few
//! management API calls the benchmarks make (create a fleet, list devices and series).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::children::{self, Child};

/// How long the hub may take to start (open and migrate its database, bind, answer /healthz).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the hub may take to stop after SIGTERM (it writes its last presence batch).
const STOP_GRACE: Duration = Duration::from_secs(15);
/// The banner line `drover hub` prints once it listens.
const BANNER: &str = "Drover hub at ";

/// A running hub, killed when dropped.
#[derive(Debug)]
pub struct Hub {
    child: Child,
    /// Its base URL, such as `http://127.0.0.1:40123`.
    pub url: String,
    admin_token: String,
    http: reqwest::Client,
    /// The local CA the hub made, when it serves HTTPS.
    pub ca_file: Option<PathBuf>,
}

/// How to start a hub; the default is the plain-HTTP, embedded-SQLite hub.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Serve HTTPS with a local CA made in `<data_dir>/tls` (`--tls-self-signed`).
    pub tls: bool,
    /// Use this PostgreSQL database instead of SQLite (`--database-url`).
    pub database_url: Option<String>,
}

/// A device as `GET /api/v1/devices` shows it (the fields the benchmarks read).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceView {
    /// When it was last seen (Unix milliseconds).
    pub last_seen: Option<i64>,
}

/// A series as `GET /api/v1/series` shows it (the fields the benchmarks read).
#[derive(Debug, Clone, Deserialize)]
pub struct SeriesView {
    /// Its ID, for data queries.
    pub id: i64,
    /// The channel (`power`, `energy_import`, ...).
    pub channel: String,
    /// Points stored.
    pub points: i64,
}

#[derive(Debug, Deserialize)]
struct CreatedFleet {
    provisioning_key: String,
}

impl Hub {
    /// Starts `drover hub` on `data_dir`, listening on a free loopback port, and returns once it
    /// answers `/healthz`.
    pub async fn start(data_dir: &Path) -> anyhow::Result<Hub> {
        Hub::start_with(data_dir, &HubOptions::default()).await
    }

    /// [`Hub::start`] with options.
    pub async fn start_with(data_dir: &Path, options: &HubOptions) -> anyhow::Result<Hub> {
        let drover = children::sibling_binary("drover")?;
        let mut command = tokio::process::Command::new(&drover);
        command
            .arg("hub")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0");
        if options.tls {
            command.arg("--tls-self-signed");
        }
        if let Some(url) = &options.database_url {
            // The environment rather than a flag, so the URL stays out of `ps`.
            command.env("DROVER_DATABASE_URL", url);
        }
        // The hub is measured as operators run it: default log level, nothing extra.
        command.env_remove("RUST_LOG");
        let mut child = Child::spawn("the hub (drover hub)", command)?;
        let deadline = Instant::now() + START_TIMEOUT;
        let url = wait_for_banner(&mut child, deadline).await?;
        // The hub writes its CA before it prints the banner.
        let ca_file = options.tls.then(|| data_dir.join("tls").join("ca.pem"));
        let http = match &ca_file {
            Some(ca) => client_builder_trusting(ca)?
                .timeout(Duration::from_secs(30))
                .build()
                .context("building the HTTPS client")?,
            None => http_client()?,
        };
        wait_healthy(&http, &url, &mut child, deadline).await?;
        let token_file = data_dir.join("admin-token");
        let admin_token = std::fs::read_to_string(&token_file)
            .with_context(|| {
                format!(
                    "reading the hub's admin token from {}",
                    token_file.display()
                )
            })?
            .trim()
            .to_string();
        Ok(Hub {
            child,
            url,
            admin_token,
            http,
            ca_file,
        })
    }

    /// The admin token (an operator's bearer credential).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The hub's process ID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The HTTP client the benchmark talks to the hub with.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Fails, with the hub's last output, if it has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.child.ensure_running()
    }

    /// Creates a fleet that accepts new devices at once; returns its provisioning key.
    pub async fn create_fleet(&self, name: &str, poll_interval_s: u64) -> anyhow::Result<String> {
        let body = serde_json::json!({
            "name": name,
            "auto_accept": true,
            "poll_interval_s": poll_interval_s,
        });
        let response = self
            .http
            .post(format!("{}/api/v1/fleets", self.url))
            .bearer_auth(&self.admin_token)
            .json(&body)
            .send()
            .await
            .context("POST /api/v1/fleets")?;
        let created: CreatedFleet = json_answer(response, "creating a fleet").await?;
        Ok(created.provisioning_key)
    }

    /// Changes a fleet's settings (`PATCH /api/v1/fleets/{name}`); returns the fleet.
    pub async fn patch_fleet(
        &self,
        name: &str,
        patch: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let response = self
            .http
            .patch(format!("{}/api/v1/fleets/{name}", self.url))
            .bearer_auth(&self.admin_token)
            .json(&patch)
            .send()
            .await
            .context("PATCH /api/v1/fleets/{name}")?;
        json_answer(response, "changing a fleet").await
    }

    /// The series of a device.
    pub async fn series(&self, device: &str) -> anyhow::Result<Vec<SeriesView>> {
        let response = self
            .http
            .get(format!("{}/api/v1/series", self.url))
            .query(&[("device", device)])
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .context("GET /api/v1/series")?;
        json_answer(response, "listing series").await
    }

    /// The devices of a fleet.
    pub async fn devices(&self, fleet: &str) -> anyhow::Result<Vec<DeviceView>> {
        let response = self
            .http
            .get(format!("{}/api/v1/devices", self.url))
            .query(&[("fleet", fleet), ("limit", "10000")])
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .context("GET /api/v1/devices")?;
        json_answer(response, "listing devices").await
    }

    /// Stops the hub with SIGTERM, as an operator would, so it writes its last presence batch.
    pub async fn stop(self) -> anyhow::Result<()> {
        let status = self.child.terminate(STOP_GRACE).await?;
        if !status.success() {
            bail!("the hub exited with {status} when asked to stop");
        }
        Ok(())
    }
}

/// A reqwest client for plain-HTTP loopback calls, with timeouts so a stuck hub fails the
/// benchmark instead of hanging it.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a default TLS provider; the hub here speaks plain HTTP, but the
    // client still needs one installed. A second install (another call) is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")
}

/// A reqwest client builder that trusts only the CA certificates in `ca_file`, set up the way
/// the agent sets up its client (rustls with ring, the safe default protocol versions, no
/// ALPN, so HTTP/1.1; see `drover-agent/src/client.rs`).
pub fn client_builder_trusting(ca_file: &Path) -> anyhow::Result<reqwest::ClientBuilder> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .tls_backend_preconfigured(rustls_config_trusting(ca_file)?))
}

/// The agent's rustls client config: trusts only the CA certificates in `ca_file`. Clones
/// share one session cache, so a second client made from a clone resumes TLS sessions.
pub fn rustls_config_trusting(ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let pem = std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.with_context(|| format!("{} is not valid PEM", ca_file.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{} holds an unusable CA certificate", ca_file.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{} holds no certificate",
        ca_file.display()
    );
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Decodes a 2xx JSON answer, or fails with the hub's error body.
pub async fn json_answer<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    what: &str,
) -> anyhow::Result<T> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("{what}: reading the answer"))?;
    if !status.is_success() {
        bail!(
            "{what}: the hub answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).with_context(|| {
        format!(
            "{what}: decoding the answer {}",
            String::from_utf8_lossy(&body)
        )
    })
}

/// Waits for `drover hub` to print the URL it listens on.
async fn wait_for_banner(child: &mut Child, deadline: Instant) -> anyhow::Result<String> {
    loop {
        let banner = child
            .recent_stderr()
            .into_iter()
            .find_map(|line| line.strip_prefix(BANNER).map(|url| url.trim().to_string()));
        if let Some(url) = banner {
            return Ok(url);
        }
        child.ensure_running()?;
        if Instant::now() > deadline {
            bail!(
                "the hub did not print its address within {START_TIMEOUT:?}; its output:\n{}",
                child.recent_stderr().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/healthz` until it answers 200.
async fn wait_healthy(
    http: &reqwest::Client,
    url: &str,
    child: &mut Child,
    deadline: Instant,
) -> anyhow::Result<()> {
    let healthz = format!("{url}/healthz");
    loop {
        match http.get(&healthz).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {}
            Ok(response) => bail!("{healthz} answered {}", response.status()),
            Err(e) => return Err(e).with_context(|| format!("{healthz} did not answer in time")),
        }
        child.ensure_running()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
