//! Management API: fleets, their settings, deploys and status.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use drover_protocol::device::DeviceStatus;
use drover_protocol::ids::DeviceId;
use drover_protocol::signing::ReleasePublicKey;
use drover_protocol::validate;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiJson};
use crate::state::{HubState, Operator};
use crate::store::{Fleet, FleetPatch, NewFleet, Release, now_ms};

/// A fleet as the API shows it.
#[derive(Debug, Serialize)]
pub struct FleetView {
    /// Name.
    pub name: String,
    /// Accept new devices at once.
    pub auto_accept: bool,
    /// Release public key.
    pub release_key: Option<String>,
    /// Seconds between check-ins.
    pub poll_interval_s: i64,
    /// The fleet's config.
    pub config: serde_json::Value,
    /// The seed protocol's base path (`/seed/<secret>`), while it is on.
    pub seed_base_path: Option<String>,
    /// Sequence number of the next release.
    pub next_release_seq: i64,
    /// What each device type should run.
    pub targets: Vec<TargetView>,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// One fleet target.
#[derive(Debug, Serialize)]
pub struct TargetView {
    /// Device type, or `*` for any.
    pub device_type: String,
    /// Release version.
    pub release: String,
}

/// `POST /api/v1/fleets` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateFleet {
    /// Name.
    pub name: String,
    /// Accept new devices at once (default false: an operator accepts each).
    #[serde(default)]
    pub auto_accept: bool,
    /// Release public key (`ed25519:...`).
    #[serde(default)]
    pub release_key: Option<String>,
    /// Seconds between check-ins (default: the hub's default).
    #[serde(default)]
    pub poll_interval_s: Option<i64>,
}

/// The answer to creating a fleet: the only time its provisioning key is shown.
#[derive(Debug, Serialize)]
pub struct CreatedFleet {
    /// The fleet.
    pub fleet: FleetView,
    /// The provisioning key agents enrol with.
    pub provisioning_key: String,
}

/// `PATCH /api/v1/fleets/{fleet}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateFleet {
    /// Accept new devices at once.
    #[serde(default)]
    pub auto_accept: Option<bool>,
    /// Release public key.
    #[serde(default)]
    pub release_key: Option<String>,
    /// Seconds between check-ins.
    #[serde(default)]
    pub poll_interval_s: Option<i64>,
    /// The fleet's config (a JSON object; replaces the old one).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Turn the seed updater protocol on or off.
    #[serde(default)]
    pub seed_protocol: Option<bool>,
    /// Continue release numbering from here (for fleets moving from the seed hub).
    #[serde(default)]
    pub next_release_seq: Option<i64>,
}

/// `POST /api/v1/fleets/{fleet}/deploy` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// The release version.
    pub release: String,
    /// Deploy to this device only (pins the release to it); otherwise to the whole fleet.
    #[serde(default)]
    pub device: Option<String>,
}

/// The answer to a deploy.
#[derive(Debug, Serialize)]
pub struct Deployed {
    /// The release.
    pub release: String,
    /// The device type targeted (`*`: any), for a fleet deploy.
    pub device_type: Option<String>,
    /// The device, for a single-device deploy.
    pub device: Option<String>,
}

/// A fleet's status: how far it has converged on its targets.
#[derive(Debug, Serialize)]
pub struct FleetStatus {
    /// The fleet.
    pub fleet: String,
    /// All devices.
    pub devices: i64,
    /// Accepted devices.
    pub accepted: i64,
    /// Devices waiting for acceptance.
    pub pending: i64,
    /// Revoked devices.
    pub revoked: i64,
    /// Accepted devices seen recently (within two poll intervals and ten seconds).
    pub online: i64,
    /// Accepted devices running their target (or with no target).
    pub up_to_date: i64,
    /// Accepted devices downloading or installing.
    pub updating: i64,
    /// Accepted devices backing off after a failure.
    pub backing_off: i64,
    /// Accepted devices holding a release that failed too often.
    pub held: i64,
    /// Whether every accepted device runs its target.
    pub converged: bool,
    /// The fleet's targets.
    pub targets: Vec<TargetView>,
    /// Accepted devices per release they run.
    pub releases: Vec<ReleaseCount>,
}

/// Devices running one release.
#[derive(Debug, Serialize)]
pub struct ReleaseCount {
    /// The release (`null`: none yet).
    pub release: Option<String>,
    /// How many accepted devices run it.
    pub devices: i64,
}

pub(crate) async fn fleet_named(
    hub: &HubState,
    op: &Operator,
    name: &str,
) -> Result<Fleet, ApiError> {
    hub.store
        .fleet_by_name(op.org_id, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("fleet {name:?}")))
}

async fn view(hub: &HubState, fleet: Fleet) -> Result<FleetView, ApiError> {
    let targets = hub
        .store
        .fleet_targets(fleet.org_id, fleet.id)
        .await?
        .into_iter()
        .map(|(device_type, release)| TargetView {
            device_type,
            release: release.version,
        })
        .collect();
    Ok(FleetView {
        name: fleet.name,
        auto_accept: fleet.auto_accept,
        release_key: fleet.release_key,
        poll_interval_s: fleet.poll_interval_s,
        config: fleet.config,
        seed_base_path: fleet.seed_secret.map(|s| format!("/seed/{s}")),
        next_release_seq: fleet.next_release_seq,
        targets,
        created_at: fleet.created_at,
    })
}

fn check_release_key(key: &str) -> Result<(), ApiError> {
    ReleasePublicKey::parse(key)
        .map(|_| ())
        .map_err(|e| ApiError::bad_request("invalid_release_key", e.to_string()))
}

fn check_poll_interval(seconds: i64) -> Result<(), ApiError> {
    if (1..=86_400).contains(&seconds) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_poll_interval",
            format!("poll_interval_s must be 1 to 86400 seconds, got {seconds}"),
        ))
    }
}

/// `GET /api/v1/fleets`.
pub async fn list(
    State(hub): State<HubState>,
    op: Operator,
) -> Result<axum::Json<Vec<FleetView>>, ApiError> {
    let mut views = Vec::new();
    for fleet in hub.store.list_fleets(op.org_id).await? {
        views.push(view(&hub, fleet).await?);
    }
    Ok(axum::Json(views))
}

/// `POST /api/v1/fleets`.
pub async fn create(
    State(hub): State<HubState>,
    op: Operator,
    ApiJson(body): ApiJson<CreateFleet>,
) -> Result<(StatusCode, axum::Json<CreatedFleet>), ApiError> {
    validate::fleet_name(&body.name)
        .map_err(|e| ApiError::bad_request("invalid_name", e.to_string()))?;
    if let Some(key) = &body.release_key {
        check_release_key(key)?;
    }
    let poll_interval_s = body
        .poll_interval_s
        .unwrap_or(hub.config.default_poll_interval_s);
    check_poll_interval(poll_interval_s)?;
    let new = NewFleet {
        name: body.name,
        auto_accept: body.auto_accept,
        release_key: body.release_key,
        poll_interval_s,
    };
    let (fleet, provisioning_key) = hub.store.create_fleet(op.org_id, &new).await?;
    tracing::info!(fleet = %fleet.name, "fleet created");
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedFleet {
            fleet: view(&hub, fleet).await?,
            provisioning_key,
        }),
    ))
}

/// `GET /api/v1/fleets/{fleet}`.
pub async fn show(
    State(hub): State<HubState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<axum::Json<FleetView>, ApiError> {
    let fleet = fleet_named(&hub, &op, &name).await?;
    Ok(axum::Json(view(&hub, fleet).await?))
}

/// `PATCH /api/v1/fleets/{fleet}`.
pub async fn update(
    State(hub): State<HubState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<UpdateFleet>,
) -> Result<axum::Json<FleetView>, ApiError> {
    let fleet = fleet_named(&hub, &op, &name).await?;
    if let Some(key) = &body.release_key {
        check_release_key(key)?;
    }
    if let Some(seconds) = body.poll_interval_s {
        check_poll_interval(seconds)?;
    }
    if let Some(config) = &body.config {
        check_config(config)?;
    }
    if body.next_release_seq.is_some_and(|n| n < 1) {
        return Err(ApiError::bad_request(
            "invalid_sequence",
            "next_release_seq must be at least 1",
        ));
    }
    let patch = FleetPatch {
        auto_accept: body.auto_accept,
        release_key: body.release_key,
        poll_interval_s: body.poll_interval_s,
        config: body.config,
        seed_protocol: body.seed_protocol,
        next_release_seq: body.next_release_seq,
    };
    let fleet = hub.store.update_fleet(op.org_id, fleet.id, &patch).await?;
    hub.devices.invalidate_fleet(fleet.id);
    Ok(axum::Json(view(&hub, fleet).await?))
}

/// Config must be a JSON object of modest size.
pub(crate) fn check_config(config: &serde_json::Value) -> Result<(), ApiError> {
    if !config.is_object() {
        return Err(ApiError::bad_request(
            "invalid_config",
            "config must be a JSON object, such as {\"meter\": {\"name\": \"123\"}}",
        ));
    }
    if config.to_string().len() > 64 * 1024 {
        return Err(ApiError::bad_request(
            "invalid_config",
            "config is limited to 64 KiB of JSON",
        ));
    }
    Ok(())
}

/// `POST /api/v1/fleets/{fleet}/provisioning-key`: a new key; the old one stops working.
pub async fn rotate_key(
    State(hub): State<HubState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let fleet = fleet_named(&hub, &op, &name).await?;
    let key = hub
        .store
        .rotate_provisioning_key(op.org_id, fleet.id)
        .await?;
    Ok(axum::Json(serde_json::json!({ "provisioning_key": key })))
}

/// `POST /api/v1/fleets/{fleet}/deploy`.
pub async fn deploy(
    State(hub): State<HubState>,
    op: Operator,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<Deploy>,
) -> Result<axum::Json<Deployed>, ApiError> {
    let fleet = fleet_named(&hub, &op, &name).await?;
    let release = hub
        .store
        .release_by_version(op.org_id, fleet.id, &body.release)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("release {:?} in fleet {name:?}", body.release))
        })?;
    let Some(device) = body.device else {
        hub.store.set_fleet_target(op.org_id, &release).await?;
        hub.devices.invalidate_fleet(fleet.id);
        tracing::info!(fleet = %fleet.name, release = %release.version, "deployed to fleet");
        return Ok(axum::Json(Deployed {
            release: release.version,
            device_type: Some(release.device_type.unwrap_or_else(|| "*".into())),
            device: None,
        }));
    };
    let id = DeviceId::parse(&device)
        .map_err(|e| ApiError::bad_request("invalid_device_id", e.to_string()))?;
    let device = hub
        .store
        .device(op.org_id, &id)
        .await?
        .filter(|d| d.fleet_id == fleet.id)
        .ok_or_else(|| ApiError::not_found(format!("device {id} in fleet {name:?}")))?;
    check_release_fits(&release, &device.device_type)?;
    hub.store
        .set_device_pin(op.org_id, &device.id, Some(release.id))
        .await?;
    hub.devices.invalidate_device(&device.id);
    tracing::info!(device = %device.id, release = %release.version, "deployed to device");
    Ok(axum::Json(Deployed {
        release: release.version,
        device_type: None,
        device: Some(device.id.to_string()),
    }))
}

/// Refuses a release built for another device type.
pub(crate) fn check_release_fits(release: &Release, device_type: &str) -> Result<(), ApiError> {
    match &release.device_type {
        Some(t) if t != device_type => Err(ApiError::bad_request(
            "wrong_device_type",
            format!(
                "release {} is for device type {t:?}, but the device is {device_type:?}",
                release.version
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether a device seen at `last_seen` counts as online under a poll interval.
pub(crate) fn is_online(last_seen: Option<i64>, poll_interval_s: i64, now: i64) -> bool {
    last_seen.is_some_and(|t| t >= online_since(poll_interval_s, now))
}

fn online_since(poll_interval_s: i64, now: i64) -> i64 {
    now - (2 * poll_interval_s * 1000 + 10_000)
}

/// `GET /api/v1/fleets/{fleet}/status`.
pub async fn status(
    State(hub): State<HubState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<axum::Json<FleetStatus>, ApiError> {
    let fleet = fleet_named(&hub, &op, &name).await?;
    let now = now_ms();
    let targets = hub.store.fleet_targets(op.org_id, fleet.id).await?;
    let groups = hub
        .store
        .fleet_device_groups(
            op.org_id,
            fleet.id,
            online_since(fleet.poll_interval_s, now),
        )
        .await?;
    let mut status = FleetStatus {
        fleet: fleet.name.clone(),
        devices: 0,
        accepted: 0,
        pending: 0,
        revoked: 0,
        online: 0,
        up_to_date: 0,
        updating: 0,
        backing_off: 0,
        held: 0,
        converged: true,
        targets: targets
            .iter()
            .map(|(t, r)| TargetView {
                device_type: t.clone(),
                release: r.version.clone(),
            })
            .collect(),
        releases: Vec::new(),
    };
    let mut pinned_versions: std::collections::HashMap<i64, Option<String>> =
        std::collections::HashMap::new();
    for group in groups {
        status.devices += group.count;
        match group.status {
            DeviceStatus::Pending => status.pending += group.count,
            DeviceStatus::Revoked => status.revoked += group.count,
            DeviceStatus::Accepted => {}
        }
        if group.status != DeviceStatus::Accepted {
            continue;
        }
        status.accepted += group.count;
        status.online += group.online;
        let target = match group.pinned_release_id {
            Some(id) => match pinned_versions.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let version = hub
                        .store
                        .release_by_id(op.org_id, id)
                        .await?
                        .map(|r| r.version);
                    e.insert(version).clone()
                }
            },
            None => targets
                .iter()
                .find(|(t, _)| *t == group.device_type)
                .or_else(|| targets.iter().find(|(t, _)| t == "*"))
                .map(|(_, r)| r.version.clone()),
        };
        let up_to_date = target.is_none() || target == group.current_release;
        if up_to_date {
            status.up_to_date += group.count;
        } else {
            status.converged = false;
        }
        match group.update_phase.as_str() {
            "downloading" | "installing" => status.updating += group.count,
            "backing_off" => status.backing_off += group.count,
            "held" => status.held += group.count,
            _ => {}
        }
        match status
            .releases
            .iter_mut()
            .find(|r| r.release == group.current_release)
        {
            Some(r) => r.devices += group.count,
            None => status.releases.push(ReleaseCount {
                release: group.current_release,
                devices: group.count,
            }),
        }
    }
    Ok(axum::Json(status))
}
