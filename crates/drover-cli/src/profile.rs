//! Where the CLI finds its hub: `drover login` saves the URL, token and CA file to
//! `~/.config/drover/cli.toml` (mode 0600); `--hub`, `--token` and `--ca` (or `DROVER_HUB_URL`,
//! `DROVER_TOKEN`, `DROVER_CA_FILE`) override it for one command.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::client::HubClient;

/// What `drover login` saves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The hub's URL.
    pub hub_url: Option<String>,
    /// The operator token.
    pub token: Option<String>,
    /// The CA file to trust for the hub.
    pub ca_file: Option<PathBuf>,
}

/// The default profile path.
pub fn default_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("drover").join("cli.toml")
}

impl Profile {
    /// Reads a profile; a missing file is an empty profile.
    pub fn load(path: &Path) -> anyhow::Result<Profile> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Profile::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the profile with mode 0600 (it holds a token).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self)?;
        drover_hub::files::write_file(path, text.as_bytes(), true)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The hub connection settings a command runs with, after overrides.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The hub's URL.
    pub hub_url: String,
    /// The token.
    pub token: String,
    /// The CA file.
    pub ca_file: Option<PathBuf>,
}

impl Connection {
    /// Merges the saved profile with command-line/environment overrides.
    pub fn resolve(
        profile_path: &Path,
        hub: Option<String>,
        token: Option<String>,
        ca: Option<PathBuf>,
    ) -> anyhow::Result<Connection> {
        let profile = Profile::load(profile_path)?;
        let Some(hub_url) = hub.or(profile.hub_url) else {
            bail!(
                "no hub configured: run 'drover login --hub URL --token TOKEN', or pass --hub / set DROVER_HUB_URL"
            );
        };
        let Some(token) = token.or(profile.token) else {
            bail!(
                "no API token configured: run 'drover login --hub URL --token TOKEN', or pass --token / set DROVER_TOKEN"
            );
        };
        Ok(Connection {
            hub_url,
            token,
            ca_file: ca.or(profile.ca_file),
        })
    }

    /// A client for this connection.
    pub fn client(&self) -> anyhow::Result<HubClient> {
        HubClient::new(&self.hub_url, &self.token, self.ca_file.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_round_trip_privately_and_overrides_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover/cli.toml");
        let profile = Profile {
            hub_url: Some("https://hub:8443".into()),
            token: Some("drv_o_x".into()),
            ca_file: Some("/ca.pem".into()),
        };
        profile.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Profile::load(&path).unwrap(), profile);
        let conn = Connection::resolve(&path, Some("http://other".into()), None, None).unwrap();
        assert_eq!(conn.hub_url, "http://other");
        assert_eq!(conn.token, "drv_o_x");
        let missing = dir.path().join("none.toml");
        let err = Connection::resolve(&missing, None, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("drover login"), "{err}");
    }
}
