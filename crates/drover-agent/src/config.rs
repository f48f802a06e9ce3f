//! The agent's config file (TOML): where the hub is, what to trust, where to keep state, and
//! how the install modules behave.
//!
//! Unknown keys are refused (a typo must not silently fall back to a default), every default is
//! a named constant, and [`AgentConfig::validate`] runs once right after parsing, so that the rest
//! of the agent can rely on the values. `agent.example.toml` beside `Cargo.toml` documents every
//! key and is parsed by a test.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::format_duration;
use crate::meters::MetersConfig;

/// Where the agent keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/drover-agent";
/// The poll interval floor.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// The poll interval ceiling.
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The poll interval used until the hub names one.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// The longest wait between retries after the hub could not be reached.
pub const DEFAULT_ERROR_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// No poll interval may be shorter than this, whatever the config says.
pub const HARD_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The wait after a release's first failure; it doubles with each further failure.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(60);
/// The longest wait between attempts at a failing release.
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// Failures after which a release is held until an operator acts.
pub const DEFAULT_MAX_FAILURES: u32 = 3;
/// How long `update.sh` may run.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The script timeout is clamped into this range (the seed clamped to 1 s .. 1 h).
pub const SCRIPT_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// How long a new app release has to pass its health check.
pub const DEFAULT_HEALTH_WINDOW: Duration = Duration::from_secs(60);
/// How often the health check runs within the window.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// The most tags, and the most attributes, a device may report.
pub const MAX_TAGS: usize = 64;
/// The longest attribute value a device may report.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;
/// How long a stop, start or health command may run.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The most disk the spool of readings may take before it drops its oldest data.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// The size at which the spool starts a new segment file (the unit it drops and deletes).
pub const DEFAULT_SPOOL_SEGMENT_BYTES: u64 = 1024 * 1024;
/// The longest readings wait in the spool before they are fsync'd.
pub const DEFAULT_SPOOL_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Unsynced bytes after which the spool fsyncs without waiting for the interval.
pub const DEFAULT_SPOOL_SYNC_BYTES: u64 = 256 * 1024;
/// The range a spool segment's size must lie in.
pub const SPOOL_SEGMENT_BYTES_RANGE: (u64, u64) = (4096, 64 * 1024 * 1024);
/// The longest sync interval accepted: a power cut loses at most this much of the readings.
pub const SPOOL_MAX_SYNC_INTERVAL: Duration = Duration::from_secs(60);

/// How often readings go to the hub unless a data budget widens it.
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(60);
/// The widest a data budget may make the batch interval.
pub const DEFAULT_MAX_BATCH_INTERVAL: Duration = Duration::from_secs(6 * 3600);
/// The most readings one batch carries (a 2-second meter with three channels makes 5,400 an
/// hour; a backlog goes out in batches of this size, back to back).
pub const DEFAULT_MAX_BATCH_READINGS: usize = 20_000;

/// The default `[telemetry] ack_interval`.
pub const DEFAULT_ACK_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// The range the batch interval must lie in.
pub const BATCH_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(24 * 3600));

/// A value that must not appear in logs. `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole agent config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The hub's base URL, such as `https://hub.example.com:8443`.
    pub hub_url: String,
    /// A PEM file with the CA to trust for the hub. When set, only this CA is trusted; when
    /// absent, the operating system's trust store is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The fleet's provisioning key (`drv_p_...`); needed only until the device is enrolled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioning_key: Option<Secret>,
    /// Where the agent keeps its identity, credential, downloads and update state.
    pub state_dir: PathBuf,
    /// The device type (hardware), such as `raspberrypi4-arm64`.
    pub device_type: String,
    /// The fleet's release public key (`ed25519:...`). When absent, the key the hub hands out at
    /// enrolment is trusted on first use and kept in the state directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_key: Option<String>,
    /// Tags reported to the hub.
    pub tags: Vec<String>,
    /// Attributes reported to the hub.
    pub attributes: BTreeMap<String, String>,
    /// Check-in timing.
    pub poll: PollConfig,
    /// What happens after a release fails.
    pub retry: RetryConfig,
    /// The `script` install module.
    pub script: ScriptConfig,
    /// The `app` install module.
    pub app: AppConfig,
    /// The on-disk spool of meter readings.
    pub spool: SpoolConfig,
    /// How readings go from the spool to the hub.
    pub telemetry: TelemetryConfig,
    /// Meter sources (`[[meters.modbus]]`, `[[meters.s0]]`, ...); none by default.
    #[serde(skip_serializing_if = "MetersConfig::is_empty")]
    pub meters: MetersConfig,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            hub_url: String::new(),
            ca_file: None,
            provisioning_key: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            device_type: String::new(),
            release_key: None,
            tags: Vec::new(),
            attributes: BTreeMap::new(),
            poll: PollConfig::default(),
            retry: RetryConfig::default(),
            script: ScriptConfig::default(),
            app: AppConfig::default(),
            spool: SpoolConfig::default(),
            telemetry: TelemetryConfig::default(),
            meters: MetersConfig::default(),
        }
    }
}

/// `[poll]`: check-in timing. The hub names an interval; these bound it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    /// The shortest interval, whatever the hub says (at least 100ms).
    #[serde(with = "crate::duration::text")]
    pub min_interval: Duration,
    /// The longest interval; also how often a revoked device still asks.
    #[serde(with = "crate::duration::text")]
    pub max_interval: Duration,
    /// The interval until the hub has named one.
    #[serde(with = "crate::duration::text")]
    pub default_interval: Duration,
    /// The cap of the exponential backoff after the hub could not be reached.
    #[serde(with = "crate::duration::text")]
    pub error_backoff_max: Duration,
}

impl Default for PollConfig {
    fn default() -> PollConfig {
        PollConfig {
            min_interval: DEFAULT_MIN_INTERVAL,
            max_interval: DEFAULT_MAX_INTERVAL,
            default_interval: DEFAULT_INTERVAL,
            error_backoff_max: DEFAULT_ERROR_BACKOFF_MAX,
        }
    }
}

/// `[retry]`: how a failing release is retried and when it is held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// The wait after the first failure; doubled after each further one.
    #[serde(with = "crate::duration::text")]
    pub base: Duration,
    /// The longest wait between attempts.
    #[serde(with = "crate::duration::text")]
    pub max_backoff: Duration,
    /// After this many failures the release is held until an operator acts.
    pub max_failures: u32,
}

impl Default for RetryConfig {
    fn default() -> RetryConfig {
        RetryConfig {
            base: DEFAULT_RETRY_BASE,
            max_backoff: DEFAULT_RETRY_MAX_BACKOFF,
            max_failures: DEFAULT_MAX_FAILURES,
        }
    }
}

/// `[script]`: the `script` install module (`update.sh`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptConfig {
    /// How long `update.sh` may run before its whole process group is killed (clamped to
    /// 1s .. 24h).
    #[serde(with = "crate::duration::text")]
    pub timeout: Duration,
    /// Passed to scripts as `apps_root` (default `<state_dir>/apps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apps_root: Option<PathBuf>,
}

impl Default for ScriptConfig {
    fn default() -> ScriptConfig {
        ScriptConfig {
            timeout: DEFAULT_SCRIPT_TIMEOUT,
            apps_root: None,
        }
    }
}

impl ScriptConfig {
    /// The timeout, clamped to [`SCRIPT_TIMEOUT_RANGE`].
    pub fn effective_timeout(&self) -> Duration {
        self.timeout
            .clamp(SCRIPT_TIMEOUT_RANGE.0, SCRIPT_TIMEOUT_RANGE.1)
    }
}

/// `[app]`: the `app` install module. Commands are shell command lines run with `sh -c`; a
/// missing command is skipped (a missing health check passes at once).
///
/// A `start` command that launches a long-running process should hand it to a service manager
/// (`systemctl restart ...`) or redirect its output: the agent captures command output through a
/// file and waits only for the command itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// Where `releases/` and the `current` symlink live (default `<state_dir>/app`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Stops the running release (run in its directory; skipped on the first install, when no
    /// release of this app runs yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
    /// Starts a release (run in its directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// Exits 0 when the new release is healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Tells the running release that the config changed (run in its directory after a change of
    /// the desired config that came without a new release; failures are only logged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reload: Option<String>,
    /// How long the new release has to become healthy.
    #[serde(with = "crate::duration::text")]
    pub health_window: Duration,
    /// The pause between health checks.
    #[serde(with = "crate::duration::text")]
    pub health_interval: Duration,
    /// How long any one command may run.
    #[serde(with = "crate::duration::text")]
    pub command_timeout: Duration,
}

impl Default for AppConfig {
    fn default() -> AppConfig {
        AppConfig {
            root: None,
            stop: None,
            start: None,
            health: None,
            reload: None,
            health_window: DEFAULT_HEALTH_WINDOW,
            health_interval: DEFAULT_HEALTH_INTERVAL,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
}

/// `[spool]`: the on-disk queue of readings between the meters and the sender
/// ([`crate::spool`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// The most bytes the spool's segment files may take; when full, the oldest segment is
    /// dropped and its readings counted (at least twice `segment_bytes`).
    pub max_bytes: u64,
    /// The size at which a new segment file is started (4 KiB .. 64 MiB).
    pub segment_bytes: u64,
    /// The longest appended readings wait before they are fsync'd (at most 1m). A power cut
    /// loses at most this much.
    #[serde(with = "crate::duration::text")]
    pub sync_interval: Duration,
    /// Unsynced bytes after which the spool fsyncs at once (0: after every append).
    pub sync_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> SpoolConfig {
        SpoolConfig {
            max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            segment_bytes: DEFAULT_SPOOL_SEGMENT_BYTES,
            sync_interval: DEFAULT_SPOOL_SYNC_INTERVAL,
            sync_bytes: DEFAULT_SPOOL_SYNC_BYTES,
        }
    }
}

impl SpoolConfig {
    /// Checks the values; [`AgentConfig::validate`] calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        let (min, max) = SPOOL_SEGMENT_BYTES_RANGE;
        if !(min..=max).contains(&self.segment_bytes) {
            return Err(invalid(
                "spool.segment_bytes",
                format!("must be {min} to {max} (got {})", self.segment_bytes),
            ));
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return Err(invalid(
                "spool.max_bytes",
                format!(
                    "must be at least twice spool.segment_bytes, {} (got {})",
                    2 * self.segment_bytes,
                    self.max_bytes
                ),
            ));
        }
        if self.sync_interval > SPOOL_MAX_SYNC_INTERVAL {
            return Err(invalid(
                "spool.sync_interval",
                format!(
                    "must be at most {} (got {})",
                    format_duration(SPOOL_MAX_SYNC_INTERVAL),
                    format_duration(self.sync_interval)
                ),
            ));
        }
        Ok(())
    }
}

/// `[telemetry]`: how readings go from the spool to the hub ([`crate::sender`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// How often a batch goes out when no budget is pressing (a backlog goes at once).
    #[serde(with = "crate::duration::text")]
    pub batch_interval: Duration,
    /// The widest the interval may become to stay inside `monthly_budget_bytes`.
    #[serde(with = "crate::duration::text")]
    pub max_batch_interval: Duration,
    /// The bytes telemetry may use per calendar month (UTC), all-in as the agent estimates
    /// them; none when absent. The agent widens its batch interval to stay inside it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monthly_budget_bytes: Option<u64>,
    /// The most readings in one batch.
    pub max_batch_readings: usize,
    /// Send batches on one long-lived stream (`POST /device/v1/batches/stream`) rather than a
    /// request each: about 200 bytes less per batch. Off, or against a hub without the stream,
    /// every batch is its own request.
    pub stream: bool,
    /// On the stream, how often the hub is asked to confirm what it stored (the batches up to
    /// then are kept in the spool until it does, and sent again after a broken connection).
    /// Each confirmation costs about 150 bytes both ways.
    #[serde(with = "crate::duration::text")]
    pub ack_interval: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> TelemetryConfig {
        TelemetryConfig {
            batch_interval: DEFAULT_BATCH_INTERVAL,
            max_batch_interval: DEFAULT_MAX_BATCH_INTERVAL,
            monthly_budget_bytes: None,
            max_batch_readings: DEFAULT_MAX_BATCH_READINGS,
            stream: true,
            ack_interval: DEFAULT_ACK_INTERVAL,
        }
    }
}

impl TelemetryConfig {
    /// Checks the values; [`AgentConfig::validate`] calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        let (min, max) = BATCH_INTERVAL_RANGE;
        for (field, value) in [
            ("telemetry.batch_interval", self.batch_interval),
            ("telemetry.max_batch_interval", self.max_batch_interval),
        ] {
            if !(min..=max).contains(&value) {
                return Err(invalid(
                    field,
                    format!(
                        "must be {} to {} (got {})",
                        format_duration(min),
                        format_duration(max),
                        format_duration(value)
                    ),
                ));
            }
        }
        if self.max_batch_interval < self.batch_interval {
            return Err(invalid(
                "telemetry.max_batch_interval",
                "must be at least telemetry.batch_interval".into(),
            ));
        }
        let most = drover_protocol::batch::MAX_READINGS;
        if !(1..=most).contains(&self.max_batch_readings) {
            return Err(invalid(
                "telemetry.max_batch_readings",
                format!("must be 1 to {most} (got {})", self.max_batch_readings),
            ));
        }
        if self.ack_interval > Duration::from_secs(3600) {
            return Err(invalid(
                "telemetry.ack_interval",
                format!(
                    "must be at most 1h (got {})",
                    format_duration(self.ack_interval)
                ),
            ));
        }
        if self.monthly_budget_bytes == Some(0) {
            return Err(invalid(
                "telemetry.monthly_budget_bytes",
                "must be more than 0; leave it out for no budget".into(),
            ));
        }
        Ok(())
    }
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the agent config {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config (syntax, unknown key, wrong type).
    #[error("the agent config {} is not valid: {source}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's error, with line and column.
        source: toml::de::Error,
    },
    /// A value is out of range or malformed.
    #[error("agent config: `{field}` {message}")]
    Invalid {
        /// The key, such as `poll.min_interval`.
        field: &'static str,
        /// What is wrong and what would be right.
        message: String,
    },
}

impl AgentConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = AgentConfig::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value. Called by [`AgentConfig::load`] and by [`crate::run`], so that a
    /// config built in code is held to the same rules as one read from a file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        self.hub_base()
            .map_err(|message| invalid("hub_url", message))?;
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must name a directory".into()));
        }
        drover_protocol::validate::device_type(&self.device_type)
            .map_err(|e| invalid("device_type", format!("is required: {e}")))?;
        if let Some(key) = &self.release_key {
            drover_protocol::signing::ReleasePublicKey::parse(key)
                .map_err(|e| invalid("release_key", e.to_string()))?;
        }
        if let Some(key) = &self.provisioning_key
            && key.expose().trim().is_empty()
        {
            return Err(invalid("provisioning_key", "is empty".into()));
        }
        // The hub's limits for reported facts.
        if self.tags.len() > MAX_TAGS || self.attributes.len() > MAX_TAGS {
            return Err(invalid(
                "tags",
                format!("and attributes are limited to {MAX_TAGS} each"),
            ));
        }
        if let Some((name, _)) = self
            .attributes
            .iter()
            .find(|(_, v)| v.len() > MAX_ATTRIBUTE_BYTES)
        {
            return Err(invalid(
                "attributes",
                format!("values are limited to {MAX_ATTRIBUTE_BYTES} bytes ({name:?} is longer)"),
            ));
        }
        for tag in &self.tags {
            drover_protocol::validate::tag(tag).map_err(|e| invalid("tags", e.to_string()))?;
        }
        for name in self.attributes.keys() {
            drover_protocol::validate::tag(name)
                .map_err(|e| invalid("attributes", format!("names: {e}")))?;
        }
        self.validate_durations()?;
        self.spool.validate()?;
        self.telemetry.validate()?;
        self.meters
            .validate()
            .map_err(|e| invalid(e.field, e.message))
    }

    fn validate_durations(&self) -> Result<(), ConfigError> {
        let at_least = |field: &'static str, value: Duration, min: Duration| {
            if value < min {
                Err(ConfigError::Invalid {
                    field,
                    message: format!(
                        "must be at least {} (got {})",
                        format_duration(min),
                        format_duration(value)
                    ),
                })
            } else {
                Ok(())
            }
        };
        let poll = &self.poll;
        at_least("poll.min_interval", poll.min_interval, HARD_MIN_INTERVAL)?;
        at_least("poll.max_interval", poll.max_interval, poll.min_interval)?;
        at_least(
            "poll.default_interval",
            poll.default_interval,
            HARD_MIN_INTERVAL,
        )?;
        at_least(
            "poll.error_backoff_max",
            poll.error_backoff_max,
            Duration::from_secs(1),
        )?;
        at_least("retry.base", self.retry.base, Duration::from_millis(1))?;
        at_least("retry.max_backoff", self.retry.max_backoff, self.retry.base)?;
        if self.retry.max_failures == 0 {
            return Err(ConfigError::Invalid {
                field: "retry.max_failures",
                message: "must be at least 1".into(),
            });
        }
        at_least(
            "app.health_interval",
            self.app.health_interval,
            Duration::from_millis(10),
        )?;
        at_least(
            "app.command_timeout",
            self.app.command_timeout,
            Duration::from_millis(100),
        )?;
        Ok(())
    }

    /// The hub URL without a trailing slash, after checking it is an http(s) URL without a
    /// query or fragment.
    pub(crate) fn hub_base(&self) -> Result<String, String> {
        let url = reqwest::Url::parse(&self.hub_url).map_err(|e| {
            format!(
                "must be an http:// or https:// URL ({e}): {:?}",
                self.hub_url
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "must start with http:// or https://: {:?}",
                self.hub_url
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "must not carry a query or fragment: {:?}",
                self.hub_url
            ));
        }
        Ok(self.hub_url.trim_end_matches('/').to_string())
    }

    /// `apps_root` for scripts: `[script] apps_root` or `<state_dir>/apps`.
    pub fn apps_root(&self) -> PathBuf {
        self.script
            .apps_root
            .clone()
            .unwrap_or_else(|| self.state_dir.join("apps"))
    }

    /// The app module's root: `[app] root` or `<state_dir>/app`.
    pub fn app_root(&self) -> PathBuf {
        self.app
            .root
            .clone()
            .unwrap_or_else(|| self.state_dir.join("app"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
hub_url = "http://127.0.0.1:8080"
device_type = "rpi4"
state_dir = "/tmp/x"
"#;

    #[test]
    fn the_shipped_example_parses_and_validates() {
        let text = include_str!("../agent.example.toml");
        let config = AgentConfig::parse(text).unwrap();
        assert!(config.provisioning_key.is_some());
        assert_eq!(config.poll.min_interval, Duration::from_secs(5));
        assert!(config.app.health.is_some());
        // Every key the example leaves out must be a default, so the example stays complete.
        let mut again = toml::to_string(&config).unwrap();
        again.push('\n');
        assert_eq!(AgentConfig::parse(&again).unwrap(), config);
    }

    #[test]
    fn defaults_fill_what_is_missing() {
        let config = AgentConfig::parse(MINIMAL).unwrap();
        assert_eq!(config.poll, PollConfig::default());
        assert_eq!(config.retry.max_failures, 3);
        assert_eq!(config.apps_root(), PathBuf::from("/tmp/x/apps"));
        assert_eq!(config.app_root(), PathBuf::from("/tmp/x/app"));
        assert_eq!(config.spool, SpoolConfig::default());
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let cases = [
            ("[poll]\nmin_interval = \"0s\"", "poll.min_interval"),
            ("[poll]\nmin_interval = \"50ms\"", "poll.min_interval"),
            ("[poll]\nmax_interval = \"1s\"", "poll.max_interval"),
            ("[retry]\nmax_failures = 0", "retry.max_failures"),
            ("release_key = \"rsa:abc\"", "release_key"),
            ("tags = [\"has space\"]", "tags"),
            ("[spool]\nsegment_bytes = 100", "spool.segment_bytes"),
            ("[spool]\nmax_bytes = 1048577", "spool.max_bytes"),
            ("[spool]\nsync_interval = \"2m\"", "spool.sync_interval"),
            (
                "[telemetry]\nbatch_interval = \"10ms\"",
                "telemetry.batch_interval",
            ),
            (
                "[telemetry]\nmax_batch_interval = \"2d\"",
                "telemetry.max_batch_interval",
            ),
            (
                "[telemetry]\nbatch_interval = \"1h\"\nmax_batch_interval = \"1m\"",
                "telemetry.max_batch_interval",
            ),
            (
                "[telemetry]\nmax_batch_readings = 0",
                "telemetry.max_batch_readings",
            ),
            (
                "[telemetry]\nmax_batch_readings = 70000",
                "telemetry.max_batch_readings",
            ),
            (
                "[telemetry]\nmonthly_budget_bytes = 0",
                "telemetry.monthly_budget_bytes",
            ),
        ];
        for (extra, field) in cases {
            let err = AgentConfig::parse(&format!("{MINIMAL}{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{extra}: {err}");
        }
        let err = AgentConfig::parse(&MINIMAL.replace("http://", "ftp://"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hub_url"), "{err}");
        let err = AgentConfig::parse(&MINIMAL.replace("rpi4", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("device_type"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        let err = AgentConfig::parse(&format!("{MINIMAL}hub_ulr = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hub_ulr"), "{err}");
        let err = AgentConfig::parse(&format!("{MINIMAL}[poll]\nmin_intervall = \"5s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_intervall"), "{err}");
        let err = AgentConfig::parse(&format!("{MINIMAL}[poll]\nmin_interval = \"5 seconds\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("such as"), "{err}");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let config = AgentConfig {
            provisioning_key: Some(Secret::new("drv_p_supersecret")),
            ..AgentConfig::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("supersecret"), "{debug}");
        assert!(debug.contains("***"));
    }

    #[test]
    fn script_timeout_is_clamped() {
        let mut script = ScriptConfig {
            timeout: Duration::ZERO,
            ..ScriptConfig::default()
        };
        assert_eq!(script.effective_timeout(), Duration::from_secs(1));
        script.timeout = Duration::from_secs(7 * 86_400);
        assert_eq!(script.effective_timeout(), Duration::from_secs(86_400));
    }

    #[test]
    fn load_names_the_file_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("agent.toml"), "{err}");
        std::fs::write(&path, "hub_url = [").unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("agent.toml"), "{err}");
    }
}
