//! The state every request handler shares, and the authentication of operators and devices.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use drover_protocol::device::DeviceStatus;
use drover_protocol::ids::{TokenKind, token_hash};

use crate::artifacts::ArtifactStore;
use crate::cache::{CachedDevice, DeviceCache, PresenceBuffer};
use crate::config::HubConfig;
use crate::error::ApiError;
use crate::store::{ApiToken, Device, Reported, Store};

/// What handlers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HubState(pub Arc<Shared>);

/// The shared parts.
#[derive(Debug)]
pub struct Shared {
    /// The database.
    pub store: Store,
    /// Artifact files.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// The check-in fast path.
    pub devices: DeviceCache,
    /// Last-seen times waiting to be written.
    pub presence: PresenceBuffer,
    /// Operator tokens by hash.
    pub operators: RwLock<HashMap<String, ApiToken>>,
    /// Where checked telemetry batches go to become durable.
    pub ingest: Arc<dyn crate::telemetry::queue::IngestQueue>,
    /// Every stored point, for live charts.
    pub live: tokio::sync::broadcast::Sender<crate::telemetry::fold::LivePoint>,
    /// Folds landed batches into chunks and rollups; readers settle it before they read.
    pub folder: crate::telemetry::folder::Folder,
    /// The configuration.
    pub config: HubConfig,
    /// Cancelled when the hub shuts down: long-lived requests (the telemetry stream) end then.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl std::ops::Deref for HubState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The bearer token of a request, if it has the expected kind's prefix.
fn bearer(parts: &Parts, kind: TokenKind) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(header) = header else {
        return Err(ApiError::unauthorized(
            "missing_token",
            match kind {
                TokenKind::Operator => {
                    "send 'Authorization: Bearer <token>' with an API token ('drover login' stores one for the CLI)"
                }
                _ => "send 'Authorization: Bearer <device credential>'",
            },
        ));
    };
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .unwrap_or("");
    if !token.starts_with(kind.prefix()) {
        return Err(ApiError::unauthorized(
            "invalid_token",
            format!(
                "the Authorization header must be 'Bearer {}...'",
                kind.prefix()
            ),
        ));
    }
    Ok(token)
}

/// An authenticated operator, acting for one organization.
#[derive(Debug, Clone)]
pub struct Operator {
    /// The organization every query is scoped to.
    pub org_id: i64,
    /// The token.
    pub token: ApiToken,
}

impl FromRequestParts<HubState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &HubState) -> Result<Self, ApiError> {
        let hash = token_hash(bearer(parts, TokenKind::Operator)?);
        let cached = hub
            .operators
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .cloned();
        let token = match cached {
            Some(token) => token,
            None => {
                let token = hub.store.api_token_by_hash(&hash).await?.ok_or_else(|| {
                    ApiError::unauthorized("invalid_token", "this API token is unknown or revoked")
                })?;
                hub.operators
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(hash, token.clone());
                token
            }
        };
        Ok(Operator {
            org_id: token.org_id,
            token,
        })
    }
}

/// An authenticated, accepted device, from the check-in cache (built on a miss).
#[derive(Debug, Clone)]
pub struct DeviceAuth(pub Arc<CachedDevice>);

impl FromRequestParts<HubState> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &HubState) -> Result<Self, ApiError> {
        let hash = token_hash(bearer(parts, TokenKind::Device)?);
        hub.device_by_hash(&hash).await.map(DeviceAuth)
    }
}

/// The hash of a request's device credential, for handlers that authenticate the device
/// again later (the telemetry stream does, on every batch, so that a device revoked while its
/// stream is open is stopped at its next batch).
#[derive(Debug, Clone)]
pub struct CredentialHash(pub String);

impl FromRequestParts<HubState> for CredentialHash {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _hub: &HubState) -> Result<Self, ApiError> {
        Ok(CredentialHash(token_hash(bearer(
            parts,
            TokenKind::Device,
        )?)))
    }
}

impl HubState {
    /// The device holding a credential, from the cache or the store (as [`DeviceAuth`]).
    pub async fn device_by_hash(&self, hash: &str) -> Result<Arc<CachedDevice>, ApiError> {
        if let Some(entry) = self.devices.get(hash) {
            return Ok(entry);
        }
        self.load_device(hash.to_owned()).await
    }

    /// Builds (and caches) the check-in entry of the device holding a credential.
    pub async fn load_device(
        &self,
        credential_hash: String,
    ) -> Result<Arc<CachedDevice>, ApiError> {
        let ticket = self.devices.ticket();
        let device = self
            .store
            .device_by_credential(&credential_hash)
            .await?
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "invalid_credential",
                    "this device credential is unknown; the device must enrol again",
                )
            })?;
        check_standing(&device)?;
        let fleet = self
            .store
            .fleet_by_id(device.org_id, device.fleet_id)
            .await?
            .ok_or_else(|| ApiError::internal("device without a fleet"))?;
        let release = crate::desired::target_release(&self.store, &device, &fleet).await?;
        let desired = crate::desired::desired_state(&fleet, &device, release.as_ref());
        let desired_json = serde_json::to_vec(&desired).map_err(ApiError::internal)?;
        let entry = self
            .devices
            .insert_with(credential_hash, ticket, fleet.id, |generation| {
                CachedDevice {
                    id: device.id.clone(),
                    org_id: device.org_id,
                    fleet_id: device.fleet_id,
                    fleet_generation: generation,
                    desired,
                    desired_json: desired_json.into(),
                    reported: std::sync::Mutex::new(Reported {
                        current_release: device.current_release.clone(),
                        agent_version: device.agent_version.clone(),
                        update: device.update.clone(),
                    }),
                    facts_hash: std::sync::Mutex::new(None),
                    telemetry: std::sync::Mutex::new(device.telemetry.clone()),
                }
            });
        Ok(entry)
    }
}

/// Refuses devices that are not accepted.
pub fn check_standing(device: &Device) -> Result<(), ApiError> {
    match device.status {
        DeviceStatus::Accepted => Ok(()),
        DeviceStatus::Pending => Err(ApiError::forbidden(
            "device_pending",
            format!(
                "device {} is waiting for an operator to accept it ('drover device accept {}')",
                device.id, device.id
            ),
        )),
        DeviceStatus::Revoked => Err(ApiError::forbidden(
            "device_revoked",
            format!("device {} was revoked", device.id),
        )),
    }
}
