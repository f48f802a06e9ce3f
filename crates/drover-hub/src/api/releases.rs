//! Management API: artifact uploads and releases.
//!
//! Creating a release is two requests: `PUT /api/v1/artifacts/{sha256}` streams the file (the
//! hub checks it hashes to the name), then `POST /api/v1/fleets/{fleet}/releases` names it,
//! with the signature made on the operator's machine. The hub checks that signature against the
//! fleet's release key before accepting the release, and agents check it again.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use drover_protocol::artifact::ArtifactFormat;
use drover_protocol::device::Module;
use drover_protocol::signing::{ReleaseManifest, ReleasePublicKey};
use drover_protocol::validate;
use futures_util::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};

use super::fleets::fleet_named;
use crate::artifacts::is_sha256_hex;
use crate::error::{ApiError, ApiJson};
use crate::state::{HubState, Operator};
use crate::store::{NewRelease, Release};

/// An uploaded artifact.
#[derive(Debug, Serialize)]
pub struct ArtifactView {
    /// SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// Format, if Drover can install it.
    pub format: Option<ArtifactFormat>,
}

/// `POST /api/v1/fleets/{fleet}/releases` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRelease {
    /// Version, unique in the fleet.
    pub version: String,
    /// `app` or `script`.
    pub module: String,
    /// The device type it is for (omit for any).
    #[serde(default)]
    pub device_type: Option<String>,
    /// The uploaded artifact's SHA-256.
    pub sha256: String,
    /// The ed25519 signature over the release manifest, in base64.
    pub signature: String,
    /// Free text.
    #[serde(default)]
    pub notes: String,
}

/// A release as the API shows it.
#[derive(Debug, Serialize)]
pub struct ReleaseView {
    /// Version.
    pub version: String,
    /// Sequence number in the fleet (the seed protocol's snapshot ID).
    pub seq: i64,
    /// `app` or `script`.
    pub module: Module,
    /// Device type (`null`: any).
    pub device_type: Option<String>,
    /// Artifact SHA-256.
    pub sha256: String,
    /// Artifact size.
    pub size: i64,
    /// Artifact format.
    pub format: ArtifactFormat,
    /// Signature.
    pub signature: Option<String>,
    /// Notes.
    pub notes: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl From<Release> for ReleaseView {
    fn from(r: Release) -> ReleaseView {
        ReleaseView {
            version: r.version,
            seq: r.seq,
            module: r.module,
            device_type: r.device_type,
            sha256: r.sha256,
            size: r.size,
            format: r.format,
            signature: r.signature,
            notes: r.notes,
            created_at: r.created_at,
        }
    }
}

fn check_sha(sha256: &str) -> Result<(), ApiError> {
    if is_sha256_hex(sha256) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_sha256",
            "artifacts are named by their SHA-256 in lower-case hex (64 characters)",
        ))
    }
}

/// `PUT /api/v1/artifacts/{sha256}`: the raw bytes as the body.
pub async fn upload_artifact(
    State(hub): State<HubState>,
    op: Operator,
    Path(sha256): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, axum::Json<ArtifactView>), ApiError> {
    check_sha(&sha256)?;
    let limit = hub.config.max_artifact_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(crate::artifacts::ArtifactError::TooLarge { limit }.into());
    }
    if let Some(info) = hub.artifacts.stat(&sha256).await? {
        // Already stored (by anyone: content-addressed); record that this organization has it.
        let size = i64::try_from(info.size).unwrap_or(i64::MAX);
        hub.store
            .record_artifact(op.org_id, &sha256, size, info.format)
            .await?;
        return Ok((
            StatusCode::OK,
            axum::Json(ArtifactView {
                sha256,
                size,
                format: info.format,
            }),
        ));
    }
    let stream = body
        .into_data_stream()
        .map_err(std::io::Error::other)
        .boxed();
    let info = hub.artifacts.put(stream, &sha256, limit).await?;
    let size = i64::try_from(info.size).unwrap_or(i64::MAX);
    hub.store
        .record_artifact(op.org_id, &sha256, size, info.format)
        .await?;
    tracing::info!(sha256 = %sha256, size, "artifact stored");
    Ok((
        StatusCode::CREATED,
        axum::Json(ArtifactView {
            sha256,
            size,
            format: info.format,
        }),
    ))
}

/// `GET /api/v1/artifacts/{sha256}`: whether the organization has uploaded it.
pub async fn artifact_info(
    State(hub): State<HubState>,
    op: Operator,
    Path(sha256): Path<String>,
) -> Result<axum::Json<ArtifactView>, ApiError> {
    check_sha(&sha256)?;
    let (size, format) = hub
        .store
        .org_artifact(op.org_id, &sha256)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("artifact {sha256}")))?;
    Ok(axum::Json(ArtifactView {
        sha256,
        size,
        format,
    }))
}

/// `POST /api/v1/fleets/{fleet}/releases`.
pub async fn create(
    State(hub): State<HubState>,
    op: Operator,
    Path(fleet_name): Path<String>,
    ApiJson(body): ApiJson<CreateRelease>,
) -> Result<(StatusCode, axum::Json<ReleaseView>), ApiError> {
    let fleet = fleet_named(&hub, &op, &fleet_name).await?;
    validate::release_version(&body.version)
        .map_err(|e| ApiError::bad_request("invalid_version", e.to_string()))?;
    let module = Module::parse(&body.module).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_module",
            format!("module is 'app' or 'script', not {:?}", body.module),
        )
    })?;
    if let Some(t) = &body.device_type {
        validate::device_type(t)
            .map_err(|e| ApiError::bad_request("invalid_device_type", e.to_string()))?;
    }
    check_sha(&body.sha256)?;
    if body.notes.len() > 4096 {
        return Err(ApiError::bad_request(
            "invalid_notes",
            "release notes are limited to 4096 bytes",
        ));
    }
    let (size, format) = hub
        .store
        .org_artifact(op.org_id, &body.sha256)
        .await?
        .ok_or_else(|| {
            ApiError::bad_request(
                "artifact_missing",
                format!(
                    "artifact {} has not been uploaded; PUT it to /api/v1/artifacts/{} first",
                    body.sha256, body.sha256
                ),
            )
        })?;
    let format = check_format(module, format)?;
    let key = fleet.release_key.as_deref().ok_or_else(|| {
        ApiError::bad_request(
            "no_release_key",
            format!(
                "fleet {fleet_name:?} has no release key; set one first ('drover keys generate', then 'drover fleet set {fleet_name} --release-key ...')"
            ),
        )
    })?;
    let key = ReleasePublicKey::parse(key).map_err(ApiError::internal)?;
    let manifest = ReleaseManifest {
        version: &body.version,
        module,
        device_type: body.device_type.as_deref(),
        sha256: &body.sha256,
        size: u64::try_from(size).unwrap_or(0),
    };
    manifest.verify(&key, &body.signature).map_err(|e| {
        ApiError::bad_request(
            "invalid_signature",
            format!("{e} (sign with the key whose public half is the fleet's release key)"),
        )
    })?;
    let new = NewRelease {
        version: body.version,
        device_type: body.device_type,
        module,
        sha256: body.sha256,
        size,
        format,
        signature: Some(body.signature),
        notes: body.notes,
    };
    let release = hub.store.create_release(op.org_id, fleet.id, &new).await?;
    tracing::info!(fleet = %fleet.name, release = %release.version, seq = release.seq, "release created");
    Ok((StatusCode::CREATED, axum::Json(release.into())))
}

/// Checks that the module can install the artifact's format.
fn check_format(
    module: Module,
    format: Option<ArtifactFormat>,
) -> Result<ArtifactFormat, ApiError> {
    let Some(format) = format else {
        return Err(ApiError::bad_request(
            "unknown_format",
            "the artifact is not a tar.gz or zip archive or a script starting with '#!'",
        ));
    };
    if module == Module::App && !format.is_archive() {
        return Err(ApiError::bad_request(
            "wrong_format",
            "the app module installs archives (tar.gz or zip); use the script module for a bare script",
        ));
    }
    Ok(format)
}

/// `GET /api/v1/fleets/{fleet}/releases`.
pub async fn list(
    State(hub): State<HubState>,
    op: Operator,
    Path(fleet_name): Path<String>,
) -> Result<axum::Json<Vec<ReleaseView>>, ApiError> {
    let fleet = fleet_named(&hub, &op, &fleet_name).await?;
    let releases = hub.store.list_releases(op.org_id, fleet.id).await?;
    Ok(axum::Json(releases.into_iter().map(Into::into).collect()))
}

/// `GET /api/v1/fleets/{fleet}/releases/{version}`.
pub async fn show(
    State(hub): State<HubState>,
    op: Operator,
    Path((fleet_name, version)): Path<(String, String)>,
) -> Result<axum::Json<ReleaseView>, ApiError> {
    let fleet = fleet_named(&hub, &op, &fleet_name).await?;
    let release = hub
        .store
        .release_by_version(op.org_id, fleet.id, &version)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("release {version:?} in fleet {fleet_name:?}"))
        })?;
    Ok(axum::Json(release.into()))
}
