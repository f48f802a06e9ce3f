//! Helpers for Drover's integration tests. Everything here is real: a real hub on
//! `127.0.0.1:0` with a real SQLite file or a fresh PostgreSQL database, real HTTP, real TCP.
//!
//! - [`Engine`], [`TestHub::start`]: a hub on either engine, torn down at the end of the test;
//! - [`postgres_url`]: the PostgreSQL server tests use (`DROVER_TEST_POSTGRES_URL`); tests that
//!   need it skip, saying so, when it is unset (CI always sets it);
//! - [`Api`]: a small client for the management API;
//! - [`CuttingProxy`]: a TCP proxy that cuts a download off after some bytes, goes offline on
//!   demand and records the requests it forwards;
//! - [`wait_until`]: polling for a condition instead of sleeping;
//! - [`tar_gz`], [`zip()`]: building release archives in memory.

mod archives;
pub mod device;
mod proxy;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drover_hub::{HubConfig, RunningHub};
use serde_json::Value;
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

pub use archives::{tar_gz, zip};
pub use proxy::{CuttingProxy, SeenRequest};

/// The environment variable naming the PostgreSQL server for tests.
pub const POSTGRES_ENV: &str = "DROVER_TEST_POSTGRES_URL";

/// The database engine a test hub runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A SQLite file in the hub's temporary data directory.
    Sqlite,
    /// A fresh database on the PostgreSQL server named by `DROVER_TEST_POSTGRES_URL`.
    Postgres,
}

/// The PostgreSQL URL for tests, or `None` (with a note on stderr) when it is not set.
pub fn postgres_url() -> Option<String> {
    match std::env::var(POSTGRES_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("note: {POSTGRES_ENV} is not set; skipping the PostgreSQL variant");
            None
        }
    }
}

/// A database made for one test on the PostgreSQL server, dropped when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    /// The URL of the new database.
    pub url: String,
    server_url: String,
    name: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database, or returns `None` when no server is configured.
    pub async fn create() -> anyhow::Result<Option<TestDatabase>> {
        let Some(server_url) = postgres_url() else {
            return Ok(None);
        };
        let name = format!(
            "drover_test_{}",
            drover_protocol::ids::random_string(b"abcdefghijklmnopqrstuvwxyz0123456789", 12)
        );
        let mut conn = sqlx::PgConnection::connect(&server_url)
            .await
            .with_context(|| format!("connecting to {server_url}"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let url = replace_database(&server_url, &name);
        Ok(Some(TestDatabase {
            url,
            server_url,
            name,
        }))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs outside any async context we can rely on, so the cleanup gets a thread and
        // a runtime of its own. FORCE ends connections the test's pool may still hold.
        let server_url = self.server_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&server_url).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Replaces the database name in a PostgreSQL URL.
fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(slash) => &base[..after_scheme + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// A hub running for one test.
#[derive(Debug)]
pub struct TestHub {
    /// The running hub.
    pub hub: RunningHub,
    /// Its URL.
    pub url: String,
    /// The admin token of the default organization.
    pub token: String,
    /// Its data directory (a temporary directory).
    pub data_dir: PathBuf,
    /// Cancel to stop it.
    pub shutdown: CancellationToken,
    config: HubConfig,
    _dir: tempfile::TempDir,
    _db: Option<TestDatabase>,
}

impl TestHub {
    /// Starts a hub on an engine, or returns `None` for PostgreSQL when no server is
    /// configured.
    pub async fn start(engine: Engine) -> anyhow::Result<Option<TestHub>> {
        TestHub::start_with(engine, |_| {}).await
    }

    /// Starts a hub after letting the test adjust its config.
    pub async fn start_with(
        engine: Engine,
        adjust: impl FnOnce(&mut HubConfig),
    ) -> anyhow::Result<Option<TestHub>> {
        let dir = tempfile::tempdir()?;
        let db = match engine {
            Engine::Sqlite => None,
            Engine::Postgres => match TestDatabase::create().await? {
                Some(db) => Some(db),
                None => return Ok(None),
            },
        };
        let mut config = HubConfig::new(dir.path().join("hub"));
        config.listen = "127.0.0.1:0".parse()?;
        config.presence_flush_ms = 50;
        config.database_url = db
            .as_ref()
            .map(|db| drover_hub::config::Secret(db.url.clone()));
        adjust(&mut config);
        let data_dir = config.data_dir.clone();
        let shutdown = CancellationToken::new();
        let hub = drover_hub::start(config.clone(), shutdown.clone()).await?;
        let token = hub
            .admin_token
            .clone()
            .context("the hub made no admin token")?;
        Ok(Some(TestHub {
            url: hub.url.clone(),
            hub,
            token,
            data_dir,
            shutdown,
            config,
            _dir: dir,
            _db: db,
        }))
    }

    /// Stops the hub (gracefully: what it acknowledged is stored) and starts it again on the
    /// same address, data directory and database, as an operator restarting it would.
    pub async fn restart(self) -> anyhow::Result<TestHub> {
        let mut config = self.config.clone();
        config.listen = self.hub.addr;
        self.shutdown.cancel();
        self.hub.wait().await?;
        let shutdown = CancellationToken::new();
        let hub = drover_hub::start(config.clone(), shutdown.clone()).await?;
        Ok(TestHub {
            url: hub.url.clone(),
            hub,
            token: self.token,
            data_dir: self.data_dir,
            shutdown,
            config,
            _dir: self._dir,
            _db: self._db,
        })
    }

    /// A management API client with the admin token (trusting the hub's own CA when it made
    /// one for TLS).
    pub fn api(&self) -> Api {
        match &self.hub.ca_file {
            Some(ca_file) => Api::trusting(&self.url, &self.token, ca_file)
                .expect("the CA file the hub just wrote is readable"),
            None => Api::new(&self.url, &self.token),
        }
    }

    /// Stops the hub and waits for it (the temporary directory stays until drop).
    pub async fn stop(self) -> anyhow::Result<(tempfile::TempDir, Option<TestDatabase>)> {
        self.shutdown.cancel();
        self.hub.wait().await?;
        Ok((self._dir, self._db))
    }
}

/// A minimal management API client: JSON in, `(status, JSON)` out.
#[derive(Debug, Clone)]
pub struct Api {
    /// The HTTP client.
    pub client: reqwest::Client,
    /// The hub's URL.
    pub base: String,
    /// The bearer token.
    pub token: String,
}

/// Installs ring as rustls's provider (reqwest is built without one). Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Api {
    /// A client for `base` with `token`.
    pub fn new(base: &str, token: &str) -> Api {
        install_crypto();
        Api {
            client: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    /// A client for `base` with `token` that trusts only the CA certificates in `ca_file`.
    pub fn trusting(base: &str, token: &str, ca_file: &Path) -> anyhow::Result<Api> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        install_crypto();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file)
            .with_context(|| format!("reading {}", ca_file.display()))?
        {
            roots.add(cert?)?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Api {
            client: reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .build()?,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    /// Sends a request; `body` is sent as JSON when given.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, json))
    }

    /// GET.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// PATCH with a JSON body.
    pub async fn patch(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }

    /// PUT raw bytes.
    pub async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<(u16, Value)> {
        let response = self
            .client
            .put(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .body(bytes)
            .send()
            .await?;
        let status = response.status().as_u16();
        let json = response.json().await.unwrap_or(Value::Null);
        Ok((status, json))
    }

    /// Creates a fleet with a new release key; returns (provisioning key, signing key).
    pub async fn create_fleet(
        &self,
        name: &str,
        auto_accept: bool,
        poll_interval_s: i64,
    ) -> anyhow::Result<(String, drover_protocol::signing::ReleaseSigningKey)> {
        let key = drover_protocol::signing::ReleaseSigningKey::generate();
        let (status, body) = self
            .post(
                "/api/v1/fleets",
                serde_json::json!({
                    "name": name,
                    "auto_accept": auto_accept,
                    "release_key": key.public().to_string(),
                    "poll_interval_s": poll_interval_s,
                }),
            )
            .await?;
        anyhow::ensure!(status == 201, "creating fleet {name}: {status} {body}");
        let provisioning = body["provisioning_key"]
            .as_str()
            .context("no provisioning key")?
            .to_string();
        Ok((provisioning, key))
    }

    /// Uploads an artifact and creates a signed release of it.
    pub async fn create_release(
        &self,
        fleet: &str,
        version: &str,
        module: drover_protocol::device::Module,
        artifact: &[u8],
        key: &drover_protocol::signing::ReleaseSigningKey,
    ) -> anyhow::Result<Value> {
        let sha256 = drover_protocol::ids::sha256_hex(artifact);
        let (status, body) = self
            .put_bytes(&format!("/api/v1/artifacts/{sha256}"), artifact.to_vec())
            .await?;
        anyhow::ensure!(status == 201 || status == 200, "upload: {status} {body}");
        let manifest = drover_protocol::signing::ReleaseManifest {
            version,
            module,
            device_type: None,
            sha256: &sha256,
            size: artifact.len() as u64,
        };
        let (status, body) = self
            .post(
                &format!("/api/v1/fleets/{fleet}/releases"),
                serde_json::json!({
                    "version": version,
                    "module": module.as_str(),
                    "sha256": sha256,
                    "signature": manifest.sign(key),
                }),
            )
            .await?;
        anyhow::ensure!(status == 201, "creating release {version}: {status} {body}");
        Ok(body)
    }

    /// Deploys a release to a fleet.
    pub async fn deploy(&self, fleet: &str, version: &str) -> anyhow::Result<()> {
        let (status, body) = self
            .post(
                &format!("/api/v1/fleets/{fleet}/deploy"),
                serde_json::json!({ "release": version }),
            )
            .await?;
        anyhow::ensure!(status == 200, "deploy: {status} {body}");
        Ok(())
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout` saying `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            replace_database("postgres://127.0.0.1:5432/test", "x"),
            "postgres://127.0.0.1:5432/x"
        );
        assert_eq!(
            replace_database("postgres://u@h/test?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://h:1", "x"), "postgres://h:1/x");
    }
}
