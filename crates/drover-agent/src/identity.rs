//! The device's identity and its enrolment with the hub.
//!
//! The agent makes its own ed25519 key pair once (`identity.key`, 0600) and never sends the
//! secret half anywhere. Enrolment sends the public key with the fleet's provisioning key and a
//! signature proving possession; the hub answers with the device ID and a bearer credential.
//! Enrolment is crash-safe because it is repeatable: the same public key gets the same device ID
//! and a fresh credential, so an agent that died before saving the answer simply enrols again.
//!
//! The fleet's release key is trusted on first use unless the config pins one: the first key the
//! hub hands out is kept in `device.json`, and a different key offered later is ignored.

use drover_protocol::device::{DeviceStatus, EnrollRequest, Facts};
use drover_protocol::signing::{ReleasePublicKey, ReleaseSigningKey, enrolment_message};

use crate::client::{HubClient, HubError};
use crate::config::AgentConfig;
use crate::fsutil::{self, FileError};
use crate::layout::{DeviceRecord, StateDir};

/// Why the identity could not be loaded or the device could not enrol.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A state file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// `identity.key` exists but cannot be parsed. It is not replaced automatically: a new key
    /// would make this box a new device.
    #[error(
        "{path} is damaged ({reason}); move it away to give this device a new identity (it will enrol as a new device)"
    )]
    BadKey {
        /// The key file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The device is not enrolled and the config has no provisioning key.
    #[error(
        "this device is not enrolled and the agent config has no `provisioning_key` to enrol with"
    )]
    NoProvisioningKey,
    /// The hub refused or could not be reached.
    #[error(transparent)]
    Hub(#[from] HubError),
}

/// A device that has enrolled.
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// What `device.json` holds.
    pub device: DeviceRecord,
    /// The bearer credential.
    pub credential: String,
}

/// Loads `identity.key`, making it on first start.
pub fn load_or_create_key(paths: &StateDir) -> Result<ReleaseSigningKey, IdentityError> {
    let path = paths.identity_key();
    if let Some(text) = fsutil::read_text(&path)? {
        return ReleaseSigningKey::from_text(&text).map_err(|e| IdentityError::BadKey {
            path: path.display().to_string(),
            reason: e.to_string(),
        });
    }
    let key = ReleaseSigningKey::generate();
    fsutil::write_atomic(&path, key.to_text().as_bytes(), fsutil::PRIVATE)?;
    tracing::info!(public_key = %key.public(), "made the device identity key");
    Ok(key)
}

/// The saved enrolment, if both `device.json` and `credential` exist.
pub fn load_enrolment(paths: &StateDir) -> Result<Option<Enrolment>, FileError> {
    let Some(device) = DeviceRecord::load(paths)? else {
        return Ok(None);
    };
    let Some(credential) = fsutil::read_text(&paths.credential())? else {
        return Ok(None);
    };
    let credential = credential.trim().to_string();
    if credential.is_empty() {
        return Ok(None);
    }
    Ok(Some(Enrolment { device, credential }))
}

/// Deletes the credential (the hub no longer accepts it); the device record stays.
pub fn forget_credential(paths: &StateDir) -> Result<(), FileError> {
    fsutil::remove_if_exists(&paths.credential())?;
    fsutil::sync_parent(&paths.credential())
}

/// Enrols (or enrols again) and saves the result: `device.json` first, then the credential, so
/// that a crash in between only means enrolling once more.
pub async fn enroll(
    client: &HubClient,
    config: &AgentConfig,
    paths: &StateDir,
    key: &ReleaseSigningKey,
    facts: Facts,
) -> Result<(Enrolment, DeviceStatus), IdentityError> {
    let provisioning_key = config
        .provisioning_key
        .as_ref()
        .ok_or(IdentityError::NoProvisioningKey)?;
    let public_key = key.public().to_string();
    let proof = key.sign_raw(&enrolment_message(&public_key, &config.device_type));
    let request = EnrollRequest {
        protocol: drover_protocol::PROTOCOL_VERSION,
        provisioning_key: provisioning_key.expose().to_string(),
        public_key,
        proof,
        device_type: config.device_type.clone(),
        agent_version: crate::AGENT_VERSION.to_string(),
        facts,
    };
    let answer = client.enroll(&request).await?;
    let previous = DeviceRecord::load(paths)?;
    let release_key = keep_first_release_key(
        previous.as_ref().and_then(|p| p.release_key.clone()),
        answer.release_key,
    );
    if let Some(previous) = &previous
        && previous.device_id != answer.device_id
    {
        tracing::warn!(old = %previous.device_id, new = %answer.device_id, "the hub gave this device a new ID");
    }
    let device = DeviceRecord {
        device_id: answer.device_id,
        fleet: answer.fleet,
        release_key,
    };
    device.save(paths)?;
    fsutil::write_atomic(
        &paths.credential(),
        format!("{}\n", answer.credential).as_bytes(),
        fsutil::PRIVATE,
    )?;
    tracing::info!(device = %device.device_id, fleet = %device.fleet, status = answer.status.as_str(), "enrolled");
    Ok((
        Enrolment {
            device,
            credential: answer.credential,
        },
        answer.status,
    ))
}

/// Trust on first use: a stored key wins; otherwise a valid offered key is taken.
fn keep_first_release_key(stored: Option<String>, offered: Option<String>) -> Option<String> {
    match (stored, offered) {
        (Some(stored), Some(offered)) if stored != offered => {
            tracing::warn!(%stored, %offered, "the hub offers a different release key; keeping the one first received (pin `release_key` in the config to change it)");
            Some(stored)
        }
        (Some(stored), _) => Some(stored),
        (None, Some(offered)) => match ReleasePublicKey::parse(&offered) {
            Ok(_) => Some(offered),
            Err(e) => {
                tracing::warn!(error = %e, "the hub's release key is not valid; ignoring it");
                None
            }
        },
        (None, None) => None,
    }
}

/// The key release signatures are checked with: the pinned one, or the one kept from enrolment.
pub fn release_key(
    config: &AgentConfig,
    device: Option<&DeviceRecord>,
) -> Option<ReleasePublicKey> {
    let text = config
        .release_key
        .clone()
        .or_else(|| device.and_then(|d| d.release_key.clone()))?;
    ReleasePublicKey::parse(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_identity_key_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StateDir::new(dir.path());
        paths.create().unwrap();
        let first = load_or_create_key(&paths).unwrap();
        let again = load_or_create_key(&paths).unwrap();
        assert_eq!(first.public(), again.public());
        let mode = std::fs::metadata(paths.identity_key())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(paths.identity_key(), "garbage").unwrap();
        let err = load_or_create_key(&paths).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn the_first_release_key_is_kept() {
        let a = ReleaseSigningKey::generate().public().to_string();
        let b = ReleaseSigningKey::generate().public().to_string();
        assert_eq!(
            keep_first_release_key(None, Some(a.clone())),
            Some(a.clone())
        );
        assert_eq!(
            keep_first_release_key(Some(a.clone()), Some(b)),
            Some(a.clone())
        );
        assert_eq!(keep_first_release_key(Some(a.clone()), None), Some(a));
        assert_eq!(keep_first_release_key(None, Some("junk".into())), None);
    }

    #[test]
    fn a_pinned_release_key_wins() {
        let pinned = ReleaseSigningKey::generate().public();
        let tofu = ReleaseSigningKey::generate().public();
        let config = AgentConfig {
            release_key: Some(pinned.to_string()),
            ..AgentConfig::default()
        };
        let record = DeviceRecord {
            device_id: drover_protocol::ids::DeviceId::generate(),
            fleet: "f".into(),
            release_key: Some(tofu.to_string()),
        };
        assert_eq!(release_key(&config, Some(&record)), Some(pinned));
        assert_eq!(
            release_key(&AgentConfig::default(), Some(&record)),
            Some(tofu)
        );
        assert_eq!(release_key(&AgentConfig::default(), None), None);
    }
}
