//! The hub's configuration: a TOML file, overridden by `DROVER_*` environment variables and
//! flags (the CLI does the overriding; this module owns the shape, the defaults and the checks).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the hub listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Seconds between device check-ins in a new fleet.
pub const DEFAULT_POLL_INTERVAL_S: i64 = 60;
/// How often batched last-seen times are written.
pub const DEFAULT_PRESENCE_FLUSH_MS: u64 = 5_000;
/// The largest artifact accepted (1 GiB).
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 1 << 30;
/// The largest JSON request body accepted (1 MiB).
pub const DEFAULT_MAX_JSON_BYTES: usize = 1 << 20;
/// Telemetry batches that may wait for the writer before devices are told to retry later.
pub const DEFAULT_INGEST_QUEUE_CAPACITY: usize = 4096;
/// Most batches the writer lands in one transaction.
pub const DEFAULT_INGEST_GROUP_MAX: usize = 512;
/// How long a landed batch may wait to be folded into chunks and rollups.
pub const DEFAULT_INGEST_FOLD_DELAY_MS: u64 = 1000;
/// Most landed batches folded in one transaction.
pub const DEFAULT_INGEST_FOLD_BATCHES: usize = 4096;
/// The data directory when neither the config file nor `--data-dir` names one.
pub const DEFAULT_DATA_DIR: &str = "./drover-data";
/// Days raw points are kept (then only rollups remain).
pub const DEFAULT_RETENTION_RAW_DAYS: u32 = 400;
/// Days 1-minute rollups are kept; hourly and daily rollups are kept for good by default.
pub const DEFAULT_RETENTION_1M_DAYS: u32 = 1830;

/// A secret string (a database URL with a password, say) whose `Debug` prints `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Everything the hub needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The data directory: SQLite database, artifacts, TLS material, the admin token file
    /// (default [`DEFAULT_DATA_DIR`]; `drover hub --data-dir` sets it too).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `postgres://...` to use PostgreSQL; unset means SQLite in the data directory.
    #[serde(default)]
    pub database_url: Option<Secret>,
    /// The URL devices and operators reach the hub at (`https://hub.example.com`). Used for
    /// absolute download URLs in the seed protocol; unset means "from the request's Host".
    #[serde(default)]
    pub public_url: Option<String>,
    /// TLS settings; unset means plain HTTP (behind a reverse proxy, say).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Seconds between device check-ins in new fleets.
    #[serde(default = "default_poll_interval")]
    pub default_poll_interval_s: i64,
    /// Milliseconds between writes of batched last-seen times.
    #[serde(default = "default_presence_flush")]
    pub presence_flush_ms: u64,
    /// The largest artifact accepted, in bytes.
    #[serde(default = "default_max_artifact")]
    pub max_artifact_bytes: u64,
    /// The largest JSON request body accepted, in bytes.
    #[serde(default = "default_max_json")]
    pub max_json_bytes: usize,
    /// Telemetry batches that may wait for the writer; beyond, devices get `503` and retry.
    #[serde(default = "default_ingest_queue")]
    pub ingest_queue_capacity: usize,
    /// Most batches the writer lands in one transaction.
    #[serde(default = "default_ingest_group")]
    pub ingest_group_max: usize,
    /// Milliseconds a landed batch may wait before the folder writes it into chunks and
    /// rollups (sooner when a query or report needs it).
    #[serde(default = "default_ingest_fold_delay")]
    pub ingest_fold_delay_ms: u64,
    /// Most landed batches folded in one transaction; 16 times as many waiting turn new
    /// batches away (`503`) until the folder catches up.
    #[serde(default = "default_ingest_fold_batches")]
    pub ingest_fold_batches: usize,
    /// Days raw points are kept (0: forever).
    #[serde(default = "default_retention_raw")]
    pub retention_raw_days: u32,
    /// Days 1-minute rollups are kept (0: forever).
    #[serde(default = "default_retention_1m")]
    pub retention_1m_days: u32,
    /// Days hourly rollups are kept (0: forever, the default).
    #[serde(default)]
    pub retention_1h_days: u32,
    /// Days daily rollups are kept (0: forever, the default).
    #[serde(default)]
    pub retention_1d_days: u32,
}

/// TLS settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. With `self_signed`, where the generated one is written (default
    /// `<data_dir>/tls/server.pem`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key (default with `self_signed`: `<data_dir>/tls/server.key`).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Create a local CA and a server certificate in `<data_dir>/tls` if none exist yet; agents
    /// and the CLI then trust `<data_dir>/tls/ca.pem`.
    #[serde(default)]
    pub self_signed: bool,
    /// Extra host names or IP addresses for a generated certificate (localhost and 127.0.0.1
    /// are always included).
    #[serde(default)]
    pub names: Vec<String>,
}

fn default_listen() -> SocketAddr {
    // A constant that parses; the fallback only keeps this free of panics.
    DEFAULT_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 8080)))
}
fn default_poll_interval() -> i64 {
    DEFAULT_POLL_INTERVAL_S
}
fn default_presence_flush() -> u64 {
    DEFAULT_PRESENCE_FLUSH_MS
}
fn default_max_artifact() -> u64 {
    DEFAULT_MAX_ARTIFACT_BYTES
}
fn default_max_json() -> usize {
    DEFAULT_MAX_JSON_BYTES
}
fn default_ingest_queue() -> usize {
    DEFAULT_INGEST_QUEUE_CAPACITY
}
fn default_ingest_group() -> usize {
    DEFAULT_INGEST_GROUP_MAX
}
fn default_ingest_fold_delay() -> u64 {
    DEFAULT_INGEST_FOLD_DELAY_MS
}
fn default_ingest_fold_batches() -> usize {
    DEFAULT_INGEST_FOLD_BATCHES
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_retention_raw() -> u32 {
    DEFAULT_RETENTION_RAW_DAYS
}
fn default_retention_1m() -> u32 {
    DEFAULT_RETENTION_1M_DAYS
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid hub config: {0}")]
    Invalid(String),
}

impl HubConfig {
    /// A config with defaults for everything but the data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> HubConfig {
        HubConfig {
            listen: default_listen(),
            data_dir: data_dir.into(),
            database_url: None,
            public_url: None,
            tls: None,
            default_poll_interval_s: DEFAULT_POLL_INTERVAL_S,
            presence_flush_ms: DEFAULT_PRESENCE_FLUSH_MS,
            max_artifact_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
            max_json_bytes: DEFAULT_MAX_JSON_BYTES,
            ingest_queue_capacity: DEFAULT_INGEST_QUEUE_CAPACITY,
            ingest_group_max: DEFAULT_INGEST_GROUP_MAX,
            ingest_fold_delay_ms: DEFAULT_INGEST_FOLD_DELAY_MS,
            ingest_fold_batches: DEFAULT_INGEST_FOLD_BATCHES,
            retention_raw_days: DEFAULT_RETENTION_RAW_DAYS,
            retention_1m_days: DEFAULT_RETENTION_1M_DAYS,
            retention_1h_days: 0,
            retention_1d_days: 0,
        }
    }

    /// Reads and checks a TOML config file.
    pub fn load(path: &Path) -> Result<HubConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        HubConfig::parse(&text, path)
    }

    /// Parses and checks TOML text (`path` is only for messages).
    pub fn parse(text: &str, path: &Path) -> Result<HubConfig, ConfigError> {
        let config: HubConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=86_400).contains(&self.default_poll_interval_s) {
            return Err(ConfigError::Invalid(format!(
                "default_poll_interval_s must be 1 to 86400 seconds, got {}",
                self.default_poll_interval_s
            )));
        }
        if !(10..=600_000).contains(&self.presence_flush_ms) {
            return Err(ConfigError::Invalid(format!(
                "presence_flush_ms must be 10 to 600000, got {}",
                self.presence_flush_ms
            )));
        }
        if self.ingest_queue_capacity == 0
            || self.ingest_group_max == 0
            || self.ingest_fold_batches == 0
        {
            return Err(ConfigError::Invalid(
                "ingest_queue_capacity, ingest_group_max and ingest_fold_batches must be at least 1"
                    .into(),
            ));
        }
        if self.ingest_fold_delay_ms > 600_000 {
            return Err(ConfigError::Invalid(format!(
                "ingest_fold_delay_ms must be at most 600000, got {}",
                self.ingest_fold_delay_ms
            )));
        }
        // A coarser resolution is kept at least as long as a finer one, so that what a
        // query or report cannot read at one resolution it finds at the next.
        let retention = [
            ("retention_raw_days", self.retention_raw_days),
            ("retention_1m_days", self.retention_1m_days),
            ("retention_1h_days", self.retention_1h_days),
            ("retention_1d_days", self.retention_1d_days),
        ];
        for pair in retention.windows(2) {
            let ((finer, kept), (coarser, coarser_kept)) = (pair[0], pair[1]);
            if coarser_kept != 0 && (kept == 0 || coarser_kept < kept) {
                return Err(ConfigError::Invalid(format!(
                    "{coarser} ({coarser_kept}) must be 0 (forever) or at least {finer} ({})",
                    if kept == 0 {
                        "forever".to_string()
                    } else {
                        kept.to_string()
                    }
                )));
            }
        }
        if self.max_json_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_json_bytes must be at least 1024".into(),
            ));
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "public_url must start with http:// or https://, got {url:?}"
            )));
        }
        if let Some(tls) = &self.tls
            && !tls.self_signed
            && (tls.cert.is_none() || tls.key.is_none())
        {
            return Err(ConfigError::Invalid(
                "[tls] needs both cert and key, or self_signed = true".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../hub.example.toml");
        let config = HubConfig::parse(text, Path::new("hub.example.toml")).unwrap();
        assert_eq!(config.default_poll_interval_s, 60);
        assert!(config.tls.is_some());
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let err = HubConfig::parse("data_dir = '/x'\nlisten = 'nope'", Path::new("h.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("h.toml"), "{err}");
        let err = HubConfig::parse("data_dir = '/x'\ncolour = 'blue'", Path::new("h.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = HubConfig::parse(
            "data_dir = '/x'\ndefault_poll_interval_s = 0",
            Path::new("h.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("default_poll_interval_s"), "{err}");
        let err = HubConfig::parse(
            "data_dir = '/x'\n[tls]\ncert = 'a.pem'",
            Path::new("h.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cert and key"), "{err}");
        for (retention, key) in [
            ("retention_1m_days = 100", "retention_1m_days"),
            (
                "retention_raw_days = 0\nretention_1m_days = 900",
                "retention_1m_days",
            ),
            ("retention_1h_days = 1000", "retention_1h_days"),
            (
                "retention_1h_days = 0\nretention_1d_days = 3000",
                "retention_1d_days",
            ),
        ] {
            let err = HubConfig::parse(
                &format!("data_dir = '/x'\n{retention}"),
                Path::new("h.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(key), "{retention}: {err}");
        }
        let kept = "data_dir = '/x'\nretention_1h_days = 3650\nretention_1d_days = 3650";
        let config = HubConfig::parse(kept, Path::new("h.toml")).unwrap();
        let bare = HubConfig::parse("ingest_fold_delay_ms = 5", Path::new("h.toml")).unwrap();
        assert_eq!(bare.data_dir, Path::new(DEFAULT_DATA_DIR));
        assert_eq!(
            (config.retention_1h_days, config.retention_1d_days),
            (3650, 3650)
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let mut config = HubConfig::new("/data");
        config.database_url = Some(Secret("postgres://u:hunter2@db/x".into()));
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
