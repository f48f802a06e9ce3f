//! The device API (`/device/v1`): enrolment, check-ins, update reports, artifact downloads.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_protocol::device::{
    CheckinRequest, DeviceStatus, EnrollRequest, EnrollResponse, Facts, MAX_REPORTS_PER_BATCH,
    ReportAck, ReportBatch,
};
use drover_protocol::ids::{TokenKind, generate_token, token_hash};
use drover_protocol::signing::{ReleasePublicKey, enrolment_message};
use drover_protocol::{MAX_MESSAGE_BYTES, MAX_OUTPUT_BYTES, PROTOCOL_VERSION, validate};

use crate::cache::CachedDevice;
use crate::error::{ApiError, ApiJson};
use crate::state::{DeviceAuth, HubState};
use crate::store::{NewDevice, Presence, Reported, now_ms};

fn check_protocol(version: u32) -> Result<(), ApiError> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "unsupported_protocol",
            format!("this hub speaks device protocol {PROTOCOL_VERSION}, not {version}"),
        ))
    }
}

/// `POST /device/v1/enroll`.
pub async fn enroll(
    State(hub): State<HubState>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<Response, ApiError> {
    check_protocol(req.protocol)?;
    validate::device_type(&req.device_type)
        .map_err(|e| ApiError::bad_request("invalid_device_type", e.to_string()))?;
    let public_key = ReleasePublicKey::parse(&req.public_key)
        .map_err(|e| ApiError::bad_request("invalid_public_key", e.to_string()))?;
    public_key
        .verify_raw(
            &enrolment_message(&req.public_key, &req.device_type),
            &req.proof,
        )
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_proof",
                "the proof is not a signature of the enrolment message by this public key",
            )
        })?;
    check_facts(&req.facts)?;
    let fleet = hub
        .store
        .fleet_by_provisioning_key(&req.provisioning_key)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized(
                "invalid_provisioning_key",
                "this provisioning key belongs to no fleet (it may have been rotated)",
            )
        })?;
    let credential = generate_token(TokenKind::Device);
    let device = match hub.store.device_by_public_key(&req.public_key).await? {
        // The same device again: its first answer was lost, or its credential was. Same ID,
        // new credential, the old one stops working.
        Some(existing) => {
            if existing.org_id != fleet.org_id || existing.fleet_id != fleet.id {
                return Err(ApiError::conflict(
                    "this device key is already enrolled in another fleet",
                ));
            }
            if existing.status == DeviceStatus::Revoked {
                return Err(ApiError::forbidden(
                    "device_revoked",
                    format!("device {} was revoked and cannot enrol again", existing.id),
                ));
            }
            hub.store
                .replace_credential(&existing.id, &token_hash(&credential))
                .await?;
            hub.devices.invalidate_device(&existing.id);
            existing
        }
        None => {
            let status = if fleet.auto_accept {
                DeviceStatus::Accepted
            } else {
                DeviceStatus::Pending
            };
            let new = NewDevice {
                fleet_id: fleet.id,
                device_type: req.device_type.clone(),
                status,
                public_key: req.public_key.clone(),
                credential_hash: token_hash(&credential),
                agent_version: req.agent_version.clone(),
                facts: req.facts.clone(),
            };
            let device = hub.store.create_device(fleet.org_id, &new).await?;
            hub.store
                .record_device_type(fleet.org_id, &req.device_type, &req.facts.arch)
                .await?;
            device
        }
    };
    tracing::info!(device = %device.id, fleet = %fleet.name, status = device.status.as_str(), "device enrolled");
    Ok(axum::Json(EnrollResponse {
        device_id: device.id,
        credential,
        status: device.status,
        fleet: fleet.name,
        release_key: fleet.release_key,
    })
    .into_response())
}

fn check_facts(facts: &Facts) -> Result<(), ApiError> {
    if facts.tags.len() > 64 || facts.attributes.len() > 64 {
        return Err(ApiError::bad_request(
            "invalid_facts",
            "a device may report at most 64 tags and 64 attributes",
        ));
    }
    for tag in facts.tags.iter().chain(facts.attributes.keys()) {
        validate::tag(tag).map_err(|e| ApiError::bad_request("invalid_facts", e.to_string()))?;
    }
    let too_long = [&facts.os, &facts.arch, &facts.hostname]
        .into_iter()
        .chain(facts.attributes.values())
        .chain(facts.ip.iter())
        .any(|v| v.len() > 256);
    if too_long {
        return Err(ApiError::bad_request(
            "invalid_facts",
            "fact values are limited to 256 bytes",
        ));
    }
    Ok(())
}

/// A hash of facts minus uptime, to notice when they changed.
fn facts_hash(facts: &Facts) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        &facts.os,
        &facts.arch,
        &facts.ip,
        &facts.hostname,
        &facts.tags,
        &facts.attributes,
    )
        .hash(&mut hasher);
    hasher.finish()
}

/// `POST /device/v1/checkin`.
pub async fn checkin(
    State(hub): State<HubState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    DeviceAuth(device): DeviceAuth,
    ApiJson(req): ApiJson<CheckinRequest>,
) -> Result<Response, ApiError> {
    check_protocol(req.protocol)?;
    let now = now_ms();
    record_reported(&hub, &device, &req).await?;
    let mut uptime_s = None;
    if let Some(facts) = &req.facts {
        check_facts(facts)?;
        uptime_s = Some(facts.uptime_s);
        let hash = facts_hash(facts);
        let changed = *device.facts_hash.lock().unwrap_or_else(|p| p.into_inner()) != Some(hash);
        if changed {
            hub.store.record_facts(&device.id, facts).await?;
            *device.facts_hash.lock().unwrap_or_else(|p| p.into_inner()) = Some(hash);
        }
    }
    if let Some(telemetry) = &req.telemetry {
        let changed = device
            .telemetry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            != Some(telemetry);
        if changed {
            hub.store.record_telemetry(&device.id, telemetry).await?;
            *device.telemetry.lock().unwrap_or_else(|p| p.into_inner()) = Some(telemetry.clone());
        }
    }
    hub.presence.record(
        &device.id,
        Presence {
            at: now,
            remote_ip: Some(peer.ip().to_string()),
            uptime_s,
        },
    );
    if req.desired_etag.as_deref() == Some(device.desired.etag.as_str()) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        device.desired_json.clone(),
    )
        .into_response())
}

/// Writes what a check-in reported, only when it differs from what is stored.
async fn record_reported(
    hub: &HubState,
    device: &Arc<CachedDevice>,
    req: &CheckinRequest,
) -> Result<(), ApiError> {
    let reported = Reported {
        current_release: req.current_release.clone(),
        agent_version: req.agent_version.clone(),
        update: req.update.clone(),
    };
    let unchanged = *device.reported.lock().unwrap_or_else(|p| p.into_inner()) == reported;
    if unchanged {
        return Ok(());
    }
    if reported.agent_version.len() > 64
        || reported
            .current_release
            .as_ref()
            .is_some_and(|r| r.len() > 64)
        || reported
            .update
            .message
            .as_ref()
            .is_some_and(|m| m.len() > MAX_MESSAGE_BYTES)
    {
        return Err(ApiError::bad_request(
            "invalid_checkin",
            format!("versions are limited to 64 bytes and update messages to {MAX_MESSAGE_BYTES}"),
        ));
    }
    hub.store.record_reported(&device.id, &reported).await?;
    *device.reported.lock().unwrap_or_else(|p| p.into_inner()) = reported;
    Ok(())
}

/// `POST /device/v1/reports`.
pub async fn reports(
    State(hub): State<HubState>,
    DeviceAuth(device): DeviceAuth,
    ApiJson(batch): ApiJson<ReportBatch>,
) -> Result<axum::Json<ReportAck>, ApiError> {
    check_protocol(batch.protocol)?;
    if batch.reports.len() > MAX_REPORTS_PER_BATCH {
        return Err(ApiError::bad_request(
            "too_many_reports",
            format!("send at most {MAX_REPORTS_PER_BATCH} reports per batch"),
        ));
    }
    for report in &batch.reports {
        validate::release_version(&report.release)
            .map_err(|e| ApiError::bad_request("invalid_report", e.to_string()))?;
        if report
            .output
            .as_ref()
            .is_some_and(|o| o.len() > MAX_OUTPUT_BYTES)
            || report
                .message
                .as_ref()
                .is_some_and(|m| m.len() > MAX_MESSAGE_BYTES)
        {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "report_too_large",
                format!(
                    "report output is limited to {MAX_OUTPUT_BYTES} bytes and messages to 4096"
                ),
            ));
        }
    }
    let acked_through = hub
        .store
        .apply_reports(device.org_id, &device.id, &batch.reports)
        .await?;
    Ok(axum::Json(ReportAck { acked_through }))
}

/// `GET /device/v1/artifacts/{sha256}`: only artifacts of the device's own fleet.
pub async fn artifact(
    State(hub): State<HubState>,
    DeviceAuth(device): DeviceAuth,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let allowed = crate::artifacts::is_sha256_hex(&sha256)
        && hub
            .store
            .fleet_has_artifact(device.org_id, device.fleet_id, &sha256)
            .await?;
    if !allowed {
        return Err(ApiError::not_found(format!(
            "artifact {sha256} for this device"
        )));
    }
    super::download::serve_artifact(hub.artifacts.as_ref(), &sha256, &headers).await
}
