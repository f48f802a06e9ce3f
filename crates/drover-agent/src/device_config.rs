//! The device's config (the JSON the hub sends with the desired state: the fleet's config with
//! the device's own merged over it) as the software on the device sees it.
//!
//! - `<state_dir>/config.json` always holds the effective config. It is written atomically
//!   whenever the desired config changes, and at start when it is missing, so an app can read it
//!   at any time; scripts and app commands get its path as `DROVER_CONFIG_FILE` (besides the
//!   seed's `config` variable, which holds the same JSON as text).
//! - A config change that comes without a new release would otherwise reach the app only at its
//!   next update. When `[app] reload` is set, the agent runs it after such a change, in the
//!   current release's directory with the environment every app command gets. It is not an
//!   update step: nothing is reported to the hub, failures are logged.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::app::{Hook, Hooks};
use crate::fsutil::{self, FileError};

/// The config as the text scripts and commands get (`{}` when the hub sent none).
pub fn config_text(config: &Value) -> String {
    if config.is_null() {
        "{}".to_string()
    } else {
        config.to_string()
    }
}

/// Whether two configs differ (no config and `{}` are the same).
pub fn differs(old: &Value, new: &Value) -> bool {
    config_text(old) != config_text(new)
}

/// Writes `config` to `path` atomically unless the file already holds exactly that. Returns
/// whether it wrote.
pub fn write(path: &Path, config: &Value) -> Result<bool, FileError> {
    let value: Value = if config.is_null() {
        Value::Object(serde_json::Map::new())
    } else {
        config.clone()
    };
    let mut text = serde_json::to_string_pretty(&value)
        .unwrap_or_else(|_| config_text(config))
        .into_bytes();
    text.push(b'\n');
    if std::fs::read(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    fsutil::write_atomic(path, &text, fsutil::PUBLIC)?;
    Ok(true)
}

/// Writes `config` to `path` only if the file does not exist (at start, so that an app finds a
/// config file even before the first check-in).
pub fn write_if_missing(path: &Path, config: &Value) -> Result<(), FileError> {
    if !path.exists() {
        write(path, config)?;
    }
    Ok(())
}

/// Runs `[app] reload` for the current app release after a config-only change, and logs how
/// it went. `release` is the committed app release; `dir` its directory.
pub async fn reload(hooks: Hooks, release: String, dir: PathBuf, cancel: CancellationToken) {
    tracing::info!(%release, "the config changed; running the reload command");
    match hooks.run(Hook::Reload, Some(&release), &dir, &cancel).await {
        Ok(result) if result.ok || result.cancelled => {
            tracing::debug!(%release, message = %result.message, "reload finished");
        }
        Ok(result) => {
            tracing::warn!(%release, why = %result.message, output = %result.output, "the reload command failed");
        }
        Err(e) => tracing::warn!(%release, error = %e, "cannot run the reload command"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_is_written_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        write_if_missing(&path, &Value::Null).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
        assert!(!write(&path, &serde_json::json!({})).unwrap());
        let config = serde_json::json!({"meter": {"name": "a"}});
        assert!(write(&path, &config).unwrap());
        assert!(!write(&path, &config).unwrap());
        let read: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(read, config);
        write_if_missing(&path, &Value::Null).unwrap();
        let again: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(again, config, "an existing file is left alone");
        assert!(!differs(&Value::Null, &serde_json::json!({})));
        assert!(differs(&Value::Null, &config));
    }
}
