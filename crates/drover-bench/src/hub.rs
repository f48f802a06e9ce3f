//! A hub under test: the release `drover hub` started as a child process on a data directory,
//! and the few management API calls the benchmarks make (create a fleet, list devices).

use std::path::Path;
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
}

/// A device as `GET /api/v1/devices` shows it (the fields the benchmarks read).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceView {
    /// When it was last seen (Unix milliseconds).
    pub last_seen: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct CreatedFleet {
    provisioning_key: String,
}

impl Hub {
    /// Starts `drover hub` on `data_dir`, listening on a free loopback port, and returns once it
    /// answers `/healthz`.
    pub async fn start(data_dir: &Path) -> anyhow::Result<Hub> {
        let drover = children::sibling_binary("drover")?;
        let mut command = tokio::process::Command::new(&drover);
        command
            .arg("hub")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0");
        // The hub is measured as operators run it: default log level, nothing extra.
        command.env_remove("RUST_LOG");
        let mut child = Child::spawn("the hub (drover hub)", command)?;
        let http = http_client()?;
        let deadline = Instant::now() + START_TIMEOUT;
        let url = wait_for_banner(&mut child, deadline).await?;
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
        })
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
