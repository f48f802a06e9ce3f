//! Management API: devices — listing, acceptance, revocation, retries, config and pins.

use std::collections::HashMap;

use axum::extract::{Path, State};
use drover_protocol::device::{DeviceStatus, Facts, UpdateStatus};
use drover_protocol::ids::DeviceId;
use serde::{Deserialize, Serialize};

use super::fleets::{check_config, check_release_fits, is_online};
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::state::{HubState, Operator};
use crate::store::{AttemptRecord, Device, DeviceFilter, DeviceType, Fleet, SiteChange, now_ms};

/// A device as the API shows it.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    /// Its ID.
    pub id: String,
    /// Its fleet's name.
    pub fleet: String,
    /// Device type.
    pub device_type: String,
    /// `pending`, `accepted` or `revoked`.
    pub status: DeviceStatus,
    /// `drover` (the Drover agent) or `seed` (the seed updater).
    pub protocol: String,
    /// The agent's version.
    pub agent_version: String,
    /// The release it runs.
    pub current_release: Option<String>,
    /// The release it should run.
    pub target_release: Option<String>,
    /// A release pinned to it.
    pub pinned_release: Option<String>,
    /// Its update state (why a release is held, say).
    pub update: UpdateStatus,
    /// What it reported about itself.
    pub facts: Facts,
    /// Where its last check-in came from.
    pub remote_ip: Option<String>,
    /// Its own config (merged over the fleet's).
    pub config: serde_json::Value,
    /// Its telemetry as it last reported (spool, drops, data budget).
    pub telemetry: Option<drover_protocol::device::TelemetryStatus>,
    /// Telemetry bytes the hub received from it.
    pub telemetry_bytes: i64,
    /// Readings of its numbered batches that were stored already (same meter, channel and
    /// time) and so skipped. 0 on a healthy device: a resent batch keeps its number and is
    /// dropped whole; more means readings came again under a new batch number.
    pub duplicate_points: i64,
    /// The site it is installed at, and that site's customer.
    pub site: Option<String>,
    /// The customer of its site.
    pub customer: Option<String>,
    /// The snapshot a seed device runs.
    pub seed_snapshot: Option<i64>,
    /// When it was last seen (Unix milliseconds).
    pub last_seen: Option<i64>,
    /// Seen within two poll intervals and ten seconds.
    pub online: bool,
    /// When it enrolled.
    pub created_at: i64,
}

/// Query of `GET /api/v1/devices`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this fleet.
    #[serde(default)]
    pub fleet: Option<String>,
    /// Only this status.
    #[serde(default)]
    pub status: Option<String>,
    /// At most this many (default 1000, at most 10000).
    #[serde(default)]
    pub limit: Option<i64>,
}

/// `PATCH /api/v1/devices/{id}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateDevice {
    /// The device's own config (replaces the old one).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Pin a release version to the device; `""` removes the pin.
    #[serde(default)]
    pub pin: Option<String>,
    /// Assign the device to a site (by name); `""` takes it off its site.
    #[serde(default)]
    pub site: Option<String>,
    /// From when the site change holds: Unix ms or RFC 3339 (default now). An installer's box
    /// assigned a few days after it was mounted counts for its site from the day it was.
    #[serde(default)]
    pub site_since: Option<String>,
}

/// Fleets and their targets, loaded once per request.
struct FleetIndex<'a> {
    hub: &'a HubState,
    org_id: i64,
    fleets: HashMap<i64, Fleet>,
    releases: HashMap<i64, Option<String>>,
}

impl<'a> FleetIndex<'a> {
    fn new(hub: &'a HubState, org_id: i64) -> FleetIndex<'a> {
        FleetIndex {
            hub,
            org_id,
            fleets: HashMap::new(),
            releases: HashMap::new(),
        }
    }

    async fn view(&mut self, device: Device) -> Result<DeviceView, ApiError> {
        if !self.fleets.contains_key(&device.fleet_id) {
            let fleet = self
                .hub
                .store
                .fleet_by_id(self.org_id, device.fleet_id)
                .await?
                .ok_or_else(|| ApiError::internal("device without a fleet"))?;
            self.fleets.insert(device.fleet_id, fleet);
        }
        let Some(fleet) = self.fleets.get(&device.fleet_id) else {
            return Err(ApiError::internal("fleet index"));
        };
        let target = crate::desired::target_release(&self.hub.store, &device, fleet)
            .await?
            .map(|r| r.version);
        let pinned = match device.pinned_release_id {
            Some(id) => {
                if !self.releases.contains_key(&id) {
                    let version = self
                        .hub
                        .store
                        .release_by_id(self.org_id, id)
                        .await?
                        .map(|r| r.version);
                    self.releases.insert(id, version);
                }
                self.releases.get(&id).cloned().flatten()
            }
            None => None,
        };
        // A check-in not yet flushed to the database is fresher than what the row says.
        let pending = self.hub.presence.peek(&device.id);
        let last_seen = match (&pending, device.last_seen) {
            (Some(p), Some(seen)) => Some(p.at.max(seen)),
            (Some(p), None) => Some(p.at),
            (None, seen) => seen,
        };
        let site = match device.site_id {
            Some(id) => self.hub.store.site_by_id(self.org_id, id).await?,
            None => None,
        };
        Ok(DeviceView {
            telemetry: device.telemetry,
            telemetry_bytes: device.telemetry_bytes,
            duplicate_points: device.duplicate_points,
            site: site.as_ref().map(|s| s.name.clone()),
            customer: site.map(|s| s.customer),
            id: device.id.to_string(),
            fleet: fleet.name.clone(),
            device_type: device.device_type,
            status: device.status,
            protocol: device.protocol,
            agent_version: device.agent_version,
            current_release: device.current_release,
            target_release: target,
            pinned_release: pinned,
            update: device.update,
            facts: device.facts,
            remote_ip: pending.and_then(|p| p.remote_ip).or(device.remote_ip),
            config: device.config,
            seed_snapshot: device.seed_snapshot,
            online: is_online(last_seen, fleet.poll_interval_s, now_ms()),
            last_seen,
            created_at: device.created_at,
        })
    }
}

fn parse_id(text: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(text).map_err(|e| ApiError::bad_request("invalid_device_id", e.to_string()))
}

async fn device_of(hub: &HubState, op: &Operator, id: &DeviceId) -> Result<Device, ApiError> {
    hub.store
        .device(op.org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id}")))
}

/// `GET /api/v1/devices`.
pub async fn list(
    State(hub): State<HubState>,
    op: Operator,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<axum::Json<Vec<DeviceView>>, ApiError> {
    let fleet_id = match &query.fleet {
        Some(name) => Some(super::fleets::fleet_named(&hub, &op, name).await?.id),
        None => None,
    };
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(DeviceStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_status",
                format!("status is pending, accepted or revoked, not {s:?}"),
            )
        })?),
    };
    let filter = DeviceFilter {
        fleet_id,
        status,
        limit: Some(query.limit.unwrap_or(1000).clamp(1, 10_000)),
    };
    let mut index = FleetIndex::new(&hub, op.org_id);
    let mut views = Vec::new();
    for device in hub.store.list_devices(op.org_id, &filter).await? {
        views.push(index.view(device).await?);
    }
    Ok(axum::Json(views))
}

/// `GET /api/v1/devices/{id}`.
pub async fn show(
    State(hub): State<HubState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<axum::Json<DeviceView>, ApiError> {
    let device = device_of(&hub, &op, &parse_id(&id)?).await?;
    Ok(axum::Json(
        FleetIndex::new(&hub, op.org_id).view(device).await?,
    ))
}

/// `POST /api/v1/devices/{id}/accept`.
pub async fn accept(
    State(hub): State<HubState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<axum::Json<DeviceView>, ApiError> {
    let id = parse_id(&id)?;
    let device = device_of(&hub, &op, &id).await?;
    match device.status {
        DeviceStatus::Revoked => {
            return Err(ApiError::conflict(format!(
                "device {id} was revoked; a revoked device cannot be accepted again"
            )));
        }
        DeviceStatus::Accepted => {}
        DeviceStatus::Pending => {
            hub.store
                .set_device_status(op.org_id, &id, DeviceStatus::Accepted)
                .await?;
            hub.devices.invalidate_device(&id);
            tracing::info!(device = %id, "device accepted");
        }
    }
    show(State(hub), op, Path(id.to_string())).await
}

/// `POST /api/v1/devices/{id}/revoke`.
pub async fn revoke(
    State(hub): State<HubState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<axum::Json<DeviceView>, ApiError> {
    let id = parse_id(&id)?;
    device_of(&hub, &op, &id).await?;
    hub.store
        .set_device_status(op.org_id, &id, DeviceStatus::Revoked)
        .await?;
    hub.devices.invalidate_device(&id);
    tracing::info!(device = %id, "device revoked");
    show(State(hub), op, Path(id.to_string())).await
}

/// `POST /api/v1/devices/{id}/retry`: the device forgets held releases and tries again.
pub async fn retry(
    State(hub): State<HubState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<axum::Json<DeviceView>, ApiError> {
    let id = parse_id(&id)?;
    device_of(&hub, &op, &id).await?;
    hub.store.bump_retry_generation(op.org_id, &id).await?;
    hub.devices.invalidate_device(&id);
    show(State(hub), op, Path(id.to_string())).await
}

/// `PATCH /api/v1/devices/{id}`: its own config, pin and site.
pub async fn update(
    State(hub): State<HubState>,
    op: Operator,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateDevice>,
) -> Result<axum::Json<DeviceView>, ApiError> {
    let id = parse_id(&id)?;
    let device = device_of(&hub, &op, &id).await?;
    // Everything is checked before anything changes.
    if let Some(config) = &body.config {
        check_config(config)?;
    }
    let pin = match body.pin.as_deref() {
        None => None,
        Some("") => Some(None),
        Some(pin) => {
            let release = hub
                .store
                .release_by_version(op.org_id, device.fleet_id, pin)
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(format!("release {pin:?} in the device's fleet"))
                })?;
            check_release_fits(&release, &device.device_type)?;
            Some(Some(release.id))
        }
    };
    let since = body
        .site_since
        .as_deref()
        .map(super::series::parse_time)
        .transpose()?;
    let site = match (&body.site, since) {
        (Some(site), since) => {
            let site_id = if site.is_empty() {
                None
            } else {
                Some(super::sites::site_named(&hub, &op, site).await?.id)
            };
            if since.is_some_and(|since| since > now_ms()) {
                return Err(ApiError::bad_request(
                    "invalid_site_since",
                    "site_since lies in the future; assign the site when the box is there",
                ));
            }
            Some((site_id, since))
        }
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_site_since",
                "site_since goes with site",
            ));
        }
        (None, None) => None,
    };
    // The site first: it is the one change that can still be refused.
    if let Some((site_id, since)) = site {
        match hub
            .store
            .set_device_site(op.org_id, &id, site_id, since)
            .await?
        {
            SiteChange::Done => {}
            SiteChange::NoDevice => return Err(ApiError::not_found(format!("device {id}"))),
            SiteChange::BeforeLast(last) => {
                return Err(ApiError::conflict(format!(
                    "device {id}'s site last changed at {last} (Unix ms); a change cannot start before that"
                )));
            }
        }
    }
    if let Some(config) = &body.config {
        hub.store.set_device_config(op.org_id, &id, config).await?;
    }
    if let Some(release_id) = pin {
        hub.store.set_device_pin(op.org_id, &id, release_id).await?;
    }
    hub.devices.invalidate_device(&id);
    show(State(hub), op, Path(id.to_string())).await
}

/// `GET /api/v1/devices/{id}/attempts`: update attempts, newest first, with output.
pub async fn attempts(
    State(hub): State<HubState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<AttemptRecord>>, ApiError> {
    let id = parse_id(&id)?;
    device_of(&hub, &op, &id).await?;
    Ok(axum::Json(
        hub.store.list_attempts(op.org_id, &id, 50).await?,
    ))
}

/// `GET /api/v1/device-types`: the hardware the organization's devices run on.
pub async fn device_types(
    State(hub): State<HubState>,
    op: Operator,
) -> Result<axum::Json<Vec<DeviceType>>, ApiError> {
    Ok(axum::Json(hub.store.list_device_types(op.org_id).await?))
}
